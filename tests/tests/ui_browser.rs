//! The web page at `/ui` (README, "Web page") in a real headless Chromium driven over WebDriver
//! (Debian's `chromium` and `chromium-driver`, both inside the host's namespace, where versed
//! listens): a drop provoked with real traffic between two workloads shows on the page, with
//! the universe, its groups and rules, the endpoints per host and the hosts; the token is
//! entered in the page, kept in sessionStorage only and sent in a header; markup in a user's
//! text is shown as text; the assets carry a strict Content-Security-Policy.
//!
//! The page shows rule hit counters and live events only where the daemon serves them
//! (`GET /v1/rule-stats`, `GET /v1/events`); where it does not, the page must say so and show
//! no number and no row in their place. The test asks the daemon which it is and holds the page
//! to that answer. A machine without Chromium fails this test: `cargo xtask setup` installs it.

use std::io::ErrorKind;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{ClientBuilder, Locator};
use serde_json::{json, Value};
use tests::*;

/// Debian's Chromium, as `chromium` installs it (the `/usr/bin/chromium` wrapper is a script).
const CHROMIUM: &str = "/usr/lib/chromium/chromium";

/// Fails (never skips) when the browser or its driver is missing, naming the fix.
fn require_browser() {
    assert!(
        Path::new(CHROMIUM).is_file(),
        "{CHROMIUM} is missing: this test needs Debian's chromium (`cargo xtask setup` installs it)"
    );
    let driver = Command::new("chromedriver").arg("--version").output();
    assert!(
        driver.as_ref().is_ok_and(|o| o.status.success()),
        "chromedriver does not run ({:?}): this test needs Debian's chromium-driver \
         (`cargo xtask setup` installs it)",
        driver.map(|o| o.status)
    );
}

/// What the daemon serves beyond the fleet's objects: rule hit counters and an event stream.
struct Serves {
    rule_stats: bool,
    events: bool,
}

impl Serves {
    fn ask(api: &Api) -> Serves {
        let r = api.get("/v1/rule-stats");
        assert!(r.status == 200 || r.status == 404, "GET /v1/rule-stats: {} {}", r.status, r.body);
        // A stream keeps the connection open: its reads time out; a missing route answers 404.
        let events = match api.request("GET", "/v1/events", None, Duration::from_secs(3)) {
            Ok(r) if r.status == 404 => false,
            Ok(r) => panic!("GET /v1/events answered and closed: {} {}", r.status, r.body),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => true,
            Err(e) => panic!("GET /v1/events: {e}"),
        };
        Serves { rule_stats: r.status == 200, events }
    }
}

/// chromedriver in a namespace, killed on drop.
struct Driver {
    child: Child,
    port: u16,
}

impl Driver {
    fn start(ns: &Netns) -> Driver {
        let port = unique_port();
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns.name(), "chromedriver", &format!("--port={port}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        die_with_parent(&mut cmd);
        let child =
            cmd.spawn().expect("chromedriver starts (cargo xtask setup installs chromium-driver)");
        let driver = Driver { child, port };
        let up = wait_until(Duration::from_secs(20), || {
            ns.enter(|| std::net::TcpStream::connect(("127.0.0.1", port))).is_ok()
        });
        assert!(up, "chromedriver did not listen on port {port} within 20 s");
        driver
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `f` every 200 ms until it returns `Some` or `timeout` passes.
async fn eventually<T, F, Fut>(timeout: Duration, mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let end = Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if Instant::now() > end {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[test]
fn the_page_shows_a_provoked_drop_and_the_fleet_with_a_token_under_a_strict_csp() {
    require_browser();
    let host = Host::start();
    let api = &host.api;
    let uni = api.create_universe("webshop", "10.11.0.0/16")["id"].as_str().unwrap().to_owned();
    let r = api.post(
        "/v1/security-groups",
        &json!({"universe": uni, "name": "db", "description": "<img src=x onerror=alert(1)>"}),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let db = r.json()["id"].as_str().unwrap().to_owned();
    let rule = api.add_rule(
        &db,
        &json!({"direction": "ingress", "protocol": "tcp", "from_port": 5432, "to_port": 5432, "cidr": "10.11.9.0/24"}),
    )["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let client = host.endpoint(&uni, "10.11.0.2", &[]);
    let server = host.endpoint(&uni, "10.11.0.3", &[&db]);
    let _listener = tcp_listen(&server.ns, 5432);
    // The drop the page must show: the client is not in 10.11.9.0/24.
    assert_dropped(&host, "policy_ingress", "client -> db:5432", || {
        tcp_connect(&client.ns, server.ip, 5432, Duration::from_millis(500))
    });

    // The assets: public, with the policy; the API behind them is not.
    let page = api.with_token(None).get("/ui");
    assert_eq!(page.status, 200);
    let csp = page.header("content-security-policy").expect("a CSP header").to_owned();
    for directive in
        ["default-src 'none'", "script-src 'self'", "connect-src 'self'", "frame-ancestors 'none'"]
    {
        assert!(csp.contains(directive), "{csp}");
    }
    assert!(!csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"), "{csp}");
    assert!(
        !page.body.contains("http://") && !page.body.contains("https://"),
        "no other origin: {}",
        page.body
    );
    for asset in ["/ui/app.js", "/ui/app.css"] {
        let r = api.with_token(None).get(asset);
        assert_eq!(r.status, 200, "{asset}");
        assert_eq!(r.header("content-security-policy"), Some(csp.as_str()), "{asset}");
        assert_eq!(r.header("x-content-type-options"), Some("nosniff"), "{asset}");
    }
    assert_eq!(api.with_token(None).get("/v1/universes").status, 401);
    let serves = Serves::ask(api);
    eprintln!("the daemon serves rule stats: {}, events: {}", serves.rule_stats, serves.events);

    let token = api.token().expect("the admin token").to_owned();
    let url = format!("{}/ui", api.url());
    let driver = Driver::start(host.netns());
    let profile = TempDir::new("chrome");
    let profile_arg = format!("--user-data-dir={}", profile.path().display());
    let (uni2, db2, rule2, client_id, server_id, host_name) = (
        uni.clone(),
        db.clone(),
        rule.clone(),
        client.id.clone(),
        server.id.clone(),
        host.name().to_owned(),
    );
    let port = driver.port;
    let (client_ns, server_ip) = (&client.ns, server.ip);
    let failure: Option<String> = host.netns().enter(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async move {
            let caps: serde_json::Map<String, Value> = serde_json::from_value(json!({
                "goog:chromeOptions": {
                    "binary": CHROMIUM,
                    "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                             "--no-first-run", "--disable-background-networking",
                             "--disable-component-update", "--disable-sync",
                             "--disable-dev-shm-usage", profile_arg]
                }
            }))
            .unwrap();
            let c = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
                .capabilities(caps)
                .connect(&format!("http://127.0.0.1:{port}"))
                .await
                .map_err(|e| format!("WebDriver session: {e}"))?;
            let result = async {
                c.goto(&url).await.map_err(|e| format!("goto {url}: {e}"))?;
                // Before a token: nothing of the fleet.
                let main_hidden = c.find(Locator::Id("main")).await.map_err(|e| e.to_string())?
                    .attr("hidden").await.map_err(|e| e.to_string())?;
                if main_hidden.is_none() {
                    return Err("the fleet is shown before a token is entered".to_owned());
                }
                let field = c.find(Locator::Id("token")).await.map_err(|e| e.to_string())?;
                field.send_keys(&token).await.map_err(|e| e.to_string())?;
                c.find(Locator::Id("connect")).await.map_err(|e| e.to_string())?
                    .click().await.map_err(|e| e.to_string())?;
                let text_of = |id: &'static str| {
                    let c = c.clone();
                    async move {
                        let e = c.find(Locator::Id(id)).await.ok()?;
                        e.text().await.ok()
                    }
                };
                let wanted: Vec<(&str, Vec<String>)> = vec![
                    ("drops", vec!["policy_ingress".into()]),
                    ("universes", vec![uni2.clone(), "webshop".into()]),
                    ("groups", vec![db2.clone(), rule2.clone(), "5432".into(), "10.11.9.0/24".into()]),
                    ("endpoints", vec![host_name.clone(), client_id.clone(), server_id.clone(), "10.11.0.2".into()]),
                    ("hosts", vec![host_name.clone()]),
                ];
                for (id, words) in &wanted {
                    let found = eventually(Duration::from_secs(20), || {
                        let words = words.clone();
                        let t = text_of(id);
                        async move { t.await.filter(|t| words.iter().all(|w| t.contains(w.as_str()))) }
                    })
                    .await;
                    if found.is_none() {
                        let shown = text_of(id).await.unwrap_or_default();
                        let status = text_of("status").await.unwrap_or_default();
                        return Err(format!("#{id} does not show {words:?}: {shown:?} (status: {status:?})"));
                    }
                }
                // Rule hit counters: a count where the daemon counts (this rule never matched:
                // the client is outside 10.11.9.0/24), else "not counted" and why, no number.
                let hits_cell = c
                    .execute(
                        "return [...document.querySelectorAll('table.rules tbody tr')]\
                         .filter(tr => tr.children[0].textContent === arguments[0])\
                         .map(tr => tr.children[5].textContent)",
                        vec![json!(rule2)],
                    )
                    .await
                    .map_err(|e| e.to_string())?;
                let groups_text = text_of("groups").await.unwrap_or_default();
                if serves.rule_stats {
                    if hits_cell != json!(["never matched"]) {
                        return Err(format!("the rule's hits: {hits_cell} (the API counts them)"));
                    }
                } else if hits_cell != json!(["not counted"])
                    || !groups_text.contains("does not count rule hits (GET /v1/rule-stats: 404)")
                {
                    return Err(format!(
                        "the daemon counts no rule hits, the page must say so: {hits_cell} {groups_text:?}"
                    ));
                }
                // Events: the provoked drop, live, where the daemon streams them (a drop is
                // provoked again while waiting: a stream shows what happens once it is open);
                // else the page says there is no stream and shows no row.
                if serves.events {
                    let shown = eventually(Duration::from_secs(30), || {
                        tcp_connect(client_ns, server_ip, 5432, Duration::from_millis(300));
                        let t = text_of("events");
                        // At from_endpoint the endpoint judged is the sender.
                        let client_id = client_id.clone();
                        async move {
                            t.await.filter(|t| {
                                t.contains("dropped")
                                    && t.contains("policy_ingress")
                                    && t.contains(&client_id)
                                    && t.contains("10.11.0.3:5432")
                            })
                        }
                    })
                    .await;
                    if shown.is_none() {
                        let t = text_of("events").await.unwrap_or_default();
                        return Err(format!("the events table does not show the drop: {t:?}"));
                    }
                } else {
                    let state = eventually(Duration::from_secs(20), || {
                        let t = text_of("events-section");
                        async move { t.await.filter(|t| t.contains("not served by this daemon")) }
                    })
                    .await;
                    let rows = c
                        .execute("return document.querySelectorAll('#events tbody tr:not(.note)').length", vec![])
                        .await
                        .map_err(|e| e.to_string())?;
                    let events_text = text_of("events").await.unwrap_or_default();
                    if state.is_none()
                        || rows != json!(0)
                        || !events_text.contains("serves no event stream (GET /v1/events: 404)")
                    {
                        return Err(format!(
                            "no event stream, the page must say so and show no event: {rows} rows, {events_text:?}"
                        ));
                    }
                }
                // A group's description with markup is shown as text, and nothing ran.
                let groups = c.find(Locator::Id("groups")).await.map_err(|e| e.to_string())?;
                let html = groups.html(true).await.map_err(|e| e.to_string())?;
                if html.contains("<img") {
                    return Err(format!("markup of a description became markup: {html}"));
                }
                // The token: in this tab's sessionStorage, nowhere else.
                let stored = c
                    .execute("return [sessionStorage.getItem('verse.token'), localStorage.length, document.cookie, location.href]", vec![])
                    .await
                    .map_err(|e| e.to_string())?;
                if stored[0] != Value::String(token.clone()) || stored[1] != json!(0) || stored[2] != json!("") {
                    return Err(format!("the token is not (only) in sessionStorage: {stored}"));
                }
                if stored[3].as_str().is_some_and(|u| u.contains(&token)) {
                    return Err("the token is in the URL".to_owned());
                }
                Ok(())
            }
            .await;
            let _ = c.close().await;
            result
        })
        .err()
    });
    drop(driver);
    if let Some(why) = failure {
        panic!("{why}\n--- versed log ---\n{}", host.versed.log());
    }
}
