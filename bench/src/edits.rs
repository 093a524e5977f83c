//! Control tier, part edits: the control plane under load, on real hosts.
//!
//! - Throughput and latency under contention: three hosts (real `versed`, real dataplanes) on
//!   the fleet's etcd, clients spread round-robin over the three APIs, each client editing one
//!   group of one of 20 universes (add a TCP rule, then delete it; every request with its own
//!   `Idempotency-Key`), for a fixed time, at 50 and at 200 concurrent clients. Reported:
//!   acknowledged edits per second, p50 and p99 latency of an acknowledged edit (an API
//!   mutation returns once every healthy host has realized it, S13), failures, and how often a
//!   host showed unhealthy (liveness lapses) while it ran. The same on one host with the
//!   embedded store. Targets: >= 500 edits/s fleet-wide, p99 < 100 ms at 50 clients.
//! - An edit with a full fleet against the same edit on an empty one: one client adds and
//!   deletes a rule of one group of one universe (endpoints on the three hosts), sequentially,
//!   on the fleet as set up, then after 100,000 rules and 10,000 endpoints were loaded into 200
//!   other universes (endpoints on 100 hosts without an underlay address, so that no real host
//!   plumbs them). Target: the full fleet's median within 1.2x of the empty one's. Both sides
//!   are timed alike: once every host has realized the whole state (an edit acknowledged by
//!   all of them) and etcd's history is compacted and its database defragmented, so that
//!   nothing left over from setting up (hosts catching up, history of the load) is timed.
//!   200 edits a side (`--edits-sequential`); `--edits-sequential-only` runs this alone.
//! - etcd's database per 10,000 rules: `dbSize` after compacting and defragmenting, right
//!   before and after loading the 100,000 rules.
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ::tests::fleet::Fleet;
use ::tests::{enter_netns, Host, Workload};
use anyhow::{anyhow, bail, Context, Result};
use serde_json::{json, Value};

use crate::profile::{Cpu, Phases};
use crate::results::{BenchRecord, Unit};

const UNIVERSES: usize = 20;
const GROUPS_PER_UNIVERSE: usize = 2;
const CLIENTS: [usize; 2] = [50, 200];
const RUN: Duration = Duration::from_secs(12);
/// The bulk of the full fleet.
const BULK_UNIVERSES: usize = 200;
const BULK_GROUPS: usize = 5;
const BULK_RULES_PER_GROUP: usize = 100;
const BULK_ENDPOINTS_PER_UNIVERSE: usize = 50;
const BULK_HOSTS: usize = 100;
/// The hosts' settings: every client uses the admin token, so the per-principal rate limit of
/// writes (50/s by default, `[api] write_rate`) is lifted, and the connection cap with it:
/// this measures the control plane, not the limits.
const CONFIG: &str = "[api]\nwrite_rate = 1000000\nwrite_burst = 1000000\nread_rate = 1000000\n\
                      read_burst = 1000000\nmax_connections = 4096\n";

/// Where a client sends its requests: a host's API, from inside its namespace.
#[derive(Clone)]
struct Target {
    netns: String,
    port: u16,
    token: Option<String>,
}

impl Target {
    fn of(host: &Host) -> Result<Target> {
        let api = &host.api;
        let port = api
            .url()
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| anyhow!("no port in {}", api.url()))?;
        Ok(Target {
            netns: host.netns().name().to_owned(),
            port,
            token: api.token().map(str::to_owned),
        })
    }
}

/// A keep-alive HTTP/1.1 connection, opened from inside the target's namespace.
struct Conn {
    target: Target,
    stream: Option<TcpStream>,
}

impl Conn {
    fn new(target: Target) -> Conn {
        Conn { target, stream: None }
    }

    fn connect(&mut self) -> Result<&mut TcpStream> {
        if self.stream.is_none() {
            let addr = SocketAddr::from(([127, 0, 0, 1], self.target.port));
            let s = enter_netns(&self.target.netns, || {
                TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            })?;
            s.set_read_timeout(Some(Duration::from_secs(30)))?;
            s.set_nodelay(true)?;
            self.stream = Some(s);
        }
        self.stream.as_mut().ok_or_else(|| anyhow!("no connection"))
    }

    /// One request; on a broken connection, one retry on a new one (safe: every mutation
    /// carries its idempotency key).
    fn request(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        key: &str,
    ) -> Result<(u16, Value)> {
        match self.once(method, path, body, key) {
            Ok(r) => Ok(r),
            Err(_) => {
                self.stream = None;
                self.once(method, path, body, key)
            }
        }
    }

    /// [`Conn::request`], sent again with the same idempotency key while the answer is a 503
    /// (etcd unreachable for a moment): for setting up, not for the measured load.
    fn request_until_done(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        key: &str,
    ) -> Result<(u16, Value)> {
        for _ in 0..10 {
            match self.request(method, path, body, key)? {
                (503, _) => std::thread::sleep(Duration::from_millis(500)),
                answer => return Ok(answer),
            }
        }
        self.request(method, path, body, key)
    }

    fn once(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        key: &str,
    ) -> Result<(u16, Value)> {
        let (status, body) = self.raw(method, path, body, key)?;
        let value = if body.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&body).unwrap_or(Value::Null)
        };
        Ok((status, value))
    }

    /// A GET whose answer is text (`/metrics`).
    fn text(&mut self, path: &str) -> Result<String> {
        let (status, body) = match self.raw("GET", path, None, "none") {
            Ok(r) => r,
            Err(_) => {
                self.stream = None;
                self.raw("GET", path, None, "none")?
            }
        };
        anyhow::ensure!(status == 200, "GET {path}: {status}");
        Ok(String::from_utf8_lossy(&body).into_owned())
    }

    fn raw(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        key: &str,
    ) -> Result<(u16, Vec<u8>)> {
        let payload = body.map(|b| b.to_string()).unwrap_or_default();
        let mut req =
            format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nIdempotency-Key: {key}\r\n");
        if let Some(t) = &self.target.token {
            req.push_str(&format!("Authorization: Bearer {t}\r\n"));
        }
        if body.is_some() {
            req.push_str("Content-Type: application/json\r\n");
        }
        req.push_str(&format!("Content-Length: {}\r\n\r\n{payload}", payload.len()));
        let stream = self.connect()?;
        stream.write_all(req.as_bytes())?;
        let mut buf = Vec::with_capacity(4096);
        let mut chunk = [0u8; 8192];
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i;
            }
            let n = stream.read(&mut chunk)?;
            if n == 0 {
                bail!("connection closed");
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = std::str::from_utf8(&buf[..head_end])?.to_owned();
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| anyhow!("bad status line"))?;
        let len: usize = head
            .lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.trim().parse().ok())
            .unwrap_or(0);
        let mut body = buf[head_end + 4..].to_vec();
        while body.len() < len {
            let n = stream.read(&mut chunk)?;
            if n == 0 {
                bail!("connection closed in a body");
            }
            body.extend_from_slice(&chunk[..n]);
        }
        if head.to_ascii_lowercase().contains("connection: close") {
            self.stream = None;
        }
        body.truncate(len);
        Ok((status, body))
    }
}

fn key() -> String {
    format!("bench-{:032x}", rand_u128())
}

fn rand_u128() -> u128 {
    use std::hash::{BuildHasher, Hasher};
    let s = std::collections::hash_map::RandomState::new();
    let mut h = s.build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    let a = h.finish();
    let mut h = s.build_hasher();
    h.write_u64(a ^ 0x9E37_79B9_7F4A_7C15);
    u128::from(a) << 64 | u128::from(h.finish())
}

/// What one load run saw.
struct Load {
    acked: usize,
    failed: BTreeMap<String, usize>,
    latency_ms: Vec<f64>,
    seconds: f64,
    health_samples: usize,
    unhealthy_samples: usize,
}

/// `clients` clients over `targets` (round-robin), each editing one of `groups` (by client
/// number) for `run`.
fn load(targets: &[Target], groups: &[String], clients: usize, run: Duration) -> Result<Load> {
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(AtomicUsize::new(0));
    let failed: Arc<Mutex<BTreeMap<String, usize>>> = Arc::default();
    let latency: Arc<Mutex<Vec<f64>>> = Arc::default();
    let start = Instant::now();
    let mut threads = Vec::new();
    for c in 0..clients {
        let target = targets[c % targets.len()].clone();
        let group = groups[c % groups.len()].clone();
        let (stop, acked, failed, latency) =
            (stop.clone(), acked.clone(), failed.clone(), latency.clone());
        threads.push(std::thread::spawn(move || {
            let mut conn = Conn::new(target);
            let mut mine = Vec::new();
            let rules = format!("/v1/security-groups/{group}/rules");
            let mut k = 0u16;
            let fail = |what: String| {
                *failed.lock().unwrap_or_else(|p| p.into_inner()).entry(what).or_default() += 1
            };
            while !stop.load(Ordering::Relaxed) {
                let port = 1 + u16::try_from(c).unwrap_or(0) * 300 + k % 300;
                k = k.wrapping_add(1);
                let rule = json!({"direction": "ingress", "protocol": "tcp", "from_port": port,
                                  "to_port": port, "cidr": "10.99.0.0/16"});
                let t = Instant::now();
                let id = match conn.request("POST", &rules, Some(&rule), &key()) {
                    Ok((201, v)) => {
                        mine.push(t.elapsed().as_secs_f64() * 1e3);
                        acked.fetch_add(1, Ordering::Relaxed);
                        v["id"].as_str().map(str::to_owned)
                    }
                    Ok((s, v)) => {
                        fail(format!("{s} {}", v["error"]["code"].as_str().unwrap_or("")));
                        None
                    }
                    Err(e) => {
                        fail(format!("io: {e}"));
                        None
                    }
                };
                let Some(id) = id else { continue };
                let t = Instant::now();
                match conn.request("DELETE", &format!("{rules}/{id}"), None, &key()) {
                    Ok((204, _)) => {
                        mine.push(t.elapsed().as_secs_f64() * 1e3);
                        acked.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok((s, v)) => {
                        fail(format!("{s} {}", v["error"]["code"].as_str().unwrap_or("")))
                    }
                    Err(e) => fail(format!("io: {e}")),
                }
            }
            latency.lock().unwrap_or_else(|p| p.into_inner()).extend(mine);
        }));
    }
    // Liveness: every host as host 0 sees it, four times a second.
    let watcher = {
        let (stop, target) = (stop.clone(), targets[0].clone());
        std::thread::spawn(move || {
            let mut conn = Conn::new(target);
            let (mut samples, mut unhealthy) = (0, 0);
            while !stop.load(Ordering::Relaxed) {
                if let Ok((200, Value::Array(hosts))) =
                    conn.request("GET", "/v1/hosts", None, "none")
                {
                    samples += 1;
                    if hosts.iter().any(|h| h["healthy"] != Value::Bool(true)) {
                        unhealthy += 1;
                    }
                }
                std::thread::sleep(Duration::from_millis(250));
            }
            (samples, unhealthy)
        })
    };
    std::thread::sleep(run);
    stop.store(true, Ordering::Relaxed);
    let acked_at_stop = acked.load(Ordering::Relaxed);
    let seconds = start.elapsed().as_secs_f64();
    for t in threads {
        t.join().map_err(|_| anyhow!("a client panicked"))?;
    }
    let (health_samples, unhealthy_samples) =
        watcher.join().map_err(|_| anyhow!("the watcher panicked"))?;
    let failed = failed.lock().unwrap_or_else(|p| p.into_inner()).clone();
    let latency_ms = latency.lock().unwrap_or_else(|p| p.into_inner()).clone();
    Ok(Load {
        acked: acked_at_stop,
        failed,
        latency_ms,
        seconds,
        health_samples,
        unhealthy_samples,
    })
}

/// The machine's one-minute load average (`/proc/loadavg`), NaN if unreadable.
fn load_average() -> f64 {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|x| x.parse().ok()))
        .unwrap_or(f64::NAN)
}

fn percentile(v: &[f64], p: f64) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return f64::NAN;
    }
    let i = ((v.len() as f64 - 1.0) * p).round() as usize;
    v[i.min(v.len() - 1)]
}

/// One of the first three universes, its last group, and the second octet of its CIDR.
type Placed = (String, String, usize);

/// Universes and groups of the throughput runs; returns the groups edited, and for the first
/// three universes (which get an endpoint on every host) the universe and its last group.
fn setup(api_target: &Target) -> Result<(Vec<String>, Vec<Placed>)> {
    let mut conn = Conn::new(api_target.clone());
    let mut groups = Vec::new();
    let mut placed = Vec::new();
    for u in 0..UNIVERSES {
        let (s, uni) = conn.request_until_done(
            "POST",
            "/v1/universes",
            Some(&json!({"name": format!("load-{u}"), "cidr": format!("10.{}.0.0/16", 100 + u)})),
            &key(),
        )?;
        anyhow::ensure!(s == 201, "create universe: {s} {uni}");
        let uni = uni["id"].as_str().context("universe id")?.to_owned();
        for g in 0..GROUPS_PER_UNIVERSE {
            let (s, grp) = conn.request_until_done(
                "POST",
                "/v1/security-groups",
                Some(&json!({"universe": uni, "name": format!("g{g}")})),
                &key(),
            )?;
            anyhow::ensure!(s == 201, "create group: {s} {grp}");
            groups.push(grp["id"].as_str().context("group id")?.to_owned());
        }
        if u < 3 {
            placed.push((uni, groups[groups.len() - 1].clone(), 100 + u));
        }
    }
    Ok((groups, placed))
}

/// etcd's counters read around a load run, summed over the members: Raft entries committed
/// (each member counts every one), transactions answered (each answered by one member), events
/// sent to watchers.
const ETCD_COUNTERS: [&str; 3] = [
    "etcd_server_proposals_committed_total",
    "grpc_server_handled_total{grpc_code=\"OK\",grpc_method=\"Txn\",grpc_service=\"etcdserverpb.KV\",grpc_type=\"unary\"}",
    "etcd_debugging_mvcc_events_total",
];

fn load_records(
    out: &mut Vec<BenchRecord>,
    store: &str,
    targets: &[Target],
    groups: &[String],
    fleet: Option<&Fleet>,
) -> Result<()> {
    for clients in CLIENTS {
        let etcd_before = fleet.map(|f| crate::hosts::etcd_counters(f, &ETCD_COUNTERS));
        let phases_before = scrape(targets)?;
        let load_before = load_average();
        let cpu_before = Cpu::sample();
        let l = load(targets, groups, clients, RUN)?;
        let cpu = Cpu::sample().cores_since(&cpu_before);
        let load_after = load_average();
        let phases = phases_since(targets, &phases_before)?;
        let etcd = fleet.zip(etcd_before).map(|(f, before)| {
            let after = crate::hosts::etcd_counters(f, &ETCD_COUNTERS);
            let delta = |i: usize| after[ETCD_COUNTERS[i]] - before[ETCD_COUNTERS[i]];
            let members = f.etcd().endpoints().len().max(1) as f64;
            let acked = l.acked.max(1) as f64;
            json!({
                "raft_entries_per_acknowledged_edit": delta(0) / members / acked,
                "transactions_per_acknowledged_edit": delta(1) / acked,
                "watch_events_per_acknowledged_edit": delta(2) / acked,
            })
        });
        if let Some(etcd) = &etcd {
            eprintln!("bench_edits: {store}, {clients} clients, etcd: {etcd}");
        }
        let rate = l.acked as f64 / l.seconds;
        let (p50, p99) = (percentile(&l.latency_ms, 0.5), percentile(&l.latency_ms, 0.99));
        let failures: usize = l.failed.values().sum();
        eprintln!(
            "bench_edits: {store}, {clients} clients: {rate:.0} edits/s, p50 {p50:.1} ms, p99 {p99:.1} ms, \
             {failures} failures {:?}, unhealthy {}/{} samples",
            l.failed, l.unhealthy_samples, l.health_samples
        );
        eprintln!("bench_edits: {store}, {clients} clients, phases (all hosts): {}", phases.line());
        eprintln!(
            "bench_edits: {store}, {clients} clients, CPU cores: {cpu}; load average {load_before} at the start, {load_after} at the end"
        );
        let config = json!({
            "phases_all_hosts": phases.summary(), "cpu_cores": cpu,
            "load_average_1m": {"start": load_before, "end": load_after}, "etcd": etcd,
            "store": store, "hosts": targets.len(), "clients": clients,
            "clients_per_host": "round-robin over the hosts' APIs",
            "universes": UNIVERSES, "groups_per_universe": GROUPS_PER_UNIVERSE,
            "edits": "each client: POST a TCP rule to its group, then DELETE it; Idempotency-Key on each",
            "endpoints": "one per host in each of the first 3 universes",
            "seconds": l.seconds, "acknowledged": l.acked, "failures": l.failed,
            "liveness_samples": l.health_samples, "samples_with_an_unhealthy_host": l.unhealthy_samples,
            "build": "release", "api_limits": "per-principal rate limits lifted (one admin token for every client)",
        });
        let tag = format!("{store}_c{clients}");
        out.push(
            BenchRecord::new(
                &format!("control_edits_per_s_{tag}"),
                rate,
                Unit::EditsPerSecond,
                None,
                config.clone(),
            )
            .with_target(">= 500 edits/s", rate >= 500.0),
        );
        out.push(BenchRecord::new(
            &format!("control_edit_p50_ms_{tag}"),
            p50,
            Unit::Ms,
            None,
            config.clone(),
        ));
        let p99_record = BenchRecord::new(
            &format!("control_edit_p99_ms_{tag}"),
            p99,
            Unit::Ms,
            None,
            config.clone(),
        );
        out.push(if clients == 50 {
            p99_record.with_target("< 100 ms", p99 < 100.0)
        } else {
            p99_record
        });
        out.push(
            BenchRecord::new(
                &format!("control_edit_failures_{tag}"),
                failures as f64,
                Unit::Count,
                None,
                config.clone(),
            )
            .with_target("0", failures == 0),
        );
        out.push(
            BenchRecord::new(
                &format!("control_liveness_lapses_{tag}"),
                l.unhealthy_samples as f64,
                Unit::Count,
                None,
                config,
            )
            .with_target("0", l.unhealthy_samples == 0),
        );
    }
    Ok(())
}

/// Every host's phase histograms (`/metrics`).
fn scrape(targets: &[Target]) -> Result<Vec<Phases>> {
    targets.iter().map(|t| Ok(Phases::parse(&Conn::new(t.clone()).text("/metrics")?))).collect()
}

/// What every host's phase histograms gained since `before`, summed over the hosts.
fn phases_since(targets: &[Target], before: &[Phases]) -> Result<Phases> {
    let mut sum = Phases::default();
    for (now, before) in scrape(targets)?.iter().zip(before) {
        now.add_delta(before, &mut sum);
    }
    Ok(sum)
}

/// Sequential edits of one group: add a rule, delete it; the latency of each, in ms.
fn sequential(target: &Target, group: &str, edits: usize) -> Result<Vec<f64>> {
    let mut conn = Conn::new(target.clone());
    let mut ms = Vec::new();
    for i in 0..edits / 2 {
        ms.extend(add_and_delete(&mut conn, group, i)?);
    }
    Ok(ms)
}

/// Edits a side in each turn of [`paired`]: a side's processes (three etcd members, three
/// hosts) run several edits in a row, as they would alone, and both sides still meet the same
/// drift of the machine's load (a turn is about half a second).
const TURN: usize = 50;

/// [`sequential`] on two fleets at once, [`TURN`] edits (adds and their deletes) on each in
/// turn, which side goes first swapped every round, so that both sides meet the same minutes
/// of the machine's load: the latencies on `a` and on `b`, in ms.
fn paired(a: (&Target, &str), b: (&Target, &str), edits: usize) -> Result<(Vec<f64>, Vec<f64>)> {
    let (mut conn_a, mut conn_b) = (Conn::new(a.0.clone()), Conn::new(b.0.clone()));
    let (mut on_a, mut on_b) = (Vec::new(), Vec::new());
    let mut i = 0;
    let mut round = 0;
    while i < edits / 2 {
        let n = (TURN / 2).min(edits / 2 - i);
        for side in if round % 2 == 0 { [true, false] } else { [false, true] } {
            let ((conn, group), out) = if side {
                ((&mut conn_a, a.1), &mut on_a)
            } else {
                ((&mut conn_b, b.1), &mut on_b)
            };
            for j in i..i + n {
                out.extend(add_and_delete(conn, group, j)?);
            }
        }
        i += n;
        round += 1;
    }
    Ok((on_a, on_b))
}

/// Adds the `i`-th rule (TCP port 20,000 + `i`) to `group` and deletes it: the latency of
/// each, in ms.
fn add_and_delete(conn: &mut Conn, group: &str, i: usize) -> Result<[f64; 2]> {
    let rules = format!("/v1/security-groups/{group}/rules");
    let port = 20_000 + u16::try_from(i).unwrap_or(0);
    let rule = json!({"direction": "ingress", "protocol": "tcp", "from_port": port, "to_port": port, "cidr": "10.98.0.0/16"});
    let t = Instant::now();
    let (s, v) = conn.request_until_done("POST", &rules, Some(&rule), &key())?;
    anyhow::ensure!(s == 201, "add rule: {s} {v}");
    let add = t.elapsed().as_secs_f64() * 1e3;
    let id = v["id"].as_str().context("rule id")?;
    let t = Instant::now();
    let (s, v) = conn.request_until_done("DELETE", &format!("{rules}/{id}"), None, &key())?;
    anyhow::ensure!(s == 204, "delete rule: {s} {v}");
    Ok([add, t.elapsed().as_secs_f64() * 1e3])
}

/// Waits until every host has realized the state (an edit through `target`, which is
/// acknowledged once every healthy host has realized it: every revision before it too), then
/// compacts and defragments etcd ([`db_size`], whose size it returns).
fn settle(fleet: &Fleet, target: &Target) -> Result<f64> {
    let start = Instant::now();
    let mut conn = Conn::new(target.clone());
    let (s, v) = conn.request_until_done(
        "POST",
        "/v1/universes",
        Some(&json!({"name": format!("settle-{:x}", rand_u128() as u32), "cidr": "10.97.0.0/16"})),
        &key(),
    )?;
    anyhow::ensure!(s == 201, "settle: {s} {v}");
    let id = v["id"].as_str().context("universe id")?;
    let (s, v) = conn.request_until_done("DELETE", &format!("/v1/universes/{id}"), None, &key())?;
    anyhow::ensure!(s == 204, "settle: {s} {v}");
    let realized = start.elapsed();
    let size = db_size(fleet)?;
    eprintln!(
        "bench_edits: settled: every host realized the state in {realized:.2?}, etcd compacted and defragmented in {:.2?}",
        start.elapsed() - realized
    );
    Ok(size)
}

/// etcd's `dbSize` after compacting to the current revision and defragmenting every member, in
/// bytes (the first member's). A compaction is the cluster's, but a defragmentation only the
/// members named: named alone, the first one was defragmented and the other two kept every
/// page the compaction freed.
fn db_size(fleet: &Fleet) -> Result<f64> {
    let all: Vec<String> = fleet.etcd().endpoints().iter().map(|e| e.to_string()).collect();
    let all = all.join(",");
    let etcdctl = |args: &[&str]| -> Result<String> {
        let mut with = vec!["--endpoints", all.as_str()];
        with.extend_from_slice(args);
        let out = fleet.underlay().exec("etcdctl", &with);
        anyhow::ensure!(
            out.status.success(),
            "etcdctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    let status: Value = serde_json::from_str(&etcdctl(&["endpoint", "status", "-w", "json"])?)?;
    let rev = status[0]["Status"]["header"]["revision"].as_i64().context("revision")?;
    etcdctl(&["compact", &rev.to_string(), "--physical"])?;
    etcdctl(&["defrag"])?;
    let status: Value = serde_json::from_str(&etcdctl(&["endpoint", "status", "-w", "json"])?)?;
    let sizes: Vec<f64> = (0..3).filter_map(|i| status[i]["Status"]["dbSize"].as_f64()).collect();
    eprintln!("bench_edits: etcd members' dbSize after compacting and defragmenting: {sizes:?} B");
    sizes.first().copied().context("dbSize")
}

/// Loads the bulk of the full fleet straight into the store (the API would take minutes):
/// `BULK_UNIVERSES` universes of `BULK_GROUPS` groups of `BULK_RULES_PER_GROUP` rules, then
/// `BULK_ENDPOINTS_PER_UNIVERSE` endpoints each on `BULK_HOSTS` hosts without an underlay.
fn bulk(fleet: &Fleet, endpoints: bool) -> Result<usize> {
    use verse::model::{CreateEndpoint, CreateGroup, CreateRule, CreateUniverse};
    use verse::store::{EtcdOptions, Store};
    let ep = fleet.etcd().endpoint().to_string();
    enter_netns(fleet.underlay().name(), move || -> Result<usize> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(async move {
            let store = Store::open_etcd(EtcdOptions::new(vec![ep])).await?;
            let mut made = 0;
            let snapshot = store.snapshot();
            let existing: Vec<String> = snapshot
                .universes
                .values()
                .filter(|u| u.name.starts_with("bulk-"))
                .map(|u| u.id.clone())
                .collect();
            let universes = if existing.len() == BULK_UNIVERSES {
                existing
            } else {
                let mut ids = Vec::new();
                for u in 0..BULK_UNIVERSES {
                    let (uni, _) = store
                        .edit(|s| {
                            s.create_universe(CreateUniverse {
                                name: format!("bulk-{u}"),
                                cidr: Some("10.0.0.0/8".into()),
                                cidrs: None,
                                ipv6_cidrs: None,
                            })
                        })
                        .await?;
                    let mut groups = Vec::new();
                    for g in 0..BULK_GROUPS {
                        let id = uni.id.clone();
                        let (grp, _) = store
                            .edit(move |s| {
                                s.create_group(CreateGroup {
                                    universe: id.clone(),
                                    name: format!("g{g}"),
                                    description: None,
                                })
                            })
                            .await?;
                        groups.push(grp.id);
                    }
                    for (gi, g) in groups.iter().enumerate() {
                        let g = g.clone();
                        store
                            .edit(move |s| {
                                for r in 0..BULK_RULES_PER_GROUP {
                                    let port = i64::try_from(1000 + r).unwrap_or(1);
                                    s.add_rule(
                                        &g,
                                        CreateRule {
                                            direction: if r % 3 == 0 {
                                                "egress"
                                            } else {
                                                "ingress"
                                            }
                                            .into(),
                                            protocol: json!("tcp"),
                                            from_port: Some(port),
                                            to_port: Some(port + i64::try_from(r % 4).unwrap_or(0)),
                                            cidr: Some(format!("10.{}.{}.0/24", gi, r % 250)),
                                            ..Default::default()
                                        },
                                    )?;
                                }
                                Ok(())
                            })
                            .await?;
                        made += BULK_RULES_PER_GROUP;
                    }
                    ids.push(uni.id);
                }
                ids
            };
            if endpoints {
                for (u, uni) in universes.iter().enumerate() {
                    let groups: Vec<String> = store
                        .snapshot()
                        .groups
                        .values()
                        .filter(|g| &g.universe == uni && g.name != "default")
                        .map(|g| g.id.clone())
                        .collect();
                    for chunk in 0..BULK_ENDPOINTS_PER_UNIVERSE / 10 {
                        let (uni, groups) = (uni.clone(), groups.clone());
                        store
                            .edit(move |s| {
                                for e in 0..10 {
                                    let n = chunk * 10 + e;
                                    let pick = vec![
                                        groups[n % groups.len()].clone(),
                                        groups[(n + 1) % groups.len()].clone(),
                                    ];
                                    s.create_endpoint(
                                        CreateEndpoint {
                                            universe: uni.clone(),
                                            host: Some(format!(
                                                "bulk-host-{}",
                                                (u * 7 + n) % BULK_HOSTS
                                            )),
                                            netns: format!("bulk-{u}-{n}"),
                                            ip: format!(
                                                "10.{}.{}.{}",
                                                u % 200,
                                                n / 200,
                                                2 + n % 200
                                            ),
                                            security_groups: Some(pick),
                                            // 100 endpoints a host: within its conntrack
                                            // capacity (the default budget fits 64).
                                            conntrack_budget: Some(1024),
                                            flow_logs: None,
                                            ipv6: None,
                                        },
                                        "bulk",
                                    )?;
                                }
                                Ok(())
                            })
                            .await?;
                    }
                }
            }
            Ok(made)
        })
    })
}

/// What the compiler gives `hosts` from the fleet's desired state as etcd holds it: entries of
/// every map (the reconciler writes exactly these; every endpoint on the host counted as
/// plumbed) and the time one compile took, in ms.
fn host_maps(fleet: &Fleet, hosts: &[String]) -> Result<Vec<(String, usize, f64, Value)>> {
    use verse::store::{EtcdOptions, Store};
    let ep = fleet.etcd().endpoint().to_string();
    let hosts = hosts.to_vec();
    enter_netns(fleet.underlay().name(), move || -> Result<Vec<(String, usize, f64, Value)>> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
        rt.block_on(async move {
            let store = Store::open_etcd(EtcdOptions::new(vec![ep])).await?;
            let state = store.snapshot();
            let mut out = Vec::new();
            for host in hosts {
                let t = Instant::now();
                let d = verse::compile::compile(
                    &state,
                    &host,
                    &|_| Some(1),
                    &mut verse::compile::Ids::default(),
                )
                .map_err(|e| anyhow!("compile for {host}: {e:?}"))?;
                let ms = t.elapsed().as_secs_f64() * 1e3;
                let entries = d.endpoints.len()
                    + d.routes.len()
                    + d.cidrs.len()
                    + d.policy.len()
                    + d.hosts.len()
                    + d.vnis.len();
                let per_map = json!({"endpoints": d.endpoints.len(), "routes": d.routes.len(),
                    "cidrs": d.cidrs.len(), "policy": d.policy.len(), "hosts": d.hosts.len(),
                    "vnis": d.vnis.len()});
                out.push((host, entries, ms, per_map));
            }
            Ok(out)
        })
    })
}

/// What of the part to run (all of it by default).
pub struct Options {
    /// Only the runs under load.
    pub load_only: bool,
    /// Only the one edit on an empty and a full fleet (and etcd's database per 10,000 rules):
    /// no runs under load.
    pub sequential_only: bool,
    /// Edits of the sequential measurement, on each side (half adds, half deletes).
    pub sequential: usize,
    /// The three hosts on etcd.
    pub etcd: bool,
    /// The one host on the embedded store.
    pub embedded: bool,
}

pub fn run(out: &mut Vec<BenchRecord>, options: &Options) -> Result<()> {
    if options.etcd {
        run_etcd(out, options)?;
    }
    if options.embedded {
        run_embedded(out)?;
    }
    Ok(())
}

/// A fleet of three hosts on a three-member etcd, set up ([`setup`]), with endpoints of the
/// first universes on every host (edits there reach real dataplanes).
struct Started {
    fleet: Fleet,
    /// Each host's API.
    targets: Vec<Target>,
    /// The groups [`setup`] made.
    groups: Vec<String>,
    /// The endpoints' workloads, which must outlive the measurement.
    workloads: Vec<Workload>,
}

fn start_fleet() -> Result<Started> {
    let fleet = Fleet::start_with_config(3, CONFIG);
    let targets: Vec<Target> = fleet.hosts().iter().map(Target::of).collect::<Result<_>>()?;
    let (groups, placed) = setup(&targets[0])?;
    let mut workloads = Vec::new();
    for (uni, group, net) in &placed {
        for h in 0..fleet.len() {
            workloads.push(fleet.endpoint(h, uni, &format!("10.{net}.0.{}", 10 + h), &[group]));
        }
    }
    Ok(Started { fleet, targets, groups, workloads })
}

/// Three hosts on the three-member etcd.
fn run_etcd(out: &mut Vec<BenchRecord>, options: &Options) -> Result<()> {
    let Started { fleet, targets, groups, workloads } = start_fleet()?;
    if options.load_only {
        load_records(out, "etcd", &targets, &groups, Some(&fleet))?;
        drop(workloads);
        return Ok(());
    }
    // The group edited sequentially: in the first universe, with an endpoint on every host.
    let probe_group = groups[1].clone();

    // Both sides are measured alike: every host has realized the whole state (the endpoints'
    // plumbing, the bulk), and etcd's history is compacted and its database defragmented (as
    // for `db_size`), so no work left over from setting up runs while the edits are timed.
    let db_empty = settle(&fleet, &targets[0])?;
    let before = scrape(&targets)?;
    eprintln!("bench_edits: one edit, empty fleet: timing {} edits", options.sequential);
    let empty = sequential(&targets[0], &probe_group, options.sequential)?;
    let phases_empty = phases_since(&targets, &before)?;
    eprintln!("bench_edits: one edit, empty fleet, phases (all hosts): {}", phases_empty.line());
    let real: Vec<String> = fleet.hosts().iter().map(|h| h.name().to_owned()).collect();
    let maps_empty = host_maps(&fleet, &real[..1])?;
    if !options.sequential_only {
        load_records(out, "etcd", &targets, &groups, Some(&fleet))?;
    }

    // Before the rules (after the runs under load, whose idempotency records live on for a
    // while): the database per 10,000 rules counts the rules alone.
    let db_before_rules = db_size(&fleet)?;
    let rules = bulk(&fleet, false)?;
    let db_rules = db_size(&fleet)?;
    bulk(&fleet, true)?;
    let db_full = settle(&fleet, &targets[0])?;
    eprintln!("bench_edits: etcd db {db_empty:.0} B before the empty fleet's edits, {db_full:.0} B before the full fleet's");
    // The full fleet's edits are timed in turn with the same edits on a twin of the fleet
    // started now and left empty (as the full one was before its bulk): both sides meet the
    // same moments of the machine's load, which a minute apart they did not (the ratio moved
    // from 1.03x to 1.69x between runs of one build).
    let Started {
        fleet: twin,
        targets: twin_targets,
        groups: twin_groups,
        workloads: twin_workloads,
    } = start_fleet()?;
    settle(&twin, &twin_targets[0])?;
    let before = scrape(&targets)?;
    let before_twin = scrape(&twin_targets)?;
    eprintln!(
        "bench_edits: one edit, full fleet and its empty twin in turn: timing {} edits a side",
        options.sequential
    );
    let (full, empty_twin) = paired(
        (&targets[0], &probe_group),
        (&twin_targets[0], &twin_groups[1]),
        options.sequential,
    )?;
    let phases_full = phases_since(&targets, &before)?;
    let phases_twin = phases_since(&twin_targets, &before_twin)?;
    eprintln!("bench_edits: one edit, full fleet, phases (all hosts): {}", phases_full.line());
    eprintln!("bench_edits: one edit, empty twin, phases (all hosts): {}", phases_twin.line());
    drop(twin_workloads);
    drop(twin);
    let maps_full = host_maps(&fleet, &[real[0].clone(), "bulk-host-0".to_owned()])?;
    eprintln!("bench_edits: map entries (host, entries, compile ms, per map): empty fleet {maps_empty:?}, full fleet {maps_full:?}");
    let (e_entries, f_entries) = (maps_empty[0].1 as f64, maps_full[0].1 as f64);
    let maps_config = json!({
        "host": real[0], "measured": "verse::compile::compile of the host from the desired state etcd holds: the entries its reconciler writes, over every map",
        "empty_fleet": {"entries": maps_empty[0].1, "compile_ms": maps_empty[0].2, "per_map": maps_empty[0].3},
        "full_fleet": {"entries": maps_full[0].1, "compile_ms": maps_full[0].2, "per_map": maps_full[0].3,
            "rules": BULK_UNIVERSES * BULK_GROUPS * BULK_RULES_PER_GROUP,
            "endpoints": BULK_UNIVERSES * BULK_ENDPOINTS_PER_UNIVERSE},
        "a_host_of_the_bulk": {"host": maps_full[1].0, "entries": maps_full[1].1, "compile_ms": maps_full[1].2, "per_map": maps_full[1].3},
    });
    out.push(BenchRecord::new(
        "control_host_map_entries_empty_fleet",
        e_entries,
        Unit::Count,
        None,
        maps_config.clone(),
    ));
    out.push(
        BenchRecord::new(
            "control_host_map_entries_full_fleet",
            f_entries,
            Unit::Count,
            Some(("control_host_map_entries_empty_fleet", f_entries / e_entries)),
            maps_config,
        )
        .with_target(
            "<= 1.2x (a host's maps grow with its own workloads)",
            f_entries <= 1.2 * e_entries,
        ),
    );
    let (e50, t50, f50) =
        (percentile(&empty, 0.5), percentile(&empty_twin, 0.5), percentile(&full, 0.5));
    let ratio = f50 / t50;
    // Each turn's median on the full fleet against the twin's in the same round.
    let rounds: Vec<f64> = full
        .chunks(TURN)
        .zip(empty_twin.chunks(TURN))
        .map(|(f, t)| percentile(f, 0.5) / percentile(t, 0.5))
        .collect();
    let round_ratio = percentile(&rounds, 0.5);
    eprintln!(
        "bench_edits: one edit, empty fleet before its bulk p50 {e50:.2} ms p99 {:.2}; in turn: empty twin p50 {t50:.2} ms p99 {:.2}, full fleet p50 {f50:.2} ms p99 {:.2} ({ratio:.2}x; median of the rounds' ratios of medians {round_ratio:.2}x)",
        percentile(&empty, 0.99),
        percentile(&empty_twin, 0.99),
        percentile(&full, 0.99)
    );
    let config = json!({
        "hosts": 3, "store": "etcd", "edits": options.sequential, "edit": "POST then DELETE of a TCP rule in one group of one universe with an endpoint on every host, through host 0's API, one at a time",
        "full_fleet": {"universes": BULK_UNIVERSES, "groups_per_universe": BULK_GROUPS,
            "rules": BULK_UNIVERSES * BULK_GROUPS * BULK_RULES_PER_GROUP,
            "endpoints": BULK_UNIVERSES * BULK_ENDPOINTS_PER_UNIVERSE, "endpoint_hosts": BULK_HOSTS},
        "measured": format!("the full fleet's edits in turns of {TURN} with the same edits on an empty twin fleet (its own three etcd members and three hosts), which side goes first swapped every round; the empty fleet's own edits before its bulk are kept apart"),
        "samples_empty_before_bulk_ms": empty, "samples_empty_twin_ms": empty_twin, "samples_full_ms": full,
        "p99_empty_before_bulk_ms": percentile(&empty, 0.99), "p99_empty_twin_ms": percentile(&empty_twin, 0.99),
        "p99_full_ms": percentile(&full, 0.99),
        "ratio_to_the_same_fleet_before_its_bulk": f50 / e50, "median_of_round_ratios": round_ratio,
        "phases_empty_before_bulk_all_hosts": phases_empty.summary(), "phases_empty_twin_all_hosts": phases_twin.summary(),
        "phases_full_all_hosts": phases_full.summary(),
    });
    out.push(BenchRecord::new("control_edit_ms_empty_fleet", e50, Unit::Ms, None, config.clone()));
    out.push(BenchRecord::new("control_edit_ms_empty_twin", t50, Unit::Ms, None, config.clone()));
    out.push(
        BenchRecord::new(
            "control_edit_ms_full_fleet",
            f50,
            Unit::Ms,
            Some(("control_edit_ms_empty_twin", ratio)),
            config,
        )
        .with_target("<= 1.2x", ratio <= 1.2),
    );
    let per_10k = (db_rules - db_before_rules) / (rules as f64 / 10_000.0) / 1024.0;
    eprintln!("bench_edits: etcd db {db_empty:.0} B empty, {db_before_rules:.0} B before the rules, {db_rules:.0} B with {rules} rules: {per_10k:.0} KiB per 10,000 rules");
    out.push(BenchRecord::new(
        "control_etcd_db_kib_per_10k_rules",
        per_10k,
        Unit::KiB,
        None,
        json!({"db_bytes_empty_fleet": db_empty, "db_bytes_before": db_before_rules, "db_bytes_after": db_rules, "rules": rules,
               "measured": "etcdctl endpoint status dbSize after compact --physical and defrag"}),
    ));
    drop(workloads);
    drop(fleet);
    Ok(())
}

/// One host on the embedded store.
fn run_embedded(out: &mut Vec<BenchRecord>) -> Result<()> {
    let host = Host::start_with_config(Some(CONFIG));
    let target = Target::of(&host)?;
    let (groups, placed) = setup(&target)?;
    let workloads: Vec<_> = placed
        .iter()
        .map(|(uni, group, net)| host.endpoint(uni, &format!("10.{net}.0.10"), &[group]))
        .collect();
    load_records(out, "embedded", &[target], &groups, None)?;
    drop(workloads);
    Ok(())
}
