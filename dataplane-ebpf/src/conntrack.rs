//! Connection tracking (S6, S7, S9). One LRU entry per flow, keyed in the flow's original
//! direction; a packet looks up its own key, then the reverse. An entry idle longer than the
//! timeout of its state is a miss (it is left for the LRU to reclaim or for a new flow to
//! overwrite).
//!
//! States: TCP is opening until a packet is seen in the reply direction, then established; FIN or
//! RST in either direction moves it to closing. UDP is one-way until a reply, then replied. ICMP
//! and other protocols have one state each.
use aya_ebpf::helpers::bpf_ktime_get_ns;
use dataplane_common::{ct_state, CtEntry, CtKey};

use crate::{
    maps::VERSE_CT,
    parse::{IPPROTO_TCP, IPPROTO_UDP, TCP_FIN, TCP_RST},
};

#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    unsafe { bpf_ktime_get_ns() }
}

/// True if `entry` has been idle longer than its state's timeout (or has a state we do not know,
/// which is treated as expired: fail closed).
#[inline(always)]
fn expired(entry: &CtEntry, now: u64, timeouts: &[u64; ct_state::COUNT]) -> bool {
    match timeouts.get(entry.state as usize) {
        Some(timeout) => now.wrapping_sub(entry.last_seen_ns) > *timeout,
        None => true,
    }
}

/// The state of a new flow's first packet.
#[inline(always)]
pub fn initial_state(proto: u8, tcp_flags: u8) -> u8 {
    match proto {
        IPPROTO_TCP if tcp_flags & (TCP_FIN | TCP_RST) != 0 => ct_state::TCP_CLOSING,
        IPPROTO_TCP => ct_state::TCP_OPENING,
        IPPROTO_UDP => ct_state::UDP_ONE_WAY,
        crate::parse::IPPROTO_ICMP => ct_state::ICMP,
        _ => ct_state::OTHER,
    }
}

#[inline(always)]
fn next_state(state: u8, reply: bool, tcp_flags: u8) -> u8 {
    match state {
        ct_state::TCP_OPENING | ct_state::TCP_ESTABLISHED => {
            if tcp_flags & (TCP_FIN | TCP_RST) != 0 {
                ct_state::TCP_CLOSING
            } else if reply {
                ct_state::TCP_ESTABLISHED
            } else {
                state
            }
        }
        ct_state::UDP_ONE_WAY if reply => ct_state::UDP_REPLIED,
        _ => state,
    }
}

/// Looks `key` up in both directions. On a live hit, refreshes the entry (last seen, state) and
/// returns true.
#[inline(always)]
pub fn track(key: &CtKey, now: u64, timeouts: &[u64; ct_state::COUNT], tcp_flags: u8) -> bool {
    if let Some(entry) = VERSE_CT.get_ptr_mut(key) {
        // SAFETY: the kernel returned a pointer to a live value of this map's value type; the
        // worst a concurrent update can do is interleave two refreshes of the same flow.
        let entry = unsafe { &mut *entry };
        if !expired(entry, now, timeouts) {
            entry.state = next_state(entry.state, false, tcp_flags);
            entry.last_seen_ns = now;
            return true;
        }
    }
    let reverse = key.reversed();
    if let Some(entry) = VERSE_CT.get_ptr_mut(&reverse) {
        // SAFETY: as above.
        let entry = unsafe { &mut *entry };
        if !expired(entry, now, timeouts) {
            entry.state = next_state(entry.state, true, tcp_flags);
            entry.last_seen_ns = now;
            return true;
        }
    }
    false
}

/// True if the flow `key` is tracked and live either way; touches nothing. Used for ICMP errors,
/// which are admitted when they quote a tracked flow but do not keep it alive.
#[inline(always)]
pub fn is_tracked(key: &CtKey, now: u64, timeouts: &[u64; ct_state::COUNT]) -> bool {
    // SAFETY: read-only use of a pointer the kernel returned for this map's value type.
    if let Some(entry) = unsafe { VERSE_CT.get(key) } {
        if !expired(entry, now, timeouts) {
            return true;
        }
    }
    let reverse = key.reversed();
    // SAFETY: as above.
    if let Some(entry) = unsafe { VERSE_CT.get(&reverse) } {
        if !expired(entry, now, timeouts) {
            return true;
        }
    }
    false
}

/// Records a new flow allowed by policy. A failed insert (out of memory) is not a hole: the
/// flow's replies are then judged by policy.
#[inline(always)]
pub fn create(key: &CtKey, now: u64, state: u8) {
    let entry = CtEntry { last_seen_ns: now, state, _pad: [0; 7] };
    let _ = VERSE_CT.insert(key, &entry, 0);
}
