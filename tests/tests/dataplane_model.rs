//! Differential test: the kernel program `from_endpoint`, run through `BPF_PROG_TEST_RUN`, against
//! the reference model `verse::verdict`, packet by packet.
//!
//! The state has two universes with the same CIDR, groups referencing groups, nested CIDR rules
//! (/8, /16, /24, /32 and a group peer all matching one address), port ranges, ICMP type/code
//! rules, protocol numbers and `all` rules; it is compiled with `verse::compile::compile` and
//! written to the maps. Endpoints are bound to veth devices of a private network namespace
//! (the kernel resolves the test run's ifindex there). A seeded generator then sends thousands of
//! packets — valid flows, replies, continuations, ICMP errors quoting tracked and untracked flows,
//! ARP variants, spoofed sources, and malformed frames cut at every header boundary — to both, in
//! the same order, so that conntrack evolves the same way on both sides. Mid-run a rule is
//! revoked (S8) and an endpoint changes groups (S5). Compared for every packet: the return code,
//! the output frame, and which `VERSE_DROPS` counter moved; every few hundred packets and at the
//! end, the conntrack tables (keys and states). The deliveries the kernel caches in its entries
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

use dataplane_common::{ct_state, Config, CtKey, DropReason};
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use serde_json::json;
use tests::{Bpffs, Netns, TempDir};
use verse::compile::{compile, CidrIds, Desired};
use verse::dataplane::{tc_act, Dataplane};
use verse::model::{CreateEndpoint, CreateGroup, CreateRule, CreateUniverse, PatchEndpoint, State};
use verse::verdict::{Conntrack, Host, Timeouts, Verdict};

const HOST: &str = "h1";
const GW: [u8; 6] = [0x02, 0xfe, 0, 0, 0, 0x01];

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
}

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

/// Two universes on 10.0.0.0/16; in `a`: default, web, db, mgmt, ops; in `b`: default, web.
/// Returns the state, the endpoint ids by short name, and the ids the phases edit.
fn build_state() -> (State, BTreeMap<&'static str, String>, Names) {
    let mut st = State::default();
    let uni = |st: &mut State, name: &str| {
        st.create_universe(CreateUniverse {
            name: name.into(),
            cidr: Some("10.0.0.0/16".into()),
            cidrs: None,
        })
        .expect("create universe")
        .id
    };
    let a = uni(&mut st, "a");
    let b = uni(&mut st, "b");
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
    let (def_a, def_b) = (default_of(&st, &a), default_of(&st, &b));
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
        json!({"type": -1, "code": -1, "cidr": "0.0.0.0/0"}),
    );
    rule(&mut st, &mgmt, "ingress", json!("all"), json!({"cidr": "10.0.1.11/32"}));
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

    let mut eps = BTreeMap::new();
    let mut ep = |st: &mut State, short: &'static str, u: &str, ip: &str, groups: &[&String]| {
        let e = st
            .create_endpoint(
                CreateEndpoint {
                    universe: u.into(),
                    host: None,
                    netns: format!("ns-{short}"),
                    ip: ip.into(),
                    security_groups: Some(groups.iter().map(|g| g.to_string()).collect()),
                },
                HOST,
            )
            .unwrap_or_else(|e| panic!("create endpoint {short}: {e}"));
        eps.insert(short, e.id);
    };
    ep(&mut st, "a-web", &a, "10.0.1.10", &[&def_a, &web]);
    ep(&mut st, "a-db", &a, "10.0.1.11", &[&db]);
    ep(&mut st, "a-mgmt", &a, "10.0.1.12", &[&mgmt, &def_a]);
    ep(&mut st, "a-webdb", &a, "10.0.2.5", &[&web, &db]);
    ep(&mut st, "a-ops", &a, "10.0.2.200", &[&ops]);
    ep(&mut st, "a-plain", &a, "10.0.0.7", &[&def_a]);
    ep(&mut st, "b-def", &b, "10.0.1.10", &[&def_b]);
    ep(&mut st, "b-web", &b, "10.0.1.12", &[&def_b, &web_b]);
    let names = Names {
        web_http_rule,
        web_group: web.clone(),
        mover: eps["a-plain"].clone(),
        mover_groups_after: vec![def_a.clone(), web.clone(), mgmt.clone()],
    };
    (st, eps, names)
}

// ---------------------------------------------------------------------------------------------
// Packets
// ---------------------------------------------------------------------------------------------

fn eth(dst: [u8; 6], src: [u8; 6], ethertype: u16) -> Vec<u8> {
    let mut f = Vec::with_capacity(64);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f
}

/// IPv4 (IHL 5 + `options`, DF set; checksum 0: nobody verifies it) around `l4`.
fn ipv4_packet(
    src_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    options: &[u8],
    l4: &[u8],
) -> Vec<u8> {
    assert!(options.len().is_multiple_of(4) && options.len() <= 40);
    let mut f = eth(GW, src_mac, 0x0800);
    let ihl = 5 + options.len() / 4;
    let total = (ihl * 4 + l4.len()) as u16;
    f.push(0x40 | ihl as u8);
    f.push(0);
    f.extend_from_slice(&total.to_be_bytes());
    f.extend_from_slice(&[0xbe, 0xef, 0x40, 0x00, 64, proto, 0, 0]);
    f.extend_from_slice(&src.octets());
    f.extend_from_slice(&dst.octets());
    f.extend_from_slice(options);
    f.extend_from_slice(l4);
    f
}

fn tcp_hdr(sport: u16, dport: u16, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut t = Vec::new();
    t.extend_from_slice(&sport.to_be_bytes());
    t.extend_from_slice(&dport.to_be_bytes());
    t.extend_from_slice(&[0, 0, 1, 0, 0, 0, 0, 0, 0x50, flags, 0x72, 0x10, 0, 0, 0, 0]);
    t.extend_from_slice(payload);
    t
}

fn icmp_hdr(ty: u8, code: u8, id: u16, payload: &[u8]) -> Vec<u8> {
    let mut i = vec![ty, code, 0, 0];
    i.extend_from_slice(&id.to_be_bytes());
    i.extend_from_slice(&[0, 7]);
    i.extend_from_slice(payload);
    i
}

fn arp_packet(eth_src: [u8; 6], sha: [u8; 6], spa: Ipv4Addr, tpa: Ipv4Addr, oper: u16) -> Vec<u8> {
    let mut f = eth([0xff; 6], eth_src, 0x0806);
    f.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4]);
    f.extend_from_slice(&oper.to_be_bytes());
    f.extend_from_slice(&sha);
    f.extend_from_slice(&spa.octets());
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&tpa.octets());
    f
}

/// A flow as the generator remembers it: who sent its first packet, to where.
#[derive(Clone, Debug)]
struct Flow {
    from: usize,
    dst: Ipv4Addr,
    proto: u8,
    sport: u16,
    dport: u16,
}

/// A local endpoint as the generator sees it.
#[derive(Clone, Debug)]
struct Ep {
    ifindex: u32,
    ip: Ipv4Addr,
    mac: [u8; 6],
    universe: String,
}

struct Gen {
    rng: StdRng,
    eps: Vec<Ep>,
    /// ifindex of a real device that is no endpoint.
    stranger: u32,
    flows: Vec<Flow>,
}

const INTERESTING_PORTS: [u16; 16] =
    [22, 53, 80, 150, 250, 350, 450, 1500, 5432, 5500, 8050, 0, 1, 1023, 65535, 443];

impl Gen {
    fn ep_by_ip(&self, universe: &str, ip: Ipv4Addr) -> Option<usize> {
        self.eps.iter().position(|e| e.universe == universe && e.ip == ip)
    }

    fn dst_for(&mut self, from: usize) -> Ipv4Addr {
        let r = self.rng.random_range(0..10);
        if r < 7 {
            self.eps.choose(&mut self.rng).expect("endpoints").ip
        } else {
            let others = [
                Ipv4Addr::new(10, 0, 1, 99),
                Ipv4Addr::new(10, 0, 0, 1),
                Ipv4Addr::new(10, 0, 2, 130),
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

    fn tcp_flags(&mut self) -> u8 {
        match self.rng.random_range(0..10) {
            0..=5 => 0x02,          // SYN
            6 => 0x10,              // ACK
            7 => 0x11,              // FIN ACK
            8 => 0x04,              // RST
            _ => self.rng.random(), // anything
        }
    }

    /// The frame of `flow`'s next packet, sent by its originator (`reply = false`) or by the
    /// destination endpoint (`reply = true`, None if the destination is no local endpoint).
    fn flow_packet(&mut self, flow: &Flow, reply: bool, flags: u8) -> Option<(u32, Vec<u8>)> {
        let orig = self.eps[flow.from].clone();
        let (ep, dst, sport, dport) = if reply {
            let i = self.ep_by_ip(&orig.universe, flow.dst)?;
            (self.eps[i].clone(), orig.ip, flow.dport, flow.sport)
        } else {
            (orig, flow.dst, flow.sport, flow.dport)
        };
        let payload: Vec<u8> =
            (0..self.rng.random_range(0..24)).map(|_| self.rng.random()).collect();
        let l4 = match flow.proto {
            6 => tcp_hdr(sport, dport, flags, &payload),
            17 => tests::frames::udp(sport, dport, &payload),
            // Echo: the id is the flow's sport; a reply is type 0.
            1 if flow.dport == 0 || reply => {
                let id = flow.sport;
                icmp_hdr(if reply { 0 } else { 8 }, 0, id, &payload)
            }
            1 => icmp_hdr((flow.dport >> 8) as u8, flow.dport as u8, 0, &payload),
            _ => payload,
        };
        Some((ep.ifindex, ipv4_packet(ep.mac, ep.ip, dst, flow.proto, &[], &l4)))
    }

    fn new_flow(&mut self) -> Flow {
        let from = self.rng.random_range(0..self.eps.len());
        let dst = self.dst_for(from);
        let (proto, sport, dport) = match self.rng.random_range(0..20) {
            0..=8 => (6, self.rng.random_range(1024..65535), self.port()),
            9..=12 => (17, self.rng.random_range(1024..65535), self.port()),
            // ICMP echo: sport = id, dport = 0.
            13..=14 => (1, self.rng.random(), 0),
            // ICMP non-echo: dport carries type << 8 | code for flow_packet.
            15 => {
                let t = *[13u8, 3, 11, 5, 17, 42].choose(&mut self.rng).expect("types");
                (1, 0, u16::from(t) << 8 | u16::from(self.rng.random_range(0..5u8)))
            }
            _ => (*[47u8, 132, 58, 0, 255, 89].choose(&mut self.rng).expect("protos"), 0, 0),
        };
        Flow { from, dst, proto, sport, dport }
    }

    /// One packet: what it is (for the report), the ingress ifindex and the frame.
    fn next(&mut self) -> (String, u32, Vec<u8>) {
        let r = self.rng.random_range(0..100);
        if r < 30 || self.flows.is_empty() {
            let flow = self.new_flow();
            let flags = self.tcp_flags();
            let (i, f) = self.flow_packet(&flow, false, flags).expect("originator is local");
            self.flows.push(flow.clone());
            return (format!("new {flow:?} flags {flags:#x}"), i, f);
        }
        let flow = self.flows.choose(&mut self.rng).expect("flows").clone();
        if r < 55 {
            let flags = if self.rng.random_bool(0.7) { 0x12 } else { self.tcp_flags() };
            if let Some((i, f)) = self.flow_packet(&flow, true, flags) {
                return (format!("reply {flow:?} flags {flags:#x}"), i, f);
            }
        }
        if r < 70 {
            let flags = if self.rng.random_bool(0.7) { 0x10 } else { self.tcp_flags() };
            let (i, f) = self.flow_packet(&flow, false, flags).expect("originator is local");
            return (format!("again {flow:?} flags {flags:#x}"), i, f);
        }
        if r < 80 {
            return self.icmp_error(&flow);
        }
        if r < 86 {
            return self.arp();
        }
        self.malformed(&flow)
    }

    /// An ICMP error quoting `flow`'s packet, sent by its destination back to its source
    /// (related), or by someone else, or quoting a mangled header.
    fn icmp_error(&mut self, flow: &Flow) -> (String, u32, Vec<u8>) {
        let (_, quoted) = self.flow_packet(flow, false, 0x02).expect("originator is local");
        let orig = self.eps[flow.from].clone();
        let mut quote = quoted[14..].to_vec();
        quote.truncate(28 + self.rng.random_range(0..8));
        let ty = *[3u8, 11, 12].choose(&mut self.rng).expect("types");
        let variant = self.rng.random_range(0..6);
        // The sender: the flow's destination if local (the usual case), else any endpoint.
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
        let s = self.eps[sender].clone();
        let code = self.rng.random_range(0..5);
        let mut f = ipv4_packet(s.mac, s.ip, to, 1, &[], &icmp_hdr(ty, code, 0, &quote));
        if self.rng.random_bool(0.2) {
            // The quote continues in Ethernet padding beyond the datagram.
            let cut = 14 + 20 + 8 + 20 + self.rng.random_range(0..8);
            if cut < f.len() {
                let total = (cut - 14) as u16;
                f[16..18].copy_from_slice(&total.to_be_bytes());
            }
        }
        (format!("icmp error type {ty} variant {variant} about {flow:?}"), s.ifindex, f)
    }

    fn arp(&mut self) -> (String, u32, Vec<u8>) {
        let e = self.eps.choose(&mut self.rng).expect("eps").clone();
        let targets = [
            Ipv4Addr::new(10, 0, 0, 1),
            Ipv4Addr::new(10, 0, 1, 11),
            e.ip,
            Ipv4Addr::new(8, 8, 8, 8),
        ];
        let tpa = *targets.choose(&mut self.rng).expect("targets");
        let mut f = arp_packet(e.mac, e.mac, e.ip, tpa, 1);
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
        (format!("arp variant {variant} tpa {tpa}"), e.ifindex, f)
    }

    /// A valid packet of `flow` broken in one way.
    fn malformed(&mut self, flow: &Flow) -> (String, u32, Vec<u8>) {
        let (mut ifindex, mut f) =
            self.flow_packet(flow, false, 0x02).expect("originator is local");
        let variant = self.rng.random_range(0..18);
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
            15 => ifindex = self.stranger,
            16 => {
                // TCP data offset below 5 or beyond the segment.
                if f[23] == 6 && f.len() >= 54 {
                    f[46] = if self.rng.random_bool(0.5) { 0x40 } else { 0xf0 };
                }
            }
            _ => f.truncate(14), // Ethernet header only
        }
        (format!("malformed variant {variant} of {flow:?}"), ifindex, f)
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

fn model_agrees(rc: u32, frame: &[u8], moved: &[(DropReason, u64)], model: &Verdict) -> bool {
    match model {
        Verdict::Deliver { frame: want, .. } | Verdict::ArpReply { frame: want } => {
            rc == tc_act::REDIRECT && frame == want.as_slice() && moved.is_empty()
        }
        Verdict::Drop(reason) => rc == tc_act::SHOT && moved == [(*reason, 1)],
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

fn ct_label(k: &CtKey) -> String {
    format!(
        "vni {} {}:{} -> {}:{} proto {}",
        k.vni,
        Ipv4Addr::from(k.src),
        k.sport,
        Ipv4Addr::from(k.dst),
        k.dport,
        k.proto
    )
}

struct Run {
    dp: Dataplane,
    ct: Conntrack,
    disagreements: BTreeMap<String, (usize, String)>,
    packets: usize,
    delivered: usize,
    drops_seen: BTreeMap<DropReason, usize>,
    /// Frames the kernel's test run refused, by (ethertype, length).
    refused: BTreeMap<(u16, usize), usize>,
}

impl Run {
    fn drops(&self) -> BTreeMap<DropReason, u64> {
        self.dp.drops().expect("read VERSE_DROPS")
    }

    fn send(&mut self, host: &Host<'_>, what: &str, ifindex: u32, frame: &[u8]) {
        let before = self.drops();
        let now = now_ns();
        let out = match self.dp.test_run(frame, ifindex, 1) {
            Ok(out) => out,
            // The kernel refuses some short frames before the program runs (EINVAL from
            // bpf_prog_test_run_skb); those cannot be compared, the unit tests of the model
            // cover them.
            Err(e) if os_error(&e) == Some(libc::EINVAL) => {
                let ethertype =
                    if frame.len() >= 14 { u16::from_be_bytes([frame[12], frame[13]]) } else { 0 };
                *self.refused.entry((ethertype, frame.len())).or_default() += 1;
                return;
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
        let outcome = host.judge(&self.ct, now, ifindex, frame);
        self.packets += 1;
        match &outcome.verdict {
            Verdict::Drop(r) => *self.drops_seen.entry(*r).or_default() += 1,
            _ => self.delivered += 1,
        }
        if model_agrees(out.return_code, &out.packet, &moved, &outcome.verdict) {
            if let Some(u) = &outcome.ct {
                self.ct.apply(u);
            }
            return;
        }
        let model = match &outcome.verdict {
            Verdict::Drop(r) => format!("drop {r:?}"),
            Verdict::Deliver { ifindex, frame } => {
                format!("deliver to {ifindex}, frame {}", hexdump(frame))
            }
            Verdict::ArpReply { frame } => format!("arp reply, frame {}", hexdump(frame)),
        };
        let kind = format!(
            "kernel rc {} {:?} vs model {}",
            out.return_code,
            moved.iter().map(|m| m.0).collect::<Vec<_>>(),
            match &outcome.verdict {
                Verdict::Drop(r) => format!("{r:?}"),
                Verdict::Deliver { .. } => "Deliver".into(),
                Verdict::ArpReply { .. } => "ArpReply".into(),
            }
        );
        let detail = format!(
            "{what}\n  ingress ifindex {ifindex}, packet {}\n  kernel: {}\n  model: {model}",
            hexdump(frame),
            kernel_verdict(out.return_code, &out.packet, &moved)
        );
        let e = self.disagreements.entry(kind).or_insert((0, detail));
        e.0 += 1;
        self.resync_ct();
    }

    /// After a disagreement, continue from the kernel's conntrack table.
    fn resync_ct(&mut self) {
        self.ct.entries = self.dp.conntrack().expect("read VERSE_CT").into_iter().collect();
    }

    /// Keys and states of both tables must match; kernel stamps are at or after the model's.
    fn compare_ct(&mut self, at: &str) {
        let kernel: BTreeMap<String, u8> = self
            .dp
            .conntrack()
            .expect("read VERSE_CT")
            .into_iter()
            .map(|(k, e)| (ct_label(&k), e.state))
            .collect();
        let model: BTreeMap<String, u8> =
            self.ct.entries.iter().map(|(k, e)| (ct_label(k), e.state)).collect();
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
    let tmp = TempDir::new("dm");
    let bpffs = Bpffs::mount(&tmp.path().join("bpf"));
    let (mut state, eps, names) = build_state();

    // One veth per endpoint (its ifindex is the endpoint's host-side ifindex) and one that is no
    // endpoint. (veth rather than dummy: the dummy module may be missing.)
    let shorts: Vec<&'static str> = eps.keys().copied().collect();
    for i in 0..=shorts.len() {
        ns.ip(&["link", "add", &format!("d{i}"), "type", "veth", "peer", "name", &format!("p{i}")]);
    }
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
        let local: BTreeMap<u32, String> =
            ifindex_of.iter().map(|(id, i)| (*i, id.clone())).collect();
        let stranger = index(&format!("d{}", shorts.len()));

        let timeouts = Timeouts::default();
        let config = Config { timeouts_ns: timeouts.ns, gateway_mac: GW, ..Config::default() };
        let dp = Dataplane::load(bpffs.path(), &config).expect("load the dataplane");
        let mut run = Run {
            dp,
            ct: Conntrack::default(),
            disagreements: BTreeMap::new(),
            packets: 0,
            delivered: 0,
            drops_seen: BTreeMap::new(),
            refused: BTreeMap::new(),
        };
        let mut cidr_ids = CidrIds::default();
        let lookup = |ep: &verse::model::Endpoint| ifindex_of.get(&ep.id).copied();
        let mut applied = Desired::default();
        let mut program = |run: &mut Run, state: &State, applied: &mut Desired| {
            let desired = compile(state, HOST, &lookup, &mut cidr_ids).expect("compile");
            run.dp.apply(applied, &desired).expect("apply");
            *applied = desired;
        };
        program(&mut run, &state, &mut applied);

        let mut gen = Gen {
            rng: StdRng::seed_from_u64(seed),
            eps: state
                .endpoints
                .values()
                .map(|e| Ep {
                    ifindex: ifindex_of[&e.id],
                    ip: e.ip,
                    mac: verse::model::parse_mac(&e.mac).expect("endpoint mac"),
                    universe: e.universe.clone(),
                })
                .collect(),
            stranger,
            flows: Vec::new(),
        };

        let phases = [
            "initial state",
            "after revoking web's tcp/80 rule (S8)",
            "after a membership change (S5)",
        ];
        for (p, phase) in phases.iter().enumerate() {
            match p {
                1 => {
                    state.delete_rule(&names.web_group, &names.web_http_rule).expect("revoke rule");
                    program(&mut run, &state, &mut applied);
                }
                2 => {
                    state
                        .patch_endpoint(
                            &names.mover,
                            PatchEndpoint { security_groups: names.mover_groups_after.clone() },
                        )
                        .expect("patch endpoint");
                    program(&mut run, &state, &mut applied);
                }
                _ => {}
            }
            let host = Host::new(&state, HOST, &local, GW, timeouts);
            for n in 0..per_phase {
                let (what, ifindex, frame) = gen.next();
                run.send(&host, &format!("[{phase}, packet {n}] {what}"), ifindex, &frame);
                if n % 500 == 499 {
                    run.compare_ct(&format!("{phase}, packet {n}"));
                }
            }
            run.compare_ct(&format!("end of {phase}"));
        }

        // Idle timeouts (S9): reload with short timeouts over the same pinned maps, let the
        // flows expire, and send their packets again.
        let mut short = Timeouts::default();
        for t in &mut short.ns {
            *t = 300_000_000;
        }
        short.ns[ct_state::TCP_ESTABLISHED as usize] = 3_600_000_000_000;
        let config = Config { timeouts_ns: short.ns, gateway_mac: GW, ..Config::default() };
        run.dp = Dataplane::load(bpffs.path(), &config).expect("reload with short timeouts");
        std::thread::sleep(std::time::Duration::from_millis(700));
        let host = Host::new(&state, HOST, &local, GW, short);
        let flows = gen.flows.clone();
        for (n, flow) in flows.iter().enumerate().take(per_phase) {
            let reply = n % 2 == 1;
            if let Some((ifindex, frame)) = gen.flow_packet(flow, reply, 0x10) {
                run.send(
                    &host,
                    &format!("[expiry, packet {n}] reply={reply} {flow:?}"),
                    ifindex,
                    &frame,
                );
            }
        }
        run.compare_ct("end of expiry phase");

        let mut out = format!(
            "{} packets: {} delivered or answered, drops by reason {:?}\n\
             refused by the kernel's test run, by (ethertype, length): {:?}\n",
            run.packets, run.delivered, run.drops_seen, run.refused
        );
        for (kind, (count, example)) in &run.disagreements {
            let _ = write!(out, "\n=== {count} x {kind}; first:\n{example}\n");
        }
        (run.disagreements.is_empty(), out, run.delivered, run.drops_seen.len())
    });
    let (ok, text, delivered, reasons) = report;
    eprintln!("{text}");
    assert!(ok, "kernel and model disagree (seed {seed}):\n{text}");
    // The generator must have exercised both outcomes broadly, or agreement proves little.
    assert!(delivered > per_phase / 10, "too few packets delivered: {delivered}");
    assert!(reasons >= 10, "too few drop reasons exercised: {reasons}");
}
