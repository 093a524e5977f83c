//! S10 across hosts: a host accepts encapsulated traffic only from the underlay IPs of known
//! hosts, only for endpoints the control plane places on the sending host, with the identity the
//! control plane gives them, and only for its own endpoints in the universe the VNI names.
//! Forged VXLAN-GBP packets, crafted by hand and sent with a raw socket from a namespace plugged
//! into the underlay bridge, are dropped by the receiving host and counted under their reason
//! (S11).
use std::net::Ipv4Addr;
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
            VxlanGbp { inner_src: Ipv4Addr::new(10, 0, 0, 30), ..good.clone() },
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
