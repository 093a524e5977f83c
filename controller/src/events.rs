//! Verdict events: what the dataplane reports through its ring buffer (`VERSE_EVENTS`, one
//! [`dp::Event`] per dropped packet or admitted new flow), as `GET /v1/events` and
//! `verse monitor` show them.
//!
//! Contract:
//! - [`render`] turns a kernel record into an [`EventRecord`] (pure): the universe, the
//!   endpoints and the rules it names are looked up in the desired state ([`Index`]), and a
//!   policy drop says what was searched ("no ingress rule of groups sg-a (web), sg-b admits
//!   tcp/5432 from 10.0.0.7 (identity 12)").
//! - [`Filter`] is the query of `GET /v1/events` (and of `verse monitor`); it matches records.
//! - One line of the stream is a [`StreamItem`]: an event, or a notice (events a host could
//!   not send: suppressed by the rate limit, lost, or a host that cannot be reached).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use aya::maps::{MapData, RingBuf};
use dataplane_common::{self as dp, event_kind, DropReason, EventLimiter, Hook};
use serde::{Deserialize, Serialize};
use tokio::io::unix::AsyncFd;
use tokio::sync::{broadcast, watch};

use crate::model::{self, Direction, Protocol, State, Timestamp};

/// One line of `GET /v1/events`: `{"kind": "event", ...}` or `{"kind": "notice", ...}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
#[allow(clippy::large_enum_variant, reason = "one item per line of a stream, serialized at once")]
pub enum StreamItem {
    Event(EventRecord),
    Notice(Notice),
}

/// What became of a packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// A new flow admitted by policy (the first packet of a tracked connection).
    Admitted,
    /// A dropped packet.
    Dropped,
}

impl Verdict {
    pub fn name(self) -> &'static str {
        match self {
            Verdict::Admitted => "admitted",
            Verdict::Dropped => "dropped",
        }
    }
}

/// A rule named by an event: the rule that admitted a new flow.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleRef {
    /// `sgr-…`
    pub id: String,
    /// The rule's security group, `sg-…`, and its name.
    pub group: String,
    pub group_name: String,
    pub direction: Direction,
}

/// What a policy drop searched: the rules of these groups, in this direction, of this endpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Searched {
    pub direction: Direction,
    /// The endpoint whose rules were searched (the sender for egress, the receiver for
    /// ingress), when it is known.
    pub endpoint: Option<String>,
    /// Its security groups (`sg-…`), through its identity.
    pub groups: Vec<String>,
    /// The identity whose policy was searched.
    pub identity: u32,
}

/// A packet's transport fields as events and traces show them (flattened into theirs).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transport {
    /// TCP and UDP only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sport: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dport: Option<u16>,
    /// ICMP and ICMPv6 only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub icmp_type: Option<u8>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub icmp_code: Option<u8>,
}

impl Transport {
    /// The service as every message (events, traces) writes it: `tcp/5432`, `udp/53`,
    /// `icmp type 8 code 0`, `icmpv6 type 128 code 0`, `protocol 47`; `protocol` is the
    /// packet's protocol by name ([`protocol_name`]).
    pub fn service(&self, protocol: &str) -> String {
        match (self.dport, self.icmp_type) {
            (Some(port), _) => format!("{protocol}/{port}"),
            (None, Some(t)) => format!("{protocol} type {t} code {}", self.icmp_code.unwrap_or(0)),
            (None, None) => format!("protocol {protocol}"),
        }
    }
}

/// One verdict of one host's dataplane.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRecord {
    /// When the packet was judged (the kernel's clock, to the nanosecond).
    pub time: Timestamp,
    /// The host whose dataplane judged it.
    pub host: String,
    /// `from_endpoint` (a workload sent it) or `from_underlay` (another host sent it).
    pub hook: String,
    pub verdict: Verdict,
    /// The drop reason (README, "How it works"); absent for an admitted flow.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub universe: Option<String>,
    /// The local endpoint the hook judged for: the sender at `from_endpoint`, the receiver
    /// at `from_underlay`.
    pub endpoint: Option<String>,
    /// `tcp`, `udp`, `icmp`, `icmpv6` or the protocol number; absent when no IP header was read
    /// (or, for IPv6, its extension headers did not walk to the upper layer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<String>,
    /// The (inner) packet's addresses, IPv4 or IPv6.
    pub src: Option<IpAddr>,
    pub dst: Option<IpAddr>,
    #[serde(flatten)]
    pub transport: Transport,
    /// The endpoints at the source and destination addresses, if any.
    pub src_endpoint: Option<String>,
    pub dst_endpoint: Option<String>,
    /// Their security identities as the dataplane knew them (at `from_underlay`, the source's
    /// is the one its VXLAN-GBP header carried).
    pub src_identity: Option<u32>,
    pub dst_identity: Option<u32>,
    /// The other host (the sender at `from_underlay`, the receiver's when the packet was
    /// wrapped to another host), by name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_host: Option<String>,
    /// An admitted flow: the rules that admitted it (the sender's egress rule and, when the
    /// receiver is judged at this hook, its ingress rule).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<RuleRef>,
    /// A policy drop: what was searched.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub searched: Option<Searched>,
    /// The packet's length at the hook (with the encapsulation at `from_underlay`).
    pub bytes: u32,
    /// The verdict in a sentence.
    pub message: String,
}

/// Something the stream could not show as events.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notice {
    pub time: Timestamp,
    /// The host it is about.
    pub host: String,
    pub message: String,
}

/// The desired state, indexed for rendering events: built once per state, not per event.
#[derive(Clone, Debug, Default)]
pub struct Index {
    universes: HashMap<u32, String>,
    endpoints: HashMap<(String, IpAddr), String>,
    rules: HashMap<u32, IndexedRule>,
    groups: HashMap<String, IndexedGroup>,
    identities: HashMap<u32, (String, Vec<String>)>,
    hosts: HashMap<Ipv4Addr, String>,
}

#[derive(Clone, Debug)]
struct IndexedRule {
    id: String,
    group: String,
    direction: Direction,
}

#[derive(Clone, Debug)]
struct IndexedGroup {
    name: String,
    universe: String,
}

impl Index {
    pub fn new(state: &State) -> Index {
        let mut ix = Index::default();
        for u in state.universes.values() {
            ix.universes.insert(u.vni, u.id.clone());
        }
        for e in state.endpoints.values() {
            ix.endpoints.insert((e.universe.clone(), IpAddr::V4(e.ip)), e.id.clone());
            if let Some(ip6) = e.ipv6 {
                ix.endpoints.insert((e.universe.clone(), IpAddr::V6(ip6)), e.id.clone());
            }
        }
        for g in state.groups.values() {
            ix.groups.insert(
                g.id.clone(),
                IndexedGroup { name: g.name.clone(), universe: g.universe.clone() },
            );
            for r in g.ingress.iter().chain(&g.egress) {
                if let Some(bits) = model::rule_bits(&r.id) {
                    ix.rules.insert(
                        bits,
                        IndexedRule {
                            id: r.id.clone(),
                            group: g.id.clone(),
                            direction: r.direction,
                        },
                    );
                }
            }
        }
        for (&n, i) in &state.identities {
            ix.identities.insert(n, (i.universe.clone(), i.groups.clone()));
        }
        for h in state.hosts.values() {
            if let Some(ip) = h.underlay_ip {
                ix.hosts.insert(ip, h.name.clone());
            }
        }
        ix
    }

    /// The rule whose id has these 32 bits, with its group.
    pub fn rule(&self, bits: u32) -> Option<RuleRef> {
        let r = self.rules.get(&bits)?;
        let name = self.groups.get(&r.group).map(|g| g.name.clone()).unwrap_or_default();
        Some(RuleRef {
            id: r.id.clone(),
            group: r.group.clone(),
            group_name: name,
            direction: r.direction,
        })
    }

    /// The universe of the rule whose id has these 32 bits.
    pub fn rule_universe(&self, bits: u32) -> Option<&str> {
        let r = self.rules.get(&bits)?;
        self.groups.get(&r.group).map(|g| g.universe.as_str())
    }

    /// The groups of an identity.
    pub fn identity_groups(&self, identity: u32) -> Option<&[String]> {
        self.identities.get(&identity).map(|(_, g)| g.as_slice())
    }

    pub fn universe_of_vni(&self, vni: u32) -> Option<&str> {
        self.universes.get(&vni).map(String::as_str)
    }

    /// The endpoint of `universe` at `ip`, its IPv4 address or its IPv6 one.
    pub fn endpoint_at(&self, universe: &str, ip: IpAddr) -> Option<&str> {
        self.endpoints.get(&(universe.to_owned(), ip)).map(String::as_str)
    }

    pub fn host_at(&self, underlay: Ipv4Addr) -> Option<&str> {
        self.hosts.get(&underlay).map(String::as_str)
    }

    fn group_label(&self, id: &str) -> String {
        match self.groups.get(id) {
            Some(g) if g.name != id => format!("{id} ({})", g.name),
            _ => id.to_owned(),
        }
    }
}

/// What [`render`] needs besides the record.
pub struct Context<'a> {
    /// This host's name.
    pub host: &'a str,
    pub index: &'a Index,
    /// This host's plumbed endpoints: host-side ifindex -> endpoint id.
    pub local: &'a BTreeMap<u32, String>,
    /// The wall-clock time at which CLOCK_MONOTONIC was 0 (see [`monotonic_epoch`]).
    pub boot: SystemTime,
}

/// The wall-clock time at which CLOCK_MONOTONIC read 0 (now minus the monotonic clock), to
/// date kernel timestamps. Re-read it now and then: the wall clock may be stepped.
pub fn monotonic_epoch() -> SystemTime {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    let now = SystemTime::now();
    if rc != 0 {
        return now;
    }
    let mono = Duration::new(ts.tv_sec.max(0) as u64, ts.tv_nsec.clamp(0, 999_999_999) as u32);
    now.checked_sub(mono).unwrap_or(SystemTime::UNIX_EPOCH)
}

/// The name of an IP protocol as rules show it.
pub fn protocol_name(proto: u8) -> String {
    Protocol::Number(proto).name()
}

/// `sgr-` and the 8 hex digits of a rule id's bits.
pub fn rule_id(bits: u32) -> String {
    format!("sgr-{bits:08x}")
}

/// Renders a kernel record.
pub fn render(e: &dp::Event, cx: &Context<'_>) -> EventRecord {
    let hook = Hook::from_code(e.hook);
    let verdict = if e.kind == event_kind::NEW_FLOW { Verdict::Admitted } else { Verdict::Dropped };
    let reason = (verdict == Verdict::Dropped).then(|| DropReason::from_code(e.reason));
    let ip = |a: IpAddr| (!a.is_unspecified()).then_some(a);
    let (src, dst) = e.addrs().map_or((None, None), |(s, d)| (ip(s), ip(d)));
    // An IPv6 packet whose extension headers did not walk has addresses and no protocol.
    let parsed = e.ip_version == 4 || (e.ip_version == 6 && e.proto != 0);
    let universe =
        (e.vni != 0).then(|| cx.index.universe_of_vni(e.vni)).flatten().map(str::to_owned);
    let at = |a: Option<IpAddr>| {
        universe.as_deref().zip(a).and_then(|(u, a)| cx.index.endpoint_at(u, a)).map(str::to_owned)
    };
    let (src_endpoint, dst_endpoint) = (at(src), at(dst));
    let endpoint = cx.local.get(&e.ifindex).cloned().or_else(|| match hook {
        Some(Hook::FromEndpoint) => src_endpoint.clone(),
        Some(Hook::FromUnderlay) => dst_endpoint.clone(),
        None => None,
    });
    let transport = match (parsed, e.proto) {
        (true, 6 | 17) => {
            Transport { sport: Some(e.sport), dport: Some(e.dport), ..Transport::default() }
        }
        (true, 1 | 58) => Transport {
            icmp_type: Some((e.dport >> 8) as u8),
            icmp_code: Some(e.dport as u8),
            ..Transport::default()
        },
        _ => Transport::default(),
    };
    let nonzero = |v: u32| (v != 0).then_some(v);
    let rules: Vec<RuleRef> = if verdict == Verdict::Admitted {
        [e.rule_egress, e.rule_ingress]
            .into_iter()
            .filter(|&b| b != 0)
            .map(|b| {
                cx.index.rule(b).unwrap_or(RuleRef {
                    id: rule_id(b),
                    group: String::new(),
                    group_name: String::new(),
                    direction: if b == e.rule_egress {
                        Direction::Egress
                    } else {
                        Direction::Ingress
                    },
                })
            })
            .collect()
    } else {
        Vec::new()
    };
    let searched = match reason {
        Some(Some(DropReason::PolicyEgress)) => Some(Searched {
            direction: Direction::Egress,
            endpoint: src_endpoint.clone(),
            groups: groups_of(cx.index, e.src_identity),
            identity: e.src_identity,
        }),
        Some(Some(DropReason::PolicyIngress)) => Some(Searched {
            direction: Direction::Ingress,
            endpoint: dst_endpoint.clone(),
            groups: groups_of(cx.index, e.dst_identity),
            identity: e.dst_identity,
        }),
        _ => None,
    };
    let mut record = EventRecord {
        time: Timestamp(cx.boot + Duration::from_nanos(e.time_ns)),
        host: cx.host.to_owned(),
        hook: hook.map_or_else(|| format!("hook {}", e.hook), |h| h.label().to_owned()),
        verdict,
        reason: reason
            .map(|r| r.map_or_else(|| format!("code {}", e.reason), |r| r.label().to_owned())),
        universe,
        endpoint,
        protocol: parsed.then(|| protocol_name(e.proto)),
        src,
        dst,
        transport,
        src_endpoint,
        dst_endpoint,
        src_identity: nonzero(e.src_identity),
        dst_identity: nonzero(e.dst_identity),
        peer_host: (e.peer_host != [0; 4])
            .then(|| Ipv4Addr::from(e.peer_host))
            .map(|a| cx.index.host_at(a).map_or_else(|| a.to_string(), str::to_owned)),
        rules,
        searched,
        bytes: e.len,
        message: String::new(),
    };
    record.message = message(&record, reason.flatten(), cx.index);
    record
}

fn groups_of(index: &Index, identity: u32) -> Vec<String> {
    index.identity_groups(identity).map(<[String]>::to_vec).unwrap_or_default()
}

/// [`Transport::service`], or "the packet" when no IPv4 header was read.
fn what(r: &EventRecord) -> String {
    match r.protocol.as_deref() {
        Some(p) => r.transport.service(p),
        None => "the packet".to_owned(),
    }
}

fn addr(ip: Option<IpAddr>, identity: Option<u32>) -> String {
    match (ip, identity) {
        (Some(ip), Some(id)) => format!("{ip} (identity {id})"),
        (Some(ip), None) => format!("{ip} (no endpoint)"),
        (None, _) => "an unknown address".to_owned(),
    }
}

fn message(r: &EventRecord, reason: Option<DropReason>, index: &Index) -> String {
    let flow = match (r.src, r.dst) {
        (Some(s), Some(d)) => format!("{} {s} -> {d}", what(r)),
        _ => String::new(),
    };
    if r.verdict == Verdict::Admitted {
        let by: Vec<String> = r
            .rules
            .iter()
            .map(|rule| {
                format!(
                    "{} ({} rule of {})",
                    rule.id,
                    dir(rule.direction),
                    index.group_label(&rule.group)
                )
            })
            .collect();
        return if by.is_empty() {
            format!("new flow {flow}")
        } else {
            format!("new flow {flow} admitted by {}", by.join(" and "))
        };
    }
    if let Some(s) = &r.searched {
        let groups: Vec<String> = s.groups.iter().map(|g| index.group_label(g)).collect();
        let groups = if groups.is_empty() {
            format!("identity {}", s.identity)
        } else {
            format!("groups {}", groups.join(", "))
        };
        let (way, peer) = match s.direction {
            Direction::Egress => ("to", addr(r.dst, r.dst_identity)),
            Direction::Ingress => ("from", addr(r.src, r.src_identity)),
        };
        return format!("no {} rule of {groups} admits {} {way} {peer}", dir(s.direction), what(r));
    }
    let why = reason.map_or("dropped (unknown reason)", describe);
    if flow.is_empty() {
        why.to_owned()
    } else {
        format!("{why}: {flow}")
    }
}

fn dir(d: Direction) -> &'static str {
    match d {
        Direction::Ingress => "ingress",
        Direction::Egress => "egress",
    }
}

/// What a drop reason means, in a phrase (the README's table says the same).
pub fn describe(reason: DropReason) -> &'static str {
    match reason {
        DropReason::TruncatedEthernet => "shorter than an Ethernet header",
        DropReason::UnknownEthertype => "neither IPv4, IPv6 nor ARP",
        DropReason::MalformedIpv4 => "malformed IPv4 header",
        DropReason::Fragment => "an IPv4 fragment, whose ports cannot be judged",
        DropReason::MalformedL4 => "truncated TCP, UDP, ICMP or ICMPv6 header",
        DropReason::UnknownEndpoint => "arrived on an interface that is no endpoint",
        DropReason::SpoofedMac => "source MAC is not the endpoint's",
        DropReason::SpoofedIp => "source IP is not the endpoint's",
        DropReason::NoRoute => "the destination is no endpoint of the universe",
        DropReason::PolicyEgress => "denied by the sender's egress rules",
        DropReason::PolicyIngress => "denied by the receiver's ingress rules",
        DropReason::ArpUnanswered => "an ARP packet the proxy does not answer",
        DropReason::RedirectFailed => "a redirect helper refused the packet",
        DropReason::UnknownHost => {
            "encapsulated traffic from an underlay address that is no host this one exchanges \
             traffic with"
        }
        DropReason::UnknownUniverse => {
            "encapsulated traffic naming a VNI that is no universe with an endpoint here"
        }
        DropReason::NotPlacedOnSender => {
            "the inner source is no endpoint placed on the sending host"
        }
        DropReason::NotLocal => "the inner destination is no endpoint of this host",
        DropReason::MalformedEncap => "truncated or malformed outer, VXLAN or inner headers",
        DropReason::FragNeeded => {
            "too big to wrap; an ICMP \"fragmentation needed\" (ICMPv6 \"packet too big\") went back"
        }
        DropReason::IdentityMismatch => {
            "encapsulated traffic whose Group Policy ID is not its inner source's identity"
        }
        DropReason::NoConfig => "the dataplane's settings could not be read",
        DropReason::MtuCheckFailed => "the MTU check of the underlay device failed",
        DropReason::EncapFailed => "wrapping or unwrapping the encapsulation failed",
        DropReason::NoUnderlay => {
            "the destination is on another host and this host has no underlay"
        }
        DropReason::FragNeededUnsent => {
            "too big to wrap, and the ICMP \"fragmentation needed\" (ICMPv6 \"packet too big\") \
             could not be sent"
        }
        DropReason::ConntrackBudgetExceeded => {
            "a new flow of an endpoint whose conntrack budget is spent"
        }
        DropReason::MalformedIpv6 => {
            "malformed IPv6 header: truncated, version != 6, payload length past the frame, \
             an extension header past the payload, or hop-by-hop options not first"
        }
        DropReason::Ipv6Fragment => "an IPv6 fragment header: fragments are not reassembled",
        DropReason::Ipv6TooManyHeaders => "more IPv6 extension headers than the dataplane walks",
        DropReason::Ipv6Jumbogram => "an IPv6 jumbogram (payload length 0, Jumbo Payload option)",
        DropReason::NdUnanswered => {
            "neighbour discovery the gateway does not answer (duplicate-address detection, the \
             endpoint's own address, router solicitation)"
        }
        DropReason::NdSpoofed => {
            "a router advertisement, redirect, or neighbour advertisement for an address that \
             is not the endpoint's, or neighbour discovery wrapped by another host"
        }
        DropReason::ProgramMissing => {
            "a program the hook hands the packet to (VERSE_JUMP) is not loaded"
        }
        DropReason::MldUnanswered => {
            "multicast listener discovery from the endpoint's own addresses (Verse carries no \
             multicast)"
        }
    }
}

/// The query of `GET /v1/events` and `verse monitor`: every given field must match.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    pub universe: Option<String>,
    /// The local endpoint, or either endpoint of the packet.
    pub endpoint: Option<String>,
    /// A group of an admitting rule, or searched by a policy drop.
    pub group: Option<String>,
    pub verdict: Option<Verdict>,
    pub reason: Option<DropReason>,
    pub rule: Option<String>,
    pub protocol: Option<u8>,
    /// Either port (TCP, UDP).
    pub port: Option<u16>,
    pub host: Option<String>,
}

/// The query parameters of `GET /v1/events`, in the order the README lists them.
pub const FILTER_PARAMS: [&str; 9] =
    ["universe", "endpoint", "group", "verdict", "reason", "rule", "protocol", "port", "host"];

impl Filter {
    /// From query parameters (names of [`FILTER_PARAMS`]); the error is `(field, message)`.
    pub fn parse(q: &BTreeMap<String, String>) -> Result<Filter, (String, String)> {
        let bad = |k: &str, m: String| (k.to_owned(), m);
        let mut f = Filter::default();
        for (k, v) in q {
            match k.as_str() {
                "universe" => f.universe = Some(v.clone()),
                "endpoint" => f.endpoint = Some(v.clone()),
                "group" => f.group = Some(v.clone()),
                "rule" => f.rule = Some(v.clone()),
                "host" => f.host = Some(v.clone()),
                "verdict" => {
                    f.verdict = Some(match v.as_str() {
                        "admitted" => Verdict::Admitted,
                        "dropped" => Verdict::Dropped,
                        _ => return Err(bad(k, format!("{v:?} is neither admitted nor dropped"))),
                    })
                }
                "reason" => {
                    f.reason = Some(DropReason::from_label(v).ok_or_else(|| {
                        bad(k, format!("{v:?} is no drop reason (see the README's table)"))
                    })?)
                }
                "protocol" => {
                    f.protocol = Some(match v.as_str() {
                        "tcp" => 6,
                        "udp" => 17,
                        "icmp" => 1,
                        n => n.parse::<u8>().map_err(|_| {
                            bad(k, format!("{v:?} is not tcp, udp, icmp or a number 0-255"))
                        })?,
                    })
                }
                "port" => {
                    f.port = Some(
                        v.parse::<u16>()
                            .map_err(|_| bad(k, format!("{v:?} is not a port number 0-65535")))?,
                    )
                }
                other => {
                    return Err(bad(
                        other,
                        format!(
                            "unknown query parameter (expected one of: {})",
                            FILTER_PARAMS.join(", ")
                        ),
                    ))
                }
            }
        }
        Ok(f)
    }

    /// The filter as query parameters (for relaying it to another host).
    pub fn to_query(&self) -> Vec<(&'static str, String)> {
        let mut q = Vec::new();
        let mut put = |k: &'static str, v: Option<String>| {
            if let Some(v) = v {
                q.push((k, v));
            }
        };
        put("universe", self.universe.clone());
        put("endpoint", self.endpoint.clone());
        put("group", self.group.clone());
        put("verdict", self.verdict.map(|v| v.name().to_owned()));
        put("reason", self.reason.map(|r| r.label().to_owned()));
        put("rule", self.rule.clone());
        put("protocol", self.protocol.map(|p| p.to_string()));
        put("port", self.port.map(|p| p.to_string()));
        put("host", self.host.clone());
        q
    }

    pub fn matches(&self, r: &EventRecord) -> bool {
        let eq = |want: &Option<String>, have: Option<&String>| {
            want.as_ref().is_none_or(|w| have == Some(w))
        };
        eq(&self.universe, r.universe.as_ref())
            && eq(&self.host, Some(&r.host))
            && self.verdict.is_none_or(|v| v == r.verdict)
            && self.reason.is_none_or(|x| r.reason.as_deref() == Some(x.label()))
            && self.endpoint.as_ref().is_none_or(|e| {
                [&r.endpoint, &r.src_endpoint, &r.dst_endpoint]
                    .iter()
                    .any(|x| x.as_ref() == Some(e))
            })
            && self.group.as_ref().is_none_or(|g| {
                r.rules.iter().any(|rule| &rule.group == g)
                    || r.searched.as_ref().is_some_and(|s| s.groups.contains(g))
            })
            && self.rule.as_ref().is_none_or(|id| r.rules.iter().any(|rule| &rule.id == id))
            && self
                .protocol
                .is_none_or(|p| r.protocol.as_deref() == Some(protocol_name(p).as_str()))
            && self
                .port
                .is_none_or(|p| r.transport.sport == Some(p) || r.transport.dport == Some(p))
    }

    /// The universes a principal confined to `universe` may see: its own (and the filter
    /// narrows further). `None`: no confinement.
    pub fn confine(&mut self, universe: Option<&str>) -> bool {
        match (universe, &self.universe) {
            (None, _) => true,
            (Some(own), Some(asked)) if own != asked => false,
            (Some(own), _) => {
                self.universe = Some(own.to_owned());
                true
            }
        }
    }
}

/// Live events of a stream are buffered this many deep per subscriber; a subscriber that falls
/// further behind is told how many it missed (a notice) and goes on.
const SUBSCRIBER_BUFFER: usize = 4096;
/// Records drained from the ring buffer before the drain yields to the other tasks.
const DRAIN_BATCH: usize = 256;

/// This host's events: the recent ones (a bounded ring) and the live ones (a broadcast to every
/// stream), and the counters of what the dataplane could not report.
pub struct Hub {
    host: String,
    capacity: usize,
    recent: Mutex<VecDeque<Arc<StreamItem>>>,
    live: broadcast::Sender<Arc<StreamItem>>,
    /// `VERSE_EV_LIMITS` summed over CPUs, as last read.
    counts: Mutex<EventLimiter>,
    /// Records read from the ring buffer that were no event (shorter than one).
    pub malformed: AtomicU64,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub").field("host", &self.host).field("capacity", &self.capacity).finish()
    }
}

impl Hub {
    /// A hub of `host` keeping the `capacity` most recent items.
    pub fn new(host: &str, capacity: usize) -> Hub {
        Hub {
            host: host.to_owned(),
            capacity,
            recent: Mutex::new(VecDeque::with_capacity(capacity.min(65_536))),
            live: broadcast::channel(SUBSCRIBER_BUFFER).0,
            counts: Mutex::new(EventLimiter::default()),
            malformed: AtomicU64::new(0),
        }
    }

    pub fn host(&self) -> &str {
        &self.host
    }

    /// Keeps `item` among the recent ones and sends it to every live stream.
    pub fn publish(&self, item: StreamItem) {
        let item = Arc::new(item);
        if self.capacity > 0 {
            let mut recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
            if recent.len() == self.capacity {
                recent.pop_front();
            }
            recent.push_back(item.clone());
        }
        // No receiver is no error: nobody is watching.
        let _ = self.live.send(item);
    }

    /// The live items from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Arc<StreamItem>> {
        self.live.subscribe()
    }

    /// The `n` most recent items that `keep` keeps, oldest first.
    pub fn recent(&self, n: usize, keep: impl Fn(&StreamItem) -> bool) -> Vec<Arc<StreamItem>> {
        let recent = self.recent.lock().unwrap_or_else(PoisonError::into_inner);
        let mut out: Vec<Arc<StreamItem>> =
            recent.iter().rev().filter(|i| keep(i)).take(n).cloned().collect();
        out.reverse();
        out
    }

    /// What became of the events the dataplane had to report (summed over CPUs), as last read.
    pub fn counts(&self) -> EventLimiter {
        *self.counts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records new counts; publishes a notice when events were suppressed or lost since the
    /// last ones.
    pub fn update_counts(&self, now: EventLimiter) {
        let before = {
            let mut c = self.counts.lock().unwrap_or_else(PoisonError::into_inner);
            std::mem::replace(&mut *c, now)
        };
        let delta = |a: &[u64; event_kind::COUNT], b: &[u64; event_kind::COUNT]| -> u64 {
            a.iter().zip(b).map(|(a, b)| a.saturating_sub(*b)).sum()
        };
        let suppressed = delta(&now.suppressed, &before.suppressed);
        let lost = delta(&now.lost, &before.lost);
        if suppressed == 0 && lost == 0 {
            return;
        }
        let mut parts = Vec::new();
        if suppressed > 0 {
            parts.push(format!("{suppressed} suppressed by the rate limit"));
        }
        if lost > 0 {
            parts.push(format!("{lost} lost (the ring buffer was full)"));
        }
        self.publish(StreamItem::Notice(Notice {
            time: Timestamp::now(),
            host: self.host.clone(),
            message: format!("{}: events not reported: {}", self.host, parts.join(", ")),
        }));
    }
}

/// What the drain renders events with, kept current by the daemon.
#[derive(Clone)]
pub struct Sources {
    /// The desired state.
    pub states: watch::Receiver<Arc<State>>,
    /// This host's plumbed endpoints: host-side ifindex -> endpoint id (from the reconciler).
    pub local: watch::Receiver<Arc<BTreeMap<u32, String>>>,
    /// Flow logs, which count drops as REJECT records.
    pub flow_logs: Option<Arc<crate::flowlogs::FlowLogs>>,
    /// Publish the events on the hub (`events = true`); otherwise they feed flow logs only.
    pub publish: bool,
}

/// Reads the ring buffer of verdict events whenever the kernel signals it, renders each record
/// and publishes it on `hub`; runs until the task is dropped. Never blocks the dataplane: the
/// kernel writes without waiting (a full ring loses events, counted), and this task reads in
/// batches of [`DRAIN_BATCH`], yielding between them.
pub async fn drain(ring: RingBuf<MapData>, hub: Arc<Hub>, mut sources: Sources) {
    // SAFETY: the ring buffer owns its map's descriptor, which stays open and the same for as
    // long as the `RingBuf` lives, and the `AsyncFd` owns the `RingBuf`.
    let registered =
        unsafe { AsyncFd::register_with_interest(ring, tokio::io::Interest::READABLE) };
    let mut fd = match registered {
        Ok(fd) => fd,
        Err(e) => {
            tracing::error!(error = %e, "cannot poll the ring buffer of verdict events; no events will be reported");
            return;
        }
    };
    let mut index = Arc::new(Index::new(&sources.states.borrow_and_update()));
    let mut boot = monotonic_epoch();
    let mut boot_read = std::time::Instant::now();
    loop {
        let mut guard = match fd.readable_mut().await {
            Ok(g) => g,
            Err(e) => {
                tracing::error!(error = %e, "polling the ring buffer of verdict events failed; no more events");
                return;
            }
        };
        if sources.states.has_changed().unwrap_or(false) {
            index = Arc::new(Index::new(&sources.states.borrow_and_update()));
        }
        if boot_read.elapsed() > Duration::from_secs(10) {
            boot = monotonic_epoch();
            boot_read = std::time::Instant::now();
        }
        let local = sources.local.borrow().clone();
        let cx = Context { host: &hub.host, index: &index, local: &local, boot };
        let ring = guard.get_inner_mut();
        let mut n = 0;
        let mut more = false;
        while let Some(item) = ring.next() {
            match decode(&item) {
                Some(e) => {
                    let record = render(&e, &cx);
                    if let (Some(logs), event_kind::DROP) = (&sources.flow_logs, e.kind) {
                        logs.reject(&e, record.endpoint.as_deref(), record.dst_endpoint.as_deref());
                    }
                    if sources.publish {
                        hub.publish(StreamItem::Event(record))
                    }
                }
                None => {
                    hub.malformed.fetch_add(1, Ordering::Relaxed);
                }
            }
            n += 1;
            if n == DRAIN_BATCH {
                more = true;
                break;
            }
        }
        if more {
            drop(guard);
            tokio::task::yield_now().await;
        } else {
            guard.clear_ready();
        }
    }
}

/// A ring buffer record as an event; `None` if it is too short to be one.
pub fn decode(bytes: &[u8]) -> Option<dp::Event> {
    if bytes.len() < std::mem::size_of::<dp::Event>() {
        return None;
    }
    // SAFETY: `bytes` holds at least size_of::<Event>() bytes; `Event` is plain integers and
    // byte arrays, so any bit pattern is a valid value, and read_unaligned needs no alignment.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<dp::Event>()) })
}

/// The distinct groups an event names (for access checks and the UI).
pub fn groups_named(r: &EventRecord) -> BTreeSet<&str> {
    let mut out: BTreeSet<&str> = r.rules.iter().map(|x| x.group.as_str()).collect();
    if let Some(s) = &r.searched {
        out.extend(s.groups.iter().map(String::as_str));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{CreateEndpoint, CreateGroup, CreateUniverse};
    use serde_json::json;

    fn state() -> (State, String, String, String, String) {
        let mut s = State::default();
        let u = s
            .create_universe(CreateUniverse {
                name: "shop".into(),
                cidr: Some("10.0.0.0/24".into()),
                cidrs: None,
                ipv6_cidrs: Some(vec!["fd00:7::/64".into()]),
            })
            .unwrap();
        let web = s
            .create_group(CreateGroup {
                universe: u.id.clone(),
                name: "web".into(),
                description: None,
            })
            .unwrap()
            .id;
        let db = s
            .create_group(CreateGroup {
                universe: u.id.clone(),
                name: "db".into(),
                description: None,
            })
            .unwrap()
            .id;
        let rule: model::CreateRule = serde_json::from_value(
            json!({"direction": "ingress", "protocol": "tcp", "from_port": 5432, "to_port": 5432, "group": web}),
        )
        .unwrap();
        let r = s.add_rule(&db, rule).unwrap();
        let mk = |s: &mut State, ip: &str, g: &str| {
            s.create_endpoint(
                CreateEndpoint {
                    universe: u.id.clone(),
                    host: None,
                    netns: format!("ns{ip}"),
                    ip: ip.into(),
                    security_groups: Some(vec![g.to_owned()]),
                    conntrack_budget: None,
                    flow_logs: None,
                    ipv6: Some(v6(ip).to_string()),
                },
                "h1",
            )
            .unwrap()
        };
        let a = mk(&mut s, "10.0.0.7", &web);
        let b = mk(&mut s, "10.0.0.9", &db);
        let _ = (a, b);
        (s, u.id, web, db, r.id)
    }

    /// The IPv6 address of the test endpoint at IPv4 `ip`: `fd00:7::` and its last byte.
    fn v6(ip: &str) -> std::net::Ipv6Addr {
        let last = ip.parse::<Ipv4Addr>().unwrap().octets()[3];
        std::net::Ipv6Addr::new(0xfd00, 7, 0, 0, 0, 0, 0, u16::from(last))
    }

    /// The address of the test endpoint at IPv4 `ip` in `family` (4 or 6).
    fn at(ip: &str, family: u8) -> IpAddr {
        if family == 4 {
            IpAddr::V4(ip.parse().unwrap())
        } else {
            IpAddr::V6(v6(ip))
        }
    }

    fn context<'a>(index: &'a Index, local: &'a BTreeMap<u32, String>) -> Context<'a> {
        Context { host: "h1", index, local, boot: SystemTime::UNIX_EPOCH }
    }

    /// A TCP packet from 10.0.0.7 to 10.0.0.9, or between their IPv6 addresses (`family` 6).
    fn tcp_event(s: &State, kind: u8, reason: DropReason, family: u8) -> dp::Event {
        let vni = s.universes.values().next().unwrap().vni;
        let id = |ip: &str| s.endpoints.values().find(|e| e.ip.to_string() == ip).unwrap().identity;
        let mut e = dp::Event {
            time_ns: 1_500_000_000,
            kind,
            hook: Hook::FromEndpoint as u8,
            proto: 6,
            tcp_flags: 2,
            reason: if kind == event_kind::DROP { reason as u32 } else { 0 },
            ifindex: 40,
            vni,
            sport: 40122,
            dport: 5432,
            src_identity: id("10.0.0.7"),
            dst_identity: id("10.0.0.9"),
            len: 74,
            ..dp::Event::default()
        };
        e.set_addrs(at("10.0.0.7", family), at("10.0.0.9", family));
        e
    }

    #[test]
    fn a_policy_drop_names_what_was_searched() {
        for family in [4, 6] {
            a_policy_drop_names_what_was_searched_in(family);
        }
    }

    fn a_policy_drop_names_what_was_searched_in(family: u8) {
        let (s, u, _web, db, _) = state();
        let ix = Index::new(&s);
        let b = s.endpoints.values().find(|e| e.ip.to_string() == "10.0.0.9").unwrap();
        let a = s.endpoints.values().find(|e| e.ip.to_string() == "10.0.0.7").unwrap();
        let local = BTreeMap::from([(40, a.id.clone())]);
        let mut e = tcp_event(&s, event_kind::DROP, DropReason::PolicyIngress, family);
        e.dport = 5433;
        let r = render(&e, &context(&ix, &local));
        assert_eq!(r.verdict, Verdict::Dropped);
        assert_eq!(r.reason.as_deref(), Some("policy_ingress"));
        assert_eq!(r.universe.as_deref(), Some(u.as_str()));
        assert_eq!(r.endpoint.as_deref(), Some(a.id.as_str()));
        assert_eq!(r.dst_endpoint.as_deref(), Some(b.id.as_str()));
        assert_eq!((r.src, r.dst), (Some(at("10.0.0.7", family)), Some(at("10.0.0.9", family))));
        let searched = r.searched.clone().unwrap();
        assert_eq!(searched.groups, vec![db.clone()]);
        assert_eq!(searched.endpoint.as_deref(), Some(b.id.as_str()));
        assert_eq!(
            r.message,
            format!(
                "no ingress rule of groups {db} (db) admits tcp/5433 from {} (identity {})",
                at("10.0.0.7", family),
                a.identity
            )
        );
        assert_eq!(r.time, Timestamp(SystemTime::UNIX_EPOCH + Duration::from_millis(1500)));
        // The JSON line has the documented shape.
        let line = serde_json::to_value(StreamItem::Event(r)).unwrap();
        assert_eq!(line["kind"], "event");
        assert_eq!(line["verdict"], "dropped");
        assert_eq!(line["sport"], 40122);
        assert_eq!(line["src"], at("10.0.0.7", family).to_string(), "the standard form");
        assert!(line.get("icmp_type").is_none());
    }

    #[test]
    fn an_admitted_flow_names_its_rules_and_filters_match_them() {
        for family in [4, 6] {
            an_admitted_flow_names_its_rules_and_filters_match_them_in(family);
        }
    }

    fn an_admitted_flow_names_its_rules_and_filters_match_them_in(family: u8) {
        let (s, u, web, db, rule) = state();
        let ix = Index::new(&s);
        let local = BTreeMap::new();
        let mut e = tcp_event(&s, event_kind::NEW_FLOW, DropReason::PolicyIngress, family);
        e.rule_ingress = model::rule_bits(&rule).unwrap();
        let r = render(&e, &context(&ix, &local));
        assert_eq!(r.verdict, Verdict::Admitted);
        assert_eq!(r.reason, None);
        assert_eq!(r.rules.len(), 1);
        assert_eq!(r.rules[0].id, rule);
        assert_eq!(r.rules[0].group, db);
        let b = s.endpoints.values().find(|e| e.ip.to_string() == "10.0.0.9").unwrap();
        assert_eq!(r.dst_endpoint.as_deref(), Some(b.id.as_str()), "found by its address");
        assert!(
            r.message.contains(&format!("admitted by {rule} (ingress rule of {db} (db))")),
            "{}",
            r.message
        );
        let q = |pairs: &[(&str, &str)]| {
            Filter::parse(&pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect())
                .unwrap()
        };
        assert!(q(&[("rule", &rule)]).matches(&r));
        assert!(q(&[
            ("group", &db),
            ("verdict", "admitted"),
            ("protocol", "tcp"),
            ("port", "5432")
        ])
        .matches(&r));
        assert!(q(&[("universe", &u), ("host", "h1")]).matches(&r));
        assert!(!q(&[("group", &web)]).matches(&r));
        assert!(!q(&[("verdict", "dropped")]).matches(&r));
        assert!(!q(&[("protocol", "udp")]).matches(&r));
        assert!(!q(&[("port", "80")]).matches(&r));
        let f =
            q(&[("rule", &rule), ("verdict", "admitted"), ("reason", "no_route"), ("port", "1")]);
        let back: BTreeMap<String, String> =
            f.to_query().into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
        assert_eq!(Filter::parse(&back).unwrap(), f);
    }

    #[test]
    fn filters_refuse_what_they_cannot_match_naming_the_field() {
        for (k, v) in [
            ("verdict", "maybe"),
            ("reason", "bad_luck"),
            ("protocol", "sctp"),
            ("port", "70000"),
            ("colour", "red"),
        ] {
            let err = Filter::parse(&BTreeMap::from([(k.to_owned(), v.to_owned())])).unwrap_err();
            assert_eq!(err.0, k);
        }
    }

    /// The README's table of drop reasons is the enum: every code with its label, in order,
    /// and nothing else.
    #[test]
    fn the_readme_table_of_drop_reasons_is_the_enum() {
        let readme = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"));
        let rows: Vec<(u32, String)> = readme
            .lines()
            .filter_map(|l| {
                let cells: Vec<&str> = l.split('|').map(str::trim).collect();
                let code = cells.get(1)?.parse::<u32>().ok()?;
                let label = cells.get(2)?.strip_prefix('`')?.strip_suffix('`')?;
                Some((code, label.to_owned()))
            })
            .collect();
        let want: Vec<(u32, String)> =
            DropReason::ALL.iter().map(|r| (*r as u32, r.label().to_owned())).collect();
        assert_eq!(rows, want, "README.md's drop reason table differs from DropReason::ALL");
    }

    #[test]
    fn a_drop_before_parsing_has_no_addresses() {
        let (s, ..) = state();
        let ix = Index::new(&s);
        let local = BTreeMap::new();
        let e = dp::Event {
            kind: event_kind::DROP,
            hook: Hook::FromUnderlay as u8,
            reason: DropReason::UnknownHost as u32,
            peer_host: [198, 18, 0, 9],
            len: 60,
            ..dp::Event::default()
        };
        let r = render(&e, &context(&ix, &local));
        assert_eq!((r.src, r.protocol.clone(), r.universe.clone()), (None, None, None));
        assert_eq!(r.peer_host.as_deref(), Some("198.18.0.9"));
        assert_eq!(r.hook, "from_underlay");
        assert_eq!(r.message, describe(DropReason::UnknownHost));
    }
}
