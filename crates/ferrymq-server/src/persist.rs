//! Durability for the router: the engine's journal records go to the log through group
//! commit, and no action produced with them reaches a client before they are durable.
//!
//! ```text
//! engine step ──records──▶ GroupCommit (commit thread: write, fdatasync per policy)
//!             ──actions──▶ held, tagged with the step's ticket ─┐
//! commit done ──ticket──▶ Durable (atomic + Notify) ──wakes router──▶ release held ≤ ticket
//! ```
//! Output commit: once anything is held, later actions are held behind it too, so clients
//! see effects in the order the engine made them and never before they are stored. A step
//! without records (QoS 0 traffic, clean sessions) costs nothing when nothing is held.
//!
//! Compaction: once `compact_after_bytes` were written since the last checkpoint (and twice
//! that checkpoint's size), the engine writes a checkpoint; once it is durable, segments
//! wholly before it are deleted.

use std::collections::VecDeque;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use ferrymq_core::{Action, Broker, ConnId, Outbox, RestoreReport, Time};
use ferrymq_store::{FsyncPolicy, GroupCommit, Log, LogConfig, Offset};
use tokio::sync::Notify;

use crate::config::{Fsync, Storage};
use crate::ServerError;

/// Requests waiting for the commit thread before the router blocks on it (back-pressure).
const COMMIT_QUEUE: usize = 1024;

/// What the commit thread tells the router.
#[derive(Debug, Default)]
pub(crate) struct Durable {
    /// Highest ticket whose records are durable.
    ticket: AtomicU64,
    /// Offset of the record that begins the newest durable checkpoint, plus one (0 = none).
    checkpoint: AtomicU64,
    failed: Mutex<Option<String>>,
    pub(crate) notify: Notify,
}

impl Durable {
    fn complete(&self, ticket: u64, result: Result<Offset, ferrymq_store::StoreError>) {
        match result {
            Ok(_) => {
                self.ticket.fetch_max(ticket, Ordering::Release);
            }
            Err(e) => {
                let mut failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
                failed.get_or_insert_with(|| e.to_string());
            }
        }
        self.notify.notify_one();
    }
}

/// What startup recovered, for the log line and for tests.
#[derive(Debug, Clone)]
pub struct Recovered {
    pub report: RestoreReport,
    pub truncated_bytes: u64,
    pub log_bytes: u64,
    pub millis: u128,
}

pub(crate) struct Persistence {
    commit: GroupCommit,
    pub(crate) durable: Arc<Durable>,
    /// Tickets handed out; ticket N is the N-th append.
    submitted: u64,
    held: VecDeque<(u64, Vec<(ConnId, Action)>)>,
    held_actions: usize,
    compact_after: u64,
    since_checkpoint: u64,
    last_checkpoint: u64,
    /// Ticket of a checkpoint written but not yet known durable.
    checkpoint_ticket: Option<u64>,
    /// Held for the process's lifetime: a second broker on the same data_dir would corrupt it.
    _lock: File,
}

fn data_dir_error(path: &Path, message: impl std::fmt::Display) -> ServerError {
    ServerError::DataDir {
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}

impl Persistence {
    /// Locks `data_dir`, opens the log (cutting a torn tail), and replays it into `broker`,
    /// then turns the broker's journal on.
    pub(crate) fn open(
        data_dir: &Path,
        storage: &Storage,
        broker: &mut Broker,
        now: Time,
    ) -> Result<(Persistence, Recovered), ServerError> {
        let started = Instant::now();
        std::fs::create_dir_all(data_dir).map_err(|e| data_dir_error(data_dir, e))?;
        let lock_path = data_dir.join("LOCK");
        let lock = File::create(&lock_path).map_err(|e| data_dir_error(&lock_path, e))?;
        lock.try_lock().map_err(|_| {
            data_dir_error(data_dir, "in use by another ferrymq process (LOCK is held)")
        })?;
        let log_dir: PathBuf = data_dir.join("log");
        let recovery_error = |message: String| ServerError::Recovery {
            path: log_dir.clone(),
            message,
        };
        let (log, recovery) = Log::open(LogConfig {
            dir: log_dir.clone(),
            segment_bytes: storage.segment_bytes,
        })
        .map_err(|e| recovery_error(e.to_string()))?;
        let records = log
            .read_from(log.start())
            .map_err(|e| recovery_error(e.to_string()))?;
        let log_bytes: u64 = records.iter().map(|(_, r)| r.len() as u64).sum();
        let report = broker
            .restore(records.iter().map(|(_, r)| r.as_ref()), now)
            .map_err(|e| recovery_error(e.to_string()))?;
        drop(records);
        broker.enable_journal();
        let policy = match storage.fsync {
            Fsync::Always => FsyncPolicy::Always,
            Fsync::Interval => FsyncPolicy::IntervalMs(storage.fsync_interval_ms),
            Fsync::Os => FsyncPolicy::Os,
        };
        let recovered = Recovered {
            report,
            truncated_bytes: recovery.truncated_bytes,
            log_bytes,
            millis: started.elapsed().as_millis(),
        };
        let persistence = Persistence {
            commit: GroupCommit::start(log, policy, COMMIT_QUEUE),
            durable: Arc::new(Durable::default()),
            submitted: 0,
            held: VecDeque::new(),
            held_actions: 0,
            compact_after: storage.compact_after_bytes,
            // Replayed history counts: a long log is compacted soon after start.
            since_checkpoint: log_bytes,
            last_checkpoint: 0,
            checkpoint_ticket: None,
            _lock: lock,
        };
        Ok((persistence, recovered))
    }

    /// After an engine step: sends its records to the log and holds its actions until they
    /// are durable. Call [`Persistence::release`] next.
    pub(crate) fn after_step(&mut self, broker: &mut Broker, out: &mut Outbox) {
        if !out.journal.is_empty() {
            self.submit(std::mem::take(&mut out.journal), false);
        }
        // Every step's actions queue here, even without records of their own: they must not
        // overtake earlier held ones. `release` hands back at once what needs no waiting.
        if !out.actions.is_empty() {
            self.held_actions += out.actions.len();
            self.held
                .push_back((self.submitted, std::mem::take(&mut out.actions)));
        }
        let threshold = self.compact_after.max(2 * self.last_checkpoint);
        if self.checkpoint_ticket.is_none() && self.since_checkpoint >= threshold {
            if let Some(begin) = broker.checkpoint(out) {
                debug_assert_eq!(begin, 0, "earlier records were submitted above");
                let records = std::mem::take(&mut out.journal);
                let bytes: u64 = records.iter().map(|r| r.len() as u64).sum();
                self.last_checkpoint = bytes;
                self.since_checkpoint = 0;
                tracing::info!(bytes, "writing checkpoint");
                self.submit(records, true);
                self.checkpoint_ticket = Some(self.submitted);
            }
        }
    }

    fn submit(&mut self, records: Vec<bytes::Bytes>, checkpoint: bool) {
        self.since_checkpoint += records.iter().map(|r| r.len() as u64).sum::<u64>();
        self.submitted += 1;
        let ticket = self.submitted;
        let durable = self.durable.clone();
        self.commit.append(
            records,
            Box::new(move |result| {
                if let (true, Ok(offset)) = (checkpoint, &result) {
                    durable.checkpoint.store(offset.0 + 1, Ordering::Release);
                }
                durable.complete(ticket, result);
            }),
        );
    }

    /// Moves every held action whose records are now durable into `out`, oldest first.
    /// Errors when the log failed: nothing more can be acknowledged.
    pub(crate) fn release(&mut self, out: &mut Outbox) -> Result<(), String> {
        if let Some(e) = self
            .durable
            .failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        {
            return Err(e);
        }
        let durable = self.durable.ticket.load(Ordering::Acquire);
        while self.held.front().is_some_and(|(t, _)| *t <= durable) {
            if let Some((_, actions)) = self.held.pop_front() {
                self.held_actions -= actions.len();
                out.actions.extend(actions);
            }
        }
        if self.checkpoint_ticket.is_some_and(|t| t <= durable) {
            self.checkpoint_ticket = None;
            let at = self.durable.checkpoint.load(Ordering::Acquire);
            if at > 0 {
                self.commit.reclaim_before(Offset(at - 1));
            }
        }
        Ok(())
    }

    pub(crate) fn held_actions(&self) -> usize {
        self.held_actions
    }

    pub(crate) fn disk_bytes(&self) -> u64 {
        self.commit.disk_bytes()
    }

    /// Waits (blocking this thread) until everything submitted is durable, then stops the
    /// commit thread. Used at shutdown.
    pub(crate) fn finish(self, out: &mut Outbox) {
        let Persistence {
            commit,
            mut held,
            durable,
            ..
        } = self;
        // Stopping drains and syncs the queue; every held action is then safe to send,
        // unless the log failed.
        let stopped = commit.stop().is_some();
        let failed = durable
            .failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some();
        if stopped && !failed {
            for (_, actions) in held.drain(..) {
                out.actions.extend(actions);
            }
        }
    }
}
