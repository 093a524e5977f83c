//! Universes are isolated (no packet crosses from one to another), even with identical CIDRs and
//! identical endpoint addresses on one host, over IPv4 and over IPv6: each test is one body with
//! a [`Family`] parameter, run for both. The universes are dual stack, every IPv4 CIDR and
//! address with its IPv6 counterpart ([`Family::text`]), so identical IPv4 addresses have
//! identical IPv6 ones too.
use std::time::Duration;

use tests::*;

fn id(v: &Value) -> &str {
    v["id"].as_str().expect("resource has an id")
}

/// Two universes with the same CIDRs, each with a client at .10 and a server at .20: every
/// client reaches its own universe's server (the answers carry the universe's name), never the
/// other's, by TCP, UDP and ping, over `family`.
fn identical_addresses_reach_only_their_own_peer(family: Family) {
    let host = Host::start();
    let api = &host.api;
    let red = api.create_dual_universe("red", "10.40.0.0/24");
    let blue = api.create_dual_universe("blue", "10.40.0.0/24");
    assert_ne!(red["vni"], blue["vni"], "each universe has its own VNI");
    let red_c = host.dual_endpoint(id(&red), "10.40.0.10", &[]);
    let red_s = host.dual_endpoint(id(&red), "10.40.0.20", &[]);
    let blue_c = host.dual_endpoint(id(&blue), "10.40.0.10", &[]);
    let blue_s = host.dual_endpoint(id(&blue), "10.40.0.20", &[]);
    let server_ip = family.addr(&red_s);
    assert_eq!(server_ip, family.addr(&blue_s), "the same address in both");
    let _t_red = TcpServer::start_on(&red_s.ns, server_ip, 7000, "red");
    let _t_blue = TcpServer::start_on(&blue_s.ns, server_ip, 7000, "blue");
    let u_red = UdpServer::start_on(&red_s.ns, server_ip, 7001, "red");
    let u_blue = UdpServer::start_on(&blue_s.ns, server_ip, 7001, "blue");

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

#[test]
fn identical_addresses_in_two_universes_reach_only_their_own_peer_over_ipv4() {
    identical_addresses_reach_only_their_own_peer(Family::V4);
}

#[test]
fn identical_addresses_in_two_universes_reach_only_their_own_peer_over_ipv6() {
    identical_addresses_reach_only_their_own_peer(Family::V6);
}

/// Blue's rules admit anyone (all protocols from `0.0.0.0/0` and `::/0`), so only the isolation
/// of universes stands between red and blue. A port open only in blue, at an address both have,
/// is answered by red's own endpoint (whose answer says so) and never by blue's listener; an
/// address that exists only in blue has no route from red (`no_route`, per probe), although it
/// listens and blue's own client reaches it.
fn another_universes_services_are_unreachable(family: Family) {
    let host = Host::start();
    let api = &host.api;
    let red = api.create_dual_universe("red", "10.41.0.0/24");
    let blue = api.create_dual_universe("blue", "10.41.0.0/24");
    let open = api.create_group(id(&blue), "open");
    for cidr in ["0.0.0.0/0", "::/0"] {
        api.add_rule(id(&open), &json!({"direction": "ingress", "protocol": "all", "cidr": cidr}));
    }
    let red_c = host.dual_endpoint(id(&red), "10.41.0.10", &[]);
    let red_s = host.dual_endpoint(id(&red), "10.41.0.20", &[]);
    let blue_s = host.dual_endpoint(id(&blue), "10.41.0.20", &[id(&open)]);
    let blue_only = host.dual_endpoint(id(&blue), "10.41.0.30", &[id(&open)]);
    let blue_c = host.dual_endpoint(id(&blue), "10.41.0.10", &[]);
    let (at, only) = (family.addr(&blue_s), family.addr(&blue_only));
    let listener = TcpServer::start_on(&blue_s.ns, at, 7002, "blue");
    let _red_listener = TcpServer::start_on(&red_s.ns, family.addr(&red_s), 7002, "red");
    let only_tcp = TcpServer::start_on(&blue_only.ns, only, 7002, "blue-only");
    let only_udp = UdpServer::start_on(&blue_only.ns, only, 7003, "blue-only");

    // Blue's own client reaches every listener (so a refusal below is not a dead listener).
    assert_eq!(
        tcp_roundtrip(&blue_c.ns, at, 7002, "b", ALLOWED).as_deref(),
        Some("blue:b"),
        "blue's own client reaches the port"
    );
    assert_eq!(tcp_roundtrip(&blue_c.ns, only, 7002, "b", ALLOWED).as_deref(), Some("blue-only:b"));
    assert_eq!(udp_roundtrip(&blue_c.ns, only, 7003, "b", ALLOWED).as_deref(), Some("blue-only:b"));
    assert!(ping(&blue_c.ns, only), "blue's own client pings {only}");
    // The accept loop counts asynchronously: wait until blue's own connections are counted.
    assert!(
        wait_until(Duration::from_secs(2), || listener.accepted() == 1 && only_tcp.accepted() == 1),
        "blue's connections were accepted"
    );

    // .20 exists in both: red's client gets red's answer, blue's listener nothing.
    assert_eq!(
        tcp_roundtrip(&red_c.ns, at, 7002, "r", ALLOWED).as_deref(),
        Some("red:r"),
        "red's client reaches red's {at}, not blue's"
    );
    // .30 exists only in blue.
    assert_dropped(&host, "no_route", &format!("red ping {only} (only in blue)"), || {
        ping(&red_c.ns, only)
    });
    assert_dropped(&host, "no_route", &format!("red TCP {only}:7002 (only in blue)"), || {
        tcp_connect(&red_c.ns, only, 7002, DENIED)
    });
    assert_dropped(&host, "no_route", &format!("red UDP {only}:7003 (only in blue)"), || {
        udp_roundtrip(&red_c.ns, only, 7003, "x", DENIED).is_some()
    });
    // A connection from red would have been accepted well within the probes' seconds.
    assert_eq!(listener.accepted(), 1, "blue's listener accepted nothing from red");
    assert_eq!(only_tcp.accepted(), 1, "blue-only's listener accepted nothing from red");
    assert_eq!(only_udp.sources().len(), 1, "blue's UDP server received blue's datagram only");
}

#[test]
fn services_and_addresses_of_another_universe_are_unreachable_over_ipv4() {
    another_universes_services_are_unreachable(Family::V4);
}

#[test]
fn services_and_addresses_of_another_universe_are_unreachable_over_ipv6() {
    another_universes_services_are_unreachable(Family::V6);
}

/// A universe with two CIDRs of `family` is one network: endpoints in either CIDR reach each
/// other (each through the gateway of its own CIDR). Both endpoints are dual stack;
/// the other family has one CIDR, so the two endpoints have addresses of it in the same CIDR.
fn different_cidrs_of_one_universe_reach_each_other(family: Family) {
    let host = Host::start();
    let api = &host.api;
    // The family's second CIDR: 172.16.5.0/24 for IPv4, the counterpart of 10.43.0.0/24 for
    // IPv6 (the other family's addresses of both endpoints are in its one CIDR).
    let v6 = |t: &str| Family::V6.text(t);
    let body = match family {
        Family::V4 => json!({"name": "two", "cidrs": ["10.42.0.0/24", "172.16.5.0/24"],
                             "ipv6_cidrs": [v6("10.42.0.0/24")]}),
        Family::V6 => json!({"name": "two", "cidrs": ["10.42.0.0/24"],
                             "ipv6_cidrs": [v6("10.42.0.0/24"), v6("10.43.0.0/24")]}),
    };
    let r = api.post("/v1/universes", &body);
    assert_eq!(r.status, 201, "{}", r.body);
    let uni = r.json();
    let plug = |ip: &str, ipv6: &str| {
        let (w, _) = api.plug(verse::model::CreateEndpoint {
            universe: id(&uni).into(),
            ip: ip.into(),
            ipv6: Some(v6(ipv6)),
            ..Default::default()
        });
        w
    };
    let a = plug("10.42.0.10", "10.42.0.10");
    let (b, gateway, flag) = match family {
        Family::V4 => (plug("172.16.5.10", "10.42.0.20"), "172.16.5.1".to_owned(), "-4"),
        Family::V6 => (plug("10.42.0.20", "10.43.0.10"), v6("10.43.0.1"), "-6"),
    };
    let _t = TcpServer::start_on(&b.ns, family.addr(&b), 7000, "b");
    let routes = String::from_utf8(b.ns.ip(&[flag, "route", "show", "default"]).stdout).unwrap();
    assert!(
        routes.contains(&format!("via {gateway}")),
        "the gateway is the first address of the endpoint's CIDR: {routes}"
    );
    assert!(ping(&a.ns, family.addr(&b)));
    assert!(ping(&b.ns, family.addr(&a)));
    let got = tcp_roundtrip(&a.ns, family.addr(&b), 7000, "x", ALLOWED);
    assert_eq!(got.as_deref(), Some("b:x"));
}

#[test]
fn endpoints_in_different_cidrs_of_one_universe_reach_each_other_over_ipv4() {
    different_cidrs_of_one_universe_reach_each_other(Family::V4);
}

#[test]
fn endpoints_in_different_cidrs_of_one_universe_reach_each_other_over_ipv6() {
    different_cidrs_of_one_universe_reach_each_other(Family::V6);
}
