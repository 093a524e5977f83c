//! The REST API in process: every route, every 400/404/409 of the README's "REST API", the
//! shapes of the 201s and the `Verse-Revision` header, and who may do what (S15, the README's
//! "Access"): every role against every route. No root needed: the store lives in a temporary directory and a fake reconciler
//! realizes every revision as soon as it is published. Requests carry the admin token that
//! `versed` would make at first start, unless a test says otherwise.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Method, Request, StatusCode};
use axum::Router;
use dataplane_common::{DropCount, DropReason, Hook};
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tokio::sync::watch;
use tower::ServiceExt;
use verse::api::{self, AppState, Stats};
use verse::store::{Realized, Store};
use verse::{audit, auth};

const HOST: &str = "host-a";

struct Api {
    app: Router,
    store: Store,
    realized: watch::Sender<Realized>,
    /// The first admin token (as `versed` makes it into the state directory).
    admin: String,
    /// The revision after that token was made: the first edit of a test makes `base + 1`.
    base: u64,
    _dir: tempfile::TempDir,
}

struct Answer {
    status: StatusCode,
    revision: Option<u64>,
    body: Value,
    text: String,
}

/// A router over a fresh store with its first admin token. With `reconciler`, a task realizes
/// each revision at once, here and on `remotes` (other hosts of the fleet, registered in the
/// store).
async fn api_of(reconciler: bool, remotes: &[&str]) -> Api {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_embedded(dir.path()).unwrap();
    for host in remotes {
        store.register_host(host, None).await.unwrap();
    }
    let made = auth::bootstrap_admin(&store, dir.path(), None).await.unwrap();
    assert!(matches!(made, auth::Bootstrap::Generated { .. }), "{made:?}");
    let admin = std::fs::read_to_string(dir.path().join(auth::ADMIN_TOKEN_FILE)).unwrap();
    let admin = admin.trim().to_owned();
    let base = store.snapshot().revision;
    let (realized, realized_rx) = watch::channel(Realized::default());
    if reconciler {
        let mut rx = store.subscribe();
        let tx = realized.clone();
        let reporter = store.clone();
        let remotes: Vec<String> = remotes.iter().map(|h| h.to_string()).collect();
        tokio::spawn(async move {
            loop {
                let rev = rx.borrow_and_update().revision;
                for host in &remotes {
                    reporter.report_realized(host, rev);
                }
                tx.send_replace(Realized::at(rev));
                if rx.changed().await.is_err() {
                    break;
                }
            }
        });
    }
    let stats: api::StatsFn = Arc::new(|| {
        let mut drops = BTreeMap::new();
        let n = |packets| DropCount { packets, bytes: packets * 60 };
        drops.insert((DropReason::SpoofedIp, Hook::FromEndpoint), n(7));
        drops.insert((DropReason::PolicyIngress, Hook::FromUnderlay), n(3));
        Ok(Stats { drops, ..Stats::default() })
    });
    let nothing = Arc::new(NothingPlumbed { store: store.clone() });
    let state =
        AppState::new(store.clone(), HOST.into(), None, realized_rx, stats).with_trace(nothing);
    Api { app: api::router(state), store, realized, admin, base, _dir: dir }
}

/// The traces of a host with no dataplane maps: what this host has realized is the store's
/// state, and nothing is plumbed (no kernel here).
struct NothingPlumbed {
    store: Store,
}

impl verse::trace::Source for NothingPlumbed {
    fn realized(&self) -> anyhow::Result<verse::trace::Realized> {
        Ok(verse::trace::Realized {
            state: self.store.snapshot(),
            maps: Default::default(),
            conntrack: Vec::new(),
            conntrack6: Vec::new(),
            now_ns: 0,
            config: Default::default(),
            underlay_ip: None,
        })
    }
    fn run(&self, _: &verse::trace::RunInput) -> anyhow::Result<verse::trace::KernelRun> {
        anyhow::bail!("no kernel in this test")
    }
}

/// A router over a fresh store, this host alone.
async fn api_with(reconciler: bool) -> Api {
    api_of(reconciler, &[]).await
}

/// A router over a fresh store with a reconciler, in a fleet with `host-b` and `host-c`.
async fn api() -> Api {
    api_of(true, &["host-b", "host-c"]).await
}

/// How a request authenticates.
#[derive(Clone, Copy, Debug)]
enum As<'a> {
    /// `Authorization: Bearer <token>`.
    Token(&'a str),
    /// No credentials at all.
    Nobody,
    /// On the local unix socket, as this uid (what the socket's listener puts in the request).
    Local(u32),
}

impl Api {
    async fn call(&self, method: Method, uri: &str, body: Option<&str>) -> Answer {
        self.call_as(As::Token(&self.admin), method, uri, body).await
    }

    async fn call_as(&self, who: As<'_>, method: Method, uri: &str, body: Option<&str>) -> Answer {
        let mut req = Request::builder().method(method).uri(uri);
        match who {
            As::Token(t) => req = req.header("authorization", format!("Bearer {t}")),
            As::Nobody => {}
            As::Local(uid) => {
                req = req.extension(ConnectInfo(auth::LocalPeer { uid: Some(uid), pid: None }))
            }
        }
        let req = match body {
            Some(b) => {
                req.header("content-type", "application/json").body(Body::from(b.to_owned()))
            }
            None => req.body(Body::empty()),
        }
        .unwrap();
        let resp = self.app.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let revision =
            resp.headers().get("Verse-Revision").map(|v| v.to_str().unwrap().parse().unwrap());
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let text = String::from_utf8(bytes.to_vec()).unwrap();
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Answer { status, revision, body, text }
    }
    async fn get(&self, uri: &str) -> Answer {
        self.call(Method::GET, uri, None).await
    }
    async fn post(&self, uri: &str, body: Value) -> Answer {
        self.call(Method::POST, uri, Some(&body.to_string())).await
    }
    async fn delete(&self, uri: &str) -> Answer {
        self.call(Method::DELETE, uri, None).await
    }

    async fn universe(&self, name: &str, cidr: &str) -> Value {
        let a = self.post("/v1/universes", json!({"name": name, "cidr": cidr})).await;
        assert_eq!(a.status, StatusCode::CREATED, "{}", a.text);
        a.body
    }
    async fn group(&self, universe: &str, name: &str) -> Value {
        let a = self.post("/v1/security-groups", json!({"universe": universe, "name": name})).await;
        assert_eq!(a.status, StatusCode::CREATED, "{}", a.text);
        a.body
    }
    /// An endpoint on another host: no local namespace is needed.
    async fn remote_endpoint(&self, universe: &str, ip: &str, sgs: Option<Vec<&str>>) -> Answer {
        let mut req =
            json!({"universe": universe, "host": "host-b", "netns": format!("ns-{ip}"), "ip": ip});
        if let Some(sgs) = sgs {
            req["security_groups"] = json!(sgs);
        }
        self.post("/v1/endpoints", req).await
    }
}

impl Answer {
    /// Asserts an error answer: its status, its code, and that the message names `field`.
    #[track_caller]
    fn error(&self, status: StatusCode, code: &str, field: &str) {
        assert_eq!(self.status, status, "{}", self.text);
        let e = &self.body["error"];
        assert_eq!(e["code"], code, "{}", self.text);
        let msg = e["message"].as_str().unwrap_or_else(|| panic!("no message: {}", self.text));
        assert!(msg.contains(field), "message {msg:?} does not name {field:?}");
        assert!(self.revision.is_none(), "a refused edit carries no revision");
    }
}

fn id(v: &Value) -> String {
    v["id"].as_str().unwrap().to_owned()
}

// ---- Universes ----

#[tokio::test]
async fn create_universe_returns_201_with_canonical_cidrs_vni_and_revision() {
    let api = api().await;
    let a = api.post("/v1/universes", json!({"name": "blue", "cidr": "10.1.2.3/16"})).await;
    assert_eq!(a.status, StatusCode::CREATED, "{}", a.text);
    assert_eq!(a.revision, Some(api.base + 1));
    let u = a.body.as_object().unwrap();
    let keys: Vec<_> = u.keys().map(String::as_str).collect();
    assert_eq!(keys, ["cidrs", "id", "name", "vni"]);
    assert!(u["id"].as_str().unwrap().starts_with("uni-"));
    assert_eq!(u["name"], "blue");
    assert_eq!(u["cidrs"], json!(["10.1.0.0/16"]));
    assert!(u["vni"].as_u64().unwrap() <= 0xFF_FFFF);

    let a = api
        .post("/v1/universes", json!({"name": "red", "cidrs": ["10.2.0.0/24", "10.3.0.0/24"]}))
        .await;
    assert_eq!(a.status, StatusCode::CREATED, "{}", a.text);
    assert_eq!(a.revision, Some(api.base + 2));
    assert_eq!(a.body["cidrs"], json!(["10.2.0.0/24", "10.3.0.0/24"]));

    let list = api.get("/v1/universes").await;
    assert_eq!(list.status, StatusCode::OK);
    assert_eq!(list.body.as_array().unwrap().len(), 2);
    let one = api.get(&format!("/v1/universes/{}", id(&a.body))).await;
    assert_eq!(one.status, StatusCode::OK);
    assert_eq!(one.body, a.body);
}

#[tokio::test]
async fn universe_gets_a_default_group_that_cannot_be_deleted_s3() {
    let api = api().await;
    let u = api.universe("blue", "10.1.0.0/16").await;
    let groups = api.get(&format!("/v1/security-groups?universe={}", id(&u))).await;
    let groups = groups.body.as_array().unwrap().clone();
    assert_eq!(groups.len(), 1);
    assert_eq!(groups[0]["name"], "default");
    let a = api.delete(&format!("/v1/security-groups/{}", id(&groups[0]))).await;
    a.error(StatusCode::CONFLICT, "protected", &id(&groups[0]));
}

#[tokio::test]
async fn universe_body_errors_are_400_naming_the_field() {
    let api = api().await;
    let cases: Vec<(&str, &str)> = vec![
        (r#"{"cidr": "10.0.0.0/16"}"#, "name"), // missing field
        (r#"{"name": 5, "cidr": "10.0.0.0/16"}"#, "name"), // wrong type
        (r#"{"name": "x", "cidr": "10.0.0.0/16", "colour": "red"}"#, "colour"), // unknown field
        (r#"{"name": "x", "cidr": "10.0.0.0/16""#, "body"), // malformed JSON
        ("", "body"),                           // empty body
        (r#"[1, 2]"#, "body"),                  // not an object
        (r#"{"name": "x", "cidr": "10.0.0.0/16"} trailing"#, "body"), // trailing garbage
        (r#"{"name": "x", "cidrs": "10.0.0.0/16"}"#, "cidrs"), // wrong type
        (r#"{"name": "x", "cidrs": ["10.0.0.0/16", 7]}"#, "cidrs[1]"), // wrong type, nested
        (r#"{"name": "x", "cidr": "10.0.0.300/16"}"#, "cidr"), // invalid CIDR
        (r#"{"name": "x"}"#, "cidr"),           // no CIDR
        (r#"{"name": "x", "cidr": "10.0.0.0/16", "cidrs": ["10.1.0.0/16"]}"#, "cidr"), // both
        (r#"{"name": "", "cidr": "10.0.0.0/16"}"#, "name"), // empty name
    ];
    for (body, field) in cases {
        let a = api.call(Method::POST, "/v1/universes", Some(body)).await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "body {body}: {}", a.text);
        a.error(StatusCode::BAD_REQUEST, "invalid_argument", field);
        let msg = a.body["error"]["message"].as_str().unwrap();
        assert!(msg.starts_with(field), "body {body}: message {msg:?} should start with {field:?}");
    }
    assert_eq!(api.store.snapshot().revision, api.base, "no refused edit changed anything");
}

/// IPv6 universe CIDRs and endpoint addresses are accepted when valid and shown as stored; an
/// invalid one is refused with a 400 naming the field and changes nothing; IPv6 rules are stored.
#[tokio::test]
async fn ipv6_universes_and_endpoints_are_accepted_and_checked() {
    let api = api().await;
    let base = api.store.snapshot().revision;
    for cidrs6 in [json!(["fd00:ab::/40"]), json!([]), json!(["10.0.0.0/8"])] {
        let body = json!({"name": "dual", "cidr": "10.1.0.0/16", "ipv6_cidrs": cidrs6});
        let a = api.post("/v1/universes", body).await;
        a.error(StatusCode::BAD_REQUEST, "invalid_argument", "ipv6_cidrs");
    }
    assert_eq!(api.store.snapshot().revision, base);
    assert_eq!(api.get("/v1/universes").await.body, json!([]));

    let body = json!({"name": "dual", "cidr": "10.1.0.0/16", "ipv6_cidrs": ["fd00:ab:0:0::/48"]});
    let a = api.post("/v1/universes", body).await;
    assert_eq!(a.status, StatusCode::CREATED, "{}", a.text);
    assert_eq!(a.body["ipv6_cidrs"], json!(["fd00:ab::/48"]), "{}", a.text);
    let u = id(&a.body);
    let v4 = id(&api.universe("blue", "10.2.0.0/16").await);

    let revision = api.store.snapshot().revision;
    for (universe, ipv6) in
        [(&u, "fd00:cd::5"), (&u, "fd00:ab::1"), (&u, "nope"), (&v4, "fd00:ab::5")]
    {
        let body = json!({"universe": universe, "host": "host-b", "netns": "n", "ip": if universe == &u { "10.1.0.5" } else { "10.2.0.5" }, "ipv6": ipv6});
        let a = api.post("/v1/endpoints", body).await;
        a.error(StatusCode::BAD_REQUEST, "invalid_argument", "ipv6");
    }
    assert_eq!(api.store.snapshot().revision, revision);
    assert_eq!(api.get("/v1/endpoints").await.body, json!([]));
    let body = json!({"universe": u, "host": "host-b", "netns": "n", "ip": "10.1.0.5", "ipv6": "fd00:ab::5"});
    let a = api.post("/v1/endpoints", body).await;
    assert_eq!(a.status, StatusCode::CREATED, "{}", a.text);
    assert_eq!(a.body["ipv6"], "fd00:ab::5", "{}", a.text);
    // Without ipv6, an endpoint is shown without an ipv6 field.
    let a = api.remote_endpoint(&u, "10.1.0.6", None).await;
    assert_eq!(a.status, StatusCode::CREATED, "{}", a.text);
    assert!(a.body.get("ipv6").is_none(), "{}", a.text);

    // IPv6 rules are not gated; icmp with an IPv6 CIDR is accepted and matches nothing, as AWS
    // does.
    let g = id(&api.group(&u, "web").await);
    let rules = format!("/v1/security-groups/{g}/rules");
    let a = api
        .post(
            &rules,
            json!({"direction": "ingress", "protocol": "icmpv6", "icmp_type": 128, "cidr": "::/0"}),
        )
        .await;
    assert_eq!(a.status, StatusCode::CREATED, "{}", a.text);
    let a =
        api.post(&rules, json!({"direction": "ingress", "protocol": "icmp", "cidr": "::/0"})).await;
    assert_eq!(a.status, StatusCode::CREATED, "{}", a.text);
}

#[tokio::test]
async fn duplicate_universe_name_is_409() {
    let api = api().await;
    api.universe("blue", "10.1.0.0/16").await;
    let a = api.post("/v1/universes", json!({"name": "blue", "cidr": "10.2.0.0/16"})).await;
    a.error(StatusCode::CONFLICT, "duplicate", "name");
}

#[tokio::test]
async fn universe_unknown_id_is_404_and_delete_with_endpoints_is_409() {
    let api = api().await;
    api.get("/v1/universes/uni-00000000").await.error(
        StatusCode::NOT_FOUND,
        "not_found",
        "uni-00000000",
    );
    api.delete("/v1/universes/uni-00000000").await.error(
        StatusCode::NOT_FOUND,
        "not_found",
        "uni-00000000",
    );

    let u = api.universe("blue", "10.1.0.0/16").await;
    let ep = api.remote_endpoint(&id(&u), "10.1.0.5", None).await;
    assert_eq!(ep.status, StatusCode::CREATED, "{}", ep.text);
    let uri = format!("/v1/universes/{}", id(&u));
    api.delete(&uri).await.error(StatusCode::CONFLICT, "in_use", &id(&u));

    let a = api.delete(&format!("/v1/endpoints/{}", id(&ep.body))).await;
    assert_eq!(a.status, StatusCode::NO_CONTENT);
    let a = api.delete(&uri).await;
    assert_eq!(a.status, StatusCode::NO_CONTENT, "{}", a.text);
    assert!(a.revision.is_some());
    assert_eq!(a.text, "");
    api.get(&uri).await.error(StatusCode::NOT_FOUND, "not_found", &id(&u));
    // Its groups went with it.
    assert_eq!(api.get("/v1/security-groups").await.body, json!([]));
}

// ---- Security groups ----

#[tokio::test]
async fn create_group_returns_201_with_s2_rules() {
    let api = api().await;
    let u = api.universe("blue", "10.1.0.0/16").await;
    let a = api
        .post(
            "/v1/security-groups",
            json!({"universe": id(&u), "name": "web", "description": "front"}),
        )
        .await;
    assert_eq!(a.status, StatusCode::CREATED, "{}", a.text);
    assert_eq!(a.revision, Some(api.base + 2));
    let g = &a.body;
    let keys: Vec<_> = g.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(keys, ["description", "egress", "id", "ingress", "name", "universe"]);
    assert!(id(g).starts_with("sg-"));
    assert_eq!(g["universe"], id(&u));
    assert_eq!(g["description"], "front");
    // S2: no ingress; egress to all, v4 and v6.
    assert_eq!(g["ingress"], json!([]));
    // A group lists its rules in the order of their ids (`model::insert_by_id`), not of CIDRs.
    let egress = g["egress"].as_array().unwrap();
    let mut cidrs: Vec<&str> = egress.iter().map(|r| r["cidr"].as_str().unwrap()).collect();
    cidrs.sort_unstable();
    assert_eq!(cidrs, ["0.0.0.0/0", "::/0"]);
    assert!(egress.windows(2).all(|w| w[0]["id"].as_str() < w[1]["id"].as_str()), "{g}");
    assert!(g["egress"].as_array().unwrap().iter().all(|r| r["protocol"] == "all"));
    let shown = api.get(&format!("/v1/security-groups/{}", id(g))).await;
    assert_eq!(without_hits(&shown.body), *g);
    // This host counts no rule of the new group yet: every rule shows 0 new flows, 0 packets.
    for r in shown.body["egress"].as_array().unwrap() {
        assert_eq!(r["hits"], json!({"flows": 0, "packets": 0}), "{r}");
    }
    // The other hosts of the store registered no API address: their counters are missing, and
    // the answer says so rather than showing their share as 0.
    assert_eq!(shown.body["hits_from"]["hosts"], json!([HOST]));
    let missing = shown.body["hits_from"]["missing"].as_array().unwrap();
    assert!(!missing.is_empty());
    for m in missing {
        assert_ne!(m["host"], HOST);
        assert!(m["error"].as_str().unwrap().contains("advertise_api"), "{m}");
    }
}

#[tokio::test]
async fn group_errors_name_the_field() {
    let api = api().await;
    let u = api.universe("blue", "10.1.0.0/16").await;
    let uid = id(&u);
    let bad = |body: &str| body.to_owned();
    for (body, field) in [
        (bad(r#"{"name": "web"}"#), "universe"),
        (format!(r#"{{"universe": "{uid}"}}"#), "name"),
        (format!(r#"{{"universe": "{uid}", "name": "web", "description": 3}}"#), "description"),
        (format!(r#"{{"universe": "{uid}", "name": "web", "rules": []}}"#), "rules"),
    ] {
        let a = api.call(Method::POST, "/v1/security-groups", Some(&body)).await;
        a.error(StatusCode::BAD_REQUEST, "invalid_argument", field);
    }
    let a =
        api.post("/v1/security-groups", json!({"universe": "uni-00000000", "name": "web"})).await;
    a.error(StatusCode::NOT_FOUND, "not_found", "universe");
    api.group(&uid, "web").await;
    let a = api.post("/v1/security-groups", json!({"universe": uid, "name": "web"})).await;
    a.error(StatusCode::CONFLICT, "duplicate", "name");
    api.get("/v1/security-groups/sg-00000000").await.error(
        StatusCode::NOT_FOUND,
        "not_found",
        "sg-00000000",
    );
    api.delete("/v1/security-groups/sg-00000000").await.error(
        StatusCode::NOT_FOUND,
        "not_found",
        "sg-00000000",
    );
    api.get("/v1/security-groups?universes=x").await.error(
        StatusCode::BAD_REQUEST,
        "invalid_argument",
        "universes",
    );
}

#[tokio::test]
async fn group_list_filters_by_universe() {
    let api = api().await;
    let blue = id(&api.universe("blue", "10.1.0.0/16").await);
    let red = id(&api.universe("red", "10.1.0.0/16").await);
    api.group(&blue, "web").await;
    let all = api.get("/v1/security-groups").await.body;
    assert_eq!(all.as_array().unwrap().len(), 3);
    let only_blue = api.get(&format!("/v1/security-groups?universe={blue}")).await.body;
    let names: Vec<_> =
        only_blue.as_array().unwrap().iter().map(|g| g["name"].as_str().unwrap()).collect();
    assert_eq!(names.len(), 2);
    assert!(only_blue.as_array().unwrap().iter().all(|g| g["universe"] == blue.as_str()));
    let only_red = api.get(&format!("/v1/security-groups?universe={red}")).await.body;
    assert_eq!(only_red.as_array().unwrap().len(), 1);
    assert_eq!(api.get("/v1/security-groups?universe=uni-00000000").await.body, json!([]));
}

#[tokio::test]
async fn group_in_use_or_referenced_cannot_be_deleted() {
    let api = api().await;
    let u = id(&api.universe("blue", "10.1.0.0/16").await);
    let web = id(&api.group(&u, "web").await);
    let db = id(&api.group(&u, "db").await);
    let ep = api.remote_endpoint(&u, "10.1.0.5", Some(vec![&web])).await;
    assert_eq!(ep.status, StatusCode::CREATED, "{}", ep.text);
    api.delete(&format!("/v1/security-groups/{web}")).await.error(
        StatusCode::CONFLICT,
        "in_use",
        &web,
    );

    let r = api
        .post(
            &format!("/v1/security-groups/{db}/rules"),
            json!({"direction": "ingress", "protocol": "tcp", "from_port": 5432, "to_port": 5432, "group": web}),
        )
        .await;
    assert_eq!(r.status, StatusCode::CREATED, "{}", r.text);
    api.delete(&format!("/v1/endpoints/{}", id(&ep.body))).await;
    api.delete(&format!("/v1/security-groups/{web}")).await.error(
        StatusCode::CONFLICT,
        "in_use",
        &web,
    );

    let a = api.delete(&format!("/v1/security-groups/{db}/rules/{}", id(&r.body))).await;
    assert_eq!(a.status, StatusCode::NO_CONTENT);
    let a = api.delete(&format!("/v1/security-groups/{web}")).await;
    assert_eq!(a.status, StatusCode::NO_CONTENT, "{}", a.text);
    assert!(a.revision.is_some());
}

// ---- Rules ----

#[tokio::test]
async fn add_rule_returns_201_with_the_rule_and_canonical_cidr() {
    let api = api().await;
    let u = id(&api.universe("blue", "10.1.0.0/16").await);
    let web = id(&api.group(&u, "web").await);
    let before = api.store.snapshot().revision;
    let a = api
        .post(
            &format!("/v1/security-groups/{web}/rules"),
            json!({"direction": "ingress", "protocol": "tcp", "from_port": 80, "to_port": 443,
                   "cidr": "192.168.7.9/16", "description": "http"}),
        )
        .await;
    assert_eq!(a.status, StatusCode::CREATED, "{}", a.text);
    assert_eq!(a.revision, Some(before + 1));
    let r = &a.body;
    assert!(id(r).starts_with("sgr-"));
    assert_eq!(r["direction"], "ingress");
    assert_eq!(r["protocol"], "tcp");
    assert_eq!((r["from_port"].clone(), r["to_port"].clone()), (json!(80), json!(443)));
    assert_eq!(r["cidr"], "192.168.0.0/16");
    assert_eq!(r["description"], "http");
    let g = without_hits(&api.get(&format!("/v1/security-groups/{web}")).await.body);
    assert_eq!(g["ingress"], json!([r]));

    // ICMP with -1 (any code), a protocol given as a number.
    let a = api
        .post(
            &format!("/v1/security-groups/{web}/rules"),
            json!({"direction": "ingress", "protocol": 1, "icmp_type": 8, "icmp_code": -1, "group": web}),
        )
        .await;
    assert_eq!(a.status, StatusCode::CREATED, "{}", a.text);
    assert_eq!(a.body["protocol"], "icmp");
    assert_eq!((a.body["icmp_type"].clone(), a.body["icmp_code"].clone()), (json!(8), json!(-1)));
    assert_eq!(a.body["group"], web.as_str());
}

#[tokio::test]
async fn rule_errors_name_the_field() {
    let api = api().await;
    let u = id(&api.universe("blue", "10.1.0.0/16").await);
    let web = id(&api.group(&u, "web").await);
    let other_u = id(&api.universe("red", "10.9.0.0/16").await);
    let foreign = id(&api.group(&other_u, "x").await);
    let uri = format!("/v1/security-groups/{web}/rules");
    let base = json!({"direction": "ingress", "protocol": "tcp", "from_port": 80, "to_port": 80, "cidr": "10.0.0.0/8"});
    let with = |k: &str, v: Value| {
        let mut b = base.clone();
        if v.is_null() {
            b.as_object_mut().unwrap().remove(k);
        } else {
            b[k] = v;
        }
        b
    };
    for (body, field) in [
        (with("direction", json!("sideways")), "direction"),
        (with("direction", Value::Null), "direction"),
        (with("protocol", json!("tcpp")), "protocol"),
        (with("protocol", json!(256)), "protocol"),
        (with("protocol", Value::Null), "protocol"),
        (with("from_port", json!(90)), "from_port"),
        (with("to_port", json!(70000)), "to_port"),
        (with("from_port", json!("80")), "from_port"),
        (with("icmp_type", json!(8)), "icmp_type"),
        (with("cidr", json!("10.0.0.0/33")), "cidr"),
        (with("cidr", Value::Null), "cidr"),
        (with("group", json!(web)), "cidr"),
        (with("colour", json!("red")), "colour"),
        (with("description", json!(["x"])), "description"),
    ] {
        let a = api.post(&uri, body.clone()).await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{body}: {}", a.text);
        a.error(StatusCode::BAD_REQUEST, "invalid_argument", field);
    }
    // A peer group of another universe does not exist in this one.
    let a =
        api.post(&uri, json!({"direction": "ingress", "protocol": "all", "group": foreign})).await;
    a.error(StatusCode::NOT_FOUND, "not_found", "group");
    // 404s: the group of the path, the peer group.
    let a = api.post("/v1/security-groups/sg-00000000/rules", base.clone()).await;
    a.error(StatusCode::NOT_FOUND, "not_found", "sg-00000000");
    let a = api
        .post(&uri, json!({"direction": "ingress", "protocol": "all", "group": "sg-00000000"}))
        .await;
    a.error(StatusCode::NOT_FOUND, "not_found", "group");
    // 409: an exact duplicate (S4), also when the CIDR is written differently.
    let a = api.post(&uri, base.clone()).await;
    assert_eq!(a.status, StatusCode::CREATED, "{}", a.text);
    let a = api.post(&uri, with("cidr", json!("10.1.2.3/8"))).await;
    a.error(StatusCode::CONFLICT, "duplicate", &web);
    // Deleting unknown rules and rules of unknown groups.
    api.delete(&format!("{uri}/sgr-00000000")).await.error(
        StatusCode::NOT_FOUND,
        "not_found",
        "sgr-00000000",
    );
    api.delete("/v1/security-groups/sg-00000000/rules/sgr-00000000").await.error(
        StatusCode::NOT_FOUND,
        "not_found",
        "sg-00000000",
    );
}

#[tokio::test]
async fn group_rule_limit_is_409_s12() {
    let api = api().await;
    let u = id(&api.universe("blue", "10.1.0.0/16").await);
    let web = id(&api.group(&u, "web").await);
    // The group has its two S2 egress rules; fill it to 1000 in one store edit to keep it fast.
    let w = web.clone();
    api.store
        .edit(move |s| {
            for port in 0..998u16 {
                let req = verse::model::CreateRule {
                    direction: "ingress".into(),
                    protocol: json!("tcp"),
                    from_port: Some(i64::from(port)),
                    to_port: Some(i64::from(port)),
                    cidr: Some("10.0.0.0/8".into()),
                    ..Default::default()
                };
                s.add_rule(&w, req)?;
            }
            Ok(())
        })
        .await
        .unwrap();
    let a = api
        .post(
            &format!("/v1/security-groups/{web}/rules"),
            json!({"direction": "ingress", "protocol": "udp", "from_port": 53, "to_port": 53, "cidr": "10.0.0.0/8"}),
        )
        .await;
    a.error(StatusCode::CONFLICT, "limit_exceeded", &web);
}

// ---- Endpoints ----

#[tokio::test]
async fn create_endpoint_returns_201_without_internal_fields() {
    let api = api().await;
    let u = id(&api.universe("blue", "10.1.0.0/16").await);
    let web = id(&api.group(&u, "web").await);
    let before = api.store.snapshot().revision;
    let a = api.remote_endpoint(&u, "10.1.0.5", Some(vec![&web])).await;
    assert_eq!(a.status, StatusCode::CREATED, "{}", a.text);
    assert_eq!(a.revision, Some(before + 1));
    let e = a.body.as_object().unwrap();
    let keys: Vec<_> = e.keys().map(String::as_str).collect();
    // No identity, serial or slot: those are internal.
    assert_eq!(
        keys,
        [
            "conntrack_budget",
            "flow_logs",
            "host",
            "id",
            "interface",
            "ip",
            "mac",
            "netns",
            "security_groups",
            "universe"
        ]
    );
    assert_eq!(e["conntrack_budget"], verse::model::DEFAULT_CONNTRACK_BUDGET);
    assert!(e["id"].as_str().unwrap().starts_with("ep-"));
    assert_eq!(e["host"], "host-b");
    assert_eq!(e["ip"], "10.1.0.5");
    assert_eq!(e["netns"], "ns-10.1.0.5");
    assert_eq!(e["security_groups"], json!([web]));
    assert!(e["mac"].as_str().unwrap().starts_with("02:"));
    assert!(e["interface"].as_str().unwrap().len() <= 15);

    // Without groups: the universe's default group (S3).
    let a = api.remote_endpoint(&u, "10.1.0.6", None).await;
    assert_eq!(a.status, StatusCode::CREATED, "{}", a.text);
    let groups = api.get(&format!("/v1/security-groups?universe={u}")).await.body;
    let default = groups.as_array().unwrap().iter().find(|g| g["name"] == "default").unwrap();
    assert_eq!(a.body["security_groups"], json!([default["id"]]));
}

#[tokio::test]
async fn local_endpoint_needs_an_existing_netns() {
    let api = api().await;
    let u = id(&api.universe("blue", "10.1.0.0/16").await);
    let ns = format!("verse-test-absent-{}", std::process::id());
    let a = api.post("/v1/endpoints", json!({"universe": u, "netns": ns, "ip": "10.1.0.5"})).await;
    // Like an id that does not exist: a 404 naming the field.
    a.error(StatusCode::NOT_FOUND, "not_found", "netns");
    assert!(a.body["error"]["message"].as_str().unwrap().contains(&ns));
    let a = api
        .post("/v1/endpoints", json!({"universe": u, "host": HOST, "netns": ns, "ip": "10.1.0.5"}))
        .await;
    a.error(StatusCode::NOT_FOUND, "not_found", "netns");
    let a = api
        .post("/v1/endpoints", json!({"universe": u, "netns": "../etc", "ip": "10.1.0.5"}))
        .await;
    a.error(StatusCode::BAD_REQUEST, "invalid_argument", "netns");
    assert_eq!(api.get("/v1/endpoints").await.body, json!([]));
}

#[tokio::test]
async fn endpoint_errors_name_the_field() {
    let api = api().await;
    let u = id(&api.universe("blue", "10.1.0.0/16").await);
    let other = id(&api.universe("red", "10.2.0.0/16").await);
    let foreign = id(&api.group(&other, "x").await);
    let web = id(&api.group(&u, "web").await);
    let ep = |ip: &str, sgs: Value| json!({"universe": u, "host": "host-b", "netns": format!("ns-{ip}"), "ip": ip, "security_groups": sgs});
    for (body, field) in [
        (json!({"universe": u, "host": "host-b", "ip": "10.1.0.5"}), "netns"),
        (json!({"host": "host-b", "netns": "n", "ip": "10.1.0.5"}), "universe"),
        (json!({"universe": u, "host": "host-b", "netns": "n"}), "ip"),
        (json!({"universe": u, "host": "host-b", "netns": "n", "ip": 5}), "ip"),
        (
            json!({"universe": u, "host": "host-b", "netns": "n", "ip": "10.1.0.5", "mac": "x"}),
            "mac",
        ),
        (ep("10.1.0.500", json!([web])), "ip"),
        (ep("10.3.0.5", json!([web])), "ip"),
        (ep("10.1.0.5", json!([])), "security_groups"),
        (ep("10.1.0.5", json!([web, web])), "security_groups[1]"),
        (ep("10.1.0.5", json!("web")), "security_groups"),
        (json!({"universe": u, "host": "bad host", "netns": "n", "ip": "10.1.0.5"}), "host"),
    ] {
        let a = api.post("/v1/endpoints", body.clone()).await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{body}: {}", a.text);
        a.error(StatusCode::BAD_REQUEST, "invalid_argument", field);
    }
    let a = api
        .post(
            "/v1/endpoints",
            json!({"universe": "uni-00000000", "host": "host-b", "netns": "n", "ip": "10.1.0.5"}),
        )
        .await;
    a.error(StatusCode::NOT_FOUND, "not_found", "universe");
    // A group of another universe does not exist in this one.
    let a = api.post("/v1/endpoints", ep("10.1.0.5", json!([foreign]))).await;
    a.error(StatusCode::NOT_FOUND, "not_found", "security_groups[0]");
    // A host that is not in the fleet would never plumb it: refused, naming the host.
    let a = api
        .post(
            "/v1/endpoints",
            json!({"universe": u, "host": "elsewhere", "netns": "n", "ip": "10.1.0.5"}),
        )
        .await;
    a.error(StatusCode::NOT_FOUND, "not_found", "host");
    assert!(a.text.contains("elsewhere") && a.text.contains("host-b"), "{}", a.text);
    assert_eq!(api.get("/v1/endpoints").await.body, json!([]), "nothing was created");
    let a = api.post("/v1/endpoints", ep("10.1.0.5", json!(["sg-00000000"]))).await;
    a.error(StatusCode::NOT_FOUND, "not_found", "security_groups[0]");
    // S12: 17 groups.
    let mut many = Vec::new();
    for i in 0..17 {
        many.push(id(&api.group(&u, &format!("g{i}")).await));
    }
    let a = api.post("/v1/endpoints", ep("10.1.0.5", json!(many))).await;
    a.error(StatusCode::CONFLICT, "limit_exceeded", "security_groups");
    // Duplicate IP in the universe; duplicate namespace on a host.
    assert_eq!(
        api.post("/v1/endpoints", ep("10.1.0.5", json!([web]))).await.status,
        StatusCode::CREATED
    );
    let a = api
        .post(
            "/v1/endpoints",
            json!({"universe": u, "host": "host-b", "netns": "other", "ip": "10.1.0.5"}),
        )
        .await;
    a.error(StatusCode::CONFLICT, "duplicate", "ip");
    let a = api
        .post(
            "/v1/endpoints",
            json!({"universe": u, "host": "host-b", "netns": "ns-10.1.0.5", "ip": "10.1.0.6"}),
        )
        .await;
    a.error(StatusCode::CONFLICT, "duplicate", "netns");
}

#[tokio::test]
async fn patch_endpoint_changes_groups_and_reports_errors() {
    let api = api().await;
    let u = id(&api.universe("blue", "10.1.0.0/16").await);
    let web = id(&api.group(&u, "web").await);
    let db = id(&api.group(&u, "db").await);
    let ep = id(&api.remote_endpoint(&u, "10.1.0.5", Some(vec![&web])).await.body);
    let uri = format!("/v1/endpoints/{ep}");
    let a = api
        .call(Method::PATCH, &uri, Some(&json!({"security_groups": [web, db]}).to_string()))
        .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text);
    assert!(a.revision.is_some());
    assert_eq!(a.body["security_groups"], json!([web, db]));
    assert_eq!(api.get(&uri).await.body, a.body);

    let patch = |body: Value| {
        let uri = uri.clone();
        let api = &api;
        async move { api.call(Method::PATCH, &uri, Some(&body.to_string())).await }
    };
    patch(json!({"security_groups": []})).await.error(
        StatusCode::BAD_REQUEST,
        "invalid_argument",
        "security_groups",
    );
    patch(json!({})).await.error(StatusCode::BAD_REQUEST, "invalid_argument", "security_groups");
    patch(json!({"security_groups": [web], "ip": "10.1.0.9"})).await.error(
        StatusCode::BAD_REQUEST,
        "invalid_argument",
        "ip",
    );
    patch(json!({"security_groups": ["sg-00000000"]})).await.error(
        StatusCode::NOT_FOUND,
        "not_found",
        "security_groups[0]",
    );
    let a = api
        .call(
            Method::PATCH,
            "/v1/endpoints/ep-00000000",
            Some(&json!({"security_groups": [web]}).to_string()),
        )
        .await;
    a.error(StatusCode::NOT_FOUND, "not_found", "ep-00000000");
}

#[tokio::test]
async fn endpoint_list_filters_by_universe_and_host() {
    let api = api().await;
    let blue = id(&api.universe("blue", "10.1.0.0/16").await);
    let red = id(&api.universe("red", "10.1.0.0/16").await);
    api.remote_endpoint(&blue, "10.1.0.5", None).await;
    let a = api
        .post(
            "/v1/endpoints",
            json!({"universe": red, "host": "host-b", "netns": "red-5", "ip": "10.1.0.5"}),
        )
        .await;
    assert_eq!(a.status, StatusCode::CREATED, "{}", a.text);
    let a = api
        .post(
            "/v1/endpoints",
            json!({"universe": red, "host": "host-c", "netns": "n", "ip": "10.1.0.6"}),
        )
        .await;
    assert_eq!(a.status, StatusCode::CREATED, "{}", a.text);
    let count = |v: Value| v.as_array().unwrap().len();
    assert_eq!(count(api.get("/v1/endpoints").await.body), 3);
    assert_eq!(count(api.get(&format!("/v1/endpoints?universe={blue}")).await.body), 1);
    assert_eq!(count(api.get(&format!("/v1/endpoints?universe={red}")).await.body), 2);
    assert_eq!(count(api.get("/v1/endpoints?host=host-c").await.body), 1);
    assert_eq!(count(api.get(&format!("/v1/endpoints?universe={red}&host=host-b")).await.body), 1);
    assert_eq!(count(api.get("/v1/endpoints?host=nowhere").await.body), 0);
    api.get("/v1/endpoints?hots=x").await.error(
        StatusCode::BAD_REQUEST,
        "invalid_argument",
        "hots",
    );
    api.get("/v1/endpoints?host=a&host=b").await.error(
        StatusCode::BAD_REQUEST,
        "invalid_argument",
        "host",
    );
}

#[tokio::test]
async fn endpoint_get_and_delete_unknown_are_404() {
    let api = api().await;
    api.get("/v1/endpoints/ep-00000000").await.error(
        StatusCode::NOT_FOUND,
        "not_found",
        "ep-00000000",
    );
    api.delete("/v1/endpoints/ep-00000000").await.error(
        StatusCode::NOT_FOUND,
        "not_found",
        "ep-00000000",
    );
}

// ---- Revisions, hosts, service routes ----

#[tokio::test]
async fn mutation_returns_only_once_its_revision_is_realized() {
    let api = api_with(false).await;
    let tx = api.realized.clone();
    let mut rx = api.store.subscribe();
    tokio::spawn(async move {
        rx.changed().await.unwrap();
        let rev = rx.borrow().revision;
        tokio::time::sleep(Duration::from_millis(300)).await;
        tx.send_replace(Realized::at(rev));
    });
    let start = Instant::now();
    let a = api.post("/v1/universes", json!({"name": "blue", "cidr": "10.1.0.0/16"})).await;
    assert_eq!(a.status, StatusCode::CREATED);
    assert!(start.elapsed() >= Duration::from_millis(300), "returned before realization");
    assert_eq!(api.realized.borrow().revision, a.revision.unwrap());
    let hosts = api.get("/v1/hosts").await.body;
    let rev = api.base + 1;
    assert_eq!(
        hosts,
        json!([{"name": HOST, "underlay_ip": null, "revision": rev, "healthy": true, "errors": []}])
    );
}

#[tokio::test]
async fn mutation_waits_for_every_healthy_host_s13() {
    let api = api_with(true).await;
    // Another host of the store, healthy, that realizes each revision 300 ms late.
    api.store.register_host("host-b", Some("198.18.0.2".parse().unwrap())).await.unwrap();
    let store = api.store.clone();
    let mut rx = api.store.subscribe();
    tokio::spawn(async move {
        rx.changed().await.unwrap();
        let rev = rx.borrow().revision;
        tokio::time::sleep(Duration::from_millis(300)).await;
        store.report_realized("host-b", rev);
    });
    let start = Instant::now();
    let a = api.post("/v1/universes", json!({"name": "blue", "cidr": "10.1.0.0/16"})).await;
    assert_eq!(a.status, StatusCode::CREATED);
    assert!(start.elapsed() >= Duration::from_millis(300), "returned before host-b realized it");
    let hosts = api.get("/v1/hosts").await.body;
    let rev = api.base + 1;
    assert_eq!(
        hosts,
        json!([
            {"name": HOST, "underlay_ip": null, "revision": rev, "healthy": true, "errors": []},
            {"name": "host-b", "underlay_ip": "198.18.0.2", "revision": rev, "healthy": true, "errors": []},
        ])
    );
}

#[tokio::test]
async fn revisions_increase_by_one_per_mutation_s13() {
    let api = api().await;
    let mut revs = Vec::new();
    let u = api.post("/v1/universes", json!({"name": "blue", "cidr": "10.1.0.0/16"})).await;
    revs.push(u.revision.unwrap());
    let g = api.post("/v1/security-groups", json!({"universe": id(&u.body), "name": "web"})).await;
    revs.push(g.revision.unwrap());
    let r = api
        .post(&format!("/v1/security-groups/{}/rules", id(&g.body)), json!({"direction": "egress", "protocol": "udp", "from_port": 53, "to_port": 53, "cidr": "10.0.0.0/8"}))
        .await;
    revs.push(r.revision.unwrap());
    revs.push(
        api.delete(&format!("/v1/security-groups/{}/rules/{}", id(&g.body), id(&r.body)))
            .await
            .revision
            .unwrap(),
    );
    let b = api.base;
    assert_eq!(revs, [b + 1, b + 2, b + 3, b + 4]);
    // Reads carry no revision header.
    assert_eq!(api.get("/v1/universes").await.revision, None);
}

#[tokio::test]
async fn healthz_metrics_and_unknown_routes() {
    let api = api().await;
    let a = api.get("/healthz").await;
    assert_eq!((a.status, a.text.as_str()), (StatusCode::OK, "ok"));

    let u = id(&api.universe("blue", "10.1.0.0/16").await);
    api.remote_endpoint(&u, "10.1.0.5", None).await;
    let m = api.get("/metrics").await;
    assert_eq!(m.status, StatusCode::OK);
    for reason in DropReason::ALL {
        for hook in Hook::ALL {
            let want = match (reason, hook) {
                (DropReason::SpoofedIp, Hook::FromEndpoint) => 7,
                (DropReason::PolicyIngress, Hook::FromUnderlay) => 3,
                _ => 0,
            };
            let labels = format!("{{reason=\"{}\",hook=\"{}\"}}", reason.label(), hook.label());
            for line in [
                format!("verse_drops_total{labels} {want}"),
                format!("verse_drop_bytes_total{labels} {}", want * 60),
            ] {
                assert!(m.text.lines().any(|l| l == line), "missing {line:?} in\n{}", m.text);
            }
        }
    }
    for outcome in ["emitted", "suppressed", "lost"] {
        let line = format!("verse_events_total{{kind=\"drop\",outcome=\"{outcome}\"}} 0");
        assert!(m.text.lines().any(|l| l == line), "missing {line:?} in\n{}", m.text);
    }
    for line in
        ["verse_endpoints 1", "verse_universes 1", "verse_security_groups 1", "verse_rules 3"]
    {
        assert!(m.text.lines().any(|l| l == line), "missing {line:?} in\n{}", m.text);
    }
    for line in [
        format!("verse_revision {}", api.base + 2),
        format!("verse_realized_revision {}", api.base + 2),
    ] {
        assert!(m.text.lines().any(|l| l == line), "missing {line:?} in\n{}", m.text);
    }

    api.get("/v1/nothing").await.error(StatusCode::NOT_FOUND, "not_found", "/v1/nothing");
    api.call(Method::PUT, "/v1/universes", None).await.error(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "PUT",
    );
}

#[tokio::test]
async fn openapi_describes_every_route() {
    let api = api().await;
    let doc = api.get("/v1/openapi.json").await;
    assert_eq!(doc.status, StatusCode::OK);
    let doc = doc.body;
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."));
    let paths = doc["paths"].as_object().unwrap();
    for (path, methods) in [
        ("/healthz", &["get"][..]),
        ("/metrics", &["get"]),
        ("/v1/openapi.json", &["get"]),
        ("/v1/universes", &["get", "post"]),
        ("/v1/universes/{id}", &["get", "delete"]),
        ("/v1/security-groups", &["get", "post"]),
        ("/v1/security-groups/{id}", &["get", "delete"]),
        ("/v1/security-groups/{id}/rules", &["post"]),
        ("/v1/security-groups/{id}/rules/{rule_id}", &["delete"]),
        ("/v1/endpoints", &["get", "post"]),
        ("/v1/endpoints/{id}", &["get", "patch", "delete"]),
        ("/v1/hosts", &["get"]),
        ("/v1/tokens", &["get", "post"]),
        ("/v1/tokens/{id}", &["delete"]),
        ("/v1/audit", &["get"]),
        ("/v1/trace", &["get"]),
        ("/v1/flow-logs", &["get"]),
    ] {
        let item = paths.get(path).unwrap_or_else(|| panic!("{path} missing"));
        for m in methods {
            assert!(item.get(*m).is_some(), "{m} {path} missing");
        }
    }
    assert_eq!(paths.len(), 17, "a path the router does not serve is described");
    // Every $ref resolves.
    fn refs(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(m) => {
                for (k, v) in m {
                    if k == "$ref" {
                        out.push(v.as_str().unwrap().to_owned());
                    } else {
                        refs(v, out);
                    }
                }
            }
            Value::Array(a) => a.iter().for_each(|v| refs(v, out)),
            _ => {}
        }
    }
    let mut all = Vec::new();
    refs(&doc, &mut all);
    for r in all {
        let pointer = r.trim_start_matches('#');
        assert!(doc.pointer(pointer).is_some(), "dangling {r}");
    }
    // Request schemas list exactly the fields the server accepts.
    let accepts = |schema: &str| -> Vec<String> {
        let mut v: Vec<String> = doc["components"]["schemas"][schema]["properties"]
            .as_object()
            .unwrap()
            .keys()
            .cloned()
            .collect();
        v.sort();
        v
    };
    let fields = |v: Value| -> Vec<String> {
        let mut v: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        v.sort();
        v
    };
    assert_eq!(
        accepts("CreateUniverse"),
        fields(
            serde_json::to_value(verse::model::CreateUniverse {
                cidr: Some(String::new()),
                cidrs: Some(vec![]),
                ipv6_cidrs: Some(vec![]),
                ..Default::default()
            })
            .unwrap()
        )
    );
    assert_eq!(
        accepts("CreateSecurityGroup"),
        fields(
            serde_json::to_value(verse::model::CreateGroup {
                description: Some(String::new()),
                ..Default::default()
            })
            .unwrap()
        )
    );
    assert_eq!(
        accepts("CreateRule"),
        fields(
            serde_json::to_value(verse::model::CreateRule {
                from_port: Some(0),
                to_port: Some(0),
                icmp_type: Some(0),
                icmp_code: Some(0),
                cidr: Some(String::new()),
                group: Some(String::new()),
                description: Some(String::new()),
                ..Default::default()
            })
            .unwrap()
        )
    );
    assert_eq!(
        accepts("CreateEndpoint"),
        fields(
            serde_json::to_value(verse::model::CreateEndpoint {
                host: Some(String::new()),
                ipv6: Some(String::new()),
                security_groups: Some(vec![]),
                conntrack_budget: Some(1),
                flow_logs: Some(false),
                ..Default::default()
            })
            .unwrap()
        )
    );
    assert_eq!(
        accepts("PatchEndpoint"),
        fields(
            serde_json::to_value(verse::model::PatchEndpoint {
                security_groups: Some(vec![]),
                flow_logs: Some(false),
            })
            .unwrap()
        )
    );
    let token = verse::model::CreateToken {
        role: verse::model::Role::Viewer,
        universe: Some(String::new()),
        expires: Some(String::new()),
        description: Some(String::new()),
    };
    assert_eq!(accepts("CreateToken"), fields(serde_json::to_value(token).unwrap()));
}

#[tokio::test]
async fn state_survives_a_restart_of_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let (uid, rev) = {
        let store = Store::open_embedded(dir.path()).unwrap();
        let (u, rev) = store
            .edit(|s| {
                s.create_universe(verse::model::CreateUniverse {
                    name: "blue".into(),
                    cidr: Some("10.1.0.0/16".into()),
                    cidrs: None,
                    ipv6_cidrs: None,
                })
            })
            .await
            .unwrap();
        (u.id, rev)
    };
    let store = Store::open_embedded(dir.path()).unwrap();
    let snap = store.snapshot();
    assert_eq!(snap.revision, rev);
    assert!(snap.universes.contains_key(&uid));
    assert_eq!(snap.groups.len(), 1, "the default group persisted too");
}

// ---- Access (S15): every role against every route ----

/// One universe's objects, made by the admin.
struct Fixture {
    uni: String,
    group: String,
    endpoint: String,
}

impl Api {
    async fn fixture(&self, name: &str, cidr: &str, ip: &str) -> Fixture {
        let uni = id(&self.universe(name, cidr).await);
        let group = id(&self.group(&uni, "web").await);
        let rule = self
            .post(
                &format!("/v1/security-groups/{group}/rules"),
                json!({"direction": "ingress", "protocol": "tcp", "from_port": 80, "to_port": 80, "cidr": "10.0.0.0/8"}),
            )
            .await;
        assert_eq!(rule.status, StatusCode::CREATED, "{}", rule.text);
        let ep = self.remote_endpoint(&uni, ip, Some(vec![&group])).await;
        assert_eq!(ep.status, StatusCode::CREATED, "{}", ep.text);
        Fixture { uni, group, endpoint: id(&ep.body) }
    }

    /// A token made through the API by the admin; returns its secret and id.
    async fn token(&self, role: &str, universe: Option<&str>) -> (String, String) {
        let mut req = json!({"role": role});
        if let Some(u) = universe {
            req["universe"] = json!(u);
        }
        let a = self.post("/v1/tokens", req).await;
        assert_eq!(a.status, StatusCode::CREATED, "{}", a.text);
        (a.body["token"].as_str().unwrap().to_owned(), id(&a.body))
    }
}

/// Which universe a request aims at, for a principal confined to the first one.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Target {
    /// Not in a universe (or a list of everything).
    Fleet,
    Own,
    Other,
}

/// A fresh address in universe `uni` (a /16): `<net>.<third + n / 200>.<10 + n % 200>`.
async fn ip_in(api: &Api, uni: &str, third: u32, n: u32) -> String {
    let u = api.get(&format!("/v1/universes/{uni}")).await.body;
    let net = u["cidrs"][0].as_str().unwrap().trim_end_matches(".0.0/16").to_owned();
    format!("{net}.{}.{}", third + n / 200, 10 + n % 200)
}

/// The request of `route` aimed at `f` (`n` makes names, ports and addresses unique). Routes
/// that delete get a throwaway object made by the admin first, so an allowed delete does not
/// take the fixture away.
async fn request(api: &Api, route: &str, f: &Fixture, n: u32) -> (Method, String, Option<Value>) {
    match route {
        "GET /v1/universes" => (Method::GET, "/v1/universes".into(), None),
        "GET /v1/universes/{id}" => (Method::GET, format!("/v1/universes/{}", f.uni), None),
        "POST /v1/universes" => (
            Method::POST,
            "/v1/universes".into(),
            Some(json!({"name": format!("new{n}"), "cidr": "10.200.0.0/24"})),
        ),
        "DELETE /v1/universes/{id}" => (Method::DELETE, format!("/v1/universes/{}", f.uni), None),
        "GET /v1/security-groups" => (Method::GET, "/v1/security-groups".into(), None),
        "GET /v1/security-groups/{id}" => {
            (Method::GET, format!("/v1/security-groups/{}", f.group), None)
        }
        "POST /v1/security-groups" => (
            Method::POST,
            "/v1/security-groups".into(),
            Some(json!({"universe": f.uni, "name": format!("g{n}")})),
        ),
        "DELETE /v1/security-groups/{id}" => {
            let g = id(&api.group(&f.uni, &format!("tmp{n}")).await);
            (Method::DELETE, format!("/v1/security-groups/{g}"), None)
        }
        "POST /v1/security-groups/{id}/rules" => (
            Method::POST,
            format!("/v1/security-groups/{}/rules", f.group),
            Some(
                json!({"direction": "ingress", "protocol": "udp", "from_port": 1000 + n, "to_port": 1000 + n, "cidr": "10.0.0.0/8"}),
            ),
        ),
        "DELETE /v1/security-groups/{id}/rules/{rule_id}" => {
            let g = id(&api.group(&f.uni, &format!("tmp{n}")).await);
            let g_rules = api.get(&format!("/v1/security-groups/{g}")).await.body;
            let r = id(&g_rules["egress"][0]);
            (Method::DELETE, format!("/v1/security-groups/{g}/rules/{r}"), None)
        }
        "GET /v1/endpoints" => (Method::GET, "/v1/endpoints".into(), None),
        "GET /v1/endpoints/{id}" => (Method::GET, format!("/v1/endpoints/{}", f.endpoint), None),
        "POST /v1/endpoints" => (
            Method::POST,
            "/v1/endpoints".into(),
            Some(
                json!({"universe": f.uni, "host": "host-b", "netns": format!("ns-new{n}"), "ip": ip_in(api, &f.uni, 50, n).await}),
            ),
        ),
        "PATCH /v1/endpoints/{id}" => (
            Method::PATCH,
            format!("/v1/endpoints/{}", f.endpoint),
            Some(json!({"security_groups": [f.group]})),
        ),
        "DELETE /v1/endpoints/{id}" => {
            let ip = ip_in(api, &f.uni, 100, n).await;
            let e = api.remote_endpoint(&f.uni, &ip, None).await;
            assert_eq!(e.status, StatusCode::CREATED, "{}", e.text);
            (Method::DELETE, format!("/v1/endpoints/{}", id(&e.body)), None)
        }
        "GET /v1/hosts" => (Method::GET, "/v1/hosts".into(), None),
        "POST /v1/tokens" => {
            (Method::POST, "/v1/tokens".into(), Some(json!({"role": "viewer", "universe": f.uni})))
        }
        "GET /v1/tokens" => (Method::GET, "/v1/tokens".into(), None),
        "DELETE /v1/tokens/{id}" => {
            let (_, t) = api.token("viewer", Some(&f.uni)).await;
            (Method::DELETE, format!("/v1/tokens/{t}"), None)
        }
        "GET /v1/audit" => (Method::GET, "/v1/audit".into(), None),
        "GET /metrics" => (Method::GET, "/metrics".into(), None),
        "GET /v1/trace" => (
            Method::GET,
            format!("/v1/trace?from={}&to=10.9.9.9&protocol=tcp&port=80", f.endpoint),
            None,
        ),
        "GET /v1/trace?run" => (
            Method::GET,
            format!("/v1/trace?from={}&to=10.9.9.9&protocol=tcp&port=80&run=true", f.endpoint),
            None,
        ),
        "GET /v1/flow-logs" => {
            (Method::GET, format!("/v1/flow-logs?endpoint={}", f.endpoint), None)
        }
        "GET /healthz" => (Method::GET, "/healthz".into(), None),
        "GET /v1/openapi.json" => (Method::GET, "/v1/openapi.json".into(), None),
        other => panic!("no request for {other}"),
    }
}

#[tokio::test]
async fn every_role_against_every_route_s15() {
    let api = api().await;
    let a = api.fixture("alpha", "10.1.0.0/16", "10.1.0.5").await;
    let b = api.fixture("bravo", "10.2.0.0/16", "10.2.0.5").await;
    let (editor, _) = api.token("editor", Some(&a.uni)).await;
    let (viewer, _) = api.token("viewer", Some(&a.uni)).await;
    let (fleet, _) = api.token("viewer", None).await;
    let admin = api.admin.clone();

    use Target::*;
    // Expected status per principal: admin, editor of alpha, viewer of alpha, fleet-wide
    // viewer, no credentials. Root on the local socket expects what the admin does; another
    // uid on it what no credentials do.
    #[rustfmt::skip]
    let table: &[(&str, Target, [u16; 5])] = &[
        ("GET /v1/universes",                               Fleet, [200, 200, 200, 200, 401]),
        ("GET /v1/universes/{id}",                          Own,   [200, 200, 200, 200, 401]),
        ("GET /v1/universes/{id}",                          Other, [200, 404, 404, 200, 401]),
        ("POST /v1/universes",                              Fleet, [201, 403, 403, 403, 401]),
        ("DELETE /v1/universes/{id}",                       Own,   [204, 403, 403, 403, 401]),
        ("DELETE /v1/universes/{id}",                       Other, [204, 404, 404, 403, 401]),
        ("GET /v1/security-groups",                         Fleet, [200, 200, 200, 200, 401]),
        ("GET /v1/security-groups/{id}",                    Own,   [200, 200, 200, 200, 401]),
        ("GET /v1/security-groups/{id}",                    Other, [200, 404, 404, 200, 401]),
        ("POST /v1/security-groups",                        Own,   [201, 201, 403, 403, 401]),
        ("POST /v1/security-groups",                        Other, [201, 404, 404, 403, 401]),
        ("DELETE /v1/security-groups/{id}",                 Own,   [204, 204, 403, 403, 401]),
        ("DELETE /v1/security-groups/{id}",                 Other, [204, 404, 404, 403, 401]),
        ("POST /v1/security-groups/{id}/rules",             Own,   [201, 201, 403, 403, 401]),
        ("POST /v1/security-groups/{id}/rules",             Other, [201, 404, 404, 403, 401]),
        ("DELETE /v1/security-groups/{id}/rules/{rule_id}", Own,   [204, 204, 403, 403, 401]),
        ("DELETE /v1/security-groups/{id}/rules/{rule_id}", Other, [204, 404, 404, 403, 401]),
        ("GET /v1/endpoints",                               Fleet, [200, 200, 200, 200, 401]),
        ("GET /v1/endpoints/{id}",                          Own,   [200, 200, 200, 200, 401]),
        ("GET /v1/endpoints/{id}",                          Other, [200, 404, 404, 200, 401]),
        ("POST /v1/endpoints",                              Own,   [201, 201, 403, 403, 401]),
        ("POST /v1/endpoints",                              Other, [201, 404, 404, 403, 401]),
        ("PATCH /v1/endpoints/{id}",                        Own,   [200, 200, 403, 403, 401]),
        ("PATCH /v1/endpoints/{id}",                        Other, [200, 404, 404, 403, 401]),
        ("DELETE /v1/endpoints/{id}",                       Own,   [204, 204, 403, 403, 401]),
        ("DELETE /v1/endpoints/{id}",                       Other, [204, 404, 404, 403, 401]),
        ("GET /v1/hosts",                                   Fleet, [200, 200, 200, 200, 401]),
        ("POST /v1/tokens",                                 Own,   [201, 403, 403, 403, 401]),
        ("GET /v1/tokens",                                  Fleet, [200, 403, 403, 403, 401]),
        ("DELETE /v1/tokens/{id}",                          Fleet, [204, 403, 403, 403, 401]),
        ("GET /v1/audit",                                   Fleet, [200, 200, 200, 200, 401]),
        ("GET /metrics",                                    Fleet, [200, 403, 403, 200, 401]),
        // Endpoints of the fixtures are on host-b: this host answers that it is not theirs.
        ("GET /v1/trace",                                   Own,   [409, 409, 409, 409, 401]),
        ("GET /v1/trace",                                   Other, [409, 404, 404, 409, 401]),
        ("GET /v1/trace?run",                               Own,   [409, 409, 403, 403, 401]),
        ("GET /v1/trace?run",                               Other, [409, 404, 404, 403, 401]),
        // host-b registered no API address: this host cannot ask it for its flow logs.
        ("GET /v1/flow-logs",                               Own,   [503, 503, 503, 503, 401]),
        ("GET /v1/flow-logs",                               Other, [503, 404, 404, 503, 401]),
        ("GET /healthz",                                    Fleet, [200, 200, 200, 200, 200]),
        ("GET /v1/openapi.json",                            Fleet, [200, 200, 200, 200, 200]),
    ];
    // Every route of the router is in the table, and the document declares every status the
    // table expects of it (401 and 403 included).
    let doc = api.get("/v1/openapi.json").await.body;
    for (path, item) in doc["paths"].as_object().unwrap() {
        for method in item.as_object().unwrap().keys().filter(|k| *k != "parameters") {
            let route = format!("{} {path}", method.to_uppercase());
            assert!(table.iter().any(|(r, ..)| *r == route), "{route} is not in the table");
            let declared = &item[method]["responses"];
            for (_, _, statuses) in table.iter().filter(|(r, ..)| *r == route) {
                for status in statuses {
                    assert!(
                        declared.get(status.to_string()).is_some(),
                        "{route} answers {status} but the document does not say so"
                    );
                }
            }
            // Exactly the public routes need no principal.
            let public = item[method]["security"] == json!([]);
            assert_eq!(public, declared.get("401").is_none(), "{route}: security and 401 agree");
        }
    }
    assert_eq!(doc["security"], json!([{"bearer": []}]));
    assert_eq!(doc["components"]["securitySchemes"]["bearer"]["scheme"], "bearer");

    let principals: [(&str, As, usize); 7] = [
        ("admin", As::Token(&admin), 0),
        ("editor", As::Token(&editor), 1),
        ("viewer", As::Token(&viewer), 2),
        ("fleet viewer", As::Token(&fleet), 3),
        ("no credentials", As::Nobody, 4),
        ("local root", As::Local(0), 0),
        ("local uid 1000", As::Local(1000), 4),
    ];
    let mut n = 0;
    for (route, target, expected) in table {
        for (who, as_, column) in principals {
            n += 1;
            let scratch;
            let f = match (target, column) {
                // An allowed delete of a universe takes a throwaway one.
                (_, 0) if route.starts_with("DELETE /v1/universes") => {
                    let u = id(&api.universe(&format!("tmp{n}"), "10.250.0.0/24").await);
                    scratch = Fixture { uni: u, group: String::new(), endpoint: String::new() };
                    &scratch
                }
                (Other, _) => &b,
                _ => &a,
            };
            let (method, uri, body) = request(&api, route, f, n).await;
            let before = api.store.snapshot().revision;
            let body = body.map(|b| b.to_string());
            let answer = api.call_as(as_, method, &uri, body.as_deref()).await;
            let want = expected[column];
            assert_eq!(
                answer.status.as_u16(),
                want,
                "{who}: {route} ({target:?}) -> {uri}: {}",
                answer.text
            );
            if want >= 400 {
                assert_eq!(
                    api.store.snapshot().revision,
                    before,
                    "{who}: {route}: a refusal changed the state"
                );
                let code = match want {
                    401 => "unauthenticated",
                    403 => "forbidden",
                    409 => "wrong_host",
                    503 => "host_unavailable",
                    _ => "not_found",
                };
                assert_eq!(answer.body["error"]["code"], code, "{who}: {route}: {}", answer.text);
            }
        }
    }
}

#[tokio::test]
async fn a_confined_token_sees_nothing_of_other_universes_s15() {
    let api = api().await;
    let a = api.fixture("alpha", "10.1.0.0/16", "10.1.0.5").await;
    let b = api.fixture("bravo", "10.2.0.0/16", "10.2.0.5").await;
    let (editor, _) = api.token("editor", Some(&a.uni)).await;
    let ed = As::Token(&editor);
    let api = &api;
    let get = |uri: String| async move { api.call_as(ed, Method::GET, &uri, None).await };

    // Lists are filtered.
    let ids = |v: &Value| -> Vec<String> { v.as_array().unwrap().iter().map(id).collect() };
    assert_eq!(ids(&get("/v1/universes".into()).await.body), vec![a.uni.clone()]);
    let groups = ids(&get("/v1/security-groups".into()).await.body);
    assert!(groups.contains(&a.group) && !groups.contains(&b.group), "{groups:?}");
    assert!(ids(&get(format!("/v1/security-groups?universe={}", b.uni)).await.body).is_empty());
    assert_eq!(ids(&get("/v1/endpoints".into()).await.body), vec![a.endpoint.clone()]);

    // Another universe's object answers exactly as an id that does not exist.
    let hidden = get(format!("/v1/security-groups/{}", b.group)).await;
    let absent = get("/v1/security-groups/sg-00000000".into()).await;
    assert_eq!(hidden.status, absent.status);
    assert_eq!(
        hidden.body["error"]["message"].as_str().unwrap().replace(&b.group, "ID"),
        absent.body["error"]["message"].as_str().unwrap().replace("sg-00000000", "ID")
    );

    // Ids of another universe in a request body are "not found" too, naming the field (not
    // the 400 that would tell the id exists elsewhere).
    let before = api.store.snapshot().revision;
    let peer = api
        .call_as(
            ed,
            Method::POST,
            &format!("/v1/security-groups/{}/rules", a.group),
            Some(&json!({"direction": "ingress", "protocol": "tcp", "from_port": 22, "to_port": 22, "group": b.group}).to_string()),
        )
        .await;
    peer.error(StatusCode::NOT_FOUND, "not_found", "group");
    let ep = api
        .call_as(
            ed,
            Method::POST,
            "/v1/endpoints",
            Some(&json!({"universe": a.uni, "host": "host-b", "netns": "ns-x", "ip": "10.1.0.9", "security_groups": [b.group]}).to_string()),
        )
        .await;
    ep.error(StatusCode::NOT_FOUND, "not_found", "security_groups[0]");
    let patch = api
        .call_as(
            ed,
            Method::PATCH,
            &format!("/v1/endpoints/{}", a.endpoint),
            Some(&json!({"security_groups": [a.group, b.group]}).to_string()),
        )
        .await;
    patch.error(StatusCode::NOT_FOUND, "not_found", "security_groups[1]");
    let moved = api
        .call_as(
            ed,
            Method::POST,
            "/v1/security-groups",
            Some(&json!({"universe": b.uni, "name": "mine"}).to_string()),
        )
        .await;
    moved.error(StatusCode::NOT_FOUND, "not_found", "universe");
    assert_eq!(api.store.snapshot().revision, before);

    // Its audit trail holds its universe's records only.
    let trail = get("/v1/audit".into()).await.body;
    let trail = trail.as_array().unwrap();
    assert!(!trail.is_empty());
    assert!(trail.iter().all(|r| r["universe"] == a.uni.as_str()), "{trail:?}");
    assert!(get(format!("/v1/audit?universe={}", b.uni)).await.body.as_array().unwrap().is_empty());
}

#[tokio::test]
async fn unknown_revoked_expired_and_malformed_tokens_are_401_and_audited() {
    let api = api().await;
    let (secret, tid) = api.token("viewer", None).await;
    let ok = api.call_as(As::Token(&secret), Method::GET, "/v1/universes", None).await;
    assert_eq!(ok.status, StatusCode::OK, "{}", ok.text);

    // Revoked: 401 at once, and a JSON error.
    let del = api.delete(&format!("/v1/tokens/{tid}")).await;
    assert_eq!(del.status, StatusCode::NO_CONTENT, "{}", del.text);
    let revoked = api.call_as(As::Token(&secret), Method::GET, "/v1/universes", None).await;
    revoked.error(StatusCode::UNAUTHORIZED, "unauthenticated", &tid);

    // Expired: the holder of the right secret is told so.
    let (secret, tid) = api.token("viewer", None).await;
    let past = verse::model::Timestamp(std::time::SystemTime::now() - Duration::from_secs(1));
    api.store
        .edit(|s| {
            s.tokens.get_mut(&tid).unwrap().expires = Some(past);
            s.revision += 1;
            Ok(())
        })
        .await
        .unwrap();
    let expired = api.call_as(As::Token(&secret), Method::GET, "/v1/universes", None).await;
    expired.error(StatusCode::UNAUTHORIZED, "unauthenticated", "expired");

    // The right id with a wrong secret, a malformed token, none at all.
    let forged = format!("{}{}", &api.admin[..12], "0".repeat(64));
    let f =
        api.call_as(As::Token(&forged), Method::DELETE, "/v1/universes/uni-00000001", None).await;
    f.error(StatusCode::UNAUTHORIZED, "unauthenticated", "unknown or revoked");
    let m = api.call_as(As::Token("hunter2"), Method::GET, "/v1/hosts", None).await;
    m.error(StatusCode::UNAUTHORIZED, "unauthenticated", "malformed");
    let none = api.call_as(As::Nobody, Method::POST, "/v1/universes", Some("{}")).await;
    none.error(StatusCode::UNAUTHORIZED, "unauthenticated", "Bearer");

    // Each refusal is in the trail (a GET without any token is not: it is not a mutation and
    // claims nothing).
    let trail = api.get("/v1/audit").await.body;
    let refused: Vec<&Value> =
        trail.as_array().unwrap().iter().filter(|r| r["status"] == 401).collect();
    let details: Vec<&str> = refused.iter().map(|r| r["detail"].as_str().unwrap()).collect();
    assert_eq!(details.len(), 5, "{refused:#?}");
    assert!(details[0].starts_with("unknown_or_revoked_token"), "{details:?}");
    assert!(details[1].starts_with("expired_token"), "{details:?}");
    assert!(details[2].starts_with("unknown_or_revoked_token"), "{details:?}");
    assert_eq!(details[3], "malformed_token");
    assert_eq!(details[4], "no_token");
    assert!(refused.iter().all(|r| r["principal"] == "unauthenticated"));
    assert_eq!(refused[2]["action"], "DELETE /v1/universes/{id}");
}

#[tokio::test]
async fn the_audit_trail_records_accepted_and_refused_mutations_with_their_revision() {
    let api = api().await;
    let a = api.fixture("alpha", "10.1.0.0/16", "10.1.0.5").await;
    let (viewer, vid) = api.token("viewer", Some(&a.uni)).await;
    let refused = api
        .call_as(As::Token(&viewer), Method::DELETE, &format!("/v1/endpoints/{}", a.endpoint), None)
        .await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    let dup = api.post("/v1/security-groups", json!({"universe": a.uni, "name": "web"})).await;
    assert_eq!(dup.status, StatusCode::CONFLICT);

    let trail = api.get(&format!("/v1/audit?universe={}", a.uni)).await.body;
    let trail = trail.as_array().unwrap();
    let actions: Vec<(&str, u64)> = trail
        .iter()
        .map(|r| (r["action"].as_str().unwrap(), r["status"].as_u64().unwrap()))
        .collect();
    assert_eq!(
        actions,
        [
            ("POST /v1/universes", 201),
            ("POST /v1/security-groups", 201),
            ("POST /v1/security-groups/{id}/rules", 201),
            ("POST /v1/endpoints", 201),
            ("POST /v1/tokens", 201),
            ("DELETE /v1/endpoints/{id}", 403),
            ("POST /v1/security-groups", 409),
        ]
    );
    let created = &trail[0];
    assert_eq!(created["principal"], api.admin[..11].replace("vt_", "tok-"));
    assert_eq!(created["host"], HOST);
    assert_eq!(created["objects"], json!([a.uni]));
    assert_eq!(created["revision"], api.base + 1);
    assert!(verse::model::Timestamp::parse(created["time"].as_str().unwrap()).is_some());
    let endpoint = &trail[3];
    assert_eq!(endpoint["objects"], json!([a.endpoint]));
    let denied = &trail[5];
    assert_eq!(denied["principal"], vid);
    assert_eq!(denied["detail"], "forbidden");
    assert_eq!(denied["objects"], json!([a.endpoint]));
    assert!(denied.get("revision").is_none());
    assert_eq!(trail[6]["detail"], "duplicate");

    // `since` and `limit`.
    let t = created["time"].as_str().unwrap();
    let later = api.get(&format!("/v1/audit?since={t}&limit=2")).await.body;
    let later: Vec<_> = later.as_array().unwrap().iter().map(|r| r["action"].clone()).collect();
    assert_eq!(later, [json!("DELETE /v1/endpoints/{id}"), json!("POST /v1/security-groups")]);
    assert_eq!(api.get("/v1/audit?since=1h").await.body.as_array().unwrap().len(), 7);
    api.get("/v1/audit?since=yesterday").await.error(
        StatusCode::BAD_REQUEST,
        "invalid_argument",
        "since",
    );
    api.get("/v1/audit?limit=0").await.error(StatusCode::BAD_REQUEST, "invalid_argument", "limit");
}

#[tokio::test]
async fn tokens_are_shown_once_listed_without_secrets_and_validated() {
    let api = api().await;
    let u = id(&api.universe("blue", "10.1.0.0/16").await);
    let a = api
        .post(
            "/v1/tokens",
            json!({"role": "editor", "universe": u, "expires": "30d", "description": "ci"}),
        )
        .await;
    assert_eq!(a.status, StatusCode::CREATED, "{}", a.text);
    assert!(a.revision.is_some());
    let keys: Vec<_> = a.body.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(keys, ["created", "description", "expires", "id", "role", "token", "universe"]);
    let secret = a.body["token"].as_str().unwrap();
    assert!(secret.starts_with("vt_"), "{secret}");
    let list = api.get("/v1/tokens").await;
    assert_eq!(list.status, StatusCode::OK);
    assert!(!list.text.contains(&secret[12..]), "a list shows no secret");
    assert!(!list.text.contains("hash"), "nor its hash: {}", list.text);
    let listed = list.body.as_array().unwrap();
    assert_eq!(listed.len(), 2, "the first admin token and this one");
    assert!(listed.iter().any(|t| t["id"] == a.body["id"] && t["universe"] == u.as_str()));

    for (body, field) in [
        (json!({"role": "root"}), "role"),
        (json!({"role": "admin", "universe": u}), "universe"),
        (json!({"role": "editor"}), "universe"),
        (json!({"role": "viewer", "universe": "uni-00000000"}), "universe"),
        (json!({"role": "viewer", "expires": "soon"}), "expires"),
        (json!({"role": "viewer", "expires": "2001-01-01T00:00:00Z"}), "expires"),
        (json!({"role": "viewer", "secret": "x"}), "secret"),
    ] {
        let a = api.post("/v1/tokens", body.clone()).await;
        assert!(a.status.is_client_error(), "{body}: {}", a.text);
        assert!(a.body["error"]["message"].as_str().unwrap().contains(field), "{body}: {}", a.text);
    }
    api.delete("/v1/tokens/tok-00000000").await.error(
        StatusCode::NOT_FOUND,
        "not_found",
        "tok-00000000",
    );
}

#[tokio::test]
async fn local_socket_root_is_admin_and_other_uids_are_refused() {
    let api = api().await;
    let a = api
        .call_as(
            As::Local(0),
            Method::POST,
            "/v1/universes",
            Some(r#"{"name": "blue", "cidr": "10.1.0.0/16"}"#),
        )
        .await;
    assert_eq!(a.status, StatusCode::CREATED, "{}", a.text);
    let trail = api.get("/v1/audit").await.body;
    let last = trail.as_array().unwrap().last().unwrap().clone();
    assert_eq!(last["principal"], auth::LOCAL_ROOT);
    let nonroot = api.call_as(As::Local(1000), Method::GET, "/v1/universes", None).await;
    nonroot.error(StatusCode::UNAUTHORIZED, "unauthenticated", "root only");
}

#[tokio::test]
async fn an_audit_record_that_cannot_be_written_is_counted_and_the_answer_stands() {
    let api = api().await;
    // The trail's file cannot be opened: a directory sits where it goes.
    std::fs::create_dir(api._dir.path().join(verse::store::embedded::AUDIT_FILE)).unwrap();
    let a = api.post("/v1/universes", json!({"name": "blue", "cidr": "10.1.0.0/16"})).await;
    assert_eq!(a.status, StatusCode::CREATED, "{}", a.text);
    let m = api.get("/metrics").await.text;
    assert!(m.lines().any(|l| l == "verse_audit_write_failures_total 1"), "{m}");
    assert!(m.lines().any(|l| l == "verse_audit_suppressed_total 0"), "{m}");
}

#[tokio::test]
async fn a_flood_of_bad_tokens_is_recorded_up_to_a_bound_and_counted_beyond() {
    let api = api().await;
    let bogus = format!("vt_00000000_{}", "0".repeat(64));
    let start = Instant::now();
    for _ in 0..400 {
        let a = api.call_as(As::Token(&bogus), Method::GET, "/v1/universes", None).await;
        assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    }
    let elapsed = start.elapsed().as_secs_f64();
    let trail = api.get("/v1/audit?limit=10000").await.body;
    let recorded = trail.as_array().unwrap().len() as f64;
    let bound = audit::REFUSALS_BURST + audit::REFUSALS_PER_SECOND * elapsed + 1.0;
    assert!(recorded <= bound, "{recorded} records of refusals in {elapsed} s, bound {bound}");
    assert!(recorded >= audit::REFUSALS_BURST, "the first ones are all recorded: {recorded}");
    let m = api.get("/metrics").await.text;
    let suppressed: f64 = m
        .lines()
        .find_map(|l| l.strip_prefix("verse_audit_suppressed_total "))
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(suppressed + recorded, 400.0, "every refusal recorded or counted");
}

/// A group as `GET /v1/security-groups/{id}` shows it, without the hit counters it adds.
fn without_hits(g: &Value) -> Value {
    let mut g = g.clone();
    if let Some(o) = g.as_object_mut() {
        o.remove("hits_from");
    }
    for dir in ["ingress", "egress"] {
        for r in g[dir].as_array_mut().into_iter().flatten() {
            if let Some(o) = r.as_object_mut() {
                o.remove("hits");
            }
        }
    }
    g
}

/// A host that serves no API (`[api] serve = false`, `api::router_without_api`) answers
/// `/healthz` and `/metrics` (its caller checked as on any host, root on the local socket
/// too) and `404 api_not_served` to every other request, which changes nothing.
#[tokio::test]
async fn a_host_that_serves_no_api_answers_health_and_metrics_only() {
    let mut api = api_with(false).await;
    let stats: api::StatsFn = Arc::new(|| Ok(Stats { map_entries: 12, ..Stats::default() }));
    let state =
        AppState::new(api.store.clone(), HOST.into(), None, api.realized.subscribe(), stats);
    api.app = api::router_without_api(state);
    let before = api.store.snapshot().revision;

    assert_eq!(api.call_as(As::Nobody, Method::GET, "/healthz", None).await.status, StatusCode::OK);
    let m = api.get("/metrics").await;
    assert_eq!(m.status, StatusCode::OK, "{}", m.text);
    assert!(m.text.contains("verse_map_entries 12"), "{}", m.text);
    let local = api.call_as(As::Local(0), Method::GET, "/metrics", None).await;
    assert_eq!(local.status, StatusCode::OK, "{}", local.text);
    let anonymous = api.call_as(As::Nobody, Method::GET, "/metrics", None).await;
    assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED, "{}", anonymous.text);

    let create = json!({"name": "shop", "cidr": "10.0.0.0/24"});
    for a in [
        api.get("/v1/universes").await,
        api.post("/v1/universes", create).await,
        api.get("/v1/openapi.json").await,
        api.call_as(As::Local(0), Method::GET, "/v1/hosts", None).await,
    ] {
        a.error(StatusCode::NOT_FOUND, "api_not_served", "api.serve = false");
    }
    assert_eq!(api.store.snapshot().revision, before, "nothing was changed");
    assert!(api.store.snapshot().universes.is_empty());
}
