//! Shared subscriptions spread messages evenly over the group's members.

use std::time::Duration;

use crate::common::*;
use rumqttc::QoS;

#[tokio::test]
async fn shared_group_members_split_the_stream() {
    let server = start().await;
    let mut members = Vec::new();
    for i in 0..3 {
        let mut m = v4(v4_options(&server, &format!("worker-{i}"))).await;
        m.subscribe("$share/workers/tasks/+", QoS::AtLeastOnce)
            .await;
        members.push(m);
    }
    let mut plain = v4(v4_options(&server, "observer")).await;
    plain.subscribe("tasks/+", QoS::AtLeastOnce).await;
    let p = v4(v4_options(&server, "producer")).await;
    for i in 0..60 {
        p.client
            .publish(format!("tasks/{i}"), QoS::AtLeastOnce, false, "job")
            .await
            .unwrap();
    }
    for _ in 0..60 {
        next(&mut plain.rx).await;
    }
    let mut counts = Vec::new();
    for m in &mut members {
        let mut n = 0;
        while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(300), m.rx.recv()).await
        {
            n += 1;
        }
        counts.push(n);
    }
    assert_eq!(
        counts.iter().sum::<usize>(),
        60,
        "each message to exactly one member: {counts:?}"
    );
    assert!(
        counts.iter().all(|&n| n == 20),
        "even distribution: {counts:?}"
    );
}
