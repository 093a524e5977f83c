//! The etcd store against a real etcd (Debian's `etcd`, 3.4) on loopback: two `Store`s on one
//! etcd behave as two hosts of a fleet. Edits through one reach the other's subscription,
//! concurrent edits from both are all kept with strictly increasing revisions (S13), hosts
//! register and turn unhealthy when their lease lapses, a store rides out an etcd restart, and
//! an API mutation returns only once every healthy host has realized it. No root needed.

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tests::{Etcd, EtcdCerts};
use tokio::sync::watch;
use verse::api::{self, AppState, Stats};
use verse::model::{self, State};
use verse::store::{EtcdOptions, EtcdTls, HostStatus, Realized, Store, WatchStats};

/// Bound of every wait in these tests.
const WAIT: Duration = Duration::from_secs(20);

/// A store on a test's etcd (the harness's [`Etcd::start_local`]: one member on loopback).
trait EtcdStore {
    /// What a host's store is opened with: this etcd, a prefix of the test's own, lease `ttl`.
    fn options(&self, ttl: Duration) -> EtcdOptions;
    /// A store opened on this etcd.
    async fn store(&self, ttl: Duration) -> Store;
}

impl EtcdStore for Etcd {
    fn options(&self, ttl: Duration) -> EtcdOptions {
        EtcdOptions {
            prefix: "/verse-test/".into(),
            lease_ttl: ttl,
            ..EtcdOptions::new(vec![self.endpoint().to_string()])
        }
    }

    async fn store(&self, ttl: Duration) -> Store {
        open(self.options(ttl)).await
    }
}

/// A store opened with `options`, which must succeed within [`WAIT`].
async fn open(options: EtcdOptions) -> Store {
    tokio::time::timeout(WAIT, Store::open_etcd(options))
        .await
        .expect("etcd store did not open in time")
        .expect("open the etcd store")
}

fn universe(name: &str) -> model::CreateUniverse {
    model::CreateUniverse {
        name: name.into(),
        cidr: Some("10.1.0.0/16".into()),
        cidrs: None,
        ipv6_cidrs: None,
    }
}

/// Waits until the state published to `rx` satisfies `ok`.
async fn wait_state(rx: &mut watch::Receiver<Arc<State>>, what: &str, ok: impl Fn(&State) -> bool) {
    tokio::time::timeout(WAIT, rx.wait_for(|s| ok(s)))
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
        .expect("the store closed its subscription");
}

/// Waits until the hosts of `store` satisfy `ok`; returns them.
async fn wait_hosts(
    store: &Store,
    what: &str,
    ok: impl Fn(&[HostStatus]) -> bool,
) -> Vec<HostStatus> {
    let mut rx = store.subscribe_hosts().await.unwrap();
    let waited = tokio::time::timeout(WAIT, rx.wait_for(|h| ok(h)))
        .await
        .map(|hosts| hosts.expect("the store closed its hosts").as_ref().clone());
    waited.unwrap_or_else(|_| panic!("timed out waiting for {what}; hosts: {:?}", rx.borrow()))
}

/// Waits until `store` sees host `name` healthy, or unhealthy, as `healthy` says; returns the
/// hosts.
async fn wait_health(store: &Store, name: &str, healthy: bool) -> Vec<HostStatus> {
    let what = format!("{name} {}", if healthy { "healthy" } else { "unhealthy" });
    wait_hosts(store, &what, |h| h.iter().any(|h| h.name == name && h.healthy == healthy)).await
}

/// Waits until `store` sees host `name` healthy, having realized revision `revision`.
async fn wait_healthy_at(store: &Store, name: &str, revision: u64) {
    let what = format!("{name} healthy at revision {revision}");
    wait_hosts(store, &what, |h| {
        h.iter().any(|h| h.name == name && h.healthy && h.revision == revision)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edit_through_one_store_appears_in_the_others_subscription() {
    let etcd = Etcd::start_local();
    let a = etcd.store(Duration::from_secs(5)).await;
    let b = etcd.store(Duration::from_secs(5)).await;
    let mut rx = b.subscribe();

    let (u, rev) = a.edit(|s| s.create_universe(universe("blue"))).await.unwrap();
    assert!(rev > 0, "an edit's revision is etcd's revision of its transaction");
    assert_eq!(a.snapshot().revision, rev);
    assert!(a.snapshot().universes.contains_key(&u.id), "the editor sees its own edit at once");
    wait_state(&mut rx, "the universe on the other store", |s| s.revision >= rev).await;
    assert_eq!(*b.snapshot(), *a.snapshot(), "both stores publish the same state");
    assert!(b.snapshot().universes.contains_key(&u.id));
    assert_eq!(b.snapshot().groups.len(), 1, "with its default group (S3)");

    // And back: an edit through b that deletes it reaches a.
    let mut rx = a.subscribe();
    let id = u.id.clone();
    let ((), rev2) = b.edit(|s| s.delete_universe(&id)).await.unwrap();
    assert!(rev2 > rev);
    wait_state(&mut rx, "the deletion on the first store", |s| s.revision >= rev2).await;
    assert!(a.snapshot().universes.is_empty() && a.snapshot().groups.is_empty());

    // A refused edit changes nothing anywhere.
    let err = a
        .edit(|s| -> model::Result<()> {
            s.create_universe(universe("red"))?;
            Err(model::Error::invalid("name", "refused on purpose"))
        })
        .await
        .unwrap_err();
    assert!(err.to_string().contains("refused on purpose"), "{err}");
    assert_eq!(a.snapshot().revision, rev2);
    // A store opened afterwards reads the same state from etcd.
    let c = etcd.store(Duration::from_secs(5)).await;
    assert_eq!(*c.snapshot(), *a.snapshot());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_edits_from_two_stores_are_all_kept_with_increasing_revisions() {
    let etcd = Etcd::start_local();
    let a = etcd.store(Duration::from_secs(5)).await;
    let b = etcd.store(Duration::from_secs(5)).await;
    const EACH: usize = 12;
    let mut tasks = Vec::new();
    for (side, store) in [("a", &a), ("b", &b)] {
        for i in 0..EACH {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let name = format!("{side}{i}");
                let (u, rev) = store.edit(|s| s.create_universe(universe(&name))).await.unwrap();
                (u, rev)
            }));
        }
    }
    let mut revs = Vec::new();
    let mut vnis = Vec::new();
    for t in tasks {
        let (u, rev) = t.await.unwrap();
        revs.push(rev);
        vnis.push(u.vni);
    }
    revs.sort();
    revs.dedup();
    // Every create has a revision of its own, so no edit was lost or merged with another.
    assert_eq!(revs.len(), 2 * EACH, "{revs:?}");
    let last = *revs.last().unwrap();
    vnis.sort();
    vnis.dedup();
    assert_eq!(vnis.len(), 2 * EACH, "an edit re-run after a conflict picked a fresh VNI");
    for store in [&a, &b] {
        let mut rx = store.subscribe();
        wait_state(&mut rx, "every edit", |s| s.revision == last).await;
        let snap = store.snapshot();
        assert_eq!(snap.universes.len(), 2 * EACH);
        assert_eq!(snap.groups.len(), 2 * EACH);
    }
    assert_eq!(*a.snapshot(), *b.snapshot());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registered_host_is_healthy_until_its_lease_lapses() {
    let etcd = Etcd::start_local();
    let ttl = Duration::from_secs(2);
    let a = etcd.store(ttl).await;
    let b = etcd.store(ttl).await;
    let ip = Ipv4Addr::new(198, 18, 0, 1);
    // h1 as every store lists it, at revision 1 with its underlay address.
    let h1 = |healthy| HostStatus {
        name: "h1".into(),
        underlay_ip: Some(ip),
        api: None,
        api_fingerprint: None,
        revision: 1,
        healthy,
        errors: vec![],
    };
    a.register_host("h1", Some(ip)).await.unwrap();
    // Registering again changes nothing.
    let rev = a.snapshot().revision;
    a.register_host("h1", Some(ip)).await.unwrap();
    a.report_realized("h1", 1);
    // The liveness record (healthy, revision) and the registration (underlay address) are two
    // keys: the host's liveness starts before its registration, so b may see one before the other.
    let hosts = wait_hosts(&b, "h1 healthy at revision 1 with its underlay address", |h| {
        h.iter()
            .any(|h| h.name == "h1" && h.healthy && h.revision == 1 && h.underlay_ip == Some(ip))
    })
    .await;
    assert_eq!(hosts, [h1(true)]);
    let mut rx = b.subscribe();
    wait_state(&mut rx, "h1 in the desired state", |s| s.hosts.contains_key("h1")).await;
    assert_eq!(b.snapshot().hosts["h1"].underlay_ip, Some(ip));
    assert_eq!(b.snapshot().revision, rev, "a second registration bumps nothing");

    // The lease is kept alive well past its TTL while the store lives.
    tokio::time::sleep(ttl * 2).await;
    let hosts = b.hosts().await.unwrap();
    assert!(hosts.iter().any(|h| h.name == "h1" && h.healthy), "{hosts:?}");

    // The store (its versed) goes away: within about a TTL, h1 is unhealthy everywhere,
    // keeping its last realized revision; its record stays in the desired state.
    drop(a);
    let gone = Instant::now();
    let hosts = wait_health(&b, "h1", false).await;
    assert!(gone.elapsed() <= ttl + Duration::from_secs(3), "took {:?}", gone.elapsed());
    assert_eq!(hosts, [h1(false)]);
    assert!(b.snapshot().hosts.contains_key("h1"));

    // A new versed on h1 makes it healthy again.
    let a = etcd.store(ttl).await;
    a.register_host("h1", Some(ip)).await.unwrap();
    a.report_realized("h1", 3);
    wait_healthy_at(&b, "h1", 3).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn store_keeps_its_state_while_etcd_is_down_and_catches_up_after() {
    let mut etcd = Etcd::start_local();
    let ttl = Duration::from_secs(2);
    let a = etcd.store(ttl).await;
    let b = etcd.store(ttl).await;
    let (u, _) = a.edit(|s| s.create_universe(universe("blue"))).await.unwrap();
    b.register_host("h2", None).await.unwrap();
    b.report_realized("h2", 2);
    wait_health(&a, "h2", true).await;

    etcd.kill(0);
    // Edits fail (and say why); the published state stays, so a reconciler keeps enforcing it.
    let err = a.edit(|s| s.create_universe(universe("red"))).await.unwrap_err();
    assert!(err.is_unavailable(), "{err}");
    assert!(b.snapshot().universes.contains_key(&u.id));
    assert!(!b.subscribe().has_changed().unwrap());

    etcd.restart(0);
    // The first edits after the restart may race the reconnection; retry within the bound.
    let deadline = Instant::now() + WAIT;
    let (green, rev) = loop {
        match a.edit(|s| s.create_universe(universe("green"))).await {
            Ok(done) => break done,
            Err(e) => {
                assert!(Instant::now() < deadline, "no edit went through after the restart: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    let mut rx = b.subscribe();
    wait_state(&mut rx, "the edit made after etcd came back", |s| s.revision >= rev).await;
    assert!(b.snapshot().universes.contains_key(&green.id));
    // h2's liveness was renewed: it is healthy with its realized revision.
    b.report_realized("h2", rev);
    wait_healthy_at(&a, "h2", rev).await;
}

/// A TCP proxy in front of etcd that can cut a store off (every connection closed, new ones
/// refused) and let it back, while other stores keep talking to etcd directly.
struct Proxy {
    port: u16,
    open: Arc<std::sync::atomic::AtomicBool>,
    conns: Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    async fn start(target: u16) -> Proxy {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let open = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let conns: Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>> = Arc::default();
        let (o, c) = (open.clone(), conns.clone());
        let accept = tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !o.load(Ordering::SeqCst) {
                    continue; // dropped: refused
                }
                let task = tokio::spawn(async move {
                    if let Ok(mut outbound) =
                        tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                c.lock().unwrap().push(task.abort_handle());
            }
        });
        Proxy { port, open, conns, accept }
    }

    fn cut(&self) {
        self.open.store(false, std::sync::atomic::Ordering::SeqCst);
        for c in self.conns.lock().unwrap().drain(..) {
            c.abort();
        }
    }

    fn heal(&self) {
        self.open.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        self.accept.abort();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_cut_off_from_etcd_turns_unhealthy_then_catches_up_past_a_compaction() {
    let etcd = Etcd::start_local();
    let ttl = Duration::from_secs(2);
    let proxy = Proxy::start(etcd.endpoint().port()).await;
    let a = etcd.store(ttl).await;
    let mut options = etcd.options(ttl);
    options.endpoints = vec![format!("127.0.0.1:{}", proxy.port)];
    let b = open(options).await;
    let (blue, _) = a.edit(|s| s.create_universe(universe("blue"))).await.unwrap();
    b.register_host("h2", None).await.unwrap();
    b.report_realized("h2", 2);
    wait_health(&a, "h2", true).await;
    let mut rx = b.subscribe();
    wait_state(&mut rx, "blue on the cut-off store", |s| s.universes.contains_key(&blue.id)).await;
    let before = b.snapshot();

    proxy.cut();
    // Cut off for longer than its lease: h2 is unhealthy for the rest of the fleet.
    wait_health(&a, "h2", false).await;
    // Meanwhile the fleet edits, and etcd compacts the history the cut-off store would need.
    let (green, rev) = a.edit(|s| s.create_universe(universe("green"))).await.unwrap();
    let id = blue.id.clone();
    let ((), rev2) = a.edit(|s| s.delete_universe(&id)).await.unwrap();
    assert!(rev2 > rev);
    etcd.etcdctl(&["compact", &etcd.revision().to_string()]);
    // The cut-off store still publishes the last state it had (its dataplane keeps enforcing it).
    assert_eq!(*b.snapshot(), *before);

    proxy.heal();
    wait_state(&mut rx, "the edits made while cut off", |s| s.revision >= rev2).await;
    let snap = b.snapshot();
    assert!(snap.universes.contains_key(&green.id) && !snap.universes.contains_key(&blue.id));
    assert_eq!(*snap, *a.snapshot());
    // And its liveness is renewed.
    b.report_realized("h2", rev2);
    wait_healthy_at(&a, "h2", rev2).await;
}

/// An API served in process: its URL and an admin token.
struct Served {
    url: String,
    token: String,
    _dir: tempfile::TempDir,
}

/// The API of a host over store `store`, serving on a free loopback port, with a fake
/// reconciler that realizes each revision at once, and the fleet's first admin token.
async fn serve(store: Store, host: &str) -> Served {
    let dir = tempfile::tempdir().unwrap();
    verse::auth::bootstrap_admin(&store, dir.path(), None).await.unwrap();
    let token = std::fs::read_to_string(dir.path().join(verse::auth::ADMIN_TOKEN_FILE)).unwrap();
    serve_as(store, host, token.trim(), dir).await
}

/// Like [`serve`], for a fleet whose admin token `token` already exists.
async fn serve_as(store: Store, host: &str, token: &str, dir: tempfile::TempDir) -> Served {
    let token = token.to_owned();
    let (realized, realized_rx) = watch::channel(Realized::default());
    let mut rx = store.subscribe();
    let reporter = store.clone();
    let name = host.to_owned();
    tokio::spawn(async move {
        loop {
            let rev = rx.borrow_and_update().revision;
            realized.send_replace(Realized::at(rev));
            reporter.report_realized(&name, rev);
            if rx.changed().await.is_err() {
                break;
            }
        }
    });
    let stats: api::StatsFn = Arc::new(|| Ok(Stats::default()));
    let app = api::router(AppState::new(store, host.into(), None, realized_rx, stats));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    Served { url, token: token.trim().to_owned(), _dir: dir }
}

/// Runs `f` with the CLI's (blocking) client of the API `api` (as its admin), off the async
/// runtime.
async fn cli<T: Send + 'static>(
    api: &Served,
    f: impl FnOnce(&verse::client::Client) -> T + Send + 'static,
) -> T {
    let (url, token) = (api.url.clone(), api.token.clone());
    tokio::task::spawn_blocking(move || {
        f(&verse::client::Client::new(&url).unwrap().with_token(token))
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_mutation_returns_once_every_healthy_host_realized_it() {
    let etcd = Etcd::start_local();
    let ttl = Duration::from_secs(2);
    let a = etcd.store(ttl).await;
    a.register_host("h1", None).await.unwrap();
    let url = serve(a.clone(), "h1").await;

    // h2 is alive but slow: it realizes each revision 1.5 s late.
    let b = etcd.store(ttl).await;
    b.register_host("h2", Some(Ipv4Addr::new(198, 18, 0, 2))).await.unwrap();
    let slow = b.clone();
    let slow_task = tokio::spawn(async move {
        let mut rx = slow.subscribe();
        loop {
            let rev = rx.borrow_and_update().revision;
            tokio::time::sleep(Duration::from_millis(1500)).await;
            slow.report_realized("h2", rev);
            if rx.changed().await.is_err() {
                break;
            }
        }
    });
    wait_health(&a, "h2", true).await;

    let (start, (u, rev)) = cli(&url, |c| {
        let start = Instant::now();
        (start, c.create_universe(&universe("blue")).unwrap())
    })
    .await;
    assert!(start.elapsed() >= Duration::from_millis(1400), "returned before h2 realized it");
    assert!(a.snapshot().universes.contains_key(&u.id));
    let hosts = a.hosts().await.unwrap();
    let h2 = hosts.iter().find(|h| h.name == "h2").unwrap();
    assert!(h2.revision >= rev && h2.healthy, "{hosts:?}");

    // GET /v1/hosts shows both, sorted, with their realized revisions (S13).
    let listed = cli(&url, |c| c.list_hosts().unwrap()).await;
    let names: Vec<_> = listed.iter().map(|h| (h.name.as_str(), h.healthy)).collect();
    assert_eq!(names, [("h1", true), ("h2", true)]);
    assert!(listed.iter().all(|h| h.revision >= rev), "{listed:?}");
    assert_eq!(listed[1].underlay_ip, Some(Ipv4Addr::new(198, 18, 0, 2)));

    // h2 dies: once its lease lapses it is no longer waited for.
    slow_task.abort();
    let _ = slow_task.await;
    drop(b);
    wait_health(&a, "h2", false).await;
    let (elapsed, waited) = cli(&url, |c| {
        let start = Instant::now();
        let (_, rev) = c.create_universe(&universe("red")).unwrap();
        let elapsed = start.elapsed();
        (elapsed, c.wait_revision(rev, Duration::from_secs(5)))
    })
    .await;
    assert!(elapsed < Duration::from_secs(2), "waited {elapsed:?} for a dead host");
    assert!(waited.is_ok(), "`verse wait` ignores unhealthy hosts: {waited:?}");
}

fn audit_record(host: &str, n: u64, universe: Option<&str>) -> verse::audit::AuditRecord {
    verse::audit::AuditRecord {
        time: model::Timestamp(std::time::SystemTime::now()),
        host: host.into(),
        principal: "tok-00000001".into(),
        source: "127.0.0.1:1".into(),
        action: "POST /v1/security-groups".into(),
        universe: universe.map(str::to_owned),
        objects: vec![],
        status: 201,
        revision: Some(n),
        detail: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_records_of_every_store_are_read_from_any_apart_from_the_state_and_trimmed() {
    use verse::audit::Query;
    use verse::store::AuditRetention;
    let etcd = Etcd::start_local();
    let a = etcd.store(Duration::from_secs(5)).await;
    let b = etcd.store(Duration::from_secs(5)).await;
    let (blue, _) = a.edit(|s| s.create_universe(universe("blue"))).await.unwrap();
    let mut rx = b.subscribe();
    wait_state(&mut rx, "blue on the other store", |s| s.universes.contains_key(&blue.id)).await;
    rx.mark_unchanged();
    let before = b.snapshot();
    // More than one page of records, from both stores, interleaved.
    for n in 0..1100u64 {
        let (store, host) = if n % 2 == 0 { (&a, "h1") } else { (&b, "h2") };
        let u = (n % 3 == 0).then_some(blue.id.as_str());
        store.append_audit(&audit_record(host, n, u)).await.unwrap();
    }
    // The trail is not desired state: no revision, nothing published.
    assert_eq!(*b.snapshot(), *before);
    assert!(!rx.has_changed().unwrap());
    let all = Query { since: None, universe: None, limit: 10_000 };
    for store in [&a, &b] {
        let got = store.query_audit(&all).await.unwrap();
        let ns: Vec<u64> = got.iter().filter_map(|r| r.revision).collect();
        assert_eq!(ns, (0..1100).collect::<Vec<_>>(), "every record, oldest first");
    }
    let newest = Query { since: None, universe: Some(blue.id.clone()), limit: 2 };
    let got: Vec<u64> =
        b.query_audit(&newest).await.unwrap().iter().filter_map(|r| r.revision).collect();
    assert_eq!(got, [1095, 1098]);
    // An edit still reads only the state (the audit range is skipped) and works.
    let (red, rev) = b.edit(|s| s.create_universe(universe("red"))).await.unwrap();
    assert!(rev > before.revision && b.snapshot().universes.contains_key(&red.id));

    // A store with a smaller retention trims the trail as it opens, to the newest records.
    let mut options = etcd.options(Duration::from_secs(5));
    options.audit_retention =
        AuditRetention { max_records: 100, max_age: Duration::from_secs(3600) };
    let c = open(options).await;
    let deadline = Instant::now() + WAIT;
    loop {
        let n =
            etcd.etcdctl(&["get", "--prefix", "--keys-only", "/verse-test/audit/", "-w", "json"]);
        let count =
            serde_json::from_str::<serde_json::Value>(&n).unwrap()["count"].as_u64().unwrap_or(0);
        if count == 100 {
            break;
        }
        assert!(Instant::now() < deadline, "the trail was not trimmed to 100 records: {count}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let got = c.query_audit(&all).await.unwrap();
    assert_eq!(got.first().and_then(|r| r.revision), Some(1000), "the oldest went first");
    assert_eq!(got.len(), 100);
}

/// `etcdctl --user root:<pw> ARGS` (once auth is enabled).
fn etcdctl_root(etcd: &Etcd, args: &[&str]) -> String {
    let mut all = vec!["--user", "root:root-pw"];
    all.extend_from_slice(args);
    etcd.etcdctl(&all)
}

/// etcd's `root` user, and the README's role of a host whose API takes edits (`readwrite` on
/// the prefix `p`) with its user `api-host` (password `api-pw`); auth is not enabled yet.
fn api_role_and_user(etcd: &Etcd, p: &str) {
    etcd.etcdctl(&["user", "add", "root:root-pw", "--interactive=false"]);
    etcd.etcdctl(&["role", "add", "verse-api"]);
    etcd.etcdctl(&["role", "grant-permission", "verse-api", "--prefix=true", "readwrite", p]);
    etcd.etcdctl(&["user", "add", "api-host:api-pw", "--interactive=false"]);
    etcd.etcdctl(&["user", "grant-role", "api-host", "verse-api"]);
}

/// The README's role of an enforce-only host `host` (user `host`, password `<host>-pw`): `read`
/// on each of `reads` under the prefix `p` (the keys below it when it is empty or ends with
/// '/'), `readwrite` on its own `alive/` and `hosts/` records and on `audit/`; then etcd's auth
/// is enabled.
fn enforce_only_role_then_auth(etcd: &Etcd, p: &str, host: &str, reads: &[&str]) {
    let role = format!("verse-{host}");
    etcd.etcdctl(&["role", "add", &role]);
    for read in reads {
        let key = format!("{p}{read}");
        let prefix = if key.ends_with('/') { "--prefix=true" } else { "--prefix=false" };
        etcd.etcdctl(&["role", "grant-permission", &role, prefix, "read", &key]);
    }
    for key in [format!("alive/{host}"), format!("hosts/{host}")] {
        etcd.etcdctl(&["role", "grant-permission", &role, "readwrite", &format!("{p}{key}")]);
    }
    let audit = format!("{p}audit/");
    etcd.etcdctl(&["role", "grant-permission", &role, "--prefix=true", "readwrite", &audit]);
    etcd.etcdctl(&["user", "add", &format!("{host}:{host}-pw"), "--interactive=false"]);
    etcd.etcdctl(&["user", "grant-role", host, &role]);
    etcd.etcdctl(&["auth", "enable"]);
}

/// The store options of a host that authenticates to `etcd` as `user`.
fn as_etcd_user(etcd: &Etcd, ttl: Duration, user: &str, pw: &str) -> EtcdOptions {
    let mut o = etcd.options(ttl);
    o.user = Some((user.to_owned(), pw.to_owned()));
    o
}

/// The etcd access control the README describes, on a real etcd with auth enabled: an
/// API-serving host reads and writes the whole prefix; an enforce-only host (`h2`) reads it and
/// writes only its own liveness and host record and the audit trail. What a
/// host's etcd user may not do is refused as such (the API's 403 `store_forbidden`), not as an
/// outage; wrong or missing credentials fail the start at once instead of waiting for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_authenticate_to_etcd_and_its_roles_confine_them() {
    let etcd = Etcd::start_local();
    let p = "/verse-test/";
    api_role_and_user(&etcd, p);
    enforce_only_role_then_auth(&etcd, p, "h2", &[""]);

    let ttl = Duration::from_secs(2);
    let as_user = |user: &str, pw: &str| as_etcd_user(&etcd, ttl, user, pw);
    let a = open(as_user("api-host", "api-pw")).await;
    a.register_host("h1", None).await.unwrap();
    let (blue, _) = a.edit(|s| s.create_universe(universe("blue"))).await.unwrap();
    let api_a = serve(a.clone(), "h1").await;

    // The enforce-only host reads the state, registers, keeps itself alive, audits.
    let b = open(as_user("h2", "h2-pw")).await;
    assert!(b.snapshot().universes.contains_key(&blue.id));
    b.register_host("h2", Some(Ipv4Addr::new(198, 18, 0, 2))).await.unwrap();
    b.report_realized("h2", a.snapshot().revision);
    wait_health(&a, "h2", true).await;
    b.append_audit(&audit_record("h2", 1, None)).await.unwrap();
    // It may not change the desired state, nor pose as another host: refused for what it is.
    let err = b.edit(|s| s.create_universe(universe("red"))).await.unwrap_err();
    assert!(matches!(err, verse::store::Error::Denied { .. }), "{err}");
    assert!(!err.is_unavailable());
    let err = b.register_host("h3", None).await.unwrap_err();
    assert!(matches!(err, verse::store::Error::Denied { .. }), "{err}");
    // Through its API: a 403 that says why, not a 503.
    let dir = tempfile::tempdir().unwrap();
    let api_b = serve_as(b.clone(), "h2", &api_a.token, dir).await;
    let refused = cli(&api_b, |c| c.create_universe(&universe("red")).unwrap_err()).await;
    match refused {
        verse::client::Error::Api { status, code, message } => {
            assert_eq!((status, code.as_str()), (403, "store_forbidden"));
            assert!(message.contains("etcd"), "{message}");
        }
        other => panic!("expected a 403, got {other}"),
    }
    // Reads through it work (and the refusal is in the trail, written with its own rights).
    let trail = cli(&api_b, |c| c.audit(None, None, None).unwrap()).await;
    assert!(trail.iter().any(|r| r.status == 403 && r.host == "h2"), "{trail:?}");
    let listed = cli(&api_b, |c| c.list_universes().unwrap()).await;
    assert_eq!(listed.len(), 1);

    // Wrong password, no user: the store fails to open at once, naming etcd's reason.
    let started = Instant::now();
    let err = Store::open_etcd(as_user("h2", "wrong")).await.err().expect("refused");
    assert!(err.to_string().contains("authentication failed"), "{err}");
    let err = Store::open_etcd(etcd.options(ttl)).await.err().expect("refused");
    assert!(err.to_string().contains("user name"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(10), "waited {:?}", started.elapsed());
    // Without credentials, etcdctl sees nothing either; as root it sees h2 alive.
    let keys = etcdctl_root(&etcd, &["get", "--prefix", "--keys-only", "/verse-test/alive/"]);
    assert!(keys.contains("/verse-test/alive/h2"), "{keys}");
}

/// The README's role of a host that serves no API (its store has a scope): `read` on `hosts/`,
/// `tokens/`, its own `placement/<name>/`, `u/`, `universes/` and `catalog` only, `readwrite` on its own
/// `alive/` and `hosts/` records and `audit/`. With it such a host opens its store, registers,
/// takes up a universe placed on it and reports it realized (judged by the API host); it
/// cannot read what it does not follow (another host's placements, the id claims).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_that_serves_no_api_works_with_its_narrow_etcd_role() {
    let etcd = Etcd::start_local();
    let p = "/verse-test/";
    api_role_and_user(&etcd, p);
    // Its host record is an edit, whose transaction reads the catalog when a guard fails.
    let reads = ["hosts/", "tokens/", "placement/h3/", "u/", "universes/", "catalog"];
    enforce_only_role_then_auth(&etcd, p, "h3", &reads);

    let ttl = Duration::from_secs(2);
    let as_user = |user: &str, pw: &str| as_etcd_user(&etcd, ttl, user, pw);
    let a = open(as_user("api-host", "api-pw")).await;
    a.register_host("h1", None).await.unwrap();
    let (blue, _) = a.edit(|s| s.create_universe(universe("blue"))).await.unwrap();
    let (web, _) = a.edit(|s| s.create_group(group(&blue.id, "web"))).await.unwrap();

    let h3 = open(EtcdOptions { scope: Some("h3".into()), ..as_user("h3", "h3-pw") }).await;
    h3.register_host("h3", Some(Ipv4Addr::new(198, 18, 0, 3))).await.unwrap();
    let reporter = h3.clone();
    let mut rx = h3.subscribe();
    tokio::spawn(async move {
        loop {
            let state = rx.borrow_and_update().clone();
            reporter.report("h3", Realized::of(&state));
            if rx.changed().await.is_err() {
                break;
            }
        }
    });
    wait_health(&a, "h3", true).await;
    h3.append_audit(&audit_record("h3", 1, None)).await.unwrap();
    let (_, placed) = a
        .edit(|s| s.create_endpoint(endpoint_on(&blue.id, "h3", "ns-1", "10.1.0.5", &web.id), "h1"))
        .await
        .unwrap();
    let mut srx = h3.subscribe();
    wait_state(&mut srx, "blue on h3", |st| st.revision >= placed).await;
    assert_eq!(universe_of(&h3.snapshot(), &blue.id), universe_of(&a.snapshot(), &blue.id));
    let hosts = a.subscribe_hosts().await.unwrap();
    let mut hosts = hosts;
    let judged = tokio::time::timeout(
        WAIT,
        hosts.wait_for(|h| h.iter().any(|h| h.name == "h3" && h.revision >= placed && h.healthy)),
    )
    .await;
    assert!(judged.is_ok(), "h3 realized the placement, as the API host judges it");
    // What it does not follow, its role does not let it read either.
    for key in ["ids/", "placement/h1/", "counters/"] {
        let out = std::process::Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", etcd.endpoint()))
            .args(["--user", "h3:h3-pw", "get", "--prefix", "--keys-only"])
            .arg(format!("{p}{key}"))
            .output()
            .expect("etcdctl runs");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains("permission denied"), "h3 read {key}: {err}");
    }
}

/// TLS to etcd (`etcd_ca_file`, `etcd_cert_file`, `etcd_key_file`): with etcd's CA and a client
/// certificate it signed, the store works as over plain gRPC, the settings read through the
/// daemon's configuration; with another CA, or without a client certificate, nothing is read
/// or written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_store_speaks_tls_to_etcd_with_a_client_certificate_and_refuses_a_wrong_ca() {
    let etcd = Etcd::start_local_tls();
    let certs = etcd.certs().expect("etcd serves TLS");
    let dir = etcd.dir(0).to_owned();

    // Through the daemon's settings, as versed opens it.
    let config_text = format!(
        "store = \"etcd://127.0.0.1:{}\"\netcd_prefix = \"/verse-test/\"\nhost = \"a\"\n\
         etcd_ca_file = {:?}\netcd_cert_file = {:?}\netcd_key_file = {:?}\n",
        etcd.endpoint().port(),
        certs.ca,
        certs.client.0,
        certs.client.1
    );
    let path = dir.join("versed.toml");
    std::fs::write(&path, config_text).unwrap();
    let config = verse::config::Config::load(&verse::config::Args {
        config: Some(path),
        ..Default::default()
    })
    .unwrap();
    let store = tokio::time::timeout(WAIT, Store::open(&config))
        .await
        .expect("the store opens over TLS in time")
        .expect("open the etcd store over TLS");
    let (u, rev) = store.edit(|s| s.create_universe(universe("blue"))).await.unwrap();
    // The revision is etcd's own (that of the edit's transaction).
    assert!(rev >= 1, "{rev}");
    // A second store, as another host, sees it: the data really went through etcd.
    let options = EtcdOptions {
        tls: Some(EtcdTls { ca_file: certs.ca.clone(), identity: Some(certs.client.clone()) }),
        ..etcd.options(Duration::from_secs(5))
    };
    let other = open(options.clone()).await;
    assert!(other.snapshot().universes.contains_key(&u.id));
    // etcd really serves TLS only: plain gRPC gets nothing.
    let plain = tokio::time::timeout(
        Duration::from_secs(3),
        Store::open_etcd(etcd.options(Duration::from_secs(5))),
    )
    .await;
    assert!(plain.is_err(), "plain gRPC to a TLS-only etcd must not read the state");

    // Another CA: etcd's certificate is not trusted; open keeps retrying, reads nothing.
    let wrong = EtcdCerts::make(&dir, "wrong");
    let bad_ca = EtcdOptions {
        tls: Some(EtcdTls { ca_file: wrong.ca.clone(), identity: Some(certs.client.clone()) }),
        ..options.clone()
    };
    let r = tokio::time::timeout(Duration::from_secs(3), Store::open_etcd(bad_ca)).await;
    assert!(r.is_err(), "a store trusting another CA must not reach etcd");
    // No client certificate, or one from another CA: etcd (--client-cert-auth) refuses.
    let anonymous = EtcdOptions {
        tls: Some(EtcdTls { ca_file: certs.ca.clone(), identity: None }),
        ..options.clone()
    };
    let r = tokio::time::timeout(Duration::from_secs(3), Store::open_etcd(anonymous)).await;
    assert!(r.is_err(), "a store without a client certificate must not reach etcd");
    let foreign = EtcdOptions {
        tls: Some(EtcdTls { ca_file: certs.ca.clone(), identity: Some(wrong.client.clone()) }),
        ..options
    };
    let r = tokio::time::timeout(Duration::from_secs(3), Store::open_etcd(foreign)).await;
    assert!(r.is_err(), "a client certificate from another CA must be refused");
    assert_eq!(store.snapshot().revision, rev, "nothing else was written");
}

/// A universe with more groups than one etcd transaction may hold operations (128) is deleted
/// through the API in one edit all the same: everything of a universe lives under one prefix,
/// deleted by one range delete, so its size does not matter; nothing of it is left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_a_universe_too_big_for_one_transaction_of_keys_takes_one_range_delete() {
    let etcd = Etcd::start_local();
    let store = etcd.store(Duration::from_secs(5)).await;
    store.register_host("h1", None).await.unwrap();
    let url = serve(store.clone(), "h1").await;
    let (u, _) = store.edit(|s| s.create_universe(universe("big"))).await.unwrap();
    for i in 0..130 {
        let req =
            model::CreateGroup { universe: u.id.clone(), name: format!("g{i}"), description: None };
        store.edit(move |s| s.create_group(req.clone())).await.unwrap();
    }
    assert_eq!(store.snapshot().groups.len(), 131);

    let id = u.id.clone();
    cli(&url, move |c| c.delete_universe(&id)).await.expect("a universe of any size goes");
    let after = store.snapshot();
    assert!(after.universes.is_empty() && after.groups.is_empty(), "everything went at once");
    let left =
        etcd.etcdctl(&["get", "--prefix", "--keys-only", &format!("/verse-test/u/{}/", u.id)]);
    assert!(left.trim().is_empty(), "nothing of it is left in etcd: {left}");
}

fn group(universe: &str, name: &str) -> model::CreateGroup {
    model::CreateGroup { universe: universe.into(), name: name.into(), description: None }
}

/// Adds rules for TCP ports 1 to `n` to `group` through `store`, one edit each, in a task.
fn add_rules(store: Store, group: String, n: u16) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        for port in 1..=n {
            let g = group.clone();
            store.edit(move |s| s.add_rule(&g, tcp_rule(port))).await.unwrap();
        }
    })
}

fn tcp_rule(port: u16) -> model::CreateRule {
    model::CreateRule {
        direction: "ingress".into(),
        protocol: serde_json::json!("tcp"),
        from_port: Some(port.into()),
        to_port: Some(port.into()),
        cidr: Some("10.0.0.0/8".into()),
        ..Default::default()
    }
}

/// Two hosts editing two universes at once never get in each other's way (no commit is
/// refused), and two hosts editing one group at once serialize: every rule of both is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edits_of_different_universes_never_conflict_and_edits_of_one_are_all_kept() {
    let etcd = Etcd::start_local();
    let a = etcd.store(Duration::from_secs(5)).await;
    let b = etcd.store(Duration::from_secs(5)).await;
    let (blue, _) = a.edit(|s| s.create_universe(universe("blue"))).await.unwrap();
    let (red, _) = b.edit(|s| s.create_universe(universe("red"))).await.unwrap();
    let (gb, _) = a.edit(|s| s.create_group(group(&blue.id, "web"))).await.unwrap();
    let (gr, rev) = b.edit(|s| s.create_group(group(&red.id, "web"))).await.unwrap();
    let mut rx = a.subscribe();
    wait_state(&mut rx, "both groups on a", |s| s.revision >= rev).await;
    let before = (a.conflicts(), b.conflicts());
    const N: u16 = 40;
    let (ta, tb) = (add_rules(a.clone(), gb.id.clone(), N), add_rules(b.clone(), gr.id.clone(), N));
    ta.await.unwrap();
    tb.await.unwrap();
    assert_eq!(
        (a.conflicts(), b.conflicts()),
        before,
        "edits of different universes never refuse each other"
    );

    // Both hosts add rules to one group at once: they collide, and nothing is lost.
    let (ta, tb) = (
        tokio::spawn({
            let (a, g) = (a.clone(), gb.id.clone());
            async move {
                for port in 1001..=1000 + N {
                    let g = g.clone();
                    a.edit(move |s| s.add_rule(&g, tcp_rule(port))).await.unwrap();
                }
            }
        }),
        tokio::spawn({
            let (b, g) = (b.clone(), gb.id.clone());
            async move {
                for port in 2001..=2000 + N {
                    let g = g.clone();
                    b.edit(move |s| s.add_rule(&g, tcp_rule(port))).await.unwrap();
                }
            }
        }),
    );
    ta.await.unwrap();
    tb.await.unwrap();
    let rev = b.snapshot().revision.max(a.snapshot().revision);
    for store in [&a, &b] {
        let mut rx = store.subscribe();
        wait_state(&mut rx, "every rule", |s| s.revision >= rev).await;
        let g = &store.snapshot().groups[&gb.id];
        assert_eq!(g.ingress.len(), 3 * usize::from(N), "every rule of both hosts is kept");
    }
    assert_eq!(*a.snapshot(), *b.snapshot());
    eprintln!(
        "conflicts on one group: a {} b {}",
        a.conflicts() - before.0,
        b.conflicts() - before.1
    );
}

/// A universe of 500 groups and 5,000 rules goes in one edit (one range delete, however many
/// keys), leaving nothing of it in etcd.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_universe_of_500_groups_and_5000_rules_is_deleted_whole() {
    let etcd = Etcd::start_local();
    let a = etcd.store(Duration::from_secs(5)).await;
    let b = etcd.store(Duration::from_secs(5)).await;
    let (u, _) = a.edit(|s| s.create_universe(universe("big"))).await.unwrap();
    // Groups ten at a time, rules a hundred at a time (each edit within etcd's 128 operations).
    let mut groups = Vec::new();
    for batch in 0..50 {
        let id = u.id.clone();
        let (made, _) = a
            .edit(move |s| {
                (0..10)
                    .map(|i| s.create_group(group(&id, &format!("g{batch}-{i}"))).map(|g| g.id))
                    .collect::<model::Result<Vec<String>>>()
            })
            .await
            .unwrap();
        groups.extend(made);
    }
    for (n, chunk) in groups.chunks(10).enumerate() {
        let chunk = chunk.to_vec();
        a.edit(move |s| {
            for (i, g) in chunk.iter().enumerate() {
                for port in 0..10u16 {
                    s.add_rule(g, tcp_rule(1 + port + 10 * u16::try_from(i + 10 * n).unwrap()))?;
                }
            }
            Ok(())
        })
        .await
        .unwrap();
    }
    let snap = a.snapshot();
    let rules: usize = snap.groups.values().map(|g| g.ingress.len() + g.egress.len()).sum();
    assert_eq!(snap.groups.len(), 501);
    assert!(rules >= 5000, "{rules} rules");
    let keys = |prefix: &str| -> usize {
        etcd.etcdctl(&["get", "--prefix", "--keys-only", prefix])
            .lines()
            .filter(|l| !l.trim().is_empty())
            .count()
    };
    let before = keys(&format!("/verse-test/u/{}/", u.id));
    assert!(before > 6000, "{before} keys");

    let id = u.id.clone();
    let ((), rev) = a.edit(move |s| s.delete_universe(&id)).await.unwrap();
    let mut rx = b.subscribe();
    wait_state(&mut rx, "the deletion on b", |s| s.revision >= rev).await;
    assert!(b.snapshot().universes.is_empty() && b.snapshot().groups.is_empty());
    assert_eq!(keys(&format!("/verse-test/u/{}/", u.id)), 0, "nothing of it is left in etcd");
    assert_eq!(keys("/verse-test/ids/"), 0, "its groups' id claims are gone too");
}

/// With an idempotency key, an edit sent twice (from two hosts) is applied once and answered
/// twice the same; the same key with another request is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_edit_with_the_same_key_is_applied_once() {
    use verse::store::{Idempotency, Outcome};
    let etcd = Etcd::start_local();
    let a = etcd.store(Duration::from_secs(5)).await;
    let b = etcd.store(Duration::from_secs(5)).await;
    let idem = Idempotency {
        key: "retry-1".into(),
        fingerprint: "POST /v1/universes x".into(),
        from_client: true,
    };
    let respond = |u: &model::Universe| (201, Some(serde_json::json!({"id": u.id})));
    let first =
        a.edit_recorded(&idem, |s| s.create_universe(universe("blue")), respond).await.unwrap();
    let Outcome::Applied { out, revision } = first else { panic!("the first is applied") };
    let again =
        b.edit_recorded(&idem, |s| s.create_universe(universe("blue")), respond).await.unwrap();
    let Outcome::Replayed(rec) = again else { panic!("the retry is answered, not applied") };
    assert_eq!(
        (rec.status, rec.revision, rec.body),
        (201, revision, Some(serde_json::json!({"id": out.id})))
    );
    let mut rx = b.subscribe();
    wait_state(&mut rx, "the universe on b", |s| s.revision >= revision).await;
    assert_eq!(b.snapshot().universes.len(), 1);
    let other = Idempotency { fingerprint: "POST /v1/universes y".into(), ..idem.clone() };
    let err =
        b.edit_recorded(&other, |s| s.create_universe(universe("red")), respond).await.unwrap_err();
    assert!(err.to_string().contains("another request"), "{err}");

    // A retry of an edit that can no longer run (what it deleted is gone) is answered what the
    // first attempt was: the key is read when the edit cannot run, not before every edit.
    let del = Idempotency {
        key: "retry-2".into(),
        fingerprint: format!("DELETE /v1/universes/{}", out.id),
        from_client: true,
    };
    let gone = |_: &()| (204, None);
    let id = out.id.clone();
    let first = a.edit_recorded(&del, |s| s.delete_universe(&id), gone).await.unwrap();
    let Outcome::Applied { revision: deleted, .. } = first else { panic!("the delete is applied") };
    wait_state(&mut rx, "the deletion on b", |s| s.revision >= deleted).await;
    assert!(b.snapshot().universes.is_empty());
    let again = b.edit_recorded(&del, |s| s.delete_universe(&id), gone).await.unwrap();
    let Outcome::Replayed(rec) = again else {
        panic!("the retried delete is answered, not refused")
    };
    assert_eq!((rec.status, rec.revision), (204, deleted));
}

/// A commit etcd refuses reads the idempotency record in its own transaction: a retry of an
/// edit that happened (refused because its key is recorded) is answered from that read, and an
/// edit refused by a guard (the other host's edit of the same universe got in first) knows it
/// is no replay, both with no read of the key apart (before, each was one more round trip).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_commit_reads_its_key_in_its_own_transaction() {
    use verse::store::{Idempotency, Outcome};
    let etcd = Etcd::start_local();
    let a = etcd.store(Duration::from_secs(5)).await;
    let b = etcd.store(Duration::from_secs(5)).await;
    let (u, _) = a.edit(|s| s.create_universe(universe("blue"))).await.unwrap();
    let (g, rev) = a.edit(|s| s.create_group(group(&u.id, "web"))).await.unwrap();
    let mut rx = b.subscribe();
    wait_state(&mut rx, "the group on b", |s| s.revision >= rev).await;
    let respond = |r: &model::Rule| (201, Some(serde_json::json!({"id": r.id})));
    let key = |k: String| Idempotency {
        fingerprint: format!("POST rules {k}"),
        key: k,
        from_client: true,
    };

    // A retry that still runs on the host's state, as one through a host whose watch has not
    // seen the first attempt yet does (here it adds another port, so that the rule added by
    // the first attempt does not refuse it): etcd refuses its commit on the key's record.
    let (reads, conflicts) = (a.idempotency_reads(), a.conflicts());
    let add = |port: u16| {
        let g = g.id.clone();
        move |s: &mut State| s.add_rule(&g, tcp_rule(port))
    };
    let first = a.edit_recorded(&key("r-1".into()), add(80), respond).await.unwrap();
    let Outcome::Applied { out, revision } = first else { panic!("the first is applied") };
    let again = a.edit_recorded(&key("r-1".into()), add(81), respond).await.unwrap();
    let Outcome::Replayed(rec) = again else { panic!("the retry is answered, not applied") };
    assert_eq!(
        (rec.status, rec.revision, rec.body),
        (201, revision, Some(serde_json::json!({"id": out.id})))
    );
    assert_eq!(a.snapshot().groups[&g.id].ingress.len(), 1, "applied once");
    assert_eq!(
        (a.idempotency_reads(), a.conflicts()),
        (reads, conflicts),
        "the replay was read by the refused commit itself"
    );

    // Two hosts adding rules to one group at once, each edit with a key of its own, until
    // guards refused some commits: none of them read its key apart.
    let reads = (a.idempotency_reads(), b.idempotency_reads());
    let conflicts = || a.conflicts() + b.conflicts();
    let before = conflicts();
    let mut port = 1000u16;
    for _ in 0..20 {
        let run = |store: Store, tag: &'static str, from: u16| {
            let g = g.id.clone();
            tokio::spawn(async move {
                for p in from..from + 20 {
                    let g = g.clone();
                    let k = Idempotency {
                        key: format!("{tag}-{p}"),
                        fingerprint: format!("POST rules {tag}-{p}"),
                        from_client: true,
                    };
                    let done = store
                        .edit_recorded(&k, move |s| s.add_rule(&g, tcp_rule(p)), respond)
                        .await
                        .unwrap();
                    assert!(matches!(done, Outcome::Applied { .. }), "each edit is applied");
                }
            })
        };
        let (ta, tb) = (run(a.clone(), "a", port), run(b.clone(), "b", port + 20));
        ta.await.unwrap();
        tb.await.unwrap();
        port += 40;
        if conflicts() > before {
            break;
        }
    }
    assert!(conflicts() > before, "the two hosts' edits collided");
    assert_eq!(
        (a.idempotency_reads(), b.idempotency_reads()),
        reads,
        "no refused commit read its key apart"
    );
    let rev = a.snapshot().revision.max(b.snapshot().revision);
    wait_state(&mut rx, "every rule on b", |s| s.revision >= rev).await;
    let kept = b.snapshot().groups[&g.id].ingress.len();
    assert_eq!(kept, 1 + usize::from(port - 1000), "every edit of both hosts is kept, once");
}

/// Many edits of one universe at once through one host each run about twice at most (once
/// before their turn, once more if the state changed while they waited), and none runs out of
/// attempts: an edit keeps its turn when it runs again. Before, one that found the state
/// changed after waiting gave its turn back and queued again behind the host's later edits,
/// where it found the state changed again: the runs grew with the square of the queue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edits_waiting_for_their_turn_keep_it_when_they_run_again() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let etcd = Etcd::start_local();
    let a = etcd.store(Duration::from_secs(5)).await;
    let (u, _) = a.edit(|s| s.create_universe(universe("blue"))).await.unwrap();
    let (g, _) = a.edit(|s| s.create_group(group(&u.id, "web"))).await.unwrap();
    const N: u16 = 30;
    let runs = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..N)
        .map(|i| {
            let (a, g, runs) = (a.clone(), g.id.clone(), runs.clone());
            tokio::spawn(async move {
                a.edit(move |s| {
                    runs.fetch_add(1, Ordering::SeqCst);
                    s.add_rule(&g, tcp_rule(100 + i))
                })
                .await
                .map(|_| ())
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().expect("every edit is applied");
    }
    assert_eq!(a.snapshot().groups[&g.id].ingress.len(), usize::from(N));
    let runs = runs.load(Ordering::SeqCst);
    assert!(runs <= 2 * usize::from(N) + 2, "{runs} runs for {N} edits");
    assert_eq!(a.conflicts(), 0, "edits of one host never refuse each other");
}

/// A host's edits that wait to commit while others are in flight go to etcd together, one
/// transaction (one revision, one Raft entry) for several: each is applied once with what it
/// wrote, one refused commit (the same key sent twice at once) refuses no other and is answered
/// from the first's record, and the edits of the other host are kept too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edits_waiting_to_commit_share_one_transaction_and_each_is_answered_alone() {
    use verse::store::{Idempotency, Outcome};
    let etcd = Etcd::start_local();
    let a = etcd.store(Duration::from_secs(5)).await;
    let b = etcd.store(Duration::from_secs(5)).await;
    const N: usize = 24;
    let mut groups = Vec::new();
    for u in 0..N {
        let (uni, _) =
            a.edit(move |s| s.create_universe(universe(&format!("u{u}")))).await.unwrap();
        let (g, _) = a.edit(move |s| s.create_group(group(&uni.id, "web"))).await.unwrap();
        groups.push(g.id);
    }
    let rev = a.snapshot().revision;
    let mut rx = b.subscribe();
    wait_state(&mut rx, "the groups on b", |s| s.revision >= rev).await;
    let respond = |r: &model::Rule| (201, Some(serde_json::json!({"id": r.id})));
    let edit = |store: &Store, g: &str, key: String, port: u16| {
        let (store, g) = (store.clone(), g.to_owned());
        tokio::spawn(async move {
            let idem =
                Idempotency { fingerprint: format!("POST {g} {key}"), key, from_client: true };
            store.edit_recorded(&idem, move |s| s.add_rule(&g, tcp_rule(port)), respond).await
        })
    };
    // One edit of every universe through a, the first universe's edit twice with one key,
    // and edits of the same universes through b at once.
    let mut mine: Vec<_> =
        groups.iter().enumerate().map(|(i, g)| edit(&a, g, format!("a-{i}"), 80)).collect();
    mine.push(edit(&a, &groups[0], "a-0".into(), 80));
    let theirs: Vec<_> =
        groups.iter().enumerate().map(|(i, g)| edit(&b, g, format!("b-{i}"), 81)).collect();
    let (mut revisions, mut replayed) = (std::collections::BTreeSet::new(), 0);
    for t in mine {
        match t.await.unwrap().unwrap() {
            Outcome::Applied { revision, .. } => {
                revisions.insert(revision);
            }
            Outcome::Replayed(rec) => {
                replayed += 1;
                assert_eq!(rec.status, 201);
            }
        }
    }
    for t in theirs {
        assert!(matches!(t.await.unwrap().unwrap(), Outcome::Applied { .. }));
    }
    assert_eq!(replayed, 1, "the key sent twice is applied once");
    assert!(revisions.len() < N, "{N} edits committed in {} transactions", revisions.len());
    let rev = a.snapshot().revision.max(b.snapshot().revision);
    for store in [&a, &b] {
        let mut rx = store.subscribe();
        wait_state(&mut rx, "every rule", |s| s.revision >= rev).await;
        for g in &groups {
            let rules = &store.snapshot().groups[g].ingress;
            let ports: Vec<_> = rules.iter().map(|r| r.ports).collect();
            assert_eq!(rules.len(), 2, "one rule of each host in {g}: {ports:?}");
        }
    }
}

/// A test's audit record of an edit, counting the times the store wrote it.
#[derive(Default)]
struct Counted(std::sync::atomic::AtomicU32);

impl<T> verse::store::CommitAudit<T> for Counted {
    fn record(&self, _: &T, status: u16) -> Option<verse::audit::AuditRecord> {
        Some(verse::audit::AuditRecord { status, revision: None, ..audit_record("h1", 0, None) })
    }
    fn written(&self) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// An edit's audit record is written in the edit's own transaction (one etcd revision for
/// both), read back with the edit's revision; an edit refused, or answered from its key's
/// record, writes none.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edits_audit_record_is_in_its_own_transaction_and_only_if_it_happened() {
    use verse::audit::Query;
    use verse::store::{Idempotency, Outcome};
    let etcd = Etcd::start_local();
    let a = etcd.store(Duration::from_secs(5)).await;
    let b = etcd.store(Duration::from_secs(5)).await;
    let key = |k: &str| Idempotency {
        key: k.into(),
        fingerprint: format!("POST /v1/universes {k}"),
        from_client: true,
    };
    let respond = |u: &model::Universe| (201, Some(serde_json::json!({"id": u.id})));
    let audit = Counted::default();
    let revision_of_etcd = || u64::try_from(etcd.revision()).expect("etcd's revision is positive");
    let create = |name: &'static str| move |s: &mut State| s.create_universe(universe(name));
    let first = a.edit_audited(&key("k1"), create("blue"), respond, &audit).await.unwrap();
    let Outcome::Applied { revision, .. } = first else { panic!("applied") };
    assert_eq!(audit.0.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(revision_of_etcd(), revision, "the edit and its record: one transaction");
    // Refused (the name is taken), and replayed (the same key, through the other store).
    let refused = a.edit_audited(&key("k2"), create("blue"), respond, &audit).await;
    assert!(refused.is_err());
    let again = b.edit_audited(&key("k1"), create("blue"), respond, &audit).await.unwrap();
    assert!(matches!(again, Outcome::Replayed(_)));
    assert_eq!(audit.0.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert_eq!(revision_of_etcd(), revision, "nothing written since");
    let all = Query { since: None, universe: None, limit: 100 };
    for store in [&a, &b] {
        let trail = store.query_audit(&all).await.unwrap();
        let got: Vec<_> = trail.iter().map(|r| (r.status, r.revision)).collect();
        assert_eq!(got, [(201, Some(revision))]);
    }
    // A record written apart keeps the revision it carries.
    a.append_audit(&audit_record("h1", 7, None)).await.unwrap();
    let trail = b.query_audit(&all).await.unwrap();
    assert_eq!(trail.iter().map(|r| r.revision).collect::<Vec<_>>(), [Some(revision), Some(7)]);
}

/// An edit whose commit never reaches etcd (its store is cut off) fails only once it is
/// fenced off: the client told "failed" can count on it not having happened, then or later,
/// and a retry with the same key applies it once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_edit_told_failed_did_not_happen() {
    use verse::store::{Idempotency, Outcome};
    let etcd = Etcd::start_local();
    let proxy = Proxy::start(etcd.endpoint().port()).await;
    let a = etcd.store(Duration::from_secs(5)).await;
    let mut options = etcd.options(Duration::from_secs(5));
    options.endpoints = vec![format!("127.0.0.1:{}", proxy.port)];
    let b = open(options).await;
    let idem = Idempotency {
        key: "cut-1".into(),
        fingerprint: "POST /v1/universes z".into(),
        from_client: true,
    };
    let respond = |u: &model::Universe| (201, Some(serde_json::json!({"id": u.id})));
    proxy.cut();
    let heal = tokio::spawn(async move {
        // Back while the edit is settling its outcome.
        tokio::time::sleep(Duration::from_secs(7)).await;
        proxy.heal();
        proxy
    });
    let err =
        b.edit_recorded(&idem, |s| s.create_universe(universe("cut")), respond).await.unwrap_err();
    eprintln!("told: {err}");
    let _proxy = heal.await.unwrap();
    assert!(a.snapshot().universes.is_empty(), "the failed edit did not happen");
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(a.snapshot().universes.is_empty(), "and never will");
    let retry =
        b.edit_recorded(&idem, |s| s.create_universe(universe("cut")), respond).await.unwrap();
    assert!(matches!(retry, Outcome::Applied { .. }), "the retry with the same key applies it");
    let again =
        b.edit_recorded(&idem, |s| s.create_universe(universe("cut")), respond).await.unwrap();
    assert!(matches!(again, Outcome::Replayed(_)), "once");
}

/// A store counts what its watch received: one response and one event per key put under its
/// prefix, and at least the keys' and values' bytes (plus the fixed fields etcd adds).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_stats_count_every_response_event_and_byte_received() {
    let etcd = Etcd::start_local();
    let options = etcd.options(Duration::from_secs(5));
    let store = etcd.store(Duration::from_secs(5)).await;
    // The first read is no watch event; etcd confirms the watched range (the desired state,
    // past the audit trail up to the idempotency records) with a response of its own.
    let deadline = Instant::now() + WAIT;
    while store.watch_stats().responses < 1 {
        let got = store.watch_stats();
        assert!(Instant::now() < deadline, "the watches were never created: {got:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = store.watch_stats();
    assert_eq!((before.responses, before.events), (1, 0), "{before:?}");
    let client = verse::store::etcd::connect(&options).await.unwrap();
    let mut kv = client.kv_client();
    let mut payload = 0u64;
    for n in 0..3 {
        let (key, value) = (format!("{}noise/{n}", options.prefix), "x".repeat(100 * (n + 1)));
        payload += (key.len() + value.len()) as u64;
        kv.put(key, value, None).await.unwrap();
    }
    // Keys outside the prefix are not watched.
    kv.put("/elsewhere/key", "y", None).await.unwrap();
    let deadline = Instant::now() + WAIT;
    while store.watch_stats().events < 3 {
        assert!(Instant::now() < deadline, "the watch got {:?}", store.watch_stats());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let now = store.watch_stats();
    let got = WatchStats {
        responses: now.responses - before.responses,
        events: now.events - before.events,
        bytes: now.bytes - before.bytes,
    };
    // etcd may send the events of revisions that follow each other closely in one response.
    assert_eq!(got.events, 3, "{got:?}");
    assert!((1..=3).contains(&got.responses), "{got:?}");
    // Per event its framing and three revisions (at least 10 bytes beyond key and value); per
    // response gRPC's 5-byte prefix and a header (ids, revision, term: about 30 bytes): at most
    // 80 bytes an event beyond key and value.
    assert!(
        got.bytes >= payload + 3 * 10 && got.bytes <= payload + 3 * 80,
        "{got:?}, payload {payload}"
    );
}

/// Every host rewrites its liveness record with each revision it realizes. A store that has not
/// asked for the hosts receives none of those writes (in its desired state's watch they would
/// make one edit N² events in a fleet of N hosts); asked, it reads them and follows them,
/// lapses included.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_asks_for_no_hosts_receives_no_other_hosts_reports() {
    let etcd = Etcd::start_local();
    let ttl = Duration::from_secs(2);
    let quiet = etcd.store(ttl).await;
    let watcher = etcd.store(ttl).await;
    let reporter = etcd.store(ttl).await;
    let ip = Ipv4Addr::new(198, 18, 0, 1);
    reporter.register_host("h1", Some(ip)).await.unwrap();
    // The peer itself (its underlay address) comes with the desired state.
    let mut rx = quiet.subscribe();
    wait_state(&mut rx, "h1 registered", |s| s.hosts.contains_key("h1")).await;
    wait_health(&watcher, "h1", true).await;
    let before = quiet.watch_stats();
    for revision in 1..=20 {
        reporter.report_realized("h1", revision);
        // Each report is written (the watcher sees it) before the next one replaces it.
        wait_healthy_at(&watcher, "h1", revision).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after = quiet.watch_stats();
    assert_eq!(
        (after.responses, after.events),
        (before.responses, before.events),
        "20 reports of another host reached a store that never asked for the hosts"
    );
    // Asked, it reads the records and follows them: it sees the last report, then the lapse.
    let hosts = quiet.hosts().await.unwrap();
    assert!(hosts.iter().any(|h| h.name == "h1" && h.healthy && h.revision == 20), "{hosts:?}");
    drop(reporter);
    let hosts = wait_health(&quiet, "h1", false).await;
    let h1 = hosts.iter().find(|h| h.name == "h1").unwrap();
    assert_eq!(
        (h1.revision, h1.underlay_ip),
        (20, Some(ip)),
        "a lapsed host keeps its last report"
    );
}

/// A store that has not read the hosts' liveness records, and cannot read them now (etcd does
/// not answer), fails: it never answers with what it has not read. Before it read them every
/// other host would be "unhealthy at revision 0", and an edit's acknowledgement stops waiting
/// for hosts shown unhealthy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hosts_not_read_yet_are_an_error_never_unhealthy() {
    let etcd = Etcd::start_local();
    let ttl = Duration::from_secs(5);
    let quiet = etcd.store(ttl).await;
    let reporter = etcd.store(ttl).await;
    reporter.register_host("h1", Some(Ipv4Addr::new(198, 18, 0, 1))).await.unwrap();
    reporter.report_realized("h1", 7);
    wait_healthy_at(&reporter, "h1", 7).await;
    let mut rx = quiet.subscribe();
    wait_state(&mut rx, "h1 registered", |s| s.hosts.contains_key("h1")).await;
    let answered = {
        let _paused = etcd.pause(0);
        quiet.hosts().await
    };
    match answered {
        Err(e) => assert!(e.is_unavailable(), "{e}"),
        Ok(hosts) => panic!("answered hosts it could not read: {hosts:?}"),
    }
    // etcd answers again: the records are read, h1 is healthy at its report.
    wait_healthy_at(&quiet, "h1", 7).await;
}

/// Once a store stops following the liveness records (nobody asked for a while), what it last
/// read is not answered again: a host that lapsed since must not be shown healthy. If the
/// records cannot be read at the next ask, the answer is an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_linger_nothing_stale_is_answered() {
    let etcd = Etcd::start_local();
    let ttl = Duration::from_secs(2);
    let linger = Duration::from_secs(1);
    let quiet = open(EtcdOptions { liveness_linger: linger, ..etcd.options(ttl) }).await;
    let reporter = etcd.store(ttl).await;
    reporter.register_host("h1", Some(Ipv4Addr::new(198, 18, 0, 1))).await.unwrap();
    reporter.report_realized("h1", 7);
    wait_healthy_at(&quiet, "h1", 7).await;
    // Nobody asks past the linger; meanwhile h1's lease lapses.
    drop(reporter);
    tokio::time::sleep(linger + ttl * 3).await;
    let answered = {
        let _paused = etcd.pause(0);
        quiet.hosts().await
    };
    match answered {
        Err(e) => assert!(e.is_unavailable(), "{e}"),
        Ok(hosts) => panic!("answered what it read before the linger: {hosts:?}"),
    }
    let hosts = quiet.hosts().await.unwrap();
    assert!(hosts.iter().any(|h| h.name == "h1" && !h.healthy), "{hosts:?}");
}

/// An endpoint of `universe` on `host` in namespace `netns`, in group `group`.
fn endpoint_on(
    universe: &str,
    host: &str,
    netns: &str,
    ip: &str,
    group: &str,
) -> model::CreateEndpoint {
    model::CreateEndpoint {
        universe: universe.into(),
        host: Some(host.into()),
        netns: netns.into(),
        ip: ip.into(),
        security_groups: Some(vec![group.into()]),
        ..Default::default()
    }
}

/// The objects of universe `uni` in `s` (its record, groups with their rules, endpoints,
/// identities), to compare two stores' copies of it.
fn universe_of(s: &State, uni: &str) -> String {
    let groups: Vec<_> = s.groups.values().filter(|g| g.universe == uni).collect();
    let endpoints: Vec<_> = s.endpoints.values().filter(|e| e.universe == uni).collect();
    let identities: Vec<_> = s.identities.iter().filter(|(_, i)| i.universe == uni).collect();
    format!("{:?} {groups:?} {endpoints:?} {identities:?}", s.universes.get(uni))
}

/// A host whose store has a scope (`EtcdOptions::scope`: a host that answers no API, as the
/// simulated hosts are) receives nothing of an edit of a universe with no endpoint on it and
/// holds nothing of it; an endpoint placed on it brings the whole universe (as the full store
/// holds it), later edits of it follow, and removing the endpoint drops it. The store that
/// follows everything judges the host's realized revision (S13, what the API waits for): an
/// edit of a universe the host does not hold is realized there at once; a placement on it only
/// once the host has reported the universe loaded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_with_a_scope_follows_only_the_universes_placed_on_it() {
    let etcd = Etcd::start_local();
    let ttl = Duration::from_secs(5);
    let a = etcd.store(ttl).await;
    a.register_host("h1", None).await.unwrap();
    let (blue, _) = a.edit(|s| s.create_universe(universe("blue"))).await.unwrap();
    let (red, _) = a.edit(|s| s.create_universe(universe("red"))).await.unwrap();
    let (web, _) = a.edit(|s| s.create_group(group(&blue.id, "web"))).await.unwrap();
    let (red_web, _) = a.edit(|s| s.create_group(group(&red.id, "web"))).await.unwrap();
    let g = web.id.clone();
    a.edit(move |s| s.add_rule(&g, tcp_rule(80))).await.unwrap();

    let s = open(EtcdOptions { scope: Some("h9".into()), ..etcd.options(ttl) }).await;
    s.register_host("h9", Some(Ipv4Addr::new(198, 18, 0, 9))).await.unwrap();
    // h9 reports each state it holds as realized, while `gate` is open (a reconciler's report).
    let (gate, gated) = watch::channel(true);
    let reporter = s.clone();
    let mut rx = s.subscribe();
    tokio::spawn(async move {
        let mut gated = gated;
        loop {
            let state = rx.borrow_and_update().clone();
            if gated.wait_for(|open| *open).await.is_err() {
                break;
            }
            reporter.report("h9", Realized::of(&state));
            if rx.changed().await.is_err() {
                break;
            }
        }
    });
    let mut srx = s.subscribe();
    wait_state(&mut srx, "h9 registered", |st| st.hosts.contains_key("h9")).await;
    assert!(s.snapshot().universes.is_empty(), "no endpoint on h9: no universe");
    let hosts = a.subscribe_hosts().await.unwrap();
    let h9_at = |rev: u64| {
        let hosts = hosts.clone();
        async move {
            let mut hosts = hosts;
            tokio::time::timeout(
                WAIT,
                hosts.wait_for(|h| h.iter().any(|h| h.name == "h9" && h.revision >= rev)),
            )
            .await
            .map(|_| ())
        }
    };

    // An edit of blue: nothing reaches h9 (the next edit it receives is the host record that
    // follows), and it is realized there at once.
    let before = s.watch_stats();
    let g = web.id.clone();
    let (_, rev) = a.edit(move |s| s.add_rule(&g, tcp_rule(81))).await.unwrap();
    assert!(h9_at(rev).await.is_ok(), "an edit of a universe h9 does not hold waits for h9");
    a.register_host("h2", Some(Ipv4Addr::new(198, 18, 0, 2))).await.unwrap();
    wait_state(&mut srx, "h2 on h9", |st| st.hosts.contains_key("h2")).await;
    let after = s.watch_stats();
    assert_eq!(
        after.events - before.events,
        1,
        "h9 received only h2's record: {before:?} {after:?}"
    );
    assert!(s.snapshot().groups.is_empty() && s.snapshot().universes.is_empty());

    // An endpoint of blue placed on h9: h9 holds blue whole, as the store that follows
    // everything does, and red not at all. Until h9 reports it, the placement is not realized
    // there.
    gate.send_replace(false);
    let (ep, placed) = a
        .edit(|s| s.create_endpoint(endpoint_on(&blue.id, "h9", "ns-1", "10.1.0.5", &web.id), "h1"))
        .await
        .unwrap();
    wait_state(&mut srx, "blue on h9", |st| st.revision >= placed).await;
    assert_eq!(universe_of(&s.snapshot(), &blue.id), universe_of(&a.snapshot(), &blue.id));
    assert!(!s.snapshot().universes.contains_key(&red.id));
    assert!(s.snapshot().groups.get(&red_web.id).is_none());
    tokio::time::sleep(Duration::from_millis(500)).await;
    let h9 = a.hosts().await.unwrap().into_iter().find(|h| h.name == "h9").unwrap();
    assert!(h9.revision < placed, "h9 has not reported the placement yet: {h9:?}");
    gate.send_replace(true);
    assert!(h9_at(placed).await.is_ok(), "h9 reported blue loaded");

    // Later edits of blue reach h9, and h9 realizes them only by reporting them.
    gate.send_replace(false);
    let g = web.id.clone();
    let (_, rev) = a.edit(move |s| s.add_rule(&g, tcp_rule(82))).await.unwrap();
    wait_state(&mut srx, "the rule on h9", |st| st.revision >= rev).await;
    assert_eq!(universe_of(&s.snapshot(), &blue.id), universe_of(&a.snapshot(), &blue.id));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let h9 = a.hosts().await.unwrap().into_iter().find(|h| h.name == "h9").unwrap();
    assert!(h9.revision < rev, "h9 holds blue: the edit waits for its report: {h9:?}");
    gate.send_replace(true);
    assert!(h9_at(rev).await.is_ok());
    // An edit of red still sends h9 nothing and is realized there at once.
    let before = s.watch_stats();
    let g = red_web.id.clone();
    let (_, rev) = a.edit(move |s| s.add_rule(&g, tcp_rule(83))).await.unwrap();
    assert!(h9_at(rev).await.is_ok());
    a.register_host("h3", None).await.unwrap();
    wait_state(&mut srx, "h3 on h9", |st| st.hosts.contains_key("h3")).await;
    assert_eq!(s.watch_stats().events - before.events, 1, "only h3's record");

    // The endpoint goes: h9 drops blue whole, and receives nothing of it after.
    let id = ep.id.clone();
    let (_, gone) = a.edit(move |s| s.delete_endpoint(&id)).await.unwrap();
    // Each range has its own watcher: the endpoint's deletion (blue's range) can arrive before
    // its placement's (which lets blue go), and the state's revision is the newest of the
    // ranges', so the revision alone does not say that blue is gone: wait for both.
    wait_state(&mut srx, "blue gone from h9", |st| st.revision >= gone && st.universes.is_empty())
        .await;
    let snap = s.snapshot();
    assert!(snap.universes.is_empty() && snap.groups.is_empty() && snap.endpoints.is_empty());
    assert!(snap.identities.is_empty(), "{:?}", snap.identities);
    assert!(h9_at(gone).await.is_ok());
    let before = s.watch_stats();
    let g = web.id.clone();
    let (_, rev) = a.edit(move |s| s.add_rule(&g, tcp_rule(84))).await.unwrap();
    assert!(h9_at(rev).await.is_ok());
    a.register_host("h4", None).await.unwrap();
    wait_state(&mut srx, "h4 on h9", |st| st.hosts.contains_key("h4")).await;
    assert_eq!(s.watch_stats().events - before.events, 1, "only h4's record");
}

/// A host with a scope cut off from etcd while its placements change and the history is
/// compacted keeps its last state, then reads what it needs again: the universe placed on it
/// meanwhile whole, the one whose endpoint went not at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_with_a_scope_catches_up_past_a_compaction_with_whole_universes() {
    let etcd = Etcd::start_local();
    let ttl = Duration::from_secs(2);
    let proxy = Proxy::start(etcd.endpoint().port()).await;
    let a = etcd.store(ttl).await;
    let (blue, _) = a.edit(|s| s.create_universe(universe("blue"))).await.unwrap();
    let (web, _) = a.edit(|s| s.create_group(group(&blue.id, "web"))).await.unwrap();
    let (ep, placed) = a
        .edit(|s| s.create_endpoint(endpoint_on(&blue.id, "h9", "ns-1", "10.1.0.5", &web.id), "h1"))
        .await
        .unwrap();
    let mut options = EtcdOptions { scope: Some("h9".into()), ..etcd.options(ttl) };
    options.endpoints = vec![format!("127.0.0.1:{}", proxy.port)];
    let s = open(options).await;
    let mut rx = s.subscribe();
    wait_state(&mut rx, "blue on h9", |st| st.revision >= placed).await;
    assert_eq!(universe_of(&s.snapshot(), &blue.id), universe_of(&a.snapshot(), &blue.id));
    let before = s.snapshot();

    proxy.cut();
    let (red, _) = a.edit(|s| s.create_universe(universe("red"))).await.unwrap();
    let (red_web, _) = a.edit(|s| s.create_group(group(&red.id, "web"))).await.unwrap();
    let g = red_web.id.clone();
    a.edit(move |s| s.add_rule(&g, tcp_rule(80))).await.unwrap();
    a.edit(|s| {
        s.create_endpoint(endpoint_on(&red.id, "h9", "ns-2", "10.1.0.6", &red_web.id), "h1")
    })
    .await
    .unwrap();
    let id = ep.id.clone();
    let (_, last) = a.edit(move |s| s.delete_endpoint(&id)).await.unwrap();
    etcd.etcdctl(&["compact", &etcd.revision().to_string()]);
    assert_eq!(*s.snapshot(), *before, "cut off, it keeps its last state");

    proxy.heal();
    wait_state(&mut rx, "the placements made while cut off", |st| st.revision >= last).await;
    let snap = s.snapshot();
    assert_eq!(universe_of(&snap, &red.id), universe_of(&a.snapshot(), &red.id));
    assert!(snap.universes.contains_key(&red.id) && snap.groups[&red_web.id].ingress.len() == 1);
    assert!(!snap.universes.contains_key(&blue.id) && !snap.groups.contains_key(&web.id));
    assert!(snap.endpoints.values().all(|e| e.universe == red.id), "{:?}", snap.endpoints);
}

/// The API's acknowledgement (S13) with a host that follows only its universes: an edit of a
/// universe with no endpoint on it does not wait for it (it is realized there trivially), a
/// placement on it and an edit of a universe it holds do, until it reports them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_api_waits_for_a_host_with_a_scope_only_for_its_own_universes() {
    let etcd = Etcd::start_local();
    let ttl = Duration::from_secs(5);
    let a = etcd.store(ttl).await;
    a.register_host("h1", None).await.unwrap();
    let api = serve(a.clone(), "h1").await;
    let s = open(EtcdOptions { scope: Some("h9".into()), ..etcd.options(ttl) }).await;
    s.register_host("h9", Some(Ipv4Addr::new(198, 18, 0, 9))).await.unwrap();
    // h9 realizes each state it holds 1.5 s late.
    let slow = s.clone();
    tokio::spawn(async move {
        let mut rx = slow.subscribe();
        loop {
            let state = rx.borrow_and_update().clone();
            tokio::time::sleep(Duration::from_millis(1500)).await;
            slow.report("h9", Realized::of(&state));
            if rx.changed().await.is_err() {
                break;
            }
        }
    });
    wait_health(&a, "h9", true).await;
    // Until its first report it has realized nothing (its liveness record says revision 0).
    let now = a.snapshot().revision;
    wait_hosts(&a, "h9's first report", |h| h.iter().any(|h| h.name == "h9" && h.revision >= now))
        .await;
    let timed = |f: Box<dyn FnOnce(&verse::client::Client) -> String + Send>| async {
        cli(&api, move |c| {
            let start = Instant::now();
            let id = f(c);
            (start.elapsed(), id)
        })
        .await
    };
    let fast = Duration::from_millis(1000);
    let (took, blue) =
        timed(Box::new(|c| c.create_universe(&universe("blue")).unwrap().0.id)).await;
    assert!(took < fast, "h9 holds no universe: not waited for ({took:?})");
    let (_, red) = timed(Box::new(|c| c.create_universe(&universe("red")).unwrap().0.id)).await;
    let b = blue.clone();
    let (_, web) = timed(Box::new(move |c| c.create_group(&group(&b, "web")).unwrap().0.id)).await;
    let r = red.clone();
    let (took, red_web) =
        timed(Box::new(move |c| c.create_group(&group(&r, "web")).unwrap().0.id)).await;
    assert!(took < fast, "{took:?}");

    // Placing an endpoint of blue on h9 waits until h9 has realized it.
    let req = endpoint_on(&blue, "h9", "ns-1", "10.1.0.5", &web);
    let (took, _) = timed(Box::new(move |c| c.create_endpoint(&req).unwrap().0.id)).await;
    assert!(took >= Duration::from_millis(1400), "returned before h9 realized it ({took:?})");
    // An edit of blue waits for h9; one of red does not.
    let g = web.clone();
    let (took, _) = timed(Box::new(move |c| c.add_rule(&g, &tcp_rule(80)).unwrap().0.id)).await;
    assert!(took >= Duration::from_millis(1400), "h9 holds blue: waited for ({took:?})");
    let g = red_web.clone();
    let (took, _) = timed(Box::new(move |c| c.add_rule(&g, &tcp_rule(80)).unwrap().0.id)).await;
    assert!(took < fast, "h9 holds no endpoint of red: not waited for ({took:?})");
    assert!(!s.snapshot().universes.contains_key(&red));
}

/// A TCP proxy in front of etcd whose etcd-to-client direction can be slowed
/// down (about 64 KiB/s), so that the responses of one watch stream arrive seconds apart.
struct SlowProxy {
    port: u16,
    slow: Arc<std::sync::atomic::AtomicBool>,
    /// Bumped by `cut`: a connection of an older generation is closed at once, whatever it
    /// has buffered.
    generation: Arc<std::sync::atomic::AtomicU64>,
    inner: Proxy,
}

impl SlowProxy {
    async fn start(target: u16) -> SlowProxy {
        use std::sync::atomic::Ordering;
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // The inner proxy gives cut/heal; this one, in front of it, the throttle.
        let inner = Proxy::start(target).await;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let slow = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let generation = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (s, to, gen) = (slow.clone(), inner.port, generation.clone());
        tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let s = s.clone();
                let gen = gen.clone();
                let born = gen.load(Ordering::SeqCst);
                tokio::spawn(async move {
                    let Ok(outbound) = tokio::net::TcpStream::connect(("127.0.0.1", to)).await
                    else {
                        return;
                    };
                    let (mut ir, mut iw) = inbound.into_split();
                    let (mut or, mut ow) = outbound.into_split();
                    tokio::spawn(async move {
                        let _ = tokio::io::copy(&mut ir, &mut ow).await;
                    });
                    let mut buf = vec![0u8; 4096];
                    loop {
                        if gen.load(Ordering::SeqCst) != born {
                            break;
                        }
                        let n = match or.read(&mut buf).await {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if iw.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                        if s.load(Ordering::SeqCst) {
                            tokio::time::sleep(Duration::from_millis(60)).await;
                        }
                    }
                });
            }
        });
        SlowProxy { port, slow, generation, inner }
    }

    fn cut(&self) {
        self.inner.cut();
        self.generation.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A host with a scope that catches up on a universe over more than 1000
/// revisions (etcd 3.4 sends an unsynced watcher at most 1000 revisions per response, each with
/// the header of etcd's *current* revision) must not count the range as followed past the
/// events it holds: neither in the state it publishes (its report, what the API judges) nor
/// when the watch resumes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scoped_host_catching_up_over_1000_revisions_claims_no_progress_it_lacks() {
    let etcd = Etcd::start_local();
    let ttl = Duration::from_secs(5);
    let proxy = SlowProxy::start(etcd.endpoint().port()).await;
    let a = etcd.store(ttl).await;
    a.register_host("h1", None).await.unwrap();
    let (blue, _) = a.edit(|s| s.create_universe(universe("blue"))).await.unwrap();
    let (web, _) = a.edit(|s| s.create_group(group(&blue.id, "web"))).await.unwrap();
    let (g2, _) = a.edit(|s| s.create_group(group(&blue.id, "g2"))).await.unwrap();
    let (g3, _) = a.edit(|s| s.create_group(group(&blue.id, "g3"))).await.unwrap();
    let (_, placed) = a
        .edit(|s| s.create_endpoint(endpoint_on(&blue.id, "h9", "ns-1", "10.1.0.5", &web.id), "h1"))
        .await
        .unwrap();
    let mut options = EtcdOptions { scope: Some("h9".into()), ..etcd.options(ttl) };
    options.endpoints = vec![format!("127.0.0.1:{}", proxy.port)];
    let s = open(options).await;
    s.register_host("h9", Some(Ipv4Addr::new(198, 18, 0, 9))).await.unwrap();
    let mut rx = s.subscribe();
    wait_state(&mut rx, "blue on h9", |st| st.revision >= placed).await;

    proxy.cut();
    for port in 1..=550u16 {
        for g in [&g2.id, &g3.id] {
            let g = g.clone();
            a.edit(move |s| s.add_rule(&g, tcp_rule(port))).await.unwrap();
        }
    }
    let g = web.id.clone();
    let (_, rule_rev) = a.edit(move |s| s.add_rule(&g, tcp_rule(81))).await.unwrap();
    let has_81 = |st: &State| st.groups.get(&web.id).is_some_and(|g| g.ingress.len() == 1);
    let progress = |st: &State| {
        st.followed.as_ref().and_then(|f| f.get(&format!("u/{}/", blue.id)).copied()).unwrap_or(0)
    };
    proxy.slow.store(true, std::sync::atomic::Ordering::SeqCst);
    proxy.inner.heal();

    let mut claimed_without = None;
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        let st = s.snapshot();
        if has_81(&st) {
            break;
        }
        if progress(&st) >= rule_rev {
            claimed_without = Some(st);
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let mut judged = None;
    let mut lost = false;
    if let Some(st) = &claimed_without {
        // The stream breaks before the rest arrives: the watch resumes from its progress.
        proxy.cut();
        proxy.slow.store(false, std::sync::atomic::Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(300)).await;
        proxy.inner.heal();
        tokio::time::sleep(Duration::from_secs(8)).await;
        lost = !has_81(&s.snapshot());
        // What its reconciler would report for that state, as the API host judges it.
        s.report("h9", Realized::of(st));
        tokio::time::sleep(Duration::from_millis(500)).await;
        judged = a.hosts().await.unwrap().into_iter().find(|h| h.name == "h9");
    }
    assert!(
        claimed_without.is_none(),
        "h9 published u/blue/ followed up to {} >= {rule_rev} (the rule's revision) without the \
         rule; the API host judged h9 at {:?}; after a reconnect the rule is {}",
        claimed_without.as_ref().map(|st| progress(st)).unwrap_or(0),
        judged.map(|h| h.revision),
        if lost { "still missing (lost)" } else { "there" },
    );
}

/// Review (scope, pre-existing in the full store): a store that follows everything, cut off
/// while more than 1000 revisions pass, loses the edits past etcd's first catch-up response if
/// the stream breaks before the second (it resumes from that response's header revision).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_store_catching_up_over_1000_revisions_loses_no_edit_on_resume() {
    let etcd = Etcd::start_local();
    let ttl = Duration::from_secs(5);
    let proxy = SlowProxy::start(etcd.endpoint().port()).await;
    let a = etcd.store(ttl).await;
    let (blue, _) = a.edit(|s| s.create_universe(universe("blue"))).await.unwrap();
    let (web, _) = a.edit(|s| s.create_group(group(&blue.id, "web"))).await.unwrap();
    let (g2, _) = a.edit(|s| s.create_group(group(&blue.id, "g2"))).await.unwrap();
    let (g3, last) = a.edit(|s| s.create_group(group(&blue.id, "g3"))).await.unwrap();
    let mut options = etcd.options(ttl);
    options.endpoints = vec![format!("127.0.0.1:{}", proxy.port)];
    let s = open(options).await;
    let mut rx = s.subscribe();
    wait_state(&mut rx, "g3", |st| st.revision >= last).await;
    proxy.cut();
    for port in 1..=550u16 {
        for g in [&g2.id, &g3.id] {
            let g = g.clone();
            a.edit(move |s| s.add_rule(&g, tcp_rule(port))).await.unwrap();
        }
    }
    let g = web.id.clone();
    a.edit(move |s| s.add_rule(&g, tcp_rule(81))).await.unwrap();
    let has_81 = |st: &State| st.groups.get(&web.id).is_some_and(|g| g.ingress.len() == 1);
    proxy.slow.store(true, std::sync::atomic::Ordering::SeqCst);
    proxy.inner.heal();
    wait_state(&mut rx, "the first catch-up response", |st| {
        st.groups.get(&g2.id).is_some_and(|g| !g.ingress.is_empty())
    })
    .await;
    let partial = !has_81(&s.snapshot());
    proxy.cut();
    proxy.slow.store(false, std::sync::atomic::Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxy.inner.heal();
    tokio::time::sleep(Duration::from_secs(8)).await;
    let snap = s.snapshot();
    assert!(
        has_81(&snap),
        "cut after the first response (partial: {partial}); after the resume the rule is lost: \
         g2 {} g3 {} rules",
        snap.groups[&g2.id].ingress.len(),
        snap.groups[&g3.id].ingress.len()
    );
}

/// A key of a universe that does not decode is skipped and logged when a host with a scope
/// loads that universe, as the watch skips one: the host holds the rest of the universe
/// (before, the read failed, and failed again at every resume: the host never held it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_with_a_scope_skips_a_key_that_does_not_decode_when_loading_a_universe() {
    let etcd = Etcd::start_local();
    let ttl = Duration::from_secs(5);
    let options = etcd.options(ttl);
    let a = etcd.store(ttl).await;
    a.register_host("h1", None).await.unwrap();
    let (blue, _) = a.edit(|s| s.create_universe(universe("blue"))).await.unwrap();
    let (web, _) = a.edit(|s| s.create_group(group(&blue.id, "web"))).await.unwrap();
    let client = verse::store::etcd::connect(&options).await.unwrap();
    let bad = format!("{}u/{}/groups/sg-corrupt", options.prefix, blue.id);
    client.kv_client().put(bad, "not a group", None).await.unwrap();

    let s = open(EtcdOptions { scope: Some("h9".into()), ..etcd.options(ttl) }).await;
    s.register_host("h9", Some(Ipv4Addr::new(198, 18, 0, 9))).await.unwrap();
    let mut srx = s.subscribe();
    let (_, placed) = a
        .edit(|s| s.create_endpoint(endpoint_on(&blue.id, "h9", "ns-1", "10.1.0.5", &web.id), "h1"))
        .await
        .unwrap();
    wait_state(&mut srx, "blue on h9 despite the corrupt key", |st| {
        st.revision >= placed && st.groups.contains_key(&web.id)
    })
    .await;
    assert_eq!(universe_of(&s.snapshot(), &blue.id), universe_of(&a.snapshot(), &blue.id));
}

/// etcd's count of watchers (`etcd_debugging_mvcc_watcher_total`), from member `addr`.
fn etcd_watchers(addr: std::net::SocketAddr) -> i64 {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(addr).unwrap();
    conn.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").unwrap();
    let mut body = String::new();
    conn.read_to_string(&mut body).unwrap();
    let line = body.lines().find(|l| l.starts_with("etcd_debugging_mvcc_watcher_total "));
    let value = line.and_then(|l| l.split_whitespace().nth(1)).expect("the watcher gauge");
    value.parse::<f64>().unwrap() as i64
}

/// A universe deleted under a host with a scope leaves its state and its watcher is cancelled
/// in etcd (before, the store forgot the watcher but etcd kept it until the stream ended).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_with_a_scope_cancels_the_watcher_of_a_universe_deleted() {
    let etcd = Etcd::start_local();
    let ttl = Duration::from_secs(5);
    let options = etcd.options(ttl);
    let a = etcd.store(ttl).await;
    a.register_host("h1", None).await.unwrap();
    let (blue, _) = a.edit(|s| s.create_universe(universe("blue"))).await.unwrap();
    let (web, _) = a.edit(|s| s.create_group(group(&blue.id, "web"))).await.unwrap();
    let s = open(EtcdOptions { scope: Some("h9".into()), ..etcd.options(ttl) }).await;
    s.register_host("h9", Some(Ipv4Addr::new(198, 18, 0, 9))).await.unwrap();
    let mut srx = s.subscribe();
    let (_, placed) = a
        .edit(|s| s.create_endpoint(endpoint_on(&blue.id, "h9", "ns-1", "10.1.0.5", &web.id), "h1"))
        .await
        .unwrap();
    wait_state(&mut srx, "blue on h9", |st| {
        st.revision >= placed && st.universes.contains_key(&blue.id)
    })
    .await;
    let member = etcd.endpoints()[0];
    tokio::time::sleep(Duration::from_millis(300)).await;
    let held = etcd_watchers(member);

    // The universe's `version` key goes (what deleting it does, its placement claims apart).
    let client = verse::store::etcd::connect(&options).await.unwrap();
    let version = format!("{}u/{}/version", options.prefix, blue.id);
    client.kv_client().delete(version, None).await.unwrap();
    wait_state(&mut srx, "blue gone from h9", |st| !st.universes.contains_key(&blue.id)).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut now = etcd_watchers(member);
    while now >= held && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        now = etcd_watchers(member);
    }
    assert_eq!(now, held - 1, "blue's watcher is cancelled in etcd ({held} before)");
}

/// Waits until both stores have applied `rev`.
async fn both_at(a: &Store, b: &Store, rev: u64) {
    for store in [a, b] {
        let mut rx = store.subscribe();
        wait_state(&mut rx, "the revision", |s| s.revision >= rev).await;
    }
}

/// The newest revision either store has applied.
fn newest(a: &Store, b: &Store) -> u64 {
    a.snapshot().revision.max(b.snapshot().revision)
}

/// Two hosts editing two groups of one universe at once never refuse each other's commits: an
/// edit of one group's rules is guarded by that group's key (and the universe's `version`
/// compared, not rewritten), not by the universe. The universe has an endpoint, and the rules
/// are of a CIDR class it has already (the fit of every host's maps cannot change). Every rule
/// of both is kept. Before, each edit rewrote the universe's `version` and the two hosts
/// refused each other's commits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edits_of_two_groups_of_one_universe_from_two_hosts_never_conflict() {
    let etcd = Etcd::start_local();
    let a = etcd.store(Duration::from_secs(5)).await;
    let b = etcd.store(Duration::from_secs(5)).await;
    let (blue, _) = a.edit(|s| s.create_universe(universe("blue"))).await.unwrap();
    let (web, _) = a.edit(|s| s.create_group(group(&blue.id, "web"))).await.unwrap();
    let (db, _) = a.edit(|s| s.create_group(group(&blue.id, "db"))).await.unwrap();
    let (members, _) = a.edit(|s| s.create_group(group(&blue.id, "members"))).await.unwrap();
    a.edit(|s| {
        s.create_endpoint(endpoint_on(&blue.id, "h1", "ns-1", "10.1.0.5", &members.id), "h1")
    })
    .await
    .unwrap();
    let (_, rev) = a.edit(|s| s.add_rule(&members.id, tcp_rule(1))).await.unwrap();
    both_at(&a, &b, rev).await;
    let before = (a.conflicts(), b.conflicts());
    const N: u16 = 40;
    let (ta, tb) =
        (add_rules(a.clone(), web.id.clone(), N), add_rules(b.clone(), db.id.clone(), N));
    ta.await.unwrap();
    tb.await.unwrap();
    assert_eq!(
        (a.conflicts(), b.conflicts()),
        before,
        "edits of different groups of one universe never refuse each other"
    );
    both_at(&a, &b, newest(&a, &b)).await;
    for store in [&a, &b] {
        let s = store.snapshot();
        assert_eq!(s.groups[&web.id].ingress.len(), usize::from(N), "every rule of a is kept");
        assert_eq!(s.groups[&db.id].ingress.len(), usize::from(N), "every rule of b is kept");
    }
    assert_eq!(*a.snapshot(), *b.snapshot());
}

/// What one edit's checks read cannot be broken by another host's edit committed meanwhile,
/// now that edits of one group's rules no longer take the whole universe's guard. Two hosts
/// race, each round both edits running on the same state: adding the same rule to one group
/// (S4: one kept, the other a 409 `duplicate`); adding a rule each to a group of 999 rules
/// (S12: one kept, the other a 409 `limit_exceeded`, never 1001); deleting a group while the
/// other adds a rule naming it as its peer (never both: no rule names a group that is gone);
/// deleting the universe while the other adds a rule to one of its groups (nothing of the
/// universe is left in etcd). The races did happen: commits were refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hosts_racing_on_one_universe_break_none_of_its_checks() {
    let etcd = Etcd::start_local();
    let a = etcd.store(Duration::from_secs(5)).await;
    let b = etcd.store(Duration::from_secs(5)).await;
    let code = |r: &Result<(model::Rule, u64), verse::store::Error>| match r {
        Ok(_) => "ok",
        Err(verse::store::Error::Rejected(e)) => e.code,
        Err(e) => panic!("not an answer of the checks: {e}"),
    };
    let (blue, _) = a.edit(|s| s.create_universe(universe("blue"))).await.unwrap();
    let (g, rev) = a.edit(|s| s.create_group(group(&blue.id, "web"))).await.unwrap();
    both_at(&a, &b, rev).await;
    let before = a.conflicts() + b.conflicts();
    const ROUNDS: u16 = 6;

    // S4: the same rule from both hosts at once.
    for round in 0..ROUNDS {
        let (ga, gb) = (g.id.clone(), g.id.clone());
        let (ra, rb) = tokio::join!(
            a.edit(move |s| s.add_rule(&ga, tcp_rule(100 + round))),
            b.edit(move |s| s.add_rule(&gb, tcp_rule(100 + round)))
        );
        let mut codes = [code(&ra), code(&rb)];
        codes.sort();
        assert_eq!(codes, ["duplicate", "ok"], "round {round}: {ra:?} {rb:?}");
        both_at(&a, &b, newest(&a, &b)).await;
    }

    // S12: a group of 999 rules (its two egress rules, S2, and those above among them), then
    // one rule from each host at once.
    let have = a.snapshot().groups[&g.id].ingress.len() + 2;
    for chunk in (have..999).collect::<Vec<_>>().chunks(100) {
        let (gid, ports) = (g.id.clone(), chunk.to_vec());
        a.edit(move |s| {
            for p in &ports {
                s.add_rule(&gid, tcp_rule(10_000 + u16::try_from(*p).unwrap()))?;
            }
            Ok(())
        })
        .await
        .unwrap();
    }
    both_at(&a, &b, newest(&a, &b)).await;
    let count = |s: &Store| {
        let snap = s.snapshot();
        snap.groups[&g.id].ingress.len() + snap.groups[&g.id].egress.len()
    };
    assert_eq!(count(&a), 999);
    for round in 0..ROUNDS {
        let (ga, gb) = (g.id.clone(), g.id.clone());
        let (ra, rb) = tokio::join!(
            a.edit(move |s| s.add_rule(&ga, tcp_rule(20_000 + round))),
            b.edit(move |s| s.add_rule(&gb, tcp_rule(30_000 + round)))
        );
        let mut codes = [code(&ra), code(&rb)];
        codes.sort();
        assert_eq!(codes, ["limit_exceeded", "ok"], "round {round}: {ra:?} {rb:?}");
        both_at(&a, &b, newest(&a, &b)).await;
        assert_eq!((count(&a), count(&b)), (1000, 1000), "round {round}");
        let added = ra.or(rb).unwrap().0.id;
        let gid = g.id.clone();
        let (_, rev) = a.edit(move |s| s.delete_rule(&gid, &added)).await.unwrap();
        both_at(&a, &b, rev).await;
    }

    // A group deleted while the other host adds a rule naming it as its peer.
    for round in 0..ROUNDS {
        let uni = blue.id.clone();
        let (peer, rev) =
            a.edit(move |s| s.create_group(group(&uni, &format!("peer-{round}")))).await.unwrap();
        both_at(&a, &b, rev).await;
        let (pa, pb, gb) = (peer.id.clone(), peer.id.clone(), g.id.clone());
        let (ra, rb) = tokio::join!(
            a.edit(move |s| s.delete_group(&pa)),
            b.edit(move |s| {
                // Room for it: the group holds 999 rules.
                let one = s.groups[&gb].ingress[0].id.clone();
                s.delete_rule(&gb, &one)?;
                let mut rule = tcp_rule(40_000 + round);
                rule.cidr = None;
                rule.group = Some(pb.clone());
                s.add_rule(&gb, rule)
            })
        );
        assert!(ra.is_err() || rb.is_err(), "round {round}: both committed: {ra:?} {rb:?}");
        both_at(&a, &b, newest(&a, &b)).await;
        let s = a.snapshot();
        let named = s
            .groups
            .values()
            .flat_map(|g| g.ingress.iter())
            .any(|r| matches!(&r.peer, model::Peer::Group(p) if *p == peer.id));
        assert_eq!(named, s.groups.contains_key(&peer.id), "round {round}: {ra:?} {rb:?}");
        assert_eq!(*a.snapshot(), *b.snapshot());
    }

    // The universe deleted while the other host adds a rule to one of its groups.
    for round in 0..ROUNDS {
        let (red, _) =
            a.edit(move |s| s.create_universe(universe(&format!("red-{round}")))).await.unwrap();
        let (h, rev) = a.edit(|s| s.create_group(group(&red.id, "h"))).await.unwrap();
        both_at(&a, &b, rev).await;
        let (ua, hb) = (red.id.clone(), h.id.clone());
        let (ra, rb) = tokio::join!(
            a.edit(move |s| s.delete_universe(&ua)),
            b.edit(move |s| s.add_rule(&hb, tcp_rule(50_000 + round)))
        );
        ra.unwrap();
        assert!(rb.is_ok() || code(&rb) == "not_found", "round {round}: {rb:?}");
        both_at(&a, &b, newest(&a, &b)).await;
        for s in [a.snapshot(), b.snapshot()] {
            assert!(!s.universes.contains_key(&red.id) && !s.groups.contains_key(&h.id));
        }
    }
    // A store that reads everything afresh finds nothing of the deleted universes, and the
    // same state as the two.
    let c = etcd.store(Duration::from_secs(5)).await;
    both_at(&a, &c, newest(&a, &b)).await;
    assert_eq!(*c.snapshot(), *a.snapshot());
    assert!(c.snapshot().groups.values().all(|g| g.universe == blue.id));
    assert!(
        a.conflicts() + b.conflicts() > before,
        "the hosts raced (some commits were refused): else this test proves nothing"
    );
}

/// An edit that keeps the whole universe's guard (creating an endpoint, a rule of a group with
/// members) is not starved by a flood of edits of one group's rules alone in the same
/// universe from two hosts. Each of those commits moves a group key, which refuses the whole
/// universe's edit (it never commits over a group key newer than its state); before, under
/// such a flood it was refused at every attempt and ran out of them (`Contention`, the API's
/// 503 `unavailable`), while the flood went on unhindered. Now, refused a few times by the
/// groups' edits, it holds them off until it commits. Every edit of the flood commits too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edits_of_one_group_alone_never_starve_an_edit_of_the_whole_universe() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use verse::store::{Idempotency, Outcome};
    let etcd = Etcd::start_local();
    let a = etcd.store(Duration::from_secs(5)).await;
    let b = etcd.store(Duration::from_secs(5)).await;
    let (blue, _) = a.edit(|s| s.create_universe(universe("blue"))).await.unwrap();
    let (members, _) = a.edit(|s| s.create_group(group(&blue.id, "members"))).await.unwrap();
    a.edit(|s| {
        s.create_endpoint(endpoint_on(&blue.id, "h1", "ns-0", "10.1.0.2", &members.id), "h1")
    })
    .await
    .unwrap();
    // The CIDR class of the flood's rules is the universe's already: the flood's edits are
    // guarded by their groups alone.
    a.edit(|s| s.add_rule(&members.id, tcp_rule(1))).await.unwrap();
    const GROUPS: usize = 12;
    let mut empty = Vec::new();
    for i in 0..GROUPS {
        let uni = blue.id.clone();
        let (g, _) = a.edit(move |s| s.create_group(group(&uni, &format!("g{i}")))).await.unwrap();
        empty.push(g.id);
    }
    both_at(&a, &b, newest(&a, &b)).await;

    // The flood: on each host, two tasks per empty group, each adding a rule then deleting it,
    // until told to stop (half of them with an idempotency key, so that they commit in batches
    // as the API's edits do).
    let stop = Arc::new(AtomicBool::new(false));
    let flooded = Arc::new(AtomicU64::new(0));
    let mut flood = Vec::new();
    for (h, store) in [&a, &b].into_iter().enumerate() {
        for (i, g) in empty.iter().enumerate() {
            for t in 0..2u16 {
                let (store, g, stop, flooded) =
                    (store.clone(), g.clone(), stop.clone(), flooded.clone());
                let base = 1000 + 100 * u16::try_from(i).unwrap() + 10 * u16::try_from(h).unwrap();
                flood.push(tokio::spawn(async move {
                    let mut n = 0u64;
                    while !stop.load(Ordering::SeqCst) {
                        let (ga, gd) = (g.clone(), g.clone());
                        let port = base + t;
                        let rule = if t == 0 {
                            store.edit(move |s| s.add_rule(&ga, tcp_rule(port))).await?.0
                        } else {
                            let key = format!("flood-{h}-{g}-{n}");
                            let idem =
                                Idempotency { fingerprint: key.clone(), key, from_client: true };
                            let respond = |_: &model::Rule| (201, None);
                            match store
                                .edit_recorded(
                                    &idem,
                                    move |s| s.add_rule(&ga, tcp_rule(port)),
                                    respond,
                                )
                                .await?
                            {
                                Outcome::Applied { out, .. } => out,
                                Outcome::Replayed(r) => panic!("a new key replayed: {r:?}"),
                            }
                        };
                        store.edit(move |s| s.delete_rule(&gd, &rule.id)).await?;
                        n += 2;
                        flooded.fetch_add(2, Ordering::Relaxed);
                    }
                    Ok::<u64, verse::store::Error>(n)
                }));
            }
        }
    }
    // Let the flood get going.
    let started = flooded.load(Ordering::Relaxed);
    let t0 = Instant::now();
    while flooded.load(Ordering::Relaxed) < started + 200 && t0.elapsed() < WAIT {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // Meanwhile, edits of the whole universe through both hosts, one at a time: endpoints
    // created, rules added to the group with members.
    const EDITS: usize = 8;
    let before = a.conflicts() + b.conflicts();
    let mut slowest = Duration::ZERO;
    for i in 0..EDITS {
        let store = if i % 2 == 0 { &a } else { &b };
        let started = Instant::now();
        let (uni, m) = (blue.id.clone(), members.id.clone());
        let outcome = if i % 4 < 2 {
            let ep = endpoint_on(
                &uni,
                "h1",
                &format!("ns-{}", i + 1),
                &format!("10.1.0.{}", i + 10),
                &m,
            );
            store.edit(move |s| s.create_endpoint(ep.clone(), "h1")).await.map(|(_, r)| r)
        } else {
            let port = 2 + u16::try_from(i).unwrap();
            store.edit(move |s| s.add_rule(&m, tcp_rule(port))).await.map(|(_, r)| r)
        };
        let took = started.elapsed();
        slowest = slowest.max(took);
        let rev = outcome.unwrap_or_else(|e| {
            panic!("edit {i} of the whole universe, after {took:?} of the flood: {e}")
        });
        assert!(took < Duration::from_secs(10), "edit {i} took {took:?}");
        assert!(rev > 0);
    }
    let during = flooded.load(Ordering::Relaxed) - started;
    stop.store(true, Ordering::SeqCst);
    let mut total = 0;
    for t in flood {
        total += t.await.unwrap().expect("every edit of the flood commits");
    }
    eprintln!(
        "{EDITS} edits of the whole universe, the slowest {slowest:?}; the flood: {total} edits \
         ({during} meanwhile), {} commits refused, {} holds",
        a.conflicts() + b.conflicts() - before,
        a.holds() + b.holds()
    );
    assert!(
        a.conflicts() + b.conflicts() > before,
        "the edits raced (some commits were refused): else this test proves nothing"
    );
    both_at(&a, &b, newest(&a, &b)).await;
    for store in [&a, &b] {
        let s = store.snapshot();
        assert_eq!(s.endpoints.values().filter(|e| e.universe == blue.id).count(), 1 + EDITS / 2);
        assert_eq!(s.groups[&members.id].ingress.len(), 1 + EDITS / 2);
        for g in &empty {
            assert!(s.groups[g].ingress.is_empty(), "every rule of the flood was deleted");
        }
    }
    assert_eq!(*a.snapshot(), *b.snapshot());
}
