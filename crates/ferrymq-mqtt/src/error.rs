//! Errors of the codec. Each decode error maps to the MQTT 5 reason code a server sends.

use crate::ReasonCode;

/// Why a byte sequence is not a valid MQTT packet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The packet does not follow the wire format (bad lengths, reserved bits, bad flags).
    #[error("malformed packet: {0}")]
    Malformed(&'static str),
    /// The packet is well formed but breaks a protocol rule.
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    /// The declared packet size exceeds the negotiated maximum.
    #[error("packet of {size} bytes exceeds the maximum of {max}")]
    PacketTooLarge { size: usize, max: usize },
    /// A string is not valid UTF-8, or contains U+0000.
    #[error("invalid UTF-8 string")]
    InvalidUtf8,
    /// The first packet was not a CONNECT, or named a version we do not speak.
    #[error("unsupported protocol name or level {level}")]
    UnsupportedProtocol { level: u8 },
    /// A PUBLISH topic name is empty or contains wildcards.
    #[error("invalid topic name")]
    TopicNameInvalid,
    /// A property appears on a packet that does not allow it, or twice.
    #[error("property {id:#04x} {problem}")]
    BadProperty { id: u8, problem: &'static str },
}

impl DecodeError {
    /// The reason code a server puts in its DISCONNECT (or CONNACK) for this error.
    pub fn reason_code(&self) -> ReasonCode {
        match self {
            DecodeError::Malformed(_) | DecodeError::InvalidUtf8 => ReasonCode::MalformedPacket,
            DecodeError::Protocol(_) => ReasonCode::ProtocolError,
            DecodeError::PacketTooLarge { .. } => ReasonCode::PacketTooLarge,
            DecodeError::UnsupportedProtocol { .. } => ReasonCode::UnsupportedProtocolVersion,
            DecodeError::TopicNameInvalid => ReasonCode::TopicNameInvalid,
            DecodeError::BadProperty { problem, .. } => {
                if *problem == "is duplicated" || *problem == "is not allowed here" {
                    ReasonCode::ProtocolError
                } else {
                    ReasonCode::MalformedPacket
                }
            }
        }
    }
}

/// Why a packet cannot be encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// The encoded packet would exceed the largest remaining length MQTT can express.
    #[error("packet too large to encode ({0} bytes)")]
    TooLarge(usize),
    /// A string or binary field is longer than 65,535 bytes.
    #[error("field too long ({0} bytes)")]
    FieldTooLong(usize),
    /// The packet needs a packet identifier and has none.
    #[error("missing packet identifier")]
    MissingPacketId,
}
