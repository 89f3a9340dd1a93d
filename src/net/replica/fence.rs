//! The epoch fence kept on disk: the newest primary epoch this replica accepted, in
//! `<data_dir>/epoch+fence`. The logs' last epochs give it too, but not always: a space set
//! aside as damaged takes its entries away, and a primary's epoch is accepted before any entry of
//! it arrives. A deposed primary must stay refused across restarts all the same.

use std::path::Path;
use std::sync::{Mutex, PoisonError};

use crate::net::error::NetError;
use crate::types::Epoch;
use crate::wal::fs::{read_small, write_durably, SmallFile};

/// One writer at a time in this process, so that two handshakes at once (a replica that dials
/// and listens) never leave the older epoch on disk.
static WRITING: Mutex<()> = Mutex::new(());

/// The file, in the WAL root; `+` keeps it apart from any space id (a space's folder has its id for name).
const FILE: &str = "epoch+fence";

/// Longest file [`read`] takes: a decimal `u64` and a newline, with room to spare.
const MAX_FILE_BYTES: u64 = 64;

/// The epoch kept in `dir`; 0 if none was kept. A file that cannot be read, or holds anything but
/// an epoch, is an error: taking it for 0 would let [`raise`] write a lower epoch over it.
pub(super) fn read(dir: &Path) -> Result<Epoch, NetError> {
    let path = dir.join(FILE);
    let bytes = match read_small(&path, MAX_FILE_BYTES, "read the epoch fence")? {
        SmallFile::Missing => return Ok(Epoch(0)),
        SmallFile::Damaged(reason) => return Err(NetError::EpochFence { path, reason }),
        SmallFile::Bytes(bytes) => bytes,
    };
    match std::str::from_utf8(&bytes).ok().map(|text| text.trim().parse()) {
        Some(Ok(epoch)) => Ok(Epoch(epoch)),
        _ => {
            let shown = String::from_utf8_lossy(&bytes[..bytes.len().min(24)]).into_owned();
            Err(NetError::EpochFence { path, reason: format!("{shown:?} is not an epoch") })
        }
    }
}

/// Raises the kept epoch to `epoch` if it is below, durably; never lowers it.
pub(super) fn raise(dir: &Path, epoch: Epoch) -> Result<(), NetError> {
    let _one = WRITING.lock().unwrap_or_else(PoisonError::into_inner);
    if read(dir)? >= epoch {
        return Ok(());
    }
    Ok(write_durably(dir, &dir.join(FILE), format!("{}\n", epoch.0).as_bytes(), "keep the epoch fence in")?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kept_epochs_read_back_and_are_never_lowered() {
        let dir = tempfile::tempdir().unwrap();
        let read = |dir: &Path| super::read(dir).unwrap();
        assert_eq!(read(dir.path()), Epoch(0), "none kept");
        raise(dir.path(), Epoch(7)).unwrap();
        assert_eq!(read(dir.path()), Epoch(7));
        raise(dir.path(), Epoch(9)).unwrap();
        assert_eq!(read(dir.path()), Epoch(9));
        raise(dir.path(), Epoch(8)).unwrap();
        assert_eq!(read(dir.path()), Epoch(9), "never lowered");
        raise(dir.path(), Epoch(11)).unwrap();
        assert_eq!(read(dir.path()), Epoch(11));

        // A damaged fence is an error, and is not written over with a lower epoch.
        for damage in [&b"garbage"[..], b"", &[b'7'; 100][..], &[0xff, b'7'][..]] {
            std::fs::write(dir.path().join(FILE), damage).unwrap();
            let err = super::read(dir.path()).unwrap_err();
            assert!(matches!(err, NetError::EpochFence { .. }), "{err}");
            assert!(err.to_string().contains("remove it"), "{err}");
            assert!(raise(dir.path(), Epoch(3)).is_err());
            assert_eq!(std::fs::read(dir.path().join(FILE)).unwrap(), damage);
        }
        // Not a file (a folder in its place): damaged, saying where.
        std::fs::remove_file(dir.path().join(FILE)).unwrap();
        std::fs::create_dir(dir.path().join(FILE)).unwrap();
        let err = super::read(dir.path()).unwrap_err();
        assert!(err.to_string().contains("epoch fence"), "{err}");
        std::fs::remove_dir(dir.path().join(FILE)).unwrap();

        // A folder where the file goes: an error that says where.
        std::fs::create_dir(dir.path().join(format!("{FILE}.tmp"))).unwrap();
        let err = raise(dir.path(), Epoch(12)).unwrap_err();
        assert!(err.to_string().contains("epoch fence"), "{err}");
    }
}
