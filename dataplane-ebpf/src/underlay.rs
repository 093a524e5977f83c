//! `from_underlay`: the TC (TCX ingress) program on the underlay interface, i.e. on every packet
//! the host receives from its network. It takes the encapsulated traffic of other hosts' endpoints
//! (see [`encap`] for the wire format), judges it with the receiver's ingress rules, unwraps it
//! and delivers it into the receiver's namespace; anything else passes untouched.
//!
//! The walk, its order and its drop reasons are described once, by the reference model:
//! `controller/src/verdict/underlay.rs` (conntrack in `verdict/conntrack.rs`). This program takes
//! the same steps in the same order ([`walk`]: steps 1-3, [`inner`]: 4-10), and the differential
//! test (`tests/tests/dataplane_model.rs`) holds it to them. A wrapped IPv6 frame is judged by
//! `from_underlay6` (`underlay6`), which [`walk`] tail-calls once the outer headers are checked. The frame work that can fail
//! ([`encap::unwrap`], [`deliver::address`]) comes before the conntrack write, and the redirect,
//! which cannot refuse, after it: a dropped packet never refreshes or creates a flow.
use aya_ebpf::{bindings::TC_ACT_OK, programs::TcContext};
use dataplane_common::{
    ct_owner, jump, Config, CtHop, DropReason, Hook, PolicyValue, Route, RouteKey,
    DIRECTION_INGRESS, ENCAP_OVERHEAD, VXLAN_PORT,
};

use crate::{
    conntrack, deliver,
    encap::{self, Outer, INNER_ETH_OFF, INNER_IP_OFF, VXLAN_FLAGS},
    events, flow,
    maps::{VERSE_CONFIG, VERSE_HOSTS, VERSE_JUMP, VERSE_ROUTES, VERSE_VNIS},
    parse::*,
    policy, related,
};

/// IPv4 fragment offset bits and the "more fragments" bit of `frag_off` (RFC 791).
const IP_OFFSET_MASK: u16 = 0x1FFF;
const IP_MF: u16 = 0x2000;

const PASS: i32 = TC_ACT_OK as i32;

#[inline(always)]
pub fn walk(ctx: &TcContext) -> Result<i32, DropReason> {
    const IP_MIN: usize = core::mem::size_of::<Ipv4Hdr>();
    const UDP_LEN: usize = core::mem::size_of::<UdpHdr>();
    if !ensure(ctx, ETH_HLEN + IP_MIN) {
        return Ok(PASS);
    }
    let eth: *const EthHdr = ptr_at(ctx, 0).ok_or(DropReason::TruncatedEthernet)?;
    let ip: *const Ipv4Hdr = ptr_at(ctx, ETH_HLEN).ok_or(DropReason::MalformedIpv4)?;
    // SAFETY: ptr_at proved both headers are inside the linear data.
    let (ethertype, version_ihl, tot_len, frag_off, proto, src, dst) = unsafe {
        let h = &*ip;
        (
            be16((*eth).ethertype),
            h.version_ihl,
            be16(h.tot_len) as usize,
            be16(h.frag_off),
            h.proto,
            h.src,
            h.dst,
        )
    };
    let config = VERSE_CONFIG.get(0).ok_or(DropReason::NoConfig)?;
    let ihl = ((version_ihl & 0x0F) as usize) * 4;
    if ethertype != ETHERTYPE_IPV4
        || version_ihl >> 4 != 4
        || ihl < IP_MIN
        || proto != IPPROTO_UDP
        || frag_off & IP_OFFSET_MASK != 0
        || config.underlay_ifindex == 0
        || !ip_eq(&dst, &config.underlay_ip)
    {
        return Ok(PASS);
    }
    // The UDP header sits after the options, if any: find the port before deciding it is ours.
    let udp_off = ETH_HLEN + ihl;
    if !ensure(ctx, udp_off + UDP_LEN) {
        return Ok(PASS);
    }
    let udp: *const UdpHdr = ptr_at(ctx, udp_off).ok_or(DropReason::MalformedEncap)?;
    // SAFETY: ptr_at proved the UDP header is inside the linear data.
    let (dport, udp_len) = unsafe { (be16((*udp).dport), be16((*udp).len) as usize) };
    if dport != VXLAN_PORT {
        return Ok(PASS);
    }

    // Ours from here on: fail closed.
    if ihl != IP_MIN
        || frag_off & IP_MF != 0
        || ETH_HLEN + tot_len > ctx.len() as usize
        || tot_len < ENCAP_OVERHEAD as usize
        || udp_len != tot_len - IP_MIN
        || !ensure(ctx, INNER_IP_OFF)
    {
        return Err(DropReason::MalformedEncap);
    }
    // SAFETY: the value is only tested for presence.
    if unsafe { VERSE_HOSTS.get(&src) }.is_none() {
        return Err(DropReason::UnknownHost);
    }
    let outer: *const Outer = ptr_at(ctx, ETH_HLEN).ok_or(DropReason::MalformedEncap)?;
    let inner_eth: *const EthHdr = ptr_at(ctx, INNER_ETH_OFF).ok_or(DropReason::MalformedEncap)?;
    // SAFETY: ptr_at proved the outer headers and the inner Ethernet header are inside the
    // linear data.
    let (flags, group, vni, inner_type) = unsafe {
        let v = &(*outer).vxlan;
        (v.flags, be16(v.group), v.vni, be16((*inner_eth).ethertype))
    };
    if flags != VXLAN_FLAGS {
        return Err(DropReason::MalformedEncap);
    }
    let vni = u32::from_be_bytes([0, vni[0], vni[1], vni[2]]);
    // SAFETY: the value is only tested for presence.
    if unsafe { VERSE_VNIS.get(&vni) }.is_none() {
        return Err(DropReason::UnknownUniverse);
    }
    match inner_type {
        ETHERTYPE_IPV4 => {}
        ETHERTYPE_IPV6 => {
            // SAFETY: a tail call into `from_underlay6` (`underlay6`), which takes steps 4-10
            // for IPv6 with a stack of its own, from the outer headers checked here; it returns
            // only if the slot is empty, and then the frame is dropped.
            unsafe { VERSE_JUMP.tail_call(ctx, jump::FROM_UNDERLAY6) };
            return Err(DropReason::ProgramMissing);
        }
        _ => return Err(DropReason::UnknownEthertype),
    }
    inner(ctx, config, src, vni, u32::from(group))
}

/// Steps 4–10 for the inner IPv4 packet of universe `vni`, sent by host `host`, whose header
/// claims the identity `claimed`.
#[inline(always)]
fn inner(
    ctx: &TcContext,
    config: &Config,
    host: [u8; 4],
    vni: u32,
    claimed: u32,
) -> Result<i32, DropReason> {
    let ip = flow::ipv4_header(ctx, INNER_IP_OFF)?;
    if ip.frag_off & IP_MF_OFFSET_MASK != 0 {
        return Err(DropReason::Fragment);
    }
    let l4 = flow::l4(ctx, ip.proto, ip.l4_off, ip.ip_end)?;

    // SAFETY: copied out at once; each value is one the controller wrote.
    let from: Route = match unsafe { VERSE_ROUTES.get(&RouteKey { vni, ip: ip.src }) } {
        Some(r) if r.ifindex == 0 && ip_eq(&r.underlay, &host) => *r,
        _ => return Err(DropReason::NotPlacedOnSender),
    };
    if from.identity != claimed {
        return Err(DropReason::IdentityMismatch);
    }
    // SAFETY: as above.
    let to: Route = match unsafe { VERSE_ROUTES.get(&RouteKey { vni, ip: ip.dst }) } {
        Some(r) if r.ifindex != 0 => *r,
        _ => return Err(DropReason::NotLocal),
    };

    let key = flow::ct_key(vni, &ip, &l4);
    let role = l4.role;
    let now = conntrack::now();
    let found = conntrack::lookup(&key, role, from.serial, now, &config.timeouts_ns);
    if let Some(hit) = found.hit.filter(|h| h.receiver_serial() == to.serial) {
        let size = conntrack::size(ctx, &ip, &l4);
        // The frame work that can fail comes before the refresh: a dropped packet never
        // refreshes a flow (the model's `Outcome::sent`).
        unwrap_for(ctx, config, &to)?;
        conntrack::refresh(hit, now, l4.tcp_flags, size, config.flow_interval);
        return deliver::redirect(to.ifindex);
    }
    if role == conntrack::Role::Untracked
        && related::error(ctx, vni, &ip, &l4, (from.serial, to.serial), now, &config.timeouts_ns)
    {
        unwrap_for(ctx, config, &to)?;
        return deliver::redirect(to.ifindex);
    }
    let Some(ingress) = policy::rule(
        to.identity,
        DIRECTION_INGRESS,
        Some(from.identity),
        vni,
        ip.src,
        ip.proto,
        l4.policy_port,
    ) else {
        return Err(DropReason::PolicyIngress);
    };
    // Unwrapped before the flow is created, so that a packet the kernel refuses to unwrap
    // (`EncapFailed`) creates nothing (the model's `Outcome::sent`). A flow then refused for
    // its owner's budget is dropped unwrapped: counted with the inner frame's bytes, reported
    // with the inner packet's fields.
    let len = ctx.len();
    unwrap_for(ctx, config, &to)?;
    // No delivery is cached: this hook's hit path needs the source's route anyway (S10).
    if conntrack::creates(role) {
        let flow = conntrack::NewFlow {
            src: from.serial,
            dst: to.serial,
            owner: ct_owner::DST,
            owner_slot: to.slot,
            hop: CtHop::default(),
            rule_egress: 0,
            rule_ingress: ingress.rule,
        };
        conntrack::open(ctx, &key, now, &ip, &l4, config.flow_interval, &flow)?;
        let who = events::Parties::received(vni, &from, &to, host);
        let egress = PolicyValue::default();
        let packet = events::Packet::V4 { src: ip.src, dst: ip.dst, proto: ip.proto };
        events::admitted(len, config, Hook::FromUnderlay, &who, packet, &l4, egress, ingress);
    }
    deliver::redirect(to.ifindex)
}

/// The fallible frame work of delivering to the local receiver `to`: unwrap
/// ([`encap::unwrap`], `EncapFailed`) and rewrite the Ethernet header ([`deliver::address`]).
/// What is left, [`deliver::redirect`], cannot refuse.
#[inline(always)]
fn unwrap_for(ctx: &TcContext, config: &Config, to: &Route) -> Result<(), DropReason> {
    encap::unwrap(ctx)?;
    deliver::address(ctx, &to.mac, &config.gateway_mac)
}
