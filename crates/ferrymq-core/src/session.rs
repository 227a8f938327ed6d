//! Session state: subscriptions, outbound QoS 1/2 state, inbound QoS 2 ids, pending will.
//!
//! Everything here outlives a connection and is what the durability layer persists.

use std::collections::{HashMap as SipHashMap, VecDeque};

use rustc_hash::{FxHashMap as HashMap, FxHashSet as HashSet};
use std::sync::Arc;

use ferrymq_mqtt::{PacketId, ProtocolVersion, QoS, SubscriptionOptions, Will};

use crate::{ConnId, Message, SessionId, Time};

/// One subscription of a session, keyed by the filter exactly as the client sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    /// The filter without any `$share/{group}/` prefix.
    pub filter: String,
    /// The shared-subscription group, if any.
    pub group: Option<String>,
    pub options: SubscriptionOptions,
    pub identifier: Option<u32>,
    /// The work queue this subscription consumes (`$queue/{name}`, or `$share/{name}/…`
    /// naming a queue); such a subscription is not in the topic trie. Set when applied.
    pub queue: Option<Arc<str>>,
}

/// The shared group a delivery came through, so it can be handed to another member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SharedOrigin {
    pub filter: Arc<str>,
    pub group: Arc<str>,
}

/// A message accepted for a session, not yet sent.
#[derive(Debug, Clone)]
pub struct Pending {
    pub message: Arc<Message>,
    pub qos: QoS,
    pub retain: bool,
    pub subscription_ids: Vec<u32>,
    pub shared: Option<SharedOrigin>,
    /// A work-queue delivery's lease (never queued, never journaled with the session).
    pub queue: Option<Box<crate::queues::QueueLease>>,
}

/// Where an outbound QoS 1/2 message is in its flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutState {
    /// QoS 1 sent, waiting for PUBACK.
    AwaitPubAck,
    /// QoS 2 sent, waiting for PUBREC.
    AwaitPubRec,
    /// PUBREL sent, waiting for PUBCOMP.
    AwaitPubComp,
}

#[derive(Debug, Clone)]
pub struct InFlight {
    pub pending: Pending,
    pub state: OutState,
    /// Send order, so redelivery after a reconnect keeps it (MQTT-4.6.0-1).
    pub seq: u64,
}

/// Session state that survives disconnection.
#[derive(Debug)]
pub struct Session {
    pub id: SessionId,
    pub client_id: Arc<str>,
    pub version: ProtocolVersion,
    pub conn: Option<ConnId>,
    /// Seconds the session lives after disconnection; `u32::MAX` = forever.
    pub expiry_interval: u32,
    pub disconnected_at: Option<Time>,
    pub subscriptions: SipHashMap<String, Subscription>,
    pub inflight: HashMap<PacketId, InFlight>,
    pub pending: VecDeque<Pending>,
    /// Inbound QoS 2 packet ids received and not yet released (exactly once).
    pub inbound_qos2: HashSet<PacketId>,
    /// How many outbound QoS 1/2 messages may be in flight now.
    pub window: usize,
    /// A will waiting for its delay, with the time it is due. Boxed: rare, and inline it
    /// would add ~80 bytes to every session.
    pub pending_will: Option<Box<(Will, Time)>>,
    /// Whether the journal holds this session (it is durable and journaling is on).
    pub journaled: bool,
    /// The work queues it consumes.
    pub consumes: Vec<Arc<str>>,
    next_pid: PacketId,
    next_seq: u64,
}

impl Session {
    pub fn new(id: SessionId, client_id: Arc<str>, version: ProtocolVersion) -> Session {
        Session {
            id,
            client_id,
            version,
            conn: None,
            expiry_interval: 0,
            disconnected_at: None,
            subscriptions: SipHashMap::new(),
            inflight: HashMap::default(),
            pending: VecDeque::new(),
            inbound_qos2: HashSet::default(),
            window: 1,
            pending_will: None,
            journaled: false,
            consumes: Vec::new(),
            next_pid: 1,
            next_seq: 0,
        }
    }

    pub fn is_connected(&self) -> bool {
        self.conn.is_some()
    }

    pub fn has_window(&self) -> bool {
        self.inflight.len() < self.window
    }

    /// Puts `pending` in flight under `pid`, which the caller knows is free (a fresh id from
    /// [`Session::free_packet_id`], or the one a journal record names).
    pub(crate) fn put_in_flight(&mut self, pid: PacketId, pending: Pending) {
        let state = match pending.qos {
            QoS::ExactlyOnce => OutState::AwaitPubRec,
            _ => OutState::AwaitPubAck,
        };
        self.next_seq += 1;
        let seq = self.next_seq;
        self.inflight.insert(
            pid,
            InFlight {
                pending,
                state,
                seq,
            },
        );
    }

    /// Takes the queued message with this id out of the queue: normally the front, which is
    /// checked first. [`QUEUE_FRONT`](crate::journal::QUEUE_FRONT) takes the front whatever it
    /// is (records from logs written before records named their message).
    pub(crate) fn take_queued(&mut self, message: u64) -> Option<Pending> {
        let front = self.pending.front()?;
        if message == crate::journal::QUEUE_FRONT || front.message.id == message {
            return self.pending.pop_front();
        }
        let at = self.pending.iter().position(|p| p.message.id == message)?;
        self.pending.remove(at)
    }

    /// The shared-subscription messages [`Session::take_shared`] would remove, in order.
    pub(crate) fn shared_movable(&self) -> Vec<Pending> {
        let mut moved: Vec<Pending> = Vec::new();
        for pid in self.inflight_in_order() {
            let f = &self.inflight[&pid];
            if movable_in_flight(f) {
                moved.push(f.pending.clone());
            }
        }
        moved.extend(self.pending.iter().filter(|p| p.shared.is_some()).cloned());
        moved
    }

    /// Removes every shared-subscription message that may go to another group member:
    /// queued ones, and QoS 1 ones in flight. A QoS 2 message once sent stays: its delivery
    /// must be completed to this member when it reconnects (MQTT-4.8.2-4), or the receiver,
    /// which may already hold it, would get it twice.
    pub(crate) fn take_shared(&mut self) {
        self.inflight.retain(|_, f| !movable_in_flight(f));
        self.pending.retain(|p| p.shared.is_none());
    }

    /// A packet id no in-flight message uses.
    pub(crate) fn free_packet_id(&mut self) -> PacketId {
        // The window is capped below 65,535, so a free id always exists.
        loop {
            let pid = self.next_pid;
            self.next_pid = if pid == u16::MAX { 1 } else { pid + 1 };
            if !self.inflight.contains_key(&pid) {
                return pid;
            }
        }
    }

    /// In-flight packet ids in the order they were first sent.
    pub fn inflight_in_order(&self) -> Vec<PacketId> {
        let mut ids: Vec<(u64, PacketId)> =
            self.inflight.iter().map(|(pid, f)| (f.seq, *pid)).collect();
        ids.sort_unstable();
        ids.into_iter().map(|(_, pid)| pid).collect()
    }
}

/// A shared-subscription message in flight that another group member may take over: QoS 1
/// only (sent at least once already; the new member's copy is the redelivery MQTT allows).
fn movable_in_flight(f: &InFlight) -> bool {
    f.pending.shared.is_some() && f.pending.qos == QoS::AtLeastOnce
}
