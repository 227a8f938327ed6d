//! Encoding: packets in, bytes out. Lengths are computed first so each packet is written once,
//! straight into the caller's buffer.

use bytes::{BufMut, BytesMut};

use crate::primitives::{put_binary, put_str, put_varint, varint_len, VARINT_MAX};
use crate::{EncodeError, Packet, Properties, ProtocolVersion, PubResp, Publish, ReasonCode};

const V5: ProtocolVersion = ProtocolVersion::V5;

fn props_len(v: ProtocolVersion, p: &Properties) -> usize {
    if v == V5 {
        p.encoded_len()
    } else {
        0
    }
}

fn put_props(out: &mut BytesMut, v: ProtocolVersion, p: &Properties) -> Result<(), EncodeError> {
    if v == V5 {
        p.encode(out)?;
    }
    Ok(())
}

/// Whether a 5.0 ack may drop its reason code and properties (spec 3.4.2.1).
fn short_resp(v: ProtocolVersion, reason: ReasonCode, p: &Properties) -> bool {
    v != V5 || (reason == ReasonCode::Success && p.is_empty())
}

/// Remaining length (the bytes after the fixed header) of a packet.
fn remaining_len(p: &Packet, v: ProtocolVersion) -> usize {
    match p {
        Packet::Connect(c) => {
            let v = c.version;
            let mut n = 6 + 1 + 1 + 2 + props_len(v, &c.properties) + 2 + c.client_id.len();
            if let Some(w) = &c.will {
                n += props_len(v, &w.properties) + 2 + w.topic.len() + 2 + w.payload.len();
            }
            n += c.username.as_ref().map_or(0, |u| 2 + u.len());
            n += c.password.as_ref().map_or(0, |p| 2 + p.len());
            n
        }
        Packet::ConnAck(c) => 2 + props_len(v, &c.properties),
        Packet::Publish(p) => publish_remaining_len(p, v),
        Packet::PubAck(r) | Packet::PubRec(r) | Packet::PubRel(r) | Packet::PubComp(r) => {
            if short_resp(v, r.reason, &r.properties) {
                2
            } else if r.properties.is_empty() {
                3
            } else {
                3 + r.properties.encoded_len()
            }
        }
        Packet::Subscribe(s) => {
            2 + props_len(v, &s.properties)
                + s.filters.iter().map(|(f, _)| 3 + f.len()).sum::<usize>()
        }
        Packet::SubAck(s) => 2 + props_len(v, &s.properties) + s.reasons.len(),
        Packet::Unsubscribe(u) => {
            2 + props_len(v, &u.properties) + u.filters.iter().map(|f| 2 + f.len()).sum::<usize>()
        }
        Packet::UnsubAck(u) => {
            if v == V5 {
                2 + u.properties.encoded_len() + u.reasons.len()
            } else {
                2
            }
        }
        Packet::PingReq | Packet::PingResp => 0,
        Packet::Disconnect(d) => {
            if short_resp(v, d.reason, &d.properties) {
                0
            } else {
                1 + d.properties.encoded_len()
            }
        }
        Packet::Auth(a) => {
            if short_resp(v, a.reason, &a.properties) {
                0
            } else {
                1 + a.properties.encoded_len()
            }
        }
    }
}

fn publish_remaining_len(p: &Publish, v: ProtocolVersion) -> usize {
    view_remaining_len(&PublishView::of(p), v)
}

fn view_remaining_len(p: &PublishView<'_>, v: ProtocolVersion) -> usize {
    2 + p.topic.len()
        + if p.packet_id.is_some() { 2 } else { 0 }
        + props_len(v, p.properties)
        + p.payload.len()
}

/// A PUBLISH made of borrowed parts, so a message shared by many subscribers is encoded
/// without first being copied into an owned [`Publish`].
#[derive(Debug, Clone, Copy)]
pub struct PublishView<'a> {
    pub dup: bool,
    pub qos: crate::QoS,
    pub retain: bool,
    pub topic: &'a str,
    pub packet_id: Option<u16>,
    pub properties: &'a Properties,
    pub payload: &'a [u8],
}

impl<'a> PublishView<'a> {
    pub fn of(p: &'a Publish) -> Self {
        PublishView {
            dup: p.dup,
            qos: p.qos,
            retain: p.retain,
            topic: &p.topic,
            packet_id: p.packet_id,
            properties: &p.properties,
            payload: &p.payload,
        }
    }
}

/// Appends the encoding of a PUBLISH given by parts.
pub fn encode_publish(
    p: &PublishView<'_>,
    v: ProtocolVersion,
    out: &mut BytesMut,
) -> Result<(), EncodeError> {
    let rem = view_remaining_len(p, v);
    if rem > VARINT_MAX as usize {
        return Err(EncodeError::TooLarge(rem));
    }
    out.reserve(1 + varint_len(rem as u32) + rem);
    let mut h = 0x30 | (p.qos.as_u8() << 1);
    if p.dup {
        h |= 0x08;
    }
    if p.retain {
        h |= 0x01;
    }
    out.put_u8(h);
    put_varint(out, rem as u32);
    put_str(out, p.topic)?;
    if p.qos.as_u8() > 0 {
        out.put_u16(p.packet_id.ok_or(EncodeError::MissingPacketId)?);
    }
    put_props(out, v, p.properties)?;
    out.put_slice(p.payload);
    Ok(())
}

/// Size of the whole encoded packet, fixed header included. Used to honour a peer's
/// maximum packet size before encoding.
pub fn encoded_len(p: &Packet, v: ProtocolVersion) -> usize {
    let rem = remaining_len(p, v);
    1 + varint_len(rem as u32) + rem
}

/// Appends the encoding of `packet` for a connection speaking `version` to `out`.
pub fn encode(
    packet: &Packet,
    version: ProtocolVersion,
    out: &mut BytesMut,
) -> Result<(), EncodeError> {
    let v = version;
    let rem = remaining_len(packet, v);
    if rem > VARINT_MAX as usize {
        return Err(EncodeError::TooLarge(rem));
    }
    out.reserve(1 + varint_len(rem as u32) + rem);
    let start = out.len();
    match packet {
        Packet::Connect(c) => {
            out.put_u8(0x10);
            put_varint(out, rem as u32);
            put_str(out, "MQTT")?;
            out.put_u8(c.version.level());
            let mut flags = 0u8;
            if c.clean_start {
                flags |= 0x02;
            }
            if let Some(w) = &c.will {
                flags |= 0x04 | (w.qos.as_u8() << 3);
                if w.retain {
                    flags |= 0x20;
                }
            }
            if c.password.is_some() {
                flags |= 0x40;
            }
            if c.username.is_some() {
                flags |= 0x80;
            }
            out.put_u8(flags);
            out.put_u16(c.keep_alive);
            put_props(out, c.version, &c.properties)?;
            put_str(out, &c.client_id)?;
            if let Some(w) = &c.will {
                put_props(out, c.version, &w.properties)?;
                put_str(out, &w.topic)?;
                put_binary(out, &w.payload)?;
            }
            if let Some(u) = &c.username {
                put_str(out, u)?;
            }
            if let Some(p) = &c.password {
                put_binary(out, p)?;
            }
        }
        Packet::ConnAck(c) => {
            out.put_u8(0x20);
            put_varint(out, rem as u32);
            out.put_u8(u8::from(c.session_present));
            out.put_u8(if v == V5 {
                c.reason.as_u8()
            } else {
                c.reason.v3_connack_code()
            });
            put_props(out, v, &c.properties)?;
        }
        Packet::Publish(p) => {
            // Written by `encode_publish`, which reserves and checks on its own.
            return encode_publish(&PublishView::of(p), v, out);
        }
        Packet::PubAck(r) => put_resp(out, 0x40, rem, r)?,
        Packet::PubRec(r) => put_resp(out, 0x50, rem, r)?,
        Packet::PubRel(r) => put_resp(out, 0x62, rem, r)?,
        Packet::PubComp(r) => put_resp(out, 0x70, rem, r)?,
        Packet::Subscribe(s) => {
            out.put_u8(0x82);
            put_varint(out, rem as u32);
            out.put_u16(s.packet_id);
            put_props(out, v, &s.properties)?;
            for (f, o) in &s.filters {
                put_str(out, f)?;
                out.put_u8(if v == V5 { o.to_byte() } else { o.qos.as_u8() });
            }
        }
        Packet::SubAck(s) => {
            out.put_u8(0x90);
            put_varint(out, rem as u32);
            out.put_u16(s.packet_id);
            put_props(out, v, &s.properties)?;
            for r in &s.reasons {
                // 3.1.1 knows only granted QoS 0-2 and 0x80 failure.
                let code = if v != V5 && r.is_error() {
                    0x80
                } else {
                    r.as_u8()
                };
                out.put_u8(code);
            }
        }
        Packet::Unsubscribe(u) => {
            out.put_u8(0xA2);
            put_varint(out, rem as u32);
            out.put_u16(u.packet_id);
            put_props(out, v, &u.properties)?;
            for f in &u.filters {
                put_str(out, f)?;
            }
        }
        Packet::UnsubAck(u) => {
            out.put_u8(0xB0);
            put_varint(out, rem as u32);
            out.put_u16(u.packet_id);
            if v == V5 {
                u.properties.encode(out)?;
                for r in &u.reasons {
                    out.put_u8(r.as_u8());
                }
            }
        }
        Packet::PingReq => out.put_slice(&[0xC0, 0]),
        Packet::PingResp => out.put_slice(&[0xD0, 0]),
        Packet::Disconnect(d) => {
            out.put_u8(0xE0);
            put_varint(out, rem as u32);
            if rem > 0 {
                out.put_u8(d.reason.as_u8());
                d.properties.encode(out)?;
            }
        }
        Packet::Auth(a) => {
            out.put_u8(0xF0);
            put_varint(out, rem as u32);
            if rem > 0 {
                out.put_u8(a.reason.as_u8());
                a.properties.encode(out)?;
            }
        }
    }
    debug_assert_eq!(out.len() - start, encoded_len(packet, v));
    Ok(())
}

fn put_resp(out: &mut BytesMut, header: u8, rem: usize, r: &PubResp) -> Result<(), EncodeError> {
    out.put_u8(header);
    put_varint(out, rem as u32);
    out.put_u16(r.packet_id);
    if rem > 2 {
        out.put_u8(r.reason.as_u8());
        if rem > 3 {
            r.properties.encode(out)?;
        }
    }
    Ok(())
}
