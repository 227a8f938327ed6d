//! Outbound topic aliases: a 5.0 client that allows them gets the topic once, then the alias.

use crate::common::*;
use ferrymq_mqtt::{Packet, ProtocolVersion, QoS, Subscribe, SubscriptionOptions};

#[tokio::test]
async fn repeated_topic_is_sent_as_an_alias() {
    let server = start().await;
    let mut raw = Raw::connect(&server, ProtocolVersion::V5).await;
    let Packet::Connect(mut c) = connect_packet("aliased", ProtocolVersion::V5) else {
        unreachable!()
    };
    c.properties.topic_alias_maximum = Some(2);
    raw.send(&Packet::Connect(c)).await;
    assert!(matches!(raw.recv().await, Some(Packet::ConnAck(_))));
    let opts = SubscriptionOptions {
        qos: QoS::AtMostOnce,
        ..Default::default()
    };
    raw.send(&Packet::Subscribe(Subscribe {
        packet_id: 1,
        filters: vec![("alias/#".into(), opts)],
        properties: Default::default(),
    }))
    .await;
    assert!(matches!(raw.recv().await, Some(Packet::SubAck(_))));
    let publisher = v4(v4_options(&server, "alias-pub")).await;
    for t in ["alias/a", "alias/a", "alias/b", "alias/c", "alias/c"] {
        publisher
            .client
            .publish(t, rumqttc::QoS::AtMostOnce, false, "x")
            .await
            .unwrap();
    }
    let mut seen = Vec::new();
    for _ in 0..5 {
        let Some(Packet::Publish(p)) = raw.recv().await else {
            panic!("expected PUBLISH")
        };
        seen.push((p.topic, p.properties.topic_alias));
    }
    assert_eq!(
        seen,
        vec![
            ("alias/a".to_string(), Some(1)),
            (String::new(), Some(1)),
            ("alias/b".to_string(), Some(2)),
            // Both aliases in use: the topic goes in full.
            ("alias/c".to_string(), None),
            ("alias/c".to_string(), None),
        ]
    );
}

#[tokio::test]
async fn client_without_alias_maximum_gets_full_topics() {
    let server = start().await;
    let mut sub = v5(v5_options(&server, "no-alias")).await;
    sub.subscribe("plain/#", rumqttc::v5::mqttbytes::QoS::AtMostOnce)
        .await;
    let p = v4(v4_options(&server, "plain-pub")).await;
    for _ in 0..3 {
        p.client
            .publish("plain/t", rumqttc::QoS::AtMostOnce, false, "x")
            .await
            .unwrap();
    }
    for _ in 0..3 {
        assert_eq!(next(&mut sub.rx).await.topic, "plain/t");
    }
}
