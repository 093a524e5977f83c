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

/// A workload that adds a second address and sends from it is dropped (`spoofed_ip`, per probe);
/// the receiver never sees the datagram or the echo request (a forged source gets no answer
/// back whether or not it arrived, so the receiver's listener and a tap in its namespace are
/// what tell), while traffic from the endpoint's own address passes.
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

    let icmp_tap = Tap::open(&b.ns, 1);
    assert!(ns_ping_from(&a.ns, a.ip, b.ip), "a ping from the endpoint's own address passes");
    assert!(icmp_tap.saw_from(a.ip, ALLOWED), "the tap sees what arrives");
    let unused: Ipv4Addr = "10.50.0.99".parse().unwrap();
    let from = |ip: Ipv4Addr| {
        let seen = server.sources();
        seen.iter().any(|s| s.ip() == std::net::IpAddr::V4(ip))
    };
    for forged in [unused, c.ip] {
        a.ns.ip(&["addr", "add", &format!("{forged}/32"), "dev", "eth0"]);
        assert_dropped(&host, "spoofed_ip", &format!("S10: a datagram from {forged}"), || {
            let _ = udp_exchange(&a.ns, Some(forged), b.ip, 9000, "forged", DENIED);
            from(forged)
        });
        assert_dropped(&host, "spoofed_ip", &format!("S10: a ping from {forged}"), || {
            let _ = ns_ping_from(&a.ns, forged, b.ip);
            icmp_tap.saw_from(forged, DENIED)
        });
        a.ns.ip(&["addr", "del", &format!("{forged}/32"), "dev", "eth0"]);
    }
    let seen = server.sources();
    assert!(
        seen.iter().all(|s| s.ip() == std::net::IpAddr::V4(a.ip)),
        "S10: the receiver saw a forged source: {seen:?}"
    );
    assert_eq!(udp_roundtrip(&a.ns, b.ip, 9000, "again", ALLOWED).as_deref(), Some("b:again"));
}

fn ns_ping_from(ns: &Netns, src: Ipv4Addr, dst: Ipv4Addr) -> bool {
    ns.exec("ping", &["-c1", "-q", "-n", "-W", "1", "-I", &src.to_string(), &dst.to_string()])
        .status
        .success()
}

/// The MAC the workload's kernel resolved for `ip` (the dataplane's ARP answer, for the gateway).
fn neighbour_mac(ns: &Netns, ip: &str) -> String {
    let out = String::from_utf8(ns.ip(&["neigh", "show", ip]).stdout).expect("utf-8");
    out.split_whitespace()
        .skip_while(|w| *w != "lladdr")
        .nth(1)
        .unwrap_or_else(|| panic!("no neighbour entry for {ip}: {out:?}"))
        .to_owned()
}

/// A workload that changes its MAC is dropped (`spoofed_mac`, per probe) until it takes its own
/// MAC back. Answers could not reach a forged MAC anyway, so the receiver's listeners and a tap
/// in its namespace tell whether a probe arrived.
#[test]
fn sending_from_a_mac_that_is_not_the_endpoints_is_dropped_and_counted() {
    let host = Host::start();
    let api = &host.api;
    let uni = api.create_universe("spoofm", "10.51.0.0/24");
    let a = host.endpoint(id(&uni), "10.51.0.10", &[]);
    let b = host.endpoint(id(&uni), "10.51.0.20", &[]);
    let server = UdpServer::start(&b.ns, 9000, "b");
    let tcp = TcpServer::start(&b.ns, 7000, "b");
    assert_eq!(udp_roundtrip(&a.ns, b.ip, 9000, "own", ALLOWED).as_deref(), Some("b:own"));
    assert!(tcp_connect(&a.ns, b.ip, 7000, ALLOWED), "TCP from the endpoint's own MAC passes");
    assert!(ping(&a.ns, b.ip), "a ping from the endpoint's own MAC passes");
    assert!(wait_until(Duration::from_secs(2), || tcp.accepted() == 1));
    let received = server.sources().len();

    let gateway = "10.51.0.1";
    let gateway_mac = neighbour_mac(&a.ns, gateway);
    set_mac(&a.ns, "02:66:66:66:66:66");
    // A new MAC makes the kernel forget its neighbours, and the ARP requests it would send from
    // the forged MAC are dropped too (spoofed_mac): without the gateway's MAC pinned, the probes
    // below would never send an IPv4 packet, and the counter would move for the ARP alone.
    a.ns.ip(&[
        "neigh",
        "replace",
        gateway,
        "lladdr",
        &gateway_mac,
        "dev",
        "eth0",
        "nud",
        "permanent",
    ]);
    // Opened after the pings above were answered, so they see only what comes now.
    let (tcp_tap, icmp_tap) = (Tap::open(&b.ns, 6), Tap::open(&b.ns, 1));
    assert_dropped(&host, "spoofed_mac", "S10: a datagram from a forged MAC", || {
        let _ = udp_exchange(&a.ns, None, b.ip, 9000, "forged", DENIED);
        server.sources().len() > received
    });
    assert_dropped(&host, "spoofed_mac", "S10: TCP from a forged MAC", || {
        let _ = tcp_connect(&a.ns, b.ip, 7000, DENIED);
        tcp_tap.saw_from(a.ip, DENIED)
    });
    assert_dropped(&host, "spoofed_mac", "S10: a ping from a forged MAC", || {
        let _ = ping_wait(&a.ns, b.ip, 1);
        icmp_tap.saw_from(a.ip, DENIED)
    });
    assert_eq!(server.sources().len(), received, "the receiver saw nothing from the forged MAC");
    assert_eq!(tcp.accepted(), 1, "nor accepted a connection");

    // (Taking the own MAC back flushes the pinned neighbour too: ARP from the own MAC is
    // answered again.)
    set_mac(&a.ns, &a.mac);
    assert_eq!(
        udp_roundtrip(&a.ns, b.ip, 9000, "back", ALLOWED).as_deref(),
        Some("b:back"),
        "own MAC passes again"
    );
    assert!(tcp_connect(&a.ns, b.ip, 7000, ALLOWED), "TCP too");
}
