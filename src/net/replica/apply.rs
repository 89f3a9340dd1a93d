//! Applying durable entries: the [`ApplyHook`] an embedding server implements, and one applier
//! task per space that hands it every entry once, in order, across reconnects, panics and cuts.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::{Shared, SpaceState};
use crate::entry::Entry;
use crate::net::{lock, read_entries};
use crate::types::{Seq, SpaceId};
use crate::wal::SyncPolicy;

/// Called with every run of entries a replica has made durable, in order, per space. The entries
/// count as applied once the returned future completes; a slow hook holds back only its own space.
///
/// Each space has one applier task, owned by the [`Replica`](super::Replica) (not by a
/// connection), that reads durable entries from the replica's WAL from `applied + 1` on:
/// reconnects, catch-ups and resent batches never skip or repeat an entry while the replica runs.
/// At start, `applied` is the WAL's last sequence: the embedding server rebuilds its state from its
/// own copy of the log (replaying `Replica::space(id)` from its checkpoint) before the hook takes
/// over.
///
/// A hook that panics does not stop its space for good: the space's status shows the panic
/// ([`ReplicaSpace::error`](crate::net::status::ReplicaSpace::error)) and, a second later, the
/// same entries (from `applied + 1`) come again. A hook that can panic partway through a call must
/// tolerate that repeat. If the log is cut back under entries of the call that panicked, the hook
/// hears of it through [`ApplyHook::truncated`] first, as for entries it applied.
pub trait ApplyHook: Send + Sync + 'static {
    /// Applies `entries` (contiguous, in order) of `space`.
    fn apply<'a>(&'a self, space: &'a SpaceId, entries: &'a [Entry]) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>>;

    /// The replica's log of `space` was cut back to `after` (`SpaceWal::truncate_suffix`, the
    /// repair of a diverged space) while entries past it had been handed to the hook (applied, or
    /// in a call that panicked): roll the state back to `after` (rebuild it from a checkpoint,
    /// replaying the log up to `after`). Once this returns, the state counts as the log up to
    /// `after`, entries the hook had not applied yet included: only the entries past `after`
    /// come to [`ApplyHook::apply`] from then on, the new ones at the old sequences included. The default
    /// does nothing, which is right only for a server that never truncates a running replica's
    /// spaces.
    ///
    /// Also called with `after = Seq(0)` for a space whose log was found damaged at start and set
    /// aside ([`crate::wal::DamagedSpace::SetAside`], a replica's default): just before the first
    /// entry fetched again from the primary is applied, after which every entry comes from 1. Not
    /// before that (a primary whose retention removed entry 1 cannot refill the space, and the
    /// state is better kept), and again after a restart until it was told.
    fn truncated<'a>(&'a self, space: &'a SpaceId, after: Seq) -> Pin<Box<dyn Future<Output = ()> + Send + 'a>> {
        let _ = (space, after);
        Box::pin(async {})
    }
}

/// After a suffix truncation of the space's log (the `truncations` count moved), rolls what was
/// applied back to the cut if the hook was handed entries past it (applied, or in a call that
/// panicked partway), telling the hook ([`ApplyHook::truncated`]): the log holds other entries
/// there now. True if there was a truncation to take in.
async fn roll_back_if_cut(
    shared: &Shared,
    hook: &dyn ApplyHook,
    state: &Arc<SpaceState>,
    truncations: &mut u64,
) -> bool {
    let now = state.wal.truncations();
    if now == *truncations {
        return false;
    }
    if let Some(cut) = state.wal.cut_since(*truncations) {
        if Seq(state.handed.load(Ordering::Acquire)) > cut {
            tracing::warn!(space = %state.wal.space(), %cut, "log cut back under entries the hook was handed; the hook rolls back");
            hook.truncated(state.wal.space(), cut).await;
            // The hook's state is now the log up to the cut (`ApplyHook::truncated`).
            state.applied.store(cut.0, Ordering::Release);
            state.handed.store(cut.0, Ordering::Release);
            shared.ack_later(state);
        }
    }
    *truncations = now;
    // A restarted applier (after a panicking hook) starts from here.
    state.truncations_seen.store(now, Ordering::Release);
    true
}

/// Runs one applier per space (the hook's caller), for the replica's whole life.
pub(super) async fn run_appliers(
    shared: Arc<Shared>,
    hook: Arc<dyn ApplyHook>,
    mut rx: mpsc::UnboundedReceiver<Arc<SpaceState>>,
) {
    let mut appliers = JoinSet::new();
    let mut by_task: HashMap<tokio::task::Id, Arc<SpaceState>> = HashMap::new();
    loop {
        tokio::select! {
            state = rx.recv() => {
                let Some(state) = state else { return };
                let task = appliers.spawn(apply_space(shared.clone(), hook.clone(), state.clone(), false));
                by_task.insert(task.id(), state);
            }
            Some(joined) = appliers.join_next_with_id(), if !appliers.is_empty() => {
                let (id, failure) = match joined {
                    Ok((id, ())) => (id, None),
                    Err(e) => (e.id(), e.is_panic().then_some(e)),
                };
                let Some(state) = by_task.remove(&id) else { continue };
                // An applier that ended otherwise (its log closed) has nothing left to apply.
                let Some(e) = failure else { continue };
                // Its hook panicked: say so, and apply the same entries again after a pause
                // rather than leave the space unapplied for ever.
                let from = Seq(state.applied.load(Ordering::Acquire)).next();
                let msg = format!("{APPLY_FAILED} ({e}); applying again from {from} in {APPLY_RETRY:?}");
                tracing::error!(space = %state.wal.space(), "{msg}");
                *lock(&state.error) = Some(msg);
                let (shared, hook, again) = (shared.clone(), hook.clone(), state.clone());
                let task = appliers.spawn(async move {
                    tokio::time::sleep(APPLY_RETRY).await;
                    apply_space(shared, hook, again, true).await
                });
                by_task.insert(task.id(), state);
            }
        }
    }
}

/// How a space's status error starts while its hook is failing (cleared by the next success).
const APPLY_FAILED: &str = "apply hook panicked";
/// Pause before a space whose hook panicked is applied again.
const APPLY_RETRY: Duration = Duration::from_secs(1);
/// Most entries handed to the hook in one call.
const APPLY_BATCH_ENTRIES: usize = 4096;
/// Most entry bytes handed to the hook in one call.
const APPLY_BATCH_BYTES: usize = 4 * 1024 * 1024;

/// Hands a space's durable entries to the hook, in order, each exactly once, from `applied + 1`.
/// `after_panic`: the previous applier's hook panicked, and the space's error says so until a
/// call succeeds.
async fn apply_space(shared: Arc<Shared>, hook: Arc<dyn ApplyHook>, state: Arc<SpaceState>, mut after_panic: bool) {
    let wal = state.wal.clone();
    // Only a policy that lags durability needs to watch it (a receiver costs every append a wake).
    let mut durable_rx = (!matches!(shared.config.wal.sync, SyncPolicy::Never)).then(|| wal.subscribe_durable());
    let mut truncations = state.truncations_seen.load(Ordering::Acquire);
    loop {
        if roll_back_if_cut(&shared, hook.as_ref(), &state, &mut truncations).await {
            continue;
        }
        let applied = Seq(state.applied.load(Ordering::Acquire));
        let next = applied.next();
        // Both waits also end on a suffix truncation: `wait_for_or_cut` on any since the last look,
        // and the durable one because the position then drops below what was applied (it never
        // does otherwise).
        wal.wait_for_or_cut(next, Some(truncations)).await;
        if let Some(rx) = durable_rx.as_mut() {
            if rx.wait_for(|d| *d >= next || *d < applied).await.is_err() {
                return;
            }
        }
        // Only durable entries are applied: read no further than them.
        let durable = wal.durable_seq();
        let want = APPLY_BATCH_ENTRIES.min(durable.0.saturating_sub(next.0).saturating_add(1) as usize);
        let read = read_entries(&wal, next, want, APPLY_BATCH_BYTES).await;
        // A truncation during the read may have mixed old and new entries: read again.
        if roll_back_if_cut(&shared, hook.as_ref(), &state, &mut truncations).await {
            continue;
        }
        let mut entries = match read {
            Ok(v) => v,
            Err(e) => {
                tracing::error!(space = %wal.space(), error = %e, "cannot read entries to apply; retrying");
                *lock(&state.error) = Some(format!("apply: {e}"));
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        // A read returns at least one entry, which may be past `durable` if that lags the wake-up.
        entries.retain(|e| e.seq <= durable);
        let Some(last) = entries.last().map(|e| e.seq) else { continue };
        if state.reset_pending.load(Ordering::Acquire) {
            // The log was set aside as damaged and is being fetched again from 1: the state built
            // from the old one starts from nothing first. Only now, so that a primary that can no
            // longer send entry 1 (retention) leaves that state as it was.
            hook.truncated(wal.space(), Seq::ZERO).await;
            let (store, space) = (shared.store.clone(), wal.space().clone());
            let done = tokio::task::spawn_blocking(move || store.reset_done(&space)).await;
            if let Err(e) = done.map_err(|e| e.to_string()).and_then(|r| r.map_err(|e| e.to_string())) {
                tracing::warn!(space = %wal.space(), error = %e, "cannot clear the set-aside marker; the hook will be told to reset again after a restart");
            }
            state.reset_pending.store(false, Ordering::Release);
        }
        state.handed.fetch_max(last.0, Ordering::AcqRel);
        hook.apply(wal.space(), &entries).await;
        state.applied.store(last.0, Ordering::Release);
        if after_panic {
            let mut error = lock(&state.error);
            if error.as_deref().is_some_and(|e| e.starts_with(APPLY_FAILED)) {
                *error = None;
            }
            after_panic = false;
        }
        shared.ack_later(&state);
    }
}
