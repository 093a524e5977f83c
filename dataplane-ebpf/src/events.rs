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
//!
//! IPv6 is described by the IPv6 programs (`from_endpoint6`, `nd6`, `from_underlay6`: `V6`
//! true), with the extension-header walk they judge with. The IPv4 programs, which drop an IPv6
//! frame only before handing it on (an unknown endpoint, a spoofed MAC, a program missing), read
//! its fixed header alone: the event has its addresses (and their route), not its protocol, so
//! that the IPv4 programs carry no extension-header walk.
//!
//! An event is written in place in the ring buffer ([`reserve`]), never built on the stack: the
//! IPv6 programs and the calls they make share 512 bytes.
use aya_ebpf::{helpers::bpf_ktime_get_ns, maps::ring_buf::RingBufEntry, programs::TcContext};
use dataplane_common::{
    config_flags, event_kind, wire::ipv6, Config, DropReason, Event, Hook, PolicyValue, Route,
    Route6Key, VXLAN_PORT,
};

use crate::{
    conntrack,
    encap::{Outer, INNER_IP_OFF, VXLAN_FLAGS},
    endpoint,
    flow::{self, L4},
    maps::{VERSE_CONFIG, VERSE_EVENTS, VERSE_EV_LIMITS, VERSE_ROUTES6, VERSE_RULE_HITS},
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

/// Room for one event of `kind` in the ring buffer, zeroed, with its kind and time written;
/// counts it `lost` when there is none.
#[inline(always)]
fn reserve(kind: u8) -> Option<RingBufEntry<Event>> {
    let Some(mut entry) = VERSE_EVENTS.reserve::<Event>(0) else {
        count(kind, false);
        return None;
    };
    entry.write(Event {
        // SAFETY: bpf_ktime_get_ns has no preconditions.
        time_ns: unsafe { bpf_ktime_get_ns() },
        kind,
        ..Event::default()
    });
    Some(entry)
}

/// Hands a reserved event to the daemon; counts it `emitted`.
#[inline(always)]
fn submit(kind: u8, entry: RingBufEntry<Event>) {
    entry.submit(0);
    count(kind, true);
}

/// Counts an event of `kind` `emitted` (`ok`) or `lost`.
#[inline(always)]
fn count(kind: u8, ok: bool) {
    if let Some(limiter) = VERSE_EV_LIMITS.get_ptr_mut(0) {
        // SAFETY: as in `take`.
        let l = unsafe { &mut *limiter };
        let kind = kind as usize;
        let counter = if ok { l.emitted.get_mut(kind) } else { l.lost.get_mut(kind) };
        if let Some(c) = counter {
            *c += 1;
        }
    }
}

/// Reports a dropped packet, if events are on and this CPU's drop bucket allows; `V6`: the
/// IPv6 programs' drop, whose frame is described as IPv6 (see the module docs).
#[inline(always)]
pub fn dropped<const V6: bool>(ctx: &TcContext, hook: Hook, reason: DropReason) {
    let Some(config) = VERSE_CONFIG.get(0) else {
        return;
    };
    if config.flags & config_flags::EVENTS == 0 {
        return;
    }
    if !take(event_kind::DROP as usize, config, conntrack::now()) {
        return;
    }
    describe_drop::<V6>(ctx, hook, reason);
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

impl Parties {
    /// A flow from `from`, an endpoint behind the underlay host `host`, to `to`, the local
    /// receiver `from_underlay` judged for, in the universe `vni`.
    #[inline(always)]
    pub fn received(vni: u32, from: &Route, to: &Route, host: [u8; 4]) -> Self {
        Parties {
            ifindex: to.ifindex,
            vni,
            src_identity: from.identity,
            dst_identity: to.identity,
            peer_host: host,
        }
    }
}

/// The (inner) packet of a new flow: its addresses, its protocol (IPv6: the upper layer).
pub enum Packet<'a> {
    V4 { src: [u8; 4], dst: [u8; 4], proto: u8 },
    V6 { src: &'a [u8; 16], dst: &'a [u8; 16], proto: u8 },
}

/// A new flow admitted by policy: counts it for the rules that admitted it (`egress`,
/// `ingress`: the policy entries found; `PolicyValue::default()` for a direction not judged at
/// this hook) and reports it, if events are on and this CPU's new-flow bucket allows. `len` is
/// the frame's length as the hook received it.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub fn admitted(
    len: u32,
    config: &Config,
    hook: Hook,
    who: &Parties,
    packet: Packet<'_>,
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
    let Some(mut entry) = reserve(event_kind::NEW_FLOW) else {
        return;
    };
    // SAFETY: `reserve` wrote a whole event.
    let e = unsafe { entry.assume_init_mut() };
    let proto = match packet {
        Packet::V4 { src, dst, proto } => {
            e.src = Event::v4(src);
            e.dst = Event::v4(dst);
            e.ip_version = 4;
            proto
        }
        Packet::V6 { src, dst, proto } => {
            e.src = *src;
            e.dst = *dst;
            e.ip_version = 6;
            proto
        }
    };
    e.hook = hook as u8;
    e.proto = proto;
    e.tcp_flags = l4.tcp_flags;
    e.ifindex = who.ifindex;
    e.vni = who.vni;
    e.sport = if is_icmp(proto) { l4.sport | l4.dport } else { l4.sport };
    e.dport = l4.policy_port;
    e.src_identity = who.src_identity;
    e.dst_identity = who.dst_identity;
    e.rule_egress = egress.rule;
    e.rule_ingress = ingress.rule;
    e.len = len;
    e.peer_host = who.peer_host;
    submit(event_kind::NEW_FLOW, entry);
}

/// ICMP or ICMPv6: the echo identifier is in one conntrack port or the other.
#[inline(always)]
fn is_icmp(proto: u8) -> bool {
    proto == IPPROTO_ICMP || proto == IPPROTO_ICMPV6
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
fn describe_drop<const V6: bool>(ctx: &TcContext, hook: Hook, reason: DropReason) {
    let Some(mut entry) = reserve(event_kind::DROP) else {
        return;
    };
    // SAFETY: `reserve` wrote a whole event.
    let e = unsafe { entry.assume_init_mut() };
    e.hook = hook as u8;
    e.reason = reason as u32;
    e.len = ctx.len();
    match hook {
        Hook::FromEndpoint => from_endpoint::<V6>(ctx, e),
        Hook::FromUnderlay => from_underlay::<V6>(ctx, e),
    }
    submit(event_kind::DROP, entry);
}

/// A workload's frame: the endpoint behind the ingress interface, the packet, the destination's
/// route.
#[inline(always)]
fn from_endpoint<const V6: bool>(ctx: &TcContext, e: &mut Event) {
    // SAFETY: `skb` is the context pointer the kernel passed to this program.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    e.ifindex = ifindex;
    if let Some(ep) = endpoint::endpoint_of(ifindex) {
        e.vni = ep.vni;
        e.src_identity = ep.identity;
    }
    packet::<V6>(ctx, ethertype(ctx, 0), ETH_HLEN, e);
    if let Some(route) = route(e) {
        e.dst_identity = route.identity;
        e.peer_host = route.underlay;
    }
}

/// A frame from the underlay: the outer source, the VXLAN-GBP header, the inner packet, its
/// local receiver. A frame that is no VXLAN for this host any more (it was unwrapped before it
/// was refused) is read as a plain frame.
#[inline(always)]
fn from_underlay<const V6: bool>(ctx: &TcContext, e: &mut Event) {
    if ethertype(ctx, 0) != Some(ETHERTYPE_IPV4) {
        packet::<V6>(ctx, ethertype(ctx, 0), ETH_HLEN, e);
    } else if let Some(outer) = vxlan(ctx) {
        e.peer_host = outer.0;
        e.vni = outer.1;
        e.src_identity = outer.2;
        packet::<V6>(ctx, ethertype(ctx, INNER_IP_OFF - ETH_HLEN), INNER_IP_OFF, e);
    } else {
        packet::<V6>(ctx, Some(ETHERTYPE_IPV4), ETH_HLEN, e);
    }
    if let Some(route) = route(e) {
        if route.ifindex != 0 {
            e.ifindex = route.ifindex;
            e.dst_identity = route.identity;
        }
    }
}

/// The route to the event's destination in its universe, once its packet was parsed.
#[inline(always)]
fn route(e: &Event) -> Option<Route> {
    if e.vni == 0 || e.ip_version == 0 {
        return None;
    }
    if e.ip_version == 4 {
        return endpoint::route_of(e.vni, [e.dst[0], e.dst[1], e.dst[2], e.dst[3]]);
    }
    // SAFETY: copied out at once, as in `endpoint::route_of`.
    unsafe { VERSE_ROUTES6.get(&Route6Key::new(e.vni, e.dst)) }.copied()
}

/// The EtherType of the Ethernet header at `off`.
#[inline(always)]
fn ethertype(ctx: &TcContext, off: usize) -> Option<u16> {
    if !ensure(ctx, off + ETH_HLEN) {
        return None;
    }
    let eth: *const EthHdr = ptr_at(ctx, off)?;
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

/// The packet of EtherType `ethertype` at `off`: IPv4 always; IPv6 walked in the IPv6 programs,
/// its addresses only in the IPv4 programs (see the module docs).
#[inline(always)]
fn packet<const V6: bool>(ctx: &TcContext, ethertype: Option<u16>, off: usize, e: &mut Event) {
    match ethertype {
        Some(ETHERTYPE_IPV4) => packet4(ctx, off, e),
        Some(ETHERTYPE_IPV6) if V6 => packet6(ctx, off, e),
        Some(ETHERTYPE_IPV6) => {
            addresses6(ctx, off, e);
        }
        _ => {}
    }
}

/// The IPv4 packet at `off`: addresses, protocol and, unless it is a fragment, the L4 fields.
#[inline(always)]
fn packet4(ctx: &TcContext, off: usize, e: &mut Event) {
    let Ok(ip) = flow::ipv4_header(ctx, off) else {
        return;
    };
    e.src = Event::v4(ip.src);
    e.dst = Event::v4(ip.dst);
    e.ip_version = 4;
    e.proto = ip.proto;
    if ip.frag_off & IP_MF_OFFSET_MASK != 0 {
        return;
    }
    let Ok(l4) = flow::l4(ctx, ip.proto, ip.l4_off, ip.ip_end) else {
        return;
    };
    l4_fields(ip.proto, &l4, e);
}

/// The IPv6 packet at `off`: the addresses of its fixed header, and, if its extension headers
/// walk (`flow::ipv6_header`), the upper-layer protocol and its L4 fields (else the protocol is
/// left 0: not known).
#[inline(always)]
fn packet6(ctx: &TcContext, off: usize, e: &mut Event) {
    if !addresses6(ctx, off, e) {
        return;
    }
    let Ok(ip) = flow::ipv6_header(ctx, off) else {
        return;
    };
    e.proto = ip.proto;
    let Ok(l4) = flow::l4_ipv6(ctx, &ip) else {
        return;
    };
    l4_fields(ip.proto, &l4, e);
}

/// The addresses of the fixed IPv6 header at `off`, if the frame holds one.
#[inline(always)]
fn addresses6(ctx: &TcContext, off: usize, e: &mut Event) -> bool {
    if !ensure(ctx, off + ipv6::HLEN) {
        return false;
    }
    let Some(h) = ptr_at::<Ipv6Hdr>(ctx, off) else {
        return false;
    };
    // SAFETY: ptr_at proved the fixed IPv6 header is inside the linear data.
    unsafe {
        e.src = core::ptr::read_unaligned(core::ptr::addr_of!((*h).src));
        e.dst = core::ptr::read_unaligned(core::ptr::addr_of!((*h).dst));
    }
    e.ip_version = 6;
    true
}

#[inline(always)]
fn l4_fields(proto: u8, l4: &L4, e: &mut Event) {
    e.tcp_flags = l4.tcp_flags;
    e.sport = if is_icmp(proto) { l4.sport | l4.dport } else { l4.sport };
    e.dport = l4.policy_port;
}
