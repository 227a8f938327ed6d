//! Checkpoints: the whole durable state written as records, so the log before it can go.
//!
//! A checkpoint sits between `CheckpointBegin` and `CheckpointEnd`; replay starts afresh at
//! `CheckpointBegin`, and keeps the state before it until `CheckpointEnd` is read (a crash
//! can cut a checkpoint larger than one log batch short). The driver appends a checkpoint as
//! one append, and deletes the log before it only once it is durable.
//!
//! Work queues can hold millions of entries. [`Broker::checkpoint_in_chunks`] does not write
//! them in the router's step (that stalled routing for over a second per 10M): it takes an
//! image of each queue (`Queue::image`: the backlog's chunks shared, not copied) as a
//! [`QueueSnapshot`], writes a `QueueSnapshot` record naming it where the entries would go,
//! and the driver writes the snapshot's records to a file beside the log on another thread.
//! Replay reads them back at that record, so the state is the same as if they were inline.

use std::sync::Arc;

use super::format;
use super::record::Record;
use super::record::{QDeadLetter, QEnqueue};
use super::JournalBuf;
use crate::broker::Outbox;
use crate::session::{OutState, Session};
use crate::workqueue::{Entry, QueueImage};
use crate::{Broker, SessionId, Time};

impl Broker {
    /// Writes the whole durable state as one checkpoint into `out.journal`, queue entries
    /// included; once it is durable, everything before `CheckpointBegin` is no longer needed
    /// (work queues aside: [`Broker::queue_floor`]). Returns how many records `out.journal`
    /// held before `CheckpointBegin`.
    pub fn checkpoint(&mut self, out: &mut Outbox) -> Option<u64> {
        self.write_checkpoint(out, usize::MAX, &mut |_| {}, false)
            .map(|(begin, _)| begin)
    }

    /// [`Broker::checkpoint`], handing the records to `flush` whenever `out.journal` holds
    /// more than `chunk_bytes` (and the rest at the end, left in `out.journal`), so a large
    /// state never sits in memory twice whole; and with the queues' entries (millions, in a
    /// large backlog) not written here but taken as a [`QueueSnapshot`] that the driver
    /// writes on another thread, beside the log, while the engine goes on. The checkpoint
    /// names the snapshot; the driver must treat the checkpoint as durable only once the
    /// snapshot is too (a checkpoint whose snapshot is missing is void on replay, see
    /// [`Broker::restore_with`]). The driver appends the chunks in order; a crash between
    /// them leaves an unfinished checkpoint, which replay ignores.
    pub fn checkpoint_in_chunks(
        &mut self,
        out: &mut Outbox,
        chunk_bytes: usize,
        flush: &mut dyn FnMut(&mut Outbox),
    ) -> Option<(u64, Option<QueueSnapshot>)> {
        self.write_checkpoint(out, chunk_bytes, flush, true)
    }

    fn write_checkpoint(
        &mut self,
        out: &mut Outbox,
        chunk_bytes: usize,
        flush: &mut dyn FnMut(&mut Outbox),
        snapshot: bool,
    ) -> Option<(u64, Option<QueueSnapshot>)> {
        let j = self.journal.as_mut()?;
        // Every message body is written again in the new generation.
        j.generation += 1;
        let begin = out.journal.len();
        let id = j.next_offset;
        let (next_session, next_message) = (self.next_session, self.next_message_id);
        j.push(out, |b| {
            format::encode_checkpoint_begin(b, next_session, next_message)
        });
        let mut full = |out: &mut Outbox| {
            if out.journal.bytes() > chunk_bytes {
                flush(out);
            }
        };
        for m in self.retained.all() {
            if !m.topic.starts_with("$SYS") {
                j.write(&Record::Retain(m), out);
                full(out);
            }
        }
        // Queues before sessions: a session's `$share/{queue}/…` subscription is a consumer
        // only if its queue exists when the subscription is applied.
        let mut images = Vec::new();
        for (name, q) in &self.queues.by_name {
            j.write(&Record::QueueDeclare(Box::new(q.def().clone())), out);
            if q.depth() + q.leased() as u64 + q.dead_count() as u64 > 0 {
                images.push((name.clone(), q.image()));
            }
        }
        let mut taken = None;
        if snapshot && !images.is_empty() {
            j.push(out, |b| format::encode_queue_snapshot(b, id));
            // Known once the snapshot is written (`QueueSnapshot::write`).
            self.queues.checkpoint_floor = None;
            taken = Some(QueueSnapshot { id, images });
        } else {
            let mut floor: Option<u64> = None;
            for (name, image) in &images {
                let f = queue_records(name, image, |r| {
                    j.write(r, out);
                    full(out);
                });
                floor = floor.min(f).or(floor).or(f);
            }
            // Found while writing the index, so the driver need not scan it again.
            self.queues.checkpoint_floor = floor;
        }
        let mut ids: Vec<&SessionId> = self.sessions.keys().collect();
        ids.sort_unstable();
        for sid in ids {
            let s = &self.sessions[sid];
            if s.journaled {
                session_records(s, |r| j.write(r, out));
                full(out);
            }
        }
        j.push(out, format::encode_checkpoint_end);
        Some((begin, taken))
    }
}

/// The work queues' entries as of a checkpoint ([`Broker::checkpoint_in_chunks`]): owned,
/// `Send`, unchanged by what the engine does next (it shares the backlog's chunks rather
/// than copying them), to be written as records on another thread while the engine goes on.
#[derive(Debug)]
pub struct QueueSnapshot {
    id: u64,
    images: Vec<(Arc<str>, QueueImage)>,
}

impl QueueSnapshot {
    /// What the checkpoint calls it (the log offset of its `CheckpointBegin`): replay asks
    /// for it by this number.
    pub fn id(&self) -> u64 {
        self.id
    }

    /// Messages it holds: waiting, leased and dead.
    pub fn messages(&self) -> u64 {
        self.images.iter().map(|(_, q)| q.messages).sum()
    }

    /// Encodes its records, handing them to `flush` whenever the buffer holds more than
    /// `chunk_bytes` (and the rest at the end). Returns the lowest log position an entry
    /// points at: the log below it may go once the checkpoint is durable.
    pub fn write(&self, chunk_bytes: usize, flush: &mut dyn FnMut(&mut JournalBuf)) -> Option<u64> {
        let mut buf = JournalBuf::default();
        let mut floor: Option<u64> = None;
        for (name, image) in &self.images {
            let f = queue_records(name, image, |r| {
                buf.push(|b| format::encode(b, r));
                if buf.bytes() > chunk_bytes {
                    flush(&mut buf);
                }
            });
            floor = floor.min(f).or(floor).or(f);
        }
        if !buf.is_empty() {
            flush(&mut buf);
        }
        floor
    }
}

/// Everything of one session, as the records that rebuild it, one at a time (a checkpoint of
/// a large backlog must not hold them all): the session, its subscriptions, inbound QoS 2
/// ids, in-flight messages in send order (replay keeps that order for redelivery), the queue
/// in order, and a pending will.
pub(super) fn session_records(s: &Session, mut emit: impl FnMut(&Record)) {
    let sid = s.id;
    emit(&Record::Session {
        sid,
        client_id: s.client_id.clone(),
        version: s.version,
        expiry: s.expiry_interval,
        disconnected_at: s.disconnected_at,
    });
    let mut subs: Vec<(&String, _)> = s.subscriptions.iter().collect();
    subs.sort_unstable_by(|a, b| a.0.cmp(b.0));
    for (raw, sub) in subs {
        emit(&Record::Subscribe {
            sid,
            raw: raw.clone(),
            sub: sub.clone(),
        });
    }
    let mut qos2: Vec<_> = s.inbound_qos2.iter().copied().collect();
    qos2.sort_unstable();
    for pid in qos2 {
        emit(&Record::Qos2In { sid, pid });
    }
    for pid in s.inflight_in_order() {
        let f = &s.inflight[&pid];
        if f.pending.queue.is_some() {
            // A queue delivery: its queue's lease is what is durable.
            continue;
        }
        emit(&Record::Sent {
            sid,
            pid,
            pending: f.pending.clone(),
        });
        if f.state == OutState::AwaitPubComp {
            emit(&Record::PubRec { sid, pid });
        }
    }
    for p in &s.pending {
        emit(&Record::Enqueue {
            sid,
            pending: p.clone(),
        });
    }
    if let Some((will, due)) = s.pending_will.as_deref() {
        emit(&Record::Will {
            sid,
            will: Box::new(will.clone()),
            due: *due,
        });
    }
}

/// Waiting entries per `QEntries` record in a checkpoint.
const PACK: usize = 4096;

/// Everything of one queue's entries as the records that rebuild them (its definition is
/// written before): each waiting message (with its due time, attempts and failures), each
/// leased one (waiting, then its lease), and each dead letter. Messages are not written
/// again: each entry points at the record that holds its message (so the log below the
/// lowest such position stays; `Broker::queue_floor`).
/// Returns the lowest log position of its entries (the queue's floor).
fn queue_records(name: &Arc<str>, q: &QueueImage, mut emit: impl FnMut(&Record)) -> Option<u64> {
    let mut floor = u64::MAX;
    let enqueue = |entry: Entry, due, failures: &[crate::workqueue::Failure]| {
        Record::QEnqueue(Box::new(QEnqueue {
            queue: name.clone(),
            entry,
            message: None,
            due,
            expires: q.expiry_of(entry.id),
            failures: failures.to_vec(),
        }))
    };
    // Most entries have no failures: packed, a few thousand a record, without an
    // allocation each (a 10M backlog's index is written in a fraction of the time).
    let mut packed: Vec<(Entry, Option<Time>)> = Vec::with_capacity(PACK);
    // Two lookups per entry cost more than the rest of its record: skipped when no entry
    // has failures or an expiry (the usual backlog).
    let (any_failures, any_expiry) = q.has_failures_or_expiries();
    for (entry, due) in q.waiting.iter() {
        floor = floor.min(entry.position);
        let failures = if any_failures {
            q.failures(entry.id)
        } else {
            &[]
        };
        if failures.is_empty() && !(any_expiry && q.expiry_of(entry.id).is_some()) {
            packed.push((entry, due));
            if packed.len() == PACK {
                emit(&Record::QEntries {
                    queue: name.clone(),
                    entries: std::mem::replace(&mut packed, Vec::with_capacity(PACK)),
                });
            }
        } else {
            // In ring order: what was packed before it goes first.
            if !packed.is_empty() {
                emit(&Record::QEntries {
                    queue: name.clone(),
                    entries: std::mem::replace(&mut packed, Vec::with_capacity(PACK)),
                });
            }
            emit(&enqueue(entry, due, failures));
        }
    }
    if !packed.is_empty() {
        emit(&Record::QEntries {
            queue: name.clone(),
            entries: packed,
        });
    }
    for l in &q.leases {
        let id = l.entry.id;
        floor = floor.min(l.entry.position);
        emit(&enqueue(l.entry, None, q.failures(id)));
        let at = Time(l.deadline.0.saturating_sub(q.def.ack_timeout_ms));
        emit(&Record::QLease {
            queue: name.clone(),
            message: id,
            consumer: l.consumer,
            at,
        });
    }
    for d in &q.dead {
        floor = floor.min(d.entry.position);
        emit(&Record::QDeadLetter(Box::new(QDeadLetter {
            queue: name.clone(),
            dead: (**d).clone(),
        })));
    }
    (floor != u64::MAX).then_some(floor)
}
