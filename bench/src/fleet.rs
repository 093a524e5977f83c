//! Fleet benchmarks: Verse between hosts against the kernel's own ways of doing the
//! same, every path measured in the same run, interleaved, on the same underlay bridge.
//!
//! Paths between a client workload (10.20.0.10) on one host and a server workload (10.20.0.20)
//! on another, each path the same shape: workload namespace -- veth -- host namespace --
//! underlay bridge (of a [`Fleet`]) -- host namespace -- veth -- workload namespace.
//! - `routed`: static /32 routes, `ip_forward` on, no overlay, no firewall (the floor);
//! - `vxlan_nft`: a kernel VXLAN device (VNI 42, UDP 4789, point to point) in each host
//!   namespace carrying the workloads' traffic, and in each host namespace an nftables forward
//!   chain with conntrack enforcing the same policy as Verse with named sets (established/
//!   related, then the universe's addresses and allowed TCP ports by set lookup, then drop):
//!   the kernel peer of what Verse does;
//! - `verse`: a two-host [`Fleet`], one universe, both workloads in a group admitting the
//!   benchmark's TCP ports.
//!
//! Every path is dual-stack: the workloads are also fd00:20::10 and fd00:20::20, the baselines
//! route IPv6 as they route IPv4 (the routed hosts over IPv6 addresses on the underlay, the
//! VXLAN hosts over IPv6 addresses on the VXLAN device; the same nftables table has the IPv6
//! twin of the IPv4 rule, with an `ipv6_addr` set), and Verse's universe has the IPv6 CIDR and
//! its group the IPv6 twins of the rules.
//!
//! Measurements, the TCP and latency ones at underlay MTU 1500 and again, on a fresh fleet
//! whose underlay is at 9000 before versed starts, at 9000 (records suffixed `_mtu9000`;
//! workload MTUs: routed = underlay, VXLAN and Verse = underlay - 50):
//! - TCP throughput: one iperf3 stream, interleaved rounds, median; Verse against `vxlan_nft`
//!   (target >= 1.1x) and against `routed` (target >= 0.8x). Then the same over IPv6
//!   (`iperf3` to the server's IPv6 address; records `tcp_cross_host_<path>_ipv6`, same
//!   targets), in rounds of their own after IPv4's.
//! - CPU per Gbit/s of the same runs (`tcp_cpu_per_gbps_<path>`): iperf3's own CPU figures of
//!   sender and receiver (`-J`, `cpu_utilization_percent` host_total + remote_total) over the
//!   run's Gbit/s, median of the runs; Verse against `vxlan_nft`. The whole machine's
//!   `/proc/stat` busy time per Gbit/s is kept in the configuration beside it.
//! - Request/response latency: a TCP ping-pong of 64-byte messages (Nagle off) run inside the
//!   namespaces, interleaved rounds pooled, p50 and p99; Verse p99 against `vxlan_nft` p99
//!   (target <= 1.0x).
//! - Edit to enforcement on a three-host fleet (`edit_to_enforce_*`), and on a one-host fleet
//!   with both workloads on that host and the edits through its API
//!   (`edit_to_enforce_one_host_*`): an API call on host 0 either adds an ingress
//!   rule admitting a new TCP port on a workload of host 2, or makes the client workload of
//!   host 1 a member of a group that workload admits (alternating); the time from sending the
//!   call until a connection from the client to that port completes, probed concurrently with
//!   fresh non-blocking connects every millisecond (targets: median < 100 ms, worst < 500 ms).
//!   Each edit is undone (untimed) before the next, so every edit meets the same state.
//!
//! Every namespace, daemon and etcd is owned by a guard and gone when its part returns.
use std::io::{self, Read, Write};
use std::mem;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Barrier;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use serde_json::{json, Value};
use tests::{Fleet, Netns, Workload};

use crate::iperf::{iperf3_run, IperfRun, TCP_SECONDS};
use crate::median;
use crate::results::{BenchRecord, Unit};

const CLIENT_IP: Ipv4Addr = Ipv4Addr::new(10, 20, 0, 10);
const SERVER_IP: Ipv4Addr = Ipv4Addr::new(10, 20, 0, 20);
const UNIVERSE_CIDR: &str = "10.20.0.0/24";
/// The IPv6 twins of the workloads' addresses, the universe's and the gateway's.
const CLIENT_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x20, 0, 0, 0, 0, 0, 0x10);
const SERVER_IP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x20, 0, 0, 0, 0, 0, 0x20);
const UNIVERSE_CIDR6: &str = "fd00:20::/64";
const GATEWAY_IP6: &str = "fd00:20::1";
/// The gateway address each baseline host namespace gives its workload (a /32 on the host side
/// of the veth; every host namespace has its own).
const GATEWAY_IP: &str = "10.20.0.1";
const IPERF_PORT: u16 = 5201;
const RR_PORT: u16 = 7000;
/// Underlay addresses of the baseline hosts (Verse's hosts are 198.18.0.1 and .2).
const ROUTED_HOSTS: [Ipv4Addr; 2] = [Ipv4Addr::new(198, 18, 0, 11), Ipv4Addr::new(198, 18, 0, 12)];
const VXLAN_HOSTS: [Ipv4Addr; 2] = [Ipv4Addr::new(198, 18, 0, 21), Ipv4Addr::new(198, 18, 0, 22)];
const VXLAN_VNI: &str = "42";
/// The underlay MTUs measured; VXLAN over IPv4 costs 50 bytes, as in Verse.
const UNDERLAY_MTUS: [u32; 2] = [1500, 9000];
const VXLAN_OVERHEAD: u32 = 50;

const TCP_ROUNDS: usize = 5;
const RR_MESSAGE: usize = 64;
const RR_WARMUP: usize = 1_000;
const RR_ROUNDS: usize = 40;
const RR_PER_ROUND: usize = 500;

const EDITS: usize = 100;
const EDIT_FIRST_PORT: u16 = 30_000;
/// The port the `members` group is admitted to (membership edits).
const MEMBERS_PORT: u16 = 29_000;
/// How often the prober opens a new connection attempt.
const PROBE_INTERVAL: Duration = Duration::from_millis(1);
/// Attempts kept pending at once (a late SYN-ACK still counts); older ones are closed.
const PROBE_PENDING: usize = 64;
/// An edit not enforced within this time counts as a failure at this value.
const EDIT_TIMEOUT: Duration = Duration::from_secs(5);

/// Runs the parts of the tier for which `part(name)` holds: `cross_host` (throughput, CPU and
/// latency at both MTUs, over IPv4 and IPv6) and `edits` (edit to enforcement).
pub fn run(out: &mut Vec<BenchRecord>, part: &dyn Fn(&str) -> bool) -> Result<()> {
    if part("cross_host") {
        for mtu in UNDERLAY_MTUS {
            cross_host(out, mtu)?;
        }
    }
    if part("edits") {
        edit_to_enforce(out, 3)?;
        edit_to_enforce(out, 1)?;
    }
    Ok(())
}

/// The suffix of the records measured at underlay MTU `mtu`: none at 1500 (the names the
/// stored baseline knows), `_mtu<mtu>` otherwise.
fn mtu_suffix(mtu: u32) -> String {
    if mtu == 1500 {
        String::new()
    } else {
        format!("_mtu{mtu}")
    }
}

// ---------------------------------------------------------------------------------------------
// Testbeds
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, PartialEq, Eq)]
enum Kind {
    Routed,
    VxlanNft,
}

/// Two host namespaces on the fleet's underlay, each with one workload namespace. Dropping it
/// deletes the namespaces (workloads first, then hosts, with every veth and device in them).
struct Baseline {
    client: Netns,
    server: Netns,
    _hosts: [Netns; 2],
}

/// Runs `cmd args` inside `ns` and fails with its output if it fails.
fn ns_run(ns: &Netns, cmd: &str, args: &[&str]) -> Result<()> {
    let out = ns.exec(cmd, args);
    ensure!(
        out.status.success(),
        "{cmd} {args:?} in {}: {}{}",
        ns.name(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

impl Baseline {
    /// The hosts are plugged into `fleet`'s underlay, whose MTU is `underlay_mtu`.
    fn build(fleet: &Fleet, kind: Kind, underlay_mtu: u32) -> Result<Baseline> {
        let underlay = match kind {
            Kind::Routed => ROUTED_HOSTS,
            Kind::VxlanNft => VXLAN_HOSTS,
        };
        let wl_ips = [CLIENT_IP, SERVER_IP];
        let wl_ips6 = [CLIENT_IP6, SERVER_IP6];
        // The routed hosts' IPv6 on the underlay, beside their IPv4 (the VXLAN hosts' is on
        // their VXLAN device).
        let underlay6 = |i: usize| format!("fd00:198:18::{}", underlay[i].octets()[3]);
        let mtu = match kind {
            Kind::Routed => underlay_mtu,
            Kind::VxlanNft => underlay_mtu - VXLAN_OVERHEAD,
        }
        .to_string();
        let hosts = [fleet.underlay_node(underlay[0]), fleet.underlay_node(underlay[1])];
        let workloads = [Netns::new("w"), Netns::new("w")];
        for i in 0..2 {
            let (host, wl, other) = (&hosts[i], &workloads[i], 1 - i);
            ns_run(host, "sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
            ns_run(host, "sysctl", &["-qw", "net.ipv6.conf.all.forwarding=1"])?;
            tests::run_ok(
                "ip",
                &[
                    "link",
                    "add",
                    "w0",
                    "netns",
                    host.name(),
                    "type",
                    "veth",
                    "peer",
                    "name",
                    "eth0",
                    "netns",
                    wl.name(),
                ],
            );
            host.ip(&["addr", "add", &format!("{GATEWAY_IP}/32"), "dev", "w0"]);
            // Both ends of the veth at the workload's MTU: a veth drops what exceeds its peer's.
            host.ip(&["link", "set", "w0", "mtu", &mtu, "up"]);
            host.ip(&["route", "add", &format!("{}/32", wl_ips[i]), "dev", "w0"]);
            wl.ip(&["addr", "add", &format!("{}/32", wl_ips[i]), "dev", "eth0"]);
            wl.ip(&["link", "set", "eth0", "mtu", &mtu, "up"]);
            wl.ip(&["route", "add", "default", "via", GATEWAY_IP, "dev", "eth0", "onlink"]);
            // IPv6 the same way (no duplicate address detection: usable at once).
            host.ip(&["-6", "addr", "add", &format!("{GATEWAY_IP6}/128"), "dev", "w0", "nodad"]);
            host.ip(&["-6", "route", "add", &format!("{}/128", wl_ips6[i]), "dev", "w0"]);
            wl.ip(&["-6", "addr", "add", &format!("{}/128", wl_ips6[i]), "dev", "eth0", "nodad"]);
            wl.ip(&["-6", "route", "add", "default", "via", GATEWAY_IP6, "dev", "eth0", "onlink"]);
            let peer_wl = format!("{}/32", wl_ips[other]);
            let peer_wl6 = format!("{}/128", wl_ips6[other]);
            match kind {
                Kind::Routed => {
                    host.ip(&["route", "add", &peer_wl, "via", &underlay[other].to_string()]);
                    let ul = tests::fleet::UNDERLAY_IFACE;
                    host.ip(&[
                        "-6",
                        "addr",
                        "add",
                        &format!("{}/64", underlay6(i)),
                        "dev",
                        ul,
                        "nodad",
                    ]);
                    host.ip(&["-6", "route", "add", &peer_wl6, "via", &underlay6(other)]);
                }
                Kind::VxlanNft => {
                    host.ip(&[
                        "link",
                        "add",
                        "vx0",
                        "type",
                        "vxlan",
                        "id",
                        VXLAN_VNI,
                        "dstport",
                        "4789",
                        "local",
                        &underlay[i].to_string(),
                        "remote",
                        &underlay[other].to_string(),
                        "dev",
                        tests::fleet::UNDERLAY_IFACE,
                    ]);
                    host.ip(&["addr", "add", &format!("10.99.0.{}/24", i + 1), "dev", "vx0"]);
                    host.ip(&["link", "set", "vx0", "mtu", &mtu, "up"]);
                    host.ip(&["route", "add", &peer_wl, "via", &format!("10.99.0.{}", other + 1)]);
                    let vx6 = |j: usize| format!("fd00:99::{}", j + 1);
                    host.ip(&[
                        "-6",
                        "addr",
                        "add",
                        &format!("{}/64", vx6(i)),
                        "dev",
                        "vx0",
                        "nodad",
                    ]);
                    host.ip(&["-6", "route", "add", &peer_wl6, "via", &vx6(other)]);
                    load_nft(host)?;
                }
            }
        }
        let [client, server] = workloads;
        Ok(Baseline { client, server, _hosts: hosts })
    }
}

/// The nftables peer of the Verse policy of this benchmark, in a host namespace's forward path,
/// written with named sets as a policy for many peers would be (the universe's addresses, the
/// allowed TCP ports): replies and related packets of tracked flows pass, new flows only to the
/// allowed TCP ports within the universe (its IPv4 and its IPv6 addresses, each family in a set
/// of its own), everything else is dropped.
fn load_nft(host: &Netns) -> Result<()> {
    let ruleset = format!(
        "table inet verse_bench {{\n\
         \tset universe {{\n\
         \t\ttype ipv4_addr; flags interval;\n\
         \t\telements = {{ {UNIVERSE_CIDR} }}\n\
         \t}}\n\
         \tset universe6 {{\n\
         \t\ttype ipv6_addr; flags interval;\n\
         \t\telements = {{ {UNIVERSE_CIDR6} }}\n\
         \t}}\n\
         \tset allowed_tcp {{\n\
         \t\ttype inet_service;\n\
         \t\telements = {{ {IPERF_PORT}, {RR_PORT} }}\n\
         \t}}\n\
         \tchain forward {{\n\
         \t\ttype filter hook forward priority filter; policy drop;\n\
         \t\tct state established,related accept\n\
         \t\tip saddr @universe ip daddr @universe tcp dport @allowed_tcp accept\n\
         \t\tip6 saddr @universe6 ip6 daddr @universe6 tcp dport @allowed_tcp accept\n\
         \t}}\n\
         }}\n"
    );
    let path = std::env::temp_dir().join(format!("{}.nft", host.name()));
    std::fs::write(&path, ruleset).with_context(|| format!("write {}", path.display()))?;
    let loaded = ns_run(host, "nft", &["-f", &path.to_string_lossy()]);
    let _ = std::fs::remove_file(&path);
    loaded
}

/// A path under test: its record suffix and the two workload namespaces.
struct Path<'a> {
    name: &'static str,
    client: &'a Netns,
    server: &'a Netns,
}

fn id(v: &Value, what: &str) -> Result<String> {
    v["id"].as_str().map(str::to_owned).ok_or_else(|| anyhow!("{what} has no id: {v}"))
}

/// The API answer `r` must have status `want`; returns its JSON body.
fn expect(r: io::Result<tests::Response>, want: u16, what: &str) -> Result<Value> {
    let r = r.with_context(|| what.to_owned())?;
    ensure!(r.status == want, "{what}: status {} (want {want}): {}", r.status, r.body);
    Ok(if r.body.trim().is_empty() { Value::Null } else { r.json() })
}

// ---------------------------------------------------------------------------------------------
// Throughput and latency across two hosts
// ---------------------------------------------------------------------------------------------

fn cross_host(out: &mut Vec<BenchRecord>, underlay_mtu: u32) -> Result<()> {
    let sfx = mtu_suffix(underlay_mtu);
    let overlay_mtu = underlay_mtu - VXLAN_OVERHEAD;
    // Declared first, dropped last: the baselines hang off its underlay bridge. The underlay's
    // MTU is set before versed starts, since versed derives its endpoints' MTU from it then.
    let fleet = Fleet::start_with_underlay_mtu(2, underlay_mtu);
    let api = fleet.api(0);
    let universe = json!({"name": "bench", "cidr": UNIVERSE_CIDR, "ipv6_cidrs": [UNIVERSE_CIDR6]});
    let uni =
        id(&expect(Ok(api.post("/v1/universes", &universe)), 201, "create universe")?, "universe")?;
    let group = id(&api.create_group(&uni, "bench"), "group")?;
    for port in [IPERF_PORT, RR_PORT] {
        for cidr in [UNIVERSE_CIDR, UNIVERSE_CIDR6] {
            api.add_rule(
                &group,
                &json!({"direction": "ingress", "protocol": "tcp", "from_port": port,
                        "to_port": port, "cidr": cidr}),
            );
        }
    }
    let dual = |ip: Ipv4Addr, ip6: Ipv6Addr| (ip.to_string(), ip6.to_string());
    let (c4, c6) = dual(CLIENT_IP, CLIENT_IP6);
    let (s4, s6) = dual(SERVER_IP, SERVER_IP6);
    let v_client: Workload = fleet.endpoint6(0, &uni, (&c4, &c6), &[&group]);
    let v_server: Workload = fleet.endpoint6(1, &uni, (&s4, &s6), &[&group]);
    let verse_mtu = workload_mtu(v_client.ns())?;
    ensure!(
        verse_mtu == overlay_mtu,
        "Verse gave its workload MTU {verse_mtu} on an underlay of MTU {underlay_mtu} \
         (want {overlay_mtu})"
    );
    let routed = Baseline::build(&fleet, Kind::Routed, underlay_mtu)?;
    let vxlan = Baseline::build(&fleet, Kind::VxlanNft, underlay_mtu)?;
    let paths = [
        Path { name: "routed", client: &routed.client, server: &routed.server },
        Path { name: "vxlan_nft", client: &vxlan.client, server: &vxlan.server },
        Path { name: "verse", client: v_client.ns(), server: v_server.ns() },
    ];

    // Throughput, and what it cost in CPU: over IPv4, then over IPv6.
    for (fam, server) in [("", IpAddr::V4(SERVER_IP)), ("_ipv6", IpAddr::V6(SERVER_IP6))] {
        throughput(out, &paths, (underlay_mtu, verse_mtu), fam, server)?;
    }

    // Request/response latency.
    // One warmed-up connection per path, then short interleaved rounds, so that the noise of
    // the shared machine (bursts last seconds) falls on every path alike.
    let mut conns = Vec::with_capacity(paths.len());
    for p in &paths {
        conns.push(PingPong::open(p.client, p.server).with_context(|| p.name)?);
    }
    let mut samples: Vec<Vec<u32>> =
        vec![Vec::with_capacity(RR_ROUNDS * RR_PER_ROUND); paths.len()];
    for _ in 0..RR_ROUNDS {
        for ((p, c), s) in paths.iter().zip(conns.iter_mut()).zip(samples.iter_mut()) {
            c.round_trips(RR_PER_ROUND, s).with_context(|| p.name)?;
        }
    }
    for (p, c) in paths.iter().zip(conns) {
        c.close().with_context(|| p.name)?;
    }
    let mut stats = Vec::new();
    for (p, s) in paths.iter().zip(samples.iter_mut()) {
        s.sort_unstable();
        let pct = |q: usize| f64::from(s[(s.len() * q / 100).min(s.len() - 1)]) / 1000.0;
        stats.push((p.name, pct(50), pct(99), f64::from(s[s.len() - 1]) / 1000.0));
        eprintln!(
            "bench_fleet: mtu {underlay_mtu} rr {}: p50 {:.1} us, p99 {:.1} us, max {:.1} us",
            p.name,
            pct(50),
            pct(99),
            f64::from(s[s.len() - 1]) / 1000.0
        );
    }
    let config = json!({
        "method": "TCP ping-pong over one connection per path (opened and warmed up first), \
                   TCP_NODELAY, client socket made in the client workload's namespace, server \
                   thread in the server's; one message written, the same size read back",
        "message_bytes": RR_MESSAGE, "warmup_round_trips": RR_WARMUP, "rounds": RR_ROUNDS,
        "round_trips_per_round": RR_PER_ROUND,
        "statistic": "percentile of all round trips of all interleaved rounds",
        "underlay_mtu": underlay_mtu,
        "max_us": stats.iter().map(|(n, _, _, m)| (n.to_string(), json!(m)))
            .collect::<serde_json::Map<_, _>>(),
    });
    let (v50, v99) = (stats[2].1, stats[2].2);
    let (x50, x99) = (stats[1].1, stats[1].2);
    for (name, p50, p99, _) in &stats {
        let (b50, b99) = if *name == "verse" {
            (
                Some((format!("rr_latency_p50_vxlan_nft{sfx}"), v50 / x50)),
                Some((format!("rr_latency_p99_vxlan_nft{sfx}"), v99 / x99)),
            )
        } else {
            (None, None)
        };
        let b50 = b50.as_ref().map(|(b, r)| (b.as_str(), *r));
        let b99 = b99.as_ref().map(|(b, r)| (b.as_str(), *r));
        out.push(BenchRecord::new(
            &format!("rr_latency_p50_{name}{sfx}"),
            *p50,
            Unit::Us,
            b50,
            config.clone(),
        ));
        let p99_rec = BenchRecord::new(
            &format!("rr_latency_p99_{name}{sfx}"),
            *p99,
            Unit::Us,
            b99,
            config.clone(),
        );
        out.push(if *name == "verse" {
            p99_rec.with_target("<= 1.00x", v99 / x99 <= 1.0)
        } else {
            p99_rec
        });
    }
    Ok(())
}

/// The TCP throughput of `paths` (routed, VXLAN + nftables, Verse) to the server's address
/// `server` at underlay MTU `underlay_mtu` (the workloads of Verse at `verse_mtu`), and its CPU
/// cost: interleaved rounds, records named with `fam` (`""` for IPv4, `"_ipv6"`) and the MTU's
/// suffix.
fn throughput(
    out: &mut Vec<BenchRecord>,
    paths: &[Path],
    (underlay_mtu, verse_mtu): (u32, u32),
    fam: &str,
    server: IpAddr,
) -> Result<()> {
    let sfx = format!("{fam}{}", mtu_suffix(underlay_mtu));
    let overlay_mtu = underlay_mtu - VXLAN_OVERHEAD;
    let mut runs: Vec<Vec<IperfRun>> = vec![Vec::new(); paths.len()];
    for round in 0..TCP_ROUNDS {
        let mut line = format!("bench_fleet: mtu {underlay_mtu} tcp{fam} round {round}:");
        for (p, r) in paths.iter().zip(runs.iter_mut()) {
            let run = iperf3_run(p.client, p.server, server).with_context(|| p.name)?;
            line += &format!(
                " {} {:.2} Gbit/s ({:.0}% + {:.0}% CPU)",
                p.name, run.gbps, run.client_cpu_pct, run.server_cpu_pct
            );
            r.push(run);
        }
        eprintln!("{line}");
    }
    let gbps_runs: Vec<Vec<f64>> =
        runs.iter().map(|r| r.iter().map(|x| x.gbps).collect()).collect();
    // CPU per Gbit/s of each run: both iperf3 processes' CPU (sender and receiver, in percent
    // of one CPU) over the run's throughput; the statistic is the median of the runs' ratios.
    let cpu_runs: Vec<Vec<f64>> = runs
        .iter()
        .map(|r| r.iter().map(|x| (x.client_cpu_pct + x.server_cpu_pct) / x.gbps).collect())
        .collect();
    let machine_cpu_runs: Vec<Vec<f64>> =
        runs.iter().map(|r| r.iter().map(|x| x.machine_cpu_pct / x.gbps).collect()).collect();
    let per_path = |v: &[Vec<f64>]| {
        paths
            .iter()
            .zip(v)
            .map(|(p, xs)| (p.name.to_owned(), json!(xs)))
            .collect::<serde_json::Map<_, _>>()
    };
    let gbps: Vec<f64> = gbps_runs.iter().map(|r| median(r.clone())).collect();
    let config = json!({
        "tool": "iperf3", "streams": 1, "seconds": TCP_SECONDS, "rounds": TCP_ROUNDS,
        "statistic": "median of interleaved rounds", "server": server.to_string(),
        "underlay": format!("veth pairs on one Linux bridge, MTU {underlay_mtu} (set before \
                             versed starts)"),
        "underlay_mtu": underlay_mtu,
        "workload_mtu": {"routed": underlay_mtu, "vxlan_nft": overlay_mtu, "verse": verse_mtu},
        "vxlan_nft": "kernel vxlan device (VNI 42, dstport 4789, point to point) + nftables \
                      forward chain with named sets: ct established,related accept; ip saddr \
                      @universe ip daddr @universe tcp dport @allowed_tcp accept; ip6 saddr \
                      @universe6 ip6 daddr @universe6 tcp dport @allowed_tcp accept; policy drop",
        "runs_gbps": per_path(&gbps_runs),
    });
    let [routed_g, vxlan_g, verse_g] = [gbps[0], gbps[1], gbps[2]];
    let name = |base: &str| format!("{base}{sfx}");
    out.push(
        BenchRecord::new(
            &name("tcp_cross_host_routed"),
            routed_g,
            Unit::Gbps,
            None,
            config.clone(),
        )
        .with_spread(&gbps_runs[0]),
    );
    out.push(
        BenchRecord::new(
            &name("tcp_cross_host_vxlan_nft"),
            vxlan_g,
            Unit::Gbps,
            Some((&name("tcp_cross_host_routed"), vxlan_g / routed_g)),
            config.clone(),
        )
        .with_spread(&gbps_runs[1]),
    );
    out.push(
        BenchRecord::new(
            &name("tcp_cross_host_verse"),
            verse_g,
            Unit::Gbps,
            Some((&name("tcp_cross_host_vxlan_nft"), verse_g / vxlan_g)),
            config.clone(),
        )
        .with_spread(&gbps_runs[2])
        .with_target(">= 1.10x", verse_g / vxlan_g >= 1.1),
    );
    // The ratio record's name keeps `_vs_routed` last, as the tables read it.
    out.push(
        BenchRecord::new(
            &format!("tcp_cross_host_verse{sfx}_vs_routed"),
            verse_g,
            Unit::Gbps,
            Some((&name("tcp_cross_host_routed"), verse_g / routed_g)),
            config,
        )
        .with_spread(&gbps_runs[2])
        .with_target(">= 0.80x", verse_g / routed_g >= 0.8),
    );

    let cpu: Vec<f64> = cpu_runs.iter().map(|r| median(r.clone())).collect();
    let machine_cpu: Vec<f64> = machine_cpu_runs.iter().map(|r| median(r.clone())).collect();
    let config = json!({
        "tool": "iperf3 -J", "streams": 1, "seconds": TCP_SECONDS, "rounds": TCP_ROUNDS,
        "underlay_mtu": underlay_mtu,
        "method": "per run: (cpu_utilization_percent.host_total + remote_total) / Gbit/s, i.e. \
                   the CPU time of the sending and the receiving iperf3 process (user + system, \
                   in percent of one CPU) per Gbit/s; the statistic is the median of the runs",
        "caveat": "softirq work the kernel accounts to no process (e.g. on another CPU) is not \
                   in iperf3's figure; machine_cpu_pct_per_gbps has the whole machine's busy \
                   time from /proc/stat over the run, which other work on the shared machine \
                   also fills",
        "machine_cpu_pct_per_gbps": per_path(&machine_cpu_runs),
        "machine_cpu_pct_per_gbps_median": paths.iter().zip(&machine_cpu)
            .map(|(p, m)| (p.name.to_owned(), json!(m)))
            .collect::<serde_json::Map<_, _>>(),
        "samples": per_path(&cpu_runs),
    });
    for (i, p) in paths.iter().enumerate() {
        let baseline = match p.name {
            "verse" => Some((name("tcp_cpu_per_gbps_vxlan_nft"), cpu[2] / cpu[1])),
            "vxlan_nft" => Some((name("tcp_cpu_per_gbps_routed"), cpu[1] / cpu[0])),
            _ => None,
        };
        out.push(
            BenchRecord::new(
                &name(&format!("tcp_cpu_per_gbps_{}", p.name)),
                cpu[i],
                Unit::CpuPctPerGbps,
                baseline.as_ref().map(|(b, r)| (b.as_str(), *r)),
                config.clone(),
            )
            .with_spread(&cpu_runs[i]),
        );
    }

    Ok(())
}

/// The MTU of `eth0` in the workload namespace `ns`.
fn workload_mtu(ns: &Netns) -> Result<u32> {
    let out = ns.exec("cat", &["/sys/class/net/eth0/mtu"]);
    ensure!(out.status.success(), "read eth0's MTU in {}", ns.name());
    let text = String::from_utf8_lossy(&out.stdout);
    text.trim().parse().with_context(|| format!("eth0's MTU in {}: {text:?}", ns.name()))
}

/// A TCP ping-pong connection across one path: a server thread echoing `RR_MESSAGE`-byte
/// messages on `RR_PORT` in the server workload's namespace, and a client socket made in the
/// client's (a socket keeps its namespace, so the rounds run on the calling thread).
struct PingPong {
    stream: TcpStream,
    echo: std::thread::JoinHandle<io::Result<()>>,
}

impl PingPong {
    /// Connects and runs `RR_WARMUP` unmeasured round trips.
    fn open(client: &Netns, server: &Netns) -> Result<PingPong> {
        let listen = SocketAddr::from((SERVER_IP, RR_PORT));
        let listener = server
            .enter(|| TcpListener::bind(listen))
            .with_context(|| format!("bind {listen} in {}", server.name()))?;
        let echo = std::thread::spawn(move || -> io::Result<()> {
            let (mut s, _) = listener.accept()?;
            s.set_nodelay(true)?;
            let mut buf = [0u8; RR_MESSAGE];
            loop {
                match s.read_exact(&mut buf) {
                    Ok(()) => s.write_all(&buf)?,
                    Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
                    Err(e) => return Err(e),
                }
            }
        });
        let connected = client
            .enter(|| TcpStream::connect_timeout(&listen, Duration::from_secs(5)))
            .and_then(|s| {
                s.set_nodelay(true)?;
                s.set_read_timeout(Some(Duration::from_secs(10)))?;
                Ok(s)
            });
        let stream = match connected {
            Ok(s) => s,
            Err(e) => {
                // Wake the server's accept from its own namespace so its thread ends.
                let _ =
                    server.enter(|| TcpStream::connect_timeout(&listen, Duration::from_secs(1)));
                let _ = echo.join();
                bail!("connect from {} to {listen}: {e}", client.name());
            }
        };
        let mut pp = PingPong { stream, echo };
        let mut warmup = Vec::with_capacity(RR_WARMUP);
        pp.round_trips(RR_WARMUP, &mut warmup)?;
        Ok(pp)
    }

    /// `n` round trips, appending the nanoseconds of each to `times`.
    fn round_trips(&mut self, n: usize, times: &mut Vec<u32>) -> Result<()> {
        let msg = [0x5au8; RR_MESSAGE];
        let mut buf = [0u8; RR_MESSAGE];
        for _ in 0..n {
            let t = Instant::now();
            self.stream.write_all(&msg).context("ping-pong write")?;
            self.stream.read_exact(&mut buf).context("ping-pong read")?;
            times.push(u32::try_from(t.elapsed().as_nanos()).unwrap_or(u32::MAX));
        }
        Ok(())
    }

    /// Closes the connection and collects the server thread.
    fn close(self) -> Result<()> {
        drop(self.stream);
        let served = self.echo.join().map_err(|_| anyhow!("ping-pong server thread panicked"))?;
        served.context("ping-pong server")
    }
}

// ---------------------------------------------------------------------------------------------
// Edit to enforcement across three hosts
// ---------------------------------------------------------------------------------------------

/// Edit to enforcement on a fleet of `hosts` hosts (3: client on host 1, target on host 2, API
/// of host 0; 1: everything on the one host, edited through its own API).
fn edit_to_enforce(out: &mut Vec<BenchRecord>, hosts: usize) -> Result<()> {
    let fleet = Fleet::start(hosts);
    let (client_host, server_host) = (1 % hosts, 2 % hosts);
    let api = fleet.api(0);
    let uni = id(&api.create_universe("edits", UNIVERSE_CIDR), "universe")?;
    let clients = id(&api.create_group(&uni, "clients"), "group")?;
    let members = id(&api.create_group(&uni, "members"), "group")?;
    let target = id(&api.create_group(&uni, "target"), "group")?;
    api.add_rule(
        &target,
        &json!({"direction": "ingress", "protocol": "tcp", "from_port": MEMBERS_PORT,
                "to_port": MEMBERS_PORT, "group": members}),
    );
    let client = fleet.endpoint(client_host, &uni, &CLIENT_IP.to_string(), &[&clients]);
    let server = fleet.endpoint(server_host, &uni, &SERVER_IP.to_string(), &[&target]);
    let _members_listener = listen(&server.ns, MEMBERS_PORT)?;

    // The probe must see a denied port as denied, or every figure below would be zero: a port
    // with no rule, and the members' port while the client is not a member.
    for port in [EDIT_FIRST_PORT - 1, MEMBERS_PORT] {
        let _l = (port != MEMBERS_PORT).then(|| listen(&server.ns, port)).transpose()?;
        let deadline = Instant::now() + Duration::from_millis(300);
        let got = probe(&client.ns, port, &Barrier::new(1), deadline)?;
        ensure!(got.is_none(), "port {port} is closed to the client, yet a connection completed");
    }

    let endpoint_path = format!("/v1/endpoints/{}", client.id);
    let rules_path = format!("/v1/security-groups/{target}/rules");
    let mut ms: [Vec<f64>; 2] = [Vec::new(), Vec::new()];
    let mut api_ms = Vec::with_capacity(EDITS);
    let mut failures = 0usize;
    for i in 0..EDITS {
        // Even edits add a rule for a new port; odd edits make the client a member of the
        // group the members' port admits.
        let membership = i % 2 == 1;
        let (port, _listener) = if membership {
            (MEMBERS_PORT, None)
        } else {
            let port = EDIT_FIRST_PORT + u16::try_from(i).context("edit count")?;
            (port, Some(listen(&server.ns, port)?))
        };
        let (method, path, body, want) = if membership {
            ("PATCH", &endpoint_path, json!({"security_groups": [&clients, &members]}), 200)
        } else {
            let rule = json!({"direction": "ingress", "protocol": "tcp", "from_port": port,
                              "to_port": port, "group": clients});
            ("POST", &rules_path, rule, 201)
        };
        let ready = Barrier::new(2);
        let (probed, answered, answer) = std::thread::scope(|s| {
            let prober = s.spawn(|| {
                let deadline = Instant::now() + EDIT_TIMEOUT + Duration::from_secs(1);
                probe(&client.ns, port, &ready, deadline)
            });
            ready.wait();
            let start = Instant::now();
            let r = api.request(method, path, Some(&body), Duration::from_secs(30));
            let answered = start.elapsed();
            let probed = prober.join().map_err(|_| anyhow!("prober panicked"));
            (probed.map(|p| p.map(|t| t.map(|t| t.saturating_duration_since(start)))), answered, r)
        });
        let answer = expect(answer, want, &format!("{method} {path} (edit {i})"))?;
        api_ms.push(answered.as_secs_f64() * 1e3);
        let kind = usize::from(membership);
        match probed?? {
            Some(t) if t <= EDIT_TIMEOUT => ms[kind].push(t.as_secs_f64() * 1e3),
            _ => {
                failures += 1;
                ms[kind].push(EDIT_TIMEOUT.as_secs_f64() * 1e3);
            }
        }
        // Untimed: undo the edit so every edit meets the same state.
        if membership {
            expect(
                api.request(
                    "PATCH",
                    &endpoint_path,
                    Some(&json!({"security_groups": [&clients]})),
                    Duration::from_secs(30),
                ),
                200,
                "PATCH endpoint back to clients only",
            )?;
        } else {
            let rule_id = id(&answer, "rule")?;
            expect(
                api.request(
                    "DELETE",
                    &format!("{rules_path}/{rule_id}"),
                    None,
                    Duration::from_secs(30),
                ),
                204,
                "DELETE rule",
            )?;
        }
    }
    let all: Vec<f64> = ms.iter().flatten().copied().collect();
    let worst_of = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    let (med, worst) = (median(all.clone()), worst_of(&all));
    eprintln!(
        "bench_fleet: {hosts} host(s), {EDITS} edits: median {med:.1} ms, worst {worst:.1} ms \
         ({failures} failures)"
    );
    let placement = if hosts == 1 {
        "client and target workloads on host 0, API of host 0".to_owned()
    } else {
        format!(
            "client workload on host {client_host}, target workload on host {server_host}, \
                 API of host 0"
        )
    };
    let config = json!({
        "hosts": hosts, "store": "etcd (three members, one process each, on the underlay bridge)",
        "edits": EDITS,
        "edit_kinds": {
            "rule": "POST /v1/security-groups/{target}/rules on host 0: ingress TCP <new port> \
                     from group clients; deleted again (untimed) before the next edit",
            "membership": "PATCH /v1/endpoints/{client} on host 0 adding group members, which \
                           target admits on one TCP port; undone (untimed) before the next edit",
            "order": "alternating, rule first",
        },
        "placement": placement,
        "clock": "from sending the API request until a TCP handshake from the client completes",
        "probe": format!("a new non-blocking connect every {} ms, up to {PROBE_PENDING} pending",
                         PROBE_INTERVAL.as_millis()),
        "timeout_ms": EDIT_TIMEOUT.as_millis(), "failures": failures,
        "rule_ms_median": median(ms[0].clone()), "rule_ms_worst": worst_of(&ms[0]),
        "membership_ms_median": median(ms[1].clone()), "membership_ms_worst": worst_of(&ms[1]),
        "api_answer_ms_median": median(api_ms.clone()),
        "api_answer_ms_worst": worst_of(&api_ms),
        "runs_ms": {"rule": ms[0], "membership": ms[1]},
    });
    // The three-host figures keep the names the stored baseline knows.
    let prefix = if hosts == 1 { "edit_to_enforce_one_host" } else { "edit_to_enforce" };
    out.push(
        BenchRecord::new(&format!("{prefix}_median_ms"), med, Unit::Ms, None, config.clone())
            .with_target("< 100 ms", med < 100.0),
    );
    out.push(
        BenchRecord::new(&format!("{prefix}_worst_ms"), worst, Unit::Ms, None, config)
            .with_target("< 500 ms", worst < 500.0),
    );
    Ok(())
}

/// A listener on `port` in `ns` (the kernel completes handshakes into its backlog; nobody needs
/// to accept them).
fn listen(ns: &Netns, port: u16) -> Result<TcpListener> {
    let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, port));
    ns.enter(|| TcpListener::bind(addr)).with_context(|| format!("bind {addr} in {}", ns.name()))
}

/// From inside `ns`, after meeting `ready`: opens a non-blocking TCP connection to the server's
/// `port` every [`PROBE_INTERVAL`] (keeping up to [`PROBE_PENDING`] attempts pending, since a
/// denied SYN is dropped silently and a late SYN-ACK still counts) until one completes; returns
/// when, or `None` at `deadline`.
fn probe(ns: &Netns, port: u16, ready: &Barrier, deadline: Instant) -> Result<Option<Instant>> {
    ns.enter(|| {
        ready.wait();
        let mut pending: Vec<OwnedFd> = Vec::with_capacity(PROBE_PENDING);
        let mut last_attempt: Option<Instant> = None;
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Ok(None);
            }
            if last_attempt.is_none_or(|t| now.duration_since(t) >= PROBE_INTERVAL) {
                if pending.len() == PROBE_PENDING {
                    pending.remove(0);
                }
                pending.push(connect_nonblocking(SERVER_IP, port)?);
                last_attempt = Some(now);
            }
            let mut fds: Vec<libc::pollfd> = pending
                .iter()
                .map(|fd| libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLOUT, revents: 0 })
                .collect();
            let wait = PROBE_INTERVAL.saturating_sub(now.elapsed());
            let wait_ms = i32::try_from(wait.as_millis().max(1)).unwrap_or(1);
            // SAFETY: `fds` is a valid array of `fds.len()` pollfd structures that outlives the
            // call, and every descriptor in it is open (owned by `pending`).
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, wait_ms) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                bail!("poll: {e}");
            }
            if n == 0 {
                continue;
            }
            let done = Instant::now();
            let mut failed = Vec::new();
            for (k, p) in fds.iter().enumerate() {
                if p.revents == 0 {
                    continue;
                }
                match socket_error(p.fd)? {
                    0 if p.revents & libc::POLLOUT != 0 => return Ok(Some(done)),
                    _ => failed.push(k),
                }
            }
            // Refused or reset attempts are finished: close them.
            for k in failed.into_iter().rev() {
                pending.remove(k);
            }
        }
    })
}

/// A non-blocking TCP socket with a connection to `ip:port` under way.
fn connect_nonblocking(ip: Ipv4Addr, port: u16) -> Result<OwnedFd> {
    // SAFETY: socket(2) has no memory preconditions; the result is checked before use.
    let raw = unsafe {
        libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC, 0)
    };
    if raw < 0 {
        bail!("socket(AF_INET, SOCK_STREAM): {}", io::Error::last_os_error());
    }
    // SAFETY: `raw` is a descriptor we just opened and nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let sa = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr { s_addr: u32::from(ip).to_be() },
        sin_zero: [0; 8],
    };
    // SAFETY: `sa` is a valid sockaddr_in whose size is passed along; `fd` is open.
    let rc = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            (&sa as *const libc::sockaddr_in).cast(),
            mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        let e = io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINPROGRESS) {
            bail!("connect to {ip}:{port}: {e}");
        }
    }
    Ok(fd)
}

/// `SO_ERROR` of a socket: 0 once a non-blocking connect has completed.
fn socket_error(fd: i32) -> Result<i32> {
    let mut err: libc::c_int = 0;
    let mut len = mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `err` and `len` are valid for writes of the sizes given; `fd` is an open socket.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ERROR,
            (&mut err as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        bail!("getsockopt(SO_ERROR): {}", io::Error::last_os_error());
    }
    Ok(err)
}
