//! The etcd store: the desired state of a fleet, shared by every host's `versed`.
//!
//! Contract (see the parent module for what every store guarantees):
//! - Layout: every key lives under one prefix (default [`DEFAULT_PREFIX`]), laid out as
//!   [`layout`](super::layout) says: a universe's groups, rules (one key each), endpoints and
//!   identities under `u/<uni>/`, the catalog of universes, hosts, claims and placements beside
//!   it. Liveness lives beside them too: `alive/<name>`, what the host has realized
//!   ([`Realized`] as JSON; a bare decimal revision is read too), attached to a lease of the
//!   host's.
//! - Revisions: the state's revision (S13) is etcd's own: the revision of the last change of the
//!   desired state this store has applied, and an edit's revision is the revision of its
//!   transaction. Monotonic, and no key is written by every edit.
//! - Following: every store watches the desired state (the prefix past the audit trail, up to
//!   the idempotency records) and applies each event to its in-memory state (a [`State`] of
//!   persistent tables: applying an event costs what it changes), publishing the state after
//!   each transaction. When etcd is unreachable the last state stays published (the dataplane
//!   keeps enforcing it); when it comes back the watch resumes from the last applied revision,
//!   or, if etcd has compacted that history away, everything is read again. The hosts (peers,
//!   underlay addresses) come from `hosts/<name>`, which changes only when a host joins,
//!   leaves or moves. A store opened with a scope ([`EtcdOptions::scope`]: a host that answers
//!   no API) follows only what its host needs instead: the hosts, its own placements and the
//!   universes with an endpoint on it, each on a watcher of its own (see [`scoped`]).
//! - The hosts' liveness records (`alive/`) are **not** part of that watch: every host rewrites
//!   its record with each revision it realizes, so a watch of them by every host would be N²
//!   events per edit in a fleet of N hosts. They are followed by a watch of their own, opened
//!   only while something of this process needs them ([`Store::subscribe_hosts`]: an API
//!   waiting until an edit is realized, `GET /v1/hosts`, the relays, placing an endpoint) and
//!   closed [`LIVENESS_LINGER`] after the last of them is gone; first a range read, then the
//!   watch from the next revision. A host that answers no API request receives no other
//!   host's report. A lapse (the record deleted with its lease) is seen by every store that
//!   follows them, as before.
//! - Edits run on that in-memory state, never on a fresh read: the edit runs on a copy (O(1)),
//!   its journal says which keys it changed, and one transaction writes those keys on the
//!   condition that the guards of [`layout::delta`](super::layout::delta) hold (the version key
//!   of each universe it changes, as the state saw it, and no group key of it newer than the
//!   state; or, for an edit of one group's rules alone, the group's key and the universe's
//!   version key, and no hold of the universe; claims absent). An edit of another universe, or
//!   of another group's rules alone, never conflicts; when one it depends on got in first, the
//!   edit waits until the watch has applied the revision that refused it and runs again on the
//!   new state. An edit guarded by its whole universe whose commit edits of one group's rules
//!   refused [`HOLD_AFTER`] times (they need not wait for it, and may keep getting in first)
//!   puts a hold, `holds/<uni>/<holder>` under a lease of [`HOLD_TTL`], and deletes it in its
//!   own commit; meanwhile those edits wait for it (see [`Guard::InUniverse`]).
//!   An edit with an idempotency record that is ready to commit while this store has
//!   [`BATCHES_IN_FLIGHT`] transactions in flight waits for one, and goes with the others
//!   that waited meanwhile (group commit, [`commit_batches`]): one transaction, each edit a
//!   transaction nested in it with its own guards, so one edit refused refuses no other.
//! - Liveness: [`Store::register_host`](super::Store::register_host) starts keeping
//!   `alive/<name>` alive under a lease of [`EtcdOptions::lease_ttl`] (renewed every third of
//!   the TTL) on a thread of its own with its own etcd connection, so that no amount of edit
//!   work can delay a renewal, then puts `hosts/<name>` (an edit, which waits for this host's
//!   watch: the liveness record does not wait for it); each reported realized revision is
//!   written there. The thread talks to one member at a time (a client per member, from a
//!   random one): a request it does not answer within a third of the TTL, or that fails, goes
//!   to the next member, for the same lease, for as long as the lease lives; so one stalled
//!   member never lets the lease lapse. When a renewal shows a new etcd leader (a later raft
//!   term) or came after a failover, the record moves to a new lease while the old one still
//!   lives (a leader that resumes from a stall may revoke the old one: `Shared::move_record`). If the store is dropped, or no
//!   member renews the lease for a TTL (or etcd answers that it expired), etcd deletes the key
//!   and every host shows this one unhealthy; the thread grants a new lease and puts the
//!   record again as soon as it can. Failovers and expiries are counted ([`LeaseStats`]).
//! - History: etcd keeps every revision until it is compacted. Every host compacts it every
//!   [`COMPACT_INTERVAL`] to the revision it had applied an interval before (etcd's own
//!   `--auto-compaction-*` does the same, if set); a watch that falls behind a compaction reads
//!   the state again.
//!
//! - Audit trail: `audit/<time in ns, 20 digits>-<host>-<n>`, one key per record (JSON), apart
//!   from the desired state: a read of the state skips the `audit/` range, and the watch leaves
//!   it out. Every host trims the trail every [`AUDIT_TRIM_INTERVAL`]: records older than the
//!   retention age go (one range delete, keys sort by time), then the oldest beyond the
//!   retained count.
//! - Credentials: with `EtcdOptions::user`, the client authenticates as that etcd user (and
//!   renews its auth token when etcd expires it). A request etcd refuses for that user's
//!   permissions is [`Error::Denied`], not "unavailable": retrying cannot help. The README
//!   ("etcd access control") lists which keys a host reads and writes.
//!
//! etcd limits one transaction to `--max-txn-ops` operations (128 by default) and one request to
//! `--max-request-bytes` (1.5 MiB). No edit of the model writes more than a handful of keys (a
//! universe is deleted by one range delete); an edit that would exceed a limit is refused whole
//! as a 409 `limit_exceeded`.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, EventType, GetOptions, PutOptions,
    SortOrder, SortTarget, Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use tokio::sync::watch;
use tokio::task::AbortHandle;
use tokio::time::{Instant, MissedTickBehavior};

use super::layout::{self, Guard, Op};
use super::{
    audit_matches, AuditRetention, CommitAudit, Error, HostStatus, Idempotency, Outcome, Realized,
    Recorded, Result, IDEMPOTENCY_TTL,
};
use crate::audit::{AuditRecord, Query as AuditQuery};
use crate::model::{self, HostRecord, State};
use crate::phases::{self, Phase};

#[path = "scoped.rs"]
mod scoped;

/// Default key prefix of the fleet's state.
pub const DEFAULT_PREFIX: &str = "/verse/";
/// Default time-to-live of a host's liveness record: a host whose `versed` stopped (or lost
/// etcd) shows unhealthy after about this long.
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(5);

/// How long one unary etcd request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// HTTP/2 keep-alive pings on the etcd connection: a dead connection (etcd gone, network cut)
/// is noticed within interval + timeout, and the watch restarts.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(2);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(2);
/// How long an edit waits for this store's watch to deliver a revision (its own commit, so that
/// `snapshot()` shows it on return; or the one that refused it, before it runs again).
const APPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts of one edit against concurrent edits of the same universe before giving up.
const MAX_ATTEMPTS: u32 = 64;
/// Commits of an edit guarded by its whole universe refused by edits of one group's rules (a
/// group key newer than its state) before it holds them off ([`Guard::InUniverse`]).
const HOLD_AFTER: u32 = 3;
/// The lease of a hold: how long the edits of one group's rules of a universe wait at most for
/// an edit whose host died holding them off (etcd's shortest lease is about 1.5 election
/// timeouts: 2 s by default).
const HOLD_TTL: Duration = Duration::from_secs(3);
/// Backoff of reconnections (watch, liveness, first read).
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// Largest message accepted from etcd (a full read of a large state): gRPC's default is 4 MiB.
const MAX_MESSAGE: usize = 256 << 20;
/// etcd's default `--max-txn-ops`.
pub const MAX_TXN_OPS: usize = 128;

/// An audit record as etcd holds it.
#[derive(serde::Serialize, serde::Deserialize)]
struct StoredAudit {
    #[serde(flatten)]
    record: AuditRecord,
    /// Written by the edit's own transaction: the record's revision is the key's.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    in_commit: bool,
}

/// Relative keys (under the prefix).
const ALIVE: &str = "alive/";
/// The first key after every `alive/…` key (`'/' + 1`).
const ALIVE_END: &str = "alive0";
/// How long a store keeps following the hosts' liveness records after the last feed of them
/// is dropped ([`Store::subscribe_hosts`](super::Store::subscribe_hosts)): a burst of edits
/// through one API keeps one watch, not one per edit. The default of
/// [`EtcdOptions::liveness_linger`].
pub const LIVENESS_LINGER: Duration = Duration::from_secs(60);
/// How long [`Store::subscribe_hosts`](super::Store::subscribe_hosts) waits for a read of the
/// liveness records when it is not following them; past it, it fails (never answers what it
/// has not read).
const LIVENESS_SYNC_WAIT: Duration = Duration::from_secs(5);
const AUDIT: &str = "audit/";
/// The first key after every `audit/…` key (`'/' + 1`).
const AUDIT_END: &str = "audit0";
/// How often each host trims the audit trail to its retention.
pub const AUDIT_TRIM_INTERVAL: Duration = Duration::from_secs(30);
/// How often each host compacts etcd's history, and how much history it keeps.
pub const COMPACT_INTERVAL: Duration = Duration::from_secs(300);
/// Records read per request by a query of the audit trail.
const AUDIT_PAGE: i64 = 1000;
/// Idempotency records: `~idem/<sha256 of the key>`, under a lease. `~` sorts after every other
/// key, so the records lie outside the ranges the watch follows (they are not state).
const IDEMPOTENCY: &str = "~idem/";
/// A recorded response body larger than this is not kept (the status and revision are).
const MAX_RECORDED_BODY: usize = 64 << 10;
/// How long an edit whose commit got no answer tries to settle its outcome.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);

/// How to reach etcd and where the state lives there.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdOptions {
    /// Client endpoints, `HOST:PORT` (or `http://HOST:PORT`).
    pub endpoints: Vec<String>,
    /// Prefix of every key; ends with `/`.
    pub prefix: String,
    /// Time-to-live of this host's liveness record (at least one second).
    pub lease_ttl: Duration,
    /// The etcd user this host authenticates as, and its password (`None`: no etcd user, or
    /// the user named by the client certificate's CN when etcd checks client certificates).
    pub user: Option<(String, String)>,
    /// How much of the audit trail to keep.
    pub audit_retention: AuditRetention,
    /// TLS to etcd (`https://` for every endpoint); `None`: plain gRPC.
    pub tls: Option<EtcdTls>,
    /// How long the hosts' liveness records stay followed after the last need of them
    /// ([`LIVENESS_LINGER`] by default).
    pub liveness_linger: Duration,
    /// Follow only what host `scope` needs (see [`scoped`]): the hosts, its own placements, and
    /// the universes with an endpoint on it. For a host that answers no API (a simulated
    /// host): such a store cannot check or run edits of universes it does not hold. `None`
    /// (the default): the whole desired state.
    pub scope: Option<String>,
}

/// TLS to etcd: the CA of etcd's certificate, and this host's client certificate and key
/// (PEM files) when etcd asks clients for one (`--client-cert-auth`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EtcdTls {
    pub ca_file: std::path::PathBuf,
    /// (certificate, key).
    pub identity: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

impl EtcdTls {
    /// etcd-client's TLS options, from the files.
    fn options(&self, endpoints: &str) -> Result<etcd_client::TlsOptions> {
        let read = |path: &std::path::Path| {
            std::fs::read(path).map_err(|e| Error::Connect {
                endpoints: endpoints.to_owned(),
                source: etcd_client::Error::InvalidArgs(format!(
                    "reading the TLS file {}: {e}",
                    path.display()
                )),
            })
        };
        let mut tls = etcd_client::TlsOptions::new()
            .ca_certificate(etcd_client::Certificate::from_pem(read(&self.ca_file)?));
        if let Some((cert, key)) = &self.identity {
            tls = tls.identity(etcd_client::Identity::from_pem(read(cert)?, read(key)?));
        }
        Ok(tls)
    }
}

impl EtcdOptions {
    /// The endpoints with the default prefix, lease TTL and audit retention, without TLS or
    /// an etcd user.
    pub fn new(endpoints: Vec<String>) -> EtcdOptions {
        EtcdOptions {
            endpoints,
            prefix: DEFAULT_PREFIX.to_owned(),
            lease_ttl: DEFAULT_LEASE_TTL,
            user: None,
            audit_retention: AuditRetention::default(),
            tls: None,
            liveness_linger: LIVENESS_LINGER,
            scope: None,
        }
    }
}

/// The etcd store. Use it through [`Store`](super::Store). Dropping it stops its watch and its
/// liveness threads (the leases then lapse).
pub struct Etcd {
    shared: Arc<Shared>,
    tasks: Mutex<Vec<AbortHandle>>,
    /// Dropped with the store: each liveness thread stops when its sender is gone.
    liveness: Mutex<Vec<tokio::sync::oneshot::Sender<()>>>,
}

/// What the background tasks share with the handle.
struct Shared {
    client: Client,
    /// How `client` was made, for the liveness threads' own connections.
    options: EtcdOptions,
    /// Whether liveness runs on a thread and a connection of its own (a store opened with
    /// [`Etcd::open`], a real host), or as a task on the shared client (simulated hosts, which
    /// share connections by design, see `crate::sim`).
    own_liveness: bool,
    /// Which member `client` sends to, when the client is this store's own.
    pin: Option<super::failover::Pin>,
    prefix: String,
    lease_ttl: Duration,
    /// The state published to subscribers.
    state: watch::Sender<Arc<State>>,
    /// What edits run on: the state with the guards' revisions, consistent with each other.
    view: watch::Sender<Arc<View>>,
    hosts: watch::Sender<Arc<Vec<HostStatus>>>,
    /// The hosts' liveness records, followed on demand.
    live: Liveness,
    /// The etcd revision that `view` reflects.
    applied: watch::Sender<i64>,
    /// Realized revisions reported for the hosts this store keeps alive, by name.
    local: Mutex<BTreeMap<String, Local>>,
    audit_retention: AuditRetention,
    /// Numbers the audit records of this store, so two in the same nanosecond differ.
    audit_seq: std::sync::atomic::AtomicU64,
    /// What the watch received.
    received: WatchCounters,
    /// The lease of the idempotency records written lately, and when it was granted.
    idem_lease: tokio::sync::Mutex<Option<(i64, Instant)>>,
    /// Commits refused by a guard (another edit of the same universe got in first).
    conflicts: std::sync::atomic::AtomicU64,
    /// Holds put by edits starved by edits of one group's rules ([`Guard::InUniverse`]).
    holds: std::sync::atomic::AtomicU64,
    /// Reads of an idempotency record made apart from a commit (a round trip of their own).
    idempotency_reads: std::sync::atomic::AtomicU64,
    /// Lease requests tried again on another member, and liveness leases that expired.
    lease_stats: LeaseCounters,
    /// Whose turn it is to commit, among this host's edits guarded by the same key.
    turns: Turns,
    /// Edits' transactions waiting to be sent, several in one ([`commit_batches`]).
    commits: tokio::sync::mpsc::UnboundedSender<Queued>,
    /// Which key ranges each revision changed, as this store's watch applied them: what tells
    /// which revisions a host that follows only its universes has realized ([`scoped`]).
    touches: Mutex<scoped::Touches>,
}

/// One queue per guarded key (a universe's `version`, the catalog, a counter, a host's slots)
/// among the edits of this host: an edit takes the turns of every key it guards, in key order
/// (so two edits never wait for each other), and gives them back when dropped. A key's queue
/// is forgotten when nobody holds or waits for it.
#[derive(Default)]
struct Turns(Mutex<std::collections::HashMap<String, Arc<tokio::sync::Mutex<()>>>>);

/// The turns an edit holds.
struct Turn<'a> {
    turns: &'a Turns,
    held: Vec<(String, tokio::sync::OwnedMutexGuard<()>)>,
}

/// The keys whose turns an edit guarded by `guards` takes.
fn turn_keys(guards: &std::collections::BTreeSet<Guard>) -> std::collections::BTreeSet<String> {
    guards
        .iter()
        .filter_map(|g| match g {
            Guard::Universe(u) => Some(layout::version_key(u)),
            Guard::Catalog => Some(layout::CATALOG.to_owned()),
            Guard::Unchanged(k) => Some(k.clone()),
            // A claim: two edits rarely claim the same one. And the edits of different groups
            // of one universe (each compares the universe's key) take no turns with each other.
            Guard::Absent(_) | Guard::InUniverse(_) => None,
        })
        .collect()
}

impl Turns {
    async fn take(&self, guards: &std::collections::BTreeSet<Guard>) -> Turn<'_> {
        let keys = turn_keys(guards);
        let mut turn = Turn { turns: self, held: Vec::with_capacity(keys.len()) };
        for key in keys {
            let queue = lock(&self.0).entry(key.clone()).or_default().clone();
            turn.held.push((key, queue.lock_owned().await));
        }
        turn
    }
}

impl Turn<'_> {
    /// Whether this turn is every turn an edit guarded by `guards` needs.
    fn covers(&self, guards: &std::collections::BTreeSet<Guard>) -> bool {
        turn_keys(guards).iter().all(|k| self.held.iter().any(|(held, _)| held == k))
    }
}

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        let mut queues = lock(&self.turns.0);
        for (key, guard) in self.held.drain(..) {
            drop(guard);
            if queues.get(&key).is_some_and(|q| Arc::strong_count(q) == 1) {
                queues.remove(&key);
            }
        }
    }
}

/// A hold an edit put (`holds/<uni>/<holder>`, relative: see [`Guard::InUniverse`]): deleted by
/// the edit's commit; if the edit ends otherwise, deleted when dropped (best effort: its lease
/// ends it anyway).
struct Hold {
    key: String,
    client: Client,
    prefix: String,
}

impl Hold {
    /// Deleted by the edit's commit: nothing left to do when dropped.
    fn released(&mut self) {
        self.key.clear();
    }
}

impl Drop for Hold {
    fn drop(&mut self) {
        if self.key.is_empty() {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
        let (key, client) = (format!("{}{}", self.prefix, self.key), self.client.clone());
        runtime.spawn(async move {
            if let Err(e) = timed("delete (hold)", client.kv_client().delete(key, None)).await {
                tracing::debug!(error = %e, "could not delete a hold; its lease ends it");
            }
        });
    }
}

/// What a store's watch has received since the store opened (`Store::watch_stats`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct WatchStats {
    /// Watch responses (etcd sends the events of one revision in one response).
    pub responses: u64,
    /// Events (one per key put or deleted).
    pub events: u64,
    /// Bytes of the responses as etcd encodes them (protobuf plus gRPC's 5-byte message
    /// prefix; HTTP/2 framing and TLS not counted).
    pub bytes: u64,
}

#[derive(Default)]
struct WatchCounters {
    responses: AtomicU64,
    events: AtomicU64,
    bytes: AtomicU64,
}

impl WatchCounters {
    fn count(&self, resp: &etcd_client::WatchResponse) {
        self.responses.fetch_add(1, Ordering::Relaxed);
        self.events.fetch_add(resp.events().len() as u64, Ordering::Relaxed);
        self.bytes.fetch_add(GRPC_PREFIX + encoded_len(resp), Ordering::Relaxed);
    }

    fn get(&self) -> WatchStats {
        WatchStats {
            responses: self.responses.load(Ordering::Relaxed),
            events: self.events.load(Ordering::Relaxed),
            bytes: self.bytes.load(Ordering::Relaxed),
        }
    }
}

/// What happened to this store's leases since it opened (`Store::lease_stats`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LeaseStats {
    /// Lease requests (a liveness renewal, grant or record put; the grant of the idempotency
    /// lease) that one member did not answer in time or failed in the transport, and that were
    /// tried on the next member.
    pub failovers: u64,
    /// Liveness leases given up for expired (etcd answered so, or their TTL passed with no
    /// member answering a renewal), each followed by a new lease and the record put again. An
    /// answered expiry means the host showed unhealthy meanwhile; a TTL that passed may not
    /// (a new etcd leader extends every lease by its TTL).
    pub expiries: u64,
}

#[derive(Default)]
struct LeaseCounters {
    failovers: AtomicU64,
    expiries: AtomicU64,
}

impl LeaseCounters {
    fn get(&self) -> LeaseStats {
        LeaseStats {
            failovers: self.failovers.load(Ordering::Relaxed),
            expiries: self.expiries.load(Ordering::Relaxed),
        }
    }
}

/// gRPC's length-prefixed message: a compression flag and a 4-byte length.
const GRPC_PREFIX: u64 = 5;

/// The size of `resp` in etcd's protobuf encoding (`etcdserverpb.WatchResponse`): what etcd
/// sent for it, computed from its fields (etcd-client does not keep the bytes).
fn encoded_len(resp: &etcd_client::WatchResponse) -> u64 {
    fn varint(v: u64) -> u64 {
        u64::from((64 - (v | 1).leading_zeros()).div_ceil(7))
    }
    // A scalar field: one tag byte (field numbers below 16) and the varint, if not default.
    fn scalar(v: i64) -> u64 {
        if v == 0 {
            0
        } else {
            1 + varint(v as u64)
        }
    }
    // A length-delimited field of `len` bytes.
    fn bytes(len: u64, always: bool) -> u64 {
        if len == 0 && !always {
            0
        } else {
            1 + varint(len) + len
        }
    }
    fn kv(kv: &etcd_client::KeyValue) -> u64 {
        bytes(kv.key().len() as u64, false)
            + scalar(kv.create_revision())
            + scalar(kv.mod_revision())
            + scalar(kv.version())
            + bytes(kv.value().len() as u64, false)
            + scalar(kv.lease())
    }
    let header = resp.header().map_or(0, |h| {
        let len = scalar(h.cluster_id() as i64)
            + scalar(h.member_id() as i64)
            + scalar(h.revision())
            + scalar(h.raft_term() as i64);
        bytes(len, true)
    });
    let events: u64 = resp
        .events()
        .iter()
        .map(|e| {
            let ty = match e.event_type() {
                EventType::Put => 0,
                EventType::Delete => 1,
            };
            let len = scalar(ty)
                + e.kv().map_or(0, |k| bytes(kv(k), true))
                + e.prev_kv().map_or(0, |k| bytes(kv(k), true));
            bytes(len, true)
        })
        .sum();
    header
        + scalar(resp.watch_id())
        + scalar(i64::from(resp.created()))
        + scalar(i64::from(resp.canceled()))
        + scalar(resp.compact_revision())
        + bytes(resp.cancel_reason().len() as u64, false)
        + events
}

/// The hosts' liveness records as this store last read them, and who needs them (see the
/// module docs: they are followed only while needed).
struct Liveness {
    /// By host name: the last realized report seen, and whether `alive/<name>` exists.
    alive: Mutex<BTreeMap<String, (Realized, bool)>>,
    /// How many [`Demand`]s are held.
    demand: Arc<watch::Sender<usize>>,
    /// Whether the records are followed: read, and watched since (false once the watch was
    /// closed for want of demand).
    synced: watch::Sender<bool>,
    /// Set just before the first read of the records, cleared when the watch closes: while
    /// clear, nobody looks at the hosts and a new host record publishes nothing (building the
    /// list costs O(hosts), and a fleet of N joining hosts would be N³ on hosts that never ask).
    following: std::sync::atomic::AtomicBool,
}

impl Default for Liveness {
    fn default() -> Liveness {
        Liveness {
            alive: Mutex::default(),
            demand: Arc::new(watch::channel(0).0),
            synced: watch::channel(false).0,
            following: std::sync::atomic::AtomicBool::new(false),
        }
    }
}

/// A need for the hosts' liveness records: the store follows them while one is held (and
/// [`LIVENESS_LINGER`] after).
pub struct Demand(Arc<watch::Sender<usize>>);

impl Demand {
    fn new(demand: &Arc<watch::Sender<usize>>) -> Demand {
        demand.send_modify(|n| *n += 1);
        Demand(demand.clone())
    }
}

impl Drop for Demand {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// Waits until no [`Demand`] has been held for `linger`.
async fn idle(mut demand: watch::Receiver<usize>, linger: Duration) {
    loop {
        if demand.wait_for(|n| *n == 0).await.is_err() {
            return;
        }
        tokio::select! {
            () = tokio::time::sleep(linger) => return,
            again = demand.wait_for(|n| *n > 0) => if again.is_err() { return },
        }
    }
}

struct Local {
    realized: watch::Sender<Realized>,
    /// Whether its liveness thread runs (started by `register_host`).
    alive: bool,
}

/// The desired state as this store last applied it, with the `mod_revision`s the guards of an
/// edit compare (see [`layout::Guard`]). Cheap to clone (persistent maps).
#[derive(Clone, Debug, Default)]
struct View {
    state: Arc<State>,
    /// `u/<uni>/version`, by universe.
    versions: imbl::HashMap<String, i64>,
    /// `catalog`.
    catalog: i64,
    /// Other guarded keys (`hosts/<name>`, `tokens/<id>`, the counters, `slots/<host>`, a
    /// group's `u/<uni>/groups/<sg>`), relative.
    keys: imbl::HashMap<String, i64>,
    /// The newest `mod_revision` of a host record (`hosts/<name>`) among `keys`.
    hosts_last: i64,
    /// By universe, the newest `mod_revision` of its `version` key and its group keys: its
    /// last change (an edit of one group's rules rewrites the group's key, not `version`).
    changed: imbl::HashMap<String, i64>,
    /// The holds (`holds/<uni>/<holder>`, relative: [`Guard::InUniverse`]).
    holds: imbl::HashSet<String>,
    /// The etcd revision the state is applied up to ([`Cache::revision`]): a key changed after
    /// it is a change the state does not hold.
    revision: i64,
}

impl View {
    /// Whether an edit holds off the edits of one group's rules of universe `uni`.
    fn held(&self, uni: &str) -> bool {
        let prefix = layout::holds_prefix(uni);
        self.holds.iter().any(|k| k.starts_with(&prefix))
    }

    fn mod_revision(&self, guard: &Guard) -> i64 {
        match guard {
            Guard::Universe(u) | Guard::InUniverse(u) => self.versions.get(u).copied().unwrap_or(0),
            Guard::Catalog => self.catalog,
            Guard::Unchanged(k) => self.keys.get(k).copied().unwrap_or(0),
            Guard::Absent(_) => 0,
        }
    }
}

/// What the follower task keeps.
#[derive(Default)]
struct Cache {
    state: State,
    versions: imbl::HashMap<String, i64>,
    catalog: i64,
    keys: imbl::HashMap<String, i64>,
    /// The newest `mod_revision` of a host record among `keys` (kept as they change).
    hosts_last: i64,
    /// See [`View::changed`].
    changed: imbl::HashMap<String, i64>,
    /// See [`View::holds`].
    holds: imbl::HashSet<String>,
    /// The etcd revision up to which the desired state is applied: every change of the
    /// desired state, and every guarded key, at or before it is in `state`. For a store with a
    /// scope, the newest revision any of its ranges is applied up to.
    revision: i64,
    /// What a store that follows one host's needs follows ([`EtcdOptions::scope`]).
    scope: Option<scoped::Scope>,
}

/// Why a watch stream ended.
enum WatchEnd {
    /// etcd no longer has the history since our revision: read everything again.
    Compacted,
    Failed(Error),
}

impl WatchEnd {
    /// A watch that failed for `reason` (no etcd error behind it).
    fn failed(reason: impl Into<String>) -> WatchEnd {
        let source = etcd_client::Error::WatchError(reason.into());
        WatchEnd::Failed(Error::Etcd { op: "watch", source })
    }

    /// How a watcher etcd cancelled ends its watch: [`WatchEnd::Compacted`] if the history it
    /// asked for is gone, else a failure with etcd's reason.
    fn cancelled(resp: &etcd_client::WatchResponse) -> WatchEnd {
        if resp.compact_revision() > 0 {
            return WatchEnd::Compacted;
        }
        WatchEnd::failed(format!("canceled by etcd: {}", resp.cancel_reason()))
    }
}

/// The next response of a watch stream, or how the watch ends if the stream ended or failed.
async fn next_response(
    stream: &mut etcd_client::WatchStream,
) -> Result<etcd_client::WatchResponse, WatchEnd> {
    match stream.message().await {
        Ok(Some(resp)) => Ok(resp),
        Ok(None) => Err(WatchEnd::failed("the stream ended")),
        Err(source) => Err(WatchEnd::Failed(Error::Etcd { op: "watch", source })),
    }
}

/// The events of a watch response one revision (one transaction) at a time, in order, each
/// with its revision: etcd sends every event of a revision in one response, and a revision is
/// applied as one batch, so that a published state is never half an edit.
fn by_revision(
    events: &[etcd_client::Event],
) -> impl Iterator<Item = (i64, &[etcd_client::Event])> {
    let revision = |e: &etcd_client::Event| e.kv().map_or(0, |kv| kv.mod_revision());
    let mut rest = events;
    std::iter::from_fn(move || {
        let rev = revision(rest.first()?);
        let n = rest.iter().position(|e| revision(e) != rev).unwrap_or(rest.len());
        let (batch, tail) = rest.split_at(n);
        rest = tail;
        Some((rev, batch))
    })
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for task in lock(&self.tasks).drain(..) {
            task.abort();
        }
        lock(&self.liveness).clear();
    }
}

impl Etcd {
    pub(super) async fn open(options: EtcdOptions) -> Result<Arc<Etcd>> {
        let (client, pin) = connect_pinned(&options).await?;
        Etcd::open_on(options, client, Some(pin)).await
    }

    /// [`Etcd::open`] over a client that others may share (a clone of one [`connect`] made):
    /// this store's watch and lease are its own streams on that client's connections (the
    /// lease kept by a task on that client, not on a thread of its own).
    pub(super) async fn open_with_client(
        options: EtcdOptions,
        client: Client,
    ) -> Result<Arc<Etcd>> {
        Etcd::open_on(options, client, None).await
    }

    /// `pin`: the handle on `client`'s member, if the client is this store's own (then its
    /// liveness runs on a thread and connections of its own too).
    async fn open_on(
        options: EtcdOptions,
        client: Client,
        pin: Option<super::failover::Pin>,
    ) -> Result<Arc<Etcd>> {
        let endpoints = options.endpoints.join(",");
        let mut prefix = options.prefix.clone();
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        let (state, _) = watch::channel(Arc::new(State::default()));
        let (view, _) = watch::channel(Arc::new(View::default()));
        let (hosts, _) = watch::channel(Arc::new(Vec::new()));
        let (applied, _) = watch::channel(0);
        let (commits, queued) = tokio::sync::mpsc::unbounded_channel();
        let committer = tokio::spawn(commit_batches(client.clone(), queued));
        let shared = Arc::new(Shared {
            client,
            options: options.clone(),
            own_liveness: pin.is_some(),
            pin,
            prefix,
            lease_ttl: options.lease_ttl,
            state,
            view,
            hosts,
            live: Liveness::default(),
            applied,
            local: Mutex::new(BTreeMap::new()),
            audit_retention: options.audit_retention,
            audit_seq: std::sync::atomic::AtomicU64::new(0),
            received: WatchCounters::default(),
            idem_lease: tokio::sync::Mutex::new(None),
            conflicts: std::sync::atomic::AtomicU64::new(0),
            holds: std::sync::atomic::AtomicU64::new(0),
            idempotency_reads: std::sync::atomic::AtomicU64::new(0),
            lease_stats: LeaseCounters::default(),
            turns: Turns::default(),
            commits,
            touches: Mutex::default(),
        });

        let mut delay = RETRY_MIN;
        // The first state must decode: publishing nothing (or an empty state) instead would
        // make the reconciler tear the dataplane down.
        let cache = loop {
            let read = match &options.scope {
                Some(host) => shared.read_scoped(host).await,
                None => shared.read().await,
            };
            match read {
                Ok(cache) => break cache,
                // Waiting cannot help these: a corrupt key, or credentials etcd refuses.
                Err(e @ (Error::Corrupt { .. } | Error::Denied { .. })) => return Err(e),
                Err(Error::Etcd { source, .. }) if credentials_refused(&source) => {
                    return Err(Error::Connect { endpoints: endpoints.clone(), source })
                }
                Err(e) => {
                    tracing::warn!(
                        etcd = %endpoints, error = %e, retry_in = ?delay,
                        "cannot read the desired state from etcd yet; retrying"
                    );
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(RETRY_MAX);
                }
            }
        };
        shared.publish(&cache, true, true);
        tracing::info!(
            etcd = %endpoints,
            prefix = %shared.prefix,
            etcd_revision = cache.revision,
            revision = cache.state.revision,
            "following the desired state in etcd"
        );

        let follow = tokio::spawn(shared.clone().follow(cache));
        let trim = tokio::spawn(shared.clone().trim_audit());
        let compact = tokio::spawn(shared.clone().compact_history());
        let liveness = tokio::spawn(shared.clone().follow_liveness());
        Ok(Arc::new(Etcd {
            shared,
            tasks: Mutex::new(vec![
                committer.abort_handle(),
                follow.abort_handle(),
                trim.abort_handle(),
                compact.abort_handle(),
                liveness.abort_handle(),
            ]),
            liveness: Mutex::new(Vec::new()),
        }))
    }

    pub(super) fn snapshot(&self) -> Arc<State> {
        self.shared.state.borrow().clone()
    }

    pub(super) fn watch_stats(&self) -> WatchStats {
        self.shared.received.get()
    }

    pub(super) fn subscribe(&self) -> watch::Receiver<Arc<State>> {
        self.shared.state.subscribe()
    }

    pub(super) fn lease_stats(&self) -> LeaseStats {
        self.shared.lease_stats.get()
    }

    pub(super) fn conflicts(&self) -> u64 {
        self.shared.conflicts.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub(super) fn holds(&self) -> u64 {
        self.shared.holds.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub(super) fn idempotency_reads(&self) -> u64 {
        self.shared.idempotency_reads.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// See [`Store::subscribe_hosts`](super::Store::subscribe_hosts).
    pub(super) async fn subscribe_hosts(&self) -> Result<super::HostsFeed> {
        let live = &self.shared.live;
        let demand = Demand::new(&live.demand);
        let mut synced = live.synced.subscribe();
        if tokio::time::timeout(LIVENESS_SYNC_WAIT, synced.wait_for(|s| *s)).await.is_err() {
            // Fail rather than answer what was not read: the hosts before the first read (all
            // of them unhealthy at revision 0), or from before the last linger (a lapse since
            // then unseen). An edit's acknowledgement would stop waiting for hosts shown
            // unhealthy, and a client would take them as out of the fleet.
            return Err(Error::Timeout {
                op: "range (read the hosts' liveness records)",
                after: LIVENESS_SYNC_WAIT,
            });
        }
        Ok(super::HostsFeed { rx: self.shared.hosts.subscribe(), _demand: Some(demand) })
    }

    /// See [`Store::edit`](super::Store::edit) and the module contract.
    pub(super) async fn edit<T, F>(&self, f: F) -> Result<(T, u64)>
    where
        F: FnMut(&mut State) -> model::Result<T> + Send,
        T: Send + 'static,
    {
        self.run(f, super::unrecorded(), None).await.map(Outcome::applied)
    }

    /// See [`Store::edit_recorded`](super::Store::edit_recorded).
    pub(super) async fn edit_recorded<T, F, R>(
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
        self.edit_audited(idem, f, respond, None).await
    }

    /// See [`Store::edit_audited`](super::Store::edit_audited).
    pub(super) async fn edit_audited<T, F, R>(
        &self,
        idem: &Idempotency,
        f: F,
        respond: R,
        audit: Option<&dyn CommitAudit<T>>,
    ) -> Result<Outcome<T>>
    where
        F: FnMut(&mut State) -> model::Result<T> + Send,
        R: Fn(&T) -> (u16, Option<serde_json::Value>) + Send,
        T: Send + 'static,
    {
        // No read of the key first: the commit requires the key's record to be absent, so an
        // edit whose key was recorded (or fenced) before cannot commit, and the refused
        // commit's own transaction reads the record then. It is read apart only when the edit
        // cannot run on this host's state (a retry of a delete that happened finds nothing to
        // delete): a round trip to etcd saved on every other edit.
        match self.run(f, Some((idem, respond)), audit).await {
            Err(Error::Rejected(refused)) if idem.from_client => {
                match self.shared.recorded_timed(idem).await? {
                    Some(rec) => Ok(Outcome::Replayed(rec)),
                    None => Err(Error::Rejected(refused)),
                }
            }
            other => other,
        }
    }

    async fn run<T, F, R>(
        &self,
        mut f: F,
        record: Option<(&Idempotency, R)>,
        audit: Option<&dyn CommitAudit<T>>,
    ) -> Result<Outcome<T>>
    where
        F: FnMut(&mut State) -> model::Result<T> + Send,
        R: Fn(&T) -> (u16, Option<serde_json::Value>) + Send,
        T: Send + 'static,
    {
        let sh = &self.shared;
        // Cleared when etcd refuses the commit as too large with the record in it: then the
        // edit is tried once more without it (the API writes the record apart).
        let mut with_audit = audit.is_some();
        // The turn, once taken, is kept until the edit is done: an edit that runs again (the
        // state changed while it waited for its turn, or a guard refused its commit) keeps its
        // place, rather than queue again behind this host's later edits of the same universe
        // (which, under load, could find the state changed each time and queue again).
        let mut turn: Option<Turn<'_>> = None;
        // The holds this edit put, by universe, once edits of one group's rules refused its
        // commit [`HOLD_AFTER`] times ([`Guard::InUniverse`]); deleted by its commit, or when
        // dropped.
        let mut holds: BTreeMap<String, Hold> = BTreeMap::new();
        let mut refused_by_groups = 0;
        // Attempts, and the runs again that waited for a hold to go (which are no contention,
        // and not counted as attempts: at most [`MAX_ATTEMPTS`] of them).
        let (mut attempt, mut held_off) = (0, 0);
        loop {
            attempt += 1;
            if attempt > MAX_ATTEMPTS {
                return Err(Error::Contention { attempts: MAX_ATTEMPTS });
            }
            let validating = Instant::now();
            let view = sh.view.borrow().clone();
            let base = &view.state;
            let mut next = State::clone(base);
            let out = f(&mut next)?;
            if !next.is_changed() {
                return sh.unchanged(out, base.revision, record.as_ref().map(|r| r.0)).await;
            }
            next.check_fits()?;
            let delta = if holds.is_empty() {
                layout::delta(base, &next)?
            } else {
                layout::delta_held(base, &next)?
            };
            if delta.is_empty() {
                return sh.unchanged(out, base.revision, record.as_ref().map(|r| r.0)).await;
            }
            // This host's edits of the same universe (or of the same counter) take turns: one
            // waiting here costs nothing, where two committing at once cost a refused commit (a
            // round trip to etcd) and a run again. The turn lasts until the watch has the
            // outcome, so that the next one runs on it.
            phases::since(Phase::Validate, validating);
            if !turn.as_ref().is_some_and(|t| t.covers(&delta.guards)) {
                // None yet, or this run guards other keys than the last: taken anew (in key
                // order, so that two edits never wait for each other).
                drop(turn.take());
                let waiting = Instant::now();
                turn = Some(sh.turns.take(&delta.guards).await);
                phases::since(Phase::EditLock, waiting);
                let now = sh.view.borrow().clone();
                if delta.guards.iter().any(|g| now.mod_revision(g) != view.mod_revision(g)) {
                    // Another edit of this host changed what this one depends on meanwhile:
                    // run again on the new state, keeping the turn.
                    continue;
                }
            }
            // An edit of one group's rules while an edit of its universe holds them off: it
            // waits until the hold is gone, then runs again (keeping its turn).
            let held = delta.guards.iter().find_map(|g| match g {
                Guard::InUniverse(u) if sh.view.borrow().held(u) => Some(u.clone()),
                _ => None,
            });
            if let Some(uni) = held.filter(|_| held_off < MAX_ATTEMPTS) {
                (attempt, held_off) = (attempt - 1, held_off + 1);
                sh.wait_unheld(&uni).await;
                continue;
            }
            let mut compares: Vec<Compare> = delta
                .guards
                .iter()
                .map(|g| match g {
                    Guard::Absent(k) => Compare::create_revision(sh.key(k), CompareOp::Equal, 0),
                    Guard::Universe(u) | Guard::InUniverse(u) => Compare::mod_revision(
                        sh.key(&layout::version_key(u)),
                        CompareOp::Equal,
                        view.mod_revision(g),
                    ),
                    Guard::Catalog => Compare::mod_revision(
                        sh.key(layout::CATALOG),
                        CompareOp::Equal,
                        view.mod_revision(g),
                    ),
                    Guard::Unchanged(k) => {
                        Compare::mod_revision(sh.key(k), CompareOp::Equal, view.mod_revision(g))
                    }
                })
                .collect();
            // An edit of the whole universe also requires that no edit of one of its groups
            // committed since its state ([`Guard::Universe`]): every group key of the universe
            // is at most the revision the state is applied up to. An edit of one group's rules,
            // that no edit of its universe holds them off ([`Guard::InUniverse`]): no key under
            // the universe's `holds/`.
            let (mut whole, mut unheld) = (Vec::new(), Vec::new());
            for g in &delta.guards {
                let (prefix, compare, into) = match g {
                    Guard::Universe(u) => {
                        let prefix = sh.key(&layout::groups_prefix(u));
                        let newer = view.revision + 1;
                        let compare = Compare::mod_revision(prefix.clone(), CompareOp::Less, newer);
                        (prefix, compare, &mut whole)
                    }
                    Guard::InUniverse(u) => {
                        let prefix = sh.key(&layout::holds_prefix(u));
                        let compare = Compare::create_revision(prefix.clone(), CompareOp::Equal, 0);
                        (prefix, compare, &mut unheld)
                    }
                    _ => continue,
                };
                compares.push(compare.with_range(prefix_end(&prefix)));
                into.push(prefix);
            }
            let mut ops: Vec<TxnOp> = delta.ops.iter().map(|op| sh.txn_op(op)).collect();
            // This edit's holds go with its commit.
            let released: Vec<String> = holds.values().map(|h| sh.key(&h.key)).collect();
            ops.extend(released.iter().map(|k| TxnOp::delete(k.clone(), None)));
            // What it writes, so that edits batched into one transaction never overlap, and
            // what it compares without writing: no edit in its batch may write there (etcd
            // compares every nested transaction against the state before the batch).
            let compared = delta
                .guards
                .iter()
                .filter_map(|g| match g {
                    Guard::InUniverse(u) => Some(sh.key(&layout::version_key(u))),
                    _ => None,
                })
                .chain(whole.iter().cloned())
                .chain(unheld.iter().cloned())
                .collect();
            let mut footprint = Footprint { compared, deletes: released, ..Footprint::default() };
            for op in &delta.ops {
                match op {
                    Op::Put { key, value } => {
                        footprint.bytes += key.len() + value.len();
                        footprint.puts.push(sh.key(key));
                    }
                    Op::Delete { key } => footprint.deletes.push(sh.key(key)),
                    Op::DeletePrefix { prefix } => footprint.deletes.push(sh.key(prefix)),
                }
            }
            let mut audited = false;
            if let Some((idem, respond)) = &record {
                let (status, body) = respond(&out);
                let audit_record =
                    audit.filter(|_| with_audit).and_then(|a| a.record(&out, status));
                let rec = Recorded {
                    fingerprint: idem.fingerprint.clone(),
                    status,
                    body: body.filter(|b| b.to_string().len() <= MAX_RECORDED_BODY),
                    revision: 0,
                };
                let key = sh.key(&idempotency_key(idem));
                compares.push(Compare::create_revision(key.clone(), CompareOp::Equal, 0));
                let lease = sh.idempotency_lease().await?;
                let value = serde_json::to_vec(&rec).unwrap_or_default();
                footprint.bytes += key.len() + value.len();
                footprint.puts.push(key.clone());
                footprint.recorded = true;
                ops.push(TxnOp::put(key, value, Some(PutOptions::new().with_lease(lease))));
                // The audit record in the same transaction (one Raft entry, not two), unless
                // it would take the edit past etcd's operations per transaction: the API then
                // writes it apart, and the edit's own limit stays what it was.
                if let Some(rec) = audit_record.filter(|_| ops.len() < MAX_TXN_OPS) {
                    let (key, value) = sh.audit_entry(&rec, true)?;
                    footprint.bytes += key.len() + value.len();
                    footprint.puts.push(key.clone());
                    ops.push(TxnOp::put(key, value, None));
                    audited = true;
                }
            }
            if ops.len() > MAX_TXN_OPS || compares.len() > MAX_TXN_OPS {
                return Err(model::Error::conflict(
                    "limit_exceeded",
                    None,
                    format!(
                        "this edit changes {} keys in etcd at once, more than the {MAX_TXN_OPS} \
                         operations one etcd transaction may hold (etcd --max-txn-ops): split it \
                         into smaller edits",
                        ops.len()
                    ),
                )
                .into());
            }
            // When a guard fails, the transaction reads the guarded keys instead (and the
            // catalog, rewritten by the deletion of a universe whose version key is gone): the
            // edit then waits for the revisions that changed them, never for a later one the
            // state's watcher may not carry (an audit, idempotency or liveness record). And it
            // reads the idempotency record, last: a commit refused because the key was
            // recorded (a retry of an edit that happened) is answered from that read, and one
            // refused by a guard alone knows at once that it is no replay, with no round trip
            // of its own to etcd.
            let mut reads: Vec<TxnOp> = delta
                .guards
                .iter()
                .map(|g| match g {
                    Guard::Absent(k) | Guard::Unchanged(k) => k.clone(),
                    Guard::Universe(u) | Guard::InUniverse(u) => layout::version_key(u),
                    Guard::Catalog => layout::CATALOG.to_owned(),
                })
                .chain([layout::CATALOG.to_owned()])
                .map(|key| TxnOp::get(sh.key(&key), Some(GetOptions::new().with_keys_only())))
                .collect();
            // And the newest group key of each universe compared whole, in `whole`'s order,
            // then the newest hold of each universe of an edit of one group, in `unheld`'s.
            reads.extend(whole.iter().chain(&unheld).map(|prefix| {
                TxnOp::get(
                    prefix.clone(),
                    Some(
                        GetOptions::new()
                            .with_range(prefix_end(prefix))
                            .with_keys_only()
                            .with_sort(SortTarget::Mod, SortOrder::Descend)
                            .with_limit(1),
                    ),
                )
            }));
            if let Some((idem, _)) = &record {
                reads.push(TxnOp::get(sh.key(&idempotency_key(idem)), None));
            }
            let committing = Instant::now();
            let committed = sh.commit(Pending { compares, ops, reads, footprint }).await;
            phases::since(Phase::Commit, committing);
            let resp = match committed {
                Err(Error::Etcd { source: etcd_client::Error::GRpcStatus(status), .. })
                    if status.code() == tonic::Code::InvalidArgument && audited =>
                {
                    // Perhaps too large only with the audit record: once more without it.
                    tracing::debug!(error = %status.message(), "etcd refused an edit with its audit record; trying without");
                    with_audit = false;
                    continue;
                }
                Err(Error::Etcd { source: etcd_client::Error::GRpcStatus(status), .. })
                    if status.code() == tonic::Code::InvalidArgument =>
                {
                    // etcd's own limits (a lower --max-txn-ops, --max-request-bytes): this
                    // edit will never pass.
                    return Err(model::Error::conflict(
                        "limit_exceeded",
                        None,
                        format!("etcd refused this edit as too large: {}", status.message()),
                    )
                    .into());
                }
                // Refused for this host's etcd user: nothing was written.
                Err(e @ Error::Denied { .. }) => return Err(e),
                Err(e) => match &record {
                    // The commit may or may not have happened: settle it before answering.
                    Some((idem, _)) => {
                        return match sh.settle(idem, e).await? {
                            Some(revision) => {
                                if audited {
                                    audit.inspect(|a| a.written());
                                }
                                sh.wait_applied(i64::try_from(revision).unwrap_or(0)).await;
                                Ok(Outcome::Applied { out, revision })
                            }
                            None => unreachable!("settle fails when the edit did not happen"),
                        };
                    }
                    None => return Err(e),
                },
                Ok(resp) => resp,
            };
            let at = resp.revision;
            if resp.succeeded {
                // Its holds were deleted by the commit.
                holds.values_mut().for_each(Hold::released);
                if audited {
                    audit.inspect(|a| a.written());
                }
                let echo = Instant::now();
                sh.wait_applied(at).await;
                phases::since(Phase::WatchEcho, echo);
                sh.clean_up(delta.cleanup).await;
                return Ok(Outcome::Applied { out, revision: u64::try_from(at).unwrap_or(0) });
            }
            if let Some((idem, _)) = &record {
                // The same key committed before or meanwhile (a retry of the same request), or
                // a fence is there (lifted now, so that the next attempt may commit): read by
                // the transaction's else-branch, its last read.
                let read = match resp.responses.last() {
                    Some(TxnOpResponse::Get(range)) => range.kvs().first().cloned(),
                    _ => None,
                };
                if let Some(rec) = sh.record_read(idem, read).await? {
                    return Ok(Outcome::Replayed(rec));
                }
            }
            // Another edit of the same universe (or a claim) got in first: run again on the
            // state that includes it, as soon as the watch has applied it.
            sh.conflicts.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let changed = guards_changed_at(&resp.responses, &delta.guards, &view).unwrap_or(at);
            tracing::debug!(
                attempt,
                etcd_revision = changed,
                "a guard failed; running the edit again"
            );
            let waiting = Instant::now();
            sh.wait_applied(changed).await;
            // What the reads of the groups and holds say (after those of the guards and the
            // catalog): which universes' groups changed since this edit's state, and the
            // newest hold that refused it.
            let newest = |i: usize| match resp.responses.get(delta.guards.len() + 1 + i) {
                Some(TxnOpResponse::Get(range)) => range.kvs().first().map(|kv| kv.mod_revision()),
                _ => None,
            };
            let hold_at = (0..unheld.len()).filter_map(|i| newest(whole.len() + i)).max();
            if let Some(hold_at) = hold_at {
                // Held off, not outrun: wait until the hold is gone, then run again (keeping
                // the turn), as before the commit.
                sh.wait_applied(hold_at).await;
                phases::since(Phase::ConflictWait, waiting);
                if held_off < MAX_ATTEMPTS {
                    (attempt, held_off) = (attempt - 1, held_off + 1);
                }
                for g in &delta.guards {
                    if let Guard::InUniverse(u) = g {
                        sh.wait_unheld(u).await;
                    }
                }
                continue;
            }
            let outrun: Vec<String> = delta
                .guards
                .iter()
                .filter_map(|g| match g {
                    Guard::Universe(u) => Some(u),
                    _ => None,
                })
                .zip(0..)
                .filter(|(_, i)| newest(*i).is_some_and(|r| r > view.revision))
                .map(|(u, _)| u.clone())
                .collect();
            if !outrun.is_empty() {
                refused_by_groups += 1;
            }
            if refused_by_groups >= HOLD_AFTER {
                // Edits of one group's rules keep getting in first (each moves a group key
                // this edit's guard compares, and they do not wait for it): hold them off
                // until this edit commits (unless its hold of the universe is still there).
                let live = sh.view.borrow().clone();
                for uni in outrun {
                    if holds.get(&uni).is_some_and(|h| live.holds.contains(&h.key)) {
                        continue;
                    }
                    if let Some(hold) = sh.hold(&uni).await {
                        holds.insert(uni, hold);
                    }
                }
            }
            if attempt > 8 {
                // Many collisions in a row: let the others drift apart.
                let ms = rand::random_range(0..=u64::from(attempt.min(40)));
                tokio::time::sleep(Duration::from_millis(ms)).await;
            }
            phases::since(Phase::ConflictWait, waiting);
        }
    }

    /// Keeps the host's liveness record alive, and records the host in the desired state.
    pub(super) async fn register_host(
        &self,
        name: &str,
        underlay_ip: Option<Ipv4Addr>,
        api: Option<String>,
        api_fingerprint: Option<String>,
    ) -> Result<()> {
        // Liveness first: the record of the host is an edit, which returns only once this
        // host's watch has applied it (up to `APPLY_TIMEOUT`); the liveness record must not
        // wait for that, or the host shows unhealthy to every other host meanwhile.
        self.start_liveness(name)?;
        let record = HostRecord { name: name.to_owned(), underlay_ip, api, api_fingerprint };
        self.edit(|s| {
            if s.hosts.get(name) != Some(&record) {
                s.hosts.insert(name.to_owned(), record.clone());
                s.revision += 1;
            }
            Ok(())
        })
        .await?;
        Ok(())
    }

    /// Starts keeping `alive/<name>` alive (once per name and store).
    fn start_liveness(&self, name: &str) -> Result<()> {
        let realized = {
            let mut local = lock(&self.shared.local);
            let entry = local.entry(name.to_owned()).or_insert_with(|| Local {
                realized: watch::channel(Realized::default()).0,
                alive: false,
            });
            if entry.alive {
                return Ok(());
            }
            entry.alive = true;
            entry.realized.subscribe()
        };
        if !self.shared.own_liveness {
            let task = tokio::spawn(self.shared.clone().keep_alive(name.to_owned(), realized));
            lock(&self.tasks).push(task.abort_handle());
            return Ok(());
        }
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let shared = self.shared.clone();
        let name = name.to_owned();
        let thread = std::thread::Builder::new()
            .name(format!("liveness-{name}"))
            .spawn(move || shared.liveness_thread(name, realized, stopped));
        if let Err(e) = thread {
            return Err(Error::Etcd {
                op: "lease keep-alive",
                source: etcd_client::Error::Internal(format!("cannot start its thread: {e}")),
            });
        }
        lock(&self.liveness).push(stop);
        Ok(())
    }

    pub(super) async fn append_audit(&self, record: &AuditRecord) -> Result<()> {
        let sh = &self.shared;
        let (key, value) = sh.audit_entry(record, false)?;
        timed("put (audit record)", sh.client.kv_client().put(key, value, None)).await?;
        Ok(())
    }

    /// Pages through the trail from the newest record back until `query.limit` match.
    pub(super) async fn query_audit(&self, query: &AuditQuery) -> Result<Vec<AuditRecord>> {
        let sh = &self.shared;
        let oldest = std::time::SystemTime::now()
            .checked_sub(sh.audit_retention.max_age)
            .unwrap_or(std::time::UNIX_EPOCH);
        let floor = query.since.map_or(oldest, |s| s.max(oldest));
        let start = sh.key(&format!("{AUDIT}{:020}", nanos_since_epoch(floor)));
        let mut end = sh.key(AUDIT_END);
        let mut out = Vec::new();
        let mut kv = sh.client.kv_client().max_decoding_message_size(MAX_MESSAGE);
        while out.len() < query.limit {
            let options = GetOptions::new()
                .with_range(end.clone())
                .with_sort(SortTarget::Key, SortOrder::Descend)
                .with_limit(AUDIT_PAGE);
            let resp =
                timed("range (read the audit trail)", kv.get(start.clone(), Some(options))).await?;
            for kv in resp.kvs() {
                match serde_json::from_slice::<StoredAudit>(kv.value()) {
                    Ok(StoredAudit { mut record, in_commit })
                        if audit_matches(&record, query, oldest) =>
                    {
                        if in_commit {
                            // Written by the edit's own transaction: its revision is the key's.
                            record.revision = u64::try_from(kv.mod_revision()).ok();
                        }
                        out.push(record)
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(
                        key = %String::from_utf8_lossy(kv.key()), error = %e,
                        "skipping an audit record that does not parse"
                    ),
                }
                if out.len() == query.limit {
                    break;
                }
            }
            match resp.kvs().last() {
                Some(last) if resp.kvs().len() as i64 == AUDIT_PAGE => {
                    end = String::from_utf8_lossy(last.key()).into_owned();
                }
                _ => break,
            }
        }
        out.reverse();
        Ok(out)
    }

    pub(super) fn report(&self, name: &str, report: Realized) {
        let mut local = lock(&self.shared.local);
        match local.get(name) {
            Some(l) => {
                l.realized.send_replace(report);
            }
            None => {
                let (realized, _) = watch::channel(report);
                local.insert(name.to_owned(), Local { realized, alive: false });
            }
        }
    }
}

impl Shared {
    fn key(&self, relative: &str) -> String {
        format!("{}{relative}", self.prefix)
    }

    /// The key range of the desired state: everything under the prefix past the audit trail
    /// (and the liveness records, which sort before it) and before the idempotency records
    /// (which sort last, `~`).
    fn state_range(&self) -> (String, Vec<u8>) {
        (self.key(AUDIT_END), self.key(IDEMPOTENCY).into_bytes())
    }

    /// The key and value of an audit record: `in_commit` for one written by an edit's own
    /// transaction, whose revision is then the key's (a query fills it in).
    fn audit_entry(&self, record: &AuditRecord, in_commit: bool) -> Result<(String, Vec<u8>)> {
        let nanos = record.time.0.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let n = self.audit_seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let key = self.key(&format!("{AUDIT}{:020}-{}-{n}", nanos.as_nanos(), record.host));
        let stored = StoredAudit { record: record.clone(), in_commit };
        let value = serde_json::to_vec(&stored).map_err(|e| Error::Corrupt {
            key: key.clone(),
            reason: format!("cannot serialize: {e}"),
        })?;
        Ok((key, value))
    }

    fn txn_op(&self, op: &Op) -> TxnOp {
        match op {
            Op::Put { key, value } => TxnOp::put(self.key(key), value.clone(), None),
            Op::Delete { key } => TxnOp::delete(self.key(key), None),
            Op::DeletePrefix { prefix } => {
                TxnOp::delete(self.key(prefix), Some(DeleteOptions::new().with_prefix()))
            }
        }
    }

    /// Sends an edit's transaction: with others queued meanwhile when it may
    /// ([`commit_batches`]), else alone.
    async fn commit(&self, pending: Pending) -> Result<Committed> {
        if !pending.batchable() {
            return commit_alone(&self.client, &pending).await;
        }
        let (answer, answered) = tokio::sync::oneshot::channel();
        if let Err(tokio::sync::mpsc::error::SendError(q)) =
            self.commits.send(Queued { pending, answer })
        {
            return commit_alone(&self.client, &q.pending).await;
        }
        answered.await.unwrap_or_else(|_| {
            Err(Error::Etcd {
                op: COMMIT_OP,
                source: etcd_client::Error::Internal("the store is closing".into()),
            })
        })
    }

    /// [`Shared::recorded`], timed as the phase `idempotency_lookup`.
    async fn recorded_timed(&self, idem: &Idempotency) -> Result<Option<Recorded>> {
        let start = Instant::now();
        let recorded = self.recorded(idem).await;
        phases::since(Phase::IdempotencyLookup, start);
        recorded
    }

    /// The answer to an edit that changes nothing on this host's state: what was recorded
    /// under the client's key if it committed before (the state may already show it), else
    /// the edit's own result at the current revision.
    async fn unchanged<T>(
        &self,
        out: T,
        revision: u64,
        idem: Option<&Idempotency>,
    ) -> Result<Outcome<T>> {
        if let Some(idem) = idem.filter(|i| i.from_client) {
            if let Some(rec) = self.recorded_timed(idem).await? {
                return Ok(Outcome::Replayed(rec));
            }
        }
        Ok(Outcome::Applied { out, revision })
    }

    /// The outcome recorded under `idem`'s key, if any (with the revision it was recorded at).
    async fn recorded(&self, idem: &Idempotency) -> Result<Option<Recorded>> {
        self.idempotency_reads.fetch_add(1, Ordering::Relaxed);
        let key = self.key(&idempotency_key(idem));
        // A read, safe to try again: a member that stalls (the client then moves to the next)
        // costs this request a retry, not a 503.
        let mut attempt = 0;
        let resp = loop {
            attempt += 1;
            match timed("get (idempotency record)", self.client.kv_client().get(key.clone(), None))
                .await
            {
                Ok(resp) => break resp,
                Err(e @ (Error::Etcd { .. } | Error::Timeout { .. })) if attempt < 3 => {
                    tracing::debug!(error = %e, attempt, "reading an idempotency record; again");
                    tokio::time::sleep(RETRY_MIN * attempt).await;
                }
                Err(e) => return Err(e),
            }
        };
        self.record_read(idem, resp.kvs().first().cloned()).await
    }

    /// The outcome recorded under `idem`'s key, from a read of the key (`None`: absent). A
    /// fence found there is lifted (unless it changed since the read), and taken as no record.
    async fn record_read(
        &self,
        idem: &Idempotency,
        kv: Option<etcd_client::KeyValue>,
    ) -> Result<Option<Recorded>> {
        let Some(kv) = kv else { return Ok(None) };
        let key = self.key(&idempotency_key(idem));
        let mut rec: Recorded = serde_json::from_slice(kv.value()).map_err(|e| Error::Corrupt {
            key: String::from_utf8_lossy(kv.key()).into_owned(),
            reason: format!("not an idempotency record: {e}"),
        })?;
        if rec.fingerprint != idem.fingerprint {
            return Err(Error::KeyReused { key: idem.key.clone() });
        }
        if rec.status == 0 {
            // A fence: the first attempt did not happen. Lift it (unless it changed meanwhile)
            // so that this retry can run.
            let txn = Txn::new()
                .when(vec![Compare::mod_revision(key.clone(), CompareOp::Equal, kv.mod_revision())])
                .and_then(vec![TxnOp::delete(key, None)]);
            timed("delete (idempotency fence)", self.client.kv_client().txn(txn)).await?;
            return Ok(None);
        }
        rec.revision = u64::try_from(kv.mod_revision()).unwrap_or(0);
        Ok(Some(rec))
    }

    /// Settles an edit whose commit got no answer (`cause`): puts a record saying it did not
    /// happen unless its own record is there. Returns the edit's revision if it happened, fails
    /// with `cause` if it did not (it never will: its commit requires the record to be
    /// absent), or with [`Error::Unknown`] if etcd cannot be reached for [`SETTLE_TIMEOUT`].
    async fn settle(&self, idem: &Idempotency, cause: Error) -> Result<Option<u64>> {
        let key = self.key(&idempotency_key(idem));
        let fence =
            Recorded { fingerprint: idem.fingerprint.clone(), status: 0, body: None, revision: 0 };
        let value = serde_json::to_vec(&fence).unwrap_or_default();
        let deadline = Instant::now() + SETTLE_TIMEOUT;
        let mut delay = RETRY_MIN;
        let mut last = cause.to_string();
        while Instant::now() < deadline {
            let attempt = async {
                let lease = self.idempotency_lease().await?;
                let txn = Txn::new()
                    .when(vec![Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                    .and_then(vec![TxnOp::put(
                        key.clone(),
                        value.clone(),
                        Some(PutOptions::new().with_lease(lease)),
                    )])
                    .or_else(vec![TxnOp::get(key.clone(), None)]);
                timed("transaction (settle an edit)", self.client.kv_client().txn(txn)).await
            };
            match attempt.await {
                Ok(resp) if resp.succeeded() => {
                    tracing::warn!(error = %cause, "an edit's commit got no answer; it did not happen (fenced off)");
                    return Err(cause);
                }
                Ok(resp) => {
                    let revision = resp.op_responses().into_iter().find_map(|op| match op {
                        etcd_client::TxnOpResponse::Get(g) => {
                            g.kvs().first().map(|kv| kv.mod_revision())
                        }
                        _ => None,
                    });
                    tracing::info!(error = %cause, "an edit's commit got no answer; it happened");
                    return Ok(Some(u64::try_from(revision.unwrap_or(0)).unwrap_or(0)));
                }
                Err(e) => {
                    last = e.to_string();
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(1));
                }
            }
        }
        Err(Error::Unknown { key: idem.key.clone(), cause: last })
    }

    /// Puts a hold of universe `uni` (see [`Guard::InUniverse`]) under a lease of
    /// [`HOLD_TTL`], and waits until the watch has it (every edit of one group's rules of the
    /// universe that commits after it ran on a state this edit then sees). Best effort: `None`
    /// if etcd refused or did not answer (the edit goes on without).
    async fn hold(&self, uni: &str) -> Option<Hold> {
        let start = Instant::now();
        let key = format!("{}{:016x}", layout::holds_prefix(uni), rand::random::<u64>());
        let ttl = i64::try_from(HOLD_TTL.as_secs()).unwrap_or(i64::MAX);
        let put = async {
            let lease =
                timed("lease grant (hold)", self.client.lease_client().grant(ttl, None)).await?;
            let options = PutOptions::new().with_lease(lease.id());
            timed("put (hold)", self.client.kv_client().put(self.key(&key), "", Some(options)))
                .await
        };
        let hold = match put.await {
            Ok(resp) => {
                let hold = Hold { key, client: self.client.clone(), prefix: self.prefix.clone() };
                self.holds.fetch_add(1, Ordering::Relaxed);
                self.wait_applied(resp.header().map_or(0, |h| h.revision())).await;
                Some(hold)
            }
            Err(e) => {
                tracing::debug!(universe = uni, error = %e, "could not hold off the edits of one group; going on without");
                None
            }
        };
        phases::since(Phase::Hold, start);
        hold
    }

    /// Waits (at most [`HOLD_TTL`]: the lease of a hold whose edit's host died) until no edit
    /// holds off the edits of one group's rules of universe `uni`.
    async fn wait_unheld(&self, uni: &str) {
        let start = Instant::now();
        let mut view = self.view.subscribe();
        let _ = tokio::time::timeout(HOLD_TTL, view.wait_for(|v| !v.held(uni))).await;
        phases::since(Phase::HoldWait, start);
    }

    /// A lease for idempotency records: one per minute, living [`IDEMPOTENCY_TTL`] past it.
    async fn idempotency_lease(&self) -> Result<i64> {
        let mut current = self.idem_lease.lock().await;
        if let Some((id, granted)) = *current {
            if granted.elapsed() < Duration::from_secs(60) {
                return Ok(id);
            }
        }
        let ttl = i64::try_from(IDEMPOTENCY_TTL.as_secs() + 60).unwrap_or(i64::MAX);
        const OP: &str = "lease grant (idempotency)";
        let granted = match timed(OP, self.client.lease_client().grant(ttl, None)).await {
            Ok(g) => g,
            // Once more, on another member: a transport error moved the pin already (see
            // `failover`); a member that did not answer in time is left here.
            Err(e) if in_transport(&e) => {
                let member = self.pin.as_ref().and_then(super::failover::Pin::member);
                if let (Error::Timeout { .. }, Some(pin)) = (&e, &self.pin) {
                    pin.move_on(&e);
                }
                self.lease_stats.failovers.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(member = ?member, error = %e,
                    "the idempotency lease grant failed in the transport; trying once more on the next member");
                timed(OP, self.client.lease_client().grant(ttl, None)).await?
            }
            Err(e) => return Err(e),
        };
        *current = Some((granted.id(), Instant::now()));
        Ok(granted.id())
    }

    /// Deletes keys an edit left for afterwards (claims of the groups of a deleted universe), a
    /// transaction of at most [`MAX_TXN_OPS`] at a time. Best effort: a claim left behind only
    /// keeps its id from being drawn again.
    async fn clean_up(&self, keys: Vec<String>) {
        for chunk in keys.chunks(MAX_TXN_OPS) {
            let ops: Vec<TxnOp> = chunk.iter().map(|k| TxnOp::delete(self.key(k), None)).collect();
            let mut kv = self.client.kv_client();
            if let Err(e) = timed("delete (claims)", kv.txn(Txn::new().and_then(ops))).await {
                tracing::warn!(error = %e, "could not delete the claims of a deleted universe");
                return;
            }
        }
    }

    /// Reads the desired state (every key of [`Shared::state_range`]) at one etcd revision.
    async fn read(&self) -> Result<Cache> {
        let mut kv = self.client.kv_client().max_decoding_message_size(MAX_MESSAGE);
        let (start, end) = self.state_range();
        let resp = timed(
            "range (read the desired state)",
            kv.get(start, Some(GetOptions::new().with_range(end))),
        )
        .await?;
        let at = resp.header().map_or(0, |h| h.revision());
        let mut cache = Cache { revision: at, ..Cache::default() };
        let all = resp.kvs();
        // Keys in the order they were created, one batch per transaction: rules then come in
        // the order the watch appended them (see `layout::apply`).
        let mut kvs: Vec<&etcd_client::KeyValue> = all.iter().collect();
        kvs.sort_by(|a, b| (a.create_revision(), a.key()).cmp(&(b.create_revision(), b.key())));
        // The revision of the last change of the desired state: every change writes a guard
        // key (a universe's version, the catalog) or a host record.
        let mut last_change = 0;
        let mut start = 0;
        while start < kvs.len() {
            let created = kvs[start].create_revision();
            let end = kvs[start..]
                .iter()
                .position(|kv| kv.create_revision() != created)
                .map_or(kvs.len(), |n| start + n);
            let mut events = Vec::new();
            for kv in &kvs[start..end] {
                let Some(rel) = self.relative(kv.key()) else { continue };
                cache.record(rel, Some(kv.value()), kv.mod_revision());
                let state = layout::is_state(rel);
                if state
                    || matches!(layout::kind(rel), layout::Kind::Catalog | layout::Kind::Version(_))
                {
                    last_change = last_change.max(kv.mod_revision());
                }
                if state {
                    events.push(layout::Event { key: rel, value: Some(kv.value()) });
                }
            }
            layout::apply(&mut cache.state, &events)?;
            start = end;
        }
        cache.state.take_touched_hosts();
        cache.state.clear_changes();
        cache.state.revision = u64::try_from(last_change).unwrap_or(0);
        // What changed before this read is not known revision by revision.
        *lock(&self.touches) = scoped::Touches::from(at);
        Ok(cache)
    }

    /// Keeps the audit trail within its retention, for as long as the store lives (every host
    /// does it; the deletes are idempotent).
    /// Compacts etcd's history, for as long as the store lives: every [`COMPACT_INTERVAL`], up
    /// to the revision this store had applied one interval before (so a watch less than an
    /// interval behind never loses its history; one further behind reads everything again).
    /// Every host does it; compacting to a revision already compacted is refused by etcd and
    /// ignored. Without it every edit's keys would stay in etcd's database for ever.
    async fn compact_history(self: Arc<Shared>) {
        let mut tick = tokio::time::interval(COMPACT_INTERVAL);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        tick.tick().await;
        let mut previous = *self.applied.borrow();
        loop {
            tick.tick().await;
            let now = *self.applied.borrow();
            if previous > 0 {
                let mut kv = self.client.kv_client();
                match timed("compact (history)", kv.compact(previous, None)).await {
                    Ok(_) => tracing::debug!(etcd_revision = previous, "compacted etcd's history"),
                    Err(e @ Error::Denied { .. }) => {
                        tracing::info!(error = %e, "this host's etcd user may not compact \
                            etcd's history: leaving it to etcd's auto-compaction or other hosts");
                        return;
                    }
                    // Most often: another host compacted to this revision or past it already.
                    Err(e) => tracing::debug!(error = %e, "compacting etcd's history"),
                }
            }
            previous = now;
        }
    }

    async fn trim_audit(self: Arc<Shared>) {
        let mut tick = tokio::time::interval(AUDIT_TRIM_INTERVAL);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            match self.trim_audit_once().await {
                Ok(()) => {}
                Err(e @ Error::Denied { .. }) => {
                    tracing::info!(
                        error = %e,
                        "this host's etcd user may not trim the audit trail: leaving it to the \
                         hosts that may"
                    );
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "trimming the audit trail failed; trying again later")
                }
            }
        }
    }

    async fn trim_audit_once(&self) -> Result<()> {
        let retention = self.audit_retention;
        let mut kv = self.client.kv_client();
        let cutoff = std::time::SystemTime::now()
            .checked_sub(retention.max_age)
            .unwrap_or(std::time::UNIX_EPOCH);
        let below = self.key(&format!("{AUDIT}{:020}", nanos_since_epoch(cutoff)));
        let aged = DeleteOptions::new().with_range(below);
        timed("delete (expired audit records)", kv.delete(self.key(AUDIT), Some(aged))).await?;
        let count = GetOptions::new().with_range(self.key(AUDIT_END)).with_count_only();
        let n = timed("count (audit records)", kv.get(self.key(AUDIT), Some(count))).await?.count();
        let max = i64::try_from(retention.max_records).unwrap_or(i64::MAX);
        if n > max {
            let oldest = GetOptions::new()
                .with_range(self.key(AUDIT_END))
                .with_keys_only()
                .with_limit(n - max);
            let resp = timed("range (oldest audit records)", kv.get(self.key(AUDIT), Some(oldest)))
                .await?;
            if let Some(last) = resp.kvs().last() {
                let mut end = last.key().to_vec();
                end.push(0);
                let over = DeleteOptions::new().with_range(end);
                timed(
                    "delete (audit records over the count)",
                    kv.delete(self.key(AUDIT), Some(over)),
                )
                .await?;
                tracing::info!(removed = n - max, "trimmed the audit trail to its retained count");
            }
        }
        Ok(())
    }

    /// What a watch event changed: the key relative to the prefix, its new value (`None`:
    /// deleted) and the revision of the change; `None` for a key outside it.
    fn change<'a>(
        &self,
        event: &'a etcd_client::Event,
    ) -> Option<(&'a str, Option<&'a [u8]>, i64)> {
        let kv = event.kv()?;
        let rel = self.relative(kv.key())?;
        let value = match event.event_type() {
            EventType::Put => Some(kv.value()),
            EventType::Delete => None,
        };
        Some((rel, value, kv.mod_revision()))
    }

    /// The key relative to the prefix, if it is under it and UTF-8.
    fn relative<'a>(&self, key: &'a [u8]) -> Option<&'a str> {
        let rel = key.strip_prefix(self.prefix.as_bytes())?;
        match std::str::from_utf8(rel) {
            Ok(rel) => Some(rel),
            Err(_) => {
                tracing::warn!(key = %String::from_utf8_lossy(key), "ignoring a key that is not UTF-8");
                None
            }
        }
    }

    /// Waits (bounded) until the watch has applied etcd revision `revision`.
    async fn wait_applied(&self, revision: i64) {
        let mut rx = self.applied.subscribe();
        if tokio::time::timeout(APPLY_TIMEOUT, rx.wait_for(|r| *r >= revision)).await.is_err() {
            tracing::warn!(
                etcd_revision = revision,
                applied = *self.applied.borrow(),
                "the watch has not delivered a revision in time; going on anyway"
            );
        }
    }

    /// Publishes what `cache` holds: the view edits run on, the state (when
    /// `desired_changed`), the applied etcd revision, then the hosts (when a host record came or
    /// went, or the state changed: see `scoped::Judge`). `hosts_changed`: every host is judged
    /// again (a host record changed, or the whole state was read); otherwise only those the
    /// changes recorded since the last publication can move (`scoped::Judgements`).
    fn publish(&self, cache: &Cache, desired_changed: bool, hosts_changed: bool) {
        let state = Arc::new(cache.state.clone());
        // The view first: a subscriber woken by the state may edit at once, on the view.
        self.view.send_replace(Arc::new(View {
            state: state.clone(),
            versions: cache.versions.clone(),
            catalog: cache.catalog,
            keys: cache.keys.clone(),
            hosts_last: cache.hosts_last,
            changed: cache.changed.clone(),
            holds: cache.holds.clone(),
            revision: cache.revision,
        }));
        if desired_changed {
            self.state.send_replace(state.clone());
        }
        self.applied.send_if_modified(|cur| {
            let newer = cache.revision > *cur;
            if newer {
                *cur = cache.revision;
            }
            newer
        });
        // Every change moves what the hosts that follow only their universes are known to have
        // realized (their revisions are judged against the changes seen: `scoped`).
        // Invalidated once the view and the revision are out: a publication of the hosts from
        // the liveness watch in between then judges every host on this view, not the last.
        if hosts_changed {
            lock(&self.touches).judged.invalidate();
        }
        if (hosts_changed || desired_changed) && self.live.following.load(Ordering::SeqCst) {
            self.publish_hosts();
        }
    }

    /// Publishes the hosts: those registered in the desired state (as the view has them) and
    /// those with a liveness record, with what the liveness records say.
    fn publish_hosts(&self) {
        // Held while publishing: the two writers (the state's watch, the liveness watch)
        // publish one after the other, the last with both of their news.
        let alive = lock(&self.live.alive);
        // The applied revision before the view: the view holds at least every change up to
        // it (`publish` sends the view first), what judging the changes recorded needs.
        let applied = *self.applied.borrow();
        let view = self.view.borrow().clone();
        let state = view.state.clone();
        let mut touches = lock(&self.touches);
        scoped::Judgements::update(&mut touches, &view, applied, &alive);
        let judged = &touches.judged;
        let mut hosts: BTreeMap<&str, HostStatus> = state
            .hosts
            .values()
            .map(|h| {
                let (realized, healthy) =
                    alive.get(&h.name).cloned().unwrap_or((Realized::default(), false));
                let status = HostStatus {
                    name: h.name.clone(),
                    underlay_ip: h.underlay_ip,
                    api: h.api.clone(),
                    api_fingerprint: h.api_fingerprint.clone(),
                    revision: judged.revision(&h.name, &realized, applied),
                    healthy,
                    errors: realized.errors,
                };
                (h.name.as_str(), status)
            })
            .collect();
        for (name, (realized, healthy)) in alive.iter() {
            hosts.entry(name).or_insert_with(|| HostStatus {
                name: name.clone(),
                underlay_ip: None,
                api: None,
                api_fingerprint: None,
                revision: judged.revision(name, realized, applied),
                healthy: *healthy,
                errors: realized.errors.clone(),
            });
        }
        let hosts: Vec<HostStatus> = hosts.into_values().collect();
        self.hosts.send_if_modified(|cur| {
            if **cur == hosts {
                return false;
            }
            *cur = Arc::new(hosts);
            true
        });
    }

    /// Follows the hosts' liveness records while they are needed (see the module docs): waits
    /// for a [`Demand`], reads the records, watches them from the next revision (reading them
    /// again if the watch fails or falls behind a compaction), and stops watching once no
    /// demand has been held for [`LIVENESS_LINGER`]. For as long as the store lives.
    async fn follow_liveness(self: Arc<Shared>) {
        let mut demand = self.live.demand.subscribe();
        loop {
            if demand.wait_for(|n| *n > 0).await.is_err() {
                return;
            }
            tracing::debug!("following the hosts' liveness records");
            let idle = idle(self.live.demand.subscribe(), self.options.liveness_linger);
            tokio::pin!(idle);
            let mut delay = RETRY_MIN;
            loop {
                let round = async {
                    match self.read_liveness().await {
                        Ok(at) => self.watch_liveness(at, &mut delay).await,
                        Err(e) => e,
                    }
                };
                let e = tokio::select! {
                    () = &mut idle => break,
                    e = round => e,
                };
                tracing::warn!(error = %e, retry_in = ?delay,
                    "lost the watch of the hosts' liveness records; reading them again");
                tokio::select! {
                    () = &mut idle => break,
                    () = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(RETRY_MAX);
            }
            self.live.synced.send_replace(false);
            self.live.following.store(false, Ordering::SeqCst);
            tracing::debug!("no longer following the hosts' liveness records (nobody asked)");
        }
    }

    /// Reads every liveness record, publishes the hosts, and returns the etcd revision read at.
    /// A registered host whose record is gone keeps its last realized revision, unhealthy; one
    /// neither registered nor alive is forgotten. A member that does not answer in time is
    /// left for the next read (the pin moves on, as for the other reads).
    async fn read_liveness(&self) -> Result<i64> {
        // Before the read: a host record that comes meanwhile is published by the state's watch.
        self.live.following.store(true, Ordering::SeqCst);
        let mut kv = self.client.kv_client().max_decoding_message_size(MAX_MESSAGE);
        let range = GetOptions::new().with_range(self.key(ALIVE_END));
        let read = timed("range (read the liveness records)", kv.get(self.key(ALIVE), Some(range)));
        let resp = match read.await {
            Ok(resp) => resp,
            Err(e) => {
                if let (Error::Timeout { .. }, Some(pin)) = (&e, &self.pin) {
                    pin.move_on(&e);
                }
                return Err(e);
            }
        };
        let at = resp.header().map_or(0, |h| h.revision());
        {
            let registered = self.view.borrow().state.clone();
            let mut alive = lock(&self.live.alive);
            alive.retain(|name, _| registered.hosts.contains_key(name));
            for entry in alive.values_mut() {
                entry.1 = false;
            }
            for kv in resp.kvs() {
                if let Some(rel) = self.relative(kv.key()) {
                    record_liveness(&mut alive, rel, Some(kv.value()), &self.prefix);
                }
            }
        }
        lock(&self.touches).judged.invalidate();
        self.publish_hosts();
        self.live.synced.send_replace(true);
        Ok(at)
    }

    /// Watches the liveness records from `at + 1`, applying and publishing each response, until
    /// the watch ends (the error says why).
    async fn watch_liveness(&self, at: i64, delay: &mut Duration) -> Error {
        let mut client = self.client.watch_client().max_decoding_message_size(MAX_MESSAGE);
        let options = WatchOptions::new()
            .with_range(self.key(ALIVE_END))
            .with_start_revision(at.saturating_add(1));
        let watched =
            timed("watch (liveness records)", client.watch(self.key(ALIVE), Some(options)));
        let mut stream = match watched.await {
            Ok(stream) => stream,
            Err(e) => return e,
        };
        let failed = |source| Error::Etcd { op: "watch (liveness records)", source };
        loop {
            let resp = match stream.message().await {
                Ok(Some(resp)) => resp,
                Ok(None) => {
                    return failed(etcd_client::Error::WatchError("the stream ended".into()))
                }
                Err(source) => return failed(source),
            };
            if resp.canceled() {
                return failed(etcd_client::Error::WatchError(format!(
                    "canceled by etcd (compacted at {}): {}",
                    resp.compact_revision(),
                    resp.cancel_reason()
                )));
            }
            self.received.count(&resp);
            *delay = RETRY_MIN;
            if resp.events().is_empty() {
                continue;
            }
            {
                let mut alive = lock(&self.live.alive);
                let mut touches = lock(&self.touches);
                for event in resp.events() {
                    let Some(kv) = event.kv() else { continue };
                    let Some(rel) = self.relative(kv.key()) else { continue };
                    if let Some(name) = rel.strip_prefix(ALIVE) {
                        touches.judged.touched(name, 0);
                    }
                    let value = match event.event_type() {
                        EventType::Put => Some(kv.value()),
                        EventType::Delete => None,
                    };
                    record_liveness(&mut alive, rel, value, &self.prefix);
                }
            }
            self.publish_hosts();
        }
    }

    /// Follows the prefix, or what a scope names (`scoped.rs`), for as long as the store lives
    /// (see the module contract): a watch that ends is opened again from the revision after the
    /// last applied; one whose history was compacted reads what it follows again first.
    async fn follow(self: Arc<Shared>, mut cache: Cache) {
        let mut delay = RETRY_MIN;
        loop {
            let scope = cache.scope.as_ref().map(|s| s.host.clone());
            let end = match scope {
                Some(_) => self.watch_scoped(&mut cache, &mut delay).await,
                None => self.watch(&mut cache, &mut delay).await,
            };
            match end {
                WatchEnd::Compacted => {
                    tracing::warn!(
                        etcd_revision = cache.revision,
                        "etcd compacted the history this watch needed; reading again"
                    );
                    loop {
                        let read = match &scope {
                            Some(host) => self.read_scoped(host).await,
                            None => self.read().await,
                        };
                        match read {
                            Ok(mut fresh) => {
                                // Monotonic (S13), even if the read shows an older revision.
                                fresh.state.revision =
                                    fresh.state.revision.max(cache.state.revision);
                                cache = fresh;
                                self.publish(&cache, true, true);
                                break;
                            }
                            Err(e) => {
                                tracing::warn!(error = %e, retry_in = ?delay, "re-reading the desired state failed");
                                tokio::time::sleep(delay).await;
                                delay = (delay * 2).min(RETRY_MAX);
                            }
                        }
                    }
                }
                WatchEnd::Failed(e) => {
                    tracing::warn!(
                        error = %e, etcd_revision = cache.revision, retry_in = ?delay,
                        "lost the etcd watch; the dataplane keeps enforcing the last state"
                    );
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(RETRY_MAX);
                }
            }
        }
    }

    /// One watch of the desired state from the revision after the last applied, applied to
    /// `cache` until it ends.
    async fn watch(&self, cache: &mut Cache, delay: &mut Duration) -> WatchEnd {
        let mut client = self.client.watch_client().max_decoding_message_size(MAX_MESSAGE);
        let (start, end) = self.state_range();
        let options = WatchOptions::new()
            .with_range(end)
            .with_start_revision(cache.revision.saturating_add(1));
        let mut stream = match timed("watch", client.watch(start, Some(options))).await {
            Ok(s) => s,
            Err(e) => return WatchEnd::Failed(e),
        };
        loop {
            let resp = match next_response(&mut stream).await {
                Ok(resp) => resp,
                Err(end) => return end,
            };
            if resp.canceled() {
                return WatchEnd::cancelled(&resp);
            }
            self.received.count(&resp);
            // The stream works: the next failure starts its backoff afresh.
            *delay = RETRY_MIN;
            if resp.events().is_empty() {
                // A watcher created (its header is etcd's revision, not what it delivered), or
                // a progress notice this store does not ask for.
                continue;
            }
            let mut desired_changed = false;
            let mut hosts_changed = false;
            for (rev, events) in by_revision(resp.events()) {
                let mut batch = Vec::new();
                let mut touches = lock(&self.touches);
                for event in events {
                    let Some((rel, value, mod_revision)) = self.change(event) else { continue };
                    touches.record(rev, rel);
                    cache.record(rel, value, mod_revision);
                    hosts_changed |= matches!(layout::kind(rel), layout::Kind::Host(_));
                    if layout::is_state(rel) {
                        batch.push(layout::Event { key: rel, value });
                    }
                }
                drop(touches);
                match layout::apply(&mut cache.state, &batch) {
                    Ok(changed) => {
                        if changed {
                            cache.state.revision = u64::try_from(rev).unwrap_or(0);
                            desired_changed = true;
                        }
                    }
                    Err(e) => tracing::error!(
                        error = %e, etcd_revision = rev,
                        "a change of the desired state in etcd does not decode; skipping it"
                    ),
                }
                // The indices catch up with the batch (what an edit on this state looks up); the
                // hosts whose endpoints it changed are judged again.
                let touched = cache.state.take_touched_hosts();
                let mut touches = lock(&self.touches);
                for host in &touched {
                    touches.judged.touched(host, rev);
                }
                drop(touches);
                cache.state.clear_changes();
                cache.revision = cache.revision.max(rev);
            }
            // Not the header's revision: etcd 3.4 sends a catching-up watcher at most 1000
            // revisions per response, each with the header of its current revision.
            self.publish(cache, desired_changed, hosts_changed);
        }
    }

    /// The liveness thread of host `name`: its own runtime and its own etcd connection, so that
    /// renewals never wait behind edits; until `stop` fires (or its sender is dropped).
    fn liveness_thread(
        self: Arc<Shared>,
        name: String,
        realized: watch::Receiver<Realized>,
        stop: tokio::sync::oneshot::Receiver<()>,
    ) {
        let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(host = %name, error = %e, "cannot start the liveness runtime");
                return;
            }
        };
        runtime.block_on(async move {
            tokio::select! {
                _ = stop => {}
                () = self.keep_alive(name, realized) => {}
            }
        });
    }

    /// Keeps `alive/<name>` alive for as long as the store lives: one lease for as long as it
    /// lives, renewed through whichever member answers; a new one only once it has expired.
    async fn keep_alive(self: Arc<Self>, name: String, mut realized: watch::Receiver<Realized>) {
        let key = self.key(&format!("{ALIVE}{name}"));
        let mut links = Links::new(&self);
        loop {
            let mut lease = self.begin_lease(&mut links, &name, &key, &mut realized).await;
            let why = self.hold_lease(&mut links, &name, &key, &mut realized, &mut lease).await;
            self.lease_stats.expiries.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(host = %name, lease = format!("{:x}", lease.id), reason = %why,
                "this host's liveness lease expired, or may have (then the host showed \
                 unhealthy); granting a new one and putting the record again");
        }
    }

    /// Grants a lease and puts the liveness record under it, trying the members in turn until
    /// both are done.
    async fn begin_lease(
        &self,
        links: &mut Links,
        name: &str,
        key: &str,
        realized: &mut watch::Receiver<Realized>,
    ) -> Lease {
        let ttl_s = i64::try_from(self.lease_ttl.as_secs()).unwrap_or(i64::MAX).max(1);
        let mut attempt = 0usize;
        loop {
            // A member that does not answer a grant costs the wait, then the next one is
            // asked; but when every member is slow, waiting only a third of the TTL would
            // never get a lease: the wait doubles with each round over the members.
            let round = u32::try_from(attempt / links.len()).unwrap_or(u32::MAX).min(4);
            let wait = (answer_wait(self.lease_ttl) * 2u32.pow(round)).min(REQUEST_TIMEOUT);
            if attempt > 0 && attempt.is_multiple_of(links.len()) {
                // Every member failed once: back off (etcd may be down altogether).
                let rounds = u32::try_from(attempt / links.len()).unwrap_or(u32::MAX).min(6);
                tokio::time::sleep((RETRY_MIN * 2u32.pow(rounds - 1)).min(RETRY_MAX)).await;
            }
            attempt += 1;
            let sent = Instant::now();
            let granted = tokio::time::timeout(wait, async {
                let client = links.client().await?;
                client.lease_client().grant(ttl_s, None).await
            })
            .await;
            let (id, ttl, term) = match granted {
                // etcd may grant more than asked (its minimum is 1.5 election timeouts): renew
                // at the pace of what was granted.
                Ok(Ok(g)) => (
                    g.id(),
                    Duration::from_secs(g.ttl().max(1).unsigned_abs()),
                    g.header().map_or(0, |h| h.raft_term()),
                ),
                Ok(Err(e)) => {
                    self.fail_over(links, name, "lease grant", &e.to_string());
                    continue;
                }
                Err(_) => {
                    self.fail_over(links, name, "lease grant", &format!("no answer in {wait:?}"));
                    continue;
                }
            };
            let mut lease = Lease {
                id,
                ttl,
                term,
                expires: sent + ttl,
                stream: None,
                report: None,
                should_move: false,
            };
            let report = realized.borrow_and_update().clone();
            match self.put_record(links, name, key, &report, &mut lease).await {
                Ok(()) => {
                    tracing::info!(host = %name, lease = format!("{id:x}"), ttl = ?ttl,
                        revision = report.revision, member = %links.member(), "host alive in etcd");
                    lease.report = Some(report);
                    return lease;
                }
                Err(why) => {
                    tracing::warn!(host = %name, lease = format!("{id:x}"), reason = %why,
                        "could not put this host's liveness record before its new lease expired");
                }
            }
        }
    }

    /// Renews `lease` every third of its TTL and rewrites the record on each new realized
    /// revision, until the lease has expired; returns why it is taken as expired.
    async fn hold_lease(
        &self,
        links: &mut Links,
        name: &str,
        key: &str,
        realized: &mut watch::Receiver<Realized>,
        lease: &mut Lease,
    ) -> String {
        let mut tick = tokio::time::interval(lease.ttl / 3);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        tick.tick().await;
        // The sender lives in `self.local`, as long as this task: it cannot close, but if it
        // did, renewals go on without reports rather than turn into a busy loop.
        let mut reporting = true;
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if let Err(why) = self.renew(links, name, lease).await {
                        return why;
                    }
                    if lease.should_move {
                        self.move_record(links, name, key, lease).await;
                    }
                }
                changed = realized.changed(), if reporting => {
                    if changed.is_err() {
                        reporting = false;
                        continue;
                    }
                    let next = realized.borrow_and_update().clone();
                    if lease.report.as_ref() != Some(&next) {
                        let start = Instant::now();
                        let put = self.put_record(links, name, key, &next, lease).await;
                        phases::since(Phase::Report, start);
                        if let Err(why) = put {
                            return why;
                        }
                        lease.report = Some(next);
                    }
                }
            }
        }
    }

    /// Renews `lease` once, through the members in turn, for as long as it lives.
    async fn renew(&self, links: &mut Links, name: &str, lease: &mut Lease) -> Result<(), String> {
        let mut attempt = 0usize;
        loop {
            let now = Instant::now();
            let Some(left) = lease.expires.checked_duration_since(now).filter(|d| !d.is_zero())
            else {
                return Err(format!("no member renewed it within its TTL of {:?}", lease.ttl));
            };
            if attempt > 0 && attempt.is_multiple_of(links.len()) {
                // Every member failed once: not a busy loop when they all fail at once.
                tokio::time::sleep(RETRY_MIN.min(left)).await;
            }
            attempt += 1;
            let wait = answer_wait(lease.ttl).min(left);
            match tokio::time::timeout(wait, Self::renew_on(links, lease)).await {
                Ok(Ok((ttl, term))) if ttl > 0 => {
                    // The leader restarted the TTL when it got the request, after `now`.
                    lease.expires = now + Duration::from_secs(ttl.unsigned_abs());
                    lease.saw_term(term);
                    return Ok(());
                }
                Ok(Ok(_)) => return Err("etcd answered that it expired (TTL 0)".to_owned()),
                Ok(Err(etcd_client::Error::LeaseKeepAliveError(m))) if m == "lease not found" => {
                    return Err("etcd answered that it expired (not found)".to_owned());
                }
                Ok(Err(e)) => {
                    self.fail_over_lease(links, name, lease, "lease keep-alive", &e.to_string())
                }
                Err(_) => {
                    let reason = format!("no answer in {wait:?}");
                    self.fail_over_lease(links, name, lease, "lease keep-alive", &reason);
                }
            }
        }
    }

    /// One renewal on the current member's keep-alive stream (opened first if need be, which
    /// renews too): the TTL etcd answered, and the raft term of the answer (unknown for the
    /// renewal that opens a stream: etcd-client reads that answer itself).
    async fn renew_on(
        links: &mut Links,
        lease: &mut Lease,
    ) -> Result<(i64, Option<u64>), etcd_client::Error> {
        let (keeper, responses) = match &mut lease.stream {
            Some(stream) => stream,
            None => {
                let client = links.client().await?;
                // etcd-client fails if the first answer's TTL is 0.
                let stream = client.lease_client().keep_alive(lease.id).await?;
                lease.stream = Some(stream);
                return Ok((i64::try_from(lease.ttl.as_secs()).unwrap_or(i64::MAX), None));
            }
        };
        keeper.keep_alive().await?;
        match responses.message().await? {
            Some(r) => Ok((r.ttl(), r.header().map(|h| h.raft_term()))),
            None => Err(etcd_client::Error::LeaseKeepAliveError("the stream ended".into())),
        }
    }

    /// Puts the liveness record `report` under `lease`, through the members in turn, for as
    /// long as the lease lives.
    async fn put_record(
        &self,
        links: &mut Links,
        name: &str,
        key: &str,
        report: &Realized,
        lease: &mut Lease,
    ) -> Result<(), String> {
        let value = encode_report(report);
        let mut attempt = 0usize;
        loop {
            let Some(left) =
                lease.expires.checked_duration_since(Instant::now()).filter(|d| !d.is_zero())
            else {
                return Err(format!("no member took the record within its TTL of {:?}", lease.ttl));
            };
            if attempt > 0 && attempt.is_multiple_of(links.len()) {
                tokio::time::sleep(RETRY_MIN.min(left)).await;
            }
            attempt += 1;
            let wait = answer_wait(lease.ttl).min(left);
            let put = tokio::time::timeout(wait, async {
                let client = links.client().await?;
                let options = PutOptions::new().with_lease(lease.id);
                client.kv_client().put(key, value.clone(), Some(options)).await
            })
            .await;
            match put {
                Ok(Ok(r)) => {
                    lease.saw_term(r.header().map(|h| h.raft_term()));
                    return Ok(());
                }
                Ok(Err(etcd_client::Error::GRpcStatus(s)))
                    if s.code() == tonic::Code::NotFound && s.message().contains("lease") =>
                {
                    return Err(format!("etcd answered that it expired ({})", s.message()));
                }
                Ok(Err(e)) => {
                    self.fail_over_lease(links, name, lease, "put (liveness)", &e.to_string())
                }
                Err(_) => {
                    let reason = format!("no answer in {wait:?}");
                    self.fail_over_lease(links, name, lease, "put (liveness)", &reason);
                }
            }
        }
    }

    /// After the etcd leader changed (or a failover, which a stalled leader causes too), once
    /// the lease was renewed: moves the record to a new lease, while the old one still lives
    /// (no lapse), and lets the old one expire. etcd before 3.4.28 and 3.5.11 lets a leader
    /// that resumes from a stall revoke every lease it did not see renewed meanwhile (etcd
    /// issues 12528 and 15247), although the new leader renewed them; a lease the new leader
    /// granted is not among those. A grant or put that fails leaves the record where it is,
    /// and the next renewal tries again.
    async fn move_record(&self, links: &mut Links, name: &str, key: &str, lease: &mut Lease) {
        let ttl_s = i64::try_from(self.lease_ttl.as_secs()).unwrap_or(i64::MAX).max(1);
        let Some(report) = lease.report.clone() else {
            return;
        };
        let wait = answer_wait(lease.ttl);
        let sent = Instant::now();
        let moved = tokio::time::timeout(wait, async {
            let client = links.client().await?;
            let granted = client.lease_client().grant(ttl_s, None).await?;
            let options = PutOptions::new().with_lease(granted.id());
            client.kv_client().put(key, encode_report(&report), Some(options)).await?;
            Ok::<_, etcd_client::Error>(granted)
        })
        .await;
        match moved {
            Ok(Ok(g)) => {
                let ttl = Duration::from_secs(g.ttl().max(1).unsigned_abs());
                let term = g.header().map_or(0, |h| h.raft_term());
                tracing::info!(host = %name, from = format!("{:x}", lease.id),
                    lease = format!("{:x}", g.id()), member = %links.member(), term,
                    "moved this host's liveness record to a new lease (leader change or failover)");
                *lease = Lease {
                    id: g.id(),
                    ttl,
                    term,
                    expires: sent + ttl,
                    stream: None,
                    report: Some(report),
                    should_move: false,
                };
            }
            Ok(Err(e)) => tracing::debug!(host = %name, error = %e,
                "could not move the liveness record to a new lease yet"),
            Err(_) => tracing::debug!(host = %name,
                "could not move the liveness record to a new lease yet (no answer)"),
        }
    }

    /// A liveness request got no answer from the current member: counted, logged once, and
    /// the next member is asked.
    fn fail_over(&self, links: &mut Links, name: &str, op: &str, reason: &str) {
        self.lease_stats.failovers.fetch_add(1, Ordering::Relaxed);
        let member = links.member();
        links.next();
        tracing::warn!(host = %name, %member, next = %links.member(), %reason,
            "etcd member did not answer a liveness request ({op}); asking the next member, same lease");
    }

    /// [`Self::fail_over`] for a request about `lease`: its keep-alive stream is on the member
    /// left behind, and a failover is reason to move the record to a new lease (see
    /// [`Self::move_record`]).
    fn fail_over_lease(
        &self,
        links: &mut Links,
        name: &str,
        lease: &mut Lease,
        op: &str,
        reason: &str,
    ) {
        lease.stream = None;
        lease.should_move = true;
        self.fail_over(links, name, op, reason);
    }
}

/// How long a liveness request (a renewal, a grant, a put of the record) waits for one member
/// before asking the next: a third of the TTL. A renewal starts a third of the TTL after the
/// last one, with two thirds left: a member that does not answer costs one third, and the next
/// member still has a third to answer in before the lease runs out. Waiting for the request
/// timeout instead (5 s, the default TTL itself) let the lease lapse whenever the one member
/// asked was stalled, although the two others would have answered at once.
fn answer_wait(ttl: Duration) -> Duration {
    ttl / 3
}

/// A liveness lease being kept.
struct Lease {
    id: i64,
    /// As granted.
    ttl: Duration,
    /// The raft term etcd answered the grant in: a later term means a new leader.
    term: u64,
    /// When it runs out unless renewed: the TTL etcd answered last, counted from when that
    /// renewal was sent (etcd restarts it later than that, never earlier).
    expires: Instant,
    /// The keep-alive stream on the current member (`None`: open one on next renewal).
    stream: Option<(etcd_client::LeaseKeeper, etcd_client::LeaseKeepAliveStream)>,
    /// The record last put under this lease.
    report: Option<Realized>,
    /// Whether the leader changed or a request failed over to another member since it was
    /// granted (see `Shared::move_record`).
    should_move: bool,
}

impl Lease {
    /// An answer about this lease came in raft term `term`.
    fn saw_term(&mut self, term: Option<u64>) {
        if term.is_some_and(|t| t > self.term) {
            self.should_move = true;
        }
    }
}

/// How a liveness task reaches etcd: a client per member, asked in turn from a random one (so
/// the hosts of a fleet spread over the members), moving on to the next whenever a request goes
/// unanswered for [`answer_wait`] or fails. A channel shared by every request would keep
/// sending to a stalled member (its connection stays open) until HTTP/2 keep-alive gives it up.
/// A simulated host has only the client it shares with others (`crate::sim`).
struct Links {
    /// Each member's options (one endpoint each), or none for a shared client.
    members: Vec<EtcdOptions>,
    clients: Vec<Option<Client>>,
    at: usize,
}

impl Links {
    fn new(shared: &Shared) -> Links {
        if !shared.own_liveness {
            return Links {
                members: Vec::new(),
                clients: vec![Some(shared.client.clone())],
                at: 0,
            };
        }
        let members: Vec<EtcdOptions> = shared
            .options
            .endpoints
            .iter()
            .map(|e| EtcdOptions { endpoints: vec![e.clone()], ..shared.options.clone() })
            .collect();
        let at = rand::random_range(0..members.len().max(1));
        Links { clients: vec![None; members.len().max(1)], members, at }
    }

    fn len(&self) -> usize {
        self.clients.len()
    }

    /// The current member, for logs.
    fn member(&self) -> String {
        match self.members.get(self.at) {
            Some(m) => m.endpoints.join(","),
            None => "(the shared client)".to_owned(),
        }
    }

    /// The current member's client, made on first use (without a user, lazily: no request).
    async fn client(&mut self) -> Result<Client, etcd_client::Error> {
        if let Some(c) = &self.clients[self.at] {
            return Ok(c.clone());
        }
        let options = &self.members[self.at];
        let client = connect(options).await.map_err(|e| match e {
            Error::Connect { source, .. } => source,
            other => etcd_client::Error::Internal(other.to_string()),
        })?;
        self.clients[self.at] = Some(client.clone());
        Ok(client)
    }

    /// Moves on to the next member; the one left gets a fresh connection when its turn comes
    /// again (the old one may be stuck on a stalled process).
    fn next(&mut self) {
        if !self.members.is_empty() {
            self.clients[self.at] = None;
            self.at = (self.at + 1) % self.members.len();
        }
    }
}

impl Cache {
    fn changed_at(&mut self, uni: &str, mod_revision: i64) {
        let at = self.changed.entry(uni.to_owned()).or_default();
        *at = (*at).max(mod_revision);
    }

    /// Records what a key read back says of guards (the state itself is applied by
    /// [`layout::apply`]).
    fn record(&mut self, rel: &str, value: Option<&[u8]>, mod_revision: i64) {
        match layout::kind(rel) {
            layout::Kind::Version(uni) => match value {
                Some(_) => {
                    self.versions.insert(uni.to_owned(), mod_revision);
                    self.changed_at(uni, mod_revision);
                }
                None => {
                    self.versions.remove(uni);
                    self.changed.remove(uni);
                }
            },
            layout::Kind::Group { uni, .. } => match value {
                Some(_) => {
                    self.keys.insert(rel.to_owned(), mod_revision);
                    self.changed_at(uni, mod_revision);
                }
                None => {
                    self.keys.remove(rel);
                }
            },
            layout::Kind::Catalog => {
                self.catalog = if value.is_some() { mod_revision } else { 0 };
            }
            layout::Kind::Hold(_) => {
                if value.is_some() {
                    self.holds.insert(rel.to_owned());
                } else {
                    self.holds.remove(rel);
                }
            }
            layout::Kind::Host(_) => match value {
                Some(_) => {
                    self.keys.insert(rel.to_owned(), mod_revision);
                    self.hosts_last = self.hosts_last.max(mod_revision);
                }
                None => {
                    self.keys.remove(rel);
                    let hosts = self.keys.iter().filter(|(k, _)| k.starts_with(layout::HOSTS));
                    self.hosts_last = hosts.map(|(_, r)| *r).max().unwrap_or(0);
                }
            },
            layout::Kind::Token(_) | layout::Kind::Counter(_) | layout::Kind::Slots(_) => {
                match value {
                    Some(_) => {
                        self.keys.insert(rel.to_owned(), mod_revision);
                    }
                    None => {
                        self.keys.remove(rel);
                    }
                }
            }
            _ => {}
        }
    }
}

/// Records what liveness record `rel` (`alive/<name>`) now holds: a report (`value`), or
/// nothing (deleted with its lease: the host keeps its last realized revision, unhealthy).
fn record_liveness(
    alive: &mut BTreeMap<String, (Realized, bool)>,
    rel: &str,
    value: Option<&[u8]>,
    prefix: &str,
) {
    let Some(name) = rel.strip_prefix(ALIVE) else { return };
    match value {
        Some(value) => {
            let report = decode_report(value).unwrap_or_else(|| {
                tracing::warn!(key = %format!("{prefix}{rel}"), "liveness record is not a report; counting it as revision 0");
                Realized::default()
            });
            alive.insert(name.to_owned(), (report, true));
        }
        None => {
            if let Some(entry) = alive.get_mut(name) {
                entry.1 = false;
            }
        }
    }
}

/// The etcd revision by which the guarded keys had changed, from the reads a failed edit's
/// transaction made of them (in the order of `guards`, then the catalog, then the newest group
/// key of each universe guarded whole, [`Guard::Universe`]): the newest `mod_revision` among
/// them. A universe's version key that is gone went with the universe, whose deletion rewrote
/// the catalog: the catalog's revision stands for it; a group's key that is gone went with the
/// group (an edit that rewrote its universe's version key, read too: [`Guard::InUniverse`]) or
/// with its universe. `None` if another key the edit's state saw is gone (its deletion's
/// revision is not in the answer).
fn guards_changed_at(
    responses: &[TxnOpResponse],
    guards: &std::collections::BTreeSet<Guard>,
    view: &View,
) -> Option<i64> {
    let mut reads = responses.iter();
    let revision = |read: Option<&TxnOpResponse>| match read {
        Some(TxnOpResponse::Get(range)) => Some(range.kvs().first().map(|kv| kv.mod_revision())),
        _ => None,
    };
    let guarded: Vec<Option<i64>> =
        guards.iter().map(|_| revision(reads.next())).collect::<Option<_>>()?;
    let catalog = revision(reads.next())?.unwrap_or(0);
    let mut newest = 0;
    for (guard, read) in guards.iter().zip(guarded) {
        match (read, guard) {
            (Some(at), _) => newest = newest.max(at),
            (None, _) if view.mod_revision(guard) == 0 => {}
            (None, Guard::Universe(_) | Guard::InUniverse(_)) => newest = newest.max(catalog),
            (None, Guard::Unchanged(k))
                if matches!(layout::kind(k), layout::Kind::Group { .. }) =>
            {
                newest = newest.max(catalog)
            }
            (None, _) => return None,
        }
    }
    for _ in guards.iter().filter(|g| matches!(g, Guard::Universe(_))) {
        if let Some(at) = revision(reads.next())? {
            newest = newest.max(at);
        }
    }
    Some(newest)
}

/// The end of the range of every key that starts with `prefix`.
fn prefix_end(prefix: &str) -> Vec<u8> {
    let mut end = prefix.as_bytes().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// Edits batched into one transaction at most.
const BATCH_EDITS: usize = 16;
/// Transactions of batched edits in flight at once, per store.
const BATCHES_IN_FLIGHT: usize = 2;
/// The most operations (or comparisons, or reads) of an edit that is batched: within etcd's
/// budget for a transaction nested in one of [`BATCH_EDITS`] (`--max-txn-ops` less the nested
/// transactions).
const BATCHED_OPS: usize = 64;
/// The most bytes an edit that is batched writes, and a batch in all (etcd takes requests of
/// up to 1.5 MiB by default).
const BATCHED_BYTES: usize = 128 << 10;
const BATCH_BYTES: usize = 512 << 10;

/// The keys an edit's transaction writes.
#[derive(Default)]
struct Footprint {
    puts: Vec<String>,
    /// Keys deleted, and prefixes deleted whole (both taken as prefixes: never too few).
    deletes: Vec<String>,
    /// Keys compared but not written, and prefixes compared whole (taken as prefixes).
    compared: Vec<String>,
    bytes: usize,
    /// Whether it records its idempotency key (a batch that fails is sent again edit by edit,
    /// and only an edit with a record tells, if its first send did commit, that it did).
    recorded: bool,
}

impl Footprint {
    /// Whether etcd takes the two in one transaction: no key put by both, none put by one and
    /// deleted by the other (etcd refuses such a transaction whole as `duplicate key`).
    fn apart(&self, other: &Footprint) -> bool {
        let covers = |dels: &[String], puts: &[String]| {
            puts.iter().any(|k| dels.iter().any(|d| k.starts_with(d.as_str())))
        };
        let nested = |a: &[String], b: &[String]| {
            a.iter()
                .any(|x| b.iter().any(|y| x.starts_with(y.as_str()) || y.starts_with(x.as_str())))
        };
        // And none written by one where the other compares without writing: etcd compares
        // every nested transaction against the state before the batch, so the other's compare
        // would not see the write.
        !self.puts.iter().any(|k| other.puts.contains(k))
            && !covers(&self.deletes, &other.puts)
            && !covers(&other.deletes, &self.puts)
            && !covers(&self.compared, &other.puts)
            && !covers(&other.compared, &self.puts)
            && !nested(&self.compared, &other.deletes)
            && !nested(&other.compared, &self.deletes)
    }
}

/// One edit's transaction: on `compares`, `ops`, else `reads`.
struct Pending {
    compares: Vec<Compare>,
    ops: Vec<TxnOp>,
    reads: Vec<TxnOp>,
    footprint: Footprint,
}

impl Pending {
    fn txn(&self) -> Txn {
        Txn::new()
            .when(self.compares.clone())
            .and_then(self.ops.clone())
            .or_else(self.reads.clone())
    }

    /// Whether it may share a transaction with others.
    fn batchable(&self) -> bool {
        let f = &self.footprint;
        f.recorded
            && self.ops.len() <= BATCHED_OPS
            && self.compares.len() <= BATCHED_OPS
            && self.reads.len() <= BATCHED_OPS
            && f.bytes <= BATCHED_BYTES
    }
}

/// What etcd answered an edit's transaction.
struct Committed {
    succeeded: bool,
    /// The revision of the transaction (of the batch it was sent in).
    revision: i64,
    /// The responses of the branch that ran.
    responses: Vec<TxnOpResponse>,
}

impl Committed {
    fn of(resp: &etcd_client::TxnResponse, revision: i64) -> Committed {
        Committed { succeeded: resp.succeeded(), revision, responses: resp.op_responses() }
    }
}

/// An edit's transaction queued for [`commit_batches`], and where its answer goes.
struct Queued {
    pending: Pending,
    answer: tokio::sync::oneshot::Sender<Result<Committed>>,
}

const COMMIT_OP: &str = "transaction (commit an edit)";

/// Sends one edit's transaction alone.
async fn commit_alone(client: &Client, pending: &Pending) -> Result<Committed> {
    let resp = timed(COMMIT_OP, client.kv_client().txn(pending.txn())).await?;
    let revision = resp.header().map_or(0, |h| h.revision());
    Ok(Committed::of(&resp, revision))
}

/// Group commit: sends the edits queued on `queued`, those queued meanwhile together in one
/// transaction (each edit a transaction nested in it, with its own comparisons, writes and
/// reads: one Raft entry for all of them, whichever commit and whichever are refused), with at
/// most [`BATCHES_IN_FLIGHT`] transactions in flight; an edit that finds none in flight goes at
/// once, alone. Edits that overlap (see [`Footprint::apart`]) go in different batches. A batch
/// that etcd refuses or does not answer is sent again edit by edit, each then answered as if
/// sent alone the first time (an edit whose first send did commit is refused the second time
/// on its idempotency record, and answered from it).
async fn commit_batches(client: Client, mut queued: tokio::sync::mpsc::UnboundedReceiver<Queued>) {
    let in_flight = Arc::new(tokio::sync::Semaphore::new(BATCHES_IN_FLIGHT));
    let mut held: std::collections::VecDeque<Queued> = std::collections::VecDeque::new();
    loop {
        let Ok(permit) = in_flight.clone().acquire_owned().await else { return };
        let first = match held.pop_front() {
            Some(q) => q,
            None => match queued.recv().await {
                Some(q) => q,
                None => return,
            },
        };
        let mut batch = vec![first];
        let mut bytes = batch[0].pending.footprint.bytes;
        let mut skipped = Vec::new();
        while batch.len() < BATCH_EDITS {
            let next = match held.pop_front() {
                Some(q) => q,
                None => match queued.try_recv() {
                    Ok(q) => q,
                    Err(_) => break,
                },
            };
            let fits = next.pending.batchable()
                && batch[0].pending.batchable()
                && bytes + next.pending.footprint.bytes <= BATCH_BYTES
                && batch.iter().all(|q| q.pending.footprint.apart(&next.pending.footprint));
            if fits {
                bytes += next.pending.footprint.bytes;
                batch.push(next);
            } else {
                skipped.push(next);
            }
        }
        // What did not fit goes first next time, in its order.
        for q in skipped.into_iter().rev() {
            held.push_front(q);
        }
        let client = client.clone();
        tokio::spawn(async move {
            send_batch(&client, batch).await;
            drop(permit);
        });
    }
}

/// Sends `batch` (see [`commit_batches`]) and answers each of its edits.
async fn send_batch(client: &Client, batch: Vec<Queued>) {
    if let [one] = batch.as_slice() {
        let answer = commit_alone(client, &one.pending).await;
        if let Some(q) = batch.into_iter().next() {
            let _ = q.answer.send(answer);
        }
        return;
    }
    let nested: Vec<TxnOp> = batch.iter().map(|q| TxnOp::txn(q.pending.txn())).collect();
    let sent = timed(COMMIT_OP, client.kv_client().txn(Txn::new().and_then(nested))).await;
    let answers = match sent {
        Ok(resp) => {
            let revision = resp.header().map_or(0, |h| h.revision());
            let each: Vec<Committed> = resp
                .op_responses()
                .iter()
                .filter_map(|r| match r {
                    TxnOpResponse::Txn(t) => Some(Committed::of(t, revision)),
                    _ => None,
                })
                .collect();
            (each.len() == batch.len()).then_some(each)
        }
        Err(e) => {
            tracing::debug!(error = %e, edits = batch.len(), "a batch of edits failed; sending them one by one");
            None
        }
    };
    match answers {
        Some(each) => {
            for (q, answer) in batch.into_iter().zip(each) {
                let _ = q.answer.send(Ok(answer));
            }
        }
        None => {
            let alone = batch.iter().map(|q| commit_alone(client, &q.pending));
            let answers = futures::future::join_all(alone).await;
            for (q, answer) in batch.into_iter().zip(answers) {
                let _ = q.answer.send(answer);
            }
        }
    }
}

/// Where the outcome of an edit with `idem`'s key is recorded, relative to the prefix.
fn idempotency_key(idem: &Idempotency) -> String {
    format!("{IDEMPOTENCY}{}", idem.digest())
}

/// A liveness record's value: the report as JSON.
fn encode_report(report: &Realized) -> String {
    serde_json::to_string(report).unwrap_or_else(|_| report.revision.to_string())
}

/// A liveness record's value: a report as JSON, or a bare decimal revision (as older versions
/// wrote it).
fn decode_report(value: &[u8]) -> Option<Realized> {
    let text = std::str::from_utf8(value).ok()?.trim();
    if let Ok(revision) = text.parse::<u64>() {
        return Some(Realized::at(revision));
    }
    serde_json::from_str(text).ok()
}

/// A client of the etcd cluster `options` names (connections are made lazily: this fails only
/// on a malformed endpoint or option). Clones share its connections. Requests go to one member
/// and move on to the next when it cannot be reached (`store/failover.rs`).
pub async fn connect(options: &EtcdOptions) -> Result<Client> {
    Ok(connect_pinned(options).await?.0)
}

/// [`connect`], with a handle on which member its requests go to.
async fn connect_pinned(options: &EtcdOptions) -> Result<(Client, super::failover::Pin)> {
    let endpoints = options.endpoints.join(",");
    if options.endpoints.is_empty() {
        return Err(Error::Connect {
            endpoints,
            source: etcd_client::Error::InvalidArgs("no endpoint given".into()),
        });
    }
    if options.lease_ttl < Duration::from_secs(1) {
        return Err(Error::Connect {
            endpoints,
            source: etcd_client::Error::InvalidArgs(format!(
                "lease TTL {:?} is under one second",
                options.lease_ttl
            )),
        });
    }
    let mut connect = ConnectOptions::new()
        .with_connect_timeout(REQUEST_TIMEOUT)
        .with_keep_alive(KEEPALIVE_INTERVAL, KEEPALIVE_TIMEOUT)
        .with_keep_alive_while_idle(true);
    if let Some(tls) = &options.tls {
        // rustls (ring) through tonic; endpoints without a scheme become https://.
        crate::tls::provider();
        connect = connect.with_tls(tls.options(&endpoints)?);
    }
    if let Some((user, password)) = &options.user {
        connect = connect.with_user(user, password).with_auto_token_refresh(true);
    }
    // Without a user, connecting is lazy: this fails only on a malformed endpoint (or
    // unreadable TLS files, above). With a user it authenticates at once: wait for etcd as the
    // first read of a store does, but fail at once if etcd refuses the credentials.
    // One member at a time, moving on when it cannot be reached (see `failover`).
    let mut delay = RETRY_MIN;
    loop {
        let (failover, pin) = super::failover::Failover::new();
        match Client::connect_with_balanced_channel(
            &options.endpoints,
            Some(connect.clone()),
            failover,
        )
        .await
        {
            Ok(c) => return Ok((c, pin)),
            Err(source) if options.user.is_some() && !credentials_refused(&source) => {
                tracing::warn!(
                    etcd = %endpoints, error = %source, retry_in = ?delay,
                    "cannot authenticate to etcd yet; retrying"
                );
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(RETRY_MAX);
            }
            Err(source) => return Err(Error::Connect { endpoints, source }),
        }
    }
}

/// Runs one etcd request with [`REQUEST_TIMEOUT`], naming it in the error.
async fn timed<T>(
    op: &'static str,
    request: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T> {
    match tokio::time::timeout(REQUEST_TIMEOUT, request).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(etcd_client::Error::GRpcStatus(s))) if s.code() == tonic::Code::PermissionDenied => {
            Err(Error::Denied { op, message: s.message().to_owned() })
        }
        Ok(Err(source)) => Err(Error::Etcd { op, source }),
        Err(_) => Err(Error::Timeout { op, after: REQUEST_TIMEOUT }),
    }
}

/// Whether a request failed in the transport (no answer in time, the connection failed, or a
/// member that cannot serve it now), so that another member may well answer it.
fn in_transport(e: &Error) -> bool {
    match e {
        Error::Timeout { .. } => true,
        Error::Etcd { source, .. } => transport_error(source),
        _ => false,
    }
}

fn transport_error(e: &etcd_client::Error) -> bool {
    match e {
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        etcd_client::Error::GRpcStatus(s) => matches!(
            s.code(),
            tonic::Code::Unavailable
                | tonic::Code::Unknown
                | tonic::Code::Cancelled
                | tonic::Code::DeadlineExceeded
        ),
        _ => false,
    }
}

/// Whether etcd refused a client's credentials (as opposed to not answering): wrong user or
/// password, or auth not enabled on etcd.
fn credentials_refused(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s)
        if matches!(s.code(), tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition
            | tonic::Code::PermissionDenied | tonic::Code::Unauthenticated))
}

fn nanos_since_epoch(t: std::time::SystemTime) -> u128 {
    t.duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos()
}

/// Locks a mutex that is never held across an await or a panic-prone section.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn liveness_records_keep_a_lapsed_host_with_its_last_report() {
        let mut alive = BTreeMap::new();
        record_liveness(&mut alive, "alive/h1", Some(b"12"), "/v/");
        assert_eq!(alive["h1"], (Realized::at(12), true));
        record_liveness(&mut alive, "alive/h1", None, "/v/");
        assert_eq!(
            alive["h1"],
            (Realized::at(12), false),
            "an expired host keeps its last revision"
        );
        let failed = Realized {
            revision: 13,
            errors: vec![super::super::HostError {
                endpoint: "ep-00000001".into(),
                code: "invalid_argument".into(),
                message: "no namespace".into(),
            }],
            followed: None,
        };
        record_liveness(&mut alive, "alive/h1", Some(encode_report(&failed).as_bytes()), "/v/");
        assert_eq!(alive["h1"], (failed, true), "errors travel with the revision");
    }

    #[test]
    fn the_desired_state_range_leaves_out_the_liveness_records() {
        // Every host rewrites `alive/<name>` with each revision it realizes: inside the range
        // every host watches, one edit would be N² events in a fleet of N hosts.
        let (start, end) = (format!("/v/{AUDIT_END}"), format!("/v/{IDEMPOTENCY}"));
        let inside = |k: &str| k >= start.as_str() && k.as_bytes() < end.as_bytes();
        assert!(!inside("/v/alive/h1"));
        assert!(!inside("/v/audit/00000000000000000001-h1-0"));
        for key in
            ["catalog", "hosts/h1", "u/uni-1/version", "placement/h1/ns", "tokens/t", "holds/u/h"]
        {
            assert!(inside(&format!("/v/{key}")), "{key}");
        }
        assert!(format!("/v/{ALIVE}") < format!("/v/{ALIVE_END}"));
        assert!(format!("/v/{ALIVE_END}") <= format!("/v/{AUDIT}"));
    }

    #[test]
    fn cache_tracks_guards_apart_from_the_state() {
        let mut c = Cache::default();
        c.record("u/uni-1/version", Some(b""), 7);
        c.record("catalog", Some(b""), 8);
        c.record("hosts/h1", Some(b"{}"), 9);
        c.record("holds/uni-1/0123", Some(b""), 10);
        let view = View {
            state: Arc::default(),
            versions: c.versions.clone(),
            catalog: c.catalog,
            keys: c.keys.clone(),
            hosts_last: c.hosts_last,
            changed: c.changed.clone(),
            holds: c.holds.clone(),
            revision: c.revision,
        };
        assert_eq!(view.mod_revision(&Guard::Universe("uni-1".into())), 7);
        assert_eq!(view.mod_revision(&Guard::Universe("uni-2".into())), 0);
        assert_eq!(view.mod_revision(&Guard::Catalog), 8);
        assert_eq!(view.mod_revision(&Guard::Unchanged("hosts/h1".into())), 9);
        assert!(view.held("uni-1") && !view.held("uni-2") && !view.held("uni-"));
        c.record("holds/uni-1/0123", None, 11);
        assert!(c.holds.is_empty());
        c.record("u/uni-1/version", None, 10);
        assert!(c.versions.get("uni-1").is_none());
    }

    #[tokio::test]
    async fn demand_keeps_the_liveness_watch_until_it_lingers_out() {
        let linger = Duration::from_millis(300);
        let demand = Arc::new(watch::channel(0usize).0);
        let first = Demand::new(&demand);
        let second = Demand::new(&demand);
        assert_eq!(*demand.borrow(), 2);
        let done = tokio::spawn(idle(demand.subscribe(), linger));
        drop(first);
        tokio::time::sleep(linger * 2).await;
        assert!(!done.is_finished(), "a demand still held keeps the watch");
        drop(second);
        assert_eq!(*demand.borrow(), 0);
        tokio::time::sleep(linger / 3).await;
        let again = Demand::new(&demand);
        let renewed = Instant::now();
        tokio::time::sleep(linger * 2).await;
        assert!(!done.is_finished(), "a new demand within the linger restarts it");
        drop(again);
        let dropped = Instant::now();
        tokio::time::timeout(linger * 10, done).await.unwrap().unwrap();
        assert!(dropped.elapsed() >= linger, "{:?} after the last demand", dropped.elapsed());
        assert!(renewed.elapsed() >= linger * 3);
    }
}
