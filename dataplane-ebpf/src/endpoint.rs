//! `from_endpoint`: the TC (TCX ingress) program on the host side of every endpoint veth, i.e.
//! on every packet a workload sends. It decides everything for traffic between endpoints of this
//! host and delivers allowed packets straight into the receiver's namespace; traffic for an
//! endpoint of another host is judged by the sender's egress rules here, wrapped and sent over
//! the underlay, where that host's `from_underlay` applies the receiver's ingress rules.
//!
//! The walk, its order and its drop reasons are described once, by the reference model:
//! `controller/src/verdict/endpoint.rs` (conntrack in `verdict/conntrack.rs`). This program
//! takes the same steps in the same order, and the differential test
//! (`tests/tests/dataplane_model.rs`) holds it to them. What only the kernel side has:
//! - the endpoint is found by the skb's ifindex: its slot in `VERSE_EP_SLOTS`, else
//!   `VERSE_ENDPOINTS` ([`endpoint_of`]);
//! - the established path: a conntrack hit delivers by the hop cached in its entry when that
//!   carries the current route epoch, without a route lookup; else the route is looked up and
//!   cached ([`conntrack`], "Delivery cache");
//! - IPv6 is judged by `from_endpoint6` (`endpoint6`), a program of its own that this one
//!   tail-calls (`VERSE_JUMP`);
//! - the helpers of each step: [`arp::answer`],
//!   [`flow::ipv4_header`], [`flow::l4`],
//!   [`conntrack::lookup`], [`related::error`], [`policy::rule`], [`icmp::frag_needed`],
//!   [`deliver::to_endpoint`], [`encap::wrap`].
use aya_ebpf::programs::TcContext;
use dataplane_common::{
    capacity, ct_owner, jump, Config, CtHop, CtKey, DropReason, Endpoint, Hook, PolicyValue, Route,
    RouteKey, DIRECTION_EGRESS, DIRECTION_INGRESS,
};

use crate::{
    arp, conntrack, deliver, drop, encap, endpoint6, events,
    flow::{self, Ipv4, L4},
    icmp,
    maps::{VERSE_CONFIG, VERSE_ENDPOINTS, VERSE_EP_SLOTS, VERSE_JUMP, VERSE_ROUTES},
    parse::*,
    policy, related,
};

#[inline(always)]
pub fn walk(ctx: &TcContext) -> Result<i32, DropReason> {
    let ifindex = ifindex(ctx);
    // The endpoint is looked up before the frame is read, so that the frame's pointers are
    // taken (and the header made linear if it is not) after the lookup, once; the model's order
    // of the two drops is kept: a frame shorter than an Ethernet header is truncated, whoever
    // sent it.
    let Some(endpoint) = endpoint_of(ifindex) else {
        return Err(if (ctx.len() as usize) < ETH_HLEN {
            DropReason::TruncatedEthernet
        } else {
            DropReason::UnknownEndpoint
        });
    };
    let eth: *mut EthHdr = header(ctx, 0).ok_or(DropReason::TruncatedEthernet)?;
    // SAFETY: ptr_at proved the Ethernet header is inside the linear data.
    let (src_ok, ethertype) =
        unsafe { (mac_eq(&(*eth).src, &endpoint.mac), be16((*eth).ethertype)) };
    if !src_ok {
        return Err(DropReason::SpoofedMac);
    }
    // Slot 0 of an array always exists; the check is for the verifier.
    let config = VERSE_CONFIG.get(0).ok_or(DropReason::NoConfig)?;
    match ethertype {
        ETHERTYPE_IPV4 => ipv4(ctx, &endpoint, config),
        ETHERTYPE_ARP => arp::answer(ctx, &endpoint, ifindex, config.gateway_mac),
        ETHERTYPE_IPV6 => {
            // The sender checked above, for `from_endpoint6` (`endpoint6::sender`).
            endpoint6::hand_over(ctx, endpoint.serial);
            // SAFETY: a tail call into `from_endpoint6`, which judges the frame with a stack of
            // its own; it returns only if the slot is empty (a load that did not fill its jump
            // table), and then the frame is dropped.
            unsafe { VERSE_JUMP.tail_call(ctx, jump::FROM_ENDPOINT6) };
            Err(DropReason::ProgramMissing)
        }
        _ => Err(DropReason::UnknownEthertype),
    }
}

#[inline(always)]
fn ipv4(ctx: &TcContext, endpoint: &Endpoint, config: &Config) -> Result<i32, DropReason> {
    let ip = flow::ipv4_header(ctx, ETH_HLEN)?;
    if !ip_eq(&ip.src, &endpoint.ip) {
        return Err(DropReason::SpoofedIp);
    }
    if ip.frag_off & IP_MF_OFFSET_MASK != 0 {
        return Err(DropReason::Fragment);
    }
    let l4 = flow::l4(ctx, ip.proto, ip.l4_off, ip.ip_end)?;

    let key = flow::ct_key(endpoint.vni, &ip, &l4);
    let role = l4.role;
    let (now, cpu) = conntrack::clock();
    // Before any route lookup: a hop is cached under the epoch read *before* the lookup it
    // copies, so a route changed meanwhile leaves it stale, never wrongly current.
    let epoch = conntrack::epoch(config);

    let found = conntrack::lookup(&key, role, endpoint.serial, now, &config.timeouts_ns);
    // The route, when it was looked up for a hit whose receiver turned out to be another
    // endpoint than the flow's (the new-flow path below uses it).
    let mut looked_up = None;
    if let Some(hit) = found.hit {
        // The established path: the delivery cached under the current epoch (its receiver was
        // checked when it was cached, and the routes have not changed since), else the route.
        // Two calls, so that the cached case, every packet but the first after a route change,
        // is compiled on its own.
        if let Some(hop) = hit.cached(epoch) {
            let flow = (hit, (now, cpu));
            return established(ctx, endpoint, config, &ip, &l4, flow, None, &hop);
        }
        match route_of(endpoint.vni, ip.dst) {
            Some(route) if route.serial == hit.receiver_serial() => {
                let hop = conntrack::hop(&route, epoch);
                let flow = (hit, (now, cpu));
                return established(ctx, endpoint, config, &ip, &l4, flow, Some(&key), &hop);
            }
            Some(route) => looked_up = Some(route),
            None => return Err(DropReason::NoRoute),
        }
    }
    let route = match looked_up {
        Some(route) => Some(route),
        None => route_of(endpoint.vni, ip.dst),
    };
    // An error about a flow between its receiver (the endpoint the route names) and its sender.
    let related_to = route.filter(|r| {
        role == conntrack::Role::Untracked
            && related::error(
                ctx,
                endpoint.vni,
                &ip,
                &l4,
                (endpoint.serial, r.serial),
                now,
                &config.timeouts_ns,
            )
    });
    if let Some(route) = related_to {
        let hop = conntrack::hop(&route, epoch);
        if let Some(mtu) = too_big(ctx, config, &hop, &ip, &l4)? {
            return icmp::frag_needed(ctx, endpoint, ifindex(ctx), config.gateway_mac, &ip, mtu);
        }
        return forward(ctx, endpoint, config, &hop);
    }

    let Some(egress) = policy::rule(
        endpoint.identity,
        DIRECTION_EGRESS,
        route.map(|r| r.identity),
        endpoint.vni,
        ip.dst,
        ip.proto,
        l4.policy_port,
    ) else {
        return Err(DropReason::PolicyEgress);
    };
    let Some(route) = route else {
        return Err(DropReason::NoRoute);
    };
    // A receiver on another host applies its own ingress rules (from_underlay).
    let mut ingress = PolicyValue::default();
    if route.ifindex != 0 {
        match policy::rule(
            route.identity,
            DIRECTION_INGRESS,
            Some(endpoint.identity),
            endpoint.vni,
            ip.src,
            ip.proto,
            l4.policy_port,
        ) {
            Some(v) => ingress = v,
            None => return Err(DropReason::PolicyIngress),
        }
    }
    let hop = conntrack::hop(&route, epoch);
    if let Some(mtu) = too_big(ctx, config, &hop, &ip, &l4)? {
        return icmp::frag_needed(ctx, endpoint, ifindex(ctx), config.gateway_mac, &ip, mtu);
    }
    if conntrack::creates(role) {
        let flow = conntrack::NewFlow {
            src: endpoint.serial,
            dst: route.serial,
            owner: ct_owner::SRC,
            owner_slot: endpoint.slot,
            hop,
            rule_egress: egress.rule,
            rule_ingress: ingress.rule,
        };
        conntrack::open(ctx, &key, now, &ip, &l4, config.flow_interval, &flow)?;
        let who = events::Parties {
            ifindex: ifindex(ctx),
            vni: endpoint.vni,
            src_identity: endpoint.identity,
            dst_identity: route.identity,
            peer_host: route.underlay,
        };
        let packet = events::Packet::V4 { src: ip.src, dst: ip.dst, proto: ip.proto };
        events::admitted(ctx.len(), config, Hook::FromEndpoint, &who, packet, &l4, egress, ingress);
    }
    forward(ctx, endpoint, config, &hop)
}

/// Sends a packet of an established flow (`hit`, looked up at `now` on CPU `cpu`) by `hop` and
/// refreshes the flow; `cache`: the packet's key, when `hop` was looked up rather than cached, to cache it
/// under.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn established(
    ctx: &TcContext,
    endpoint: &Endpoint,
    config: &Config,
    ip: &Ipv4,
    l4: &L4,
    (hit, (now, cpu)): (conntrack::Hit, (u64, u64)),
    cache: Option<&CtKey>,
    hop: &CtHop,
) -> Result<i32, DropReason> {
    if let Some(mtu) = too_big(ctx, config, hop, ip, l4)? {
        return icmp::frag_needed(ctx, endpoint, ifindex(ctx), config.gateway_mac, ip, mtu);
    }
    let size = conntrack::size(ctx, ip, l4);
    let interval = config.flow_interval;
    match cache {
        None => conntrack::refresh_on(hit, (now, cpu), l4.tcp_flags, size, interval),
        Some(key) => {
            conntrack::refresh_and_cache(hit, key, now, l4.tcp_flags, size, interval, *hop)
        }
    }
    forward(ctx, endpoint, config, hop)
}

/// The host-side veth the packet came in on, the sender's (`skb->ifindex`). Read again where it
/// is needed rather than kept through the walk: held, it took one of the four registers that
/// survive a call (`r6` to `r9`) for the whole walk, which the established path, needing it
/// only to answer a refusal (`icmp::frag_needed`), has better uses for.
#[inline(always)]
fn ifindex(ctx: &TcContext) -> u32 {
    // SAFETY: `skb` is the context pointer the kernel passed to this program; reads of
    // `ifindex` are rewritten by the verifier into a read of `skb->dev->ifindex`.
    unsafe { (*ctx.skb.skb).ifindex }
}

/// The route of (universe, address), copied out.
#[inline(always)]
pub fn route_of(vni: u32, ip: [u8; 4]) -> Option<Route> {
    // SAFETY: copied out at once; a concurrent update can at worst give a mix of the old and new
    // route, each of which the controller wrote.
    unsafe { VERSE_ROUTES.get(&RouteKey { vni, ip }) }.copied()
}

/// The endpoint behind the host-side veth `ifindex`: its slot in `VERSE_EP_SLOTS` (an inlined
/// array lookup) if it has one and it is filled, else `VERSE_ENDPOINTS`.
#[inline(always)]
pub fn endpoint_of(ifindex: u32) -> Option<Endpoint> {
    if ifindex < capacity::ENDPOINT_SLOTS {
        if let Some(e) = VERSE_EP_SLOTS.get(ifindex) {
            if e.vni != 0 {
                return Some(*e);
            }
        }
    }
    // SAFETY: the value is copied out at once; a concurrent update can at worst give a mix of
    // the old and new endpoint record, each of which the controller wrote.
    unsafe { VERSE_ENDPOINTS.get(&ifindex) }.copied()
}

/// Sends an admitted packet on (step 8): into a local endpoint, or wrapped to another host.
/// The caller has checked [`too_big`] first, so that a refused packet touches no flow.
#[inline(always)]
fn forward(
    ctx: &TcContext,
    endpoint: &Endpoint,
    config: &Config,
    hop: &CtHop,
) -> Result<i32, DropReason> {
    if hop.ifindex != 0 {
        // A refusal here is dropped at once, not handed back: handed back, its reason joined
        // those of the whole walk in one stack slot, stored on the way whether or not it failed.
        return Ok(match deliver::to_endpoint(ctx, hop.ifindex, &hop.mac, &config.gateway_mac) {
            Ok(action) => action,
            Err(reason) => drop::drop_call(ctx, Hook::FromEndpoint, reason),
        });
    }
    let (identity, vni) = (endpoint.identity, endpoint.vni);
    encap::wrap(ctx, config, &hop.mac, hop.underlay, identity, vni, ETHERTYPE_IPV4)
}

/// For a packet going to `hop`: nothing for a local receiver; for another host `NoUnderlay`
/// without an underlay, else the underlay MTU if the packet would not fit it once wrapped.
#[inline(always)]
fn too_big(
    ctx: &TcContext,
    config: &Config,
    hop: &CtHop,
    ip: &Ipv4,
    l4: &L4,
) -> Result<Option<u32>, DropReason> {
    if hop.ifindex != 0 {
        return Ok(None);
    }
    if config.underlay_ifindex == 0 {
        return Err(DropReason::NoUnderlay);
    }
    encap::too_big(ctx, config, ip.ihl + l4.hdr_len as usize)
}
