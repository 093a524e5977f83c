//! Policy lookups (S1, S5): up to three longest-prefix lookups in `VERSE_POLICY`, one per way a
//! rule can name the peer — its identity, its CIDR class, or `ANY` (0.0.0.0/0). Any hit allows,
//! and the first hit names the rule credited with the verdict (see
//! `dataplane_common::PolicyValue`). A lookup is skipped when the identity has no entry of its
//! kind in that direction (`VERSE_POLICY_KINDS`, an array lookup the verifier inlines; see
//! `dataplane_common::peer_kind` for why that never hides an entry). The number of lookups is
//! fixed, whatever the number of rules (see `dataplane_common::PolicyKey`).
use aya_ebpf::maps::lpm_trie::Key;
use dataplane_common::{
    peer, peer_kind, policy_prefix, Cidr6Key, CidrKey, PolicyKey, PolicyValue, CIDR_KEY_VNI_BITS,
    DIRECTION_IPV6,
};

use crate::maps::{VERSE_CIDRS, VERSE_CIDRS6, VERSE_POLICY, VERSE_POLICY_KINDS};
use crate::nd::A16;

/// The CIDR class of `ip` in universe `vni`: the peer value of the longest rule CIDR that
/// contains it, if any.
#[inline(always)]
fn cidr_class(vni: u32, ip: [u8; 4]) -> Option<u32> {
    let key = Key::new(CIDR_KEY_VNI_BITS + 32, CidrKey { vni: vni.to_be_bytes(), addr: ip });
    VERSE_CIDRS.get(&key).copied()
}

/// A `VERSE_POLICY` lookup key built as four aligned words. The key type is packed (alignment
/// 1) and `PolicyKey::peer` sits at an odd offset of it; with misaligned accesses allowed
/// (`controller/build.rs`), LLVM writes such a field with one 4-byte store, which the verifier
/// refuses on the stack (it tracks stack slots by aligned words).
#[repr(C, align(4))]
struct PolicyLookup([u32; 4]);

const _: () =
    assert!(core::mem::size_of::<Key<PolicyKey>>() == core::mem::size_of::<PolicyLookup>());

impl PolicyLookup {
    #[inline(always)]
    fn new(data: &PolicyKey) -> PolicyLookup {
        let (i, p, q) = (data.identity, data.peer, data.port);
        PolicyLookup([
            policy_prefix::FULL,
            u32::from_ne_bytes(i),
            u32::from_ne_bytes([data.direction, p[0], p[1], p[2]]),
            u32::from_ne_bytes([p[3], data.proto, q[0], q[1]]),
        ])
    }

    #[inline(always)]
    fn get(&self) -> Option<PolicyValue> {
        // SAFETY: `Key<PolicyKey>` is `repr(C, packed)`: 16 bytes of alignment 1 laid out as
        // prefix length, identity, direction, peer, protocol, port, which are these words'
        // bytes in memory order (asserted size above); any bytes are a valid key.
        let key = unsafe { &*(self as *const PolicyLookup).cast::<Key<PolicyKey>>() };
        VERSE_POLICY.get(key).copied()
    }
}

/// The entry of the policy of `identity` that allows traffic in `direction` with the peer described
/// by `peer_identity` (when the peer is a known endpoint) and `peer_ip`, for `proto` and `port`
/// (destination port, or `type << 8 | code` for ICMP, 0 otherwise): the first of the three
/// lookups that hits. `None`: denied.
#[inline(always)]
pub fn rule(
    identity: u32,
    direction: u8,
    peer_identity: Option<u32>,
    vni: u32,
    peer_ip: [u8; 4],
    proto: u8,
    port: u16,
) -> Option<PolicyValue> {
    // Every identity has a slot (identities are at most `MAX_IDENTITY`).
    let kinds = VERSE_POLICY_KINDS.get(identity).copied().unwrap_or(0);
    let has = |kind| kinds & peer_kind::bit(direction, kind) != 0;
    let mut data = PolicyKey {
        identity: identity.to_be_bytes(),
        direction,
        peer: [0; 4],
        proto,
        port: port.to_be_bytes(),
    };
    if let Some(peer_id) = peer_identity.filter(|_| has(peer_kind::IDENTITY)) {
        data.peer = peer_id.to_be_bytes();
        if let Some(v) = PolicyLookup::new(&data).get() {
            return Some(v);
        }
    }
    // The class lookup (a trie of its own) only when a class could be named.
    if has(peer_kind::CIDR) {
        if let Some(class) = cidr_class(vni, peer_ip) {
            data.peer = class.to_be_bytes();
            if let Some(v) = PolicyLookup::new(&data).get() {
                return Some(v);
            }
        }
    }
    if !has(peer_kind::ANY) {
        return None;
    }
    data.peer = peer::ANY.to_be_bytes();
    PolicyLookup::new(&data).get()
}

/// A `VERSE_CIDRS6` lookup key, 8-byte aligned with the address at offset 8: `Key<Cidr6Key>`
/// is packed, and LLVM would copy the address into it with wide stores wherever it sits on
/// the stack, which the verifier refuses unless aligned (see `PolicyLookup`).
#[repr(C, align(8))]
struct Cidr6Lookup {
    prefix_len: u32,
    vni: [u8; 4],
    addr: [u8; 16],
}

const _: () = assert!(core::mem::size_of::<Key<Cidr6Key>>() == 24);

/// The IPv6 CIDR class of `ip` in universe `vni` (`VERSE_CIDRS6`).
#[inline(always)]
fn cidr_class6(vni: u32, ip: &A16) -> Option<u32> {
    let lookup =
        Cidr6Lookup { prefix_len: CIDR_KEY_VNI_BITS + 128, vni: vni.to_be_bytes(), addr: ip.0 };
    // SAFETY: `Key<Cidr6Key>` is `repr(C, packed)`: prefix length, VNI, address, 24 bytes of
    // alignment 1, which is this struct's layout (checked above); any bytes are a valid key.
    let key = unsafe { &*(&lookup as *const Cidr6Lookup).cast::<Key<Cidr6Key>>() };
    VERSE_CIDRS6.get(key).copied()
}

/// What [`rule6`] judges: the local endpoint's identity, the direction (IPv4's, the IPv6 one
/// is derived), the peer's identity when it is an endpoint (`has_peer`), the universe, the
/// protocol and port (few arguments: a BPF-to-BPF call takes at most five).
#[repr(C)]
pub struct PolicyQuery {
    pub identity: u32,
    pub peer_identity: u32,
    pub vni: u32,
    pub port: u16,
    pub direction: u8,
    pub proto: u8,
    pub has_peer: bool,
}

/// [`rule`] for a packet whose peer is the IPv6 address `peer_ip`: the same three lookups under
/// the IPv6 direction (`direction + DIRECTION_IPV6`), the class from `VERSE_CIDRS6`. A call of
/// its own (IPv6's program runs it twice), for its stack.
#[inline(always)]
pub fn rule6(q: &PolicyQuery, peer_ip: &A16) -> Option<PolicyValue> {
    let found = lookups6(q, peer_ip);
    (found >> 63 != 0)
        .then_some(PolicyValue { rule: found as u32, slot: (found >> 32) as u32 & 0x7FFF_FFFF })
}

/// What [`lookups6`] returns, in one register (anything wider is returned through the
/// caller's stack, whose pointer the verifier does not let a call return): bit 63 set if
/// allowed, then the entry's slot (below `capacity::RULE_HITS`) and rule.
struct Found6;

impl Found6 {
    #[inline(always)]
    fn of(v: Option<PolicyValue>) -> u64 {
        match v {
            Some(v) => 1 << 63 | u64::from(v.slot & 0x7FFF_FFFF) << 32 | u64::from(v.rule),
            None => 0,
        }
    }
}

#[inline(never)]
fn lookups6(q: &PolicyQuery, peer_ip: &A16) -> u64 {
    let direction = q.direction + DIRECTION_IPV6;
    let kinds = VERSE_POLICY_KINDS.get(q.identity).copied().unwrap_or(0);
    let has = |kind| kinds & peer_kind::bit(direction, kind) != 0;
    let mut data = PolicyKey {
        identity: q.identity.to_be_bytes(),
        direction,
        peer: [0; 4],
        proto: q.proto,
        port: q.port.to_be_bytes(),
    };
    if q.has_peer && has(peer_kind::IDENTITY) {
        data.peer = q.peer_identity.to_be_bytes();
        if let Some(v) = PolicyLookup::new(&data).get() {
            return Found6::of(Some(v));
        }
    }
    if has(peer_kind::CIDR) {
        if let Some(class) = cidr_class6(q.vni, peer_ip) {
            data.peer = class.to_be_bytes();
            if let Some(v) = PolicyLookup::new(&data).get() {
                return Found6::of(Some(v));
            }
        }
    }
    if !has(peer_kind::ANY) {
        return Found6::of(None);
    }
    data.peer = peer::ANY.to_be_bytes();
    Found6::of(PolicyLookup::new(&data).get())
}
