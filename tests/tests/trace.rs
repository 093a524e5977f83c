//! `verse trace` on a real versed (README, "Why was my packet dropped?"): the walk names the
//! deciding rule or what was searched, sees live flows, and agrees with the reference model and
//! with the kernel program (`run`, BPF_PROG_TEST_RUN) — on hand-made policies and on random
//! ones. A run opens no hole: it creates no live conntrack entry and moves no live counter.

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tests::*;

/// `GET /v1/trace?...` with `run=true`, asserting 200.
fn trace(api: &Api, from: &str, to: &str, protocol: &str, extra: &str) -> Value {
    let path = format!("/v1/trace?from={from}&to={to}&protocol={protocol}&run=true{extra}");
    let r = api.get(&path);
    assert_eq!(r.status, 200, "GET {path}: {}", r.body);
    r.json()
}

/// The walk's verdict, the model's and the kernel's, as `action` or `action (reason)`.
fn verdicts(t: &Value) -> (String, String, String) {
    let d = |v: &Value| match v["reason"].as_str() {
        Some(r) => format!("{} ({r})", v["action"].as_str().unwrap_or("?")),
        None => v["action"].as_str().unwrap_or("?").to_owned(),
    };
    (d(&t["verdict"]), d(&t["model"]), d(&t["kernel"]))
}

fn assert_agree(t: &Value, want: &str) {
    let (walk, model, kernel) = verdicts(t);
    assert_eq!(walk, want, "the walk: {t:#}");
    assert_eq!(model, want, "the reference model: {t:#}");
    assert_eq!(kernel, want, "the kernel: {t:#}");
    assert_eq!(t["maps_match"], true, "{t:#}");
}

fn step<'a>(t: &'a Value, check: &str) -> &'a Value {
    t["steps"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["check"] == check))
        .unwrap_or_else(|| panic!("no {check} step in {t:#}"))
}

/// The live conntrack entries, and the drop counters, rule hit counters and verdict events of
/// the daemon's `/metrics` (read after the second its event counts take to be refreshed).
fn live(host: &Host) -> (usize, BTreeMap<String, u64>, Vec<String>) {
    // Both conntrack tables, IPv4's and IPv6's.
    let entries: usize = ["VERSE_CT", "VERSE_CT6"]
        .iter()
        .map(|map| {
            let dump = Command::new("bpftool")
                .args(["-j", "map", "dump", "pinned"])
                .arg(host.bpf_dir().join(map))
                .output()
                .expect("bpftool runs");
            let entries: Value =
                serde_json::from_slice(&dump.stdout).unwrap_or(Value::Array(Vec::new()));
            entries.as_array().map_or(0, Vec::len)
        })
        .sum();
    std::thread::sleep(Duration::from_millis(1500));
    // Sorted: /metrics lists the samples of a family in no set order.
    let mut counters: Vec<String> = host
        .api
        .metrics()
        .lines()
        .filter(|l| l.starts_with("verse_rule_hits_total") || l.starts_with("verse_events_total"))
        .map(str::to_owned)
        .collect();
    counters.sort();
    assert!(
        counters.iter().any(|l| l.starts_with("verse_events_total")),
        "no event counts in /metrics"
    );
    (entries, host.drop_counts(), counters)
}

/// [`live`] once it holds still: a dual-stack workload's own IPv6 chatter after its interface
/// comes up (multicast listener reports from its link-local address, dropped as
/// `mld_unanswered`) goes on for a few seconds, and is no trace run's doing.
fn settled(host: &Host) -> (usize, BTreeMap<String, u64>, Vec<String>) {
    let mut last = live(host);
    for _ in 0..20 {
        let now = live(host);
        if now == last {
            return now;
        }
        last = now;
    }
    panic!("the live counters never held still: {last:?}");
}

/// The universe both tests trace in: `web` may reach `db` on TCP/5432 (`rule`, an ingress rule
/// of `db` naming `web`).
struct Shop {
    uni: String,
    web: String,
    db: String,
    rule: String,
}

fn shop(api: &Api) -> Shop {
    let id = |v: Value| v["id"].as_str().unwrap().to_owned();
    let uni = id(api.create_dual_universe("shop", "10.7.0.0/16"));
    let web = id(api.create_group(&uni, "web"));
    let db = id(api.create_group(&uni, "db"));
    let rule = id(api.add_rule(
        &db,
        &json!({"direction": "ingress", "protocol": "tcp", "from_port": 5432, "to_port": 5432, "group": web}),
    ));
    Shop { uni, web, db, rule }
}

/// The address of the family a trace asks for: the trace of an IPv6 address is IPv6's.
fn addr_of(family: Family, w: &Workload) -> String {
    family.addr(w).to_string()
}

/// ICMP of the family, and its echo request's type.
fn icmp_of(family: Family) -> (&'static str, u8) {
    match family {
        Family::V4 => ("icmp", 8),
        Family::V6 => ("icmpv6", 128),
    }
}

#[test]
fn trace_names_the_deciding_rule_or_what_was_searched_and_agrees_with_model_and_kernel() {
    trace_on_one_host(Family::V4);
}

#[test]
fn trace_names_the_deciding_rule_or_what_was_searched_and_agrees_with_model_and_kernel_over_ipv6() {
    trace_on_one_host(Family::V6);
}

fn trace_on_one_host(family: Family) {
    let host = Host::start();
    let api = &host.api;
    let Shop { uni, web, db, rule } = shop(api);
    let w = host.dual_endpoint(&uni, "10.7.0.2", &[&web]);
    let d = host.dual_endpoint(&uni, "10.7.0.3", &[&db]);
    let other = host.dual_endpoint(&uni, "10.7.0.4", &[]);
    let _server = TcpServer::start_on(&d.ns, family.addr(&d), 5432, "db");
    // The receiver by an address of the family: that family is traced.
    let to_d = addr_of(family, &d);

    // Admitted: the egress rule of web (S2's egress-to-all) and db's ingress rule are named.
    let before = settled(&host);
    let t = trace(api, &w.id, &to_d, "tcp", "&port=5432");
    assert_agree(&t, "deliver");
    let rules: Vec<&str> = t["verdict"]["rules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["rule"].as_str().unwrap())
        .collect();
    assert_eq!(rules.len(), 2, "{t:#}");
    assert_eq!(rules[1], rule, "{t:#}");
    assert_eq!(step(&t, "ingress")["rule"]["group"], db.as_str());
    assert_eq!(step(&t, "anti_spoofing")["outcome"], "pass");
    assert_eq!(step(&t, "route")["outcome"], "pass");
    // The run opened no flow and counted nothing live.
    assert_eq!(live(&host), before, "a trace run changed the live conntrack table or counters");

    // Denied: the endpoint without web's membership; the walk says what it searched.
    let t = trace(api, &other.id, &to_d, "tcp", "&port=5432");
    assert_agree(&t, "drop (policy_ingress)");
    let ingress = step(&t, "ingress");
    let detail = ingress["detail"].as_str().unwrap();
    assert!(
        detail.contains(&format!("no ingress rule of groups {db} (db) of {}", d.id)),
        "{detail}"
    );
    let from_other = format!("admits tcp/5432 from {} (identity ", family.addr(&other));
    assert!(detail.contains(&from_other), "{detail}");
    assert_eq!(ingress["searched"], json!([db]));
    // The real packet is dropped for that reason too.
    assert_dropped(&host, "policy_ingress", "other -> db:5432", || {
        tcp_connect(&other.ns, family.addr(&d), 5432, Duration::from_millis(500))
    });
    assert_eq!(live(&host).0, before.0, "a trace run created a live flow");

    // No route, and a port nobody admits.
    let t = trace(api, &w.id, &family.text("10.7.0.99"), "udp", "&port=53");
    assert_agree(&t, "drop (no_route)");
    let t = trace(api, &w.id, &to_d, "tcp", "&port=5433");
    assert_agree(&t, "drop (policy_ingress)");

    // A live flow: a real connection from web to db; its source port passes as part of it, even
    // after db's rule is gone (S8), while a new flow is refused.
    let mut conn = TcpConn::open(&w.ns, family.addr(&d), 5432, Duration::from_secs(3))
        .expect("web reaches db");
    assert!(conn.exchange("hello", Duration::from_secs(3)).is_ok());
    let sport = conn.local_port();
    api.delete_rule(&db, &rule);
    let t = trace(api, &w.id, &to_d, "tcp", &format!("&port=5432&sport={sport}"));
    assert_eq!(step(&t, "conntrack")["outcome"], "accept", "{t:#}");
    // A SYN in a live flow: the model and the kernel agree that it passes.
    assert_agree(&t, "deliver");
    let t = trace(api, &w.id, &to_d, "tcp", "&port=5432");
    assert_agree(&t, "drop (policy_ingress)");
    let ct = step(&t, "conntrack")["detail"].as_str().unwrap().to_owned();
    let (from, to) = (
        std::net::SocketAddr::new(family.addr(&w), sport),
        std::net::SocketAddr::new(family.addr(&d), 5432),
    );
    assert!(ct.contains(&format!("{from} -> {to}")), "the live flow is listed: {ct}");

    // ICMP: db has no rule for it.
    let (icmp, echo) = icmp_of(family);
    let t = trace(api, &w.id, &to_d, icmp, &format!("&icmp_type={echo}&icmp_code=0"));
    assert_agree(&t, "drop (policy_ingress)");
    let detail = step(&t, "ingress")["detail"].as_str().unwrap().to_owned();
    assert!(detail.contains(&format!("{icmp} type {echo} code 0")), "{detail}");

    // The CLI prints the walk; -o json carries the hops.
    let (ok, text, err) = cli_trace(&host, api.token().unwrap(), &to_db(&other.id, &to_d));
    assert!(ok, "{text} {err}");
    assert!(text.contains("drop (policy_ingress)"), "{text}");
    assert!(text.contains("reference model: drop (policy_ingress)"), "{text}");
    assert!(
        text.contains("kernel (from_endpoint, BPF_PROG_TEST_RUN): drop (policy_ingress)"),
        "{text}"
    );
    drop(conn);
}

/// Bad requests name the field; the sender must be an endpoint.
#[test]
fn trace_requests_are_checked() {
    let host = Host::start();
    let api = &host.api;
    let uni = api.create_universe("u", "10.8.0.0/16")["id"].as_str().unwrap().to_owned();
    let a = host.endpoint(&uni, "10.8.0.2", &[]);
    for (query, status, field) in [
        (format!("from={}&to=10.8.0.3&protocol=tcp", a.id), 400, "port"),
        (format!("from={}&to=10.8.0.3&protocol=gre", a.id), 400, "protocol"),
        (format!("from={}&to=10.8.0.3&protocol=icmp&port=1", a.id), 400, "port"),
        (format!("from={}&to=nowhere&protocol=icmp", a.id), 400, "to"),
        ("from=ep-00000000&to=10.8.0.3&protocol=icmp".to_owned(), 404, "from"),
        ("from=10.8.0.9&to=10.8.0.3&protocol=icmp".to_owned(), 400, "universe"),
        (format!("from=10.8.0.9&to={}&protocol=icmp", a.id), 409, "from"),
        (format!("from={}&to=10.8.0.3&protocol=icmp&colour=red", a.id), 400, "colour"),
    ] {
        let r = api.get(&format!("/v1/trace?{query}"));
        assert_eq!(r.status, status, "{query}: {}", r.body);
        assert!(r.error_message().starts_with(field), "{query}: {}", r.body);
    }
}

/// Random universes, groups, rules and endpoints on one host; random packets between them. For
/// every packet the walk (`GET /v1/trace`), the reference model and the kernel program give the
/// same verdict and reason.
#[test]
fn on_random_policies_trace_model_and_kernel_agree() {
    let seed: u64 =
        std::env::var("VERSE_TRACE_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x7472_6163);
    eprintln!("seed {seed} (VERSE_TRACE_SEED)");
    let mut rng = StdRng::seed_from_u64(seed);
    let host = Host::start();
    let api = &host.api;
    let uni = api.create_universe("rand", "10.9.0.0/16")["id"].as_str().unwrap().to_owned();
    let groups: Vec<String> = (0..4)
        .map(|i| api.create_group(&uni, &format!("g{i}"))["id"].as_str().unwrap().to_owned())
        .collect();
    let protocols = ["tcp", "udp", "icmp", "all"];
    let cidrs =
        ["10.9.0.0/16", "10.9.0.0/24", "10.9.0.4/30", "10.9.0.7/32", "0.0.0.0/0", "192.168.0.0/16"];
    for (i, g) in groups.iter().enumerate() {
        // Some groups lose their egress-to-all (the first two always).
        if i < 2 || rng.random_bool(0.5) {
            api.clear_egress(g);
        }
        for _ in 0..rng.random_range(0..5) {
            let dir = if rng.random_bool(0.5) { "ingress" } else { "egress" };
            let proto = protocols[rng.random_range(0..protocols.len())];
            let mut rule = json!({"direction": dir, "protocol": proto});
            match proto {
                "tcp" | "udp" => {
                    let lo: u16 = rng.random_range(1..40);
                    rule["from_port"] = json!(lo);
                    rule["to_port"] = json!(lo + rng.random_range(0..10));
                }
                "icmp" if rng.random_bool(0.5) => {
                    rule["icmp_type"] = json!(if rng.random_bool(0.5) { 8 } else { 3 });
                    rule["icmp_code"] = json!(-1);
                }
                _ => {}
            }
            if rng.random_bool(0.4) {
                rule["group"] = json!(groups[rng.random_range(0..groups.len())]);
            } else {
                rule["cidr"] = json!(cidrs[rng.random_range(0..cidrs.len())]);
            }
            let r = api.post(&format!("/v1/security-groups/{g}/rules"), &rule);
            // A duplicate rule is refused (409); any other answer is a failure.
            assert!(r.status == 201 || r.status == 409, "{rule}: {}", r.body);
        }
    }
    let mut eps = Vec::new();
    for i in 0..5 {
        let n = rng.random_range(0..3);
        let mine: Vec<&str> = (0..n)
            .map(|_| groups[rng.random_range(0..groups.len())].as_str())
            .collect::<std::collections::BTreeSet<_>>()
            .into_iter()
            .collect();
        let ip = format!("10.9.0.{}", 4 + i);
        eps.push(if mine.is_empty() {
            host.endpoint(&uni, &ip, &[])
        } else {
            host.endpoint(&uni, &ip, &mine)
        });
    }
    let mut seen = BTreeMap::<String, u32>::new();
    let before = live(&host);
    for _ in 0..60 {
        let from = &eps[rng.random_range(0..eps.len())];
        let to: String = if rng.random_bool(0.1) {
            "10.9.1.1".into()
        } else {
            let e = &eps[rng.random_range(0..eps.len())];
            if rng.random_bool(0.5) {
                e.id.clone()
            } else {
                e.ip.to_string()
            }
        };
        let (proto, extra) = match rng.random_range(0..3) {
            0 => ("tcp", format!("&port={}", rng.random_range(1..50))),
            1 => ("udp", format!("&port={}", rng.random_range(1..50))),
            _ => ("icmp", format!("&icmp_type={}", [8, 3, 0][rng.random_range(0..3)])),
        };
        let t = trace(api, &from.id, &to, proto, &extra);
        let (walk, model, kernel) = verdicts(&t);
        assert_eq!(
            walk,
            model,
            "walk and model differ on {from:?} -> {to} {proto}{extra}: {t:#}",
            from = from.id
        );
        assert_eq!(
            walk, kernel,
            "walk and kernel differ on {} -> {to} {proto}{extra}: {t:#}",
            from.id
        );
        *seen.entry(walk).or_default() += 1;
    }
    assert_eq!(live(&host).0, before.0, "trace runs created live flows");
    eprintln!("verdicts: {seen:?}");
    for want in ["deliver", "drop (policy_egress)", "drop (policy_ingress)", "drop (no_route)"] {
        assert!(seen.contains_key(want), "the random policies never gave {want}: {seen:?}");
    }
}

/// `verse trace` (the CLI) in host `via`'s namespace against its API, with `extra` arguments.
/// The arguments of `verse trace` for a TCP packet from `from` to db's port 5432, pushed
/// through the kernel too.
fn to_db<'a>(from: &'a str, to: &'a str) -> [&'a str; 9] {
    ["--from", from, "--to", to, "--protocol", "tcp", "--port", "5432", "--run"]
}

fn cli_trace(host: &Host, token: &str, args: &[&str]) -> (bool, String, String) {
    let mut full = vec!["--api".to_owned(), host.api.url(), "--token".to_owned(), token.to_owned()];
    full.push("trace".to_owned());
    full.extend(args.iter().map(|a| a.to_string()));
    let full: Vec<&str> = full.iter().map(String::as_str).collect();
    let out = host.netns().exec(&bin_dir().join("verse").display().to_string(), &full);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Two hosts: the sender's host wraps (walk, model and kernel agree, naming the next host), the
/// receiver's host judges the same packet in from_underlay (walk, model and kernel agree, naming
/// the ingress rule or what was searched), and the real packet meets the same fate. The CLI asks
/// each host's API in turn, and says so when it cannot reach one rather than show another
/// host's answer as that host's part.
#[test]
fn across_hosts_each_host_traces_its_hook_and_agrees_with_model_and_kernel() {
    trace_across_hosts(Family::V4);
}

#[test]
fn across_hosts_each_host_traces_its_hook_and_agrees_with_model_and_kernel_over_ipv6() {
    trace_across_hosts(Family::V6);
}

fn trace_across_hosts(family: Family) {
    let fleet = Fleet::start(2);
    let (a, b) = (fleet.host(0), fleet.host(1));
    let api = fleet.api(0);
    let Shop { uni, web, db, rule } = shop(api);
    let dual = |on, ip: &str, groups: &[&str]| {
        fleet.endpoint6(on, &uni, (ip, &Family::V6.text(ip)), groups)
    };
    let w = dual(0, "10.7.0.2", &[&web]);
    let other = dual(0, "10.7.0.4", &[]);
    let d = dual(1, "10.7.0.3", &[&db]);
    let _server = TcpServer::start_on(&d.ns, family.addr(&d), 5432, "db");
    let to_d = addr_of(family, &d);
    let (before_a, before_b) = (settled(a), settled(b));

    // Admitted: host-a wraps for host-b; host-b admits by db's rule.
    let t = trace(api, &w.id, &to_d, "tcp", "&port=5432");
    assert_agree(&t, "wrap");
    assert_eq!(t["host"], a.name(), "{t:#}");
    assert_eq!(t["verdict"]["next_host"], b.name(), "{t:#}");
    assert_eq!(step(&t, "route")["outcome"], "pass", "{t:#}");
    let sport = t["packet"]["sport"].as_u64().unwrap();
    let t = trace(fleet.api(1), &w.id, &to_d, "tcp", &format!("&port=5432&sport={sport}"));
    assert_eq!(t["host"], b.name(), "{t:#}");
    assert_agree(&t, "deliver");
    assert_eq!(step(&t, "ingress")["rule"]["rule"], rule.as_str(), "{t:#}");
    assert_eq!(step(&t, "anti_spoofing")["outcome"], "pass", "{t:#}");
    assert_eq!(t["kernel"]["hook"], "from_underlay", "{t:#}");

    // Denied: host-a still wraps (egress to all), host-b drops by policy, naming db.
    let t = trace(api, &other.id, &to_d, "tcp", "&port=5432");
    assert_agree(&t, "wrap");
    let sport = t["packet"]["sport"].as_u64().unwrap();
    let t = trace(fleet.api(1), &other.id, &to_d, "tcp", &format!("&port=5432&sport={sport}"));
    assert_agree(&t, "drop (policy_ingress)");
    assert_eq!(step(&t, "ingress")["searched"], json!([db]), "{t:#}");
    // ICMP echo: db admits none; the walk, the model and the kernel say so on host-b.
    let icmp = icmp_of(family).0;
    let t = trace(api, &w.id, &to_d, icmp, "");
    assert_agree(&t, "wrap");
    let t = trace(fleet.api(1), &w.id, &to_d, icmp, "");
    assert_agree(&t, "drop (policy_ingress)");
    // The runs opened no flow and counted nothing on either host.
    assert_eq!(live(a), before_a, "trace runs changed host-a's live conntrack or counters");
    assert_eq!(live(b), before_b, "trace runs changed host-b's live conntrack or counters");

    // The real packets meet the same fates.
    let d_ip = family.addr(&d);
    assert!(tcp_connect(&w.ns, d_ip, 5432, Duration::from_secs(3)), "web reaches db across hosts");
    assert_dropped(b, "policy_ingress", "other (host-a) -> db:5432 (host-b)", || {
        tcp_connect(&other.ns, d_ip, 5432, Duration::from_millis(500))
    });

    // The CLI: host-a's API, and host-b's through a relay into host-a's namespace.
    let token = fleet.admin_token();
    let relay = ApiRelay::start(a.netns(), fleet.api(1));
    let host_api = format!("{}={}", b.name(), relay.url());
    let args = [&to_db(&other.id, &to_d)[..], &["--host-api", &host_api]].concat();
    let (ok, text, err) = cli_trace(a, &token, &args);
    assert!(ok, "{text}\n{err}");
    for want in [
        format!("{}: wrap", a.name()),
        format!("{}: reference model: wrap", a.name()),
        format!("{}: kernel (from_endpoint, BPF_PROG_TEST_RUN): wrap", a.name()),
        format!("{}: drop (policy_ingress)", b.name()),
        format!("{}: reference model: drop (policy_ingress)", b.name()),
        format!("{}: kernel (from_underlay, BPF_PROG_TEST_RUN): drop (policy_ingress)", b.name()),
    ] {
        assert!(text.contains(&want), "{want:?} not in:\n{text}");
    }
    // Without host-b's API the CLI says what it could not trace, and fails.
    let (ok, text, err) = cli_trace(
        a,
        &token,
        &["--from", &other.id, "--to", &to_d, "--protocol", "tcp", "--port", "5432"],
    );
    assert!(!ok, "an incomplete trace must fail:\n{text}");
    assert!(text.contains(&format!("{}: NOT TRACED (from_underlay)", b.name())), "{text}");
    assert!(!text.contains(&format!("{}: drop", b.name())), "{text}");
    assert!(err.contains("incomplete"), "{err}");
    // Asked of the receiver's host only: its part, and the sender's marked as not traced.
    let (ok, text, _) = cli_trace(
        b,
        &token,
        &["--from", &other.id, "--to", &to_d, "--protocol", "tcp", "--port", "5432"],
    );
    assert!(!ok, "{text}");
    assert!(text.contains(&format!("{}: drop (policy_ingress)", b.name())), "{text}");
    assert!(text.contains(&format!("{}: NOT TRACED (from_endpoint)", a.name())), "{text}");
}
