//! The etcd store: the desired state of a fleet, shared by every host's `versed`.
//!
//! Contract (see the parent module for what every store guarantees):
//! - Layout: every key lives under one prefix (default [`DEFAULT_PREFIX`]), one key per object,
//!   values in JSON: `universes/<id>`, `groups/<id>` (with its rules), `endpoints/<id>`,
//!   `identities/<n>`, `hosts/<name>` ([`HostRecord`]), `tokens/<id>` (API tokens: the hash of
//!   the secret, never the secret), `counters` (the VNIs and endpoint serials handed out so far,
//!   which are never handed out again, S7), and `revision` (the state's revision, decimal, S13).
//!   Liveness lives beside it: `alive/<name>`, what the host has realized ([`Realized`] as
//!   JSON; a bare decimal revision is read too), attached to a lease of the host's.
//! - Edits are read-modify-write in one etcd transaction: read every key, run the edit, write
//!   the keys that changed and delete the ones that are gone, on the condition that the
//!   `revision` key's `mod_revision` is still the one read. Two hosts editing at once: one
//!   commits, the other reads again and re-runs its edit on the new state (so the closure must
//!   be re-runnable); no edit is lost and revisions strictly increase.
//! - Following: every store watches the whole prefix from the etcd revision it last applied and
//!   republishes the [`State`] whenever a desired-state key changes. When etcd is unreachable the
//!   last state stays published (the dataplane keeps enforcing it); when it comes back the watch
//!   resumes from the last applied revision, or, if etcd has compacted that history away,
//!   everything is read again.
//! - Liveness: [`Store::register_host`](super::Store::register_host) puts `hosts/<name>` (an edit)
//!   and starts a task that grants a lease of [`EtcdOptions::lease_ttl`], puts `alive/<name>`
//!   under it and keeps it alive (every third of the TTL); each reported realized revision is
//!   written there. If the store is dropped, or the host cannot reach etcd for a TTL, etcd
//!   deletes the key and every host shows this one unhealthy; the task renews everything as soon
//!   as it can.
//!
//! - Audit trail: `audit/<time in ns, 20 digits>-<host>-<n>`, one key per record (JSON), apart
//!   from the desired state: a read of the state skips the `audit/` range, and the watch drops
//!   its events. Every host trims the trail every [`AUDIT_TRIM_INTERVAL`]: records older than
//!   the retention age go (one range delete, keys sort by time), then the oldest beyond the
//!   retained count.
//! - Credentials: with `EtcdOptions::user`, the client authenticates as that etcd user (and
//!   renews its auth token when etcd expires it). A request etcd refuses for that user's
//!   permissions is [`Error::Denied`], not "unavailable": retrying cannot help. The README
//!   ("etcd access control") lists which keys a host reads and writes.
//!
//! etcd limits one transaction to `--max-txn-ops` operations (128 by default) and one request to
//! `--max-request-bytes` (1.5 MiB). An edit that would change more than [`MAX_TXN_OPS`] keys is
//! refused before it is sent, and one etcd refuses as invalid (too many operations, too
//! large) is refused the same way: a 409 `limit_exceeded` saying what to do, never a 503, since
//! sending it again cannot help. (Deleting a universe deletes its groups in the same
//! transaction: one with more than 125 groups is refused until some of its groups are deleted.)

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, EventType, GetOptions, PutOptions,
    SortOrder, SortTarget, Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::watch;
use tokio::task::AbortHandle;
use tokio::time::{Instant, MissedTickBehavior};

use super::{apply_edit, audit_matches, AuditRetention, Error, HostStatus, Realized, Result};
use crate::audit::{AuditRecord, Query as AuditQuery};
use crate::model::{self, HostRecord, State};

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
/// How long an edit waits for this store's watch to deliver its own commit, so that
/// `snapshot()` shows it on return (past it the edit returns anyway, committed).
const APPLY_TIMEOUT: Duration = Duration::from_secs(10);
/// Attempts of one edit against concurrent edits before giving up.
const MAX_ATTEMPTS: u32 = 64;
/// Backoff of reconnections (watch, liveness, first read).
const RETRY_MIN: Duration = Duration::from_millis(100);
const RETRY_MAX: Duration = Duration::from_secs(5);
/// Largest message accepted from etcd (a full read of a large state): gRPC's default is 4 MiB.
const MAX_MESSAGE: usize = 256 << 20;

/// Most keys one edit may change: etcd's default `--max-txn-ops`.
pub const MAX_TXN_OPS: usize = 128;

/// Relative keys (under the prefix).
const REVISION: &str = "revision";
const COUNTERS: &str = "counters";

/// The value of the `counters` key.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct Counters {
    vnis_issued: u32,
    serials_issued: u64,
}
const ALIVE: &str = "alive/";
const AUDIT: &str = "audit/";
/// The first key after every `audit/…` key (`'/' + 1`).
const AUDIT_END: &str = "audit0";
/// How often each host trims the audit trail to its retention.
pub const AUDIT_TRIM_INTERVAL: Duration = Duration::from_secs(30);
/// Records read per request by a query of the audit trail.
const AUDIT_PAGE: i64 = 1000;

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
        }
    }
}

/// The etcd store. Use it through [`Store`](super::Store). Dropping it stops its watch and its
/// liveness tasks (the leases then lapse).
pub struct Etcd {
    shared: Arc<Shared>,
    tasks: Mutex<Vec<AbortHandle>>,
}

/// What the background tasks share with the handle.
struct Shared {
    client: Client,
    prefix: String,
    lease_ttl: Duration,
    state: watch::Sender<Arc<State>>,
    hosts: watch::Sender<Arc<Vec<HostStatus>>>,
    /// The etcd revision that `state` and `hosts` reflect.
    applied: watch::Sender<i64>,
    /// Realized revisions reported for the hosts this store keeps alive, by name.
    local: Mutex<BTreeMap<String, Local>>,
    audit_retention: AuditRetention,
    /// Numbers the audit records of this store, so two in the same nanosecond differ.
    audit_seq: std::sync::atomic::AtomicU64,
    /// What the watch received.
    received: WatchCounters,
}

/// What a store's watch has received since the store opened (`Store::watch_stats`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
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

struct Local {
    realized: watch::Sender<Realized>,
    /// Whether its liveness task runs (started by `register_host`).
    alive: bool,
}

/// What this store knows of the keys under the prefix.
#[derive(Default)]
struct Cache {
    /// Desired-state keys (relative) and their values.
    desired: BTreeMap<String, Vec<u8>>,
    /// Hosts by name: the last report seen, and whether `alive/<name>` exists.
    alive: BTreeMap<String, (Realized, bool)>,
    /// The etcd revision this cache reflects.
    revision: i64,
}

/// One consistent read of every key under the prefix.
struct Snapshot {
    cache: Cache,
    /// `mod_revision` of the `revision` key (0: absent, an empty store).
    revision_mod: i64,
}

/// Why a watch stream ended.
enum WatchEnd {
    /// etcd no longer has the history since our revision: read everything again.
    Compacted,
    Failed(Error),
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for task in lock(&self.tasks).drain(..) {
            task.abort();
        }
    }
}

impl Etcd {
    pub(super) async fn open(options: EtcdOptions) -> Result<Arc<Etcd>> {
        let client = connect(&options).await?;
        Etcd::open_with_client(options, client).await
    }

    /// [`Etcd::open`] over a client that others may share (a clone of one [`connect`] made):
    /// this store's watch and lease are its own streams on that client's connections.
    pub(super) async fn open_with_client(
        options: EtcdOptions,
        client: Client,
    ) -> Result<Arc<Etcd>> {
        let endpoints = options.endpoints.join(",");
        let mut prefix = options.prefix;
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        let (state, _) = watch::channel(Arc::new(State::default()));
        let (hosts, _) = watch::channel(Arc::new(Vec::new()));
        let (applied, _) = watch::channel(0);
        let shared = Arc::new(Shared {
            client,
            prefix,
            lease_ttl: options.lease_ttl,
            state,
            hosts,
            applied,
            local: Mutex::new(BTreeMap::new()),
            audit_retention: options.audit_retention,
            audit_seq: std::sync::atomic::AtomicU64::new(0),
            received: WatchCounters::default(),
        });

        let mut delay = RETRY_MIN;
        let cache = loop {
            match shared.read().await {
                Ok(snap) => break snap.cache,
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
        // The first state must decode: publishing nothing (or an empty state) instead would
        // make the reconciler tear the dataplane down.
        let first =
            decode(&shared.prefix, cache.desired.iter().map(|(k, v)| (k.as_str(), &v[..])))?;
        shared.state.send_replace(Arc::new(first));
        shared.publish(&cache, false);
        tracing::info!(
            etcd = %endpoints,
            prefix = %shared.prefix,
            etcd_revision = cache.revision,
            revision = shared.state.borrow().revision,
            "following the desired state in etcd"
        );

        let follow = tokio::spawn(shared.clone().follow(cache));
        let trim = tokio::spawn(shared.clone().trim_audit());
        Ok(Arc::new(Etcd {
            shared,
            tasks: Mutex::new(vec![follow.abort_handle(), trim.abort_handle()]),
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

    pub(super) fn subscribe_hosts(&self) -> watch::Receiver<Arc<Vec<HostStatus>>> {
        self.shared.hosts.subscribe()
    }

    /// See [`Store::edit`](super::Store::edit) and the module contract.
    pub(super) async fn edit<T, F>(&self, mut f: F) -> Result<(T, u64)>
    where
        F: FnMut(&mut State) -> model::Result<T> + Send,
        T: Send + 'static,
    {
        let sh = &self.shared;
        let mut delay = Duration::from_millis(5);
        for attempt in 1..=MAX_ATTEMPTS {
            let snap = sh.read().await?;
            let current =
                decode(&sh.prefix, snap.cache.desired.iter().map(|(k, v)| (k.as_str(), &v[..])))?;
            let (out, next) = apply_edit(&current, &mut f)?;
            let Some(next) = next else {
                return Ok((out, current.revision));
            };
            let before = encode(&sh.prefix, &current)?;
            let after = encode(&sh.prefix, &next)?;
            let mut ops = Vec::new();
            for (key, value) in &after {
                if before.get(key) != Some(value) {
                    ops.push(TxnOp::put(sh.key(key), value.clone(), None));
                }
            }
            for key in before.keys().filter(|k| !after.contains_key(*k)) {
                ops.push(TxnOp::delete(sh.key(key), None));
            }
            if ops.len() > MAX_TXN_OPS {
                return Err(too_many_keys(&current, &next, ops.len()).into());
            }
            // A missing key compares with mod_revision 0, so the first edit of an empty
            // store is guarded too.
            let guard =
                Compare::mod_revision(sh.key(REVISION), CompareOp::Equal, snap.revision_mod);
            let txn = Txn::new().when(vec![guard]).and_then(ops);
            let mut kv = sh.client.kv_client();
            let resp = match timed("transaction (commit an edit)", kv.txn(txn)).await {
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
                other => other?,
            };
            if resp.succeeded() {
                let committed = resp.header().map_or(0, |h| h.revision());
                sh.wait_applied(committed).await;
                return Ok((out, next.revision));
            }
            tracing::debug!(attempt, "another edit committed first; running the edit again");
            // Jitter, so that two hosts that keep colliding drift apart.
            let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
            tokio::time::sleep(Duration::from_millis(rand::random_range(0..=ms))).await;
            delay = (delay * 2).min(Duration::from_millis(500));
        }
        Err(Error::Contention { attempts: MAX_ATTEMPTS })
    }

    /// Records the host in the desired state, then keeps its liveness record alive.
    pub(super) async fn register_host(
        &self,
        name: &str,
        underlay_ip: Option<Ipv4Addr>,
        api: Option<String>,
    ) -> Result<()> {
        let record = HostRecord { name: name.to_owned(), underlay_ip, api };
        self.edit(|s| {
            if s.hosts.get(name) != Some(&record) {
                s.hosts.insert(name.to_owned(), record.clone());
                s.revision += 1;
            }
            Ok(())
        })
        .await?;
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
        let task = tokio::spawn(self.shared.clone().keep_alive(name.to_owned(), realized));
        lock(&self.tasks).push(task.abort_handle());
        Ok(())
    }

    pub(super) async fn append_audit(&self, record: &AuditRecord) -> Result<()> {
        let sh = &self.shared;
        let nanos = record.time.0.duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let n = sh.audit_seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let key = sh.key(&format!("{AUDIT}{:020}-{}-{n}", nanos.as_nanos(), record.host));
        let value = serde_json::to_vec(record).map_err(|e| Error::Corrupt {
            key: key.clone(),
            reason: format!("cannot serialize: {e}"),
        })?;
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
                match serde_json::from_slice::<AuditRecord>(kv.value()) {
                    Ok(rec) if audit_matches(&rec, query, oldest) => out.push(rec),
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

    /// Reads every key under the prefix but the audit trail, at one etcd revision: the keys
    /// before `audit/` and the keys after it, in one transaction.
    async fn read(&self) -> Result<Snapshot> {
        let mut kv = self.client.kv_client().max_decoding_message_size(MAX_MESSAGE);
        let mut end = self.prefix.clone().into_bytes();
        // The prefix ends with '/': the first key after every key under it ends with '0'.
        if let Some(last) = end.last_mut() {
            *last += 1;
        }
        let ranges = vec![
            TxnOp::get(self.prefix.clone(), Some(GetOptions::new().with_range(self.key(AUDIT)))),
            TxnOp::get(self.key(AUDIT_END), Some(GetOptions::new().with_range(end))),
        ];
        let resp =
            timed("range (read the desired state)", kv.txn(Txn::new().and_then(ranges))).await?;
        let mut cache =
            Cache { revision: resp.header().map_or(0, |h| h.revision()), ..Cache::default() };
        let mut revision_mod = 0;
        for op in resp.op_responses() {
            let TxnOpResponse::Get(range) = op else { continue };
            for kv in range.kvs() {
                let Some(rel) = self.relative(kv.key()) else { continue };
                if rel == REVISION {
                    revision_mod = kv.mod_revision();
                }
                cache.put(rel, kv.value(), &self.prefix);
            }
        }
        Ok(Snapshot { cache, revision_mod })
    }

    /// Keeps the audit trail within its retention, for as long as the store lives (every host
    /// does it; the deletes are idempotent).
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
                "the watch has not delivered a committed edit in time; returning anyway"
            );
        }
    }

    /// Publishes what `cache` holds: the state (when `desired_changed`, and only if it
    /// decodes), the hosts, then the applied etcd revision.
    fn publish(&self, cache: &Cache, desired_changed: bool) {
        if desired_changed {
            match decode(&self.prefix, cache.desired.iter().map(|(k, v)| (k.as_str(), &v[..]))) {
                Ok(state) => {
                    self.state.send_if_modified(|cur| {
                        if **cur == state {
                            return false;
                        }
                        *cur = Arc::new(state);
                        true
                    });
                }
                Err(e) => tracing::error!(
                    error = %e, etcd_revision = cache.revision,
                    "the desired state in etcd does not decode; keeping the last good one"
                ),
            }
        }
        let state = self.state.borrow().clone();
        let mut hosts: BTreeMap<&str, HostStatus> = state
            .hosts
            .values()
            .map(|h| {
                let (realized, healthy) =
                    cache.alive.get(&h.name).cloned().unwrap_or((Realized::default(), false));
                let status = HostStatus {
                    name: h.name.clone(),
                    underlay_ip: h.underlay_ip,
                    api: h.api.clone(),
                    revision: realized.revision,
                    healthy,
                    errors: realized.errors,
                };
                (h.name.as_str(), status)
            })
            .collect();
        for (name, (realized, healthy)) in &cache.alive {
            hosts.entry(name).or_insert_with(|| HostStatus {
                name: name.clone(),
                underlay_ip: None,
                api: None,
                revision: realized.revision,
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
        self.applied.send_if_modified(|cur| {
            let newer = cache.revision > *cur;
            if newer {
                *cur = cache.revision;
            }
            newer
        });
    }

    /// Follows the prefix for as long as the store lives (see the module contract).
    async fn follow(self: Arc<Shared>, mut cache: Cache) {
        let mut delay = RETRY_MIN;
        loop {
            match self.watch(&mut cache, &mut delay).await {
                WatchEnd::Compacted => {
                    tracing::warn!(
                        etcd_revision = cache.revision,
                        "etcd compacted the history this watch needed; reading everything again"
                    );
                    loop {
                        match self.read().await {
                            Ok(snap) => {
                                cache = snap.cache;
                                self.publish(&cache, true);
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

    /// One watch stream from `cache.revision + 1`, applied to `cache` until it ends.
    async fn watch(&self, cache: &mut Cache, delay: &mut Duration) -> WatchEnd {
        let options = WatchOptions::new().with_prefix().with_start_revision(cache.revision + 1);
        let mut client = self.client.watch_client().max_decoding_message_size(MAX_MESSAGE);
        let mut stream =
            match timed("watch", client.watch(self.prefix.clone(), Some(options))).await {
                Ok(s) => s,
                Err(e) => return WatchEnd::Failed(e),
            };
        loop {
            let resp = match stream.message().await {
                Ok(Some(resp)) => resp,
                Ok(None) => {
                    return WatchEnd::Failed(Error::Etcd {
                        op: "watch",
                        source: etcd_client::Error::WatchError("the stream ended".into()),
                    })
                }
                Err(source) => return WatchEnd::Failed(Error::Etcd { op: "watch", source }),
            };
            if resp.canceled() {
                if resp.compact_revision() > 0 {
                    return WatchEnd::Compacted;
                }
                return WatchEnd::Failed(Error::Etcd {
                    op: "watch",
                    source: etcd_client::Error::WatchError(format!(
                        "canceled by etcd: {}",
                        resp.cancel_reason()
                    )),
                });
            }
            self.received.count(&resp);
            // The stream works: the next failure starts its backoff afresh.
            *delay = RETRY_MIN;
            let mut desired_changed = false;
            for event in resp.events() {
                let Some(kv) = event.kv() else { continue };
                let Some(rel) = self.relative(kv.key()) else { continue };
                // etcd sends every event of one revision (one transaction) in one response,
                // so the state published below is never half an edit.
                desired_changed |= match event.event_type() {
                    EventType::Put => cache.put(rel, kv.value(), &self.prefix),
                    EventType::Delete => cache.delete(rel),
                };
                cache.revision = cache.revision.max(kv.mod_revision());
            }
            if !resp.events().is_empty() {
                self.publish(cache, desired_changed);
            }
        }
    }

    /// Keeps `alive/<name>` alive for as long as the store lives.
    async fn keep_alive(self: Arc<Shared>, name: String, mut realized: watch::Receiver<Realized>) {
        let mut delay = RETRY_MIN;
        loop {
            let started = Instant::now();
            let e = self.alive_session(&name, &mut realized).await;
            if started.elapsed() > self.lease_ttl {
                delay = RETRY_MIN;
            }
            tracing::warn!(host = %name, error = %e, retry_in = ?delay,
                "lost this host's liveness record in etcd; renewing it");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(RETRY_MAX);
        }
    }

    /// One lease: grant it, put the liveness record under it, keep it alive and rewrite the
    /// record on each new realized revision, until something fails.
    async fn alive_session(&self, name: &str, realized: &mut watch::Receiver<Realized>) -> Error {
        let ttl_s = i64::try_from(self.lease_ttl.as_secs()).unwrap_or(i64::MAX).max(1);
        let key = self.key(&format!("{ALIVE}{name}"));
        let mut lease = self.client.lease_client();
        // etcd may grant more than asked (its minimum is 1.5 election timeouts): renew at the
        // pace of what was granted.
        let (id, ttl) = match timed("lease grant", lease.grant(ttl_s, None)).await {
            Ok(g) => (g.id(), Duration::from_secs(g.ttl().max(1).unsigned_abs())),
            Err(e) => return e,
        };
        let (mut keeper, mut responses) =
            match timed("lease keep-alive", lease.keep_alive(id)).await {
                Ok(k) => k,
                Err(e) => return e,
            };
        let mut kv = self.client.kv_client();
        let mut report = realized.borrow_and_update().clone();
        let put = PutOptions::new().with_lease(id);
        if let Err(e) =
            timed("put (liveness)", kv.put(key.clone(), encode_report(&report), Some(put.clone())))
                .await
        {
            return e;
        }
        tracing::info!(host = %name, lease = id, ttl = ?ttl, revision = report.revision,
            "host alive in etcd");
        let mut tick = tokio::time::interval(ttl / 3);
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    if let Err(source) = keeper.keep_alive().await {
                        return Error::Etcd { op: "lease keep-alive", source };
                    }
                    match tokio::time::timeout(ttl.min(REQUEST_TIMEOUT), responses.message()).await {
                        Err(_) => return Error::Timeout { op: "lease keep-alive", after: ttl.min(REQUEST_TIMEOUT) },
                        Ok(Err(source)) => return Error::Etcd { op: "lease keep-alive", source },
                        Ok(Ok(None)) => return Error::Etcd {
                            op: "lease keep-alive",
                            source: etcd_client::Error::LeaseKeepAliveError("the stream ended".into()),
                        },
                        Ok(Ok(Some(r))) if r.ttl() <= 0 => return Error::Etcd {
                            op: "lease keep-alive",
                            source: etcd_client::Error::LeaseKeepAliveError(format!("lease {id:x} expired")),
                        },
                        Ok(Ok(Some(_))) => {}
                    }
                }
                changed = realized.changed() => {
                    if changed.is_err() {
                        // The sender lives in `self.local`, as long as this task: unreachable,
                        // but a lost sender must not turn into a busy loop.
                        return Error::Etcd {
                            op: "put (liveness)",
                            source: etcd_client::Error::Internal("realized revision channel closed".into()),
                        };
                    }
                    let next = realized.borrow_and_update().clone();
                    if next != report {
                        report = next;
                        if let Err(e) = timed(
                            "put (liveness)",
                            kv.put(key.clone(), encode_report(&report), Some(put.clone())),
                        )
                        .await
                        {
                            return e;
                        }
                    }
                }
            }
        }
    }
}

impl Cache {
    /// Records a put of `rel`; returns whether it is a desired-state key.
    fn put(&mut self, rel: &str, value: &[u8], prefix: &str) -> bool {
        if rel.starts_with(AUDIT) {
            return false;
        }
        if let Some(name) = rel.strip_prefix(ALIVE) {
            let report = decode_report(value).unwrap_or_else(|| {
                tracing::warn!(key = %format!("{prefix}{rel}"), "liveness record is not a report; counting it as revision 0");
                Realized::default()
            });
            self.alive.insert(name.to_owned(), (report, true));
            false
        } else {
            self.desired.insert(rel.to_owned(), value.to_vec());
            true
        }
    }

    /// Records a delete of `rel`; returns whether it is a desired-state key. A host whose
    /// liveness record is gone keeps its last realized revision, unhealthy.
    fn delete(&mut self, rel: &str) -> bool {
        if rel.starts_with(AUDIT) {
            return false;
        }
        if let Some(name) = rel.strip_prefix(ALIVE) {
            if let Some(entry) = self.alive.get_mut(name) {
                entry.1 = false;
            }
            false
        } else {
            self.desired.remove(rel).is_some()
        }
    }
}

/// The refusal of an edit that changes more than [`MAX_TXN_OPS`] keys, saying what to do.
fn too_many_keys(current: &State, next: &State, keys: usize) -> model::Error {
    let gone: Vec<&String> =
        current.universes.keys().filter(|id| !next.universes.contains_key(*id)).collect();
    let hint = match gone.as_slice() {
        [id] => {
            let groups = current.groups.values().filter(|g| &g.universe == *id).count();
            let tokens =
                current.tokens.values().filter(|t| t.universe.as_ref() == Some(*id)).count();
            format!(
                ": universe {id} has {groups} security groups and {tokens} API tokens, all \
                 deleted with it; delete some of them first (a universe can be deleted with at \
                 most {} of its groups and tokens together)",
                MAX_TXN_OPS - 3
            )
        }
        _ => ": split it into smaller edits".to_owned(),
    };
    model::Error::conflict(
        "limit_exceeded",
        None,
        format!(
            "this edit changes {keys} keys in etcd at once, more than the {MAX_TXN_OPS} \
             operations one etcd transaction may hold (etcd --max-txn-ops){hint}"
        ),
    )
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

/// The desired state as keys (relative to the prefix) and values. See the module contract.
fn encode(prefix: &str, state: &State) -> Result<BTreeMap<String, Vec<u8>>> {
    fn json<V: Serialize>(prefix: &str, key: &str, v: &V) -> Result<Vec<u8>> {
        serde_json::to_vec(v).map_err(|e| Error::Corrupt {
            key: format!("{prefix}{key}"),
            reason: format!("cannot serialize: {e}"),
        })
    }
    let mut out = BTreeMap::new();
    out.insert(REVISION.to_owned(), state.revision.to_string().into_bytes());
    let counters =
        Counters { vnis_issued: state.vnis_issued, serials_issued: state.serials_issued };
    out.insert(COUNTERS.to_owned(), json(prefix, COUNTERS, &counters)?);
    for (id, v) in &state.universes {
        let key = format!("universes/{id}");
        out.insert(key.clone(), json(prefix, &key, v)?);
    }
    for (id, v) in &state.groups {
        let key = format!("groups/{id}");
        out.insert(key.clone(), json(prefix, &key, v)?);
    }
    for (id, v) in &state.endpoints {
        let key = format!("endpoints/{id}");
        out.insert(key.clone(), json(prefix, &key, v)?);
    }
    for (n, v) in &state.identities {
        let key = format!("identities/{n}");
        out.insert(key.clone(), json(prefix, &key, v)?);
    }
    for (name, v) in &state.hosts {
        let key = format!("hosts/{name}");
        out.insert(key.clone(), json(prefix, &key, v)?);
    }
    for (id, v) in &state.tokens {
        let key = format!("tokens/{id}");
        out.insert(key.clone(), json(prefix, &key, v)?);
    }
    Ok(out)
}

/// The desired state from keys relative to the prefix (liveness keys are skipped). Fails on
/// the first key that does not hold what [`encode`] writes, naming it; keys of an unknown kind
/// are ignored with a warning (a newer version may have written them).
fn decode<'a>(prefix: &str, kvs: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> Result<State> {
    fn json<T: DeserializeOwned>(value: &[u8]) -> Result<T, String> {
        serde_json::from_slice(value).map_err(|e| format!("not the JSON expected: {e}"))
    }
    fn check(id: &str, field: &str) -> Result<(), String> {
        if id == field {
            Ok(())
        } else {
            Err(format!("holds the object {field:?}, not {id:?}"))
        }
    }
    let mut state = State::default();
    for (key, value) in kvs {
        let corrupt = |reason: String| Error::Corrupt { key: format!("{prefix}{key}"), reason };
        if key == REVISION {
            state.revision = std::str::from_utf8(value)
                .ok()
                .and_then(|t| t.trim().parse().ok())
                .ok_or_else(|| corrupt("not a decimal revision".into()))?;
            continue;
        }
        if key == COUNTERS {
            let c: Counters = json(value).map_err(corrupt)?;
            state.vnis_issued = c.vnis_issued;
            state.serials_issued = c.serials_issued;
            continue;
        }
        let Some((kind, id)) = key.split_once('/') else {
            tracing::warn!(key = %format!("{prefix}{key}"), "ignoring an unknown key");
            continue;
        };
        match kind {
            "universes" => {
                let v: model::Universe = json(value).map_err(corrupt)?;
                check(id, &v.id).map_err(corrupt)?;
                state.universes.insert(id.to_owned(), v);
            }
            "groups" => {
                let v: model::SecurityGroup = json(value).map_err(corrupt)?;
                check(id, &v.id).map_err(corrupt)?;
                state.groups.insert(id.to_owned(), v);
            }
            "endpoints" => {
                let v: model::Endpoint = json(value).map_err(corrupt)?;
                check(id, &v.id).map_err(corrupt)?;
                state.endpoints.insert(id.to_owned(), v);
            }
            "identities" => {
                let n: u32 = id.parse().map_err(|_| corrupt("not an identity number".into()))?;
                let v: model::Identity = json(value).map_err(corrupt)?;
                state.identities.insert(n, v);
            }
            "hosts" => {
                let v: HostRecord = json(value).map_err(corrupt)?;
                check(id, &v.name).map_err(corrupt)?;
                state.hosts.insert(id.to_owned(), v);
            }
            "tokens" => {
                let v: model::Token = json(value).map_err(corrupt)?;
                check(id, &v.id).map_err(corrupt)?;
                state.tokens.insert(id.to_owned(), v);
            }
            "alive" | "audit" => {}
            _ => tracing::warn!(key = %format!("{prefix}{key}"), "ignoring an unknown key"),
        }
    }
    state.complete_legacy();
    Ok(state)
}

/// A client of the etcd cluster `options` names (connections are made lazily: this fails only
/// on a malformed endpoint or option). Clones share its connections. Requests go to one member
/// and move on to the next when it cannot be reached (`store/failover.rs`).
pub async fn connect(options: &EtcdOptions) -> Result<Client> {
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
        match Client::connect_with_balanced_channel(
            &options.endpoints,
            Some(connect.clone()),
            super::failover::Failover,
        )
        .await
        {
            Ok(c) => return Ok(c),
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

    fn sample() -> State {
        let mut s = State::default();
        let u = s
            .create_universe(model::CreateUniverse {
                name: "blue".into(),
                cidr: Some("10.1.0.0/16".into()),
                cidrs: None,
            })
            .unwrap();
        let g = s
            .create_group(model::CreateGroup {
                universe: u.id.clone(),
                name: "web".into(),
                description: None,
            })
            .unwrap();
        s.add_rule(
            &g.id,
            model::CreateRule {
                direction: "ingress".into(),
                protocol: serde_json::json!("tcp"),
                from_port: Some(80),
                to_port: Some(80),
                cidr: Some("10.0.0.0/8".into()),
                ..Default::default()
            },
        )
        .unwrap();
        s.create_endpoint(
            model::CreateEndpoint {
                universe: u.id,
                host: Some("h2".into()),
                netns: "ns".into(),
                ip: "10.1.0.5".into(),
                security_groups: Some(vec![g.id]),
                conntrack_budget: None,
            },
            "h1",
        )
        .unwrap();
        s.hosts.insert(
            "h2".into(),
            HostRecord {
                name: "h2".into(),
                underlay_ip: Some(Ipv4Addr::new(198, 18, 0, 2)),
                api: Some("http://198.18.0.2:7070".into()),
            },
        );
        let secret = model::TokenSecret {
            id: "tok-0000000a".into(),
            hash: "0".repeat(64),
            now: std::time::SystemTime::now(),
        };
        let req = model::CreateToken {
            role: model::Role::Editor,
            universe: s.universes.keys().next().cloned(),
            expires: Some("1h".into()),
            description: Some("ci".into()),
        };
        s.create_token(req, &secret).unwrap();
        s
    }

    #[test]
    fn state_round_trips_through_one_key_per_object() {
        let s = sample();
        let keys = encode("/v/", &s).unwrap();
        let kinds: Vec<&str> =
            keys.keys().map(|k| k.split_once('/').map_or(k.as_str(), |(kind, _)| kind)).collect();
        for kind in [
            "universes",
            "groups",
            "endpoints",
            "identities",
            "hosts",
            "tokens",
            "revision",
            "counters",
        ] {
            assert!(kinds.contains(&kind), "no {kind} key in {keys:?}");
        }
        assert_eq!(keys["revision"], s.revision.to_string().into_bytes());
        assert_eq!((s.vnis_issued, s.serials_issued), (1, 1));
        let back = decode("/v/", keys.iter().map(|(k, v)| (k.as_str(), &v[..]))).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn a_corrupt_key_is_named_and_liveness_keys_are_not_state() {
        let s = sample();
        let mut keys = encode("/v/", &s).unwrap();
        keys.insert("alive/h2".into(), b"7".to_vec());
        keys.insert("future/thing".into(), b"{}".to_vec());
        let back = decode("/v/", keys.iter().map(|(k, v)| (k.as_str(), &v[..]))).unwrap();
        assert_eq!(back, s);
        let id = s.universes.keys().next().unwrap().clone();
        keys.insert(format!("universes/{id}"), b"{not json".to_vec());
        let err = decode("/v/", keys.iter().map(|(k, v)| (k.as_str(), &v[..]))).unwrap_err();
        assert!(err.to_string().contains(&format!("/v/universes/{id}")), "{err}");
        keys.insert(
            format!("universes/{id}"),
            encode("/v/", &s).unwrap()[&format!("universes/{id}")].clone(),
        );
        keys.insert("revision".into(), b"x".to_vec());
        let err = decode("/v/", keys.iter().map(|(k, v)| (k.as_str(), &v[..]))).unwrap_err();
        assert!(err.to_string().contains("/v/revision"), "{err}");
    }

    #[test]
    fn cache_tracks_liveness_apart_from_the_state() {
        let mut c = Cache::default();
        assert!(!c.put("alive/h1", b"12", "/v/"));
        assert_eq!(c.alive["h1"], (Realized::at(12), true));
        assert!(!c.delete("alive/h1"));
        assert_eq!(
            c.alive["h1"],
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
        };
        assert!(!c.put("alive/h1", encode_report(&failed).as_bytes(), "/v/"));
        assert_eq!(c.alive["h1"], (failed, true), "errors travel with the revision");
        assert!(c.put("revision", b"3", "/v/"));
        assert!(c.delete("revision"));
        assert!(!c.delete("revision"));
    }
}
