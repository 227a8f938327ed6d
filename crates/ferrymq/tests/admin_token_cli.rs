//! The admin API token from the command line (issue 12, item 6): `ferrymq queue` / `ferrymq
//! dlq` send `--token`, `--token-file` or `FERRYMQ_ADMIN_TOKEN` as `Authorization: Bearer`
//! to a broker with `[admin] token`, and say clearly what is wrong when it answers 401.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::{Command, Output};
use std::time::Duration;

use common::KillOnDrop;
use common::{forward_stderr, free_port, http_get, scratch_dir, serve, wait_listening};

const TOKEN: &str = "cli-s3cret";

/// `ferrymq ARGS --url http://127.0.0.1:HTTP` with `env`, and no token from the test's own
/// environment.
fn cli(http: u16, args: &[&str], env: &[(&str, &str)]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_ferrymq"))
        .args(args)
        .args(["--url", &format!("http://127.0.0.1:{http}")])
        .env_remove("FERRYMQ_ADMIN_TOKEN")
        .env_remove("FERRYMQ_ADMIN_TOKEN_FILE")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    eprintln!(
        "ferrymq {args:?}: {:?}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

#[test]
fn the_cli_sends_the_token_and_explains_a_401() {
    let dir = scratch_dir("admin-token-cli");
    let config = dir.join("ferrymq.toml");
    std::fs::write(
        &config,
        format!("[storage]\npersistence = false\n[admin]\ntoken = \"{TOKEN}\"\n"),
    )
    .unwrap();
    let (mqtt, http) = (free_port(), free_port());
    let mut child = serve(&config, mqtt, http, &dir.join("data"));
    forward_stderr(&mut child);
    let _broker = KillOnDrop(child);
    wait_listening(mqtt, Duration::from_secs(30));
    assert!(
        http_get(http, "/health").contains("\"ok\""),
        "/health is open"
    );

    let out = cli(http, &["queue", "list"], &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("401") && err.contains("requires a token"),
        "{err}"
    );
    assert!(
        err.contains("--token") && err.contains("FERRYMQ_ADMIN_TOKEN"),
        "{err}"
    );

    let out = cli(http, &["queue", "list", "--token", "wrong"], &[]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("refused the admin API token"), "{err}");

    let create = ["queue", "create", "--name", "jobs", "--filter", "jobs/#"];
    let out = cli(http, &create, &[("FERRYMQ_ADMIN_TOKEN", TOKEN)]);
    assert!(out.status.success());
    let out = cli(http, &["queue", "list", "--json", "--token", TOKEN], &[]);
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("\"jobs\""));
    let file = dir.join("token");
    std::fs::write(&file, format!("{TOKEN}\n")).unwrap();
    let file = file.to_str().unwrap();
    let out = cli(http, &["dlq", "list", "jobs", "--token-file", file], &[]);
    assert!(out.status.success());
    let out = cli(
        http,
        &["dlq", "list", "jobs"],
        &[("FERRYMQ_ADMIN_TOKEN_FILE", file)],
    );
    assert!(out.status.success());
}
