//! One test per normative statement the decoder enforces, named after its spec section.

#![allow(clippy::unwrap_used)]

use bytes::BytesMut;
use ferrymq_mqtt::*;

const V5: ProtocolVersion = ProtocolVersion::V5;
const V3: ProtocolVersion = ProtocolVersion::V311;

fn dec(bytes: &[u8], v: ProtocolVersion) -> Result<Option<Packet>, DecodeError> {
    decode(&mut BytesMut::from(bytes), v, &Limits::default())
}

fn connect_bytes(level: u8, flags: u8, tail: &[u8]) -> Vec<u8> {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', level, flags, 0, 60];
    if level == 5 {
        body.push(0); // no properties
    }
    body.extend_from_slice(tail);
    let mut p = vec![0x10, body.len() as u8];
    p.extend(body);
    p
}

#[test]
fn mqtt_1_5_5_varint_longer_than_four_bytes_is_malformed() {
    let err = dec(&[0x30, 0xFF, 0xFF, 0xFF, 0xFF, 0x01], V5).unwrap_err();
    assert_eq!(err.reason_code(), ReasonCode::MalformedPacket);
}

#[test]
fn mqtt_1_5_4_strings_reject_nul_and_bad_utf8() {
    // PUBLISH QoS 0, topic "a\0"
    assert_eq!(
        dec(&[0x30, 4, 0, 2, b'a', 0], V3),
        Err(DecodeError::InvalidUtf8)
    );
    // A lone surrogate encoded as UTF-8 (ED A0 80) is not valid UTF-8.
    assert_eq!(
        dec(&[0x30, 5, 0, 3, 0xED, 0xA0, 0x80], V3),
        Err(DecodeError::InvalidUtf8)
    );
}

#[test]
fn four_byte_utf8_topics_are_accepted() {
    let topic = "sensors/😀/temp";
    let p = Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtMostOnce,
        retain: false,
        topic: topic.into(),
        packet_id: None,
        properties: Properties::default(),
        payload: "🌡️".as_bytes().to_vec().into(),
    });
    let mut buf = BytesMut::new();
    encode(&p, V3, &mut buf).unwrap();
    assert_eq!(decode(&mut buf, V3, &Limits::default()).unwrap(), Some(p));
}

#[test]
fn mqtt_2_1_3_reserved_flags_are_malformed() {
    // SUBSCRIBE must have flags 0010.
    assert!(matches!(
        dec(&[0x80, 6, 0, 1, 0, 1, b'a', 0], V3),
        Err(DecodeError::Malformed(_))
    ));
    // PINGREQ with flags.
    assert!(matches!(
        dec(&[0xC1, 0], V3),
        Err(DecodeError::Malformed(_))
    ));
}

#[test]
fn mqtt_3_3_1_2_dup_on_qos0_is_malformed() {
    assert!(matches!(
        dec(&[0x38, 3, 0, 1, b'a'], V3),
        Err(DecodeError::Malformed(_))
    ));
}

#[test]
fn mqtt_3_3_1_4_qos_3_is_malformed() {
    assert!(matches!(
        dec(&[0x36, 5, 0, 1, b'a', 0, 1], V3),
        Err(DecodeError::Malformed(_))
    ));
}

#[test]
fn mqtt_3_3_2_2_wildcards_in_topic_name_are_invalid() {
    assert_eq!(
        dec(&[0x30, 3, 0, 1, b'#'], V3),
        Err(DecodeError::TopicNameInvalid)
    );
    assert_eq!(
        dec(&[0x30, 5, 0, 3, b'a', b'/', b'+'], V3),
        Err(DecodeError::TopicNameInvalid)
    );
}

#[test]
fn mqtt_2_2_1_3_packet_id_zero_is_malformed() {
    assert!(dec(&[0x32, 5, 0, 1, b'a', 0, 0], V3).is_err());
}

#[test]
fn mqtt_3_1_2_3_connect_reserved_flag_is_malformed() {
    let p = connect_bytes(4, 0x01, &[0, 0]);
    assert!(matches!(dec(&p, V3), Err(DecodeError::Malformed(_))));
}

#[test]
fn mqtt_3_1_2_2_unsupported_level_is_reported() {
    let p = connect_bytes(6, 0x02, &[0, 0]);
    let err = dec(&p, V5).unwrap_err();
    assert_eq!(err, DecodeError::UnsupportedProtocol { level: 6 });
    assert_eq!(err.reason_code(), ReasonCode::UnsupportedProtocolVersion);
}

#[test]
fn mqtt_3_1_2_22_password_without_username_in_311() {
    let p = connect_bytes(4, 0x40 | 0x02, &[0, 0, 0, 1, b'p']);
    assert!(matches!(dec(&p, V3), Err(DecodeError::Malformed(_))));
}

#[test]
fn mqtt_3_1_2_11_will_qos_without_will_flag() {
    let p = connect_bytes(4, 0x08 | 0x02, &[0, 0]);
    assert!(matches!(dec(&p, V3), Err(DecodeError::Malformed(_))));
}

#[test]
fn mqtt_3_8_3_3_subscribe_needs_a_filter() {
    assert!(matches!(
        dec(&[0x82, 2, 0, 1], V3),
        Err(DecodeError::Protocol(_))
    ));
}

#[test]
fn mqtt_3_8_3_4_retain_handling_3_is_malformed() {
    // SUBSCRIBE id 1, no props, "a", options 0x30
    assert!(matches!(
        dec(&[0x82, 7, 0, 1, 0, 0, 1, b'a', 0x30], V5),
        Err(DecodeError::Malformed(_))
    ));
}

#[test]
fn mqtt_3_8_3_1_v311_reserved_option_bits_are_malformed() {
    assert!(matches!(
        dec(&[0x82, 6, 0, 1, 0, 1, b'a', 0x04], V3),
        Err(DecodeError::Malformed(_))
    ));
}

#[test]
fn mqtt_2_2_2_duplicate_property_is_protocol_error() {
    // PUBLISH QoS0 topic "a", props: message expiry twice.
    let pkt = [0x30, 14, 0, 1, b'a', 10, 0x02, 0, 0, 0, 1, 0x02, 0, 0, 0, 2];
    let err = dec(&pkt, V5).unwrap_err();
    assert_eq!(err.reason_code(), ReasonCode::ProtocolError);
}

#[test]
fn mqtt_2_2_2_property_not_allowed_on_packet_is_protocol_error() {
    // PUBLISH with Session Expiry Interval (0x11).
    let pkt = [0x30, 9, 0, 1, b'a', 5, 0x11, 0, 0, 0, 1];
    let err = dec(&pkt, V5).unwrap_err();
    assert_eq!(err.reason_code(), ReasonCode::ProtocolError);
}

#[test]
fn mqtt_2_2_2_user_properties_repeat_and_keep_order() {
    let p = Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtLeastOnce,
        retain: false,
        topic: "t".into(),
        packet_id: Some(7),
        properties: PropertyValues {
            user_properties: vec![
                ("k".into(), "2".into()),
                ("k".into(), "1".into()),
                ("a".into(), "".into()),
            ],
            ..Default::default()
        }
        .into(),
        payload: Default::default(),
    });
    let mut buf = BytesMut::new();
    encode(&p, V5, &mut buf).unwrap();
    assert_eq!(decode(&mut buf, V5, &Limits::default()).unwrap(), Some(p));
}

#[test]
fn packet_too_large_is_refused_before_buffering() {
    // Declares 2,000,000 bytes but sends only the header: refused at once.
    let mut buf = BytesMut::from(&[0x30u8, 0x80, 0x89, 0x7A][..]);
    let err = decode(
        &mut buf,
        V5,
        &Limits {
            max_packet_size: 1024,
        },
    )
    .unwrap_err();
    assert!(matches!(err, DecodeError::PacketTooLarge { .. }));
    assert_eq!(err.reason_code(), ReasonCode::PacketTooLarge);
}

#[test]
fn mqtt_3_3_2_3_4_empty_topic_needs_alias() {
    assert!(matches!(
        dec(&[0x30, 3, 0, 0, 0], V5),
        Err(DecodeError::Protocol(_))
    ));
    // With alias 1: accepted.
    let p = dec(&[0x30, 6, 0, 0, 3, 0x23, 0, 1], V5).unwrap().unwrap();
    let Packet::Publish(p) = p else { panic!() };
    assert_eq!(p.properties.topic_alias, Some(1));
}

#[test]
fn topic_alias_zero_is_malformed() {
    assert!(dec(&[0x30, 7, 0, 1, b'a', 3, 0x23, 0, 0], V5).is_err());
}

#[test]
fn payload_is_zero_copy() {
    let p = Packet::Publish(Publish {
        dup: false,
        qos: QoS::AtMostOnce,
        retain: false,
        topic: "t".into(),
        packet_id: None,
        properties: Properties::default(),
        payload: vec![7u8; 1000].into(),
    });
    let mut buf = BytesMut::new();
    encode(&p, V3, &mut buf).unwrap();
    let base = buf.as_ptr() as usize;
    let end = base + buf.len();
    let Some(Packet::Publish(d)) = decode(&mut buf, V3, &Limits::default()).unwrap() else {
        panic!()
    };
    let at = d.payload.as_ptr() as usize;
    assert!(
        at >= base && at < end,
        "payload must point into the read buffer"
    );
}

#[test]
fn v5_short_acks_decode_as_success() {
    let Some(Packet::PubAck(a)) = dec(&[0x40, 2, 0, 9], V5).unwrap() else {
        panic!()
    };
    assert_eq!((a.packet_id, a.reason), (9, ReasonCode::Success));
    let Some(Packet::Disconnect(d)) = dec(&[0xE0, 0], V5).unwrap() else {
        panic!()
    };
    assert_eq!(d.reason, ReasonCode::Success);
}

/// A server checks a packet's size (the broker: its CONNECT limit) as soon as the fixed
/// header is in, before the rest arrives.
#[test]
fn packet_len_is_known_from_the_fixed_header_alone() {
    assert_eq!(packet_len(&[0x10]).unwrap(), None);
    assert_eq!(
        packet_len(&[0x10, 0x80]).unwrap(),
        None,
        "remaining length goes on"
    );
    assert_eq!(packet_len(&[0x10, 0x0A]).unwrap(), Some(12));
    assert_eq!(packet_len(&[0x10, 0xFC, 0xFF, 0x03]).unwrap(), Some(65536));
    assert!(packet_len(&[0x10, 0xFF, 0xFF, 0xFF, 0xFF, 0x01]).is_err());
}

/// The version of a CONNECT too large to read is known from its first bytes, so that a 5.0
/// client can be told 0x95.
#[test]
fn connect_version_is_read_from_the_first_bytes_of_a_connect() {
    let c5 = connect_bytes(5, 0x02, &[0, 0]);
    let c3 = connect_bytes(4, 0x02, &[0, 0]);
    assert_eq!(connect_version(&c5), Some(V5));
    assert_eq!(connect_version(&c3), Some(V3));
    assert_eq!(connect_version(&c5[..8]), None, "level not in yet");
    assert_eq!(connect_version(&connect_bytes(3, 0x02, &[0, 0])), None);
    let mut publish = c5.clone();
    publish[0] = 0x30;
    assert_eq!(connect_version(&publish), None, "not a CONNECT");
}
