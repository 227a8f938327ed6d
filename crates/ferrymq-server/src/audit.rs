//! The audit log (`[audit]`): one JSON line per event that says who came, who was refused and
//! who changed what — connects, disconnects, authentication failures, ACL denials, admin API
//! calls that change something, configuration reloads.
//!
//! Off the hot path: the code that sees an event builds a small [`serde_json::Value`] and
//! `try_send`s it on a bounded channel ([`QUEUE`] lines) to the `ferrymq-audit` thread, which
//! adds nothing but the write. A full channel (the disk cannot keep up) drops the line and
//! counts it in `ferrymq_audit_dropped_total`; nothing ever waits for the audit log.
//!
//! Bounded per source: the events a client can cause at will (its ACL denials, an address's
//! authentication failures) are written at most [`SOURCE_LINES`] per [`SOURCE_WINDOW`] for
//! each connection or address, and [`ALL_LINES`] for all of them together; the rest are
//! counted, and the count is written with the source's next line (`unrecorded_before`), its
//! disconnect line (`acl_denied_unrecorded`), or a line of its own once the window is over
//! (`unrecorded`). Without it one client publishing where it may not would write the file
//! full and rotate away everything before it. Connects, disconnects, admin calls and
//! reloads are not bounded here.
//!
//! Rotation by size: once `file` reaches `max_bytes`, `file.{keep-1}` becomes `file.{keep}`
//! (the oldest is deleted), …, `file` becomes `file.1`, and a new `file` is started.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::metrics::NetMetrics;
use crate::ServerError;

/// Lines waiting for the writer before new ones are dropped: a few seconds of connect storms
/// at the rates the broker accepts, and ~1 MiB at the sizes lines have.
const QUEUE: usize = 4096;

/// `[audit]`. Off unless `file` is set; taken at start (a change needs a restart).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// The JSON-lines file; relative paths are relative to the working directory. Unset: off.
    pub file: Option<PathBuf>,
    /// Size at which the file is rotated.
    pub max_bytes: u64,
    /// Rotated files kept (`file.1` … `file.{keep}`).
    pub keep: u32,
}

impl Default for AuditConfig {
    fn default() -> Self {
        AuditConfig {
            file: None,
            max_bytes: 64 * 1024 * 1024,
            keep: 5,
        }
    }
}

impl AuditConfig {
    pub fn validate(&self) -> Result<(), ServerError> {
        let bad = |key: &str, message: &str| ServerError::Config {
            key: key.into(),
            message: message.into(),
        };
        if self.max_bytes < 1024 {
            return Err(bad("audit.max_bytes", "must be at least 1024"));
        }
        if self.keep == 0 || self.keep > 1000 {
            return Err(bad("audit.keep", "must be between 1 and 1000"));
        }
        if self.file.as_ref().is_some_and(|f| f.as_os_str().is_empty()) {
            return Err(bad(
                "audit.file",
                "must not be empty (leave it unset for off)",
            ));
        }
        Ok(())
    }
}

/// Where events go: a cheap handle (clone it freely); a no-op when the audit log is off.
#[derive(Clone, Default)]
pub(crate) struct Audit {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    tx: SyncSender<Msg>,
    net: Arc<NetMetrics>,
    budgets: Mutex<Budgets>,
}

/// Lines one source (a connection, an address) may write per [`SOURCE_WINDOW`].
const SOURCE_LINES: u32 = 20;
/// Lines every source together may write per [`SOURCE_WINDOW`].
const ALL_LINES: u32 = 2000;
const SOURCE_WINDOW: Duration = Duration::from_secs(10);

/// Who caused a bounded event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Source {
    /// A connection's ACL denials.
    Conn(u64),
    /// Authentication failures from an address (IPv6: its /64).
    Address(std::net::IpAddr),
}

/// What each source wrote in its window, and what was not written.
#[derive(Default)]
struct Budgets {
    by_source: std::collections::HashMap<Source, Budget>,
    /// Lines written by all sources in the current window, and when it ends.
    all: u32,
    window_ends: Option<Instant>,
}

struct Budget {
    window_ends: Instant,
    written: u32,
    unrecorded: u64,
    /// The event and the fields that name the source (for the `unrecorded` line).
    event: &'static str,
    who: Value,
}

/// What [`Budgets::take`] decided for one line.
enum Take {
    /// Write it; with how many before it were not.
    Write(u64),
    Skip,
}

impl Budgets {
    /// Whether a line from `source` may be written now; ends windows that are over, with
    /// the `unrecorded` lines of the sources they leave out.
    fn take(
        &mut self,
        source: Source,
        event: &'static str,
        who: &Value,
        now: Instant,
        ended: &mut Vec<Value>,
    ) -> Take {
        if self.window_ends.is_none_or(|t| now >= t) {
            self.window_ends = Some(now + SOURCE_WINDOW);
            self.all = 0;
            self.by_source.retain(|_, b| {
                if now < b.window_ends {
                    return true;
                }
                if b.unrecorded > 0 {
                    ended.push(unrecorded_line(b));
                }
                false
            });
        }
        let b = self.by_source.entry(source).or_insert_with(|| Budget {
            window_ends: now + SOURCE_WINDOW,
            written: 0,
            unrecorded: 0,
            event,
            who: Value::Null,
        });
        b.who = who.clone();
        if now >= b.window_ends {
            b.window_ends = now + SOURCE_WINDOW;
            b.written = 0;
        }
        if b.written >= SOURCE_LINES || self.all >= ALL_LINES {
            b.unrecorded += 1;
            return Take::Skip;
        }
        b.written += 1;
        self.all += 1;
        Take::Write(std::mem::take(&mut b.unrecorded))
    }
}

/// `{event, ...who, "unrecorded": n}`: a source's lines not written in a window now over.
fn unrecorded_line(b: &Budget) -> Value {
    let mut fields = b.who.clone();
    if let Some(f) = fields.as_object_mut() {
        f.insert("unrecorded".into(), b.unrecorded.into());
    }
    json!({ "event": b.event, "fields": fields })
}

/// What goes to the writer thread.
enum Msg {
    Line(Value),
    /// Answered once every line sent before it is written and flushed.
    Flush(std::sync::mpsc::Sender<()>),
}

impl std::fmt::Debug for Audit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Audit")
            .field("on", &self.inner.is_some())
            .finish()
    }
}

impl Audit {
    /// Opens the file (an unwritable one stops the start, naming it) and starts the writer
    /// thread, which ends when the last handle is dropped.
    pub(crate) fn start(cfg: &AuditConfig, net: Arc<NetMetrics>) -> Result<Audit, ServerError> {
        let Some(path) = cfg.file.clone() else {
            return Ok(Audit::default());
        };
        let file = open(&path).map_err(|e| ServerError::Config {
            key: "audit.file".into(),
            message: format!("cannot open {}: {e}", path.display()),
        })?;
        let (tx, rx) = sync_channel(QUEUE);
        let writer = Writer {
            net: net.clone(),
            size: file.metadata().map_or(0, |m| m.len()),
            file: std::io::BufWriter::new(file),
            path,
            max_bytes: cfg.max_bytes,
            keep: cfg.keep,
        };
        std::thread::Builder::new()
            .name("ferrymq-audit".into())
            .spawn(move || writer.run(rx))
            .map_err(|source| ServerError::Thread {
                name: "ferrymq-audit",
                source,
            })?;
        Ok(Audit {
            inner: Some(Arc::new(Inner {
                tx,
                net,
                budgets: Mutex::default(),
            })),
        })
    }

    /// Whether events are recorded (callers skip building them otherwise).
    pub(crate) fn on(&self) -> bool {
        self.inner.is_some()
    }

    /// Records one event that `source` can cause at will, within its bound (see the module
    /// doc): `who` (an object) names the source and goes in every line, `detail` adds to it.
    pub(crate) fn record_bounded(
        &self,
        source: Source,
        event: &'static str,
        who: Value,
        detail: Value,
    ) {
        let Some(inner) = &self.inner else {
            return;
        };
        let mut ended = Vec::new();
        let take = inner
            .budgets
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take(source, event, &who, Instant::now(), &mut ended);
        for line in ended {
            self.record(
                line["event"].as_str().unwrap_or(event),
                line["fields"].clone(),
            );
        }
        let Take::Write(unrecorded) = take else {
            return;
        };
        let mut fields = who;
        if let (Some(f), Value::Object(d)) = (fields.as_object_mut(), detail) {
            f.extend(d);
            if unrecorded > 0 {
                f.insert("unrecorded_before".into(), unrecorded.into());
            }
        }
        self.record(event, fields);
    }

    /// A source that is gone (a connection that ended): how many of its lines were not
    /// written since its last one.
    pub(crate) fn forget(&self, source: Source) -> u64 {
        let Some(inner) = &self.inner else {
            return 0;
        };
        let mut budgets = inner.budgets.lock().unwrap_or_else(|e| e.into_inner());
        budgets
            .by_source
            .remove(&source)
            .map_or(0, |b| b.unrecorded)
    }

    /// Records one event: `fields` (a JSON object) with `ts` and `event` added. Never waits.
    pub(crate) fn record(&self, event: &str, fields: Value) {
        let Some(inner) = &self.inner else {
            return;
        };
        let mut line = json!({ "ts": crate::utc::now(), "event": event });
        if let (Some(l), Value::Object(f)) = (line.as_object_mut(), fields) {
            l.extend(f);
        }
        match inner.tx.try_send(Msg::Line(line)) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                inner.net.audit_dropped.fetch_add(1, Relaxed);
            }
        }
    }
}

/// Largest request body taken while the audit log is on (axum's default limit).
const BODY_LIMIT: usize = 2 * 1024 * 1024;

/// Largest request body recorded with an admin call; a larger one is recorded by its size.
const BODY_RECORDED: usize = 16 * 1024;

/// Records every admin API call that may change something (any method but GET, HEAD and
/// OPTIONS; the sign-in form excepted): method, path (which names what it changes: a queue,
/// a client), the response status, and the JSON body it sent (the change itself).
pub(crate) async fn admin_call(
    audit: Audit,
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    use axum::http::Method;
    use axum::response::IntoResponse;
    let reads = matches!(*req.method(), Method::GET | Method::HEAD | Method::OPTIONS);
    if !audit.on() || reads || req.uri().path() == "/login" {
        return next.run(req).await;
    }
    let method = req.method().to_string();
    let path = req.uri().path().to_string();
    let query = req.uri().query().map(str::to_string);
    let (parts, body) = req.into_parts();
    // Whole bodies of the admin API are small (a queue definition, a patch); the handler's
    // own limit still applies to what is passed on.
    let bytes = match axum::body::to_bytes(body, BODY_LIMIT).await {
        Ok(b) => b,
        Err(_) => {
            let body = json!({ "error": "request body too large" }).to_string();
            return (axum::http::StatusCode::PAYLOAD_TOO_LARGE, body).into_response();
        }
    };
    let change = if bytes.is_empty() {
        Value::Null
    } else if bytes.len() > BODY_RECORDED {
        json!({ "bytes": bytes.len() })
    } else {
        serde_json::from_slice::<Value>(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
    };
    let req = axum::extract::Request::from_parts(parts, axum::body::Body::from(bytes));
    let response = next.run(req).await;
    audit.record(
        "admin",
        json!({ "method": method, "path": path, "query": query,
            "status": response.status().as_u16(), "change": change }),
    );
    response
}

/// A CONNECT's client id, authenticated user, address and listener, carried to the router
/// with it and recorded there as the engine accepts it: before anything the router records
/// of that connection next (a takeover's `disconnect` can follow in the same step).
pub(crate) struct Connected {
    client_id: String,
    user: Option<Arc<str>>,
    version: ferrymq_mqtt::ProtocolVersion,
    address: std::net::SocketAddr,
    listener: &'static str,
}

impl Connected {
    pub(crate) fn new(
        c: &ferrymq_mqtt::Connect,
        who: &ferrymq_core::Identity,
        address: std::net::SocketAddr,
        listener: &'static str,
    ) -> Connected {
        Connected {
            client_id: c.client_id.clone(),
            user: who.user.clone(),
            version: c.version,
            address,
            listener,
        }
    }

    /// `connect`, with the client id the session has (`engine_id`): for a client that sent
    /// an empty one, the id the broker assigned it (and `"assigned": true`), so that this line
    /// and the later ones of the connection name the same client.
    pub(crate) fn record(self, audit: &Audit, conn: ferrymq_core::ConnId, engine_id: Option<&str>) {
        let protocol = match self.version {
            ferrymq_mqtt::ProtocolVersion::V5 => "5.0",
            ferrymq_mqtt::ProtocolVersion::V311 => "3.1.1",
        };
        let assigned = self.client_id.is_empty() && engine_id.is_some_and(|id| !id.is_empty());
        let client_id = engine_id.unwrap_or(&self.client_id);
        let mut line = json!({ "conn": conn.0, "client_id": client_id,
            "user": self.user.as_deref(), "address": self.address.to_string(),
            "listener": self.listener, "protocol": protocol });
        if assigned {
            line["assigned"] = true.into();
        }
        audit.record("connect", line);
    }
}

/// This router step's ACL denials and ended connections (the router calls it when the
/// audit log is on, before it clears them).
pub(crate) fn engine_events(
    audit: &Audit,
    broker: &ferrymq_core::Broker,
    out: &ferrymq_core::Outbox,
) {
    let publishes = out
        .denied
        .iter()
        .map(|d| ("publish", d.conn, &d.topic, d.trace_id.as_deref()));
    let subscriptions = out
        .denied_subscriptions
        .iter()
        .map(|(conn, filter)| ("subscribe", *conn, filter, None));
    for (action, conn, topic, trace_id) in publishes.chain(subscriptions) {
        let (client_id, user) = broker.client_of(conn).unwrap_or(("", None));
        let mut detail = json!({ "action": action, "topic": topic.as_ref() });
        if let (Some(d), Some(t)) = (detail.as_object_mut(), trace_id) {
            d.insert("trace_id".into(), t.into());
        }
        audit.record_bounded(
            Source::Conn(conn.0),
            "acl_denied",
            json!({ "conn": conn.0, "client_id": client_id, "user": user }),
            detail,
        );
    }
    for (conn, client_id, why) in &out.ended {
        use ferrymq_core::Ended;
        let (by, reason) = match why {
            Ended::ByClient(r) => ("client", Some(*r)),
            Ended::Lost => ("network", None),
            Ended::ByServer(r) => ("broker", *r),
        };
        let mut line = json!({ "conn": conn.0, "client_id": client_id.as_ref(), "by": by,
            "reason": reason.map(|r| format!("{r:?}")),
            "reason_code": reason.map(|r| r.as_u8()) });
        let unrecorded = audit.forget(Source::Conn(conn.0));
        if let (Some(l), true) = (line.as_object_mut(), unrecorded > 0) {
            l.insert("acl_denied_unrecorded".into(), unrecorded.into());
        }
        audit.record("disconnect", line);
    }
}

/// `auth_failure`: a CONNECT authentication refused (the user name is the one it claimed).
pub(crate) fn auth_failure(
    l: &crate::connection::Listener,
    addr: &std::net::SocketAddr,
    c: &ferrymq_mqtt::Connect,
    reason: &str,
) {
    if !l.audit.on() {
        return;
    }
    l.audit.record_bounded(
        Source::Address(crate::limits::source_key(addr.ip())),
        "auth_failure",
        json!({ "address": addr.ip().to_string() }),
        json!({ "client_id": c.client_id, "user": c.username, "address": addr.to_string(),
            "listener": l.kind.name(), "reason": reason }),
    );
}

impl Audit {
    /// Waits (blocking, at most `limit`) until every line recorded before is written and
    /// flushed: the server's shutdown calls it last, so that the disconnects it caused are in
    /// the file when the process exits.
    pub(crate) fn flush(&self, limit: std::time::Duration) {
        let Some(inner) = &self.inner else {
            return;
        };
        let (done, wait) = std::sync::mpsc::channel();
        let deadline = std::time::Instant::now() + limit;
        let mut msg = Msg::Flush(done);
        // The queue may be full: retry until there is room or time is up.
        loop {
            match inner.tx.try_send(msg) {
                Ok(()) => break,
                Err(TrySendError::Full(m)) if std::time::Instant::now() < deadline => {
                    msg = m;
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                Err(_) => return,
            }
        }
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        let _ = wait.recv_timeout(left);
    }
}

fn open(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
}

struct Writer {
    net: Arc<NetMetrics>,
    file: std::io::BufWriter<std::fs::File>,
    path: PathBuf,
    size: u64,
    max_bytes: u64,
    keep: u32,
}

impl Writer {
    fn run(mut self, rx: Receiver<Msg>) {
        let mut failing = false;
        while let Ok(first) = rx.recv() {
            // Everything waiting goes in one write and one flush.
            let mut flushed = Vec::new();
            let mut error = None;
            for msg in std::iter::once(first).chain(std::iter::from_fn(|| rx.try_recv().ok())) {
                match msg {
                    Msg::Line(line) => {
                        if let Err(e) = self.write(&line) {
                            // Not in the file: counted like a line the queue dropped.
                            self.net.audit_dropped.fetch_add(1, Relaxed);
                            error = Some(e);
                        }
                    }
                    Msg::Flush(done) => flushed.push(done),
                }
            }
            if let Err(e) = self.file.flush() {
                error = Some(e);
            }
            for done in flushed {
                let _ = done.send(());
            }
            match error {
                None => failing = false,
                Some(e) if !failing => {
                    failing = true;
                    tracing::warn!(file = %self.path.display(), error = %e, "cannot write the audit log");
                }
                Some(_) => {}
            }
        }
    }

    fn write(&mut self, line: &Value) -> std::io::Result<()> {
        let mut bytes = serde_json::to_vec(line).map_err(std::io::Error::other)?;
        bytes.push(b'\n');
        if self.size > 0 && self.size + bytes.len() as u64 > self.max_bytes {
            self.rotate()?;
        }
        self.file.write_all(&bytes)?;
        self.size += bytes.len() as u64;
        Ok(())
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        self.file.flush()?;
        let numbered = |n: u32| {
            let mut p = self.path.clone().into_os_string();
            p.push(format!(".{n}"));
            PathBuf::from(p)
        };
        let _ = std::fs::remove_file(numbered(self.keep));
        for n in (1..self.keep).rev() {
            let from = numbered(n);
            if from.exists() {
                std::fs::rename(&from, numbered(n + 1))?;
            }
        }
        // The file may be gone (deleted by hand or by a log shipper while its lines went on
        // into it): there is nothing to keep then, and a new one starts all the same, or
        // every line from now on would fail here.
        match std::fs::rename(&self.path, numbered(1)) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        self.file = std::io::BufWriter::new(open(&self.path)?);
        self.size = 0;
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_full_queue_drops_the_line_and_counts_it() {
        let net = Arc::new(NetMetrics::default());
        let (tx, rx) = sync_channel(1);
        let audit = Audit {
            inner: Some(Arc::new(Inner {
                tx,
                net: net.clone(),
                budgets: Mutex::default(),
            })),
        };
        audit.record("connect", json!({ "conn": 1 }));
        audit.record("connect", json!({ "conn": 2 }));
        assert_eq!(net.audit_dropped.load(Relaxed), 1);
        let Ok(Msg::Line(kept)) = rx.try_recv() else {
            panic!("the first line is queued");
        };
        assert_eq!(
            (&kept["event"], &kept["conn"]),
            (&json!("connect"), &json!(1))
        );
    }

    #[test]
    fn a_source_over_its_bound_is_counted_and_the_count_written_later() {
        let mut b = Budgets::default();
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        let (me, other) = (Source::Conn(1), Source::Conn(2));
        let who = json!({ "conn": 1 });
        let mut ended = Vec::new();
        let mut take = |b: &mut Budgets, s, t| b.take(s, "acl_denied", &who, t, &mut ended);
        let window = SOURCE_WINDOW.as_millis() as u64;
        assert!(matches!(take(&mut b, other, at(0)), Take::Write(0)));
        for _ in 0..SOURCE_LINES {
            assert!(matches!(take(&mut b, me, at(1)), Take::Write(0)));
        }
        for _ in 0..5 {
            assert!(matches!(take(&mut b, me, at(1)), Take::Skip));
        }
        assert!(
            matches!(take(&mut b, other, at(2)), Take::Write(0)),
            "its own"
        );
        // All sources' window ends first (`me`'s is still on), then `me`'s: its next line
        // carries the count.
        assert!(matches!(take(&mut b, other, at(window)), Take::Write(0)));
        let next = take(&mut b, me, at(window + 2));
        assert!(matches!(next, Take::Write(5)));
        for _ in 0..SOURCE_LINES + 3 {
            take(&mut b, me, at(window + 2));
        }
        // `me` goes quiet: once all sources' window ends too, a line of its own counts 4.
        assert!(matches!(
            take(&mut b, other, at(3 * window)),
            Take::Write(0)
        ));
        assert_eq!(ended.len(), 1, "{ended:?}");
        assert_eq!(ended[0]["fields"]["unrecorded"], 4);
        assert_eq!(ended[0]["fields"]["conn"], 1);
        assert!(!b.by_source.contains_key(&me), "forgotten");
    }
}
