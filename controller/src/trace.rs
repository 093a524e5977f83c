//! `verse trace`: the verdict the dataplane would reach on one packet, step by step, computed
//! from what a host has realized, with no traffic sent. Pure: the daemon passes what it read
//! (the realized [`State`], the kernel maps, the conntrack table, the clock) in a [`Realized`].
//!
//! Contract:
//! - A trace is asked of one host ([`trace`]) and covers the hooks that run *on that host*: the
//!   sender's `from_endpoint` when the sender is placed here; the receiver's `from_underlay`
//!   when the receiver is placed here and the sender on another host. A packet that leaves for
//!   another host ends this host's part with [`Action::Wrap`] naming that host; the caller (the
//!   CLI) asks that host next.
//! - The walk follows the reference model's order (`crate::verdict`, the module docs), every
//!   step naming what it checked: anti-spoofing, conntrack (is there a live flow, and what a new
//!   flow gets), the sender's egress rules, the route (local, another host via the underlay,
//!   none), the receiver's ingress rules (with the peer identity this host's routes give the
//!   source), and names the deciding rule (group and rule id) or, for a policy drop, what was
//!   searched. Rule matching is the model's own ([`crate::verdict::Host::admitting`]).
//! - The trace also carries the reference model's verdict on the very frame it synthesized
//!   ([`TraceAnswer::model`]): `judge` for the sender's hook (deliver, wrap, or the drop),
//!   `judge_underlay` on the wrapped frame for the receiver's, so that a disagreement between
//!   the walk and the model shows. Conntrack matching follows S7 as the model does
//!   ([`crate::verdict::role`]): a SYN or an echo request matches a flow only in its original
//!   direction, and only a packet that begins flows is tracked once admitted.
//! - The evaluated state is the one this host last realized; [`TraceAnswer::maps_match`] says
//!   whether the kernel maps hold exactly its compiled form (false while a newer revision is
//!   being applied, or if the maps were changed behind the daemon's back).
//! - The synthesized packet is what a workload would send for a *new* flow: a TCP SYN, a UDP
//!   datagram, an ICMP message (echo request by default). Its source port, when not given, is
//!   one no live flow uses. Live flows between the same addresses are listed in the conntrack
//!   step.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;

use dataplane_common::conntrack::{initial_state6, role6};
use dataplane_common::wire::{ipv6 as wire6, ICMPV6_ECHO_REQUEST, IPPROTO_ICMPV6, TCP_SYN};
use dataplane_common::{
    ct_state, icmp_ct_ports, Config, Ct6Key, CtEntry, CtKey, DropReason, Route6Key, RouteKey,
    VXLAN_PORT,
};
use serde::{Deserialize, Serialize};

use crate::compile::{self, MapContents};
use crate::conntrack::FlowKey;
use crate::events::Transport;
use crate::frames;
use crate::model::{self, Direction, State};
use crate::verdict::{
    self, Conntrack, Timeouts, ETHERTYPE_IPV4, ETHERTYPE_IPV6, IPPROTO_ICMP, IPPROTO_TCP,
    IPPROTO_UDP,
};

/// The hook names, as the dataplane's programs are named.
pub const HOOK_FROM_ENDPOINT: &str = "from_endpoint";
pub const HOOK_FROM_UNDERLAY: &str = "from_underlay";

/// ICMP echo identifier of a synthesized echo request ("tr").
pub const TRACE_ECHO_ID: u16 = 0x7472;
/// First source port tried when the request gives none.
const DEFAULT_SPORT: u16 = 49_152;

/// What a host has realized, as its daemon read it for one trace.
#[derive(Clone, Debug)]
pub struct Realized {
    /// The desired state of the revision this host last realized.
    pub state: Arc<State>,
    /// What the kernel maps hold (`Dataplane::read`).
    pub maps: MapContents,
    /// Every entry of `VERSE_CT`.
    pub conntrack: Vec<(CtKey, CtEntry)>,
    /// Every entry of `VERSE_CT6`.
    pub conntrack6: Vec<(Ct6Key, CtEntry)>,
    /// The conntrack clock now (`CLOCK_MONOTONIC_COARSE`, what `bpf_ktime_get_coarse_ns` reads).
    pub now_ns: u64,
    /// `VERSE_CONFIG` as this daemon wrote it.
    pub config: Config,
    /// This host's underlay address, if it has one.
    pub underlay_ip: Option<Ipv4Addr>,
}

/// The body of `POST /v1/trace`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TraceRequest {
    /// `ep-…`, or an address of the universe (IPv4 or IPv6: an IPv6 address traces IPv6).
    pub from: String,
    /// `ep-…`, or an address of the universe.
    pub to: String,
    /// The universe, needed only when neither `from` nor `to` is an endpoint id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub universe: Option<String>,
    /// `tcp`, `udp`, `icmp`, `icmpv6` (which traces IPv6), or a protocol number.
    pub protocol: String,
    /// TCP/UDP destination port (required for them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    /// TCP/UDP source port; default: one no live flow uses.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sport: Option<u16>,
    /// ICMP type (default 8, echo request; ICMPv6: 128).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub icmp_type: Option<u8>,
    /// ICMP code (default 0).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub icmp_code: Option<u8>,
    /// Also push the synthesized frame through the real program (`BPF_PROG_TEST_RUN`).
    #[serde(default)]
    pub run: bool,
}

/// The packet a trace judges.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Packet {
    pub universe: String,
    pub vni: u32,
    /// IPv4 or IPv6 (both of one family).
    pub src: IpAddr,
    pub dst: IpAddr,
    /// The endpoint that owns `src`, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub src_endpoint: Option<String>,
    /// The endpoint that owns `dst`, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dst_endpoint: Option<String>,
    pub protocol: String,
    /// IP protocol number.
    pub proto: u8,
    #[serde(flatten)]
    pub transport: Transport,
}

impl Packet {
    /// `tcp/443`, `udp/53`, `icmp type 8 code 0`, `protocol 47`, as events write it.
    pub fn service(&self) -> String {
        self.transport.service(&self.protocol)
    }
}

/// How a step ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// The check passed; the walk goes on.
    Pass,
    /// The packet is dropped here.
    Drop,
    /// The packet is decided here without the later checks (a live flow, a related error).
    Accept,
    /// Something worth knowing that decides nothing.
    Info,
}

/// A rule of a security group.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleRef {
    pub group: String,
    pub group_name: String,
    pub rule: String,
    pub direction: Direction,
}

/// One check of the walk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Step {
    pub host: String,
    pub hook: String,
    /// `endpoint`, `anti_spoofing`, `conntrack`, `egress`, `route`, `underlay`, `destination`,
    /// `ingress`.
    pub check: String,
    pub outcome: Outcome,
    pub detail: String,
    /// The drop reason, for a drop (the label of `/metrics`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The rule that admitted the packet.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<RuleRef>,
    /// For a policy check: the groups whose rules were searched.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub searched: Vec<String>,
}

/// What happens to the packet on this host.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Action {
    /// Delivered into the receiver's namespace.
    Deliver,
    /// Wrapped and sent over the underlay to another host (which judges it next).
    Wrap,
    /// Not the dataplane's: handed to the host's own stack untouched (`from_underlay` only).
    Pass,
    Drop,
}

/// The end of a walk (or of a model evaluation, or of a kernel run).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decision {
    pub action: Action,
    /// The drop reason's label, for a drop.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl Decision {
    fn drop(r: DropReason) -> Decision {
        Decision { action: Action::Drop, reason: Some(r.label().to_owned()) }
    }
    fn of(action: Action) -> Decision {
        Decision { action, reason: None }
    }
}

/// The verdict of the walk.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verdict {
    pub action: Action,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The rules that admitted a new flow (the sender's egress rule, the receiver's ingress
    /// rule, as far as this host judged them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<RuleRef>,
    /// The host a wrapped packet goes to (it judges the receiver's ingress).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_host: Option<String>,
    /// One sentence.
    pub summary: String,
}

impl Verdict {
    pub fn decision(&self) -> Decision {
        Decision { action: self.action, reason: self.reason.clone() }
    }
}

/// What the real program did with the synthesized frame (`BPF_PROG_TEST_RUN`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelRun {
    pub hook: String,
    pub action: Action,
    /// The reason whose drop counter moved, for a drop.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// `TC_ACT_*`: 0 ok, 2 shot, 7 redirect.
    pub return_code: u32,
    /// The frame's length as the program left it.
    pub frame_len: usize,
}

impl KernelRun {
    pub fn decision(&self) -> Decision {
        Decision { action: self.action, reason: self.reason.clone() }
    }
}

/// The answer of `POST /v1/trace`: this host's part of the packet's path.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceAnswer {
    /// The host that answered (whose maps were read).
    pub host: String,
    /// The revision this host has realized: the state the walk evaluated.
    pub revision: u64,
    /// Whether the kernel maps hold exactly the compiled form of that revision.
    pub maps_match: bool,
    pub packet: Packet,
    pub steps: Vec<Step>,
    pub verdict: Verdict,
    /// The reference model's verdict on the same frame (none where no frame reaches the hook).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<Decision>,
    /// What the kernel did, with `run`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<KernelRun>,
}

/// Where a daemon's traces come from: what its host has realized, and its kernel programs.
pub trait Source: Send + Sync {
    /// Reads what this host has realized, now.
    fn realized(&self) -> anyhow::Result<Realized>;
    /// Pushes `input` through the real program, on private conntrack and counters (see
    /// `dataplane::TraceRunner`).
    fn run(&self, input: &RunInput) -> anyhow::Result<KernelRun>;
}

/// `TC_ACT_*` return codes (`include/uapi/linux/pkt_cls.h`).
const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;
const TC_ACT_REDIRECT: u32 = 7;

/// What a kernel run's return code, output frame and moved drop counter mean.
pub fn kernel_run(
    hook: &str,
    input: &[u8],
    return_code: u32,
    output: &[u8],
    dropped: Option<DropReason>,
) -> KernelRun {
    let wrapped = output.len() >= input.len() + dataplane_common::ENCAP_OVERHEAD as usize
        && output.get(23) == Some(&IPPROTO_UDP)
        && output.get(36..38) == Some(&VXLAN_PORT.to_be_bytes()[..]);
    let (action, reason) = match (return_code, dropped) {
        (_, Some(r)) => (Action::Drop, Some(r.label().to_owned())),
        (TC_ACT_SHOT, None) => (Action::Drop, None),
        (TC_ACT_REDIRECT, None) if wrapped => (Action::Wrap, None),
        (TC_ACT_REDIRECT, None) => (Action::Deliver, None),
        (TC_ACT_OK, None) => (Action::Pass, None),
        (_, None) => (Action::Drop, None),
    };
    KernelRun { hook: hook.to_owned(), action, reason, return_code, frame_len: output.len() }
}

/// Parses the query of `GET /v1/trace` (already checked for unknown and repeated names).
pub fn request_from_query(q: &BTreeMap<String, String>) -> model::Result<TraceRequest> {
    let text = |name: &str| -> model::Result<String> {
        q.get(name).cloned().ok_or_else(|| model::Error::invalid(name, "required"))
    };
    fn number<T: std::str::FromStr>(
        q: &BTreeMap<String, String>,
        name: &str,
        what: &str,
    ) -> model::Result<Option<T>> {
        q.get(name)
            .map(|v| {
                v.parse::<T>()
                    .map_err(|_| model::Error::invalid(name, format!("{v:?} is not {what}")))
            })
            .transpose()
    }
    let run = match q.get("run").map(String::as_str) {
        None | Some("false") => false,
        Some("true") => true,
        Some(v) => return Err(model::Error::invalid("run", format!("{v:?} is not true or false"))),
    };
    Ok(TraceRequest {
        from: text("from")?,
        to: text("to")?,
        universe: q.get("universe").cloned(),
        protocol: text("protocol")?,
        port: number(q, "port", "a port (0-65535)")?,
        sport: number(q, "sport", "a port (0-65535)")?,
        icmp_type: number(q, "icmp_type", "an ICMP type (0-255)")?,
        icmp_code: number(q, "icmp_code", "an ICMP code (0-255)")?,
        run,
    })
}

/// The query parameters of `GET /v1/trace` (`host`: the host to ask, relayed there).
pub const QUERY: [&str; 10] = [
    "from",
    "to",
    "universe",
    "protocol",
    "port",
    "sport",
    "icmp_type",
    "icmp_code",
    "run",
    "host",
];

/// The universe a request is about, as far as the ids in it tell (for access checks before
/// anything else is looked at): the `universe` field, else the universe of an endpoint id.
/// Unknown ids are left to [`resolve`].
pub fn universes_named(state: &State, req: &TraceRequest) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    if let Some(u) = &req.universe {
        out.push(("universe", u.clone()));
    }
    for (field, id) in [("from", &req.from), ("to", &req.to)] {
        if let Some(e) = state.endpoints.get(id) {
            out.push((field, e.universe.clone()));
        }
    }
    out
}

/// What a kernel run needs: the hook, the frame, the ingress ifindex, and the conntrack entries
/// the program may look up (copied into the run's private table).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunInput {
    pub hook: &'static str,
    pub frame: Vec<u8>,
    pub ifindex: u32,
    pub conntrack: Vec<(CtKey, CtEntry)>,
    /// The same of `VERSE_CT6`, for an IPv6 packet.
    pub conntrack6: Vec<(Ct6Key, CtEntry)>,
}

/// A request resolved against a state: who sends what to whom.
#[derive(Clone, Debug)]
pub struct Resolved {
    pub packet: Packet,
    /// The host the sender is placed on (`None`: no endpoint has the source address).
    pub sender_host: Option<String>,
    pub receiver_host: Option<String>,
}

/// Resolves `req` against `state`: the universe, both addresses and their endpoints, the
/// protocol and ports. Errors name the field (400) or say what is missing (404).
pub fn resolve(state: &State, req: &TraceRequest) -> model::Result<Resolved> {
    let ep = |field: &str, id: &str| -> model::Result<model::Endpoint> {
        state.endpoints.get(id).cloned().ok_or_else(|| model::missing(field, "endpoint", id))
    };
    let from_ep = if req.from.starts_with("ep-") { Some(ep("from", &req.from)?) } else { None };
    let to_ep = if req.to.starts_with("ep-") { Some(ep("to", &req.to)?) } else { None };
    let universe = match (&from_ep, &to_ep, &req.universe) {
        (Some(a), Some(b), _) if a.universe != b.universe => {
            return Err(model::Error::invalid(
                "to",
                format!(
                    "{} is in universe {}, {} in {}: universes never reach each other",
                    a.id, a.universe, b.id, b.universe
                ),
            ))
        }
        (Some(e), _, u) | (None, Some(e), u) => {
            // The universe given scopes the ids: an endpoint outside it is not found there.
            if let Some(u) = u.as_ref().filter(|u| **u != e.universe) {
                let field =
                    if from_ep.as_ref().is_some_and(|f| f.id == e.id) { "from" } else { "to" };
                return Err(model::Error {
                    kind: model::ErrorKind::NotFound,
                    code: "not_found",
                    field: Some(field.to_owned()),
                    message: format!("{field}: endpoint {} not found in universe {u}", e.id),
                });
            }
            e.universe.clone()
        }
        (None, None, Some(u)) => u.clone(),
        (None, None, None) => {
            return Err(model::Error::invalid(
                "universe",
                "needed when neither from nor to is an endpoint id (ep-...)",
            ))
        }
    };
    let uni = state
        .universes
        .get(&universe)
        .ok_or_else(|| model::missing("universe", "universe", &universe))?;
    // The family: IPv6 when an address given is IPv6 or the protocol is icmpv6.
    let given = |text: &str| text.parse::<IpAddr>().ok();
    let six = [&req.from, &req.to].into_iter().filter_map(|t| given(t)).any(|a| a.is_ipv6())
        || req.protocol.eq_ignore_ascii_case("icmpv6");
    let addr = |field: &str, text: &str, ep: &Option<model::Endpoint>| -> model::Result<_> {
        match ep {
            Some(e) if six => match e.ipv6 {
                Some(ip6) => Ok((IpAddr::V6(ip6), Some(e.clone()))),
                None => Err(model::Error::invalid(
                    field,
                    format!("{} has no IPv6 address, and this traces IPv6", e.id),
                )),
            },
            Some(e) => Ok((IpAddr::V4(e.ip), Some(e.clone()))),
            None => {
                let ip = given(text).filter(|a| a.is_ipv6() == six).ok_or_else(|| {
                    let family = if six { "an IPv6" } else { "an IPv4" };
                    model::Error::invalid(
                        field,
                        format!("{text:?} is neither ep-... nor {family} address"),
                    )
                })?;
                let owner = state
                    .endpoints
                    .values()
                    .find(|e| {
                        e.universe == universe
                            && (IpAddr::V4(e.ip) == ip || e.ipv6.map(IpAddr::V6) == Some(ip))
                    })
                    .cloned();
                Ok((ip, owner))
            }
        }
    };
    let (src, src_ep) = addr("from", &req.from, &from_ep)?;
    let (dst, dst_ep) = addr("to", &req.to, &to_ep)?;
    if src_ep.is_none() {
        return Err(model::Error::conflict(
            "no_sender",
            Some("from"),
            format!(
                "from: no endpoint of universe {universe} has address {src}; every packet of a \
                 universe is sent by one of its endpoints (a forged source is dropped as \
                 spoofed_ip where it enters, or not_placed_on_sender off the underlay)"
            ),
        ));
    }
    let (protocol, proto) = match req.protocol.to_ascii_lowercase().as_str() {
        "tcp" => ("tcp".to_owned(), IPPROTO_TCP),
        "udp" => ("udp".to_owned(), IPPROTO_UDP),
        "icmp" => ("icmp".to_owned(), IPPROTO_ICMP),
        "icmpv6" => ("icmpv6".to_owned(), IPPROTO_ICMPV6),
        // A number as written canonically: no sign, no leading zero.
        other => match other.parse::<u8>().ok().filter(|n| n.to_string() == other) {
            Some(n) => (model::Protocol::Number(n).name(), n),
            None => {
                return Err(model::Error::invalid(
                    "protocol",
                    format!(
                        "{other:?}: expected tcp, udp, icmp, icmpv6 or a protocol number 0-255"
                    ),
                ))
            }
        },
    };
    let ported = matches!(proto, IPPROTO_TCP | IPPROTO_UDP);
    if ported && req.port.is_none() {
        return Err(model::Error::invalid("port", format!("required for {protocol}")));
    }
    if !ported && (req.port.is_some() || req.sport.is_some()) {
        let field = if req.port.is_some() { "port" } else { "sport" };
        return Err(model::Error::invalid(field, format!("{protocol} has no ports")));
    }
    // ICMP of the family (ICMPv6 for IPv6): the one with types and codes.
    let icmp = if six { IPPROTO_ICMPV6 } else { IPPROTO_ICMP };
    if proto != icmp && (req.icmp_type.is_some() || req.icmp_code.is_some()) {
        let field = if req.icmp_type.is_some() { "icmp_type" } else { "icmp_code" };
        let which = if six { "only for icmpv6 (this traces IPv6)" } else { "only for icmp" };
        return Err(model::Error::invalid(field, which));
    }
    let echo = if six { ICMPV6_ECHO_REQUEST } else { 8 };
    let packet = Packet {
        universe: universe.clone(),
        vni: uni.vni,
        src,
        dst,
        src_endpoint: src_ep.as_ref().map(|e| e.id.clone()),
        dst_endpoint: dst_ep.as_ref().map(|e| e.id.clone()),
        protocol,
        proto,
        transport: Transport {
            sport: if ported { req.sport } else { None },
            dport: if ported { req.port } else { None },
            icmp_type: (proto == icmp).then(|| req.icmp_type.unwrap_or(echo)),
            icmp_code: (proto == icmp).then(|| req.icmp_code.unwrap_or(0)),
        },
    };
    Ok(Resolved {
        packet,
        sender_host: src_ep.map(|e| e.host),
        receiver_host: dst_ep.map(|e| e.host),
    })
}

/// Why this host cannot trace a request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum NotHere {
    /// Neither the sender nor the receiver is placed on this host: ask `host`.
    AskHost { host: String },
}

/// This host's part of the packet's path (see the module contract), with the frame a kernel run
/// would take. `Err` when no hook of this host sees the packet.
pub fn trace(
    host: &str,
    r: &Realized,
    req: &TraceRequest,
) -> model::Result<Result<(TraceAnswer, Option<RunInput>), NotHere>> {
    let mut resolved = resolve(&r.state, req)?;
    let sender_host = resolved.sender_host.clone().unwrap_or_default();
    let walk = Walk::new(host, r);
    if resolved.packet.transport.sport.is_none()
        && matches!(resolved.packet.proto, IPPROTO_TCP | IPPROTO_UDP)
    {
        resolved.packet.transport.sport = Some(walk.free_sport(&resolved.packet));
    }
    let (steps, verdict, model, run) = if sender_host == host {
        walk.from_endpoint(&resolved.packet)
    } else if resolved.receiver_host.as_deref() == Some(host) {
        walk.from_underlay(&resolved.packet, &sender_host)
    } else {
        return Ok(Err(NotHere::AskHost { host: sender_host }));
    };
    let answer = TraceAnswer {
        host: host.to_owned(),
        revision: r.state.revision,
        maps_match: walk.maps_match(),
        packet: resolved.packet,
        steps,
        verdict,
        model,
        kernel: None,
    };
    Ok(Ok((answer, run)))
}

/// A step that drops the packet for `reason`.
fn drop_step(host: &str, hook: &str, check: &str, reason: DropReason, detail: String) -> Step {
    Step {
        reason: Some(reason.label().to_owned()),
        ..step(host, hook, check, Outcome::Drop, detail)
    }
}

/// A step under construction.
fn step(host: &str, hook: &str, check: &str, outcome: Outcome, detail: String) -> Step {
    Step {
        host: host.to_owned(),
        hook: hook.to_owned(),
        check: check.to_owned(),
        outcome,
        detail,
        reason: None,
        rule: None,
        searched: Vec::new(),
    }
}

type WalkResult = (Vec<Step>, Verdict, Option<Decision>, Option<RunInput>);

/// The environment of one walk.
struct Walk<'a> {
    host: &'a str,
    r: &'a Realized,
    /// ifindex of each plumbed local endpoint, by endpoint id (from the kernel's endpoint map).
    plumbed: BTreeMap<String, u32>,
    timeouts: Timeouts,
    ct: Conntrack,
}

impl<'a> Walk<'a> {
    fn new(host: &'a str, r: &'a Realized) -> Walk<'a> {
        let st = &r.state;
        let mut plumbed = BTreeMap::new();
        for (&ifindex, e) in &r.maps.endpoints {
            let ip = Ipv4Addr::from(e.ip);
            let owner = st.endpoints.values().find(|ep| {
                ep.host == host
                    && ep.ip == ip
                    && st.universes.get(&ep.universe).is_some_and(|u| u.vni == e.vni)
            });
            if let Some(ep) = owner {
                plumbed.insert(ep.id.clone(), ifindex);
            }
        }
        let ct = Conntrack {
            entries: r.conntrack.iter().copied().collect(),
            entries6: r.conntrack6.iter().copied().collect(),
        };
        Walk { host, r, plumbed, timeouts: Timeouts::from_config(&r.config), ct }
    }

    /// The kernel maps hold exactly the compiled form of the realized state.
    fn maps_match(&self) -> bool {
        let plumbed = &self.plumbed;
        let ifindex = |ep: &model::Endpoint| plumbed.get(&ep.id).copied();
        let mut ids = crate::reconcile::seed_ids(&self.r.maps);
        compile::compile(&self.r.state, self.host, &ifindex, &mut ids)
            .is_ok_and(|compiled| compiled == self.r.maps)
    }

    fn model_host(&self) -> verdict::Host<'a> {
        let local: BTreeMap<u32, String> =
            self.plumbed.iter().map(|(id, &ix)| (ix, id.clone())).collect();
        let host = verdict::Host::new(
            &self.r.state,
            self.host,
            &local,
            self.r.config.gateway_mac,
            self.timeouts,
        );
        // The dataplane has an underlay when its settings name the interface.
        match self.r.underlay_ip {
            Some(ip) if self.r.config.underlay_ifindex != 0 => {
                host.with_underlay(verdict::Underlay { ip, mtu: self.r.config.underlay_mtu })
            }
            _ => host,
        }
    }

    fn key(&self, p: &Packet) -> Key {
        let (sport, dport) = ct_ports(p);
        match (p.src, p.dst) {
            (IpAddr::V4(s), IpAddr::V4(d)) => {
                Key::V4(CtKey::new(p.vni, s.octets(), d.octets(), sport, dport, p.proto))
            }
            (s, d) => Key::V6(Ct6Key::new(p.vni, v6(s), v6(d), sport, dport, p.proto)),
        }
    }

    /// Whether the table of `key`'s family holds an entry under it or its reverse.
    fn known(&self, key: &Key) -> bool {
        match key {
            Key::V4(k) => {
                self.ct.entries.contains_key(k) || self.ct.entries.contains_key(&k.reversed())
            }
            Key::V6(k) => {
                self.ct.entries6.contains_key(k) || self.ct.entries6.contains_key(&k.reversed())
            }
        }
    }

    /// [`Conntrack::lookup_as`] in the table of `key`'s family: the live entry the packet hits
    /// (and its direction), and the entry under its own key.
    fn lookup(
        &self,
        key: &Key,
        role: verdict::Role,
        sender: u64,
    ) -> (Option<(CtEntry, verdict::CtDirection)>, Option<CtEntry>) {
        let (now, t) = (self.r.now_ns, &self.timeouts);
        match key {
            Key::V4(k) => {
                let (hit, own) = self.ct.lookup_as(k, role, sender, now, t);
                (hit.map(|(_, e, d)| (e, d)), own)
            }
            Key::V6(k) => {
                let (hit, own) = self.ct.lookup_as(k, role, sender, now, t);
                (hit.map(|(_, e, d)| (e, d)), own)
            }
        }
    }

    /// Every entry of the table of `key`'s family, family-neutral.
    fn flows(&self, key: &Key) -> Vec<(crate::conntrack::Flow, CtEntry)> {
        match key {
            Key::V4(_) => self.ct.entries.iter().map(|(k, e)| (k.flow(), *e)).collect(),
            Key::V6(_) => self.ct.entries6.iter().map(|(k, e)| (k.flow(), *e)).collect(),
        }
    }

    /// What a kernel run of `p` at `hook` takes: its frame, and the entries under its key
    /// either way (copied into the run's private table of its family).
    fn run_input(&self, hook: &'static str, p: &Packet, frame: Vec<u8>, ifindex: u32) -> RunInput {
        let mut run = RunInput { hook, frame, ifindex, conntrack: vec![], conntrack6: vec![] };
        match self.key(p) {
            Key::V4(key) => run.conntrack = both_ways(&self.ct.entries, key, key.reversed()),
            Key::V6(key) => run.conntrack6 = both_ways(&self.ct.entries6, key, key.reversed()),
        }
        run
    }

    /// A source port no live flow from `p.src` to `p.dst:dport` uses (either way).
    fn free_sport(&self, p: &Packet) -> u16 {
        let mut q = p.clone();
        for port in DEFAULT_SPORT..=u16::MAX {
            q.transport.sport = Some(port);
            // No entry under the key either way, live or not, of any endpoint.
            if !self.known(&self.key(&q)) {
                return port;
            }
        }
        DEFAULT_SPORT
    }

    /// The identity this host's routes give `ip` of the packet's universe.
    fn identity(&self, p: &Packet, ip: IpAddr) -> Option<u32> {
        let route = match ip {
            IpAddr::V4(ip) => self.r.maps.routes.get(&RouteKey { vni: p.vni, ip: ip.octets() }),
            IpAddr::V6(ip) => self.r.maps.ipv6.routes.get(&Route6Key::new(p.vni, ip.octets())),
        };
        route.map(|r| r.identity)
    }

    fn ident_text(&self, p: &Packet, ip: IpAddr) -> String {
        match self.identity(p, ip) {
            Some(i) => format!("identity {i}"),
            None => "no identity: no endpoint this host routes to".to_owned(),
        }
    }

    /// The conntrack step: the packet's own flow (a hit decides), and the live flows between the
    /// same addresses on the same protocol and destination port.
    fn conntrack(&self, hook: &str, p: &Packet) -> (Step, bool) {
        let key = self.key(p);
        let now = self.r.now_ns;
        // What the packet may match (S7): a SYN or an echo request only a flow's original
        // direction, an echo reply only its reply direction, other ICMP nothing.
        let role = role_of(p);
        // A flow is bound to the endpoints it was made for (their serials): one made for an
        // endpoint since deleted, whose address another has now, is no hit.
        let serial = |id: &Option<String>| {
            id.as_ref().and_then(|id| self.r.state.endpoints.get(id)).map(|e| e.serial)
        };
        let (sender, receiver) = (serial(&p.src_endpoint), serial(&p.dst_endpoint));
        let hit = self.lookup(&key, role, sender.unwrap_or(0)).0.filter(|(e, dir)| {
            let bound = match dir {
                verdict::CtDirection::Original => e.dst_serial,
                verdict::CtDirection::Reply => e.src_serial,
            };
            sender.is_some() && receiver == Some(bound)
        });
        if let Some((entry, dir)) = hit {
            // Saturating, as expiry is judged: an entry stamped after `now` is fresh.
            let idle = now.saturating_sub(entry.last_seen_ns) / 1_000_000_000;
            let way = match dir {
                verdict::CtDirection::Original => "in its original direction",
                verdict::CtDirection::Reply => "as a reply",
            };
            let detail = format!(
                "a live flow matches {way} ({}, idle {idle} s of {} s): the packet passes as part \
                 of it, whatever the rules say now (S8)",
                state_name(entry.state),
                self.timeouts.of(entry.state) / 1_000_000_000
            );
            return (step(self.host, hook, "conntrack", Outcome::Accept, detail), true);
        }
        let mut others = Vec::new();
        let dport = ct_ports(p).1;
        for (k, e) in self.flows(&key) {
            if self.timeouts.expired(&e, now) || k.vni != p.vni || k.proto != p.proto {
                continue;
            }
            let fwd = k.src == p.src
                && k.dst == p.dst
                && (p.transport.dport.is_none() || k.dport == dport);
            let rev = k.src == p.dst
                && k.dst == p.src
                && (p.transport.dport.is_none() || k.sport == dport);
            if fwd || rev {
                let (src, dst) = (
                    std::net::SocketAddr::new(k.src, k.sport),
                    std::net::SocketAddr::new(k.dst, k.dport),
                );
                others.push(format!("{src} -> {dst} {}", state_name(e.state)));
            }
        }
        others.sort();
        let live = if others.is_empty() {
            "no live flow between these addresses for this service".to_owned()
        } else {
            format!("live flows between these addresses for this service: {}", others.join(", "))
        };
        let matches = match role {
            verdict::Role::Opens => "no live flow matches this packet in its original direction",
            verdict::Role::Answers => "no live flow matches this echo reply in its reply direction",
            verdict::Role::Untracked => "this ICMP message belongs to no flow (S7)",
            verdict::Role::Any | verdict::Role::Continues => "no live flow matches this packet",
        };
        let tracked = if verdict::creates(role) {
            let state = match key {
                Key::V4(_) => verdict::initial_state(p.proto),
                Key::V6(_) => initial_state6(p.proto),
            };
            format!("if admitted, tracked as {}", state_name(state))
        } else {
            "if admitted, sent untracked: it begins no flow (S7)".to_owned()
        };
        let detail = format!("{matches} ({live}); it is judged by the rules below and, {tracked}");
        (step(self.host, hook, "conntrack", Outcome::Info, detail), false)
    }

    /// The conntrack budget step of an admitted packet that begins a flow (S14): the flow is
    /// charged to `owner` (the sender at `from_endpoint`, the local receiver at
    /// `from_underlay`), and dropped `conntrack_budget_exceeded` when `owner` already holds its
    /// budget's worth of entries on this host, as the model's conntrack write decides (an
    /// entry of `owner` under the same key is replaced at no charge; one of another owner
    /// leaves the flow untracked). `None`: the packet begins no flow.
    fn budget(&self, hook: &str, p: &Packet, owner: &model::Endpoint) -> Option<Step> {
        let role = role_of(p);
        if !verdict::creates(role) {
            return None;
        }
        let key = self.key(p);
        let sender = p.src_endpoint.as_ref().and_then(|id| self.r.state.endpoints.get(id));
        let sender = sender.map_or(0, |e| e.serial);
        let (_, own) = self.lookup(&key, role, sender);
        let used = self.ct.used(owner.slot);
        let of = format!(
            "{} holds {used} tracked flows of its conntrack budget of {} on {} (S14)",
            owner.id, owner.conntrack_budget, self.host
        );
        Some(match own {
            Some(old) if old.owner_slot == owner.slot && old.owner_serial() == owner.serial => {
                step(
                    self.host,
                    hook,
                    "conntrack_budget",
                    Outcome::Pass,
                    format!(
                    "{of}; the new flow replaces its own stale entry under this key, at no charge"
                ),
                )
            }
            Some(_) => step(
                self.host,
                hook,
                "conntrack_budget",
                Outcome::Info,
                format!(
                    "{of}; an entry of another endpoint holds this flow's key until it is \
                     collected, so the flow passes untracked"
                ),
            ),
            None if used >= u64::from(owner.conntrack_budget) => drop_step(
                self.host,
                hook,
                "conntrack_budget",
                DropReason::ConntrackBudgetExceeded,
                format!("{of}: a new flow is dropped until some of them end or expire"),
            ),
            None => step(
                self.host,
                hook,
                "conntrack_budget",
                Outcome::Pass,
                format!("{of}; the new flow is charged to it"),
            ),
        })
    }

    /// Records the conntrack budget step ([`Walk::budget`]) in `steps`; false when it drops.
    fn charged(
        &self,
        steps: &mut Vec<Step>,
        hook: &str,
        p: &Packet,
        owner: &model::Endpoint,
    ) -> bool {
        match self.budget(hook, p, owner) {
            Some(s) => {
                let exceeded = s.outcome == Outcome::Drop;
                steps.push(s);
                !exceeded
            }
            None => true,
        }
    }

    /// A policy step: the first rule of `ep`'s groups that admits the packet in `dir`.
    fn policy(
        &self,
        hook: &str,
        p: &Packet,
        ep: &model::Endpoint,
        dir: Direction,
    ) -> (Step, Option<RuleRef>) {
        let host = self.model_host();
        let (peer, check, word) = match dir {
            Direction::Egress => (p.dst, "egress", "to"),
            Direction::Ingress => (p.src, "ingress", "from"),
        };
        let icmp = (p.transport.icmp_type.unwrap_or(0), p.transport.icmp_code.unwrap_or(0));
        let dport = p.transport.dport.unwrap_or(0);
        let first = match peer {
            IpAddr::V4(peer) => host.admitting(ep, dir, peer, p.proto, dport, icmp).next(),
            IpAddr::V6(peer) => host.admitting6(ep, dir, peer, p.proto, dport, icmp).next(),
        };
        let first = first.map(|(g, r)| RuleRef {
            group: g.id.clone(),
            group_name: g.name.clone(),
            rule: r.id.clone(),
            direction: dir,
        });
        let groups = ep.security_groups.clone();
        let ident = self.ident_text(p, peer);
        match first {
            Some(rule) => {
                let detail = format!(
                    "rule {} of group {} ({}) admits {} {word} {peer} ({ident})",
                    rule.rule,
                    rule.group,
                    rule.group_name,
                    p.service()
                );
                let mut s = step(self.host, hook, check, Outcome::Pass, detail);
                s.rule = Some(rule.clone());
                s.searched = groups;
                (s, Some(rule))
            }
            None => {
                // Each group searched, with its name: `sg-… (db)`.
                let named: Vec<String> = groups
                    .iter()
                    .map(|g| match self.r.state.groups.get(g) {
                        Some(group) => format!("{g} ({})", group.name),
                        None => g.clone(),
                    })
                    .collect();
                let detail = format!(
                    "no {check} rule of groups {} of {} admits {} {word} {peer} ({ident})",
                    if named.is_empty() { "(none)".to_owned() } else { named.join(", ") },
                    ep.id,
                    p.service()
                );
                let reason = match dir {
                    Direction::Egress => DropReason::PolicyEgress,
                    Direction::Ingress => DropReason::PolicyIngress,
                };
                let mut s = drop_step(self.host, hook, check, reason, detail);
                s.searched = groups;
                (s, None)
            }
        }
    }

    fn dropped(
        &self,
        steps: Vec<Step>,
        reason: DropReason,
        model: Option<Decision>,
        run: Option<RunInput>,
    ) -> WalkResult {
        let summary = steps.last().map(|s| s.detail.clone()).unwrap_or_default();
        let v = Verdict {
            action: Action::Drop,
            reason: Some(reason.label().to_owned()),
            rules: Vec::new(),
            next_host: None,
            summary,
        };
        (steps, v, model, run)
    }

    /// The walk ended by a failed `check` at `hook`: its step, last, and the drop for `reason`.
    #[allow(clippy::too_many_arguments)]
    fn refuse(
        &self,
        mut steps: Vec<Step>,
        hook: &str,
        check: &str,
        reason: DropReason,
        detail: String,
        model: Option<Decision>,
        run: Option<RunInput>,
    ) -> WalkResult {
        steps.push(drop_step(self.host, hook, check, reason, detail));
        self.dropped(steps, reason, model, run)
    }

    /// [`Walk::policy`] as a step of the walk: the step pushed to `steps`, the rule that admits
    /// the packet to `rules`; false when no rule does.
    fn admits(
        &self,
        steps: &mut Vec<Step>,
        rules: &mut Vec<RuleRef>,
        hook: &str,
        p: &Packet,
        ep: &model::Endpoint,
        dir: Direction,
    ) -> bool {
        let (s, rule) = self.policy(hook, p, ep, dir);
        steps.push(s);
        rule.map(|r| rules.push(r)).is_some()
    }

    /// A `check` at `hook` the packet passed.
    fn passed(&self, hook: &str, check: &str, detail: String) -> Step {
        step(self.host, hook, check, Outcome::Pass, detail)
    }

    /// The sender's hook on this host, and the receiver's too when it is local.
    #[allow(clippy::wrong_self_convention, reason = "named after the hook it walks")]
    fn from_endpoint(&self, p: &Packet) -> WalkResult {
        const HOOK: &str = HOOK_FROM_ENDPOINT;
        let st = &self.r.state;
        let sender_id = p.src_endpoint.clone().unwrap_or_default();
        let Some(sender) = st.endpoints.get(&sender_id) else {
            return self.dropped(Vec::new(), DropReason::UnknownEndpoint, None, None);
        };
        let mut steps = Vec::new();
        let Some(&ifindex) = self.plumbed.get(&sender.id) else {
            return self.refuse(
                steps,
                HOOK,
                "endpoint",
                DropReason::UnknownEndpoint,
                format!(
                "{} is placed on {} but not in its dataplane (its interface {} is not plumbed, \
                 see GET /v1/hosts errors): nothing it sends is judged, every frame is dropped",
                sender.id, self.host, sender.interface
            ),
                None,
                None,
            );
        };
        let frame = self.frame(p, sender);
        let model_host = self.model_host();
        let model =
            decision_of(&model_host.judge(&self.ct, self.r.now_ns, ifindex, &frame).verdict);
        let run = Some(self.run_input(HOOK, p, frame.clone(), ifindex));
        steps.push(self.passed(
            HOOK,
            "endpoint",
            format!(
                "{} ({}) sends from interface {} (ifindex {ifindex}), {}",
                sender.id,
                p.src,
                sender.interface,
                self.ident_text(p, p.src)
            ),
        ));
        steps.push(self.passed(
            HOOK,
            "anti_spoofing",
            format!(
                "source MAC {} and source address {} are {}'s own (S10)",
                sender.mac, p.src, sender.id
            ),
        ));
        let route = self.route(p);
        let (ct_step, hit) = self.conntrack(HOOK, p);
        steps.push(ct_step);
        let mut rules = Vec::new();
        if !hit && !self.admits(&mut steps, &mut rules, HOOK, p, sender, Direction::Egress) {
            return self.dropped(steps, DropReason::PolicyEgress, model, run);
        }
        let (route_step, place) = route;
        // The route step names its reason: no route, or no underlay to reach another host.
        let no_place = if route_step.reason.as_deref() == Some(DropReason::NoUnderlay.label()) {
            DropReason::NoUnderlay
        } else {
            DropReason::NoRoute
        };
        steps.push(route_step);
        let place = match place {
            Some(place) => place,
            None => return self.dropped(steps, no_place, model, run),
        };
        if let (false, Place::Local(receiver)) = (hit, &place) {
            if !self.admits(&mut steps, &mut rules, HOOK, p, receiver, Direction::Ingress) {
                return self.dropped(steps, DropReason::PolicyIngress, model, run);
            }
        }
        if !hit && !self.charged(&mut steps, HOOK, p, sender) {
            return self.dropped(steps, DropReason::ConntrackBudgetExceeded, model, run);
        }
        match place {
            Place::Local(receiver) => {
                let summary = if hit {
                    format!("delivered to {} as part of a live flow", receiver.id)
                } else {
                    format!(
                        "delivered to {} and tracked: admitted by {}",
                        receiver.id,
                        rules
                            .iter()
                            .map(|r| format!("{} of {}", r.rule, r.group))
                            .collect::<Vec<_>>()
                            .join(" and ")
                    )
                };
                let v = Verdict {
                    action: Action::Deliver,
                    reason: None,
                    rules,
                    next_host: None,
                    summary,
                };
                (steps, v, model, run)
            }
            Place::Remote { host, .. } => {
                let summary = format!(
                    "wrapped for {host}, whose from_underlay judges {}'s ingress rules next{}",
                    p.dst_endpoint.clone().unwrap_or_default(),
                    if hit { " (as part of a live flow here)" } else { "" }
                );
                let v = Verdict {
                    action: Action::Wrap,
                    reason: None,
                    rules,
                    next_host: Some(host),
                    summary,
                };
                (steps, v, model, run)
            }
        }
    }

    /// Where the destination lives, as this host routes it.
    fn route(&self, p: &Packet) -> (Step, Option<Place<'a>>) {
        const HOOK: &str = HOOK_FROM_ENDPOINT;
        let st = &self.r.state;
        let owner = p.dst_endpoint.as_ref().and_then(|id| st.endpoints.get(id));
        let none = |detail: String| {
            (drop_step(self.host, HOOK, "route", DropReason::NoRoute, detail), None)
        };
        let Some(ep) = owner else {
            return none(format!("no endpoint of universe {} has address {}", p.universe, p.dst));
        };
        if ep.host == self.host {
            return match self.plumbed.get(&ep.id) {
                Some(ix) => (
                    step(
                        self.host,
                        HOOK,
                        "route",
                        Outcome::Pass,
                        format!("{} is local: interface {} (ifindex {ix})", ep.id, ep.interface),
                    ),
                    Some(Place::Local(ep)),
                ),
                None => none(format!(
                    "{} is placed on {} but not plumbed in its dataplane",
                    ep.id, self.host
                )),
            };
        }
        let underlay = st.hosts.get(&ep.host).and_then(|h| h.underlay_ip);
        match (self.r.underlay_ip, underlay) {
            (Some(_), Some(ip)) => (
                step(
                    self.host,
                    HOOK,
                    "route",
                    Outcome::Pass,
                    format!(
                        "{} is on {}: wrapped (VXLAN-GBP, VNI {}) to its underlay address {ip}",
                        ep.id, ep.host, p.vni
                    ),
                ),
                Some(Place::Remote { host: ep.host.clone() }),
            ),
            (None, _) => {
                let (mut s, place) =
                    none(format!("{} is on {}, and {} has no underlay", ep.id, ep.host, self.host));
                s.reason = Some(DropReason::NoUnderlay.label().to_owned());
                (s, place)
            }
            (_, None) => {
                none(format!("{} is on {}, which has no underlay address", ep.id, ep.host))
            }
        }
    }

    /// The receiver's hook on this host, for a packet wrapped by `sender_host`.
    #[allow(clippy::wrong_self_convention, reason = "named after the hook it walks")]
    fn from_underlay(&self, p: &Packet, sender_host: &str) -> WalkResult {
        const HOOK: &str = HOOK_FROM_UNDERLAY;
        let st = &self.r.state;
        let mut steps = Vec::new();
        let sender_ul = st.hosts.get(sender_host).and_then(|h| h.underlay_ip);
        let run_input = |this: &Walk<'_>| -> Option<RunInput> {
            let ul = this.r.underlay_ip?;
            let src_ul = sender_ul?;
            let sender = st.endpoints.get(p.src_endpoint.as_deref()?)?;
            let inner = this.frame(p, sender);
            let mut inner = inner;
            // The sender's dataplane rewrote the Ethernet header for the receiver.
            if let Some(dst) = p
                .dst_endpoint
                .as_ref()
                .and_then(|id| st.endpoints.get(id))
                .and_then(|e| model::parse_mac(&e.mac))
            {
                inner[0..6].copy_from_slice(&dst);
                inner[6..12].copy_from_slice(&this.r.config.gateway_mac);
            }
            let frame = wrap(&inner, src_ul, ul, sender.identity, p.vni);
            Some(this.run_input(HOOK, p, frame, this.r.config.underlay_ifindex))
        };
        let run = run_input(self);
        let Some(ul) = self.r.underlay_ip else {
            return self.refuse(
                steps,
                HOOK,
                "underlay",
                DropReason::UnknownHost,
                format!("{} has no underlay: it receives nothing from {sender_host}", self.host),
                None,
                None,
            );
        };
        // The reference model's from_underlay on the very frame a run takes.
        let model = run.as_ref().and_then(|r| {
            decision_of(
                &self.model_host().judge_underlay(&self.ct, self.r.now_ns, &r.frame).verdict,
            )
        });
        let Some(src_ul) = sender_ul else {
            return self.refuse(
                steps,
                HOOK,
                "underlay",
                DropReason::UnknownHost,
                format!("{sender_host} has no underlay address this host knows"),
                model,
                run,
            );
        };
        steps.push(self.passed(
            HOOK,
            "underlay",
            format!(
                "wrapped by {sender_host} ({src_ul}) to {ul}: a known host, VNI {} is universe {}",
                p.vni, p.universe
            ),
        ));
        let sender = p.src_endpoint.as_ref().and_then(|id| st.endpoints.get(id));
        let placed = sender.is_some_and(|e| e.host == sender_host);
        if !placed {
            return self.refuse(
                steps,
                HOOK,
                "anti_spoofing",
                DropReason::NotPlacedOnSender,
                format!("{} is not an endpoint placed on {sender_host} (S10)", p.src),
                model,
                run,
            );
        }
        steps.push(self.passed(
            HOOK,
            "anti_spoofing",
            format!(
                "{} ({}) is placed on {sender_host}, the sending host, and the Group Policy ID it \
                 carries is the identity the control plane gives it (S10); {}",
                p.src_endpoint.clone().unwrap_or_default(),
                p.src,
                self.ident_text(p, p.src)
            ),
        ));
        let receiver = p.dst_endpoint.as_ref().and_then(|id| st.endpoints.get(id));
        let local = receiver.filter(|e| e.host == self.host && self.plumbed.contains_key(&e.id));
        let Some(receiver) = local else {
            return self.refuse(
                steps,
                HOOK,
                "destination",
                DropReason::NotLocal,
                format!("{} is no endpoint of this host", p.dst),
                model,
                run,
            );
        };
        steps.push(self.passed(
            HOOK,
            "destination",
            format!(
                "{} is local: interface {} (ifindex {})",
                receiver.id, receiver.interface, self.plumbed[&receiver.id]
            ),
        ));
        let (ct_step, hit) = self.conntrack(HOOK, p);
        steps.push(ct_step);
        let mut rules = Vec::new();
        if !hit {
            if !self.admits(&mut steps, &mut rules, HOOK, p, receiver, Direction::Ingress) {
                return self.dropped(steps, DropReason::PolicyIngress, model, run);
            }
            if !self.charged(&mut steps, HOOK, p, receiver) {
                return self.dropped(steps, DropReason::ConntrackBudgetExceeded, model, run);
            }
        }
        let summary = match rules.first() {
            Some(r) => format!(
                "delivered to {} and tracked: admitted by {} of {}",
                receiver.id, r.rule, r.group
            ),
            None => format!("delivered to {} as part of a live flow", receiver.id),
        };
        let v = Verdict { action: Action::Deliver, reason: None, rules, next_host: None, summary };
        (steps, v, model, run)
    }

    /// The frame `sender` puts on its veth for `p`.
    fn frame(&self, p: &Packet, sender: &model::Endpoint) -> Vec<u8> {
        let mac = model::parse_mac(&sender.mac).unwrap_or_default();
        synthesize(p, mac, self.r.config.gateway_mac)
    }
}

/// Where a packet goes.
#[derive(Clone, Debug)]
enum Place<'a> {
    Local(&'a model::Endpoint),
    Remote { host: String },
}

/// A flow's conntrack key in the table of its family (`VERSE_CT`, `VERSE_CT6`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Key {
    V4(CtKey),
    V6(Ct6Key),
}

/// The entries of `table` under `key` and under its reverse `rev` (once if they are one key).
fn both_ways<K: Copy + Eq + std::hash::Hash>(
    table: &std::collections::HashMap<K, CtEntry>,
    key: K,
    rev: K,
) -> Vec<(K, CtEntry)> {
    let keys = if rev == key { &[key][..] } else { &[key, rev][..] };
    keys.iter().filter_map(|k| table.get(k).map(|e| (*k, *e))).collect()
}

/// The 16 bytes of an IPv6 address (an IPv4 one never comes here: a packet is of one family).
fn v6(a: IpAddr) -> [u8; 16] {
    match a {
        IpAddr::V6(a) => a.octets(),
        IpAddr::V4(a) => a.to_ipv6_mapped().octets(),
    }
}

fn ct_ports(p: &Packet) -> (u16, u16) {
    let icmp = p.transport.icmp_type;
    match (p.proto, p.src.is_ipv6()) {
        (IPPROTO_TCP | IPPROTO_UDP, _) => {
            (p.transport.sport.unwrap_or(0), p.transport.dport.unwrap_or(0))
        }
        (IPPROTO_ICMP, false) => icmp.map_or((0, 0), |ty| icmp_ct_ports(ty, TRACE_ECHO_ID)),
        (IPPROTO_ICMPV6, true) => {
            icmp.map_or((0, 0), |ty| wire6::icmpv6_ct_ports(ty, TRACE_ECHO_ID))
        }
        _ => (0, 0),
    }
}

/// What the packet may match in conntrack (S7), as the hook of its family decides.
fn role_of(p: &Packet) -> verdict::Role {
    let ty = p.transport.icmp_type.unwrap_or(0);
    if p.src.is_ipv6() {
        role6(p.proto, tcp_flags(p), ty)
    } else {
        verdict::role(p.proto, tcp_flags(p), ty)
    }
}

/// A new TCP flow begins with a SYN.
fn tcp_flags(p: &Packet) -> u8 {
    if p.proto == IPPROTO_TCP {
        0x02
    } else {
        0
    }
}

fn state_name(s: u8) -> &'static str {
    match s {
        ct_state::TCP_OPENING => "tcp opening",
        ct_state::TCP_ESTABLISHED => "tcp established",
        ct_state::TCP_CLOSING => "tcp closing",
        ct_state::UDP_ONE_WAY => "udp one-way",
        ct_state::UDP_REPLIED => "udp replied",
        ct_state::ICMP => "icmp",
        ct_state::OTHER => "other",
        _ => "unknown",
    }
}

/// The model's verdict as a decision (`None` for what a trace never synthesizes).
fn decision_of(v: &verdict::Verdict) -> Option<Decision> {
    match v {
        verdict::Verdict::Deliver { .. } => Some(Decision::of(Action::Deliver)),
        verdict::Verdict::Drop(r) => Some(Decision::drop(*r)),
        verdict::Verdict::Wrap { .. } => Some(Decision::of(Action::Wrap)),
        verdict::Verdict::FragNeeded { .. } => Some(Decision::drop(DropReason::FragNeeded)),
        verdict::Verdict::Pass => Some(Decision::of(Action::Pass)),
        verdict::Verdict::ArpReply { .. } => None,
    }
}

/// The IPv4 identification of every packet a trace synthesizes ("tr"): a capture tells them
/// apart from a workload's.
const TRACE_IP_ID: u16 = 0x7472;

/// The Ethernet frame a workload with MAC `src_mac` sends for `p` (to the gateway MAC): a TCP
/// SYN, a UDP datagram with 4 bytes, an ICMP (ICMPv6) message with 8 bytes (an echo carries
/// [`TRACE_ECHO_ID`]; an error type quotes nothing, so it is related to no flow), or 8 bytes of
/// another protocol; in an IPv4 packet, or an IPv6 one with no extension header.
pub fn synthesize(p: &Packet, src_mac: [u8; 6], gateway_mac: [u8; 6]) -> Vec<u8> {
    let (sport, dport) = (p.transport.sport.unwrap_or(0), p.transport.dport.unwrap_or(0));
    let (ty, code) = (p.transport.icmp_type.unwrap_or(8), p.transport.icmp_code.unwrap_or(0));
    let echo = || {
        let (sport, dport) = ct_ports(p);
        frames::echo_rest(sport.max(dport), 1)
    };
    let l4 = match (p.proto, p.src, p.dst) {
        (IPPROTO_TCP, ..) => frames::tcp(sport, dport, TCP_SYN, 0),
        (IPPROTO_UDP, ..) => frames::udp(sport, dport, b"trce"),
        (IPPROTO_ICMP, IpAddr::V4(_), _) => frames::icmp(ty, code, echo(), &[0; 8]),
        (IPPROTO_ICMPV6, IpAddr::V6(s), IpAddr::V6(d)) => {
            frames::icmpv6(s.octets(), d.octets(), ty, code, echo(), &[0; 8])
        }
        _ => vec![0; 8],
    };
    match (p.src, p.dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let ip = frames::ipv4_with(s.octets(), d.octets(), p.proto, TRACE_IP_ID, true, &l4);
            frames::ethernet(gateway_mac, src_mac, ETHERTYPE_IPV4, &ip)
        }
        (s, d) => {
            let ip = frames::ipv6(v6(s), v6(d), p.proto, &l4);
            frames::ethernet(gateway_mac, src_mac, ETHERTYPE_IPV6, &ip)
        }
    }
}

/// `inner` wrapped as a host sends it on the underlay (README, wire format): outer IPv4 from
/// `src` to `dst`, UDP to port 4789, VXLAN with the Group Policy extension carrying the sender's
/// `identity` and `vni`. The outer Ethernet addresses are left zero (no hook reads them).
pub fn wrap(inner: &[u8], src: Ipv4Addr, dst: Ipv4Addr, identity: u32, vni: u32) -> Vec<u8> {
    let mut vx = Vec::with_capacity(8 + inner.len());
    vx.extend_from_slice(&frames::vxlan_gbp(0x88, identity as u16, vni));
    vx.extend_from_slice(inner);
    let udp = frames::udp(49_152, VXLAN_PORT, &vx);
    let ip = frames::ipv4_with(src.octets(), dst.octets(), IPPROTO_UDP, TRACE_IP_ID, true, &udp);
    frames::ethernet([0; 6], [0; 6], ETHERTYPE_IPV4, &ip)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{CreateEndpoint, CreateGroup, CreateRule, CreateUniverse, HostRecord};
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};
    use serde_json::json;

    const HOSTS: [(&str, &str); 2] = [("h1", "198.18.0.1"), ("h2", "198.18.0.2")];
    const NOW: u64 = 1_000_000 * 1_000_000_000;
    const PORTS: [u16; 4] = [22, 53, 80, 5432];
    const SPORTS: [u16; 3] = [40_000, 40_001, 40_002];

    /// Two hosts with underlays, one dual-stack universe, four groups with random rules of both
    /// families, endpoints on both hosts (most of them dual stack, fd00::N beside 10.0.0.N).
    fn random_state(rng: &mut StdRng) -> (State, Vec<model::Endpoint>) {
        let mut s = State::default();
        for (name, ip) in HOSTS {
            s.hosts.insert(name.into(), HostRecord::at(name, Some(ip.parse().unwrap())));
        }
        let u = s
            .create_universe(CreateUniverse {
                name: "u".into(),
                cidr: Some("10.0.0.0/16".into()),
                cidrs: None,
                ipv6_cidrs: Some(vec!["fd00::/64".into()]),
            })
            .unwrap();
        let groups: Vec<String> = (0..4)
            .map(|i| {
                let g = CreateGroup {
                    universe: u.id.clone(),
                    name: format!("g{i}"),
                    description: None,
                };
                s.create_group(g).unwrap().id
            })
            .collect();
        for (i, g) in groups.iter().enumerate() {
            if i < 2 || rng.random_bool(0.5) {
                let egress: Vec<String> = s.groups[g].egress.iter().map(|r| r.id.clone()).collect();
                for r in egress {
                    s.delete_rule(g, &r).unwrap();
                }
            }
            for _ in 0..rng.random_range(0..6) {
                let mut body = match rng.random_range(0..6) {
                    0 => json!({"protocol": "all"}),
                    5 => json!({"protocol": "icmpv6", "icmp_type": 128, "icmp_code": -1}),
                    1 | 2 => {
                        let p = PORTS[rng.random_range(0..PORTS.len())];
                        json!({"protocol": if rng.random_bool(0.5) { "tcp" } else { "udp" }, "from_port": p, "to_port": p})
                    }
                    3 => json!({"protocol": "icmp"}),
                    _ => json!({"protocol": "icmp", "icmp_type": 8, "icmp_code": -1}),
                };
                body["direction"] = json!(if rng.random_bool(0.5) { "ingress" } else { "egress" });
                if rng.random_bool(0.4) {
                    body["group"] = json!(groups[rng.random_range(0..groups.len())]);
                } else {
                    let cidrs = [
                        "10.0.0.0/16",
                        "10.0.0.0/29",
                        "10.0.0.4/30",
                        "10.0.0.9/32",
                        "0.0.0.0/0",
                        "fd00::/64",
                        "fd00::/125",
                        "fd00::4/126",
                        "fd00::9/128",
                        "::/0",
                    ];
                    body["cidr"] = json!(cidrs[rng.random_range(0..cidrs.len())]);
                }
                let req: CreateRule = serde_json::from_value(body).unwrap();
                let _ = s.add_rule(g, req); // a duplicate is refused: fine
            }
        }
        let mut eps = Vec::new();
        for i in 0..7u8 {
            let mine: Vec<String> =
                groups.iter().filter(|_| rng.random_bool(0.4)).cloned().collect();
            let req = CreateEndpoint {
                universe: u.id.clone(),
                host: None,
                netns: format!("ns{i}"),
                ip: format!("10.0.0.{}", 2 + i),
                security_groups: (!mine.is_empty()).then_some(mine),
                // Some at a small budget, which the flows below may fill (S14).
                conntrack_budget: rng.random_bool(0.4).then(|| rng.random_range(1..3)),
                flow_logs: None,
                ipv6: (i % 3 != 2).then(|| format!("fd00::{}", 2 + i)),
            };
            eps.push(s.create_endpoint(req, HOSTS[usize::from(i % 2)].0).unwrap());
        }
        (s, eps)
    }

    /// Live, expired and reverse flows between the endpoints, on the ports packets use, in the
    /// tables of `host` (IPv6 ones between dual-stack endpoints): each charged to its local end
    /// (the sender if local, else the receiver).
    fn random_conntrack(rng: &mut StdRng, eps: &[model::Endpoint], vni: u32, host: &str) -> Tables {
        let mut ct = Tables::default();
        for _ in 0..rng.random_range(0..12) {
            let a = &eps[rng.random_range(0..eps.len())];
            let b = &eps[rng.random_range(0..eps.len())];
            let sport = SPORTS[rng.random_range(0..SPORTS.len())];
            let dport = PORTS[rng.random_range(0..PORTS.len())];
            let (proto, ports, state) = match rng.random_range(0..3) {
                0 => (
                    IPPROTO_TCP,
                    (sport, dport),
                    [ct_state::TCP_OPENING, ct_state::TCP_ESTABLISHED][rng.random_range(0..2)],
                ),
                1 => (
                    IPPROTO_UDP,
                    (sport, dport),
                    [ct_state::UDP_ONE_WAY, ct_state::UDP_REPLIED][rng.random_range(0..2)],
                ),
                _ => (IPPROTO_ICMP, (TRACE_ECHO_ID, 0), ct_state::ICMP),
            };
            let (src, dst, ports) =
                if rng.random_bool(0.5) { (a, b, ports) } else { (b, a, (ports.1, ports.0)) };
            let key = match (src.ipv6, dst.ipv6) {
                (Some(s6), Some(d6)) if rng.random_bool(0.5) => {
                    let proto = if proto == IPPROTO_ICMP { IPPROTO_ICMPV6 } else { proto };
                    let (s, d) = (s6.octets(), d6.octets());
                    Key::V6(Ct6Key::new(vni, s, d, ports.0, ports.1, proto))
                }
                _ => Key::V4(CtKey::new(
                    vni,
                    src.ip.octets(),
                    dst.ip.octets(),
                    ports.0,
                    ports.1,
                    proto,
                )),
            };
            // Idle 0 s to 2 minutes: some are past their timeout.
            let idle = rng.random_range(0..120u64) * 1_000_000_000;
            // Bound to the endpoints it was made for, as the dataplane binds its flows, and
            // charged to the one on this host.
            let (owner, owner_slot) = if src.host == host {
                (dataplane_common::ct_owner::SRC, src.slot)
            } else if dst.host == host {
                (dataplane_common::ct_owner::DST, dst.slot)
            } else {
                (dataplane_common::ct_owner::SRC, 0)
            };
            let entry = CtEntry {
                last_seen_ns: NOW - idle,
                state,
                src_serial: src.serial,
                dst_serial: dst.serial,
                owner,
                owner_slot,
                ..CtEntry::default()
            };
            match key {
                Key::V4(k) => ct.v4.push((k, entry)),
                Key::V6(k) => ct.v6.push((k, entry)),
            }
        }
        ct
    }

    /// A host's two conntrack tables.
    #[derive(Default)]
    struct Tables {
        v4: Vec<(CtKey, CtEntry)>,
        v6: Vec<(Ct6Key, CtEntry)>,
    }

    /// What host `name` realized: the compiled maps with every local endpoint plumbed.
    fn realized(s: &Arc<State>, name: &str, conntrack: Tables) -> Realized {
        let plumbed = |ep: &model::Endpoint| Some(10 + u32::from(ep.ip.octets()[3]));
        let maps = compile::compile(s, name, &plumbed, &mut compile::Ids::default()).unwrap();
        let underlay_ip = s.hosts[name].underlay_ip;
        let mut config = crate::config::Config::default().dataplane_config().unwrap();
        config.underlay_ifindex = 2;
        config.underlay_mtu = 1500;
        Realized {
            state: s.clone(),
            maps,
            conntrack: conntrack.v4,
            conntrack6: conntrack.v6,
            now_ns: NOW,
            config,
            underlay_ip,
        }
    }

    /// A flow's key the other way round.
    fn reversed(k: Key) -> Key {
        match k {
            Key::V4(k) => Key::V4(k.reversed()),
            Key::V6(k) => Key::V6(k.reversed()),
        }
    }

    /// The trace request of a packet of the tracked flow `k`, from its sender.
    fn packet_of_flow(eps: &[model::Endpoint], k: Key) -> (&model::Endpoint, TraceRequest) {
        let (from, to, proto, (sport, dport)) = match k {
            Key::V4(k) => {
                let from = eps.iter().find(|e| e.ip.octets() == k.src);
                (from, Ipv4Addr::from(k.dst).to_string(), k.proto(), (k.sport, k.dport))
            }
            Key::V6(k) => {
                let from = eps.iter().find(|e| e.ipv6.is_some_and(|a| a.octets() == k.src));
                let to = std::net::Ipv6Addr::from(k.dst).to_string();
                (from, to, k.proto, (k.sport, k.dport))
            }
        };
        let from = from.expect("a flow's sender is an endpoint");
        let mut req = TraceRequest { from: from.id.clone(), to, ..TraceRequest::default() };
        // (id, 0) is an echo request's key, (0, id) its reply's, in both families.
        let request = sport == TRACE_ECHO_ID;
        match proto {
            IPPROTO_ICMP => {
                req.protocol = "icmp".into();
                req.icmp_type = Some(if request { 8 } else { 0 });
            }
            IPPROTO_ICMPV6 => {
                req.protocol = "icmpv6".into();
                req.icmp_type = Some(if request { 128 } else { 129 });
            }
            proto => {
                req.protocol = if proto == IPPROTO_TCP { "tcp" } else { "udp" }.into();
                req.sport = Some(sport);
                req.port = Some(dport);
            }
        }
        (from, req)
    }

    /// On random policies, live flows and packets of both families, over two hosts: every hop's
    /// walk reaches the reference model's verdict on the frame it synthesized (`judge` for the
    /// sender's hook, `judge_underlay` for the receiver's), and the walks cover every kind of
    /// verdict of each family.
    #[test]
    fn on_random_policies_and_flows_the_walk_agrees_with_the_model_on_both_hooks() {
        let mut seen = BTreeMap::<String, u32>::new();
        for seed in 0..40u64 {
            let mut rng = StdRng::seed_from_u64(seed);
            let (s, eps) = random_state(&mut rng);
            let vni = s.universes.values().next().unwrap().vni;
            let s = Arc::new(s);
            let hosts: BTreeMap<&str, Realized> = HOSTS
                .iter()
                .map(|(h, _)| (*h, realized(&s, h, random_conntrack(&mut rng, &eps, vni, h))))
                .collect();
            let flows: Vec<Key> = hosts
                .values()
                .flat_map(|r| {
                    let v4 = r.conntrack.iter().map(|(k, _)| Key::V4(*k));
                    v4.chain(r.conntrack6.iter().map(|(k, _)| Key::V6(*k)))
                })
                .collect();
            for _ in 0..80 {
                // Half the packets belong to a flow some host tracks, either way.
                let flow = (!flows.is_empty() && rng.random_bool(0.5))
                    .then(|| flows[rng.random_range(0..flows.len())])
                    .map(|k| if rng.random_bool(0.5) { k } else { reversed(k) });
                let (from, mut req) = match flow {
                    Some(k) => packet_of_flow(&eps, k),
                    None => {
                        let from = &eps[rng.random_range(0..eps.len())];
                        let j = if rng.random_bool(0.1) { 99 } else { rng.random_range(2..9) };
                        // An IPv6 packet from a dual-stack endpoint, to an address of the
                        // universe that may have no endpoint (or one without IPv6).
                        let to = if from.ipv6.is_some() && rng.random_bool(0.5) {
                            format!("fd00::{j}")
                        } else {
                            format!("10.0.0.{j}")
                        };
                        (
                            from,
                            TraceRequest { from: from.id.clone(), to, ..TraceRequest::default() },
                        )
                    }
                };
                let family = if req.to.contains(':') { " v6" } else { "" };
                if flow.is_none() {
                    match rng.random_range(0..3) {
                        0 | 1 => {
                            req.protocol = if rng.random_bool(0.5) { "tcp" } else { "udp" }.into();
                            req.port = Some(PORTS[rng.random_range(0..PORTS.len())]);
                            req.sport = rng
                                .random_bool(0.7)
                                .then(|| SPORTS[rng.random_range(0..SPORTS.len())]);
                        }
                        _ if family.is_empty() => {
                            req.protocol = "icmp".into();
                            req.icmp_type = Some([8, 0, 3][rng.random_range(0..3)]);
                        }
                        _ => {
                            req.protocol = "icmpv6".into();
                            req.icmp_type = Some([128, 129, 1][rng.random_range(0..3)]);
                        }
                    }
                }
                let mut host = from.host.as_str();
                for hop in 0..2 {
                    let (answer, run) = trace(host, &hosts[host], &req)
                        .unwrap_or_else(|e| panic!("seed {seed} {req:?}: {e}"))
                        .unwrap_or_else(|_| panic!("seed {seed} {req:?}: not {host}'s"));
                    let walk = answer.verdict.decision();
                    assert_eq!(
                        Some(&walk),
                        answer.model.as_ref(),
                        "seed {seed}, {host}: the walk and the model differ on {req:?}:\n{answer:#?}"
                    );
                    assert!(run.is_some(), "seed {seed}: a judged packet has a frame to run");
                    let ct = answer.steps.iter().find(|st| st.check == "conntrack");
                    if ct.is_some_and(|st| st.outcome == Outcome::Accept) {
                        *seen.entry(format!("conntrack hit{family}")).or_default() += 1;
                    }
                    let hook = if hop == 0 { HOOK_FROM_ENDPOINT } else { HOOK_FROM_UNDERLAY };
                    *seen
                        .entry(format!(
                            "{hook}{family}: {:?} {}",
                            walk.action,
                            walk.reason.unwrap_or_default()
                        ))
                        .or_default() += 1;
                    if walk.action != Action::Wrap {
                        break;
                    }
                    host = HOSTS.iter().map(|(h, _)| *h).find(|h| *h != host).unwrap();
                    assert_eq!(answer.verdict.next_host.as_deref(), Some(host));
                    req.sport = answer.packet.transport.sport;
                }
            }
        }
        eprintln!("{seen:#?}");
        assert!(
            seen.get("conntrack hit").is_some_and(|&n| n >= 50),
            "too few packets of live IPv4 flows: {seen:#?}"
        );
        assert!(
            seen.get("conntrack hit v6").is_some_and(|&n| n >= 30),
            "too few packets of live IPv6 flows: {seen:#?}"
        );
        for want in [
            "from_endpoint: Deliver ",
            "from_endpoint: Wrap ",
            "from_endpoint: Drop policy_egress",
            "from_endpoint: Drop policy_ingress",
            "from_endpoint: Drop no_route",
            "from_underlay: Deliver ",
            "from_underlay: Drop policy_ingress",
            "from_endpoint: Drop conntrack_budget_exceeded",
            "from_underlay: Drop conntrack_budget_exceeded",
            "from_endpoint v6: Deliver ",
            "from_endpoint v6: Wrap ",
            "from_endpoint v6: Drop policy_egress",
            "from_endpoint v6: Drop policy_ingress",
            "from_endpoint v6: Drop no_route",
            "from_underlay v6: Deliver ",
            "from_underlay v6: Drop policy_ingress",
            "from_endpoint v6: Drop conntrack_budget_exceeded",
        ] {
            assert!(seen.contains_key(want), "the random cases never gave {want:?}: {seen:#?}");
        }
    }
}
