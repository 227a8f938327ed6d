//! The journal: every change to durable state as a record, and rebuilding state from them.
//!
//! The engine stays free of I/O: with journaling on ([`Broker::enable_journal`]) each call
//! appends encoded records to [`Outbox::journal`]; the driver writes them to its log and must
//! not let any action of the same call reach the network before they are durable (that is
//! what makes a PUBACK mean "stored"). On start the driver feeds the log back through
//! [`Broker::restore`].
//!
//! What is journaled: retained messages, and for every *durable* session (session expiry > 0)
//! its existence and expiry, subscriptions, queued and in-flight QoS 1/2 messages with their
//! packet ids and states, inbound QoS 2 packet ids awaiting PUBREL, and a will waiting for its
//! delay. Sessions with expiry 0 end with their connection (and so with the process), so
//! nothing of theirs is written.
//!
//! Replay mirrors the engine's own mutations step by step: `Flight` pops the front of a
//! session's queue, exactly as `fill_window` did. So every change to a journaled session's
//! queue must emit its record.
//!
//! A checkpoint ([`Broker::checkpoint`]) writes the whole live state between `CheckpointBegin`
//! and `CheckpointEnd`; replay starts afresh at `CheckpointBegin`, so the log before it can be
//! reclaimed once the checkpoint is durable. The driver appends a checkpoint as one batch, so
//! it is on disk whole or not at all.
//!
//! Record format (all integers big-endian; a `DataChange:` commit must accompany a change):
//! ```text
//! record   = tag u8 | fields
//! u32, u64 = LEB128 varint (at most 5 / 10 bytes); u8 and u16 (packet ids) are fixed
//! string   = length varint | UTF-8 bytes
//! message  = id | received_at | expires_at (0 = never) | publisher (0 = none) | flags u8
//!            (QoS bits 0-1, retain bit 2, properties bit 3)
//!            | without properties: topic string | payload (the rest of the record)
//!            | with properties: an MQTT 5.0 PUBLISH carrying topic, properties and payload
//! ```
//! See [`Tag`] for each record's fields.

use std::sync::Arc;

use bytes::{Buf, BufMut, BytesMut};
use rustc_hash::FxHashMap as HashMap;

use ferrymq_mqtt::{
    Limits, Packet, PacketId, ProtocolVersion, PublishView, QoS, RetainHandling,
    SubscriptionOptions, Will,
};

use crate::broker::{Outbox, Timer};
use crate::session::{OutState, Pending, Session, SharedOrigin, Subscription};
use crate::{Broker, Message, SessionId, SubEntry, Time, SESSION_NEVER_EXPIRES};

/// Record tags. Fields follow the tag in the order listed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum Tag {
    /// message
    Message = 1,
    /// message id: the retained message of its topic (an empty payload clears it)
    Retain = 2,
    /// session u64 | client id string | version u8 | expiry u32 | disconnected_at u64 (0 = connected)
    Session = 3,
    /// session u64
    SessionEnd = 4,
    /// session u64 | filter as sent string | options u8 | identifier u32 (0 = none)
    Subscribe = 5,
    /// session u64 | filter as sent string
    Unsubscribe = 6,
    /// session u64 | message id u64 | qos u8 | retain u8 | id count u8 | ids u32*
    /// | shared u8 (0/1) [| filter string | group string]
    Enqueue = 7,
    /// session u64 | packet id u16: the front of the queue goes in flight under that id
    Flight = 8,
    /// session u64: the front of the queue was dropped (expired)
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
    /// session u64 | due u64 | message id u64: a will waiting for its delay
    Will = 15,
    /// session u64: the pending will was published or cancelled
    WillDone = 16,
    /// next session u64 | next message id u64
    CheckpointBegin = 17,
    CheckpointEnd = 18,
    /// session u64 | packet id u16 | the fields of `Enqueue` after the session: a message
    /// that went straight into flight (its session's queue was empty), `Enqueue` + `Flight`
    /// in one record.
    Sent = 19,
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
            _ => return None,
        })
    }
}

/// A journal record that cannot be replayed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JournalError {
    #[error("record {index}: truncated")]
    Truncated { index: u64 },
    #[error("record {index}: unknown tag {tag}")]
    UnknownTag { index: u64, tag: u8 },
    #[error("record {index}: invalid: {what}")]
    Invalid { index: u64, what: String },
}

/// What [`Broker::restore`] rebuilt.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RestoreReport {
    pub records: u64,
    pub sessions: usize,
    pub subscriptions: usize,
    pub retained: usize,
    /// QoS 1/2 messages queued or in flight across sessions.
    pub queued: usize,
    pub inbound_qos2: usize,
    pub pending_wills: usize,
    /// Records that named a session or message no longer there (harmless; counted).
    pub skipped: u64,
    /// The log ended inside a checkpoint (a crash while writing it); it was ignored.
    pub incomplete_checkpoint: bool,
}

/// Journal records of one or more engine calls, each framed as `length u32 | record`: the
/// framing the log's batch body uses, so the driver hands the bytes over without re-framing
/// or a per-record allocation.
#[derive(Debug, Default)]
pub struct JournalBuf {
    framed: BytesMut,
    count: u64,
}

impl JournalBuf {
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Records held.
    pub fn len(&self) -> u64 {
        self.count
    }

    /// Framed bytes held.
    pub fn bytes(&self) -> usize {
        self.framed.len()
    }

    /// Takes every record: the framed bytes and how many records they hold.
    pub fn take(&mut self) -> (bytes::Bytes, u64) {
        let count = std::mem::take(&mut self.count);
        (self.framed.split().freeze(), count)
    }

    /// The records, in order.
    pub fn records(&self) -> impl Iterator<Item = &[u8]> {
        let mut rest = &self.framed[..];
        std::iter::from_fn(move || {
            if rest.len() < 4 {
                return None;
            }
            let n = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
            let (record, tail) = rest[4..].split_at(n.min(rest.len() - 4));
            rest = tail;
            Some(record)
        })
    }

    pub fn clear(&mut self) {
        self.framed.clear();
        self.count = 0;
    }

    fn push(&mut self, write: impl FnOnce(&mut Rec<'_>)) {
        if self.framed.capacity() - self.framed.len() < 512 {
            self.framed.reserve(64 * 1024);
        }
        let at = self.framed.len();
        self.framed.put_u32(0);
        let mut rec = Rec {
            out: &mut self.framed,
            small: [0; 32],
            n: 0,
        };
        write(&mut rec);
        rec.flush();
        let len = (self.framed.len() - at - 4) as u32;
        self.framed[at..at + 4].copy_from_slice(&len.to_be_bytes());
        self.count += 1;
    }
}

/// Writes one record: small fields gather in a stack buffer and go to the journal in one copy.
/// Integers wider than 16 bits are LEB128 varints (ids, times and lengths are mostly small).
pub(crate) struct Rec<'a> {
    out: &'a mut BytesMut,
    small: [u8; 32],
    n: usize,
}

impl Rec<'_> {
    fn flush(&mut self) {
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

    fn put_u8(&mut self, v: u8) {
        self.room(1);
        self.small[self.n] = v;
        self.n += 1;
    }

    fn put_u16(&mut self, v: u16) {
        self.room(2);
        self.small[self.n..self.n + 2].copy_from_slice(&v.to_be_bytes());
        self.n += 2;
    }

    fn put_u32(&mut self, v: u32) {
        self.put_u64(u64::from(v));
    }

    fn put_u64(&mut self, mut v: u64) {
        self.room(10);
        while v >= 0x80 {
            self.small[self.n] = (v as u8) | 0x80;
            self.n += 1;
            v >>= 7;
        }
        self.small[self.n] = v as u8;
        self.n += 1;
    }

    fn put_slice(&mut self, s: &[u8]) {
        if s.len() <= 16 {
            self.room(s.len());
            self.small[self.n..self.n + s.len()].copy_from_slice(s);
            self.n += s.len();
        } else {
            self.flush();
            self.out.extend_from_slice(s);
        }
    }

    /// The journal buffer itself, for encoders that write into a `BytesMut`.
    fn raw(&mut self) -> &mut BytesMut {
        self.flush();
        self.out
    }
}

/// Journal state kept by the engine while journaling is on.
#[derive(Debug)]
pub(crate) struct Journal {
    /// Current generation: a message is in the log since the last checkpoint iff its mark
    /// equals this.
    generation: u64,
}

impl Journal {
    fn new() -> Journal {
        Journal { generation: 1 }
    }

    fn record(&mut self, out: &mut Outbox, write: impl FnOnce(&mut Rec<'_>)) {
        out.journal.push(write);
    }

    /// A per-session event keyed by packet id (`Flight`, `PubRec`, `Acked`, `Qos2In`,
    /// `Qos2Done`).
    pub(crate) fn pid_event(&mut self, out: &mut Outbox, tag: Tag, sid: SessionId, pid: PacketId) {
        self.record(out, |b| {
            b.put_u8(tag as u8);
            b.put_u64(sid.0);
            b.put_u16(pid);
        });
    }

    /// A per-session event without arguments (`PopPending`, `TakeShared`, `WillDone`).
    pub(crate) fn session_event(&mut self, out: &mut Outbox, tag: Tag, sid: SessionId) {
        self.record(out, |b| {
            b.put_u8(tag as u8);
            b.put_u64(sid.0);
        });
    }

    /// A message was appended to a session's queue.
    pub(crate) fn enqueue(&mut self, out: &mut Outbox, sid: SessionId, p: &Pending) {
        self.message(out, &p.message);
        self.record(out, |b| encode_enqueue(b, sid, p));
    }

    /// A message that skipped the (empty) queue and went straight into flight under `pid`.
    pub(crate) fn sent(&mut self, out: &mut Outbox, sid: SessionId, pid: PacketId, p: &Pending) {
        self.message(out, &p.message);
        self.record(out, |b| {
            b.put_u8(Tag::Sent as u8);
            b.put_u64(sid.0);
            b.put_u16(pid);
            encode_pending(b, p);
        });
    }

    /// Writes the message's record unless this generation already holds it.
    fn message(&mut self, out: &mut Outbox, m: &Message) {
        if m.journaled.get() == self.generation {
            return;
        }
        m.journaled.set(self.generation);
        self.record(out, |b| encode_message(b, m));
    }
}

fn put_str(b: &mut Rec<'_>, s: &str) {
    b.put_u64(s.len() as u64);
    b.put_slice(s.as_bytes());
}

/// Message flags: QoS in bits 0–1, retain in bit 2, bit 3 set when MQTT 5 properties follow
/// (then the rest is a whole 5.0 PUBLISH, decoded by the codec).
const MSG_RETAIN: u8 = 4;
const MSG_PROPERTIES: u8 = 8;

fn encode_message(b: &mut Rec<'_>, m: &Message) {
    b.put_u8(Tag::Message as u8);
    b.put_u64(m.id);
    b.put_u64(m.received_at.0);
    b.put_u64(m.expires_at.map_or(0, |t| t.0.max(1)));
    b.put_u64(m.publisher.map_or(0, |s| s.0));
    let flags = m.qos as u8 | if m.retain { MSG_RETAIN } else { 0 };
    if m.properties.is_empty() {
        b.put_u8(flags);
        put_str(b, &m.topic);
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

fn options_byte(o: &SubscriptionOptions) -> u8 {
    let rh = match o.retain_handling {
        RetainHandling::SendAtSubscribe => 0,
        RetainHandling::SendIfNew => 1,
        RetainHandling::DoNotSend => 2,
    };
    (o.qos as u8) | u8::from(o.no_local) << 2 | u8::from(o.retain_as_published) << 3 | rh << 4
}

fn options_from(b: u8) -> Option<SubscriptionOptions> {
    Some(SubscriptionOptions {
        qos: qos_from(b & 3)?,
        no_local: b & 4 != 0,
        retain_as_published: b & 8 != 0,
        retain_handling: match (b >> 4) & 3 {
            0 => RetainHandling::SendAtSubscribe,
            1 => RetainHandling::SendIfNew,
            2 => RetainHandling::DoNotSend,
            _ => return None,
        },
    })
}

fn qos_from(b: u8) -> Option<QoS> {
    match b {
        0 => Some(QoS::AtMostOnce),
        1 => Some(QoS::AtLeastOnce),
        2 => Some(QoS::ExactlyOnce),
        _ => None,
    }
}

/// Journal emission, called at the engine's mutation points. Each is a no-op when journaling
/// is off or the session is not journaled.
impl Broker {
    /// Turns journaling on. Call before the first connection (after [`Broker::restore`]).
    pub fn enable_journal(&mut self) {
        if self.journal.is_none() {
            self.journal = Some(Journal::new());
        }
    }

    pub fn journal_enabled(&self) -> bool {
        self.journal.is_some()
    }

    fn journaled(&self, sid: SessionId) -> bool {
        self.journal.is_some() && self.sessions.get(&sid).is_some_and(|s| s.journaled)
    }

    /// After CONNECT: the session becomes journaled when it becomes durable (writing all of
    /// it), leaves the journal when it stops being durable, or has its new state recorded.
    pub(crate) fn journal_connect(&mut self, sid: SessionId, out: &mut Outbox) {
        let Some(j) = self.journal.as_mut() else {
            return;
        };
        let Some(s) = self.sessions.get_mut(&sid) else {
            return;
        };
        let durable = s.expiry_interval > 0;
        match (s.journaled, durable) {
            (false, true) => {
                s.journaled = true;
                dump_session(j, s, out);
            }
            (true, false) => {
                s.journaled = false;
                j.record(out, |b| {
                    b.put_u8(Tag::SessionEnd as u8);
                    b.put_u64(sid.0);
                });
            }
            (true, true) => j.record(out, |b| encode_session(b, s)),
            (false, false) => {}
        }
    }

    /// After a detach: the session's expiry and disconnect time.
    pub(crate) fn journal_session(&mut self, sid: SessionId, out: &mut Outbox) {
        let (Some(j), Some(s)) = (self.journal.as_mut(), self.sessions.get(&sid)) else {
            return;
        };
        if s.journaled {
            j.record(out, |b| encode_session(b, s));
        }
    }

    pub(crate) fn journal_session_end(&mut self, s: &Session, out: &mut Outbox) {
        if let (Some(j), true) = (self.journal.as_mut(), s.journaled) {
            j.record(out, |b| {
                b.put_u8(Tag::SessionEnd as u8);
                b.put_u64(s.id.0);
            });
        }
    }

    pub(crate) fn journal_subscribe(&mut self, sid: SessionId, raw: &str, out: &mut Outbox) {
        if !self.journaled(sid) {
            return;
        }
        let (Some(j), Some(s)) = (self.journal.as_mut(), self.sessions.get(&sid)) else {
            return;
        };
        if let Some(sub) = s.subscriptions.get(raw) {
            j.record(out, |b| encode_subscribe(b, sid, raw, sub));
        }
    }

    pub(crate) fn journal_unsubscribe(&mut self, sid: SessionId, raw: &str, out: &mut Outbox) {
        if !self.journaled(sid) {
            return;
        }
        if let Some(j) = self.journal.as_mut() {
            j.record(out, |b| {
                b.put_u8(Tag::Unsubscribe as u8);
                b.put_u64(sid.0);
                put_str(b, raw);
            });
        }
    }

    /// The journal, when on and `sid` is journaled: for call sites that hold other borrows.
    pub(crate) fn journal_for(&mut self, sid: SessionId) -> Option<&mut Journal> {
        let journaled = self.sessions.get(&sid).is_some_and(|s| s.journaled);
        self.journal.as_mut().filter(|_| journaled)
    }

    pub(crate) fn journal_will(&mut self, sid: SessionId, out: &mut Outbox) {
        if !self.journaled(sid) {
            return;
        }
        let (Some(j), Some(s)) = (self.journal.as_mut(), self.sessions.get(&sid)) else {
            return;
        };
        if let Some((will, due)) = s.pending_will.as_deref() {
            write_will(j, sid, will, *due, out);
        }
    }

    pub(crate) fn journal_will_done(&mut self, sid: SessionId, out: &mut Outbox) {
        if let Some(j) = self.journal_for(sid) {
            j.session_event(out, Tag::WillDone, sid);
        }
    }

    /// A retained message was set or cleared. `$SYS` topics are regenerated, not stored.
    pub(crate) fn journal_retain(&mut self, m: &Message, out: &mut Outbox) {
        let Some(j) = self.journal.as_mut() else {
            return;
        };
        if m.topic.starts_with("$SYS") {
            return;
        }
        j.message(out, m);
        j.record(out, |b| {
            b.put_u8(Tag::Retain as u8);
            b.put_u64(m.id);
        });
    }

    /// Writes the whole durable state as one checkpoint. The driver must append the records
    /// of this call as one batch; once it is durable, everything before `CheckpointBegin` is
    /// no longer needed. Returns how many records `out.journal` held before
    /// `CheckpointBegin`.
    pub fn checkpoint(&mut self, out: &mut Outbox) -> Option<u64> {
        let j = self.journal.as_mut()?;
        j.generation += 1;
        let begin = out.journal.len();
        let (next_session, next_msg) = (self.next_session, self.next_message_id);
        j.record(out, |b| {
            b.put_u8(Tag::CheckpointBegin as u8);
            b.put_u64(next_session);
            b.put_u64(next_msg);
        });
        for m in self.retained.all() {
            if m.topic.starts_with("$SYS") {
                continue;
            }
            j.message(out, &m);
            j.record(out, |b| {
                b.put_u8(Tag::Retain as u8);
                b.put_u64(m.id);
            });
        }
        let mut ids: Vec<&SessionId> = self.sessions.keys().collect();
        ids.sort_unstable();
        for sid in ids {
            let s = &self.sessions[sid];
            if s.journaled {
                dump_session(j, s, out);
            }
        }
        j.record(out, |b| b.put_u8(Tag::CheckpointEnd as u8));
        Some(begin)
    }
}

fn encode_session(b: &mut Rec<'_>, s: &Session) {
    b.put_u8(Tag::Session as u8);
    b.put_u64(s.id.0);
    put_str(b, &s.client_id);
    b.put_u8(match s.version {
        ProtocolVersion::V311 => 4,
        ProtocolVersion::V5 => 5,
    });
    b.put_u32(s.expiry_interval);
    b.put_u64(s.disconnected_at.map_or(0, |t| t.0.max(1)));
}

fn encode_subscribe(b: &mut Rec<'_>, sid: SessionId, raw: &str, sub: &Subscription) {
    b.put_u8(Tag::Subscribe as u8);
    b.put_u64(sid.0);
    put_str(b, raw);
    b.put_u8(options_byte(&sub.options));
    b.put_u32(sub.identifier.unwrap_or(0));
}

fn encode_enqueue(b: &mut Rec<'_>, sid: SessionId, p: &Pending) {
    b.put_u8(Tag::Enqueue as u8);
    b.put_u64(sid.0);
    encode_pending(b, p);
}

/// Enqueue flags: QoS in bits 0–1, retain bit 2, shared-subscription origin bit 3.
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
        put_str(b, &o.filter);
        put_str(b, &o.group);
    }
}

fn decode_pending(f: &mut Fields<'_>, r: &Replay) -> Result<Option<Pending>, JournalError> {
    let id = f.u64()?;
    let flags = f.u8()?;
    let qos = qos_from(flags & 3).ok_or_else(|| f.invalid("qos"))?;
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
    Ok(r.messages.get(&id).map(|m| Pending {
        message: m.clone(),
        qos,
        retain: flags & PENDING_RETAIN != 0,
        subscription_ids,
        shared,
    }))
}

fn write_will(j: &mut Journal, sid: SessionId, will: &Will, due: Time, out: &mut Outbox) {
    // The will travels as a message whose id is 0; the delay itself is the due time.
    let mut properties = will.properties.clone();
    if properties.will_delay_interval.is_some() {
        properties.will_delay_interval = None;
    }
    let m = Message {
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
    };
    j.record(out, |b| encode_message(b, &m));
    j.record(out, |b| {
        b.put_u8(Tag::Will as u8);
        b.put_u64(sid.0);
        b.put_u64(due.0);
        b.put_u64(0);
    });
}

/// Everything of one session, in an order replay rebuilds it from.
fn dump_session(j: &mut Journal, s: &Session, out: &mut Outbox) {
    j.record(out, |b| encode_session(b, s));
    let mut subs: Vec<(&String, &Subscription)> = s.subscriptions.iter().collect();
    subs.sort_unstable_by(|a, b| a.0.cmp(b.0));
    for (raw, sub) in subs {
        j.record(out, |b| encode_subscribe(b, s.id, raw, sub));
    }
    let mut qos2: Vec<&PacketId> = s.inbound_qos2.iter().collect();
    qos2.sort_unstable();
    for pid in qos2 {
        j.record(out, |b| {
            b.put_u8(Tag::Qos2In as u8);
            b.put_u64(s.id.0);
            b.put_u16(*pid);
        });
    }
    // In flight, in send order (replay numbers them in this order), then the queue.
    for pid in s.inflight_in_order() {
        let f = &s.inflight[&pid];
        j.sent(out, s.id, pid, &f.pending);
        if f.state == OutState::AwaitPubComp {
            j.pid_event(out, Tag::PubRec, s.id, pid);
        }
    }
    for p in &s.pending {
        j.message(out, &p.message);
        j.record(out, |b| encode_enqueue(b, s.id, p));
    }
    if let Some((will, due)) = s.pending_will.as_deref() {
        write_will(j, s.id, will, *due, out);
    }
}

/// Reads fields of one record.
struct Fields<'a> {
    buf: &'a [u8],
    index: u64,
}

impl<'a> Fields<'a> {
    fn need(&self, n: usize) -> Result<(), JournalError> {
        if self.buf.len() < n {
            return Err(JournalError::Truncated { index: self.index });
        }
        Ok(())
    }
    fn u8(&mut self) -> Result<u8, JournalError> {
        self.need(1)?;
        Ok(self.buf.get_u8())
    }
    fn u16(&mut self) -> Result<u16, JournalError> {
        self.need(2)?;
        Ok(self.buf.get_u16())
    }
    fn u32(&mut self) -> Result<u32, JournalError> {
        u32::try_from(self.u64()?).map_err(|_| self.invalid("value above 32 bits"))
    }
    /// A LEB128 varint of at most 10 bytes.
    fn u64(&mut self) -> Result<u64, JournalError> {
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
    fn str(&mut self) -> Result<&'a str, JournalError> {
        let n = usize::try_from(self.u64()?).map_err(|_| self.invalid("length"))?;
        self.need(n)?;
        let (s, rest) = self.buf.split_at(n);
        self.buf = rest;
        std::str::from_utf8(s).map_err(|_| self.invalid("string is not UTF-8"))
    }
    fn sid(&mut self) -> Result<SessionId, JournalError> {
        Ok(SessionId(self.u64()?))
    }
    fn invalid(&self, what: &str) -> JournalError {
        JournalError::Invalid {
            index: self.index,
            what: what.to_string(),
        }
    }
}

fn decode_message(f: &mut Fields<'_>) -> Result<Message, JournalError> {
    let id = f.u64()?;
    let received_at = Time(f.u64()?);
    let expires_at = Some(f.u64()?).filter(|t| *t != 0).map(Time);
    let publisher = Some(f.u64()?).filter(|s| *s != 0).map(SessionId);
    let flags = f.u8()?;
    if flags & MSG_PROPERTIES == 0 {
        let qos = qos_from(flags & 3).ok_or_else(|| f.invalid("qos"))?;
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

/// The state a checkpoint replaces, kept until its `CheckpointEnd` is read: a checkpoint
/// too large for one log batch can be cut short by a crash, and then the state before it
/// (still in the log, as nothing is reclaimed before a checkpoint is durable) stands.
struct Saved {
    sessions: HashMap<SessionId, Box<Session>>,
    by_client_id: std::collections::HashMap<Arc<str>, SessionId>,
    subs: crate::SubscriptionTree,
    retained: crate::RetainedStore,
}

/// Replay state that only lives during [`Broker::restore`].
#[derive(Default)]
struct Replay {
    saved: Option<Saved>,
    messages: HashMap<u64, Arc<Message>>,
    /// The will message read just before its `Will` record.
    last_will: Option<Message>,
    report: RestoreReport,
}

impl Broker {
    /// Rebuilds durable state from journal records, oldest first. Call on a fresh broker,
    /// before [`Broker::enable_journal`] and before any connection. `now` becomes the
    /// disconnect time of sessions that were connected when the journal ended.
    pub fn restore<'a>(
        &mut self,
        records: impl IntoIterator<Item = &'a [u8]>,
        now: Time,
    ) -> Result<RestoreReport, JournalError> {
        let mut replay = Replay::default();
        for (index, record) in records.into_iter().enumerate() {
            let mut f = Fields {
                buf: record,
                index: index as u64,
            };
            self.apply(&mut f, &mut replay)?;
            replay.report.records += 1;
        }
        if let Some(saved) = replay.saved.take() {
            // The log ends inside a checkpoint: the state before it stands.
            self.sessions = saved.sessions;
            self.by_client_id = saved.by_client_id;
            self.subs = saved.subs;
            self.retained = saved.retained;
            replay.report.incomplete_checkpoint = true;
        }
        let mut r = replay.report;
        // Sessions connected at the crash were disconnected by it.
        for s in self.sessions.values_mut() {
            s.journaled = true;
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

    fn apply(&mut self, f: &mut Fields<'_>, r: &mut Replay) -> Result<(), JournalError> {
        let tag = f.u8()?;
        let Some(tag) = Tag::from_u8(tag) else {
            return Err(JournalError::UnknownTag {
                index: f.index,
                tag,
            });
        };
        match tag {
            Tag::Message => {
                let m = decode_message(f)?;
                if m.id == 0 {
                    r.last_will = Some(m);
                } else {
                    self.next_message_id = self.next_message_id.max(m.id + 1);
                    r.messages.insert(m.id, Arc::new(m));
                }
            }
            Tag::Retain => {
                let id = f.u64()?;
                match r.messages.get(&id) {
                    Some(m) => self.retained.set(m.clone()),
                    None => r.report.skipped += 1,
                }
            }
            Tag::Session => {
                let sid = f.sid()?;
                let client_id: Arc<str> = f.str()?.into();
                let version = match f.u8()? {
                    4 => ProtocolVersion::V311,
                    5 => ProtocolVersion::V5,
                    _ => return Err(f.invalid("protocol version")),
                };
                let expiry = f.u32()?;
                let disconnected_at = Some(f.u64()?).filter(|t| *t != 0).map(Time);
                let s = self
                    .sessions
                    .entry(sid)
                    .or_insert_with(|| Box::new(Session::new(sid, client_id.clone(), version)));
                s.version = version;
                s.expiry_interval = expiry;
                s.disconnected_at = disconnected_at;
                if disconnected_at.is_none() {
                    // Connecting cancels a delayed will.
                    s.pending_will = None;
                }
                self.by_client_id.insert(client_id, sid);
            }
            Tag::SessionEnd => {
                let sid = f.sid()?;
                self.drop_session(sid);
            }
            Tag::Subscribe => {
                let sid = f.sid()?;
                let raw = f.str()?.to_string();
                let options = options_from(f.u8()?).ok_or_else(|| f.invalid("options"))?;
                let identifier = Some(f.u32()?).filter(|i| *i != 0);
                let (group, filter) = match ferrymq_mqtt::topic::parse_shared(&raw) {
                    Ok(Some(sh)) => (Some(sh.group.to_string()), sh.filter.to_string()),
                    Ok(None) => (None, raw.clone()),
                    Err(_) => return Err(f.invalid("shared subscription filter")),
                };
                let Some(s) = self.sessions.get_mut(&sid) else {
                    r.report.skipped += 1;
                    return Ok(());
                };
                let entry = SubEntry {
                    session: sid,
                    options,
                    identifier,
                };
                self.subs.insert(&filter, group.as_deref(), entry);
                s.subscriptions.insert(
                    raw,
                    Subscription {
                        filter,
                        group,
                        options,
                        identifier,
                    },
                );
            }
            Tag::Unsubscribe => {
                let sid = f.sid()?;
                let raw = f.str()?;
                let removed = self
                    .sessions
                    .get_mut(&sid)
                    .and_then(|s| s.subscriptions.remove(raw));
                match removed {
                    Some(sub) => {
                        self.subs.remove(&sub.filter, sub.group.as_deref(), sid);
                    }
                    None => r.report.skipped += 1,
                }
            }
            Tag::Enqueue | Tag::Sent => {
                let sid = f.sid()?;
                let pid = if tag == Tag::Sent {
                    Some(f.u16()?)
                } else {
                    None
                };
                let pending = decode_pending(f, r)?;
                let (Some(s), Some(p)) = (self.sessions.get_mut(&sid), pending) else {
                    r.report.skipped += 1;
                    return Ok(());
                };
                match pid {
                    Some(pid) => s.restore_flight(pid, p),
                    None => s.pending.push_back(p),
                }
            }
            Tag::Flight => {
                let sid = f.sid()?;
                let pid = f.u16()?;
                let Some(s) = self.sessions.get_mut(&sid) else {
                    r.report.skipped += 1;
                    return Ok(());
                };
                match s.pending.pop_front() {
                    Some(p) => s.restore_flight(pid, p),
                    None => return Err(f.invalid("flight from an empty queue")),
                }
            }
            Tag::PopPending => {
                let sid = f.sid()?;
                if let Some(s) = self.sessions.get_mut(&sid) {
                    s.pending.pop_front();
                }
            }
            Tag::PubRec => {
                let sid = f.sid()?;
                let pid = f.u16()?;
                let flight = self
                    .sessions
                    .get_mut(&sid)
                    .and_then(|s| s.inflight.get_mut(&pid));
                match flight {
                    Some(fl) => fl.state = OutState::AwaitPubComp,
                    None => r.report.skipped += 1,
                }
            }
            Tag::Acked => {
                let sid = f.sid()?;
                let pid = f.u16()?;
                if let Some(s) = self.sessions.get_mut(&sid) {
                    s.inflight.remove(&pid);
                }
            }
            Tag::TakeShared => {
                let sid = f.sid()?;
                if let Some(s) = self.sessions.get_mut(&sid) {
                    s.take_shared();
                }
            }
            Tag::Qos2In | Tag::Qos2Done => {
                let sid = f.sid()?;
                let pid = f.u16()?;
                if let Some(s) = self.sessions.get_mut(&sid) {
                    if tag == Tag::Qos2In {
                        s.inbound_qos2.insert(pid);
                    } else {
                        s.inbound_qos2.remove(&pid);
                    }
                }
            }
            Tag::Will => {
                let sid = f.sid()?;
                let due = Time(f.u64()?);
                let _ = f.u64()?;
                let (Some(s), Some(m)) = (self.sessions.get_mut(&sid), r.last_will.take()) else {
                    r.report.skipped += 1;
                    return Ok(());
                };
                let will = Will {
                    topic: m.topic.to_string(),
                    payload: m.payload,
                    qos: m.qos,
                    retain: m.retain,
                    properties: m.properties,
                };
                s.pending_will = Some(Box::new((will, due)));
            }
            Tag::WillDone => {
                let sid = f.sid()?;
                if let Some(s) = self.sessions.get_mut(&sid) {
                    s.pending_will = None;
                }
            }
            Tag::CheckpointBegin => {
                let next_session = f.u64()?;
                let next_msg = f.u64()?;
                // The checkpoint holds the whole state: start from nothing, keeping the old
                // state until the checkpoint is known whole.
                r.saved = Some(Saved {
                    sessions: std::mem::take(&mut self.sessions),
                    by_client_id: std::mem::take(&mut self.by_client_id),
                    subs: std::mem::take(&mut self.subs),
                    retained: std::mem::take(&mut self.retained),
                });
                r.messages.clear();
                self.next_session = self.next_session.max(next_session);
                self.next_message_id = self.next_message_id.max(next_msg);
            }
            Tag::CheckpointEnd => r.saved = None,
        }
        Ok(())
    }

    /// Removes a session and its subscriptions without publishing anything (replay only).
    fn drop_session(&mut self, sid: SessionId) {
        let Some(s) = self.sessions.remove(&sid) else {
            return;
        };
        if self.by_client_id.get(&s.client_id) == Some(&sid) {
            self.by_client_id.remove(&s.client_id);
        }
        for sub in s.subscriptions.values() {
            self.subs.remove(&sub.filter, sub.group.as_deref(), sid);
        }
    }
}
