//! Literal packets through the model, one test per semantic it proves.
use super::*;
use crate::frames;
use crate::model::{Endpoint, Rule, SecurityGroup, Universe};
use dataplane_common::DropReason as D;

const GW: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];
const HOST: &str = "h1";
const S: u64 = 1_000_000_000;

fn mac_of(n: u8) -> [u8; 6] {
    [0x02, 0xaa, 0, 0, 0, n]
}

fn rule(id: &str, dir: Direction, proto: Protocol, ports: Option<(u16, u16)>, peer: Peer) -> Rule {
    Rule {
        id: id.into(),
        direction: dir,
        protocol: proto,
        ports,
        icmp: None,
        peer,
        description: String::new(),
    }
}
fn cidr(s: &str) -> Peer {
    Peer::Cidr(s.parse().unwrap())
}
fn group(id: &str, uni: &str, ingress: Vec<Rule>, egress: Vec<Rule>) -> SecurityGroup {
    SecurityGroup {
        id: id.into(),
        universe: uni.into(),
        name: id.into(),
        description: String::new(),
        ingress,
        egress,
    }
}
fn egress_all(id: &str) -> Rule {
    rule(id, Direction::Egress, Protocol::All, None, cidr("0.0.0.0/0"))
}

/// Two universes with the same CIDR (S3 default groups in both), plus `web` and `db` in the
/// first. Endpoint n has ifindex 10+n, MAC mac_of(n).
fn fixture() -> (State, BTreeMap<u32, String>) {
    let mut st = State::default();
    for (id, vni) in [("uni-1", 100), ("uni-2", 200)] {
        st.universes.insert(
            id.into(),
            Universe {
                id: id.into(),
                name: id.into(),
                cidrs: vec!["10.0.0.0/16".parse().unwrap()],
                vni,
                ipv6_cidrs: Vec::new(),
            },
        );
    }
    let def = |g: &str, u: &str| {
        group(
            g,
            u,
            vec![rule(
                &format!("{g}-i"),
                Direction::Ingress,
                Protocol::All,
                None,
                Peer::Group(g.into()),
            )],
            vec![egress_all(&format!("{g}-e"))],
        )
    };
    st.groups.insert("sg-def1".into(), def("sg-def1", "uni-1"));
    st.groups.insert("sg-def2".into(), def("sg-def2", "uni-2"));
    st.groups.insert(
        "sg-web".into(),
        group(
            "sg-web",
            "uni-1",
            vec![rule(
                "r-web80",
                Direction::Ingress,
                Protocol::TCP,
                Some((80, 80)),
                cidr("0.0.0.0/0"),
            )],
            vec![egress_all("r-web-e")],
        ),
    );
    st.groups.insert(
        "sg-db".into(),
        group(
            "sg-db",
            "uni-1",
            vec![rule(
                "r-db",
                Direction::Ingress,
                Protocol::TCP,
                Some((5432, 5432)),
                Peer::Group("sg-web".into()),
            )],
            vec![],
        ),
    );
    let eps: [(u8, &str, &str, &[&str]); 5] = [
        (1, "uni-1", "10.0.0.1", &["sg-def1"]),
        (2, "uni-1", "10.0.0.2", &["sg-def1"]),
        (3, "uni-1", "10.0.0.3", &["sg-web"]),
        (4, "uni-1", "10.0.0.4", &["sg-db"]),
        (5, "uni-2", "10.0.0.1", &["sg-def2"]),
    ];
    let mut local = BTreeMap::new();
    for (n, uni, ip, groups) in eps {
        let m = mac_of(n);
        let id = format!("ep-{n}");
        st.endpoints.insert(
            id.clone(),
            Endpoint {
                id: id.clone(),
                universe: uni.into(),
                host: HOST.into(),
                netns: format!("ns{n}"),
                ip: ip.parse().unwrap(),
                mac: format!(
                    "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
                    m[0], m[1], m[2], m[3], m[4], m[5]
                ),
                interface: format!("veth{n}"),
                security_groups: groups.iter().map(|g| g.to_string()).collect(),
                identity: u32::from(n),
                conntrack_budget: 1000,
                serial: u64::from(n),
                slot: u32::from(n),
                flow_logs: false,
                ipv6: None,
            },
        );
        local.insert(10 + u32::from(n), id);
    }
    (st, local)
}

// The frames these tests send, through `crate::frames` (its fixed fields) with this file's
// defaults: to the gateway, IPv4 ID 0x1234, no TCP payload, 4 bytes of UDP payload, echo
// sequence 1.
fn ipv4(src_mac: [u8; 6], src: [u8; 4], dst: [u8; 4], proto: u8, l4: &[u8]) -> Vec<u8> {
    let ip = frames::ipv4_with(src, dst, proto, 0x1234, true, l4);
    frames::ethernet(GW, src_mac, ETHERTYPE_IPV4, &ip)
}
fn tcp(sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    frames::tcp(sport, dport, flags, 0)
}
fn udp(sport: u16, dport: u16) -> Vec<u8> {
    frames::udp(sport, dport, b"hi!\n")
}
fn icmp(ty: u8, code: u8, id: u16, payload: &[u8]) -> Vec<u8> {
    frames::icmp(ty, code, frames::echo_rest(id, 1), payload)
}
const A: [u8; 4] = [10, 0, 0, 1];
const B: [u8; 4] = [10, 0, 0, 2];
const W: [u8; 4] = [10, 0, 0, 3];
const DB: [u8; 4] = [10, 0, 0, 4];
const SYN: u8 = 0x02;
const SYNACK: u8 = 0x12;
const ACKF: u8 = 0x10;

fn host<'a>(st: &'a State, local: &BTreeMap<u32, String>) -> Host<'a> {
    Host::new(st, HOST, local, GW, Timeouts::default())
}
fn delivered_to(v: &Verdict) -> Option<u32> {
    match v {
        Verdict::Deliver { ifindex, .. } => Some(*ifindex),
        _ => None,
    }
}

/// web's (ep-3) SYN to db (ep-4) on TCP 40000 -> 5432, which db admits from web members (db
/// has no egress rule at all).
fn web_to_db_syn() -> Vec<u8> {
    ipv4(mac_of(3), W, DB, IPPROTO_TCP, &tcp(40000, 5432, SYN))
}

/// [`web_to_db_syn`] through `h`, delivered and tracked in `ct`: the flow the tests of replies
/// and related errors start from. Returns the SYN.
fn track_web_to_db(h: &Host, ct: &mut Conntrack) -> Vec<u8> {
    let syn = web_to_db_syn();
    assert_eq!(delivered_to(&h.judge_and_track(ct, S, 13, &syn)), Some(14));
    syn
}

/// What an ICMP error about `frame` quotes: its IPv4 header and first 8 bytes.
fn quote_of(frame: &[u8]) -> Vec<u8> {
    frame[ETH_HLEN..ETH_HLEN + 28].to_vec()
}

#[test]
fn s3_default_group_members_talk_and_frame_is_rewritten_for_the_receiver() {
    let (st, local) = fixture();
    let h = host(&st, &local);
    let mut ct = Conntrack::default();
    let f = ipv4(mac_of(1), A, B, IPPROTO_UDP, &udp(1000, 53));
    let v = h.judge_and_track(&mut ct, S, 11, &f);
    let mut want = f.clone();
    want[0..6].copy_from_slice(&mac_of(2));
    want[6..12].copy_from_slice(&GW);
    assert_eq!(v, Verdict::Deliver { ifindex: 12, frame: want });
    assert_eq!(ct.entries.len(), 1);
}

#[test]
fn s1_rules_union_any_group_allows() {
    let (mut st, local) = fixture();
    // ep-4 in db and web: web's port 80 from anywhere plus db's 5432 from web members.
    st.endpoints.get_mut("ep-4").unwrap().security_groups = vec!["sg-db".into(), "sg-web".into()];
    let h = host(&st, &local);
    let ct = Conntrack::default();
    for (port, want) in [(80, Some(14)), (5432, Some(14)), (81, None)] {
        let f = ipv4(mac_of(3), W, DB, IPPROTO_TCP, &tcp(40000, port, SYN));
        let v = h.judge(&ct, S, 13, &f).verdict;
        match want {
            Some(_) => assert_eq!(delivered_to(&v), want, "port {port}"),
            None => assert_eq!(v, Verdict::Drop(D::PolicyIngress), "port {port}"),
        }
    }
}

#[test]
fn s1_nested_cidrs_and_group_peer_each_allow_alone() {
    let (mut st, local) = fixture();
    let g = st.groups.get_mut("sg-def1").unwrap();
    g.ingress = vec![
        rule("n8", Direction::Ingress, Protocol::TCP, Some((1, 10)), cidr("10.0.0.0/8")),
        rule("n16", Direction::Ingress, Protocol::TCP, Some((11, 20)), cidr("10.0.0.0/16")),
        rule("n24", Direction::Ingress, Protocol::TCP, Some((21, 30)), cidr("10.0.0.0/24")),
        rule("n32", Direction::Ingress, Protocol::TCP, Some((31, 40)), cidr("10.0.0.1/32")),
        rule(
            "ng",
            Direction::Ingress,
            Protocol::TCP,
            Some((41, 50)),
            Peer::Group("sg-def1".into()),
        ),
    ];
    let h = host(&st, &local);
    let ct = Conntrack::default();
    for port in 1..=50 {
        let f = ipv4(mac_of(1), A, B, IPPROTO_TCP, &tcp(999, port, SYN));
        assert_eq!(delivered_to(&h.judge(&ct, S, 11, &f).verdict), Some(12), "port {port}");
    }
    let f = ipv4(mac_of(1), A, B, IPPROTO_TCP, &tcp(999, 51, SYN));
    assert_eq!(h.judge(&ct, S, 11, &f).verdict, Verdict::Drop(D::PolicyIngress));
}

#[test]
fn s5_group_peer_follows_membership() {
    let (mut st, local) = fixture();
    let h = host(&st, &local);
    let ct = Conntrack::default();
    // ep-1 (default only) -> db:5432 needs membership of web.
    let f = ipv4(mac_of(1), A, DB, IPPROTO_TCP, &tcp(40000, 5432, SYN));
    assert_eq!(h.judge(&ct, S, 11, &f).verdict, Verdict::Drop(D::PolicyIngress));
    st.endpoints.get_mut("ep-1").unwrap().security_groups.push("sg-web".into());
    let h = host(&st, &local);
    assert_eq!(delivered_to(&h.judge(&ct, S, 11, &f).verdict), Some(14));
}

#[test]
fn s6_s7_replies_pass_whatever_the_rules_of_the_other_side() {
    let (st, local) = fixture();
    let h = host(&st, &local);
    let mut ct = Conntrack::default();
    // web -> db:5432 allowed; db has no egress rules at all.
    track_web_to_db(&h, &mut ct);
    let synack = ipv4(mac_of(4), DB, W, IPPROTO_TCP, &tcp(5432, 40000, SYNACK));
    assert_eq!(delivered_to(&h.judge_and_track(&mut ct, S, 14, &synack)), Some(13));
    let key = CtKey::new(100, W, DB, 40000, 5432, 6);
    assert_eq!(ct.entries[&key].state, ct_state::TCP_ESTABLISHED);
    // A new flow from db (other source port) is not a reply: db has no egress.
    let other = ipv4(mac_of(4), DB, W, IPPROTO_TCP, &tcp(5432, 40001, SYN));
    assert_eq!(h.judge_and_track(&mut ct, S, 14, &other), Verdict::Drop(D::PolicyEgress));
    // ICMP echo tracked by identifier: the reply with the same id passes, another id not.
    let req = ipv4(mac_of(3), W, DB, IPPROTO_ICMP, &icmp(8, 0, 77, b"ping"));
    assert_eq!(h.judge_and_track(&mut ct, S, 13, &req), Verdict::Drop(D::PolicyIngress));
    let (mut st2, local2) = (st.clone(), local.clone());
    st2.groups.get_mut("sg-db").unwrap().ingress.push(Rule {
        icmp: Some((Some(8), None)),
        ..rule("r-ping", Direction::Ingress, Protocol::ICMP, None, cidr("10.0.0.0/16"))
    });
    let h2 = host(&st2, &local2);
    assert_eq!(delivered_to(&h2.judge_and_track(&mut ct, S, 13, &req)), Some(14));
    let reply = ipv4(mac_of(4), DB, W, IPPROTO_ICMP, &icmp(0, 0, 77, b"ping"));
    assert_eq!(delivered_to(&h2.judge_and_track(&mut ct, S, 14, &reply)), Some(13));
    let stray = ipv4(mac_of(4), DB, W, IPPROTO_ICMP, &icmp(0, 0, 78, b"ping"));
    assert_eq!(h2.judge_and_track(&mut ct, S, 14, &stray), Verdict::Drop(D::PolicyEgress));
}

#[test]
fn s6_icmp_errors_about_tracked_flows_are_admitted_others_judged_by_rules() {
    let (st, local) = fixture();
    let h = host(&st, &local);
    let mut ct = Conntrack::default();
    // db answers "fragmentation needed" quoting the SYN.
    let quote = quote_of(&track_web_to_db(&h, &mut ct));
    let ptb = ipv4(mac_of(4), DB, W, IPPROTO_ICMP, &icmp(3, 4, 0, &quote));
    assert_eq!(delivered_to(&h.judge_and_track(&mut ct, S, 14, &ptb)), Some(13));
    assert_eq!(ct.entries.len(), 1, "related errors create no entry");
    // Quoting an untracked flow: judged by db's (empty) egress.
    let untracked = ipv4(mac_of(3), W, DB, IPPROTO_TCP, &tcp(40001, 5432, SYN));
    let e2 = ipv4(mac_of(4), DB, W, IPPROTO_ICMP, &icmp(3, 4, 0, &quote_of(&untracked)));
    assert_eq!(h.judge_and_track(&mut ct, S, 14, &e2), Verdict::Drop(D::PolicyEgress));
    // The quote of a tracked flow sent to someone else than its source: not related.
    let (mut st3, local3) = (st.clone(), local.clone());
    st3.groups.get_mut("sg-db").unwrap().egress.push(rule(
        "x",
        Direction::Egress,
        Protocol::TCP,
        None,
        cidr("0.0.0.0/0"),
    ));
    let h3 = host(&st3, &local3);
    let wrong = ipv4(mac_of(4), DB, A, IPPROTO_ICMP, &icmp(3, 4, 0, &quote));
    assert_eq!(h3.judge_and_track(&mut ct, S, 14, &wrong), Verdict::Drop(D::PolicyEgress));
}

#[test]
fn s8_removed_rule_keeps_tracked_flows_refuses_new_ones_until_idle_timeout() {
    let (mut st, local) = fixture();
    let mut ct = Conntrack::default();
    let syn = ipv4(mac_of(1), A, W, IPPROTO_TCP, &tcp(40000, 80, SYN));
    assert!(delivered_to(&host(&st, &local).judge_and_track(&mut ct, S, 11, &syn)).is_some());
    st.groups.get_mut("sg-web").unwrap().ingress.clear();
    let h = host(&st, &local);
    let ack = ipv4(mac_of(1), A, W, IPPROTO_TCP, &tcp(40000, 80, ACKF));
    assert!(delivered_to(&h.judge_and_track(&mut ct, 2 * S, 11, &ack)).is_some());
    let new = ipv4(mac_of(1), A, W, IPPROTO_TCP, &tcp(40001, 80, SYN));
    assert_eq!(h.judge_and_track(&mut ct, 2 * S, 11, &new), Verdict::Drop(D::PolicyIngress));
    // Still opening (no reply seen): 60 s - 1 ns idle is fine, 60 s is not.
    assert!(delivered_to(&h.judge_and_track(&mut ct, 62 * S - 1, 11, &ack)).is_some());
    assert_eq!(h.judge_and_track(&mut ct, 122 * S - 1, 11, &ack), Verdict::Drop(D::PolicyIngress));
}

#[test]
fn s9_timeouts_are_configurable() {
    let (st, local) = fixture();
    let mut t = Timeouts::default();
    t.ns[ct_state::UDP_ONE_WAY as usize] = 5;
    let mut st2 = st.clone();
    let h = Host::new(&st, HOST, &local, GW, t);
    let mut ct = Conntrack::default();
    let f = ipv4(mac_of(3), W, A, IPPROTO_UDP, &udp(1, 2));
    // web egress all; ep-1's default ingress only from default members: refused...
    assert_eq!(h.judge_and_track(&mut ct, 0, 13, &f), Verdict::Drop(D::PolicyIngress));
    // ...so use a flow that is allowed, then watch it expire after 5 ns.
    st2.groups.get_mut("sg-def1").unwrap().ingress.push(rule(
        "u",
        Direction::Ingress,
        Protocol::UDP,
        Some((2, 2)),
        cidr("10.0.0.3/32"),
    ));
    let h2 = Host::new(&st2, HOST, &local, GW, t);
    assert!(delivered_to(&h2.judge_and_track(&mut ct, 100, 13, &f)).is_some());
    let back = ipv4(mac_of(1), A, W, IPPROTO_UDP, &udp(2, 1));
    // Idle 4 ns of 5: still live.
    assert!(delivered_to(&h.judge_and_track(&mut ct, 104, 11, &back)).is_some());
    let key = CtKey::new(100, W, A, 1, 2, 17);
    assert_eq!(ct.entries[&key].state, ct_state::UDP_REPLIED);
    assert_eq!(t.of(ct_state::UDP_REPLIED), 180 * S);
}

/// Replaces endpoint `id` by a new one (new serial, same address, ifindex, MAC and slot)
/// in `groups`, as a deletion and a re-creation would.
fn recreate(st: &mut State, id: &str, groups: &[&str]) {
    let ep = st.endpoints.get_mut(id).unwrap();
    ep.serial += 100;
    ep.security_groups = groups.iter().map(|g| g.to_string()).collect();
}

#[test]
fn s7_a_recreated_endpoint_inherits_no_flow_in_either_direction() {
    let (mut st, local) = fixture();
    let mut ct = Conntrack::default();
    // web -> db:5432, answered: a tracked, established flow.
    let synack = ipv4(mac_of(4), DB, W, IPPROTO_TCP, &tcp(5432, 40000, SYNACK));
    let ack = ipv4(mac_of(3), W, DB, IPPROTO_TCP, &tcp(40000, 5432, ACKF));
    let h = host(&st, &local);
    track_web_to_db(&h, &mut ct);
    assert_eq!(delivered_to(&h.judge_and_track(&mut ct, S, 14, &synack)), Some(13));
    // One of them deleted and made again with its address in `default`: both directions are
    // judged as new flows. Web made again: db admits only web members, and has no egress rule
    // at all. Db made again: `default` admits only its members, and web's group admits TCP/80
    // only.
    for (remade, synack_drop) in [("ep-3", D::PolicyEgress), ("ep-4", D::PolicyIngress)] {
        let mut remade_st = st.clone();
        recreate(&mut remade_st, remade, &["sg-def1"]);
        let h = host(&remade_st, &local);
        let v = h.judge(&ct, 2 * S, 13, &ack).verdict;
        assert_eq!(v, Verdict::Drop(D::PolicyIngress), "{remade} made again: web's ACK");
        let v = h.judge(&ct, 2 * S, 14, &synack).verdict;
        assert_eq!(v, Verdict::Drop(synack_drop), "{remade} made again: db's SYN-ACK");
    }
    // Garbage collection removes the flow once an endpoint of it is gone.
    recreate(&mut st, "ep-4", &["sg-def1"]);
    let live = |serial: u64| st.endpoints.values().any(|e| e.serial == serial);
    assert_eq!(ct.collect(2 * S, &Timeouts::default(), &live), 1);
    assert!(ct.entries.is_empty());
}

#[test]
fn s14_new_flows_beyond_the_budget_are_dropped_for_their_owner_alone() {
    let (mut st, local) = fixture();
    st.endpoints.get_mut("ep-1").unwrap().conntrack_budget = 2;
    let h = host(&st, &local);
    let mut ct = Conntrack::default();
    let to_b = |sport| ipv4(mac_of(1), A, B, IPPROTO_UDP, &udp(sport, 53));
    assert!(delivered_to(&h.judge_and_track(&mut ct, S, 11, &to_b(1))).is_some());
    assert!(delivered_to(&h.judge_and_track(&mut ct, S, 11, &to_b(2))).is_some());
    assert_eq!(ct.used(1), 2);
    assert_eq!(h.judge(&ct, S, 11, &to_b(3)).verdict, Verdict::Drop(D::ConntrackBudgetExceeded));
    // Its tracked flows go on both ways; another endpoint's new flows are not affected.
    assert!(delivered_to(&h.judge_and_track(&mut ct, S, 11, &to_b(1))).is_some());
    let back = ipv4(mac_of(2), B, A, IPPROTO_UDP, &udp(53, 2));
    assert!(delivered_to(&h.judge_and_track(&mut ct, S, 12, &back)).is_some());
    let from_b = ipv4(mac_of(2), B, A, IPPROTO_UDP, &udp(7, 8));
    assert!(delivered_to(&h.judge_and_track(&mut ct, S, 12, &from_b)).is_some());
    assert_eq!((ct.used(1), ct.used(2)), (2, 1));
    // An expired flow of its own (one-way UDP, 30 s) is replaced at no charge, even at the
    // budget.
    let later = S + 31 * S;
    assert!(delivered_to(&h.judge_and_track(&mut ct, later, 11, &to_b(1))).is_some());
    assert_eq!(ct.used(1), 2);
    // Collecting the expired flows gives the budget back.
    let live = |_: u64| true;
    assert_eq!(ct.collect(later + 181 * S, &Timeouts::default(), &live), 3);
    assert!(delivered_to(&h.judge_and_track(&mut ct, later + 182 * S, 11, &to_b(3))).is_some());
}

#[test]
fn s14_an_entry_of_another_owner_under_the_key_leaves_a_new_flow_untracked() {
    let (mut st, local) = fixture();
    let mut ct = Conntrack::default();
    let f = ipv4(mac_of(1), A, B, IPPROTO_UDP, &udp(1, 53));
    assert!(delivered_to(&host(&st, &local).judge_and_track(&mut ct, S, 11, &f)).is_some());
    // ep-1 made again before its flows were collected: the new one's flow of the same
    // 5-tuple is delivered but not tracked, and the old entry stays for the collector.
    recreate(&mut st, "ep-1", &["sg-def1"]);
    let h = host(&st, &local);
    let out = h.judge(&ct, 2 * S, 11, &f);
    assert!(delivered_to(&out.verdict).is_some());
    assert_eq!(out.ct, None);
}

#[test]
fn universes_are_isolated_even_with_the_same_addresses() {
    let (st, local) = fixture();
    let h = host(&st, &local);
    let ct = Conntrack::default();
    // ep-5 (uni-2, 10.0.0.1) to 10.0.0.2: exists only in uni-1.
    let f = ipv4(mac_of(5), A, B, IPPROTO_UDP, &udp(1, 2));
    assert_eq!(h.judge(&ct, S, 15, &f).verdict, Verdict::Drop(D::NoRoute));
}

#[test]
fn s10_spoofed_source_mac_or_ip_is_dropped() {
    let (st, local) = fixture();
    let h = host(&st, &local);
    let ct = Conntrack::default();
    // ep-1 is at ifindex 11 with MAC mac_of(1) and address A.
    for (mac, src, dst, ifindex, reason) in [
        (mac_of(2), A, B, 11, D::SpoofedMac),
        (mac_of(1), B, A, 11, D::SpoofedIp),
        (mac_of(1), A, B, 99, D::UnknownEndpoint),
    ] {
        let f = ipv4(mac, src, dst, IPPROTO_UDP, &udp(1, 2));
        assert_eq!(h.judge(&ct, S, ifindex, &f).verdict, Verdict::Drop(reason), "{reason:?}");
    }
}

#[test]
fn arp_requests_are_answered_with_the_gateway_mac() {
    let (st, local) = fixture();
    let h = host(&st, &local);
    #[rustfmt::skip]
    let req: [u8; 42] = [
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02, 0xaa, 0, 0, 0, 1, 0x08, 0x06,
        0, 1, 0x08, 0x00, 6, 4, 0, 1,
        0x02, 0xaa, 0, 0, 0, 1, 10, 0, 0, 1,
        0, 0, 0, 0, 0, 0, 10, 0, 255, 254,
    ];
    #[rustfmt::skip]
    let want: [u8; 42] = [
        0x02, 0xaa, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 0x01, 0x08, 0x06,
        0, 1, 0x08, 0x00, 6, 4, 0, 2,
        0x02, 0, 0, 0, 0, 0x01, 10, 0, 255, 254,
        0x02, 0xaa, 0, 0, 0, 1, 10, 0, 0, 1,
    ];
    let ct = Conntrack::default();
    assert_eq!(h.judge(&ct, S, 11, &req).verdict, Verdict::ArpReply { frame: want.to_vec() });
    let mut announce = req;
    announce[38..42].copy_from_slice(&[10, 0, 0, 1]);
    assert_eq!(h.judge(&ct, S, 11, &announce).verdict, Verdict::Drop(D::ArpUnanswered));
    let mut probe = announce;
    probe[28..32].copy_from_slice(&[0, 0, 0, 0]);
    assert_eq!(h.judge(&ct, S, 11, &probe).verdict, Verdict::Drop(D::ArpUnanswered));
    assert_eq!(h.judge(&ct, S, 12, &req).verdict, Verdict::Drop(D::SpoofedMac));
    assert_eq!(h.judge(&ct, S, 99, &req).verdict, Verdict::Drop(D::UnknownEndpoint));
    let mut reply = req;
    reply[21] = 2;
    assert_eq!(h.judge(&ct, S, 11, &reply).verdict, Verdict::Drop(D::ArpUnanswered));
    assert_eq!(h.judge(&ct, S, 11, &req[..41]).verdict, Verdict::Drop(D::ArpUnanswered));
}

#[test]
fn s11_unparsable_packets_are_dropped_with_their_reason() {
    let (st, local) = fixture();
    let h = host(&st, &local);
    let ct = Conntrack::default();
    let j = |f: &[u8]| h.judge(&ct, S, 11, f).verdict;
    let good = ipv4(mac_of(1), A, B, IPPROTO_TCP, &tcp(1, 2, SYN));
    assert!(delivered_to(&j(&good)).is_some());
    assert_eq!(j(&good[..13]), Verdict::Drop(D::TruncatedEthernet));
    let mut v6 = good.clone();
    v6[12..14].copy_from_slice(&[0x86, 0xdd]);
    assert_eq!(j(&v6), Verdict::Drop(D::MalformedIpv6), "an IPv4 packet under IPv6's type");
    let mut vlan = good.clone();
    vlan[12..14].copy_from_slice(&[0x81, 0x00]);
    assert_eq!(j(&vlan), Verdict::Drop(D::UnknownEthertype));
    // Every cut inside the IPv4 header, then inside TCP.
    for cut in 14..34 {
        assert_eq!(j(&good[..cut]), Verdict::Drop(D::MalformedIpv4), "cut {cut}");
    }
    for cut in 34..54 {
        let mut f = good[..cut].to_vec();
        f[16..18].copy_from_slice(&((cut - 14) as u16).to_be_bytes());
        assert_eq!(j(&f), Verdict::Drop(D::MalformedL4), "cut {cut}");
    }
    let mut v5 = good.clone();
    v5[14] = 0x55;
    assert_eq!(j(&v5), Verdict::Drop(D::MalformedIpv4));
    let mut ihl4 = good.clone();
    ihl4[14] = 0x44;
    assert_eq!(j(&ihl4), Verdict::Drop(D::MalformedIpv4));
    let mut long = good.clone();
    long[17] += 1;
    assert_eq!(j(&long), Verdict::Drop(D::MalformedIpv4));
    let mut mf = good.clone();
    mf[20] = 0x20;
    assert_eq!(j(&mf), Verdict::Drop(D::Fragment));
    let mut off = good.clone();
    off[21] = 0x01;
    assert_eq!(j(&off), Verdict::Drop(D::Fragment));
    // TCP data offset 4: malformed; padding after the datagram is fine.
    let mut doff = good.clone();
    doff[46] = 0x40;
    assert_eq!(j(&doff), Verdict::Drop(D::MalformedL4));
    let mut padded = good.clone();
    padded.extend_from_slice(&[0; 6]);
    assert!(delivered_to(&j(&padded)).is_some());
}

#[test]
fn ipv4_options_are_skipped_to_find_the_ports() {
    let (st, local) = fixture();
    let h = host(&st, &local);
    let ct = Conntrack::default();
    // ep-1 -> web:80 with 8 bytes of options (two NOPs and an end-of-list, padded).
    let plain = ipv4(mac_of(1), A, W, IPPROTO_TCP, &tcp(1, 80, SYN));
    let mut f = plain[..34].to_vec();
    f.extend_from_slice(&[1, 1, 0, 0, 0, 0, 0, 0]);
    f.extend_from_slice(&plain[34..]);
    f[14] = 0x47;
    let total = (f.len() - 14) as u16;
    f[16..18].copy_from_slice(&total.to_be_bytes());
    assert_eq!(delivered_to(&h.judge(&ct, S, 11, &f).verdict), Some(13));
    let to81 = {
        let mut g = f.clone();
        g[14 + 28 + 3] = 81;
        g
    };
    assert_eq!(h.judge(&ct, S, 11, &to81).verdict, Verdict::Drop(D::PolicyIngress));
}

// ---- IPv6: parsed, then dropped -------------------------------------------------------

use dataplane_common::wire::ipv6::{
    EXT_MAX, NEXTHDR_AUTH as AH, NEXTHDR_DEST as DEST, NEXTHDR_FRAGMENT as FRAG,
    NEXTHDR_HOP as HOP, NEXTHDR_NONE, NEXTHDR_ROUTING as ROUTING, OPT_JUMBO,
};
use dataplane_common::wire::IPPROTO_ICMPV6;

const A6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
const B6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];

/// An IPv6 packet from `A6` to `B6`: extension headers `exts` (see
/// `frames::ipv6_extensions`), then `l4` of protocol `proto`; no Ethernet header.
fn ipv6_packet(exts: &[(u8, usize)], proto: u8, l4: &[u8]) -> Vec<u8> {
    let (next, payload) = frames::ipv6_extensions(exts, proto, l4);
    frames::ipv6(A6, B6, next, &payload)
}
/// [`ipv6_packet`] as ep-1 sends it.
fn ipv6_frame(exts: &[(u8, usize)], proto: u8, l4: &[u8]) -> Vec<u8> {
    frames::ethernet(GW, mac_of(1), ETHERTYPE_IPV6, &ipv6_packet(exts, proto, l4))
}
/// The longest chain RFC 8200's order allows (section 4.1), without fragment and ESP: as many
/// headers as the walk takes, AH with its 4-octet units (12 bytes, length byte 1).
const FULL_CHAIN: [(u8, usize); EXT_MAX] =
    [(HOP, 8), (DEST, 16), (ROUTING, 24), (AH, 12), (DEST, 8)];

#[test]
fn ipv6_is_parsed_past_its_extension_headers_then_judged() {
    let (st, local) = fixture();
    let h = host(&st, &local);
    let ct = Conntrack::default();
    let j = |f: &[u8]| h.judge(&ct, S, 11, f).verdict;
    let l4 = |f: &[u8]| {
        let ip = parse::parse_ipv6(f, ETH_HLEN).expect("a well-formed IPv6 header");
        let l4 = parse::parse_l4_v6(f, &ip).expect("a well-formed L4 header");
        (ip, l4)
    };
    let tcp = ipv6_frame(&[], IPPROTO_TCP, &tcp(40000, 443, SYN));
    let (ip, t) = l4(&tcp);
    assert_eq!(
        ip,
        parse::Ipv6 { proto: IPPROTO_TCP, l4_off: 54, end: 74, len: 60, src: A6, dst: B6 }
    );
    assert_eq!((t.ct_ports, t.dport, t.tcp_flags), ((40000, 443), 443, SYN));
    let udp = ipv6_frame(&FULL_CHAIN, IPPROTO_UDP, &udp(5353, 53));
    let (ip, u) = l4(&udp);
    assert_eq!(ip.l4_off, 14 + 40 + 8 + 16 + 24 + 12 + 8, "AH counts 4-octet units");
    assert_eq!((ip.proto, ip.end, u.ct_ports, u.dport), (IPPROTO_UDP, udp.len(), (5353, 53), 53));
    let echo = frames::icmpv6(A6, B6, 128, 0, frames::echo_rest(7, 1), b"ping");
    let ping = ipv6_frame(&[(DEST, 8)], IPPROTO_ICMPV6, &echo);
    let (ip, i) = l4(&ping);
    assert_eq!((ip.proto, ip.l4_off), (IPPROTO_ICMPV6, 62));
    assert_eq!((i.icmp_type_code, i.ct_ports, i.dport), ((128, 0), (7, 0), 0));
    // ICMP (1) is no IPv6 protocol: not looked into, however short; ESP and "no next header"
    // end the walk as protocols.
    let esp = ipv6_frame(&[(HOP, 8)], 50, &[0; 4]);
    let (ip, _) = l4(&esp);
    assert_eq!((ip.proto, ip.l4_off), (50, 62));
    let padded = {
        let mut f = ipv6_frame(&[], NEXTHDR_NONE, &[]);
        f.resize(60, 0);
        f
    };
    for f in [&tcp, &udp, &ping, &ipv6_frame(&[], IPPROTO_ICMP, &[8]), &esp, &padded] {
        assert_eq!(j(f), Verdict::Drop(D::SpoofedIp), "{f:02x?}");
    }
}

#[test]
fn s11_malformed_ipv6_and_what_the_walk_refuses_are_dropped_with_their_reason() {
    let (st, local) = fixture();
    let h = host(&st, &local);
    let ct = Conntrack::default();
    let j = |f: &[u8]| h.judge(&ct, S, 11, f).verdict;
    let good = ipv6_frame(&[], IPPROTO_TCP, &tcp(1, 2, SYN));
    assert_eq!(j(&good), Verdict::Drop(D::SpoofedIp));
    // Every cut inside the fixed header; then the payload length past the frame by one byte.
    for cut in 14..54 {
        assert_eq!(j(&good[..cut]), Verdict::Drop(D::MalformedIpv6), "cut {cut}");
    }
    let mut long = good.clone();
    long[19] += 1;
    assert_eq!(j(&long), Verdict::Drop(D::MalformedIpv6), "payload length one past the frame");
    long.push(0);
    assert_eq!(j(&long), Verdict::Drop(D::SpoofedIp), "the byte is there now");
    let mut v4 = good.clone();
    v4[14] = 0x40;
    assert_eq!(j(&v4), Verdict::Drop(D::MalformedIpv6), "version 4 in an IPv6 frame");
    // The L4 header within the payload, not the frame: TCP cut at 19 bytes, ICMPv6 at 7.
    for (proto, l4) in [(IPPROTO_TCP, &tcp(1, 2, SYN)[..19]), (IPPROTO_ICMPV6, &[128; 7][..])] {
        let mut f = ipv6_frame(&[(DEST, 8)], proto, l4);
        assert_eq!(j(&f), Verdict::Drop(D::MalformedL4), "short protocol {proto}");
        f.resize(f.len() + 20, 0);
        assert_eq!(j(&f), Verdict::Drop(D::MalformedL4), "padding is no header");
    }

    let udp = udp(1, 53);
    let table: Vec<(&str, Vec<u8>, D)> = vec![
        ("the whole chain, then UDP", ipv6_frame(&FULL_CHAIN, IPPROTO_UDP, &udp), D::SpoofedIp),
        (
            "one header past the bound",
            ipv6_frame(&[&FULL_CHAIN[..], &[(DEST, 8)]].concat(), IPPROTO_UDP, &udp),
            D::Ipv6TooManyHeaders,
        ),
        (
            "a fragment header past the bound",
            ipv6_frame(&[&FULL_CHAIN[..], &[(FRAG, 8)]].concat(), IPPROTO_UDP, &udp),
            D::Ipv6Fragment,
        ),
        ("a fragment header first", ipv6_frame(&[(FRAG, 8)], IPPROTO_UDP, &udp), D::Ipv6Fragment),
        (
            "an atomic fragment behind hop-by-hop",
            ipv6_frame(&[(HOP, 8), (FRAG, 8)], IPPROTO_UDP, &udp),
            D::Ipv6Fragment,
        ),
        (
            "hop-by-hop second",
            ipv6_frame(&[(DEST, 8), (HOP, 8)], IPPROTO_UDP, &udp),
            D::MalformedIpv6,
        ),
        (
            "hop-by-hop past the bound (not first: malformed, not too many)",
            ipv6_frame(&[&FULL_CHAIN[..], &[(HOP, 8)]].concat(), IPPROTO_UDP, &udp),
            D::MalformedIpv6,
        ),
        ("AH of 12 bytes", ipv6_frame(&[(AH, 12)], IPPROTO_UDP, &udp), D::SpoofedIp),
        ("routing of 2 KiB", ipv6_frame(&[(ROUTING, 2048)], IPPROTO_UDP, &udp), D::SpoofedIp),
    ];
    for (what, f, want) in &table {
        assert_eq!(j(f), Verdict::Drop(*want), "{what}");
    }
    // An extension header cut by the payload length (the frame still has the bytes, as
    // padding): at every length short of the header.
    for (ext, len) in [(HOP, 8), (ROUTING, 24), (AH, 12), (DEST, 16)] {
        let whole = ipv6_frame(&[(ext, len)], IPPROTO_UDP, &udp);
        for short in 0..len {
            let mut f = whole.clone();
            f[18..20].copy_from_slice(&(short as u16).to_be_bytes());
            assert_eq!(j(&f), Verdict::Drop(D::MalformedIpv6), "header {ext} of {len} in {short}");
        }
    }
    // AH's 4-octet units: read as 8-octet units, a 12-byte AH (length byte 1) would run 16
    // bytes, past a payload that ends right after it.
    let ah = ipv6_frame(&[(AH, 12)], NEXTHDR_NONE, &[]);
    assert_eq!(j(&ah), Verdict::Drop(D::SpoofedIp));
    assert_eq!(parse::parse_ipv6(&ah, ETH_HLEN).map(|ip| ip.l4_off), Ok(14 + 40 + 12));
    let mut ah16 = ah.clone();
    ah16[55] = 2; // 16 bytes: past the payload
    assert_eq!(j(&ah16), Verdict::Drop(D::MalformedIpv6));

    // A jumbogram: payload length 0, hop-by-hop whose first option is Jumbo Payload (RFC 2675).
    let mut jumbo = ipv6_frame(&[(HOP, 8)], IPPROTO_UDP, &udp);
    jumbo[18..20].fill(0);
    jumbo[56..62].copy_from_slice(&[OPT_JUMBO, 4, 0, 1, 0, 0]);
    assert_eq!(j(&jumbo), Verdict::Drop(D::Ipv6Jumbogram));
    let mut no_option = jumbo.clone();
    no_option[56] = 1; // PadN first: a header past an empty payload
    assert_eq!(j(&no_option), Verdict::Drop(D::MalformedIpv6));
    let mut not_hop = jumbo.clone();
    not_hop[20] = DEST;
    assert_eq!(
        j(&not_hop),
        Verdict::Drop(D::MalformedIpv6),
        "the option only counts in hop-by-hop"
    );
    let mut with_length = jumbo.clone();
    with_length[18..20].copy_from_slice(&16u16.to_be_bytes());
    assert_eq!(j(&with_length), Verdict::Drop(D::SpoofedIp), "a payload length: no jumbogram");

    // Before the ethertype: a stranger or a forged MAC is refused as for IPv4.
    assert_eq!(h.judge(&ct, S, 99, &jumbo).verdict, Verdict::Drop(D::UnknownEndpoint));
    let mut forged = jumbo.clone();
    forged[11] = 9;
    assert_eq!(j(&forged), Verdict::Drop(D::SpoofedMac));
}

// ---- Direction (S7) -------------------------------------------------------------------

fn ct_key(src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16, proto: u8) -> CtKey {
    CtKey::new(100, src, dst, sport, dport, proto)
}

#[test]
fn s7_roles_of_every_tcp_flag_combination_and_icmp_type() {
    for flags in 0..=255u8 {
        let opens = flags & 0x02 != 0 && flags & (0x10 | 0x04 | 0x01) == 0;
        let want = if opens { Role::Opens } else { Role::Continues };
        assert_eq!(role(IPPROTO_TCP, flags, 0), want, "flags {flags:#04x}");
    }
    for ty in 0..=255u8 {
        let want = match ty {
            8 => Role::Opens,
            0 => Role::Answers,
            _ => Role::Untracked,
        };
        assert_eq!(role(IPPROTO_ICMP, 0, ty), want, "ICMP type {ty}");
    }
    assert_eq!(role(IPPROTO_UDP, 0xff, 0xff), Role::Any);
    assert_eq!(role(47, 0, 0), Role::Any);
    assert!(creates(Role::Opens) && creates(Role::Any));
    assert!(!creates(Role::Continues) && !creates(Role::Answers) && !creates(Role::Untracked));
}

#[test]
fn s7_only_a_syn_creates_a_tcp_flow_and_matches_only_its_own_way() {
    let (st, local) = fixture();
    let h = host(&st, &local);
    let mut ct = Conntrack::default();
    // web (egress all) may send db anything on 5432 (db admits it from web members); db may
    // open nothing (no egress rule).
    let back = |sport: u16| ipv4(mac_of(4), DB, W, IPPROTO_TCP, &tcp(5432, sport, SYN));
    // ACK, FIN+ACK, RST, RST+ACK, PSH+ACK, SYN+FIN, SYN+RST, SYN+ACK, nothing at all.
    for (i, flags) in [0x10, 0x11, 0x04, 0x14, 0x18, 0x03, 0x06, 0x12, 0x00].iter().enumerate() {
        let port = 41000 + i as u16;
        let pkt = ipv4(mac_of(3), W, DB, IPPROTO_TCP, &tcp(port, 5432, *flags));
        let out = h.judge(&ct, S, 13, &pkt);
        assert_eq!(delivered_to(&out.verdict), Some(14), "flags {flags:#x}: the rules allow");
        assert_eq!(out.ct, None, "flags {flags:#x}: no flow without a SYN (tcp_loose = 0)");
        // So db's SYN back on the same ports is a new packet, which db may not send.
        assert_eq!(h.judge_and_track(&mut ct, S, 14, &back(port)), Verdict::Drop(D::PolicyEgress));
    }
    assert!(ct.entries.is_empty());

    // A SYN creates the flow; db's SYN in its reply direction is no hit.
    let syn = ipv4(mac_of(3), W, DB, IPPROTO_TCP, &tcp(42000, 5432, SYN));
    assert_eq!(delivered_to(&h.judge_and_track(&mut ct, S, 13, &syn)), Some(14));
    let key = ct_key(W, DB, 42000, 5432, IPPROTO_TCP);
    assert_eq!(ct.entries[&key].state, ct_state::TCP_OPENING);
    assert_eq!(h.judge_and_track(&mut ct, S, 14, &back(42000)), Verdict::Drop(D::PolicyEgress));
    // A bare ACK in reply is the flow's (delivered) but does not establish it; a SYN-ACK does.
    let ack = ipv4(mac_of(4), DB, W, IPPROTO_TCP, &tcp(5432, 42000, ACKF));
    assert_eq!(delivered_to(&h.judge_and_track(&mut ct, S, 14, &ack)), Some(13));
    assert_eq!(ct.entries[&key].state, ct_state::TCP_OPENING);
    let synack = ipv4(mac_of(4), DB, W, IPPROTO_TCP, &tcp(5432, 42000, SYNACK));
    assert_eq!(delivered_to(&h.judge_and_track(&mut ct, S, 14, &synack)), Some(13));
    assert_eq!(ct.entries[&key].state, ct_state::TCP_ESTABLISHED);
    // Closing: db's SYN in the reply direction still does not reopen it...
    let fin = ipv4(mac_of(3), W, DB, IPPROTO_TCP, &tcp(42000, 5432, 0x11));
    assert_eq!(delivered_to(&h.judge_and_track(&mut ct, S, 13, &fin)), Some(14));
    assert_eq!(ct.entries[&key].state, ct_state::TCP_CLOSING);
    assert_eq!(h.judge_and_track(&mut ct, S, 14, &back(42000)), Verdict::Drop(D::PolicyEgress));
    assert_eq!(ct.entries[&key].state, ct_state::TCP_CLOSING);
    // ...web's SYN in the original direction does (the 5-tuple reused).
    assert_eq!(delivered_to(&h.judge_and_track(&mut ct, 2 * S, 13, &syn)), Some(14));
    assert_eq!(ct.entries[&key].state, ct_state::TCP_OPENING);
    assert_eq!(ct.entries.len(), 1);
}

#[test]
fn s7_a_reply_direction_syn_the_rules_allow_opens_a_flow_of_its_own() {
    let (st, local) = fixture();
    let h = host(&st, &local);
    let mut ct = Conntrack::default();
    // ep-1 and ep-2 (default) admit each other.
    let ab = ipv4(mac_of(1), A, B, IPPROTO_TCP, &tcp(1000, 2000, SYN));
    assert_eq!(delivered_to(&h.judge_and_track(&mut ct, S, 11, &ab)), Some(12));
    let ba = ipv4(mac_of(2), B, A, IPPROTO_TCP, &tcp(2000, 1000, SYN));
    assert_eq!(delivered_to(&h.judge_and_track(&mut ct, S, 12, &ba)), Some(11));
    assert_eq!(ct.entries[&ct_key(A, B, 1000, 2000, 6)].state, ct_state::TCP_OPENING);
    assert_eq!(ct.entries[&ct_key(B, A, 2000, 1000, 6)].state, ct_state::TCP_OPENING);
}

#[test]
fn s7_echo_requests_open_flows_echo_replies_only_answer_other_icmp_is_untracked() {
    let (mut st, local) = fixture();
    st.groups.get_mut("sg-db").unwrap().ingress.push(rule(
        "icmp",
        Direction::Ingress,
        Protocol::ICMP,
        None,
        cidr("0.0.0.0/0"),
    ));
    let h = host(&st, &local);
    let mut ct = Conntrack::default();
    // web (egress all) may send db any ICMP; db may send nothing of its own.
    let web = |ty: u8, id: u16| ipv4(mac_of(3), W, DB, IPPROTO_ICMP, &icmp(ty, 0, id, b"x"));
    let db = |ty: u8, id: u16| ipv4(mac_of(4), DB, W, IPPROTO_ICMP, &icmp(ty, 0, id, b"x"));
    // An echo reply opens nothing: db's echo request with that id is its own, refused.
    let out = h.judge(&ct, S, 13, &web(0, 7));
    assert_eq!((delivered_to(&out.verdict), out.ct), (Some(14), None));
    assert_eq!(h.judge_and_track(&mut ct, S, 14, &db(8, 7)), Verdict::Drop(D::PolicyEgress));
    // An echo request opens a flow its reply matches, and a request back does not.
    assert!(delivered_to(&h.judge_and_track(&mut ct, S, 13, &web(8, 9))).is_some());
    assert_eq!(delivered_to(&h.judge_and_track(&mut ct, S, 14, &db(0, 9))), Some(13));
    assert_eq!(h.judge_and_track(&mut ct, S, 14, &db(8, 9)), Verdict::Drop(D::PolicyEgress));
    // Other ICMP (a timestamp request) is delivered by the rules and tracked never: its
    // reply is db's own traffic. Not even an echo flow of identifier 0, whose key is
    // (0, 0) like theirs, admits them.
    let out = h.judge(&ct, S, 13, &web(13, 0));
    assert_eq!((delivered_to(&out.verdict), out.ct), (Some(14), None));
    assert!(delivered_to(&h.judge_and_track(&mut ct, S, 13, &web(8, 0))).is_some());
    assert_eq!(h.judge_and_track(&mut ct, S, 14, &db(14, 0)), Verdict::Drop(D::PolicyEgress));
    assert_eq!(delivered_to(&h.judge_and_track(&mut ct, S, 14, &db(0, 0))), Some(13));
    assert_eq!(ct.entries.len(), 2, "the two echo flows");
}

// ---- Related ICMP errors (S6) -----------------------------------------------------------

/// An ICMP error of `ty`/`code` quoting `quote`, zero-padded to `total` bytes of IPv4.
fn error_frame(
    mac: [u8; 6],
    src: [u8; 4],
    dst: [u8; 4],
    (ty, code): (u8, u8),
    quote: &[u8],
    total: usize,
) -> Vec<u8> {
    let mut payload = quote.to_vec();
    payload.resize(payload.len().max(total.saturating_sub(28)), 0);
    ipv4(mac, src, dst, IPPROTO_ICMP, &icmp(ty, code, 0, &payload))
}

#[test]
fn s6_related_errors_come_from_the_peer_are_errors_and_no_longer_than_a_routers() {
    let (st, local) = fixture();
    let h = host(&st, &local);
    let mut ct = Conntrack::default();
    // web -> db:5432 tracked. db has no egress rule, web admits only TCP/80: whatever is
    // not related is refused, by db's egress or web's ingress.
    let quote = quote_of(&track_web_to_db(&h, &mut ct));
    let from_db = |kind, total| error_frame(mac_of(4), DB, W, kind, &quote, total);
    let related = h.judge(&ct, S, 14, &from_db((3, 3), 56));
    assert_eq!(delivered_to(&related.verdict), Some(13), "the peer's port unreachable");
    assert_eq!(related.ct, None, "a related error touches no flow");

    // Every type and code: only the errors are related.
    for ty in 0..=255u8 {
        for code in 0..=20u8 {
            let want = is_error(IPPROTO_ICMP, ty, code);
            assert_eq!(
                want,
                matches!((ty, code), (3, 0..=15) | (11, 0..=1) | (12, 0..=2)),
                "{ty}/{code}"
            );
            let v = h.judge(&ct, S, 14, &from_db((ty, code), 56)).verdict;
            if want {
                assert_eq!(delivered_to(&v), Some(13), "type {ty} code {code} is related");
            } else {
                assert_eq!(v, Verdict::Drop(D::PolicyEgress), "type {ty} code {code}: judged");
            }
        }
    }
    // No longer than a router's error.
    assert_eq!(delivered_to(&h.judge(&ct, S, 14, &from_db((3, 4), 576)).verdict), Some(13));
    let long = from_db((3, 4), 577);
    assert_eq!(h.judge(&ct, S, 14, &long).verdict, Verdict::Drop(D::PolicyEgress));
    let long = from_db((11, 0), 1256);
    assert_eq!(h.judge(&ct, S, 14, &long).verdict, Verdict::Drop(D::PolicyEgress));

    // A stranger (ep-1: egress all) quoting web's flow with db: judged by web's ingress.
    for kind in [(3, 3), (3, 4), (11, 0), (12, 0)] {
        let stranger = error_frame(mac_of(1), A, W, kind, &quote, 56);
        assert_eq!(h.judge(&ct, S, 11, &stranger).verdict, Verdict::Drop(D::PolicyIngress));
    }
    // The peer quoting the flow with the addresses swapped (as if web had sent it the
    // error's way): not the packet web sent, not related.
    let mut swapped = quote.clone();
    swapped[12..16].copy_from_slice(&DB);
    swapped[16..20].copy_from_slice(&W);
    let v = h.judge(&ct, S, 14, &error_frame(mac_of(4), DB, W, (3, 3), &swapped, 56)).verdict;
    assert_eq!(v, Verdict::Drop(D::PolicyEgress));
    // The flow's reply direction: db's SYN-ACK quoted by web, sent back to db, is related.
    let synack = ipv4(mac_of(4), DB, W, IPPROTO_TCP, &tcp(5432, 40000, SYNACK));
    let err = error_frame(mac_of(3), W, DB, (3, 3), &quote_of(&synack), 56);
    assert_eq!(delivered_to(&h.judge(&ct, S, 13, &err).verdict), Some(14));
    assert_eq!(ct.entries.len(), 1);
}

// ---- Two hosts: wrap, frag-needed, unwrap ------------------------------------------------

const HERE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 1);
const THERE: Ipv4Addr = Ipv4Addr::new(198, 18, 0, 2);
const R: [u8; 4] = [10, 0, 0, 6];
const UNDERLAY: Underlay = Underlay { ip: HERE, mtu: 1500 };

/// The fixture on host h1 (198.18.0.1), plus ep-6 (10.0.0.6, sg-web, identity 6) placed on
/// host h2 (198.18.0.2).
fn fleet_fixture() -> (State, BTreeMap<u32, String>) {
    let (mut st, local) = fixture();
    for (name, ip) in [(HOST, HERE), ("h2", THERE)] {
        st.hosts.insert(name.into(), model::HostRecord::at(name, Some(ip)));
    }
    let mut remote = st.endpoints["ep-3"].clone();
    remote.id = "ep-6".into();
    remote.host = "h2".into();
    remote.ip = Ipv4Addr::from(R);
    remote.mac = "02:aa:00:00:00:06".into();
    remote.identity = 6;
    st.endpoints.insert("ep-6".into(), remote);
    (st, local)
}

/// What host `from` sends this host for the inner IPv4 packet `inner` (no Ethernet header):
/// outer Ethernet/IPv4/UDP 4789, VXLAN-GBP with `group` and `vni`, inner Ethernet to `mac`.
fn wrapped(from: Ipv4Addr, group: u16, vni: u32, mac: [u8; 6], inner: &[u8]) -> Vec<u8> {
    let mut f = vec![0x02, 0x55, 0, 0, 0, 1, 0x02, 0x55, 0, 0, 0, 2, 0x08, 0x00];
    let total = (20 + 8 + 8 + 14 + inner.len()) as u16;
    f.extend_from_slice(&[0x45, 0]);
    f.extend_from_slice(&total.to_be_bytes());
    f.extend_from_slice(&[0, 0, 0x40, 0, 64, IPPROTO_UDP, 0, 0]);
    f.extend_from_slice(&from.octets());
    f.extend_from_slice(&HERE.octets());
    f.extend_from_slice(&[0xc0, 0x01, 0x12, 0xb5]);
    f.extend_from_slice(&(total - 20).to_be_bytes());
    f.extend_from_slice(&[0, 0, 0x88, 0]);
    f.extend_from_slice(&group.to_be_bytes());
    f.extend_from_slice(&vni.to_be_bytes()[1..]);
    f.push(0);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&GW);
    f.extend_from_slice(&[0x08, 0x00]);
    f.extend_from_slice(inner);
    f
}

#[test]
fn remote_receivers_are_wrapped_or_answered_frag_needed_and_need_an_underlay() {
    let (st, local) = fleet_fixture();
    let no_underlay = host(&st, &local);
    let h = host(&st, &local).with_underlay(UNDERLAY);
    let mut ct = Conntrack::default();
    // ep-1 (egress all) to ep-6 on h2: the receiver's rules are h2's business.
    let syn = ipv4(mac_of(1), A, R, IPPROTO_TCP, &tcp(40000, 22, SYN));
    // As the kernel counts it (`no_underlay`), not as a missing route.
    assert_eq!(no_underlay.judge(&ct, S, 11, &syn).verdict, Verdict::Drop(D::NoUnderlay));
    let out = h.judge(&ct, S, 11, &syn);
    let Verdict::Wrap { frame } = &out.verdict else { panic!("{:?}", out.verdict) };
    assert_eq!(frame.len(), syn.len() + 50);
    assert_eq!(&frame[..14], &syn[..14], "the outer Ethernet header is the packet's own");
    assert_eq!(&frame[14..16], &[0x45, 0]);
    assert_eq!(&frame[16..18], &((syn.len() + 36) as u16).to_be_bytes());
    assert_eq!(&frame[20..24], &[0x40, 0, 64, 17], "DF, TTL 64, UDP");
    assert_eq!(checksum(&frame[14..34]), 0, "outer header checksum");
    assert_eq!(&frame[26..34], &[198, 18, 0, 1, 198, 18, 0, 2]);
    assert_eq!(&frame[34..36], &[0, 0], "the source port is left to the comparison");
    assert_eq!(&frame[36..42], &[0x12, 0xb5, 0, (syn.len() + 16) as u8, 0, 0]);
    assert_eq!(&frame[42..50], &[0x88, 0, 0, 1, 0, 0, 100, 0], "ep-1's identity, uni-1");
    assert_eq!(&frame[50..56], &mac_of(6));
    assert_eq!(&frame[56..62], &GW);
    assert_eq!(&frame[62..], &syn[12..], "type, then the packet untouched");
    ct.apply(&out.ct.expect("the flow is tracked"));
    // 1451 bytes of IPv4 do not fit a 1500-byte underlay once wrapped: frag-needed back.
    let big = ipv4(mac_of(1), A, R, IPPROTO_TCP, &[tcp(40001, 22, SYN), vec![7; 1411]].concat());
    let out = h.judge(&ct, S, 11, &big);
    assert_eq!(out.ct, None, "a refused packet tracks nothing");
    let Verdict::FragNeeded { frame } = &out.verdict else { panic!("{:?}", out.verdict) };
    assert_eq!(frame.len(), 14 + 20 + 8 + 128);
    assert_eq!(&frame[..12], &[mac_of(1), GW].concat());
    assert_eq!(&frame[26..34], &[10, 0, 0, 6, 10, 0, 0, 1], "from the destination");
    assert_eq!(checksum(&frame[14..34]), 0);
    assert_eq!(&frame[34..36], &[3, 4]);
    assert_eq!(checksum(&frame[34..]), 0);
    assert_eq!(&frame[40..42], &1450u16.to_be_bytes());
    assert_eq!(&frame[42..], &big[14..142]);
    // Too big only by its padding: a 40-byte datagram cannot be quoted (128 bytes), so no
    // error is built; the kernel counts it as frag_needed_unsent too.
    let mut padded = ipv4(mac_of(1), A, R, IPPROTO_TCP, &tcp(40002, 22, SYN));
    padded.resize(1600, 0);
    let out = h.judge(&ct, S, 11, &padded);
    assert_eq!((out.verdict, out.ct), (Verdict::Drop(D::FragNeededUnsent), None));
    let fits = ipv4(mac_of(1), A, R, IPPROTO_TCP, &[tcp(40001, 22, SYN), vec![7; 1410]].concat());
    assert!(matches!(h.judge(&ct, S, 11, &fits).verdict, Verdict::Wrap { .. }));
    // A reply from ep-6 through h2 is unwrapped and delivered by conntrack.
    let reply = ipv4(mac_of(6), R, A, IPPROTO_TCP, &tcp(22, 40000, SYNACK));
    let w = wrapped(THERE, 6, 100, mac_of(1), &reply[14..]);
    let out = h.judge_underlay(&ct, S, &w);
    let mut want = reply.clone();
    want[..12].copy_from_slice(&[mac_of(1), GW].concat());
    assert_eq!(out.verdict, Verdict::Deliver { ifindex: 11, frame: want });
    assert_eq!(out.ct.map(|u| u.entry.state), Some(ct_state::TCP_ESTABLISHED));
}

#[test]
fn underlay_frames_are_checked_in_order_then_judged_by_the_receivers_rules() {
    let (st, local) = fleet_fixture();
    let h = host(&st, &local).with_underlay(UNDERLAY);
    let ct = Conntrack::default();
    let j = |f: &[u8]| h.judge_underlay(&ct, S, f).verdict;
    let to_web = ipv4(mac_of(6), R, W, IPPROTO_TCP, &tcp(1, 80, SYN));
    let good = wrapped(THERE, 6, 100, mac_of(3), &to_web[14..]);
    let mut want = to_web.clone();
    want[..12].copy_from_slice(&[mac_of(3), GW].concat());
    assert_eq!(j(&good), Verdict::Deliver { ifindex: 13, frame: want });
    // Not Verse's: passed.
    assert_eq!(host(&st, &local).judge_underlay(&ct, S, &good).verdict, Verdict::Pass);
    let mut other_port = good.clone();
    other_port[36..38].copy_from_slice(&53u16.to_be_bytes());
    assert_eq!(j(&other_port), Verdict::Pass);
    let mut elsewhere = good.clone();
    elsewhere[33] = 9;
    assert_eq!(j(&elsewhere), Verdict::Pass);
    assert_eq!(j(&good[..33]), Verdict::Pass);
    // Fail closed in order.
    let mut mf = good.clone();
    mf[20] = 0x20;
    assert_eq!(j(&mf), Verdict::Drop(D::MalformedEncap));
    let unknown = wrapped(Ipv4Addr::new(198, 18, 0, 9), 6, 100, mac_of(3), &to_web[14..]);
    assert_eq!(j(&unknown), Verdict::Drop(D::UnknownHost));
    let mut flags = good.clone();
    flags[42] = 0x08;
    assert_eq!(j(&flags), Verdict::Drop(D::MalformedEncap));
    let bad_vni = wrapped(THERE, 6, 300, mac_of(3), &to_web[14..]);
    assert_eq!(j(&bad_vni), Verdict::Drop(D::UnknownUniverse));
    // Inner IPv6: parsed as a workload's.
    let mut v6 = good.clone();
    v6[62..64].copy_from_slice(&[0x86, 0xdd]);
    assert_eq!(j(&v6), Verdict::Drop(D::MalformedIpv6), "an IPv4 packet under an IPv6 type");
    let wrapped6 = |exts: &[(u8, usize)]| {
        let inner = ipv6_packet(exts, IPPROTO_TCP, &tcp(1, 80, SYN));
        let mut w = wrapped(THERE, 6, 100, mac_of(3), &inner);
        w[62..64].copy_from_slice(&ETHERTYPE_IPV6.to_be_bytes());
        w
    };
    // A well-formed one is judged (`ipv6.rs`): fd00::1 is no endpoint placed on h2.
    assert_eq!(j(&wrapped6(&FULL_CHAIN)), Verdict::Drop(D::NotPlacedOnSender));
    let beyond = [&FULL_CHAIN[..], &[(DEST, 8)]].concat();
    assert_eq!(j(&wrapped6(&beyond)), Verdict::Drop(D::Ipv6TooManyHeaders));
    assert_eq!(j(&wrapped6(&[(FRAG, 8)])), Verdict::Drop(D::Ipv6Fragment));
    // The inner payload length one past the frame (the outer lengths consistent with it).
    let mut short = wrapped6(&[]);
    short.truncate(short.len() - 1);
    let total = u16::from_be_bytes([short[16], short[17]]) - 1;
    short[16..18].copy_from_slice(&total.to_be_bytes());
    short[38..40].copy_from_slice(&(total - 20).to_be_bytes());
    assert_eq!(j(&short), Verdict::Drop(D::MalformedIpv6));
    let mut jumbo = wrapped6(&[(HOP, 8)]);
    jumbo[68..70].fill(0);
    jumbo[106..108].copy_from_slice(&[OPT_JUMBO, 4]);
    assert_eq!(j(&jumbo), Verdict::Drop(D::Ipv6Jumbogram));
    let local_src = ipv4(mac_of(1), A, W, IPPROTO_TCP, &tcp(1, 80, SYN));
    let forged = wrapped(THERE, 1, 100, mac_of(3), &local_src[14..]);
    assert_eq!(j(&forged), Verdict::Drop(D::NotPlacedOnSender));
    let to_nobody = ipv4(mac_of(6), R, [10, 0, 0, 99], IPPROTO_TCP, &tcp(1, 80, SYN));
    let nobody = wrapped(THERE, 6, 100, mac_of(3), &to_nobody[14..]);
    assert_eq!(j(&nobody), Verdict::Drop(D::NotLocal));
    // ep-6 (sg-web) is no member of default: ep-1 does not admit it.
    let to_a = ipv4(mac_of(6), R, A, IPPROTO_TCP, &tcp(1, 80, SYN));
    let denied = wrapped(THERE, 6, 100, mac_of(1), &to_a[14..]);
    assert_eq!(j(&denied), Verdict::Drop(D::PolicyIngress));
    // S10: the header's identity must be the one the control plane gives ep-6 (6). Claiming
    // ep-1's (1, a member of default, which ep-1 admits) is dropped, as is any other.
    for claimed in [1u16, 5, 0, 0xffff] {
        let forged = wrapped(THERE, claimed, 100, mac_of(1), &to_a[14..]);
        assert_eq!(j(&forged), Verdict::Drop(D::IdentityMismatch), "identity {claimed}");
        let forged = wrapped(THERE, claimed, 100, mac_of(3), &to_web[14..]);
        assert_eq!(j(&forged), Verdict::Drop(D::IdentityMismatch), "identity {claimed}");
    }
}

#[test]
fn s6_related_errors_over_the_underlay_come_from_the_peer_placed_on_the_sending_host() {
    let (mut st, local) = fleet_fixture();
    // ep-7 on h2 too: a stranger to web's flow with ep-6.
    let mut stranger = st.endpoints["ep-6"].clone();
    stranger.id = "ep-7".into();
    stranger.ip = Ipv4Addr::new(10, 0, 0, 7);
    stranger.mac = "02:aa:00:00:00:07".into();
    st.endpoints.insert("ep-7".into(), stranger);
    let h = host(&st, &local).with_underlay(UNDERLAY);
    let mut ct = Conntrack::default();
    let syn = ipv4(mac_of(3), W, R, IPPROTO_TCP, &tcp(40000, 22, SYN));
    let out = h.judge(&ct, S, 13, &syn);
    assert!(matches!(out.verdict, Verdict::Wrap { .. }));
    ct.apply(&out.ct.expect("tracked"));
    let quote = quote_of(&syn);
    // web admits only TCP/80: what is not related is refused by its ingress rules.
    let error = |from: [u8; 4], kind, total| {
        let f = error_frame(mac_of(6), from, W, kind, &quote, total);
        wrapped(THERE, 6, 100, mac_of(3), &f[ETH_HLEN..])
    };
    let v = h.judge_underlay(&ct, S, &error(R, (3, 4), 56));
    assert_eq!(delivered_to(&v.verdict), Some(13), "the peer's frag-needed is related");
    assert_eq!(v.ct, None);
    for (from, kind, total, what) in [
        ([10, 0, 0, 7], (3, 4), 56, "a stranger on the same host"),
        (R, (3, 4), 577, "longer than a router's"),
        (R, (3, 16), 56, "not an error code"),
    ] {
        let v = h.judge_underlay(&ct, S, &error(from, kind, total)).verdict;
        assert_eq!(v, Verdict::Drop(D::PolicyIngress), "{what}");
    }
}

// ---- IPv6 between endpoints of one host ------------------------------------------------------

use dataplane_common::wire::{
    MLD2_REPORT, MLD_DONE, MLD_QUERY, MLD_REPORT, ND_NEIGHBOUR_ADVERT, ND_NEIGHBOUR_SOLICIT,
    ND_REDIRECT, ND_ROUTER_ADVERT, ND_ROUTER_SOLICIT,
};
use dataplane_common::{nd, Ct6Key};

/// fd00::n, ep-n's IPv6 address in [`fixture6`].
fn six(n: u8) -> [u8; 16] {
    let mut a = [0; 16];
    a[0] = 0xfd;
    a[15] = n;
    a
}

/// [`fixture`] made dual stack: both universes have fd00::/56, ep-n has fd00::n (ep-5 in
/// uni-2 has fd00::1 as ep-1 has in uni-1, as their IPv4 addresses are the same too); the
/// default groups and web may send anywhere over IPv6 too (`::/0`); web's ingress stays
/// `0.0.0.0/0` (no IPv6 peer), db's a group peer (both families).
fn fixture6() -> (State, BTreeMap<u32, String>) {
    let (mut st, local) = fixture();
    st.universes.update_all(|_, u| u.ipv6_cidrs = vec!["fd00::/56".parse().unwrap()]);
    st.endpoints.update_all(|id, e| {
        let n: u8 = id.trim_start_matches("ep-").parse().unwrap();
        e.ipv6 = Some(std::net::Ipv6Addr::from(six(if n == 5 { 1 } else { n })));
    });
    for (g, r) in [("sg-def1", "r-def1-e6"), ("sg-def2", "r-def2-e6"), ("sg-web", "r-web-e6")] {
        let any6 = rule(r, Direction::Egress, Protocol::All, None, cidr("::/0"));
        st.groups.get_mut(g).unwrap().egress.push(any6);
    }
    (st, local)
}

/// An IPv6 frame from ep-n (its MAC) from `src` to `dst`.
fn frame6(n: u8, src: [u8; 16], dst: [u8; 16], proto: u8, l4: &[u8]) -> Vec<u8> {
    frames::ethernet(GW, mac_of(n), ETHERTYPE_IPV6, &frames::ipv6(src, dst, proto, l4))
}

#[test]
fn ipv6_between_endpoints_of_one_host_is_tracked_and_judged_as_ipv4() {
    let (st, local) = fixture6();
    let h = host(&st, &local);
    let mut ct = Conntrack::default();
    // ep-1 -> ep-2 (default group): a SYN delivered as IPv4's, tracked in the IPv6 table.
    let syn = frame6(1, six(1), six(2), IPPROTO_TCP, &tcp(40000, 22, SYN));
    let out = h.judge(&ct, S, 11, &syn);
    let Verdict::Deliver { ifindex: 12, frame } = &out.verdict else { panic!("{out:?}") };
    assert_eq!((&frame[0..6], &frame[6..12], &frame[12..]), (&mac_of(2)[..], &GW[..], &syn[12..]));
    let key = Ct6Key::new(100, six(1), six(2), 40000, 22, IPPROTO_TCP);
    assert_eq!(out.ct, None);
    assert_eq!(out.ct6.map(|u| (u.key, u.entry.state)), Some((key, ct_state::TCP_OPENING)));
    h.judge_and_track(&mut ct, S, 11, &syn);
    assert!(ct.entries.is_empty() && ct.entries6.len() == 1);
    // The reply, and an echo each way.
    let synack = frame6(2, six(2), six(1), IPPROTO_TCP, &tcp(22, 40000, SYNACK));
    assert_eq!(delivered_to(&h.judge_and_track(&mut ct, S, 12, &synack)), Some(11));
    assert_eq!(ct.entries6[&key].state, ct_state::TCP_ESTABLISHED);
    let echo = |n, src, dst, ty| {
        frame6(
            n,
            src,
            dst,
            IPPROTO_ICMPV6,
            &frames::icmpv6(src, dst, ty, 0, frames::echo_rest(9, 1), b"ping"),
        )
    };
    let req = echo(1, six(1), six(2), 128);
    assert_eq!(delivered_to(&h.judge_and_track(&mut ct, S, 11, &req)), Some(12));
    let rep = echo(2, six(2), six(1), 129);
    assert_eq!(delivered_to(&h.judge_and_track(&mut ct, S, 12, &rep)), Some(11));
    assert_eq!(
        ct.entries6[&Ct6Key::new(100, six(1), six(2), 9, 0, IPPROTO_ICMPV6)].state,
        ct_state::ICMP
    );
    // An echo reply nobody asked for is judged by the rules: ep-4 (db) sends nothing.
    let stray = echo(4, six(4), six(1), 129);
    assert_eq!(h.judge(&ct, S, 14, &stray).verdict, Verdict::Drop(D::PolicyEgress));
    // No route; a universe of its own for the same addresses (ep-5 has fd00::1 in uni-2).
    let nowhere = frame6(1, six(1), six(99), IPPROTO_UDP, &udp(1, 53));
    assert_eq!(h.judge(&ct, S, 11, &nowhere).verdict, Verdict::Drop(D::NoRoute));
    let other = frame6(5, six(1), six(2), IPPROTO_UDP, &udp(1, 53));
    assert_eq!(h.judge(&ct, S, 15, &other).verdict, Verdict::Drop(D::NoRoute));
}

#[test]
fn a_cidr_rule_admits_peers_of_its_own_family_only() {
    let (st, local) = fixture6();
    let h = host(&st, &local);
    let ct = Conntrack::default();
    // web admits TCP 80 from 0.0.0.0/0: over IPv4, not over IPv6.
    let v4 = ipv4(mac_of(1), A, W, IPPROTO_TCP, &tcp(40000, 80, SYN));
    assert_eq!(delivered_to(&h.judge(&ct, S, 11, &v4).verdict), Some(13));
    let v6 = frame6(1, six(1), six(3), IPPROTO_TCP, &tcp(40000, 80, SYN));
    assert_eq!(h.judge(&ct, S, 11, &v6).verdict, Verdict::Drop(D::PolicyIngress));
    // db admits 5432 from web members, a group peer: over both families.
    let web_db = frame6(3, six(3), six(4), IPPROTO_TCP, &tcp(40000, 5432, SYN));
    assert_eq!(delivered_to(&h.judge(&ct, S, 13, &web_db).verdict), Some(14));
    // db's default egress... db has no egress rule at all; ep-2's `0.0.0.0/0`-only default
    // group of uni-2 is not involved. Without a `::/0` rule nothing leaves over IPv6:
    let mut st4 = st.clone();
    st4.groups.get_mut("sg-def1").unwrap().egress.retain(|r| r.id != "r-def1-e6");
    let h4 = host(&st4, &local);
    let syn = frame6(1, six(1), six(2), IPPROTO_TCP, &tcp(40000, 22, SYN));
    assert_eq!(h4.judge(&ct, S, 11, &syn).verdict, Verdict::Drop(D::PolicyEgress));
    // `icmp` rules never match ICMPv6, `icmpv6` ones do.
    let ping = |h: &Host| {
        let m = frames::icmpv6(six(1), six(4), 128, 0, frames::echo_rest(1, 1), b"");
        h.judge(&ct, S, 11, &frame6(1, six(1), six(4), IPPROTO_ICMPV6, &m)).verdict
    };
    assert_eq!(ping(&h), Verdict::Drop(D::PolicyIngress));
    let mut with_icmp = st.clone();
    let icmp_any = rule("r-db-icmp", Direction::Ingress, Protocol::ICMP, None, cidr("::/0"));
    with_icmp.groups.get_mut("sg-db").unwrap().ingress.push(icmp_any);
    assert_eq!(ping(&host(&with_icmp, &local)), Verdict::Drop(D::PolicyIngress));
    let icmp6 = rule("r-db-icmp6", Direction::Ingress, Protocol::ICMPV6, None, cidr("fd00::/64"));
    with_icmp.groups.get_mut("sg-db").unwrap().ingress.push(icmp6);
    assert_eq!(delivered_to(&ping(&host(&with_icmp, &local))), Some(14));
    // A universe without IPv6 CIDRs admits no IPv6, whatever its rules.
    let mut v4only = st.clone();
    v4only.universes.update_all(|_, u| u.ipv6_cidrs.clear());
    let udp6 = frame6(1, six(1), six(2), IPPROTO_UDP, &udp(1, 53));
    assert_eq!(
        host(&v4only, &local).judge(&ct, S, 11, &udp6).verdict,
        Verdict::Drop(D::PolicyEgress)
    );
}

#[test]
fn icmpv6_errors_about_tracked_flows_come_only_from_the_peer_and_bounded() {
    let (st, local) = fixture6();
    let h = host(&st, &local);
    let mut ct = Conntrack::default();
    let syn = frame6(3, six(3), six(4), IPPROTO_TCP, &tcp(40000, 5432, SYN));
    assert_eq!(delivered_to(&h.judge_and_track(&mut ct, S, 13, &syn)), Some(14));
    let quote = |f: &[u8]| f[ETH_HLEN..ETH_HLEN + 48].to_vec();
    let error = |n: u8, src, dst, ty, quoted: &[u8], pad: usize| {
        let body = [quoted, &vec![0; pad][..]].concat();
        frame6(
            n,
            src,
            dst,
            IPPROTO_ICMPV6,
            &frames::icmpv6(src, dst, ty, 0, [0, 0, 5, 0x78], &body),
        )
    };
    // db has no egress rule: only a related error leaves it.
    for ty in [1, 2, 3, 4] {
        let e = error(4, six(4), six(3), ty, &quote(&syn), 0);
        assert_eq!(delivered_to(&h.judge(&ct, S, 14, &e).verdict), Some(13), "type {ty}");
    }
    // Longer than 1280 bytes of IPv6 packet; an echo; quoting an untracked flow; sent to
    // someone else than the flow's originator: judged by the rules, and refused.
    let long = error(4, six(4), six(3), 1, &quote(&syn), 1280 - 40 - 8 - 48 + 1);
    let other = frame6(3, six(3), six(4), IPPROTO_TCP, &tcp(40001, 5432, SYN));
    let to_ep1 = error(4, six(4), six(1), 1, &quote(&syn), 0);
    for (what, f) in [
        ("one byte past 1280", long),
        ("not an error", error(4, six(4), six(3), 128, &quote(&syn), 0)),
        ("untracked", error(4, six(4), six(3), 1, &quote(&other), 0)),
        ("not to the originator", to_ep1),
    ] {
        assert_eq!(h.judge(&ct, S, 14, &f).verdict, Verdict::Drop(D::PolicyEgress), "{what}");
    }
    let exact = error(4, six(4), six(3), 1, &quote(&syn), 1280 - 40 - 8 - 48);
    assert_eq!(delivered_to(&h.judge(&ct, S, 14, &exact).verdict), Some(13), "1280 exactly");
}

#[test]
fn ipv6_sources_are_the_endpoints_own_and_its_budget_counts_both_families() {
    let (mut st, local) = fixture6();
    let ll1 = nd::link_local(mac_of(1));
    {
        let h = host(&st, &local);
        let ct = Conntrack::default();
        for src in [six(2), ll1, [0; 16]] {
            let f = frame6(1, src, six(2), IPPROTO_UDP, &udp(1, 53));
            assert_eq!(h.judge(&ct, S, 11, &f).verdict, Verdict::Drop(D::SpoofedIp), "{src:?}");
        }
    }
    st.endpoints.get_mut("ep-1").unwrap().conntrack_budget = 1;
    let h = host(&st, &local);
    let mut ct = Conntrack::default();
    let v4 = ipv4(mac_of(1), A, B, IPPROTO_UDP, &udp(1, 53));
    assert_eq!(delivered_to(&h.judge_and_track(&mut ct, S, 11, &v4)), Some(12));
    let v6 = frame6(1, six(1), six(2), IPPROTO_UDP, &udp(1, 53));
    assert_eq!(h.judge(&ct, S, 11, &v6).verdict, Verdict::Drop(D::ConntrackBudgetExceeded));
}

#[test]
fn the_gateway_answers_neighbour_solicitations_and_refuses_forged_discovery() {
    // ff02::16, where MLDv2 reports go.
    const MLD2_ALL: [u8; 16] = [0xff, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x16];
    let (st, local) = fixture6();
    let h = host(&st, &local);
    let ct = Conntrack::default();
    let ll1 = nd::link_local(mac_of(1));
    let nd_frame = |src: [u8; 16], dst: [u8; 16], ty: u8, target: [u8; 16], hop: u8| {
        let m =
            frames::icmpv6(src, dst, ty, 0, [0; 4], &[&target[..], &[1, 1], &mac_of(1)].concat());
        let p = frames::with_hop_limit(frames::ipv6(src, dst, IPPROTO_ICMPV6, &m), hop);
        frames::ethernet(GW, mac_of(1), ETHERTYPE_IPV6, &p)
    };
    // A peer's address, the gateway's link-local one: answered with the gateway's MAC.
    for (src, target) in [(ll1, six(2)), (six(1), six(99)), (ll1, nd::link_local(GW))] {
        let ns = nd_frame(src, six(2), ND_NEIGHBOUR_SOLICIT, target, 255);
        let want = nd::advert(&GW, &mac_of(1), &target, &src).to_vec();
        assert_eq!(h.judge(&ct, S, 11, &ns).verdict, Verdict::ArpReply { frame: want });
    }
    let table = [
        ("DAD", nd_frame([0; 16], six(2), ND_NEIGHBOUR_SOLICIT, six(1), 255), D::NdUnanswered),
        ("own address", nd_frame(ll1, six(2), ND_NEIGHBOUR_SOLICIT, six(1), 255), D::NdUnanswered),
        ("hop limit 64", nd_frame(ll1, six(2), ND_NEIGHBOUR_SOLICIT, six(2), 64), D::NdUnanswered),
        (
            "router solicitation",
            nd_frame(ll1, six(2), ND_ROUTER_SOLICIT, [0; 16], 255),
            D::NdUnanswered,
        ),
        (
            "own advertisement",
            nd_frame(ll1, six(2), ND_NEIGHBOUR_ADVERT, six(1), 255),
            D::NdUnanswered,
        ),
        (
            "a peer's advertisement",
            nd_frame(six(1), six(2), ND_NEIGHBOUR_ADVERT, six(2), 255),
            D::NdSpoofed,
        ),
        (
            "router advertisement",
            nd_frame(ll1, six(2), ND_ROUTER_ADVERT, [0; 16], 255),
            D::NdSpoofed,
        ),
        ("redirect", nd_frame(ll1, six(2), ND_REDIRECT, six(2), 255), D::NdSpoofed),
        (
            "foreign source",
            nd_frame(six(2), six(3), ND_NEIGHBOUR_SOLICIT, six(3), 255),
            D::SpoofedIp,
        ),
        // Multicast listener discovery: what a stack sends for the groups it joins, from its
        // own addresses, is counted apart from spoofing; from another address it is spoofing.
        ("MLDv2 report", nd_frame(ll1, MLD2_ALL, MLD2_REPORT, [0; 16], 1), D::MldUnanswered),
        (
            "MLDv2 report from ::",
            nd_frame([0; 16], MLD2_ALL, MLD2_REPORT, [0; 16], 1),
            D::MldUnanswered,
        ),
        ("MLD report", nd_frame(six(1), MLD2_ALL, MLD_REPORT, MLD2_ALL, 1), D::MldUnanswered),
        ("MLD done", nd_frame(ll1, MLD2_ALL, MLD_DONE, MLD2_ALL, 1), D::MldUnanswered),
        ("MLD query", nd_frame(ll1, MLD2_ALL, MLD_QUERY, [0; 16], 1), D::MldUnanswered),
        (
            "MLD from a peer's address",
            nd_frame(six(2), MLD2_ALL, MLD2_REPORT, [0; 16], 1),
            D::SpoofedIp,
        ),
    ];
    for (what, f, want) in table {
        assert_eq!(h.judge(&ct, S, 11, &f).verdict, Verdict::Drop(want), "{what}");
    }
}

// ---- IPv6 between hosts ------------------------------------------------------------------------

/// [`fixture6`] with ep-6 (a web member, fd00::6, serial 6) on h2, as [`fleet_fixture`] has it.
fn fleet_fixture6() -> (State, BTreeMap<u32, String>) {
    let (mut st, local) = fixture6();
    let (fleet, _) = fleet_fixture();
    st.hosts = fleet.hosts.clone();
    let mut remote = fleet.endpoints["ep-6"].clone();
    remote.ipv6 = Some(std::net::Ipv6Addr::from(six(6)));
    remote.serial = 6;
    st.endpoints.insert("ep-6".into(), remote);
    (st, local)
}

/// [`wrapped`] for an inner IPv6 packet (no Ethernet header).
fn wrapped6(from: Ipv4Addr, group: u16, mac: [u8; 6], inner: &[u8]) -> Vec<u8> {
    let mut w = wrapped(from, group, 100, mac, inner);
    w[62..64].copy_from_slice(&ETHERTYPE_IPV6.to_be_bytes());
    w
}

#[test]
fn ipv6_to_another_host_is_wrapped_as_ipv4_and_answered_packet_too_big() {
    let (st, local) = fleet_fixture6();
    let h = host(&st, &local).with_underlay(UNDERLAY);
    let mut ct = Conntrack::default();
    let syn = frame6(1, six(1), six(6), IPPROTO_TCP, &tcp(40000, 22, SYN));
    assert_eq!(host(&st, &local).judge(&ct, S, 11, &syn).verdict, Verdict::Drop(D::NoUnderlay));
    let out = h.judge(&ct, S, 11, &syn);
    let Verdict::Wrap { frame } = &out.verdict else { panic!("{:?}", out.verdict) };
    // The same outer headers as IPv4's; the inner Ethernet header says IPv6.
    let v4 = ipv4(mac_of(1), A, R, IPPROTO_TCP, &tcp(40000, 22, SYN));
    let Verdict::Wrap { frame: frame4 } = h.judge(&ct, S, 11, &v4).verdict else { panic!() };
    assert_eq!(frame.len(), syn.len() + 50);
    assert_eq!(&frame[12..14], &[0x08, 0x00], "the outer type is IPv4");
    assert_eq!(&frame[20..24], &frame4[20..24]);
    assert_eq!(&frame[26..34], &frame4[26..34]);
    assert_eq!(&frame[42..62], &frame4[42..62], "VXLAN-GBP and the inner addresses");
    assert_eq!(&frame[62..64], &[0x86, 0xdd]);
    assert_eq!(&frame[64..], &syn[14..]);
    let key = Ct6Key::new(100, six(1), six(6), 40000, 22, IPPROTO_TCP);
    let u = out.ct6.expect("a new flow");
    assert_eq!((u.key, u.entry.owner, u.entry.dst_serial), (key, ct_owner::SRC, 6));
    h.judge_and_track(&mut ct, S, 11, &syn);
    // Too big to wrap: a "packet too big" from the gateway of fd00::/56 (its second address,
    // fd00::1), MTU 1450, quoting 256 bytes.
    let big =
        frame6(1, six(1), six(6), IPPROTO_TCP, &[tcp(40000, 22, 0x10), vec![7; 1420]].concat());
    let out = h.judge(&ct, S, 11, &big);
    let Verdict::FragNeeded { frame: e } = &out.verdict else { panic!("{:?}", out.verdict) };
    assert_eq!((out.ct, out.ct6), (None, None));
    assert_eq!(e.len(), 14 + 40 + 8 + 256);
    assert_eq!((&e[0..6], &e[6..12], &e[12..14]), (&mac_of(1)[..], &GW[..], &[0x86, 0xdd][..]));
    assert_eq!(&e[14..22], &[0x60, 0, 0, 0, 1, 8, 58, 64]);
    let gateway: [u8; 16] = "fd00::1".parse::<std::net::Ipv6Addr>().unwrap().octets();
    assert_eq!((&e[22..38], &e[38..54]), (&gateway[..], &six(1)[..]));
    assert_eq!(&e[54..56], &[2, 0]);
    assert_eq!(&e[58..62], &1450u32.to_be_bytes());
    assert_eq!(&e[62..], &big[14..270]);
    let mut pseudo = e[22..54].to_vec();
    pseudo.extend_from_slice(&[0, 0, 1, 8, 0, 0, 0, 58]);
    pseudo.extend_from_slice(&e[54..]);
    assert_eq!(checksum(&pseudo), 0, "the ICMPv6 checksum");
    let fits =
        frame6(1, six(1), six(6), IPPROTO_TCP, &[tcp(40000, 22, 0x10), vec![7; 1390]].concat());
    assert!(matches!(h.judge(&ct, S, 11, &fits).verdict, Verdict::Wrap { .. }));
    // The reply, wrapped by h2: unwrapped, of type IPv6, delivered by conntrack.
    let reply = frame6(6, six(6), six(1), IPPROTO_TCP, &tcp(22, 40000, SYNACK));
    let out = h.judge_underlay(&ct, S, &wrapped6(THERE, 6, mac_of(1), &reply[14..]));
    let mut want = reply.clone();
    want[..12].copy_from_slice(&[mac_of(1), GW].concat());
    assert_eq!(out.verdict, Verdict::Deliver { ifindex: 11, frame: want });
    assert_eq!(out.ct6.map(|u| (u.key, u.entry.state)), Some((key, ct_state::TCP_ESTABLISHED)));
}

/// S6 over the underlay for IPv6: the 1280 bytes a related ICMPv6 error may have are those of
/// its own IPv6 packet, not of the wrapped frame around it (`from_underlay6` measures from the
/// inner header; the model once counted the 50 bytes of the wrap too).
#[test]
fn a_wrapped_icmpv6_error_is_bounded_by_its_own_ipv6_packet() {
    let (st, local) = fleet_fixture6();
    let h = host(&st, &local).with_underlay(UNDERLAY);
    let mut ct = Conntrack::default();
    let syn = frame6(1, six(1), six(6), IPPROTO_TCP, &tcp(40000, 22, SYN));
    assert!(matches!(h.judge_and_track(&mut ct, S, 11, &syn), Verdict::Wrap { .. }));
    let quote = syn[ETH_HLEN..ETH_HLEN + 48].to_vec();
    let error = |pad: usize| {
        let body = [&quote[..], &vec![0; pad][..]].concat();
        let m = frames::icmpv6(six(6), six(1), 1, 0, [0, 0, 5, 0x78], &body);
        let f = frame6(6, six(6), six(1), IPPROTO_ICMPV6, &m);
        wrapped6(THERE, 6, mac_of(1), &f[ETH_HLEN..])
    };
    let exact = error(1280 - 40 - 8 - 48);
    assert_eq!(exact.len(), 50 + ETH_HLEN + 1280);
    assert_eq!(delivered_to(&h.judge_underlay(&ct, S, &exact).verdict), Some(11), "1280 exactly");
    // One byte more is no related error: ep-1's rules admit nothing from ep-6.
    let v = h.judge_underlay(&ct, S, &error(1280 - 40 - 8 - 48 + 1)).verdict;
    assert_eq!(v, Verdict::Drop(D::PolicyIngress), "one byte past 1280");
}

#[test]
fn wrapped_ipv6_is_judged_by_the_receivers_rules_with_the_control_planes_identity() {
    let (st, local) = fleet_fixture6();
    let h = host(&st, &local).with_underlay(UNDERLAY);
    let ct = Conntrack::default();
    let j = |f: &[u8]| h.judge_underlay(&ct, S, f);
    // ep-6 (web) to ep-4 (db: 5432 from web members): admitted, owned by the receiver.
    let to_db = frame6(6, six(6), six(4), IPPROTO_TCP, &tcp(1, 5432, SYN));
    let out = j(&wrapped6(THERE, 6, mac_of(4), &to_db[14..]));
    assert_eq!(delivered_to(&out.verdict), Some(14));
    let u = out.ct6.expect("a new flow");
    assert_eq!((u.entry.owner, u.entry.owner_slot, u.entry.src_serial), (ct_owner::DST, 4, 6));
    // To web (ep-3): its 0.0.0.0/0 rule admits no IPv6.
    let to_web = frame6(6, six(6), six(3), IPPROTO_TCP, &tcp(1, 80, SYN));
    let v = j(&wrapped6(THERE, 6, mac_of(3), &to_web[14..])).verdict;
    assert_eq!(v, Verdict::Drop(D::PolicyIngress));
    // The identity is the control plane's: another claimed one is refused (S10)...
    let v = j(&wrapped6(THERE, 4, mac_of(4), &to_db[14..])).verdict;
    assert_eq!(v, Verdict::Drop(D::IdentityMismatch));
    // ...as is a source no endpoint of h2 has, or ep-6's address from another host of the fleet.
    let forged = frame6(6, six(2), six(4), IPPROTO_TCP, &tcp(1, 5432, SYN));
    let v = j(&wrapped6(THERE, 2, mac_of(4), &forged[14..])).verdict;
    assert_eq!(v, Verdict::Drop(D::NotPlacedOnSender));
    // Neighbour discovery is never wrapped; a destination elsewhere is not local.
    let m = frames::icmpv6(six(6), six(4), ND_NEIGHBOUR_ADVERT, 0, [0x60, 0, 0, 0], &six(4));
    let na = frame6(6, six(6), six(4), IPPROTO_ICMPV6, &m);
    assert_eq!(j(&wrapped6(THERE, 6, mac_of(4), &na[14..])).verdict, Verdict::Drop(D::NdSpoofed));
    let away = frame6(6, six(6), six(6), IPPROTO_TCP, &tcp(1, 5432, SYN));
    let v = j(&wrapped6(THERE, 6, mac_of(4), &away[14..])).verdict;
    assert_eq!(v, Verdict::Drop(D::NotLocal));
}
