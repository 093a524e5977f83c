//! A restart of `versed` neither cuts traffic nor opens holes, and loses no state.
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use tests::*;

fn id(v: &Value) -> &str {
    v["id"].as_str().expect("resource has an id")
}

fn snapshot(api: &Api) -> Value {
    let mut all = serde_json::Map::new();
    for path in ["/v1/universes", "/v1/security-groups", "/v1/endpoints"] {
        let r = api.get(path);
        assert_eq!(r.status, 200, "GET {path}: {}", r.body);
        let mut items =
            r.json().as_array().cloned().unwrap_or_else(|| panic!("{path} is not an array"));
        items.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
        // The desired state only: how much of its conntrack budget an endpoint uses and how
        // often a rule matched are live figures of the dataplane, moved by any packet.
        for item in &mut items {
            if let Some(item) = item.as_object_mut() {
                item.remove("conntrack");
                item.remove("hits");
                item.remove("hits_from");
            }
        }
        all.insert(path.to_owned(), Value::Array(items));
    }
    Value::Object(all)
}

/// While `versed` is stopped with SIGTERM and started again: a long-lived TCP connection keeps
/// exchanging data (also while no daemon runs), a denied flow probed in a loop never gets
/// through and every probe is counted `policy_ingress` (the pinned counters outlive the
/// daemon), universes, groups and endpoints survive, and an edit made afterwards takes effect.
#[test]
fn restart_keeps_connections_policy_and_state() {
    let mut host = Host::start();
    let api = host.api.clone();
    let uni = api.create_universe("rst", "10.60.0.0/24");
    let srv = api.create_group(id(&uni), "srv");
    let cli = api.create_group(id(&uni), "cli");
    let intruders = api.create_group(id(&uni), "intruders");
    api.add_rule(
        id(&srv),
        &json!({"direction": "ingress", "protocol": "tcp", "from_port": 7000, "to_port": 7000, "group": id(&cli)}),
    );
    let server = host.endpoint(id(&uni), "10.60.0.10", &[id(&srv)]);
    let client = host.endpoint(id(&uni), "10.60.0.20", &[id(&cli)]);
    let intruder = host.endpoint(id(&uni), "10.60.0.30", &[id(&intruders)]);
    let _tcp = TcpServer::start(&server.ns, 7000, "s");

    let mut conn =
        TcpConn::open(&client.ns, server.ip, 7000, ALLOWED).expect("the rule admits the client");
    assert_eq!(conn.exchange("before", ALLOWED).unwrap(), "s:before");
    assert_dropped(&host, "policy_ingress", "the intruder before the restart", || {
        tcp_connect(&intruder.ns, server.ip, 7000, DENIED)
    });
    let before = snapshot(&api);
    let refused_before = host.drops("policy_ingress");

    let stop = AtomicBool::new(false);
    let probes = AtomicU32::new(0);
    let breaches = AtomicU32::new(0);
    std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(Ordering::SeqCst) {
                if tcp_connect(&intruder.ns, server.ip, 7000, Duration::from_millis(300)) {
                    breaches.fetch_add(1, Ordering::SeqCst);
                }
                probes.fetch_add(1, Ordering::SeqCst);
            }
        });
        let result =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                assert!(wait_until(Duration::from_secs(5), || probes.load(Ordering::SeqCst) >= 2));
                let status = host.versed.stop();
                eprintln!("versed stopped: {status}");
                assert_eq!(
                    conn.exchange("while-stopped", ALLOWED)
                        .expect("the connection works while versed is down"),
                    "s:while-stopped"
                );
                let during = probes.load(Ordering::SeqCst);
                assert!(wait_until(Duration::from_secs(5), || probes.load(Ordering::SeqCst)
                    >= during + 2));
                host.versed.start_again();
                let after = probes.load(Ordering::SeqCst);
                assert!(wait_until(Duration::from_secs(5), || probes.load(Ordering::SeqCst)
                    >= after + 3));
            }));
        stop.store(true, Ordering::SeqCst);
        if let Err(p) = result {
            std::panic::resume_unwind(p);
        }
    });
    assert_eq!(breaches.load(Ordering::SeqCst), 0, "a denied probe got through during the restart");
    let probes = u64::from(probes.load(Ordering::SeqCst));
    assert!(probes >= 7, "the probe loop ran");
    // Each probe's SYN (at least one each) was refused by policy, not lost for another reason.
    let refused = host.drops("policy_ingress") - refused_before;
    assert!(refused >= probes, "{probes} probes, {refused} policy_ingress drops");

    for i in 0..3 {
        let msg = format!("after-{i}");
        assert_eq!(
            conn.exchange(&msg, ALLOWED).expect("the connection survives the restart"),
            format!("s:{msg}")
        );
    }
    assert_eq!(snapshot(&api), before, "universes, groups and endpoints survive the restart");
    assert!(
        tcp_connect(&client.ns, server.ip, 7000, ALLOWED),
        "new allowed connections after the restart"
    );
    assert_dropped(&host, "policy_ingress", "the intruder after the restart", || {
        tcp_connect(&intruder.ns, server.ip, 7000, DENIED)
    });

    let rule = api.add_rule(
        id(&srv),
        &json!({"direction": "ingress", "protocol": "tcp", "from_port": 7000, "to_port": 7000, "group": id(&intruders)}),
    );
    assert!(
        tcp_connect(&intruder.ns, server.ip, 7000, ALLOWED),
        "an edit after the restart takes effect"
    );
    api.delete_rule(id(&srv), id(&rule));
    assert_dropped(&host, "policy_ingress", "the intruder once its rule is removed again", || {
        tcp_connect(&intruder.ns, server.ip, 7000, DENIED)
    });
    let late = host.endpoint(id(&uni), "10.60.0.40", &[id(&cli)]);
    assert!(
        tcp_connect(&late.ns, server.ip, 7000, ALLOWED),
        "an endpoint plugged after the restart works"
    );
}

/// A daemon killed with SIGKILL (a crash: no clean-up at all) comes back with its state, the
/// dataplane kept enforcing meanwhile, and the host reports the same realized revision.
#[test]
fn a_crashed_daemon_comes_back_without_losing_state_or_opening_holes() {
    let mut host = Host::start();
    let api = host.api.clone();
    let uni = api.create_universe("crash", "10.61.0.0/24");
    let srv = api.create_group(id(&uni), "srv");
    let cli = api.create_group(id(&uni), "cli");
    let rule = api.add_rule(
        id(&srv),
        &json!({"direction": "ingress", "protocol": "tcp", "from_port": 7000, "to_port": 7000, "group": id(&cli)}),
    );
    let server = host.endpoint(id(&uni), "10.61.0.10", &[id(&srv)]);
    let client = host.endpoint(id(&uni), "10.61.0.20", &[id(&cli)]);
    let stranger = host.endpoint(id(&uni), "10.61.0.30", &[]);
    let _tcp = TcpServer::start(&server.ns, 7000, "s");
    let mut conn = TcpConn::open(&client.ns, server.ip, 7000, ALLOWED).expect("admitted");
    let before = snapshot(&api);
    let name = host.name().to_owned();
    let revision = |api: &Api| -> u64 {
        let hosts = api.client().list_hosts().expect("list the hosts");
        hosts.iter().find(|h| h.name == name).map(|h| h.revision).expect("this host is listed")
    };
    let realized = revision(&api);

    host.versed.crash();
    assert_eq!(conn.exchange("down", ALLOWED).expect("the dataplane keeps forwarding"), "s:down");
    // Read from the pinned drop map: no daemon serves /metrics.
    assert_dropped(&host, "policy_ingress", "the stranger while no daemon runs", || {
        tcp_connect(&stranger.ns, server.ip, 7000, DENIED)
    });
    host.versed.start_again();

    assert_eq!(snapshot(&api), before, "state survives a crash");
    // Right after start-up the daemon reports what it has verified so far (0); a client waits
    // for the revision it needs, as S13 intends.
    assert!(
        wait_until(Duration::from_secs(10), || revision(&api) == realized),
        "S13: the realized revision {realized} is reported again (now {})",
        revision(&api)
    );
    assert_eq!(conn.exchange("up", ALLOWED).expect("the connection survives"), "s:up");
    assert_dropped(&host, "policy_ingress", "the stranger after the crash", || {
        tcp_connect(&stranger.ns, server.ip, 7000, DENIED)
    });
    api.delete_rule(id(&srv), id(&rule));
    assert_dropped(
        &host,
        "policy_ingress",
        "the client once its rule is deleted after the crash",
        || tcp_connect(&client.ns, server.ip, 7000, DENIED),
    );
    assert_eq!(conn.exchange("tracked", ALLOWED).expect("S8 holds across the crash"), "s:tracked");
}

/// A deleted state file is not an empty desired state: versed refuses to start (the dataplane
/// would lose every endpoint and rule), says how to recover, and after `cp state.json.last-good
/// state.json` starts with everything in place. `--empty-state` starts afresh on purpose.
#[test]
fn a_lost_state_file_stops_the_start_until_it_is_restored_from_its_last_good_copy() {
    let mut host = Host::start();
    let api = host.api.clone();
    let uni = api.create_universe("keep", "10.61.0.0/24");
    let a = host.endpoint(id(&uni), "10.61.0.10", &[]);
    let b = host.endpoint(id(&uni), "10.61.0.20", &[]);
    assert!(ping(&a.ns, b.ip), "default group: members talk");
    let before = snapshot(&api);
    let state = host.state_dir().join("state.json");
    let copy = host.state_dir().join("state.json.last-good");
    assert_eq!(
        std::fs::read(&state).unwrap(),
        std::fs::read(&copy).unwrap(),
        "the copy is current"
    );

    host.versed.stop();
    std::fs::remove_file(&state).unwrap();
    let (status, log) = host.versed.start_again_expecting_exit();
    assert!(!status.success(), "versed must refuse to start: {log}");
    assert!(log.contains("refusing to start") && log.contains("state.json.last-good"), "{log}");
    assert!(log.contains("--empty-state"), "says how to start afresh: {log}");
    // Nothing was torn down meanwhile: the pinned dataplane still enforces.
    assert!(ping(&a.ns, b.ip), "the dataplane keeps the endpoints while versed is refused");

    std::fs::copy(&copy, &state).unwrap();
    host.versed.start_again();
    assert_eq!(snapshot(&api), before, "everything is back");
    assert!(ping(&a.ns, b.ip));

    // Lost again, and this time a fresh start is what the operator wants.
    host.versed.stop();
    std::fs::remove_file(&state).unwrap();
    host.versed.start_again_with(&["--empty-state"]);
    // The admin token went with the state: versed made a new one.
    let api = host.versed.api();
    assert!(api.client().list_universes().expect("list universes").is_empty());
    assert!(
        wait_until(Duration::from_secs(10), || !ping(&a.ns, b.ip)),
        "an empty desired state removes the endpoints"
    );
}
