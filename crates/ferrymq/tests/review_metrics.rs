//! Review of issue 14's logging: text that clients choose (a client id, a topic) must not
//! forge log lines. With `--log-format text`, a newline in a field written raw starts a line
//! of the client's own making; the fields are quoted and escaped instead. A real broker
//! process at debug level; its stderr read line by line.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead, Write};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use common::{free_port, scratch_dir, wait_listening};
use ferrymq_client::{Client, ConnectOptions};
use ferrymq_mqtt::{Packet, ProtocolVersion, Publish, QoS};

#[test]
fn client_chosen_text_cannot_start_a_line_of_the_text_log() {
    let dir = scratch_dir("review-text-log");
    let config = dir.join("ferrymq.toml");
    std::fs::write(
        &config,
        "[listeners]\nws = []\n\n[[acl.rule]]\npermission = \"deny\"\naction = \"publish\"\n\
         topic = \"forbidden/#\"\n",
    )
    .unwrap();
    let (mqtt, http) = (free_port(), free_port());
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferrymq"))
        .args(["serve", "--config"])
        .arg(&config)
        .args(["--mqtt", &format!("127.0.0.1:{mqtt}")])
        .args(["--http", &format!("127.0.0.1:{http}")])
        .arg("--data-dir")
        .arg(dir.join("data"))
        .args(["--log-level", "debug", "--log-format", "text"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stderr).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    wait_listening(mqtt, Duration::from_secs(20));

    // A publish the ACL denies, on a topic with a line of its own in it.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let o = ConnectOptions::new(format!("127.0.0.1:{mqtt}"), "evil-topic");
        let (mut c, _) = Client::connect(o).await.unwrap();
        let p = Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: "forbidden/x\nFORGED-TOPIC-LINE".into(),
            packet_id: None,
            properties: Default::default(),
            payload: Bytes::from_static(b"x"),
        };
        let _ = c.publish(p).await.unwrap();
    });
    // A client id with a line in it, closed for a bad packet (its line names the client).
    let mut s = std::net::TcpStream::connect(("127.0.0.1", mqtt)).unwrap();
    let mut out = BytesMut::new();
    let connect = ferrymq_mqtt::Connect {
        version: ProtocolVersion::V5,
        client_id: "evil\nFORGED-CLIENT-LINE".into(),
        clean_start: true,
        keep_alive: 30,
        username: None,
        password: None,
        will: None,
        properties: Default::default(),
    };
    ferrymq_mqtt::encode(
        &Packet::Connect(Box::new(connect)),
        ProtocolVersion::V5,
        &mut out,
    )
    .unwrap();
    s.write_all(&out).unwrap();
    let mut connack = [0u8; 64];
    let _ = std::io::Read::read(&mut s, &mut connack).unwrap();
    // Packet type 0 is reserved: a malformed packet.
    s.write_all(&[0x00, 0x00]).unwrap();

    let deadline = Instant::now() + Duration::from_secs(20);
    let (mut denied, mut bad, mut forged) = (false, false, Vec::new());
    while !(denied && bad) {
        let left = deadline.saturating_duration_since(Instant::now());
        let Ok(line) = rx.recv_timeout(left) else {
            panic!("no denial and bad-packet lines within 20 s (denied {denied}, bad {bad})");
        };
        denied |= line.contains("publish denied by the ACL");
        bad |= line.contains("closing connection: bad packet");
        if line.starts_with("FORGED") {
            forged.push(line);
        }
    }
    // A forged line follows the line it was smuggled in (one write of the whole event).
    while let Ok(line) = rx.recv_timeout(Duration::from_millis(300)) {
        if line.starts_with("FORGED") {
            forged.push(line);
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(forged, Vec::<String>::new(), "lines forged by a client");
}
