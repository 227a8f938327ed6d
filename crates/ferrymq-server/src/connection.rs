//! One task per connection: a reader that decodes and forwards whole batches to the router, and
//! a writer that encodes everything queued for it into one buffer and writes it with one call.
//!
//! ```text
//!  socket ─read─▶ decode ─Vec<Packet>─▶ router ─Outbound queue + wake─▶ encode ─write─▶ socket
//! ```
//! Until CONNECT is accepted the reader handles the connection alone: a bad first packet gets a
//! CONNACK (when its version is known) or a plain close, and never reaches the engine.
//! Before authentication a connection holds little: its CONNECT's declared size is checked
//! against `mqtt.max_connect_size` as soon as the fixed header is in, and its read buffer
//! grows only with a share of the listeners' pre-auth budget (`limits::PreauthBudget`).
//!
//! One protocol path for every transport: the socket operations are behind the seam in
//! `transport.rs` (plain TCP on its borrowed halves; TLS and WebSocket as split byte
//! streams), and [`run`] is generic over it.
//!
//! Bounded: the reader does not read while its connection has too much queued for writing or
//! waiting for the router (`Outbound::poll_read_allowed`) or while the client is over its
//! message or byte rate (`limits::ClientRates`: it decodes only what the buckets admit), a
//! write that makes no progress within the write timeout closes the connection, and a
//! connection we close lingers (half-closed, draining input for a bounded time) so that the
//! client reads our last packets.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::BytesMut;
use ferrymq_core::{Action, ConnId, ConnectOutcome, Delivery};
use ferrymq_mqtt::{
    decode, encode, encode_publish, ConnAck, DecodeError, Limits, Packet, Properties,
    ProtocolVersion, PublishView, ReasonCode,
};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::config::{ListenerKind, RateExceeded};
use crate::limits::{AddressCounts, ClientRates, LiveRates, PreauthBudget, RateLimits, Refusal};
use crate::metrics::NetMetrics;
use crate::router::{Drains, Outbound, ToRouter};
use crate::transport::{ReadSide, Transport, WriteSide, MIN_READ};
/// A connection whose reservation has decayed to this size is treated as quiet.
const QUIET_READ: usize = 2 * 1024;
/// A batch is encoded and written in pieces of about this many bytes.
const WRITE_CHUNK: usize = 64 * 1024;
/// Largest write buffer kept between batches (a piece plus one large packet).
const MAX_IDLE_BUFFER: usize = 256 * 1024;
/// Lingering close: after the last write and a half-close, input is read and discarded for at
/// most this long or this many bytes before the socket is closed. Closing a socket with
/// unread input makes the kernel send RST instead of FIN, and a client still sending when
/// we disconnect it then loses the DISCONNECT (and its reason) we just wrote. Two seconds
/// cover a client that reads its socket at all; 64 KiB bounds what a flooding client costs
/// us (read into a stack buffer, nothing kept).
const LINGER_TIME: Duration = Duration::from_secs(2);
const LINGER_BYTES: usize = 64 * 1024;

/// What every connection of a listener shares.
pub(crate) struct Listener {
    /// Which `[listeners]` entry accepted the connection (the `listener` label in metrics).
    pub kind: ListenerKind,
    pub router: mpsc::Sender<ToRouter>,
    pub net: Arc<NetMetrics>,
    pub limits: Limits,
    pub connect_timeout: Duration,
    /// A write that makes no progress for this long closes the connection.
    pub write_timeout: Duration,
    /// Bytes queued for a connection past which its reader stops reading
    /// (`limits.max_outbound_bytes`; see [`Outbound::poll_read_allowed`]).
    pub max_outbound_bytes: usize,
    /// Where writers report congested queues that drained (see `router::Drains`).
    pub drains: Arc<Drains>,
    /// Per-client message and byte rates; `None` when unlimited (the reader then has no
    /// buckets and reads no clock for them).
    pub rates: Option<RateLimits>,
    /// The rates in force now, for connections that outlive this listener state (a reload
    /// of the rates reaches them), and the epoch `rates` are of.
    pub live_rates: Arc<crate::limits::LiveRates>,
    pub rates_epoch: u64,
    /// Open connections per source address, when `limits.max_connections_per_address` is set.
    pub addresses: Option<Arc<AddressCounts>>,
    /// Limits of the first packet: `limits` with `max_packet_size` cut to the largest CONNECT
    /// (`Config::max_connect_size`).
    pub connect_limits: Limits,
    /// Read buffer of connections still reading their CONNECT, shared by every listener.
    pub preauth: Arc<PreauthBudget>,
    /// Who a client is (`auth.rs`), decided in the handshake.
    pub auth: Arc<crate::auth::Authenticator>,
    /// Connects, disconnects and authentication failures are recorded here (`audit.rs`).
    pub audit: crate::audit::Audit,
}

/// How often a reader held back by its rate limit marks the connection as read: the client's
/// silence is ours while we do not read it, and the router's keep-alive check (at 1.5 times a
/// keep alive of at least 1 s) must not close it for that.
const THROTTLE_MARK: Duration = Duration::from_millis(500);

/// One connection's arguments. Kept small on purpose: an async fn keeps its arguments for the
/// life of its future, next to the locals they are moved into, so every byte here is two
/// bytes in every idle connection.
pub(crate) struct ConnContext {
    pub conn: ConnId,
    pub listener: Arc<Listener>,
    /// What only the CONNECT handshake uses beyond the socket, boxed and taken by the
    /// handshake: 8 bytes in every connection (the size of the field it replaced), and no
    /// allocation for a plain TCP connection under its limits (None): the peer's address
    /// comes from the socket, its listener from `listener`.
    pub admission: Option<Box<Admission>>,
}

/// The handshake's inputs from the accept loop and the transport, when there are any.
#[derive(Default)]
pub(crate) struct Admission {
    /// A connection limit is reached: answer CONNECT with its refusal.
    pub refusal: Option<Refusal>,
    /// See [`PeerIdentity::cert_user`].
    pub cert_user: Option<Arc<str>>,
    /// A WebSocket connection's part of the pre-auth budget for its framing layer, given
    /// back when the handshake ends (`listen.rs`).
    pub preauth: Option<crate::limits::PreauthHold>,
    /// The client's address from a PROXY header (the socket's is the load balancer's).
    pub peer: Option<SocketAddr>,
}

/// Who is at the other end, as the transport knows it: what authentication may use besides
/// the CONNECT itself. Made by [`handshake`] (from the socket, the listener and the
/// [`Admission`]) and used there only: nothing of it outlives the handshake.
pub(crate) struct PeerIdentity {
    /// The client's address.
    pub addr: SocketAddr,
    /// The listener that accepted it.
    pub listener: ListenerKind,
    /// The user name of a verified TLS client certificate, when `tls.cert_username` asks for
    /// one (`cn` or `san`) and the certificate has that name. The handshake makes it the
    /// CONNECT's user name, replacing what the client sent, before the router sees it.
    pub cert_user: Option<Arc<str>>,
}

/// Why the reader stopped.
enum ReadEnd {
    /// EOF or an I/O error: the router must be told.
    Gone,
    /// We asked the router to end it; the writer will close.
    Ending,
}

/// Why the reader stopped decoding what it has buffered.
enum Halt {
    /// A packet failed to decode: the connection is closed with this reason.
    Bad(ReasonCode),
    /// The next packet is over the client's rate limit.
    OverRate,
}

/// Why the writer stopped.
enum WriteEnd {
    /// The router closed the connection; everything queued is written and the socket
    /// half-closed.
    Closed,
    /// The socket failed: the router must be told.
    Failed,
    /// The socket accepted no byte for the write timeout (a client that does not read): the
    /// router must be told.
    Stalled,
}

/// The context lives as long as the connection's task, so it counts the connection as open
/// until dropped, whichever way the task ends.
impl Drop for ConnContext {
    fn drop(&mut self) {
        let net = &self.listener.net;
        let relaxed = std::sync::atomic::Ordering::Relaxed;
        net.connections_open.fetch_sub(1, relaxed);
        net.listener_open[self.listener.kind as usize].fetch_sub(1, relaxed);
        if let Some(addresses) = &self.listener.addresses {
            addresses.close(self.conn);
        }
    }
}

/// The connection's whole life, on any transport (a `TcpStream`, or a TLS or WebSocket
/// stream in `transport::Split`).
///
/// A plain fn returning an `async move` block, here and for the two loops: an `async fn`
/// moves its arguments into locals and keeps both copies for the life of the future, while
/// a block uses what it captured in place. Spawned directly (no wrapping block), since every
/// level of nesting would store its arguments again.
// Not an `async fn` on purpose: see above.
#[allow(clippy::manual_async_fn)]
pub(crate) fn run<T: Transport>(
    mut stream: T,
    mut ctx: ConnContext,
) -> impl Future<Output = ()> + Send {
    async move {
        let (mut rd, mut wr) = stream.halves();
        let mut buf = BytesMut::new();
        let admission = ctx.admission.take();
        // Boxed: the handshake's state lives on the heap only while it runs, instead of
        // widening this future (which every idle connection keeps for life) by its size.
        let handshake = handshake(&mut rd, &mut wr, &mut buf, &ctx, admission);
        let Some((outcome, outbound)) = Box::pin(handshake).await else {
            return;
        };
        let end = {
            // The loops borrow what they use: owned arguments would be stored again in each
            // loop's future next to this one's copies.
            // Each loop gets only the fields of the outcome it uses.
            let writer = write_loop(
                &mut wr,
                &outbound,
                outcome.version,
                outcome.client_topic_alias_maximum,
                &ctx.listener,
            );
            let accepted = outcome.accepted.then_some(outcome.version);
            let reader = read_loop(&mut rd, &mut buf, accepted, &ctx, &outbound);
            // Whichever ends first. One pinned pair: a pin per loop and a `poll_fn` over both
            // kept 32 bytes here, this 16 (`select!` kept 40).
            let loops = Loops { reader, writer };
            tokio::pin!(loops);
            let first = loops.as_mut().await;
            match first {
                Ok(ReadEnd::Gone) => WriteEnd::Failed,
                Ok(ReadEnd::Ending) => {
                    // Let the writer flush the DISCONNECT, but not forever. (Boxed, like every
                    // one-off wait here, so it does not widen the long-lived future.)
                    let writer = loops.as_mut().project().writer;
                    let flush = tokio::time::timeout(Duration::from_secs(5), writer);
                    Box::pin(flush).await.unwrap_or(WriteEnd::Failed)
                }
                Err(end) => end,
            }
        };
        if let WriteEnd::Stalled = end {
            tracing::debug!(
                conn = ctx.conn.0,
                client_id = &*outbound.client_id(),
                "closing connection: no write progress within the write timeout"
            );
        }
        if let WriteEnd::Closed = end {
            // We ended it and the peer may still be sending: linger so that it reads our last
            // packets (a DISCONNECT with its reason) instead of a reset.
            Box::pin(linger(&mut rd)).await;
        } else {
            let closed = ToRouter::Closed { conn: ctx.conn };
            let _ = Box::pin(ctx.listener.router.send(closed)).await;
        }
    }
}

pin_project_lite::pin_project! {
    /// A connection's reader and writer, polled together until one ends (the reader first).
    struct Loops<R, W> {
        #[pin]
        reader: R,
        #[pin]
        writer: W,
    }
}

impl<R, W> Future for Loops<R, W>
where
    R: Future<Output = ReadEnd>,
    W: Future<Output = WriteEnd>,
{
    type Output = Result<ReadEnd, WriteEnd>;

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(end) = this.reader.poll(cx) {
            return Poll::Ready(Ok(end));
        }
        this.writer.poll(cx).map(Err)
    }
}

/// Lingering close, once our last bytes are written and the socket half-closed: reads and
/// discards input until EOF, [`LINGER_BYTES`] or [`LINGER_TIME`], whichever comes first
/// (see there for why). Only a stack buffer, and only while a read runs.
async fn linger<R: ReadSide>(rd: &mut R) {
    let mut drained = 0;
    let drain = std::future::poll_fn(|cx| loop {
        let mut scratch = [0u8; 2048];
        match std::task::ready!(rd.poll_discard(cx, &mut scratch)) {
            Ok(0) | Err(_) => return Poll::Ready(()),
            Ok(n) => {
                drained += n;
                if drained >= LINGER_BYTES {
                    return Poll::Ready(());
                }
            }
        }
    });
    let _ = tokio::time::timeout(LINGER_TIME, drain).await;
}

/// Reads the CONNECT and hands it to the router. `None` when the connection ends here.
///
/// Builds the connection's [`PeerIdentity`]; with a certificate user name, that name replaces
/// the CONNECT's before the router sees it. (Authentication takes `peer` from here.)
async fn handshake<R: ReadSide, W: WriteSide>(
    rd: &mut R,
    wr: &mut W,
    buf: &mut BytesMut,
    ctx: &ConnContext,
    admission: Option<Box<Admission>>,
) -> Option<(ConnectOutcome, Arc<Outbound>)> {
    let deadline = Instant::now() + ctx.listener.connect_timeout;
    // This connection's part of the pre-auth budget: taken before the buffer grows, given
    // back when this function returns, however it returns (dropped with its future).
    let mut share = ctx.listener.preauth.share();
    // A WebSocket connection already holds its part (a whole frame and the upgrade's buffer,
    // more than a largest CONNECT): asking the budget again would be hold-and-wait. The
    // budget is FIFO, so with a WebSocket hold waiting at its head no holder could grow, none
    // would finish, and every pre-auth connection stalled until its connect timeout.
    let covered = admission.as_ref().is_some_and(|a| a.preauth.is_some());
    let first = loop {
        // The CONNECT size limit is the decoder's packet limit here: checked from the fixed
        // header, before the rest is buffered.
        match decode(buf, ProtocolVersion::V5, &ctx.listener.connect_limits) {
            Ok(Some(p)) => break p,
            Ok(None) => {}
            Err(e) => {
                NetMetrics::add(&ctx.listener.net.malformed_packets, 1);
                ctx.listener.net.disconnects.add(e.reason_code());
                tracing::debug!(conn = ctx.conn.0, error = %e, "bad first packet");
                let answer = match e {
                    // A 3.x client understands a 3.1.1 CONNACK; a 5.0+ one a 5.0 CONNACK.
                    DecodeError::UnsupportedProtocol { level } if level < 5 => Some((
                        ProtocolVersion::V311,
                        ReasonCode::UnsupportedProtocolVersion,
                    )),
                    DecodeError::UnsupportedProtocol { .. } => {
                        Some((ProtocolVersion::V5, ReasonCode::UnsupportedProtocolVersion))
                    }
                    // 3.1.1 has no code for it: just closed.
                    DecodeError::PacketTooLarge { .. } => ferrymq_mqtt::connect_version(buf)
                        .filter(|v| *v == ProtocolVersion::V5)
                        .map(|v| (v, ReasonCode::PacketTooLarge)),
                    _ => None,
                };
                if let Some((v, reason)) = answer {
                    // Nothing more of it is read: its buffer and share go before the linger.
                    *buf = BytesMut::new();
                    drop(share);
                    refuse(wr, v, reason, ctx).await;
                    linger(rd).await;
                }
                return None;
            }
        }
        // Room for the next read, granted by the budget first (waiting, unread, while it has
        // none). Read only into that room (`read_some` with a zero chunk does not reserve).
        if buf.capacity() == buf.len() {
            let declared = ferrymq_mqtt::packet_len(buf).ok().flatten();
            let largest = ctx.listener.connect_limits.max_packet_size;
            let want = crate::limits::next_connect_capacity(buf.capacity(), declared, MIN_READ)
                .min(largest);
            let grant = match covered {
                true => Ok(()),
                false => tokio::time::timeout_at(deadline, share.grow_to(want)).await,
            };
            if grant.is_err() {
                tracing::debug!(
                    conn = ctx.conn.0,
                    "no CONNECT within the connect timeout (pre-auth budget full)"
                );
                return None;
            }
            let mut grown = BytesMut::with_capacity(want);
            grown.extend_from_slice(buf);
            *buf = grown;
        }
        let read = tokio::time::timeout_at(deadline, read_some(rd, buf, &mut 0)).await;
        match read {
            Ok(Ok(n)) if n > 0 => NetMetrics::add(&ctx.listener.net.bytes_received, n as u64),
            Ok(_) => return None,
            Err(_) => {
                tracing::debug!(conn = ctx.conn.0, "no CONNECT within the connect timeout");
                return None;
            }
        }
    };
    let Packet::Connect(mut connect) = first else {
        // The first packet must be CONNECT (MQTT-3.1.0-1).
        NetMetrics::add(&ctx.listener.net.malformed_packets, 1);
        ctx.listener.net.disconnects.add(ReasonCode::ProtocolError);
        tracing::debug!(
            conn = ctx.conn.0,
            packet = first.name(),
            "first packet is not CONNECT"
        );
        return None;
    };
    let admission = admission.map(|a| *a).unwrap_or_default();
    let peer = PeerIdentity {
        addr: match admission.peer {
            Some(addr) => addr,
            None => rd.peer_addr()?,
        },
        listener: ctx.listener.kind,
        cert_user: admission.cert_user,
    };
    if let Some(refusal) = admission.refusal {
        // Counted per limit, logged at debug only: hostile clients must not fill the log.
        NetMetrics::add(&ctx.listener.net.connections_refused[refusal as usize], 1);
        tracing::debug!(
            conn = ctx.conn.0,
            peer = %peer.addr,
            listener = peer.listener.name(),
            limit = refusal.label(),
            "connection refused"
        );
        // Nothing more of it is read: its buffer and share go before the linger (a WebSocket
        // hold stays: the framing layer may still read a frame while lingering).
        *buf = BytesMut::new();
        drop(share);
        refuse(wr, connect.version, refusal.reason_code(), ctx).await;
        linger(rd).await;
        return None;
    }
    // ---- authentication (auth.rs): the one hook between CONNECT and the engine ----
    // The peer's address keys the failure rate limit; a verified TLS client certificate's
    // user name (`[tls] cert_username`) authenticates by itself.
    let check =
        ctx.listener
            .auth
            .authenticate(&connect, Some(peer.addr.ip()), peer.cert_user.as_deref());
    let checked = tokio::time::timeout(ctx.listener.connect_timeout, check).await;
    let who = match checked.unwrap_or(Err(crate::auth::AuthRefusal::Busy)) {
        Ok(who) => Box::new(who),
        Err(refusal) => {
            NetMetrics::add(&ctx.listener.net.auth_refused[refusal as usize], 1);
            crate::audit::auth_failure(&ctx.listener, &peer.addr, &connect, refusal.label());
            tracing::debug!(
                conn = ctx.conn.0,
                client_id = connect.client_id.as_str(),
                ?refusal,
                "authentication refused"
            );
            *buf = BytesMut::new();
            drop(share);
            refuse(wr, connect.version, refusal.reason_code(), ctx).await;
            linger(rd).await;
            return None;
        }
    };
    // ---- end of the authentication hook ----
    // A verified certificate's name is who the client is, whatever its CONNECT claimed.
    if let Some(user) = peer.cert_user {
        connect.username = Some(user.to_string());
    }
    let audit = ctx.listener.audit.on().then(|| {
        let kind = ctx.listener.kind.name();
        Box::new(crate::audit::Connected::new(
            &connect, &who, peer.addr, kind,
        ))
    });
    let outbound = Arc::new(Outbound::new(ctx.conn, ctx.listener.drains.clone()));
    outbound.mark_read();
    let (reply, outcome) = oneshot::channel();
    let msg = ToRouter::Connect {
        conn: ctx.conn,
        connect,
        who,
        origin: crate::peers::Origin {
            addr: peer.addr,
            listener: peer.listener,
        },
        outbound: outbound.clone(),
        reply,
        audit,
    };
    ctx.listener.router.send(msg).await.ok()?;
    let outcome = outcome.await.ok()?;
    Some((outcome, outbound))
}

async fn refuse<W: WriteSide>(
    wr: &mut W,
    v: ProtocolVersion,
    reason: ReasonCode,
    ctx: &ConnContext,
) {
    let ack = ConnAck {
        session_present: false,
        reason,
        properties: Properties::default(),
    };
    let mut out = BytesMut::new();
    if encode(&Packet::ConnAck(ack), v, &mut out).is_ok() {
        let sent = wr.try_write(&out).unwrap_or(out.len());
        if sent < out.len() || wr.unflushed() {
            let timeout = ctx.listener.write_timeout;
            if wr.write_stalled(&out[sent..], timeout).await.is_err() {
                return;
            }
        }
        wr.shutdown().await;
    }
}

/// Waits for data, then reads it (see [`ReadSide::poll_read_some`]). The buffer is only
/// allocated once the socket is readable, so an idle connection holds no read buffer (the
/// caller frees it when it empties). `chunk` is the connection's current reservation size,
/// adapted to its traffic.
///
/// One `poll_fn` over the socket's own reader slot: it holds just the three references
/// (an `async fn` held 64 bytes, and `readable()` would add a 168-byte waiter).
fn read_some<'a, R: ReadSide>(
    rd: &'a mut R,
    buf: &'a mut BytesMut,
    chunk: &'a mut usize,
) -> impl Future<Output = std::io::Result<usize>> + 'a {
    std::future::poll_fn(move |cx| rd.poll_read_some(cx, buf, chunk))
}

// Not an `async fn` on purpose: see `run`.
#[allow(clippy::manual_async_fn)]
fn read_loop<'a, R: ReadSide>(
    rd: &'a mut R,
    buf: &'a mut BytesMut,
    accepted: Option<ProtocolVersion>,
    ctx: &'a ConnContext,
    outbound: &'a Arc<Outbound>,
) -> impl Future<Output = ReadEnd> + Send + 'a {
    async move {
        let Some(version) = accepted else {
            // The writer sends the refusal and closes.
            return ReadEnd::Ending;
        };
        // `ctx.conn`, not a copy: a local kept across the waits is 8 more bytes per connection.
        // Keep alive is the router's job (it checks `outbound.last_read` of every connection a
        // few times a second): a timer here would be ~112 bytes in every idle connection.
        let mut chunk = MIN_READ;
        // Boxed, and only with a rate limit: the future carries a pointer.
        let mut rates = ClientRates::at_start(
            ctx.listener.rates.as_ref(),
            ctx.listener.rates_epoch,
            Instant::now(),
        );
        loop {
            // A reload changed the rates: this connection takes them too.
            if let Some(fresh) = ClientRates::for_epoch(
                &ctx.listener.live_rates,
                rates.as_deref(),
                ctx.listener.rates_epoch,
            ) {
                rates = fresh;
            }
            if let Some(r) = rates.as_deref_mut() {
                r.refill(Instant::now());
            }
            // Decode what is buffered, as far as the rate limit lets. A bad packet ends the
            // loop here and is handled below, outside the `match`: held across an await, the
            // decode result would be ~100 bytes more in every connection's future.
            let buffered = buf.len();
            // Made per batch and moved to the router, so that it is not held across the waits
            // below (24 bytes in every connection's future).
            let mut packets = Vec::new();
            let halt = loop {
                if let (Some(r), Some(&first)) = (rates.as_deref(), buf.first()) {
                    if !r.admits(first) {
                        break Some(Halt::OverRate);
                    }
                }
                let before = buf.len();
                match decode(buf, version, &ctx.listener.limits) {
                    Ok(Some(p)) => {
                        if let Some(r) = rates.as_deref_mut() {
                            r.charge(matches!(p, Packet::Publish(_)), before - buf.len());
                        }
                        packets.push(p);
                    }
                    Ok(None) => break None,
                    Err(e) => {
                        NetMetrics::add(&ctx.listener.net.malformed_packets, 1);
                        tracing::debug!(conn = ctx.conn.0, client_id = &*outbound.client_id(), error = %e, "closing connection: bad packet");
                        break Some(Halt::Bad(e.reason_code()));
                    }
                }
            };
            let violation = match halt {
                Some(Halt::Bad(reason)) => Some(reason),
                Some(Halt::OverRate)
                    if rates.as_deref().map(|r| r.exceeded) == Some(RateExceeded::Disconnect) =>
                {
                    tracing::debug!(
                        conn = ctx.conn.0,
                        client_id = &*outbound.client_id(),
                        "closing connection: over its rate limit"
                    );
                    Some(ReasonCode::MessageRateTooHigh)
                }
                _ => None,
            };
            // What this batch holds until the router has run it: the input its payloads
            // share, and the packets.
            let unrouted =
                buffered.saturating_sub(buf.len()) + packets.len() * std::mem::size_of::<Packet>();
            if let Some(reason) = violation {
                let router = &ctx.listener.router;
                if !packets.is_empty() {
                    let unrouted = outbound.unrouted(unrouted);
                    let msg = ToRouter::Packets {
                        conn: ctx.conn,
                        packets,
                        _unrouted: unrouted,
                    };
                    let _ = Box::pin(deliver_to_router(router, msg)).await;
                }
                let msg = ToRouter::Violation {
                    conn: ctx.conn,
                    reason,
                };
                let _ = Box::pin(deliver_to_router(router, msg)).await;
                return ReadEnd::Ending;
            }
            if packets.is_empty() {
                // Moved on every path, so that nothing of it is kept across the waits below.
                drop(packets);
            } else {
                let msg = ToRouter::Packets {
                    conn: ctx.conn,
                    packets,
                    _unrouted: outbound.unrouted(unrouted),
                };
                let sent = match send_to_router(&ctx.listener.router, msg) {
                    Ok(()) => true,
                    Err(RouterWait::Full(wait)) => wait.await.is_ok(),
                    Err(RouterWait::Closed) => false,
                };
                if !sent {
                    return ReadEnd::Gone;
                }
            }
            // Throttle: while the bucket does not admit the next packet, read nothing, so TCP
            // slows the client; then decode what is buffered before reading more. (Asked again
            // rather than kept from the decode loop: a flag kept across the wait above would
            // widen every connection's future.)
            if let (Some(r), Some(&first)) = (rates.as_deref(), buf.first()) {
                if !r.admits(first) {
                    Box::pin(throttle(r, first, outbound, &ctx.listener.live_rates)).await;
                    continue;
                }
            }
            // Back-pressure: while this connection has more than its bound queued for writing or
            // waiting for the router, read nothing, so TCP holds the client back (see
            // `Outbound::poll_read_allowed`).
            // A rate-limited client is not charged for the time we did not read it.
            std::future::poll_fn(|cx| {
                let allowed = outbound.poll_read_allowed(cx, ctx.listener.max_outbound_bytes);
                if allowed.is_pending() {
                    if let Some(r) = rates.as_deref_mut() {
                        r.paused(Instant::now());
                    }
                }
                allowed
            })
            .await;
            if let Some(r) = rates.as_deref_mut() {
                r.resumed();
            }
            if buf.is_empty() && buf.capacity() > 0 && chunk <= QUIET_READ {
                // Nothing pending and recent reads were small: give the buffer back while we wait,
                // so idle connections stay lean. Busy connections keep theirs (freeing and
                // refaulting 64 KiB per read cost ~12% of a fan-in profile in page clearing).
                *buf = BytesMut::new();
            }
            match read_some(rd, buf, &mut chunk).await {
                Ok(0) | Err(_) => return ReadEnd::Gone,
                Ok(n) => {
                    outbound.mark_read();
                    NetMetrics::add(&ctx.listener.net.bytes_received, n as u64);
                }
            }
        }
    }
}

/// Waits until `rates` admit the packet starting with `first_byte`, marking the connection as
/// read every [`THROTTLE_MARK`]: keep alive must not close a client for a silence that is
/// our throttle (the router's check reads `Outbound::mark_read`'s stamps). Ends early, at
/// the next mark, when a reload changed the rates (`live`): the wait was for the old ones,
/// and a reload that lifts them must not leave the client waiting out an old debt.
async fn throttle(rates: &ClientRates, first_byte: u8, outbound: &Outbound, live: &LiveRates) {
    let Some(refilled) = rates.refilled() else {
        return;
    };
    let until = refilled + rates.wait(first_byte);
    loop {
        outbound.mark_read();
        let now = Instant::now();
        if now >= until || rates.is_stale(live) {
            return;
        }
        tokio::time::sleep_until(until.min(now + THROTTLE_MARK)).await;
    }
}

/// Sends to the router without waiting when its queue has room (almost always). When it is
/// full, returns the wait, boxed: inline, a send's state would widen every connection's
/// future for a path that is rarely taken. Waiting there is what pushes back on a publisher.
fn send_to_router(router: &mpsc::Sender<ToRouter>, msg: ToRouter) -> Result<(), RouterWait<'_>> {
    match router.try_send(msg) {
        Ok(()) => Ok(()),
        Err(mpsc::error::TrySendError::Full(msg)) => {
            Err(RouterWait::Full(Box::pin(router.send(msg))))
        }
        Err(mpsc::error::TrySendError::Closed(_)) => Err(RouterWait::Closed),
    }
}

type SendFuture<'a> = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<(), mpsc::error::SendError<ToRouter>>> + Send + 'a>,
>;

enum RouterWait<'a> {
    Full(SendFuture<'a>),
    Closed,
}

/// Sends to the router, waiting if its queue is full; false when the router is gone.
async fn deliver_to_router(router: &mpsc::Sender<ToRouter>, msg: ToRouter) -> bool {
    match send_to_router(router, msg) {
        Ok(()) => true,
        Err(RouterWait::Full(wait)) => wait.await.is_ok(),
        Err(RouterWait::Closed) => false,
    }
}

/// Outbound topic aliases (5.0): the first sends of a topic carry it and an alias, later ones
/// only the alias, up to the client's Topic Alias Maximum. When all are used, topics go in full.
struct AliasMap {
    max: u16,
    /// Boxed and created with the first alias: most connections never use one, and inline
    /// the map is 48 bytes in every connection's future.
    #[allow(clippy::box_collection)]
    map: Option<Box<HashMap<Arc<str>, u16>>>,
}

/// Writes until the router closes the connection or the socket fails or stalls.
// Not an `async fn` on purpose: see `run`.
#[allow(clippy::manual_async_fn)]
fn write_loop<'a, W: WriteSide>(
    wr: &'a mut W,
    outbound: &'a Outbound,
    version: ProtocolVersion,
    alias_max: u16,
    listener: &'a Listener,
) -> impl Future<Output = WriteEnd> + Send + 'a {
    async move {
        let mut aliases = AliasMap {
            max: alias_max,
            map: None,
        };
        let mut actions = Vec::new();
        let mut out = BytesMut::new();
        loop {
            outbound.take(&mut actions);
            if actions.is_empty() {
                // Waiting: hold no buffers. Idle connections are most of a broker's connections,
                // and the action list alone is ~450 bytes after a CONNACK. (Busy connections
                // freed theirs here before too: their lists outgrow any small keep-threshold.)
                actions = Vec::new();
                out = BytesMut::new();
                outbound.wait().await;
                continue;
            }
            // Encode up to WRITE_CHUNK bytes, write them, go on: a big batch (a burst queues
            // megabytes) goes out through one reused buffer, instead of a buffer grown, and
            // copied at every doubling, to the size of the whole batch.
            // Reversed, so that actions are taken from the end: no index is kept across the
            // writes' awaits (it would widen every connection's future).
            let mut close = false;
            actions.reverse();
            while !actions.is_empty() {
                // Publish-to-deliver latency, counted per chunk and added before the write's
                // await (held across it, it would widen every connection's future).
                let mut latency = listener.net.delivery.batch();
                while out.len() < WRITE_CHUNK {
                    let Some(action) = actions.pop() else {
                        break;
                    };
                    match action {
                        Action::Send(packet) => {
                            if let Err(e) = encode(&packet, version, &mut out) {
                                tracing::warn!(client_id = &*outbound.client_id(), error = %e, packet = packet.name(), "cannot encode outbound packet");
                            }
                        }
                        Action::Deliver(d) => {
                            latency = latency.record(&d);
                            if let Err(e) = encode_delivery(&d, version, &mut aliases, &mut out) {
                                tracing::warn!(client_id = &*outbound.client_id(), error = %e, "cannot encode outbound PUBLISH");
                            }
                        }
                        Action::Close => {
                            close = true;
                            actions.clear();
                        }
                    }
                }
                latency.flush();
                if out.is_empty() {
                    continue;
                }
                // Straight into the socket when it has room (nearly always); the wait for room,
                // with its timer, is boxed so that it does not widen every connection.
                let sent = match wr.try_write(&out) {
                    Ok(n) => n,
                    Err(_) => return WriteEnd::Failed,
                };
                if sent < out.len() || wr.unflushed() {
                    let rest = &out[sent..];
                    match Box::pin(wr.write_stalled(rest, listener.write_timeout)).await {
                        Ok(()) => {}
                        Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {
                            return WriteEnd::Stalled
                        }
                        Err(_) => return WriteEnd::Failed,
                    }
                }
                NetMetrics::add(&listener.net.bytes_sent, out.len() as u64);
                out.clear();
            }
            if out.capacity() > MAX_IDLE_BUFFER {
                out = BytesMut::new();
            }
            if close {
                // Half-close: the peer reads our FIN after everything written; `run` lingers.
                wr.shutdown().await;
                return WriteEnd::Closed;
            }
        }
    }
}

/// Encodes a delivery straight from the shared message: no copy of topic or payload into an
/// owned packet, and the message's own properties when nothing about them changes.
fn encode_delivery(
    d: &Delivery,
    version: ProtocolVersion,
    aliases: &mut AliasMap,
    out: &mut BytesMut,
) -> Result<(), ferrymq_mqtt::EncodeError> {
    let m = &d.message;
    let mut properties = d.properties();
    let mut topic: &str = &m.topic;
    if version == ProtocolVersion::V5 && aliases.max > 0 {
        let map = aliases.map.get_or_insert_with(Default::default);
        let alias = match map.get(&m.topic) {
            Some(&alias) => {
                topic = "";
                Some(alias)
            }
            None if map.len() < usize::from(aliases.max) => {
                let alias = map.len() as u16 + 1;
                map.insert(m.topic.clone(), alias);
                Some(alias)
            }
            None => None,
        };
        if alias.is_some() {
            properties.to_mut().topic_alias = alias;
        }
    }
    let view = PublishView {
        dup: d.dup,
        qos: d.qos,
        retain: d.retain,
        topic,
        packet_id: d.packet_id,
        properties: &properties,
        payload: &m.payload,
    };
    encode_publish(&view, version, out)
}

#[cfg(test)]
mod tests {
    /// Every idle connection keeps its `run` future for life (it is the spawned task), so its
    /// size is memory per connection: 392 bytes in release with rustc 1.95, which with tokio's
    /// task header and trailer (rounded to 128-byte lines; larger under `--cfg tokio_unstable`)
    /// makes a 512-byte task up to 400 bytes, and a 640-byte one past it. The exact
    /// figure is the compiler's layout, so it is a measurement, printed here and logged by
    /// the server at start (`connection_future_bytes`); this only catches a regression to
    /// the sizes before the idle-memory work (792 bytes and up).
    #[test]
    fn the_connection_future_stays_small() {
        let size = crate::connection_future_bytes();
        println!("connection future: {size} bytes");
        assert!(size < 768, "connection future is {size} bytes");
    }
}
