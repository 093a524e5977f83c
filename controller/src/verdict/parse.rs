//! The headers the walks read, parsed fail-closed as the kernel parses them
//! (`dataplane-ebpf/src/flow.rs`): the IPv4 header, the IPv6 header and its extension headers
//! (the walk of `dataplane_common::wire::ipv6`, which both sides call), the L4 header within the
//! datagram, and the flow an ICMP error quotes.

use super::*;
use dataplane_common::wire::{ipv6, IPPROTO_ICMPV6};

pub(super) fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// The parts of a valid IPv4 header the walk needs.
pub(super) struct Ipv4 {
    pub(super) src: Ipv4Addr,
    pub(super) dst: Ipv4Addr,
    pub(super) proto: u8,
    pub(super) fragment: bool,
    /// Offset of the L4 header in the frame.
    pub(super) l4_off: usize,
    /// End of the datagram in the frame (Ethernet padding after it is ignored).
    pub(super) end: usize,
    /// The datagram's total length.
    pub(super) total: usize,
}

/// The IPv4 header at `off` (after the Ethernet header, or after the encapsulation); its
/// lengths are checked against the frame.
pub(super) fn parse_ipv4(frame: &[u8], off: usize) -> Result<Ipv4, DropReason> {
    let ip = &frame[off..];
    if ip.len() < 20 || ip[0] >> 4 != 4 {
        return Err(DropReason::MalformedIpv4);
    }
    let hlen = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(be16(ip, 2));
    if hlen < 20 || hlen > ip.len() || total < hlen || total > ip.len() {
        return Err(DropReason::MalformedIpv4);
    }
    let frag = be16(ip, 6);
    Ok(Ipv4 {
        src: Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
        dst: Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
        proto: ip[9],
        fragment: frag & IP_MF_OFFSET_MASK != 0, // MF or a non-zero offset
        l4_off: off + hlen,
        end: off + total,
        total,
    })
}

/// The parts of the L4 header the walk needs.
#[derive(Clone)]
pub(super) struct L4 {
    /// Conntrack ports (S7): TCP/UDP ports; ICMP echo id as `(id, 0)` for a request and
    /// `(0, id)` for a reply; `(0, 0)` otherwise.
    pub(super) ct_ports: (u16, u16),
    /// TCP/UDP destination port, else 0.
    pub(super) dport: u16,
    pub(super) icmp_type_code: (u8, u8),
    pub(super) tcp_flags: u8,
    /// For an ICMP error carrying a parsable inner IPv4 header: the inner flow's key (vni 0).
    pub(super) icmp_error_inner: Option<CtKey>,
    /// For an ICMPv6 error quoting a parsable IPv6 header (`ipv6::parse_inner6`): its flow.
    pub(super) icmp_error_inner6: Option<dataplane_common::Ct6Key>,
}

/// Where an IPv6 packet's upper-layer header is, past its extension headers.
#[derive(Debug, PartialEq, Eq)]
pub(super) struct Ipv6 {
    /// The upper-layer protocol: the next header that ended the walk.
    pub(super) proto: u8,
    /// Offset of the upper-layer header in the frame.
    pub(super) l4_off: usize,
    /// End of the payload in the frame (Ethernet padding after it is ignored).
    pub(super) end: usize,
    /// Length of the IPv6 packet (fixed header, extension headers, payload), wherever its
    /// header starts in the frame (after the Ethernet header, or inside a wrapped frame).
    pub(super) len: usize,
    /// Source and destination addresses.
    pub(super) src: [u8; 16],
    pub(super) dst: [u8; 16],
}

/// The IPv6 header at `off` and its extension headers (`dataplane_common::wire::ipv6::walk`).
pub(super) fn parse_ipv6(frame: &[u8], off: usize) -> Result<Ipv6, DropReason> {
    let ip = &frame[off..];
    if ip.len() < ipv6::HLEN {
        return Err(DropReason::MalformedIpv6);
    }
    let read = |at: usize| match ip.get(at..at + 2) {
        Some(b) => u32::from(be16(b, 0)),
        None => ipv6::MISSING,
    };
    let upper = ipv6::walk(ip[0], be16(ip, 4), ip[6], ip.len(), read)?;
    let addr = |at: usize| -> [u8; 16] { ip[at..at + 16].try_into().expect("16 bytes") };
    Ok(Ipv6 {
        proto: upper.proto,
        l4_off: off + upper.off,
        end: off + upper.end,
        len: upper.end,
        src: addr(8),
        dst: addr(24),
    })
}

pub(super) fn parse_l4(frame: &[u8], ip: &Ipv4) -> Result<L4, DropReason> {
    l4_at(frame, ip.proto, false, ip.l4_off, ip.end)
}

/// The L4 header of an IPv6 packet: TCP and UDP as in IPv4, ICMPv6 (8 bytes, its type and
/// code, echo identifiers as conntrack ports); ICMP (1) is no protocol of IPv6, and like any
/// other is not looked into.
pub(super) fn parse_l4_v6(frame: &[u8], ip: &Ipv6) -> Result<L4, DropReason> {
    l4_at(frame, ip.proto, true, ip.l4_off, ip.end)
}

/// The L4 header of protocol `proto` from `l4_off` to the end of the datagram `end`.
fn l4_at(frame: &[u8], proto: u8, v6: bool, l4_off: usize, end: usize) -> Result<L4, DropReason> {
    let l4 = &frame[l4_off..end];
    let mut out = L4 {
        ct_ports: (0, 0),
        dport: 0,
        icmp_type_code: (0, 0),
        tcp_flags: 0,
        icmp_error_inner: None,
        icmp_error_inner6: None,
    };
    match proto {
        IPPROTO_TCP => {
            if l4.len() < 20 {
                return Err(DropReason::MalformedL4);
            }
            let doff = usize::from(l4[12] >> 4) * 4;
            if doff < 20 || doff > l4.len() {
                return Err(DropReason::MalformedL4);
            }
            out.ct_ports = (be16(l4, 0), be16(l4, 2));
            out.dport = be16(l4, 2);
            out.tcp_flags = l4[13];
        }
        IPPROTO_UDP => {
            if l4.len() < 8 {
                return Err(DropReason::MalformedL4);
            }
            out.ct_ports = (be16(l4, 0), be16(l4, 2));
            out.dport = be16(l4, 2);
        }
        IPPROTO_ICMPV6 if v6 => {
            if l4.len() < 8 {
                return Err(DropReason::MalformedL4);
            }
            out.icmp_type_code = (l4[0], l4[1]);
            out.ct_ports = ipv6::icmpv6_ct_ports(l4[0], be16(l4, 4));
            if (1..=4).contains(&l4[0]) {
                out.icmp_error_inner6 = super::ipv6::parse_inner6(&l4[8..]);
            }
        }
        IPPROTO_ICMP if !v6 => {
            if l4.len() < 8 {
                return Err(DropReason::MalformedL4);
            }
            out.icmp_type_code = (l4[0], l4[1]);
            out.ct_ports = icmp_ct_ports(l4[0], be16(l4, 4));
            if matches!(l4[0], ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROBLEM) {
                out.icmp_error_inner = parse_inner(&l4[8..]);
            }
        }
        _ => {}
    }
    Ok(out)
}

/// The flow of the IPv4 header quoted in an ICMP error (RFC 792: the header plus 64 bits). It
/// must have version 4, IHL >= 5 and the 8 bytes after its header, all within the error's
/// datagram (not in Ethernet padding); its own total length is not checked (errors quote a
/// prefix).
/// Anything else makes the error unrelated: it is then judged by the rules like any ICMP.
fn parse_inner(b: &[u8]) -> Option<CtKey> {
    if b.len() < 20 || b[0] >> 4 != 4 {
        return None;
    }
    let hlen = usize::from(b[0] & 0x0f) * 4;
    if hlen < 20 || hlen > b.len() {
        return None;
    }
    let proto = b[9];
    let l4 = &b[hlen..];
    if l4.len() < 8 {
        return None;
    }
    let (sport, dport) = ct_ports(proto, [l4[0], l4[1], l4[2], l4[3]], be16(l4, 4));
    let (src, dst) = ([b[12], b[13], b[14], b[15]], [b[16], b[17], b[18], b[19]]);
    Some(CtKey::new(0, src, dst, sport, dport, proto))
}
