//! Group commit: one thread owns the log; every append waiting when it wakes goes out in one
//! write, and under [`FsyncPolicy::Always`] one fdatasync covers all of them.
//!
//! ```text
//! producers ──append(records, done)──▶ bounded queue ──▶ commit thread:
//!                                                        drain queue → one batch write
//!                                                        → fdatasync (Always) → call every `done`
//! ```
//! The queue is bounded (`queue_depth` requests); a full queue makes `append` block, which is
//! the back-pressure a publisher should feel when the disk is the bottleneck.
//!
//! A full disk is not the end: a group that finds no space is not written (the log is put
//! back as it was, see [`Log::append_framed`]) and fails with [`StoreError::NoSpace`], and so
//! does every append queued after it, unwritten, so that nothing reaches the log out of order.
//! The caller keeps those records and hands them back, in order, with
//! [`GroupCommit::retry_framed`], which is written (or fails the same way) and opens the log
//! to appends again.

use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};

use crate::{Log, Offset, StoreError};

/// When appended data is made durable, and so when `done` is called. (Syncing on a timer is
/// the caller's: the server writes inline and runs its own syncer thread for that.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// fdatasync before `done`: survives power loss. Appends waiting together share one sync.
    Always,
    /// `done` once written to the OS; the OS decides when to flush. Survives a process crash.
    Os,
}

/// Called once with the offset of the first record, or the error that stopped the log.
pub type Done = Box<dyn FnOnce(Result<Offset, StoreError>) + Send>;

enum Request {
    /// Records framed as `(length u32 | bytes)*`, and how many.
    Append {
        framed: Bytes,
        count: u64,
        done: Done,
        /// Takes the log out of refusal after [`StoreError::NoSpace`].
        retry: bool,
    },
    /// Delete sealed segments wholly below this offset (after the appends queued before it).
    Reclaim(Offset),
}

/// Counters of the commit thread, for metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CommitStats {
    pub appends: u64,
    pub writes: u64,
    pub syncs: u64,
}

/// Where the commit thread reports how long its work took (the server's metrics); the store
/// itself keeps no clock-based state.
pub trait CommitObserver: Send + Sync {
    /// One group written to the log (before its fsync).
    fn wrote(&self, took: Duration);
    /// One fdatasync of the log.
    fn synced(&self, took: Duration);
}

/// Handle to the commit thread. Dropping it stops the thread after it drains the queue.
pub struct GroupCommit {
    tx: Option<SyncSender<Request>>,
    thread: Option<JoinHandle<(Log, CommitStats)>>,
    disk_bytes: Arc<AtomicU64>,
}

impl GroupCommit {
    /// Starts the commit thread, which takes ownership of `log`.
    pub fn start(
        log: Log,
        policy: FsyncPolicy,
        queue_depth: usize,
    ) -> Result<GroupCommit, StoreError> {
        GroupCommit::start_observed(log, policy, queue_depth, None)
    }

    /// Like [`GroupCommit::start`], reporting each write's and fsync's duration to `observer`.
    pub fn start_observed(
        log: Log,
        policy: FsyncPolicy,
        queue_depth: usize,
        observer: Option<Arc<dyn CommitObserver>>,
    ) -> Result<GroupCommit, StoreError> {
        const NAME: &str = "ferrymq-commit";
        let (tx, rx) = sync_channel(queue_depth.max(1));
        let disk_bytes = Arc::new(AtomicU64::new(log.disk_bytes()));
        let shared = disk_bytes.clone();
        let thread = std::thread::Builder::new()
            .name(NAME.into())
            .spawn(move || run(log, policy, rx, &shared, observer.as_deref()))
            .map_err(|source| StoreError::Thread { name: NAME, source })?;
        Ok(GroupCommit {
            tx: Some(tx),
            thread: Some(thread),
            disk_bytes,
        })
    }

    /// Bytes of segment data on disk, as of the last write or reclaim.
    pub fn disk_bytes(&self) -> u64 {
        self.disk_bytes.load(Relaxed)
    }

    /// Deletes sealed segments whose records are all below `offset`, after every append
    /// queued before this call. Blocks while the queue is full.
    pub fn reclaim_before(&self, offset: Offset) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(Request::Reclaim(offset));
        }
    }

    /// Queues `records` as one unit; `done` runs on the commit thread when they are durable
    /// as the policy says. Blocks while the queue is full.
    pub fn append(&self, records: Vec<Bytes>, done: Done) {
        let mut framed = BytesMut::with_capacity(records.iter().map(|r| 4 + r.len()).sum());
        for r in &records {
            framed.put_u32(r.len() as u32);
            framed.put_slice(r);
        }
        self.append_framed(framed.freeze(), records.len() as u64, done);
    }

    /// Like [`GroupCommit::append`], for records already framed as `(length u32 | bytes)*`
    /// (see [`Log::append_framed`]).
    pub fn append_framed(&self, framed: Bytes, count: u64, done: Done) {
        self.send_append(framed, count, done, false);
    }

    /// After an append failed with [`StoreError::NoSpace`], later ones fail the same way
    /// unwritten until this call: it appends `framed` (the caller's unwritten records, oldest
    /// first) and, whatever comes of it, lets later appends be written again.
    pub fn retry_framed(&self, framed: Bytes, count: u64, done: Done) {
        self.send_append(framed, count, done, true);
    }

    fn send_append(&self, framed: Bytes, count: u64, done: Done, retry: bool) {
        let Some(tx) = &self.tx else {
            done(Err(StoreError::Stopped));
            return;
        };
        if let Err(e) = tx.send(Request::Append {
            framed,
            count,
            done,
            retry,
        }) {
            if let Request::Append { done, .. } = e.0 {
                done(Err(StoreError::Stopped));
            }
        }
    }

    /// Stops the thread once the queue is drained and synced, and returns the log.
    pub fn stop(mut self) -> Option<(Log, CommitStats)> {
        self.tx.take();
        self.thread.take()?.join().ok()
    }
}

impl Drop for GroupCommit {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn run(
    mut log: Log,
    policy: FsyncPolicy,
    rx: Receiver<Request>,
    disk_bytes: &AtomicU64,
    observer: Option<&dyn CommitObserver>,
) -> (Log, CommitStats) {
    let mut stats = CommitStats::default();
    let mut waiting: Vec<(Offset, Done)> = Vec::new();
    let mut scratch: Vec<u8> = Vec::new();
    // An append found the disk full: refuse the rest until the caller retries.
    let mut refusing = false;
    while let Ok(first) = rx.recv() {
        let mut batch: Vec<(Bytes, u64, Done)> = Vec::new();
        let mut reclaim = None;
        // Everything already waiting joins this group, up to a reclaim request, which runs
        // after the group is written and synced.
        let mut next = Some(first);
        while let Some(r) = next.take() {
            match r {
                Request::Append {
                    done, retry: false, ..
                } if refusing => done(Err(StoreError::NoSpace(
                    "not written: an earlier append found the disk full".into(),
                ))),
                Request::Append {
                    framed,
                    count,
                    done,
                    retry,
                } => {
                    refusing &= !retry;
                    batch.push((framed, count, done));
                }
                Request::Reclaim(offset) => {
                    reclaim = Some(offset);
                    break;
                }
            }
            if batch.len() < 4096 {
                next = rx.try_recv().ok();
            }
        }
        // The whole group goes out as one batch: one write, one frame, one checksum.
        stats.appends += batch.len() as u64;
        // One request goes out as is; several are joined into one batch.
        let total: u64 = batch.iter().map(|(_, n, _)| n).sum();
        let started = Instant::now();
        let appended = match batch.as_slice() {
            [] => Ok(log.next()),
            [(framed, count, _)] => log.append_framed(framed, *count),
            _ => {
                scratch.clear();
                for (framed, _, _) in &batch {
                    scratch.extend_from_slice(framed);
                }
                log.append_framed(&scratch, total)
            }
        };
        if let (Some(o), false) = (observer, batch.is_empty()) {
            o.wrote(started.elapsed());
        }
        match appended {
            Ok(base) => {
                let mut next = base.0;
                for (_, n, done) in batch {
                    waiting.push((Offset(next), done));
                    next += n;
                }
            }
            Err(e) if e.is_no_space() => {
                refusing = true;
                let msg = e.to_string();
                for (_, _, done) in batch {
                    done(Err(StoreError::NoSpace(msg.clone())));
                }
            }
            Err(e) => {
                let msg = e.to_string();
                for (_, _, done) in batch {
                    done(Err(StoreError::SyncFailed(msg.clone())));
                }
            }
        }
        if !waiting.is_empty() {
            stats.writes += 1;
        }
        if policy == FsyncPolicy::Always && !waiting.is_empty() {
            let started = Instant::now();
            let synced = log.sync();
            if let Some(o) = observer {
                o.synced(started.elapsed());
            }
            stats.syncs += 1;
            if let Err(e) = synced {
                // Nothing in this group is durable: say so to every waiter.
                let msg = e.to_string();
                for (_, done) in waiting.drain(..) {
                    done(Err(StoreError::SyncFailed(msg.clone())));
                }
                continue;
            }
        }
        for (offset, done) in waiting.drain(..) {
            done(Ok(offset));
        }
        if let Some(offset) = reclaim {
            if let Err(e) = log.reclaim_before(offset) {
                tracing_free_warn(&e);
            }
        }
        disk_bytes.store(log.disk_bytes(), Relaxed);
    }
    let _ = log.sync();
    (log, stats)
}

/// A failed reclaim leaves files behind (disk use, not data, is at stake); the next reclaim
/// retries. The store has no logging dependency, so it goes to stderr.
fn tracing_free_warn(e: &StoreError) {
    eprintln!("ferrymq-store: reclaiming segments failed: {e}");
}
