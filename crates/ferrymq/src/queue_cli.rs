//! `ferrymq queue list|create|show|delete` and `ferrymq dlq list|show|redrive|discard|purge`:
//! the admin REST API (docs/api.md) from the command line, as tables or, with `--json`, the
//! API's own JSON.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use hyper::Method;
use serde_json::{json, Map, Value};

use crate::admin_client::{escape, Api};

/// The admin API's default address: the broker's default `listeners.http`.
fn default_url() -> String {
    let http = ferrymq_server::Config::default().listeners.http.first();
    format!(
        "http://{}",
        http.unwrap_or_else(|| std::net::SocketAddr::from(([127, 0, 0, 1], 8080)))
    )
}

#[derive(clap::Args)]
pub struct ApiArgs {
    /// The broker's admin HTTP API (its `listeners.http`).
    #[arg(long, global = true, env = "FERRYMQ_URL", default_value_t = default_url())]
    url: String,
    /// Print the API's JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
    /// The admin API token (the broker's `[admin] token`), sent as `Authorization: Bearer`.
    /// Prefer the environment variable or --token-file: arguments show in `ps`.
    #[arg(
        long,
        global = true,
        env = "FERRYMQ_ADMIN_TOKEN",
        hide_env_values = true
    )]
    token: Option<String>,
    /// A file holding the admin API token (surrounding whitespace ignored).
    #[arg(
        long,
        global = true,
        env = "FERRYMQ_ADMIN_TOKEN_FILE",
        conflicts_with = "token"
    )]
    token_file: Option<PathBuf>,
}

impl ApiArgs {
    /// The admin API client these arguments describe.
    fn api(&self) -> anyhow::Result<Api> {
        let token = match (&self.token, &self.token_file) {
            (Some(t), _) => Some(t.trim().to_string()),
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path)
                    .with_context(|| format!("--token-file {}", path.display()))?;
                Some(text.trim().to_string())
            }
            (None, None) => None,
        };
        Api::new(&self.url, token.filter(|t| !t.is_empty()))
    }
}

#[derive(clap::Args)]
pub struct QueueArgs {
    #[command(flatten)]
    api: ApiArgs,
    #[command(subcommand)]
    command: QueueCommand,
}

#[derive(clap::Subcommand)]
enum QueueCommand {
    /// Every queue with its counters.
    List,
    /// One queue: its definition and counters.
    Show { name: String },
    /// Create a queue, or replace the definition of an existing one (its messages stay).
    Create(Box<CreateArgs>),
    /// Delete a queue with its messages and dead letters.
    Delete { name: String },
}

/// A queue definition from flags, or from a JSON file (the body of `POST /api/v1/queues`).
/// Flags left out take the broker's defaults (docs/queues.md).
#[derive(clap::Args)]
struct CreateArgs {
    /// The definition as a JSON file (the same fields as the flags, snake_case).
    #[arg(long, conflicts_with_all = ["name", "filter"])]
    file: Option<PathBuf>,
    #[arg(long, required_unless_present = "file")]
    name: Option<String>,
    /// A topic filter whose messages the queue stores (repeatable).
    #[arg(long, required_unless_present = "file")]
    filter: Vec<String>,
    #[arg(long)]
    max_attempts: Option<u32>,
    /// Delay before each retry.
    #[arg(long, value_parser = ["none", "fixed", "linear", "exponential", "exponential_jitter", "list"])]
    backoff: Option<String>,
    /// The first delay (fixed: every delay).
    #[arg(long)]
    initial_ms: Option<u64>,
    #[arg(long)]
    max_ms: Option<u64>,
    #[arg(long)]
    multiplier: Option<f64>,
    /// For `--backoff list`: the delays, comma-separated.
    #[arg(long, value_delimiter = ',')]
    delays_ms: Vec<u64>,
    #[arg(long)]
    ack_timeout_ms: Option<u64>,
    #[arg(long)]
    max_messages: Option<u64>,
    #[arg(long)]
    max_bytes: Option<u64>,
    /// What a full queue does with a new message.
    #[arg(long, value_parser = ["drop_oldest", "reject_new", "dead_letter"])]
    overflow: Option<String>,
    /// Expired messages become dead letters instead of being dropped.
    #[arg(long)]
    dead_letter_on_expiry: bool,
    /// 0-9, higher first.
    #[arg(long)]
    default_priority: Option<u8>,
    #[arg(long)]
    dlq_retention_s: Option<u64>,
}

#[derive(clap::Args)]
pub struct DlqArgs {
    #[command(flatten)]
    api: ApiArgs,
    #[command(subcommand)]
    command: DlqCommand,
}

#[derive(clap::Subcommand)]
enum DlqCommand {
    /// A queue's dead letters, oldest first, a page at a time.
    List {
        queue: String,
        #[command(flatten)]
        filters: Filters,
        /// Most dead letters in the page (the broker's default: 100, at most 1000).
        #[arg(long)]
        limit: Option<u64>,
        /// Start after this id (the previous page's next cursor).
        #[arg(long)]
        cursor: Option<u64>,
    },
    /// One dead letter with its message and every failure.
    Show { queue: String, id: u64 },
    /// Send dead letters back into their queue (attempts start again at 0), or publish them
    /// to another topic. Without --id or filters: every dead letter of the queue.
    Redrive {
        queue: String,
        /// A dead letter to redrive (repeatable).
        #[arg(long = "id")]
        ids: Vec<u64>,
        #[command(flatten)]
        filters: Filters,
        /// Publish to this topic instead of the queue.
        #[arg(long)]
        target_topic: Option<String>,
        /// Move this many per second, in the background (the command returns at once).
        #[arg(long)]
        rate: Option<u64>,
    },
    /// Remove dead letters for good, by id.
    Discard {
        queue: String,
        #[arg(required = true)]
        ids: Vec<u64>,
    },
    /// Remove every dead letter of a queue (or those the filters take) for good.
    Purge {
        queue: String,
        #[command(flatten)]
        filters: Filters,
    },
}

#[derive(clap::Args)]
struct Filters {
    /// max_attempts, expired, overflow or rejected.
    #[arg(long, value_parser = ["max_attempts", "expired", "overflow", "rejected"])]
    cause: Option<String>,
    /// A substring of the last failure's reason.
    #[arg(long)]
    reason: Option<String>,
    /// A topic filter the original topic matches.
    #[arg(long)]
    topic: Option<String>,
    /// Dead-lettered at or after (ms since the Unix epoch).
    #[arg(long)]
    since: Option<u64>,
    /// Dead-lettered before (ms since the Unix epoch).
    #[arg(long)]
    until: Option<u64>,
}

impl Filters {
    fn pairs(&self) -> Vec<(&'static str, String)> {
        let mut p = Vec::new();
        if let Some(c) = &self.cause {
            p.push(("cause", c.clone()));
        }
        if let Some(r) = &self.reason {
            p.push(("reason", r.clone()));
        }
        if let Some(t) = &self.topic {
            p.push(("topic", t.clone()));
        }
        if let Some(s) = self.since {
            p.push(("since", s.to_string()));
        }
        if let Some(u) = self.until {
            p.push(("until", u.to_string()));
        }
        p
    }

    fn json(&self) -> Map<String, Value> {
        self.pairs()
            .into_iter()
            .map(|(k, v)| {
                let v = match k {
                    "since" | "until" => v.parse::<u64>().map_or(Value::Null, Value::from),
                    _ => Value::String(v),
                };
                (k.to_string(), v)
            })
            .collect()
    }
}

fn queue_path(name: &str) -> String {
    format!("/api/v1/queues/{}", escape(name))
}

/// Writes to stdout; a closed pipe (`| head`) ends quietly.
fn print(text: &str) {
    let _ = std::io::stdout().write_all(text.as_bytes());
}

fn print_json(v: &Value) {
    print(&format!(
        "{}\n",
        serde_json::to_string_pretty(v).unwrap_or_default()
    ));
}

pub async fn queue(args: QueueArgs) -> anyhow::Result<()> {
    let api = args.api.api()?;
    let (body, text_out) = match args.command {
        QueueCommand::List => {
            let a = api.call(Method::GET, "/api/v1/queues", None).await?;
            let rows = array(&a.body["queues"]).iter().map(queue_row).collect();
            let headers = [
                "NAME",
                "FILTER",
                "DEPTH",
                "LEASED",
                "DELAYED",
                "DEAD",
                "CONSUMERS",
                "ACKED",
                "NACKED",
                "OLDEST_MS",
            ];
            let t = table(&headers, rows);
            (a.body, t)
        }
        QueueCommand::Show { name } => {
            let a = api.call(Method::GET, &queue_path(&name), None).await?;
            let t = show_queue(&a.body);
            (a.body, t)
        }
        QueueCommand::Create(c) => {
            let body = definition(&c)?;
            let a = api
                .call(Method::POST, "/api/v1/queues", Some(&body))
                .await?;
            let verb = if a.status == 201 {
                "created"
            } else {
                "updated"
            };
            let t = format!(
                "{verb} queue {}\n\n{}",
                text(&a.body["name"]),
                show_queue(&a.body)
            );
            (a.body, t)
        }
        QueueCommand::Delete { name } => {
            let a = api.call(Method::DELETE, &queue_path(&name), None).await?;
            (a.body, format!("deleted queue {name}\n"))
        }
    };
    output(args.api.json, &body, &text_out);
    Ok(())
}

/// The API's JSON with `--json`, else the table or text.
fn output(json: bool, body: &Value, text_out: &str) {
    if json {
        print_json(body);
    } else {
        print(text_out);
    }
}

/// The JSON body of `POST /api/v1/queues` from `--file` or the flags (only those given).
fn definition(c: &CreateArgs) -> anyhow::Result<Value> {
    if let Some(path) = &c.file {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        return serde_json::from_str(&text)
            .with_context(|| format!("{} is not valid JSON", path.display()));
    }
    let mut d = Map::new();
    d.insert("name".into(), c.name.clone().unwrap_or_default().into());
    d.insert(
        "filter".into(),
        match c.filter.as_slice() {
            [one] => one.clone().into(),
            many => many.to_vec().into(),
        },
    );
    let mut put = |k: &str, v: Option<Value>| {
        if let Some(v) = v {
            d.insert(k.into(), v);
        }
    };
    put("max_attempts", c.max_attempts.map(Value::from));
    put("ack_timeout_ms", c.ack_timeout_ms.map(Value::from));
    put("max_messages", c.max_messages.map(Value::from));
    put("max_bytes", c.max_bytes.map(Value::from));
    put("overflow", c.overflow.clone().map(Value::from));
    put(
        "dead_letter_on_expiry",
        c.dead_letter_on_expiry.then_some(Value::Bool(true)),
    );
    put("default_priority", c.default_priority.map(Value::from));
    put("dlq_retention_s", c.dlq_retention_s.map(Value::from));
    let mut backoff = Map::new();
    if let Some(kind) = &c.backoff {
        backoff.insert("kind".into(), kind.clone().into());
    }
    if let Some(v) = c.initial_ms {
        backoff.insert("initial_ms".into(), v.into());
    }
    if let Some(v) = c.max_ms {
        backoff.insert("max_ms".into(), v.into());
    }
    if let Some(v) = c.multiplier {
        backoff.insert("multiplier".into(), v.into());
    }
    if !c.delays_ms.is_empty() {
        backoff.insert("delays_ms".into(), c.delays_ms.clone().into());
    }
    if !backoff.is_empty() {
        anyhow::ensure!(
            backoff.contains_key("kind"),
            "--initial-ms, --max-ms, --multiplier and --delays-ms need --backoff KIND"
        );
        put("backoff", Some(Value::Object(backoff)));
    }
    Ok(Value::Object(d))
}

fn queue_row(q: &Value) -> Vec<String> {
    let s = &q["stats"];
    vec![
        text(&q["name"]),
        filters(&q["definition"]["filter"]),
        text(&s["depth"]),
        text(&s["leased"]),
        text(&s["delayed"]),
        text(&s["dead_letters"]),
        text(&s["consumers"]),
        text(&s["acked"]),
        text(&s["nacked"]),
        text(&s["oldest_age_ms"]),
    ]
}

/// A queue as `key  value` lines: its definition, then its counters.
fn show_queue(q: &Value) -> String {
    let d = &q["definition"];
    let s = &q["stats"];
    let mut rows = vec![
        pair("name", text(&q["name"])),
        pair("filter", filters(&d["filter"])),
    ];
    if let Some(def) = d.as_object() {
        for (k, v) in def
            .iter()
            .filter(|(k, _)| !matches!(k.as_str(), "name" | "filter"))
        {
            rows.push(pair(k, text(v)));
        }
    }
    if let Some(stats) = s.as_object() {
        for (k, v) in stats {
            rows.push(pair(k, text(v)));
        }
    }
    table(&[], rows)
}

pub async fn dlq(args: DlqArgs) -> anyhow::Result<()> {
    let api = args.api.api()?;
    let (body, text_out) = match args.command {
        DlqCommand::List {
            queue,
            filters,
            limit,
            cursor,
        } => {
            let path = list_path(&queue, &filters, limit, cursor);
            let a = api.call(Method::GET, &path, None).await?;
            let rows = array(&a.body["items"])
                .iter()
                .map(dead_letter_row)
                .collect();
            let headers = [
                "ID",
                "TOPIC",
                "CAUSE",
                "ATTEMPTS",
                "DEAD_LETTERED",
                "LAST_REASON",
            ];
            let mut t = table(&headers, rows);
            if let Some(next) = a.body["next_cursor"].as_u64() {
                t.push_str(&format!("more: --cursor {next}\n"));
            }
            (a.body, t)
        }
        DlqCommand::Show { queue, id } => {
            let path = format!("{}/dead-letters/{id}", queue_path(&queue));
            let a = api.call(Method::GET, &path, None).await?;
            let t = show_dead_letter(&a.body);
            (a.body, t)
        }
        DlqCommand::Redrive {
            queue,
            ids,
            filters,
            target_topic,
            rate,
        } => {
            let body = redrive_body(ids, &filters, target_topic, rate);
            let path = format!("{}/dead-letters/redrive", queue_path(&queue));
            let a = api.call(Method::POST, &path, Some(&body)).await?;
            let b = &a.body;
            let t = if b["in_progress"] == json!(true) {
                format!(
                    "redriving {} dead letters of {queue} at {}/s in the broker\n",
                    text(&b["selected"]),
                    text(&b["rate_per_s"])
                )
            } else {
                format!(
                    "redrove {} of {} selected dead letters of {queue}\n",
                    text(&b["moved"]),
                    text(&b["selected"])
                )
            };
            (a.body, t)
        }
        DlqCommand::Discard { queue, ids } => {
            // One DELETE each: an unknown id stops here with the API's 404.
            for id in &ids {
                let path = format!("{}/dead-letters/{id}", queue_path(&queue));
                api.call(Method::DELETE, &path, None).await?;
            }
            let n = ids.len();
            (
                json!({ "discarded": n }),
                format!("discarded {n} dead letters of {queue}\n"),
            )
        }
        DlqCommand::Purge { queue, filters } => {
            let path = format!("{}/dead-letters/purge", queue_path(&queue));
            let body = Value::Object(filters.json());
            let a = api.call(Method::POST, &path, Some(&body)).await?;
            let t = format!(
                "purged {} dead letters of {queue}\n",
                text(&a.body["purged"])
            );
            (a.body, t)
        }
    };
    output(args.api.json, &body, &text_out);
    Ok(())
}

/// `GET .../dead-letters` with the filters and the page as query parameters.
fn list_path(queue: &str, filters: &Filters, limit: Option<u64>, cursor: Option<u64>) -> String {
    let mut pairs = filters.pairs();
    if let Some(l) = limit {
        pairs.push(("limit", l.to_string()));
    }
    if let Some(c) = cursor {
        pairs.push(("cursor", c.to_string()));
    }
    let query: Vec<String> = pairs
        .iter()
        .map(|(k, v)| format!("{k}={}", escape(v)))
        .collect();
    let path = format!("{}/dead-letters", queue_path(queue));
    if query.is_empty() {
        path
    } else {
        format!("{path}?{}", query.join("&"))
    }
}

/// The body of `POST .../dead-letters/redrive`.
fn redrive_body(
    ids: Vec<u64>,
    filters: &Filters,
    target_topic: Option<String>,
    rate: Option<u64>,
) -> Value {
    let mut body = filters.json();
    if !ids.is_empty() {
        body.insert("ids".into(), ids.into());
    }
    if let Some(t) = target_topic {
        body.insert("target_topic".into(), t.into());
    }
    if let Some(r) = rate {
        body.insert("rate_per_s".into(), r.into());
    }
    Value::Object(body)
}

fn dead_letter_row(d: &Value) -> Vec<String> {
    let last = array(&d["failures"])
        .last()
        .map(|f| text(&f["reason"]))
        .unwrap_or_default();
    vec![
        text(&d["id"]),
        text(&d["topic"]),
        text(&d["cause"]),
        text(&d["attempts"]),
        d["dead_lettered_ms"].as_u64().map(utc).unwrap_or_default(),
        last,
    ]
}

fn show_dead_letter(d: &Value) -> String {
    let time = |v: &Value| v.as_u64().map(utc).unwrap_or_default();
    let mut rows = vec![
        pair("id", text(&d["id"])),
        pair("queue", text(&d["queue"])),
        pair("topic", text(&d["topic"])),
        pair("cause", text(&d["cause"])),
        pair("attempts", text(&d["attempts"])),
        pair("first_enqueued", time(&d["first_enqueued_ms"])),
        pair("dead_lettered", time(&d["dead_lettered_ms"])),
        pair("trace_id", text(&d["trace_id"])),
        pair("properties", text(&d["properties"])),
    ];
    match d.get("payload") {
        Some(p) => rows.push(pair("payload", text(p))),
        None => rows.push(pair("payload_base64", text(&d["payload_base64"]))),
    }
    let mut out = table(&[], rows);
    let failures: Vec<Vec<String>> = array(&d["failures"])
        .iter()
        .map(|f| {
            vec![
                time(&f["at_ms"]),
                format!("0x{:02X}", f["reason_code"].as_u64().unwrap_or(0)),
                text(&f["consumer"]),
                text(&f["reason"]),
            ]
        })
        .collect();
    if !failures.is_empty() {
        out.push_str("\nfailures:\n");
        out.push_str(&table(&["AT", "CODE", "CONSUMER", "REASON"], failures));
    }
    out
}

fn array(v: &Value) -> &[Value] {
    v.as_array().map_or(&[], Vec::as_slice)
}

/// A JSON value for a table cell: strings bare, null empty, the rest as JSON.
fn text(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn filters(v: &Value) -> String {
    match v {
        Value::Array(a) => a.iter().map(text).collect::<Vec<_>>().join(","),
        other => text(other),
    }
}

fn pair(k: &str, v: String) -> Vec<String> {
    vec![k.to_string(), v]
}

/// Left-aligned columns two spaces apart, with a header row when `headers` is not empty.
fn table(headers: &[&str], rows: Vec<Vec<String>>) -> String {
    let columns = headers
        .len()
        .max(rows.iter().map(Vec::len).max().unwrap_or(0));
    let mut widths = vec![0; columns];
    let header: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
    let all = std::iter::once(&header)
        .filter(|h| !h.is_empty())
        .chain(&rows);
    for row in all.clone() {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in all {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}  ", w = widths[i]));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Milliseconds since the Unix epoch as UTC, `2026-11-29T20:03:54.123Z`.
fn utc(ms: u64) -> String {
    ferrymq_server::utc::rfc3339_millis(ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_renders_known_instants() {
        assert_eq!(utc(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(utc(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(utc(1_795_982_634_123), "2026-11-29T20:03:54.123Z");
    }

    #[test]
    fn tables_align_columns() {
        let t = table(
            &["A", "BB"],
            vec![vec!["xxx".into(), "y".into()], vec!["z".into(), "".into()]],
        );
        assert_eq!(t, "A    BB\nxxx  y\nz\n");
    }
}
