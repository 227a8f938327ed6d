//! The work-queue test harness shared by `workqueue.rs` and `review_workqueue.rs`: a broker
//! on a virtual clock with its journal kept as the log (records by offset, also the
//! payload store), MQTT clients as packets, and restarts and checkpoints from that log.

#![allow(dead_code, clippy::unwrap_used)]

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use ferrymq_core::queues::DeadLetterQuery;
use ferrymq_core::workqueue::*;
use ferrymq_core::*;
use ferrymq_mqtt::*;

pub const V5: ProtocolVersion = ProtocolVersion::V5;
pub const V3: ProtocolVersion = ProtocolVersion::V311;
pub const START: u64 = 1_000_000;

pub struct H {
    pub b: Broker,
    pub now: Time,
    pub out: Outbox,
    /// Every record written, by log offset (the engine numbers them from 0).
    pub log: Log,
    /// Where replay starts (the last checkpoint's first record).
    pub replay_from: usize,
    /// Queue snapshots written, by id (the driver's files beside the log).
    pub snapshots: std::collections::HashMap<u64, Vec<Bytes>>,
    /// The last checkpoint's snapshot, not written yet (the driver writes it on another
    /// thread while the engine goes on), and where that checkpoint begins.
    pub unwritten: Option<(QueueSnapshot, usize)>,
    /// The floor the last written snapshot found.
    pub snapshot_floor: Option<u64>,
}

pub type Log = Arc<Mutex<Vec<Vec<u8>>>>;

/// The log as the engine's payload store: a record by its offset.
pub struct LogStore(Log);

thread_local! {
    /// Reads of the payload store by the engine on this test's thread.
    static READS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

pub fn reads() -> u64 {
    READS.with(|r| r.get())
}

impl ferrymq_core::queues::PayloadStore for LogStore {
    fn read(&self, offset: u64) -> Option<Bytes> {
        READS.with(|r| r.set(r.get() + 1));
        let log = self.0.lock().unwrap();
        log.get(offset as usize).map(|r| Bytes::copy_from_slice(r))
    }
}

/// One delivery to a consumer.
#[derive(Debug, Clone)]
pub struct Got {
    pub payload: String,
    pub topic: String,
    pub pid: Option<u16>,
    pub attempt: Option<String>,
    pub first_enqueued: Option<String>,
}

impl H {
    pub fn new() -> H {
        H::with_config(BrokerConfig::default())
    }

    pub fn with_config(config: BrokerConfig) -> H {
        let mut b = Broker::new(config);
        b.set_instance_id(7);
        let log: Log = Arc::default();
        b.set_payload_store(Box::new(LogStore(log.clone())));
        let mut out = Outbox::default();
        b.enable_journal(&mut out);
        H {
            b,
            now: Time(START),
            out,
            log,
            replay_from: 0,
            snapshots: Default::default(),
            unwritten: None,
            snapshot_floor: None,
        }
    }

    /// Appends what the engine journaled to the log, and tells it so.
    pub fn flush(&mut self) {
        let mut log = self.log.lock().unwrap();
        log.extend(self.out.journal.records().map(|r| r.to_vec()));
        self.out.journal.clear();
        let end = log.len() as u64;
        drop(log);
        assert_eq!(
            self.b.journal_next_offset(),
            Some(end),
            "the engine numbers records as the log does"
        );
        self.b.journal_written(end);
    }

    pub fn declare(&mut self, def: QueueDef) {
        self.b.declare_queue(def, self.now, &mut self.out).unwrap();
    }

    pub fn connect(&mut self, conn: u64, id: &str, v: ProtocolVersion, window: u16, durable: bool) {
        let mut properties = Properties::default();
        if v == V5 {
            properties.session_expiry_interval = Some(if durable { 3600 } else { 0 });
            properties.receive_maximum = Some(window);
        }
        let c = Connect {
            version: v,
            client_id: id.into(),
            clean_start: !durable,
            keep_alive: 0,
            username: None,
            password: None,
            will: None,
            properties,
        };
        assert!(
            self.b
                .connect(ConnId(conn), c, self.now, &mut self.out)
                .accepted
        );
    }

    pub fn packet(&mut self, conn: u64, p: Packet) {
        self.b.packet(ConnId(conn), p, self.now, &mut self.out);
    }

    pub fn subscribe(&mut self, conn: u64, filter: &str, qos: QoS) -> ReasonCode {
        let options = SubscriptionOptions {
            qos,
            ..Default::default()
        };
        self.packet(
            conn,
            Packet::Subscribe(Subscribe {
                packet_id: 1,
                filters: vec![(filter.into(), options)],
                properties: Properties::default(),
            }),
        );
        // Takes the SUBACK, leaving what was delivered after it.
        let at = self
            .out
            .actions
            .iter()
            .position(|(c, a)| *c == ConnId(conn) && matches!(a, Action::Send(Packet::SubAck(_))))
            .unwrap();
        match self.out.actions.remove(at).1 {
            Action::Send(Packet::SubAck(s)) => s.reasons[0],
            _ => unreachable!(),
        }
    }

    pub fn publish_with(&mut self, conn: u64, topic: &str, payload: &str, user: &[(&str, &str)]) {
        self.publish_full(conn, topic, payload, user, None);
    }

    pub fn publish_full(
        &mut self,
        conn: u64,
        topic: &str,
        payload: &str,
        user: &[(&str, &str)],
        expiry: Option<u32>,
    ) {
        let mut properties = Properties::default();
        for (k, v) in user {
            properties
                .user_properties
                .push((k.to_string(), v.to_string()));
        }
        properties.message_expiry_interval = expiry;
        let p = Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: topic.into(),
            packet_id: Some(1),
            properties,
            payload: Bytes::from(payload.to_string()),
        };
        self.packet(conn, Packet::Publish(p));
    }

    pub fn publish(&mut self, conn: u64, topic: &str, payload: &str) {
        self.publish_with(conn, topic, payload, &[]);
    }

    pub fn tick_to(&mut self, t: u64) {
        self.now = Time(START + t);
        self.b.tick(self.now, &mut self.out);
    }

    pub fn take(&mut self, conn: u64) -> Vec<Action> {
        let (mine, rest): (Vec<_>, Vec<_>) = self
            .out
            .actions
            .drain(..)
            .partition(|(c, _)| *c == ConnId(conn));
        self.out.actions = rest;
        mine.into_iter().map(|(_, a)| a).collect()
    }

    pub fn got(&mut self, conn: u64) -> Vec<Got> {
        self.take(conn)
            .into_iter()
            .filter_map(|a| match a {
                Action::Deliver(d) => {
                    let props = d.properties();
                    let user = |k: &str| {
                        props
                            .user_properties
                            .iter()
                            .find(|(n, _)| n == k)
                            .map(|(_, v)| v.clone())
                    };
                    Some(Got {
                        payload: String::from_utf8(d.message.payload.to_vec()).unwrap(),
                        topic: d.message.topic.to_string(),
                        pid: d.packet_id,
                        attempt: user("x-attempt"),
                        first_enqueued: user("x-first-enqueued-ms"),
                    })
                }
                _ => None,
            })
            .collect()
    }

    pub fn payloads(&mut self, conn: u64) -> Vec<String> {
        self.got(conn).into_iter().map(|g| g.payload).collect()
    }

    /// The PUBACK/PUBREC reasons a publisher got.
    pub fn acks(&mut self, conn: u64) -> Vec<ReasonCode> {
        self.take(conn)
            .into_iter()
            .filter_map(|a| match a {
                Action::Send(Packet::PubAck(r) | Packet::PubRec(r)) => Some(r.reason),
                _ => None,
            })
            .collect()
    }

    pub fn ack(&mut self, conn: u64, pid: u16) {
        self.packet(conn, Packet::PubAck(PubResp::new(pid, ReasonCode::Success)));
    }

    pub fn nack(
        &mut self,
        conn: u64,
        pid: u16,
        code: ReasonCode,
        reason: &str,
        retry_ms: Option<u64>,
    ) {
        let mut r = PubResp::new(pid, code);
        r.properties.reason_string = Some(reason.into());
        if let Some(ms) = retry_ms {
            r.properties
                .user_properties
                .push(("retry-after-ms".into(), ms.to_string()));
        }
        self.packet(conn, Packet::PubAck(r));
    }

    pub fn view(&self, name: &str) -> ferrymq_core::queues::QueueView {
        self.b.queue_view(name, self.now).unwrap()
    }

    pub fn dead(&mut self, name: &str) -> Vec<ferrymq_core::queues::DeadLetterView> {
        // Dead letters are read back from the log: what was journaled must be in it.
        self.flush();
        self.b
            .dead_letters(name, &DeadLetterQuery::default())
            .unwrap()
            .items
    }

    /// Crash (all connections gone) and restart from the journal alone.
    pub fn restart(&mut self) -> RestoreReport {
        self.write_snapshot();
        self.restart_as_is()
    }

    /// A crash before the last checkpoint's snapshot was written: replay starts where it
    /// started before that checkpoint (nothing was reclaimed), and the checkpoint is void.
    pub fn restart_losing_snapshot(&mut self) -> RestoreReport {
        self.unwritten = None;
        self.restart_as_is()
    }

    fn restart_as_is(&mut self) -> RestoreReport {
        self.flush();
        let mut b = Broker::new(self.b.config().clone());
        b.set_instance_id(8);
        b.set_payload_store(Box::new(LogStore(self.log.clone())));
        let records: Vec<Vec<u8>> = self.log.lock().unwrap()[self.replay_from..].to_vec();
        let snapshots = &self.snapshots;
        let report = b
            .restore_with(records.iter().map(|r| r.as_slice()), self.now, &mut |id| {
                snapshots
                    .get(&id)
                    .cloned()
                    .ok_or_else(|| format!("no snapshot {id}"))
            })
            .unwrap();
        assert_eq!(report.skipped, 0, "every record applied: {report:?}");
        b.set_journal_base(self.log.lock().unwrap().len() as u64);
        self.b = b;
        self.out = Outbox::default();
        self.b.enable_journal(&mut self.out);
        self.flush();
        report
    }

    /// Writes a checkpoint as the server does: the queues' entries as a snapshot, written
    /// later (at the next checkpoint or restart, or [`H::write_snapshot`]), after whatever
    /// the test does next has changed the queues. Replay starts at the checkpoint once its
    /// snapshot is written.
    pub fn checkpoint(&mut self) {
        self.write_snapshot();
        self.flush();
        let begin = self.log.lock().unwrap().len();
        let (_, snapshot) = self
            .b
            .checkpoint_in_chunks(&mut self.out, usize::MAX, &mut |_| {})
            .unwrap();
        self.flush();
        match snapshot {
            Some(s) => {
                assert_eq!(
                    s.id(),
                    begin as u64,
                    "a snapshot is named by its checkpoint"
                );
                self.unwritten = Some((s, begin));
            }
            None => self.replay_from = begin,
        }
    }

    /// A checkpoint with the queues' entries in the log.
    pub fn inline_checkpoint(&mut self) {
        self.write_snapshot();
        self.flush();
        self.replay_from = self.log.lock().unwrap().len();
        self.b.checkpoint(&mut self.out).unwrap();
        self.flush();
    }

    /// Writes the last checkpoint's snapshot (as the driver's thread does); replay starts at
    /// that checkpoint from now on.
    pub fn write_snapshot(&mut self) {
        let Some((s, begin)) = self.unwritten.take() else {
            return;
        };
        let mut records = Vec::new();
        self.snapshot_floor = s.write(1 << 16, &mut |buf| {
            records.extend(buf.records().map(Bytes::copy_from_slice));
            buf.clear();
        });
        self.snapshots.insert(s.id(), records);
        self.replay_from = begin;
    }
}

pub fn jobs(f: impl FnOnce(&mut QueueDef)) -> QueueDef {
    let mut def = QueueDef::new("jobs", "jobs/#");
    f(&mut def);
    def
}

/// Queue `jobs`, consumer "c" (conn 1, MQTT 5, window 10) on `$queue/jobs`, publisher "p"
/// (conn 2).
pub fn setup(f: impl FnOnce(&mut QueueDef)) -> H {
    let mut h = H::new();
    h.declare(jobs(f));
    h.connect(1, "c", V5, 10, true);
    assert_eq!(
        h.subscribe(1, "$queue/jobs", QoS::AtLeastOnce),
        ReasonCode::GrantedQoS1
    );
    h.connect(2, "p", V5, 10, false);
    h
}
