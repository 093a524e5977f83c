//! A real host that serves no API (`[api] serve = false`, README "Scale"): three hosts on one
//! three-member etcd, host C serving none. Its store follows only the hosts, the tokens, its
//! own placements and the universes with an endpoint on it, so:
//! - endpoints placed on it through another host's API are plumbed and judged by its dataplane
//!   (a rule admits, no rule drops), and an edit acknowledged by the API's wait (S13, the API
//!   hosts judging C's revision from its reports) is in force on it when the answer comes;
//! - a universe with no endpoint on it never reaches it: edits of it send C no watch event, and
//!   its maps hold no entry of it (read from the pinned maps and its `/metrics`);
//! - it resumes after a restart and keeps following;
//! - its last endpoint of a universe deleted, nothing of that universe stays in its maps
//!   (routes, VNIs, peer hosts, conntrack);
//! - it answers `/healthz` and `/metrics` (a token checked against the tokens it follows) and
//!   refuses every other request with 404 `api_not_served`.
use std::collections::BTreeSet;
use std::time::Duration;

use dataplane_common::map_names;
use tests::*;

const WAIT: Duration = Duration::from_secs(30);
/// Host C, the one that serves no API.
const C: usize = 2;

fn id(v: &Value) -> &str {
    v["id"].as_str().expect("resource has an id")
}

fn tcp_rule(port: u16, group: &str) -> Value {
    json!({"direction": "ingress", "protocol": "tcp", "from_port": port, "to_port": port, "group": group})
}

/// The VNIs of the keys of map `map` pinned under `host`'s bpffs (keys that begin with one:
/// `VERSE_VNIS`, `VERSE_ROUTES`).
fn vnis_in(host: &Host, map: &str) -> BTreeSet<u32> {
    pinned_keys(host.bpf_dir(), map)
        .iter()
        .map(|k| u32::from_ne_bytes(k[..4].try_into().expect("a key of at least 4 bytes")))
        .collect()
}

/// A sample of host `i`'s `/metrics` (no labels), read with the admin token.
fn metric(fleet: &Fleet, i: usize, name: &str) -> u64 {
    let text = fleet.api(i).metrics();
    metric_value(&text, name).unwrap_or_else(|| panic!("no {name} in /metrics of host {i}"))
}

/// What host `i` holds and has received, from its `/metrics`.
struct Holdings {
    events: u64,
    bytes: u64,
    entries: u64,
    resident: u64,
}

impl Holdings {
    fn of(fleet: &Fleet, i: usize) -> Holdings {
        let text = fleet.api(i).metrics();
        let m = |name: &str| {
            metric_value(&text, name).unwrap_or_else(|| panic!("no {name} in /metrics of host {i}"))
        };
        Holdings {
            events: m("verse_store_watch_events_total"),
            bytes: m("verse_store_watch_bytes_total"),
            entries: m("verse_map_entries"),
            resident: m("verse_resident_memory_bytes"),
        }
    }
}

#[test]
fn a_host_without_an_api_enforces_its_own_universes_and_holds_nothing_of_the_others() {
    assert!(is_root(), "needs root: network namespaces, bpffs, eBPF");
    let c_config = "[api]\nserve = false\n[observability]\nflow_log_interval = 10\n";
    let mut fleet = Fleet::start_with_host_configs(&["", "", c_config]);
    assert!(
        fleet.wait_realized(0, 0, WAIT),
        "the fleet is not healthy: {:?}",
        fleet.api(0).hosts()
    );
    let (api_a, api_b) = (&fleet.api(0).clone(), &fleet.api(1).clone());
    let c_name = fleet.host(C).name().to_owned();

    // C answers its health and metrics, and nothing of the API, whoever asks.
    assert_eq!(fleet.api(C).get("/healthz").status, 200);
    for (method, path) in
        [("GET", "/v1/universes"), ("GET", "/v1/hosts"), ("POST", "/v1/universes")]
    {
        let body = (method == "POST").then(|| json!({"name": "x", "cidrs": ["10.9.0.0/24"]}));
        let r = fleet.api(C).request(method, path, body.as_ref(), WAIT).expect("C answers");
        assert_eq!((r.status, r.error_code()), (404, "api_not_served".to_owned()), "{}", r.body);
        assert!(r.error_message().contains("api.serve = false"), "{}", r.body);
    }
    let anonymous = fleet.api(C).with_token(None);
    assert_eq!(anonymous.get("/metrics").status, 401, "/metrics still needs a token");
    assert!(fleet.api(C).metrics().contains("verse_drops_total"));
    // The others know it cannot be asked for what only its API could say.
    let c_status = fleet.host_status(0, &c_name).expect("A lists C");
    assert!(c_status["api"].is_null(), "C advertises no API: {c_status}");

    // Universe shop: web on C, placed through A's API; its client on B.
    let shop = api_a.create_universe("shop", "10.0.0.0/24");
    let shop_vni = shop["vni"].as_u64().expect("a VNI") as u32;
    let shop = id(&shop).to_owned();
    let web = api_a.create_group(&shop, "web");
    let clients = api_b.create_group(&shop, "clients");
    let (web, clients) = (id(&web).to_owned(), id(&clients).to_owned());
    api_a.add_rule(&web, &tcp_rule(80, &clients));
    let w_web = fleet.endpoint_via(0, C, &shop, "10.0.0.10", &[&web]);
    let w_client = fleet.endpoint_via(0, 1, &shop, "10.0.0.20", &[&clients]);
    assert_eq!(w_web.json["host"], c_name, "{}", w_web.json);
    let dot10 = "10.0.0.10".parse::<std::net::Ipv4Addr>().unwrap();
    let _tcp80 = TcpServer::start(&w_web.ns, 80, "web");
    let _tcp81 = TcpServer::start(&w_web.ns, 81, "web");
    assert_eq!(
        tcp_roundtrip(&w_client.ns, dot10, 80, "get", ALLOWED).as_deref(),
        Some("web:get"),
        "client (B) -> web (C) TCP 80: a rule admits it"
    );
    assert_dropped(
        fleet.host(C),
        "policy_ingress",
        "client (B) -> web (C) TCP 81: no rule",
        || tcp_connect(&w_client.ns, dot10, 81, DENIED),
    );

    // Flow logs turned on through A's API: C writes them (its ACCEPT from conntrack, its REJECT
    // from the drop events), in its own state directory; A cannot ask C for them, nor for a
    // trace, and says why.
    let r = api_a.patch(&format!("/v1/endpoints/{}", w_web.id), &json!({"flow_logs": true}));
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        tcp_roundtrip(&w_client.ns, dot10, 80, "logged", ALLOWED).as_deref(),
        Some("web:logged")
    );
    assert!(!tcp_connect(&w_client.ns, dot10, 81, DENIED));
    let file = fleet.host(C).state_dir().join("flow-logs/flow-logs.jsonl");
    let logged = wait_until(Duration::from_secs(25), || {
        let text = std::fs::read_to_string(&file).unwrap_or_default();
        let mine = |action: &str| {
            text.lines().any(|l| l.contains(&w_web.id) && l.contains(&format!("\"{action}\"")))
        };
        mine("ACCEPT") && mine("REJECT")
    });
    assert!(
        logged,
        "C wrote no ACCEPT and REJECT records of web: {:?}",
        std::fs::read_to_string(&file)
    );
    let r = api_a.get(&format!("/v1/flow-logs?endpoint={}", w_web.id));
    assert_eq!(r.status, 503, "{}", r.body);
    assert!(r.error_message().contains("api.serve = false"), "{}", r.body);
    let q = format!("from={}&to={}&protocol=tcp&port=80&host={c_name}", w_client.id, w_web.id);
    let r = api_a.get(&format!("/v1/trace?{q}"));
    assert_eq!((r.status, r.error_code()), (503, "host_unavailable".to_owned()), "{}", r.body);
    assert!(r.error_message().contains("api.serve = false"), "{}", r.body);

    // An edit through B's API, acknowledged once every healthy host realized it (C judged
    // from its reports): in force on C when the answer comes, without waiting further.
    let r = api_b.post(&format!("/v1/security-groups/{web}/rules"), &tcp_rule(81, &clients));
    assert_eq!(r.status, 201, "{}", r.body);
    let rule81 = id(&r.json()).to_owned();
    let rev81 = r.revision().expect("a revision");
    assert_eq!(
        tcp_roundtrip(&w_client.ns, dot10, 81, "now", ALLOWED).as_deref(),
        Some("web:now"),
        "the rule for 81 is in force on C when the API answers"
    );
    let judged = fleet.host_status(1, &c_name).expect("B lists C");
    assert!(judged["revision"].as_u64().is_some_and(|r| r >= rev81), "{judged}");

    // C holds shop and nothing else.
    assert_eq!(vnis_in(fleet.host(C), map_names::VNIS), BTreeSet::from([shop_vni]));
    assert_eq!(vnis_in(fleet.host(C), map_names::ROUTES), BTreeSet::from([shop_vni]));
    assert_eq!(metric(&fleet, C, "verse_universes"), 1);
    assert!(metric(&fleet, C, "verse_map_entries") > 0, "C holds shop's entries");

    // Four universes `other-k`, each with an endpoint on A and one on B and 25 rules, edited
    // through both APIs: C is sent nothing of them, holds nothing of them, and realizes their
    // edits trivially (the API waits for C and is not held up). What each host holds, before
    // and after, is the per-host figure of the README ("Scale").
    let before: Vec<Holdings> = (0..3).map(|i| Holdings::of(&fleet, i)).collect();
    let mut others = Vec::new();
    let mut workloads = Vec::new();
    let mut last = 0;
    for k in 1..=4u16 {
        let other = api_b.create_universe(&format!("other-{k}"), &format!("10.{k}.0.0/24"));
        others.push(other["vni"].as_u64().expect("a VNI") as u32);
        let other = id(&other).to_owned();
        let g = api_a.create_group(&other, "g");
        let g = id(&g).to_owned();
        workloads.push(fleet.endpoint_via(1, 0, &other, &format!("10.{k}.0.10"), &[&g]));
        workloads.push(fleet.endpoint_via(0, 1, &other, &format!("10.{k}.0.20"), &[&g]));
        for port in 1000..1025 {
            let via = if port % 2 == 0 { api_a } else { api_b };
            let r = via.post(&format!("/v1/security-groups/{g}/rules"), &tcp_rule(port, &g));
            assert_eq!(r.status, 201, "{}", r.body);
            last = r.revision().expect("a revision");
        }
    }
    assert!(fleet.wait_realized(0, last, WAIT), "{:?}", api_a.hosts());
    let after: Vec<Holdings> = (0..3).map(|i| Holdings::of(&fleet, i)).collect();
    eprintln!("host  watch events  watch bytes  map entries  resident bytes (before -> after)");
    for (i, (b, a)) in before.iter().zip(&after).enumerate() {
        eprintln!(
            "{}  {:>5} -> {:<5}  {:>6} -> {:<7}  {:>3} -> {:<4}  {} -> {}",
            fleet.host(i).name(),
            b.events,
            a.events,
            b.bytes,
            a.bytes,
            b.entries,
            a.entries,
            b.resident,
            a.resident
        );
    }
    assert_eq!(metric(&fleet, 0, "verse_universes"), 5, "A holds every universe");
    let (c_before, c_after) = (&before[C], &after[C]);
    assert_eq!(c_after.events, c_before.events, "no edit of the others reached C's watch");
    assert_eq!(c_after.bytes, c_before.bytes);
    assert_eq!(c_after.entries, c_before.entries, "C's maps did not change");
    assert!(after[0].entries > before[0].entries && after[1].bytes > before[1].bytes);
    assert_eq!(metric(&fleet, C, "verse_universes"), 1);
    for map in [map_names::VNIS, map_names::ROUTES] {
        let held = vnis_in(fleet.host(C), map);
        assert!(others.iter().all(|v| !held.contains(v)), "{map} of C holds another universe");
    }
    assert!(vnis_in(fleet.host(0), map_names::VNIS).is_superset(&others.iter().copied().collect()));

    // Restarted, C resumes: what it enforced stays, and it follows the edits made since.
    fleet.host_mut(C).versed.restart();
    assert!(fleet.wait_realized(0, last, WAIT), "C is back: {:?}", api_a.hosts());
    let r = api_b.delete(&format!("/v1/security-groups/{web}/rules/{rule81}"));
    assert_eq!(r.status, 204, "{}", r.body);
    assert_dropped(
        fleet.host(C),
        "policy_ingress",
        "client (B) -> web (C) TCP 81 after the rule went",
        || tcp_connect(&w_client.ns, dot10, 81, DENIED),
    );
    assert_eq!(
        tcp_roundtrip(&w_client.ns, dot10, 80, "again", ALLOWED).as_deref(),
        Some("web:again")
    );
    assert!(
        conntrack_keys(fleet.host(C).bpf_dir()).iter().any(|k| k.vni() == shop_vni),
        "C tracks shop's flows"
    );

    // Its last endpoint of shop deleted (through A's API): nothing of shop stays on C, not
    // even the flows it tracked; the client's host keeps the universe.
    let r = api_a.delete(&format!("/v1/endpoints/{}", w_web.id));
    assert_eq!(r.status, 204, "{}", r.body);
    assert_eq!(vnis_in(fleet.host(C), map_names::VNIS), BTreeSet::new());
    assert_eq!(vnis_in(fleet.host(C), map_names::ROUTES), BTreeSet::new());
    assert!(pinned_keys(fleet.host(C).bpf_dir(), map_names::HOSTS).is_empty(), "no peer host left");
    assert!(
        conntrack_keys(fleet.host(C).bpf_dir()).iter().all(|k| k.vni() != shop_vni),
        "C's flows of shop are gone"
    );
    assert_eq!(metric(&fleet, C, "verse_map_entries"), 0);
    assert_eq!(metric(&fleet, C, "verse_universes"), 0);
    assert!(vnis_in(fleet.host(1), map_names::VNIS).contains(&shop_vni), "B still holds shop");

    // Placed on C again, then the universe deleted whole: C takes it up, then lets it go.
    let w_again = fleet.endpoint_via(1, C, &shop, "10.0.0.11", &[&web]);
    assert_eq!(vnis_in(fleet.host(C), map_names::VNIS), BTreeSet::from([shop_vni]));
    for e in [&w_again.id, &w_client.id] {
        let r = api_b.delete(&format!("/v1/endpoints/{e}"));
        assert_eq!(r.status, 204, "{}", r.body);
    }
    let r = api_a.delete(&format!("/v1/universes/{shop}"));
    assert_eq!(r.status, 204, "{}", r.body);
    assert!(pinned_keys(fleet.host(C).bpf_dir(), map_names::VNIS).is_empty());
    assert!(pinned_keys(fleet.host(C).bpf_dir(), map_names::ROUTES).is_empty());
    assert_eq!(metric(&fleet, C, "verse_map_entries"), 0);
    eprintln!(
        "host C (no API): watch {} events, {} bytes; resident {} bytes",
        metric(&fleet, C, "verse_store_watch_events_total"),
        metric(&fleet, C, "verse_store_watch_bytes_total"),
        metric(&fleet, C, "verse_resident_memory_bytes"),
    );
}
