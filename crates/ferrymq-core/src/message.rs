//! An application message as the engine routes it: decoded once, shared by every subscriber.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;

use bytes::Bytes;
use ferrymq_mqtt::{Properties, Publish, QoS};

use crate::{SessionId, Time};

/// One published message. Shared (`Arc`) between every session that receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub topic: Arc<str>,
    pub payload: Bytes,
    pub qos: QoS,
    pub retain: bool,
    /// Publish properties as received, without Topic Alias and Subscription Identifiers,
    /// which belong to one hop.
    pub properties: Properties,
    /// When the message expires (from its Message Expiry Interval).
    pub expires_at: Option<Time>,
    /// The session that published it, for No Local.
    pub publisher: Option<SessionId>,
    pub received_at: Time,
    /// Engine-assigned number, unique across restarts; 0 until [`crate::Broker::publish`].
    pub id: u64,
    /// Which journal generation holds this message's record (see `journal.rs`).
    pub(crate) journaled: JournalMark,
}

/// The journal generation whose log holds a message's record; 0 = none. Atomic because the
/// message is shared (`Arc`) with connection writers, though only the engine touches it.
#[derive(Default)]
pub(crate) struct JournalMark(AtomicU64);

impl JournalMark {
    pub(crate) fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
    pub(crate) fn set(&self, generation: u64) {
        self.0.store(generation, Relaxed)
    }
}

impl Clone for JournalMark {
    fn clone(&self) -> Self {
        JournalMark(AtomicU64::new(self.get()))
    }
}

// Bookkeeping, not part of the message's value.
impl PartialEq for JournalMark {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}
impl Eq for JournalMark {}

impl std::fmt::Debug for JournalMark {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.get())
    }
}

impl Message {
    /// A QoS 0, non-retained message without properties.
    pub fn new(topic: &str, payload: Bytes, now: Time) -> Message {
        Message {
            topic: topic.into(),
            payload,
            qos: QoS::AtMostOnce,
            retain: false,
            properties: Properties::default(),
            expires_at: None,
            publisher: None,
            received_at: now,
            id: 0,
            journaled: JournalMark::default(),
        }
    }

    /// Builds a message from a client's PUBLISH whose topic alias is already resolved.
    pub fn from_publish(
        p: Publish,
        topic: Arc<str>,
        publisher: Option<SessionId>,
        now: Time,
    ) -> Message {
        let mut properties = p.properties;
        if !properties.is_empty() {
            properties.topic_alias = None;
            properties.subscription_identifiers.clear();
        }
        let expires_at = properties.message_expiry_interval.map(|s| now.plus_secs(s));
        Message {
            topic,
            payload: p.payload,
            qos: p.qos,
            retain: p.retain,
            properties,
            expires_at,
            publisher,
            received_at: now,
            id: 0,
            journaled: JournalMark::default(),
        }
    }

    pub fn is_expired(&self, now: Time) -> bool {
        self.expires_at.is_some_and(|t| t <= now)
    }

    /// Seconds left before expiry, rounded up, as forwarded (MQTT-3.3.2-6).
    pub fn expiry_remaining(&self, now: Time) -> Option<u32> {
        self.expires_at.map(|t| {
            let ms = t.0.saturating_sub(now.0);
            u32::try_from(ms.div_ceil(1000)).unwrap_or(u32::MAX)
        })
    }

    /// Upper bound of the encoded PUBLISH size for a 5.0 receiver with `sub_ids` identifiers,
    /// used to honour a client's Maximum Packet Size before assigning a packet id.
    pub fn wire_size(&self, sub_ids: usize) -> usize {
        let props = self.properties.encoded_len() + sub_ids * 5;
        1 + 4 + 2 + self.topic.len() + 2 + props + self.payload.len()
    }
}
