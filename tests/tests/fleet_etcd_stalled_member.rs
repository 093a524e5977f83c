//! A stalled etcd member never makes a healthy host's liveness lapse: three hosts on a
//! three-member etcd keep editing through all three APIs while each member in turn is stopped
//! with SIGSTOP (a starved process: its connections stay open and nothing answers) for longer
//! than the liveness lease's TTL, then resumed. Whichever member a host's liveness connection
//! uses, that host renews the same lease through another member in time: no `alive/<host>`
//! key is ever deleted (etcd's own history since the start, replayed with `etcdctl watch
//! --rev`), no host's `GET /v1/hosts` ever lists a host unhealthy (polled every 100 ms on every
//! host), the hosts counted their failovers in `/metrics`, edits keep being acknowledged
//! through each stall, and every acknowledged edit is on every host and realized by all of them
//! afterwards, down to traffic in the dataplane.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tests::*;

/// How long each member stays stopped: longer than the lease TTL (`etcd_lease_ttl`, 5 s by
/// default), so a renewal that waited for the stopped member alone would come too late.
const PAUSE: Duration = Duration::from_secs(8);
/// Between two pauses: the cluster and the hosts settle.
const BETWEEN: Duration = Duration::from_secs(3);
/// How often every host's `GET /v1/hosts` is asked.
const POLL: Duration = Duration::from_millis(100);
/// The fleet must have converged this long after the last pause ended.
const CONVERGE: Duration = Duration::from_secs(15);

/// The lease of each liveness record, as etcd has it (`get -w json`: keys are base64, leases
/// decimal): what a host renewing one lease throughout leaves unchanged.
fn alive_leases(etcd: &Etcd) -> Vec<i64> {
    let out = etcd.etcdctl(&["get", "--prefix", "/verse/alive/", "-w", "json"]);
    let v: Value = serde_json::from_str(&out).expect("etcdctl -w json prints JSON");
    let mut leases: Vec<i64> = v["kvs"]
        .as_array()
        .map(|kvs| kvs.iter().filter_map(|kv| kv["lease"].as_i64()).collect())
        .unwrap_or_default();
    leases.sort_unstable();
    leases
}

#[test]
fn a_stalled_etcd_member_never_makes_a_host_unhealthy() {
    assert!(is_root(), "needs root: network namespaces, bpffs, eBPF");
    let burst = RuleBurst::start("stall", "10.8.0");
    let fleet = &burst.fleet;
    let names: Vec<String> = fleet.hosts().iter().map(|h| h.name().to_owned()).collect();

    let from = fleet.etcd().revision();
    let leases_before = alive_leases(fleet.etcd());
    assert_eq!(leases_before.len(), 3, "every host has its liveness record: {leases_before:?}");

    let start = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));
    let acked = Arc::new(Mutex::new(Vec::<Acked>::new()));
    let failed = Arc::new(Mutex::new(Vec::<String>::new()));
    // (seconds since start, asked of host, the entry) of every unhealthy sighting.
    let unhealthy = Arc::new(Mutex::new(Vec::<(f64, usize, String)>::new()));
    let polls = Arc::new(Mutex::new(0usize));
    let mut windows = Vec::new();
    std::thread::scope(|scope| {
        for via in 0..3 {
            let (api, stop, unhealthy, polls) =
                (fleet.api(via).clone(), stop.clone(), unhealthy.clone(), polls.clone());
            let names = names.clone();
            scope.spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    match api.client().list_hosts() {
                        Ok(hosts) => {
                            for name in &names {
                                let entry = hosts.iter().find(|h| h.name == *name);
                                if entry.is_none_or(|h| !h.healthy) {
                                    unhealthy.lock().unwrap().push((
                                        start.elapsed().as_secs_f64(),
                                        via,
                                        format!("{name}: {entry:?}"),
                                    ));
                                }
                            }
                            *polls.lock().unwrap() += 1;
                        }
                        Err(e) => unhealthy.lock().unwrap().push((
                            start.elapsed().as_secs_f64(),
                            via,
                            format!("GET /v1/hosts: {e}"),
                        )),
                    }
                    std::thread::sleep(POLL);
                }
            });
        }
        for via in 0..3 {
            let (editor, acked, failed, stop) =
                (burst.editor(via), acked.clone(), failed.clone(), stop.clone());
            scope.spawn(move || {
                let mut n = 0;
                while !stop.load(Ordering::SeqCst) {
                    let port = 3000 + (via * 1000 + n) as u16;
                    n += 1;
                    match editor.add(port) {
                        Ok(a) => acked.lock().unwrap().push(a),
                        Err(e) => failed.lock().unwrap().push(e),
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
            });
        }
        for member in 0..3 {
            std::thread::sleep(BETWEEN);
            let paused = fleet.etcd().pause(member);
            let stopped_at = Instant::now();
            std::thread::sleep(PAUSE);
            drop(paused);
            windows.push((member, stopped_at, Instant::now()));
        }
        std::thread::sleep(BETWEEN);
        stop.store(true, Ordering::SeqCst);
    });
    let acked = acked.lock().unwrap().clone();
    let failed = failed.lock().unwrap().clone();
    let unhealthy = unhealthy.lock().unwrap().clone();
    let leases_after = alive_leases(fleet.etcd());
    let history = fleet.etcd().history("/verse/alive/", from, Duration::from_secs(3));
    let deleted: Vec<&(String, String)> = history.iter().filter(|(t, _)| t == "DELETE").collect();
    eprintln!(
        "{} polls of GET /v1/hosts, {} unhealthy sightings; {} edits acknowledged, {} failed: \
         {failed:?}; {} liveness events since revision {from}, {} deletions; leases before \
         {leases_before:x?}, after {leases_after:x?}",
        polls.lock().unwrap(),
        unhealthy.len(),
        acked.len(),
        failed.len(),
        history.len(),
        deleted.len(),
    );
    // Each member was stopped once, so each host's liveness connection met a stopped member
    // (or a stopped leader) at least once: the hosts counted their failovers.
    let counter = |via: usize, name: &str| -> u64 {
        let text = fleet.api(via).metrics();
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} is not in host {via}'s /metrics"))
    };
    let failovers: Vec<u64> =
        (0..3).map(|via| counter(via, "verse_etcd_lease_failovers_total")).collect();
    let expiries: Vec<u64> =
        (0..3).map(|via| counter(via, "verse_etcd_lease_expiries_total")).collect();
    eprintln!("lease failovers per host {failovers:?}, expiries given up {expiries:?}");
    assert!(failovers.iter().sum::<u64>() > 0, "no host counted a lease failover");
    assert!(!history.is_empty(), "the replay of the liveness history shows no event at all");
    assert!(deleted.is_empty(), "liveness records were deleted (a lease lapsed): {deleted:?}");
    assert!(unhealthy.is_empty(), "hosts were seen unhealthy (s since start, via): {unhealthy:?}");
    // The edits went on through each stall. Not necessarily within it: an edit whose own
    // connection is on the stopped member waits for HTTP/2 keep-alive to give that member up
    // (and every edit waits for each healthy host to realize it, whose watch may be there too).
    for (member, from, to) in &windows {
        let during = acked.iter().filter(|a| a.at > *from && a.at < *to).count();
        let through = acked.iter().filter(|a| a.at > *from && a.at < *to + BETWEEN).count();
        eprintln!("etcd member {member} stopped: {during} edits acknowledged meanwhile, {through} by {BETWEEN:?} after");
        assert!(
            through > 0,
            "no edit was acknowledged while etcd member {member} was stopped or in the \
             {BETWEEN:?} after; failures: {failed:?}"
        );
    }

    // Every acknowledged rule is on every host, and every host realized the last revision.
    let top = acked.iter().map(|a| a.revision).max().expect("some edit was acknowledged");
    let mut missing = Vec::new();
    let converged = wait_until(CONVERGE, || {
        missing = burst.missing(&acked);
        missing.is_empty() && (0..3).all(|via| fleet.wait_realized(via, top, Duration::ZERO))
    });
    assert!(
        converged,
        "not converged within {CONVERGE:?} (revision {top}): missing {missing:?}; hosts {:?}",
        fleet.api(0).hosts()
    );

    burst.assert_last_rules_pass(&acked);
}
