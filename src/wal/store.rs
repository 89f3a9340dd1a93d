//! [`WalStore`]: a root folder holding one [`SpaceWal`] per space, opened once and shared.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::watch;

use crate::types::SpaceId;

use super::config::{DamagedSpace, SyncPolicy, WalConfig};
use super::error::{IoContext, WalError};
use super::fs::{sync_dir, write_durably};
use super::space::SpaceWal;
use super::syncer::Syncer;
use super::tail::TailBudget;

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
        f.debug_struct("WalStore").field("root", &self.inner.root).field("spaces", &self.lock().opened.len()).finish()
    }
}

struct StoreInner {
    root: PathBuf,
    config: WalConfig,
    syncer: Option<Syncer>,
    tail_budget: Arc<TailBudget>,
    spaces: Mutex<Spaces>,
    count: watch::Sender<usize>,
    /// Spaces set aside ([`DamagedSpace::SetAside`]) whose reset is still pending, as their
    /// markers said when the store opened.
    set_aside: Vec<SetAsideSpace>,
    /// The root folder, locked: a second store over it (which would create the same new spaces) fails.
    _root_lock: std::fs::File,
}

/// A space whose log failed recovery as damaged and was moved aside ([`DamagedSpace::SetAside`]);
/// the store holds an empty log of it instead. A marker file (`damaged+spaces/<space>.<ms>.reset`,
/// written before the move) keeps it listed across restarts until [`WalStore::reset_done`]: whoever
/// built state from the old log must start that state again from nothing, and a crash must not
/// make it forget.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct SetAsideSpace {
    pub space: SpaceId,
    /// Where its folder went, files untouched.
    pub moved_to: PathBuf,
    /// Why recovery refused it.
    pub reason: String,
}

/// Folder of the root where damaged spaces are moved; not a valid space id (`+`), so never opened as one.
const SET_ASIDE_FOLDER: &str = "damaged+spaces";

/// The open spaces, by id and in the order they were opened (so a watcher can take just the new ones).
#[derive(Default)]
struct Spaces {
    by_id: BTreeMap<SpaceId, SpaceWal>,
    opened: Vec<SpaceWal>,
    /// One gate per space being opened, so that a space's folder is opened by one caller at a time
    /// while the store's lock is free for everyone else.
    opening: HashMap<SpaceId, Arc<Mutex<()>>>,
}

impl Spaces {
    fn insert(&mut self, wal: SpaceWal) {
        self.opened.push(wal.clone());
        self.by_id.insert(wal.space().clone(), wal);
    }
}

impl WalStore {
    /// Opens the store at `root` (created if missing) and every space folder in it, recovering each.
    /// Entries of `root` that are not valid space ids are ignored.
    pub fn open(root: &Path, config: WalConfig) -> Result<WalStore, WalError> {
        if root.exists() && !root.is_dir() {
            return Err(WalError::NotAFolder { path: root.to_path_buf() });
        }
        std::fs::create_dir_all(root).ctx("create WAL root folder", root)?;
        let root_lock = super::fs::lock_folder(root, "WAL folder")?;
        let syncer = match config.sync {
            SyncPolicy::Interval(every) => Some(Syncer::start(every).ctx("start the WAL sync thread for", root)?),
            _ => None,
        };
        let tail_budget = TailBudget::new(config.store_tail_max_bytes);
        let mut spaces = Spaces::default();
        let open = |id: SpaceId| SpaceWal::open_with(root, id, config.clone(), syncer.as_ref(), &tail_budget);
        for entry in std::fs::read_dir(root).ctx("list", root)? {
            let entry = entry.ctx("list", root)?;
            if !entry.file_type().ctx("stat", &entry.path())?.is_dir() {
                continue;
            }
            let Some(id) = entry.file_name().to_str().and_then(|n| SpaceId::new(n).ok()) else {
                tracing::debug!(path = %entry.path().display(), "WAL store: ignoring a folder that is not a space id");
                continue;
            };
            let wal = match open(id.clone()) {
                Err(damage @ WalError::Corruption { .. }) if config.damaged_space == DamagedSpace::SetAside => {
                    let moved_to = move_aside(root, &id, &damage.to_string())?;
                    tracing::error!(space = %id, error = %damage, moved_to = %moved_to.display(), "WAL store: damaged space set aside; it starts again empty");
                    open(id)?
                }
                opened => opened?,
            };
            spaces.insert(wal);
        }
        // The space folders' entries in the root: a previous run under `Never` may have created
        // them without syncing it (each space syncs its own folder on open).
        if config.fsyncs() {
            sync_dir(root)?;
        }
        let set_aside = pending_resets(root)?;
        // A crash between moving a space aside and creating its new log leaves the marker alone:
        // every space it lists is open, empty if need be, as `set_aside` says.
        for s in &set_aside {
            if !spaces.by_id.contains_key(&s.space) {
                spaces.insert(open(s.space.clone())?);
            }
        }
        tracing::info!(root = %root.display(), spaces = spaces.opened.len(), "WAL store opened");
        let count = watch::Sender::new(spaces.opened.len());
        Ok(WalStore {
            inner: Arc::new(StoreInner {
                root: root.to_path_buf(),
                config,
                syncer,
                tail_budget,
                spaces: Mutex::new(spaces),
                count,
                set_aside,
                _root_lock: root_lock,
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Spaces> {
        self.inner.spaces.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The log of `id`, opened (created if new) on first use and cached.
    ///
    /// Opening (creating the folder, or recovering one a previous run left) happens outside the
    /// store's lock: other spaces stay usable meanwhile, and concurrent callers for the same space
    /// wait for the one that opens it.
    pub fn space(&self, id: &SpaceId) -> Result<SpaceWal, WalError> {
        let gate = {
            let mut spaces = self.lock();
            if let Some(w) = spaces.by_id.get(id) {
                return Ok(w.clone());
            }
            spaces.opening.entry(id.clone()).or_default().clone()
        };
        let _opener = gate.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(w) = self.get(id) {
            return Ok(w); // Opened by the caller we waited for.
        }
        let inner = &self.inner;
        let opened = SpaceWal::open_with(
            &inner.root,
            id.clone(),
            inner.config.clone(),
            inner.syncer.as_ref(),
            &inner.tail_budget,
        );
        let mut spaces = self.lock();
        match opened {
            Ok(wal) => {
                // Callers still waiting on this gate will find the space in `by_id`.
                spaces.opening.remove(id);
                spaces.insert(wal.clone());
                self.inner.count.send_replace(spaces.opened.len());
                Ok(wal)
            }
            Err(e) => {
                // Waiters (who hold the gate too) try in turn; with none, forget the gate, so ids
                // that never open (named by a peer, say) leave nothing behind.
                if Arc::strong_count(&gate) == 2 {
                    spaces.opening.remove(id);
                }
                Err(e)
            }
        }
    }

    /// The log of `id` if it exists.
    pub fn get(&self, id: &SpaceId) -> Option<SpaceWal> {
        self.lock().by_id.get(id).cloned()
    }

    /// Every space's log, sorted by space id.
    pub fn spaces(&self) -> Vec<SpaceWal> {
        self.lock().by_id.values().cloned().collect()
    }

    /// The spaces opened after the first `seen`, in the order they were opened: with
    /// [`WalStore::subscribe_spaces`], a watcher takes each new space once, without rescanning.
    pub fn spaces_since(&self, seen: usize) -> Vec<SpaceWal> {
        self.lock().opened.get(seen..).map(<[SpaceWal]>::to_vec).unwrap_or_default()
    }

    /// The spaces set aside as damaged ([`DamagedSpace::SetAside`]), at this open or an earlier
    /// one, whose reset was not yet [done](WalStore::reset_done) when the store opened: each holds
    /// an empty log, to be filled again (a replica fetches it from its primary).
    pub fn set_aside(&self) -> &[SetAsideSpace] {
        &self.inner.set_aside
    }

    /// Records, durably, that what was built from the set-aside log of `space` was started again
    /// from nothing: its markers are removed, so the next open no longer lists it.
    pub fn reset_done(&self, space: &SpaceId) -> Result<(), WalError> {
        let aside = self.inner.root.join(SET_ASIDE_FOLDER);
        let markers: Vec<_> = list_markers(&aside)?.into_iter().filter(|m| &m.0 == space).collect();
        if markers.is_empty() {
            return Ok(());
        }
        for (_, marker) in markers {
            std::fs::remove_file(&marker).ctx("remove", &marker)?;
        }
        sync_dir(&aside)
    }

    /// The root folder.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// Receiver of the number of spaces; it changes when a space is created (see [`WalStore::spaces_since`]).
    pub fn subscribe_spaces(&self) -> watch::Receiver<usize> {
        self.inner.count.subscribe()
    }
}

/// Suffix of a set-aside space's marker file.
const RESET_MARKER: &str = ".reset";

/// Moves the folder of `id` to `<root>/damaged+spaces/<id>.<n>` (`n`: unix ms, or more if taken),
/// durably, and returns where. Its reset marker is written (and fsynced) first: a crash before
/// the move leaves the space where it was, to be set aside again at the next open.
fn move_aside(root: &Path, id: &SpaceId, reason: &str) -> Result<PathBuf, WalError> {
    let aside = root.join(SET_ASIDE_FOLDER);
    std::fs::create_dir_all(&aside).ctx("create", &aside)?;
    let mut n = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis();
    while aside.join(format!("{id}.{n}")).exists() || aside.join(format!("{id}.{n}{RESET_MARKER}")).exists() {
        n += 1;
    }
    let to = aside.join(format!("{id}.{n}"));
    let marker = aside.join(format!("{id}.{n}{RESET_MARKER}"));
    write_durably(&aside, &marker, format!("{}\n{reason}\n", to.display()).as_bytes(), "write the reset marker")?;
    let from = root.join(id.as_str());
    std::fs::rename(&from, &to).ctx("move damaged space to", &to)?;
    sync_dir(&aside)?;
    sync_dir(root)?;
    Ok(to)
}

/// The reset markers in `aside` (none if it does not exist): (space, marker path), oldest first.
fn list_markers(aside: &Path) -> Result<Vec<(SpaceId, PathBuf)>, WalError> {
    let mut out: Vec<(u128, SpaceId, PathBuf)> = Vec::new();
    let entries = match std::fs::read_dir(aside) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(WalError::io("list", aside, e)),
    };
    for entry in entries {
        let entry = entry.ctx("list", aside)?;
        let name = entry.file_name();
        let parsed = name.to_str().and_then(|n| n.strip_suffix(RESET_MARKER)).and_then(|n| n.rsplit_once('.'));
        let Some((space, n)) = parsed else { continue };
        if let (Ok(space), Ok(n)) = (SpaceId::new(space), n.parse::<u128>()) {
            out.push((n, space, entry.path()));
        }
    }
    out.sort();
    Ok(out.into_iter().map(|(_, space, path)| (space, path)).collect())
}

/// The spaces with a pending reset, from their markers: one per space (its newest marker).
fn pending_resets(root: &Path) -> Result<Vec<SetAsideSpace>, WalError> {
    let mut by_space: BTreeMap<SpaceId, SetAsideSpace> = BTreeMap::new();
    for (space, marker) in list_markers(&root.join(SET_ASIDE_FOLDER))? {
        let text = std::fs::read_to_string(&marker).ctx("read", &marker)?;
        let (moved_to, reason) = text.split_once('\n').unwrap_or((text.as_str(), ""));
        let entry = SetAsideSpace { space: space.clone(), moved_to: moved_to.into(), reason: reason.trim_end().into() };
        by_space.insert(space, entry);
    }
    Ok(by_space.into_values().collect())
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
    fn concurrent_first_uses_of_a_space_share_one_log() {
        let root = tempfile::tempdir().unwrap();
        let store = WalStore::open(root.path(), WalConfig::default().sync(SyncPolicy::Never)).unwrap();
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let store = store.clone();
                std::thread::spawn(move || {
                    for i in 0..50 {
                        let wal = store.space(&id(&format!("s{}", i % 5))).unwrap();
                        wal.append(Epoch(1), t, Bytes::from_static(b"x")).unwrap();
                    }
                })
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        // Two logs opened on one folder would have reused sequence numbers.
        assert_eq!(store.spaces().len(), 5);
        assert!(store.spaces().iter().all(|w| w.last_seq() == Seq(80)));
        assert_eq!(store.spaces_since(0).len(), 5);
        drop(store);
        let store = WalStore::open(root.path(), WalConfig::default().sync(SyncPolicy::Never)).unwrap();
        assert!(store
            .spaces()
            .iter()
            .all(|w| w.last_seq() == Seq(80) && w.read_from(Seq(1), 100, usize::MAX).unwrap().len() == 80));
    }

    #[test]
    fn a_space_that_cannot_open_leaves_nothing_behind() {
        let root = tempfile::tempdir().unwrap();
        let store = WalStore::open(root.path(), WalConfig::default().sync(SyncPolicy::Never)).unwrap();
        // A file where the space's folder would go.
        std::fs::write(root.path().join("blocked"), b"x").unwrap();
        assert!(store.space(&id("blocked")).is_err());
        assert!(store.space(&id("blocked")).is_err(), "and again, without a stale gate in the way");
        assert!(store.lock().opening.is_empty() && store.spaces().is_empty());
        std::fs::remove_file(root.path().join("blocked")).unwrap();
        assert_eq!(store.space(&id("blocked")).unwrap().last_seq(), Seq(0));
        assert!(store.lock().opening.is_empty());
    }

    #[test]
    fn memory_tails_stay_within_the_store_budget_however_many_spaces() {
        let root = tempfile::tempdir().unwrap();
        let config = WalConfig::default().sync(SyncPolicy::Never).store_tail_max_bytes(64 * 1024);
        let store = WalStore::open(root.path(), config.clone()).unwrap();
        let payload = Bytes::from(vec![b'p'; 1000]);
        for round in 0..20u64 {
            for s in 0..50 {
                let wal = store.space(&id(&format!("s{s}"))).unwrap();
                wal.append(Epoch(1), 1, payload.clone()).unwrap();
                // The budget, plus at most each space's fair share of it taken while over it.
                assert!(store.inner.tail_budget.used() <= 2 * 64 * 1024, "round {round}, space {s}");
            }
        }
        // What left memory is read from the segments.
        for wal in store.spaces() {
            let all = wal.read_from(Seq(1), 100, usize::MAX).unwrap();
            assert_eq!(all.len(), 20);
            assert!(all.iter().all(|e| e.payload == payload && e.verify()));
        }
        drop(store);
        // Reopened, recovery refills the tails within the budget too.
        let store = WalStore::open(root.path(), config).unwrap();
        assert!(store.inner.tail_budget.used() <= 2 * 64 * 1024);
        assert!(store.inner.tail_budget.used() > 32 * 1024);
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
            let opened = |seen| store.spaces_since(seen).iter().map(|w| w.space().to_string()).collect::<Vec<_>>();
            assert_eq!(opened(0), ["zeta", "alpha", "mid.dle"], "in the order they were opened");
            assert_eq!(opened(2), ["mid.dle"]);
            assert!(opened(3).is_empty() && opened(9).is_empty());
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

    #[test]
    fn a_file_given_as_the_folder_is_refused_with_what_to_do() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not-a-folder");
        std::fs::write(&file, b"x").unwrap();
        let Err(err) = WalStore::open(&file, WalConfig::default()) else { panic!("a file is not a WAL folder") };
        assert!(matches!(err, WalError::NotAFolder { .. }), "{err}");
        assert!(err.to_string().contains("give the path of a folder"), "{err}");
    }

    /// A space whose log fails recovery as damaged stops the store from opening (the default), or
    /// is moved aside with its files untouched and starts again empty while the others open.
    #[test]
    fn a_damaged_space_is_refused_or_set_aside() {
        let root = tempfile::tempdir().unwrap();
        let config = WalConfig::default().sync(SyncPolicy::Never).segment_bytes(200);
        {
            let store = WalStore::open(root.path(), config.clone()).unwrap();
            for name in ["good", "bad"] {
                let wal = store.space(&id(name)).unwrap();
                for i in 0..20u64 {
                    wal.append(Epoch(1), 1, Bytes::from(format!("{name}-{i}"))).unwrap();
                }
            }
        }
        let first = crate::wal::test_files::segment_files(&root.path().join("bad")).remove(0);
        let mut bytes = std::fs::read(&first).unwrap();
        bytes[60] ^= 0x40; // a payload byte of the first record of a sealed segment
        std::fs::write(&first, &bytes).unwrap();

        let err = WalStore::open(root.path(), config.clone()).unwrap_err();
        assert!(matches!(&err, WalError::Corruption { file, .. } if file == &first), "{err}");
        assert!(first.exists(), "refusing touches nothing");

        let store = WalStore::open(root.path(), config.clone().damaged_space(DamagedSpace::SetAside)).unwrap();
        assert_eq!(store.get(&id("good")).unwrap().last_seq(), Seq(20));
        assert_eq!(store.get(&id("bad")).unwrap().last_seq(), Seq(0), "starts again empty");
        let [aside] = store.set_aside() else { panic!("{:?}", store.set_aside()) };
        let aside = aside.clone();
        assert_eq!(aside.space, id("bad"));
        assert!(aside.reason.contains("checksum"), "{}", aside.reason);
        assert!(aside.moved_to.starts_with(root.path().join(SET_ASIDE_FOLDER)));
        assert_eq!(std::fs::read(aside.moved_to.join(first.file_name().unwrap())).unwrap(), bytes, "kept as found");
        // A lowered max_entry_bytes is a configuration mistake, not damage: nothing is set aside.
        drop(store);
        let lowered = config.clone().damaged_space(DamagedSpace::SetAside).max_entry_bytes(3);
        let err = WalStore::open(root.path(), lowered).unwrap_err();
        assert!(matches!(err, WalError::EntryOverLimit { .. }), "{err}");
        // Nor is a segment of another format version (another release wrote it).
        let good_first = crate::wal::test_files::segment_files(&root.path().join("good")).remove(0);
        let original = std::fs::read(&good_first).unwrap();
        let mut newer = original.clone();
        newer[8..12].copy_from_slice(&(crate::wal::SEGMENT_VERSION + 1).to_le_bytes());
        let crc = crc32c::crc32c(&newer[0..32]);
        newer[32..36].copy_from_slice(&crc.to_le_bytes());
        std::fs::write(&good_first, &newer).unwrap();
        let err = WalStore::open(root.path(), config.clone().damaged_space(DamagedSpace::SetAside)).unwrap_err();
        assert!(
            matches!(err, WalError::UnsupportedVersion { version, .. } if version == crate::wal::SEGMENT_VERSION + 1),
            "{err}"
        );
        std::fs::write(&good_first, &original).unwrap();
        // The set-aside folder is not a space; the new log of `bad` opens as any other, and stays
        // listed, with where it went and why, until its reset is done.
        let store = WalStore::open(root.path(), config.clone()).unwrap();
        assert_eq!(store.spaces().len(), 2);
        let [pending] = store.set_aside() else { panic!("{:?}", store.set_aside()) };
        assert_eq!(pending, &aside);
        store.reset_done(&id("bad")).unwrap();
        store.reset_done(&id("good")).unwrap();
        drop(store);
        assert!(WalStore::open(root.path(), config.clone()).unwrap().set_aside().is_empty());
        // A crash between the move and the new log's creation: the space is still opened, empty.
        let aside = config.damaged_space(DamagedSpace::SetAside);
        let first = crate::wal::test_files::segment_files(&root.path().join("good")).remove(0);
        let mut bytes = std::fs::read(&first).unwrap();
        bytes[60] ^= 0x40;
        std::fs::write(&first, &bytes).unwrap();
        drop(WalStore::open(root.path(), aside.clone()).unwrap());
        std::fs::remove_dir_all(root.path().join("good")).unwrap();
        let store = WalStore::open(root.path(), aside).unwrap();
        assert_eq!(store.set_aside().iter().map(|s| s.space.to_string()).collect::<Vec<_>>(), ["good"]);
        assert_eq!(store.get(&id("good")).map(|w| w.last_seq()), Some(Seq(0)));
    }
}
