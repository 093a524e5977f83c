//! Flow logs (README, "Why was my packet dropped?"): records per endpoint, flow, direction and
//! interval, written by the host as JSON lines and read through `GET /v1/flow-logs` and
//! `verse flow-logs`, checked against what a packet capture in the workload saw; packets per
//! rule; access; endpoints with flow logs off; rotation and the size cap.
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::UdpSocket;
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use tests::*;
use verse::model::{CreateEndpoint, Role};

/// The shortest interval, so that a test sees records within seconds.
const CONFIG: &str = "[observability]\nflow_log_interval = 10\n";

fn id(v: &Value) -> &str {
    v["id"].as_str().expect("resource has an id")
}

/// An endpoint with flow logs on (`true`), off (`false`) or left to the default (`None`).
fn endpoint(
    host: &Host,
    universe: &str,
    ip: &str,
    groups: &[&str],
    logs: Option<bool>,
) -> Workload {
    endpoint_of(host, universe, (ip, false), groups, logs)
}

/// [`endpoint`], dual stack (`dual`: `ip` and its IPv6 counterpart, [`Family::text`]) or not.
fn endpoint_of(
    host: &Host,
    universe: &str,
    (ip, dual): (&str, bool),
    groups: &[&str],
    logs: Option<bool>,
) -> Workload {
    let (w, _) = host.api.plug(CreateEndpoint {
        universe: universe.into(),
        ip: ip.into(),
        ipv6: dual.then(|| Family::V6.text(ip)),
        security_groups: (!groups.is_empty())
            .then(|| groups.iter().map(|g| (*g).to_owned()).collect()),
        flow_logs: logs,
        ..Default::default()
    });
    assert_eq!(w.json["flow_logs"], json!(logs.unwrap_or(false)), "{}", w.json);
    w
}

/// `verse flow-logs ID [--since SINCE]`, as the JSON the API sent.
fn records_since(api: &Api, endpoint: &str, since: Option<&str>) -> Vec<Value> {
    let got = api.client().flow_logs(endpoint, since, None).expect("GET /v1/flow-logs");
    got.iter().map(|r| serde_json::to_value(r).expect("a record is JSON")).collect()
}

/// Every flow log record of `endpoint`.
fn records(api: &Api, endpoint: &str) -> Vec<Value> {
    records_since(api, endpoint, None)
}

/// Waits (40 s at most: a 10 s interval, and the time to write it) for records of `endpoint`
/// that `done` accepts; returns the last read.
fn wait_records(api: &Api, endpoint: &str, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let end = Instant::now() + Duration::from_secs(40);
    loop {
        let got = records(api, endpoint);
        if done(&got) || Instant::now() > end {
            return got;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// One packet a capture saw.
#[derive(Clone, Debug)]
struct Seen {
    src: String,
    dst: String,
    /// IP packet length (the frame without its Ethernet header).
    ip_len: u64,
    /// TCP flags as the bits of the header.
    flags: u8,
}

/// `tcpdump` on the workload's `eth0`: every IP packet it sees, as it sees it.
struct Capture {
    child: Child,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Capture {
    fn start(ns: &Netns, filter: &str) -> Capture {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns.name(), "tcpdump", "-i", "eth0", "-nn", "-e", "-l", "-U"])
            .args(filter.split_whitespace())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        die_with_parent(&mut cmd);
        let mut child = cmd.spawn().expect("start tcpdump (cargo xtask setup installs it)");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stdout = child.stdout.take().unwrap();
        let into = seen.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(p) = parse_tcpdump(&line) {
                    into.lock().unwrap().push(p);
                }
            }
        });
        // Capturing once it says it listens.
        let (tx, rx) = mpsc::channel();
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("listening on") {
                    let _ = tx.send(());
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(10)).expect("tcpdump listens");
        Capture { child, seen }
    }

    /// What it saw, after a moment for the last lines.
    fn stop(mut self) -> Vec<Seen> {
        std::thread::sleep(Duration::from_millis(500));
        let _ = self.child.kill();
        let _ = self.child.wait();
        std::thread::sleep(Duration::from_millis(100));
        let seen = self.seen.lock().unwrap().clone();
        seen
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `... ethertype IPv4 (0x0800), length 74: 10.0.0.1.40000 > 10.0.0.2.5432: Flags [S.], ...`,
/// or `ethertype IPv6 (0x86dd)` and IPv6 addresses (`fd00::1.40000`).
fn parse_tcpdump(line: &str) -> Option<Seen> {
    let rest = line
        .split_once("ethertype IPv4 (0x0800), length ")
        .or_else(|| line.split_once("ethertype IPv6 (0x86dd), length "))?
        .1;
    let (len, rest) = rest.split_once(": ")?;
    let frame: u64 = len.parse().ok()?;
    let (src, rest) = rest.split_once(" > ")?;
    let (dst, rest) = rest.split_once(": ")?;
    let mut flags = 0u8;
    if let Some(f) = rest.strip_prefix("Flags [").and_then(|r| r.split_once(']')).map(|x| x.0) {
        for c in f.chars() {
            flags |= match c {
                'F' => 0x01,
                'S' => 0x02,
                'R' => 0x04,
                'P' => 0x08,
                '.' => 0x10,
                'U' => 0x20,
                'E' => 0x40,
                'W' => 0x80,
                _ => 0,
            };
        }
    }
    Some(Seen {
        src: src.to_owned(),
        dst: dst.trim_end_matches(':').to_owned(),
        ip_len: frame - 14,
        flags,
    })
}

/// The sum of `records` matching `want`: packets, bytes, flags OR-ed.
fn sum(records: &[Value], want: impl Fn(&Value) -> bool) -> (u64, u64, u64) {
    records.iter().filter(|r| want(r)).fold((0, 0, 0), |(p, b, f), r| {
        (
            p + r["packets"].as_u64().unwrap(),
            b + r["bytes"].as_u64().unwrap(),
            f | r["tcp_flags"].as_u64().unwrap(),
        )
    })
}

/// The same of what a capture saw from `src` (`ip.port`) to `dst`.
fn captured(seen: &[Seen], src: &str, dst: &str) -> (u64, u64, u64) {
    seen.iter()
        .filter(|s| s.src == src && s.dst == dst)
        .fold((0, 0, 0), |(p, b, f), s| (p + 1, b + s.ip_len, f | u64::from(s.flags)))
}

/// An admitted TCP exchange and a denied probe: the records of both endpoints count what the
/// capture in the client's namespace saw, packet for packet and byte for byte, with the TCP
/// flags of each direction, the action, the rule of each endpoint, the reject reason and the
/// direction; the rule's packets are counted in the group view, `verse rule list --stats` and
/// `/metrics`; `verse flow-logs` prints the same records. The same over IPv6 (addresses in
/// their standard form, bytes of whole IPv6 packets).
#[test]
fn records_count_what_the_wire_carried_with_rules_reasons_and_directions() {
    records_count_what_the_wire_carried(Family::V4);
}

#[test]
fn records_count_what_the_wire_carried_with_rules_reasons_and_directions_over_ipv6() {
    records_count_what_the_wire_carried(Family::V6);
}

fn records_count_what_the_wire_carried(family: Family) {
    let host = Host::start_with_config(Some(CONFIG));
    let api = &host.api;
    let uni = api.create_dual_universe("logs", "10.40.0.0/24");
    let web = api.create_group(id(&uni), "web");
    let db = api.create_group(id(&uni), "db");
    let pg = api.add_rule(
        id(&db),
        &json!({"direction": "ingress", "protocol": "tcp", "from_port": 5432, "to_port": 5432, "group": id(&web)}),
    );
    let a = endpoint_of(&host, id(&uni), ("10.40.0.10", true), &[id(&web)], Some(true));
    let b = endpoint_of(&host, id(&uni), ("10.40.0.20", true), &[id(&db)], Some(true));
    let (a_ip, b_ip) = (family.addr(&a).to_string(), family.addr(&b).to_string());
    // S2: web's default egress rule to 0.0.0.0/0, and to ::/0 for IPv6 (its rules are listed
    // by id).
    let everywhere = family.text("0.0.0.0/0");
    let group = api.group(id(&web));
    let web_egress = group["egress"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["cidr"] == everywhere)
        .unwrap_or_else(|| panic!("web's {everywhere} egress rule in {group:#}"))["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let _pg = TcpServer::start_on(&b.ns, family.addr(&b), 5432, "db");

    let capture = Capture::start(&a.ns, "tcp");
    let mut conn =
        TcpConn::open(&a.ns, family.addr(&b), 5432, ALLOWED).expect("web reaches db on 5432");
    let sport = conn.local_port();
    assert_eq!(conn.exchange("q1", ALLOWED).unwrap(), "db:q1");
    assert_eq!(conn.exchange("q2", ALLOWED).unwrap(), "db:q2");
    drop(conn);
    assert!(!tcp_connect(&a.ns, family.addr(&b), 8080, DENIED), "db admits nothing on 8080");
    std::thread::sleep(Duration::from_millis(500));
    let seen = capture.stop();

    let client = format!("{a_ip}.{sport}");
    let server = format!("{b_ip}.5432");
    let out = captured(&seen, &client, &server);
    let back = captured(&seen, &server, &client);
    assert!(out.0 >= 5 && back.0 >= 4, "the capture saw the exchange: {seen:#?}");
    let probes: Vec<&Seen> = seen.iter().filter(|s| s.dst == format!("{b_ip}.8080")).collect();
    assert!(!probes.is_empty(), "the capture saw the probe: {seen:#?}");
    let probe = (
        probes.len() as u64,
        probes.iter().map(|s| s.ip_len).sum::<u64>(),
        probes.iter().fold(0, |f, s| f | u64::from(s.flags)),
    );

    let flow = |r: &Value, src: &str, dst: &str, sp: u16, dp: u16| {
        r["srcaddr"] == src && r["dstaddr"] == dst && r["srcport"] == sp && r["dstport"] == dp
    };
    let complete = |rs: &[Value]| {
        sum(rs, |r| r["action"] == "ACCEPT" && flow(r, &a_ip, &b_ip, sport, 5432)).0 >= out.0
            && sum(rs, |r| r["action"] == "ACCEPT" && flow(r, &b_ip, &a_ip, 5432, sport)).0
                >= back.0
    };
    // TCP only: a dual-stack workload's own IPv6 multicast listener reports (from its
    // link-local address, to ff02::16) are rejected too (`mld_unanswered`), in records of their
    // own.
    let tcp_reject = |r: &Value| r["action"] == "REJECT" && r["protocol"] == 6;
    let ra = wait_records(api, &a.id, complete);
    let rb = wait_records(api, &b.id, |rs| complete(rs) && sum(rs, tcp_reject).0 >= probe.0);

    // The client: egress for what it sent, ingress for the answers, both under web's egress rule.
    let a_out = |r: &Value| flow(r, &a_ip, &b_ip, sport, 5432);
    let a_in = |r: &Value| flow(r, &b_ip, &a_ip, 5432, sport);
    assert_eq!(sum(&ra, a_out), out, "client egress = the capture: {ra:#?}\n{seen:#?}");
    assert_eq!(sum(&ra, a_in), back, "client ingress = the capture: {ra:#?}\n{seen:#?}");
    for r in ra.iter().filter(|r| a_out(r) || a_in(r)) {
        assert_eq!(r["action"], "ACCEPT", "{r:#}");
        assert_eq!(r["endpoint"], a.id.as_str());
        assert_eq!(r["interface"], a.interface.as_str());
        assert_eq!(r["universe"], id(&uni));
        assert_eq!(r["host"], host.name());
        assert_eq!(r["protocol"], 6);
        assert_eq!(r["rule"], web_egress.as_str(), "web's egress rule admitted it: {r:#}");
        assert_eq!(r["flow_direction"], if a_out(r) { "egress" } else { "ingress" }, "{r:#}");
        assert!(r.get("reason").is_none(), "{r:#}");
    }
    assert_eq!(out.2 & 0x13, 0x13, "SYN, ACK and FIN went out: {seen:#?}");
    assert!(!ra.iter().any(tcp_reject), "the client's probe is the server's reject: {ra:#?}");

    // The server: the same packets the other way round, under db's 5432 rule; the probe
    // rejected on its ingress rules.
    assert_eq!(sum(&rb, a_out), out, "server ingress = the capture: {rb:#?}");
    assert_eq!(sum(&rb, a_in), back, "server egress = the capture: {rb:#?}");
    for r in rb.iter().filter(|r| r["action"] == "ACCEPT") {
        assert_eq!(r["rule"], id(&pg), "{r:#}");
        assert_eq!(r["flow_direction"], if a_out(r) { "ingress" } else { "egress" }, "{r:#}");
    }
    let rejected: Vec<&Value> = rb.iter().filter(|r| tcp_reject(r)).collect();
    assert_eq!(sum(&rb, tcp_reject), probe, "the probe, as captured: {rejected:#?}");
    for r in &rejected {
        assert_eq!(r["reason"], "policy_ingress", "{r:#}");
        assert_eq!(r["flow_direction"], "ingress", "{r:#}");
        assert_eq!(r["dstport"], 8080, "{r:#}");
        assert_eq!((&r["srcaddr"], &r["dstaddr"]), (&json!(a_ip), &json!(b_ip)), "{r:#}");
        assert_eq!(r["tcp_flags"], 0x02, "a SYN: {r:#}");
        assert!(r.get("rule").is_none(), "nothing admitted it: {r:#}");
        assert!(r.get("sampled").is_none(), "no drop went unreported: {r:#}");
    }
    for r in ra.iter().chain(&rb) {
        let (start, end) = (r["start"].as_str().unwrap(), r["end"].as_str().unwrap());
        let at = |t: &str| verse::model::Timestamp::parse(t).unwrap_or_else(|| panic!("{t}")).0;
        let span = at(end).duration_since(at(start));
        let span = span.unwrap().as_secs_f64();
        assert!((9.5..=30.0).contains(&span), "a 10 s interval (later under load): {r:#}");
    }

    // Packets per rule: the 5432 rule admitted every packet of the exchange, both ways.
    let packets = out.0 + back.0;
    let view = api.get(&format!("/v1/security-groups/{}", id(&db))).json();
    assert_eq!(view["ingress"][0]["hits"]["packets"], packets, "{view:#}");
    assert_eq!(view["ingress"][0]["hits"]["flows"], 1, "{view:#}");
    // web's egress rule of this family (`::/0` admits IPv6 only) counts the same flow.
    let web_view = api.get(&format!("/v1/security-groups/{}", id(&web))).json();
    let egress_rule =
        web_view["egress"].as_array().unwrap().iter().find(|r| r["id"] == *web_egress);
    let egress_hits = &egress_rule.unwrap_or_else(|| panic!("{web_view:#}"))["hits"];
    assert_eq!(*egress_hits, json!({"flows": 1, "packets": packets}), "{web_view:#}");
    let metrics = api.metrics();
    let sample = format!(
        "verse_rule_packets_total{{universe=\"{}\",group=\"{}\",rule=\"{}\"}} {packets}",
        id(&uni),
        id(&db),
        id(&pg)
    );
    assert!(metrics.lines().any(|l| l == sample), "{sample} in\n{metrics}");
    let listed = verse_cli(
        host.netns().name(),
        &["--api", &api.url(), "--token", api.token().unwrap(), "rule", "list", id(&db), "--stats"],
    );
    let text = String::from_utf8_lossy(&listed.stdout);
    let row = text.lines().find(|l| l.starts_with(id(&pg))).unwrap_or_else(|| panic!("{text}"));
    assert!(row.split_whitespace().any(|c| c == packets.to_string()), "{text}");

    // The CLI shows the same records.
    let cli = verse_cli(
        host.netns().name(),
        &[
            "--api",
            &api.url(),
            "--token",
            api.token().unwrap(),
            "-o",
            "json",
            "flow-logs",
            "--endpoint",
            &b.id,
        ],
    );
    assert!(cli.status.success(), "{}", String::from_utf8_lossy(&cli.stderr));
    let printed: Vec<Value> = serde_json::from_slice(&cli.stdout).expect("a JSON array");
    assert_eq!(printed.len(), rb.len(), "{printed:#?}");
    let table = verse_cli(
        host.netns().name(),
        &["--api", &api.url(), "--token", api.token().unwrap(), "flow-logs", "--endpoint", &b.id],
    );
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.lines().any(|l| l.contains("REJECT") && l.contains("policy_ingress")), "{table}");

    // The workloads are dual stack: each one's own multicast listener reports (ICMPv6 143, to
    // ff02::16, from its link-local or IPv6 address or ::) are rejected as `mld_unanswered`,
    // in records of their own, matched by no rule.
    let mld = |r: &Value| r["reason"] == "mld_unanswered";
    for w in [&a, &b] {
        let own = wait_records(api, &w.id, |rs| rs.iter().any(mld));
        let w6 = w.ipv6.expect("a dual-stack workload").to_string();
        let reports: Vec<&Value> = own.iter().filter(|r| mld(r)).collect();
        assert!(!reports.is_empty(), "{}'s MLD reports have a record: {own:#?}", w.id);
        for r in reports {
            assert_eq!(r["action"], "REJECT", "{r:#}");
            assert_eq!(r["protocol"], 58, "{r:#}");
            assert_eq!(r["flow_direction"], "egress", "{r:#}");
            assert_eq!(r["endpoint"], w.id.as_str(), "{r:#}");
            assert!(r["dstaddr"].as_str().unwrap().starts_with("ff02::"), "multicast: {r:#}");
            let src = r["srcaddr"].as_str().unwrap();
            assert!(src.starts_with("fe80::") || src == w6 || src == "::", "its own: {r:#}");
            assert!(r.get("rule").is_none(), "nothing admitted it: {r:#}");
        }
    }
}

/// Records are per interval: what a flow carries in the next interval is a record of its own
/// counting only that interval's packets (deltas of the live conntrack entry).
#[test]
fn a_flow_spanning_intervals_gets_one_record_per_interval() {
    let host = Host::start_with_config(Some(CONFIG));
    let api = &host.api;
    let uni = api.create_universe("roll", "10.41.0.0/24");
    let sg = api.create_group(id(&uni), "all");
    api.add_rule(id(&sg), &json!({"direction": "ingress", "protocol": "udp", "from_port": 7000, "to_port": 7000, "group": id(&sg)}));
    let a = endpoint(&host, id(&uni), "10.41.0.10", &[id(&sg)], Some(true));
    let b = endpoint(&host, id(&uni), "10.41.0.20", &[id(&sg)], Some(false));
    // A listener that never answers: the flow is one-way, and no port-unreachable comes back.
    let _sink = b.ns.enter(|| UdpSocket::bind("10.41.0.20:7000")).unwrap();
    let sock = a.ns.enter(|| UdpSocket::bind("10.41.0.10:7100")).unwrap();
    let send = |n: usize, size: usize| {
        for _ in 0..n {
            sock.send_to(&vec![b'x'; size], (b.ip, 7000)).unwrap();
        }
    };
    send(3, 100);
    let first = wait_records(api, &a.id, |rs| !rs.is_empty());
    assert_eq!(first.len(), 1, "{first:#?}");
    assert_eq!(first[0]["packets"], 3, "{first:#?}");
    assert_eq!(first[0]["bytes"], 3 * (20 + 8 + 100), "{first:#?}");
    assert_eq!(first[0]["flow_direction"], "egress");
    assert_eq!(first[0]["protocol"], 17);
    assert_eq!(first[0]["srcport"], 7100);
    assert_eq!(first[0]["dstport"], 7000);
    // The same flow (its entry lives on), in a later interval.
    send(5, 200);
    let both = wait_records(api, &a.id, |rs| rs.len() >= 2);
    assert_eq!(both.len(), 2, "{both:#?}");
    assert_eq!(both[0], first[0], "the first record stays as written");
    assert_eq!(both[1]["packets"], 5, "only the second interval's packets: {both:#?}");
    assert_eq!(both[1]["bytes"], 5 * (20 + 8 + 200), "{both:#?}");
    assert!(both[1]["start"].as_str() >= first[0]["end"].as_str(), "{both:#?}");
    // since= keeps the records of intervals ending at or after it: the later one.
    let since = both[1]["end"].as_str().unwrap();
    assert_eq!(records_since(api, &a.id, Some(since)), vec![both[1].clone()]);

    // b's flow logs are off (it was made with them off): nothing for it, though it received.
    assert!(records(api, &b.id).is_empty(), "flow logs off: no records");
    let files =
        std::fs::read_to_string(host.state_dir().join("flow-logs/flow-logs.jsonl")).unwrap();
    assert!(!files.contains(&b.id), "nothing written for b:\n{files}");
    // The default is off as well.
    let c = endpoint(&host, id(&uni), "10.41.0.30", &[id(&sg)], None);
    let s = c.ns.enter(|| UdpSocket::bind("10.41.0.30:7100")).unwrap();
    s.send_to(b"hello", (b.ip, 7000)).unwrap();
    send(1, 10);
    let third = wait_records(api, &a.id, |rs| rs.len() >= 3);
    assert_eq!(third.len(), 3, "another interval went by: {third:#?}");
    assert!(records(api, &c.id).is_empty(), "flow logs default to off");
}

/// A token confined to one universe reads that universe's records, and another universe's
/// endpoint is as absent as elsewhere in the API (404); bad queries are 400s naming the field.
#[test]
fn a_universe_token_reads_only_its_universes_records() {
    let host = Host::start_with_config(Some(CONFIG));
    let api = &host.api;
    let red = api.create_universe("red", "10.42.0.0/24");
    let blue = api.create_universe("blue", "10.43.0.0/24");
    let r1 = endpoint(&host, id(&red), "10.42.0.10", &[], Some(true));
    let b1 = endpoint(&host, id(&blue), "10.43.0.10", &[], Some(true));
    let b2 = endpoint(&host, id(&blue), "10.43.0.20", &[], Some(true));
    assert!(ping_wait(&b1.ns, b2.ip, 2), "blue's default group admits its own members");
    wait_records(api, &b1.id, |rs| !rs.is_empty());

    let t = api.create_token(Role::Viewer, Some(id(&red)));
    let red_api = api.with_token(Some(&t.token));
    let r = red_api.get(&format!("/v1/flow-logs?endpoint={}", b1.id));
    assert_eq!(r.status, 404, "another universe's endpoint is not found: {}", r.body);
    assert_eq!(r.error_code(), "not_found");
    let r = red_api.get(&format!("/v1/flow-logs?endpoint={}", r1.id));
    assert_eq!(r.status, 200, "its own universe's: {}", r.body);
    let admin = records(api, &b1.id);
    assert!(!admin.is_empty() && admin.iter().all(|r| r["universe"] == id(&blue)), "{admin:#?}");

    for (query, field) in [
        ("", "endpoint"),
        ("?endpoint=ep-00000000&since=yesterday", "since"),
        ("?endpoint=ep-00000000&color=red", "color"),
        ("?endpoint=ep-00000000&limit=0", "limit"),
    ] {
        let r = api.get(&format!("/v1/flow-logs{query}"));
        assert_eq!(r.status, 400, "{query}: {}", r.body);
        assert!(r.error_message().starts_with(field), "{query}: {}", r.body);
    }
    let r = api.get("/v1/flow-logs?endpoint=ep-00000000");
    assert_eq!(r.status, 404, "{}", r.body);
}

/// The files rotate at `flow_log_rotate_bytes` and `flow_log_keep` rotated files are kept: many
/// records never take more than `rotate_bytes * (keep + 1)` on disk.
#[test]
fn flow_log_files_rotate_within_their_size_cap() {
    let config = format!("{CONFIG}flow_log_rotate_bytes = 4096\nflow_log_keep = 2\n");
    let host = Host::start_with_config(Some(&config));
    let api = &host.api;
    let uni = api.create_universe("rot", "10.44.0.0/24");
    let sg = api.create_group(id(&uni), "all");
    api.add_rule(id(&sg), &json!({"direction": "ingress", "protocol": "udp", "from_port": 1, "to_port": 65535, "group": id(&sg)}));
    let a = endpoint(&host, id(&uni), "10.44.0.10", &[id(&sg)], Some(true));
    let b = endpoint(&host, id(&uni), "10.44.0.20", &[id(&sg)], Some(true));
    let sock = a.ns.enter(|| UdpSocket::bind("10.44.0.10:0")).unwrap();
    // 40 flows, each a record for a (egress) and one for b (ingress): ~35 KB of records, in
    // 2 intervals.
    let dir = host.state_dir().join("flow-logs");
    for round in 0..2u16 {
        for port in 0..20u16 {
            sock.send_to(b"r", (b.ip, 9000 + round * 100 + port)).unwrap();
        }
        // The interval holding the round's last flow has been written.
        let last_port = 9000 + round * 100 + 19;
        let got = wait_records(api, &b.id, |rs| rs.iter().any(|r| r["dstport"] == last_port));
        assert!(got.iter().any(|r| r["dstport"] == last_port), "round {round}: {got:#?}");
    }
    let last: BTreeMap<String, u64> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (e.file_name().to_string_lossy().into_owned(), e.metadata().unwrap().len())
        })
        .collect();
    assert!(last.contains_key("flow-logs.jsonl.2"), "rotated at least twice: {last:?}");
    assert!(!last.contains_key("flow-logs.jsonl.3"), "two rotated files kept: {last:?}");
    for (name, len) in &last {
        assert!(*len <= 4096, "{name} is {len} bytes: {last:?}");
    }
    assert!(last.values().sum::<u64>() <= 3 * 4096, "{last:?}");
    // What is left reads back: the newest records, whole lines.
    let rs = records(api, &b.id);
    assert!(!rs.is_empty() && rs.iter().all(|r| r["endpoint"] == b.id.as_str()), "{rs:#?}");
}

/// Flow logs are turned on and off on a live endpoint (`PATCH /v1/endpoints/{id}` with
/// `flow_logs`, `verse endpoint update --flow-logs on|off`): on, its records start with the
/// next interval, REJECT records included although the daemon's verdict events are off
/// (`events = false`: the kernel reports drops while an endpoint has flow logs on, for them
/// only); off, no record of it is written from the interval in which it was turned off. The
/// edit is an endpoint edit: refused to a viewer, in the audit trail, strict about its body.
#[test]
fn flow_logs_turn_on_and_off_on_a_live_endpoint_with_rejects_while_events_are_off() {
    let host =
        Host::start_with_config(Some("[observability]\nflow_log_interval = 10\nevents = false\n"));
    let api = &host.api;
    let uni = api.create_universe("live", "10.44.0.0/24");
    let sg = api.create_group(id(&uni), "all");
    api.add_rule(id(&sg), &json!({"direction": "ingress", "protocol": "udp", "from_port": 7000, "to_port": 7000, "group": id(&sg)}));
    let a = endpoint(&host, id(&uni), "10.44.0.10", &[id(&sg)], None);
    let b = endpoint(&host, id(&uni), "10.44.0.20", &[id(&sg)], None);
    let _sink = b.ns.enter(|| UdpSocket::bind("10.44.0.20:7000")).unwrap();
    let _closed = a.ns.enter(|| UdpSocket::bind("10.44.0.10:7001")).unwrap();
    let from_a = a.ns.enter(|| UdpSocket::bind("10.44.0.10:7100")).unwrap();
    let from_b = b.ns.enter(|| UdpSocket::bind("10.44.0.20:7200")).unwrap();
    // a -> b:7000 is admitted (a's egress, b's ingress); b -> a:7001 is dropped by a's ingress
    // rules, a REJECT of a's.
    let traffic = || {
        for _ in 0..3 {
            from_a.send_to(b"admitted", (b.ip, 7000)).unwrap();
            from_b.send_to(b"denied", (a.ip, 7001)).unwrap();
        }
    };
    let path = format!("/v1/endpoints/{}", a.id);

    // The edit is strict and an editor's.
    for (body, field) in [
        (json!({}), "security_groups"),
        (json!({"flow_logs": "on"}), "flow_logs"),
        (json!({"flow_logs": true, "color": "red"}), "color"),
    ] {
        let r = api.patch(&path, &body);
        assert_eq!(r.status, 400, "{body}: {}", r.body);
        assert!(r.error_message().contains(field), "{body}: {}", r.body);
    }
    let t = api.create_token(Role::Viewer, Some(id(&uni)));
    let viewer = api.with_token(Some(&t.token));
    let r = viewer.patch(&path, &json!({"flow_logs": true}));
    assert_eq!(r.status, 403, "a viewer may not turn flow logs on: {}", r.body);

    // Off by default: traffic leaves no record.
    traffic();
    std::thread::sleep(Duration::from_secs(11));
    assert!(records(api, &a.id).is_empty(), "flow logs off: no records");

    // On, through the API: the groups are kept, and records come, REJECT ones included.
    let r = api.patch(&path, &json!({"flow_logs": true}));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["flow_logs"], true, "{}", r.body);
    assert_eq!(r.json()["security_groups"], json!([id(&sg)]), "{}", r.body);
    let trail = api.get("/v1/audit").json();
    assert!(
        trail
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e.to_string().contains("PATCH") && e.to_string().contains(&a.id)),
        "the edit is in the audit trail: {trail:#}"
    );
    traffic();
    let on = wait_records(api, &a.id, |rs| {
        rs.iter().any(|r| r["action"] == "ACCEPT") && rs.iter().any(|r| r["action"] == "REJECT")
    });
    let accept = on.iter().find(|r| r["action"] == "ACCEPT").unwrap_or_else(|| panic!("{on:#?}"));
    assert_eq!(
        (accept["flow_direction"].clone(), accept["dstport"].clone()),
        (json!("egress"), json!(7000))
    );
    let reject = on.iter().find(|r| r["action"] == "REJECT").unwrap_or_else(|| panic!("{on:#?}"));
    assert_eq!(reject["reason"], "policy_ingress", "{reject:#}");
    assert_eq!(reject["dstport"], 7001, "{reject:#}");
    assert_eq!(reject["flow_direction"], "ingress", "{reject:#}");
    // Events stay off for the monitor: the drops fed flow logs only.
    let r = api.get("/v1/events?recent=100&follow=false");
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(!r.body.contains("\"kind\":\"event\""), "events = false shows no event: {}", r.body);

    // Off, through the CLI: nothing more is written for it.
    let url = api.url();
    let cli = |args: &[&str]| {
        let mut all = vec!["--api", &url[..], "--token", api.token().unwrap(), "-o", "json"];
        all.extend_from_slice(args);
        let out = verse_cli(host.netns().name(), &all);
        assert!(out.status.success(), "verse {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<Value>(&out.stdout).expect("JSON")
    };
    let e = cli(&["endpoint", "update", &a.id, "--flow-logs", "off"]);
    assert_eq!(e["flow_logs"], false, "{e:#}");
    std::thread::sleep(Duration::from_secs(1));
    let before = records(api, &a.id).len();
    traffic();
    std::thread::sleep(Duration::from_secs(12));
    traffic();
    std::thread::sleep(Duration::from_secs(11));
    assert_eq!(records(api, &a.id).len(), before, "flow logs off: two intervals, no record");

    // On again, through the CLI: records start again.
    let e = cli(&["endpoint", "update", &a.id, "--flow-logs", "on"]);
    assert_eq!(e["flow_logs"], true, "{e:#}");
    traffic();
    let again = wait_records(api, &a.id, |rs| rs.len() > before);
    assert!(again.len() > before, "on again: records again: {again:#?}");
    let out = verse_cli(host.netns().name(), &["endpoint", "update", &a.id]);
    assert!(!out.status.success(), "an update that changes nothing is refused by the CLI");
}
