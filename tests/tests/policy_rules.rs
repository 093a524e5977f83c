//! What each kind of rule admits (S1, S4, S6), seen from the workloads. Each body runs over IPv4
//! and over IPv6 (dual-stack universes and endpoints; `Family::text` writes an IPv4 address or
//! CIDR in the family of the run: a /16 universe is a /48, a /24 CIDR a /64, a /32 a /128).
use tests::*;

fn id(v: &Value) -> &str {
    v["id"].as_str().expect("resource has an id")
}

/// S4: a CIDR peer admits sources inside the CIDR and only those; the CIDR is stored canonical.
fn cidr_rule_admits_sources_inside_the_cidr_only(f: Family) {
    let host = Host::start();
    let api = &host.api;
    let uni = api.create_dual_universe("cidr", "10.20.0.0/16");
    let srv = api.create_group(id(&uni), "srv");
    let rule = api.add_rule(
        id(&srv),
        &json!({"direction": "ingress", "protocol": "tcp", "from_port": 7000, "to_port": 7000, "cidr": f.text("10.20.1.77/24")}),
    );
    assert_eq!(rule["cidr"], f.text("10.20.1.0/24"), "S4: CIDRs are stored canonical");
    let server = host.dual_endpoint(id(&uni), "10.20.0.10", &[id(&srv)]);
    let inside = host.dual_endpoint(id(&uni), "10.20.1.10", &[]);
    let outside = host.dual_endpoint(id(&uni), "10.20.2.10", &[]);
    let _tcp = TcpServer::start_on(&server.ns, f.any(), 7000, "srv");

    assert_eq!(
        tcp_roundtrip(&inside.ns, f.addr(&server), 7000, "in", ALLOWED).as_deref(),
        Some("srv:in")
    );
    assert_dropped(&host, "policy_ingress", "a source outside 10.20.1.0/24", || {
        tcp_connect(&outside.ns, f.addr(&server), 7000, DENIED)
    });
}

/// S5: a group peer admits the members of that group and nobody else.
fn group_rule_admits_members_of_the_peer_group_only(f: Family) {
    let host = Host::start();
    let api = &host.api;
    let uni = api.create_dual_universe("grp", "10.21.0.0/24");
    let srv = api.create_group(id(&uni), "srv");
    let cli = api.create_group(id(&uni), "cli");
    api.add_rule(
        id(&srv),
        &json!({"direction": "ingress", "protocol": "tcp", "from_port": 7000, "to_port": 7000, "group": id(&cli)}),
    );
    let server = host.dual_endpoint(id(&uni), "10.21.0.10", &[id(&srv)]);
    let member = host.dual_endpoint(id(&uni), "10.21.0.20", &[id(&cli)]);
    let stranger = host.dual_endpoint(id(&uni), "10.21.0.30", &[]);
    let _tcp = TcpServer::start_on(&server.ns, f.any(), 7000, "srv");

    assert!(
        tcp_connect(&member.ns, f.addr(&server), 7000, ALLOWED),
        "a member of the peer group is admitted"
    );
    assert_dropped(&host, "policy_ingress", "a non-member -> TCP 7000", || {
        tcp_connect(&stranger.ns, f.addr(&server), 7000, DENIED)
    });
    assert_dropped(&host, "policy_ingress", "the rule admits TCP 7000 only, not ping", || {
        ping(&member.ns, f.addr(&server))
    });
}

/// S4: a port range is inclusive at both ends and admits nothing just outside it, for TCP and
/// for UDP.
fn port_range_admits_ports_inside_and_refuses_ports_just_outside(f: Family) {
    let host = Host::start();
    let api = &host.api;
    let uni = api.create_dual_universe("ports", "10.22.0.0/24");
    let srv = api.create_group(id(&uni), "srv");
    api.add_rule(id(&srv), &json!({"direction": "ingress", "protocol": "tcp", "from_port": 8000, "to_port": 8010, "cidr": f.text("0.0.0.0/0")}));
    api.add_rule(id(&srv), &json!({"direction": "ingress", "protocol": "udp", "from_port": 9001, "to_port": 9003, "cidr": f.text("10.22.0.0/24")}));
    let server = host.dual_endpoint(id(&uni), "10.22.0.10", &[id(&srv)]);
    let client = host.dual_endpoint(id(&uni), "10.22.0.20", &[]);
    let tcp_ports = [7999u16, 8000, 8005, 8010, 8011];
    let udp_ports = [9000u16, 9001, 9003, 9004];
    let _tcp: Vec<_> =
        tcp_ports.iter().map(|&p| TcpServer::start_on(&server.ns, f.any(), p, "t")).collect();
    let _udp: Vec<_> =
        udp_ports.iter().map(|&p| UdpServer::start_on(&server.ns, f.any(), p, "u")).collect();

    for port in [8000, 8005, 8010] {
        assert!(
            tcp_connect(&client.ns, f.addr(&server), port, ALLOWED),
            "TCP {port} is inside 8000-8010"
        );
    }
    for port in [7999, 8011] {
        assert_dropped(&host, "policy_ingress", &format!("TCP {port}, outside 8000-8010"), || {
            tcp_connect(&client.ns, f.addr(&server), port, DENIED)
        });
    }
    for port in [9001, 9003] {
        assert_eq!(
            udp_roundtrip(&client.ns, f.addr(&server), port, "p", ALLOWED).as_deref(),
            Some("u:p"),
            "UDP {port}"
        );
    }
    for port in [9000, 9004] {
        assert_dropped(&host, "policy_ingress", &format!("UDP {port}, outside 9001-9003"), || {
            udp_roundtrip(&client.ns, f.addr(&server), port, "p", DENIED).is_some()
        });
    }
    // The listeners just outside the ranges answer once a rule admits them.
    api.add_rule(
        id(&srv),
        &json!({"direction": "ingress", "protocol": "all", "cidr": f.text("10.22.0.20/32")}),
    );
    for port in [7999, 8011] {
        assert!(tcp_connect(&client.ns, f.addr(&server), port, ALLOWED), "TCP {port} listens");
    }
    for port in [9000, 9004] {
        assert_eq!(
            udp_roundtrip(&client.ns, f.addr(&server), port, "p", ALLOWED).as_deref(),
            Some("u:p"),
            "UDP {port} listens"
        );
    }
}

/// S4: protocol `all` admits TCP, UDP and ICMP from its peer.
fn protocol_all_admits_tcp_udp_and_icmp(f: Family) {
    let host = Host::start();
    let api = &host.api;
    let uni = api.create_dual_universe("all", "10.23.0.0/24");
    let srv = api.create_group(id(&uni), "srv");
    let cli = api.create_group(id(&uni), "cli");
    let server = host.dual_endpoint(id(&uni), "10.23.0.10", &[id(&srv)]);
    let client = host.dual_endpoint(id(&uni), "10.23.0.20", &[id(&cli)]);
    let _tcp = TcpServer::start_on(&server.ns, f.any(), 4242, "s");
    let _udp = UdpServer::start_on(&server.ns, f.any(), 5353, "s");
    assert_dropped(&host, "policy_ingress", "ping, no rule yet", || {
        ping(&client.ns, f.addr(&server))
    });
    assert_dropped(&host, "policy_ingress", "TCP, no rule yet", || {
        tcp_connect(&client.ns, f.addr(&server), 4242, DENIED)
    });
    assert_dropped(&host, "policy_ingress", "UDP, no rule yet", || {
        udp_roundtrip(&client.ns, f.addr(&server), 5353, "u", DENIED).is_some()
    });

    api.add_rule(id(&srv), &json!({"direction": "ingress", "protocol": "all", "group": id(&cli)}));
    assert!(ping(&client.ns, f.addr(&server)), "protocol all admits ICMP");
    assert_eq!(
        tcp_roundtrip(&client.ns, f.addr(&server), 4242, "t", ALLOWED).as_deref(),
        Some("s:t")
    );
    assert_eq!(
        udp_roundtrip(&client.ns, f.addr(&server), 5353, "u", ALLOWED).as_deref(),
        Some("s:u")
    );
}

/// S4: an ICMP rule admits the ICMP type it names (echo request, 8; ICMPv6 128) and not another
/// (timestamp, 13; ICMPv6 node information query, 139), and admits no TCP; over IPv6 the rules
/// are `icmpv6` rules.
fn icmp_type_rule_admits_the_named_type_only(f: Family) {
    let host = Host::start();
    let api = &host.api;
    let uni = api.create_dual_universe("icmp", "10.24.0.0/24");
    let echo = api.create_group(id(&uni), "echo");
    let stamp = api.create_group(id(&uni), "stamp");
    let exact = api.create_group(id(&uni), "exact");
    let all = json!(f.text("0.0.0.0/0"));
    // Echo request (8, or 128 for ICMPv6), and another informational type: timestamp (13), or
    // node information query (139).
    let (icmp, echo_type) = (f.icmp(), f.echo_request());
    let stamp_type = match f {
        Family::V4 => 13,
        Family::V6 => 139,
    };
    let icmp_rule = |ty: i64, code: i64| json!({"direction": "ingress", "protocol": icmp, "icmp_type": ty, "icmp_code": code, "cidr": all});
    api.add_rule(id(&echo), &icmp_rule(echo_type, -1));
    api.add_rule(id(&stamp), &icmp_rule(stamp_type, -1));
    api.add_rule(id(&exact), &icmp_rule(echo_type, 0));
    let s_echo = host.dual_endpoint(id(&uni), "10.24.0.10", &[id(&echo)]);
    let s_stamp = host.dual_endpoint(id(&uni), "10.24.0.11", &[id(&stamp)]);
    let s_exact = host.dual_endpoint(id(&uni), "10.24.0.12", &[id(&exact)]);
    let client = host.dual_endpoint(id(&uni), "10.24.0.20", &[]);
    let _tcp = TcpServer::start_on(&s_echo.ns, f.any(), 7000, "s");

    assert!(ping(&client.ns, f.addr(&s_echo)), "icmp type 8 code any admits echo requests");
    assert!(ping(&client.ns, f.addr(&s_exact)), "icmp type 8 code 0 admits echo requests");
    assert_dropped(&host, "policy_ingress", "icmp type 13 does not admit echo requests", || {
        ping(&client.ns, f.addr(&s_stamp))
    });
    assert_dropped(&host, "policy_ingress", "an ICMP rule admits no TCP", || {
        tcp_connect(&client.ns, f.addr(&s_echo), 7000, DENIED)
    });
    // Both refused workloads answer once a rule admits them.
    api.add_rule(id(&stamp), &icmp_rule(echo_type, -1));
    api.add_rule(id(&echo), &json!({"direction": "ingress", "protocol": "tcp", "from_port": 7000, "to_port": 7000, "cidr": all}));
    assert!(
        ping(&client.ns, f.addr(&s_stamp)),
        "the timestamp-only endpoint answers echo requests"
    );
    assert!(tcp_connect(&client.ns, f.addr(&s_echo), 7000, ALLOWED), "TCP 7000 listens");
}

/// S6: replies of an allowed flow pass although the server has no egress rule at all and the
/// client no ingress rule; a flow in the other direction is still refused.
fn replies_of_allowed_flows_pass_whatever_the_other_sides_rules(f: Family) {
    let host = Host::start();
    let api = &host.api;
    let uni = api.create_dual_universe("reply", "10.25.0.0/24");
    let srv = api.create_group(id(&uni), "srv");
    let cli = api.create_group(id(&uni), "cli");
    api.add_rule(id(&srv), &json!({"direction": "ingress", "protocol": "all", "group": id(&cli)}));
    api.clear_egress(id(&srv));
    assert_eq!(
        api.group(id(&srv))["egress"],
        json!([]),
        "the server's group has no egress rule left"
    );
    let server = host.dual_endpoint(id(&uni), "10.25.0.10", &[id(&srv)]);
    let client = host.dual_endpoint(id(&uni), "10.25.0.20", &[id(&cli)]);
    let _tcp_s = TcpServer::start_on(&server.ns, f.any(), 7000, "s");
    let _udp_s = UdpServer::start_on(&server.ns, f.any(), 7001, "s");
    let _tcp_c = TcpServer::start_on(&client.ns, f.any(), 7000, "c");

    assert!(ping(&client.ns, f.addr(&server)), "S6: the echo reply passes");
    assert_eq!(
        tcp_roundtrip(&client.ns, f.addr(&server), 7000, "q", ALLOWED).as_deref(),
        Some("s:q"),
        "S6: TCP replies pass"
    );
    assert_eq!(
        udp_roundtrip(&client.ns, f.addr(&server), 7001, "q", ALLOWED).as_deref(),
        Some("s:q"),
        "S6: UDP replies pass"
    );

    // The server's group has no egress rule: its new flows stop at its own egress.
    assert_dropped(&host, "policy_egress", "a new TCP flow from the server", || {
        tcp_connect(&server.ns, f.addr(&client), 7000, DENIED)
    });
    assert_dropped(&host, "policy_egress", "a new ping from the server", || {
        ping(&server.ns, f.addr(&client))
    });
    // Once both sides' rules allow it, the same listener answers the server.
    api.add_rule(
        id(&srv),
        &json!({"direction": "egress", "protocol": "all", "cidr": f.text("0.0.0.0/0")}),
    );
    api.add_rule(id(&cli), &json!({"direction": "ingress", "protocol": "all", "group": id(&srv)}));
    assert_eq!(
        tcp_roundtrip(&server.ns, f.addr(&client), 7000, "r", ALLOWED).as_deref(),
        Some("c:r"),
        "the client's listener answers a flow the rules allow"
    );
    assert!(ping(&server.ns, f.addr(&client)), "and the client answers pings");
}

/// S6: the ICMP port unreachable that answers an allowed UDP datagram to a closed port reaches
/// the client (its socket sees ECONNREFUSED), though the client has no ingress rule and the
/// server no egress rule; a datagram the rules refuse gets no answer at all.
fn icmp_error_related_to_an_allowed_flow_reaches_the_client(f: Family) {
    let host = Host::start();
    let api = &host.api;
    let uni = api.create_dual_universe("related", "10.26.0.0/24");
    let srv = api.create_group(id(&uni), "srv");
    let cli = api.create_group(id(&uni), "cli");
    api.add_rule(id(&srv), &json!({"direction": "ingress", "protocol": "udp", "from_port": 9000, "to_port": 9000, "group": id(&cli)}));
    api.clear_egress(id(&srv));
    let server = host.dual_endpoint(id(&uni), "10.26.0.10", &[id(&srv)]);
    let client = host.dual_endpoint(id(&uni), "10.26.0.20", &[id(&cli)]);
    let _udp9001 = UdpServer::start_on(&server.ns, f.any(), 9001, "s");

    // Nothing listens on 9000: the server's kernel answers with ICMP port unreachable.
    assert_eq!(
        udp_exchange(&client.ns, None, f.addr(&server), 9000, "knock", ALLOWED),
        UdpOutcome::Refused,
        "S6: the port unreachable of an allowed flow must reach the client"
    );
    // 9001 listens, but the rules refuse it: no answer, no error, counted.
    assert_dropped(&host, "policy_ingress", "a datagram the rules refuse (UDP 9001)", || {
        udp_exchange(&client.ns, None, f.addr(&server), 9001, "knock", DENIED)
            != UdpOutcome::Timeout
    });
    // The same listener answers once a rule admits 9001.
    api.add_rule(id(&srv), &json!({"direction": "ingress", "protocol": "udp", "from_port": 9001, "to_port": 9001, "group": id(&cli)}));
    assert_eq!(
        udp_roundtrip(&client.ns, f.addr(&server), 9001, "knock", ALLOWED).as_deref(),
        Some("s:knock"),
        "9001 listens"
    );
}

/// S4 and S7: a rule for a protocol number admits that protocol (tracked by addresses and
/// protocol, so the answer passes though the client has no ingress rule) and no other.
fn protocol_number_rule_admits_that_protocol_and_its_replies(f: Family) {
    let host = Host::start();
    let api = &host.api;
    let uni = api.create_dual_universe("proto", "10.27.0.0/24");
    let srv = api.create_group(id(&uni), "srv");
    let cli = api.create_group(id(&uni), "cli");
    let rule = api
        .add_rule(id(&srv), &json!({"direction": "ingress", "protocol": 253, "group": id(&cli)}));
    assert_eq!(rule["protocol"], "253", "a protocol number is shown as its decimal string");
    api.clear_egress(id(&srv));
    let server = host.dual_endpoint(id(&uni), "10.27.0.10", &[id(&srv)]);
    let client = host.dual_endpoint(id(&uni), "10.27.0.20", &[id(&cli)]);
    let _p253 = RawIpServer::start_for(&server.ns, f, 253, "s");
    let _p254 = RawIpServer::start_for(&server.ns, f, 254, "s");

    assert_eq!(
        raw_ip_roundtrip(&client.ns, f.addr(&server), 253, "x", ALLOWED).as_deref(),
        Some("s:x")
    );
    assert_dropped(&host, "policy_ingress", "protocol 254 has no rule", || {
        raw_ip_roundtrip(&client.ns, f.addr(&server), 254, "x", DENIED).is_some()
    });
    assert_dropped(&host, "policy_ingress", "a protocol-253 rule admits no ICMP", || {
        ping(&client.ns, f.addr(&server))
    });
    // The same server answers protocol 254 once a rule admits it.
    api.add_rule(id(&srv), &json!({"direction": "ingress", "protocol": 254, "group": id(&cli)}));
    assert_eq!(
        raw_ip_roundtrip(&client.ns, f.addr(&server), 254, "x", ALLOWED).as_deref(),
        Some("s:x")
    );
}

/// S1: all rules of all groups of an endpoint form one union. One source matches a /16 rule
/// (port 7000), a /24 rule (port 7001), a /32 rule (7002) and a group rule (7003) of two
/// different groups: every one of those ports is admitted, not only the longest match's.
fn overlapping_cidr_and_group_rules_of_several_groups_all_apply(f: Family) {
    let host = Host::start();
    let api = &host.api;
    let uni = api.create_dual_universe("union", "10.28.0.0/16");
    let a = api.create_group(id(&uni), "a");
    let b = api.create_group(id(&uni), "b");
    let cli = api.create_group(id(&uni), "cli");
    let tcp = |port: u16, peer: Value| {
        let mut r =
            json!({"direction": "ingress", "protocol": "tcp", "from_port": port, "to_port": port});
        r.as_object_mut().unwrap().extend(peer.as_object().unwrap().clone());
        r
    };
    api.add_rule(id(&a), &tcp(7000, json!({"cidr": f.text("10.28.0.0/16")})));
    api.add_rule(id(&b), &tcp(7001, json!({"cidr": f.text("10.28.1.0/24")})));
    api.add_rule(id(&a), &tcp(7002, json!({"cidr": f.text("10.28.1.10/32")})));
    api.add_rule(id(&b), &tcp(7003, json!({"group": id(&cli)})));
    let server = host.dual_endpoint(id(&uni), "10.28.0.10", &[id(&a), id(&b)]);
    let client = host.dual_endpoint(id(&uni), "10.28.1.10", &[id(&cli)]);
    let other = host.dual_endpoint(id(&uni), "10.28.2.10", &[]);
    let _servers: Vec<_> =
        (7000..=7004).map(|p| TcpServer::start_on(&server.ns, f.any(), p, "s")).collect();

    for port in 7000..=7003 {
        assert!(
            tcp_connect(&client.ns, f.addr(&server), port, ALLOWED),
            "S1: port {port} is admitted by one of the rules"
        );
    }
    assert_dropped(&host, "policy_ingress", "no rule admits 7004", || {
        tcp_connect(&client.ns, f.addr(&server), 7004, DENIED)
    });
    assert!(tcp_connect(&other.ns, f.addr(&server), 7000, ALLOWED), "10.28.2.10 is in the /16");
    for port in 7001..=7003 {
        assert_dropped(&host, "policy_ingress", &format!("10.28.2.10 -> {port}: no rule"), || {
            tcp_connect(&other.ns, f.addr(&server), port, DENIED)
        });
    }
}

/// Egress rules limit what a member may open: only TCP 7000 to the universe is allowed out, so
/// 7001 is refused at the sender (`policy_egress`) though the receiver admits everything.
fn egress_rules_limit_what_a_member_may_open(f: Family) {
    let host = Host::start();
    let api = &host.api;
    let uni = api.create_dual_universe("egress", "10.29.0.0/24");
    let narrow = api.create_group(id(&uni), "narrow");
    let open = api.create_group(id(&uni), "open");
    api.clear_egress(id(&narrow));
    api.add_rule(id(&narrow), &json!({"direction": "egress", "protocol": "tcp", "from_port": 7000, "to_port": 7000, "cidr": f.text("10.29.0.0/24")}));
    api.add_rule(
        id(&open),
        &json!({"direction": "ingress", "protocol": "all", "cidr": f.text("0.0.0.0/0")}),
    );
    let server = host.dual_endpoint(id(&uni), "10.29.0.10", &[id(&open)]);
    let client = host.dual_endpoint(id(&uni), "10.29.0.20", &[id(&narrow)]);
    let _s0 = TcpServer::start_on(&server.ns, f.any(), 7000, "s");
    let _s1 = TcpServer::start_on(&server.ns, f.any(), 7001, "s");

    assert!(tcp_connect(&client.ns, f.addr(&server), 7000, ALLOWED), "egress admits TCP 7000");
    assert_dropped(&host, "policy_egress", "egress has no rule for TCP 7001", || {
        tcp_connect(&client.ns, f.addr(&server), 7001, DENIED)
    });
    assert_dropped(&host, "policy_egress", "egress has no rule for ICMP", || {
        ping(&client.ns, f.addr(&server))
    });
    // Another endpoint, whose egress allows all, reaches the same listener and pings.
    let free = host.dual_endpoint(id(&uni), "10.29.0.30", &[]);
    assert!(tcp_connect(&free.ns, f.addr(&server), 7001, ALLOWED), "TCP 7001 listens");
    assert!(ping(&free.ns, f.addr(&server)), "the server answers pings");
}

#[test]
fn cidr_rule_admits_sources_inside_the_cidr_only_over_ipv4() {
    cidr_rule_admits_sources_inside_the_cidr_only(Family::V4);
}

#[test]
fn cidr_rule_admits_sources_inside_the_cidr_only_over_ipv6() {
    cidr_rule_admits_sources_inside_the_cidr_only(Family::V6);
}

#[test]
fn group_rule_admits_members_of_the_peer_group_only_over_ipv4() {
    group_rule_admits_members_of_the_peer_group_only(Family::V4);
}

#[test]
fn group_rule_admits_members_of_the_peer_group_only_over_ipv6() {
    group_rule_admits_members_of_the_peer_group_only(Family::V6);
}

#[test]
fn port_range_admits_ports_inside_and_refuses_ports_just_outside_over_ipv4() {
    port_range_admits_ports_inside_and_refuses_ports_just_outside(Family::V4);
}

#[test]
fn port_range_admits_ports_inside_and_refuses_ports_just_outside_over_ipv6() {
    port_range_admits_ports_inside_and_refuses_ports_just_outside(Family::V6);
}

#[test]
fn protocol_all_admits_tcp_udp_and_icmp_over_ipv4() {
    protocol_all_admits_tcp_udp_and_icmp(Family::V4);
}

#[test]
fn protocol_all_admits_tcp_udp_and_icmp_over_ipv6() {
    protocol_all_admits_tcp_udp_and_icmp(Family::V6);
}

#[test]
fn icmp_type_rule_admits_the_named_type_only_over_ipv4() {
    icmp_type_rule_admits_the_named_type_only(Family::V4);
}

#[test]
fn icmp_type_rule_admits_the_named_type_only_over_ipv6() {
    icmp_type_rule_admits_the_named_type_only(Family::V6);
}

#[test]
fn replies_of_allowed_flows_pass_whatever_the_other_sides_rules_over_ipv4() {
    replies_of_allowed_flows_pass_whatever_the_other_sides_rules(Family::V4);
}

#[test]
fn replies_of_allowed_flows_pass_whatever_the_other_sides_rules_over_ipv6() {
    replies_of_allowed_flows_pass_whatever_the_other_sides_rules(Family::V6);
}

#[test]
fn icmp_error_related_to_an_allowed_flow_reaches_the_client_over_ipv4() {
    icmp_error_related_to_an_allowed_flow_reaches_the_client(Family::V4);
}

#[test]
fn icmp_error_related_to_an_allowed_flow_reaches_the_client_over_ipv6() {
    icmp_error_related_to_an_allowed_flow_reaches_the_client(Family::V6);
}

#[test]
fn overlapping_cidr_and_group_rules_of_several_groups_all_apply_over_ipv4() {
    overlapping_cidr_and_group_rules_of_several_groups_all_apply(Family::V4);
}

#[test]
fn overlapping_cidr_and_group_rules_of_several_groups_all_apply_over_ipv6() {
    overlapping_cidr_and_group_rules_of_several_groups_all_apply(Family::V6);
}

#[test]
fn egress_rules_limit_what_a_member_may_open_over_ipv4() {
    egress_rules_limit_what_a_member_may_open(Family::V4);
}

#[test]
fn egress_rules_limit_what_a_member_may_open_over_ipv6() {
    egress_rules_limit_what_a_member_may_open(Family::V6);
}

#[test]
fn protocol_number_rule_admits_that_protocol_and_its_replies_over_ipv4() {
    protocol_number_rule_admits_that_protocol_and_its_replies(Family::V4);
}

#[test]
fn protocol_number_rule_admits_that_protocol_and_its_replies_over_ipv6() {
    protocol_number_rule_admits_that_protocol_and_its_replies(Family::V6);
}
