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
use ferrymq_core::{Action, Broker, ConnId, ConnectOutcome, Flow, Message, Outbox, Time};
use ferrymq_mqtt::{Connect, Packet, QoS, ReasonCode};
use tokio::sync::{mpsc, oneshot};

use crate::alarms::{AlarmName, AlarmState, Alarms};
use crate::config::SlowConsumer;
use crate::metrics::{EngineSnapshot, NetMetrics};
use crate::persist::Persistence;
use crate::queue_admin::{QueueCommand, QueueResult};
use crate::resources::Overload;
use crate::violations::ViolationLog;

/// Messages from connection tasks (and the admin side) to the router.
pub(crate) enum ToRouter {
    Connect {
        conn: ConnId,
        connect: Box<Connect>,
        /// Who the client authenticated as (`auth.rs`). Boxed: 64 bytes inline would widen
        /// every message on the router's channel, packets included.
        who: Box<ferrymq_core::Identity>,
        /// The peer's address and listener (the REST client view, metrics, logs).
        origin: crate::peers::Origin,
        outbound: Arc<Outbound>,
        reply: oneshot::Sender<ConnectOutcome>,
        /// Its `connect` line, when the audit log is on: recorded here as the engine accepts
        /// it, so that it comes before any line about its end (`audit.rs`).
        audit: Option<Box<crate::audit::Connected>>,
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
    /// `/health` and `/ready` (open to anyone): the router answers, with its connection and
    /// session counts, at a cost that does not grow with the engine's state.
    Alive(oneshot::Sender<(usize, usize)>),
    /// A queue operation from the REST API. It runs like a packet (journaled, its actions
    /// dispatched); the reply goes once its records are stored.
    Queue {
        command: QueueCommand,
        reply: oneshot::Sender<QueueResult>,
    },
    /// A view or admin action from the REST API (`views_api.rs`), answered like a queue
    /// command.
    Admin {
        command: crate::views_api::AdminCommand,
        reply: oneshot::Sender<crate::views_api::AdminReply>,
    },
    /// A configuration reload's part for the router (`reload.rs`); answered once applied.
    Reconfigure(Box<crate::reload::RouterChange>, oneshot::Sender<()>),
    Shutdown(oneshot::Sender<()>),
    /// Test hook, in debug builds only: the router panics, as a broken engine invariant would.
    /// Sent only by [`crate::Server::panic_router`]; nothing on the network can send it.
    #[cfg(debug_assertions)]
    Panic,
}

/// A connection's outbound queue: the router appends, the writer takes everything at once.
/// The writer's waker sits in the queue under the same lock (no separate `Notify`, whose
/// waiter would add ~100 bytes to every idle connection's future).
#[derive(Debug)]
pub(crate) struct Outbound {
    /// Whose queue this is, for the drain report.
    conn: ConnId,
    queue: Mutex<OutQueue>,
    /// Where the writer reports that this queue, once over its high mark, drained.
    drains: Arc<Drains>,
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

/// The client id of a connection, for a log line ("" before its CONNECT was accepted): kept
/// in its outbound queue, which the router holds until the connection's task is gone.
fn client_id_of(
    conns: &HashMap<ConnId, Arc<Outbound>>,
    closing: &HashMap<ConnId, Arc<Outbound>>,
    conn: ConnId,
) -> Arc<str> {
    conns
        .get(&conn)
        .or_else(|| closing.get(&conn))
        .map_or_else(|| Arc::from(""), |o| o.client_id())
}

/// How often the router looks for connections silent past their keep alive: a timeout
/// fires at most this late.
const KEEP_ALIVE_CHECK: Duration = Duration::from_millis(250);
/// A router step this long is logged with where its time went (`Router::run`).
const SLOW_STEP: Duration = Duration::from_millis(50);

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
    /// Set by the router while this connection's queue is over its high mark (its publishers
    /// are held back): once what is queued and being written falls below this many bytes,
    /// the writer reports the drain ([`Drains`]) and clears it. 0 = not congested.
    resume_below: usize,
    /// The router holds this connection's input back (it fed a congested subscriber, or the
    /// engine holds one of its acks): the reader does not read.
    stalled: bool,
    /// The client id, set by the router when the CONNECT is accepted: the connection task's
    /// log lines carry it (here, under the lock it takes anyway, rather than a field of its
    /// own: 16 bytes in every connection instead of 24 or more).
    client_id: Option<Arc<str>>,
}

/// Subscribers whose queues drained below their low mark, reported by their writers, and
/// the router's wake-up for them. A separate path from the router's input queue, which may
/// be full exactly when a drain matters.
#[derive(Debug, Default)]
pub(crate) struct Drains {
    conns: Mutex<Vec<ConnId>>,
    notify: tokio::sync::Notify,
}

impl Drains {
    fn report(&self, conn: ConnId) {
        self.conns
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(conn);
        self.notify.notify_one();
    }

    fn take(&self, into: &mut Vec<ConnId>) {
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        std::mem::swap(&mut *conns, into);
    }
}

/// Most input (estimated bytes: what was read plus the decoded packets) one connection may have
/// waiting for the router before its reader stops. Without it a reader outrunning the router
/// fills the router's queue (4,096 batches of up to 64 KiB of input and their packets) with
/// one client's publishes: memory, and latency for every other client. 256 KiB is a few read
/// batches of small publishes, enough to keep the router busy with one connection (1 MiB
/// measured no faster on the burst benchmarks, and held 35 MB more with 50 publishers).
const MAX_UNROUTED: usize = 256 * 1024;

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
    pub(crate) fn new(conn: ConnId, drains: Arc<Drains>) -> Outbound {
        Outbound {
            conn,
            queue: Mutex::default(),
            drains,
            last_read: Default::default(),
            keep_alive_ms: Default::default(),
        }
    }

    /// Takes every queued action. Called by the writer once its previous batch is written,
    /// so what it took before no longer counts; wakes a paused reader to look again, and
    /// tells the router when a congested queue has drained below its low mark.
    pub(crate) fn take(&self, into: &mut Vec<Action>) {
        let (waker, drained) = {
            let mut q = self.lock();
            if !q.actions.is_empty() {
                std::mem::swap(&mut q.actions, into);
            }
            q.writing = std::mem::take(&mut q.bytes);
            let drained = q.resume_below > 0 && q.writing < q.resume_below;
            if drained {
                q.resume_below = 0;
            }
            let waker = if q.read_paused { q.waker.take() } else { None };
            (waker, drained)
        };
        if drained {
            self.drains.report(self.conn);
        }
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// The client id for a log line ("" before the CONNECT is accepted).
    pub(crate) fn client_id(&self) -> Arc<str> {
        self.lock()
            .client_id
            .clone()
            .unwrap_or_else(|| Arc::from(""))
    }

    /// Bytes queued and being written.
    fn queued(&self) -> usize {
        let q = self.lock();
        q.bytes + q.writing
    }

    /// Holds back (or lets go) this connection's input: while stalled its reader does not
    /// read. Called by the router only.
    fn set_stalled(&self, stalled: bool) {
        let waker = {
            let mut q = self.lock();
            q.stalled = stalled;
            if !stalled && q.read_paused {
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
    /// It also waits while the router holds the connection's input back (`stalled`: it fed a
    /// congested subscriber, or the engine holds one of its acks).
    ///
    /// Only the reader waits here; the router never blocks on a connection (it appends and
    /// wakes). The one gate for pausing a reader.
    pub(crate) fn poll_read_allowed(
        &self,
        cx: &mut std::task::Context<'_>,
        high: usize,
    ) -> std::task::Poll<()> {
        let mut q = self.lock();
        let queued = q.bytes + q.writing;
        let limit = if q.read_paused { high / 2 + 1 } else { high };
        if queued < limit && q.unrouted < MAX_UNROUTED && !q.stalled {
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

pub(crate) struct RouterSettings {
    /// A subscriber's high mark: deliveries that put its queue over it hold back the
    /// publishers that sent them.
    pub max_outbound_bytes: usize,
    pub slow_consumer: SlowConsumer,
    /// How long a subscriber may stay over its high mark before the slow-consumer policy
    /// meets it and it stops holding publishers back.
    pub slow_consumer_grace: Duration,
    pub sys_interval: Duration,
    /// Wall-clock milliseconds at `started`: engine time is wall-clock based so that times
    /// in the journal (expiry, will delays) mean the same after a restart.
    pub epoch_ms: u64,
}

pub(crate) struct Router {
    broker: Broker,
    conns: HashMap<ConnId, Arc<Outbound>>,
    /// Address, listener, protocol and client id of each connection past CONNECT.
    peers: crate::peers::Peers,
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
    /// Publishes the ACL refused (`auth::DenialLog`).
    denials: crate::auth::DenialLog,
    /// Messages that became dead letters or were dropped (`message_log.rs`).
    messages: crate::message_log::MessageLog,
    /// Back-pressure: subscribers over their high mark, and connections whose input waits.
    congested: HashMap<ConnId, Congested>,
    held: HashMap<ConnId, Held>,
    /// Held connections let go, whose waiting input runs at the start of the next step.
    ready: Vec<ConnId>,
    drains: Arc<Drains>,
    drained: Vec<ConnId>,
    /// Connections whose input ran in this step: only they are held back for a congested
    /// subscriber (a retained or stored message replayed to a subscriber is not its
    /// publisher's doing).
    ran: rustc_hash::FxHashSet<ConnId>,
    /// Bytes each subscriber touched in this step has queued plus what the step adds for it
    /// so far (see `feeds_congestion`).
    load: rustc_hash::FxHashMap<ConnId, usize>,
    over: Vec<ConnId>,
    /// Subscribers that held back publishers others wait on, and for how long (see
    /// [`Strikes`]); forgotten with their connection.
    strikes: rustc_hash::FxHashMap<ConnId, Strikes>,
    /// Alarms (issue 10): `self.alarms.raise(AlarmName::SlowSubscriber, "why")` and
    /// `self.alarms.clear(AlarmName::SlowSubscriber)` from anywhere in the router; each change
    /// is published on `$SYS/broker/alarms/{name}` by the end of the step.
    pub(crate) alarms: Alarms,
    /// Memory and disk checks, which decide the engine's admission.
    overload: Overload,
    /// Answers to queue commands, each sent once the records its command made are stored.
    queue_answers: Vec<QueueAnswer>,
    /// When a slow step was last logged (at most one line a second).
    slow_step_logged: Instant,
    /// Where ACL denials are recorded (`audit.rs`; off by default).
    pub(crate) audit: crate::audit::Audit,
    /// A reload changed `sys.interval_secs`: the next update is due now.
    sys_rescheduled: bool,
}

/// The answer to a [`ToRouter::Queue`] or [`ToRouter::Admin`] command, waiting for its
/// records.
struct QueueAnswer {
    /// Sends the answer (the HTTP side may have given up: nothing to do then).
    send: Box<dyn FnOnce() + Send>,
    /// The command made journal records: the answer waits for them.
    wrote: bool,
    /// The persistence ticket that covers them, once the step's records were submitted.
    ticket: Option<u64>,
}

/// A subscriber whose outbound queue went over its high mark.
struct Congested {
    since: Instant,
    /// The publishers held back for it.
    publishers: rustc_hash::FxHashSet<ConnId>,
    /// Over its mark past the grace period: it holds nobody back any more, and the
    /// slow-consumer policy applies to it until it drains.
    slow: bool,
    /// It held back a publisher whose message also went to a subscriber with room: it
    /// slows the others down, so its grace counts across episodes ([`Strikes`]).
    harms_others: bool,
}

impl Congested {
    fn new() -> Congested {
        Congested {
            since: Instant::now(),
            publishers: Default::default(),
            slow: false,
            harms_others: false,
        }
    }
}

/// Time a subscriber held back publishers that others were waiting on, summed over the
/// episodes of one window ([`STRIKE_WINDOW`] grace periods). A subscriber that drains just
/// in time, again and again, would otherwise pace everyone for as long as it likes: its
/// grace is spent across episodes. A subscriber alone on its publishers (the bottleneck of
/// a burst, harming nobody) has its grace per episode.
#[derive(Clone, Copy)]
struct Strikes {
    held: Duration,
    window_start: Instant,
}

/// The window of [`Strikes`], in grace periods.
const STRIKE_WINDOW: u32 = 10;

/// A connection whose input the router does not run now, with that input in order.
#[derive(Default)]
struct Held {
    /// How many congested subscribers it waits for.
    subscribers: u32,
    /// The engine paused it (it holds one of its acks).
    by_engine: bool,
    /// The PUBLISH it was held at went to more than one subscriber: holding it makes others
    /// wait too.
    fans_out: bool,
    input: std::collections::VecDeque<Input>,
}

impl Held {
    fn stalled(&self) -> bool {
        self.subscribers > 0 || self.by_engine
    }
}

/// Packets read from a connection and not yet run, with their guard against its input bound.
struct Input {
    packets: std::vec::IntoIter<Packet>,
    _unrouted: Unrouted,
}

/// How far past its high mark a subscriber's queue may grow while it is within its grace
/// period, before QoS 0 deliveries to it are dropped anyway. Publishers are held back the
/// moment a delivery crosses the mark, so this is only reached by what they had sent before
/// (at most one router step, and `MAX_UNROUTED` of input per publisher): a bound for memory, not a
/// policy.
const GRACE_OVERSHOOT: usize = 4;

/// With a small mark, at least this much past it: what a connection's own input can put in
/// its own queue before its reader pauses (it is never held back for itself): its input in
/// flight ([`MAX_UNROUTED`]), which grows as it becomes deliveries (a queued action is
/// larger than the packet it came from), plus the batch its writer is still writing. 2 MiB
/// measured enough with a 64 KiB mark (review test `a_qos0_burst_to_its_own_subscription_
/// loses_nothing`); 512 KiB lost 0.8%.
const GRACE_INPUT: usize = 2 * 1024 * 1024;

impl Router {
    pub(crate) fn new(
        broker: Broker,
        net: Arc<NetMetrics>,
        settings: RouterSettings,
        persist: Option<Persistence>,
        drains: Arc<Drains>,
        overload: Overload,
    ) -> Router {
        net.delivery.clock.start(settings.epoch_ms);
        Router {
            alarms: overload.alarms().clone(),
            overload,
            persist,
            next_keep_alive_check: Instant::now(),
            violations: ViolationLog::new(Instant::now()),
            denials: crate::auth::DenialLog::new(Instant::now()),
            messages: Default::default(),
            broker,
            conns: HashMap::new(),
            peers: Default::default(),
            net,
            settings,
            started: Instant::now(),
            out: Outbox::default(),
            touched: Vec::new(),
            closing: HashMap::new(),
            congested: HashMap::new(),
            held: HashMap::new(),
            ready: Vec::new(),
            drains,
            drained: Vec::new(),
            ran: Default::default(),
            load: Default::default(),
            over: Vec::new(),
            strikes: Default::default(),
            queue_answers: Vec::new(),
            slow_step_logged: Instant::now(),
            audit: Default::default(),
            sys_rescheduled: false,
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
            let drains = self.drains.clone();
            tokio::select! {
                n = rx.recv_many(&mut batch, 256) => {
                    if n == 0 {
                        return Ok(());
                    }
                }
                _ = stored => {}
                _ = drains.notify.notified() => {}
                _ = tokio::time::sleep_until(deadline.into()) => {}
            }
            let step = Instant::now();
            let now = self.now();
            // Before the batch: what it brings is admitted under the latest measurements.
            if let Err(e) = self.check_resources(now) {
                return self.storage_failed(e, now);
            }
            self.let_drained_go();
            self.check_congestion();
            self.run_ready(now);
            let mut shutdown = None;
            for msg in batch.drain(..) {
                match msg {
                    ToRouter::Shutdown(done) => shutdown = Some(done),
                    other => self.handle(other, now),
                }
            }
            self.broker.tick(now, &mut self.out);
            // Pauses and resumes from timers and closes (input runs apply their own).
            self.apply_flow();
            if Instant::now() >= self.next_keep_alive_check {
                self.check_keep_alive(now);
                self.apply_flow();
                self.next_keep_alive_check = Instant::now() + KEEP_ALIVE_CHECK;
            }
            if std::mem::take(&mut self.sys_rescheduled) {
                next_sys = Instant::now();
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
            let engine = step.elapsed();
            if let Err(e) = self.store() {
                return self.storage_failed(e, now);
            }
            let stored = step.elapsed();
            self.answer_queue_commands();
            self.dispatch();
            let elapsed = step.elapsed();
            let took = elapsed.as_micros() as u64;
            self.net.router_step_max_us.fetch_max(took, Relaxed);
            self.net.router_step.observe_us(took);
            if took > 10_000 {
                self.net.router_steps_over_10ms.fetch_add(1, Relaxed);
            }
            // Where a slow step went (at most one line a second): the engine (packets,
            // timers, queue payloads read back from the log), the log (writes, checkpoints)
            // or handing out what the step made.
            if elapsed >= SLOW_STEP && self.slow_step_logged.elapsed() >= Duration::from_secs(1) {
                self.slow_step_logged = Instant::now();
                tracing::info!(
                    took_ms = elapsed.as_millis() as u64,
                    engine_ms = engine.as_millis() as u64,
                    log_ms = (stored - engine).as_millis() as u64,
                    dispatch_ms = (elapsed - stored).as_millis() as u64,
                    "slow router step"
                );
            }
        }
    }

    /// Sends the answers of queue commands whose records are stored (under the fsync
    /// policy, as a client's PUBACK waits): an answer says the change happened, so it must
    /// survive a crash that follows. Called after [`Router::store`].
    fn answer_queue_commands(&mut self) {
        if self.queue_answers.is_empty() {
            return;
        }
        let (submitted, durable) = self.persist.as_ref().map_or((0, u64::MAX), |p| {
            (p.submitted_ticket(), p.durable_ticket())
        });
        for mut a in std::mem::take(&mut self.queue_answers) {
            if a.wrote && a.ticket.is_none() {
                a.ticket = Some(submitted);
            }
            if a.ticket.is_some_and(|t| t > durable) {
                self.queue_answers.push(a);
            } else {
                // The HTTP side may have given up (its timeout): nothing to do then.
                (a.send)();
            }
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
        let released = p.release(&mut self.out);
        self.broker.journal_written(p.written_end());
        released
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
        if !self.ready.is_empty() {
            at = Instant::now();
        }
        for (conn, c) in self.congested.iter().filter(|(_, c)| !c.slow) {
            at = at.min(c.since + self.grace_left(*conn, c));
        }
        if let Some(due) = self.overload.next_due() {
            at = at.min(due);
        }
        at
    }

    /// How long a congested subscriber may stay so in this episode: the grace period, less
    /// what it already spent in this window holding back publishers others wait on.
    fn grace_left(&self, subscriber: ConnId, c: &Congested) -> Duration {
        let grace = self.settings.slow_consumer_grace;
        if !c.harms_others {
            return grace;
        }
        match self.strikes.get(&subscriber) {
            Some(s) if c.since.duration_since(s.window_start) <= grace * STRIKE_WINDOW => {
                grace.saturating_sub(s.held)
            }
            _ => grace,
        }
    }

    /// Subscribers whose writers reported a drain below the low mark: they hold nobody back
    /// any more.
    fn let_drained_go(&mut self) {
        self.drains.take(&mut self.drained);
        let mut drained = std::mem::take(&mut self.drained);
        for conn in drained.drain(..) {
            self.uncongest(conn);
        }
        self.drained = drained;
    }

    /// Forgets a subscriber's congestion (it drained, or went away) and lets go of the
    /// publishers that waited only for it.
    fn uncongest(&mut self, subscriber: ConnId) {
        let Some(c) = self.congested.remove(&subscriber) else {
            return;
        };
        if c.harms_others && !c.slow && self.conns.contains_key(&subscriber) {
            let now = Instant::now();
            let window = self.settings.slow_consumer_grace * STRIKE_WINDOW;
            let s = self.strikes.entry(subscriber).or_insert(Strikes {
                held: Duration::ZERO,
                window_start: now,
            });
            if now.duration_since(s.window_start) > window {
                *s = Strikes {
                    held: Duration::ZERO,
                    window_start: now,
                };
            }
            s.held += now.duration_since(c.since);
        }
        for publisher in c.publishers {
            self.unhold_for_subscriber(publisher);
        }
        // The alarm is up while any subscriber is slow (it drains, or goes away).
        if c.slow && !self.congested.values().any(|c| c.slow) {
            self.alarms.clear(AlarmName::SlowSubscriber);
        }
    }

    /// One congested subscriber no longer holds `publisher` back: its reader reads again
    /// once no subscriber does, and its input runs once nothing holds it.
    fn unhold_for_subscriber(&mut self, publisher: ConnId) {
        let Some(h) = self.held.get_mut(&publisher) else {
            return;
        };
        h.subscribers = h.subscribers.saturating_sub(1);
        if h.subscribers == 0 {
            if let Some(o) = self.conns.get(&publisher) {
                o.set_stalled(false);
            }
        }
        if !self.held[&publisher].stalled() {
            self.let_go(publisher);
        }
    }

    /// Nothing holds a connection any more: its waiting input runs at the start of the next
    /// step.
    fn let_go(&mut self, conn: ConnId) {
        self.ready.push(conn);
    }

    /// Subscribers over their mark for longer than the grace period are slow: they stop
    /// holding publishers back, and until they drain the slow-consumer policy meets the QoS 0
    /// messages over their mark (dropped, or the subscriber disconnected: see `dispatch`).
    /// QoS 1/2 wait in their session as always, so a QoS 1 subscriber that is merely
    /// behind is not disconnected.
    fn check_congestion(&mut self) {
        if self.congested.is_empty() {
            return;
        }
        // One that alone holds back a publisher whose messages go to others as well makes
        // them wait: its grace counts across episodes from now.
        let held = &self.held;
        for c in self
            .congested
            .values_mut()
            .filter(|c| !c.slow && !c.harms_others)
        {
            c.harms_others = c.publishers.iter().any(|p| {
                held.get(p)
                    .is_some_and(|h| h.fans_out && h.subscribers == 1 && !h.by_engine)
            });
        }
        let grace = self.settings.slow_consumer_grace;
        let t = Instant::now();
        let late: Vec<ConnId> = self
            .congested
            .iter()
            .filter(|(conn, c)| !c.slow && t >= c.since + self.grace_left(**conn, c))
            .map(|(conn, _)| *conn)
            .collect();
        for subscriber in late {
            NetMetrics::add(&self.net.slow_subscribers, 1);
            self.alarms.raise(
                AlarmName::SlowSubscriber,
                format!(
                    "a subscriber stayed over limits.max_outbound_bytes for longer than \
                     limits.slow_consumer_grace_ms ({} ms): its publishers no longer wait for \
                     it, and limits.slow_consumer = {:?} applies",
                    grace.as_millis(),
                    self.settings.slow_consumer
                ),
            );
            let publishers = match self.congested.get_mut(&subscriber) {
                Some(c) => {
                    c.slow = true;
                    std::mem::take(&mut c.publishers)
                }
                None => continue,
            };
            for publisher in publishers {
                self.unhold_for_subscriber(publisher);
            }
        }
    }

    /// Runs the waiting input of connections let go, until each is done or held again.
    fn run_ready(&mut self, now: Time) {
        while !self.ready.is_empty() {
            for conn in std::mem::take(&mut self.ready) {
                let Some(h) = self.held.get_mut(&conn) else {
                    continue;
                };
                if h.stalled() {
                    continue;
                }
                while let Some(input) = self.held.get_mut(&conn).and_then(|h| h.input.pop_front()) {
                    self.run_input(conn, input, now);
                    if self.held.get(&conn).is_some_and(|h| h.stalled()) {
                        break;
                    }
                }
                if self
                    .held
                    .get(&conn)
                    .is_some_and(|h| !h.stalled() && h.input.is_empty())
                {
                    self.held.remove(&conn);
                }
            }
        }
    }

    /// Runs packets through the engine in order, stopping when the engine pauses the
    /// connection: the rest waits in `held`, in front of anything newer.
    ///
    /// Also stops after a PUBLISH whose deliveries put a subscriber over its high mark (what
    /// it has queued plus what this step adds for it): the publisher is held back from that
    /// packet on, so what a burst puts past the mark is one packet per publisher, not the
    /// whole step's input.
    fn run_input(&mut self, conn: ConnId, mut input: Input, now: Time) {
        self.ran.insert(conn);
        while let Some(p) = input.packets.next() {
            let publish = matches!(p, Packet::Publish(_));
            let mark = self.out.actions.len();
            self.broker.packet(conn, p, now, &mut self.out);
            let mut stop = false;
            if !self.out.flow.is_empty() {
                self.apply_flow();
                stop = true;
            }
            if publish && self.feeds_congestion(conn, mark) {
                stop = true;
            }
            if stop && self.held.get(&conn).is_some_and(|h| h.stalled()) {
                self.defer(conn, input, true, now);
                return;
            }
        }
    }

    /// Keeps a held connection's input for later, in order, except its acknowledgements and
    /// PINGREQs, which run now: they change nothing its waiting PUBLISHes depend on, and
    /// holding them could hold up what lets it go (its own deliveries' PUBACKs free the queue
    /// it publishes into; a client waiting for PINGRESP gives up). `front`: this input is
    /// older than what already waits.
    fn defer(&mut self, conn: ConnId, input: Input, front: bool, now: Time) {
        fn passes(p: &Packet) -> bool {
            matches!(
                p,
                Packet::PubAck(_)
                    | Packet::PubRec(_)
                    | Packet::PubRel(_)
                    | Packet::PubComp(_)
                    | Packet::PingReq
            )
        }
        // A burst's batches are all PUBLISHes: kept as they are, not copied packet by packet.
        if !input.packets.as_slice().iter().any(passes) {
            let h = self.held.entry(conn).or_default();
            if front {
                h.input.push_front(input);
            } else {
                h.input.push_back(input);
            }
            return;
        }
        let Input { packets, _unrouted } = input;
        let mut rest = Vec::new();
        for p in packets {
            if passes(&p) {
                self.broker.packet(conn, p, now, &mut self.out);
            } else {
                rest.push(p);
            }
        }
        if !self.out.flow.is_empty() {
            self.apply_flow();
        }
        if rest.is_empty() {
            return;
        }
        let input = Input {
            packets: rest.into_iter(),
            _unrouted,
        };
        let h = self.held.entry(conn).or_default();
        if front {
            h.input.push_front(input);
        } else {
            h.input.push_back(input);
        }
    }

    /// Counts the deliveries appended since `mark` against their subscribers' high marks;
    /// a subscriber that goes over (or already is congested) holds `publisher` back. True if
    /// it now is.
    fn feeds_congestion(&mut self, publisher: ConnId, mark: usize) -> bool {
        let high = self.settings.max_outbound_bytes;
        let mut over = std::mem::take(&mut self.over);
        // Whether the message also went to a subscriber with room, which a hold makes wait.
        let mut others_have_room = false;
        let mut deliveries = 0;
        for (subscriber, action) in &self.out.actions[mark..] {
            if !matches!(action, Action::Deliver(_)) {
                continue;
            }
            deliveries += 1;
            let load = self
                .load
                .entry(*subscriber)
                .or_insert_with(|| self.conns.get(subscriber).map_or(0, |o| o.queued()));
            *load += queued_size(action);
            if *load <= high {
                others_have_room = true;
            } else if over.last() != Some(subscriber) {
                over.push(*subscriber);
            }
        }
        let mut held = false;
        for subscriber in over.drain(..) {
            held |= self.congest(subscriber, publisher);
            if others_have_room {
                if let Some(c) = self.congested.get_mut(&subscriber) {
                    c.harms_others = true;
                }
            }
        }
        self.over = over;
        if held && deliveries > 1 {
            if let Some(h) = self.held.get_mut(&publisher) {
                h.fans_out = true;
            }
        }
        held
    }

    /// The engine's pauses and resumes (a held ack for a full queue).
    fn apply_flow(&mut self) {
        let mut flow = std::mem::take(&mut self.out.flow);
        for (conn, f) in flow.drain(..) {
            match f {
                // The reader goes on reading (up to its bound of unrouted input): the
                // acknowledgements in it may be what frees the full queue.
                Flow::Pause if self.conns.contains_key(&conn) => {
                    self.held.entry(conn).or_default().by_engine = true;
                }
                Flow::Pause => {}
                Flow::Resume => {
                    if let Some(h) = self.held.get_mut(&conn) {
                        h.by_engine = false;
                        if !h.stalled() {
                            self.let_go(conn);
                        }
                    }
                }
            }
        }
        self.out.flow = flow;
    }

    /// Forgets the back-pressure state of a connection that is gone: as a subscriber it holds
    /// nobody back, and as a publisher its waiting input is dropped (the engine forgot it).
    fn forget_flow(&mut self, conn: ConnId) {
        self.uncongest(conn);
        self.held.remove(&conn);
        self.strikes.remove(&conn);
    }

    /// Closes every connection silent for longer than 1.5 times its keep alive (5.0 clients
    /// get DISCONNECT 0x8D).
    fn check_keep_alive(&mut self, now: Time) {
        let t = clock_ms();
        let expired: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(conn, o)| {
                let limit = o.keep_alive_ms.load(Relaxed);
                limit > 0
                    && t.saturating_sub(o.last_read.load(Relaxed)) > limit
                    && !self.held.contains_key(conn)
            })
            .map(|(conn, _)| *conn)
            .collect();
        // A held connection's silence is ours (we hold its input, maybe its PINGREQs
        // behind PUBLISHes): its keep alive counts from when it is let go.
        for conn in self.held.keys() {
            if let Some(o) = self.conns.get(conn) {
                o.mark_read();
            }
        }
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
                who,
                origin,
                outbound,
                reply,
                audit,
            } => {
                let outcome = self
                    .broker
                    .connect_as(conn, *connect, *who, now, &mut self.out);
                if let (Some(a), true) = (audit, outcome.accepted) {
                    let id = self.broker.connection_client_id(conn);
                    a.record(&self.audit, conn, id.map(|id| &**id));
                }
                if outcome.accepted {
                    let limit = u64::from(outcome.keep_alive) * 1500;
                    outbound.keep_alive_ms.store(limit, Relaxed);
                    if let Some(client_id) = self.broker.connection_client_id(conn) {
                        outbound.lock().client_id = Some(client_id.clone());
                    }
                    let peer = crate::peers::ClientPeer {
                        origin,
                        version: outcome.version,
                    };
                    self.peers.insert(conn, peer);
                }
                self.conns.insert(conn, outbound);
                let _ = reply.send(outcome);
            }
            ToRouter::Packets {
                conn,
                packets,
                _unrouted,
            } => {
                let input = Input {
                    packets: packets.into_iter(),
                    _unrouted,
                };
                if self.held.contains_key(&conn) {
                    // Behind its earlier input, which waits.
                    self.defer(conn, input, false, now);
                } else {
                    self.run_input(conn, input, now);
                }
            }
            ToRouter::Closed { conn } => {
                self.run_before_close(conn, now);
                self.conns.remove(&conn);
                self.peers.remove(conn);
                self.broker.closed(conn, now, &mut self.out);
            }
            ToRouter::Violation { conn, reason } => {
                self.run_before_close(conn, now);
                self.broker.kill(conn, Some(reason), now, &mut self.out);
            }
            ToRouter::Alive(reply) => {
                let counts = (self.broker.connection_count(), self.broker.session_count());
                let _ = reply.send(counts);
            }
            ToRouter::Snapshot(reply) => {
                let _ = reply.send(EngineSnapshot {
                    stats: self.broker.stats().clone(),
                    connections: self.broker.connection_count(),
                    connections_by_listener: self.peers.counts(),
                    sessions: self.broker.session_count(),
                    subscriptions: self.broker.subscription_count(),
                    retained: self.broker.retained_count(),
                    storage_disk_bytes: self.persist.as_ref().map_or(0, |p| p.disk_bytes()),
                    storage_held_actions: self.persist.as_ref().map_or(0, |p| p.held_actions()),
                    storage_blocked: self.persist.as_ref().is_some_and(|p| p.is_blocked()),
                    queues: self.broker.queue_counters(now),
                    delayed_publishes: self.broker.delayed_publishes(),
                });
            }
            ToRouter::Queue { command, reply } => {
                let records = self.out.journal.len();
                let result =
                    crate::queue_admin::execute(&mut self.broker, command, now, &mut self.out);
                self.queue_answers.push(QueueAnswer {
                    send: Box::new(move || {
                        let _ = reply.send(result);
                    }),
                    wrote: self.out.journal.len() != records,
                    ticket: None,
                });
            }
            ToRouter::Admin { command, reply } => {
                let records = self.out.journal.len();
                let result = crate::views_api::execute(
                    &mut self.broker,
                    &self.peers,
                    command,
                    now,
                    &mut self.out,
                );
                self.queue_answers.push(QueueAnswer {
                    send: Box::new(move || {
                        let _ = reply.send(result);
                    }),
                    wrote: self.out.journal.len() != records,
                    ticket: None,
                });
            }
            ToRouter::Reconfigure(change, done) => {
                self.reconfigure(*change);
                let _ = done.send(());
            }
            ToRouter::Shutdown(_) => unreachable!("handled by run"),
            #[cfg(debug_assertions)]
            ToRouter::Panic => panic!("router panic injected by a test"),
        }
    }

    /// A reload's settings and ACL rules (see `reload.rs`, which says what each applies to).
    fn reconfigure(&mut self, change: crate::reload::RouterChange) {
        if let Some(live) = change.settings {
            let s = &mut self.settings;
            s.max_outbound_bytes = live.max_outbound_bytes;
            s.slow_consumer = live.slow_consumer;
            s.slow_consumer_grace = live.slow_consumer_grace;
            if s.sys_interval != live.sys_interval {
                s.sys_interval = live.sys_interval;
                self.sys_rescheduled = true;
            }
        }
        if let Some((acl, reason)) = change.acl {
            self.broker.set_acl(acl, reason);
        }
    }

    /// A held connection that ends: what it sent before it went runs now, past any hold,
    /// except its QoS 1/2 PUBLISHes, which were never acknowledged (its library sends them
    /// again if its session lives on) and would only join full queues past their limit.
    /// QoS 0 messages that TCP delivered are not thrown away, and a DISCONNECT among them
    /// still discards the will.
    fn run_before_close(&mut self, conn: ConnId, now: Time) {
        self.uncongest(conn);
        self.strikes.remove(&conn);
        let Some(held) = self.held.remove(&conn) else {
            return;
        };
        for input in held.input {
            for p in input.packets {
                if matches!(&p, Packet::Publish(publish) if publish.qos != QoS::AtMostOnce) {
                    continue;
                }
                self.broker.packet(conn, p, now, &mut self.out);
            }
        }
        // The engine forgets the connection next; its pauses and resumes no longer matter.
        self.apply_flow();
        self.held.remove(&conn);
    }

    /// Appends every action to its connection's queue, then wakes each connection once.
    ///
    /// Back-pressure: a delivery that puts a subscriber's queue over its high mark
    /// (`limits.max_outbound_bytes`) holds back the connection that published it; the
    /// subscriber is congested until its writer reports it drained below half the mark. Past
    /// the grace period a congested subscriber is slow: QoS 0 over the mark is dropped (or it
    /// was disconnected). Within the grace nothing is dropped below [`GRACE_OVERSHOOT`] times
    /// the mark.
    fn dispatch(&mut self) {
        for (conn, reason) in self.out.violations.drain(..) {
            self.net.disconnects.add(reason);
            tracing::debug!(
                conn = conn.0,
                client_id = &*client_id_of(&self.conns, &self.closing, conn),
                ?reason,
                "closing connection: rule broken"
            );
        }
        if self.audit.on() {
            crate::audit::engine_events(&self.audit, &self.broker, &self.out);
        }
        self.out.denied_subscriptions.clear();
        self.out.ended.clear();
        self.denials.log(&mut self.out.denied, |conn| {
            client_id_of(&self.conns, &self.closing, conn)
        });
        self.messages.log(
            &mut self.out.dead_lettered,
            &mut self.out.dropped,
            &mut self.out.dropped_unlisted,
        );
        let high = self.settings.max_outbound_bytes;
        let mut actions = std::mem::take(&mut self.out.actions);
        let mut slow: Vec<ConnId> = Vec::new();
        // Publishers (by session) whose deliveries crossed a subscriber's mark in this run.
        let mut feeders: Vec<ferrymq_core::SessionId> = Vec::new();
        let mut run = actions.drain(..).peekable();
        // Consecutive actions for one connection go in under one lock.
        while let Some((conn, first)) = run.next() {
            let Some(outbound) = self.conns.get(&conn).cloned() else {
                while run.next_if(|(c, _)| *c == conn).is_some() {}
                continue;
            };
            let is_slow =
                !self.congested.is_empty() && self.congested.get(&conn).is_some_and(|c| c.slow);
            // QoS 0 past this is dropped: the mark itself for a slow subscriber, the grace
            // overshoot for one that may still catch up.
            let drop_over = if is_slow {
                high
            } else {
                (high * GRACE_OVERSHOOT).max(high + GRACE_INPUT)
            };
            let mut closing = false;
            let mut dropped = 0;
            let mut over = false;
            feeders.clear();
            {
                let mut q = outbound.lock();
                let rest = std::iter::from_fn(|| run.next_if(|(c, _)| *c == conn).map(|(_, a)| a));
                for action in std::iter::once(first).chain(rest) {
                    closing |= matches!(action, Action::Close);
                    let mut publisher = None;
                    if let Action::Deliver(d) = &action {
                        if d.qos == QoS::AtMostOnce && q.bytes + q.writing >= drop_over {
                            dropped += 1;
                            continue;
                        }
                        publisher = d.message.publisher;
                    }
                    q.bytes += queued_size(&action);
                    q.actions.push(action);
                    if q.bytes + q.writing > high && !is_slow {
                        over = true;
                        if let Some(p) = publisher.filter(|p| feeders.last() != Some(p)) {
                            feeders.push(p);
                        }
                    }
                }
                if over {
                    q.resume_below = high / 2 + 1;
                }
            }
            self.touched.push(conn);
            if over {
                self.congested.entry(conn).or_insert_with(Congested::new);
                for sid in feeders.drain(..) {
                    // Only a connection whose input ran in this step is to blame (not one
                    // whose retained or stored message was replayed); in-process publishers
                    // ($SYS, wills) have no connection to hold.
                    match self.broker.session_connection(sid) {
                        Some(p) if self.ran.contains(&p) && self.conns.contains_key(&p) => {
                            self.congest(conn, p);
                        }
                        _ => {}
                    }
                }
            }
            if dropped > 0 {
                NetMetrics::add(&self.net.dropped_slow_consumer, dropped);
                if self.settings.slow_consumer == SlowConsumer::Disconnect && !slow.contains(&conn)
                {
                    slow.push(conn);
                }
            }
            if closing {
                // The writer closes after flushing; the engine has already forgotten it. Its
                // task sends no `Closed` after a close of ours (only after a socket error or a
                // stall), so its peer entry goes here too.
                if let Some(o) = self.conns.remove(&conn) {
                    self.closing.insert(conn, o);
                }
                self.peers.remove(conn);
                self.forget_flow(conn);
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
        self.ran.clear();
        self.load.clear();
        self.watch_congested();
        if !slow.is_empty() {
            let now = self.now();
            for conn in slow {
                // Counted and summarized as a QuotaExceeded close (see `dispatch`).
                tracing::debug!(
                    conn = conn.0,
                    client_id = &*client_id_of(&self.conns, &self.closing, conn),
                    "disconnecting slow consumer"
                );
                self.broker
                    .kill(conn, Some(ReasonCode::QuotaExceeded), now, &mut self.out);
            }
            self.apply_flow();
            self.dispatch();
        }
    }

    /// A subscriber went over its high mark: it is congested from now (if it was not), and
    /// `publisher`, which fed it, is held back until it drains. True if the publisher is
    /// held for it (not when the subscriber is already past its grace, or is the publisher).
    fn congest(&mut self, subscriber: ConnId, publisher: ConnId) -> bool {
        let c = self
            .congested
            .entry(subscriber)
            .or_insert_with(Congested::new);
        // A connection fed by itself drains by its own writer; holding its input back
        // would also hold the acks that let it drain.
        if c.slow || publisher == subscriber || !c.publishers.insert(publisher) {
            return !c.slow && c.publishers.contains(&publisher);
        }
        NetMetrics::add(&self.net.publisher_pauses, 1);
        let h = self.held.entry(publisher).or_default();
        h.subscribers += 1;
        if h.subscribers == 1 {
            // Its reader stops at once: TCP holds the client back.
            if let Some(o) = self.conns.get(&publisher) {
                o.set_stalled(true);
            }
        }
        true
    }

    /// Every congested subscriber reports when it drains: one already below its low mark
    /// (its writer took everything since) is let go now, the others are marked so that
    /// their writer reports it. After a dispatch, since a subscriber can become congested
    /// before its queue is (while the step runs) or stay so without new deliveries.
    fn watch_congested(&mut self) {
        if self.congested.is_empty() {
            return;
        }
        let low = self.settings.max_outbound_bytes / 2 + 1;
        let mut drained = std::mem::take(&mut self.drained);
        // Slow ones too: one that catches up is an ordinary subscriber again.
        for conn in self.congested.keys() {
            let Some(o) = self.conns.get(conn) else {
                drained.push(*conn);
                continue;
            };
            let mut q = o.lock();
            if q.bytes + q.writing < low {
                q.resume_below = 0;
                drained.push(*conn);
            } else {
                q.resume_below = low;
            }
        }
        for conn in drained.drain(..) {
            self.uncongest(conn);
        }
        self.drained = drained;
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
