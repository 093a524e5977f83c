//! IPv6 between endpoints of one host, seen from the workloads: versed configures IPv6 in a
//! dual-stack endpoint's namespace, and ping6, TCP and UDP over IPv6 pass exactly as the rules
//! say, the two families judged independently; a workload cannot advertise another's address.
use std::net::{IpAddr, Ipv6Addr};
use std::time::Duration;

use verse::model::CreateEndpoint;

use tests::*;

fn id(v: &Value) -> &str {
    v["id"].as_str().expect("resource has an id")
}

/// A dual-stack universe (`cidr`, `cidr6`), made through the API.
fn dual_universe(api: &Api, name: &str, cidr: &str, cidr6: &str) -> Value {
    let r = api.post("/v1/universes", &json!({"name": name, "cidr": cidr, "ipv6_cidrs": [cidr6]}));
    assert_eq!(r.status, 201, "create universe {name}: {}", r.body);
    r.json()
}

/// A workload with IPv4 `ip` and IPv6 `ipv6` in `groups`.
fn dual_endpoint(host: &Host, universe: &str, ip: &str, ipv6: &str, groups: &[&str]) -> Workload {
    let (w, _) = host.api.plug(CreateEndpoint {
        universe: universe.into(),
        ip: ip.into(),
        ipv6: Some(ipv6.into()),
        security_groups: Some(groups.iter().map(|g| (*g).to_owned()).collect()),
        ..Default::default()
    });
    assert_eq!(w.ipv6, Some(ipv6.parse().unwrap()), "{}", w.json);
    w
}

/// What versed configured on the workload's `eth0`: its IPv6 address as a /128, the link-local
/// address of its MAC (modified EUI-64, the one neighbour discovery may come from), and the
/// default route via the CIDR's gateway.
fn assert_plumbed6(w: &Workload, gateway6: &str) {
    let out = |args: &[&str]| String::from_utf8(w.ns.ip(args).stdout).expect("utf-8");
    let addrs = out(&["-6", "-o", "addr", "show", "dev", "eth0"]);
    let ip6 = w.ipv6.unwrap();
    assert!(addrs.contains(&format!("inet6 {ip6}/128")), "{addrs}");
    let mac = mac_bytes(&w.mac);
    let ll = Ipv6Addr::from(dataplane_common::nd::link_local(mac));
    assert!(addrs.contains(&format!("inet6 {ll}/64")), "link-local {ll} expected in {addrs}");
    assert_eq!(addrs.matches("inet6 ").count(), 2, "no other IPv6 address: {addrs}");
    let routes = out(&["-6", "route", "show", "default"]);
    assert!(routes.contains(&format!("default via {gateway6} dev eth0")), "{routes}");
}

/// ping6, TCP and UDP over IPv6 admitted by IPv6 rules (icmpv6, an IPv6 CIDR, a group); a port
/// no rule admits refused and counted; the IPv4 of the same endpoints judged by IPv4 rules only
/// (an IPv6 rule admits no IPv4, an IPv4 rule no IPv6).
#[test]
fn ipv6_between_endpoints_of_one_host_is_judged_by_the_rules() {
    let host = Host::start();
    let api = &host.api;
    let uni = dual_universe(api, "six", "10.60.0.0/24", "fd00:60::/64");
    let u = id(&uni);
    assert_eq!(uni["ipv6_cidrs"], json!(["fd00:60::/64"]));
    let srv = api.create_group(u, "srv");
    let cli = api.create_group(u, "cli");
    let rule = |r: Value| api.add_rule(id(&srv), &r);
    rule(
        json!({"direction": "ingress", "protocol": "icmpv6", "icmp_type": 128, "icmp_code": -1, "cidr": "::/0"}),
    );
    rule(
        json!({"direction": "ingress", "protocol": "tcp", "from_port": 7000, "to_port": 7000, "cidr": "fd00:60::/64"}),
    );
    rule(
        json!({"direction": "ingress", "protocol": "udp", "from_port": 7001, "to_port": 7001, "group": id(&cli)}),
    );
    let server = dual_endpoint(&host, u, "10.60.0.10", "fd00:60::10", &[id(&srv)]);
    let client = dual_endpoint(&host, u, "10.60.0.20", "fd00:60::20", &[id(&cli)]);
    assert_plumbed6(&server, "fd00:60::1");
    assert_plumbed6(&client, "fd00:60::1");
    let s6 = IpAddr::V6(server.ipv6.unwrap());
    let s4 = IpAddr::V4(server.ip);
    let _tcp6: Vec<_> =
        [7000, 7002].iter().map(|&p| TcpServer::start_on(&server.ns, s6, p, "s6")).collect();
    let _tcp4: Vec<_> =
        [7000, 7002].iter().map(|&p| TcpServer::start_on(&server.ns, s4, p, "s4")).collect();
    let _udp6: Vec<_> =
        [7001, 7003].iter().map(|&p| UdpServer::start_on(&server.ns, s6, p, "s6")).collect();
    let _udp4 = UdpServer::start_on(&server.ns, s4, 7001, "s4");

    assert!(ping(&client.ns, s6), "ping -6, admitted by the icmpv6 echo rule");
    assert_eq!(tcp_roundtrip(&client.ns, s6, 7000, "t", ALLOWED).as_deref(), Some("s6:t"));
    assert_eq!(udp_roundtrip(&client.ns, s6, 7001, "u", ALLOWED).as_deref(), Some("s6:u"));
    // The client's group has no ingress rule: only replies of its own flows reach it.
    assert_dropped(&host, "policy_ingress", "TCP 7002 over IPv6, no rule", || {
        tcp_connect(&client.ns, s6, 7002, DENIED)
    });
    assert_dropped(&host, "policy_ingress", "UDP 7003 over IPv6, no rule", || {
        udp_roundtrip(&client.ns, s6, 7003, "u", DENIED).is_some()
    });
    assert_dropped(
        &host,
        "policy_ingress",
        "ping6 from the server: the client admits none",
        || ping(&server.ns, IpAddr::V6(client.ipv6.unwrap())),
    );

    // IPv4 of the same endpoints: the IPv6 rules admit none of it.
    assert_dropped(&host, "policy_ingress", "ping over IPv4: the icmpv6 rule is IPv6's", || {
        ping(&client.ns, s4)
    });
    assert_dropped(&host, "policy_ingress", "TCP 7000 over IPv4: its rule is fd00:60::/64", || {
        tcp_connect(&client.ns, s4, 7000, DENIED)
    });
    // A group peer covers both families: UDP 7001 over IPv4 passes as over IPv6.
    assert_eq!(udp_roundtrip(&client.ns, s4, 7001, "u", ALLOWED).as_deref(), Some("s4:u"));

    // An IPv4 rule admits IPv4 only; `::/0` then admits IPv6.
    rule(
        json!({"direction": "ingress", "protocol": "tcp", "from_port": 7000, "to_port": 7002, "cidr": "0.0.0.0/0"}),
    );
    assert_eq!(tcp_roundtrip(&client.ns, s4, 7000, "t", ALLOWED).as_deref(), Some("s4:t"));
    assert!(tcp_connect(&client.ns, s4, 7002, ALLOWED), "TCP 7002 over IPv4, admitted");
    assert_dropped(&host, "policy_ingress", "TCP 7002 over IPv6: 0.0.0.0/0 is IPv4's", || {
        tcp_connect(&client.ns, s6, 7002, DENIED)
    });
    rule(
        json!({"direction": "ingress", "protocol": "tcp", "from_port": 7002, "to_port": 7002, "cidr": "::/0"}),
    );
    assert_eq!(tcp_roundtrip(&client.ns, s6, 7002, "t", ALLOWED).as_deref(), Some("s6:t"));
}

/// The one's-complement sum of ICMPv6 over its pseudo-header (RFC 8200 section 8.1).
fn icmp6_checksum(src: &[u8; 16], dst: &[u8; 16], msg: &[u8]) -> u16 {
    let mut data = Vec::with_capacity(40 + msg.len());
    data.extend_from_slice(src);
    data.extend_from_slice(dst);
    data.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    data.extend_from_slice(&[0, 0, 0, 58]);
    data.extend_from_slice(msg);
    if data.len() % 2 == 1 {
        data.push(0);
    }
    let mut sum: u32 = data.chunks(2).map(|c| u32::from(u16::from_be_bytes([c[0], c[1]]))).sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// An ICMPv6 message `icmp` (its checksum field zero: computed here) from `src` to `dst` with
/// hop limit `hop`, in an Ethernet frame from `w`'s MAC to `dst_mac`.
fn icmp6_frame(
    w: &Workload,
    dst_mac: [u8; 6],
    (src, dst): (Ipv6Addr, Ipv6Addr),
    hop: u8,
    mut icmp: Vec<u8>,
) -> Vec<u8> {
    let (src, dst) = (src.octets(), dst.octets());
    let sum = icmp6_checksum(&src, &dst, &icmp);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    let mut f = dst_mac.to_vec();
    f.extend_from_slice(&mac_bytes(&w.mac));
    f.extend_from_slice(&[0x86, 0xdd, 0x60, 0, 0, 0]);
    f.extend_from_slice(&(icmp.len() as u16).to_be_bytes());
    f.extend_from_slice(&[58, hop]);
    f.extend_from_slice(&src);
    f.extend_from_slice(&dst);
    f.extend_from_slice(&icmp);
    f
}

/// An unsolicited neighbour advertisement from `w` (its MAC, its link-local address) to all
/// nodes, for `target`, with `target_mac` as its link-layer address: a frame Linux builds itself
/// for its own addresses only, so it is forged.
fn advertisement(w: &Workload, target: Ipv6Addr, target_mac: [u8; 6]) -> Vec<u8> {
    let src = Ipv6Addr::from(dataplane_common::nd::link_local(mac_bytes(&w.mac)));
    let dst: Ipv6Addr = "ff02::1".parse().unwrap();
    let mut icmp = vec![136, 0, 0, 0, 0x20, 0, 0, 0]; // override, unsolicited
    icmp.extend_from_slice(&target.octets());
    icmp.extend_from_slice(&[2, 1]);
    icmp.extend_from_slice(&target_mac);
    icmp6_frame(w, [0x33, 0x33, 0, 0, 0, 1], (src, dst), 255, icmp)
}

/// A workload that advertises another endpoint's IPv6 address is dropped (`nd_spoofed`), and the
/// other endpoint never sees the advertisement; IPv6 between the two still works.
#[test]
fn advertising_another_endpoints_ipv6_address_is_dropped_as_nd_spoofed() {
    let host = Host::start();
    let api = &host.api;
    let uni = dual_universe(api, "nd", "10.61.0.0/24", "fd00:61::/64");
    let u = id(&uni);
    let g = api.create_group(u, "all");
    api.add_rule(id(&g), &json!({"direction": "ingress", "protocol": "all", "cidr": "::/0"}));
    let a = dual_endpoint(&host, u, "10.61.0.10", "fd00:61::10", &[id(&g)]);
    let b = dual_endpoint(&host, u, "10.61.0.20", "fd00:61::20", &[id(&g)]);
    let b6 = b.ipv6.unwrap();
    assert!(ping(&a.ns, IpAddr::V6(b6)), "ping6 between the two");
    let capture = PacketCapture::open(&b.ns, "eth0").expect("capture on b's eth0");
    let forged = advertisement(&a, b6, mac_bytes(&a.mac));
    // An advertisement naming b's address (the gateway's answers to b name other targets).
    let is_advert = |f: &[u8]| {
        f.len() >= 78 && f[12..14] == [0x86, 0xdd] && f[54] == 136 && f[62..78] == b6.octets()
    };
    assert_dropped(&host, "nd_spoofed", "a's advertisement of b's address", || {
        send_frame(&a.ns, "eth0", &forged).expect("send the advertisement");
        capture.find(DENIED, is_advert).is_some()
    });
    assert!(ping(&a.ns, IpAddr::V6(b6)), "ping6 between the two, after");
}

/// An MLDv2 report (RFC 3810 section 5.2) from `src` (sent by `w`, its MAC) to ff02::16, saying
/// that it listens to `group`: what a stack sends when it joins a group, here forged.
fn mld_report(w: &Workload, src: Ipv6Addr, group: Ipv6Addr) -> Vec<u8> {
    let mut icmp = vec![143, 0, 0, 0, 0, 0, 0, 1, 4, 0, 0, 0]; // one record: to exclude {}
    icmp.extend_from_slice(&group.octets());
    let dst = "ff02::16".parse().unwrap();
    icmp6_frame(w, [0x33, 0x33, 0, 0, 0, 0x16], (src, dst), 1, icmp)
}

/// The multicast listener reports a dual-stack workload's own stack sends (for its
/// solicited-node groups when its interface comes up, for any group it joins) are dropped as
/// `mld_unanswered`, never counted as spoofing; the same report from another endpoint's address
/// is `spoofed_ip`, and reaches nobody.
#[test]
fn a_workloads_own_mld_reports_are_not_counted_as_spoofing() {
    let host = Host::start();
    let api = &host.api;
    let uni = dual_universe(api, "mld", "10.62.0.0/24", "fd00:62::/64");
    let u = id(&uni);
    let g = api.create_group(u, "all");
    api.add_rule(id(&g), &json!({"direction": "ingress", "protocol": "all", "cidr": "::/0"}));
    let a = dual_endpoint(&host, u, "10.62.0.10", "fd00:62::10", &[id(&g)]);
    let b = dual_endpoint(&host, u, "10.62.0.20", "fd00:62::20", &[id(&g)]);
    let b6 = b.ipv6.unwrap();
    assert!(ping(&a.ns, IpAddr::V6(b6)), "ping6 between the two");
    // The workload joins a group: its stack reports it at once (and again, as MLD repeats).
    let group: Ipv6Addr = "ff12::1234".parse().unwrap();
    let before = host.drops("mld_unanswered");
    let socket = a.ns.enter(|| {
        let s = std::net::UdpSocket::bind("[::]:0")?;
        s.join_multicast_v6(&group, 0)?;
        Ok::<_, std::io::Error>(s)
    });
    let _socket = socket.expect("join ff12::1234 in a's namespace");
    let counted = wait_until(Duration::from_secs(5), || host.drops("mld_unanswered") > before);
    assert!(counted, "a's report of ff12::1234 was not counted as mld_unanswered");
    assert_eq!(host.drops("spoofed_ip"), 0, "no report of a's own stack counted as spoofing");
    // The same report with b's address as its source: spoofing, and b sees no report.
    let capture = PacketCapture::open(&b.ns, "eth0").expect("capture on b's eth0");
    let forged = mld_report(&a, b6, group);
    // A report on b's link that b did not send itself (b's stack reports its own groups).
    let b_mac = mac_bytes(&b.mac);
    let is_report =
        |f: &[u8]| f.len() >= 55 && f[6..12] != b_mac && f[12..14] == [0x86, 0xdd] && f[54] == 143;
    assert_dropped(&host, "spoofed_ip", "an MLD report from b's address, sent by a", || {
        send_frame(&a.ns, "eth0", &forged).expect("send the report");
        capture.find(DENIED, is_report).is_some()
    });
    assert!(ping(&a.ns, IpAddr::V6(b6)), "ping6 between the two, after");
}
