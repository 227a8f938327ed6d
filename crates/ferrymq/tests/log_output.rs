//! What the broker writes to its log when it is not a terminal, and under hostile clients.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use common::{free_port, wait_listening};

/// A broker at the default log level (info, text) whose stderr is a pipe; its lines arrive
/// on the receiver.
fn broker(mqtt: u16, http: u16) -> (Child, mpsc::Receiver<String>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferrymq"))
        .args([
            "serve",
            "--in-memory",
            "--mqtt",
            &format!("127.0.0.1:{mqtt}"),
        ])
        .args(["--http", &format!("127.0.0.1:{http}")])
        .env_remove("FERRYMQ_LOG_LEVEL")
        .env_remove("RUST_LOG")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ferrymq starts");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).split(b'\n') {
            let Ok(line) = line else { return };
            if tx
                .send(String::from_utf8_lossy(&line).into_owned())
                .is_err()
            {
                return;
            }
        }
    });
    wait_listening(mqtt, Duration::from_secs(20));
    (child, rx)
}

/// Lines until one contains `needle` (which is included), at most `limit`.
fn lines_until(rx: &mpsc::Receiver<String>, needle: &str, limit: Duration) -> Vec<String> {
    let deadline = Instant::now() + limit;
    let mut lines = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) => {
                let found = line.contains(needle);
                lines.push(line);
                if found {
                    return lines;
                }
            }
            Err(_) => panic!("no line with {needle:?} within {limit:?}; got:\n{lines:#?}"),
        }
    }
}

#[test]
fn logs_to_a_pipe_carry_no_colour_codes() {
    let (mut child, rx) = broker(free_port(), free_port());
    let lines = lines_until(&rx, "ferrymq listening", Duration::from_secs(20));
    child.kill().unwrap();
    child.wait().unwrap();
    for line in &lines {
        assert!(!line.contains('\u{1b}'), "an escape code in {line:?}");
    }
    // The line we waited for carries the connection future's size, a measurement of this
    // build kept in the log rather than asserted.
    assert!(
        lines.iter().any(|l| l.contains("connection_future_bytes=")),
        "{lines:#?}"
    );
}

/// A 3.1.1 CONNECT with this keep alive (seconds).
fn connect_packet(id: &str, keep_alive: u16) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 2];
    body.extend_from_slice(&keep_alive.to_be_bytes());
    body.extend_from_slice(&(id.len() as u16).to_be_bytes());
    body.extend_from_slice(id.as_bytes());
    let mut p = vec![0x10, body.len() as u8];
    p.extend_from_slice(&body);
    p
}

/// Connects; with `connect`, sends a CONNECT and waits for the CONNACK.
fn open(mqtt: u16, connect: Option<(&str, u16)>) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", mqtt)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    if let Some((id, keep_alive)) = connect {
        s.write_all(&connect_packet(id, keep_alive)).unwrap();
        let mut connack = [0u8; 4];
        s.read_exact(&mut connack).unwrap();
        assert_eq!(connack, [0x20, 2, 0, 0], "{id}: CONNACK");
    }
    s
}

/// Waits until the broker closes the connection (EOF or reset), at most the read timeout.
fn until_closed(mut s: TcpStream) {
    let mut buf = [0u8; 64];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
            Err(e) => panic!("the broker did not close the connection: {e}"),
        }
    }
}

fn metric(http: u16, sample: &str) -> u64 {
    let mut s = TcpStream::connect(("127.0.0.1", http)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).unwrap();
    body.lines()
        .find_map(|l| l.strip_prefix(sample)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {sample} in:\n{body}"))
}

/// Hostile clients cannot fill the disk through the log: each connection closed for breaking
/// a rule is counted by reason and logged at debug level only, and the default level gets one
/// summary line per interval.
#[test]
fn hostile_connections_are_counted_and_summarized_not_logged_one_by_one() {
    const BEFORE_CONNECT: u64 = 150;
    const AFTER_CONNECT: u64 = 100;
    let (mqtt, http) = (free_port(), free_port());
    let (mut child, rx) = broker(mqtt, http);
    lines_until(&rx, "ferrymq listening", Duration::from_secs(20));

    // One connection that goes silent past its keep alive (1 s; closed after 1.5 s).
    let silent = open(mqtt, Some(("silent", 1)));
    for _ in 0..BEFORE_CONNECT {
        // A reserved packet type instead of CONNECT.
        let mut s = open(mqtt, None);
        s.write_all(&[0x00, 0x00]).unwrap();
        until_closed(s);
    }
    for i in 0..AFTER_CONNECT {
        let mut s = open(mqtt, Some((&format!("bad-{i}"), 60)));
        s.write_all(&[0x00, 0x00]).unwrap();
        until_closed(s);
    }
    until_closed(silent);

    let malformed = "ferrymq_disconnects_total{reason=\"malformed_packet\"}";
    let keep_alive = "ferrymq_disconnects_total{reason=\"keep_alive_timeout\"}";
    assert_eq!(metric(http, malformed), BEFORE_CONNECT + AFTER_CONNECT);
    assert_eq!(metric(http, keep_alive), 1);

    // The summary comes within its interval (10 s) of the broker's start; the counts may be
    // split over two lines if the burst straddled an interval.
    let mut lines = Vec::new();
    let mut summarized = 0;
    while summarized < BEFORE_CONNECT + AFTER_CONNECT + 1 {
        let more = lines_until(
            &rx,
            "closed connections that broke a rule",
            Duration::from_secs(30),
        );
        let summary = more.last().unwrap();
        summarized += summary
            .split_whitespace()
            .filter_map(|w| w.strip_prefix("closed=")?.parse::<u64>().ok())
            .sum::<u64>();
        lines.extend(more);
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(summarized, BEFORE_CONNECT + AFTER_CONNECT + 1, "{lines:#?}");
    assert!(
        lines.len() <= 3,
        "{} connections wrote {} lines:\n{lines:#?}",
        BEFORE_CONNECT + AFTER_CONNECT + 1,
        lines.len()
    );
    assert!(
        lines.iter().any(|l| l.contains("keep_alive_timeout=1")),
        "{lines:#?}"
    );
}
