//! The `queue_depth` alarm: raised when a session holds `limits.queue_depth_alarm` messages,
//! cleared once it is drained under 90% of that; `/api/v1/alarms`, `/metrics` and the retained
//! `$SYS/broker/alarms/queue_depth` agree each time.

use bytes::Bytes;
use ferrymq_client::{Client, ConnectOptions};
use ferrymq_mqtt::{Packet, Properties, Publish, QoS, SubscriptionOptions};
use ferrymq_server::Server;

use crate::common::*;

fn durable(server: &Server, id: &str, clean: bool) -> ConnectOptions {
    let mut o = ConnectOptions::new(server.mqtt_addr().to_string(), id);
    o.clean_start = clean;
    o.properties.session_expiry_interval = Some(3600);
    o
}

/// The alarm as listed, once its `active` is `active` (at most [`WAIT`]).
async fn listed(server: &Server, active: bool) -> serde_json::Value {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let (_, body) = http_get(server, "/api/v1/alarms").await;
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        let found = v["alarms"]
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["name"] == "queue_depth")
            .cloned()
            .unwrap();
        if found["active"] == active {
            return found;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "alarm stayed {found}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Reads `c` until the retained `$SYS/broker/alarms/queue_depth` message with `active`.
async fn published(c: &mut Client, active: bool) -> serde_json::Value {
    loop {
        let p = match tokio::time::timeout(WAIT, c.recv()).await {
            Ok(Ok(Packet::Publish(p))) => p,
            Ok(Ok(_)) => continue,
            other => panic!("no queue_depth alarm message: {other:?}"),
        };
        if p.topic == "$SYS/broker/alarms/queue_depth" {
            let v: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
            if v["active"] == active {
                return v;
            }
        }
    }
}

#[tokio::test]
async fn a_deep_queue_raises_the_alarm_and_draining_it_clears_it() {
    let mut config = test_config();
    config.limits.queue_depth_alarm = Some(10);
    let server = start_with(config).await;
    let q1 = SubscriptionOptions {
        qos: QoS::AtLeastOnce,
        ..Default::default()
    };
    let (mut sub, _) = Client::connect(durable(&server, "deep", true))
        .await
        .unwrap();
    sub.subscribe(vec![("deep/q".into(), q1)], Properties::default())
        .await
        .unwrap();
    sub.disconnect().await.unwrap();
    let (mut watch, _) = Client::connect(ConnectOptions::new(
        server.mqtt_addr().to_string(),
        "deep-watch",
    ))
    .await
    .unwrap();
    watch
        .subscribe(
            vec![(
                "$SYS/broker/alarms/queue_depth".into(),
                SubscriptionOptions::default(),
            )],
            Properties::default(),
        )
        .await
        .unwrap();

    let (mut p, _) = Client::connect(ConnectOptions::new(
        server.mqtt_addr().to_string(),
        "deep-pub",
    ))
    .await
    .unwrap();
    for n in 0..12u8 {
        let msg = Publish {
            dup: false,
            qos: QoS::AtLeastOnce,
            retain: false,
            topic: "deep/q".into(),
            packet_id: None,
            properties: Properties::default(),
            payload: Bytes::from(vec![n]),
        };
        p.publish(msg).await.unwrap();
    }
    let raised = published(&mut watch, true).await;
    let list = listed(&server, true).await;
    assert_eq!(list["since"], raised["since"]);
    assert!(
        list["message"]
            .as_str()
            .unwrap()
            .contains("\"deep\" holds 12"),
        "{list}"
    );
    assert_eq!(
        metric(&server, "ferrymq_alarm_active{name=\"queue_depth\"}").await,
        1
    );

    // The session comes back and acknowledges everything: the alarm clears.
    let (mut sub, _) = Client::connect(durable(&server, "deep", false))
        .await
        .unwrap();
    let mut got = 0;
    while got < 12 {
        if let Packet::Publish(m) = sub.recv().await.unwrap() {
            sub.queue_ack(&m).unwrap();
            sub.flush().await.unwrap();
            got += 1;
        }
    }
    let cleared = published(&mut watch, false).await;
    let list = listed(&server, false).await;
    assert_eq!(list["cleared"], cleared["cleared"]);
    assert_eq!(
        metric(&server, "ferrymq_alarm_active{name=\"queue_depth\"}").await,
        0
    );
}
