//! The web dashboard (issue 14): plain HTML, CSS and JS in `dashboard/`, embedded in the
//! binary (no front-end build step) and served by the admin listener at `/`. It reads and
//! acts through the admin API like any other client (docs/api.md); with `[admin] token` the
//! page and the API need the token, which a browser gives once on `/login` and then sends as
//! an HttpOnly cookie (`admin.rs`).

use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::admin::AdminState;

const INDEX: &str = include_str!("dashboard/index.html");
const APP: &str = include_str!("dashboard/app.js");
const STYLE: &str = include_str!("dashboard/style.css");
/// The sign-in form, served by the admin layer when a token is set.
pub(crate) const LOGIN: &str = include_str!("dashboard/login.html");

pub(crate) fn routes() -> axum::Router<AdminState> {
    axum::Router::new()
        .route(
            "/",
            get(|| async { asset("text/html; charset=utf-8", INDEX) }),
        )
        .route(
            "/dashboard/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", APP) }),
        )
        .route(
            "/dashboard/style.css",
            get(|| async { asset("text/css; charset=utf-8", STYLE) }),
        )
        // With a token, the admin layer answers `/login` itself; without one there is
        // nothing to sign in to.
        .route("/login", get(to_index).post(to_index))
}

async fn to_index() -> Response {
    (StatusCode::SEE_OTHER, [(header::LOCATION, "/")]).into_response()
}

pub(crate) fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}
