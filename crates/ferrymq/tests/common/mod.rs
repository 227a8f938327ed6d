//! Helpers shared by the tests that run the real `ferrymq` binary (crash, recovery, damage).

#![allow(clippy::unwrap_used, dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferrymq_client::ConnectOptions;

/// A loopback port that was free a moment ago (kept for every restart of one broker).
///
/// It comes from below the kernel's ephemeral range: a port the kernel hands out for `:0` is
/// one it may hand out again as the source port of any client socket, and tests running next
/// to each other open hundreds of those, so the broker's bind lost the port now and then
/// (`broker did not come up`). Ports in this process never repeat, and the start depends on
/// the process id so that test binaries run side by side mostly try different ones. Where
/// the range leaves no room below it (or nothing there can be bound) it falls back to `:0`,
/// and the old race with it.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    let (low, high) = (10_000, ephemeral_low.min(65_536));
    if high <= low + 1_000 {
        return TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
    }
    let span = high - low;
    let start = std::process::id().wrapping_mul(7_919) % span;
    for _ in 0..span {
        let offset = (start + NEXT.fetch_add(1, Ordering::Relaxed)) % span;
        let port = u16::try_from(low + offset).unwrap();
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
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
    serve_with_env(config, mqtt, http, data, &[])
}

/// [`serve`] with extra environment variables for the broker process.
pub fn serve_with_env(
    config: &Path,
    mqtt: u16,
    http: u16,
    data: &Path,
    env: &[(&str, &str)],
) -> Child {
    Command::new(env!("CARGO_BIN_EXE_ferrymq"))
        .envs(env.iter().copied())
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

/// GET `path` from the admin server on `http`; the body.
pub fn http_get(http: u16, path: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", http)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    match response.split_once("\r\n\r\n") {
        Some((_, body)) => body.to_string(),
        None => panic!("no HTTP body in {response:?}"),
    }
}

/// One sample of /metrics, e.g. `ferrymq_alarm_active{name="disk_low"}`.
pub fn metric(http: u16, sample: &str) -> u64 {
    let body = http_get(http, "/metrics");
    body.lines()
        .find_map(|l| l.strip_prefix(sample)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {sample} in:\n{body}"))
}

/// The alarm `name` as `GET /api/v1/alarms` lists it.
pub fn alarm(http: u16, name: &str) -> serde_json::Value {
    let body: serde_json::Value = serde_json::from_str(&http_get(http, "/api/v1/alarms")).unwrap();
    body["alarms"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no alarm {name} in {body}"))
}

/// Resident memory of process `pid`, in bytes (/proc/PID/statm; 4 KiB pages).
pub fn rss(pid: u32) -> u64 {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).unwrap();
    statm
        .split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 4096
}

/// Polls `f` every 20 ms until it returns Some, at most `limit`.
pub fn wait_for<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Forwards the broker's stderr to the test's (cargo shows it for a failing test), so that
/// the broker never blocks on a full pipe.
pub fn forward_stderr(child: &mut Child) {
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
        {
            eprintln!("broker: {line}");
        }
    });
}

/// A child process killed when this is dropped, a failing test's panic included (a broker
/// left running would keep its port and memory).
pub struct KillOnDrop(pub Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
