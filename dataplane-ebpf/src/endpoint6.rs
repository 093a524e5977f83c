//! `from_endpoint` for IPv6: what a workload sends with EtherType IPv6, between endpoints of
//! this host. The walk, its order and its drop reasons are described once, by the reference
//! model (`controller/src/verdict/ipv6.rs`); this is its kernel side, a program of its own
//! (`from_endpoint6`, [`program`]) that `from_endpoint` tail-calls, so that IPv6 has a stack of
//! its own and the IPv4 path's code (and its cost) is what it was without IPv6.
//! IPv6 flows live in `VERSE_CT6` ([`conntrack6`]) and cache no delivery: an established IPv6
//! packet looks its route up in `VERSE_ROUTES6`.
use aya_ebpf::programs::TcContext;
use dataplane_common::conntrack::{creates, is_error6, role6};
use dataplane_common::{
    capacity, ct_owner, nd, Ct6Key, CtHop, DropReason, Endpoint, Hook, Route, Route6Key,
    DIRECTION_EGRESS, DIRECTION_INGRESS, ICMPV6_ERROR_MAX_LEN,
};

use crate::{
    conntrack, conntrack6, deliver, drop, events, flow,
    maps::{
        Scratch6, VERSE_CONFIG, VERSE_CT6, VERSE_ENDPOINTS, VERSE_EP_SLOTS, VERSE_ROUTES6,
        VERSE_SCRATCH6,
    },
    nd::{self as gateway_nd, A16},
    parse::*,
    policy::{self, PolicyQuery},
};

/// `from_endpoint6`: the IPv6 frame `from_endpoint` tail-called for, judged from the start of
/// its walk (the endpoint and its MAC are checked again, with the same reasons: this program
/// trusts nothing it is handed), delivered, answered (neighbour discovery) or dropped and
/// counted. The steps that need stack (neighbour discovery, related errors, policy lookups,
/// a new flow) are calls of their own, whose frames are not all live at once.
#[inline(always)]
pub fn program(ctx: &TcContext) -> i32 {
    match start(ctx) {
        Ok(action) => action,
        Err(reason) => dropped(ctx, reason),
    }
}

/// [`drop::drop`] as a call of its own: its event is built in its own frame, not in the
/// walk's (whose frame and those of the calls it makes must fit 512 bytes together).
#[inline(never)]
fn dropped(ctx: &TcContext, reason: DropReason) -> i32 {
    drop::drop(ctx, Hook::FromEndpoint, reason)
}

/// The endpoint behind the host-side veth `ifindex`, where its record is (not copied: see
/// `endpoint::endpoint_of`).
#[inline(always)]
fn endpoint_ref(ifindex: u32) -> Option<&'static Endpoint> {
    if ifindex < capacity::ENDPOINT_SLOTS {
        if let Some(e) = VERSE_EP_SLOTS.get(ifindex) {
            if e.vni != 0 {
                return Some(e);
            }
        }
    }
    // SAFETY: map values live for the whole program run (RCU); a concurrent update can at worst
    // give a mix of the old and new record, each of which the controller wrote.
    unsafe { VERSE_ENDPOINTS.get(&ifindex) }
}

#[inline(always)]
fn start(ctx: &TcContext) -> Result<i32, DropReason> {
    if !ensure(ctx, ETH_HLEN) {
        return Err(DropReason::TruncatedEthernet);
    }
    // SAFETY: as in `endpoint::walk`.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    let endpoint = endpoint_ref(ifindex).ok_or(DropReason::UnknownEndpoint)?;
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(DropReason::TruncatedEthernet)?;
    // SAFETY: ptr_at proved the Ethernet header is inside the linear data.
    if !mac_eq(unsafe { &(*eth).src }, &endpoint.mac) {
        return Err(DropReason::SpoofedMac);
    }
    let config = VERSE_CONFIG.get(0).ok_or(DropReason::NoConfig)?;
    let ip = flow::ipv6_header(ctx, ETH_HLEN)?;
    let l4 = flow::l4_ipv6(ctx, &ip)?;
    let h: *const Ipv6Hdr = ptr_at(ctx, ETH_HLEN).ok_or(DropReason::MalformedIpv6)?;
    // SAFETY: ptr_at proved the fixed IPv6 header is inside the linear data. The addresses are
    // kept 8-byte aligned on the stack (see `nd::A16`).
    let (src, dst, hop_limit) = unsafe {
        let src = core::ptr::read_unaligned(core::ptr::addr_of!((*h).src));
        let dst = core::ptr::read_unaligned(core::ptr::addr_of!((*h).dst));
        (A16(src), A16(dst), (*h).hop_limit)
    };
    if ip.proto == IPPROTO_ICMPV6 && nd::is_nd(l4.icmp_type) {
        let q = gateway_nd::Query {
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
        return gateway_nd::answer(ctx, endpoint, &q, &src, target);
    }
    if is_zero16(&endpoint.ip6) || !eq16(&src.0, &endpoint.ip6) {
        return Err(DropReason::SpoofedIp);
    }
    let scratch = VERSE_SCRATCH6.get_ptr_mut(0).ok_or(DropReason::NoConfig)?;
    // SAFETY: this CPU's slot, which nothing else uses during the program (see
    // `VERSE_CT_SCRATCH`); map values live for the whole run.
    let scratch = unsafe { &mut *scratch };
    scratch.key = Ct6Key::new(endpoint.vni, src.0, dst.0, l4.sport, l4.dport, ip.proto);
    let key = &scratch.key;
    let role = role6(ip.proto, l4.tcp_flags, l4.icmp_type);
    let now = conntrack::now();
    let timeouts = &config.timeouts_ns;
    let found = conntrack6::lookup(key, &mut scratch.rev, role, endpoint.serial, now, timeouts);
    scratch.route = Route6Key::new(endpoint.vni, dst.0);
    // SAFETY: a map value, valid for the whole run; a concurrent update can at worst give a
    // mix of the old and new route, each of which the controller wrote.
    let route: Option<&Route> = unsafe { VERSE_ROUTES6.get(&scratch.route) };
    if let Some(hit) = found.hit {
        let Some(to) = route else {
            return Err(DropReason::NoRoute);
        };
        if to.serial == hit.receiver_serial() {
            if to.ifindex == 0 {
                return Err(DropReason::Ipv6BetweenHosts);
            }
            let size = conntrack6::size(ctx, &ip, &l4);
            conntrack::refresh(hit, now, l4.tcp_flags, size, config.flow_interval);
            return deliver::to_endpoint(ctx, to.ifindex, to.mac, config.gateway_mac);
        }
    }
    // An ICMPv6 error about a flow between its receiver and its sender.
    if let Some(to) = route {
        if role == conntrack::Role::Untracked
            && is_error6(ip.proto, l4.icmp_type, l4.policy_port as u8)
        {
            let e = Related {
                src: &src,
                dst: &dst,
                sender: endpoint.serial,
                receiver: to.serial,
                now,
                l4_off: ip.l4_off,
                ip_end: ip.ip_end,
                vni: endpoint.vni,
            };
            if related(ctx, &e, config, scratch) {
                if to.ifindex == 0 {
                    return Err(DropReason::Ipv6BetweenHosts);
                }
                return deliver::to_endpoint(ctx, to.ifindex, to.mac, config.gateway_mac);
            }
        }
    }
    let mut q = PolicyQuery {
        identity: endpoint.identity,
        peer_identity: route.map_or(0, |r| r.identity),
        vni: endpoint.vni,
        port: l4.policy_port,
        direction: DIRECTION_EGRESS,
        proto: ip.proto,
        has_peer: route.is_some(),
    };
    let Some(egress) = policy::rule6(&q, &dst) else {
        return Err(DropReason::PolicyEgress);
    };
    let Some(to) = route else {
        return Err(DropReason::NoRoute);
    };
    if to.ifindex == 0 {
        return Err(DropReason::Ipv6BetweenHosts);
    }
    q.identity = to.identity;
    q.peer_identity = endpoint.identity;
    q.has_peer = true;
    q.direction = DIRECTION_INGRESS;
    let Some(ingress) = policy::rule6(&q, &src) else {
        return Err(DropReason::PolicyIngress);
    };
    if creates(role) {
        let o = Open {
            now,
            src: endpoint.serial,
            dst: to.serial,
            l4_off: ip.l4_off,
            ip_end: ip.ip_end,
            rule_egress: egress.rule,
            rule_ingress: ingress.rule,
            owner_slot: endpoint.slot,
            interval: config.flow_interval,
            hdr_len: l4.hdr_len,
            tcp_flags: l4.tcp_flags,
            proto: ip.proto,
        };
        open(ctx, &scratch.key, &o)?;
        events::hit(egress.slot);
        events::hit(ingress.slot);
    }
    deliver::to_endpoint(ctx, to.ifindex, to.mac, config.gateway_mac)
}

/// A new IPv6 flow as [`open`] needs it (few arguments: a BPF-to-BPF call takes at most five).
#[repr(C)]
struct Open {
    now: u64,
    /// Serials of the endpoints at the key's source and destination.
    src: u64,
    dst: u64,
    l4_off: usize,
    ip_end: usize,
    rule_egress: u32,
    rule_ingress: u32,
    owner_slot: u32,
    interval: u32,
    hdr_len: u16,
    tcp_flags: u8,
    proto: u8,
}

/// Records the new flow `o` under `key` in `VERSE_CT6` ([`conntrack6::open`], owned by its
/// sender; the entry under the key looked up again). A call of its own, for its stack. No
/// verdict event is written for it: events carry IPv4 addresses.
#[inline(never)]
fn open(ctx: &TcContext, key: &Ct6Key, o: &Open) -> Result<(), DropReason> {
    let own = VERSE_CT6.get_ptr_mut(key);
    let flow = conntrack::NewFlow {
        src: o.src,
        dst: o.dst,
        owner: ct_owner::SRC,
        owner_slot: o.owner_slot,
        hop: CtHop::default(),
        rule_egress: o.rule_egress,
        rule_ingress: o.rule_ingress,
    };
    let ip = flow::Ipv6 { proto: o.proto, l4_off: o.l4_off, ip_end: o.ip_end };
    let l4 = flow::L4 {
        sport: key.sport,
        dport: key.dport,
        policy_port: 0,
        tcp_flags: o.tcp_flags,
        icmp_type: 0,
        hdr_len: o.hdr_len,
    };
    conntrack6::open(ctx, key, own, o.now, &ip, &l4, o.interval, &flow)
}

/// An ICMPv6 error a workload sent, as [`related`] needs it: the serials of its sender and
/// receiver, the conntrack clock, where its message and payload end, its universe.
#[repr(C)]
struct Related<'a> {
    src: &'a A16,
    dst: &'a A16,
    sender: u64,
    receiver: u64,
    now: u64,
    l4_off: usize,
    ip_end: usize,
    vni: u32,
}

/// True if the ICMPv6 error `e` from `src` to `dst` (an error type and code, checked by the
/// caller) is related to a tracked flow (see the model's step 5): at most 1280 bytes of IPv6
/// packet, quoting a fixed IPv6 header whose next header is the upper layer and 8 bytes after
/// it, from the quoted packet's destination to its source, that flow tracked between the
/// error's receiver and sender. A call of its own, for its stack.
#[inline(never)]
fn related(
    ctx: &TcContext,
    e: &Related,
    config: &dataplane_common::Config,
    scratch: &mut Scratch6,
) -> bool {
    if e.ip_end - ETH_HLEN > ICMPV6_ERROR_MAX_LEN {
        return false;
    }
    let quoted = &mut scratch.quoted;
    if !flow::quoted_flow6(ctx, e.vni, e.l4_off + 8, e.ip_end, quoted) {
        return false;
    }
    eq16(&quoted.src, &e.dst.0)
        && eq16(&quoted.dst, &e.src.0)
        && conntrack6::tracked(
            quoted,
            &mut scratch.quoted_rev,
            e.receiver,
            e.sender,
            e.now,
            &config.timeouts_ns,
        )
}

/// Compares IPv6 addresses as four words.
#[inline(always)]
pub fn eq16(a: &[u8; 16], b: &[u8; 16]) -> bool {
    let w = |x: &[u8; 16], i: usize| u32::from_ne_bytes([x[i], x[i + 1], x[i + 2], x[i + 3]]);
    (w(a, 0) ^ w(b, 0)) | (w(a, 4) ^ w(b, 4)) | (w(a, 8) ^ w(b, 8)) | (w(a, 12) ^ w(b, 12)) == 0
}

#[inline(always)]
pub fn is_zero16(a: &[u8; 16]) -> bool {
    eq16(a, &[0; 16])
}
