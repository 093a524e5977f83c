//! A host whose versed stops keeps enforcing what it last realized: its pinned maps and links
//! stay, so allowed flows still pass and denied ones are still dropped. The fleet sees the host
//! go unhealthy when its lease lapses (GET /v1/hosts) and does not wait for it; edits made
//! through other hosts meanwhile are realized by the host when its versed starts again, which
//! then reports itself healthy with the fleet's revision (S13).
//!
//! Every refused probe aims at a listening socket and asserts the drop counter of host C (read
//! from its pinned drop map while its daemon is down) moved for the reason that should stop it.
use std::time::{Duration, Instant};

use tests::*;

fn id(v: &Value) -> &str {
    v["id"].as_str().expect("resource has an id")
}

fn tcp_rule(port: u16, group: &str) -> Value {
    json!({"direction": "ingress", "protocol": "tcp", "from_port": port, "to_port": port, "group": group})
}

/// How long a lapsed lease may take to show (the lease TTL is a few seconds).
const LEASE: Duration = Duration::from_secs(30);

fn healthy(fleet: &Fleet, via: usize, host: usize) -> Option<bool> {
    fleet.host_status(via, fleet.host(host).name()).and_then(|h| h["healthy"].as_bool())
}

#[test]
fn a_stopped_host_keeps_enforcing_and_catches_up_on_restart() {
    let mut fleet = Fleet::start(3);
    let api = fleet.api(0).clone();
    let uni = api.create_universe("shop", "10.3.0.0/24");
    let uni = id(&uni);
    let clients = api.create_group(uni, "clients");
    let web = api.create_group(uni, "web");
    let (clients, web) = (id(&clients), id(&web));
    api.add_rule(web, &tcp_rule(80, clients));
    let rule81 = api.add_rule(web, &tcp_rule(81, clients));
    let client = fleet.endpoint(0, uni, "10.3.0.20", &[clients]);
    let server = fleet.endpoint(2, uni, "10.3.0.10", &[web]);
    let stranger = fleet.endpoint(1, uni, "10.3.0.30", &[]);
    let _srv80 = TcpServer::start(&server.ns, 80, "web");
    let _srv8080 = TcpServer::start(&server.ns, 8080, "web");
    let _srv81 = TcpServer::start(&server.ns, 81, "web");
    let _srv82 = TcpServer::start(&server.ns, 82, "web");
    let web_ip = server.ip;
    let c = fleet.host(2);
    assert_eq!(tcp_roundtrip(&client.ns, web_ip, 80, "a", ALLOWED).as_deref(), Some("web:a"));
    assert_dropped(c, "policy_ingress", "stranger (B) -> web:80 (C)", || {
        tcp_connect(&stranger.ns, web_ip, 80, DENIED)
    });
    let mut conn = TcpConn::open(&client.ns, web_ip, 80, ALLOWED).expect("client -> web:80");
    assert_eq!(conn.exchange("before", ALLOWED).unwrap(), "web:before");

    // Host C's daemon stops.
    let status = fleet.host_mut(2).versed.stop();
    assert!(status.success(), "versed exits cleanly on SIGTERM: {status}");

    // C keeps enforcing: the tracked connection, new allowed flows, denied flows (counted in
    // C's pinned drop map: no daemon answers /metrics).
    let c = fleet.host(2);
    assert!(!c.versed.is_running());
    assert_eq!(conn.exchange("during", ALLOWED).unwrap(), "web:during");
    assert_eq!(tcp_roundtrip(&client.ns, web_ip, 80, "b", ALLOWED).as_deref(), Some("web:b"));
    assert_dropped(c, "policy_ingress", "stranger -> web:80 with C's versed down", || {
        tcp_connect(&stranger.ns, web_ip, 80, DENIED)
    });
    assert_dropped(c, "policy_ingress", "client -> web:8080, no rule yet, C's versed down", || {
        tcp_connect(&client.ns, web_ip, 8080, DENIED)
    });

    // The fleet notices when C's lease lapses; A and B stay healthy.
    assert!(
        wait_until(LEASE, || healthy(&fleet, 0, 2) == Some(false)),
        "GET /v1/hosts shows host C unhealthy within {LEASE:?}: {:?}",
        fleet.api(0).hosts()
    );
    assert_eq!(healthy(&fleet, 1, 0), Some(true));
    assert_eq!(healthy(&fleet, 1, 1), Some(true));
    let c_revision = fleet.host_status(0, fleet.host(2).name()).expect("C is still listed")
        ["revision"]
        .as_u64()
        .expect("C's last realized revision");

    // Edits through A and B while C is down; the API does not wait for an unhealthy host.
    let started = Instant::now();
    let rule =
        fleet.api(0).post(&format!("/v1/security-groups/{web}/rules"), &tcp_rule(8080, clients));
    assert_eq!(rule.status, 201, "{}", rule.body);
    // Joining `clients` together with a new group gives the stranger an identity (a set of
    // groups) that C has never seen; joining `clients` alone would give it the client's. Its
    // host B wraps its frames with that new identity, which C's routes do not give it yet.
    let tagged = fleet.api(1).create_group(uni, "tagged");
    let r = fleet.api(1).patch(
        &format!("/v1/endpoints/{}", stranger.id),
        &json!({"security_groups": [clients, id(&tagged)]}),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    fleet.api(0).delete_rule(web, id(&rule81));
    let (newbie, last) =
        fleet.api(1).create_endpoint_at(Some(fleet.host(1).name()), uni, "10.3.0.40", &[clients]);
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "the edits took {:?}: the API waited for the unhealthy host",
        started.elapsed()
    );
    let c_now = fleet.host_status(0, fleet.host(2).name()).expect("C listed")["revision"]
        .as_u64()
        .expect("revision");
    assert_eq!(c_now, c_revision, "a stopped host realizes nothing");

    // C still judges by what it last realized: the edits are not in force there yet (A and B
    // have realized them, so each of these packets leaves its sender's host and is refused by
    // C's dataplane).
    let c = fleet.host(2);
    assert_dropped(c, "policy_ingress", "client -> web:8080: C has not realized the rule", || {
        tcp_connect(&client.ns, web_ip, 8080, DENIED)
    });
    // S10: C judges the stranger by the identity its own routes give it, and its frames claim
    // another (the new one): they are dropped as such until C realizes the change.
    assert_dropped(c, "identity_mismatch", "stranger -> web:80: C does not know it joined", || {
        tcp_connect(&stranger.ns, web_ip, 80, DENIED)
    });
    // C could not answer the newbie even if it let the SYN in (it has no route back to it):
    // a tap in web's namespace tells whether the SYN arrived.
    let tap = Tap::open(&server.ns, 6);
    assert_dropped(
        c,
        "not_placed_on_sender",
        "newbie (B) -> web:80: C does not know the endpoint is placed on B",
        || {
            tcp_connect(&newbie.ns, web_ip, 80, DENIED)
                || tap.saw_from(newbie.ip, Duration::from_millis(100))
        },
    );
    assert!(tcp_connect(&client.ns, web_ip, 81, ALLOWED), "C still has the removed rule for 81");

    // C's daemon starts again and catches up on every edit it missed.
    fleet.host_mut(2).versed.start_again();
    assert!(
        fleet.wait_realized(0, last, LEASE),
        "every host healthy at revision {last} or later: {:?}",
        fleet.api(0).hosts()
    );
    assert_eq!(healthy(&fleet, 2, 2), Some(true), "C sees itself healthy");
    assert_eq!(
        tcp_roundtrip(&client.ns, web_ip, 8080, "c", ALLOWED).as_deref(),
        Some("web:c"),
        "the rule added while C was down is in force on C"
    );
    assert_eq!(
        tcp_roundtrip(&stranger.ns, web_ip, 80, "d", ALLOWED).as_deref(),
        Some("web:d"),
        "the membership change made while C was down is in force on C"
    );
    assert_eq!(
        tcp_roundtrip(&newbie.ns, web_ip, 80, "e", ALLOWED).as_deref(),
        Some("web:e"),
        "the endpoint placed while C was down is admitted by C"
    );
    assert_eq!(
        conn.exchange("after", ALLOWED).unwrap(),
        "web:after",
        "the old connection lives on"
    );
    let c = fleet.host(2);
    assert_dropped(c, "policy_ingress", "client -> web:81: the rule removed meanwhile", || {
        tcp_connect(&client.ns, web_ip, 81, DENIED)
    });
    assert_dropped(c, "policy_ingress", "client -> web:82: nothing else opened", || {
        tcp_connect(&client.ns, web_ip, 82, DENIED)
    });
}
