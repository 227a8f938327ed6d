//! Crash test: a real `ferrymq serve` process is killed with SIGKILL at random moments while a
//! QoS 1 publisher, a QoS 2 publisher and a persistent-session subscriber run against it, and
//! restarted on the same data directory each time. At the end:
//! - every QoS 1 message whose PUBACK reached its publisher was delivered at least once;
//! - every QoS 2 message whose PUBCOMP reached its publisher was delivered exactly once, and
//!   no QoS 2 message was delivered twice;
//! - the subscriber's session was present after every restart.
//!
//! The subscriber is slow while the kills go on (a receive maximum of 16 and about 2 ms per
//! message, slower than the publishers), so its window stays full and messages move from its
//! queue into flight all the time: the case where a replay that moved the wrong message would
//! deliver a QoS 2 message twice. The publishers resend by packet id after every reconnect,
//! as paho does (PUBLISH with DUP, or PUBREL once PUBREC came).
//!
//! The broker runs with `fsync = always`, `interval` and `os` in turn (all three promise to
//! keep what they acknowledged when the process is killed).
//!
//! `FERRYMQ_CRASH_CYCLES` sets the number of kills (20 by default; `scripts/crash-test.sh`
//! runs 100). `FERRYMQ_CRASH_SEED` replays a run.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{free_port, options, scratch_dir, wait_listening};
use ferrymq_client::Client;
use ferrymq_mqtt::{Packet, Properties, PubResp, Publish, QoS, ReasonCode, SubscriptionOptions};

/// What the clients saw, shared with the checker.
#[derive(Default)]
struct Ledger {
    acked_qos1: HashSet<u64>,
    acked_qos2: HashSet<u64>,
    /// Deliveries to the subscriber's application, per message.
    received: HashMap<u64, u32>,
    session_lost: u64,
    reconnects: u64,
    /// Most acknowledged messages not yet received, seen at a kill: how far behind the slow
    /// subscriber was (more than its window of 16 means messages waited in its queue).
    max_backlog: usize,
}

struct Shared {
    addr: String,
    ledger: Mutex<Ledger>,
    /// Publishers stop starting new messages (they still finish what is in flight).
    stop_new: AtomicBool,
    /// Everything ends.
    done: AtomicBool,
    unacked: [AtomicU64; 2],
}

/// xorshift64*: deterministic, no dependency.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n
    }
}

/// Each incarnation uses the next fsync policy, so every write path (group commit, inline
/// write with background sync, inline write) is killed and recovered from, by each other.
const POLICIES: [&str; 3] = ["always", "interval", "os"];

fn start_broker(mqtt: u16, http: u16, data: &Path, incarnation: u64) -> Child {
    let policy = POLICIES[(incarnation % 3) as usize];
    Command::new(env!("CARGO_BIN_EXE_ferrymq"))
        .args([
            "serve",
            "--fsync",
            policy,
            "--mqtt",
            &format!("127.0.0.1:{mqtt}"),
        ])
        .args(["--http", &format!("127.0.0.1:{http}")])
        .arg("--data-dir")
        .arg(data)
        .args(["--log-level", "warn"])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("ferrymq starts")
}

async fn connect(shared: &Shared, id: &str, first: &mut bool) -> Option<(Client, bool)> {
    loop {
        if shared.done.load(Relaxed) {
            return None;
        }
        match Client::connect(options(&shared.addr, id, *first, Duration::from_secs(2))).await {
            Ok((c, ack)) => {
                let present = ack.session_present;
                *first = false;
                return Some((c, present));
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

fn message(topic: &str, qos: QoS, pid: u16, id: u64, dup: bool) -> Packet {
    Packet::Publish(Publish {
        dup,
        qos,
        retain: false,
        topic: topic.into(),
        packet_id: Some(pid),
        properties: Properties::default(),
        payload: Bytes::copy_from_slice(&id.to_be_bytes()),
    })
}

/// Where an unacknowledged publish is.
#[derive(Clone, Copy, PartialEq)]
enum Stage {
    Sent,
    /// QoS 2: PUBREC received, PUBREL sent.
    Released,
}

/// A publisher with a window of 16 that, after every reconnect, resends what is unacked with
/// its original packet id (PUBLISH with DUP, or PUBREL), as MQTT-4.4.0-1 requires.
async fn publisher(shared: Arc<Shared>, qos: QoS) {
    let (id, base, slot) = match qos {
        QoS::ExactlyOnce => ("crash-pub2", 1u64 << 40, 1),
        _ => ("crash-pub1", 0, 0),
    };
    let topic = format!("crash/{}", qos as u8);
    let mut inflight: HashMap<u16, (u64, Stage)> = HashMap::new();
    let mut next_id = base;
    let mut next_pid: u16 = 1;
    let mut first = true;
    'connection: loop {
        let Some((mut c, _)) = connect(&shared, id, &mut first).await else {
            return;
        };
        let mut order: Vec<(&u16, &(u64, Stage))> = inflight.iter().collect();
        order.sort_by_key(|(_, (m, _))| *m);
        for (pid, (m, stage)) in order {
            let p = match stage {
                Stage::Sent => message(&topic, qos, *pid, *m, true),
                Stage::Released => Packet::PubRel(PubResp::new(*pid, ReasonCode::Success)),
            };
            if c.queue(&p).is_err() {
                continue 'connection;
            }
        }
        loop {
            if shared.done.load(Relaxed) {
                return;
            }
            let mut started = 0u64;
            while inflight.len() < 16 && !shared.stop_new.load(Relaxed) {
                while inflight.contains_key(&next_pid) {
                    next_pid = next_pid.wrapping_add(1).max(1);
                }
                let pid = next_pid;
                next_pid = next_pid.wrapping_add(1).max(1);
                inflight.insert(pid, (next_id, Stage::Sent));
                if c.queue(&message(&topic, qos, pid, next_id, false)).is_err() {
                    continue 'connection;
                }
                next_id += 1;
                started += 1;
            }
            shared.unacked[slot].store(inflight.len() as u64, Relaxed);
            if c.flush().await.is_err() {
                continue 'connection;
            }
            // About 1,000 new messages a second: more than the slow subscriber takes, so its
            // queue grows while the kills go on, but bounded, so it drains in time at the end.
            if started > 0 {
                tokio::time::sleep(Duration::from_millis(started)).await;
            }
            let packet = match tokio::time::timeout(Duration::from_millis(200), c.recv()).await {
                Ok(Ok(p)) => p,
                Ok(Err(_)) => continue 'connection,
                Err(_) => continue,
            };
            match packet {
                Packet::PubAck(r) => {
                    if let Some((m, _)) = inflight.remove(&r.packet_id) {
                        assert_eq!(r.reason, ReasonCode::Success);
                        shared.ledger.lock().unwrap().acked_qos1.insert(m);
                    }
                }
                Packet::PubRec(r) => {
                    if let Some(entry) = inflight.get_mut(&r.packet_id) {
                        assert_eq!(r.reason, ReasonCode::Success);
                        entry.1 = Stage::Released;
                    }
                    let rel = Packet::PubRel(PubResp::new(r.packet_id, ReasonCode::Success));
                    if c.queue(&rel).is_err() {
                        continue 'connection;
                    }
                }
                Packet::PubComp(r) => {
                    if let Some((m, Stage::Released)) = inflight.get(&r.packet_id).copied() {
                        inflight.remove(&r.packet_id);
                        shared.ledger.lock().unwrap().acked_qos2.insert(m);
                    }
                }
                _ => {}
            }
        }
    }
}

/// A persistent-session subscriber: QoS 1 counted on every delivery, QoS 2 on first receipt
/// of a packet id until its PUBREL (the receiver's half of exactly once). Slow (receive
/// maximum 16, ~2 ms a message) until the publishers stop, so its window stays full.
async fn subscriber(shared: Arc<Shared>, subscribed: Arc<AtomicBool>) {
    let mut awaiting_rel: HashSet<u16> = HashSet::new();
    let mut first = true;
    'connection: loop {
        let connected = loop {
            if shared.done.load(Relaxed) {
                return;
            }
            let mut o = options(&shared.addr, "crash-sub", first, Duration::from_secs(2));
            o.properties.receive_maximum = Some(16);
            if let Ok((c, ack)) = Client::connect(o).await {
                first = false;
                break (c, ack.session_present);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let (mut c, present) = connected;
        if subscribed.load(Relaxed) {
            let mut l = shared.ledger.lock().unwrap();
            l.reconnects += 1;
            if !present {
                l.session_lost += 1;
            }
        } else {
            let o = SubscriptionOptions {
                qos: QoS::ExactlyOnce,
                ..Default::default()
            };
            if c.subscribe(vec![("crash/#".into(), o)], Properties::default())
                .await
                .is_err()
            {
                first = true;
                continue;
            }
            subscribed.store(true, Relaxed);
        }
        loop {
            if shared.done.load(Relaxed) {
                return;
            }
            let packet = match tokio::time::timeout(Duration::from_millis(200), c.recv()).await {
                Ok(Ok(p)) => p,
                Ok(Err(_)) => continue 'connection,
                Err(_) => continue,
            };
            match packet {
                Packet::Publish(p) => {
                    let m = u64::from_be_bytes(p.payload[..8].try_into().unwrap());
                    let pid = p.packet_id.unwrap_or(0);
                    let new = p.qos != QoS::ExactlyOnce || awaiting_rel.insert(pid);
                    if new {
                        *shared.ledger.lock().unwrap().received.entry(m).or_default() += 1;
                    }
                    if !shared.stop_new.load(Relaxed) {
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                    if c.queue_ack(&p).is_err() {
                        continue 'connection;
                    }
                }
                Packet::PubRel(r) => {
                    awaiting_rel.remove(&r.packet_id);
                    if c.queue_pubcomp(r.packet_id).is_err() {
                        continue 'connection;
                    }
                }
                _ => {}
            }
            if c.flush().await.is_err() {
                continue 'connection;
            }
        }
    }
}

#[test]
fn acknowledged_messages_survive_sigkill() {
    let cycles: u64 = std::env::var("FERRYMQ_CRASH_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let seed: u64 = std::env::var("FERRYMQ_CRASH_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    println!("crash test: {cycles} cycles, FERRYMQ_CRASH_SEED={seed}");
    let mut rng = Rng(seed | 1);
    let (mqtt, http) = (free_port(), free_port());
    let data = scratch_dir("crash");
    let mut broker = start_broker(mqtt, http, &data, 0);
    wait_listening(mqtt, Duration::from_secs(30));

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let shared = Arc::new(Shared {
        addr: format!("127.0.0.1:{mqtt}"),
        ledger: Mutex::new(Ledger::default()),
        stop_new: AtomicBool::new(false),
        done: AtomicBool::new(false),
        unacked: [AtomicU64::new(0), AtomicU64::new(0)],
    });
    let subscribed = Arc::new(AtomicBool::new(false));
    let sub = rt.spawn(subscriber(shared.clone(), subscribed.clone()));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !subscribed.load(Relaxed) {
        assert!(Instant::now() < deadline, "subscriber never subscribed");
        std::thread::sleep(Duration::from_millis(5));
    }
    let pubs = [
        rt.spawn(publisher(shared.clone(), QoS::AtLeastOnce)),
        rt.spawn(publisher(shared.clone(), QoS::ExactlyOnce)),
    ];

    let started = Instant::now();
    for cycle in 1..=cycles {
        std::thread::sleep(Duration::from_millis(50 + rng.below(450)));
        {
            let mut l = shared.ledger.lock().unwrap();
            let acked = l.acked_qos1.len() + l.acked_qos2.len();
            l.max_backlog = l.max_backlog.max(acked.saturating_sub(l.received.len()));
        }
        broker.kill().unwrap(); // SIGKILL
        broker.wait().unwrap();
        broker = start_broker(mqtt, http, &data, cycle);
        wait_listening(mqtt, Duration::from_secs(30));
    }
    // Let the last incarnation run, then drain: no new messages, finish what is in flight.
    std::thread::sleep(Duration::from_millis(300));
    shared.stop_new.store(true, Relaxed);
    let drained = |s: &Shared| {
        let l = s.ledger.lock().unwrap();
        s.unacked[0].load(Relaxed) == 0
            && s.unacked[1].load(Relaxed) == 0
            && l.acked_qos1.iter().all(|m| l.received.contains_key(m))
            && l.acked_qos2.iter().all(|m| l.received.contains_key(m))
    };
    let deadline = Instant::now() + Duration::from_secs(60 + cycles / 2);
    while !drained(&shared) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    shared.done.store(true, Relaxed);
    // A panic in a client task (an assertion on what the broker sent) fails the test.
    rt.block_on(async {
        sub.await.expect("the subscriber task ends cleanly");
        for p in pubs {
            p.await.expect("a publisher task ends cleanly");
        }
    });
    broker.kill().unwrap();
    broker.wait().unwrap();
    let _ = std::fs::remove_dir_all(&data);

    let l = shared.ledger.lock().unwrap();
    let lost1: Vec<&u64> = l
        .acked_qos1
        .iter()
        .filter(|m| !l.received.contains_key(m))
        .collect();
    let lost2: Vec<&u64> = l
        .acked_qos2
        .iter()
        .filter(|m| !l.received.contains_key(m))
        .collect();
    let twice2: Vec<(&u64, &u32)> = l
        .received
        .iter()
        .filter(|(m, n)| **m >= 1 << 40 && **n > 1)
        .collect();
    let redelivered1: u64 = l
        .received
        .iter()
        .filter(|(m, _)| **m < 1 << 40)
        .map(|(_, n)| u64::from(n - 1))
        .sum();
    println!(
        "crash test: {cycles} kills in {:.1} s; acknowledged QoS 1: {}, QoS 2: {}; \
         lost QoS 1: {}, lost QoS 2: {}, QoS 2 delivered twice: {}; QoS 1 redeliveries: {}; \
         subscriber reconnects: {}, sessions lost: {}; most behind at a kill: {}",
        started.elapsed().as_secs_f64(),
        l.acked_qos1.len(),
        l.acked_qos2.len(),
        lost1.len(),
        lost2.len(),
        twice2.len(),
        redelivered1,
        l.reconnects,
        l.session_lost,
        l.max_backlog,
    );
    assert!(
        lost1.is_empty(),
        "acknowledged QoS 1 messages lost: {lost1:?}"
    );
    assert!(
        lost2.is_empty(),
        "acknowledged QoS 2 messages lost: {lost2:?}"
    );
    assert!(
        twice2.is_empty(),
        "QoS 2 messages delivered twice: {twice2:?}"
    );
    assert_eq!(l.session_lost, 0, "the subscriber's session was lost");
    assert!(
        l.max_backlog > 64,
        "the subscriber never fell behind its window ({} at most): the test did not cover \
         messages moving from queue to flight",
        l.max_backlog
    );
    assert!(
        l.reconnects >= cycles,
        "the subscriber reconnected {} times for {cycles} kills",
        l.reconnects
    );
    assert!(
        l.acked_qos1.len() as u64 > cycles * 10 && l.acked_qos2.len() as u64 > cycles * 10,
        "too little traffic to prove anything"
    );
}
