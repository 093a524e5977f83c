//! `from_endpoint` for IPv6: what a workload sends with EtherType IPv6, delivered to an
//! endpoint of this host or wrapped for another host's (`encap`, as IPv4). The walk, its order and its drop reasons are described once, by the reference
//! model (`controller/src/verdict/ipv6.rs`); this is its kernel side, a program of its own
//! (`from_endpoint6`, [`program`]) that `from_endpoint` tail-calls, so that IPv6 has a stack of
//! its own and the IPv4 path's code (and its cost) is what it was without IPv6.
//! IPv6 flows live in `VERSE_CT6` ([`conntrack6`]) and cache their delivery as IPv4's do: a hit
//! whose hop carries the current route epoch is delivered without a lookup in `VERSE_ROUTES6`
//! ([`established`]). Neighbour discovery is `nd6`, a program of its
//! own this one tail-calls (`nd::program`).
use aya_ebpf::programs::TcContext;
use dataplane_common::conntrack::{creates, is_error6};
use dataplane_common::{
    capacity, ct_owner, jump, nd, Config, Ct6Key, CtHop, DropReason, Endpoint, Hook, Route,
    Route6Key, DIRECTION_EGRESS, DIRECTION_INGRESS, ICMPV6_ERROR_MAX_LEN,
};

use crate::{
    conntrack, conntrack6, deliver, drop, encap, events,
    flow::{self, Ipv6, L4},
    icmp,
    maps::{
        Related6, Scratch6, VERSE_CONFIG, VERSE_CT6, VERSE_ENDPOINTS, VERSE_EP_SLOTS, VERSE_JUMP,
        VERSE_ROUTES6, VERSE_SCRATCH6,
    },
    nd::A16,
    parse::*,
    policy::{self, PolicyQuery},
};

/// `from_endpoint6`: the IPv6 frame `from_endpoint` tail-called for, judged from the start of
/// its walk (the sender as [`sender`] finds it: the endpoint `from_endpoint` checked the frame's
/// MAC against, bound by its serial; the headers read again), delivered, answered (neighbour
/// discovery) or dropped and counted. The steps that need stack (related errors, policy lookups, a new flow, the
/// "packet too big") are calls of their own, whose frames are not all live at once; neighbour
/// discovery is a program of its own.
#[inline(always)]
pub fn program(ctx: &TcContext) -> i32 {
    match start(ctx) {
        Ok(action) => action,
        Err(reason) => drop::drop6_call(ctx, Hook::FromEndpoint, reason),
    }
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

/// Hands the frame's sender over to the programs `from_endpoint` tail-calls: the serial of the
/// endpoint whose record it checked the frame against (an Ethernet header, sent from that
/// endpoint's MAC), in words 0 and 1 of the skb's control block, which [`sender`] reads.
/// Written for every frame right before the tail call, nothing running in between. The words
/// only spare [`sender`] a second MAC check: the endpoint is always the record found by the
/// ingress ifindex, never anything read from the control block.
#[inline(always)]
pub fn hand_over(ctx: &TcContext, serial: u64) {
    // SAFETY: `cb` of the context, which TC programs may write (the verifier rewrites the
    // stores into the skb's control block).
    unsafe {
        (*ctx.skb.skb).cb[0] = serial as u32;
        (*ctx.skb.skb).cb[1] = (serial >> 32) as u32;
    }
}

/// The sender of a frame `from_endpoint` handed over ([`hand_over`]; these programs are entered
/// only so, through `VERSE_JUMP`): the endpoint behind the ingress ifindex (returned with it).
/// If its record is the one `from_endpoint` checked the frame against (the same serial; serials
/// are never reused), the frame's Ethernet header and MAC are not checked again; otherwise (the
/// record replaced between the two programs, or a hook of an earlier build that hands nothing
/// over, until an upgrade swaps its link) they are, as `from_endpoint` checks them, with the
/// same reasons. Either way the endpoint is the one whose MAC the frame was checked against.
#[inline(always)]
pub fn sender(ctx: &TcContext) -> Result<(&'static Endpoint, u32), DropReason> {
    // SAFETY: as in `endpoint::walk`; `cb` is readable by TC programs.
    let (ifindex, handed) = unsafe {
        let skb = ctx.skb.skb;
        ((*skb).ifindex, u64::from((*skb).cb[0]) | u64::from((*skb).cb[1]) << 32)
    };
    let endpoint = endpoint_ref(ifindex).ok_or(DropReason::UnknownEndpoint)?;
    if endpoint.serial != handed {
        check_mac(ctx, endpoint)?;
    }
    Ok((endpoint, ifindex))
}

/// The frame has an Ethernet header sent from `endpoint`'s MAC (`from_endpoint`'s check).
#[inline(never)]
fn check_mac(ctx: &TcContext, endpoint: &Endpoint) -> Result<(), DropReason> {
    let eth: *mut EthHdr = header(ctx, 0).ok_or(DropReason::TruncatedEthernet)?;
    // SAFETY: `header` proved the Ethernet header is inside the linear data.
    if !mac_eq(unsafe { &(*eth).src }, &endpoint.mac) {
        return Err(DropReason::SpoofedMac);
    }
    Ok(())
}

#[inline(always)]
fn start(ctx: &TcContext) -> Result<i32, DropReason> {
    let (endpoint, ifindex) = sender(ctx)?;
    let config = VERSE_CONFIG.get(0).ok_or(DropReason::NoConfig)?;
    let ip = flow::ipv6_header(ctx, ETH_HLEN)?;
    let l4 = flow::l4_ipv6(ctx, &ip)?;
    let h: *const Ipv6Hdr = ptr_at(ctx, ETH_HLEN).ok_or(DropReason::MalformedIpv6)?;
    // SAFETY: ptr_at proved the fixed IPv6 header is inside the linear data. The addresses are
    // kept 8-byte aligned on the stack (see `nd::A16`).
    let (src, dst) =
        unsafe { (address(core::ptr::addr_of!((*h).src)), address(core::ptr::addr_of!((*h).dst))) };
    if ip.proto == IPPROTO_ICMPV6 && nd::for_gateway(l4.icmp_type) {
        // SAFETY: a tail call into `nd6`, which answers or drops the message with a stack of
        // its own; it returns only if the slot is empty, and then the frame is dropped.
        unsafe { VERSE_JUMP.tail_call(ctx, jump::ND6) };
        return Err(DropReason::ProgramMissing);
    }
    if is_zero16(&endpoint.ip6) || !eq16(&src.0, &endpoint.ip6) {
        return Err(DropReason::SpoofedIp);
    }
    let scratch = VERSE_SCRATCH6.get_ptr_mut(0).ok_or(DropReason::NoConfig)?;
    // SAFETY: this CPU's slot, which nothing else uses during the program (see
    // `VERSE_CT_SCRATCH`); map values live for the whole run.
    let scratch = unsafe { &mut *scratch };
    scratch.key = Ct6Key::new(endpoint.vni, src.0, dst.0, l4.sport, l4.dport, ip.proto);
    let role = l4.role;
    let (now, cpu) = conntrack::clock();
    // Before any route lookup: a hop is cached under the epoch read *before* the lookup it
    // copies, so a route changed meanwhile leaves it stale, never wrongly current.
    let epoch = conntrack::epoch(config);
    let timeouts = &config.timeouts_ns;
    let found =
        conntrack6::lookup(&scratch.key, &mut scratch.rev, role, endpoint.serial, now, timeouts);
    // The route, when it was looked up for a hit whose receiver turned out to be another
    // endpoint than the flow's (the paths below use it).
    let mut looked_up = None;
    if let Some(hit) = found.hit {
        // The established path, as IPv4's (`endpoint`): the delivery cached under the current
        // epoch (its receiver was checked when it was cached, and the routes have not changed
        // since), else the route, whose answer is cached if it names the flow's receiver.
        if let Some(hop) = hit.cached(epoch) {
            let flow = (hit, (now, cpu));
            return established(ctx, endpoint, ifindex, config, &ip, &l4, flow, None, &hop);
        }
        let Some(to) = route6(scratch, endpoint.vni, &dst) else {
            return Err(DropReason::NoRoute);
        };
        if to.serial == hit.receiver_serial() {
            let hop = conntrack::hop(to, epoch);
            // The key the hit's entry is stored under (the reverse, built by the lookup, for a
            // reply).
            let stored = if hit.reply { &scratch.rev } else { &scratch.key };
            let flow = (hit, (now, cpu));
            return established(ctx, endpoint, ifindex, config, &ip, &l4, flow, Some(stored), &hop);
        }
        looked_up = Some(to);
    }
    let route = match looked_up {
        Some(to) => Some(to),
        None => route6(scratch, endpoint.vni, &dst),
    };
    // An ICMPv6 error about a flow between its receiver and its sender.
    if let Some(to) = route {
        if role == conntrack::Role::Untracked
            && is_error6(ip.proto, l4.icmp_type, l4.policy_port as u8)
        {
            scratch.related = Related6 {
                src: src.0,
                dst: dst.0,
                sender: endpoint.serial,
                receiver: to.serial,
                now,
                ip_off: ETH_HLEN,
                vni: endpoint.vni,
            };
            if related(ctx, config, scratch, ip.l4_off, ip.ip_end) {
                if to.ifindex == 0 {
                    if let Some(mtu) = too_big(ctx, config, &ip, &l4)? {
                        return packet_too_big(ctx, endpoint, ifindex, config, &ip, mtu);
                    }
                }
                return send(ctx, endpoint, config, &conntrack::hop(to, epoch));
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
    // A receiver on another host applies its own ingress rules (`from_underlay6`).
    let mut ingress = dataplane_common::PolicyValue::default();
    if to.ifindex != 0 {
        q.identity = to.identity;
        q.peer_identity = endpoint.identity;
        q.has_peer = true;
        q.direction = DIRECTION_INGRESS;
        let Some(v) = policy::rule6(&q, &src) else {
            return Err(DropReason::PolicyIngress);
        };
        ingress = v;
    } else if let Some(mtu) = too_big(ctx, config, &ip, &l4)? {
        return packet_too_big(ctx, endpoint, ifindex, config, &ip, mtu);
    }
    let hop = conntrack::hop(to, epoch);
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
            owner: ct_owner::SRC,
        };
        open(ctx, &scratch.key, &o, &hop)?;
        let who = events::Parties {
            ifindex,
            vni: endpoint.vni,
            src_identity: endpoint.identity,
            dst_identity: to.identity,
            peer_host: to.underlay,
        };
        let k = &scratch.key;
        let packet = events::Packet::V6 { src: &k.src, dst: &k.dst, proto: ip.proto };
        events::admitted(ctx.len(), config, Hook::FromEndpoint, &who, packet, &l4, egress, ingress);
    }
    send(ctx, endpoint, config, &hop)
}

/// The route of (universe `vni`, address `dst`), its key built in `scratch` (off the stack).
#[inline(always)]
fn route6(scratch: &mut Scratch6, vni: u32, dst: &A16) -> Option<&'static Route> {
    scratch.route = Route6Key::new(vni, dst.0);
    // SAFETY: a map value, valid for the whole run; a concurrent update can at worst give a
    // mix of the old and new route, each of which the controller wrote.
    unsafe { VERSE_ROUTES6.get(&scratch.route) }
}

/// Sends a packet of an established flow (`hit`, looked up at `now` on CPU `cpu`) by `hop` and
/// refreshes the flow; `cache`: the key its entry is stored under, when `hop` was looked up
/// rather than cached, to cache it there. A packet too big to wrap is answered first and
/// touches no flow.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn established(
    ctx: &TcContext,
    endpoint: &Endpoint,
    ifindex: u32,
    config: &Config,
    ip: &Ipv6,
    l4: &L4,
    (hit, (now, cpu)): (conntrack::Hit, (u64, u64)),
    cache: Option<&Ct6Key>,
    hop: &CtHop,
) -> Result<i32, DropReason> {
    if hop.ifindex == 0 {
        if let Some(mtu) = too_big(ctx, config, ip, l4)? {
            return packet_too_big(ctx, endpoint, ifindex, config, ip, mtu);
        }
    }
    let size = conntrack6::size(ctx, ip, l4, ETH_HLEN);
    let interval = config.flow_interval;
    match cache {
        None => conntrack::refresh_on(hit, (now, cpu), l4.tcp_flags, size, interval),
        Some(stored) => {
            conntrack::refresh_and_cache_in(hit, stored, now, l4.tcp_flags, size, interval, *hop)
        }
    }
    send(ctx, endpoint, config, hop)
}

/// Sends an admitted packet on by `hop`: into a local endpoint, or wrapped to another host
/// (inner EtherType IPv6). The caller has checked [`too_big`] first, so that a refused packet
/// touches no flow.
#[inline(always)]
fn send(
    ctx: &TcContext,
    endpoint: &Endpoint,
    config: &Config,
    hop: &CtHop,
) -> Result<i32, DropReason> {
    if hop.ifindex != 0 {
        return deliver::to_endpoint(ctx, hop.ifindex, &hop.mac, &config.gateway_mac);
    }
    let (identity, vni) = (endpoint.identity, endpoint.vni);
    encap::wrap(ctx, config, &hop.mac, hop.underlay, identity, vni, ETHERTYPE_IPV6)
}

/// For a packet going to another host: `NoUnderlay` without an underlay, else the underlay MTU
/// if the packet would not fit it once wrapped (`encap::too_big`).
#[inline(always)]
fn too_big(
    ctx: &TcContext,
    config: &Config,
    ip: &Ipv6,
    l4: &L4,
) -> Result<Option<u32>, DropReason> {
    if config.underlay_ifindex == 0 {
        return Err(DropReason::NoUnderlay);
    }
    encap::too_big(ctx, config, ip.l4_off - ETH_HLEN + l4.hdr_len as usize)
}

/// Answers a packet too big to wrap with an ICMPv6 "packet too big" from the endpoint's gateway
/// ([`icmp::packet_too_big`]), or drops it as `FragNeededUnsent` when that cannot be sent.
#[inline(always)]
fn packet_too_big(
    ctx: &TcContext,
    endpoint: &Endpoint,
    ifindex: u32,
    config: &Config,
    ip: &Ipv6,
    underlay_mtu: u32,
) -> Result<i32, DropReason> {
    let t =
        icmp::TooBig { ifindex, gateway_mac: config.gateway_mac, underlay_mtu, ip_end: ip.ip_end };
    match icmp::packet_too_big(ctx, endpoint, &t) {
        r if r < 0 => Err(DropReason::FragNeededUnsent),
        r => Ok(r),
    }
}

/// A new IPv6 flow as [`open`] needs it (few arguments: a BPF-to-BPF call takes at most five).
/// The offsets are those of a packet whose IPv6 header follows the Ethernet header (unwrapped,
/// at `from_underlay6`).
#[repr(C)]
pub struct Open {
    pub now: u64,
    /// Serials of the endpoints at the key's source and destination.
    pub src: u64,
    pub dst: u64,
    pub l4_off: usize,
    pub ip_end: usize,
    pub rule_egress: u32,
    pub rule_ingress: u32,
    pub owner_slot: u32,
    pub interval: u32,
    pub hdr_len: u16,
    pub tcp_flags: u8,
    pub proto: u8,
    /// Which side owns the flow (`ct_owner`): the sender at `from_endpoint6`, the receiver at
    /// `from_underlay6`.
    pub owner: u8,
}

/// Records the new flow `o` under `key` in `VERSE_CT6` ([`conntrack6::open`]; the entry under
/// the key looked up again), `hop` cached as the delivery of its first direction (an empty hop
/// for none). A call of its own, for its stack; `from_underlay6` calls it too.
#[inline(never)]
pub fn open(ctx: &TcContext, key: &Ct6Key, o: &Open, hop: &CtHop) -> Result<(), DropReason> {
    let own = VERSE_CT6.get_ptr_mut(key);
    let flow = conntrack::NewFlow {
        src: o.src,
        dst: o.dst,
        owner: o.owner,
        owner_slot: o.owner_slot,
        hop: *hop,
        rule_egress: o.rule_egress,
        rule_ingress: o.rule_ingress,
    };
    let ip = Ipv6 { proto: o.proto, l4_off: o.l4_off, ip_end: o.ip_end };
    let l4 = L4 {
        sport: key.sport,
        dport: key.dport,
        policy_port: 0,
        tcp_flags: o.tcp_flags,
        icmp_type: 0,
        hdr_len: o.hdr_len,
        // Not read by the size.
        role: conntrack::Role::Opens,
    };
    let size = conntrack6::size(ctx, &ip, &l4, ETH_HLEN);
    conntrack6::open(key, own, o.now, o.proto, o.tcp_flags, &size, o.interval, &flow)
}

/// True if the ICMPv6 error `scratch.related` (an error type and code, checked by the caller;
/// built in the scratch, off the caller's stack) is related to a tracked flow (see the model's
/// step 5): at most 1280 bytes of IPv6 packet, quoting a fixed IPv6 header whose next header is
/// the upper layer and 8 bytes after it, from the quoted packet's destination to its source,
/// that flow tracked between the error's receiver and sender. A call of its own, for its stack;
/// `from_underlay6` asks it too.
///
/// The offsets of its message and of the end of its payload are arguments, not scratch: the
/// verifier knows the bounds of a register the caller passes, not of a value read from a map,
/// and the packet is read at them.
#[inline(never)]
pub fn related(
    ctx: &TcContext,
    config: &dataplane_common::Config,
    scratch: &mut Scratch6,
    l4_off: usize,
    ip_end: usize,
) -> bool {
    let e = &scratch.related;
    if ip_end - e.ip_off > ICMPV6_ERROR_MAX_LEN {
        return false;
    }
    let quoted = &mut scratch.quoted;
    if !flow::quoted_flow6(ctx, e.vni, l4_off + 8, ip_end, quoted) {
        return false;
    }
    eq16(&quoted.src, &e.dst)
        && eq16(&quoted.dst, &e.src)
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
/// The IPv6 address at `p` in the packet, read as four 4-byte words: a `[u8; 16]` read from
/// the packet was lowered to 16 byte loads and 16 byte stores, and copied so twice for each
/// address on the established path.
///
/// # Safety
/// `p` points at 16 bytes of the packet's linear data (any alignment: see `nd::A16`).
#[inline(always)]
unsafe fn address(p: *const [u8; 16]) -> A16 {
    let w = p.cast::<u32>();
    // SAFETY: the caller proved the 16 bytes are inside the packet; unaligned reads.
    let words = unsafe {
        [
            core::ptr::read_unaligned(w),
            core::ptr::read_unaligned(w.add(1)),
            core::ptr::read_unaligned(w.add(2)),
            core::ptr::read_unaligned(w.add(3)),
        ]
    };
    // SAFETY: `[u32; 4]` and `[u8; 16]` have the same size and every bit pattern is valid for
    // both; native byte order both ways keeps the bytes where they were.
    A16(unsafe { core::mem::transmute::<[u32; 4], [u8; 16]>(words) })
}

#[inline(always)]
pub fn eq16(a: &[u8; 16], b: &[u8; 16]) -> bool {
    let w = |x: &[u8; 16], i: usize| u32::from_ne_bytes([x[i], x[i + 1], x[i + 2], x[i + 3]]);
    (w(a, 0) ^ w(b, 0)) | (w(a, 4) ^ w(b, 4)) | (w(a, 8) ^ w(b, 8)) | (w(a, 12) ^ w(b, 12)) == 0
}

#[inline(always)]
pub fn is_zero16(a: &[u8; 16]) -> bool {
    eq16(a, &[0; 16])
}
