//! The Verse dataplane: one TC program per hook, the logic they share in modules by concept.
//!
//! - [`from_endpoint`] (TCX ingress of the host side of every endpoint veth: every packet a
//!   workload sends) — [`endpoint`] has its walk.
//! - [`from_underlay`] (TCX ingress of the underlay interface: every packet the host receives
//!   from other hosts) — [`underlay`] has its walk.
//! - `empty` passes everything: the baseline of the benchmarks.
//!
//! Shared: [`parse`] (bounds-checked header access), [`flow`] (IPv4 and L4 as conntrack and
//! policy see them), [`conntrack`], [`policy`], [`arp`], [`encap`] (the wire format between
//! hosts), [`icmp`] (path MTU errors), [`deliver`] (into an endpoint's namespace), [`drop`]
//! (counted drops), [`maps`].
#![no_std]
#![no_main]

mod arp;
mod conntrack;
mod deliver;
mod drop;
mod encap;
mod endpoint;
mod flow;
mod icmp;
mod maps;
mod parse;
mod policy;
mod underlay;

use aya_ebpf::{bindings::TC_ACT_OK, macros::classifier, programs::TcContext};

#[classifier]
pub fn from_endpoint(ctx: TcContext) -> i32 {
    match endpoint::walk(&ctx) {
        Ok(action) => action,
        Err(reason) => drop::drop(reason),
    }
}

#[classifier]
pub fn from_underlay(ctx: TcContext) -> i32 {
    match underlay::walk(&ctx) {
        Ok(action) => action,
        Err(reason) => drop::drop(reason),
    }
}

/// The benchmarks' baseline: the cheapest TC program there is.
#[classifier]
pub fn empty(_ctx: TcContext) -> i32 {
    TC_ACT_OK as i32
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
