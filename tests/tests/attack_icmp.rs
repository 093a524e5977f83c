//! Attacks with ICMP errors (S6, README "Threat model"). An ICMP error related to a tracked flow
//! is admitted without a rule, so path-MTU discovery works; it must then come from that flow's
//! peer, be an error (destination unreachable codes 0-15, time exceeded 0-1, parameter problem
//! 0-2) and be no longer than a router's (576 bytes of IPv4, RFC 1812 4.3.2.3). Anything else is
//! ordinary ICMP, judged by the rules.
//!
//! The parties, in one universe: the victim V (group `victim`: egress all, no ingress rule at
//! all) talks to its peer P (group `peer`: admits UDP 9000 and TCP 7000 from `victim`); the
//! stranger S (group `stranger`: egress all) is part of none of V's flows. Crafted errors are
//! sent with raw ICMP sockets from the workloads' own namespaces (their source addresses are
//! their own: anti-spoofing holds). The judges are the victim's own sockets — a connected UDP
//! socket with `IP_RECVERR` turns every ICMP error about its datagrams into a socket error
//! (port unreachable `ECONNREFUSED`, time exceeded `EHOSTUNREACH`, parameter problem `EPROTO`),
//! a TCP connection's path MTU (`IP_MTU`) falls when a "fragmentation needed" is accepted — a
//! raw ICMP socket in V that sees every ICMP message V receives, and the drop counters of the
//! victim's host (`assert_dropped`).
//!
//! Each attack runs on one host (`from_endpoint` judges) and across three hosts (V, P and S on
//! different hosts: `from_underlay` of V's host judges what arrives wrapped).
use std::io::{BufRead, BufReader, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

use tests::frames::{icmp, ipv4, tcp, udp, ACK};
use tests::*;

fn id(v: &Value) -> &str {
    v["id"].as_str().expect("resource has an id")
}

const UDP_PORT: u16 = 9000;
const TCP_PORT: u16 = 7000;

/// Who keeps the daemons alive: one host or a fleet (the victim on its first host).
enum Daemons {
    // Boxed, both: their sizes differ much, and which is the larger changes with the harness.
    One(Box<Host>),
    Fleet(Box<Fleet>),
}

struct World {
    // Workloads before the daemons: their namespaces go first.
    victim: Workload,
    peer: Workload,
    stranger: Workload,
    victim_group: String,
    peer_group: String,
    daemons: Daemons,
}

impl World {
    /// The host the victim is on: the one that must refuse what is not for it.
    fn victim_host(&self) -> &Host {
        match &self.daemons {
            Daemons::One(host) => host,
            Daemons::Fleet(fleet) => fleet.host(0),
        }
    }
    fn api(&self) -> &Api {
        &self.victim_host().api
    }
}

/// Creates endpoint `i` (0 victim, 1 peer, 2 stranger) in a universe with an address and groups.
type Place<'a> = &'a dyn Fn(usize, &str, &str, &[&str]) -> Workload;

/// The universe, its groups and the three endpoints, made through `api` and placed by `place`.
fn populate(api: &Api, place: Place<'_>) -> (Workload, Workload, Workload, String, String) {
    let uni = api.create_universe("icmp", "10.60.0.0/24");
    let victim = api.create_group(id(&uni), "victim");
    let peer = api.create_group(id(&uni), "peer");
    let stranger = api.create_group(id(&uni), "stranger");
    for (proto, port) in [("udp", UDP_PORT), ("tcp", TCP_PORT)] {
        api.add_rule(
            id(&peer),
            &json!({"direction": "ingress", "protocol": proto, "from_port": port, "to_port": port, "group": id(&victim)}),
        );
    }
    let v = place(0, id(&uni), "10.60.0.10", &[id(&victim)]);
    let p = place(1, id(&uni), "10.60.0.20", &[id(&peer)]);
    let s = place(2, id(&uni), "10.60.0.30", &[id(&stranger)]);
    (v, p, s, id(&victim).to_owned(), id(&peer).to_owned())
}

fn one_host() -> World {
    let host = Host::start();
    let (victim, peer, stranger, victim_group, peer_group) =
        populate(&host.api, &|_, u, ip, g| host.endpoint(u, ip, g));
    let daemons = Daemons::One(Box::new(host));
    World { victim, peer, stranger, victim_group, peer_group, daemons }
}

fn three_hosts() -> World {
    let fleet = Fleet::start(3);
    let (victim, peer, stranger, victim_group, peer_group) =
        populate(fleet.api(0), &|i, u, ip, g| fleet.endpoint(i, u, ip, g));
    let daemons = Daemons::Fleet(Box::new(fleet));
    World { victim, peer, stranger, victim_group, peer_group, daemons }
}

/// The first 28 bytes of the datagram the victim's probe sent to the peer: what an ICMP error
/// about it quotes (RFC 792: the IPv4 header and 8 bytes of payload).
fn udp_quote(w: &World, probe: &UdpProbe) -> Vec<u8> {
    ipv4(w.victim.ip.octets(), w.peer.ip.octets(), 17, &udp(probe.local_port(), UDP_PORT, b"flow"))
        [..28]
        .to_vec()
}

/// An ICMP error of `ty`/`code` quoting `quote`, padded with zeros after the quote so that the
/// whole IPv4 datagram is `total` bytes long (at least the natural length).
fn error_of_size(ty: u8, code: u8, rest: [u8; 4], quote: &[u8], total: usize) -> Vec<u8> {
    let mut payload = quote.to_vec();
    payload.resize(payload.len().max(total.saturating_sub(20 + 8)), 0);
    icmp(ty, code, rest, &payload)
}

/// Sends `message` (an ICMP message) from `from`'s namespace to the victim.
fn send_icmp(from: &Workload, to: Ipv4Addr, message: &[u8]) {
    RawIpSocket::open(&from.ns, 1)
        .and_then(|s| s.send_to(to, message))
        .unwrap_or_else(|e| panic!("send ICMP from {}: {e}", from.ip));
}

/// A UDP flow from the victim to the peer, tracked: the datagram reached the peer's socket.
fn udp_flow(w: &World, sink: &UdpSocket) -> UdpProbe {
    let probe = UdpProbe::open(&w.victim.ns, w.peer.ip, UDP_PORT).expect("victim's UDP probe");
    let mut buf = [0u8; 64];
    let got = sink.recv_from(&mut buf).expect("the peer receives the victim's datagram");
    assert_eq!(got.1, SocketAddr::from((w.victim.ip, probe.local_port())));
    probe
}

/// The next sequence number the victim's side of `stream` will send, read from the segments a
/// capture on the victim's interface saw: a "fragmentation needed" about the connection must
/// quote a sequence number in the sender's window, or Linux ignores it.
fn next_seq(capture: &PacketCapture, w: &World, local_port: u16) -> u32 {
    let mut next = None;
    while let Some(frame) = capture.next(Duration::from_millis(300)) {
        if let Some(s) = tcp_segment(&frame) {
            if s.src == w.victim.ip && s.sport == local_port && s.dport == TCP_PORT {
                let end = s.seq.wrapping_add(s.payload_len as u32) + u32::from(s.flags & 0x03 != 0); // SYN or FIN count one
                next = Some(next.map_or(end, |n: u32| n.max(end)));
            }
        }
    }
    next.expect("the capture saw the victim's segments")
}

/// Whether the victim's route to the peer carries a learnt path MTU of 552 (`ip route get`).
fn route_mtu_552(w: &World) -> bool {
    let out = w.victim.ns.exec("ip", &["route", "get", &w.peer.ip.to_string()]);
    String::from_utf8_lossy(&out.stdout).contains("mtu 552")
}

fn scenario(w: &World) {
    let sink = w
        .peer
        .ns
        .enter(|| UdpSocket::bind((Ipv4Addr::UNSPECIFIED, UDP_PORT)))
        .expect("the peer's silent UDP socket");
    sink.set_read_timeout(Some(ALLOWED)).expect("timeout");
    let _tcp = TcpServer::start(&w.peer.ns, TCP_PORT, "p");
    let seen = IcmpListener::start(&w.victim.ns);
    const QUIET: Duration = Duration::from_millis(700);

    // 1. Errors of every kind from the stranger, each quoting a tracked flow between V and P.
    let kinds = [
        (3u8, 3u8, libc::ECONNREFUSED, "port unreachable"),
        (11, 0, libc::EHOSTUNREACH, "time exceeded"),
        (12, 0, libc::EPROTO, "parameter problem"),
    ];
    for (ty, code, errno, what) in kinds {
        let probe = udp_flow(w, &sink);
        let attack = format!("a {what} from a stranger (S6: only the flow's peer is related)");
        assert_dropped(w.victim_host(), "policy_ingress", &attack, || {
            send_icmp(&w.stranger, w.victim.ip, &icmp(ty, code, [0; 4], &udp_quote(w, &probe)));
            probe.error(QUIET).is_some()
        });
        // The same error from the peer is related: the victim's socket reports it. (This is
        // what proves the crafted error is one the victim's kernel would act on.)
        send_icmp(&w.peer, w.victim.ip, &icmp(ty, code, [0; 4], &udp_quote(w, &probe)));
        assert_eq!(probe.error(ALLOWED), Some(errno), "the peer's {what} is admitted (S6)");
    }
    assert!(
        seen.from(w.stranger.ip).is_empty(),
        "the victim received ICMP from the stranger: {:?}",
        seen.from(w.stranger.ip)
    );

    // 2. "Fragmentation needed" from the stranger quoting the victim's TCP connection to the
    // peer, with the right sequence number and a next-hop MTU of 68: the victim's path MTU to
    // the peer must not fall (Linux would clamp it to 552).
    let capture = PacketCapture::open(&w.victim.ns, "eth0").expect("capture on the victim");
    let addr = SocketAddr::from((w.peer.ip, TCP_PORT));
    let stream = w
        .victim
        .ns
        .enter(|| TcpStream::connect_timeout(&addr, ALLOWED))
        .expect("the victim connects to the peer");
    stream.set_read_timeout(Some(ALLOWED)).expect("timeout");
    (&stream).write_all(b"x\n").expect("write");
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line).expect("the peer answers");
    assert_eq!(line, "p:x\n");
    let local = stream.local_addr().expect("local address").port();
    let seq = next_seq(&capture, w, local);
    let mtu_before = ip_mtu(&stream).expect("IP_MTU");
    assert!(mtu_before > 552 && !route_mtu_552(w), "no path MTU learnt yet ({mtu_before})");
    let mut quote =
        ipv4(w.victim.ip.octets(), w.peer.ip.octets(), 6, &tcp(local, TCP_PORT, ACK, 1400));
    quote.truncate(28);
    quote[24..28].copy_from_slice(&seq.to_be_bytes());
    let frag_needed = icmp(3, 4, [0, 0, 0, 68], &quote);
    let attack = "a stranger's fragmentation-needed lowering the victim's path MTU (S6)";
    assert_dropped(w.victim_host(), "policy_ingress", attack, || {
        send_icmp(&w.stranger, w.victim.ip, &frag_needed);
        wait_until(QUIET, || ip_mtu(&stream).is_ok_and(|m| m != mtu_before))
    });
    assert!(!route_mtu_552(w), "the victim's route to the peer learnt no MTU");

    // 3. An error from the real peer longer than a router's (RFC 1812: 576 bytes of IPv4) is
    // not related: judged by the rules, which admit no ICMP to the victim. 576 bytes is.
    let probe = udp_flow(w, &sink);
    for total in [1256, 577] {
        let long = error_of_size(3, 3, [0; 4], &udp_quote(w, &probe), total);
        let attack = format!("the peer's {total}-byte port unreachable");
        assert_dropped(w.victim_host(), "policy_ingress", &attack, || {
            send_icmp(&w.peer, w.victim.ip, &long);
            probe.error(QUIET).is_some()
        });
    }
    assert!(
        seen.from(w.peer.ip).iter().all(|m| m.len <= 576),
        "the victim received an oversized error: {:?}",
        seen.from(w.peer.ip)
    );
    send_icmp(&w.peer, w.victim.ip, &error_of_size(3, 3, [0; 4], &udp_quote(w, &probe), 576));
    assert_eq!(probe.error(ALLOWED), Some(libc::ECONNREFUSED), "576 bytes is a router's size");

    // 4. The peer's own fragmentation-needed about the connection is related: the path MTU
    // falls to Linux's floor, 552. (The same bytes as the stranger's: only the source differs.)
    send_icmp(&w.peer, w.victim.ip, &frag_needed);
    assert!(
        wait_until(Duration::from_secs(3), || ip_mtu(&stream).is_ok_and(|m| m == 552)),
        "the peer's fragmentation-needed lowers the path MTU (path-MTU discovery works, S6)"
    );

    // 5. ICMP messages quoting a tracked flow that are not errors (types or codes outside
    // the errors) are ordinary ICMP: judged by the rules...
    let not_errors = [(3u8, 16u8), (11, 2), (12, 3), (5, 1), (4, 0)];
    let probe = udp_flow(w, &sink);
    for (ty, code) in not_errors {
        let attack = format!("ICMP type {ty} code {code} (no error) quoting a tracked flow");
        assert_dropped(w.victim_host(), "policy_ingress", &attack, || {
            send_icmp(&w.peer, w.victim.ip, &icmp(ty, code, [0; 4], &udp_quote(w, &probe)));
            wait_until(QUIET, || seen.from(w.peer.ip).iter().any(|m| (m.ty, m.code) == (ty, code)))
        });
    }
    let got = seen.from(w.peer.ip);
    assert!(
        !got.iter().any(|m| not_errors.contains(&(m.ty, m.code))),
        "the victim received a non-error ICMP message without a rule: {got:?}"
    );
    // ...which admit them once a rule says so.
    w.api().add_rule(
        &w.victim_group,
        &json!({"direction": "ingress", "protocol": "icmp", "icmp_type": 5, "icmp_code": -1, "group": w.peer_group}),
    );
    send_icmp(&w.peer, w.victim.ip, &icmp(5, 1, [0; 4], &udp_quote(w, &probe)));
    assert!(
        wait_until(ALLOWED, || seen.from(w.peer.ip).iter().any(|m| (m.ty, m.code) == (5, 1))),
        "a rule admitting ICMP type 5 from the peer's group admits it"
    );
}

#[test]
fn icmp_errors_from_strangers_oversized_or_not_errors_are_not_related_on_one_host() {
    scenario(&one_host());
}

#[test]
fn icmp_errors_from_strangers_oversized_or_not_errors_are_not_related_across_hosts() {
    scenario(&three_hosts());
}
