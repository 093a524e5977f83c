//! The embedded store (the default): one host, nothing to install.
//!
//! Contract (see the parent module for what every store guarantees): the document is kept as
//! JSON in `<state_dir>/state.json`, replaced atomically (temporary file, fsync, rename, fsync of
//! the directory), so the file is never seen half-written, even after a crash. Hosts live in
//! memory only: the hosts registered through this store (normally the one `versed` that owns
//! it) are always healthy, and their realized revision is the last one reported.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio::sync::{watch, Mutex};

use super::{apply_edit, Error, HostStatus, Result};
use crate::model::{self, State};

/// File name of the document in the state directory.
pub const STATE_FILE: &str = "state.json";
const TEMP_FILE: &str = "state.json.tmp";

/// The embedded store. Use it through [`Store`].
pub struct Embedded {
    path: PathBuf,
    dir: PathBuf,
    /// Held from reading the current state until the next one is published.
    lock: Arc<Mutex<()>>,
    tx: watch::Sender<Arc<State>>,
    /// The hosts registered here, by name; `healthy` is always true.
    hosts: watch::Sender<Arc<Vec<HostStatus>>>,
}

impl Embedded {
    pub(super) fn open(dir: &Path) -> Result<Embedded> {
        std::fs::create_dir_all(dir)
            .map_err(|source| Error::CreateDir { path: dir.to_owned(), source })?;
        let path = dir.join(STATE_FILE);
        let state = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice::<State>(&bytes)
                .map_err(|source| Error::Parse { path: path.clone(), source })?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => State::default(),
            Err(source) => return Err(Error::Read { path, source }),
        };
        // A temporary file left by a crash before its rename holds an unacknowledged edit.
        let temp = dir.join(TEMP_FILE);
        match std::fs::remove_file(&temp) {
            Ok(()) => tracing::warn!(path = %temp.display(), "removed an unfinished state write"),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => return Err(Error::Write { path: temp, source }),
        }
        let (tx, _) = watch::channel(Arc::new(state));
        let (hosts, _) = watch::channel(Arc::new(Vec::new()));
        Ok(Embedded { path, dir: dir.to_owned(), lock: Arc::new(Mutex::new(())), tx, hosts })
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

    pub(super) fn register_host(&self, name: &str, underlay_ip: Option<Ipv4Addr>) {
        self.update_host(name, |h| h.underlay_ip = underlay_ip);
    }

    pub(super) fn report_realized(&self, name: &str, revision: u64) {
        self.update_host(name, |h| h.revision = revision);
    }

    fn update_host(&self, name: &str, change: impl FnOnce(&mut HostStatus)) {
        self.hosts.send_if_modified(|hosts| {
            let mut by_name: BTreeMap<String, HostStatus> =
                hosts.iter().map(|h| (h.name.clone(), h.clone())).collect();
            let host = by_name.entry(name.to_owned()).or_insert_with(|| HostStatus {
                name: name.to_owned(),
                underlay_ip: None,
                revision: 0,
                healthy: true,
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

    /// Replaces the state file atomically: write a temporary file, fsync it, rename it over
    /// the old one, fsync the directory so that the rename itself is durable (rename(2) is
    /// atomic but only durable once the directory is synced).
    fn write(&self, bytes: &[u8]) -> Result<()> {
        let temp = self.dir.join(TEMP_FILE);
        let werr = |path: &Path| {
            let path = path.to_owned();
            move |source| Error::Write { path, source }
        };
        let mut file = File::create(&temp).map_err(werr(&temp))?;
        file.write_all(bytes).map_err(werr(&temp))?;
        file.sync_all().map_err(werr(&temp))?;
        drop(file);
        std::fs::rename(&temp, &self.path).map_err(werr(&self.path))?;
        File::open(&self.dir).and_then(|d| d.sync_all()).map_err(werr(&self.dir))?;
        Ok(())
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
            [HostStatus { name: "h1".into(), underlay_ip: ip, revision: 4, healthy: true }]
        );
        store.register_host("h1", ip).await.unwrap();
        assert!(!rx.has_changed().unwrap(), "nothing changed, nothing published");
        // Hosts live in memory: the desired state (and its revision) is untouched.
        assert_eq!(store.snapshot().revision, 0);
        assert!(store.register_host("a/b", None).await.is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn corrupt_state_file_is_reported_with_its_path() {
        let dir = temp_dir("corrupt");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(STATE_FILE), b"{not json").unwrap();
        let err = Store::open_embedded(&dir).err().unwrap().to_string();
        assert!(err.contains("state.json"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
