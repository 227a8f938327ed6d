//! The broker state machine: connections in, actions out.
//!
//! ```text
//!  driver ──connect()──▶ ┌────────┐ ──Action::Send/Deliver/Close──▶ driver (per ConnId)
//!         ──packet()───▶ │ Broker │
//!         ──closed()───▶ │        │ ◀── tick(now): will delays, session expiry
//!                        └────────┘
//! ```
//! A connection is attached after [`Broker::connect`] accepts it and detached by
//! [`Broker::closed`], a protocol violation, a takeover, or [`Broker::shutdown`]. After a
//! `Close` action the engine has forgotten the connection; later calls for it are ignored.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

// Integer-keyed maps use FxHash (keys are ours); string-keyed ones keep SipHash, whose random
// keys resist collision attacks through client-chosen ids.

use rustc_hash::FxHashMap as HashMap;
use std::sync::Arc;

use ferrymq_mqtt::{
    ConnAck, Connect, Disconnect, Packet, PacketId, Properties, ProtocolVersion, Publish, QoS,
    ReasonCode, Will,
};

use crate::journal::record::Record;
use crate::journal::Journal;
use crate::session::{OutState, Pending, Session};
use crate::{
    BrokerConfig, ConnId, Message, RetainedStore, SessionId, SubscriptionTree, Time,
    SESSION_NEVER_EXPIRES,
};

/// What the driver must do for one connection.
// `Send` is large because properties live inline in packets; boxing it would allocate per
// PUBACK. The performance work revisits the packet layout as a whole.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone)]
pub enum Action {
    /// Send a control packet.
    Send(Packet),
    /// Send an application message.
    Deliver(Delivery),
    /// Flush what is queued, then close the connection.
    Close,
}

/// An application message for one subscriber. The driver encodes it as a PUBLISH (adding an
/// outbound topic alias if it wants), with [`Delivery::properties`].
#[derive(Debug, Clone)]
pub struct Delivery {
    pub message: Arc<Message>,
    pub qos: QoS,
    pub packet_id: Option<u16>,
    pub dup: bool,
    pub retain: bool,
    pub subscription_ids: Vec<u32>,
    pub expiry_remaining: Option<u32>,
    /// A work-queue delivery: its attempt (1 on the first delivery) and when the message
    /// entered the queue (ms since the Unix epoch), sent as the `x-attempt` and
    /// `x-first-enqueued-ms` user properties.
    pub attempt: Option<(u32, u64)>,
}

impl Delivery {
    /// The properties this delivery goes out with: the message's own when nothing changes
    /// (no copy), else a copy with the remaining expiry and this subscriber's identifiers.
    pub fn properties(&self) -> std::borrow::Cow<'_, Properties> {
        let m = &self.message.properties;
        if m.message_expiry_interval == self.expiry_remaining
            && self.subscription_ids.is_empty()
            && self.attempt.is_none()
        {
            return std::borrow::Cow::Borrowed(m);
        }
        let mut p = m.clone();
        if p.message_expiry_interval != self.expiry_remaining {
            p.message_expiry_interval = self.expiry_remaining;
        }
        if !self.subscription_ids.is_empty() {
            p.subscription_identifiers = self.subscription_ids.clone();
        }
        if let Some((attempt, first)) = self.attempt {
            let u = &mut p.user_properties;
            u.retain(|(k, _)| k != "x-attempt" && k != "x-first-enqueued-ms");
            u.push(("x-attempt".into(), attempt.to_string()));
            u.push(("x-first-enqueued-ms".into(), first.to_string()));
        }
        std::borrow::Cow::Owned(p)
    }
}

/// Actions produced by one or more calls, in order, tagged with their connection.
#[derive(Debug, Default)]
pub struct Outbox {
    pub actions: Vec<(ConnId, Action)>,
    /// Journal records (when journaling is on). None of `actions` may reach a client before
    /// these are durable.
    pub journal: crate::JournalBuf,
    /// Connections the engine ended for breaking a rule, with the reason, for the driver's log.
    pub violations: Vec<(ConnId, ReasonCode)>,
    /// Flow control, in order: connections whose input the driver must stop running through
    /// the engine ([`Flow::Pause`]: their next packets wait, and their sockets are not read)
    /// or may run again ([`Flow::Resume`]). The engine pauses a publisher while it holds one
    /// of its acknowledgements (a full queue under `queue_full = backpressure`). A driver
    /// that sees a pause must stop feeding that connection's packets at once, even in the
    /// middle of a batch.
    pub flow: Vec<(ConnId, Flow)>,
    /// Publishes the ACL refused, for the driver's log (a 3.1.1 client is not told: MQTT
    /// 3.1.1 has no negative acknowledgement).
    pub denied: Vec<DeniedPublish>,
    /// Messages that just became dead letters, for the driver's log.
    pub dead_lettered: Vec<DeadLettered>,
    /// Messages dropped for a subscriber (expired, too large for it, its queue full) that
    /// carry a W3C `traceparent`, for the driver's log. Untraced drops are only counted.
    /// At most [`Outbox::MAX_DROPPED_LISTED`] until the driver empties it: one message
    /// dropped for many subscribers would list each (an allocation and a log call apiece).
    pub dropped: Vec<DroppedMessage>,
    /// Traced drops past [`Outbox::MAX_DROPPED_LISTED`], only counted (the driver resets it).
    pub dropped_unlisted: u64,
    /// Subscriptions the ACL refused, with their filters as requested, for the driver's log.
    pub denied_subscriptions: Vec<(ConnId, Arc<str>)>,
    /// Connections that ended, with their client id and why, for the driver's audit log.
    pub ended: Vec<(ConnId, Arc<str>, Ended)>,
}

/// Why a connection ended ([`Outbox::ended`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ended {
    /// The client sent DISCONNECT with this reason (0x00 normal, 0x04 with will, ...).
    ByClient(ReasonCode),
    /// The network connection closed without a DISCONNECT, or the driver gave up on it.
    Lost,
    /// The broker ended it with this reason (a protocol error, keep alive, session taken
    /// over, administrative action, shutting down); `None`: closed without a reason.
    ByServer(Option<ReasonCode>),
}

/// A traced message dropped for one subscriber (see [`Outbox::dropped`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DroppedMessage {
    pub topic: Arc<str>,
    /// As in `ferrymq_messages_dropped_total{reason}`: `expired`, `packet_too_large`,
    /// `queue_full`.
    pub reason: &'static str,
    /// The subscriber's.
    pub client_id: Arc<str>,
    pub trace_id: String,
}

/// A publish the ACL refused (see [`Outbox::denied`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeniedPublish {
    pub conn: ConnId,
    pub topic: Arc<str>,
    /// From the publish's W3C `traceparent` user property.
    pub trace_id: Option<String>,
}

/// A message that became a dead letter (see [`Outbox::dead_lettered`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLettered {
    pub queue: Arc<str>,
    pub message_id: u64,
    pub topic: Arc<str>,
    pub cause: crate::workqueue::Cause,
    /// The last failure's reason, if it failed a consumer.
    pub reason: Option<Arc<str>>,
    /// From the message's W3C `traceparent` user property.
    pub trace_id: Option<String>,
}

/// A flow-control instruction for one connection's input (see [`Outbox::flow`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flow {
    Pause,
    Resume,
}

impl Outbox {
    pub(crate) fn push(&mut self, conn: ConnId, action: Action) {
        self.actions.push((conn, action));
    }

    /// Traced drops listed in [`Outbox::dropped`] at most (the log shows 20 a second).
    pub const MAX_DROPPED_LISTED: usize = 100;

    /// Notes a message dropped for `client_id`'s session, if it carries a `traceparent`
    /// (most messages have no user property: one test of an empty list).
    pub(crate) fn note_drop(&mut self, m: &Message, reason: &'static str, client_id: &Arc<str>) {
        if m.properties.user_properties.is_empty() {
            return;
        }
        let Some(trace_id) = crate::queues::trace_id_in(&m.properties) else {
            return;
        };
        if self.dropped.len() >= Outbox::MAX_DROPPED_LISTED {
            self.dropped_unlisted += 1;
            return;
        }
        self.dropped.push(DroppedMessage {
            topic: m.topic.clone(),
            reason,
            client_id: client_id.clone(),
            trace_id: trace_id.to_string(),
        });
    }
}

/// What the driver needs to know about an accepted connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectOutcome {
    pub accepted: bool,
    pub version: ProtocolVersion,
    /// Keep alive the driver enforces (1.5× of it), in seconds; 0 = none.
    pub keep_alive: u16,
    /// Largest packet the client accepts.
    pub client_max_packet_size: u32,
    /// How many outbound topic aliases the client accepts.
    pub client_topic_alias_maximum: u16,
}

/// Plain counters (and two gauges, so marked), summed by the driver at scrape time.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub messages_received: [u64; 3],
    pub messages_sent: [u64; 3],
    /// Payload bytes received and sent, by QoS (of the PUBLISH, of the delivery).
    pub payload_bytes_received: [u64; 3],
    pub payload_bytes_sent: [u64; 3],
    /// QoS 1/2 messages dropped for a full queue: the oldest under `queue_full =
    /// drop_oldest`; otherwise ones nobody could be told about (wills, in-process publishes,
    /// retained messages sent on subscribe).
    pub dropped_queue_full: u64,
    /// QoS 1/2 publishes refused for a full queue (0x97, or a closed 3.1.1 connection):
    /// under `reject`, or held past `queue_full_timeout_ms` under `backpressure`.
    pub refused_queue_full: u64,
    /// Publishes whose acknowledgement was held for a full queue (`backpressure`).
    pub acks_held_total: u64,
    /// A gauge: acknowledgements held now, for a full queue or behind one that is.
    pub held_acks: u64,
    /// A gauge: the most messages one session's queue has held (beyond those in flight).
    /// Under `backpressure` it may pass `max_queued_messages` by the messages whose
    /// acknowledgements are held.
    pub queued_high_water: u64,
    pub dropped_expired: u64,
    pub dropped_too_large: u64,
    pub dropped_no_subscribers: u64,
    pub connects_refused: u64,
    pub protocol_errors: u64,
    /// QoS 0 publishes dropped while memory was over the high-water mark ([`Admission`]).
    pub dropped_memory_high: u64,
    /// QoS 0 retained publishes dropped while the log could not take new writes.
    pub dropped_storage_full: u64,
    /// QoS 1/2 publishes refused (0x97, or the close of a 3.1.1 connection) while memory was
    /// over the high-water mark.
    pub refused_memory_high: u64,
    /// QoS 1/2 publishes, new durable sessions and their subscriptions refused while the log
    /// could not take new writes.
    pub refused_storage_full: u64,
    /// Publishes refused by the ACL.
    pub acl_denied_publishes: u64,
    /// Subscriptions refused by the ACL.
    pub acl_denied_subscriptions: u64,
    /// Messages not delivered because the ACL does not let the subscriber read their topic
    /// (routed, retained, replayed on resume).
    pub acl_denied_deliveries: u64,
}

/// What the driver's resource checks let the engine take in. The driver measures (memory,
/// free disk, failed writes) and sets this with [`Broker::set_admission`]; the engine only
/// reads it, so it stays free of clocks and I/O.
///
/// | flag | QoS 0 publish | QoS 1/2 publish | new durable session / its SUBSCRIBE |
/// |---|---|---|---|
/// | `memory_high` | dropped, counted | 0x97 (3.1.1: closed) | accepted |
/// | `storage_full` | routed (retained: dropped, counted) | 0x97 (3.1.1: closed) | CONNACK / SUBACK 0x97 |
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Admission {
    /// The process is over its memory high-water mark.
    pub memory_high: bool,
    /// The log is out of room (free disk under its minimum, or a write failed with ENOSPC):
    /// nothing new that must be stored is taken in.
    pub storage_full: bool,
}

/// Per-connection state that ends with the connection.
#[derive(Debug)]
pub(crate) struct Conn {
    pub session: SessionId,
    pub version: ProtocolVersion,
    /// Boxed: most connections have none, and inline it would add ~80 bytes to each.
    pub will: Option<Box<Will>>,
    /// Inbound topic aliases (5.0). Boxed on first use: most connections never send one,
    /// and the empty map is 32 bytes in every connection's entry.
    #[allow(clippy::box_collection)]
    pub topic_aliases: Option<Box<HashMap<u16, Arc<str>>>>,
    pub client_max_packet_size: u32,
    /// The ACL resolved for this client at CONNECT; `None` when nothing can be denied to it.
    /// Boxed: 8 bytes in every connection's entry, most of which have none.
    pub acl: Option<Box<crate::acl::ClientAcl>>,
    /// Who it authenticated as, kept to resolve new rules for it ([`Broker::set_acl`]);
    /// `None` for an anonymous client without a token (boxed like `acl`).
    pub who: Option<Box<crate::Identity>>,
}

/// What happens to a connection's will when it detaches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum WillOnClose {
    /// Published (after its delay): the connection ended without a normal DISCONNECT.
    Publish,
    /// Discarded: a normal DISCONNECT, or the server shutting down.
    Discard,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Timer {
    Will(SessionId),
    SessionExpiry(SessionId),
    /// The oldest held acknowledgement of a connection may be due (`queue_full.rs`).
    HeldAck(ConnId),
    /// A work queue (by its number) has a lease deadline, a delayed message or a dead
    /// letter's retention due (`queues.rs`).
    Queue(u64),
}

/// The engine. See the module docs for the call protocol.
#[derive(Debug)]
pub struct Broker {
    pub(crate) config: BrokerConfig,
    pub(crate) conns: HashMap<ConnId, Conn>,
    /// Boxed: a session is ~230 bytes and the table keeps up to half its slots empty, so
    /// inline every idle connection paid for two; boxed the spare slots cost 16 bytes.
    pub(crate) sessions: HashMap<SessionId, Box<Session>>,
    /// Ordered: client ids come from the network (no hash to flood), and the admin API pages
    /// through clients from a cursor (`views.rs`).
    pub(crate) by_client_id: std::collections::BTreeMap<Arc<str>, SessionId>,
    pub(crate) subs: SubscriptionTree,
    pub(crate) retained: RetainedStore,
    pub(crate) stats: Stats,
    pub(crate) timers: BinaryHeap<Reverse<(Time, Timer)>>,
    pub(crate) next_session: u64,
    pub(crate) next_message_id: u64,
    /// Assigned client ids are `ferrymq-{instance}-{n}`: the instance part is random per
    /// process (set by the driver), so an id handed out never comes back after a restart.
    instance: u128,
    next_assigned_id: u64,
    pub(crate) journal: Option<Journal>,
    /// Sessions restore found connected (the crash disconnected them); their disconnect is
    /// journaled by [`Broker::enable_journal`].
    pub(crate) restored_disconnects: Vec<SessionId>,
    /// Publishers' acknowledgements held for full queues (`queue_full.rs`).
    pub(crate) holds: crate::queue_full::Holds,
    pub(crate) admission: Admission,
    /// Work queues and their consumers (`queues.rs`).
    pub(crate) queues: crate::queues::Queues,
    /// Where queue payloads are read back from the log (set by the driver).
    pub(crate) payloads: Option<crate::queues::Payloads>,
    pub(crate) journal_base: u64,
}

impl Broker {
    pub fn new(config: BrokerConfig) -> Broker {
        Broker {
            config,
            conns: HashMap::default(),
            sessions: HashMap::default(),
            by_client_id: Default::default(),
            subs: SubscriptionTree::default(),
            retained: RetainedStore::default(),
            stats: Stats::default(),
            timers: BinaryHeap::new(),
            next_session: 1,
            next_message_id: 1,
            instance: 0,
            next_assigned_id: 1,
            journal: None,
            restored_disconnects: Vec::new(),
            holds: Default::default(),
            admission: Admission::default(),
            queues: Default::default(),
            payloads: None,
            journal_base: 0,
        }
    }

    /// Sets what may be taken in from now on (see [`Admission`]).
    pub fn set_admission(&mut self, admission: Admission) {
        self.admission = admission;
    }

    pub fn admission(&self) -> Admission {
        self.admission
    }

    /// Sets the random part of assigned client ids. The engine has no randomness of its
    /// own: a driver that restarts on the same store must pass a fresh random value each
    /// time, or a client connecting with an empty id could be handed a stranger's session.
    pub fn set_instance_id(&mut self, instance: u128) {
        self.instance = instance;
        // Backoff jitter draws from a generator seeded with it.
        self.queues.seed(instance as u64 ^ (instance >> 64) as u64);
    }

    pub fn config(&self) -> &BrokerConfig {
        &self.config
    }

    /// Replaces the ACL rules and the SUBACK reason for a denied filter (a configuration
    /// reload), and resolves the new rules for every connected client at once: its next
    /// publish, subscribe and every delivery from now on (routed, retained, `$SYS`, its
    /// queued messages as they go into flight) are checked against them. Subscriptions it
    /// made under the old rules stay, but deliver only what the new rules let it read; when
    /// its session resumes, those the new rules do not allow are removed (`resume_session`).
    pub fn set_acl(&mut self, acl: crate::AclConfig, deny_subscribe_reason: ReasonCode) {
        self.config.acl = acl;
        self.config.deny_subscribe_reason = deny_subscribe_reason;
        let anonymous = crate::Identity::default();
        for c in self.conns.values_mut() {
            let Some(s) = self.sessions.get(&c.session) else {
                continue;
            };
            let who = c.who.as_deref().unwrap_or(&anonymous);
            c.acl = self.config.acl.for_client(who, &s.client_id).map(Box::new);
        }
    }

    /// The client id and authenticated user name of a connection (for the driver's audit
    /// log).
    pub fn client_of(&self, conn: ConnId) -> Option<(&str, Option<&str>)> {
        let c = self.conns.get(&conn)?;
        let s = self.sessions.get(&c.session)?;
        let user = c.who.as_deref().and_then(|w| w.user.as_deref());
        Some((&s.client_id, user))
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    pub fn connection_count(&self) -> usize {
        self.conns.len()
    }

    /// The connection a session is attached to now, if any (the driver attributes a
    /// delivery to the connection that published it through [`crate::Message::publisher`]).
    pub fn session_connection(&self, sid: SessionId) -> Option<ConnId> {
        self.sessions.get(&sid).and_then(|s| s.conn)
    }

    /// The client id of the session a connection is attached to.
    pub fn connection_client_id(&self, conn: ConnId) -> Option<&Arc<str>> {
        let c = self.conns.get(&conn)?;
        self.sessions.get(&c.session).map(|s| &s.client_id)
    }

    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    pub fn subscription_count(&self) -> usize {
        self.subs.len()
    }

    pub fn retained_count(&self) -> usize {
        self.retained.len()
    }

    /// The session with the most QoS 1/2 messages held (in flight and queued), and how many:
    /// for the `queue_depth` alarm. Visits every session: call it about once a second.
    pub fn deepest_queue(&self) -> Option<(Arc<str>, usize)> {
        self.sessions
            .values()
            .map(|s| (s.inflight.len() + s.pending.len(), s))
            .max_by_key(|(n, _)| *n)
            .map(|(n, s)| (s.client_id.clone(), n))
    }

    /// Handles a CONNECT on a new connection. A refused connection gets its CONNACK and a
    /// `Close`; an accepted one gets CONNACK, then any redelivered and queued messages.
    /// The client is anonymous as far as the ACL goes (see [`Broker::connect_as`]).
    pub fn connect(
        &mut self,
        conn: ConnId,
        c: Connect,
        now: Time,
        out: &mut Outbox,
    ) -> ConnectOutcome {
        self.connect_as(conn, c, crate::Identity::default(), now, out)
    }

    /// [`Broker::connect`] for a client the driver authenticated as `who`: the ACL rules
    /// are resolved for its user name and client id (and its token's claim) here, and a will
    /// on a topic it may not publish to refuses the CONNECT (0x87, 3.1.1 code 5).
    pub fn connect_as(
        &mut self,
        conn: ConnId,
        c: Connect,
        who: crate::Identity,
        now: Time,
        out: &mut Outbox,
    ) -> ConnectOutcome {
        let v5 = c.version == ProtocolVersion::V5;
        let mut outcome = ConnectOutcome {
            accepted: false,
            version: c.version,
            keep_alive: c.keep_alive,
            client_max_packet_size: c.properties.maximum_packet_size.unwrap_or(u32::MAX),
            client_topic_alias_maximum: c.properties.topic_alias_maximum.unwrap_or(0),
        };
        if let Err(reason) = self.check_connect(&c) {
            self.refuse_connect(conn, reason, out);
            return outcome;
        }
        let mut props = Properties::default();
        let client_id: Arc<str> = if c.client_id.is_empty() {
            let id = format!("ferrymq-{:032x}-{}", self.instance, self.next_assigned_id);
            self.next_assigned_id += 1;
            if v5 {
                props.assigned_client_identifier = Some(id.clone());
            }
            id.into()
        } else {
            c.client_id.as_str().into()
        };
        let acl = self.config.acl.for_client(&who, &client_id).map(Box::new);
        if let (Some(acl), Some(w)) = (&acl, &c.will) {
            if !acl.may_publish(&w.topic) {
                self.stats.acl_denied_publishes += 1;
                self.refuse_connect(conn, ReasonCode::NotAuthorized, out);
                return outcome;
            }
        }
        let expiry = self.granted_expiry(&c, &mut props);
        if expiry > 0 && self.admission.storage_full && !self.resumes_durable(&client_id, &c) {
            // A new durable session is a write the log cannot take now (3.1.1: code 3).
            self.stats.refused_storage_full += 1;
            self.refuse_connect(conn, ReasonCode::QuotaExceeded, out);
            return outcome;
        }
        // Take over a live connection on the same client id.
        if let Some(old) = self
            .by_client_id
            .get(&client_id)
            .and_then(|s| self.sessions[s].conn)
        {
            self.kill(old, Some(ReasonCode::SessionTakenOver), now, out);
        }
        let existing = self.by_client_id.get(&client_id).copied();
        let session_id = match existing {
            Some(id) if !c.clean_start => id,
            _ => {
                if let Some(old) = existing {
                    self.end_session(old, now, out);
                }
                let id = SessionId(self.next_session);
                self.next_session += 1;
                id
            }
        };
        let session_present = existing == Some(session_id);
        if v5 {
            props.receive_maximum = Some(self.config.receive_maximum);
            props.maximum_packet_size = Some(self.config.max_packet_size);
            props.topic_alias_maximum = Some(self.config.topic_alias_maximum);
        }
        let max_ka = self.config.max_keep_alive;
        // 0 and 65,535 (the largest value MQTT can carry) both mean "no cap".
        let capped = max_ka > 0 && max_ka < u16::MAX;
        if capped && (c.keep_alive == 0 || c.keep_alive > max_ka) && v5 {
            props.server_keep_alive = Some(max_ka);
            outcome.keep_alive = max_ka;
        }
        let window = usize::from(c.properties.receive_maximum.unwrap_or(u16::MAX))
            .min(usize::from(self.config.max_inflight))
            .clamp(1, 65_000);
        // Creates the session or updates it; connecting cancels a delayed will (MQTT-3.1.3-9).
        self.commit(
            Record::Session {
                sid: session_id,
                client_id,
                version: c.version,
                expiry,
                disconnected_at: None,
            },
            out,
        );
        let session = self.sessions.get_mut(&session_id).expect("session exists");
        session.conn = Some(conn);
        session.window = window;
        self.conns.insert(
            conn,
            Conn {
                session: session_id,
                version: c.version,
                will: c.will.map(Box::new),
                topic_aliases: None,
                client_max_packet_size: outcome.client_max_packet_size,
                acl,
                who: (who != crate::Identity::default()).then(|| Box::new(who)),
            },
        );
        let ack = ConnAck {
            session_present,
            reason: ReasonCode::Success,
            properties: props,
        };
        out.push(conn, Action::Send(Packet::ConnAck(ack)));
        self.journal_durability(session_id, out);
        self.resume_session(session_id, now, out);
        outcome.accepted = true;
        outcome
    }

    fn refuse_connect(&mut self, conn: ConnId, reason: ReasonCode, out: &mut Outbox) {
        self.stats.connects_refused += 1;
        let ack = ConnAck {
            session_present: false,
            reason,
            properties: Properties::default(),
        };
        out.push(conn, Action::Send(Packet::ConnAck(ack)));
        out.push(conn, Action::Close);
    }

    /// Whether this CONNECT resumes a session that is already durable (its records are in the
    /// log, so resuming it writes little), as opposed to making a new one.
    fn resumes_durable(&self, client_id: &str, c: &Connect) -> bool {
        !c.clean_start
            && self
                .by_client_id
                .get(client_id)
                .and_then(|id| self.sessions.get(id))
                .is_some_and(|s| s.expiry_interval > 0)
    }

    fn check_connect(&self, c: &Connect) -> Result<(), ReasonCode> {
        if c.properties.authentication_method.is_some() {
            return Err(ReasonCode::BadAuthenticationMethod);
        }
        if c.client_id.is_empty() && !c.clean_start && c.version == ProtocolVersion::V311 {
            return Err(ReasonCode::ClientIdentifierNotValid);
        }
        if let Some(w) = &c.will {
            if w.topic.split('/').count() > self.config.max_topic_levels
                || w.topic.starts_with("$SYS")
            {
                return Err(ReasonCode::TopicNameInvalid);
            }
            // A will is a publish made later: the same topics are closed to it (a will on
            // `$dlq/{queue}` would forge a dead letter).
            if let Some(reason) = crate::routing::reserved_topic(&w.topic) {
                return Err(reason);
            }
            if w.properties.payload_format_indicator == Some(1)
                && ferrymq_mqtt::validate_utf8(&w.payload).is_err()
            {
                return Err(ReasonCode::PayloadFormatInvalid);
            }
        }
        Ok(())
    }

    fn granted_expiry(&self, c: &Connect, props: &mut Properties) -> u32 {
        let asked = match c.version {
            ProtocolVersion::V311 if c.clean_start => 0,
            ProtocolVersion::V311 => SESSION_NEVER_EXPIRES,
            ProtocolVersion::V5 => c
                .properties
                .session_expiry_interval
                .unwrap_or(self.config.default_session_expiry),
        };
        let granted = asked.min(self.config.max_session_expiry);
        if granted != asked && c.version == ProtocolVersion::V5 {
            props.session_expiry_interval = Some(granted);
        }
        granted
    }

    /// Removes a session, its subscriptions, and publishes its pending will.
    pub(crate) fn end_session(&mut self, id: SessionId, now: Time, out: &mut Outbox) {
        let Some(s) = self.sessions.get_mut(&id) else {
            return;
        };
        let will = s.pending_will.take();
        self.commit(Record::SessionEnd(id), out);
        self.queue_shrunk(id, out);
        if let Some((will, _)) = will.map(|b| *b) {
            self.publish_will(will, id, now, out);
        }
    }

    /// The network connection closed without a DISCONNECT (or the driver gave up on it).
    /// The will is published, subject to its delay.
    pub fn closed(&mut self, conn: ConnId, now: Time, out: &mut Outbox) {
        self.note_end(conn, Ended::Lost, out);
        self.detach(conn, WillOnClose::Publish, None, now, out);
    }

    /// Ends a connection for a protocol violation: DISCONNECT with `reason` (5.0 only), close,
    /// publish the will.
    pub fn kill(&mut self, conn: ConnId, reason: Option<ReasonCode>, now: Time, out: &mut Outbox) {
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        if let (Some(reason), ProtocolVersion::V5) = (reason, c.version) {
            out.push(
                conn,
                Action::Send(Packet::Disconnect(Disconnect::new(reason))),
            );
        }
        if let Some(r) = reason.filter(|r| *r != ReasonCode::SessionTakenOver) {
            self.stats.protocol_errors += 1;
            out.violations.push((conn, r));
        }
        out.push(conn, Action::Close);
        self.note_end(conn, Ended::ByServer(reason), out);
        self.detach(conn, WillOnClose::Publish, None, now, out);
    }

    /// Records why a connection ends, before it is detached ([`Outbox::ended`]).
    pub(crate) fn note_end(&self, conn: ConnId, why: Ended, out: &mut Outbox) {
        let Some(s) = self
            .conns
            .get(&conn)
            .and_then(|c| self.sessions.get(&c.session))
        else {
            return;
        };
        out.ended.push((conn, s.client_id.clone(), why));
    }

    /// Disconnects every client because the server is stopping (5.0 clients get 0x8B).
    pub fn shutdown(&mut self, now: Time, out: &mut Outbox) {
        let conns: Vec<ConnId> = self.conns.keys().copied().collect();
        for conn in conns {
            if self.conns[&conn].version == ProtocolVersion::V5 {
                let d = Disconnect::new(ReasonCode::ServerShuttingDown);
                out.push(conn, Action::Send(Packet::Disconnect(d)));
            }
            out.push(conn, Action::Close);
            let why = Ended::ByServer(Some(ReasonCode::ServerShuttingDown));
            self.note_end(conn, why, out);
            self.detach(conn, WillOnClose::Discard, None, now, out);
        }
    }

    /// Detaches a connection from its session (with the session expiry its DISCONNECT set,
    /// if any); ends the session if it does not outlive it.
    pub(crate) fn detach(
        &mut self,
        conn: ConnId,
        will: WillOnClose,
        new_expiry: Option<u32>,
        now: Time,
        out: &mut Outbox,
    ) {
        let Some(c) = self.conns.remove(&conn) else {
            return;
        };
        self.drop_holds(conn, out);
        let sid = c.session;
        if let Some(s) = self.sessions.get_mut(&sid) {
            // Its leases go back before the session is marked gone (each a failed attempt).
            s.conn = None;
            self.release_leases(sid, now, out);
        }
        let Some(s) = self.sessions.get_mut(&sid) else {
            return;
        };
        s.conn = None;
        let expiry = new_expiry.unwrap_or(s.expiry_interval);
        let record = Record::Session {
            sid,
            client_id: s.client_id.clone(),
            version: s.version,
            expiry,
            disconnected_at: Some(now),
        };
        self.commit(record, out);
        self.journal_durability(sid, out);
        if let (WillOnClose::Publish, Some(w)) = (will, c.will) {
            let delay = w.properties.will_delay_interval.unwrap_or(0).min(expiry);
            if delay == 0 {
                self.publish_will(*w, sid, now, out);
            } else {
                let due = now.plus_secs(delay);
                self.commit(Record::Will { sid, will: w, due }, out);
                self.timers.push(Reverse((due, Timer::Will(sid))));
            }
        }
        self.redistribute_shared(sid, now, out);
        if expiry == 0 {
            self.end_session(sid, now, out);
        } else if expiry != SESSION_NEVER_EXPIRES {
            self.timers
                .push(Reverse((now.plus_secs(expiry), Timer::SessionExpiry(sid))));
        }
    }

    fn publish_will(&mut self, will: Will, sid: SessionId, now: Time, out: &mut Outbox) {
        let publish = Publish {
            dup: false,
            qos: will.qos,
            retain: will.retain,
            topic: will.topic,
            packet_id: None,
            properties: will.properties,
            payload: will.payload,
        };
        let topic: Arc<str> = publish.topic.as_str().into();
        let mut msg = Message::from_publish(publish, topic, Some(sid), now);
        if msg.properties.will_delay_interval.is_some() {
            msg.properties.will_delay_interval = None;
        }
        self.publish(msg, now, out);
    }

    /// The earliest time [`Broker::tick`] has work to do.
    pub fn next_deadline(&self) -> Option<Time> {
        self.timers.peek().map(|Reverse((t, _))| *t)
    }

    /// Fires due timers: delayed wills, session expiry, acknowledgements held too long.
    pub fn tick(&mut self, now: Time, out: &mut Outbox) {
        while let Some(Reverse((due, timer))) = self.timers.peek().copied() {
            if due > now {
                break;
            }
            self.timers.pop();
            match timer {
                Timer::Will(sid) => {
                    let Some(s) = self.sessions.get_mut(&sid) else {
                        continue;
                    };
                    if s.pending_will.as_deref().is_some_and(|(_, at)| *at <= now) {
                        let (will, _) = *s.pending_will.take().expect("checked");
                        self.commit(Record::WillDone(sid), out);
                        self.publish_will(will, sid, now, out);
                    }
                }
                Timer::SessionExpiry(sid) => {
                    let Some(s) = self.sessions.get(&sid) else {
                        continue;
                    };
                    let expired = s.conn.is_none()
                        && s.disconnected_at
                            .is_some_and(|at| at.plus_secs(s.expiry_interval) <= now);
                    if expired {
                        self.end_session(sid, now, out);
                    }
                }
                Timer::HeldAck(conn) => self.expire_held(conn, now, out),
                Timer::Queue(number) => self.queue_timer(number, now, out),
            }
        }
    }

    /// Handles one packet from an attached connection.
    pub fn packet(&mut self, conn: ConnId, packet: Packet, now: Time, out: &mut Outbox) {
        if !self.conns.contains_key(&conn) {
            return;
        }
        match packet {
            Packet::Publish(p) => self.on_publish(conn, p, now, out),
            Packet::PubAck(r) => self.on_puback(conn, r, now, out),
            Packet::PubRec(r) => self.on_pubrec(conn, r, now, out),
            Packet::PubRel(r) => self.on_pubrel(conn, r, out),
            Packet::PubComp(r) => self.on_pubcomp(conn, r, now, out),
            Packet::Subscribe(s) => self.on_subscribe(conn, s, now, out),
            Packet::Unsubscribe(u) => self.on_unsubscribe(conn, u, out),
            Packet::PingReq => out.push(conn, Action::Send(Packet::PingResp)),
            Packet::Disconnect(d) => self.on_disconnect(conn, d, now, out),
            // A second CONNECT (MQTT-3.1.0-2), AUTH without an auth method, or a server-only
            // packet from a client.
            _ => self.kill(conn, Some(ReasonCode::ProtocolError), now, out),
        }
    }

    fn on_disconnect(&mut self, conn: ConnId, d: Disconnect, now: Time, out: &mut Outbox) {
        let Some(c) = self.conns.get(&conn) else {
            return;
        };
        let sid = c.session;
        if let Some(new_expiry) = d.properties.session_expiry_interval {
            let s = &self.sessions[&sid];
            // Setting a non-zero expiry at DISCONNECT after connecting with 0 is a protocol
            // error (MQTT-3.14.2-2).
            if s.expiry_interval == 0 && new_expiry != 0 {
                self.kill(conn, Some(ReasonCode::ProtocolError), now, out);
                return;
            }
        }
        let granted = d
            .properties
            .session_expiry_interval
            .map(|e| e.min(self.config.max_session_expiry));
        let will = match d.reason {
            ReasonCode::DisconnectWithWill => WillOnClose::Publish,
            _ => WillOnClose::Discard,
        };
        out.push(conn, Action::Close);
        self.note_end(conn, Ended::ByClient(d.reason), out);
        self.detach(conn, will, granted, now, out);
    }

    /// Resends in-flight messages (DUP) and fills the window from the pending queue.
    fn resume_session(&mut self, sid: SessionId, now: Time, out: &mut Outbox) {
        let Some(s) = self.sessions.get_mut(&sid) else {
            return;
        };
        let Some(conn) = s.conn else { return };
        let acl = self.conns.get(&conn).and_then(|c| c.acl.as_deref());
        // The session may have been made by another identity, or under other rules: what
        // this connection may not subscribe to now goes (a queue consumed through
        // `$share/{queue}/…` by its `$queue/{queue}` rule).
        let may_consume = |q: &str| acl.is_none_or(|a| a.may_subscribe(&format!("$queue/{q}")));
        let revoked: Vec<String> = match acl {
            Some(a) => s
                .subscriptions
                .iter()
                .filter(|(_, sub)| {
                    !a.may_subscribe(&sub.filter)
                        || sub.queue.as_deref().is_some_and(|q| !may_consume(q))
                })
                .map(|(raw, _)| raw.clone())
                .collect(),
            None => Vec::new(),
        };
        let mut denied = Vec::new();
        for pid in s.inflight_in_order() {
            let f = &s.inflight[&pid];
            // A lease of a queue it may no longer consume is not sent again: the lease runs
            // out and the message goes back to its queue (acking it here would consume it).
            if f.pending
                .queue
                .as_ref()
                .is_some_and(|l| !may_consume(&l.queue))
            {
                continue;
            }
            // The rules may have changed while it was away: a message it may not read now is
            // dropped as if acknowledged (a PUBREL already owed still goes out).
            if f.state != OutState::AwaitPubComp
                && f.pending.queue.is_none()
                && acl.is_some_and(|a| !a.may_read(&f.pending.message.topic))
            {
                denied.push(pid);
                continue;
            }
            let action = match f.state {
                OutState::AwaitPubComp => Action::Send(Packet::PubRel(ferrymq_mqtt::PubResp::new(
                    pid,
                    ReasonCode::Success,
                ))),
                _ => Action::Deliver(Delivery {
                    message: f.pending.message.clone(),
                    qos: f.pending.qos,
                    packet_id: Some(pid),
                    dup: true,
                    retain: f.pending.retain,
                    subscription_ids: f.pending.subscription_ids.clone(),
                    expiry_remaining: f.pending.message.expiry_remaining(now),
                    attempt: None,
                }),
            };
            out.push(conn, action);
        }
        for pid in denied {
            self.stats.acl_denied_deliveries += 1;
            self.commit(Record::Acked { sid, pid }, out);
        }
        for raw in revoked {
            self.stats.acl_denied_subscriptions += 1;
            self.commit(Record::Unsubscribe { sid, raw }, out);
        }
        self.fill_window(sid, now, out);
    }

    /// Moves queued messages into flight while the client's receive window allows.
    pub(crate) fn fill_window(&mut self, sid: SessionId, now: Time, out: &mut Outbox) {
        self.move_into_flight(sid, now, out);
        self.queue_shrunk(sid, out);
        // What room is left goes to the work queues it consumes.
        self.pump_consumer(sid, now, out);
    }

    fn move_into_flight(&mut self, sid: SessionId, now: Time, out: &mut Outbox) {
        loop {
            let Some(s) = self.sessions.get_mut(&sid) else {
                return;
            };
            if s.conn.is_none() || !s.has_window() {
                return;
            }
            let Some(front) = s.pending.front() else {
                return;
            };
            let message = front.message.id;
            let unreadable = front.queue.is_none()
                && s.conn
                    .and_then(|c| self.conns.get(&c))
                    .and_then(|c| c.acl.as_deref())
                    .is_some_and(|a| !a.may_read(&front.message.topic));
            if unreadable || front.message.is_expired(now) {
                if unreadable {
                    self.stats.acl_denied_deliveries += 1;
                } else {
                    self.stats.dropped_expired += 1;
                    out.note_drop(&front.message, "expired", &s.client_id);
                }
                if self
                    .try_commit(Record::Removed { sid, message }, out)
                    .is_err()
                {
                    return; // a bug (see `commit`): stop rather than loop
                }
                continue;
            }
            let pid = s.free_packet_id();
            if self
                .try_commit(Record::Flight { sid, pid, message }, out)
                .is_err()
            {
                return;
            }
            self.deliver_in_flight(sid, pid, now, out);
        }
    }

    /// Sends a QoS 1/2 message at once to a connected session whose queue is empty and whose
    /// window has room (the caller checked): it skips the queue.
    pub(crate) fn send_now(&mut self, sid: SessionId, p: Pending, now: Time, out: &mut Outbox) {
        let Some(s) = self.sessions.get_mut(&sid) else {
            return;
        };
        let pid = s.free_packet_id();
        self.commit(
            Record::Sent {
                sid,
                pid,
                pending: p,
            },
            out,
        );
        self.deliver_in_flight(sid, pid, now, out);
    }

    /// Hands the message that just went in flight under `pid` to the session's connection.
    fn deliver_in_flight(&mut self, sid: SessionId, pid: PacketId, now: Time, out: &mut Outbox) {
        let Some(s) = self.sessions.get(&sid) else {
            return;
        };
        let (Some(conn), Some(f)) = (s.conn, s.inflight.get(&pid)) else {
            return;
        };
        let p = &f.pending;
        self.stats.messages_sent[p.qos as usize] += 1;
        self.stats.payload_bytes_sent[p.qos as usize] += p.message.payload.len() as u64;
        let d = Delivery {
            message: p.message.clone(),
            qos: p.qos,
            packet_id: Some(pid),
            dup: false,
            retain: p.retain,
            subscription_ids: p.subscription_ids.clone(),
            expiry_remaining: p.message.expiry_remaining(now),
            attempt: None,
        };
        out.push(conn, Action::Deliver(d));
    }

    /// Queue of messages waiting for a session, for tests and admin views.
    pub fn session_pending(&self, client_id: &str) -> Option<(usize, usize)> {
        let s = &self.sessions[self.by_client_id.get(client_id)?];
        Some((s.inflight.len(), s.pending.len()))
    }
}
