//! The `verse` CLI and the typed client against a real API server on loopback (an ephemeral
//! port; the store in a temporary directory, a fake reconciler realizing every revision). No
//! root needed, no namespace: endpoints are placed on another host so none is plumbed.

use std::net::SocketAddr;
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::watch;
use verse::api::{self, AppState, Stats};
use verse::client::{self, Client};
use verse::model::{CreateGroup, CreateUniverse};
use verse::store::Store;

/// A running API server; stops with the test process.
struct Server {
    addr: SocketAddr,
    _dir: tempfile::TempDir,
}

fn server() -> Server {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_embedded(dir.path()).unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let (realized, realized_rx) = watch::channel(0u64);
            let mut states = store.subscribe();
            tokio::spawn(async move {
                loop {
                    let rev = states.borrow_and_update().revision;
                    realized.send_replace(rev);
                    if states.changed().await.is_err() {
                        break;
                    }
                }
            });
            let state = AppState {
                store,
                host: "host-a".into(),
                underlay_ip: Some("198.18.0.1".parse().unwrap()),
                realized: realized_rx,
                stats: Arc::new(|| Ok(Stats::default())),
            };
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            axum::serve(listener, api::router(state)).await.unwrap();
        });
    });
    let addr = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    Server { addr, _dir: dir }
}

impl Server {
    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
    fn verse(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_verse"))
            .env_remove("VERSE_API")
            .arg("--api")
            .arg(self.url())
            .args(args)
            .output()
            .unwrap()
    }
    /// Runs `verse -o json ARGS`, expects success, returns stdout as JSON and stderr.
    fn json(&self, args: &[&str]) -> (Value, String) {
        let mut all = vec!["-o", "json"];
        all.extend_from_slice(args);
        let out = self.verse(&all);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "verse {args:?} failed: {stderr}");
        (serde_json::from_slice(&out.stdout).unwrap(), stderr)
    }
}

fn id(v: &Value) -> &str {
    v["id"].as_str().unwrap()
}

#[test]
fn cli_creates_lists_updates_and_deletes_every_noun() {
    let s = server();
    let (u, err) = s.json(&["universe", "create", "blue", "--cidr", "10.1.2.0/16"]);
    assert_eq!(u["cidrs"], serde_json::json!(["10.1.0.0/16"]));
    assert_eq!(err.trim(), "revision 1");
    let uid = id(&u).to_owned();
    let (u2, _) =
        s.json(&["universe", "create", "red", "--cidr", "10.2.0.0/24", "--cidr", "10.3.0.0/24"]);
    assert_eq!(u2["cidrs"].as_array().unwrap().len(), 2);

    let (list, _) = s.json(&["universe", "list"]);
    assert_eq!(list.as_array().unwrap().len(), 2);
    let (shown, _) = s.json(&["universe", "show", &uid]);
    assert_eq!(shown, u);

    let (g, err) = s.json(&["sg", "create", "--universe", &uid, "web", "--description", "front"]);
    assert_eq!(g["description"], "front");
    assert_eq!(err.trim(), "revision 3");
    let gid = id(&g).to_owned();
    let (groups, _) = s.json(&["sg", "list", "--universe", &uid]);
    assert_eq!(groups.as_array().unwrap().len(), 2, "web and default");

    let (r, _) = s.json(&[
        "rule",
        "add",
        &gid,
        "--direction",
        "ingress",
        "--protocol",
        "tcp",
        "--ports",
        "8000-8100",
        "--cidr",
        "10.0.0.0/8",
        "--description",
        "app",
    ]);
    assert_eq!((r["from_port"].as_u64(), r["to_port"].as_u64()), (Some(8000), Some(8100)));
    let (r80, _) = s.json(&[
        "rule",
        "add",
        &gid,
        "--direction",
        "ingress",
        "--protocol",
        "tcp",
        "--ports",
        "80",
        "--cidr",
        "0.0.0.0/0",
    ]);
    assert_eq!((r80["from_port"].as_u64(), r80["to_port"].as_u64()), (Some(80), Some(80)));
    let (icmp, _) = s.json(&[
        "rule",
        "add",
        &gid,
        "--direction",
        "ingress",
        "--protocol",
        "icmp",
        "--icmp-type",
        "8",
        "--icmp-code",
        "-1",
        "--group",
        &gid,
    ]);
    assert_eq!((icmp["icmp_type"].as_i64(), icmp["icmp_code"].as_i64()), (Some(8), Some(-1)));
    let (shown, _) = s.json(&["sg", "show", &gid]);
    assert_eq!(shown["ingress"].as_array().unwrap().len(), 3);

    let (e, _) = s.json(&[
        "endpoint",
        "create",
        "--universe",
        &uid,
        "--netns",
        "ns1",
        "--ip",
        "10.1.0.5",
        "--host",
        "host-b",
        "--sg",
        &gid,
    ]);
    assert_eq!(e["security_groups"], serde_json::json!([gid]));
    let eid = id(&e).to_owned();
    let (eps, _) = s.json(&["endpoint", "list", "--host", "host-b"]);
    assert_eq!(eps.as_array().unwrap().len(), 1);
    let (eps, _) = s.json(&["endpoint", "list", "--host", "host-a"]);
    assert_eq!(eps, serde_json::json!([]));
    let default = groups.as_array().unwrap().iter().find(|g| g["name"] == "default").unwrap();
    let (e2, _) = s.json(&["endpoint", "update", &eid, "--sg", &gid, "--sg", id(default)]);
    assert_eq!(e2["security_groups"].as_array().unwrap().len(), 2);
    let (shown, _) = s.json(&["endpoint", "show", &eid]);
    assert_eq!(shown, e2);

    let (hosts, _) = s.json(&["host", "list"]);
    assert_eq!(hosts[0]["name"], "host-a");
    assert_eq!(hosts[0]["underlay_ip"], "198.18.0.1");
    let rev = hosts[0]["revision"].as_u64().unwrap();
    assert_eq!(rev, 8, "two universes, a group, three rules, an endpoint, an update");
    let (waited, _) = s.json(&["wait", "--revision", &rev.to_string(), "--timeout", "2s"]);
    assert_eq!(waited, hosts);

    // Table output: a header and one aligned row per item.
    let out = s.verse(&["endpoint", "list"]);
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(lines[0].starts_with("ID "), "{text}");
    let col = lines[0].find("UNIVERSE").unwrap();
    assert_eq!(&lines[1][col..col + uid.len()], uid, "columns are aligned:\n{text}");
    let out = s.verse(&["sg", "show", &gid]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("8000-8100") && text.contains("type 8 code -1"), "{text}");

    // Deletes, in the order the API allows.
    for args in [vec!["rule", "delete", &gid, id(&r)], vec!["endpoint", "delete", &eid]] {
        let out = s.verse(&args);
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        assert!(String::from_utf8_lossy(&out.stderr).starts_with("revision "));
    }
    let out = s.verse(&["universe", "delete", &uid]);
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("deleted {uid}"));
}

#[test]
fn cli_exits_1_with_the_server_message_on_api_errors() {
    let s = server();
    let out = s.verse(&["universe", "show", "uni-00000000"]);
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        String::from_utf8_lossy(&out.stderr).trim(),
        "verse: universe uni-00000000 not found"
    );
    assert!(out.stdout.is_empty());

    let out = s.verse(&["universe", "create", "x", "--cidr", "10.0.0.0/33"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cidr:"));

    // Unreachable API: exit 1 with what failed.
    let out = Command::new(env!("CARGO_BIN_EXE_verse"))
        .args(["--api", "http://127.0.0.1:1", "host", "list"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("127.0.0.1:1"));

    // wait that times out.
    let out = s.verse(&["wait", "--revision", "999", "--timeout", "300ms"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("revision 999"));
}

#[test]
fn cli_exits_2_on_usage_errors() {
    let s = server();
    for args in [
        vec!["rule", "add", "sg-1", "--direction", "ingress", "--protocol", "tcp"], // no peer
        vec![
            "rule",
            "add",
            "sg-1",
            "--direction",
            "ingress",
            "--protocol",
            "tcp",
            "--cidr",
            "0.0.0.0/0",
            "--group",
            "sg-2",
        ],
        vec![
            "rule",
            "add",
            "sg-1",
            "--direction",
            "up",
            "--protocol",
            "tcp",
            "--cidr",
            "0.0.0.0/0",
        ],
        vec![
            "rule",
            "add",
            "sg-1",
            "--direction",
            "ingress",
            "--protocol",
            "tcp",
            "--ports",
            "70000",
            "--cidr",
            "0.0.0.0/0",
        ],
        vec!["universe", "create", "x"],    // no --cidr
        vec!["endpoint", "update", "ep-1"], // no --sg
        vec!["wait", "--revision", "1", "--timeout", "soon"],
        vec!["-o", "yaml", "host", "list"],
        vec!["frobnicate"],
    ] {
        let out = s.verse(&args);
        assert_eq!(
            out.status.code(),
            Some(2),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let out = Command::new(env!("CARGO_BIN_EXE_verse"))
        .args(["--api", "not a url", "host", "list"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn cli_reads_the_api_address_from_verse_api() {
    let s = server();
    let out = Command::new(env!("CARGO_BIN_EXE_verse"))
        .env("VERSE_API", s.url())
        .args(["-o", "json", "host", "list"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let hosts: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(hosts[0]["name"], "host-a");
}

#[test]
fn client_returns_typed_results_revisions_and_api_errors() {
    let s = server();
    let c = Client::new(&s.url()).unwrap();
    c.healthz().unwrap();
    let (u, rev) = c
        .create_universe(&CreateUniverse {
            name: "blue".into(),
            cidr: Some("10.1.0.0/16".into()),
            cidrs: None,
        })
        .unwrap();
    assert_eq!(rev, 1);
    let (g, rev) = c
        .create_group(&CreateGroup {
            universe: u.id.clone(),
            name: "web".into(),
            description: None,
        })
        .unwrap();
    assert_eq!(rev, 2);
    assert_eq!(c.get_group(&g.id).unwrap(), g);
    assert_eq!(c.list_groups(Some(&u.id)).unwrap().len(), 2);
    assert_eq!(c.list_groups(Some("uni-00000000")).unwrap().len(), 0);
    let hosts = c.wait_revision(2, Duration::from_secs(5)).unwrap();
    assert_eq!(hosts[0].revision, 2);
    assert!(c.metrics().unwrap().contains("verse_revision 2"));
    assert!(c.openapi().unwrap()["paths"]["/v1/hosts"].is_object());

    match c.delete_universe("uni-00000000").unwrap_err() {
        client::Error::Api { status, code, message } => {
            assert_eq!((status, code.as_str()), (404, "not_found"));
            assert!(message.contains("uni-00000000"));
        }
        other => panic!("unexpected {other}"),
    }
    let err = c.wait_revision(50, Duration::from_millis(200)).unwrap_err();
    assert!(matches!(err, client::Error::Timeout { revision: 50, .. }), "{err}");
    // Ids are path segments, percent-encoded, never path syntax.
    assert_eq!(c.get_universe("../hosts").unwrap_err().status(), Some(404));
}
