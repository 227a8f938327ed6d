//! Admin HTTP: `/health`, `/ready`, `/metrics`, `/api/v1/alarms`, the work-queue REST API
//! under `/api/v1/queues` (`queue_api.rs`), and the views of clients, subscriptions and
//! retained messages (`views_api.rs`), configuration reload and view (`config_api.rs`);
//! every route is in docs/api.md.
//!
//! With `[admin] token` (or `token_file`) every route but [`OPEN_PATHS`] requires
//! `Authorization: Bearer <token>`, checked by one layer over the whole router, so a route
//! added later is protected without anyone remembering to. Without a token the listener must
//! be on a loopback address (`Config::validate`).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Instant;

use axum::extract::{ConnectInfo, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use bytes::Bytes;
use futures_util::future::{BoxFuture, FutureExt, Shared};
use tokio::sync::{mpsc, oneshot};

use crate::alarms::Alarms;
use crate::auth::FailureLimiter;
use crate::metrics::{render, NetMetrics};
use crate::router::ToRouter;

#[derive(Clone)]
pub(crate) struct AdminState {
    pub router: mpsc::Sender<ToRouter>,
    pub net: Arc<NetMetrics>,
    pub alarms: Alarms,
    /// Set when the server starts shutting down: `/ready` answers 503 from then on.
    pub stopping: tokio::sync::watch::Receiver<bool>,
    /// `POST /api/v1/reload`, `GET /api/v1/config` (`config_api.rs`).
    pub reloader: Arc<crate::reload::Reloader>,
    /// Calls that change something are recorded here (`audit.rs`).
    pub audit: crate::audit::Audit,
    /// The `/metrics` render under way, shared by the scrapes that arrive meanwhile.
    pub scrapes: Arc<ScrapeFlight>,
}

/// A `/metrics` render: the text, or `None` when the router did not answer.
type Render = Shared<BoxFuture<'static, Option<Bytes>>>;

/// Scrapes that arrive while a render is under way wait for it and answer with its text,
/// instead of each asking the router for a snapshot and encoding ~1 MB (with 1,000 queues)
/// of their own: a burst of scrapes costs one render. The slot is emptied when the render
/// is done, so a later scrape renders afresh and no old text is kept.
#[derive(Default)]
pub(crate) struct ScrapeFlight(std::sync::Mutex<Option<Render>>);

impl ScrapeFlight {
    /// The render under way, or a new one started with `start`.
    fn join(&self, start: impl FnOnce() -> Render) -> Render {
        let mut slot = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match slot.as_ref().filter(|r| r.peek().is_none()) {
            Some(r) => r.clone(),
            None => {
                let r = start();
                *slot = Some(r.clone());
                r
            }
        }
    }

    /// `render` is done: forget it, unless a newer one took its place.
    fn done(&self, render: &Render) {
        let mut slot = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if slot.as_ref().is_some_and(|r| r.ptr_eq(render)) {
            *slot = None;
        }
    }
}

/// Paths answered without the token: liveness and readiness probes (load balancers and
/// orchestrators call them without credentials, and they reveal nothing).
pub(crate) const OPEN_PATHS: [&str; 2] = ["/health", "/ready"];

/// The cookie a browser carries the token in once signed in on `/login` (the dashboard).
const COOKIE: &str = "ferrymq_admin_token";

/// The admin API's bearer token (`[admin] token` or `token_file`), and the wrong guesses
/// per source address (limited as MQTT password failures are, with the `[auth]` settings).
#[derive(Clone)]
pub(crate) struct AdminToken {
    token: Arc<[u8]>,
    guesses: Arc<FailureLimiter>,
    /// Wrong tokens and banned requests are recorded as `auth_failure` (bounded per
    /// address, as MQTT's are).
    audit: crate::audit::Audit,
}

impl AdminToken {
    pub(crate) fn new(
        token: &str,
        guesses: FailureLimiter,
        audit: crate::audit::Audit,
    ) -> AdminToken {
        AdminToken {
            token: Arc::from(token.as_bytes()),
            guesses: Arc::new(guesses),
            audit,
        }
    }

    /// An `auth_failure` line for the admin API (`listener: "http"`).
    fn audit_refusal(&self, source: Option<IpAddr>, path: &str, reason: &str) {
        let Some(ip) = source.filter(|_| self.audit.on()) else {
            return;
        };
        self.audit.record_bounded(
            crate::audit::Source::Address(ip),
            "auth_failure",
            serde_json::json!({ "address": ip.to_string() }),
            serde_json::json!({ "listener": "http", "path": path, "reason": reason }),
        );
    }

    /// Counts a wrong token from `source` (nothing without an address).
    fn wrong_guess(&self, source: Option<IpAddr>, path: &str) {
        self.audit_refusal(source, path, "bad_token");
        if let Some(ip) = source {
            if self.guesses.fail(ip, Instant::now()) {
                tracing::warn!(
                    source = %ip,
                    ban_ms = self.guesses.ban_time().as_millis() as u64,
                    "admin API: address banned after repeated wrong tokens"
                );
            }
        }
    }

    /// Whether `Authorization` carries this token as `Bearer`, compared in constant time:
    /// how long the comparison takes does not tell how much of a guess was right.
    fn admits(&self, headers: &HeaderMap) -> bool {
        let Some(given) = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
        else {
            return false;
        };
        constant_time_eq(given.trim_ascii(), &self.token)
    }

    /// Whether the request's cookie `ferrymq_admin_token` holds this token (percent-encoded).
    fn admits_cookie(&self, headers: &HeaderMap) -> bool {
        headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|c| c.trim().strip_prefix(COOKIE)?.strip_prefix('='))
            .any(|v| {
                let given: Vec<u8> = percent_encoding::percent_decode_str(v).collect();
                constant_time_eq(&given, &self.token)
            })
    }

    /// Whether the request offers a token at all (the header or the cookie), right or not.
    fn offered(headers: &HeaderMap) -> bool {
        headers.contains_key(header::AUTHORIZATION)
            || headers
                .get_all(header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .any(|v| v.contains(COOKIE))
    }
}

/// Equal bytes, comparing every byte of both whatever differs (a length difference included,
/// which only tells a guess's length).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = u8::from(a.len() != b.len());
    for i in 0..a.len().max(b.len()) {
        let x = a.get(i).copied().unwrap_or(0);
        let y = b.get(i).copied().unwrap_or(0);
        diff |= std::hint::black_box(x ^ y);
    }
    diff == 0
}

pub(crate) fn app(state: AdminState, token: Option<AdminToken>) -> axum::Router {
    let router = axum::Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/api/v1/alarms", get(alarms))
        .merge(crate::queue_api::routes())
        .merge(crate::views_api::routes())
        .merge(crate::dashboard::routes())
        .merge(crate::config_api::routes())
        .with_state(state.clone());
    // Innermost: only calls that passed the guards below are recorded.
    let audit = state.audit.clone();
    let router = router.layer(axum::middleware::from_fn(move |req, next| {
        crate::audit::admin_call(audit.clone(), req, next)
    }));
    let guarded = token.is_some();
    let router = match token {
        // Over the whole router (unknown paths included: 401, not 404, tells a caller
        // without the token nothing about which routes exist).
        Some(token) => router.layer(axum::middleware::from_fn(move |req, next| {
            require_token(token.clone(), req, next)
        })),
        None => router,
    };
    // Outermost: web pages of other origins get nothing done here (see `same_origin`).
    router.layer(axum::middleware::from_fn(move |req, next| {
        same_origin(guarded, req, next)
    }))
}

/// Refuses (403) what a web page of another origin could make a browser send: a request
/// that changes something (any method but GET, HEAD, OPTIONS) whose `Origin` is not this
/// listener's own, or that the browser marks as not same-origin (`Sec-Fetch-Site`) — a
/// "simple" cross-origin POST needs no preflight, and the dashboard's cookie rides along on
/// requests from another port of the same host. Without a token the admin API is on loopback,
/// where any local page could reach it, so there the `Host` must be loopback too (a page
/// that rebinds its own name to 127.0.0.1 sends its name). Clients that are not browsers
/// (the CLI, curl) send none of these headers and are not affected.
async fn same_origin(guarded: bool, req: Request, next: Next) -> Response {
    let headers = req.headers();
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    let forbidden = |why: &str| {
        let body = serde_json::json!({ "error": why }).to_string();
        (
            StatusCode::FORBIDDEN,
            [(header::CONTENT_TYPE, "application/json")],
            body,
        )
            .into_response()
    };
    if !guarded && !host.is_empty() && !loopback_host(host) {
        return forbidden("the admin API without a token answers only to a loopback Host");
    }
    let writes = !matches!(
        *req.method(),
        axum::http::Method::GET | axum::http::Method::HEAD | axum::http::Method::OPTIONS
    );
    if writes {
        let origin = headers.get(header::ORIGIN).and_then(|o| o.to_str().ok());
        let foreign_origin = origin.is_some_and(|o| {
            o.split_once("://")
                .map(|(_, authority)| authority.trim_end_matches('/'))
                != Some(host)
        });
        let fetch_site = headers
            .get("sec-fetch-site")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("same-origin");
        if foreign_origin || !matches!(fetch_site, "same-origin" | "none") {
            return forbidden("requests from another web origin may not change anything here");
        }
    }
    next.run(req).await
}

/// `localhost`, `127.x.y.z` or `[::1]`, with or without a port.
fn loopback_host(host: &str) -> bool {
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// 401 with `WWW-Authenticate: Bearer` unless the request carries the token or asks for an
/// open path; 429 for every request from an address banned for wrong tokens (the right token
/// included: otherwise guessing would go on at full speed during the ban).
async fn require_token(token: AdminToken, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    // The stylesheet too: the sign-in page uses it, and it holds nothing.
    if OPEN_PATHS.contains(&path) || path == "/dashboard/style.css" {
        return next.run(req).await;
    }
    let source = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| crate::limits::source_key(c.0.ip()));
    if source.is_some_and(|ip| token.guesses.is_banned(ip, Instant::now())) {
        token.audit_refusal(source, path, "banned");
        let retry = token.guesses.ban_time().as_secs().max(1).to_string();
        let body = serde_json::json!({
            "error": "too many wrong admin API tokens from this address; try again later"
        })
        .to_string();
        return (
            StatusCode::TOO_MANY_REQUESTS,
            [
                (header::RETRY_AFTER, retry),
                (header::CONTENT_TYPE, "application/json".to_string()),
            ],
            body,
        )
            .into_response();
    }
    if path == "/login" {
        if req.method() == axum::http::Method::POST {
            return sign_in(&token, source, req).await;
        }
        return crate::dashboard::asset("text/html; charset=utf-8", crate::dashboard::LOGIN);
    }
    if token.admits(req.headers()) || token.admits_cookie(req.headers()) {
        return next.run(req).await;
    }
    let offered = AdminToken::offered(req.headers());
    if offered {
        token.wrong_guess(source, path);
    }
    if path == "/" || path.starts_with("/dashboard/") {
        // A browser: to the sign-in page, not a bare 401.
        return (StatusCode::SEE_OTHER, [(header::LOCATION, "/login")]).into_response();
    }
    let message = if offered {
        "the admin API token is wrong"
    } else {
        "the admin API needs a token: send Authorization: Bearer <token>"
    };
    let body = serde_json::json!({ "error": message }).to_string();
    (
        StatusCode::UNAUTHORIZED,
        [
            (header::WWW_AUTHENTICATE, "Bearer"),
            (header::CONTENT_TYPE, "application/json"),
        ],
        body,
    )
        .into_response()
}

/// `POST /login` with `token=…` (a form): the right token sets the cookie the dashboard's
/// requests carry and goes to `/`; a wrong one goes back to the form.
async fn sign_in(token: &AdminToken, source: Option<IpAddr>, req: Request) -> Response {
    let body = axum::body::to_bytes(req.into_body(), 4096)
        .await
        .unwrap_or_default();
    let given = std::str::from_utf8(&body)
        .ok()
        .and_then(|b| crate::queue_api::query_pairs(b).ok())
        .and_then(|pairs| pairs.into_iter().find(|(k, _)| k == "token"))
        .map(|(_, v)| v)
        .unwrap_or_default();
    if !constant_time_eq(given.as_bytes(), &token.token) {
        token.wrong_guess(source, "/login");
        return (StatusCode::SEE_OTHER, [(header::LOCATION, "/login?failed")]).into_response();
    }
    let value = percent_encoding::utf8_percent_encode(&given, percent_encoding::NON_ALPHANUMERIC);
    let cookie = format!("{COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict");
    (
        StatusCode::SEE_OTHER,
        [
            (header::LOCATION, "/".to_string()),
            (header::SET_COOKIE, cookie),
        ],
    )
        .into_response()
}

pub(crate) async fn snapshot(state: &AdminState) -> Option<crate::metrics::EngineSnapshot> {
    let (tx, rx) = oneshot::channel();
    state.router.send(ToRouter::Snapshot(tx)).await.ok()?;
    tokio::time::timeout(std::time::Duration::from_secs(5), rx)
        .await
        .ok()?
        .ok()
}

/// Whether the router answers, with its connection and session counts: what `/health` and
/// `/ready` ask, open to anyone, so not a full [`snapshot`] (whose cost grows with the queues).
async fn alive(state: &AdminState) -> Option<(usize, usize)> {
    let (tx, rx) = oneshot::channel();
    state.router.send(ToRouter::Alive(tx)).await.ok()?;
    tokio::time::timeout(std::time::Duration::from_secs(5), rx)
        .await
        .ok()?
        .ok()
}

/// 200 when the router answers, 503 when it does not.
async fn health(State(state): State<AdminState>) -> impl IntoResponse {
    let json = [(header::CONTENT_TYPE, "application/json")];
    match alive(&state).await {
        Some((connections, sessions)) => (
            StatusCode::OK,
            json,
            format!("{{\"status\":\"ok\",\"connections\":{connections},\"sessions\":{sessions}}}"),
        ),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            json,
            "{\"status\":\"unavailable\"}".to_string(),
        ),
    }
}

/// 200 once the broker serves: its listeners are bound and its log recovered (both happen
/// before this listener starts), it is not shutting down, and the router answers; 503
/// otherwise, with the reason. For load balancers and orchestrators.
async fn ready(State(state): State<AdminState>) -> impl IntoResponse {
    let json = || [(header::CONTENT_TYPE, "application/json")];
    let not_ready = |why: &str| {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            json(),
            serde_json::json!({ "status": "not ready", "reason": why }).to_string(),
        )
    };
    if *state.stopping.borrow() {
        return not_ready("shutting down");
    }
    if alive(&state).await.is_none() {
        return not_ready("the router does not answer");
    }
    (StatusCode::OK, json(), "{\"status\":\"ready\"}".to_string())
}

async fn metrics(State(state): State<AdminState>) -> impl IntoResponse {
    let render = state.scrapes.join(|| {
        let state = state.clone();
        async move {
            // Encoding is most of a millisecond with many queues (~1 MB for 1,000): on the
            // blocking pool, not on a worker that connection tasks wait for.
            let net = state.net.clone();
            let alarms = state.alarms.list();
            let snapshot = snapshot(&state).await?;
            tokio::task::spawn_blocking(move || Bytes::from(render(&net, snapshot, alarms)))
                .await
                .ok()
        }
        .boxed()
        .shared()
    });
    let body = render.clone().await;
    state.scrapes.done(&render);
    match body {
        Some(body) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            body,
        ),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            Bytes::from_static(b"# router unavailable\n"),
        ),
    }
}

/// Every known alarm, active or not: `{"alarms": [{"name", "active", "since", "cleared",
/// "message"}, ...]}` (times in ms since the Unix epoch). Read from the registry, not the
/// router, so it answers even while the router is busy.
async fn alarms(State(state): State<AdminState>) -> impl IntoResponse {
    let body = serde_json::json!({ "alarms": state.alarms.list() });
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn scrapes_during_a_render_share_it_and_a_later_one_renders_again() {
        let flight = ScrapeFlight::default();
        let (tx, rx) = oneshot::channel::<()>();
        let mut started = 0;
        let mut start = |rx: oneshot::Receiver<()>| {
            started += 1;
            async move { rx.await.ok().map(|()| Bytes::from_static(b"text")) }
                .boxed()
                .shared()
        };
        let first = flight.join(|| start(rx));
        let second = flight.join(|| panic!("a second render while the first is under way"));
        assert!(first.ptr_eq(&second));
        tx.send(()).unwrap();
        assert_eq!(second.clone().await.as_deref(), Some(&b"text"[..]));
        flight.done(&second);
        flight.done(&first);
        let (_tx, rx) = oneshot::channel::<()>();
        let third = flight.join(|| start(rx));
        assert!(!third.ptr_eq(&first));
        assert_eq!(started, 2);
    }

    #[test]
    fn the_token_is_compared_whole() {
        let t = AdminToken::new(
            "s3cret-token",
            FailureLimiter::new(std::sync::Arc::new(crate::auth::FailurePolicy::new(
                &crate::auth::AuthConfig::default(),
            ))),
            Default::default(),
        );
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, v.parse().unwrap());
            t.admits(&h)
        };
        assert!(with("Bearer s3cret-token"));
        assert!(!with("Bearer s3cret-toke"));
        assert!(!with("Bearer s3cret-token2"));
        assert!(!with("Bearer S3cret-token"));
        assert!(!with("Basic s3cret-token"));
        assert!(!with("s3cret-token"));
        assert!(!t.admits(&HeaderMap::new()));
        assert!(!with("Bearer "));
    }
}
