//! Errors of the store.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// An I/O call failed; `path` is the file or directory involved.
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// A sealed (not the last) segment holds a bad batch: that is corruption, not a torn
    /// write, and is not repaired silently. [`crate::LogReader`] also answers this for a
    /// complete batch that does not check in any segment, and for a sealed segment that ends
    /// before the next one begins.
    #[error("corrupt batch in {path} at byte {position}: {reason}")]
    Corrupt {
        path: PathBuf,
        position: u64,
        reason: &'static str,
    },
    /// The newest segment holds a bad batch with a valid batch after it. A torn write only
    /// ever damages the last batch, so this is damage: nothing is cut, and the log does not
    /// open until [`crate::recover`] has set it aside and kept every valid batch.
    #[error(
        "damaged batch in {path} at byte {position} ({reason}); a valid batch follows at byte \
         {next_valid}, so this is damage, not a torn write, and nothing was cut"
    )]
    Damaged {
        path: PathBuf,
        /// Where the bad batch starts.
        position: u64,
        reason: &'static str,
        /// Where the next batch that checks starts.
        next_valid: u64,
    },
    /// A `recover` was interrupted between moving the damaged log aside and putting the new
    /// one in its place: `path` holds the new log, complete. Running `recover` again finishes.
    #[error("an interrupted recovery left {path}: run the recovery again to finish it")]
    RecoverInterrupted { path: PathBuf },
    /// A thread could not be started.
    #[error("cannot start thread {name}: {source}")]
    Thread {
        name: &'static str,
        source: std::io::Error,
    },
    /// A record or batch is larger than the format or the segment size allows.
    #[error("batch of {size} bytes exceeds the limit of {max}")]
    TooLarge { size: u64, max: u64 },
    /// Framed records handed to `append_framed` do not parse as `count` records.
    #[error("framed records do not hold the {0} records claimed")]
    BadFraming(u64),
    /// The commit thread has stopped; nothing more can be appended.
    #[error("the log's commit thread has stopped")]
    Stopped,
    /// fdatasync failed: the records of that group are not durable.
    #[error("fsync failed: {0}")]
    SyncFailed(String),
    /// The disk is full: the records were not written (a partial write was cut off again),
    /// and the log is as it was before the append. Appending them again later is safe. The
    /// commit thread also gives this to every append queued behind one that found the disk
    /// full, until a [`crate::GroupCommit::retry_framed`], so that nothing is written out of
    /// order.
    #[error("no space left on the log's disk: {0}")]
    NoSpace(String),
    /// An offset outside the log was asked for.
    #[error("offset {0} is not in the log")]
    OffsetOutOfRange(u64),
}

impl StoreError {
    /// Whether the append failed only for want of disk space ([`StoreError::NoSpace`], or an
    /// I/O error that is ENOSPC or EDQUOT): the log is unchanged and the append can be
    /// retried once space returns. Every other error leaves the log in doubt.
    pub fn is_no_space(&self) -> bool {
        match self {
            StoreError::NoSpace(_) => true,
            StoreError::Io { source, .. } => is_no_space(source),
            _ => false,
        }
    }
}

fn is_no_space(e: &std::io::Error) -> bool {
    /// ENOSPC and EDQUOT on Linux.
    const ENOSPC: i32 = 28;
    const EDQUOT: i32 = 122;
    e.kind() == std::io::ErrorKind::StorageFull
        || e.kind() == std::io::ErrorKind::QuotaExceeded
        || matches!(e.raw_os_error(), Some(ENOSPC | EDQUOT))
}

pub(crate) fn io(
    op: &'static str,
    path: &std::path::Path,
) -> impl FnOnce(std::io::Error) -> StoreError {
    let path = path.to_path_buf();
    move |source| StoreError::Io { op, path, source }
}
