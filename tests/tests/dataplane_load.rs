//! The dataplane loads, attaches and judges packets: `from_endpoint` run through
//! `BPF_PROG_TEST_RUN` on hand-written frames, with maps written by hand (no compiler, no
//! daemon). Needs root (bpf, netns, mount): without it each test fails at once, saying so.
//!
//! Everything lives in a private network namespace and a private bpffs, both removed on drop,
//! also when an assertion fails.

use std::collections::{BTreeMap, HashSet};
use std::path::Path;

use dataplane_common::wire::ipv6::{NEXTHDR_FRAGMENT, NEXTHDR_HOP};
use dataplane_common::{
    ct_state, nd, peer, policy_prefix, Cidr6Key, Config, CtHop, CtValue, DropReason, Endpoint,
    PolicyKey, PolicyValue, Route, Route6Key, RouteKey, DIRECTION_EGRESS, DIRECTION_INGRESS,
    DIRECTION_IPV6,
};
use tests::frames::{
    arp_request, ethernet, icmp, icmpv6, ip6_of, ipv4, ipv6, ipv6_extensions, neighbour_solicit,
    tcp, udp, with_hop_limit, ETH_IPV4, ETH_IPV6, SYN, SYN_ACK,
};
use tests::{is_root, pinned_drops, Bpffs, Family, Netns, TempDir};
use verse::compile::{MapContents, OwnerBudget};
use verse::dataplane::{tc_act, Dataplane};

const GATEWAY_MAC: [u8; 6] = [0x02, 0x00, 0x00, 0x00, 0x00, 0x01];
const MAC_A: [u8; 6] = [0x02, 0xAA, 0x00, 0x00, 0x00, 0x02];
const MAC_B: [u8; 6] = [0x02, 0xBB, 0x00, 0x00, 0x00, 0x03];
const GATEWAY: [u8; 4] = [10, 0, 0, 1];
const IP_A: [u8; 4] = [10, 0, 0, 2];
const IP_B: [u8; 4] = [10, 0, 0, 3];
const VNI: u32 = 7;
const ID_A: u32 = 1;
const ID_B: u32 = 2;

/// The daemon's default settings (S9 timeouts) with this test's gateway MAC.
fn config() -> Config {
    let defaults = verse::config::Config::default();
    let config = defaults.dataplane_config().expect("the default config is valid");
    Config { gateway_mac: GATEWAY_MAC, ..config }
}

// ---- literal frames ------------------------------------------------------------------------

/// A TCP frame as the workload with `mac` sends it to the gateway.
fn tcp_frame(
    mac: [u8; 6],
    src: [u8; 4],
    dst: [u8; 4],
    sport: u16,
    dport: u16,
    flags: u8,
) -> Vec<u8> {
    ethernet(GATEWAY_MAC, mac, ETH_IPV4, &ipv4(src, dst, 6, &tcp(sport, dport, flags, 0)))
}

// ---- the maps, by hand ---------------------------------------------------------------------

/// Every endpoint here has the last byte of its address as its conntrack slot and serial.
fn slot_of(ip: [u8; 4]) -> u32 {
    u32::from(ip[3])
}
fn serial_of(ip: [u8; 4]) -> u64 {
    u64::from(ip[3])
}
/// Gives the endpoint at `ip` its slot, with a budget far above what a test uses.
fn own(d: &mut MapContents, ip: [u8; 4]) {
    d.ct_owners.insert(slot_of(ip), OwnerBudget { serial: serial_of(ip), budget: 4096 });
}

/// A can send anything anywhere (egress all); B admits TCP/80 from A. Nothing else.
fn desired(if_a: u32, if_b: u32) -> MapContents {
    let mut d = MapContents::default();
    d.endpoints.insert(if_a, endpoint(IP_A, MAC_A, ID_A));
    d.endpoints.insert(if_b, endpoint(IP_B, MAC_B, ID_B));
    own(&mut d, IP_A);
    own(&mut d, IP_B);
    d.routes.insert(RouteKey { vni: VNI, ip: IP_A }, route(if_a, ID_A, MAC_A, IP_A));
    d.routes.insert(RouteKey { vni: VNI, ip: IP_B }, route(if_b, ID_B, MAC_B, IP_B));
    egress_all(&mut d, ID_A);
    admit_tcp80_from_a(&mut d, ID_B);
    // Their IPv6 addresses, an IPv6 class and A's `::/0` egress: read back as written.
    for (ifindex, ip, mac, id) in [(if_a, IP_A, MAC_A, ID_A), (if_b, IP_B, MAC_B, ID_B)] {
        d.ipv6.routes.insert(Route6Key::new(VNI, ip6_of(ip)), route(ifindex, id, mac, ip));
    }
    d.ipv6.cidrs.insert(Cidr6Key::encode(VNI, ip6_of(IP_A), 64), peer::CIDR_FLAG | 1);
    d.ipv6.policy.insert(
        (
            policy_prefix::PEER,
            PolicyKey {
                identity: ID_A.to_be_bytes(),
                direction: DIRECTION_EGRESS + DIRECTION_IPV6,
                peer: peer::ANY.to_be_bytes(),
                proto: 0,
                port: [0; 2],
            },
        ),
        PolicyValue::default(),
    );
    // B admits UDP/53 from A over IPv6.
    d.ipv6.policy.insert(
        (
            policy_prefix::FULL,
            PolicyKey {
                identity: ID_B.to_be_bytes(),
                direction: DIRECTION_INGRESS + DIRECTION_IPV6,
                peer: ID_A.to_be_bytes(),
                proto: 17,
                port: 53u16.to_be_bytes(),
            },
        ),
        PolicyValue::default(),
    );
    d.ipv6.policy_kinds = verse::compile::policy_kinds(&d.ipv6.policy);
    d
}

/// The endpoint at `ip` on this host, with its slot and serial.
fn endpoint(ip: [u8; 4], mac: [u8; 6], identity: u32) -> Endpoint {
    let (slot, serial, ip6) = (slot_of(ip), serial_of(ip), ip6_of(ip));
    let gateway6 = ip6_of([10, 0, 0, 1]);
    Endpoint { ip, mac, _pad: [0; 2], vni: VNI, identity, slot, serial, ip6, gateway6 }
}

/// The route to the local endpoint at `ip` behind `ifindex`.
fn route(ifindex: u32, identity: u32, mac: [u8; 6], ip: [u8; 4]) -> Route {
    Route {
        ifindex,
        identity,
        mac,
        _pad: [0; 2],
        underlay: [0; 4],
        slot: slot_of(ip),
        serial: serial_of(ip),
    }
}

/// Identity `id` may send anything anywhere.
fn egress_all(d: &mut MapContents, id: u32) {
    d.policy.insert(
        (
            policy_prefix::PEER,
            PolicyKey {
                identity: id.to_be_bytes(),
                direction: DIRECTION_EGRESS,
                peer: 0u32.to_be_bytes(),
                proto: 0,
                port: [0; 2],
            },
        ),
        PolicyValue::default(),
    );
    d.policy_kinds = verse::compile::policy_kinds(&d.policy);
}

/// Identity `id` admits TCP/80 from A.
fn admit_tcp80_from_a(d: &mut MapContents, id: u32) {
    d.policy.insert(
        (
            policy_prefix::FULL,
            PolicyKey {
                identity: id.to_be_bytes(),
                direction: DIRECTION_INGRESS,
                peer: ID_A.to_be_bytes(),
                proto: 6,
                port: 80u16.to_be_bytes(),
            },
        ),
        PolicyValue::default(),
    );
    d.policy_kinds = verse::compile::policy_kinds(&d.policy);
}

/// Runs a command from the calling thread, so in the namespace that thread has joined.
fn run_here(cmd: &str, args: &[&str]) {
    tests::run_ok(cmd, args);
}

/// The ifindex of `iface` in the calling thread's namespace.
fn verse_ifindex(iface: &str) -> u32 {
    let name = std::ffi::CString::new(iface).expect("interface name");
    // SAFETY: `name` is NUL-terminated and outlives the call.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    assert_ne!(index, 0, "if_nametoindex({iface}): {}", std::io::Error::last_os_error());
    index
}

#[test]
fn dataplane_loads_attaches_and_judges_packets() {
    assert!(
        is_root(),
        "dataplane_load needs root (bpf, netns, mount): run it with `cargo xtask test`"
    );
    let ns = Netns::new("dpl");
    // The workload ends stay in this namespace with their own MACs: IPv6 the kernel sent from
    // them would count as spoofed_mac while a check counts drops.
    ns.disable_ipv6();
    let dir = TempDir::new("dpl");
    let bpf_dir = dir.path().join("bpf");
    let bpffs = Bpffs::mount(&bpf_dir);

    // Host-side veths ha/hb, workload sides wa/wb (left in the same namespace: test runs need
    // only real devices for the skb's ifindex).
    ns.ip(&["link", "add", "ha", "type", "veth", "peer", "name", "wa"]);
    ns.ip(&["link", "add", "hb", "type", "veth", "peer", "name", "wb"]);
    ns.ip(&["link", "add", "hc", "type", "veth", "peer", "name", "wc"]);
    for dev in ["ha", "wa", "hb", "wb", "hc", "wc"] {
        ns.ip(&["link", "set", dev, "up"]);
    }
    let if_a = ns.ifindex("ha");
    let if_b = ns.ifindex("hb");
    let if_c = ns.ifindex("hc");
    let if_wa = ns.ifindex("wa");

    ns.enter(|| judge_packets(bpffs.path(), if_a, if_b, if_c, if_wa));
}

fn judge_packets(bpf_dir: &Path, if_a: u32, if_b: u32, if_c: u32, if_wa: u32) {
    let mut dp = Dataplane::load(bpf_dir, &config()).expect("load the dataplane");
    let stats = dp.program_stats().expect("program info");
    eprintln!("from_endpoint: {stats:?}");
    assert!(stats.verified_instructions.is_some_and(|n| n > 0));

    dp.attach_endpoint("ha").expect("attach ha");
    dp.attach_endpoint("hb").expect("attach hb");
    // A second attach (a restarted daemon) keeps the pinned link.
    dp.attach_endpoint("ha").expect("attach ha again");
    assert!(dp.link_pin_path("ha").exists() && dp.link_pin_path("hb").exists());
    assert_eq!(dp.pinned_links().expect("list links"), vec!["ha".to_string(), "hb".to_string()]);

    let want = desired(if_a, if_b);
    dp.apply(&MapContents::default(), &want).expect("apply");
    assert_eq!(dp.read().expect("read maps"), want, "the maps hold exactly what was applied");

    // A TCP SYN that B's ingress allows: delivered to B with the gateway as source.
    let syn = tcp_frame(MAC_A, IP_A, IP_B, 40000, 80, SYN);
    let out = dp.test_run(&syn, if_a, 1).expect("run SYN");
    assert_eq!(out.return_code, tc_act::REDIRECT, "allowed SYN is redirected");
    assert_eq!(&out.packet[0..6], &MAC_B, "destination MAC is B's");
    assert_eq!(&out.packet[6..12], &GATEWAY_MAC, "source MAC is the gateway's");
    assert_eq!(&out.packet[12..], &syn[12..], "nothing but the MACs is rewritten (no TTL change)");
    let ct = dp.conntrack().expect("read conntrack");
    assert_eq!(ct.len(), 1, "the SYN created one flow: {ct:?}");
    assert_eq!(ct[0].1.state, ct_state::TCP_OPENING);

    // The reply is admitted by conntrack (S6), although nothing allows B -> A by policy.
    let syn_ack = tcp_frame(MAC_B, IP_B, IP_A, 80, 40000, SYN_ACK);
    let out = dp.test_run(&syn_ack, if_b, 1).expect("run SYN-ACK");
    assert_eq!(out.return_code, tc_act::REDIRECT, "the reply of a tracked flow is delivered");
    assert_eq!(&out.packet[0..6], &MAC_A);
    let ct = dp.conntrack().expect("read conntrack");
    assert_eq!(ct[0].1.state, ct_state::TCP_ESTABLISHED, "a reply establishes the flow");

    // A new flow from B to A is judged by policy: B may send nothing (no egress rule).
    let before = pinned_drops(dp.bpf_dir(), DropReason::PolicyEgress);
    let syn_ba = tcp_frame(MAC_B, IP_B, IP_A, 40001, 80, SYN);
    assert_eq!(dp.test_run(&syn_ba, if_b, 1).expect("run").return_code, tc_act::SHOT);
    assert_eq!(
        pinned_drops(dp.bpf_dir(), DropReason::PolicyEgress),
        before + 1,
        "counted as policy_egress"
    );

    // Port 81 is not allowed by B's ingress.
    let before = pinned_drops(dp.bpf_dir(), DropReason::PolicyIngress);
    let denied = tcp_frame(MAC_A, IP_A, IP_B, 40000, 81, SYN);
    assert_eq!(dp.test_run(&denied, if_a, 1).expect("run").return_code, tc_act::SHOT);
    assert_eq!(
        pinned_drops(dp.bpf_dir(), DropReason::PolicyIngress),
        before + 1,
        "counted as policy_ingress"
    );

    // Spoofed source IP (S10).
    let before = pinned_drops(dp.bpf_dir(), DropReason::SpoofedIp);
    let spoofed = tcp_frame(MAC_A, [10, 0, 0, 9], IP_B, 40000, 80, SYN);
    assert_eq!(dp.test_run(&spoofed, if_a, 1).expect("run").return_code, tc_act::SHOT);
    assert_eq!(pinned_drops(dp.bpf_dir(), DropReason::SpoofedIp), before + 1);

    // Spoofed source MAC (S10).
    let before = pinned_drops(dp.bpf_dir(), DropReason::SpoofedMac);
    let spoofed = tcp_frame([0x02, 0, 0, 0, 0, 0x99], IP_A, IP_B, 40000, 80, SYN);
    assert_eq!(dp.test_run(&spoofed, if_a, 1).expect("run").return_code, tc_act::SHOT);
    assert_eq!(pinned_drops(dp.bpf_dir(), DropReason::SpoofedMac), before + 1);

    // The gateway address is no endpoint.
    let before = pinned_drops(dp.bpf_dir(), DropReason::NoRoute);
    let to_gw = tcp_frame(MAC_A, IP_A, GATEWAY, 40000, 80, SYN);
    assert_eq!(dp.test_run(&to_gw, if_a, 1).expect("run").return_code, tc_act::SHOT);
    assert_eq!(pinned_drops(dp.bpf_dir(), DropReason::NoRoute), before + 1);

    // ARP for the gateway is answered in place with the gateway MAC, back to the asker.
    let req = arp_request(MAC_A, IP_A, GATEWAY);
    let out = dp.test_run(&req, if_a, 1).expect("run ARP");
    assert_eq!(out.return_code, tc_act::REDIRECT, "ARP request answered");
    let p = &out.packet;
    assert_eq!(&p[0..6], &MAC_A, "reply to the asker");
    assert_eq!(&p[6..12], &GATEWAY_MAC);
    assert_eq!(&p[20..22], &[0, 2], "ARP reply");
    assert_eq!(&p[22..28], &GATEWAY_MAC, "sender MAC");
    assert_eq!(&p[28..32], &GATEWAY, "sender IP = the asked address");
    assert_eq!(&p[32..38], &MAC_A, "target MAC");
    assert_eq!(&p[38..42], &IP_A, "target IP");

    // ARP for one's own address (duplicate address detection) stays unanswered.
    let before = pinned_drops(dp.bpf_dir(), DropReason::ArpUnanswered);
    let dad = arp_request(MAC_A, [0; 4], IP_A);
    assert_eq!(dp.test_run(&dad, if_a, 1).expect("run").return_code, tc_act::SHOT);
    assert_eq!(pinned_drops(dp.bpf_dir(), DropReason::ArpUnanswered), before + 1);

    // An unknown interface is no endpoint: the workload side wa has no entry.
    let before = pinned_drops(dp.bpf_dir(), DropReason::UnknownEndpoint);
    let out = dp.test_run(&syn, if_wa, 1).expect("run on wa");
    assert_eq!(out.return_code, tc_act::SHOT);
    assert_eq!(pinned_drops(dp.bpf_dir(), DropReason::UnknownEndpoint), before + 1);

    // IPv4 options are skipped (L4 at IHL*4): a SYN with a 4-byte NOP option header is judged
    // like any SYN.
    let mut with_options = tcp_frame(MAC_A, IP_A, IP_B, 40002, 80, SYN);
    with_options[14] = 0x46;
    with_options[16..18].copy_from_slice(&(24u16 + 20).to_be_bytes());
    with_options.splice(34..34, [1u8, 1, 1, 0]);
    assert_eq!(dp.test_run(&with_options, if_a, 1).expect("run").return_code, tc_act::REDIRECT);

    // Fragments cannot be judged by port (S11).
    let before = pinned_drops(dp.bpf_dir(), DropReason::Fragment);
    let mut fragment = tcp_frame(MAC_A, IP_A, IP_B, 40000, 80, SYN);
    fragment[20] = 0x20; // MF
    assert_eq!(dp.test_run(&fragment, if_a, 1).expect("run").return_code, tc_act::SHOT);
    assert_eq!(pinned_drops(dp.bpf_dir(), DropReason::Fragment), before + 1);

    // A truncated TCP header.
    let before = pinned_drops(dp.bpf_dir(), DropReason::MalformedL4);
    let short = ethernet(GATEWAY_MAC, MAC_A, ETH_IPV4, &ipv4(IP_A, IP_B, 6, &[0, 1, 0, 80]));
    assert_eq!(dp.test_run(&short, if_a, 1).expect("run").return_code, tc_act::SHOT);
    assert_eq!(pinned_drops(dp.bpf_dir(), DropReason::MalformedL4), before + 1);

    // IPv6 between A and B (fd00::2, fd00::3): parsed and judged (S11): a foreign source as
    // spoofed, a payload length past the frame as malformed, a fragment with its own reason,
    // no route, no ingress rule; UDP/53 from A, which B admits, is delivered and tracked in
    // VERSE_CT6, charged to A's budget; a neighbour solicitation is answered by the gateway.
    let (a6, b6) = (ip6_of(IP_A), ip6_of(IP_B));
    let udp6 = |src, dst, dport| {
        let (next, udp_behind_hop) = ipv6_extensions(&[(NEXTHDR_HOP, 8)], 17, &udp(1, dport, b"x"));
        ethernet(GATEWAY_MAC, MAC_A, ETH_IPV6, &ipv6(src, dst, next, &udp_behind_hop))
    };
    let mut too_long = udp6(a6, b6, 53);
    too_long[19] += 1;
    let (next, fragment) = ipv6_extensions(&[(NEXTHDR_FRAGMENT, 8)], 17, &udp(1, 53, b"x"));
    let fragment = ethernet(GATEWAY_MAC, MAC_A, ETH_IPV6, &ipv6(a6, b6, next, &fragment));
    for (frame, reason) in [
        (udp6([0xfd; 16], b6, 53), DropReason::SpoofedIp),
        (too_long, DropReason::MalformedIpv6),
        (fragment, DropReason::Ipv6Fragment),
        (udp6(a6, ip6_of([0, 0, 0, 99]), 53), DropReason::NoRoute),
        (udp6(a6, b6, 54), DropReason::PolicyIngress),
    ] {
        let before = pinned_drops(dp.bpf_dir(), reason);
        assert_eq!(dp.test_run(&frame, if_a, 1).expect("run").return_code, tc_act::SHOT);
        assert_eq!(pinned_drops(dp.bpf_dir(), reason), before + 1, "{reason:?}");
    }
    let used = |dp: &Dataplane| dp.ct_owners()[&slot_of(IP_A)].used;
    let used_before = used(&dp);
    let out = dp.test_run(&udp6(a6, b6, 53), if_a, 1).expect("run UDP over IPv6");
    assert_eq!(out.return_code, tc_act::REDIRECT, "admitted by B's IPv6 ingress rule");
    assert_eq!((&out.packet[0..6], &out.packet[6..12]), (&MAC_B[..], &GATEWAY_MAC[..]));
    // `from_endpoint6` entered without `from_endpoint`'s hand-over (as a hook of an earlier
    // build enters it until an upgrade swaps its link) checks the Ethernet header and MAC
    // again: a frame from A's interface with B's MAC is spoofed_mac, never judged as A's or
    // B's; A's own frame is judged.
    let mut forged = udp6(a6, b6, 53);
    forged[6..12].copy_from_slice(&MAC_B);
    let before = pinned_drops(dp.bpf_dir(), DropReason::SpoofedMac);
    let out = dp.test_run_from_endpoint6(&forged, if_a, None).expect("run from_endpoint6");
    assert_eq!(out.return_code, tc_act::SHOT);
    assert_eq!(pinned_drops(dp.bpf_dir(), DropReason::SpoofedMac), before + 1);
    let out =
        dp.test_run_from_endpoint6(&udp6(a6, b6, 53), if_a, None).expect("run from_endpoint6");
    assert_eq!(out.return_code, tc_act::REDIRECT, "A's own frame, checked again and judged");
    let flows6 = dp.conntrack6().expect("read VERSE_CT6");
    assert!(
        flows6.iter().any(|(k, e)| k.src == a6
            && k.dst == b6
            && k.dport == 53
            && e.state == ct_state::UDP_ONE_WAY),
        "the flow is tracked in VERSE_CT6: {flows6:?}"
    );
    assert_eq!(used(&dp), used_before + 1, "charged to A's budget, as its IPv4 flows");
    let ll_a = nd::link_local(MAC_A);
    let solicit =
        with_hop_limit(ipv6(ll_a, b6, 58, &neighbour_solicit(ll_a, b6, b6, Some(MAC_A))), 255);
    let out = dp
        .test_run(&ethernet(GATEWAY_MAC, MAC_A, ETH_IPV6, &solicit), if_a, 1)
        .expect("run a neighbour solicitation");
    assert_eq!(out.return_code, tc_act::REDIRECT, "answered");
    assert_eq!(out.packet, nd::advert(&GATEWAY_MAC, &MAC_A, &b6, &ll_a).to_vec());
    // The same for the gateway's address through `from_endpoint6` entered directly (into
    // `nd6`): without a hand-over, or with a serial other than A's (B's, one no endpoint has),
    // a frame from A's interface with B's MAC is spoofed_mac; A's own is answered.
    let gateway6 = ip6_of(GATEWAY);
    let ns_gateway = neighbour_solicit(ll_a, gateway6, gateway6, Some(MAC_A));
    let solicit = with_hop_limit(ipv6(ll_a, gateway6, 58, &ns_gateway), 255);
    let from = |mac| ethernet(GATEWAY_MAC, mac, ETH_IPV6, &solicit);
    for handed in [None, Some(serial_of(IP_B)), Some(u64::MAX)] {
        let before = pinned_drops(dp.bpf_dir(), DropReason::SpoofedMac);
        let out = dp.test_run_from_endpoint6(&from(MAC_B), if_a, handed).expect("run");
        assert_eq!(out.return_code, tc_act::SHOT, "B's MAC, {handed:?} handed over");
        assert_eq!(pinned_drops(dp.bpf_dir(), DropReason::SpoofedMac), before + 1, "{handed:?}");
    }
    for handed in [None, Some(serial_of(IP_A))] {
        let out = dp.test_run_from_endpoint6(&from(MAC_A), if_a, handed).expect("run");
        assert_eq!(out.return_code, tc_act::REDIRECT, "A's MAC, {handed:?}: answered");
        assert_eq!(out.packet, nd::advert(&GATEWAY_MAC, &MAC_A, &gateway6, &ll_a).to_vec());
    }
    // The control block does reach the program: A's own serial spares the MAC check (only
    // `from_endpoint` writes it, after checking that MAC), so the runs above with a wrong one
    // were refused by the check, not for want of a hand-over. Answered to A's MAC.
    let handed = Some(serial_of(IP_A));
    let out = dp.test_run_from_endpoint6(&from(MAC_B), if_a, handed).expect("run");
    assert_eq!(out.return_code, tc_act::REDIRECT, "the hand-over is read");
    assert_eq!(&out.packet[0..6], &MAC_A);

    // An ICMP error from B about the tracked A->B flow reaches A without any ICMP rule (S6);
    // the same error quoting an untracked flow is judged by policy (B has no egress rule).
    let icmp_error = |sport: u16| {
        let quoted = ipv4(IP_A, IP_B, 6, &tcp(sport, 80, SYN, 0)[..8]);
        let icmp = icmp(3, 4, [0, 0, 0x05, 0xDC], &quoted);
        ethernet(GATEWAY_MAC, MAC_B, ETH_IPV4, &ipv4(IP_B, IP_A, 1, &icmp))
    };
    let out = dp.test_run(&icmp_error(40000), if_b, 1).expect("run ICMP error");
    assert_eq!(out.return_code, tc_act::REDIRECT, "related ICMP error admitted");
    let before = pinned_drops(dp.bpf_dir(), DropReason::PolicyEgress);
    assert_eq!(dp.test_run(&icmp_error(1), if_b, 1).expect("run").return_code, tc_act::SHOT);
    assert_eq!(
        pinned_drops(dp.bpf_dir(), DropReason::PolicyEgress),
        before + 1,
        "unrelated error judged by policy"
    );

    only_a_syn_in_its_own_direction_opens_a_tcp_flow(&mut dp, if_a, if_b);
    related_errors_come_only_from_the_peer(&mut dp, &want, if_a, if_b, if_c);
    flow_counters_count_each_packet_once_whichever_cpu_carries_it(&mut dp, if_a, if_b);
    measure(&mut dp, if_a);

    // A second load over the same bpffs reuses the pinned maps and keeps the links.
    drop(dp);
    let mut again = Dataplane::load(bpf_dir, &config()).expect("load again");
    assert_eq!(again.read().expect("read"), want, "pinned maps survive a reload");
    again.attach_endpoint("ha").expect("re-attach over a live link");
    assert_eq!(again.link_ifindex("ha").expect("link info"), Some(if_a), "the live link is kept");

    // A recreated interface leaves a stale pin behind; attaching replaces it.
    run_here("ip", &["link", "del", "hb"]);
    assert_eq!(again.link_ifindex("hb").expect("link info"), Some(0), "the link lost its device");
    run_here("ip", &["link", "add", "hb", "type", "veth", "peer", "name", "wb"]);
    let new_if_b = verse_ifindex("hb");
    assert_ne!(new_if_b, if_b);
    again.attach_endpoint("hb").expect("attach over a stale pin");
    assert_eq!(again.link_ifindex("hb").expect("link info"), Some(new_if_b));
    assert_eq!(again.test_run(&syn, if_a, 1).expect("run").return_code, tc_act::REDIRECT);

    // Removing everything leaves the maps empty.
    again.apply(&want, &MapContents::default()).expect("apply removal");
    assert_eq!(again.read().expect("read"), MapContents::default());
    again.detach_endpoint("ha").expect("detach ha");
    again.detach_endpoint("hb").expect("detach hb");
    again.detach_endpoint("hb").expect("detach is idempotent");
    assert!(again.pinned_links().expect("list").is_empty());
}

/// S7, direction: A may send B anything on TCP/80, B may send nothing of its own (no egress
/// rule). A segment without SYN opens no flow, so B's SYN back on the same ports is judged (and
/// refused by B's egress); a SYN in the reply direction of a flow is no hit; a reply without SYN
/// does not establish an opening flow; only the original SYN reopens a closing one.
fn only_a_syn_in_its_own_direction_opens_a_tcp_flow(dp: &mut Dataplane, if_a: u32, if_b: u32) {
    dp.clear_conntrack().expect("clear conntrack");
    let dp = &*dp;
    let back = |sport: u16| tcp_frame(MAC_B, IP_B, IP_A, 80, sport, SYN);
    let refused = |frame: &[u8], what: &str| {
        let before = pinned_drops(dp.bpf_dir(), DropReason::PolicyEgress);
        let out = dp.test_run(frame, if_b, 1).expect("run from B");
        assert_eq!(out.return_code, tc_act::SHOT, "{what}: refused");
        assert_eq!(
            pinned_drops(dp.bpf_dir(), DropReason::PolicyEgress),
            before + 1,
            "{what}: policy_egress"
        );
    };
    for (i, flags) in [0x10u8, 0x11, 0x04, 0x14, 0x18, 0x03, 0x06, 0x12, 0x00].iter().enumerate() {
        let port = 43000 + i as u16;
        let out =
            dp.test_run(&tcp_frame(MAC_A, IP_A, IP_B, port, 80, *flags), if_a, 1).expect("run");
        assert_eq!(out.return_code, tc_act::REDIRECT, "flags {flags:#x}: the rules allow it");
        assert!(dp.conntrack().expect("ct").is_empty(), "flags {flags:#x}: no flow without SYN");
        refused(&back(port), &format!("B's SYN after A's {flags:#x}"));
    }
    let state = |dp: &Dataplane| dp.conntrack().expect("ct").first().map(|(_, e)| e.state);
    let syn = tcp_frame(MAC_A, IP_A, IP_B, 44000, 80, SYN);
    assert_eq!(dp.test_run(&syn, if_a, 1).expect("run").return_code, tc_act::REDIRECT);
    assert_eq!(state(dp), Some(ct_state::TCP_OPENING));
    refused(&back(44000), "a SYN in the reply direction of an opening flow");
    let ack_back = tcp_frame(MAC_B, IP_B, IP_A, 80, 44000, 0x10);
    assert_eq!(dp.test_run(&ack_back, if_b, 1).expect("run").return_code, tc_act::REDIRECT);
    assert_eq!(state(dp), Some(ct_state::TCP_OPENING), "an ACK in reply does not establish");
    let syn_ack = tcp_frame(MAC_B, IP_B, IP_A, 80, 44000, SYN_ACK);
    assert_eq!(dp.test_run(&syn_ack, if_b, 1).expect("run").return_code, tc_act::REDIRECT);
    assert_eq!(state(dp), Some(ct_state::TCP_ESTABLISHED), "the SYN-ACK does");
    let fin = tcp_frame(MAC_A, IP_A, IP_B, 44000, 80, 0x11);
    assert_eq!(dp.test_run(&fin, if_a, 1).expect("run").return_code, tc_act::REDIRECT);
    assert_eq!(state(dp), Some(ct_state::TCP_CLOSING));
    refused(&back(44000), "a SYN in the reply direction of a closing flow");
    assert_eq!(state(dp), Some(ct_state::TCP_CLOSING), "not reopened");
    assert_eq!(dp.test_run(&syn, if_a, 1).expect("run").return_code, tc_act::REDIRECT);
    assert_eq!(state(dp), Some(ct_state::TCP_OPENING), "A's own SYN reopens it");
    assert_eq!(dp.conntrack().expect("ct").len(), 1);
}

/// Pins the calling thread to `cpu` (BPF_PROG_TEST_RUN runs the program on the caller's CPU).
fn pin_to(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET and sched_setaffinity get valid
    // pointers to it, and pid 0 is the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        let rc = libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
        assert_eq!(rc, 0, "sched_setaffinity(cpu {cpu}): {}", std::io::Error::last_os_error());
    }
}

/// Flow counters (flow logs, packets per rule): each direction is counted with plain adds by
/// the CPU that claimed it and atomically by any other CPU (README, "Flow logs"); every packet
/// is counted once, in one half or the other, whichever CPU carries it. Needs two CPUs.
fn flow_counters_count_each_packet_once_whichever_cpu_carries_it(
    dp: &mut Dataplane,
    if_a: u32,
    if_b: u32,
) {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    assert!(cpus >= 2, "this check needs two CPUs to run the program on; {cpus} available");
    dp.clear_conntrack().expect("clear conntrack");
    let syn = tcp_frame(MAC_A, IP_A, IP_B, 45000, 80, SYN);
    let ack = tcp_frame(MAC_A, IP_A, IP_B, 45000, 80, 0x10);
    let syn_ack = tcp_frame(MAC_B, IP_B, IP_A, 80, 45000, SYN_ACK);
    let ack_back = tcp_frame(MAC_B, IP_B, IP_A, 80, 45000, 0x10);
    let run = |cpu: usize, frame: &[u8], ifindex: u32| {
        pin_to(cpu);
        let out = dp.test_run(frame, ifindex, 1).expect("run");
        assert_eq!(out.return_code, tc_act::REDIRECT, "delivered on cpu {cpu}");
    };
    // The SYN on CPU 0 makes the flow and claims its original direction for CPU 0; CPU 1
    // carries two more of A's segments. The first reply, on CPU 1, claims the replies for it;
    // CPU 0 carries three more replies.
    run(0, &syn, if_a);
    run(1, &ack, if_a);
    run(1, &ack, if_a);
    run(0, &ack, if_a);
    run(1, &syn_ack, if_b);
    for _ in 0..3 {
        run(0, &ack_back, if_b);
    }
    // SAFETY: as in `pin_to`, with every CPU in the set: the thread runs anywhere again.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for cpu in 0..cpus {
            libc::CPU_SET(cpu, &mut set);
        }
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
    let ct = dp.conntrack_values().expect("read conntrack");
    assert_eq!(ct.len(), 1, "one flow: {ct:?}");
    let c = ct[0].1.counters;
    // 40-byte IPv4 datagrams (20 + 20) each.
    assert_eq!(c.packets(), [4, 4], "every packet once: {c:?}");
    assert_eq!(c.bytes(), [160, 160], "every byte once: {c:?}");
    assert_eq!(c.cpu, [1, 2], "original claimed by CPU 0, replies by CPU 1 (numbers + 1): {c:?}");
    assert_eq!((c.own_packets, c.shared_packets), ([2, 1], [2, 3]), "plain and atomic: {c:?}");
    dp.clear_conntrack().expect("clear conntrack");
}

/// S6: an ICMP error about A's flow with B is related only from B, only if it is an error and
/// no longer than a router's (576 bytes); else it is judged (B may send nothing, A admits
/// nothing). A third endpoint C (egress all) is a stranger to the flow: its errors are judged
/// by A's ingress rules.
fn related_errors_come_only_from_the_peer(
    dp: &mut Dataplane,
    want: &MapContents,
    if_a: u32,
    if_b: u32,
    if_c: u32,
) {
    const IP_C: [u8; 4] = [10, 0, 0, 4];
    const MAC_C: [u8; 6] = [0x02, 0xCC, 0x00, 0x00, 0x00, 0x04];
    const ID_C: u32 = 3;
    let mut with_c = want.clone();
    with_c.endpoints.insert(if_c, endpoint(IP_C, MAC_C, ID_C));
    own(&mut with_c, IP_C);
    with_c.routes.insert(RouteKey { vni: VNI, ip: IP_C }, route(if_c, ID_C, MAC_C, IP_C));
    egress_all(&mut with_c, ID_C);
    dp.apply(want, &with_c).expect("add C");
    dp.clear_conntrack().expect("clear conntrack");
    let syn = tcp_frame(MAC_A, IP_A, IP_B, 45000, 80, SYN);
    assert_eq!(dp.test_run(&syn, if_a, 1).expect("run").return_code, tc_act::REDIRECT);
    let quote = ipv4(IP_A, IP_B, 6, &tcp(45000, 80, SYN, 0))[..28].to_vec();
    let error = |mac, src, (ty, code): (u8, u8), total: usize| {
        let mut payload = quote.clone();
        payload.resize(payload.len().max(total.saturating_sub(28)), 0);
        ethernet(GATEWAY_MAC, mac, ETH_IPV4, &ipv4(src, IP_A, 1, &icmp(ty, code, [0; 4], &payload)))
    };
    let judged = |frame: &[u8], ifindex, reason, what: &str| {
        let before = pinned_drops(dp.bpf_dir(), reason);
        assert_eq!(
            dp.test_run(frame, ifindex, 1).expect("run").return_code,
            tc_act::SHOT,
            "{what}"
        );
        assert_eq!(
            pinned_drops(dp.bpf_dir(), reason),
            before + 1,
            "{what}: counted as {}",
            reason.label()
        );
    };
    let related = |frame: &[u8], what: &str| {
        let out = dp.test_run(frame, if_b, 1).expect("run");
        assert_eq!(out.return_code, tc_act::REDIRECT, "{what}: related");
        assert_eq!(&out.packet[0..6], &MAC_A, "{what}: to A");
    };
    for kind in [(3, 3), (3, 4), (11, 0), (12, 0)] {
        judged(
            &error(MAC_C, IP_C, kind, 56),
            if_c,
            DropReason::PolicyIngress,
            "a stranger's error",
        );
    }
    for kind in [(3, 0), (3, 15), (11, 1), (12, 2)] {
        related(&error(MAC_B, IP_B, kind, 56), &format!("the peer's {kind:?}"));
    }
    for kind in [(3, 16), (11, 2), (12, 3), (4, 0), (5, 1)] {
        let f = error(MAC_B, IP_B, kind, 56);
        judged(&f, if_b, DropReason::PolicyEgress, &format!("{kind:?} is no error"));
    }
    related(&error(MAC_B, IP_B, (3, 4), 576), "576 bytes");
    judged(&error(MAC_B, IP_B, (3, 4), 577), if_b, DropReason::PolicyEgress, "577 bytes");
    judged(&error(MAC_B, IP_B, (3, 3), 1256), if_b, DropReason::PolicyEgress, "1256 bytes");
    assert_eq!(dp.conntrack().expect("ct").len(), 1, "errors track nothing");
    dp.apply(&with_c, want).expect("remove C");
}

/// Mean ns/packet of the empty program, of new flows and of established flows, over a pool of
/// 1,024 distinct flows. Printed, not asserted: timing on a shared 2-core machine is noisy.
fn measure(dp: &mut Dataplane, if_a: u32) {
    dp.clear_conntrack().expect("clear conntrack");
    let pool: Vec<Vec<u8>> =
        (0..1024u16).map(|i| tcp_frame(MAC_A, IP_A, IP_B, 10_000 + i, 80, SYN)).collect();
    let empty = dp.test_run_pool_empty(&pool, if_a).expect("empty pool");
    let new = dp.test_run_pool(&pool, if_a).expect("new flows");
    let established = dp.test_run_pool(&pool, if_a).expect("established flows");
    assert_eq!(
        new.return_codes,
        BTreeMap::from([(tc_act::REDIRECT, 1024)]),
        "every new flow allowed"
    );
    assert_eq!(established.return_codes, BTreeMap::from([(tc_act::REDIRECT, 1024)]));
    let flows: HashSet<_> = dp.conntrack().expect("ct").into_iter().map(|(k, _)| k).collect();
    assert_eq!(flows.len(), 1024);
    eprintln!(
        "BPF_PROG_TEST_RUN ns/packet over 1024 flows: empty {:.1}, new flow {:.1}, established {:.1}",
        empty.mean_ns, new.mean_ns, established.mean_ns
    );
    dp.clear_conntrack().expect("clear conntrack");
}

/// Conntrack entries cache where each direction of a flow is delivered (`CtHop`), valid under
/// the route epoch. An endpoint deleted while its flows are live, and an interface index reused
/// by another endpoint in the same edit, must never receive those flows' packets: the edit
/// bumps the epoch, the cached hop is stale, the route lookup decides. Also: endpoints on an
/// ifindex beyond the slot array live in the hash, transparently. The same body for IPv4
/// (`VERSE_CT`, `from_endpoint`) and IPv6 (`VERSE_CT6`, `from_endpoint6`).
#[test]
fn a_reused_ifindex_never_receives_a_stale_flow() {
    reused_ifindex_in_netns(Family::V4);
}

#[test]
fn a_reused_ifindex_never_receives_a_stale_ipv6_flow() {
    reused_ifindex_in_netns(Family::V6);
}

/// A TCP frame between the endpoints at `src` and `dst` in `family` (their IPv4 addresses, or
/// the IPv6 ones `ip6_of` gives them), as the workload with `mac` sends it.
fn tcp_in(
    family: Family,
    mac: [u8; 6],
    ips: ([u8; 4], [u8; 4]),
    ports: (u16, u16),
    flags: u8,
) -> Vec<u8> {
    let ((src, dst), (sport, dport)) = (ips, ports);
    match family {
        Family::V4 => tcp_frame(mac, src, dst, sport, dport, flags),
        Family::V6 => {
            let segment = tcp(sport, dport, flags, 0);
            ethernet(GATEWAY_MAC, mac, ETH_IPV6, &ipv6(ip6_of(src), ip6_of(dst), 6, &segment))
        }
    }
}

/// The conntrack entry of the flow `src:sport -> dst` in `family`, if one is keyed so.
fn tracked(
    family: Family,
    dp: &Dataplane,
    src: [u8; 4],
    dst: [u8; 4],
    sport: u16,
) -> Option<CtValue> {
    match family {
        Family::V4 => dp
            .conntrack_values()
            .expect("read conntrack")
            .into_iter()
            .find(|(k, _)| (k.src, k.dst, k.sport) == (src, dst, sport))
            .map(|(_, v)| v),
        Family::V6 => dp
            .conntrack6_values()
            .expect("read conntrack6")
            .into_iter()
            .find(|(k, _)| (k.src, k.dst, k.sport) == (ip6_of(src), ip6_of(dst), sport))
            .map(|(_, v)| v),
    }
}

/// The deliveries cached for the flow `src:sport -> dst` in `family`: its original direction
/// (to `dst`) and its replies (to `src`).
fn cached_hop(
    family: Family,
    dp: &Dataplane,
    src: [u8; 4],
    dst: [u8; 4],
    sport: u16,
) -> (CtHop, CtHop) {
    let value = tracked(family, dp, src, dst, sport).expect("the flow is tracked");
    (value.original, value.reply)
}

/// The route to the endpoint at `ip` in both families.
fn put_route(d: &mut MapContents, ip: [u8; 4], route: Route) {
    d.routes.insert(RouteKey { vni: VNI, ip }, route);
    d.ipv6.routes.insert(Route6Key::new(VNI, ip6_of(ip)), route);
}

/// No route to the endpoint at `ip`, in either family.
fn drop_route(d: &mut MapContents, ip: [u8; 4]) {
    d.routes.remove(&RouteKey { vni: VNI, ip });
    d.ipv6.routes.remove(&Route6Key::new(VNI, ip6_of(ip)));
}

/// Identity `id` admits TCP/80 from A in both families.
fn admit_tcp80_from_a_both(d: &mut MapContents, id: u32) {
    admit_tcp80_from_a(d, id);
    let key = PolicyKey {
        identity: id.to_be_bytes(),
        direction: DIRECTION_INGRESS + DIRECTION_IPV6,
        peer: ID_A.to_be_bytes(),
        proto: 6,
        port: 80u16.to_be_bytes(),
    };
    d.ipv6.policy.insert((policy_prefix::FULL, key), PolicyValue::default());
    d.ipv6.policy_kinds = verse::compile::policy_kinds(&d.ipv6.policy);
}

fn reused_ifindex_in_netns(family: Family) {
    assert!(
        is_root(),
        "dataplane_load needs root (bpf, netns, mount): run it with `cargo xtask test`"
    );
    let ns = Netns::new("dpr");
    let dir = TempDir::new("dpr");
    let bpffs = Bpffs::mount(&dir.path().join("bpf"));
    ns.ip(&["link", "add", "ha", "type", "veth", "peer", "name", "wa"]);
    ns.ip(&["link", "add", "hb", "type", "veth", "peer", "name", "wb"]);
    ns.ip(&["link", "add", "hc", "type", "veth", "peer", "name", "wc"]);
    // Past the slots of VERSE_EP_SLOTS: this endpoint lives in VERSE_ENDPOINTS.
    let big = dataplane_common::capacity::ENDPOINT_SLOTS + 4464;
    ns.ip(&["link", "add", "hd", "index", &big.to_string(), "type", "veth", "peer", "name", "wd"]);
    let (if_a, if_b, if_c, if_d) =
        (ns.ifindex("ha"), ns.ifindex("hb"), ns.ifindex("hc"), ns.ifindex("hd"));
    assert_eq!(if_d, big);
    ns.enter(|| reused_ifindex(bpffs.path(), family, [if_a, if_b, if_c, if_d]));
}

fn reused_ifindex(bpf_dir: &Path, family: Family, [if_a, if_b, if_c, if_d]: [u32; 4]) {
    const IP_C: [u8; 4] = [10, 0, 0, 4];
    const IP_D: [u8; 4] = [10, 0, 0, 5];
    const MAC_C: [u8; 6] = [0x02, 0xCC, 0x00, 0x00, 0x00, 0x04];
    const MAC_B2: [u8; 6] = [0x02, 0xBB, 0x00, 0x00, 0x00, 0x13];
    const MAC_D: [u8; 6] = [0x02, 0xDD, 0x00, 0x00, 0x00, 0x05];
    const ID_C: u32 = 3;
    let mut dp = Dataplane::load(bpf_dir, &config()).expect("load the dataplane");
    // B and C admit TCP/80 from A, in both families.
    // D sends with A's identity (egress all) from an ifindex beyond the slots.
    let mut ab = desired(if_a, if_b);
    admit_tcp80_from_a_both(&mut ab, ID_B);
    ab.endpoints.insert(if_d, endpoint(IP_D, MAC_D, ID_A));
    own(&mut ab, IP_D);
    put_route(&mut ab, IP_D, route(if_d, ID_A, MAC_D, IP_D));
    admit_tcp80_from_a_both(&mut ab, ID_C);
    dp.apply(&MapContents::default(), &ab).expect("apply A, B, D");
    assert_eq!(dp.read().expect("read"), ab, "slots and hash read back as one map");

    // The cached delivery of the A -> B flow below.
    let hop_to_b = |dp: &Dataplane| cached_hop(family, dp, IP_A, IP_B, 41000).0;
    // A -> B established; its delivery is cached under the current epoch.
    let syn = tcp_in(family, MAC_A, (IP_A, IP_B), (41000, 80), SYN);
    let ack = tcp_in(family, MAC_A, (IP_A, IP_B), (41000, 80), 0x10);
    assert_eq!(dp.test_run(&syn, if_a, 1).expect("run").return_code, tc_act::REDIRECT);
    let syn_ack = tcp_in(family, MAC_B, (IP_B, IP_A), (80, 41000), SYN_ACK);
    assert_eq!(dp.test_run(&syn_ack, if_b, 1).expect("run").return_code, tc_act::REDIRECT);
    let out = dp.test_run(&ack, if_a, 1).expect("run");
    assert_eq!(out.return_code, tc_act::REDIRECT);
    assert_eq!(&out.packet[0..6], &MAC_B);
    let hop = hop_to_b(&dp);
    assert_eq!((hop.ifindex, hop.mac), (if_b, MAC_B));
    assert_eq!(hop.epoch, dp.epoch().expect("epoch"), "cached under the current epoch");
    // Delivered by the cached hop (no route changed since).
    let out = dp.test_run(&ack, if_a, 1).expect("run");
    assert_eq!((out.return_code, &out.packet[0..6]), (tc_act::REDIRECT, &MAC_B[..]));
    // D (hash, not slot) reaches B too.
    let syn_d = tcp_in(family, MAC_D, (IP_D, IP_B), (41001, 80), SYN);
    assert_eq!(dp.test_run(&syn_d, if_d, 1).expect("run").return_code, tc_act::REDIRECT);

    // One edit deletes B and puts C on B's interface (the ifindex reused at once).
    let mut ac = ab.clone();
    ac.endpoints.insert(if_b, endpoint(IP_C, MAC_C, ID_C));
    ac.ct_owners.remove(&slot_of(IP_B));
    own(&mut ac, IP_C);
    drop_route(&mut ac, IP_B);
    put_route(&mut ac, IP_C, route(if_b, ID_C, MAC_C, IP_C));
    let epoch = dp.epoch().expect("epoch");
    dp.apply(&ab, &ac).expect("apply: B gone, C on its ifindex");
    assert!(dp.epoch().expect("epoch") > epoch, "the edit bumped the epoch");
    assert_eq!(dp.read().expect("read"), ac);
    // The flow to B is still tracked, but nothing delivers it: B has no route.
    let before = pinned_drops(dp.bpf_dir(), DropReason::NoRoute);
    for _ in 0..3 {
        assert_eq!(dp.test_run(&ack, if_a, 1).expect("run").return_code, tc_act::SHOT);
    }
    assert_eq!(pinned_drops(dp.bpf_dir(), DropReason::NoRoute), before + 3, "no_route, not C");
    // B's old frames on that interface are C's now: spoofed (S10).
    let before = pinned_drops(dp.bpf_dir(), DropReason::SpoofedMac);
    assert_eq!(dp.test_run(&syn_ack, if_b, 1).expect("run").return_code, tc_act::SHOT);
    assert_eq!(pinned_drops(dp.bpf_dir(), DropReason::SpoofedMac), before + 1);
    // C gets its own flows.
    let syn_c = tcp_in(family, MAC_A, (IP_A, IP_C), (41002, 80), SYN);
    let out = dp.test_run(&syn_c, if_a, 1).expect("run");
    assert_eq!(out.return_code, tc_act::REDIRECT);
    assert_eq!(&out.packet[0..6], &MAC_C);

    // B comes back with its address on another interface and MAC: its live flow follows it.
    let mut acb = ac.clone();
    acb.endpoints.insert(if_c, endpoint(IP_B, MAC_B2, ID_B));
    own(&mut acb, IP_B);
    put_route(&mut acb, IP_B, route(if_c, ID_B, MAC_B2, IP_B));
    dp.apply(&ac, &acb).expect("apply: B on another interface");
    let out = dp.test_run(&ack, if_a, 1).expect("run");
    assert_eq!(out.return_code, tc_act::REDIRECT, "the tracked flow reaches the new B");
    assert_eq!(&out.packet[0..6], &MAC_B2, "addressed to the new B, not to C");
    let hop = hop_to_b(&dp);
    assert_eq!((hop.ifindex, hop.mac), (if_c, MAC_B2), "the cache now names B's interface");
    assert_eq!(hop.epoch, dp.epoch().expect("epoch"));

    // Removing D clears the hash entry; removing the rest clears the slots.
    dp.apply(&acb, &MapContents::default()).expect("apply removal");
    assert_eq!(dp.read().expect("read"), MapContents::default());
    let before = pinned_drops(dp.bpf_dir(), DropReason::UnknownEndpoint);
    assert_eq!(dp.test_run(&syn_d, if_d, 1).expect("run").return_code, tc_act::SHOT);
    assert_eq!(dp.test_run(&ack, if_a, 1).expect("run").return_code, tc_act::SHOT);
    assert_eq!(pinned_drops(dp.bpf_dir(), DropReason::UnknownEndpoint), before + 2);
}

/// The network namespace and bpffs of a test on three endpoint interfaces (ha, hb, hc), entered
/// with the bpffs path and their ifindexes.
fn in_netns_with_three(tag: &str, body: impl FnOnce(&Path, [u32; 3]) + Send) {
    assert!(
        is_root(),
        "dataplane_load needs root (bpf, netns, mount): run it with `cargo xtask test`"
    );
    let ns = Netns::new(tag);
    let dir = TempDir::new(tag);
    let bpffs = Bpffs::mount(&dir.path().join("bpf"));
    for (host, workload) in [("ha", "wa"), ("hb", "wb"), ("hc", "wc")] {
        ns.ip(&["link", "add", host, "type", "veth", "peer", "name", workload]);
    }
    let ifs = [ns.ifindex("ha"), ns.ifindex("hb"), ns.ifindex("hc")];
    ns.enter(|| body(bpffs.path(), ifs));
}

/// Opens the TCP flow A:`sport` -> B:80 in `family` (SYN, B's SYN-ACK, A's ACK), each delivered.
fn establish(family: Family, dp: &Dataplane, if_a: u32, if_b: u32, sport: u16) {
    let frames = [
        (tcp_in(family, MAC_A, (IP_A, IP_B), (sport, 80), SYN), if_a),
        (tcp_in(family, MAC_B, (IP_B, IP_A), (80, sport), SYN_ACK), if_b),
        (tcp_in(family, MAC_A, (IP_A, IP_B), (sport, 80), 0x10), if_a),
    ];
    for (frame, from) in frames {
        assert_eq!(dp.test_run(&frame, from, 1).expect("run").return_code, tc_act::REDIRECT);
    }
}

/// An apply that fails part-way, after it wrote a changed route, still bumps the route epoch
/// (fail closed): the maps hold the new route, the reconciler reads them back as applied and
/// would not write (nor bump) again, so without the bump established flows of both families
/// would keep delivering by their cached hops to where the route no longer points.
#[test]
fn an_apply_that_fails_after_a_route_write_still_bumps_the_epoch() {
    in_netns_with_three("dpf", failed_apply_bumps);
}

fn failed_apply_bumps(bpf_dir: &Path, [if_a, if_b, if_c]: [u32; 3]) {
    const MAC_B2: [u8; 6] = [0x02, 0xBB, 0x00, 0x00, 0x00, 0x13];
    let mut dp = Dataplane::load(bpf_dir, &config()).expect("load the dataplane");
    let mut ab = desired(if_a, if_b);
    admit_tcp80_from_a_both(&mut ab, ID_B);
    dp.apply(&MapContents::default(), &ab).expect("apply A, B");
    let families = [Family::V4, Family::V6];
    for family in families {
        establish(family, &dp, if_a, if_b, 41000);
        let hop = cached_hop(family, &dp, IP_A, IP_B, 41000).0;
        assert_eq!((hop.ifindex, hop.mac), (if_b, MAC_B), "{family:?}");
    }
    // B moves to C's interface with another MAC; the same edit brings one endpoint more than
    // VERSE_ENDPOINTS holds (ifindexes past the slots): the routes are written, then the
    // hash fills and the apply fails.
    let mut moved = ab.clone();
    moved.endpoints.remove(&if_b);
    moved.endpoints.insert(if_c, endpoint(IP_B, MAC_B2, ID_B));
    put_route(&mut moved, IP_B, route(if_c, ID_B, MAC_B2, IP_B));
    let past = dataplane_common::capacity::ENDPOINT_SLOTS;
    for i in 0..=dataplane_common::capacity::ENDPOINTS {
        moved.endpoints.insert(past + i, endpoint([10, 0, 1, 5], [0x02, 0xDD, 0, 0, 0, 5], ID_A));
    }
    let epoch = dp.epoch().expect("epoch");
    let failed = dp.apply(&ab, &moved).expect_err("more endpoints than VERSE_ENDPOINTS holds");
    eprintln!("apply failed as meant: {failed}");
    let written = dp.read().expect("read");
    assert_eq!(written.routes[&RouteKey { vni: VNI, ip: IP_B }].ifindex, if_c, "route written");
    assert!(dp.epoch().expect("epoch") > epoch, "the failed apply bumped the epoch");
    for family in families {
        let ack = tcp_in(family, MAC_A, (IP_A, IP_B), (41000, 80), 0x10);
        let out = dp.test_run(&ack, if_a, 1).expect("run");
        assert_eq!(out.return_code, tc_act::REDIRECT, "{family:?}");
        assert_eq!(&out.packet[0..6], &MAC_B2, "{family:?}: the new route, not the cached hop");
        let hop = cached_hop(family, &dp, IP_A, IP_B, 41000).0;
        assert_eq!((hop.ifindex, hop.mac), (if_c, MAC_B2), "{family:?}");
        assert_eq!(hop.epoch, dp.epoch().expect("epoch"), "{family:?}");
    }
}

/// The replies of an established flow are delivered by the hop cached in the same entry as its
/// original direction (`reply`), stamped with the current epoch: B's ACK reaches A through it,
/// and no second entry is keyed by the reversed flow. A moved to another interface and MAC (its
/// route rewritten, the epoch bumped), B's next reply follows the new route and the cache names
/// it. One body for IPv4 and IPv6.
#[test]
fn replies_are_delivered_by_the_cached_reply_hop_and_follow_a_moved_sender() {
    in_netns_with_three("dpy", |bpf_dir, ifs| {
        for family in [Family::V4, Family::V6] {
            replies_follow_the_route(bpf_dir, family, ifs);
        }
    });
}

fn replies_follow_the_route(bpf_dir: &Path, family: Family, [if_a, if_b, if_c]: [u32; 3]) {
    const MAC_A2: [u8; 6] = [0x02, 0xAA, 0x00, 0x00, 0x00, 0x12];
    let mut dp = Dataplane::load(bpf_dir, &config()).expect("load the dataplane");
    let mut ab = desired(if_a, if_b);
    admit_tcp80_from_a_both(&mut ab, ID_B);
    dp.apply(&dp.read().expect("read"), &ab).expect("apply A, B");
    let sport = match family {
        Family::V4 => 42000,
        Family::V6 => 42006,
    };
    establish(family, &dp, if_a, if_b, sport);
    let reply = tcp_in(family, MAC_B, (IP_B, IP_A), (80, sport), 0x10);
    let out = dp.test_run(&reply, if_b, 1).expect("run");
    assert_eq!((out.return_code, &out.packet[0..6]), (tc_act::REDIRECT, &MAC_A[..]));
    let (_, back) = cached_hop(family, &dp, IP_A, IP_B, sport);
    assert_eq!((back.ifindex, back.mac), (if_a, MAC_A), "{family:?}: the reply hop names A");
    assert_eq!(back.epoch, dp.epoch().expect("epoch"), "{family:?}: under the current epoch");
    assert!(
        tracked(family, &dp, IP_B, IP_A, 80).is_none(),
        "{family:?}: no entry under the reversed key"
    );

    // A moves to C's interface with another MAC.
    let mut moved = ab.clone();
    moved.endpoints.remove(&if_a);
    moved.endpoints.insert(if_c, endpoint(IP_A, MAC_A2, ID_A));
    put_route(&mut moved, IP_A, route(if_c, ID_A, MAC_A2, IP_A));
    let epoch = dp.epoch().expect("epoch");
    dp.apply(&ab, &moved).expect("apply: A on another interface");
    assert!(dp.epoch().expect("epoch") > epoch);
    let out = dp.test_run(&reply, if_b, 1).expect("run");
    assert_eq!(out.return_code, tc_act::REDIRECT, "{family:?}");
    assert_eq!(&out.packet[0..6], &MAC_A2, "{family:?}: the reply follows A's new route");
    let (_, back) = cached_hop(family, &dp, IP_A, IP_B, sport);
    assert_eq!((back.ifindex, back.mac), (if_c, MAC_A2), "{family:?}: the cache names A's move");
    assert_eq!(back.epoch, dp.epoch().expect("epoch"), "{family:?}");
    dp.apply(&moved, &MapContents::default()).expect("empty the maps");
}

// ---- rule counters: slots of VERSE_RULE_HITS ----------------------------------------------

/// A rule deleted and another created in its slot: the new rule counts from 0, the rule that
/// stayed keeps its count, and both survive a restart (a second load over the same pins, whose
/// allocator is rebuilt from the policy entries). Compiled by the real compiler with the
/// reconciler's kept numbering, applied in the reconciler's order, counted by `from_endpoint`.
#[test]
fn a_reused_rule_slot_counts_from_zero_and_the_survivor_keeps_its_count() {
    assert!(
        is_root(),
        "dataplane_load needs root (bpf, netns, mount): run it with `cargo xtask test`"
    );
    let ns = Netns::new("dps");
    let dir = TempDir::new("dps");
    let bpffs = Bpffs::mount(&dir.path().join("bpf"));
    ns.ip(&["link", "add", "ha", "type", "veth", "peer", "name", "wa"]);
    ns.ip(&["link", "add", "hb", "type", "veth", "peer", "name", "wb"]);
    let (if_a, if_b) = (ns.ifindex("ha"), ns.ifindex("hb"));
    ns.enter(|| reused_rule_slot(bpffs.path(), if_a, if_b));
}

fn reused_rule_slot(bpf_dir: &Path, if_a: u32, if_b: u32) {
    use verse::compile::{compile, Ids};
    use verse::model::{self, CreateEndpoint, CreateGroup, CreateRule, CreateUniverse, State};
    const HOST: &str = "h1";

    let mut st = State::default();
    let u = st
        .create_universe(CreateUniverse {
            name: "u".into(),
            cidr: Some("10.0.0.0/16".into()),
            cidrs: None,
            ipv6_cidrs: None,
        })
        .expect("universe");
    let srv = st
        .create_group(CreateGroup { universe: u.id.clone(), name: "srv".into(), description: None })
        .expect("group")
        .id;
    let add = |st: &mut State, port: i64| {
        let req = CreateRule {
            direction: "ingress".into(),
            protocol: serde_json::json!("tcp"),
            from_port: Some(port),
            to_port: Some(port),
            cidr: Some("0.0.0.0/0".into()),
            ..CreateRule::default()
        };
        let id = st.add_rule(&srv, req).expect("add rule").id;
        (id.clone(), model::rule_bits(&id).expect("a rule id"))
    };
    let (_, keep) = add(&mut st, 80);
    let (gone_id, gone) = add(&mut st, 81);
    let endpoint = |st: &mut State, ip: &str, groups: Option<Vec<String>>| {
        let req = CreateEndpoint {
            universe: u.id.clone(),
            host: None,
            netns: format!("ns-{ip}"),
            ip: ip.into(),
            security_groups: groups,
            conntrack_budget: None,
            flow_logs: None,
            ipv6: None,
        };
        st.create_endpoint(req, HOST).expect("endpoint")
    };
    let a = endpoint(&mut st, "10.0.0.2", None);
    let b = endpoint(&mut st, "10.0.0.3", Some(vec![srv.clone()]));
    let (mac_a, ip_a) = (model::parse_mac(&a.mac).expect("mac"), a.ip.octets());
    let ip_b = b.ip.octets();
    let (id_a, id_b) = (a.id.clone(), b.id.clone());
    let lookup = move |ep: &model::Endpoint| {
        (ep.id == id_a).then_some(if_a).or((ep.id == id_b).then_some(if_b))
    };

    let mut dp = Dataplane::load(bpf_dir, &config()).expect("load the dataplane");
    let mut ids = Ids::default();
    let first = compile(&st, HOST, &lookup, &mut ids).expect("compile");
    dp.apply(&MapContents::default(), &first).expect("apply");
    let slot_of = |d: &MapContents, rule: u32| {
        d.rules.iter().find(|(_, r)| **r == rule).map(|(s, _)| *s).expect("the rule has a slot")
    };
    let gone_slot = slot_of(&first, gone);

    let mut sport = 42000;
    let mut new_flows = |dp: &Dataplane, port: u16, n: u64| {
        for _ in 0..n {
            sport += 1;
            let syn = tcp_frame(mac_a, ip_a, ip_b, sport, port, SYN);
            assert_eq!(dp.test_run(&syn, if_a, 1).expect("run").return_code, tc_act::REDIRECT);
        }
    };
    new_flows(&dp, 80, 2);
    new_flows(&dp, 81, 3);
    let hits = dp.rule_hits().expect("hits");
    assert_eq!((hits[&keep], hits[&gone]), (2, 3), "{hits:?}");

    // The rule on 81 is deleted: its slot is freed (its count goes with it).
    st.delete_rule(&srv, &gone_id).expect("delete rule");
    let second = compile(&st, HOST, &lookup, &mut ids).expect("compile");
    dp.apply(&first, &second).expect("apply");
    let hits = dp.rule_hits().expect("hits");
    assert!(!hits.contains_key(&gone), "a deleted rule has no counter: {hits:?}");
    assert_eq!(hits[&keep], 2);

    // Another rule is created and takes that slot: it starts at 0.
    let (_, fresh) = add(&mut st, 82);
    let third = compile(&st, HOST, &lookup, &mut ids).expect("compile");
    assert_eq!(slot_of(&third, fresh), gone_slot, "the freed slot is reused");
    dp.apply(&second, &third).expect("apply");
    let hits = dp.rule_hits().expect("hits");
    assert_eq!((hits[&keep], hits[&fresh]), (2, 0), "the old rule's 3 are not the new one's");
    new_flows(&dp, 82, 1);
    new_flows(&dp, 80, 1);
    let hits = dp.rule_hits().expect("hits");
    assert_eq!((hits[&keep], hits[&fresh]), (3, 1), "{hits:?}");

    // A restart: the allocator comes back from the maps, the same state writes nothing and the
    // counts are where they were.
    drop(dp);
    let mut dp = Dataplane::load(bpf_dir, &config()).expect("load again");
    let held = dp.read().expect("read");
    assert_eq!(held, third, "the maps hold the slots the compiler gave");
    let mut ids = verse::reconcile::seed_ids(&held);
    assert_eq!(compile(&st, HOST, &lookup, &mut ids).expect("compile"), third);
    let hits = dp.rule_hits().expect("hits");
    assert_eq!((hits[&keep], hits[&fresh]), (3, 1), "counts survive the restart: {hits:?}");
    dp.apply(&third, &MapContents::default()).expect("empty the maps");
}

/// A map pinned by an earlier build with another layout (here `VERSE_RULE_HITS` as the per-CPU
/// hash it was) is refused at load with an error naming the map and its pin, not reused.
#[test]
fn a_pinned_map_of_another_layout_is_refused_by_name() {
    assert!(
        is_root(),
        "dataplane_load needs root (bpf, netns, mount): run it with `cargo xtask test`"
    );
    let dir = TempDir::new("dpp");
    let bpffs = Bpffs::mount(&dir.path().join("bpf"));
    let name = dataplane_common::map_names::RULE_HITS;
    let path = bpffs.path().join(name);
    pin_old_rule_hits(&path);
    let err = Dataplane::load(bpffs.path(), &config()).expect_err("an old pin is refused");
    let text = err.to_string();
    eprintln!("{text}");
    assert!(text.contains(name) && text.contains(&path.display().to_string()), "{text}");
    assert!(text.contains("per-CPU hash") && text.contains("per-CPU array"), "{text}");
    // Without the pin, the load makes the map anew.
    std::fs::remove_file(&path).expect("remove the old pin");
    Dataplane::load(bpffs.path(), &config()).expect("load with the pin removed");
}

/// Pins at `path` a map with the layout `VERSE_RULE_HITS` had before it was an array: a per-CPU
/// hash (`BPF_MAP_TYPE_PERCPU_HASH`), u32 keys, u64 values, `BPF_F_NO_PREALLOC`.
fn pin_old_rule_hits(path: &Path) {
    let fd = pin_new_map(path, [5, 4, 8, 1024, 1]);
    // SAFETY: `fd` is the map fd made above, owned here; the pin keeps the map.
    unsafe { libc::close(fd) };
}

/// Makes a map of `layout` (map_type, key_size, value_size, max_entries, map_flags), pins it at
/// `path`, and returns its fd (the caller closes it).
fn pin_new_map(path: &Path, layout: [u32; 5]) -> i32 {
    use std::os::unix::ffi::OsStrExt as _;
    const BPF_MAP_CREATE: libc::c_long = 0;
    const BPF_OBJ_PIN: libc::c_long = 6;
    // `union bpf_attr` for BPF_MAP_CREATE: map_type, key_size, value_size, max_entries,
    // map_flags (u32 each), then fields left 0.
    let mut attr = [0u32; 32];
    attr[..5].copy_from_slice(&layout);
    // SAFETY: `attr` is a zeroed, large enough bpf_attr for BPF_MAP_CREATE, alive for the call.
    let fd = unsafe {
        libc::syscall(libc::SYS_bpf, BPF_MAP_CREATE, attr.as_ptr(), std::mem::size_of_val(&attr))
    };
    assert!(fd >= 0, "BPF_MAP_CREATE: {}", std::io::Error::last_os_error());
    let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).expect("pin path");
    // `union bpf_attr` for BPF_OBJ_PIN: pathname (u64), bpf_fd (u32), file_flags (u32).
    let mut pin = [0u64; 4];
    pin[0] = c_path.as_ptr() as u64;
    pin[1] = fd as u64;
    // SAFETY: `pin` is a zeroed bpf_attr for BPF_OBJ_PIN naming `c_path`, which outlives the
    // call, and the map fd made above.
    let rc = unsafe {
        libc::syscall(libc::SYS_bpf, BPF_OBJ_PIN, pin.as_ptr(), std::mem::size_of_val(&pin))
    };
    assert_eq!(rc, 0, "BPF_OBJ_PIN: {}", std::io::Error::last_os_error());
    fd as i32
}

/// A daemon of an older layout kept the route epoch in a map of its own (`VERSE_EPOCH`, one
/// u32): the first load goes on from its epoch (the pinned conntrack entries may carry deliveries
/// cached under any epoch up to it, which must never become current again) and removes that
/// pin; after that the epoch lives in the pinned settings (`VERSE_CONFIG`), and every restart
/// moves it on from there, not from 0.
#[test]
fn the_route_epoch_goes_on_from_where_an_older_daemon_left_it() {
    assert!(
        is_root(),
        "dataplane_load needs root (bpf, netns, mount): run it with `cargo xtask test`"
    );
    const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
    let dir = TempDir::new("dpe");
    let bpffs = Bpffs::mount(&dir.path().join("bpf"));
    let path = bpffs.path().join(dataplane_common::map_names::LEGACY_EPOCH);
    // The old map: an array of one u32, at epoch 1000.
    let fd = pin_new_map(&path, [2, 4, 4, 1, 0]);
    let (key, value) = (0u32, 1000u32);
    // `union bpf_attr` for BPF_MAP_UPDATE_ELEM: map_fd (u32), pad, key, value, flags (u64s).
    let attr = [fd as u64, &key as *const u32 as u64, &value as *const u32 as u64, 0];
    // SAFETY: a bpf_attr for BPF_MAP_UPDATE_ELEM naming the map made above and a key and value
    // of its sizes, all alive for the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_MAP_UPDATE_ELEM,
            attr.as_ptr(),
            std::mem::size_of_val(&attr),
        )
    };
    assert_eq!(rc, 0, "BPF_MAP_UPDATE_ELEM: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` is the map fd made above, owned here; the pin keeps the map.
    unsafe { libc::close(fd) };

    let dp = Dataplane::load(bpffs.path(), &config()).expect("load over the old epoch's pin");
    let first = dp.epoch().expect("epoch");
    assert!(first > 1000, "the epoch goes on from the old map's 1000, not from 0: {first}");
    assert!(!path.exists(), "the old epoch's pin is removed");
    drop(dp);
    let dp = Dataplane::load(bpffs.path(), &config()).expect("load again");
    let second = dp.epoch().expect("epoch");
    assert!(second > first, "a restart moves the pinned epoch on: {first} then {second}");
}

/// `VERSE_POLICY_KINDS` follows the policy entries through edits that change the kind of peer a
/// rule names (identity, then `0.0.0.0/0`, then nothing): each edit's flows are judged by its
/// own entries, none skipped, and the map holds exactly the kinds of the entries left.
#[test]
fn edits_that_change_the_kind_of_peer_are_judged_by_their_own_entries() {
    assert!(
        is_root(),
        "dataplane_load needs root (bpf, netns, mount): run it with `cargo xtask test`"
    );
    let ns = Netns::new("dpk");
    ns.disable_ipv6();
    let dir = TempDir::new("dpk");
    let bpffs = Bpffs::mount(&dir.path().join("bpf"));
    ns.ip(&["link", "add", "ha", "type", "veth", "peer", "name", "wa"]);
    ns.ip(&["link", "add", "hb", "type", "veth", "peer", "name", "wb"]);
    let (if_a, if_b) = (ns.ifindex("ha"), ns.ifindex("hb"));
    ns.enter(|| kinds_follow_edits(bpffs.path(), if_a, if_b));
}

fn kinds_follow_edits(bpf_dir: &Path, if_a: u32, if_b: u32) {
    use dataplane_common::peer_kind;
    let mut dp = Dataplane::load(bpf_dir, &config()).expect("load the dataplane");
    // B admits TCP/80 from A's identity.
    let by_identity = desired(if_a, if_b);
    dp.apply(&MapContents::default(), &by_identity).expect("apply");
    // ...then from 0.0.0.0/0 instead (the identity entry removed)...
    let mut by_any = by_identity.clone();
    by_any.policy.retain(|(_, k), _| k.direction != DIRECTION_INGRESS);
    by_any.policy.insert(
        (
            policy_prefix::FULL,
            PolicyKey {
                identity: ID_B.to_be_bytes(),
                direction: DIRECTION_INGRESS,
                peer: dataplane_common::peer::ANY.to_be_bytes(),
                proto: 6,
                port: 80u16.to_be_bytes(),
            },
        ),
        PolicyValue::default(),
    );
    by_any.policy_kinds = verse::compile::policy_kinds(&by_any.policy);
    // ...then from nobody.
    let mut none = by_any.clone();
    none.policy.retain(|(_, k), _| k.direction != DIRECTION_INGRESS);
    none.policy_kinds = verse::compile::policy_kinds(&none.policy);
    assert_eq!(
        by_any.policy_kinds[&ID_B],
        peer_kind::bit(DIRECTION_INGRESS, peer_kind::ANY),
        "B's ingress names only 0.0.0.0/0"
    );
    assert!(!none.policy_kinds.contains_key(&ID_B), "B has no entry left");

    let mut sport = 41000;
    let mut syn = |dp: &Dataplane| {
        sport += 1;
        dp.test_run(&tcp_frame(MAC_A, IP_A, IP_B, sport, 80, SYN), if_a, 1)
            .expect("run")
            .return_code
    };
    assert_eq!(syn(&dp), tc_act::REDIRECT, "admitted by the identity entry");
    dp.apply(&by_identity, &by_any).expect("apply 0.0.0.0/0");
    assert_eq!(dp.read().expect("read"), by_any, "the kinds are exactly those of the entries");
    assert_eq!(syn(&dp), tc_act::REDIRECT, "admitted by the 0.0.0.0/0 entry");
    dp.apply(&by_any, &none).expect("apply nothing");
    assert_eq!(dp.read().expect("read"), none, "no kind is left for B");
    let before = pinned_drops(dp.bpf_dir(), DropReason::PolicyIngress);
    assert_eq!(syn(&dp), tc_act::SHOT, "nothing admits it");
    assert_eq!(pinned_drops(dp.bpf_dir(), DropReason::PolicyIngress), before + 1);
    dp.apply(&none, &by_identity).expect("apply the identity entry again");
    assert_eq!(dp.read().expect("read"), by_identity);
    assert_eq!(syn(&dp), tc_act::REDIRECT, "admitted by the identity entry again");

    // A daemon of an earlier version pinned the policy but no kinds map: the load fills a new
    // one from the pinned entries, so new flows are judged by them before any apply.
    drop(dp);
    let pin = bpf_dir.join(dataplane_common::map_names::POLICY_KINDS);
    std::fs::remove_file(&pin).expect("remove the kinds map's pin");
    let dp = Dataplane::load(bpf_dir, &config()).expect("load over the older pins");
    assert_eq!(dp.read().expect("read"), by_identity, "the kinds are those of the pinned entries");
    assert_eq!(syn(&dp), tc_act::REDIRECT, "admitted at once, before any apply");
}

/// Pinned links stay attached and keep judging while no daemon runs, IPv6 included:
/// `VERSE_JUMP` (where `from_endpoint` tail-calls `from_endpoint6`, and that `nd6` for
/// neighbour discovery) is pinned, since the kernel empties a program array no one holds
/// (`map_release_uref`), and every IPv6 frame would then be dropped as `program_missing` until
/// a daemon loads again. And a trace runner (`verse trace --run`) fills a jump table of its own:
/// in the live one, its `from_endpoint6` would judge live IPv6 with the run's private conntrack
/// and counters. Real frames through real veths.
#[test]
fn ipv6_keeps_being_judged_while_the_daemon_is_down_and_beside_a_trace_runner() {
    assert!(is_root(), "needs root");
    let ns = Netns::new("rv6");
    ns.disable_ipv6();
    let dir = TempDir::new("rv6");
    let bpffs = Bpffs::mount(&dir.path().join("bpf"));
    // The workloads in namespaces of their own (bpf_redirect_peer delivers across namespaces).
    let (wla, wlb) = (Netns::new("rv6a"), Netns::new("rv6b"));
    wla.disable_ipv6();
    wlb.disable_ipv6();
    ns.ip(&["link", "add", "ha", "type", "veth", "peer", "name", "wa", "netns", wla.name()]);
    ns.ip(&["link", "add", "hb", "type", "veth", "peer", "name", "wb", "netns", wlb.name()]);
    for dev in ["ha", "hb"] {
        ns.ip(&["link", "set", dev, "up"]);
    }
    wla.ip(&["link", "set", "wa", "up"]);
    wlb.ip(&["link", "set", "wb", "up"]);
    let (if_a, if_b) = (ns.ifindex("ha"), ns.ifindex("hb"));
    let bpf_dir = bpffs.path().to_path_buf();
    let dp = ns.enter(|| {
        let mut dp = Dataplane::load(&bpf_dir, &config()).expect("load");
        dp.attach_endpoint("ha").expect("attach ha");
        dp.attach_endpoint("hb").expect("attach hb");
        dp.apply(&MapContents::default(), &desired(if_a, if_b)).expect("apply");
        dp
    });
    let (a6, b6) = (ip6_of(IP_A), ip6_of(IP_B));
    let udp6 = |sport: u16| {
        ethernet(GATEWAY_MAC, MAC_A, ETH_IPV6, &ipv6(a6, b6, 17, &udp(sport, 53, b"x")))
    };
    let syn = |sport: u16| tcp_frame(MAC_A, IP_A, IP_B, sport, 80, SYN);
    let delivered = |frame: &[u8], sport: u16| {
        let cap = tests::PacketCapture::open(&wlb, "wb").expect("capture wb");
        tests::send_frame(&wla, "wa", frame).expect("send");
        cap.find(std::time::Duration::from_secs(2), |f| {
            f.len() >= 36 && f[0..6] == MAC_B && {
                let at = if f[12..14] == [0x86, 0xdd] { 54 } else { 34 };
                f.len() >= at + 2 && f[at..at + 2] == sport.to_be_bytes()
            }
        })
        .is_some()
    };
    let missing = || pinned_drops(&bpf_dir, DropReason::ProgramMissing);
    // A solicitation for B's address from A's link-local one, answered by the gateway (`nd6`).
    let ll_a = nd::link_local(MAC_A);
    let solicit = ethernet(
        GATEWAY_MAC,
        MAC_A,
        ETH_IPV6,
        &with_hop_limit(ipv6(ll_a, b6, 58, &neighbour_solicit(ll_a, b6, b6, Some(MAC_A))), 255),
    );
    let answered = || {
        let cap = tests::PacketCapture::open(&wla, "wa").expect("capture wa");
        tests::send_frame(&wla, "wa", &solicit).expect("send");
        let advert = nd::advert(&GATEWAY_MAC, &MAC_A, &b6, &ll_a);
        cap.find(std::time::Duration::from_secs(2), |f| f == &advert[..]).is_some()
    };
    // The daemon is up: both families delivered.
    assert!(delivered(&syn(41000), 41000), "IPv4 with the daemon up");
    assert!(delivered(&udp6(41001), 41001), "IPv6 with the daemon up");
    // The daemon exits (its descriptors close); the links stay pinned and attached.
    drop(dp);
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(delivered(&syn(41002), 41002), "IPv4 is still judged and delivered");
    let before = missing();
    let v6 = delivered(&udp6(41003), 41003);
    let nd_down = answered();
    let during = missing();
    // A daemon loads again and re-attaches: IPv6 comes back (the links now run a program whose
    // own VERSE_JUMP is filled).
    let again = ns.enter(|| {
        let mut dp = Dataplane::load(&bpf_dir, &config()).expect("load again");
        dp.attach_endpoint("ha").expect("re-attach ha");
        dp
    });
    let back = delivered(&udp6(41004), 41004);
    // A trace runner made and gone: the live IPv6 drops still count in the live counters.
    drop(again.trace_runner().expect("trace runner"));
    let ingress = || pinned_drops(&bpf_dir, DropReason::PolicyIngress);
    let refused = ingress();
    let denied = ethernet(GATEWAY_MAC, MAC_A, ETH_IPV6, &ipv6(a6, b6, 17, &udp(41005, 54, b"x")));
    assert!(!delivered(&denied, 41005), "UDP/54 is refused by B's ingress rules");
    let counted = ingress();
    let after_trace = delivered(&udp6(41006), 41006);
    drop(again);
    assert!(
        v6 && nd_down,
        "IPv6 admitted by the same rules is no longer delivered ({v6}), or neighbour discovery \
         answered ({nd_down}), while the daemon is down: program_missing {before} -> {during}"
    );
    assert!(
        back && after_trace,
        "IPv6 delivered after the reload ({back}), after a trace ({after_trace})"
    );
    assert_eq!(counted, refused + 1, "the live policy_ingress counter moved after a trace runner");
}

/// A workload's attacks on the IPv6 walk (neighbour discovery spoofed or unanswerable, spoofed
/// sources, related errors too large or not errors, flows beyond the budget the two families
/// share), each refused with the reason the contract gives (`verdict/ipv6.rs`, `dataplane_common::nd`), through BPF_PROG_TEST_RUN.
#[test]
fn ipv6_attacks_are_refused_with_their_reasons() {
    assert!(is_root(), "needs root");
    let ns = Netns::new("rv6k");
    ns.disable_ipv6();
    let dir = TempDir::new("rv6k");
    let bpffs = Bpffs::mount(&dir.path().join("bpf"));
    ns.ip(&["link", "add", "ha", "type", "veth", "peer", "name", "wa"]);
    ns.ip(&["link", "add", "hb", "type", "veth", "peer", "name", "wb"]);
    for dev in ["ha", "wa", "hb", "wb"] {
        ns.ip(&["link", "set", dev, "up"]);
    }
    let (if_a, if_b) = (ns.ifindex("ha"), ns.ifindex("hb"));
    let bpf_dir = bpffs.path().to_path_buf();
    ns.enter(|| {
        let mut dp = Dataplane::load(&bpf_dir, &config()).expect("load");
        let mut want = desired(if_a, if_b);
        // A's budget: 3 flows, IPv4 and IPv6 together.
        want.ct_owners.insert(slot_of(IP_A), OwnerBudget { serial: serial_of(IP_A), budget: 3 });
        dp.apply(&MapContents::default(), &want).expect("apply");
        let (a6, b6) = (ip6_of(IP_A), ip6_of(IP_B));
        let (ll_a, ll_b) = (nd::link_local(MAC_A), nd::link_local(MAC_B));
        let eth = |mac, p: Vec<u8>| ethernet(GATEWAY_MAC, mac, ETH_IPV6, &p);
        let v6 =
            |src, dst, proto, l4: Vec<u8>, hop| with_hop_limit(ipv6(src, dst, proto, &l4), hop);
        let icmp6 = |src, dst, ty, code, rest, body: &[u8]| icmpv6(src, dst, ty, code, rest, body);
        let mut target_b = b6.to_vec();
        target_b.extend_from_slice(&[2, 1, 0xde, 0xad, 0xbe, 0xef, 0, 1]);
        let mut mapped = [0u8; 16];
        mapped[10..12].copy_from_slice(&[0xff, 0xff]);
        mapped[12..].copy_from_slice(&IP_A);
        let mut all_nodes = [0u8; 16];
        all_nodes[0..2].copy_from_slice(&[0xff, 0x02]);
        all_nodes[15] = 1;
        let (nh, ns_frag) = ipv6_extensions(
            &[(NEXTHDR_FRAGMENT, 8)],
            58,
            &neighbour_solicit(a6, b6, b6, Some(MAC_A)),
        );
        let mut frag = ipv6(a6, b6, nh, &ns_frag);
        frag[7] = 255;
        let cases: Vec<(&str, Vec<u8>, u32, DropReason)> = vec![
            (
                "NA override for B",
                eth(
                    MAC_A,
                    v6(
                        a6,
                        all_nodes,
                        58,
                        icmp6(a6, all_nodes, 136, 0, [0xa0, 0, 0, 0], &target_b),
                        255,
                    ),
                ),
                if_a,
                DropReason::NdSpoofed,
            ),
            (
                "NA for own",
                eth(
                    MAC_A,
                    v6(a6, all_nodes, 58, icmp6(a6, all_nodes, 136, 0, [0x20, 0, 0, 0], &a6), 255),
                ),
                if_a,
                DropReason::NdUnanswered,
            ),
            (
                "RA",
                eth(
                    MAC_A,
                    v6(
                        ll_a,
                        all_nodes,
                        58,
                        icmp6(ll_a, all_nodes, 134, 0, [64, 0, 0, 0], &[0; 8]),
                        255,
                    ),
                ),
                if_a,
                DropReason::NdSpoofed,
            ),
            (
                "redirect",
                eth(
                    MAC_A,
                    v6(ll_a, ll_b, 58, icmp6(ll_a, ll_b, 137, 0, [0; 4], &[b6, a6].concat()), 255),
                ),
                if_a,
                DropReason::NdSpoofed,
            ),
            (
                "DAD",
                eth(
                    MAC_A,
                    v6(
                        [0; 16],
                        all_nodes,
                        58,
                        neighbour_solicit([0; 16], all_nodes, a6, None),
                        255,
                    ),
                ),
                if_a,
                DropReason::NdUnanswered,
            ),
            (
                "NS hop 64",
                eth(MAC_A, v6(a6, b6, 58, neighbour_solicit(a6, b6, b6, Some(MAC_A)), 64)),
                if_a,
                DropReason::NdUnanswered,
            ),
            (
                "NS from B's link-local",
                eth(MAC_A, v6(ll_b, b6, 58, neighbour_solicit(ll_b, b6, b6, Some(MAC_A)), 255)),
                if_a,
                DropReason::SpoofedIp,
            ),
            (
                "NS multicast target",
                eth(
                    MAC_A,
                    v6(
                        a6,
                        all_nodes,
                        58,
                        neighbour_solicit(a6, all_nodes, all_nodes, Some(MAC_A)),
                        255,
                    ),
                ),
                if_a,
                DropReason::NdUnanswered,
            ),
            ("NS in a fragment", eth(MAC_A, frag), if_a, DropReason::Ipv6Fragment),
            (
                "echo from link-local",
                eth(MAC_A, v6(ll_a, b6, 58, icmp6(ll_a, b6, 128, 0, [0, 1, 0, 1], b"x"), 64)),
                if_a,
                DropReason::SpoofedIp,
            ),
            (
                "IPv4-mapped source",
                eth(MAC_A, v6(mapped, b6, 17, udp(1, 53, b"x"), 64)),
                if_a,
                DropReason::SpoofedIp,
            ),
            (
                "unspecified source",
                eth(MAC_A, v6([0; 16], b6, 17, udp(1, 53, b"x"), 64)),
                if_a,
                DropReason::SpoofedIp,
            ),
            (
                "to all-nodes",
                eth(MAC_A, v6(a6, all_nodes, 17, udp(1, 53, b"x"), 64)),
                if_a,
                DropReason::NoRoute,
            ),
        ];
        let mut wrong = Vec::new();
        for (what, frame, from, reason) in &cases {
            let before = pinned_drops(&bpf_dir, *reason);
            let rc = dp.test_run(frame, *from, 1).expect("run").return_code;
            let after = pinned_drops(&bpf_dir, *reason);
            eprintln!("{what}: rc {rc}, {reason:?} {before} -> {after}");
            if rc != tc_act::SHOT || after != before + 1 {
                wrong.push(*what);
            }
        }
        // Related errors: a tracked A->B UDP/53 flow; B's destination unreachable about it.
        let flow = |sport: u16| eth(MAC_A, v6(a6, b6, 17, udp(sport, 53, b"x"), 64));
        assert_eq!(dp.test_run(&flow(7), if_a, 1).expect("run").return_code, tc_act::REDIRECT);
        let quoted = ipv6(a6, b6, 17, &udp(7, 53, b"x"));
        let err = |ty: u8, pad: usize| {
            let body = [quoted.clone(), vec![0; pad]].concat();
            eth(MAC_B, v6(b6, a6, 58, icmp6(b6, a6, ty, 0, [0; 4], &body), 64))
        };
        let small = err(1, 0);
        let rc = dp.test_run(&small, if_b, 1).expect("run").return_code;
        assert_eq!(rc, tc_act::REDIRECT, "the flow's peer's destination unreachable is related");
        // 40 + 8 + quoted(49) + pad = 1281 bytes of IPv6 packet: one over the bound.
        let big = err(1, 1281 - 40 - 8 - quoted.len());
        let echo_reply = err(129, 0);
        for (what, frame) in
            [("1281-byte error", big), ("informational about the flow", echo_reply)]
        {
            let before = pinned_drops(&bpf_dir, DropReason::PolicyEgress);
            let rc = dp.test_run(&frame, if_b, 1).expect("run").return_code;
            let after = pinned_drops(&bpf_dir, DropReason::PolicyEgress);
            eprintln!("{what}: rc {rc}, policy_egress {before} -> {after}");
            if rc != tc_act::SHOT || after != before + 1 {
                wrong.push(what);
            }
        }
        // The budget: 3 for A, one used by flow 7; IPv4 then IPv6 flows beyond it.
        let syn = tcp_frame(MAC_A, IP_A, IP_B, 40000, 80, SYN);
        assert_eq!(dp.test_run(&syn, if_a, 1).expect("run").return_code, tc_act::REDIRECT);
        assert_eq!(dp.test_run(&flow(8), if_a, 1).expect("run").return_code, tc_act::REDIRECT);
        let before = pinned_drops(&bpf_dir, DropReason::ConntrackBudgetExceeded);
        let rc = dp.test_run(&flow(9), if_a, 1).expect("run").return_code;
        let after = pinned_drops(&bpf_dir, DropReason::ConntrackBudgetExceeded);
        eprintln!(
            "4th flow: rc {rc}, budget {before} -> {after}, owners {:?}",
            dp.ct_owners()[&slot_of(IP_A)]
        );
        if rc != tc_act::SHOT || after != before + 1 {
            wrong.push("budget");
        }
        assert!(wrong.is_empty(), "not refused as the contract says: {wrong:?}");
    });
}
