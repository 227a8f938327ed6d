//! A broker whose open-files limit is lower than `limits.max_connections` answers the
//! connections it has no room for with Server Busy (and says so at start), instead of failing
//! in accept() and leaving those clients waiting for a CONNACK.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{free_port, scratch_dir, wait_listening};
use ferrymq_client::{Client, ClientError, ConnectOptions};
use ferrymq_mqtt::ReasonCode;

/// Hard and soft limit given to the broker, and the descriptors it keeps for itself
/// (`fdlimit::RESERVED` in the server).
const OPEN_FILES: u64 = 100;
const RESERVED: u64 = 64;

#[tokio::test]
async fn connections_beyond_the_open_files_limit_get_server_busy() {
    let (mqtt, http) = (free_port(), free_port());
    let data = scratch_dir("open-files");
    // `ulimit -n` sets both the soft and the hard limit of the shell, which the broker
    // inherits; it cannot raise them back.
    let mut child = Command::new("bash")
        .arg("-c")
        .arg(format!("ulimit -n {OPEN_FILES} && exec \"$0\" \"$@\""))
        .arg(env!("CARGO_BIN_EXE_ferrymq"))
        .args(["serve", "--mqtt", &format!("127.0.0.1:{mqtt}")])
        .args(["--http", &format!("127.0.0.1:{http}")])
        .arg("--data-dir")
        .arg(&data)
        .args(["--log-level", "warn", "--log-format", "json"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ferrymq starts");
    wait_listening(mqtt, Duration::from_secs(20));

    let room = OPEN_FILES - RESERVED;
    let addr = format!("127.0.0.1:{mqtt}");
    let mut held = Vec::new();
    for i in 0..room {
        let (c, _) = Client::connect(ConnectOptions::new(addr.clone(), format!("c{i}")))
            .await
            .unwrap_or_else(|e| panic!("connection {i} of {room} refused: {e:?}"));
        held.push(c);
    }
    // Over the room: refused with a reason, not left hanging (the client's timeout is 10 s).
    for i in 0..3 {
        let refused = Client::connect(ConnectOptions::new(addr.clone(), format!("over{i}"))).await;
        assert!(
            matches!(refused, Err(ClientError::Refused(ReasonCode::ServerBusy))),
            "connection {} past the open-files room: {:?}",
            room + i + 1,
            refused.err()
        );
    }
    // Room is given back when connections close.
    drop(held.pop());
    let mut again = None;
    for _ in 0..100 {
        match Client::connect(ConnectOptions::new(addr.clone(), "again")).await {
            Ok(c) => {
                again = Some(c);
                break;
            }
            Err(ClientError::Refused(ReasonCode::ServerBusy)) => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            Err(e) => panic!("reconnect after a close: {e:?}"),
        }
    }
    assert!(
        again.is_some(),
        "a closed connection's room was not given back"
    );

    child.kill().unwrap();
    child.wait().unwrap();
    let mut log = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut log)
        .unwrap();
    assert!(
        log.contains(&format!("leaves room for {room} connections")),
        "no warning about the open-files limit in: {log}"
    );
    let _ = std::fs::remove_dir_all(&data);
}
