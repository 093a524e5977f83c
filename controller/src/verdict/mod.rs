//! Reference model of the dataplane's verdict on one packet, and the one description of the
//! packet walk: the kernel programs (`dataplane-ebpf`) do what these modules say, and their docs
//! point here instead of retelling it. Pure: no I/O, no clock; the caller passes `now_ns`.
//!
//! By hook, as the kernel programs are:
//! - `endpoint.rs`: `from_endpoint`, a packet sent by a local endpoint ([`Host::judge`]);
//! - `underlay.rs`: `from_underlay`, a frame received on the underlay ([`Host::judge_underlay`]);
//! - `conntrack.rs`: the connection-tracking table both hooks share ([`Conntrack`]): roles,
//!   states, timeouts, binding to endpoints, budgets, related ICMP errors;
//! - `policy.rs`: the security-group rules (S1-S5);
//! - `ipv6.rs`: both hooks for IPv6 ([`Host::judge`] and [`Host::judge_underlay`] hand it
//!   every IPv6 frame): neighbour discovery at the gateway, then IPv4's steps over the IPv6
//!   tables, wrapped and unwrapped between hosts as IPv4 is;
//! - `parse.rs`: the IPv4, IPv6 and L4 headers, parsed as the kernel parses them.
//!
//! Contract: the model decides from the *semantics* (README, "Concepts", S1–S11) and the
//! high-level [`State`] — groups, rules, CIDR containment, membership through
//! `Endpoint::security_groups` — never from the compiled maps, so that a differential test of
//! the kernel programs against this model catches compiler bugs (the nested-CIDR trap: one
//! address matching a /8, a /16, a /24 and a group peer at once must be allowed if *any* of them
//! allows, S1). The connection-tracking table is the model's own ([`Conntrack`]), keyed exactly
//! like `VERSE_CT` (`dataplane_common::CtKey`) and shared by both hooks as the map is: original
//! direction, reverse lookup, ICMP echo by identifier.
//!
//! Routes: a local endpoint (plumbed: it has a host-side ifindex) is reached by delivery into its
//! namespace; an endpoint placed on another host that has an underlay address is reached by
//! wrapping (the wire format of the README), when this host has an underlay ([`Underlay`]).
//!
//! A packet that is dropped never creates or refreshes a conntrack entry: the frame work that
//! can still fail comes before the conntrack write, which goes only with a sent packet
//! ([`Outcome`]). Entries leave the table only through [`Conntrack::collect`], the controller's
//! garbage collection.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::{Ipv4Addr, Ipv6Addr};

use dataplane_common::{
    ct_owner, ct_ports, ct_state, icmp_ct_ports, Config, CtEntry, CtKey, DropReason,
    ENCAP_OVERHEAD, ICMP_ERROR_MAX_LEN, VXLAN_PORT,
};
use ipnetwork::IpNetwork;

use crate::model::{self, parse_mac, Direction, Peer, Protocol, State};

use dataplane_common::wire::{
    checksum, ICMP_DEST_UNREACH, ICMP_PARAMETER_PROBLEM, ICMP_TIME_EXCEEDED, IP_MF_OFFSET_MASK,
};
pub use dataplane_common::wire::{
    ARP_LEN, ETHERTYPE_ARP, ETHERTYPE_IPV4, ETHERTYPE_IPV6, ETH_HLEN, IPPROTO_ICMP, IPPROTO_TCP,
    IPPROTO_UDP,
};

mod conntrack;
mod endpoint;
mod ipv6;
mod parse;
mod policy;
#[cfg(test)]
mod tests;
mod underlay;

use conntrack::{create, receiver_serial};
pub use conntrack::{
    creates, initial_state, is_error, is_garbage, next_state, role, Conntrack, CtDirection, CtHit,
    CtUpdate, CtUpdate6, CtWrite, Found, Role, TableKey, Timeouts,
};
use parse::{be16, parse_ipv4, parse_l4, Ipv4, L4};

/// What the dataplane does with the packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Redirected into the namespace of the endpoint behind `ifindex`, as `frame`.
    Deliver {
        ifindex: u32,
        frame: Vec<u8>,
    },
    /// The gateway's answer to a neighbour query, sent back out of the ingress interface: an
    /// ARP reply, or an ICMPv6 neighbour advertisement.
    ArpReply {
        frame: Vec<u8>,
    },
    /// Wrapped for another host and handed to the underlay, as `frame`. The outer UDP source
    /// port (bytes 34..36) is a hash of the flow the kernel computes: the model leaves it 0 and
    /// a comparison must skip it (it is in 49152..=65535).
    Wrap {
        frame: Vec<u8>,
    },
    /// Refused as too big to wrap and answered with an ICMP "fragmentation needed" (an ICMPv6
    /// "packet too big" for IPv6), `frame`, sent back into the sender's namespace; counted as
    /// `DropReason::FragNeeded`.
    FragNeeded {
        frame: Vec<u8>,
    },
    /// Not Verse's: passed on untouched (`from_underlay` only).
    Pass,
    Drop(DropReason),
}

/// The verdict and what it does to the conntrack table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub verdict: Verdict,
    pub ct: Option<CtUpdate>,
    /// The write to the IPv6 table (`VERSE_CT6`), for an IPv6 packet.
    pub ct6: Option<CtUpdate6>,
}

impl Outcome {
    fn drop(reason: DropReason) -> Outcome {
        Outcome { verdict: Verdict::Drop(reason), ct: None, ct6: None }
    }
}

/// A local endpoint as the model needs it (its serial, slot and budget are `ep`'s).
#[derive(Clone, Copy, Debug)]
struct Local<'a> {
    ep: &'a model::Endpoint,
    ifindex: u32,
    mac: [u8; 6],
    vni: u32,
}

/// An endpoint placed on another host, reached over the underlay.
#[derive(Clone, Copy, Debug)]
struct Remote {
    /// The identity the control plane gives it: the only one its frames may claim (S10).
    identity: u32,
    mac: [u8; 6],
    /// The underlay address of its host.
    underlay: Ipv4Addr,
    /// Its serial (S7).
    serial: u64,
}

/// Where an address of a universe lives, as this host's routes say.
#[derive(Clone, Copy, Debug)]
enum Place<'a> {
    Local(Local<'a>),
    Remote(Remote),
}

impl Place<'_> {
    /// The serial of the endpoint there (S7).
    fn serial(&self) -> u64 {
        match self {
            Place::Local(l) => l.ep.serial,
            Place::Remote(r) => r.serial,
        }
    }
}

/// This host's underlay, when it has one (`Config::underlay_ifindex != 0`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Underlay {
    /// This host's underlay address: the outer source of what it wraps, the outer destination
    /// of what it accepts.
    pub ip: Ipv4Addr,
    /// MTU of the underlay interface (outer IPv4 packet size).
    pub mtu: u32,
}

/// One host's view of the desired state: the environment every verdict is judged in.
#[derive(Clone, Debug)]
pub struct Host<'a> {
    state: &'a State,
    by_ifindex: BTreeMap<u32, Local<'a>>,
    /// (universe id, address) -> where a packet to that address goes.
    routes: HashMap<(&'a str, Ipv4Addr), Place<'a>>,
    /// (universe id, address) -> endpoint anywhere: whose group membership a peer address has.
    members: HashMap<(&'a str, Ipv4Addr), &'a model::Endpoint>,
    /// The same two by IPv6 address (`VERSE_ROUTES6`), for the endpoints that have one.
    routes6: HashMap<(&'a str, Ipv6Addr), Place<'a>>,
    members6: HashMap<(&'a str, Ipv6Addr), &'a model::Endpoint>,
    /// VNI -> universe id, for every universe with an endpoint here (as `VERSE_VNIS`).
    vnis: HashMap<u32, &'a str>,
    /// Underlay addresses of the other hosts holding an endpoint of a universe with an endpoint
    /// here (as `VERSE_HOSTS`).
    hosts: BTreeSet<Ipv4Addr>,
    underlay: Option<Underlay>,
    gateway_mac: [u8; 6],
    timeouts: Timeouts,
}

impl<'a> Host<'a> {
    /// `local` maps the host-side ifindex of each plumbed endpoint to its id. Endpoints of
    /// this host that are not in it, unknown ids, or ones whose universe or MAC is invalid are
    /// left out (their packets are `UnknownEndpoint`, and nothing is delivered to them).
    /// Endpoints placed on other hosts with an underlay address are routes over the underlay
    /// (as the compiler makes them); this host has no underlay until [`Host::with_underlay`].
    pub fn new(
        state: &'a State,
        host: &str,
        local: &BTreeMap<u32, String>,
        gateway_mac: [u8; 6],
        timeouts: Timeouts,
    ) -> Host<'a> {
        let mut by_ifindex = BTreeMap::new();
        let mut routes = HashMap::new();
        let mut routes6 = HashMap::new();
        let mut underlays = HashMap::new();
        for record in state.hosts.values() {
            if let Some(ip) = record.underlay_ip.filter(|_| record.name != host) {
                underlays.insert(record.name.as_str(), ip);
            }
        }
        for (&ifindex, id) in local {
            let Some(ep) = state.endpoints.get(id) else {
                continue;
            };
            if ep.host != host {
                continue;
            }
            let Some(uni) = state.universes.get(&ep.universe) else {
                continue;
            };
            let Some(mac) = parse_mac(&ep.mac) else {
                continue;
            };
            let l = Local { ep, ifindex, mac, vni: uni.vni };
            by_ifindex.insert(ifindex, l);
            routes.insert((ep.universe.as_str(), ep.ip), Place::Local(l));
            if let Some(ip6) = ep.ipv6 {
                routes6.insert((ep.universe.as_str(), ip6), Place::Local(l));
            }
        }
        for ep in state.endpoints.values().filter(|e| e.host != host) {
            let (Some(&underlay), Some(mac)) =
                (underlays.get(ep.host.as_str()), parse_mac(&ep.mac))
            else {
                continue;
            };
            if state.universes.contains_key(&ep.universe) {
                let remote = Place::Remote(Remote {
                    identity: ep.identity,
                    mac,
                    underlay,
                    serial: ep.serial,
                });
                routes.entry((ep.universe.as_str(), ep.ip)).or_insert(remote);
                if let Some(ip6) = ep.ipv6 {
                    routes6.entry((ep.universe.as_str(), ip6)).or_insert(remote);
                }
            }
        }
        let members =
            state.endpoints.values().map(|ep| ((ep.universe.as_str(), ep.ip), ep)).collect();
        let members6 = state
            .endpoints
            .values()
            .filter_map(|ep| Some(((ep.universe.as_str(), ep.ipv6?), ep)))
            .collect();
        // As the compiler fills VERSE_VNIS and VERSE_HOSTS: the universes with an endpoint in the
        // maps here, and the other hosts holding an endpoint of one of them.
        let here: BTreeSet<&str> = by_ifindex.values().map(|l| l.ep.universe.as_str()).collect();
        let vnis = here
            .iter()
            .filter_map(|u| state.universes.get(*u))
            .map(|u| (u.vni, u.id.as_str()))
            .collect();
        let hosts = state
            .endpoints
            .values()
            .filter(|ep| ep.host != host && here.contains(ep.universe.as_str()))
            .filter_map(|ep| underlays.get(ep.host.as_str()).copied())
            .collect();
        Host {
            state,
            by_ifindex,
            routes,
            members,
            routes6,
            members6,
            vnis,
            hosts,
            underlay: None,
            gateway_mac,
            timeouts,
        }
    }

    /// This host with an underlay: it wraps traffic for other hosts' endpoints and accepts
    /// theirs.
    pub fn with_underlay(mut self, underlay: Underlay) -> Host<'a> {
        self.underlay = Some(underlay);
        self
    }

    pub fn timeouts(&self) -> &Timeouts {
        &self.timeouts
    }
    /// [`Host::judge`], then applies the conntrack update.
    pub fn judge_and_track(
        &self,
        ct: &mut Conntrack,
        now_ns: u64,
        ifindex: u32,
        frame: &[u8],
    ) -> Verdict {
        let out = self.judge(ct, now_ns, ifindex, frame);
        if let Some(u) = &out.ct {
            ct.apply(u);
        }
        if let Some(u) = &out.ct6 {
            ct.apply6(u);
        }
        out.verdict
    }

    fn deliver(&self, frame: &[u8], to: &Local<'_>) -> Verdict {
        let mut out = frame.to_vec();
        out[0..6].copy_from_slice(&to.mac);
        out[6..12].copy_from_slice(&self.gateway_mac);
        Verdict::Deliver { ifindex: to.ifindex, frame: out }
    }
}
