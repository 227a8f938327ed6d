//! A panic in the router (a broken engine invariant) is logged with its message, thread and
//! location, and the process exits non-zero, so that systemd or Docker restarts the broker,
//! instead of staying up with a dead broker.
//!
//! The panic is injected with `FERRYMQ_TEST_PANIC_ROUTER_AFTER_MS`, a hook that exists only in
//! debug builds (`cargo test` builds the binary so); a release build has no such hook, and this
//! test is compiled out of a `cargo test --release`.

#![cfg(debug_assertions)]
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Read;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{free_port, scratch_dir, wait_listening};

#[test]
fn a_router_panic_is_logged_and_the_process_exits_non_zero() {
    let (mqtt, http) = (free_port(), free_port());
    let data = scratch_dir("router-panic");
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferrymq"))
        .args(["serve", "--mqtt", &format!("127.0.0.1:{mqtt}")])
        .args(["--http", &format!("127.0.0.1:{http}")])
        .arg("--data-dir")
        .arg(&data)
        .env("FERRYMQ_TEST_PANIC_ROUTER_AFTER_MS", "500")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("ferrymq starts");
    let mut stderr = child.stderr.take().unwrap();
    let log = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    wait_listening(mqtt, Duration::from_secs(20));

    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            child.kill().unwrap();
            panic!("the broker was still running 20 s after its router panicked");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let log = log.join().unwrap();
    assert!(!status.success(), "exit status {status}; log:\n{log}");
    for expected in [
        "a thread panicked",
        "router panic injected by a test",
        "ferrymq-router",
        "router.rs",
        "the router panicked",
        "shutting down",
    ] {
        assert!(
            log.contains(expected),
            "{expected:?} not in the log:\n{log}"
        );
    }
    let _ = std::fs::remove_dir_all(&data);
}
