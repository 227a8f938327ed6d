//! Decoding: bytes in, packets out, with limits enforced before anything is buffered.

use bytes::{Buf, BytesMut};

use crate::primitives::{read_varint, Reader};
use crate::topic::valid_topic_name;
use crate::{
    Auth, ConnAck, Connect, DecodeError, Disconnect, Packet, Properties, PropertyContext as Ctx,
    ProtocolVersion, PubResp, Publish, QoS, ReasonCode, SubAck, Subscribe, SubscriptionOptions,
    UnsubAck, Unsubscribe, Will,
};

/// Limits enforced while decoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest whole packet (fixed header included) accepted, in bytes.
    pub max_packet_size: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_packet_size: 268_435_460,
        }
    }
}

/// Decodes one packet from the front of `buf`.
///
/// `version` is the connection's protocol version; a CONNECT carries its own and ignores it.
/// Returns `Ok(None)` when `buf` does not yet hold a whole packet; nothing is consumed then.
/// On success the packet's bytes are split off `buf` and payloads borrow them.
pub fn decode(
    buf: &mut BytesMut,
    version: ProtocolVersion,
    limits: &Limits,
) -> Result<Option<Packet>, DecodeError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    let Some((remaining, len_bytes)) = read_varint(&buf[1..])? else {
        return Ok(None);
    };
    let total = 1 + len_bytes + remaining as usize;
    if total > limits.max_packet_size {
        return Err(DecodeError::PacketTooLarge {
            size: total,
            max: limits.max_packet_size,
        });
    }
    if buf.len() < total {
        return Ok(None);
    }
    let header = buf[0];
    let mut frame = buf.split_to(total);
    frame.advance(1 + len_bytes);
    let mut r = Reader::new(frame.freeze());
    let packet = decode_body(header, &mut r, version)?;
    if r.remaining() != 0 {
        return Err(DecodeError::Malformed("trailing bytes after packet"));
    }
    Ok(Some(packet))
}

/// The whole length (fixed header included) of the packet at the front of `buf`, as soon as
/// its fixed header is in: `Ok(None)` until then. What a reader checks against its limits
/// before it buffers the rest (the broker's CONNECT size limit, `mqtt.max_connect_size`).
pub fn packet_len(buf: &[u8]) -> Result<Option<usize>, DecodeError> {
    if buf.len() < 2 {
        return Ok(None);
    }
    Ok(read_varint(&buf[1..])?.map(|(remaining, len_bytes)| 1 + len_bytes + remaining as usize))
}

/// The protocol version of the CONNECT at the front of `buf`, read from its first bytes
/// (fixed header, protocol name `MQTT`, level) before the rest has arrived; `None` until
/// they are in, or when they are not a CONNECT of a supported version. Lets a server answer a
/// CONNECT it refuses unread (too large) with a CONNACK the client understands.
pub fn connect_version(buf: &[u8]) -> Option<ProtocolVersion> {
    if buf.first()? >> 4 != 1 {
        return None;
    }
    let (_, len_bytes) = read_varint(buf.get(1..)?).ok()??;
    let header = buf.get(1 + len_bytes..1 + len_bytes + 7)?;
    match header {
        [0, 4, b'M', b'Q', b'T', b'T', 4] => Some(ProtocolVersion::V311),
        [0, 4, b'M', b'Q', b'T', b'T', 5] => Some(ProtocolVersion::V5),
        _ => None,
    }
}

fn expect_flags(header: u8, flags: u8) -> Result<(), DecodeError> {
    if header & 0x0F != flags {
        return Err(DecodeError::Malformed("reserved fixed header flags"));
    }
    Ok(())
}

fn decode_body(header: u8, r: &mut Reader, v: ProtocolVersion) -> Result<Packet, DecodeError> {
    let kind = header >> 4;
    match kind {
        1 => {
            expect_flags(header, 0)?;
            decode_connect(r).map(|c| Packet::Connect(Box::new(c)))
        }
        2 => {
            expect_flags(header, 0)?;
            decode_connack(r, v).map(Packet::ConnAck)
        }
        3 => decode_publish(header, r, v).map(Packet::Publish),
        4 => {
            expect_flags(header, 0)?;
            decode_pub_resp(r, v).map(Packet::PubAck)
        }
        5 => {
            expect_flags(header, 0)?;
            decode_pub_resp(r, v).map(Packet::PubRec)
        }
        6 => {
            expect_flags(header, 0b0010)?;
            decode_pub_resp(r, v).map(Packet::PubRel)
        }
        7 => {
            expect_flags(header, 0)?;
            decode_pub_resp(r, v).map(Packet::PubComp)
        }
        8 => {
            expect_flags(header, 0b0010)?;
            decode_subscribe(r, v).map(Packet::Subscribe)
        }
        9 => {
            expect_flags(header, 0)?;
            decode_suback(r, v).map(Packet::SubAck)
        }
        10 => {
            expect_flags(header, 0b0010)?;
            decode_unsubscribe(r, v).map(Packet::Unsubscribe)
        }
        11 => {
            expect_flags(header, 0)?;
            decode_unsuback(r, v).map(Packet::UnsubAck)
        }
        12 | 13 => {
            expect_flags(header, 0)?;
            Ok(if kind == 12 {
                Packet::PingReq
            } else {
                Packet::PingResp
            })
        }
        14 => {
            expect_flags(header, 0)?;
            let (reason, properties) = reason_and_props(r, v, Ctx::Disconnect)?;
            Ok(Packet::Disconnect(Disconnect { reason, properties }))
        }
        15 if v == ProtocolVersion::V5 => {
            expect_flags(header, 0)?;
            let (reason, properties) = reason_and_props(r, v, Ctx::Auth)?;
            Ok(Packet::Auth(Auth { reason, properties }))
        }
        _ => Err(DecodeError::Malformed("reserved packet type")),
    }
}

fn props(r: &mut Reader, v: ProtocolVersion, ctx: Ctx) -> Result<Properties, DecodeError> {
    match v {
        ProtocolVersion::V5 => Properties::decode(r, ctx),
        ProtocolVersion::V311 => Ok(Properties::default()),
    }
}

fn reason(byte: u8) -> Result<ReasonCode, DecodeError> {
    ReasonCode::from_u8(byte).ok_or(DecodeError::Malformed("unknown reason code"))
}

fn packet_id(r: &mut Reader) -> Result<u16, DecodeError> {
    match r.u16()? {
        0 => Err(DecodeError::Malformed("packet identifier 0")),
        id => Ok(id),
    }
}

fn decode_connect(r: &mut Reader) -> Result<Connect, DecodeError> {
    let name = r.binary()?;
    let level = r.u8()?;
    let version = match (&name[..], level) {
        (b"MQTT", 4) => ProtocolVersion::V311,
        (b"MQTT", 5) => ProtocolVersion::V5,
        (b"MQTT", _) | (b"MQIsdp", _) => return Err(DecodeError::UnsupportedProtocol { level }),
        _ => return Err(DecodeError::Protocol("protocol name is not MQTT")),
    };
    let flags = r.u8()?;
    if flags & 0x01 != 0 {
        return Err(DecodeError::Malformed("CONNECT reserved flag set"));
    }
    let clean_start = flags & 0x02 != 0;
    let will_flag = flags & 0x04 != 0;
    let will_qos = (flags >> 3) & 0x03;
    let will_retain = flags & 0x20 != 0;
    let has_password = flags & 0x40 != 0;
    let has_username = flags & 0x80 != 0;
    if !will_flag && (will_qos != 0 || will_retain) {
        return Err(DecodeError::Malformed(
            "will QoS or retain set without a will",
        ));
    }
    let will_qos = QoS::from_u8(will_qos).ok_or(DecodeError::Malformed("will QoS 3"))?;
    if version == ProtocolVersion::V311 && has_password && !has_username {
        return Err(DecodeError::Malformed("password without user name"));
    }
    let keep_alive = r.u16()?;
    let properties = props(r, version, Ctx::Connect)?;
    let client_id = r.string()?;
    let will = if will_flag {
        let properties = props(r, version, Ctx::Will)?;
        let topic = r.string()?;
        if !valid_topic_name(&topic) {
            return Err(DecodeError::TopicNameInvalid);
        }
        let payload = r.binary()?;
        Some(Will {
            topic,
            payload,
            qos: will_qos,
            retain: will_retain,
            properties,
        })
    } else {
        None
    };
    let username = if has_username {
        Some(r.string()?)
    } else {
        None
    };
    let password = if has_password {
        Some(r.binary()?)
    } else {
        None
    };
    Ok(Connect {
        version,
        client_id,
        clean_start,
        keep_alive,
        username,
        password,
        will,
        properties,
    })
}

fn decode_connack(r: &mut Reader, v: ProtocolVersion) -> Result<ConnAck, DecodeError> {
    let flags = r.u8()?;
    if flags & 0xFE != 0 {
        return Err(DecodeError::Malformed("CONNACK reserved flags"));
    }
    let code = r.u8()?;
    let reason = match v {
        ProtocolVersion::V5 => reason(code)?,
        ProtocolVersion::V311 => match code {
            0 => ReasonCode::Success,
            1 => ReasonCode::UnsupportedProtocolVersion,
            2 => ReasonCode::ClientIdentifierNotValid,
            3 => ReasonCode::ServerUnavailable,
            4 => ReasonCode::BadUserNameOrPassword,
            5 => ReasonCode::NotAuthorized,
            _ => return Err(DecodeError::Malformed("unknown CONNACK return code")),
        },
    };
    let properties = props(r, v, Ctx::ConnAck)?;
    Ok(ConnAck {
        session_present: flags & 1 != 0,
        reason,
        properties,
    })
}

fn decode_publish(header: u8, r: &mut Reader, v: ProtocolVersion) -> Result<Publish, DecodeError> {
    let dup = header & 0x08 != 0;
    let qos = QoS::from_u8((header >> 1) & 0x03).ok_or(DecodeError::Malformed("PUBLISH QoS 3"))?;
    let retain = header & 0x01 != 0;
    if dup && qos == QoS::AtMostOnce {
        return Err(DecodeError::Malformed("DUP set on a QoS 0 PUBLISH"));
    }
    let topic = r.string()?;
    let packet_id = if qos == QoS::AtMostOnce {
        None
    } else {
        Some(packet_id(r)?)
    };
    let properties = props(r, v, Ctx::Publish)?;
    if topic.is_empty() {
        if properties.topic_alias.is_none() {
            return Err(DecodeError::Protocol("empty topic without a topic alias"));
        }
    } else if !valid_topic_name(&topic) {
        return Err(DecodeError::TopicNameInvalid);
    }
    let payload = r.rest();
    Ok(Publish {
        dup,
        qos,
        retain,
        topic,
        packet_id,
        properties,
        payload,
    })
}

fn decode_pub_resp(r: &mut Reader, v: ProtocolVersion) -> Result<PubResp, DecodeError> {
    let packet_id = packet_id(r)?;
    let (reason, properties) = reason_and_props(r, v, Ctx::PubResp)?;
    Ok(PubResp {
        packet_id,
        reason,
        properties,
    })
}

/// Reason code and properties that 5.0 lets a sender omit when they are Success and empty.
fn reason_and_props(
    r: &mut Reader,
    v: ProtocolVersion,
    ctx: Ctx,
) -> Result<(ReasonCode, Properties), DecodeError> {
    if v == ProtocolVersion::V311 || r.remaining() == 0 {
        return Ok((ReasonCode::Success, Properties::default()));
    }
    let code = reason(r.u8()?)?;
    let properties = if r.remaining() == 0 {
        Properties::default()
    } else {
        Properties::decode(r, ctx)?
    };
    Ok((code, properties))
}

fn decode_subscribe(r: &mut Reader, v: ProtocolVersion) -> Result<Subscribe, DecodeError> {
    let packet_id = packet_id(r)?;
    let properties = props(r, v, Ctx::Subscribe)?;
    let mut filters = Vec::new();
    while r.remaining() > 0 {
        let filter = r.string()?;
        let opts = r.u8()?;
        let qos = QoS::from_u8(opts & 0x03).ok_or(DecodeError::Malformed("subscription QoS 3"))?;
        let options = match v {
            ProtocolVersion::V311 => {
                if opts & 0xFC != 0 {
                    return Err(DecodeError::Malformed("subscription options reserved bits"));
                }
                SubscriptionOptions {
                    qos,
                    ..Default::default()
                }
            }
            ProtocolVersion::V5 => SubscriptionOptions::from_byte(opts).ok_or(
                DecodeError::Malformed("subscription options reserved bits or retain handling 3"),
            )?,
        };
        filters.push((filter, options));
    }
    if filters.is_empty() {
        return Err(DecodeError::Protocol("SUBSCRIBE without topic filters"));
    }
    Ok(Subscribe {
        packet_id,
        filters,
        properties,
    })
}

fn decode_suback(r: &mut Reader, v: ProtocolVersion) -> Result<SubAck, DecodeError> {
    let packet_id = packet_id(r)?;
    let properties = props(r, v, Ctx::SubAck)?;
    let mut reasons = Vec::with_capacity(r.remaining());
    while r.remaining() > 0 {
        let code = r.u8()?;
        // 3.1.1 knows only granted QoS 0-2 and 0x80 (spec 3.9.3).
        if v == ProtocolVersion::V311 && !matches!(code, 0 | 1 | 2 | 0x80) {
            return Err(DecodeError::Malformed("SUBACK return code"));
        }
        reasons.push(reason(code)?);
    }
    Ok(SubAck {
        packet_id,
        reasons,
        properties,
    })
}

fn decode_unsubscribe(r: &mut Reader, v: ProtocolVersion) -> Result<Unsubscribe, DecodeError> {
    let packet_id = packet_id(r)?;
    let properties = props(r, v, Ctx::Unsubscribe)?;
    let mut filters = Vec::new();
    while r.remaining() > 0 {
        filters.push(r.string()?);
    }
    if filters.is_empty() {
        return Err(DecodeError::Protocol("UNSUBSCRIBE without topic filters"));
    }
    Ok(Unsubscribe {
        packet_id,
        filters,
        properties,
    })
}

fn decode_unsuback(r: &mut Reader, v: ProtocolVersion) -> Result<UnsubAck, DecodeError> {
    let packet_id = packet_id(r)?;
    let properties = props(r, v, Ctx::UnsubAck)?;
    let mut reasons = Vec::new();
    if v == ProtocolVersion::V5 {
        while r.remaining() > 0 {
            reasons.push(reason(r.u8()?)?);
        }
    }
    Ok(UnsubAck {
        packet_id,
        reasons,
        properties,
    })
}

/// Validates a payload marked as UTF-8 character data (payload format indicator 1).
pub fn validate_utf8(raw: &[u8]) -> Result<(), DecodeError> {
    std::str::from_utf8(raw)
        .map(|_| ())
        .map_err(|_| DecodeError::InvalidUtf8)
}
