//! Command-line values are checked by the parser: a mistyped one is an error naming the valid
//! ones, never silently ignored.

#![allow(clippy::unwrap_used)]

use std::process::Command;

#[test]
fn a_mistyped_fsync_value_is_an_error_naming_the_valid_ones() {
    let flag = Command::new(env!("CARGO_BIN_EXE_ferrymq"))
        .args(["serve", "--in-memory", "--fsync", "sometimes"])
        .output()
        .unwrap();
    let env = Command::new(env!("CARGO_BIN_EXE_ferrymq"))
        .args(["serve", "--in-memory"])
        .env("FERRYMQ_FSYNC", "sometimes")
        .output()
        .unwrap();
    for out in [flag, env] {
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        assert!(stderr.contains("'sometimes'"), "{stderr}");
        assert!(
            stderr.contains("[possible values: always, interval, os]"),
            "{stderr}"
        );
    }
}
