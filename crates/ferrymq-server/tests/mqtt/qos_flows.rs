//! QoS 0/1/2 both ways with rumqttc, in both protocol versions, with downgrade to the
//! subscription's QoS.

use crate::common::*;
use rumqttc::QoS;

#[tokio::test]
async fn qos_levels_round_trip_v311() {
    let server = start().await;
    let mut sub = v4(v4_options(&server, "q-sub")).await;
    sub.subscribe("q/2", QoS::ExactlyOnce).await;
    sub.subscribe("q/1", QoS::AtLeastOnce).await;
    let p = v4(v4_options(&server, "q-pub")).await;
    for i in 0..50u32 {
        p.client
            .publish("q/2", QoS::ExactlyOnce, false, i.to_be_bytes().to_vec())
            .await
            .unwrap();
    }
    p.client
        .publish("q/1", QoS::ExactlyOnce, false, "down")
        .await
        .unwrap();
    for i in 0..50u32 {
        let g = next(&mut sub.rx).await;
        assert_eq!(
            (g.topic.as_str(), g.qos, &g.payload[..]),
            ("q/2", 2, &i.to_be_bytes()[..])
        );
    }
    let g = next(&mut sub.rx).await;
    assert_eq!(
        (g.topic.as_str(), g.qos),
        ("q/1", 1),
        "QoS 2 publish downgraded to the subscription's QoS 1"
    );
}

#[tokio::test]
async fn qos_levels_round_trip_v5() {
    use rumqttc::v5::mqttbytes::QoS as Q5;
    let server = start().await;
    let mut sub = v5(v5_options(&server, "q5-sub")).await;
    sub.subscribe("q5/#", Q5::ExactlyOnce).await;
    let p = v5(v5_options(&server, "q5-pub")).await;
    for (i, q) in [Q5::AtMostOnce, Q5::AtLeastOnce, Q5::ExactlyOnce]
        .into_iter()
        .enumerate()
    {
        p.client
            .publish(format!("q5/{i}"), q, false, vec![i as u8])
            .await
            .unwrap();
    }
    let mut got = vec![];
    for _ in 0..3 {
        let g = next(&mut sub.rx).await;
        got.push((g.topic, g.qos));
    }
    got.sort();
    assert_eq!(
        got,
        vec![
            ("q5/0".to_string(), 0),
            ("q5/1".into(), 1),
            ("q5/2".into(), 2)
        ]
    );
    nothing(&mut sub.rx, std::time::Duration::from_millis(300)).await;
}
