//! Admin HTTP: `/health`, `/ready`, `/metrics`, `/api/v1/alarms`, the work-queue REST API
//! under `/api/v1/queues` (`queue_api.rs`), and the views of clients, subscriptions and
//! retained messages (`views_api.rs`); every route is in docs/api.md.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::sync::{mpsc, oneshot};

use crate::alarms::Alarms;
use crate::metrics::{render, NetMetrics};
use crate::router::ToRouter;

#[derive(Clone)]
pub(crate) struct AdminState {
    pub router: mpsc::Sender<ToRouter>,
    pub net: Arc<NetMetrics>,
    pub alarms: Alarms,
    /// Set when the server starts shutting down: `/ready` answers 503 from then on.
    pub stopping: tokio::sync::watch::Receiver<bool>,
}

pub(crate) fn app(state: AdminState) -> axum::Router {
    axum::Router::new()
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/metrics", get(metrics))
        .route("/api/v1/alarms", get(alarms))
        .merge(crate::queue_api::routes())
        .merge(crate::views_api::routes())
        .with_state(state)
}

pub(crate) async fn snapshot(state: &AdminState) -> Option<crate::metrics::EngineSnapshot> {
    let (tx, rx) = oneshot::channel();
    state.router.send(ToRouter::Snapshot(tx)).await.ok()?;
    tokio::time::timeout(std::time::Duration::from_secs(5), rx)
        .await
        .ok()?
        .ok()
}

/// 200 when the router answers, 503 when it does not.
async fn health(State(state): State<AdminState>) -> impl IntoResponse {
    let json = [(header::CONTENT_TYPE, "application/json")];
    match snapshot(&state).await {
        Some(s) => (
            StatusCode::OK,
            json,
            format!(
                "{{\"status\":\"ok\",\"connections\":{},\"sessions\":{}}}",
                s.connections, s.sessions
            ),
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
    if snapshot(&state).await.is_none() {
        return not_ready("the router does not answer");
    }
    (StatusCode::OK, json(), "{\"status\":\"ready\"}".to_string())
}

async fn metrics(State(state): State<AdminState>) -> impl IntoResponse {
    match snapshot(&state).await {
        Some(s) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            render(&state.net, &s, &state.alarms.list()),
        ),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            String::from("# router unavailable\n"),
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
