//! The REST API in process: every route, every 400/404/409 of the README's "REST API", the
//! shapes of the 201s and the `Verse-Revision` header. No root needed: the store lives in a
//! temporary directory and a fake reconciler realizes every revision as soon as it is published.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use axum::Router;
use dataplane_common::DropReason;
use http_body_util::BodyExt;
use serde_json::{json, Value};
use tokio::sync::watch;
use tower::ServiceExt;
use verse::api::{self, AppState, Stats};
use verse::store::Store;

const HOST: &str = "host-a";

struct Api {
    app: Router,
    store: Store,
    realized: watch::Sender<u64>,
    _dir: tempfile::TempDir,
}

struct Answer {
    status: StatusCode,
    revision: Option<u64>,
    body: Value,
    text: String,
}

/// A router over a fresh store. With `reconciler`, a task realizes each revision at once.
fn api_with(reconciler: bool) -> Api {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_embedded(dir.path()).unwrap();
    let (realized, realized_rx) = watch::channel(0u64);
    if reconciler {
        let mut rx = store.subscribe();
        let tx = realized.clone();
        tokio::spawn(async move {
            loop {
                let rev = rx.borrow_and_update().revision;
                tx.send_replace(rev);
                if rx.changed().await.is_err() {
                    break;
                }
            }
        });
    }
    let stats: api::StatsFn = Arc::new(|| {
        let mut drops = BTreeMap::new();
        drops.insert(DropReason::SpoofedIp, 7);
        drops.insert(DropReason::PolicyIngress, 3);
        Ok(Stats { drops })
    });
    let state = AppState {
        store: store.clone(),
        host: HOST.into(),
        underlay_ip: None,
        realized: realized_rx,
        stats,
    };
    Api { app: api::router(state), store, realized, _dir: dir }
}

fn api() -> Api {
    api_with(true)
}

impl Api {
    async fn call(&self, method: Method, uri: &str, body: Option<&str>) -> Answer {
        let req = Request::builder().method(method).uri(uri);
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
    let api = api();
    let a = api.post("/v1/universes", json!({"name": "blue", "cidr": "10.1.2.3/16"})).await;
    assert_eq!(a.status, StatusCode::CREATED, "{}", a.text);
    assert_eq!(a.revision, Some(1));
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
    assert_eq!(a.revision, Some(2));
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
    let api = api();
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
    let api = api();
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
    assert_eq!(api.store.snapshot().revision, 0, "no refused edit changed anything");
}

#[tokio::test]
async fn duplicate_universe_name_is_409() {
    let api = api();
    api.universe("blue", "10.1.0.0/16").await;
    let a = api.post("/v1/universes", json!({"name": "blue", "cidr": "10.2.0.0/16"})).await;
    a.error(StatusCode::CONFLICT, "duplicate", "name");
}

#[tokio::test]
async fn universe_unknown_id_is_404_and_delete_with_endpoints_is_409() {
    let api = api();
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
    let api = api();
    let u = api.universe("blue", "10.1.0.0/16").await;
    let a = api
        .post(
            "/v1/security-groups",
            json!({"universe": id(&u), "name": "web", "description": "front"}),
        )
        .await;
    assert_eq!(a.status, StatusCode::CREATED, "{}", a.text);
    assert_eq!(a.revision, Some(2));
    let g = &a.body;
    let keys: Vec<_> = g.as_object().unwrap().keys().map(String::as_str).collect();
    assert_eq!(keys, ["description", "egress", "id", "ingress", "name", "universe"]);
    assert!(id(g).starts_with("sg-"));
    assert_eq!(g["universe"], id(&u));
    assert_eq!(g["description"], "front");
    // S2: no ingress; egress to all, v4 and v6.
    assert_eq!(g["ingress"], json!([]));
    let cidrs: Vec<_> = g["egress"].as_array().unwrap().iter().map(|r| r["cidr"].clone()).collect();
    assert_eq!(cidrs, [json!("0.0.0.0/0"), json!("::/0")]);
    assert!(g["egress"].as_array().unwrap().iter().all(|r| r["protocol"] == "all"));
    let shown = api.get(&format!("/v1/security-groups/{}", id(g))).await;
    assert_eq!(shown.body, *g);
}

#[tokio::test]
async fn group_errors_name_the_field() {
    let api = api();
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
    let api = api();
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
    let api = api();
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
    let api = api();
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
    let g = api.get(&format!("/v1/security-groups/{web}")).await.body;
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
    let api = api();
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
    // A peer group of another universe.
    let a =
        api.post(&uri, json!({"direction": "ingress", "protocol": "all", "group": foreign})).await;
    a.error(StatusCode::BAD_REQUEST, "invalid_argument", "group");
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
    let api = api();
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
    let api = api();
    let u = id(&api.universe("blue", "10.1.0.0/16").await);
    let web = id(&api.group(&u, "web").await);
    let before = api.store.snapshot().revision;
    let a = api.remote_endpoint(&u, "10.1.0.5", Some(vec![&web])).await;
    assert_eq!(a.status, StatusCode::CREATED, "{}", a.text);
    assert_eq!(a.revision, Some(before + 1));
    let e = a.body.as_object().unwrap();
    let keys: Vec<_> = e.keys().map(String::as_str).collect();
    assert_eq!(
        keys,
        ["host", "id", "interface", "ip", "mac", "netns", "security_groups", "universe"]
    );
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
    let api = api();
    let u = id(&api.universe("blue", "10.1.0.0/16").await);
    let ns = format!("verse-test-absent-{}", std::process::id());
    let a = api.post("/v1/endpoints", json!({"universe": u, "netns": ns, "ip": "10.1.0.5"})).await;
    a.error(StatusCode::BAD_REQUEST, "invalid_argument", "netns");
    assert!(a.body["error"]["message"].as_str().unwrap().contains(&ns));
    let a = api
        .post("/v1/endpoints", json!({"universe": u, "host": HOST, "netns": ns, "ip": "10.1.0.5"}))
        .await;
    a.error(StatusCode::BAD_REQUEST, "invalid_argument", "netns");
    let a = api
        .post("/v1/endpoints", json!({"universe": u, "netns": "../etc", "ip": "10.1.0.5"}))
        .await;
    a.error(StatusCode::BAD_REQUEST, "invalid_argument", "netns");
    assert_eq!(api.get("/v1/endpoints").await.body, json!([]));
}

#[tokio::test]
async fn endpoint_errors_name_the_field() {
    let api = api();
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
        (ep("10.1.0.5", json!([foreign])), "security_groups[0]"),
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
            json!({"universe": "uni-00000000", "host": "h", "netns": "n", "ip": "10.1.0.5"}),
        )
        .await;
    a.error(StatusCode::NOT_FOUND, "not_found", "universe");
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
    let api = api();
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
    let api = api();
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
    let api = api();
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
    let api = api_with(false);
    let tx = api.realized.clone();
    let mut rx = api.store.subscribe();
    tokio::spawn(async move {
        rx.changed().await.unwrap();
        let rev = rx.borrow().revision;
        tokio::time::sleep(Duration::from_millis(300)).await;
        tx.send_replace(rev);
    });
    let start = Instant::now();
    let a = api.post("/v1/universes", json!({"name": "blue", "cidr": "10.1.0.0/16"})).await;
    assert_eq!(a.status, StatusCode::CREATED);
    assert!(start.elapsed() >= Duration::from_millis(300), "returned before realization");
    assert_eq!(*api.realized.borrow(), a.revision.unwrap());
    let hosts = api.get("/v1/hosts").await.body;
    assert_eq!(hosts, json!([{"name": HOST, "underlay_ip": null, "revision": 1, "healthy": true}]));
}

#[tokio::test]
async fn mutation_waits_for_every_healthy_host_s13() {
    let api = api();
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
    assert_eq!(
        hosts,
        json!([
            {"name": HOST, "underlay_ip": null, "revision": 1, "healthy": true},
            {"name": "host-b", "underlay_ip": "198.18.0.2", "revision": 1, "healthy": true},
        ])
    );
}

#[tokio::test]
async fn revisions_increase_by_one_per_mutation_s13() {
    let api = api();
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
    assert_eq!(revs, [1, 2, 3, 4]);
    // Reads carry no revision header.
    assert_eq!(api.get("/v1/universes").await.revision, None);
}

#[tokio::test]
async fn healthz_metrics_and_unknown_routes() {
    let api = api();
    let a = api.get("/healthz").await;
    assert_eq!((a.status, a.text.as_str()), (StatusCode::OK, "ok"));

    let u = id(&api.universe("blue", "10.1.0.0/16").await);
    api.remote_endpoint(&u, "10.1.0.5", None).await;
    let m = api.get("/metrics").await;
    assert_eq!(m.status, StatusCode::OK);
    for reason in DropReason::ALL {
        let want = match reason {
            DropReason::SpoofedIp => 7,
            DropReason::PolicyIngress => 3,
            _ => 0,
        };
        let line = format!("verse_drops_total{{reason=\"{}\"}} {want}", reason.label());
        assert!(m.text.lines().any(|l| l == line), "missing {line:?} in\n{}", m.text);
    }
    for line in [
        "verse_endpoints 1",
        "verse_universes 1",
        "verse_security_groups 1",
        "verse_rules 3",
        "verse_revision 2",
        "verse_realized_revision 2",
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
    let api = api();
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
    ] {
        let item = paths.get(path).unwrap_or_else(|| panic!("{path} missing"));
        for m in methods {
            assert!(item.get(*m).is_some(), "{m} {path} missing");
        }
    }
    assert_eq!(paths.len(), 12, "a path the router does not serve is described");
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
        fields(serde_json::to_value(verse::model::CreateUniverse::default()).unwrap())
    );
    assert_eq!(
        accepts("CreateSecurityGroup"),
        fields(serde_json::to_value(verse::model::CreateGroup::default()).unwrap())
    );
    assert_eq!(
        accepts("CreateRule"),
        fields(serde_json::to_value(verse::model::CreateRule::default()).unwrap())
    );
    assert_eq!(
        accepts("CreateEndpoint"),
        fields(serde_json::to_value(verse::model::CreateEndpoint::default()).unwrap())
    );
    assert_eq!(
        accepts("PatchEndpoint"),
        fields(serde_json::to_value(verse::model::PatchEndpoint::default()).unwrap())
    );
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
