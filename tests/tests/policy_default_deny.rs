//! Default deny (S2) and the `default` group (S3), seen from the workloads: each body runs over
//! IPv4 and over IPv6 (dual-stack universes and endpoints; `Family::text` writes an IPv4
//! address in the family of the run).
use tests::*;

fn id(v: &Value) -> &str {
    v["id"].as_str().expect("resource has an id")
}

/// S2: a new group has no ingress rules, so members of one new group cannot reach each other by
/// ping, TCP or UDP, and each refused probe is counted as `policy_ingress`. A rule then opens
/// the same flows to the same listeners, which proves the plumbing was never the reason.
fn new_group_denies_until_a_rule_allows(f: Family) {
    let host = Host::start();
    let api = &host.api;
    let uni = api.create_dual_universe("deny", "10.10.0.0/24");
    let web = api.create_group(id(&uni), "web");
    let a = host.dual_endpoint(id(&uni), "10.10.0.10", &[id(&web)]);
    let b = host.dual_endpoint(id(&uni), "10.10.0.20", &[id(&web)]);
    let b_ip = f.addr(&b);
    let _tcp = TcpServer::start_on(&b.ns, f.any(), 8080, "b");
    let _udp = UdpServer::start_on(&b.ns, f.any(), 9090, "b");

    assert_dropped(&host, "policy_ingress", "S2: ping between members of a new group", || {
        ping(&a.ns, b_ip)
    });
    assert_dropped(&host, "policy_ingress", "S2: TCP between members of a new group", || {
        tcp_connect(&a.ns, b_ip, 8080, DENIED)
    });
    assert_dropped(&host, "policy_ingress", "S2: UDP between members of a new group", || {
        udp_roundtrip(&a.ns, b_ip, 9090, "hello", DENIED).is_some()
    });

    api.add_rule(id(&web), &json!({"direction": "ingress", "protocol": "all", "group": id(&web)}));
    assert!(ping(&a.ns, b_ip), "an ingress rule for all protocols from the group must admit ping");
    assert_eq!(tcp_roundtrip(&a.ns, b_ip, 8080, "x", ALLOWED).as_deref(), Some("b:x"));
    assert_eq!(udp_roundtrip(&a.ns, b_ip, 9090, "y", ALLOWED).as_deref(), Some("b:y"));
}

#[test]
fn new_group_denies_ping_tcp_and_udp_between_its_members_until_a_rule_allows_them_over_ipv4() {
    new_group_denies_until_a_rule_allows(Family::V4);
}

#[test]
fn new_group_denies_ping_tcp_and_udp_between_its_members_until_a_rule_allows_them_over_ipv6() {
    new_group_denies_until_a_rule_allows(Family::V6);
}

/// S3: an endpoint created without groups is in `default`, whose members reach each other with
/// every protocol, both ways.
fn default_group_lets_its_members_in(f: Family) {
    let host = Host::start();
    let api = &host.api;
    let uni = api.create_dual_universe("dflt", "10.11.0.0/24");
    let default = api.default_group(id(&uni));
    let a = host.dual_endpoint(id(&uni), "10.11.0.10", &[]);
    let b = host.dual_endpoint(id(&uni), "10.11.0.20", &[]);
    assert_eq!(
        a.json["security_groups"],
        json!([id(&default)]),
        "S3: no groups given means default"
    );
    let (a_ip, b_ip) = (f.addr(&a), f.addr(&b));

    let _tcp_a = TcpServer::start_on(&a.ns, f.any(), 8080, "a");
    let _tcp_b = TcpServer::start_on(&b.ns, f.any(), 8080, "b");
    let _udp_b = UdpServer::start_on(&b.ns, f.any(), 9090, "b");
    assert!(ping(&a.ns, b_ip), "S3: default members ping each other");
    assert!(ping(&b.ns, a_ip), "S3: default members ping each other (other way)");
    assert_eq!(tcp_roundtrip(&a.ns, b_ip, 8080, "m", ALLOWED).as_deref(), Some("b:m"));
    assert_eq!(tcp_roundtrip(&b.ns, a_ip, 8080, "n", ALLOWED).as_deref(), Some("a:n"));
    assert_eq!(udp_roundtrip(&a.ns, b_ip, 9090, "u", ALLOWED).as_deref(), Some("b:u"));
}

#[test]
fn default_group_lets_its_members_reach_each_other_over_ipv4() {
    default_group_lets_its_members_in(Family::V4);
}

#[test]
fn default_group_lets_its_members_reach_each_other_over_ipv6() {
    default_group_lets_its_members_in(Family::V6);
}

/// S3: `default` admits its own members only; a member of another group (whose egress allows
/// everything, S2) is refused at the receiver's ingress.
fn default_group_refuses_outsiders(f: Family) {
    let host = Host::start();
    let api = &host.api;
    let uni = api.create_dual_universe("dout", "10.12.0.0/24");
    let other = api.create_group(id(&uni), "other");
    let inside = host.dual_endpoint(id(&uni), "10.12.0.10", &[]);
    let outside = host.dual_endpoint(id(&uni), "10.12.0.20", &[id(&other)]);
    let inside_ip = f.addr(&inside);
    let _tcp = TcpServer::start_on(&inside.ns, f.any(), 8080, "in");

    assert_dropped(&host, "policy_ingress", "S3: default admits only its members (TCP)", || {
        tcp_connect(&outside.ns, inside_ip, 8080, DENIED)
    });
    assert_dropped(&host, "policy_ingress", "S3: default admits only its members (ping)", || {
        ping(&outside.ns, inside_ip)
    });

    // The same workload, once a member of default, is admitted (S5).
    api.set_groups(&outside.id, &[id(&other), id(&api.default_group(id(&uni)))]);
    assert!(tcp_connect(&outside.ns, inside_ip, 8080, ALLOWED), "a member of default is admitted");
    assert!(ping(&outside.ns, inside_ip), "a member of default may ping");
}

#[test]
fn default_group_refuses_endpoints_outside_it_over_ipv4() {
    default_group_refuses_outsiders(Family::V4);
}

#[test]
fn default_group_refuses_endpoints_outside_it_over_ipv6() {
    default_group_refuses_outsiders(Family::V6);
}
