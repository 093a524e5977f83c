//! The `verse` CLI and the typed client against a real API server on loopback (an ephemeral
//! port; the store in a temporary directory, a fake reconciler realizing every revision) and on
//! a local unix socket. No namespace: endpoints are placed on another host so none is plumbed.
//! The CLI authenticates with the admin token `versed` would make at first start (through
//! `VERSE_TOKEN` unless a test says otherwise), and never reads the user's own config file.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::watch;
use verse::api::{self, AppState, Stats};
use verse::auth;
use verse::client::{self, Client};
use verse::model::{CreateGroup, CreateUniverse};
use verse::store::{Realized, Store};

/// A running API server, on TCP and on a local unix socket; stops with the test process.
struct Server {
    addr: SocketAddr,
    /// The local socket (root only).
    socket: PathBuf,
    /// The first admin token.
    admin: String,
    /// The revision after the admin token was made.
    base: u64,
    /// An empty `XDG_CONFIG_HOME`: the CLI finds no config file there.
    xdg: PathBuf,
    dir: tempfile::TempDir,
}

fn server() -> Server {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open_embedded(dir.path()).unwrap();
    let socket = dir.path().join(auth::SOCKET_FILE);
    let xdg = dir.path().join("xdg");
    std::fs::create_dir(&xdg).unwrap();
    let state_dir = dir.path().to_owned();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            // host-b, where the endpoints go, is another host of the fleet that realizes every
            // revision at once, like this one.
            store.register_host("host-b", None).await.unwrap();
            auth::bootstrap_admin(&store, &state_dir, None).await.unwrap();
            let base = store.snapshot().revision;
            let (realized, realized_rx) = watch::channel(Realized::default());
            let mut states = store.subscribe();
            let reporter = store.clone();
            tokio::spawn(async move {
                loop {
                    let rev = states.borrow_and_update().revision;
                    reporter.report_realized("host-b", rev);
                    realized.send_replace(Realized::at(rev));
                    if states.changed().await.is_err() {
                        break;
                    }
                }
            });
            let state = AppState::new(
                store,
                "host-a".into(),
                Some("198.18.0.1".parse().unwrap()),
                realized_rx,
                Arc::new(|| Ok(Stats::default())),
            );
            let app = api::router(state);
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let local = auth::bind_local_socket(&state_dir.join(auth::SOCKET_FILE)).unwrap();
            tx.send((listener.local_addr().unwrap(), base)).unwrap();
            let unix = app.clone().into_make_service_with_connect_info::<auth::LocalPeer>();
            tokio::spawn(async move { axum::serve(local, unix).await.unwrap() });
            let tcp = app.into_make_service_with_connect_info::<SocketAddr>();
            axum::serve(listener, tcp).await.unwrap();
        });
    });
    let (addr, base) = rx.recv_timeout(Duration::from_secs(10)).unwrap();
    let admin = std::fs::read_to_string(dir.path().join(auth::ADMIN_TOKEN_FILE)).unwrap();
    Server { addr, socket, admin: admin.trim().to_owned(), base, xdg, dir }
}

impl Server {
    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
    /// `verse` with nothing from the user's environment: no API, token, context or config.
    fn bare(&self) -> Command {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_verse"));
        for var in [
            "VERSE_API",
            "VERSE_TOKEN",
            "VERSE_CONTEXT",
            "VERSE_CONFIG",
            "VERSE_CA_FILE",
            "VERSE_TLS_FINGERPRINT",
        ] {
            cmd.env_remove(var);
        }
        cmd.env("XDG_CONFIG_HOME", &self.xdg);
        cmd
    }
    /// `verse --api <this server> ARGS` with the admin token in `VERSE_TOKEN`.
    fn verse(&self, args: &[&str]) -> Output {
        self.bare()
            .env("VERSE_TOKEN", &self.admin)
            .arg("--api")
            .arg(self.url())
            .args(args)
            .output()
            .unwrap()
    }
    /// The admin's typed client.
    fn client(&self) -> Client {
        Client::new(&self.url()).unwrap().with_token(&self.admin)
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
    assert_eq!(err.trim(), format!("revision {}", s.base + 1));
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
    assert_eq!(err.trim(), format!("revision {}", s.base + 3));
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
    assert_eq!(rev, s.base + 8, "two universes, a group, three rules, an endpoint, an update");
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

    // IPv6 goes through to the API, which stores it or refuses it naming the field (endpoints'
    // ipv6: controller/tests/api.rs).
    let (u6, _) = s.json(&[
        "universe",
        "create",
        "dual",
        "--cidr",
        "10.0.0.0/16",
        "--ipv6-cidr",
        "fd00:ab::/48",
    ]);
    assert_eq!(u6["ipv6_cidrs"], serde_json::json!(["fd00:ab::/48"]), "{u6}");
    let out = s.verse(&[
        "universe",
        "create",
        "x",
        "--cidr",
        "10.9.0.0/16",
        "--ipv6-cidr",
        "fd00:ab::/40",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(err.contains("ipv6_cidrs[0]: prefix /40"), "{err}");

    // Unreachable API: exit 1 with what failed.
    let out = s.bare().args(["--api", "http://127.0.0.1:1", "host", "list"]).output().unwrap();
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
    let out = s.bare().args(["--api", "not a url", "host", "list"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn cli_reads_the_api_address_from_verse_api() {
    let s = server();
    let out = s
        .bare()
        .env("VERSE_API", s.url())
        .env("VERSE_TOKEN", &s.admin)
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
    let c = s.client();
    c.healthz().unwrap();
    let (u, rev) = c
        .create_universe(&CreateUniverse {
            name: "blue".into(),
            cidr: Some("10.1.0.0/16".into()),
            cidrs: None,
            ipv6_cidrs: None,
        })
        .unwrap();
    assert_eq!(rev, s.base + 1);
    let (g, rev) = c
        .create_group(&CreateGroup {
            universe: u.id.clone(),
            name: "web".into(),
            description: None,
        })
        .unwrap();
    assert_eq!(rev, s.base + 2);
    assert_eq!(c.get_group(&g.id).unwrap(), g);
    assert_eq!(c.list_groups(Some(&u.id)).unwrap().len(), 2);
    assert_eq!(c.list_groups(Some("uni-00000000")).unwrap().len(), 0);
    let hosts = c.wait_revision(rev, Duration::from_secs(5)).unwrap();
    assert_eq!(hosts[0].revision, rev);
    assert!(c.metrics().unwrap().contains(&format!("verse_revision {rev}")));
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

/// stderr of a finished `verse`, for messages.
fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn cli_takes_its_token_from_the_flag_the_environment_or_a_config_context() {
    let s = server();
    let list = ["-o", "json", "universe", "list"];
    // No token: the server's 401, exit 1.
    let out = s.bare().args(["--api", &s.url()]).args(list).output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    assert!(stderr(&out).contains("needs a token"), "{}", stderr(&out));
    // --token, VERSE_TOKEN.
    let out = s.bare().args(["--api", &s.url(), "--token", &s.admin]).args(list).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let out = s.bare().env("VERSE_TOKEN", &s.admin).args(["--api", &s.url()]).args(list).output();
    assert!(out.unwrap().status.success());

    // A config file with contexts: a token file relative to the config's directory, an inline
    // token, and the current context.
    let conf_dir = s.dir.path().join("conf");
    std::fs::create_dir(&conf_dir).unwrap();
    std::fs::write(conf_dir.join("admin.token"), format!("{}\n", s.admin)).unwrap();
    let config = conf_dir.join("config.toml");
    std::fs::write(
        &config,
        format!(
            "current_context = \"good\"\n\
             [contexts.good]\napi = \"{url}\"\ntoken_file = \"admin.token\"\n\
             [contexts.stale]\napi = \"{url}\"\ntoken = \"vt_00000000_{zeros}\"\n",
            url = s.url(),
            zeros = "0".repeat(64)
        ),
    )
    .unwrap();
    let conf = config.to_str().unwrap();
    let out = s.bare().args(["--config", conf]).args(list).output().unwrap();
    assert!(out.status.success(), "current context: {}", stderr(&out));
    let out = s.bare().args(["--config", conf, "--context", "stale"]).args(list).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("unknown or revoked"), "{}", stderr(&out));
    // The flag wins over the context; the context's API is used.
    let out = s
        .bare()
        .env("VERSE_CONTEXT", "stale")
        .args(["--config", conf, "--token", &s.admin])
        .args(list)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    // The default file under XDG_CONFIG_HOME.
    std::fs::create_dir(s.xdg.join("verse")).unwrap();
    std::fs::copy(&config, s.xdg.join("verse/config.toml")).unwrap();
    std::fs::copy(conf_dir.join("admin.token"), s.xdg.join("verse/admin.token")).unwrap();
    let out = s.bare().args(list).output().unwrap();
    assert!(out.status.success(), "default config file: {}", stderr(&out));
    // Unusable configuration: exit 2, naming what is wrong.
    let out = s.bare().args(["--config", conf, "--context", "nope"]).args(list).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("nope") && stderr(&out).contains("good"), "{}", stderr(&out));
    let out = s.bare().args(["--config", "/nonexistent/verse.toml"]).args(list).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    std::fs::write(&config, "current_context = \"x\"\n[contexts.x]\napi = 5\n").unwrap();
    let out = s.bare().args(["--config", conf]).args(list).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("api"), "{}", stderr(&out));
}

#[test]
fn cli_creates_a_scoped_token_that_does_what_its_role_says_then_revokes_it() {
    let s = server();
    let (blue, _) = s.json(&["universe", "create", "blue", "--cidr", "10.1.0.0/16"]);
    let (red, _) = s.json(&["universe", "create", "red", "--cidr", "10.2.0.0/16"]);
    let (blue, red) = (id(&blue).to_owned(), id(&red).to_owned());

    // Table output: the secret alone on stdout, what it is on stderr.
    let out = s.verse(&[
        "token",
        "create",
        "--role",
        "editor",
        "--universe",
        &blue,
        "--expires",
        "1h",
        "--description",
        "ci",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let secret = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert!(auth::secret_id(&secret).is_some(), "{secret:?}");
    assert!(stderr(&out).contains("editor of") && stderr(&out).contains("shown once"));
    let tid = auth::secret_id(&secret).unwrap();

    let as_editor = |args: &[&str]| {
        s.bare().args(["--api", &s.url(), "--token", &secret]).args(args).output().unwrap()
    };
    let out = as_editor(&["-o", "json", "sg", "create", "--universe", &blue, "web"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = as_editor(&["sg", "create", "--universe", &red, "web"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("not found"), "another universe does not exist for it");
    let out = as_editor(&["universe", "create", "green", "--cidr", "10.3.0.0/16"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("may not change universes"), "{}", stderr(&out));
    let out = as_editor(&["-o", "json", "universe", "list"]);
    let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1);
    let out = as_editor(&["token", "list"]);
    assert_eq!(out.status.code(), Some(1), "tokens are the admin's");

    let (tokens, _) = s.json(&["token", "list"]);
    let listed = tokens.as_array().unwrap().iter().find(|t| t["id"] == tid.as_str()).unwrap();
    assert_eq!(
        (listed["role"].as_str(), listed["universe"].as_str()),
        (Some("editor"), Some(blue.as_str()))
    );
    assert!(!String::from_utf8_lossy(&s.verse(&["token", "list"]).stdout).contains(&secret));

    // The audit trail, filtered by universe and time, shows the editor's accepted and refused
    // edits.
    let (trail, _) = s.json(&["audit", "--universe", &blue, "--since", "1h"]);
    let mine: Vec<(&str, u64)> = trail
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["principal"] == tid.as_str())
        .map(|r| (r["action"].as_str().unwrap(), r["status"].as_u64().unwrap()))
        .collect();
    assert_eq!(mine, [("POST /v1/security-groups", 201)]);
    let out = s.verse(&["audit", "--limit", "3"]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert_eq!(text.lines().count(), 4, "a header and 3 records:\n{text}");
    assert!(text.starts_with("TIME "), "{text}");

    // Revoked: refused at once.
    let out = s.verse(&["token", "delete", &tid]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = as_editor(&["universe", "list"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("unknown or revoked"), "{}", stderr(&out));
}

#[test]
fn cli_and_client_speak_the_local_socket_without_a_token() {
    let s = server();
    let api = format!("unix:{}", s.socket.display());
    // Tests run as root: the socket's peer is uid 0, hence local-root.
    let out = s
        .bare()
        .args(["--api", &api, "-o", "json", "universe", "create", "blue", "--cidr", "10.1.0.0/16"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let c = Client::new(&api).unwrap();
    c.healthz().unwrap();
    assert_eq!(c.list_universes().unwrap().len(), 1);
    let trail = c.audit(None, None, Some(1)).unwrap();
    assert_eq!(trail[0].principal, auth::LOCAL_ROOT);
    assert!(trail[0].source.starts_with("unix (uid 0"), "{}", trail[0].source);
    // A token on the socket is that token, not local-root.
    let bad = Client::new(&api).unwrap().with_token(format!("vt_00000000_{}", "0".repeat(64)));
    assert_eq!(bad.list_universes().unwrap_err().status(), Some(401));
    // The socket is root's only.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&s.socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    // Not a socket path: a clear error.
    assert!(Client::new("unix:relative/path").is_err());
    let gone = Client::new("unix:/nonexistent/api.sock").unwrap();
    let err = gone.list_hosts().unwrap_err().to_string();
    assert!(err.contains("/nonexistent/api.sock"), "{err}");
}
