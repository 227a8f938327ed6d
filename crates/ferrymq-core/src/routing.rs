//! Publishing: inbound PUBLISH and its QoS flow, routing to subscribers, outbound acks, and
//! handing unacknowledged shared-subscription messages to another group member.

use std::sync::Arc;

use ferrymq_mqtt::{Packet, PubResp, Publish, QoS, ReasonCode};

use crate::broker::{Action, Delivery, Outbox};
use crate::journal::record::Record;
use crate::queue_full::{Placed, Promise};
use crate::session::{OutState, Pending, SharedOrigin};
use crate::{Broker, ConnId, Message, SessionId, Time};

/// What routing one message did.
pub(crate) struct Routed {
    /// Sessions (and queues) it was routed to.
    pub(crate) count: usize,
    /// Its id.
    pub(crate) message: u64,
    /// Full sessions that queued it past their limit (`backpressure`).
    pub(crate) full: Vec<SessionId>,
    /// A full session did not take it (`reject`).
    pub(crate) refused: bool,
}

/// One routing target after overlapping subscriptions are merged.
struct Target {
    session: SessionId,
    qos: QoS,
    retain_as_published: bool,
    ids: Vec<u32>,
    shared: Option<SharedOrigin>,
}

impl Broker {
    pub(crate) fn on_publish(&mut self, conn: ConnId, mut p: Publish, now: Time, out: &mut Outbox) {
        let c = self.conns.get_mut(&conn).expect("attached");
        let sid = c.session;
        // Read here, with the entry at hand: without ACLs a publish pays this test only.
        let has_acl = c.acl.is_some();
        // A client never sends subscription identifiers (MQTT-3.3.4-6).
        if !p.properties.subscription_identifiers.is_empty() {
            return self.kill(conn, Some(ReasonCode::ProtocolError), now, out);
        }
        let topic: Arc<str> = match p.properties.topic_alias {
            Some(alias) if alias > self.config.topic_alias_maximum => {
                return self.kill(conn, Some(ReasonCode::TopicAliasInvalid), now, out);
            }
            Some(alias) if p.topic.is_empty() => {
                match c.topic_aliases.as_ref().and_then(|m| m.get(&alias)) {
                    Some(t) => t.clone(),
                    None => return self.kill(conn, Some(ReasonCode::ProtocolError), now, out),
                }
            }
            Some(alias) => {
                let t: Arc<str> = p.topic.as_str().into();
                let aliases = c.topic_aliases.get_or_insert_with(Default::default);
                aliases.insert(alias, t.clone());
                t
            }
            None => p.topic.as_str().into(),
        };
        if topic.split('/').count() > self.config.max_topic_levels {
            return self.kill(conn, Some(ReasonCode::TopicNameInvalid), now, out);
        }
        let refusal = if p.properties.payload_format_indicator == Some(1)
            && ferrymq_mqtt::validate_utf8(&p.payload).is_err()
        {
            Some(ReasonCode::PayloadFormatInvalid)
        } else {
            reserved_topic(&topic)
        };
        let qos = p.qos;
        let pid = p.packet_id.unwrap_or(0);
        if has_acl && refusal.is_none() && self.publish_denied(conn, &topic) {
            let trace_id = crate::queues::trace_id_of(&p.properties);
            return self.deny_publish(conn, qos, pid, topic, trace_id, out);
        }
        if qos == QoS::ExactlyOnce {
            let s = self
                .sessions
                .get_mut(&sid)
                .expect("session of attached conn");
            if s.inbound_qos2.contains(&pid) {
                // A resend of a publish we already routed: acknowledge, do not route again.
                let ack = Packet::PubRec(PubResp::new(pid, ReasonCode::Success));
                return self.send_ack(conn, ack, out);
            }
            if s.inbound_qos2.len() >= usize::from(self.config.receive_maximum) {
                return self.kill(conn, Some(ReasonCode::ReceiveMaximumExceeded), now, out);
            }
        }
        let ack: fn(PubResp) -> Packet = match qos {
            QoS::ExactlyOnce => Packet::PubRec,
            _ => Packet::PubAck,
        };
        let refusal = refusal.or_else(|| self.overload_refusal(qos, p.retain));
        if let Some(reason) = refusal {
            if qos != QoS::AtMostOnce {
                // 3.1.1 has no negative acks: the connection is closed instead.
                self.refuse_publish(conn, ack, pid, reason, now, out);
            }
            return;
        }
        self.stats.messages_received[qos as usize] += 1;
        self.stats.payload_bytes_received[qos as usize] += p.payload.len() as u64;
        p.dup = false;
        if let Some(Ok((delay_ms, real))) = crate::queues::parse_delayed(&topic) {
            // `$delayed/{seconds}/{topic}`: held (journaled), published to `{topic}` when due.
            let real: Arc<str> = real.into();
            let msg = Message::from_publish(p, real, Some(sid), now);
            self.hold_delayed(msg, delay_ms, now, out);
            if qos == QoS::ExactlyOnce && self.sessions.contains_key(&sid) {
                self.commit(Record::Qos2In { sid, pid }, out);
            }
            if qos != QoS::AtMostOnce {
                self.send_ack(conn, ack(PubResp::new(pid, ReasonCode::Success)), out);
            }
            return;
        }
        let msg = Message::from_publish(p, topic, Some(sid), now);
        let promise = match qos {
            QoS::AtMostOnce => Promise::Unacked,
            _ => Promise::Acked,
        };
        let routed = self.route(msg, promise, now, out);
        if routed.count == 0 {
            self.stats.dropped_no_subscribers += 1;
        }
        if qos == QoS::AtMostOnce {
            return;
        }
        if routed.refused {
            // `reject`: the full targets did not take it (the others did).
            self.stats.refused_queue_full += 1;
            return self.refuse_publish(conn, ack, pid, ReasonCode::QuotaExceeded, now, out);
        }
        // Journaled with the message's Enqueue records, before any acknowledgement (held or
        // not): a resend after a reconnect or a restart finds it and is not routed twice.
        if qos == QoS::ExactlyOnce && self.sessions.contains_key(&sid) {
            self.commit(Record::Qos2In { sid, pid }, out);
        }
        let ack = ack(PubResp::new(pid, ReasonCode::Success));
        if routed.full.is_empty() {
            self.send_ack(conn, ack, out);
        } else {
            self.hold_ack(conn, ack, routed.message, routed.full, now, out);
        }
    }

    /// Whether the connection's ACL refuses a publish to `topic` (for `$delayed/{s}/{t}`,
    /// the topic it will be published to).
    fn publish_denied(&self, conn: ConnId, topic: &str) -> bool {
        let Some(acl) = self.conns.get(&conn).and_then(|c| c.acl.as_deref()) else {
            return false;
        };
        let target = match crate::queues::parse_delayed(topic) {
            Some(Ok((_, real))) => real,
            _ => topic,
        };
        !acl.may_publish(target)
    }

    /// A publish the ACL refused: 5.0 gets PUBACK/PUBREC 0x87; 3.1.1, which has no negative
    /// acknowledgement, gets a plain one (or, for QoS 0, nothing) and the message is dropped.
    /// Either way the driver logs it (`Outbox::denied`).
    fn deny_publish(
        &mut self,
        conn: ConnId,
        qos: QoS,
        pid: u16,
        topic: Arc<str>,
        trace_id: Option<String>,
        out: &mut Outbox,
    ) {
        self.stats.acl_denied_publishes += 1;
        out.denied.push(crate::DeniedPublish {
            conn,
            topic,
            trace_id,
        });
        let v5 = self
            .conns
            .get(&conn)
            .is_some_and(|c| c.version == ferrymq_mqtt::ProtocolVersion::V5);
        let reason = if v5 {
            ReasonCode::NotAuthorized
        } else {
            ReasonCode::Success
        };
        match qos {
            QoS::AtMostOnce => {}
            QoS::AtLeastOnce => self.send_ack(conn, Packet::PubAck(PubResp::new(pid, reason)), out),
            QoS::ExactlyOnce => self.send_ack(conn, Packet::PubRec(PubResp::new(pid, reason)), out),
        }
    }

    /// Why a publish is not taken in under the current [`crate::Admission`], counted; QoS 0
    /// ones are dropped silently (there is no negative ack).
    fn overload_refusal(&mut self, qos: QoS, retain: bool) -> Option<ReasonCode> {
        let a = self.admission;
        let stats = &mut self.stats;
        match qos {
            QoS::AtMostOnce if a.memory_high => stats.dropped_memory_high += 1,
            QoS::AtMostOnce if a.storage_full && retain => stats.dropped_storage_full += 1,
            QoS::AtMostOnce => return None,
            _ if a.memory_high => stats.refused_memory_high += 1,
            _ if a.storage_full => stats.refused_storage_full += 1,
            _ => return None,
        }
        Some(ReasonCode::QuotaExceeded)
    }

    pub(crate) fn on_pubrel(&mut self, conn: ConnId, r: PubResp, out: &mut Outbox) {
        let sid = self.conns[&conn].session;
        let pid = r.packet_id;
        let known = self
            .sessions
            .get(&sid)
            .is_some_and(|s| s.inbound_qos2.contains(&pid));
        if known {
            self.commit(Record::Qos2Done { sid, pid }, out);
        }
        let reason = if known {
            ReasonCode::Success
        } else {
            ReasonCode::PacketIdentifierNotFound
        };
        out.push(
            conn,
            Action::Send(Packet::PubComp(PubResp::new(r.packet_id, reason))),
        );
    }

    pub(crate) fn on_puback(&mut self, conn: ConnId, r: PubResp, now: Time, out: &mut Outbox) {
        let sid = self.conns[&conn].session;
        let Some(s) = self.sessions.get_mut(&sid) else {
            return;
        };
        let pid = r.packet_id;
        let Some(f) = s
            .inflight
            .get(&pid)
            .filter(|f| f.state == OutState::AwaitPubAck)
        else {
            return;
        };
        let lease = f.pending.queue.clone();
        self.commit(Record::Acked { sid, pid }, out);
        if let Some(lease) = lease {
            self.answer_lease(sid, &lease, &r, now, out);
        }
        self.fill_window(sid, now, out);
    }

    pub(crate) fn on_pubrec(&mut self, conn: ConnId, r: PubResp, now: Time, out: &mut Outbox) {
        let sid = self.conns[&conn].session;
        let Some(s) = self.sessions.get_mut(&sid) else {
            return;
        };
        let pid = r.packet_id;
        match s.inflight.get(&pid) {
            Some(f) if f.state == OutState::AwaitPubRec && r.reason.is_error() => {
                // The receiver refused it: the flow ends here (MQTT-4.3.3).
                let lease = f.pending.queue.clone();
                self.commit(Record::Acked { sid, pid }, out);
                if let Some(lease) = lease {
                    self.answer_lease(sid, &lease, &r, now, out);
                }
                self.fill_window(sid, now, out);
            }
            Some(f) if f.state != OutState::AwaitPubAck => {
                if f.state == OutState::AwaitPubRec {
                    // A queue delivery is acknowledged by PUBREC: the consumer has it.
                    let lease = f.pending.queue.clone();
                    self.commit(Record::PubRec { sid, pid }, out);
                    if let Some(lease) = lease {
                        self.answer_lease(sid, &lease, &r, now, out);
                        self.keep_pubrel(sid, pid, out);
                    }
                }
                out.push(
                    conn,
                    Action::Send(Packet::PubRel(PubResp::new(pid, ReasonCode::Success))),
                );
            }
            _ => {
                let reason = ReasonCode::PacketIdentifierNotFound;
                out.push(
                    conn,
                    Action::Send(Packet::PubRel(PubResp::new(pid, reason))),
                );
            }
        }
    }

    /// A queue delivery the consumer PUBREC'd is the session's from now on: it becomes an
    /// ordinary in-flight QoS 2 message awaiting PUBCOMP, journaled with a durable session,
    /// so its PUBREL survives a restart and its packet id is not handed out again while the
    /// consumer still holds it.
    fn keep_pubrel(&mut self, sid: SessionId, pid: ferrymq_mqtt::PacketId, out: &mut Outbox) {
        let Some(s) = self.sessions.get_mut(&sid) else {
            return;
        };
        // Not durable state until now (queue deliveries are never journaled): moved directly.
        let Some(mut f) = s.inflight.remove(&pid) else {
            return;
        };
        f.pending.queue = None;
        self.commit(
            Record::Sent {
                sid,
                pid,
                pending: f.pending,
            },
            out,
        );
        self.commit(Record::PubRec { sid, pid }, out);
    }

    pub(crate) fn on_pubcomp(&mut self, conn: ConnId, r: PubResp, now: Time, out: &mut Outbox) {
        let sid = self.conns[&conn].session;
        let Some(s) = self.sessions.get_mut(&sid) else {
            return;
        };
        let pid = r.packet_id;
        if s.inflight
            .get(&pid)
            .is_some_and(|f| f.state == OutState::AwaitPubComp)
        {
            self.commit(Record::Acked { sid, pid }, out);
            self.fill_window(sid, now, out);
        }
    }

    /// Publishes a message: stores it if retained, then routes it to every matching session.
    /// Also the entry point for in-process publishers (`$SYS`, wills, embedding programs).
    /// Returns how many sessions it was routed to.
    pub fn publish(&mut self, msg: Message, now: Time, out: &mut Outbox) -> usize {
        self.route(msg, Promise::Unacked, now, out).count
    }

    /// [`Broker::publish`] for a publisher of `promise`, saying which full queues took it
    /// past their limit or refused it.
    pub(crate) fn route(
        &mut self,
        mut msg: Message,
        promise: Promise,
        now: Time,
        out: &mut Outbox,
    ) -> Routed {
        msg.id = self.next_message_id;
        self.next_message_id += 1;
        let msg = Arc::new(msg);
        let targets = self.targets(&msg);
        let queues = self.queue_targets(&msg);
        let mut routed = Routed {
            count: targets.len() + queues.len(),
            message: msg.id,
            full: Vec::new(),
            refused: false,
        };
        // A work queue that cannot take it (`reject_new`, or full with nothing to drop)
        // refuses a publish it could answer: all or nothing, as `queue_full = reject` below.
        // Anything else (QoS 0, wills, `$delayed` releases) still reaches everyone else.
        if promise == Promise::Acked && !queues.is_empty() && self.queues_refuse(&msg, &queues) {
            routed.refused = true;
            routed.count = 0;
            return routed;
        }
        // `reject` is all or nothing: a publish that some full queue would refuse goes to
        // no one (nor into the retained store), so a publisher that sends it again delivers
        // it once, not twice to the sessions that had room (a 3.1.1 client, refused by a
        // close, always sends it again).
        if self.config.queue_full == crate::QueueFull::Reject
            && promise == Promise::Acked
            && targets.iter().any(|t| self.would_refuse(t))
        {
            routed.refused = true;
            return routed;
        }
        if msg.retain {
            self.commit(Record::Retain(msg.clone()), out);
        }
        for t in targets {
            let retain = msg.retain && t.retain_as_published;
            let p = Pending {
                message: msg.clone(),
                qos: t.qos,
                retain,
                subscription_ids: t.ids,
                shared: t.shared,
                queue: None,
            };
            match self.deliver(t.session, p, promise, now, out) {
                Placed::Done => {}
                Placed::OverLimit => routed.full.push(t.session),
                Placed::Refused => routed.refused = true,
            }
        }
        if !queues.is_empty() {
            let keep = promise == Promise::Accepted;
            self.enqueue_in_queues(&msg, queues, keep, now, out);
        }
        routed
    }

    /// Whether `deliver` would have to queue a QoS 1/2 message for `t` in a full queue.
    fn would_refuse(&self, t: &Target) -> bool {
        if t.qos == QoS::AtMostOnce {
            return false;
        }
        self.sessions.get(&t.session).is_some_and(|s| {
            let sends_now = s.is_connected() && s.has_window() && s.pending.is_empty();
            !sends_now && s.pending.len() >= self.config.max_queued_messages
        })
    }

    /// Matching sessions, one entry per session for plain subscriptions (highest QoS, every
    /// identifier: MQTT-3.3.4-2, MQTT-3.3.4-3), plus one member per shared group.
    fn targets(&self, msg: &Message) -> Vec<Target> {
        let matches = self.subs.lookup(&msg.topic);
        let mut targets: Vec<Target> =
            Vec::with_capacity(matches.plain.len() + matches.shared.len());
        // `plain` is sorted by session, so one session's overlapping subscriptions are adjacent.
        for e in matches.plain.iter() {
            if e.options.no_local && msg.publisher == Some(e.session) {
                continue;
            }
            let qos = msg.qos.min(e.options.qos);
            match targets.last_mut() {
                Some(t) if t.session == e.session => {
                    t.qos = t.qos.max(qos);
                    t.retain_as_published |= e.options.retain_as_published;
                    t.ids.extend(e.identifier);
                }
                _ => targets.push(Target {
                    session: e.session,
                    qos,
                    retain_as_published: e.options.retain_as_published,
                    ids: e.identifier.into_iter().collect(),
                    shared: None,
                }),
            }
        }
        let sessions = &self.sessions;
        for group in matches.shared {
            let connected = |s: SessionId| sessions.get(&s).is_some_and(|s| s.is_connected());
            let Some(e) = group.pick(connected) else {
                continue;
            };
            targets.push(Target {
                session: e.session,
                qos: msg.qos.min(e.options.qos),
                retain_as_published: false,
                ids: e.identifier.into_iter().collect(),
                shared: Some(SharedOrigin {
                    filter: group.filter.clone(),
                    group: group.name.clone(),
                }),
            });
        }
        targets
    }

    /// Hands one message to one session: sent now if connected and the window allows,
    /// otherwise queued (QoS 1/2 only; a full queue takes it as [`Broker::enqueue`] says).
    pub(crate) fn deliver(
        &mut self,
        sid: SessionId,
        p: Pending,
        promise: Promise,
        now: Time,
        out: &mut Outbox,
    ) -> Placed {
        if p.message.is_expired(now) {
            self.stats.dropped_expired += 1;
            if let Some(s) = self.sessions.get(&sid) {
                out.note_drop(&p.message, "expired", &s.client_id);
            }
            return Placed::Done;
        }
        let Some(s) = self.sessions.get_mut(&sid) else {
            return Placed::Done;
        };
        let conn = s.conn;
        if let Some(c) = conn.and_then(|conn| self.conns.get(&conn)) {
            // Too large for this client: discard as if sent (MQTT-3.1.2-25).
            if p.message.wire_size(p.subscription_ids.len()) > c.client_max_packet_size as usize {
                self.stats.dropped_too_large += 1;
                out.note_drop(&p.message, "packet_too_large", &s.client_id);
                return Placed::Done;
            }
            // Every path to a subscriber passes here (routed, retained on subscribe, wills,
            // `$SYS`, dead letters): one it may not read is dropped. Work-queue leases were
            // granted with the `$queue/{name}` subscription. (An offline session queues it,
            // and `move_into_flight` checks it when the session is back.)
            if let Some(acl) = c.acl.as_deref() {
                if p.queue.is_none() && !acl.may_read(&p.message.topic) {
                    self.stats.acl_denied_deliveries += 1;
                    return Placed::Done;
                }
            }
        }
        match (conn, p.qos) {
            (Some(conn), QoS::AtMostOnce) => {
                self.stats.messages_sent[0] += 1;
                self.stats.payload_bytes_sent[0] += p.message.payload.len() as u64;
                let d = Delivery {
                    expiry_remaining: p.message.expiry_remaining(now),
                    message: p.message,
                    qos: QoS::AtMostOnce,
                    packet_id: None,
                    dup: false,
                    retain: p.retain,
                    subscription_ids: p.subscription_ids,
                    attempt: None,
                };
                out.push(conn, Action::Deliver(d));
                Placed::Done
            }
            (None, QoS::AtMostOnce) => Placed::Done,
            (Some(_), _) if s.has_window() && s.pending.is_empty() => {
                self.send_now(sid, p, now, out);
                Placed::Done
            }
            _ => self.enqueue(sid, p, promise, out),
        }
    }

    /// When a shared-group member goes away, its messages from that group that were not yet
    /// sent, and its unacknowledged QoS 1 ones, go to another connected member; QoS 2 ones
    /// already sent stay for this member's return (MQTT-4.8.2-4).
    pub(crate) fn redistribute_shared(&mut self, sid: SessionId, now: Time, out: &mut Outbox) {
        let Some(s) = self.sessions.get(&sid) else {
            return;
        };
        let moved = s.shared_movable();
        if moved.is_empty() {
            return;
        }
        self.commit(Record::TakeShared(sid), out);
        for p in moved {
            let origin = p.shared.clone().expect("only shared messages are moved");
            let sessions = &self.sessions;
            let other = self
                .subs
                .shared_group(&origin.filter, &origin.group)
                .and_then(|g| {
                    g.pick(|m| m != sid && sessions.get(&m).is_some_and(|s| s.is_connected()))
                });
            match other {
                Some(e) if e.session != sid => {
                    let qos = p.message.qos.min(e.options.qos);
                    let p = Pending { qos, ..p };
                    self.deliver(e.session, p, Promise::Accepted, now, out);
                }
                // Nobody else is there: keep it for this member's return.
                _ => {
                    self.enqueue(sid, p, Promise::Accepted, out);
                }
            }
        }
        self.queue_shrunk(sid, out);
    }
}

/// Why a client may not publish to `topic` whoever it is (a PUBLISH and a will alike):
/// topics the broker itself publishes (`$SYS`, `$dlq/…`) or consumes (`$queue/…`) are not
/// authorized, a malformed `$delayed/…` is an invalid topic.
pub(crate) fn reserved_topic(topic: &str) -> Option<ReasonCode> {
    if topic.starts_with("$SYS") || topic.starts_with("$queue/") || topic.starts_with("$dlq/") {
        Some(ReasonCode::NotAuthorized)
    } else if matches!(crate::queues::parse_delayed(topic), Some(Err(()))) {
        Some(ReasonCode::TopicNameInvalid)
    } else {
        None
    }
}
