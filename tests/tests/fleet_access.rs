//! Access on a real fleet (S15): three hosts sharing one etcd. A token made through one host's
//! API works on every host; revoking it through one host refuses it on every host as soon as
//! the revocation returns (no polling, no grace period). Every host records its requests in the
//! one audit trail in etcd, so the trail asked of any host holds the whole fleet's records,
//! the accepted mutations and the refused ones (a role's 403, another universe's 404, a revoked
//! token's 401).
use std::collections::BTreeSet;

use tests::*;

fn id(v: &Value) -> String {
    v["id"].as_str().expect("resource has an id").to_owned()
}

#[test]
fn a_token_revoked_through_one_host_is_refused_by_every_host_at_once() {
    let fleet = Fleet::start(3);
    let admin = fleet.api(0);
    let blue = id(&admin.create_universe("blue", "10.4.0.0/24"));

    // Made through host b, for blue.
    let r = fleet.api(1).post("/v1/tokens", &json!({"role": "editor", "universe": blue}));
    assert_eq!(r.status, 201, "{}", r.body);
    let secret = r.json()["token"].as_str().expect("the secret").to_owned();
    let tid = id(&r.json());

    // Every host knows it at once: its revision is realized everywhere when the call returns.
    for i in 0..3 {
        let editor = fleet.api(i).with_token(Some(&secret));
        let r = editor.get(&format!("/v1/security-groups?universe={blue}"));
        assert_eq!(r.status, 200, "host {i}: {}", r.body);
        let r =
            editor.post("/v1/security-groups", &json!({"universe": blue, "name": format!("g{i}")}));
        assert_eq!(r.status, 201, "host {i}: {}", r.body);
    }

    // Revoked through host a: refused by every host right after, first try.
    let r = fleet.api(0).delete(&format!("/v1/tokens/{tid}"));
    assert_eq!(r.status, 204, "{}", r.body);
    for i in [2, 1, 0] {
        let editor = fleet.api(i).with_token(Some(&secret));
        let r = editor.get(&format!("/v1/security-groups?universe={blue}"));
        assert_eq!(r.status, 401, "host {i} still accepts a revoked token: {}", r.body);
        assert_eq!(r.error_code(), "unauthenticated");
        assert!(r.error_message().contains(&tid), "{}", r.body);
        let r = editor.post("/v1/security-groups", &json!({"universe": blue, "name": "late"}));
        assert_eq!(r.status, 401, "host {i}: {}", r.body);
    }
    let groups = admin.get(&format!("/v1/security-groups?universe={blue}")).json();
    let names: BTreeSet<&str> =
        groups.as_array().unwrap().iter().filter_map(|g| g["name"].as_str()).collect();
    assert_eq!(names, BTreeSet::from(["default", "g0", "g1", "g2"]), "nothing after revocation");
}

#[test]
fn the_audit_trail_of_a_fleet_holds_every_hosts_accepted_and_refused_requests() {
    let fleet = Fleet::start(3);
    let admin = fleet.api(0);
    let blue = id(&admin.create_universe("blue", "10.5.0.0/24"));
    let red = id(&fleet.api(1).create_universe("red", "10.6.0.0/24"));
    let mint = |role: &str, uni: &str| {
        let r = admin.post("/v1/tokens", &json!({"role": role, "universe": uni}));
        assert_eq!(r.status, 201, "{}", r.body);
        (r.json()["token"].as_str().unwrap().to_owned(), id(&r.json()))
    };
    let (editor, editor_id) = mint("editor", &blue);
    let (viewer, viewer_id) = mint("viewer", &blue);

    // Accepted edits through every host.
    let web = fleet
        .api(2)
        .with_token(Some(&editor))
        .post("/v1/security-groups", &json!({"universe": blue, "name": "web"}));
    assert_eq!(web.status, 201, "{}", web.body);
    let web = id(&web.json());
    let rule = fleet.api(1).with_token(Some(&editor)).post(
        &format!("/v1/security-groups/{web}/rules"),
        &json!({"direction": "ingress", "protocol": "tcp", "from_port": 443, "to_port": 443, "cidr": "0.0.0.0/0"}),
    );
    assert_eq!(rule.status, 201, "{}", rule.body);
    // Refused ones: the viewer writes (403, host b), the editor reaches into red (404, host
    // c), a token no one made (401, host a).
    let r = fleet.api(1).with_token(Some(&viewer)).delete(&format!("/v1/security-groups/{web}"));
    assert_eq!(r.status, 403, "{}", r.body);
    let r = fleet
        .api(2)
        .with_token(Some(&editor))
        .post("/v1/security-groups", &json!({"universe": red, "name": "x"}));
    assert_eq!(r.status, 404, "{}", r.body);
    let forged = random_token();
    let r = fleet.api(0).with_token(Some(&forged)).delete(&format!("/v1/universes/{red}"));
    assert_eq!(r.status, 401, "{}", r.body);

    // Asked of any host, the trail holds all of it, from every host.
    let host = |i: usize| fleet.host(i).name().to_owned();
    let expected = [
        (host(0), "admin", "POST /v1/universes", 201),
        (host(1), "admin", "POST /v1/universes", 201),
        (host(0), "admin", "POST /v1/tokens", 201),
        (host(0), "admin", "POST /v1/tokens", 201),
        (host(2), editor_id.as_str(), "POST /v1/security-groups", 201),
        (host(1), editor_id.as_str(), "POST /v1/security-groups/{id}/rules", 201),
        (host(1), viewer_id.as_str(), "DELETE /v1/security-groups/{id}", 403),
        (host(2), editor_id.as_str(), "POST /v1/security-groups", 404),
        (host(0), "unauthenticated", "DELETE /v1/universes/{id}", 401),
    ];
    let admin_id = format!("tok-{}", &fleet.admin_token()[3..11]);
    for via in 0..3 {
        let trail = fleet.api(via).get("/v1/audit");
        assert_eq!(trail.status, 200, "{}", trail.body);
        let trail = trail.json();
        let got: Vec<(String, String, String, u64)> = trail
            .as_array()
            .unwrap()
            .iter()
            .map(|r| {
                let principal = r["principal"].as_str().unwrap();
                let principal = if principal == admin_id { "admin" } else { principal };
                (
                    r["host"].as_str().unwrap().to_owned(),
                    principal.to_owned(),
                    r["action"].as_str().unwrap().to_owned(),
                    r["status"].as_u64().unwrap(),
                )
            })
            .collect();
        let want: Vec<(String, String, String, u64)> = expected
            .iter()
            .map(|(h, p, a, s)| (h.clone(), (*p).to_owned(), (*a).to_owned(), *s as u64))
            .collect();
        assert_eq!(got, want, "the trail asked of host {via}");
        let records = trail.as_array().unwrap();
        // Accepted mutations carry the revision they made; refusals carry why.
        assert!(records[4]["revision"].as_u64().is_some(), "{}", records[4]);
        assert_eq!(records[6]["detail"], "forbidden");
        assert_eq!(records[7]["detail"], "not_found");
        assert_eq!(
            records[8]["detail"],
            format!("unknown_or_revoked_token (tok-{})", &forged[3..11])
        );
        assert!(records[8]["source"].as_str().unwrap().starts_with("127.0.0.1:"));
        // The editor's 404 into red does not name red: it never saw it.
        assert!(records[7].get("universe").is_none(), "{}", records[7]);
    }

    // A principal of blue sees blue's records only, whichever host it asks.
    let trail = fleet.api(2).with_token(Some(&viewer)).get("/v1/audit").json();
    let actions: Vec<&str> =
        trail.as_array().unwrap().iter().map(|r| r["action"].as_str().unwrap()).collect();
    assert_eq!(
        actions,
        [
            "POST /v1/universes",
            "POST /v1/tokens",
            "POST /v1/tokens",
            "POST /v1/security-groups",
            "POST /v1/security-groups/{id}/rules",
            "DELETE /v1/security-groups/{id}",
        ]
    );
}
