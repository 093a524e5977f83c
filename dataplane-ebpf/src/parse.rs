//! Bounds-checked header access. Every read goes through [`ptr_at`], which proves to the verifier
//! (and to us) that the bytes lie inside the linear part of the skb; [`ensure`] pulls headers that
//! a sender left in paged fragments into the linear part first, and only when needed, so the
//! common case (headers already linear) costs one comparison.
//!
//! Header structs are byte arrays only (alignment 1): the packet is not aligned for wider loads,
//! and byte fields keep Rust from assuming an alignment the packet does not have.
use aya_ebpf::programs::TcContext;
use core::mem::size_of;

pub use dataplane_common::wire::{
    ARP_HTYPE_ETHERNET, ARP_OP_REPLY, ARP_OP_REQUEST, ETHERTYPE_ARP, ETHERTYPE_IPV4,
    ETHERTYPE_IPV6, ETH_HLEN, ICMP_DEST_UNREACH, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP,
    IPPROTO_UDP, IP_MF_OFFSET_MASK,
};

/// Ethernet II header.
#[repr(C)]
pub struct EthHdr {
    pub dst: [u8; 6],
    pub src: [u8; 6],
    pub ethertype: [u8; 2],
}

/// IPv4 header without options (RFC 791 section 3.1).
#[repr(C)]
pub struct Ipv4Hdr {
    pub version_ihl: u8,
    pub tos: u8,
    pub tot_len: [u8; 2],
    pub id: [u8; 2],
    pub frag_off: [u8; 2],
    pub ttl: u8,
    pub proto: u8,
    pub check: [u8; 2],
    pub src: [u8; 4],
    pub dst: [u8; 4],
}

/// IPv6 fixed header (RFC 8200 section 3).
#[repr(C)]
pub struct Ipv6Hdr {
    /// Version (4 bits), traffic class (8), flow label (20).
    pub vtc_flow: [u8; 4],
    pub payload_len: [u8; 2],
    pub next: u8,
    pub hop_limit: u8,
    pub src: [u8; 16],
    pub dst: [u8; 16],
}

const _: () = assert!(size_of::<Ipv6Hdr>() == dataplane_common::wire::ipv6::HLEN);

/// The first 14 bytes of a TCP header: ports, sequence numbers, data offset and flags.
#[repr(C)]
pub struct TcpHdr {
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    pub seq: [u8; 4],
    pub ack: [u8; 4],
    pub doff_res: u8,
    pub flags: u8,
    pub window: [u8; 2],
    pub check: [u8; 2],
    pub urg: [u8; 2],
}

/// UDP header; also the port half of TCP (the first four bytes of both).
#[repr(C)]
pub struct UdpHdr {
    pub sport: [u8; 2],
    pub dport: [u8; 2],
    pub len: [u8; 2],
    pub check: [u8; 2],
}

/// ICMP header: type, code, checksum and the 4-byte "rest of header" (identifier and sequence
/// for echo).
#[repr(C)]
pub struct IcmpHdr {
    pub ty: u8,
    pub code: u8,
    pub check: [u8; 2],
    pub id: [u8; 2],
    pub seq: [u8; 2],
}

/// ARP for Ethernet/IPv4 (RFC 826).
#[repr(C)]
pub struct ArpHdr {
    pub htype: [u8; 2],
    pub ptype: [u8; 2],
    pub hlen: u8,
    pub plen: u8,
    pub oper: [u8; 2],
    pub sha: [u8; 6],
    pub spa: [u8; 4],
    pub tha: [u8; 6],
    pub tpa: [u8; 4],
}

/// A pointer to a `T` at `offset` from the start of the frame, if the linear data holds all of
/// it. The comparison is written on packet pointers so that the verifier can use it.
#[inline(always)]
pub fn ptr_at<T>(ctx: &TcContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// A pointer to a `T` at `offset`, the first `offset + size_of::<T>()` bytes of the frame made
/// linear first if they are not ([`ensure`] then [`ptr_at`] in one): a single bounds check when
/// they already are, the common case. Invalidates earlier packet pointers when it pulls.
#[inline(always)]
pub fn header<T>(ctx: &TcContext, offset: usize) -> Option<*mut T> {
    if let Some(p) = ptr_at(ctx, offset) {
        return Some(p);
    }
    let len = offset + size_of::<T>();
    if len > ctx.len() as usize || ctx.pull_data(len as u32).is_err() {
        return None;
    }
    ptr_at(ctx, offset)
}

/// Makes the first `len` bytes of the frame linear. False if the frame is shorter than `len`.
/// Invalidates earlier packet pointers when it pulls: callers take pointers after it.
#[inline(always)]
pub fn ensure(ctx: &TcContext, len: usize) -> bool {
    if ctx.data() + len <= ctx.data_end() {
        return true;
    }
    if len > ctx.len() as usize {
        return false;
    }
    ctx.pull_data(len as u32).is_ok()
}

/// `v`, hidden from the optimizer by an empty assembly block (no instruction): LLVM can no
/// longer fold what it knows of it into the stores it makes.
#[cfg(target_arch = "bpf")]
#[inline(always)]
pub fn opaque(v: u8) -> u8 {
    let mut r = u64::from(v);
    // SAFETY: an empty template: the register is left as it was.
    unsafe {
        core::arch::asm!("/* {0} */", inout(reg) r, options(pure, nomem, nostack, preserves_flags))
    };
    r as u8
}

/// The host build's [`opaque`] (type-checking only; the dataplane runs as BPF).
#[cfg(not(target_arch = "bpf"))]
#[inline(always)]
pub fn opaque(v: u8) -> u8 {
    core::hint::black_box(v)
}

#[inline(always)]
pub fn be16(b: [u8; 2]) -> u16 {
    u16::from_be_bytes(b)
}

/// Writes `mac` at `dst` as a 4-byte and a 2-byte word (see [`mac_eq`]). Every read of a hop's
/// MAC on the way to the frame is then a 4-byte and a 2-byte word: a MAC moved as one 6-byte
/// value is put together from its two words by shifts and taken apart again at the store.
///
/// # Safety
/// `dst` must be valid for a write of 6 bytes (no alignment needed).
#[inline(always)]
pub unsafe fn write_mac(dst: *mut [u8; 6], mac: &[u8; 6]) {
    let (d, s) = (dst.cast::<u8>(), mac.as_ptr());
    // SAFETY: the caller guarantees `dst` for 6 bytes; `mac` is 6 readable bytes; unaligned
    // accesses need no alignment.
    unsafe {
        core::ptr::write_unaligned(d.cast::<u32>(), core::ptr::read_unaligned(s.cast::<u32>()));
        core::ptr::write_unaligned(
            d.add(4).cast::<u16>(),
            core::ptr::read_unaligned(s.add(4).cast::<u16>()),
        );
    }
}

/// Compares MACs without `bcmp`, which the BPF target cannot call, as a 4-byte and a 2-byte
/// word each: read as bytes, a MAC in a map value (alignment 1 to the compiler) was six byte
/// loads and the shifts that put them together.
#[inline(always)]
pub fn mac_eq(a: &[u8; 6], b: &[u8; 6]) -> bool {
    let words = |m: &[u8; 6]| {
        let p = m.as_ptr();
        // SAFETY: `m` is 6 readable bytes: 4 at `p`, 2 at `p + 4`; unaligned reads need no
        // alignment (and the BPF target may load misaligned words, see `controller/build.rs`).
        unsafe {
            (
                core::ptr::read_unaligned(p.cast::<u32>()),
                core::ptr::read_unaligned(p.add(4).cast::<u16>()),
            )
        }
    };
    let ((a_hi, a_lo), (b_hi, b_lo)) = (words(a), words(b));
    (a_hi ^ b_hi) | u32::from(a_lo ^ b_lo) == 0
}

/// Compares IPv4 addresses as one word.
#[inline(always)]
pub fn ip_eq(a: &[u8; 4], b: &[u8; 4]) -> bool {
    u32::from_ne_bytes(*a) == u32::from_ne_bytes(*b)
}

/// Folds a sum of 16-bit words into the one's complement checksum (RFC 1071).
#[inline(always)]
pub fn csum_fold(sum: u64) -> u16 {
    let sum = (sum & 0xFFFF_FFFF) + (sum >> 32);
    let sum = (sum & 0xFFFF) + (sum >> 16);
    let sum = (sum & 0xFFFF) + (sum >> 16);
    let sum = (sum & 0xFFFF) + (sum >> 16);
    !(sum as u16)
}

/// The header checksum of an IPv4 header without options (its `check` field must be zero),
/// computed from the fields, not from packet memory.
#[inline(always)]
pub fn ipv4_checksum(h: &Ipv4Hdr) -> u16 {
    let w = |a: u8, b: u8| u64::from(u16::from_be_bytes([a, b]));
    let sum = w(h.version_ihl, h.tos)
        + w(h.tot_len[0], h.tot_len[1])
        + w(h.id[0], h.id[1])
        + w(h.frag_off[0], h.frag_off[1])
        + w(h.ttl, h.proto)
        + w(h.check[0], h.check[1])
        + w(h.src[0], h.src[1])
        + w(h.src[2], h.src[3])
        + w(h.dst[0], h.dst[1])
        + w(h.dst[2], h.dst[3]);
    csum_fold(sum)
}
