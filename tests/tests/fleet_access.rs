//! Access on a real fleet (S15): three hosts sharing one etcd. A token made through one host's
//! API works on every host; revoking it through one host refuses it on every host as soon as
//! the revocation returns (no polling, no grace period). Every host records its requests in the
//! one audit trail in etcd, so the trail asked of any host holds the whole fleet's records,
//! the accepted mutations and the refused ones (a role's 403, another universe's 404, a revoked
//! token's 401). And a fleet set up as the README says (TLS on every host's API, the operator's
//! admin token, the CLI's contexts with a CA file and a token file) gives a universe-scoped
//! token exactly what its role says, on any host.
use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use tests::*;
use verse::model::Role;

fn id(v: &Value) -> String {
    v["id"].as_str().expect("resource has an id").to_owned()
}

#[test]
fn a_token_revoked_through_one_host_is_refused_by_every_host_at_once() {
    let fleet = Fleet::start(3);
    let admin = fleet.api(0);
    let blue = id(&admin.create_universe("blue", "10.4.0.0/24"));

    // Made through host b, for blue.
    let token = fleet.api(1).create_token(Role::Editor, Some(&blue));
    let (secret, tid) = (token.token, token.id);

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
    fleet.api(0).client().delete_token(&tid).expect("revoke the token");
    for i in [2, 1, 0] {
        let editor = fleet.api(i).with_token(Some(&secret));
        let r = editor.get(&format!("/v1/security-groups?universe={blue}"));
        assert_eq!(r.status, 401, "host {i} still accepts a revoked token: {}", r.body);
        assert_eq!(r.error_code(), "unauthenticated");
        assert!(r.error_message().contains(&tid), "{}", r.body);
        let r = editor.post("/v1/security-groups", &json!({"universe": blue, "name": "late"}));
        assert_eq!(r.status, 401, "host {i}: {}", r.body);
    }
    let groups = admin.client().list_groups(Some(&blue)).expect("list the groups");
    let names: BTreeSet<&str> = groups.iter().map(|g| g.name.as_str()).collect();
    assert_eq!(names, BTreeSet::from(["default", "g0", "g1", "g2"]), "nothing after revocation");
}

#[test]
fn the_audit_trail_of_a_fleet_holds_every_hosts_accepted_and_refused_requests() {
    let fleet = Fleet::start(3);
    let admin = fleet.api(0);
    let blue = id(&admin.create_universe("blue", "10.5.0.0/24"));
    let red = id(&fleet.api(1).create_universe("red", "10.6.0.0/24"));
    let mint = |role| {
        let t = admin.create_token(role, Some(&blue));
        (t.token, t.id)
    };
    let (editor, editor_id) = mint(Role::Editor);
    let (viewer, viewer_id) = mint(Role::Viewer);

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

/// `verse --config <config> --context <context> ARGS` inside `ns`.
fn verse_as(ns: &Netns, config: &Path, context: &str, args: &[&str]) -> std::process::Output {
    let config = config.to_str().expect("a UTF-8 path");
    let mut all = vec!["--config", config, "--context", context];
    all.extend_from_slice(args);
    verse_cli(ns.name(), &all)
}

fn stdout_json(out: &std::process::Output) -> Value {
    assert!(out.status.success(), "verse failed: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("JSON on stdout")
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn a_fleet_set_up_as_the_readme_says_gives_a_scoped_token_exactly_its_role() {
    // Every host serves its API over TLS (its self-signed certificate) with the operator's
    // admin token, over one etcd.
    let fleet = Fleet::start_with_config(2, "[api]\ntls = \"on\"\n");
    let (a, b) = (fleet.host(0), fleet.host(1));
    let https = |h: &Host| h.api.url().replace("http://", "https://");

    // The operator's CLI: each host's certificate, copied from its state directory, and the
    // tokens, as files beside the config file its contexts name.
    let home = TempDir::new("cli");
    let dir = home.path();
    std::fs::copy(a.state_dir().join("tls/api.crt"), dir.join("host-a.crt")).unwrap();
    std::fs::copy(b.state_dir().join("tls/api.crt"), dir.join("host-b.crt")).unwrap();
    std::fs::copy(fleet.admin_token_file(), dir.join("admin.token")).unwrap();
    let config = dir.join("config.toml");
    std::fs::write(
        &config,
        format!(
            "current_context = \"admin\"\n\
             [contexts.admin]\napi = \"{a_url}\"\nca_file = \"host-a.crt\"\ntoken_file = \"admin.token\"\n\
             [contexts.admin-b]\napi = \"{b_url}\"\nca_file = \"host-b.crt\"\ntoken_file = \"admin.token\"\n\
             [contexts.shop]\napi = \"{b_url}\"\nca_file = \"host-b.crt\"\ntoken_file = \"shop.token\"\n\
             [contexts.wrong-ca]\napi = \"{b_url}\"\nca_file = \"host-a.crt\"\ntoken_file = \"admin.token\"\n",
            a_url = https(a),
            b_url = https(b),
        ),
    )
    .unwrap();
    let (ns_a, ns_b) = (a.netns(), b.netns());

    // Both hosts are in the fleet, healthy, as either host sees it.
    let healthy = |ns: &Netns, context: &str| {
        let out = verse_as(ns, &config, context, &["-o", "json", "host", "list"]);
        out.status.success()
            && serde_json::from_slice::<Value>(&out.stdout).is_ok_and(|hs| {
                hs.as_array().is_some_and(|hs| {
                    hs.len() == 2 && hs.iter().all(|h| h["healthy"] == Value::Bool(true))
                })
            })
    };
    assert!(wait_until(Duration::from_secs(30), || healthy(ns_a, "admin")), "host list on a");
    assert!(healthy(ns_b, "admin-b"), "host list on b");

    // A certificate that is not the host's is refused, whatever the token.
    let out = verse_as(ns_b, &config, "wrong-ca", &["universe", "list"]);
    assert_eq!(out.status.code(), Some(1), "host a's certificate for host b: {}", stderr(&out));
    assert!(stderr(&out).contains("certificate"), "{}", stderr(&out));

    // The admin makes two universes and an editor token for one of them.
    let shop = stdout_json(&verse_as(
        ns_a,
        &config,
        "admin",
        &["-o", "json", "universe", "create", "shop", "--cidr", "10.20.0.0/24"],
    ));
    let other = stdout_json(&verse_as(
        ns_a,
        &config,
        "admin",
        &["-o", "json", "universe", "create", "other", "--cidr", "10.21.0.0/24"],
    ));
    let (shop, other) = (id(&shop), id(&other));
    let out = verse_as(
        ns_a,
        &config,
        "admin",
        &["token", "create", "--role", "editor", "--universe", &shop, "--description", "shop-ci"],
    );
    assert!(out.status.success(), "{}", stderr(&out));
    std::fs::write(dir.join("shop.token"), &out.stdout).unwrap();
    let secret = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let tid = format!("tok-{}", secret.split('_').nth(1).expect("vt_<id>_<secret>"));

    // Through host b, the scoped token does what an editor of shop may, and nothing else.
    let shop_ = |args: &[&str]| verse_as(ns_b, &config, "shop", args);
    let web = stdout_json(&shop_(&["-o", "json", "sg", "create", "--universe", &shop, "web"]));
    assert_eq!(web["universe"], shop.as_str());
    let out = shop_(&[
        "rule",
        "add",
        &id(&web),
        "--direction",
        "ingress",
        "--protocol",
        "tcp",
        "--ports",
        "80",
        "--cidr",
        "10.20.0.0/24",
    ]);
    assert!(out.status.success(), "an editor adds rules in its universe: {}", stderr(&out));
    let listed = stdout_json(&shop_(&["-o", "json", "universe", "list"]));
    let names: Vec<&str> =
        listed.as_array().unwrap().iter().filter_map(|u| u["name"].as_str()).collect();
    assert_eq!(names, ["shop"], "it sees its universe only");
    let out = shop_(&["sg", "create", "--universe", &other, "web"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("not found"),
        "another universe does not exist for it: {}",
        stderr(&out)
    );
    let out = shop_(&["universe", "create", "mine", "--cidr", "10.22.0.0/24"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("may not change universes"), "{}", stderr(&out));
    let out = shop_(&["token", "create", "--role", "admin"]);
    assert_eq!(out.status.code(), Some(1), "tokens are the admin's: {}", stderr(&out));
    let out = shop_(&["host", "list"]);
    assert!(out.status.success(), "every role reads the hosts: {}", stderr(&out));

    // The trail, asked of host a, holds the editor's edits made through host b.
    let trail = stdout_json(&verse_as(ns_a, &config, "admin", &["-o", "json", "audit"]));
    let mine: Vec<(String, u64)> = trail
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["principal"] == tid.as_str())
        .map(|r| (r["action"].as_str().unwrap().to_owned(), r["status"].as_u64().unwrap()))
        .collect();
    assert_eq!(
        mine.iter().map(|(a, s)| (a.as_str(), *s)).collect::<Vec<_>>(),
        [
            ("POST /v1/security-groups", 201),
            ("POST /v1/security-groups/{id}/rules", 201),
            ("POST /v1/security-groups", 404),
            ("POST /v1/universes", 403),
            ("POST /v1/tokens", 403),
        ]
    );

    // Revoked through host a: refused by host b when the revocation returns.
    let out = verse_as(ns_a, &config, "admin", &["token", "delete", &tid]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = shop_(&["universe", "list"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("unknown or revoked"), "{}", stderr(&out));
}
