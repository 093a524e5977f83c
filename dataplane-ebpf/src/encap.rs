//! The encapsulation between hosts: VXLAN with the Group Policy extension
//! (draft-smith-vxlan-group-policy), over plain IPv4/UDP, built and removed in eBPF (no tunnel
//! device). A wrapped frame, byte by byte (see the README, "Wire format"):
//!
//! ```text
//!  0 outer Ethernet  14  (addresses filled in by the neighbour subsystem, type 0x0800)
//! 14 outer IPv4      20  45 00 <len> 00 00 40 00 40 11 <csum> <this host> <peer host>
//!                        (no options, ID 0, DF set, TTL 64, UDP, header checksum computed)
//! 34 UDP              8  <49152 + flow hash % 16384> 12 b5 (4789) <len> 00 00 (no checksum)
//! 42 VXLAN-GBP        8  88 00 <sender identity, 16 bits> <VNI, 24 bits> 00
//!                        (flags G | I; the group policy ID is the sender's identity)
//! 50 inner Ethernet  14  <receiver MAC> <gateway MAC> 08 00 (86 dd for IPv6)
//! 64 inner IPv4 ...      the workload's packet, untouched (IPv4 or IPv6)
//! ```
//!
//! Contract: [`wrap`] keeps segmentation offload: `bpf_skb_adjust_room` with the encapsulation
//! flags marks the skb as UDP-tunnelled, so a 64 KB TCP super-packet stays one skb until the
//! underlay device (or the stack in front of it) segments it, each segment carrying its own copy
//! of these headers. `BPF_F_ADJ_ROOM_FIXED_GSO` keeps the segment size: the endpoint's MTU is
//! already the underlay's minus [`ENCAP_OVERHEAD`], so segments fit once wrapped. [`fits`] is
//! the check for packets that would not. [`unwrap`] removes exactly what [`wrap`] added.
use aya_ebpf::{
    bindings::{
        bpf_adj_room_mode::BPF_ADJ_ROOM_MAC, BPF_F_ADJ_ROOM_DECAP_L3_IPV4,
        BPF_F_ADJ_ROOM_DECAP_L3_IPV6, BPF_F_ADJ_ROOM_ENCAP_L2_ETH, BPF_F_ADJ_ROOM_ENCAP_L3_IPV4,
        BPF_F_ADJ_ROOM_ENCAP_L4_UDP, BPF_F_ADJ_ROOM_FIXED_GSO, TC_ACT_REDIRECT,
    },
    helpers::{bpf_check_mtu, bpf_get_hash_recalc, bpf_redirect_neigh},
    programs::TcContext,
};
use dataplane_common::{Config, DropReason, ENCAP_OVERHEAD, VXLAN_PORT};

use crate::parse::*;

/// VXLAN flags byte: G (group policy present, draft-smith-vxlan-group-policy section 2.1) and
/// I (the VNI is valid, RFC 7348 section 5).
pub const VXLAN_FLAGS: u8 = 0x88;

/// Offset of the inner IPv4 header in a wrapped frame: the outer Ethernet header, then the
/// encapsulation (whose last 14 bytes are the inner Ethernet header, at `INNER_ETH_OFF`).
pub const INNER_IP_OFF: usize = ETH_HLEN + ENCAP_OVERHEAD as usize;
pub const INNER_ETH_OFF: usize = INNER_IP_OFF - ETH_HLEN;

/// Source ports of the outer UDP header: the dynamic range (RFC 6335), as RFC 7348 section 5
/// recommends, so that ECMP in the underlay spreads flows.
const SPORT_BASE: u16 = 49152;
const SPORT_MASK: u32 = 0x3FFF;

/// Outer TTL: enough for any underlay; the inner TTL is left alone.
const OUTER_TTL: u8 = 64;
/// Don't Fragment (RFC 791): an oversized wrapped packet must be refused, not fragmented, so
/// that path MTU discovery keeps working end to end.
const IP_DF: u16 = 0x4000;

/// VXLAN header with the Group Policy extension.
#[repr(C)]
pub struct VxlanHdr {
    pub flags: u8,
    /// Group policy flags (D, A); sent as 0, ignored on receipt.
    pub gbp_flags: u8,
    /// Group policy ID: the sender's identity.
    pub group: [u8; 2],
    pub vni: [u8; 3],
    pub reserved: u8,
}

/// Everything between the outer Ethernet header and the inner IPv4 header.
#[repr(C)]
pub struct Outer {
    pub ip: Ipv4Hdr,
    pub udp: UdpHdr,
    pub vxlan: VxlanHdr,
    pub inner: EthHdr,
}

const _: () = assert!(core::mem::size_of::<Outer>() == ENCAP_OVERHEAD as usize);

/// The underlay MTU if the packet, once wrapped, would not fit it; `None` if it fits. An
/// ordinary packet is checked by `bpf_check_mtu` with the overhead added; a GSO super-packet is
/// checked segment by segment (`l3_l4_hdr_len` + the GSO size + the overhead), because
/// `bpf_check_mtu` passes every GSO packet unless asked to check segments, which it only does
/// without a length difference. `MtuCheckFailed` when the underlay device is gone.
#[inline(always)]
pub fn too_big(
    ctx: &TcContext,
    config: &Config,
    l3_l4_hdr_len: usize,
) -> Result<Option<u32>, DropReason> {
    let mut mtu: u32 = 0;
    // SAFETY: `skb` is this program's context; `mtu` is a valid u32 on our stack.
    let rc = unsafe {
        bpf_check_mtu(
            ctx.skb.skb as *mut _,
            config.underlay_ifindex,
            &mut mtu,
            ENCAP_OVERHEAD as i32,
            0,
        )
    };
    if rc < 0 {
        return Err(DropReason::MtuCheckFailed);
    }
    // SAFETY: a read of `gso_size` from the context, which the verifier allows for TC.
    let gso_size = unsafe { (*ctx.skb.skb).gso_size } as usize;
    let fits = if gso_size == 0 {
        rc == 0
    } else {
        l3_l4_hdr_len + gso_size + ENCAP_OVERHEAD as usize <= mtu as usize
    };
    Ok(if fits { None } else { Some(mtu) })
}

/// Wraps the frame for the receiver `mac` on the host `underlay` and hands it to the underlay
/// interface through the host's routes and neighbours (`bpf_redirect_neigh`). `identity` is the
/// sender's, `vni` the universe's, `inner_type` the frame's EtherType (IPv4 or IPv6: the outer
/// headers are IPv4 either way). Fails with `EncapFailed` when the room for the headers
/// cannot be made or written, `RedirectFailed` when the redirect refuses.
#[inline(always)]
pub fn wrap(
    ctx: &TcContext,
    config: &Config,
    mac: &[u8; 6],
    underlay: [u8; 4],
    identity: u32,
    vni: u32,
    inner_type: u16,
) -> Result<i32, DropReason> {
    // SAFETY: `skb` is this program's context.
    let hash = unsafe { bpf_get_hash_recalc(ctx.skb.skb) };
    let flags = BPF_F_ADJ_ROOM_FIXED_GSO as u64
        | BPF_F_ADJ_ROOM_ENCAP_L3_IPV4 as u64
        | BPF_F_ADJ_ROOM_ENCAP_L4_UDP as u64
        | BPF_F_ADJ_ROOM_ENCAP_L2_ETH as u64
        // BPF_F_ADJ_ROOM_ENCAP_L2(len): the inner MAC header length, in the top byte.
        | (ETH_HLEN as u64) << 56;
    ctx.adjust_room(ENCAP_OVERHEAD as i32, BPF_ADJ_ROOM_MAC, flags)
        .map_err(|_| DropReason::EncapFailed)?;
    let outer_len = (ctx.len() as usize).saturating_sub(ETH_HLEN);
    if outer_len > 0xFFFF || !ensure(ctx, INNER_IP_OFF) {
        return Err(DropReason::EncapFailed);
    }
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(DropReason::EncapFailed)?;
    let outer: *mut Outer = ptr_at(ctx, ETH_HLEN).ok_or(DropReason::EncapFailed)?;

    let mut ip = Ipv4Hdr {
        version_ihl: 0x45,
        tos: 0,
        tot_len: (outer_len as u16).to_be_bytes(),
        id: [0; 2],
        frag_off: IP_DF.to_be_bytes(),
        ttl: OUTER_TTL,
        proto: IPPROTO_UDP,
        check: [0; 2],
        src: config.underlay_ip,
        dst: underlay,
    };
    ip.check = ipv4_checksum(&ip).to_be_bytes();
    let sport = SPORT_BASE | (hash & SPORT_MASK) as u16;
    let udp_len = (outer_len - core::mem::size_of::<Ipv4Hdr>()) as u16;
    let vni = vni.to_be_bytes();
    let group = (identity as u16).to_be_bytes();
    // SAFETY: ptr_at proved both headers lie within the linear data (after the adjust_room
    // above, which invalidated earlier pointers), and the TC prologue made it writable.
    unsafe {
        // The neighbour subsystem writes the addresses; the type is the outer IPv4's.
        (*eth).ethertype = ETHERTYPE_IPV4.to_be_bytes();
        let o = &mut *outer;
        o.ip = ip;
        o.udp = UdpHdr {
            sport: sport.to_be_bytes(),
            dport: VXLAN_PORT.to_be_bytes(),
            len: udp_len.to_be_bytes(),
            // A zero UDP checksum is allowed over IPv4 (RFC 768, RFC 7348 section 5).
            check: [0; 2],
        };
        o.vxlan = VxlanHdr {
            flags: VXLAN_FLAGS,
            gbp_flags: 0,
            group,
            vni: [vni[1], vni[2], vni[3]],
            reserved: 0,
        };
        // The MACs as words (`write_mac`), as the local delivery writes them.
        write_mac(core::ptr::addr_of_mut!(o.inner.dst), mac);
        write_mac(core::ptr::addr_of_mut!(o.inner.src), &config.gateway_mac);
        o.inner.ethertype = inner_type.to_be_bytes();
    }
    // SAFETY: a null `params` with length 0 asks the kernel to look the next hop up itself.
    let rc = unsafe { bpf_redirect_neigh(config.underlay_ifindex, core::ptr::null_mut(), 0, 0) };
    if rc != TC_ACT_REDIRECT as i64 {
        return Err(DropReason::RedirectFailed);
    }
    Ok(TC_ACT_REDIRECT as i32)
}

/// Removes the outer IPv4, UDP and VXLAN headers and the inner Ethernet header, leaving the
/// outer Ethernet header (already of type IPv4) in front of the inner IPv4 packet
/// (`EncapFailed` if the kernel refuses).
#[inline(always)]
pub fn unwrap(ctx: &TcContext) -> Result<(), DropReason> {
    let flags = BPF_F_ADJ_ROOM_FIXED_GSO as u64 | BPF_F_ADJ_ROOM_DECAP_L3_IPV4 as u64;
    ctx.adjust_room(-(ENCAP_OVERHEAD as i32), BPF_ADJ_ROOM_MAC, flags)
        .map_err(|_| DropReason::EncapFailed)
}

/// [`unwrap`] for an inner IPv6 packet: the kernel told that the new network header is IPv6
/// (`skb->protocol` follows), and the outer Ethernet header's type set to IPv6.
#[inline(always)]
pub fn unwrap6(ctx: &TcContext) -> Result<(), DropReason> {
    let flags = BPF_F_ADJ_ROOM_FIXED_GSO as u64 | BPF_F_ADJ_ROOM_DECAP_L3_IPV6 as u64;
    ctx.adjust_room(-(ENCAP_OVERHEAD as i32), BPF_ADJ_ROOM_MAC, flags)
        .map_err(|_| DropReason::EncapFailed)?;
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(DropReason::EncapFailed)?;
    // SAFETY: ptr_at proved the Ethernet header is inside the linear data, which the TC
    // prologue made writable.
    unsafe { (*eth).ethertype = ETHERTYPE_IPV6.to_be_bytes() };
    Ok(())
}
