//! Connection tracking of IPv6 flows: `conntrack`'s lookups and creation over `VERSE_CT6`
//! (keys with 16-byte addresses, the same values, the same budgets in `VERSE_CT_OWNERS`). What
//! it means is `controller/src/verdict/conntrack.rs`; the value is built and refreshed by
//! `conntrack` itself ([`conntrack::refresh`], [`conntrack::refresh_and_cache_in`],
//! [`conntrack::create`], over [`conntrack::Table`]). IPv6 flows cache their delivery as IPv4's
//! do (`conntrack`, "Delivery cache"): the same hops in the same values, under the same route
//! epoch, which the controller bumps after changes to `VERSE_ROUTES6` as to `VERSE_ROUTES`.
use aya_ebpf::programs::TcContext;
use dataplane_common::conntrack::{expired, initial_state6};
use dataplane_common::{ct_state, Ct6Key, CtEntry, CtValue, DropReason};

use crate::{
    conntrack::{self, Found, Hit, NewFlow, Role, Size},
    flow::{Ipv6, L4},
    maps::{VERSE_CT6, VERSE_CT_SCRATCH},
};

/// [`conntrack::lookup`] in `VERSE_CT6`; the reverse of `key` is built in `rev`.
#[inline(always)]
pub fn lookup(
    key: &Ct6Key,
    rev: &mut Ct6Key,
    role: Role,
    sender: u64,
    now: u64,
    timeouts: &[u64; ct_state::COUNT],
) -> Found {
    if role == Role::Untracked {
        return Found { hit: None };
    }
    let own = VERSE_CT6.get_ptr_mut(key);
    if role != Role::Answers {
        if let Some(value) = own {
            // SAFETY: the kernel returned a pointer to a live value of this map's value type.
            let e = unsafe { &(*value).entry };
            if e.src_serial == sender && !expired(e.state, e.last_seen_ns, now, timeouts) {
                return Found { hit: Some(Hit { value, reply: false }) };
            }
        }
    }
    if role == Role::Opens {
        return Found { hit: None };
    }
    *rev = key.reversed();
    if let Some(value) = VERSE_CT6.get_ptr_mut(rev) {
        // SAFETY: as above.
        let e = unsafe { &(*value).entry };
        if e.dst_serial == sender && !expired(e.state, e.last_seen_ns, now, timeouts) {
            return Found { hit: Some(Hit { value, reply: true }) };
        }
    }
    Found { hit: None }
}

/// [`conntrack::tracked`] in `VERSE_CT6` (the reverse of `key` built in `rev`).
#[inline(always)]
pub fn tracked(
    key: &Ct6Key,
    rev: &mut Ct6Key,
    sender: u64,
    receiver: u64,
    now: u64,
    timeouts: &[u64; ct_state::COUNT],
) -> bool {
    lookup(key, rev, Role::Any, sender, now, timeouts)
        .hit
        .is_some_and(|h| h.receiver_serial() == receiver)
}

/// The [`Size`] of the IPv6 packet `ip` in `ctx`, whose fixed header is at `ip_off`: the whole
/// IPv6 packet (fixed and extension headers, payload); a GSO packet is `gso_segs` of them, each
/// with its own headers.
#[inline(always)]
pub fn size(ctx: &TcContext, ip: &Ipv6, l4: &L4, ip_off: usize) -> Size {
    let total = (ip.ip_end - ip_off) as u64;
    // SAFETY: a read of `gso_segs` from the context, which the verifier allows for TC.
    let segs = unsafe { (*ctx.skb.skb).gso_segs } as u64;
    if segs > 1 {
        let headers = (ip.l4_off - ip_off + l4.hdr_len as usize) as u64;
        Size { segs, bytes: total + (segs - 1) * headers }
    } else {
        Size { segs: 1, bytes: total }
    }
}

/// [`conntrack::open`] for an IPv6 flow under `key` (in `VERSE_CT6`), whose lookup found `own`:
/// the entry in its initial state, counting this first packet (`size`, `tcp_flags`), with no
/// cached hop, built in
/// this CPU's `VERSE_CT_SCRATCH` slot field by field (what `conntrack`'s `entry` and
/// `first_counters` write, without the 104-byte counters on the stack: IPv6's program and the
/// calls it makes share 512 bytes).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub fn open(
    key: &Ct6Key,
    own: Option<*mut CtValue>,
    now: u64,
    proto: u8,
    tcp_flags: u8,
    size: &Size,
    interval: u32,
    flow: &NewFlow,
) -> Result<(), DropReason> {
    let scratch = VERSE_CT_SCRATCH.get_ptr_mut(0).ok_or(DropReason::ConntrackBudgetExceeded)?;
    // SAFETY: this CPU's scratch slot, which nothing else uses until the value is inserted (see
    // `VERSE_CT_SCRATCH`); map values live for the whole run. `CtHop` is five aligned words,
    // `CtCounters` thirteen aligned u64s (26 words), zeroed before the fields are set.
    let value = unsafe {
        let v = &mut *scratch;
        conntrack::store_zero_words(core::ptr::addr_of_mut!(v.original).cast::<u32>(), 5);
        conntrack::store_zero_words(core::ptr::addr_of_mut!(v.reply).cast::<u32>(), 5);
        const _: () = assert!(core::mem::size_of::<dataplane_common::CtCounters>() == 104);
        conntrack::store_zero_words(core::ptr::addr_of_mut!(v.counters).cast::<u32>(), 26);
        v
    };
    value.entry = CtEntry {
        last_seen_ns: now,
        src_serial: flow.src,
        dst_serial: flow.dst,
        owner_slot: flow.owner_slot,
        state: initial_state6(proto),
        owner: flow.owner,
        _pad: [0; 2],
    };
    let c = &mut value.counters;
    c.cpu[0] = conntrack::this_cpu();
    c.own_packets[0] = size.segs;
    c.own_bytes[0] = size.bytes;
    c.created_ns = now;
    c.rule_egress = flow.rule_egress;
    c.rule_ingress = flow.rule_ingress;
    c.flags_interval = interval;
    c.flags[0] = tcp_flags;
    conntrack::create(key, own, value)
}

impl conntrack::Table for Ct6Key {
    #[inline(always)]
    fn insert(&self, value: &CtValue, flags: u64) -> bool {
        VERSE_CT6.insert(self, value, flags).is_ok()
    }
}
