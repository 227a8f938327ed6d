//! Hot codec functions: PUBLISH decode and encode, with and without properties.

use std::hint::black_box;

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use ferrymq_mqtt::{
    decode, encode, Limits, Packet, Properties, PropertyValues, ProtocolVersion, Publish, QoS,
};

fn publish(props: bool) -> Packet {
    let properties: Properties = if props {
        PropertyValues {
            message_expiry_interval: Some(60),
            content_type: Some("application/json".into()),
            user_properties: vec![("trace".into(), "00-abc-def-01".into())],
            ..Default::default()
        }
        .into()
    } else {
        Properties::default()
    };
    Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: "sensors/building-7/floor-3/room-12/temperature".into(),
        packet_id: Some(42),
        properties,
        payload: Bytes::from(vec![0x5a; 64]),
    })
}

fn codec(c: &mut Criterion) {
    let v = ProtocolVersion::V5;
    for (name, props) in [("no properties", false), ("with properties", true)] {
        let p = publish(props);
        let mut wire = BytesMut::new();
        encode(&p, v, &mut wire).expect("encodes");
        let wire = wire.freeze();
        let mut g = c.benchmark_group(format!("publish {name}"));
        g.throughput(Throughput::Elements(1));
        g.bench_function("decode", |b| {
            b.iter(|| {
                let mut buf = BytesMut::from(&wire[..]);
                black_box(decode(&mut buf, v, &Limits::default()).expect("decodes"))
            })
        });
        g.bench_function("encode", |b| {
            let mut out = BytesMut::with_capacity(4096);
            b.iter(|| {
                out.clear();
                encode(black_box(&p), v, &mut out).expect("encodes");
                black_box(out.len())
            })
        });
        g.finish();
    }
}

criterion_group!(benches, codec);
criterion_main!(benches);
