//! The REST views (`/api/v1/overview`, `clients`, `subscriptions`, `topics`, `retained`) and
//! `/ready`, against real clients: what they list matches what the clients did, pages follow
//! their cursors, and the two actions (disconnect a client, delete a retained message) reach
//! the clients.

use crate::common::*;
use rumqttc::v5::mqttbytes::QoS as Q5;
use rumqttc::QoS;

/// Every item of a paged listing, following `next_cursor`.
async fn all(server: &ferrymq_server::Server, path: &str) -> (Vec<serde_json::Value>, usize) {
    let (mut items, mut pages, mut cursor) = (Vec::new(), 0, None::<String>);
    loop {
        let sep = if path.contains('?') { '&' } else { '?' };
        let url = match &cursor {
            Some(c) => format!("{path}{sep}cursor={}", urlencode(c)),
            None => path.to_string(),
        };
        let (status, body) = api(server, "GET", &url, None).await;
        assert_eq!(status, 200, "{url}: {body}");
        pages += 1;
        items.extend(body["items"].as_array().unwrap().iter().cloned());
        match body["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => return (items, pages),
        }
        assert!(pages < 100);
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[tokio::test]
async fn clients_subscriptions_topics_and_retained_are_listed_shown_and_acted_on() {
    let server = start().await;
    let (status, ready) = api(&server, "GET", "/ready", None).await;
    assert_eq!((status, ready["status"].as_str()), (200, Some("ready")));

    let mut a = v4(v4_options(&server, "view-a")).await;
    a.subscribe("t/#", QoS::AtLeastOnce).await;
    a.subscribe("$share/g/s/+", QoS::AtMostOnce).await;
    let mut b = v5(v5_options(&server, "view-b")).await;
    b.subscribe("t/#", Q5::AtMostOnce).await;
    let mut c = Raw::connected(&server, "view-c", ferrymq_mqtt::ProtocolVersion::V5).await;
    c.subscribe(1, &[("c/only", ferrymq_mqtt::QoS::AtMostOnce)])
        .await;
    let p = v4(v4_options(&server, "view-p")).await;
    p.client
        .publish("r/text", QoS::AtLeastOnce, true, "hello")
        .await
        .unwrap();
    p.client
        .publish("r/bin", QoS::AtLeastOnce, true, vec![0xff, 0x00, 0xfe])
        .await
        .unwrap();
    eventually("both retained", || async {
        api(&server, "GET", "/api/v1/overview", None).await.1["retained"] == 2
    })
    .await;

    let (_, overview) = api(&server, "GET", "/api/v1/overview", None).await;
    assert_eq!(overview["connections"], 4, "{overview}");
    assert_eq!(overview["subscriptions"], 4, "{overview}");

    let (clients, pages) = all(&server, "/api/v1/clients?limit=2").await;
    assert_eq!(pages, 2);
    let ids: Vec<&str> = clients
        .iter()
        .map(|c| c["client_id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, vec!["view-a", "view-b", "view-c", "view-p"]);
    assert_eq!(clients[1]["protocol"], "5.0");
    assert_eq!(clients[0]["protocol"], "3.1.1");
    assert_eq!(clients[0]["subscriptions"], 2);
    let (found, _) = all(&server, "/api/v1/clients?search=w-b").await;
    assert_eq!(found.len(), 1);
    assert_eq!(found[0]["client_id"], "view-b");

    let (status, one) = api(&server, "GET", "/api/v1/clients/view-a", None).await;
    assert_eq!(status, 200);
    let filters: Vec<&str> = one["subscriptions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["filter"].as_str().unwrap())
        .collect();
    assert_eq!(filters, vec!["$share/g/s/+", "t/#"]);
    assert_eq!(one["subscriptions"][0]["group"], "g");
    let (status, _) = api(&server, "GET", "/api/v1/clients/nobody", None).await;
    assert_eq!(status, 404);
    // Where each connection came from, as the router kept it from the CONNECT.
    let (_, raw) = api(&server, "GET", "/api/v1/clients/view-c", None).await;
    let local = c.stream.local_addr().unwrap().to_string();
    assert_eq!(
        (&raw["address"], &raw["listener"], &raw["protocol"]),
        (
            &serde_json::json!(local),
            &serde_json::json!("mqtt"),
            &serde_json::json!("5.0")
        ),
        "{raw}"
    );
    assert_eq!(clients[0]["listener"], "mqtt");
    for (protocol, n) in [("3.1.1", 2), ("5.0", 2)] {
        let sample =
            format!("ferrymq_client_connections{{listener=\"mqtt\",protocol=\"{protocol}\"}}");
        assert_eq!(metric(&server, &sample).await, n, "{sample}");
    }

    let (subs, _) = all(&server, "/api/v1/subscriptions?limit=1").await;
    assert_eq!(subs.len(), 4);
    let (only_a, _) = all(&server, "/api/v1/subscriptions?client_id=view-a").await;
    assert_eq!(only_a.len(), 2);
    let (topics, _) = all(&server, "/api/v1/topics").await;
    let counts: Vec<(String, u64)> = topics
        .iter()
        .map(|t| {
            (
                t["filter"].as_str().unwrap().to_string(),
                t["subscriptions"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        counts,
        vec![("c/only".into(), 1), ("s/+".into(), 1), ("t/#".into(), 2)]
    );

    let (retained, _) = all(&server, "/api/v1/retained").await;
    let topics: Vec<&str> = retained
        .iter()
        .map(|m| m["topic"].as_str().unwrap())
        .collect();
    assert_eq!(topics, vec!["r/bin", "r/text"]);
    let (status, text) = api(&server, "GET", "/api/v1/retained/r/text", None).await;
    assert_eq!((status, text["payload"].as_str()), (200, Some("hello")));
    let (_, bin) = api(&server, "GET", "/api/v1/retained/r/bin", None).await;
    assert_eq!(bin["payload_base64"], "/wD+");
    let (status, _) = api(&server, "DELETE", "/api/v1/retained/r/text", None).await;
    assert_eq!(status, 200);
    let (status, _) = api(&server, "DELETE", "/api/v1/retained/r/text", None).await;
    assert_eq!(status, 404, "only once");
    // A new subscriber gets only what is still retained.
    let mut late = v4(v4_options(&server, "view-late")).await;
    late.subscribe("r/#", QoS::AtMostOnce).await;
    let got = next(&mut late.rx).await;
    assert_eq!(got.topic, "r/bin");
    nothing(&mut late.rx, std::time::Duration::from_millis(300)).await;

    // An admin disconnect reaches the 5.0 client as DISCONNECT 0x98.
    let (status, _) = api(&server, "DELETE", "/api/v1/clients/view-c", None).await;
    assert_eq!(status, 200);
    let last = c.until_closed().await;
    assert!(
        matches!(
            last.as_slice(),
            [ferrymq_mqtt::Packet::Disconnect(d)]
                if d.reason == ferrymq_mqtt::ReasonCode::AdministrativeAction
        ),
        "{last:?}"
    );
    eventually("view-c is gone", || async {
        api(&server, "GET", "/api/v1/clients/view-c", None).await.0 == 404
    })
    .await;
    let (status, _) = api(&server, "DELETE", "/api/v1/clients/nobody", None).await;
    assert_eq!(status, 404);

    // Bad parameters are named.
    let (status, err) = api(&server, "GET", "/api/v1/clients?limit=0", None).await;
    assert_eq!((status, err["field"].as_str()), (400, Some("limit")));
    let (status, err) = api(&server, "GET", "/api/v1/clients?sort=x", None).await;
    assert_eq!((status, err["field"].as_str()), (400, Some("sort")));
    drop((a, b, p));
    server.shutdown().await;
}
