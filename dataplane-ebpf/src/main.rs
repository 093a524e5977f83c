//! The Verse dataplane: one TC program per hook, the logic they share in modules by concept.
//!
//! - [`from_endpoint`] (TCX ingress of the host side of every endpoint veth: every packet a
//!   workload sends) — [`endpoint`] has its walk; for IPv6 it tail-calls
//!   [`from_endpoint6`], whose walk is [`endpoint6`] (with [`conntrack6`]), which tail-calls
//!   [`nd6`] for neighbour discovery at the gateway ([`nd`]).
//! - [`from_underlay`] (TCX ingress of the underlay interface: every packet the host receives
//!   from other hosts) — [`underlay`] has its walk; for wrapped IPv6 it tail-calls
//!   [`from_underlay6`], whose walk is [`underlay6`].
//! - The tail calls go through `VERSE_JUMP` (slots in `dataplane_common::jump`).
//! - `empty` passes everything: the baseline of the benchmarks.
//! - `parse_only` is a benchmark probe, never attached: the IPv4/L4 parse of [`flow`] alone.
//!
//! Shared: [`parse`] (bounds-checked header access), [`flow`] (IPv4 and L4 as conntrack and
//! policy see them), [`conntrack`], [`related`] (ICMP errors related to a flow), [`policy`],
//! [`arp`], [`encap`] (the wire format between hosts), [`icmp`] (path MTU errors), [`deliver`]
//! (into an endpoint's namespace), [`drop`] (counted drops), [`events`] (verdict events to the
//! daemon), [`atomic`] (atomic counters), [`maps`].
#![no_std]
// On the host (`cargo build --workspace`) the crate builds as an ordinary binary that refuses to
// run: the programs only mean something when loaded into the kernel.
#![cfg_attr(target_arch = "bpf", no_main)]
// Atomic read-modify-write for the conntrack budgets (see `atomic`).
#![cfg_attr(target_arch = "bpf", feature(asm_experimental_arch))]

mod arp;
mod atomic;
mod conntrack;
mod conntrack6;
mod deliver;
mod drop;
mod encap;
mod endpoint;
mod endpoint6;
mod events;
mod flow;
mod icmp;
mod maps;
mod nd;
mod parse;
mod policy;
mod related;
mod underlay;
mod underlay6;

use aya_ebpf::{bindings::TC_ACT_OK, macros::classifier, programs::TcContext};
use dataplane_common::Hook;

/// What `#[classifier]` expands to, written out with the walk called directly: through the
/// macro (an outer function calling the wrapped one) LLVM kept the walk out of line, a
/// BPF-to-BPF call (with its own frame) on every packet. `from_underlay` still goes through the
/// macro.
#[unsafe(no_mangle)]
#[unsafe(link_section = "classifier")]
pub fn from_endpoint(skb: *mut aya_ebpf::bindings::__sk_buff) -> i32 {
    let ctx = TcContext::new(skb);
    match endpoint::walk(&ctx) {
        Ok(action) => action,
        Err(reason) => drop::drop_call(&ctx, Hook::FromEndpoint, reason),
    }
}

/// IPv6 from an endpoint: `from_endpoint` tail-calls it (`VERSE_JUMP`); never attached.
#[classifier]
pub fn from_endpoint6(ctx: TcContext) -> i32 {
    endpoint6::program(&ctx)
}

/// Neighbour discovery from an endpoint: `from_endpoint6` tail-calls it; never attached.
#[classifier]
pub fn nd6(ctx: TcContext) -> i32 {
    nd::program(&ctx)
}

/// Wrapped IPv6 from another host: `from_underlay` tail-calls it; never attached.
#[classifier]
pub fn from_underlay6(ctx: TcContext) -> i32 {
    underlay6::program(&ctx)
}

#[classifier]
pub fn from_underlay(ctx: TcContext) -> i32 {
    match underlay::walk(&ctx) {
        Ok(action) => action,
        Err(reason) => drop::drop(&ctx, Hook::FromUnderlay, reason),
    }
}

/// The benchmarks' baseline: the cheapest TC program there is.
#[classifier]
pub fn empty(_ctx: TcContext) -> i32 {
    TC_ACT_OK as i32
}

/// Benchmark probe (never attached): the parse every walk starts with — Ethernet type, IPv4
/// header ([`flow::ipv4_header`]), fragment check, L4 header ([`flow::l4`]) — and nothing else.
/// `TC_ACT_OK` for a parsed IPv4 packet, `TC_ACT_SHOT` (uncounted) otherwise. The parsed fields
/// are folded into the skb mark so that the compiler cannot drop their loads.
#[classifier]
pub fn parse_only(ctx: TcContext) -> i32 {
    use parse::*;
    let parsed = (|| -> Result<u32, dataplane_common::DropReason> {
        let eth: *mut EthHdr =
            ptr_at(&ctx, 0).ok_or(dataplane_common::DropReason::TruncatedEthernet)?;
        // SAFETY: ptr_at proved the Ethernet header is inside the linear data.
        if be16(unsafe { (*eth).ethertype }) != ETHERTYPE_IPV4 {
            return Err(dataplane_common::DropReason::UnknownEthertype);
        }
        let ip = flow::ipv4_header(&ctx, ETH_HLEN)?;
        if ip.frag_off & IP_MF_OFFSET_MASK != 0 {
            return Err(dataplane_common::DropReason::Fragment);
        }
        let l4 = flow::l4(&ctx, ip.proto, ip.l4_off, ip.ip_end)?;
        Ok(u32::from_ne_bytes(ip.src)
            ^ u32::from_ne_bytes(ip.dst)
            ^ (u32::from(l4.sport) << 16 | u32::from(l4.dport))
            ^ u32::from(ip.proto)
            ^ u32::from(l4.tcp_flags) << 8)
    })();
    match parsed {
        Ok(fold) => {
            ctx.set_mark(fold);
            TC_ACT_OK as i32
        }
        Err(_) => aya_ebpf::bindings::TC_ACT_SHOT as i32,
    }
}

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

// The host build of the BPF programs: std's panic handler and entry point, nothing to run.
#[cfg(not(target_arch = "bpf"))]
extern crate std;

#[cfg(not(target_arch = "bpf"))]
fn main() {
    panic!("verse-dataplane is an eBPF object (bpfel-unknown-none), loaded by versed");
}
