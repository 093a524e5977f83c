//! `cargo xtask bench`: the benchmarks, separate from the tests. Every figure is reported with a
//! ratio to a baseline measured in the same run (the machine is shared and noisy), and written
//! with its configuration to `target/bench/results.json`.
//!
//! - Micro (`bench_micro`): ns per packet of `from_endpoint` through BPF_PROG_TEST_RUN.
//! - TCP: one iperf3 stream between two endpoints on one host through Verse, against the same
//!   two namespaces joined by a bare veth pair with no program at all.
//! - Fleet (`bench_fleet`): across hosts, TCP throughput (with CPU per Gbit/s) and
//!   request/response latency against plain routing and kernel VXLAN + nftables at underlay
//!   MTU 1500 and 9000, and edit-to-enforcement time on one host and on three.
//! - Rate (`bench_rate`): denied traffic dropped on the underlay, against nftables and iptables.
//! - Control (`bench_control`): compiling and loading rules, against `nft -f` and
//!   `iptables-restore`.
//!
//! It also writes `target/bench/report.md` and PNG plots, and with `--check` fails if a ratio
//! worsened by more than 15% against `xtask/bench-baseline.json` (`baseline`).
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde_json::json;
use tests::{Host, Netns};

use crate::results::BenchRecord;

/// Seconds per iperf3 run, and runs per path (interleaved: bare, verse, bare, verse, ...).
pub(crate) const TCP_SECONDS: u32 = 5;
const TCP_ROUNDS: usize = 5;

/// The tiers of `cargo xtask bench`, each runnable alone with `--tier`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Tier {
    /// ns per packet through BPF_PROG_TEST_RUN (`bench_micro`).
    Micro,
    /// One TCP stream between two endpoints of one host, against a bare veth pair.
    Tcp,
    /// Across hosts: TCP, latency, edit-to-enforcement (`bench_fleet`).
    Fleet,
    /// Packet rate of dropping denied traffic, against nftables and iptables (`bench_rate`).
    Rate,
    /// Loading rules, against `nft -f` and `iptables-restore` (`bench_control`).
    Control,
}

pub fn run(bin_dir: &Path, tiers: &[Tier], check: bool, save_baseline: bool) -> Result<()> {
    // The harness finds `versed` through this variable; the benchmark uses the release build.
    std::env::set_var("VERSE_BIN_DIR", bin_dir);
    let want = |t: Tier| tiers.is_empty() || tiers.contains(&t);
    let mut records = Vec::new();
    if want(Tier::Micro) {
        crate::bench_micro::run(&mut records)?;
    }
    if want(Tier::Tcp) {
        tcp_throughput(&mut records)?;
    }
    if want(Tier::Fleet) {
        crate::bench_fleet::run(&mut records)?;
    }
    if want(Tier::Rate) {
        crate::bench_rate::run(&mut records)?;
    }
    if want(Tier::Control) {
        crate::bench_control::run(&mut records)?;
    }
    crate::results::fill_spread(&mut records);
    crate::results::write(&records)?;
    let plots = crate::plots::draw(&records, &crate::root().join("target/bench"))?;
    crate::results::write_report(&records, &plots)?;
    crate::results::print_table(&records);
    if save_baseline {
        crate::baseline::save(&records)?;
    }
    if check {
        crate::baseline::check(&records)?;
    }
    Ok(())
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn tcp_throughput(out: &mut Vec<BenchRecord>) -> Result<()> {
    // Bare path: two namespaces, one veth pair, no program.
    let bare_a = Netns::new("ba");
    let bare_b = Netns::new("bb");
    bare_a.ip(&[
        "link",
        "add",
        "eth0",
        "type",
        "veth",
        "peer",
        "name",
        "eth1",
        "netns",
        bare_b.name(),
    ]);
    bare_b.ip(&["link", "set", "eth1", "name", "eth0"]);
    for (ns, addr) in [(&bare_a, "10.9.0.10/24"), (&bare_b, "10.9.0.20/24")] {
        ns.ip(&["addr", "add", addr, "dev", "eth0"]);
        ns.ip(&["link", "set", "eth0", "up"]);
        ns.ip(&["link", "set", "lo", "up"]);
    }

    // Verse path: one host, one universe, a group admitting iperf3's port.
    let host = Host::start();
    let uni = host.api.create_universe("bench", "10.9.0.0/24");
    let uni = uni["id"].as_str().context("universe.id")?.to_owned();
    let sg = host.api.create_group(&uni, "iperf");
    let sg = sg["id"].as_str().context("group.id")?.to_owned();
    host.api.add_rule(
        &sg,
        &json!({"direction": "ingress", "protocol": "tcp", "from_port": 5201, "to_port": 5201,
                "cidr": "10.9.0.0/24"}),
    );
    let a = host.endpoint(&uni, "10.9.0.10", &[&sg]);
    let b = host.endpoint(&uni, "10.9.0.20", &[&sg]);

    let server = Ipv4Addr::new(10, 9, 0, 20);
    let (mut bare, mut verse) = (Vec::new(), Vec::new());
    for _ in 0..TCP_ROUNDS {
        bare.push(iperf3(&bare_a, &bare_b, server)?);
        verse.push(iperf3(a.ns(), b.ns(), server)?);
    }
    let (bare_m, verse_m) = (median(bare.clone()), median(verse.clone()));
    let config = json!({"tool": "iperf3", "streams": 1, "seconds": TCP_SECONDS, "rounds": TCP_ROUNDS,
                        "mtu": 1500, "bare_runs_gbps": bare, "verse_runs_gbps": verse});
    out.push(
        BenchRecord::new("tcp_bare_veth", bare_m, "Gbit/s", None, config.clone())
            .with_spread(&bare),
    );
    let ratio = verse_m / bare_m;
    out.push(
        BenchRecord::new(
            "tcp_verse_one_host",
            verse_m,
            "Gbit/s",
            Some(("tcp_bare_veth", ratio)),
            config,
        )
        .with_spread(&verse)
        .with_target(">= 0.85x", ratio >= 0.85),
    );
    Ok(())
}

/// One iperf3 run from `client` to a server started in `server_ns`; Gbit/s received.
///
/// iperf3 3.12 with `-J` exits 0 even when it could not connect (the JSON then holds `error`),
/// so success is judged by the JSON. The server is started afresh for every attempt (`-1`
/// serves one client, and may be left waiting by a client that failed), waited for until it
/// listens, and killed if it outlives its client.
pub(crate) fn iperf3(client: &Netns, server_ns: &Netns, server: Ipv4Addr) -> Result<f64> {
    iperf3_run(client, server_ns, server).map(|r| r.gbps)
}

/// One iperf3 run ([`iperf3`]) with the CPU it cost.
#[derive(Clone, Copy, Debug)]
pub(crate) struct IperfRun {
    /// Gbit/s received.
    pub gbps: f64,
    /// iperf3's `cpu_utilization_percent`: `host_total` (the client, sending) and
    /// `remote_total` (the server), each in percent of one CPU over the run.
    pub client_cpu_pct: f64,
    pub server_cpu_pct: f64,
    /// The whole machine's busy time (user, nice, system, irq, softirq, steal) from
    /// `/proc/stat` over the client's run, in percent of one CPU (so up to 100 x CPUs).
    pub machine_cpu_pct: f64,
}

/// Busy and total jiffies of all CPUs from the first line of `/proc/stat`, and the CPU count.
fn proc_stat() -> Option<(u64, u64, usize)> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    let mut lines = text.lines();
    let f: Vec<u64> =
        lines.next()?.split_whitespace().skip(1).take(8).filter_map(|x| x.parse().ok()).collect();
    if f.len() < 8 {
        return None;
    }
    let total: u64 = f.iter().sum();
    // idle and iowait are the idle time.
    let busy = total - f[3] - f[4];
    let cpus = lines.filter(|l| l.starts_with("cpu")).count();
    Some((busy, total, cpus.max(1)))
}

/// [`iperf3`], with the CPU cost of the run.
pub(crate) fn iperf3_run(client: &Netns, server_ns: &Netns, server: Ipv4Addr) -> Result<IperfRun> {
    let mut last = String::new();
    for _ in 0..5 {
        let srv = Command::new("ip")
            .args(["netns", "exec", server_ns.name(), "iperf3", "-s", "-1", "-B"])
            .arg(server.to_string())
            .stdout(std::process::Stdio::null())
            .spawn()
            .context("start iperf3 -s")?;
        let mut srv = KillOnDrop(srv);
        let listening = tests::wait_until(std::time::Duration::from_secs(5), || {
            let out = server_ns.exec("ss", &["-Hltn", "src", &format!("{server}:5201")]);
            !String::from_utf8_lossy(&out.stdout).trim().is_empty()
        });
        if !listening {
            last = format!("iperf3 -s did not listen on {server}:5201 in {}", server_ns.name());
            continue;
        }
        let before = proc_stat();
        let out = Command::new("ip")
            .args(["netns", "exec", client.name(), "iperf3", "-J", "-t"])
            .arg(TCP_SECONDS.to_string())
            .arg("-c")
            .arg(server.to_string())
            .output()
            .context("run iperf3 -c")?;
        let machine_cpu_pct = match (before, proc_stat()) {
            (Some((b0, t0, cpus)), Some((b1, t1, _))) if t1 > t0 => {
                (b1.saturating_sub(b0)) as f64 / (t1 - t0) as f64 * 100.0 * cpus as f64
            }
            _ => f64::NAN,
        };
        let v: Option<serde_json::Value> = serde_json::from_slice(&out.stdout).ok();
        let bps = v
            .as_ref()
            .filter(|v| v.get("error").is_none())
            .and_then(|v| v["end"]["sum_received"]["bits_per_second"].as_f64());
        match bps {
            Some(bps) if out.status.success() => {
                // The server ends by itself once its client is done; bounded all the same.
                tests::wait_until(std::time::Duration::from_secs(5), || {
                    srv.0.try_wait().ok().flatten().is_some()
                });
                let cpu = v.as_ref().map(|v| &v["end"]["cpu_utilization_percent"]);
                let pct = |k: &str| cpu.and_then(|c| c[k].as_f64()).unwrap_or(f64::NAN);
                return Ok(IperfRun {
                    gbps: bps / 1e9,
                    client_cpu_pct: pct("host_total"),
                    server_cpu_pct: pct("remote_total"),
                    machine_cpu_pct,
                });
            }
            _ => {
                last = format!(
                    "{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    bail!("iperf3 from {} to {server} failed: {last}", client.name())
}

/// A child process killed (and reaped) when dropped.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
