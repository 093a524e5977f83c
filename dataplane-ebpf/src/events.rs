//! Verdict events (README, "Why was my packet dropped?"): one [`Event`] per dropped packet and
//! per new flow admitted by policy, written to the `VERSE_EVENTS` ring buffer, which the daemon
//! drains.
//!
//! Cost: nothing on a path that reports nothing. Reporting is bounded per CPU by a token bucket
//! per kind of event (`Config::event_interval_ns`, `event_burst_ns`, kept as a GCRA in
//! `VERSE_EV_LIMITS`): a flood of drops or of new flows costs, beyond the burst, one per-CPU
//! array update per packet. Events the bucket refuses are counted `suppressed`, those the ring
//! buffer has no room for `lost`.
//!
//! A drop is described from the packet as the drop left it ([`dropped`]), so that no walk
//! carries the description along on its fast path: the frame is parsed again (the outer and
//! inner headers at `from_underlay`), and the endpoint and route maps are looked up again. A
//! packet rewritten before it was refused (a failed wrap or ICMP error) is described as
//! rewritten; a frame that does not parse leaves the addresses 0.
use aya_ebpf::{helpers::bpf_ktime_get_ns, programs::TcContext};
use dataplane_common::{
    config_flags, event_kind, Config, DropReason, Event, Hook, PolicyValue, VXLAN_PORT,
};

use crate::{
    conntrack,
    encap::{Outer, INNER_IP_OFF, VXLAN_FLAGS},
    endpoint,
    flow::{self, Ipv4, L4},
    maps::{VERSE_CONFIG, VERSE_EVENTS, VERSE_EV_LIMITS, VERSE_RULE_HITS},
    parse::*,
};

/// Whether this CPU may report an event of `kind` now (its bucket has a token, which this
/// takes); counts the event `suppressed` otherwise. `kind` is an `event_kind`.
#[inline(always)]
fn take(kind: usize, config: &Config, now: u64) -> bool {
    let Some(limiter) = VERSE_EV_LIMITS.get_ptr_mut(0) else {
        return false;
    };
    // SAFETY: slot 0 of this CPU's copy of a per-CPU array: nothing else writes it while this
    // program runs on this CPU.
    let l = unsafe { &mut *limiter };
    let (Some(tat), Some(suppressed)) = (l.tat_ns.get(kind).copied(), l.suppressed.get_mut(kind))
    else {
        return false;
    };
    let interval = config.event_interval_ns;
    if interval != 0 && tat.saturating_add(interval) > now.saturating_add(config.event_burst_ns) {
        *suppressed += 1;
        return false;
    }
    if let Some(t) = l.tat_ns.get_mut(kind) {
        *t = if tat > now { tat } else { now } + interval;
    }
    true
}

/// Writes `e` to the ring buffer; counts it `emitted` or `lost`.
#[inline(always)]
fn emit(kind: usize, e: &Event) {
    let ok = VERSE_EVENTS.output::<Event>(e, 0).is_ok();
    if let Some(limiter) = VERSE_EV_LIMITS.get_ptr_mut(0) {
        // SAFETY: as in `take`.
        let l = unsafe { &mut *limiter };
        let counter = if ok { l.emitted.get_mut(kind) } else { l.lost.get_mut(kind) };
        if let Some(c) = counter {
            *c += 1;
        }
    }
}

/// Reports a dropped packet, if events are on and this CPU's drop bucket allows.
#[inline(always)]
pub fn dropped(ctx: &TcContext, hook: Hook, reason: DropReason) {
    let Some(config) = VERSE_CONFIG.get(0) else {
        return;
    };
    if config.flags & config_flags::EVENTS == 0 {
        return;
    }
    if !take(event_kind::DROP as usize, config, conntrack::now()) {
        return;
    }
    describe_drop(ctx, hook, reason);
}

/// Who a new flow is between, as the hook that admitted it knows them.
pub struct Parties {
    /// Host-side ifindex of the local endpoint judged for (the sender at `from_endpoint`, the
    /// receiver at `from_underlay`).
    pub ifindex: u32,
    pub vni: u32,
    pub src_identity: u32,
    pub dst_identity: u32,
    /// The other host's underlay address (0: none).
    pub peer_host: [u8; 4],
}

/// A new flow admitted by policy: counts it for the rules that admitted it (`egress`,
/// `ingress`: the policy entries found; `PolicyValue::default()` for a direction not judged at
/// this hook) and reports it, if events are on and this CPU's new-flow bucket allows. `len` is
/// the frame's length as the hook received it.
#[inline(always)]
pub fn admitted(
    len: u32,
    config: &Config,
    hook: Hook,
    who: &Parties,
    ip: &Ipv4,
    l4: &L4,
    egress: PolicyValue,
    ingress: PolicyValue,
) {
    hit(egress.slot);
    hit(ingress.slot);
    if config.flags & config_flags::EVENTS == 0 {
        return;
    }
    if !take(event_kind::NEW_FLOW as usize, config, conntrack::now()) {
        return;
    }
    let e = Event {
        // SAFETY: bpf_ktime_get_ns has no preconditions.
        time_ns: unsafe { bpf_ktime_get_ns() },
        kind: event_kind::NEW_FLOW,
        hook: hook as u8,
        proto: ip.proto,
        tcp_flags: l4.tcp_flags,
        reason: 0,
        ifindex: who.ifindex,
        vni: who.vni,
        src: ip.src,
        dst: ip.dst,
        sport: if ip.proto == IPPROTO_ICMP { l4.sport | l4.dport } else { l4.sport },
        dport: l4.policy_port,
        src_identity: who.src_identity,
        dst_identity: who.dst_identity,
        rule_egress: egress.rule,
        rule_ingress: ingress.rule,
        len,
        peer_host: who.peer_host,
        _pad: [0; 4],
    };
    emit(event_kind::NEW_FLOW as usize, &e);
}

/// Counts a new flow in slot `slot` of `VERSE_RULE_HITS` (0: no rule, not counted; a slot
/// beyond the array, which the controller never writes, is not counted either).
#[inline(always)]
pub(crate) fn hit(slot: u32) {
    if slot == 0 {
        return;
    }
    if let Some(n) = VERSE_RULE_HITS.get_ptr_mut(slot) {
        // SAFETY: this CPU's copy of a per-CPU array element, valid for the map's lifetime (an
        // array's elements are never freed). A program runs to completion on one CPU with
        // migration disabled, and TC programs do not preempt each other on a CPU, so no other
        // program touches this CPU's copy meanwhile: a plain add is neither torn nor lost. The
        // controller writes a slot (zeroes it) only before a policy entry names it.
        unsafe { *n += 1 };
    }
}

/// Builds and writes the event of a drop (see the module docs).
#[inline(always)]
fn describe_drop(ctx: &TcContext, hook: Hook, reason: DropReason) {
    let mut e = Event {
        // SAFETY: bpf_ktime_get_ns has no preconditions.
        time_ns: unsafe { bpf_ktime_get_ns() },
        kind: event_kind::DROP,
        hook: hook as u8,
        reason: reason as u32,
        len: ctx.len(),
        ..Event::default()
    };
    match hook {
        Hook::FromEndpoint => from_endpoint(ctx, &mut e),
        Hook::FromUnderlay => from_underlay(ctx, &mut e),
    }
    emit(event_kind::DROP as usize, &e);
}

/// A workload's frame: the endpoint behind the ingress interface, the IPv4 packet, the
/// destination's route.
#[inline(always)]
fn from_endpoint(ctx: &TcContext, e: &mut Event) {
    // SAFETY: `skb` is the context pointer the kernel passed to this program.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    e.ifindex = ifindex;
    if let Some(ep) = endpoint::endpoint_of(ifindex) {
        e.vni = ep.vni;
        e.src_identity = ep.identity;
    }
    if ethertype(ctx) == Some(ETHERTYPE_IPV4) {
        packet(ctx, ETH_HLEN, e);
    }
    if e.vni != 0 && e.proto != 0 {
        if let Some(route) = endpoint::route_of(e.vni, e.dst) {
            e.dst_identity = route.identity;
            e.peer_host = route.underlay;
        }
    }
}

/// A frame from the underlay: the outer source, the VXLAN-GBP header, the inner IPv4 packet,
/// its local receiver. A frame that is no VXLAN for this host any more (it was unwrapped
/// before it was refused) is read as a plain frame.
#[inline(always)]
fn from_underlay(ctx: &TcContext, e: &mut Event) {
    if ethertype(ctx) != Some(ETHERTYPE_IPV4) {
        return;
    }
    let Some(outer) = vxlan(ctx) else {
        packet(ctx, ETH_HLEN, e);
        return;
    };
    e.peer_host = outer.0;
    e.vni = outer.1;
    e.src_identity = outer.2;
    if ensure(ctx, INNER_IP_OFF) {
        packet(ctx, INNER_IP_OFF, e);
    }
    if e.vni != 0 && e.proto != 0 {
        if let Some(route) = endpoint::route_of(e.vni, e.dst) {
            if route.ifindex != 0 {
                e.ifindex = route.ifindex;
                e.dst_identity = route.identity;
            }
        }
    }
}

#[inline(always)]
fn ethertype(ctx: &TcContext) -> Option<u16> {
    let eth: *const EthHdr = ptr_at(ctx, 0)?;
    // SAFETY: ptr_at proved the Ethernet header is inside the linear data.
    Some(be16(unsafe { (*eth).ethertype }))
}

/// The outer source, VNI and group policy ID of a VXLAN-GBP frame to port 4789 without IPv4
/// options; `None` for anything else.
#[inline(always)]
fn vxlan(ctx: &TcContext) -> Option<([u8; 4], u32, u32)> {
    if !ensure(ctx, INNER_IP_OFF) {
        return None;
    }
    let outer: *const Outer = ptr_at(ctx, ETH_HLEN)?;
    // SAFETY: ptr_at proved the outer headers are inside the linear data.
    let (version_ihl, proto, src, dport, flags, group, vni) = unsafe {
        let o = &*outer;
        (
            o.ip.version_ihl,
            o.ip.proto,
            o.ip.src,
            be16(o.udp.dport),
            o.vxlan.flags,
            be16(o.vxlan.group),
            o.vxlan.vni,
        )
    };
    if version_ihl != 0x45 || proto != IPPROTO_UDP || dport != VXLAN_PORT || flags != VXLAN_FLAGS {
        return None;
    }
    Some((src, u32::from_be_bytes([0, vni[0], vni[1], vni[2]]), u32::from(group)))
}

/// The IPv4 packet at `off`: addresses, protocol and, unless it is a fragment, the L4 fields.
#[inline(always)]
fn packet(ctx: &TcContext, off: usize, e: &mut Event) {
    let Ok(ip) = flow::ipv4_header(ctx, off) else {
        return;
    };
    e.src = ip.src;
    e.dst = ip.dst;
    e.proto = ip.proto;
    if ip.frag_off & IP_MF_OFFSET_MASK != 0 {
        return;
    }
    let Ok(l4) = flow::l4(ctx, ip.proto, ip.l4_off, ip.ip_end) else {
        return;
    };
    e.tcp_flags = l4.tcp_flags;
    e.sport = if ip.proto == IPPROTO_ICMP { l4.sport | l4.dport } else { l4.sport };
    e.dport = l4.policy_port;
}
