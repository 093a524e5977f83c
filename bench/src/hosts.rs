//! Control tier, part `hosts`: a thousand hosts on one machine (README, "Scale").
//!
//! The fleet: three real hosts ([`Fleet`], each `versed` with its eBPF dataplane; the first two
//! serve the API, the third serves none, `[api] serve = false`, so it follows only its own
//! universes as the simulated hosts do) and `N`
//! simulated hosts (`versed --simulate-hosts N`, default 50, which completes on a shared 2-core
//! machine; `--sim-hosts 1000` for the thousand-host run: the real control plane of each host,
//! its own watch and lease, over in-memory maps) on one three-member etcd cluster in the
//! underlay namespace, everything on this machine's two cores.
//!
//! The state, placed through the real hosts' API (several clients at once, spread over the
//! two APIs): `U` universes (default 100, all 10.0.0.0/16), each with groups `web` and
//! `clients` and a rule letting `clients` reach `web` on TCP 80; `E` endpoints on every
//! simulated host (default 10), endpoint `j` of host `i` in universe `(i * E + j) mod U` (so
//! each universe spans `N * E / U` hosts), in `web` or `clients` alternately; one endpoint on
//! each real host in the first universe. Placing stops after a time budget (`--sim-budget`); the
//! records say how much was placed.
//!
//! The part is bounded: joining, placing, settling and the edits each get at most the budget
//! (`--sim-budget`, default 300 s; an edit already sent may take `EDIT_TIMEOUT` more), so it
//! ends within about four budgets plus start-up whatever the machine's load; no edit starts once
//! the edits' budget is spent, and the records say how many were timed.
//!
//! The measurements, once every host has realized the last placement:
//! - Edit to realized on every host: `--sim-edits` edits (default 25), one at a time, through
//!   the two APIs in turn, each adding or removing a rule of another universe's `web` group.
//!   The time runs from sending the API call until the last of the `N + 3` hosts reports the
//!   edit's revision realized, as seen by an observer following the store like a host does (its
//!   own etcd watch, in the underlay namespace): median and p99 over the edits (target: p99
//!   under 1 s), with the median host's time per edit in the configuration.
//! - etcd watch events per second during the edits: `etcd_debugging_mvcc_events_total` summed
//!   over the three members (events etcd sent to watchers), beside the hosts' own count.
//! - Bytes each host received per edit: what its store's watch received during the edits
//!   (protobuf plus gRPC prefix, `verse_store_watch_bytes_total`), divided by the edits; median
//!   and maximum over the simulated hosts, and the real hosts' (with their map entries and
//!   resident memory, from their `/metrics`).
//! - Memory per simulated host: the simulation's resident memory after placing the state, minus
//!   before its first host started, over `N`; and the same right after the join (empty state).
//! - Joining: how long the `N` simulated hosts took to start, register and be listed healthy.
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use serde_json::{json, Value};
use tests::{enter_netns, http_request, Fleet};
use verse::store::{EtcdOptions, Store};

use crate::results::{BenchRecord, Unit};

/// How the thousand-host part is sized (the `--sim-*` options of `verse-bench`).
#[derive(Clone, Debug)]
pub struct Scale {
    pub hosts: usize,
    pub endpoints_per_host: usize,
    pub universes: usize,
    pub edits: usize,
    /// etcd clients the simulated hosts share (0: one each).
    pub connections: usize,
    /// Seconds allowed for joining, for placing the state, for settling and for the edits, each.
    pub budget_s: u64,
}

/// API clients placing the state at once.
const PLACERS: usize = 12;
/// The real hosts whose API takes the edits: the first two (the third serves none).
const API_HOSTS: usize = 2;

/// How long one edit may take to be realized everywhere before the part gives up.
const EDIT_TIMEOUT: Duration = Duration::from_secs(120);

fn id(v: &Value) -> Result<String> {
    v["id"].as_str().map(str::to_owned).ok_or_else(|| anyhow!("no id in {v}"))
}

/// Per host, each revision it reported and when the observer first saw it.
type History = Arc<Mutex<HashMap<String, Vec<(u64, Instant)>>>>;

/// The time at which each host first reported each revision, as an observer store sees it.
struct Observer {
    history: History,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<Result<()>>>,
}

impl Observer {
    /// Follows the hosts of the store at `options` from inside `netns`.
    fn start(netns: &str, options: EtcdOptions) -> Result<Observer> {
        let history: History = Arc::default();
        let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
        let netns = netns.to_owned();
        let seen = history.clone();
        let thread = std::thread::spawn(move || {
            enter_netns(&netns, move || -> Result<()> {
                let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
                rt.block_on(async move {
                    let store = match Store::open_etcd(options).await {
                        Ok(s) => s,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e.to_string()));
                            bail!("open the observer's store: {e}");
                        }
                    };
                    let mut hosts = match store.subscribe_hosts().await {
                        Ok(hosts) => hosts,
                        Err(e) => {
                            let _ = ready_tx.send(Err(e.to_string()));
                            bail!("follow the hosts' liveness records: {e}");
                        }
                    };
                    let _ = ready_tx.send(Ok(()));
                    loop {
                        let now = Instant::now();
                        {
                            let list = hosts.borrow_and_update().clone();
                            let mut seen = seen.lock().unwrap_or_else(|e| e.into_inner());
                            for h in list.iter() {
                                let v = seen.entry(h.name.clone()).or_default();
                                if v.last().is_none_or(|(r, _)| h.revision > *r) {
                                    v.push((h.revision, now));
                                }
                            }
                        }
                        tokio::select! {
                            changed = hosts.changed() => if changed.is_err() { return Ok(()) },
                            _ = &mut stopped => return Ok(()),
                        }
                    }
                })
            })
        });
        match ready_rx.recv_timeout(Duration::from_secs(60)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => bail!("the observer could not follow the store: {e}"),
            Err(_) => bail!("the observer did not open its store within 60 s"),
        }
        Ok(Observer { history, stop: Some(stop), thread: Some(thread) })
    }

    /// When `name` first reported a revision of at least `revision`.
    fn reached(&self, name: &str, revision: u64) -> Option<Instant> {
        let h = self.history.lock().unwrap_or_else(|e| e.into_inner());
        h.get(name)?.iter().find(|(r, _)| *r >= revision).map(|(_, t)| *t)
    }

    /// Waits until every host of `names` has reported `revision`; the time the last did.
    fn wait_all(&self, names: &[String], revision: u64, timeout: Duration) -> Result<Instant> {
        let deadline = Instant::now() + timeout;
        loop {
            let times: Option<Vec<Instant>> =
                names.iter().map(|n| self.reached(n, revision)).collect();
            if let Some(times) = times {
                return times.into_iter().max().context("no host");
            }
            if Instant::now() > deadline {
                let behind: Vec<&String> =
                    names.iter().filter(|n| self.reached(n, revision).is_none()).take(10).collect();
                bail!("revision {revision} not realized by every host within {timeout:?}: {behind:?} ...");
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Counters of every etcd member's `/metrics`, summed, by name.
pub(crate) fn etcd_counters(fleet: &Fleet, names: &[&str]) -> HashMap<String, f64> {
    let netns = fleet.etcd().netns().expect("a fleet's etcd runs in its underlay namespace");
    let mut out: HashMap<String, f64> = names.iter().map(|n| ((*n).to_owned(), 0.0)).collect();
    for addr in fleet.etcd().endpoints() {
        let Ok(r) = http_request(netns, addr, "GET", "/metrics", None, Duration::from_secs(10))
        else {
            continue;
        };
        for line in r.body.lines() {
            let mut parts = line.split_whitespace();
            let (Some(name), Some(value)) = (parts.next(), parts.next()) else { continue };
            if let (Some(sum), Ok(v)) = (out.get_mut(name), value.parse::<f64>()) {
                *sum += v;
            }
        }
    }
    out
}

/// What a real host received and holds, from its `/metrics`: watch bytes, watch events, map
/// entries, resident memory (bytes).
fn host_counts(fleet: &Fleet, i: usize) -> (f64, f64, f64, f64) {
    let text = fleet.api(i).metrics();
    let get = |name: &str| tests::metric_value(&text, name).unwrap_or(0) as f64;
    (
        get("verse_store_watch_bytes_total"),
        get("verse_store_watch_events_total"),
        get("verse_map_entries"),
        get("verse_resident_memory_bytes"),
    )
}

fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

/// Per simulated host, from a `GET /v1/simulation` report: (watch bytes, watch events, map
/// entries).
fn sim_counts(report: &Value) -> HashMap<String, (f64, f64, f64)> {
    report["per_host"]
        .as_array()
        .map(|hs| {
            hs.iter()
                .map(|h| {
                    let f = |v: &Value| v.as_f64().unwrap_or(0.0);
                    (
                        h["name"].as_str().unwrap_or("").to_owned(),
                        (f(&h["watch"]["bytes"]), f(&h["watch"]["events"]), f(&h["map_entries"])),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

pub fn run(out: &mut Vec<BenchRecord>, scale: &Scale) -> Result<()> {
    let started = Instant::now();
    let n = scale.hosts;
    let total_hosts = n + 3;
    eprintln!("control/hosts: {scale:?}");
    let fleet = Fleet::start_with_host_configs(&["", "", "[api]\nserve = false\n"]);
    ensure!(
        fleet.wait_realized(0, 0, Duration::from_secs(60)),
        "the three real hosts are not healthy: {:?}",
        fleet.api(0).hosts()
    );
    let options =
        EtcdOptions::new(fleet.etcd().endpoints().iter().map(SocketAddr::to_string).collect());
    let netns = fleet.etcd().netns().expect("a fleet's etcd runs in its underlay namespace");
    let observer = Observer::start(netns, options)?;

    // Join.
    let budget = Duration::from_secs(scale.budget_s);
    let t = Instant::now();
    let sim = fleet.simulate(n, "sim-", scale.connections, budget);
    let join_s = t.elapsed().as_secs_f64();
    let joined = sim.report();
    let rss_before = joined["rss_before_bytes"].as_f64().unwrap_or(0.0);
    let rss_joined = joined["rss_bytes"].as_f64().unwrap_or(0.0);
    eprintln!(
        "control/hosts: {n} simulated hosts joined in {join_s:.1} s, {:.0} KiB each",
        (rss_joined - rss_before) / n as f64 / 1024.0
    );
    let mut names: Vec<String> = fleet.hosts().iter().map(|h| h.name().to_owned()).collect();
    names.extend(sim.names());

    // The state.
    let t = Instant::now();
    let api = fleet.api(0).clone();
    let mut universes = Vec::new();
    for u in 0..scale.universes {
        let uni = id(&api.create_universe(&format!("s{u:03}"), "10.0.0.0/16"))?;
        let web = id(&api.create_group(&uni, "web"))?;
        let clients = id(&api.create_group(&uni, "clients"))?;
        api.add_rule(
            &web,
            &json!({"direction": "ingress", "protocol": "tcp", "from_port": 80, "to_port": 80, "group": clients}),
        );
        universes.push((uni, web, clients));
    }
    let workloads: Vec<_> = (0..3)
        .map(|k| {
            let (uni, web, _) = &universes[0];
            fleet.endpoint_via((k + 1) % API_HOSTS, k, uni, &format!("10.0.255.{}", k + 1), &[web])
        })
        .collect();
    let wanted = n * scale.endpoints_per_host;
    let next = AtomicUsize::new(0);
    let placed = AtomicUsize::new(0);
    let failed = Mutex::new(Vec::<String>::new());
    let place_deadline = Instant::now() + budget;
    std::thread::scope(|s| {
        for p in 0..PLACERS {
            let (fleet, universes, next, placed, failed) =
                (&fleet, &universes, &next, &placed, &failed);
            s.spawn(move || loop {
                let k = next.fetch_add(1, Ordering::Relaxed);
                if k >= wanted || Instant::now() > place_deadline {
                    return;
                }
                let (i, j) = (k / scale.endpoints_per_host + 1, k % scale.endpoints_per_host);
                let (uni, web, clients) =
                    &universes[(i * scale.endpoints_per_host + j) % universes.len()];
                let group = if j % 2 == 0 { web } else { clients };
                let body = json!({"universe": uni, "host": format!("sim-{i:04}"),
                    "netns": format!("sim{j}"), "ip": format!("10.0.{}.{}", i / 250, i % 250 + 1),
                    "security_groups": [group]});
                match fleet.api(p % API_HOSTS).request(
                    "POST",
                    "/v1/endpoints",
                    Some(&body),
                    Duration::from_secs(60),
                ) {
                    Ok(r) if r.status == 201 => {
                        let done = placed.fetch_add(1, Ordering::Relaxed) + 1;
                        if done % 500 == 0 {
                            eprintln!("control/hosts: {done} endpoints placed");
                        }
                    }
                    Ok(r) => failed.lock().unwrap().push(format!("{}: {}", r.status, r.body)),
                    Err(e) => failed.lock().unwrap().push(e.to_string()),
                }
            });
        }
    });
    let placed = placed.into_inner();
    let failed = failed.into_inner().unwrap();
    let place_s = t.elapsed().as_secs_f64();
    eprintln!(
        "control/hosts: {placed} of {wanted} endpoints placed in {place_s:.1} s ({} failed{})",
        failed.len(),
        failed.first().map(|f| format!(", first: {f}")).unwrap_or_default()
    );
    if placed == 0 {
        bail!("no endpoint could be placed: {:?}", failed.first());
    }

    // Settle: every host at the state's revision.
    let (_, web0, clients0) = &universes[0];
    let r = api.post(
        &format!("/v1/security-groups/{web0}/rules"),
        &json!({"direction": "ingress", "protocol": "tcp", "from_port": 7999, "to_port": 7999, "group": clients0}),
    );
    let settle_rev = r.revision().context("no revision")?;
    observer.wait_all(&names, settle_rev, budget)?;
    std::thread::sleep(Duration::from_secs(2));

    // The edits.
    let report0 = sim.report();
    let etcd_names =
        ["etcd_debugging_mvcc_events_total", "etcd_network_client_grpc_sent_bytes_total"];
    let etcd0 = etcd_counters(&fleet, &etcd_names);
    let real0: Vec<_> = (0..3).map(|i| host_counts(&fleet, i)).collect();
    let t_edits = Instant::now();
    let mut fleet_ms = Vec::new();
    let mut median_host_ms = Vec::new();
    let mut ack_ms = Vec::new();
    let mut rules: HashMap<usize, String> = HashMap::new();
    let edits_deadline = Instant::now() + budget;
    for e in 0..scale.edits {
        if Instant::now() >= edits_deadline {
            eprintln!(
                "control/hosts: the edits' budget ({} s) is spent after {e} of {} edits",
                scale.budget_s, scale.edits
            );
            break;
        }
        let u = 1 + e % (universes.len() - 1).max(1);
        let (_, web, clients) = &universes[u.min(universes.len() - 1)];
        let via = e % API_HOSTS;
        let t0 = Instant::now();
        let r = match rules.remove(&u) {
            Some(rule) => fleet.api(via).request(
                "DELETE",
                &format!("/v1/security-groups/{web}/rules/{rule}"),
                None,
                EDIT_TIMEOUT,
            )?,
            None => {
                let port = 8000 + e as u16;
                let r = fleet.api(via).request(
                    "POST",
                    &format!("/v1/security-groups/{web}/rules"),
                    Some(&json!({"direction": "ingress", "protocol": "tcp", "from_port": port, "to_port": port, "group": clients})),
                    EDIT_TIMEOUT,
                )?;
                if r.status == 201 {
                    rules.insert(u, id(&r.json())?);
                }
                r
            }
        };
        if !(200..300).contains(&r.status) {
            bail!("edit {e} failed: {} {}", r.status, r.body);
        }
        ack_ms.push(t0.elapsed().as_secs_f64() * 1e3);
        let revision = r.revision().context("no revision")?;
        let last = observer.wait_all(&names, revision, EDIT_TIMEOUT)?;
        fleet_ms.push((last - t0).as_secs_f64() * 1e3);
        let per_host: Vec<f64> = names
            .iter()
            .filter_map(|n| observer.reached(n, revision))
            .map(|t| t.saturating_duration_since(t0).as_secs_f64() * 1e3)
            .collect();
        median_host_ms.push(percentile(per_host, 50.0));
        eprintln!(
            "control/hosts: edit {e}: acknowledged in {:.0} ms, realized on all {total_hosts} hosts in {:.0} ms",
            ack_ms[e], fleet_ms[e]
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let edits_s = t_edits.elapsed().as_secs_f64();
    let etcd1 = etcd_counters(&fleet, &etcd_names);
    let real1: Vec<_> = (0..3).map(|i| host_counts(&fleet, i)).collect();
    let report1 = sim.report();
    let (c0, c1) = (sim_counts(&report0), sim_counts(&report1));
    ensure!(!fleet_ms.is_empty(), "no edit was timed within the budget of {} s", scale.budget_s);
    let edits = fleet_ms.len() as f64;
    let mut sim_bytes = Vec::new();
    let mut sim_events = 0.0;
    let mut entries = Vec::new();
    for (name, (b1, e1, m)) in &c1 {
        let (b0, e0, _) = c0.get(name).copied().unwrap_or_default();
        sim_bytes.push((b1 - b0) / edits);
        sim_events += e1 - e0;
        entries.push(*m);
    }
    let real_bytes: Vec<f64> = real0.iter().zip(&real1).map(|(a, b)| (b.0 - a.0) / edits).collect();
    for (i, (r, kib)) in real1.iter().zip(&real_bytes).enumerate() {
        eprintln!(
            "control/hosts: real host {} ({}): {:.1} KiB received per edit, {} map entries, {:.1} MiB resident",
            fleet.host(i).name(),
            if i < API_HOSTS { "API" } else { "no API" },
            kib / 1024.0,
            r.2,
            r.3 / 1048576.0
        );
    }
    let real_events: f64 = real0.iter().zip(&real1).map(|(a, b)| b.1 - a.1).sum();
    let etcd_events_per_s = (etcd1["etcd_debugging_mvcc_events_total"]
        - etcd0["etcd_debugging_mvcc_events_total"])
        / edits_s;
    let etcd_sent_per_s = (etcd1["etcd_network_client_grpc_sent_bytes_total"]
        - etcd0["etcd_network_client_grpc_sent_bytes_total"])
        / edits_s;
    let rss_end = report1["rss_bytes"].as_f64().unwrap_or(0.0);
    let mem_per_host_kib = (rss_end - rss_before) / n as f64 / 1024.0;
    let mem_joined_kib = (rss_joined - rss_before) / n as f64 / 1024.0;

    let config = json!({
        "real_hosts": 3, "real_hosts_serving_the_api": API_HOSTS, "simulated_hosts": n, "etcd": "three members, one process each, on the underlay bridge",
        "universes": scale.universes, "endpoints_per_simulated_host": scale.endpoints_per_host,
        "endpoints_placed": placed, "endpoints_wanted": wanted, "placement_failures": failed.len(),
        "placement_s": place_s, "join_s": join_s, "edits": fleet_ms.len(), "edits_wanted": scale.edits,
        "budget_s_per_phase": scale.budget_s,
        "etcd_clients_shared_by_simulated_hosts": sim.summary().map(|s| s["connections"].clone()),
        "build": if cfg!(debug_assertions) { "debug" } else { "release" },
    });
    let with = |extra: Value| {
        let mut c = config.clone();
        if let (Some(c), Some(e)) = (c.as_object_mut(), extra.as_object()) {
            c.extend(e.clone());
        }
        c
    };
    let p99 = percentile(fleet_ms.clone(), 99.0);
    out.push(
        BenchRecord::new(
            &format!("control_hosts_{total_hosts}_edit_to_realized_p99"),
            p99,
            Unit::Ms,
            None,
            with(json!({"samples_ms": fleet_ms, "statistic": "p99 over the edits of the time until the last host reported the edit realized"})),
        )
        .with_target("< 1000 ms", p99 < 1000.0),
    );
    out.push(BenchRecord::new(
        &format!("control_hosts_{total_hosts}_edit_to_realized_p50"),
        percentile(fleet_ms.clone(), 50.0),
        Unit::Ms,
        None,
        with(json!({"samples_ms": fleet_ms, "median_host_ms": median_host_ms, "acknowledged_ms": ack_ms})),
    ));
    out.push(BenchRecord::new(
        &format!("control_hosts_{total_hosts}_etcd_watch_events_per_s"),
        etcd_events_per_s,
        Unit::EventsPerS,
        None,
        with(json!({"source": "etcd_debugging_mvcc_events_total, summed over the members, during the edits",
            "edits_s": edits_s, "events_per_edit": etcd_events_per_s * edits_s / edits,
            "hosts_counted_events": sim_events + real_events,
            "etcd_grpc_sent_bytes_per_s": etcd_sent_per_s})),
    ));
    out.push(BenchRecord::new(
        &format!("control_hosts_{total_hosts}_bytes_per_host_per_edit"),
        percentile(sim_bytes.clone(), 50.0) / 1024.0,
        Unit::KiB,
        None,
        with(json!({"statistic": "median over the simulated hosts of watch bytes received during the edits / edits",
            "simulated_max_kib": percentile(sim_bytes.clone(), 100.0) / 1024.0,
            "simulated_p99_kib": percentile(sim_bytes, 99.0) / 1024.0,
            "real_hosts_kib": real_bytes.iter().map(|b| b / 1024.0).collect::<Vec<_>>(),
            "real_hosts_map_entries": real1.iter().map(|r| r.2).collect::<Vec<_>>(),
            "real_hosts_rss_bytes": real1.iter().map(|r| r.3).collect::<Vec<_>>(),
            "real_hosts_note": "the third real host serves no API: it follows only the universes with an endpoint on it",
            "map_entries_per_simulated_host_median": percentile(entries.clone(), 50.0),
            "map_entries_per_simulated_host_max": percentile(entries, 100.0)})),
    ));
    out.push(BenchRecord::new(
        &format!("control_hosts_{total_hosts}_memory_per_simulated_host"),
        mem_per_host_kib,
        Unit::KiB,
        None,
        with(json!({"method": "RSS of the simulation after placing the state minus before its first host, / simulated hosts",
            "rss_before_bytes": rss_before, "rss_bytes": rss_end,
            "just_joined_kib_per_host": mem_joined_kib})),
    ));
    out.push(BenchRecord::new(
        &format!("control_hosts_{total_hosts}_join"),
        join_s * 1e3,
        Unit::Ms,
        None,
        with(json!({"what": "from starting the simulation until every simulated host is listed healthy"})),
    ));
    eprintln!("control/hosts: done in {:.1} s", started.elapsed().as_secs_f64());
    drop(workloads);
    drop(observer);
    drop(sim);
    Ok(())
}
