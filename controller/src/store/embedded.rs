//! The embedded store (the default): one host, nothing to install.
//!
//! Contract (see the parent module for what every store guarantees): the document is kept as
//! JSON in `<state_dir>/state.json`, replaced atomically (temporary file, fsync, rename, fsync of
//! the directory), so the file is never seen half-written, even after a crash. A second copy,
//! `<state_dir>/state.json.last-good`, is written the same way right after it: the state to
//! restore if `state.json` is lost or damaged (versed refuses to start without `state.json`
//! while the copy, or the dataplane of a previous run, is there). Hosts live in
//! memory only: the hosts registered through this store (normally the one `versed` that owns
//! it) are always healthy, and their realized revision is the last one reported.
//!
//! The audit trail is `<state_dir>/audit.jsonl` (mode 0600), one JSON record per line, appended
//! and fsynced record by record. When it holds half of the retained records it becomes
//! `audit.jsonl.1` (replacing the one before) and a new file starts, so the two files hold at
//! most `max_records`; records older than `max_age` are never shown.

use std::collections::{BTreeMap, VecDeque};
use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::net::Ipv4Addr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, PoisonError};
use std::time::SystemTime;

use tokio::sync::{watch, Mutex};

use super::{apply_edit, audit_matches, AuditRetention, Error, HostStatus, Result};
use crate::audit::{AuditRecord, Query as AuditQuery};
use crate::model::{self, State};

/// File name of the document in the state directory.
pub const STATE_FILE: &str = "state.json";
/// File name of its copy, written after it at every commit.
pub const LAST_GOOD_FILE: &str = "state.json.last-good";
const TEMP_FILE: &str = "state.json.tmp";
const LAST_GOOD_TEMP: &str = "state.json.last-good.tmp";
/// File names of the audit trail in the state directory: the current file, the one before.
pub const AUDIT_FILE: &str = "audit.jsonl";
pub const AUDIT_FILE_OLD: &str = "audit.jsonl.1";

/// The embedded store. Use it through [`Store`].
pub struct Embedded {
    path: PathBuf,
    dir: PathBuf,
    /// Held from reading the current state until the next one is published.
    lock: Arc<Mutex<()>>,
    tx: watch::Sender<Arc<State>>,
    /// The hosts registered here, by name; `healthy` is always true.
    hosts: watch::Sender<Arc<Vec<HostStatus>>>,
    audit: Arc<AuditLog>,
}

/// The audit files. The lock is held for a whole append (or read), so a rotation never
/// interleaves with either.
struct AuditLog {
    dir: PathBuf,
    retention: AuditRetention,
    file: std::sync::Mutex<AuditFile>,
}

struct AuditFile {
    /// Open for appending; `None` until the first append after opening or a rotation.
    file: Option<File>,
    /// Records in the current file.
    records: usize,
}

impl Embedded {
    pub(super) fn open(dir: &Path, retention: AuditRetention) -> Result<Embedded> {
        std::fs::create_dir_all(dir)
            .map_err(|source| Error::CreateDir { path: dir.to_owned(), source })?;
        let path = dir.join(STATE_FILE);
        let mut state = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice::<State>(&bytes).map_err(|source| {
                Error::Parse { path: path.clone(), source, copy: dir.join(LAST_GOOD_FILE) }
            })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => State::default(),
            Err(source) => return Err(Error::Read { path, source }),
        };
        state.complete_legacy();
        // A temporary file left by a crash before its rename holds an unacknowledged edit.
        for temp in [dir.join(TEMP_FILE), dir.join(LAST_GOOD_TEMP)] {
            match std::fs::remove_file(&temp) {
                Ok(()) => {
                    tracing::warn!(path = %temp.display(), "removed an unfinished state write")
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(Error::Write { path: temp, source }),
            }
        }
        let audit_path = dir.join(AUDIT_FILE);
        let records = match File::open(&audit_path) {
            Ok(f) => BufReader::new(f).lines().count(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
            Err(source) => return Err(Error::Audit { path: audit_path, source }),
        };
        let audit = Arc::new(AuditLog {
            dir: dir.to_owned(),
            retention,
            file: std::sync::Mutex::new(AuditFile { file: None, records }),
        });
        let (tx, _) = watch::channel(Arc::new(state));
        let (hosts, _) = watch::channel(Arc::new(Vec::new()));
        Ok(Embedded { path, dir: dir.to_owned(), lock: Arc::new(Mutex::new(())), tx, hosts, audit })
    }

    pub(super) async fn append_audit(&self, record: &AuditRecord) -> Result<()> {
        let mut line = serde_json::to_vec(record).map_err(|e| Error::Audit {
            path: self.audit.dir.join(AUDIT_FILE),
            source: std::io::Error::other(format!("serializing the record: {e}")),
        })?;
        line.push(b'\n');
        let audit = self.audit.clone();
        let path = self.audit.dir.join(AUDIT_FILE);
        tokio::task::spawn_blocking(move || audit.append(&line))
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
    ) {
        self.update_host(name, |h| {
            h.underlay_ip = underlay_ip;
            h.api = api;
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

    pub(super) async fn edit<T, F>(this: &Arc<Embedded>, mut f: F) -> Result<(T, u64)>
    where
        F: FnMut(&mut State) -> model::Result<T> + Send,
        T: Send + 'static,
    {
        let guard = this.lock.clone().lock_owned().await;
        let current = this.tx.borrow().clone();
        let (out, next) = apply_edit(&current, &mut f)?;
        let Some(next) = next else {
            return Ok((out, current.revision));
        };
        let revision = next.revision;
        let bytes = serde_json::to_vec_pretty(&next).map_err(|e| Error::Write {
            path: this.path.clone(),
            source: std::io::Error::other(format!("serializing the state: {e}")),
        })?;
        // The write, the publication and the release of the lock happen in one task that runs
        // to completion even if this future is dropped, so a persisted state is always
        // published and no other edit can start from the state it replaces.
        let store = this.clone();
        let commit = tokio::task::spawn_blocking(move || {
            let _guard = guard;
            store.write(&bytes)?;
            store.tx.send_replace(Arc::new(next));
            Ok::<_, Error>(())
        });
        match commit.await {
            Ok(r) => r?,
            Err(join) => {
                return Err(Error::Write {
                    path: this.path.clone(),
                    source: std::io::Error::other(format!("the writing task failed: {join}")),
                })
            }
        }
        Ok((out, revision))
    }

    /// Replaces the state file, then its last-good copy, each atomically: write a temporary
    /// file, fsync it, rename it over the old one; then fsync the directory so that the renames
    /// are durable (rename(2) is atomic but only durable once the directory is synced).
    fn write(&self, bytes: &[u8]) -> Result<()> {
        let werr = |path: &Path| {
            let path = path.to_owned();
            move |source| Error::Write { path, source }
        };
        for (temp, target) in
            [(TEMP_FILE, self.path.clone()), (LAST_GOOD_TEMP, self.dir.join(LAST_GOOD_FILE))]
        {
            let temp = self.dir.join(temp);
            let mut file = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .mode(0o600)
                .open(&temp)
                .map_err(werr(&temp))?;
            file.write_all(bytes).map_err(werr(&temp))?;
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

    fn append(&self, line: &[u8]) -> Result<()> {
        let path = self.dir.join(AUDIT_FILE);
        let err = |source| Error::Audit { path: path.clone(), source };
        let mut f = self.file.lock().unwrap_or_else(PoisonError::into_inner);
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
        file.write_all(line).and_then(|()| file.sync_data()).map_err(err)?;
        f.records += 1;
        if f.records >= self.per_file() {
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
        let _f = self.file.lock().unwrap_or_else(PoisonError::into_inner);
        let oldest =
            SystemTime::now().checked_sub(self.retention.max_age).unwrap_or(SystemTime::UNIX_EPOCH);
        let mut out = VecDeque::new();
        for name in [AUDIT_FILE_OLD, AUDIT_FILE] {
            let path = self.dir.join(name);
            let file = match File::open(&path) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(source) => return Err(Error::Audit { path, source }),
            };
            for line in BufReader::new(file).split(b'\n') {
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
        let mut rx = store.subscribe_hosts();
        assert!(store.hosts().is_empty());
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
