//! The encapsulation between hosts, byte by byte: `from_endpoint` wrapping a packet for an
//! endpoint of another host, `from_underlay` unwrapping what another host sent, every forged
//! case dropped with its reason (S10), and the ICMP "fragmentation needed" of path MTU
//! discovery. Run through `BPF_PROG_TEST_RUN` on literal frames with maps written by hand (no
//! compiler, no daemon). Needs root (bpf, netns, mount): without it the test fails at once,
//! saying so.
//!
//! This host is 198.18.0.1 on the underlay device `u0` (MTU 1500). Endpoint A (10.0.0.2,
//! identity 1) is local; B (10.0.0.3, identity 2) is placed on host 198.18.0.2, C (10.0.0.4,
//! identity 3) on host 198.18.0.3. A may send anything; A admits TCP/80 from identity 2.

use std::path::Path;

use dataplane_common::{
    ct_state, peer, policy_prefix, Config, CtHop, DropReason, PolicyKey, PolicyValue, Route6Key,
    DIRECTION_EGRESS, DIRECTION_IPV6,
};
use tests::encap::{self, Remote, GATEWAY_MAC, HERE, HOSTS, ID_A, IP_A, MAC_A, UNDERLAY_MTU, VNI};
use tests::fleet::VXLAN_PORT;
use tests::frames::{
    checksum, ethernet, icmp, ip6_of, ipv4, ipv6, tcp, vxlan_gbp, ACK, ETH_ARP, ETH_IPV4, ETH_IPV6,
    SYN, SYN_ACK,
};
use tests::{is_root, pinned_drops, Bpffs, Family, Netns, TempDir};
use verse::compile::MapContents;
use verse::dataplane::{tc_act, Dataplane};

const MAC_B: [u8; 6] = [0x02, 0xBB, 0x00, 0x00, 0x00, 0x03];
const MAC_C: [u8; 6] = [0x02, 0xCC, 0x00, 0x00, 0x00, 0x04];
const IP_B: [u8; 4] = [10, 0, 0, 3];
const IP_C: [u8; 4] = [10, 0, 0, 4];
const ID_B: u32 = 2;
const ID_C: u32 = 3;
const HOST_B: [u8; 4] = HOSTS[0];
const HOST_C: [u8; 4] = HOSTS[1];

/// The daemon's default settings (S9 timeouts) with this test's gateway MAC and underlay.
fn config(underlay_ifindex: u32) -> Config {
    let defaults = verse::config::Config::default();
    let config = defaults.dataplane_config().expect("the default config is valid");
    Config {
        gateway_mac: GATEWAY_MAC,
        underlay_ifindex,
        underlay_ip: HERE,
        underlay_mtu: UNDERLAY_MTU,
        ..config
    }
}

// ---- literal frames ------------------------------------------------------------------------

/// An IPv4/TCP packet (no Ethernet header).
fn tcp_packet(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    ipv4(src, dst, 6, &tcp(sport, dport, flags, 0))
}

/// What a workload with `mac` sends to the gateway.
fn from_workload(mac: [u8; 6], packet: &[u8]) -> Vec<u8> {
    ethernet(GATEWAY_MAC, mac, ETH_IPV4, packet)
}

/// A frame as host `from` sends it to this host, the inner frame from the gateway's MAC.
fn wrapped(
    from: [u8; 4],
    to: [u8; 4],
    vxlan: [u8; 8],
    inner_dst: [u8; 6],
    inner: &[u8],
) -> Vec<u8> {
    encap::wrapped(from, to, vxlan, (inner_dst, GATEWAY_MAC), inner)
}

/// B's TCP packet to A, as host B wraps it.
fn from_b(sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    wrapped(
        HOST_B,
        HERE,
        vxlan_gbp(0x88, ID_B as u16, VNI),
        MAC_A,
        &tcp_packet(IP_B, IP_A, sport, dport, flags),
    )
}

// ---- the maps, by hand ---------------------------------------------------------------------

/// A on this host; B on host B and C on host C (serials are the identities); A admits TCP/80
/// from B.
fn desired(if_a: u32) -> MapContents {
    let remote = |ip, mac, identity: u32, host| Remote {
        ip,
        mac,
        identity,
        host,
        serial: u64::from(identity),
    };
    let remotes = [remote(IP_B, MAC_B, ID_B, HOST_B), remote(IP_C, MAC_C, ID_C, HOST_C)];
    encap::desired(if_a, 1000, &remotes, ID_B)
}

/// Runs `from_underlay` on `frame` and asserts it is dropped and counted as `reason`.
fn assert_underlay_drop(dp: &Dataplane, if_u: u32, frame: &[u8], reason: DropReason, what: &str) {
    let before = pinned_drops(dp.bpf_dir(), reason);
    let out = dp.test_run_underlay(frame, if_u).expect("run from_underlay");
    assert_eq!(out.return_code, tc_act::SHOT, "{what}: dropped");
    assert_eq!(
        pinned_drops(dp.bpf_dir(), reason),
        before + 1,
        "{what}: counted as {}",
        reason.label()
    );
}

#[test]
fn encapsulation_wraps_unwraps_refuses_forgeries_and_answers_too_big() {
    assert!(
        is_root(),
        "dataplane_encap needs root (bpf, netns, mount): run it with `cargo xtask test`"
    );
    let ns = Netns::new("dpe");
    // IPv6 the kernel sent from the
    // veths it brings up would count as drops of the hooks under test.
    ns.disable_ipv6();
    let dir = TempDir::new("dpe");
    let bpffs = Bpffs::mount(&dir.path().join("bpf"));
    ns.ip(&["link", "add", "ha", "type", "veth", "peer", "name", "wa"]);
    ns.ip(&["link", "add", "u0", "type", "veth", "peer", "name", "u1"]);
    for dev in ["ha", "wa", "u0", "u1"] {
        ns.ip(&["link", "set", dev, "up"]);
    }
    ns.ip(&["link", "set", "u0", "mtu", &UNDERLAY_MTU.to_string()]);
    ns.ip(&["addr", "add", "198.18.0.1/24", "dev", "u0"]);
    let if_a = ns.ifindex("ha");
    let if_u = ns.ifindex("u0");
    ns.enter(|| judge(bpffs.path(), if_a, if_u));
}

fn judge(bpf_dir: &Path, if_a: u32, if_u: u32) {
    let mut dp = Dataplane::load(bpf_dir, &config(if_u)).expect("load the dataplane");
    dp.attach_endpoint("ha").expect("attach ha");
    dp.attach_underlay("u0").expect("attach the underlay");
    dp.attach_underlay("u0").expect("attaching the underlay again keeps the link");
    assert!(dp.underlay_pin_path("u0").exists(), "the underlay link is pinned");
    assert_eq!(dp.pinned_links().expect("list"), vec!["ha".to_string()], "apart from endpoints");
    let want = desired(if_a);
    dp.apply(&MapContents::default(), &want).expect("apply");
    assert_eq!(dp.read().expect("read"), want, "hosts and universes read back as applied");

    wraps_exactly_the_documented_header(&dp, if_a);
    unwraps_and_delivers(&mut dp, if_a, if_u);
    direction_holds_across_hosts(&mut dp, if_a, if_u);
    related_errors_across_hosts_come_only_from_the_peer(&mut dp, if_a, if_u);
    refuses_forgeries(&dp, if_u);
    passes_what_is_not_ours(&dp, if_u);
    answers_too_big_with_frag_needed(&dp, if_a);
    for family in Family::BOTH {
        established_remote_flows_cache_the_underlay_hop(&mut dp, family, (if_a, if_u), &want);
    }

    dp.apply(&want, &MapContents::default()).expect("apply removal");
    assert_eq!(dp.read().expect("read"), MapContents::default(), "hosts and universes removed");
}

fn wraps_exactly_the_documented_header(dp: &Dataplane, if_a: u32) {
    let inner = tcp_packet(IP_A, IP_B, 40000, 80, SYN);
    let frame = from_workload(MAC_A, &inner);
    let out = dp.test_run(&frame, if_a, 1).expect("run from_endpoint");
    assert_eq!(out.return_code, tc_act::REDIRECT, "sent to the underlay");
    let p = &out.packet;
    assert_eq!(p.len(), frame.len() + 50, "50 bytes of encapsulation");
    assert_eq!(&p[12..14], &[0x08, 0x00], "outer Ethernet type IPv4");
    // Outer IPv4.
    let ip = &p[14..34];
    let outer_len = (inner.len() + 50) as u16;
    assert_eq!(ip[0], 0x45, "IPv4, no options");
    assert_eq!(ip[1], 0, "TOS 0");
    assert_eq!(&ip[2..4], &outer_len.to_be_bytes(), "total length");
    assert_eq!(&ip[4..6], &[0, 0], "ID 0");
    assert_eq!(&ip[6..8], &[0x40, 0x00], "DF set");
    assert_eq!(ip[8], 64, "TTL 64");
    assert_eq!(ip[9], 17, "UDP");
    assert_eq!(checksum(ip), 0, "outer header checksum valid");
    assert_eq!(&ip[12..16], &HERE, "outer source = this host");
    assert_eq!(&ip[16..20], &HOST_B, "outer destination = B's host");
    // UDP.
    let udp = &p[34..42];
    let sport = u16::from_be_bytes([udp[0], udp[1]]);
    assert!(sport >= 49152, "source port {sport} in 49152..=65535");
    assert_eq!(&udp[2..4], &VXLAN_PORT.to_be_bytes(), "VXLAN port");
    assert_eq!(&udp[4..6], &(outer_len - 20).to_be_bytes(), "UDP length");
    assert_eq!(&udp[6..8], &[0, 0], "no UDP checksum");
    // VXLAN-GBP.
    assert_eq!(&p[42..50], &vxlan_gbp(0x88, ID_A as u16, VNI), "flags G|I, A's identity, the VNI");
    assert_eq!(&p[42..50], &[0x88, 0, 0, 1, 0, 0, 7, 0]);
    // Inner frame.
    assert_eq!(&p[50..56], &MAC_B, "inner destination = B's MAC");
    assert_eq!(&p[56..62], &GATEWAY_MAC, "inner source = the gateway");
    assert_eq!(&p[62..64], &[0x08, 0x00]);
    assert_eq!(&p[64..], &inner[..], "the workload's packet, untouched");

    // The same flow always takes the same source port (ECMP keeps it on one path).
    let again = dp.test_run(&frame, if_a, 1).expect("run again");
    assert_eq!(&again.packet[34..36], &udp[0..2], "stable source port per flow");
}

fn unwraps_and_delivers(dp: &mut Dataplane, if_a: u32, if_u: u32) {
    dp.clear_conntrack().expect("clear conntrack");
    let syn = from_b(41000, 80, SYN);
    let out = dp.test_run_underlay(&syn, if_u).expect("run from_underlay");
    assert_eq!(out.return_code, tc_act::REDIRECT, "allowed by A's ingress: delivered");
    let inner = tcp_packet(IP_B, IP_A, 41000, 80, SYN);
    assert_eq!(&out.packet[0..6], &MAC_A, "to A's MAC");
    assert_eq!(&out.packet[6..12], &GATEWAY_MAC, "from the gateway");
    assert_eq!(&out.packet[12..14], &[0x08, 0x00]);
    assert_eq!(&out.packet[14..], &inner[..], "exactly the inner packet");
    let ct = dp.conntrack().expect("ct");
    assert_eq!(ct.len(), 1, "one flow created: {ct:?}");

    // A's reply goes back wrapped without any policy (S6): A's egress allows all anyway, so
    // prove it with the ingress side: B's reply to A's reply is admitted by conntrack alone.
    let reply = from_workload(MAC_A, &tcp_packet(IP_A, IP_B, 80, 41000, SYN_ACK));
    let out = dp.test_run(&reply, if_a, 1).expect("run reply");
    assert_eq!(out.return_code, tc_act::REDIRECT);
    assert_eq!(&out.packet[30..34], &HOST_B, "wrapped to B's host");
    let ct = dp.conntrack().expect("ct");
    assert_eq!(ct[0].1.state, ct_state::TCP_ESTABLISHED, "the reply established the flow");

    // Port 81 is not admitted: a new flow judged by A's ingress with B's identity.
    assert_underlay_drop(dp, if_u, &from_b(41001, 81, SYN), DropReason::PolicyIngress, "port 81");

    // S10: the identity is the one the control plane gives the inner source, never the header's
    // word. B's packet claiming C's identity is dropped, whatever A admits; so is C's packet
    // claiming B's (which A would admit on 80).
    let claims_c = wrapped(
        HOST_B,
        HERE,
        vxlan_gbp(0x88, ID_C as u16, VNI),
        MAC_A,
        &tcp_packet(IP_B, IP_A, 41002, 80, SYN),
    );
    assert_underlay_drop(dp, if_u, &claims_c, DropReason::IdentityMismatch, "B claiming C");
    let claims_b = wrapped(
        HOST_C,
        HERE,
        vxlan_gbp(0x88, ID_B as u16, VNI),
        MAC_A,
        &tcp_packet(IP_C, IP_A, 41003, 80, SYN),
    );
    assert_underlay_drop(dp, if_u, &claims_b, DropReason::IdentityMismatch, "C claiming B");
    // C with its own identity is judged by A's rules, which admit only B.
    let true_c = wrapped(
        HOST_C,
        HERE,
        vxlan_gbp(0x88, ID_C as u16, VNI),
        MAC_A,
        &tcp_packet(IP_C, IP_A, 41004, 80, SYN),
    );
    assert_underlay_drop(dp, if_u, &true_c, DropReason::PolicyIngress, "C as itself");
}

/// S7 across hosts: A's segment without SYN to B opens no flow on this host, so B's SYN back
/// arrives as a new packet and A's ingress rules refuse it; a SYN from B in the reply direction
/// of A's flow is no hit either; B's SYN-ACK is the flow's reply.
fn direction_holds_across_hosts(dp: &mut Dataplane, if_a: u32, if_u: u32) {
    dp.clear_conntrack().expect("clear conntrack");
    let dp = &*dp;
    let run = |frame: &[u8]| dp.test_run(frame, if_a, 1).expect("run from_endpoint").return_code;
    let ack = from_workload(MAC_A, &tcp_packet(IP_A, IP_B, 5555, 6000, ACK));
    assert_eq!(run(&ack), tc_act::REDIRECT, "A's egress allows it: wrapped to B");
    assert!(dp.conntrack().expect("ct").is_empty(), "no flow without SYN");
    let back = from_b(6000, 5555, SYN);
    assert_underlay_drop(dp, if_u, &back, DropReason::PolicyIngress, "B's SYN after A's ACK");
    let syn = from_workload(MAC_A, &tcp_packet(IP_A, IP_B, 5556, 6000, SYN));
    assert_eq!(run(&syn), tc_act::REDIRECT);
    let back = from_b(6000, 5556, SYN);
    assert_underlay_drop(dp, if_u, &back, DropReason::PolicyIngress, "a SYN the reply way");
    let out = dp.test_run_underlay(&from_b(6000, 5556, SYN_ACK), if_u).expect("run");
    assert_eq!(out.return_code, tc_act::REDIRECT, "the SYN-ACK is the flow's reply");
    let ct = dp.conntrack().expect("ct");
    assert_eq!(ct.len(), 1);
    assert_eq!(ct[0].1.state, ct_state::TCP_ESTABLISHED);
}

/// S6 across hosts: an ICMP error about A's flow with B, arriving wrapped, is related only from
/// B (placed on host B), only if it is an error no longer than a router's; C's error about the
/// same flow, a non-error code and an oversized error are judged by A's ingress rules (which
/// admit no ICMP).
fn related_errors_across_hosts_come_only_from_the_peer(dp: &mut Dataplane, if_a: u32, if_u: u32) {
    dp.clear_conntrack().expect("clear conntrack");
    let dp = &*dp;
    let syn = from_workload(MAC_A, &tcp_packet(IP_A, IP_B, 5600, 22, SYN));
    assert_eq!(dp.test_run(&syn, if_a, 1).expect("run").return_code, tc_act::REDIRECT);
    let quote = tcp_packet(IP_A, IP_B, 5600, 22, SYN)[..28].to_vec();
    let error = |from: [u8; 4], (ty, code): (u8, u8), total: usize| {
        let mut payload = quote.clone();
        payload.resize(payload.len().max(total.saturating_sub(28)), 0);
        let packet = ipv4(from, IP_A, 1, &icmp(ty, code, [0; 4], &payload));
        let (host, id) = if from == IP_B { (HOST_B, ID_B) } else { (HOST_C, ID_C) };
        wrapped(host, HERE, vxlan_gbp(0x88, id as u16, VNI), MAC_A, &packet)
    };
    let out = dp.test_run_underlay(&error(IP_B, (3, 4), 56), if_u).expect("run");
    assert_eq!(out.return_code, tc_act::REDIRECT, "the peer's frag-needed is related");
    let out = dp.test_run_underlay(&error(IP_B, (3, 3), 576), if_u).expect("run");
    assert_eq!(out.return_code, tc_act::REDIRECT, "576 bytes is a router's size");
    for (from, kind, total, what) in [
        (IP_C, (3, 4), 56, "a stranger on another host"),
        (IP_B, (3, 3), 577, "577 bytes"),
        (IP_B, (3, 16), 56, "no error code"),
    ] {
        assert_underlay_drop(dp, if_u, &error(from, kind, total), DropReason::PolicyIngress, what);
    }
    assert_eq!(dp.conntrack().expect("ct").len(), 1, "errors track nothing");
}

fn refuses_forgeries(dp: &Dataplane, if_u: u32) {
    let syn = tcp_packet(IP_B, IP_A, 42000, 80, SYN);
    let good_vxlan = vxlan_gbp(0x88, ID_B as u16, VNI);

    let unknown = wrapped([198, 18, 0, 9], HERE, good_vxlan, MAC_A, &syn);
    assert_underlay_drop(dp, if_u, &unknown, DropReason::UnknownHost, "unknown host");

    // C's host sending B's traffic: B is not placed there (S10).
    let misplaced = wrapped(HOST_C, HERE, good_vxlan, MAC_A, &syn);
    assert_underlay_drop(dp, if_u, &misplaced, DropReason::NotPlacedOnSender, "wrong placement");
    // A local endpoint's address as the inner source.
    let local_src = wrapped(HOST_B, HERE, good_vxlan, MAC_A, &tcp_packet(IP_A, IP_A, 1, 80, SYN));
    assert_underlay_drop(dp, if_u, &local_src, DropReason::NotPlacedOnSender, "local source");
    // No endpoint at all.
    let nobody =
        wrapped(HOST_B, HERE, good_vxlan, MAC_A, &tcp_packet([10, 0, 0, 99], IP_A, 1, 80, SYN));
    assert_underlay_drop(dp, if_u, &nobody, DropReason::NotPlacedOnSender, "unknown source");

    let wrong_vni = wrapped(HOST_B, HERE, vxlan_gbp(0x88, ID_B as u16, 8), MAC_A, &syn);
    assert_underlay_drop(dp, if_u, &wrong_vni, DropReason::UnknownUniverse, "unknown VNI");

    let not_local = wrapped(HOST_B, HERE, good_vxlan, MAC_C, &tcp_packet(IP_B, IP_C, 1, 80, SYN));
    assert_underlay_drop(dp, if_u, &not_local, DropReason::NotLocal, "destination not here");

    for flags in [0x08, 0x80, 0x89, 0x00] {
        let bad = wrapped(HOST_B, HERE, vxlan_gbp(flags, ID_B as u16, VNI), MAC_A, &syn);
        assert_underlay_drop(
            dp,
            if_u,
            &bad,
            DropReason::MalformedEncap,
            &format!("flags {flags:#x}"),
        );
    }
    // Truncated: the VXLAN header and nothing else.
    let mut truncated = wrapped(HOST_B, HERE, good_vxlan, MAC_A, &syn);
    truncated.truncate(14 + 20 + 8 + 8);
    truncated[16..18].copy_from_slice(&36u16.to_be_bytes());
    truncated[24..26].copy_from_slice(&[0, 0]);
    let c = checksum(&truncated[14..34]);
    truncated[24..26].copy_from_slice(&c.to_be_bytes());
    truncated[38..40].copy_from_slice(&16u16.to_be_bytes());
    assert_underlay_drop(dp, if_u, &truncated, DropReason::MalformedEncap, "truncated");
    // A UDP length that disagrees with the IPv4 length.
    let mut bad_len = wrapped(HOST_B, HERE, good_vxlan, MAC_A, &syn);
    bad_len[38..40].copy_from_slice(&9u16.to_be_bytes());
    assert_underlay_drop(dp, if_u, &bad_len, DropReason::MalformedEncap, "UDP length");

    // The inner frame is parsed fail-closed like a workload's.
    let mut inner_fragment = syn.clone();
    inner_fragment[6] = 0x20; // MF
    let frag = wrapped(HOST_B, HERE, good_vxlan, MAC_A, &inner_fragment);
    assert_underlay_drop(dp, if_u, &frag, DropReason::Fragment, "inner fragment");
    let short = wrapped(HOST_B, HERE, good_vxlan, MAC_A, &ipv4(IP_B, IP_A, 6, &[0, 1, 0, 80]));
    assert_underlay_drop(dp, if_u, &short, DropReason::MalformedL4, "inner TCP truncated");
}

fn passes_what_is_not_ours(dp: &Dataplane, if_u: u32) {
    let syn = tcp_packet(IP_B, IP_A, 42000, 80, SYN);
    // VXLAN for another address of the underlay, and other UDP to this host: the host's own.
    let elsewhere = wrapped(HOST_B, [198, 18, 0, 77], vxlan_gbp(0x88, 2, VNI), MAC_A, &syn);
    assert_eq!(dp.test_run_underlay(&elsewhere, if_u).expect("run").return_code, tc_act::OK);
    let mut dns = wrapped(HOST_B, HERE, vxlan_gbp(0x88, 2, VNI), MAC_A, &syn);
    dns[36..38].copy_from_slice(&53u16.to_be_bytes());
    assert_eq!(dp.test_run_underlay(&dns, if_u).expect("run").return_code, tc_act::OK);
    // TCP to this host (the API, ssh), ARP.
    let api = ethernet(
        [2, 0x55, 0, 0, 0, 1],
        [2, 0x55, 0, 0, 0, 2],
        ETH_IPV4,
        &tcp_packet(HOST_B, HERE, 1, 4789, SYN),
    );
    assert_eq!(dp.test_run_underlay(&api, if_u).expect("run").return_code, tc_act::OK);
    let arp = ethernet([0xFF; 6], [2, 0x55, 0, 0, 0, 2], ETH_ARP, &[0u8; 28]);
    assert_eq!(dp.test_run_underlay(&arp, if_u).expect("run").return_code, tc_act::OK);
}

fn answers_too_big_with_frag_needed(dp: &Dataplane, if_a: u32) {
    // 1450 bytes of IPv4 fit a 1500 underlay once wrapped; 1451 do not.
    let fits = from_workload(MAC_A, &ipv4(IP_A, IP_B, 6, &tcp(40100, 80, SYN, 1450 - 40)));
    let out = dp.test_run(&fits, if_a, 1).expect("run");
    assert_eq!(out.return_code, tc_act::REDIRECT);
    assert_eq!(out.packet.len(), 14 + 1500, "a full-size wrapped packet");

    let before = pinned_drops(dp.bpf_dir(), DropReason::FragNeeded);
    let big = ipv4(IP_A, IP_B, 6, &tcp(40101, 80, SYN, 1451 - 40));
    let out = dp.test_run(&from_workload(MAC_A, &big), if_a, 1).expect("run");
    assert_eq!(out.return_code, tc_act::REDIRECT, "the error goes back to the workload");
    assert_eq!(
        pinned_drops(dp.bpf_dir(), DropReason::FragNeeded),
        before + 1,
        "counted as frag_needed"
    );
    let p = &out.packet;
    assert_eq!(p.len(), 14 + 20 + 8 + 128, "headers and a 128-byte quote");
    assert_eq!(&p[0..6], &MAC_A, "to the sender");
    assert_eq!(&p[6..12], &GATEWAY_MAC, "from the gateway");
    assert_eq!(&p[12..14], &[0x08, 0x00]);
    let ip = &p[14..34];
    assert_eq!(ip[0], 0x45);
    assert_eq!(&ip[2..4], &156u16.to_be_bytes(), "total length");
    assert_eq!(ip[9], 1, "ICMP");
    assert_eq!(checksum(ip), 0, "IPv4 header checksum valid");
    assert_eq!(&ip[12..16], &IP_B, "from the unreachable destination");
    assert_eq!(&ip[16..20], &IP_A, "to the sender");
    let icmp = &p[34..];
    assert_eq!(&icmp[0..2], &[3, 4], "destination unreachable, fragmentation needed");
    assert_eq!(checksum(icmp), 0, "ICMP checksum valid");
    assert_eq!(&icmp[4..6], &[0, 0], "unused");
    assert_eq!(&icmp[6..8], &1450u16.to_be_bytes(), "next-hop MTU = underlay MTU - 50");
    assert_eq!(&icmp[8..], &big[..128], "the refused packet's first 128 bytes");
}

/// `want` with IPv6: A at fd00::2 (gateway fd00::1) may send anything, B's route in both
/// families.
fn with_ipv6(want: &MapContents) -> MapContents {
    let mut d = want.clone();
    let a = d.endpoints.values_mut().find(|e| e.ip == IP_A).expect("A");
    (a.ip6, a.gateway6) = (ip6_of(IP_A), ip6_of([10, 0, 0, 1]));
    for (key, route) in &want.routes {
        d.ipv6.routes.insert(Route6Key::new(key.vni, ip6_of(key.ip)), *route);
    }
    let egress = PolicyKey {
        identity: ID_A.to_be_bytes(),
        direction: DIRECTION_EGRESS + DIRECTION_IPV6,
        peer: peer::ANY.to_be_bytes(),
        proto: 0,
        port: [0; 2],
    };
    d.ipv6.policy.insert((policy_prefix::PEER, egress), PolicyValue::default());
    d.ipv6.policy_kinds = verse::compile::policy_kinds(&d.ipv6.policy);
    d
}

/// A TCP packet of `family` from the endpoint at `src` to the one at `dst` with `len` bytes
/// of payload (no Ethernet header).
fn tcp_in(
    family: Family,
    (src, dst): ([u8; 4], [u8; 4]),
    ports: (u16, u16),
    flags: u8,
    len: usize,
) -> Vec<u8> {
    let segment = tcp(ports.0, ports.1, flags, len);
    match family {
        Family::V4 => ipv4(src, dst, 6, &segment),
        Family::V6 => ipv6(ip6_of(src), ip6_of(dst), 6, &segment),
    }
}

/// A flow from A to B (on host B) established across the underlay caches its delivery with
/// ifindex 0, B's host's underlay address and the current epoch; a frame of it that fits the
/// underlay MTU once wrapped is sent, one byte more is answered with the family's error (ICMP
/// fragmentation needed, ICMPv6 packet too big, next-hop MTU 1450) from the cached path.
fn established_remote_flows_cache_the_underlay_hop(
    dp: &mut Dataplane,
    family: Family,
    (if_a, if_u): (u32, u32),
    want: &MapContents,
) {
    let with6 = with_ipv6(want);
    dp.apply(want, &with6).expect("apply IPv6");
    let (ethertype, header) = match family {
        Family::V4 => (ETH_IPV4, 20 + 20),
        Family::V6 => (ETH_IPV6, 40 + 20),
    };
    let from_a = |flags, len| {
        ethernet(
            GATEWAY_MAC,
            MAC_A,
            ethertype,
            &tcp_in(family, (IP_A, IP_B), (40200, 80), flags, len),
        )
    };
    assert_eq!(dp.test_run(&from_a(SYN, 0), if_a, 1).expect("run").return_code, tc_act::REDIRECT);
    let vxlan = vxlan_gbp(0x88, ID_B as u16, VNI);
    let syn_ack = tcp_in(family, (IP_B, IP_A), (80, 40200), SYN_ACK, 0);
    let out = dp.test_run_underlay(&wrapped(HOST_B, HERE, vxlan, MAC_A, &syn_ack), if_u);
    assert_eq!(out.expect("run").return_code, tc_act::REDIRECT, "{family:?}: B's SYN-ACK");
    assert_eq!(dp.test_run(&from_a(ACK, 0), if_a, 1).expect("run").return_code, tc_act::REDIRECT);
    let (state, hop): (u8, CtHop) = match family {
        Family::V4 => dp
            .conntrack_values()
            .expect("read")
            .into_iter()
            .find(|(k, _)| k.sport == 40200)
            .map(|(_, v)| (v.entry.state, v.original)),
        Family::V6 => dp
            .conntrack6_values()
            .expect("read")
            .into_iter()
            .find(|(k, _)| k.sport == 40200)
            .map(|(_, v)| (v.entry.state, v.original)),
    }
    .expect("the flow is tracked");
    assert_eq!(state, ct_state::TCP_ESTABLISHED, "{family:?}");
    assert_eq!((hop.ifindex, hop.underlay), (0, HOST_B), "{family:?}: to B's host");
    assert_eq!(hop.epoch, dp.epoch().expect("epoch"), "{family:?}: under the current epoch");

    // 1450 bytes of inner packet fit a 1500 underlay once wrapped; 1451 do not.
    let out = dp.test_run(&from_a(ACK, 1450 - header), if_a, 1).expect("run");
    assert_eq!(out.return_code, tc_act::REDIRECT, "{family:?}");
    assert_eq!(out.packet.len(), 14 + 1500, "{family:?}: a full-size wrapped packet");
    assert_eq!(&out.packet[30..34], &HOST_B, "{family:?}: wrapped to B's host");
    let before = pinned_drops(dp.bpf_dir(), DropReason::FragNeeded);
    let big = from_a(ACK, 1451 - header);
    let out = dp.test_run(&big, if_a, 1).expect("run");
    assert_eq!(out.return_code, tc_act::REDIRECT, "{family:?}: the error goes back to A");
    let after = pinned_drops(dp.bpf_dir(), DropReason::FragNeeded);
    assert_eq!(after, before + 1, "{family:?}: counted as frag_needed");
    let p = &out.packet;
    assert_eq!((&p[0..6], &p[6..12]), (&MAC_A[..], &GATEWAY_MAC[..]), "{family:?}");
    assert_eq!(&p[12..14], &ethertype.to_be_bytes(), "{family:?}");
    match family {
        Family::V4 => {
            assert_eq!(&p[34..36], &[3, 4], "fragmentation needed");
            assert_eq!(&p[40..42], &1450u16.to_be_bytes(), "next-hop MTU");
        }
        Family::V6 => {
            assert_eq!(p[20], 58, "ICMPv6");
            assert_eq!(&p[38..54], &ip6_of(IP_A), "to A");
            assert_eq!((p[54], p[55]), (2, 0), "packet too big");
            assert_eq!(&p[58..62], &1450u32.to_be_bytes(), "MTU");
            assert_eq!(&p[62..], &big[14..14 + dataplane_common::PTB_QUOTE], "the quote");
        }
    }
    dp.clear_conntrack().expect("clear conntrack");
    dp.apply(&with6, want).expect("remove IPv6");
}
