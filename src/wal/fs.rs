//! File-system primitives of the log: positional I/O (no shared file cursor, so readers and the writer
//! never race on it), folder fsync, and crash-safe segment creation.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::Path;

use super::error::{IoContext, WalError};
use super::segment::SegmentHeader;

/// Reads exactly `buf.len()` bytes at `offset`.
pub(crate) fn read_exact_at(file: &File, buf: &mut [u8], offset: u64) -> io::Result<()> {
    #[cfg(unix)]
    {
        std::os::unix::fs::FileExt::read_exact_at(file, buf, offset)
    }
    #[cfg(windows)]
    {
        let mut done = 0;
        while done < buf.len() {
            match std::os::windows::fs::FileExt::seek_read(file, &mut buf[done..], offset + done as u64) {
                Ok(0) => return Err(io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// How long [`lock_folder`] waits for another holder to let go: a `Primary` or `Replica` just
/// dropped closes its logs a moment later (its tasks are aborted asynchronously).
const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(1);

/// Takes an exclusive advisory lock (`flock`) on a folder (a store's root, or a space's) for as
/// long as the returned handle is open. Two opens of one folder, in this process or another,
/// would write over each other's records: the second waits up to [`LOCK_WAIT`], then fails with
/// [`WalError::InUse`].
pub(crate) fn lock_folder(dir: &Path, what: &'static str) -> Result<File, WalError> {
    let folder = File::open(dir).ctx("open folder", dir)?;
    #[cfg(unix)]
    {
        use std::os::fd::AsRawFd;
        let deadline = std::time::Instant::now() + LOCK_WAIT;
        loop {
            // SAFETY: the descriptor is open for the lifetime of `folder`; the call reads no memory of ours.
            if unsafe { libc::flock(folder.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                break;
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => {}
                _ => return Err(WalError::io("lock folder", dir, e)),
            }
            if std::time::Instant::now() >= deadline {
                return Err(WalError::InUse { what, path: dir.to_path_buf() });
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
    }
    Ok(folder)
}

/// Asks the kernel to start writing `offset..offset + len` of `file` to disk without waiting for it
/// (Linux `sync_file_range(SYNC_FILE_RANGE_WRITE)`; elsewhere nothing). Advisory: durability still
/// comes from fsync, which then finds less to write. Errors are left for that fsync to report.
pub(crate) fn start_writeback(file: &File, offset: u64, len: u64) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let (Ok(offset), Ok(len)) = (i64::try_from(offset), i64::try_from(len)) else { return };
        // SAFETY: the descriptor is open for the lifetime of `file`; the call reads no memory of ours.
        unsafe {
            libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE);
        }
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = (file, offset, len);
    }
}

/// Most buffers one `pwritev` takes (Linux's `IOV_MAX`); longer lists take several calls.
#[cfg(unix)]
const MAX_IOVECS: usize = 1024;

/// Writes `parts`, in order, at `offset` as if they were one buffer: one `pwritev` per
/// [`MAX_IOVECS`] parts on Unix, so that large payloads go from their own buffers to the page
/// cache without first being copied into a record buffer.
pub(crate) fn write_all_vectored_at(file: &File, parts: &[&[u8]], offset: u64) -> io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::fd::AsRawFd;
        // Empty parts are left out: a call with only those would be a 0-byte write.
        let mut iov: Vec<libc::iovec> = parts
            .iter()
            .filter(|p| !p.is_empty())
            .map(|p| libc::iovec { iov_base: p.as_ptr().cast_mut().cast(), iov_len: p.len() })
            .collect();
        let (mut first, mut offset) = (0, offset);
        while first < iov.len() {
            let count = (iov.len() - first).min(MAX_IOVECS);
            let at = libc::off_t::try_from(offset)
                .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "file offset out of range"))?;
            // SAFETY: each iovec points into a slice of `parts`, borrowed for this whole function
            // and only read by the call; the descriptor is open for `file`'s lifetime.
            let n = unsafe { libc::pwritev(file.as_raw_fd(), iov[first..].as_ptr(), count as libc::c_int, at) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            offset += n as u64;
            // Skips what was written: whole parts, then the written front of a part cut short.
            let mut left = n as usize;
            while left > 0 {
                let part = &mut iov[first];
                if left >= part.iov_len {
                    left -= part.iov_len;
                    first += 1;
                } else {
                    part.iov_base = part.iov_base.cast::<u8>().wrapping_add(left).cast();
                    part.iov_len -= left;
                    left = 0;
                }
            }
        }
        Ok(())
    }
    #[cfg(not(unix))]
    {
        write_all_at(file, &parts.concat(), offset)
    }
}

/// Writes all of `buf` at `offset` (one `pwrite` for a regular file unless the OS splits it).
pub(crate) fn write_all_at(file: &File, buf: &[u8], offset: u64) -> io::Result<()> {
    #[cfg(unix)]
    {
        std::os::unix::fs::FileExt::write_all_at(file, buf, offset)
    }
    #[cfg(windows)]
    {
        let mut done = 0;
        while done < buf.len() {
            match std::os::windows::fs::FileExt::seek_write(file, &buf[done..], offset + done as u64) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => done += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// Makes creations, renames and deletions in `dir` durable (a no-op where folders cannot be fsynced).
pub(crate) fn sync_dir(dir: &Path) -> Result<(), WalError> {
    #[cfg(unix)]
    {
        File::open(dir).and_then(|d| d.sync_all()).ctx("fsync folder", dir)
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(())
    }
}

/// What [`read_small`] found.
pub(crate) enum SmallFile {
    /// No file there.
    Missing,
    /// Not a regular file, or larger than allowed: damaged, left unread. Says which.
    Damaged(String),
    /// Its bytes.
    Bytes(Vec<u8>),
}

/// Reads a small file of the node's own (kept with [`write_durably`]), reading no more than
/// `max` bytes whatever its size says. `what` names the operation in errors ("read the epoch
/// fence").
pub(crate) fn read_small(path: &Path, max: u64, what: &'static str) -> Result<SmallFile, WalError> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(SmallFile::Missing),
        Err(e) => return Err(WalError::io(what, path, e)),
    };
    let meta = file.metadata().ctx(what, path)?;
    if !meta.is_file() {
        return Ok(SmallFile::Damaged("not a regular file".into()));
    }
    if meta.len() > max {
        return Ok(SmallFile::Damaged(format!("{} bytes, more than {max}", meta.len())));
    }
    // It may grow while read: no more than `max` is taken all the same.
    let mut bytes = Vec::new();
    io::Read::read_to_end(&mut io::Read::take(file, max + 1), &mut bytes).ctx(what, path)?;
    if bytes.len() as u64 > max {
        return Ok(SmallFile::Damaged(format!("more than {max} bytes")));
    }
    Ok(SmallFile::Bytes(bytes))
}

/// Replaces `path` (in folder `dir`) with `bytes`, durably and at once: written to `<path>.tmp`,
/// fsynced, renamed over `path`, folder fsynced. A crash leaves the old version or the new one.
/// `what` names the operation in errors ("keep the epoch fence in").
pub(crate) fn write_durably(dir: &Path, path: &Path, bytes: &[u8], what: &'static str) -> Result<(), WalError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = Path::new(&tmp);
    File::create(tmp)
        .and_then(|mut f| std::io::Write::write_all(&mut f, bytes).and_then(|()| f.sync_all()))
        .ctx(what, tmp)?;
    std::fs::rename(tmp, path).ctx(what, path)?;
    sync_dir(dir)
}

/// Opens an existing segment for reading and writing.
pub(crate) fn open_rw(path: &Path) -> Result<File, WalError> {
    OpenOptions::new().read(true).write(true).open(path).ctx("open segment", path)
}

/// Creates the segment file `path` holding only `header`.
///
/// The header is written to `<name>.tmp` and renamed into place, so a crash never leaves a segment
/// with a half-written header under its real name (a leftover `.tmp` is deleted by recovery).
/// With `durable`, the file and the folder are fsynced before returning.
pub(crate) fn create_segment(dir: &Path, path: &Path, header: &SegmentHeader, durable: bool) -> Result<File, WalError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = Path::new(&tmp);
    let file =
        OpenOptions::new().read(true).write(true).create(true).truncate(true).open(tmp).ctx("create segment", tmp)?;
    write_all_at(&file, &header.encode(), 0).ctx("write segment header", tmp)?;
    if durable {
        file.sync_all().ctx("fsync new segment", tmp)?;
    }
    std::fs::rename(tmp, path).ctx("rename new segment into place", path)?;
    if durable {
        sync_dir(dir)?;
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::entry::LogDigest;
    use crate::types::Seq;

    #[test]
    fn positional_io_and_creation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("00000000000000000005.wal");
        let h = SegmentHeader { first_seq: Seq(5), base_digest: LogDigest(9) };
        let f = create_segment(dir.path(), &path, &h, true).unwrap();
        assert!(!dir.path().join("00000000000000000005.wal.tmp").exists());
        write_all_at(&f, b"hello", 40).unwrap();
        let mut b = [0u8; 40];
        read_exact_at(&File::open(&path).unwrap(), &mut b, 0).unwrap();
        assert_eq!(SegmentHeader::decode(&b), Ok(h));
        let mut h5 = [0u8; 5];
        read_exact_at(&f, &mut h5, 40).unwrap();
        assert_eq!(&h5, b"hello");
        assert!(read_exact_at(&f, &mut h5, 42).is_err(), "reading past the end fails");
    }

    /// More parts than one `pwritev` takes, empty ones among them (first, between, last), land
    /// in order as one buffer would.
    #[test]
    fn vectored_writes_land_as_one_buffer() {
        let dir = tempfile::tempdir().unwrap();
        let f = OpenOptions::new().read(true).write(true).create_new(true).open(dir.path().join("v")).unwrap();
        let owned: Vec<Vec<u8>> = (0..2500u32)
            .map(|i| if i % 7 == 0 { Vec::new() } else { vec![(i % 251) as u8; (i % 13) as usize] })
            .collect();
        let expected: Vec<u8> = owned.concat();
        let parts: Vec<&[u8]> = owned.iter().map(Vec::as_slice).collect();
        write_all_vectored_at(&f, &parts, 3).unwrap();
        let mut back = vec![0u8; expected.len()];
        read_exact_at(&f, &mut back, 3).unwrap();
        assert_eq!(back, expected);
        assert_eq!(f.metadata().unwrap().len(), 3 + expected.len() as u64);

        write_all_vectored_at(&f, &[&[], &[]], 0).unwrap();
        assert_eq!(f.metadata().unwrap().len(), 3 + expected.len() as u64, "nothing to write, nothing written");
    }
}
