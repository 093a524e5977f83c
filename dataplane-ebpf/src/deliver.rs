//! Delivery to an endpoint of this host: the last step of both walks.
use aya_ebpf::{bindings::TC_ACT_REDIRECT, helpers::bpf_redirect_peer, programs::TcContext};
use dataplane_common::DropReason;

use crate::parse::{ptr_at, EthHdr};

/// Rewrites the Ethernet header for the receiver `mac` behind the host-side veth `ifindex`
/// (source = gateway MAC, destination = its MAC;
/// nothing else is rewritten, no TTL decrement: the hop is invisible, like a cloud VPC's) and
/// redirects into its namespace with `bpf_redirect_peer`, which skips the backlog queue of the
/// veth (`RedirectFailed`).
#[inline(always)]
pub fn to_endpoint(
    ctx: &TcContext,
    ifindex: u32,
    mac: [u8; 6],
    gateway_mac: [u8; 6],
) -> Result<i32, DropReason> {
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(DropReason::TruncatedEthernet)?;
    // SAFETY: ptr_at proved the Ethernet header is inside the linear data, which the TC
    // prologue made writable.
    unsafe {
        (*eth).dst = mac;
        (*eth).src = gateway_mac;
    }
    // SAFETY: bpf_redirect_peer takes plain integers.
    let rc = unsafe { bpf_redirect_peer(ifindex, 0) };
    if rc != TC_ACT_REDIRECT as i64 {
        return Err(DropReason::RedirectFailed);
    }
    Ok(TC_ACT_REDIRECT as i32)
}
