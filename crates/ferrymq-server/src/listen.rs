//! The MQTT listeners (`[listeners]` mqtt, mqtts, ws, wss): bind every address, accept,
//! count per listener, apply the connection limits, and hand each connection to its
//! transport. Plain TCP goes straight to `connection::run`; TLS and WebSocket first do their
//! handshake in the connection's own task (bounded by `limits.connect_timeout_secs`), so a
//! slow handshake never holds the accept loop.
//!
//! The connection limits (open connections, per address, connection rates) are the broker's,
//! shared by all listeners.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferrymq_core::ConnId;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::config::{Config, Transport};
use crate::connection::{self, Admission, ConnContext, PeerIdentity};
use crate::limits;
use crate::metrics::NetMetrics;
use crate::tls::TlsState;
use crate::transport::Split;
use crate::websocket;
use crate::ServerError;

/// A bound listening socket.
pub(crate) struct Bound {
    pub transport: Transport,
    pub socket: TcpListener,
    pub addr: SocketAddr,
}

/// Binds every MQTT listener address: set ones first (a failure is an error), then the
/// defaults (one whose port is taken is skipped with a warning).
pub(crate) async fn bind_all(config: &Config) -> Result<Vec<Bound>, ServerError> {
    let mut listeners = config.listeners.mqtt_listeners(config.tls.is_some());
    listeners.sort_by_key(|l| l.implicit);
    let mut bound = Vec::new();
    for l in listeners {
        for &addr in &l.addrs.0 {
            match TcpListener::bind(addr).await {
                Ok(socket) => {
                    let addr = socket
                        .local_addr()
                        .map_err(|source| ServerError::Bind { addr, source })?;
                    bound.push(Bound {
                        transport: l.transport,
                        socket,
                        addr,
                    });
                }
                Err(e) if l.implicit => tracing::warn!(
                    listener = l.transport.name(),
                    %addr,
                    error = %e,
                    "default listener not started (set listeners.{} to choose an address, or [] to turn it off)",
                    l.transport.name()
                ),
                Err(source) => return Err(ServerError::Bind { addr, source }),
            }
        }
    }
    bound.sort_by_key(|b| b.transport as usize);
    Ok(bound)
}

/// What a listener does with an accepted socket before the MQTT protocol starts.
#[derive(Clone)]
pub(crate) enum Edge {
    Tcp,
    Tls(Arc<TlsState>),
    Ws(Arc<str>),
    Wss(Arc<TlsState>, Arc<str>),
}

impl Edge {
    pub(crate) fn new(
        transport: Transport,
        tls: Option<&Arc<TlsState>>,
        ws_path: &str,
    ) -> Option<Edge> {
        Some(match transport {
            Transport::Mqtt => Edge::Tcp,
            Transport::Mqtts => Edge::Tls(tls?.clone()),
            Transport::Ws => Edge::Ws(ws_path.into()),
            Transport::Wss => Edge::Wss(tls?.clone(), ws_path.into()),
        })
    }
}

/// What every accept loop shares: the connection limits are the broker's, not a listener's.
pub(crate) struct Admissions {
    pub max_connections: u64,
    pub rates: Mutex<Option<limits::ConnectionLimits>>,
}

pub(crate) async fn accept_loop(
    socket: TcpListener,
    shared: Arc<connection::Listener>,
    edge: Edge,
    admissions: Arc<Admissions>,
    mut stop: watch::Receiver<bool>,
) {
    static NEXT_CONN: AtomicU64 = AtomicU64::new(1);
    let net = shared.net.clone();
    let kind = shared.kind;
    loop {
        let accepted = tokio::select! {
            a = socket.accept() => a,
            _ = stop.wait_for(|s| *s) => return,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // Out of descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, listener = kind.name(), "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        NetMetrics::add(&net.connections_accepted, 1);
        NetMetrics::add(&net.listener_accepted[kind as usize], 1);
        let conn = ConnId(NEXT_CONN.fetch_add(1, Relaxed));
        // Per-address limits count an IPv6 client per /64 prefix.
        let ip = limits::source_key(peer.ip());
        // Counted as open (per address too) until its task ends, refused or not.
        let address = match &shared.addresses {
            Some(a) => a.open(conn, ip),
            None => limits::AddressCheck::Allowed,
        };
        if address == limits::AddressCheck::Drop {
            // Twice over its limit: a client ignoring the refusals gets no more of our time.
            let refused = &net.connections_refused[limits::Refusal::AddressConnections as usize];
            NetMetrics::add(refused, 1);
            tracing::debug!(conn = conn.0, %peer, "dropped: too many connections from its address");
            continue;
        }
        let open = net.connections_open.fetch_add(1, Relaxed) + 1;
        net.listener_open[kind as usize].fetch_add(1, Relaxed);
        tracing::debug!(conn = conn.0, %peer, listener = kind.name(), "accepted");
        // Limits in order; a refused connection takes no connection-rate token.
        let refusal = if open > admissions.max_connections {
            Some(limits::Refusal::MaxConnections)
        } else if address == limits::AddressCheck::Busy {
            Some(limits::Refusal::AddressConnections)
        } else {
            let now = tokio::time::Instant::now();
            let mut rates = match admissions.rates.lock() {
                Ok(r) => r,
                Err(poisoned) => poisoned.into_inner(),
            };
            rates.as_mut().and_then(|r| r.admit(ip, now).err())
        };
        let admission = Admission {
            refusal,
            peer: PeerIdentity {
                addr: peer,
                listener: kind,
                cert_user: None,
            },
        };
        let ctx = ConnContext {
            conn,
            listener: shared.clone(),
            admission: Some(Box::new(admission)),
        };
        match &edge {
            // The plain TCP task is exactly the connection future: nothing wraps it.
            Edge::Tcp => {
                tokio::spawn(connection::run(stream, ctx));
            }
            other => {
                tokio::spawn(upgrade(stream, ctx, other.clone()));
            }
        }
    }
}

/// TLS and/or the WebSocket upgrade, then the MQTT connection on top, in one task.
async fn upgrade(stream: TcpStream, mut ctx: ConnContext, edge: Edge) {
    let listener = ctx.listener.clone();
    let deadline = tokio::time::Instant::now() + listener.connect_timeout;
    let max_packet = listener.limits.max_packet_size;
    let failed = |ctx: &ConnContext, what: &str, error: &dyn std::fmt::Display| {
        NetMetrics::add(&listener.net.handshake_failures[listener.kind as usize], 1);
        tracing::debug!(
            conn = ctx.conn.0,
            listener = listener.kind.name(),
            error = %error,
            "{what} handshake failed"
        );
    };
    let timed_out = "no handshake within limits.connect_timeout_secs";
    match edge {
        Edge::Tcp => connection::run(stream, ctx).await,
        Edge::Ws(path) => {
            let ws = websocket::accept(stream, &path, max_packet);
            match tokio::time::timeout_at(deadline, ws).await {
                Ok(Ok(ws)) => connection::run(Split::new(ws), ctx).await,
                Ok(Err(e)) => failed(&ctx, "WebSocket", &e),
                Err(_) => failed(&ctx, "WebSocket", &timed_out),
            }
        }
        Edge::Tls(state) => match tls_accept(stream, &state, &mut ctx, deadline).await {
            Ok(tls) => connection::run(Split::new(tls), ctx).await,
            Err(e) => failed(&ctx, "TLS", &e),
        },
        Edge::Wss(state, path) => {
            let tls = match tls_accept(stream, &state, &mut ctx, deadline).await {
                Ok(tls) => tls,
                Err(e) => return failed(&ctx, "TLS", &e),
            };
            let ws = websocket::accept(tls, &path, max_packet);
            match tokio::time::timeout_at(deadline, ws).await {
                Ok(Ok(ws)) => connection::run(Split::new(ws), ctx).await,
                Ok(Err(e)) => failed(&ctx, "WebSocket", &e),
                Err(_) => failed(&ctx, "WebSocket", &timed_out),
            }
        }
    }
}

/// The TLS handshake; a verified client certificate's user name goes into the connection's
/// [`PeerIdentity`].
async fn tls_accept(
    stream: TcpStream,
    state: &TlsState,
    ctx: &mut ConnContext,
    deadline: tokio::time::Instant,
) -> Result<tokio_rustls::server::TlsStream<TcpStream>, String> {
    let accept = state.acceptor().accept(stream);
    let tls = match tokio::time::timeout_at(deadline, accept).await {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => return Err(e.to_string()),
        Err(_) => return Err("no handshake within limits.connect_timeout_secs".into()),
    };
    if let Some(a) = ctx.admission.as_deref_mut() {
        a.peer.cert_user = state.cert_user(tls.get_ref().1);
    }
    Ok(tls)
}
