//! One queue's state machine: accepting messages under its overflow policy, leasing them to
//! consumers, and what an ack, a nack, an ack timeout or a lost consumer does to them. Plain
//! data on a virtual clock; random draws (jitter) come in as arguments. Not yet journaled or
//! reachable from the broker (docs/queues.md).

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};
use std::sync::Arc;

use super::backlog::{Backlog, Entry};
use super::policy::{Overflow, QueueDef};
use crate::{SessionId, Time};

/// One failed attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub at: Time,
    /// The nack's reason code, or 0x80 for an ack timeout or a lost consumer.
    pub reason_code: u8,
    /// The nack's reason string, or what the broker saw ("ack timeout", "consumer gone").
    pub reason: Arc<str>,
    pub consumer: SessionId,
}

/// Why a message became a dead letter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Cause {
    MaxAttempts,
    Expired,
    Overflow,
    Rejected,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub entry: Entry,
    pub cause: Cause,
    pub failures: Vec<Failure>,
    pub dead_lettered: Time,
}

/// What happened to a message offered to the queue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Enqueued {
    Accepted,
    /// Full under `reject_new`, or full with nothing ready to make room.
    Refused,
    /// Accepted; to make room the oldest ready message was dropped (`drop_oldest`).
    Displaced(Entry),
    /// Accepted; to make room the oldest ready message became a dead letter (`dead_letter`).
    DeadLettered(u64),
}

/// What a failed attempt led to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Retry {
    /// Ready again at this time.
    At(Time),
    DeadLettered(Cause),
}

/// A message leased to a consumer.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Lease {
    entry: Entry,
    consumer: SessionId,
    deadline: Time,
}

/// Counters for the queue's metrics.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueStats {
    pub acked: u64,
    pub nacked: u64,
    pub redelivered: u64,
    pub dropped_overflow: u64,
    pub dropped_expired: u64,
    pub dead_lettered: BTreeMap<Cause, u64>,
}

/// A queue: its definition, what waits, what is leased, and its dead letters.
#[derive(Debug)]
pub struct Queue {
    def: QueueDef,
    backlog: Backlog,
    leases: HashMap<u64, Lease>,
    /// Lease deadlines by time; stale after an ack (checked against `leases`).
    deadlines: BinaryHeap<Reverse<(Time, u64)>>,
    /// Failures of messages still in the queue, by message id.
    failures: HashMap<u64, Vec<Failure>>,
    dead: BTreeMap<u64, DeadLetter>,
    leased_bytes: u64,
    pub stats: QueueStats,
}

impl Queue {
    pub fn new(def: QueueDef) -> Queue {
        Queue {
            def,
            backlog: Backlog::default(),
            leases: HashMap::new(),
            deadlines: BinaryHeap::new(),
            failures: HashMap::new(),
            dead: BTreeMap::new(),
            leased_bytes: 0,
            stats: QueueStats::default(),
        }
    }

    pub fn def(&self) -> &QueueDef {
        &self.def
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

    pub fn dead_letters(&self) -> impl Iterator<Item = &DeadLetter> {
        self.dead.values()
    }

    /// Offers a message, ready at `due` (or at once). The limits count everything the queue
    /// holds, leased messages too.
    pub fn enqueue(&mut self, entry: Entry, due: Option<Time>, now: Time) -> Enqueued {
        let mut result = Enqueued::Accepted;
        if self.over_limits(&entry) {
            result = match self.def.overflow {
                Overflow::RejectNew => return Enqueued::Refused,
                Overflow::DropOldest => match self.backlog.pop_oldest_ready() {
                    Some(old) => {
                        self.failures.remove(&old.id);
                        self.stats.dropped_overflow += 1;
                        Enqueued::Displaced(old)
                    }
                    None => return Enqueued::Refused,
                },
                Overflow::DeadLetter => match self.backlog.pop_oldest_ready() {
                    Some(old) => {
                        let id = old.id;
                        self.dead_letter(old, Cause::Overflow, now);
                        Enqueued::DeadLettered(id)
                    }
                    None => return Enqueued::Refused,
                },
            };
        }
        match due {
            Some(due) => self.backlog.push_delayed(entry, due, now),
            None => self.backlog.push_ready(entry),
        }
        result
    }

    fn over_limits(&self, new: &Entry) -> bool {
        let messages = self.backlog.len() + self.leases.len() as u64;
        let bytes = self.backlog.bytes() + self.leased_bytes;
        self.def.max_messages.is_some_and(|max| messages >= max)
            || self
                .def
                .max_bytes
                .is_some_and(|max| bytes + u64::from(new.size) > max)
    }

    /// Leases the next message to `consumer` until `now + ack_timeout_ms`. Expired messages
    /// met on the way are dropped or dead-lettered (`dead_letter_on_expiry`).
    pub fn lease(
        &mut self,
        consumer: SessionId,
        now: Time,
        expired: impl Fn(&Entry) -> bool,
    ) -> Option<Entry> {
        loop {
            let entry = self.backlog.pop_next(now)?;
            if expired(&entry) {
                if self.def.dead_letter_on_expiry {
                    self.dead_letter(entry, Cause::Expired, now);
                } else {
                    self.failures.remove(&entry.id);
                    self.stats.dropped_expired += 1;
                }
                continue;
            }
            if entry.attempts > 0 {
                self.stats.redelivered += 1;
            }
            let deadline = now.plus_millis(self.def.ack_timeout_ms);
            self.deadlines.push(Reverse((deadline, entry.id)));
            self.leased_bytes += u64::from(entry.size);
            self.leases.insert(
                entry.id,
                Lease {
                    entry,
                    consumer,
                    deadline,
                },
            );
            return Some(entry);
        }
    }

    /// `consumer` acknowledged message `id`: it leaves the queue. False if it was not leased
    /// to that consumer (a late ack after the lease was returned).
    pub fn ack(&mut self, id: u64, consumer: SessionId) -> bool {
        if self.take_lease(id, consumer).is_none() {
            return false;
        }
        self.failures.remove(&id);
        self.stats.acked += 1;
        true
    }

    /// Ends the lease of message `id` if `consumer` holds it.
    fn take_lease(&mut self, id: u64, consumer: SessionId) -> Option<Lease> {
        if self.leases.get(&id)?.consumer != consumer {
            return None;
        }
        let lease = self.leases.remove(&id)?;
        self.leased_bytes -= u64::from(lease.entry.size);
        Some(lease)
    }

    /// A failed attempt of a leased message (a nack, or the broker's timeout or consumer
    /// loss): ready again after the backoff (or `retry_after_ms`, a nack's own delay), or a
    /// dead letter after `max_attempts`. `None` if it was not leased to that consumer.
    pub fn fail(
        &mut self,
        id: u64,
        failure: Failure,
        retry_after_ms: Option<u64>,
        random: f64,
        now: Time,
    ) -> Option<Retry> {
        let lease = self.take_lease(id, failure.consumer)?;
        self.stats.nacked += 1;
        let mut entry = lease.entry;
        entry.attempts = entry.attempts.saturating_add(1);
        self.failures.entry(id).or_default().push(failure);
        if u32::from(entry.attempts) >= self.def.max_attempts {
            self.dead_letter(entry, Cause::MaxAttempts, now);
            return Some(Retry::DeadLettered(Cause::MaxAttempts));
        }
        let delay = retry_after_ms
            .unwrap_or_else(|| self.def.backoff.delay_ms(u32::from(entry.attempts), random));
        let due = now.plus_millis(delay.min(super::MAX_DELAY_MS));
        self.backlog.push_delayed(entry, due, now);
        Some(Retry::At(due))
    }

    /// The consumer refused the message outright (MQTT 5 reason 0x99, payload format
    /// invalid): a dead letter at once, cause `rejected`.
    pub fn reject(&mut self, id: u64, failure: Failure, now: Time) -> bool {
        let Some(lease) = self.take_lease(id, failure.consumer) else {
            return false;
        };
        self.stats.nacked += 1;
        let mut entry = lease.entry;
        entry.attempts = entry.attempts.saturating_add(1);
        self.failures.entry(id).or_default().push(failure);
        self.dead_letter(entry, Cause::Rejected, now);
        true
    }

    /// Leases past their deadline by `now` fail ("ack timeout"); returns what became of each.
    pub fn expire_leases(
        &mut self,
        now: Time,
        mut random: impl FnMut() -> f64,
    ) -> Vec<(u64, Retry)> {
        let mut out = Vec::new();
        while let Some(Reverse((deadline, id))) = self.deadlines.peek().copied() {
            if deadline > now {
                break;
            }
            self.deadlines.pop();
            // Stale: acked, failed, or leased again since.
            let Some(lease) = self.leases.get(&id).filter(|l| l.deadline == deadline) else {
                continue;
            };
            let failure = Failure {
                at: now,
                reason_code: 0x80,
                reason: "ack timeout".into(),
                consumer: lease.consumer,
            };
            if let Some(r) = self.fail(id, failure, None, random(), now) {
                out.push((id, r));
            }
        }
        out
    }

    /// The consumer went away: every lease it held is a failed attempt, at once.
    pub fn release_consumer(
        &mut self,
        consumer: SessionId,
        now: Time,
        mut random: impl FnMut() -> f64,
    ) -> Vec<(u64, Retry)> {
        let mut ids: Vec<u64> = self
            .leases
            .iter()
            .filter(|(_, l)| l.consumer == consumer)
            .map(|(id, _)| *id)
            .collect();
        ids.sort_unstable();
        let mut out = Vec::new();
        for id in ids {
            let failure = Failure {
                at: now,
                reason_code: 0x80,
                reason: "consumer gone".into(),
                consumer,
            };
            if let Some(r) = self.fail(id, failure, None, random(), now) {
                out.push((id, r));
            }
        }
        out
    }

    /// When the queue next needs the clock: a delayed message due, or a lease deadline.
    pub fn next_deadline(&self) -> Option<Time> {
        let lease = self.deadlines.peek().map(|Reverse((t, _))| *t);
        match (self.backlog.next_due(), lease) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn dead_letter(&mut self, entry: Entry, cause: Cause, now: Time) {
        let failures = self.failures.remove(&entry.id).unwrap_or_default();
        *self.stats.dead_lettered.entry(cause).or_default() += 1;
        self.dead.insert(
            entry.id,
            DeadLetter {
                entry,
                cause,
                failures,
                dead_lettered: now,
            },
        );
    }
}
