//! The pure decisions of connection tracking (S6, S7, S9), written once for the kernel programs
//! (`dataplane-ebpf/src/conntrack.rs`, `related.rs`) and the reference model
//! (`controller/src/verdict/conntrack.rs`, whose module doc says what they mean): a packet's
//! [`Role`], whether it creates a flow, a flow's first and next state, expiry, and which ICMP
//! messages are errors. No allocation, no maps: each is a function of its arguments, and
//! `#[inline(always)]`, so the verifier sees straight-line code in the kernel programs.
use crate::ct_state;
use crate::wire::{
    ICMPV6_DEST_UNREACH, ICMPV6_ECHO_REPLY, ICMPV6_ECHO_REQUEST, ICMPV6_PACKET_TOO_BIG,
    ICMPV6_PARAMETER_PROBLEM, ICMPV6_TIME_EXCEEDED, ICMP_DEST_UNREACH, ICMP_ECHO_REPLY,
    ICMP_ECHO_REQUEST, ICMP_PARAMETER_PROBLEM, ICMP_TIME_EXCEEDED, IPPROTO_ICMP, IPPROTO_ICMPV6,
    IPPROTO_TCP, IPPROTO_UDP, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN,
};

/// What a packet may do in connection tracking (S7), from its header alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Begins a flow in its own direction, and matches a flow only in its original direction:
    /// a TCP SYN without ACK, RST or FIN; an ICMP echo request. (A SYN in the reply direction of
    /// a flow is judged as the new packet it is, and never reopens that flow.)
    Opens,
    /// Matches a flow either way and begins one when none matches: UDP and other protocols,
    /// whose headers do not tell a first packet from a reply.
    Any,
    /// Matches a flow either way, never begins one: every other TCP segment (ACK, FIN, RST, ...).
    Continues,
    /// Matches a flow only in its reply direction, never begins one: an ICMP echo reply.
    Answers,
    /// Never tracked: every other ICMP message (an error is related to a flow, or judged).
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

/// True if a packet of this role, admitted with no flow matching it, begins a flow.
#[inline(always)]
pub fn creates(role: Role) -> bool {
    matches!(role, Role::Opens | Role::Any)
}

/// The `ct_state` of a new flow of protocol `proto` after its first packet (one that
/// [`creates`] it: for TCP a SYN, so the flow is opening).
#[inline(always)]
pub fn initial_state(proto: u8) -> u8 {
    match proto {
        IPPROTO_TCP => ct_state::TCP_OPENING,
        IPPROTO_UDP => ct_state::UDP_ONE_WAY,
        IPPROTO_ICMP => ct_state::ICMP,
        _ => ct_state::OTHER,
    }
}

/// The `ct_state` of a flow in `state` after a packet that matched it, in the flow's reply
/// direction if `reply`, with these TCP flags. TCP: FIN or RST -> closing; a SYN without ACK on
/// a closing flow reopens it (the 5-tuple reused, as Linux conntrack does from
/// CLOSE/TIME_WAIT; only in the original direction, the only one a SYN matches, [`Role::Opens`]);
/// a SYN-ACK in the reply direction establishes an opening connection (any other packet leaves
/// it opening). UDP: one-way until a reply is seen. ICMP echo and other protocols keep their one
/// state.
#[inline(always)]
pub fn next_state(state: u8, reply: bool, tcp_flags: u8) -> u8 {
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

/// True if a flow in `state`, last seen at `last_seen_ns`, has been idle at `now_ns` for at
/// least its state's timeout in `timeouts_ns` (S9). A state without a timeout is expired (fail
/// closed: an entry nobody understands admits nothing). At least, not more: the kernel's clock
/// advances by ticks, and a timeout of 0 must expire an entry made within the same tick.
/// Saturating: an entry refreshed on another CPU after `now_ns` was read is fresh, not 2^64 ns
/// old.
#[inline(always)]
pub fn expired(
    state: u8,
    last_seen_ns: u64,
    now_ns: u64,
    timeouts_ns: &[u64; ct_state::COUNT],
) -> bool {
    match timeouts_ns.get(state as usize) {
        // `now_ns.saturating_sub(last_seen_ns) >= *timeout`, written without the select that the
        // BPF target (no conditional move) lowers to branches and register copies.
        Some(&timeout) => {
            timeout == 0 || (now_ns >= last_seen_ns && now_ns - last_seen_ns >= timeout)
        }
        None => true,
    }
}

/// True for the ICMP types and codes that are errors (RFC 792, RFC 1812 5.2.7.1): destination
/// unreachable codes 0-15, time exceeded 0-1, parameter problem 0-2. Any other ICMP message is
/// never related to a flow (S6).
#[inline(always)]
pub fn is_error(proto: u8, icmp_type: u8, code: u8) -> bool {
    proto == IPPROTO_ICMP
        && match icmp_type {
            ICMP_DEST_UNREACH => code <= 15,
            ICMP_TIME_EXCEEDED => code <= 1,
            ICMP_PARAMETER_PROBLEM => code <= 2,
            _ => false,
        }
}

/// [`role`] for an IPv6 packet: the same, with ICMPv6 where IPv4 has ICMP (echo request opens,
/// echo reply answers, any other ICMPv6 message is never tracked); ICMP (1) is no protocol of
/// IPv6 and, like any other, `Any`.
#[inline(always)]
pub fn role6(proto: u8, tcp_flags: u8, icmp_type: u8) -> Role {
    match proto {
        IPPROTO_ICMPV6 if icmp_type == ICMPV6_ECHO_REQUEST => Role::Opens,
        IPPROTO_ICMPV6 if icmp_type == ICMPV6_ECHO_REPLY => Role::Answers,
        IPPROTO_ICMPV6 => Role::Untracked,
        IPPROTO_ICMP => Role::Any,
        _ => role(proto, tcp_flags, icmp_type),
    }
}

/// [`initial_state`] for an IPv6 flow: ICMPv6 echo as ICMP echo.
#[inline(always)]
pub fn initial_state6(proto: u8) -> u8 {
    match proto {
        IPPROTO_ICMPV6 => ct_state::ICMP,
        IPPROTO_ICMP => ct_state::OTHER,
        _ => initial_state(proto),
    }
}

/// [`is_error`] for ICMPv6 (RFC 4443 section 3): destination unreachable codes 0-6, packet
/// too big 0, time exceeded 0-1, parameter problem 0-2. Any other ICMPv6 message is never
/// related to a flow.
#[inline(always)]
pub fn is_error6(proto: u8, icmp_type: u8, code: u8) -> bool {
    proto == IPPROTO_ICMPV6
        && match icmp_type {
            ICMPV6_DEST_UNREACH => code <= 6,
            ICMPV6_PACKET_TOO_BIG => code == 0,
            ICMPV6_TIME_EXCEEDED => code <= 1,
            ICMPV6_PARAMETER_PROBLEM => code <= 2,
            _ => false,
        }
}
