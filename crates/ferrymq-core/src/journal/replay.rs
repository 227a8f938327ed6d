//! Replay: rebuilding durable state from the log, through the same [`Broker::apply`] the live
//! engine uses.

use std::sync::Arc;

use rustc_hash::FxHashMap as HashMap;

use super::format::{self, Decoded, Messages};
use super::{JournalError, RestoreReport};
use crate::broker::Timer;
use crate::session::Session;
use crate::{Broker, Message, SessionId, Time, SESSION_NEVER_EXPIRES};

/// The state a checkpoint replaces, kept until its `CheckpointEnd` is read: a checkpoint
/// too large for one log batch can be cut short by a crash, and then the state before it
/// (still in the log, as nothing is reclaimed before a checkpoint is durable) stands.
struct Saved {
    sessions: HashMap<SessionId, Box<Session>>,
    by_client_id: std::collections::HashMap<Arc<str>, SessionId>,
    subs: crate::SubscriptionTree,
    retained: crate::RetainedStore,
    queues: crate::queues::Queues,
}

impl Saved {
    fn put_back(self, b: &mut Broker) {
        b.sessions = self.sessions;
        b.by_client_id = self.by_client_id;
        b.subs = self.subs;
        b.retained = self.retained;
        b.queues = self.queues;
    }
}

/// Message bodies read so far (since the last checkpoint began).
#[derive(Default)]
struct Bodies {
    messages: HashMap<u64, Arc<Message>>,
    /// The will message read just before its `Will` record.
    last_will: Option<Message>,
}

impl Messages for Bodies {
    fn message(&self, id: u64) -> Option<Arc<Message>> {
        self.messages.get(&id).cloned()
    }
    fn take_will(&mut self) -> Option<Message> {
        self.last_will.take()
    }
}

impl Broker {
    /// Rebuilds durable state from journal records, oldest first. Call on a fresh broker,
    /// before [`Broker::enable_journal`] and before any connection. `now` becomes the
    /// disconnect time of sessions that were connected when the journal ended.
    /// A checkpoint whose queues are in a snapshot file cannot be used this way (it counts
    /// as void, see [`Broker::restore_with`]).
    pub fn restore<'a>(
        &mut self,
        records: impl IntoIterator<Item = &'a [u8]>,
        now: Time,
    ) -> Result<RestoreReport, JournalError> {
        self.restore_with(records, now, &mut |_| {
            Err("no queue snapshots were given to replay".into())
        })
    }

    /// [`Broker::restore`], with `snapshots` giving the records of queue snapshot `id`
    /// (written by [`QueueSnapshot::write`](super::QueueSnapshot::write)) when a checkpoint
    /// names one. A checkpoint whose snapshot cannot be had is void: the state before it
    /// stands and the records after it apply to that (nothing before a checkpoint is
    /// reclaimed until its snapshot is durable, so that state is whole).
    pub fn restore_with<'a>(
        &mut self,
        records: impl IntoIterator<Item = &'a [u8]>,
        now: Time,
        snapshots: &mut dyn FnMut(u64) -> Result<Vec<bytes::Bytes>, String>,
    ) -> Result<RestoreReport, JournalError> {
        let mut bodies = Bodies::default();
        let mut saved: Option<Saved> = None;
        // Why the checkpoint being read is void, if it is.
        let mut void: Option<String> = None;
        let mut r = RestoreReport::default();
        for (index, record) in records.into_iter().enumerate() {
            r.records += 1;
            match format::decode(record, index as u64, &mut bodies)? {
                Decoded::Change(change) => {
                    if self.apply(change).is_err() {
                        r.skipped += 1;
                    }
                }
                Decoded::Message(m) => {
                    if m.id == 0 {
                        bodies.last_will = Some(m);
                    } else {
                        self.next_message_id = self.next_message_id.max(m.id + 1);
                        bodies.messages.insert(m.id, Arc::new(m));
                    }
                }
                Decoded::UnknownMessage => r.skipped += 1,
                Decoded::CheckpointBegin {
                    next_session,
                    next_message,
                } => {
                    // The checkpoint holds the whole state: start from nothing, keeping the
                    // old state until the checkpoint is known whole.
                    let before = Saved {
                        sessions: std::mem::take(&mut self.sessions),
                        by_client_id: std::mem::take(&mut self.by_client_id),
                        subs: std::mem::take(&mut self.subs),
                        retained: std::mem::take(&mut self.retained),
                        queues: self.queues.take_state(),
                    };
                    // Inside a checkpoint the log never finished (a crash cut it; the next
                    // start wrote a new one after it): what the unfinished one built is
                    // dropped, and the state before it is still what stands until this one
                    // ends.
                    if saved.is_none() {
                        saved = Some(before);
                    }
                    // A void checkpoint cut short is over: this one stands on its own.
                    void = None;
                    bodies.messages.clear();
                    self.next_session = self.next_session.max(next_session);
                    self.next_message_id = self.next_message_id.max(next_message);
                }
                Decoded::QueueSnapshot { id } => {
                    if saved.is_none() || void.is_some() {
                        // Only a checkpoint names a snapshot (and a void one needs none).
                        r.skipped += u64::from(saved.is_none());
                        continue;
                    }
                    match snapshots(id) {
                        Ok(records) => {
                            for rec in &records {
                                match format::decode(rec, index as u64, &mut bodies)? {
                                    Decoded::Change(change) => {
                                        if self.apply(change).is_err() {
                                            r.skipped += 1;
                                        }
                                    }
                                    _ => {
                                        return Err(JournalError::Invalid {
                                            index: index as u64,
                                            what: format!(
                                                "queue snapshot {id} holds a record that is \
                                                 not a queue change"
                                            ),
                                        })
                                    }
                                }
                            }
                        }
                        Err(e) => void = Some(format!("queue snapshot {id}: {e}")),
                    }
                }
                Decoded::CheckpointEnd => {
                    if let (Some(why), Some(before)) = (void.take(), saved.take()) {
                        before.put_back(self);
                        r.void_checkpoints += 1;
                        r.void_reason = Some(why);
                    }
                    saved = None;
                }
            }
        }
        if let Some(saved) = saved.take() {
            // The log ends inside a checkpoint: the state before it stands.
            saved.put_back(self);
            r.incomplete_checkpoint = true;
        }
        // Sessions connected at the crash were disconnected by it.
        for s in self.sessions.values_mut() {
            s.journaled = true;
            if s.disconnected_at.is_none() {
                self.restored_disconnects.push(s.id);
            }
            let at = *s.disconnected_at.get_or_insert(now);
            if s.expiry_interval != SESSION_NEVER_EXPIRES {
                let due = at.plus_secs(s.expiry_interval).max(now);
                self.timers
                    .push(std::cmp::Reverse((due, Timer::SessionExpiry(s.id))));
            }
            if let Some((_, due)) = s.pending_will.as_deref() {
                self.timers
                    .push(std::cmp::Reverse(((*due).max(now), Timer::Will(s.id))));
                r.pending_wills += 1;
            }
            r.subscriptions += s.subscriptions.len();
            r.queued += s.inflight.len() + s.pending.len();
            r.inbound_qos2 += s.inbound_qos2.len();
        }
        // Leases outstanding at the crash are returned when journaling starts.
        self.queues.restored_at = Some(now);
        r.queues = self.queues.by_name.len();
        r.queue_messages = self
            .queues
            .by_name
            .values()
            .map(|q| q.depth() + q.leased() as u64 + q.dead_count() as u64)
            .sum();
        r.sessions = self.sessions.len();
        r.retained = self.retained.len();
        let max_message = self.max_message_id();
        self.next_message_id = self.next_message_id.max(max_message + 1);
        let max_session = self.sessions.keys().map(|s| s.0).max().unwrap_or(0);
        self.next_session = self.next_session.max(max_session + 1);
        Ok(r)
    }

    fn max_message_id(&self) -> u64 {
        let retained = self.retained.all().iter().map(|m| m.id).max().unwrap_or(0);
        let queued = self
            .sessions
            .values()
            .flat_map(|s| {
                s.pending
                    .iter()
                    .map(|p| p.message.id)
                    .chain(s.inflight.values().map(|f| f.pending.message.id))
            })
            .max()
            .unwrap_or(0);
        retained.max(queued)
    }
}
