//! Checkpoints: the whole durable state written as records, so the log before it can go.
//!
//! A checkpoint sits between `CheckpointBegin` and `CheckpointEnd`; replay starts afresh at
//! `CheckpointBegin`, and keeps the state before it until `CheckpointEnd` is read (a crash
//! can cut a checkpoint larger than one log batch short). The driver appends a checkpoint as
//! one append, and deletes the log before it only once it is durable.

use super::format;
use super::record::Record;
use super::record::{QDeadLetter, QEnqueue};
use crate::broker::Outbox;
use crate::session::{OutState, Session};
use crate::workqueue::Queue;
use crate::{Broker, SessionId, Time};

impl Broker {
    /// Writes the whole durable state as one checkpoint into `out.journal`; once it is
    /// durable, everything before `CheckpointBegin` is no longer needed (work queues aside:
    /// [`Broker::queue_floor`]). Returns how many records `out.journal` held before
    /// `CheckpointBegin`.
    pub fn checkpoint(&mut self, out: &mut Outbox) -> Option<u64> {
        self.checkpoint_in_chunks(out, usize::MAX, &mut |_| {})
    }

    /// [`Broker::checkpoint`], handing the records to `flush` whenever `out.journal` holds
    /// more than `chunk_bytes` (and the rest at the end, left in `out.journal`), so a large
    /// state never sits in memory twice whole. The driver appends the chunks in order; a
    /// crash between them leaves an unfinished checkpoint, which replay ignores.
    pub fn checkpoint_in_chunks(
        &mut self,
        out: &mut Outbox,
        chunk_bytes: usize,
        flush: &mut dyn FnMut(&mut Outbox),
    ) -> Option<u64> {
        let j = self.journal.as_mut()?;
        // Every message body is written again in the new generation.
        j.generation += 1;
        let begin = out.journal.len();
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
        let mut floor: Option<u64> = None;
        for (name, q) in &self.queues.by_name {
            let f = queue_records(name, q, |r| {
                j.write(r, out);
                full(out);
            });
            floor = floor.min(f).or(floor).or(f);
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
        // Found while writing the index, so the driver need not scan it again.
        self.queues.checkpoint_floor = floor;
        Some(begin)
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

/// Everything of one queue as the records that rebuild it: its definition, each waiting
/// message (with its due time, attempts and failures), each leased one (waiting, then its
/// lease), and each dead letter. Messages are not written again: each entry points at the
/// record that holds its message (so the log below the lowest such position stays;
/// `Broker::queue_floor`).
/// Returns the lowest log position of its entries (the queue's floor).
fn queue_records(
    name: &std::sync::Arc<str>,
    q: &Queue,
    mut emit: impl FnMut(&Record),
) -> Option<u64> {
    let mut floor = u64::MAX;
    emit(&Record::QueueDeclare(Box::new(q.def().clone())));
    let enqueue = |entry: crate::workqueue::Entry, due, failures: &[crate::workqueue::Failure]| {
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
    let mut packed: Vec<(crate::workqueue::Entry, Option<Time>)> = Vec::with_capacity(PACK);
    // Two lookups per entry cost more than the rest of its record: skipped when no entry
    // has failures or an expiry (the usual backlog).
    let (any_failures, any_expiry) = q.has_failures_or_expiries();
    for (entry, due) in q.waiting() {
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
    let mut leases: Vec<_> = q.leases().collect();
    leases.sort_by_key(|l| l.seq);
    for l in leases {
        let id = l.entry.id;
        floor = floor.min(l.entry.position);
        emit(&enqueue(l.entry, None, q.failures(id)));
        let at = Time(l.deadline.0.saturating_sub(q.def().ack_timeout_ms));
        emit(&Record::QLease {
            queue: name.clone(),
            message: id,
            consumer: l.consumer,
            at,
        });
    }
    for d in q.dead_letters() {
        floor = floor.min(d.entry.position);
        emit(&Record::QDeadLetter(Box::new(QDeadLetter {
            queue: name.clone(),
            dead: d.clone(),
        })));
    }
    (floor != u64::MAX).then_some(floor)
}
