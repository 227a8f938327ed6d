//! The one list of changes to durable state, and the one function that makes them.
//!
//! The live engine never edits durable state by hand: it builds a [`Record`] and passes it to
//! [`Broker::commit`], which writes it to the journal (when the session is journaled) and then
//! calls [`Broker::apply`]. Replay decodes the same records and calls the same `apply`. So
//! what a restarted broker rebuilds is, by construction, what the live broker held; a Raft
//! follower will apply the same records the same way.
//!
//! Records name what they change (a session, a packet id, a message id), not "the front of a
//! queue": if replay ever finds state other than what a record names, it says so
//! ([`Missing`]) instead of changing another message. (Live code always moves the front of a
//! queue; a message queued twice for one session, through a plain and a shared subscription,
//! is taken front first, so the id picks the entry live code took.)

use std::sync::Arc;

use ferrymq_mqtt::{PacketId, ProtocolVersion, Will};

use crate::session::{OutState, Pending, Session, Subscription};
use crate::workqueue::{Cause, DeadLetter, Entry, Failure, QueueDef, Retry};
use crate::{Broker, Message, SessionId, SubEntry, Time};

/// A message joining a queue (boxed in [`Record`]: the largest change). Live, the record
/// carries the message and its `entry.position` is the record's own log offset: a queue's
/// payloads are read back from there. A checkpoint writes it without the message, pointing
/// at the record that has it; replay never loads messages (they are read when needed).
#[derive(Debug, Clone)]
pub(crate) struct QEnqueue {
    pub queue: Arc<str>,
    pub entry: Entry,
    pub message: Option<Arc<Message>>,
    /// Ready at this time (`None`: at once).
    pub due: Option<Time>,
    /// When the message expires (its MQTT 5 message expiry), if it does.
    pub expires: Option<Time>,
    /// Failures it already had (a checkpoint writes them; a new message has none).
    pub failures: Vec<Failure>,
}

/// A dead letter whole, as a checkpoint writes it (its message stays at its position).
#[derive(Debug, Clone)]
pub(crate) struct QDeadLetter {
    pub queue: Arc<str>,
    pub dead: DeadLetter,
}

/// One change to durable state.
#[derive(Debug, Clone)]
pub(crate) enum Record {
    /// The retained message of its topic (an empty payload clears it).
    Retain(Arc<Message>),
    /// A session exists with this client id, version and expiry; connected when
    /// `disconnected_at` is `None` (which cancels a delayed will).
    Session {
        sid: SessionId,
        client_id: Arc<str>,
        version: ProtocolVersion,
        expiry: u32,
        disconnected_at: Option<Time>,
    },
    /// The session and its subscriptions are gone.
    SessionEnd(SessionId),
    /// A subscription, keyed by the filter exactly as the client sent it.
    Subscribe {
        sid: SessionId,
        raw: String,
        sub: Subscription,
    },
    Unsubscribe {
        sid: SessionId,
        raw: String,
    },
    /// A message joins the back of the session's queue.
    Enqueue {
        sid: SessionId,
        pending: Pending,
    },
    /// A message goes straight into flight under `pid` (it never waited in the queue).
    Sent {
        sid: SessionId,
        pid: PacketId,
        pending: Pending,
    },
    /// The queued message `message` goes into flight under `pid`.
    Flight {
        sid: SessionId,
        pid: PacketId,
        message: u64,
    },
    /// The queued message `message` left the queue unsent: it expired, was dropped to make
    /// room (`queue_full = drop_oldest`), or was refused after its publisher's
    /// acknowledgement was held too long (`queue_full = backpressure`).
    Removed {
        sid: SessionId,
        message: u64,
    },
    /// PUBREC received for `pid`, PUBREL sent: the message now awaits PUBCOMP.
    PubRec {
        sid: SessionId,
        pid: PacketId,
    },
    /// The in-flight message `pid` is finished (acknowledged, or refused by the receiver).
    Acked {
        sid: SessionId,
        pid: PacketId,
    },
    /// Every shared-subscription message that may go to another member left the session.
    TakeShared(SessionId),
    /// An inbound QoS 2 publish awaits PUBREL.
    Qos2In {
        sid: SessionId,
        pid: PacketId,
    },
    /// PUBREL received for an inbound QoS 2 publish.
    Qos2Done {
        sid: SessionId,
        pid: PacketId,
    },
    /// A will waits for its delay.
    Will {
        sid: SessionId,
        will: Box<Will>,
        due: Time,
    },
    /// The pending will was published or cancelled.
    WillDone(SessionId),
    /// A queue with this definition exists (declared, or its definition changed).
    QueueDeclare(Box<QueueDef>),
    /// The queue and everything in it are gone.
    QueueDelete(Arc<str>),
    /// A message joins a queue.
    QEnqueue(Box<QEnqueue>),
    /// The waiting message is leased to `consumer` at `at` (its ack deadline runs from it).
    QLease {
        queue: Arc<str>,
        message: u64,
        consumer: SessionId,
        at: Time,
    },
    /// The leased message was acknowledged and leaves the queue.
    QAck {
        queue: Arc<str>,
        message: u64,
    },
    /// A failed attempt of the leased message (a nack, an ack timeout, a lost consumer, a
    /// restart), and what it led to: decided live (backoff with its random draw), applied as
    /// written.
    QFail {
        queue: Arc<str>,
        message: u64,
        failure: Box<Failure>,
        retry: Retry,
    },
    /// The waiting message left the queue unconsumed: dropped for overflow, expired, or (the
    /// internal `$delayed` queue) published when due.
    QDrop {
        queue: Arc<str>,
        message: u64,
        expired: bool,
    },
    /// The waiting message became a dead letter (overflow, expiry).
    QDead {
        queue: Arc<str>,
        message: u64,
        cause: Cause,
        at: Time,
    },
    /// The dead letter is ready again, attempts at 0, failures kept.
    QRedrive {
        queue: Arc<str>,
        message: u64,
    },
    /// The dead letter is gone (discarded, purged, past retention, or redriven to a topic).
    QDiscard {
        queue: Arc<str>,
        message: u64,
    },
    /// A dead letter whole (checkpoints).
    QDeadLetter(Box<QDeadLetter>),
    /// Waiting entries of one queue, each with its due time, packed (checkpoints write a
    /// large backlog's index this way: one record per few thousand entries).
    QEntries {
        queue: Arc<str>,
        entries: Vec<(Entry, Option<Time>)>,
    },
}

/// A record named state that is not there (replay counts these; live, it is a bug).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Missing;

impl Record {
    /// The session a record changes (`None` for broker-wide state).
    pub(crate) fn session(&self) -> Option<SessionId> {
        use Record::*;
        match self {
            Retain(_) => None,
            Session { sid, .. }
            | Subscribe { sid, .. }
            | Unsubscribe { sid, .. }
            | Enqueue { sid, .. }
            | Sent { sid, .. }
            | Flight { sid, .. }
            | Removed { sid, .. }
            | PubRec { sid, .. }
            | Acked { sid, .. }
            | Qos2In { sid, .. }
            | Qos2Done { sid, .. }
            | Will { sid, .. } => Some(*sid),
            SessionEnd(sid) | TakeShared(sid) | WillDone(sid) => Some(*sid),
            QueueDeclare(_)
            | QueueDelete(_)
            | QEnqueue(_)
            | QLease { .. }
            | QAck { .. }
            | QFail { .. }
            | QDrop { .. }
            | QDead { .. }
            | QRedrive { .. }
            | QDiscard { .. }
            | QDeadLetter(_)
            | QEntries { .. } => None,
        }
    }
}

impl Broker {
    /// Makes one change to durable state: journals it when its session (or, for retained
    /// messages, the broker) is journaled, then applies it. The only way live code changes
    /// what the journal describes. Live code only commits records naming state it has just
    /// checked, so `Missing` is a bug: tests panic on it, a release build carries on (the
    /// record was journaled, and replay skips it the same way).
    pub(crate) fn commit(&mut self, record: Record, out: &mut crate::Outbox) {
        let _ = self.try_commit(record, out);
    }

    /// [`Broker::commit`], telling the caller whether the record applied (for loops that
    /// must stop rather than spin if it did not).
    pub(crate) fn try_commit(
        &mut self,
        record: Record,
        out: &mut crate::Outbox,
    ) -> Result<(), Missing> {
        if self.journal.is_some() && self.is_journaled(&record) {
            if let Some(j) = self.journal.as_mut() {
                j.write(&record, out);
            }
        }
        let applied = self.apply(record);
        debug_assert!(
            applied.is_ok(),
            "live engine committed a record naming missing state"
        );
        applied
    }

    fn is_journaled(&self, record: &Record) -> bool {
        match record {
            // `$SYS` topics are regenerated at start, not stored.
            Record::Retain(m) => !m.topic.starts_with("$SYS"),
            // A queue delivery in a consumer's in-flight table is not durable: its lease is.
            Record::Sent { pending, .. } => {
                pending.queue.is_none() && self.session_journaled(record)
            }
            Record::Acked { sid, pid } | Record::PubRec { sid, pid } => {
                let of_queue = self
                    .sessions
                    .get(sid)
                    .and_then(|s| s.inflight.get(pid))
                    .is_some_and(|f| f.pending.queue.is_some());
                !of_queue && self.session_journaled(record)
            }
            r if r.session().is_none() => true,
            r => self.session_journaled(r),
        }
    }

    fn session_journaled(&self, record: &Record) -> bool {
        record
            .session()
            .and_then(|sid| self.sessions.get(&sid))
            .is_some_and(|s| s.journaled)
    }

    /// Applies one record to the engine's state: the live engine (through [`Broker::commit`])
    /// and journal replay both come here.
    pub(crate) fn apply(&mut self, record: Record) -> Result<(), Missing> {
        match record {
            Record::Retain(m) => self.retained.set(m),
            Record::Session {
                sid,
                client_id,
                version,
                expiry,
                disconnected_at,
            } => {
                let s = self
                    .sessions
                    .entry(sid)
                    .or_insert_with(|| Box::new(Session::new(sid, client_id.clone(), version)));
                s.version = version;
                s.expiry_interval = expiry;
                s.disconnected_at = disconnected_at;
                if disconnected_at.is_none() {
                    // Connecting cancels a delayed will (MQTT-3.1.3-9).
                    s.pending_will = None;
                }
                self.by_client_id.insert(client_id, sid);
            }
            Record::SessionEnd(sid) => {
                let s = self.sessions.remove(&sid).ok_or(Missing)?;
                if self.by_client_id.get(&s.client_id) == Some(&sid) {
                    self.by_client_id.remove(&s.client_id);
                }
                for sub in s.subscriptions.values() {
                    match &sub.queue {
                        Some(q) => self.queues.remove_consumer(q, sid),
                        None => {
                            self.subs.remove(&sub.filter, sub.group.as_deref(), sid);
                        }
                    }
                }
            }
            Record::Subscribe { sid, raw, sub } => {
                let s = self.sessions.get_mut(&sid).ok_or(Missing)?;
                // `$queue/{name}`, or `$share/{name}/…` that named a queue when it was made
                // (the record says which): a consumer of the queue, not in the trie.
                if let Some(old) = s.subscriptions.remove(&raw) {
                    // Replaced: undo the old one first (it may have been the other kind).
                    match &old.queue {
                        Some(q) => {
                            let still = s
                                .subscriptions
                                .values()
                                .any(|x| x.queue.as_ref() == Some(q));
                            if !still {
                                s.consumes.retain(|c| c != q);
                                self.queues.remove_consumer(q, sid);
                            }
                        }
                        None => {
                            self.subs.remove(&old.filter, old.group.as_deref(), sid);
                        }
                    }
                }
                let s = self.sessions.get_mut(&sid).ok_or(Missing)?;
                match &sub.queue {
                    Some(q) => {
                        self.queues.add_consumer(q, sid, sub.options.qos);
                        if !s.consumes.contains(q) {
                            s.consumes.push(q.clone());
                        }
                    }
                    None => {
                        let entry = SubEntry {
                            session: sid,
                            options: sub.options,
                            identifier: sub.identifier,
                        };
                        self.subs.insert(&sub.filter, sub.group.as_deref(), entry);
                    }
                }
                s.subscriptions.insert(raw, sub);
            }
            Record::Unsubscribe { sid, raw } => {
                let s = self.sessions.get_mut(&sid).ok_or(Missing)?;
                let sub = s.subscriptions.remove(&raw).ok_or(Missing)?;
                match &sub.queue {
                    // A consumer while any of its subscriptions consumes the queue.
                    Some(q)
                        if s.subscriptions
                            .values()
                            .any(|x| x.queue.as_ref() == Some(q)) => {}
                    Some(q) => {
                        s.consumes.retain(|c| c != q);
                        self.queues.remove_consumer(q, sid);
                    }
                    None => {
                        self.subs.remove(&sub.filter, sub.group.as_deref(), sid);
                    }
                }
            }
            Record::Enqueue { sid, pending } => {
                self.session_mut(sid)?.pending.push_back(pending);
            }
            Record::Sent { sid, pid, pending } => {
                let s = self.session_mut(sid)?;
                if s.inflight.contains_key(&pid) {
                    return Err(Missing);
                }
                s.put_in_flight(pid, pending);
            }
            Record::Flight { sid, pid, message } => {
                let s = self.session_mut(sid)?;
                if s.inflight.contains_key(&pid) {
                    return Err(Missing);
                }
                let p = s.take_queued(message).ok_or(Missing)?;
                s.put_in_flight(pid, p);
            }
            Record::Removed { sid, message } => {
                self.session_mut(sid)?.take_queued(message).ok_or(Missing)?;
            }
            Record::PubRec { sid, pid } => {
                let f = self
                    .session_mut(sid)?
                    .inflight
                    .get_mut(&pid)
                    .ok_or(Missing)?;
                f.state = OutState::AwaitPubComp;
            }
            Record::Acked { sid, pid } => {
                self.session_mut(sid)?
                    .inflight
                    .remove(&pid)
                    .ok_or(Missing)?;
            }
            Record::TakeShared(sid) => {
                self.session_mut(sid)?.take_shared();
            }
            Record::Qos2In { sid, pid } => {
                self.session_mut(sid)?.inbound_qos2.insert(pid);
            }
            Record::Qos2Done { sid, pid } => {
                self.session_mut(sid)?.inbound_qos2.remove(&pid);
            }
            Record::Will { sid, will, due } => {
                self.session_mut(sid)?.pending_will = Some(Box::new((*will, due)));
            }
            Record::WillDone(sid) => {
                self.session_mut(sid)?.pending_will = None;
            }
            Record::QueueDeclare(def) => self.queues.declare(*def),
            Record::QueueDelete(name) => {
                if !self.queues.delete(&name) {
                    return Err(Missing);
                }
            }
            Record::QEnqueue(e) => {
                let e = *e;
                // Queue messages have no `Message` record of their own: their ids must not
                // be handed out again after a restart.
                self.next_message_id = self.next_message_id.max(e.entry.id + 1);
                self.queue_mut(&e.queue)?
                    .insert(e.entry, e.message, e.due, e.expires, e.failures);
            }
            Record::QLease {
                queue,
                message,
                consumer,
                at,
            } => {
                self.queue_mut(&queue)?
                    .lease(message, consumer, at)
                    .ok_or(Missing)?;
            }
            Record::QAck { queue, message } => {
                found(self.queue_mut(&queue)?.ack(message))?;
            }
            Record::QFail {
                queue,
                message,
                failure,
                retry,
            } => {
                found(self.queue_mut(&queue)?.fail(message, *failure, retry))?;
            }
            Record::QDrop {
                queue,
                message,
                expired,
            } => {
                found(self.queue_mut(&queue)?.drop_waiting(message, expired))?;
            }
            Record::QDead {
                queue,
                message,
                cause,
                at,
            } => {
                found(
                    self.queue_mut(&queue)?
                        .dead_letter_waiting(message, cause, at),
                )?;
            }
            Record::QRedrive { queue, message } => {
                found(self.queue_mut(&queue)?.redrive(message))?;
            }
            Record::QDiscard { queue, message } => {
                found(self.queue_mut(&queue)?.discard(message))?;
            }
            Record::QEntries { queue, entries } => {
                let last = entries.iter().map(|(e, _)| e.id).max().unwrap_or(0);
                self.next_message_id = self.next_message_id.max(last + 1);
                let q = self.queue_mut(&queue)?;
                for (entry, due) in entries {
                    q.insert(entry, None, due, None, Vec::new());
                }
            }
            Record::QDeadLetter(d) => {
                let d = *d;
                self.next_message_id = self.next_message_id.max(d.dead.entry.id + 1);
                self.queue_mut(&d.queue)?.restore_dead(d.dead);
            }
        }
        Ok(())
    }

    fn queue_mut(&mut self, name: &str) -> Result<&mut crate::workqueue::Queue, Missing> {
        self.queues.by_name.get_mut(name).ok_or(Missing)
    }

    fn session_mut(&mut self, sid: SessionId) -> Result<&mut Session, Missing> {
        self.sessions.get_mut(&sid).map(|s| &mut **s).ok_or(Missing)
    }
}

fn found(applied: bool) -> Result<(), Missing> {
    if applied {
        Ok(())
    } else {
        Err(Missing)
    }
}
