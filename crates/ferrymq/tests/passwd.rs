//! `ferrymq passwd` end to end: it creates a password file, a broker reading that file lets
//! the user in with that password (and not with another), and `-D` takes the user out again.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use common::*;
use ferrymq_client::{Client, ClientError, ConnectOptions};
use ferrymq_mqtt::ReasonCode;

fn passwd(args: &[&str], file: &Path, stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferrymq"))
        .arg("passwd")
        .arg(file)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// Starts the broker on `config`, tries to log in as `user`/`password`, stops it.
fn login(config: &Path, data: &Path, user: &str, password: &str) -> Result<(), ClientError> {
    let (mqtt, http) = (free_port(), free_port());
    let mut child = serve(config, mqtt, http, data);
    forward_stderr(&mut child);
    let _broker = KillOnDrop(child);
    wait_listening(mqtt, Duration::from_secs(20));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut o = ConnectOptions::new(format!("127.0.0.1:{mqtt}"), "login");
        o.username = Some(user.into());
        o.password = Some(bytes::Bytes::copy_from_slice(password.as_bytes()));
        Client::connect(o).await.map(|_| ())
    })
}

#[test]
fn passwd_creates_a_user_who_can_log_in_and_deletes_them() {
    let dir = scratch_dir("passwd");
    let file = dir.join("users");
    let out = passwd(&["alice", "--password-stdin"], &file, "s3cret\n");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = passwd(&["bob", "--password-stdin"], &file, "other\n");
    assert!(out.status.success());
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.starts_with("alice:$argon2id$v=19$"), "{text}");
    assert!(text.contains("\nbob:$argon2id$"), "{text}");
    assert!(!text.contains("s3cret"));

    let config = dir.join("ferrymq.toml");
    std::fs::write(
        &config,
        format!(
            "[auth]\nallow_anonymous = false\npassword_file = {:?}\n",
            file.display().to_string()
        ),
    )
    .unwrap();
    let data = dir.join("data");
    login(&config, &data, "alice", "s3cret").unwrap();
    assert!(matches!(
        login(&config, &data, "alice", "wrong"),
        Err(ClientError::Refused(ReasonCode::BadUserNameOrPassword))
    ));

    let out = passwd(&["-D", "alice"], &file, "");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(!text.contains("alice"), "{text}");
    assert!(text.contains("bob:"), "{text}");
    let again = passwd(&["-D", "alice"], &file, "");
    assert!(!again.status.success(), "deleting a missing user fails");
    assert!(matches!(
        login(&config, &data, "alice", "s3cret"),
        Err(ClientError::Refused(ReasonCode::BadUserNameOrPassword))
    ));
}
