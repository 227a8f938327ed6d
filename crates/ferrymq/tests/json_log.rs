//! With `--log-format json`, the lines about a client carry its client id, and the lines
//! about a message with a W3C `traceparent` user property carry its trace id, which the
//! dead-letter record keeps (issue 14): an ACL denial, a dead letter, a message dropped for a
//! subscriber. A real broker process; its stderr read line by line.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::BufRead;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{free_port, http_get, scratch_dir, serve, wait_listening};
use ferrymq_client::{Client, ConnectOptions};
use ferrymq_mqtt::SubscriptionOptions;
use serde_json::Value;

const TRACEPARENT: &str = "traceparent=00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

/// Every line of the broker's stderr that is a JSON object (each one must be).
fn json_lines(child: &mut Child) -> mpsc::Receiver<Value> {
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { return };
            let value: Value = serde_json::from_str(&line)
                .unwrap_or_else(|e| panic!("not a JSON line ({e}): {line}"));
            if tx.send(value).is_err() {
                return;
            }
        }
    });
    rx
}

/// The first line whose message is `message`, within 20 s.
fn line(rx: &mpsc::Receiver<Value>, message: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(v) if v["fields"]["message"] == message => return v,
            Ok(v) => seen.push(v),
            Err(_) => panic!("no {message:?} line within 20 s; got {seen:#?}"),
        }
    }
}

/// `ferrymq pub` as client `id`, QoS 1, with the traceparent and a 100-byte payload; waits
/// for it to finish (its PUBACKs came back, so the broker has run the publishes).
fn publish(mqtt: u16, id: &str, topic: &str, times: u32) {
    let status = Command::new(env!("CARGO_BIN_EXE_ferrymq"))
        .args([
            "pub",
            "-p",
            &mqtt.to_string(),
            "-i",
            id,
            "-t",
            topic,
            "-m",
            "x",
        ])
        .args(["-q", "1", "--repeat", &times.to_string()])
        .args(["--user-property", TRACEPARENT])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    // A denied QoS 1 publish gets PUBACK 0x87, which the CLI reports as a failure.
    let _ = status;
}

#[test]
fn json_log_lines_carry_the_client_id_and_the_trace_id() {
    let dir = scratch_dir("json-log");
    let config = dir.join("ferrymq.toml");
    std::fs::write(
        &config,
        r#"
[listeners]
ws = []

[[acl.rule]]
permission = "deny"
action = "publish"
topic = "forbidden/#"

[[queue]]
name = "jobs"
filter = "jobs/#"
max_messages = 1
overflow = "dead_letter"
"#,
    )
    .unwrap();
    let (mqtt, http) = (free_port(), free_port());
    let mut child = serve(&config, mqtt, http, &dir.join("data"));
    let rx = json_lines(&mut child);
    wait_listening(mqtt, Duration::from_secs(20));

    publish(mqtt, "tracer-7", "forbidden/x", 1);
    let denied = line(&rx, "publish denied by the ACL");
    assert_eq!(denied["fields"]["client_id"], "tracer-7", "{denied}");
    assert_eq!(denied["fields"]["trace_id"], TRACE_ID, "{denied}");

    // The queue holds one message: the second publish makes the first a dead letter.
    publish(mqtt, "tracer-8", "jobs/1", 2);
    let dead = line(&rx, "message dead-lettered");
    assert_eq!(dead["fields"]["queue"], "jobs", "{dead}");
    assert_eq!(dead["fields"]["cause"], "overflow", "{dead}");
    assert_eq!(dead["fields"]["trace_id"], TRACE_ID, "{dead}");

    let body: Value =
        serde_json::from_str(&http_get(http, "/api/v1/queues/jobs/dead-letters")).unwrap();
    assert_eq!(body["items"][0]["trace_id"], TRACE_ID, "{body}");

    // A subscriber that takes packets of at most 64 bytes: a larger traced message is
    // dropped for it (MQTT-3.1.2-25), and the line says for whom.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let small = rt.block_on(async {
        let mut o = ConnectOptions::new(format!("127.0.0.1:{mqtt}"), "small-sub");
        o.properties.maximum_packet_size = Some(64);
        let (mut c, _) = Client::connect(o).await.unwrap();
        let filter = ("big/#".to_string(), SubscriptionOptions::default());
        c.subscribe(vec![filter], Default::default()).await.unwrap();
        c
    });
    publish(mqtt, "tracer-9", "big/1", 1);
    let dropped = line(&rx, "message dropped");
    assert_eq!(dropped["fields"]["client_id"], "small-sub", "{dropped}");
    assert_eq!(dropped["fields"]["reason"], "packet_too_large", "{dropped}");
    assert_eq!(dropped["fields"]["trace_id"], TRACE_ID, "{dropped}");
    drop(small);

    child.kill().unwrap();
    child.wait().unwrap();
}
