//! `from_underlay6`: a frame another host wrapped with inner EtherType IPv6, tail-called by
//! `from_underlay` once it has checked the outer headers (the reference model's
//! `controller/src/verdict/underlay.rs`, steps 1-3). Its walk is the model's
//! `Host::judge_underlay6` (`verdict/ipv6.rs`, "From the underlay"): `underlay`'s steps 4-10
//! over the IPv6 tables (`VERSE_ROUTES6`, `VERSE_CT6`, IPv6 CIDR classes). The frame work that
//! can fail (the unwrap, the Ethernet rewrite) comes before the conntrack write, as there.
use aya_ebpf::programs::TcContext;
use dataplane_common::conntrack::{creates, is_error6};
use dataplane_common::{
    ct_owner, nd, CtHop, DropReason, Hook, Route, Route6Key, DIRECTION_INGRESS, ENCAP_OVERHEAD,
};

use crate::{
    conntrack, conntrack6, deliver, drop,
    encap::{self, Outer, INNER_IP_OFF},
    endpoint6, events, flow,
    maps::{Related6, VERSE_CONFIG, VERSE_ROUTES6, VERSE_SCRATCH6},
    nd::A16,
    parse::*,
    policy::{self, PolicyQuery},
};

/// `from_underlay6`: judged, unwrapped and delivered, or dropped and counted.
#[inline(always)]
pub fn program(ctx: &TcContext) -> i32 {
    match start(ctx) {
        Ok(action) => action,
        Err(reason) => drop::drop6_call(ctx, Hook::FromUnderlay, reason),
    }
}

#[inline(always)]
fn start(ctx: &TcContext) -> Result<i32, DropReason> {
    let config = VERSE_CONFIG.get(0).ok_or(DropReason::NoConfig)?;
    let outer: *const Outer = ptr_at(ctx, ETH_HLEN).ok_or(DropReason::MalformedEncap)?;
    // SAFETY: ptr_at proved the outer headers are inside the linear data. `from_underlay`
    // checked them (a fleet host, a universe of this host, VXLAN-GBP) before the tail call;
    // the sending host, the universe and the claimed identity are read again here.
    let (host, group, vni) = unsafe {
        let o = &*outer;
        (o.ip.src, be16(o.vxlan.group), o.vxlan.vni)
    };
    let vni = u32::from_be_bytes([0, vni[0], vni[1], vni[2]]);
    let claimed = u32::from(group);
    let ip = flow::ipv6_header(ctx, INNER_IP_OFF)?;
    let l4 = flow::l4_ipv6(ctx, &ip)?;
    if ip.proto == IPPROTO_ICMPV6 && nd::is_nd(l4.icmp_type) {
        // A host never wraps neighbour discovery: it is the gateway's.
        return Err(DropReason::NdSpoofed);
    }
    let h: *const Ipv6Hdr = ptr_at(ctx, INNER_IP_OFF).ok_or(DropReason::MalformedIpv6)?;
    // SAFETY: ptr_at proved the fixed IPv6 header is inside the linear data.
    let (src, dst) = unsafe {
        let src = core::ptr::read_unaligned(core::ptr::addr_of!((*h).src));
        let dst = core::ptr::read_unaligned(core::ptr::addr_of!((*h).dst));
        (A16(src), A16(dst))
    };
    let scratch = VERSE_SCRATCH6.get_ptr_mut(0).ok_or(DropReason::NoConfig)?;
    // SAFETY: this CPU's slot, which nothing else uses during the program.
    let scratch = unsafe { &mut *scratch };
    scratch.route = Route6Key::new(vni, src.0);
    // SAFETY: a map value, valid for the whole run; a concurrent update can at worst give a mix
    // of the old and new route, each of which the controller wrote.
    let from: &Route = match unsafe { VERSE_ROUTES6.get(&scratch.route) } {
        Some(r) if r.ifindex == 0 && ip_eq(&r.underlay, &host) => r,
        _ => return Err(DropReason::NotPlacedOnSender),
    };
    if from.identity != claimed {
        return Err(DropReason::IdentityMismatch);
    }
    scratch.route = Route6Key::new(vni, dst.0);
    // SAFETY: as above.
    let to: &Route = match unsafe { VERSE_ROUTES6.get(&scratch.route) } {
        Some(r) if r.ifindex != 0 => r,
        _ => return Err(DropReason::NotLocal),
    };
    scratch.key = dataplane_common::Ct6Key::new(vni, src.0, dst.0, l4.sport, l4.dport, ip.proto);
    let role = l4.role;
    let now = conntrack::now();
    let timeouts = &config.timeouts_ns;
    let found =
        conntrack6::lookup(&scratch.key, &mut scratch.rev, role, from.serial, now, timeouts);
    if let Some(hit) = found.hit.filter(|h| h.receiver_serial() == to.serial) {
        let size = conntrack6::size(ctx, &ip, &l4, INNER_IP_OFF);
        unwrap_for(ctx, config, to)?;
        conntrack::refresh(hit, now, l4.tcp_flags, size, config.flow_interval);
        return deliver::redirect(to.ifindex);
    }
    if role == conntrack::Role::Untracked && is_error6(ip.proto, l4.icmp_type, l4.policy_port as u8)
    {
        scratch.related = Related6 {
            src: src.0,
            dst: dst.0,
            sender: from.serial,
            receiver: to.serial,
            now,
            ip_off: INNER_IP_OFF,
            vni,
        };
        if endpoint6::related(ctx, config, scratch, ip.l4_off, ip.ip_end) {
            unwrap_for(ctx, config, to)?;
            return deliver::redirect(to.ifindex);
        }
    }
    let q = PolicyQuery {
        identity: to.identity,
        peer_identity: from.identity,
        vni,
        port: l4.policy_port,
        direction: DIRECTION_INGRESS,
        proto: ip.proto,
        has_peer: true,
    };
    let Some(ingress) = policy::rule6(&q, &src) else {
        return Err(DropReason::PolicyIngress);
    };
    // Unwrapped before the flow is created, as in `underlay::inner`: the flow's offsets are
    // the unwrapped packet's.
    unwrap_for(ctx, config, to)?;
    if creates(role) {
        const SHIFT: usize = ENCAP_OVERHEAD as usize;
        let o = endpoint6::Open {
            now,
            src: from.serial,
            dst: to.serial,
            l4_off: ip.l4_off - SHIFT,
            ip_end: ip.ip_end - SHIFT,
            rule_egress: 0,
            rule_ingress: ingress.rule,
            owner_slot: to.slot,
            interval: config.flow_interval,
            hdr_len: l4.hdr_len,
            tcp_flags: l4.tcp_flags,
            proto: ip.proto,
            owner: ct_owner::DST,
        };
        // The hook delivers by the route it needs anyway (see `underlay`): nothing cached.
        endpoint6::open(ctx, &scratch.key, &o, &CtHop::default())?;
        let who = events::Parties::received(vni, from, to, host);
        let k = &scratch.key;
        let packet = events::Packet::V6 { src: &k.src, dst: &k.dst, proto: ip.proto };
        // The frame's length as it came, with the encapsulation `unwrap_for` took off.
        let len = ctx.len() + ENCAP_OVERHEAD;
        let egress = dataplane_common::PolicyValue::default();
        events::admitted(len, config, Hook::FromUnderlay, &who, packet, &l4, egress, ingress);
    }
    deliver::redirect(to.ifindex)
}

/// The fallible frame work of delivering to the local receiver `to` (as `underlay::unwrap_for`).
#[inline(always)]
fn unwrap_for(
    ctx: &TcContext,
    config: &dataplane_common::Config,
    to: &Route,
) -> Result<(), DropReason> {
    encap::unwrap6(ctx)?;
    deliver::address(ctx, &to.mac, &config.gateway_mac)
}
