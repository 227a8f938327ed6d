//! Full queues: what a new QoS 1/2 message does for a session whose queue already holds
//! `max_queued_messages` ([`QueueFull`]), and the publishers' acknowledgements held for it.
//!
//! ```text
//!  PUBLISH ──▶ route ──▶ every target with room: sent or queued as usual
//!                 └────▶ a full target:  backpressure: queued anyway (Enqueue, journaled),
//!                                          the PUBACK/PUBREC is held ──▶ Flow::Pause
//!                                        reject:       not queued there; 0x97 / 3.1.1 close
//!                                        drop_oldest:  its oldest queued message is Removed
//!  held ack ──room in every full queue──▶ sent (Flow::Resume when none is left)
//!           ──queue_full_timeout_ms────▶ Removed from those queues, 0x97 / 3.1.1 close
//!           ──publisher goes away──────▶ forgotten; the message stays queued
//! ```
//!
//! Under `backpressure` the message joins the queue at once, journaled like any other: it
//! cannot wait outside the queue, because the driver may already be sending it to the
//! targets that had room, and a crash must not lose what those hold nor reorder the full
//! target's stream. "Room" for a held message means its place in the queue is within the
//! limit (or it left the queue: in flight, or its session ended). A held acknowledgement
//! also holds back the acknowledgements of the same connection's later publishes, so a
//! client sees its PUBACKs and PUBRECs in the order of its PUBLISHes (MQTT-4.6.0-2/3).
//!
//! An inbound QoS 2 id (`Qos2In`) is journaled when the publish arrives, held or not, in the
//! same step as its `Enqueue`: if the publisher reconnects (or the broker restarts) before
//! the held PUBREC went out, its resend finds the id and is answered without being routed
//! twice. A refusal journals `Qos2Done` with the `Removed` records, so a client told 0x97
//! starts a new flow. Held acknowledgements themselves are connection state: nothing of
//! them is journaled, and a publisher that goes away loses its holds (its QoS 1 resend is
//! then a duplicate, which QoS 1 allows).

use std::collections::VecDeque;

use rustc_hash::FxHashMap as HashMap;

use ferrymq_mqtt::{Packet, ProtocolVersion, PubResp, ReasonCode};

use crate::broker::{Action, Flow, Outbox, Timer};
use crate::journal::record::Record;
use crate::session::Pending;
use crate::{Broker, ConnId, QueueFull, SessionId, Time};

/// Acknowledgements held for full queues.
#[derive(Debug, Default)]
pub(crate) struct Holds {
    /// Per publishing connection, its PUBACKs/PUBRECs in the order their PUBLISHes arrived:
    /// the first one still waiting holds back those behind it.
    by_conn: HashMap<ConnId, VecDeque<HeldAck>>,
    /// Per full session, the held messages it queues past its limit, in queue order, with the
    /// connection whose acknowledgement waits for each.
    by_session: HashMap<SessionId, VecDeque<(u64, ConnId)>>,
    /// Per connection with holds, when the one timer the engine keeps for them is due (the
    /// front's due time when it was armed). One timer per connection, re-armed for the next
    /// front when it fires: a timer per hold would leave one stale entry per released hold
    /// in the heap until its due time (holds a second times `queue_full_timeout_ms`).
    armed: HashMap<ConnId, Time>,
}

#[derive(Debug)]
struct HeldAck {
    /// The PUBACK or PUBREC to send.
    ack: Packet,
    /// The message it waits for (0 for an acknowledgement only queued behind another).
    message: u64,
    /// Full sessions whose queue holds the message past its limit.
    waiting: Vec<SessionId>,
    /// When the message is refused if it is still waiting.
    due: Time,
}

impl Holds {
    fn is_empty(&self) -> bool {
        self.by_conn.is_empty()
    }
}

impl Broker {
    /// Appends a QoS 1/2 message to a session's queue. A full one (`max_queued_messages`)
    /// takes it as `queue_full` and `promise` say (`queue_full.rs`).
    pub(crate) fn enqueue(
        &mut self,
        sid: SessionId,
        p: Pending,
        promise: Promise,
        out: &mut Outbox,
    ) -> Placed {
        let Some(s) = self.sessions.get(&sid) else {
            return Placed::Done;
        };
        let mut placed = Placed::Done;
        if s.pending.len() >= self.config.max_queued_messages && promise != Promise::Accepted {
            match (self.config.queue_full, promise) {
                (QueueFull::DropOldest, _) => {
                    if let Some(oldest) = s.pending.front() {
                        let message = oldest.message.id;
                        out.note_drop(&oldest.message, "queue_full", &s.client_id);
                        self.stats.dropped_queue_full += 1;
                        self.commit(Record::Removed { sid, message }, out);
                    }
                }
                (QueueFull::Backpressure, Promise::Acked) => placed = Placed::OverLimit,
                (_, Promise::Acked) => return Placed::Refused,
                _ => {
                    self.stats.dropped_queue_full += 1;
                    out.note_drop(&p.message, "queue_full", &s.client_id);
                    return Placed::Refused;
                }
            }
        }
        self.commit(Record::Enqueue { sid, pending: p }, out);
        if let Some(s) = self.sessions.get(&sid) {
            let len = s.pending.len() as u64;
            self.stats.queued_high_water = self.stats.queued_high_water.max(len);
        }
        placed
    }

    /// Sends a PUBACK/PUBREC to `conn`, behind any of its acknowledgements still held.
    pub(crate) fn send_ack(&mut self, conn: ConnId, ack: Packet, out: &mut Outbox) {
        match self.holds.by_conn.get_mut(&conn) {
            Some(acks) => {
                self.stats.held_acks += 1;
                acks.push_back(HeldAck {
                    ack,
                    message: 0,
                    waiting: Vec::new(),
                    due: Time(u64::MAX),
                });
            }
            None => out.push(conn, Action::Send(ack)),
        }
    }

    /// Holds `ack` until `message` has room in every session of `full`; pauses the
    /// connection's input on its first hold.
    pub(crate) fn hold_ack(
        &mut self,
        conn: ConnId,
        ack: Packet,
        message: u64,
        full: Vec<SessionId>,
        now: Time,
        out: &mut Outbox,
    ) {
        let due = now.plus_millis(self.config.queue_full_timeout_ms);
        for sid in &full {
            let list = self.holds.by_session.entry(*sid).or_default();
            list.push_back((message, conn));
        }
        let acks = self.holds.by_conn.entry(conn).or_insert_with(|| {
            out.flow.push((conn, Flow::Pause));
            VecDeque::new()
        });
        acks.push_back(HeldAck {
            ack,
            message,
            waiting: full,
            due,
        });
        self.stats.held_acks += 1;
        self.stats.acks_held_total += 1;
        // Holds of one connection fall due in order: an armed timer comes first.
        if let std::collections::hash_map::Entry::Vacant(e) = self.holds.armed.entry(conn) {
            e.insert(due);
            self.timers
                .push(std::cmp::Reverse((due, Timer::HeldAck(conn))));
        }
    }

    /// A session's queue got shorter (messages went into flight or left it), or the session
    /// ended: held messages whose place is now within the limit stop waiting for it.
    pub(crate) fn queue_shrunk(&mut self, sid: SessionId, out: &mut Outbox) {
        if self.holds.is_empty() {
            return;
        }
        let Some(list) = self.holds.by_session.get_mut(&sid) else {
            return;
        };
        let limit = self.config.max_queued_messages;
        let queue = self.sessions.get(&sid).map(|s| &s.pending);
        let mut freed = Vec::new();
        while let Some(&(message, conn)) = list.front() {
            let room = match queue {
                Some(q) if q.len() > limit => {
                    // Held messages sit near the back: search from there.
                    q.iter()
                        .rposition(|p| p.message.id == message)
                        .is_none_or(|at| at < limit)
                }
                _ => true,
            };
            if !room {
                break;
            }
            list.pop_front();
            freed.push((message, conn));
        }
        if list.is_empty() {
            self.holds.by_session.remove(&sid);
        }
        for (message, conn) in freed {
            if let Some(acks) = self.holds.by_conn.get_mut(&conn) {
                let held = acks
                    .iter_mut()
                    .find(|h| h.message == message && h.waiting.contains(&sid));
                if let Some(h) = held {
                    if let Some(at) = h.waiting.iter().position(|s| *s == sid) {
                        h.waiting.swap_remove(at);
                    }
                }
            }
            self.release_ready(conn, out);
        }
    }

    /// Sends the connection's acknowledgements from the front that wait for nothing; resumes
    /// its input once none is held.
    fn release_ready(&mut self, conn: ConnId, out: &mut Outbox) {
        let Some(acks) = self.holds.by_conn.get_mut(&conn) else {
            return;
        };
        while acks.front().is_some_and(|h| h.waiting.is_empty()) {
            if let Some(h) = acks.pop_front() {
                self.stats.held_acks = self.stats.held_acks.saturating_sub(1);
                out.push(conn, Action::Send(h.ack));
            }
        }
        if acks.is_empty() {
            self.holds.by_conn.remove(&conn);
            out.flow.push((conn, Flow::Resume));
        }
    }

    /// A held acknowledgement's timer fired: every acknowledgement of `conn` due by `now`
    /// and still waiting is refused. Its message leaves the full queues (journaled), and
    /// the publisher gets 0x97 (5.0) or its connection closed (3.1.1, which has no
    /// negative acknowledgement).
    pub(crate) fn expire_held(&mut self, conn: ConnId, now: Time, out: &mut Outbox) {
        // This was the connection's one timer; it is re-armed below if holds remain.
        self.holds.armed.remove(&conn);
        loop {
            self.release_ready(conn, out);
            let Some(front) = self
                .holds
                .by_conn
                .get_mut(&conn)
                .and_then(|acks| acks.front_mut())
            else {
                return;
            };
            if front.due > now {
                let due = front.due;
                self.holds.armed.insert(conn, due);
                self.timers
                    .push(std::cmp::Reverse((due, Timer::HeldAck(conn))));
                return;
            }
            let message = front.message;
            let waiting = std::mem::take(&mut front.waiting);
            // The QoS 2 packet id, whose flow a refused PUBREC ends.
            let qos2 = match &mut front.ack {
                Packet::PubRec(r) => {
                    r.reason = ReasonCode::QuotaExceeded;
                    Some(r.packet_id)
                }
                Packet::PubAck(r) => {
                    r.reason = ReasonCode::QuotaExceeded;
                    None
                }
                _ => None,
            };
            let Some(c) = self.conns.get(&conn) else {
                return;
            };
            let (publisher, v5) = (c.session, c.version == ProtocolVersion::V5);
            if !v5 && qos2.is_some() {
                // 3.1.1 has no negative PUBREC: the connection is closed, and the client sends
                // this PUBLISH again on reconnect. The message stays queued and its id
                // known, so the resend gets its PUBREC without being routed again: once for
                // every session, the full ones included (one message past their limit,
                // like a QoS 2 publisher that leaves while held: see `drop_holds`).
                return self.kill(conn, None, now, out);
            }
            self.stats.refused_queue_full += 1;
            // A refused PUBREC ends the QoS 2 flow: the client will not send PUBREL.
            if let Some(pid) = qos2 {
                let known = self
                    .sessions
                    .get(&publisher)
                    .is_some_and(|s| s.inbound_qos2.contains(&pid));
                if known {
                    self.commit(
                        Record::Qos2Done {
                            sid: publisher,
                            pid,
                        },
                        out,
                    );
                }
            }
            if !v5 {
                // Closing forgets every hold of the connection (the 0x97 is never sent).
                self.kill(conn, None, now, out);
            }
            for sid in waiting {
                self.unhold(sid, message, conn);
                let queued = self
                    .sessions
                    .get(&sid)
                    .is_some_and(|s| s.pending.iter().any(|p| p.message.id == message));
                if queued {
                    self.commit(Record::Removed { sid, message }, out);
                }
                // The messages held behind it moved up one place.
                self.queue_shrunk(sid, out);
            }
            if !v5 {
                return;
            }
        }
    }

    /// Forgets one held message of `conn` in session `sid`'s list.
    fn unhold(&mut self, sid: SessionId, message: u64, conn: ConnId) {
        if let Some(list) = self.holds.by_session.get_mut(&sid) {
            if let Some(at) = list.iter().position(|e| *e == (message, conn)) {
                list.remove(at);
            }
            if list.is_empty() {
                self.holds.by_session.remove(&sid);
            }
        }
    }

    /// The publisher went away (closed, taken over, killed): its held acknowledgements are
    /// forgotten. A QoS 1 message leaves the full queues it waited in past their limit (it
    /// was never acknowledged, and its publisher sends it again if its session lives on):
    /// otherwise every publisher that gives up while held would leave one message past the
    /// limit, and a queue would grow without bound. A QoS 2 message stays: its packet id is
    /// journaled, so the resend is answered without being routed again, and taking it out
    /// would lose it for those sessions (or, releasing the id, deliver it twice to the
    /// others). `Flow::Resume` is pushed all the same, so a driver that keeps a set of
    /// paused connections forgets this one.
    pub(crate) fn drop_holds(&mut self, conn: ConnId, out: &mut Outbox) {
        // Its timer, if armed, finds nothing when it fires.
        self.holds.armed.remove(&conn);
        let Some(acks) = self.holds.by_conn.remove(&conn) else {
            return;
        };
        self.stats.held_acks = self.stats.held_acks.saturating_sub(acks.len() as u64);
        for h in acks {
            let qos1 = matches!(h.ack, Packet::PubAck(_));
            for sid in h.waiting {
                self.unhold(sid, h.message, conn);
                if !qos1 {
                    continue;
                }
                let queued = self
                    .sessions
                    .get(&sid)
                    .is_some_and(|s| s.pending.iter().any(|p| p.message.id == h.message));
                if queued {
                    self.commit(
                        Record::Removed {
                            sid,
                            message: h.message,
                        },
                        out,
                    );
                    self.queue_shrunk(sid, out);
                }
            }
        }
        out.flow.push((conn, Flow::Resume));
    }

    /// Refuses a QoS 1/2 publish: PUBACK/PUBREC with `reason` (5.0), or the connection closed
    /// (3.1.1 has no negative acknowledgement).
    pub(crate) fn refuse_publish(
        &mut self,
        conn: ConnId,
        ack: fn(PubResp) -> Packet,
        pid: u16,
        reason: ReasonCode,
        now: Time,
        out: &mut Outbox,
    ) {
        match self.conns.get(&conn).map(|c| c.version) {
            Some(ProtocolVersion::V5) => self.send_ack(conn, ack(PubResp::new(pid, reason)), out),
            Some(ProtocolVersion::V311) => self.kill(conn, None, now, out),
            None => {}
        }
    }

    /// Timers waiting in the engine (for tests: they must not pile up).
    #[doc(hidden)]
    pub fn pending_timers(&self) -> usize {
        self.timers.len()
    }

    /// Acknowledgements held now for full queues, across connections (for tests).
    pub fn held_acks(&self) -> usize {
        self.holds.by_conn.values().map(VecDeque::len).sum()
    }
}

/// Who stands behind a QoS 1/2 message being queued: decides what a full queue does with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Promise {
    /// Already accepted (moved from a shared-group member that left): queued whatever the
    /// limit.
    Accepted,
    /// A client's QoS 1/2 publish, acknowledged after routing: the policy applies in full.
    Acked,
    /// Nobody waits for an acknowledgement (a will, an in-process publish, a retained
    /// message sent on subscribe): under `backpressure` and `reject` a full queue does not
    /// take it (counted as dropped); `drop_oldest` makes room as usual.
    Unacked,
}

/// What became of one message for one session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Placed {
    /// Sent, queued within the limit, or dropped for its own reasons (expired, too large).
    Done,
    /// Queued past the limit (`backpressure`): its acknowledgement waits for room.
    OverLimit,
    /// Not queued: the queue is full.
    Refused,
}
