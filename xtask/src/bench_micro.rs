//! Micro-benchmark: nanoseconds per packet of `from_endpoint` through `BPF_PROG_TEST_RUN`, over a
//! pool of distinct packets, against the `empty` program of the same hook measured in the same
//! run.
//!
//! Scenarios, each on its own loaded copy of the dataplane (its own maps under its own bpffs
//! directory), so that they can be interleaved without rewriting maps between measurements:
//! - `established`: every packet hits a live conntrack entry made by a first pass;
//! - `new_flow_10_rules`, `new_flow_10k_rules`, `new_flow_100k_rules`: every run is a new flow
//!   that the full path judges (conntrack miss both ways, egress policy, route, ingress policy,
//!   conntrack create, rewrite, redirect). The packet pool is distinct flows; because the kernel
//!   repeats one packet `repeat` times, those copies load with every conntrack timeout at 0: the
//!   entry the previous run made is then expired (idle >= 0 ns, even within one clock tick) and counts as a miss, and the
//!   create overwrites it, which is the new-flow path at the same cost.
//!
//! Every pool packet is allowed by a rule (checked against the reference model
//! `verse::verdict` and by a first kernel pass that must redirect every packet without a drop).
//! `Config.gateway_mac` is the sender's own MAC, so a frame the program rewrote (source = gateway
//! MAC) stays valid for the next repeat; the work per run is unchanged.
//!
//! Method: `repeat` is calibrated so that one measurement (the pool once, each packet `repeat`
//! times) takes about 0.5 s; the programs are measured interleaved (empty, a, b, c, d) for 5
//! rounds and the median of each is reported, with its ratio to the empty program, and the ratio
//! 100k rules / 10 rules.
use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::Path;
use std::time::{Duration, Instant};

use ::tests::{Bpffs, Netns, TempDir};
use anyhow::{bail, ensure, Context, Result};
use dataplane_common::{ct_state, Config};
use serde_json::json;
use verse::compile::{compile, CidrIds, Desired};
use verse::dataplane::{tc_act, Dataplane};
use verse::model::{
    self, CreateEndpoint, CreateGroup, CreateUniverse, Direction, Peer, Protocol, Rule, State,
};
use verse::verdict::{Conntrack, Host, Timeouts, Verdict};

use crate::results::BenchRecord;

const HOST: &str = "bench";
const POOL: usize = 1024;
const ROUNDS: usize = 5;
/// Target duration of one measurement.
const TARGET: Duration = Duration::from_millis(500);
const SENDER_IP: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 10);
/// Receivers; with 15 groups each, 7 of them cover 100 groups (at most 16 per endpoint, S12).
const RECEIVERS: usize = 7;
const GROUPS_PER_RECEIVER: usize = 15;

/// splitmix64: a seeded, dependency-free generator; the configuration must be reproducible.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

/// The CIDR peers rules draw from: 4 /16, 64 /24 and 256 /32 in 10.1–4.0.0/16. The sender is in
/// 10.1.0.0/16, 10.1.0.0/24 and 10.1.0.10/32.
fn cidr_pool() -> (Vec<String>, Vec<String>, Vec<String>) {
    let mut p16 = Vec::new();
    let mut p24 = Vec::new();
    let mut p32 = Vec::new();
    for a in 1..=4 {
        p16.push(format!("10.{a}.0.0/16"));
        for b in 0..16 {
            p24.push(format!("10.{a}.{b}.0/24"));
            for c in [10, 20, 30, 40] {
                p32.push(format!("10.{a}.{b}.{c}/32"));
            }
        }
    }
    (p16, p24, p32)
}

/// Port range widths: single ports, aligned and unaligned ranges (split into several blocks).
const WIDTHS: [u16; 6] = [1, 2, 5, 8, 16, 33];

fn tcp_rule(id: String, from: u16, width: u16, peer: Peer) -> Rule {
    Rule {
        id,
        direction: Direction::Ingress,
        protocol: Protocol::TCP,
        ports: Some((from, from + width - 1)),
        icmp: None,
        peer,
        description: String::new(),
    }
}

/// `n` distinct ingress rules for group number `g`: TCP, distinct port ranges, peers drawn
/// 45% /32, 30% /24, 2% /16, 13% the client group, 10% 0.0.0.0/0 — or, with `all_match`, only
/// peers that contain the sender (10 rules of scenario b).
fn rules_for(
    g: usize,
    n: usize,
    client: &str,
    all_match: bool,
    rng: &mut Rng,
    next_id: &mut u32,
) -> Vec<Rule> {
    let (p16, p24, p32) = cidr_pool();
    let matching = ["10.1.0.0/16", "10.1.0.0/24", "10.1.0.10/32", "group", "0.0.0.0/0"];
    (0..n)
        .map(|j| {
            let peer = if all_match {
                matching[j % matching.len()].to_owned()
            } else {
                match rng.below(100) {
                    0..=44 => p32[rng.below(p32.len())].clone(),
                    45..=74 => p24[rng.below(p24.len())].clone(),
                    75..=76 => p16[rng.below(p16.len())].clone(),
                    77..=89 => "group".to_owned(),
                    _ => "0.0.0.0/0".to_owned(),
                }
            };
            let peer = if peer == "group" {
                Peer::Group(client.to_owned())
            } else {
                Peer::Cidr(peer.parse().expect("pool CIDRs are valid"))
            };
            *next_id += 1;
            // 64 ports per rule leave room for the widest range; the group shifts the base.
            let from = 1 + (j as u16) * 64 + (g % 8) as u16;
            tcp_rule(format!("sgr-{:08x}", *next_id), from, WIDTHS[(j + g) % WIDTHS.len()], peer)
        })
        .collect()
}

/// One scenario's state: a universe, a `client` group (the sender; S2 egress all), `groups`
/// receiver groups of `rules_per_group` ingress rules each (their S2 egress removed, so exactly
/// that many rules), and 7 receivers, each in up to 15 of the groups.
fn build(groups: usize, rules_per_group: usize, all_match: bool) -> Result<(State, Vec<String>)> {
    let mut st = State::default();
    let uni = st
        .create_universe(CreateUniverse {
            name: "bench".into(),
            cidr: Some("10.0.0.0/8".into()),
            cidrs: None,
        })
        .map_err(|e| anyhow::anyhow!("create universe: {e}"))?
        .id;
    let group = |st: &mut State, name: String| {
        st.create_group(CreateGroup { universe: uni.clone(), name, description: None })
            .map(|g| g.id)
            .map_err(|e| anyhow::anyhow!("create group: {e}"))
    };
    let client = group(&mut st, "client".into())?;
    let mut rng = Rng(0xbe7c_4000 + groups as u64 * 7 + rules_per_group as u64);
    let mut next_id = 0x4000_0000u32;
    let mut rx = Vec::new();
    for g in 0..groups {
        let id = group(&mut st, format!("rx{g}"))?;
        // Rules go straight into the group: `add_rule` checks rule ids across the whole state,
        // O(rules) per call, which is fine for an API but not for 100,000 calls in a row.
        let sg = st.groups.get_mut(&id).context("group just made")?;
        sg.egress.clear();
        sg.ingress = rules_for(g, rules_per_group, &client, all_match, &mut rng, &mut next_id);
        ensure!(sg.ingress.len() <= model::MAX_RULES_PER_GROUP, "S12: too many rules in a group");
        rx.push(id);
    }
    let mut eps = Vec::new();
    let ep = |st: &mut State, name: &str, ip: String, groups: Vec<String>| {
        st.create_endpoint(
            CreateEndpoint {
                universe: uni.clone(),
                host: None,
                netns: name.into(),
                ip,
                security_groups: Some(groups),
            },
            HOST,
        )
        .map(|e| e.id)
        .map_err(|e| anyhow::anyhow!("create endpoint {name}: {e}"))
    };
    eps.push(ep(&mut st, "sender", SENDER_IP.to_string(), vec![client.clone()])?);
    for r in 0..RECEIVERS {
        let mine: Vec<String> =
            rx.iter().skip(r * GROUPS_PER_RECEIVER).take(GROUPS_PER_RECEIVER).cloned().collect();
        let mine = if mine.is_empty() { vec![rx[r % rx.len()].clone()] } else { mine };
        eps.push(ep(&mut st, &format!("rx{r}"), format!("10.5.0.{}", 10 + r), mine)?);
    }
    Ok((st, eps))
}

fn mac(text: &str) -> Result<[u8; 6]> {
    verse::model::parse_mac(text).with_context(|| format!("endpoint MAC {text}"))
}

/// TCP SYN from the sender to `dst:dport`, IPv4 without options.
fn syn(src_mac: [u8; 6], dst: Ipv4Addr, sport: u16, dport: u16) -> Vec<u8> {
    let mut f = Vec::with_capacity(64);
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 1]);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&[0x08, 0x00, 0x45, 0x00, 0x00, 40, 0x12, 0x34, 0x40, 0x00, 64, 6, 0, 0]);
    f.extend_from_slice(&SENDER_IP.octets());
    f.extend_from_slice(&dst.octets());
    f.extend_from_slice(&sport.to_be_bytes());
    f.extend_from_slice(&dport.to_be_bytes());
    f.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, 0x02, 0xff, 0xff, 0, 0, 0, 0]);
    f
}

/// `POOL` distinct new flows from the sender, each allowed by one rule of a receiver's groups
/// (the rule picked at random among those whose peer contains the sender).
fn pool(st: &State, eps: &[String]) -> Result<Vec<Vec<u8>>> {
    let sender = &st.endpoints[&eps[0]];
    let smac = mac(&sender.mac)?;
    let client_groups = &sender.security_groups;
    let mut rng = Rng(0x9001);
    let mut out = Vec::with_capacity(POOL);
    for k in 0..POOL {
        let rx = &st.endpoints[&eps[1 + k % RECEIVERS]];
        let allowed: Vec<&Rule> = rx
            .security_groups
            .iter()
            .filter_map(|g| st.groups.get(g))
            .flat_map(|g| g.ingress.iter())
            .filter(|r| match &r.peer {
                Peer::Cidr(ipnetwork::IpNetwork::V4(n)) => n.contains(SENDER_IP),
                Peer::Cidr(_) => false,
                Peer::Group(g) => client_groups.contains(g),
            })
            .collect();
        ensure!(!allowed.is_empty(), "receiver {} has no rule that admits the sender", rx.id);
        let r = allowed[rng.below(allowed.len())];
        let (lo, hi) = r.ports.context("bench rules are TCP with ports")?;
        let dport = lo + rng.below(usize::from(hi - lo) + 1) as u16;
        out.push(syn(smac, rx.ip, 10_000 + k as u16, dport));
    }
    Ok(out)
}

/// A loaded copy of the dataplane with one scenario's maps.
struct Loaded {
    name: &'static str,
    dp: Dataplane,
    pool: Vec<Vec<u8>>,
    sender_ifindex: u32,
    repeat: u32,
    config: serde_json::Value,
    samples: Vec<f64>,
}

impl Loaded {
    /// Mean kernel-measured ns per run over the pool, each packet `repeat` times.
    fn measure(&self, empty: bool) -> Result<f64> {
        let mut total = 0f64;
        for p in &self.pool {
            let out = if empty {
                self.dp.test_run_empty(p, self.sender_ifindex, self.repeat)
            } else {
                self.dp.test_run(p, self.sender_ifindex, self.repeat)
            }
            .with_context(|| format!("BPF_PROG_TEST_RUN ({})", self.name))?;
            let want = if empty { tc_act::OK } else { tc_act::REDIRECT };
            ensure!(
                out.return_code == want,
                "{}: return code {} instead of {want}",
                self.name,
                out.return_code
            );
            total += out.duration_ns as f64;
        }
        Ok(total / self.pool.len() as f64)
    }

    /// Picks `repeat` so that one measurement takes about `TARGET`.
    fn calibrate(&mut self, empty: bool) -> Result<()> {
        self.repeat = 100;
        let t = Instant::now();
        self.measure(empty)?;
        let per_run = t.elapsed().as_secs_f64() / (self.pool.len() as f64 * 100.0);
        self.repeat = ((TARGET.as_secs_f64() / (self.pool.len() as f64 * per_run)) as u32)
            .clamp(1, 1_000_000);
        Ok(())
    }
}

fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

#[allow(clippy::too_many_arguments)]
fn load(
    name: &'static str,
    dir: &Path,
    st: &State,
    eps: &[String],
    ifindex: &BTreeMap<String, u32>,
    timeouts: Timeouts,
    established: bool,
    shape: serde_json::Value,
) -> Result<Loaded> {
    let sender = &st.endpoints[&eps[0]];
    let smac = mac(&sender.mac)?;
    let config = Config { timeouts_ns: timeouts.ns, gateway_mac: smac, ..Config::default() };
    let dp_dir = dir.join(name);
    let mut dp =
        Dataplane::load(&dp_dir, &config).with_context(|| format!("load dataplane for {name}"))?;
    let lookup = |ep: &model::Endpoint| ifindex.get(&ep.id).copied();
    let t = Instant::now();
    let desired = compile(st, HOST, &lookup, &mut CidrIds::default())
        .map_err(|e| anyhow::anyhow!("compile {name}: {e}"))?;
    let compile_s = t.elapsed().as_secs_f64();
    let t = Instant::now();
    dp.apply(&Desired::default(), &desired).with_context(|| format!("apply {name}"))?;
    let apply_s = t.elapsed().as_secs_f64();
    let rules: usize = st.groups.values().map(|g| g.ingress.len() + g.egress.len()).sum();
    let pool = pool(st, eps)?;
    let sender_ifindex = ifindex[&eps[0]];

    // Every packet must be a delivery for the model, and for the kernel on a first pass.
    let local: BTreeMap<u32, String> = ifindex.iter().map(|(id, i)| (*i, id.clone())).collect();
    let host = Host::new(st, HOST, &local, smac, timeouts);
    let ct = Conntrack::default();
    for p in &pool {
        let v = host.judge(&ct, 0, sender_ifindex, p).verdict;
        ensure!(
            matches!(v, Verdict::Deliver { .. }),
            "{name}: the model does not deliver a pool packet: {v:?}"
        );
    }
    let drops_before: u64 = dp.drops()?.values().sum();
    for p in &pool {
        let out = dp.test_run(p, sender_ifindex, 1)?;
        ensure!(
            out.return_code == tc_act::REDIRECT,
            "{name}: first pass returned {}",
            out.return_code
        );
    }
    let drops_after: u64 = dp.drops()?.values().sum();
    ensure!(drops_after == drops_before, "{name}: the first pass dropped packets");
    let ct_entries = dp.conntrack()?.len();
    if established {
        ensure!(
            ct_entries >= pool.len(),
            "{name}: only {ct_entries} conntrack entries after the first pass"
        );
    }

    let mut config = shape;
    let obj = config.as_object_mut().context("shape is an object")?;
    obj.insert("rules_total".into(), json!(rules));
    obj.insert("policy_map_entries".into(), json!(desired.policy.len()));
    obj.insert("cidr_classes".into(), json!(desired.cidrs.len()));
    obj.insert("endpoints".into(), json!(desired.endpoints.len()));
    obj.insert("compile_s".into(), json!(compile_s));
    obj.insert("apply_s".into(), json!(apply_s));
    obj.insert("ct_timeouts_ns".into(), json!(timeouts.ns));
    obj.insert("ct_entries_after_first_pass".into(), json!(ct_entries));
    obj.insert("verified_instructions".into(), json!(dp.verified_instruction_count()?));
    Ok(Loaded { name, dp, pool, sender_ifindex, repeat: 1, config, samples: Vec::new() })
}

pub fn run(out: &mut Vec<BenchRecord>) -> Result<()> {
    let ns = Netns::new("bm");
    let tmp = TempDir::new("bm");
    let bpffs = Bpffs::mount(&tmp.path().join("bpf"));

    // Scenario states: a/b share the 10-rule state.
    let t = Instant::now();
    let small = build(1, 10, true)?;
    let mid = build(100, 100, false)?;
    let large = build(100, 1000, false)?;
    eprintln!("bench_micro: states built in {:.1} s", t.elapsed().as_secs_f64());
    // Endpoint ids are numbered alike in each state (same creation order): one set of veths.
    for i in 0..=RECEIVERS {
        ns.ip(&["link", "add", &format!("b{i}"), "type", "veth", "peer", "name", &format!("c{i}")]);
    }
    let kernel =
        std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_owned();

    let records = ns.enter(|| -> Result<Vec<BenchRecord>> {
        let index = |name: &str| -> Result<u32> {
            let c = std::ffi::CString::new(name)?;
            // SAFETY: `c` is NUL-terminated and outlives the call.
            let i = unsafe { libc::if_nametoindex(c.as_ptr()) };
            ensure!(i > 1, "if_nametoindex({name}) failed");
            Ok(i)
        };
        let ifindexes = |eps: &[String]| -> Result<BTreeMap<String, u32>> {
            eps.iter().enumerate().map(|(i, id)| Ok((id.clone(), index(&format!("b{i}"))?))).collect()
        };
        let zero = Timeouts { ns: [0; ct_state::COUNT] };
        let common = json!({
            "method": "BPF_PROG_TEST_RUN of from_endpoint (TC), kernel-measured mean per run",
            "pool_packets": POOL,
            "rounds": ROUNDS,
            "statistic": "median of rounds",
            "kernel": kernel,
            "packets": "TCP SYN, 54 bytes, IPv4 without options, distinct (dst, sport, dport), each allowed by one rule",
            "gateway_mac": "the sender's MAC, so a rewritten frame stays valid for the next repeat",
            "receivers": RECEIVERS,
        });
        let shape = |extra: serde_json::Value| {
            let mut c = common.clone();
            if let (Some(c), Some(e)) = (c.as_object_mut(), extra.as_object()) {
                c.extend(e.clone());
            }
            c
        };
        let dir = bpffs.path();
        let mut all = vec![
            load("established", dir, &small.0, &small.1, &ifindexes(&small.1)?, Timeouts::default(), true,
                shape(json!({"scenario": "established flows: every run a conntrack hit on an entry made by a first pass (S9 timeouts; the hit path is the same for every state)", "groups": 1, "rules_per_group": 10})))?,
            load("new_flow_10_rules", dir, &small.0, &small.1, &ifindexes(&small.1)?, zero, false,
                shape(json!({"scenario": "new flow every run (conntrack timeouts 0)", "groups": 1, "rules_per_group": 10, "groups_per_receiver": 1})))?,
            load("new_flow_10k_rules", dir, &mid.0, &mid.1, &ifindexes(&mid.1)?, zero, false,
                shape(json!({"scenario": "new flow every run (conntrack timeouts 0)", "groups": 100, "rules_per_group": 100, "groups_per_receiver": GROUPS_PER_RECEIVER,
                    "peers": "45% /32, 30% /24, 2% /16, 13% group, 10% 0.0.0.0/0 from 4 /16, 64 /24, 256 /32", "port_range_widths": WIDTHS})))?,
            load("new_flow_100k_rules", dir, &large.0, &large.1, &ifindexes(&large.1)?, zero, false,
                shape(json!({"scenario": "new flow every run (conntrack timeouts 0)", "groups": 100, "rules_per_group": 1000, "groups_per_receiver": GROUPS_PER_RECEIVER,
                    "peers": "45% /32, 30% /24, 2% /16, 13% group, 10% 0.0.0.0/0 from 4 /16, 64 /24, 256 /32", "port_range_widths": WIDTHS})))?,
        ];
        for l in &all {
            eprintln!("bench_micro: {} loaded: {}", l.name, l.config);
        }
        // The empty program, on the first copy's pool.
        let mut empty_samples = Vec::new();
        let mut empty_repeat = {
            let l = &mut all[1];
            l.calibrate(true)?;
            l.repeat
        };
        for l in all.iter_mut() {
            l.calibrate(false)?;
        }
        for round in 0..ROUNDS {
            {
                let l = &mut all[1];
                let keep = l.repeat;
                l.repeat = empty_repeat;
                empty_samples.push(l.measure(true)?);
                l.repeat = keep;
            }
            for l in all.iter_mut() {
                let v = l.measure(false)?;
                l.samples.push(v);
            }
            eprintln!(
                "bench_micro: round {round}: empty {:.1} ns, {}",
                empty_samples[round],
                all.iter().map(|l| format!("{} {:.1} ns", l.name, l.samples[round])).collect::<Vec<_>>().join(", ")
            );
        }
        empty_repeat = empty_repeat.max(1);
        let empty = median(&empty_samples);
        let mut recs = vec![BenchRecord::new(
            "micro_empty_program",
            empty,
            "ns/packet",
            None,
            shape(json!({"program": "empty (returns TC_ACT_OK)", "repeat": empty_repeat, "samples": empty_samples})),
        )];
        let mut by_name = BTreeMap::new();
        for l in &all {
            let m = median(&l.samples);
            by_name.insert(l.name, m);
            let mut c = l.config.clone();
            if let Some(o) = c.as_object_mut() {
                o.insert("repeat".into(), json!(l.repeat));
                o.insert("samples".into(), json!(l.samples));
            }
            let mut rec = BenchRecord::new(
                &format!("micro_{}", l.name),
                m,
                "ns/packet",
                Some(("micro_empty_program", m / empty)),
                c,
            );
            if l.name == "established" {
                rec = rec.with_target("<= 3.00x", m / empty <= 3.0);
            }
            recs.push(rec);
        }
        let (b, d) = (by_name["new_flow_10_rules"], by_name["new_flow_100k_rules"]);
        recs.push(BenchRecord::new(
            "micro_new_flow_100k_vs_10_rules",
            d / b,
            "x",
            Some(("micro_new_flow_10_rules", d / b)),
            json!({"numerator": "micro_new_flow_100k_rules", "denominator": "micro_new_flow_10_rules", "statistic": "ratio of medians"}),
        ).with_target("<= 1.50x", d / b <= 1.5));
        Ok(recs)
    })?;
    if records.is_empty() {
        bail!("bench_micro: no records");
    }
    out.extend(records);
    drop(bpffs);
    drop(tmp);
    drop(ns);
    Ok(())
}
