//! Delivery to an endpoint of this host: the last step of both walks.
use aya_ebpf::{bindings::TC_ACT_REDIRECT, helpers::bpf_redirect_peer, programs::TcContext};
use dataplane_common::DropReason;

use crate::parse::{ptr_at, write_mac, EthHdr};

/// Rewrites the Ethernet header for the receiver `mac` behind the host-side veth `ifindex`
/// (source = gateway MAC, destination = its MAC;
/// nothing else is rewritten, no TTL decrement: the hop is invisible, like a cloud VPC's) and
/// redirects into its namespace with `bpf_redirect_peer`, which skips the backlog queue of the
/// veth (`RedirectFailed`).
#[inline(always)]
pub fn to_endpoint(
    ctx: &TcContext,
    ifindex: u32,
    mac: &[u8; 6],
    gateway_mac: &[u8; 6],
) -> Result<i32, DropReason> {
    address(ctx, mac, gateway_mac)?;
    redirect(ifindex)
}

/// The rewrite of [`to_endpoint`]: Ethernet destination `mac`, source `gateway_mac`
/// (`TruncatedEthernet` without an Ethernet header).
#[inline(always)]
pub fn address(ctx: &TcContext, mac: &[u8; 6], gateway_mac: &[u8; 6]) -> Result<(), DropReason> {
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(DropReason::TruncatedEthernet)?;
    // SAFETY: ptr_at proved the Ethernet header is inside the linear data, which the TC
    // prologue made writable.
    unsafe {
        write_mac(core::ptr::addr_of_mut!((*eth).dst), mac);
        write_mac(core::ptr::addr_of_mut!((*eth).src), gateway_mac);
    }
    Ok(())
}

/// The redirect of [`to_endpoint`] into the namespace behind `ifindex`. With flags 0 the helper
/// only records the target and answers `TC_ACT_REDIRECT` (net/core/filter.c,
/// `bpf_redirect_peer`: it refuses nothing but unknown flags); `RedirectFailed` otherwise.
#[inline(always)]
pub fn redirect(ifindex: u32) -> Result<i32, DropReason> {
    // SAFETY: bpf_redirect_peer takes plain integers.
    let rc = unsafe { bpf_redirect_peer(ifindex, 0) };
    if rc != TC_ACT_REDIRECT as i64 {
        return Err(DropReason::RedirectFailed);
    }
    Ok(TC_ACT_REDIRECT as i32)
}
