//! Where an edit's time goes: one histogram per phase of the edit path, in this process, shown
//! in `/metrics` as `verse_edit_phase_seconds{phase}` (and read by the bench's control tier).
//!
//! Contract: each phase is timed where it happens, on every edit (never sampled), and costs a
//! clock read and one histogram update. The phases of one API mutation, in order:
//! `request` (the whole request as the API's outermost layer sees it, audit record included),
//! `idempotency_lookup` (reading a client's idempotency key before editing: only when the edit
//! cannot run, to tell a replay from a refusal), `validate` (running the edit on this host's
//! copy of the state, checking that it fits, and computing the keys it changes), `commit` (the
//! etcd transaction, or the embedded store's log append), `watch_echo` (until this host's
//! watch has applied the commit), `conflict_wait` (a guard refused the commit: until the watch
//! has the edit that got in first), `hold` (an edit of a whole universe that edits of one
//! group's rules kept refusing, holding them off: the lease and the put of its hold),
//! `hold_wait` (an edit of one group's rules waiting while such a hold lasts), `realize_local` (until this host's reconciler has realized
//! the revision), `realize_fleet` (then until every other healthy host has reported it), and
//! `audit` (writing the audit record). `edit_lock` is an edit's wait for its turn: the embedded
//! store runs one edit at a time, the etcd store one edit of each universe (or counter) per
//! host at a time, after validating it. On every host, whoever edited: `reconcile` (one round
//! of the reconciler: plumb, compile, write the maps), `compile` (its compile step), and
//! `report` (writing the realized revision to etcd, the liveness record).

use std::sync::LazyLock;
use std::time::{Duration, Instant};

use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};

/// A phase of the edit path (see the module contract).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Request,
    IdempotencyLookup,
    Validate,
    Commit,
    WatchEcho,
    ConflictWait,
    Hold,
    HoldWait,
    RealizeLocal,
    RealizeFleet,
    Audit,
    EditLock,
    Reconcile,
    Compile,
    Report,
}

impl Phase {
    pub const ALL: [Phase; 15] = [
        Phase::Request,
        Phase::IdempotencyLookup,
        Phase::Validate,
        Phase::Commit,
        Phase::WatchEcho,
        Phase::ConflictWait,
        Phase::Hold,
        Phase::HoldWait,
        Phase::RealizeLocal,
        Phase::RealizeFleet,
        Phase::Audit,
        Phase::EditLock,
        Phase::Reconcile,
        Phase::Compile,
        Phase::Report,
    ];

    /// The `phase` label.
    pub fn label(self) -> &'static str {
        match self {
            Phase::Request => "request",
            Phase::IdempotencyLookup => "idempotency_lookup",
            Phase::Validate => "validate",
            Phase::Commit => "commit",
            Phase::WatchEcho => "watch_echo",
            Phase::ConflictWait => "conflict_wait",
            Phase::Hold => "hold",
            Phase::HoldWait => "hold_wait",
            Phase::RealizeLocal => "realize_local",
            Phase::RealizeFleet => "realize_fleet",
            Phase::Audit => "audit",
            Phase::EditLock => "edit_lock",
            Phase::Reconcile => "reconcile",
            Phase::Compile => "compile",
            Phase::Report => "report",
        }
    }
}

type Labels = Vec<(String, String)>;
type Phases = Family<Labels, Histogram, fn() -> Histogram>;

/// Buckets from 50 µs to about 26 s, doubling.
fn histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_05, 2.0, 20))
}

static PHASES: LazyLock<Phases> = LazyLock::new(|| {
    let family = Phases::new_with_constructor(histogram as fn() -> Histogram);
    // Every phase shows from the start, at zero.
    for phase in Phase::ALL {
        drop(family.get_or_create(&labels(phase)));
    }
    family
});

fn labels(phase: Phase) -> Labels {
    vec![("phase".to_owned(), phase.label().to_owned())]
}

/// Records that `phase` took `took`.
pub fn observe(phase: Phase, took: Duration) {
    PHASES.get_or_create(&labels(phase)).observe(took.as_secs_f64());
}

/// Records the time from `since` to now under `phase` (a `std` or a `tokio` instant).
pub fn since(phase: Phase, since: impl Into<Instant>) {
    observe(phase, since.into().elapsed());
}

/// The histograms, to register in a scrape's registry (they share their values with the
/// process-wide ones).
pub fn family() -> Phases {
    PHASES.clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_phase_is_rendered_and_an_observation_counts() {
        observe(Phase::Commit, Duration::from_millis(3));
        let mut reg = prometheus_client::registry::Registry::with_prefix("verse");
        reg.register("edit_phase_seconds", "test", family());
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &reg).expect("encodes");
        for phase in Phase::ALL {
            let count = format!("verse_edit_phase_seconds_count{{phase=\"{}\"}}", phase.label());
            assert!(text.contains(&count), "{count} missing from\n{text}");
        }
        let commits = text
            .lines()
            .find(|l| l.starts_with("verse_edit_phase_seconds_count{phase=\"commit\"}"))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|n| n.parse::<u64>().ok())
            .expect("a commit count");
        assert!(commits >= 1, "the observation was counted");
    }
}
