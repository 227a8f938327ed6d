//! Work queues end to end with the real binary: a broker started by `ferrymq serve` with a
//! `[[queue]]` table, an MQTT 5 consumer that nacks with reason strings, the REST API, and
//! the `ferrymq queue` / `ferrymq dlq` commands.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{scratch_dir, KillOnDrop};
use ferrymq_client::{Client, ConnectOptions};
use ferrymq_mqtt::{Packet, Properties, PubResp, Publish, QoS, ReasonCode, SubscriptionOptions};
use serde_json::{json, Value};

const WAIT: Duration = Duration::from_secs(10);

/// A broker from the real binary on ports the kernel picks (port 0), read back from its
/// "ferrymq listening" log line: (process, mqtt address, http address).
fn start_broker(name: &str, config: &str) -> (KillOnDrop, String, String) {
    let dir = scratch_dir(name);
    let config_path = dir.join("ferrymq.toml");
    std::fs::write(&config_path, config).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferrymq"))
        .args(["serve", "--config"])
        .arg(&config_path)
        .args(["--mqtt", "127.0.0.1:0", "--http", "127.0.0.1:0"])
        .arg("--data-dir")
        .arg(dir.join("data"))
        .args(["--log-level", "info", "--log-format", "json"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let child = KillOnDrop(child);
    let (mqtt, http) = loop {
        let line = lines
            .next()
            .expect("the broker logs 'ferrymq listening' before anything else ends")
            .unwrap();
        eprintln!("broker: {line}");
        let Ok(v) = serde_json::from_str::<Value>(&line) else {
            continue;
        };
        if v["fields"]["message"] == "ferrymq listening" {
            let addr = |k: &str| v["fields"][k].as_str().unwrap().to_string();
            break (addr("mqtt"), addr("http"));
        }
    };
    std::thread::spawn(move || {
        for line in lines.map_while(Result::ok) {
            eprintln!("broker: {line}");
        }
    });
    (child, mqtt, http)
}

/// One request to the admin API: status and JSON body.
fn api(http: &str, method: &str, path: &str) -> (u16, Value) {
    let mut s = std::net::TcpStream::connect(http).unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = response.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    (status, serde_json::from_str(body).unwrap_or(Value::Null))
}

/// Runs `ferrymq ARGS --url http://HTTP`.
fn cli(http: &str, args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_ferrymq"))
        .args(args)
        .args(["--url", &format!("http://{http}")])
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE")
        .output()
        .unwrap();
    eprintln!(
        "ferrymq {args:?}: {:?}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

async fn connect(mqtt: &str, id: &str) -> Client {
    Client::connect(ConnectOptions::new(mqtt, id))
        .await
        .unwrap()
        .0
}

/// The next PUBLISH, and when it arrived.
async fn delivery(c: &mut Client) -> (Publish, Instant) {
    tokio::time::timeout(WAIT, async {
        loop {
            if let Packet::Publish(p) = c.recv().await.unwrap() {
                return (p, Instant::now());
            }
        }
    })
    .await
    .expect("a delivery in time")
}

fn user_property<'a>(p: &'a Publish, key: &str) -> &'a str {
    p.properties
        .user_properties
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("no {key} on {p:?}"))
}

/// Polls `GET path` until `f` holds.
fn poll(http: &str, path: &str, what: &str, f: impl Fn(u16, &Value) -> bool) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, body) = api(http, "GET", path);
        if f(status, &body) {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {status} {body}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

const JOBS: &str = r#"
[[queue]]
name = "jobs"
filter = "jobs/#"
max_attempts = 3
backoff = { kind = "exponential", initial_ms = 300, multiplier = 2.0, max_ms = 5000 }
"#;

/// The issue's case: an MQTT 5 consumer nacks a message three times with reason strings and
/// sees the exponential backoff (300 ms, then 600 ms) between deliveries; the message is a
/// dead letter with three failure records; `ferrymq dlq redrive` sends it back, it arrives
/// as attempt 1 and an ack clears it.
#[tokio::test]
async fn nacked_three_times_dead_lettered_redriven_by_the_cli_and_acked() {
    let (_broker, mqtt, http) = start_broker("wq-e2e", JOBS);
    let mut consumer = connect(&mqtt, "worker-7").await;
    let options = SubscriptionOptions {
        qos: QoS::AtLeastOnce,
        ..Default::default()
    };
    let ack = consumer
        .subscribe(vec![("$queue/jobs".into(), options)], Properties::default())
        .await
        .unwrap();
    assert!(!ack.reasons[0].is_error(), "{ack:?}");
    let mut producer = connect(&mqtt, "producer").await;
    let job = Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: "jobs/resize".into(),
        packet_id: None,
        properties: Properties::default(),
        payload: Bytes::from_static(b"image-42.png"),
    };
    assert_eq!(producer.publish(job).await.unwrap(), ReasonCode::Success);

    let reasons = [
        "thumbnailer timeout",
        "disk full on worker",
        "codec crashed",
    ];
    let mut nacked_at = Vec::new();
    let mut gaps = Vec::new();
    let mut first_enqueued = None;
    for (i, reason) in reasons.iter().enumerate() {
        let (d, at) = delivery(&mut consumer).await;
        if let Some(prev) = nacked_at.last() {
            gaps.push(at.duration_since(*prev));
        }
        assert_eq!(d.topic, "jobs/resize");
        assert_eq!(user_property(&d, "x-attempt"), (i + 1).to_string());
        let fe = user_property(&d, "x-first-enqueued-ms").to_string();
        assert_eq!(
            first_enqueued.get_or_insert(fe.clone()),
            &fe,
            "the same on every attempt"
        );
        let mut nack = PubResp::new(
            d.packet_id.unwrap(),
            ReasonCode::ImplementationSpecificError,
        );
        nack.properties.reason_string = Some(reason.to_string());
        consumer.send(&Packet::PubAck(nack)).await.unwrap();
        nacked_at.push(Instant::now());
    }
    // Exponential, 300 ms × 2^(n−1): the gaps grow, each at least its delay (less 5 ms for
    // the engine's millisecond clock) and at most 250 ms late (scheduling on a busy box;
    // 300 + 250 < 600 keeps the two apart).
    eprintln!("gaps between nack and redelivery: {gaps:?}");
    for (gap, delay) in gaps.iter().zip([300u64, 600]) {
        assert!(*gap >= Duration::from_millis(delay - 5), "{gaps:?}");
        assert!(*gap <= Duration::from_millis(delay + 250), "{gaps:?}");
    }
    assert!(gaps[1] > gaps[0], "{gaps:?}");

    // A dead letter with three failures, over REST.
    let page = poll(
        &http,
        "/api/v1/queues/jobs/dead-letters",
        "the dead letter",
        |_, b| b["items"].as_array().is_some_and(|i| i.len() == 1),
    );
    let dead = &page["items"][0];
    assert_eq!(dead["cause"], "max_attempts", "{dead}");
    assert_eq!(dead["attempts"], 3, "{dead}");
    assert_eq!(dead["payload"], "image-42.png");
    assert_eq!(dead["topic"], "jobs/resize");
    assert_eq!(
        dead["first_enqueued_ms"].to_string(),
        first_enqueued.unwrap()
    );
    let failures = dead["failures"].as_array().unwrap();
    let got: Vec<(&str, u64, &str)> = failures
        .iter()
        .map(|f| {
            (
                f["reason"].as_str().unwrap(),
                f["reason_code"].as_u64().unwrap(),
                f["consumer"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        got,
        reasons
            .iter()
            .map(|r| (*r, 0x83, "worker-7"))
            .collect::<Vec<_>>()
    );
    let id = dead["id"].as_u64().unwrap();
    let (_, q) = api(&http, "GET", "/api/v1/queues/jobs");
    assert_eq!(q["stats"]["dead_lettered"]["max_attempts"], 1, "{q}");
    assert_eq!(q["stats"]["nacked"], 3, "{q}");

    // `dlq list --json` shows it; `dlq show` prints its failures.
    let listed = cli(
        &http,
        &["dlq", "list", "jobs", "--json", "--cause", "max_attempts"],
    );
    assert!(listed.status.success());
    let listed: Value = serde_json::from_slice(&listed.stdout).unwrap();
    assert_eq!(listed["items"][0]["id"], id);
    assert_eq!(listed["next_cursor"], Value::Null);
    let shown = cli(&http, &["dlq", "show", "jobs", &id.to_string()]);
    assert!(shown.status.success());
    for reason in reasons {
        assert!(stdout(&shown).contains(reason), "{}", stdout(&shown));
    }

    // `ferrymq dlq redrive jobs --id N`: back as attempt 1; acked.
    let redrive = cli(&http, &["dlq", "redrive", "jobs", "--id", &id.to_string()]);
    assert!(redrive.status.success());
    assert!(
        stdout(&redrive).contains("redrove 1 of 1"),
        "{}",
        stdout(&redrive)
    );
    let (d, _) = delivery(&mut consumer).await;
    assert_eq!(d.payload.as_ref(), b"image-42.png");
    assert_eq!(user_property(&d, "x-attempt"), "1");
    consumer.queue_ack(&d).unwrap();
    consumer.flush().await.unwrap();

    let q = poll(&http, "/api/v1/queues/jobs", "the ack", |_, q| {
        q["stats"]["acked"] == 1
    });
    let s = &q["stats"];
    assert_eq!(
        (s["depth"].clone(), s["leased"].clone()),
        (json!(0), json!(0)),
        "{q}"
    );
    assert_eq!(s["dead_letters"], 0, "{q}");
    let (status, _) = api(
        &http,
        "GET",
        &format!("/api/v1/queues/jobs/dead-letters/{id}"),
    );
    assert_eq!(status, 404, "the dead letter is gone");
}

/// `ferrymq queue create|list|show|delete` against a live broker, with tables and --json,
/// and clear errors for a bad definition, an unknown queue and an unreachable broker.
#[test]
fn the_queue_commands_create_list_show_and_delete() {
    let (_broker, _mqtt, http) = start_broker("wq-cli", "");
    let create = [
        "queue",
        "create",
        "--name",
        "orders",
        "--filter",
        "orders/#",
        "--filter",
        "legacy/orders/+",
        "--max-attempts",
        "4",
        "--backoff",
        "exponential",
        "--initial-ms",
        "100",
        "--multiplier",
        "3",
        "--overflow",
        "dead_letter",
        "--max-messages",
        "1000",
    ];
    let out = cli(&http, &create);
    assert!(out.status.success());
    assert!(
        stdout(&out).starts_with("created queue orders"),
        "{}",
        stdout(&out)
    );
    let out = cli(&http, &create);
    assert!(
        stdout(&out).starts_with("updated queue orders"),
        "{}",
        stdout(&out)
    );

    // From a file, the REST body.
    let file = scratch_dir("wq-cli-def").join("def.json");
    let def = json!({"name": "emails", "filter": "mail/+/out", "backoff": {"kind": "list", "delays_ms": [10, 100]}});
    std::fs::write(&file, def.to_string()).unwrap();
    let out = cli(
        &http,
        &["queue", "create", "--file", file.to_str().unwrap()],
    );
    assert!(out.status.success());

    // An invalid definition: exit 1, the field named.
    let out = cli(
        &http,
        &[
            "queue",
            "create",
            "--name",
            "bad",
            "--filter",
            "a/#",
            "--backoff",
            "fixed",
        ],
    );
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("400") && err.contains("backoff.initial_ms"),
        "{err}"
    );

    let out = cli(&http, &["queue", "list"]);
    let table = stdout(&out);
    let mut lines = table.lines();
    assert!(lines.next().unwrap().starts_with("NAME"), "{table}");
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(rows.len(), 2, "{table}");
    assert_eq!(&rows[0][..3], ["emails", "mail/+/out", "0"], "{table}");
    assert_eq!(
        &rows[1][..2],
        ["orders", "orders/#,legacy/orders/+"],
        "{table}"
    );

    let out = cli(&http, &["queue", "list", "--json"]);
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    let orders = &list["queues"][1]["definition"];
    assert_eq!(orders["max_attempts"], 4);
    assert_eq!(orders["backoff"]["multiplier"], 3.0);
    assert_eq!(orders["overflow"], "dead_letter");
    assert_eq!(
        list["queues"][0]["definition"]["backoff"]["delays_ms"],
        json!([10, 100])
    );

    let out = cli(&http, &["queue", "show", "orders"]);
    let shown = stdout(&out);
    let field = |name: &str| {
        shown
            .lines()
            .find_map(|l| l.strip_prefix(name).filter(|r| r.starts_with(' ')))
            .map(str::trim)
            .unwrap_or_else(|| panic!("no {name} in {shown}"))
            .to_string()
    };
    assert_eq!(field("max_attempts"), "4");
    assert_eq!(field("max_messages"), "1000");
    assert_eq!(field("depth"), "0");

    let out = cli(&http, &["dlq", "list", "orders", "--json"]);
    let page: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(page, json!({"items": [], "next_cursor": null}));
    let out = cli(&http, &["dlq", "purge", "orders", "--cause", "expired"]);
    assert!(
        stdout(&out).contains("purged 0 dead letters of orders"),
        "{}",
        stdout(&out)
    );
    let out = cli(&http, &["dlq", "discard", "orders", "77"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("404") && err.contains("no dead letter 77"),
        "{err}"
    );

    let out = cli(&http, &["queue", "delete", "orders"]);
    assert!(stdout(&out).contains("deleted queue orders"));
    let out = cli(&http, &["queue", "show", "orders"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("404") && err.contains("orders"), "{err}");
    let (_, list) = api(&http, "GET", "/api/v1/queues");
    assert_eq!(list["queues"].as_array().unwrap().len(), 1);

    // Nothing listening: said plainly.
    let out = Command::new(env!("CARGO_BIN_EXE_ferrymq"))
        .args(["queue", "list", "--url", "http://127.0.0.1:1"])
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot reach the broker's admin API"), "{err}");
}
