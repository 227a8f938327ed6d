//! REST views of the broker under `/api/v1` (shapes in docs/api.md): the overview, clients
//! (list, search, show, disconnect), subscriptions, subscribed filters ("topics"), and
//! retained messages (list, show, delete).
//!
//! Each request is an [`AdminCommand`] the router runs between packets; listings are pages
//! after a cursor (`ferrymq_core::views`), so none walks the whole state. The two that change
//! something answer once their records are stored, as queue commands do.

use std::time::Duration;

use axum::extract::{Path, RawQuery, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use ferrymq_core::views::{ClientView, Page, SubscriptionView};
use ferrymq_core::{Broker, Message, Outbox, Time};
use serde_json::{json, Value};
use tokio::sync::oneshot;

use crate::admin::AdminState;
use crate::peers::Peers;
use crate::router::ToRouter;

/// How long a request waits for the router.
const ROUTER_WAIT: Duration = Duration::from_secs(10);
/// Page size when none is asked for, and the most a page may hold.
const DEFAULT_LIMIT: usize = 100;
const MAX_LIMIT: usize = 1_000;

/// A request the router runs against the engine.
#[derive(Debug)]
pub(crate) enum AdminCommand {
    Clients {
        after: Option<String>,
        limit: usize,
        search: Option<String>,
    },
    Client(String),
    Disconnect(String),
    Subscriptions {
        client_id: Option<String>,
        after: Option<String>,
        limit: usize,
    },
    Topics {
        after: Option<String>,
        limit: usize,
    },
    Retained {
        after: Option<String>,
        limit: usize,
    },
    RetainedMessage(String),
    DeleteRetained(String),
}

/// Its answer: a status and a JSON body.
pub(crate) type AdminReply = (StatusCode, Value);

/// Runs one command on the router thread. `peers` has the address and listener of each
/// connection past CONNECT (the engine does not know them).
pub(crate) fn execute(
    broker: &mut Broker,
    peers: &Peers,
    command: AdminCommand,
    now: Time,
    out: &mut Outbox,
) -> AdminReply {
    match command {
        AdminCommand::Clients {
            after,
            limit,
            search,
        } => {
            let page = broker.clients(after.as_deref(), limit, search.as_deref());
            (StatusCode::OK, page_json(page, |c| client_json(&c, peers)))
        }
        AdminCommand::Client(id) => match broker.client(&id) {
            Some(c) => {
                let mut body = client_json(&c, peers);
                let subs = broker.subscriptions(Some(&id), None, MAX_LIMIT);
                body["subscriptions"] = subs.items.iter().map(subscription_json).collect();
                (StatusCode::OK, body)
            }
            None => not_found("client", &id),
        },
        AdminCommand::Disconnect(id) => {
            if broker.disconnect_client(&id, now, out) {
                (StatusCode::OK, json!({ "disconnected": id }))
            } else if broker.client(&id).is_some() {
                (
                    StatusCode::CONFLICT,
                    json!({ "error": format!("client {id:?} is not connected") }),
                )
            } else {
                not_found("client", &id)
            }
        }
        AdminCommand::Subscriptions {
            client_id,
            after,
            limit,
        } => {
            if let Some(id) = &client_id {
                if broker.client(id).is_none() {
                    return not_found("client", id);
                }
            }
            let page = broker.subscriptions(client_id.as_deref(), after.as_deref(), limit);
            (StatusCode::OK, page_json(page, |s| subscription_json(&s)))
        }
        AdminCommand::Topics { after, limit } => {
            let page = broker.filters(after.as_deref(), limit);
            let body = page_json(
                page,
                |f| json!({ "filter": f.filter, "subscriptions": f.subscriptions }),
            );
            (StatusCode::OK, body)
        }
        AdminCommand::Retained { after, limit } => {
            let page = broker.retained_page(after.as_deref(), limit);
            (
                StatusCode::OK,
                page_json(page, |m| retained_json(&m, false)),
            )
        }
        AdminCommand::RetainedMessage(topic) => match broker.retained_message(&topic) {
            Some(m) => (StatusCode::OK, retained_json(&m, true)),
            None => not_found("retained message", &topic),
        },
        AdminCommand::DeleteRetained(topic) => {
            if broker.delete_retained(&topic, now, out) {
                (StatusCode::OK, json!({ "deleted": topic }))
            } else {
                not_found("retained message", &topic)
            }
        }
    }
}

fn not_found(what: &str, name: &str) -> AdminReply {
    (
        StatusCode::NOT_FOUND,
        json!({ "error": format!("no {what} {name:?}") }),
    )
}

fn page_json<T>(page: Page<T>, item: impl Fn(T) -> Value) -> Value {
    json!({
        "items": page.items.into_iter().map(item).collect::<Vec<_>>(),
        "next_cursor": page.next,
    })
}

/// A client; `address` and `listener` are those of its connection (null when it has none).
fn client_json(c: &ClientView, peers: &Peers) -> Value {
    let peer = c.conn.and_then(|conn| peers.get(conn));
    json!({
        "client_id": &*c.client_id,
        "connected": c.connected,
        "protocol": crate::metrics::protocol_label(c.version),
        "address": peer.map(|p| p.origin.addr.to_string()),
        "listener": peer.map(|p| p.origin.listener.name()),
        "session_expiry_s": c.session_expiry,
        "disconnected_at_ms": c.disconnected_at.map(|t| t.0),
        "subscriptions": c.subscriptions,
        "inflight": c.inflight,
        "queued": c.queued,
        "inbound_qos2": c.inbound_qos2,
        "will_pending": c.will_pending,
        "consumes": c.consumes.iter().map(|q| &**q).collect::<Vec<_>>(),
    })
}

fn subscription_json(s: &SubscriptionView) -> Value {
    json!({
        "client_id": &*s.client_id,
        "filter": s.filter,
        "qos": s.qos as u8,
        "no_local": s.no_local,
        "retain_as_published": s.retain_as_published,
        "retain_handling": s.retain_handling,
        "identifier": s.identifier,
        "group": s.group,
        "queue": s.queue.as_deref(),
    })
}

/// A retained message; with `payload`, its payload and properties.
fn retained_json(m: &Message, payload: bool) -> Value {
    let mut v = json!({
        "topic": &*m.topic,
        "qos": m.qos as u8,
        "payload_bytes": m.payload.len(),
        "received_at_ms": m.received_at.0,
        "expires_at_ms": m.expires_at.map(|t| t.0),
    });
    if payload {
        // As dead letters show theirs (`queue_api.rs`): text, or base64 when not UTF-8.
        match std::str::from_utf8(&m.payload) {
            Ok(text) => v["payload"] = json!(text),
            Err(_) => v["payload_base64"] = json!(crate::queue_api::base64(&m.payload)),
        }
        v["properties"] = crate::queue_api::properties_json(&m.properties);
    }
    v
}

pub(crate) fn routes() -> axum::Router<AdminState> {
    axum::Router::new()
        .route("/api/v1/overview", get(overview))
        .route("/api/v1/clients", get(clients))
        .route("/api/v1/clients/{id}", get(client).delete(disconnect))
        .route("/api/v1/subscriptions", get(subscriptions))
        .route("/api/v1/topics", get(topics))
        .route("/api/v1/retained", get(retained))
        .route(
            "/api/v1/retained/{*topic}",
            get(retained_message).delete(delete_retained),
        )
}

/// `cursor`, `limit`, `search`, `client_id` from the query string.
#[derive(Debug, Default)]
struct PageQuery {
    cursor: Option<String>,
    limit: usize,
    search: Option<String>,
    client_id: Option<String>,
}

impl PageQuery {
    fn parse(raw: Option<String>) -> Result<PageQuery, AdminReply> {
        let bad = |field: &str, error: String| {
            (
                StatusCode::BAD_REQUEST,
                json!({ "error": error, "field": field }),
            )
        };
        let pairs = crate::queue_api::query_pairs(raw.as_deref().unwrap_or(""))
            .map_err(|e| (e.status, e.body))?;
        let mut q = PageQuery {
            limit: DEFAULT_LIMIT,
            ..PageQuery::default()
        };
        for (k, v) in pairs {
            match k.as_str() {
                "cursor" => q.cursor = Some(v).filter(|v| !v.is_empty()),
                "search" => q.search = Some(v).filter(|v| !v.is_empty()),
                "client_id" => q.client_id = Some(v),
                "limit" => match v.parse::<usize>() {
                    Ok(n) if (1..=MAX_LIMIT).contains(&n) => q.limit = n,
                    _ => return Err(bad("limit", format!("{v:?}: must be 1 to {MAX_LIMIT}"))),
                },
                other => return Err(bad(other, format!("unknown parameter {other:?}"))),
            }
        }
        Ok(q)
    }
}

fn reply((status, body): AdminReply) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

async fn run(state: &AdminState, command: AdminCommand) -> Response {
    let (tx, rx) = oneshot::channel();
    let unavailable = || {
        reply((
            StatusCode::SERVICE_UNAVAILABLE,
            json!({ "error": "the router did not answer" }),
        ))
    };
    if state
        .router
        .send(ToRouter::Admin { command, reply: tx })
        .await
        .is_err()
    {
        return unavailable();
    }
    match tokio::time::timeout(ROUTER_WAIT, rx).await {
        Ok(Ok(r)) => reply(r),
        _ => unavailable(),
    }
}

async fn clients(State(state): State<AdminState>, RawQuery(raw): RawQuery) -> Response {
    let q = match PageQuery::parse(raw) {
        Ok(q) => q,
        Err(e) => return reply(e),
    };
    let command = AdminCommand::Clients {
        after: q.cursor,
        limit: q.limit,
        search: q.search,
    };
    run(&state, command).await
}

async fn client(State(state): State<AdminState>, Path(id): Path<String>) -> Response {
    run(&state, AdminCommand::Client(id)).await
}

async fn disconnect(State(state): State<AdminState>, Path(id): Path<String>) -> Response {
    run(&state, AdminCommand::Disconnect(id)).await
}

async fn subscriptions(State(state): State<AdminState>, RawQuery(raw): RawQuery) -> Response {
    let q = match PageQuery::parse(raw) {
        Ok(q) => q,
        Err(e) => return reply(e),
    };
    let command = AdminCommand::Subscriptions {
        client_id: q.client_id,
        after: q.cursor,
        limit: q.limit,
    };
    run(&state, command).await
}

async fn topics(State(state): State<AdminState>, RawQuery(raw): RawQuery) -> Response {
    match PageQuery::parse(raw) {
        Ok(q) => {
            let command = AdminCommand::Topics {
                after: q.cursor,
                limit: q.limit,
            };
            run(&state, command).await
        }
        Err(e) => reply(e),
    }
}

async fn retained(State(state): State<AdminState>, RawQuery(raw): RawQuery) -> Response {
    match PageQuery::parse(raw) {
        Ok(q) => {
            let command = AdminCommand::Retained {
                after: q.cursor,
                limit: q.limit,
            };
            run(&state, command).await
        }
        Err(e) => reply(e),
    }
}

async fn retained_message(State(state): State<AdminState>, Path(topic): Path<String>) -> Response {
    run(&state, AdminCommand::RetainedMessage(topic)).await
}

async fn delete_retained(State(state): State<AdminState>, Path(topic): Path<String>) -> Response {
    run(&state, AdminCommand::DeleteRetained(topic)).await
}

/// `GET /api/v1/overview`: counts and totals at a glance, and the active alarms.
async fn overview(State(state): State<AdminState>) -> Response {
    let Some(s) = crate::admin::snapshot(&state).await else {
        return reply((
            StatusCode::SERVICE_UNAVAILABLE,
            json!({ "error": "the router did not answer" }),
        ));
    };
    let alarms: Vec<Value> = state
        .alarms
        .list()
        .into_iter()
        .filter_map(|a| serde_json::to_value(a).ok())
        .filter(|a| a["active"] == json!(true))
        .collect();
    let body = json!({
        "version": env!("CARGO_PKG_VERSION"),
        "connections": s.connections,
        "sessions": s.sessions,
        "subscriptions": s.subscriptions,
        "retained": s.retained,
        "queues": s.queues.len(),
        "queued_messages": s.queues.iter().map(|q| q.depth).sum::<u64>(),
        "dead_letters": s.queues.iter().map(|q| q.dead_letters).sum::<u64>(),
        "messages_received": s.stats.messages_received.iter().sum::<u64>(),
        "messages_sent": s.stats.messages_sent.iter().sum::<u64>(),
        "bytes_received": s.stats.payload_bytes_received.iter().sum::<u64>(),
        "bytes_sent": s.stats.payload_bytes_sent.iter().sum::<u64>(),
        "storage_disk_bytes": s.storage_disk_bytes,
        "alarms": alarms,
    });
    reply((StatusCode::OK, body))
}
