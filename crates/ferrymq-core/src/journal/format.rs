//! The journal's byte format: one function that writes a [`Record`], one that reads it back.
//!
//! Record format (a `DataChange:` commit must accompany a change; `Subscribe`'s options byte
//! has bit 7 set when the subscription consumes a work queue):
//! ```text
//! record   = tag u8 | fields
//! u32, u64 = LEB128 varint (at most 5 / 10 bytes); u8 and u16 (packet ids) are fixed
//! string   = length varint | UTF-8 bytes
//! message  = id | received_at | expires_at (0 = never) | publisher (0 = none) | flags u8
//!            (QoS bits 0-1, retain bit 2, properties bit 3)
//!            | without properties: topic string | payload (the rest of the record)
//!            | with properties: an MQTT 5.0 PUBLISH carrying topic, properties and payload
//! pending  = message id | flags u8 (QoS bits 0-1, retain bit 2, shared bit 3)
//!            | id count u8 | subscription ids u32* [| shared filter string | group string]
//! ```
//! A message's body is its own record (`Message`), written once per journal generation
//! before the first record that names it; records then name it by id. See [`Tag`] for each
//! record's fields.

use std::sync::Arc;

use bytes::{Buf, BytesMut};

use ferrymq_mqtt::{
    Limits, Packet, PacketId, ProtocolVersion, PublishView, QoS, SubscriptionOptions, Will,
};

use super::record::Record;
use super::JournalError;
use crate::session::{Pending, SharedOrigin, Subscription};
use crate::{Message, SessionId, Time};

/// Record tags. Fields follow the tag in the order listed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(super) enum Tag {
    /// message
    Message = 1,
    /// message id: the retained message of its topic (an empty payload clears it)
    Retain = 2,
    /// session u64 | client id string | version u8 | expiry u32 | disconnected_at u64 (0 = connected)
    Session = 3,
    /// session u64
    SessionEnd = 4,
    /// session u64 | filter as sent string | options u8 (the 5.0 SUBSCRIBE byte) | identifier u32 (0 = none)
    Subscribe = 5,
    /// session u64 | filter as sent string
    Unsubscribe = 6,
    /// session u64 | pending
    Enqueue = 7,
    /// session u64 | packet id u16: the front of the queue goes in flight (read, not written:
    /// logs from before `FlightOf`)
    Flight = 8,
    /// session u64: the front of the queue expired (read, not written: logs from before
    /// `RemovedOf`)
    PopPending = 9,
    /// session u64 | packet id u16: PUBREC received, PUBREL sent
    PubRec = 10,
    /// session u64 | packet id u16: the in-flight message is finished
    Acked = 11,
    /// session u64: every shared-subscription message not awaiting PUBCOMP left the session
    TakeShared = 12,
    /// session u64 | packet id u16: inbound QoS 2 publish awaiting PUBREL
    Qos2In = 13,
    /// session u64 | packet id u16: PUBREL received
    Qos2Done = 14,
    /// session u64 | due u64 | 0 u64: a will waiting for its delay; its message is the
    /// `Message` record with id 0 just before
    Will = 15,
    /// session u64: the pending will was published or cancelled
    WillDone = 16,
    /// next session u64 | next message id u64
    CheckpointBegin = 17,
    CheckpointEnd = 18,
    /// session u64 | packet id u16 | pending: a message that went straight into flight
    Sent = 19,
    /// session u64 | packet id u16 | message id u64: that queued message goes in flight
    FlightOf = 20,
    /// session u64 | message id u64: that queued message left the queue unsent (expired,
    /// dropped for a full queue, or refused). Named `ExpiredOf` while expiry was its only
    /// use; the bytes and their meaning, "take this message out of the queue", are unchanged.
    RemovedOf = 21,
    /// Work queues (`queue_format.rs` has their fields): a queue's definition,
    QueueDeclare = 22,
    /// its deletion,
    QueueDelete = 23,
    /// a message joining it,
    QEnqueue = 24,
    /// a lease, an ack, a failed attempt and its outcome,
    QLease = 25,
    QAck = 26,
    QFail = 27,
    /// a waiting message dropped, or dead-lettered,
    QDrop = 28,
    QDead = 29,
    /// a dead letter redriven, discarded, or written whole (checkpoints).
    QRedrive = 30,
    QDiscard = 31,
    QDeadLetter = 32,
    /// Many waiting entries of one queue without failures, packed (checkpoints).
    QEntries = 33,
    /// snapshot id u64 (its checkpoint's first offset): inside a checkpoint, where the
    /// queues' entries go; they are in a snapshot file beside the log, written off the
    /// router (`checkpoint.rs`)
    QueueSnapshot = 34,
}

impl Tag {
    fn from_u8(b: u8) -> Option<Tag> {
        use Tag::*;
        Some(match b {
            1 => Message,
            2 => Retain,
            3 => Session,
            4 => SessionEnd,
            5 => Subscribe,
            6 => Unsubscribe,
            7 => Enqueue,
            8 => Flight,
            9 => PopPending,
            10 => PubRec,
            11 => Acked,
            12 => TakeShared,
            13 => Qos2In,
            14 => Qos2Done,
            15 => Will,
            16 => WillDone,
            17 => CheckpointBegin,
            18 => CheckpointEnd,
            19 => Sent,
            20 => FlightOf,
            21 => RemovedOf,
            22 => QueueDeclare,
            23 => QueueDelete,
            24 => QEnqueue,
            25 => QLease,
            26 => QAck,
            27 => QFail,
            28 => QDrop,
            29 => QDead,
            30 => QRedrive,
            31 => QDiscard,
            32 => QDeadLetter,
            33 => QEntries,
            34 => QueueSnapshot,
            _ => return None,
        })
    }
}

/// In a `Flight`/`Removed` record read from an old log: "the front of the queue" (message
/// ids start at 1).
pub(crate) const QUEUE_FRONT: u64 = 0;

/// Writes one record: small fields gather in a stack buffer and go to the journal in one copy.
/// Integers wider than 16 bits are LEB128 varints (ids, times and lengths are mostly small).
pub(crate) struct Rec<'a> {
    out: &'a mut BytesMut,
    small: [u8; 32],
    n: usize,
}

impl<'a> Rec<'a> {
    pub(crate) fn new(out: &'a mut BytesMut) -> Rec<'a> {
        Rec {
            out,
            small: [0; 32],
            n: 0,
        }
    }

    pub(crate) fn flush(&mut self) {
        if self.n > 0 {
            self.out.extend_from_slice(&self.small[..self.n]);
            self.n = 0;
        }
    }

    fn room(&mut self, k: usize) {
        if self.n + k > self.small.len() {
            self.flush();
        }
    }

    pub(crate) fn put_u8(&mut self, v: u8) {
        self.room(1);
        self.small[self.n] = v;
        self.n += 1;
    }

    pub(super) fn put_u16(&mut self, v: u16) {
        self.room(2);
        self.small[self.n..self.n + 2].copy_from_slice(&v.to_be_bytes());
        self.n += 2;
    }

    pub(super) fn put_u32(&mut self, v: u32) {
        self.put_u64(u64::from(v));
    }

    pub(crate) fn put_u64(&mut self, mut v: u64) {
        self.room(10);
        while v >= 0x80 {
            self.small[self.n] = (v as u8) | 0x80;
            self.n += 1;
            v >>= 7;
        }
        self.small[self.n] = v as u8;
        self.n += 1;
    }

    pub(super) fn put_slice(&mut self, s: &[u8]) {
        if s.len() <= 16 {
            self.room(s.len());
            self.small[self.n..self.n + s.len()].copy_from_slice(s);
            self.n += s.len();
        } else {
            self.flush();
            self.out.extend_from_slice(s);
        }
    }

    pub(super) fn put_str(&mut self, s: &str) {
        self.put_u64(s.len() as u64);
        self.put_slice(s.as_bytes());
    }

    /// The journal buffer itself, for encoders that write into a `BytesMut`.
    fn raw(&mut self) -> &mut BytesMut {
        self.flush();
        self.out
    }
}

/// Writes `record` (without the message bodies it names: the caller writes those first).
pub(crate) fn encode(b: &mut Rec<'_>, record: &Record) {
    match record {
        Record::Retain(m) => {
            b.put_u8(Tag::Retain as u8);
            b.put_u64(m.id);
        }
        Record::Session {
            sid,
            client_id,
            version,
            expiry,
            disconnected_at,
        } => {
            b.put_u8(Tag::Session as u8);
            b.put_u64(sid.0);
            b.put_str(client_id);
            b.put_u8(match version {
                ProtocolVersion::V311 => 4,
                ProtocolVersion::V5 => 5,
            });
            b.put_u32(*expiry);
            b.put_u64(disconnected_at.map_or(0, |t| t.0.max(1)));
        }
        Record::SessionEnd(sid) => session_event(b, Tag::SessionEnd, *sid),
        Record::Subscribe { sid, raw, sub } => {
            b.put_u8(Tag::Subscribe as u8);
            b.put_u64(sid.0);
            b.put_str(raw);
            let consumes = if sub.queue.is_some() { SUB_QUEUE } else { 0 };
            b.put_u8(sub.options.to_byte() | consumes);
            b.put_u32(sub.identifier.unwrap_or(0));
        }
        Record::Unsubscribe { sid, raw } => {
            b.put_u8(Tag::Unsubscribe as u8);
            b.put_u64(sid.0);
            b.put_str(raw);
        }
        Record::Enqueue { sid, pending } => {
            b.put_u8(Tag::Enqueue as u8);
            b.put_u64(sid.0);
            encode_pending(b, pending);
        }
        Record::Sent { sid, pid, pending } => {
            b.put_u8(Tag::Sent as u8);
            b.put_u64(sid.0);
            b.put_u16(*pid);
            encode_pending(b, pending);
        }
        Record::Flight { sid, pid, message } => {
            b.put_u8(Tag::FlightOf as u8);
            b.put_u64(sid.0);
            b.put_u16(*pid);
            b.put_u64(*message);
        }
        Record::Removed { sid, message } => {
            b.put_u8(Tag::RemovedOf as u8);
            b.put_u64(sid.0);
            b.put_u64(*message);
        }
        Record::PubRec { sid, pid } => pid_event(b, Tag::PubRec, *sid, *pid),
        Record::Acked { sid, pid } => pid_event(b, Tag::Acked, *sid, *pid),
        Record::Qos2In { sid, pid } => pid_event(b, Tag::Qos2In, *sid, *pid),
        Record::Qos2Done { sid, pid } => pid_event(b, Tag::Qos2Done, *sid, *pid),
        Record::TakeShared(sid) => session_event(b, Tag::TakeShared, *sid),
        Record::WillDone(sid) => session_event(b, Tag::WillDone, *sid),
        Record::Will { sid, due, .. } => {
            b.put_u8(Tag::Will as u8);
            b.put_u64(sid.0);
            b.put_u64(due.0);
            b.put_u64(0);
        }
        queue => super::queue_format::encode(b, queue),
    }
}

fn pid_event(b: &mut Rec<'_>, tag: Tag, sid: SessionId, pid: PacketId) {
    b.put_u8(tag as u8);
    b.put_u64(sid.0);
    b.put_u16(pid);
}

fn session_event(b: &mut Rec<'_>, tag: Tag, sid: SessionId) {
    b.put_u8(tag as u8);
    b.put_u64(sid.0);
}

pub(crate) fn encode_checkpoint_begin(b: &mut Rec<'_>, next_session: u64, next_message: u64) {
    b.put_u8(Tag::CheckpointBegin as u8);
    b.put_u64(next_session);
    b.put_u64(next_message);
}

pub(crate) fn encode_queue_snapshot(b: &mut Rec<'_>, id: u64) {
    b.put_u8(Tag::QueueSnapshot as u8);
    b.put_u64(id);
}

pub(crate) fn encode_checkpoint_end(b: &mut Rec<'_>) {
    b.put_u8(Tag::CheckpointEnd as u8);
}

/// Message flags: QoS in bits 0–1, retain in bit 2, bit 3 set when MQTT 5 properties follow
/// (then the rest is a whole 5.0 PUBLISH, decoded by the codec).
/// In a `Subscribe` record's options byte (bit 7, reserved in MQTT): the subscription
/// consumes a work queue (`$queue/{name}`, or `$share/{name}/…` made while `{name}` was a
/// queue), so replay does not decide it again against whatever queues exist then.
const SUB_QUEUE: u8 = 0x80;

const MSG_RETAIN: u8 = 4;
const MSG_PROPERTIES: u8 = 8;

pub(crate) fn encode_message(b: &mut Rec<'_>, m: &Message) {
    b.put_u8(Tag::Message as u8);
    encode_message_fields(b, m);
}

/// A message's fields, as a `Message` record holds them after its tag (a queue's
/// `QEnqueue` record carries its message the same way).
pub(crate) fn encode_message_fields(b: &mut Rec<'_>, m: &Message) {
    b.put_u64(m.id);
    b.put_u64(m.received_at.0);
    b.put_u64(m.expires_at.map_or(0, |t| t.0.max(1)));
    b.put_u64(m.publisher.map_or(0, |s| s.0));
    let flags = m.qos as u8 | if m.retain { MSG_RETAIN } else { 0 };
    if m.properties.is_empty() {
        b.put_u8(flags);
        b.put_str(&m.topic);
        b.put_slice(&m.payload);
        return;
    }
    b.put_u8(flags | MSG_PROPERTIES);
    let view = PublishView {
        dup: false,
        qos: m.qos,
        retain: m.retain,
        topic: &m.topic,
        packet_id: (m.qos != QoS::AtMostOnce).then_some(1),
        properties: &m.properties,
        payload: &m.payload,
    };
    // Properties came from a decoded packet (or a will, whose delay is stripped first), so
    // they encode; a failure would leave the record without its packet and fail replay loudly.
    let _ = ferrymq_mqtt::encode_publish(&view, ProtocolVersion::V5, b.raw());
}

/// A will travels as a message whose id is 0, without its delay (the `Will` record carries
/// the due time).
pub(crate) fn will_message(sid: SessionId, will: &Will, due: Time) -> Message {
    let mut properties = will.properties.clone();
    if properties.will_delay_interval.is_some() {
        properties.will_delay_interval = None;
    }
    Message {
        topic: will.topic.as_str().into(),
        payload: will.payload.clone(),
        qos: will.qos,
        retain: will.retain,
        properties,
        expires_at: None,
        publisher: Some(sid),
        received_at: due,
        id: 0,
        journaled: Default::default(),
    }
}

/// Pending flags: QoS in bits 0–1, retain bit 2, shared-subscription origin bit 3.
const PENDING_RETAIN: u8 = 4;
const PENDING_SHARED: u8 = 8;

fn encode_pending(b: &mut Rec<'_>, p: &Pending) {
    b.put_u64(p.message.id);
    let mut flags = p.qos as u8;
    if p.retain {
        flags |= PENDING_RETAIN;
    }
    if p.shared.is_some() {
        flags |= PENDING_SHARED;
    }
    b.put_u8(flags);
    // A session has at most one identifier per subscription and at most 1,024 subscriptions
    // by default; more than 255 matching at once is cut (documented in the format).
    let n = p.subscription_ids.len().min(255);
    b.put_u8(n as u8);
    for id in &p.subscription_ids[..n] {
        b.put_u32(*id);
    }
    if let Some(o) = &p.shared {
        b.put_str(&o.filter);
        b.put_str(&o.group);
    }
}

/// What one stored record means to replay.
pub(crate) enum Decoded {
    /// A change to apply.
    Change(Record),
    /// A message body, for the records after it to name.
    Message(Message),
    CheckpointBegin {
        next_session: u64,
        next_message: u64,
    },
    CheckpointEnd,
    /// The queues' entries of this checkpoint are snapshot `id`.
    QueueSnapshot {
        id: u64,
    },
    /// A record naming a message whose body is not in the log (counted, harmless).
    UnknownMessage,
}

/// Reads message bodies named by records.
pub(crate) trait Messages {
    fn message(&self, id: u64) -> Option<Arc<Message>>;
    /// The will body read just before a `Will` record.
    fn take_will(&mut self) -> Option<Message>;
}

/// Reads one record.
pub(crate) fn decode(
    record: &[u8],
    index: u64,
    messages: &mut impl Messages,
) -> Result<Decoded, JournalError> {
    let mut f = Fields { buf: record, index };
    let tag = f.u8()?;
    let Some(tag) = Tag::from_u8(tag) else {
        return Err(JournalError::UnknownTag { index, tag });
    };
    let change = match tag {
        Tag::Message => return Ok(Decoded::Message(decode_message(&mut f)?)),
        Tag::CheckpointBegin => {
            return Ok(Decoded::CheckpointBegin {
                next_session: f.u64()?,
                next_message: f.u64()?,
            })
        }
        Tag::CheckpointEnd => return Ok(Decoded::CheckpointEnd),
        Tag::QueueSnapshot => return Ok(Decoded::QueueSnapshot { id: f.u64()? }),
        Tag::Retain => match messages.message(f.u64()?) {
            Some(m) => Record::Retain(m),
            None => return Ok(Decoded::UnknownMessage),
        },
        Tag::Session => {
            let sid = f.sid()?;
            let client_id: Arc<str> = f.str()?.into();
            let version = match f.u8()? {
                4 => ProtocolVersion::V311,
                5 => ProtocolVersion::V5,
                _ => return Err(f.invalid("protocol version")),
            };
            Record::Session {
                sid,
                client_id,
                version,
                expiry: f.u32()?,
                disconnected_at: Some(f.u64()?).filter(|t| *t != 0).map(Time),
            }
        }
        Tag::SessionEnd => Record::SessionEnd(f.sid()?),
        Tag::Subscribe => {
            let sid = f.sid()?;
            let raw = f.str()?.to_string();
            let byte = f.u8()?;
            let options = SubscriptionOptions::from_byte(byte & !SUB_QUEUE)
                .ok_or_else(|| f.invalid("options"))?;
            let identifier = Some(f.u32()?).filter(|i| *i != 0);
            let (group, filter) = match ferrymq_mqtt::topic::parse_shared(&raw) {
                Ok(Some(sh)) => (Some(sh.group.to_string()), sh.filter.to_string()),
                Ok(None) => (None, raw.clone()),
                Err(_) => return Err(f.invalid("shared subscription filter")),
            };
            let queue = (byte & SUB_QUEUE != 0)
                .then(|| {
                    raw.strip_prefix("$queue/")
                        .or(group.as_deref())
                        .map(Arc::from)
                })
                .flatten();
            let sub = Subscription {
                filter,
                group,
                options,
                identifier,
                queue,
            };
            Record::Subscribe { sid, raw, sub }
        }
        Tag::Unsubscribe => Record::Unsubscribe {
            sid: f.sid()?,
            raw: f.str()?.to_string(),
        },
        Tag::Enqueue => {
            let sid = f.sid()?;
            match decode_pending(&mut f, messages)? {
                Some(pending) => Record::Enqueue { sid, pending },
                None => return Ok(Decoded::UnknownMessage),
            }
        }
        Tag::Sent => {
            let sid = f.sid()?;
            let pid = f.u16()?;
            match decode_pending(&mut f, messages)? {
                Some(pending) => Record::Sent { sid, pid, pending },
                None => return Ok(Decoded::UnknownMessage),
            }
        }
        Tag::Flight => Record::Flight {
            sid: f.sid()?,
            pid: f.u16()?,
            message: QUEUE_FRONT,
        },
        Tag::FlightOf => Record::Flight {
            sid: f.sid()?,
            pid: f.u16()?,
            message: f.u64()?,
        },
        Tag::PopPending => Record::Removed {
            sid: f.sid()?,
            message: QUEUE_FRONT,
        },
        Tag::RemovedOf => Record::Removed {
            sid: f.sid()?,
            message: f.u64()?,
        },
        Tag::PubRec => Record::PubRec {
            sid: f.sid()?,
            pid: f.u16()?,
        },
        Tag::Acked => Record::Acked {
            sid: f.sid()?,
            pid: f.u16()?,
        },
        Tag::Qos2In => Record::Qos2In {
            sid: f.sid()?,
            pid: f.u16()?,
        },
        Tag::Qos2Done => Record::Qos2Done {
            sid: f.sid()?,
            pid: f.u16()?,
        },
        Tag::QueueDeclare
        | Tag::QueueDelete
        | Tag::QEnqueue
        | Tag::QLease
        | Tag::QAck
        | Tag::QFail
        | Tag::QDrop
        | Tag::QDead
        | Tag::QRedrive
        | Tag::QDiscard
        | Tag::QDeadLetter
        | Tag::QEntries => match super::queue_format::decode(tag, &mut f)? {
            Some(r) => r,
            None => return Ok(Decoded::UnknownMessage),
        },
        Tag::TakeShared => Record::TakeShared(f.sid()?),
        Tag::WillDone => Record::WillDone(f.sid()?),
        Tag::Will => {
            let sid = f.sid()?;
            let due = Time(f.u64()?);
            let _ = f.u64()?;
            let Some(m) = messages.take_will() else {
                return Ok(Decoded::UnknownMessage);
            };
            let will = Will {
                topic: m.topic.to_string(),
                payload: m.payload,
                qos: m.qos,
                retain: m.retain,
                properties: m.properties,
            };
            Record::Will {
                sid,
                will: Box::new(will),
                due,
            }
        }
    };
    Ok(Decoded::Change(change))
}

fn decode_pending(
    f: &mut Fields<'_>,
    messages: &impl Messages,
) -> Result<Option<Pending>, JournalError> {
    let id = f.u64()?;
    let flags = f.u8()?;
    let qos = QoS::from_u8(flags & 3).ok_or_else(|| f.invalid("qos"))?;
    let n = f.u8()?;
    let mut subscription_ids = Vec::with_capacity(usize::from(n));
    for _ in 0..n {
        subscription_ids.push(f.u32()?);
    }
    let shared = if flags & PENDING_SHARED != 0 {
        Some(SharedOrigin {
            filter: f.str()?.into(),
            group: f.str()?.into(),
        })
    } else {
        None
    };
    Ok(messages.message(id).map(|message| Pending {
        message,
        qos,
        retain: flags & PENDING_RETAIN != 0,
        subscription_ids,
        shared,
        queue: None,
    }))
}

pub(super) fn decode_message_fields(f: &mut Fields<'_>) -> Result<Message, JournalError> {
    decode_message(f)
}

fn decode_message(f: &mut Fields<'_>) -> Result<Message, JournalError> {
    let id = f.u64()?;
    let received_at = Time(f.u64()?);
    let expires_at = Some(f.u64()?).filter(|t| *t != 0).map(Time);
    let publisher = Some(f.u64()?).filter(|s| *s != 0).map(SessionId);
    let flags = f.u8()?;
    if flags & MSG_PROPERTIES == 0 {
        let qos = QoS::from_u8(flags & 3).ok_or_else(|| f.invalid("qos"))?;
        let topic: Arc<str> = f.str()?.into();
        let payload = bytes::Bytes::copy_from_slice(f.buf);
        f.buf = &[];
        let mut m = Message::new(&topic, payload, received_at);
        m.topic = topic;
        m.qos = qos;
        m.retain = flags & MSG_RETAIN != 0;
        m.expires_at = expires_at;
        m.publisher = publisher;
        m.id = id;
        return Ok(m);
    }
    let mut packet = BytesMut::from(f.buf);
    f.buf = &[];
    let limits = Limits {
        max_packet_size: usize::MAX,
    };
    let p = match ferrymq_mqtt::decode(&mut packet, ProtocolVersion::V5, &limits) {
        Ok(Some(Packet::Publish(p))) => p,
        Ok(_) => return Err(f.invalid("message without a whole PUBLISH")),
        Err(e) => return Err(f.invalid(&format!("message: {e}"))),
    };
    let topic: Arc<str> = p.topic.as_str().into();
    let mut m = Message::from_publish(p, topic, publisher, received_at);
    m.expires_at = expires_at;
    m.id = id;
    Ok(m)
}

/// Reads fields of one record.
pub(super) struct Fields<'a> {
    buf: &'a [u8],
    index: u64,
}

impl<'a> Fields<'a> {
    pub(super) fn new(buf: &'a [u8]) -> Fields<'a> {
        Fields { buf, index: 0 }
    }

    fn need(&self, n: usize) -> Result<(), JournalError> {
        if self.buf.len() < n {
            return Err(JournalError::Truncated { index: self.index });
        }
        Ok(())
    }
    pub(super) fn u8(&mut self) -> Result<u8, JournalError> {
        self.need(1)?;
        Ok(self.buf.get_u8())
    }
    pub(super) fn u16(&mut self) -> Result<u16, JournalError> {
        self.need(2)?;
        Ok(self.buf.get_u16())
    }
    pub(super) fn u32(&mut self) -> Result<u32, JournalError> {
        u32::try_from(self.u64()?).map_err(|_| self.invalid("value above 32 bits"))
    }
    /// A LEB128 varint of at most 10 bytes.
    pub(super) fn u64(&mut self) -> Result<u64, JournalError> {
        let mut v: u64 = 0;
        for i in 0..10 {
            let b = u64::from(self.u8()?);
            v |= (b & 0x7F) << (7 * i);
            if b < 0x80 {
                return Ok(v);
            }
        }
        Err(self.invalid("varint longer than 10 bytes"))
    }
    pub(super) fn str(&mut self) -> Result<&'a str, JournalError> {
        let n = usize::try_from(self.u64()?).map_err(|_| self.invalid("length"))?;
        self.need(n)?;
        let (s, rest) = self.buf.split_at(n);
        self.buf = rest;
        std::str::from_utf8(s).map_err(|_| self.invalid("string is not UTF-8"))
    }
    pub(super) fn sid(&mut self) -> Result<SessionId, JournalError> {
        Ok(SessionId(self.u64()?))
    }
    pub(super) fn remaining(&self) -> usize {
        self.buf.len()
    }

    pub(super) fn invalid(&self, what: &str) -> JournalError {
        JournalError::Invalid {
            index: self.index,
            what: what.to_string(),
        }
    }
}
