//! Rate and connection limits set by the operator (`[limits]`): token buckets for each
//! client's PUBLISH packets/s and inbound bytes/s ([`ClientRates`], used by the connection's
//! reader), and the checks a new connection passes in the accept loop
//! ([`ConnectionLimits`]: new connections/s per listener and per source address, and
//! concurrent connections per source address, [`AddressCounts`]).
//!
//! Before authentication ([`PreauthBudget`]): the read buffers of connections whose CONNECT
//! is not complete are bounded in total (`limits.preauth_buffer_bytes`), so unauthenticated
//! clients cannot grow the broker's memory.
//!
//! Invariants:
//! - With every rate at 0 (the default) nothing here runs on the publish path: the reader has
//!   no [`ClientRates`] and reads no clock for it (but one relaxed load of
//!   [`LiveRates::epoch`] per read, and, once a reload changed the rates, one more of
//!   whether they limit anything; a reload that lifts them frees the buckets of the open
//!   connections).
//! - Every table is bounded: [`AddressCounts`] holds only addresses with an open connection
//!   (an entry goes when its count reaches 0), and [`ConnectionLimits`] forgets an address's
//!   rate bucket once it has refilled (a fresh bucket would behave the same), and tracks at
//!   most [`MAX_RATE_ADDRESSES`] addresses.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferrymq_core::ConnId;
use ferrymq_mqtt::ReasonCode;
use tokio::time::Instant;

use crate::config::{Limits, RateExceeded};
use crate::metrics::NetMetrics;

/// The bytes of read buffer that connections still reading their CONNECT may hold, all
/// listeners together (`limits.preauth_buffer_bytes`). A connection takes its share before
/// its buffer grows ([`PreauthShare::grow_to`]) and waits, unread, while the budget has no
/// room: what it sends meanwhile stays in the kernel's socket buffer, and its connect timeout
/// still runs. Its share goes back when the share is dropped, which is when its handshake
/// ends, however it ends (CONNACK, refusal, timeout, error, close).
///
/// A semaphore of bytes: FIFO, so a large request at the head is not starved by small ones
/// behind it (and those wait behind it). A share grows in steps (it doubles, so that what a
/// connection holds is about what it sent) and holds what it has while it waits for more:
/// hold-and-wait. Were that the whole design, connections halfway through their CONNECTs
/// could hold the whole budget between them, each waiting for room the others hold, and none
/// would move until their connect timeouts (seen under load with 1,000 concurrent 64 KiB
/// CONNECTs on a 4 MiB budget: stuck for the 120 s timeout after every client had gone). So
/// one whole CONNECT's worth (`mqtt.max_connect_size`) is set aside as a reserve that only
/// one connection at a time may draw from (the one holding `priority`), when the shared part
/// has no room for it: that one can always finish its CONNECT, give everything back, and
/// let the next one move.
#[derive(Debug)]
pub(crate) struct PreauthBudget {
    permits: Arc<tokio::sync::Semaphore>,
    /// Its shared part's size, in bytes (the budget less the reserve).
    total: usize,
    /// One whole CONNECT's worth, for the connection holding `priority`.
    reserve: tokio::sync::Semaphore,
    priority: tokio::sync::Mutex<()>,
    /// Where the bytes held are shown (`ferrymq_preauth_buffer_bytes`).
    net: Arc<NetMetrics>,
}

impl PreauthBudget {
    /// A budget of `bytes`, of which `reserve` (the largest CONNECT; at most `bytes`) is the
    /// reserve that keeps shares from deadlocking.
    pub(crate) fn new(bytes: usize, reserve: usize, net: Arc<NetMetrics>) -> PreauthBudget {
        let bytes = bytes.min(tokio::sync::Semaphore::MAX_PERMITS);
        let reserve = reserve.min(bytes);
        let total = bytes - reserve;
        PreauthBudget {
            permits: Arc::new(tokio::sync::Semaphore::new(total)),
            total,
            reserve: tokio::sync::Semaphore::new(reserve),
            priority: tokio::sync::Mutex::new(()),
            net,
        }
    }

    /// Holds `bytes` (at most the shared part) until the returned hold is dropped: what a
    /// WebSocket connection's framing layer may buffer before its CONNECT is through (a frame
    /// is read whole, up to `max_packet_size`, before the MQTT handshake sees a byte of it).
    /// Taken whole, in one request (no hold-and-wait), and the CONNECT is then read within it.
    pub(crate) async fn hold(&self, bytes: usize) -> PreauthHold {
        let n = u32::try_from(bytes.min(self.total)).unwrap_or(u32::MAX);
        let Ok(permit) = self.permits.clone().acquire_many_owned(n).await else {
            // Never closed; should it be, waiting for ever is the connect timeout's job.
            return std::future::pending().await;
        };
        self.net
            .preauth_buffer_bytes
            .fetch_add(u64::from(n), Relaxed);
        PreauthHold {
            _permit: permit,
            net: self.net.clone(),
            bytes: n,
        }
    }

    /// A share of nothing yet, for one connection's handshake.
    pub(crate) fn share(&self) -> PreauthShare<'_> {
        PreauthShare {
            budget: self,
            permit: None,
            reserved: None,
            priority: None,
        }
    }
}

/// Bytes of the [`PreauthBudget`] held for a WebSocket connection's framing until its
/// CONNECT is through; given back when dropped.
#[derive(Debug)]
pub(crate) struct PreauthHold {
    _permit: tokio::sync::OwnedSemaphorePermit,
    net: Arc<NetMetrics>,
    bytes: u32,
}

impl Drop for PreauthHold {
    fn drop(&mut self) {
        let gauge = &self.net.preauth_buffer_bytes;
        gauge.fetch_sub(u64::from(self.bytes), Relaxed);
    }
}

/// One connection's part of the [`PreauthBudget`], given back when dropped.
#[derive(Debug)]
pub(crate) struct PreauthShare<'a> {
    budget: &'a PreauthBudget,
    /// From the shared part.
    permit: Option<tokio::sync::SemaphorePermit<'a>>,
    /// From the reserve, while this share has the priority (declared before it, so given
    /// back before the next connection can take the priority).
    reserved: Option<tokio::sync::SemaphorePermit<'a>>,
    priority: Option<tokio::sync::MutexGuard<'a, ()>>,
}

impl PreauthShare<'_> {
    /// Bytes this share holds.
    pub(crate) fn held(&self) -> usize {
        let n = |p: &Option<tokio::sync::SemaphorePermit<'_>>| {
            p.as_ref().map_or(0, |p| p.num_permits())
        };
        n(&self.permit) + n(&self.reserved)
    }

    /// Waits until the share holds at least `bytes` (at once when it already does): from the
    /// shared part, or, once this share has the priority (it takes it when the shared part
    /// has no room and no other share has it), from the reserve, whichever grants first. The
    /// caller keeps `bytes` within the largest CONNECT (the reserve's size; config validation
    /// keeps `limits.preauth_buffer_bytes` at least that).
    pub(crate) async fn grow_to(&mut self, bytes: usize) {
        let more = bytes.saturating_sub(self.held());
        if more == 0 {
            return;
        }
        let more = u32::try_from(more).unwrap_or(u32::MAX);
        let budget = self.budget;
        let net = &budget.net;
        loop {
            let prioritized = self.priority.is_some();
            tokio::select! {
                biased;
                granted = budget.permits.acquire_many(more) => {
                    let Ok(granted) = granted else {
                        // Never closed; should it be, waiting is the connect timeout's job.
                        return std::future::pending().await;
                    };
                    net.preauth_buffer_bytes.fetch_add(u64::from(more), Relaxed);
                    match &mut self.permit {
                        Some(p) => p.merge(granted),
                        None => self.permit = Some(granted),
                    }
                    return;
                }
                // The reserve holds a whole CONNECT and only the share with the priority
                // draws from it, so that share never waits long for a CONNECT-sized need.
                granted = budget.reserve.acquire_many(more), if prioritized => {
                    let Ok(granted) = granted else {
                        return std::future::pending().await;
                    };
                    net.preauth_buffer_bytes.fetch_add(u64::from(more), Relaxed);
                    match &mut self.reserved {
                        Some(p) => p.merge(granted),
                        None => self.reserved = Some(granted),
                    }
                    return;
                }
                guard = budget.priority.lock(), if !prioritized => {
                    self.priority = Some(guard);
                }
            }
        }
    }
}

impl Drop for PreauthShare<'_> {
    fn drop(&mut self) {
        let held = self.held() as u64;
        let gauge = &self.budget.net.preauth_buffer_bytes;
        gauge.fetch_sub(held, Relaxed);
    }
}

/// The read-buffer capacity a connection reading its CONNECT grows to next, from its
/// `capacity` and the `declared` whole length of the CONNECT once its fixed header is in:
/// double (at least `min`, the first read), as reads fill it, and never past the declared
/// CONNECT, so that what a connection holds is about what it sent, and at most its CONNECT.
pub(crate) fn next_connect_capacity(capacity: usize, declared: Option<usize>, min: usize) -> usize {
    let doubled = capacity.saturating_mul(2).max(min);
    match declared {
        Some(total) => doubled.min(total),
        None => doubled,
    }
}

/// A token bucket: `rate` tokens a second, holding at most `capacity`. Its level may go below
/// zero (a debt, see [`ClientRates`]); it then refills from there.
#[derive(Debug, Clone)]
pub(crate) struct Bucket {
    rate: f64,
    capacity: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    /// A full bucket of `burst` worth of `rate` (at least one token).
    pub(crate) fn new(rate: u64, burst: Duration, now: Instant) -> Bucket {
        let rate = rate as f64;
        let capacity = (rate * burst.as_secs_f64()).max(1.0);
        Bucket {
            rate,
            capacity,
            tokens: capacity,
            last: now,
        }
    }

    /// Adds what flowed in since the last refill. A level above the capacity (credit for a
    /// pause of ours, [`Bucket::excuse`]) is kept until it is spent.
    pub(crate) fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        if self.tokens < self.capacity {
            self.tokens = (self.tokens + elapsed * self.rate).min(self.capacity);
        }
        self.last = now;
    }

    /// The broker did not read the client for `paused` (back-pressure): what the client sent
    /// meanwhile waited in TCP and arrives at once, so that time is credited at the full
    /// rate, past the burst if need be. The client's average rate is still what is limited.
    /// The bucket was refilled when the pause began (nothing is taken while the reader
    /// waits), so the pause is added once, uncapped, and the refill clock restarts now.
    pub(crate) fn excuse(&mut self, paused: Duration, now: Instant) {
        self.tokens += paused.as_secs_f64() * self.rate;
        self.last = now;
    }

    pub(crate) fn take(&mut self, n: f64) {
        self.tokens -= n;
    }

    /// How long until the level reaches `level`, from the last refill.
    fn until(&self, level: f64) -> Duration {
        if self.tokens >= level {
            return Duration::ZERO;
        }
        Duration::from_secs_f64((level - self.tokens) / self.rate)
    }

    /// Takes over the level of `old` (the same kind, under the rates before a reload) as of
    /// `now`: a debt stays owed and what was used stays used, cut to this burst, and credit
    /// for a pause of ours ([`Bucket::excuse`]) is kept.
    fn carry(&mut self, old: &Bucket, now: Instant) {
        let mut level = old.tokens;
        if level < old.capacity {
            let elapsed = now.saturating_duration_since(old.last).as_secs_f64();
            level = (level + elapsed * old.rate).min(old.capacity);
        }
        let credit = (level - old.capacity).max(0.0);
        self.tokens = level.min(old.capacity).min(self.capacity) + credit;
        self.last = now;
    }

    /// Full again by `now`: it may be forgotten, since a new bucket would be the same.
    fn full_at(&self, now: Instant) -> bool {
        self.tokens + now.saturating_duration_since(self.last).as_secs_f64() * self.rate
            >= self.capacity
    }
}

/// The per-client rate limits of a listener; `None` from [`RateLimits::from_config`] when
/// both rates are unlimited.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct RateLimits {
    messages_per_sec: u64,
    bytes_per_sec: u64,
    burst: Duration,
    pub exceeded: RateExceeded,
}

impl RateLimits {
    pub(crate) fn from_config(l: &Limits) -> Option<RateLimits> {
        if l.max_messages_per_sec == 0 && l.max_bytes_per_sec == 0 {
            return None;
        }
        Some(RateLimits {
            messages_per_sec: l.max_messages_per_sec,
            bytes_per_sec: l.max_bytes_per_sec,
            burst: Duration::from_millis(l.rate_burst_ms),
            exceeded: l.rate_exceeded,
        })
    }
}

/// The per-client rates in force, shared by every listener and every connection, so that a
/// reload reaches connections already open: each reader compares [`LiveRates::epoch`] (one
/// relaxed load per read) with the epoch its buckets were made for, and on a change takes
/// the new rates with fresh buckets ([`ClientRates::for_epoch`]).
#[derive(Debug, Default)]
pub(crate) struct LiveRates {
    epoch: std::sync::atomic::AtomicU64,
    /// Whether `current` limits anything: a reader without buckets whose epoch is behind
    /// stays without, on one more relaxed load, while the rates are unlimited.
    limited: std::sync::atomic::AtomicBool,
    current: Mutex<Option<RateLimits>>,
}

impl LiveRates {
    pub(crate) fn new(rates: Option<RateLimits>) -> LiveRates {
        LiveRates {
            epoch: 0.into(),
            limited: rates.is_some().into(),
            current: Mutex::new(rates),
        }
    }

    pub(crate) fn epoch(&self) -> u64 {
        self.epoch.load(Relaxed)
    }

    fn limited(&self) -> bool {
        self.limited.load(Relaxed)
    }

    /// The rates from now on, for new and open connections.
    pub(crate) fn set(&self, rates: Option<RateLimits>) {
        let mut current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        *current = rates;
        self.limited.store(rates.is_some(), Relaxed);
        self.epoch.fetch_add(1, Relaxed);
    }

    pub(crate) fn current(&self) -> Option<RateLimits> {
        self.get().1
    }

    /// The rates in force and their epoch, read together.
    fn get(&self) -> (u64, Option<RateLimits>) {
        let current = self.current.lock().unwrap_or_else(|e| e.into_inner());
        (self.epoch(), *current)
    }
}

/// One connection's buckets, boxed by the reader (a connection future carries only the
/// pointer). A packet is over the rate when, as it arrives, a PUBLISH finds less than one
/// message token, or any packet finds the byte bucket in debt: a packet passing takes its
/// bytes even when that puts the bucket below zero, so a packet larger than the burst still
/// passes, and the next waits until the debt is repaid. The average stays at the rate.
#[derive(Debug)]
pub(crate) struct ClientRates {
    messages: Option<Bucket>,
    bytes: Option<Bucket>,
    /// What to do with a client over its rate.
    pub exceeded: RateExceeded,
    /// The [`LiveRates::epoch`] these buckets were made for.
    epoch: u64,
    /// Since when the broker has not been reading this client for reasons of its own
    /// (back-pressure), if it is not.
    paused_since: Option<Instant>,
}

/// The fixed header's first byte of a PUBLISH has packet type 3 in its high nibble.
fn is_publish(first_byte: u8) -> bool {
    first_byte >> 4 == 3
}

impl ClientRates {
    #[cfg(test)]
    pub(crate) fn new(limits: &RateLimits, now: Instant) -> ClientRates {
        Self::with_epoch(limits, 0, now)
    }

    /// Buckets for `limits` as of `epoch`.
    fn with_epoch(limits: &RateLimits, epoch: u64, now: Instant) -> ClientRates {
        let bucket = |rate| (rate > 0).then(|| Bucket::new(rate, limits.burst, now));
        ClientRates {
            messages: bucket(limits.messages_per_sec),
            bytes: bucket(limits.bytes_per_sec),
            exceeded: limits.exceeded,
            epoch,
            paused_since: None,
        }
    }

    /// A connection's buckets when it starts: those of the rates its listener was built
    /// with (as of `epoch`), or none when they are unlimited.
    pub(crate) fn at_start(
        limits: Option<&RateLimits>,
        epoch: u64,
        now: Instant,
    ) -> Option<Box<ClientRates>> {
        limits.map(|l| Box::new(Self::with_epoch(l, epoch, now)))
    }

    /// New buckets when the rates changed since `current` was made (or, without buckets,
    /// since `start_epoch`, the listener's, and they now limit something); `None` when they
    /// did not; `Some(None)` when they are now unlimited (no buckets, no clock: the reader
    /// is then as one that started unlimited). A bucket the old rates had too keeps its
    /// level ([`Bucket::carry`]): a client over its rate must not have its debt forgiven by
    /// a reload (an operator lowering a rate in an incident); one they did not have starts
    /// full.
    pub(crate) fn for_epoch(
        live: &LiveRates,
        current: Option<&ClientRates>,
        start_epoch: u64,
    ) -> Option<Option<Box<ClientRates>>> {
        match current {
            Some(r) if live.epoch() == r.epoch => return None,
            None if live.epoch() == start_epoch || !live.limited() => return None,
            _ => {}
        }
        let (epoch, limits) = live.get();
        let Some(limits) = limits else {
            return Some(None);
        };
        let now = Instant::now();
        let mut fresh = Self::with_epoch(&limits, epoch, now);
        if let Some(old) = current {
            for (new, old) in [
                (&mut fresh.messages, &old.messages),
                (&mut fresh.bytes, &old.bytes),
            ] {
                if let (Some(new), Some(old)) = (new, old) {
                    new.carry(old, now);
                }
            }
        }
        Some(Some(Box::new(fresh)))
    }

    /// Whether a reload changed the rates since these buckets were made.
    pub(crate) fn is_stale(&self, live: &LiveRates) -> bool {
        live.epoch() != self.epoch
    }

    /// The reader waits for back-pressure (not for these rates) from now: the buckets are
    /// brought up to now, so that the pause is credited once ([`ClientRates::resumed`]).
    pub(crate) fn paused(&mut self, now: Instant) {
        if self.paused_since.is_none() {
            self.refill(now);
            self.paused_since = Some(now);
        }
    }

    /// The reader reads again: the pause is credited ([`Bucket::excuse`]), so that what
    /// piled up in TCP meanwhile is not taken for a burst over the rate.
    pub(crate) fn resumed(&mut self) {
        let Some(since) = self.paused_since.take() else {
            return;
        };
        let now = Instant::now();
        let paused = now.saturating_duration_since(since);
        for b in [&mut self.messages, &mut self.bytes].into_iter().flatten() {
            b.excuse(paused, now);
        }
    }

    pub(crate) fn refill(&mut self, now: Instant) {
        for b in [&mut self.messages, &mut self.bytes].into_iter().flatten() {
            b.refill(now);
        }
    }

    /// Whether the packet whose first byte is `first_byte` may be read now.
    pub(crate) fn admits(&self, first_byte: u8) -> bool {
        self.wait(first_byte).is_zero()
    }

    /// Takes a packet that was admitted: its `bytes`, and a message if it is a PUBLISH.
    pub(crate) fn charge(&mut self, publish: bool, bytes: usize) {
        if let (true, Some(m)) = (publish, &mut self.messages) {
            m.take(1.0);
        }
        if let Some(b) = &mut self.bytes {
            b.take(bytes as f64);
        }
    }

    /// How long after the last refill the packet starting with `first_byte` is admitted.
    pub(crate) fn wait(&self, first_byte: u8) -> Duration {
        let messages = match &self.messages {
            Some(m) if is_publish(first_byte) => m.until(1.0),
            _ => Duration::ZERO,
        };
        let bytes = self.bytes.as_ref().map_or(Duration::ZERO, |b| b.until(0.0));
        messages.max(bytes)
    }

    /// When the last refill happened (what [`ClientRates::wait`] counts from).
    pub(crate) fn refilled(&self) -> Option<Instant> {
        self.messages
            .as_ref()
            .or(self.bytes.as_ref())
            .map(|b| b.last)
    }
}

/// Why a new connection is refused (CONNACK), and the label it is counted under in
/// `ferrymq_connections_refused_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// `limits.max_connections` (or the open-files limit) is reached.
    MaxConnections,
    /// `limits.max_connections_per_address` is reached for the client's address.
    AddressConnections,
    /// `limits.max_connection_rate`: the listener takes no more new connections this second.
    ConnectionRate,
    /// `limits.max_connection_rate_per_address`.
    AddressConnectionRate,
}

impl Refusal {
    pub(crate) const ALL: [Refusal; 4] = [
        Refusal::MaxConnections,
        Refusal::AddressConnections,
        Refusal::ConnectionRate,
        Refusal::AddressConnectionRate,
    ];

    /// The CONNACK reason (the codec sends 3.1.1 clients 3, server unavailable, for both).
    pub(crate) fn reason_code(self) -> ReasonCode {
        match self {
            Refusal::MaxConnections | Refusal::AddressConnections => ReasonCode::ServerBusy,
            Refusal::ConnectionRate | Refusal::AddressConnectionRate => {
                ReasonCode::ConnectionRateExceeded
            }
        }
    }

    /// The metric label: the name of the limit.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Refusal::MaxConnections => "max_connections",
            Refusal::AddressConnections => "max_connections_per_address",
            Refusal::ConnectionRate => "max_connection_rate",
            Refusal::AddressConnectionRate => "max_connection_rate_per_address",
        }
    }
}

/// Open connections per source address, shared by the accept loop (which counts a connection
/// in) and the connection tasks (which count themselves out when they end). Present only when
/// `limits.max_connections_per_address` is set.
#[derive(Debug)]
pub(crate) struct AddressCounts {
    max: usize,
    inner: Mutex<Counts>,
}

#[derive(Debug, Default)]
struct Counts {
    /// Open connections (refused ones included until they close) per address; no zeros.
    open: HashMap<IpAddr, usize>,
    /// The address of each counted connection, so that a connection ending needs only its id.
    conns: HashMap<ConnId, IpAddr>,
}

/// What [`AddressCounts::open`] decided.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum AddressCheck {
    /// Counted; serve it.
    Allowed,
    /// Counted; answer its CONNECT with Server Busy.
    Busy,
    /// Not counted: the address already holds twice its limit (a client that ignores the
    /// refusals); close the socket without reading anything.
    Drop,
}

impl AddressCounts {
    pub(crate) fn new(max: usize) -> Option<AddressCounts> {
        (max > 0).then(|| AddressCounts {
            max,
            inner: Mutex::default(),
        })
    }

    /// Counts a new connection from `ip`, unless it is to be dropped.
    pub(crate) fn open(&self, conn: ConnId, ip: IpAddr) -> AddressCheck {
        let mut c = self.lock();
        let open = c.open.get(&ip).copied().unwrap_or(0);
        if open >= self.max.saturating_mul(2) {
            return AddressCheck::Drop;
        }
        c.open.insert(ip, open + 1);
        c.conns.insert(conn, ip);
        if open + 1 > self.max {
            AddressCheck::Busy
        } else {
            AddressCheck::Allowed
        }
    }

    /// A counted connection ended.
    pub(crate) fn close(&self, conn: ConnId) {
        let mut c = self.lock();
        let Some(ip) = c.conns.remove(&conn) else {
            return;
        };
        if let Some(n) = c.open.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                c.open.remove(&ip);
            }
        }
    }

    #[cfg(test)]
    fn addresses(&self) -> usize {
        self.lock().open.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The source a per-address limit counts a connection against: its IPv4 address, or the /64
/// prefix of its IPv6 address (one host usually holds a whole /64, so counting each of its
/// 2^64 addresses apart would make the limit meaningless). IPv4-mapped IPv6 is IPv4.
pub(crate) fn source_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(std::net::Ipv6Addr::from(prefix))
        }
        v4 => v4,
    }
}

/// Most addresses whose connection-rate bucket is remembered. Past it (a scan from more
/// addresses than this within one burst window), a new address is held only to the
/// listener-wide rate: forgetting is the safe side, since refusing unknown addresses would
/// let a scan lock everyone out.
pub(crate) const MAX_RATE_ADDRESSES: usize = 65_536;

/// The connection-rate buckets, owned by the accept loop (one task, so no lock).
#[derive(Debug)]
pub(crate) struct ConnectionLimits {
    burst: Duration,
    listener: Option<Bucket>,
    /// New connections per second per address (0 = unlimited).
    per_address: u64,
    addresses: HashMap<IpAddr, Bucket>,
    next_sweep: Instant,
}

impl ConnectionLimits {
    /// `None` when no connection rate is limited.
    pub(crate) fn new(l: &Limits, now: Instant) -> Option<ConnectionLimits> {
        if l.max_connection_rate == 0 && l.max_connection_rate_per_address == 0 {
            return None;
        }
        let burst = Duration::from_millis(l.rate_burst_ms);
        Some(ConnectionLimits {
            burst,
            listener: (l.max_connection_rate > 0)
                .then(|| Bucket::new(l.max_connection_rate, burst, now)),
            per_address: l.max_connection_rate_per_address,
            addresses: HashMap::new(),
            next_sweep: now + burst,
        })
    }

    /// Takes a token for a new connection from `ip` from each bucket that applies, or, when
    /// one is empty, names the limit (and takes nothing).
    pub(crate) fn admit(&mut self, ip: IpAddr, now: Instant) -> Result<(), Refusal> {
        // Once per burst window (not whenever the table is full: a full table would then cost
        // a pass over it per accepted connection).
        if now >= self.next_sweep {
            self.addresses.retain(|_, b| !b.full_at(now));
            self.next_sweep = now + self.burst;
        }
        let per_address = self.per_address > 0;
        if per_address {
            if let Some(b) = self.addresses.get_mut(&ip) {
                b.refill(now);
                if b.tokens < 1.0 {
                    return Err(Refusal::AddressConnectionRate);
                }
            }
        }
        if let Some(b) = &mut self.listener {
            b.refill(now);
            if b.tokens < 1.0 {
                return Err(Refusal::ConnectionRate);
            }
            b.take(1.0);
        }
        if per_address {
            let full = self.addresses.len() >= MAX_RATE_ADDRESSES;
            match self.addresses.get_mut(&ip) {
                Some(b) => b.take(1.0),
                None if !full => {
                    let mut b = Bucket::new(self.per_address, self.burst, now);
                    b.take(1.0);
                    self.addresses.insert(ip, b);
                }
                None => {}
            }
        }
        Ok(())
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.addresses.len()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const PUBLISH: u8 = 0x30;
    const PINGREQ: u8 = 0xC0;

    fn limits() -> Limits {
        Limits::default()
    }

    #[tokio::test]
    async fn preauth_shares_wait_for_room_and_give_it_back_when_dropped() {
        let net = Arc::new(NetMetrics::default());
        let budget = PreauthBudget::new(1000, 0, net.clone());
        let load = || net.preauth_buffer_bytes.load(Relaxed);
        let mut a = budget.share();
        a.grow_to(600).await;
        a.grow_to(400).await; // holds more already: nothing taken
        assert_eq!((a.held(), load()), (600, 600));
        let mut b = budget.share();
        b.grow_to(400).await;
        assert_eq!(load(), 1000);
        let mut c = budget.share();
        {
            let wait = c.grow_to(1);
            tokio::pin!(wait);
            let waited = tokio::time::timeout(Duration::from_millis(20), wait.as_mut()).await;
            assert!(waited.is_err(), "no room: the share waits");
            drop(a);
            tokio::time::timeout(Duration::from_secs(5), wait)
                .await
                .expect("room again once a share is dropped");
        }
        assert_eq!(load(), 401);
        drop(b);
        drop(c);
        assert_eq!(load(), 0, "every byte given back");
        assert_eq!(budget.permits.available_permits(), 1000);
    }

    /// Shares that grow in steps hold what they have while they wait for more. 24 of them
    /// fill the shared part halfway through their CONNECTs and then all ask for the next step:
    /// without the reserve none could move (each waits for room the others hold) until its
    /// connect timeout. With it, one at a time finishes from the reserve, gives everything
    /// back, and the rest follow.
    #[tokio::test]
    async fn shares_halfway_through_their_connects_do_not_deadlock() {
        const K: usize = 1024;
        let net = Arc::new(NetMetrics::default());
        let budget = Arc::new(PreauthBudget::new(48 * K + 16 * K, 16 * K, net.clone()));
        let halfway = Arc::new(tokio::sync::Barrier::new(24));
        let mut tasks = Vec::new();
        for _ in 0..24 {
            let (budget, halfway) = (budget.clone(), halfway.clone());
            tasks.push(tokio::spawn(async move {
                let mut share = budget.share();
                share.grow_to(2 * K).await;
                halfway.wait().await;
                share.grow_to(4 * K).await;
                share.grow_to(16 * K).await;
                // The CONNECT is read whole: the handshake ends, the share goes back.
            }));
        }
        for t in tasks {
            tokio::time::timeout(Duration::from_secs(5), t)
                .await
                .expect("every share finishes its CONNECT (no deadlock)")
                .unwrap();
        }
        assert_eq!(net.preauth_buffer_bytes.load(Relaxed), 0);
        assert_eq!(budget.permits.available_permits(), 48 * K);
        assert_eq!(budget.reserve.available_permits(), 16 * K);
    }

    #[test]
    fn a_connect_buffer_doubles_from_the_first_read_up_to_the_declared_connect() {
        assert_eq!(next_connect_capacity(0, None, 512), 512);
        assert_eq!(next_connect_capacity(512, None, 512), 1024);
        assert_eq!(next_connect_capacity(512, Some(700), 512), 700);
        assert_eq!(next_connect_capacity(0, Some(20), 512), 20);
        assert_eq!(next_connect_capacity(32768, Some(65536), 512), 65536);
    }

    #[test]
    fn a_bucket_holds_its_burst_and_refills_at_its_rate() {
        let t0 = Instant::now();
        let mut b = Bucket::new(100, Duration::from_millis(500), t0);
        assert_eq!(b.tokens, 50.0);
        b.take(50.0);
        assert_eq!(b.until(1.0), Duration::from_millis(10));
        b.refill(t0 + Duration::from_millis(100));
        assert!((b.tokens - 10.0).abs() < 1e-9, "{}", b.tokens);
        b.refill(t0 + Duration::from_secs(60));
        assert_eq!(b.tokens, 50.0, "never more than the burst");
    }

    /// A pause of ours is credited once, at the full rate and past the burst: what the
    /// client sent meanwhile is not a burst over its rate, and nothing more is granted.
    #[test]
    fn a_pause_of_ours_is_credited_once() {
        let t0 = Instant::now();
        let mut b = Bucket::new(100, Duration::from_millis(100), t0);
        b.take(10.0);
        // Paused at 50 ms (refilled to 5 tokens then), let go at 1,050 ms.
        b.refill(t0 + Duration::from_millis(50));
        b.excuse(Duration::from_secs(1), t0 + Duration::from_millis(1050));
        assert!((b.tokens - 105.0).abs() < 1e-9, "{}", b.tokens);
        // Spent above the burst without being capped back down, then refilled as usual.
        b.take(100.0);
        b.refill(t0 + Duration::from_millis(1100));
        assert!((b.tokens - 10.0).abs() < 1e-9, "{}", b.tokens);
    }

    #[test]
    fn ipv6_sources_count_per_64_prefix_and_mapped_ipv4_as_ipv4() {
        let key = |s: &str| source_key(s.parse().unwrap());
        assert_eq!(key("2001:db8:1:2:aaaa::1"), key("2001:db8:1:2:ffff::9"));
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
        assert_eq!(key("2001:db8:1:2:aaaa::1").to_string(), "2001:db8:1:2::");
        assert_eq!(key("::ffff:10.0.0.7"), key("10.0.0.7"));
        assert_ne!(key("10.0.0.7"), key("10.0.0.8"));
    }

    #[test]
    fn unlimited_rates_make_no_limiter() {
        assert!(RateLimits::from_config(&limits()).is_none());
        assert!(ConnectionLimits::new(&limits(), Instant::now()).is_none());
    }

    #[test]
    fn only_publish_packets_take_message_tokens() {
        let mut l = limits();
        l.max_messages_per_sec = 2;
        l.rate_burst_ms = 1000;
        let t0 = Instant::now();
        let mut r = ClientRates::new(&RateLimits::from_config(&l).unwrap(), t0);
        for _ in 0..2 {
            assert!(r.admits(PUBLISH));
            r.charge(true, 10);
        }
        assert!(!r.admits(PUBLISH));
        assert!(r.admits(PINGREQ), "other packets pass");
        assert_eq!(r.wait(PUBLISH), Duration::from_millis(500));
        r.refill(t0 + Duration::from_millis(500));
        assert!(r.admits(PUBLISH));
    }

    #[test]
    fn a_packet_larger_than_the_byte_burst_passes_and_the_next_waits_for_its_debt() {
        let mut l = limits();
        l.max_bytes_per_sec = 1000;
        l.rate_burst_ms = 100;
        let t0 = Instant::now();
        let mut r = ClientRates::new(&RateLimits::from_config(&l).unwrap(), t0);
        assert!(r.admits(PUBLISH));
        r.charge(true, 600);
        // 100 - 600 = -500 bytes: half a second at 1000 B/s.
        assert!(!r.admits(PINGREQ));
        assert_eq!(r.wait(PINGREQ), Duration::from_millis(500));
        assert_eq!(r.refilled(), Some(t0));
        r.refill(t0 + Duration::from_millis(500));
        assert!(r.admits(PINGREQ));
    }

    #[test]
    fn a_reload_of_the_rates_keeps_what_a_connection_already_used() {
        let mut l = limits();
        l.max_bytes_per_sec = 1000;
        l.max_messages_per_sec = 100;
        l.rate_burst_ms = 100;
        let live = LiveRates::new(RateLimits::from_config(&l));
        let t0 = Instant::now();
        let mut r = ClientRates::at_start(live.current().as_ref(), live.epoch(), t0).unwrap();
        r.charge(true, 10_000);
        // ~9,900 bytes of debt: ~10 s at 1000 B/s.
        assert!(!r.admits(PINGREQ));
        // Same rates but another reaction: no fresh burst for the client over its rate.
        l.rate_exceeded = RateExceeded::Disconnect;
        live.set(RateLimits::from_config(&l));
        let r = ClientRates::for_epoch(&live, Some(&r), 0).unwrap().unwrap();
        assert_eq!(r.exceeded, RateExceeded::Disconnect);
        assert!(!r.admits(PINGREQ), "a reload forgave the debt");
        assert!(r.wait(PINGREQ) > Duration::from_secs(9));
        // A lower rate: the same debt, repaid more slowly.
        l.max_bytes_per_sec = 500;
        live.set(RateLimits::from_config(&l));
        let r = ClientRates::for_epoch(&live, Some(&r), 0).unwrap().unwrap();
        assert!(r.wait(PINGREQ) > Duration::from_secs(18));
        // A higher one: repaid faster.
        l.max_bytes_per_sec = 1_000_000;
        live.set(RateLimits::from_config(&l));
        let r = ClientRates::for_epoch(&live, Some(&r), 0).unwrap().unwrap();
        assert!(r.wait(PINGREQ) < Duration::from_millis(20));
        // A level over the new burst is cut to it (9 messages of 10 left; the new burst is 1).
        l.max_messages_per_sec = 10;
        live.set(RateLimits::from_config(&l));
        let r = ClientRates::for_epoch(&live, Some(&r), 0).unwrap().unwrap();
        let messages = r.messages.as_ref().unwrap();
        assert!(messages.tokens <= 1.0 + 1e-9, "{}", messages.tokens);
        // A connection that had no buckets gets full ones.
        let r = ClientRates::for_epoch(&live, None, 0).unwrap().unwrap();
        assert!((r.messages.as_ref().unwrap().tokens - 1.0).abs() < 1e-9);
    }

    #[test]
    fn a_reload_that_lifts_the_rates_leaves_a_connection_no_buckets() {
        let mut l = limits();
        l.max_messages_per_sec = 10;
        let live = LiveRates::new(RateLimits::from_config(&l));
        let r = ClientRates::at_start(live.current().as_ref(), live.epoch(), Instant::now());
        assert!(r.is_some());
        live.set(None);
        let r = ClientRates::for_epoch(&live, r.as_deref(), 0).expect("the rates changed");
        assert!(
            r.is_none(),
            "unlimited, yet the connection keeps a box of buckets (and reads the clock per read)"
        );
        // Without buckets, and unlimited: nothing to do at the next reads either.
        assert!(ClientRates::for_epoch(&live, None, 0).is_none());
        // Limited again: full buckets.
        live.set(RateLimits::from_config(&l));
        let r = ClientRates::for_epoch(&live, None, 0).unwrap().unwrap();
        assert!(r.admits(PUBLISH));
        assert!(ClientRates::for_epoch(&live, Some(&r), 0).is_none());
    }

    #[test]
    fn address_counts_refuse_past_the_limit_drop_past_twice_and_forget_closed_addresses() {
        let counts = AddressCounts::new(2).unwrap();
        let a: IpAddr = "127.0.0.1".parse().unwrap();
        let b: IpAddr = "127.0.0.2".parse().unwrap();
        let checks: Vec<_> = (0..5).map(|i| counts.open(ConnId(i), a)).collect();
        use AddressCheck::*;
        assert_eq!(checks, [Allowed, Allowed, Busy, Busy, Drop]);
        assert_eq!(
            counts.open(ConnId(10), b),
            Allowed,
            "other addresses count alone"
        );
        counts.close(ConnId(0));
        counts.close(ConnId(4)); // dropped, never counted: no effect
        assert_eq!(counts.open(ConnId(11), a), Busy, "3 of 2 open again");
        for i in [1, 2, 3, 11] {
            counts.close(ConnId(i));
        }
        counts.close(ConnId(10));
        assert_eq!(counts.addresses(), 0, "no entry stays at zero");
        assert!(AddressCounts::new(0).is_none());
    }

    #[test]
    fn connection_rates_refuse_per_address_and_per_listener_and_take_nothing_when_refusing() {
        let mut l = limits();
        l.max_connection_rate = 3;
        l.max_connection_rate_per_address = 2;
        l.rate_burst_ms = 1000;
        let t0 = Instant::now();
        let mut c = ConnectionLimits::new(&l, t0).unwrap();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        assert_eq!(c.admit(a, t0), Ok(()));
        assert_eq!(c.admit(a, t0), Ok(()));
        assert_eq!(c.admit(a, t0), Err(Refusal::AddressConnectionRate));
        assert_eq!(c.admit(b, t0), Ok(()), "the listener had one left");
        assert_eq!(c.admit(b, t0), Err(Refusal::ConnectionRate));
        // b's refusal took nothing from b: after a third of a second the listener has one
        // token and b still has one.
        let t1 = t0 + Duration::from_millis(334);
        assert_eq!(c.admit(b, t1), Ok(()));
        assert_eq!(c.admit(a, t0 + Duration::from_secs(1)), Ok(()));
    }

    #[test]
    fn idle_address_buckets_are_forgotten() {
        let mut l = limits();
        l.max_connection_rate_per_address = 10;
        l.rate_burst_ms = 1000;
        let t0 = Instant::now();
        let mut c = ConnectionLimits::new(&l, t0).unwrap();
        for i in 0..1000u32 {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            assert_eq!(c.admit(ip, t0), Ok(()));
        }
        assert_eq!(c.tracked(), 1000);
        // One second later every bucket is full again: the next admission sweeps them.
        let later = t0 + Duration::from_secs(1);
        assert_eq!(c.admit("10.1.0.0".parse().unwrap(), later), Ok(()));
        assert_eq!(c.tracked(), 1);
    }

    #[test]
    fn a_scan_from_more_addresses_than_tracked_is_held_to_the_listener_rate_only() {
        let mut l = limits();
        l.max_connection_rate_per_address = 1;
        let t0 = Instant::now();
        let mut c = ConnectionLimits::new(&l, t0).unwrap();
        let ip = |i: usize| IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i as u32));
        for i in 0..MAX_RATE_ADDRESSES + 10 {
            assert_eq!(c.admit(ip(i), t0), Ok(()));
        }
        assert_eq!(c.tracked(), MAX_RATE_ADDRESSES, "the table stops growing");
        assert_eq!(c.admit(ip(0), t0), Err(Refusal::AddressConnectionRate));
        assert_eq!(c.admit(ip(MAX_RATE_ADDRESSES + 1), t0), Ok(()), "untracked");
    }
}
