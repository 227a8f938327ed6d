//! REST for work queues under `/api/v1/queues` (shapes in docs/api.md and
//! docs/openapi.yaml). Each handler turns its request into a [`QueueCommand`], sends it to
//! the router, and turns the answer into JSON; the router runs it like a packet (journal,
//! then actions) and answers once its records are stored.
//!
//! Redrive and purge select the ids first, then move them [`CHUNK`] per command, so that a
//! large dead-letter queue never holds the router for long; with `rate_per_s` a task moves
//! them over time and the request answers at once (202).

use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use ferrymq_core::queues::{DeadLetterQuery, DeadLetterView, QueueError, QueueView};
use ferrymq_core::workqueue::{Cause, QueueDefError};
use serde_json::{json, Value};
use tokio::sync::oneshot;

use crate::admin::AdminState;
use crate::queue_admin::{spec_from_json, QueueCommand, QueueReply, CHUNK};
use crate::queue_spec::QueueSpec;
use crate::router::ToRouter;

/// How long a request waits for the router (a step, plus an fsync under `always`).
const ROUTER_WAIT: Duration = Duration::from_secs(10);

/// Most `rate_per_s` a rate-limited redrive takes (faster is no rate limit at all).
const MAX_RATE: u64 = 100_000;

pub(crate) fn routes() -> axum::Router<AdminState> {
    axum::Router::new()
        .route("/api/v1/queues", get(list).post(create))
        .route(
            "/api/v1/queues/{name}",
            get(show).patch(patch).delete(delete),
        )
        .route("/api/v1/queues/{name}/dead-letters", get(dead_letters))
        .route("/api/v1/queues/{name}/dead-letters/redrive", post(redrive))
        .route("/api/v1/queues/{name}/dead-letters/purge", post(purge))
        .route(
            "/api/v1/queues/{name}/dead-letters/{id}",
            get(dead_letter).delete(discard),
        )
}

/// A failed request: its status and `{"error", "field"?, "queue"?}`.
#[derive(Debug)]
pub(crate) struct ApiError {
    pub(crate) status: StatusCode,
    pub(crate) body: Value,
}

impl ApiError {
    fn bad_request(field: &str, message: impl Into<String>) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            body: json!({ "error": message.into(), "field": field }),
        }
    }

    fn unavailable(message: &str) -> ApiError {
        ApiError {
            status: StatusCode::SERVICE_UNAVAILABLE,
            body: json!({ "error": message }),
        }
    }
}

impl From<QueueDefError> for ApiError {
    fn from(e: QueueDefError) -> ApiError {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            body: json!({ "error": e.to_string(), "field": e.field, "queue": e.queue }),
        }
    }
}

impl From<QueueError> for ApiError {
    fn from(e: QueueError) -> ApiError {
        let status = match &e {
            QueueError::NoSuchQueue(_) | QueueError::NoSuchDeadLetter { .. } => {
                StatusCode::NOT_FOUND
            }
            QueueError::Invalid(d) => return d.clone().into(),
            QueueError::BadRequest(_) => StatusCode::BAD_REQUEST,
            QueueError::StorageFull => StatusCode::INSUFFICIENT_STORAGE,
        };
        ApiError {
            status,
            body: json!({ "error": e.to_string() }),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        reply(self.status, &self.body)
    }
}

fn reply(status: StatusCode, body: &Value) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

type ApiResult = Result<Response, ApiError>;

/// Runs one command on the router.
async fn ask(state: &AdminState, command: QueueCommand) -> Result<QueueReply, ApiError> {
    let (reply, rx) = oneshot::channel();
    let gone = || ApiError::unavailable("the broker's router is not running");
    state
        .router
        .send(ToRouter::Queue { command, reply })
        .await
        .map_err(|_| gone())?;
    match tokio::time::timeout(ROUTER_WAIT, rx).await {
        Ok(Ok(result)) => Ok(result?),
        Ok(Err(_)) => Err(gone()),
        Err(_) => Err(ApiError {
            status: StatusCode::GATEWAY_TIMEOUT,
            body: json!({ "error": "the broker did not answer in time; the change may still take effect" }),
        }),
    }
}

fn unexpected() -> ApiError {
    ApiError {
        status: StatusCode::INTERNAL_SERVER_ERROR,
        body: json!({ "error": "unexpected answer from the router" }),
    }
}

fn json_body(body: &Bytes) -> Result<Value, ApiError> {
    if body.is_empty() {
        return Ok(json!({}));
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request("", format!("the body is not valid JSON: {e}")))
}

// ------------------------------------------------------------------ queues

/// `GET /api/v1/queues`: `{"queues": [queue, ...]}`.
async fn list(State(state): State<AdminState>) -> ApiResult {
    match ask(&state, QueueCommand::List).await? {
        QueueReply::Queues(views) => {
            let queues: Vec<Value> = views.iter().map(queue_json).collect();
            Ok(reply(StatusCode::OK, &json!({ "queues": queues })))
        }
        _ => Err(unexpected()),
    }
}

/// `POST /api/v1/queues`: 201 with the queue when new, 200 when it existed (its definition
/// is replaced; its messages stay).
async fn create(State(state): State<AdminState>, body: Bytes) -> ApiResult {
    let spec = spec_from_json(json_body(&body)?)?;
    let def = spec.to_def()?;
    match ask(&state, QueueCommand::Declare(def)).await? {
        QueueReply::Declared { created, view } => {
            let status = if created {
                StatusCode::CREATED
            } else {
                StatusCode::OK
            };
            Ok(reply(status, &queue_json(&view)))
        }
        _ => Err(unexpected()),
    }
}

async fn show(State(state): State<AdminState>, Path(name): Path<String>) -> ApiResult {
    match ask(&state, QueueCommand::Get(name)).await? {
        QueueReply::Queue(view) => Ok(reply(StatusCode::OK, &queue_json(&view))),
        _ => Err(unexpected()),
    }
}

/// `PATCH /api/v1/queues/{name}`: a JSON merge patch (RFC 7396) over the definition.
async fn patch(
    State(state): State<AdminState>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult {
    let patch = json_body(&body)?;
    match ask(&state, QueueCommand::Patch { name, patch }).await? {
        QueueReply::Queue(view) => Ok(reply(StatusCode::OK, &queue_json(&view))),
        _ => Err(unexpected()),
    }
}

async fn delete(State(state): State<AdminState>, Path(name): Path<String>) -> ApiResult {
    match ask(&state, QueueCommand::Delete(name.clone())).await? {
        QueueReply::Deleted => Ok(reply(StatusCode::OK, &json!({ "deleted": name }))),
        _ => Err(unexpected()),
    }
}

/// A queue with its definition (as written) and its counters.
fn queue_json(v: &QueueView) -> Value {
    let s = &v.stats;
    let by_cause: serde_json::Map<String, Value> = Cause::ALL
        .iter()
        .map(|c| {
            let n = s.dead_lettered.get(c).copied().unwrap_or(0);
            (c.as_str().to_string(), n.into())
        })
        .collect();
    json!({
        "name": v.def.name,
        "definition": QueueSpec::from_def(&v.def),
        "stats": {
            "depth": v.depth,
            "leased": v.leased,
            "delayed": v.delayed,
            "bytes": v.bytes,
            "dead_letters": v.dead_letters,
            "consumers": v.consumers,
            "oldest_age_ms": v.oldest_age_ms,
            "enqueued": s.enqueued,
            "acked": s.acked,
            "nacked": s.nacked,
            "redelivered": s.redelivered,
            "dropped_overflow": s.dropped_overflow,
            "dropped_expired": s.dropped_expired,
            "refused": s.refused,
            "dead_lettered": by_cause,
        },
    })
}

// ------------------------------------------------------------------ dead letters

/// `GET .../dead-letters?cause=&reason=&topic=&since=&until=&limit=&cursor=`.
async fn dead_letters(
    State(state): State<AdminState>,
    Path(queue): Path<String>,
    RawQuery(raw): RawQuery,
) -> ApiResult {
    let mut query = DeadLetterQuery::default();
    for (k, v) in query_pairs(raw.as_deref().unwrap_or(""))? {
        set_filter(&mut query, &k, v)?;
    }
    match ask(&state, QueueCommand::DeadLetters { queue, query }).await? {
        QueueReply::Page(page) => {
            let items: Vec<Value> = page.items.iter().map(dead_letter_json).collect();
            Ok(reply(
                StatusCode::OK,
                &json!({ "items": items, "next_cursor": page.next_cursor }),
            ))
        }
        _ => Err(unexpected()),
    }
}

async fn dead_letter(
    State(state): State<AdminState>,
    Path((queue, id)): Path<(String, String)>,
) -> ApiResult {
    let id = dead_letter_id(&id)?;
    match ask(&state, QueueCommand::DeadLetter { queue, id }).await? {
        QueueReply::DeadLetter(d) => Ok(reply(StatusCode::OK, &dead_letter_json(&d))),
        _ => Err(unexpected()),
    }
}

/// `DELETE .../dead-letters/{id}`: `{"discarded": 1}`, or 404.
async fn discard(
    State(state): State<AdminState>,
    Path((queue, id)): Path<(String, String)>,
) -> ApiResult {
    let id = dead_letter_id(&id)?;
    let ids = vec![id];
    match ask(
        &state,
        QueueCommand::Discard {
            queue: queue.clone(),
            ids,
        },
    )
    .await?
    {
        QueueReply::Moved(0) => Err(QueueError::NoSuchDeadLetter { queue, id }.into()),
        QueueReply::Moved(n) => Ok(reply(StatusCode::OK, &json!({ "discarded": n }))),
        _ => Err(unexpected()),
    }
}

fn dead_letter_id(s: &str) -> Result<u64, ApiError> {
    s.parse()
        .map_err(|_| ApiError::bad_request("id", format!("{s:?} is not a dead-letter id")))
}

/// `POST .../dead-letters/redrive` with `{"ids": [...]}` and/or the list's filters, an
/// optional `target_topic` and an optional `rate_per_s`. Without a rate: moves them all and
/// answers `{"selected", "moved"}`. With one: answers 202 `{"selected", "rate_per_s",
/// "in_progress": true}` at once and moves `rate_per_s` each second from a task.
async fn redrive(
    State(state): State<AdminState>,
    Path(queue): Path<String>,
    body: Bytes,
) -> ApiResult {
    let r = RedriveRequest::parse(json_body(&body)?)?;
    let ids = select(&state, &queue, r.query).await?;
    let selected = ids.len();
    let Some(rate) = r.rate_per_s else {
        let moved = redrive_chunks(&state, &queue, &ids, r.target_topic).await?;
        return Ok(reply(
            StatusCode::OK,
            &json!({ "selected": selected, "moved": moved }),
        ));
    };
    tokio::spawn(paced_redrive(state, queue, ids, r.target_topic, rate));
    Ok(reply(
        StatusCode::ACCEPTED,
        &json!({ "selected": selected, "rate_per_s": rate, "in_progress": true }),
    ))
}

/// The body of a redrive: the selection, and where and how fast to move it.
struct RedriveRequest {
    query: DeadLetterQuery,
    target_topic: Option<String>,
    rate_per_s: Option<u64>,
}

impl RedriveRequest {
    fn parse(body: Value) -> Result<RedriveRequest, ApiError> {
        let Value::Object(fields) = body else {
            return Err(ApiError::bad_request("", "the body is a JSON object"));
        };
        let mut r = RedriveRequest {
            query: DeadLetterQuery::default(),
            target_topic: None,
            rate_per_s: None,
        };
        for (k, v) in fields {
            match (k.as_str(), v) {
                (_, Value::Null) => {}
                ("target_topic", Value::String(t)) => {
                    if !ferrymq_mqtt::topic::valid_topic_name(&t) || t.starts_with('$') {
                        return Err(ApiError::bad_request(
                            "target_topic",
                            format!("{t:?} is not a topic a client may publish to"),
                        ));
                    }
                    r.target_topic = Some(t);
                }
                ("target_topic", _) => {
                    return Err(ApiError::bad_request("target_topic", "must be a string"))
                }
                ("rate_per_s", v) => match v.as_u64() {
                    Some(n) if (1..=MAX_RATE).contains(&n) => r.rate_per_s = Some(n),
                    _ => {
                        return Err(ApiError::bad_request(
                            "rate_per_s",
                            format!("must be a whole number from 1 to {MAX_RATE}"),
                        ))
                    }
                },
                (k, v) => set_json_filter(&mut r.query, k, v)?,
            }
        }
        Ok(r)
    }
}

/// A rate-limited redrive: `rate` ids each second, the first batch at once. Ends when done,
/// or at the first error (the broker stopping, the queue deleted), which it logs.
async fn paced_redrive(
    state: AdminState,
    queue: String,
    ids: Vec<u64>,
    target_topic: Option<String>,
    rate: u64,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let per_tick = usize::try_from(rate).unwrap_or(usize::MAX);
    let mut moved = 0;
    for batch in ids.chunks(per_tick) {
        tick.tick().await;
        match redrive_chunks(&state, &queue, batch, target_topic.clone()).await {
            Ok(n) => moved += n,
            Err(e) => {
                tracing::warn!(%queue, moved, error = %e.body, "rate-limited redrive stopped");
                return;
            }
        }
    }
    tracing::info!(%queue, selected = ids.len(), moved, "rate-limited redrive done");
}

/// `POST .../dead-letters/purge`, with an optional body of the list's filters (none: every
/// dead letter of the queue): `{"purged": N}`.
async fn purge(
    State(state): State<AdminState>,
    Path(queue): Path<String>,
    body: Bytes,
) -> ApiResult {
    let body = json_body(&body)?;
    let Value::Object(fields) = body else {
        return Err(ApiError::bad_request("", "the body is a JSON object"));
    };
    let mut query = DeadLetterQuery::default();
    for (k, v) in fields {
        set_json_filter(&mut query, &k, v)?;
    }
    let ids = select(&state, &queue, query).await?;
    let mut purged = 0;
    for chunk in ids.chunks(CHUNK) {
        let command = QueueCommand::Discard {
            queue: queue.clone(),
            ids: chunk.to_vec(),
        };
        match ask(&state, command).await? {
            QueueReply::Moved(n) => purged += n,
            _ => return Err(unexpected()),
        }
    }
    Ok(reply(StatusCode::OK, &json!({ "purged": purged })))
}

/// The ids of every dead letter a query takes.
async fn select(
    state: &AdminState,
    queue: &str,
    query: DeadLetterQuery,
) -> Result<Vec<u64>, ApiError> {
    let command = QueueCommand::DeadLetterIds {
        queue: queue.into(),
        query,
    };
    match ask(state, command).await? {
        QueueReply::Ids(ids) => Ok(ids),
        _ => Err(unexpected()),
    }
}

async fn redrive_chunks(
    state: &AdminState,
    queue: &str,
    ids: &[u64],
    target_topic: Option<String>,
) -> Result<usize, ApiError> {
    let mut moved = 0;
    for chunk in ids.chunks(CHUNK) {
        let command = QueueCommand::Redrive {
            queue: queue.into(),
            ids: chunk.to_vec(),
            target_topic: target_topic.clone(),
        };
        match ask(state, command).await? {
            QueueReply::Moved(n) => moved += n,
            _ => return Err(unexpected()),
        }
    }
    Ok(moved)
}

/// One filter of a dead-letter query, from a URL parameter.
fn set_filter(q: &mut DeadLetterQuery, key: &str, value: String) -> Result<(), ApiError> {
    let number = |v: &str| {
        v.parse::<u64>()
            .map_err(|_| ApiError::bad_request(key, format!("{v:?} is not a whole number")))
    };
    match key {
        "cause" => {
            q.cause = Some(Cause::parse(&value).ok_or_else(|| {
                ApiError::bad_request(
                    "cause",
                    format!("{value:?}: use max_attempts, expired, overflow or rejected"),
                )
            })?)
        }
        "reason" => q.reason = Some(value),
        "topic" => {
            if !ferrymq_mqtt::topic::valid_topic_filter(&value) {
                return Err(ApiError::bad_request(
                    "topic",
                    format!("{value:?} is not a valid topic filter"),
                ));
            }
            q.topic = Some(value)
        }
        "since" => q.since = Some(number(&value)?),
        "until" => q.until = Some(number(&value)?),
        "cursor" => q.cursor = Some(number(&value)?),
        "limit" => {
            let n = number(&value)?;
            if n == 0 {
                return Err(ApiError::bad_request("limit", "must be at least 1"));
            }
            q.limit = Some(usize::try_from(n).unwrap_or(usize::MAX))
        }
        "id" => q.ids.get_or_insert_with(Vec::new).push(number(&value)?),
        other => {
            return Err(ApiError::bad_request(
                other,
                "unknown parameter: use cause, reason, topic, since, until, limit, cursor",
            ))
        }
    }
    Ok(())
}

/// One filter of a dead-letter query, from a JSON body (`ids` is a list; the rest as in the
/// URL, numbers as JSON numbers).
fn set_json_filter(q: &mut DeadLetterQuery, key: &str, value: Value) -> Result<(), ApiError> {
    match (key, value) {
        (_, Value::Null) => Ok(()),
        ("ids", Value::Array(ids)) => {
            let ids: Option<Vec<u64>> = ids.iter().map(Value::as_u64).collect();
            let ids = ids.ok_or_else(|| ApiError::bad_request("ids", "must be a list of ids"))?;
            q.ids = Some(ids);
            Ok(())
        }
        ("ids", _) => Err(ApiError::bad_request("ids", "must be a list of ids")),
        (k, Value::String(s)) => set_filter(q, k, s),
        (k, Value::Number(n)) => set_filter(q, k, n.to_string()),
        (k, _) => Err(ApiError::bad_request(k, "must be a string or a number")),
    }
}

/// `a=1&b=x%2By` into decoded pairs (`+` is a space, as in HTML forms).
pub(crate) fn query_pairs(raw: &str) -> Result<Vec<(String, String)>, ApiError> {
    raw.split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            Ok((decode(k)?, decode(v)?))
        })
        .collect()
}

fn decode(s: &str) -> Result<String, ApiError> {
    let spaced = s.replace('+', " ");
    percent_encoding::percent_decode_str(&spaced)
        .decode_utf8()
        .map(|c| c.into_owned())
        .map_err(|_| ApiError::bad_request("", "the query string is not UTF-8"))
}

/// A dead letter: where it came from, why it is here, its message.
fn dead_letter_json(v: &DeadLetterView) -> Value {
    let d = &v.dead;
    let m = &v.message;
    let p = &m.properties;
    let failures: Vec<Value> = d
        .failures
        .iter()
        .map(|f| {
            json!({
                "at_ms": f.at.0,
                "reason_code": f.reason_code,
                "reason": f.reason.as_ref(),
                "consumer": f.consumer.as_ref(),
            })
        })
        .collect();
    let properties = properties_json(p);
    let mut item = json!({
        "id": d.entry.id,
        "queue": v.queue.as_ref(),
        "topic": m.topic.as_ref(),
        "qos": m.qos as u8,
        "properties": properties,
        "cause": d.cause.as_str(),
        "attempts": d.entry.attempts,
        "priority": d.entry.priority,
        "size": d.entry.size,
        "failures": failures,
        "first_enqueued_ms": d.entry.first_enqueued.0,
        "dead_lettered_ms": d.dead_lettered.0,
        "trace_id": v.trace_id,
    });
    if let Some(o) = item.as_object_mut() {
        match std::str::from_utf8(&m.payload) {
            Ok(text) => o.insert("payload".into(), text.into()),
            Err(_) => o.insert("payload_base64".into(), base64(&m.payload).into()),
        };
    }
    item
}

/// A message's own properties: user properties in order, and the others it has.
pub(crate) fn properties_json(p: &ferrymq_mqtt::Properties) -> Value {
    let user_properties: Vec<Value> = p
        .user_properties
        .iter()
        .map(|(k, v)| json!({ "key": k, "value": v }))
        .collect();
    let mut properties = json!({ "user_properties": user_properties });
    let mut put = |k: &str, v: Value| {
        if let Some(o) = properties.as_object_mut() {
            o.insert(k.into(), v);
        }
    };
    if let Some(ct) = &p.content_type {
        put("content_type", ct.as_str().into());
    }
    if let Some(pf) = p.payload_format_indicator {
        put("payload_format_indicator", pf.into());
    }
    if let Some(rt) = &p.response_topic {
        put("response_topic", rt.as_str().into());
    }
    if let Some(cd) = &p.correlation_data {
        put("correlation_data_base64", base64(cd).into());
    }
    if let Some(e) = p.message_expiry_interval {
        put("message_expiry_interval", e.into());
    }
    properties
}

/// Standard base64 with padding (RFC 4648), for binary payloads in JSON.
pub(crate) fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[(n >> (18 - 6 * i)) as usize & 63]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc_4648_test_vectors() {
        let vectors = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ];
        for (plain, encoded) in vectors {
            assert_eq!(base64(plain.as_bytes()), encoded, "{plain:?}");
        }
        assert_eq!(base64(&[0xff, 0xfe, 0x00]), "//4A");
    }

    #[test]
    fn query_strings_are_percent_decoded() {
        let pairs = query_pairs("topic=orders%2F%23&reason=bad+input&limit=2").expect("valid");
        assert_eq!(
            pairs,
            vec![
                ("topic".into(), "orders/#".into()),
                ("reason".into(), "bad input".into()),
                ("limit".into(), "2".into()),
            ]
        );
        let mut q = DeadLetterQuery::default();
        let e = set_filter(&mut q, "cause", "boredom".into()).expect_err("unknown cause");
        assert_eq!(e.body["field"], "cause");
    }
}
