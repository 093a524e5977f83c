//! `from_endpoint` ([`Host::judge`]): the walk of a packet a local endpoint sends, the one
//! description of it (`dataplane-ebpf/src/endpoint.rs` implements it). First failing check wins
//! (each step names the `DropReason` it can return):
//! 1. Frame shorter than an Ethernet header: `TruncatedEthernet`.
//! 2. The ingress ifindex is not a local endpoint of this host: `UnknownEndpoint`.
//! 3. Ethernet source is not the endpoint's MAC: `SpoofedMac`. Steps 2–3 come before the
//!    ethertype, so no frame of any type is answered or counted past them for a stranger or a
//!    forged source (aligned with `dataplane-ebpf`, whose order this is).
//! 4. Ethertype: ARP -> [`Verdict::ArpReply`] or `ArpUnanswered`; IPv6 -> the IPv6 walk
//!    (`ipv6.rs`: its header and extension headers, neighbour discovery at the gateway, then
//!    steps 6 and 8-14 over the IPv6 tables); anything but IPv4 (802.1Q tags and 802.3
//!    lengths included) -> `UnknownEthertype`.
//! 5. IPv4 header: shorter than 20 bytes, version != 4, IHL < 5, IHL*4 beyond the frame, total
//!    length below IHL*4 or beyond the frame: `MalformedIpv4`. Trailing Ethernet padding after
//!    the datagram is allowed. The header checksum is not verified (the receiving stack does).
//! 6. Source address is not the endpoint's: `SpoofedIp`.
//! 7. MF set or fragment offset non-zero: `Fragment`.
//! 8. L4 header beyond the *datagram* (total length, not the frame): TCP shorter than 20 bytes
//!    or than its data offset (or data offset < 5), UDP or ICMP shorter than 8: `MalformedL4`.
//! 9. Conntrack: the packet's key, then its reverse, as far as its [`Role`] allows (S7: a TCP
//!    SYN without ACK, RST or FIN, or an ICMP echo request, matches only a flow's original
//!    direction; an echo reply only its reply direction; other ICMP is never tracked); the first
//!    entry that is live (idle for less than its state's timeout) and whose endpoint on the
//!    sender's side is the sender (by serial) is the candidate. Its receiver must be the
//!    endpoint of the other side: no route -> `NoRoute`; a route to another endpoint (a later
//!    one with the same address) -> no hit, go on with 10. Hit -> send (14), entry refreshed.
//! 10. ICMP error related to a tracked flow (S6) -> route -> send; conntrack is not touched.
//!     Related: an error type and code ([`is_error`]: destination unreachable 0-15, time
//!     exceeded 0-1, parameter problem 0-2), at most `ICMP_ERROR_MAX_LEN` (576) bytes of IPv4
//!     (RFC 1812), quoting an IPv4 header and 8 bytes within the datagram whose source is the
//!     error's destination and whose destination is the error's source (the flow's peer answers
//!     about a packet it received; a third party's error is not related, whatever it quotes),
//!     to a destination with a route, that flow tracked either way between the error's receiver
//!     and its sender (a hit as in 9 for a packet of the quoted flow sent by the receiver).
//!     Anything else is ordinary ICMP (steps 11-14), never tracked.
//! 11. Egress rules of the sender (peer = destination): `PolicyEgress`.
//! 12. Destination must be an endpoint of the sender's universe with a route: `NoRoute` (also
//!     for conntrack hits and related errors).
//! 13. A local receiver's ingress rules (peer = source): `PolicyIngress`. (A receiver on
//!     another host applies its own, in its `from_underlay`.)
//! 14. Send. To a local receiver: Ethernet source = gateway MAC, destination = the receiver's
//!     MAC; nothing else in the frame changes (no TTL decrement) ([`Verdict::Deliver`]). To a
//!     receiver on another host: without an underlay `NoUnderlay`; a frame that would not fit the
//!     underlay MTU once wrapped (frame length + 50 - 14 > MTU, what `bpf_check_mtu` computes)
//!     is answered with ICMP "fragmentation needed" ([`Verdict::FragNeeded`], counted
//!     `FragNeeded`, or only counted when shorter than the 128-byte quote) and touches no flow;
//!     else wrapped ([`Verdict::Wrap`]). The conntrack entry is created (new flows) or
//!     refreshed (hits) only when the packet is sent; only a packet whose role begins flows
//!     creates one ([`creates`]: a TCP SYN, an echo request, UDP, other protocols), in its own
//!     direction, owned by the sender (S14): an entry of the sender's already under the key
//!     (expired, or bound to a receiver since deleted) is replaced; an entry of another owner
//!     there leaves the flow untracked (sent, no entry); otherwise, if the sender owns as many
//!     entries as its budget, `ConntrackBudgetExceeded` (after the route and MTU checks). Any
//!     other admitted packet is sent untracked (Linux conntrack with `nf_conntrack_tcp_loose =
//!     0`: no flow is picked up mid-stream).
//!

use super::*;

impl Host<'_> {
    /// Judges one frame received from the endpoint behind `ifindex`: the walk this module's
    /// documentation describes.
    pub fn judge(&self, ct: &Conntrack, now_ns: u64, ifindex: u32, frame: &[u8]) -> Outcome {
        if frame.len() < ETH_HLEN {
            return Outcome::drop(DropReason::TruncatedEthernet);
        }
        let Some(sender) = self.by_ifindex.get(&ifindex) else {
            return Outcome::drop(DropReason::UnknownEndpoint);
        };
        if frame[6..12] != sender.mac {
            return Outcome::drop(DropReason::SpoofedMac);
        }
        match be16(frame, 12) {
            ETHERTYPE_IPV4 => {}
            ETHERTYPE_ARP => return self.arp(frame, sender.ep.ip),
            ETHERTYPE_IPV6 => return self.judge6(ct, now_ns, sender, frame),
            _ => return Outcome::drop(DropReason::UnknownEthertype),
        }
        let pkt = match parse_ipv4(frame, ETH_HLEN) {
            Ok(p) => p,
            Err(reason) => return Outcome::drop(reason),
        };
        if pkt.src != sender.ep.ip {
            return Outcome::drop(DropReason::SpoofedIp);
        }
        if pkt.fragment {
            return Outcome::drop(DropReason::Fragment);
        }
        let l4 = match parse_l4(frame, &pkt) {
            Ok(l4) => l4,
            Err(reason) => return Outcome::drop(reason),
        };
        let (sport, dport) = l4.ct_ports;
        let key =
            CtKey::new(sender.vni, pkt.src.octets(), pkt.dst.octets(), sport, dport, pkt.proto);
        let universe = sender.ep.universe.as_str();
        let route = self.routes.get(&(universe, pkt.dst)).copied();
        let role = role(pkt.proto, l4.tcp_flags, l4.icmp_type_code.0);

        self.flow(ct, now_ns, sender, frame, (&pkt, &l4), key, route, role)
    }

    /// Steps 9-14, written once for both families (IPv6's step 5): the packet `pkt` with its
    /// upper-layer header `l4` and conntrack `key`, sent by `sender`, checked up to step 8;
    /// `route` is its destination's, `role` its part in flows.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn flow<P: Family>(
        &self,
        ct: &Conntrack,
        now_ns: u64,
        sender: &Local<'_>,
        frame: &[u8],
        (pkt, l4): (&P, &L4),
        key: P::Key,
        route: Option<Place<'_>>,
        role: Role,
    ) -> Outcome {
        let (hit, own) = ct.lookup_as(&key, role, sender.ep.serial, now_ns, &self.timeouts);
        if let Some(hit) = hit {
            let Some(to) = route else {
                return Outcome::drop(DropReason::NoRoute);
            };
            // Bound to the receiver too: an endpoint made since with the address is no hit.
            if to.serial() == receiver_serial(&hit.1, hit.2) {
                let update = refreshed(hit, now_ns, l4.tcp_flags);
                return self.send(frame, sender, pkt, to, Ok(Some(update)));
            }
        }
        let serials = |to: &Place<'_>| (sender.ep.serial, to.serial());
        let related =
            route.filter(|to| self.related(ct, now_ns, sender.vni, (pkt, l4), serials(to)));
        if let Some(to) = related {
            return self.send(frame, sender, pkt, to, Ok(None));
        }
        if !pkt.allows(self, sender.ep, Direction::Egress, l4) {
            return Outcome::drop(DropReason::PolicyEgress);
        }
        let Some(to) = route else {
            return Outcome::drop(DropReason::NoRoute);
        };
        if let Place::Local(l) = to {
            if !pkt.allows(self, l.ep, Direction::Ingress, l4) {
                return Outcome::drop(DropReason::PolicyIngress);
            }
        }
        let created = if creates(role) {
            let entry = CtEntry {
                last_seen_ns: now_ns,
                src_serial: sender.ep.serial,
                dst_serial: to.serial(),
                owner_slot: sender.ep.slot,
                state: pkt.initial_state(),
                owner: ct_owner::SRC,
                _pad: [0; 2],
            };
            create(ct, key, own, entry, sender.ep.conntrack_budget)
        } else {
            Ok(None)
        };
        self.send(frame, sender, pkt, to, created)
    }

    /// Step 10: whether `pkt` is an ICMP error ([`Family::quoted`]) about a flow tracked either
    /// way between the very endpoints (serials) that send and receive it, `(sender, receiver)`:
    /// the quoted packet went from the error's receiver to its sender (S7).
    pub(super) fn related<P: Family>(
        &self,
        ct: &Conntrack,
        now_ns: u64,
        vni: u32,
        (pkt, l4): (&P, &L4),
        (sender, receiver): (u64, u64),
    ) -> bool {
        pkt.quoted(l4, vni).is_some_and(|key| {
            let (hit, _) = ct.lookup(&key, receiver, now_ns, &self.timeouts);
            hit.is_some_and(|(_, e, dir)| receiver_serial(&e, dir) == sender)
        })
    }

    /// Step 14 of `from_endpoint` (IPv6's step 6): delivers to a local receiver, or wraps for
    /// another host (answering the family's "too big" error instead when the wrapped frame would
    /// not fit). `ct` is the conntrack write of a packet that is sent; it is dropped with the
    /// packet otherwise. It is an error when a new flow is refused for its owner's budget (S14):
    /// that drop comes after the checks of the route and the MTU, as in the kernel.
    fn send<P: Family>(
        &self,
        frame: &[u8],
        sender: &Local<'_>,
        pkt: &P,
        to: Place<'_>,
        ct: Result<Option<CtWrite<P::Key>>, DropReason>,
    ) -> Outcome {
        let remote = match (to, ct) {
            (Place::Local(_), Err(reason)) => return Outcome::drop(reason),
            (Place::Local(l), Ok(ct)) => return P::outcome(self.deliver(frame, &l), ct),
            (Place::Remote(r), _) => r,
        };
        let Some(underlay) = self.underlay else {
            return Outcome::drop(DropReason::NoUnderlay);
        };
        if too_big(frame, &underlay) {
            return pkt.too_big_error(self, frame, sender, underlay.mtu);
        }
        match ct {
            Ok(ct) => P::outcome(self.wrap(frame, sender, &remote, &underlay), ct),
            Err(reason) => Outcome::drop(reason),
        }
    }

    /// `frame` (IPv4 or IPv6) wrapped by `sender` for `remote` over `underlay` (the wire format
    /// of the README): the frame's Ethernet header as the outer one, type IPv4; outer IPv4,
    /// UDP to 4789, VXLAN-GBP with the sender's identity and universe; the inner Ethernet
    /// header from the gateway to the receiver, of the frame's own EtherType; the packet.
    pub(super) fn wrap(
        &self,
        frame: &[u8],
        sender: &Local<'_>,
        remote: &Remote,
        underlay: &Underlay,
    ) -> Verdict {
        let outer_len = frame.len() - ETH_HLEN + ENCAP_OVERHEAD as usize;
        let mut out = Vec::with_capacity(frame.len() + ENCAP_OVERHEAD as usize);
        // The outer Ethernet header is the packet's own, type IPv4 (the neighbour subsystem
        // writes the addresses after the program).
        out.extend_from_slice(&frame[..12]);
        out.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        let mut ip = vec![0x45, 0];
        ip.extend_from_slice(&(outer_len as u16).to_be_bytes());
        ip.extend_from_slice(&[0, 0, 0x40, 0, 64, IPPROTO_UDP, 0, 0]);
        ip.extend_from_slice(&underlay.ip.octets());
        ip.extend_from_slice(&remote.underlay.octets());
        let c = checksum(&ip);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        out.extend_from_slice(&ip);
        out.extend_from_slice(&[0, 0]); // source port: a flow hash, see `Verdict::Wrap`
        out.extend_from_slice(&VXLAN_PORT.to_be_bytes());
        out.extend_from_slice(&((outer_len - 20) as u16).to_be_bytes());
        out.extend_from_slice(&[0, 0]);
        let vni = sender.vni.to_be_bytes();
        out.extend_from_slice(&[0x88, 0]);
        out.extend_from_slice(&(sender.ep.identity as u16).to_be_bytes());
        out.extend_from_slice(&[vni[1], vni[2], vni[3], 0]);
        out.extend_from_slice(&remote.mac);
        out.extend_from_slice(&self.gateway_mac);
        out.extend_from_slice(&frame[12..14]);
        out.extend_from_slice(&frame[ETH_HLEN..]);
        Verdict::Wrap { frame: out }
    }

    /// The ICMP "fragmentation needed" (type 3 code 4, RFC 1191) that `from_endpoint` sends back
    /// for a packet too big to wrap: from the packet's destination to the sender, quoting the
    /// first 128 bytes of the packet, next-hop MTU = underlay MTU - 50. A datagram shorter than
    /// the quote (a frame too big only by its padding) gets no error: it is dropped as
    /// `frag_needed_unsent`, the error that could not be built, as the kernel counts it.
    fn frag_needed(&self, frame: &[u8], sender: &Local<'_>, pkt: &Ipv4, mtu: u32) -> Outcome {
        const QUOTE: usize = 128;
        if pkt.end < ETH_HLEN + QUOTE {
            return Outcome::drop(DropReason::FragNeededUnsent);
        }
        let mut out = Vec::with_capacity(ETH_HLEN + 28 + QUOTE);
        out.extend_from_slice(&sender.mac);
        out.extend_from_slice(&self.gateway_mac);
        out.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        let mut ip = vec![0x45, 0xc0];
        ip.extend_from_slice(&((20 + 8 + QUOTE) as u16).to_be_bytes());
        ip.extend_from_slice(&[0, 0, 0, 0, 64, IPPROTO_ICMP, 0, 0]);
        ip.extend_from_slice(&pkt.dst.octets());
        ip.extend_from_slice(&sender.ep.ip.octets());
        let c = checksum(&ip);
        ip[10..12].copy_from_slice(&c.to_be_bytes());
        out.extend_from_slice(&ip);
        let next_hop = mtu.saturating_sub(ENCAP_OVERHEAD).min(0xffff) as u16;
        let mut icmp = vec![ICMP_DEST_UNREACH, 4, 0, 0, 0, 0];
        icmp.extend_from_slice(&next_hop.to_be_bytes());
        icmp.extend_from_slice(&frame[ETH_HLEN..ETH_HLEN + QUOTE]);
        let c = checksum(&icmp);
        icmp[2..4].copy_from_slice(&c.to_be_bytes());
        out.extend_from_slice(&icmp);
        Outcome { verdict: Verdict::FragNeeded { frame: out }, ct: None, ct6: None }
    }
    /// ARP proxy: every well-formed Ethernet/IPv4 request whose target is not the endpoint's
    /// own address (duplicate-address probes, RFC 5227, and announcements stay unanswered) is
    /// answered with the gateway MAC, in place: Ethernet destination = the request's source,
    /// trailing padding kept.
    fn arp(&self, frame: &[u8], own: Ipv4Addr) -> Outcome {
        let a = ETH_HLEN;
        if frame.len() < a + ARP_LEN {
            return Outcome::drop(DropReason::ArpUnanswered);
        }
        let well_formed = be16(frame, a) == 1 // htype Ethernet
            && be16(frame, a + 2) == ETHERTYPE_IPV4
            && frame[a + 4] == 6
            && frame[a + 5] == 4
            && be16(frame, a + 6) == 1; // request
        let sha = &frame[a + 8..a + 14];
        let spa = &frame[a + 14..a + 18];
        let tpa = &frame[a + 24..a + 28];
        if !well_formed || tpa == own.octets() {
            return Outcome::drop(DropReason::ArpUnanswered);
        }
        let mut out = frame.to_vec();
        let (eth_src, sha, spa, tpa) =
            (frame[6..12].to_vec(), sha.to_vec(), spa.to_vec(), tpa.to_vec());
        out[0..6].copy_from_slice(&eth_src);
        out[6..12].copy_from_slice(&self.gateway_mac);
        out[a + 6..a + 8].copy_from_slice(&2u16.to_be_bytes());
        out[a + 8..a + 14].copy_from_slice(&self.gateway_mac);
        out[a + 14..a + 18].copy_from_slice(&tpa);
        out[a + 18..a + 24].copy_from_slice(&sha);
        out[a + 24..a + 28].copy_from_slice(&spa);
        Outcome { verdict: Verdict::ArpReply { frame: out }, ct: None, ct6: None }
    }
}

/// The write that refreshes the entry of a conntrack hit `(stored key, entry, direction)` for a
/// packet with `tcp_flags` sent at `now_ns`.
pub(super) fn refreshed<K>(
    (key, entry, dir): (K, CtEntry, CtDirection),
    now_ns: u64,
    tcp_flags: u8,
) -> CtWrite<K> {
    let state = next_state(entry.state, dir == CtDirection::Reply, tcp_flags);
    CtWrite { key, entry: CtEntry { last_seen_ns: now_ns, state, ..entry } }
}

/// Whether `frame` would not fit the underlay MTU once wrapped: what `bpf_check_mtu` computes,
/// the frame plus the overhead against the MTU plus the Ethernet header.
pub(super) fn too_big(frame: &[u8], underlay: &Underlay) -> bool {
    frame.len() + ENCAP_OVERHEAD as usize > underlay.mtu as usize + ETH_HLEN
}

/// What steps 9-14 ([`Host::flow`]) need of a packet's family, so that they are written once:
/// IPv4's here, IPv6's in `ipv6.rs`.
pub(super) trait Family {
    /// The family's conntrack key.
    type Key: TableKey;

    /// The state a new flow of this packet's protocol starts in.
    fn initial_state(&self) -> u8;

    /// Step 10 (S6): if this packet is an ICMP error of the family's types, no longer than a
    /// router's, quoting a packet from its destination to its source (the flow's peer answering
    /// about a packet it received), that quoted flow's key in universe `vni`.
    fn quoted(&self, l4: &L4, vni: u32) -> Option<Self::Key>;

    /// S1: whether a rule of `ep`'s groups in `dir` admits the packet (the peer is its
    /// destination for egress, its source for ingress).
    fn allows(&self, host: &Host<'_>, ep: &model::Endpoint, dir: Direction, l4: &L4) -> bool;

    /// The family's error for a packet too big to wrap for an underlay of `mtu`.
    fn too_big_error(&self, host: &Host<'_>, frame: &[u8], sender: &Local<'_>, mtu: u32)
        -> Outcome;

    /// The outcome of a packet sent with the conntrack write `ct` to the family's table.
    fn outcome(verdict: Verdict, ct: Option<CtWrite<Self::Key>>) -> Outcome;
}

impl Family for Ipv4 {
    type Key = CtKey;

    fn initial_state(&self) -> u8 {
        initial_state(self.proto)
    }

    /// [`is_error`] types, at most `ICMP_ERROR_MAX_LEN` (576) bytes of IPv4 (RFC 1812).
    fn quoted(&self, l4: &L4, vni: u32) -> Option<CtKey> {
        let inner = l4.icmp_error_inner.as_ref()?;
        let (ty, code) = l4.icmp_type_code;
        (is_error(self.proto, ty, code)
            && self.total <= ICMP_ERROR_MAX_LEN
            && inner.src == self.dst.octets()
            && inner.dst == self.src.octets())
        .then(|| inner.in_universe(vni))
    }

    fn allows(&self, host: &Host<'_>, ep: &model::Endpoint, dir: Direction, l4: &L4) -> bool {
        let peer = match dir {
            Direction::Egress => self.dst,
            Direction::Ingress => self.src,
        };
        host.allows(ep, dir, peer, self.proto, l4)
    }

    fn too_big_error(
        &self,
        host: &Host<'_>,
        frame: &[u8],
        sender: &Local<'_>,
        mtu: u32,
    ) -> Outcome {
        host.frag_needed(frame, sender, self, mtu)
    }

    fn outcome(verdict: Verdict, ct: Option<CtUpdate>) -> Outcome {
        Outcome { verdict, ct, ct6: None }
    }
}
