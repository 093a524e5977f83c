//! TCP tier: one iperf3 stream between two namespaces of one host, over paths measured
//! interleaved in the same run:
//! - `bare_veth`: one veth pair, no program at all (the baseline of every other path);
//! - `veth_tc_empty`: the same with a TC program that only returns `TC_ACT_OK` at TCX ingress of
//!   the receiving veth, where Verse's programs run: what a TC hook costs by itself;
//! - `veth_xdp_pass`: the same with an XDP program that only returns `XDP_PASS` on the receiving
//!   veth instead: the kernel then takes segmentation offload away from the sending veth (the
//!   sender's `tcp-segmentation-offload` is recorded in the configuration), so every segment
//!   crosses the pair on its own. This is why Verse's hooks are TC, not XDP;
//! - `veth_xdp_pass_gro`: the same with GRO turned on on the receiving veth (`ethtool -K eth0
//!   gro on`), which merges segments again before the stack;
//! - `verse_one_host`: two endpoints of one `versed` host, a group admitting iperf3's port
//!   (`from_endpoint` and `bpf_redirect_peer`).
//!
//! Every record is Gbit/s received, median of the rounds with min and max, and for every path
//! but the bare one the ratio to `bare_veth` (higher is better).
use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;

use anyhow::{ensure, Context, Result};
use serde_json::json;
use tests::{Host, Netns};

use crate::bpf;
use crate::iperf::{iperf3, TCP_SECONDS};
use crate::median;
use crate::results::{BenchRecord, Unit};

/// Runs per path (interleaved: bare, tc, xdp, xdp + GRO, verse, bare, ...).
const TCP_ROUNDS: usize = 5;
const SENDER: &str = "10.9.0.10/24";
const RECEIVER: &str = "10.9.0.20/24";
const SERVER_IP: Ipv4Addr = Ipv4Addr::new(10, 9, 0, 20);

/// What is attached to the receiving veth of a pair.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Hook {
    None,
    TcEmpty,
    XdpPass,
    XdpPassGro,
}

/// Two namespaces joined by a veth pair (`eth0` in each), and the link of the program attached
/// to the receiver's `eth0`, if any (closing it detaches the program).
struct VethPair {
    sender: Netns,
    receiver: Netns,
    _link: Option<OwnedFd>,
}

/// The offload settings that matter here, from `ethtool -k eth0` in `ns`.
fn offloads(ns: &Netns) -> Result<serde_json::Value> {
    let out = ns.exec("ethtool", &["-k", "eth0"]);
    ensure!(
        out.status.success(),
        "ethtool -k eth0 in {}: {} (`cargo xtask setup` installs ethtool)",
        ns.name(),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let feature = |name: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(name)?.strip_prefix(':').map(str::trim))
            .unwrap_or("unknown")
            .to_owned()
    };
    Ok(json!({
        "tcp-segmentation-offload": feature("tcp-segmentation-offload"),
        "generic-segmentation-offload": feature("generic-segmentation-offload"),
        "generic-receive-offload": feature("generic-receive-offload"),
    }))
}

fn veth_pair(tag: &str, hook: Hook) -> Result<VethPair> {
    let sender = Netns::new(&format!("{tag}s"));
    let receiver = Netns::new(&format!("{tag}r"));
    sender.ip(&[
        "link",
        "add",
        "eth0",
        "type",
        "veth",
        "peer",
        "name",
        "eth1",
        "netns",
        receiver.name(),
    ]);
    receiver.ip(&["link", "set", "eth1", "name", "eth0"]);
    for (ns, addr) in [(&sender, SENDER), (&receiver, RECEIVER)] {
        ns.ip(&["addr", "add", addr, "dev", "eth0"]);
        ns.ip(&["link", "set", "eth0", "up"]);
    }
    if hook == Hook::XdpPassGro {
        let out = receiver.exec("ethtool", &["-K", "eth0", "gro", "on"]);
        ensure!(
            out.status.success(),
            "ethtool -K eth0 gro on in {}: {}",
            receiver.name(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = receiver.exec("cat", &["/sys/class/net/eth0/ifindex"]);
    let ifindex: u32 = String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .with_context(|| format!("ifindex of eth0 in {}", receiver.name()))?;
    let link = match hook {
        Hook::None => None,
        Hook::TcEmpty => {
            let prog = bpf::tc_return(bpf::TC_ACT_OK, "vbench_tc_ok")?;
            Some(receiver.enter(|| bpf::attach_tcx_ingress(&prog, ifindex))?)
        }
        Hook::XdpPass | Hook::XdpPassGro => {
            let prog = bpf::xdp_return(bpf::XDP_PASS, "vbench_pass")?;
            Some(receiver.enter(|| bpf::attach_xdp(&prog, ifindex))?)
        }
    };
    Ok(VethPair { sender, receiver, _link: link })
}

pub fn run(out: &mut Vec<BenchRecord>) -> Result<()> {
    let pairs = [
        ("bare_veth", veth_pair("tb", Hook::None)?),
        ("veth_tc_empty", veth_pair("tt", Hook::TcEmpty)?),
        ("veth_xdp_pass", veth_pair("tx", Hook::XdpPass)?),
        ("veth_xdp_pass_gro", veth_pair("tg", Hook::XdpPassGro)?),
    ];
    let mut offload = serde_json::Map::new();
    for (name, p) in &pairs {
        offload.insert(
            name.to_string(),
            json!({"sender": offloads(&p.sender)?, "receiver": offloads(&p.receiver)?}),
        );
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

    let mut paths: Vec<(&str, &Netns, &Netns)> =
        pairs.iter().map(|(name, p)| (*name, &p.sender, &p.receiver)).collect();
    paths.push(("verse_one_host", a.ns(), b.ns()));
    let mut runs: Vec<Vec<f64>> = vec![Vec::new(); paths.len()];
    for round in 0..TCP_ROUNDS {
        let mut line = format!("bench_tcp: round {round}:");
        for ((name, client, server), r) in paths.iter().zip(runs.iter_mut()) {
            let gbps = iperf3(client, server, SERVER_IP).with_context(|| name.to_string())?;
            line += &format!(" {name} {gbps:.2}");
            r.push(gbps);
        }
        eprintln!("{line} Gbit/s");
    }
    let config = json!({
        "tool": "iperf3", "streams": 1, "seconds": TCP_SECONDS, "rounds": TCP_ROUNDS, "mtu": 1500,
        "statistic": "median of interleaved rounds",
        "hooks": {
            "veth_tc_empty": "TC program returning TC_ACT_OK at TCX ingress of the receiving veth",
            "veth_xdp_pass": "XDP program returning XDP_PASS on the receiving veth",
            "veth_xdp_pass_gro": "the same, with GRO turned on on the receiving veth",
            "verse_one_host": "versed: from_endpoint at TCX ingress of each endpoint's host-side veth",
        },
        "offloads": offload,
        "runs_gbps": paths.iter().zip(&runs)
            .map(|((name, _, _), r)| (name.to_string(), json!(r)))
            .collect::<serde_json::Map<_, _>>(),
    });
    let bare = median(runs[0].clone());
    for ((name, _, _), r) in paths.iter().zip(&runs) {
        let m = median(r.clone());
        let record = format!("tcp_{name}");
        let rec = if *name == "bare_veth" {
            BenchRecord::new(&record, m, Unit::Gbps, None, config.clone())
        } else {
            BenchRecord::new(
                &record,
                m,
                Unit::Gbps,
                Some(("tcp_bare_veth", m / bare)),
                config.clone(),
            )
        };
        let rec = rec.with_spread(r);
        out.push(if *name == "verse_one_host" {
            rec.with_target(">= 0.85x", m / bare >= 0.85)
        } else {
            rec
        });
    }
    Ok(())
}
