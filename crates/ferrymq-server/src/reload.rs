//! Live reconfiguration: a new configuration file is read and validated whole, diffed against
//! the running one, and each part of the broker that can take its share of the change live
//! takes it; the rest is reported as needing a restart.
//!
//! ```text
//!  SIGHUP ──┐
//!  file ────┼─▶ Reloader::reload (one at a time)
//!  POST ────┘     1. load: parse + validate (Config::load: file, line, key) ─ error ─▶ nothing changes
//!                 2. diff old → new by dotted key; a key no part takes stays as it runs
//!                    (restart_required), so the config in force is `effective`
//!                 3. every part prepares from `effective` (reads its files) ─ error ─▶ nothing changes
//!                 4. every prepared part applies, in order
//! ```
//!
//! Each part ([`LivePart`]) says which keys it takes and how to prepare them; a later
//! feature plugs in with one more part in [`Server::start_with`](crate::Server::start_with).
//!
//! What applies to whom:
//! - `limits` (connect timeout, write timeout, message and byte rates, `max_connections`,
//!   connection rates): connections accepted from now on; an open connection keeps the
//!   limits it was accepted under.
//! - `router` (`max_outbound_bytes`, slow-consumer policy and grace, `sys.interval_secs`):
//!   every connection at once.
//! - `acl` (`[acl]`, `mqtt.deny_subscribe*`): every connected client at once
//!   (`Broker::set_acl`): its next publish and subscribe, and every delivery from now on,
//!   including to subscriptions it made before; those subscriptions themselves stay until its
//!   session resumes, when the ones the new rules refuse are removed.
//! - `auth` (`[auth]` but `max_concurrent_checks`, the password file and the JWT key, which
//!   are read again at every reload even when the file names the same paths): every CONNECT
//!   from now on; connected clients stay connected.
//! - `queues` (`[[queue]]`): a changed or new queue is declared as the REST API's PUT does
//!   (journaled, durable); a queue removed from the file stays (delete it with the API).
//! - `log` (`log.level`): at once. `tls` (paths): new handshakes.

use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use serde_json::{json, Map, Value};

mod parts;

pub(crate) use parts::{
    current, AclPart, AuthPart, LimitsPart, LiveListener, LogPart, QueuePart, RouterChange,
    RouterPart, TlsPart,
};

use crate::audit::Audit;
use crate::config::Config;
use crate::metrics::NetMetrics;
use crate::ServerError;

/// Reads the configuration as the server was started with it (the file, with any
/// command-line overrides applied again), validated.
pub type ConfigLoader = Arc<dyn Fn() -> Result<Config, ServerError> + Send + Sync>;

/// Checks a `log.level` filter and returns what puts it in force (the binary owns the
/// subscriber).
pub type LogLevelHook = Arc<dyn Fn(&str) -> Result<Box<dyn FnOnce() + Send>, String> + Send + Sync>;

/// How a running server reloads its configuration ([`crate::Server::start_with`]).
#[derive(Clone, Default)]
pub struct Reloading {
    /// Where a reload reads the configuration from. None: reloads are refused.
    pub load: Option<ConfigLoader>,
    /// Watch this file (its contents, checked every [`WATCH_POLL`]) and reload on change.
    pub watch: Option<PathBuf>,
    /// Reload on SIGHUP.
    pub sighup: bool,
    /// Makes `log.level` live.
    pub log_level: Option<LogLevelHook>,
}

/// What started a reload (in the log and the audit log).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    Signal,
    File,
    Api,
}

impl Trigger {
    fn name(self) -> &'static str {
        match self {
            Trigger::Signal => "sighup",
            Trigger::File => "file",
            Trigger::Api => "api",
        }
    }
}

/// What a reload did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ReloadReport {
    /// Parts that applied a change.
    pub applied: Vec<&'static str>,
    /// Keys whose new values wait for a restart (they keep running with the old ones).
    pub restart_required: Vec<String>,
    /// Parts that failed while applying (after every part had checked the new values: a
    /// durable write refused for a full disk, for instance), with why.
    pub failed: Vec<(&'static str, String)>,
}

/// A prepared change: applying it cannot be refused by the configuration any more.
pub(crate) type Apply = Pin<Box<dyn Future<Output = Result<(), String>> + Send>>;

/// One part of the broker that takes configuration changes live.
pub(crate) trait LivePart: Send + Sync {
    /// Its name in reports (`applied`).
    fn name(&self) -> &'static str;
    /// Whether it takes a change of `key` live (a dotted key as [`changed_keys`] gives it).
    fn takes(&self, key: &str) -> bool;
    /// Checks `new` (reading any file it names) and returns what applying it does, or None
    /// when nothing changes for it. `changed` holds the changed keys it takes. Called for
    /// every part at every reload (files may change while the configuration does not);
    /// nothing may change here.
    fn prepare(
        &self,
        changed: &[String],
        old: &Config,
        new: &Config,
    ) -> Result<Option<Apply>, ServerError>;
}

/// Runs reloads, one at a time, and holds the configuration in force.
pub(crate) struct Reloader {
    load: Option<ConfigLoader>,
    running: Mutex<Arc<Config>>,
    parts: Vec<Box<dyn LivePart>>,
    one_at_a_time: tokio::sync::Mutex<()>,
    net: Arc<NetMetrics>,
    audit: Audit,
}

impl Reloader {
    pub(crate) fn new(
        load: Option<ConfigLoader>,
        running: Config,
        parts: Vec<Box<dyn LivePart>>,
        net: Arc<NetMetrics>,
        audit: Audit,
    ) -> Reloader {
        Reloader {
            load,
            running: Mutex::new(Arc::new(running)),
            parts,
            one_at_a_time: tokio::sync::Mutex::new(()),
            net,
            audit,
        }
    }

    /// The configuration in force.
    pub(crate) fn running(&self) -> Arc<Config> {
        self.running
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Reads, checks and applies the configuration; logs, counts and audits the result. The
    /// error is the message for whoever asked (the running configuration is unchanged).
    pub(crate) async fn reload(&self, trigger: Trigger) -> Result<ReloadReport, ServerError> {
        let _one = self.one_at_a_time.lock().await;
        let result = self.run().await;
        match &result {
            Ok(r) => {
                NetMetrics::add(&self.net.config_reloads_ok, 1);
                tracing::info!(
                    trigger = trigger.name(),
                    applied = ?r.applied,
                    restart_required = ?r.restart_required,
                    failed = ?r.failed,
                    "configuration reloaded"
                );
            }
            Err(e) => {
                NetMetrics::add(&self.net.config_reloads_error, 1);
                tracing::error!(
                    trigger = trigger.name(),
                    error = %e,
                    "configuration not reloaded: the running one stays"
                );
            }
        }
        if self.audit.on() {
            let fields = match &result {
                Ok(r) => json!({ "trigger": trigger.name(), "result": "ok", "applied": r.applied,
                    "restart_required": r.restart_required, "failed": r.failed }),
                Err(e) => {
                    json!({ "trigger": trigger.name(), "result": "error", "error": e.to_string() })
                }
            };
            self.audit.record("config_reload", fields);
        }
        result
    }

    async fn run(&self) -> Result<ReloadReport, ServerError> {
        let Some(load) = self.load.clone() else {
            return Err(ServerError::NoConfigFile);
        };
        let new = tokio::task::spawn_blocking(move || load())
            .await
            .map_err(|_| ServerError::Stopping)??;
        let old = self.running();
        let taken = |key: &str| self.parts.iter().any(|p| p.takes(key));
        let (effective, restart_required) = effective(&old, &new, taken)?;
        let changed = changed_keys(&to_json(&old)?, &to_json(&effective)?);
        let mut prepared = Vec::new();
        for part in &self.parts {
            let mine: Vec<String> = changed.iter().filter(|k| part.takes(k)).cloned().collect();
            if let Some(apply) = part.prepare(&mine, &old, &effective)? {
                prepared.push((part.name(), mine, apply));
            }
        }
        let mut report = ReloadReport {
            restart_required,
            ..ReloadReport::default()
        };
        let mut not_applied = Vec::new();
        for (name, mine, apply) in prepared {
            match apply.await {
                Ok(()) => report.applied.push(name),
                Err(e) => {
                    report.failed.push((name, e));
                    not_applied.extend(mine);
                }
            }
        }
        let running = kept(&old, effective, &not_applied)?;
        *self.running.lock().unwrap_or_else(|e| e.into_inner()) = Arc::new(running);
        Ok(report)
    }
}

/// `effective` with the keys of the parts that failed to apply put back to their `old`
/// values: what runs, so that the configuration shown says so and the next reload of the
/// same file tries those parts again.
fn kept(old: &Config, effective: Config, failed: &[String]) -> Result<Config, ServerError> {
    if failed.is_empty() {
        return Ok(effective);
    }
    let (old_json, mut json) = (to_json(old)?, to_json(&effective)?);
    for key in failed {
        put_back(&mut json, &old_json, key);
    }
    serde_json::from_value(json).map_err(|e| ServerError::ConfigSyntax(e.to_string()))
}

/// The configuration as JSON, to diff by key (every type in it serializes: a failure would
/// be a bug, reported as a refused reload).
fn to_json(c: &Config) -> Result<Value, ServerError> {
    serde_json::to_value(c).map_err(|e| ServerError::ConfigSyntax(e.to_string()))
}

/// The configuration that will run: `new`, except that every changed key no part takes
/// keeps its running value; and those keys. The result is validated again (a live change
/// may not fit a value that stays until the restart).
fn effective(
    old: &Config,
    new: &Config,
    taken: impl Fn(&str) -> bool,
) -> Result<(Config, Vec<String>), ServerError> {
    let (old_json, mut new_json) = (to_json(old)?, to_json(new)?);
    let mut restart = Vec::new();
    for key in changed_keys(&old_json, &new_json) {
        if taken(&key) {
            continue;
        }
        // A key under one already put back (`tls` turned on or off) is part of that.
        if restart
            .iter()
            .any(|r: &String| key.starts_with(&format!("{r}.")))
        {
            continue;
        }
        put_back(&mut new_json, &old_json, &key);
        restart.push(key);
    }
    let effective: Config =
        serde_json::from_value(new_json).map_err(|e| ServerError::ConfigSyntax(e.to_string()))?;
    effective
        .validate()
        .map_err(|e| ServerError::ReloadConflict(Box::new(e)))?;
    Ok((effective, restart))
}

/// Dotted keys whose values differ. Objects are walked; anything else (arrays included, so
/// `acl.rule` and `queue` are one key each) is a value.
pub(crate) fn changed_keys(old: &Value, new: &Value) -> Vec<String> {
    fn leaves(prefix: &str, v: &Value, out: &mut Vec<(String, Value)>) {
        match v {
            Value::Object(m) => {
                for (k, v) in m {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    leaves(&key, v, out);
                }
            }
            other => out.push((prefix.to_string(), other.clone())),
        }
    }
    let (mut a, mut b) = (Vec::new(), Vec::new());
    leaves("", old, &mut a);
    leaves("", new, &mut b);
    let a: Map<String, Value> = a.into_iter().collect();
    let b: Map<String, Value> = b.into_iter().collect();
    let mut keys: Vec<String> = a
        .keys()
        .chain(b.keys())
        .filter(|k| a.get(*k) != b.get(*k))
        .cloned()
        .collect();
    keys.sort();
    keys.dedup();
    // A table turned on or off (`tls`, `auth.jwt`) is `null` on one side: it changes at its
    // own key and at each of its leaves.
    keys
}

/// Sets `key` in `new` to its value in `old` (removing it where `old` has none).
fn put_back(new: &mut Value, old: &Value, key: &str) {
    let parts: Vec<&str> = key.split('.').collect();
    // The old value: the leaf, or, for a table turned on or off, the whole table.
    let mut from = Some(old);
    for p in &parts {
        from = from.and_then(|v| v.get(p));
    }
    let mut to = new;
    for p in &parts[..parts.len() - 1] {
        match to.get_mut(*p) {
            Some(next) if next.is_object() => to = next,
            // The parent itself differs (null on one side): put back the whole parent.
            _ => return,
        }
    }
    let Some(last) = parts.last() else { return };
    if let Some(obj) = to.as_object_mut() {
        match from {
            Some(v) => {
                obj.insert((*last).to_string(), v.clone());
            }
            None => {
                obj.insert((*last).to_string(), Value::Null);
            }
        }
    }
}

// ---- triggers ----

/// How often the watched file is looked at. A change is taken once the file has stayed the
/// same for one more look (the debounce: an editor writing in several steps, or a config
/// map's symlink swap, is one reload).
pub(crate) const WATCH_POLL: Duration = Duration::from_millis(500);

/// Reloads on SIGHUP until `stop`.
pub(crate) async fn on_sighup(
    reloader: Arc<Reloader>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot listen for SIGHUP: reload with the API instead");
            return;
        }
    };
    loop {
        tokio::select! {
            _ = hup.recv() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let _ = reloader.reload(Trigger::Signal).await;
    }
}

/// Polls `path` and reloads when its contents changed and then held still for a poll.
///
/// Polling rather than inotify (`notify`): one `read` of a small file every half second
/// costs nothing, needs no dependency, and sees every way a file is replaced (in place, by
/// rename, by a Kubernetes config map's symlink swap, on a network file system) without
/// watching directories; half a second is fast enough for a configuration change.
pub(crate) async fn watch_file(
    reloader: Arc<Reloader>,
    path: PathBuf,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let read = |p: PathBuf| async move {
        tokio::task::spawn_blocking(move || std::fs::read(p).ok())
            .await
            .ok()
            .flatten()
    };
    let mut seen = read(path.clone()).await;
    let mut pending: Option<Vec<u8>> = None;
    let mut empty_noted = false;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(WATCH_POLL) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        // A missing file (between an unlink and a rename) is not a change yet.
        let Some(now) = read(path.clone()).await else {
            continue;
        };
        // Nor is an empty one: a write under way (truncated, not yet written), however long
        // it takes, not a configuration of every default (no ACL rules, no users). SIGHUP
        // and the API still take it.
        if now.iter().all(u8::is_ascii_whitespace) {
            if !std::mem::replace(&mut empty_noted, true) {
                tracing::warn!(
                    file = %path.display(),
                    "the configuration file is empty: not reloaded until it has contents (SIGHUP or POST /api/v1/reload take it as it is)"
                );
            }
            continue;
        }
        empty_noted = false;
        if Some(&now) == seen.as_ref() {
            pending = None;
            continue;
        }
        if pending.as_ref() != Some(&now) {
            pending = Some(now);
            continue;
        }
        seen = pending.take();
        let _ = reloader.reload(Trigger::File).await;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Config {
        Config::parse(text).unwrap()
    }

    #[test]
    fn a_config_survives_its_json_unchanged() {
        let c = parse(
            "[limits]\nmemory_high_watermark = \"80%\"\n[listeners]\nmqtt = [\"127.0.0.1:1\", \"127.0.0.1:2\"]\n\
             [[acl.rule]]\npermission = \"deny\"\naction = \"publish\"\ntopic = \"a/#\"\n\
             [[queue]]\nname = \"jobs\"\nfilter = \"jobs/#\"\n\
             [tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\n[auth.jwt]\nalgorithm = \"HS256\"\nsecret = \"s\"\n",
        );
        let back: Config = serde_json::from_value(serde_json::to_value(&c).unwrap()).unwrap();
        assert_eq!(back, c);
        let d = Config::default();
        let back: Config = serde_json::from_value(serde_json::to_value(&d).unwrap()).unwrap();
        assert_eq!(back, d);
    }

    #[test]
    fn secrets_are_redacted() {
        let c = parse("[admin]\ntoken = \"hunter2\"\n[auth.jwt]\nalgorithm = \"HS256\"\nsecret = \"s3cret\"\n");
        let text = c.redacted_json().to_string();
        assert!(
            !text.contains("hunter2") && !text.contains("s3cret"),
            "{text}"
        );
        assert_eq!(c.redacted_json()["admin"]["token"], crate::config::REDACTED);
    }

    #[test]
    fn keys_no_part_takes_keep_running_and_are_reported() {
        let old = parse("");
        let new = parse(
            "data_dir = \"/elsewhere\"\n[limits]\nmax_messages_per_sec = 5\n[storage]\nfsync = \"always\"\n",
        );
        let taken = |k: &str| k.starts_with("limits.");
        let (eff, restart) = effective(&old, &new, taken).unwrap();
        assert_eq!(
            restart,
            vec!["data_dir".to_string(), "storage.fsync".to_string()]
        );
        assert_eq!(eff.data_dir, old.data_dir);
        assert_eq!(eff.storage, old.storage);
        assert_eq!(eff.limits.max_messages_per_sec, 5);
    }

    #[test]
    fn a_table_turned_on_is_one_key() {
        let old = parse("");
        let new = parse("[tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\n");
        let (eff, restart) = effective(&old, &new, |k| k.starts_with("tls.cert")).unwrap();
        assert_eq!(restart, vec!["tls".to_string()]);
        assert_eq!(eff.tls, None);
        let (eff, restart) = effective(&new, &old, |_| false).unwrap();
        assert_eq!(restart, vec!["tls".to_string()]);
        assert_eq!(eff.tls, new.tls);
    }

    #[test]
    fn a_live_change_that_does_not_fit_a_kept_value_is_refused() {
        let old = parse("[limits]\nmax_connections = 100\nmax_connections_per_address = 50\n");
        let new = parse("[limits]\nmax_connections = 10\nmax_connections_per_address = 5\n");
        let err = effective(&old, &new, |k| k == "limits.max_connections").unwrap_err();
        assert!(matches!(err, ServerError::ReloadConflict(_)), "{err}");
        assert!(
            err.to_string()
                .contains("limits.max_connections_per_address"),
            "{err}"
        );
    }
}
