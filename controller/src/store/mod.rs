//! Where the desired state lives, and how the hosts of the fleet report on it.
//!
//! Contract: the desired state is one [`State`] document. [`Store::edit`] serializes edits: it
//! runs the edit on a copy of the current state, refuses the result whole if the edit fails or
//! its compiled form would not fit the dataplane (S12), otherwise persists it and only then
//! publishes it to [`Store::subscribe`]rs. A published state is always durable, so a restart
//! loses no acknowledged edit; a refused or failed edit changes nothing. Every change bumps the
//! revision (S13). When `edit` returns, [`Store::snapshot`] shows the edit (or a later state).
//!
//! An edit closure may run more than once (the etcd store re-runs it on a fresh state when
//! another host's edit got in first), so it is `FnMut` and must compute its result from the
//! state it is given only.
//!
//! Hosts: a `versed` announces its host with [`Store::register_host`] (recorded in
//! `State::hosts`, so every host learns its underlay address) and reports the revision its
//! dataplane has realized with [`Store::report_realized`] (or [`Store::report`], with what it
//! could not realize). [`Store::hosts`] lists every known
//! host with its realized revision and whether it is alive (S13); the etcd store reads the
//! hosts' reports only while someone asks ([`Store::subscribe_hosts`]), never as part of
//! following the desired state, so that a host's report reaches the hosts that wait for it,
//! not the whole fleet.
//!
//! The audit trail (`crate::audit`) lives in the store too, apart from the desired state:
//! [`Store::append_audit`] adds a record durably, [`Store::query_audit`] reads the newest
//! records that match, and the store keeps at most [`AuditRetention`] of them. An edit made with
//! [`Store::edit_audited`] writes its record in its own commit: the record is there exactly
//! when the edit is (an edit refused or failed writes none), for one write instead of two.
//!
//! Two implementations, same behaviour:
//! - [`embedded`] (the default): a JSON file in the state directory, one host, always healthy;
//!   the audit trail in an append-only file beside it.
//! - [`etcd`]: one key per object under a prefix of an etcd cluster, shared by every host; see
//!   that module for the key layout, transactions and liveness.

pub mod embedded;
pub mod etcd;
mod failover;
pub mod layout;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::audit::{AuditRecord, Query as AuditQuery};
use crate::model::{self, State};

pub use embedded::{Embedded, LAST_GOOD_FILE, STATE_FILE};
pub use etcd::{Etcd, EtcdOptions, EtcdTls, LeaseStats, WatchStats};

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The edit was refused (invalid input, unknown id, conflict, or would not fit, S12);
    /// nothing changed.
    #[error(transparent)]
    Rejected(#[from] model::Error),
    /// The state directory could not be created.
    #[error("failed to create state directory {path}: {source}")]
    CreateDir { path: PathBuf, source: std::io::Error },
    /// The state document could not be read.
    #[error("failed to read {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    /// The state document is not valid JSON for a `State`.
    #[error(
        "state file {path} is corrupt: {source} (restore the last good state with `cp {} {}`, \
         after keeping the corrupt file aside)",
        copy.display(),
        path.display()
    )]
    Parse { path: PathBuf, source: serde_json::Error, copy: PathBuf },
    /// The new state could not be made durable; nothing changed.
    #[error("failed to persist the state to {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    /// The etcd client could not be set up (bad endpoint, ...).
    #[error("failed to connect to etcd at {endpoints}: {source}")]
    Connect { endpoints: String, source: etcd_client::Error },
    /// An etcd request failed (etcd unreachable, no leader, request too large, ...).
    #[error("etcd {op} failed: {source}")]
    Etcd { op: &'static str, source: etcd_client::Error },
    /// An etcd request got no answer in time.
    #[error("etcd {op} timed out after {after:?}")]
    Timeout { op: &'static str, after: Duration },
    /// A key under the prefix does not hold what this version of Verse writes there.
    #[error("etcd key {key} is corrupt: {reason}")]
    Corrupt { key: String, reason: String },
    /// The `store` setting is unusable.
    #[error(transparent)]
    Config(#[from] crate::config::Error),
    /// Other writers kept winning the race for the same revision.
    #[error("edit abandoned after {attempts} attempts: other edits kept committing first")]
    Contention { attempts: u32 },
    /// The audit trail could not be written or read.
    #[error("audit trail {path}: {source}")]
    Audit { path: PathBuf, source: std::io::Error },
    /// etcd refused this host's credentials the operation (its etcd role does not allow it):
    /// retrying through this host cannot help.
    #[error(
        "etcd refused {op}: this host's etcd user may not do it ({message}); see the README, \
         \"etcd access control\""
    )]
    Denied { op: &'static str, message: String },
    /// The commit was sent but its outcome could not be learned (etcd stopped answering), and
    /// the edit could not be fenced off either: it may or may not have happened. Retrying the
    /// request with the same idempotency key tells.
    #[error(
        "the outcome of this edit is unknown (etcd stopped answering after the commit was sent: \
         {cause}); retry with the same Idempotency-Key ({key}) to learn it"
    )]
    Unknown { key: String, cause: String },
    /// An idempotency key sent again with another request.
    #[error("idempotency key {key:?} was used for another request")]
    KeyReused { key: String },
    /// The embedded store takes no more edits: a write of its log failed and the log could not
    /// be cut back to its last good length, so writing on would give edits told "failed" (still
    /// in the log) a place in the state after a restart. Retrying cannot help; restarting
    /// versed reopens and replays the log.
    #[error(
        "the store takes no more edits until versed restarts: a write of {path} failed and the \
         log could not be cut back to its last good length ({cause}); an edit answered with \
         this error may be there after the restart (a retry with the same Idempotency-Key then \
         tells)"
    )]
    Halted { path: PathBuf, cause: String },
}

/// How much of the audit trail the store keeps (settings `audit_retention_records` and
/// `audit_retention_days`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AuditRetention {
    /// At most about this many records (the oldest go first).
    pub max_records: usize,
    /// Records older than this are dropped (and never shown).
    pub max_age: Duration,
}

impl Default for AuditRetention {
    fn default() -> AuditRetention {
        AuditRetention { max_records: 100_000, max_age: Duration::from_secs(90 * 24 * 3600) }
    }
}

impl Error {
    /// Whether the store could not be reached (as opposed to a refused edit or a local
    /// failure): the API answers 503 then.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            Error::Etcd { .. }
                | Error::Timeout { .. }
                | Error::Contention { .. }
                | Error::Unknown { .. }
        )
    }
}

/// Whether an audit record matches a query (time and universe; the limit is the caller's).
fn audit_matches(r: &AuditRecord, q: &AuditQuery, oldest: std::time::SystemTime) -> bool {
    r.time.0 >= oldest
        && q.since.is_none_or(|s| r.time.0 >= s)
        && q.universe.as_ref().is_none_or(|u| r.universe.as_ref() == Some(u))
}

/// How long the outcome of an edit is kept for a retry with the same idempotency key.
pub const IDEMPOTENCY_TTL: Duration = Duration::from_secs(600);

/// The idempotency key of an edit (the API's `Idempotency-Key` header, or one the API made up):
/// the edit's outcome is recorded with it, in the same commit, so that a retry with the same
/// key answers that outcome instead of editing again, and so that an edit whose commit got no
/// answer can be settled: either its record is there (it happened) or a record saying it did
/// not is put first, fencing the commit off for good.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Idempotency {
    pub key: String,
    /// What the request was (method, path, body): a key sent again with another request is
    /// refused ([`Error::KeyReused`]).
    pub fingerprint: String,
    /// Whether the client chose the key (then a recorded outcome is looked for first).
    pub from_client: bool,
}

impl Idempotency {
    /// The store key of the record: a digest, so any client key is a safe key.
    pub fn digest(&self) -> String {
        use sha2::Digest;
        sha2::Sha256::digest(self.key.as_bytes()).iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// The recorded outcome of an edit.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recorded {
    pub fingerprint: String,
    /// The status answered; 0 for an edit that did not happen (fenced off after its commit got
    /// no answer).
    pub status: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<serde_json::Value>,
    /// The revision of the edit.
    #[serde(default)]
    pub revision: u64,
}

/// The audit record of an edit, written by the store in the edit's own commit
/// ([`Store::edit_audited`]).
pub trait CommitAudit<T>: Send + Sync {
    /// The record of the edit whose result is `out`, answered `status` (the revision is the
    /// store's to fill in); `None`: no record in the commit.
    fn record(&self, out: &T, status: u16) -> Option<AuditRecord>;
    /// The record is durable with the edit.
    fn written(&self);
}

/// What an edit with an idempotency key came to.
#[derive(Debug)]
pub enum Outcome<T> {
    /// It ran now: its result and revision.
    Applied { out: T, revision: u64 },
    /// It had run before under the same key: what was answered then.
    Replayed(Recorded),
}

/// How an edit's outcome is answered to its client (status and body), recorded under its
/// idempotency key.
pub(super) type Respond<T> = fn(&T) -> (u16, Option<serde_json::Value>);

/// What the backends' `run` takes for an edit without an idempotency key: nothing to record.
pub(super) fn unrecorded<'a, T>() -> Option<(&'a Idempotency, Respond<T>)> {
    None
}

impl<T> Outcome<T> {
    /// The outcome of an edit run without an idempotency key: never a replay.
    pub(super) fn applied(self) -> (T, u64) {
        match self {
            Outcome::Applied { out, revision } => (out, revision),
            Outcome::Replayed(_) => unreachable!("an edit without a key is never replayed"),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// One host of the fleet as the control plane sees it (`GET /v1/hosts`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostStatus {
    pub name: String,
    /// Address on the underlay network, as the host registered it.
    pub underlay_ip: Option<Ipv4Addr>,
    /// Where the other hosts reach its API, as it registered it (`None`: they cannot).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api: Option<String>,
    /// The SHA-256 of the certificate its API serves, as it registered it (`None`: it serves
    /// plain HTTP, or registered none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_fingerprint: Option<String>,
    /// The revision the host has reported realized in its dataplane (S13); the last one known
    /// if the host is not healthy, 0 if it never reported. For a host that follows only its
    /// own universes (`EtcdOptions::scope`), the newest revision up to which everything it
    /// follows is current, as this store judges from the changes it has seen: an edit of a
    /// universe with no endpoint on that host is realized there trivially.
    pub revision: u64,
    /// The host's `versed` is alive: it keeps its liveness record fresh (always true for the
    /// embedded store's hosts).
    pub healthy: bool,
    /// The endpoints of this host that it could not realize (S13): `revision` is in force for
    /// everything else.
    #[serde(default)]
    pub errors: Vec<HostError>,
}

/// What a host reports of its dataplane (S13): the newest revision it has realized, for every
/// endpoint but those in `errors`, which it could not plumb (or whose interface it could not
/// remove) and keeps retrying.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Realized {
    pub revision: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub errors: Vec<HostError>,
    /// For a host whose store follows only what it needs (`EtcdOptions::scope`): the key
    /// ranges it follows, each with the etcd revision up to which its realized state holds it
    /// ([`State::followed`]); `revision` is then the newest of them. The stores that read the
    /// reports judge from it which revisions the host has realized ([`HostStatus::revision`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub followed: Option<std::collections::BTreeMap<String, u64>>,
}

impl Realized {
    /// A revision realized whole.
    pub fn at(revision: u64) -> Realized {
        Realized { revision, errors: Vec::new(), followed: None }
    }

    /// `state` realized whole: its revision, and what it follows.
    pub fn of(state: &State) -> Realized {
        Realized {
            revision: state.revision,
            errors: Vec::new(),
            followed: state.followed.as_deref().cloned(),
        }
    }
}

/// One endpoint a host could not realize, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostError {
    pub endpoint: String,
    /// `not_found` (the endpoint's namespace does not exist on that host), `invalid_argument`
    /// (the request cannot work there as it is: that namespace is not one), `conflict`
    /// (something in the way: an interface of the same name), or `internal`.
    pub code: String,
    pub message: String,
}

/// A handle on the desired state; cheap to clone (every clone is the same store). The store's
/// background work (etcd watch, liveness) stops when the last clone is dropped.
#[derive(Clone)]
pub enum Store {
    /// A JSON file in the state directory (one host).
    Embedded(Arc<Embedded>),
    /// An etcd cluster shared by the fleet.
    Etcd(Arc<Etcd>),
}

impl Store {
    /// Opens the store the settings name: the embedded store in `config.state_dir`, or the etcd
    /// cluster of `config.store` (see [`Store::open_etcd`]: this waits for etcd).
    pub async fn open(config: &crate::config::Config) -> Result<Store> {
        match config.etcd_options()? {
            None => Store::open_embedded_with(&config.state_dir, config.audit_retention()),
            Some(options) => Store::open_etcd(options).await,
        }
    }

    /// Opens (or creates) the embedded store in `state_dir`, with the default audit retention.
    pub fn open_embedded(state_dir: impl AsRef<Path>) -> Result<Store> {
        Store::open_embedded_with(state_dir, AuditRetention::default())
    }

    /// Opens (or creates) the embedded store in `state_dir`.
    pub fn open_embedded_with(
        state_dir: impl AsRef<Path>,
        retention: AuditRetention,
    ) -> Result<Store> {
        Ok(Store::Embedded(Arc::new(Embedded::open(state_dir.as_ref(), retention)?)))
    }

    /// Connects to etcd, reads the desired state under `options.prefix` and starts following
    /// it. Waits (retrying with backoff, logging each failure) until etcd answers: until then
    /// there is no state to publish, and an empty one would tell the reconciler to remove
    /// everything. Fails at once only on a malformed endpoint.
    pub async fn open_etcd(options: EtcdOptions) -> Result<Store> {
        Ok(Store::Etcd(Etcd::open(options).await?))
    }

    /// [`Store::open_etcd`] on a client made by [`etcd::connect`] that other stores may share
    /// (simulated hosts, `crate::sim`): the watch and the lease are still this store's own.
    pub async fn open_etcd_with_client(
        options: EtcdOptions,
        client: etcd_client::Client,
    ) -> Result<Store> {
        Ok(Store::Etcd(Etcd::open_with_client(options, client).await?))
    }

    /// What this store's watch has received since it opened (nothing for the embedded store).
    pub fn watch_stats(&self) -> WatchStats {
        match self {
            Store::Embedded(_) => WatchStats::default(),
            Store::Etcd(e) => e.watch_stats(),
        }
    }

    /// What happened to this store's etcd leases since it opened: requests tried again on
    /// another member, liveness leases that expired (nothing for the embedded store).
    pub fn lease_stats(&self) -> LeaseStats {
        match self {
            Store::Embedded(_) => LeaseStats::default(),
            Store::Etcd(e) => e.lease_stats(),
        }
    }

    /// The current desired state.
    pub fn snapshot(&self) -> Arc<State> {
        match self {
            Store::Embedded(e) => e.snapshot(),
            Store::Etcd(e) => e.snapshot(),
        }
    }

    /// How many commits a guard refused so far (an edit of the same universe got in first, and
    /// the edit ran again): 0 for the embedded store, which serializes edits.
    pub fn conflicts(&self) -> u64 {
        match self {
            Store::Embedded(_) => 0,
            Store::Etcd(e) => e.conflicts(),
        }
    }

    /// How many times an edit of a whole universe, refused again and again by edits of one
    /// group's rules of it, held them off until it committed (see `layout::Guard::InUniverse`):
    /// 0 for the embedded store.
    pub fn holds(&self) -> u64 {
        match self {
            Store::Embedded(_) => 0,
            Store::Etcd(e) => e.holds(),
        }
    }

    /// How many times the store read a client's idempotency record in a round trip of its
    /// own (to tell a replay from a refusal when an edit cannot run or changes nothing; a
    /// commit refused by etcd reads it in its own transaction): 0 for the embedded store.
    pub fn idempotency_reads(&self) -> u64 {
        match self {
            Store::Embedded(_) => 0,
            Store::Etcd(e) => e.idempotency_reads(),
        }
    }

    /// Follows the desired state: the receiver sees every published state (or at least the
    /// latest one, if it falls behind). It closes when the store is dropped.
    pub fn subscribe(&self) -> watch::Receiver<Arc<State>> {
        match self {
            Store::Embedded(e) => e.subscribe(),
            Store::Etcd(e) => e.subscribe(),
        }
    }

    /// Applies `f` to a copy of the state. On success, the new state is checked to fit the
    /// dataplane, persisted and published; returns `f`'s result and the new revision. An `f`
    /// that changes nothing returns the current revision and writes nothing. `f` may be called
    /// more than once (see the module docs); only the result of the call that committed is
    /// returned.
    ///
    /// Cancel-safe: a commit is atomic (one file rename, one etcd transaction), so dropping the
    /// future leaves either the old or the new state, never a mix.
    pub async fn edit<T, F>(&self, f: F) -> Result<(T, u64)>
    where
        F: FnMut(&mut State) -> model::Result<T> + Send,
        T: Send + 'static,
    {
        match self {
            Store::Embedded(e) => {
                Embedded::run(e, f, unrecorded(), None).await.map(Outcome::applied)
            }
            Store::Etcd(e) => e.edit(f).await,
        }
    }

    /// [`Store::edit`] with an idempotency key: the outcome (`respond` of the result: status
    /// and body) is recorded in the same commit as the edit and kept for [`IDEMPOTENCY_TTL`]; a
    /// key already recorded answers [`Outcome::Replayed`] without running `f`. An edit whose
    /// commit got no answer is settled before this returns: its record, or a fence (then it
    /// fails, and it did not happen), or [`Error::Unknown`] if etcd cannot be reached at all.
    pub async fn edit_recorded<T, F, R>(
        &self,
        idem: &Idempotency,
        f: F,
        respond: R,
    ) -> Result<Outcome<T>>
    where
        F: FnMut(&mut State) -> model::Result<T> + Send,
        R: Fn(&T) -> (u16, Option<serde_json::Value>) + Send,
        T: Send + 'static,
    {
        match self {
            Store::Embedded(e) => Embedded::run(e, f, Some((idem, respond)), None).await,
            Store::Etcd(e) => e.edit_recorded(idem, f, respond).await,
        }
    }

    /// [`Store::edit_recorded`] that also writes `audit`'s record of the edit in the same commit
    /// (with the commit's revision), and tells `audit` once it is durable. The record is left
    /// out (and `audit` not told) when it does not fit the commit (etcd's operations per
    /// transaction): the caller writes it apart then, as for every outcome but a commit.
    pub async fn edit_audited<T, F, R>(
        &self,
        idem: &Idempotency,
        f: F,
        respond: R,
        audit: &dyn CommitAudit<T>,
    ) -> Result<Outcome<T>>
    where
        F: FnMut(&mut State) -> model::Result<T> + Send,
        R: Fn(&T) -> (u16, Option<serde_json::Value>) + Send,
        T: Send + 'static,
    {
        match self {
            Store::Embedded(e) => Embedded::run(e, f, Some((idem, respond)), Some(audit)).await,
            Store::Etcd(e) => e.edit_audited(idem, f, respond, Some(audit)).await,
        }
    }

    /// Announces `name` as a host of the fleet: records it (with its underlay address) in the
    /// desired state if it is new or changed, and starts keeping its liveness record fresh, so
    /// that [`Store::hosts`] shows it healthy for as long as this store lives. Idempotent.
    pub async fn register_host(&self, name: &str, underlay_ip: Option<Ipv4Addr>) -> Result<()> {
        self.register_host_with_api(name, underlay_ip, None, None).await
    }

    /// [`Store::register_host`], with the address (`https://ADDR:PORT`) where the other hosts
    /// reach this host's API and the fingerprint of the certificate it serves there.
    pub async fn register_host_with_api(
        &self,
        name: &str,
        underlay_ip: Option<Ipv4Addr>,
        api: Option<String>,
        api_fingerprint: Option<String>,
    ) -> Result<()> {
        check_host_name(name)?;
        match self {
            Store::Embedded(e) => {
                e.register_host(name, underlay_ip, api, api_fingerprint);
                Ok(())
            }
            Store::Etcd(e) => e.register_host(name, underlay_ip, api, api_fingerprint).await,
        }
    }

    /// Reports that host `name` (normally this one) has realized `revision` in its dataplane.
    /// Never blocks: the etcd store publishes it in the background, the latest report winning,
    /// once the host is registered through this store ([`Store::register_host`]).
    pub fn report_realized(&self, name: &str, revision: u64) {
        self.report(name, Realized::at(revision));
    }

    /// Like [`Store::report_realized`], with the endpoints the host could not realize.
    pub fn report(&self, name: &str, realized: Realized) {
        match self {
            Store::Embedded(e) => e.report(name, realized),
            Store::Etcd(e) => e.report(name, realized),
        }
    }

    /// Every known host, by name: registered in the desired state or alive. On the etcd store
    /// this follows the hosts' liveness records for a while (see [`Store::subscribe_hosts`]).
    pub async fn hosts(&self) -> Result<Vec<HostStatus>> {
        Ok(self.subscribe_hosts().await?.borrow().as_ref().clone())
    }

    /// Adds `record` to the audit trail; returns once it is durable (fsynced to the file, or
    /// committed in etcd).
    pub async fn append_audit(&self, record: &AuditRecord) -> Result<()> {
        match self {
            Store::Embedded(e) => e.append_audit(record).await,
            Store::Etcd(e) => e.append_audit(record).await,
        }
    }

    /// The newest `query.limit` records of the trail that match `query` and are within the
    /// retention, oldest first.
    pub async fn query_audit(&self, query: &AuditQuery) -> Result<Vec<AuditRecord>> {
        match self {
            Store::Embedded(e) => e.query_audit(query).await,
            Store::Etcd(e) => e.query_audit(query).await,
        }
    }

    /// Follows [`Store::hosts`]: the feed is marked changed whenever a host registers, reports
    /// a revision, or becomes healthy or unhealthy.
    ///
    /// On the etcd store, the hosts' liveness records (`alive/<name>`: a host's lease and the
    /// revision it realized) are followed only while someone needs them: from the first feed
    /// until [`etcd::LIVENESS_LINGER`] after the last one is dropped (an API answering edits or
    /// `GET /v1/hosts`), by a watch of their own, apart from the desired state's. This returns
    /// once that watch has read them, or fails ([`Error::Timeout`]) if etcd did not answer in a
    /// few seconds: it never answers with hosts it has not read (every host unhealthy before
    /// the first read, or health from before the watch last closed).
    pub async fn subscribe_hosts(&self) -> Result<HostsFeed> {
        match self {
            Store::Embedded(e) => Ok(HostsFeed { rx: e.subscribe_hosts(), _demand: None }),
            Store::Etcd(e) => e.subscribe_hosts().await,
        }
    }
}

/// What [`Store::subscribe_hosts`] returns: a receiver of the hosts, that keeps the etcd
/// store's liveness watch going for as long as it lives.
pub struct HostsFeed {
    rx: watch::Receiver<Arc<Vec<HostStatus>>>,
    _demand: Option<etcd::Demand>,
}

impl std::ops::Deref for HostsFeed {
    type Target = watch::Receiver<Arc<Vec<HostStatus>>>;
    fn deref(&self) -> &Self::Target {
        &self.rx
    }
}

impl std::ops::DerefMut for HostsFeed {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.rx
    }
}

/// Applies `f` to a copy of `current` (O(1): persistent tables) and bumps the revision if
/// anything changed. Returns `None` for the state when nothing changed: the tables' journals
/// say so, the two states are never compared.
fn apply_edit<T, F>(current: &State, f: &mut F) -> Result<(T, Option<State>)>
where
    F: FnMut(&mut State) -> model::Result<T>,
{
    let mut next = current.clone();
    next.clear_changes();
    let out = f(&mut next)?;
    if !next.is_changed() {
        return Ok((out, None));
    }
    // An edit that forgets to bump the revision still gets a new one (S13).
    if next.revision <= current.revision {
        next.revision = current.revision + 1;
    }
    next.check_fits()?;
    Ok((out, Some(next)))
}

/// Host names become store keys (`hosts/<name>`): keep them to one plain path component.
fn check_host_name(name: &str) -> Result<(), model::Error> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'));
    if ok {
        Ok(())
    } else {
        Err(model::Error::invalid(
            "host",
            format!("{name:?}: expected 1 to 253 characters among letters, digits, '-', '.', '_'"),
        ))
    }
}
