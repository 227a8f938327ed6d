//! Property-based round trips: every packet we can encode decodes to itself, in both versions,
//! and decoding a prefix never yields a packet.

#![allow(clippy::unwrap_used)]

use bytes::{Bytes, BytesMut};
use ferrymq_mqtt::*;
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;

fn text() -> impl Strategy<Value = String> {
    // Includes 4-byte characters; excludes U+0000, which MQTT forbids.
    "[a-zA-Z0-9 /_😀é漢-]{0,12}"
}

fn topic() -> impl Strategy<Value = String> {
    "[a-z0-9😀]{1,6}(/[a-z0-9😀]{0,6}){0,3}"
}

fn bin() -> impl Strategy<Value = Bytes> {
    vec(any::<u8>(), 0..40).prop_map(Bytes::from)
}

fn qos() -> impl Strategy<Value = QoS> {
    prop_oneof![
        Just(QoS::AtMostOnce),
        Just(QoS::AtLeastOnce),
        Just(QoS::ExactlyOnce)
    ]
}

fn user_props() -> impl Strategy<Value = Vec<(String, String)>> {
    vec((text(), text()), 0..3)
}

fn publish_props() -> impl Strategy<Value = Properties> {
    (
        option::of(0u8..=1),
        option::of(any::<u32>()),
        option::of(text()),
        option::of(topic()),
        option::of(bin()),
        vec(1u32..268_435_455, 0..3),
        option::of(1u16..),
        user_props(),
    )
        .prop_map(|(pfi, exp, ct, rt, cd, ids, alias, up)| {
            PropertyValues {
                payload_format_indicator: pfi,
                message_expiry_interval: exp,
                content_type: ct,
                response_topic: rt,
                correlation_data: cd,
                subscription_identifiers: ids,
                topic_alias: alias,
                user_properties: up,
                ..Default::default()
            }
            .into()
        })
}

fn ack_props() -> impl Strategy<Value = Properties> {
    (option::of(text()), user_props()).prop_map(|(rs, up)| {
        PropertyValues {
            reason_string: rs,
            user_properties: up,
            ..Default::default()
        }
        .into()
    })
}

fn reason_code() -> impl Strategy<Value = ReasonCode> {
    (0u8..=0xA2).prop_filter_map("known", ReasonCode::from_u8)
}

fn packet(v: ProtocolVersion) -> BoxedStrategy<Packet> {
    let v5 = v == ProtocolVersion::V5;
    let props = move |s: BoxedStrategy<Properties>| {
        if v5 {
            s
        } else {
            Just(Properties::default()).boxed()
        }
    };
    let reason = move || {
        if v5 {
            reason_code().boxed()
        } else {
            Just(ReasonCode::Success).boxed()
        }
    };
    let publish = (
        qos(),
        any::<bool>(),
        any::<bool>(),
        topic(),
        1u16..,
        props(publish_props().boxed()),
        bin(),
    )
        .prop_map(|(qos, dup, retain, topic, id, properties, payload)| {
            Packet::Publish(Publish {
                dup: dup && qos != QoS::AtMostOnce,
                qos,
                retain,
                topic,
                packet_id: (qos != QoS::AtMostOnce).then_some(id),
                properties,
                payload,
            })
        });
    let connect = (
        text(),
        any::<bool>(),
        any::<u16>(),
        option::of(text()),
        option::of(bin()),
        option::of((topic(), bin(), qos(), any::<bool>())),
        props(
            (option::of(any::<u32>()), option::of(1u16..), user_props())
                .prop_map(|(se, rm, up)| {
                    PropertyValues {
                        session_expiry_interval: se,
                        receive_maximum: rm,
                        user_properties: up,
                        ..Default::default()
                    }
                    .into()
                })
                .boxed(),
        ),
    )
        .prop_map(
            move |(client_id, clean_start, keep_alive, username, password, will, properties)| {
                let username = if v5 || password.is_none() {
                    username
                } else {
                    username.or(Some("u".into()))
                };
                Packet::Connect(Box::new(Connect {
                    version: v,
                    client_id,
                    clean_start,
                    keep_alive,
                    username,
                    password,
                    will: will.map(|(topic, payload, qos, retain)| Will {
                        topic,
                        payload,
                        qos,
                        retain,
                        properties: Properties::default(),
                    }),
                    properties,
                }))
            },
        );
    let resp = (1u16.., reason(), props(ack_props().boxed()), 0u8..4).prop_map(
        |(id, reason, properties, kind)| {
            let r = PubResp {
                packet_id: id,
                reason,
                properties,
            };
            match kind {
                0 => Packet::PubAck(r),
                1 => Packet::PubRec(r),
                2 => Packet::PubRel(r),
                _ => Packet::PubComp(r),
            }
        },
    );
    let subscribe = (
        1u16..,
        vec((topic(), qos(), any::<bool>(), any::<bool>(), 0u8..3), 1..4),
        props(
            option::of(1u32..268_435_455)
                .prop_map(|id| {
                    PropertyValues {
                        subscription_identifiers: id.into_iter().collect(),
                        ..Default::default()
                    }
                    .into()
                })
                .boxed(),
        ),
    )
        .prop_map(move |(packet_id, fs, properties)| {
            let filters = fs
                .into_iter()
                .map(|(f, qos, nl, rap, rh)| {
                    let o = if v5 {
                        SubscriptionOptions {
                            qos,
                            no_local: nl,
                            retain_as_published: rap,
                            retain_handling: [
                                RetainHandling::SendAtSubscribe,
                                RetainHandling::SendIfNew,
                                RetainHandling::DoNotSend,
                            ][rh as usize],
                        }
                    } else {
                        SubscriptionOptions {
                            qos,
                            ..Default::default()
                        }
                    };
                    (f, o)
                })
                .collect();
            Packet::Subscribe(Subscribe {
                packet_id,
                filters,
                properties,
            })
        });
    let suback = (
        1u16..,
        vec(
            prop_oneof![
                Just(ReasonCode::Success),
                Just(ReasonCode::GrantedQoS1),
                Just(ReasonCode::GrantedQoS2),
                Just(ReasonCode::UnspecifiedError)
            ],
            1..4,
        ),
        props(ack_props().boxed()),
    )
        .prop_map(|(packet_id, reasons, properties)| {
            Packet::SubAck(SubAck {
                packet_id,
                reasons,
                properties,
            })
        });
    let unsubscribe = (
        1u16..,
        vec(topic(), 1..4),
        props(
            user_props()
                .prop_map(|up| {
                    PropertyValues {
                        user_properties: up,
                        ..Default::default()
                    }
                    .into()
                })
                .boxed(),
        ),
    )
        .prop_map(|(packet_id, filters, properties)| {
            Packet::Unsubscribe(Unsubscribe {
                packet_id,
                filters,
                properties,
            })
        });
    let unsuback = (1u16.., vec(reason_code(), 1..4), props(ack_props().boxed())).prop_map(
        move |(packet_id, reasons, properties)| {
            Packet::UnsubAck(UnsubAck {
                packet_id,
                reasons: if v5 { reasons } else { vec![] },
                properties,
            })
        },
    );
    let connack = (
        any::<bool>(),
        prop_oneof![
            Just(ReasonCode::Success),
            Just(ReasonCode::NotAuthorized),
            Just(ReasonCode::ServerUnavailable)
        ],
        props(
            (
                option::of(text()),
                option::of(any::<u16>()),
                option::of(1u16..),
            )
                .prop_map(|(aci, ska, rm)| {
                    PropertyValues {
                        assigned_client_identifier: aci,
                        server_keep_alive: ska,
                        receive_maximum: rm,
                        ..Default::default()
                    }
                    .into()
                })
                .boxed(),
        ),
    )
        .prop_map(|(session_present, reason, properties)| {
            Packet::ConnAck(ConnAck {
                session_present,
                reason,
                properties,
            })
        });
    let disconnect = (reason(), props(ack_props().boxed()))
        .prop_map(|(reason, properties)| Packet::Disconnect(Disconnect { reason, properties }));
    prop_oneof![
        publish,
        connect,
        resp,
        subscribe,
        suback,
        unsubscribe,
        unsuback,
        connack,
        disconnect,
        Just(Packet::PingReq),
        Just(Packet::PingResp),
    ]
    .boxed()
}

fn roundtrip(p: &Packet, v: ProtocolVersion) {
    let mut buf = BytesMut::new();
    encode(p, v, &mut buf).expect("encode");
    assert_eq!(buf.len(), encoded_len(p, v));
    let whole = buf.clone();
    // Every strict prefix needs more bytes and consumes nothing.
    for cut in 0..whole.len() {
        let mut part = BytesMut::from(&whole[..cut]);
        assert_eq!(
            decode(&mut part, v, &Limits::default()),
            Ok(None),
            "prefix {cut}"
        );
        assert_eq!(part.len(), cut);
    }
    let decoded = decode(&mut buf, v, &Limits::default())
        .expect("decode")
        .expect("whole packet");
    assert!(buf.is_empty());
    assert_eq!(&decoded, p);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn v5_packets_round_trip(p in packet(ProtocolVersion::V5)) {
        roundtrip(&p, ProtocolVersion::V5);
    }

    #[test]
    fn v311_packets_round_trip(p in packet(ProtocolVersion::V311)) {
        roundtrip(&p, ProtocolVersion::V311);
    }

    /// Arbitrary bytes never panic the decoder, and never produce a packet larger than the input.
    #[test]
    fn arbitrary_bytes_never_panic(data in vec(any::<u8>(), 0..300)) {
        for v in [ProtocolVersion::V311, ProtocolVersion::V5] {
            let mut buf = BytesMut::from(&data[..]);
            let limits = Limits { max_packet_size: 256 };
            while let Ok(Some(_)) = decode(&mut buf, v, &limits) {}
        }
    }
}
