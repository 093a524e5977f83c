//! S10 across hosts: a host accepts encapsulated traffic only from the underlay IPs of known
//! hosts, only for endpoints the control plane places on the sending host, with the identity the
//! control plane gives them, and only for its own endpoints in the universe the VNI names.
//! Forged VXLAN-GBP packets, crafted by hand and sent with a raw socket from a namespace plugged
//! into the underlay bridge, are dropped by the receiving host and counted under their reason
//! (S11), carrying IPv4 or IPv6.
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use tests::*;

fn id(v: &Value) -> &str {
    v["id"].as_str().expect("resource has an id")
}

fn vni(v: &Value) -> u32 {
    v["vni"].as_u64().and_then(|n| u32::try_from(n).ok()).expect("universe has a vni")
}

/// Blue and red share 10.0.0.0/24. Blue: target T 10.0.0.10 on host C (admits UDP 9000 from
/// anywhere), S 10.0.0.20 on host B, O 10.0.0.30 on host A. Red: 10.0.0.20 on host B,
/// 10.0.0.10 on host A, 10.0.0.40 on host C (a host compiles only the universes it has
/// endpoints of, README "Scale": without one there, host C would not know where red's
/// endpoints are placed and would count the `not_local` forgery below as
/// `not_placed_on_sender`). A forger sits on the underlay at 198.18.0.200.
///
/// A well-formed packet claiming to come from host B for S reaches T (so the crafting is right
/// and every drop below is the check it names); then each forgery is dropped on host C:
/// - from 198.18.0.200, no host: `unknown_host`;
/// - from host B's address for O, which is on host A: `not_placed_on_sender`;
/// - red's VNI (and red 10.0.0.20's identity) for 10.0.0.20 -> 10.0.0.10 (red's .20 is on B,
///   red's .10 is on A, not C): `not_local`, and blue's T never sees it;
/// - a VNI that is no universe: `unknown_universe`;
/// - VXLAN flags without the I bit: `malformed_encap`;
/// - another identity than S's in the Group Policy ID: `identity_mismatch`.
#[test]
fn forged_encapsulated_packets_are_dropped_and_counted() {
    let fleet = Fleet::start(3);
    let api = fleet.api(0);
    let blue = api.create_universe("blue", "10.0.0.0/24");
    let red = api.create_universe("red", "10.0.0.0/24");
    let open = api.create_group(id(&blue), "open");
    api.add_rule(
        id(&open),
        &json!({"direction": "ingress", "protocol": "udp", "from_port": 9000, "to_port": 9000, "cidr": "0.0.0.0/0"}),
    );
    let target = fleet.endpoint(2, id(&blue), "10.0.0.10", &[id(&open)]);
    let sender = fleet.endpoint(1, id(&blue), "10.0.0.20", &[]);
    let _other = fleet.endpoint(0, id(&blue), "10.0.0.30", &[]);
    let red20 = fleet.endpoint(1, id(&red), "10.0.0.20", &[]);
    let red10 = fleet.endpoint(0, id(&red), "10.0.0.10", &[]);
    let _red40 = fleet.endpoint(2, id(&red), "10.0.0.40", &[]);
    let server = UdpServer::start(&target.ns, 9000, "t");

    // The real path works: S (B) -> T (C) on UDP 9000. Its header carries S's identity, which
    // the forger reads off the wire (S10: a receiver checks it against the control plane's).
    let capture = tests::PacketCapture::open(fleet.host(2).netns(), tests::fleet::UNDERLAY_IFACE)
        .expect("capture on host C's underlay");
    assert_eq!(
        udp_roundtrip(&sender.ns, target.ip, 9000, "real", ALLOWED).as_deref(),
        Some("t:real")
    );
    let received = || server.sources().len();
    assert_eq!(received(), 1);
    let seen = capture
        .find(Duration::from_secs(3), |f| vxlan_seen(f).is_some_and(|v| v.inner_src == sender.ip))
        .and_then(|f| vxlan_seen(&f))
        .expect("S's encapsulated datagram on host C's underlay");
    // Red's 10.0.0.20 has an identity of its own, seen on host A's underlay.
    let capture_a = tests::PacketCapture::open(fleet.host(0).netns(), tests::fleet::UNDERLAY_IFACE)
        .expect("capture on host A's underlay");
    assert!(ping(&red20.ns, red10.ip), "red's default group admits its members");
    let red_seen = capture_a
        .find(Duration::from_secs(3), |f| {
            vxlan_seen(f).is_some_and(|v| v.inner_src == red20.ip && v.vni == vni(&red))
        })
        .and_then(|f| vxlan_seen(&f))
        .expect("red 10.0.0.20's encapsulated ping on host A's underlay");

    let forger_ip = Ipv4Addr::new(198, 18, 0, 200);
    let forger = fleet.underlay_node(forger_ip);
    let host_b = underlay_ip(1);
    let host_c = underlay_ip(2);
    let to_target = (target.ip, target.mac.as_str());
    let good = VxlanGbp::datagram(
        (host_b, host_c),
        seen.group,
        vni(&blue),
        sender.ip,
        to_target,
        9000,
        b"control",
    );
    good.send_from(&forger).expect("send the control packet");
    assert!(
        wait_until(Duration::from_secs(3), || received() == 2),
        "a well-formed packet from a known host for an endpoint placed on it is delivered \
         (so the forgeries below differ only in what they forge)"
    );

    let c = fleet.host(2);
    let unknown_vni = vni(&blue).max(vni(&red)) + 1000;
    let forgeries: Vec<(&str, VxlanGbp)> = vec![
        ("unknown_host", VxlanGbp { outer_src: forger_ip, ..good.clone() }),
        (
            "not_placed_on_sender",
            VxlanGbp { inner_src: Ipv4Addr::new(10, 0, 0, 30).into(), ..good.clone() },
        ),
        ("not_local", VxlanGbp { vni: vni(&red), group: red_seen.group, ..good.clone() }),
        ("unknown_universe", VxlanGbp { vni: unknown_vni, ..good.clone() }),
        ("malformed_encap", VxlanGbp { flags: 0x80, ..good.clone() }),
        ("identity_mismatch", VxlanGbp { group: seen.group ^ 0x100, ..good.clone() }),
    ];
    for (reason, packet) in forgeries {
        let before = c.drops(reason);
        assert_dropped(c, reason, &format!("a {reason} forgery to T's listener"), || {
            for _ in 0..3 {
                packet
                    .send_from(&forger)
                    .unwrap_or_else(|e| panic!("send the {reason} forgery: {e}"));
            }
            wait_until(DENIED, || received() > 2)
        });
        assert!(c.drops(reason) >= before + 3, "host C counts each of the three {reason} drops");
        assert_eq!(received(), 2, "the {reason} forgery never reached the workload");
    }
    // The forgeries landed on host C only: the other hosts saw none of them.
    for i in 0..2 {
        for reason in ["unknown_host", "not_placed_on_sender", "not_local", "identity_mismatch"] {
            assert_eq!(fleet.host(i).drops(reason), 0, "host {i} {reason}");
        }
    }
    // Traffic the forger addresses to hosts but not as VXLAN is none of Verse's business: the
    // underlay stays the hosts' own network (ping works).
    assert!(ping(&forger, host_c), "plain underlay traffic to a host passes");
}

/// A dual-stack universe (10.70.0.0/24 and fd00:70::/64), made through host 0's API.
fn dual_universe(fleet: &Fleet, name: &str) -> Value {
    let body = json!({"name": name, "cidr": "10.70.0.0/24", "ipv6_cidrs": ["fd00:70::/64"]});
    let r = fleet.api(0).post("/v1/universes", &body);
    assert_eq!(r.status, 201, "create universe {name}: {}", r.body);
    r.json()
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
