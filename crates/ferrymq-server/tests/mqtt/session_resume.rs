//! A persistent session keeps its subscriptions and queues QoS 1 messages while offline.

use std::time::Duration;

use crate::common::*;
use rumqttc::QoS;

#[tokio::test]
async fn persistent_session_receives_what_was_published_while_offline() {
    let server = start().await;
    let mut o = v4_options(&server, "resume-sub");
    o.set_clean_session(false);
    let sub = v4(o.clone()).await;
    sub.client
        .subscribe("jobs/#", QoS::AtLeastOnce)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    sub.client.disconnect().await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;

    let p = v4(v4_options(&server, "resume-pub")).await;
    for i in 0..20 {
        p.client
            .publish(format!("jobs/{i}"), QoS::AtLeastOnce, false, format!("{i}"))
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(300)).await;

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
    let sub = v4(o.clone()).await;
    sub.client.subscribe("t", QoS::AtLeastOnce).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    sub.client.disconnect().await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    o.set_clean_session(true);
    let mut sub = v4(o).await;
    let p = v4(v4_options(&server, "forget-pub")).await;
    p.client
        .publish("t", QoS::AtLeastOnce, false, "x")
        .await
        .unwrap();
    nothing(&mut sub.rx, Duration::from_millis(400)).await;
}
