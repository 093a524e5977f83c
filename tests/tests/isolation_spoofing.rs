//! S10 anti-spoofing: an endpoint can only send from its own IP and MAC.
use std::net::Ipv4Addr;
use std::time::Duration;

use tests::*;

fn id(v: &Value) -> &str {
    v["id"].as_str().expect("resource has an id")
}

/// Sets the MAC of the workload's `eth0`, live if the driver allows it, else by taking the link
/// down (which drops its routes, so the default route is put back).
fn set_mac(ns: &Netns, mac: &str) {
    let live = ns.exec("ip", &["link", "set", "dev", "eth0", "address", mac]);
    if live.status.success() {
        return;
    }
    let routes = String::from_utf8(ns.ip(&["route", "show", "default"]).stdout).expect("utf-8");
    ns.ip(&["link", "set", "dev", "eth0", "down"]);
    ns.ip(&["link", "set", "dev", "eth0", "address", mac]);
    ns.ip(&["link", "set", "dev", "eth0", "up"]);
    for route in routes.lines().filter(|l| !l.trim().is_empty()) {
        let mut args = vec!["route", "replace"];
        args.extend(route.split_whitespace());
        ns.ip(&args);
    }
}

/// A workload that adds a second address and sends from it is dropped (`spoofed_ip`); the
/// receiver never sees the datagram, while traffic from the endpoint's own address passes.
#[test]
fn sending_from_an_address_that_is_not_the_endpoints_is_dropped_and_counted() {
    let host = Host::start();
    let api = &host.api;
    let uni = api.create_universe("spoof", "10.50.0.0/24");
    let a = host.endpoint(id(&uni), "10.50.0.10", &[]);
    let b = host.endpoint(id(&uni), "10.50.0.20", &[]);
    let c = host.endpoint(id(&uni), "10.50.0.30", &[]);
    let server = UdpServer::start(&b.ns, 9000, "b");
    assert_eq!(udp_roundtrip(&a.ns, b.ip, 9000, "own", ALLOWED).as_deref(), Some("b:own"));

    let before = drops(api, "spoofed_ip");
    let unused: Ipv4Addr = "10.50.0.99".parse().unwrap();
    for forged in [unused, c.ip] {
        a.ns.ip(&["addr", "add", &format!("{forged}/32"), "dev", "eth0"]);
        let outcome = udp_exchange(&a.ns, Some(forged), b.ip, 9000, "forged", DENIED);
        assert!(
            matches!(outcome, UdpOutcome::Timeout),
            "S10: a datagram from {forged} must be dropped, got {outcome:?}"
        );
        assert!(!ns_ping_from(&a.ns, forged, b.ip), "S10: a ping from {forged} must be dropped");
        a.ns.ip(&["addr", "del", &format!("{forged}/32"), "dev", "eth0"]);
    }
    let seen = server.sources();
    assert!(
        seen.iter().all(|s| s.ip() == std::net::IpAddr::V4(a.ip)),
        "S10: the receiver saw a forged source: {seen:?}"
    );
    assert!(
        wait_until(Duration::from_secs(2), || drops(api, "spoofed_ip") >= before + 4),
        "verse_drops_total{{reason=\"spoofed_ip\"}} moved from {before} to {}, expected +4",
        drops(api, "spoofed_ip")
    );
    assert_eq!(udp_roundtrip(&a.ns, b.ip, 9000, "again", ALLOWED).as_deref(), Some("b:again"));
}

fn ns_ping_from(ns: &Netns, src: Ipv4Addr, dst: Ipv4Addr) -> bool {
    ns.exec("ping", &["-c1", "-q", "-n", "-W", "1", "-I", &src.to_string(), &dst.to_string()])
        .status
        .success()
}

/// A workload that changes its MAC is dropped (`spoofed_mac`) until it takes its own MAC back.
#[test]
fn sending_from_a_mac_that_is_not_the_endpoints_is_dropped_and_counted() {
    let host = Host::start();
    let api = &host.api;
    let uni = api.create_universe("spoofm", "10.51.0.0/24");
    let a = host.endpoint(id(&uni), "10.51.0.10", &[]);
    let b = host.endpoint(id(&uni), "10.51.0.20", &[]);
    let server = UdpServer::start(&b.ns, 9000, "b");
    let _tcp = TcpServer::start(&b.ns, 7000, "b");
    assert_eq!(udp_roundtrip(&a.ns, b.ip, 9000, "own", ALLOWED).as_deref(), Some("b:own"));
    let received = server.sources().len();

    let before = drops(api, "spoofed_mac");
    set_mac(&a.ns, "02:66:66:66:66:66");
    assert_eq!(
        udp_roundtrip(&a.ns, b.ip, 9000, "forged", DENIED),
        None,
        "S10: a forged MAC must be dropped"
    );
    assert!(!tcp_connect(&a.ns, b.ip, 7000, DENIED), "S10: a forged MAC must be dropped (TCP)");
    assert!(!ping(&a.ns, b.ip), "S10: a forged MAC must be dropped (ping)");
    assert_eq!(server.sources().len(), received, "the receiver saw nothing from the forged MAC");
    assert!(
        wait_until(Duration::from_secs(2), || drops(api, "spoofed_mac") >= before + 3),
        "verse_drops_total{{reason=\"spoofed_mac\"}} moved from {before} to {}, expected +3",
        drops(api, "spoofed_mac")
    );

    set_mac(&a.ns, &a.mac);
    assert_eq!(
        udp_roundtrip(&a.ns, b.ip, 9000, "back", ALLOWED).as_deref(),
        Some("b:back"),
        "own MAC passes again"
    );
}
