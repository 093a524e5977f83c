//! Attack: state that outlives what it belonged to (S7). A tracked flow is bound to the endpoints
//! it was created for: when one of them is deleted, its flows end on every host (the daemons
//! delete every entry that names it before they report the deletion realized), an endpoint
//! created later with the same address never matches them (entries record the endpoints'
//! serials, which are never reused), and a universe created later never gets the VNI of a
//! deleted one.
//!
//! The setup each time: A serves UDP/5353 to group `cli`; B (in `cli`) has a live flow with it,
//! answered both ways. B is deleted and an endpoint B' is made with B's address, in a group that
//! no rule of A admits and that admits nothing itself. Then B' sends on the old flow's 5-tuple,
//! and A answers on it: nothing may arrive (a listener on each side), and the drop counter of
//! the rule that refuses each direction moves.
//!
//! Flows of both families are bound alike (IPv6 ones in `VERSE_CT6`, deleted with the endpoint
//! as IPv4 ones are): each test is one body with a [`Family`] parameter, run over IPv4 and over
//! IPv6, the universes and endpoints dual stack (every IPv4 address with its IPv6 counterpart,
//! [`Family::text`]).
use std::net::{IpAddr, SocketAddr, UdpSocket};

use tests::frames::udp_frame;
use tests::*;

fn id(v: &Value) -> &str {
    v["id"].as_str().expect("resource has an id")
}

/// The old flow: B's port 40000 to A's 5353.
const B_PORT: u16 = 40000;
const A_PORT: u16 = 5353;
/// The gateway MAC of the daemon's default settings (`versed --print-default-config`).
const GATEWAY_MAC: [u8; 6] = [0x02, 0x76, 0x65, 0x72, 0x73, 0x65];

/// A UDP socket in `w`'s namespace bound to `port` of its address of `family`, reading with a
/// short timeout.
fn bound(family: Family, w: &Workload, port: u16) -> UdpSocket {
    let sock =
        w.ns.enter(|| UdpSocket::bind(SocketAddr::from((family.addr(w), port))))
            .expect("bind UDP in the workload");
    sock.set_read_timeout(Some(DENIED)).expect("read timeout");
    sock
}

/// Whether `sock` receives anything within its timeout.
fn receives(sock: &UdpSocket) -> Option<(String, SocketAddr)> {
    let mut buf = [0u8; 256];
    sock.recv_from(&mut buf).ok().map(|(n, from)| (String::from_utf8_lossy(&buf[..n]).into(), from))
}

/// B sends to A and A answers: the flow is tracked both ways.
fn live_flow(a_sock: &UdpSocket, b_sock: &UdpSocket) {
    b_sock.set_read_timeout(Some(ALLOWED)).expect("timeout");
    a_sock.set_read_timeout(Some(ALLOWED)).expect("timeout");
    let a = a_sock.local_addr().expect("A's address");
    b_sock.send_to(b"hello", a).expect("send");
    let (msg, from) = receives(a_sock).expect("A's group admits B");
    assert_eq!(msg, "hello");
    a_sock.send_to(b"welcome", from).expect("answer");
    assert_eq!(receives(b_sock).map(|m| m.0).as_deref(), Some("welcome"), "the answer arrives");
    for s in [a_sock, b_sock] {
        s.set_read_timeout(Some(DENIED)).expect("timeout");
    }
}

/// A's answer on the old flow to B's address, crafted as A's workload would send it (its UDP
/// socket is bound to the port already): a raw frame out of A's interface.
fn answer_on_old_flow(a: &Workload, b_ip: IpAddr) {
    let a_ip = match b_ip {
        IpAddr::V4(_) => IpAddr::V4(a.ip),
        IpAddr::V6(_) => IpAddr::V6(a.ipv6.expect("a dual-stack endpoint")),
    };
    let frame = udp_frame(
        (GATEWAY_MAC, mac_bytes(&a.mac)),
        (a_ip, b_ip),
        (A_PORT, B_PORT),
        b"stale answer",
    );
    send_frame(&a.ns, "eth0", &frame).expect("send the frame from A");
}

/// B' (B's address, new endpoint) sends on the old flow to A: nothing reaches A's listener, and
/// `host` (the one that refuses it) counts it as `reason`.
fn new_endpoint_to_a_is_refused(
    family: Family,
    a_sock: &UdpSocket,
    b2: &Workload,
    host: &Host,
    reason: &str,
) {
    let b2_sock = bound(family, b2, B_PORT);
    assert_dropped(host, reason, "S7: B' -> A on the old flow", || {
        // Three times: a loaded machine may lose one datagram for reasons of its own.
        (0..3).any(|_| {
            let to = a_sock.local_addr().expect("A's address");
            b2_sock.send_to(b"from the new endpoint", to).expect("send");
            receives(a_sock).is_some()
        })
    });
}

/// A answers on the old flow, to B's address, now the new endpoint's: nothing reaches the new
/// endpoint's listener, and `host` counts it as `reason`.
fn a_to_new_endpoint_is_refused(
    family: Family,
    a: &Workload,
    b2: &Workload,
    host: &Host,
    reason: &str,
) {
    let b2_sock = bound(family, b2, B_PORT);
    assert_dropped(host, reason, "S7: A -> B' on the old flow", || {
        (0..3).any(|_| {
            answer_on_old_flow(a, family.addr(b2));
            receives(&b2_sock).is_some()
        })
    });
}

/// Groups of the setup: `srv` admits UDP/5353 from `cli`; `none` has no rule at all; `open`
/// sends anywhere and admits nothing.
fn groups(api: &Api, uni: &str) -> [String; 4] {
    let srv = api.create_group(uni, "srv");
    let cli = api.create_group(uni, "cli");
    api.add_rule(
        id(&srv),
        &json!({"direction": "ingress", "protocol": "udp", "from_port": A_PORT, "to_port": A_PORT, "group": id(&cli)}),
    );
    let none = api.create_group(uni, "none");
    api.clear_egress(id(&none));
    let open = api.create_group(uni, "open");
    [id(&srv).into(), id(&cli).into(), id(&none).into(), id(&open).into()]
}

fn delete_endpoint(api: &Api, w: &Workload) {
    api.client().delete_endpoint(&w.id).expect("delete the endpoint");
}

/// S7 (a), one host: B deleted, B' made with its address in a group without rules.
fn recreated_endpoint_inherits_nothing(family: Family) {
    let host = Host::start();
    let api = &host.api;
    let uni = api.create_dual_universe("stale", "10.81.0.0/24");
    let [srv, cli, none, _] = groups(api, id(&uni));
    let a = host.dual_endpoint(id(&uni), "10.81.0.10", &[&srv]);
    let b = host.dual_endpoint(id(&uni), "10.81.0.20", &[&cli]);
    let a_sock = bound(family, &a, A_PORT);
    let b_sock = bound(family, &b, B_PORT);
    live_flow(&a_sock, &b_sock);
    assert!(!untracked(host.bpf_dir(), family.addr(&b)), "the flow is tracked");

    delete_endpoint(api, &b);
    let b2 = host.dual_endpoint(id(&uni), "10.81.0.20", &[&none]);
    // B' has no egress rule; its address admits nothing.
    new_endpoint_to_a_is_refused(family, &a_sock, &b2, &host, "policy_egress");
    a_to_new_endpoint_is_refused(family, &a, &b2, &host, "policy_ingress");
    // Deleting B deleted every flow it was part of.
    delete_endpoint(api, &b2);
    let b_ip = family.addr(&b);
    assert!(untracked(host.bpf_dir(), b_ip), "an entry of the deleted endpoints is left");
}

#[test]
fn a_recreated_endpoint_inherits_no_flow_of_its_predecessor_over_ipv4() {
    recreated_endpoint_inherits_nothing(Family::V4);
}

#[test]
fn a_recreated_endpoint_inherits_no_flow_of_its_predecessor_over_ipv6() {
    recreated_endpoint_inherits_nothing(Family::V6);
}

/// S7 (a), two hosts: A on one, B on the other. Once B's deletion returns, neither host tracks
/// anything of B's; an endpoint made afterwards on B's host with B's address inherits nothing
/// from either host's entries. Each host judges the direction it receives: B' (which may send
/// anywhere) -> A is refused by A's ingress rules on A's host. One direction per new endpoint:
/// on a fleet the sending host tracks a flow its egress rules allow even when the receiving host
/// refuses it, so once B' has sent to A, A's answer is a reply B' asked for (S6), not an
/// inherited flow. A -> B is therefore tried against B'', made with B's address after B' is
/// deleted in turn: its ingress rules on B's host refuse A's answer.
fn recreated_endpoint_inherits_nothing_on_a_fleet(family: Family) {
    let fleet = Fleet::start(2);
    let api = fleet.api(0);
    let uni = api.create_dual_universe("stale-fleet", "10.82.0.0/24");
    let [srv, cli, _, open] = groups(api, id(&uni));
    let a = fleet.dual_endpoint(0, id(&uni), "10.82.0.10", &[&srv]);
    let b = fleet.dual_endpoint(1, id(&uni), "10.82.0.20", &[&cli]);
    let b_ip = family.addr(&b);
    let a_sock = bound(family, &a, A_PORT);
    let b_sock = bound(family, &b, B_PORT);
    live_flow(&a_sock, &b_sock);
    assert!(!untracked(fleet.host(0).bpf_dir(), b_ip), "A's host tracks the flow too");

    // Deleted through A's host: the call returns once both hosts have realized it.
    delete_endpoint(api, &b);
    for i in 0..2 {
        assert!(
            untracked(fleet.host(i).bpf_dir(), b_ip),
            "S7: host {i} still tracks a flow of the deleted endpoint"
        );
    }
    let b2 = fleet.dual_endpoint(1, id(&uni), "10.82.0.20", &[&open]);
    new_endpoint_to_a_is_refused(family, &a_sock, &b2, fleet.host(0), "policy_ingress");

    delete_endpoint(api, &b2);
    for i in 0..2 {
        assert!(untracked(fleet.host(i).bpf_dir(), b_ip), "host {i} tracks a flow of B'");
    }
    let b3 = fleet.dual_endpoint(1, id(&uni), "10.82.0.20", &[&open]);
    a_to_new_endpoint_is_refused(family, &a, &b3, fleet.host(1), "policy_ingress");
}

#[test]
fn a_recreated_endpoint_inherits_no_flow_on_any_host_of_a_fleet_over_ipv4() {
    recreated_endpoint_inherits_nothing_on_a_fleet(Family::V4);
}

#[test]
fn a_recreated_endpoint_inherits_no_flow_on_any_host_of_a_fleet_over_ipv6() {
    recreated_endpoint_inherits_nothing_on_a_fleet(Family::V6);
}

/// S7 (b): a universe deleted and another made: the new one gets a VNI never seen before, and
/// endpoints made in it with the old addresses inherit nothing of the old universe's flows.
fn new_universe_inherits_nothing(family: Family) {
    let host = Host::start();
    let api = &host.api;
    let old = api.create_dual_universe("old", "10.83.0.0/24");
    let [srv, cli, _, _] = groups(api, id(&old));
    let a = host.dual_endpoint(id(&old), "10.83.0.10", &[&srv]);
    let b = host.dual_endpoint(id(&old), "10.83.0.20", &[&cli]);
    let a_sock = bound(family, &a, A_PORT);
    let b_sock = bound(family, &b, B_PORT);
    live_flow(&a_sock, &b_sock);
    drop((a_sock, b_sock));
    delete_endpoint(api, &a);
    delete_endpoint(api, &b);
    api.client().delete_universe(id(&old)).expect("delete the universe");

    let new = api.create_dual_universe("new", "10.83.0.0/24");
    let [_, _, none, _] = groups(api, id(&new));
    let a2 = host.dual_endpoint(id(&new), "10.83.0.10", &[&none]);
    let a2_sock = bound(family, &a2, A_PORT);
    let b2 = host.dual_endpoint(id(&new), "10.83.0.20", &[&none]);
    // Both have no rule at all: each direction is refused by its sender's egress.
    new_endpoint_to_a_is_refused(family, &a2_sock, &b2, &host, "policy_egress");
    a_to_new_endpoint_is_refused(family, &a2, &b2, &host, "policy_egress");
    assert_ne!(new["vni"], old["vni"], "S7: the VNI of a deleted universe was handed out again");
}

#[test]
fn a_universe_made_after_a_deleted_one_gets_a_new_vni_and_none_of_its_flows_over_ipv4() {
    new_universe_inherits_nothing(Family::V4);
}

#[test]
fn a_universe_made_after_a_deleted_one_gets_a_new_vni_and_none_of_its_flows_over_ipv6() {
    new_universe_inherits_nothing(Family::V6);
}
