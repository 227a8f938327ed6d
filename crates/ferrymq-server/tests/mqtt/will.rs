//! Will messages: published when a client vanishes, not when it disconnects normally.

use std::time::Duration;

use crate::common::*;
use ferrymq_mqtt::ProtocolVersion;
use rumqttc::QoS;

#[tokio::test]
async fn will_is_published_when_the_connection_drops() {
    let server = start().await;
    let mut watcher = v4(v4_options(&server, "will-watch")).await;
    watcher.subscribe("lwt/#", QoS::AtLeastOnce).await;

    // A raw client with a will drops its socket without DISCONNECT.
    let mut raw = Raw::connect(&server, ProtocolVersion::V311).await;
    let Ok(ferrymq_mqtt::Packet::Connect(mut c)) =
        Ok::<_, ()>(connect_packet("dying", ProtocolVersion::V311))
    else {
        unreachable!()
    };
    c.will = Some(ferrymq_mqtt::Will {
        topic: "lwt/dying".into(),
        payload: "offline".into(),
        qos: ferrymq_mqtt::QoS::AtLeastOnce,
        retain: false,
        properties: Default::default(),
    });
    raw.send(&ferrymq_mqtt::Packet::Connect(c)).await;
    assert!(matches!(
        raw.recv().await,
        Some(ferrymq_mqtt::Packet::ConnAck(_))
    ));
    drop(raw);
    let g = next(&mut watcher.rx).await;
    assert_eq!(
        (g.topic.as_str(), &g.payload[..]),
        ("lwt/dying", &b"offline"[..])
    );

    // A client that disconnects normally leaves no will.
    let mut o = v4_options(&server, "polite");
    o.set_last_will(rumqttc::LastWill::new(
        "lwt/polite",
        "offline",
        QoS::AtLeastOnce,
        false,
    ));
    let polite = v4(o).await;
    polite.client.disconnect().await.unwrap();
    nothing(&mut watcher.rx, Duration::from_millis(500)).await;
}
