//! IPv6 as the dataplane parses it (RFC 8200): the fixed header, then a bounded walk of the
//! extension headers to the upper-layer header. [`walk`] is the one definition: the kernel
//! programs (`dataplane-ebpf/src/flow.rs`) and the reference model (`controller`'s
//! `verdict/parse.rs`) both call it, each with its own way of reading two bytes of the packet.
//!
//! Contract, first failing check wins (offsets from the start of the IPv6 header):
//! 1. Fewer than 40 bytes, or version != 6: `MalformedIpv6`.
//! 2. The payload length runs past the frame: `MalformedIpv6` (trailing Ethernet padding after
//!    the payload is allowed, as after an IPv4 datagram).
//! 3. A jumbogram (RFC 2675: payload length 0, a hop-by-hop header whose first option is Jumbo
//!    Payload, as the RFC's alignment rule and Linux's BIG TCP place it): `Ipv6Jumbogram`. A
//!    frame cannot carry one on Ethernet; the only source is a sender with a GSO size above
//!    64 KiB, and its real length would have to be trusted from the option.
//! 4. At most [`EXT_MAX`] extension headers are walked: hop-by-hop (only right after the fixed
//!    header, else `MalformedIpv6`), routing and destination options (length in 8-octet units,
//!    not counting the first) and AH (RFC 4302: 4-octet units, not counting the first two).
//!    Each must lie within the payload length, or `MalformedIpv6`. A fragment header, wherever
//!    it is, first fragment and atomic fragment included: `Ipv6Fragment` (the upper-layer
//!    header may be in another fragment, and the dataplane never reassembles). One more
//!    extension header after [`EXT_MAX`]: `Ipv6TooManyHeaders`.
//! 5. Any other next header is the upper layer ([`Upper`]): TCP, UDP and ICMPv6 are parsed by
//!    the caller within the payload; ESP, "no next header" (59) and anything else are
//!    protocols like any other (judged by their number, never looked into).
use crate::DropReason;

/// Length of the fixed IPv6 header.
pub const HLEN: usize = 40;

/// Next-header values of the extension headers the walk knows (RFC 8200 section 4, RFC 4302).
pub const NEXTHDR_HOP: u8 = 0;
pub const NEXTHDR_ROUTING: u8 = 43;
pub const NEXTHDR_FRAGMENT: u8 = 44;
pub const NEXTHDR_AUTH: u8 = 51;
pub const NEXTHDR_NONE: u8 = 59;
pub const NEXTHDR_DEST: u8 = 60;

/// Option type of the Jumbo Payload option in a hop-by-hop header (RFC 2675 section 2).
pub const OPT_JUMBO: u8 = 0xC2;

/// The most extension headers walked. RFC 8200 section 4.1 lets each extension header occur at
/// most once (destination options twice) in a fixed order: hop-by-hop, destination options,
/// routing, fragment, AH, ESP, destination options. Without the fragment header (dropped) and
/// ESP (an upper layer here), the longest chain is 5; a longer one breaks the RFC's order. The
/// bound is also what the verifier needs: the walk is a loop of at most this many steps.
pub const EXT_MAX: usize = 5;

/// Where the upper-layer header is: its protocol, its offset and the end of the payload, both
/// from the start of the IPv6 header. `off <= end`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Upper {
    pub proto: u8,
    pub off: usize,
    pub end: usize,
}

/// What a next-header value asks the walk to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// An extension header whose length byte counts 8-octet units beyond the first.
    Ext8,
    /// AH: its length byte counts 4-octet units beyond the first two.
    Ext4,
    /// Hop-by-hop options: an `Ext8` header, allowed only right after the fixed header.
    HopByHop,
    Fragment,
    /// The upper-layer protocol.
    Upper,
}

/// How the walk treats next header `nh`.
#[inline(always)]
pub const fn next_kind(nh: u8) -> Next {
    match nh {
        NEXTHDR_HOP => Next::HopByHop,
        NEXTHDR_ROUTING | NEXTHDR_DEST => Next::Ext8,
        NEXTHDR_AUTH => Next::Ext4,
        NEXTHDR_FRAGMENT => Next::Fragment,
        _ => Next::Upper,
    }
}

/// What a reader of [`walk`] returns for two bytes that are not in the frame: above any value
/// of two bytes. (Not an `Option`: for `None` LLVM may leave the payload register undefined and
/// still compute on it, which the verifier refuses when that register holds a pointer.)
pub const MISSING: u32 = 1 << 16;

/// Walks the packet whose fixed header has first byte `version_tc`, payload length
/// `payload_len` and next header `next`, of which `avail` bytes are in the frame (from the
/// start of the IPv6 header to the end of the frame). `read(at)` gives the two bytes at offset
/// `at` from the start of the IPv6 header as a big-endian number, [`MISSING`] if they are not
/// in the frame. See the module contract.
#[inline(always)]
pub fn walk<R: FnMut(usize) -> u32>(
    version_tc: u8,
    payload_len: u16,
    next: u8,
    avail: usize,
    mut read: R,
) -> Result<Upper, DropReason> {
    if avail < HLEN || version_tc >> 4 != 6 {
        return Err(DropReason::MalformedIpv6);
    }
    let end = HLEN + payload_len as usize;
    if end > avail {
        return Err(DropReason::MalformedIpv6);
    }
    if payload_len == 0 && next == NEXTHDR_HOP {
        let option = read(HLEN + 2);
        if option != MISSING && (option >> 8) as u8 == OPT_JUMBO {
            return Err(DropReason::Ipv6Jumbogram);
        }
    }
    let mut nh = next;
    let mut off = HLEN;
    let mut i = 0;
    while i < EXT_MAX {
        let per_unit = match next_kind(nh) {
            Next::HopByHop if i == 0 => 8,
            Next::HopByHop => return Err(DropReason::MalformedIpv6),
            Next::Ext8 => 8,
            Next::Ext4 => 4,
            Next::Fragment => return Err(DropReason::Ipv6Fragment),
            Next::Upper => return Ok(Upper { proto: nh, off, end }),
        };
        // Every extension header is at least 8 bytes.
        if off + 8 > end {
            return Err(DropReason::MalformedIpv6);
        }
        let head = read(off);
        if head == MISSING {
            return Err(DropReason::MalformedIpv6);
        }
        let (following, units) = ((head >> 8) as u8, head as u8);
        let len = if per_unit == 8 { (units as usize + 1) * 8 } else { (units as usize + 2) * 4 };
        if off + len > end {
            return Err(DropReason::MalformedIpv6);
        }
        nh = following;
        off += len;
        i += 1;
    }
    match next_kind(nh) {
        Next::HopByHop => Err(DropReason::MalformedIpv6),
        Next::Ext8 | Next::Ext4 => Err(DropReason::Ipv6TooManyHeaders),
        Next::Fragment => Err(DropReason::Ipv6Fragment),
        Next::Upper => Ok(Upper { proto: nh, off, end }),
    }
}

/// Conntrack ports of an ICMPv6 message of type `ty`, as [`crate::icmp_ct_ports`] for ICMP:
/// echo request `(id, 0)`, echo reply `(0, id)`, anything else `(0, 0)`.
#[inline(always)]
pub const fn icmpv6_ct_ports(ty: u8, id: u16) -> (u16, u16) {
    match ty {
        super::ICMPV6_ECHO_REQUEST => (id, 0),
        super::ICMPV6_ECHO_REPLY => (0, id),
        _ => (0, 0),
    }
}

/// Conntrack ports of an IPv6 packet's upper-layer header, as [`crate::ct_ports`] for IPv4:
/// TCP and UDP their ports, ICMPv6 as [`icmpv6_ct_ports`], any other protocol (ICMP among
/// them) `(0, 0)`.
#[inline(always)]
pub const fn ct6_ports(proto: u8, head: [u8; 4], icmp_id: u16) -> (u16, u16) {
    match proto {
        super::IPPROTO_TCP | super::IPPROTO_UDP => {
            (u16::from_be_bytes([head[0], head[1]]), u16::from_be_bytes([head[2], head[3]]))
        }
        super::IPPROTO_ICMPV6 => icmpv6_ct_ports(head[0], icmp_id),
        _ => (0, 0),
    }
}

// The walk is tested through the reference model, with the frames every test builds
// (`controller/src/verdict/tests.rs`, `verse::frames`).
