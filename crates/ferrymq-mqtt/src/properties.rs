//! MQTT 5 properties (spec 2.2.2): one struct for every packet, with the set of properties each
//! packet may carry enforced while decoding.

use bytes::{BufMut, Bytes, BytesMut};

use crate::primitives::{put_binary, put_str, put_varint, varint_len, Reader, VARINT_MAX};
use crate::{DecodeError, EncodeError};

/// The packet (or will) a property block belongs to; decides which properties are allowed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PropertyContext {
    Connect,
    ConnAck,
    Publish,
    Will,
    PubResp,
    Subscribe,
    SubAck,
    Unsubscribe,
    UnsubAck,
    Disconnect,
    Auth,
}

impl PropertyContext {
    fn bit(self) -> u16 {
        1 << (self as u16)
    }
}

/// The values of a property block. Absent properties are `None` or empty.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PropertyValues {
    pub payload_format_indicator: Option<u8>,
    pub message_expiry_interval: Option<u32>,
    pub content_type: Option<String>,
    pub response_topic: Option<String>,
    pub correlation_data: Option<Bytes>,
    /// Several on a PUBLISH sent to a client (one per matching subscription); one on SUBSCRIBE.
    pub subscription_identifiers: Vec<u32>,
    pub session_expiry_interval: Option<u32>,
    pub assigned_client_identifier: Option<String>,
    pub server_keep_alive: Option<u16>,
    pub authentication_method: Option<String>,
    pub authentication_data: Option<Bytes>,
    pub request_problem_information: Option<u8>,
    pub will_delay_interval: Option<u32>,
    pub request_response_information: Option<u8>,
    pub response_information: Option<String>,
    pub server_reference: Option<String>,
    pub reason_string: Option<String>,
    pub receive_maximum: Option<u16>,
    pub topic_alias_maximum: Option<u16>,
    pub topic_alias: Option<u16>,
    pub maximum_qos: Option<u8>,
    pub retain_available: Option<u8>,
    /// Kept in order; names may repeat (spec 3.3.2.3.7).
    pub user_properties: Vec<(String, String)>,
    pub maximum_packet_size: Option<u32>,
    pub wildcard_subscription_available: Option<u8>,
    pub subscription_identifier_available: Option<u8>,
    pub shared_subscription_available: Option<u8>,
}

/// An empty block, for reads of a [`Properties`] that has none.
static EMPTY: PropertyValues = PropertyValues {
    payload_format_indicator: None,
    message_expiry_interval: None,
    content_type: None,
    response_topic: None,
    correlation_data: None,
    subscription_identifiers: Vec::new(),
    session_expiry_interval: None,
    assigned_client_identifier: None,
    server_keep_alive: None,
    authentication_method: None,
    authentication_data: None,
    request_problem_information: None,
    will_delay_interval: None,
    request_response_information: None,
    response_information: None,
    server_reference: None,
    reason_string: None,
    receive_maximum: None,
    topic_alias_maximum: None,
    topic_alias: None,
    maximum_qos: None,
    retain_available: None,
    user_properties: Vec::new(),
    maximum_packet_size: None,
    wildcard_subscription_available: None,
    subscription_identifier_available: None,
    shared_subscription_available: None,
};

/// Properties of any packet: a pointer, null when there are none.
///
/// Most packets on the hot path carry no properties, and the values take ~380 bytes; keeping
/// them behind one pointer keeps `Packet` small, so moving packets through queues is cheap.
/// Reads go through `Deref`; a write through `DerefMut` allocates the block on first use, so
/// guard writes to an empty block with [`Properties::is_empty`] on hot paths.
#[derive(Clone, Default)]
pub struct Properties(Option<Box<PropertyValues>>);

impl std::ops::Deref for Properties {
    type Target = PropertyValues;

    fn deref(&self) -> &PropertyValues {
        self.0.as_deref().unwrap_or(&EMPTY)
    }
}

impl std::ops::DerefMut for Properties {
    fn deref_mut(&mut self) -> &mut PropertyValues {
        self.0.get_or_insert_with(Default::default)
    }
}

impl From<PropertyValues> for Properties {
    fn from(v: PropertyValues) -> Properties {
        if v == EMPTY {
            Properties(None)
        } else {
            Properties(Some(Box::new(v)))
        }
    }
}

impl PartialEq for Properties {
    fn eq(&self, other: &Properties) -> bool {
        **self == **other
    }
}

impl Eq for Properties {}

impl std::fmt::Debug for Properties {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        (**self).fmt(f)
    }
}

use PropertyContext as C;

/// Which contexts allow a property id (spec 2.2.2.2 table).
fn allowed(id: u8) -> Option<u16> {
    let mask = |cs: &[PropertyContext]| cs.iter().fold(0u16, |m, c| m | c.bit());
    Some(match id {
        0x01 | 0x02 | 0x03 | 0x08 | 0x09 => mask(&[C::Publish, C::Will]),
        0x0B => mask(&[C::Publish, C::Subscribe]),
        0x11 => mask(&[C::Connect, C::ConnAck, C::Disconnect]),
        0x12 | 0x13 | 0x1A | 0x24 | 0x25 | 0x28 | 0x29 | 0x2A => mask(&[C::ConnAck]),
        0x15 | 0x16 => mask(&[C::Connect, C::ConnAck, C::Auth]),
        0x17 | 0x19 => mask(&[C::Connect]),
        0x18 => mask(&[C::Will]),
        0x1C => mask(&[C::ConnAck, C::Disconnect]),
        0x1F => mask(&[
            C::ConnAck,
            C::PubResp,
            C::SubAck,
            C::UnsubAck,
            C::Disconnect,
            C::Auth,
        ]),
        0x21 | 0x22 | 0x27 => mask(&[C::Connect, C::ConnAck]),
        0x23 => mask(&[C::Publish]),
        0x26 => 0xFFFF,
        _ => return None,
    })
}

fn set_once<T>(slot: &mut Option<T>, id: u8, value: T) -> Result<(), DecodeError> {
    if slot.is_some() {
        return Err(DecodeError::BadProperty {
            id,
            problem: "is duplicated",
        });
    }
    *slot = Some(value);
    Ok(())
}

fn flag(r: &mut Reader, id: u8) -> Result<u8, DecodeError> {
    let v = r.u8()?;
    if v > 1 {
        return Err(DecodeError::BadProperty {
            id,
            problem: "must be 0 or 1",
        });
    }
    Ok(v)
}

fn nonzero_u16(r: &mut Reader, id: u8) -> Result<u16, DecodeError> {
    let v = r.u16()?;
    if v == 0 {
        return Err(DecodeError::BadProperty {
            id,
            problem: "must not be 0",
        });
    }
    Ok(v)
}

impl Properties {
    pub fn is_empty(&self) -> bool {
        self.0.as_deref().is_none_or(|v| *v == EMPTY)
    }

    /// Reads a length-prefixed property block.
    pub(crate) fn decode(r: &mut Reader, ctx: PropertyContext) -> Result<Properties, DecodeError> {
        let len = r.varint()? as usize;
        if len == 0 {
            return Ok(Properties::default());
        }
        let mut r = Reader::new(r.take(len)?);
        let mut p = PropertyValues::default();
        while r.remaining() > 0 {
            let id = r.varint()?;
            let id = u8::try_from(id).map_err(|_| DecodeError::BadProperty {
                id: 0xFF,
                problem: "is unknown",
            })?;
            let mask = allowed(id).ok_or(DecodeError::BadProperty {
                id,
                problem: "is unknown",
            })?;
            if mask & ctx.bit() == 0 {
                return Err(DecodeError::BadProperty {
                    id,
                    problem: "is not allowed here",
                });
            }
            p.read_one(&mut r, id, ctx)?;
        }
        Ok(p.into())
    }
}

impl PropertyValues {
    fn read_one(
        &mut self,
        r: &mut Reader,
        id: u8,
        ctx: PropertyContext,
    ) -> Result<(), DecodeError> {
        match id {
            0x01 => set_once(&mut self.payload_format_indicator, id, flag(r, id)?),
            0x02 => set_once(&mut self.message_expiry_interval, id, r.u32()?),
            0x03 => set_once(&mut self.content_type, id, r.string()?),
            0x08 => {
                let topic = r.string()?;
                if !crate::topic::valid_topic_name(&topic) {
                    return Err(DecodeError::BadProperty {
                        id,
                        problem: "is not a valid topic",
                    });
                }
                set_once(&mut self.response_topic, id, topic)
            }
            0x09 => set_once(&mut self.correlation_data, id, r.binary()?),
            0x0B => {
                let v = r.varint()?;
                if v == 0 {
                    return Err(DecodeError::BadProperty {
                        id,
                        problem: "must not be 0",
                    });
                }
                if ctx == C::Subscribe && !self.subscription_identifiers.is_empty() {
                    return Err(DecodeError::BadProperty {
                        id,
                        problem: "is duplicated",
                    });
                }
                self.subscription_identifiers.push(v);
                Ok(())
            }
            0x11 => set_once(&mut self.session_expiry_interval, id, r.u32()?),
            0x12 => set_once(&mut self.assigned_client_identifier, id, r.string()?),
            0x13 => set_once(&mut self.server_keep_alive, id, r.u16()?),
            0x15 => set_once(&mut self.authentication_method, id, r.string()?),
            0x16 => set_once(&mut self.authentication_data, id, r.binary()?),
            0x17 => set_once(&mut self.request_problem_information, id, flag(r, id)?),
            0x18 => set_once(&mut self.will_delay_interval, id, r.u32()?),
            0x19 => set_once(&mut self.request_response_information, id, flag(r, id)?),
            0x1A => set_once(&mut self.response_information, id, r.string()?),
            0x1C => set_once(&mut self.server_reference, id, r.string()?),
            0x1F => set_once(&mut self.reason_string, id, r.string()?),
            0x21 => set_once(&mut self.receive_maximum, id, nonzero_u16(r, id)?),
            0x22 => set_once(&mut self.topic_alias_maximum, id, r.u16()?),
            0x23 => set_once(&mut self.topic_alias, id, nonzero_u16(r, id)?),
            0x24 => set_once(&mut self.maximum_qos, id, flag(r, id)?),
            0x25 => set_once(&mut self.retain_available, id, flag(r, id)?),
            0x26 => {
                let k = r.string()?;
                let v = r.string()?;
                self.user_properties.push((k, v));
                Ok(())
            }
            0x27 => {
                let v = r.u32()?;
                if v == 0 {
                    return Err(DecodeError::BadProperty {
                        id,
                        problem: "must not be 0",
                    });
                }
                set_once(&mut self.maximum_packet_size, id, v)
            }
            0x28 => set_once(&mut self.wildcard_subscription_available, id, flag(r, id)?),
            0x29 => set_once(
                &mut self.subscription_identifier_available,
                id,
                flag(r, id)?,
            ),
            0x2A => set_once(&mut self.shared_subscription_available, id, flag(r, id)?),
            _ => Err(DecodeError::BadProperty {
                id,
                problem: "is unknown",
            }),
        }
    }

    /// Length of the property block without its own length prefix.
    pub(crate) fn body_len(&self) -> usize {
        let s = |o: &Option<String>| o.as_ref().map_or(0, |v| 3 + v.len());
        let b = |o: &Option<Bytes>| o.as_ref().map_or(0, |v| 3 + v.len());
        let n = |present: bool, width: usize| if present { 1 + width } else { 0 };
        n(self.payload_format_indicator.is_some(), 1)
            + n(self.message_expiry_interval.is_some(), 4)
            + s(&self.content_type)
            + s(&self.response_topic)
            + b(&self.correlation_data)
            + self
                .subscription_identifiers
                .iter()
                .map(|v| 1 + varint_len(*v))
                .sum::<usize>()
            + n(self.session_expiry_interval.is_some(), 4)
            + s(&self.assigned_client_identifier)
            + n(self.server_keep_alive.is_some(), 2)
            + s(&self.authentication_method)
            + b(&self.authentication_data)
            + n(self.request_problem_information.is_some(), 1)
            + n(self.will_delay_interval.is_some(), 4)
            + n(self.request_response_information.is_some(), 1)
            + s(&self.response_information)
            + s(&self.server_reference)
            + s(&self.reason_string)
            + n(self.receive_maximum.is_some(), 2)
            + n(self.topic_alias_maximum.is_some(), 2)
            + n(self.topic_alias.is_some(), 2)
            + n(self.maximum_qos.is_some(), 1)
            + n(self.retain_available.is_some(), 1)
            + self
                .user_properties
                .iter()
                .map(|(k, v)| 5 + k.len() + v.len())
                .sum::<usize>()
            + n(self.maximum_packet_size.is_some(), 4)
            + n(self.wildcard_subscription_available.is_some(), 1)
            + n(self.subscription_identifier_available.is_some(), 1)
            + n(self.shared_subscription_available.is_some(), 1)
    }

    /// Length of the block including its length prefix.
    pub fn encoded_len(&self) -> usize {
        let body = self.body_len();
        varint_len(body as u32) + body
    }

    pub(crate) fn encode(&self, out: &mut BytesMut) -> Result<(), EncodeError> {
        let body = self.body_len();
        if body > VARINT_MAX as usize {
            return Err(EncodeError::TooLarge(body));
        }
        put_varint(out, body as u32);
        let u8p = |out: &mut BytesMut, id: u8, v: Option<u8>| {
            if let Some(v) = v {
                out.put_u8(id);
                out.put_u8(v);
            }
        };
        let u16p = |out: &mut BytesMut, id: u8, v: Option<u16>| {
            if let Some(v) = v {
                out.put_u8(id);
                out.put_u16(v);
            }
        };
        let u32p = |out: &mut BytesMut, id: u8, v: Option<u32>| {
            if let Some(v) = v {
                out.put_u8(id);
                out.put_u32(v);
            }
        };
        fn strp(out: &mut BytesMut, id: u8, v: &Option<String>) -> Result<(), EncodeError> {
            if let Some(v) = v {
                out.put_u8(id);
                put_str(out, v)?;
            }
            Ok(())
        }
        fn binp(out: &mut BytesMut, id: u8, v: &Option<Bytes>) -> Result<(), EncodeError> {
            if let Some(v) = v {
                out.put_u8(id);
                put_binary(out, v)?;
            }
            Ok(())
        }
        u8p(out, 0x01, self.payload_format_indicator);
        u32p(out, 0x02, self.message_expiry_interval);
        strp(out, 0x03, &self.content_type)?;
        strp(out, 0x08, &self.response_topic)?;
        binp(out, 0x09, &self.correlation_data)?;
        for id in &self.subscription_identifiers {
            out.put_u8(0x0B);
            put_varint(out, *id);
        }
        u32p(out, 0x11, self.session_expiry_interval);
        strp(out, 0x12, &self.assigned_client_identifier)?;
        u16p(out, 0x13, self.server_keep_alive);
        strp(out, 0x15, &self.authentication_method)?;
        binp(out, 0x16, &self.authentication_data)?;
        u8p(out, 0x17, self.request_problem_information);
        u32p(out, 0x18, self.will_delay_interval);
        u8p(out, 0x19, self.request_response_information);
        strp(out, 0x1A, &self.response_information)?;
        strp(out, 0x1C, &self.server_reference)?;
        strp(out, 0x1F, &self.reason_string)?;
        u16p(out, 0x21, self.receive_maximum);
        u16p(out, 0x22, self.topic_alias_maximum);
        u16p(out, 0x23, self.topic_alias);
        u8p(out, 0x24, self.maximum_qos);
        u8p(out, 0x25, self.retain_available);
        for (k, v) in &self.user_properties {
            out.put_u8(0x26);
            put_str(out, k)?;
            put_str(out, v)?;
        }
        u32p(out, 0x27, self.maximum_packet_size);
        u8p(out, 0x28, self.wildcard_subscription_available);
        u8p(out, 0x29, self.subscription_identifier_available);
        u8p(out, 0x2A, self.shared_subscription_available);
        Ok(())
    }
}
