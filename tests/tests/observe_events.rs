//! Why was my packet dropped? (README): verdict events out of the kernel through `verse monitor`
//! (`GET /v1/events`), per-rule hit counters (`verse rule list --stats`, the group view,
//! `/metrics`) and drops per (reason, hook) with bytes, on a real daemon with real traffic.
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use tests::*;

fn id(v: &Value) -> &str {
    v["id"].as_str().expect("resource has an id")
}

/// `verse ARGS` in the host's namespace, through HTTP with the API's token.
fn verse_cmd(host: &Host, args: &[&str]) -> Command {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", host.netns().name()]).arg(bin_dir().join("verse"));
    for var in ["VERSE_API", "VERSE_TOKEN", "VERSE_CONTEXT", "VERSE_CONFIG"] {
        cmd.env_remove(var);
    }
    cmd.arg("--api").arg(host.api.url());
    if let Some(t) = host.api.token() {
        cmd.env("VERSE_TOKEN", t);
    }
    cmd.args(args);
    cmd
}

fn verse(host: &Host, args: &[&str]) -> Output {
    let out = verse_cmd(host, args).output().expect("run verse");
    assert!(
        out.status.success(),
        "verse {args:?}: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A running `verse monitor -o json`: its lines, as they come.
struct Monitor {
    child: Child,
    lines: mpsc::Receiver<Value>,
}

impl Monitor {
    fn start(host: &Host, filters: &[&str]) -> Monitor {
        let mut args = vec!["-o", "json", "monitor"];
        args.extend(filters);
        let mut cmd = verse_cmd(host, &args);
        cmd.stdout(Stdio::piped()).stderr(Stdio::inherit());
        die_with_parent(&mut cmd);
        let mut child = cmd.spawn().expect("start verse monitor");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                let v: Value = serde_json::from_str(&line)
                    .unwrap_or_else(|e| panic!("verse monitor printed {line:?}: {e}"));
                if tx.send(v).is_err() {
                    return;
                }
            }
        });
        Monitor { child, lines }
    }

    /// The first event that `want` accepts within `timeout`; every line seen is returned too.
    fn wait_for(
        &self,
        timeout: Duration,
        want: impl Fn(&Value) -> bool,
    ) -> (Option<Value>, Vec<Value>) {
        let end = Instant::now() + timeout;
        let mut seen = Vec::new();
        while let Some(left) = end.checked_duration_since(Instant::now()) {
            match self.lines.recv_timeout(left) {
                Ok(v) if want(&v) => return (Some(v), seen),
                Ok(v) => seen.push(v),
                Err(_) => break,
            }
        }
        (None, seen)
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The value of the `/metrics` sample whose name and labels are exactly `sample`.
fn sample(metrics: &str, sample: &str) -> Option<u64> {
    metrics.lines().find_map(|l| {
        let (name, value) = l.rsplit_once(' ')?;
        (name == sample).then(|| value.parse::<f64>().ok().map(|v| v as u64)).flatten()
    })
}

/// A policy drop names what was searched, a new flow names the rules that admitted it, both
/// live through `verse monitor` (HTTP, following) and after the fact (`--recent`, on the local
/// socket); the rule's new flows are counted in the group view, `verse rule list --stats` and
/// `/metrics`, a rule that never matched shows 0; drops are counted per reason and hook with
/// their bytes. The same over IPv6 (the events carry IPv6 addresses; the rules admit IPv6 by
/// group and by IPv6 CIDR).
#[test]
fn a_drop_names_the_groups_searched_and_a_new_flow_names_its_rules() {
    drop_and_new_flow_events(Family::V4);
}

#[test]
fn a_drop_names_the_groups_searched_and_a_new_flow_names_its_rules_over_ipv6() {
    drop_and_new_flow_events(Family::V6);
}

fn drop_and_new_flow_events(family: Family) {
    let host = Host::start();
    let api = &host.api;
    let uni = api.create_dual_universe("obs", "10.30.0.0/24");
    let web = api.create_group(id(&uni), "web");
    let db = api.create_group(id(&uni), "db");
    let pg = api.add_rule(
        id(&db),
        &json!({"direction": "ingress", "protocol": "tcp", "from_port": 5432, "to_port": 5432, "group": id(&web)}),
    );
    let dns = api.add_rule(
        id(&db),
        &json!({"direction": "ingress", "protocol": "udp", "from_port": 53, "to_port": 53, "cidr": family.text("10.99.0.0/16")}),
    );
    let a = host.dual_endpoint(id(&uni), "10.30.0.10", &[id(&web)]);
    let b = host.dual_endpoint(id(&uni), "10.30.0.20", &[id(&db)]);
    let (a_ip, b_ip) = (family.addr(&a), family.addr(&b));
    let _pg = TcpServer::start_on(&b.ns, b_ip, 5432, "db");
    let _other = TcpServer::start_on(&b.ns, b_ip, 8080, "db");

    // The stream starts with the recent events, then follows the live ones (the daemon
    // subscribes before it reads its history): an event written before the daemon has the
    // request, however late that is on a loaded machine, is shown all the same.
    let monitor = Monitor::start(&host, &["--universe", id(&uni), "--recent", "100"]);
    let before = api.metrics();

    // Denied: nothing admits tcp/8080 into db.
    assert!(!tcp_connect(&a.ns, b_ip, 8080, DENIED), "db admits nothing on 8080");
    let (drop, seen) = monitor.wait_for(Duration::from_secs(10), |v| {
        v["kind"] == "event" && v["verdict"] == "dropped" && v["dport"] == 8080
    });
    let drop = drop.unwrap_or_else(|| panic!("no drop event for tcp/8080; saw {seen:#?}"));
    assert_eq!(drop["reason"], "policy_ingress", "{drop:#}");
    assert_eq!(drop["hook"], "from_endpoint", "{drop:#}");
    assert_eq!(drop["universe"], id(&uni));
    assert_eq!(drop["endpoint"], a.id.as_str(), "the local endpoint judged: the sender");
    assert_eq!(drop["src_endpoint"], a.id.as_str());
    assert_eq!(drop["dst_endpoint"], b.id.as_str());
    assert_eq!(drop["src"], a_ip.to_string(), "{drop:#}");
    assert_eq!(drop["dst"], b_ip.to_string(), "{drop:#}");
    assert_eq!(drop["protocol"], "tcp");
    assert_eq!(drop["searched"]["direction"], "ingress");
    assert_eq!(drop["searched"]["endpoint"], b.id.as_str());
    assert_eq!(drop["searched"]["groups"], json!([id(&db)]));
    let message = drop["message"].as_str().unwrap();
    assert!(
        message.starts_with(&format!(
            "no ingress rule of groups {} (db) admits tcp/8080 from {a_ip} (identity ",
            id(&db)
        )),
        "{message}"
    );
    assert!(drop["bytes"].as_u64().unwrap() >= 54, "{drop:#}");

    // Admitted by the 5432 rule (ingress) and web's default egress rule.
    assert_eq!(tcp_roundtrip(&a.ns, b_ip, 5432, "q", ALLOWED).as_deref(), Some("db:q"));
    let (flow, seen) = monitor.wait_for(Duration::from_secs(10), |v| {
        v["kind"] == "event" && v["verdict"] == "admitted" && v["dport"] == 5432
    });
    let flow = flow.unwrap_or_else(|| panic!("no new-flow event for tcp/5432; saw {seen:#?}"));
    let rules = flow["rules"].as_array().expect("an admitted flow names its rules");
    let ingress = rules.iter().find(|r| r["direction"] == "ingress").expect("the ingress rule");
    assert_eq!(ingress["id"], id(&pg));
    assert_eq!(ingress["group"], id(&db));
    assert_eq!(ingress["group_name"], "db");
    let egress = rules.iter().find(|r| r["direction"] == "egress").expect("the egress rule");
    assert_eq!(egress["group"], id(&web), "S2: web's egress rule admitted it");
    assert!(flow.get("reason").is_none(), "{flow:#}");
    assert_eq!((&flow["src"], &flow["dst"]), (&json!(a_ip), &json!(b_ip)), "{flow:#}");
    assert_eq!(flow["dst_endpoint"], b.id.as_str(), "{flow:#}");
    assert!(flow["message"].as_str().unwrap().contains(id(&pg)), "{flow:#}");
    std::mem::drop(monitor);

    // After the fact, on the local socket (root): the same events, newest last.
    let recent = Command::new(bin_dir().join("verse"))
        .env_remove("VERSE_TOKEN")
        .args(["--api", &format!("unix:{}", host.versed.socket().display())])
        .args(["-o", "json", "monitor", "--recent", "50", "--no-follow", "--verdict", "dropped"])
        .args(["--port", "8080"])
        .output()
        .expect("run verse");
    assert!(recent.status.success(), "{}", String::from_utf8_lossy(&recent.stderr));
    let lines: Vec<Value> = String::from_utf8_lossy(&recent.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert!(!lines.is_empty(), "the recent drop is kept");
    assert!(lines.iter().all(|v| v["verdict"] == "dropped" && v["dport"] == 8080), "{lines:#?}");

    // Per-rule counters: the 5432 rule admitted one flow, the udp/53 rule none.
    let view = api.get(&format!("/v1/security-groups/{}", id(&db))).json();
    let hits = |rule: &str| {
        view["ingress"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["id"] == rule)
            .unwrap_or_else(|| panic!("{rule} in {view:#}"))["hits"]["flows"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(hits(id(&pg)), 1, "{view:#}");
    assert_eq!(hits(id(&dns)), 0, "a rule that never matched shows 0");
    assert_eq!(view["hits_from"]["hosts"], json!([host.name()]));
    assert_eq!(view["hits_from"]["missing"], json!([]));

    let listed = verse(&host, &["rule", "list", id(&db), "--stats"]);
    let text = String::from_utf8_lossy(&listed.stdout);
    let row = |rule: &str| {
        text.lines()
            .find(|l| l.starts_with(rule))
            .unwrap_or_else(|| panic!("{rule} in\n{text}"))
            .to_owned()
    };
    assert!(row(id(&pg)).split_whitespace().any(|c| c == "1"), "{text}");
    assert!(row(id(&dns)).contains("never matched"), "{text}");

    let metrics = api.metrics();
    let rule_sample = |rule: &str| {
        format!(
            "verse_rule_hits_total{{universe=\"{}\",group=\"{}\",rule=\"{rule}\"}}",
            id(&uni),
            id(&db)
        )
    };
    assert_eq!(sample(&metrics, &rule_sample(id(&pg))), Some(1), "{metrics}");
    assert_eq!(sample(&metrics, &rule_sample(id(&dns))), Some(0), "{metrics}");

    // Drops per (reason, hook), with bytes: the refused SYN (and its retries) at from_endpoint.
    let labels = "{reason=\"policy_ingress\",hook=\"from_endpoint\"}";
    let packets = |m: &str| sample(m, &format!("verse_drops_total{labels}")).unwrap_or(0);
    let bytes = |m: &str| sample(m, &format!("verse_drop_bytes_total{labels}")).unwrap_or(0);
    let n = packets(&metrics) - packets(&before);
    assert!(n >= 1, "{metrics}");
    assert!(bytes(&metrics) - bytes(&before) >= 54 * n, "each SYN is at least 54 bytes: {metrics}");
    let under = "{reason=\"policy_ingress\",hook=\"from_underlay\"}";
    assert_eq!(sample(&metrics, &format!("verse_drops_total{under}")), Some(0), "{metrics}");
    assert!(
        sample(&metrics, "verse_events_total{kind=\"drop\",outcome=\"emitted\"}").unwrap_or(0) >= 1,
        "{metrics}"
    );
}

/// A frame dropped before it is judged by its family's program (here a forged source MAC:
/// `spoofed_mac` at from_endpoint, which decides before it hands IPv6 on) is reported with its
/// addresses, its universe, its sender and the endpoint its destination routes to; over IPv4
/// with its protocol and ports, over IPv6 without (README, "Why was my packet dropped?").
#[test]
fn a_frame_with_a_forged_mac_is_reported_with_its_addresses() {
    forged_mac_event(Family::V4);
}

#[test]
fn a_frame_with_a_forged_mac_is_reported_with_its_addresses_over_ipv6() {
    forged_mac_event(Family::V6);
}

fn forged_mac_event(family: Family) {
    let host = Host::start();
    let api = &host.api;
    let uni = api.create_dual_universe("forged", "10.31.0.0/24");
    let a = host.dual_endpoint(id(&uni), "10.31.0.10", &[]);
    let b = host.dual_endpoint(id(&uni), "10.31.0.20", &[]);
    let (a_ip, b_ip) = (family.addr(&a), family.addr(&b));
    let receiver = b.ns.enter(|| std::net::UdpSocket::bind((b_ip, 7)).expect("bind b:7"));
    receiver.set_read_timeout(Some(DENIED)).expect("timeout");

    let monitor =
        Monitor::start(&host, &["--universe", id(&uni), "--verdict", "dropped", "--recent", "100"]);
    let before = host.drops("spoofed_mac");
    let forged = [0x02, 0x66, 0x6f, 0x72, 0x67, 0x65];
    let frame = frames::udp_frame((mac_bytes(&b.mac), forged), (a_ip, b_ip), (4000, 7), b"forged");
    send_frame(&a.ns, "eth0", &frame).expect("send the forged frame from A");

    let (event, seen) = monitor.wait_for(Duration::from_secs(10), |v| {
        v["kind"] == "event" && v["reason"] == "spoofed_mac" && v["src"] == a_ip.to_string()
    });
    let event = event.unwrap_or_else(|| {
        panic!(
            "no spoofed_mac event from {a_ip} (drops {before} -> {}); saw {seen:#?}",
            host.drops("spoofed_mac")
        )
    });
    assert_eq!(event["hook"], "from_endpoint", "{event:#}");
    assert_eq!(event["dst"], b_ip.to_string(), "{event:#}");
    assert_eq!(event["universe"], id(&uni), "{event:#}");
    assert_eq!(event["endpoint"], a.id.as_str(), "the endpoint behind the interface: {event:#}");
    assert_eq!(event["dst_endpoint"], b.id.as_str(), "its destination's route: {event:#}");
    match family {
        Family::V4 => {
            assert_eq!(event["protocol"], "udp", "{event:#}");
            assert_eq!(event["dport"], 7, "{event:#}");
        }
        Family::V6 => {
            assert!(event["protocol"].is_null(), "not walked before IPv6 is handed on: {event:#}");
        }
    }
    let mut buf = [0u8; 64];
    assert!(receiver.recv_from(&mut buf).is_err(), "the forged datagram reached B");
    assert!(host.drops("spoofed_mac") > before, "spoofed_mac did not move");
}

/// Across hosts each host reports its part of one new flow: the sender's host at from_endpoint
/// (the egress rule admitted it, the receiving host named), the receiver's host at
/// from_underlay (the ingress rule admitted it, the sending host and the remote sender
/// named). The same over IPv6.
#[test]
fn across_hosts_each_host_reports_its_part_of_a_new_flow() {
    new_flow_across_hosts(Family::V4);
}

#[test]
fn across_hosts_each_host_reports_its_part_of_a_new_flow_over_ipv6() {
    new_flow_across_hosts(Family::V6);
}

fn new_flow_across_hosts(family: Family) {
    let fleet = Fleet::start(2);
    let api = fleet.api(0);
    let uni = api.create_dual_universe("across", "10.32.0.0/24");
    let web = api.create_group(id(&uni), "web");
    let db = api.create_group(id(&uni), "db");
    let pg = api.add_rule(
        id(&db),
        &json!({"direction": "ingress", "protocol": "tcp", "from_port": 5432, "to_port": 5432, "group": id(&web)}),
    );
    let dual = |on, ip: &str, groups: &[&str]| {
        fleet.endpoint6(on, id(&uni), (ip, &Family::V6.text(ip)), groups)
    };
    let a = dual(0, "10.32.0.10", &[id(&web)]);
    let b = dual(1, "10.32.0.20", &[id(&db)]);
    let (a_ip, b_ip) = (family.addr(&a), family.addr(&b));
    let _pg = TcpServer::start_on(&b.ns, b_ip, 5432, "db");
    assert_eq!(tcp_roundtrip(&a.ns, b_ip, 5432, "q", ALLOWED).as_deref(), Some("db:q"));

    // Each host's own events (`host=`), read after the fact until the flow's is there.
    let admitted_on = |i: usize| {
        let host = fleet.host(i).name();
        let query =
            format!("/v1/events?recent=1000&follow=false&verdict=admitted&port=5432&host={host}");
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            let r = fleet.api(i).get(&query);
            assert_eq!(r.status, 200, "{}", r.body);
            let found = r
                .body
                .lines()
                .map(|l| serde_json::from_str::<Value>(l).expect("a JSON line"))
                .find(|v| v["kind"] == "event" && v["src"] == a_ip.to_string());
            match found {
                Some(v) => return v,
                None if Instant::now() < end => std::thread::sleep(Duration::from_millis(200)),
                None => panic!("{host} reported no new flow from {a_ip}: {}", r.body),
            }
        }
    };
    let rule_of = |e: &Value, direction: &str| -> Value {
        let rules = e["rules"].as_array().unwrap_or_else(|| panic!("no rules: {e:#}"));
        let r = rules.iter().find(|r| r["direction"] == direction);
        r.unwrap_or_else(|| panic!("no {direction} rule: {e:#}")).clone()
    };

    let sent = admitted_on(0);
    assert_eq!(sent["hook"], "from_endpoint", "{sent:#}");
    assert_eq!(sent["endpoint"], a.id.as_str(), "the sender is the local endpoint: {sent:#}");
    assert_eq!((&sent["dst"], &sent["dst_endpoint"]), (&json!(b_ip), &json!(b.id)), "{sent:#}");
    assert_eq!(rule_of(&sent, "egress")["group"], id(&web), "{sent:#}");
    assert_eq!(sent["peer_host"], fleet.host(1).name(), "the receiving host: {sent:#}");

    let received = admitted_on(1);
    assert_eq!(received["hook"], "from_underlay", "{received:#}");
    assert_eq!(received["universe"], id(&uni), "{received:#}");
    assert_eq!(received["endpoint"], b.id.as_str(), "the receiver is the local one: {received:#}");
    assert_eq!(received["src_endpoint"], a.id.as_str(), "the remote sender: {received:#}");
    assert_eq!(received["dst"], b_ip.to_string(), "{received:#}");
    assert_eq!(received["protocol"], "tcp", "{received:#}");
    assert_eq!(rule_of(&received, "ingress")["id"], id(&pg), "{received:#}");
    assert_eq!(received["peer_host"], fleet.host(0).name(), "the sending host: {received:#}");
    assert!(received["bytes"].as_u64().unwrap() > 50, "the wrapped frame's length: {received:#}");
}

/// The per-CPU token bucket: a flood of denied packets beyond the burst is counted
/// `suppressed`, not reported one by one, and the API answers meanwhile.
#[test]
fn a_flood_of_drops_is_suppressed_beyond_the_burst_and_counted() {
    let config = "[observability]\nevent_rate = 10\nevent_burst = 20\n";
    let host = Host::start_with_config(Some(config));
    let api = &host.api;
    let uni = api.create_universe("flood", "10.31.0.0/24");
    let web = api.create_group(id(&uni), "web");
    let a = host.endpoint(id(&uni), "10.31.0.10", &[id(&web)]);
    let b = host.endpoint(id(&uni), "10.31.0.20", &[id(&web)]);
    // 300 denied pings (no ingress rule in a new group), as fast as ping sends them.
    let start = Instant::now();
    let out = a.ns.exec("ping", &["-c", "300", "-i", "0.002", "-W", "1", "-q", &b.ip.to_string()]);
    let secs = start.elapsed().as_secs() + 1;
    assert!(!out.status.success(), "every ping is refused");
    // Each CPU reports its burst and then 10 a second at most.
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
    let bound = cpus * (20 + 10 * secs);
    assert!(bound < 300, "the machine was too slow for this test to mean anything: {secs} s");
    let counted = wait_until(Duration::from_secs(5), || {
        let m = api.metrics();
        let emitted =
            sample(&m, "verse_events_total{kind=\"drop\",outcome=\"emitted\"}").unwrap_or(0);
        let suppressed =
            sample(&m, "verse_events_total{kind=\"drop\",outcome=\"suppressed\"}").unwrap_or(0);
        emitted + suppressed == 300 && (20..=bound).contains(&emitted)
    });
    assert!(counted, "at most {bound} of 300 reported:\n{}", api.metrics());
    let lines = Command::new(bin_dir().join("verse"))
        .env_remove("VERSE_TOKEN")
        .args(["--api", &format!("unix:{}", host.versed.socket().display())])
        .args(["-o", "json", "monitor", "--recent", "1000", "--no-follow"])
        .output()
        .expect("run verse");
    let text = String::from_utf8_lossy(&lines.stdout);
    let events = text.lines().filter(|l| l.contains("\"kind\":\"event\"")).count() as u64;
    assert!(
        (20..=bound).contains(&events),
        "the bursts and a few more are reported: {events}\n{text}"
    );
    assert!(
        text.lines().any(
            |l| l.contains("\"kind\":\"notice\"") && l.contains("suppressed by the rate limit")
        ),
        "a notice says how many were suppressed:\n{text}"
    );
}
