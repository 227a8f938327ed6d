//! Disk full (issue 10): a real `ferrymq serve` whose data directory is a 16 MiB tmpfs (in a
//! private mount namespace: `unshare -rm`, so no mount outlives the test) takes durable QoS 1
//! traffic until the disk is low, then
//! - refuses durable writes with 0x97 and raises `disk_low` (`/api/v1/alarms`, `/metrics` and
//!   `$SYS/broker/alarms/disk_low` agree), under `storage.min_free_bytes`;
//! - survives a write that finds the disk truly full (ENOSPC): it keeps the records, keeps
//!   serving QoS 0 and clean sessions, and does not stop;
//! - recovers by itself once space is freed (the test deletes its filler files), and takes
//!   durable writes again;
//! - and delivers every message it acknowledged, counted, after a SIGKILL and a restart on the
//!   same data directory.
//!
//! The tmpfs lives in the namespace of a shell that restarts the broker when it dies; the test
//! reaches the tmpfs through `/proc/{shell}/root`.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{BTreeSet, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{alarm, forward_stderr, free_port, metric, options, scratch_dir, wait_for};
use ferrymq_client::{Client, ConnectOptions};
use ferrymq_mqtt::{Packet, Properties, Publish, QoS, ReasonCode, SubscriptionOptions};

const PAYLOAD: usize = 4096;
const MIN_FREE: u64 = 2 * 1024 * 1024;

/// A shell in a new user and mount namespace that mounts a 16 MiB tmpfs on `mnt`, writes
/// `{mnt}/filler-1` (`filler` bytes), and runs `ferrymq serve` on `{mnt}/data` again each
/// time it dies, until `{mnt}/stop` exists.
fn broker_in_tmpfs(mnt: &Path, filler: u64, config: &Path, mqtt: u16, http: u16) -> Shell {
    let script = format!(
        "mount -t tmpfs -o size=16m tmpfs '{mnt}' || exit 97\n\
         head -c {filler} /dev/zero > '{mnt}/filler-1' || exit 98\n\
         while :; do\n\
           '{bin}' serve --config '{config}' --mqtt 127.0.0.1:{mqtt} --http 127.0.0.1:{http} \
             --data-dir '{mnt}/data' --log-level info --log-format json\n\
           [ -e '{mnt}/stop' ] && exit 0\n\
         done\n",
        mnt = mnt.display(),
        bin = env!("CARGO_BIN_EXE_ferrymq"),
        config = config.display(),
    );
    let child = Command::new("unshare")
        .args(["-rm", "sh", "-c", &script])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("unshare runs");
    let tmpfs =
        PathBuf::from(format!("/proc/{}/root", child.id())).join(mnt.strip_prefix("/").unwrap());
    Shell { child, tmpfs }
}

/// The restarting shell; dropping it (a failing test too) stops it and its broker.
struct Shell {
    child: Child,
    /// The tmpfs as the broker sees it.
    tmpfs: PathBuf,
}

impl Shell {
    fn broker(&self) -> Option<u32> {
        broker_pid(self.child.id())
    }
}

impl Drop for Shell {
    fn drop(&mut self) {
        let _ = std::fs::write(self.tmpfs.join("stop"), b"");
        if let Some(pid) = self.broker() {
            let _ = Command::new("kill")
                .args(["-KILL", &pid.to_string()])
                .status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The broker process: the shell's child.
fn broker_pid(shell: u32) -> Option<u32> {
    std::fs::read_to_string(format!("/proc/{shell}/task/{shell}/children"))
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// Writes zeros to `path` until `bytes` are written or the file system is full; returns how
/// many were written.
fn fill(path: &Path, bytes: u64) -> u64 {
    let mut f = std::fs::File::create(path).unwrap();
    let chunk = vec![0u8; 64 * 1024];
    let mut written = 0;
    while written < bytes {
        let n = chunk.len().min((bytes - written) as usize);
        match f.write(&chunk[..n]) {
            Ok(0) => break,
            Ok(k) => written += k as u64,
            Err(e) if e.raw_os_error() == Some(28) => break,
            Err(e) => panic!("filling {}: {e}", path.display()),
        }
    }
    written
}

fn publish(seq: u32, pid: u16) -> Packet {
    let mut payload = vec![0u8; PAYLOAD];
    payload[..4].copy_from_slice(&seq.to_be_bytes());
    Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: "disk/q".into(),
        packet_id: Some(pid),
        properties: Properties::default(),
        payload: Bytes::from(payload),
    })
}

/// QoS 1 publishing with up to 16 unacknowledged, recording which sequence numbers were
/// acknowledged.
struct Publisher {
    c: Client,
    next: u32,
    acked: BTreeSet<u32>,
}

impl Publisher {
    /// Publishes until one is refused (returns true), or `max` are acknowledged (false);
    /// then reads the acks of those still unacknowledged.
    async fn until_refused(&mut self, max: usize) -> bool {
        let mut in_flight: HashMap<u16, u32> = HashMap::new();
        let (mut refused, mut accepted) = (false, 0);
        loop {
            while in_flight.len() < 16 && !refused && accepted + in_flight.len() < max {
                let pid = self.c.next_packet_id();
                self.c.queue(&publish(self.next, pid)).unwrap();
                in_flight.insert(pid, self.next);
                self.next += 1;
            }
            if in_flight.is_empty() {
                break;
            }
            self.c.flush().await.unwrap();
            let ack = tokio::time::timeout(Duration::from_secs(30), self.c.recv()).await;
            match ack.expect("an ack within 30 s").unwrap() {
                Packet::PubAck(a) => {
                    let seq = in_flight.remove(&a.packet_id).unwrap();
                    match a.reason {
                        ReasonCode::Success => {
                            self.acked.insert(seq);
                            accepted += 1;
                        }
                        ReasonCode::QuotaExceeded => refused = true,
                        other => panic!("unexpected reason {other:?}"),
                    }
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        refused
    }
}

/// Reads `c` until a `$SYS/broker/alarms/disk_low` message with `active`.
async fn alarm_message(c: &mut Client, active: bool) -> serde_json::Value {
    loop {
        let p = match tokio::time::timeout(Duration::from_secs(20), c.recv()).await {
            Ok(Ok(Packet::Publish(p))) => p,
            Ok(Ok(_)) => continue,
            other => panic!("no disk_low alarm message: {other:?}"),
        };
        if p.topic == "$SYS/broker/alarms/disk_low" {
            let v: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
            if v["active"] == active {
                return v;
            }
        }
    }
}

/// A QoS 0 message from one clean client to another gets through.
async fn qos0_flows(addr: &str, tag: &str) {
    let (mut s, _) = Client::connect(ConnectOptions::new(addr, format!("z-sub-{tag}")))
        .await
        .unwrap();
    s.subscribe(
        vec![(format!("zero/{tag}"), SubscriptionOptions::default())],
        Properties::default(),
    )
    .await
    .unwrap();
    let (mut p, _) = Client::connect(ConnectOptions::new(addr, format!("z-pub-{tag}")))
        .await
        .unwrap();
    let msg = Publish {
        dup: false,
        qos: QoS::AtMostOnce,
        retain: false,
        topic: format!("zero/{tag}"),
        packet_id: None,
        properties: Properties::default(),
        payload: Bytes::from_static(b"still here"),
    };
    p.publish(msg).await.unwrap();
    loop {
        match tokio::time::timeout(Duration::from_secs(10), s.recv()).await {
            Ok(Ok(Packet::Publish(m))) => {
                assert_eq!(&m.payload[..], b"still here");
                break;
            }
            Ok(Ok(_)) => {}
            other => panic!("QoS 0 did not flow ({tag}): {other:?}"),
        }
    }
}

fn the_three_views_agree(http: u16, published: &serde_json::Value, active: bool) {
    let listed = alarm(http, "disk_low");
    assert_eq!(listed["active"], active, "{listed}");
    assert_eq!(listed["since"], published["since"]);
    assert_eq!(listed["cleared"], published["cleared"]);
    assert_eq!(
        metric(http, "ferrymq_alarm_active{name=\"disk_low\"}"),
        u64::from(active)
    );
}

/// `fsync = "interval"`: the router writes the log itself.
#[test]
fn a_full_disk_refuses_durable_writes_recovers_and_loses_nothing_acknowledged() {
    full_disk("interval");
}

/// `fsync = "always"`: the group-commit thread writes, and hands back what it could not.
#[test]
fn a_full_disk_with_group_commit_recovers_and_loses_nothing_acknowledged() {
    full_disk("always");
}

/// The two runs one after the other: side by side, each picking free ports while the other's
/// broker restarts in its loop, one could end up talking to the other's broker (a failure
/// was seen once in about fifteen runs of the suite, not reproduced since).
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn full_disk(fsync: &str) {
    let _serial = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let dir = scratch_dir(&format!("disk-full-{fsync}"));
    let mnt = dir.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    let config = dir.join("ferrymq.toml");
    std::fs::write(
        &config,
        format!(
            "[storage]\nmin_free_bytes = {MIN_FREE}\nfsync = \"{fsync}\"\n[sys]\ninterval_secs = 1\n\
             [mqtt]\nmax_queued_messages = 100000\n"
        ),
    )
    .unwrap();
    let (mqtt, http) = (free_port(), free_port());
    let addr = format!("127.0.0.1:{mqtt}");
    let mut shell = broker_in_tmpfs(&mnt, 6 << 20, &config, mqtt, http);
    forward_stderr(&mut shell.child);
    let tmpfs = shell.tmpfs.clone();
    let up = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", mqtt)).is_err() {
        if let Ok(Some(status)) = shell.child.try_wait() {
            panic!(
                "the broker did not start in a tmpfs (exit {status}; 97: `unshare -rm` could \
                 not mount a tmpfs here: this test needs root or user namespaces)"
            );
        }
        assert!(
            up.elapsed() < Duration::from_secs(30),
            "broker did not come up"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let fs_type = fs_type(&tmpfs);
    assert_eq!(
        fs_type, "tmpfs",
        "the data directory is on the test's tmpfs"
    );

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let timeout = Duration::from_secs(30);
    // A durable session that queues everything, offline; a watcher of the alarm.
    let (mut watch, mut p) = rt.block_on(async {
        let (mut sub, _) = Client::connect(options(&addr, "disk-sub", true, timeout))
            .await
            .unwrap();
        let q1 = SubscriptionOptions {
            qos: QoS::AtLeastOnce,
            ..Default::default()
        };
        sub.subscribe(vec![("disk/q".into(), q1)], Properties::default())
            .await
            .unwrap();
        sub.disconnect().await.unwrap();
        let (mut watch, _) = Client::connect(ConnectOptions::new(&addr, "disk-watch"))
            .await
            .unwrap();
        watch
            .subscribe(
                vec![(
                    "$SYS/broker/alarms/disk_low".into(),
                    SubscriptionOptions::default(),
                )],
                Properties::default(),
            )
            .await
            .unwrap();
        let (c, _) = Client::connect(ConnectOptions::new(&addr, "disk-pub"))
            .await
            .unwrap();
        (
            watch,
            Publisher {
                c,
                next: 0,
                acked: BTreeSet::new(),
            },
        )
    });

    // 1. Under storage.min_free_bytes: refused with 0x97, alarm raised, QoS 0 flows.
    let filler = tmpfs.join("filler-1");
    assert!(rt.block_on(p.until_refused(10_000)), "never refused");
    let low_acked = p.acked.len();
    let raised = rt.block_on(alarm_message(&mut watch, true));
    the_three_views_agree(http, &raised, true);
    assert!(
        metric(
            http,
            "ferrymq_publishes_refused_total{reason=\"storage_full\"}"
        ) >= 1
    );
    assert_eq!(metric(http, "ferrymq_storage_blocked"), 0, "not full yet");
    rt.block_on(qos0_flows(&addr, "low"));
    // A new durable session is refused too (CONNACK 0x97).
    let refused = rt.block_on(Client::connect(options(&addr, "disk-new", true, timeout)));
    assert!(
        matches!(
            refused,
            Err(ferrymq_client::ClientError::Refused(
                ReasonCode::QuotaExceeded
            ))
        ),
        "a new durable session while the disk is low: {:?}",
        refused.as_ref().map(|(_, a)| a.reason)
    );

    // 2. Truly full: the durable session comes back to read, which writes (its session, the
    //    messages it is sent): ENOSPC. The broker keeps the records and holds the CONNACK that
    //    announces them, refuses durable work, and goes on serving QoS 0 and clean sessions.
    let rest = fill(&tmpfs.join("filler-2"), 16 << 20);
    let resume = rt.spawn({
        let addr = addr.clone();
        async move { Client::connect(options(&addr, "disk-sub", false, timeout)).await }
    });
    wait_for("the log to find the disk full", timeout, || {
        (metric(http, "ferrymq_storage_blocked") == 1).then_some(())
    });
    rt.block_on(qos0_flows(&addr, "full"));
    assert!(
        !resume.is_finished(),
        "CONNACK held until its records are stored"
    );
    assert!(
        rt.block_on(p.until_refused(100)),
        "durable writes refused while full"
    );
    assert!(
        shell.child.try_wait().unwrap().is_none(),
        "the broker is still up"
    );

    // 3. Space returns: the broker writes what it kept, clears the alarm, takes durable writes.
    let freed = Instant::now();
    std::fs::remove_file(&filler).unwrap();
    std::fs::remove_file(tmpfs.join("filler-2")).unwrap();
    let cleared = rt.block_on(alarm_message(&mut watch, false));
    let recovery = freed.elapsed();
    rt.block_on(async {
        let (sub, ack) = resume.await.unwrap().unwrap();
        assert!(ack.session_present);
        // Leaves without acknowledging: what it was sent stays in its session.
        sub.disconnect().await.unwrap();
    });
    the_three_views_agree(http, &cleared, false);
    assert_eq!(metric(http, "ferrymq_storage_blocked"), 0);
    assert!(
        !rt.block_on(p.until_refused(200)),
        "durable writes taken again"
    );
    println!(
        "disk full ({fsync}): {low_acked} messages of 4 KiB acknowledged before the disk was low; {rest} \
         bytes filled the rest; alarm cleared {} ms after space was freed; {} acknowledged in \
         all",
        recovery.as_millis(),
        p.acked.len()
    );

    // 4. SIGKILL and a restart on the same data directory: every acknowledged message is
    //    delivered, and only those.
    let pid = shell.broker().unwrap();
    Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .status()
        .unwrap();
    wait_for("the broker to restart", timeout, || {
        shell
            .broker()
            .filter(|&new| new != pid)
            .filter(|_| std::net::TcpStream::connect(("127.0.0.1", mqtt)).is_ok())
    });
    let got = rt.block_on(async {
        let (mut sub, ack) = Client::connect(options(&addr, "disk-sub", false, timeout))
            .await
            .unwrap();
        assert!(ack.session_present);
        let mut got = BTreeSet::new();
        while got.len() < p.acked.len() {
            match tokio::time::timeout(Duration::from_secs(20), sub.recv()).await {
                Ok(Ok(Packet::Publish(m))) => {
                    got.insert(u32::from_be_bytes(m.payload[..4].try_into().unwrap()));
                    sub.queue_ack(&m).unwrap();
                    sub.flush().await.unwrap();
                }
                Ok(Ok(_)) => {}
                other => panic!("after {} of {}: {other:?}", got.len(), p.acked.len()),
            }
        }
        got
    });
    assert_eq!(
        got, p.acked,
        "exactly the acknowledged messages, after a restart"
    );

    drop(shell);
}

/// The file system type of `path`, as `stat -f` names it.
fn fs_type(path: &Path) -> String {
    let out = Command::new("stat")
        .args(["-f", "-c", "%T"])
        .arg(path)
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}
