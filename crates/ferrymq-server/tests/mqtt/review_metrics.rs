//! Review of the observability change (issue 14): what hostile clients, churn and bursts do
//! to `/metrics`, the peers map behind the client views and the per-message log.

use std::time::Duration;

use bytes::Bytes;
use ferrymq_client::{Client, ConnectOptions};
use ferrymq_mqtt::{
    Disconnect, Packet, Properties, ProtocolVersion, PubResp, Publish, QoS, ReasonCode,
    SubscriptionOptions,
};
use serde_json::json;

use crate::common::*;

/// Sum of every `ferrymq_client_connections{listener,protocol}` sample.
async fn client_connections(server: &ferrymq_server::Server) -> u64 {
    let (_, body) = http_get(server, "/metrics").await;
    body.lines()
        .filter(|l| l.starts_with("ferrymq_client_connections{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
        .sum()
}

/// Waits until the engine has no connection and no connection task is left, then checks that
/// the per-listener gauge (the peers map) agrees: zero.
async fn all_gone(server: &ferrymq_server::Server, how: &str) {
    eventually(&format!("{how}: every connection closed"), || async {
        metric(server, "ferrymq_connections_open ").await == 0
            && metric(server, "ferrymq_connections ").await == 0
    })
    .await;
    eventually(
        &format!("{how}: ferrymq_client_connections back to 0"),
        || async { client_connections(server).await == 0 },
    )
    .await;
}

#[tokio::test]
async fn peers_entry_goes_with_every_way_a_connection_ends() {
    let server = start().await;
    let v5 = ProtocolVersion::V5;

    // A clean DISCONNECT from the client.
    let mut a = Raw::connected(&server, "peer-clean", v5).await;
    a.send(&Packet::Disconnect(Disconnect::new(ReasonCode::Success)))
        .await;
    a.until_closed().await;
    all_gone(&server, "client DISCONNECT").await;

    // The socket dropped without DISCONNECT.
    drop(Raw::connected(&server, "peer-drop", v5).await);
    all_gone(&server, "socket dropped").await;

    // Taken over by a second connection with the same client id, which then leaves.
    let mut first = Raw::connected(&server, "peer-take", v5).await;
    let mut second = Raw::connected(&server, "peer-take", v5).await;
    first.until_closed().await;
    second
        .send(&Packet::Disconnect(Disconnect::new(ReasonCode::Success)))
        .await;
    second.until_closed().await;
    all_gone(&server, "takeover").await;

    // Kicked through the API.
    let mut k = Raw::connected(&server, "peer-kick", v5).await;
    let (status, _) = api(&server, "DELETE", "/api/v1/clients/peer-kick", None).await;
    assert_eq!(status, 200);
    k.until_closed().await;
    all_gone(&server, "DELETE /api/v1/clients").await;

    // A protocol violation (a second CONNECT) closed by the server.
    let mut p = Raw::connected(&server, "peer-bad", v5).await;
    p.send(&connect_packet("peer-bad", v5)).await;
    p.until_closed().await;
    all_gone(&server, "protocol violation").await;

    // Silent past its keep alive (1 s: closed after 1.5 s).
    let mut s = Raw::connect(&server, v5).await;
    let mut connect = connect_packet("peer-silent", v5);
    if let Packet::Connect(c) = &mut connect {
        c.keep_alive = 1;
    }
    s.send(&connect).await;
    assert!(matches!(s.recv().await, Some(Packet::ConnAck(_))));
    tokio::time::timeout(Duration::from_secs(5), s.until_closed())
        .await
        .expect("closed for its keep alive");
    all_gone(&server, "keep-alive timeout").await;
}

/// Metric family names declared more than once in `/metrics` (`# TYPE name ...`): the text
/// format allows one family per name, and Prometheus' parser rejects a second `TYPE` line.
fn repeated_families(body: &str) -> Vec<String> {
    let mut seen = std::collections::HashSet::new();
    body.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .filter_map(|l| l.split(' ').next())
        .filter(|name| !seen.insert(name.to_string()))
        .map(str::to_string)
        .collect()
}

#[tokio::test]
async fn every_metric_family_is_declared_once() {
    let server = start().await;
    let (status, body) = http_get(&server, "/metrics").await;
    assert_eq!(status, 200);
    assert_eq!(repeated_families(&body), Vec::<String>::new());
}

/// Publishes `topic` at QoS 1 with a `traceparent` user property; waits for the PUBACK.
async fn publish_traced(c: &mut Client, topic: &str, traceparent: &str) {
    let mut properties = Properties::default();
    properties.user_properties = vec![("traceparent".into(), traceparent.into())];
    let p = Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: topic.into(),
        packet_id: None,
        properties,
        payload: Bytes::from_static(b"x"),
    };
    assert_eq!(c.publish(p).await.unwrap(), ReasonCode::Success);
}

/// W3C Trace Context (section 3.2.2): a version of `ff`, an all-zero trace id or parent id,
/// upper-case hex, or a malformed field make the whole `traceparent` invalid. Only a valid one
/// may give a message its trace id (in log lines and dead-letter records).
#[tokio::test]
async fn only_a_valid_w3c_traceparent_gives_a_dead_letter_its_trace_id() {
    const TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
    let cases: [(&str, Option<&str>); 8] = [
        (
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            Some(TRACE),
        ),
        (
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            None,
        ),
        (
            "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",
            None,
        ),
        (
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
            None,
        ),
        (
            "00-0AF7651916CD43DD8448EB211C80319C-b7ad6b7169203331-01",
            None,
        ),
        ("00-0af7651916cd43dd8448eb211c80319c-not-hex", None),
        ("zz-0af7651916cd43dd8448eb211c80319c", None),
        // A later version may append fields after the flags; version 00 may not.
        (
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-extra",
            None,
        ),
    ];
    let server = start().await;
    let def = json!({"name": "traced", "filter": "traced/#", "max_attempts": 1});
    let (status, body) = api(&server, "POST", "/api/v1/queues", Some(def)).await;
    assert_eq!(status, 201, "{body}");
    let addr = server.mqtt_addr().to_string();
    let (mut consumer, _) = Client::connect(ConnectOptions::new(addr.clone(), "tp-worker"))
        .await
        .unwrap();
    let options = SubscriptionOptions {
        qos: QoS::AtLeastOnce,
        ..Default::default()
    };
    let ack = consumer
        .subscribe(
            vec![("$queue/traced".into(), options)],
            Properties::default(),
        )
        .await
        .unwrap();
    assert!(ack.reasons.iter().all(|r| !r.is_error()), "{ack:?}");
    let (mut producer, _) = Client::connect(ConnectOptions::new(addr, "tp-producer"))
        .await
        .unwrap();
    for (i, (tp, _)) in cases.iter().enumerate() {
        publish_traced(&mut producer, &format!("traced/{i}"), tp).await;
    }
    let mut nacked = 0;
    while nacked < cases.len() {
        let got = tokio::time::timeout(WAIT, consumer.recv())
            .await
            .unwrap()
            .unwrap();
        if let Packet::Publish(p) = got {
            let r = PubResp::new(p.packet_id.unwrap(), ReasonCode::UnspecifiedError);
            consumer.send(&Packet::PubAck(r)).await.unwrap();
            nacked += 1;
        }
    }
    let path = "/api/v1/queues/traced/dead-letters";
    eventually("every message dead-lettered", || async {
        let (_, page) = api(&server, "GET", path, None).await;
        page["items"].as_array().map_or(0, |a| a.len()) == cases.len()
    })
    .await;
    let (_, page) = api(&server, "GET", path, None).await;
    for item in page["items"].as_array().unwrap() {
        let topic = item["topic"].as_str().unwrap();
        let i: usize = topic.trim_start_matches("traced/").parse().unwrap();
        let (tp, want) = cases[i];
        assert_eq!(
            item["trace_id"].as_str(),
            want,
            "traceparent {tp:?}: {item}"
        );
    }
}

/// `ferrymq_router_step_duration_seconds_sum`: the router's busy time so far.
async fn router_busy(server: &ferrymq_server::Server) -> f64 {
    let (_, body) = http_get(server, "/metrics").await;
    body.lines()
        .find(|l| l.starts_with("ferrymq_router_step_duration_seconds_sum "))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap()
}

/// Router time per `/health` request (open without the admin token), over `n` requests.
async fn router_time_per_health(server: &ferrymq_server::Server, n: u32) -> f64 {
    let before = router_busy(server).await;
    for _ in 0..n {
        let (status, _) = http_get(server, "/health").await;
        assert_eq!(status, 200);
    }
    (router_busy(server).await - before) / f64::from(n)
}

/// `/health` and `/ready` answer anyone (they are open with a token set): what they cost the
/// router must not grow with the number of queues, or a flood of them stalls routing.
#[tokio::test]
async fn health_costs_the_router_the_same_with_many_queues() {
    const QUEUES: usize = 1_000;
    let mut c = test_config();
    c.storage.persistence = false;
    let server = start_with(c).await;
    let idle = router_time_per_health(&server, 200).await;
    for i in 0..QUEUES {
        let def = json!({"name": format!("q{i:04}"), "filter": format!("q/{i}")});
        let (status, body) = api(&server, "POST", "/api/v1/queues", Some(def)).await;
        assert_eq!(status, 201, "{body}");
    }
    let loaded = router_time_per_health(&server, 200).await;
    println!("router time per /health: {idle:.6} s idle, {loaded:.6} s with {QUEUES} queues");
    assert!(
        loaded < idle * 3.0 + 50e-6,
        "router time per /health: {idle:.6} s idle, {loaded:.6} s with {QUEUES} queues"
    );
}

/// Fifty scrapes at once with 1,000 queues: every one answers whole (a sample per queue), and
/// they share renders instead of one each (every render has its own router step count, so
/// distinct bodies are renders; printed with router time and wall time).
#[tokio::test]
async fn fifty_parallel_scrapes_all_answer_whole() {
    const QUEUES: usize = 1_000;
    let mut c = test_config();
    c.storage.persistence = false;
    let server = std::sync::Arc::new(start_with(c).await);
    for i in 0..QUEUES {
        let def = json!({"name": format!("q{i:04}"), "filter": format!("q/{i}")});
        let (status, body) = api(&server, "POST", "/api/v1/queues", Some(def)).await;
        assert_eq!(status, 201, "{body}");
    }
    let before = router_busy(&server).await;
    let started = std::time::Instant::now();
    let scrapes: Vec<_> = (0..50)
        .map(|_| {
            let server = server.clone();
            tokio::spawn(async move { http_get(&server, "/metrics").await })
        })
        .collect();
    let mut bodies = std::collections::HashSet::new();
    for s in scrapes {
        let (status, body) = tokio::time::timeout(WAIT, s).await.unwrap().unwrap();
        assert_eq!(status, 200);
        let depth = body
            .lines()
            .filter(|l| l.starts_with("ferrymq_queue_depth{"))
            .count();
        assert_eq!(depth, QUEUES);
        bodies.insert(body);
    }
    let wall = started.elapsed();
    let busy = router_busy(&server).await - before;
    let renders = bodies.len();
    println!(
        "50 parallel scrapes, {QUEUES} queues: {renders} renders, router {busy:.4} s, wall {wall:?}"
    );
    assert!(renders < 25, "{renders} renders for 50 scrapes at once");
}
