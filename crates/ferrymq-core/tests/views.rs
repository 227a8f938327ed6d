//! The admin views (`ferrymq_core::views`): pages through clients, subscriptions, filters and
//! retained messages from cursors, the bounded search, and the two admin actions, checked
//! against what the engine holds, across a restart from the journal.

#![allow(clippy::unwrap_used)]

mod wq;

use bytes::Bytes;
use ferrymq_core::views::SEARCH_SCAN;
use ferrymq_core::*;
use ferrymq_mqtt::*;
use wq::*;

fn retain(h: &mut H, conn: u64, topic: &str, payload: &str) {
    let p = Publish {
        dup: false,
        qos: QoS::AtMostOnce,
        retain: true,
        topic: topic.into(),
        packet_id: None,
        properties: Properties::default(),
        payload: Bytes::from(payload.to_string()),
    };
    h.packet(conn, Packet::Publish(p));
}

/// Every page of a listing, following its cursors.
fn all_pages<T>(mut page: impl FnMut(Option<&str>) -> views::Page<T>) -> (Vec<T>, usize) {
    let (mut items, mut pages, mut cursor) = (Vec::new(), 0, None::<String>);
    loop {
        let p = page(cursor.as_deref());
        pages += 1;
        items.extend(p.items);
        match p.next {
            Some(n) => cursor = Some(n),
            None => return (items, pages),
        }
        assert!(pages < 10_000, "cursors go forward");
    }
}

#[test]
fn clients_page_in_client_id_order_and_search_is_bounded() {
    let mut h = H::new();
    for i in 0..250u64 {
        h.connect(100 + i, &format!("dev-{:03}", 249 - i), V5, 10, i % 2 == 0);
    }
    h.connect(1, "other", V3, 10, false);
    let (clients, pages) = all_pages(|c| h.b.clients(c, 40, None));
    assert_eq!(pages, 7);
    let ids: Vec<&str> = clients.iter().map(|c| &*c.client_id).collect();
    let mut want: Vec<String> = (0..250).map(|i| format!("dev-{i:03}")).collect();
    want.push("other".into());
    assert_eq!(ids, want);
    assert!(clients.iter().all(|c| c.connected));
    let (found, _) = all_pages(|c| h.b.clients(c, 1000, Some("-1")));
    assert_eq!(found.len(), 100, "dev-100 to dev-199");
    assert!(found.iter().all(|c| c.client_id.contains("-1")));
    let one = h.b.client("other").unwrap();
    assert_eq!((one.version, one.session_expiry), (V3, 0));
    assert!(h.b.client("nobody").is_none());
}

#[test]
fn a_search_that_finds_nothing_answers_after_a_bounded_scan_with_a_cursor() {
    let mut h = H::new();
    let n = SEARCH_SCAN + 500;
    for i in 0..n as u64 {
        h.connect(10 + i, &format!("c{i:06}"), V5, 10, false);
    }
    let first = h.b.clients(None, 10, Some("zzz"));
    assert!(first.items.is_empty());
    assert_eq!(
        first.next.as_deref(),
        Some(&*format!("c{:06}", SEARCH_SCAN - 1))
    );
    let second = h.b.clients(first.next.as_deref(), 10, Some("zzz"));
    assert!(second.items.is_empty() && second.next.is_none());
}

#[test]
fn subscriptions_and_filters_page_and_follow_unsubscribes() {
    let mut h = H::new();
    for (conn, id, durable) in [(1, "a", true), (2, "b", true), (3, "c", false)] {
        h.connect(conn, id, V5, 10, durable);
    }
    for f in ["x/1", "x/2", "y/#", "$share/g/z/+"] {
        h.subscribe(1, f, QoS::AtLeastOnce);
        h.subscribe(2, f, QoS::AtMostOnce);
    }
    h.subscribe(3, "x/1", QoS::ExactlyOnce);
    let (subs, pages) = all_pages(|c| h.b.subscriptions(None, c, 3));
    assert_eq!(pages, 3);
    let got: Vec<(String, String)> = subs
        .iter()
        .map(|s| (s.client_id.to_string(), s.filter.clone()))
        .collect();
    let mut want = Vec::new();
    for c in ["a", "b"] {
        for f in ["$share/g/z/+", "x/1", "x/2", "y/#"] {
            want.push((c.to_string(), f.to_string()));
        }
    }
    want.push(("c".into(), "x/1".into()));
    assert_eq!(got, want);
    let shared = subs
        .iter()
        .find(|s| s.filter.starts_with("$share"))
        .unwrap();
    assert_eq!(shared.group.as_deref(), Some("g"));
    let only_b = h.b.subscriptions(Some("b"), None, 100);
    assert_eq!((only_b.items.len(), only_b.next), (4, None));

    let (filters, _) = all_pages(|c| h.b.filters(c, 2));
    let counts: Vec<(String, u32)> = filters
        .into_iter()
        .map(|f| (f.filter, f.subscriptions))
        .collect();
    assert_eq!(
        counts,
        vec![
            ("x/1".into(), 3),
            ("x/2".into(), 2),
            ("y/#".into(), 2),
            ("z/+".into(), 2)
        ]
    );
    h.packet(
        2,
        Packet::Unsubscribe(Unsubscribe {
            packet_id: 9,
            filters: vec!["x/2".into()],
            properties: Properties::default(),
        }),
    );
    // A session that ends takes its subscriptions with it.
    h.b.closed(ConnId(3), h.now, &mut h.out);
    let counts: Vec<(String, u32)> =
        h.b.filters(None, 100)
            .items
            .into_iter()
            .map(|f| (f.filter, f.subscriptions))
            .collect();
    assert_eq!(counts[..2], [("x/1".into(), 2), ("x/2".into(), 1)]);
}

#[test]
fn retained_messages_page_in_level_order_and_a_delete_is_journaled() {
    let mut h = H::new();
    h.connect(1, "p", V5, 10, false);
    let topics = ["b", "a/c", "a", "a/b/c", "a-b", "a/b", "c/d/e/f", "$app/x"];
    for t in topics {
        retain(&mut h, 1, t, &format!("payload of {t}"));
    }
    let (all, pages) = all_pages(|c| h.b.retained_page(c, 3));
    assert!(pages >= 3);
    let order: Vec<&str> = all.iter().map(|m| &*m.topic).collect();
    // Level by level: a node before the levels below it, siblings in byte order.
    assert_eq!(
        order,
        vec!["$app/x", "a", "a/b", "a/b/c", "a/c", "a-b", "b", "c/d/e/f"]
    );
    assert_eq!(
        &h.b.retained_message("a/b/c").unwrap().payload[..],
        b"payload of a/b/c"
    );
    // A cursor naming a topic that is gone still resumes after it.
    let after_gone = h.b.retained_page(Some("a/bb"), 100);
    let order: Vec<&str> = after_gone.items.iter().map(|m| &*m.topic).collect();
    assert_eq!(order, vec!["a/c", "a-b", "b", "c/d/e/f"]);

    assert!(h.b.delete_retained("a/b", h.now, &mut h.out));
    assert!(!h.b.delete_retained("a/b", h.now, &mut h.out), "only once");
    assert!(h.b.retained_message("a/b").is_none());
    assert!(
        h.b.retained_message("a/b/c").is_some(),
        "the levels below stay"
    );
    h.restart();
    assert!(
        h.b.retained_message("a/b").is_none(),
        "the delete was journaled"
    );
    assert_eq!(h.b.retained_page(None, 100).items.len(), topics.len() - 1);
}

#[test]
fn an_admin_disconnect_closes_the_connection_with_0x98_and_publishes_the_will() {
    let mut h = H::new();
    h.connect(1, "watcher", V5, 10, false);
    h.subscribe(1, "wills/#", QoS::AtMostOnce);
    let mut c = Connect {
        version: V5,
        client_id: "victim".into(),
        clean_start: true,
        keep_alive: 60,
        username: None,
        password: None,
        will: Some(Will {
            topic: "wills/victim".into(),
            payload: Bytes::from_static(b"gone"),
            qos: QoS::AtMostOnce,
            retain: false,
            properties: Properties::default(),
        }),
        properties: Properties::default(),
    };
    c.properties.session_expiry_interval = Some(0);
    h.b.connect(ConnId(2), c, h.now, &mut h.out);
    h.take(2);
    assert!(h.b.disconnect_client("victim", h.now, &mut h.out));
    let actions = h.take(2);
    assert!(matches!(
        &actions[0],
        Action::Send(Packet::Disconnect(d)) if d.reason == ReasonCode::AdministrativeAction
    ));
    assert!(matches!(actions.last(), Some(Action::Close)));
    assert_eq!(h.payloads(1), vec!["gone".to_string()]);
    assert!(
        !h.b.disconnect_client("victim", h.now, &mut h.out),
        "not connected"
    );
    assert!(!h.b.disconnect_client("nobody", h.now, &mut h.out));
}
