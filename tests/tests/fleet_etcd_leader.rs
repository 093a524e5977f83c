//! The fleet survives losing its etcd leader: three hosts on a three-member etcd take a burst of
//! edits through all three APIs; mid-burst the etcd leader (found with `etcdctl endpoint
//! status`) is killed with SIGKILL. Every edit acknowledged with a 2xx is in the state
//! afterwards, seen through every host's API, and realized by every host (GET /v1/hosts) within
//! 5 s of the last acknowledgement; edits keep being acknowledged after the kill; and the rules
//! last added really pass traffic between hosts.
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tests::*;

/// Edits per API (three APIs).
const EDITS_PER_HOST: usize = 30;
/// The leader dies once this many edits are acknowledged.
const KILL_AFTER: usize = 25;
/// The fleet must have converged this long after the last acknowledgement.
const CONVERGE: Duration = Duration::from_secs(5);

fn id(v: &Value) -> &str {
    v["id"].as_str().expect("resource has an id")
}

/// One acknowledged edit: the rule it added, through which host, at which revision, when.
#[derive(Clone, Debug)]
struct Acked {
    rule: String,
    port: u16,
    via: usize,
    revision: u64,
    at: Instant,
}

#[test]
fn killing_the_etcd_leader_mid_burst_loses_no_acknowledged_edit() {
    assert!(is_root(), "needs root: network namespaces, bpffs, eBPF");
    let mut fleet = Fleet::start(3);
    let api = fleet.api(0).clone();
    let uni = api.create_universe("burst", "10.7.0.0/24");
    let uni = id(&uni).to_owned();
    let clients = api.create_group(&uni, "clients");
    let web = api.create_group(&uni, "web");
    let (clients, web) = (id(&clients).to_owned(), id(&web).to_owned());
    let client = fleet.endpoint(0, &uni, "10.7.0.20", &[&clients]);
    let server = fleet.endpoint(2, &uni, "10.7.0.10", &[&web]);

    let before = fleet.etcd().leader(Duration::from_secs(10)).expect("the cluster has a leader");
    let acked = Arc::new(Mutex::new(Vec::<Acked>::new()));
    let failed = Arc::new(Mutex::new(Vec::<String>::new()));
    let count = Arc::new(AtomicUsize::new(0));
    let mut killed_at = None;
    std::thread::scope(|scope| {
        for via in 0..3 {
            let (api, web, clients) = (fleet.api(via).clone(), web.clone(), clients.clone());
            let (acked, failed, count) = (acked.clone(), failed.clone(), count.clone());
            scope.spawn(move || {
                for n in 0..EDITS_PER_HOST {
                    let port = 2000 + (via * 100 + n) as u16;
                    let rule = json!({"direction": "ingress", "protocol": "tcp",
                        "from_port": port, "to_port": port, "group": clients});
                    let path = format!("/v1/security-groups/{web}/rules");
                    match api.request("POST", &path, Some(&rule), Duration::from_secs(30)) {
                        Ok(r) if (200..300).contains(&r.status) => {
                            let revision =
                                r.revision().expect("an acknowledged edit has a revision");
                            let rule = r.json()["id"].as_str().expect("rule id").to_owned();
                            let at = Instant::now();
                            acked.lock().unwrap().push(Acked { rule, port, via, revision, at });
                            count.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok(r) => failed
                            .lock()
                            .unwrap()
                            .push(format!("via {via}: {} {}", r.status, r.body)),
                        Err(e) => failed.lock().unwrap().push(format!("via {via}: {e}")),
                    }
                }
            });
        }
        // Mid-burst, the leader dies.
        assert!(
            wait_until(Duration::from_secs(120), || count.load(Ordering::SeqCst) >= KILL_AFTER),
            "the burst did not get {KILL_AFTER} edits acknowledged; failures: {:?}",
            failed.lock().unwrap()
        );
        let leader = fleet.etcd().leader(Duration::from_secs(5)).expect("a leader mid-burst");
        fleet.etcd_mut().kill(leader);
        killed_at = Some((leader, Instant::now(), count.load(Ordering::SeqCst)));
    });
    let (killed, killed_at, acked_before_kill) = killed_at.expect("the leader was killed");
    let acked = acked.lock().unwrap().clone();
    let failed = failed.lock().unwrap().clone();
    eprintln!(
        "leader before: member {before}, killed: member {killed} after {acked_before_kill} acks; \
         {} edits acknowledged, {} failed: {failed:?}",
        acked.len(),
        failed.len()
    );
    assert!(
        acked.iter().any(|a| a.at > killed_at),
        "no edit was acknowledged after the leader died; failures: {failed:?}"
    );
    let new_leader = fleet.etcd().leader(Duration::from_secs(10)).expect("a new leader");
    assert_ne!(new_leader, killed, "the dead member cannot lead");

    // Within 5 s of the last acknowledgement: every host shows every acknowledged rule and has
    // realized the last acknowledged revision.
    let last_ack = acked.iter().map(|a| a.at).max().expect("some edit was acknowledged");
    let top = acked.iter().map(|a| a.revision).max().expect("revisions");
    let deadline = last_ack + CONVERGE;
    let mut missing = Vec::new();
    let converged = loop {
        missing.clear();
        for via in 0..3 {
            match fleet.api(via).request(
                "GET",
                &format!("/v1/security-groups/{web}"),
                None,
                Duration::from_secs(5),
            ) {
                Ok(r) if r.status == 200 => {
                    let ingress = r.json()["ingress"].as_array().cloned().unwrap_or_default();
                    for a in &acked {
                        if !ingress.iter().any(|rule| rule["id"] == a.rule.as_str()) {
                            missing.push(format!(
                                "host {via} lacks rule {} (acked via {})",
                                a.rule, a.via
                            ));
                        }
                    }
                }
                other => missing.push(format!("host {via}: GET group: {other:?}")),
            }
        }
        let realized = (0..3).all(|via| {
            fleet.api(via).request("GET", "/v1/hosts", None, Duration::from_secs(5)).is_ok_and(
                |r| {
                    r.status == 200
                        && r.json().as_array().is_some_and(|hs| {
                            hs.len() == 3
                                && hs.iter().all(|h| {
                                    h["healthy"] == Value::Bool(true)
                                        && h["revision"].as_u64().is_some_and(|v| v >= top)
                                })
                        })
                },
            )
        });
        if missing.is_empty() && realized {
            break true;
        }
        if Instant::now() > deadline {
            break false;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        converged,
        "not converged within {CONVERGE:?} of the last acknowledgement (revision {top}): \
         missing {missing:?}; hosts {:?}",
        fleet.api(0).hosts()
    );

    // Realized means in the dataplane: the last rule acknowledged through each API admits the
    // client on host A to the server on host C.
    for via in 0..3 {
        let last = acked.iter().filter(|a| a.via == via).max_by_key(|a| a.revision);
        let Some(last) = last else { continue };
        let _srv = TcpServer::start(&server.ns, last.port, "web");
        assert_eq!(
            tcp_roundtrip(&client.ns, server.ip, last.port, "x", ALLOWED).as_deref(),
            Some("web:x"),
            "rule {} (port {}, acked via host {via}) does not pass traffic",
            last.rule,
            last.port
        );
    }

    // The killed member comes back and the cluster is whole again.
    fleet.etcd_mut().restart(killed);
    assert!(fleet.etcd().healthy());
    assert_eq!(fleet.etcd().status().len(), 3);
}
