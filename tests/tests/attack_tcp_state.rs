//! Attacks on connection tracking's sense of direction (S7, README "Threat model"): only a TCP
//! SYN without ACK, in a flow's original direction, creates a flow; a packet in the reply
//! direction never creates or reopens one. Each attack uses real sockets in workload namespaces
//! on one host; the judges are a real listener on the victim (it must accept nothing) and the
//! `policy_ingress` drop counter (`assert_dropped`).
//!
//! The parties: A (group `a`: egress all, no ingress rule) listens on TCP ports 6000..; B (group
//! `b`) admits TCP 5000 from members of `a`. So A may send B anything on port 5000, and B may
//! open nothing to A: every connection B opens to A must be refused by A's ingress rules.
//!
//! TCP's states are the same over IPv6 (flows tracked in `VERSE_CT6`): each test is one body
//! with a [`Family`] parameter, run over IPv4 and over IPv6, the endpoints dual stack (every
//! IPv4 address with its IPv6 counterpart, [`Family::text`]).
use std::io::{BufRead, BufReader, Write};
use std::net::IpAddr;
use std::time::Duration;

use tests::frames::{tcp, ACK};
use tests::*;

fn id(v: &Value) -> &str {
    v["id"].as_str().expect("resource has an id")
}

/// B's port that A may reach.
const B_PORT: u16 = 5000;

struct World {
    // Workloads before the host: their namespaces go before the daemon does.
    a: Workload,
    b: Workload,
    host: Host,
    /// A's and B's addresses in the family of the test.
    a_ip: IpAddr,
    b_ip: IpAddr,
}

fn world(family: Family, name: &str, cidr: &str, a_ip: &str, b_ip: &str) -> World {
    let host = Host::start();
    let api = &host.api;
    let uni = api.create_dual_universe(name, cidr);
    let ga = api.create_group(id(&uni), "a");
    let gb = api.create_group(id(&uni), "b");
    api.add_rule(
        id(&gb),
        &json!({"direction": "ingress", "protocol": "tcp", "from_port": B_PORT, "to_port": B_PORT, "group": id(&ga)}),
    );
    let a = host.dual_endpoint(id(&uni), a_ip, &[id(&ga)]);
    let b = host.dual_endpoint(id(&uni), b_ip, &[id(&gb)]);
    let (a_ip, b_ip) = (family.addr(&a), family.addr(&b));
    World { a, b, host, a_ip, b_ip }
}

/// Waits until `capture` sees a TCP segment `src:sport -> dst:dport` with exactly `flags`.
fn saw_segment(capture: &PacketCapture, src: (IpAddr, u16), dst: (IpAddr, u16), flags: u8) -> bool {
    saw_segment_within(capture, Duration::from_secs(3), src, dst, flags)
}

/// Whether `capture` sees, within `timeout`, a TCP segment `src:sport -> dst:dport` with
/// exactly `flags`.
fn saw_segment_within(
    capture: &PacketCapture,
    timeout: Duration,
    (src, sport): (IpAddr, u16),
    (dst, dport): (IpAddr, u16),
    flags: u8,
) -> bool {
    capture
        .find(timeout, |f| {
            tcp_segment(f).is_some_and(|s| {
                s.src == src
                    && s.dst == dst
                    && s.sport == sport
                    && s.dport == dport
                    && s.flags == flags
            })
        })
        .is_some()
}

/// A packet that is not a SYN, sent by A to B's open port, with no connection behind it: ACK,
/// FIN+ACK, RST, RST+ACK, PSH+ACK. Before this was fixed, each created a flow (a FIN or RST a
/// closing one), and B's SYN in the reverse direction matched it as a "reply" (or reopened it),
/// reaching A's listener on a port A's rules close to B.
fn without_syn_no_way_back(family: Family) {
    let w = world(family, "tcpnosyn", "10.50.0.0/24", "10.50.0.10", "10.50.0.20");
    let flag_sets: [(u8, &str); 5] =
        [(ACK, "ACK"), (0x11, "FIN+ACK"), (0x04, "RST"), (0x14, "RST+ACK"), (0x18, "PSH+ACK")];
    let listeners: Vec<TcpServer> = (0..flag_sets.len())
        .map(|i| TcpServer::start_on(&w.a.ns, w.a_ip, 6000 + i as u16, "a"))
        .collect();

    // Control: without any crafted packet, B cannot reach A's listener (S1: no rule admits it).
    assert_dropped(&w.host, "policy_ingress", "B's connection to A", || {
        tcp_connect_from(&w.b.ns, (w.b_ip, B_PORT), (w.a_ip, 6000), DENIED).is_ok()
    });

    let raw = RawIpSocket::open_for(&w.a.ns, family, 6).expect("raw TCP socket in A");
    let raw_b = RawIpSocket::open_for(&w.b.ns, family, 6).expect("raw TCP socket in B");
    let capture = PacketCapture::open(&w.b.ns, "eth0").expect("capture on B's eth0");
    let capture_a = PacketCapture::open(&w.a.ns, "eth0").expect("capture on A's eth0");
    for (i, (flags, label)) in flag_sets.iter().enumerate() {
        let a_port = 6000 + i as u16;
        // The crafted segment (TCP checksum 0: Verse does not read it; B's stack discards it,
        // so B answers nothing).
        raw.send_to(w.b_ip, &tcp(a_port, B_PORT, *flags, 0)).expect("send the crafted segment");
        assert!(
            saw_segment(&capture, (w.a_ip, a_port), (w.b_ip, B_PORT), *flags),
            "{label}: A's egress and B's ingress allow it, so it reaches B (the precondition)"
        );

        // B's SYN back on the same ports is judged as the new connection it is.
        let what = format!("B's connection to A:{a_port} after A's {label} (S7: it opens no flow)");
        assert_dropped(&w.host, "policy_ingress", &what, || {
            tcp_connect_from(&w.b.ns, (w.b_ip, B_PORT), (w.a_ip, a_port), DENIED).is_ok()
        });
        assert_eq!(listeners[i].accepted(), 0, "{label}: A's listener accepted nothing");

        // Nor do B's segments without SYN come back as replies (what Linux conntrack with its
        // default `nf_conntrack_tcp_loose = 1` would let through: it picks A's segment up as an
        // established connection). Nothing of B's reaches A's interface.
        let what = format!("B's PSH+ACK to A:{a_port} after A's {label} (S7: no reply to it)");
        assert_dropped(&w.host, "policy_ingress", &what, || {
            raw_b.send_to(w.a_ip, &tcp(B_PORT, a_port, 0x18, 16)).expect("send B's segment");
            saw_segment_within(&capture_a, DENIED, (w.b_ip, B_PORT), (w.a_ip, a_port), 0x18)
        });
    }
}

#[test]
fn a_packet_without_syn_opens_no_way_back_for_the_peer_over_ipv4() {
    without_syn_no_way_back(Family::V4);
}

#[test]
fn a_packet_without_syn_opens_no_way_back_for_the_peer_over_ipv6() {
    without_syn_no_way_back(Family::V6);
}

/// A opens a real connection to B (allowed) and closes it: its flow is tracked, then closing.
/// B then sends a SYN on the same ports in the reverse direction. Before this was fixed, a SYN
/// on a closing flow reopened it whichever way it went, and B reached A's listener on the port A
/// had used, which A's rules close to B.
fn reply_syn_does_not_reopen(family: Family) {
    let w = world(family, "tcpreopen", "10.51.0.0/24", "10.51.0.10", "10.51.0.20");
    let a_port = 6100;
    {
        let _b_server = TcpServer::start_on(&w.b.ns, w.b_ip, B_PORT, "b");
        let stream = tcp_connect_from(&w.a.ns, (w.a_ip, a_port), (w.b_ip, B_PORT), ALLOWED)
            .expect("A's egress and B's ingress allow A -> B:5000");
        stream.set_read_timeout(Some(ALLOWED)).expect("read timeout");
        (&stream).write_all(b"hello\n").expect("write");
        let mut line = String::new();
        BufReader::new(&stream).read_line(&mut line).expect("B answers");
        assert_eq!(line, "b:hello\n");
        // A closes first (A keeps TIME_WAIT); B's server closes its side and stops, which
        // frees B's port 5000 for B's own connection below.
    }
    let listener = TcpServer::start_on(&w.a.ns, w.a_ip, a_port, "a");

    let what = format!(
        "B's connection to A:{a_port} through the closing flow A opened (S7: a SYN in the reply \
         direction never reopens a flow)"
    );
    assert_dropped(&w.host, "policy_ingress", &what, || {
        tcp_connect_from(&w.b.ns, (w.b_ip, B_PORT), (w.a_ip, a_port), DENIED).is_ok()
    });
    assert_eq!(listener.accepted(), 0, "A's listener accepted nothing");
    // The flow A opened is not B's to reuse, but A opens new ones to B as before.
    let _b_server = TcpServer::start_on(&w.b.ns, w.b_ip, B_PORT, "b");
    let stream = tcp_connect_from(&w.a.ns, (w.a_ip, a_port + 1), (w.b_ip, B_PORT), ALLOWED);
    assert!(stream.is_ok(), "A still opens new connections to B:5000: {stream:?}");
}

#[test]
fn a_syn_in_the_reply_direction_does_not_reopen_a_flow_over_ipv4() {
    reply_syn_does_not_reopen(Family::V4);
}

#[test]
fn a_syn_in_the_reply_direction_does_not_reopen_a_flow_over_ipv6() {
    reply_syn_does_not_reopen(Family::V6);
}
