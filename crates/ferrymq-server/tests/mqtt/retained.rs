//! Retained messages: stored, replayed to new subscribers with RETAIN set, cleared by an
//! empty payload.

use std::time::Duration;

use crate::common::*;
use rumqttc::QoS;

#[tokio::test]
async fn retained_message_is_replayed_and_cleared() {
    let server = start().await;
    let mut p = v4(v4_options(&server, "ret-pub")).await;
    p.client
        .publish("status/door", QoS::AtLeastOnce, true, "open")
        .await
        .unwrap();
    // PUBACK: the retained message is stored.
    p.acked(1).await;

    let mut a = v4(v4_options(&server, "ret-a")).await;
    a.subscribe("status/+", QoS::AtLeastOnce).await;
    let g = next(&mut a.rx).await;
    assert_eq!(
        (g.topic.as_str(), &g.payload[..], g.retain),
        ("status/door", &b"open"[..], true)
    );

    p.client
        .publish("status/door", QoS::AtLeastOnce, true, Vec::<u8>::new())
        .await
        .unwrap();
    // Subscribers get the clearing message itself, live (RETAIN cleared on live delivery).
    let g = next(&mut a.rx).await;
    assert!(g.payload.is_empty() && !g.retain);
    p.acked(1).await;

    let mut b = v4(v4_options(&server, "ret-b")).await;
    b.subscribe("status/#", QoS::AtLeastOnce).await;
    nothing(&mut b.rx, Duration::from_millis(400)).await;
    assert_eq!(metric(&server, "ferrymq_retained_messages").await, 0);
}
