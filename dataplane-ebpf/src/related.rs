//! ICMP errors related to a tracked flow (S6): admitted without a rule, so that path-MTU
//! discovery and "unreachable" work, but only what a router or the flow's peer would send.
//!
//! An ICMP message is related when, all of:
//! - it is an error: destination unreachable with code 0-15, time exceeded 0-1, parameter
//!   problem 0-2 (RFC 792, RFC 1812 5.2.7.1); any other type or code is ordinary ICMP;
//! - its IPv4 datagram is at most `ICMP_ERROR_MAX_LEN` (576) bytes, what a router sends
//!   (RFC 1812 4.3.2.3); a longer one is not an error a router made;
//! - it quotes an IPv4 header and the 8 bytes after it ([`flow::quoted_flow`]);
//! - it comes from the quoted packet's destination and goes to the quoted packet's source: the
//!   flow's peer answering about a packet it received (a third party's error about somebody
//!   else's flow is not related, whatever it quotes);
//! - the quoted flow is tracked, either way, between the very endpoints (by serial) that are
//!   the error's receiver and sender (S7: an endpoint made later with one of their addresses
//!   does not inherit the flow's errors either).
//!
//! A related error is delivered without policy and touches no flow; anything else is judged by
//! the sender's egress and the receiver's ingress rules like any ICMP, and never tracked. The
//! only gateway Verse speaks for is its own: the "fragmentation needed" that `icmp.rs` builds
//! goes straight back into the sender's namespace (a redirect to the host side's egress) and
//! never passes through this check.
use aya_ebpf::programs::TcContext;
use dataplane_common::conntrack::is_error;
use dataplane_common::{ct_state, ICMP_ERROR_MAX_LEN};

use crate::{
    conntrack,
    flow::{self, Ipv4, L4},
    parse::*,
};

/// True if the packet (`ip`, `l4`, in universe `vni`) is an ICMP error related to a tracked flow.
/// `(sender, receiver)` are the serials of the endpoints sending and receiving the error.
#[inline(always)]
pub fn error(
    ctx: &TcContext,
    vni: u32,
    ip: &Ipv4,
    l4: &L4,
    (sender, receiver): (u64, u64),
    now: u64,
    timeouts: &[u64; ct_state::COUNT],
) -> bool {
    // The code is the low byte of the policy port (`type << 8 | code`).
    if !is_error(ip.proto, l4.icmp_type, l4.policy_port as u8)
        || ip.ip_end - (ip.l4_off - ip.ihl) > ICMP_ERROR_MAX_LEN
    {
        return false;
    }
    let Some(quoted) = flow::quoted_flow(ctx, vni, ip.l4_off + 8, ip.ip_end) else {
        return false;
    };
    ip_eq(&quoted.src, &ip.dst)
        && ip_eq(&quoted.dst, &ip.src)
        // The quoted packet went from the error's receiver to its sender.
        && conntrack::tracked(&quoted, receiver, sender, now, timeouts)
}
