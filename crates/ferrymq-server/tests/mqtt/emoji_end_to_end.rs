//! 4-byte UTF-8 (emoji) topics and payloads travel end to end, in 3.1.1 and 5.0.

use crate::common::*;
use rumqttc::QoS;

#[tokio::test]
async fn emoji_topics_and_payloads_round_trip_v311() {
    let server = start().await;
    let mut sub = v4(v4_options(&server, "emoji-sub")).await;
    sub.subscribe("home/😀/+", QoS::AtLeastOnce).await;
    let publisher = v4(v4_options(&server, "emoji-pub")).await;
    publisher
        .client
        .publish(
            "home/😀/🌡️",
            QoS::AtLeastOnce,
            false,
            "21.5°C 🔥".as_bytes(),
        )
        .await
        .unwrap();
    let got = next(&mut sub.rx).await;
    assert_eq!(got.topic, "home/😀/🌡️");
    assert_eq!(&got.payload[..], "21.5°C 🔥".as_bytes());
}

#[tokio::test]
async fn emoji_topics_and_user_properties_round_trip_v5() {
    let server = start().await;
    let mut sub = v5(v5_options(&server, "emoji-sub5")).await;
    sub.subscribe("🚀/#", rumqttc::v5::mqttbytes::QoS::AtMostOnce)
        .await;
    let publisher = v5(v5_options(&server, "emoji-pub5")).await;
    let props = rumqttc::v5::mqttbytes::v5::PublishProperties {
        user_properties: vec![
            ("😀".into(), "🎉".into()),
            ("k".into(), "1".into()),
            ("k".into(), "2".into()),
        ],
        ..Default::default()
    };
    publisher
        .client
        .publish_with_properties(
            "🚀/launch",
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            false,
            "𝄞 music",
            props,
        )
        .await
        .unwrap();
    let got = next(&mut sub.rx).await;
    assert_eq!(got.topic, "🚀/launch");
    assert_eq!(&got.payload[..], "𝄞 music".as_bytes());
    // User properties pass through unchanged and in order.
    assert_eq!(
        got.user_properties,
        vec![
            ("😀".to_string(), "🎉".to_string()),
            ("k".into(), "1".into()),
            ("k".into(), "2".into())
        ]
    );
}
