//! `/health` and `/metrics` answer over HTTP and count what happened.

use crate::common::*;
use rumqttc::QoS;

#[tokio::test]
async fn health_and_metrics() {
    let server = start().await;
    let (status, body) = http_get(&server, "/health").await;
    assert_eq!(status, 200);
    assert!(body.contains("\"status\":\"ok\""), "{body}");

    let mut sub = v4(v4_options(&server, "m-sub")).await;
    sub.subscribe("m/#", QoS::AtLeastOnce).await;
    let p = v4(v4_options(&server, "m-pub")).await;
    for _ in 0..5 {
        p.client
            .publish("m/x", QoS::AtLeastOnce, false, "12345")
            .await
            .unwrap();
    }
    for _ in 0..5 {
        next(&mut sub.rx).await;
    }
    assert_eq!(
        metric(&server, "ferrymq_messages_received_total{qos=\"1\"}").await,
        5
    );
    assert_eq!(
        metric(&server, "ferrymq_messages_sent_total{qos=\"1\"}").await,
        5
    );
    assert_eq!(metric(&server, "ferrymq_connections ").await, 2);
    assert_eq!(metric(&server, "ferrymq_subscriptions").await, 1);
    assert!(metric(&server, "ferrymq_bytes_received_total").await > 25);
    let (status, _) = http_get(&server, "/nope").await;
    assert_eq!(status, 404);
}

/// `/api/v1/alarms` lists every known alarm, and `/metrics` exports each at 0 while quiet, so
/// a dashboard finds them before they fire.
#[tokio::test]
async fn every_alarm_is_listed_and_exported_while_quiet() {
    let server = start().await;
    let (status, body) = http_get(&server, "/api/v1/alarms").await;
    assert_eq!(status, 200);
    for name in [
        "memory_high_watermark",
        "disk_low",
        "queue_depth",
        "slow_subscriber",
        "dlq_growth",
    ] {
        assert!(
            body.contains(&format!("\"name\":\"{name}\"")),
            "{name} in {body}"
        );
        let sample = format!("ferrymq_alarm_active{{name=\"{name}\"}}");
        assert_eq!(metric(&server, &sample).await, 0, "{sample}");
    }
    assert!(!body.contains("\"active\":true"), "{body}");
}
