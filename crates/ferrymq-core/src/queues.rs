//! Work queues in the broker: routing published messages into queues, leasing them to
//! consumers (`$queue/{name}`, or `$share/{name}/…` when `{name}` is a queue), acks and
//! nacks, ack timeouts and lost consumers, dead letters, delayed publishes, and the admin
//! operations the REST API and CLI call. The queue's own state machine is in
//! `workqueue/queue.rs`; every change here is a journal record (`journal/record.rs`).
//!
//! A queue delivery rides in the consumer session's in-flight table (so packet ids, the
//! receive window and the QoS 2 flow are the session's), marked with its lease. Those
//! in-flight entries are never journaled: the lease is (`QLease`), and a lease outstanding
//! when the broker stops is returned as a failed attempt when it starts again.

use std::collections::BTreeMap;
use std::sync::Arc;

use ferrymq_mqtt::{PubResp, QoS, ReasonCode, SubscriptionOptions};
use rustc_hash::FxHashMap as HashMap;

use crate::broker::{Action, Delivery, Outbox, Timer};
use crate::journal::record::Record;
use crate::session::{OutState, Pending};
use crate::workqueue::{Cause, DeadLetter, Entry, Failure, Queue, QueueDef, Retry, Room};
use crate::{Broker, Message, SessionId, SubEntry, SubscriptionTree, Time};

/// The internal queue behind `$delayed/{seconds}/{topic}`: its messages are published to
/// everyone when due, not leased.
pub(crate) const DELAYED_QUEUE: &str = "$delayed";

/// Most messages one pump of a queue leases before it yields to other work.
const PUMP_BATCH: usize = 1024;

/// Most dead letters a `$dlq/{queue}` subscription replays when it is made.
pub const DLQ_REPLAY_LIMIT: usize = 1000;

/// Reads journal records back by log offset: where a queue's messages are when they are
/// not in memory. The driver implements it over its log; the engine decodes and checks what
/// it gets (the record must be the `QEnqueue` of that queue and message, or it is not used).
pub trait PayloadStore: Send {
    /// The record at `offset`, or `None` if it is not in the log (any more).
    fn read(&self, offset: u64) -> Option<bytes::Bytes>;
}

/// The engine's payload store, in a `Debug` wrapper.
pub(crate) struct Payloads(pub(crate) Box<dyn PayloadStore>);

impl std::fmt::Debug for Payloads {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PayloadStore")
    }
}

/// A delivery's lease, kept on the consumer's in-flight entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueueLease {
    pub queue: Arc<str>,
    pub message: u64,
    pub seq: u64,
}

/// A consumer of one queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Consumer {
    session: SessionId,
    qos: QoS,
}

#[derive(Debug, Default)]
struct Consumers {
    members: Vec<Consumer>,
    /// Where the next round-robin pick starts.
    next: usize,
}

/// Every queue, the filters that route into them, and their consumers.
#[derive(Debug, Default)]
pub(crate) struct Queues {
    pub(crate) by_name: BTreeMap<Arc<str>, Queue>,
    /// Queue filters; the entry's "session" is the queue's number in `names`.
    routes: SubscriptionTree,
    names: HashMap<u64, Arc<str>>,
    numbers: HashMap<Arc<str>, u64>,
    next_number: u64,
    /// Consumers by queue name (a consumer may subscribe before its queue exists, and stays
    /// registered if it is deleted and declared again).
    consumers: HashMap<Arc<str>, Consumers>,
    /// The time each queue's timer is armed for (one engine timer per queue).
    armed: HashMap<u64, Time>,
    /// xorshift state for backoff jitter (seeded from the instance id).
    rng: u64,
    /// When `restore` ran: leases it found are returned at this time.
    pub(crate) restored_at: Option<Time>,
    /// Messages kept in memory past the budget only until their records are written:
    /// (queue, message, record offset), oldest first (`Broker::journal_written`).
    evictable: std::collections::VecDeque<(Arc<str>, u64, u64)>,
    /// Every journal record below this log offset is written (`Broker::journal_written`).
    written_end: u64,
    /// The lowest position any entry had when the last checkpoint was written (found while
    /// writing it).
    pub(crate) checkpoint_floor: Option<u64>,
}

impl Queues {
    pub(crate) fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// Bytes of queue messages held in memory, across queues.
    pub(crate) fn cached_bytes(&self) -> u64 {
        self.by_name.values().map(|q| q.cached_bytes()).sum()
    }

    /// Takes the replayable state out (a checkpoint begins), keeping the random generator.
    pub(crate) fn take_state(&mut self) -> Queues {
        let rng = self.rng;
        let old = std::mem::take(self);
        self.rng = rng;
        old
    }

    pub(crate) fn seed(&mut self, seed: u64) {
        self.rng = seed | 1;
    }

    fn random(&mut self) -> f64 {
        let mut x = self.rng.max(1);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        (x >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Adds or replaces a queue's definition (journal `QueueDeclare`).
    pub(crate) fn declare(&mut self, def: QueueDef) {
        let name: Arc<str> = def.name.as_str().into();
        if let Some(q) = self.by_name.get_mut(&name) {
            let number = self.numbers[&name];
            for f in &q.def().filters {
                self.routes.remove(f, None, SessionId(number));
            }
            for f in &def.filters {
                self.routes.insert(f, None, route_entry(number));
            }
            q.set_def(def);
            return;
        }
        self.next_number += 1;
        let number = self.next_number;
        if name.as_ref() != DELAYED_QUEUE {
            for f in &def.filters {
                self.routes.insert(f, None, route_entry(number));
            }
        }
        self.names.insert(number, name.clone());
        self.numbers.insert(name.clone(), number);
        self.by_name.insert(name, Queue::new(def));
    }

    pub(crate) fn delete(&mut self, name: &str) -> bool {
        let Some((name, q)) = self.by_name.remove_entry(name) else {
            return false;
        };
        if let Some(number) = self.numbers.remove(&name) {
            for f in &q.def().filters {
                self.routes.remove(f, None, SessionId(number));
            }
            self.names.remove(&number);
            self.armed.remove(&number);
        }
        true
    }

    pub(crate) fn add_consumer(&mut self, queue: &Arc<str>, session: SessionId, qos: QoS) {
        let c = self.consumers.entry(queue.clone()).or_default();
        match c.members.iter_mut().find(|m| m.session == session) {
            Some(m) => m.qos = qos,
            None => c.members.push(Consumer { session, qos }),
        }
    }

    pub(crate) fn remove_consumer(&mut self, queue: &str, session: SessionId) {
        if let Some(c) = self.consumers.get_mut(queue) {
            c.members.retain(|m| m.session != session);
            if c.members.is_empty() {
                self.consumers.remove(queue);
            }
        }
    }

    /// Names of the queues whose filters match `topic`.
    fn matching(&self, topic: &str) -> Vec<Arc<str>> {
        let mut out: Vec<Arc<str>> = Vec::new();
        for e in self.routes.lookup(topic).plain.iter() {
            if let Some(name) = self.names.get(&e.session.0) {
                if !out.contains(name) {
                    out.push(name.clone());
                }
            }
        }
        out
    }

    pub(crate) fn consumer_count(&self, queue: &str) -> usize {
        self.consumers.get(queue).map_or(0, |c| c.members.len())
    }
}

/// The queue a subscription consumes: `$queue/{name}`, or `$share/{name}/{filter}` when a
/// queue `{name}` exists (decided when the subscription is applied, so replay decides the
/// same way: queue declarations precede the subscriptions that consume them in the log).
pub(crate) fn consumed_queue(
    raw: &str,
    sub: &crate::session::Subscription,
    queues: &Queues,
) -> Option<Arc<str>> {
    if let Some(name) = raw.strip_prefix("$queue/") {
        return Some(name.into());
    }
    let group = sub.group.as_deref()?;
    queues
        .by_name
        .get_key_value(group)
        .filter(|(n, _)| n.as_ref() != DELAYED_QUEUE)
        .map(|(n, _)| n.clone())
}

fn route_entry(number: u64) -> SubEntry {
    SubEntry {
        session: SessionId(number),
        options: SubscriptionOptions::default(),
        identifier: None,
    }
}

/// Why an admin operation on queues failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QueueError {
    #[error("no queue named {0:?}")]
    NoSuchQueue(String),
    #[error("queue {queue:?} has no dead letter {id}")]
    NoSuchDeadLetter { queue: String, id: u64 },
    #[error(transparent)]
    Invalid(#[from] crate::workqueue::QueueDefError),
    #[error("{0}")]
    BadRequest(String),
    #[error("the log cannot take new writes (storage full)")]
    StorageFull,
}

/// A queue as the admin surfaces show it.
#[derive(Debug, Clone)]
pub struct QueueView {
    pub def: QueueDef,
    pub depth: u64,
    pub leased: usize,
    pub delayed: usize,
    pub bytes: u64,
    pub dead_letters: usize,
    pub consumers: usize,
    /// Bytes of its messages held in memory (the rest are read back from the log).
    pub cached_bytes: u64,
    pub oldest_age_ms: Option<u64>,
    pub stats: crate::workqueue::QueueStats,
}

/// One queue's numbers for metrics ([`Broker::queue_counters`]); the counters are those of
/// [`crate::workqueue::QueueStats`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct QueueCounters {
    pub name: Arc<str>,
    pub depth: u64,
    pub leased: u64,
    pub delayed: u64,
    pub bytes: u64,
    pub dead_letters: u64,
    pub consumers: u64,
    pub cached_bytes: u64,
    /// 0 when empty.
    pub oldest_age_ms: u64,
    pub enqueued: u64,
    pub acked: u64,
    pub nacked: u64,
    pub redelivered: u64,
    pub dropped_overflow: u64,
    pub dropped_expired: u64,
    pub refused: u64,
    pub unreadable: u64,
    /// By cause, in the order of [`Cause::ALL`].
    pub dead_lettered: [u64; Cause::ALL.len()],
}

/// Which dead letters a list, redrive or discard takes.
#[derive(Debug, Clone, Default)]
pub struct DeadLetterQuery {
    pub ids: Option<Vec<u64>>,
    pub cause: Option<Cause>,
    /// A substring of the last failure's reason.
    pub reason: Option<String>,
    /// A topic filter the original topic must match.
    pub topic: Option<String>,
    /// Dead-lettered at or after (ms since the Unix epoch).
    pub since: Option<u64>,
    /// Dead-lettered before.
    pub until: Option<u64>,
    /// Only ids greater than this (the previous page's `next_cursor`).
    pub cursor: Option<u64>,
    pub limit: Option<usize>,
}

impl DeadLetterQuery {
    /// Everything but the topic filter: decided without reading the message.
    fn takes_metadata(&self, d: &DeadLetter) -> bool {
        let at = d.dead_lettered.0;
        self.ids
            .as_ref()
            .is_none_or(|ids| ids.contains(&d.entry.id))
            && self.cause.is_none_or(|c| c == d.cause)
            && self
                .reason
                .as_deref()
                .is_none_or(|r| d.failures.last().is_some_and(|f| f.reason.contains(r)))
            && self.since.is_none_or(|t| at >= t)
            && self.until.is_none_or(|t| at < t)
            && self.cursor.is_none_or(|c| d.entry.id > c)
    }

    fn takes_topic(&self, topic: &str) -> bool {
        self.topic
            .as_deref()
            .is_none_or(|f| ferrymq_mqtt::topic::matches(f, topic))
    }
}

/// One dead letter with its message.
#[derive(Debug, Clone)]
pub struct DeadLetterView {
    pub queue: Arc<str>,
    pub dead: DeadLetter,
    pub message: Arc<Message>,
    /// From a W3C `traceparent` user property.
    pub trace_id: Option<String>,
}

#[derive(Debug, Clone)]
pub struct DeadLetterPage {
    pub items: Vec<DeadLetterView>,
    pub next_cursor: Option<u64>,
}

/// The trace id of a W3C `traceparent` (`00-{32 hex trace id}-{16 hex}-{2 hex}`).
pub fn trace_id(m: &Message) -> Option<String> {
    trace_id_of(&m.properties)
}

/// The trace id of the `traceparent` user property among `properties`, if it is valid.
pub fn trace_id_of(properties: &ferrymq_mqtt::Properties) -> Option<String> {
    trace_id_in(properties).map(str::to_string)
}

/// [`trace_id_of`], borrowed.
pub(crate) fn trace_id_in(properties: &ferrymq_mqtt::Properties) -> Option<&str> {
    let tp = properties
        .user_properties
        .iter()
        .find(|(k, _)| k.eq_ignore_ascii_case("traceparent"))?;
    w3c_trace_id(&tp.1)
}

/// The trace id of a W3C Trace Context `traceparent` (section 3.2), or `None` when the value
/// is invalid there: fields of lower-case hex (version 2, trace id 32, parent id 16, flags 2),
/// a version other than `ff`, a trace id and a parent id not all zeros, and nothing after the
/// flags in version `00` (a later version may append `-` and more).
fn w3c_trace_id(tp: &str) -> Option<&str> {
    let hex = |s: &str, n: usize| {
        s.len() == n && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    };
    let zero = |s: &str| s.bytes().all(|b| b == b'0');
    let mut fields = tp.splitn(5, '-');
    let (version, trace, parent, flags) = (
        fields.next()?,
        fields.next()?,
        fields.next()?,
        fields.next()?,
    );
    let valid = hex(version, 2)
        && version != "ff"
        && hex(trace, 32)
        && !zero(trace)
        && hex(parent, 16)
        && !zero(parent)
        && hex(flags, 2)
        && !(version == "00" && fields.next().is_some());
    valid.then_some(trace)
}

fn user_property<'a>(m: &'a Message, key: &str) -> Option<&'a str> {
    m.properties
        .user_properties
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// `$delayed/{seconds}/{topic}`: the delay and the real topic, or why it is not valid.
pub(crate) fn parse_delayed(topic: &str) -> Option<Result<(u64, &str), ()>> {
    let rest = topic.strip_prefix("$delayed/")?;
    let Some((secs, topic)) = rest.split_once('/') else {
        return Some(Err(()));
    };
    let Ok(secs) = secs.parse::<u64>() else {
        return Some(Err(()));
    };
    let ms = secs.saturating_mul(1000);
    if topic.is_empty() || topic.starts_with('$') || ms > crate::workqueue::MAX_DELAY_MS {
        return Some(Err(()));
    }
    Some(Ok((ms, topic)))
}

impl Broker {
    // ---------------------------------------------------------------- payloads in the log

    /// Gives the engine a way to read queue messages back from the log, so a queue's
    /// backlog need not fit in memory (`BrokerConfig::queue_memory_bytes`).
    pub fn set_payload_store(&mut self, store: Box<dyn PayloadStore>) {
        self.payloads = Some(Payloads(store));
    }

    /// The driver's log holds every record below `offset` (written, readable): messages
    /// held in memory past the budget only until then are dropped from memory.
    pub fn journal_written(&mut self, offset: u64) {
        self.queues.written_end = offset;
        if self.payloads.is_none() || self.queues.evictable.is_empty() {
            return;
        }
        let budget = self.config.queue_memory_bytes;
        let mut cached = self.queues.cached_bytes();
        while cached > budget {
            let Some((name, id, at)) = self.queues.evictable.front().cloned() else {
                break;
            };
            if at >= offset {
                break;
            }
            self.queues.evictable.pop_front();
            if let Some(q) = self.queues.by_name.get_mut(&name) {
                cached -= q.uncache(id);
            }
        }
        if cached <= budget {
            // Under budget: what is left may stay.
            self.queues.evictable.clear();
        }
    }

    /// [`Broker::queue_floor`] as of the last checkpoint, found while it was written (no
    /// second scan of a large backlog): what the driver keeps the log above.
    pub fn checkpoint_queue_floor(&self) -> Option<u64> {
        self.queues.checkpoint_floor
    }

    /// The lowest log offset a queue still reads a message from: the log may only be
    /// reclaimed below it (and below the checkpoint). `None` when queues hold nothing.
    /// Visits every entry: call it when a checkpoint is written, not per step.
    pub fn queue_floor(&self) -> Option<u64> {
        self.queues.by_name.values().filter_map(|q| q.floor()).min()
    }

    /// A queue entry's message: from memory, or read back from the log.
    pub(crate) fn load_body(&self, queue: &str, entry: &Entry) -> Option<Arc<Message>> {
        let q = self.queues.by_name.get(queue)?;
        if let Some(m) = q.cached(entry.id) {
            return Some(m.clone());
        }
        let record = self.payloads.as_ref()?.0.read(entry.position)?;
        crate::journal::read_queue_message(&record, queue, entry.id).map(Arc::new)
    }

    // ---------------------------------------------------------------- admin operations

    /// Declares a queue, or changes the definition of an existing one (its messages stay).
    /// Returns whether it was new.
    pub fn declare_queue(
        &mut self,
        def: QueueDef,
        now: Time,
        out: &mut Outbox,
    ) -> Result<bool, QueueError> {
        def.validate()?;
        let existing = self.queues.by_name.get(def.name.as_str());
        if existing.is_some_and(|q| *q.def() == def) {
            return Ok(false);
        }
        let new = existing.is_none();
        if self.admission.storage_full {
            return Err(QueueError::StorageFull);
        }
        let name: Arc<str> = def.name.as_str().into();
        self.commit(Record::QueueDeclare(Box::new(def)), out);
        self.arm_queue(&name);
        self.pump_queue(&name, now, out);
        Ok(new)
    }

    /// Deletes a queue with everything in it; its consumers stay subscribed and consume
    /// again if a queue of that name is declared.
    pub fn delete_queue(&mut self, name: &str, out: &mut Outbox) -> Result<(), QueueError> {
        if name == DELAYED_QUEUE || !self.queues.by_name.contains_key(name) {
            return Err(QueueError::NoSuchQueue(name.into()));
        }
        // Deliveries in flight keep going; their acks find no lease and do nothing.
        self.commit(Record::QueueDelete(name.into()), out);
        Ok(())
    }

    /// Every user queue, by name.
    pub fn queue_views(&self, now: Time) -> Vec<QueueView> {
        self.queues
            .by_name
            .keys()
            .filter(|n| n.as_ref() != DELAYED_QUEUE)
            .filter_map(|n| self.queue_view(n, now))
            .collect()
    }

    /// Every queue's numbers for a metrics scrape, in name order: what [`QueueView`] holds
    /// but the definition, copied without an allocation per queue (the router runs this for
    /// every scrape, and routing waits meanwhile: with 1,000 queues, full views took 1-2.5 ms
    /// of a router step, this about a tenth of that).
    pub fn queue_counters(&self, now: Time) -> Vec<QueueCounters> {
        let mut out = Vec::with_capacity(self.queues.by_name.len());
        for (name, q) in &self.queues.by_name {
            if name.as_ref() == DELAYED_QUEUE {
                continue;
            }
            let s = &q.stats;
            out.push(QueueCounters {
                name: name.clone(),
                depth: q.depth(),
                leased: q.leased() as u64,
                delayed: q.delayed() as u64,
                bytes: q.bytes(),
                dead_letters: q.dead_count() as u64,
                consumers: self.queues.consumer_count(name) as u64,
                cached_bytes: q.cached_bytes(),
                oldest_age_ms: q.oldest_enqueued().map_or(0, |t| now.0.saturating_sub(t.0)),
                enqueued: s.enqueued,
                acked: s.acked,
                nacked: s.nacked,
                redelivered: s.redelivered,
                dropped_overflow: s.dropped_overflow,
                dropped_expired: s.dropped_expired,
                refused: s.refused,
                unreadable: s.unreadable,
                dead_lettered: Cause::ALL.map(|c| s.dead_lettered.get(&c).copied().unwrap_or(0)),
            });
        }
        out
    }

    pub fn queue_view(&self, name: &str, now: Time) -> Option<QueueView> {
        if name == DELAYED_QUEUE {
            return None;
        }
        let q = self.queues.by_name.get(name)?;
        Some(QueueView {
            def: q.def().clone(),
            depth: q.depth(),
            leased: q.leased(),
            delayed: q.delayed(),
            bytes: q.bytes(),
            dead_letters: q.dead_count(),
            consumers: self.queues.consumer_count(name),
            cached_bytes: q.cached_bytes(),
            oldest_age_ms: q.oldest_enqueued().map(|t| now.0.saturating_sub(t.0)),
            stats: q.stats.clone(),
        })
    }

    /// Messages waiting for a `$delayed/…` publish to come due.
    pub fn delayed_publishes(&self) -> u64 {
        self.queues
            .by_name
            .get(DELAYED_QUEUE)
            .map_or(0, |q| q.depth())
    }

    /// A page of a queue's dead letters, oldest id first.
    pub fn dead_letters(
        &self,
        name: &str,
        query: &DeadLetterQuery,
    ) -> Result<DeadLetterPage, QueueError> {
        let q = self.user_queue(name)?;
        let limit = query.limit.unwrap_or(100).clamp(1, 1000);
        let mut items = Vec::new();
        let mut next_cursor = None;
        // Past the cursor only, and the message read only for what passes the rest.
        for d in q.dead_letters_after(query.cursor) {
            if !query.takes_metadata(d) {
                continue;
            }
            let Some(m) = self.load_body(name, &d.entry) else {
                continue;
            };
            if !query.takes_topic(&m.topic) {
                continue;
            }
            if items.len() == limit {
                next_cursor = items.last().map(|v: &DeadLetterView| v.dead.entry.id);
                break;
            }
            items.push(DeadLetterView {
                queue: name.into(),
                dead: d.clone(),
                trace_id: trace_id(&m),
                message: m,
            });
        }
        Ok(DeadLetterPage { items, next_cursor })
    }

    pub fn dead_letter(&self, name: &str, id: u64) -> Result<DeadLetterView, QueueError> {
        let q = self.user_queue(name)?;
        let no = || QueueError::NoSuchDeadLetter {
            queue: name.into(),
            id,
        };
        let d = q.dead_letter(id).ok_or_else(no)?;
        let m = self.load_body(name, &d.entry).ok_or_else(no)?;
        Ok(DeadLetterView {
            queue: name.into(),
            dead: d.clone(),
            trace_id: trace_id(&m),
            message: m,
        })
    }

    /// Ids of the dead letters a query takes (every page), oldest first.
    pub fn dead_letter_ids(
        &self,
        name: &str,
        query: &DeadLetterQuery,
    ) -> Result<Vec<u64>, QueueError> {
        let q = self.user_queue(name)?;
        let limit = query.limit.unwrap_or(usize::MAX);
        Ok(q.dead_letters_after(query.cursor)
            .filter(|d| {
                // Only the topic filter needs the message.
                query.takes_metadata(d)
                    && (query.topic.is_none()
                        || self
                            .load_body(name, &d.entry)
                            .is_some_and(|m| query.takes_topic(&m.topic)))
            })
            .map(|d| d.entry.id)
            .take(limit)
            .collect())
    }

    /// Sends dead letters back: into their queue with attempts at 0 (they keep their
    /// failures), or, with `target_topic`, published afresh to that topic (and removed from
    /// the dead letters). Returns how many moved.
    pub fn redrive_dead_letters(
        &mut self,
        name: &str,
        ids: &[u64],
        target_topic: Option<&str>,
        now: Time,
        out: &mut Outbox,
    ) -> Result<usize, QueueError> {
        self.user_queue(name)?;
        if let Some(t) = target_topic {
            if !ferrymq_mqtt::topic::valid_topic_name(t) || t.starts_with('$') {
                return Err(QueueError::BadRequest(format!(
                    "target_topic {t:?} is not a topic a client may publish to"
                )));
            }
        }
        if self.admission.storage_full {
            return Err(QueueError::StorageFull);
        }
        let queue: Arc<str> = name.into();
        let mut moved = 0;
        for &id in ids {
            let Some(q) = self.queues.by_name.get(name) else {
                break;
            };
            let Some(entry) = q.dead_letter(id).map(|d| d.entry) else {
                continue;
            };
            let Some(m) = self.load_body(name, &entry) else {
                continue;
            };
            match target_topic {
                // Back into its queue only while the queue has room: a redrive does not push
                // a queue past its limits (what did not fit stays a dead letter).
                None if q.is_full_for(entry.size) => {}
                None => {
                    let record = Record::QRedrive {
                        queue: queue.clone(),
                        message: id,
                    };
                    if self.try_commit(record, out).is_ok() {
                        moved += 1;
                    }
                }
                Some(t) => {
                    // Published first, as a publisher that is answered (all or nothing: a
                    // full `reject_new` queue refuses it whole); the dead letter goes only
                    // once someone took it, so a refused or unheard redrive loses nothing.
                    let mut fresh = (*m).clone();
                    fresh.topic = t.into();
                    fresh.received_at = now;
                    fresh.journaled = Default::default();
                    let routed = self.route(fresh, crate::queue_full::Promise::Acked, now, out);
                    if routed.refused || routed.count == 0 {
                        continue;
                    }
                    let record = Record::QDiscard {
                        queue: queue.clone(),
                        message: id,
                    };
                    if self.try_commit(record, out).is_ok() {
                        moved += 1;
                    }
                }
            }
        }
        self.pump_queue(&queue, now, out);
        Ok(moved)
    }

    /// Removes dead letters for good; returns how many.
    pub fn discard_dead_letters(
        &mut self,
        name: &str,
        ids: &[u64],
        out: &mut Outbox,
    ) -> Result<usize, QueueError> {
        self.user_queue(name)?;
        let queue: Arc<str> = name.into();
        let mut gone = 0;
        for &id in ids {
            let record = Record::QDiscard {
                queue: queue.clone(),
                message: id,
            };
            let known = self
                .queues
                .by_name
                .get(name)
                .is_some_and(|q| q.dead_letter(id).is_some());
            if known && self.try_commit(record, out).is_ok() {
                gone += 1;
            }
        }
        Ok(gone)
    }

    fn user_queue(&self, name: &str) -> Result<&Queue, QueueError> {
        if name == DELAYED_QUEUE {
            return Err(QueueError::NoSuchQueue(name.into()));
        }
        self.queues
            .by_name
            .get(name)
            .ok_or_else(|| QueueError::NoSuchQueue(name.into()))
    }

    // ---------------------------------------------------------------- publishing

    /// The queues a published message goes into.
    pub(crate) fn queue_targets(&self, msg: &Message) -> Vec<Arc<str>> {
        if self.queues.is_empty() || msg.topic.starts_with('$') {
            return Vec::new();
        }
        self.queues.matching(&msg.topic)
    }

    /// Whether some target queue refuses the message (full under `reject_new`, or full with
    /// nothing it may drop), counted on each that does: decided before anything is routed,
    /// so a refused publish reaches no one.
    pub(crate) fn queues_refuse(&mut self, msg: &Message, targets: &[Arc<str>]) -> bool {
        let size = entry_size(msg);
        let mut refused = false;
        for name in targets {
            if let Some(q) = self.queues.by_name.get_mut(name) {
                if q.make_room(size) == Room::Full {
                    q.stats.refused += 1;
                    refused = true;
                }
            }
        }
        refused
    }

    /// Puts a routed message into each target queue (after `queues_refuse` said they have
    /// room or may make it).
    pub(crate) fn enqueue_in_queues(
        &mut self,
        msg: &Arc<Message>,
        targets: Vec<Arc<str>>,
        keep: bool,
        now: Time,
        out: &mut Outbox,
    ) {
        for name in targets {
            self.enqueue_in(&name, msg.clone(), None, keep, now, out);
        }
    }

    /// A `$delayed/{seconds}/{topic}` publish: held in the internal delayed queue, published
    /// to everyone when due. False if the log cannot take it.
    pub(crate) fn hold_delayed(
        &mut self,
        msg: Message,
        delay_ms: u64,
        now: Time,
        out: &mut Outbox,
    ) -> bool {
        if !self.queues.by_name.contains_key(DELAYED_QUEUE) {
            let mut def = QueueDef::new(DELAYED_QUEUE, "#");
            def.name = DELAYED_QUEUE.into();
            self.commit(Record::QueueDeclare(Box::new(def)), out);
        }
        let mut msg = msg;
        msg.id = self.next_message_id;
        self.next_message_id += 1;
        let name: Arc<str> = DELAYED_QUEUE.into();
        let due = Some(now.plus_millis(delay_ms));
        self.enqueue_in(&name, Arc::new(msg), due, true, now, out)
    }

    /// Puts one message in one queue, making room under its overflow policy. `keep`: the
    /// message was already acknowledged to its publisher (a `$delayed` publish coming due,
    /// a redrive), so a queue that cannot take it keeps it as a dead letter (cause
    /// `overflow`) rather than lose it.
    fn enqueue_in(
        &mut self,
        name: &Arc<str>,
        msg: Arc<Message>,
        delay: Option<Time>,
        keep: bool,
        now: Time,
        out: &mut Outbox,
    ) -> bool {
        let size = entry_size(&msg);
        let mut bury = false;
        // A large message may need several displaced; each pass takes one.
        loop {
            let Some(q) = self.queues.by_name.get_mut(name) else {
                return false;
            };
            match q.make_room(size) {
                Room::Free => break,
                Room::Full if keep => {
                    bury = true;
                    break;
                }
                Room::Full => {
                    q.stats.refused += 1;
                    return false;
                }
                Room::Displace(old) => {
                    let record = match q.def().overflow {
                        crate::workqueue::Overflow::DeadLetter => Record::QDead {
                            queue: name.clone(),
                            message: old,
                            cause: Cause::Overflow,
                            at: now,
                        },
                        _ => Record::QDrop {
                            queue: name.clone(),
                            message: old,
                            expired: false,
                        },
                    };
                    let dead = matches!(record, Record::QDead { .. });
                    if self.try_commit(record, out).is_err() {
                        return false;
                    }
                    if dead {
                        self.announce_dead_letter(name, old, now, out);
                    }
                }
            }
        }
        let Some(q) = self.queues.by_name.get(name) else {
            return false;
        };
        let priority = user_property(&msg, "priority")
            .and_then(|p| p.trim().parse::<u8>().ok())
            .filter(|p| *p <= 9)
            .unwrap_or(q.def().default_priority);
        let due = delay.or_else(|| {
            user_property(&msg, "delay-ms")
                .and_then(|d| d.trim().parse::<u64>().ok())
                .filter(|d| *d > 0)
                .map(|d| now.plus_millis(d.min(crate::workqueue::MAX_DELAY_MS)))
        });
        let expires = msg.expires_at.is_some();
        let entry = Entry {
            id: msg.id,
            // The QEnqueue record below carries the message: its offset is where it stays.
            position: self.journal_next_offset().unwrap_or(0),
            size,
            priority,
            attempts: 0,
            first_enqueued: now,
        };
        self.commit(
            Record::QEnqueue(Box::new(crate::journal::record::QEnqueue {
                queue: name.clone(),
                entry,
                expires: msg.expires_at,
                message: Some(msg),
                due,
                failures: Vec::new(),
            })),
            out,
        );
        if self.payloads.is_some() && self.queues.cached_bytes() > self.config.queue_memory_bytes {
            // Past the budget: dropped from memory once its record is written.
            self.queues
                .evictable
                .push_back((name.clone(), entry.id, entry.position));
        }
        if bury {
            self.commit(
                Record::QDead {
                    queue: name.clone(),
                    message: entry.id,
                    cause: Cause::Overflow,
                    at: now,
                },
                out,
            );
            self.announce_dead_letter(name, entry.id, now, out);
            return true;
        }
        if due.is_some() || expires {
            self.arm_queue(name);
        }
        self.pump_queue(name, now, out);
        true
    }

    // ---------------------------------------------------------------- consuming

    /// Leases ready messages to consumers with room, round robin, until one runs out.
    pub(crate) fn pump_queue(&mut self, name: &Arc<str>, now: Time, out: &mut Outbox) {
        if name.as_ref() == DELAYED_QUEUE {
            return self.release_delayed(now, out);
        }
        // Bounded per call, so one call cannot turn a large backlog into one enormous batch
        // (QoS 0 consumers have no window); the queue's timer continues at once.
        let mut budget = PUMP_BATCH;
        loop {
            if budget == 0 {
                if let Some(number) = self.queues.numbers.get(name).copied() {
                    self.queues.armed.insert(number, now);
                    self.timers
                        .push(std::cmp::Reverse((now, Timer::Queue(number))));
                }
                return;
            }
            budget -= 1;
            let Some(q) = self.queues.by_name.get_mut(name) else {
                return;
            };
            let Some(entry) = q.next_ready(now) else {
                return;
            };
            let dead_letter_on_expiry = q.def().dead_letter_on_expiry;
            // Nobody to take it: leave it where it is (and unread).
            if !self.consumer_has_room(name) {
                return;
            }
            let Some(body) = self.load_body(name, &entry) else {
                // Its record is not in the log (a damaged or reclaimed log, or a bug): it
                // cannot be delivered. Dropped and counted, rather than spun on.
                if let Some(q) = self.queues.by_name.get_mut(name) {
                    q.stats.unreadable += 1;
                }
                let record = Record::QDrop {
                    queue: name.clone(),
                    message: entry.id,
                    expired: false,
                };
                if self.try_commit(record, out).is_err() {
                    return;
                }
                continue;
            };
            if body.is_expired(now) {
                let record = if dead_letter_on_expiry {
                    Record::QDead {
                        queue: name.clone(),
                        message: entry.id,
                        cause: Cause::Expired,
                        at: now,
                    }
                } else {
                    Record::QDrop {
                        queue: name.clone(),
                        message: entry.id,
                        expired: true,
                    }
                };
                let dead = matches!(record, Record::QDead { .. });
                if self.try_commit(record, out).is_err() {
                    return;
                }
                if dead {
                    self.announce_dead_letter(name, entry.id, now, out);
                }
                continue;
            }
            let Some(consumer) = self.pick_consumer(name) else {
                return;
            };
            self.lease_to(name, entry, body, consumer, now, out);
        }
    }

    /// Whether some consumer of the queue is connected with room in its window.
    fn consumer_has_room(&self, name: &str) -> bool {
        self.queues.consumers.get(name).is_some_and(|c| {
            c.members.iter().any(|m| {
                self.sessions
                    .get(&m.session)
                    .is_some_and(|s| s.is_connected() && s.has_window())
            })
        })
    }

    /// The next consumer, round robin, that is connected and has room in its window.
    fn pick_consumer(&mut self, name: &str) -> Option<Consumer> {
        let c = self.queues.consumers.get_mut(name)?;
        let n = c.members.len();
        for k in 0..n {
            let i = (c.next + k) % n;
            let m = c.members[i];
            let room = self
                .sessions
                .get(&m.session)
                .is_some_and(|s| s.is_connected() && s.has_window());
            if room {
                c.next = (i + 1) % n;
                return Some(m);
            }
        }
        None
    }

    fn lease_to(
        &mut self,
        name: &Arc<str>,
        entry: Entry,
        body: Arc<Message>,
        consumer: Consumer,
        now: Time,
        out: &mut Outbox,
    ) {
        let sid = consumer.session;
        let record = Record::QLease {
            queue: name.clone(),
            message: entry.id,
            consumer: sid,
            at: now,
        };
        if self.try_commit(record, out).is_err() {
            return;
        }
        self.arm_queue(name);
        let Some(seq) = self
            .queues
            .by_name
            .get(name)
            .and_then(|q| q.lease_of(entry.id))
            .map(|l| l.seq)
        else {
            return;
        };
        let lease = QueueLease {
            queue: name.clone(),
            message: entry.id,
            seq,
        };
        let too_large = self
            .sessions
            .get(&sid)
            .and_then(|s| s.conn)
            .and_then(|c| self.conns.get(&c))
            .is_some_and(|c| body.wire_size(0) + 64 > c.client_max_packet_size as usize);
        if too_large {
            let reason = "larger than the consumer's maximum packet size";
            return self.fail_lease(
                &lease,
                sid,
                0x95,
                reason.into(),
                RetryOr::Delay(None),
                now,
                out,
            );
        }
        if consumer.qos == QoS::AtMostOnce {
            // A QoS 0 consumer cannot acknowledge: taking it is its acknowledgement.
            self.deliver_leased(sid, &body, None, entry, now, out);
            self.commit(
                Record::QAck {
                    queue: name.clone(),
                    message: entry.id,
                },
                out,
            );
            return;
        }
        let qos = consumer.qos.min(QoS::ExactlyOnce);
        let Some(s) = self.sessions.get_mut(&sid) else {
            return;
        };
        let pid = s.free_packet_id();
        let pending = Pending {
            message: body.clone(),
            qos,
            retain: false,
            subscription_ids: Vec::new(),
            shared: None,
            queue: Some(Box::new(lease)),
        };
        self.commit(Record::Sent { sid, pid, pending }, out);
        self.deliver_leased(sid, &body, Some((pid, qos)), entry, now, out);
    }

    fn deliver_leased(
        &mut self,
        sid: SessionId,
        body: &Arc<Message>,
        flight: Option<(u16, QoS)>,
        entry: Entry,
        now: Time,
        out: &mut Outbox,
    ) {
        let Some(conn) = self.sessions.get(&sid).and_then(|s| s.conn) else {
            return;
        };
        let qos = flight.map_or(QoS::AtMostOnce, |(_, q)| q);
        self.stats.messages_sent[qos as usize] += 1;
        self.stats.payload_bytes_sent[qos as usize] += body.payload.len() as u64;
        let d = Delivery {
            message: body.clone(),
            qos,
            packet_id: flight.map(|(pid, _)| pid),
            dup: false,
            retain: false,
            subscription_ids: Vec::new(),
            expiry_remaining: body.expiry_remaining(now),
            attempt: Some((u32::from(entry.attempts) + 1, entry.first_enqueued.0)),
        };
        out.push(conn, Action::Deliver(d));
    }

    /// A consumer answered a queue delivery (PUBACK, or PUBREC for QoS 2): a success code
    /// acknowledges it; a code of 0x80 or more is a failed attempt (0x99, payload format
    /// invalid, dead-letters at once), with the reason string kept and a `retry-after-ms`
    /// user property as its own delay.
    pub(crate) fn answer_lease(
        &mut self,
        sid: SessionId,
        lease: &QueueLease,
        r: &PubResp,
        now: Time,
        out: &mut Outbox,
    ) {
        let current = self
            .queues
            .by_name
            .get(&lease.queue)
            .and_then(|q| q.lease_of(lease.message))
            .is_some_and(|l| l.seq == lease.seq && l.consumer == sid);
        if !current {
            // A late answer: the lease ran out (or the queue went) and the message moved on.
            return;
        }
        if !r.reason.is_error() {
            self.commit(
                Record::QAck {
                    queue: lease.queue.clone(),
                    message: lease.message,
                },
                out,
            );
            return;
        }
        let reason: Arc<str> = r
            .properties
            .reason_string
            .as_deref()
            .unwrap_or("nack")
            .into();
        let retry_after = r
            .properties
            .user_properties
            .iter()
            .find(|(k, _)| k == "retry-after-ms")
            .and_then(|(_, v)| v.trim().parse::<u64>().ok());
        let code = r.reason as u8;
        let retry = (r.reason == ReasonCode::PayloadFormatInvalid)
            .then_some(Retry::DeadLettered(Cause::Rejected));
        let how = match retry {
            Some(r) => RetryOr::Known(r),
            None => RetryOr::Delay(retry_after),
        };
        self.fail_lease(lease, sid, code, reason, how, now, out);
    }

    /// A failed attempt of a current lease: `how` is the outcome when already known (a
    /// rejection), else the nack's own delay (if any) for the backoff decision.
    #[allow(clippy::too_many_arguments)]
    fn fail_lease(
        &mut self,
        lease: &QueueLease,
        sid: SessionId,
        reason_code: u8,
        reason: Arc<str>,
        how: RetryOr,
        now: Time,
        out: &mut Outbox,
    ) {
        let consumer = self
            .sessions
            .get(&sid)
            .map_or_else(|| Arc::from(""), |s| s.client_id.clone());
        let random = self.queues.random();
        let Some(q) = self.queues.by_name.get(&lease.queue) else {
            return;
        };
        let retry = match how {
            RetryOr::Known(r) => r,
            RetryOr::Delay(d) => match q.decide_retry(lease.message, d, random, now) {
                Some(r) => r,
                None => return,
            },
        };
        let failure = Failure {
            at: now,
            reason_code,
            reason,
            consumer,
        };
        let record = Record::QFail {
            queue: lease.queue.clone(),
            message: lease.message,
            failure: Box::new(failure),
            retry,
        };
        if self.try_commit(record, out).is_err() {
            return;
        }
        match retry {
            Retry::DeadLettered(_) => {
                self.announce_dead_letter(&lease.queue, lease.message, now, out)
            }
            Retry::At(_) => self.arm_queue(&lease.queue),
        }
    }

    /// After a consumer's window opened (an ack, a connect): lease to it from the queues it
    /// consumes.
    pub(crate) fn pump_consumer(&mut self, sid: SessionId, now: Time, out: &mut Outbox) {
        let Some(s) = self.sessions.get(&sid) else {
            return;
        };
        if s.consumes.is_empty() || !s.is_connected() || !s.has_window() {
            return;
        }
        for name in s.consumes.clone() {
            self.pump_queue(&name, now, out);
        }
    }

    /// A consumer's connection ended: every lease it held is a failed attempt ("consumer
    /// gone"), and its deliveries leave its in-flight table (a QoS 2 one already
    /// acknowledged by PUBREC stays, to finish its PUBREL/PUBCOMP on reconnect).
    pub(crate) fn release_leases(&mut self, sid: SessionId, now: Time, out: &mut Outbox) {
        let Some(s) = self.sessions.get_mut(&sid) else {
            return;
        };
        let mut leases = Vec::new();
        // Not durable state (never journaled): dropped directly.
        s.inflight.retain(|_, f| match &f.pending.queue {
            Some(l) if f.state != OutState::AwaitPubComp => {
                leases.push((**l).clone());
                false
            }
            _ => true,
        });
        leases.sort_by_key(|l| l.seq);
        let mut queues: Vec<Arc<str>> = Vec::new();
        for lease in leases {
            let current = self
                .queues
                .by_name
                .get(&lease.queue)
                .and_then(|q| q.lease_of(lease.message))
                .is_some_and(|l| l.seq == lease.seq);
            if current {
                let reason = "consumer gone".into();
                self.fail_lease(&lease, sid, 0x80, reason, RetryOr::Delay(None), now, out);
                if !queues.contains(&lease.queue) {
                    queues.push(lease.queue.clone());
                }
            }
        }
        for q in queues {
            self.pump_queue(&q, now, out);
        }
    }

    /// Leases the restore found (their consumers' connections ended with the process) are
    /// failed attempts, journaled now ("broker restarted").
    pub(crate) fn return_restored_leases(&mut self, out: &mut Outbox) {
        let Some(now) = self.queues.restored_at.take() else {
            return;
        };
        let mut leases: Vec<(QueueLease, SessionId)> = Vec::new();
        for (name, q) in &self.queues.by_name {
            for l in q.leases() {
                leases.push((
                    QueueLease {
                        queue: name.clone(),
                        message: l.entry.id,
                        seq: l.seq,
                    },
                    l.consumer,
                ));
            }
        }
        leases.sort_by_key(|(l, _)| l.seq);
        for (lease, sid) in leases {
            let reason = "broker restarted".into();
            self.fail_lease(&lease, sid, 0x80, reason, RetryOr::Delay(None), now, out);
        }
        let names: Vec<Arc<str>> = self.queues.by_name.keys().cloned().collect();
        for name in names {
            self.arm_queue(&name);
        }
    }

    // ---------------------------------------------------------------- time

    /// Arms the queue's timer for its next deadline, unless it already fires by then.
    pub(crate) fn arm_queue(&mut self, name: &Arc<str>) {
        let Some(number) = self.queues.numbers.get(name).copied() else {
            return;
        };
        let Some(due) = self
            .queues
            .by_name
            .get(name)
            .and_then(|q| q.next_deadline())
        else {
            return;
        };
        if self.queues.armed.get(&number).is_some_and(|t| *t <= due) {
            return;
        }
        self.queues.armed.insert(number, due);
        self.timers
            .push(std::cmp::Reverse((due, Timer::Queue(number))));
    }

    /// A queue's timer: leases past their deadline fail ("ack timeout"), delayed messages
    /// that came due are leased, dead letters past retention go.
    pub(crate) fn queue_timer(&mut self, number: u64, now: Time, out: &mut Outbox) {
        if self.queues.armed.get(&number).is_some_and(|t| *t <= now) {
            self.queues.armed.remove(&number);
        }
        let Some(name) = self.queues.names.get(&number).cloned() else {
            return;
        };
        let Some(q) = self.queues.by_name.get_mut(&name) else {
            return;
        };
        let overdue = q.overdue_leases(now);
        let old = q.dead_past_retention(now);
        let expired = q.take_expired(now);
        let dead_on_expiry = q.def().dead_letter_on_expiry;
        for id in expired {
            // Expired while waiting: gone (or a dead letter) now, not when a consumer comes.
            let record = if dead_on_expiry {
                Record::QDead {
                    queue: name.clone(),
                    message: id,
                    cause: Cause::Expired,
                    at: now,
                }
            } else {
                Record::QDrop {
                    queue: name.clone(),
                    message: id,
                    expired: true,
                }
            };
            if self.try_commit(record, out).is_ok() && dead_on_expiry {
                self.announce_dead_letter(&name, id, now, out);
            }
        }
        for (id, sid) in overdue {
            let Some(seq) = q_lease_seq(self, &name, id) else {
                continue;
            };
            let lease = QueueLease {
                queue: name.clone(),
                message: id,
                seq,
            };
            let reason = "ack timeout".into();
            self.fail_lease(&lease, sid, 0x80, reason, RetryOr::Delay(None), now, out);
        }
        for id in old {
            self.commit(
                Record::QDiscard {
                    queue: name.clone(),
                    message: id,
                },
                out,
            );
        }
        self.pump_queue(&name, now, out);
        self.arm_queue(&name);
    }

    /// Publishes every `$delayed` message that came due.
    fn release_delayed(&mut self, now: Time, out: &mut Outbox) {
        let name: Arc<str> = DELAYED_QUEUE.into();
        loop {
            let Some(q) = self.queues.by_name.get_mut(&name) else {
                return;
            };
            let Some(entry) = q.next_ready(now) else {
                break;
            };
            let Some(body) = self.load_body(&name, &entry) else {
                // Not readable from the log: dropped and counted, so it does not hold back
                // every later delayed publish.
                if let Some(q) = self.queues.by_name.get_mut(&name) {
                    q.stats.unreadable += 1;
                }
                let record = Record::QDrop {
                    queue: name.clone(),
                    message: entry.id,
                    expired: false,
                };
                if self.try_commit(record, out).is_err() {
                    break;
                }
                continue;
            };
            let record = Record::QDrop {
                queue: name.clone(),
                message: entry.id,
                expired: false,
            };
            if self.try_commit(record, out).is_err() {
                break;
            }
            let mut m = (*body).clone();
            m.journaled = Default::default();
            m.received_at = now;
            // Acknowledged to its publisher when it was held: full queues keep it as a dead
            // letter, full sessions queue it past their limit, rather than lose it.
            self.route(m, crate::queue_full::Promise::Accepted, now, out);
        }
        self.arm_queue(&name);
    }

    /// A message just became a dead letter: published (QoS 1, not retained) to
    /// `$dlq/{queue}` for anyone subscribed, with its cause and attempts as user properties.
    fn announce_dead_letter(&mut self, queue: &Arc<str>, id: u64, now: Time, out: &mut Outbox) {
        let Ok(view) = self.dead_letter(queue, id) else {
            return;
        };
        out.dead_lettered.push(crate::DeadLettered {
            queue: queue.clone(),
            message_id: id,
            topic: view.message.topic.clone(),
            cause: view.dead.cause,
            reason: view.dead.failures.last().map(|f| f.reason.clone()),
            trace_id: view.trace_id.clone(),
        });
        let m = dlq_message(&view, now);
        self.publish(m, now, out);
        // Dead letters are read back from the log when looked at, not kept in memory (once
        // their record is written: until then memory is the only copy to read).
        let written = self.queues.written_end;
        if self.payloads.is_some() {
            if let Some(q) = self.queues.by_name.get_mut(queue) {
                if q.dead_letter(id)
                    .is_some_and(|d| d.entry.position < written)
                {
                    q.uncache(id);
                }
            }
        }
    }

    /// Sends the dead letters of the queue a `$dlq/{queue}` subscription names (the most
    /// recent [`DLQ_REPLAY_LIMIT`]) to the new subscriber.
    pub(crate) fn replay_dead_letters(
        &mut self,
        sid: SessionId,
        filter: &str,
        options: SubscriptionOptions,
        now: Time,
        out: &mut Outbox,
    ) {
        let names: Vec<Arc<str>> = self
            .queues
            .by_name
            .keys()
            .filter(|n| n.as_ref() != DELAYED_QUEUE)
            .filter(|n| ferrymq_mqtt::topic::matches(filter, &format!("$dlq/{n}")))
            .cloned()
            .collect();
        for name in names {
            let Some(q) = self.queues.by_name.get(&name) else {
                continue;
            };
            let ids: Vec<u64> = q
                .dead_letters()
                .rev()
                .take(DLQ_REPLAY_LIMIT)
                .map(|d| d.entry.id)
                .collect();
            for id in ids.into_iter().rev() {
                let Ok(view) = self.dead_letter(&name, id) else {
                    continue;
                };
                let mut m = dlq_message(&view, now);
                m.id = self.next_message_id;
                self.next_message_id += 1;
                let p = Pending {
                    qos: m.qos.min(options.qos),
                    message: Arc::new(m),
                    retain: false,
                    subscription_ids: Vec::new(),
                    shared: None,
                    queue: None,
                };
                self.deliver(sid, p, crate::queue_full::Promise::Unacked, now, out);
            }
        }
    }
}

/// How a failed attempt's outcome is given to `fail_lease`.
enum RetryOr {
    Known(Retry),
    Delay(Option<u64>),
}

fn q_lease_seq(b: &Broker, name: &str, id: u64) -> Option<u64> {
    b.queues.by_name.get(name)?.lease_of(id).map(|l| l.seq)
}

/// What a message counts for against `max_bytes`: its topic and payload.
fn entry_size(m: &Message) -> u32 {
    u32::try_from(m.topic.len() + m.payload.len()).unwrap_or(u32::MAX)
}

/// A dead letter as published on `$dlq/{queue}`: the original payload and properties, with
/// user properties saying where it came from and why it is there.
fn dlq_message(v: &DeadLetterView, now: Time) -> Message {
    let m = &v.message;
    let mut props = m.properties.clone();
    props.message_expiry_interval = None;
    let d = &v.dead;
    // Ours, not a publisher's: any it sent under these names are dropped.
    const OURS: [&str; 8] = [
        "x-dead-letter-id",
        "x-original-topic",
        "x-cause",
        "x-attempts",
        "x-first-enqueued-ms",
        "x-dead-lettered-ms",
        "x-last-reason",
        "x-last-reason-code",
    ];
    props
        .user_properties
        .retain(|(k, _)| !OURS.contains(&k.as_str()));
    let mut add = |k: &str, val: String| props.user_properties.push((k.into(), val));
    add("x-dead-letter-id", d.entry.id.to_string());
    add("x-original-topic", m.topic.to_string());
    add("x-cause", d.cause.as_str().into());
    add("x-attempts", d.entry.attempts.to_string());
    add("x-first-enqueued-ms", d.entry.first_enqueued.0.to_string());
    add("x-dead-lettered-ms", d.dead_lettered.0.to_string());
    if let Some(f) = d.failures.last() {
        add("x-last-reason", f.reason.to_string());
        add("x-last-reason-code", f.reason_code.to_string());
    }
    Message {
        topic: format!("$dlq/{}", v.queue).into(),
        payload: m.payload.clone(),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: props,
        expires_at: None,
        publisher: None,
        received_at: now,
        id: 0,
        journaled: Default::default(),
    }
}
