//! `from_endpoint`: the TC (TCX ingress) program on the host side of every endpoint veth, i.e.
//! on every packet a workload sends. It decides everything for traffic between endpoints of this
//! host and delivers allowed packets straight into the receiver's namespace.
//!
//! The walk, in order (the first failing step drops and counts its `DropReason`):
//! 1. Ethernet header present (`TruncatedEthernet`); the skb's ifindex names the endpoint
//!    (`UnknownEndpoint`); the source MAC is the endpoint's (`SpoofedMac`).
//! 2. ARP -> [`arp::answer`] (`ArpUnanswered`); IPv6 -> `Ipv6Unsupported`; anything but IPv4 ->
//!    `UnknownEthertype`.
//! 3. IPv4 header: 20 bytes, version 4, IHL >= 5, options present, `IHL*4 <= total length`,
//!    `14 + total length <= frame length` (trailing Ethernet padding is allowed)
//!    (`MalformedIpv4`); source is the endpoint's IP (`SpoofedIp`); not a fragment (`Fragment`).
//! 4. L4 header at IHL*4, within the total length (not the Ethernet padding): TCP 20 bytes and
//!    its whole data offset (>= 5 words), UDP 8, ICMP 8 (`MalformedL4`); other protocols are not
//!    parsed.
//! 5. Conntrack hit (live) on the packet's key or its reverse -> no route: `NoRoute`; else the
//!    flow is refreshed and the packet delivered (policy is skipped, S6). A dropped packet never
//!    creates or refreshes a flow.
//! 6. ICMP destination unreachable / time exceeded / parameter problem whose quoted IPv4 header
//!    (and its first 8 payload bytes) lies within the datagram, is sent from the error's
//!    destination, and names a flow tracked either way -> delivered like step 5, without policy
//!    and without touching conntrack (S6). Otherwise the error is judged like any ICMP.
//! 7. Route of (universe, destination) looked up; egress policy of the sender with the
//!    destination as peer (`PolicyEgress`); no route -> `NoRoute` (this includes the gateway
//!    address, which is no endpoint); ingress policy of the receiver with the sender as peer
//!    (`PolicyIngress`); a conntrack entry is created.
//! 8. Delivery: Ethernet source = gateway MAC, destination = the receiver's MAC (nothing else
//!    is rewritten, no TTL decrement: the hop is invisible, like a cloud VPC's), then
//!    `bpf_redirect_peer` into the receiver's namespace (`RedirectFailed`).
//!
//! `empty` is a program that passes everything: the baseline of the benchmarks.
#![no_std]
#![no_main]

mod arp;
mod conntrack;
mod drop;
mod maps;
mod parse;
mod policy;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_REDIRECT},
    helpers::bpf_redirect_peer,
    macros::classifier,
    programs::TcContext,
};
use dataplane_common::{
    CtKey, DropReason, Endpoint, Route, RouteKey, DIRECTION_EGRESS, DIRECTION_INGRESS,
};

use crate::{
    maps::{VERSE_CONFIG, VERSE_ENDPOINTS, VERSE_ROUTES},
    parse::*,
};

#[classifier]
pub fn from_endpoint(ctx: TcContext) -> i32 {
    match walk(&ctx) {
        Ok(action) => action,
        Err(reason) => drop::drop(reason),
    }
}

/// The benchmarks' baseline: the cheapest TC program there is.
#[classifier]
pub fn empty(_ctx: TcContext) -> i32 {
    TC_ACT_OK as i32
}

/// What steps 4–8 need to know about the L4 header.
struct L4 {
    /// Conntrack ports (see `CtKey` for ICMP echo).
    sport: u16,
    dport: u16,
    /// The port of policy keys: destination port, or `type << 8 | code` for ICMP.
    policy_port: u16,
    tcp_flags: u8,
    /// ICMP type, or 0xFF for anything that is not ICMP.
    icmp_type: u8,
}

#[inline(always)]
fn walk(ctx: &TcContext) -> Result<i32, DropReason> {
    if !ensure(ctx, ETH_HLEN) {
        return Err(DropReason::TruncatedEthernet);
    }
    // SAFETY: `skb` is the context pointer the kernel passed to this program; reads of
    // `ifindex` are rewritten by the verifier into a read of `skb->dev->ifindex`.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // SAFETY: the value is copied out at once; a concurrent update can at worst give a mix of
    // the old and new endpoint record, each of which the controller wrote.
    let endpoint: Endpoint = match unsafe { VERSE_ENDPOINTS.get(&ifindex) } {
        Some(e) => *e,
        None => return Err(DropReason::UnknownEndpoint),
    };
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(DropReason::TruncatedEthernet)?;
    // SAFETY: ptr_at proved the Ethernet header is inside the linear data.
    let (src_ok, ethertype) =
        unsafe { (mac_eq(&(*eth).src, &endpoint.mac), be16((*eth).ethertype)) };
    if !src_ok {
        return Err(DropReason::SpoofedMac);
    }
    // Slot 0 of an array always exists; the check is for the verifier.
    let config = VERSE_CONFIG.get(0).ok_or(DropReason::RedirectFailed)?;
    match ethertype {
        ETH_P_IP => ipv4(ctx, &endpoint, config),
        ETH_P_ARP => arp::answer(ctx, &endpoint, ifindex, config.gateway_mac),
        ETH_P_IPV6 => Err(DropReason::Ipv6Unsupported),
        _ => Err(DropReason::UnknownEthertype),
    }
}

#[inline(always)]
fn ipv4(
    ctx: &TcContext,
    endpoint: &Endpoint,
    config: &dataplane_common::Config,
) -> Result<i32, DropReason> {
    const IP_MIN: usize = core::mem::size_of::<Ipv4Hdr>();
    if !ensure(ctx, ETH_HLEN + IP_MIN) {
        return Err(DropReason::MalformedIpv4);
    }
    let ip: *const Ipv4Hdr = ptr_at(ctx, ETH_HLEN).ok_or(DropReason::MalformedIpv4)?;
    // SAFETY: ptr_at proved the fixed IPv4 header is inside the linear data.
    let (version_ihl, tot_len, frag_off, proto, src, dst) = unsafe {
        let h = &*ip;
        (h.version_ihl, be16(h.tot_len) as usize, be16(h.frag_off), h.proto, h.src, h.dst)
    };
    let ihl = ((version_ihl & 0x0F) as usize) * 4;
    if version_ihl >> 4 != 4
        || ihl < IP_MIN
        || tot_len < ihl
        || ETH_HLEN + tot_len > ctx.len() as usize
    {
        return Err(DropReason::MalformedIpv4);
    }
    if !ensure(ctx, ETH_HLEN + ihl) {
        return Err(DropReason::MalformedIpv4);
    }
    if !ip_eq(&src, &endpoint.ip) {
        return Err(DropReason::SpoofedIp);
    }
    if frag_off & IP_MF_OFFSET_MASK != 0 {
        return Err(DropReason::Fragment);
    }
    let l4_off = ETH_HLEN + ihl;
    let ip_end = ETH_HLEN + tot_len;
    let l4 = parse_l4(ctx, proto, l4_off, ip_end)?;

    let key = CtKey {
        vni: endpoint.vni,
        src,
        dst,
        sport: l4.sport,
        dport: l4.dport,
        proto,
        _pad: [0; 3],
    };
    let now = conntrack::now();
    let route_key = RouteKey { vni: endpoint.vni, ip: dst };
    // SAFETY: copied out at once, see the endpoint lookup.
    let route: Option<Route> = unsafe { VERSE_ROUTES.get(&route_key) }.copied();

    if let Some(hit) = conntrack::lookup(&key, now, &config.timeouts_ns) {
        let Some(route) = route else {
            return Err(DropReason::NoRoute);
        };
        conntrack::refresh(hit, now, l4.tcp_flags);
        return deliver(ctx, &route, config.gateway_mac);
    }
    if proto == IPPROTO_ICMP
        && matches!(l4.icmp_type, ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROBLEM)
    {
        if let Some(quoted) = quoted_flow(ctx, endpoint.vni, l4_off + 8, ip_end) {
            // An error is about a packet its sender received, so the quoted source is the
            // error's destination (Linux conntrack requires the same).
            if ip_eq(&quoted.src, &dst)
                && conntrack::lookup(&quoted, now, &config.timeouts_ns).is_some()
            {
                let Some(route) = route else {
                    return Err(DropReason::NoRoute);
                };
                return deliver(ctx, &route, config.gateway_mac);
            }
        }
    }

    if !policy::allows(
        endpoint.identity,
        DIRECTION_EGRESS,
        route.map(|r| r.identity),
        endpoint.vni,
        dst,
        proto,
        l4.policy_port,
    ) {
        return Err(DropReason::PolicyEgress);
    }
    let Some(route) = route else {
        return Err(DropReason::NoRoute);
    };
    if !policy::allows(
        route.identity,
        DIRECTION_INGRESS,
        Some(endpoint.identity),
        endpoint.vni,
        src,
        proto,
        l4.policy_port,
    ) {
        return Err(DropReason::PolicyIngress);
    }
    conntrack::create(&key, now, conntrack::initial_state(proto, l4.tcp_flags));
    deliver(ctx, &route, config.gateway_mac)
}

#[inline(always)]
fn parse_l4(ctx: &TcContext, proto: u8, l4_off: usize, ip_end: usize) -> Result<L4, DropReason> {
    match proto {
        IPPROTO_TCP => {
            let end = l4_off + core::mem::size_of::<TcpHdr>();
            if end > ip_end || !ensure(ctx, end) {
                return Err(DropReason::MalformedL4);
            }
            let tcp: *const TcpHdr = ptr_at(ctx, l4_off).ok_or(DropReason::MalformedL4)?;
            // SAFETY: ptr_at proved the TCP header is inside the linear data.
            let (sport, dport, doff_res, flags) = unsafe {
                let h = &*tcp;
                (be16(h.sport), be16(h.dport), h.doff_res, h.flags)
            };
            let doff = ((doff_res >> 4) as usize) * 4;
            if doff < core::mem::size_of::<TcpHdr>() || l4_off + doff > ip_end {
                return Err(DropReason::MalformedL4);
            }
            Ok(L4 { sport, dport, policy_port: dport, tcp_flags: flags, icmp_type: 0xFF })
        }
        IPPROTO_UDP => {
            let end = l4_off + core::mem::size_of::<UdpHdr>();
            if end > ip_end || !ensure(ctx, end) {
                return Err(DropReason::MalformedL4);
            }
            let udp: *const UdpHdr = ptr_at(ctx, l4_off).ok_or(DropReason::MalformedL4)?;
            // SAFETY: ptr_at proved the UDP header is inside the linear data.
            let (sport, dport) = unsafe { (be16((*udp).sport), be16((*udp).dport)) };
            Ok(L4 { sport, dport, policy_port: dport, tcp_flags: 0, icmp_type: 0xFF })
        }
        IPPROTO_ICMP => {
            let end = l4_off + core::mem::size_of::<IcmpHdr>();
            if end > ip_end || !ensure(ctx, end) {
                return Err(DropReason::MalformedL4);
            }
            let icmp: *const IcmpHdr = ptr_at(ctx, l4_off).ok_or(DropReason::MalformedL4)?;
            // SAFETY: ptr_at proved the ICMP header is inside the linear data.
            let (ty, code, id) = unsafe { ((*icmp).ty, (*icmp).code, be16((*icmp).id)) };
            let (sport, dport) = icmp_ports(ty, id);
            Ok(L4 {
                sport,
                dport,
                policy_port: (ty as u16) << 8 | code as u16,
                tcp_flags: 0,
                icmp_type: ty,
            })
        }
        _ => Ok(L4 { sport: 0, dport: 0, policy_port: 0, tcp_flags: 0, icmp_type: 0xFF }),
    }
}

/// Conntrack ports of an ICMP message (see `CtKey`): echo request `(id, 0)`, echo reply
/// `(0, id)`, anything else `(0, 0)`.
#[inline(always)]
fn icmp_ports(ty: u8, id: u16) -> (u16, u16) {
    match ty {
        ICMP_ECHO_REQUEST => (id, 0),
        ICMP_ECHO_REPLY => (0, id),
        _ => (0, 0),
    }
}

/// The flow quoted by an ICMP error whose quoted IPv4 header starts at `off`: its header and
/// the first 8 bytes of its payload (RFC 792) must be present. None if it cannot be read, in
/// which case the error is judged by policy like any ICMP message.
#[inline(always)]
fn quoted_flow(ctx: &TcContext, vni: u32, off: usize, ip_end: usize) -> Option<CtKey> {
    const IP_MIN: usize = core::mem::size_of::<Ipv4Hdr>();
    if off + IP_MIN > ip_end || !ensure(ctx, off + IP_MIN) {
        return None;
    }
    let ip: *const Ipv4Hdr = ptr_at(ctx, off)?;
    // SAFETY: ptr_at proved the quoted fixed header is inside the linear data.
    let (version_ihl, proto, src, dst) =
        unsafe { ((*ip).version_ihl, (*ip).proto, (*ip).src, (*ip).dst) };
    let ihl = ((version_ihl & 0x0F) as usize) * 4;
    if version_ihl >> 4 != 4 || ihl < IP_MIN {
        return None;
    }
    let l4_off = off + ihl;
    if l4_off + 8 > ip_end || !ensure(ctx, l4_off + 8) {
        return None;
    }
    let l4: *const IcmpHdr = ptr_at(ctx, l4_off)?;
    // SAFETY: ptr_at proved the quoted 8 bytes are inside the linear data. `IcmpHdr` is just a
    // view of 8 bytes here; for TCP and UDP its first four bytes are the ports.
    let (b0, b1, b2, b3, id) = unsafe {
        let h = &*l4;
        (h.ty, h.code, h.check[0], h.check[1], be16(h.id))
    };
    let (sport, dport) = match proto {
        IPPROTO_TCP | IPPROTO_UDP => (u16::from_be_bytes([b0, b1]), u16::from_be_bytes([b2, b3])),
        IPPROTO_ICMP => icmp_ports(b0, id),
        _ => (0, 0),
    };
    Some(CtKey { vni, src, dst, sport, dport, proto, _pad: [0; 3] })
}

/// Rewrites the Ethernet header for the receiver and redirects into its namespace.
#[inline(always)]
fn deliver(ctx: &TcContext, route: &Route, gateway_mac: [u8; 6]) -> Result<i32, DropReason> {
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(DropReason::TruncatedEthernet)?;
    // SAFETY: ptr_at proved the Ethernet header is inside the linear data, which the TC
    // prologue made writable.
    unsafe {
        (*eth).dst = route.mac;
        (*eth).src = gateway_mac;
    }
    // SAFETY: bpf_redirect_peer takes plain integers.
    let rc = unsafe { bpf_redirect_peer(route.ifindex, 0) };
    if rc != TC_ACT_REDIRECT as i64 {
        return Err(DropReason::RedirectFailed);
    }
    Ok(TC_ACT_REDIRECT as i32)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
