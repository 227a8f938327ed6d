//! One queue's state: what waits (ready or delayed), what is leased to which consumer, the
//! failures of each message, and the dead letters.
//!
//! Split the way the journal needs it: *decisions* read the state and the clock (which
//! message leases next, which leases ran out, what a failed attempt leads to, with its random
//! draw), and *changes* apply exactly what a journal record says, so replay rebuilds the
//! same state without a clock or a random generator (`crate::queues` commits the records).
//! Every change names the message it changes by id.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use rustc_hash::FxHashMap as HashMap;

use super::backlog::{Backlog, BacklogImage, Entry};
use super::policy::{Overflow, QueueDef};
use crate::{Message, SessionId, Time};

/// One failed attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub at: Time,
    /// The nack's reason code, or 0x80 for an ack timeout, a lost consumer or a restart.
    pub reason_code: u8,
    /// The nack's reason string, or what the broker saw ("ack timeout", "consumer gone").
    pub reason: Arc<str>,
    /// The consumer's client id.
    pub consumer: Arc<str>,
}

/// Why a message became a dead letter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Cause {
    MaxAttempts,
    Expired,
    Overflow,
    Rejected,
}

impl Cause {
    pub const ALL: [Cause; 4] = [
        Cause::MaxAttempts,
        Cause::Expired,
        Cause::Overflow,
        Cause::Rejected,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Cause::MaxAttempts => "max_attempts",
            Cause::Expired => "expired",
            Cause::Overflow => "overflow",
            Cause::Rejected => "rejected",
        }
    }

    pub fn parse(s: &str) -> Option<Cause> {
        Cause::ALL.into_iter().find(|c| c.as_str() == s)
    }
}

/// A message that left the queue's working set: kept for inspection and redrive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub entry: Entry,
    pub cause: Cause,
    /// Every failed attempt, oldest first (across redrives).
    pub failures: Vec<Failure>,
    pub dead_lettered: Time,
}

/// What a message counts for in memory and against `max_bytes`: its topic and payload.
pub fn body_size(m: &Message) -> u64 {
    (m.topic.len() + m.payload.len()) as u64
}

/// Whether a new message fits (see [`Queue::make_room`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Room {
    Free,
    /// After this waiting message is dropped or dead-lettered (the overflow policy).
    Displace(u64),
    /// Refused: `reject_new`, or full with nothing waiting that may make room.
    Full,
}

/// What a failed attempt leads to (decided live, journaled, applied as is on replay).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Waits until this time, then is ready again.
    At(Time),
    DeadLettered(Cause),
}

/// A message leased to a consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub entry: Entry,
    pub consumer: SessionId,
    pub deadline: Time,
    /// Told apart from an earlier lease of the same message (a late ack of that one must not
    /// acknowledge this one).
    pub seq: u64,
}

/// Counters for the queue's metrics (since the broker started).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueStats {
    pub enqueued: u64,
    pub acked: u64,
    pub nacked: u64,
    pub redelivered: u64,
    pub dropped_overflow: u64,
    pub dropped_expired: u64,
    pub refused: u64,
    /// Messages whose record could not be read back from the log (dropped).
    pub unreadable: u64,
    pub dead_lettered: BTreeMap<Cause, u64>,
}

/// One queue as a checkpoint writes it ([`Queue::image`]).
#[derive(Debug, Clone)]
pub struct QueueImage {
    pub def: QueueDef,
    pub waiting: BacklogImage,
    /// In lease order.
    pub leases: Vec<Lease>,
    failures: HashMap<u64, Vec<Failure>>,
    expiry_of: HashMap<u64, Time>,
    pub dead: Vec<Arc<DeadLetter>>,
    /// Messages in it: waiting, leased and dead.
    pub messages: u64,
}

impl QueueImage {
    pub fn failures(&self, id: u64) -> &[Failure] {
        self.failures.get(&id).map_or(&[], Vec::as_slice)
    }

    pub fn expiry_of(&self, id: u64) -> Option<Time> {
        self.expiry_of.get(&id).copied()
    }

    /// Whether any message has failures, and whether any has an expiry.
    pub fn has_failures_or_expiries(&self) -> (bool, bool) {
        (!self.failures.is_empty(), !self.expiry_of.is_empty())
    }
}

/// A queue: its definition, what waits, what is leased, and its dead letters.
#[derive(Debug)]
pub struct Queue {
    def: QueueDef,
    backlog: Backlog,
    leases: HashMap<u64, Lease>,
    /// Lease deadlines by time (an ack removes its own: nothing stale piles up).
    deadlines: BTreeSet<(Time, u64)>,
    /// Dead letters by when they died, for retention.
    dead_times: BTreeSet<(Time, u64)>,
    /// Messages with an expiry, by when (and the expiry of each): expired while waiting,
    /// they go when they expire, not when a consumer next comes.
    expiries: BTreeSet<(Time, u64)>,
    expiry_of: HashMap<u64, Time>,
    /// Failures of messages still in the queue, by message id.
    failures: HashMap<u64, Vec<Failure>>,
    /// Shared so that a checkpoint's image of many dead letters costs a count each.
    dead: BTreeMap<u64, Arc<DeadLetter>>,
    /// Messages held in memory, by id: a cache. An entry's message is always in the log at
    /// its `position`; the broker drops bodies from here past its memory budget and reads
    /// them back when needed (`crate::queues`).
    bodies: HashMap<u64, Arc<Message>>,
    /// Bytes (topic and payload) of the bodies held in `bodies`.
    cached_bytes: u64,
    leased_bytes: u64,
    next_lease: u64,
    pub stats: QueueStats,
}

impl Queue {
    pub fn new(def: QueueDef) -> Queue {
        Queue {
            def,
            backlog: Backlog::default(),
            leases: HashMap::default(),
            deadlines: BTreeSet::new(),
            dead_times: BTreeSet::new(),
            expiries: BTreeSet::new(),
            expiry_of: HashMap::default(),
            failures: HashMap::default(),
            dead: BTreeMap::new(),
            bodies: HashMap::default(),
            cached_bytes: 0,
            leased_bytes: 0,
            next_lease: 1,
            stats: QueueStats::default(),
        }
    }

    pub fn def(&self) -> &QueueDef {
        &self.def
    }

    /// A new definition for the same queue (its name and contents stay).
    pub fn set_def(&mut self, def: QueueDef) {
        self.def = def;
    }

    /// Messages waiting (ready or delayed).
    pub fn depth(&self) -> u64 {
        self.backlog.len()
    }

    pub fn leased(&self) -> usize {
        self.leases.len()
    }

    pub fn delayed(&self) -> usize {
        self.backlog.delayed()
    }

    pub fn bytes(&self) -> u64 {
        self.backlog.bytes() + self.leased_bytes
    }

    pub fn dead_letters(&self) -> impl DoubleEndedIterator<Item = &DeadLetter> {
        self.dead.values().map(|d| &**d)
    }

    /// Dead letters with ids above `cursor` (all without one), oldest id first.
    pub fn dead_letters_after(&self, cursor: Option<u64>) -> impl Iterator<Item = &DeadLetter> {
        let from = cursor.map_or(0, |c| c.saturating_add(1));
        self.dead.range(from..).map(|(_, d)| &**d)
    }

    pub fn dead_letter(&self, id: u64) -> Option<&DeadLetter> {
        self.dead.get(&id).map(|d| &**d)
    }

    pub fn dead_count(&self) -> usize {
        self.dead.len()
    }

    pub fn lease_of(&self, id: u64) -> Option<&Lease> {
        self.leases.get(&id)
    }

    pub fn leases(&self) -> impl Iterator<Item = &Lease> {
        self.leases.values()
    }

    /// The message of entry `id` if it is held in memory.
    pub fn cached(&self, id: u64) -> Option<&Arc<Message>> {
        self.bodies.get(&id)
    }

    pub fn cached_bytes(&self) -> u64 {
        self.cached_bytes
    }

    /// Keeps entry `id`'s message in memory (it is in the log too).
    pub fn cache(&mut self, id: u64, body: Arc<Message>) {
        let size = body_size(&body);
        if self.bodies.insert(id, body).is_none() {
            self.cached_bytes += size;
        }
    }

    /// Drops entry `id`'s message from memory (it stays in the log); the bytes freed.
    pub fn uncache(&mut self, id: u64) -> u64 {
        match self.bodies.remove(&id) {
            Some(b) => {
                let size = body_size(&b);
                self.cached_bytes -= size;
                size
            }
            None => 0,
        }
    }

    /// The lowest log position any entry (waiting, leased or dead) points at: the log before
    /// it may go. Visits every entry.
    pub fn floor(&self) -> Option<u64> {
        let waiting = self.backlog.min_position();
        let leased = self.leases.values().map(|l| l.entry.position).min();
        let dead = self.dead.values().map(|d| d.entry.position).min();
        [waiting, leased, dead].into_iter().flatten().min()
    }

    /// Whether any message has failures, and whether any has an expiry.
    pub fn has_failures_or_expiries(&self) -> (bool, bool) {
        (!self.failures.is_empty(), !self.expiry_of.is_empty())
    }

    /// Failures so far of a message still in the queue.
    pub fn failures(&self, id: u64) -> &[Failure] {
        self.failures.get(&id).map_or(&[], Vec::as_slice)
    }

    /// Every waiting entry with its due time (`None` = ready), for checkpoints.
    pub fn waiting(&self) -> impl Iterator<Item = (Entry, Option<Time>)> + '_ {
        self.backlog.iter()
    }

    /// Everything a checkpoint writes of this queue, as it is now: owned, `Send`, and
    /// unchanged by what the queue does next, so it can be written on another thread. Cheap
    /// for ready messages and dead letters (shared, not copied); delayed, leased and failed
    /// messages and expiry times are copied.
    pub fn image(&self) -> QueueImage {
        let mut leases: Vec<Lease> = self.leases.values().cloned().collect();
        leases.sort_by_key(|l| l.seq);
        QueueImage {
            def: self.def.clone(),
            waiting: self.backlog.image(),
            leases,
            failures: self.failures.clone(),
            expiry_of: self.expiry_of.clone(),
            dead: self.dead.values().cloned().collect(),
            messages: self.depth() + self.leases.len() as u64 + self.dead.len() as u64,
        }
    }

    /// The oldest message held (waiting or leased): for the oldest-age metric.
    pub fn oldest_enqueued(&self) -> Option<Time> {
        let leased = self.leases.values().map(|l| l.entry.first_enqueued).min();
        match (self.backlog.oldest_enqueued(), leased) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    // ---- decisions: read the state (and the clock), change nothing journaled ----

    /// Whether a message of `size` bytes would pass `max_messages` or `max_bytes`.
    pub fn is_full_for(&self, size: u32) -> bool {
        let messages = self.backlog.len() + self.leases.len() as u64;
        self.def.max_messages.is_some_and(|max| messages >= max)
            || self
                .def
                .max_bytes
                .is_some_and(|max| self.bytes() + u64::from(size) > max)
    }

    /// What overflow does for a new message of `size`: room, or the oldest waiting message
    /// to drop (or dead-letter) first (call again after: a large message may need several),
    /// or refused (`reject_new`, or not even every ready message would make room).
    pub fn make_room(&self, size: u32) -> Room {
        if !self.is_full_for(size) {
            return Room::Free;
        }
        if self.def.overflow == Overflow::RejectNew {
            return Room::Full;
        }
        let (ready, ready_bytes) = self.backlog.ready_totals();
        let held = self.backlog.len() + self.leases.len() as u64;
        let fits_messages = self.def.max_messages.is_none_or(|max| held - ready < max);
        let fits_bytes = self
            .def
            .max_bytes
            .is_none_or(|max| self.bytes() - ready_bytes + u64::from(size) <= max);
        if !(fits_messages && fits_bytes) {
            return Room::Full;
        }
        self.backlog
            .oldest_ready()
            .map_or(Room::Full, |e| Room::Displace(e.id))
    }

    /// The message that leases next at `now`, if any (due delayed messages join their
    /// rings first: a reordering, not a change the journal tracks).
    pub fn next_ready(&mut self, now: Time) -> Option<Entry> {
        self.backlog.promote(now);
        self.backlog.peek_next()
    }

    /// Leases whose deadline passed by `now`: (message, consumer, lease seq).
    pub fn overdue_leases(&mut self, now: Time) -> Vec<(u64, SessionId)> {
        let mut out = Vec::new();
        while let Some(&(deadline, id)) = self.deadlines.first() {
            if deadline > now {
                break;
            }
            self.deadlines.pop_first();
            if let Some(l) = self.leases.get(&id).filter(|l| l.deadline == deadline) {
                out.push((id, l.consumer));
            }
        }
        out
    }

    /// What a failed attempt of leased message `id` leads to: after `max_attempts` a dead
    /// letter, else ready again after the backoff (or `retry_after_ms`, the nack's own).
    pub fn decide_retry(
        &self,
        id: u64,
        retry_after_ms: Option<u64>,
        random: f64,
        now: Time,
    ) -> Option<Retry> {
        let lease = self.leases.get(&id)?;
        let attempts = u32::from(lease.entry.attempts) + 1;
        if attempts >= self.def.max_attempts {
            return Some(Retry::DeadLettered(Cause::MaxAttempts));
        }
        let delay = retry_after_ms.unwrap_or_else(|| self.def.backoff.delay_ms(attempts, random));
        Some(Retry::At(now.plus_millis(delay.min(super::MAX_DELAY_MS))))
    }

    /// Dead letters past `dlq_retention_s` at `now`, oldest first.
    pub fn dead_past_retention(&self, now: Time) -> Vec<u64> {
        let Some(secs) = self.def.dlq_retention_s else {
            return Vec::new();
        };
        let keep = secs.saturating_mul(1000);
        self.dead_times
            .iter()
            .take_while(|(t, _)| t.0.saturating_add(keep) <= now.0)
            .map(|(_, id)| *id)
            .collect()
    }

    /// When the queue next needs the clock: a delayed message due, a lease deadline, or a
    /// dead letter reaching its retention.
    pub fn next_deadline(&self) -> Option<Time> {
        let lease = self.deadlines.first().map(|(t, _)| *t);
        let retention = self.def.dlq_retention_s.and_then(|secs| {
            self.dead_times
                .first()
                .map(|(t, _)| t.plus_millis(secs.saturating_mul(1000)))
        });
        let expiry = self.expiries.first().map(|(t, _)| *t);
        [self.backlog.next_due(), lease, retention, expiry]
            .into_iter()
            .flatten()
            .min()
    }

    // ---- changes: exactly what a journal record says ----

    /// A message joins the queue: ready, or due at `due`, with the failures it already had
    /// (a checkpoint writes them; a new message has none).
    pub fn insert(
        &mut self,
        entry: Entry,
        body: Option<Arc<Message>>,
        due: Option<Time>,
        expires: Option<Time>,
        failures: Vec<Failure>,
    ) {
        if let Some(t) = expires {
            self.expiries.insert((t, entry.id));
            self.expiry_of.insert(entry.id, t);
        }
        if let Some(body) = body {
            self.cache(entry.id, body);
        }
        if !failures.is_empty() {
            self.failures.insert(entry.id, failures);
        }
        self.stats.enqueued += 1;
        match due {
            Some(due) => self.backlog.push_delayed(entry, due, Time(0)),
            None => self.backlog.push_ready(entry),
        }
    }

    /// Waiting message `id` is leased to `consumer` at `at`; returns the lease's seq.
    pub fn lease(&mut self, id: u64, consumer: SessionId, at: Time) -> Option<u64> {
        self.backlog.promote(at);
        let entry = self.backlog.take(id)?;
        if entry.attempts > 0 {
            self.stats.redelivered += 1;
        }
        let deadline = at.plus_millis(self.def.ack_timeout_ms);
        self.deadlines.insert((deadline, id));
        self.leased_bytes += u64::from(entry.size);
        let seq = self.next_lease;
        self.next_lease += 1;
        self.leases.insert(
            id,
            Lease {
                entry,
                consumer,
                deadline,
                seq,
            },
        );
        Some(seq)
    }

    /// Leased message `id` was acknowledged: it leaves the queue.
    pub fn ack(&mut self, id: u64) -> bool {
        let Some(lease) = self.take_lease(id) else {
            return false;
        };
        self.forget(lease.entry.id);
        self.stats.acked += 1;
        true
    }

    /// A failed attempt of leased message `id`, leading to `retry` (decided by
    /// [`Queue::decide_retry`], or `DeadLettered(Rejected)` for a consumer's outright refusal).
    pub fn fail(&mut self, id: u64, failure: Failure, retry: Retry) -> bool {
        let Some(lease) = self.take_lease(id) else {
            return false;
        };
        self.stats.nacked += 1;
        let mut entry = lease.entry;
        entry.attempts = entry.attempts.saturating_add(1);
        self.failures.entry(id).or_default().push(failure.clone());
        match retry {
            Retry::At(due) => self.backlog.push_delayed(entry, due, failure.at),
            Retry::DeadLettered(cause) => self.bury(entry, cause, failure.at),
        }
        true
    }

    /// Waiting message `id` is dropped (overflow, or expired without `dead_letter_on_expiry`).
    pub fn drop_waiting(&mut self, id: u64, expired: bool) -> bool {
        if self.backlog.take(id).is_none() {
            return false;
        }
        self.forget(id);
        if expired {
            self.stats.dropped_expired += 1;
        } else {
            self.stats.dropped_overflow += 1;
        }
        true
    }

    /// Waiting message `id` becomes a dead letter (overflow, expiry).
    pub fn dead_letter_waiting(&mut self, id: u64, cause: Cause, at: Time) -> bool {
        let Some(entry) = self.backlog.take(id) else {
            return false;
        };
        self.bury(entry, cause, at);
        true
    }

    /// Dead letter `id` is ready again with its attempts at 0; it keeps its failures.
    pub fn redrive(&mut self, id: u64) -> bool {
        let Some(d) = self.dead.remove(&id) else {
            return false;
        };
        self.dead_times.remove(&(d.dead_lettered, id));
        let d = Arc::unwrap_or_clone(d);
        let mut entry = d.entry;
        entry.attempts = 0;
        if !d.failures.is_empty() {
            self.failures.insert(id, d.failures);
        }
        self.backlog.push_ready(entry);
        true
    }

    /// Dead letter `id` is gone.
    pub fn discard(&mut self, id: u64) -> bool {
        let Some(d) = self.dead.remove(&id) else {
            return false;
        };
        self.dead_times.remove(&(d.dead_lettered, id));
        self.uncache(id);
        true
    }

    /// A dead letter exactly as a checkpoint wrote it (its message stays in the log).
    pub fn restore_dead(&mut self, dead: DeadLetter) {
        self.dead_times.insert((dead.dead_lettered, dead.entry.id));
        self.dead.insert(dead.entry.id, Arc::new(dead));
    }

    fn take_lease(&mut self, id: u64) -> Option<Lease> {
        let lease = self.leases.remove(&id)?;
        self.deadlines.remove(&(lease.deadline, id));
        self.leased_bytes -= u64::from(lease.entry.size);
        Some(lease)
    }

    fn forget(&mut self, id: u64) {
        self.failures.remove(&id);
        self.uncache(id);
        self.forget_expiry(id);
    }

    fn forget_expiry(&mut self, id: u64) {
        if let Some(t) = self.expiry_of.remove(&id) {
            self.expiries.remove(&(t, id));
        }
    }

    /// When message `id` expires, if it has an expiry.
    pub fn expiry_of(&self, id: u64) -> Option<Time> {
        self.expiry_of.get(&id).copied()
    }

    /// Waiting messages whose expiry has passed by `now`, taken off the expiry index (a
    /// leased one is left to its lease: if it fails, its next lease finds it expired).
    pub fn take_expired(&mut self, now: Time) -> Vec<u64> {
        let mut out = Vec::new();
        while let Some(&(t, id)) = self.expiries.first() {
            if t > now {
                break;
            }
            self.expiries.pop_first();
            self.expiry_of.remove(&id);
            if !self.leases.contains_key(&id) && !self.dead.contains_key(&id) {
                out.push(id);
            }
        }
        out
    }

    fn bury(&mut self, entry: Entry, cause: Cause, at: Time) {
        self.forget_expiry(entry.id);
        let failures = self.failures.remove(&entry.id).unwrap_or_default();
        *self.stats.dead_lettered.entry(cause).or_default() += 1;
        self.dead_times.insert((at, entry.id));
        self.dead.insert(
            entry.id,
            Arc::new(DeadLetter {
                entry,
                cause,
                failures,
                dead_lettered: at,
            }),
        );
    }
}
