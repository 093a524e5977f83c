//! Reference model of the dataplane's verdict on one packet, for both hooks: a packet sent by a
//! local endpoint (the TC program `from_endpoint`, [`Host::judge`]) and a frame received on the
//! underlay (`from_underlay`, [`Host::judge_underlay`]). Pure: no I/O, no clock; the caller
//! passes `now_ns`.
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
//! `from_endpoint`, first failing check wins (each step names the `DropReason` it can return):
//! 1. Frame shorter than an Ethernet header: `TruncatedEthernet`.
//! 2. The ingress ifindex is not a local endpoint of this host: `UnknownEndpoint`.
//! 3. Ethernet source is not the endpoint's MAC: `SpoofedMac`. Steps 2–3 come before the
//!    ethertype, so no frame of any type is answered or counted past them for a stranger or a
//!    forged source (aligned with `dataplane-ebpf`, whose order this is).
//! 4. Ethertype: ARP -> [`Verdict::ArpReply`] or `ArpUnanswered`; IPv6 -> `Ipv6Unsupported`;
//!    anything but IPv4 (802.1Q tags and 802.3 lengths included) -> `UnknownEthertype`.
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
//! `from_underlay` ([`Host::judge_underlay`]): anything that is not IPv4/UDP to port 4789 of
//! this host's underlay address (or a non-first fragment) is [`Verdict::Pass`]; from there on:
//! `MalformedEncap` (options, MF, lengths, VXLAN flags other than G|I), `UnknownHost`,
//! `UnknownUniverse`, the inner frame parsed like a workload's (`Ipv6Unsupported`,
//! `UnknownEthertype`, `MalformedIpv4`, `Fragment`, `MalformedL4`), the inner source placed on
//! the sending host (`NotPlacedOnSender`), the Group Policy ID the identity the control plane
//! gives that endpoint (`IdentityMismatch`: the header is a claim, never the peer's identity),
//! the inner destination local (`NotLocal`), conntrack hit (bound to the inner source and the
//! receiver, by serial) or related error (as above), else the receiver's ingress rules with the
//! inner source as peer (its groups) (`PolicyIngress`), a new flow owned by the receiver and
//! charged to its budget (`ConntrackBudgetExceeded`); unwrapped and delivered.
//!
//! A packet that is dropped never creates or refreshes a conntrack entry. Entries leave the
//! table only through [`Conntrack::collect`], the controller's garbage collection.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;

use dataplane_common::{
    ct_owner, ct_state, Config, CtEntry, CtKey, DropReason, ENCAP_OVERHEAD, ICMP_ERROR_MAX_LEN,
    VXLAN_PORT,
};
use ipnetwork::IpNetwork;

use crate::model::{self, parse_mac, Direction, Peer, Protocol, State};

pub use dataplane_common::wire::{
    ARP_LEN, ETHERTYPE_ARP, ETHERTYPE_IPV4, ETHERTYPE_IPV6, ETH_HLEN, IPPROTO_ICMP, IPPROTO_TCP,
    IPPROTO_UDP,
};
use dataplane_common::wire::{
    ICMP_DEST_UNREACH, ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST, ICMP_PARAMETER_PROBLEM,
    ICMP_TIME_EXCEEDED, IP_MF_OFFSET_MASK, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN,
};

/// True for the ICMP types and codes that are errors (RFC 792, RFC 1812 5.2.7.1): destination
/// unreachable codes 0-15, time exceeded 0-1, parameter problem 0-2. Any other ICMP message is
/// never related to a flow (S6).
pub fn is_error(proto: u8, (ty, code): (u8, u8)) -> bool {
    proto == IPPROTO_ICMP
        && match ty {
            ICMP_DEST_UNREACH => code <= 15,
            ICMP_TIME_EXCEEDED => code <= 1,
            ICMP_PARAMETER_PROBLEM => code <= 2,
            _ => false,
        }
}

/// What the dataplane does with the packet.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Redirected into the namespace of the endpoint behind `ifindex`, as `frame`.
    Deliver {
        ifindex: u32,
        frame: Vec<u8>,
    },
    /// An ARP reply sent back out of the ingress interface.
    ArpReply {
        frame: Vec<u8>,
    },
    /// Wrapped for another host and handed to the underlay, as `frame`. The outer UDP source
    /// port (bytes 34..36) is a hash of the flow the kernel computes: the model leaves it 0 and
    /// a comparison must skip it (it is in 49152..=65535).
    Wrap {
        frame: Vec<u8>,
    },
    /// Refused as too big to wrap and answered with an ICMP "fragmentation needed", `frame`,
    /// sent back into the sender's namespace; counted as `DropReason::FragNeeded`.
    FragNeeded {
        frame: Vec<u8>,
    },
    /// Not Verse's: passed on untouched (`from_underlay` only).
    Pass,
    Drop(DropReason),
}

/// Idle timeouts by `ct_state` (S9), nanoseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeouts {
    pub ns: [u64; ct_state::COUNT],
}

impl Default for Timeouts {
    /// S9 defaults.
    fn default() -> Self {
        Timeouts { ns: ct_state::DEFAULT_TIMEOUT_SECS.map(|secs| secs * 1_000_000_000) }
    }
}

impl Timeouts {
    pub fn from_config(config: &Config) -> Timeouts {
        Timeouts { ns: config.timeouts_ns }
    }

    /// The timeout of `state`; an unknown state gets 0, i.e. it is expired at once (fail
    /// closed: an entry the model does not understand admits nothing).
    pub fn of(&self, state: u8) -> u64 {
        self.ns.get(usize::from(state)).copied().unwrap_or(0)
    }

    /// Whether `entry` has been idle for at least its state's timeout at `now_ns`, as in the
    /// kernel, whose clock advances by ticks (a timeout of 0 expires an entry of the same tick).
    /// Saturating like the kernel: an entry stamped after `now_ns` (refreshed on another CPU
    /// after the clock was read) is fresh.
    pub fn expired(&self, entry: &CtEntry, now_ns: u64) -> bool {
        now_ns.saturating_sub(entry.last_seen_ns) >= self.of(entry.state)
    }
}

/// Whether the controller's garbage collection deletes `entry` at `now_ns`: it has expired, or
/// one of its endpoints is no longer one `live` knows (by serial: deleted, S7). The daemon runs
/// this very predicate over the kernel's map (`reconcile`).
pub fn is_garbage(
    entry: &CtEntry,
    now_ns: u64,
    timeouts: &Timeouts,
    live: &dyn Fn(u64) -> bool,
) -> bool {
    timeouts.expired(entry, now_ns) || !live(entry.src_serial) || !live(entry.dst_serial)
}

/// Which way a conntrack hit matched.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CtDirection {
    /// The packet's own key is stored: it goes the way the flow was first seen.
    Original,
    /// The reversed key is stored: this is a reply.
    Reply,
}

/// What a packet may do in connection tracking (S7), from its header alone.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Begins a flow in its own direction, and matches a flow only in its original direction:
    /// a TCP SYN without ACK, RST or FIN; an ICMP echo request. (A SYN in the reply direction of
    /// a flow is judged as the new packet it is, and never reopens that flow.)
    Opens,
    /// Matches a flow either way and begins one when none matches: UDP and other protocols,
    /// whose headers do not tell a first packet from a reply.
    Any,
    /// Matches a flow either way, never begins one: every other TCP segment (ACK, FIN, RST, ...).
    Continues,
    /// Matches a flow only in its reply direction, never begins one: an ICMP echo reply.
    Answers,
    /// Never tracked: every other ICMP message (an error is related to a flow, or judged).
    Untracked,
}

/// The [`Role`] of a packet of protocol `proto` with these TCP flags or this ICMP type.
pub fn role(proto: u8, tcp_flags: u8, icmp_type: u8) -> Role {
    match proto {
        IPPROTO_TCP if tcp_flags & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN) == TCP_SYN => {
            Role::Opens
        }
        IPPROTO_TCP => Role::Continues,
        IPPROTO_ICMP if icmp_type == ICMP_ECHO_REQUEST => Role::Opens,
        IPPROTO_ICMP if icmp_type == ICMP_ECHO_REPLY => Role::Answers,
        IPPROTO_ICMP => Role::Untracked,
        _ => Role::Any,
    }
}

/// True if a packet of this role, admitted with no flow matching it, begins a flow.
pub fn creates(role: Role) -> bool {
    matches!(role, Role::Opens | Role::Any)
}

/// A write to the conntrack table (insert or overwrite).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CtUpdate {
    pub key: CtKey,
    pub entry: CtEntry,
}

/// The model's conntrack table, keyed exactly like `VERSE_CT`. Entries stay, expired or not,
/// until [`Conntrack::collect`] removes them (the kernel map is no LRU: nothing is evicted). An
/// owner's budget use is the number of entries charged to its slot, which is what the kernel's
/// counter holds, since only the controller deletes entries and subtracts as it does.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Conntrack {
    pub entries: HashMap<CtKey, CtEntry>,
}

/// A live entry bound to the sender: the stored key, the entry, the direction of the packet.
pub type CtHit = (CtKey, CtEntry, CtDirection);

impl Conntrack {
    /// The packet's key first, then its reverse: the first entry that is live and whose
    /// endpoint on the sender's side is `sender` (a serial). Also the entry stored under the
    /// packet's own key, whatever it is (see [`Host::judge`], step 14). A packet of any role.
    pub fn lookup(
        &self,
        key: &CtKey,
        sender: u64,
        now_ns: u64,
        t: &Timeouts,
    ) -> (Option<CtHit>, Option<CtEntry>) {
        self.lookup_as(key, Role::Any, sender, now_ns, t)
    }

    /// [`Conntrack::lookup`], each way only if a packet of `role` may match that way: the
    /// packet's own key unless it only answers, its reverse unless it only opens, nothing for
    /// an untracked message (whose own key does not matter either: it never creates a flow).
    pub fn lookup_as(
        &self,
        key: &CtKey,
        role: Role,
        sender: u64,
        now_ns: u64,
        t: &Timeouts,
    ) -> (Option<CtHit>, Option<CtEntry>) {
        if role == Role::Untracked {
            return (None, None);
        }
        let own = self.entries.get(key).copied();
        if role != Role::Answers {
            if let Some(e) = own.filter(|e| e.src_serial == sender && !t.expired(e, now_ns)) {
                return (Some((*key, e, CtDirection::Original)), own);
            }
        }
        if role == Role::Opens {
            return (None, own);
        }
        let rev = key.reversed();
        let reply =
            self.entries.get(&rev).filter(|e| e.dst_serial == sender && !t.expired(e, now_ns));
        (reply.map(|e| (rev, *e, CtDirection::Reply)), own)
    }

    pub fn apply(&mut self, update: &CtUpdate) {
        self.entries.insert(update.key, update.entry);
    }

    /// Entries charged to `slot`.
    pub fn used(&self, slot: u32) -> u64 {
        self.entries.values().filter(|e| e.owner_slot == slot).count() as u64
    }

    /// Garbage collection, as the controller runs it ([`is_garbage`]): removes expired entries
    /// and those of endpoints `live` does not know; returns how many went.
    pub fn collect(&mut self, now_ns: u64, t: &Timeouts, live: &dyn Fn(u64) -> bool) -> usize {
        let before = self.entries.len();
        self.entries.retain(|_, e| !is_garbage(e, now_ns, t, live));
        before - self.entries.len()
    }
}

/// The serial the receiver of a packet must have for a hit in direction `dir` on `entry`.
fn receiver_serial(entry: &CtEntry, dir: CtDirection) -> u64 {
    match dir {
        CtDirection::Original => entry.dst_serial,
        CtDirection::Reply => entry.src_serial,
    }
}

/// The verdict and what it does to the conntrack table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub verdict: Verdict,
    pub ct: Option<CtUpdate>,
}

impl Outcome {
    fn drop(reason: DropReason) -> Outcome {
        Outcome { verdict: Verdict::Drop(reason), ct: None }
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
    /// VNI -> universe id, for every universe of the fleet.
    vnis: HashMap<u32, &'a str>,
    /// Underlay addresses of the other hosts of the fleet that have one.
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
        let mut hosts = BTreeSet::new();
        let mut underlays = HashMap::new();
        for record in state.hosts.values() {
            if let Some(ip) = record.underlay_ip.filter(|_| record.name != host) {
                hosts.insert(ip);
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
        }
        for ep in state.endpoints.values().filter(|e| e.host != host) {
            let (Some(&underlay), Some(mac)) =
                (underlays.get(ep.host.as_str()), parse_mac(&ep.mac))
            else {
                continue;
            };
            if state.universes.contains_key(&ep.universe) {
                routes.entry((ep.universe.as_str(), ep.ip)).or_insert(Place::Remote(Remote {
                    identity: ep.identity,
                    mac,
                    underlay,
                    serial: ep.serial,
                }));
            }
        }
        let members =
            state.endpoints.values().map(|ep| ((ep.universe.as_str(), ep.ip), ep)).collect();
        let vnis = state.universes.values().map(|u| (u.vni, u.id.as_str())).collect();
        Host {
            state,
            by_ifindex,
            routes,
            members,
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

    /// Judges one frame received from the endpoint behind `ifindex`; see the module docs.
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
            ETHERTYPE_IPV6 => return Outcome::drop(DropReason::Ipv6Unsupported),
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
        let key = CtKey {
            vni: sender.vni,
            src: pkt.src.octets(),
            dst: pkt.dst.octets(),
            sport: l4.ct_ports.0,
            dport: l4.ct_ports.1,
            proto: pkt.proto,
            _pad: [0; 3],
        };
        let universe = sender.ep.universe.as_str();
        let route = self.routes.get(&(universe, pkt.dst)).copied();
        let role = role(pkt.proto, l4.tcp_flags, l4.icmp_type_code.0);

        let (hit, own) = ct.lookup_as(&key, role, sender.ep.serial, now_ns, &self.timeouts);
        if let Some((stored, entry, dir)) = hit {
            let Some(to) = route else {
                return Outcome::drop(DropReason::NoRoute);
            };
            // Bound to the receiver too: an endpoint made since with the address is no hit.
            if to.serial() == receiver_serial(&entry, dir) {
                let state = next_state(Some((entry.state, dir)), pkt.proto, l4.tcp_flags);
                let refreshed = CtEntry { last_seen_ns: now_ns, state, ..entry };
                let update = CtUpdate { key: stored, entry: refreshed };
                return self.send(frame, sender, &pkt, to, Ok(Some(update)));
            }
        }
        let related = route.filter(|to| {
            self.related(ct, now_ns, sender.vni, &pkt, &l4, (sender.ep.serial, to.serial()))
        });
        if let Some(to) = related {
            return self.send(frame, sender, &pkt, to, Ok(None));
        }
        if !self.allows(sender.ep, Direction::Egress, pkt.dst, pkt.proto, &l4) {
            return Outcome::drop(DropReason::PolicyEgress);
        }
        let Some(to) = route else {
            return Outcome::drop(DropReason::NoRoute);
        };
        if let Place::Local(l) = to {
            if !self.allows(l.ep, Direction::Ingress, pkt.src, pkt.proto, &l4) {
                return Outcome::drop(DropReason::PolicyIngress);
            }
        }
        let created = if creates(role) {
            let entry = CtEntry {
                last_seen_ns: now_ns,
                src_serial: sender.ep.serial,
                dst_serial: to.serial(),
                owner_slot: sender.ep.slot,
                state: next_state(None, pkt.proto, l4.tcp_flags),
                owner: ct_owner::SRC,
                _pad: [0; 2],
            };
            create(ct, key, own, entry, sender.ep.conntrack_budget)
        } else {
            Ok(None)
        };
        self.send(frame, sender, &pkt, to, created)
    }

    /// Judges one frame received on the underlay interface; see the module docs.
    pub fn judge_underlay(&self, ct: &Conntrack, now_ns: u64, frame: &[u8]) -> Outcome {
        const IP_MIN: usize = 20;
        const UDP_LEN: usize = 8;
        /// Offsets in a wrapped frame: the VXLAN header, the inner Ethernet and IPv4 headers.
        const VXLAN_OFF: usize = ETH_HLEN + IP_MIN + UDP_LEN;
        const INNER_ETH_OFF: usize = VXLAN_OFF + 8;
        const INNER_IP_OFF: usize = INNER_ETH_OFF + ETH_HLEN;
        let pass = Outcome { verdict: Verdict::Pass, ct: None };
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
            ETHERTYPE_IPV6 => return Outcome::drop(DropReason::Ipv6Unsupported),
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
        let key = CtKey {
            vni,
            src: pkt.src.octets(),
            dst: pkt.dst.octets(),
            sport: l4.ct_ports.0,
            dport: l4.ct_ports.1,
            proto: pkt.proto,
            _pad: [0; 3],
        };
        let unwrapped = || {
            let mut inner = frame[..ETH_HLEN].to_vec();
            inner.extend_from_slice(&frame[INNER_IP_OFF..]);
            self.deliver(&inner, to)
        };
        let role = role(pkt.proto, l4.tcp_flags, l4.icmp_type_code.0);
        let (hit, own) = ct.lookup_as(&key, role, from.serial, now_ns, &self.timeouts);
        if let Some((stored, entry, dir)) =
            hit.filter(|h| receiver_serial(&h.1, h.2) == to.ep.serial)
        {
            let state = next_state(Some((entry.state, dir)), pkt.proto, l4.tcp_flags);
            let refreshed = CtEntry { last_seen_ns: now_ns, state, ..entry };
            let update = CtUpdate { key: stored, entry: refreshed };
            return Outcome { verdict: unwrapped(), ct: Some(update) };
        }
        if self.related(ct, now_ns, vni, &pkt, &l4, (from.serial, to.ep.serial)) {
            return Outcome { verdict: unwrapped(), ct: None };
        }
        if !self.allows(to.ep, Direction::Ingress, pkt.src, pkt.proto, &l4) {
            return Outcome::drop(DropReason::PolicyIngress);
        }
        let created = if creates(role) {
            // Charged to the local receiver (S14).
            let entry = CtEntry {
                last_seen_ns: now_ns,
                src_serial: from.serial,
                dst_serial: to.ep.serial,
                owner_slot: to.ep.slot,
                state: next_state(None, pkt.proto, l4.tcp_flags),
                owner: ct_owner::DST,
                _pad: [0; 2],
            };
            match create(ct, key, own, entry, to.ep.conntrack_budget) {
                Ok(update) => update,
                Err(reason) => return Outcome::drop(reason),
            }
        } else {
            None
        };
        Outcome { verdict: unwrapped(), ct: created }
    }

    /// S6: an ICMP error ([`is_error`]) no longer than a router's (`ICMP_ERROR_MAX_LEN`) from the
    /// quoted packet's destination to its source (the flow's peer answering about a packet it
    /// received), about a flow tracked either way between the very endpoints (serials) that
    /// send and receive the error: `(sender, receiver)` (S7).
    fn related(
        &self,
        ct: &Conntrack,
        now_ns: u64,
        vni: u32,
        pkt: &Ipv4,
        l4: &L4,
        (sender, receiver): (u64, u64),
    ) -> bool {
        let Some(inner) = &l4.icmp_error_inner else {
            return false;
        };
        is_error(pkt.proto, l4.icmp_type_code)
            && pkt.total <= ICMP_ERROR_MAX_LEN
            && inner.src == pkt.dst.octets()
            && inner.dst == pkt.src.octets()
            // The quoted packet went from the error's receiver to its sender.
            && ct
                .lookup(&CtKey { vni, ..*inner }, receiver, now_ns, &self.timeouts)
                .0
                .is_some_and(|(_, e, dir)| receiver_serial(&e, dir) == sender)
    }

    /// Step 14 of `from_endpoint`: delivers to a local receiver, or wraps for another host
    /// (answering "fragmentation needed" instead when the wrapped frame would not fit). `ct` is
    /// the conntrack write of a packet that is sent; it is dropped with the packet otherwise. It
    /// is an error when a new flow is refused for its owner's budget (S14): that drop comes after
    /// the checks of the route and the MTU, as in the kernel.
    fn send(
        &self,
        frame: &[u8],
        sender: &Local<'_>,
        pkt: &Ipv4,
        to: Place<'_>,
        ct: Result<Option<CtUpdate>, DropReason>,
    ) -> Outcome {
        let remote = match (to, ct) {
            (Place::Local(_), Err(reason)) => return Outcome::drop(reason),
            (Place::Local(l), Ok(ct)) => return Outcome { verdict: self.deliver(frame, &l), ct },
            (Place::Remote(r), _) => r,
        };
        let Some(underlay) = self.underlay else {
            return Outcome::drop(DropReason::NoUnderlay);
        };
        // bpf_check_mtu: the frame plus the overhead against the MTU plus the Ethernet header.
        if frame.len() + ENCAP_OVERHEAD as usize > underlay.mtu as usize + ETH_HLEN {
            return self.frag_needed(frame, sender, pkt, underlay.mtu);
        }
        let ct = match ct {
            Ok(ct) => ct,
            Err(reason) => return Outcome::drop(reason),
        };
        let outer_len = frame.len() - ETH_HLEN + ENCAP_OVERHEAD as usize;
        let mut out = Vec::with_capacity(frame.len() + ENCAP_OVERHEAD as usize);
        // The outer Ethernet header is the packet's own, type IPv4 (the neighbour subsystem
        // writes the addresses after the program).
        out.extend_from_slice(&frame[..ETH_HLEN]);
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
        out.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        out.extend_from_slice(&frame[ETH_HLEN..]);
        Outcome { verdict: Verdict::Wrap { frame: out }, ct }
    }

    /// The ICMP "fragmentation needed" (type 3 code 4, RFC 1191) that `from_endpoint` sends back
    /// for a packet too big to wrap: from the packet's destination to the sender, quoting the
    /// first 128 bytes of the packet, next-hop MTU = underlay MTU - 50. A datagram shorter than
    /// the quote is only counted.
    fn frag_needed(&self, frame: &[u8], sender: &Local<'_>, pkt: &Ipv4, mtu: u32) -> Outcome {
        const QUOTE: usize = 128;
        if pkt.end < ETH_HLEN + QUOTE {
            return Outcome::drop(DropReason::FragNeeded);
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
        Outcome { verdict: Verdict::FragNeeded { frame: out }, ct: None }
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
        out.verdict
    }

    fn deliver(&self, frame: &[u8], to: &Local<'_>) -> Verdict {
        let mut out = frame.to_vec();
        out[0..6].copy_from_slice(&to.mac);
        out[6..12].copy_from_slice(&self.gateway_mac);
        Verdict::Deliver { ifindex: to.ifindex, frame: out }
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
        Outcome { verdict: Verdict::ArpReply { frame: out }, ct: None }
    }

    /// S1: any rule of any group of `ep` in `dir` that matches the packet and the peer allows.
    fn allows(
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

/// The conntrack write of a new flow `entry` under `key` (step 14, S14), where `own` is what the
/// table holds under that key: an entry of the same owner (expired, or bound to an endpoint
/// since deleted) is replaced at no charge; an entry of another owner is left for the collector
/// and the flow goes untracked (`None`); otherwise the flow is charged to its owner, and refused
/// (`ConntrackBudgetExceeded`) when the owner already holds `budget` entries.
fn create(
    ct: &Conntrack,
    key: CtKey,
    own: Option<CtEntry>,
    entry: CtEntry,
    budget: u32,
) -> Result<Option<CtUpdate>, DropReason> {
    match own {
        Some(old)
            if old.owner_slot == entry.owner_slot && old.owner_serial() == entry.owner_serial() =>
        {
            Ok(Some(CtUpdate { key, entry }))
        }
        Some(_) => Ok(None),
        None if ct.used(entry.owner_slot) >= u64::from(budget) => {
            Err(DropReason::ConntrackBudgetExceeded)
        }
        None => Ok(Some(CtUpdate { key, entry })),
    }
}

/// The connection-tracking state after a packet. `prev` is `None` when the packet creates the
/// entry (for TCP only a SYN does, [`Role::Opens`]). TCP: FIN or RST -> closing; a SYN without
/// ACK on a closing flow reopens it (the 5-tuple reused, as Linux conntrack does from
/// CLOSE/TIME_WAIT; only in the original direction, the only one a SYN matches); a SYN-ACK in
/// the reply direction establishes an opening connection (any other reply leaves it opening).
/// UDP: one-way until a reply is seen.
pub fn next_state(prev: Option<(u8, CtDirection)>, proto: u8, tcp_flags: u8) -> u8 {
    match proto {
        IPPROTO_TCP => {
            let (syn, ack) = (TCP_SYN, TCP_ACK);
            let syn_only = tcp_flags & (syn | ack) == syn;
            let syn_ack = tcp_flags & (syn | ack) == syn | ack;
            match prev {
                _ if tcp_flags & (TCP_FIN | TCP_RST) != 0 => ct_state::TCP_CLOSING,
                None => ct_state::TCP_OPENING,
                Some((ct_state::TCP_CLOSING, _)) if syn_only => ct_state::TCP_OPENING,
                Some((ct_state::TCP_OPENING, CtDirection::Reply)) if syn_ack => {
                    ct_state::TCP_ESTABLISHED
                }
                Some((s, _)) => s,
            }
        }
        IPPROTO_UDP => match prev {
            None => ct_state::UDP_ONE_WAY,
            Some((ct_state::UDP_ONE_WAY, CtDirection::Reply)) => ct_state::UDP_REPLIED,
            Some((s, _)) => s,
        },
        IPPROTO_ICMP => ct_state::ICMP,
        _ => ct_state::OTHER,
    }
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// The RFC 1071 Internet checksum of `bytes` (an odd last byte padded with zero).
fn checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The parts of a valid IPv4 header the walk needs.
struct Ipv4 {
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    fragment: bool,
    /// Offset of the L4 header in the frame.
    l4_off: usize,
    /// End of the datagram in the frame (Ethernet padding after it is ignored).
    end: usize,
    /// The datagram's total length.
    total: usize,
}

/// The IPv4 header at `off` (after the Ethernet header, or after the encapsulation); its
/// lengths are checked against the frame.
fn parse_ipv4(frame: &[u8], off: usize) -> Result<Ipv4, DropReason> {
    let ip = &frame[off..];
    if ip.len() < 20 || ip[0] >> 4 != 4 {
        return Err(DropReason::MalformedIpv4);
    }
    let hlen = usize::from(ip[0] & 0x0f) * 4;
    let total = usize::from(be16(ip, 2));
    if hlen < 20 || hlen > ip.len() || total < hlen || total > ip.len() {
        return Err(DropReason::MalformedIpv4);
    }
    let frag = be16(ip, 6);
    Ok(Ipv4 {
        src: Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]),
        dst: Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]),
        proto: ip[9],
        fragment: frag & IP_MF_OFFSET_MASK != 0, // MF or a non-zero offset
        l4_off: off + hlen,
        end: off + total,
        total,
    })
}

/// The parts of the L4 header the walk needs.
#[derive(Clone)]
struct L4 {
    /// Conntrack ports (S7): TCP/UDP ports; ICMP echo id as `(id, 0)` for a request and
    /// `(0, id)` for a reply; `(0, 0)` otherwise.
    ct_ports: (u16, u16),
    /// TCP/UDP destination port, else 0.
    dport: u16,
    icmp_type_code: (u8, u8),
    tcp_flags: u8,
    /// For an ICMP error carrying a parsable inner IPv4 header: the inner flow's key (vni 0).
    icmp_error_inner: Option<CtKey>,
}

fn parse_l4(frame: &[u8], ip: &Ipv4) -> Result<L4, DropReason> {
    let l4 = &frame[ip.l4_off..ip.end];
    let mut out = L4 {
        ct_ports: (0, 0),
        dport: 0,
        icmp_type_code: (0, 0),
        tcp_flags: 0,
        icmp_error_inner: None,
    };
    match ip.proto {
        IPPROTO_TCP => {
            if l4.len() < 20 {
                return Err(DropReason::MalformedL4);
            }
            let doff = usize::from(l4[12] >> 4) * 4;
            if doff < 20 || doff > l4.len() {
                return Err(DropReason::MalformedL4);
            }
            out.ct_ports = (be16(l4, 0), be16(l4, 2));
            out.dport = be16(l4, 2);
            out.tcp_flags = l4[13];
        }
        IPPROTO_UDP => {
            if l4.len() < 8 {
                return Err(DropReason::MalformedL4);
            }
            out.ct_ports = (be16(l4, 0), be16(l4, 2));
            out.dport = be16(l4, 2);
        }
        IPPROTO_ICMP => {
            if l4.len() < 8 {
                return Err(DropReason::MalformedL4);
            }
            out.icmp_type_code = (l4[0], l4[1]);
            out.ct_ports = icmp_ct_ports(l4[0], be16(l4, 4));
            if matches!(l4[0], ICMP_DEST_UNREACH | ICMP_TIME_EXCEEDED | ICMP_PARAMETER_PROBLEM) {
                out.icmp_error_inner = parse_inner(&l4[8..]);
            }
        }
        _ => {}
    }
    Ok(out)
}

fn icmp_ct_ports(ty: u8, id: u16) -> (u16, u16) {
    match ty {
        ICMP_ECHO_REQUEST => (id, 0),
        ICMP_ECHO_REPLY => (0, id),
        _ => (0, 0),
    }
}

/// The flow of the IPv4 header quoted in an ICMP error (RFC 792: the header plus 64 bits). It
/// must have version 4, IHL >= 5 and the 8 bytes after its header, all within the error's
/// datagram (not in Ethernet padding); its own total length is not checked (errors quote a
/// prefix).
/// Anything else makes the error unrelated: it is then judged by the rules like any ICMP.
fn parse_inner(b: &[u8]) -> Option<CtKey> {
    if b.len() < 20 || b[0] >> 4 != 4 {
        return None;
    }
    let hlen = usize::from(b[0] & 0x0f) * 4;
    if hlen < 20 || hlen > b.len() {
        return None;
    }
    let proto = b[9];
    let l4 = &b[hlen..];
    if l4.len() < 8 {
        return None;
    }
    let ports = match proto {
        IPPROTO_TCP | IPPROTO_UDP => (be16(l4, 0), be16(l4, 2)),
        IPPROTO_ICMP => icmp_ct_ports(l4[0], be16(l4, 4)),
        _ => (0, 0),
    };
    Some(CtKey {
        vni: 0,
        src: [b[12], b[13], b[14], b[15]],
        dst: [b[16], b[17], b[18], b[19]],
        sport: ports.0,
        dport: ports.1,
        proto,
        _pad: [0; 3],
    })
}

#[cfg(test)]
mod tests {
    //! Literal packets through the model, one test per semantic it proves.
    use super::*;
    use crate::model::{Endpoint, Rule, SecurityGroup, Universe};
    use dataplane_common::DropReason as D;

    const GW: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
    const HOST: &str = "h1";
    const S: u64 = 1_000_000_000;

    fn mac_of(n: u8) -> [u8; 6] {
        [0x02, 0xaa, 0, 0, 0, n]
    }

    fn rule(
        id: &str,
        dir: Direction,
        proto: Protocol,
        ports: Option<(u16, u16)>,
        peer: Peer,
    ) -> Rule {
        Rule {
            id: id.into(),
            direction: dir,
            protocol: proto,
            ports,
            icmp: None,
            peer,
            description: String::new(),
        }
    }
    fn cidr(s: &str) -> Peer {
        Peer::Cidr(s.parse().unwrap())
    }
    fn group(id: &str, uni: &str, ingress: Vec<Rule>, egress: Vec<Rule>) -> SecurityGroup {
        SecurityGroup {
            id: id.into(),
            universe: uni.into(),
            name: id.into(),
            description: String::new(),
            ingress,
            egress,
        }
    }
    fn egress_all(id: &str) -> Rule {
        rule(id, Direction::Egress, Protocol::All, None, cidr("0.0.0.0/0"))
    }

    /// Two universes with the same CIDR (S3 default groups in both), plus `web` and `db` in the
    /// first. Endpoint n has ifindex 10+n, MAC mac_of(n).
    fn fixture() -> (State, BTreeMap<u32, String>) {
        let mut st = State::default();
        for (id, vni) in [("uni-1", 100), ("uni-2", 200)] {
            st.universes.insert(
                id.into(),
                Universe {
                    id: id.into(),
                    name: id.into(),
                    cidrs: vec!["10.0.0.0/16".parse().unwrap()],
                    vni,
                },
            );
        }
        let def = |g: &str, u: &str| {
            group(
                g,
                u,
                vec![rule(
                    &format!("{g}-i"),
                    Direction::Ingress,
                    Protocol::All,
                    None,
                    Peer::Group(g.into()),
                )],
                vec![egress_all(&format!("{g}-e"))],
            )
        };
        st.groups.insert("sg-def1".into(), def("sg-def1", "uni-1"));
        st.groups.insert("sg-def2".into(), def("sg-def2", "uni-2"));
        st.groups.insert(
            "sg-web".into(),
            group(
                "sg-web",
                "uni-1",
                vec![rule(
                    "r-web80",
                    Direction::Ingress,
                    Protocol::TCP,
                    Some((80, 80)),
                    cidr("0.0.0.0/0"),
                )],
                vec![egress_all("r-web-e")],
            ),
        );
        st.groups.insert(
            "sg-db".into(),
            group(
                "sg-db",
                "uni-1",
                vec![rule(
                    "r-db",
                    Direction::Ingress,
                    Protocol::TCP,
                    Some((5432, 5432)),
                    Peer::Group("sg-web".into()),
                )],
                vec![],
            ),
        );
        let eps: [(u8, &str, &str, &[&str]); 5] = [
            (1, "uni-1", "10.0.0.1", &["sg-def1"]),
            (2, "uni-1", "10.0.0.2", &["sg-def1"]),
            (3, "uni-1", "10.0.0.3", &["sg-web"]),
            (4, "uni-1", "10.0.0.4", &["sg-db"]),
            (5, "uni-2", "10.0.0.1", &["sg-def2"]),
        ];
        let mut local = BTreeMap::new();
        for (n, uni, ip, groups) in eps {
            let m = mac_of(n);
            let id = format!("ep-{n}");
            st.endpoints.insert(
                id.clone(),
                Endpoint {
                    id: id.clone(),
                    universe: uni.into(),
                    host: HOST.into(),
                    netns: format!("ns{n}"),
                    ip: ip.parse().unwrap(),
                    mac: format!(
                        "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
                        m[0], m[1], m[2], m[3], m[4], m[5]
                    ),
                    interface: format!("veth{n}"),
                    security_groups: groups.iter().map(|g| g.to_string()).collect(),
                    identity: u32::from(n),
                    conntrack_budget: 1000,
                    serial: u64::from(n),
                    slot: u32::from(n),
                    flow_logs: false,
                },
            );
            local.insert(10 + u32::from(n), id);
        }
        (st, local)
    }

    /// Ethernet + IPv4 (IHL 5, DF, TTL 64, checksum left 0: nobody verifies it) + `l4`.
    fn ipv4(src_mac: [u8; 6], src: [u8; 4], dst: [u8; 4], proto: u8, l4: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(&GW);
        f.extend_from_slice(&src_mac);
        f.extend_from_slice(&[0x08, 0x00]);
        let total = (20 + l4.len()) as u16;
        f.extend_from_slice(&[0x45, 0x00]);
        f.extend_from_slice(&total.to_be_bytes());
        f.extend_from_slice(&[0x12, 0x34, 0x40, 0x00, 64, proto, 0, 0]);
        f.extend_from_slice(&src);
        f.extend_from_slice(&dst);
        f.extend_from_slice(l4);
        f
    }
    fn tcp(sport: u16, dport: u16, flags: u8) -> Vec<u8> {
        let mut t = Vec::new();
        t.extend_from_slice(&sport.to_be_bytes());
        t.extend_from_slice(&dport.to_be_bytes());
        t.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
        t
    }
    fn udp(sport: u16, dport: u16) -> Vec<u8> {
        let mut u = Vec::new();
        u.extend_from_slice(&sport.to_be_bytes());
        u.extend_from_slice(&dport.to_be_bytes());
        u.extend_from_slice(&[0, 12, 0, 0, b'h', b'i', b'!', b'\n']);
        u
    }
    fn icmp(ty: u8, code: u8, id: u16, payload: &[u8]) -> Vec<u8> {
        let mut i = vec![ty, code, 0, 0];
        i.extend_from_slice(&id.to_be_bytes());
        i.extend_from_slice(&[0, 1]);
        i.extend_from_slice(payload);
        i
    }
    const A: [u8; 4] = [10, 0, 0, 1];
    const B: [u8; 4] = [10, 0, 0, 2];
    const W: [u8; 4] = [10, 0, 0, 3];
    const DB: [u8; 4] = [10, 0, 0, 4];
    const SYN: u8 = 0x02;
    const SYNACK: u8 = 0x12;
    const ACKF: u8 = 0x10;

    fn host<'a>(st: &'a State, local: &BTreeMap<u32, String>) -> Host<'a> {
        Host::new(st, HOST, local, GW, Timeouts::default())
    }
    fn delivered_to(v: &Verdict) -> Option<u32> {
        match v {
            Verdict::Deliver { ifindex, .. } => Some(*ifindex),
            _ => None,
        }
    }

    #[test]
    fn s3_default_group_members_talk_and_frame_is_rewritten_for_the_receiver() {
        let (st, local) = fixture();
        let h = host(&st, &local);
        let mut ct = Conntrack::default();
        let f = ipv4(mac_of(1), A, B, IPPROTO_UDP, &udp(1000, 53));
        let v = h.judge_and_track(&mut ct, S, 11, &f);
        let mut want = f.clone();
        want[0..6].copy_from_slice(&mac_of(2));
        want[6..12].copy_from_slice(&GW);
        assert_eq!(v, Verdict::Deliver { ifindex: 12, frame: want });
        assert_eq!(ct.entries.len(), 1);
    }

    #[test]
    fn s1_rules_union_any_group_allows() {
        let (mut st, local) = fixture();
        // ep-4 in db and web: web's port 80 from anywhere plus db's 5432 from web members.
        st.endpoints.get_mut("ep-4").unwrap().security_groups =
            vec!["sg-db".into(), "sg-web".into()];
        let h = host(&st, &local);
        let ct = Conntrack::default();
        let to80 = ipv4(mac_of(3), W, DB, IPPROTO_TCP, &tcp(40000, 80, SYN));
        let to5432 = ipv4(mac_of(3), W, DB, IPPROTO_TCP, &tcp(40000, 5432, SYN));
        let to81 = ipv4(mac_of(3), W, DB, IPPROTO_TCP, &tcp(40000, 81, SYN));
        assert_eq!(delivered_to(&h.judge(&ct, S, 13, &to80).verdict), Some(14));
        assert_eq!(delivered_to(&h.judge(&ct, S, 13, &to5432).verdict), Some(14));
        assert_eq!(h.judge(&ct, S, 13, &to81).verdict, Verdict::Drop(D::PolicyIngress));
    }

    #[test]
    fn s1_nested_cidrs_and_group_peer_each_allow_alone() {
        let (mut st, local) = fixture();
        let g = st.groups.get_mut("sg-def1").unwrap();
        g.ingress = vec![
            rule("n8", Direction::Ingress, Protocol::TCP, Some((1, 10)), cidr("10.0.0.0/8")),
            rule("n16", Direction::Ingress, Protocol::TCP, Some((11, 20)), cidr("10.0.0.0/16")),
            rule("n24", Direction::Ingress, Protocol::TCP, Some((21, 30)), cidr("10.0.0.0/24")),
            rule("n32", Direction::Ingress, Protocol::TCP, Some((31, 40)), cidr("10.0.0.1/32")),
            rule(
                "ng",
                Direction::Ingress,
                Protocol::TCP,
                Some((41, 50)),
                Peer::Group("sg-def1".into()),
            ),
        ];
        let h = host(&st, &local);
        let ct = Conntrack::default();
        for port in 1..=50 {
            let f = ipv4(mac_of(1), A, B, IPPROTO_TCP, &tcp(999, port, SYN));
            assert_eq!(delivered_to(&h.judge(&ct, S, 11, &f).verdict), Some(12), "port {port}");
        }
        let f = ipv4(mac_of(1), A, B, IPPROTO_TCP, &tcp(999, 51, SYN));
        assert_eq!(h.judge(&ct, S, 11, &f).verdict, Verdict::Drop(D::PolicyIngress));
    }

    #[test]
    fn s5_group_peer_follows_membership() {
        let (mut st, local) = fixture();
        let h = host(&st, &local);
        let ct = Conntrack::default();
        // ep-1 (default only) -> db:5432 needs membership of web.
        let f = ipv4(mac_of(1), A, DB, IPPROTO_TCP, &tcp(40000, 5432, SYN));
        assert_eq!(h.judge(&ct, S, 11, &f).verdict, Verdict::Drop(D::PolicyIngress));
        st.endpoints.get_mut("ep-1").unwrap().security_groups.push("sg-web".into());
        let h = host(&st, &local);
        assert_eq!(delivered_to(&h.judge(&ct, S, 11, &f).verdict), Some(14));
    }

    #[test]
    fn s6_s7_replies_pass_whatever_the_rules_of_the_other_side() {
        let (st, local) = fixture();
        let h = host(&st, &local);
        let mut ct = Conntrack::default();
        // web -> db:5432 allowed; db has no egress rules at all.
        let syn = ipv4(mac_of(3), W, DB, IPPROTO_TCP, &tcp(40000, 5432, SYN));
        assert_eq!(delivered_to(&h.judge_and_track(&mut ct, S, 13, &syn)), Some(14));
        let synack = ipv4(mac_of(4), DB, W, IPPROTO_TCP, &tcp(5432, 40000, SYNACK));
        assert_eq!(delivered_to(&h.judge_and_track(&mut ct, S, 14, &synack)), Some(13));
        let key =
            CtKey { vni: 100, src: W, dst: DB, sport: 40000, dport: 5432, proto: 6, _pad: [0; 3] };
        assert_eq!(ct.entries[&key].state, ct_state::TCP_ESTABLISHED);
        // A new flow from db (other source port) is not a reply: db has no egress.
        let other = ipv4(mac_of(4), DB, W, IPPROTO_TCP, &tcp(5432, 40001, SYN));
        assert_eq!(h.judge_and_track(&mut ct, S, 14, &other), Verdict::Drop(D::PolicyEgress));
        // ICMP echo tracked by identifier: the reply with the same id passes, another id not.
        let req = ipv4(mac_of(3), W, DB, IPPROTO_ICMP, &icmp(8, 0, 77, b"ping"));
        assert_eq!(h.judge_and_track(&mut ct, S, 13, &req), Verdict::Drop(D::PolicyIngress));
        let (mut st2, local2) = (st.clone(), local.clone());
        st2.groups.get_mut("sg-db").unwrap().ingress.push(Rule {
            icmp: Some((Some(8), None)),
            ..rule("r-ping", Direction::Ingress, Protocol::ICMP, None, cidr("10.0.0.0/16"))
        });
        let h2 = host(&st2, &local2);
        assert_eq!(delivered_to(&h2.judge_and_track(&mut ct, S, 13, &req)), Some(14));
        let reply = ipv4(mac_of(4), DB, W, IPPROTO_ICMP, &icmp(0, 0, 77, b"ping"));
        assert_eq!(delivered_to(&h2.judge_and_track(&mut ct, S, 14, &reply)), Some(13));
        let stray = ipv4(mac_of(4), DB, W, IPPROTO_ICMP, &icmp(0, 0, 78, b"ping"));
        assert_eq!(h2.judge_and_track(&mut ct, S, 14, &stray), Verdict::Drop(D::PolicyEgress));
    }

    #[test]
    fn s6_icmp_errors_about_tracked_flows_are_admitted_others_judged_by_rules() {
        let (st, local) = fixture();
        let h = host(&st, &local);
        let mut ct = Conntrack::default();
        let syn = ipv4(mac_of(3), W, DB, IPPROTO_TCP, &tcp(40000, 5432, SYN));
        assert!(delivered_to(&h.judge_and_track(&mut ct, S, 13, &syn)).is_some());
        // db answers "fragmentation needed" quoting the SYN's IP header and first 8 bytes.
        let quote = syn[ETH_HLEN..ETH_HLEN + 28].to_vec();
        let ptb = ipv4(mac_of(4), DB, W, IPPROTO_ICMP, &icmp(3, 4, 0, &quote));
        assert_eq!(delivered_to(&h.judge_and_track(&mut ct, S, 14, &ptb)), Some(13));
        assert_eq!(ct.entries.len(), 1, "related errors create no entry");
        // Quoting an untracked flow: judged by db's (empty) egress.
        let untracked = ipv4(mac_of(3), W, DB, IPPROTO_TCP, &tcp(40001, 5432, SYN));
        let q2 = untracked[ETH_HLEN..ETH_HLEN + 28].to_vec();
        let e2 = ipv4(mac_of(4), DB, W, IPPROTO_ICMP, &icmp(3, 4, 0, &q2));
        assert_eq!(h.judge_and_track(&mut ct, S, 14, &e2), Verdict::Drop(D::PolicyEgress));
        // The quote of a tracked flow sent to someone else than its source: not related.
        let (mut st3, local3) = (st.clone(), local.clone());
        st3.groups.get_mut("sg-db").unwrap().egress.push(rule(
            "x",
            Direction::Egress,
            Protocol::TCP,
            None,
            cidr("0.0.0.0/0"),
        ));
        let h3 = host(&st3, &local3);
        let wrong = ipv4(mac_of(4), DB, A, IPPROTO_ICMP, &icmp(3, 4, 0, &quote));
        assert_eq!(h3.judge_and_track(&mut ct, S, 14, &wrong), Verdict::Drop(D::PolicyEgress));
    }

    #[test]
    fn s8_removed_rule_keeps_tracked_flows_refuses_new_ones_until_idle_timeout() {
        let (mut st, local) = fixture();
        let mut ct = Conntrack::default();
        let syn = ipv4(mac_of(1), A, W, IPPROTO_TCP, &tcp(40000, 80, SYN));
        assert!(delivered_to(&host(&st, &local).judge_and_track(&mut ct, S, 11, &syn)).is_some());
        st.groups.get_mut("sg-web").unwrap().ingress.clear();
        let h = host(&st, &local);
        let ack = ipv4(mac_of(1), A, W, IPPROTO_TCP, &tcp(40000, 80, ACKF));
        assert!(delivered_to(&h.judge_and_track(&mut ct, 2 * S, 11, &ack)).is_some());
        let new = ipv4(mac_of(1), A, W, IPPROTO_TCP, &tcp(40001, 80, SYN));
        assert_eq!(h.judge_and_track(&mut ct, 2 * S, 11, &new), Verdict::Drop(D::PolicyIngress));
        // Still opening (no reply seen): 60 s - 1 ns idle is fine, 60 s is not.
        assert!(delivered_to(&h.judge_and_track(&mut ct, 62 * S - 1, 11, &ack)).is_some());
        assert_eq!(
            h.judge_and_track(&mut ct, 122 * S - 1, 11, &ack),
            Verdict::Drop(D::PolicyIngress)
        );
    }

    #[test]
    fn s9_timeouts_are_configurable() {
        let (st, local) = fixture();
        let mut t = Timeouts::default();
        t.ns[ct_state::UDP_ONE_WAY as usize] = 5;
        let mut st2 = st.clone();
        let h = Host::new(&st, HOST, &local, GW, t);
        let mut ct = Conntrack::default();
        let f = ipv4(mac_of(3), W, A, IPPROTO_UDP, &udp(1, 2));
        // web egress all; ep-1's default ingress only from default members: refused...
        assert_eq!(h.judge_and_track(&mut ct, 0, 13, &f), Verdict::Drop(D::PolicyIngress));
        // ...so use a flow that is allowed, then watch it expire after 5 ns.
        st2.groups.get_mut("sg-def1").unwrap().ingress.push(rule(
            "u",
            Direction::Ingress,
            Protocol::UDP,
            Some((2, 2)),
            cidr("10.0.0.3/32"),
        ));
        let h2 = Host::new(&st2, HOST, &local, GW, t);
        assert!(delivered_to(&h2.judge_and_track(&mut ct, 100, 13, &f)).is_some());
        let back = ipv4(mac_of(1), A, W, IPPROTO_UDP, &udp(2, 1));
        // Idle 4 ns of 5: still live.
        assert!(delivered_to(&h.judge_and_track(&mut ct, 104, 11, &back)).is_some());
        let key = CtKey { vni: 100, src: W, dst: A, sport: 1, dport: 2, proto: 17, _pad: [0; 3] };
        assert_eq!(ct.entries[&key].state, ct_state::UDP_REPLIED);
        assert_eq!(t.of(ct_state::UDP_REPLIED), 180 * S);
    }

    /// Replaces endpoint `id` by a new one (new serial, same address, ifindex, MAC and slot)
    /// in `groups`, as a deletion and a re-creation would.
    fn recreate(st: &mut State, id: &str, groups: &[&str]) {
        let ep = st.endpoints.get_mut(id).unwrap();
        ep.serial += 100;
        ep.security_groups = groups.iter().map(|g| g.to_string()).collect();
    }

    #[test]
    fn s7_a_recreated_endpoint_inherits_no_flow_in_either_direction() {
        let (mut st, local) = fixture();
        let mut ct = Conntrack::default();
        // web -> db:5432, answered: a tracked, established flow.
        let syn = ipv4(mac_of(3), W, DB, IPPROTO_TCP, &tcp(40000, 5432, SYN));
        let synack = ipv4(mac_of(4), DB, W, IPPROTO_TCP, &tcp(5432, 40000, SYNACK));
        let ack = ipv4(mac_of(3), W, DB, IPPROTO_TCP, &tcp(40000, 5432, ACKF));
        let h = host(&st, &local);
        assert_eq!(delivered_to(&h.judge_and_track(&mut ct, S, 13, &syn)), Some(14));
        assert_eq!(delivered_to(&h.judge_and_track(&mut ct, S, 14, &synack)), Some(13));
        // web is deleted and made again with its address in `default`: db admits only web
        // members, and has no egress rule at all. Both directions are judged as new flows.
        recreate(&mut st, "ep-3", &["sg-def1"]);
        let h = host(&st, &local);
        assert_eq!(h.judge(&ct, 2 * S, 13, &ack).verdict, Verdict::Drop(D::PolicyIngress));
        assert_eq!(h.judge(&ct, 2 * S, 14, &synack).verdict, Verdict::Drop(D::PolicyEgress));
        // db made again instead, in `default` (which admits only its members, and web's group
        // admits TCP/80 only): the same from the other side.
        let (mut st, local) = fixture();
        recreate(&mut st, "ep-4", &["sg-def1"]);
        let h = host(&st, &local);
        assert_eq!(h.judge(&ct, 2 * S, 13, &ack).verdict, Verdict::Drop(D::PolicyIngress));
        assert_eq!(h.judge(&ct, 2 * S, 14, &synack).verdict, Verdict::Drop(D::PolicyIngress));
        // Garbage collection removes the flow once an endpoint of it is gone.
        let live = |serial: u64| st.endpoints.values().any(|e| e.serial == serial);
        assert_eq!(ct.collect(2 * S, &Timeouts::default(), &live), 1);
        assert!(ct.entries.is_empty());
    }

    #[test]
    fn s14_new_flows_beyond_the_budget_are_dropped_for_their_owner_alone() {
        let (mut st, local) = fixture();
        st.endpoints.get_mut("ep-1").unwrap().conntrack_budget = 2;
        let h = host(&st, &local);
        let mut ct = Conntrack::default();
        let to_b = |sport| ipv4(mac_of(1), A, B, IPPROTO_UDP, &udp(sport, 53));
        assert!(delivered_to(&h.judge_and_track(&mut ct, S, 11, &to_b(1))).is_some());
        assert!(delivered_to(&h.judge_and_track(&mut ct, S, 11, &to_b(2))).is_some());
        assert_eq!(ct.used(1), 2);
        assert_eq!(
            h.judge(&ct, S, 11, &to_b(3)).verdict,
            Verdict::Drop(D::ConntrackBudgetExceeded)
        );
        // Its tracked flows go on both ways; another endpoint's new flows are not affected.
        assert!(delivered_to(&h.judge_and_track(&mut ct, S, 11, &to_b(1))).is_some());
        let back = ipv4(mac_of(2), B, A, IPPROTO_UDP, &udp(53, 2));
        assert!(delivered_to(&h.judge_and_track(&mut ct, S, 12, &back)).is_some());
        let from_b = ipv4(mac_of(2), B, A, IPPROTO_UDP, &udp(7, 8));
        assert!(delivered_to(&h.judge_and_track(&mut ct, S, 12, &from_b)).is_some());
        assert_eq!((ct.used(1), ct.used(2)), (2, 1));
        // An expired flow of its own (one-way UDP, 30 s) is replaced at no charge, even at the
        // budget.
        let later = S + 31 * S;
        assert!(delivered_to(&h.judge_and_track(&mut ct, later, 11, &to_b(1))).is_some());
        assert_eq!(ct.used(1), 2);
        // Collecting the expired flows gives the budget back.
        let live = |_: u64| true;
        assert_eq!(ct.collect(later + 181 * S, &Timeouts::default(), &live), 3);
        assert!(delivered_to(&h.judge_and_track(&mut ct, later + 182 * S, 11, &to_b(3))).is_some());
    }

    #[test]
    fn s14_an_entry_of_another_owner_under_the_key_leaves_a_new_flow_untracked() {
        let (mut st, local) = fixture();
        let mut ct = Conntrack::default();
        let f = ipv4(mac_of(1), A, B, IPPROTO_UDP, &udp(1, 53));
        assert!(delivered_to(&host(&st, &local).judge_and_track(&mut ct, S, 11, &f)).is_some());
        // ep-1 made again before its flows were collected: the new one's flow of the same
        // 5-tuple is delivered but not tracked, and the old entry stays for the collector.
        recreate(&mut st, "ep-1", &["sg-def1"]);
        let h = host(&st, &local);
        let out = h.judge(&ct, 2 * S, 11, &f);
        assert!(delivered_to(&out.verdict).is_some());
        assert_eq!(out.ct, None);
    }

    #[test]
    fn universes_are_isolated_even_with_the_same_addresses() {
        let (st, local) = fixture();
        let h = host(&st, &local);
        let ct = Conntrack::default();
        // ep-5 (uni-2, 10.0.0.1) to 10.0.0.2: exists only in uni-1.
        let f = ipv4(mac_of(5), A, B, IPPROTO_UDP, &udp(1, 2));
        assert_eq!(h.judge(&ct, S, 15, &f).verdict, Verdict::Drop(D::NoRoute));
    }

    #[test]
    fn s10_spoofed_source_mac_or_ip_is_dropped() {
        let (st, local) = fixture();
        let h = host(&st, &local);
        let ct = Conntrack::default();
        let f = ipv4(mac_of(2), A, B, IPPROTO_UDP, &udp(1, 2));
        assert_eq!(h.judge(&ct, S, 11, &f).verdict, Verdict::Drop(D::SpoofedMac));
        let f = ipv4(mac_of(1), B, A, IPPROTO_UDP, &udp(1, 2));
        assert_eq!(h.judge(&ct, S, 11, &f).verdict, Verdict::Drop(D::SpoofedIp));
        let f = ipv4(mac_of(1), A, B, IPPROTO_UDP, &udp(1, 2));
        assert_eq!(h.judge(&ct, S, 99, &f).verdict, Verdict::Drop(D::UnknownEndpoint));
    }

    #[test]
    fn arp_requests_are_answered_with_the_gateway_mac() {
        let (st, local) = fixture();
        let h = host(&st, &local);
        #[rustfmt::skip]
        let req: [u8; 42] = [
            0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02, 0xaa, 0, 0, 0, 1, 0x08, 0x06,
            0, 1, 0x08, 0x00, 6, 4, 0, 1,
            0x02, 0xaa, 0, 0, 0, 1, 10, 0, 0, 1,
            0, 0, 0, 0, 0, 0, 10, 0, 255, 254,
        ];
        #[rustfmt::skip]
        let want: [u8; 42] = [
            0x02, 0xaa, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 0x01, 0x08, 0x06,
            0, 1, 0x08, 0x00, 6, 4, 0, 2,
            0x02, 0, 0, 0, 0, 0x01, 10, 0, 255, 254,
            0x02, 0xaa, 0, 0, 0, 1, 10, 0, 0, 1,
        ];
        let ct = Conntrack::default();
        assert_eq!(h.judge(&ct, S, 11, &req).verdict, Verdict::ArpReply { frame: want.to_vec() });
        let mut announce = req;
        announce[38..42].copy_from_slice(&[10, 0, 0, 1]);
        assert_eq!(h.judge(&ct, S, 11, &announce).verdict, Verdict::Drop(D::ArpUnanswered));
        let mut probe = announce;
        probe[28..32].copy_from_slice(&[0, 0, 0, 0]);
        assert_eq!(h.judge(&ct, S, 11, &probe).verdict, Verdict::Drop(D::ArpUnanswered));
        assert_eq!(h.judge(&ct, S, 12, &req).verdict, Verdict::Drop(D::SpoofedMac));
        assert_eq!(h.judge(&ct, S, 99, &req).verdict, Verdict::Drop(D::UnknownEndpoint));
        let mut reply = req;
        reply[21] = 2;
        assert_eq!(h.judge(&ct, S, 11, &reply).verdict, Verdict::Drop(D::ArpUnanswered));
        assert_eq!(h.judge(&ct, S, 11, &req[..41]).verdict, Verdict::Drop(D::ArpUnanswered));
    }

    #[test]
    fn s11_unparsable_packets_are_dropped_with_their_reason() {
        let (st, local) = fixture();
        let h = host(&st, &local);
        let ct = Conntrack::default();
        let j = |f: &[u8]| h.judge(&ct, S, 11, f).verdict;
        let good = ipv4(mac_of(1), A, B, IPPROTO_TCP, &tcp(1, 2, SYN));
        assert!(delivered_to(&j(&good)).is_some());
        assert_eq!(j(&good[..13]), Verdict::Drop(D::TruncatedEthernet));
        let mut v6 = good.clone();
        v6[12..14].copy_from_slice(&[0x86, 0xdd]);
        assert_eq!(j(&v6), Verdict::Drop(D::Ipv6Unsupported));
        let mut vlan = good.clone();
        vlan[12..14].copy_from_slice(&[0x81, 0x00]);
        assert_eq!(j(&vlan), Verdict::Drop(D::UnknownEthertype));
        // Every cut inside the IPv4 header, then inside TCP.
        for cut in 14..34 {
            assert_eq!(j(&good[..cut]), Verdict::Drop(D::MalformedIpv4), "cut {cut}");
        }
        for cut in 34..54 {
            let mut f = good[..cut].to_vec();
            f[16..18].copy_from_slice(&((cut - 14) as u16).to_be_bytes());
            assert_eq!(j(&f), Verdict::Drop(D::MalformedL4), "cut {cut}");
        }
        let mut v5 = good.clone();
        v5[14] = 0x55;
        assert_eq!(j(&v5), Verdict::Drop(D::MalformedIpv4));
        let mut ihl4 = good.clone();
        ihl4[14] = 0x44;
        assert_eq!(j(&ihl4), Verdict::Drop(D::MalformedIpv4));
        let mut long = good.clone();
        long[17] += 1;
        assert_eq!(j(&long), Verdict::Drop(D::MalformedIpv4));
        let mut mf = good.clone();
        mf[20] = 0x20;
        assert_eq!(j(&mf), Verdict::Drop(D::Fragment));
        let mut off = good.clone();
        off[21] = 0x01;
        assert_eq!(j(&off), Verdict::Drop(D::Fragment));
        // TCP data offset 4: malformed; padding after the datagram is fine.
        let mut doff = good.clone();
        doff[46] = 0x40;
        assert_eq!(j(&doff), Verdict::Drop(D::MalformedL4));
        let mut padded = good.clone();
        padded.extend_from_slice(&[0; 6]);
        assert!(delivered_to(&j(&padded)).is_some());
    }

    #[test]
    fn ipv4_options_are_skipped_to_find_the_ports() {
        let (st, local) = fixture();
        let h = host(&st, &local);
        let ct = Conntrack::default();
        // ep-1 -> web:80 with 8 bytes of options (two NOPs and an end-of-list, padded).
        let plain = ipv4(mac_of(1), A, W, IPPROTO_TCP, &tcp(1, 80, SYN));
        let mut f = plain[..34].to_vec();
        f.extend_from_slice(&[1, 1, 0, 0, 0, 0, 0, 0]);
        f.extend_from_slice(&plain[34..]);
        f[14] = 0x47;
        let total = (f.len() - 14) as u16;
        f[16..18].copy_from_slice(&total.to_be_bytes());
        assert_eq!(delivered_to(&h.judge(&ct, S, 11, &f).verdict), Some(13));
        let to81 = {
            let mut g = f.clone();
            g[14 + 28 + 3] = 81;
            g
        };
        assert_eq!(h.judge(&ct, S, 11, &to81).verdict, Verdict::Drop(D::PolicyIngress));
    }

    // ---- Direction (S7) -------------------------------------------------------------------

    fn ct_key(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, proto: u8) -> CtKey {
        CtKey { vni: 100, src, dst, sport, dport, proto, _pad: [0; 3] }
    }

    #[test]
    fn s7_roles_of_every_tcp_flag_combination_and_icmp_type() {
        for flags in 0..=255u8 {
            let opens = flags & 0x02 != 0 && flags & (0x10 | 0x04 | 0x01) == 0;
            let want = if opens { Role::Opens } else { Role::Continues };
            assert_eq!(role(IPPROTO_TCP, flags, 0), want, "flags {flags:#04x}");
        }
        for ty in 0..=255u8 {
            let want = match ty {
                8 => Role::Opens,
                0 => Role::Answers,
                _ => Role::Untracked,
            };
            assert_eq!(role(IPPROTO_ICMP, 0, ty), want, "ICMP type {ty}");
        }
        assert_eq!(role(IPPROTO_UDP, 0xff, 0xff), Role::Any);
        assert_eq!(role(47, 0, 0), Role::Any);
        assert!(creates(Role::Opens) && creates(Role::Any));
        assert!(!creates(Role::Continues) && !creates(Role::Answers) && !creates(Role::Untracked));
    }

    #[test]
    fn s7_only_a_syn_creates_a_tcp_flow_and_matches_only_its_own_way() {
        let (st, local) = fixture();
        let h = host(&st, &local);
        let mut ct = Conntrack::default();
        // web (egress all) may send db anything on 5432 (db admits it from web members); db may
        // open nothing (no egress rule).
        let back = |sport: u16| ipv4(mac_of(4), DB, W, IPPROTO_TCP, &tcp(5432, sport, SYN));
        // ACK, FIN+ACK, RST, RST+ACK, PSH+ACK, SYN+FIN, SYN+RST, SYN+ACK, nothing at all.
        for (i, flags) in [0x10, 0x11, 0x04, 0x14, 0x18, 0x03, 0x06, 0x12, 0x00].iter().enumerate()
        {
            let port = 41000 + i as u16;
            let pkt = ipv4(mac_of(3), W, DB, IPPROTO_TCP, &tcp(port, 5432, *flags));
            let out = h.judge(&ct, S, 13, &pkt);
            assert_eq!(delivered_to(&out.verdict), Some(14), "flags {flags:#x}: the rules allow");
            assert_eq!(out.ct, None, "flags {flags:#x}: no flow without a SYN (tcp_loose = 0)");
            // So db's SYN back on the same ports is a new packet, which db may not send.
            assert_eq!(
                h.judge_and_track(&mut ct, S, 14, &back(port)),
                Verdict::Drop(D::PolicyEgress)
            );
        }
        assert!(ct.entries.is_empty());

        // A SYN creates the flow; db's SYN in its reply direction is no hit.
        let syn = ipv4(mac_of(3), W, DB, IPPROTO_TCP, &tcp(42000, 5432, SYN));
        assert_eq!(delivered_to(&h.judge_and_track(&mut ct, S, 13, &syn)), Some(14));
        let key = ct_key(W, DB, 42000, 5432, IPPROTO_TCP);
        assert_eq!(ct.entries[&key].state, ct_state::TCP_OPENING);
        assert_eq!(h.judge_and_track(&mut ct, S, 14, &back(42000)), Verdict::Drop(D::PolicyEgress));
        // A bare ACK in reply is the flow's (delivered) but does not establish it; a SYN-ACK does.
        let ack = ipv4(mac_of(4), DB, W, IPPROTO_TCP, &tcp(5432, 42000, ACKF));
        assert_eq!(delivered_to(&h.judge_and_track(&mut ct, S, 14, &ack)), Some(13));
        assert_eq!(ct.entries[&key].state, ct_state::TCP_OPENING);
        let synack = ipv4(mac_of(4), DB, W, IPPROTO_TCP, &tcp(5432, 42000, SYNACK));
        assert_eq!(delivered_to(&h.judge_and_track(&mut ct, S, 14, &synack)), Some(13));
        assert_eq!(ct.entries[&key].state, ct_state::TCP_ESTABLISHED);
        // Closing: db's SYN in the reply direction still does not reopen it...
        let fin = ipv4(mac_of(3), W, DB, IPPROTO_TCP, &tcp(42000, 5432, 0x11));
        assert_eq!(delivered_to(&h.judge_and_track(&mut ct, S, 13, &fin)), Some(14));
        assert_eq!(ct.entries[&key].state, ct_state::TCP_CLOSING);
        assert_eq!(h.judge_and_track(&mut ct, S, 14, &back(42000)), Verdict::Drop(D::PolicyEgress));
        assert_eq!(ct.entries[&key].state, ct_state::TCP_CLOSING);
        // ...web's SYN in the original direction does (the 5-tuple reused).
        assert_eq!(delivered_to(&h.judge_and_track(&mut ct, 2 * S, 13, &syn)), Some(14));
        assert_eq!(ct.entries[&key].state, ct_state::TCP_OPENING);
        assert_eq!(ct.entries.len(), 1);
    }

    #[test]
    fn s7_a_reply_direction_syn_the_rules_allow_opens_a_flow_of_its_own() {
        let (st, local) = fixture();
        let h = host(&st, &local);
        let mut ct = Conntrack::default();
        // ep-1 and ep-2 (default) admit each other.
        let ab = ipv4(mac_of(1), A, B, IPPROTO_TCP, &tcp(1000, 2000, SYN));
        assert_eq!(delivered_to(&h.judge_and_track(&mut ct, S, 11, &ab)), Some(12));
        let ba = ipv4(mac_of(2), B, A, IPPROTO_TCP, &tcp(2000, 1000, SYN));
        assert_eq!(delivered_to(&h.judge_and_track(&mut ct, S, 12, &ba)), Some(11));
        assert_eq!(ct.entries[&ct_key(A, B, 1000, 2000, 6)].state, ct_state::TCP_OPENING);
        assert_eq!(ct.entries[&ct_key(B, A, 2000, 1000, 6)].state, ct_state::TCP_OPENING);
    }

    #[test]
    fn s7_echo_requests_open_flows_echo_replies_only_answer_other_icmp_is_untracked() {
        let (mut st, local) = fixture();
        st.groups.get_mut("sg-db").unwrap().ingress.push(rule(
            "icmp",
            Direction::Ingress,
            Protocol::ICMP,
            None,
            cidr("0.0.0.0/0"),
        ));
        let h = host(&st, &local);
        let mut ct = Conntrack::default();
        // web (egress all) may send db any ICMP; db may send nothing of its own.
        let web = |ty: u8, id: u16| ipv4(mac_of(3), W, DB, IPPROTO_ICMP, &icmp(ty, 0, id, b"x"));
        let db = |ty: u8, id: u16| ipv4(mac_of(4), DB, W, IPPROTO_ICMP, &icmp(ty, 0, id, b"x"));
        // An echo reply opens nothing: db's echo request with that id is its own, refused.
        let out = h.judge(&ct, S, 13, &web(0, 7));
        assert_eq!((delivered_to(&out.verdict), out.ct), (Some(14), None));
        assert_eq!(h.judge_and_track(&mut ct, S, 14, &db(8, 7)), Verdict::Drop(D::PolicyEgress));
        // An echo request opens a flow its reply matches, and a request back does not.
        assert!(delivered_to(&h.judge_and_track(&mut ct, S, 13, &web(8, 9))).is_some());
        assert_eq!(delivered_to(&h.judge_and_track(&mut ct, S, 14, &db(0, 9))), Some(13));
        assert_eq!(h.judge_and_track(&mut ct, S, 14, &db(8, 9)), Verdict::Drop(D::PolicyEgress));
        // Other ICMP (a timestamp request) is delivered by the rules and tracked never: its
        // reply is db's own traffic. Not even an echo flow of identifier 0, whose key is
        // (0, 0) like theirs, admits them.
        let out = h.judge(&ct, S, 13, &web(13, 0));
        assert_eq!((delivered_to(&out.verdict), out.ct), (Some(14), None));
        assert!(delivered_to(&h.judge_and_track(&mut ct, S, 13, &web(8, 0))).is_some());
        assert_eq!(h.judge_and_track(&mut ct, S, 14, &db(14, 0)), Verdict::Drop(D::PolicyEgress));
        assert_eq!(delivered_to(&h.judge_and_track(&mut ct, S, 14, &db(0, 0))), Some(13));
        assert_eq!(ct.entries.len(), 2, "the two echo flows");
    }

    // ---- Related ICMP errors (S6) -----------------------------------------------------------

    /// An ICMP error of `ty`/`code` quoting `quote`, zero-padded to `total` bytes of IPv4.
    fn error_frame(
        mac: [u8; 6],
        src: [u8; 4],
        dst: [u8; 4],
        (ty, code): (u8, u8),
        quote: &[u8],
        total: usize,
    ) -> Vec<u8> {
        let mut payload = quote.to_vec();
        payload.resize(payload.len().max(total.saturating_sub(28)), 0);
        ipv4(mac, src, dst, IPPROTO_ICMP, &icmp(ty, code, 0, &payload))
    }

    #[test]
    fn s6_related_errors_come_from_the_peer_are_errors_and_no_longer_than_a_routers() {
        let (st, local) = fixture();
        let h = host(&st, &local);
        let mut ct = Conntrack::default();
        // web -> db:5432 tracked. db has no egress rule, web admits only TCP/80: whatever is
        // not related is refused, by db's egress or web's ingress.
        let syn = ipv4(mac_of(3), W, DB, IPPROTO_TCP, &tcp(40000, 5432, SYN));
        assert!(delivered_to(&h.judge_and_track(&mut ct, S, 13, &syn)).is_some());
        let quote = syn[ETH_HLEN..ETH_HLEN + 28].to_vec();
        let from_db = |kind, total| error_frame(mac_of(4), DB, W, kind, &quote, total);
        let related = h.judge(&ct, S, 14, &from_db((3, 3), 56));
        assert_eq!(delivered_to(&related.verdict), Some(13), "the peer's port unreachable");
        assert_eq!(related.ct, None, "a related error touches no flow");

        // Every type and code: only the errors are related.
        for ty in 0..=255u8 {
            for code in 0..=20u8 {
                let want = is_error(IPPROTO_ICMP, (ty, code));
                assert_eq!(
                    want,
                    matches!((ty, code), (3, 0..=15) | (11, 0..=1) | (12, 0..=2)),
                    "{ty}/{code}"
                );
                let v = h.judge(&ct, S, 14, &from_db((ty, code), 56)).verdict;
                if want {
                    assert_eq!(delivered_to(&v), Some(13), "type {ty} code {code} is related");
                } else {
                    assert_eq!(v, Verdict::Drop(D::PolicyEgress), "type {ty} code {code}: judged");
                }
            }
        }
        // No longer than a router's error.
        assert_eq!(delivered_to(&h.judge(&ct, S, 14, &from_db((3, 4), 576)).verdict), Some(13));
        let long = from_db((3, 4), 577);
        assert_eq!(h.judge(&ct, S, 14, &long).verdict, Verdict::Drop(D::PolicyEgress));
        let long = from_db((11, 0), 1256);
        assert_eq!(h.judge(&ct, S, 14, &long).verdict, Verdict::Drop(D::PolicyEgress));

        // A stranger (ep-1: egress all) quoting web's flow with db: judged by web's ingress.
        for kind in [(3, 3), (3, 4), (11, 0), (12, 0)] {
            let stranger = error_frame(mac_of(1), A, W, kind, &quote, 56);
            assert_eq!(h.judge(&ct, S, 11, &stranger).verdict, Verdict::Drop(D::PolicyIngress));
        }
        // The peer quoting the flow with the addresses swapped (as if web had sent it the
        // error's way): not the packet web sent, not related.
        let mut swapped = quote.clone();
        swapped[12..16].copy_from_slice(&DB);
        swapped[16..20].copy_from_slice(&W);
        let v = h.judge(&ct, S, 14, &error_frame(mac_of(4), DB, W, (3, 3), &swapped, 56)).verdict;
        assert_eq!(v, Verdict::Drop(D::PolicyEgress));
        // The flow's reply direction: db's SYN-ACK quoted by web, sent back to db, is related.
        let synack = ipv4(mac_of(4), DB, W, IPPROTO_TCP, &tcp(5432, 40000, SYNACK));
        let err = error_frame(mac_of(3), W, DB, (3, 3), &synack[ETH_HLEN..ETH_HLEN + 28], 56);
        assert_eq!(delivered_to(&h.judge(&ct, S, 13, &err).verdict), Some(14));
        assert_eq!(ct.entries.len(), 1);
    }

    // ---- Two hosts: wrap, frag-needed, unwrap ------------------------------------------------

    const HERE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
    const THERE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
    const R: [u8; 4] = [10, 0, 0, 6];
    const UNDERLAY: Underlay = Underlay { ip: HERE, mtu: 1500 };

    /// The fixture on host h1 (198.18.0.1), plus ep-6 (10.0.0.6, sg-web, identity 6) placed on
    /// host h2 (198.18.0.2).
    fn fleet_fixture() -> (State, BTreeMap<u32, String>) {
        let (mut st, local) = fixture();
        for (name, ip) in [(HOST, HERE), ("h2", THERE)] {
            st.hosts.insert(
                name.into(),
                model::HostRecord { name: name.into(), underlay_ip: Some(ip), api: None },
            );
        }
        let mut remote = st.endpoints["ep-3"].clone();
        remote.id = "ep-6".into();
        remote.host = "h2".into();
        remote.ip = Ipv4Addr::from(R);
        remote.mac = "02:aa:00:00:00:06".into();
        remote.identity = 6;
        st.endpoints.insert("ep-6".into(), remote);
        (st, local)
    }

    /// What host `from` sends this host for the inner IPv4 packet `inner` (no Ethernet header):
    /// outer Ethernet/IPv4/UDP 4789, VXLAN-GBP with `group` and `vni`, inner Ethernet to `mac`.
    fn wrapped(from: Ipv4Addr, group: u16, vni: u32, mac: [u8; 6], inner: &[u8]) -> Vec<u8> {
        let mut f = vec![0x02, 0x55, 0, 0, 0, 1, 0x02, 0x55, 0, 0, 0, 2, 0x08, 0x00];
        let total = (20 + 8 + 8 + 14 + inner.len()) as u16;
        f.extend_from_slice(&[0x45, 0]);
        f.extend_from_slice(&total.to_be_bytes());
        f.extend_from_slice(&[0, 0, 0x40, 0, 64, IPPROTO_UDP, 0, 0]);
        f.extend_from_slice(&from.octets());
        f.extend_from_slice(&HERE.octets());
        f.extend_from_slice(&[0xc0, 0x01, 0x12, 0xb5]);
        f.extend_from_slice(&(total - 20).to_be_bytes());
        f.extend_from_slice(&[0, 0, 0x88, 0]);
        f.extend_from_slice(&group.to_be_bytes());
        f.extend_from_slice(&vni.to_be_bytes()[1..]);
        f.push(0);
        f.extend_from_slice(&mac);
        f.extend_from_slice(&GW);
        f.extend_from_slice(&[0x08, 0x00]);
        f.extend_from_slice(inner);
        f
    }

    #[test]
    fn remote_receivers_are_wrapped_or_answered_frag_needed_and_need_an_underlay() {
        let (st, local) = fleet_fixture();
        let no_underlay = host(&st, &local);
        let h = host(&st, &local).with_underlay(UNDERLAY);
        let mut ct = Conntrack::default();
        // ep-1 (egress all) to ep-6 on h2: the receiver's rules are h2's business.
        let syn = ipv4(mac_of(1), A, R, IPPROTO_TCP, &tcp(40000, 22, SYN));
        // As the kernel counts it (`no_underlay`), not as a missing route.
        assert_eq!(no_underlay.judge(&ct, S, 11, &syn).verdict, Verdict::Drop(D::NoUnderlay));
        let out = h.judge(&ct, S, 11, &syn);
        let Verdict::Wrap { frame } = &out.verdict else { panic!("{:?}", out.verdict) };
        assert_eq!(frame.len(), syn.len() + 50);
        assert_eq!(&frame[..14], &syn[..14], "the outer Ethernet header is the packet's own");
        assert_eq!(&frame[14..16], &[0x45, 0]);
        assert_eq!(&frame[16..18], &((syn.len() + 36) as u16).to_be_bytes());
        assert_eq!(&frame[20..24], &[0x40, 0, 64, 17], "DF, TTL 64, UDP");
        assert_eq!(checksum(&frame[14..34]), 0, "outer header checksum");
        assert_eq!(&frame[26..34], &[198, 18, 0, 1, 198, 18, 0, 2]);
        assert_eq!(&frame[34..36], &[0, 0], "the source port is left to the comparison");
        assert_eq!(&frame[36..42], &[0x12, 0xb5, 0, (syn.len() + 16) as u8, 0, 0]);
        assert_eq!(&frame[42..50], &[0x88, 0, 0, 1, 0, 0, 100, 0], "ep-1's identity, uni-1");
        assert_eq!(&frame[50..56], &mac_of(6));
        assert_eq!(&frame[56..62], &GW);
        assert_eq!(&frame[62..], &syn[12..], "type, then the packet untouched");
        ct.apply(&out.ct.expect("the flow is tracked"));
        // 1451 bytes of IPv4 do not fit a 1500-byte underlay once wrapped: frag-needed back.
        let big =
            ipv4(mac_of(1), A, R, IPPROTO_TCP, &[tcp(40001, 22, SYN), vec![7; 1411]].concat());
        let out = h.judge(&ct, S, 11, &big);
        assert_eq!(out.ct, None, "a refused packet tracks nothing");
        let Verdict::FragNeeded { frame } = &out.verdict else { panic!("{:?}", out.verdict) };
        assert_eq!(frame.len(), 14 + 20 + 8 + 128);
        assert_eq!(&frame[..12], &[mac_of(1), GW].concat());
        assert_eq!(&frame[26..34], &[10, 0, 0, 6, 10, 0, 0, 1], "from the destination");
        assert_eq!(checksum(&frame[14..34]), 0);
        assert_eq!(&frame[34..36], &[3, 4]);
        assert_eq!(checksum(&frame[34..]), 0);
        assert_eq!(&frame[40..42], &1450u16.to_be_bytes());
        assert_eq!(&frame[42..], &big[14..142]);
        let fits =
            ipv4(mac_of(1), A, R, IPPROTO_TCP, &[tcp(40001, 22, SYN), vec![7; 1410]].concat());
        assert!(matches!(h.judge(&ct, S, 11, &fits).verdict, Verdict::Wrap { .. }));
        // A reply from ep-6 through h2 is unwrapped and delivered by conntrack.
        let reply = ipv4(mac_of(6), R, A, IPPROTO_TCP, &tcp(22, 40000, SYNACK));
        let w = wrapped(THERE, 6, 100, mac_of(1), &reply[14..]);
        let out = h.judge_underlay(&ct, S, &w);
        let mut want = reply.clone();
        want[..12].copy_from_slice(&[mac_of(1), GW].concat());
        assert_eq!(out.verdict, Verdict::Deliver { ifindex: 11, frame: want });
        assert_eq!(out.ct.map(|u| u.entry.state), Some(ct_state::TCP_ESTABLISHED));
    }

    #[test]
    fn underlay_frames_are_checked_in_order_then_judged_by_the_receivers_rules() {
        let (st, local) = fleet_fixture();
        let h = host(&st, &local).with_underlay(UNDERLAY);
        let ct = Conntrack::default();
        let j = |f: &[u8]| h.judge_underlay(&ct, S, f).verdict;
        let to_web = ipv4(mac_of(6), R, W, IPPROTO_TCP, &tcp(1, 80, SYN));
        let good = wrapped(THERE, 6, 100, mac_of(3), &to_web[14..]);
        let mut want = to_web.clone();
        want[..12].copy_from_slice(&[mac_of(3), GW].concat());
        assert_eq!(j(&good), Verdict::Deliver { ifindex: 13, frame: want });
        // Not Verse's: passed.
        assert_eq!(host(&st, &local).judge_underlay(&ct, S, &good).verdict, Verdict::Pass);
        let mut other_port = good.clone();
        other_port[36..38].copy_from_slice(&53u16.to_be_bytes());
        assert_eq!(j(&other_port), Verdict::Pass);
        let mut elsewhere = good.clone();
        elsewhere[33] = 9;
        assert_eq!(j(&elsewhere), Verdict::Pass);
        assert_eq!(j(&good[..33]), Verdict::Pass);
        // Fail closed in order.
        let mut mf = good.clone();
        mf[20] = 0x20;
        assert_eq!(j(&mf), Verdict::Drop(D::MalformedEncap));
        let unknown = wrapped(Ipv4Addr::new(198, 18, 0, 9), 6, 100, mac_of(3), &to_web[14..]);
        assert_eq!(j(&unknown), Verdict::Drop(D::UnknownHost));
        let mut flags = good.clone();
        flags[42] = 0x08;
        assert_eq!(j(&flags), Verdict::Drop(D::MalformedEncap));
        let bad_vni = wrapped(THERE, 6, 300, mac_of(3), &to_web[14..]);
        assert_eq!(j(&bad_vni), Verdict::Drop(D::UnknownUniverse));
        let mut v6 = good.clone();
        v6[62..64].copy_from_slice(&[0x86, 0xdd]);
        assert_eq!(j(&v6), Verdict::Drop(D::Ipv6Unsupported));
        let local_src = ipv4(mac_of(1), A, W, IPPROTO_TCP, &tcp(1, 80, SYN));
        let forged = wrapped(THERE, 1, 100, mac_of(3), &local_src[14..]);
        assert_eq!(j(&forged), Verdict::Drop(D::NotPlacedOnSender));
        let to_nobody = ipv4(mac_of(6), R, [10, 0, 0, 99], IPPROTO_TCP, &tcp(1, 80, SYN));
        let nobody = wrapped(THERE, 6, 100, mac_of(3), &to_nobody[14..]);
        assert_eq!(j(&nobody), Verdict::Drop(D::NotLocal));
        // ep-6 (sg-web) is no member of default: ep-1 does not admit it.
        let to_a = ipv4(mac_of(6), R, A, IPPROTO_TCP, &tcp(1, 80, SYN));
        let denied = wrapped(THERE, 6, 100, mac_of(1), &to_a[14..]);
        assert_eq!(j(&denied), Verdict::Drop(D::PolicyIngress));
        // S10: the header's identity must be the one the control plane gives ep-6 (6). Claiming
        // ep-1's (1, a member of default, which ep-1 admits) is dropped, as is any other.
        for claimed in [1u16, 5, 0, 0xffff] {
            let forged = wrapped(THERE, claimed, 100, mac_of(1), &to_a[14..]);
            assert_eq!(j(&forged), Verdict::Drop(D::IdentityMismatch), "identity {claimed}");
            let forged = wrapped(THERE, claimed, 100, mac_of(3), &to_web[14..]);
            assert_eq!(j(&forged), Verdict::Drop(D::IdentityMismatch), "identity {claimed}");
        }
    }

    #[test]
    fn s6_related_errors_over_the_underlay_come_from_the_peer_placed_on_the_sending_host() {
        let (mut st, local) = fleet_fixture();
        // ep-7 on h2 too: a stranger to web's flow with ep-6.
        let mut stranger = st.endpoints["ep-6"].clone();
        stranger.id = "ep-7".into();
        stranger.ip = Ipv4Addr::new(10, 0, 0, 7);
        stranger.mac = "02:aa:00:00:00:07".into();
        st.endpoints.insert("ep-7".into(), stranger);
        let h = host(&st, &local).with_underlay(UNDERLAY);
        let mut ct = Conntrack::default();
        let syn = ipv4(mac_of(3), W, R, IPPROTO_TCP, &tcp(40000, 22, SYN));
        let out = h.judge(&ct, S, 13, &syn);
        assert!(matches!(out.verdict, Verdict::Wrap { .. }));
        ct.apply(&out.ct.expect("tracked"));
        let quote = syn[ETH_HLEN..ETH_HLEN + 28].to_vec();
        // web admits only TCP/80: what is not related is refused by its ingress rules.
        let error = |from: [u8; 4], kind, total| {
            let f = error_frame(mac_of(6), from, W, kind, &quote, total);
            wrapped(THERE, 6, 100, mac_of(3), &f[ETH_HLEN..])
        };
        let v = h.judge_underlay(&ct, S, &error(R, (3, 4), 56));
        assert_eq!(delivered_to(&v.verdict), Some(13), "the peer's frag-needed is related");
        assert_eq!(v.ct, None);
        for (from, kind, total, what) in [
            ([10, 0, 0, 7], (3, 4), 56, "a stranger on the same host"),
            (R, (3, 4), 577, "longer than a router's"),
            (R, (3, 16), 56, "not an error code"),
        ] {
            let v = h.judge_underlay(&ct, S, &error(from, kind, total)).verdict;
            assert_eq!(v, Verdict::Drop(D::PolicyIngress), "{what}");
        }
    }
}
