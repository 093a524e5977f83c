//! TCP tier: one iperf3 stream between two endpoints of one host through Verse, against the same
//! two namespaces joined by a bare veth pair with no program at all, interleaved.
use std::net::Ipv4Addr;

use anyhow::{Context, Result};
use serde_json::json;
use tests::{Host, Netns};

use crate::iperf::{iperf3, TCP_SECONDS};
use crate::median;
use crate::results::{BenchRecord, Unit};

/// Runs per path (interleaved: bare, verse, bare, verse, ...).
const TCP_ROUNDS: usize = 5;

pub fn run(out: &mut Vec<BenchRecord>) -> Result<()> {
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
        BenchRecord::new("tcp_bare_veth", bare_m, Unit::Gbps, None, config.clone())
            .with_spread(&bare),
    );
    let ratio = verse_m / bare_m;
    out.push(
        BenchRecord::new(
            "tcp_verse_one_host",
            verse_m,
            Unit::Gbps,
            Some(("tcp_bare_veth", ratio)),
            config,
        )
        .with_spread(&verse)
        .with_target(">= 0.85x", ratio >= 0.85),
    );
    Ok(())
}
