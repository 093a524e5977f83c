//! S10 anti-spoofing: an endpoint can only send from its own IP and MAC, over IPv4 and over
//! IPv6: each test is one body with a [`Family`] parameter, run for both, its endpoints dual
//! stack (every IPv4 address with its IPv6 counterpart, [`Family::text`]). Advertising another endpoint's
//! IPv6 address in neighbour discovery (the counterpart of a forged ARP answer, which the
//! gateway's own ARP makes moot) is `policy_ipv6.rs`'s.
use std::net::IpAddr;
use std::time::Duration;

use tests::*;

fn id(v: &Value) -> &str {
    v["id"].as_str().expect("resource has an id")
}

/// Sets the MAC of the workload's `eth0`, live if the driver allows it, else by taking the link
/// down (which drops its routes, so the default route is put back).
fn set_mac(ns: &Netns, mac: &str) {
    let live = ns.exec("ip", &["link", "set", "dev", "eth0", "address", mac]);
    if live.status.success() {
        return;
    }
    let routes = String::from_utf8(ns.ip(&["route", "show", "default"]).stdout).expect("utf-8");
    ns.ip(&["link", "set", "dev", "eth0", "down"]);
    ns.ip(&["link", "set", "dev", "eth0", "address", mac]);
    ns.ip(&["link", "set", "dev", "eth0", "up"]);
    for route in routes.lines().filter(|l| !l.trim().is_empty()) {
        let mut args = vec!["route", "replace"];
        args.extend(route.split_whitespace());
        ns.ip(&args);
    }
}

/// Pins the MAC of `a`'s gateway of `family` (as its kernel resolved it) as a permanent
/// neighbour: the neighbour discovery (or ARP) a forging workload's kernel would otherwise send
/// from the forged source is dropped too, so no packet of the probe would ever leave, and the
/// counter would move for the resolution alone.
fn pin_gateway(a: &Workload, family: Family, gateway: &str, mac: &str) {
    let v = if family == Family::V6 { "-6" } else { "-4" };
    a.ns.ip(&[v, "neigh", "replace", gateway, "lladdr", mac, "dev", "eth0", "nud", "permanent"]);
}

/// The gateway of the workloads of these tests (`10.x.y.1`, or its IPv6 counterpart).
fn gateway(family: Family, cidr_prefix: &str) -> String {
    family.text(&format!("{cidr_prefix}.1"))
}

/// A workload that adds a second address and sends from it is dropped (`spoofed_ip`, per probe);
/// the receiver never sees the datagram or the echo request (a forged source gets no answer
/// back whether or not it arrived, so the receiver's listener and a tap in its namespace are
/// what tell), while traffic from the endpoint's own address passes.
fn sending_from_another_address_is_dropped(family: Family) {
    let host = Host::start();
    let api = &host.api;
    let uni = api.create_dual_universe("spoof", "10.50.0.0/24");
    let a = host.dual_endpoint(id(&uni), "10.50.0.10", &[]);
    let b = host.dual_endpoint(id(&uni), "10.50.0.20", &[]);
    let c = host.dual_endpoint(id(&uni), "10.50.0.30", &[]);
    let (a_ip, b_ip) = (family.addr(&a), family.addr(&b));
    let server = UdpServer::start_on(&b.ns, b_ip, 9000, "b");
    assert_eq!(udp_roundtrip(&a.ns, b_ip, 9000, "own", ALLOWED).as_deref(), Some("b:own"));

    let icmp_tap = Tap::open_for(&b.ns, family, family.icmp_proto());
    assert!(ns_ping_from(&a.ns, a_ip, b_ip), "a ping from the endpoint's own address passes");
    assert!(icmp_tap.saw_from(a_ip, ALLOWED), "the tap sees what arrives");
    let gw = gateway(family, "10.50.0");
    pin_gateway(&a, family, &gw, &neighbour_mac(&a.ns, &gw));
    let unused: IpAddr = family.text("10.50.0.99").parse().expect("an address");
    let from = |ip: IpAddr| server.sources().iter().any(|s| s.ip() == ip);
    for forged in [unused, family.addr(&c)] {
        let prefix = if forged.is_ipv6() { 128 } else { 32 };
        let mut add = vec!["addr", "add"];
        let address = format!("{forged}/{prefix}");
        add.extend([address.as_str(), "dev", "eth0"]);
        if forged.is_ipv6() {
            // Usable at once: duplicate address detection would first send neighbour
            // solicitations of its own (dropped too, moving the counter before the probe).
            add.push("nodad");
        }
        a.ns.ip(&add);
        assert_dropped(&host, "spoofed_ip", &format!("S10: a datagram from {forged}"), || {
            let _ = udp_exchange(&a.ns, Some(forged), b_ip, 9000, "forged", DENIED);
            from(forged)
        });
        assert_dropped(&host, "spoofed_ip", &format!("S10: a ping from {forged}"), || {
            let _ = ns_ping_from(&a.ns, forged, b_ip);
            icmp_tap.saw_from(forged, DENIED)
        });
        a.ns.ip(&["addr", "del", &format!("{forged}/{prefix}"), "dev", "eth0"]);
    }
    let seen = server.sources();
    assert!(seen.iter().all(|s| s.ip() == a_ip), "S10: the receiver saw a forged source: {seen:?}");
    assert_eq!(udp_roundtrip(&a.ns, b_ip, 9000, "again", ALLOWED).as_deref(), Some("b:again"));
}

#[test]
fn sending_from_an_address_that_is_not_the_endpoints_is_dropped_and_counted_over_ipv4() {
    sending_from_another_address_is_dropped(Family::V4);
}

#[test]
fn sending_from_an_address_that_is_not_the_endpoints_is_dropped_and_counted_over_ipv6() {
    sending_from_another_address_is_dropped(Family::V6);
}

fn ns_ping_from(ns: &Netns, src: IpAddr, dst: IpAddr) -> bool {
    let v = if dst.is_ipv6() { "-6" } else { "-4" };
    ns.exec("ping", &[v, "-c1", "-q", "-n", "-W", "1", "-I", &src.to_string(), &dst.to_string()])
        .status
        .success()
}

/// The MAC the workload's kernel resolved for `ip` (the dataplane's ARP or neighbour
/// advertisement answer, for the gateway).
fn neighbour_mac(ns: &Netns, ip: &str) -> String {
    let out = String::from_utf8(ns.ip(&["neigh", "show", ip]).stdout).expect("utf-8");
    out.split_whitespace()
        .skip_while(|w| *w != "lladdr")
        .nth(1)
        .unwrap_or_else(|| panic!("no neighbour entry for {ip}: {out:?}"))
        .to_owned()
}

/// A workload that changes its MAC is dropped (`spoofed_mac`, per probe) until it takes its own
/// MAC back. Answers could not reach a forged MAC anyway, so the receiver's listeners and a tap
/// in its namespace tell whether a probe arrived.
///
/// Over IPv6 the new MAC also gives the workload a new link-local address, whose duplicate
/// address detection and multicast listener reports go out from the forged MAC (and are
/// `spoofed_mac` too): the probes wait until those are over, so that the counter moves for the
/// probe.
fn sending_from_another_mac_is_dropped(family: Family) {
    let host = Host::start();
    let api = &host.api;
    let uni = api.create_dual_universe("spoofm", "10.51.0.0/24");
    let a = host.dual_endpoint(id(&uni), "10.51.0.10", &[]);
    let b = host.dual_endpoint(id(&uni), "10.51.0.20", &[]);
    let (a_ip, b_ip) = (family.addr(&a), family.addr(&b));
    let server = UdpServer::start_on(&b.ns, b_ip, 9000, "b");
    let tcp = TcpServer::start_on(&b.ns, b_ip, 7000, "b");
    assert_eq!(udp_roundtrip(&a.ns, b_ip, 9000, "own", ALLOWED).as_deref(), Some("b:own"));
    assert!(tcp_connect(&a.ns, b_ip, 7000, ALLOWED), "TCP from the endpoint's own MAC passes");
    assert!(ping(&a.ns, b_ip), "a ping from the endpoint's own MAC passes");
    assert!(wait_until(Duration::from_secs(2), || tcp.accepted() == 1));
    let received = server.sources().len();

    let gw = gateway(family, "10.51.0");
    let gateway_mac = neighbour_mac(&a.ns, &gw);
    set_mac(&a.ns, "02:66:66:66:66:66");
    // A new MAC makes the kernel forget its neighbours, and the ARP requests (neighbour
    // solicitations) it would send from the forged MAC are dropped too (spoofed_mac): without
    // the gateway's MAC pinned, the probes below would never send a packet, and the counter
    // would move for the resolution alone.
    pin_gateway(&a, family, &gw, &gateway_mac);
    if family == Family::V6 {
        // Until the counter is still for a while: the new link-local address's own traffic.
        let mut last = host.drops("spoofed_mac");
        let settled = wait_until(Duration::from_secs(10), || {
            std::thread::sleep(Duration::from_millis(1500));
            let now = host.drops("spoofed_mac");
            std::mem::replace(&mut last, now) == now
        });
        assert!(settled, "the forged MAC's own IPv6 traffic went on for 10 s");
    }
    // Opened after the pings above were answered, so they see only what comes now.
    let tcp_tap = Tap::open_for(&b.ns, family, 6);
    let icmp_tap = Tap::open_for(&b.ns, family, family.icmp_proto());
    assert_dropped(&host, "spoofed_mac", "S10: a datagram from a forged MAC", || {
        let _ = udp_exchange(&a.ns, None, b_ip, 9000, "forged", DENIED);
        server.sources().len() > received
    });
    assert_dropped(&host, "spoofed_mac", "S10: TCP from a forged MAC", || {
        let _ = tcp_connect(&a.ns, b_ip, 7000, DENIED);
        tcp_tap.saw_from(a_ip, DENIED)
    });
    assert_dropped(&host, "spoofed_mac", "S10: a ping from a forged MAC", || {
        let _ = ping_wait(&a.ns, b_ip, 1);
        icmp_tap.saw_from(a_ip, DENIED)
    });
    assert_eq!(server.sources().len(), received, "the receiver saw nothing from the forged MAC");
    assert_eq!(tcp.accepted(), 1, "nor accepted a connection");

    // (Taking the own MAC back flushes the pinned neighbour too: ARP from the own MAC is
    // answered again.)
    set_mac(&a.ns, &a.mac);
    // (Over IPv6 the link-local address of the own MAC is back too, once its duplicate address
    // detection is over: a few tries.)
    let back = wait_until(Duration::from_secs(10), || {
        udp_roundtrip(&a.ns, b_ip, 9000, "back", DENIED).as_deref() == Some("b:back")
    });
    assert!(back, "own MAC passes again");
    assert!(tcp_connect(&a.ns, b_ip, 7000, ALLOWED), "TCP too");
}

#[test]
fn sending_from_a_mac_that_is_not_the_endpoints_is_dropped_and_counted_over_ipv4() {
    sending_from_another_mac_is_dropped(Family::V4);
}

#[test]
fn sending_from_a_mac_that_is_not_the_endpoints_is_dropped_and_counted_over_ipv6() {
    sending_from_another_mac_is_dropped(Family::V6);
}
