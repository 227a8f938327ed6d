//! `ferrymq bench` against a real broker: it counts what it measures, holds idle connections
//! the way idle clients do (pinging within their keep alive), and fails loudly when it cannot
//! measure.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use common::{free_port, scratch_dir, wait_listening};

struct Broker {
    child: Child,
    mqtt: u16,
}

impl Broker {
    fn start() -> Broker {
        Broker::spawn(&["--in-memory"])
    }

    /// Durable (a data directory, the default fsync policy), with the queue that
    /// `ferrymq bench queue --help` documents.
    fn with_bench_queue(name: &str) -> Broker {
        let dir = scratch_dir(name);
        let config = dir.join("ferrymq.toml");
        std::fs::write(
            &config,
            "[[queue]]\nname = \"bench\"\nfilter = \"bench/q/#\"\nmax_attempts = 5\n\
             backoff = { kind = \"none\" }\n",
        )
        .unwrap();
        let data = dir.join("data");
        Broker::spawn(&[
            "--config",
            config.to_str().unwrap(),
            "--data-dir",
            data.to_str().unwrap(),
        ])
    }

    fn spawn(extra: &[&str]) -> Broker {
        let (mqtt, http) = (free_port(), free_port());
        let child = Command::new(env!("CARGO_BIN_EXE_ferrymq"))
            .args(["serve", "--log-level", "warn"])
            .args(extra)
            .args(["--mqtt", &format!("127.0.0.1:{mqtt}")])
            .args(["--http", &format!("127.0.0.1:{http}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("ferrymq starts");
        wait_listening(mqtt, Duration::from_secs(20));
        Broker { child, mqtt }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn bench(port: u16, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_ferrymq"))
        .arg("bench")
        .args(args)
        .args(["--port", &port.to_string(), "--json", "--timeout", "60"])
        .output()
        .expect("bench runs")
}

fn report(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "bench failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn throughput_and_fanout_count_every_message() {
    let broker = Broker::start();
    let r = report(&bench(
        broker.mqtt,
        &["throughput", "-q", "1", "-n", "5000", "--inflight", "64"],
    ));
    assert_eq!(r["expected"], 5000);
    assert_eq!(r["received"], 5000);
    for k in ["lost", "duplicates", "reordered"] {
        assert_eq!(r[k], 0, "{k} in {r}");
    }
    assert!(r["deliveries_per_sec"].as_f64().unwrap() > 0.0);

    let r = report(&bench(broker.mqtt, &["fanout", "-S", "5", "-n", "400"]));
    assert_eq!(r["expected"], 2000, "{r}");
    assert_eq!(r["received"], 2000, "{r}");
    assert_eq!(r["lost"], 0, "{r}");
}

/// Held for three times the 1-second keep alive: without its pings every connection would
/// be closed by the broker after 1.5 s and the bench would report them failed.
#[test]
fn idle_connections_are_held_past_their_keep_alive() {
    let broker = Broker::start();
    let pid = broker.child.id().to_string();
    let r = report(&bench(
        broker.mqtt,
        &[
            "connections",
            "-c",
            "50",
            "--keep-alive",
            "1",
            "--hold",
            "3",
            "--broker-pid",
            &pid,
        ],
    ));
    let c = &r["connections"];
    assert_eq!(c["requested"], 50, "{r}");
    assert_eq!(c["held"], 50, "{r}");
    assert_eq!(c["failed"], 0, "{r}");
    assert!(c["broker_rss_after_kb"].as_u64().unwrap() > 0, "{r}");
}

/// Four consumers share the queue: every message is acked once, by one of them, and the
/// shared count sees each exactly once.
#[test]
fn queue_counts_every_message_once_across_consumers() {
    let broker = Broker::with_bench_queue("bench-queue");
    let r = report(&bench(
        broker.mqtt,
        &[
            "queue",
            "-P",
            "2",
            "-C",
            "4",
            "-n",
            "3000",
            "--receive-maximum",
            "32",
        ],
    ));
    assert_eq!(r["scenario"], "queue", "{r}");
    assert_eq!(r["published"], 6000, "{r}");
    assert_eq!(r["received"], 6000, "{r}");
    assert_eq!(r["lost"], 0, "{r}");
    assert_eq!(r["duplicates"], 0, "{r}");
    let q = &r["queue"];
    assert_eq!(q["nacked"], 0, "{r}");
    assert_eq!(q["redelivered"], 0, "{r}");
    assert_eq!(q["max_attempt"], 1, "{r}");
    assert!(r["latency_us"]["p99"].as_u64().unwrap() > 0, "{r}");
}

/// `--nack-once`: every first delivery is nacked (PUBACK 0x80) and comes back as attempt 2,
/// which is acked; nothing is lost or acked twice.
#[test]
fn queue_nack_once_nacks_each_first_delivery_and_acks_the_second() {
    let broker = Broker::with_bench_queue("bench-queue-nack");
    let r = report(&bench(
        broker.mqtt,
        &["queue", "-C", "2", "-n", "2000", "--nack-once"],
    ));
    assert_eq!(r["scenario"], "queue-nack-once", "{r}");
    assert_eq!(r["received"], 2000, "{r}");
    assert_eq!(r["lost"], 0, "{r}");
    assert_eq!(r["duplicates"], 0, "{r}");
    let q = &r["queue"];
    assert_eq!(q["nacked"], 2000, "{r}");
    assert_eq!(q["redelivered"], 2000, "{r}");
    assert_eq!(q["max_attempt"], 2, "{r}");
}

#[test]
fn queue_bench_against_a_broker_without_the_queue_says_what_is_missing() {
    let broker = Broker::start();
    let out = bench(broker.mqtt, &["queue", "-n", "10"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "bench ran without a queue");
    assert!(err.contains("[[queue]]"), "{err}");
}

#[test]
fn a_bench_that_cannot_reach_its_broker_fails() {
    let port = free_port();
    let out = bench(port, &["throughput", "-n", "10"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "bench succeeded against nothing");
    assert!(err.contains("Connection refused"), "{err}");
    let out = bench(port, &["connections", "-c", "5", "--hold", "0"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "bench held connections to nothing");
    assert!(err.contains("5 of 5 connections failed"), "{err}");
}

/// `--burst`: publishers write back to back without waiting for the subscriber; a broker
/// that holds them back instead of dropping delivers every message, 1→1 and 50→1.
#[test]
fn a_qos0_burst_is_delivered_whole() {
    let broker = Broker::start();
    let r = report(&bench(
        broker.mqtt,
        &["throughput", "--burst", "-n", "100000"],
    ));
    assert_eq!(r["scenario"], "throughput-burst", "{r}");
    assert_eq!(r["expected"], 100_000, "{r}");
    assert_eq!(r["lost"], 0, "{r}");
    assert_eq!(r["received"], 100_000, "{r}");

    let r = report(&bench(broker.mqtt, &["fanin", "--burst", "-n", "2000"]));
    assert_eq!(r["expected"], 100_000, "{r}");
    assert_eq!(r["lost"], 0, "{r}");
}
