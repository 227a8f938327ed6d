//! `POST /api/v1/reload` (reload the configuration file, as SIGHUP does) and
//! `GET /api/v1/config` (the configuration in force, secrets redacted). Both behind the admin
//! API's token and same-origin guards (`admin.rs`).

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;

use crate::admin::AdminState;
use crate::reload::Trigger;

pub(crate) fn routes() -> axum::Router<AdminState> {
    axum::Router::new()
        .route("/api/v1/reload", post(reload))
        .route("/api/v1/config", get(config))
}

fn json_response(status: StatusCode, body: serde_json::Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// 200 `{"applied": [...], "restart_required": [...], "failed": [...]}`, or 422
/// `{"error": "file:line: ..."}` when the file was refused (nothing changed).
async fn reload(State(state): State<AdminState>) -> Response {
    match state.reloader.reload(Trigger::Api).await {
        Ok(report) => json_response(
            StatusCode::OK,
            json!({
                "applied": report.applied,
                "restart_required": report.restart_required,
                "failed": report.failed.iter().map(|(part, error)| json!({ "part": part, "error": error })).collect::<Vec<_>>(),
            }),
        ),
        Err(error) => json_response(
            StatusCode::UNPROCESSABLE_ENTITY,
            json!({ "error": error.to_string() }),
        ),
    }
}

async fn config(State(state): State<AdminState>) -> Response {
    json_response(StatusCode::OK, state.reloader.running().redacted_json())
}
