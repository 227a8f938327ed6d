//! `[auth]`: who a connecting client is, decided between its CONNECT and the engine.
//!
//! ```text
//!  CONNECT ─▶ TLS client-certificate user ─────────────────▶ that user
//!               │none
//!               ▼
//!             banned address? ─yes─▶ CONNACK 0x8A (3.1.1: 5)
//!               │no
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
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use ferrymq_core::Identity;
use ferrymq_mqtt::{Connect, ReasonCode};
use serde::{Deserialize, Serialize};
use tokio::sync::Semaphore;

use crate::jwt::{JwtConfig, JwtVerifier};
use crate::password_file::{parse_password_file, verify_password, PasswordFile};
use crate::ServerError;

/// `[auth]`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Whether clients that do not authenticate are let in. Unset: `mqtt.allow_anonymous`,
    /// and if that is unset too, only when every listener is on a loopback address.
    pub allow_anonymous: Option<bool>,
    /// `user:argon2id-hash` lines, written by `ferrymq passwd`. Read at start and at every
    /// reload (`reload.rs`).
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

/// How many failures within what window ban an address for how long (`[auth]`
/// `max_failures`, `failure_window_ms`, `ban_ms`). Shared by the MQTT limiter and the admin
/// API's, and changed in place by a reload, so that both follow it. The three are read and
/// written together (a lock, taken only when a check fails): a failure counted during a
/// reload must not take the count of one policy and the ban of the other (a day's ban on
/// the first failure, which neither asked for).
#[derive(Debug)]
pub(crate) struct FailurePolicy(Mutex<(u32, Duration, Duration)>);

impl FailurePolicy {
    pub(crate) fn new(cfg: &AuthConfig) -> FailurePolicy {
        let policy = FailurePolicy(Mutex::new((0, Duration::ZERO, Duration::ZERO)));
        policy.set((cfg.max_failures, cfg.failure_window_ms, cfg.ban_ms));
        policy
    }

    fn set(&self, (max_failures, window_ms, ban_ms): (u32, u64, u64)) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = (
            max_failures,
            Duration::from_millis(window_ms),
            Duration::from_millis(ban_ms),
        );
    }

    /// `max_failures`, the window and the ban, of one policy.
    fn get(&self) -> (u32, Duration, Duration) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn max_failures(&self) -> u32 {
        self.get().0
    }

    fn ban(&self) -> Duration {
        self.get().2
    }
}

/// Failures per source address, and bans (MQTT passwords and tokens here; the admin API's
/// token guesses in `admin`, with the same policy and a table of its own).
pub(crate) struct FailureLimiter {
    policy: Arc<FailurePolicy>,
    by_address: Mutex<HashMap<IpAddr, Failures>>,
}

#[derive(Clone, Copy)]
struct Failures {
    window_start: Instant,
    count: u32,
    banned_until: Option<Instant>,
}

impl FailureLimiter {
    pub(crate) fn new(policy: Arc<FailurePolicy>) -> FailureLimiter {
        FailureLimiter {
            policy,
            by_address: Mutex::new(HashMap::new()),
        }
    }

    pub(crate) fn ban_time(&self) -> Duration {
        self.policy.ban()
    }

    pub(crate) fn is_banned(&self, ip: IpAddr, now: Instant) -> bool {
        let map = self.by_address.lock().unwrap_or_else(|e| e.into_inner());
        map.get(&ip)
            .and_then(|f| f.banned_until)
            .is_some_and(|until| now < until)
    }

    /// Counts a failure; true when it starts a ban.
    pub(crate) fn fail(&self, ip: IpAddr, now: Instant) -> bool {
        let (max_failures, window, ban) = self.policy.get();
        let mut map = self.by_address.lock().unwrap_or_else(|e| e.into_inner());
        if map.len() >= MAX_TRACKED && !map.contains_key(&ip) {
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
        if now.duration_since(f.window_start) >= window {
            f.window_start = now;
            f.count = 0;
        }
        f.count += 1;
        if f.count >= max_failures && f.banned_until.is_none() {
            f.banned_until = Some(now + ban);
            return true;
        }
        false
    }
}

/// Decides who a connecting client is. One per server, shared by every listener. What the
/// configuration and its files say ([`Credentials`]) is replaced whole by a reload
/// ([`Authenticator::replace`]); failure counts and bans carry over.
pub(crate) struct Authenticator {
    credentials: RwLock<Arc<Credentials>>,
    limiter: FailureLimiter,
    checks: Arc<Semaphore>,
    /// Successful password checks: user → keyed digest of the password. Emptied by a
    /// reload (a changed password must be checked again).
    verified: Mutex<HashMap<String, u128>>,
    digest_keys: (
        std::collections::hash_map::RandomState,
        std::collections::hash_map::RandomState,
    ),
}

/// What `[auth]` and the files it names say: read whole before it is used, so that a
/// reload with an unreadable password file or key changes nothing.
pub(crate) struct Credentials {
    allow_anonymous: bool,
    passwords: Option<PasswordFile>,
    jwt: Option<Arc<JwtVerifier>>,
    /// `[auth]`'s failure settings (max_failures, failure_window_ms, ban_ms).
    policy: (u32, u64, u64),
    /// A digest of all of the above as read (files' bytes included): equal digests, nothing
    /// to reload.
    fingerprint: u64,
}

impl Credentials {
    /// Reads the password file and the JWT key; the error names the key and the file.
    pub(crate) fn read(
        cfg: &AuthConfig,
        allow_anonymous: bool,
    ) -> Result<Credentials, ServerError> {
        let mut print = std::hash::DefaultHasher::new();
        std::hash::Hash::hash(&format!("{cfg:?}"), &mut print);
        std::hash::Hash::hash(&cfg.jwt.as_ref().and_then(|j| j.secret.clone()), &mut print);
        std::hash::Hash::hash(&allow_anonymous, &mut print);
        let passwords = match &cfg.password_file {
            None => None,
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| ServerError::Config {
                    key: "auth.password_file".into(),
                    message: format!("cannot read {}: {e}", path.display()),
                })?;
                std::hash::Hash::hash(&text, &mut print);
                let file = parse_password_file(&text).map_err(|e| ServerError::Config {
                    key: "auth.password_file".into(),
                    message: format!("{}: {e}", path.display()),
                })?;
                Some(file)
            }
        };
        if let Some(key) = cfg.jwt.as_ref().and_then(|j| j.public_key.as_ref()) {
            std::hash::Hash::hash(&std::fs::read(key).unwrap_or_default(), &mut print);
        }
        let jwt = match &cfg.jwt {
            None => None,
            Some(j) => Some(Arc::new(JwtVerifier::new(j).map_err(|e| {
                ServerError::Config {
                    key: "auth.jwt".into(),
                    message: e.to_string(),
                }
            })?)),
        };
        Ok(Credentials {
            allow_anonymous,
            passwords,
            jwt,
            policy: (cfg.max_failures, cfg.failure_window_ms, cfg.ban_ms),
            fingerprint: print.finish(),
        })
    }

    /// How many users the password file has (for the log).
    pub(crate) fn users(&self) -> usize {
        self.passwords.as_ref().map_or(0, PasswordFile::len)
    }
}

impl std::fmt::Debug for Authenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let c = self.credentials();
        f.debug_struct("Authenticator")
            .field("allow_anonymous", &c.allow_anonymous)
            .field("users", &c.users())
            .field("jwt", &c.jwt.is_some())
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
        let credentials = Credentials::read(cfg, allow_anonymous)?;
        let permits = match cfg.max_concurrent_checks {
            0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
            n => n,
        };
        Ok(Authenticator {
            limiter: FailureLimiter::new(Arc::new(FailurePolicy::new(cfg))),
            credentials: RwLock::new(Arc::new(credentials)),
            checks: Arc::new(Semaphore::new(permits)),
            verified: Mutex::new(HashMap::new()),
            digest_keys: Default::default(),
        })
    }

    /// The credentials in force.
    pub(crate) fn credentials(&self) -> Arc<Credentials> {
        self.credentials
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Whether `new` differs from the credentials in force.
    pub(crate) fn differs(&self, new: &Credentials) -> bool {
        self.credentials().fingerprint != new.fingerprint
    }

    /// Puts `new` in force for every authentication that starts from now on (one under way
    /// finishes with what it started with); forgets remembered password checks.
    pub(crate) fn replace(&self, new: Credentials) {
        self.limiter.policy.set(new.policy);
        *self.credentials.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(new);
        self.verified
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clear();
    }

    /// The failure policy in force, for another limiter to follow (the admin API's).
    pub(crate) fn failure_policy(&self) -> Arc<FailurePolicy> {
        self.limiter.policy.clone()
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
        // A verified certificate first: it cannot be guessed, and its holder may share an
        // address (NAT, a proxy) with someone who is guessing passwords.
        if let Some(user) = cert_user {
            return Ok(Identity {
                user: Some(user.into()),
                token_acl: None,
            });
        }
        let key = source.map(crate::limits::source_key);
        if key.is_some_and(|ip| self.limiter.is_banned(ip, Instant::now())) {
            return Err(AuthRefusal::Banned);
        }
        let result = self.check_credentials(connect).await;
        if result == Err(AuthRefusal::BadCredentials) {
            if let Some(ip) = key {
                let limiter = &self.limiter;
                if limiter.fail(ip, Instant::now()) {
                    tracing::warn!(
                        source = %ip,
                        failures = limiter.policy.max_failures(),
                        ban_ms = limiter.ban_time().as_millis() as u64,
                        "address banned after repeated authentication failures"
                    );
                }
            }
        }
        result
    }

    async fn check_credentials(&self, c: &Connect) -> Result<Identity, AuthRefusal> {
        let creds = self.credentials();
        let user = c.username.as_deref();
        let password = c.password.as_deref();
        if let (Some(user), Some(file)) = (user, &creds.passwords) {
            if let Some(hash) = file.hash_of(user) {
                let password = password.unwrap_or_default();
                return self.check_password(user, hash, password).await;
            }
        }
        if let (Some(token), Some(jwt)) = (password, &creds.jwt) {
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
        if user.is_some() && creds.passwords.is_some() {
            // An unknown user: refused like a wrong password, after as long a check (a hash
            // with the same parameters), so the time taken does not tell which users exist.
            let password = password.unwrap_or_default().to_vec();
            self.blocking(move || verify_password(UNKNOWN_USER_HASH, &password))
                .await?;
            return Err(AuthRefusal::BadCredentials);
        }
        if creds.allow_anonymous {
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
        let digest = self.digest(user, hash, password);
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

    /// A keyed digest (two SipHash-1-3 keys of this process, 128 bits) of user, the hash the
    /// password was checked against, and password: what the cache of successful checks
    /// compares, so it never holds a password. With the hash in it, a check that was under
    /// way when a reload changed the user's password (and finished against the old hash after
    /// [`Authenticator::replace`] emptied the cache) remembers nothing the new hash matches.
    fn digest(&self, user: &str, hash: &str, password: &[u8]) -> u128 {
        let half = |k: &std::collections::hash_map::RandomState| {
            let mut h = k.build_hasher();
            h.write(user.as_bytes());
            h.write_u8(0xff);
            h.write(hash.as_bytes());
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
        // Most denials are not logged (one info line per 10 s, the rest at debug): name the
        // client only for a line that will be written (a map lookup and a lock in `Outbound`).
        let debug = tracing::enabled!(tracing::Level::DEBUG);
        for d in denied.drain(..) {
            self.since_summary += 1;
            if now < self.next && !debug {
                continue;
            }
            let client_id = &*client_id(d.conn);
            let trace_id = d.trace_id.as_deref();
            if now >= self.next {
                tracing::info!(
                    conn = d.conn.0,
                    client_id,
                    topic = &*d.topic,
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
                    topic = &*d.topic,
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

    fn limiter(max_failures: u32, window: Duration, ban: Duration) -> FailureLimiter {
        FailureLimiter::new(Arc::new(FailurePolicy(Mutex::new((
            max_failures,
            window,
            ban,
        )))))
    }

    #[test]
    fn failures_ban_for_the_ban_time_then_count_afresh() {
        let l = limiter(3, Duration::from_secs(60), Duration::from_secs(10));
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
        let l = limiter(2, Duration::from_secs(1), Duration::from_secs(10));
        let ip: IpAddr = "::1".parse().unwrap();
        let t0 = Instant::now();
        assert!(!l.fail(ip, t0));
        assert!(!l.fail(ip, t0 + Duration::from_secs(2)));
        assert!(l.fail(ip, t0 + Duration::from_millis(2500)));
    }

    /// A reload between two policies (many failures for a day's ban, or the first failure
    /// for a millisecond's) while failures are counted: no ban takes the count of one and
    /// the length of the other (a day's ban on the first failure, which neither asked for).
    #[test]
    fn a_ban_never_mixes_the_policies_before_and_after_a_reload() {
        use std::sync::atomic::Ordering::Relaxed;
        let strict = (1000, 60_000, 86_400_000);
        let lenient = (1, 60_000, 1);
        let policy = Arc::new(FailurePolicy::new(&AuthConfig::default()));
        policy.set(strict);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let reloads = {
            let (policy, stop) = (policy.clone(), stop.clone());
            std::thread::spawn(move || {
                while !stop.load(Relaxed) {
                    policy.set(strict);
                    policy.set(lenient);
                }
            })
        };
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let deadline = Instant::now() + Duration::from_millis(1500);
        let mut mixed = 0;
        let mut tries = 0u64;
        while Instant::now() < deadline && mixed == 0 {
            let l = FailureLimiter::new(policy.clone());
            let now = Instant::now();
            if l.fail(ip, now) && l.is_banned(ip, now + Duration::from_secs(1)) {
                mixed += 1;
            }
            tries += 1;
        }
        stop.store(true, Relaxed);
        reloads.join().unwrap();
        assert_eq!(
            mixed, 0,
            "a ban mixed the two policies (after {tries} tries)"
        );
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod reload_tests {
    use super::*;

    fn users(dir: &std::path::Path, password: &[u8]) -> AuthConfig {
        let file = dir.join("users");
        let hash = crate::password_file::hash_password(password).unwrap();
        std::fs::write(&file, format!("alice:{hash}\n")).unwrap();
        AuthConfig {
            password_file: Some(file),
            max_concurrent_checks: 1,
            ..AuthConfig::default()
        }
    }

    fn connect(password: &[u8]) -> Connect {
        Connect {
            version: ferrymq_mqtt::ProtocolVersion::V5,
            client_id: "c".into(),
            clean_start: true,
            keep_alive: 0,
            username: Some("alice".into()),
            password: Some(bytes::Bytes::copy_from_slice(password)),
            will: None,
            properties: Default::default(),
        }
    }

    /// A check that started before a reload changed alice's password finishes against the
    /// old hash (it was under way); what it remembers must not let the old password in after.
    #[tokio::test]
    async fn a_check_under_way_during_a_password_change_does_not_let_the_old_password_in_after() {
        let dir = std::env::temp_dir().join(format!("ferrymq-auth-race-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let auth = Arc::new(Authenticator::new(&users(&dir, b"old"), false).unwrap());
        // Hold the one check permit, so alice's check waits with the old hash in hand.
        let permit = auth.checks.clone().acquire_owned().await.unwrap();
        let under_way = {
            let auth = auth.clone();
            tokio::spawn(async move { auth.authenticate(&connect(b"old"), None, None).await })
        };
        // On this one-thread runtime the task runs, when this one yields, up to the wait
        // for the permit (the first await that is not ready).
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
        auth.replace(Credentials::read(&users(&dir, b"new"), false).unwrap());
        drop(permit);
        let first = tokio::time::timeout(Duration::from_secs(60), under_way)
            .await
            .unwrap()
            .unwrap();
        assert!(first.is_ok(), "checked against the hash it started with");
        let after = auth.authenticate(&connect(b"old"), None, None).await;
        assert_eq!(after.err(), Some(AuthRefusal::BadCredentials));
        assert!(auth
            .authenticate(&connect(b"new"), None, None)
            .await
            .is_ok());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
