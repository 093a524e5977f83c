//! MTU across hosts: endpoints get the underlay MTU minus the encapsulation overhead, a large
//! TCP transfer crosses hosts intact, and when the underlay MTU shrinks under endpoints that
//! already exist, the sending host answers too-big packets with ICMP "fragmentation needed"
//! (counted `frag_needed`) so path-MTU discovery shrinks the flow and the transfer completes
//! (S6: the ICMP error is admitted as related to the tracked flow, with no ICMP rule).
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

#[test]
fn large_transfers_cross_hosts_and_discover_a_smaller_underlay_mtu() {
    let fleet = Fleet::start(3);
    let api = fleet.api(0);
    let uni = api.create_universe("bulk", "10.2.0.0/24");
    let sink_group = api.create_group(id(&uni), "sink");
    api.add_rule(
        id(&sink_group),
        &json!({"direction": "ingress", "protocol": "tcp", "from_port": 5001, "to_port": 5001, "cidr": "10.2.0.0/24"}),
    );
    let sender = fleet.endpoint(0, id(&uni), "10.2.0.10", &[]);
    let receiver = fleet.endpoint(2, id(&uni), "10.2.0.20", &[id(&sink_group)]);
    // Underlay veths start at 1500: endpoints get 1500 - 50.
    assert_eq!(eth0_mtu(&sender), 1450, "endpoint MTU = underlay MTU - encapsulation overhead");
    assert_eq!(eth0_mtu(&receiver), 1450);
    let _sink = BulkSink::start(&receiver.ns, 5001);

    let got = bulk_send(&sender.ns, receiver.ip, 5001, BYTES, Duration::from_secs(60))
        .expect("20 MB from host A to host C at the default MTU");
    assert_eq!(got, BYTES, "every byte arrived");
    // Also the other way round (the flow's replies are wrapped by host C's conntrack hit).
    let _back = BulkSink::start(&sender.ns, 5002);
    let egress_only = api.create_group(id(&uni), "back");
    api.add_rule(
        id(&egress_only),
        &json!({"direction": "ingress", "protocol": "tcp", "from_port": 5002, "to_port": 5002, "cidr": "10.2.0.0/24"}),
    );
    fleet.api(1).set_groups(&sender.id, &[id(&egress_only)]);
    let got = bulk_send(&receiver.ns, sender.ip, 5002, BYTES, Duration::from_secs(60))
        .expect("20 MB from host C to host A");
    assert_eq!(got, BYTES);

    // Shrink the underlay under the existing endpoints: their 1450 no longer fits.
    let frag_before = drops(fleet.api(0), "frag_needed");
    fleet.set_underlay_mtu(1400);
    assert_eq!(eth0_mtu(&sender), 1450, "existing endpoints keep their MTU");
    let got = bulk_send(&sender.ns, receiver.ip, 5001, BYTES, Duration::from_secs(90))
        .expect("20 MB from host A to host C through an underlay of MTU 1400");
    assert_eq!(got, BYTES, "every byte arrived after path-MTU discovery");
    assert!(
        drops(fleet.api(0), "frag_needed") > frag_before,
        "host A answered too-big packets with ICMP fragmentation needed"
    );
    // The kernel of the sending workload learnt the path MTU from Verse's ICMP error.
    let route = sender.ns.exec("ip", &["route", "get", &receiver.ip.to_string()]);
    let route = String::from_utf8_lossy(&route.stdout).into_owned();
    assert!(route.contains("mtu 1350"), "PMTU 1400 - 50 cached for the receiver: {route}");
}
