//! MTU across hosts, over IPv4 and over IPv6 (one body, a family parameter): endpoints get the
//! underlay MTU minus the encapsulation overhead, a large TCP transfer crosses hosts intact, and
//! when the underlay MTU shrinks under endpoints that already exist, the sending host answers
//! too-big packets with ICMP "fragmentation needed" (IPv6: ICMPv6 "packet too big"; counted
//! `frag_needed`) so path-MTU discovery shrinks the flow and the transfer completes (S6: the
//! error goes back into the sender's namespace, past no rule).
use std::time::Duration;

use tests::*;

fn id(v: &Value) -> &str {
    v["id"].as_str().expect("resource has an id")
}

/// The MTU of `eth0` in a workload namespace.
fn eth0_mtu(w: &Workload) -> u32 {
    let out = w.ns.ip(&["-o", "link", "show", "eth0"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.split_whitespace()
        .skip_while(|t| *t != "mtu")
        .nth(1)
        .and_then(|m| m.parse().ok())
        .unwrap_or_else(|| panic!("no mtu in {text}"))
}

const BYTES: u64 = 20 * 1024 * 1024;

/// The body both families run: a 20 MB transfer each way between hosts A and C at the default
/// MTU (wrapped as TCP super-packets: segmentation offload kept), then through an underlay shrunk to 1400 under the existing endpoints; host A answers the
/// too-big packets ("fragmentation needed" for IPv4, "packet too big" for IPv6, both counted
/// `frag_needed`) and the sender's kernel caches the path MTU 1350 for the receiver.
fn transfers_discover_a_smaller_underlay_mtu(family: Family) {
    let fleet = Fleet::start(3);
    let api = fleet.api(0);
    let body = json!({"name": "bulk", "cidr": "10.2.0.0/24", "ipv6_cidrs": ["fd00:2::/64"]});
    let r = api.post("/v1/universes", &body);
    assert_eq!(r.status, 201, "create universe: {}", r.body);
    let uni = r.json();
    let cidr = match family {
        Family::V4 => "10.2.0.0/24",
        Family::V6 => "fd00:2::/64",
    };
    let sink_group = api.create_group(id(&uni), "sink");
    api.add_rule(
        id(&sink_group),
        &json!({"direction": "ingress", "protocol": "tcp", "from_port": 5001, "to_port": 5001, "cidr": cidr}),
    );
    let sender = fleet.endpoint6(0, id(&uni), ("10.2.0.10", "fd00:2::10"), &[]);
    let receiver = fleet.endpoint6(2, id(&uni), ("10.2.0.20", "fd00:2::20"), &[id(&sink_group)]);
    let (from, to) = (family.addr(&sender), family.addr(&receiver));
    // Underlay veths start at 1500: endpoints get 1500 - 50.
    assert_eq!(eth0_mtu(&sender), 1450, "endpoint MTU = underlay MTU - encapsulation overhead");
    assert_eq!(eth0_mtu(&receiver), 1450);
    let _sink = BulkSink::start_on(&receiver.ns, to, 5001);

    let capture = PacketCapture::open(fleet.host(0).netns(), tests::fleet::UNDERLAY_IFACE)
        .expect("capture on host A's underlay");
    let got = bulk_send(&sender.ns, to, 5001, BYTES, Duration::from_secs(60))
        .expect("20 MB from host A to host C at the default MTU");
    assert_eq!(got, BYTES, "every byte arrived");
    // Segmentation offload survives the wrap: host A hands its underlay device wrapped TCP
    // super-packets, longer than the underlay MTU, which are cut into segments later, each with
    // its own copy of the headers (the first ones the capture holds; it is read afterwards).
    let inner_type: [u8; 2] = match family {
        Family::V4 => [0x08, 0x00],
        Family::V6 => [0x86, 0xdd],
    };
    let super_packet = capture.find(Duration::from_secs(2), |f| {
        f.len() > 14 + 1500
            && f[36..38] == tests::fleet::VXLAN_PORT.to_be_bytes()
            && f[62..64] == inner_type
    });
    assert!(super_packet.is_some(), "{family:?}: no wrapped super-packet on host A's underlay");
    // Also the other way round (the flow's replies are wrapped by host C's conntrack hit).
    let _back = BulkSink::start_on(&sender.ns, from, 5002);
    let egress_only = api.create_group(id(&uni), "back");
    api.add_rule(
        id(&egress_only),
        &json!({"direction": "ingress", "protocol": "tcp", "from_port": 5002, "to_port": 5002, "cidr": cidr}),
    );
    fleet.api(1).set_groups(&sender.id, &[id(&egress_only)]);
    let got = bulk_send(&receiver.ns, from, 5002, BYTES, Duration::from_secs(60))
        .expect("20 MB from host C to host A");
    assert_eq!(got, BYTES);

    // Shrink the underlay under the existing endpoints: their 1450 no longer fits.
    let frag_before = drops(fleet.api(0), "frag_needed");
    fleet.set_underlay_mtu(1400);
    assert_eq!(eth0_mtu(&sender), 1450, "existing endpoints keep their MTU");
    let got = bulk_send(&sender.ns, to, 5001, BYTES, Duration::from_secs(90))
        .expect("20 MB from host A to host C through an underlay of MTU 1400");
    assert_eq!(got, BYTES, "every byte arrived after path-MTU discovery");
    assert!(
        drops(fleet.api(0), "frag_needed") > frag_before,
        "host A answered too-big packets ({family:?})"
    );
    // The kernel of the sending workload learnt the path MTU from Verse's ICMP error.
    let route = sender.ns.exec("ip", &["route", "get", &to.to_string()]);
    let route = String::from_utf8_lossy(&route.stdout).into_owned();
    assert!(route.contains("mtu 1350"), "PMTU 1400 - 50 cached for the receiver: {route}");
}

#[test]
fn large_transfers_cross_hosts_and_discover_a_smaller_underlay_mtu() {
    transfers_discover_a_smaller_underlay_mtu(Family::V4);
}

#[test]
fn large_ipv6_transfers_cross_hosts_and_discover_a_smaller_underlay_mtu() {
    transfers_discover_a_smaller_underlay_mtu(Family::V6);
}
