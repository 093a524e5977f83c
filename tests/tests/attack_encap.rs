//! Attacks from the underlay on the identity in the VXLAN-GBP header (S10, README "Threat
//! model"). A receiving host judges encapsulated traffic with the identity the control plane
//! gives the inner source endpoint, never with the Group Policy ID the header claims: a header
//! that claims another identity is dropped and counted `identity_mismatch`.
//!
//! The forger is a machine on the underlay that sends with a fleet host's source address (a
//! process on that host can do the same). It learns the identities the way such a machine can:
//! by reading the VXLAN headers of real traffic (the underlay is not encrypted).
//!
//! The identity is checked alike for the IPv6 a host wraps: the test is one body with a
//! [`Family`] parameter (the family of the inner packets; the underlay is IPv4 either way), run
//! over IPv4 and over IPv6, the universe and endpoints dual stack (every IPv4 address with its
//! IPv6 counterpart, [`Family::text`]).
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use tests::fleet::UNDERLAY_IFACE;
use tests::*;

fn id(v: &Value) -> &str {
    v["id"].as_str().expect("resource has an id")
}

/// The Group Policy ID of the first encapsulated frame `capture` sees with `inner_src`.
fn identity_on_the_wire(capture: &PacketCapture, inner_src: IpAddr) -> u16 {
    let frame = capture
        .find(Duration::from_secs(3), |f| vxlan_seen(f).is_some_and(|v| v.inner_src == inner_src))
        .unwrap_or_else(|| panic!("no encapsulated frame from {inner_src} on the underlay"));
    vxlan_seen(&frame).expect("parsed above").group
}

/// Target T (host C) admits UDP 9000 from members of `admin` only, UDP 9001 from members of
/// `plain`. The privileged endpoint P (`admin`) is on host A, the attacker E (`plain`) on host
/// B. A forger on the underlay sends, with host B's address, E's datagram to T:9000 claiming
/// P's identity: before this was fixed, T received it. Now it is dropped on host C
/// (`identity_mismatch`); the same frame with E's true identity is judged by T's rules
/// (`policy_ingress` on 9000, delivered on 9001), which proves the forged frames are well
/// formed and differ only in the identity they claim.
fn forged_identity_is_dropped(family: Family) {
    let fleet = Fleet::start(3);
    let api = fleet.api(0);
    let uni = api.create_dual_universe("gbp", "10.70.0.0/24");
    let vni = uni["vni"].as_u64().and_then(|n| u32::try_from(n).ok()).expect("vni");
    let admin = api.create_group(id(&uni), "admin");
    let plain = api.create_group(id(&uni), "plain");
    let srv = api.create_group(id(&uni), "srv");
    for (port, from) in [(9000, &admin), (9001, &plain)] {
        api.add_rule(
            id(&srv),
            &json!({"direction": "ingress", "protocol": "udp", "from_port": port, "to_port": port, "group": id(from)}),
        );
    }
    let target = fleet.dual_endpoint(2, id(&uni), "10.70.0.10", &[id(&srv)]);
    let privileged = fleet.dual_endpoint(0, id(&uni), "10.70.0.20", &[id(&admin)]);
    let attacker = fleet.dual_endpoint(1, id(&uni), "10.70.0.30", &[id(&plain)]);
    let (target_ip, privileged_ip, attacker_ip) =
        (family.addr(&target), family.addr(&privileged), family.addr(&attacker));
    let only_admin = UdpServer::start_on(&target.ns, target_ip, 9000, "t0");
    let only_plain = UdpServer::start_on(&target.ns, target_ip, 9001, "t1");

    // The rules, through the real path, and the identities as the underlay shows them.
    let capture = PacketCapture::open(fleet.host(2).netns(), UNDERLAY_IFACE)
        .expect("capture on host C's underlay");
    let real = |w: &Workload, port| udp_roundtrip(&w.ns, target_ip, port, "real", ALLOWED);
    assert_eq!(real(&privileged, 9000).as_deref(), Some("t0:real"), "admin reaches 9000");
    assert_eq!(real(&attacker, 9001).as_deref(), Some("t1:real"), "plain reaches 9001");
    assert_eq!(
        udp_roundtrip(&attacker.ns, target_ip, 9000, "real", DENIED),
        None,
        "plain does not reach 9000"
    );
    let id_admin = identity_on_the_wire(&capture, privileged_ip);
    let id_plain = identity_on_the_wire(&capture, attacker_ip);
    assert_ne!(id_admin, id_plain, "two sets of groups, two identities");

    let forger = fleet.underlay_node(Ipv4Addr::new(198, 18, 0, 200));
    let c = fleet.host(2);
    let hosts = (underlay_ip(1), underlay_ip(2));
    let to_target = (target_ip, target.mac.as_str());
    let forged = VxlanGbp::datagram(hosts, id_admin, vni, attacker_ip, to_target, 9000, b"forged");
    let from = |port| SocketAddr::from((attacker_ip, port));
    let got =
        |server: &UdpServer, port| server.sources().iter().filter(|s| **s == from(port)).count();

    // The attack: E's address, P's identity.
    let mismatch = c.drops("identity_mismatch");
    assert_dropped(c, "identity_mismatch", "E's datagram claiming P's identity", || {
        for _ in 0..3 {
            forged.send_from(&forger).expect("send the forged frame");
        }
        wait_until(DENIED, || got(&only_admin, 40000) > 0)
    });
    assert!(c.drops("identity_mismatch") >= mismatch + 3, "each forged frame is counted");

    // The same frame with E's true identity: judged by T's rules, which refuse it on 9000...
    let mismatch = c.drops("identity_mismatch");
    assert_dropped(c, "policy_ingress", "E's datagram to 9000 with its true identity", || {
        VxlanGbp { group: id_plain, src_port: 40001, ..forged.clone() }
            .send_from(&forger)
            .expect("send");
        wait_until(DENIED, || got(&only_admin, 40001) > 0)
    });
    assert_eq!(c.drops("identity_mismatch"), mismatch, "and is no identity mismatch");

    // ...and admit it on 9001: the forger's frames are well formed.
    VxlanGbp { group: id_plain, src_port: 40002, dst_port: 9001, ..forged.clone() }
        .send_from(&forger)
        .expect("send");
    assert!(
        wait_until(Duration::from_secs(3), || got(&only_plain, 40002) == 1),
        "E's true identity reaches the port its group may reach"
    );

    // What an unencrypted underlay still allows (README, "Threat model"): with P's host's
    // address, a forger sends as P, within P's identity.
    VxlanGbp {
        outer_src: underlay_ip(0),
        inner_src: privileged_ip,
        src_port: 40003,
        ..forged.clone()
    }
    .send_from(&forger)
    .expect("send");
    assert!(
        wait_until(Duration::from_secs(3), || only_admin
            .sources()
            .contains(&SocketAddr::from((privileged_ip, 40003)))),
        "a frame from P's host, as P, with P's identity, is P's traffic"
    );
}

#[test]
fn a_forged_group_policy_id_is_dropped_and_the_true_one_is_judged_by_the_rules_over_ipv4() {
    forged_identity_is_dropped(Family::V4);
}

#[test]
fn a_forged_group_policy_id_is_dropped_and_the_true_one_is_judged_by_the_rules_over_ipv6() {
    forged_identity_is_dropped(Family::V6);
}
