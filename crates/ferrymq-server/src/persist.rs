//! Durability for the router: the engine's journal records go to the log through group
//! commit, and no action produced with them reaches a client before they are durable.
//!
//! ```text
//! fsync = always:    engine step ──records──▶ GroupCommit thread: write + one fdatasync/group
//!                                ──actions──▶ held, tagged with the step's ticket ─┐
//!                    commit done ──ticket──▶ Durable (atomic + Notify) ──▶ release ≤ ticket
//! fsync = interval/os: engine step ──records──▶ write() on the router thread, then the
//!                    actions go out at once; a syncer thread fdatasyncs every interval.
//! ```
//! Under `interval` and `os` a record is "stored" once the kernel has it (it survives the
//! process being killed), so there is nothing to wait for and no thread hop on the path.
//! Output commit, per connection: an action that tells a client something is stored (PUBACK,
//! PUBREC, PUBCOMP, CONNACK, SUBACK, ...) or that exactly-once depends on (a QoS 2 delivery,
//! PUBREL) waits until the records before it are durable; once a connection has anything
//! held, its later actions queue behind it, so each client sees its packets in the order the
//! engine made them. QoS 0/1 deliveries to a connection with nothing held go out at once: if
//! the process dies before their records are stored, the message is delivered again or its
//! publisher (never acknowledged) sends it again — at least once either way. A step without
//! records costs nothing when nothing is held.
//!
//! Compaction: once `compact_after_bytes` were written since the last checkpoint (and twice
//! that checkpoint's size), the engine writes a checkpoint; once it is durable, segments
//! wholly before it are deleted. The work queues' entries (millions in a large backlog) are
//! not written in the router's step: the engine hands them over as a `QueueSnapshot`, which
//! a thread writes to `{log}/{id:020}.snap` while routing goes on. The checkpoint counts as
//! durable (the pointer moves to it, the log before it may go, older snapshot files are
//! removed) only once both its records and its snapshot are; until then, or if writing the
//! snapshot fails, replay ignores it (see `Broker::restore_with`).
//!
//! A full disk (issue 10): a write that finds no space (ENOSPC) leaves the log as it was (the
//! store cuts a partial batch back) and the step's records unwritten. They are kept here, in
//! order, with every later step's records ("blocked"); the actions that wait on them stay
//! held; the router refuses new durable work ([`Persistence::is_blocked`] feeds the engine's
//! admission) and calls [`Persistence::retry`] every 250 ms, which writes them all at once
//! when space has come back. The engine's state and the log never disagree except by records
//! not yet written, exactly as between a step and its write. While blocked, a step that
//! makes no records holds back none of its actions (a QoS 0 flow, a clean session's CONNACK
//! do not wait for the disk); one that does holds those that need durability, as always.
//! Any other write error still stops the broker.

use std::collections::VecDeque;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use ferrymq_core::{Action, Broker, ConnId, Outbox, RestoreReport, Time};
use ferrymq_mqtt::{Packet, QoS};
use ferrymq_store::{FsyncPolicy, GroupCommit, Log, LogConfig, Offset, StoreError};
use rustc_hash::FxHashMap as HashMap;
use tokio::sync::Notify;

use crate::config::{Fsync, Storage};
use crate::metrics::NetMetrics;
use crate::ServerError;

/// A checkpoint goes to the log in appends of about this size.
const CHECKPOINT_CHUNK: usize = 16 * 1024 * 1024;

/// Requests waiting for the commit thread before the router blocks on it (back-pressure).
const COMMIT_QUEUE: usize = 1024;

/// One step's records, kept until they are in the log.
#[derive(Debug, Clone)]
struct Unwritten {
    ticket: u64,
    framed: bytes::Bytes,
    count: u64,
    checkpoint: bool,
    /// The log offset one past its last record, as the engine numbered them.
    end: u64,
}

/// What the commit thread tells the router.
#[derive(Debug, Default)]
pub(crate) struct Durable {
    /// Highest ticket whose records are durable.
    ticket: AtomicU64,
    /// Offset of the record that begins the newest durable checkpoint, plus one (0 = none).
    checkpoint: AtomicU64,
    /// Set once the log failed (the reason is in `failed`): checked every router step
    /// without taking the lock.
    has_failed: std::sync::atomic::AtomicBool,
    failed: Mutex<Option<String>>,
    /// The commit thread found the disk full: the router takes the unwritten records back.
    no_space: std::sync::atomic::AtomicBool,
    /// A batch landed at another offset than the engine numbered its records with: queue
    /// messages are found by those numbers, so this is a bug worth stopping for.
    misnumbered: Mutex<Option<String>>,
    pub(crate) notify: Notify,
}

impl Durable {
    fn check_numbering(&self, expected: u64, got: u64) {
        if expected != got {
            let mut m = self.misnumbered.lock().unwrap_or_else(|p| p.into_inner());
            m.get_or_insert(format!(
                "the log put records at offset {got}, the engine numbered them from {expected}"
            ));
            drop(m);
            self.notify.notify_one();
        }
    }

    fn fail(&self, e: String) {
        let mut failed = self.failed.lock().unwrap_or_else(|p| p.into_inner());
        failed.get_or_insert(e);
        self.has_failed.store(true, Ordering::Release);
        drop(failed);
        self.notify.notify_one();
    }

    fn complete(&self, ticket: u64, result: Result<Offset, StoreError>) {
        match result {
            Ok(_) => {
                self.ticket.fetch_max(ticket, Ordering::Release);
                self.notify.notify_one();
            }
            Err(e) if e.is_no_space() => {
                self.no_space.store(true, Ordering::Release);
                self.notify.notify_one();
            }
            Err(e) => self.fail(e.to_string()),
        }
    }

    fn failure(&self) -> Option<String> {
        if !self.has_failed.load(Ordering::Acquire) {
            return None;
        }
        self.failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
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

/// Who writes the log.
enum Writer {
    /// `always`: the commit thread writes and syncs; actions wait for it.
    Group(GroupCommit),
    /// `interval` / `os`: the router writes; a syncer (interval only) syncs in the background.
    Inline {
        log: Log,
        syncer: Option<Syncer>,
        synced_base: Offset,
    },
}

/// Background fdatasync of the active segment every interval, off the router thread.
struct Syncer {
    shared: Arc<SyncShared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

struct SyncShared {
    file: Mutex<File>,
    dirty: std::sync::atomic::AtomicBool,
    stop: std::sync::atomic::AtomicBool,
    failed: Arc<Durable>,
    net: Arc<NetMetrics>,
}

impl Syncer {
    fn start(
        file: File,
        interval: std::time::Duration,
        durable: Arc<Durable>,
        net: Arc<NetMetrics>,
    ) -> Result<Syncer, ServerError> {
        const NAME: &str = "ferrymq-sync";
        let shared = Arc::new(SyncShared {
            file: Mutex::new(file),
            dirty: Default::default(),
            stop: Default::default(),
            failed: durable,
            net,
        });
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name(NAME.into())
            .spawn(move || {
                while !s.stop.load(Ordering::Acquire) {
                    std::thread::sleep(interval);
                    if s.dirty.swap(false, Ordering::AcqRel) {
                        let file = s.file.lock().unwrap_or_else(|p| p.into_inner());
                        let started = Instant::now();
                        let synced = file.sync_data();
                        s.net.storage.fsync.observe(started.elapsed());
                        if let Err(e) = synced {
                            s.failed.fail(format!("fdatasync: {e}"));
                        }
                    }
                }
            })
            // Without it nothing would ever be synced: startup stops here.
            .map_err(|source| ServerError::Thread { name: NAME, source })?;
        Ok(Syncer {
            shared,
            thread: Some(thread),
        })
    }
}

impl Drop for Syncer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

pub(crate) struct Persistence {
    writer: Writer,
    /// Where log writes, fsyncs and checkpoints report their durations.
    net: Arc<NetMetrics>,
    pub(crate) durable: Arc<Durable>,
    /// Tickets handed out; ticket N is the N-th append.
    submitted: u64,
    held: VecDeque<(u64, ConnId, Action)>,
    /// Held actions per connection: while a connection has any, all its actions wait.
    held_per_conn: HashMap<ConnId, u32>,
    scratch: Vec<(ConnId, Action)>,
    compact_after: u64,
    since_checkpoint: u64,
    last_checkpoint: u64,
    /// Ticket of a checkpoint written but not yet known durable.
    checkpoint_ticket: Option<u64>,
    /// With the commit thread: what was handed to it and is not yet known durable, so that
    /// it can be taken back if the disk turns out full (`Bytes` clones: no copy).
    in_flight: VecDeque<Unwritten>,
    /// The disk was found full: these records (oldest first) are not in the log yet, and
    /// every new step's records join them until [`Persistence::retry`] writes them.
    unwritten: VecDeque<Unwritten>,
    blocked: bool,
    /// Bytes of records handed to the log since start (written or not), for the disk check.
    bytes_submitted: u64,
    /// The log offset the next record will get (the engine numbers records the same way).
    next_offset: u64,
    /// Every record below this offset is in the log (readable by the payload store).
    written_end: u64,
    /// The lowest offset work queues read messages from, as of the pending checkpoint, and
    /// of the last durable one: the log is reclaimed only below both it and the checkpoint.
    pending_floor: Option<u64>,
    /// `{log}/CHECKPOINT`: where the newest durable checkpoint begins (replay starts there).
    pointer: PathBuf,
    log_dir: PathBuf,
    /// The pending checkpoint's queue snapshot, being written on its own thread.
    snapshot: Option<SnapshotJob>,
    /// The snapshot of the checkpoint replay starts at (the pointer's), and older ones that
    /// go once the next checkpoint is adopted: each file is removed by its id, never by a
    /// listing (which would race with a snapshot being written).
    adopted_snapshot: Option<u64>,
    old_snapshots: Vec<u64>,
    /// Held for the process's lifetime: a second broker on the same data_dir would corrupt it.
    _lock: File,
}

fn data_dir_error(path: &Path, message: impl std::fmt::Display) -> ServerError {
    ServerError::DataDir {
        path: path.to_path_buf(),
        message: message.to_string(),
    }
}

/// Why the log did not open, and for damage what to do about it: the broker does not start on
/// a damaged log (cutting it would delete acknowledged records), `ferrymq recover` salvages it.
fn open_failure(e: &StoreError, data_dir: &Path) -> String {
    match e {
        StoreError::Damaged { .. } | StoreError::Corrupt { .. } => format!(
            "{e}. The broker does not start on a damaged log: run `ferrymq recover --data-dir {}` \
             to move the log aside (nothing is deleted) and write a new one from every batch \
             that checks",
            data_dir.display()
        ),
        StoreError::RecoverInterrupted { .. } => format!(
            "{e}: run `ferrymq recover --data-dir {}`",
            data_dir.display()
        ),
        e => e.to_string(),
    }
}

impl Persistence {
    /// Locks `data_dir`, opens the log (cutting a torn tail; refusing damage, see
    /// [`open_failure`]), and replays it into `broker`, then turns the broker's journal on.
    pub(crate) fn open(
        data_dir: &Path,
        storage: &Storage,
        queues: &[ferrymq_core::workqueue::QueueDef],
        broker: &mut Broker,
        now: Time,
        net: Arc<NetMetrics>,
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
        // Replay starts at the newest durable checkpoint when the pointer names one (work
        // queues keep older segments for their messages; replaying them would only be
        // undone by the checkpoint), and the log reads only from there at open.
        let pointer = log_dir.join("CHECKPOINT");
        let pointed = read_pointer(&pointer);
        let (mut log, recovery) = Log::open_from(
            LogConfig {
                dir: log_dir.clone(),
                segment_bytes: storage.segment_bytes,
            },
            Offset(pointed.unwrap_or(0)),
        )
        .map_err(|e| recovery_error(open_failure(&e, data_dir)))?;
        if let Some(torn) = &recovery.torn_tail {
            tracing::warn!(
                file = %torn.path.display(),
                position = torn.position,
                bytes = torn.bytes,
                "cut a torn tail off the log: its last batch was incomplete or did not check, \
                 and nothing valid followed (a write cut short by a crash or a power loss)"
            );
        }
        let mut records = Vec::new();
        // The snapshot of the checkpoint replay starts at, read while checking it is there.
        let mut preloaded: Option<(u64, Vec<bytes::Bytes>)> = None;
        // The snapshot of the checkpoint the pointer names: in use until the next one.
        let mut pointed_snapshot: Option<u64> = None;
        if let Some(at) = pointed.filter(|at| *at >= log.start().0) {
            match log.read_from(Offset(at)) {
                Ok(mut r)
                    if r.first()
                        .is_some_and(|(_, rec)| ferrymq_core::is_checkpoint_begin(rec)) =>
                {
                    let named = r
                        .iter()
                        .take_while(|(_, rec)| !ferrymq_core::is_checkpoint_end(rec))
                        .find_map(|(_, rec)| ferrymq_core::queue_snapshot_named(rec));
                    pointed_snapshot = named;
                    match named.map(|id| (id, ferrymq_store::read_snapshot(&log_dir, id))) {
                        Some((id, Ok(snapshot))) => preloaded = Some((id, snapshot)),
                        // The whole history is still there: replaying it all loses nothing.
                        Some((_, Err(_))) if log.start().0 == 0 => r.clear(),
                        Some((id, Err(e))) => tracing::error!(
                            offset = at,
                            error = %e,
                            path = %ferrymq_store::snapshot_path(&log_dir, id).display(),
                            "the checkpoint the pointer names has lost its queue snapshot \
                             (the file was removed or damaged by something else than the \
                             broker): its sessions, retained messages and queue definitions \
                             are kept; the queue messages only that snapshot held are lost"
                        ),
                        None => {}
                    }
                    records = r;
                }
                _ => tracing::warn!(
                    offset = at,
                    "the checkpoint pointer does not name a checkpoint: replaying the whole log"
                ),
            }
        }
        // Replaying from a checkpoint, or from the very first record: what comes before
        // either is whole (a checkpoint whose snapshot is missing may then be ignored).
        let pointer_used = !records.is_empty();
        let whole_history = !pointer_used && log.start().0 == 0;
        if records.is_empty() {
            records = log
                .read_from(log.start())
                .map_err(|e| recovery_error(e.to_string()))?;
        }
        let log_bytes: u64 = records.iter().map(|(_, r)| r.len() as u64).sum();
        // The snapshots the replayed checkpoints name: any other file is of no use.
        let named: Vec<u64> = records
            .iter()
            .filter_map(|(_, r)| ferrymq_core::queue_snapshot_named(r))
            .collect();
        let report = broker
            .restore_with(
                records.iter().map(|(_, r)| r.as_ref()),
                now,
                whole_history,
                &mut |id| match preloaded.take() {
                    Some((p, snapshot)) if p == id => Ok(snapshot),
                    _ => ferrymq_store::read_snapshot(&log_dir, id).map_err(|e| e.to_string()),
                },
            )
            .map_err(|e| recovery_error(e.to_string()))?;
        drop(records);
        if report.void_checkpoints > 0 {
            // A crash before a checkpoint's snapshot was whole: the state before that
            // checkpoint, still in the log, stands with everything after it.
            tracing::warn!(
                checkpoints = report.void_checkpoints,
                reason = report.snapshot_error.as_deref().unwrap_or(""),
                "ignored checkpoints whose queue snapshot was not written whole"
            );
        }
        if report.lost_snapshots > 0 {
            tracing::error!(
                checkpoints = report.lost_snapshots,
                reason = report.snapshot_error.as_deref().unwrap_or(""),
                "checkpoints applied without their queue snapshot: the queue messages only \
                 those snapshots held are lost"
            );
        }
        // (No snapshot is being written yet: unfinished files are a crash's.)
        if let Err(e) = ferrymq_store::remove_snapshots(&log_dir, &|id| named.contains(&id), true) {
            tracing::warn!(error = %e, "removing unused queue snapshots failed");
        }
        if report.skipped > 0 || report.incomplete_checkpoint {
            tracing::warn!(
                skipped = report.skipped,
                incomplete_checkpoint = report.incomplete_checkpoint,
                "the log named state that replay did not find (records skipped), or ended \
                 inside a checkpoint; the state rebuilt is what the rest of the log holds"
            );
        }
        // Sessions connected when the log ended were disconnected by the crash; their
        // disconnect time is stored now, so the next restart does not move it again.
        let mut first = Outbox::default();
        // The engine numbers its records as the log will (queue messages are found by it),
        // and reads queue messages back through its own handle on the log.
        broker.set_journal_base(log.next().0);
        let reader =
            ferrymq_store::LogReader::open(&log_dir).map_err(|e| recovery_error(e.to_string()))?;
        broker.set_payload_store(Box::new(LogPayloads(Mutex::new(reader))));
        broker.enable_journal(&mut first);
        // A log that ends inside a checkpoint (a crash cut a checkpoint spanning several
        // batches) must not have new records appended after the unfinished checkpoint: the
        // next replay would read them as part of it. A whole checkpoint of the restored state
        // goes first, so it closes the unfinished one.
        if report.incomplete_checkpoint {
            broker.checkpoint(&mut first);
        }
        // The configured queues: new ones are declared, changed ones take their new
        // definition (their messages stay); queues created over the API are left alone.
        for def in queues {
            if let Err(e) = broker.declare_queue(def.clone(), now, &mut first) {
                return Err(recovery_error(format!(
                    "declaring queue {:?}: {e}",
                    def.name
                )));
            }
        }
        if !first.journal.is_empty() {
            let (framed, count) = first.journal.take();
            log.append_framed(&framed, count)
                .and_then(|_| log.sync())
                .map_err(|e| recovery_error(e.to_string()))?;
        }
        if broker.journal_next_offset() != Some(log.next().0) {
            return Err(recovery_error(format!(
                "the engine numbered its records up to {:?}, the log holds up to {}",
                broker.journal_next_offset(),
                log.next().0
            )));
        }
        let next_offset = log.next().0;
        broker.journal_written(next_offset);
        let recovered = Recovered {
            report,
            truncated_bytes: recovery.truncated_bytes,
            log_bytes,
            millis: started.elapsed().as_millis(),
        };
        let durable = Arc::new(Durable::default());
        let writer = match storage.fsync {
            Fsync::Always => Writer::Group(
                GroupCommit::start_observed(
                    log,
                    FsyncPolicy::Always,
                    COMMIT_QUEUE,
                    Some(net.clone()),
                )
                .map_err(|e| match e {
                    StoreError::Thread { name, source } => ServerError::Thread { name, source },
                    e => recovery_error(e.to_string()),
                })?,
            ),
            Fsync::Interval => {
                let file = log
                    .active_file()
                    .map_err(|e| recovery_error(e.to_string()))?;
                let interval = std::time::Duration::from_millis(storage.fsync_interval_ms);
                Writer::Inline {
                    synced_base: log.active_base(),
                    log,
                    syncer: Some(Syncer::start(file, interval, durable.clone(), net.clone())?),
                }
            }
            Fsync::Os => Writer::Inline {
                synced_base: log.active_base(),
                log,
                syncer: None,
            },
        };
        let persistence = Persistence {
            writer,
            net,
            durable,
            submitted: 0,
            held: VecDeque::new(),
            held_per_conn: HashMap::default(),
            scratch: Vec::new(),
            compact_after: storage.compact_after_bytes,
            // Replayed history counts: a long log is compacted soon after start.
            since_checkpoint: log_bytes,
            last_checkpoint: 0,
            checkpoint_ticket: None,
            in_flight: VecDeque::new(),
            unwritten: VecDeque::new(),
            blocked: false,
            bytes_submitted: 0,
            next_offset,
            written_end: next_offset,
            pending_floor: None,
            pointer,
            log_dir,
            snapshot: None,
            adopted_snapshot: pointed_snapshot.filter(|_| pointer_used),
            old_snapshots: named
                .iter()
                .copied()
                .filter(|id| !(pointer_used && Some(*id) == pointed_snapshot))
                .collect(),
            _lock: lock,
        };
        Ok((persistence, recovered))
    }

    /// After an engine step: sends its records to the log and holds its actions until they
    /// are durable. Call [`Persistence::release`] next.
    pub(crate) fn after_step(&mut self, broker: &mut Broker, out: &mut Outbox) {
        let made_records = !out.journal.is_empty();
        if made_records {
            let (framed, count) = out.journal.take();
            self.submit(framed, count, false);
        }
        // Blocked, the disk may stay full for long: only a step's own records hold its
        // actions back (see the module docs).
        let waiting = if self.blocked {
            made_records
        } else {
            self.submitted > self.durable.ticket.load(Ordering::Acquire)
        };
        if waiting || !self.held.is_empty() {
            let mut keep = std::mem::take(&mut self.scratch);
            for (conn, action) in out.actions.drain(..) {
                let must_wait = waiting && needs_durability(&action);
                if must_wait || self.held_per_conn.contains_key(&conn) {
                    *self.held_per_conn.entry(conn).or_default() += 1;
                    self.held.push_back((self.submitted, conn, action));
                } else {
                    keep.push((conn, action));
                }
            }
            self.scratch = std::mem::replace(&mut out.actions, keep);
        }
        let threshold = self.compact_after.max(2 * self.last_checkpoint);
        // No checkpoint while blocked: it could not be written either.
        if self.checkpoint_ticket.is_none() && !self.blocked && self.since_checkpoint >= threshold {
            let started = Instant::now();
            // Handed to the log in chunks as it is written: a queue backlog's index is
            // hundreds of megabytes, and it would otherwise sit in memory whole.
            let mut first = true;
            let mut bytes = 0u64;
            let flush = &mut |o: &mut Outbox| {
                let (framed, count) = o.journal.take();
                bytes += framed.len() as u64;
                self.submit(framed, count, first);
                first = false;
            };
            let written = broker.checkpoint_in_chunks(out, CHECKPOINT_CHUNK, flush, snapshot_id());
            if let Some((begin, snapshot)) = written {
                debug_assert_eq!(begin, 0, "earlier records were submitted above");
                // Queue entries written before the checkpoint point at records before it
                // (with a snapshot, its thread finds the floor).
                self.pending_floor = broker.checkpoint_queue_floor();
                let (framed, count) = out.journal.take();
                bytes += framed.len() as u64;
                self.last_checkpoint = bytes;
                self.since_checkpoint = 0;
                self.submit(framed, count, first);
                let queue_messages = snapshot.as_ref().map_or(0, |s| s.messages());
                if let Some(s) = snapshot {
                    self.snapshot = Some(SnapshotJob::start(
                        s,
                        self.log_dir.clone(),
                        self.durable.clone(),
                    ));
                }
                // The router stalls this long (the queues' entries are written elsewhere).
                tracing::info!(
                    bytes,
                    records = count,
                    queue_messages,
                    took_ms = started.elapsed().as_millis() as u64,
                    "checkpoint written"
                );
                self.net.storage.checkpoint.observe(started.elapsed());
                self.checkpoint_ticket = Some(self.submitted);
            }
        }
    }

    fn submit(&mut self, framed: bytes::Bytes, count: u64, checkpoint: bool) {
        self.since_checkpoint += framed.len() as u64;
        self.bytes_submitted += framed.len() as u64;
        self.submitted += 1;
        let ticket = self.submitted;
        let durable = self.durable.clone();
        let first = self.next_offset;
        self.next_offset += count;
        let entry = Unwritten {
            ticket,
            framed: framed.clone(),
            count,
            checkpoint,
            end: self.next_offset,
        };
        if self.blocked {
            self.unwritten.push_back(entry);
            return;
        }
        match &mut self.writer {
            Writer::Group(commit) => {
                self.in_flight.push_back(entry);
                commit.append_framed(
                    framed,
                    count,
                    Box::new(move |result| {
                        if let Ok(offset) = &result {
                            durable.check_numbering(first, offset.0);
                        }
                        if let (true, Ok(offset)) = (checkpoint, &result) {
                            durable.checkpoint.store(offset.0 + 1, Ordering::Release);
                        }
                        durable.complete(ticket, result);
                    }),
                )
            }
            Writer::Inline {
                log,
                syncer,
                synced_base,
            } => {
                let started = Instant::now();
                let appended = log.append_framed(&framed, count);
                self.net.storage.append.observe(started.elapsed());
                match appended {
                    Ok(offset) => {
                        durable.check_numbering(first, offset.0);
                        self.written_end = self.next_offset;
                        if checkpoint {
                            durable.checkpoint.store(offset.0 + 1, Ordering::Release);
                        }
                        // Stored as the policy means it: the kernel has it.
                        durable.ticket.store(ticket, Ordering::Release);
                    }
                    Err(e) if e.is_no_space() => {
                        tracing::warn!(error = %e, "the log's disk is full: keeping its records in memory and refusing new durable work until a retry writes them");
                        self.blocked = true;
                        self.unwritten.push_back(entry);
                    }
                    Err(e) => durable.fail(e.to_string()),
                }
                if let Some(s) = syncer {
                    if log.active_base() != *synced_base {
                        // A new segment: the syncer follows it (the sealed one was synced).
                        match log.active_file() {
                            Ok(f) => {
                                *s.shared.file.lock().unwrap_or_else(|p| p.into_inner()) = f;
                                *synced_base = log.active_base();
                            }
                            Err(e) => durable.fail(e.to_string()),
                        }
                    }
                    s.shared.dirty.store(true, Ordering::Release);
                }
            }
        }
    }

    /// Moves every held action whose records are now durable into `out`, oldest first.
    /// Errors when the log failed: nothing more can be acknowledged.
    pub(crate) fn release(&mut self, out: &mut Outbox) -> Result<(), String> {
        if let Some(e) = self.durable.failure() {
            return Err(e);
        }
        // The commit thread refuses every append after the one that found the disk full, so
        // what it has not made durable is exactly what is still in flight past `durable`
        // (read after the flag: the thread stores the ticket of its last good write first).
        if self.durable.no_space.swap(false, Ordering::AcqRel) && !self.blocked {
            tracing::warn!("the log's disk is full: keeping its records in memory and refusing new durable work until a retry writes them");
            self.blocked = true;
        }
        if let Some(e) = self
            .durable
            .misnumbered
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
        {
            return Err(e);
        }
        let durable = self.durable.ticket.load(Ordering::Acquire);
        while self.in_flight.front().is_some_and(|u| u.ticket <= durable) {
            if let Some(u) = self.in_flight.pop_front() {
                self.written_end = self.written_end.max(u.end);
            }
        }
        if self.blocked && !self.in_flight.is_empty() {
            for u in self.in_flight.drain(..).rev() {
                self.unwritten.push_front(u);
            }
        }
        while self.held.front().is_some_and(|(t, _, _)| *t <= durable) {
            let Some((_, conn, action)) = self.held.pop_front() else {
                break;
            };
            if let Some(n) = self.held_per_conn.get_mut(&conn) {
                *n -= 1;
                if *n == 0 {
                    self.held_per_conn.remove(&conn);
                }
            }
            out.actions.push((conn, action));
        }
        let snapshot_done = self.snapshot.as_ref().is_none_or(SnapshotJob::is_finished);
        if snapshot_done && self.checkpoint_ticket.is_some_and(|t| t <= durable) {
            self.checkpoint_ticket = None;
            let at = self.durable.checkpoint.load(Ordering::Acquire);
            // The checkpoint stands only with its queue snapshot whole on disk.
            let snapshot = match self.snapshot.take().map(SnapshotJob::join) {
                None => Ok(None),
                Some(Ok(w)) => {
                    tracing::info!(
                        id = w.id,
                        bytes = w.bytes,
                        took_ms = w.millis,
                        "queue snapshot written"
                    );
                    self.last_checkpoint += w.bytes;
                    self.pending_floor = w.floor;
                    Ok(Some(w.id))
                }
                Some(Err(e)) => Err(e),
            };
            if let Err(e) = &snapshot {
                tracing::warn!(error = %e, "writing the queue snapshot failed: the checkpoint is not used, and the log before it stays");
            }
            if let (true, Ok(snapshot)) = (at > 0, snapshot) {
                // Replay starts here from now on; then segments wholly before both the
                // checkpoint and every queue message still held can go.
                let synced = match &mut self.writer {
                    Writer::Group(_) => Ok(()),
                    Writer::Inline { log, .. } => log.sync(),
                };
                if synced.is_ok() {
                    match write_pointer(&self.pointer, at - 1) {
                        Ok(()) => {
                            // Replay starts at this checkpoint now: the snapshots before
                            // it are not needed.
                            if let Some(old) =
                                std::mem::replace(&mut self.adopted_snapshot, snapshot)
                            {
                                self.old_snapshots.push(old);
                            }
                            let old = std::mem::take(&mut self.old_snapshots);
                            remove_snapshots_later(self.log_dir.clone(), old);
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "writing the checkpoint pointer failed");
                            // Replay still starts at the older checkpoint; this one's
                            // snapshot goes with the next adoption.
                            self.old_snapshots.extend(snapshot);
                        }
                    }
                }
                let keep = self.pending_floor.take().map_or(at - 1, |f| f.min(at - 1));
                match &mut self.writer {
                    Writer::Group(commit) => commit.reclaim_before(Offset(keep)),
                    Writer::Inline { log, .. } => {
                        // The checkpoint must be on disk before what it replaces is deleted,
                        // whatever the policy (a power loss must not lose both). The files
                        // go on a thread of their own: after a queue drains, hundreds of
                        // segments can go at once, seconds of unlinking.
                        match synced.map(|_| log.release_before(Offset(keep))) {
                            Ok(released) if !released.is_empty() => {
                                let spawned = std::thread::Builder::new()
                                    .name("ferrymq-reclaim".into())
                                    .spawn(move || {
                                        if let Err(e) = released.delete() {
                                            tracing::warn!(error = %e, "reclaiming log segments failed");
                                        }
                                    });
                                if let Err(e) = spawned {
                                    tracing::warn!(error = %e, "reclaiming log segments failed");
                                }
                            }
                            Ok(_) => {}
                            Err(e) => tracing::warn!(error = %e, "reclaiming log segments failed"),
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Every record below this log offset is written (readable).
    pub(crate) fn written_end(&self) -> u64 {
        self.written_end
    }

    /// The ticket of the latest records handed to the log (0 = none yet).
    pub(crate) fn submitted_ticket(&self) -> u64 {
        self.submitted
    }

    /// The highest ticket whose records are stored under the fsync policy.
    pub(crate) fn durable_ticket(&self) -> u64 {
        self.durable.ticket.load(Ordering::Acquire)
    }

    pub(crate) fn bytes_submitted(&self) -> u64 {
        self.bytes_submitted
    }

    /// Whether the log found the disk full and holds records it could not write yet.
    pub(crate) fn is_blocked(&self) -> bool {
        self.blocked
    }

    /// Writes the records a full disk kept back, oldest first, as one append. Ok(true) once
    /// they are in the log (the actions waiting on them are released by the next
    /// [`Persistence::release`]); Ok(false) if the disk is still full; Err if the log failed
    /// otherwise. Blocks the router for one write (and, under `always`, one fsync).
    pub(crate) fn retry(&mut self) -> Result<bool, String> {
        if !self.blocked {
            return Ok(true);
        }
        let mut framed = bytes::BytesMut::new();
        let mut count = 0;
        for u in &self.unwritten {
            framed.extend_from_slice(&u.framed);
            count += u.count;
        }
        let framed = framed.freeze();
        let result = match &mut self.writer {
            Writer::Group(commit) => {
                let (tx, rx) = std::sync::mpsc::sync_channel(1);
                commit.retry_framed(
                    framed,
                    count,
                    Box::new(move |r| {
                        let _ = tx.send(r);
                    }),
                );
                rx.recv().unwrap_or(Err(StoreError::Stopped))
            }
            Writer::Inline { log, syncer, .. } => {
                let r = log.append_framed(&framed, count);
                if let Some(s) = syncer {
                    s.shared.dirty.store(true, Ordering::Release);
                }
                r
            }
        };
        match result {
            Ok(base) => {
                let mut offset = base.0;
                let mut last = 0;
                if let Some(u) = self.unwritten.front() {
                    let first = u.end - u.count;
                    self.durable.check_numbering(first, base.0);
                }
                if let Some(u) = self.unwritten.back() {
                    self.written_end = self.written_end.max(u.end);
                }
                for u in self.unwritten.drain(..) {
                    if u.checkpoint {
                        self.durable.checkpoint.store(offset + 1, Ordering::Release);
                    }
                    offset += u.count;
                    last = u.ticket;
                }
                self.durable.ticket.fetch_max(last, Ordering::Release);
                self.blocked = false;
                tracing::info!(
                    records = count,
                    "the log's disk has room again: the records kept in memory are written"
                );
                Ok(true)
            }
            Err(e) if e.is_no_space() => Ok(false),
            Err(e) => {
                let e = e.to_string();
                self.durable.fail(e.clone());
                Err(e)
            }
        }
    }

    pub(crate) fn held_actions(&self) -> usize {
        self.held.len()
    }

    pub(crate) fn disk_bytes(&self) -> u64 {
        match &self.writer {
            Writer::Group(commit) => commit.disk_bytes(),
            Writer::Inline { log, .. } => log.disk_bytes(),
        }
    }

    /// Waits (blocking this thread) until everything submitted is durable, then stops the
    /// commit thread. Used at shutdown.
    pub(crate) fn finish(mut self, out: &mut Outbox) {
        // Records a full disk kept back get one more try; if it fails, what waits on them is
        // never sent (it was never acknowledged, and the next start does without it).
        let written = matches!(self.retry(), Ok(true));
        // A snapshot being written is finished (a later start can use its checkpoint).
        if let Some(job) = self.snapshot.take() {
            if let Err(e) = job.join() {
                tracing::warn!(error = %e, "writing the queue snapshot failed");
            }
        }
        let Persistence {
            writer,
            mut held,
            durable,
            ..
        } = self;
        // Stopping drains and syncs the queue; every held action is then safe to send,
        // unless the log failed.
        let stopped = match writer {
            Writer::Group(commit) => commit.stop().is_some(),
            Writer::Inline {
                mut log, syncer, ..
            } => {
                drop(syncer);
                log.sync().is_ok()
            }
        };
        if written && stopped && durable.failure().is_none() {
            out.actions
                .extend(held.drain(..).map(|(_, conn, action)| (conn, action)));
        }
    }
}

/// Whether an action may reach its client only after the records made with it are durable.
fn needs_durability(action: &Action) -> bool {
    match action {
        // At least once tolerates a resend; exactly once does not (see the module docs).
        // A work-queue delivery counts an attempt: its lease must be stored before the
        // consumer sees it, or a crash could hand out the same attempt number twice.
        Action::Deliver(d) => d.qos == QoS::ExactlyOnce || d.attempt.is_some(),
        Action::Send(Packet::PingResp) => false,
        // A refused publish (0x97 while the disk is full, say) stored nothing.
        Action::Send(Packet::PubAck(r) | Packet::PubRec(r)) if r.reason.is_error() => false,
        // Acks, PUBREL, CONNACK (session present), SUBACK, DISCONNECT, and the close itself.
        Action::Send(_) | Action::Close => true,
    }
}

/// The engine's payload store: work-queue messages read back from the log by offset.
struct LogPayloads(Mutex<ferrymq_store::LogReader>);

impl ferrymq_core::queues::PayloadStore for LogPayloads {
    fn read(&self, offset: u64) -> Option<bytes::Bytes> {
        let mut reader = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match reader.read(Offset(offset)) {
            Ok(Some(r)) => Some(r),
            Ok(None) => {
                tracing::error!(offset, "a queued message's record is not in the log");
                None
            }
            Err(e) => {
                tracing::error!(offset, error = %e, "reading a queued message back from the log failed");
                None
            }
        }
    }
}

/// The offset `{log}/CHECKPOINT` names, if the file is there and whole.
fn read_pointer(path: &Path) -> Option<u64> {
    let b = std::fs::read(path).ok()?;
    let (offset, check) = (b.get(..8)?, b.get(8..12)?);
    (crc32c::crc32c(offset).to_be_bytes() == check).then(|| {
        let mut o = [0u8; 8];
        o.copy_from_slice(offset);
        u64::from_be_bytes(o)
    })
}

/// Points `{log}/CHECKPOINT` at `offset`: written aside, synced, renamed over the old one.
fn write_pointer(path: &Path, offset: u64) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let mut f = File::create(&tmp)?;
    let o = offset.to_be_bytes();
    f.write_all(&o)?;
    f.write_all(&crc32c::crc32c(&o).to_be_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// A queue snapshot being written to `{log}/{id:020}.snap` on a thread of its own.
struct SnapshotJob {
    /// Err: no thread could be started (the checkpoint is then not used).
    thread: Result<std::thread::JoinHandle<Result<SnapshotWritten, String>>, String>,
}

/// A queue snapshot on disk, whole and synced.
struct SnapshotWritten {
    id: u64,
    bytes: u64,
    millis: u64,
    /// The lowest log position its entries point at.
    floor: Option<u64>,
}

impl SnapshotJob {
    fn start(
        snapshot: ferrymq_core::QueueSnapshot,
        dir: PathBuf,
        durable: Arc<Durable>,
    ) -> SnapshotJob {
        let id = snapshot.id();
        let write = move || {
            let started = Instant::now();
            let result = write_snapshot(&snapshot, &dir);
            drop(snapshot);
            // The router finishes the checkpoint on its next step.
            durable.notify.notify_one();
            result.map(|(bytes, floor)| SnapshotWritten {
                id,
                bytes,
                millis: started.elapsed().as_millis() as u64,
                floor,
            })
        };
        let thread = std::thread::Builder::new()
            .name("ferrymq-snapshot".into())
            .spawn(write)
            .map_err(|e| format!("cannot start the snapshot thread: {e}"));
        SnapshotJob { thread }
    }

    fn is_finished(&self) -> bool {
        self.thread.as_ref().is_ok_and(|t| t.is_finished()) || self.thread.is_err()
    }

    fn join(self) -> Result<SnapshotWritten, String> {
        self.thread?
            .join()
            .unwrap_or_else(|_| Err("the snapshot thread panicked".into()))
    }
}

/// Writes `snapshot` into `dir`; its size and floor.
fn write_snapshot(
    snapshot: &ferrymq_core::QueueSnapshot,
    dir: &Path,
) -> Result<(u64, Option<u64>), String> {
    let mut w =
        ferrymq_store::SnapshotWriter::create(dir, snapshot.id()).map_err(|e| e.to_string())?;
    let mut failed = None;
    let floor = snapshot.write(CHECKPOINT_CHUNK, &mut |buf| {
        let (framed, count) = buf.take();
        if failed.is_none() {
            if let Err(e) = w.write_framed(&framed, count) {
                failed = Some(e.to_string());
            }
        }
    });
    if let Some(e) = failed {
        return Err(e);
    }
    let bytes = w.finish().map_err(|e| e.to_string())?;
    Ok((bytes, floor))
}

/// A new snapshot's id: random, so that no file of an earlier run, or of a log that a crash
/// or `ferrymq recover` cut or renumbered, is ever taken for it.
fn snapshot_id() -> u64 {
    let mut b = [0u8; 8];
    if getrandom::fill(&mut b).is_err() {
        // No randomness: the clock is unique enough for one process's checkpoints.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        return nanos;
    }
    u64::from_be_bytes(b)
}

/// Removes the snapshot files `ids` on a thread (a snapshot can be hundreds of megabytes
/// to unlink).
fn remove_snapshots_later(dir: PathBuf, ids: Vec<u64>) {
    if ids.is_empty() {
        return;
    }
    let remove = move || {
        for id in ids {
            let path = ferrymq_store::snapshot_path(&dir, id);
            match std::fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(error = %e, path = %path.display(), "removing an old queue snapshot failed")
                }
            }
        }
    };
    if let Err(e) = std::thread::Builder::new()
        .name("ferrymq-snapshot-rm".into())
        .spawn(remove)
    {
        tracing::warn!(error = %e, "removing old queue snapshots failed");
    }
}
