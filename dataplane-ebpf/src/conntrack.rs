//! Connection tracking (S6, S7, S9). One LRU entry per flow, keyed in the flow's original
//! direction; a packet looks up its own key, then the reverse. An entry idle longer than the
//! timeout of its state is a miss (it is left for the LRU to reclaim or for a new flow to
//! overwrite). Lookups touch nothing: only a packet that is delivered refreshes its flow.
//!
//! States: TCP is opening until a packet is seen in the reply direction, then established; FIN or
//! RST in either direction moves it to closing, and a SYN without ACK reopens a closing flow (the
//! 5-tuple reused, as Linux conntrack does from CLOSE/TIME_WAIT). UDP is one-way until a reply,
//! then replied. ICMP and other protocols have one state each.
use aya_ebpf::helpers::bpf_ktime_get_ns;
use dataplane_common::{ct_state, CtEntry, CtKey};

use crate::{
    maps::VERSE_CT,
    parse::{IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN},
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
        // Saturating: another CPU may have refreshed the entry after this program read `now`,
        // leaving `last_seen_ns` slightly ahead of it; that entry is fresh, not 2^64 ns old.
        Some(timeout) => now.saturating_sub(entry.last_seen_ns) > *timeout,
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
        IPPROTO_ICMP => ct_state::ICMP,
        _ => ct_state::OTHER,
    }
}

#[inline(always)]
fn next_state(state: u8, reply: bool, tcp_flags: u8) -> u8 {
    match state {
        ct_state::TCP_OPENING | ct_state::TCP_ESTABLISHED | ct_state::TCP_CLOSING => {
            if tcp_flags & (TCP_FIN | TCP_RST) != 0 {
                ct_state::TCP_CLOSING
            } else if state == ct_state::TCP_CLOSING {
                if tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
                    ct_state::TCP_OPENING
                } else {
                    state
                }
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

/// A live conntrack entry found for a packet.
pub struct Hit {
    entry: *mut CtEntry,
    /// The packet travels in the flow's reply direction.
    reply: bool,
}

/// Looks `key` up, then its reverse; expired entries are misses.
#[inline(always)]
pub fn lookup(key: &CtKey, now: u64, timeouts: &[u64; ct_state::COUNT]) -> Option<Hit> {
    if let Some(entry) = VERSE_CT.get_ptr_mut(key) {
        // SAFETY: the kernel returned a pointer to a live value of this map's value type.
        if !expired(unsafe { &*entry }, now, timeouts) {
            return Some(Hit { entry, reply: false });
        }
    }
    let reverse = key.reversed();
    if let Some(entry) = VERSE_CT.get_ptr_mut(&reverse) {
        // SAFETY: as above.
        if !expired(unsafe { &*entry }, now, timeouts) {
            return Some(Hit { entry, reply: true });
        }
    }
    None
}

/// Refreshes the flow of a packet that is being delivered: last seen, state.
#[inline(always)]
pub fn refresh(hit: Hit, now: u64, tcp_flags: u8) {
    // SAFETY: the pointer came from a lookup in this program run, and map values stay valid for
    // the whole run (RCU); the worst a concurrent update can do is interleave two refreshes of
    // the same flow.
    let entry = unsafe { &mut *hit.entry };
    entry.state = next_state(entry.state, hit.reply, tcp_flags);
    entry.last_seen_ns = now;
}

/// Records a new flow allowed by policy. A failed insert (out of memory) is not a hole: the
/// flow's replies are then judged by policy.
#[inline(always)]
pub fn create(key: &CtKey, now: u64, state: u8) {
    let entry = CtEntry { last_seen_ns: now, state, _pad: [0; 7] };
    let _ = VERSE_CT.insert(key, &entry, 0);
}
