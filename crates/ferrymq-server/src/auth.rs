//! `[auth]`: who a connecting client is, decided between its CONNECT and the engine.
//!
//! ```text
//!  CONNECT ─▶ banned address? ─yes─▶ CONNACK 0x8A (3.1.1: 5)
//!               │no
//!               ▼
//!  TLS client-certificate user ─────────────────────────────▶ that user
//!  user name in the password file ─argon2id (blocking pool)─▶ that user   | 0x86 (4)
//!  password set and [auth.jwt] ────JWT checks (blocking pool)▶ its claim   | 0x86 (4)
//!  user name, a password file, no JWT ──argon2id of a dummy hash──────────▶ 0x86 (4)
//!  otherwise: anonymous ─allow_anonymous?─▶ no user name (its CONNECT's proves nothing)
//!                                        └─▶ 0x87 (3.1.1: 5)
//! ```
//! Every 0x86 counts as a failure of the source address (IPv6: its /64); `max_failures`
//! within `failure_window_ms` bans it for `ban_ms`. Password and token checks run on tokio's
//! blocking threads, at most `max_concurrent_checks` at a time (argon2id takes ~20-40 ms
//! and 19 MiB each), and a successful password check is remembered (a keyed 128-bit digest
//! of user and password, never the password) so a reconnecting client does not pay it again.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferrymq_core::Identity;
use ferrymq_mqtt::{Connect, ReasonCode};
use serde::Deserialize;
use tokio::sync::Semaphore;

use crate::jwt::{JwtConfig, JwtVerifier};
use crate::password_file::{parse_password_file, verify_password, PasswordFile};
use crate::ServerError;

/// `[auth]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Whether clients that do not authenticate are let in. Unset: `mqtt.allow_anonymous`,
    /// and if that is unset too, only when every listener is on a loopback address.
    pub allow_anonymous: Option<bool>,
    /// `user:argon2id-hash` lines, written by `ferrymq passwd`. Read at start.
    pub password_file: Option<PathBuf>,
    pub jwt: Option<JwtConfig>,
    /// Failed authentications from one address within `failure_window_ms` that ban it.
    pub max_failures: u32,
    pub failure_window_ms: u64,
    /// How long a banned address is refused (CONNACK 0x8A, 3.1.1 code 5).
    pub ban_ms: u64,
    /// Password or token checks running at once; 0 = the number of CPUs.
    pub max_concurrent_checks: usize,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            allow_anonymous: None,
            password_file: None,
            jwt: None,
            // Ten tries a minute is plenty for a person or a misconfigured device, and caps
            // a guesser at 10 passwords per 5 minutes per address.
            max_failures: 10,
            failure_window_ms: 60_000,
            ban_ms: 300_000,
            max_concurrent_checks: 0,
        }
    }
}

impl AuthConfig {
    pub fn validate(&self) -> Result<(), ServerError> {
        let bad = |key: &str, message: &str| ServerError::Config {
            key: key.into(),
            message: message.into(),
        };
        if self.max_failures == 0 {
            return Err(bad("auth.max_failures", "must be at least 1"));
        }
        if self.failure_window_ms == 0 || self.failure_window_ms > 86_400_000 {
            return Err(bad(
                "auth.failure_window_ms",
                "must be between 1 and 86400000",
            ));
        }
        if self.ban_ms > 86_400_000 {
            return Err(bad("auth.ban_ms", "must be at most 86400000 (a day)"));
        }
        if self.max_concurrent_checks > 1024 {
            return Err(bad("auth.max_concurrent_checks", "must be at most 1024"));
        }
        Ok(())
    }
}

/// Why a CONNECT was refused here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AuthRefusal {
    /// Wrong password, unknown user, or a bad token: 0x86 (3.1.1: 4).
    BadCredentials,
    /// Anonymous and not allowed: 0x87 (3.1.1: 5).
    NotAuthorized,
    /// Too many failures from its address: 0x8A (3.1.1: 5).
    Banned,
    /// The check did not finish within the connect timeout: 0x89 (3.1.1: 3).
    Busy,
}

impl AuthRefusal {
    pub(crate) const ALL: [AuthRefusal; 4] = [
        AuthRefusal::BadCredentials,
        AuthRefusal::NotAuthorized,
        AuthRefusal::Banned,
        AuthRefusal::Busy,
    ];

    /// The label in `ferrymq_auth_refused_total{reason}`.
    pub(crate) fn label(self) -> &'static str {
        match self {
            AuthRefusal::BadCredentials => "bad_credentials",
            AuthRefusal::NotAuthorized => "not_authorized",
            AuthRefusal::Banned => "banned",
            AuthRefusal::Busy => "busy",
        }
    }

    pub(crate) fn reason_code(self) -> ReasonCode {
        match self {
            AuthRefusal::BadCredentials => ReasonCode::BadUserNameOrPassword,
            AuthRefusal::NotAuthorized => ReasonCode::NotAuthorized,
            AuthRefusal::Banned => ReasonCode::Banned,
            AuthRefusal::Busy => ReasonCode::ServerBusy,
        }
    }
}

/// Most addresses whose failures are remembered; past it expired entries are swept, and if
/// none expired a new address is not tracked (forgetting is the safe side of a memory bound).
const MAX_TRACKED: usize = 65_536;
/// Most successful password checks remembered.
const MAX_CACHED: usize = 16_384;
/// What an unknown user's password is checked against: a well-formed argon2id hash with the
/// parameters `hash_password` uses (no password matches it in practice, and it does not
/// matter: the answer is a refusal either way).
const UNKNOWN_USER_HASH: &str =
    "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0c2FsdA$ZDnDYI7h8NVNJVBgrpBQvUQyNSiNDNG2MMSjdQ0yYDQ";

/// Failures per source address, and bans.
struct FailureLimiter {
    max_failures: u32,
    window: Duration,
    ban: Duration,
    by_address: Mutex<HashMap<IpAddr, Failures>>,
}

#[derive(Clone, Copy)]
struct Failures {
    window_start: Instant,
    count: u32,
    banned_until: Option<Instant>,
}

impl FailureLimiter {
    fn is_banned(&self, ip: IpAddr, now: Instant) -> bool {
        let map = self.by_address.lock().unwrap_or_else(|e| e.into_inner());
        map.get(&ip)
            .and_then(|f| f.banned_until)
            .is_some_and(|until| now < until)
    }

    /// Counts a failure; true when it starts a ban.
    fn fail(&self, ip: IpAddr, now: Instant) -> bool {
        let mut map = self.by_address.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= MAX_TRACKED && !map.contains_key(&ip) {
            let window = self.window;
            map.retain(|_, f| {
                now.duration_since(f.window_start) < window
                    || f.banned_until.is_some_and(|u| now < u)
            });
            if map.len() >= MAX_TRACKED {
                return false;
            }
        }
        let f = map.entry(ip).or_insert(Failures {
            window_start: now,
            count: 0,
            banned_until: None,
        });
        if f.banned_until.is_some_and(|u| now >= u) {
            f.banned_until = None;
            f.count = 0;
            f.window_start = now;
        }
        if now.duration_since(f.window_start) >= self.window {
            f.window_start = now;
            f.count = 0;
        }
        f.count += 1;
        if f.count >= self.max_failures && f.banned_until.is_none() {
            f.banned_until = Some(now + self.ban);
            return true;
        }
        false
    }
}

/// Decides who a connecting client is. One per server, shared by every listener.
pub(crate) struct Authenticator {
    allow_anonymous: bool,
    passwords: Option<PasswordFile>,
    jwt: Option<Arc<JwtVerifier>>,
    limiter: FailureLimiter,
    checks: Arc<Semaphore>,
    /// Successful password checks: user → keyed digest of the password.
    verified: Mutex<HashMap<String, u128>>,
    digest_keys: (
        std::collections::hash_map::RandomState,
        std::collections::hash_map::RandomState,
    ),
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authenticator")
            .field("allow_anonymous", &self.allow_anonymous)
            .field(
                "users",
                &self.passwords.as_ref().map_or(0, PasswordFile::len),
            )
            .field("jwt", &self.jwt.is_some())
            .finish()
    }
}

impl Authenticator {
    /// Reads the password file and the JWT key. `allow_anonymous` is the resolved setting
    /// (see [`crate::Config::allow_anonymous`]).
    pub(crate) fn new(
        cfg: &AuthConfig,
        allow_anonymous: bool,
    ) -> Result<Authenticator, ServerError> {
        let passwords = match &cfg.password_file {
            None => None,
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| ServerError::Config {
                    key: "auth.password_file".into(),
                    message: format!("cannot read {}: {e}", path.display()),
                })?;
                let file = parse_password_file(&text).map_err(|e| ServerError::Config {
                    key: "auth.password_file".into(),
                    message: format!("{}: {e}", path.display()),
                })?;
                Some(file)
            }
        };
        let jwt = match &cfg.jwt {
            None => None,
            Some(j) => Some(Arc::new(JwtVerifier::new(j).map_err(|e| {
                ServerError::Config {
                    key: "auth.jwt".into(),
                    message: e.to_string(),
                }
            })?)),
        };
        let permits = match cfg.max_concurrent_checks {
            0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
            n => n,
        };
        Ok(Authenticator {
            allow_anonymous,
            passwords,
            jwt,
            limiter: FailureLimiter {
                max_failures: cfg.max_failures,
                window: Duration::from_millis(cfg.failure_window_ms),
                ban: Duration::from_millis(cfg.ban_ms),
                by_address: Mutex::new(HashMap::new()),
            },
            checks: Arc::new(Semaphore::new(permits)),
            verified: Mutex::new(HashMap::new()),
            digest_keys: Default::default(),
        })
    }

    /// The identity of a client, or why it is refused. `source` is the peer's address (None
    /// when the transport has none: nothing is rate limited then); `cert_user` a user name
    /// from a verified TLS client certificate, which authenticates the client by itself.
    pub(crate) async fn authenticate(
        &self,
        connect: &Connect,
        source: Option<IpAddr>,
        cert_user: Option<&str>,
    ) -> Result<Identity, AuthRefusal> {
        let key = source.map(crate::limits::source_key);
        if key.is_some_and(|ip| self.limiter.is_banned(ip, Instant::now())) {
            return Err(AuthRefusal::Banned);
        }
        if let Some(user) = cert_user {
            return Ok(Identity {
                user: Some(user.into()),
                token_acl: None,
            });
        }
        let result = self.check_credentials(connect).await;
        if result == Err(AuthRefusal::BadCredentials) {
            if let Some(ip) = key {
                if self.limiter.fail(ip, Instant::now()) {
                    tracing::warn!(
                        source = %ip,
                        failures = self.limiter.max_failures,
                        ban_ms = self.limiter.ban.as_millis() as u64,
                        "address banned after repeated authentication failures"
                    );
                }
            }
        }
        result
    }

    async fn check_credentials(&self, c: &Connect) -> Result<Identity, AuthRefusal> {
        let user = c.username.as_deref();
        let password = c.password.as_deref();
        if let (Some(user), Some(file)) = (user, &self.passwords) {
            if let Some(hash) = file.hash_of(user) {
                let password = password.unwrap_or_default();
                return self.check_password(user, hash, password).await;
            }
        }
        if let (Some(token), Some(jwt)) = (password, &self.jwt) {
            let jwt = jwt.clone();
            let token = token.to_vec();
            let checked = self.blocking(move || jwt.verify(&token)).await?;
            return match checked {
                Ok(who) => Ok(who),
                Err(e) => {
                    tracing::debug!(error = %e, "JWT refused");
                    Err(AuthRefusal::BadCredentials)
                }
            };
        }
        if user.is_some() && self.passwords.is_some() {
            // An unknown user: refused like a wrong password, after as long a check (a hash
            // with the same parameters), so the time taken does not tell which users exist.
            let password = password.unwrap_or_default().to_vec();
            self.blocking(move || verify_password(UNKNOWN_USER_HASH, &password))
                .await?;
            return Err(AuthRefusal::BadCredentials);
        }
        if self.allow_anonymous {
            Ok(Identity::default())
        } else {
            Err(AuthRefusal::NotAuthorized)
        }
    }

    async fn check_password(
        &self,
        user: &str,
        hash: &str,
        password: &[u8],
    ) -> Result<Identity, AuthRefusal> {
        let digest = self.digest(user, password);
        let known = self
            .verified
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(user)
            .is_some_and(|d| *d == digest);
        let ok = known || {
            let (hash, password) = (hash.to_string(), password.to_vec());
            self.blocking(move || verify_password(&hash, &password))
                .await?
        };
        if !ok {
            return Err(AuthRefusal::BadCredentials);
        }
        if !known {
            let mut cache = self.verified.lock().unwrap_or_else(|e| e.into_inner());
            if cache.len() >= MAX_CACHED {
                cache.clear();
            }
            cache.insert(user.to_string(), digest);
        }
        Ok(Identity {
            user: Some(user.into()),
            token_acl: None,
        })
    }

    /// A keyed digest (two SipHash-1-3 keys of this process, 128 bits) of user and password:
    /// what the cache of successful checks compares, so it never holds a password.
    fn digest(&self, user: &str, password: &[u8]) -> u128 {
        let half = |k: &std::collections::hash_map::RandomState| {
            let mut h = k.build_hasher();
            h.write(user.as_bytes());
            h.write_u8(0xff);
            h.write(password);
            h.finish()
        };
        (u128::from(half(&self.digest_keys.0)) << 64) | u128::from(half(&self.digest_keys.1))
    }

    /// Runs a check on the blocking pool, at most `max_concurrent_checks` at a time.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, AuthRefusal> {
        let permit = self
            .checks
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| AuthRefusal::Busy)?;
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            f()
        })
        .await
        .map_err(|_| AuthRefusal::Busy)
    }
}

/// The log of publishes the ACL refused: each at debug level, and at most one info line per
/// [`DENIAL_SUMMARY`] with how many (a client publishing where it may not must not fill the
/// disk). Owned by the router.
pub(crate) struct DenialLog {
    since_summary: u64,
    next: Instant,
}

const DENIAL_SUMMARY: Duration = Duration::from_secs(10);

impl DenialLog {
    pub(crate) fn new(now: Instant) -> DenialLog {
        DenialLog {
            since_summary: 0,
            next: now,
        }
    }

    /// Logs and clears `denied`, naming each client (`client_id` of its connection) and the
    /// publish's trace id when it carried a `traceparent`.
    pub(crate) fn log(
        &mut self,
        denied: &mut Vec<ferrymq_core::DeniedPublish>,
        client_id: impl Fn(ferrymq_core::ConnId) -> Arc<str>,
    ) {
        if denied.is_empty() {
            return;
        }
        let now = Instant::now();
        for d in denied.drain(..) {
            self.since_summary += 1;
            let client_id = &*client_id(d.conn);
            let trace_id = d.trace_id.as_deref();
            if now >= self.next {
                tracing::info!(
                    conn = d.conn.0,
                    client_id,
                    topic = %d.topic,
                    trace_id,
                    denied_since_last = self.since_summary,
                    "publish denied by the ACL"
                );
                self.since_summary = 0;
                self.next = now + DENIAL_SUMMARY;
            } else {
                tracing::debug!(
                    conn = d.conn.0,
                    client_id,
                    topic = %d.topic,
                    trace_id,
                    "publish denied by the ACL"
                );
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn failures_ban_for_the_ban_time_then_count_afresh() {
        let l = FailureLimiter {
            max_failures: 3,
            window: Duration::from_secs(60),
            ban: Duration::from_secs(10),
            by_address: Mutex::new(HashMap::new()),
        };
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let other: IpAddr = "10.0.0.2".parse().unwrap();
        let t0 = Instant::now();
        assert!(!l.fail(ip, t0));
        assert!(!l.fail(ip, t0));
        assert!(!l.is_banned(ip, t0));
        assert!(l.fail(ip, t0), "the third failure bans");
        assert!(l.is_banned(ip, t0 + Duration::from_secs(9)));
        assert!(!l.is_banned(other, t0));
        assert!(!l.is_banned(ip, t0 + Duration::from_secs(10)));
        assert!(!l.fail(ip, t0 + Duration::from_secs(11)), "counts afresh");
    }

    #[test]
    fn failures_outside_the_window_do_not_add_up() {
        let l = FailureLimiter {
            max_failures: 2,
            window: Duration::from_secs(1),
            ban: Duration::from_secs(10),
            by_address: Mutex::new(HashMap::new()),
        };
        let ip: IpAddr = "::1".parse().unwrap();
        let t0 = Instant::now();
        assert!(!l.fail(ip, t0));
        assert!(!l.fail(ip, t0 + Duration::from_secs(2)));
        assert!(l.fail(ip, t0 + Duration::from_millis(2500)));
    }
}
