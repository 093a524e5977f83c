//! Proxy ARP: the workload's only neighbour is the gateway, whose MAC (`Config.gateway_mac`)
//! answers for every address but the workload's own. The request is turned into the reply in
//! place and sent back out of the same veth, to the workload.
use aya_ebpf::{bindings::TC_ACT_REDIRECT, helpers::bpf_redirect, programs::TcContext};
use dataplane_common::{DropReason, Endpoint};

use crate::parse::{
    be16, ensure, ip_eq, ptr_at, ArpHdr, EthHdr, ARP_HTYPE_ETHERNET, ARP_OP_REPLY, ARP_OP_REQUEST,
    ETHERTYPE_IPV4, ETH_HLEN,
};

/// Answers an Ethernet/IPv4 ARP request whose target is not the endpoint's own address (those
/// are duplicate-address probes and gratuitous ARP, which must stay unanswered).
#[inline(always)]
pub fn answer(
    ctx: &TcContext,
    endpoint: &Endpoint,
    ifindex: u32,
    gateway_mac: [u8; 6],
) -> Result<i32, DropReason> {
    if !ensure(ctx, ETH_HLEN + core::mem::size_of::<ArpHdr>()) {
        return Err(DropReason::ArpUnanswered);
    }
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(DropReason::ArpUnanswered)?;
    let arp: *mut ArpHdr = ptr_at(ctx, ETH_HLEN).ok_or(DropReason::ArpUnanswered)?;
    // SAFETY: ptr_at proved both headers lie within the linear packet data, which the TC
    // prologue made writable.
    unsafe {
        let a = &mut *arp;
        if be16(a.htype) != ARP_HTYPE_ETHERNET
            || be16(a.ptype) != ETHERTYPE_IPV4
            || a.hlen != 6
            || a.plen != 4
            || be16(a.oper) != ARP_OP_REQUEST
            || ip_eq(&a.tpa, &endpoint.ip)
        {
            return Err(DropReason::ArpUnanswered);
        }
        let asked = a.tpa;
        a.oper = ARP_OP_REPLY.to_be_bytes();
        a.tha = a.sha;
        a.tpa = a.spa;
        a.sha = gateway_mac;
        a.spa = asked;
        let e = &mut *eth;
        e.dst = e.src;
        e.src = gateway_mac;
    }
    // SAFETY: bpf_redirect takes plain integers.
    let rc = unsafe { bpf_redirect(ifindex, 0) };
    if rc != TC_ACT_REDIRECT as i64 {
        return Err(DropReason::RedirectFailed);
    }
    Ok(TC_ACT_REDIRECT as i32)
}
