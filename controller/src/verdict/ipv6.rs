//! `from_endpoint` for IPv6 ([`Host::judge6`]): what a local endpoint sends with EtherType IPv6,
//! the one description of it (`dataplane-ebpf/src/endpoint6.rs` implements it). Steps 1-3 of
//! `endpoint.rs` (frame length, the endpoint, its MAC) come first, as for every frame; then,
//! first failing check wins:
//! 1. The IPv6 header and its extension headers (`dataplane_common::wire::ipv6::walk`):
//!    `MalformedIpv6`, `Ipv6Jumbogram`, `Ipv6Fragment` (any fragment header: the counterpart of
//!    IPv4's step 7, found by the walk), `Ipv6TooManyHeaders`.
//! 2. The upper-layer header within the payload, as IPv4's step 8 (ICMPv6 like ICMP):
//!    `MalformedL4`. (IPv4 checks its source first; IPv6 needs the ICMPv6 type to know whether
//!    the link-local source of neighbour discovery is allowed, step 3.)
//! 3. Neighbour discovery (ICMPv6 133-137) is the gateway's, as ARP is: answered with a
//!    neighbour advertisement ([`Verdict::ArpReply`], the gateway's answers) or dropped, as
//!    `dataplane_common::nd` says (`SpoofedIp`, `NdSpoofed`, `NdUnanswered`); multicast
//!    listener discovery (130-132, 143) likewise, never answered (`SpoofedIp`,
//!    `MldUnanswered`); neither is tracked, judged by rules or delivered.
//! 4. Any other packet's source must be the endpoint's IPv6 address (an endpoint without one
//!    sends no IPv6 but neighbour and multicast listener discovery): `SpoofedIp`. Link-local
//!    sources are for those only.
//! 5. From here IPv4's steps 9-14, in the same order with the same reasons, over the IPv6
//!    tables: conntrack in `VERSE_CT6` (keys [`Ct6Key`], roles [`role6`]: ICMPv6 echo as ICMP
//!    echo, other ICMPv6 untracked), routes in `VERSE_ROUTES6`, related ICMPv6 errors
//!    ([`is_error6`]: destination unreachable 0-6, packet too big 0, time exceeded 0-1, parameter
//!    problem 0-2; at most `ICMPV6_ERROR_MAX_LEN` (1280) bytes of IPv6 packet, RFC 4443 2.4 (c);
//!    quoting a fixed IPv6 header whose next header is the upper layer, no extension header,
//!    and 8 bytes after it, from the quoted flow's peer to its originator, the flow tracked
//!    between them), policy with the IPv6 peer (a CIDR rule matches in its own family only;
//!    `icmpv6` rules match ICMPv6, `icmp` rules never match IPv6; a universe without IPv6
//!    CIDRs admits no IPv6), the budget of the sender (the same one as its IPv4 flows, S14).
//! 6. Send, as IPv4's step 14: to a local receiver (gateway MAC as source, nothing else
//!    changed); to an endpoint of another host, without an underlay `NoUnderlay`, too big to
//!    wrap an ICMPv6 "packet too big" from the sender's gateway back to the sender ([`Verdict::FragNeeded`], counted
//!    `FragNeeded`; see [`Host::packet_too_big`]), else wrapped in VXLAN-GBP over the IPv4
//!    underlay as IPv4 is, with inner EtherType IPv6 ([`Verdict::Wrap`]). The flow is written
//!    (or refused for the budget) only then, as for IPv4.
//!
//! From the underlay ([`Host::judge_underlay6`]), what another host wrapped with inner
//! EtherType IPv6 takes `underlay.rs`'s steps 4-10 over the IPv6 tables: the header and
//! extension headers and the upper-layer header as above (steps 1-2), neighbour discovery
//! dropped as `NdSpoofed` (a host never wraps it: it is the gateway's), the inner source an
//! endpoint placed on the sending host at that IPv6 address in that universe
//! (`NotPlacedOnSender`), the identity of the VXLAN-GBP header the one the control plane
//! gives it (`IdentityMismatch`), the destination an endpoint of this host (`NotLocal`),
//! conntrack in `VERSE_CT6` and related ICMPv6 errors as in step 5, the receiver's ingress
//! rules (`PolicyIngress`), a new flow owned by the receiver; unwrapped (EtherType IPv6) and
//! delivered.

use std::net::Ipv6Addr;

use dataplane_common::conntrack::{initial_state6, is_error6, role6};
use dataplane_common::wire::{ipv6 as wire6, ICMPV6_PACKET_TOO_BIG, IPPROTO_ICMPV6};
use dataplane_common::{nd, Ct6Key, ICMPV6_ERROR_MAX_LEN, PTB_HOP_LIMIT, PTB_QUOTE};

use super::endpoint::Family;
use super::parse::{parse_ipv6, parse_l4_v6, Ipv6};
use super::*;

/// What `from_underlay` checked of a wrapped IPv6 frame before handing it over (steps 1-3 of
/// `underlay.rs`): the sending host, the universe, the identity the header claims.
pub(super) struct Wrapped<'u> {
    pub(super) host: Ipv4Addr,
    pub(super) universe: &'u str,
    pub(super) vni: u32,
    pub(super) claimed: u32,
    /// Offset of the inner IPv6 header in the frame.
    pub(super) inner_ip_off: usize,
}

impl Host<'_> {
    /// Judges the IPv6 frame `frame` sent by `sender` (steps 1-3 of `endpoint.rs` passed).
    pub(super) fn judge6(
        &self,
        ct: &Conntrack,
        now_ns: u64,
        sender: &Local<'_>,
        frame: &[u8],
    ) -> Outcome {
        let ip = match parse_ipv6(frame, ETH_HLEN) {
            Ok(ip) => ip,
            Err(reason) => return Outcome::drop(reason),
        };
        let l4 = match parse_l4_v6(frame, &ip) {
            Ok(l4) => l4,
            Err(reason) => return Outcome::drop(reason),
        };
        let addr = |at: usize| -> [u8; 16] {
            frame[ETH_HLEN + at..ETH_HLEN + at + 16].try_into().expect("16 bytes")
        };
        let (src, dst) = (addr(8), addr(24));
        let own = sender.ep.ipv6.map_or([0; 16], |a| a.octets());
        let (ty, code) = l4.icmp_type_code;
        if ip.proto == IPPROTO_ICMPV6 && nd::for_gateway(ty) {
            let target: Option<[u8; 16]> = (ip.l4_off + nd::TARGET_END <= ip.end).then(|| {
                let t = &frame[ip.l4_off + nd::TARGET_OFF..ip.l4_off + nd::TARGET_END];
                t.try_into().expect("16 bytes")
            });
            let hop_limit = frame[ETH_HLEN + 7];
            return match nd::judge(ty, code, hop_limit, &src, target.as_ref(), &own, &sender.mac) {
                Ok(()) => {
                    let t = target.expect("an answered solicitation names its target");
                    let frame = nd::advert(&self.gateway_mac, &sender.mac, &t, &src).to_vec();
                    Outcome { verdict: Verdict::ArpReply { frame }, ct: None, ct6: None }
                }
                Err(reason) => Outcome::drop(reason),
            };
        }
        if own == [0; 16] || src != own {
            return Outcome::drop(DropReason::SpoofedIp);
        }
        let (sport, dport) = l4.ct_ports;
        let key = Ct6Key::new(sender.vni, src, dst, sport, dport, ip.proto);
        let universe = sender.ep.universe.as_str();
        let route = self.routes6.get(&(universe, Ipv6Addr::from(dst))).copied();
        let role = role6(ip.proto, l4.tcp_flags, ty);

        self.flow(ct, now_ns, sender, frame, (&ip, &l4), key, route, role)
    }

    /// The ICMPv6 "packet too big" (type 2 code 0, RFC 4443 section 3.2) that `from_endpoint6`
    /// sends back for a packet too big to wrap, as IPv4's "fragmentation needed" (but from the
    /// router): from the gateway of the sender's IPv6 address (`model::gateway6`, its default
    /// router) to the sender, hop limit 64, MTU = underlay MTU - 50, quoting the
    /// first `PTB_QUOTE` (256) bytes of the packet. A packet shorter than the quote (too big only by its padding) gets no error:
    /// `frag_needed_unsent`, as the kernel counts it.
    fn packet_too_big(&self, frame: &[u8], sender: &Local<'_>, ip: &Ipv6, mtu: u32) -> Outcome {
        if ip.end < ETH_HLEN + PTB_QUOTE {
            return Outcome::drop(DropReason::FragNeededUnsent);
        }
        let own = sender.ep.ipv6.map_or([0; 16], |a| a.octets());
        let universe = self.state.universes.get(&sender.ep.universe);
        let gateway = sender.ep.ipv6.zip(universe).and_then(|(a, u)| model::gateway6(u, a));
        let out = packet_too_big_frame(
            &sender.mac,
            &self.gateway_mac,
            &gateway.map_or([0; 16], |g| g.octets()),
            &own,
            mtu.saturating_sub(ENCAP_OVERHEAD),
            &frame[ETH_HLEN..ETH_HLEN + PTB_QUOTE],
        );
        Outcome { verdict: Verdict::FragNeeded { frame: out }, ct: None, ct6: None }
    }

    /// A wrapped IPv6 frame from the underlay, once `from_underlay` has checked its outer
    /// headers (`w`): the walk of this module's documentation, "From the underlay".
    pub(super) fn judge_underlay6(
        &self,
        ct: &Conntrack,
        now_ns: u64,
        frame: &[u8],
        w: &Wrapped<'_>,
    ) -> Outcome {
        let ip = match parse_ipv6(frame, w.inner_ip_off) {
            Ok(ip) => ip,
            Err(reason) => return Outcome::drop(reason),
        };
        let l4 = match parse_l4_v6(frame, &ip) {
            Ok(l4) => l4,
            Err(reason) => return Outcome::drop(reason),
        };
        if ip.proto == IPPROTO_ICMPV6 && nd::is_nd(l4.icmp_type_code.0) {
            return Outcome::drop(DropReason::NdSpoofed);
        }
        let (src6, dst6) = (Ipv6Addr::from(ip.src), Ipv6Addr::from(ip.dst));
        let from = match self.routes6.get(&(w.universe, src6)) {
            Some(Place::Remote(r)) if r.underlay == w.host => *r,
            _ => return Outcome::drop(DropReason::NotPlacedOnSender),
        };
        if from.identity != w.claimed {
            return Outcome::drop(DropReason::IdentityMismatch);
        }
        let Some(Place::Local(to)) = self.routes6.get(&(w.universe, dst6)) else {
            return Outcome::drop(DropReason::NotLocal);
        };
        let (sport, dport) = l4.ct_ports;
        let key = Ct6Key::new(w.vni, ip.src, ip.dst, sport, dport, ip.proto);
        // Unwrapped (EtherType IPv6) and rewritten for the receiver; see `judge_underlay`.
        let unwrapped = || {
            let mut inner = frame[..12].to_vec();
            inner.extend_from_slice(&ETHERTYPE_IPV6.to_be_bytes());
            inner.extend_from_slice(&frame[w.inner_ip_off..]);
            self.deliver(&inner, to)
        };
        let role = role6(ip.proto, l4.tcp_flags, l4.icmp_type_code.0);
        self.arrive(ct, now_ns, (&ip, &l4), key, role, (&from, to), unwrapped)
    }

    /// S1 for an IPv6 peer: any rule of any group of `ep` in `dir` that matches admits.
    fn allows6(
        &self,
        ep: &model::Endpoint,
        dir: Direction,
        peer: Ipv6Addr,
        proto: u8,
        l4: &L4,
    ) -> bool {
        self.admitting6(ep, dir, peer, proto, l4.dport, l4.icmp_type_code).next().is_some()
    }

    /// [`Host::admitting`] for a packet whose peer is the IPv6 address `peer`: a CIDR rule
    /// matches in its family only (`::/0` included, `0.0.0.0/0` never), a group peer by the
    /// IPv6 address of a member; `icmpv6` matches ICMPv6 (by type and code), `icmp` never. In a
    /// universe without IPv6 CIDRs nothing is admitted.
    pub fn admitting6<'s>(
        &'s self,
        ep: &'s model::Endpoint,
        dir: Direction,
        peer: Ipv6Addr,
        proto: u8,
        dport: u16,
        icmp: (u8, u8),
    ) -> impl Iterator<Item = (&'s model::SecurityGroup, &'s model::Rule)> + 's {
        let dual = self.state.universes.get(&ep.universe).is_some_and(|u| !u.ipv6_cidrs.is_empty());
        let groups = ep.security_groups.iter().filter(move |_| dual);
        groups.filter_map(|g| self.state.groups.get(g)).flat_map(move |g| {
            let rules = match dir {
                Direction::Ingress => &g.ingress,
                Direction::Egress => &g.egress,
            };
            rules
                .iter()
                .filter(move |r| {
                    r.direction == dir
                        && protocol_matches6(r, proto, dport, icmp)
                        && self.peer_matches6(&r.peer, &ep.universe, peer)
                })
                .map(move |r| (g, r))
        })
    }

    fn peer_matches6(&self, p: &Peer, universe: &str, addr: Ipv6Addr) -> bool {
        match p {
            Peer::Cidr(IpNetwork::V6(net)) => net.contains(addr),
            Peer::Cidr(IpNetwork::V4(_)) => false,
            Peer::Group(g) => self
                .members6
                .get(&(universe, addr))
                .is_some_and(|ep| ep.security_groups.iter().any(|m| m == g)),
        }
    }
}

/// The Ethernet frame of an ICMPv6 "packet too big" from the gateway (`gateway_mac`) to the
/// workload at `mac`: from `src` to `dst`, reporting `mtu`, quoting `quote`.
pub fn packet_too_big_frame(
    mac: &[u8; 6],
    gateway_mac: &[u8; 6],
    src: &[u8; 16],
    dst: &[u8; 16],
    mtu: u32,
    quote: &[u8],
) -> Vec<u8> {
    let len = 8 + quote.len();
    let mut out = Vec::with_capacity(ETH_HLEN + wire6::HLEN + len);
    out.extend_from_slice(mac);
    out.extend_from_slice(gateway_mac);
    out.extend_from_slice(&ETHERTYPE_IPV6.to_be_bytes());
    out.extend_from_slice(&[0x60, 0, 0, 0]);
    out.extend_from_slice(&(len as u16).to_be_bytes());
    out.extend_from_slice(&[IPPROTO_ICMPV6, PTB_HOP_LIMIT]);
    out.extend_from_slice(src);
    out.extend_from_slice(dst);
    let mut icmp = vec![ICMPV6_PACKET_TOO_BIG, 0, 0, 0];
    icmp.extend_from_slice(&mtu.to_be_bytes());
    icmp.extend_from_slice(quote);
    let mut pseudo = Vec::with_capacity(40 + icmp.len());
    pseudo.extend_from_slice(src);
    pseudo.extend_from_slice(dst);
    pseudo.extend_from_slice(&(len as u32).to_be_bytes());
    pseudo.extend_from_slice(&[0, 0, 0, IPPROTO_ICMPV6]);
    pseudo.extend_from_slice(&icmp);
    let c = checksum(&pseudo);
    icmp[2..4].copy_from_slice(&c.to_be_bytes());
    out.extend_from_slice(&icmp);
    out
}

/// S4 for an IPv6 packet: `all`; or the protocol number, then the ports (TCP/UDP) or the ICMPv6
/// type and code (`icmpv6` rules); an `icmp` rule concerns IPv4 and never matches.
fn protocol_matches6(r: &model::Rule, proto: u8, dport: u16, (ty, code): (u8, u8)) -> bool {
    match r.protocol {
        Protocol::All => true,
        Protocol::ICMP => false,
        Protocol::Number(n) if n != proto => false,
        Protocol::Number(IPPROTO_TCP | IPPROTO_UDP) => {
            r.ports.is_none_or(|(lo, hi)| (lo..=hi).contains(&dport))
        }
        Protocol::ICMPV6 => match r.icmp {
            None | Some((None, _)) => true,
            Some((Some(t), c)) => ty == t && c.is_none_or(|c| code == c),
        },
        Protocol::Number(_) => true,
    }
}

/// The flow quoted by an ICMPv6 error, from the bytes after its 8-byte header: a fixed IPv6
/// header (version 6) whose next header is the upper layer (an extension header there makes
/// the error unrelated) and the 8 bytes after it. Its key has VNI 0 and ports as a packet of
/// that flow would have them.
pub(super) fn parse_inner6(b: &[u8]) -> Option<Ct6Key> {
    if b.len() < wire6::HLEN + 8 || b[0] >> 4 != 6 {
        return None;
    }
    let proto = b[6];
    if wire6::next_kind(proto) != wire6::Next::Upper {
        return None;
    }
    let l4 = &b[wire6::HLEN..];
    let (sport, dport) = wire6::ct6_ports(proto, [l4[0], l4[1], l4[2], l4[3]], be16(l4, 4));
    let src: [u8; 16] = b[8..24].try_into().ok()?;
    let dst: [u8; 16] = b[24..40].try_into().ok()?;
    Some(Ct6Key::new(0, src, dst, sport, dport, proto))
}

impl Family for Ipv6 {
    type Key = Ct6Key;

    fn initial_state(&self) -> u8 {
        initial_state6(self.proto)
    }

    /// [`is_error6`] types, at most `ICMPV6_ERROR_MAX_LEN` (1280) bytes of IPv6 packet (RFC 4443
    /// 2.4 (c)).
    fn quoted(&self, l4: &L4, vni: u32) -> Option<Ct6Key> {
        let inner = l4.icmp_error_inner6.as_ref()?;
        let (ty, code) = l4.icmp_type_code;
        (is_error6(self.proto, ty, code)
            && self.len <= ICMPV6_ERROR_MAX_LEN
            && inner.src == self.dst
            && inner.dst == self.src)
            .then_some(Ct6Key { vni, ..*inner })
    }

    fn allows(&self, host: &Host<'_>, ep: &model::Endpoint, dir: Direction, l4: &L4) -> bool {
        let peer = match dir {
            Direction::Egress => self.dst,
            Direction::Ingress => self.src,
        };
        host.allows6(ep, dir, Ipv6Addr::from(peer), self.proto, l4)
    }

    fn too_big_error(
        &self,
        host: &Host<'_>,
        frame: &[u8],
        sender: &Local<'_>,
        mtu: u32,
    ) -> Outcome {
        host.packet_too_big(frame, sender, self, mtu)
    }

    fn outcome(verdict: Verdict, ct6: Option<CtUpdate6>) -> Outcome {
        Outcome { verdict, ct: None, ct6 }
    }
}
