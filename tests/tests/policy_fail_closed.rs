//! S11 fail closed, with real frames from a workload: what the dataplane cannot parse or judge is
//! dropped and counted with its reason, never passed; IPv4 options are parsed, not refused.
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;

use tests::*;

fn id(v: &Value) -> &str {
    v["id"].as_str().expect("resource has an id")
}

/// The MAC the workload's kernel resolved for its gateway (the dataplane's ARP answer).
fn gateway_mac(ns: &Netns, gateway: &str) -> [u8; 6] {
    let out = String::from_utf8(ns.ip(&["neigh", "show", gateway]).stdout).unwrap();
    let mac = out
        .split_whitespace()
        .skip_while(|w| *w != "lladdr")
        .nth(1)
        .unwrap_or_else(|| panic!("no neighbour entry for {gateway}: {out:?}"));
    mac_bytes(mac)
}

/// Ethernet header + an IPv4 header (no options) of `proto` carrying `l4`.
fn ipv4_frame(
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    proto: u8,
    l4: &[u8],
) -> Vec<u8> {
    let ip = frames::ipv4_with(src.octets(), dst.octets(), proto, 0x1234, true, l4);
    frames::ethernet(dst_mac, src_mac, frames::ETH_IPV4, &ip)
}

/// Frames of an unknown ethertype, IPv6, a malformed IPv4 header and a truncated TCP header,
/// all from the endpoint's own MAC and IP, are each dropped with their reason.
#[test]
fn unparsable_frames_from_a_workload_are_dropped_and_counted_by_reason() {
    let host = Host::start();
    let api = &host.api;
    let uni = api.create_universe("fc", "10.70.0.0/24");
    let a = host.endpoint(id(&uni), "10.70.0.10", &[]);
    let b = host.endpoint(id(&uni), "10.70.0.20", &[]);
    assert!(ping(&a.ns, b.ip), "a well-formed packet passes");
    let gw = gateway_mac(&a.ns, "10.70.0.1");
    let me = mac_bytes(&a.mac);
    let eth = |ethertype: u16| [gw.as_slice(), me.as_slice(), &ethertype.to_be_bytes()].concat();

    let mut unknown = eth(0x88b5);
    unknown.extend_from_slice(&[0u8; 46]);
    let mut ipv6 = eth(0x86dd);
    ipv6.extend_from_slice(&[0x60, 0, 0, 0, 0, 8, 17, 64]);
    ipv6.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x10]);
    ipv6.extend_from_slice(&[0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x20]);
    ipv6.extend_from_slice(&[0x30, 0x39, 0x23, 0x28, 0, 8, 0, 0]);
    let mut bad_ihl = ipv4_frame(gw, me, a.ip, b.ip, 17, &[0x30, 0x39, 0x23, 0x28, 0, 8, 0, 0]);
    bad_ihl[14] = 0x44; // version 4, IHL 4: shorter than the fixed header (RFC 791 section 3.1)
                        // A TCP segment needs 20 bytes of header; 8 are given.
    let short_tcp = ipv4_frame(gw, me, a.ip, b.ip, 6, &[0x30, 0x39, 0x1f, 0x40, 0, 0, 0, 1]);

    for (frame, reason) in [
        (unknown, "unknown_ethertype"),
        // IPv6 from an endpoint without an IPv6 address: its source is not its own.
        (ipv6, "spoofed_ip"),
        (bad_ihl, "malformed_ipv4"),
        (short_tcp, "malformed_l4"),
    ] {
        // No workload could receive these frames even if they passed: they are addressed to
        // the gateway, and what the program passes goes to the host's own stack. So the
        // evidence is the counter of their reason (each moved by its frame alone, not by any
        // drop) and the program's verdicts, which dataplane_load.rs checks one by one.
        assert_dropped(&host, reason, &format!("S11: a {reason} frame"), || {
            send_frame(&a.ns, "eth0", &frame)
                .unwrap_or_else(|e| panic!("send {reason} frame: {e}"));
            false
        });
    }
    assert!(ping(&a.ns, b.ip), "well-formed traffic still passes");
}

/// IPv4 fragments cannot be judged by port, so they are dropped and counted (`fragment`): a UDP
/// datagram larger than the MTU gets no answer, a small one does.
#[test]
fn fragmented_datagrams_are_dropped_and_counted() {
    let host = Host::start();
    let api = &host.api;
    let uni = api.create_universe("frag", "10.71.0.0/24");
    let a = host.endpoint(id(&uni), "10.71.0.10", &[]);
    let b = host.endpoint(id(&uni), "10.71.0.20", &[]);
    let udp = UdpServer::start(&b.ns, 9000, "b");
    assert_eq!(udp_roundtrip(&a.ns, b.ip, 9000, "small", ALLOWED).as_deref(), Some("b:small"));

    // The answer to a fragmented datagram would be fragmented too: the listener's count, not
    // the answer, tells whether the datagram arrived.
    let big = "x".repeat(3000);
    assert_dropped(&host, "fragment", "S11: a fragmented datagram", || {
        let _ = udp_exchange(&a.ns, None, b.ip, 9000, &big, DENIED);
        udp.sources().len() > 1
    });
    assert_eq!(udp.sources().len(), 1, "the listener received the small datagram only");
}

/// IPv4 options are parsed (the transport header is found at IHL*4), so a datagram with options
/// is judged by its real port: admitted on the allowed port, refused on another.
#[test]
fn datagrams_with_ipv4_options_are_judged_by_their_real_ports() {
    let host = Host::start();
    let api = &host.api;
    let uni = api.create_universe("opts", "10.72.0.0/24");
    let srv = api.create_group(id(&uni), "srv");
    api.add_rule(id(&srv), &json!({"direction": "ingress", "protocol": "udp", "from_port": 9000, "to_port": 9000, "cidr": "10.72.0.0/24"}));
    let a = host.endpoint(id(&uni), "10.72.0.10", &[]);
    let b = host.endpoint(id(&uni), "10.72.0.20", &[id(&srv)]);
    let _u0 = UdpServer::start(&b.ns, 9000, "b");
    let _u1 = UdpServer::start(&b.ns, 9001, "b");

    let with_options = |port: u16| -> Option<String> {
        let sock =
            a.ns.enter(|| UdpSocket::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0)))).unwrap();
        // NOP, NOP, NOP, end of list: 4 bytes of options, IHL 6 (RFC 791 section 3.1).
        let options = [1u8, 1, 1, 0];
        // SAFETY: `options` is valid for the length given for the whole call.
        let rc = unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::IPPROTO_IP,
                libc::IP_OPTIONS,
                options.as_ptr().cast(),
                options.len() as libc::socklen_t,
            )
        };
        assert_eq!(rc, 0, "setsockopt(IP_OPTIONS): {}", std::io::Error::last_os_error());
        sock.set_read_timeout(Some(if port == 9000 { ALLOWED } else { DENIED })).unwrap();
        sock.send_to(b"opt", SocketAddr::from((b.ip, port))).unwrap();
        let mut buf = [0u8; 64];
        sock.recv(&mut buf).ok().map(|n| String::from_utf8_lossy(&buf[..n]).into_owned())
    };
    // A raw socket in the receiver sees every UDP packet that arrives, header included.
    let tap = RawIpSocket::open(&b.ns, 17).unwrap();
    assert_eq!(
        with_options(9000).as_deref(),
        Some("b:opt"),
        "a datagram with options to the allowed port passes"
    );
    let arrived = tap.recv_packet(ALLOWED).expect("the receiver saw the datagram");
    assert_eq!(arrived[0], 0x46, "it arrived with its options (IHL 6)");
    assert_dropped(&host, "policy_ingress", "a datagram with options to another port", || {
        with_options(9001).is_some()
    });
    assert_eq!(host.drops("malformed_ipv4"), 0, "options are not malformed");
}

/// IPv6 from a workload is parsed before it is dropped, and what is malformed or cannot be
/// judged is counted by its own reason: a payload length past the frame, six extension headers
/// (one past the bound), a jumbogram, a fragment header; a well-formed datagram behind the
/// longest chain the walk takes is judged, and counted as spoofed (the endpoint has no IPv6
/// address). Then the workload's own stack sends
/// a UDP datagram over its MTU, which leaves in fragments: counted as IPv6 fragments.
#[test]
fn malformed_and_unjudgeable_ipv6_from_a_workload_is_counted_by_its_own_reason() {
    use dataplane_common::wire::ipv6::{
        NEXTHDR_AUTH as AH, NEXTHDR_DEST as DEST, NEXTHDR_FRAGMENT as FRAG, NEXTHDR_HOP as HOP,
        NEXTHDR_ROUTING as ROUTING, OPT_JUMBO,
    };
    use std::net::{Ipv6Addr, SocketAddrV6};

    let host = Host::start();
    let api = &host.api;
    let uni = api.create_universe("v6parse", "10.73.0.0/24");
    let a = host.endpoint(id(&uni), "10.73.0.10", &[]);
    let b = host.endpoint(id(&uni), "10.73.0.20", &[]);
    assert!(ping(&a.ns, b.ip), "a well-formed IPv4 packet passes");
    let gw = gateway_mac(&a.ns, "10.73.0.1");
    let me = mac_bytes(&a.mac);
    let (src, dst): (Ipv6Addr, Ipv6Addr) =
        ("fd00:73::10".parse().unwrap(), "fd00:73::20".parse().unwrap());
    let frame = |exts: &[(u8, usize)]| {
        let (next, rest) = frames::ipv6_extensions(exts, 17, &frames::udp(40000, 9000, b"v6"));
        frames::ethernet(
            gw,
            me,
            frames::ETH_IPV6,
            &frames::ipv6(src.octets(), dst.octets(), next, &rest),
        )
    };
    let chain = [(HOP, 8), (DEST, 16), (ROUTING, 24), (AH, 12), (DEST, 8)];
    let mut too_long = frame(&[]);
    too_long[19] += 1; // the payload length one byte past the frame
    let mut jumbo = frame(&[(HOP, 8)]);
    jumbo[18..20].fill(0);
    jumbo[56..62].copy_from_slice(&[OPT_JUMBO, 4, 0, 1, 0, 0]);
    for (frame, reason) in [
        // Well-formed behind the longest chain: judged, and the endpoint has no IPv6 address.
        (frame(&chain), "spoofed_ip"),
        (too_long, "malformed_ipv6"),
        (frame(&[&chain[..], &[(DEST, 8)]].concat()), "ipv6_too_many_headers"),
        (jumbo, "ipv6_jumbogram"),
        (frame(&[(HOP, 8), (FRAG, 8)]), "ipv6_fragment"),
    ] {
        assert_dropped(&host, reason, &format!("S11: an IPv6 frame ({reason})"), || {
            send_frame(&a.ns, "eth0", &frame)
                .unwrap_or_else(|e| panic!("send {reason} frame: {e}"));
            false
        });
    }

    // The workload's own IPv6 stack (off in its namespace until now), with an address and its
    // peer's neighbour entry written by hand (the gateway would answer its solicitation, but
    // the fragments are the point here).
    let out = a.ns.exec("sysctl", &["-q", "-w", "net.ipv6.conf.eth0.disable_ipv6=0"]);
    assert!(out.status.success(), "enable IPv6 on the workload's eth0: {out:?}");
    let gw_text = gw.map(|b| format!("{b:02x}")).join(":");
    for args in [
        &["-6", "addr", "add", "fd00:73::10/64", "dev", "eth0", "nodad"][..],
        &["-6", "neigh", "add", "fd00:73::20", "lladdr", &gw_text, "dev", "eth0"],
    ] {
        let out = a.ns.ip(args);
        assert!(out.status.success(), "ip {args:?}: {out:?}");
    }
    let sock =
        a.ns.enter(|| UdpSocket::bind(SocketAddrV6::new(src, 0, 0, 0)))
            .expect("bind a UDP socket to the workload's IPv6 address");
    assert_dropped(&host, "ipv6_fragment", "S11: a UDP datagram sent in fragments", || {
        sock.send_to(&[7u8; 3000], SocketAddrV6::new(dst, 9000, 0, 0))
            .expect("the workload's stack sends the datagram");
        false
    });
}
