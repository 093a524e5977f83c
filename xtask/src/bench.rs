//! `cargo xtask bench`: the benchmarks, separate from the tests. Every figure is reported with a
//! ratio to a baseline measured in the same run (the machine is shared and noisy), and written
//! with its configuration to `target/bench/results.json`.
//!
//! - Micro (`bench_micro`): ns per packet of `from_endpoint` through BPF_PROG_TEST_RUN.
//! - TCP: one iperf3 stream between two endpoints on one host through Verse, against the same
//!   two namespaces joined by a bare veth pair with no program at all.
use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context, Result};
use serde_json::json;
use tests::{Host, Netns};

use crate::results::BenchRecord;

/// Seconds per iperf3 run, and runs per path (interleaved: bare, verse, bare, verse, ...).
const TCP_SECONDS: u32 = 5;
const TCP_ROUNDS: usize = 3;

pub fn run(bin_dir: &Path) -> Result<()> {
    // The harness finds `versed` through this variable; the benchmark uses the release build.
    std::env::set_var("VERSE_BIN_DIR", bin_dir);
    let mut records = Vec::new();
    crate::bench_micro::run(&mut records)?;
    tcp_throughput(&mut records)?;
    crate::results::write(&records)?;
    crate::results::print_table(&records);
    Ok(())
}

fn median(mut v: Vec<f64>) -> f64 {
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
    out.push(BenchRecord::new("tcp_bare_veth", bare_m, "Gbit/s", None, config.clone()));
    out.push(BenchRecord::new(
        "tcp_verse_one_host",
        verse_m,
        "Gbit/s",
        Some(("tcp_bare_veth", verse_m / bare_m)),
        config,
    ));
    Ok(())
}

/// One iperf3 run from `client` to a server started in `server_ns`; Gbit/s received.
fn iperf3(client: &Netns, server_ns: &Netns, server: Ipv4Addr) -> Result<f64> {
    let mut srv = Command::new("ip")
        .args(["netns", "exec", server_ns.name(), "iperf3", "-s", "-1", "-B"])
        .arg(server.to_string())
        .stdout(std::process::Stdio::null())
        .spawn()
        .context("start iperf3 -s")?;
    // The server needs a moment to listen; retry the client instead of sleeping blindly.
    let mut last = String::new();
    for _ in 0..50 {
        let out = Command::new("ip")
            .args(["netns", "exec", client.name(), "iperf3", "-J", "-t"])
            .arg(TCP_SECONDS.to_string())
            .arg("-c")
            .arg(server.to_string())
            .output()
            .context("run iperf3 -c")?;
        if out.status.success() {
            let _ = srv.wait();
            let v: serde_json::Value =
                serde_json::from_slice(&out.stdout).context("iperf3 -J output")?;
            let bps =
                v["end"]["sum_received"]["bits_per_second"].as_f64().context("end.sum_received")?;
            return Ok(bps / 1e9);
        }
        last = String::from_utf8_lossy(&out.stdout).into_owned();
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let _ = srv.kill();
    bail!("iperf3 never connected to {server}: {last}")
}
