//! SUBSCRIBE and UNSUBSCRIBE: validation, the ACL, retained-message replay.

use ferrymq_mqtt::topic::{parse_shared, valid_topic_filter};
use ferrymq_mqtt::{
    Packet, Properties, ProtocolVersion, QoS, ReasonCode, RetainHandling, SubAck, Subscribe,
    SubscriptionOptions, UnsubAck, Unsubscribe,
};

use crate::broker::{Action, Outbox};
use crate::journal::record::Record;
use crate::queue_full::Promise;
use crate::session::{Pending, Subscription};
use crate::{Broker, ConnId, SessionId, Time};

impl Broker {
    pub(crate) fn on_subscribe(&mut self, conn: ConnId, s: Subscribe, now: Time, out: &mut Outbox) {
        let sid = self.conns[&conn].session;
        let identifier = s.properties.subscription_identifiers.first().copied();
        // No Local on a shared subscription is a protocol error (MQTT-3.8.3-4).
        if s.filters
            .iter()
            .any(|(f, o)| o.no_local && f.starts_with("$share/"))
        {
            return self.kill(conn, Some(ReasonCode::ProtocolError), now, out);
        }
        let mut reasons = Vec::with_capacity(s.filters.len());
        let mut replay = Vec::new();
        for (filter, options) in s.filters {
            match self.add_subscription(conn, sid, &filter, options, identifier, out) {
                Ok(existed) => {
                    reasons.push(match options.qos {
                        QoS::AtMostOnce => ReasonCode::Success,
                        QoS::AtLeastOnce => ReasonCode::GrantedQoS1,
                        QoS::ExactlyOnce => ReasonCode::GrantedQoS2,
                    });
                    let wanted = match options.retain_handling {
                        RetainHandling::SendAtSubscribe => true,
                        RetainHandling::SendIfNew => !existed,
                        RetainHandling::DoNotSend => false,
                    };
                    // Shared subscriptions get no retained messages (MQTT-4.8.2).
                    if wanted && !filter.starts_with("$share/") {
                        replay.push((filter, options));
                    }
                }
                Err(reason) => reasons.push(reason),
            }
        }
        let ack = SubAck {
            packet_id: s.packet_id,
            reasons,
            properties: Properties::default(),
        };
        out.push(conn, Action::Send(Packet::SubAck(ack)));
        for (filter, options) in replay {
            if filter.starts_with("$dlq/") {
                // Dead letters are not retained messages, but a new reader wants the ones
                // already there.
                self.replay_dead_letters(sid, &filter, options, now, out);
            }
            self.replay_retained(sid, &filter, options, identifier, now, out);
        }
        // A new consumer takes what its queues have ready.
        self.pump_consumer(sid, now, out);
    }

    /// Adds one subscription; `Ok(true)` when it replaced an existing one.
    fn add_subscription(
        &mut self,
        conn: ConnId,
        sid: SessionId,
        raw: &str,
        options: SubscriptionOptions,
        identifier: Option<u32>,
        out: &mut Outbox,
    ) -> Result<bool, ReasonCode> {
        let (group, filter) = match parse_shared(raw) {
            Ok(Some(sh)) => (Some(sh.group.to_string()), sh.filter.to_string()),
            Ok(None) => (None, raw.to_string()),
            Err(_) => return Err(ReasonCode::TopicFilterInvalid),
        };
        if !valid_topic_filter(&filter) || filter.split('/').count() > self.config.max_topic_levels
        {
            return Err(ReasonCode::TopicFilterInvalid);
        }
        // `$queue/{name}` and `$dlq/{queue}` are checked as they are: the rules name them.
        // Before the queue's existence, so that a denied client cannot tell which queues exist.
        let acl = self.conns.get(&conn).and_then(|c| c.acl.as_deref());
        if acl.is_some_and(|a| !a.may_subscribe(&filter)) {
            self.stats.acl_denied_subscriptions += 1;
            out.denied_subscriptions.push((conn, raw.into()));
            return Err(self.config.deny_subscribe_reason);
        }
        if let Some(name) = raw.strip_prefix("$queue/") {
            // A consumer of a queue that exists: `$queue/{name}`, no wildcards, not shared.
            let user_queue =
                name != crate::queues::DELAYED_QUEUE && self.queues.by_name.contains_key(name);
            if !user_queue {
                return Err(ReasonCode::TopicFilterInvalid);
            }
        }
        let s = self.sessions.get(&sid).expect("session of attached conn");
        if self.admission.storage_full && s.expiry_interval > 0 {
            // A durable subscription is a write the log cannot take now.
            self.stats.refused_storage_full += 1;
            return Err(ReasonCode::QuotaExceeded);
        }
        let existed = s.subscriptions.contains_key(raw);
        if !existed && s.subscriptions.len() >= self.config.max_subscriptions_per_client {
            return Err(ReasonCode::QuotaExceeded);
        }
        let mut sub = Subscription {
            filter,
            group,
            options,
            identifier,
            queue: None,
        };
        // Decided now and recorded: a `$share/{name}/…` made while no queue `{name}` exists
        // stays a shared subscription whatever happens to queues later, after any restart.
        sub.queue = crate::queues::consumed_queue(raw, &sub, &self.queues);
        // `$share/{queue}/…` consumes the queue as `$queue/{queue}` does: the same rule
        // decides (its filter part alone would not name the queue).
        if let (Some(q), Some(acl)) = (&sub.queue, acl) {
            if !acl.may_subscribe(&format!("$queue/{q}")) {
                self.stats.acl_denied_subscriptions += 1;
                out.denied_subscriptions.push((conn, raw.into()));
                return Err(self.config.deny_subscribe_reason);
            }
        }
        let raw = raw.to_string();
        self.commit(Record::Subscribe { sid, raw, sub }, out);
        Ok(existed)
    }

    fn replay_retained(
        &mut self,
        sid: SessionId,
        filter: &str,
        options: SubscriptionOptions,
        identifier: Option<u32>,
        now: Time,
        out: &mut Outbox,
    ) {
        for msg in self.retained.matching(filter) {
            if msg.is_expired(now) {
                continue;
            }
            let p = Pending {
                qos: msg.qos.min(options.qos),
                message: msg,
                // Retained messages sent on subscribe keep RETAIN=1 (MQTT-3.3.1-8).
                retain: true,
                subscription_ids: identifier.into_iter().collect(),
                shared: None,
                queue: None,
            };
            self.deliver(sid, p, Promise::Unacked, now, out);
        }
    }

    pub(crate) fn on_unsubscribe(&mut self, conn: ConnId, u: Unsubscribe, out: &mut Outbox) {
        let c = &self.conns[&conn];
        let (sid, version) = (c.session, c.version);
        let mut reasons = Vec::with_capacity(u.filters.len());
        for raw in &u.filters {
            let exists = self
                .sessions
                .get(&sid)
                .is_some_and(|s| s.subscriptions.contains_key(raw.as_str()));
            if exists {
                let raw = raw.clone();
                self.commit(Record::Unsubscribe { sid, raw }, out);
                reasons.push(ReasonCode::Success);
            } else {
                reasons.push(ReasonCode::NoSubscriptionExisted);
            }
        }
        if version == ProtocolVersion::V311 {
            reasons.clear();
        }
        let ack = UnsubAck {
            packet_id: u.packet_id,
            reasons,
            properties: Properties::default(),
        };
        out.push(conn, Action::Send(Packet::UnsubAck(ack)));
    }
}
