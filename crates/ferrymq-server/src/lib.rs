//! The FerryMQ network server: MQTT listeners (TCP, TLS, WebSocket, WebSocket over TLS), one
//! task per connection, the router task that owns the engine, admin HTTP, and the
//! configuration file.
//!
//! Must not depend on: packet bytes (it uses the codec) or routing rules (the engine owns
//! them). Listeners stay thin: accept, read, decode, hand to the router, write what comes back.
//!
//! Invariants:
//! - Every channel is bounded: connection → router (`ROUTER_QUEUE` batches; a full queue makes
//!   readers wait, which pushes back on publishers through TCP), router → connection (a
//!   delivery that puts a subscriber over `limits.max_outbound_bytes` holds its publisher's
//!   input back until the subscriber drains; past `limits.slow_consumer_grace_ms` the
//!   slow-consumer policy applies instead).
//! - Only the router touches the engine. It runs on its own OS thread, `ferrymq-router`
//!   (a current-thread tokio runtime for its channel, `Notify` and timers), because it also
//!   writes the log, checkpoints and syncs. If it panics, [`Server::failed`] resolves with the
//!   panic's message: the broker is dead, and the binary closes the listeners and exits
//!   non-zero so that a supervisor restarts it.

pub mod acl;
mod admin;
pub mod alarms;
pub mod audit;
pub mod auth;
pub mod config;
mod config_api;
mod connection;
mod dashboard;
mod error;
mod exposition;
mod fdlimit;
pub mod histogram;
pub mod jwt;
mod limits;
mod listen;
mod message_log;
pub mod metrics;
pub mod password_file;
mod peers;
mod persist;
mod proxy_protocol;
mod queue_admin;
mod queue_api;
pub mod queue_spec;
pub mod reload;
mod resources;
mod router;
mod tls;
mod transport;
pub mod utc;
mod views_api;
mod violations;
pub mod websocket;

pub use config::ListenerKind;
pub use tls::names as cert_names;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use ferrymq_core::Broker;
use ferrymq_mqtt::Limits;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

pub use config::Config;
pub use error::ServerError;
pub use persist::Recovered;
pub use reload::{ConfigLoader, LogLevelHook, ReloadReport, Reloading, Trigger};

use crate::metrics::NetMetrics;
use crate::persist::Persistence;
use crate::router::{Router, RouterSettings, ToRouter};

/// Batches waiting for the router before readers are made to wait.
const ROUTER_QUEUE: usize = 4096;

/// A running server.
pub struct Server {
    /// Every bound MQTT address, with its listener.
    mqtt_addrs: Vec<(ListenerKind, SocketAddr)>,
    http_addrs: Vec<SocketAddr>,
    router: mpsc::Sender<ToRouter>,
    stop_accepting: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    router_thread: std::thread::JoinHandle<()>,
    recovered: Option<Recovered>,
    fatal: watch::Receiver<Option<String>>,
    reloader: Arc<reload::Reloader>,
    audit: audit::Audit,
}

impl Server {
    /// Binds the listeners and starts serving, without live reloads. Must be called inside a
    /// tokio runtime.
    pub async fn start(config: Config) -> Result<Server, ServerError> {
        Server::start_with(config, Reloading::default()).await
    }

    /// [`Server::start`], with what reloads the configuration (`reload.rs`).
    pub async fn start_with(config: Config, reloading: Reloading) -> Result<Server, ServerError> {
        config.validate()?;
        // Read before anything starts, so that an unreadable token file stops nothing.
        let token = config.admin_token()?;
        // TLS first: a bad certificate or key is reported before anything starts.
        let tls = match &config.tls {
            Some(t) => Some(tls::TlsState::load(t)?),
            None => None,
        };
        // Connections past what the open-files limit leaves room for are refused with Server
        // Busy like any over the configured maximum, while descriptors remain to accept and
        // answer them, instead of failing in accept() and leaving clients hanging.
        let fd_limit = fdlimit::raise();
        let configured_max = config.limits.max_connections as u64;
        fdlimit::report(fd_limit, configured_max);
        let max_connections = fd_limit
            .connections()
            .map_or(configured_max, |room| room.min(configured_max));
        let net = Arc::new(NetMetrics::default());
        let audit = audit::Audit::start(&config.audit, net.clone())?;
        let mut broker = Broker::new(config.broker_config());
        // Assigned client ids carry this process's random instance id, so none is handed out
        // twice across restarts (a repeat would resume or wipe a stranger's session).
        let mut instance = [0u8; 16];
        getrandom::fill(&mut instance).map_err(|e| ServerError::Random(e.to_string()))?;
        broker.set_instance_id(u128::from_be_bytes(instance));
        let epoch_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let settings = RouterSettings {
            max_outbound_bytes: config.limits.max_outbound_bytes,
            slow_consumer: config.limits.slow_consumer,
            slow_consumer_grace: Duration::from_millis(config.limits.slow_consumer_grace_ms),
            sys_interval: Duration::from_secs(config.sys.interval_secs),
            epoch_ms,
        };
        let (persistence, recovered) = if config.storage.persistence {
            let now = ferrymq_core::Time(epoch_ms);
            let data_dir = config.data_dir.clone();
            let storage = config.storage.clone();
            let queues = config.queue_defs();
            let metrics = net.clone();
            // Replaying a long log is blocking work.
            let (p, r, b) = tokio::task::spawn_blocking(move || {
                Persistence::open(&data_dir, &storage, &queues, &mut broker, now, metrics)
                    .map(|(p, r)| (p, r, broker))
            })
            .await
            .map_err(|e| ServerError::Recovery {
                path: config.data_dir.clone(),
                message: e.to_string(),
            })??;
            broker = b;
            let rep = &r.report;
            tracing::info!(
                data_dir = %config.data_dir.display(),
                sessions = rep.sessions,
                subscriptions = rep.subscriptions,
                retained = rep.retained,
                queued = rep.queued,
                inbound_qos2 = rep.inbound_qos2,
                pending_wills = rep.pending_wills,
                queues = rep.queues,
                queue_messages = rep.queue_messages,
                records = rep.records,
                log_bytes = r.log_bytes,
                truncated_bytes = r.truncated_bytes,
                took_ms = r.millis as u64,
                fsync = ?config.storage.fsync,
                "recovered durable state"
            );
            (Some(p), Some(r))
        } else {
            tracing::info!("persistence is off: nothing will survive a restart");
            let mut out = ferrymq_core::Outbox::default();
            for def in config.queue_defs() {
                let _ = broker.declare_queue(def, ferrymq_core::Time(epoch_ms), &mut out);
            }
            (None, None)
        };
        // Authentication: the password file and the JWT key are read once, here (a bad one
        // stops the start, naming file and line).
        let auth = Arc::new(auth::Authenticator::new(
            &config.auth,
            config.allow_anonymous(),
        )?);
        // Wrong admin tokens are limited with the `[auth]` failure policy, and follow its
        // reloads.
        let token = token.map(|t| {
            let guesses = auth::FailureLimiter::new(auth.failure_policy());
            admin::AdminToken::new(&t, guesses, audit.clone())
        });
        tracing::info!(
            anonymous = config.allow_anonymous(),
            password_file = config.auth.password_file.is_some(),
            jwt = config.auth.jwt.is_some(),
            acl_rules = config.acl.rules.len() + config.mqtt.deny_subscribe.len(),
            "authentication"
        );
        let (fatal_tx, fatal) = watch::channel(None);
        let (tx, rx) = mpsc::channel(ROUTER_QUEUE);
        let alarms = alarms::Alarms::default();
        let overload = resources::Overload::new(
            alarms.clone(),
            resources::resolve_watermark(config.limits.memory_high_watermark),
            config.storage.persistence.then(|| config.data_dir.clone()),
            config.storage.min_free_bytes,
            config.queue_depth_alarm(),
        );
        let drains = Arc::new(router::Drains::default());
        let mut router = Router::new(
            broker,
            net.clone(),
            settings,
            persistence,
            drains.clone(),
            overload,
        );
        router.audit = audit.clone();
        let router_thread = spawn_router(router, rx, fatal_tx)?;

        let bound = listen::bind_all(&config).await?;
        let mut http = Vec::new();
        for &addr in &config.listeners.http.0 {
            let socket = TcpListener::bind(addr)
                .await
                .map_err(|source| ServerError::Bind { addr, source })?;
            let local = socket
                .local_addr()
                .map_err(|source| ServerError::Bind { addr, source })?;
            http.push((socket, local));
        }
        let (stop_accepting, stop_rx) = watch::channel(false);
        let mut tasks = Vec::new();
        // One budget for every listener: the bound is on the broker's memory.
        let preauth = Arc::new(limits::PreauthBudget::new(
            config.limits.preauth_buffer_bytes,
            config.max_connect_size(),
            net.clone(),
        ));
        let admissions = Arc::new(listen::Admissions {
            max_connections: std::sync::atomic::AtomicU64::new(max_connections),
            rates: std::sync::Mutex::new(limits::ConnectionLimits::new(
                &config.limits,
                tokio::time::Instant::now(),
            )),
        });
        let addresses =
            limits::AddressCounts::new(config.limits.max_connections_per_address).map(Arc::new);
        let mut mqtt_addrs = Vec::new();
        let ws_route = Arc::new(listen::WsRoute {
            path: config.listeners.ws_path.clone(),
            origins: config.listeners.ws_origins.clone(),
        });
        let deps = ListenerDeps {
            router: tx.clone(),
            net: net.clone(),
            drains: drains.clone(),
            addresses,
            preauth,
            auth: auth.clone(),
            audit: audit.clone(),
            live_rates: Arc::new(limits::LiveRates::new(limits::RateLimits::from_config(
                &config.limits,
            ))),
        };
        let mut live_listeners = Vec::new();
        for b in bound {
            let Some(edge) = listen::Edge::new(b.kind, tls.as_ref(), &ws_route) else {
                continue;
            };
            let shared: reload::LiveListener = Arc::new(std::sync::RwLock::new(listener_shared(
                &config,
                b.kind,
                &deps,
                deps.live_rates.epoch(),
            )));
            live_listeners.push((b.kind, shared.clone()));
            mqtt_addrs.push((b.kind, b.addr));
            let proxy = config.proxied(b.kind).then(|| {
                let nets = config.trusted_proxies().unwrap_or_default();
                Arc::new(proxy_protocol::TrustedProxies::new(nets))
            });
            tasks.push(tokio::spawn(listen::accept_loop(
                b.socket,
                shared,
                edge,
                admissions.clone(),
                proxy,
                stop_rx.clone(),
            )));
        }
        if let Some(state) = &tls {
            tasks.push(tokio::spawn(tls::reload_loop(
                state.clone(),
                stop_rx.clone(),
            )));
        }
        // Every part that takes configuration changes live, in the order they apply.
        let mut parts: Vec<Box<dyn reload::LivePart>> = vec![
            Box::new(reload::LimitsPart {
                listeners: live_listeners,
                deps,
                admissions: admissions.clone(),
                fd_room: fd_limit.connections(),
            }),
            Box::new(reload::RouterPart(tx.clone())),
            Box::new(reload::AuthPart(auth.clone())),
            Box::new(reload::AclPart(tx.clone())),
            Box::new(reload::QueuePart(tx.clone())),
        ];
        if let Some(hook) = reloading.log_level.clone() {
            parts.push(Box::new(reload::LogPart(hook)));
        }
        if let Some(state) = &tls {
            parts.push(Box::new(reload::TlsPart(state.clone())));
        }
        let reloader = Arc::new(reload::Reloader::new(
            reloading.load.clone(),
            config.clone(),
            parts,
            net.clone(),
            audit.clone(),
        ));
        if reloading.sighup {
            tasks.push(tokio::spawn(reload::on_sighup(
                reloader.clone(),
                stop_rx.clone(),
            )));
        }
        if let Some(path) = reloading.watch.clone() {
            let watch = reload::watch_file(reloader.clone(), path, stop_rx.clone());
            tasks.push(tokio::spawn(watch));
        }
        let state = admin::AdminState {
            router: tx.clone(),
            net,
            alarms,
            stopping: stop_rx.clone(),
            reloader: reloader.clone(),
            audit: audit.clone(),
            scrapes: Default::default(),
        };
        let http_addrs: Vec<SocketAddr> = http.iter().map(|(_, a)| *a).collect();
        for (socket, _) in http {
            let mut stop_http = stop_rx.clone();
            let app = admin::app(state.clone(), token.clone());
            tasks.push(tokio::spawn(async move {
                let shutdown = async move {
                    let _ = stop_http.wait_for(|stop| *stop).await;
                };
                // The peer's address reaches the token check (wrong guesses are limited per
                // address).
                let app = app.into_make_service_with_connect_info::<SocketAddr>();
                if let Err(e) = axum::serve(socket, app)
                    .with_graceful_shutdown(shutdown)
                    .await
                {
                    tracing::error!(error = %e, "admin HTTP server failed");
                }
            }));
        }
        for (transport, addr) in &mqtt_addrs {
            tracing::info!(listener = transport.name(), %addr, "listening for MQTT");
        }
        if http_addrs.is_empty() {
            tracing::info!("admin HTTP is off (listeners.http = [])");
        } else if token.is_some() {
            tracing::info!("admin API: every route but /health and /ready requires the token");
        } else {
            tracing::info!(
                "admin API: no [admin] token, so it listens on loopback only and asks for no token"
            );
        }
        // `mqtt` and `http`: the first address of each ("off" if none), as before listener
        // lists (tools read them from this line); every MQTT listener is logged above.
        let first = |a: Option<SocketAddr>| a.map_or_else(|| "off".to_string(), |a| a.to_string());
        let mqtt_first = mqtt_addrs
            .iter()
            .find(|(kind, _)| *kind == ListenerKind::Mqtt)
            .map(|(_, a)| *a);
        tracing::info!(
            mqtt = %first(mqtt_first),
            http = %first(http_addrs.first().copied()),
            listeners = mqtt_addrs.len(),
            connection_future_bytes = connection_future_bytes(),
            upgrade_future_bytes = upgrade_future_bytes(),
            "ferrymq listening"
        );
        Ok(Server {
            mqtt_addrs,
            http_addrs,
            router: tx,
            stop_accepting,
            tasks,
            router_thread,
            recovered,
            fatal,
            reloader,
            audit,
        })
    }

    /// Reloads the configuration (see `reload.rs`); `trigger` is what the log and the audit
    /// log say asked for it. The error says why the new one was refused (the running one
    /// stays).
    pub async fn reload(&self, trigger: Trigger) -> Result<ReloadReport, ServerError> {
        self.reloader.reload(trigger).await
    }

    /// The configuration in force (after any reloads).
    pub fn running_config(&self) -> Arc<Config> {
        self.reloader.running()
    }

    /// What was recovered from the data directory at start (None without persistence).
    pub fn recovered(&self) -> Option<&Recovered> {
        self.recovered.as_ref()
    }

    /// Resolves if the server stops on its own, with the reason: the log failed (every client
    /// was disconnected first), or the router panicked. Either way the broker no longer
    /// serves; call [`Server::shutdown`] to close the listeners.
    pub async fn failed(&self) -> String {
        let mut fatal = self.fatal.clone();
        let reason = match fatal.wait_for(|f| f.is_some()).await {
            Ok(f) => f.clone(),
            Err(_) => None,
        };
        match reason {
            Some(r) => r,
            None => std::future::pending().await,
        }
    }

    /// The first address of the plain `mqtt` listener (`0.0.0.0:0` when it is off).
    pub fn mqtt_addr(&self) -> SocketAddr {
        self.listener_addr(ListenerKind::Mqtt)
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// The first bound address of a listener, if it is on.
    pub fn listener_addr(&self, transport: ListenerKind) -> Option<SocketAddr> {
        self.mqtt_addrs
            .iter()
            .find(|(t, _)| *t == transport)
            .map(|(_, a)| *a)
    }

    /// Every bound MQTT address, with its listener.
    pub fn mqtt_addrs(&self) -> &[(ListenerKind, SocketAddr)] {
        &self.mqtt_addrs
    }

    /// The first admin HTTP address (`0.0.0.0:0` when the admin listener is off).
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addrs
            .first()
            .copied()
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// Stops accepting, sends 5.0 clients DISCONNECT 0x8B, lets writers flush, and returns.
    pub async fn shutdown(self) {
        let _ = self.stop_accepting.send(true);
        let (done, wait) = oneshot::channel();
        if self.router.send(ToRouter::Shutdown(done)).await.is_ok() {
            let _ = wait.await;
        }
        // Writers flush their last DISCONNECT; give them a moment.
        tokio::time::sleep(Duration::from_millis(200)).await;
        for t in self.tasks {
            let _ = tokio::time::timeout(Duration::from_secs(2), t).await;
        }
        // The router ends after answering `Shutdown` (or has already ended); joining it means
        // the log is closed and the data directory unlocked when this returns.
        let router = tokio::task::spawn_blocking(move || self.router_thread.join());
        let _ = tokio::time::timeout(Duration::from_secs(2), router).await;
        // The disconnects the shutdown made are in the audit file before the process ends.
        let audit = self.audit;
        let flushed = tokio::task::spawn_blocking(move || audit.flush(Duration::from_secs(2)));
        let _ = flushed.await;
        tracing::info!("ferrymq stopped");
    }

    /// Test hook, in debug builds only: makes the router panic, as a broken engine invariant
    /// would, to test supervision. Not part of the API.
    #[doc(hidden)]
    #[cfg(debug_assertions)]
    pub async fn panic_router(&self) {
        let _ = self.router.send(ToRouter::Panic).await;
    }
}

/// Starts the router on its own OS thread with a current-thread runtime, and reports how it
/// ended on `fatal` when that was not a normal stop: the log failed, or it panicked (the panic
/// itself is logged by the panic hook, if the binary installed one, with its location).
fn spawn_router(
    router: Router,
    rx: mpsc::Receiver<ToRouter>,
    fatal: watch::Sender<Option<String>>,
) -> Result<std::thread::JoinHandle<()>, ServerError> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .map_err(ServerError::Router)?;
    std::thread::Builder::new()
        .name("ferrymq-router".into())
        .spawn(move || {
            // The router owns everything it touches; after a panic nothing of it is used again
            // (the queues it shared with connections tolerate poisoned locks).
            let run = std::panic::AssertUnwindSafe(|| runtime.block_on(router.run(rx)));
            let reason = match std::panic::catch_unwind(run) {
                Ok(Ok(())) => return,
                Ok(Err(storage)) => format!("storage failed: {storage}"),
                Err(panic) => {
                    let message = panic_message(panic.as_ref());
                    tracing::error!(
                        panic = message,
                        "the router panicked: the broker stops so that it can be restarted"
                    );
                    format!("the router panicked: {message}")
                }
            };
            let _ = fatal.send(Some(reason));
        })
        .map_err(ServerError::Router)
}

/// Bytes of one connection task's future, which every idle connection keeps for life
/// (tokio adds its task header and trailer; see docs/performance.md). A measurement of this
/// build: the layout is the compiler's.
pub fn connection_future_bytes() -> usize {
    fn output_size<F, R>(_: F) -> usize
    where
        F: FnOnce(tokio::net::TcpStream, connection::ConnContext) -> R,
    {
        std::mem::size_of::<R>()
    }
    output_size(connection::run::<tokio::net::TcpStream>)
}

/// Bytes of the task future of a TLS or WebSocket connection (handshake, then the
/// connection), which such an idle connection keeps for life, as [`connection_future_bytes`].
pub fn upgrade_future_bytes() -> usize {
    listen::upgrade_future_bytes()
}

/// Loads the `[tls]` certificate, key and client CA files as the server would at start
/// (`ferrymq check-config` uses it); the error names the file at fault.
pub fn check_tls(tls: &config::Tls) -> Result<(), ServerError> {
    tls::TlsState::load(tls).map(|_| ())
}

/// Reads the password file and the JWT public key `[auth]` names, as the server does at start
/// and at every reload (`ferrymq check-config` uses it); the error names the key and the file.
pub fn check_auth(config: &Config) -> Result<(), ServerError> {
    auth::Credentials::read(&config.auth, config.allow_anonymous()).map(|_| ())
}

/// The message of a panic payload (`panic!` with a literal or a format string).
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s
    } else {
        "(not a string)"
    }
}

/// What every listener's shared state is built with, besides the configuration.
pub(crate) struct ListenerDeps {
    pub router: mpsc::Sender<ToRouter>,
    pub net: Arc<NetMetrics>,
    pub drains: Arc<router::Drains>,
    pub addresses: Option<Arc<limits::AddressCounts>>,
    pub preauth: Arc<limits::PreauthBudget>,
    pub auth: Arc<auth::Authenticator>,
    pub audit: audit::Audit,
    /// The per-client rates in force, for connections already open when a reload changes them.
    pub live_rates: Arc<limits::LiveRates>,
}

/// What the connections of one listener share (built again by a reload of `limits`), with
/// the per-client rates as of `rates_epoch` ([`limits::LiveRates::epoch`]).
pub(crate) fn listener_shared(
    config: &Config,
    kind: ListenerKind,
    deps: &ListenerDeps,
    rates_epoch: u64,
) -> Arc<connection::Listener> {
    Arc::new(connection::Listener {
        kind,
        router: deps.router.clone(),
        net: deps.net.clone(),
        limits: Limits {
            max_packet_size: config.mqtt.max_packet_size as usize,
        },
        connect_timeout: Duration::from_secs(config.limits.connect_timeout_secs),
        write_timeout: Duration::from_millis(config.limits.write_timeout_ms),
        max_outbound_bytes: config.limits.max_outbound_bytes,
        drains: deps.drains.clone(),
        rates: limits::RateLimits::from_config(&config.limits),
        live_rates: deps.live_rates.clone(),
        rates_epoch,
        addresses: deps.addresses.clone(),
        connect_limits: Limits {
            max_packet_size: config.max_connect_size(),
        },
        preauth: deps.preauth.clone(),
        auth: deps.auth.clone(),
        audit: deps.audit.clone(),
    })
}
