//! Damage in the middle of the log is not a torn tail. A real `ferrymq serve` holds 400 QoS 1
//! messages for an offline durable session and is stopped cleanly; one byte a third of the way
//! into the newest segment is flipped. The broker then refuses to start, naming the file and
//! the byte, and changes nothing; `ferrymq recover --data-dir` moves the log aside and keeps
//! every valid batch; restarted, the broker delivers every message except those of the damaged
//! batch, exactly the ones the recover report's skipped bytes held.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{free_port, options, scratch_dir, serve, wait_listening};
use ferrymq_client::Client;
use ferrymq_mqtt::{Packet, Properties, Publish, QoS, ReasonCode, SubscriptionOptions};

const MESSAGES: u64 = 400;
const TOPIC: &str = "damage/q";
const LIMIT: Duration = Duration::from_secs(60);

/// Reads the broker's log until "recovered durable state" and returns its fields; the rest
/// of the log is drained in the background so the broker never blocks on a full pipe.
fn recovered(child: &mut Child) -> serde_json::Value {
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    for line in lines.by_ref() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(&line.unwrap()) else {
            continue;
        };
        if v["fields"]["message"] == "recovered durable state" {
            std::thread::spawn(move || lines.for_each(drop));
            return v["fields"].clone();
        }
    }
    panic!("the broker exited without logging its recovery");
}

/// Waits (bounded) for the process to exit.
fn exit_status(child: &mut Child) -> ExitStatus {
    let deadline = Instant::now() + LIMIT;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("the broker did not exit");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn payload(i: u64) -> String {
    format!("<message {i:04}>")
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    files.sort();
    files
}

/// The number after `key` in `text`.
fn number_after(text: &str, key: &str) -> u64 {
    let at = text
        .find(key)
        .unwrap_or_else(|| panic!("{key:?} in {text}"))
        + key.len();
    text[at..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect::<String>()
        .parse()
        .unwrap()
}

async fn publish(addr: &str, id: &str, body: String) {
    let (mut c, _) = Client::connect(options(addr, id, true, LIMIT))
        .await
        .unwrap();
    let reason = c
        .publish(Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: TOPIC.into(),
            packet_id: None,
            properties: Properties::default(),
            payload: Bytes::from(body),
        })
        .await
        .unwrap();
    assert_eq!(reason, ReasonCode::Success);
    c.disconnect().await.unwrap();
}

#[test]
fn damage_in_the_middle_of_the_log_stops_the_broker_and_recover_loses_only_the_damaged_batch() {
    let root = scratch_dir("damaged-log");
    let config = root.join("ferrymq.toml");
    std::fs::write(
        &config,
        "[mqtt]\nmax_queued_messages = 1000\n[sys]\ninterval_secs = 0\n",
    )
    .unwrap();
    let data = root.join("data");
    let (mqtt, http) = (free_port(), free_port());
    let addr = format!("127.0.0.1:{mqtt}");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();

    // 400 QoS 1 messages queued for an offline durable session, then a clean stop.
    let mut broker = serve(&config, mqtt, http, &data);
    recovered(&mut broker);
    wait_listening(mqtt, LIMIT);
    rt.block_on(async {
        let (mut sub, _) = Client::connect(options(&addr, "damage-sub", true, LIMIT))
            .await
            .unwrap();
        let o = SubscriptionOptions {
            qos: QoS::AtLeastOnce,
            ..Default::default()
        };
        sub.subscribe(vec![(TOPIC.into(), o)], Properties::default())
            .await
            .unwrap();
        sub.disconnect().await.unwrap();
        let (mut publisher, _) = Client::connect(options(&addr, "damage-pub", true, LIMIT))
            .await
            .unwrap();
        for i in 0..MESSAGES {
            let reason = publisher
                .publish(Publish {
                    dup: false,
                    qos: QoS::AtLeastOnce,
                    retain: false,
                    topic: TOPIC.into(),
                    packet_id: None,
                    properties: Properties::default(),
                    payload: Bytes::from(payload(i)),
                })
                .await
                .unwrap();
            assert_eq!(reason, ReasonCode::Success);
        }
        publisher.disconnect().await.unwrap();
    });
    // Never under a running broker.
    let busy = Command::new(env!("CARGO_BIN_EXE_ferrymq"))
        .args(["recover", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    assert!(!busy.status.success());
    assert!(String::from_utf8_lossy(&busy.stderr).contains("in use"));
    assert!(!data.read_dir().unwrap().any(|e| e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .starts_with("log.")));
    let term = Command::new("kill")
        .args(["-TERM", &broker.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    assert!(exit_status(&mut broker).success(), "clean stop");

    // One byte flipped a third of the way into the newest segment.
    let log_dir = data.join("log");
    let newest = segments(&log_dir).pop().unwrap();
    let original = std::fs::read(&newest).unwrap();
    let flipped_at = original.len() / 3;
    let mut damaged = original.clone();
    damaged[flipped_at] ^= 0xFF;
    std::fs::write(&newest, &damaged).unwrap();

    // The broker refuses to start, naming the file and the batch's byte, and cuts nothing.
    let mut refused = serve(&config, mqtt, http, &data);
    let mut pipe = refused.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut text = String::new();
        pipe.read_to_string(&mut text).unwrap();
        text
    });
    let status = exit_status(&mut refused);
    let stderr = reader.join().unwrap();
    println!("{stderr}");
    assert!(!status.success(), "{stderr}");
    let name = newest.file_name().unwrap().to_string_lossy().into_owned();
    assert!(stderr.contains(&name), "{stderr}");
    assert!(
        stderr.contains(&format!("ferrymq recover --data-dir {}", data.display())),
        "{stderr}"
    );
    let batch_at = number_after(&stderr, "at byte ");
    let next_valid = number_after(&stderr, "follows at byte ");
    assert!(
        batch_at as usize <= flipped_at && flipped_at < next_valid as usize,
        "the named batch [{batch_at}, {next_valid}) holds the flipped byte {flipped_at}"
    );
    assert_eq!(std::fs::read(&newest).unwrap(), damaged, "nothing was cut");

    // Recover: the original moves aside, the report names what was skipped.
    let out = Command::new(env!("CARGO_BIN_EXE_ferrymq"))
        .args(["recover", "--data-dir"])
        .arg(&data)
        .output()
        .unwrap();
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    println!("{report}");
    assert!(
        out.status.success(),
        "{report}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let skipped: Vec<&str> = report
        .lines()
        .filter(|l| l.starts_with("skipped "))
        .collect();
    assert_eq!(skipped.len(), 1, "{report}");
    let moved = data
        .read_dir()
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.to_string_lossy().contains("log.damaged-"))
        .expect("the original log was moved aside");
    assert_eq!(
        std::fs::read(moved.join(&name)).unwrap(),
        damaged,
        "the original is kept as it was"
    );
    assert!(skipped[0].contains(&moved.join(&name).display().to_string()));
    let position = number_after(skipped[0], " at byte ") as usize;
    let bytes = number_after(skipped[0], ": ") as usize;
    assert_eq!(position as u64, batch_at);
    assert_eq!(position + bytes, next_valid as usize);
    // The messages lost are those whose payload lay in the skipped bytes.
    let region = String::from_utf8_lossy(&original[position..position + bytes]).into_owned();
    let lost: BTreeSet<u64> = (0..MESSAGES)
        .filter(|&i| region.contains(&payload(i)))
        .collect();
    assert!(
        !lost.is_empty() && lost.len() <= 8,
        "one batch lost, far fewer than the 276 a cut lost: {lost:?}"
    );

    // Restarted, the broker delivers every other message, once, in order.
    let mut broker = serve(&config, mqtt, http, &data);
    let rec = recovered(&mut broker);
    assert_eq!(rec["truncated_bytes"], 0);
    assert_eq!(rec["queued"], MESSAGES - lost.len() as u64, "{rec}");
    wait_listening(mqtt, LIMIT);
    let received = rt.block_on(async {
        let (mut sub, ack) = Client::connect(options(&addr, "damage-sub", false, LIMIT))
            .await
            .unwrap();
        assert!(ack.session_present);
        // Queued after everything recovered: when it arrives, nothing else is coming.
        publish(&addr, "damage-end", "end".into()).await;
        let mut received = Vec::new();
        loop {
            let packet = tokio::time::timeout(LIMIT, sub.recv())
                .await
                .expect("the subscriber gets its messages")
                .unwrap();
            if let Packet::Publish(p) = packet {
                sub.queue_ack(&p).unwrap();
                sub.flush().await.unwrap();
                if p.payload.as_ref() == b"end" {
                    break;
                }
                received.push(String::from_utf8(p.payload.to_vec()).unwrap());
            }
        }
        received
    });
    let expect: Vec<String> = (0..MESSAGES)
        .filter(|i| !lost.contains(i))
        .map(payload)
        .collect();
    assert_eq!(received, expect);
    println!(
        "damaged log: flipped byte {flipped_at} of {}; lost {} of {MESSAGES} messages ({lost:?})",
        original.len(),
        lost.len()
    );
    broker.kill().unwrap();
    broker.wait().unwrap();
    let _ = std::fs::remove_dir_all(&root);
}
