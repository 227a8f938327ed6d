//! The parts of the broker that take configuration changes live (see `reload.rs` for what
//! applies to whom), each a [`LivePart`].

use std::sync::{Arc, RwLock};
use std::time::Duration;

use ferrymq_core::acl::AclConfig;
use ferrymq_mqtt::ReasonCode;
use tokio::sync::{mpsc, oneshot};

use super::{Apply, LivePart, LogLevelHook};
use crate::config::{Config, ListenerKind, SlowConsumer};
use crate::router::ToRouter;
use crate::ServerError;

/// Whether `key` is one of `keys` or under one of them.
fn under(key: &str, keys: &[&str]) -> bool {
    keys.iter()
        .any(|k| key == *k || key.starts_with(&format!("{k}.")))
}

/// What the router applies: flow settings and `$SYS` interval, and ACL rules.
#[derive(Default)]
pub(crate) struct RouterChange {
    pub settings: Option<LiveSettings>,
    pub acl: Option<(AclConfig, ReasonCode)>,
}

pub(crate) struct LiveSettings {
    pub max_outbound_bytes: usize,
    pub slow_consumer: SlowConsumer,
    pub slow_consumer_grace: Duration,
    pub sys_interval: Duration,
}

impl LiveSettings {
    pub(crate) fn from_config(c: &Config) -> LiveSettings {
        LiveSettings {
            max_outbound_bytes: c.limits.max_outbound_bytes,
            slow_consumer: c.limits.slow_consumer,
            slow_consumer_grace: Duration::from_millis(c.limits.slow_consumer_grace_ms),
            sys_interval: Duration::from_secs(c.sys.interval_secs),
        }
    }
}

fn to_router(router: &mpsc::Sender<ToRouter>, change: RouterChange) -> Apply {
    let router = router.clone();
    Box::pin(async move {
        let (done, wait) = oneshot::channel();
        router
            .send(ToRouter::Reconfigure(Box::new(change), done))
            .await
            .map_err(|_| "the router has stopped".to_string())?;
        wait.await.map_err(|_| "the router has stopped".to_string())
    })
}

/// `router`: flow control and `$SYS`.
pub(crate) struct RouterPart(pub mpsc::Sender<ToRouter>);

impl LivePart for RouterPart {
    fn name(&self) -> &'static str {
        "router"
    }
    fn takes(&self, key: &str) -> bool {
        under(
            key,
            &[
                "limits.max_outbound_bytes",
                "limits.slow_consumer",
                "limits.slow_consumer_grace_ms",
                "sys.interval_secs",
            ],
        )
    }
    fn prepare(
        &self,
        changed: &[String],
        _: &Config,
        new: &Config,
    ) -> Result<Option<Apply>, ServerError> {
        if changed.is_empty() {
            return Ok(None);
        }
        let change = RouterChange {
            settings: Some(LiveSettings::from_config(new)),
            acl: None,
        };
        Ok(Some(to_router(&self.0, change)))
    }
}

/// `acl`: the rules, in the engine.
pub(crate) struct AclPart(pub mpsc::Sender<ToRouter>);

impl LivePart for AclPart {
    fn name(&self) -> &'static str {
        "acl"
    }
    fn takes(&self, key: &str) -> bool {
        under(
            key,
            &["acl", "mqtt.deny_subscribe", "mqtt.deny_subscribe_reason"],
        )
    }
    fn prepare(
        &self,
        changed: &[String],
        _: &Config,
        new: &Config,
    ) -> Result<Option<Apply>, ServerError> {
        if changed.is_empty() {
            return Ok(None);
        }
        let engine = new.broker_config();
        let change = RouterChange {
            settings: None,
            acl: Some((engine.acl, engine.deny_subscribe_reason)),
        };
        Ok(Some(to_router(&self.0, change)))
    }
}

/// `auth`: users (the password file), JWT settings and key, anonymous access, bans.
pub(crate) struct AuthPart(pub Arc<crate::auth::Authenticator>);

impl LivePart for AuthPart {
    fn name(&self) -> &'static str {
        "auth"
    }
    fn takes(&self, key: &str) -> bool {
        (under(key, &["auth"]) && key != "auth.max_concurrent_checks")
            || key == "mqtt.allow_anonymous"
    }
    fn prepare(
        &self,
        _: &[String],
        _: &Config,
        new: &Config,
    ) -> Result<Option<Apply>, ServerError> {
        let creds = crate::auth::Credentials::read(&new.auth, new.allow_anonymous())?;
        if !self.0.differs(&creds) {
            return Ok(None);
        }
        let auth = self.0.clone();
        Ok(Some(Box::pin(async move {
            tracing::info!(users = creds.users(), "authentication settings reloaded");
            auth.replace(creds);
            Ok(())
        })))
    }
}

/// `queues`: `[[queue]]` definitions, declared through the router like the REST API's.
pub(crate) struct QueuePart(pub mpsc::Sender<ToRouter>);

impl LivePart for QueuePart {
    fn name(&self) -> &'static str {
        "queues"
    }
    fn takes(&self, key: &str) -> bool {
        key == "queue"
    }
    fn prepare(
        &self,
        changed: &[String],
        old: &Config,
        new: &Config,
    ) -> Result<Option<Apply>, ServerError> {
        if changed.is_empty() {
            return Ok(None);
        }
        let before = old.queue_defs();
        let declare: Vec<_> = new
            .queue_defs()
            .into_iter()
            .filter(|d| !before.contains(d))
            .collect();
        for gone in before
            .iter()
            .filter(|d| !new.queues.iter().any(|q| q.name == d.name))
        {
            tracing::warn!(
                queue = %gone.name,
                "queue removed from the configuration file: it stays, with its messages (delete it with the API)"
            );
        }
        let router = self.0.clone();
        Ok(Some(Box::pin(async move {
            for def in declare {
                let name = def.name.clone();
                let (reply, answer) = oneshot::channel();
                let command = crate::queue_admin::QueueCommand::Declare(def);
                router
                    .send(ToRouter::Queue { command, reply })
                    .await
                    .map_err(|_| "the router has stopped".to_string())?;
                match answer.await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return Err(format!("queue {name}: {e}")),
                    Err(_) => return Err("the router has stopped".into()),
                }
            }
            Ok(())
        })))
    }
}

/// `log`: the level filter, through the binary's hook.
pub(crate) struct LogPart(pub LogLevelHook);

impl LivePart for LogPart {
    fn name(&self) -> &'static str {
        "log"
    }
    fn takes(&self, key: &str) -> bool {
        key == "log.level"
    }
    fn prepare(
        &self,
        changed: &[String],
        _: &Config,
        new: &Config,
    ) -> Result<Option<Apply>, ServerError> {
        if changed.is_empty() {
            return Ok(None);
        }
        let apply = (self.0)(&new.log.level).map_err(|message| ServerError::Config {
            key: "log.level".into(),
            message,
        })?;
        Ok(Some(Box::pin(async move {
            apply();
            Ok(())
        })))
    }
}

/// `tls`: certificate, key and client CA paths (the files' contents reload by themselves).
pub(crate) struct TlsPart(pub Arc<crate::tls::TlsState>);

impl LivePart for TlsPart {
    fn name(&self) -> &'static str {
        "tls"
    }
    fn takes(&self, key: &str) -> bool {
        under(
            key,
            &[
                "tls.cert",
                "tls.key",
                "tls.client_ca",
                "tls.require_client_cert",
            ],
        )
    }
    fn prepare(
        &self,
        changed: &[String],
        _: &Config,
        new: &Config,
    ) -> Result<Option<Apply>, ServerError> {
        let (false, Some(tls)) = (changed.is_empty(), &new.tls) else {
            return Ok(None);
        };
        let prepared = crate::tls::TlsState::prepare(tls)?;
        let state = self.0.clone();
        Ok(Some(Box::pin(async move {
            state.install(prepared);
            Ok(())
        })))
    }
}

/// One listener's shared state, replaced whole by a reload: a connection takes the one in
/// force when it is accepted, and keeps it.
pub(crate) type LiveListener = Arc<RwLock<Arc<crate::connection::Listener>>>;

/// The listener state in force.
pub(crate) fn current(l: &LiveListener) -> Arc<crate::connection::Listener> {
    l.read().unwrap_or_else(|e| e.into_inner()).clone()
}

/// `limits`: per-connection limits (for connections accepted from now on) and admission.
pub(crate) struct LimitsPart {
    pub listeners: Vec<(ListenerKind, LiveListener)>,
    pub deps: crate::ListenerDeps,
    pub admissions: Arc<crate::listen::Admissions>,
    /// Connections the open-files limit leaves room for (`fdlimit`).
    pub fd_room: Option<u64>,
}

impl LivePart for LimitsPart {
    fn name(&self) -> &'static str {
        "limits"
    }
    fn takes(&self, key: &str) -> bool {
        under(
            key,
            &[
                "limits.max_connections",
                "limits.connect_timeout_secs",
                "limits.write_timeout_ms",
                "limits.max_outbound_bytes",
                "limits.max_messages_per_sec",
                "limits.max_bytes_per_sec",
                "limits.rate_burst_ms",
                "limits.rate_exceeded",
                "limits.max_connection_rate",
                "limits.max_connection_rate_per_address",
            ],
        )
    }
    fn prepare(
        &self,
        changed: &[String],
        _: &Config,
        new: &Config,
    ) -> Result<Option<Apply>, ServerError> {
        if changed.is_empty() {
            return Ok(None);
        }
        // Connections already open take new per-client rates through `LiveRates` (their
        // other limits stay as they were when they connected).
        let live_rates = self.deps.live_rates.clone();
        let new_rates = crate::limits::RateLimits::from_config(&new.limits);
        let rates_changed = new_rates != live_rates.current();
        let epoch = live_rates.epoch() + u64::from(rates_changed);
        let fresh: Vec<_> = self
            .listeners
            .iter()
            .map(|(kind, live)| {
                let shared = crate::listener_shared(new, *kind, &self.deps, epoch);
                (live.clone(), shared)
            })
            .collect();
        let configured = new.limits.max_connections as u64;
        let max = self.fd_room.map_or(configured, |room| room.min(configured));
        let admissions = self.admissions.clone();
        // The connection-rate buckets are made again only when their settings change: a
        // reload of `max_connections` alone must not give every address a fresh burst.
        let connection_rates = [
            "limits.max_connection_rate",
            "limits.max_connection_rate_per_address",
            "limits.rate_burst_ms",
        ];
        let rates = changed
            .iter()
            .any(|k| under(k, &connection_rates))
            .then(|| {
                crate::limits::ConnectionLimits::new(&new.limits, tokio::time::Instant::now())
            });
        Ok(Some(Box::pin(async move {
            if rates_changed {
                live_rates.set(new_rates);
            }
            for (live, shared) in fresh {
                *live.write().unwrap_or_else(|e| e.into_inner()) = shared;
            }
            admissions
                .max_connections
                .store(max, std::sync::atomic::Ordering::Relaxed);
            if let Some(rates) = rates {
                *admissions.rates.lock().unwrap_or_else(|e| e.into_inner()) = rates;
            }
            Ok(())
        })))
    }
}
