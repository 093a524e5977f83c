//! The embedded store (the default): one host, nothing to install.
//!
//! Contract (see the parent module for what every store guarantees): an edit costs what it
//! changes. Each edit appends one line to `<state_dir>/state.log`: the keys it writes, as the
//! etcd store would write them ([`layout`](super::layout)), its revision and its idempotency
//! record; the line is fsynced before the edit is published, so a published edit survives a
//! crash.
//!
//! Group commit: edits take turns to run, each on the state that includes every edit before
//! it (written or still waiting to be), and queue their line; one writer at a time takes every
//! line queued, writes them with one `write` and one fsync, and only then publishes the state
//! and answers those edits. While it writes, the next edits queue behind it: under load one
//! fsync carries many edits, idle it carries one, and no edit waits for a timer. A refused edit
//! queues nothing. An edit that changes nothing but ran on queued edits is answered once they
//! are written. If a write fails, its edits and every edit queued after them (they ran on its
//! state) fail, nothing of them is published, the log is cut back to where the write began,
//! and the next edit runs on the last published state. If the log cannot be cut back, the store
//! takes no more edits ([`Error::Halted`]) until a restart replays the log as it is: writing on
//! would number the next edits like the failed ones left in it.
//!
//! The whole state is written to `<state_dir>/state.json` only now and then (at the first edit,
//! then every [`SNAPSHOT_EVERY`] edits), atomically (temporary file, fsync, rename, fsync of the
//! directory; then its copy `<state_dir>/state.json.last-good` the same way: what to restore if
//! `state.json` is lost or damaged, as versed says when it refuses to start without
//! `state.json` while the copy, or the dataplane of a previous run, is there) and off the edit
//! path: the log is first set aside as `state.log.old` (new edits go to a fresh log), the
//! snapshot of the state at that moment is written in the background, then the old log is
//! removed. Opening reads `state.json` and replays the logs' lines newer than it; a last line
//! cut short (never acknowledged) is ignored and cut off.
//!
//! Hosts live in memory only: the hosts registered through this store (normally the one
//! `versed` that owns it) are always healthy, and their realized revision is the last one
//! reported. Idempotency records live in memory and in the log, for [`IDEMPOTENCY_TTL`]. The
//! snapshot and the log are root's only (mode 0600).
//!
//! The audit trail is `<state_dir>/audit.jsonl` (mode 0600), one JSON record per line, each
//! numbered (`seq`, in the order of the file but for the records added back at open). A record written apart
//! ([`Store::append_audit`](super::Store::append_audit)) is appended and fsynced on its own. The
//! record of an edit ([`Store::edit_audited`](super::Store::edit_audited)) is in the edit's own
//! line of `state.log`, durable with the edit by the same fsync, and then appended to
//! `audit.jsonl` without an fsync of its own: a later fsync of the file (the next record
//! written apart, a rotation, a snapshot before it drops a log) makes it durable there too, and
//! opening appends the records of the logs whose numbers the files lack (those a crash cut off:
//! without an fsync a crash may keep a later record and lose an earlier one), but for those
//! numbered below the oldest the files hold (rotated out, durable before they went). When `audit.jsonl` holds half of the retained records it is fsynced and
//! becomes `audit.jsonl.1` (replacing the one before) and a new file starts, so the two files
//! hold at most `max_records`; records older than `max_age` are never shown.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::net::Ipv4Addr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex as StdMutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::sync::{watch, Mutex};

use super::layout::{self, Op};
use super::{
    apply_edit, audit_matches, AuditRetention, CommitAudit, Error, HostStatus, Idempotency,
    Outcome, Recorded, Result, IDEMPOTENCY_TTL,
};
use crate::audit::{AuditRecord, Query as AuditQuery};
use crate::model::{self, State};
use crate::phases::{self, Phase};

/// File name of the snapshot in the state directory.
pub const STATE_FILE: &str = "state.json";
/// File name of its copy, written after it at every commit.
pub const LAST_GOOD_FILE: &str = "state.json.last-good";
const TEMP_FILE: &str = "state.json.tmp";
const LAST_GOOD_TEMP: &str = "state.json.last-good.tmp";
/// File names of the log of edits since the snapshot, and of the one being folded into it.
pub const LOG_FILE: &str = "state.log";
const OLD_LOG_FILE: &str = "state.log.old";
/// File names of the audit trail in the state directory: the current file, the one before.
pub const AUDIT_FILE: &str = "audit.jsonl";
pub const AUDIT_FILE_OLD: &str = "audit.jsonl.1";
/// Edits between two snapshots.
pub const SNAPSHOT_EVERY: u64 = 1000;

/// One line of the log: one edit.
#[derive(Clone, Serialize, Deserialize)]
struct Entry {
    revision: u64,
    ops: Vec<Op>,
    /// Idempotency records: the edit's own, or, on the first line of a log, every record
    /// still alive (carried over from the log a snapshot folded in).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    records: Vec<LoggedRecord>,
    /// The edit's audit record, numbered as in `audit.jsonl`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    audit: Option<AuditLine>,
}

/// A line of `audit.jsonl` (and the audit record of a line of the log).
#[derive(Clone, Serialize, Deserialize)]
struct AuditLine {
    #[serde(flatten)]
    record: AuditRecord,
    /// Its place in the trail (0: written before records were numbered).
    #[serde(default)]
    seq: u64,
}

/// What opening needs of a line of `audit.jsonl`.
#[derive(Deserialize)]
struct SeqOf {
    #[serde(default)]
    seq: u64,
}

impl Entry {
    /// Whether this line starts a log that continues a snapshot (the line carried over when
    /// the log was set aside: no writes, the snapshot's revision), rather than an edit of a
    /// store that never had one (the first edit: revision 1).
    fn continues_a_snapshot(&self) -> bool {
        self.ops.is_empty() || self.revision > 1
    }
}

#[derive(Clone, Serialize, Deserialize)]
struct LoggedRecord {
    digest: String,
    record: Recorded,
    /// Seconds since the Unix epoch after which it is forgotten.
    expires: u64,
}

/// The embedded store. Use it through [`Store`](super::Store).
pub struct Embedded {
    dir: PathBuf,
    /// Held while an edit runs and queues its line: edits run one at a time, in order.
    turn: Mutex<()>,
    /// The edits run but not yet written.
    queue: StdMutex<Queue>,
    /// The open log; only the writer of a batch uses it.
    log: StdMutex<Log>,
    /// Counts the batches written (or failed): what a retry of a queued key waits for.
    flushed: watch::Sender<u64>,
    /// The published state: every edit in it is durable.
    tx: watch::Sender<Arc<State>>,
    /// Batches written (each one fsync of the log).
    batches: std::sync::atomic::AtomicU64,
    /// Tests: the next write of the log fails.
    #[cfg(test)]
    fail_write: AtomicBool,
    /// Tests: the next cut of the log back after a failed write fails.
    #[cfg(test)]
    fail_cut: AtomicBool,
    /// The hosts registered here, by name; `healthy` is always true.
    hosts: watch::Sender<Arc<Vec<HostStatus>>>,
    /// Idempotency records by digest.
    records: StdMutex<HashMap<String, LoggedRecord>>,
    /// When expired idempotency records were last removed (seconds since the epoch).
    swept: std::sync::atomic::AtomicU64,
    /// A snapshot is being written in the background.
    snapshotting: Arc<AtomicBool>,
    audit: Arc<AuditLog>,
}

/// The audit files. The lock is held for a whole append, so a rotation never interleaves with
/// one; a read opens the files under it and reads them after it.
struct AuditLog {
    dir: PathBuf,
    retention: AuditRetention,
    file: std::sync::Mutex<AuditFile>,
    /// Tests: the next query waits here twice (once ready to parse, then to go on).
    #[cfg(test)]
    query_gate: StdMutex<Option<Arc<std::sync::Barrier>>>,
}

struct AuditFile {
    /// Open for appending; `None` until the first append after opening or a rotation.
    file: Option<File>,
    /// Records in the current file.
    records: usize,
    /// The number of the next record.
    seq: u64,
    /// Records appended without an fsync since the last one.
    unsynced: bool,
}

/// The edits run but not yet written (see the module docs: group commit).
struct Queue {
    /// The state with every edit run so far, written or queued: what the next edit runs on.
    head: Arc<State>,
    /// Edits waiting for the next write.
    waiting: Vec<Queued>,
    /// A writer is at work: it takes `waiting` whole, again and again, until it is empty.
    writing: bool,
    /// Bumped when a write fails: an edit that ran on a state of before cannot queue.
    generation: u64,
    /// The idempotency keys (digests) of the edits queued or being written.
    keys: std::collections::HashSet<String>,
    /// Why the store takes no more edits: a failed write left lines in the log that could not
    /// be cut off. Writing on would reuse their revisions, and a replay would then keep them
    /// and drop the acknowledged edits after them; a restart replays the log as it is.
    halted: Option<String>,
}

/// One edit waiting to be written (or, with no `entry`, answered once the edits before it are).
struct Queued {
    entry: Option<Entry>,
    audit: Option<AuditRecord>,
    logged: Option<LoggedRecord>,
    /// The state with this edit.
    state: Arc<State>,
    /// Told once the edit is durable and published (whether its audit record is in the trail),
    /// or why it failed.
    done: tokio::sync::oneshot::Sender<std::result::Result<bool, String>>,
}

/// The open log and how many edits it holds.
struct Log {
    file: File,
    entries: u64,
    /// Whether `state.json` exists.
    snapshot: bool,
}

fn now_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_secs()
}

impl Embedded {
    pub(super) fn open(dir: &Path, retention: AuditRetention) -> Result<Embedded> {
        std::fs::create_dir_all(dir)
            .map_err(|source| Error::CreateDir { path: dir.to_owned(), source })?;
        let path = dir.join(STATE_FILE);
        let (mut state, snapshot) = match std::fs::read(&path) {
            Ok(bytes) => (
                serde_json::from_slice::<State>(&bytes).map_err(|source| Error::Parse {
                    path: path.clone(),
                    source,
                    copy: dir.join(LAST_GOOD_FILE),
                })?,
                true,
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (State::default(), false),
            Err(source) => return Err(Error::Read { path, source }),
        };
        // A temporary file left by a crash before its rename is a snapshot never completed.
        for temp in [dir.join(TEMP_FILE), dir.join(LAST_GOOD_TEMP)] {
            match std::fs::remove_file(&temp) {
                Ok(()) => tracing::warn!(path = %temp.display(), "removed an unfinished snapshot"),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(Error::Write { path: temp, source }),
            }
        }
        let mut records = HashMap::new();
        let mut audited = Vec::new();
        let mut entries = 0;
        // Without a snapshot the logs must start at the first edit: if they continue a snapshot
        // (their first line carries its revision), that snapshot is lost, and replaying them would make a part of the state
        // look whole. Then the state opens empty (versed refuses to start while the last-good
        // copy is there; restoring it as `state.json` brings the logs back into play).
        let orphaned = !snapshot && first_logged(dir)?.is_some_and(|e| e.continues_a_snapshot());
        if orphaned {
            tracing::warn!(path = %path.display(), "the state file is missing but the log of \
                the edits after it is there: opening an empty state, the log left as it is");
        } else {
            for name in [OLD_LOG_FILE, LOG_FILE] {
                entries = replay(&dir.join(name), &mut state, &mut records, &mut audited)?;
            }
        }
        // A state file written before serials, slots and budgets existed gets them (the same
        // way on every open).
        state.complete_legacy();
        state.clear_changes();
        state.reindex();
        state.take_touched_hosts();
        let log_path = dir.join(LOG_FILE);
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&log_path)
            .map_err(|source| Error::Write { path: log_path, source })?;
        let (audit_records, held) = scan_audit(dir)?;
        let last_seq = held.last().copied().unwrap_or(0);
        let audit = Arc::new(AuditLog {
            dir: dir.to_owned(),
            retention,
            file: std::sync::Mutex::new(AuditFile {
                file: None,
                records: audit_records,
                seq: last_seq + 1,
                unsynced: false,
            }),
            #[cfg(test)]
            query_gate: StdMutex::new(None),
        });
        // The records of edits a crash cut off from the trail (their lines of the log are
        // durable; their lines of `audit.jsonl` were not yet, and the page cache may have kept
        // a later one and lost an earlier one). Those older than the oldest record the files
        // hold were rotated out, durable before they went.
        let oldest = held.first().copied().unwrap_or(0);
        let lost: Vec<AuditLine> =
            audited.into_iter().filter(|a| a.seq > oldest && !held.contains(&a.seq)).collect();
        if !lost.is_empty() {
            tracing::warn!(
                records = lost.len(),
                "adding to the audit trail the records of edits a crash cut off from it"
            );
            let mut f = audit.file.lock().unwrap_or_else(PoisonError::into_inner);
            let recovered = lost.iter().try_for_each(|line| {
                f.seq = f.seq.max(line.seq + 1);
                audit.append_locked(&mut f, line, false)
            });
            if let Err(e) = recovered.and_then(|()| audit.sync_locked(&mut f)) {
                tracing::error!(error = %e, "AUDIT RECORDS LOST: could not add them to the trail");
            }
        }
        let state = Arc::new(state);
        let (tx, _) = watch::channel(state.clone());
        let (hosts, _) = watch::channel(Arc::new(Vec::new()));
        Ok(Embedded {
            dir: dir.to_owned(),
            turn: Mutex::new(()),
            queue: StdMutex::new(Queue {
                head: state,
                waiting: Vec::new(),
                writing: false,
                generation: 0,
                keys: Default::default(),
                halted: None,
            }),
            log: StdMutex::new(Log { file, entries, snapshot }),
            flushed: watch::channel(0).0,
            tx,
            batches: std::sync::atomic::AtomicU64::new(0),
            #[cfg(test)]
            fail_write: AtomicBool::new(false),
            #[cfg(test)]
            fail_cut: AtomicBool::new(false),
            hosts,
            records: StdMutex::new(records),
            swept: std::sync::atomic::AtomicU64::new(0),
            snapshotting: Arc::new(AtomicBool::new(false)),
            audit,
        })
    }
    pub(super) async fn append_audit(&self, record: &AuditRecord) -> Result<()> {
        let audit = self.audit.clone();
        let path = self.audit.dir.join(AUDIT_FILE);
        let record = record.clone();
        tokio::task::spawn_blocking(move || audit.append(record))
            .await
            .map_err(|e| Error::Audit { path, source: std::io::Error::other(e.to_string()) })?
    }

    pub(super) async fn query_audit(&self, query: &AuditQuery) -> Result<Vec<AuditRecord>> {
        let audit = self.audit.clone();
        let query = query.clone();
        let path = self.audit.dir.join(AUDIT_FILE);
        tokio::task::spawn_blocking(move || audit.query(&query))
            .await
            .map_err(|e| Error::Audit { path, source: std::io::Error::other(e.to_string()) })?
    }

    pub(super) fn snapshot(&self) -> Arc<State> {
        self.tx.borrow().clone()
    }

    pub(super) fn subscribe(&self) -> watch::Receiver<Arc<State>> {
        self.tx.subscribe()
    }

    pub(super) fn subscribe_hosts(&self) -> watch::Receiver<Arc<Vec<HostStatus>>> {
        self.hosts.subscribe()
    }

    pub(super) fn register_host(
        &self,
        name: &str,
        underlay_ip: Option<Ipv4Addr>,
        api: Option<String>,
        api_fingerprint: Option<String>,
    ) {
        self.update_host(name, |h| {
            h.underlay_ip = underlay_ip;
            h.api = api;
            h.api_fingerprint = api_fingerprint;
        });
    }

    pub(super) fn report(&self, name: &str, realized: super::Realized) {
        self.update_host(name, |h| {
            h.revision = realized.revision;
            h.errors = realized.errors;
        });
    }

    fn update_host(&self, name: &str, change: impl FnOnce(&mut HostStatus)) {
        self.hosts.send_if_modified(|hosts| {
            let mut by_name: BTreeMap<String, HostStatus> =
                hosts.iter().map(|h| (h.name.clone(), h.clone())).collect();
            let host = by_name.entry(name.to_owned()).or_insert_with(|| HostStatus {
                name: name.to_owned(),
                underlay_ip: None,
                api: None,
                api_fingerprint: None,
                revision: 0,
                healthy: true,
                errors: Vec::new(),
            });
            let before = host.clone();
            change(host);
            if *host == before && hosts.iter().any(|h| h.name == name) {
                return false;
            }
            *hosts = Arc::new(by_name.into_values().collect());
            true
        });
    }

    fn recorded(&self, idem: &Idempotency) -> Result<Option<Recorded>> {
        let mut records = self.records.lock().unwrap_or_else(PoisonError::into_inner);
        let now = now_secs();
        // Expired records go at most once a second (every edit scanned all of them: up to
        // ten minutes of edits); an expired one is never answered meanwhile.
        if self.swept.swap(now, Ordering::Relaxed) != now {
            records.retain(|_, r| r.expires > now);
        }
        match records.get(&idem.digest()).filter(|r| r.expires > now) {
            Some(r) if r.record.fingerprint != idem.fingerprint => {
                Err(Error::KeyReused { key: idem.key.clone() })
            }
            Some(r) => Ok(Some(r.record.clone())),
            None => Ok(None),
        }
    }

    /// [`Store::edit`](super::Store::edit) (`record`: none) and
    /// [`Store::edit_recorded`](super::Store::edit_recorded) of this backend.
    pub(super) async fn run<T, F, R>(
        this: &Arc<Embedded>,
        mut f: F,
        record: Option<(&Idempotency, R)>,
        audit: Option<&dyn CommitAudit<T>>,
    ) -> Result<Outcome<T>>
    where
        F: FnMut(&mut State) -> model::Result<T> + Send,
        R: Fn(&T) -> (u16, Option<serde_json::Value>) + Send,
        T: Send + 'static,
    {
        let queued = std::time::Instant::now();
        let mut turn = this.turn.lock().await;
        if let Some((idem, _)) = &record {
            // A retry of an edit still queued waits until it is written, then is answered
            // from its record.
            let digest = idem.digest();
            loop {
                let mut written = {
                    let q = lock(&this.queue);
                    if !q.keys.contains(&digest) {
                        break;
                    }
                    this.flushed.subscribe()
                };
                drop(turn);
                let _ = written.changed().await;
                turn = this.turn.lock().await;
            }
        }
        phases::since(Phase::EditLock, queued);
        let validating = std::time::Instant::now();
        if let Some((idem, _)) = &record {
            if let Some(rec) = this.recorded(idem)? {
                return Ok(Outcome::Replayed(rec));
            }
        }
        let (current, generation) = {
            let q = lock(&this.queue);
            if let Some(cause) = &q.halted {
                return Err(halted(&this.dir, cause));
            }
            (q.head.clone(), q.generation)
        };
        let (out, next) = apply_edit(&current, &mut f)?;
        let mut queued_edit = Queued {
            entry: None,
            audit: None,
            logged: None,
            state: current.clone(),
            done: tokio::sync::oneshot::channel().0,
        };
        let revision = match next {
            None => {
                if this.tx.borrow().revision == current.revision {
                    // Nothing queued: the state it ran on is the published one.
                    return Ok(Outcome::Applied { out, revision: current.revision });
                }
                current.revision
            }
            Some(mut next) => {
                let revision = next.revision;
                let delta = layout::delta(&current, &next)?;
                let mut audit_record = None;
                let logged = record.as_ref().map(|(idem, respond)| {
                    let (status, body) = respond(&out);
                    audit_record = audit.and_then(|a| a.record(&out, status)).map(|mut r| {
                        r.revision = Some(revision);
                        r
                    });
                    LoggedRecord {
                        digest: idem.digest(),
                        record: Recorded {
                            fingerprint: idem.fingerprint.clone(),
                            status,
                            body,
                            revision,
                        },
                        expires: now_secs() + IDEMPOTENCY_TTL.as_secs(),
                    }
                });
                let records = logged.iter().cloned().collect();
                queued_edit.entry = Some(Entry { revision, ops: delta.ops, records, audit: None });
                queued_edit.audit = audit_record;
                queued_edit.logged = logged;
                next.clear_changes();
                queued_edit.state = Arc::new(next);
                revision
            }
        };
        let (done, answer) = tokio::sync::oneshot::channel();
        queued_edit.done = done;
        let start_writer = {
            let mut q = lock(&this.queue);
            if let Some(cause) = &q.halted {
                return Err(halted(&this.dir, cause));
            }
            if q.generation != generation {
                return Err(write_failed(&this.dir, "an edit it ran after could not be written"));
            }
            q.head = queued_edit.state.clone();
            if let Some(r) = &queued_edit.logged {
                q.keys.insert(r.digest.clone());
            }
            q.waiting.push(queued_edit);
            !std::mem::replace(&mut q.writing, true)
        };
        drop(turn);
        phases::since(Phase::Validate, validating);
        let committing = std::time::Instant::now();
        if start_writer {
            // A task of its own: the batch is written and published even if this edit's
            // future is dropped, so a logged edit is always published.
            let store = this.clone();
            tokio::task::spawn_blocking(move || store.write_batches());
        }
        let audited = match answer.await {
            Ok(Ok(audited)) => audited,
            Ok(Err(why)) => {
                return Err(match &lock(&this.queue).halted {
                    Some(cause) => halted(&this.dir, cause),
                    None => write_failed(&this.dir, &why),
                })
            }
            Err(_) => return Err(write_failed(&this.dir, "the writer of the log is gone")),
        };
        if audited {
            audit.inspect(|a| a.written());
        }
        phases::since(Phase::Commit, committing);
        Ok(Outcome::Applied { out, revision })
    }

    /// The writer: takes every queued edit, writes their lines with one fsync, publishes the
    /// state with them and answers them; again until nothing is queued.
    fn write_batches(self: Arc<Self>) {
        loop {
            let batch = {
                let mut q = lock(&self.queue);
                if q.waiting.is_empty() {
                    q.writing = false;
                    return;
                }
                std::mem::take(&mut q.waiting)
            };
            let mut log = lock(&self.log);
            let path = self.dir.join(LOG_FILE);
            let records: Vec<Option<AuditRecord>> = batch.iter().map(|q| q.audit.clone()).collect();
            let start = log.file.metadata().map(|m| m.len());
            let written = self.audit.commit(records, |lines| {
                let mut bytes = Vec::new();
                for (queued, line) in batch.iter().zip(lines) {
                    let Some(entry) = &queued.entry else { continue };
                    let entry = Entry { audit: line, ..entry.clone() };
                    serde_json::to_writer(&mut bytes, &entry).map_err(std::io::Error::other)?;
                    bytes.push(b'\n');
                }
                if bytes.is_empty() {
                    return Ok(());
                }
                #[cfg(test)]
                if self.fail_write.swap(false, Ordering::SeqCst) {
                    log.file.write_all(&bytes[..bytes.len() / 2])?;
                    return Err(std::io::Error::other("injected by the test"));
                }
                self.batches.fetch_add(1, Ordering::Relaxed);
                log.file.write_all(&bytes).and_then(|()| log.file.sync_data())
            });
            let audited = match written {
                Ok(audited) => audited,
                Err(e) => {
                    // Nothing of this batch, nor of what ran on it, happened: cut the log back
                    // (a partial line would spoil the next) durably, run the next edit on the
                    // published state. If the log cannot be cut back, its lines stay: the store
                    // stops taking edits (see `Queue::halted`).
                    let cut = start
                        .map_err(|e| format!("its length could not be read: {e}"))
                        .and_then(|len| {
                            #[cfg(test)]
                            if self.fail_cut.swap(false, Ordering::SeqCst) {
                                return Err("injected by the test".to_owned());
                            }
                            log.file
                                .set_len(len)
                                .and_then(|()| log.file.sync_all())
                                .map_err(|e| format!("cutting it back failed: {e}"))
                        });
                    drop(log);
                    let why = e.to_string();
                    let mut q = lock(&self.queue);
                    if let Err(cut) = cut {
                        let cause = format!("the write failed: {why}; {cut}");
                        tracing::error!(path = %path.display(), cause = %cause, "the store takes no more edits until versed restarts: a failed write could not be cut off the log");
                        q.halted = Some(cause);
                    }
                    q.generation += 1;
                    q.head = self.tx.borrow().clone();
                    let mut failed = batch;
                    failed.append(&mut q.waiting);
                    for f in &failed {
                        if let Some(r) = &f.logged {
                            q.keys.remove(&r.digest);
                        }
                    }
                    drop(q);
                    for f in failed {
                        let _ = f.done.send(Err(why.clone()));
                    }
                    self.flushed.send_modify(|n| *n += 1);
                    continue;
                }
            };
            log.entries += batch.iter().filter(|q| q.entry.is_some()).count() as u64;
            let last = batch.last().map(|q| q.state.clone());
            {
                let mut records = lock(&self.records);
                let mut q = lock(&self.queue);
                for r in batch.iter().filter_map(|q| q.logged.as_ref()) {
                    records.insert(r.digest.clone(), r.clone());
                    q.keys.remove(&r.digest);
                }
            }
            if let Some(last) = last {
                if last.revision > self.tx.borrow().revision {
                    self.tx.send_replace(last.clone());
                }
                if !log.snapshot || log.entries >= SNAPSHOT_EVERY {
                    self.start_snapshot(&mut log, last);
                }
            }
            drop(log);
            for (queued, audited) in batch.into_iter().zip(audited) {
                let _ = queued.done.send(Ok(audited));
            }
            self.flushed.send_modify(|n| *n += 1);
        }
    }

    /// Sets the log aside and writes a snapshot of `state` (which includes every edit of the
    /// set-aside log) in the background; then drops the set-aside log. The first snapshot is
    /// written at once, so that `state.json` exists from the first edit on.
    fn start_snapshot(self: &Arc<Self>, log: &mut Log, state: Arc<State>) {
        if self.snapshotting.swap(true, Ordering::SeqCst) {
            return;
        }
        // The new log starts with the idempotency records still alive: the old one goes.
        let now = now_secs();
        let alive: Vec<LoggedRecord> = self
            .records
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .filter(|r| r.expires > now)
            .cloned()
            .collect();
        let carried =
            Entry { revision: state.revision, ops: Vec::new(), records: alive, audit: None };
        let rotated = (|| {
            let mut first = serde_json::to_vec(&carried).map_err(std::io::Error::other)?;
            first.push(b'\n');
            std::fs::rename(self.dir.join(LOG_FILE), self.dir.join(OLD_LOG_FILE))?;
            let mut file = OpenOptions::new()
                .create(true)
                .append(true)
                .mode(0o600)
                .open(self.dir.join(LOG_FILE))?;
            file.write_all(&first)?;
            file.sync_data()?;
            File::open(&self.dir)?.sync_all()?;
            Ok::<_, std::io::Error>(file)
        })();
        match rotated {
            Ok(file) => {
                log.file = file;
                log.entries = 0;
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not set the log aside for a snapshot; trying later");
                self.snapshotting.store(false, Ordering::SeqCst);
                return;
            }
        }
        let first = !log.snapshot;
        log.snapshot = true;
        let store = self.clone();
        let write = move || {
            // The set-aside log goes: the audit records of its edits must be durable in the
            // trail first.
            let result =
                store.write_snapshot(&state).and_then(|()| store.audit.sync()).and_then(|()| {
                    std::fs::remove_file(store.dir.join(OLD_LOG_FILE)).map_err(|source| {
                        Error::Write { path: store.dir.join(OLD_LOG_FILE), source }
                    })
                });
            if let Err(e) = result {
                tracing::warn!(error = %e, "writing a snapshot of the state failed; the log keeps every edit");
            }
            store.snapshotting.store(false, Ordering::SeqCst);
        };
        if first {
            write();
        } else {
            std::thread::spawn(write);
        }
    }

    /// Replaces the snapshot, then its last-good copy, each atomically: write a temporary file,
    /// fsync it, rename it over the old one; then fsync the directory so that the renames are
    /// durable.
    fn write_snapshot(&self, state: &State) -> Result<()> {
        let path = self.dir.join(STATE_FILE);
        let temp = self.dir.join(TEMP_FILE);
        let werr = |path: &Path| {
            let path = path.to_owned();
            move |source| Error::Write { path, source }
        };
        let bytes = serde_json::to_vec(state).map_err(|e| Error::Write {
            path: path.clone(),
            source: std::io::Error::other(format!("serializing the state: {e}")),
        })?;
        for (temp, target) in
            [(temp, path), (self.dir.join(LAST_GOOD_TEMP), self.dir.join(LAST_GOOD_FILE))]
        {
            let mut file = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&temp)
                .map_err(werr(&temp))?;
            file.write_all(&bytes).map_err(werr(&temp))?;
            file.sync_all().map_err(werr(&temp))?;
            drop(file);
            std::fs::rename(&temp, &target).map_err(werr(&target))?;
        }
        File::open(&self.dir).and_then(|d| d.sync_all()).map_err(werr(&self.dir))?;
        Ok(())
    }
}

impl AuditLog {
    fn per_file(&self) -> usize {
        (self.retention.max_records / 2).max(1)
    }

    /// Appends a record written apart, durably.
    fn append(&self, record: AuditRecord) -> Result<()> {
        let mut f = self.file.lock().unwrap_or_else(PoisonError::into_inner);
        let line = AuditLine { record, seq: f.seq };
        self.append_locked(&mut f, &line, true)?;
        f.seq += 1;
        Ok(())
    }

    /// Runs `write_log`, the durable write of a batch of edits' lines of the state log, given
    /// each edit's audit record numbered (if it has one); then appends the records to the
    /// trail without an fsync (the log holds them durably). The lock is held throughout, so the
    /// trail's order is its numbers' order. Returns, per edit, whether its record is in the
    /// trail (if it could not be appended, the caller writes it apart, and counts the
    /// failure); fails only if `write_log` does.
    fn commit(
        &self,
        records: Vec<Option<AuditRecord>>,
        write_log: impl FnOnce(Vec<Option<AuditLine>>) -> std::io::Result<()>,
    ) -> std::io::Result<Vec<bool>> {
        if records.iter().all(Option::is_none) {
            write_log(vec![None; records.len()])?;
            return Ok(vec![false; records.len()]);
        }
        let mut f = self.file.lock().unwrap_or_else(PoisonError::into_inner);
        let lines: Vec<Option<AuditLine>> = records
            .into_iter()
            .map(|r| {
                r.map(|record| {
                    f.seq += 1;
                    AuditLine { record, seq: f.seq - 1 }
                })
            })
            .collect();
        write_log(lines.clone())?;
        Ok(lines
            .iter()
            .map(|line| {
                let Some(line) = line else { return false };
                match self.append_locked(&mut f, line, false) {
                    Ok(()) => true,
                    Err(e) => {
                        tracing::warn!(error = %e, "could not append an edit's audit record to the trail");
                        false
                    }
                }
            })
            .collect())
    }

    /// Makes what was appended without an fsync durable.
    fn sync(&self) -> Result<()> {
        let mut f = self.file.lock().unwrap_or_else(PoisonError::into_inner);
        self.sync_locked(&mut f)
    }

    fn sync_locked(&self, f: &mut AuditFile) -> Result<()> {
        if let (true, Some(file)) = (f.unsynced, f.file.as_ref()) {
            file.sync_data()
                .map_err(|source| Error::Audit { path: self.dir.join(AUDIT_FILE), source })?;
        }
        f.unsynced = false;
        Ok(())
    }

    fn append_locked(&self, f: &mut AuditFile, line: &AuditLine, sync: bool) -> Result<()> {
        let path = self.dir.join(AUDIT_FILE);
        let err = |source| Error::Audit { path: path.clone(), source };
        let mut bytes = serde_json::to_vec(line)
            .map_err(|e| err(std::io::Error::other(format!("serializing the record: {e}"))))?;
        bytes.push(b'\n');
        if f.file.is_none() {
            let file = std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .mode(0o600)
                .open(&path)
                .map_err(err)?;
            f.file = Some(file);
        }
        let file = f.file.as_mut().expect("opened just above");
        // One write of a whole line on an O_APPEND file: a crash leaves whole lines, or a
        // last partial line that reading skips.
        file.write_all(&bytes).map_err(err)?;
        if sync {
            // Also makes the records appended before it durable.
            file.sync_data().map_err(err)?;
            f.unsynced = false;
        } else {
            f.unsynced = true;
        }
        f.records += 1;
        if f.records >= self.per_file() {
            self.sync_locked(f)?;
            f.file = None;
            f.records = 0;
            let old = self.dir.join(AUDIT_FILE_OLD);
            std::fs::rename(&path, &old)
                .and_then(|()| File::open(&self.dir)?.sync_all())
                .map_err(err)?;
        }
        Ok(())
    }

    fn query(&self, q: &AuditQuery) -> Result<Vec<AuditRecord>> {
        // The files are opened and their lengths taken under the lock (so that no rotation
        // falls in between), and read after it: a large query holds up no edit's commit, and
        // sees the trail as it was when it began.
        let files = {
            let _f = self.file.lock().unwrap_or_else(PoisonError::into_inner);
            let mut files = Vec::new();
            for name in [AUDIT_FILE_OLD, AUDIT_FILE] {
                let path = self.dir.join(name);
                let file = match File::open(&path) {
                    Ok(f) => f,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(source) => return Err(Error::Audit { path, source }),
                };
                match file.metadata() {
                    Ok(m) => files.push((path, file, m.len())),
                    Err(source) => return Err(Error::Audit { path, source }),
                }
            }
            files
        };
        #[cfg(test)]
        if let Some(gate) = lock(&self.query_gate).take() {
            gate.wait();
            gate.wait();
        }
        let oldest =
            SystemTime::now().checked_sub(self.retention.max_age).unwrap_or(SystemTime::UNIX_EPOCH);
        let mut out = VecDeque::new();
        for (path, file, len) in files {
            for line in BufReader::new(std::io::Read::take(file, len)).split(b'\n') {
                let line = line.map_err(|source| Error::Audit { path: path.clone(), source })?;
                if line.is_empty() {
                    continue;
                }
                let Ok(rec) = serde_json::from_slice::<AuditRecord>(&line) else {
                    tracing::warn!(path = %path.display(), "skipping an audit line that does not parse");
                    continue;
                };
                if audit_matches(&rec, q, oldest) {
                    out.push_back(rec);
                    if out.len() > q.limit {
                        out.pop_front();
                    }
                }
            }
        }
        Ok(out.into())
    }
}

/// Applies the lines of the log at `path` newer than `state` to it; returns how many lines it
/// holds. A last line without its newline was never acknowledged: it is ignored.
/// The first line of the logs (the set-aside one first), if any.
fn first_logged(dir: &Path) -> Result<Option<Entry>> {
    for name in [OLD_LOG_FILE, LOG_FILE] {
        let path = dir.join(name);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => return Err(Error::Read { path, source }),
        };
        for line in BufReader::new(file).split(b'\n') {
            let line = line.map_err(|source| Error::Read { path: path.clone(), source })?;
            if let Ok(entry) = serde_json::from_slice::<Entry>(&line) {
                return Ok(Some(entry));
            }
        }
    }
    Ok(None)
}

fn replay(
    path: &Path,
    state: &mut State,
    records: &mut HashMap<String, LoggedRecord>,
    audited: &mut Vec<AuditLine>,
) -> Result<u64> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(source) => return Err(Error::Read { path: path.to_owned(), source }),
    };
    let len =
        file.metadata().map_err(|source| Error::Read { path: path.to_owned(), source })?.len();
    let now = now_secs();
    let mut lines = 0;
    let mut end = 0;
    for line in BufReader::new(file).split(b'\n') {
        let line = line.map_err(|source| Error::Read { path: path.to_owned(), source })?;
        let start = end;
        end += line.len() as u64 + 1;
        if end > len {
            // A last line without its newline (a crash, or a failed write that could not be
            // cut back, left it short) was never acknowledged. It is cut off, so that the next
            // edit's line starts a line of its own.
            tracing::warn!(path = %path.display(), "cutting off a log line cut short (an edit never acknowledged)");
            let cut = OpenOptions::new()
                .write(true)
                .open(path)
                .and_then(|f| f.set_len(start).and_then(|()| f.sync_all()));
            cut.map_err(|source| Error::Write { path: path.to_owned(), source })?;
            break;
        }
        if line.is_empty() {
            continue;
        }
        let entry: Entry = match serde_json::from_slice(&line) {
            Ok(e) => e,
            Err(e) if e.is_eof() => {
                tracing::warn!(path = %path.display(), "ignoring a log line cut short (an edit never acknowledged)");
                continue;
            }
            Err(source) => {
                return Err(Error::Parse {
                    path: path.to_owned(),
                    source,
                    copy: path.with_file_name(LAST_GOOD_FILE),
                })
            }
        };
        lines += 1;
        audited.extend(entry.audit);
        for r in entry.records.into_iter().filter(|r| r.expires > now) {
            records.insert(r.digest.clone(), r);
        }
        if entry.revision <= state.revision {
            continue;
        }
        apply_ops(state, &entry.ops)?;
        state.revision = entry.revision;
    }
    Ok(lines)
}

/// How many records `audit.jsonl` holds, and the numbers of the records in either file of the
/// trail (but 0: records written before records were numbered). A last line cut short by a
/// crash is cut off, so that the next record starts a line of its own.
fn scan_audit(dir: &Path) -> Result<(usize, std::collections::BTreeSet<u64>)> {
    let mut count = 0;
    let mut held = std::collections::BTreeSet::new();
    for name in [AUDIT_FILE_OLD, AUDIT_FILE] {
        let path = dir.join(name);
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(source) => return Err(Error::Audit { path, source }),
        };
        let whole = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        for line in bytes[..whole].split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            if let Ok(SeqOf { seq: seq @ 1.. }) = serde_json::from_slice(line) {
                held.insert(seq);
            }
            if name == AUDIT_FILE {
                count += 1;
            }
        }
        if whole < bytes.len() {
            let cut = OpenOptions::new()
                .write(true)
                .open(&path)
                .and_then(|f| f.set_len(whole as u64).and_then(|()| f.sync_all()));
            cut.map_err(|source| Error::Audit { path, source })?;
        }
    }
    Ok((count, held))
}

/// Applies the writes of one edit to `state`.
fn apply_ops(state: &mut State, ops: &[Op]) -> Result<()> {
    let mut keys: Vec<(String, Option<String>)> = Vec::new();
    for op in ops {
        match op {
            Op::Put { key, value } => keys.push((key.clone(), Some(value.clone()))),
            Op::Delete { key } => keys.push((key.clone(), None)),
            Op::DeletePrefix { prefix } => {
                keys.extend(layout::keys_under(state, prefix).into_iter().map(|k| (k, None)))
            }
        }
    }
    let events: Vec<layout::Event> = keys
        .iter()
        .filter(|(k, _)| layout::is_state(k))
        .map(|(k, v)| layout::Event { key: k, value: v.as_deref().map(str::as_bytes) })
        .collect();
    layout::apply(state, &events)?;
    Ok(())
}

fn lock<T>(m: &StdMutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn halted(dir: &Path, cause: &str) -> Error {
    Error::Halted { path: dir.join(LOG_FILE), cause: cause.to_owned() }
}

fn write_failed(dir: &Path, why: &str) -> Error {
    Error::Write { path: dir.join(LOG_FILE), source: std::io::Error::other(why.to_owned()) }
}

/// How long after the last write the tests wait for a background snapshot.
#[cfg(test)]
const SNAPSHOT_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Store;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("verse-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    fn add_universe(s: &mut State, id: &str) {
        s.universes.insert(
            id.into(),
            model::Universe {
                id: id.into(),
                name: id.into(),
                cidrs: vec!["10.0.0.0/16".parse().unwrap()],
                vni: 1,
                ipv6_cidrs: Vec::new(),
            },
        );
        s.revision += 1;
    }

    #[tokio::test]
    async fn edits_persist_across_reopen_and_bump_the_revision() {
        let dir = temp_dir("reopen");
        let store = Store::open_embedded(&dir).unwrap();
        let mut rx = store.subscribe();
        let ((), rev) = store
            .edit(|s| {
                add_universe(s, "uni-00000001");
                Ok(())
            })
            .await
            .unwrap();
        assert_eq!(rev, 1);
        assert!(rx.has_changed().unwrap());
        assert_eq!(rx.borrow_and_update().revision, 1);
        assert!(dir.join(STATE_FILE).exists(), "the first edit writes a snapshot");
        // An edit that forgets to bump the revision still gets a new one (S13).
        let ((), rev) = store
            .edit(|s| {
                s.universes.get_mut("uni-00000001").unwrap().name = "renamed".into();
                Ok(())
            })
            .await
            .unwrap();
        assert_eq!(rev, 2);
        drop(store);
        let store = Store::open_embedded(&dir).unwrap();
        let snap = store.snapshot();
        assert_eq!(snap.revision, 2);
        assert_eq!(snap.universes["uni-00000001"].name, "renamed");
        assert!(!dir.join(TEMP_FILE).exists());
        // The last-good copy is the same document.
        assert_eq!(
            std::fs::read(dir.join(LAST_GOOD_FILE)).unwrap(),
            std::fs::read(dir.join(STATE_FILE)).unwrap()
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The log holds what each edit changed, not the state: its lines stay small however large
    /// the state grows; snapshots fold it in, and a reopen replays what is newer than them.
    #[tokio::test]
    async fn each_edit_appends_what_it_changed_and_snapshots_fold_the_log() {
        let dir = temp_dir("log");
        let store = Store::open_embedded(&dir).unwrap();
        let (u, _) = store
            .edit(|s| {
                s.create_universe(model::CreateUniverse {
                    name: "u".into(),
                    cidr: Some("10.0.0.0/16".into()),
                    cidrs: None,
                    ipv6_cidrs: None,
                })
            })
            .await
            .unwrap();
        let mut groups = Vec::new();
        for name in ["g1", "g2"] {
            let (g, _) = store
                .edit(|s| {
                    s.create_group(model::CreateGroup {
                        universe: u.id.clone(),
                        name: name.into(),
                        description: None,
                    })
                })
                .await
                .unwrap();
            groups.push(g.id);
        }
        let mut sizes = Vec::new();
        for i in 0..(SNAPSHOT_EVERY + 10) {
            let before = std::fs::metadata(dir.join(LOG_FILE)).map_or(0, |m| m.len());
            let port = i64::try_from(i % 60000).unwrap() + 1;
            let g = groups[usize::try_from(i % 2).unwrap()].clone();
            store
                .edit(move |s| {
                    s.add_rule(
                        &g,
                        model::CreateRule {
                            direction: "ingress".into(),
                            protocol: serde_json::json!("tcp"),
                            from_port: Some(port),
                            to_port: Some(port),
                            cidr: Some(format!("10.{}.0.0/16", i / 1000)),
                            ..Default::default()
                        },
                    )
                })
                .await
                .unwrap();
            let after = std::fs::metadata(dir.join(LOG_FILE)).map_or(0, |m| m.len());
            if after > before {
                sizes.push(after - before);
            }
        }
        let largest = sizes.iter().max().copied().unwrap_or(0);
        assert!(largest < 1024, "a rule's line stays small: {largest} bytes");
        let deadline = std::time::Instant::now() + SNAPSHOT_WAIT;
        while dir.join(OLD_LOG_FILE).exists() {
            assert!(std::time::Instant::now() < deadline, "the background snapshot never ended");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let snapshot: State =
            serde_json::from_slice(&std::fs::read(dir.join(STATE_FILE)).unwrap()).unwrap();
        let live = store.snapshot();
        assert!(
            snapshot.revision > 2 && snapshot.revision < live.revision,
            "{}",
            snapshot.revision
        );
        drop(store);
        let reopened = Store::open_embedded(&dir).unwrap().snapshot();
        assert_eq!(*reopened, *live, "snapshot plus log replay give the state back");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn a_line_cut_short_by_a_crash_is_ignored() {
        let dir = temp_dir("torn");
        let store = Store::open_embedded(&dir).unwrap();
        store
            .edit(|s| {
                add_universe(s, "uni-00000001");
                Ok(())
            })
            .await
            .unwrap();
        store
            .edit(|s| {
                add_universe(s, "uni-00000002");
                Ok(())
            })
            .await
            .unwrap();
        drop(store);
        let mut log = OpenOptions::new().append(true).open(dir.join(LOG_FILE)).unwrap();
        log.write_all(b"{\"revision\":3,\"ops\":[{\"put\":{\"key\":\"univ").unwrap();
        drop(log);
        let store = Store::open_embedded(&dir).unwrap();
        assert_eq!(store.snapshot().revision, 2);
        assert_eq!(store.snapshot().universes.len(), 2);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn a_recorded_edit_is_answered_again_not_applied_again() {
        let dir = temp_dir("idem");
        let store = Store::open_embedded(&dir).unwrap();
        let idem =
            Idempotency { key: "k1".into(), fingerprint: "POST /x".into(), from_client: true };
        let respond = |u: &model::Universe| (201, Some(serde_json::json!({"id": u.id})));
        let create = |name: &'static str| {
            move |s: &mut State| {
                s.create_universe(model::CreateUniverse {
                    name: name.into(),
                    cidr: Some("10.0.0.0/16".into()),
                    cidrs: None,
                    ipv6_cidrs: None,
                })
            }
        };
        let first = store.edit_recorded(&idem, create("a"), respond).await.unwrap();
        let Outcome::Applied { out, revision } = first else { panic!("applied the first time") };
        let again = store.edit_recorded(&idem, create("a"), respond).await.unwrap();
        let Outcome::Replayed(rec) = again else { panic!("replayed the second time") };
        assert_eq!((rec.status, rec.revision), (201, revision));
        assert_eq!(rec.body, Some(serde_json::json!({"id": out.id})));
        assert_eq!(store.snapshot().universes.len(), 1, "applied once");
        let other = Idempotency { fingerprint: "POST /y".into(), ..idem.clone() };
        let err = store.edit_recorded(&other, create("b"), respond).await.unwrap_err();
        assert!(matches!(err, Error::KeyReused { .. }), "{err}");
        // Across a restart too.
        drop(store);
        let store = Store::open_embedded(&dir).unwrap();
        let again = store.edit_recorded(&idem, create("a"), respond).await.unwrap();
        assert!(matches!(again, Outcome::Replayed(_)));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn refused_edit_changes_nothing() {
        let dir = temp_dir("refused");
        let store = Store::open_embedded(&dir).unwrap();
        let rx = store.subscribe();
        let err = store
            .edit(|s| -> model::Result<()> {
                add_universe(s, "uni-00000001");
                Err(model::Error::invalid("name", "bad"))
            })
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Rejected(ref e) if e.field.as_deref() == Some("name")));
        assert_eq!(store.snapshot().revision, 0);
        assert!(store.snapshot().universes.is_empty());
        assert!(!rx.has_changed().unwrap());
        assert!(!dir.join(STATE_FILE).exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn no_op_edit_keeps_the_revision() {
        let dir = temp_dir("noop");
        let store = Store::open_embedded(&dir).unwrap();
        let (n, rev) = store.edit(|s| Ok(s.universes.len())).await.unwrap();
        assert_eq!((n, rev), (0, 0));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn concurrent_edits_are_serialized() {
        let dir = temp_dir("concurrent");
        let store = Store::open_embedded(&dir).unwrap();
        let mut tasks = Vec::new();
        for i in 0..20 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                let edit = move |s: &mut State| {
                    add_universe(s, &format!("uni-{i:08x}"));
                    Ok(())
                };
                store.edit(edit).await.unwrap().1
            }));
        }
        let mut revs = Vec::new();
        for t in tasks {
            revs.push(t.await.unwrap());
        }
        revs.sort();
        assert_eq!(revs, (1..=20).collect::<Vec<_>>());
        assert_eq!(store.snapshot().universes.len(), 20);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn registered_hosts_are_healthy_with_their_last_reported_revision() {
        let dir = temp_dir("hosts");
        let store = Store::open_embedded(&dir).unwrap();
        let mut rx = store.subscribe_hosts().await.unwrap();
        assert!(store.hosts().await.unwrap().is_empty());
        let ip = Some(Ipv4Addr::new(198, 18, 0, 1));
        store.register_host("h1", ip).await.unwrap();
        assert!(rx.has_changed().unwrap());
        rx.mark_unchanged();
        store.report_realized("h1", 4);
        store.report_realized("h1", 4);
        assert_eq!(
            *rx.borrow_and_update().as_ref(),
            [HostStatus {
                name: "h1".into(),
                underlay_ip: ip,
                api: None,
                api_fingerprint: None,
                revision: 4,
                healthy: true,
                errors: vec![]
            }]
        );
        store.register_host("h1", ip).await.unwrap();
        assert!(!rx.has_changed().unwrap(), "nothing changed, nothing published");
        // Hosts live in memory: the desired state (and its revision) is untouched.
        assert_eq!(store.snapshot().revision, 0);
        assert!(store.register_host("a/b", None).await.is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn record(n: u64, universe: Option<&str>) -> AuditRecord {
        AuditRecord {
            time: model::Timestamp(SystemTime::now()),
            host: "h1".into(),
            principal: "tok-00000001".into(),
            source: "127.0.0.1:1".into(),
            action: "POST /v1/universes".into(),
            universe: universe.map(str::to_owned),
            objects: vec![],
            status: 201,
            revision: Some(n),
            detail: None,
        }
    }

    #[tokio::test]
    async fn audit_trail_is_appended_rotated_within_its_retention_and_filtered() {
        use std::os::unix::fs::PermissionsExt;
        let dir = temp_dir("audit");
        let retention =
            AuditRetention { max_records: 10, max_age: std::time::Duration::from_secs(3600) };
        let store = Store::open_embedded_with(&dir, retention).unwrap();
        for n in 1..=23 {
            let u = if n % 2 == 0 { Some("uni-a") } else { None };
            store.append_audit(&record(n, u)).await.unwrap();
        }
        let mode = std::fs::metadata(dir.join(AUDIT_FILE)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let all = AuditQuery { since: None, universe: None, limit: 100 };
        let kept: Vec<u64> =
            store.query_audit(&all).await.unwrap().iter().filter_map(|r| r.revision).collect();
        // Two files of 5: the newest 10 at most, at least 5; here 20 went out in 4 rotations.
        assert_eq!(kept, (16..=23).collect::<Vec<_>>());
        let q = AuditQuery { since: None, universe: Some("uni-a".into()), limit: 2 };
        let a: Vec<u64> =
            store.query_audit(&q).await.unwrap().iter().filter_map(|r| r.revision).collect();
        assert_eq!(a, [20, 22]);
        let future = SystemTime::now() + std::time::Duration::from_secs(60);
        let q = AuditQuery { since: Some(future), universe: None, limit: 100 };
        assert!(store.query_audit(&q).await.unwrap().is_empty());
        // Reopened, the count of the current file carries on; a torn last line is skipped.
        drop(store);
        std::fs::OpenOptions::new()
            .append(true)
            .open(dir.join(AUDIT_FILE))
            .unwrap()
            .write_all(b"{\"time\": \"20")
            .unwrap();
        let store = Store::open_embedded_with(&dir, retention).unwrap();
        let kept = store.query_audit(&all).await.unwrap();
        assert_eq!(kept.len(), 8);
        // Records older than the retention age are not shown.
        let mut old = record(99, None);
        old.time = model::Timestamp(SystemTime::now() - std::time::Duration::from_secs(7200));
        store.append_audit(&old).await.unwrap();
        assert!(store.query_audit(&all).await.unwrap().iter().all(|r| r.revision != Some(99)));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A query of the trail reads the files without the lock: records (and edits' commits,
    /// which append theirs under it) go on while it parses.
    #[test]
    fn a_query_of_the_trail_holds_up_no_append_while_it_parses() {
        let dir = temp_dir("audit-query");
        let store = Store::open_embedded(&dir).unwrap();
        let audit = embedded(&store).audit.clone();
        audit.append(record(1, None)).unwrap();
        let gate = Arc::new(std::sync::Barrier::new(2));
        *lock(&audit.query_gate) = Some(gate.clone());
        let querying = {
            let audit = audit.clone();
            std::thread::spawn(move || {
                let all = AuditQuery { since: None, universe: None, limit: 100 };
                audit.query(&all).unwrap()
            })
        };
        gate.wait();
        let (tx, rx) = std::sync::mpsc::channel();
        let appending = {
            let audit = audit.clone();
            std::thread::spawn(move || {
                audit.append(record(2, None)).unwrap();
                let _ = tx.send(());
            })
        };
        let appended = rx.recv_timeout(std::time::Duration::from_secs(5)).is_ok();
        gate.wait();
        let seen = querying.join().unwrap();
        appending.join().unwrap();
        assert!(appended, "the append waited for the query's parse");
        // The query sees the trail as it was when it began.
        assert_eq!(seen.iter().map(|r| r.revision).collect::<Vec<_>>(), [Some(1)]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A test's [`CommitAudit`]: a record of host "h1", counting the times it was written.
    #[derive(Default)]
    struct Counted(std::sync::atomic::AtomicU32);

    impl<T> CommitAudit<T> for Counted {
        fn record(&self, _: &T, status: u16) -> Option<AuditRecord> {
            Some(AuditRecord { status, revision: None, ..record(0, None) })
        }
        fn written(&self) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn key(k: &str) -> Idempotency {
        Idempotency { key: k.into(), fingerprint: format!("POST {k}"), from_client: true }
    }

    fn universe(name: &str) -> model::CreateUniverse {
        model::CreateUniverse {
            name: name.into(),
            cidr: Some("10.0.0.0/16".into()),
            cidrs: None,
            ipv6_cidrs: None,
        }
    }

    async fn audited_universe(store: &Store, k: &str, name: &str, audit: &Counted) -> Result<u64> {
        let respond = |_: &model::Universe| (201, None);
        let create = |s: &mut State| s.create_universe(universe(name));
        match store.edit_audited(&key(k), create, respond, audit).await? {
            Outcome::Applied { revision, .. } => Ok(revision),
            Outcome::Replayed(r) => Ok(r.revision),
        }
    }

    async fn trail_revisions(dir: &Path) -> Vec<u64> {
        let all = AuditQuery { since: None, universe: None, limit: 1000 };
        let store = Store::open_embedded(dir).unwrap();
        let got = store.query_audit(&all).await.unwrap();
        got.iter().filter_map(|r| r.revision).collect()
    }

    /// An edit's audit record is in its own line of the log (one fsync) and in the trail, with
    /// the edit's revision; a refused edit and a replay write none.
    #[tokio::test]
    async fn an_edits_audit_record_is_written_with_it_and_only_if_it_happened() {
        let dir = temp_dir("audit-commit");
        let store = Store::open_embedded(&dir).unwrap();
        // The first edit writes the first snapshot, which folds the log in.
        store.edit(|s| s.create_universe(universe("first"))).await.unwrap();
        let audit = Counted::default();
        let rev = audited_universe(&store, "k1", "a", &audit).await.unwrap();
        assert_eq!(audit.0.load(Ordering::SeqCst), 1);
        let line = std::fs::read_to_string(dir.join(LOG_FILE)).unwrap();
        let last: Entry = serde_json::from_str(line.lines().last().unwrap()).unwrap();
        let logged = last.audit.expect("the record is in the edit's line");
        assert_eq!((logged.record.revision, logged.record.status), (Some(rev), 201));
        // Refused (the name is taken): no record; replayed (same key): no record either.
        assert!(audited_universe(&store, "k2", "a", &audit).await.is_err());
        assert_eq!(audited_universe(&store, "k1", "a", &audit).await.unwrap(), rev);
        assert_eq!(audit.0.load(Ordering::SeqCst), 1);
        let all = AuditQuery { since: None, universe: None, limit: 100 };
        let trail = store.query_audit(&all).await.unwrap();
        assert_eq!(trail.len(), 1);
        assert_eq!((trail[0].revision, trail[0].status), (Some(rev), 201));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The records of edits whose line of the trail a crash cut off (not yet fsynced there; the
    /// log holds them) are added when the store opens, once, in order; records the trail holds
    /// are not added again.
    #[tokio::test]
    async fn audit_records_a_crash_cut_off_the_trail_are_added_back_on_open() {
        let dir = temp_dir("audit-crash");
        let store = Store::open_embedded(&dir).unwrap();
        let audit = Counted::default();
        let mut revs = Vec::new();
        for (k, name) in [("k1", "a"), ("k2", "b"), ("k3", "c")] {
            revs.push(audited_universe(&store, k, name, &audit).await.unwrap());
        }
        // A record written apart (a refusal) after them, then one more edit.
        store
            .append_audit(&AuditRecord { status: 409, revision: None, ..record(0, None) })
            .await
            .unwrap();
        revs.push(audited_universe(&store, "k4", "d", &audit).await.unwrap());
        drop(store);
        let trail = std::fs::read_to_string(dir.join(AUDIT_FILE)).unwrap();
        let lines: Vec<&str> = trail.lines().collect();
        assert_eq!(lines.len(), 5);
        // Reopened as it is: nothing added.
        assert_eq!(trail_revisions(&dir).await, revs);
        // The crash: the last edit's line lost, half of it left.
        let cut = format!("{}\n{}", lines[..4].join("\n"), &lines[4][..10]);
        std::fs::write(dir.join(AUDIT_FILE), cut).unwrap();
        assert_eq!(trail_revisions(&dir).await, revs, "the last record is added back");
        assert_eq!(trail_revisions(&dir).await, revs, "and only once");
        // Everything after the first edit's line lost: the edits' records come back (the
        // refusal, written apart, is in no log).
        std::fs::write(dir.join(AUDIT_FILE), format!("{}\n", lines[0])).unwrap();
        assert_eq!(trail_revisions(&dir).await, revs);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The trail is appended without an fsync: a crash may keep a later record and lose an
    /// earlier one. Opening adds back every record of the log the trail lacks, not only those
    /// numbered beyond its last; records rotated out of the trail are not added back.
    #[tokio::test]
    async fn an_earlier_audit_record_a_crash_lost_comes_back_beside_a_later_one_it_kept() {
        let dir = temp_dir("audit-crash-gap");
        let store = Store::open_embedded(&dir).unwrap();
        let audit = Counted::default();
        let mut revs = Vec::new();
        for (k, name) in [("k1", "a"), ("k2", "b"), ("k3", "c")] {
            revs.push(audited_universe(&store, k, name, &audit).await.unwrap());
        }
        drop(store);
        let trail = std::fs::read_to_string(dir.join(AUDIT_FILE)).unwrap();
        let lines: Vec<&str> = trail.lines().collect();
        assert_eq!(lines.len(), 3);
        std::fs::write(dir.join(AUDIT_FILE), format!("{}\n{}\n", lines[0], lines[2])).unwrap();
        let mut got = trail_revisions(&dir).await;
        got.sort_unstable();
        assert_eq!(got, revs, "the middle record is added back");
        assert_eq!(trail_revisions(&dir).await.len(), 3, "and only once");
        std::fs::remove_dir_all(&dir).unwrap();

        // Records rotated out of a small trail stay out, though the log still holds them.
        let dir = temp_dir("audit-rotated");
        let retention =
            AuditRetention { max_records: 4, max_age: std::time::Duration::from_secs(3600) };
        let store = Store::open_embedded_with(&dir, retention).unwrap();
        for i in 0..7 {
            let name = format!("r{i}");
            audited_universe(&store, &name, &name, &audit).await.unwrap();
        }
        let all = AuditQuery { since: None, universe: None, limit: 100 };
        let before = store.query_audit(&all).await.unwrap();
        drop(store);
        let store = Store::open_embedded_with(&dir, retention).unwrap();
        let after = store.query_audit(&all).await.unwrap();
        let revisions = |t: &[AuditRecord]| t.iter().map(|r| r.revision).collect::<Vec<_>>();
        assert_eq!(revisions(&after), revisions(&before));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn rule(port: i64) -> model::CreateRule {
        model::CreateRule {
            direction: "ingress".into(),
            protocol: serde_json::json!("tcp"),
            from_port: Some(port),
            to_port: Some(port),
            cidr: Some("10.9.0.0/16".into()),
            ..Default::default()
        }
    }

    fn embedded(store: &Store) -> &Arc<Embedded> {
        match store {
            Store::Embedded(e) => e,
            Store::Etcd(_) => unreachable!(),
        }
    }

    /// Group commit: edits sent at once share fsyncs; each runs on the ones before it (a
    /// second rule on the same port is refused, and not written); every acknowledged edit is
    /// in the log, each with its own revision, and a reopen gives the same state back.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_edits_share_fsyncs_each_running_on_the_ones_before() {
        let dir = temp_dir("group");
        let store = Store::open_embedded(&dir).unwrap();
        let (u, _) = store
            .edit(|s| {
                s.create_universe(model::CreateUniverse {
                    name: "u".into(),
                    cidr: Some("10.0.0.0/16".into()),
                    cidrs: None,
                    ipv6_cidrs: None,
                })
            })
            .await
            .unwrap();
        let (g, _) = store
            .edit(|s| {
                s.create_group(model::CreateGroup {
                    universe: u.id.clone(),
                    name: "g".into(),
                    description: None,
                })
            })
            .await
            .unwrap();
        let before = embedded(&store).batches.load(Ordering::SeqCst);
        let mut tasks = Vec::new();
        for i in 0..200i64 {
            let (store, g) = (store.clone(), g.id.clone());
            // Two edits per port: one of each pair is refused as a duplicate.
            tasks.push(tokio::spawn(async move {
                store.edit(move |s| s.add_rule(&g, rule(1000 + i / 2))).await.map(|(_, rev)| rev)
            }));
        }
        let mut revs = Vec::new();
        let mut refused = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(rev) => revs.push(rev),
                Err(Error::Rejected(_)) => refused += 1,
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!((revs.len(), refused), (100, 100));
        revs.sort_unstable();
        revs.dedup();
        assert_eq!(revs.len(), 100, "each its own revision");
        let batches = embedded(&store).batches.load(Ordering::SeqCst) - before;
        assert!(batches < 100, "{batches} fsyncs for 100 edits");
        let live = store.snapshot();
        assert_eq!(live.groups[&g.id].ingress.len(), 100);
        drop(store);
        let reopened = Store::open_embedded(&dir).unwrap().snapshot();
        assert_eq!(*reopened, *live);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A write that fails fails its edits and the edits queued on them; nothing of them is
    /// published or kept, and the next edit runs on the last published state.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_failed_write_fails_its_edits_and_the_ones_run_on_them() {
        let dir = temp_dir("group-fail");
        let store = Store::open_embedded(&dir).unwrap();
        store.edit(|s| s.create_universe(universe("first")).map(|_| ())).await.unwrap();
        let published = store.snapshot();
        embedded(&store).fail_write.store(true, Ordering::SeqCst);
        let mut tasks = Vec::new();
        for i in 2..12u32 {
            let store = store.clone();
            tasks.push(tokio::spawn(async move {
                store.edit(move |s| s.create_universe(universe(&format!("u{i}"))).map(|_| ())).await
            }));
        }
        let mut ok = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(_) => ok += 1,
                Err(e) => assert!(matches!(e, Error::Write { .. }), "{e}"),
            }
        }
        assert!(ok < 10, "the first batch failed");
        let after = store.snapshot();
        assert_eq!(after.universes.len(), 1 + ok);
        // The next edit builds on what was published, and everything survives a reopen.
        let ((), rev) =
            store.edit(|s| s.create_universe(universe("last")).map(|_| ())).await.unwrap();
        assert_eq!(rev, after.revision + 1);
        assert!(after.revision >= published.revision);
        let live = store.snapshot();
        drop(store);
        assert_eq!(*Store::open_embedded(&dir).unwrap().snapshot(), *live);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// A failed write the log cannot be cut back from stops the store taking edits: writing on
    /// would reuse the revisions of the failed lines left in the log, and a replay would keep
    /// those and drop the acknowledged edits after them. A reopen replays the log (its torn
    /// last line cut off) and takes edits again.
    #[tokio::test]
    async fn a_failed_write_that_cannot_be_cut_back_stops_the_edits() {
        let dir = temp_dir("group-halt");
        let store = Store::open_embedded(&dir).unwrap();
        store.edit(|s| s.create_universe(universe("first")).map(|_| ())).await.unwrap();
        let published = store.snapshot();
        embedded(&store).fail_write.store(true, Ordering::SeqCst);
        embedded(&store).fail_cut.store(true, Ordering::SeqCst);
        let err = store.edit(|s| s.create_universe(universe("a")).map(|_| ())).await.unwrap_err();
        assert!(matches!(err, Error::Halted { .. }), "{err}");
        assert!(err.to_string().contains("injected by the test"), "names the cause: {err}");
        // Nothing is written any more, and nothing is published.
        let err = store.edit(|s| s.create_universe(universe("b")).map(|_| ())).await.unwrap_err();
        assert!(matches!(err, Error::Halted { .. }), "{err}");
        assert_eq!(*store.snapshot(), *published);
        drop(store);
        // Reopened: the torn line is cut off, edits go on, and a reopen keeps them.
        let store = Store::open_embedded(&dir).unwrap();
        assert_eq!(*store.snapshot(), *published);
        let ((), rev) = store.edit(|s| s.create_universe(universe("c")).map(|_| ())).await.unwrap();
        assert_eq!(rev, published.revision + 1);
        let live = store.snapshot();
        drop(store);
        assert_eq!(*Store::open_embedded(&dir).unwrap().snapshot(), *live);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn corrupt_state_file_is_reported_with_its_path_and_the_copy_to_restore() {
        let dir = temp_dir("corrupt");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(STATE_FILE), b"{not json").unwrap();
        let err = Store::open_embedded(&dir).err().unwrap().to_string();
        assert!(err.contains("state.json"), "{err}");
        assert!(err.contains(LAST_GOOD_FILE), "says how to recover: {err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
