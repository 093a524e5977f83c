//! Universes are isolated (no packet crosses from one to another), even with identical CIDRs and
//! identical endpoint addresses on one host.
use std::net::Ipv4Addr;
use std::time::Duration;

use tests::*;

fn id(v: &Value) -> &str {
    v["id"].as_str().expect("resource has an id")
}

/// Two universes with the same CIDR, each with a client at .10 and a server at .20: every
/// client reaches its own universe's server (the answers carry the universe's name), never the
/// other's, by TCP, UDP and ping.
#[test]
fn identical_addresses_in_two_universes_reach_only_their_own_peer() {
    let host = Host::start();
    let api = &host.api;
    let red = api.create_universe("red", "10.40.0.0/24");
    let blue = api.create_universe("blue", "10.40.0.0/24");
    assert_ne!(red["vni"], blue["vni"], "each universe has its own VNI");
    let red_c = host.endpoint(id(&red), "10.40.0.10", &[]);
    let red_s = host.endpoint(id(&red), "10.40.0.20", &[]);
    let blue_c = host.endpoint(id(&blue), "10.40.0.10", &[]);
    let blue_s = host.endpoint(id(&blue), "10.40.0.20", &[]);
    let _t_red = TcpServer::start(&red_s.ns, 7000, "red");
    let _t_blue = TcpServer::start(&blue_s.ns, 7000, "blue");
    let u_red = UdpServer::start(&red_s.ns, 7001, "red");
    let u_blue = UdpServer::start(&blue_s.ns, 7001, "blue");
    let server_ip: Ipv4Addr = "10.40.0.20".parse().unwrap();

    for _ in 0..3 {
        assert_eq!(
            tcp_roundtrip(&red_c.ns, server_ip, 7000, "hi", ALLOWED).as_deref(),
            Some("red:hi")
        );
        assert_eq!(
            tcp_roundtrip(&blue_c.ns, server_ip, 7000, "hi", ALLOWED).as_deref(),
            Some("blue:hi")
        );
        assert_eq!(
            udp_roundtrip(&red_c.ns, server_ip, 7001, "hi", ALLOWED).as_deref(),
            Some("red:hi")
        );
        assert_eq!(
            udp_roundtrip(&blue_c.ns, server_ip, 7001, "hi", ALLOWED).as_deref(),
            Some("blue:hi")
        );
    }
    assert!(ping(&red_c.ns, server_ip));
    assert!(ping(&blue_c.ns, server_ip));
    assert_eq!(u_red.sources().len(), 3, "red's server saw only red's three datagrams");
    assert_eq!(u_blue.sources().len(), 3, "blue's server saw only blue's three datagrams");
}

/// Blue's rules admit anyone (all protocols from 0.0.0.0/0), so only the isolation of
/// universes stands between red and blue. A port open only in blue, at an address both have, is
/// answered by red's own endpoint (whose answer says so) and never by blue's listener; an
/// address that exists only in blue has no route from red (`no_route`, per probe), although it
/// listens and blue's own client reaches it.
#[test]
fn services_and_addresses_of_another_universe_are_unreachable() {
    let host = Host::start();
    let api = &host.api;
    let red = api.create_universe("red", "10.41.0.0/24");
    let blue = api.create_universe("blue", "10.41.0.0/24");
    let open = api.create_group(id(&blue), "open");
    api.add_rule(
        id(&open),
        &json!({"direction": "ingress", "protocol": "all", "cidr": "0.0.0.0/0"}),
    );
    let red_c = host.endpoint(id(&red), "10.41.0.10", &[]);
    let red_s = host.endpoint(id(&red), "10.41.0.20", &[]);
    let blue_s = host.endpoint(id(&blue), "10.41.0.20", &[id(&open)]);
    let blue_only = host.endpoint(id(&blue), "10.41.0.30", &[id(&open)]);
    let blue_c = host.endpoint(id(&blue), "10.41.0.10", &[]);
    let listener = TcpServer::start(&blue_s.ns, 7002, "blue");
    let _red_listener = TcpServer::start(&red_s.ns, 7002, "red");
    let only_tcp = TcpServer::start(&blue_only.ns, 7002, "blue-only");
    let only_udp = UdpServer::start(&blue_only.ns, 7003, "blue-only");

    // Blue's own client reaches every listener (so a refusal below is not a dead listener).
    assert_eq!(
        tcp_roundtrip(&blue_c.ns, blue_s.ip, 7002, "b", ALLOWED).as_deref(),
        Some("blue:b"),
        "blue's own client reaches the port"
    );
    assert_eq!(
        tcp_roundtrip(&blue_c.ns, blue_only.ip, 7002, "b", ALLOWED).as_deref(),
        Some("blue-only:b")
    );
    assert_eq!(
        udp_roundtrip(&blue_c.ns, blue_only.ip, 7003, "b", ALLOWED).as_deref(),
        Some("blue-only:b")
    );
    assert!(ping(&blue_c.ns, blue_only.ip), "blue's own client pings 10.41.0.30");
    // The accept loop counts asynchronously: wait until blue's own connections are counted.
    assert!(
        wait_until(Duration::from_secs(2), || listener.accepted() == 1 && only_tcp.accepted() == 1),
        "blue's connections were accepted"
    );

    // 10.41.0.20 exists in both: red's client gets red's answer, blue's listener nothing.
    assert_eq!(
        tcp_roundtrip(&red_c.ns, blue_s.ip, 7002, "r", ALLOWED).as_deref(),
        Some("red:r"),
        "red's client reaches red's 10.41.0.20, not blue's"
    );
    // 10.41.0.30 exists only in blue.
    assert_dropped(&host, "no_route", "red ping 10.41.0.30 (only in blue)", || {
        ping(&red_c.ns, blue_only.ip)
    });
    assert_dropped(&host, "no_route", "red TCP 10.41.0.30:7002 (only in blue)", || {
        tcp_connect(&red_c.ns, blue_only.ip, 7002, DENIED)
    });
    assert_dropped(&host, "no_route", "red UDP 10.41.0.30:7003 (only in blue)", || {
        udp_roundtrip(&red_c.ns, blue_only.ip, 7003, "x", DENIED).is_some()
    });
    // A connection from red would have been accepted well within the probes' seconds.
    assert_eq!(listener.accepted(), 1, "blue's listener accepted nothing from red");
    assert_eq!(only_tcp.accepted(), 1, "blue-only's listener accepted nothing from red");
    assert_eq!(only_udp.sources().len(), 1, "blue's UDP server received blue's datagram only");
}

/// A universe with two CIDRs is one network: endpoints in either CIDR reach each other (each
/// through the gateway of its own CIDR).
#[test]
fn endpoints_in_different_cidrs_of_one_universe_reach_each_other() {
    let host = Host::start();
    let api = &host.api;
    let r = api
        .post("/v1/universes", &json!({"name": "two", "cidrs": ["10.42.0.0/24", "172.16.5.0/24"]}));
    assert_eq!(r.status, 201, "{}", r.body);
    let uni = r.json();
    let a = host.endpoint(id(&uni), "10.42.0.10", &[]);
    let b = host.endpoint(id(&uni), "172.16.5.10", &[]);
    let _t = TcpServer::start(&b.ns, 7000, "b");
    let routes = String::from_utf8(b.ns.ip(&["route", "show", "default"]).stdout).unwrap();
    assert!(
        routes.contains("via 172.16.5.1"),
        "the gateway is the first address of the endpoint's CIDR: {routes}"
    );
    assert!(ping(&a.ns, b.ip));
    assert!(ping(&b.ns, a.ip));
    assert_eq!(tcp_roundtrip(&a.ns, b.ip, 7000, "x", ALLOWED).as_deref(), Some("b:x"));
}
