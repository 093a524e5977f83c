//! "Fragmentation needed" for packets too big to wrap (path MTU discovery, RFC 1191), and its
//! IPv6 counterpart, "packet too big" ([`packet_too_big`], RFC 8201): the
//! packet is turned in place into an ICMP destination unreachable, code 4, with the next-hop MTU
//! of the path through the underlay (its MTU minus the encapsulation overhead), and sent back
//! out of the sender's own veth to the workload.
//!
//! The error comes from the packet's destination address (the hop is invisible to workloads,
//! and the workload's route back to that address is its default route, so reverse-path filters
//! accept it). It quotes the first [`QUOTE`] bytes of the packet: the IPv4 header with any
//! options and at least 8 bytes of payload, which is all RFC 792 asks for.
use aya_ebpf::{
    bindings::{bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, TC_ACT_REDIRECT},
    helpers::{bpf_csum_diff, bpf_redirect, bpf_skb_change_tail},
    programs::TcContext,
};
use dataplane_common::{
    wire::ICMPV6_PACKET_TOO_BIG, DropReason, Endpoint, Hook, ENCAP_OVERHEAD, PTB_HOP_LIMIT,
    PTB_QUOTE,
};

use crate::{drop, events, flow::Ipv4, parse::*};

/// Bytes of the refused packet quoted in the error: a multiple of 4 (for `bpf_csum_diff`) that
/// holds the longest IPv4 header (60) and 8 bytes of payload with room to spare.
pub const QUOTE: usize = 128;

/// ICMP destination unreachable, code "fragmentation needed and DF set" (RFC 792).
const ICMP_FRAG_NEEDED: u8 = 4;
/// IPTOS_PREC_INTERNETCONTROL, the TOS Linux gives its ICMP errors.
const TOS_INTERNETCONTROL: u8 = 0xC0;

const IP_LEN: usize = core::mem::size_of::<Ipv4Hdr>();
const ICMP_LEN: usize = core::mem::size_of::<IcmpHdr>();

/// Replaces the packet with the error and sends it back to `endpoint` through `ifindex`, the
/// host side of its veth. `underlay_mtu` is the MTU the wrapped packet exceeded. The packet is
/// reported (as it was) and counted `FragNeeded` once the error is on its way; when the error
/// cannot be built or sent it is dropped as `FragNeededUnsent`.
#[inline(always)]
pub fn frag_needed(
    ctx: &TcContext,
    endpoint: &Endpoint,
    ifindex: u32,
    gateway_mac: [u8; 6],
    ip: &Ipv4,
    underlay_mtu: u32,
) -> Result<i32, DropReason> {
    if ip.ip_end < ETH_HLEN + QUOTE {
        // Only an underlay MTU below QUOTE + the overhead gets here.
        return Err(DropReason::FragNeededUnsent);
    }
    // Reported before the packet becomes the error (whose send may still fail: then the drop
    // is reported again, as `FragNeededUnsent`).
    events::dropped::<false>(ctx, Hook::FromEndpoint, DropReason::FragNeeded);
    // Truncate to the quote first: it also ends GSO for a super-packet, which lets the room
    // for the new headers be made without touching segmentation state.
    // SAFETY: `skb` is this program's context.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, (ETH_HLEN + QUOTE) as u32, 0) } != 0 {
        return Err(DropReason::FragNeededUnsent);
    }
    ctx.adjust_room((IP_LEN + ICMP_LEN) as i32, BPF_ADJ_ROOM_MAC, 0)
        .map_err(|_| DropReason::FragNeededUnsent)?;
    const END: usize = ETH_HLEN + IP_LEN + ICMP_LEN + QUOTE;
    if !ensure(ctx, END) {
        return Err(DropReason::FragNeededUnsent);
    }
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(DropReason::FragNeededUnsent)?;
    let iph: *mut Ipv4Hdr = ptr_at(ctx, ETH_HLEN).ok_or(DropReason::FragNeededUnsent)?;
    let icmp: *mut [u8; ICMP_LEN + QUOTE] =
        ptr_at(ctx, ETH_HLEN + IP_LEN).ok_or(DropReason::FragNeededUnsent)?;

    let next_hop_mtu = underlay_mtu.saturating_sub(ENCAP_OVERHEAD).min(0xFFFF) as u16;
    let mtu = next_hop_mtu.to_be_bytes();
    // SAFETY: ptr_at proved the ICMP header and the quote lie within the linear data, which the
    // TC prologue made writable.
    unsafe {
        let m = &mut *icmp;
        // type, code, checksum (0 while summing), unused, next-hop MTU (RFC 1191 section 4).
        m[0] = ICMP_DEST_UNREACH;
        m[1] = ICMP_FRAG_NEEDED;
        m[2] = 0;
        m[3] = 0;
        m[4] = 0;
        m[5] = 0;
        m[6] = mtu[0];
        m[7] = mtu[1];
    }
    // SAFETY: `icmp` points at ICMP_LEN + QUOTE bytes of packet data (proved above), a size that
    // is a multiple of 4 as bpf_csum_diff requires; a null `from` of size 0 is allowed.
    let sum = unsafe {
        bpf_csum_diff(core::ptr::null_mut(), 0, icmp as *mut u32, (ICMP_LEN + QUOTE) as u32, 0)
    };
    if sum < 0 {
        return Err(DropReason::FragNeededUnsent);
    }
    // bpf_csum_diff sums 16-bit words as the CPU loads them (`csum_partial`), so the folded
    // result is stored in CPU order, not converted to network order.
    let check = csum_fold(sum as u64 & 0xFFFF_FFFF).to_ne_bytes();

    let mut reply = Ipv4Hdr {
        version_ihl: 0x45,
        tos: TOS_INTERNETCONTROL,
        tot_len: ((IP_LEN + ICMP_LEN + QUOTE) as u16).to_be_bytes(),
        id: [0; 2],
        frag_off: [0; 2],
        ttl: 64,
        proto: IPPROTO_ICMP,
        check: [0; 2],
        src: ip.dst,
        dst: endpoint.ip,
    };
    reply.check = ipv4_checksum(&reply).to_be_bytes();
    // SAFETY: as above, for the Ethernet and IPv4 headers.
    unsafe {
        let m = &mut *icmp;
        m[2] = check[0];
        m[3] = check[1];
        *iph = reply;
        (*eth).dst = endpoint.mac;
        (*eth).src = gateway_mac;
        (*eth).ethertype = ETHERTYPE_IPV4.to_be_bytes();
    }
    // SAFETY: bpf_redirect takes plain integers. Egress of the host side: into the workload.
    let rc = unsafe { bpf_redirect(ifindex, 0) };
    if rc != TC_ACT_REDIRECT as i64 {
        return Err(DropReason::FragNeededUnsent);
    }
    drop::count(ctx, Hook::FromEndpoint, DropReason::FragNeeded);
    Ok(TC_ACT_REDIRECT as i32)
}

/// The "packet too big" to send, as [`packet_too_big`] needs it (one argument: a BPF-to-BPF
/// call takes at most five).
#[repr(C)]
pub struct TooBig {
    /// The host side of the sender's veth, the gateway's MAC, the underlay MTU.
    pub ifindex: u32,
    pub gateway_mac: [u8; 6],
    pub underlay_mtu: u32,
    /// Offset of the end of the refused IPv6 packet in the frame.
    pub ip_end: usize,
}

const IP6_LEN: usize = core::mem::size_of::<Ipv6Hdr>();

/// [`frag_needed`] for IPv6: replaces the packet with an ICMPv6 "packet too big" (RFC 4443
/// section 3.2) from the endpoint's gateway (`Endpoint::gateway6`, its router) to `endpoint`
/// (the reference model's
/// `packet_too_big_frame`): hop limit `PTB_HOP_LIMIT`, MTU = underlay MTU - the overhead,
/// quoting the first `PTB_QUOTE` bytes of the packet, and sends it back out of the sender's
/// veth. The packet is reported and counted `FragNeeded` once the error is on its way. A call
/// of its own, for its stack; its result is the TC action, or -1 when the error cannot be
/// built or sent (the caller drops the packet as `FragNeededUnsent`).
#[inline(never)]
pub fn packet_too_big(ctx: &TcContext, endpoint: &Endpoint, t: &TooBig) -> i32 {
    if t.ip_end < ETH_HLEN + PTB_QUOTE {
        return -1;
    }
    events::dropped::<true>(ctx, Hook::FromEndpoint, DropReason::FragNeeded);
    // SAFETY: `skb` is this program's context. Truncating also ends GSO (see `frag_needed`).
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, (ETH_HLEN + PTB_QUOTE) as u32, 0) } != 0 {
        return -1;
    }
    if ctx.adjust_room((IP6_LEN + ICMP_LEN) as i32, BPF_ADJ_ROOM_MAC, 0).is_err() {
        return -1;
    }
    const END: usize = ETH_HLEN + IP6_LEN + ICMP_LEN + PTB_QUOTE;
    if !ensure(ctx, END) {
        return -1;
    }
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return -1;
    };
    let Some(iph) = ptr_at::<Ipv6Hdr>(ctx, ETH_HLEN) else {
        return -1;
    };
    let Some(icmp) = ptr_at::<[u8; ICMP_LEN + PTB_QUOTE]>(ctx, ETH_HLEN + IP6_LEN) else {
        return -1;
    };
    let mtu = t.underlay_mtu.saturating_sub(ENCAP_OVERHEAD).to_be_bytes();
    // SAFETY: ptr_at proved the ICMPv6 header and the quote lie within the linear data, which
    // the TC prologue made writable.
    unsafe {
        let m = &mut *icmp;
        // type, code, checksum (0 while summing), MTU (RFC 4443 section 3.2).
        m[0] = ICMPV6_PACKET_TOO_BIG;
        m[1] = 0;
        m[2] = 0;
        m[3] = 0;
        m[4] = mtu[0];
        m[5] = mtu[1];
        m[6] = mtu[2];
        m[7] = mtu[3];
    }
    // SAFETY: as in `frag_needed`: ICMP_LEN + PTB_QUOTE bytes of packet data, a multiple of 4.
    let sum = unsafe {
        bpf_csum_diff(core::ptr::null_mut(), 0, icmp as *mut u32, (ICMP_LEN + PTB_QUOTE) as u32, 0)
    };
    if sum < 0 {
        return -1;
    }
    // The pseudo-header (RFC 8200 section 8.1): addresses, upper-layer length, next header,
    // summed in 32-bit words as the CPU loads them, like bpf_csum_diff's sum.
    let len = ((ICMP_LEN + PTB_QUOTE) as u32).to_be_bytes();
    let mut pseudo = u64::from(u32::from_ne_bytes(len))
        + u64::from(u32::from_ne_bytes([0, 0, 0, IPPROTO_ICMPV6]));
    let words = |a: &[u8; 16]| -> u64 {
        let w = |i: usize| u64::from(u32::from_ne_bytes([a[i], a[i + 1], a[i + 2], a[i + 3]]));
        w(0) + w(4) + w(8) + w(12)
    };
    pseudo += words(&endpoint.gateway6) + words(&endpoint.ip6);
    let check = csum_fold((sum as u64 & 0xFFFF_FFFF) + pseudo).to_ne_bytes();
    let payload = ((ICMP_LEN + PTB_QUOTE) as u16).to_be_bytes();
    // SAFETY: as above, for the Ethernet and IPv6 headers.
    unsafe {
        let m = &mut *icmp;
        m[2] = check[0];
        m[3] = check[1];
        let h = &mut *iph;
        h.vtc_flow = [0x60, 0, 0, 0];
        h.payload_len = payload;
        h.next = IPPROTO_ICMPV6;
        h.hop_limit = PTB_HOP_LIMIT;
        h.src = endpoint.gateway6;
        h.dst = endpoint.ip6;
        (*eth).dst = endpoint.mac;
        (*eth).src = t.gateway_mac;
        (*eth).ethertype = ETHERTYPE_IPV6.to_be_bytes();
    }
    // SAFETY: bpf_redirect takes plain integers. Egress of the host side: into the workload.
    let rc = unsafe { bpf_redirect(t.ifindex, 0) };
    if rc != TC_ACT_REDIRECT as i64 {
        return -1;
    }
    drop::count(ctx, Hook::FromEndpoint, DropReason::FragNeeded);
    TC_ACT_REDIRECT as i32
}
