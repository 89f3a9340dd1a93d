//! The epoch fence kept on disk: the newest primary epoch this replica accepted, in
//! `<data_dir>/epoch+fence`. The logs' last epochs give it too, but not always: a space set
//! aside as damaged takes its entries away, and a primary's epoch is accepted before any entry of
//! it arrives. A deposed primary must stay refused across restarts all the same.

use std::path::Path;
use std::sync::{Mutex, PoisonError};

use crate::types::Epoch;
use crate::wal::fs::write_durably;
use crate::wal::WalError;

/// One writer at a time in this process, so that two handshakes at once (a replica that dials
/// and listens) never leave the older epoch on disk.
static WRITING: Mutex<()> = Mutex::new(());

/// The file, in the WAL root; `+` keeps it apart from any space id (a space's folder has its id for name).
const FILE: &str = "epoch+fence";

/// The epoch kept in `dir`; 0 if none was kept (or the file is unreadable, which is logged).
pub(super) fn read(dir: &Path) -> Epoch {
    let path = dir.join(FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => match text.trim().parse() {
            Ok(epoch) => Epoch(epoch),
            Err(_) => {
                tracing::warn!(file = %path.display(), "unreadable epoch fence; the logs' epochs alone fence deposed primaries");
                Epoch(0)
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Epoch(0),
        Err(e) => {
            tracing::warn!(file = %path.display(), error = %e, "cannot read the epoch fence; the logs' epochs alone fence deposed primaries");
            Epoch(0)
        }
    }
}

/// Raises the kept epoch to `epoch` if it is below, durably; never lowers it.
pub(super) fn raise(dir: &Path, epoch: Epoch) -> Result<(), WalError> {
    let _one = WRITING.lock().unwrap_or_else(PoisonError::into_inner);
    if read(dir) >= epoch {
        return Ok(());
    }
    write_durably(dir, &dir.join(FILE), format!("{}\n", epoch.0).as_bytes(), "keep the epoch fence in")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_epochs_read_back_and_anything_else_reads_zero() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(read(dir.path()), Epoch(0), "none kept");
        raise(dir.path(), Epoch(7)).unwrap();
        assert_eq!(read(dir.path()), Epoch(7));
        raise(dir.path(), Epoch(9)).unwrap();
        assert_eq!(read(dir.path()), Epoch(9));
        raise(dir.path(), Epoch(8)).unwrap();
        assert_eq!(read(dir.path()), Epoch(9), "never lowered");
        raise(dir.path(), Epoch(11)).unwrap();
        assert_eq!(read(dir.path()), Epoch(11));
        std::fs::write(dir.path().join(FILE), b"garbage").unwrap();
        assert_eq!(read(dir.path()), Epoch(0));
        // A folder where the file goes: an error that says where.
        std::fs::create_dir(dir.path().join(format!("{FILE}.tmp"))).unwrap();
        let err = raise(dir.path(), Epoch(12)).unwrap_err();
        assert!(err.to_string().contains("epoch fence"), "{err}");
    }
}
