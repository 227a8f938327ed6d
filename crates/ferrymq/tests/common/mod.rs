//! Helpers shared by the tests that run the real `ferrymq` binary (crash, recovery, damage).

#![allow(clippy::unwrap_used, dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferrymq_client::ConnectOptions;

/// A loopback port that was free a moment ago (kept for every restart of one broker).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Waits until the broker accepts TCP connections on `mqtt`, at most `limit`.
pub fn wait_listening(mqtt: u16, limit: Duration) {
    let deadline = Instant::now() + limit;
    while std::net::TcpStream::connect(("127.0.0.1", mqtt)).is_err() {
        assert!(Instant::now() < deadline, "broker did not come up");
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// A 5.0 connection with a one-hour session (a durable session), clean or resumed.
pub fn options(addr: &str, id: &str, clean: bool, timeout: Duration) -> ConnectOptions {
    let mut o = ConnectOptions::new(addr, id);
    o.clean_start = clean;
    o.properties.session_expiry_interval = Some(3600);
    o.timeout = timeout;
    o
}

/// A fresh, empty directory under cargo's scratch space, named for this test process.
pub fn scratch_dir(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `ferrymq serve` with a config file, loopback listeners and a data directory, logging JSON
/// at info to a piped stderr (the caller reads it, or the broker blocks on a full pipe).
pub fn serve(config: &Path, mqtt: u16, http: u16, data: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_ferrymq"))
        .args(["serve", "--config"])
        .arg(config)
        .args(["--mqtt", &format!("127.0.0.1:{mqtt}")])
        .args(["--http", &format!("127.0.0.1:{http}")])
        .arg("--data-dir")
        .arg(data)
        .args(["--log-level", "info", "--log-format", "json"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ferrymq starts")
}
