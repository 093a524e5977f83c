//! Connection tracking (S6, S7, S9). One LRU entry per flow, keyed in the flow's original
//! direction; a packet looks up its own key, then the reverse. An entry idle longer than the
//! timeout of its state is a miss (it is left for the LRU to reclaim or for a new flow to
//! overwrite). Lookups touch nothing: only a packet that is delivered refreshes its flow.
//!
//! Direction (S7): what a packet may do is its [`Role`], read from its header alone. Only a
//! packet that can begin a flow creates one, in its own direction: a TCP SYN (without ACK, RST or
//! FIN), an ICMP echo request, or any UDP or other-protocol packet. A TCP segment without SYN
//! continues a tracked flow either way but never creates one (Linux conntrack with
//! `nf_conntrack_tcp_loose = 0`); a SYN or an echo request matches a flow only in its original
//! direction (in the reply direction it is no hit: it is judged as the new packet it is); an
//! echo reply matches only in the reply direction and never creates. Other ICMP messages are
//! never tracked: an error is related to a flow or judged by the rules, each time (S6).
//!
//! States: TCP is opening until a SYN-ACK is seen in the reply direction, then established; FIN
//! or RST in either direction moves it to closing, and a SYN without ACK in the original
//! direction reopens a closing flow (the 5-tuple reused, as Linux conntrack does from
//! CLOSE/TIME_WAIT). UDP is one-way until a reply, then replied. ICMP echo and other protocols
//! have one state each.
//!
//! Delivery cache: each entry also remembers, per direction, where the last delivered packet
//! went ([`CtHop`]: the receiver's ifindex and MAC, or the underlay address of its host), stamped
//! with the route epoch (`VERSE_EPOCH`) read *before* the route lookup it was copied from. A hit
//! whose hop carries the current epoch delivers without looking the route up; any other hit looks
//! it up and caches the answer ([`refresh_and_cache`]). Since the controller bumps the epoch after
//! every route or endpoint change, a cached hop is never staler than a lookup would be. Hops are
//! only ever written by replacing the whole value (an atomic swap of the LRU element), never in
//! place, so a reader never sees a hop torn between two writers.
use aya_ebpf::helpers::{bpf_jiffies64, bpf_ktime_get_coarse_ns};
use dataplane_common::{ct_state, CtEntry, CtHop, CtKey, CtValue, Route};

use crate::{
    flow,
    maps::{VERSE_CLOCK, VERSE_CT, VERSE_EPOCH},
    parse::{
        ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST, IPPROTO_ICMP, IPPROTO_TCP, IPPROTO_UDP, TCP_ACK,
        TCP_FIN, TCP_RST, TCP_SYN,
    },
};

/// The conntrack clock: `CLOCK_MONOTONIC_COARSE` (`bpf_ktime_get_coarse_ns`), nanoseconds that
/// advance once per scheduler tick, fine enough for timeouts of seconds. Read through a per-CPU
/// copy keyed by `jiffies` (`bpf_jiffies64`, which the verifier inlines into a memory load): the
/// helper, an out-of-line call that was a tenth of the established path, runs once per tick and
/// CPU. A program interrupted on its CPU between the two stores of a refresh can leave the copy
/// one tick behind, for one tick: conntrack time is tick-precise anyway.
#[inline(always)]
pub fn now() -> u64 {
    // SAFETY: bpf_jiffies64 has no preconditions.
    let jiffies = unsafe { bpf_jiffies64() };
    if let Some(clock) = VERSE_CLOCK.get_ptr_mut(0) {
        // SAFETY: slot 0 of this CPU's copy; nothing else runs on this CPU during the program
        // but a program that interrupts it (see above).
        let clock = unsafe { &mut *clock };
        if clock.jiffies == jiffies {
            return clock.ns;
        }
        // SAFETY: bpf_ktime_get_coarse_ns has no preconditions.
        let ns = unsafe { bpf_ktime_get_coarse_ns() };
        clock.jiffies = jiffies;
        clock.ns = ns;
        return ns;
    }
    // SAFETY: as above.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// True if `entry` has been idle for at least its state's timeout (or has a state we do not know,
/// which is treated as expired: fail closed).
#[inline(always)]
fn expired(entry: &CtEntry, now: u64, timeouts: &[u64; ct_state::COUNT]) -> bool {
    match timeouts.get(entry.state as usize) {
        // Saturating: another CPU may have refreshed the entry after this program read `now`,
        // leaving `last_seen_ns` slightly ahead of it; that entry is fresh, not 2^64 ns old.
        // At least the timeout, not more: the clock advances by ticks, and a timeout of 0 must
        // expire an entry made within the same tick.
        Some(timeout) => now.saturating_sub(entry.last_seen_ns) >= *timeout,
        None => true,
    }
}

/// What a packet may do in connection tracking (S7), from its header alone (see the module doc).
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Begins a flow in its own direction, and matches a flow only in its original direction:
    /// a TCP SYN without ACK, RST or FIN; an ICMP echo request.
    Opens,
    /// Matches a flow either way and begins one when none matches: UDP and other protocols,
    /// whose headers do not tell a first packet from a reply.
    Any,
    /// Matches a flow either way, never begins one: every other TCP segment.
    Continues,
    /// Matches a flow only in its reply direction, never begins one: an ICMP echo reply.
    Answers,
    /// Never tracked: every other ICMP message.
    Untracked,
}

/// The [`Role`] of a packet of protocol `proto` with these TCP flags or this ICMP type.
#[inline(always)]
pub fn role(proto: u8, tcp_flags: u8, icmp_type: u8) -> Role {
    match proto {
        IPPROTO_TCP if tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN) == TCP_SYN => {
            Role::Opens
        }
        IPPROTO_TCP => Role::Continues,
        IPPROTO_ICMP if icmp_type == ICMP_ECHO_REQUEST => Role::Opens,
        IPPROTO_ICMP if icmp_type == ICMP_ECHO_REPLY => Role::Answers,
        IPPROTO_ICMP => Role::Untracked,
        _ => Role::Any,
    }
}

/// True if a packet of this role, admitted by policy with no flow matching it, begins a flow.
#[inline(always)]
pub fn creates(role: Role) -> bool {
    matches!(role, Role::Opens | Role::Any)
}

/// The state of a new flow's first packet (which [`creates`] it).
#[inline(always)]
pub fn initial_state(proto: u8) -> u8 {
    match proto {
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
                // Only a SYN in the original direction gets here (`Role::Opens`).
                if tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
                    ct_state::TCP_OPENING
                } else {
                    state
                }
            } else if reply && tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK {
                ct_state::TCP_ESTABLISHED
            } else {
                state
            }
        }
        ct_state::UDP_ONE_WAY if reply => ct_state::UDP_REPLIED,
        _ => state,
    }
}

/// The current route epoch. Read it before looking a route up whose answer will be cached.
#[inline(always)]
pub fn epoch() -> u32 {
    // Slot 0 of an array always exists; 0 (no epoch yet) disables the cache.
    VERSE_EPOCH.get(0).copied().unwrap_or(0)
}

/// The hop to cache for `route`, looked up after `epoch` was read.
#[inline(always)]
pub fn hop(route: &Route, epoch: u32) -> CtHop {
    CtHop { epoch, ifindex: route.ifindex, mac: route.mac, _pad: [0; 2], underlay: route.underlay }
}

/// A live conntrack entry found for a packet.
pub struct Hit {
    value: *mut CtValue,
    /// The packet travels in the flow's reply direction.
    reply: bool,
}

impl Hit {
    /// The cached delivery for this packet's direction, if it was cached under `epoch`.
    #[inline(always)]
    pub fn cached(&self, epoch: u32) -> Option<CtHop> {
        // SAFETY: the pointer came from a lookup in this program run; map values stay valid for
        // the whole run (RCU), and hops are never written in place (see the module doc).
        let v = unsafe { &*self.value };
        let hop = if self.reply { v.reply } else { v.original };
        if hop.epoch == epoch && epoch != 0 {
            Some(hop)
        } else {
            None
        }
    }
}

/// The flow of a packet with key `key` and role `role`: `key` (the packet goes the flow's
/// original way), then its reverse (a reply), each only if the role may match that way
/// ([`Role`]); expired entries are misses.
#[inline(always)]
pub fn lookup(key: &CtKey, role: Role, now: u64, timeouts: &[u64; ct_state::COUNT]) -> Option<Hit> {
    if role == Role::Untracked {
        return None;
    }
    if role != Role::Answers {
        if let Some(value) = VERSE_CT.get_ptr_mut(key) {
            // SAFETY: the kernel returned a pointer to a live value of this map's value type.
            if !expired(unsafe { &(*value).entry }, now, timeouts) {
                return Some(Hit { value, reply: false });
            }
        }
    }
    if role == Role::Opens {
        return None;
    }
    let reverse = flow::reversed(key);
    if let Some(value) = VERSE_CT.get_ptr_mut(&reverse) {
        // SAFETY: as above.
        if !expired(unsafe { &(*value).entry }, now, timeouts) {
            return Some(Hit { value, reply: true });
        }
    }
    None
}

/// Whether the flow `key` is tracked, either way (the flow an ICMP error quotes).
#[inline(always)]
pub fn tracked(key: &CtKey, now: u64, timeouts: &[u64; ct_state::COUNT]) -> bool {
    lookup(key, Role::Any, now, timeouts).is_some()
}

/// Refreshes the flow of a packet that is being delivered: last seen, state.
#[inline(always)]
pub fn refresh(hit: Hit, now: u64, tcp_flags: u8) {
    // SAFETY: the pointer came from a lookup in this program run, and map values stay valid for
    // the whole run (RCU); the worst a concurrent update can do is interleave two refreshes of
    // the same flow.
    let entry = unsafe { &mut (*hit.value).entry };
    entry.state = next_state(entry.state, hit.reply, tcp_flags);
    entry.last_seen_ns = now;
}

/// [`refresh`], and caches `hop` for the packet's direction: the whole value is replaced (see
/// the module doc). `key` is the packet's own key. A refresh racing with this one on another CPU
/// may be lost, which costs at most one packet's worth of idle time or state change, as
/// interleaved refreshes already can. If the replacement fails (out of memory), the entry is
/// refreshed in place, uncached.
#[inline(always)]
pub fn refresh_and_cache(hit: Hit, key: &CtKey, now: u64, tcp_flags: u8, hop: CtHop) {
    // SAFETY: as in `refresh`; the value is copied out.
    let mut value = unsafe { *hit.value };
    value.entry.state = next_state(value.entry.state, hit.reply, tcp_flags);
    value.entry.last_seen_ns = now;
    let stored = if hit.reply {
        value.reply = hop;
        flow::reversed(key)
    } else {
        value.original = hop;
        *key
    };
    if VERSE_CT.insert(&stored, &value, 0).is_err() {
        refresh(hit, now, tcp_flags);
    }
}

/// Records a new flow allowed by policy, with `original` as the cached delivery of its first
/// direction (an empty hop for none). A failed insert (out of memory) is not a hole: the flow's
/// replies are then judged by policy.
#[inline(always)]
pub fn create(key: &CtKey, now: u64, state: u8, original: CtHop) {
    let value = CtValue {
        entry: CtEntry { last_seen_ns: now, state, _pad: [0; 7] },
        original,
        reply: CtHop::default(),
    };
    let _ = VERSE_CT.insert(key, &value, 0);
}
