//! Packet-rate tier: how fast denied traffic arriving on the underlay is dropped, by Verse's
//! `from_underlay` and by the usual Linux firewalls on the same path, measured in one run.
//!
//! Testbed (namespaces only, never a real interface): one generator namespace holds one veth
//! per device under test; the peer of each, `ul0`, sits in a namespace of its own (the "DUT"),
//! configured with exactly one filter:
//! - `verse_N`: Verse's dataplane (its own maps under its own bpffs directory), `from_underlay`
//!   attached at TCX ingress of `ul0`, this host `198.18.0.2`, one other host `198.18.0.1` with a
//!   sender endpoint, one local receiver whose groups hold N TCP rules (N = 10, 1,000, 10,000)
//!   that do not admit the frame (UDP to port 9999): dropped as `PolicyIngress`; and
//!   `verse_unknown_host`, a copy with 10 rules that receives frames from an underlay address
//!   that is no host of the fleet: dropped as `UnknownHost` (the cheapest drop of the program).
//! - `nft_netdev_drop`: an nftables netdev-ingress chain on `ul0`: `udp dport 4789 counter drop`.
//! - `nft_set_N`: the same hook, `ip saddr @deny counter drop` with N addresses in `deny`.
//! - `iptables_{nft,legacy}_N`: the raw table's PREROUTING chain, N rules `-s <other> -j ACCEPT`
//!   that do not match, then `-j DROP` (loaded with `iptables-{nft,legacy}-restore`).
//! - `floor_xdp_drop`: `ul0`'s XDP program drops every frame: the cost of the testbed itself
//!   (generator and veth), which every other figure includes.
//!
//! Generator: `BPF_PROG_TEST_RUN` with `BPF_F_TEST_XDP_LIVE_FRAMES` on a two-instruction XDP
//! program of our own that returns `XDP_TX`; in live-frames mode the kernel turns `XDP_TX` into a
//! redirect out of the generator's veth, so each frame crosses to `ul0` as a real packet. A veth
//! only accepts redirected frames when its NAPI is on, so every `ul0` carries an XDP program
//! that returns `XDP_PASS` (the same for every DUT). The test run processes the frames in batches
//! of 64 and the receiving softirq runs on the generator's CPU when each batch is flushed, so
//! the syscall returns when every frame has been received and judged; the rate is the DUT's drop
//! counter delta (Verse's `VERSE_DROPS`, the nft rule counter, the iptables rule counter) over
//! the wall time of the syscall. The generator thread is pinned to one CPU.
//!
//! Method: the number of frames is calibrated per DUT so one measurement lasts about 0.8 s;
//! DUTs are measured interleaved for 5 rounds; each record is the median Mpps with min, max and
//! the samples in its configuration (ns/packet there too), and each Verse figure again against
//! each peer (`rate_<verse>_vs_<peer>`): Verse's Mpps and the ratio Verse / peer of the rates,
//! higher is better.
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::time::{Duration, Instant};

use ::tests::fleet::VxlanGbp;
use ::tests::{Bpffs, Netns, TempDir};
use anyhow::{bail, ensure, Context, Result};
use dataplane_common::{Config, DropReason};
use serde_json::json;
use verse::compile::{compile, Ids, MapContents};
use verse::dataplane::Dataplane;
use verse::model::{
    self, CreateEndpoint, CreateGroup, CreateUniverse, Direction, HostRecord, Peer, Protocol, Rule,
    State,
};

use crate::bpf;
use crate::results::{BenchRecord, Unit};

const ROUNDS: usize = 5;
const TARGET: Duration = Duration::from_millis(800);
const RULE_COUNTS: [usize; 3] = [10, 1_000, 10_000];
const DUT_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const PEER_HOST_IP: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const UNKNOWN_HOST_IP: Ipv4Addr = Ipv4Addr::new(198, 19, 7, 7);
const SENDER_IP: Ipv4Addr = Ipv4Addr::new(10, 1, 0, 10);
const RECEIVER_IP: Ipv4Addr = Ipv4Addr::new(10, 5, 0, 10);
/// The denied inner destination port: no rule admits UDP at all.
const DENIED_PORT: u16 = 9999;
/// The CPU the generator runs on.
const GEN_CPU: usize = 1;

/// What a DUT counts its drops with.
enum Counter {
    /// `VERSE_DROPS[reason]` of the dataplane at this index.
    Verse(usize, DropReason),
    /// The packet counter of the only counted rule of `netdev vbench in`.
    Nft,
    /// The last rule of the raw table's PREROUTING chain (`iptables-nft` or `iptables-legacy`).
    Iptables(&'static str, usize),
    /// Nothing counts: every frame sent is dropped by `ul0`'s XDP program.
    Sent,
}

struct Dut {
    name: String,
    ns: Netns,
    /// The generator-side veth, in the generator namespace.
    gen_ifindex: u32,
    frame: Vec<u8>,
    counter: Counter,
    config: serde_json::Value,
    _xdp_link: OwnedFd,
    repeat: u32,
    samples: Vec<f64>,
    delivered: Vec<f64>,
}

fn link_json(ns: &Netns, dev: &str) -> Result<serde_json::Value> {
    let out = ns.ip(&["-j", "link", "show", dev]);
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .with_context(|| format!("ip -j link show {dev} in {}", ns.name()))?;
    Ok(v[0].clone())
}

fn mac_of(ns: &Netns, dev: &str) -> Result<[u8; 6]> {
    let v = link_json(ns, dev)?;
    let text = v["address"].as_str().with_context(|| format!("{dev} has no address"))?;
    model::parse_mac(text).with_context(|| format!("MAC of {dev}: {text}"))
}

fn ifindex_of(ns: &Netns, dev: &str) -> Result<u32> {
    let v = link_json(ns, dev)?;
    let i = v["ifindex"].as_u64().with_context(|| format!("{dev} has no ifindex"))?;
    Ok(i as u32)
}

/// Ethernet frame carrying a VXLAN-GBP packet from `outer_src` to this DUT.
fn frame(dst_mac: [u8; 6], src_mac: [u8; 6], outer_src: Ipv4Addr, group: u16, vni: u32) -> Vec<u8> {
    let pkt = VxlanGbp {
        outer_src,
        outer_dst: DUT_IP,
        group,
        vni,
        flags: 0x88,
        inner_dst_mac: [0x02, 0, 0, 0, 0, 1],
        inner_src_mac: [0x02, 0, 0, 0, 0, 2],
        inner_src: SENDER_IP.into(),
        inner_dst: RECEIVER_IP.into(),
        src_port: 40000,
        dst_port: DENIED_PORT,
        payload: vec![0; 18],
    }
    .packet();
    let mut f = Vec::with_capacity(14 + pkt.len());
    f.extend_from_slice(&dst_mac);
    f.extend_from_slice(&src_mac);
    f.extend_from_slice(&[0x08, 0x00]);
    f.extend_from_slice(&pkt);
    f
}

/// `n` ingress TCP rules, none of which admits UDP: distinct (peer, port); peers are 256 /24
/// outside the universe's endpoints and, one rule in ten, the sender's own group (so the
/// identity lookup walks a populated trie and still misses).
fn deny_rules(n: usize, client: &str, first_id: &mut u32) -> Vec<Rule> {
    (0..n)
        .map(|j| {
            *first_id += 1;
            let peer = if j % 10 == 9 {
                Peer::Group(client.to_owned())
            } else {
                Peer::Cidr(
                    format!("172.16.{}.0/24", j % 256).parse().expect("a valid CIDR literal"),
                )
            };
            let port = 1 + (j / 256) as u16 * 7 + (j % 7) as u16;
            Rule {
                id: format!("sgr-{:08x}", *first_id),
                direction: Direction::Ingress,
                protocol: Protocol::TCP,
                ports: Some((port, port + (j % 3) as u16)),
                icmp: None,
                peer,
                description: String::new(),
            }
        })
        .collect()
}

/// The desired state of the DUT host `dut`: a universe, a sender endpoint placed on host
/// `peer` (198.18.0.1), a receiver here whose groups hold `n` rules (1,000 a group, S12).
/// Returns the state, the receiver's id, the sender's identity and the VNI.
fn verse_state(n: usize) -> Result<(State, String, u32, u32)> {
    let mut st = State::default();
    let uni = st
        .create_universe(CreateUniverse {
            name: "rate".into(),
            cidr: Some("10.0.0.0/8".into()),
            cidrs: None,
            ipv6_cidrs: None,
        })
        .map_err(|e| anyhow::anyhow!("create universe: {e}"))?;
    for (name, ip) in [("dut", DUT_IP), ("peer", PEER_HOST_IP)] {
        st.hosts.insert(name.into(), HostRecord::at(name, Some(ip)));
    }
    let group = |st: &mut State, name: String| {
        st.create_group(CreateGroup { universe: uni.id.clone(), name, description: None })
            .map(|g| g.id)
            .map_err(|e| anyhow::anyhow!("create group: {e}"))
    };
    let client = group(&mut st, "client".into())?;
    let mut next_id = 0x5000_0000u32;
    let mut groups = Vec::new();
    for g in 0..n.div_ceil(model::MAX_RULES_PER_GROUP) {
        let id = group(&mut st, format!("rx{g}"))?;
        let sg = st.groups.get_mut(&id).context("group just made")?;
        let count = (n - g * model::MAX_RULES_PER_GROUP).min(model::MAX_RULES_PER_GROUP);
        sg.ingress = deny_rules(count, &client, &mut next_id);
        // Distinct ports per group: shift every rule of this group.
        for r in &mut sg.ingress {
            if let Some((lo, hi)) = r.ports {
                let shift = (g as u16) * 300;
                r.ports = Some((lo + shift, hi + shift));
            }
        }
        groups.push(id);
    }
    let ep = |st: &mut State, host: &str, ip: Ipv4Addr, groups: Vec<String>| {
        st.create_endpoint(
            CreateEndpoint {
                universe: uni.id.clone(),
                host: Some(host.into()),
                netns: format!("w{ip}"),
                ip: ip.to_string(),
                security_groups: Some(groups),
                conntrack_budget: None,
                flow_logs: None,
                ipv6: None,
            },
            host,
        )
        .map_err(|e| anyhow::anyhow!("create endpoint {ip}: {e}"))
    };
    let sender = ep(&mut st, "peer", SENDER_IP, vec![client])?;
    let receiver = ep(&mut st, "dut", RECEIVER_IP, groups)?;
    Ok((st, receiver.id, sender.identity, uni.vni))
}

fn nft_counter(ns: &Netns) -> Result<u64> {
    let out = ns.exec("nft", &["-j", "list", "chain", "netdev", "vbench", "in"]);
    ensure!(
        out.status.success(),
        "nft list chain in {}: {}",
        ns.name(),
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).context("nft -j output")?;
    let items = v["nftables"].as_array().context("nft -j: no nftables array")?;
    for item in items {
        for e in item["rule"]["expr"].as_array().into_iter().flatten() {
            if let Some(p) = e["counter"]["packets"].as_u64() {
                return Ok(p);
            }
        }
    }
    bail!("no counter in netdev vbench in ({})", ns.name())
}

fn iptables_counter(ns: &Netns, bin: &str, rule: usize) -> Result<u64> {
    let num = rule.to_string();
    let out = ns.exec(bin, &["-w", "-t", "raw", "-L", "PREROUTING", &num, "-x", "-v", "-n"]);
    ensure!(
        out.status.success(),
        "{bin} -L in {}: {}",
        ns.name(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let first = text.split_whitespace().next().context("empty iptables -L output")?;
    first.parse().with_context(|| format!("{bin} -L: packet count {first:?}"))
}

fn read_counter(d: &Dut, dps: &[Dataplane]) -> Result<u64> {
    match &d.counter {
        Counter::Verse(i, reason) => Ok(dps[*i].drops()?.get(reason).copied().unwrap_or(0)),
        Counter::Nft => nft_counter(&d.ns),
        Counter::Iptables(bin, rule) => iptables_counter(&d.ns, bin, *rule),
        Counter::Sent => Ok(0),
    }
}

/// Runs `f` on a thread in the generator namespace pinned to `GEN_CPU`.
fn on_generator<T: Send>(gen: &Netns, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    gen.enter(|| {
        // SAFETY: `set` is a zeroed cpu_set_t (all-zero is the empty set) filled by CPU_SET with a
        // CPU below CPU_SETSIZE; pid 0 is the calling thread.
        let rc = unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(GEN_CPU % num_cpus(), &mut set);
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
        };
        ensure!(rc == 0, "sched_setaffinity(CPU {GEN_CPU}): {}", io::Error::last_os_error());
        f()
    })
}

fn num_cpus() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

/// One measurement: `d.repeat` frames; returns (packets/s dropped, fraction of frames counted).
fn measure(gen: &Netns, prog: &OwnedFd, d: &Dut, dps: &[Dataplane]) -> Result<(f64, f64)> {
    let before = read_counter(d, dps)?;
    let elapsed = on_generator(gen, || {
        let t = Instant::now();
        bpf::live_frames(prog, &d.frame, d.gen_ifindex, d.repeat)?;
        Ok(t.elapsed())
    })?;
    let after = read_counter(d, dps)?;
    let counted = match d.counter {
        Counter::Sent => u64::from(d.repeat),
        _ => after.saturating_sub(before),
    };
    ensure!(counted > 0, "{}: no drop counted for {} frames sent", d.name, d.repeat);
    Ok((counted as f64 / elapsed.as_secs_f64(), counted as f64 / f64::from(d.repeat)))
}

fn stats(v: &[f64]) -> (f64, f64, f64) {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    (s[s.len() / 2], s[0], s[s.len() - 1])
}

/// The interface of a DUT namespace as the generator sees it.
struct Plumbed {
    ns: Netns,
    gen_ifindex: u32,
    ul0_ifindex: u32,
    ul0_mac: [u8; 6],
    gen_mac: [u8; 6],
    xdp_link: OwnedFd,
}

/// A DUT namespace `r<i>`, its veth to the generator (`g<i>`), `ul0` up with the underlay address
/// and the XDP program `xdp` (`XDP_PASS` turns the veth's NAPI on; `XDP_DROP` for the floor).
fn plumb(gen: &Netns, i: usize, xdp: &OwnedFd) -> Result<Plumbed> {
    let ns = Netns::new(&format!("r{i}"));
    let g = format!("g{i}");
    gen.ip(&["link", "add", &g, "type", "veth", "peer", "name", "ul0", "netns", ns.name()]);
    gen.ip(&["link", "set", &g, "up"]);
    ns.ip(&["addr", "add", &format!("{DUT_IP}/24"), "dev", "ul0"]);
    ns.ip(&["link", "set", "ul0", "up"]);
    ns.ip(&["link", "set", "lo", "up"]);
    let ul0_ifindex = ifindex_of(&ns, "ul0")?;
    let xdp_link = ns.enter(|| bpf::attach_xdp(xdp, ul0_ifindex))?;
    Ok(Plumbed {
        gen_ifindex: ifindex_of(gen, &g)?,
        ul0_mac: mac_of(&ns, "ul0")?,
        gen_mac: mac_of(gen, &g)?,
        ul0_ifindex,
        xdp_link,
        ns,
    })
}

impl Dut {
    fn new(
        name: String,
        p: Plumbed,
        frame: Vec<u8>,
        counter: Counter,
        config: serde_json::Value,
    ) -> Dut {
        Dut {
            name,
            ns: p.ns,
            gen_ifindex: p.gen_ifindex,
            frame,
            counter,
            config,
            _xdp_link: p.xdp_link,
            repeat: 1000,
            samples: Vec::new(),
            delivered: Vec::new(),
        }
    }
}

/// A DUT running Verse with `n` rules on the receiver; `unknown_host` sends frames from an
/// address that is no host of the fleet instead of the policy-denied ones.
fn verse_dut(
    gen: &Netns,
    i: usize,
    pass: &OwnedFd,
    bpffs: &Path,
    n: usize,
    unknown_host: bool,
    dp_index: usize,
) -> Result<(Dut, Dataplane)> {
    let p = plumb(gen, i, pass)?;
    let (st, receiver, sender_identity, vni) = verse_state(n)?;
    p.ns.ip(&["link", "add", "ep0", "type", "veth", "peer", "name", "ep1"]);
    let ep_ifindex = ifindex_of(&p.ns, "ep0")?;
    let rx_mac = model::parse_mac(&st.endpoints[&receiver].mac).context("receiver MAC")?;
    let config = Config {
        gateway_mac: rx_mac,
        underlay_ifindex: p.ul0_ifindex,
        underlay_ip: DUT_IP.octets(),
        underlay_mtu: 1500,
        ..Config::default()
    };
    let lookup = |ep: &model::Endpoint| (ep.id == receiver).then_some(ep_ifindex);
    let t = Instant::now();
    let desired = compile(&st, "dut", &lookup, &mut Ids::default())
        .map_err(|e| anyhow::anyhow!("compile {n} rules: {e}"))?;
    let compile_s = t.elapsed().as_secs_f64();
    let dir = bpffs.join(format!("d{i}"));
    let dp = p.ns.enter(|| -> Result<Dataplane> {
        let mut dp = Dataplane::load(&dir, &config).context("load the dataplane")?;
        dp.apply(&MapContents::default(), &desired).context("write the maps")?;
        dp.attach_underlay("ul0").context("attach from_underlay to ul0")?;
        Ok(dp)
    })?;
    let rules: usize = st.endpoints[&receiver]
        .security_groups
        .iter()
        .filter_map(|g| st.groups.get(g))
        .map(|g| g.ingress.len())
        .sum();
    let mut c = json!({"filter": "Verse from_underlay at TCX ingress of ul0",
        "rules_of_receiver": rules, "policy_map_entries": desired.policy.len(),
        "cidr_classes": desired.cidrs.len(), "compile_s": compile_s});
    let (name, src, reason) = if unknown_host {
        c["frame"] = json!(format!("VXLAN-GBP from {UNKNOWN_HOST_IP}, no host of the fleet"));
        ("verse_unknown_host".to_owned(), UNKNOWN_HOST_IP, DropReason::UnknownHost)
    } else {
        c["frame"] = json!(format!("VXLAN-GBP from host {PEER_HOST_IP}, sender {SENDER_IP} -> receiver {RECEIVER_IP} UDP {DENIED_PORT}, denied by the receiver's ingress rules"));
        (format!("verse_{n}_rules"), PEER_HOST_IP, DropReason::PolicyIngress)
    };
    c["drop_reason"] = json!(format!("{reason:?}"));
    let f = frame(p.ul0_mac, p.gen_mac, src, sender_identity as u16, vni);
    Ok((Dut::new(name, p, f, Counter::Verse(dp_index, reason), c), dp))
}

fn nft_dut(gen: &Netns, i: usize, pass: &OwnedFd, tmp: &Path, n: Option<usize>) -> Result<Dut> {
    let p = plumb(gen, i, pass)?;
    let mut text = String::from("table netdev vbench {\n");
    let (name, rule) = match n {
        None => ("nft_netdev_drop".to_owned(), "udp dport 4789 counter drop".to_owned()),
        Some(n) => {
            text.push_str("  set deny {\n    type ipv4_addr\n    elements = { ");
            // N addresses, the frame's source among them (the last one).
            for j in 0..n - 1 {
                text.push_str(&format!("100.{}.{}.{}, ", 64 + j / 65536, (j / 256) % 256, j % 256));
            }
            text.push_str(&format!("{PEER_HOST_IP} }}\n  }}\n"));
            (format!("nft_set_{n}"), "ip saddr @deny counter drop".to_owned())
        }
    };
    text.push_str(&format!(
        "  chain in {{\n    type filter hook ingress device \"ul0\" priority 0; policy accept;\n    {rule}\n  }}\n}}\n"
    ));
    let file = tmp.join(format!("{name}.nft"));
    std::fs::write(&file, &text).with_context(|| format!("write {}", file.display()))?;
    let path = file.to_string_lossy().into_owned();
    let out = p.ns.exec("nft", &["-f", &path]);
    ensure!(out.status.success(), "nft -f {path}: {}", String::from_utf8_lossy(&out.stderr));
    let f = frame(p.ul0_mac, p.gen_mac, PEER_HOST_IP, 1, 1);
    let c = json!({"filter": format!("nftables netdev ingress chain on ul0: {rule}"), "set_elements": n});
    Ok(Dut::new(name, p, f, Counter::Nft, c))
}

fn iptables_dut(
    gen: &Netns,
    i: usize,
    pass: &OwnedFd,
    tmp: &Path,
    backend: &'static str,
    n: usize,
) -> Result<Dut> {
    let p = plumb(gen, i, pass)?;
    let mut text = String::from("*raw\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n");
    for j in 0..n {
        text.push_str(&format!(
            "-A PREROUTING -s 100.{}.{}.{}/32 -j ACCEPT\n",
            64 + j / 65536,
            (j / 256) % 256,
            j % 256
        ));
    }
    text.push_str("-A PREROUTING -j DROP\nCOMMIT\n");
    let name = format!("iptables_{backend}_{n}");
    let file = tmp.join(format!("{name}.rules"));
    std::fs::write(&file, &text).with_context(|| format!("write {}", file.display()))?;
    let path = file.to_string_lossy().into_owned();
    let restore = format!("iptables-{backend}-restore");
    let out = p.ns.exec(&restore, &["-w", "10", &path]);
    ensure!(out.status.success(), "{restore} {path}: {}", String::from_utf8_lossy(&out.stderr));
    let f = frame(p.ul0_mac, p.gen_mac, PEER_HOST_IP, 1, 1);
    let bin = if backend == "nft" { "iptables-nft" } else { "iptables-legacy" };
    let c = json!({"filter": format!("{bin}: raw PREROUTING, {n} rules -s <other>/32 -j ACCEPT that do not match, then -j DROP"), "rules": n});
    Ok(Dut::new(name, p, f, Counter::Iptables(bin, n + 1), c))
}

pub fn run(out: &mut Vec<BenchRecord>) -> Result<()> {
    let started = Instant::now();
    let gen = Netns::new("rg");
    let tmp = TempDir::new("rt");
    let bpffs = Bpffs::mount(&tmp.path().join("bpf"));
    let tx = bpf::xdp_return(bpf::XDP_TX, "vbench_tx")?;
    let pass = bpf::xdp_return(bpf::XDP_PASS, "vbench_pass")?;
    let xdp_drop = bpf::xdp_return(bpf::XDP_DROP, "vbench_drop")?;
    let kernel =
        std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_owned();

    let mut duts: Vec<Dut> = Vec::new();
    let mut dps: Vec<Dataplane> = Vec::new();
    let mut i = 0;
    let mut next = || {
        i += 1;
        i
    };
    let p = plumb(&gen, next(), &xdp_drop)?;
    let f = frame(p.ul0_mac, p.gen_mac, PEER_HOST_IP, 1, 1);
    duts.push(Dut::new("floor_xdp_drop".into(), p, f, Counter::Sent,
        json!({"filter": "XDP_DROP on ul0 (no TC, no netfilter): the generator and the veth alone"})));
    let mut verse = vec![(RULE_COUNTS[0], true)];
    verse.extend(RULE_COUNTS.iter().map(|&n| (n, false)));
    for (n, unknown) in verse {
        let (d, dp) = verse_dut(&gen, next(), &pass, bpffs.path(), n, unknown, dps.len())?;
        dps.push(dp);
        duts.push(d);
    }
    duts.push(nft_dut(&gen, next(), &pass, tmp.path(), None)?);
    for &n in &RULE_COUNTS {
        duts.push(nft_dut(&gen, next(), &pass, tmp.path(), Some(n))?);
    }
    for backend in ["nft", "legacy"] {
        for &n in &RULE_COUNTS {
            duts.push(iptables_dut(&gen, next(), &pass, tmp.path(), backend, n)?);
        }
    }
    eprintln!("bench_rate: {} DUTs set up in {:.1} s", duts.len(), started.elapsed().as_secs_f64());

    // Calibrate: a short burst gives the rate, then `repeat` for about TARGET.
    for d in duts.iter_mut() {
        d.repeat = 20_000;
        let (rate, _) = measure(&gen, &tx, d, &dps)?;
        d.repeat = ((rate * TARGET.as_secs_f64()) as u32).clamp(10_000, 50_000_000);
    }
    for round in 0..ROUNDS {
        for d in duts.iter_mut() {
            let (rate, frac) = measure(&gen, &tx, d, &dps)?;
            d.samples.push(rate / 1e6);
            d.delivered.push(frac);
        }
        eprintln!(
            "bench_rate: round {round}: {}",
            duts.iter()
                .map(|d| format!("{} {:.3}", d.name, d.samples[round]))
                .collect::<Vec<_>>()
                .join(", ")
        );
    }

    let common = json!({
        "generator": "BPF_PROG_TEST_RUN, BPF_F_TEST_XDP_LIVE_FRAMES, XDP_TX out of a veth into the DUT's ul0 (XDP_PASS program on ul0 for NAPI)",
        "generator_cpu": GEN_CPU, "rounds": ROUNDS, "statistic": "median of rounds, interleaved",
        "target_seconds_per_sample": TARGET.as_secs_f64(), "kernel": kernel,
        "ns_per_packet": "1e9 / rate: includes the generator and veth (see rate_floor_xdp_drop)",
    });
    let medians: std::collections::BTreeMap<String, f64> =
        duts.iter().map(|d| (d.name.clone(), stats(&d.samples).0)).collect();
    // Peers of each Verse figure: the netdev drop, and at equal N the set and both chains.
    let peers = |name: &str| -> Vec<String> {
        let mut v = vec!["nft_netdev_drop".to_owned()];
        if let Some(n) = name.strip_prefix("verse_").and_then(|s| s.strip_suffix("_rules")) {
            v.push(format!("nft_set_{n}"));
            v.push(format!("iptables_nft_{n}"));
            v.push(format!("iptables_legacy_{n}"));
        }
        v
    };
    for d in &duts {
        let (m, lo, hi) = stats(&d.samples);
        let mut c = common.clone();
        if let (Some(c), Some(e)) = (c.as_object_mut(), d.config.as_object()) {
            c.extend(e.clone());
        }
        c["min_mpps"] = json!(lo);
        c["max_mpps"] = json!(hi);
        c["samples_mpps"] = json!(d.samples);
        c["frames_per_sample"] = json!(d.repeat);
        c["counted_fraction"] = json!(d.delivered);
        c["ns_per_packet"] = json!(1e3 / m);
        c["frame_bytes"] = json!(d.frame.len());
        out.push(BenchRecord::new(&format!("rate_{}", d.name), m, Unit::Mpps, None, c.clone()));
        if d.name.starts_with("verse_") {
            for peer in peers(&d.name) {
                let Some(&pm) = medians.get(&peer) else { continue };
                let ratio = m / pm;
                // The value is Verse's rate, in the unit of the ratio: packets dropped per second.
                let mut rec = BenchRecord::new(
                    &format!("rate_{}_vs_{peer}", d.name),
                    m,
                    Unit::Mpps,
                    Some((&format!("rate_{peer}"), ratio)),
                    json!({"ratio": "Mpps Verse / Mpps peer (medians); above 1 Verse drops faster",
                           "verse_mpps": m, "peer_mpps": pm,
                           "verse_ns_per_packet": 1e3 / m, "peer_ns_per_packet": 1e3 / pm}),
                )
                .with_spread(&d.samples);
                if peer == "nft_netdev_drop" {
                    rec = rec.with_target(">= 2.00x", ratio >= 2.0);
                }
                out.push(rec);
            }
        }
    }
    // The gap to the iptables chains must grow with N.
    for backend in ["nft", "legacy"] {
        let gaps: Vec<f64> = RULE_COUNTS
            .iter()
            .filter_map(|n| {
                Some(
                    medians.get(&format!("verse_{n}_rules"))?
                        / medians.get(&format!("iptables_{backend}_{n}"))?,
                )
            })
            .collect();
        if gaps.len() == RULE_COUNTS.len() {
            let growing = gaps.windows(2).all(|w| w[1] > w[0]);
            let last = gaps[gaps.len() - 1];
            out.push(
                BenchRecord::new(
                    &format!("rate_gap_growth_iptables_{backend}"),
                    last / gaps[0],
                    Unit::Factor,
                    None,
                    json!({"gaps_verse_over_iptables": gaps, "rule_counts": RULE_COUNTS,
                           "value": "gap at the largest N / gap at the smallest N"}),
                )
                .with_target("gap grows with N", growing),
            );
        }
    }
    eprintln!("bench_rate: done in {:.1} s", started.elapsed().as_secs_f64());
    // Links and programs go before the namespaces and the bpffs that hold them.
    drop(duts);
    drop(dps);
    drop(bpffs);
    drop(tmp);
    drop(gen);
    Ok(())
}
