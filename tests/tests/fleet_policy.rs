//! Security groups across hosts: three hosts sharing one etcd, workloads spread over all of
//! them, traffic carried over the underlay. Cross-host TCP, UDP and ICMP pass or drop exactly
//! as the groups say (S1, S5), over IPv4 and over IPv6 (one body, a family parameter), never
//! from one universe to another even with identical CIDRs and addresses, and an edit made through one host's API is in force on every host when it returns
//! (S13).
use std::net::IpAddr;
use std::time::Duration;

use tests::*;

fn id(v: &Value) -> &str {
    v["id"].as_str().expect("resource has an id")
}

/// A universe with `10.0.0.0/24` and, the same in every universe, `fd00:10::/64`.
fn dual_universe(api: &Api, name: &str) -> Value {
    let body = json!({"name": name, "cidr": "10.0.0.0/24", "ipv6_cidrs": ["fd00:10::/64"]});
    let r = api.post("/v1/universes", &body);
    assert_eq!(r.status, 201, "create universe {name}: {}", r.body);
    r.json()
}

/// Host `n` of the universes' CIDR in `family`: 10.0.0.n or fd00:10::n (the same digits).
fn at(family: Family, n: u8) -> IpAddr {
    match family {
        Family::V4 => format!("10.0.0.{n}").parse().expect("IPv4"),
        Family::V6 => format!("fd00:10::{n}").parse().expect("IPv6"),
    }
}

/// Both addresses of host `n`, for a dual-stack endpoint.
fn both(n: u8) -> (String, String) {
    (format!("10.0.0.{n}"), format!("fd00:10::{n}"))
}

/// An ingress rule admitting echo requests of `family` from `peer` (`{"group": ..}` or
/// `{"cidr": ..}`).
fn echo_rule(family: Family, peer: Value) -> Value {
    let (protocol, ty) = match family {
        Family::V4 => ("icmp", 8),
        Family::V6 => ("icmpv6", 128),
    };
    let mut r =
        json!({"direction": "ingress", "protocol": protocol, "icmp_type": ty, "icmp_code": -1});
    r.as_object_mut().unwrap().extend(peer.as_object().unwrap().clone());
    r
}

/// Every address of `family`: `0.0.0.0/0` or `::/0`.
fn anywhere(family: Family) -> &'static str {
    match family {
        Family::V4 => "0.0.0.0/0",
        Family::V6 => "::/0",
    }
}

fn tcp_rule(port: u16, group: &str) -> Value {
    json!({"direction": "ingress", "protocol": "tcp", "from_port": port, "to_port": port, "group": group})
}

/// One body run over IPv4 and over IPv6 (`family`): the universes are dual stack and the
/// endpoints too, and the traffic, the rules' CIDRs and echo rules are the family's; n below is
/// 10.0.0.n or fd00:10::n.
///
/// Host A (0), B (1), C (2). Universe `blue` and `red` both 10.0.0.0/24 and fd00:10::/64, each
/// with endpoints on every host, and the same addresses placed on different hosts in each:
///
/// | address   | blue                | red            |
/// |-----------|---------------------|----------------|
/// | 10.0.0.10 | web on C  [web]     | x on A [default] |
/// | 10.0.0.20 | client on B [clients] | y on C [default] |
/// | 10.0.0.30 | db on A   [db]      | z on B [default] |
/// | 10.0.0.40 | stranger on A [default] | —         |
/// | 10.0.0.50 | open on C [open]    | —              |
///
/// web admits TCP 80, UDP 53 and ICMP echo from `clients`, TCP 8443 from anywhere
/// (0.0.0.0/0 or ::/0), and TCP 82 from the other family's anywhere (nothing of this one); db admits TCP 5432 from `web`; open admits TCP 8443 and ICMP echo from anywhere.
///
/// Every refused probe aims at a listening socket (or a workload answering echo requests) that
/// an allowed peer reaches, and asserts the drop counter of the host that must refuse it moved
/// for its reason. Across universes, blue's rules admit red's probes (0.0.0.0/0), so only the
/// isolation stops them: red's traffic to an address that exists only in blue is `no_route` on
/// the red sender's host, and red's traffic to an address both universes have reaches red's
/// endpoint (its answer says so), never blue's listener on the same address and port.
fn cross_host_traffic_follows_the_groups_and_never_crosses_universes(family: Family) {
    let fleet = Fleet::start(3);
    let api = fleet.api(0);
    let blue = dual_universe(api, "blue");
    // Created through another host: any host's API accepts any edit.
    let red = dual_universe(fleet.api(1), "red");
    assert_ne!(blue["vni"], red["vni"], "each universe has its own VNI");
    let (blue, red) = (id(&blue), id(&red));
    let clients = api.create_group(blue, "clients");
    let web = fleet.api(2).create_group(blue, "web");
    let db = api.create_group(blue, "db");
    let (clients, web, db) = (id(&clients), id(&web), id(&db));
    api.add_rule(web, &tcp_rule(80, clients));
    api.add_rule(
        web,
        &json!({"direction": "ingress", "protocol": "udp", "from_port": 53, "to_port": 53, "group": clients}),
    );
    fleet.api(1).add_rule(web, &echo_rule(family, json!({"group": clients})));
    api.add_rule(db, &tcp_rule(5432, web));
    let from_anywhere = |port: u16| json!({"direction": "ingress", "protocol": "tcp", "from_port": port, "to_port": port, "cidr": anywhere(family)});
    api.add_rule(web, &from_anywhere(8443));
    // A CIDR rule of the other family admits nothing of this one.
    let other = match family {
        Family::V4 => "::/0",
        Family::V6 => "0.0.0.0/0",
    };
    api.add_rule(
        web,
        &json!({"direction": "ingress", "protocol": "tcp", "from_port": 82, "to_port": 82, "cidr": other}),
    );
    let open = api.create_group(blue, "open");
    let open = id(&open);
    api.add_rule(open, &from_anywhere(8443));
    api.add_rule(open, &echo_rule(family, json!({"cidr": anywhere(family)})));

    let ep = |on: usize, uni: &str, n: u8, groups: &[&str]| {
        let (ip, ipv6) = both(n);
        fleet.endpoint6(on, uni, (&ip, &ipv6), groups)
    };
    let b_web = ep(2, blue, 10, &[web]);
    let b_client = ep(1, blue, 20, &[clients]);
    let b_db = ep(0, blue, 30, &[db]);
    let b_stranger = ep(0, blue, 40, &[]);
    let b_open = ep(2, blue, 50, &[open]);
    let r_x = ep(0, red, 10, &[]);
    let r_y = ep(2, red, 20, &[]);
    let r_z = ep(1, red, 30, &[]);
    for (w, host) in [(&b_web, 2), (&b_client, 1), (&b_db, 0), (&r_x, 0), (&r_y, 2), (&r_z, 1)] {
        assert_eq!(w.json["host"], fleet.host(host).name(), "placed where asked: {}", w.json);
    }
    // Every host lists every endpoint, whichever host created it.
    for i in 0..3 {
        let listed = fleet.api(i).client().list_endpoints(None, None).expect("list endpoints");
        assert_eq!(listed.len(), 8, "host {i}: {listed:?}");
    }

    let tcp = |w: &Workload, port: u16, banner: &str| {
        TcpServer::start_on(&w.ns, family.addr(w), port, banner)
    };
    let udp = |w: &Workload, port: u16, banner: &str| {
        UdpServer::start_on(&w.ns, family.addr(w), port, banner)
    };
    let _web_tcp = tcp(&b_web, 80, "blue-web");
    let _web_tcp81 = tcp(&b_web, 81, "blue-web");
    let _web_tcp82 = tcp(&b_web, 82, "blue-web");
    let web_tcp8443 = tcp(&b_web, 8443, "blue-web");
    let open_tcp = tcp(&b_open, 8443, "blue-open");
    let web_udp = udp(&b_web, 53, "blue-web");
    let _db_tcp = tcp(&b_db, 5432, "blue-db");
    let _x_tcp = tcp(&r_x, 80, "red-x");
    let _x_tcp8443 = tcp(&r_x, 8443, "red-x");
    let x_udp = udp(&r_x, 53, "red-x");
    let _z_tcp = tcp(&r_z, 5432, "red-z");
    let (dot10, dot20, dot30, dot50) =
        (at(family, 10), at(family, 20), at(family, 30), at(family, 50));
    let (host_a, host_b, host_c) = (fleet.host(0), fleet.host(1), fleet.host(2));

    // Allowed across hosts, by TCP, UDP and ICMP, and answered by blue's own web.
    assert_eq!(
        tcp_roundtrip(&b_client.ns, dot10, 80, "get", ALLOWED).as_deref(),
        Some("blue-web:get"),
        "blue client (B) -> blue web (C) TCP 80"
    );
    assert_eq!(
        udp_roundtrip(&b_client.ns, dot10, 53, "q", ALLOWED).as_deref(),
        Some("blue-web:q"),
        "blue client (B) -> blue web (C) UDP 53"
    );
    assert!(ping(&b_client.ns, dot10), "blue client (B) pings blue web (C)");
    assert_eq!(
        tcp_roundtrip(&b_web.ns, dot30, 5432, "sql", ALLOWED).as_deref(),
        Some("blue-db:sql"),
        "blue web (C) -> blue db (A): a group admits another group"
    );
    // A long connection keeps working across many exchanges.
    let mut conn = TcpConn::open(&b_client.ns, dot10, 80, ALLOWED).expect("client -> web:80");
    for i in 0..20 {
        assert_eq!(conn.exchange(&i.to_string(), ALLOWED).unwrap(), format!("blue-web:{i}"));
    }

    // Blue's 8443 rules admit anyone: blue's own endpoints on other hosts reach both listeners.
    assert_eq!(
        tcp_roundtrip(&b_stranger.ns, dot10, 8443, "s", ALLOWED).as_deref(),
        Some("blue-web:s"),
        "blue stranger (A) -> blue web (C) TCP 8443, admitted from 0.0.0.0/0"
    );
    assert_eq!(
        tcp_roundtrip(&b_client.ns, dot50, 8443, "c", ALLOWED).as_deref(),
        Some("blue-open:c"),
        "blue client (B) -> blue open (C) TCP 8443"
    );
    assert!(ping(&b_stranger.ns, dot50), "blue stranger (A) pings blue open (C)");

    // Denied across hosts: counted by the host whose rules say no, the receiver's.
    assert_dropped(host_c, "policy_ingress", "blue client (B) -> web:81: no rule for 81", || {
        tcp_connect(&b_client.ns, dot10, 81, DENIED)
    });
    assert_dropped(
        host_c,
        "policy_ingress",
        "client (B) -> web:82: the other family's rule",
        || tcp_connect(&b_client.ns, dot10, 82, DENIED),
    );
    assert_dropped(host_c, "policy_ingress", "blue stranger (A) -> web:80: not in clients", || {
        tcp_connect(&b_stranger.ns, dot10, 80, DENIED)
    });
    assert_dropped(host_c, "policy_ingress", "blue stranger (A) -> web UDP 53", || {
        udp_exchange(&b_stranger.ns, None, dot10, 53, "q", DENIED) != UdpOutcome::Timeout
    });
    assert_dropped(host_c, "policy_ingress", "blue stranger (A) pings web (C)", || {
        ping(&b_stranger.ns, dot10)
    });
    assert_dropped(
        host_a,
        "policy_ingress",
        "blue client (B) -> db:5432 (A): db admits web",
        || tcp_connect(&b_client.ns, dot30, 5432, DENIED),
    );
    // The client answers echo requests (blue's own rules decide): only its rules stop this.
    assert_dropped(host_b, "policy_ingress", "web (C) pings client (B): no ingress rule", || {
        ping(&b_web.ns, dot20)
    });
    assert_eq!(web_udp.sources().len(), 1, "web saw only the allowed datagram");

    // Red: the same addresses lead to red's endpoints on other hosts, never to blue's.
    assert_eq!(
        tcp_roundtrip(&r_y.ns, dot10, 80, "get", ALLOWED).as_deref(),
        Some("red-x:get"),
        "red y (C) -> 10.0.0.10 is red x on A, not blue web on C"
    );
    assert_eq!(
        udp_roundtrip(&r_y.ns, dot10, 53, "q", ALLOWED).as_deref(),
        Some("red-x:q"),
        "red y (C) -> 10.0.0.10 UDP is red x"
    );
    assert_eq!(
        tcp_roundtrip(&r_x.ns, dot30, 5432, "sql", ALLOWED).as_deref(),
        Some("red-z:sql"),
        "red x (A) -> 10.0.0.30 is red z on B, not blue db on A"
    );
    assert!(ping(&r_x.ns, dot20), "red x (A) pings red y (C): red's default admits red's default");
    // Blue's web admits TCP 8443 from anywhere and listens on it; so does red's x at the same
    // address: red z's connection is answered by red x, and blue's listener sees nothing.
    let web_accepted = web_tcp8443.accepted();
    assert_eq!(
        tcp_roundtrip(&r_z.ns, dot10, 8443, "z", ALLOWED).as_deref(),
        Some("red-x:z"),
        "red z (B) -> 10.0.0.10:8443 is red x on A, not blue web on C (which admits anyone)"
    );
    // 10.0.0.50 exists only in blue, where it admits anyone and listens: only the isolation of
    // universes stops red, on red's own host, before anything leaves it.
    let open_accepted = open_tcp.accepted();
    assert_dropped(host_b, "no_route", "red z (B) -> 10.0.0.50:8443, only in blue", || {
        tcp_connect(&r_z.ns, dot50, 8443, DENIED)
    });
    assert_dropped(host_a, "no_route", "red x (A) pings 10.0.0.50, only in blue", || {
        ping(&r_x.ns, dot50)
    });
    assert_eq!(web_tcp8443.accepted(), web_accepted, "blue web accepted nothing from red");
    assert_eq!(open_tcp.accepted(), open_accepted, "blue open accepted nothing from red");
    assert_eq!(web_udp.sources().len(), 1, "blue web never saw red's datagram");
    assert_eq!(x_udp.sources().len(), 1, "red x saw red's datagram only");
    drop(conn);
}

#[test]
fn cross_host_traffic_follows_the_groups_and_never_crosses_universes_over_ipv4() {
    cross_host_traffic_follows_the_groups_and_never_crosses_universes(Family::V4);
}

#[test]
fn cross_host_traffic_follows_the_groups_and_never_crosses_universes_over_ipv6() {
    cross_host_traffic_follows_the_groups_and_never_crosses_universes(Family::V6);
}

/// Membership and rules edited through one host's API are in force on the other hosts when
/// the call returns (S5, S13): host B's client reaches host C's web only while it is in
/// `clients`, with the PATCH made through host A's API; a rule added through host B admits a
/// new port on host C; and leaving the group, through host C's API, closes both again.
#[test]
fn membership_change_through_host_a_takes_effect_on_host_c() {
    let fleet = Fleet::start(3);
    let (a, b) = (fleet.api(0), fleet.api(1));
    let uni = a.create_universe("shop", "10.1.0.0/24");
    let uni = id(&uni);
    let clients = a.create_group(uni, "clients");
    let web = a.create_group(uni, "web");
    let (clients, web) = (id(&clients), id(&web));
    a.add_rule(web, &tcp_rule(80, clients));
    let client = fleet.endpoint_via(0, 1, uni, "10.1.0.20", &[]);
    let server = fleet.endpoint_via(0, 2, uni, "10.1.0.10", &[web]);
    let _srv80 = TcpServer::start(&server.ns, 80, "web");
    let _srv8080 = TcpServer::start(&server.ns, 8080, "web");
    let web_ip = server.ip;
    let c = fleet.host(2);

    assert_dropped(c, "policy_ingress", "client -> web:80: default is not clients", || {
        tcp_connect(&client.ns, web_ip, 80, DENIED)
    });

    let patch = verse::model::PatchEndpoint::groups(vec![clients.to_owned()]);
    let (_, rev) = a.client().patch_endpoint(&client.id, &patch).expect("PATCH through host A");
    // When the API answers, every healthy host has realized the edit (S13), as the serving
    // host's GET /v1/hosts shows (it knows its own realized revision first-hand; the other
    // hosts' reports are what it waited for) ...
    for h in a.hosts() {
        assert_eq!(h["healthy"], true, "{h}");
        assert!(h["revision"].as_u64().is_some_and(|r| r >= rev), "host realized {rev}: {h}");
    }
    // ... and every other host's view converges on it: each host's report reaches etcd and
    // the others' watches a moment later.
    assert!(
        fleet.wait_realized(2, rev, Duration::from_secs(5)),
        "C's view: {:?}",
        fleet.api(2).hosts()
    );
    // ... so host C admits the client at once, no waiting.
    assert_eq!(
        tcp_roundtrip(&client.ns, web_ip, 80, "in", ALLOWED).as_deref(),
        Some("web:in"),
        "client joined clients through host A; host C admits it"
    );
    assert_dropped(c, "policy_ingress", "client -> web:8080: no rule for 8080 yet", || {
        tcp_connect(&client.ns, web_ip, 8080, DENIED)
    });

    b.add_rule(web, &tcp_rule(8080, clients));
    assert_eq!(
        tcp_roundtrip(&client.ns, web_ip, 8080, "alt", ALLOWED).as_deref(),
        Some("web:alt"),
        "rule added through host B is in force on host C"
    );
    // A new endpoint is ready when its creation returns: host C already routes and admits it
    // (placed on host A, created through host C's API, used at once).
    let late = fleet.endpoint_via(2, 0, uni, "10.1.0.30", &[clients]);
    assert_eq!(
        tcp_roundtrip(&late.ns, web_ip, 80, "new", ALLOWED).as_deref(),
        Some("web:new"),
        "an endpoint created a moment ago on host A reaches host C"
    );

    let default = a.default_group(uni);
    fleet.api(2).set_groups(&client.id, &[id(&default)]);
    assert_dropped(c, "policy_ingress", "client left clients: web:80 denied again", || {
        tcp_connect(&client.ns, web_ip, 80, DENIED)
    });
    assert_dropped(c, "policy_ingress", "client left clients: web:8080 denied again", || {
        tcp_connect(&client.ns, web_ip, 8080, DENIED)
    });
}
