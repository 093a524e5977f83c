//! Differential test: the kernel programs `from_endpoint` and `from_underlay`, run through
//! `BPF_PROG_TEST_RUN`, against the reference model `verse::verdict`, packet by packet.
//!
//! The state has two universes with the same CIDR, groups referencing groups, nested CIDR rules
//! (/8, /16, /24, /32 and a group peer all matching one address), port ranges, ICMP type/code
//! rules, protocol numbers and `all` rules, and endpoints on this host and on two other hosts of
//! a fleet; it is compiled with `verse::compile::compile` and written to the maps. Local
//! endpoints are bound to veth devices of a private network namespace (the kernel resolves the
//! test run's ifindex there), and the underlay is a veth there too (this host 198.18.0.1, MTU
//! 1500). A seeded generator then sends thousands of packets — valid flows, replies,
//! continuations, ICMP errors quoting tracked and untracked flows, ARP variants, spoofed sources,
//! and malformed frames cut at every header boundary — to both, in the same order, so that
//! conntrack evolves the same way on both sides. What a local endpoint sends goes through
//! `from_endpoint` (delivered, or wrapped for another host, or answered "fragmentation needed"
//! when too big); what an endpoint of another host sends arrives wrapped on the underlay through
//! `from_underlay`, with forged encapsulations (unknown hosts, sources not placed on the
//! sending host, identities other than the sender's, unknown VNIs), malformed ones, and frames
//! that are not Verse's. Mid-run a rule is revoked (S8), an endpoint changes groups (S5), an
//! endpoint is deleted and made again at its address and interface (a new serial, other groups:
//! S7, neither side may let it inherit the old one's flows), and garbage is collected (expired
//! entries and those of the deleted endpoint, by the controller's own collector on the kernel's
//! map and `Conntrack::collect` on the model's). Two endpoints have small conntrack budgets,
//! which the generator spends, so that refusals at the limit (S14) and the replacement of an
//! owner's own entries are compared too. Compared for every packet: the return code, the output
//! frame (for a wrapped frame, all but the outer UDP source port, a flow hash the kernel
//! computes), and which `VERSE_DROPS` counter moved; every few hundred packets and at the end,
//! the conntrack tables (keys, states, the serials of both endpoints and the owner) and every
//! owner's budget counter against the entries charged to it in the model. The deliveries the
//! kernel caches in its entries
//! (`CtValue::original`/`reply`) are an optimisation the model has no counterpart for:
//! `Dataplane::conntrack` leaves them out, so they are never compared; the frames they produce
//! are, packet by packet. Both sides read `CLOCK_MONOTONIC_COARSE`.
//!
//! Any disagreement fails the test with the packet's hexdump and both verdicts. After one, the
//! model's conntrack table is replaced by the kernel's so that the run goes on and reports every
//! kind of disagreement, not just the first.
//!
//! Needs root (BPF, network namespaces, bpffs). Seed: `VERSE_MODEL_SEED` (default fixed);
//! packets per phase: `VERSE_MODEL_PACKETS` (default 2000).
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::Ipv4Addr;

use dataplane_common::wire::ipv6::{
    EXT_MAX, NEXTHDR_AUTH, NEXTHDR_DEST, NEXTHDR_FRAGMENT, NEXTHDR_HOP, NEXTHDR_ROUTING, OPT_JUMBO,
};
use dataplane_common::{ct_state, Config, Ct6Key, CtEntry, CtKey, DropReason, VXLAN_PORT};
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use serde_json::json;
use tests::frames::{self, ETH_IPV4, ETH_IPV6};
use tests::{Bpffs, Netns, TempDir};
use verse::compile::{compile, Ids, MapContents};
use verse::dataplane::{tc_act, Dataplane};
use verse::model::{
    CreateEndpoint, CreateGroup, CreateRule, CreateUniverse, HostRecord, PatchEndpoint, State,
};
use verse::verdict::{is_garbage, Conntrack, Host, Timeouts, Underlay, Verdict};

const HOST: &str = "h1";
const GW: [u8; 6] = [0x02, 0xfe, 0, 0, 0, 0x01];
/// This host on the underlay, and the other hosts of the fleet: h2 and h3 share universe `a`
/// (h3 also `b`) with this host, h4 holds only universe `c`, which has no endpoint here (so this
/// host holds neither h4 nor `c`'s VNI: their frames are `unknown_host`, `unknown_universe`).
const HERE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const OTHER_HOSTS: [(&str, Ipv4Addr); 3] = [
    ("h2", Ipv4Addr::new(198, 18, 0, 2)),
    ("h3", Ipv4Addr::new(198, 18, 0, 3)),
    ("h4", Ipv4Addr::new(198, 18, 0, 4)),
];
const UNDERLAY_MTU: u32 = 1500;

fn now_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC_COARSE is the clock of
    // bpf_ktime_get_coarse_ns, which the kernel program stamps conntrack entries with.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_MONOTONIC_COARSE)");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

// ---------------------------------------------------------------------------------------------
// The state
// ---------------------------------------------------------------------------------------------

/// Ids the test edits later.
struct Names {
    web_http_rule: String,
    web_group: String,
    mover: String,
    mover_groups_after: Vec<String>,
    /// Deleted and made again at its address (S7), in `reborn_groups`.
    reborn: String,
    reborn_groups: Vec<String>,
}

/// The conntrack budget of the endpoints that spend theirs in this test (S14).
const SMALL_BUDGET: i64 = 12;

fn rule(
    st: &mut State,
    g: &str,
    dir: &str,
    proto: serde_json::Value,
    spec: serde_json::Value,
) -> String {
    let mut req = CreateRule { direction: dir.into(), protocol: proto, ..CreateRule::default() };
    let get = |k: &str| spec.get(k).and_then(|v| v.as_i64());
    req.from_port = get("from");
    req.to_port = get("to");
    req.icmp_type = get("type");
    req.icmp_code = get("code");
    req.cidr = spec.get("cidr").and_then(|v| v.as_str()).map(str::to_owned);
    req.group = spec.get("group").and_then(|v| v.as_str()).map(str::to_owned);
    st.add_rule(g, req).unwrap_or_else(|e| panic!("add_rule {g} {spec}: {e}")).id
}

fn clear_egress(st: &mut State, g: &str) {
    let ids: Vec<String> = st.groups[g].egress.iter().map(|r| r.id.clone()).collect();
    for id in ids {
        st.delete_rule(g, &id).expect("delete egress rule");
    }
}

/// Three universes on 10.0.0.0/16; in `a`: default, web, db, mgmt, ops; in `b`: default, web;
/// in `c` (no endpoint on this host): default.
/// Returns the state, the endpoint ids by short name, and the ids the phases edit.
fn build_state() -> (State, BTreeMap<&'static str, String>, Names) {
    let mut st = State::default();
    // `a` and `b` are dual stack, with the same IPv6 CIDR (isolation of identical addresses);
    // `c` is IPv4 only.
    let uni = |st: &mut State, name: &str, v6: bool| {
        st.create_universe(CreateUniverse {
            name: name.into(),
            cidr: Some("10.0.0.0/16".into()),
            cidrs: None,
            ipv6_cidrs: v6.then(|| vec!["fd00:a::/48".into()]),
        })
        .expect("create universe")
        .id
    };
    let a = uni(&mut st, "a", true);
    let b = uni(&mut st, "b", true);
    let c = uni(&mut st, "c", false);
    let default_of = |st: &State, u: &str| {
        st.groups
            .values()
            .find(|g| g.universe == u && g.name == "default")
            .expect("default group")
            .id
            .clone()
    };
    let group = |st: &mut State, u: &str, name: &str| {
        st.create_group(CreateGroup { universe: u.into(), name: name.into(), description: None })
            .expect("create group")
            .id
    };
    let (def_a, def_b, def_c) = (default_of(&st, &a), default_of(&st, &b), default_of(&st, &c));
    let web = group(&mut st, &a, "web");
    let db = group(&mut st, &a, "db");
    let mgmt = group(&mut st, &a, "mgmt");
    let ops = group(&mut st, &a, "ops");
    let web_b = group(&mut st, &b, "web");

    // web: HTTP from anywhere, a range from the universe, ICMP echo from the /24.
    let web_http_rule = rule(
        &mut st,
        &web,
        "ingress",
        json!("tcp"),
        json!({"from": 80, "to": 80, "cidr": "0.0.0.0/0"}),
    );
    rule(
        &mut st,
        &web,
        "ingress",
        json!("tcp"),
        json!({"from": 8000, "to": 8099, "cidr": "10.0.0.0/16"}),
    );
    rule(
        &mut st,
        &web,
        "ingress",
        json!("icmp"),
        json!({"type": 8, "code": -1, "cidr": "10.0.1.0/24"}),
    );
    // db: only from web members and a narrow range; egress limited (no S2 default).
    rule(&mut st, &db, "ingress", json!("tcp"), json!({"from": 5432, "to": 5432, "group": web}));
    rule(
        &mut st,
        &db,
        "ingress",
        json!("tcp"),
        json!({"from": 5000, "to": 5999, "cidr": "10.0.1.0/24"}),
    );
    rule(
        &mut st,
        &db,
        "ingress",
        json!("udp"),
        json!({"from": 53, "to": 53, "cidr": "10.0.0.0/8"}),
    );
    clear_egress(&mut st, &db);
    rule(&mut st, &db, "egress", json!("tcp"), json!({"from": 1, "to": 1023, "group": web}));
    rule(
        &mut st,
        &db,
        "egress",
        json!("udp"),
        json!({"from": 53, "to": 53, "cidr": "10.0.2.0/24"}),
    );
    rule(&mut st, &db, "egress", json!("icmp"), json!({"type": 3, "code": 4, "cidr": "0.0.0.0/0"}));
    // mgmt: the nesting trap — /8, /16, /24, /32 and a group peer, each a different port range,
    // all matching 10.0.1.10; plus protocol numbers and ICMP type/code.
    rule(
        &mut st,
        &mgmt,
        "ingress",
        json!("tcp"),
        json!({"from": 1, "to": 99, "cidr": "10.0.0.0/8"}),
    );
    rule(
        &mut st,
        &mgmt,
        "ingress",
        json!("tcp"),
        json!({"from": 100, "to": 199, "cidr": "10.0.0.0/16"}),
    );
    rule(
        &mut st,
        &mgmt,
        "ingress",
        json!("tcp"),
        json!({"from": 200, "to": 299, "cidr": "10.0.1.0/24"}),
    );
    rule(
        &mut st,
        &mgmt,
        "ingress",
        json!("tcp"),
        json!({"from": 300, "to": 399, "cidr": "10.0.1.10/32"}),
    );
    rule(&mut st, &mgmt, "ingress", json!("tcp"), json!({"from": 400, "to": 499, "group": web}));
    rule(
        &mut st,
        &mgmt,
        "ingress",
        json!("udp"),
        json!({"from": 1000, "to": 1999, "cidr": "10.0.1.0/25"}),
    );
    rule(&mut st, &mgmt, "ingress", json!(47), json!({"group": db}));
    rule(&mut st, &mgmt, "ingress", json!("132"), json!({"cidr": "10.0.0.0/16"}));
    rule(
        &mut st,
        &mgmt,
        "ingress",
        json!("icmp"),
        json!({"type": 13, "code": 0, "cidr": "10.0.0.0/16"}),
    );
    rule(
        &mut st,
        &mgmt,
        "ingress",
        json!("icmp"),
        json!({"type": -1, "code": -1, "cidr": "10.0.2.0/24"}),
    );
    rule(
        &mut st,
        &mgmt,
        "ingress",
        json!("icmpv6"),
        json!({"type": -1, "code": -1, "cidr": "::/0"}),
    );
    rule(&mut st, &mgmt, "ingress", json!("all"), json!({"cidr": "10.0.1.11/32"}));
    // IPv6 peers: web takes TCP 8000-8099 from the universe's IPv6 /64, db UDP 53 from a /120
    // holding a-db, a-mgmt and a-web (a CIDR class of its own, nested in the /64).
    rule(
        &mut st,
        &web,
        "ingress",
        json!("tcp"),
        json!({"from": 8000, "to": 8099, "cidr": "fd00:a::/64"}),
    );
    rule(
        &mut st,
        &db,
        "ingress",
        json!("udp"),
        json!({"from": 53, "to": 53, "cidr": "fd00:a::a00:100/120"}),
    );
    // ops: all from mgmt members; egress only to mgmt, tcp.
    rule(&mut st, &ops, "ingress", json!("all"), json!({"group": mgmt}));
    clear_egress(&mut st, &ops);
    rule(&mut st, &ops, "egress", json!("tcp"), json!({"from": 0, "to": 65535, "group": mgmt}));
    rule(&mut st, &ops, "egress", json!("all"), json!({"cidr": "10.0.2.128/25"}));
    // b: its web takes HTTP from anyone.
    rule(
        &mut st,
        &web_b,
        "ingress",
        json!("tcp"),
        json!({"from": 80, "to": 80, "cidr": "0.0.0.0/0"}),
    );

    for (name, ip) in [(HOST, HERE)].into_iter().chain(OTHER_HOSTS) {
        st.hosts.insert(name.into(), HostRecord::at(name, Some(ip)));
    }
    let mut eps = BTreeMap::new();
    let mut ep = |st: &mut State,
                  short: &'static str,
                  host: &str,
                  u: &str,
                  ip: &str,
                  groups: &[&String],
                  budget: Option<i64>| {
        let dual = !st.universes[u].ipv6_cidrs.is_empty();
        let ipv6 = dual.then(|| std::net::Ipv6Addr::from(six(ip.parse().expect("ip"))).to_string());
        let e = st
            .create_endpoint(
                CreateEndpoint {
                    universe: u.into(),
                    host: Some(host.into()),
                    netns: format!("ns-{short}"),
                    ip: ip.into(),
                    security_groups: Some(groups.iter().map(|g| g.to_string()).collect()),
                    conntrack_budget: budget,
                    flow_logs: None,
                    ipv6,
                },
                HOST,
            )
            .unwrap_or_else(|e| panic!("create endpoint {short}: {e}"));
        eps.insert(short, e.id);
    };
    ep(&mut st, "a-web", HOST, &a, "10.0.1.10", &[&def_a, &web], None);
    ep(&mut st, "a-db", HOST, &a, "10.0.1.11", &[&db], None);
    ep(&mut st, "a-mgmt", HOST, &a, "10.0.1.12", &[&mgmt, &def_a], None);
    ep(&mut st, "a-webdb", HOST, &a, "10.0.2.5", &[&web, &db], None);
    ep(&mut st, "a-ops", HOST, &a, "10.0.2.200", &[&ops], None);
    ep(&mut st, "a-plain", HOST, &a, "10.0.0.7", &[&def_a], Some(SMALL_BUDGET));
    ep(&mut st, "b-def", HOST, &b, "10.0.1.10", &[&def_b], Some(SMALL_BUDGET));
    ep(&mut st, "b-web", HOST, &b, "10.0.1.12", &[&def_b, &web_b], None);
    // On the other hosts: reached wrapped, and sending wrapped.
    ep(&mut st, "r-web", "h2", &a, "10.0.1.20", &[&def_a, &web], None);
    ep(&mut st, "r-mgmt", "h3", &a, "10.0.1.21", &[&mgmt], None);
    ep(&mut st, "r-plain", "h2", &a, "10.0.2.130", &[&def_a], None);
    ep(&mut st, "r-ops", "h3", &a, "10.0.2.201", &[&ops], None);
    ep(&mut st, "rb-web", "h3", &b, "10.0.1.13", &[&def_b, &web_b], None);
    // Universe `c` has no endpoint here: on h3 (a host this one holds) and on h4 (one it does not).
    ep(&mut st, "rc-3", "h3", &c, "10.0.1.10", &[&def_c], None);
    ep(&mut st, "rc-4", "h4", &c, "10.0.1.31", &[&def_c], None);
    let names = Names {
        web_http_rule,
        web_group: web.clone(),
        mover: eps["a-plain"].clone(),
        mover_groups_after: vec![def_a.clone(), web.clone(), mgmt.clone()],
        reborn: eps["a-web"].clone(),
        reborn_groups: vec![db.clone()],
    };
    (st, eps, names)
}

// ---------------------------------------------------------------------------------------------
// Packets
// ---------------------------------------------------------------------------------------------

/// Ethernet from `src_mac` to the gateway around IPv4 (ID 0xbeef, DF; IHL 5 + `options`) around
/// `l4`.
fn ipv4_packet(
    src_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    options: &[u8],
    l4: &[u8],
) -> Vec<u8> {
    let ip = frames::ipv4_with(src.octets(), dst.octets(), proto, 0xbeef, true, l4);
    let ip = frames::with_ipv4_options(&ip, options);
    frames::ethernet(GW, src_mac, ETH_IPV4, &ip)
}

/// An IPv6 address for an IPv4 one (IPv4-mapped, RFC 4291 section 2.5.5.2): no endpoint's.
fn v6_of(ip: Ipv4Addr) -> [u8; 16] {
    ip.to_ipv6_mapped().octets()
}

/// The IPv6 address of the endpoint at `ip` in a dual-stack universe (fd00:a:: and the IPv4
/// address), or of the same place for an address that is no endpoint.
fn six(ip: Ipv4Addr) -> [u8; 16] {
    let mut a = [0u8; 16];
    a[0] = 0xfd;
    a[3] = 0x0a;
    a[12..].copy_from_slice(&ip.octets());
    a
}

/// The ICMPv6 type standing for an ICMP one in an IPv6 flow: echo request and reply, the
/// errors (unreachable, time exceeded, parameter problem; source quench as packet too big),
/// anything else as itself plus 100 (informational types, neighbour discovery among them).
fn icmp6_type(ty: u8) -> u8 {
    match ty {
        8 => 128,
        0 => 129,
        3 => 1,
        4 => 2,
        11 => 3,
        12 => 4,
        t => t.wrapping_add(100),
    }
}

/// A flow as the generator remembers it: who sent its first packet, to where.
#[derive(Clone, Debug)]
struct Flow {
    from: usize,
    /// Over IPv6: between `six` of the addresses (ICMP as ICMPv6).
    v6: bool,
    dst: Ipv4Addr,
    proto: u8,
    sport: u16,
    dport: u16,
}

/// An endpoint as the generator sees it: on this host (`host` is `None`, `ifindex` its
/// host-side veth) or placed on another host (`host` its underlay address).
#[derive(Clone, Debug)]
struct Ep {
    ifindex: u32,
    ip: Ipv4Addr,
    mac: [u8; 6],
    universe: String,
    vni: u32,
    identity: u16,
    host: Option<Ipv4Addr>,
}

/// Where a generated frame enters the dataplane.
#[derive(Clone, Copy, Debug)]
enum Hook {
    /// Sent by the workload behind this host-side ifindex: `from_endpoint`.
    Endpoint(u32),
    /// Received on the underlay: `from_underlay`.
    Underlay,
}

struct Gen {
    rng: StdRng,
    eps: Vec<Ep>,
    /// ifindex of a real device that is no endpoint.
    stranger: u32,
    flows: Vec<Flow>,
    /// Flows whose first packet created a conntrack entry (the run reports it): what related
    /// ICMP errors are mostly about.
    tracked: Vec<Flow>,
    /// The flow the last packet began, if it began one.
    last_new: Option<Flow>,
}

const INTERESTING_PORTS: [u16; 16] =
    [22, 53, 80, 150, 250, 350, 450, 1500, 5432, 5500, 8050, 0, 1, 1023, 65535, 443];

/// What a frame claims in the VXLAN-GBP header and where it comes from on the underlay.
struct Encap {
    outer_src: Ipv4Addr,
    outer_dst: Ipv4Addr,
    flags: u8,
    group: u16,
    vni: u32,
}

/// `frame` (an Ethernet frame as its workload sent it) as a host puts it on the underlay: outer
/// Ethernet, IPv4, UDP to 4789, VXLAN-GBP, inner Ethernet (from the gateway), the packet.
fn wrap(e: &Encap, frame: &[u8]) -> Vec<u8> {
    let inner = frames::ethernet(GW, GW, u16::from_be_bytes([frame[12], frame[13]]), &frame[14..]);
    let payload = [&frames::vxlan_gbp(e.flags, e.group, e.vni)[..], &inner].concat();
    let udp = frames::udp(50123, VXLAN_PORT, &payload);
    let ip = frames::ipv4(e.outer_src.octets(), e.outer_dst.octets(), 17, &udp);
    frames::ethernet([0x02, 0x55, 0, 0, 0, 1], [0x02, 0x55, 0, 0, 0, 2], ETH_IPV4, &ip)
}

impl Gen {
    fn ep_by_ip(&self, universe: &str, ip: Ipv4Addr) -> Option<usize> {
        self.eps.iter().position(|e| e.universe == universe && e.ip == ip)
    }

    fn locals(&self) -> Vec<usize> {
        (0..self.eps.len()).filter(|&i| self.eps[i].host.is_none()).collect()
    }

    fn dst_for(&mut self, from: usize) -> Ipv4Addr {
        let r = self.rng.random_range(0..10);
        if self.eps[from].host.is_some() && r < 8 {
            // What another host sends here is mostly for this host's endpoints.
            let locals = self.locals();
            self.eps[*locals.choose(&mut self.rng).expect("local eps")].ip
        } else if r < 7 {
            self.eps.choose(&mut self.rng).expect("endpoints").ip
        } else {
            let others = [
                Ipv4Addr::new(10, 0, 1, 99),
                Ipv4Addr::new(10, 0, 0, 1),
                Ipv4Addr::new(10, 0, 2, 131),
                Ipv4Addr::new(10, 9, 0, 1),
                Ipv4Addr::new(192, 168, 1, 1),
                Ipv4Addr::new(255, 255, 255, 255),
                self.eps[from].ip,
            ];
            *others.choose(&mut self.rng).expect("others")
        }
    }

    fn port(&mut self) -> u16 {
        if self.rng.random_bool(0.7) {
            *INTERESTING_PORTS.choose(&mut self.rng).expect("ports")
        } else {
            self.rng.random()
        }
    }

    /// TCP flags: mostly the usual ones, and every combination now and then (S7: only a SYN
    /// without ACK, RST or FIN opens a flow, and only in its own direction).
    fn tcp_flags(&mut self) -> u8 {
        match self.rng.random_range(0..14) {
            0..=4 => 0x02,          // SYN
            5 => 0x10,              // ACK
            6 => 0x11,              // FIN ACK
            7 => 0x04,              // RST
            8 => 0xc2,              // SYN with ECE and CWR (an ECN setup)
            9 | 10 => 0x12,         // SYN ACK
            _ => self.rng.random(), // anything
        }
    }

    /// The true encapsulation of what endpoint `i` (of another host) sends.
    fn encap_of(&self, i: usize) -> Encap {
        let e = &self.eps[i];
        Encap {
            outer_src: e.host.expect("a remote endpoint"),
            outer_dst: HERE,
            flags: 0x88,
            group: e.identity,
            vni: e.vni,
        }
    }

    /// Where the frame `sender` sends enters: its veth, or the underlay, wrapped by its host.
    fn emit(&self, sender: usize, frame: Vec<u8>) -> (Hook, Vec<u8>) {
        match self.eps[sender].host {
            None => (Hook::Endpoint(self.eps[sender].ifindex), frame),
            Some(_) => (Hook::Underlay, wrap(&self.encap_of(sender), &frame)),
        }
    }

    /// The frame of `flow`'s next packet as its sender sends it: the originator
    /// (`reply = false`) or the destination endpoint (`reply = true`, None if the destination
    /// is no endpoint). Returns the sender's index.
    fn packet(&mut self, flow: &Flow, reply: bool, flags: u8) -> Option<(usize, Vec<u8>)> {
        let orig = self.eps[flow.from].clone();
        let (sender, dst, sport, dport) = if reply {
            let i = self.ep_by_ip(&orig.universe, flow.dst)?;
            (i, orig.ip, flow.dport, flow.sport)
        } else {
            (flow.from, flow.dst, flow.sport, flow.dport)
        };
        let ep = self.eps[sender].clone();
        // Now and then a packet too big to wrap for a 1500-byte underlay.
        let len = if self.rng.random_bool(0.05) {
            self.rng.random_range(1380..1480)
        } else {
            self.rng.random_range(0..24)
        };
        let payload: Vec<u8> = (0..len).map(|_| self.rng.random()).collect();
        if flow.v6 {
            let (src, dst) = (six(ep.ip), six(dst));
            let (proto, l4) = match flow.proto {
                6 => (6, [frames::tcp(sport, dport, flags, 0), payload].concat()),
                17 => (17, frames::udp(sport, dport, &payload)),
                1 => {
                    let ty = if flow.dport == 0 {
                        if reply {
                            0
                        } else {
                            8
                        }
                    } else if reply {
                        *[8, 0, 14, (flow.dport >> 8) as u8].choose(&mut self.rng).expect("types")
                    } else {
                        (flow.dport >> 8) as u8
                    };
                    let rest = frames::echo_rest(flow.sport, 7);
                    (58, frames::icmpv6(src, dst, icmp6_type(ty), flow.dport as u8, rest, &payload))
                }
                p => (p, payload),
            };
            let p = frames::ipv6(src, dst, proto, &l4);
            return Some((sender, frames::ethernet(GW, ep.mac, ETH_IPV6, &p)));
        }
        let l4 = match flow.proto {
            6 => [frames::tcp(sport, dport, flags, 0), payload].concat(),
            17 => frames::udp(sport, dport, &payload),
            // Echo: the id is the flow's sport; a reply is type 0.
            1 if flow.dport == 0 => frames::icmp(
                if reply { 0 } else { 8 },
                0,
                frames::echo_rest(flow.sport, 7),
                &payload,
            ),
            // Another type first (an echo reply among them); back, a request, a reply, a
            // timestamp reply or the same type, with the same identifier.
            1 => {
                let (ty, code) = ((flow.dport >> 8) as u8, flow.dport as u8);
                let ty =
                    if reply { *[8, 0, 14, ty].choose(&mut self.rng).expect("types") } else { ty };
                frames::icmp(ty, code, frames::echo_rest(flow.sport, 7), &payload)
            }
            _ => payload,
        };
        Some((sender, ipv4_packet(ep.mac, ep.ip, dst, flow.proto, &[], &l4)))
    }

    /// [`Gen::packet`], entering where its sender's frames enter.
    fn flow_packet(&mut self, flow: &Flow, reply: bool, flags: u8) -> Option<(Hook, Vec<u8>)> {
        let (sender, f) = self.packet(flow, reply, flags)?;
        Some(self.emit(sender, f))
    }

    fn new_flow(&mut self) -> Flow {
        let from = self.rng.random_range(0..self.eps.len());
        let dst = self.dst_for(from);
        let (proto, sport, dport) = match self.rng.random_range(0..20) {
            0..=8 => (6, self.rng.random_range(1024..65535), self.port()),
            9..=12 => (17, self.rng.random_range(1024..65535), self.port()),
            // ICMP echo: sport = id, dport = 0.
            13..=14 => (1, self.rng.random(), 0),
            // ICMP of another type: dport carries type << 8 | code for flow_packet, sport the
            // identifier.
            15 => {
                let t = *[0u8, 13, 3, 11, 5, 17, 42].choose(&mut self.rng).expect("types");
                let id = if self.rng.random_bool(0.5) { 0 } else { self.rng.random() };
                (1, id, u16::from(t) << 8 | u16::from(self.rng.random_range(0..5u8)))
            }
            _ => (*[47u8, 132, 58, 0, 255, 89].choose(&mut self.rng).expect("protos"), 0, 0),
        };
        let v6 = self.rng.random_bool(0.3);
        Flow { from, v6, dst, proto, sport, dport }
    }

    /// One packet: what it is (for the report), where it enters and the frame.
    fn next(&mut self) -> (String, Hook, Vec<u8>) {
        self.last_new = None;
        let r = self.rng.random_range(0..100);
        if r < 30 || self.flows.is_empty() {
            let flow = self.new_flow();
            let flags = self.tcp_flags();
            let (h, f) = self.flow_packet(&flow, false, flags).expect("the originator exists");
            self.flows.push(flow.clone());
            self.last_new = Some(flow.clone());
            return (format!("new {flow:?} flags {flags:#x}"), h, f);
        }
        let flow = self.flows.choose(&mut self.rng).expect("flows").clone();
        if r < 55 {
            let flags = match self.rng.random_range(0..20) {
                0..=9 => 0x12,   // SYN ACK
                10..=12 => 0x02, // a SYN in the reply direction
                _ => self.tcp_flags(),
            };
            if let Some((h, f)) = self.flow_packet(&flow, true, flags) {
                return (format!("reply {flow:?} flags {flags:#x}"), h, f);
            }
        }
        if r < 70 {
            let flags = match self.rng.random_range(0..10) {
                0..=5 => 0x10, // ACK
                6 => 0x02,     // a SYN again (reopens a closing flow)
                _ => self.tcp_flags(),
            };
            let (h, f) = self.flow_packet(&flow, false, flags).expect("the originator exists");
            return (format!("again {flow:?} flags {flags:#x}"), h, f);
        }
        if r < 80 {
            let about = match self.tracked.choose(&mut self.rng) {
                Some(t) if self.rng.random_bool(0.7) => t.clone(),
                _ => flow,
            };
            return self.icmp_error(&about);
        }
        if r < 84 {
            return self.arp();
        }
        if r < 86 {
            return self.ipv6();
        }
        if r < 88 {
            return self.nd();
        }
        if r < 92 {
            return self.forged_encap(&flow);
        }
        self.malformed(&flow)
    }

    /// An ICMP error quoting `flow`'s packet, sent by its destination back to its source
    /// (related), or by someone else, or quoting a mangled header.
    fn icmp_error(&mut self, flow: &Flow) -> (String, Hook, Vec<u8>) {
        if flow.v6 {
            return self.icmp6_error(flow);
        }
        let (_, quoted) = self.packet(flow, false, 0x02).expect("the originator exists");
        let orig = self.eps[flow.from].clone();
        let mut quote = quoted[14..].to_vec();
        quote.truncate(28 + self.rng.random_range(0..8));
        // Mostly the types that quote a datagram, every code of them (errors or not), and now
        // and then any type at all.
        let ty = match self.rng.random_range(0..10) {
            0..=7 => *[3u8, 11, 12].choose(&mut self.rng).expect("types"),
            8 => *[0u8, 4, 5, 8, 13, 14].choose(&mut self.rng).expect("types"),
            _ => self.rng.random(),
        };
        // Codes at the edges of the error ranges (unreachable 0-15, time exceeded 0-1,
        // parameter problem 0-2) most of the time.
        let code = match self.rng.random_range(0..10) {
            0..=5 => *[0u8, 1, 2, 3, 4, 15, 16].choose(&mut self.rng).expect("codes"),
            6..=8 => self.rng.random_range(0..=20),
            _ => self.rng.random(),
        };
        // Half the time the usual case: the flow's peer about the flow, to its source.
        let variant = if self.rng.random_bool(0.5) { 0 } else { self.rng.random_range(1..6) };
        // The sender: the flow's destination if it is an endpoint (the usual case), else any.
        let mut sender = self
            .ep_by_ip(&orig.universe, flow.dst)
            .unwrap_or_else(|| self.rng.random_range(0..self.eps.len()));
        let mut to = orig.ip;
        match variant {
            0 => {}                                                    // about the flow, to its source
            1 => to = self.eps.choose(&mut self.rng).expect("eps").ip, // to someone else
            2 => quote.truncate(20 + self.rng.random_range(0..8)),     // quote too short
            3 => {
                // The quote of the reply direction, sent by the originator.
                quote[12..16].copy_from_slice(&flow.dst.octets());
                quote[16..20].copy_from_slice(&orig.ip.octets());
                if quote.len() >= 24 {
                    quote.swap(20, 22);
                    quote.swap(21, 23);
                }
                sender = flow.from;
                to = flow.dst;
            }
            4 => quote[0] = 0x46, // options claimed, ports then read 4 bytes later
            _ => sender = self.rng.random_range(0..self.eps.len()),
        }
        // Mostly the size of an error; a router's limit (576 bytes of IPv4) and one byte more;
        // longer.
        let total: usize = match self.rng.random_range(0..10) {
            0..=7 => 0,
            8 => *[576, 577].choose(&mut self.rng).expect("sizes"),
            _ => self.rng.random_range(578..1400),
        };
        quote.resize(quote.len().max(total.saturating_sub(28)), 0);
        let s = self.eps[sender].clone();
        let mut f =
            ipv4_packet(s.mac, s.ip, to, 1, &[], &frames::icmp(ty, code, [0, 0, 0, 7], &quote));
        if self.rng.random_bool(0.2) {
            // The quote continues in Ethernet padding beyond the datagram.
            let cut = 14 + 20 + 8 + 20 + self.rng.random_range(0..8);
            if cut < f.len() {
                let total = (cut - 14) as u16;
                f[16..18].copy_from_slice(&total.to_be_bytes());
            }
        }
        let (h, f) = self.emit(sender, f);
        let what =
            format!("icmp type {ty} code {code} variant {variant}, {total} bytes, about {flow:?}");
        (what, h, f)
    }

    /// An ICMPv6 error quoting `flow`'s packet (its IPv6 header and 8 bytes), sent by its
    /// destination back to its source (related), or by someone else, or quoting something else,
    /// of a size about RFC 4443's bound (1280 bytes of IPv6 packet).
    fn icmp6_error(&mut self, flow: &Flow) -> (String, Hook, Vec<u8>) {
        let (_, quoted) = self.packet(flow, false, 0x02).expect("the originator exists");
        let orig = self.eps[flow.from].clone();
        let mut quote = quoted[14..].to_vec();
        quote.truncate(48 + self.rng.random_range(0..8));
        let ty = match self.rng.random_range(0..10) {
            0..=7 => *[1u8, 2, 3, 4].choose(&mut self.rng).expect("types"),
            8 => *[128u8, 129, 5, 135, 100, 127].choose(&mut self.rng).expect("types"),
            _ => self.rng.random(),
        };
        let code = match self.rng.random_range(0..10) {
            0..=5 => *[0u8, 1, 2, 3, 6, 7].choose(&mut self.rng).expect("codes"),
            _ => self.rng.random_range(0..=20),
        };
        let variant = if self.rng.random_bool(0.5) { 0 } else { self.rng.random_range(1..6) };
        let mut sender = self
            .ep_by_ip(&orig.universe, flow.dst)
            .unwrap_or_else(|| self.rng.random_range(0..self.eps.len()));
        let mut to = six(orig.ip);
        match variant {
            0 => {}
            1 => to = six(self.eps.choose(&mut self.rng).expect("eps").ip),
            2 => quote.truncate(40 + self.rng.random_range(0..8)), // quote too short
            3 => quote[6] = NEXTHDR_DEST,                          // an extension header quoted
            4 => quote[0] = 0x40,                                  // not IPv6
            _ => sender = self.rng.random_range(0..self.eps.len()),
        }
        let total: usize = match self.rng.random_range(0..10) {
            0..=7 => 0,
            8 => *[1280, 1281].choose(&mut self.rng).expect("sizes"),
            _ => self.rng.random_range(1282..1450),
        };
        quote.resize(quote.len().max(total.saturating_sub(48)), 0);
        let s = self.eps[sender].clone();
        let src = six(s.ip);
        let m = frames::icmpv6(src, to, ty, code, [0, 0, 5, 0xdc], &quote);
        let f = frames::ethernet(GW, s.mac, ETH_IPV6, &frames::ipv6(src, to, 58, &m));
        let (h, f) = self.emit(sender, f);
        (format!("icmpv6 type {ty} code {code} variant {variant}, about {flow:?}"), h, f)
    }

    /// Neighbour discovery from a local endpoint: solicitations for a peer, the gateway, its
    /// own address or a multicast one, from its address, its link-local one, `::` or another's;
    /// advertisements, router messages, redirects; multicast listener discovery; hop limit 255
    /// or not, short or not.
    fn nd(&mut self) -> (String, Hook, Vec<u8>) {
        let locals = self.locals();
        let sender = *locals.choose(&mut self.rng).expect("local eps");
        let ep = self.eps[sender].clone();
        let own = six(ep.ip);
        let ll = dataplane_common::nd::link_local(ep.mac);
        let peer = six(self.eps.choose(&mut self.rng).expect("eps").ip);
        let mut mcast = [0u8; 16];
        mcast[0] = 0xff;
        mcast[1] = 0x02;
        mcast[15] = 1;
        let src = *[own, ll, [0; 16], peer, own, ll].choose(&mut self.rng).expect("sources");
        let target = *[peer, own, ll, mcast, [0; 16], peer, dataplane_common::nd::link_local(GW)]
            .choose(&mut self.rng)
            .expect("targets");
        // Neighbour discovery, then multicast listener discovery (query, reports, done).
        let types = [135u8, 135, 135, 136, 133, 134, 137, 143, 143, 131, 130, 132];
        let ty = *types.choose(&mut self.rng).expect("types");
        let code = if self.rng.random_bool(0.9) { 0 } else { 1 };
        let hop = if self.rng.random_bool(0.9) { 255 } else { 64 };
        let mut body = target.to_vec();
        if self.rng.random_bool(0.7) {
            body.extend_from_slice(&[1, 1]);
            body.extend_from_slice(&ep.mac);
        }
        let cut = if self.rng.random_bool(0.1) { self.rng.random_range(0..16) } else { 0 };
        body.truncate(body.len() - cut);
        let m = frames::icmpv6(src, peer, ty, code, [0; 4], &body);
        let p = frames::with_hop_limit(frames::ipv6(src, peer, 58, &m), hop);
        let (h, f) = self.emit(sender, frames::ethernet(GW, ep.mac, ETH_IPV6, &p));
        (format!("ND type {ty} code {code} hop {hop} cut {cut}"), h, f)
    }

    fn arp(&mut self) -> (String, Hook, Vec<u8>) {
        let locals = self.locals();
        let e = self.eps[*locals.choose(&mut self.rng).expect("local eps")].clone();
        let targets = [
            Ipv4Addr::new(10, 0, 0, 1),
            Ipv4Addr::new(10, 0, 1, 11),
            e.ip,
            Ipv4Addr::new(8, 8, 8, 8),
        ];
        let tpa = *targets.choose(&mut self.rng).expect("targets");
        let mut f = frames::arp_request(e.mac, e.ip.octets(), tpa.octets());
        let variant = self.rng.random_range(0..9);
        match variant {
            0 => {}
            1 => f[21] = 2,                          // a reply
            2 => f[15] = 6,                          // htype IEEE 802
            3 => f[17] = 0xdd,                       // ptype not IPv4
            4 => f[18] = 8,                          // hlen
            5 => f.truncate(14 + 27),                // truncated
            6 => f.resize(60, 0),                    // padded to the Ethernet minimum
            7 => f[28..32].copy_from_slice(&[0; 4]), // probe (RFC 5227) when tpa is own
            _ => f[22..28].copy_from_slice(&[0x02, 0x11, 0x22, 0x33, 0x44, 0x55]), // sha != src
        }
        (format!("arp variant {variant} tpa {tpa}"), Hook::Endpoint(e.ifindex), f)
    }

    /// An IPv6 packet from any endpoint (from its veth, or wrapped by its host): behind a chain
    /// of extension headers of every kind the walk knows, up to two beyond its bound, carrying
    /// TCP, UDP, ICMPv6 or another protocol, well formed or broken in one way (S11), between
    /// the endpoints' IPv6 addresses (judged through to delivery or wrapping) or IPv4-mapped
    /// ones (no endpoint's).
    fn ipv6(&mut self) -> (String, Hook, Vec<u8>) {
        let sender = self.rng.random_range(0..self.eps.len());
        let ep = self.eps[sender].clone();
        let n = self.rng.random_range(0..=EXT_MAX + 2);
        let mut exts = Vec::new();
        for i in 0..n {
            let kind = match self.rng.random_range(0..20) {
                0..=4 if i == 0 => NEXTHDR_HOP,
                0..=5 => NEXTHDR_DEST,
                6..=10 => NEXTHDR_ROUTING,
                11..=15 => NEXTHDR_AUTH,
                16 => NEXTHDR_FRAGMENT,
                17 => NEXTHDR_HOP,
                _ => NEXTHDR_DEST,
            };
            let len = match kind {
                NEXTHDR_FRAGMENT => 8,
                NEXTHDR_AUTH => 4 * self.rng.random_range(2..=10),
                _ => 8 * self.rng.random_range(1..=6),
            };
            exts.push((kind, len));
        }
        let payload: Vec<u8> =
            (0..self.rng.random_range(0..24)).map(|_| self.rng.random()).collect();
        let to = self.dst_for(sender);
        let (src, dst) = if self.rng.random_bool(0.5) {
            (six(ep.ip), six(to))
        } else {
            (v6_of(ep.ip), v6_of(to))
        };
        let (proto, l4) = match self.rng.random_range(0..10) {
            0..=2 => {
                (6, [frames::tcp(self.port(), self.port(), self.tcp_flags(), 0), payload].concat())
            }
            3..=4 => (17, frames::udp(self.port(), self.port(), &payload)),
            5..=6 => {
                let ty = *[128u8, 129, 1, 2, 3, 4, 133, 135, 136, 137]
                    .choose(&mut self.rng)
                    .expect("types");
                (
                    58,
                    frames::icmpv6(
                        src,
                        dst,
                        ty,
                        0,
                        frames::echo_rest(self.rng.random(), 1),
                        &payload,
                    ),
                )
            }
            7 => (1, payload),
            8 => (59, payload),
            _ => (self.rng.random(), payload),
        };
        let (next, rest) = frames::ipv6_extensions(&exts, proto, &l4);
        let mut p = frames::ipv6(src, dst, next, &rest);
        let set_len =
            |p: &mut Vec<u8>, l: usize| p[4..6].copy_from_slice(&(l as u16).to_be_bytes());
        let variant = self.rng.random_range(0..12);
        match variant {
            0 => p.truncate(self.rng.random_range(0..p.len())), // cut, payload length kept
            1 => {
                // Payload length past the frame.
                let l = p.len() - 40 + self.rng.random_range(1..40);
                set_len(&mut p, l);
            }
            2 => {
                // Payload length short of the frame: headers cut by it, the rest padding.
                let l = self.rng.random_range(0..=p.len() - 40);
                set_len(&mut p, l);
            }
            3 => {
                // A jumbogram, or what looks like one without its option.
                set_len(&mut p, 0);
                p[6] = NEXTHDR_HOP;
                if p.len() >= 44 && self.rng.random_bool(0.7) {
                    p[42..44].copy_from_slice(&[OPT_JUMBO, 4]);
                }
            }
            4 => p[0] = self.rng.random_range(0..16u8) << 4, // any version
            5 => p.extend_from_slice(&[0u8; 18]),            // Ethernet padding
            // A byte of the chain or the upper-layer header, changed.
            6 if p.len() > 40 => {
                let at = self.rng.random_range(40..p.len().min(40 + 96));
                p[at] = self.rng.random();
            }
            _ => {}
        }
        let (h, f) = self.emit(sender, frames::ethernet(GW, ep.mac, ETH_IPV6, &p));
        (format!("IPv6 variant {variant}, chain {exts:?}, protocol {proto}"), h, f)
    }

    /// A packet of `flow` as the underlay carries it, forged or broken in one way, or not
    /// Verse's at all (S10, S11).
    fn forged_encap(&mut self, flow: &Flow) -> (String, Hook, Vec<u8>) {
        let reply = self.rng.random_bool(0.5);
        let (sender, inner) = match self.packet(flow, reply, 0x02) {
            Some(p) => p,
            None => self.packet(flow, false, 0x02).expect("the originator exists"),
        };
        let mut e = match self.eps[sender].host {
            Some(_) => self.encap_of(sender),
            // A local endpoint's packet, claimed by another host.
            None => Encap {
                outer_src: OTHER_HOSTS[0].1,
                outer_dst: HERE,
                flags: 0x88,
                group: self.eps[sender].identity,
                vni: self.eps[sender].vni,
            },
        };
        let variant = self.rng.random_range(0..19);
        let mut cut = None;
        match variant {
            // Another identity than the sender's (S10): another endpoint's, or any number.
            17 | 18 => {
                let other = self.eps.choose(&mut self.rng).expect("eps").identity;
                e.group = if variant == 17 { other } else { self.rng.random() };
            }
            0 => e.outer_src = Ipv4Addr::new(198, 18, 0, 77), // no host
            1 => {
                // The other host of the fleet, or this one.
                let hosts = [OTHER_HOSTS[0].1, OTHER_HOSTS[1].1, HERE];
                e.outer_src = *hosts.choose(&mut self.rng).expect("hosts");
            }
            2 => e.vni = *[e.vni ^ 1, 999_999, 0].choose(&mut self.rng).expect("vnis"),
            3 => e.flags = *[0x08, 0x80, 0x89, 0x00, 0xff].choose(&mut self.rng).expect("flags"),
            4 => e.outer_dst = Ipv4Addr::new(198, 18, 0, 5), // another address of the underlay
            _ => {}
        }
        let mut f = wrap(&e, &inner);
        let set_total =
            |f: &mut Vec<u8>, t: usize| f[16..18].copy_from_slice(&(t as u16).to_be_bytes());
        match variant {
            5 => f[36..38].copy_from_slice(&4790u16.to_be_bytes()), // another UDP port
            6 => f[23] = 6,                                         // not UDP
            7 => f[21] = self.rng.random_range(1..=255),            // a non-first fragment
            8 => f[20] |= 0x20,                                     // a first fragment (MF)
            9 => {
                // Outer IPv4 options.
                f.splice(34..34, [1u8, 1, 1, 1]);
                f[14] = 0x46;
                let t = usize::from(u16::from_be_bytes([f[16], f[17]])) + 4;
                set_total(&mut f, t);
            }
            10 => {
                let l = self.rng.random_range(0..0xffffu16);
                f[38..40].copy_from_slice(&l.to_be_bytes()); // UDP length
            }
            11 => cut = Some(self.rng.random_range(34..f.len())), // truncated
            12 => {
                let t = *[0usize, 20, 49, 50, 51, f.len(), f.len() + 7]
                    .choose(&mut self.rng)
                    .expect("lengths");
                set_total(&mut f, t);
            }
            13 => {
                let t = *[0x86dd_u16, 0x0806, 0x8100].choose(&mut self.rng).expect("types");
                f[62..64].copy_from_slice(&t.to_be_bytes()); // inner ethertype
            }
            14 => f.extend_from_slice(&[0u8; 18]), // Ethernet padding after the datagram
            15 => {
                // The inner packet broken like a workload's.
                let (_, _, broken) = self.malformed(flow);
                if broken.len() >= 14 {
                    f = wrap(&e, &broken);
                }
            }
            16 => f[12..14].copy_from_slice(&[0x86, 0xdd]), // outer IPv6
            _ => {}
        }
        if let Some(c) = cut {
            f.truncate(c);
        }
        (format!("encapsulation variant {variant} of {flow:?} reply={reply}"), Hook::Underlay, f)
    }

    /// A valid packet of `flow` broken in one way.
    fn malformed(&mut self, flow: &Flow) -> (String, Hook, Vec<u8>) {
        let (sender, mut f) = self.packet(flow, false, 0x02).expect("the originator exists");
        let variant = self.rng.random_range(0..18);
        let mut stranger = false;
        let set_total =
            |f: &mut Vec<u8>, t: usize| f[16..18].copy_from_slice(&(t as u16).to_be_bytes());
        match variant {
            0 => {
                // Cut anywhere, total length left as it was.
                let cut = self.rng.random_range(14..f.len());
                f.truncate(cut);
            }
            1 => {
                // Cut at or after the IP header with the total length made consistent.
                let cut = self.rng.random_range(34.min(f.len())..=f.len());
                f.truncate(cut);
                set_total(&mut f, cut - 14);
            }
            2 => {
                // IPv4 options (NOPs), total length consistent.
                let words = self.rng.random_range(1..=10);
                let l4 = f[34..].to_vec();
                let (src, dst) = (
                    Ipv4Addr::new(f[26], f[27], f[28], f[29]),
                    Ipv4Addr::new(f[30], f[31], f[32], f[33]),
                );
                let mac: [u8; 6] = f[6..12].try_into().expect("mac");
                f = ipv4_packet(mac, src, dst, f[23], &vec![1u8; words * 4], &l4);
            }
            3 => f[20] |= 0x20,                          // MF
            4 => f[21] = self.rng.random_range(1..=255), // offset
            5 => f[20] |= 0x80,                          // reserved flag: not a fragment
            6 => {
                let t =
                    usize::from(u16::from_be_bytes([f[16], f[17]])) + self.rng.random_range(1..40);
                set_total(&mut f, t);
            }
            7 => set_total(&mut f, self.rng.random_range(0..20)),
            8 => {
                // Total length shorter than the L4 header (L4 in the padding).
                let t = 20 + self.rng.random_range(0..8);
                set_total(&mut f, t);
            }
            9 => f.extend_from_slice(&[0u8; 18]), // padding after the datagram
            10 => f[14] = 0x40 | self.rng.random_range(0..5), // IHL < 5
            11 => f[14] = (self.rng.random_range(0..16u8) << 4) | 5, // any version
            12 => {
                let t = [0x86dd_u16, 0x8100, 0x88cc, 0x0842, 0x0000, 0x05dc, 0x88a8, 0xffff];
                let e = *t.choose(&mut self.rng).expect("types");
                f[12..14].copy_from_slice(&e.to_be_bytes());
            }
            13 => f[6..12].copy_from_slice(&[0x02, 0xde, 0xad, 0xbe, 0xef, self.rng.random()]), // MAC
            14 => {
                // Source IP of another endpoint or none.
                let other = self.eps.choose(&mut self.rng).expect("eps").ip;
                let ip = if self.rng.random_bool(0.5) { other } else { Ipv4Addr::new(10, 0, 3, 3) };
                f[26..30].copy_from_slice(&ip.octets());
            }
            15 => stranger = true,
            16 => {
                // TCP data offset below 5 or beyond the segment.
                if f[23] == 6 && f.len() >= 54 {
                    f[46] = if self.rng.random_bool(0.5) { 0x40 } else { 0xf0 };
                }
            }
            _ => f.truncate(14), // Ethernet header only
        }
        let (h, f) =
            if stranger { (Hook::Endpoint(self.stranger), f) } else { self.emit(sender, f) };
        (format!("malformed variant {variant} of {flow:?}"), h, f)
    }
}

// ---------------------------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------------------------

fn hexdump(b: &[u8]) -> String {
    let mut s = String::new();
    for (i, chunk) in b.chunks(16).enumerate() {
        let _ = write!(s, "\n    {:04x}:", i * 16);
        for x in chunk {
            let _ = write!(s, " {x:02x}");
        }
    }
    s
}

/// What the kernel did, in the model's terms.
fn kernel_verdict(rc: u32, frame: &[u8], moved: &[(DropReason, u64)]) -> String {
    format!("rc {rc}, drops moved {moved:?}, frame {}", hexdump(frame))
}

/// Whether the kernel's result is the model's verdict. `input` is the frame the program ran on.
fn model_agrees(
    rc: u32,
    input: &[u8],
    frame: &[u8],
    moved: &[(DropReason, u64)],
    model: &Verdict,
) -> bool {
    match model {
        Verdict::Deliver { frame: want, .. } | Verdict::ArpReply { frame: want } => {
            rc == tc_act::REDIRECT && frame == want.as_slice() && moved.is_empty()
        }
        Verdict::Wrap { frame: want } => {
            // All but the outer UDP source port, a flow hash in the dynamic range.
            let sport = frame.get(34..36).map(|p| u16::from_be_bytes([p[0], p[1]]));
            rc == tc_act::REDIRECT
                && moved.is_empty()
                && frame.len() == want.len()
                && frame[..34] == want[..34]
                && frame[36..] == want[36..]
                && sport.is_some_and(|p| p >= 49152)
        }
        Verdict::FragNeeded { frame: want } => {
            rc == tc_act::REDIRECT
                && frame == want.as_slice()
                && moved == [(DropReason::FragNeeded, 1)]
        }
        Verdict::Pass => rc == tc_act::OK && frame == input && moved.is_empty(),
        Verdict::Drop(reason) => rc == tc_act::SHOT && moved == [(*reason, 1)],
    }
}

fn verdict_name(v: &Verdict) -> String {
    match v {
        Verdict::Drop(r) => format!("{r:?}"),
        Verdict::Deliver { .. } => "Deliver".into(),
        Verdict::ArpReply { .. } => "ArpReply".into(),
        Verdict::Wrap { .. } => "Wrap".into(),
        Verdict::FragNeeded { .. } => "FragNeeded".into(),
        Verdict::Pass => "Pass".into(),
    }
}

/// The errno at the bottom of an error chain, if any.
fn os_error(e: &(dyn std::error::Error + 'static)) -> Option<i32> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            return io.raw_os_error();
        }
        cur = err.source();
    }
    None
}

/// What is compared of an entry: state, endpoint serials (source, destination), owner slot and
/// side.
type CtFacts = (u8, u64, u64, u32, u8);

fn facts(e: &CtEntry) -> CtFacts {
    (e.state, e.src_serial, e.dst_serial, e.owner_slot, e.owner)
}

fn ct_label(k: &CtKey) -> String {
    format!(
        "vni {} {}:{} -> {}:{} proto {}",
        k.vni(),
        Ipv4Addr::from(k.src),
        k.sport,
        Ipv4Addr::from(k.dst),
        k.dport,
        k.proto()
    )
}

fn ct6_label(k: &Ct6Key) -> String {
    format!(
        "vni {} [{}]:{} -> [{}]:{} proto {}",
        k.vni,
        std::net::Ipv6Addr::from(k.src),
        k.sport,
        std::net::Ipv6Addr::from(k.dst),
        k.dport,
        k.proto
    )
}

struct Run {
    dp: Dataplane,
    /// The underlay device (`from_underlay`'s test runs arrive on it).
    underlay_ifindex: u32,
    ct: Conntrack,
    disagreements: BTreeMap<String, (usize, String)>,
    packets: usize,
    delivered: usize,
    /// Packets by the hook they entered, and underlay frames passed as not Verse's.
    through_underlay: usize,
    passed: usize,
    drops_seen: BTreeMap<DropReason, usize>,
    /// Frames the kernel's test run refused, by (ethertype, length).
    refused: BTreeMap<(u16, usize), usize>,
    /// Entries garbage collection removed (model side).
    collected: usize,
    /// IPv6 between hosts, as both sides agreed: wrapped for another host, unwrapped and
    /// delivered from one, answered "packet too big".
    v6_wrapped: usize,
    v6_unwrapped: usize,
    v6_too_big: usize,
}

impl Run {
    fn drops(&self) -> BTreeMap<DropReason, u64> {
        self.dp.drops().expect("read VERSE_DROPS")
    }

    /// Runs `frame` through the kernel and the model; true if the packet created or refreshed a
    /// conntrack entry (in the model, once both agreed).
    fn send(&mut self, host: &Host<'_>, what: &str, hook: Hook, frame: &[u8]) -> bool {
        let before = self.drops();
        let now = now_ns();
        let (ifindex, result) = match hook {
            Hook::Endpoint(i) => (i, self.dp.test_run(frame, i, 1)),
            Hook::Underlay => {
                (self.underlay_ifindex, self.dp.test_run_underlay(frame, self.underlay_ifindex))
            }
        };
        let out = match result {
            Ok(out) => out,
            // The kernel refuses some short frames before the program runs (EINVAL from
            // bpf_prog_test_run_skb); those cannot be compared, the unit tests of the model
            // cover them.
            Err(e) if os_error(&e) == Some(libc::EINVAL) => {
                let ethertype =
                    if frame.len() >= 14 { u16::from_be_bytes([frame[12], frame[13]]) } else { 0 };
                *self.refused.entry((ethertype, frame.len())).or_default() += 1;
                return false;
            }
            Err(e) => panic!(
                "BPF_PROG_TEST_RUN on {what} (ifindex {ifindex}, {} bytes): {e:?}",
                frame.len()
            ),
        };
        let after = self.drops();
        let moved: Vec<(DropReason, u64)> = after
            .iter()
            .filter(|&(r, n)| *n != before[r])
            .map(|(r, n)| (*r, n.wrapping_sub(before[r])))
            .collect();
        let outcome = match hook {
            Hook::Endpoint(i) => host.judge(&self.ct, now, i, frame),
            Hook::Underlay => host.judge_underlay(&self.ct, now, frame),
        };
        self.packets += 1;
        if let Hook::Underlay = hook {
            self.through_underlay += 1;
        }
        match &outcome.verdict {
            Verdict::Drop(r) => *self.drops_seen.entry(*r).or_default() += 1,
            Verdict::FragNeeded { .. } => {
                *self.drops_seen.entry(DropReason::FragNeeded).or_default() += 1
            }
            Verdict::Pass => self.passed += 1,
            _ => self.delivered += 1,
        }
        if model_agrees(out.return_code, frame, &out.packet, &moved, &outcome.verdict) {
            let inner_type = match hook {
                Hook::Endpoint(_) => frame.get(12..14),
                Hook::Underlay => frame.get(62..64),
            };
            if inner_type == Some(&[0x86, 0xdd][..]) {
                match (&outcome.verdict, hook) {
                    (Verdict::Wrap { .. }, _) => self.v6_wrapped += 1,
                    (Verdict::Deliver { .. }, Hook::Underlay) => self.v6_unwrapped += 1,
                    (Verdict::FragNeeded { .. }, _) => self.v6_too_big += 1,
                    _ => {}
                }
            }
            if let Some(u) = &outcome.ct {
                self.ct.apply(u);
            }
            if let Some(u) = &outcome.ct6 {
                self.ct.apply6(u);
            }
            return outcome.ct.is_some() || outcome.ct6.is_some();
        }
        let model = match &outcome.verdict {
            Verdict::Drop(r) => format!("drop {r:?}"),
            Verdict::Pass => "pass".into(),
            Verdict::Deliver { ifindex, frame } => {
                format!("deliver to {ifindex}, frame {}", hexdump(frame))
            }
            Verdict::ArpReply { frame } => format!("arp reply, frame {}", hexdump(frame)),
            Verdict::Wrap { frame } => format!("wrap, frame {}", hexdump(frame)),
            Verdict::FragNeeded { frame } => format!("frag needed, frame {}", hexdump(frame)),
        };
        let kind = format!(
            "{hook:?}: kernel rc {} {:?} vs model {}",
            out.return_code,
            moved.iter().map(|m| m.0).collect::<Vec<_>>(),
            verdict_name(&outcome.verdict)
        );
        let detail = format!(
            "{what}\n  ingress ifindex {ifindex}, packet {}\n  kernel: {}\n  model: {model}",
            hexdump(frame),
            kernel_verdict(out.return_code, &out.packet, &moved)
        );
        let e = self.disagreements.entry(kind).or_insert((0, detail));
        e.0 += 1;
        self.resync_ct();
        false
    }

    /// Garbage collection on both sides at `now`, with the endpoints of `state` alive: the
    /// controller's collector on the kernel's map, `Conntrack::collect` on the model's.
    fn collect(&mut self, state: &State, now: u64, timeouts: &Timeouts, at: &str) {
        let live: BTreeSet<u64> = state.endpoints.values().map(|e| e.serial).collect();
        let alive = |serial: u64| live.contains(&serial);
        let garbage = |e: &CtEntry| is_garbage(e, now, timeouts, &alive);
        let report = self.dp.collect_conntrack(&garbage, &mut |_| {}).expect("collect");
        let gone = self.ct.collect(now, timeouts, &alive);
        eprintln!(
            "dataplane_model: {at}: collected {} in the kernel, {gone} in the model",
            report.deleted
        );
        self.collected += gone;
        self.compare_ct(at);
    }

    /// After a disagreement, continue from the kernel's conntrack table.
    fn resync_ct(&mut self) {
        self.ct.entries = self.dp.conntrack().expect("read VERSE_CT").into_iter().collect();
        self.ct.entries6 = self.dp.conntrack6().expect("read VERSE_CT6").into_iter().collect();
    }

    /// Keys, states, endpoints and owners of both tables must match (the kernel's stamps are
    /// its own clock's), and every owner's budget counter the number of entries charged to it.
    fn compare_ct(&mut self, at: &str) {
        let kernel: BTreeMap<String, CtFacts> = self
            .dp
            .conntrack()
            .expect("read VERSE_CT")
            .into_iter()
            .map(|(k, e)| (ct_label(&k), facts(&e)))
            .chain(
                self.dp
                    .conntrack6()
                    .expect("read VERSE_CT6")
                    .into_iter()
                    .map(|(k, e)| (ct6_label(&k), facts(&e))),
            )
            .collect();
        let model: BTreeMap<String, CtFacts> = self
            .ct
            .entries
            .iter()
            .map(|(k, e)| (ct_label(k), facts(e)))
            .chain(self.ct.entries6.iter().map(|(k, e)| (ct6_label(k), facts(e))))
            .collect();
        for (slot, owner) in self.dp.ct_owners() {
            let charged = self.ct.used(slot);
            if owner.used != charged {
                let kind = "budget counter differs from the entries charged".to_string();
                let detail =
                    format!("{at}: slot {slot}: kernel used {}, model {charged}", owner.used);
                self.disagreements.entry(kind).or_insert((0, detail)).0 += 1;
            }
        }
        if kernel != model {
            let ks: BTreeSet<_> = kernel.iter().collect();
            let ms: BTreeSet<_> = model.iter().collect();
            let only_k: Vec<_> = ks.difference(&ms).take(5).collect();
            let only_m: Vec<_> = ms.difference(&ks).take(5).collect();
            let kind = "conntrack tables differ".to_string();
            let detail = format!("{at}: only in kernel {only_k:#?}\n only in model {only_m:#?}");
            self.disagreements.entry(kind).or_insert((0, detail)).0 += 1;
            self.resync_ct();
        }
    }
}

#[test]
fn kernel_program_agrees_with_the_reference_model_on_generated_packets() {
    let seed: u64 =
        std::env::var("VERSE_MODEL_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x5eed_2026);
    let per_phase: usize =
        std::env::var("VERSE_MODEL_PACKETS").ok().and_then(|s| s.parse().ok()).unwrap_or(2000);
    eprintln!("dataplane_model: seed {seed} (VERSE_MODEL_SEED), {per_phase} packets per phase");

    let ns = Netns::new("dm");
    // IPv6 the kernel sent from the
    // underlay veths would count as drops of from_underlay, which the comparison counts.
    ns.disable_ipv6();
    let tmp = TempDir::new("dm");
    let bpffs = Bpffs::mount(&tmp.path().join("bpf"));
    let (mut state, eps, names) = build_state();

    // One veth per local endpoint (its ifindex is the endpoint's host-side ifindex), one that is
    // no endpoint, and the underlay. (veth rather than dummy: the dummy module may be missing.)
    let shorts: Vec<&'static str> =
        eps.iter().filter(|(_, id)| state.endpoints[*id].host == HOST).map(|(s, _)| *s).collect();
    for i in 0..=shorts.len() {
        ns.ip(&["link", "add", &format!("d{i}"), "type", "veth", "peer", "name", &format!("p{i}")]);
    }
    ns.ip(&["link", "add", "u0", "type", "veth", "peer", "name", "u1"]);
    for dev in ["u0", "u1"] {
        ns.ip(&["link", "set", dev, "up"]);
    }
    ns.ip(&["link", "set", "u0", "mtu", &UNDERLAY_MTU.to_string()]);
    ns.ip(&["addr", "add", &format!("{HERE}/24"), "dev", "u0"]);
    let report = ns.enter(|| {
        let index = |name: &str| {
            let c = std::ffi::CString::new(name).expect("name");
            // SAFETY: `c` is NUL-terminated and outlives the call.
            let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
            assert!(i > 1, "if_nametoindex({name})");
            i
        };
        let ifindex_of: BTreeMap<String, u32> = shorts
            .iter()
            .enumerate()
            .map(|(i, s)| (eps[s].clone(), index(&format!("d{i}"))))
            .collect();
        let stranger = index(&format!("d{}", shorts.len()));
        let underlay_ifindex = index("u0");
        let underlay = Underlay { ip: HERE, mtu: UNDERLAY_MTU };
        let config_with = |timeouts: &Timeouts| Config {
            timeouts_ns: timeouts.ns,
            gateway_mac: GW,
            underlay_ifindex,
            underlay_ip: HERE.octets(),
            underlay_mtu: UNDERLAY_MTU,
            ..Config::default()
        };

        let timeouts = Timeouts::default();
        let dp =
            Dataplane::load(bpffs.path(), &config_with(&timeouts)).expect("load the dataplane");
        let mut run = Run {
            dp,
            underlay_ifindex,
            ct: Conntrack::default(),
            disagreements: BTreeMap::new(),
            packets: 0,
            delivered: 0,
            through_underlay: 0,
            passed: 0,
            drops_seen: BTreeMap::new(),
            refused: BTreeMap::new(),
            collected: 0,
            v6_wrapped: 0,
            v6_unwrapped: 0,
            v6_too_big: 0,
        };
        let mut ids = Ids::default();
        let mut ifindex_of = ifindex_of;
        let mut applied = MapContents::default();
        let mut program = |run: &mut Run,
                           state: &State,
                           applied: &mut MapContents,
                           ifindex_of: &BTreeMap<String, u32>| {
            let lookup = |ep: &verse::model::Endpoint| ifindex_of.get(&ep.id).copied();
            let desired = compile(state, HOST, &lookup, &mut ids).expect("compile");
            run.dp.apply(applied, &desired).expect("apply");
            *applied = desired;
        };
        program(&mut run, &state, &mut applied, &ifindex_of);

        let gen_eps = |state: &State, ifindex_of: &BTreeMap<String, u32>| -> Vec<Ep> {
            state
                .endpoints
                .values()
                .map(|e| Ep {
                    ifindex: ifindex_of.get(&e.id).copied().unwrap_or(0),
                    ip: e.ip,
                    mac: verse::model::parse_mac(&e.mac).expect("endpoint mac"),
                    universe: e.universe.clone(),
                    vni: state.universes[&e.universe].vni,
                    identity: u16::try_from(e.identity).expect("identities fit 16 bits"),
                    host: OTHER_HOSTS.iter().find(|(n, _)| *n == e.host).map(|(_, ip)| *ip),
                })
                .collect()
        };
        let mut gen = Gen {
            rng: StdRng::seed_from_u64(seed),
            eps: gen_eps(&state, &ifindex_of),
            stranger,
            flows: Vec::new(),
            tracked: Vec::new(),
            last_new: None,
        };

        let phases = [
            "initial state",
            "after revoking web's tcp/80 rule (S8)",
            "after a membership change (S5)",
            "after a-web is deleted and made again at its address in db's group (S7)",
            "after garbage collection of the deleted endpoint's flows",
        ];
        for (p, phase) in phases.iter().enumerate() {
            match p {
                1 => {
                    state.delete_rule(&names.web_group, &names.web_http_rule).expect("revoke rule");
                    program(&mut run, &state, &mut applied, &ifindex_of);
                }
                2 => {
                    state
                        .patch_endpoint(
                            &names.mover,
                            PatchEndpoint::groups(names.mover_groups_after.clone()),
                        )
                        .expect("patch endpoint");
                    program(&mut run, &state, &mut applied, &ifindex_of);
                }
                3 => {
                    // Deleted and made again on the same interface: the flows of the old one
                    // are still in both tables (no collection yet); only the binding to serials
                    // keeps the new one from matching them.
                    let old = state.delete_endpoint(&names.reborn).expect("delete endpoint");
                    let again = CreateEndpoint {
                        conntrack_budget: Some(SMALL_BUDGET),
                        ..CreateEndpoint::again(&old, names.reborn_groups.clone())
                    };
                    let new = state.create_endpoint(again, HOST).expect("make the endpoint again");
                    assert_ne!(new.serial, old.serial);
                    let ifindex = ifindex_of.remove(&old.id).expect("reborn ifindex");
                    ifindex_of.insert(new.id.clone(), ifindex);
                    program(&mut run, &state, &mut applied, &ifindex_of);
                }
                4 => run.collect(&state, now_ns(), &timeouts, "garbage collection"),
                _ => {}
            }
            gen.eps = gen_eps(&state, &ifindex_of);
            let local: BTreeMap<u32, String> =
                ifindex_of.iter().map(|(id, i)| (*i, id.clone())).collect();
            let host = Host::new(&state, HOST, &local, GW, timeouts).with_underlay(underlay);
            for n in 0..per_phase {
                let (what, hook, frame) = gen.next();
                if run.send(&host, &format!("[{phase}, packet {n}] {what}"), hook, &frame) {
                    gen.tracked.extend(gen.last_new.take());
                }
                if n % 500 == 499 {
                    run.compare_ct(&format!("{phase}, packet {n}"));
                }
            }
            run.compare_ct(&format!("end of {phase}"));
        }

        // A host without an underlay: what its workloads send to endpoints of other hosts (new
        // flows and live ones alike) is dropped as `NoUnderlay` by the kernel and the model
        // both. Only `from_endpoint`: such a host receives nothing wrapped.
        let no_underlay = Config {
            underlay_ifindex: 0,
            underlay_ip: [0; 4],
            underlay_mtu: 0,
            ..config_with(&timeouts)
        };
        run.dp = Dataplane::load(bpffs.path(), &no_underlay).expect("reload without an underlay");
        let local: BTreeMap<u32, String> =
            ifindex_of.iter().map(|(id, i)| (*i, id.clone())).collect();
        let host = Host::new(&state, HOST, &local, GW, timeouts);
        for n in 0..per_phase {
            let (what, hook, frame) = gen.next();
            if let Hook::Underlay = hook {
                gen.last_new = None;
                continue;
            }
            if run.send(&host, &format!("[no underlay, packet {n}] {what}"), hook, &frame) {
                gen.tracked.extend(gen.last_new.take());
            }
        }
        run.compare_ct("end of the phase without an underlay");

        // Idle timeouts (S9): reload with short timeouts over the same pinned maps, let the
        // flows expire, and send their packets again.
        let mut short = Timeouts::default();
        for t in &mut short.ns {
            *t = 300_000_000;
        }
        short.ns[ct_state::TCP_ESTABLISHED as usize] = 3_600_000_000_000;
        run.dp = Dataplane::load(bpffs.path(), &config_with(&short))
            .expect("reload with short timeouts");
        std::thread::sleep(std::time::Duration::from_millis(700));
        let local: BTreeMap<u32, String> =
            ifindex_of.iter().map(|(id, i)| (*i, id.clone())).collect();
        let host = Host::new(&state, HOST, &local, GW, short).with_underlay(underlay);
        let flows = gen.flows.clone();
        for (n, flow) in flows.iter().enumerate().take(per_phase) {
            let reply = n % 2 == 1;
            if let Some((hook, frame)) = gen.flow_packet(flow, reply, 0x10) {
                let what = format!("[expiry, packet {n}] reply={reply} {flow:?}");
                run.send(&host, &what, hook, &frame);
            }
        }
        run.compare_ct("end of expiry phase");
        // Everything has expired but established TCP: collected on both sides, and every
        // budget given back exactly.
        run.collect(&state, now_ns(), &short, "collection after expiry");
        assert!(run.collected > 0, "garbage collection removed nothing");

        let mut out = format!(
            "{} packets ({} through the underlay, {} of them passed as not Verse's): {} \
             delivered, wrapped or answered, drops by reason {:?}\n\
             refused by the kernel's test run, by (ethertype, length): {:?}\n\
             entries collected: {}\n\
             IPv6 between hosts: {} wrapped, {} unwrapped and delivered, {} packet too big\n",
            run.packets,
            run.through_underlay,
            run.passed,
            run.delivered,
            run.drops_seen,
            run.refused,
            run.collected,
            run.v6_wrapped,
            run.v6_unwrapped,
            run.v6_too_big
        );
        for (kind, (count, example)) in &run.disagreements {
            let _ = write!(out, "\n=== {count} x {kind}; first:\n{example}\n");
        }
        let v6 = (run.v6_wrapped, run.v6_unwrapped, run.v6_too_big);
        (run.disagreements.is_empty(), out, run.delivered, run.drops_seen.clone(), v6)
    });
    let (ok, text, delivered, reasons, (v6_wrapped, v6_unwrapped, v6_too_big)) = report;
    eprintln!("{text}");
    assert!(ok, "kernel and model disagree (seed {seed}):\n{text}");
    // The generator must have exercised both outcomes broadly, or agreement proves little.
    assert!(delivered > per_phase / 10, "too few packets delivered: {delivered}");
    assert!(reasons.len() >= 16, "too few drop reasons exercised: {reasons:?}");
    assert!(
        v6_wrapped > 0 && v6_unwrapped > 0 && v6_too_big > 0,
        "IPv6 between hosts not exercised both ways: {v6_wrapped} wrapped, {v6_unwrapped} \
         unwrapped, {v6_too_big} packet too big"
    );
    for r in [
        DropReason::MalformedIpv6,
        DropReason::Ipv6Fragment,
        DropReason::Ipv6TooManyHeaders,
        DropReason::Ipv6Jumbogram,
        DropReason::NdUnanswered,
        DropReason::NdSpoofed,
        DropReason::SpoofedIp,
        DropReason::UnknownHost,
        DropReason::UnknownUniverse,
        DropReason::NotPlacedOnSender,
        DropReason::IdentityMismatch,
        DropReason::FragNeeded,
        DropReason::ConntrackBudgetExceeded,
        DropReason::NoUnderlay,
    ] {
        assert!(reasons.contains_key(&r), "{r:?} never exercised: {reasons:?}");
    }
}
