//! A persistent session keeps its subscriptions and queues QoS 1 messages while offline.

use std::time::Duration;

use crate::common::*;
use rumqttc::QoS;

#[tokio::test]
async fn persistent_session_receives_what_was_published_while_offline() {
    let server = start().await;
    let mut o = v4_options(&server, "resume-sub");
    o.set_clean_session(false);
    let mut sub = v4(o.clone()).await;
    sub.subscribe("jobs/#", QoS::AtLeastOnce).await;
    sub.client.disconnect().await.unwrap();
    offline(&server).await;

    let mut p = v4(v4_options(&server, "resume-pub")).await;
    for i in 0..20 {
        p.client
            .publish(format!("jobs/{i}"), QoS::AtLeastOnce, false, format!("{i}"))
            .await
            .unwrap();
    }
    // Every PUBACK back: all 20 are queued for the offline session.
    p.acked(20).await;

    let mut sub = v4(o).await;
    for i in 0..20 {
        let g = next(&mut sub.rx).await;
        assert_eq!(g.payload, format!("{i}").as_bytes(), "in order, none lost");
    }
}

#[tokio::test]
async fn clean_session_forgets_subscriptions() {
    let server = start().await;
    let mut o = v4_options(&server, "forget");
    o.set_clean_session(false);
    let mut sub = v4(o.clone()).await;
    sub.subscribe("t", QoS::AtLeastOnce).await;
    sub.client.disconnect().await.unwrap();
    offline(&server).await;
    o.set_clean_session(true);
    let mut sub = v4(o).await;
    let p = v4(v4_options(&server, "forget-pub")).await;
    p.client
        .publish("t", QoS::AtLeastOnce, false, "x")
        .await
        .unwrap();
    nothing(&mut sub.rx, Duration::from_millis(400)).await;
}

/// Waits until the server has seen the only connection go.
async fn offline(server: &ferrymq_server::Server) {
    eventually("the subscriber's DISCONNECT processed", || async {
        metric(server, "ferrymq_connections ").await == 0
    })
    .await;
}
