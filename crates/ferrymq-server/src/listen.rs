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

use crate::config::{Config, ListenerKind};
use crate::connection::{self, Admission, ConnContext};
use crate::limits;
use crate::metrics::NetMetrics;
use crate::proxy_protocol::{read_header, TrustedProxies};
use crate::tls::TlsState;
use crate::transport::Split;
use crate::websocket;
use crate::ServerError;

/// A bound listening socket.
pub(crate) struct Bound {
    pub kind: ListenerKind,
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
            match bind_listener(addr) {
                Ok(socket) => {
                    let addr = socket
                        .local_addr()
                        .map_err(|source| ServerError::Bind { addr, source })?;
                    bound.push(Bound {
                        kind: l.kind,
                        socket,
                        addr,
                    });
                }
                Err(e) if l.implicit => tracing::warn!(
                    listener = l.kind.name(),
                    %addr,
                    error = %e,
                    "default listener not started (set listeners.{} to choose an address, or [] to turn it off)",
                    l.kind.name()
                ),
                Err(source) => return Err(ServerError::Bind { addr, source }),
            }
        }
    }
    bound.sort_by_key(|b| b.kind as usize);
    Ok(bound)
}

/// Connections the kernel may queue for `accept` (it caps this at `net.core.somaxconn`).
/// std's 128 overflows when a few hundred clients connect at once (a reconnect storm after a
/// restart): each SYN dropped there is retried by the client only after 1 s, then 3 s.
const LISTEN_BACKLOG: u32 = 4096;

/// A listening socket on `addr`, as `TcpListener::bind` makes it but with [`LISTEN_BACKLOG`].
fn bind_listener(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(LISTEN_BACKLOG)
}

/// What a listener does with an accepted socket before the MQTT protocol starts.
#[derive(Clone)]
pub(crate) enum Edge {
    Tcp,
    Tls(Arc<TlsState>),
    Ws(Arc<WsRoute>),
    Wss(Arc<TlsState>, Arc<WsRoute>),
}

/// Where WebSocket clients connect, and which web origins may.
pub(crate) struct WsRoute {
    pub path: String,
    pub origins: Vec<String>,
}

impl Edge {
    pub(crate) fn new(
        transport: ListenerKind,
        tls: Option<&Arc<TlsState>>,
        ws: &Arc<WsRoute>,
    ) -> Option<Edge> {
        Some(match transport {
            ListenerKind::Mqtt => Edge::Tcp,
            ListenerKind::Mqtts => Edge::Tls(tls?.clone()),
            ListenerKind::Ws => Edge::Ws(ws.clone()),
            ListenerKind::Wss => Edge::Wss(tls?.clone(), ws.clone()),
        })
    }
}

/// What every accept loop shares: the connection limits are the broker's, not a listener's.
pub(crate) struct Admissions {
    /// `limits.max_connections` (or what the open-files limit leaves room for); a reload
    /// may change it.
    pub max_connections: AtomicU64,
    pub rates: Mutex<Option<limits::ConnectionLimits>>,
}

/// Accepts `socket`'s connections until `stop`. With `proxy`, each must come from a trusted
/// proxy and start with a PROXY header, read in the connection's own task; the client
/// address in it is the one every limit, ban and view sees.
pub(crate) async fn accept_loop(
    socket: TcpListener,
    live: crate::reload::LiveListener,
    edge: Edge,
    admissions: Arc<Admissions>,
    proxy: Option<Arc<TrustedProxies>>,
    mut stop: watch::Receiver<bool>,
) {
    let first = crate::reload::current(&live);
    let (net, kind) = (first.net.clone(), first.kind);
    drop(first);
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
        let Some(trusted) = &proxy else {
            admit(stream, peer, None, &live, &admissions, &edge);
            continue;
        };
        if !trusted.trusts(peer.ip()) {
            NetMetrics::add(&net.handshake_failures[kind as usize], 1);
            tracing::debug!(%peer, listener = kind.name(), "closed: not a trusted proxy (listeners.trusted_proxies)");
            continue;
        }
        let pending = ReadingHeader::new(net.clone(), kind);
        let (live, admissions, edge, net) =
            (live.clone(), admissions.clone(), edge.clone(), net.clone());
        tokio::spawn(async move {
            let mut stream = stream;
            let timeout = crate::reload::current(&live).connect_timeout;
            let client = tokio::time::timeout(timeout, read_header(&mut stream)).await;
            // `admit` counts it again, as any connection.
            drop(pending);
            match client {
                Ok(Ok(client)) => admit(
                    stream,
                    client.unwrap_or(peer),
                    Some(peer),
                    &live,
                    &admissions,
                    &edge,
                ),
                Ok(Err(e)) => {
                    NetMetrics::add(&net.handshake_failures[kind as usize], 1);
                    tracing::debug!(%peer, listener = kind.name(), error = %e, "PROXY header refused");
                }
                Err(_) => {
                    NetMetrics::add(&net.handshake_failures[kind as usize], 1);
                    tracing::debug!(%peer, listener = kind.name(), "no PROXY header within limits.connect_timeout_secs");
                }
            }
        });
    }
}

/// A proxied connection reading its PROXY header counts as open (as one in its TLS handshake
/// does) until this is dropped, however its task ends: `limits.max_connections` and the open
/// gauges see a balancer's stalled connections. Its address is not known yet, so no
/// per-address count has it.
struct ReadingHeader(Arc<NetMetrics>, ListenerKind);

impl ReadingHeader {
    fn new(net: Arc<NetMetrics>, kind: ListenerKind) -> ReadingHeader {
        net.connections_open.fetch_add(1, Relaxed);
        net.listener_open[kind as usize].fetch_add(1, Relaxed);
        ReadingHeader(net, kind)
    }
}

impl Drop for ReadingHeader {
    fn drop(&mut self) {
        self.0.connections_open.fetch_sub(1, Relaxed);
        self.0.listener_open[self.1 as usize].fetch_sub(1, Relaxed);
    }
}

/// Applies the connection limits to a connection from `peer` (the client's address; `proxy`
/// is the balancer's when it came through one) and starts its task.
fn admit(
    stream: TcpStream,
    peer: SocketAddr,
    proxy: Option<SocketAddr>,
    live: &crate::reload::LiveListener,
    admissions: &Admissions,
    edge: &Edge,
) {
    static NEXT_CONN: AtomicU64 = AtomicU64::new(1);
    // The listener state in force now (a reload replaces it): this connection keeps it.
    let shared = crate::reload::current(live);
    let (net, kind) = (&shared.net, shared.kind);
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
        return;
    }
    let open = net.connections_open.fetch_add(1, Relaxed) + 1;
    net.listener_open[kind as usize].fetch_add(1, Relaxed);
    tracing::debug!(conn = conn.0, %peer, proxy = ?proxy, listener = kind.name(), "accepted");
    // Limits in order; a refused connection takes no connection-rate token.
    let refusal = if open > admissions.max_connections.load(Relaxed) {
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
    // A proxied connection always carries its client's address (the socket's is the
    // balancer's); a direct one only a refusal, if any.
    let admission = (refusal.is_some() || proxy.is_some()).then(|| {
        Box::new(Admission {
            refusal,
            peer: proxy.map(|_| peer),
            ..Admission::default()
        })
    });
    let ctx = ConnContext {
        conn,
        listener: shared.clone(),
        admission,
    };
    match edge {
        // The plain TCP task is exactly the connection future: nothing wraps it.
        Edge::Tcp => {
            tokio::spawn(connection::run(stream, ctx));
        }
        other => {
            tokio::spawn(upgrade(stream, peer, ctx, other.clone()));
        }
    }
}

/// A connection past its TLS and WebSocket handshakes.
enum Upgraded {
    Tls(Split<tokio_rustls::server::TlsStream<TcpStream>>),
    Ws(Split<websocket::WsStream<TcpStream>>),
    Wss(Split<websocket::WsStream<tokio_rustls::server::TlsStream<TcpStream>>>),
}

/// TLS and/or the WebSocket upgrade, then the MQTT connection on top, in one task.
///
/// The handshakes run in a box of their own, freed when they end: a task is as large as its
/// future's largest state for its whole life, and theirs (rustls's handshake, the TLS stream
/// held across the WebSocket upgrade, tungstenite's) made every idle TLS or WebSocket
/// connection's task ~13 KiB (`upgrade_future_bytes`, logged at start, is what stays).
async fn upgrade(stream: TcpStream, peer: SocketAddr, mut ctx: ConnContext, edge: Edge) {
    let upgraded = match edge {
        Edge::Tcp => return connection::run(stream, ctx).await,
        edge => Box::pin(handshakes(stream, peer, &mut ctx, edge)).await,
    };
    match upgraded {
        Some(Upgraded::Tls(t)) => connection::run(t, ctx).await,
        Some(Upgraded::Ws(t)) => connection::run(t, ctx).await,
        Some(Upgraded::Wss(t)) => connection::run(t, ctx).await,
        None => {}
    }
}

/// The TLS handshake and/or the WebSocket upgrade of `edge`; `None` (counted and logged)
/// when one fails or the connect timeout ends it.
async fn handshakes(
    stream: TcpStream,
    peer: SocketAddr,
    ctx: &mut ConnContext,
    edge: Edge,
) -> Option<Upgraded> {
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
        None
    };
    let timed_out = "no handshake within limits.connect_timeout_secs";
    match edge {
        // Not upgraded: the accept loop runs plain TCP connections directly.
        Edge::Tcp => None,
        Edge::Ws(route) => {
            if !hold_preauth(ctx, deadline, max_packet).await {
                return failed(ctx, "WebSocket", &timed_out);
            }
            let ws = websocket::accept(stream, &route.path, &route.origins, max_packet);
            match tokio::time::timeout_at(deadline, ws).await {
                Ok(Ok(ws)) => Some(Upgraded::Ws(Split::new(ws, peer))),
                Ok(Err(e)) => failed(ctx, "WebSocket", &e),
                Err(_) => failed(ctx, "WebSocket", &timed_out),
            }
        }
        Edge::Tls(state) => match tls_accept(stream, &state, ctx, deadline).await {
            Ok(tls) => Some(Upgraded::Tls(Split::new(tls, peer))),
            Err(e) => failed(ctx, "TLS", &e),
        },
        Edge::Wss(state, route) => {
            let tls = match tls_accept(stream, &state, ctx, deadline).await {
                Ok(tls) => tls,
                Err(e) => return failed(ctx, "TLS", &e),
            };
            if !hold_preauth(ctx, deadline, max_packet).await {
                return failed(ctx, "WebSocket", &timed_out);
            }
            let ws = websocket::accept(tls, &route.path, &route.origins, max_packet);
            match tokio::time::timeout_at(deadline, ws).await {
                Ok(Ok(ws)) => Some(Upgraded::Wss(Split::new(ws, peer))),
                Ok(Err(e)) => failed(ctx, "WebSocket", &e),
                Err(_) => failed(ctx, "WebSocket", &timed_out),
            }
        }
    }
}

/// Bytes of an [`upgrade`] future (see `connection_future_bytes` in lib.rs).
pub(crate) fn upgrade_future_bytes() -> usize {
    fn output_size<F, R>(_: F) -> usize
    where
        F: FnOnce(TcpStream, SocketAddr, ConnContext, Edge) -> R,
    {
        std::mem::size_of::<R>()
    }
    output_size(upgrade)
}

/// Before a WebSocket upgrade: the pre-auth budget's part for what the connection may buffer
/// before its CONNECT is through — the upgrade request, then a whole frame (up to
/// `max_packet_size`, read before MQTT sees a byte) and the CONNECT's own buffer (up to
/// `max_connect_size`; the handshake reads it within this hold instead of asking the budget
/// again, see `connection::handshake`). Held by the handshake and given back when it ends.
/// Without it, unauthenticated WebSocket clients could each make the broker hold a megabyte
/// the budget never saw. False when the connect timeout ran out waiting for it.
async fn hold_preauth(
    ctx: &mut ConnContext,
    deadline: tokio::time::Instant,
    max_packet: usize,
) -> bool {
    // The upgrade's buffer is gone before the CONNECT's grows.
    let connect = ctx.listener.connect_limits.max_packet_size;
    let bytes = max_packet + websocket::FRAME_SLACK + websocket::UPGRADE_BUFFER.max(connect);
    let hold = ctx.listener.preauth.hold(bytes);
    match tokio::time::timeout_at(deadline, hold).await {
        Ok(hold) => {
            ctx.admission.get_or_insert_with(Box::default).preauth = Some(hold);
            true
        }
        Err(_) => false,
    }
}

/// The TLS handshake; a verified client certificate's user name goes into the connection's
/// [`Admission`], from where the CONNECT handshake puts it into its `PeerIdentity`.
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
    if let Some(user) = state.cert_user(tls.get_ref().1) {
        ctx.admission.get_or_insert_with(Box::default).cert_user = Some(user);
    }
    Ok(tls)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::config::{CertUsername, Tls};
    use crate::router::ToRouter;
    use bytes::BytesMut;
    use ferrymq_mqtt::{Packet, ProtocolVersion};
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    use tokio::io::AsyncWriteExt;
    use tokio::sync::mpsc;

    struct Pki {
        ca_pem: String,
        server: (String, String),
        client: (String, String),
    }

    /// A CA, a server certificate for 127.0.0.1 and a client certificate with CN `sensor-42`
    /// and the SANs `DNS:device-7.example`, `email:ops@example.com`.
    fn pki() -> Pki {
        use rcgen::{CertificateParams, DnType, IsCa, KeyPair, SanType};
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::default();
        ca.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.distinguished_name.push(DnType::CommonName, "test CA");
        let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
        let issuer = rcgen::Issuer::from_params(&ca, &ca_key);
        let issue = |params: CertificateParams| {
            let key = KeyPair::generate().unwrap();
            let cert = params.signed_by(&key, &issuer).unwrap();
            (cert.pem(), key.serialize_pem())
        };
        let server = issue(CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap());
        let mut client = CertificateParams::default();
        client
            .distinguished_name
            .push(DnType::CommonName, "sensor-42");
        client.subject_alt_names = vec![
            SanType::Rfc822Name("ops@example.com".try_into().unwrap()),
            SanType::DnsName("device-7.example".try_into().unwrap()),
        ];
        let client = issue(client);
        Pki {
            ca_pem,
            server,
            client,
        }
    }

    /// The CONNECT the router receives from a TLS client with the client certificate, which
    /// sent the user name `spoofed`, under `cert_username = mode`.
    async fn connect_as_seen_by_the_router(pki: &Pki, mode: CertUsername) -> Option<String> {
        static N: AtomicU64 = AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "ferrymq-listen-{}-{}",
            std::process::id(),
            N.fetch_add(1, Relaxed)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let file = |name: &str, text: &str| {
            let p = dir.join(name);
            std::fs::write(&p, text).unwrap();
            p
        };
        let tls = Tls {
            cert: file("server.pem", &pki.server.0),
            key: file("server.key", &pki.server.1),
            client_ca: Some(file("ca.pem", &pki.ca_pem)),
            require_client_cert: true,
            cert_username: mode,
        };
        let state = TlsState::load(&tls).unwrap();
        let (router, mut routed) = mpsc::channel(8);
        let shared = Arc::new(connection::Listener {
            kind: ListenerKind::Mqtts,
            router,
            net: Arc::new(NetMetrics::default()),
            limits: ferrymq_mqtt::Limits::default(),
            connect_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(10),
            max_outbound_bytes: 1 << 20,
            drains: Arc::default(),
            rates: None,
            live_rates: Default::default(),
            rates_epoch: 0,
            addresses: None,
            connect_limits: ferrymq_mqtt::Limits::default(),
            preauth: Arc::new(crate::limits::PreauthBudget::new(
                1 << 20,
                64 * 1024,
                Arc::new(NetMetrics::default()),
            )),
            auth: Arc::new(
                crate::auth::Authenticator::new(&crate::auth::AuthConfig::default(), true).unwrap(),
            ),
            audit: Default::default(),
        });
        let shared = Arc::new(std::sync::RwLock::new(shared));
        let admissions = Arc::new(Admissions {
            max_connections: AtomicU64::new(10),
            rates: Mutex::new(None),
        });
        let socket = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = socket.local_addr().unwrap();
        let (_stop, stop_rx) = watch::channel(false);
        let accept = accept_loop(socket, shared, Edge::Tls(state), admissions, None, stop_rx);
        let accept = tokio::spawn(accept);

        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from_pem_slice(pki.ca_pem.as_bytes()).unwrap())
            .unwrap();
        let chain = vec![CertificateDer::from_pem_slice(pki.client.0.as_bytes()).unwrap()];
        let key = PrivateKeyDer::from_pem_slice(pki.client.1.as_bytes()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .unwrap();
        let tcp = TcpStream::connect(addr).await.unwrap();
        let name = ServerName::try_from("127.0.0.1").unwrap();
        let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
            .connect(name, tcp)
            .await
            .unwrap();
        let connect = ferrymq_mqtt::Connect {
            version: ProtocolVersion::V5,
            client_id: "c".into(),
            clean_start: true,
            keep_alive: 30,
            username: Some("spoofed".into()),
            password: None,
            will: None,
            properties: Default::default(),
        };
        let mut out = BytesMut::new();
        ferrymq_mqtt::encode(
            &Packet::Connect(Box::new(connect)),
            ProtocolVersion::V5,
            &mut out,
        )
        .unwrap();
        tls.write_all(&out).await.unwrap();
        let routed = tokio::time::timeout(Duration::from_secs(10), routed.recv()).await;
        accept.abort();
        let _ = std::fs::remove_dir_all(&dir);
        match routed.unwrap().unwrap() {
            ToRouter::Connect { connect, .. } => connect.username,
            _ => panic!("expected the CONNECT"),
        }
    }

    #[tokio::test]
    async fn a_verified_client_certificate_names_the_user_the_router_sees() {
        let pki = pki();
        let seen = connect_as_seen_by_the_router(&pki, CertUsername::Cn).await;
        assert_eq!(seen.as_deref(), Some("sensor-42"));
        let seen = connect_as_seen_by_the_router(&pki, CertUsername::San).await;
        assert_eq!(seen.as_deref(), Some("device-7.example"));
        let seen = connect_as_seen_by_the_router(&pki, CertUsername::None).await;
        assert_eq!(seen.as_deref(), Some("spoofed"), "none: the CONNECT's own");
    }
}

#[cfg(test)]
mod future_size {
    /// Every idle TLS or WebSocket connection keeps its `upgrade` future for life (it is the
    /// spawned task). With the handshakes inline it was 4,928 bytes in a debug build (the TLS
    /// stream, held across the WebSocket upgrade, is 1,224 bytes; rustls's and tungstenite's
    /// handshake futures more); boxed apart it is 744 (debug). A measurement, logged at start
    /// (`upgrade_future_bytes`); this catches a return of the handshakes into the task.
    #[test]
    fn the_upgrade_future_keeps_no_handshake() {
        let size = super::upgrade_future_bytes();
        println!("upgrade future: {size} bytes");
        assert!(size < 1536, "upgrade future is {size} bytes");
    }
}
