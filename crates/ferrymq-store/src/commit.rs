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

use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::{Log, Offset, StoreError};

/// When appended data is made durable, and so when `done` is called.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// fdatasync before `done`: survives power loss. Appends waiting together share one sync.
    Always,
    /// `done` once written to the OS; fdatasync at most this many milliseconds later. Survives
    /// a process crash at once, a power loss after the interval.
    IntervalMs(u64),
    /// `done` once written to the OS; the OS decides when to flush. Survives a process crash.
    Os,
}

/// Called once with the offset of the first record, or the error that stopped the log.
pub type Done = Box<dyn FnOnce(Result<Offset, StoreError>) + Send>;

struct Request {
    records: Vec<Bytes>,
    done: Done,
}

/// Counters of the commit thread, for metrics.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CommitStats {
    pub appends: u64,
    pub writes: u64,
    pub syncs: u64,
}

/// Handle to the commit thread. Dropping it stops the thread after it drains the queue.
pub struct GroupCommit {
    tx: Option<SyncSender<Request>>,
    thread: Option<JoinHandle<(Log, CommitStats)>>,
}

impl GroupCommit {
    /// Starts the commit thread, which takes ownership of `log`.
    pub fn start(log: Log, policy: FsyncPolicy, queue_depth: usize) -> GroupCommit {
        let (tx, rx) = sync_channel(queue_depth.max(1));
        let thread = std::thread::Builder::new()
            .name("ferrymq-commit".into())
            .spawn(move || run(log, policy, rx))
            .ok();
        GroupCommit {
            tx: Some(tx),
            thread,
        }
    }

    /// Queues `records` as one unit; `done` runs on the commit thread when they are durable
    /// as the policy says. Blocks while the queue is full.
    pub fn append(&self, records: Vec<Bytes>, done: Done) {
        let Some(tx) = &self.tx else {
            done(Err(StoreError::Stopped));
            return;
        };
        if let Err(e) = tx.send(Request { records, done }) {
            (e.0.done)(Err(StoreError::Stopped));
        }
    }

    /// Like [`GroupCommit::append`], but gives the request back instead of blocking.
    pub fn try_append(&self, records: Vec<Bytes>, done: Done) -> Result<(), (Vec<Bytes>, Done)> {
        let Some(tx) = &self.tx else {
            return Err((records, done));
        };
        match tx.try_send(Request { records, done }) {
            Ok(()) => Ok(()),
            Err(TrySendError::Full(r) | TrySendError::Disconnected(r)) => Err((r.records, r.done)),
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

fn run(mut log: Log, policy: FsyncPolicy, rx: Receiver<Request>) -> (Log, CommitStats) {
    let mut stats = CommitStats::default();
    let mut waiting: Vec<(Offset, Done)> = Vec::new();
    let mut last_sync = Instant::now();
    let interval = match policy {
        FsyncPolicy::IntervalMs(ms) => Some(Duration::from_millis(ms.max(1))),
        _ => None,
    };
    loop {
        let first = match interval {
            Some(iv) => match rx.recv_timeout(
                iv.saturating_sub(last_sync.elapsed())
                    .max(Duration::from_millis(1)),
            ) {
                Ok(r) => Some(r),
                Err(RecvTimeoutError::Timeout) => None,
                Err(RecvTimeoutError::Disconnected) => break,
            },
            None => match rx.recv() {
                Ok(r) => Some(r),
                Err(_) => break,
            },
        };
        let mut batch: Vec<Request> = first.into_iter().collect();
        // Everything already waiting joins this group.
        while batch.len() < 4096 {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        // The whole group goes out as one batch: one write, one frame, one checksum.
        stats.appends += batch.len() as u64;
        let refs: Vec<&[u8]> = batch
            .iter()
            .flat_map(|r| r.records.iter().map(|b| b.as_ref()))
            .collect();
        let counts: Vec<u64> = batch.iter().map(|r| r.records.len() as u64).collect();
        match log.append(&refs) {
            Ok(base) => {
                let mut next = base.0;
                for (req, n) in batch.into_iter().zip(counts) {
                    waiting.push((Offset(next), req.done));
                    next += n;
                }
            }
            Err(e) => {
                let msg = e.to_string();
                for req in batch {
                    (req.done)(Err(StoreError::SyncFailed(msg.clone())));
                }
            }
        }
        if !waiting.is_empty() {
            stats.writes += 1;
        }
        let sync_now = match policy {
            FsyncPolicy::Always => !waiting.is_empty(),
            FsyncPolicy::IntervalMs(_) => interval.is_some_and(|iv| last_sync.elapsed() >= iv),
            FsyncPolicy::Os => false,
        };
        if sync_now {
            let synced = log.sync();
            stats.syncs += 1;
            last_sync = Instant::now();
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
    }
    let _ = log.sync();
    (log, stats)
}
