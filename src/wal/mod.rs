//! The write-ahead log: one segmented, crash-recoverable log per space, with a memory tail for live
//! shipping and a sparse index for catch-up. Synchronous code; no networking.
//!
//! On disk: `<root>/<space-id>/<first-seq, 20 digits>.wal` segment files, each a fixed header followed by
//! contiguous records. The byte layout, the recovery rules and the durability policies are specified in
//! `docs/WAL.md`.
//!
//! - [`SpaceWal`] (`space.rs`): append (primary and replica), read, retention, suffix truncation, durability.
//! - [`WalStore`] (`store.rs`): a root folder with one log per space.
//! - [`WalConfig`], [`SyncPolicy`] (`config.rs`); [`WalError`] (`error.rs`).
//! - `segment.rs`: names, header and record format; `scan.rs`: reading records back; `recovery.rs`:
//!   rebuilding state on open; `index.rs`: sparse seq -> offset index; `read.rs`: disk reads for catch-up; `tail.rs`: memory tail;
//!   `durability.rs`: group commit; `syncer.rs`: the Interval fsync thread; `fs.rs`: positional file I/O.

mod config;
mod durability;
mod error;
pub(crate) mod fs;
mod index;
mod read;
mod recovery;
mod scan;
mod segment;
mod space;
mod store;
mod syncer;
mod tail;
#[cfg(test)]
mod test_files;

pub use config::{DamagedSpace, RecoveryMode, SyncPolicy, WalConfig};
pub use error::WalError;
pub use segment::{
    parse_segment_name, segment_file_name, RECORD_HEADER_LEN, SEGMENT_HEADER_LEN, SEGMENT_MAGIC, SEGMENT_VERSION,
};
pub use space::{ReplicatedAppend, SpaceWal};
pub use store::{SetAsideSpace, WalStore};
