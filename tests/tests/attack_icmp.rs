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
//! different hosts: `from_underlay` of V's host judges what arrives wrapped), over IPv4 and
//! over IPv6: one body with a [`Family`] parameter, the universe and the endpoints dual stack
//! (every IPv4 address with its IPv6 counterpart, [`Family::text`]). Over IPv6 the errors are ICMPv6's (RFC
//! 4443): destination unreachable codes 0-6, packet too big (code 0: "fragmentation needed"'s
//! counterpart, its MTU at least IPv6's minimum of 1280, below which Linux ignores it), time
//! exceeded 0-1, parameter problem 0-2, no longer than 1280 bytes of IPv6 packet (RFC 4443 2.4
//! (c)); the victim's sockets judge with `IPV6_RECVERR` and `IPV6_MTU`.
use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

use tests::frames::{icmp, icmpv6, ipv4, ipv6, tcp, udp, udp6, ACK};
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
    family: Family,
}

impl World {
    fn victim_ip(&self) -> IpAddr {
        self.family.addr(&self.victim)
    }
    fn peer_ip(&self) -> IpAddr {
        self.family.addr(&self.peer)
    }
    fn stranger_ip(&self) -> IpAddr {
        self.family.addr(&self.stranger)
    }

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
    let uni = api.create_dual_universe("icmp", "10.60.0.0/24");
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

fn one_host(family: Family) -> World {
    let host = Host::start();
    let (victim, peer, stranger, victim_group, peer_group) =
        populate(&host.api, &|_, u, ip, g| host.dual_endpoint(u, ip, g));
    let daemons = Daemons::One(Box::new(host));
    World { victim, peer, stranger, victim_group, peer_group, daemons, family }
}

fn three_hosts(family: Family) -> World {
    let fleet = Fleet::start(3);
    let (victim, peer, stranger, victim_group, peer_group) =
        populate(fleet.api(0), &|i, u, ip, g| fleet.dual_endpoint(i, u, ip, g));
    let daemons = Daemons::Fleet(Box::new(fleet));
    World { victim, peer, stranger, victim_group, peer_group, daemons, family }
}

/// What the family's errors are: the IP header's length, the longest error a router sends (RFC
/// 1812 4.3.2.3: 576 bytes of IPv4; RFC 4443 2.4 (c): 1280 bytes of IPv6), the path MTU a
/// "fragmentation needed" ("packet too big") of the attack names and the one Linux then
/// learns (IPv4 clamps 68 up to 552; IPv6 ignores anything below 1280).
struct Errors {
    header: usize,
    max_len: usize,
    mtu_claimed: u32,
    mtu_learnt: u32,
}

fn errors(family: Family) -> Errors {
    match family {
        Family::V4 => Errors { header: 20, max_len: 576, mtu_claimed: 68, mtu_learnt: 552 },
        Family::V6 => Errors { header: 40, max_len: 1280, mtu_claimed: 1280, mtu_learnt: 1280 },
    }
}

/// The IP packet from the victim to the peer carrying `l4` (UDP with `udp`, or TCP).
fn victim_to_peer(w: &World, proto: u8, sport: u16, l4: &[u8]) -> Vec<u8> {
    match (w.victim_ip(), w.peer_ip()) {
        (IpAddr::V4(v), IpAddr::V4(p)) => ipv4(v.octets(), p.octets(), proto, l4),
        (IpAddr::V6(v), IpAddr::V6(p)) => {
            let l4 = if proto == 17 {
                udp6(v.octets(), p.octets(), sport, UDP_PORT, b"flow")
            } else {
                l4.to_vec()
            };
            ipv6(v.octets(), p.octets(), proto, &l4)
        }
        _ => unreachable!("one family"),
    }
}

/// The start of the datagram the victim's probe sent to the peer: what an ICMP error about it
/// quotes (RFC 792: the IPv4 header and 8 bytes of payload; RFC 4443 likewise, IPv6's header).
fn udp_quote(w: &World, probe: &UdpProbe) -> Vec<u8> {
    let sport = probe.local_port();
    let packet = victim_to_peer(w, 17, sport, &udp(sport, UDP_PORT, b"flow"));
    packet[..errors(w.family).header + 8].to_vec()
}

/// An ICMP (ICMPv6) error of `ty`/`code` from `from` to the victim quoting `quote`, padded with
/// zeros after the quote so that the whole IP datagram is `total` bytes long (at least the
/// natural length).
fn error_of_size(
    w: &World,
    from: &Workload,
    (ty, code): (u8, u8),
    rest: [u8; 4],
    quote: &[u8],
    total: usize,
) -> Vec<u8> {
    let mut payload = quote.to_vec();
    payload.resize(payload.len().max(total.saturating_sub(errors(w.family).header + 8)), 0);
    match (w.family.addr(from), w.victim_ip()) {
        (IpAddr::V6(src), IpAddr::V6(dst)) => {
            icmpv6(src.octets(), dst.octets(), ty, code, rest, &payload)
        }
        _ => icmp(ty, code, rest, &payload),
    }
}

/// An error of its natural length (see [`error_of_size`]).
fn error(w: &World, from: &Workload, kind: (u8, u8), rest: [u8; 4], quote: &[u8]) -> Vec<u8> {
    error_of_size(w, from, kind, rest, quote, 0)
}

/// Sends `message` (an ICMP or ICMPv6 message) from `from`'s namespace to the victim.
fn send_icmp(w: &World, from: &Workload, message: &[u8]) {
    RawIpSocket::open_for(&from.ns, w.family, w.family.icmp_proto())
        .and_then(|s| s.send_to(w.victim_ip(), message))
        .unwrap_or_else(|e| panic!("send ICMP from {}: {e}", from.ip));
}

/// A UDP flow from the victim to the peer, tracked: the datagram reached the peer's socket.
fn udp_flow(w: &World, sink: &UdpSocket) -> UdpProbe {
    let probe = UdpProbe::open(&w.victim.ns, w.peer_ip(), UDP_PORT).expect("victim's UDP probe");
    let mut buf = [0u8; 64];
    let got = sink.recv_from(&mut buf).expect("the peer receives the victim's datagram");
    assert_eq!(got.1, SocketAddr::from((w.victim_ip(), probe.local_port())));
    probe
}

/// The next sequence number the victim's side of `stream` will send, read from the segments a
/// capture on the victim's interface saw: a "fragmentation needed" about the connection must
/// quote a sequence number in the sender's window, or Linux ignores it.
fn next_seq(capture: &PacketCapture, w: &World, local_port: u16) -> u32 {
    let mut next = None;
    while let Some(frame) = capture.next(Duration::from_millis(300)) {
        if let Some(s) = tcp_segment(&frame) {
            if s.src == w.victim_ip() && s.sport == local_port && s.dport == TCP_PORT {
                let end = s.seq.wrapping_add(s.payload_len as u32) + u32::from(s.flags & 0x03 != 0); // SYN or FIN count one
                next = Some(next.map_or(end, |n: u32| n.max(end)));
            }
        }
    }
    next.expect("the capture saw the victim's segments")
}

/// Whether the victim's route to the peer carries the learnt path MTU `mtu` (`ip route get`).
fn route_mtu_learnt(w: &World, mtu: u32) -> bool {
    let out = w.victim.ns.exec("ip", &["route", "get", &w.peer_ip().to_string()]);
    String::from_utf8_lossy(&out.stdout).contains(&format!("mtu {mtu}"))
}

/// The error kinds of each family, with what Linux reports for each on the victim's socket.
fn kinds(family: Family) -> [((u8, u8), i32, &'static str); 3] {
    match family {
        Family::V4 => [
            ((3, 3), libc::ECONNREFUSED, "port unreachable"),
            ((11, 0), libc::EHOSTUNREACH, "time exceeded"),
            ((12, 0), libc::EPROTO, "parameter problem"),
        ],
        Family::V6 => [
            ((1, 4), libc::ECONNREFUSED, "port unreachable"),
            ((3, 0), libc::EHOSTUNREACH, "time exceeded"),
            ((4, 0), libc::EPROTO, "parameter problem"),
        ],
    }
}

/// ICMP messages that are no error (types or codes outside the errors), and the one of them a
/// rule then admits: IPv4's redirect and source quench; ICMPv6's codes beyond the errors' and
/// a type of private experimentation (RFC 4443 2.1).
fn not_errors(family: Family) -> (Vec<(u8, u8)>, (u8, u8)) {
    match family {
        Family::V4 => (vec![(3, 16), (11, 2), (12, 3), (5, 1), (4, 0)], (5, 1)),
        Family::V6 => (vec![(1, 7), (2, 1), (3, 2), (4, 3), (200, 0)], (200, 0)),
    }
}

fn scenario(w: &World) {
    let e = errors(w.family);
    let (peer_ip, stranger_ip) = (w.peer_ip(), w.stranger_ip());
    let sink = w
        .peer
        .ns
        .enter(|| UdpSocket::bind((peer_ip, UDP_PORT)))
        .expect("the peer's silent UDP socket");
    sink.set_read_timeout(Some(ALLOWED)).expect("timeout");
    let _tcp = TcpServer::start_on(&w.peer.ns, peer_ip, TCP_PORT, "p");
    let seen = IcmpListener::start_for(&w.victim.ns, w.family);
    const QUIET: Duration = Duration::from_millis(700);

    // 1. Errors of every kind from the stranger, each quoting a tracked flow between V and P.
    for (kind, errno, what) in kinds(w.family) {
        let probe = udp_flow(w, &sink);
        let attack = format!("a {what} from a stranger (S6: only the flow's peer is related)");
        assert_dropped(w.victim_host(), "policy_ingress", &attack, || {
            send_icmp(w, &w.stranger, &error(w, &w.stranger, kind, [0; 4], &udp_quote(w, &probe)));
            probe.error(QUIET).is_some()
        });
        // The same error from the peer is related: the victim's socket reports it. (This is
        // what proves the crafted error is one the victim's kernel would act on.)
        send_icmp(w, &w.peer, &error(w, &w.peer, kind, [0; 4], &udp_quote(w, &probe)));
        assert_eq!(probe.error(ALLOWED), Some(errno), "the peer's {what} is admitted (S6)");
    }
    assert!(
        seen.from(stranger_ip).is_empty(),
        "the victim received ICMP from the stranger: {:?}",
        seen.from(stranger_ip)
    );

    // 2. "Fragmentation needed" ("packet too big") from the stranger quoting the victim's TCP
    // connection to the peer, with the right sequence number and a small next-hop MTU: the
    // victim's path MTU to the peer must not fall.
    let capture = PacketCapture::open(&w.victim.ns, "eth0").expect("capture on the victim");
    let addr = SocketAddr::from((peer_ip, TCP_PORT));
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
    assert!(
        mtu_before > e.mtu_learnt && !route_mtu_learnt(w, e.mtu_learnt),
        "no path MTU learnt yet ({mtu_before})"
    );
    let mut quote = victim_to_peer(w, 6, local, &tcp(local, TCP_PORT, ACK, 1400));
    quote.truncate(e.header + 8);
    quote[e.header + 4..e.header + 8].copy_from_slice(&seq.to_be_bytes());
    let too_big = match w.family {
        Family::V4 => (3, 4),
        Family::V6 => (2, 0),
    };
    let mtu = e.mtu_claimed.to_be_bytes();
    let attack = "a stranger's fragmentation-needed lowering the victim's path MTU (S6)";
    assert_dropped(w.victim_host(), "policy_ingress", attack, || {
        send_icmp(w, &w.stranger, &error(w, &w.stranger, too_big, mtu, &quote));
        wait_until(QUIET, || ip_mtu(&stream).is_ok_and(|m| m != mtu_before))
    });
    assert!(!route_mtu_learnt(w, e.mtu_learnt), "the victim's route to the peer learnt no MTU");

    // 3. An error from the real peer longer than a router's is not related: judged by the
    // rules, which admit no ICMP to the victim. A router's size is.
    let probe = udp_flow(w, &sink);
    let unreachable = kinds(w.family)[0].0;
    for total in [e.max_len + 120, e.max_len + 1] {
        let long = error_of_size(w, &w.peer, unreachable, [0; 4], &udp_quote(w, &probe), total);
        let attack = format!("the peer's {total}-byte port unreachable");
        assert_dropped(w.victim_host(), "policy_ingress", &attack, || {
            send_icmp(w, &w.peer, &long);
            probe.error(QUIET).is_some()
        });
    }
    assert!(
        seen.from(peer_ip).iter().all(|m| m.len <= e.max_len),
        "the victim received an oversized error: {:?}",
        seen.from(peer_ip)
    );
    let quote_udp = udp_quote(w, &probe);
    send_icmp(w, &w.peer, &error_of_size(w, &w.peer, unreachable, [0; 4], &quote_udp, e.max_len));
    assert_eq!(
        probe.error(ALLOWED),
        Some(libc::ECONNREFUSED),
        "{} bytes is a router's size",
        e.max_len
    );

    // 4. The peer's own fragmentation-needed about the connection is related: the path MTU
    // falls to what Linux learns from it. (The same bytes as the stranger's: only the source
    // differs.)
    send_icmp(w, &w.peer, &error(w, &w.peer, too_big, mtu, &quote));
    assert!(
        wait_until(Duration::from_secs(3), || ip_mtu(&stream).is_ok_and(|m| m == e.mtu_learnt)),
        "the peer's fragmentation-needed lowers the path MTU (path-MTU discovery works, S6)"
    );

    // 5. ICMP messages quoting a tracked flow that are not errors (types or codes outside
    // the errors) are ordinary ICMP: judged by the rules...
    let (not_errors, admitted) = not_errors(w.family);
    let probe = udp_flow(w, &sink);
    for (ty, code) in not_errors.iter().copied() {
        let attack = format!("ICMP type {ty} code {code} (no error) quoting a tracked flow");
        assert_dropped(w.victim_host(), "policy_ingress", &attack, || {
            send_icmp(w, &w.peer, &error(w, &w.peer, (ty, code), [0; 4], &udp_quote(w, &probe)));
            wait_until(QUIET, || seen.from(peer_ip).iter().any(|m| (m.ty, m.code) == (ty, code)))
        });
    }
    let got = seen.from(peer_ip);
    assert!(
        !got.iter().any(|m| not_errors.contains(&(m.ty, m.code))),
        "the victim received a non-error ICMP message without a rule: {got:?}"
    );
    // ...which admit them once a rule says so.
    w.api().add_rule(
        &w.victim_group,
        &json!({"direction": "ingress", "protocol": w.family.icmp(), "icmp_type": admitted.0, "icmp_code": -1, "group": w.peer_group}),
    );
    send_icmp(w, &w.peer, &error(w, &w.peer, admitted, [0; 4], &udp_quote(w, &probe)));
    assert!(
        wait_until(ALLOWED, || seen.from(peer_ip).iter().any(|m| (m.ty, m.code) == admitted)),
        "a rule admitting ICMP type {} from the peer's group admits it",
        admitted.0
    );
}

#[test]
fn icmp_errors_from_strangers_oversized_or_not_errors_are_not_related_on_one_host_over_ipv4() {
    scenario(&one_host(Family::V4));
}

#[test]
fn icmp_errors_from_strangers_oversized_or_not_errors_are_not_related_on_one_host_over_ipv6() {
    scenario(&one_host(Family::V6));
}

#[test]
fn icmp_errors_from_strangers_oversized_or_not_errors_are_not_related_across_hosts_over_ipv4() {
    scenario(&three_hosts(Family::V4));
}

#[test]
fn icmp_errors_from_strangers_oversized_or_not_errors_are_not_related_across_hosts_over_ipv6() {
    scenario(&three_hosts(Family::V6));
}
