//! The work-queue REST API (`/api/v1/queues`, docs/api.md) against a live broker: queue
//! definitions (create, invalid, show, patch, delete, 404s) and dead letters made by real
//! MQTT 5 consumers that nack (list with filters and cursor pages, show, discard, purge,
//! redrive by id, by filter, at a rate, and to another topic).

use std::time::{Duration, Instant};

use bytes::Bytes;
use ferrymq_client::{Client, ConnectOptions};
use ferrymq_mqtt::{Packet, Properties, PubResp, Publish, QoS, ReasonCode, SubscriptionOptions};
use ferrymq_server::Server;
use serde_json::{json, Value};

use crate::common::*;

const TRACEPARENT: &str = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";

async fn create_queue(server: &Server, def: Value) {
    let (status, body) = api(server, "POST", "/api/v1/queues", Some(def)).await;
    assert_eq!(status, 201, "{body}");
}

/// An MQTT 5 consumer of `$queue/{queue}` (SUBACK received).
async fn consumer(server: &Server, id: &str, queue: &str) -> Client {
    let (mut c, _) = Client::connect(ConnectOptions::new(server.mqtt_addr().to_string(), id))
        .await
        .unwrap();
    let options = SubscriptionOptions {
        qos: QoS::AtLeastOnce,
        ..Default::default()
    };
    let ack = c
        .subscribe(
            vec![(format!("$queue/{queue}"), options)],
            Properties::default(),
        )
        .await
        .unwrap();
    assert!(ack.reasons.iter().all(|r| !r.is_error()), "{ack:?}");
    c
}

async fn publisher(server: &Server, id: &str) -> Client {
    Client::connect(ConnectOptions::new(server.mqtt_addr().to_string(), id))
        .await
        .unwrap()
        .0
}

/// Publishes at QoS 1 and waits for the PUBACK.
async fn publish(c: &mut Client, topic: &str, payload: &[u8], user: &[(&str, &str)]) {
    let mut properties = Properties::default();
    properties.user_properties = user
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let p = Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: topic.into(),
        packet_id: None,
        properties,
        payload: Bytes::copy_from_slice(payload),
    };
    assert_eq!(c.publish(p).await.unwrap(), ReasonCode::Success);
}

/// The next PUBLISH a client receives.
async fn delivery(c: &mut Client) -> Publish {
    tokio::time::timeout(WAIT, async {
        loop {
            if let Packet::Publish(p) = c.recv().await.unwrap() {
                return p;
            }
        }
    })
    .await
    .expect("a delivery in time")
}

fn user_property<'a>(p: &'a Publish, key: &str) -> Option<&'a str> {
    p.properties
        .user_properties
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

async fn nack(c: &mut Client, p: &Publish, code: ReasonCode, reason: &str) {
    let mut r = PubResp::new(p.packet_id.unwrap(), code);
    r.properties.reason_string = Some(reason.into());
    c.send(&Packet::PubAck(r)).await.unwrap();
}

async fn ack(c: &mut Client, p: &Publish) {
    c.queue_ack(p).unwrap();
    c.flush().await.unwrap();
}

/// Polls the queue until `f` holds for it.
async fn queue_until(server: &Server, name: &str, what: &str, f: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, q) = api(server, "GET", &format!("/api/v1/queues/{name}"), None).await;
        assert_eq!(status, 200, "{q}");
        if f(&q) {
            return q;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {what}: {q}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn ids(page: &Value) -> Vec<u64> {
    page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_u64().unwrap())
        .collect()
}

/// (In memory: the same API without a log; answers go at once.)
#[tokio::test]
async fn queue_definitions_are_created_checked_shown_patched_and_deleted() {
    let mut config = test_config();
    config.storage.persistence = false;
    let server = start_with(config).await;
    let def = json!({"name": "orders", "filter": ["orders/#", "legacy/orders/+"],
        "max_attempts": 3, "backoff": {"kind": "exponential", "initial_ms": 100}});
    let (status, q) = api(&server, "POST", "/api/v1/queues", Some(def.clone())).await;
    assert_eq!(status, 201, "{q}");
    assert_eq!(q["name"], "orders");
    assert_eq!(
        q["definition"]["backoff"]["multiplier"], 2.0,
        "default filled in"
    );
    assert_eq!(q["stats"]["depth"], 0);
    // The same again: it existed (200), nothing changes.
    let (status, _) = api(&server, "POST", "/api/v1/queues", Some(def)).await;
    assert_eq!(status, 200);

    // Invalid definitions: 400 naming the field, whatever the kind of mistake.
    for (body, field) in [
        (
            json!({"name": "bad", "filter": "a/#", "backoff": {"kind": "fixed"}}),
            "backoff.initial_ms",
        ),
        (
            json!({"name": "bad", "filter": "a/#", "max_attempts": "three"}),
            "max_attempts",
        ),
        (
            json!({"name": "bad", "filter": "a/#", "colour": "red"}),
            "colour",
        ),
        (json!({"name": "bad"}), "filter"),
        (
            json!({"name": "bad", "filter": "a/#", "default_priority": 12}),
            "default_priority",
        ),
        (json!({"name": "b/d", "filter": "a/#"}), "name"),
        (
            json!({"name": "bad", "filter": ["a/#", "a/#/b"]}),
            "filter[1]",
        ),
    ] {
        let (status, e) = api(&server, "POST", "/api/v1/queues", Some(body.clone())).await;
        assert_eq!(status, 400, "{body} -> {e}");
        assert_eq!(e["field"], field, "{body} -> {e}");
        assert!(e["error"].as_str().unwrap().len() > 10, "{e}");
    }

    let (status, list) = api(&server, "GET", "/api/v1/queues", None).await;
    assert_eq!(status, 200);
    let names: Vec<&str> = list["queues"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["orders"], "{list}");

    // PATCH merges: named fields change, the rest stays, null removes a limit.
    let patch = json!({"max_attempts": 7, "max_messages": 10, "backoff": {"initial_ms": 250}});
    let (status, q) = api(&server, "PATCH", "/api/v1/queues/orders", Some(patch)).await;
    assert_eq!(status, 200, "{q}");
    let d = &q["definition"];
    assert_eq!(d["max_attempts"], 7);
    assert_eq!(d["max_messages"], 10);
    assert_eq!(d["backoff"]["kind"], "exponential");
    assert_eq!(d["backoff"]["initial_ms"], 250);
    assert_eq!(d["filter"], json!(["orders/#", "legacy/orders/+"]));
    let patch = json!({"max_messages": null});
    let (_, q) = api(&server, "PATCH", "/api/v1/queues/orders", Some(patch)).await;
    assert!(q["definition"].get("max_messages").is_none(), "{q}");
    let (status, e) = api(&server, "GET", "/api/v1/queues/orders", None).await;
    assert_eq!(
        (status, e["definition"]["max_attempts"].clone()),
        (200, json!(7))
    );
    // The name cannot change; an invalid value is refused like on POST.
    let (status, e) = api(
        &server,
        "PATCH",
        "/api/v1/queues/orders",
        Some(json!({"name": "other"})),
    )
    .await;
    assert_eq!((status, e["field"].as_str()), (400, Some("name")), "{e}");
    let (status, e) = api(
        &server,
        "PATCH",
        "/api/v1/queues/orders",
        Some(json!({"ack_timeout_ms": 0})),
    )
    .await;
    assert_eq!(
        (status, e["field"].as_str()),
        (400, Some("ack_timeout_ms")),
        "{e}"
    );

    let (status, _) = api(&server, "DELETE", "/api/v1/queues/orders", None).await;
    assert_eq!(status, 200);
    for (method, path, body) in [
        ("GET", "/api/v1/queues/orders", None),
        ("DELETE", "/api/v1/queues/orders", None),
        (
            "PATCH",
            "/api/v1/queues/orders",
            Some(json!({"max_attempts": 2})),
        ),
        ("GET", "/api/v1/queues/orders/dead-letters", None),
        ("GET", "/api/v1/queues/orders/dead-letters/1", None),
        ("POST", "/api/v1/queues/orders/dead-letters/purge", None),
    ] {
        let (status, e) = api(&server, method, path, body).await;
        assert_eq!(status, 404, "{method} {path}: {e}");
        assert!(e["error"].as_str().unwrap().contains("orders"), "{e}");
    }
    let (_, list) = api(&server, "GET", "/api/v1/queues", None).await;
    assert_eq!(list["queues"], json!([]));
}

/// Dead letters in `jobs`: three nacked with "db down" (cause max_attempts; one on
/// jobs/b, one carrying a traceparent, one with a binary payload), then two rejected with
/// 0x99 "bad json" (cause rejected, on jobs/b). Returns the consumer, still subscribed.
async fn five_dead_letters(server: &Server) -> Client {
    create_queue(
        server,
        json!({"name": "jobs", "filter": "jobs/#", "max_attempts": 1}),
    )
    .await;
    let mut c = consumer(server, "worker-1", "jobs").await;
    let mut p = publisher(server, "producer").await;
    publish(&mut p, "jobs/a/1", b"one", &[("traceparent", TRACEPARENT)]).await;
    publish(&mut p, "jobs/a/2", &[0xff, 0x00, 0xfe], &[]).await;
    publish(&mut p, "jobs/b/3", b"three", &[("k", "v")]).await;
    publish(&mut p, "jobs/b/4", b"four", &[]).await;
    publish(&mut p, "jobs/b/5", b"five", &[]).await;
    for i in 0..5 {
        let d = delivery(&mut c).await;
        assert_eq!(user_property(&d, "x-attempt"), Some("1"));
        if i < 3 {
            nack(&mut c, &d, ReasonCode::UnspecifiedError, "db down").await;
        } else {
            nack(&mut c, &d, ReasonCode::PayloadFormatInvalid, "bad json").await;
        }
    }
    queue_until(server, "jobs", "five dead letters", |q| {
        q["stats"]["dead_letters"] == 5
    })
    .await;
    c
}

#[tokio::test]
async fn dead_letters_are_listed_filtered_paged_shown_discarded_and_purged() {
    let server = start().await;
    let _c = five_dead_letters(&server).await;
    let q = queue_until(&server, "jobs", "counters", |_| true).await;
    assert_eq!(q["stats"]["dead_lettered"]["max_attempts"], 3, "{q}");
    assert_eq!(q["stats"]["dead_lettered"]["rejected"], 2, "{q}");
    assert_eq!(q["stats"]["nacked"], 5, "{q}");
    assert_eq!(
        (q["stats"]["depth"].clone(), q["stats"]["leased"].clone()),
        (json!(0), json!(0))
    );

    let base = "/api/v1/queues/jobs/dead-letters";
    let (status, all) = api(&server, "GET", base, None).await;
    assert_eq!(status, 200, "{all}");
    let every = ids(&all);
    assert_eq!(every.len(), 5, "{all}");
    assert!(
        every.windows(2).all(|w| w[0] < w[1]),
        "oldest id first: {every:?}"
    );
    assert_eq!(all["next_cursor"], Value::Null);

    // One item in full.
    let first = &all["items"][0];
    assert_eq!(first["queue"], "jobs");
    assert_eq!(first["topic"], "jobs/a/1");
    assert_eq!(first["payload"], "one");
    assert_eq!(first["cause"], "max_attempts");
    assert_eq!(first["attempts"], 1);
    assert_eq!(first["trace_id"], "0af7651916cd43dd8448eb211c80319c");
    let f = &first["failures"];
    assert_eq!(f.as_array().unwrap().len(), 1, "{first}");
    assert_eq!(f[0]["reason"], "db down");
    assert_eq!(f[0]["reason_code"], 0x80);
    assert_eq!(f[0]["consumer"], "worker-1");
    assert!(f[0]["at_ms"].as_u64().unwrap() >= first["first_enqueued_ms"].as_u64().unwrap());
    assert!(first["dead_lettered_ms"].as_u64().unwrap() >= f[0]["at_ms"].as_u64().unwrap());
    assert_eq!(
        first["properties"]["user_properties"][0],
        json!({"key": "traceparent", "value": TRACEPARENT})
    );
    let binary = &all["items"][1];
    assert_eq!(binary["payload_base64"], "/wD+", "{binary}");
    assert!(binary.get("payload").is_none(), "{binary}");

    // Filters.
    let query = |q: &'static str| format!("{base}?{q}");
    let (_, rejected) = api(&server, "GET", &query("cause=rejected"), None).await;
    assert_eq!(ids(&rejected), every[3..].to_vec());
    let (_, db) = api(&server, "GET", &query("reason=db"), None).await;
    assert_eq!(ids(&db), every[..3].to_vec());
    let (_, on_b) = api(&server, "GET", &query("topic=jobs%2Fb%2F%23"), None).await;
    assert_eq!(ids(&on_b), every[2..].to_vec());
    let (_, both) = api(
        &server,
        "GET",
        &query("topic=jobs/b/%2B&cause=max_attempts"),
        None,
    )
    .await;
    assert_eq!(ids(&both), vec![every[2]]);
    // Times: items dead-lettered in the same millisecond fall on the same side.
    let t3 = all["items"][3]["dead_lettered_ms"].as_u64().unwrap();
    let at = |page: &Value| -> Vec<u64> {
        let items = page["items"].as_array().unwrap();
        items
            .iter()
            .map(|i| i["dead_lettered_ms"].as_u64().unwrap())
            .collect()
    };
    let (_, since) = api(&server, "GET", &format!("{base}?since={t3}"), None).await;
    assert!(ids(&since).ends_with(&every[3..]), "{since}");
    assert!(at(&since).iter().all(|t| *t >= t3), "{since}");
    let (_, until) = api(&server, "GET", &format!("{base}?until={t3}"), None).await;
    assert!(at(&until).iter().all(|t| *t < t3), "{until}");
    assert_eq!(ids(&since).len() + ids(&until).len(), 5);
    for bad in [
        "cause=boredom",
        "limit=0",
        "since=yesterday",
        "topic=a/%23/b",
        "colour=red",
    ] {
        let (status, e) = api(&server, "GET", &query(bad), None).await;
        assert_eq!(status, 400, "{bad}: {e}");
        assert!(e["field"].is_string(), "{e}");
    }

    // Cursor pages of two.
    let mut seen = Vec::new();
    let mut path = query("limit=2");
    let mut pages = 0;
    loop {
        let (status, page) = api(&server, "GET", &path, None).await;
        assert_eq!(status, 200);
        pages += 1;
        assert!(ids(&page).len() <= 2);
        seen.extend(ids(&page));
        match page["next_cursor"].as_u64() {
            Some(c) => path = format!("{base}?limit=2&cursor={c}"),
            None => break,
        }
    }
    assert_eq!((seen, pages), (every.clone(), 3));

    // Show one; discard one (then it is gone: 404); purge by filter, then the rest.
    let (status, one) = api(&server, "GET", &format!("{base}/{}", every[2]), None).await;
    assert_eq!(status, 200);
    assert_eq!(one, all["items"][2]);
    let (status, _) = api(&server, "GET", &format!("{base}/999999"), None).await;
    assert_eq!(status, 404);
    let (status, _) = api(&server, "GET", &format!("{base}/nope"), None).await;
    assert_eq!(status, 400);
    let (status, d) = api(&server, "DELETE", &format!("{base}/{}", every[0]), None).await;
    assert_eq!((status, d), (200, json!({"discarded": 1})));
    for method in ["GET", "DELETE"] {
        let (status, _) = api(&server, method, &format!("{base}/{}", every[0]), None).await;
        assert_eq!(status, 404, "{method} after discard");
    }
    let purge = format!("{base}/purge");
    let (status, p) = api(&server, "POST", &purge, Some(json!({"cause": "rejected"}))).await;
    assert_eq!((status, p), (200, json!({"purged": 2})));
    let (_, left) = api(&server, "GET", base, None).await;
    assert_eq!(ids(&left), every[1..3].to_vec());
    let (status, p) = api(&server, "POST", &purge, None).await;
    assert_eq!((status, p), (200, json!({"purged": 2})));
    let (_, left) = api(&server, "GET", base, None).await;
    assert_eq!(left, json!({"items": [], "next_cursor": null}));
    queue_until(&server, "jobs", "no dead letters", |q| {
        q["stats"]["dead_letters"] == 0
    })
    .await;
}

#[tokio::test]
async fn dead_letters_are_redriven_by_id_by_filter_and_to_another_topic() {
    let server = start().await;
    let mut c = five_dead_letters(&server).await;
    let base = "/api/v1/queues/jobs/dead-letters";
    let (_, all) = api(&server, "GET", base, None).await;
    let every = ids(&all);
    let redrive = format!("{base}/redrive");

    // Bad requests name the field and move nothing.
    for (body, field) in [
        (json!({"target_topic": "$SYS/x"}), "target_topic"),
        (json!({"target_topic": "a/#"}), "target_topic"),
        (json!({"rate_per_s": 0}), "rate_per_s"),
        (json!({"ids": ["one"]}), "ids"),
        (json!({"cause": "boredom"}), "cause"),
    ] {
        let (status, e) = api(&server, "POST", &redrive, Some(body.clone())).await;
        assert_eq!(
            (status, e["field"].as_str()),
            (400, Some(field)),
            "{body}: {e}"
        );
    }

    // By id: back into the queue, attempt 1 again, with the earlier failure kept.
    let body = json!({"ids": [every[1]]});
    let (status, r) = api(&server, "POST", &redrive, Some(body)).await;
    assert_eq!((status, r), (200, json!({"selected": 1, "moved": 1})));
    let d = delivery(&mut c).await;
    assert_eq!(d.payload.as_ref(), &[0xff, 0x00, 0xfe]);
    assert_eq!(user_property(&d, "x-attempt"), Some("1"));
    // Failing again dead-letters it again (max_attempts 1), now with two failures.
    nack(&mut c, &d, ReasonCode::UnspecifiedError, "still down").await;
    let again = format!("{base}/{}", every[1]);
    let deadline = Instant::now() + WAIT;
    let dead = loop {
        let (status, dead) = api(&server, "GET", &again, None).await;
        if status == 200 {
            break dead;
        }
        assert!(Instant::now() < deadline, "dead-lettered again");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let reasons: Vec<&str> = dead["failures"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["reason"].as_str().unwrap())
        .collect();
    assert_eq!(reasons, ["db down", "still down"], "{dead}");
    assert_eq!(dead["attempts"], 1, "attempts started again at 0: {dead}");

    // By filter: the two rejected ones; the consumer acks both.
    let body = json!({"cause": "rejected"});
    let (status, r) = api(&server, "POST", &redrive, Some(body)).await;
    assert_eq!((status, r), (200, json!({"selected": 2, "moved": 2})));
    let mut topics = Vec::new();
    for _ in 0..2 {
        let d = delivery(&mut c).await;
        topics.push(d.topic.clone());
        ack(&mut c, &d).await;
    }
    topics.sort();
    assert_eq!(topics, ["jobs/b/4", "jobs/b/5"]);

    // To another topic: a plain subscriber gets it, the queue's consumer does not, and the
    // dead letter is gone.
    let (mut plain, _) =
        Client::connect(ConnectOptions::new(server.mqtt_addr().to_string(), "plain"))
            .await
            .unwrap();
    let options = SubscriptionOptions {
        qos: QoS::AtLeastOnce,
        ..Default::default()
    };
    plain
        .subscribe(vec![("replay/#".into(), options)], Properties::default())
        .await
        .unwrap();
    let body = json!({"ids": [every[2]], "target_topic": "replay/jobs"});
    let (status, r) = api(&server, "POST", &redrive, Some(body)).await;
    assert_eq!((status, r), (200, json!({"selected": 1, "moved": 1})));
    let got = delivery(&mut plain).await;
    assert_eq!(
        (got.topic.as_str(), got.payload.as_ref()),
        ("replay/jobs", &b"three"[..])
    );
    assert_eq!(
        user_property(&got, "k"),
        Some("v"),
        "original properties kept"
    );
    let (status, _) = api(&server, "GET", &format!("{base}/{}", every[2]), None).await;
    assert_eq!(status, 404);
    let q = queue_until(&server, "jobs", "two acked", |q| q["stats"]["acked"] == 2).await;
    assert_eq!(q["stats"]["depth"], 0, "{q}");
    assert_eq!(q["stats"]["leased"], 0, "{q}");
    let (_, left) = api(&server, "GET", base, None).await;
    assert_eq!(ids(&left), vec![every[0], every[1]]);
}

/// `rate_per_s` answers at once (202) and moves that many per second from a task.
#[tokio::test]
async fn a_rate_limited_redrive_answers_at_once_and_moves_over_time() {
    let server = start().await;
    let mut c = five_dead_letters(&server).await;
    let redrive = "/api/v1/queues/jobs/dead-letters/redrive";
    let started = Instant::now();
    let (status, r) = api(&server, "POST", redrive, Some(json!({"rate_per_s": 2}))).await;
    assert_eq!(status, 202, "{r}");
    assert_eq!(
        r,
        json!({"selected": 5, "rate_per_s": 2, "in_progress": true})
    );
    let mut at = Vec::new();
    for _ in 0..5 {
        let d = delivery(&mut c).await;
        at.push(started.elapsed());
        ack(&mut c, &d).await;
    }
    // Batches of two at 0 s, 1 s and 2 s.
    assert!(at[1] < Duration::from_millis(900), "{at:?}");
    assert!(at[2] >= Duration::from_millis(950), "{at:?}");
    assert!(at[4] >= Duration::from_millis(1950), "{at:?}");
    let q = queue_until(&server, "jobs", "all acked", |q| q["stats"]["acked"] == 5).await;
    assert_eq!(q["stats"]["dead_letters"], 0, "{q}");
}

/// Under `fsync = always` an answer waits for the group commit of the command's records:
/// what the API said it did is there after a restart (a queue created, one patched, a dead
/// letter discarded, one redriven), and nothing it refused is.
#[tokio::test]
async fn what_the_api_answered_survives_a_restart_under_fsync_always() {
    let mut config = test_config();
    config.storage.fsync = ferrymq_server::config::Fsync::Always;
    let server = start_with(config.clone()).await;
    let _c = five_dead_letters(&server).await;
    let base = "/api/v1/queues/jobs/dead-letters";
    let (_, all) = api(&server, "GET", base, None).await;
    let every = ids(&all);
    create_queue(&server, json!({"name": "kept", "filter": "kept/#"})).await;
    let (status, _) = api(
        &server,
        "PATCH",
        "/api/v1/queues/kept",
        Some(json!({"max_attempts": 9})),
    )
    .await;
    assert_eq!(status, 200);
    let (status, _) = api(&server, "DELETE", &format!("{base}/{}", every[0]), None).await;
    assert_eq!(status, 200);
    // Redriven into the queue while its consumer is connected: leased at once. The shutdown
    // ends the consumer's connection, which returns the lease as a failed attempt ("consumer
    // gone"): with max_attempts 1 it is a dead letter again after the restart, with both
    // failures.
    let body = json!({"ids": [every[1]]});
    let (status, _) = api(&server, "POST", &format!("{base}/redrive"), Some(body)).await;
    assert_eq!(status, 200);
    let (status, _) = api(
        &server,
        "POST",
        "/api/v1/queues",
        Some(json!({"name": "x"})),
    )
    .await;
    assert_eq!(status, 400);
    server.shutdown().await;

    let server = start_with(config).await;
    let (status, q) = api(&server, "GET", "/api/v1/queues/kept", None).await;
    assert_eq!(
        (status, q["definition"]["max_attempts"].clone()),
        (200, json!(9))
    );
    let (_, list) = api(&server, "GET", "/api/v1/queues", None).await;
    assert_eq!(list["queues"].as_array().unwrap().len(), 2, "{list}");
    let (_, left) = api(&server, "GET", base, None).await;
    assert_eq!(ids(&left), every[1..].to_vec(), "{left}");
    let redriven = &left["items"][0];
    assert_eq!(
        redriven["failures"].as_array().unwrap().len(),
        2,
        "{redriven}"
    );
    assert_eq!(
        redriven["failures"][1]["reason"], "consumer gone",
        "{redriven}"
    );
}

/// docs/openapi.yaml and docs/api.md describe what the server serves: every path and
/// method in the OpenAPI file reaches a handler (not 405, not the router's bare 404), and
/// api.md names every path. (The file's structure is checked by scripts/check-openapi.sh.)
#[tokio::test]
async fn every_documented_route_is_served() {
    let docs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../docs");
    let spec = std::fs::read_to_string(docs.join("openapi.yaml")).unwrap();
    let guide = std::fs::read_to_string(docs.join("api.md")).unwrap();
    let server = start().await;
    let mut routes = Vec::new();
    let mut path = None;
    let mut in_paths = false;
    for line in spec.lines() {
        if !line.starts_with(' ') {
            in_paths = line == "paths:";
            continue;
        }
        if !in_paths {
            continue;
        }
        if let Some(p) = line.strip_prefix("  /").and_then(|p| p.strip_suffix(':')) {
            path = Some(format!("/{p}"));
        } else if let Some(m) = line.strip_prefix("    ").and_then(|m| m.strip_suffix(':')) {
            if ["get", "post", "patch", "delete", "put"].contains(&m) {
                routes.push((m.to_uppercase(), path.clone().unwrap()));
            }
        }
    }
    assert!(routes.len() >= 13, "{routes:?}");
    for (method, path) in routes {
        let doc_path = path.clone();
        assert!(
            guide.contains(&format!("{method} {doc_path}")),
            "api.md lacks {method} {doc_path}"
        );
        let concrete = path
            .replace("{name}", "nosuch")
            .replace("{id}", "1")
            .replace("{topic}", "no/such");
        let (status, body) = api(&server, &method, &concrete, None).await;
        assert_ne!(status, 405, "{method} {path}");
        // A handler's 404 says what is missing; the router's own is empty.
        assert!(
            status != 404 || body["error"].is_string(),
            "{method} {path}: no route"
        );
    }
}

/// A redrive to `target_topic` that a full `reject_new` queue refuses moves nothing and
/// keeps the dead letter (it used to discard it first and lose the message).
#[tokio::test]
async fn a_redrive_to_a_topic_whose_queue_refuses_it_keeps_the_dead_letter() {
    let server = start().await;
    let _c = five_dead_letters(&server).await;
    create_queue(
        &server,
        json!({"name": "full", "filter": "replay/#", "max_messages": 1, "overflow": "reject_new"}),
    )
    .await;
    let mut p = publisher(&server, "filler").await;
    publish(&mut p, "replay/first", b"fills it", &[]).await;
    let base = "/api/v1/queues/jobs/dead-letters";
    let (_, all) = api(&server, "GET", base, None).await;
    let id = ids(&all)[0];
    let body = json!({"ids": [id], "target_topic": "replay/again"});
    let (status, r) = api(&server, "POST", &format!("{base}/redrive"), Some(body)).await;
    assert_eq!(status, 200, "{r}");
    let (_, full) = api(&server, "GET", "/api/v1/queues/full", None).await;
    assert_eq!(full["stats"]["depth"], 1, "{full}");
    let (status, _) = api(&server, "GET", &format!("{base}/{id}"), None).await;
    assert_eq!(
        (status, r["moved"].clone()),
        (200, json!(0)),
        "the refused message is kept, not counted as moved: {r}"
    );
}
