//! Live reconfiguration of a running `ferrymq` process, with clients connected throughout:
//! a valid change applies (a limit, an ACL rule, a user, a queue policy, the log level), an
//! invalid file is refused whole with the old configuration still running, a restart-only
//! change is reported; each trigger (POST /api/v1/reload, SIGHUP, a change to the file).

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use common::*;
use ferrymq_client::{Client, ClientError, ConnectOptions};
use ferrymq_mqtt::{Packet, Properties, Publish, QoS, ReasonCode, SubscriptionOptions};

const LIMIT: Duration = Duration::from_secs(20);

/// A broker process on a config file it can be asked to reload, with its log kept.
struct Broker {
    _child: KillOnDrop,
    pid: u32,
    mqtt: u16,
    http: u16,
    config: PathBuf,
    log: Arc<Mutex<Vec<String>>>,
}

impl Broker {
    /// No `--log-level`: the file's `log.level` is in force (a flag would win over it, at
    /// start and at every reload).
    fn start(name: &str, config_text: &str, watch: bool) -> (Broker, PathBuf) {
        let dir = scratch_dir(name);
        let config = dir.join("ferrymq.toml");
        std::fs::write(&config, config_text).unwrap();
        (Broker::spawn(&dir, config, watch), dir)
    }

    /// A broker on `config` (already written), its data under `dir`.
    fn spawn(dir: &Path, config: PathBuf, watch: bool) -> Broker {
        let (mqtt, http) = (free_port(), free_port());
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ferrymq"));
        cmd.args(["serve", "--config"])
            .arg(&config)
            .args(["--mqtt", &format!("127.0.0.1:{mqtt}")])
            .args(["--http", &format!("127.0.0.1:{http}")])
            .arg("--data-dir")
            .arg(dir.join("data"))
            .args(["--log-format", "json"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if !watch {
            cmd.arg("--no-watch-config");
        }
        let mut child = cmd.spawn().unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        let lines = log.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                eprintln!("broker: {line}");
                lines.lock().unwrap().push(line);
            }
        });
        wait_listening(mqtt, LIMIT);
        let pid = child.id();
        Broker {
            _child: KillOnDrop(child),
            pid,
            mqtt,
            http,
            config,
            log,
        }
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.mqtt)
    }

    /// Replaces the config file whole (written aside, then renamed over it).
    fn write_config(&self, text: &str) {
        let tmp = self.config.with_extension("tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &self.config).unwrap();
    }

    fn reloads(&self, result: &str) -> u64 {
        metric(
            self.http,
            &format!("ferrymq_config_reloads_total{{result=\"{result}\"}}"),
        )
    }

    fn sighup(&self) {
        let ok = Command::new("kill")
            .args(["-HUP", &self.pid.to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
    }

    /// The first log line containing every one of `parts`, waiting for it.
    fn log_line(&self, parts: &[&str]) -> String {
        wait_for(&format!("a log line with {parts:?}"), LIMIT, || {
            self.log
                .lock()
                .unwrap()
                .iter()
                .find(|l| parts.iter().all(|p| l.contains(p)))
                .cloned()
        })
    }

    fn has_log_line(&self, part: &str) -> bool {
        self.log.lock().unwrap().iter().any(|l| l.contains(part))
    }
}

/// An HTTP/1.0 request to the admin API: the status and the body.
fn http(port: u16, method: &str, path: &str, body: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(LIMIT)).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap();
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

fn json(text: &str) -> serde_json::Value {
    serde_json::from_str(text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

async fn connect(addr: &str, id: &str) -> Client {
    let mut o = ConnectOptions::new(addr, id);
    o.timeout = LIMIT;
    Client::connect(o).await.unwrap().0
}

async fn login(addr: &str, id: &str, user: &str, password: &str) -> Result<Client, ClientError> {
    let mut o = ConnectOptions::new(addr, id);
    o.timeout = LIMIT;
    o.username = Some(user.into());
    o.password = Some(Bytes::copy_from_slice(password.as_bytes()));
    Client::connect(o).await.map(|(c, _)| c)
}

/// A subscriber to `secret/#` and `news/#`, connected before any reload and kept throughout.
async fn watcher(addr: &str) -> Client {
    let mut c = connect(addr, "watcher").await;
    let qos1 = SubscriptionOptions {
        qos: QoS::AtLeastOnce,
        ..SubscriptionOptions::default()
    };
    let ack = c
        .subscribe(
            vec![("secret/#".into(), qos1), ("news/#".into(), qos1)],
            Properties::default(),
        )
        .await
        .unwrap();
    assert!(ack.reasons.iter().all(|r| !r.is_error()), "{ack:?}");
    c
}

async fn publish(c: &mut Client, topic: &str) -> ReasonCode {
    let p = Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: topic.into(),
        packet_id: None,
        properties: Properties::default(),
        payload: Bytes::from_static(b"x"),
    };
    tokio::time::timeout(LIMIT, c.publish(p))
        .await
        .unwrap()
        .unwrap()
}

/// The topic of the next message `c` receives (acknowledged).
async fn next_topic(c: &mut Client) -> String {
    loop {
        let packet = tokio::time::timeout(LIMIT, c.recv())
            .await
            .expect("a delivery in time")
            .unwrap();
        if let Packet::Publish(p) = packet {
            c.queue_ack(&p).unwrap();
            c.flush().await.unwrap();
            return p.topic;
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn users(dir: &Path, names: &[&str]) -> PathBuf {
    let file = dir.join("users");
    let text: String = names
        .iter()
        .map(|n| {
            let hash = ferrymq_server::password_file::hash_password(b"pw").unwrap();
            format!("{n}:{hash}\n")
        })
        .collect();
    std::fs::write(&file, text).unwrap();
    file
}

const DENY_SECRET: &str =
    "[[acl.rule]]\npermission = \"deny\"\naction = \"publish\"\ntopic = \"secret/#\"\n";

#[test]
fn a_valid_change_applies_live_through_the_api_with_clients_connected() {
    let text = |users: &Path, acl: &str, attempts: u32, level: &str, extra: &str| {
        format!(
            "[log]\nlevel = \"{level}\"\n[auth]\nallow_anonymous = true\npassword_file = {:?}\n\
             {extra}\n[[queue]]\nname = \"jobs\"\nfilter = \"jobs/#\"\nmax_attempts = {attempts}\n{acl}",
            users.display().to_string()
        )
    };
    let dir0 = scratch_dir("reload-api-users");
    let file = users(&dir0, &["alice"]);
    let (b, _dir) = Broker::start("reload-api", &text(&file, "", 3, "info", ""), false);
    let addr = b.addr();
    runtime().block_on(async {
        let mut watcher = watcher(&addr).await;
        let mut publisher = connect(&addr, "publisher").await;
        assert_eq!(
            publish(&mut publisher, "secret/a").await,
            ReasonCode::Success
        );
        assert_eq!(next_topic(&mut watcher).await, "secret/a");
        assert!(matches!(
            login(&addr, "bob1", "bob", "pw").await,
            Err(ClientError::Refused(ReasonCode::BadUserNameOrPassword))
        ));
        assert!(!b.has_log_line("\"level\":\"DEBUG\""), "info at start");

        // An ACL rule, a user, a queue policy and the log level, in one reload.
        users(&dir0, &["alice", "bob"]);
        b.write_config(&text(&file, DENY_SECRET, 7, "debug", ""));
        let (status, body) = http(b.http, "POST", "/api/v1/reload", "");
        assert_eq!(status, 200, "{body}");
        let report = json(&body);
        for part in ["acl", "auth", "queues", "log"] {
            assert!(
                report["applied"].as_array().unwrap().contains(&part.into()),
                "{part} not applied: {report}"
            );
        }
        assert_eq!(
            report["restart_required"],
            serde_json::json!([]),
            "{report}"
        );

        // The rule holds for a connection made before it.
        assert_eq!(
            publish(&mut publisher, "secret/b").await,
            ReasonCode::NotAuthorized
        );
        assert_eq!(publish(&mut publisher, "news/1").await, ReasonCode::Success);
        assert_eq!(
            next_topic(&mut watcher).await,
            "news/1",
            "secret/b never came"
        );
        let bob = login(&addr, "bob2", "bob", "pw")
            .await
            .expect("bob was added");
        bob.disconnect().await.unwrap();
        let (_, queue) = http(b.http, "GET", "/api/v1/queues/jobs", "");
        assert_eq!(json(&queue)["definition"]["max_attempts"], 7, "{queue}");
        b.log_line(&["\"level\":\"DEBUG\""]);

        // A limit, and a key that needs a restart.
        b.write_config(&text(
            &file,
            DENY_SECRET,
            7,
            "debug",
            "[limits]\nmax_connections = 2\n[storage]\nfsync = \"always\"\n",
        ));
        let (status, body) = http(b.http, "POST", "/api/v1/reload", "");
        assert_eq!(status, 200, "{body}");
        let report = json(&body);
        assert_eq!(report["applied"], serde_json::json!(["limits"]), "{report}");
        assert_eq!(
            report["restart_required"],
            serde_json::json!(["storage.fsync"]),
            "{report}"
        );
        let config = json(&http(b.http, "GET", "/api/v1/config", "").1);
        assert_eq!(config["storage"]["fsync"], "interval", "runs as started");
        assert_eq!(config["limits"]["max_connections"], 2);
        // Two are open (watcher, publisher): a third is refused, they go on.
        let mut o = ConnectOptions::new(&addr, "third");
        o.timeout = LIMIT;
        assert!(matches!(
            Client::connect(o).await,
            Err(ClientError::Refused(ReasonCode::ServerBusy))
        ));
        assert_eq!(publish(&mut publisher, "news/2").await, ReasonCode::Success);
        assert_eq!(next_topic(&mut watcher).await, "news/2");
    });
    assert_eq!(b.reloads("ok"), 2);
    assert_eq!(b.reloads("error"), 0);
}

#[test]
fn an_invalid_file_is_refused_whole_on_sighup_and_the_old_config_keeps_running() {
    let (b, _dir) = Broker::start("reload-sighup", "", false);
    let addr = b.addr();
    runtime().block_on(async {
        let mut watcher = watcher(&addr).await;
        let mut publisher = connect(&addr, "publisher").await;

        // A valid rule next to an invalid value: nothing of it applies.
        let bad = format!("{DENY_SECRET}[limits]\nrate_burst_ms = 0\n");
        b.write_config(&bad);
        b.sighup();
        wait_for("the refused reload", LIMIT, || (b.reloads("error") == 1).then_some(()));
        let config_path = b.config.display().to_string();
        let want = format!(
            "{config_path}:6: invalid config value for `limits.rate_burst_ms`: must be between 1 and 60000"
        );
        b.log_line(&["configuration not reloaded", &want]);
        assert_eq!(publish(&mut publisher, "secret/a").await, ReasonCode::Success);
        assert_eq!(next_topic(&mut watcher).await, "secret/a");
        // `ferrymq check-config` says the same.
        let out = Command::new(env!("CARGO_BIN_EXE_ferrymq"))
            .arg("check-config")
            .arg(&b.config)
            .output()
            .unwrap();
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(&want), "{stderr}");

        // Fixed: the rule applies, to the connection that was there all along.
        b.write_config(DENY_SECRET);
        b.sighup();
        wait_for("the applied reload", LIMIT, || (b.reloads("ok") == 1).then_some(()));
        assert_eq!(
            publish(&mut publisher, "secret/b").await,
            ReasonCode::NotAuthorized
        );
        assert_eq!(publish(&mut publisher, "news/1").await, ReasonCode::Success);
        assert_eq!(next_topic(&mut watcher).await, "news/1");
    });
    assert_eq!(b.reloads("error"), 1);
}

#[test]
fn a_change_to_the_file_is_reloaded_with_clients_connected() {
    let (b, _dir) = Broker::start("reload-watch", "", true);
    let addr = b.addr();
    runtime().block_on(async {
        let mut watcher = watcher(&addr).await;
        let mut publisher = connect(&addr, "publisher").await;
        b.write_config(&format!("{DENY_SECRET}[sys]\ninterval_secs = 1\n"));
        wait_for("the file's reload", LIMIT, || {
            (b.reloads("ok") >= 1).then_some(())
        });
        b.log_line(&["configuration reloaded", "file"]);
        assert_eq!(
            publish(&mut publisher, "secret/a").await,
            ReasonCode::NotAuthorized
        );
        assert_eq!(publish(&mut publisher, "news/1").await, ReasonCode::Success);
        assert_eq!(next_topic(&mut watcher).await, "news/1");
    });
    assert_eq!(b.reloads("error"), 0);
}

/// A Kubernetes config map's layout: `ferrymq.toml -> ..data/ferrymq.toml`, `..data ->
/// ..v1`; an update writes `..v2` and renames a new `..data` link over the old one.
#[test]
fn a_config_map_symlink_swap_is_reloaded_once() {
    let dir = scratch_dir("reload-configmap");
    let version = |n: u32, text: &str| {
        let d = dir.join(format!("..v{n}"));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("ferrymq.toml"), text).unwrap();
        d
    };
    version(1, "");
    std::os::unix::fs::symlink("..v1", dir.join("..data")).unwrap();
    let config = dir.join("ferrymq.toml");
    std::os::unix::fs::symlink("..data/ferrymq.toml", &config).unwrap();
    let b = Broker::spawn(&dir, config, true);
    let addr = b.addr();
    runtime().block_on(async {
        let mut watcher = watcher(&addr).await;
        let mut publisher = connect(&addr, "publisher").await;
        version(2, DENY_SECRET);
        std::os::unix::fs::symlink("..v2", dir.join("..data_tmp")).unwrap();
        std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
        std::fs::remove_dir_all(dir.join("..v1")).unwrap();
        wait_for("the swap's reload", LIMIT, || {
            (b.reloads("ok") >= 1).then_some(())
        });
        assert_eq!(
            publish(&mut publisher, "secret/a").await,
            ReasonCode::NotAuthorized
        );
        assert_eq!(publish(&mut publisher, "news/1").await, ReasonCode::Success);
        assert_eq!(next_topic(&mut watcher).await, "news/1");
        // One more swap: still watched.
        version(3, "# every default\n");
        std::os::unix::fs::symlink("..v3", dir.join("..data_tmp")).unwrap();
        std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
        wait_for("the second swap's reload", LIMIT, || {
            (b.reloads("ok") >= 2).then_some(())
        });
        assert_eq!(
            publish(&mut publisher, "secret/b").await,
            ReasonCode::Success
        );
        assert_eq!(next_topic(&mut watcher).await, "secret/b");
    });
    assert_eq!(b.reloads("ok"), 2, "one reload per swap");
    assert_eq!(b.reloads("error"), 0);
}

/// The file deleted (an editor's save, a deployment tool) and written again later: no
/// reload while it is missing, one when it is back, and it is still watched after.
#[test]
fn a_deleted_and_recreated_config_file_is_reloaded_and_still_watched() {
    let (b, _dir) = Broker::start("reload-recreate", "", true);
    let addr = b.addr();
    runtime().block_on(async {
        let mut publisher = connect(&addr, "publisher").await;
        std::fs::remove_file(&b.config).unwrap();
        // Four looks at the missing file: nothing happens.
        std::thread::sleep(WATCH_POLL * 4);
        assert_eq!((b.reloads("ok"), b.reloads("error")), (0, 0));
        assert_eq!(
            publish(&mut publisher, "secret/a").await,
            ReasonCode::Success
        );
        std::fs::write(&b.config, DENY_SECRET).unwrap();
        wait_for("the reload", LIMIT, || (b.reloads("ok") >= 1).then_some(()));
        assert_eq!(
            publish(&mut publisher, "secret/b").await,
            ReasonCode::NotAuthorized
        );
        b.write_config("# every default\n");
        wait_for("the next reload", LIMIT, || {
            (b.reloads("ok") >= 2).then_some(())
        });
        assert_eq!(
            publish(&mut publisher, "secret/c").await,
            ReasonCode::Success
        );
    });
    assert_eq!(b.reloads("error"), 0);
}

/// The file emptied and left so for a while (a truncate, then a slow write; `: > file`
/// before an editor opens it) is a write under way, not a configuration: the watch does not
/// put every default in force (no ACL rules, no users) meanwhile.
#[test]
fn an_emptied_config_file_is_not_taken_for_a_configuration_by_the_watch() {
    let (b, _dir) = Broker::start("reload-emptied", DENY_SECRET, true);
    let addr = b.addr();
    runtime().block_on(async {
        let mut publisher = connect(&addr, "publisher").await;
        std::fs::OpenOptions::new()
            .write(true)
            .truncate(true)
            .open(&b.config)
            .unwrap();
        // Four looks at the empty file.
        std::thread::sleep(WATCH_POLL * 4);
        assert_eq!(
            publish(&mut publisher, "secret/a").await,
            ReasonCode::NotAuthorized,
            "the rule still holds"
        );
        assert_eq!(b.reloads("ok"), 0);
        // The rest of the write: taken.
        std::fs::write(
            &b.config,
            format!("{DENY_SECRET}[sys]\ninterval_secs = 1\n"),
        )
        .unwrap();
        wait_for("the reload", LIMIT, || (b.reloads("ok") >= 1).then_some(()));
        assert_eq!(
            publish(&mut publisher, "secret/b").await,
            ReasonCode::NotAuthorized
        );
    });
}

const WATCH_POLL: Duration = Duration::from_millis(500);

/// A secret written with the wrong type (a numeric JWT secret or admin token) is refused,
/// and the error, which goes to the HTTP response, the log and the audit log, names the key
/// but not the value.
#[test]
fn a_refused_secret_is_not_echoed_in_the_reload_error() {
    let (b, _dir) = Broker::start("reload-secret-echo", "", false);
    b.write_config("[auth.jwt]\nalgorithm = \"HS256\"\nsecret = 8675309123\n");
    let (status, body) = http(b.http, "POST", "/api/v1/reload", "");
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("auth.jwt.secret"), "{body}");
    assert!(!body.contains("8675309123"), "the secret is echoed: {body}");
    b.write_config("[admin]\ntoken = 8675309123\n");
    let (status, body) = http(b.http, "POST", "/api/v1/reload", "");
    assert_eq!(status, 422, "{body}");
    assert!(body.contains("admin.token"), "{body}");
    assert!(!body.contains("8675309123"), "the secret is echoed: {body}");
    b.log_line(&["configuration not reloaded", "admin.token"]);
    assert!(!b.has_log_line("8675309123"), "the secret is in the log");
}

/// The payload of the next message `c` receives, and whether it is a redelivery (`dup`);
/// not acknowledged.
async fn next_publish(c: &mut Client) -> Publish {
    loop {
        let packet = tokio::time::timeout(LIMIT, c.recv())
            .await
            .expect("a delivery in time")
            .unwrap();
        if let Packet::Publish(p) = packet {
            return p;
        }
    }
}

/// Reloads that swap the ACL and a queue's policy while a job is leased to a consumer, and
/// a burst of reloads while a publisher streams: every job is delivered once and acked for
/// good, every stream message arrives once and in order, and the ACL in force is the one
/// the last reload put there.
#[test]
fn reloads_with_leased_jobs_and_a_stream_in_flight_lose_and_duplicate_nothing() {
    let config = |acl: &str, attempts: u32, rate: u32| {
        format!(
            "[[queue]]\nname = \"jobs\"\nfilter = \"jobs/#\"\nmax_attempts = {attempts}\n\
             [limits]\nmax_connection_rate = {rate}\n{acl}"
        )
    };
    let (b, _dir) = Broker::start("reload-burst", &config(DENY_SECRET, 3, 0), false);
    let addr = b.addr();
    runtime().block_on(async {
        let mut watcher = watcher(&addr).await;
        let mut consumer = connect(&addr, "consumer").await;
        let qos1 = SubscriptionOptions {
            qos: QoS::AtLeastOnce,
            ..SubscriptionOptions::default()
        };
        let ack = consumer
            .subscribe(vec![("$queue/jobs".into(), qos1)], Properties::default())
            .await
            .unwrap();
        assert!(!ack.reasons[0].is_error(), "{ack:?}");
        let mut publisher = connect(&addr, "publisher").await;

        // One job at a time, leased while a reload changes its queue's policy and the ACL.
        for i in 0..10u32 {
            assert_eq!(
                publish(&mut publisher, &format!("jobs/{i}")).await,
                ReasonCode::Success
            );
            let job = next_publish(&mut consumer).await;
            assert_eq!(job.topic, format!("jobs/{i}"));
            assert!(!job.dup, "job {i} delivered twice");
            let deny = i % 2 == 0;
            let acl = if deny { DENY_SECRET } else { "" };
            b.write_config(&config(acl, 3 + i % 2, 0));
            let (status, body) = http(b.http, "POST", "/api/v1/reload", "");
            assert_eq!(status, 200, "{body}");
            consumer.queue_ack(&job).unwrap();
            consumer.flush().await.unwrap();
            let secret = format!("secret/{i}");
            let want = if deny {
                ReasonCode::NotAuthorized
            } else {
                ReasonCode::Success
            };
            assert_eq!(publish(&mut publisher, &secret).await, want, "after {i}");
            let news = format!("news/{i}");
            assert_eq!(publish(&mut publisher, &news).await, ReasonCode::Success);
            let mut expected = vec![news];
            if !deny {
                expected.insert(0, secret);
            }
            for topic in expected {
                assert_eq!(next_topic(&mut watcher).await, topic);
            }
        }
        let (_, queue) = http(b.http, "GET", "/api/v1/queues/jobs", "");
        let stats = &json(&queue)["stats"];
        let got: Vec<u64> = ["acked", "depth", "leased", "redelivered", "dead_letters"]
            .iter()
            .map(|k| stats[*k].as_u64().unwrap())
            .collect();
        assert_eq!(got, [10, 0, 0, 0, 0], "{stats}");

        // A burst of reloads from another thread while 400 messages stream.
        let (port, path) = (b.http, b.config.clone());
        let reloader = std::thread::spawn(move || {
            let mut ok = 0;
            for i in 0..30u32 {
                let text = config("", 3 + i % 2, 1000 + i);
                let tmp = path.with_extension("tmp");
                std::fs::write(&tmp, text).unwrap();
                std::fs::rename(&tmp, &path).unwrap();
                let (status, _) = http(port, "POST", "/api/v1/reload", "");
                ok += u32::from(status == 200);
            }
            ok
        });
        const STREAM: u32 = 400;
        let stream = async {
            for i in 0..STREAM {
                let code = publish(&mut publisher, &format!("news/s{i}")).await;
                assert_eq!(code, ReasonCode::Success);
            }
        };
        let receive = async {
            for i in 0..STREAM {
                assert_eq!(next_topic(&mut watcher).await, format!("news/s{i}"));
            }
        };
        tokio::join!(stream, receive);
        assert_eq!(reloader.join().unwrap(), 30);
        // Nothing more: no duplicate came after the last.
        publish(&mut publisher, "news/end").await;
        assert_eq!(next_topic(&mut watcher).await, "news/end");
        assert!(
            tokio::time::timeout(Duration::from_millis(300), consumer.recv())
                .await
                .is_err(),
            "no job came back"
        );
    });
    assert_eq!(b.reloads("error"), 0);
}

/// An HTTP/1.0 request with extra header lines: the status and the body.
fn http_with(port: u16, method: &str, path: &str, headers: &str) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(LIMIT)).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: 127.0.0.1:{port}\r\n{headers}Content-Length: 0\r\n\r\n"
    )
    .unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).unwrap();
    let status = response.split(' ').nth(1).unwrap().parse().unwrap();
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// `GET /api/v1/config` and `POST /api/v1/reload` answer only with the admin token, and a
/// web page of another origin cannot make a browser reload; the config shown holds neither
/// the token (from `token_file`) nor the JWT secret.
#[test]
fn the_config_and_reload_routes_are_guarded_and_show_no_secret() {
    let dir = scratch_dir("reload-guarded-secrets");
    let token_file = dir.join("admin-token");
    std::fs::write(&token_file, "t0ken-0f-the-admin\n").unwrap();
    let text = format!(
        "[admin]\ntoken_file = {:?}\n[auth.jwt]\nalgorithm = \"HS256\"\nsecret = \"jwt-s3cret-value\"\n",
        token_file.display().to_string()
    );
    let config = dir.join("ferrymq.toml");
    std::fs::write(&config, text).unwrap();
    let b = Broker::spawn(&dir, config, false);
    let bearer = "Authorization: Bearer t0ken-0f-the-admin\r\n";
    assert_eq!(http_with(b.http, "GET", "/api/v1/config", "").0, 401);
    assert_eq!(http_with(b.http, "POST", "/api/v1/reload", "").0, 401);
    let evil = format!("{bearer}Origin: http://evil.example\r\n");
    assert_eq!(http_with(b.http, "POST", "/api/v1/reload", &evil).0, 403);
    let (status, body) = http_with(b.http, "GET", "/api/v1/config", bearer);
    assert_eq!(status, 200, "{body}");
    assert!(!body.contains("t0ken-0f-the-admin"), "{body}");
    assert!(!body.contains("jwt-s3cret-value"), "{body}");
    assert_eq!(json(&body)["auth"]["jwt"]["secret"], "(redacted)");
    assert_eq!(http_with(b.http, "POST", "/api/v1/reload", bearer).0, 200);
    let (_, metrics) = http_with(b.http, "GET", "/metrics", bearer);
    assert!(
        metrics.contains("ferrymq_config_reloads_total{result=\"ok\"} 1\n"),
        "only the one with the token reloaded: {metrics}"
    );
}

/// A part that fails while applying (a queue declared with the disk full: the data directory
/// is under `storage.min_free_bytes`) is reported, and its change is not taken for applied:
/// the config shown does not list the queue, and the same file reloaded again tries again
/// (and says so) instead of reporting nothing to do.
#[test]
fn a_part_that_fails_to_apply_is_tried_again_by_the_next_reload() {
    let full = "[storage]\nmin_free_bytes = 1152921504606846976\n";
    let (b, _dir) = Broker::start("reload-part-fails", full, false);
    wait_for("the disk_low alarm", LIMIT, || {
        let (_, alarms) = http(b.http, "GET", "/api/v1/alarms", "");
        alarms.contains("disk_low").then_some(())
    });
    b.write_config(&format!(
        "{full}[[queue]]\nname = \"jobs\"\nfilter = \"jobs/#\"\n"
    ));
    for attempt in 0..2 {
        let (status, body) = http(b.http, "POST", "/api/v1/reload", "");
        assert_eq!(status, 200, "{body}");
        let report = json(&body);
        assert_eq!(
            report["failed"][0]["part"], "queues",
            "attempt {attempt}: {report}"
        );
    }
    assert_eq!(http(b.http, "GET", "/api/v1/queues/jobs", "").0, 404);
    let config = json(&http(b.http, "GET", "/api/v1/config", "").1);
    assert_eq!(
        config["queue"],
        serde_json::json!([]),
        "not running: {config}"
    );
}

/// A reload that changes only keys that need a restart applies nothing, reports each of
/// them, and none of them changes what the broker does meanwhile.
#[test]
fn a_reload_of_restart_only_keys_reports_them_and_changes_nothing() {
    let (b, dir) = Broker::start("reload-restart-only", "", false);
    let addr = b.addr();
    let audit = dir.join("audit.jsonl");
    runtime().block_on(async {
        let mut watcher = watcher(&addr).await;
        let mut publisher = connect(&addr, "publisher").await;
        b.write_config(&format!(
            "[mqtt]\nmax_packet_size = 128\n[audit]\nfile = {:?}\n\
             [storage]\nsegment_bytes = 1048576\n",
            audit.display().to_string()
        ));
        let (status, body) = http(b.http, "POST", "/api/v1/reload", "");
        assert_eq!(status, 200, "{body}");
        let report = json(&body);
        assert_eq!(report["applied"], serde_json::json!([]), "{report}");
        assert_eq!(
            report["restart_required"],
            serde_json::json!([
                "audit.file",
                "mqtt.max_packet_size",
                "storage.segment_bytes"
            ]),
            "{report}"
        );
        // A publish over the new packet size still goes through, and no audit file is
        // started.
        let p = Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: "news/big".into(),
            packet_id: None,
            properties: Properties::default(),
            payload: Bytes::from(vec![b'x'; 1024]),
        };
        let code = tokio::time::timeout(LIMIT, publisher.publish(p)).await;
        assert_eq!(code.unwrap().unwrap(), ReasonCode::Success);
        assert_eq!(next_topic(&mut watcher).await, "news/big");
        let config = json(&http(b.http, "GET", "/api/v1/config", "").1);
        assert_eq!(config["mqtt"]["max_packet_size"], 1_048_576, "{config}");
        assert!(config["audit"]["file"].is_null(), "{config}");
    });
    b.log_line(&["\"message\":\"configuration reloaded\""]);
    assert!(!audit.exists(), "the audit log waits for a restart");
}

/// What a reload refuses, `ferrymq check-config` refuses too, with the same key: a password
/// file that cannot be read and a log filter that does not parse (it said "valid" to both).
#[test]
fn check_config_refuses_what_a_reload_refuses() {
    let (b, dir) = Broker::start("reload-check-config", "", false);
    let cases = [
        (
            format!(
                "[auth]\npassword_file = {:?}\n",
                dir.join("no-such-users").display().to_string()
            ),
            "auth.password_file",
        ),
        (
            "[log]\nlevel = \"ferrymq=notalevel\"\n".to_string(),
            "log.level",
        ),
    ];
    for (text, key) in cases {
        b.write_config(&text);
        let (status, body) = http(b.http, "POST", "/api/v1/reload", "");
        assert_eq!(status, 422, "{key}: {body}");
        assert!(body.contains(key), "{body}");
        let out = Command::new(env!("CARGO_BIN_EXE_ferrymq"))
            .arg("check-config")
            .arg(&b.config)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{key}: check-config said valid");
        assert!(stderr.contains(key), "{key}: {stderr}");
    }
}

/// `ferrymq check-config` prints the configuration it read (CI logs keep it): the admin
/// token is not in it, as the JWT secret is not.
#[test]
fn check_config_does_not_print_the_admin_token() {
    let dir = scratch_dir("check-config-secrets");
    let file = dir.join("ferrymq.toml");
    std::fs::write(
        &file,
        "[admin]\ntoken = \"adm1n-t0ken-value\"\n[auth.jwt]\nalgorithm = \"HS256\"\nsecret = \"jwt-s3cret-value\"\n",
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_ferrymq"))
        .arg("check-config")
        .arg(&file)
        .output()
        .unwrap();
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("is valid"), "{stdout}");
    assert!(!stdout.contains("adm1n-t0ken-value"), "{stdout}");
    assert!(!stdout.contains("jwt-s3cret-value"), "{stdout}");
}

/// `n` QoS 0 publishes to `rate/data` written back to back, then a QoS 1 one: its
/// acknowledgement, or how the connection ended.
async fn burst_then_ack(c: &mut Client, n: usize) -> Result<ReasonCode, String> {
    let data = Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtMostOnce,
        retain: false,
        topic: "rate/data".into(),
        packet_id: None,
        properties: Properties::default(),
        payload: Bytes::from_static(b"x"),
    });
    for _ in 0..n {
        c.queue(&data).map_err(|e| e.to_string())?;
    }
    c.flush().await.map_err(|e| e.to_string())?;
    let end = Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: "rate/end".into(),
        packet_id: None,
        properties: Properties::default(),
        payload: Bytes::from_static(b"end"),
    };
    match tokio::time::timeout(LIMIT, c.publish(end)).await {
        Ok(Ok(reason)) => Ok(reason),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => panic!("no acknowledgement and no close in {LIMIT:?}"),
    }
}

/// The per-client rates reach connections already open: one connected without a limit is
/// closed for going over the rate a reload set (`rate_exceeded = "disconnect"`), and one
/// connected under that rate may burst freely once a reload lifts it.
#[test]
fn a_reload_of_the_rates_reaches_connections_already_open() {
    const LIMITED: &str = "[limits]\nmax_messages_per_sec = 5\nrate_burst_ms = 1000\n\
                           rate_exceeded = \"disconnect\"\n";
    let (b, _dir) = Broker::start("reload-rates", "", false);
    let addr = b.addr();
    runtime().block_on(async {
        // Unlimited at first: 200 at once pass.
        let mut early = connect(&addr, "early").await;
        assert_eq!(
            burst_then_ack(&mut early, 200).await,
            Ok(ReasonCode::Success)
        );

        b.write_config(LIMITED);
        let (status, body) = http(b.http, "POST", "/api/v1/reload", "");
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            json(&body)["applied"],
            serde_json::json!(["limits"]),
            "{body}"
        );
        // The same connection, now over 5 messages a second with a one-second burst.
        let ended = burst_then_ack(&mut early, 200).await;
        assert!(
            ended.is_err(),
            "the open connection kept its old rates: {ended:?}"
        );
        wait_for("the rate disconnect counted", LIMIT, || {
            let sample = "ferrymq_disconnects_total{reason=\"message_rate_too_high\"}";
            (metric(b.http, sample) == 1).then_some(())
        });

        // Connected under the limit; a reload lifts it; the same connection bursts freely.
        let mut late = connect(&addr, "late").await;
        b.write_config("");
        let (status, body) = http(b.http, "POST", "/api/v1/reload", "");
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            burst_then_ack(&mut late, 200).await,
            Ok(ReasonCode::Success)
        );
    });
}

/// The admin API's limit on wrong tokens follows a reload of the `[auth]` failure policy:
/// three wrong tokens under `max_failures = 100` ban nothing; after a reload to 4, the next
/// wrong one bans the address, the right token included (429).
#[test]
fn the_admin_token_guess_limit_follows_a_reload() {
    let text = |max: u32| {
        format!("[admin]\ntoken = \"right-token\"\n[auth]\nmax_failures = {max}\nban_ms = 60000\n")
    };
    let (b, _dir) = Broker::start("reload-admin-guesses", &text(100), false);
    let right = "Authorization: Bearer right-token\r\n";
    let wrong = "Authorization: Bearer wrong-token\r\n";
    for _ in 0..3 {
        assert_eq!(http_with(b.http, "GET", "/api/v1/overview", wrong).0, 401);
    }
    assert_eq!(http_with(b.http, "GET", "/api/v1/overview", right).0, 200);

    b.write_config(&text(4));
    let (status, body) = http_with(b.http, "POST", "/api/v1/reload", right);
    assert_eq!(status, 200, "{body}");
    assert_eq!(http_with(b.http, "GET", "/api/v1/overview", wrong).0, 401);
    let (status, _) = http_with(b.http, "GET", "/api/v1/overview", right);
    assert_eq!(
        status, 429,
        "the fourth wrong token bans the address under the reloaded policy"
    );
}

/// A connection already waiting out its debt under the old rates (~30 s of it) is freed by
/// a reload that lifts them within a throttle tick, not when the old debt would be repaid.
#[test]
fn a_reload_that_lifts_the_rates_frees_a_connection_being_throttled() {
    let (b, _dir) = Broker::start(
        "reload-throttled",
        "[limits]\nmax_bytes_per_sec = 1000\nrate_burst_ms = 100\n",
        false,
    );
    let addr = b.addr();
    let received = || metric(b.http, "ferrymq_bytes_received_total ");
    runtime().block_on(async {
        let mut c = connect(&addr, "throttled").await;
        let publish = |payload: Bytes| Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: "rate/big".into(),
            packet_id: None,
            properties: Properties::default(),
            payload,
        };
        // The bucket is full: 30,000 bytes pass and leave ~30 s of debt at 1000 B/s.
        let big = publish(Bytes::from(vec![b'x'; 30_000]));
        assert_eq!(c.publish(big).await.unwrap(), ReasonCode::Success);
        let before = received();
        let mut next = publish(Bytes::from_static(b"next"));
        next.packet_id = Some(c.next_packet_id());
        c.send(&Packet::Publish(next)).await.unwrap();
        // Read by the broker, which now waits out the debt before decoding it.
        wait_for("the next publish read", LIMIT, || {
            (received() > before).then_some(())
        });
        b.write_config("");
        let (status, body) = http(b.http, "POST", "/api/v1/reload", "");
        assert_eq!(status, 200, "{body}");
        let acked = tokio::time::timeout(Duration::from_secs(5), c.recv()).await;
        assert!(
            matches!(acked, Ok(Ok(Packet::PubAck(_)))),
            "still throttled by the rates a reload lifted: {acked:?}"
        );
    });
}

/// A reload that changes only `max_connections` leaves the connection-rate buckets as they
/// are: an address that used its burst of new connections does not get another.
#[test]
fn a_reload_of_max_connections_alone_grants_no_fresh_connection_burst() {
    let text = |max: u32| {
        format!(
            "[limits]\nmax_connections = {max}\nmax_connection_rate_per_address = 1\n\
             rate_burst_ms = 1000\n"
        )
    };
    let (b, _dir) = Broker::start("reload-connection-rate", &text(100), false);
    let addr = b.addr();
    let attempt = |id: &str| {
        let mut o = ConnectOptions::new(&addr, id);
        o.timeout = LIMIT;
        runtime().block_on(Client::connect(o)).map(|(c, _)| c)
    };
    // One new connection a second: the burst is one. The refill gives a token back a second
    // after it is taken, so an attempt that takes longer than that proves nothing: again.
    let mut max = 100;
    for round in 0.. {
        assert!(round < 5, "never within a second of the last admission");
        let _first = wait_for("a connection admitted", LIMIT, || attempt("first").ok());
        let taken = std::time::Instant::now();
        assert!(matches!(
            attempt("second"),
            Err(ClientError::Refused(ReasonCode::ConnectionRateExceeded))
        ));
        max += 1;
        b.write_config(&text(max));
        let (status, body) = http(b.http, "POST", "/api/v1/reload", "");
        assert_eq!(status, 200, "{body}");
        let after = attempt("after-reload");
        if taken.elapsed() >= Duration::from_millis(900) {
            continue;
        }
        assert!(
            matches!(
                after,
                Err(ClientError::Refused(ReasonCode::ConnectionRateExceeded))
            ),
            "a reload of max_connections alone reset the connection-rate buckets: {:?}",
            after.map(|_| ())
        );
        break;
    }
}
