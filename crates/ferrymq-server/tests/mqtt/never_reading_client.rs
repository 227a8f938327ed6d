//! A client that never reads cannot grow the broker. One that publishes QoS 1 as fast as it can
//! without reading its PUBACKs is held back by TCP once `limits.max_outbound_bytes` are queued
//! for it (the broker stops reading from it), so the broker's memory stays flat while other
//! clients keep flowing; and a connection whose writes make no progress for
//! `limits.write_timeout_ms` is closed (its will is published).

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use ferrymq_client::{Client, ConnectOptions};
use ferrymq_mqtt::{
    encode, Packet, ProtocolVersion, Publish, QoS, Subscribe, SubscriptionOptions, Will,
};
use tokio::io::AsyncWriteExt;

use crate::common::*;

/// Set in the child process that runs the broker for the memory test.
const BROKER_ENV: &str = "FERRYMQ_TEST_NEVER_READING_BROKER";
/// How long the client floods.
const FLOOD: Duration = Duration::from_secs(5);
/// Most the broker's resident memory may grow meanwhile: the outbound queue (8 MiB by default),
/// the input waiting for the router (256 KiB) and buffers around them; measured +13 MiB (debug
/// build). Before the fix the debug-built broker grew by 80 MiB in these 5 s.
const MAX_GROWTH_KIB: u64 = 32 * 1024;
/// Slowest round trip allowed to the client that reads normally meanwhile. Measured up to
/// 0.43 s (debug build, the whole suite running beside it); 3 s before the fix.
const MAX_ROUND_TRIP: Duration = Duration::from_secs(2);

/// Not a test of its own: the broker for `never_reading_publisher_leaves_broker_memory_flat`,
/// run in a child process (this test binary, filtered to this function) so that the resident
/// memory measured is the broker's alone, not that of the tests running beside it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by never_reading_publisher_leaves_broker_memory_flat in a child process"]
async fn broker_process() {
    if std::env::var_os(BROKER_ENV).is_none() {
        return;
    }
    let server = start().await;
    println!("broker-addr {}", server.mqtt_addr());
    // Serves until the parent closes our stdin.
    tokio::task::spawn_blocking(|| {
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
    })
    .await
    .unwrap();
}

/// The child broker process; killed when dropped.
struct BrokerProcess {
    child: Child,
    addr: String,
}

impl BrokerProcess {
    fn spawn() -> BrokerProcess {
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "never_reading_client::broker_process",
                "--exact",
                "--ignored",
                "--nocapture",
            ])
            .env(BROKER_ENV, "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let stdout = BufReader::new(child.stdout.take().unwrap());
        let addr = stdout
            .lines()
            .map_while(Result::ok)
            .find_map(|l| l.strip_prefix("broker-addr ").map(str::to_string))
            .expect("the broker process prints its address");
        BrokerProcess { child, addr }
    }

    /// Resident memory (VmRSS), KiB.
    fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc/PID/status")
    }
}

impl Drop for BrokerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn qos1_options() -> SubscriptionOptions {
    SubscriptionOptions {
        qos: QoS::AtLeastOnce,
        ..Default::default()
    }
}

/// Publishes one QoS 1 message, waits for its PUBACK and for the subscriber to receive it.
async fn round_trip(publisher: &mut Client, subscriber: &mut Client, i: u32) {
    let payload = Bytes::copy_from_slice(&i.to_be_bytes());
    publisher
        .publish(Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: "steady".into(),
            packet_id: None,
            properties: Default::default(),
            payload: payload.clone(),
        })
        .await
        .unwrap();
    let got = tokio::time::timeout(WAIT, subscriber.recv())
        .await
        .expect("delivery in time")
        .unwrap();
    let Packet::Publish(p) = got else {
        panic!("expected a PUBLISH, got {got:?}");
    };
    assert_eq!(p.payload, payload);
    subscriber.queue_ack(&p).unwrap();
    subscriber.flush().await.unwrap();
}

/// Connects, reads the CONNACK and then never reads again: writes `publishes` over and over
/// until `deadline`, however long each write waits. Returns the bytes the socket accepted.
async fn flood_without_reading(addr: &str, deadline: tokio::time::Instant) -> u64 {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut raw = Raw::from_stream(stream, ProtocolVersion::V311);
    raw.send(&connect_packet("never-reads", ProtocolVersion::V311))
        .await;
    assert!(matches!(raw.recv().await, Some(Packet::ConnAck(_))));
    let mut chunk = BytesMut::new();
    for id in 1..=256u16 {
        let p = Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: "flood".into(),
            packet_id: Some(id),
            properties: Default::default(),
            payload: Bytes::from_static(b"sixteen bytes!!!"),
        };
        encode(&Packet::Publish(p), ProtocolVersion::V311, &mut chunk).unwrap();
    }
    let mut written = 0u64;
    while let Ok(sent) = tokio::time::timeout_at(deadline, raw.stream.write_all(&chunk)).await {
        sent.unwrap();
        written += chunk.len() as u64;
    }
    written
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn never_reading_publisher_leaves_broker_memory_flat() {
    let broker = BrokerProcess::spawn();
    let (mut subscriber, _) = Client::connect(ConnectOptions::new(&broker.addr, "steady-sub"))
        .await
        .unwrap();
    subscriber
        .subscribe(vec![("steady".into(), qos1_options())], Default::default())
        .await
        .unwrap();
    let (mut publisher, _) = Client::connect(ConnectOptions::new(&broker.addr, "steady-pub"))
        .await
        .unwrap();
    round_trip(&mut publisher, &mut subscriber, 0).await;
    let before = broker.rss_kib();

    let deadline = tokio::time::Instant::now() + FLOOD;
    let addr = broker.addr.clone();
    let flood = tokio::spawn(async move { flood_without_reading(&addr, deadline).await });
    let mut worst = Duration::ZERO;
    let mut trips = 0u32;
    while tokio::time::Instant::now() < deadline {
        let t = Instant::now();
        round_trip(&mut publisher, &mut subscriber, trips + 1).await;
        worst = worst.max(t.elapsed());
        trips += 1;
    }
    let written = flood.await.unwrap();
    let after = broker.rss_kib();
    let growth = after.saturating_sub(before);
    println!(
        "never-reading client: wrote {} KiB in {FLOOD:?}; broker RSS {before} -> {after} KiB \
         (+{growth} KiB); {trips} round trips meanwhile, slowest {worst:?}",
        written / 1024
    );
    assert!(
        growth < MAX_GROWTH_KIB,
        "the broker grew by {growth} KiB while a client published without reading"
    );
    assert!(
        worst < MAX_ROUND_TRIP,
        "a normal client's round trip took {worst:?} meanwhile"
    );
    assert!(trips > 10, "only {trips} round trips in {FLOOD:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_timeout_closes_a_connection_that_never_reads() {
    let mut c = test_config();
    c.limits.write_timeout_ms = 300;
    let server = start_with(c).await;
    let addr = server.mqtt_addr().to_string();
    let (mut watcher, _) = Client::connect(ConnectOptions::new(&addr, "watcher"))
        .await
        .unwrap();
    watcher
        .subscribe(
            vec![("will/never-reads".into(), qos1_options())],
            Default::default(),
        )
        .await
        .unwrap();

    // Subscribes (reading its CONNACK and SUBACK), then never reads again. A small receive
    // buffer fills sooner.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let stream = socket.connect(server.mqtt_addr()).await.unwrap();
    let mut never = Raw::from_stream(stream, ProtocolVersion::V5);
    let Packet::Connect(mut connect) = connect_packet("never-reads", ProtocolVersion::V5) else {
        unreachable!()
    };
    connect.will = Some(Will {
        topic: "will/never-reads".into(),
        payload: Bytes::from_static(b"gone"),
        qos: QoS::AtLeastOnce,
        retain: false,
        properties: Default::default(),
    });
    never.send(&Packet::Connect(connect)).await;
    assert!(matches!(never.recv().await, Some(Packet::ConnAck(_))));
    never
        .send(&Packet::Subscribe(Subscribe {
            packet_id: 1,
            filters: vec![("big".into(), SubscriptionOptions::default())],
            properties: Default::default(),
        }))
        .await;
    assert!(matches!(never.recv().await, Some(Packet::SubAck(_))));

    // 64 KiB messages to it until its writes stall and the broker gives up on it.
    let (mut publisher, _) = Client::connect(ConnectOptions::new(&addr, "big-pub"))
        .await
        .unwrap();
    let started = Instant::now();
    let publishing = tokio::spawn(async move {
        loop {
            let p = Publish {
                dup: false,
                qos: QoS::AtMostOnce,
                retain: false,
                topic: "big".into(),
                packet_id: None,
                properties: Default::default(),
                payload: Bytes::from(vec![7u8; 64 * 1024]),
            };
            if publisher.publish(p).await.is_err() {
                return;
            }
            tokio::task::yield_now().await;
        }
    });
    let will = tokio::time::timeout(WAIT, watcher.recv())
        .await
        .expect("the will is published once the write timeout closes the connection")
        .unwrap();
    publishing.abort();
    let Packet::Publish(will) = will else {
        panic!("expected the will, got {will:?}");
    };
    assert_eq!(will.topic, "will/never-reads");
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "closed after {:?}, before the write timeout",
        started.elapsed()
    );
    drop(never);
}
