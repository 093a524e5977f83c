//! `from_underlay` ([`Host::judge_underlay`]): the walk of a frame the host receives from its
//! network, the one description of it (`dataplane-ebpf/src/underlay.rs` implements it). It takes
//! the encapsulated traffic of other hosts' endpoints (the wire format of the README), judges it
//! with the receiver's ingress rules, unwraps it and delivers it into the receiver's namespace.
//!
//! The underlay is the host's own network (the API, etcd, ssh ride on it): anything that is not
//! an IPv4/UDP packet to this host's underlay address on port 4789 is [`Verdict::Pass`], as are
//! non-first fragments (no UDP header to tell). What is addressed to the VXLAN port of this host
//! is Verse's, and from then on the walk fails closed (the first failing step drops with its
//! `DropReason`):
//! 1. Outer IPv4 without options and not a first fragment (we never send either), total length
//!    within the frame, UDP length = IPv4 payload length, the VXLAN header and inner Ethernet
//!    header present, VXLAN flags exactly G | I (`MalformedEncap`).
//! 2. The outer source is a host of the fleet (`UnknownHost`, S10).
//! 3. The VNI is a universe of the fleet (`UnknownUniverse`).
//! 4. The inner frame is parsed like a workload's (`endpoint.rs`, steps 4-8): inner IPv6 takes
//!    the IPv6 walk from here on (`ipv6.rs`, "From the underlay": steps 4-10 over the IPv6
//!    tables); not IPv4 `UnknownEthertype`, then `MalformedIpv4`, `Fragment`, `MalformedL4`.
//! 5. The inner source is an endpoint placed on the sending host: its route is remote with the
//!    outer source as underlay (`NotPlacedOnSender`, S10).
//! 6. The Group Policy ID of the VXLAN-GBP header is the identity the control plane gives that
//!    endpoint, the one in its route (`IdentityMismatch`, S10): the header is a claim the sender
//!    makes, checked, never believed.
//! 7. The inner destination is an endpoint of this host (`NotLocal`).
//! 8. Conntrack hit (live, and bound to the inner source and destination endpoints, S7) on the
//!    packet's key or its reverse, as far as its role allows (`conntrack.rs`) -> refreshed and
//!    delivered (S6); an ICMP error related to a tracked flow (as in `from_endpoint`: its inner
//!    source, placed on the sending host by step 5, is the quoted packet's destination) ->
//!    delivered.
//! 9. Otherwise the receiver's ingress rules with the inner source as peer (its groups; then
//!    its CIDR class) (`PolicyIngress`); a packet whose role begins flows creates its conntrack
//!    entry, owned by the receiver and charged to its budget (`ConntrackBudgetExceeded` when it
//!    is spent, S14); any other is delivered untracked.
//! 10. Unwrapped (`EncapFailed` in the kernel, which the model cannot foresee) and delivered:
//!     Ethernet source = gateway MAC, destination = the receiver's MAC ([`Verdict::Deliver`]).
//!     The unwrap comes before the conntrack write of steps 8 and 9, so that a packet it drops
//!     never refreshes or creates a flow; a flow refused for its owner's budget is refused
//!     after the unwrap.

use super::endpoint::{refreshed, Family};
use super::*;

impl Host<'_> {
    /// Judges one frame received on the underlay interface: the walk this module's
    /// documentation describes.
    pub fn judge_underlay(&self, ct: &Conntrack, now_ns: u64, frame: &[u8]) -> Outcome {
        const IP_MIN: usize = 20;
        const UDP_LEN: usize = 8;
        /// Offsets in a wrapped frame: the VXLAN header, the inner Ethernet and IPv4 headers.
        const VXLAN_OFF: usize = ETH_HLEN + IP_MIN + UDP_LEN;
        const INNER_ETH_OFF: usize = VXLAN_OFF + 8;
        const INNER_IP_OFF: usize = INNER_ETH_OFF + ETH_HLEN;
        let pass = Outcome { verdict: Verdict::Pass, ct: None, ct6: None };
        if frame.len() < ETH_HLEN + IP_MIN {
            return pass;
        }
        let ip = &frame[ETH_HLEN..];
        let ihl = usize::from(ip[0] & 0x0f) * 4;
        let total = usize::from(be16(ip, 2));
        let frag = be16(ip, 6);
        let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
        let Some(underlay) = self.underlay else {
            return pass;
        };
        if be16(frame, 12) != ETHERTYPE_IPV4
            || ip[0] >> 4 != 4
            || ihl < IP_MIN
            || ip[9] != IPPROTO_UDP
            || frag & 0x1fff != 0
            || dst != underlay.ip
        {
            return pass;
        }
        let udp_off = ETH_HLEN + ihl;
        if frame.len() < udp_off + UDP_LEN || be16(frame, udp_off + 2) != VXLAN_PORT {
            return pass;
        }
        // Verse's from here on.
        if ihl != IP_MIN
            || frag & 0x2000 != 0
            || ETH_HLEN + total > frame.len()
            || total < ENCAP_OVERHEAD as usize
            || usize::from(be16(frame, udp_off + 4)) != total - IP_MIN
            || frame.len() < INNER_IP_OFF
        {
            return Outcome::drop(DropReason::MalformedEncap);
        }
        let outer_src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
        if !self.hosts.contains(&outer_src) {
            return Outcome::drop(DropReason::UnknownHost);
        }
        if frame[VXLAN_OFF] != 0x88 {
            return Outcome::drop(DropReason::MalformedEncap);
        }
        let claimed = u32::from(be16(frame, VXLAN_OFF + 2));
        let vni = u32::from_be_bytes([
            0,
            frame[VXLAN_OFF + 4],
            frame[VXLAN_OFF + 5],
            frame[VXLAN_OFF + 6],
        ]);
        let Some(&universe) = self.vnis.get(&vni) else {
            return Outcome::drop(DropReason::UnknownUniverse);
        };
        match be16(frame, INNER_ETH_OFF + 12) {
            ETHERTYPE_IPV4 => {}
            ETHERTYPE_IPV6 => {
                let w = ipv6::Wrapped {
                    host: outer_src,
                    universe,
                    vni,
                    claimed,
                    inner_ip_off: INNER_IP_OFF,
                };
                return self.judge_underlay6(ct, now_ns, frame, &w);
            }
            _ => return Outcome::drop(DropReason::UnknownEthertype),
        }
        let pkt = match parse_ipv4(frame, INNER_IP_OFF) {
            Ok(p) => p,
            Err(reason) => return Outcome::drop(reason),
        };
        if pkt.fragment {
            return Outcome::drop(DropReason::Fragment);
        }
        let l4 = match parse_l4(frame, &pkt) {
            Ok(l4) => l4,
            Err(reason) => return Outcome::drop(reason),
        };
        let from = match self.routes.get(&(universe, pkt.src)) {
            Some(Place::Remote(r)) if r.underlay == outer_src => *r,
            _ => return Outcome::drop(DropReason::NotPlacedOnSender),
        };
        if from.identity != claimed {
            return Outcome::drop(DropReason::IdentityMismatch);
        }
        let Some(Place::Local(to)) = self.routes.get(&(universe, pkt.dst)) else {
            return Outcome::drop(DropReason::NotLocal);
        };
        let (sport, dport) = l4.ct_ports;
        let key = CtKey::new(vni, pkt.src.octets(), pkt.dst.octets(), sport, dport, pkt.proto);
        // Unwrapped and rewritten for the receiver. In the kernel `bpf_skb_adjust_room` may
        // still refuse (`EncapFailed`) for causes the frame does not show (memory, GSO): the
        // model cannot tell when, only that such a drop takes no conntrack write with it.
        let unwrapped = || {
            let mut inner = frame[..ETH_HLEN].to_vec();
            inner.extend_from_slice(&frame[INNER_IP_OFF..]);
            self.deliver(&inner, to)
        };
        let role = role(pkt.proto, l4.tcp_flags, l4.icmp_type_code.0);
        self.arrive(ct, now_ns, (&pkt, &l4), key, role, (&from, to), unwrapped)
    }

    /// Steps 8-10, written once for both families (IPv6's "From the underlay"): the packet
    /// `pkt` with its upper-layer header `l4` and conntrack `key` (its universe's), of `role`,
    /// from the remote endpoint `from` to the local one `to`; `unwrapped` is its delivery. The
    /// conntrack write goes with the packet: one that is dropped never creates or refreshes a
    /// flow (the kernel programs unwrap first, write the flow second, and redirect, which cannot
    /// refuse, last).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn arrive<P: Family>(
        &self,
        ct: &Conntrack,
        now_ns: u64,
        (pkt, l4): (&P, &L4),
        key: P::Key,
        role: Role,
        (from, to): (&Remote, &Local<'_>),
        unwrapped: impl Fn() -> Verdict,
    ) -> Outcome {
        let (hit, own) = ct.lookup_as(&key, role, from.serial, now_ns, &self.timeouts);
        if let Some(hit) = hit.filter(|h| receiver_serial(&h.1, h.2) == to.ep.serial) {
            return P::outcome(unwrapped(), Some(refreshed(hit, now_ns, l4.tcp_flags)));
        }
        let serials = (from.serial, to.ep.serial);
        if self.related(ct, now_ns, key.vni(), (pkt, l4), serials) {
            return P::outcome(unwrapped(), None);
        }
        if !pkt.allows(self, to.ep, Direction::Ingress, l4) {
            return Outcome::drop(DropReason::PolicyIngress);
        }
        if !creates(role) {
            return P::outcome(unwrapped(), None);
        }
        // Charged to the local receiver (S14), after the unwrap (step 10).
        let entry = CtEntry {
            last_seen_ns: now_ns,
            src_serial: from.serial,
            dst_serial: to.ep.serial,
            owner_slot: to.ep.slot,
            state: pkt.initial_state(),
            owner: ct_owner::DST,
            _pad: [0; 2],
        };
        let verdict = unwrapped();
        match create(ct, key, own, entry, to.ep.conntrack_budget) {
            Ok(update) => P::outcome(verdict, update),
            Err(reason) => Outcome::drop(reason),
        }
    }
}
