//! iperf3 runs inside namespaces, with the CPU each run cost: the TCP throughput of the `tcp`
//! and `fleet` tiers.
use std::net::{IpAddr, SocketAddr};
use std::process::Command;

use anyhow::{bail, Context, Result};
use tests::Netns;

/// Seconds per iperf3 run.
pub const TCP_SECONDS: u32 = 5;

/// One iperf3 run from `client` to a server started in `server_ns` at `server` (IPv4 or IPv6);
/// Gbit/s received.
///
/// iperf3 3.12 with `-J` exits 0 even when it could not connect (the JSON then holds `error`),
/// so success is judged by the JSON. The server is started afresh for every attempt (`-1`
/// serves one client, and may be left waiting by a client that failed), waited for until it
/// listens, and killed if it outlives its client.
pub fn iperf3(client: &Netns, server_ns: &Netns, server: IpAddr) -> Result<f64> {
    iperf3_run(client, server_ns, server).map(|r| r.gbps)
}

/// One iperf3 run ([`iperf3`]) with the CPU it cost.
#[derive(Clone, Copy, Debug)]
pub struct IperfRun {
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
pub fn iperf3_run(client: &Netns, server_ns: &Netns, server: IpAddr) -> Result<IperfRun> {
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
            let listen = SocketAddr::new(server, 5201).to_string();
            let out = server_ns.exec("ss", &["-Hltn", "src", &listen]);
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
