//! The security-group rules as the model applies them (S1-S5): from the high-level state, never
//! from the compiled maps, so that the differential test catches compiler bugs.

use super::*;

impl<'a> Host<'a> {
    /// S1: any rule of any group of `ep` in `dir` that matches the packet and the peer allows.
    pub(super) fn allows(
        &self,
        ep: &model::Endpoint,
        dir: Direction,
        peer: Ipv4Addr,
        proto: u8,
        l4: &L4,
    ) -> bool {
        self.admitting(ep, dir, peer, proto, l4.dport, l4.icmp_type_code).next().is_some()
    }

    /// The rules of `ep`'s groups in `dir` that admit a packet of protocol `proto` (TCP/UDP
    /// destination port `dport`, ICMP type and code `icmp`) whose peer (destination for
    /// egress, source for ingress) is `peer`: the groups in the endpoint's order, each group's
    /// rules in their order. Any one of them admits the packet (S1); `verse trace` names the
    /// first.
    pub fn admitting<'s>(
        &'s self,
        ep: &'s model::Endpoint,
        dir: Direction,
        peer: Ipv4Addr,
        proto: u8,
        dport: u16,
        icmp: (u8, u8),
    ) -> impl Iterator<Item = (&'a model::SecurityGroup, &'a model::Rule)> + 's {
        let l4 = L4 {
            ct_ports: (0, 0),
            dport,
            icmp_type_code: icmp,
            tcp_flags: 0,
            icmp_error_inner: None,
            icmp_error_inner6: None,
        };
        ep.security_groups.iter().filter_map(|g| self.state.groups.get(g)).flat_map(move |g| {
            let rules = match dir {
                Direction::Ingress => &g.ingress,
                Direction::Egress => &g.egress,
            };
            let l4 = l4.clone();
            rules
                .iter()
                .filter(move |r| {
                    r.direction == dir
                        && protocol_matches(r, proto, &l4)
                        && self.peer_matches(&r.peer, &ep.universe, peer)
                })
                .map(move |r| (g, r))
        })
    }

    /// A CIDR peer matches by containment (v6 CIDRs never match IPv4); a group peer matches the
    /// address of an endpoint of the same universe that is a member now (S5).
    fn peer_matches(&self, p: &Peer, universe: &str, addr: Ipv4Addr) -> bool {
        match p {
            Peer::Cidr(IpNetwork::V4(net)) => net.contains(addr),
            Peer::Cidr(IpNetwork::V6(_)) => false,
            Peer::Group(g) => self
                .members
                .get(&(universe, addr))
                .is_some_and(|ep| ep.security_groups.iter().any(|m| m == g)),
        }
    }
}

/// S4: `all`; or the protocol number, then the port range (TCP/UDP, destination port) or the
/// ICMP type and code. `icmpv6` rules concern IPv6 and never match an IPv4 packet.
fn protocol_matches(r: &model::Rule, proto: u8, l4: &L4) -> bool {
    match r.protocol {
        Protocol::All => true,
        Protocol::Number(58) => false,
        Protocol::Number(n) if n != proto => false,
        Protocol::Number(IPPROTO_TCP | IPPROTO_UDP) => {
            r.ports.is_none_or(|(lo, hi)| (lo..=hi).contains(&l4.dport))
        }
        Protocol::Number(IPPROTO_ICMP) => match r.icmp {
            None | Some((None, _)) => true,
            Some((Some(t), c)) => {
                l4.icmp_type_code.0 == t && c.is_none_or(|c| l4.icmp_type_code.1 == c)
            }
        },
        Protocol::Number(_) => true,
    }
}
