//! Review of issue 11's work queues (branch `review-queues`) over real sockets: odd but
//! legal client sequences and limits. Each test states what should hold; a failing one is
//! a finding of the review.

use std::time::Duration;

use bytes::Bytes;
use ferrymq_client::{Client, ConnectOptions};
use ferrymq_mqtt::{
    Packet, Properties, Publish, QoS, ReasonCode, SubscriptionOptions, Unsubscribe,
};
use ferrymq_server::queue_spec::QueueSpec;
use ferrymq_server::Server;
use serde_json::json;

use crate::common::*;

fn queue_config(spec: &str) -> ferrymq_server::Config {
    let mut c = test_config();
    let spec: QueueSpec = toml::from_str(spec).expect("queue spec");
    c.queues.push(spec);
    c
}

fn publish(topic: &str, payload: &[u8]) -> Publish {
    Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: topic.into(),
        packet_id: None,
        properties: Properties::default(),
        payload: Bytes::copy_from_slice(payload),
    }
}

const QOS1: SubscriptionOptions = SubscriptionOptions {
    qos: QoS::AtLeastOnce,
    no_local: false,
    retain_as_published: false,
    retain_handling: ferrymq_mqtt::RetainHandling::SendAtSubscribe,
};

async fn client(server: &Server, id: &str) -> Client {
    let mut o = ConnectOptions::new(server.mqtt_addr().to_string(), id);
    o.properties.receive_maximum = Some(10);
    Client::connect(o).await.expect("connects").0
}

async fn subscribe(c: &mut Client, filter: &str) -> ReasonCode {
    let ack = c
        .subscribe(vec![(filter.into(), QOS1)], Properties::default())
        .await
        .expect("SUBACK");
    ack.reasons[0]
}

async fn unsubscribe(c: &mut Client, filter: &str) {
    c.send(&Packet::Unsubscribe(Unsubscribe {
        packet_id: 77,
        filters: vec![filter.into()],
        properties: Properties::default(),
    }))
    .await
    .unwrap();
    loop {
        let p = tokio::time::timeout(WAIT, c.recv())
            .await
            .expect("UNSUBACK in time")
            .expect("connection open");
        if let Packet::UnsubAck(_) = p {
            return;
        }
    }
}

/// The next PUBLISH within `d`, if any.
async fn delivery_within(c: &mut Client, d: Duration) -> Option<Publish> {
    let deadline = tokio::time::Instant::now() + d;
    loop {
        match tokio::time::timeout_at(deadline, c.recv()).await {
            Ok(Ok(Packet::Publish(p))) => return Some(p),
            Ok(Ok(_)) => continue,
            Ok(Err(e)) => panic!("connection ended: {e:?}"),
            Err(_) => return None,
        }
    }
}

async fn queue_metric(server: &Server, name: &str) -> u64 {
    metric(server, &format!("{name}{{queue=\"jobs\"}}")).await
}

/// A consumer subscribed to `$queue/jobs` and to `$share/jobs/jobs/#` (both consume queue
/// `jobs`) unsubscribes the second: it is still subscribed to the first, and must still get
/// the queue's messages.
#[tokio::test]
async fn review_unsubscribing_one_of_two_subscriptions_to_a_queue_keeps_consuming() {
    let server = start_with(queue_config("name = \"jobs\"\nfilter = \"jobs/#\"\n")).await;
    let mut c = client(&server, "worker").await;
    assert_eq!(
        subscribe(&mut c, "$queue/jobs").await,
        ReasonCode::GrantedQoS1
    );
    assert_eq!(
        subscribe(&mut c, "$share/jobs/jobs/#").await,
        ReasonCode::GrantedQoS1
    );
    unsubscribe(&mut c, "$share/jobs/jobs/#").await;
    let mut p = client(&server, "p").await;
    assert_eq!(
        p.publish(publish("jobs/1", b"work")).await.unwrap(),
        ReasonCode::Success
    );
    let got = delivery_within(&mut c, Duration::from_secs(3)).await;
    let consumers = queue_metric(&server, "ferrymq_queue_consumers").await;
    assert!(
        got.is_some(),
        "no delivery to a client still subscribed to $queue/jobs (broker counts {consumers} \
         consumers, depth {})",
        queue_metric(&server, "ferrymq_queue_depth").await
    );
    server.shutdown().await;
}

/// A client subscribed to `$share/jobs/jobs/#` before queue `jobs` existed (a plain shared
/// subscription). The queue is created over REST; the client sends the same SUBSCRIBE again.
/// The broker must keep working (no router panic on network input) and the client must get
/// each message once.
#[tokio::test]
async fn review_resubscribing_a_share_filter_after_its_queue_is_created_keeps_the_broker_up() {
    let server = start().await;
    let mut c = client(&server, "worker").await;
    assert_eq!(
        subscribe(&mut c, "$share/jobs/jobs/#").await,
        ReasonCode::GrantedQoS1
    );
    let (status, body) = api(
        &server,
        "POST",
        "/api/v1/queues",
        Some(json!({"name": "jobs", "filter": "jobs/#"})),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    // The same filter again.
    let again = tokio::time::timeout(
        Duration::from_secs(5),
        c.subscribe(
            vec![("$share/jobs/jobs/#".into(), QOS1)],
            Properties::default(),
        ),
    )
    .await;
    assert!(
        matches!(&again, Ok(Ok(a)) if a.reasons == vec![ReasonCode::GrantedQoS1]),
        "second SUBSCRIBE: {again:?}"
    );
    let mut p = client(&server, "p").await;
    let acked =
        tokio::time::timeout(Duration::from_secs(5), p.publish(publish("jobs/1", b"w"))).await;
    assert!(
        matches!(acked, Ok(Ok(ReasonCode::Success))),
        "the broker still answers a publisher: {acked:?}"
    );
    let got = delivery_within(&mut c, Duration::from_secs(3)).await;
    assert!(got.is_some(), "the subscriber gets the message");
    server.shutdown().await;
}

/// `drop_oldest` with `max_bytes`: the queue's bytes never pass its limit.
#[tokio::test]
async fn review_drop_oldest_keeps_a_queue_within_max_bytes() {
    let server = start_with(queue_config(
        "name = \"jobs\"\nfilter = \"jobs/#\"\nmax_bytes = 1000\noverflow = \"drop_oldest\"\n",
    ))
    .await;
    let mut p = client(&server, "p").await;
    // 6 bytes of topic + 294 of payload = 300 bytes each: three fit.
    for _ in 0..3 {
        let r = p.publish(publish("jobs/a", &[b'x'; 294])).await.unwrap();
        assert_eq!(r, ReasonCode::Success);
    }
    // 6 + 894 = 900 bytes: more than one old message must go (or it is refused).
    let r = p.publish(publish("jobs/a", &[b'y'; 894])).await.unwrap();
    let bytes = queue_metric(&server, "ferrymq_queue_bytes").await;
    assert!(
        bytes <= 1000,
        "ferrymq_queue_bytes = {bytes} with max_bytes = 1000 (last publish: {r:?})"
    );
    server.shutdown().await;
}

/// A `$delayed/1/jobs/b` publish gets PUBACK 0x00. When it comes due the `reject_new` queue
/// is full: the message accepted with PUBACK must not vanish (issue 11: "A message accepted
/// with PUBACK is never dropped silently").
#[tokio::test]
async fn review_a_delayed_publish_acked_with_success_is_not_lost_at_a_full_queue() {
    let server = start_with(queue_config(
        "name = \"jobs\"\nfilter = \"jobs/#\"\nmax_messages = 1\noverflow = \"reject_new\"\n",
    ))
    .await;
    let mut p = client(&server, "p").await;
    assert_eq!(
        p.publish(publish("jobs/a", b"first")).await.unwrap(),
        ReasonCode::Success
    );
    assert_eq!(
        p.publish(publish("$delayed/1/jobs/b", b"delayed"))
            .await
            .unwrap(),
        ReasonCode::Success,
        "the delayed publish is accepted"
    );
    // Wait until it came due (it leaves the delayed store).
    eventually("the delayed publish comes due", || async {
        metric(&server, "ferrymq_delayed_publishes").await == 0
    })
    .await;
    let depth = queue_metric(&server, "ferrymq_queue_depth").await;
    let dead = queue_metric(&server, "ferrymq_queue_dead_letters").await;
    assert_eq!(
        depth + dead,
        2,
        "the delayed message is neither queued nor a dead letter (depth {depth}, dead {dead})"
    );
    server.shutdown().await;
}

/// A QoS 2 consumer answers a queue delivery with PUBREC (the queue's ack) and so, per MQTT
/// 5 (4.3.3), holds that packet id until the broker's PUBREL. The broker restarts (cleanly)
/// and the consumer resumes its session: the broker must finish that exchange (PUBREL) or
/// at least not reuse the packet id for a new QoS 2 delivery — a spec-following client
/// would take the new message for a resend, PUBREC it unprocessed, and the broker would
/// count that as its ack.
#[tokio::test]
async fn review_a_pubrec_acked_qos2_queue_delivery_finishes_its_exchange_after_a_restart() {
    let config = queue_config("name = \"jobs\"\nfilter = \"jobs/#\"\n");
    let server = start_with(config.clone()).await;
    let durable = |server: &Server| {
        let mut o = ConnectOptions::new(server.mqtt_addr().to_string(), "worker-q2");
        o.clean_start = false;
        o.properties.session_expiry_interval = Some(3600);
        o.properties.receive_maximum = Some(10);
        o
    };
    let (mut c, _) = Client::connect(durable(&server)).await.unwrap();
    let qos2 = SubscriptionOptions {
        qos: QoS::ExactlyOnce,
        ..Default::default()
    };
    c.subscribe(vec![("$queue/jobs".into(), qos2)], Properties::default())
        .await
        .unwrap();
    let mut p = client(&server, "p").await;
    p.publish(publish("jobs/1", b"first")).await.unwrap();
    let first = delivery_within(&mut c, WAIT).await.expect("first delivery");
    let pid = first.packet_id.unwrap();
    c.send(&Packet::PubRec(ferrymq_mqtt::PubResp::new(
        pid,
        ReasonCode::Success,
    )))
    .await
    .unwrap();
    // The broker answers PUBREL; this client does not send PUBCOMP (it is cut off first).
    eventually("the queue counts the PUBREC as an ack", || async {
        queue_metric(&server, "ferrymq_queue_acked_total").await == 1
    })
    .await;
    drop(c);
    drop(p);
    server.shutdown().await;

    let server = start_with(config).await;
    let (mut c, present) = Client::connect(durable(&server)).await.unwrap();
    assert!(present.session_present, "the session survived the restart");
    let mut p = client(&server, "p").await;
    p.publish(publish("jobs/1", b"second")).await.unwrap();
    let mut pubrel = false;
    let mut second = None;
    let deadline = tokio::time::Instant::now() + WAIT;
    while second.is_none() {
        match tokio::time::timeout_at(deadline, c.recv()).await {
            Ok(Ok(Packet::PubRel(r))) if r.packet_id == pid => pubrel = true,
            Ok(Ok(Packet::Publish(p))) => second = Some(p),
            Ok(Ok(_)) => {}
            other => panic!("no second delivery: {other:?}"),
        }
    }
    let second = second.unwrap();
    assert!(
        pubrel || second.packet_id != Some(pid),
        "no PUBREL for packet id {pid} after the restart, and the next QoS 2 delivery \
         ({:?}) reuses it",
        second.payload
    );
    server.shutdown().await;
}

/// A QoS 0 consumer "consumes at most once (taking a message is its ack)". One that reads
/// slowly (here: not at all for a while) must still not make the queue count as consumed
/// messages that never reached it: the broker drops QoS 0 deliveries when a connection's
/// outbound buffer is full (`limits.max_outbound_bytes`), so leasing to a QoS 0 consumer
/// faster than it reads throws the backlog away.
#[tokio::test]
async fn review_a_slow_qos0_consumer_does_not_empty_the_queue_into_a_full_buffer() {
    let server = start_with(queue_config("name = \"jobs\"\nfilter = \"jobs/#\"\n")).await;
    let mut p = client(&server, "p").await;
    const N: u64 = 4000;
    let body = vec![b'x'; 4096];
    for _ in 0..N {
        assert_eq!(
            p.publish(publish("jobs/a", &body)).await.unwrap(),
            ReasonCode::Success
        );
    }
    assert_eq!(queue_metric(&server, "ferrymq_queue_depth").await, N);
    let mut c = Raw::connected(&server, "qos0-worker", ferrymq_mqtt::ProtocolVersion::V5).await;
    c.subscribe(1, &[("$queue/jobs", QoS::AtMostOnce)]).await;
    // The consumer does not read for a moment; the broker does what it does meanwhile.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
    while tokio::time::Instant::now() < deadline
        && queue_metric(&server, "ferrymq_queue_depth").await > 0
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let acked = queue_metric(&server, "ferrymq_queue_acked_total").await;
    // Now it reads everything it was sent.
    let mut received = 0u64;
    loop {
        match tokio::time::timeout(Duration::from_secs(2), c.recv()).await {
            Ok(Some(Packet::Publish(_))) => received += 1,
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => break,
        }
        if received == N {
            break;
        }
    }
    let acked_now = queue_metric(&server, "ferrymq_queue_acked_total").await;
    assert!(
        received >= acked,
        "the queue counts {acked} messages consumed (then {acked_now}), the QoS 0 consumer \
         received {received} of {N}"
    );
    server.shutdown().await;
}

/// REST redrives racing with consumers: `max_attempts = 1`, two consumers nack each message
/// the first time they see it (a dead letter at once) and ack it after; the test redrives
/// everything over REST again and again while they work. In the end every message was
/// acked once by the queue, nothing is left queued, leased or dead, and every delivery of a
/// redriven message said attempt 1.
#[tokio::test]
async fn review_redrives_racing_with_consumers_end_with_every_message_acked_once() {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};
    let server = start_with(queue_config(
        "name = \"jobs\"\nfilter = \"jobs/#\"\nmax_attempts = 1\n",
    ))
    .await;
    const N: u64 = 300;
    // Per message: deliveries seen, and the attempts they carried.
    let seen: Arc<Mutex<HashMap<u64, Vec<String>>>> = Arc::default();
    let mut workers = Vec::new();
    for id in ["w1", "w2"] {
        let mut c = client(&server, id).await;
        assert_eq!(
            subscribe(&mut c, "$queue/jobs").await,
            ReasonCode::GrantedQoS1
        );
        let seen = seen.clone();
        workers.push(tokio::spawn(async move {
            while let Ok(Ok(p)) = tokio::time::timeout(Duration::from_secs(3), c.recv()).await {
                let Packet::Publish(p) = p else { continue };
                let m = u64::from_be_bytes(p.payload[..8].try_into().unwrap());
                let attempt = p
                    .properties
                    .user_properties
                    .iter()
                    .find(|(k, _)| k == "x-attempt")
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default();
                let first = {
                    let mut s = seen.lock().unwrap();
                    let e = s.entry(m).or_default();
                    e.push(attempt);
                    e.len() == 1
                };
                let code = if first {
                    ReasonCode::UnspecifiedError
                } else {
                    ReasonCode::Success
                };
                let ack = ferrymq_mqtt::PubResp::new(p.packet_id.unwrap(), code);
                if c.send(&Packet::PubAck(ack)).await.is_err() {
                    return;
                }
            }
        }));
    }
    let mut p = client(&server, "p").await;
    for m in 0..N {
        p.publish(publish("jobs/a", &m.to_be_bytes()))
            .await
            .unwrap();
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let mut redrives = 0;
    while queue_metric(&server, "ferrymq_queue_acked_total").await < N
        && tokio::time::Instant::now() < deadline
    {
        let (status, body) = api(
            &server,
            "POST",
            "/api/v1/queues/jobs/dead-letters/redrive",
            Some(json!({})),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        redrives += 1;
    }
    for w in workers {
        w.await.unwrap();
    }
    let acked = queue_metric(&server, "ferrymq_queue_acked_total").await;
    let depth = queue_metric(&server, "ferrymq_queue_depth").await;
    let leased = queue_metric(&server, "ferrymq_queue_leased").await;
    let dead = queue_metric(&server, "ferrymq_queue_dead_letters").await;
    let odd: Vec<_> = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, attempts)| attempts.len() != 2 || attempts.iter().any(|a| a != "1"))
        .map(|(m, attempts)| (*m, attempts.clone()))
        .collect();
    assert_eq!(
        (acked, depth, leased, dead),
        (N, 0, 0, 0),
        "after {redrives} redrives"
    );
    assert!(
        odd.is_empty(),
        "deliveries other than (nack, ack) at attempt 1: {odd:?}"
    );
    server.shutdown().await;
}

/// A durable QoS 2 consumer receives a queue delivery; its PUBREC is lost with the
/// connection (here: never sent). Per MQTT 5 (4.4, 4.3.3) the client may hold that packet
/// id until PUBREL, and on resuming the session the server resends the unacknowledged
/// PUBLISH. The broker drops the in-flight entry (the lease goes back as a failed attempt);
/// it must then not hand the same packet id to a different message, which the client
/// would take for a resend and PUBREC unprocessed (the queue would count it acked). Holds:
/// the session's packet ids move on rather than restart at the lowest free one (within a
/// run; after a restart they do restart, see the test above).
#[tokio::test]
async fn review_a_resumed_qos2_consumer_never_gets_a_held_packet_id_for_another_message() {
    let config = queue_config(
        "name = \"jobs\"\nfilter = \"jobs/#\"\nbackoff = { kind = \"fixed\", initial_ms = 60000 }\n",
    );
    let server = start_with(config).await;
    let durable = |server: &Server| {
        let mut o = ConnectOptions::new(server.mqtt_addr().to_string(), "worker-q2b");
        o.clean_start = false;
        o.properties.session_expiry_interval = Some(3600);
        o.properties.receive_maximum = Some(10);
        o
    };
    let (mut c, _) = Client::connect(durable(&server)).await.unwrap();
    let qos2 = SubscriptionOptions {
        qos: QoS::ExactlyOnce,
        ..Default::default()
    };
    c.subscribe(vec![("$queue/jobs".into(), qos2)], Properties::default())
        .await
        .unwrap();
    let mut p = client(&server, "p").await;
    p.publish(publish("jobs/1", b"first")).await.unwrap();
    let first = delivery_within(&mut c, WAIT).await.expect("first delivery");
    let pid = first.packet_id.unwrap();
    // The connection drops before the PUBREC gets out.
    drop(c);
    eventually("the lease comes back as a failed attempt", || async {
        queue_metric(&server, "ferrymq_queue_nacked_total").await == 1
    })
    .await;
    let (mut c, ack) = Client::connect(durable(&server)).await.unwrap();
    assert!(ack.session_present);
    p.publish(publish("jobs/2", b"second")).await.unwrap();
    let next = delivery_within(&mut c, WAIT).await.expect("a delivery");
    assert!(
        next.packet_id != Some(pid) || next.payload == first.payload,
        "packet id {pid}, held by the client for {:?}, now carries {:?} (dup {})",
        first.payload,
        next.payload,
        next.dup
    );
    server.shutdown().await;
}
