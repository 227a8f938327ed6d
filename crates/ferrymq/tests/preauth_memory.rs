//! Limits before authentication (issue 12, item 5), against a real `ferrymq serve`: 1,000
//! connections each sending 60 KiB of a CONNECT declared at 64 KiB and never finishing it
//! leave the broker's memory flat (bounded by `limits.preauth_buffer_bytes`, shown as
//! `ferrymq_preauth_buffer_bytes`), and a normal client still connects while they hang. With
//! the budget spent, a new client is not read (no CONNACK) until room is made, then gets in.
//!
//! Before these limits a connection could buffer `mqtt.max_packet_size` (1 MiB) of an
//! unfinished CONNECT: 1,000 of them grew the broker from 6 MiB to 994 MiB.

#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::{forward_stderr, free_port, metric, rss, scratch_dir, serve, wait_for};
use common::{wait_listening, KillOnDrop};
use ferrymq_client::{Client, ConnectOptions};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

const HANGING: usize = 1000;
/// What each hanging client sends of its CONNECT.
const SENT: usize = 60 * 1024;
/// The whole CONNECT it declares: exactly `mqtt.max_connect_size`'s default.
const DECLARED: usize = 64 * 1024;

/// The first `SENT` bytes of a 5.0 CONNECT declared `DECLARED` bytes long (fixed header
/// included): a valid start, zeros after, the end never sent.
fn half_connect() -> Vec<u8> {
    let remaining = DECLARED - 4; // 1 type byte + a 3-byte remaining length
    let mut b = vec![
        0x10,
        (remaining & 0x7F) as u8 | 0x80,
        ((remaining >> 7) & 0x7F) as u8 | 0x80,
        (remaining >> 14) as u8,
    ];
    b.extend_from_slice(b"\x00\x04MQTT\x05\x02\x00\x3c");
    b.resize(SENT, 0);
    b
}

/// Starts a broker with `limits` added to an in-memory config with a long connect timeout
/// (the hanging clients must outlive the test's measurements).
fn broker(name: &str, limits: &str) -> (KillOnDrop, u16, u16) {
    let dir = scratch_dir(name);
    let (mqtt, http) = (free_port(), free_port());
    let config = dir.join("ferrymq.toml");
    std::fs::write(
        &config,
        format!(
            "[sys]\ninterval_secs = 0\n[storage]\npersistence = false\n\
             [limits]\nconnect_timeout_secs = 120\n{limits}"
        ),
    )
    .unwrap();
    let mut child = serve(&config, mqtt, http, &dir.join("data"));
    forward_stderr(&mut child);
    let child = KillOnDrop(child);
    wait_listening(mqtt, Duration::from_secs(30));
    (child, mqtt, http)
}

/// Opens `HANGING` connections and sends each its half CONNECT (into the kernel's buffers
/// when the broker does not read it).
async fn hang(mqtt: u16) -> Vec<TcpStream> {
    let bytes = half_connect();
    let mut conns = Vec::with_capacity(HANGING);
    for _ in 0..HANGING {
        let mut s = TcpStream::connect(("127.0.0.1", mqtt)).await.unwrap();
        tokio::time::timeout(Duration::from_secs(10), s.write_all(&bytes))
            .await
            .expect("the kernel takes 60 KiB")
            .unwrap();
        conns.push(s);
    }
    conns
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// A normal 5.0 client's CONNECT, answered within `limit` (or not).
async fn normal_client(mqtt: u16, id: &str, limit: Duration) -> Option<Client> {
    let mut o = ConnectOptions::new(format!("127.0.0.1:{mqtt}"), id);
    o.timeout = limit;
    match Client::connect(o).await {
        Ok((c, ack)) => {
            assert_eq!(ack.reason, ferrymq_mqtt::ReasonCode::Success);
            Some(c)
        }
        Err(_) => None,
    }
}

const MIB: u64 = 1024 * 1024;

#[test]
fn a_thousand_half_sent_connects_leave_memory_flat_and_normal_clients_get_in() {
    let (broker, mqtt, http) = broker("preauth-flat", "");
    let rt = runtime();
    let pid = broker.0.id();
    // Warm: one client in and out, so the baseline has the runtime's first allocations.
    rt.block_on(async {
        let c = normal_client(mqtt, "warm", Duration::from_secs(10)).await;
        c.expect("connects").disconnect().await.unwrap();
    });
    let before = rss(pid);
    let started = Instant::now();
    let conns = rt.block_on(hang(mqtt));
    // Every byte sent was read (the budget, 64 MiB, holds all 1,000 at 64 KiB each).
    let want = (HANGING * SENT) as u64;
    wait_for(
        "the broker to read every half CONNECT",
        Duration::from_secs(60),
        || (metric(http, "ferrymq_bytes_received_total") >= want).then_some(()),
    );
    let held = metric(http, "ferrymq_preauth_buffer_bytes");
    let after = rss(pid);
    let growth = after.saturating_sub(before);
    println!(
        "{HANGING} half CONNECTs of {} KiB in {:?}: RSS {} -> {} MiB (+{} MiB), pre-auth \
         buffers {} MiB",
        SENT / 1024,
        started.elapsed(),
        before / MIB,
        after / MIB,
        growth / MIB,
        held / MIB
    );
    assert!(held <= 64 * MIB, "the budget bounds what is held: {held}");
    assert!(
        held >= want,
        "each holds at least what it sent (and at most its CONNECT): {held}"
    );
    assert!(growth < 100 * MIB, "memory grew by {} MiB", growth / MIB);
    // A normal client connects while they hang.
    rt.block_on(async {
        let c = normal_client(mqtt, "normal", Duration::from_secs(5)).await;
        c.expect("a normal client connects while 1,000 hang")
            .disconnect()
            .await
            .unwrap();
    });
    // The normal client's task ends a moment after its DISCONNECT is sent.
    wait_for(
        "only the hanging connections open",
        Duration::from_secs(10),
        || (metric(http, "ferrymq_connections_open") == HANGING as u64).then_some(()),
    );
    // Closing them gives every byte back.
    drop(conns);
    wait_for(
        "the shares to be given back",
        Duration::from_secs(20),
        || (metric(http, "ferrymq_preauth_buffer_bytes") == 0).then_some(()),
    );
}

#[test]
fn with_the_budget_spent_new_connections_wait_unread_until_room_is_made() {
    let budget = 4 * MIB;
    let (broker, mqtt, http) = broker(
        "preauth-full",
        &format!("preauth_buffer_bytes = {budget}\n"),
    );
    let rt = runtime();
    let pid = broker.0.id();
    let before = rss(pid);
    let conns = rt.block_on(hang(mqtt));
    // The first ~64 fill the budget; the others wait, unread, their bytes in the kernel.
    wait_for("the budget to fill", Duration::from_secs(60), || {
        let held = metric(http, "ferrymq_preauth_buffer_bytes");
        assert!(held <= budget, "{held} over the budget");
        (held + DECLARED as u64 > budget).then_some(())
    });
    let read = metric(http, "ferrymq_bytes_received_total");
    assert!(
        read <= budget,
        "only what the budget holds was read: {read} bytes"
    );
    let growth = rss(pid).saturating_sub(before);
    println!(
        "{HANGING} half CONNECTs, budget {} MiB: read {} MiB, RSS +{} MiB",
        budget / MIB,
        read / MIB,
        growth / MIB
    );
    // The budget and the 1,000 connection tasks, with room for the allocator's slack.
    assert!(
        growth < budget + 40 * MIB,
        "memory grew by {} MiB",
        growth / MIB
    );
    rt.block_on(async {
        // Not read while the budget is spent: no CONNACK...
        let waiting = tokio::spawn(normal_client(mqtt, "late", Duration::from_secs(30)));
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(
            !waiting.is_finished(),
            "a CONNECT was answered with the budget spent"
        );
        // ...until room is made: the hanging clients give up, and it gets in.
        drop(conns);
        let c = waiting.await.unwrap().expect("connected once room is made");
        c.disconnect().await.unwrap();
    });
    wait_for(
        "the shares to be given back",
        Duration::from_secs(20),
        || (metric(http, "ferrymq_preauth_buffer_bytes") == 0).then_some(()),
    );
}
