//! Retained messages: stored, replayed to new subscribers with RETAIN set, cleared by an
//! empty payload.

use std::time::Duration;

use crate::common::*;
use rumqttc::QoS;

#[tokio::test]
async fn retained_message_is_replayed_and_cleared() {
    let server = start().await;
    let p = v4(v4_options(&server, "ret-pub")).await;
    p.client
        .publish("status/door", QoS::AtLeastOnce, true, "open")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;

    let mut a = v4(v4_options(&server, "ret-a")).await;
    a.client
        .subscribe("status/+", QoS::AtLeastOnce)
        .await
        .unwrap();
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
    tokio::time::sleep(Duration::from_millis(200)).await;

    let mut b = v4(v4_options(&server, "ret-b")).await;
    b.client
        .subscribe("status/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    nothing(&mut b.rx, Duration::from_millis(400)).await;
    assert_eq!(metric(&server, "ferrymq_retained_messages").await, 0);
}
