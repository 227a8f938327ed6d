//! `mqtt.max_queued_messages`: an offline durable session queues at most that many QoS 1/2
//! messages; the rest are dropped and counted as `ferrymq_messages_dropped_total{reason="queue_full"}`.

use std::time::Duration;

use crate::common::*;
use rumqttc::QoS;

#[tokio::test]
async fn offline_session_keeps_the_first_max_queued_messages_and_counts_the_rest() {
    let mut config = test_config();
    config.mqtt.max_queued_messages = 5;
    let server = start_with(config).await;
    let mut o = v4_options(&server, "queue-sub");
    o.set_clean_session(false);
    let mut sub = v4(o.clone()).await;
    sub.subscribe("q/#", QoS::AtLeastOnce).await;
    sub.client.disconnect().await.unwrap();
    eventually("the subscriber is offline", || async {
        metric(&server, "ferrymq_connections ").await == 0
    })
    .await;

    let mut p = v4(v4_options(&server, "queue-pub")).await;
    for i in 0..8 {
        p.client
            .publish(format!("q/{i}"), QoS::AtLeastOnce, false, format!("{i}"))
            .await
            .unwrap();
    }
    // All eight acknowledged: each was queued or dropped by now.
    p.acked(8).await;
    assert_eq!(
        metric(
            &server,
            "ferrymq_messages_dropped_total{reason=\"queue_full\"}"
        )
        .await,
        3
    );

    let mut sub = v4(o).await;
    for i in 0..5 {
        let g = next(&mut sub.rx).await;
        assert_eq!(
            g.payload,
            format!("{i}").as_bytes(),
            "the oldest five, in order"
        );
    }
    nothing(&mut sub.rx, Duration::from_millis(400)).await;
}
