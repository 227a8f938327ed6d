//! FerryMQ's durable log: an append-only sequence of opaque records, each with a logical
//! [`Offset`], stored in segment files of bounded size.
//!
//! Owns: the on-disk format, recovery after a crash, the sparse index, reclaiming segments,
//! and reading records back by offset beside a live writer ([`LogReader`]). Must not depend
//! on: MQTT, sockets, the engine. Records are bytes to it. Durability policy
//! (group commit, intervals) is the caller's: the log offers `append` and `sync`, and says
//! what each guarantees.
//!
//! On-disk format (a `DataChange:` commit must accompany any change to it):
//! ```text
//! segment file  {base offset:020}.log  = batch*
//! batch         = magic 0xFB | version 1 | flags u16 (0) | body length u32
//!                 | crc32c(first 8 header bytes, then body) u32 | body
//! body          = base offset u64 | record count u32 | (record length u32 | record bytes)*
//! ```
//! All integers are big-endian. Invariants a change must keep:
//! - Offsets are dense: each batch starts where the previous one ended.
//! - A batch is valid only if its header, length and CRC all check.
//! - Opening the log cuts a torn tail: a last batch of the newest segment that is incomplete
//!   or does not check, with no valid batch after it (a write cut short by a crash). A bad
//!   batch with a valid one after it, or any bad batch in a sealed segment, is damage: opening
//!   fails naming the file and byte, nothing is cut, and [`recover`] keeps every valid batch
//!   in a new log and moves the original aside.
//! - Snapshot files (`snapshot.rs`) sit beside the segments: records a checkpoint keeps out
//!   of the log, each file whole or absent.
//! - The sparse index (first offset of a batch → file position, every 64 KiB) is an
//!   optimisation only, built while scanning or appending; it is not yet stored on disk.

mod commit;
mod error;
mod log;
mod reader;
mod recover;
mod segment;
mod snapshot;

pub use commit::{CommitObserver, CommitStats, Done, FsyncPolicy, GroupCommit};
pub use error::StoreError;
pub use log::{Log, LogConfig, Recovery, Released, TornTail};
pub use reader::{LogReader, ReaderStats};
pub use recover::{recover, Kept, RecoverReport, Skipped};
pub use snapshot::{
    list_snapshots, read_snapshot, remove_snapshots, snapshot_path, SnapshotWriter,
};

/// A record's position in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Offset(pub u64);
