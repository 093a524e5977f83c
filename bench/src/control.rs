//! Control-plane tier: how long the rules take to reach the kernel, for 1,000, 10,000 and
//! 100,000 rules, by Verse and by the usual Linux firewalls loading the equivalent ruleset, all
//! measured in one run; and how much kernel memory Verse's maps take per 10,000 rules.
//!
//! The rules (the same set for every tool): one universe, a `client` group with one member (the
//! sender 10.1.0.10), `N / 1000` receiver groups of up to 1,000 ingress TCP rules, each in one of
//! `ceil(groups / 15)` receivers (15 groups each, S12). Peers are drawn 45% /32, 30% /24, 2% /16,
//! 13% the client group, 10% 0.0.0.0/0 from 10.1–4.0.0/16; port ranges are 1 to 4 ports wide,
//! mostly unaligned (several prefix blocks each), disjoint per receiver.
//!
//! - Verse: `verse::compile` of the state plus `Dataplane::apply` writing every entry into empty
//!   maps (a dataplane loaded in a private namespace under its own bpffs), timed together;
//!   after each sample the maps are emptied again (not timed).
//! - `nft -f`: one table, one set `allow` of type `ipv4_addr . ipv4_addr . inet_service` with
//!   intervals holding (receiver, peer CIDR, port range) — a group peer expands to its members,
//!   as nftables has no identities — and a forward chain `ct state established,related accept;
//!   ip daddr . ip saddr . tcp dport @allow accept; drop`. The ruleset is deleted between samples
//!   (not timed).
//! - `iptables-restore` (both backends, `iptables-nft-restore` and `iptables-legacy-restore`):
//!   the same elements as one linear FORWARD chain, `-d R -s CIDR -p tcp --dport lo:hi -j
//!   ACCEPT`, behind a conntrack accept, policy DROP; the table is emptied between samples.
//!
//! The external tools are timed from fork to exit, run from a thread inside the namespace (no
//! `ip netns exec` in the measurement); their input files are written beforehand. Every tool is
//! measured interleaved, 5 rounds, median with min, max and samples in the configuration; ratios
//! are Verse / peer of the times (below 1 is faster). Memory: `bytes_memlock` of each map
//! (`bpftool map show pinned`) with the 10,000-rule state minus with empty maps: LPM tries
//! allocate per entry, hash maps are preallocated (their size, constant, is in the config).
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Instant;

use ::tests::{Bpffs, Netns, TempDir};
use anyhow::{bail, ensure, Context, Result};
use dataplane_common::{map_names, Config};
use ipnetwork::IpNetwork;
use serde_json::json;
use verse::compile::{compile, Ids, MapContents};
use verse::dataplane::Dataplane;
use verse::model::{self, Peer, State};

use crate::results::{BenchRecord, Unit};
use crate::scenario::{cidr_pool, tcp_rule, Rng, Scenario, HOST};

const ROUNDS: usize = 5;
const SIZES: [usize; 3] = [1_000, 10_000, 100_000];
const GROUPS_PER_RECEIVER: usize = 15;
/// Port space per group position inside a receiver: 1,000 rules 4 ports apart.
const PORTS_PER_GROUP: u16 = 4_000;
const WIDTHS: [u16; 6] = [1, 2, 3, 4, 1, 2];
/// A peer whose one run exceeds this is not repeated at that size (its samples say how many).
const SLOW_SECONDS: f64 = 20.0;

/// The state with `n` rules, and the ids of the receivers.
fn build(n: usize) -> Result<(State, Vec<String>)> {
    let mut sc = Scenario::new("control")?;
    let client = sc.group("client".into())?;
    let (p16, p24, p32) = cidr_pool();
    let mut rng = Rng(0xc0_4e70 + n as u64);
    let mut next_id = 0x6000_0000u32;
    let groups = n.div_ceil(model::MAX_RULES_PER_GROUP);
    let mut rx = Vec::new();
    for g in 0..groups {
        let id = sc.group(format!("rx{g}"))?;
        let count = (n - g * model::MAX_RULES_PER_GROUP).min(model::MAX_RULES_PER_GROUP);
        let base = 1 + (g % GROUPS_PER_RECEIVER) as u16 * PORTS_PER_GROUP;
        let rules = (0..count)
            .map(|j| {
                let peer = match rng.below(100) {
                    0..=44 => Peer::Cidr(p32[rng.below(p32.len())].parse().expect("valid")),
                    45..=74 => Peer::Cidr(p24[rng.below(p24.len())].parse().expect("valid")),
                    75..=76 => Peer::Cidr(p16[rng.below(p16.len())].parse().expect("valid")),
                    77..=89 => Peer::Group(client.clone()),
                    _ => Peer::Cidr("0.0.0.0/0".parse().expect("valid")),
                };
                next_id += 1;
                let from = base + j as u16 * 4;
                tcp_rule(format!("sgr-{next_id:08x}"), from, WIDTHS[j % WIDTHS.len()], peer)
            })
            .collect();
        // Straight into the group: `add_rule` checks ids across the whole state per call.
        let sg = sc.st.groups.get_mut(&id).context("group just made")?;
        sg.egress.clear();
        sg.ingress = rules;
        rx.push(id);
    }
    sc.endpoint("sender", "10.1.0.10".into(), vec![client])?;
    let mut receivers = Vec::new();
    for (r, chunk) in rx.chunks(GROUPS_PER_RECEIVER).enumerate() {
        receivers.push(sc.endpoint(
            &format!("rx{r}"),
            format!("10.5.0.{}", 10 + r),
            chunk.to_vec(),
        )?);
    }
    Ok((sc.st, receivers))
}

/// The (receiver, source CIDR, port range) triples the rules of `receivers` allow: what a
/// firewall without identities must hold.
fn elements(st: &State, receivers: &[String]) -> Result<Vec<(Ipv4Addr, String, u16, u16)>> {
    let mut out = Vec::new();
    for id in receivers {
        let r = &st.endpoints[id];
        for g in r.security_groups.iter().filter_map(|g| st.groups.get(g)) {
            for rule in &g.ingress {
                let (lo, hi) = rule.ports.context("benchmark rules are TCP with ports")?;
                match &rule.peer {
                    Peer::Cidr(IpNetwork::V4(c)) => out.push((r.ip, c.to_string(), lo, hi)),
                    Peer::Cidr(other) => bail!("unexpected IPv6 peer {other}"),
                    Peer::Group(peer) => {
                        for m in st.endpoints.values().filter(|e| e.security_groups.contains(peer))
                        {
                            out.push((r.ip, format!("{}/32", m.ip), lo, hi));
                        }
                    }
                }
            }
        }
    }
    Ok(out)
}

fn nft_text(els: &[(Ipv4Addr, String, u16, u16)]) -> String {
    let mut t = String::from(
        "table inet vbench {\n  set allow {\n    type ipv4_addr . ipv4_addr . inet_service\n    flags interval\n    elements = {\n",
    );
    for (i, (d, s, lo, hi)) in els.iter().enumerate() {
        let sep = if i + 1 == els.len() { "" } else { "," };
        if lo == hi {
            let _ = writeln!(t, "      {d} . {s} . {lo}{sep}");
        } else {
            let _ = writeln!(t, "      {d} . {s} . {lo}-{hi}{sep}");
        }
    }
    t.push_str(
        "    }\n  }\n  chain forward {\n    type filter hook forward priority filter; policy drop;\n    ct state established,related accept\n    ip daddr . ip saddr . tcp dport @allow accept\n  }\n}\n",
    );
    t
}

fn iptables_text(els: &[(Ipv4Addr, String, u16, u16)]) -> String {
    let mut t = String::from(
        "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD DROP [0:0]\n:OUTPUT ACCEPT [0:0]\n-A FORWARD -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT\n",
    );
    for (d, s, lo, hi) in els {
        let _ =
            writeln!(t, "-A FORWARD -d {d}/32 -s {s} -p tcp -m tcp --dport {lo}:{hi} -j ACCEPT");
    }
    t.push_str("COMMIT\n");
    t
}

const IPTABLES_EMPTY: &str =
    "*filter\n:INPUT ACCEPT [0:0]\n:FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n";

/// Runs `cmd args` to completion from the current thread's namespaces; seconds it took.
fn timed(cmd: &str, args: &[&str]) -> Result<f64> {
    let t = Instant::now();
    let out = Command::new(cmd)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("start {cmd}"))?;
    let s = t.elapsed().as_secs_f64();
    ensure!(
        out.status.success(),
        "{cmd} {args:?} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr).chars().take(500).collect::<String>()
    );
    Ok(s)
}

/// `bytes_memlock` of every map pinned under `dir`, by name.
fn memlock(dir: &Path) -> Result<BTreeMap<String, u64>> {
    let mut out = BTreeMap::new();
    for name in [
        map_names::ENDPOINTS,
        map_names::ROUTES,
        map_names::CIDRS,
        map_names::POLICY,
        map_names::CONNTRACK,
        map_names::HOSTS,
        map_names::VNIS,
        map_names::DROPS,
        map_names::CONFIG,
    ] {
        let path = dir.join(name);
        let o = Command::new("bpftool")
            .args(["-j", "map", "show", "pinned"])
            .arg(&path)
            .output()
            .context("start bpftool")?;
        ensure!(
            o.status.success(),
            "bpftool map show pinned {}: {}",
            path.display(),
            String::from_utf8_lossy(&o.stderr)
        );
        let v: serde_json::Value =
            serde_json::from_slice(&o.stdout).context("bpftool -j output")?;
        let bytes =
            v["bytes_memlock"].as_u64().with_context(|| format!("no bytes_memlock for {name}"))?;
        out.insert(name.to_owned(), bytes);
    }
    Ok(out)
}

fn stats(v: &[f64]) -> (f64, f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    (s[s.len() / 2], s[0], s[s.len() - 1])
}

struct Size {
    n: usize,
    st: State,
    receivers: Vec<String>,
    elements: usize,
    nft_file: String,
    ipt_file: String,
    /// Samples in seconds, per tool.
    samples: BTreeMap<&'static str, Vec<f64>>,
    compile_s: Vec<f64>,
    write_s: Vec<f64>,
    policy_entries: usize,
    cidr_entries: usize,
}

const TOOLS: [&str; 4] = ["verse", "nft", "iptables_nft", "iptables_legacy"];

pub fn run(out: &mut Vec<BenchRecord>) -> Result<()> {
    let started = Instant::now();
    let ns = Netns::new("bc");
    let tmp = TempDir::new("bc");
    let bpffs = Bpffs::mount(&tmp.path().join("bpf"));
    let empty_ipt = tmp.path().join("empty.rules");
    std::fs::write(&empty_ipt, IPTABLES_EMPTY).context("write empty.rules")?;
    let empty_ipt = empty_ipt.to_string_lossy().into_owned();

    let mut sizes = Vec::new();
    for n in SIZES {
        let (st, receivers) = build(n)?;
        let els = elements(&st, &receivers)?;
        let nft_file = tmp.path().join(format!("r{n}.nft"));
        std::fs::write(&nft_file, nft_text(&els)).context("write nft ruleset")?;
        let ipt_file = tmp.path().join(format!("r{n}.rules"));
        std::fs::write(&ipt_file, iptables_text(&els)).context("write iptables rules")?;
        sizes.push(Size {
            n,
            st,
            receivers,
            elements: els.len(),
            nft_file: nft_file.to_string_lossy().into_owned(),
            ipt_file: ipt_file.to_string_lossy().into_owned(),
            samples: BTreeMap::new(),
            compile_s: Vec::new(),
            write_s: Vec::new(),
            policy_entries: 0,
            cidr_entries: 0,
        });
    }
    eprintln!(
        "bench_control: states and rulesets made in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let dir = bpffs.path().join("dp");
    let memory = ns.enter(|| -> Result<serde_json::Value> {
        let mut dp = Dataplane::load(&dir, &Config::default()).context("load the dataplane")?;
        let empty_mem = memlock(&dir)?;
        let mut mem10k = None;
        for round in 0..ROUNDS {
            for size in sizes.iter_mut() {
                // Fake ifindexes: the maps are written, nothing is attached.
                let index: BTreeMap<String, u32> = size
                    .st
                    .endpoints
                    .keys()
                    .enumerate()
                    .map(|(i, id)| (id.clone(), 1000 + i as u32))
                    .collect();
                let lookup = |ep: &model::Endpoint| index.get(&ep.id).copied();
                let t = Instant::now();
                let desired = compile(&size.st, HOST, &lookup, &mut Ids::default())
                    .map_err(|e| anyhow::anyhow!("compile {} rules: {e}", size.n))?;
                let c = t.elapsed().as_secs_f64();
                dp.apply(&MapContents::default(), &desired)
                    .with_context(|| format!("write {} rules", size.n))?;
                let total = t.elapsed().as_secs_f64();
                size.compile_s.push(c);
                size.write_s.push(total - c);
                size.samples.entry("verse").or_default().push(total);
                size.policy_entries = desired.policy.len();
                size.cidr_entries = desired.cidrs.len();
                if size.n == 10_000 && round == 0 {
                    mem10k = Some(memlock(&dir)?);
                }
                dp.apply(&desired, &MapContents::default()).context("empty the maps")?;

                for tool in &TOOLS[1..] {
                    let prior = size.samples.get(tool).map(|v| v.as_slice()).unwrap_or(&[]);
                    if prior.iter().any(|&s| s > SLOW_SECONDS) {
                        continue;
                    }
                    let s = match *tool {
                        "nft" => {
                            let s = timed("nft", &["-f", &size.nft_file])?;
                            timed("nft", &["delete", "table", "inet", "vbench"])?;
                            s
                        }
                        "iptables_nft" => {
                            let s = timed("iptables-nft-restore", &["-w", "10", &size.ipt_file])?;
                            timed("iptables-nft-restore", &["-w", "10", &empty_ipt])?;
                            s
                        }
                        _ => {
                            let s =
                                timed("iptables-legacy-restore", &["-w", "10", &size.ipt_file])?;
                            timed("iptables-legacy-restore", &["-w", "10", &empty_ipt])?;
                            s
                        }
                    };
                    size.samples.entry(tool).or_default().push(s);
                }
            }
            eprintln!(
                "bench_control: round {round}: {}",
                sizes
                    .iter()
                    .map(|s| {
                        let f = |t: &str| {
                            s.samples
                                .get(t)
                                .and_then(|v| v.get(round))
                                .map(|x| format!("{x:.3}"))
                                .unwrap_or("-".into())
                        };
                        format!(
                            "{}: verse {} nft {} ipt-nft {} ipt-legacy {}",
                            s.n,
                            f("verse"),
                            f("nft"),
                            f("iptables_nft"),
                            f("iptables_legacy")
                        )
                    })
                    .collect::<Vec<_>>()
                    .join("; ")
            );
        }
        let mem10k = mem10k.context("the 10,000-rule state was never written")?;
        let delta: BTreeMap<&String, i64> = mem10k
            .iter()
            .map(|(k, v)| (k, *v as i64 - *empty_mem.get(k).unwrap_or(&0) as i64))
            .collect();
        Ok(json!({"empty": empty_mem, "with_10k_rules": mem10k, "delta": delta}))
    })?;

    let common = json!({
        "rounds": ROUNDS, "statistic": "median of rounds, interleaved",
        "rules": "ingress TCP, 1-4 port ranges, peers 45% /32, 30% /24, 2% /16, 13% group, 10% 0.0.0.0/0",
        "verse": "verse::compile + Dataplane::apply into empty maps",
        "nft": "nft -f: one interval set ipv4_addr . ipv4_addr . inet_service, one lookup rule",
        "iptables": "iptables-{nft,legacy}-restore: linear FORWARD chain, one rule per element",
    });
    for size in &sizes {
        let mut medians = BTreeMap::new();
        for tool in TOOLS {
            let Some(v) = size.samples.get(tool) else { continue };
            let (m, lo, hi) = stats(v);
            medians.insert(tool, m);
            let mut c = common.clone();
            c["rule_count"] = json!(size.n);
            c["min_s"] = json!(lo);
            c["max_s"] = json!(hi);
            c["samples_s"] = json!(v);
            c["elements"] = json!(size.elements);
            if v.len() < ROUNDS {
                c["note"] = json!(format!(
                    "one run took over {SLOW_SECONDS} s: not repeated, to keep the tier short"
                ));
            }
            if tool == "verse" {
                c["compile_s"] = json!(size.compile_s);
                c["write_s"] = json!(size.write_s);
                c["policy_map_entries"] = json!(size.policy_entries);
                c["cidr_map_entries"] = json!(size.cidr_entries);
                c["receivers"] = json!(size.receivers.len());
            }
            let mut rec =
                BenchRecord::new(&format!("control_{tool}_{}", size.n), m * 1e3, Unit::Ms, None, c);
            if tool == "verse" && size.n == 100_000 {
                rec = rec.with_target("< 1000 ms", m < 1.0);
            }
            out.push(rec);
        }
        let v = medians["verse"];
        let verse_ms: Vec<f64> =
            size.samples.get("verse").into_iter().flatten().map(|s| s * 1e3).collect();
        for peer in &TOOLS[1..] {
            let Some(&p) = medians.get(peer) else { continue };
            let mut rec = BenchRecord::new(
                &format!("control_verse_vs_{peer}_{}", size.n),
                v * 1e3,
                Unit::Ms,
                Some((&format!("control_{peer}_{}", size.n), v / p)),
                json!({"ratio": "Verse time / peer time (medians); below 1 is faster", "verse_ms": v * 1e3, "peer_ms": p * 1e3}),
            )
            .with_spread(&verse_ms);
            if *peer == "nft" && size.n == 10_000 {
                rec = rec.with_target("<= 1.00x", v / p <= 1.0);
            }
            out.push(rec);
        }
    }
    let delta_total: i64 = memory["delta"]
        .as_object()
        .map(|o| o.values().filter_map(|v| v.as_i64()).sum())
        .unwrap_or(0);
    out.push(BenchRecord::new(
        "control_verse_map_memory_per_10k_rules",
        delta_total as f64 / 1024.0,
        Unit::KiB,
        None,
        json!({"method": "sum over maps of bytes_memlock (bpftool) with the 10,000-rule state minus with empty maps; an LPM trie reports entries x node size (intermediate nodes not counted); hash and array maps are preallocated at their capacity and do not grow",
               "policy_map_entries": sizes.iter().find(|s| s.n == 10_000).map(|s| s.policy_entries),
               "bytes_memlock": memory}),
    ));
    eprintln!("bench_control: done in {:.1} s", started.elapsed().as_secs_f64());
    drop(bpffs);
    drop(tmp);
    drop(ns);
    Ok(())
}
