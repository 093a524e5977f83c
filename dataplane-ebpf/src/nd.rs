//! Neighbour discovery at the gateway, IPv6's ARP proxy (`arp.rs`): what a workload may send and
//! which solicitations are answered is `dataplane_common::nd::judge`, the answer
//! `dataplane_common::nd::advert`; here the packet is read, and turned into the answer in place
//! (resized to the advertisement's length) and sent back out of the same veth, to the workload.
//! A program of its own (`nd6`, [`program`]) that `from_endpoint6` tail-calls, so that the
//! answer's stack is not added to the IPv6 walk's.
use aya_ebpf::{
    bindings::TC_ACT_REDIRECT,
    helpers::{bpf_redirect, bpf_skb_change_tail},
    programs::TcContext,
};
use dataplane_common::{nd, DropReason, Endpoint, Hook};

use crate::{
    drop, endpoint6, flow,
    maps::{VERSE_CONFIG, VERSE_SCRATCH6},
    parse::*,
};

/// `nd6`: the neighbour discovery message `from_endpoint6` tail-called for, read again from
/// the start (the sender as `endpoint6::sender` finds it, the headers checked again, with the
/// same reasons), answered or dropped and counted.
#[inline(always)]
pub fn program(ctx: &TcContext) -> i32 {
    match start(ctx) {
        Ok(action) => action,
        Err(reason) => drop::drop6(ctx, Hook::FromEndpoint, reason),
    }
}

#[inline(always)]
fn start(ctx: &TcContext) -> Result<i32, DropReason> {
    let (endpoint, ifindex) = endpoint6::sender(ctx)?;
    let config = VERSE_CONFIG.get(0).ok_or(DropReason::NoConfig)?;
    let ip = flow::ipv6_header(ctx, ETH_HLEN)?;
    let l4 = flow::l4_ipv6(ctx, &ip)?;
    if ip.proto != IPPROTO_ICMPV6 || !nd::for_gateway(l4.icmp_type) {
        // Only neighbour and multicast listener discovery are tail-called here.
        return Err(DropReason::NdUnanswered);
    }
    let h: *const Ipv6Hdr = ptr_at(ctx, ETH_HLEN).ok_or(DropReason::MalformedIpv6)?;
    // SAFETY: ptr_at proved the fixed IPv6 header is inside the linear data.
    let (src, hop_limit) =
        unsafe { (A16(core::ptr::read_unaligned(core::ptr::addr_of!((*h).src))), (*h).hop_limit) };
    let q = Query {
        l4_off: ip.l4_off,
        ip_end: ip.ip_end,
        ifindex,
        gateway_mac: config.gateway_mac,
        ty: l4.icmp_type,
        code: l4.policy_port as u8,
        hop_limit,
    };
    let scratch = VERSE_SCRATCH6.get_ptr_mut(0).ok_or(DropReason::NoConfig)?;
    // SAFETY: this CPU's slot, which nothing else uses during the program.
    let target = unsafe { &mut (*scratch).target };
    answer(ctx, endpoint, &q, &src, target)
}

/// The neighbour discovery message a workload sent, as [`answer`] needs it (one argument: a
/// BPF-to-BPF call takes at most five).
#[repr(C)]
pub struct Query {
    /// Offsets of the ICMPv6 message and of the end of the payload in the frame.
    pub l4_off: usize,
    pub ip_end: usize,
    pub ifindex: u32,
    pub gateway_mac: [u8; 6],
    /// ICMPv6 type and code.
    pub ty: u8,
    pub code: u8,
    pub hop_limit: u8,
}

/// An IPv6 address on the stack, 8-byte aligned: the verifier refuses a stack access that is
/// not aligned to its size, and LLVM (allowed misaligned accesses for the packet's sake) reads
/// and writes a byte array with wide accesses wherever it sits.
#[repr(C, align(8))]
#[derive(Clone, Copy)]
pub struct A16(pub [u8; 16]);

/// Answers the neighbour discovery message `q` from `src` sent by `endpoint` (a redirect back
/// to the workload), or says why it is dropped; the target is read into `target` (off the
/// stack: a map value). An answer that cannot be built (the resize
/// refused) is `NdUnanswered`, a failed redirect `RedirectFailed`.
#[inline(always)]
pub fn answer(
    ctx: &TcContext,
    endpoint: &Endpoint,
    q: &Query,
    src: &A16,
    target: &mut [u8; 16],
) -> Result<i32, DropReason> {
    decode(answer_call(ctx, endpoint, q, src, target))
}

/// [`answer`] as a call of its own, for its stack. Its result is one register: the TC action,
/// or a drop reason's code negated (a `Result` would be returned through the caller's stack,
/// whose pointer the verifier does not let a call return).
#[inline(never)]
fn answer_call(
    ctx: &TcContext,
    endpoint: &Endpoint,
    q: &Query,
    src: &A16,
    target: &mut [u8; 16],
) -> i32 {
    match build(ctx, endpoint, q, src, target) {
        Ok(action) => action,
        Err(reason) => -(reason as i32),
    }
}

/// The reasons [`build`] can give, from their negated codes.
#[inline(always)]
fn decode(r: i32) -> Result<i32, DropReason> {
    const REASONS: [DropReason; 5] = [
        DropReason::SpoofedIp,
        DropReason::NdSpoofed,
        DropReason::NdUnanswered,
        DropReason::MldUnanswered,
        DropReason::RedirectFailed,
    ];
    if r >= 0 {
        return Ok(r);
    }
    for reason in REASONS {
        if -r == reason as i32 {
            return Err(reason);
        }
    }
    Err(DropReason::NdUnanswered)
}

#[inline(always)]
fn build(
    ctx: &TcContext,
    endpoint: &Endpoint,
    q: &Query,
    src: &A16,
    target: &mut [u8; 16],
) -> Result<i32, DropReason> {
    let mut named = false;
    if q.l4_off + nd::TARGET_END <= q.ip_end && ensure(ctx, q.l4_off + nd::TARGET_END) {
        if let Some(t) = ptr_at::<[u8; 16]>(ctx, q.l4_off + nd::TARGET_OFF) {
            // SAFETY: ptr_at proved the 16 bytes are inside the linear data.
            *target = unsafe { core::ptr::read_unaligned(t) };
            named = true;
        }
    }
    let t = if named { Some(&*target) } else { None };
    nd::judge(q.ty, q.code, q.hop_limit, &src.0, t, &endpoint.ip6, &endpoint.mac)?;
    // SAFETY: `skb` is this program's context.
    if unsafe { bpf_skb_change_tail(ctx.skb.skb, nd::ADVERT_FRAME_LEN as u32, 0) } != 0 {
        return Err(DropReason::NdUnanswered);
    }
    if !ensure(ctx, nd::ADVERT_FRAME_LEN) {
        return Err(DropReason::NdUnanswered);
    }
    let out: *mut [u8; nd::ADVERT_FRAME_LEN] = ptr_at(ctx, 0).ok_or(DropReason::NdUnanswered)?;
    // SAFETY: ptr_at proved the whole frame is inside the linear data, which the TC prologue
    // made writable; nothing else refers to it while it is written.
    nd::advert_into(unsafe { &mut *out }, &q.gateway_mac, &endpoint.mac, target, &src.0);
    // SAFETY: bpf_redirect takes plain integers. Egress of the host side: into the workload.
    let rc = unsafe { bpf_redirect(q.ifindex, 0) };
    if rc != TC_ACT_REDIRECT as i64 {
        return Err(DropReason::RedirectFailed);
    }
    Ok(TC_ACT_REDIRECT as i32)
}
