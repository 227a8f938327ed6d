//! `$SYS/` topics are published periodically and hidden from `#`.

use std::time::Duration;

use crate::common::*;
use rumqttc::QoS;

#[tokio::test]
async fn sys_topics_are_published_and_not_matched_by_hash() {
    let mut config = test_config();
    config.sys.interval_secs = 1;
    let server = start_with(config).await;
    let mut all = v4(v4_options(&server, "hash")).await;
    // SUBACK first, so that the silence on `#` below means something.
    all.subscribe("#", QoS::AtMostOnce).await;
    let mut sys = v4(v4_options(&server, "sys")).await;
    sys.subscribe("$SYS/broker/#", QoS::AtMostOnce).await;
    // The retained values replayed on subscribe may predate our clients; the periodic
    // refresh brings them up to date.
    let mut topics = std::collections::BTreeMap::new();
    while topics.len() < 11 || topics["$SYS/broker/clients/connected"] != "2" {
        let g = next(&mut sys.rx).await;
        topics.insert(g.topic, String::from_utf8(g.payload.to_vec()).unwrap());
    }
    assert!(topics["$SYS/broker/version"].starts_with("ferrymq "));
    assert_eq!(topics["$SYS/broker/clients/connected"], "2");
    for key in [
        "uptime",
        "messages/received",
        "messages/sent",
        "bytes/received",
        "bytes/sent",
        "subscriptions/count",
        "retained messages/count",
    ] {
        assert!(
            topics.contains_key(&format!("$SYS/broker/{key}")),
            "missing {key}"
        );
    }
    nothing(&mut all.rx, Duration::from_millis(1500)).await;
}
