//! `mqtt.max_subscriptions_per_client`: a SUBSCRIBE past the quota is refused with 0x97 Quota
//! exceeded (3.1.1: 0x80), per filter; renewing an existing subscription is not a new one.

use crate::common::*;
use ferrymq_mqtt::{Packet, ProtocolVersion, QoS, Unsubscribe};

#[tokio::test]
async fn subscriptions_past_the_quota_get_0x97() {
    let mut config = test_config();
    config.mqtt.max_subscriptions_per_client = 2;
    let server = start_with(config).await;
    let q1 = QoS::AtLeastOnce;

    let mut raw = Raw::connected(&server, "quota5", ProtocolVersion::V5).await;
    let codes = raw.subscribe(1, &[("a", q1), ("b", q1), ("c", q1)]).await;
    assert_eq!(codes, vec![0x01, 0x01, 0x97]);
    // Subscribing again to a filter it holds replaces it: still two, accepted.
    assert_eq!(
        raw.subscribe(2, &[("a", QoS::AtMostOnce)]).await,
        vec![0x00]
    );
    assert_eq!(raw.subscribe(3, &[("d", q1)]).await, vec![0x97]);
    raw.send(&Packet::Unsubscribe(Unsubscribe {
        packet_id: 4,
        filters: vec!["b".into()],
        properties: Default::default(),
    }))
    .await;
    assert!(matches!(raw.recv().await, Some(Packet::UnsubAck(_))));
    assert_eq!(
        raw.subscribe(5, &[("d", q1)]).await,
        vec![0x01],
        "room again"
    );
    assert_eq!(metric(&server, "ferrymq_subscriptions").await, 2);

    let mut v3 = Raw::connected(&server, "quota3", ProtocolVersion::V311).await;
    let codes = v3.subscribe(1, &[("a", q1), ("b", q1), ("c", q1)]).await;
    assert_eq!(
        codes,
        vec![0x01, 0x01, 0x80],
        "3.1.1 has only 0x80 for a refusal"
    );
}
