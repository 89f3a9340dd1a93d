//! [`WalStore`]: a root folder holding one [`SpaceWal`] per space, opened once and shared.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::watch;

use crate::types::SpaceId;

use super::config::{SyncPolicy, WalConfig};
use super::error::{IoContext, WalError};
use super::space::SpaceWal;
use super::syncer::Syncer;

/// The logs of every space under one root folder (`<root>/<space-id>/`). Cheap to clone.
///
/// Each space is opened once and cached, so every caller shares the same [`SpaceWal`]. With
/// [`SyncPolicy::Interval`], one background thread fsyncs all the store's spaces.
#[derive(Clone)]
pub struct WalStore {
    inner: Arc<StoreInner>,
}

impl std::fmt::Debug for WalStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WalStore").field("root", &self.inner.root).field("spaces", &self.lock().len()).finish()
    }
}

struct StoreInner {
    root: PathBuf,
    config: WalConfig,
    syncer: Option<Syncer>,
    spaces: Mutex<BTreeMap<SpaceId, SpaceWal>>,
    count: watch::Sender<usize>,
}

impl WalStore {
    /// Opens the store at `root` (created if missing) and every space folder in it, recovering each.
    /// Entries of `root` that are not valid space ids are ignored.
    pub fn open(root: &Path, config: WalConfig) -> Result<WalStore, WalError> {
        std::fs::create_dir_all(root).ctx("create WAL root folder", root)?;
        let syncer = match config.sync {
            SyncPolicy::Interval(every) => Some(Syncer::start(every).ctx("start the WAL sync thread for", root)?),
            _ => None,
        };
        let mut spaces = BTreeMap::new();
        for entry in std::fs::read_dir(root).ctx("list", root)? {
            let entry = entry.ctx("list", root)?;
            if !entry.file_type().ctx("stat", &entry.path())?.is_dir() {
                continue;
            }
            let Some(id) = entry.file_name().to_str().and_then(|n| SpaceId::new(n).ok()) else {
                tracing::debug!(path = %entry.path().display(), "WAL store: ignoring a folder that is not a space id");
                continue;
            };
            let wal = SpaceWal::open_with(root, id.clone(), config.clone(), syncer.as_ref())?;
            spaces.insert(id, wal);
        }
        tracing::info!(root = %root.display(), spaces = spaces.len(), "WAL store opened");
        let count = watch::Sender::new(spaces.len());
        Ok(WalStore {
            inner: Arc::new(StoreInner { root: root.to_path_buf(), config, syncer, spaces: Mutex::new(spaces), count }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, BTreeMap<SpaceId, SpaceWal>> {
        self.inner.spaces.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The log of `id`, opened (created if new) on first use and cached.
    pub fn space(&self, id: &SpaceId) -> Result<SpaceWal, WalError> {
        let mut spaces = self.lock();
        if let Some(w) = spaces.get(id) {
            return Ok(w.clone());
        }
        let wal =
            SpaceWal::open_with(&self.inner.root, id.clone(), self.inner.config.clone(), self.inner.syncer.as_ref())?;
        spaces.insert(id.clone(), wal.clone());
        self.inner.count.send_replace(spaces.len());
        Ok(wal)
    }

    /// The log of `id` if it exists.
    pub fn get(&self, id: &SpaceId) -> Option<SpaceWal> {
        self.lock().get(id).cloned()
    }

    /// Every space's log, sorted by space id.
    pub fn spaces(&self) -> Vec<SpaceWal> {
        self.lock().values().cloned().collect()
    }

    /// The root folder.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// Receiver of the number of spaces; it changes when a space is created.
    pub fn subscribe_spaces(&self) -> watch::Receiver<usize> {
        self.inner.count.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;

    use super::*;
    use crate::types::{Epoch, Seq};

    fn id(s: &str) -> SpaceId {
        SpaceId::new(s).unwrap()
    }

    #[test]
    fn reopens_existing_spaces() {
        let root = tempfile::tempdir().unwrap();
        let config = WalConfig::default().sync(SyncPolicy::Interval(Duration::from_millis(5)));
        let digests = {
            let store = WalStore::open(root.path(), config.clone()).unwrap();
            let mut rx = store.subscribe_spaces();
            assert_eq!(*rx.borrow_and_update(), 0);
            let mut digests = Vec::new();
            for (name, n) in [("zeta", 3u64), ("alpha", 5), ("mid.dle", 1)] {
                let w = store.space(&id(name)).unwrap();
                for i in 0..n {
                    w.append(Epoch(2), 1, Bytes::from(format!("{name}-{i}"))).unwrap();
                }
                digests.push((name, n, w.digest()));
            }
            assert!(rx.has_changed().unwrap());
            assert_eq!(*rx.borrow_and_update(), 3);
            // Cached: the same log, not a second open of the folder.
            store.space(&id("alpha")).unwrap().append(Epoch(2), 1, Bytes::from_static(b"more")).unwrap();
            assert_eq!(store.get(&id("alpha")).unwrap().last_seq(), Seq(6));
            assert!(store.get(&id("nope")).is_none());
            digests
        };
        std::fs::write(root.path().join("stray-file"), b"x").unwrap();
        std::fs::create_dir(root.path().join("not a space")).unwrap();

        let store = WalStore::open(root.path(), config).unwrap();
        assert_eq!(store.root(), root.path());
        let names: Vec<String> = store.spaces().iter().map(|w| w.space().to_string()).collect();
        assert_eq!(names, ["alpha", "mid.dle", "zeta"]);
        for (name, n, digest) in digests {
            let w = store.get(&id(name)).unwrap();
            let extra = u64::from(name == "alpha");
            assert_eq!(w.last_seq(), Seq(n + extra), "{name}");
            if extra == 0 {
                assert_eq!(w.digest(), digest, "{name}");
            }
            assert_eq!(w.last_epoch(), Epoch(2));
        }
        assert_eq!(*store.subscribe_spaces().borrow(), 3);
    }
}
