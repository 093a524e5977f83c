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

#[test]
fn killing_the_etcd_leader_mid_burst_loses_no_acknowledged_edit() {
    assert!(is_root(), "needs root: network namespaces, bpffs, eBPF");
    let mut burst = RuleBurst::start("burst", "10.7.0");
    let before =
        burst.fleet.etcd().leader(Duration::from_secs(10)).expect("the cluster has a leader");
    let acked = Arc::new(Mutex::new(Vec::<Acked>::new()));
    let failed = Arc::new(Mutex::new(Vec::<String>::new()));
    let count = Arc::new(AtomicUsize::new(0));
    let mut killed_at = None;
    std::thread::scope(|scope| {
        for via in 0..3 {
            let (editor, acked, failed) = (burst.editor(via), acked.clone(), failed.clone());
            let count = count.clone();
            scope.spawn(move || {
                for n in 0..EDITS_PER_HOST {
                    let port = 2000 + (via * 100 + n) as u16;
                    match editor.add(port) {
                        Ok(a) => {
                            acked.lock().unwrap().push(a);
                            count.fetch_add(1, Ordering::SeqCst);
                        }
                        Err(e) => failed.lock().unwrap().push(e),
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
        let leader = burst.fleet.etcd().leader(Duration::from_secs(5)).expect("a leader mid-burst");
        burst.fleet.etcd_mut().kill(leader);
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
    let new_leader = burst.fleet.etcd().leader(Duration::from_secs(10)).expect("a new leader");
    assert_ne!(new_leader, killed, "the dead member cannot lead");

    // Within 5 s of the last acknowledgement: every host shows every acknowledged rule and has
    // realized the last acknowledged revision.
    let last_ack = acked.iter().map(|a| a.at).max().expect("some edit was acknowledged");
    let top = acked.iter().map(|a| a.revision).max().expect("revisions");
    let deadline = last_ack + CONVERGE;
    let mut missing;
    let converged = loop {
        missing = burst.missing(&acked);
        let realized = (0..3).all(|via| burst.fleet.wait_realized(via, top, Duration::ZERO));
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
        burst.fleet.api(0).hosts()
    );

    burst.assert_last_rules_pass(&acked);

    // The killed member comes back and the cluster is whole again.
    burst.fleet.etcd_mut().restart(killed);
    assert!(burst.fleet.etcd().healthy());
    assert_eq!(burst.fleet.etcd().status().len(), 3);
}
