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
    /// write, and is not repaired silently.
    #[error("corrupt batch in {path} at byte {position}: {reason}")]
    Corrupt {
        path: PathBuf,
        position: u64,
        reason: &'static str,
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
    /// An offset outside the log was asked for.
    #[error("offset {0} is not in the log")]
    OffsetOutOfRange(u64),
}

pub(crate) fn io(
    op: &'static str,
    path: &std::path::Path,
) -> impl FnOnce(std::io::Error) -> StoreError {
    let path = path.to_path_buf();
    move |source| StoreError::Io { op, path, source }
}
