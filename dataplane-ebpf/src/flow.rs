//! An IPv4 packet as conntrack and policy see it, parsed fail-closed, wherever it sits in the
//! frame: right after the Ethernet header (`from_endpoint`), or after the outer headers of the
//! encapsulation (`from_underlay`). Both hooks parse with the same functions, so a packet is
//! judged the same whichever way it came.
//!
//! Contract: [`ipv4_header`] checks the fixed header (20 bytes, version 4, IHL >= 5,
//! `IHL*4 <= total length`, `offset + total length <= frame length`; trailing Ethernet padding
//! is allowed) and makes the whole header with options linear (`MalformedIpv4`); [`l4`] checks
//! the L4 header within the total length, not the padding: TCP 20 bytes and its whole data
//! offset (>= 5 words), UDP 8, ICMP 8 (`MalformedL4`); other protocols are not parsed.
//!
//! IPv6 ([`ipv6_header`], [`l4_ipv6`]) is parsed by the walk both sides share
//! (`dataplane_common::wire::ipv6::walk`), its L4 header as IPv4's (ICMPv6 like ICMP);
//! `from_endpoint6` and `from_underlay6` judge it (`endpoint6`, `underlay6`).
use aya_ebpf::programs::TcContext;
use dataplane_common::conntrack::{role, role6, Role};
use dataplane_common::{ct_ports, icmp_ct_ports, wire::ipv6, Ct6Key, CtKey, DropReason};

use crate::parse::*;

/// The fixed IPv4 header fields the walks use.
pub struct Ipv4 {
    pub src: [u8; 4],
    pub dst: [u8; 4],
    pub proto: u8,
    pub frag_off: u16,
    /// Header length with options, bytes.
    pub ihl: usize,
    /// Offset of the L4 header in the frame.
    pub l4_off: usize,
    /// Offset of the end of the IPv4 datagram in the frame (Ethernet padding may follow).
    pub ip_end: usize,
}

/// Parses the IPv4 header at `off` (see the module contract).
#[inline(always)]
pub fn ipv4_header(ctx: &TcContext, off: usize) -> Result<Ipv4, DropReason> {
    const IP_MIN: usize = core::mem::size_of::<Ipv4Hdr>();
    let ip: *const Ipv4Hdr = header(ctx, off).ok_or(DropReason::MalformedIpv4)?;
    // SAFETY: ptr_at proved the fixed IPv4 header is inside the linear data.
    let (version_ihl, tot_len, frag_off, proto, src, dst) = unsafe {
        let h = &*ip;
        (h.version_ihl, be16(h.tot_len) as usize, be16(h.frag_off), h.proto, h.src, h.dst)
    };
    let ihl = ((version_ihl & 0x0F) as usize) * 4;
    if version_ihl >> 4 != 4 || ihl < IP_MIN || tot_len < ihl || off + tot_len > ctx.len() as usize
    {
        return Err(DropReason::MalformedIpv4);
    }
    // Options: the fixed header is linear already.
    if ihl > IP_MIN && !ensure(ctx, off + ihl) {
        return Err(DropReason::MalformedIpv4);
    }
    Ok(Ipv4 { src, dst, proto, frag_off, ihl, l4_off: off + ihl, ip_end: off + tot_len })
}

/// Where an IPv6 packet's upper-layer header is, past its extension headers.
pub struct Ipv6 {
    /// The upper-layer protocol: the next header that ended the walk.
    pub proto: u8,
    /// Offset of the upper-layer header in the frame.
    pub l4_off: usize,
    /// Offset of the end of the payload in the frame (Ethernet padding may follow).
    pub ip_end: usize,
}

/// Parses the IPv6 header at `off` and walks its extension headers
/// (`dataplane_common::wire::ipv6::walk`).
#[inline(always)]
pub fn ipv6_header(ctx: &TcContext, off: usize) -> Result<Ipv6, DropReason> {
    if !ensure(ctx, off + ipv6::HLEN) {
        return Err(DropReason::MalformedIpv6);
    }
    let ip: *const Ipv6Hdr = ptr_at(ctx, off).ok_or(DropReason::MalformedIpv6)?;
    // SAFETY: ptr_at proved the fixed IPv6 header is inside the linear data.
    let (version_tc, payload_len, next) =
        unsafe { ((*ip).vtc_flow[0], be16((*ip).payload_len), (*ip).next) };
    // The walk's reads pull what they need; `ip` is not used after them.
    let read = |at: usize| -> u32 {
        if !ensure(ctx, off + at + 2) {
            return ipv6::MISSING;
        }
        match ptr_at::<[u8; 2]>(ctx, off + at) {
            // SAFETY: ptr_at proved the two bytes are inside the linear data.
            Some(b) => u32::from(be16(unsafe { *b })),
            None => ipv6::MISSING,
        }
    };
    let avail = ctx.len() as usize - off;
    let upper = ipv6::walk(version_tc, payload_len, next, avail, read)?;
    Ok(Ipv6 { proto: upper.proto, l4_off: off + upper.off, ip_end: off + upper.end })
}

/// The L4 header of an IPv6 packet: TCP and UDP as [`l4`] parses them, ICMPv6 as it parses
/// ICMP; ICMP (1) is no protocol of IPv6 and, like any other, not parsed.
#[inline(always)]
pub fn l4_ipv6(ctx: &TcContext, ip: &Ipv6) -> Result<L4, DropReason> {
    match ip.proto {
        IPPROTO_TCP | IPPROTO_UDP => l4(ctx, ip.proto, ip.l4_off, ip.ip_end),
        IPPROTO_ICMPV6 => {
            let end = ip.l4_off + core::mem::size_of::<IcmpHdr>();
            if end > ip.ip_end || !ensure(ctx, end) {
                return Err(DropReason::MalformedL4);
            }
            let icmp: *const IcmpHdr = ptr_at(ctx, ip.l4_off).ok_or(DropReason::MalformedL4)?;
            // SAFETY: ptr_at proved the ICMPv6 header is inside the linear data.
            let (ty, code, id) = unsafe { ((*icmp).ty, (*icmp).code, be16((*icmp).id)) };
            let (sport, dport) = ipv6::icmpv6_ct_ports(ty, id);
            Ok(L4 {
                sport,
                dport,
                policy_port: (ty as u16) << 8 | code as u16,
                tcp_flags: 0,
                icmp_type: ty,
                hdr_len: 8,
                role: role6(IPPROTO_ICMPV6, 0, ty),
            })
        }
        other => Ok(L4 { role: role6(other, 0, 0xFF), ..L4::UNPARSED }),
    }
}

/// What conntrack and policy need to know about the L4 header.
pub struct L4 {
    /// Conntrack ports (see `CtKey` for ICMP echo).
    pub sport: u16,
    pub dport: u16,
    /// The port of policy keys: destination port, or `type << 8 | code` for ICMP.
    pub policy_port: u16,
    pub tcp_flags: u8,
    /// ICMP (or ICMPv6) type, or 0xFF for anything that is not ICMP.
    pub icmp_type: u8,
    /// Length of the L4 header (TCP with options), 0 for protocols that are not parsed: with
    /// the IPv4 header length and the GSO size it gives the size of one segment on the wire.
    pub hdr_len: u16,
    /// The packet's conntrack role (`role`, `role6` for IPv6), computed where its protocol is a
    /// constant: the established path then carries one byte instead of working it out again
    /// from the protocol, flags and type after the parse.
    pub role: Role,
}

impl L4 {
    /// A protocol that is not parsed (its role is set by the caller).
    const UNPARSED: L4 = L4 {
        sport: 0,
        dport: 0,
        policy_port: 0,
        tcp_flags: 0,
        icmp_type: 0xFF,
        hdr_len: 0,
        role: Role::Any,
    };
}

#[inline(always)]
pub fn l4(ctx: &TcContext, proto: u8, l4_off: usize, ip_end: usize) -> Result<L4, DropReason> {
    match proto {
        IPPROTO_TCP => {
            if l4_off + core::mem::size_of::<TcpHdr>() > ip_end {
                return Err(DropReason::MalformedL4);
            }
            let tcp: *const TcpHdr = header(ctx, l4_off).ok_or(DropReason::MalformedL4)?;
            // SAFETY: ptr_at proved the TCP header is inside the linear data.
            let (sport, dport, doff_res, flags) = unsafe {
                let h = &*tcp;
                (be16(h.sport), be16(h.dport), h.doff_res, h.flags)
            };
            let doff = ((doff_res >> 4) as usize) * 4;
            if doff < core::mem::size_of::<TcpHdr>() || l4_off + doff > ip_end {
                return Err(DropReason::MalformedL4);
            }
            Ok(L4 {
                sport,
                dport,
                policy_port: dport,
                tcp_flags: flags,
                icmp_type: 0xFF,
                hdr_len: doff as u16,
                role: role(IPPROTO_TCP, flags, 0xFF),
            })
        }
        IPPROTO_UDP => {
            if l4_off + core::mem::size_of::<UdpHdr>() > ip_end {
                return Err(DropReason::MalformedL4);
            }
            let udp: *const UdpHdr = header(ctx, l4_off).ok_or(DropReason::MalformedL4)?;
            // SAFETY: ptr_at proved the UDP header is inside the linear data.
            let (sport, dport) = unsafe { (be16((*udp).sport), be16((*udp).dport)) };
            Ok(L4 {
                sport,
                dport,
                policy_port: dport,
                tcp_flags: 0,
                icmp_type: 0xFF,
                hdr_len: 8,
                role: role(IPPROTO_UDP, 0, 0xFF),
            })
        }
        IPPROTO_ICMP => {
            if l4_off + core::mem::size_of::<IcmpHdr>() > ip_end {
                return Err(DropReason::MalformedL4);
            }
            let icmp: *const IcmpHdr = header(ctx, l4_off).ok_or(DropReason::MalformedL4)?;
            // SAFETY: ptr_at proved the ICMP header is inside the linear data.
            let (ty, code, id) = unsafe { ((*icmp).ty, (*icmp).code, be16((*icmp).id)) };
            let (sport, dport) = icmp_ct_ports(ty, id);
            Ok(L4 {
                sport,
                dport,
                policy_port: (ty as u16) << 8 | code as u16,
                tcp_flags: 0,
                icmp_type: ty,
                hdr_len: 8,
                role: role(IPPROTO_ICMP, 0, ty),
            })
        }
        other => Ok(L4 { role: role(other, 0, 0xFF), ..L4::UNPARSED }),
    }
}

/// The flow quoted by an ICMP error whose quoted IPv4 header starts at `off`: its header and
/// the first 8 bytes of its payload (RFC 792) must be present. None if it cannot be read, in
/// which case the error is judged by policy like any ICMP message.
#[inline(always)]
pub fn quoted_flow(ctx: &TcContext, vni: u32, off: usize, ip_end: usize) -> Option<CtKey> {
    const IP_MIN: usize = core::mem::size_of::<Ipv4Hdr>();
    if off + IP_MIN > ip_end || !ensure(ctx, off + IP_MIN) {
        return None;
    }
    let ip: *const Ipv4Hdr = ptr_at(ctx, off)?;
    // SAFETY: ptr_at proved the quoted fixed header is inside the linear data.
    let (version_ihl, proto, src, dst) =
        unsafe { ((*ip).version_ihl, (*ip).proto, (*ip).src, (*ip).dst) };
    let ihl = ((version_ihl & 0x0F) as usize) * 4;
    if version_ihl >> 4 != 4 || ihl < IP_MIN {
        return None;
    }
    let l4_off = off + ihl;
    if l4_off + 8 > ip_end || !ensure(ctx, l4_off + 8) {
        return None;
    }
    let l4: *const IcmpHdr = ptr_at(ctx, l4_off)?;
    // SAFETY: ptr_at proved the quoted 8 bytes are inside the linear data. `IcmpHdr` is just a
    // view of 8 bytes here; for TCP and UDP its first four bytes are the ports.
    let (b0, b1, b2, b3, id) = unsafe {
        let h = &*l4;
        (h.ty, h.code, h.check[0], h.check[1], be16(h.id))
    };
    let (sport, dport) = ct_ports(proto, [b0, b1, b2, b3], id);
    // `opaque`: as in `ct_key`.
    Some(CtKey::new(vni, src, dst, sport, dport, opaque(proto)))
}

/// The flow quoted by an ICMPv6 error whose quoted IPv6 header starts at `off`: a fixed header
/// (version 6) whose next header is the upper layer (no extension header) and the 8 bytes after
/// it, within the error's payload, written into `out`. False otherwise: the error is then
/// judged by policy.
#[inline(always)]
pub fn quoted_flow6(
    ctx: &TcContext,
    vni: u32,
    off: usize,
    ip_end: usize,
    out: &mut Ct6Key,
) -> bool {
    let l4_off = off + ipv6::HLEN;
    if l4_off + 8 > ip_end || !ensure(ctx, l4_off + 8) {
        return false;
    }
    let Some(ip) = ptr_at::<Ipv6Hdr>(ctx, off) else {
        return false;
    };
    // SAFETY: ptr_at proved the quoted fixed header is inside the linear data.
    let (version, proto, src, dst) =
        unsafe { ((*ip).vtc_flow[0], (*ip).next, (*ip).src, (*ip).dst) };
    if version >> 4 != 6 || ipv6::next_kind(proto) != ipv6::Next::Upper {
        return false;
    }
    let Some(l4) = ptr_at::<IcmpHdr>(ctx, l4_off) else {
        return false;
    };
    // SAFETY: ptr_at proved the quoted 8 bytes are inside the linear data.
    let (b0, b1, b2, b3, id) = unsafe {
        let h = &*l4;
        (h.ty, h.code, h.check[0], h.check[1], be16(h.id))
    };
    let (sport, dport) = ipv6::ct6_ports(proto, [b0, b1, b2, b3], id);
    *out = Ct6Key::new(vni, src, dst, sport, dport, proto);
    true
}

/// The conntrack key of a packet in `vni`. The protocol goes in through [`opaque`]: where LLVM
/// knows it (the ICMP branch of the parse, whose ports are constants too), it merged the ports
/// and the protocol into one 8-byte stack store, which the verifier refuses where it is
/// misaligned (the BPF target may emit misaligned stores, see `controller/build.rs`); the key
/// is 8-byte aligned now, but what LLVM merges is not ours to promise.
#[inline(always)]
pub fn ct_key(vni: u32, ip: &Ipv4, l4: &L4) -> CtKey {
    CtKey::new(vni, ip.src, ip.dst, l4.sport, l4.dport, opaque(ip.proto))
}
