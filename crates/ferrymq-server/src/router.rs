//! The router: owns the engine, takes batches from connection tasks, hands actions back.
//!
//! One thread (`ferrymq-router`, see `spawn_router` in `lib.rs`) owns the [`Broker`], so the
//! engine needs no locks. Connection tasks send whole read
//! batches ([`ToRouter::Packets`]); the router drains everything waiting, runs it through the
//! engine, appends the resulting actions to each connection's [`Outbound`] queue, and wakes
//! each touched connection once per batch.

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ferrymq_core::{Action, Broker, ConnId, ConnectOutcome, Message, Outbox, Time};
use ferrymq_mqtt::{Connect, Packet, QoS, ReasonCode};
use tokio::sync::{mpsc, oneshot};

use crate::alarms::{AlarmState, Alarms};
use crate::config::SlowConsumer;
use crate::metrics::{EngineSnapshot, NetMetrics};
use crate::persist::Persistence;
use crate::resources::Overload;
use crate::violations::ViolationLog;

/// Messages from connection tasks (and the admin side) to the router.
pub(crate) enum ToRouter {
    Connect {
        conn: ConnId,
        connect: Box<Connect>,
        outbound: Arc<Outbound>,
        reply: oneshot::Sender<ConnectOutcome>,
    },
    Packets {
        conn: ConnId,
        packets: Vec<Packet>,
        /// Holds the batch's bytes against its connection's bound until the router, done with
        /// it, drops it.
        _unrouted: Unrouted,
    },
    /// The peer went away, or the writer failed.
    Closed {
        conn: ConnId,
    },
    /// The connection broke a rule the network layer detects (malformed packet, keep alive).
    Violation {
        conn: ConnId,
        reason: ReasonCode,
    },
    Snapshot(oneshot::Sender<EngineSnapshot>),
    Shutdown(oneshot::Sender<()>),
    /// Test hook, in debug builds only: the router panics, as a broken engine invariant would.
    /// Sent only by [`crate::Server::panic_router`]; nothing on the network can send it.
    #[cfg(debug_assertions)]
    Panic,
}

/// A connection's outbound queue: the router appends, the writer takes everything at once.
/// The writer's waker sits in the queue under the same lock (no separate `Notify`, whose
/// waiter would add ~100 bytes to every idle connection's future).
#[derive(Debug, Default)]
pub(crate) struct Outbound {
    queue: Mutex<OutQueue>,
    /// When the reader last received bytes ([`clock_ms`]), for the router's keep-alive check.
    last_read: std::sync::atomic::AtomicU64,
    /// Silence (ms) after which the router closes the connection, 1.5 times its keep alive
    /// (MQTT-3.1.2-22); 0 = no keep alive. Set by the router at CONNECT.
    keep_alive_ms: std::sync::atomic::AtomicU64,
}

/// Milliseconds on a process-wide monotonic clock, shared by readers and the router.
pub(crate) fn clock_ms() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

/// How often the router looks for connections silent past their keep alive: a timeout
/// fires at most this late.
const KEEP_ALIVE_CHECK: Duration = Duration::from_millis(250);

#[derive(Debug, Default)]
struct OutQueue {
    actions: Vec<Action>,
    /// Estimated bytes held by `actions` ([`queued_size`]): every action counts, acks and
    /// PINGRESPs as much as deliveries.
    bytes: usize,
    /// Estimated bytes of the batch the writer took last and may still be writing. The writer
    /// takes again only when that write is done, so the next take clears it.
    writing: usize,
    /// The writer, parked until there is something to take; or the reader, paused until the
    /// queue drains (both run in the connection's one task, so they share one waker).
    waker: Option<std::task::Waker>,
    /// A wake since the writer last looked: its next wait returns at once, so no wake is
    /// lost even if it came before the writer parked.
    woken: bool,
    /// The reader is paused ([`Outbound::poll_read_allowed`]): a drain wakes it to look again.
    read_paused: bool,
    /// Estimated bytes of input the reader handed to the router that the router has not run
    /// yet ([`Unrouted`]).
    unrouted: usize,
}

/// Most input (estimated bytes: what was read plus the decoded packets) one connection may have
/// waiting for the router before its reader stops. Without it a reader outrunning the router
/// fills the router's queue (4,096 batches of up to 64 KiB of input and their packets) with
/// one client's publishes: memory, and latency for every other client. 1 MiB is several full
/// read batches of small publishes, enough to keep the router busy with one connection.
const MAX_UNROUTED: usize = 1024 * 1024;

/// Input read from a connection and handed to the router: counted against the connection's
/// [`MAX_UNROUTED`] until the router has run it and drops this.
pub(crate) struct Unrouted {
    outbound: Arc<Outbound>,
    bytes: usize,
}

impl Drop for Unrouted {
    fn drop(&mut self) {
        let waker = {
            let mut q = self.outbound.lock();
            q.unrouted = q.unrouted.saturating_sub(self.bytes);
            if q.read_paused && q.unrouted <= MAX_UNROUTED / 2 {
                q.waker.take()
            } else {
                None
            }
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

/// Estimated bytes one queued action holds: its slot in the queue plus what it will encode to
/// (for a delivery, the shared message's topic and payload, which the writer copies into its
/// buffer). Cheap on purpose: the packets sent most (acks, PINGRESP) are a constant, and
/// only rare ones (CONNACK, SUBACK, DISCONNECT, ...) are measured.
fn queued_size(action: &Action) -> usize {
    const SLOT: usize = std::mem::size_of::<Action>();
    match action {
        Action::Deliver(d) => {
            SLOT + d.message.payload.len() + d.message.topic.len() + 4 * d.subscription_ids.len()
        }
        Action::Send(
            Packet::PubAck(_)
            | Packet::PubRec(_)
            | Packet::PubRel(_)
            | Packet::PubComp(_)
            | Packet::PingResp,
        )
        | Action::Close => SLOT,
        Action::Send(p) => SLOT + ferrymq_mqtt::encoded_len(p, ferrymq_mqtt::ProtocolVersion::V5),
    }
}

impl Outbound {
    /// Takes every queued action. Called by the writer once its previous batch is written,
    /// so what it took before no longer counts; wakes a paused reader to look again.
    pub(crate) fn take(&self, into: &mut Vec<Action>) {
        let waker = {
            let mut q = self.lock();
            if !q.actions.is_empty() {
                std::mem::swap(&mut q.actions, into);
            }
            q.writing = std::mem::take(&mut q.bytes);
            if q.read_paused {
                q.waker.take()
            } else {
                None
            }
        };
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Ready when the reader may read: the queue (with the batch being written) is below
    /// `high` bytes, or, once it was over, has drained to `high / 2`; and less than
    /// [`MAX_UNROUTED`] of its input waits for the router. Until then the reader does not
    /// read, so the socket's receive window closes and TCP holds the client back: what a
    /// client that does not read its acks, or sends faster than we route, can make us hold
    /// stays bounded.
    ///
    /// Only the reader waits here; the router never blocks on a connection (it appends and
    /// wakes). The one gate for pausing a reader: another reason to pause one (say, a
    /// publisher feeding a full subscriber) belongs here too.
    pub(crate) fn poll_read_allowed(
        &self,
        cx: &mut std::task::Context<'_>,
        high: usize,
    ) -> std::task::Poll<()> {
        let mut q = self.lock();
        let queued = q.bytes + q.writing;
        let limit = if q.read_paused { high / 2 + 1 } else { high };
        if queued < limit && q.unrouted < MAX_UNROUTED {
            q.read_paused = false;
            return std::task::Poll::Ready(());
        }
        q.read_paused = true;
        // The client's silence is ours while we do not read it: keep alive counts from the
        // last drain that let us look (a client whose writes stall is the write timeout's).
        self.mark_read();
        match &q.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => q.waker = Some(cx.waker().clone()),
        }
        std::task::Poll::Pending
    }

    /// Resolves once actions are queued (or the router woke the writer) since the last take.
    pub(crate) async fn wait(&self) {
        std::future::poll_fn(|cx| {
            let mut q = self.lock();
            if !q.actions.is_empty() || std::mem::take(&mut q.woken) {
                return std::task::Poll::Ready(());
            }
            match &q.waker {
                Some(w) if w.will_wake(cx.waker()) => {}
                _ => q.waker = Some(cx.waker().clone()),
            }
            std::task::Poll::Pending
        })
        .await
    }

    /// Counts `bytes` (estimated) of input on their way to the router, until the returned
    /// guard, sent along with them, is dropped.
    pub(crate) fn unrouted(self: &Arc<Self>, bytes: usize) -> Unrouted {
        self.lock().unrouted += bytes;
        Unrouted {
            outbound: self.clone(),
            bytes,
        }
    }

    /// Records that the reader received bytes (for keep alive, which MQTT measures on what the
    /// client sends; a client that sends but never reads is caught by the write timeout).
    pub(crate) fn mark_read(&self) {
        self.last_read.store(clock_ms(), Relaxed);
    }

    /// Wakes the writer.
    pub(crate) fn wake(&self) {
        let waker = {
            let mut q = self.lock();
            q.woken = true;
            q.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, OutQueue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl OutQueue {
    /// Appends an action and counts its bytes. A QoS 0 delivery to a connection with `limit`
    /// bytes already queued is refused (returns false): a slow reader must not grow our
    /// memory. Everything else is queued: the engine bounds deliveries of QoS 1/2 (receive
    /// window, pending queue), and the connection's reader stops reading while its queue is
    /// over the limit, which bounds the replies to what it reads.
    fn push(&mut self, action: Action, limit: usize) -> bool {
        if let Action::Deliver(d) = &action {
            if d.qos == QoS::AtMostOnce && self.bytes >= limit {
                return false;
            }
        }
        self.bytes += queued_size(&action);
        self.actions.push(action);
        true
    }
}

pub(crate) struct RouterSettings {
    pub max_outbound_bytes: usize,
    pub slow_consumer: SlowConsumer,
    pub sys_interval: Duration,
    /// Wall-clock milliseconds at `started`: engine time is wall-clock based so that times
    /// in the journal (expiry, will delays) mean the same after a restart.
    pub epoch_ms: u64,
}

pub(crate) struct Router {
    broker: Broker,
    conns: HashMap<ConnId, Arc<Outbound>>,
    net: Arc<NetMetrics>,
    settings: RouterSettings,
    started: Instant,
    out: Outbox,
    touched: Vec<ConnId>,
    /// Connections closed in the current dispatch, kept until their last wake-up.
    closing: HashMap<ConnId, Arc<Outbound>>,
    persist: Option<Persistence>,
    next_keep_alive_check: Instant,
    /// The rate-limited log of connections closed for breaking a rule.
    violations: ViolationLog,
    /// Alarms (issue 10): `self.alarms.raise(AlarmName::SlowSubscriber, "why")` and
    /// `self.alarms.clear(AlarmName::SlowSubscriber)` from anywhere in the router; each change
    /// is published on `$SYS/broker/alarms/{name}` by the end of the step.
    pub(crate) alarms: Alarms,
    /// Memory and disk checks, which decide the engine's admission.
    overload: Overload,
}

impl Router {
    pub(crate) fn new(
        broker: Broker,
        net: Arc<NetMetrics>,
        settings: RouterSettings,
        persist: Option<Persistence>,
        overload: Overload,
    ) -> Router {
        Router {
            alarms: overload.alarms().clone(),
            overload,
            persist,
            next_keep_alive_check: Instant::now(),
            violations: ViolationLog::new(Instant::now()),
            broker,
            conns: HashMap::new(),
            net,
            settings,
            started: Instant::now(),
            out: Outbox::default(),
            touched: Vec::new(),
            closing: HashMap::new(),
        }
    }

    fn now(&self) -> Time {
        Time(self.settings.epoch_ms + self.started.elapsed().as_millis() as u64)
    }

    /// Runs until a `Shutdown` arrives or every sender is gone (`Ok`), or until the log fails
    /// (`Err` with the reason; every client has been disconnected by then).
    ///
    /// Runs on its own thread (see `spawn_router` in `lib.rs`): the log writes, checkpoints
    /// and fsyncs here are blocking work that must not hold a tokio worker.
    pub(crate) async fn run(mut self, mut rx: mpsc::Receiver<ToRouter>) -> Result<(), String> {
        let mut batch = Vec::with_capacity(256);
        let mut next_sys = Instant::now();
        let durable = self.persist.as_ref().map(|p| p.durable.clone());
        loop {
            let deadline = self.next_wakeup(next_sys);
            let stored = async {
                match &durable {
                    Some(d) => d.notify.notified().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                n = rx.recv_many(&mut batch, 256) => {
                    if n == 0 {
                        return Ok(());
                    }
                }
                _ = stored => {}
                _ = tokio::time::sleep_until(deadline.into()) => {}
            }
            let now = self.now();
            // Before the batch: what it brings is admitted under the latest measurements.
            if let Err(e) = self.check_resources(now) {
                return self.storage_failed(e, now);
            }
            let mut shutdown = None;
            for msg in batch.drain(..) {
                match msg {
                    ToRouter::Shutdown(done) => shutdown = Some(done),
                    other => self.handle(other, now),
                }
            }
            self.broker.tick(now, &mut self.out);
            if Instant::now() >= self.next_keep_alive_check {
                self.check_keep_alive(now);
                self.next_keep_alive_check = Instant::now() + KEEP_ALIVE_CHECK;
            }
            if !self.settings.sys_interval.is_zero() && Instant::now() >= next_sys {
                self.publish_sys(now);
                next_sys = Instant::now() + self.settings.sys_interval;
            }
            self.violations.summarize(&self.net, Instant::now());
            if let Some(done) = shutdown {
                self.broker.shutdown(now, &mut self.out);
                if let Some(mut p) = self.persist.take() {
                    p.after_step(&mut self.broker, &mut self.out);
                    p.finish(&mut self.out);
                }
                self.dispatch();
                let _ = done.send(());
                return Ok(());
            }
            if let Err(e) = self.store() {
                return self.storage_failed(e, now);
            }
            self.dispatch();
        }
    }

    /// The log failed other than for space: nothing more can be acknowledged.
    fn storage_failed(&mut self, e: String, now: Time) -> Result<(), String> {
        tracing::error!(error = %e, "storage failed; disconnecting everyone and stopping so that nothing unstored is acknowledged");
        self.persist = None;
        self.out.actions.clear();
        self.broker.shutdown(now, &mut self.out);
        self.out.journal.clear();
        self.dispatch();
        Err(e)
    }

    /// Memory and disk checks (when due): sets the engine's admission, and publishes every
    /// alarm change since the last step, retained, on `$SYS/broker/alarms/{name}`.
    fn check_resources(&mut self, now: Time) -> Result<(), String> {
        let admission = self.overload.check(self.persist.as_mut(), &self.broker)?;
        if admission != self.broker.admission() {
            self.broker.set_admission(admission);
        }
        for alarm in self.alarms.drain_changes() {
            self.publish_alarm(&alarm, now);
        }
        Ok(())
    }

    fn publish_alarm(&mut self, alarm: &AlarmState, now: Time) {
        let mut m = Message::new(&alarm.topic(), Bytes::from(alarm.to_json()), now);
        m.retain = true;
        self.broker.publish(m, now, &mut self.out);
    }

    /// Hands this step's journal records to the log and holds back what must wait for them;
    /// puts back into `out` every held action that is now durable, oldest first.
    fn store(&mut self) -> Result<(), String> {
        let Some(p) = self.persist.as_mut() else {
            return Ok(());
        };
        p.after_step(&mut self.broker, &mut self.out);
        p.release(&mut self.out)
    }

    fn next_wakeup(&self, next_sys: Instant) -> Instant {
        if self.alarms.has_changes() {
            // Raised or cleared after this step's `check_resources`: publish them now.
            return Instant::now();
        }
        let mut at = Instant::now() + Duration::from_secs(1);
        if !self.settings.sys_interval.is_zero() {
            at = at.min(next_sys);
        }
        if let Some(t) = self.broker.next_deadline() {
            let wait = Duration::from_millis(t.0.saturating_sub(self.now().0));
            at = at.min(Instant::now() + wait);
        }
        if !self.conns.is_empty() {
            at = at.min(self.next_keep_alive_check);
        }
        if let Some(due) = self.overload.next_due() {
            at = at.min(due);
        }
        at
    }

    /// Closes every connection silent for longer than 1.5 times its keep alive (5.0 clients
    /// get DISCONNECT 0x8D).
    fn check_keep_alive(&mut self, now: Time) {
        let t = clock_ms();
        let expired: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, o)| {
                let limit = o.keep_alive_ms.load(Relaxed);
                limit > 0 && t.saturating_sub(o.last_read.load(Relaxed)) > limit
            })
            .map(|(conn, _)| *conn)
            .collect();
        for conn in expired {
            if let Some(o) = self.conns.get(&conn) {
                // Once: the connection is closing.
                o.keep_alive_ms.store(0, Relaxed);
            }
            // Counted (by reason) and logged at debug in `dispatch`, like every violation:
            // a line per connection would let clients fill the disk.
            self.broker
                .kill(conn, Some(ReasonCode::KeepAliveTimeout), now, &mut self.out);
        }
    }

    fn handle(&mut self, msg: ToRouter, now: Time) {
        match msg {
            ToRouter::Connect {
                conn,
                connect,
                outbound,
                reply,
            } => {
                let outcome = self.broker.connect(conn, *connect, now, &mut self.out);
                if outcome.accepted {
                    let limit = u64::from(outcome.keep_alive) * 1500;
                    outbound.keep_alive_ms.store(limit, Relaxed);
                }
                self.conns.insert(conn, outbound);
                let _ = reply.send(outcome);
            }
            ToRouter::Packets { conn, packets, .. } => {
                for p in packets {
                    self.broker.packet(conn, p, now, &mut self.out);
                }
            }
            ToRouter::Closed { conn } => {
                self.conns.remove(&conn);
                self.broker.closed(conn, now, &mut self.out);
            }
            ToRouter::Violation { conn, reason } => {
                self.broker.kill(conn, Some(reason), now, &mut self.out);
            }
            ToRouter::Snapshot(reply) => {
                let _ = reply.send(EngineSnapshot {
                    stats: self.broker.stats().clone(),
                    connections: self.broker.connection_count(),
                    sessions: self.broker.session_count(),
                    subscriptions: self.broker.subscription_count(),
                    retained: self.broker.retained_count(),
                    storage_disk_bytes: self.persist.as_ref().map_or(0, |p| p.disk_bytes()),
                    storage_held_actions: self.persist.as_ref().map_or(0, |p| p.held_actions()),
                    storage_blocked: self.persist.as_ref().is_some_and(|p| p.is_blocked()),
                });
            }
            ToRouter::Shutdown(_) => unreachable!("handled by run"),
            #[cfg(debug_assertions)]
            ToRouter::Panic => panic!("router panic injected by a test"),
        }
    }

    /// Appends every action to its connection's queue, then wakes each connection once.
    fn dispatch(&mut self) {
        for (conn, reason) in self.out.violations.drain(..) {
            self.net.disconnects.add(reason);
            tracing::debug!(conn = conn.0, ?reason, "closing connection: rule broken");
        }
        let limit = self.settings.max_outbound_bytes;
        let mut actions = std::mem::take(&mut self.out.actions);
        let mut slow: Vec<ConnId> = Vec::new();
        let mut run = actions.drain(..).peekable();
        // Consecutive actions for one connection go in under one lock.
        while let Some((conn, first)) = run.next() {
            let Some(outbound) = self.conns.get(&conn).cloned() else {
                while run.next_if(|(c, _)| *c == conn).is_some() {}
                continue;
            };
            let mut closing = false;
            let mut dropped = 0;
            {
                let mut q = outbound.lock();
                let rest = std::iter::from_fn(|| run.next_if(|(c, _)| *c == conn).map(|(_, a)| a));
                for action in std::iter::once(first).chain(rest) {
                    closing |= matches!(action, Action::Close);
                    if !q.push(action, limit) {
                        dropped += 1;
                    }
                }
            }
            self.touched.push(conn);
            if dropped > 0 {
                NetMetrics::add(&self.net.dropped_slow_consumer, dropped);
                if self.settings.slow_consumer == SlowConsumer::Disconnect && !slow.contains(&conn)
                {
                    slow.push(conn);
                }
            }
            if closing {
                // The writer closes after flushing; the engine has already forgotten it.
                if let Some(o) = self.conns.remove(&conn) {
                    self.closing.insert(conn, o);
                }
            }
        }
        drop(run);
        self.out.actions = actions;
        self.touched.sort_unstable();
        self.touched.dedup();
        for conn in self.touched.drain(..) {
            // Closed connections are gone from `conns` but still need their final wake-up;
            // `closed` keeps their handles until then.
            if let Some(o) = self.conns.get(&conn).or_else(|| self.closing.get(&conn)) {
                o.wake();
            }
        }
        self.closing.clear();
        if !slow.is_empty() {
            let now = self.now();
            for conn in slow {
                // Counted and summarized as a QuotaExceeded close (see `dispatch`).
                tracing::debug!(conn = conn.0, "disconnecting slow consumer");
                self.broker
                    .kill(conn, Some(ReasonCode::QuotaExceeded), now, &mut self.out);
            }
            self.dispatch();
        }
    }

    /// Publishes the `$SYS/broker/...` topics as retained messages.
    fn publish_sys(&mut self, now: Time) {
        let s = self.broker.stats().clone();
        let n = &self.net;
        let topics: [(&str, String); 11] = [
            (
                "$SYS/broker/version",
                format!("ferrymq {}", env!("CARGO_PKG_VERSION")),
            ),
            (
                "$SYS/broker/uptime",
                format!("{} seconds", self.started.elapsed().as_secs()),
            ),
            (
                "$SYS/broker/clients/connected",
                self.broker.connection_count().to_string(),
            ),
            (
                "$SYS/broker/clients/total",
                self.broker.session_count().to_string(),
            ),
            (
                "$SYS/broker/messages/received",
                s.messages_received.iter().sum::<u64>().to_string(),
            ),
            (
                "$SYS/broker/messages/sent",
                s.messages_sent.iter().sum::<u64>().to_string(),
            ),
            (
                "$SYS/broker/bytes/received",
                n.bytes_received.load(Relaxed).to_string(),
            ),
            (
                "$SYS/broker/bytes/sent",
                n.bytes_sent.load(Relaxed).to_string(),
            ),
            (
                "$SYS/broker/subscriptions/count",
                self.broker.subscription_count().to_string(),
            ),
            (
                "$SYS/broker/retained messages/count",
                self.broker.retained_count().to_string(),
            ),
            (
                "$SYS/broker/messages/dropped",
                (s.dropped_queue_full
                    + s.dropped_expired
                    + s.dropped_too_large
                    + s.dropped_memory_high
                    + s.dropped_storage_full)
                    .to_string(),
            ),
        ];
        for (topic, value) in topics {
            let mut m = Message::new(topic, Bytes::from(value), now);
            m.retain = true;
            self.broker.publish(m, now, &mut self.out);
        }
    }
}
