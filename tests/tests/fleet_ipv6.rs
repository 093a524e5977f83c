//! Both families between hosts, seen from the workloads: dual-stack endpoints on two hosts, the
//! same policy body run over IPv4 and over IPv6 (ping, TCP and UDP admitted by rules, refused and
//! counted `policy_ingress` on the receiver's host when no rule admits them, a CIDR rule of the
//! other family admitting nothing); and forged IPv6 on the underlay (another identity in the
//! VXLAN-GBP header, an inner IPv6 source that is not the sending host's endpoint) dropped and
//! counted by the receiving host, never reaching the victim's socket.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use tests::*;

fn id(v: &Value) -> &str {
    v["id"].as_str().expect("resource has an id")
}

fn vni(v: &Value) -> u32 {
    v["vni"].as_u64().and_then(|n| u32::try_from(n).ok()).expect("universe has a vni")
}

const CIDR4: &str = "10.70.0.0/24";
const CIDR6: &str = "fd00:70::/64";

/// What the policy body needs of a family besides the workloads' addresses.
trait Rules {
    fn cidr(self) -> &'static str;
    fn other_cidr(self) -> &'static str;
    fn echo_rule(self, group: &str) -> Value;
}

impl Rules for Family {
    /// The universe's CIDR of this family, and of the other one.
    fn cidr(self) -> &'static str {
        match self {
            Family::V4 => CIDR4,
            Family::V6 => CIDR6,
        }
    }

    fn other_cidr(self) -> &'static str {
        match self {
            Family::V4 => CIDR6,
            Family::V6 => CIDR4,
        }
    }

    /// A rule admitting this family's echo requests from the members of `group`.
    fn echo_rule(self, group: &str) -> Value {
        let (protocol, ty) = match self {
            Family::V4 => ("icmp", 8),
            Family::V6 => ("icmpv6", 128),
        };
        json!({"direction": "ingress", "protocol": protocol, "icmp_type": ty, "icmp_code": -1, "group": group})
    }
}

/// A dual-stack universe (10.70.0.0/24 and fd00:70::/64), made through host 0's API.
fn dual_universe(fleet: &Fleet, name: &str) -> Value {
    let body = json!({"name": name, "cidr": CIDR4, "ipv6_cidrs": [CIDR6]});
    let r = fleet.api(0).post("/v1/universes", &body);
    assert_eq!(r.status, 201, "create universe {name}: {}", r.body);
    r.json()
}

/// The body both families run: a server on host B, a client on host A. The server's group
/// admits echo requests from the client's group, TCP 7000 from the family's CIDR, UDP 7001 from
/// the client's group and TCP 7004 from the *other* family's CIDR; the client's group admits
/// nothing. Allowed traffic crosses the hosts and is answered; TCP 7002, UDP 7003 and TCP 7004,
/// whose servers listen, are refused by host B (`policy_ingress`), and the server's ping by host
/// A.
fn rules_hold_across_hosts(family: Family) {
    let fleet = Fleet::start(2);
    let api = fleet.api(0);
    let uni = dual_universe(&fleet, "both");
    let u = id(&uni);
    let srv = api.create_group(u, "srv");
    let cli = fleet.api(1).create_group(u, "cli");
    let (srv, cli) = (id(&srv), id(&cli));
    api.add_rule(srv, &family.echo_rule(cli));
    let tcp_from = |port: u16, cidr: &str| json!({"direction": "ingress", "protocol": "tcp", "from_port": port, "to_port": port, "cidr": cidr});
    api.add_rule(srv, &tcp_from(7000, family.cidr()));
    api.add_rule(srv, &tcp_from(7004, family.other_cidr()));
    fleet.api(1).add_rule(
        srv,
        &json!({"direction": "ingress", "protocol": "udp", "from_port": 7001, "to_port": 7001, "group": cli}),
    );
    let server = fleet.endpoint6(1, u, ("10.70.0.10", "fd00:70::10"), &[srv]);
    let client = fleet.endpoint6(0, u, ("10.70.0.20", "fd00:70::20"), &[cli]);
    let (s, c) = (family.addr(&server), family.addr(&client));
    let _tcp: Vec<_> =
        [7000, 7002, 7004].iter().map(|&p| TcpServer::start_on(&server.ns, s, p, "srv")).collect();
    let _udp: Vec<_> =
        [7001, 7003].iter().map(|&p| UdpServer::start_on(&server.ns, s, p, "srv")).collect();
    let (host_a, host_b) = (fleet.host(0), fleet.host(1));

    assert!(ping(&client.ns, s), "{family:?}: the client (A) pings the server (B)");
    assert_eq!(
        tcp_roundtrip(&client.ns, s, 7000, "t", ALLOWED).as_deref(),
        Some("srv:t"),
        "{family:?}: TCP 7000 across hosts, admitted by the CIDR rule"
    );
    assert_eq!(
        udp_roundtrip(&client.ns, s, 7001, "u", ALLOWED).as_deref(),
        Some("srv:u"),
        "{family:?}: UDP 7001 across hosts, admitted by the group rule"
    );
    assert_dropped(host_b, "policy_ingress", &format!("{family:?}: TCP 7002, no rule"), || {
        tcp_connect(&client.ns, s, 7002, DENIED)
    });
    assert_dropped(host_b, "policy_ingress", &format!("{family:?}: UDP 7003, no rule"), || {
        udp_roundtrip(&client.ns, s, 7003, "u", DENIED).is_some()
    });
    assert_dropped(
        host_b,
        "policy_ingress",
        &format!("{family:?}: TCP 7004, admitted for the other family's CIDR only"),
        || tcp_connect(&client.ns, s, 7004, DENIED),
    );
    assert_dropped(
        host_a,
        "policy_ingress",
        &format!("{family:?}: the server's ping, which the client's group admits not"),
        || ping(&server.ns, c),
    );
}

#[test]
fn ipv4_between_hosts_is_judged_by_the_rules() {
    rules_hold_across_hosts(Family::V4);
}

#[test]
fn ipv6_between_hosts_is_judged_by_the_rules() {
    rules_hold_across_hosts(Family::V6);
}

/// The Group Policy ID of the first frame on `capture` that wraps an IPv6 packet from `src`.
fn identity6_on_the_wire(capture: &PacketCapture, src: Ipv6Addr) -> u16 {
    let wraps = |f: &[u8]| {
        f.len() >= 64 + 40
            && f[12..14] == [0x08, 0x00]
            && f[36..38] == tests::fleet::VXLAN_PORT.to_be_bytes()
            && f[62..64] == [0x86, 0xdd]
            && f[72..88] == src.octets()
    };
    let frame = capture
        .find(Duration::from_secs(3), wraps)
        .unwrap_or_else(|| panic!("no wrapped IPv6 frame from {src} on the underlay"));
    u16::from_be_bytes([frame[44], frame[45]])
}

/// An IPv6 UDP datagram from `src` to the workload `to` (its address and MAC) on port 9000, as
/// an inner Ethernet frame.
fn udp6_frame(src: Ipv6Addr, to: &Workload, payload: &[u8]) -> Vec<u8> {
    let (s, d) = (src.octets(), to.ipv6.expect("dual stack").octets());
    let ip = frames::ipv6(s, d, 17, &frames::udp6(s, d, 40000, 9000, payload));
    frames::ethernet(mac_bytes(&to.mac), [0x02, 0, 0, 0, 0, 0x01], frames::ETH_IPV6, &ip)
}

/// S10 for IPv6: a forger on the underlay sends IPv6 wrapped as host A would. A well-formed
/// datagram from host A's sender reaches the target on host B (so the crafting is right); the
/// same with another identity in the header is `identity_mismatch`, and with an inner IPv6
/// source that is no endpoint of host A's (one of host B's own, or nobody's) is
/// `not_placed_on_sender`, each counted by host B and never seen by the target's socket.
#[test]
fn forged_ipv6_on_the_underlay_is_dropped_and_counted() {
    let fleet = Fleet::start(2);
    let api = fleet.api(0);
    let uni = dual_universe(&fleet, "forged");
    let u = id(&uni);
    let open = api.create_group(u, "open");
    api.add_rule(
        id(&open),
        &json!({"direction": "ingress", "protocol": "udp", "from_port": 9000, "to_port": 9000, "cidr": "::/0"}),
    );
    let sender = fleet.endpoint6(0, u, ("10.70.0.20", "fd00:70::20"), &[]);
    let target = fleet.endpoint6(1, u, ("10.70.0.10", "fd00:70::10"), &[id(&open)]);
    let beside = fleet.endpoint6(1, u, ("10.70.0.11", "fd00:70::11"), &[]);
    let t6 = IpAddr::V6(target.ipv6.unwrap());
    let server = UdpServer::start_on(&target.ns, t6, 9000, "t");
    let received = || server.sources().len();

    // The real path, whose header carries the sender's identity.
    let capture = PacketCapture::open(fleet.host(1).netns(), tests::fleet::UNDERLAY_IFACE)
        .expect("capture on host B's underlay");
    assert_eq!(udp_roundtrip(&sender.ns, t6, 9000, "real", ALLOWED).as_deref(), Some("t:real"));
    assert_eq!(received(), 1);
    let group = identity6_on_the_wire(&capture, sender.ipv6.unwrap());

    let forger = fleet.underlay_node(Ipv4Addr::new(198, 18, 0, 200));
    let hosts = (underlay_ip(0), underlay_ip(1));
    let wrap = |group: u16, src: Ipv6Addr, payload: &[u8]| {
        encapsulated(hosts, 50000, 0x88, group, vni(&uni), &udp6_frame(src, &target, payload))
    };
    send_encapsulated(&forger, &wrap(group, sender.ipv6.unwrap(), b"control"))
        .expect("send the control datagram");
    assert!(
        wait_until(Duration::from_secs(3), || received() == 2),
        "a well-formed IPv6 datagram wrapped by host A for its endpoint is delivered"
    );

    let b = fleet.host(1);
    let forgeries = [
        ("identity_mismatch", wrap(group ^ 0x100, sender.ipv6.unwrap(), b"identity")),
        ("not_placed_on_sender", wrap(group, beside.ipv6.unwrap(), b"beside")),
        ("not_placed_on_sender", wrap(group, "fd00:70::99".parse().unwrap(), b"nobody")),
    ];
    for (reason, packet) in forgeries {
        let before = b.drops(reason);
        assert_dropped(
            b,
            reason,
            &format!("a {reason} IPv6 forgery to the target's socket"),
            || {
                for _ in 0..3 {
                    send_encapsulated(&forger, &packet).expect("send the forgery");
                }
                wait_until(DENIED, || received() > 2)
            },
        );
        assert!(b.drops(reason) >= before + 3, "host B counts each of the three {reason} drops");
        assert_eq!(received(), 2, "the {reason} forgery never reached the target's socket");
    }
}
