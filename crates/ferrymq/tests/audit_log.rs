//! The audit log of a real `ferrymq` process: one JSON line for each kind of event (connect,
//! disconnect, authentication failure, ACL denial on publish and on subscribe, an admin call
//! that changes something, a configuration reload, refused and applied), and size rotation.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use ferrymq_client::{Client, ClientError, ConnectOptions};
use ferrymq_mqtt::{Properties, Publish, QoS, ReasonCode, SubscriptionOptions};
use serde_json::Value;

const LIMIT: Duration = Duration::from_secs(20);

fn serve(config: &Path, mqtt: u16, http: u16, data: &Path) -> KillOnDrop {
    let mut child = Command::new(env!("CARGO_BIN_EXE_ferrymq"))
        .args(["serve", "--no-watch-config", "--config"])
        .arg(config)
        .args(["--mqtt", &format!("127.0.0.1:{mqtt}")])
        .args(["--http", &format!("127.0.0.1:{http}")])
        .arg("--data-dir")
        .arg(data)
        .args(["--log-format", "json"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    forward_stderr(&mut child);
    wait_listening(mqtt, LIMIT);
    KillOnDrop(child)
}

/// A broker in `dir` whose audit log is `dir/audit.jsonl`, configured by `rest` after that
/// `file` line (it may go on with the `[audit]` table).
struct Audited {
    audit: std::path::PathBuf,
    mqtt: u16,
    http: u16,
    broker: KillOnDrop,
}

impl Audited {
    fn start(dir: &Path, rest: &str) -> Audited {
        let audit = dir.join("audit.jsonl");
        let config = dir.join("ferrymq.toml");
        let text = format!("[audit]\nfile = {:?}\n{rest}", audit.display().to_string());
        std::fs::write(&config, text).unwrap();
        let (mqtt, http) = (free_port(), free_port());
        let broker = serve(&config, mqtt, http, &dir.join("data"));
        Audited {
            audit,
            mqtt,
            http,
            broker,
        }
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.mqtt)
    }
}

/// A password file in `dir` with the user alice (password "pw").
fn alice(dir: &Path) -> std::path::PathBuf {
    let users = dir.join("users");
    let hash = ferrymq_server::password_file::hash_password(b"pw").unwrap();
    std::fs::write(&users, format!("alice:{hash}\n")).unwrap();
    users
}

fn post(port: u16, path: &str, body: &str) -> u16 {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(LIMIT)).unwrap();
    write!(
        s,
        "POST {path} HTTP/1.0\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    response.split(' ').nth(1).unwrap().parse().unwrap()
}

/// Every line of the audit file (and its rotations), parsed.
fn lines(file: &Path) -> Vec<Value> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// The first line of `event` for which `pick` holds, waiting for it.
fn event(file: &Path, event: &str, pick: impl Fn(&Value) -> bool) -> Value {
    wait_for(&format!("an audit line {event}"), LIMIT, || {
        lines(file)
            .into_iter()
            .find(|l| l["event"] == event && pick(l))
    })
}

async fn login(addr: &str, id: &str, user: &str, password: &str) -> Result<Client, ClientError> {
    let mut o = ConnectOptions::new(addr, id);
    o.timeout = LIMIT;
    o.username = Some(user.into());
    o.password = Some(Bytes::copy_from_slice(password.as_bytes()));
    Client::connect(o).await.map(|(c, _)| c)
}

#[test]
fn every_event_kind_is_one_json_line() {
    let dir = scratch_dir("audit-events");
    let users = alice(&dir);
    let rest = format!(
        "[auth]\nallow_anonymous = false\npassword_file = {:?}\n\
         [[acl.rule]]\npermission = \"deny\"\naction = \"publish\"\ntopic = \"secret/#\"\n\
         [[acl.rule]]\npermission = \"deny\"\naction = \"subscribe\"\ntopic = \"private/#\"\n",
        users.display().to_string()
    );
    let Audited {
        audit,
        mqtt,
        http,
        mut broker,
    } = Audited::start(&dir, &rest);
    let config = dir.join("ferrymq.toml");
    let text = std::fs::read_to_string(&config).unwrap();
    let addr = format!("127.0.0.1:{mqtt}");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (_bystander, assigned) = rt.block_on(async {
        let bystander = login(&addr, "bystander", "alice", "pw").await.unwrap();
        let mut alice = login(&addr, "alice-1", "alice", "pw").await.unwrap();
        assert!(matches!(
            login(&addr, "mallory-1", "mallory", "guess").await,
            Err(ClientError::Refused(ReasonCode::BadUserNameOrPassword))
        ));
        let p = Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: "secret/plans".into(),
            packet_id: None,
            properties: Properties::default(),
            payload: Bytes::from_static(b"x"),
        };
        assert_eq!(alice.publish(p).await.unwrap(), ReasonCode::NotAuthorized);
        let ack = alice
            .subscribe(
                vec![("private/#".into(), SubscriptionOptions::default())],
                Properties::default(),
            )
            .await
            .unwrap();
        assert!(ack.reasons[0].is_error());
        alice.disconnect().await.unwrap();
        // No client id: the connect line names the one the broker assigned.
        let mut o = ConnectOptions::new(&addr, "");
        o.timeout = LIMIT;
        o.username = Some("alice".into());
        o.password = Some(Bytes::from_static(b"pw"));
        let (nameless, ack) = Client::connect(o).await.unwrap();
        let assigned = ack.properties.assigned_client_identifier.clone().unwrap();
        drop(nameless);
        (bystander, assigned)
    });
    assert_eq!(
        post(
            http,
            "/api/v1/queues",
            r#"{"name":"jobs","filter":"jobs/#"}"#
        ),
        201
    );
    assert_eq!(post(http, "/api/v1/reload", ""), 200);
    std::fs::write(&config, format!("{text}[limits]\nrate_burst_ms = 0\n")).unwrap();
    assert_eq!(post(http, "/api/v1/reload", ""), 422);

    let nameless = event(&audit, "connect", |l| l["client_id"] == assigned.as_str());
    assert_eq!(nameless["assigned"], true, "{nameless}");
    let connect = event(&audit, "connect", |l| l["client_id"] == "alice-1");
    assert!(connect.get("assigned").is_none(), "{connect}");
    assert_eq!(connect["user"], "alice");
    assert_eq!(connect["listener"], "mqtt");
    assert_eq!(connect["protocol"], "5.0");
    assert!(connect["address"]
        .as_str()
        .unwrap()
        .starts_with("127.0.0.1:"));
    assert!(connect["ts"].as_str().unwrap().ends_with('Z'), "{connect}");
    let failure = event(&audit, "auth_failure", |_| true);
    assert_eq!(failure["user"], "mallory");
    assert_eq!(failure["client_id"], "mallory-1");
    assert_eq!(failure["reason"], "bad_credentials");
    let denied = event(&audit, "acl_denied", |l| l["action"] == "publish");
    assert_eq!(
        (&denied["client_id"], &denied["user"], &denied["topic"]),
        (&"alice-1".into(), &"alice".into(), &"secret/plans".into())
    );
    let denied = event(&audit, "acl_denied", |l| l["action"] == "subscribe");
    assert_eq!(denied["topic"], "private/#");
    let gone = event(&audit, "disconnect", |l| l["client_id"] == "alice-1");
    assert_eq!(gone["conn"], connect["conn"]);
    assert_eq!(
        (&gone["by"], &gone["reason_code"]),
        (&"client".into(), &0.into())
    );
    let admin = event(&audit, "admin", |l| l["path"] == "/api/v1/queues");
    assert_eq!(admin["method"], "POST");
    assert_eq!(admin["status"], 201);
    assert_eq!(admin["change"]["name"], "jobs");
    event(&audit, "admin", |l| l["path"] == "/api/v1/reload");
    let ok = event(&audit, "config_reload", |l| l["result"] == "ok");
    assert_eq!(ok["trigger"], "api");
    let refused = event(&audit, "config_reload", |l| l["result"] == "error");
    assert!(
        refused["error"]
            .as_str()
            .unwrap()
            .contains("limits.rate_burst_ms"),
        "{refused}"
    );
    assert_eq!(metric(http, "ferrymq_audit_dropped_total"), 0);

    // A shutdown's disconnects are written before the process ends.
    let pid = broker.0.id().to_string();
    assert!(Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap()
        .success());
    assert!(broker.0.wait().unwrap().success());
    let stopped = lines(&audit)
        .into_iter()
        .find(|l| l["event"] == "disconnect" && l["client_id"] == "bystander")
        .expect("the bystander's disconnect is in the file");
    assert_eq!(
        (&stopped["by"], &stopped["reason"]),
        (&"broker".into(), &"ServerShuttingDown".into())
    );
}

#[test]
fn the_audit_file_rotates_at_max_bytes_and_keeps_keep_files() {
    let dir = scratch_dir("audit-rotation");
    let b = Audited::start(&dir, "max_bytes = 2048\nkeep = 2\n");
    let (audit, http, addr) = (b.audit.clone(), b.http, b.addr());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // ~180 bytes a connect line and ~130 a disconnect: 60 of each is over 5 files' worth.
    rt.block_on(async {
        for i in 0..60 {
            let mut o = ConnectOptions::new(&addr, format!("rotating-client-{i}"));
            o.timeout = LIMIT;
            let (c, _) = Client::connect(o).await.unwrap();
            c.disconnect().await.unwrap();
        }
    });
    event(&audit, "disconnect", |l| {
        l["client_id"] == "rotating-client-59"
    });
    let rotated = |n: u32| dir.join(format!("audit.jsonl.{n}"));
    assert!(rotated(1).exists() && rotated(2).exists());
    assert!(!rotated(3).exists(), "keep = 2");
    for f in [audit.clone(), rotated(1), rotated(2)] {
        let size = std::fs::metadata(&f).unwrap().len();
        assert!(size <= 2048, "{} is {size} bytes", f.display());
        assert!(!lines(&f).is_empty());
    }
    // The newest rotation holds the lines just before the current file's.
    let last_rotated = lines(&rotated(1)).last().cloned().unwrap();
    let first_current = lines(&audit).first().cloned().unwrap();
    assert!(last_rotated["ts"].as_str() <= first_current["ts"].as_str());
    assert_eq!(metric(http, "ferrymq_audit_dropped_total"), 0);
}

/// An operator (or a log shipper) deletes the audit file while the broker runs: the lines go
/// to the deleted file until it is due for rotation, and the rotation then starts a new file
/// instead of failing at every line from then on.
#[test]
fn a_deleted_audit_file_is_started_again_at_the_next_rotation() {
    let dir = scratch_dir("audit-deleted");
    let b = Audited::start(&dir, "max_bytes = 2048\nkeep = 2\n");
    let (audit, addr) = (b.audit.clone(), b.addr());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let connect_and_leave = |id: String| {
        let addr = addr.clone();
        async move {
            let mut o = ConnectOptions::new(&addr, id);
            o.timeout = LIMIT;
            let (c, _) = Client::connect(o).await.unwrap();
            c.disconnect().await.unwrap();
        }
    };
    rt.block_on(connect_and_leave("before-delete".into()));
    event(&audit, "disconnect", |l| l["client_id"] == "before-delete");
    std::fs::remove_file(&audit).unwrap();
    // ~310 bytes a client: 30 of them are well past one rotation.
    rt.block_on(async {
        for i in 0..30 {
            connect_and_leave(format!("after-delete-{i}")).await;
        }
    });
    event(&audit, "disconnect", |l| {
        l["client_id"] == "after-delete-29"
    });
}

/// Every line of the audit file and its rotations, oldest first.
fn all_lines(file: &Path, keep: u32) -> Vec<Value> {
    let mut out = Vec::new();
    for n in (1..=keep).rev() {
        let mut p = file.as_os_str().to_owned();
        p.push(format!(".{n}"));
        out.extend(lines(Path::new(&p)));
    }
    out.extend(lines(file));
    out
}

/// One client publishing where the ACL denies it, as fast as it can, must not write the
/// audit log full and rotate away what came before it (the record of who connected): its
/// denials are recorded up to a bound, and the rest are counted on its disconnect line.
#[test]
fn a_flood_of_acl_denials_does_not_rotate_the_audit_history_away() {
    let dir = scratch_dir("audit-denial-flood");
    let b = Audited::start(
        &dir,
        "max_bytes = 16384\nkeep = 1\n\
         [[acl.rule]]\npermission = \"deny\"\naction = \"publish\"\ntopic = \"secret/#\"\n",
    );
    let (audit, http, addr) = (b.audit.clone(), b.http, b.addr());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    const FLOOD: usize = 3000;
    rt.block_on(async {
        let mut o = ConnectOptions::new(&addr, "victim");
        o.timeout = LIMIT;
        let (_victim, _) = Client::connect(o).await.unwrap();
        event(&audit, "connect", |l| l["client_id"] == "victim");
        let mut o = ConnectOptions::new(&addr, "flooder");
        o.timeout = LIMIT;
        let (mut flooder, _) = Client::connect(o).await.unwrap();
        let denied = |qos| Publish {
            dup: false,
            qos,
            retain: false,
            topic: "secret/x".into(),
            packet_id: None,
            properties: Properties::default(),
            payload: Bytes::from_static(b"x"),
        };
        for _ in 0..FLOOD / 100 {
            for _ in 0..100 {
                flooder
                    .queue(&ferrymq_mqtt::Packet::Publish(denied(QoS::AtMostOnce)))
                    .unwrap();
            }
            flooder.flush().await.unwrap();
        }
        // Answered after every one before it was denied.
        let last = tokio::time::timeout(LIMIT, flooder.publish(denied(QoS::AtLeastOnce)));
        assert_eq!(last.await.unwrap().unwrap(), ReasonCode::NotAuthorized);
        flooder.disconnect().await.unwrap();
    });
    let gone = event(&audit, "disconnect", |l| l["client_id"] == "flooder");
    let all = all_lines(&audit, 1);
    assert!(
        all.iter()
            .any(|l| l["event"] == "connect" && l["client_id"] == "victim"),
        "the victim's connect line was rotated away by the flood"
    );
    let mine: Vec<&Value> = all
        .iter()
        .filter(|l| l["event"] == "acl_denied" && l["client_id"] == "flooder")
        .collect();
    let recorded = mine.iter().filter(|l| l["topic"] == "secret/x").count();
    assert!(recorded > 0 && recorded <= 40, "{recorded} denial lines");
    // Each denial is in the file once: as a line, or counted in a later one.
    let count = |l: &Value, key: &str| l[key].as_u64().unwrap_or(0) as usize;
    let counted: usize = mine
        .iter()
        .map(|l| count(l, "unrecorded_before") + count(l, "unrecorded"))
        .sum();
    let total = recorded + counted + count(&gone, "acl_denied_unrecorded");
    assert_eq!(total, FLOOD + 1, "{gone}");
    assert_eq!(metric(http, "ferrymq_audit_dropped_total"), 0);
}

/// An address that keeps connecting once it is banned (each refusal costs it one CONNECT,
/// and the broker no password check) writes a bounded number of `auth_failure` lines; the
/// rest are counted in the lines that follow.
#[test]
fn a_banned_address_reconnecting_in_a_loop_writes_a_bounded_number_of_lines() {
    let dir = scratch_dir("audit-auth-flood");
    let users = alice(&dir);
    let b = Audited::start(
        &dir,
        &format!(
            "[auth]\nallow_anonymous = false\npassword_file = {:?}\n\
             max_failures = 3\nban_ms = 600000\n",
            users.display().to_string()
        ),
    );
    let (audit, http, addr) = (b.audit.clone(), b.http, b.addr());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    const ATTEMPTS: usize = 300;
    rt.block_on(async {
        for i in 0..ATTEMPTS {
            let refused = login(&addr, &format!("guess-{i}"), "alice", "guess").await;
            assert!(matches!(refused, Err(ClientError::Refused(_))), "{i}");
        }
    });
    // A line after the flood: everything before it is in the file.
    assert_eq!(post(http, "/api/v1/reload", ""), 200);
    event(&audit, "config_reload", |_| true);
    let failures: Vec<Value> = lines(&audit)
        .into_iter()
        .filter(|l| l["event"] == "auth_failure")
        .collect();
    assert!(
        !failures.is_empty() && failures.len() <= 40,
        "{} auth_failure lines",
        failures.len()
    );
    assert!(failures.iter().any(|l| l["reason"] == "bad_credentials"));
}

/// An audit file on a full disk (`/dev/full`: every write fails with ENOSPC) neither stops
/// nor slows the broker: clients connect and publish, and the lines that could not be
/// written are counted.
#[test]
fn an_audit_file_on_a_full_disk_counts_its_lost_lines_and_the_broker_serves_on() {
    let dir = scratch_dir("audit-full-disk");
    let config = dir.join("ferrymq.toml");
    std::fs::write(&config, "[audit]\nfile = \"/dev/full\"\nmax_bytes = 4096\n").unwrap();
    let (mqtt, http) = (free_port(), free_port());
    let _broker = serve(&config, mqtt, http, &dir.join("data"));
    let addr = format!("127.0.0.1:{mqtt}");
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        for i in 0..100 {
            let mut o = ConnectOptions::new(&addr, format!("full-disk-{i}"));
            o.timeout = LIMIT;
            let (mut c, _) = tokio::time::timeout(LIMIT, Client::connect(o))
                .await
                .unwrap()
                .unwrap();
            let p = Publish {
                dup: false,
                qos: QoS::AtLeastOnce,
                retain: false,
                topic: "t".into(),
                packet_id: None,
                properties: Properties::default(),
                payload: Bytes::from_static(b"x"),
            };
            assert_eq!(c.publish(p).await.unwrap(), ReasonCode::Success);
            c.disconnect().await.unwrap();
        }
    });
    wait_for("lost lines counted", LIMIT, || {
        (metric(http, "ferrymq_audit_dropped_total") > 0).then_some(())
    });
}

/// A client id, user name and topic with newlines, quotes and braces stay inside their JSON
/// strings: one line per event, none of them forged.
#[test]
fn a_client_cannot_write_a_line_of_its_own_into_the_audit_log() {
    let dir = scratch_dir("audit-injection");
    let b = Audited::start(
        &dir,
        "[auth]\nallow_anonymous = true\n\
         [[acl.rule]]\npermission = \"deny\"\naction = \"publish\"\ntopic = \"secret/#\"\n",
    );
    let (audit, http, addr) = (b.audit.clone(), b.http, b.addr());
    let forged = "x\"}\n{\"event\":\"admin\",\"forged\":true}\r\n\u{2028}";
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut o = ConnectOptions::new(&addr, forged);
        o.timeout = LIMIT;
        let (mut c, _) = Client::connect(o).await.unwrap();
        let p = Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: format!("secret/{forged}"),
            packet_id: None,
            properties: Properties::default(),
            payload: Bytes::from_static(b"x"),
        };
        assert_eq!(c.publish(p).await.unwrap(), ReasonCode::NotAuthorized);
        c.disconnect().await.unwrap();
    });
    let gone = event(&audit, "disconnect", |l| l["client_id"] == forged);
    assert_eq!(gone["by"], "client");
    let all = lines(&audit);
    assert!(all.iter().all(|l| l["forged"].is_null()), "{all:?}");
    assert_eq!(all.len(), 3, "connect, acl_denied, disconnect: {all:?}");
    let denied = all.iter().find(|l| l["event"] == "acl_denied").unwrap();
    assert_eq!(denied["topic"], format!("secret/{forged}"));
    assert_eq!(metric(http, "ferrymq_audit_dropped_total"), 0);
}

/// Two clients with one client id connecting at once: the broker takes the first over as
/// soon as it let it in. Each connection's `connect` line comes before its `disconnect`
/// line, however the connection tasks and the router are scheduled.
#[test]
fn a_connection_taken_over_at_once_has_its_connect_line_before_its_disconnect_line() {
    let dir = scratch_dir("audit-takeover-order");
    let b = Audited::start(&dir, "");
    let (audit, http, addr) = (b.audit.clone(), b.http, b.addr());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    const ROUNDS: usize = 100;
    rt.block_on(async {
        for i in 0..ROUNDS {
            let id = format!("twin-{i}");
            let one = |addr: String, id: String| async move {
                let mut o = ConnectOptions::new(&addr, id);
                o.timeout = LIMIT;
                Client::connect(o).await.map(|(c, _)| c)
            };
            let (a, b) = tokio::join!(
                tokio::spawn(one(addr.clone(), id.clone())),
                tokio::spawn(one(addr.clone(), id.clone()))
            );
            drop((a, b));
        }
        let mut o = ConnectOptions::new(&addr, "last");
        o.timeout = LIMIT;
        let (c, _) = Client::connect(o).await.unwrap();
        c.disconnect().await.unwrap();
    });
    event(&audit, "disconnect", |l| l["client_id"] == "last");
    let all = lines(&audit);
    let mut seen_connect = std::collections::HashSet::new();
    let mut out_of_order = Vec::new();
    for l in &all {
        let conn = l["conn"].as_u64();
        match l["event"].as_str() {
            Some("connect") => {
                seen_connect.insert(conn);
            }
            Some("disconnect") if !seen_connect.contains(&conn) => out_of_order.push(l.clone()),
            _ => {}
        }
    }
    assert!(
        out_of_order.is_empty(),
        "{} disconnect lines before their connect: {:?}",
        out_of_order.len(),
        out_of_order.first()
    );
    assert_eq!(metric(http, "ferrymq_audit_dropped_total"), 0);
}

/// `GET path` with an `Authorization: Bearer` token: the status.
fn get_with_token(port: u16, path: &str, token: &str) -> u16 {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(LIMIT)).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.0\r\nHost: localhost\r\nAuthorization: Bearer {token}\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    response.split(' ').nth(1).unwrap().parse().unwrap()
}

/// Wrong admin API tokens are authentication failures too: each is an `auth_failure` line
/// (`listener: "http"`, `reason: "bad_token"`, the path), and a request from the address
/// once it is banned is one with `reason: "banned"`.
#[test]
fn wrong_admin_tokens_and_banned_requests_are_audited() {
    let dir = scratch_dir("audit-admin-token");
    let b = Audited::start(
        &dir,
        "[admin]\ntoken = \"right\"\n[auth]\nmax_failures = 2\n",
    );
    let (audit, http) = (b.audit.clone(), b.http);
    assert_eq!(get_with_token(http, "/api/v1/overview", "right"), 200);
    assert_eq!(get_with_token(http, "/api/v1/clients", "guess-1"), 401);
    assert_eq!(get_with_token(http, "/api/v1/clients", "guess-2"), 401);
    assert_eq!(get_with_token(http, "/api/v1/overview", "right"), 429);

    let wrong = event(&audit, "auth_failure", |l| l["reason"] == "bad_token");
    assert_eq!(
        (&wrong["listener"], &wrong["path"], &wrong["address"]),
        (
            &"http".into(),
            &"/api/v1/clients".into(),
            &"127.0.0.1".into()
        ),
        "{wrong}"
    );
    let banned = event(&audit, "auth_failure", |l| l["reason"] == "banned");
    assert_eq!(banned["path"], "/api/v1/overview", "{banned}");
    let failures = lines(&audit)
        .into_iter()
        .filter(|l| l["event"] == "auth_failure")
        .count();
    assert_eq!(failures, 3, "two wrong tokens and one banned request");
}
