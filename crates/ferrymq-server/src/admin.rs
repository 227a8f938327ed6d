//! Admin HTTP: `/health` and `/metrics`. The full REST API comes later.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::sync::{mpsc, oneshot};

use crate::metrics::{render, NetMetrics};
use crate::router::ToRouter;

#[derive(Clone)]
pub(crate) struct AdminState {
    pub router: mpsc::Sender<ToRouter>,
    pub net: Arc<NetMetrics>,
}

pub(crate) fn app(state: AdminState) -> axum::Router {
    axum::Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn snapshot(state: &AdminState) -> Option<crate::metrics::EngineSnapshot> {
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

async fn metrics(State(state): State<AdminState>) -> impl IntoResponse {
    match snapshot(&state).await {
        Some(s) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            render(&state.net, &s),
        ),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
            String::from("# router unavailable\n"),
        ),
    }
}
