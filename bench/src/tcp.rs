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
//!   (`from_endpoint` and `bpf_redirect_peer`);
//! - `bare_veth_ipv6` and `verse_one_host_ipv6`: the bare pair and the Verse endpoints (dual
//!   stack, an IPv6 rule admitting iperf3's port) over IPv6 (`from_endpoint6` for Verse).
//!
//! Every record is Gbit/s received, median of the rounds with min and max, and for every path
//! but the bare ones the ratio to `bare_veth` (`bare_veth_ipv6` for `verse_one_host_ipv6`;
//! higher is better).
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
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
/// The pairs' and the Verse universe's IPv6 (the endpoints are ::10 and ::20 as in IPv4).
const CIDR6: &str = "fd00:9::/64";
const SENDER6: &str = "fd00:9::10/64";
const RECEIVER6: &str = "fd00:9::20/64";
const SERVER6: Ipv6Addr = Ipv6Addr::new(0xfd00, 9, 0, 0, 0, 0, 0, 0x20);

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
    for (ns, addr, addr6) in [(&sender, SENDER, SENDER6), (&receiver, RECEIVER, RECEIVER6)] {
        ns.ip(&["addr", "add", addr, "dev", "eth0"]);
        // No duplicate address detection: the address is usable at once.
        ns.ip(&["-6", "addr", "add", addr6, "dev", "eth0", "nodad"]);
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

    // Verse path: one host, one dual-stack universe, a group admitting iperf3's port over IPv4
    // and over IPv6.
    let host = Host::start();
    let r = host.api.post(
        "/v1/universes",
        &json!({"name": "bench", "cidr": "10.9.0.0/24", "ipv6_cidrs": [CIDR6]}),
    );
    ensure!(r.status == 201, "create universe: {} {}", r.status, r.body);
    let uni = r.json()["id"].as_str().context("universe.id")?.to_owned();
    let sg = host.api.create_group(&uni, "iperf");
    let sg = sg["id"].as_str().context("group.id")?.to_owned();
    for cidr in ["10.9.0.0/24", CIDR6] {
        host.api.add_rule(
            &sg,
            &json!({"direction": "ingress", "protocol": "tcp", "from_port": 5201,
                    "to_port": 5201, "cidr": cidr}),
        );
    }
    let endpoint = |ip: &str, ip6: &str| {
        host.api
            .plug(verse::model::CreateEndpoint {
                universe: uni.clone(),
                ip: ip.into(),
                ipv6: Some(ip6.into()),
                security_groups: Some(vec![sg.clone()]),
                ..Default::default()
            })
            .0
    };
    let a = endpoint("10.9.0.10", "fd00:9::10");
    let b = endpoint("10.9.0.20", "fd00:9::20");

    let v4 = IpAddr::V4(SERVER_IP);
    let v6 = IpAddr::V6(SERVER6);
    let mut paths: Vec<(&str, &Netns, &Netns, IpAddr)> =
        pairs.iter().map(|(name, p)| (*name, &p.sender, &p.receiver, v4)).collect();
    paths.push(("verse_one_host", a.ns(), b.ns(), v4));
    let bare = &pairs[0].1;
    paths.push(("bare_veth_ipv6", &bare.sender, &bare.receiver, v6));
    paths.push(("verse_one_host_ipv6", a.ns(), b.ns(), v6));
    let mut runs: Vec<Vec<f64>> = vec![Vec::new(); paths.len()];
    for round in 0..TCP_ROUNDS {
        let mut line = format!("bench_tcp: round {round}:");
        for ((name, client, server, ip), r) in paths.iter().zip(runs.iter_mut()) {
            let gbps = iperf3(client, server, *ip).with_context(|| name.to_string())?;
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
            "verse_one_host_ipv6": "the same over IPv6: from_endpoint tail-calls from_endpoint6",
        },
        "ipv6": {"addresses": "fd00:9::10 and fd00:9::20 (the bare pair: /64, nodad; Verse: the endpoints' IPv6)", "rule": "tcp 5201 from fd00:9::/64"},
        "offloads": offload,
        "runs_gbps": paths.iter().zip(&runs)
            .map(|((name, ..), r)| (name.to_string(), json!(r)))
            .collect::<serde_json::Map<_, _>>(),
    });
    let median_of = |path: &str| {
        paths
            .iter()
            .zip(&runs)
            .find(|((name, ..), _)| *name == path)
            .map(|(_, r)| median(r.clone()))
    };
    for ((name, ..), r) in paths.iter().zip(&runs) {
        let m = median(r.clone());
        let record = format!("tcp_{name}");
        let bare_name = if name.ends_with("_ipv6") { "bare_veth_ipv6" } else { "bare_veth" };
        let rec = if name.starts_with("bare_veth") {
            BenchRecord::new(&record, m, Unit::Gbps, None, config.clone())
        } else {
            let bare = median_of(bare_name).context("the bare pair is measured")?;
            BenchRecord::new(
                &record,
                m,
                Unit::Gbps,
                Some((&format!("tcp_{bare_name}"), m / bare)),
                config.clone(),
            )
        };
        let rec = rec.with_spread(r);
        out.push(if name.starts_with("verse_one_host") {
            let ratio = rec.ratio.unwrap_or(f64::NAN);
            rec.with_target(">= 0.85x", ratio >= 0.85)
        } else {
            rec
        });
    }
    Ok(())
}
