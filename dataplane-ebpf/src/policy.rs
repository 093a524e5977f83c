//! Policy lookups (S1, S5): up to three longest-prefix lookups in `VERSE_POLICY`, one per way a
//! rule can name the peer — its identity, its CIDR class, or `ANY` (0.0.0.0/0). Any hit allows,
//! and the first hit names the rule credited with the verdict (see
//! `dataplane_common::PolicyValue`). A lookup is skipped when the identity has no entry of its
//! kind in that direction (`VERSE_POLICY_KINDS`, an array lookup the verifier inlines; see
//! `dataplane_common::peer_kind` for why that never hides an entry). The number of lookups is
//! fixed, whatever the number of rules (see `dataplane_common::PolicyKey`).
use aya_ebpf::maps::lpm_trie::Key;
use dataplane_common::{
    peer, peer_kind, policy_prefix, CidrKey, PolicyKey, PolicyValue, CIDR_KEY_VNI_BITS,
};

use crate::maps::{VERSE_CIDRS, VERSE_POLICY, VERSE_POLICY_KINDS};

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
