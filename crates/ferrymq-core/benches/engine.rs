//! Hot engine paths: topic matching against 100K subscriptions, and one publish fanned out to
//! 1,000 connected sessions.

use std::hint::black_box;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ferrymq_core::{
    Broker, BrokerConfig, ConnId, Message, Outbox, SessionId, SubEntry, SubscriptionTree, Time,
};
use ferrymq_mqtt::{
    Connect, Packet, Properties, ProtocolVersion, QoS, Subscribe, SubscriptionOptions,
};

/// 100K filters over a device tree: exact topics, `+` in the middle, `#` at the end.
fn big_tree() -> SubscriptionTree {
    let mut t = SubscriptionTree::default();
    let mut n = 0u64;
    for site in 0..100 {
        for device in 0..300 {
            let e = |s| SubEntry {
                session: SessionId(s),
                options: Default::default(),
                identifier: None,
            };
            t.insert(&format!("site/{site}/device/{device}/temp"), None, e(n));
            t.insert(&format!("site/{site}/device/+/status"), None, e(n + 1));
            t.insert(&format!("site/{site}/device/{device}/#"), None, e(n + 2));
            n += 3;
        }
    }
    t.insert(
        "#",
        None,
        SubEntry {
            session: SessionId(n),
            options: Default::default(),
            identifier: None,
        },
    );
    t
}

fn matching(c: &mut Criterion) {
    let t = big_tree();
    assert!(t.len() > 90_000);
    let mut g = c.benchmark_group("match against 100K subscriptions");
    g.throughput(Throughput::Elements(1));
    g.bench_function("exact + wildcards", |b| {
        b.iter(|| black_box(t.matches(black_box("site/42/device/217/temp")).plain.len()))
    });
    g.bench_function("no match but #", |b| {
        b.iter(|| black_box(t.matches(black_box("other/topic/entirely")).plain.len()))
    });
    g.finish();
}

fn fanout(c: &mut Criterion) {
    let mut broker = Broker::new(BrokerConfig::default());
    let mut out = Outbox::default();
    let now = Time(0);
    for i in 0..1000u64 {
        let connect = Connect {
            version: ProtocolVersion::V311,
            client_id: format!("sub-{i}"),
            clean_start: true,
            keep_alive: 60,
            username: None,
            password: None,
            will: None,
            properties: Properties::default(),
        };
        broker.connect(ConnId(i), connect, now, &mut out);
        let options = SubscriptionOptions {
            qos: QoS::AtMostOnce,
            ..Default::default()
        };
        let s = Subscribe {
            packet_id: 1,
            filters: vec![("fan/+".into(), options)],
            properties: Properties::default(),
        };
        broker.packet(ConnId(i), Packet::Subscribe(s), now, &mut out);
    }
    out.actions.clear();
    let payload = Bytes::from(vec![0u8; 64]);
    let mut g = c.benchmark_group("engine fan-out");
    g.throughput(Throughput::Elements(1000));
    g.bench_function("1 publish to 1,000 sessions", |b| {
        b.iter(|| {
            broker.publish(Message::new("fan/out", payload.clone(), now), now, &mut out);
            let n = out.actions.len();
            out.actions.clear();
            black_box(n)
        })
    });
    g.finish();
}

criterion_group!(benches, matching, fanout);
criterion_main!(benches);
