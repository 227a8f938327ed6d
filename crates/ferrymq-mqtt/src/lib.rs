//! Sans-IO MQTT 3.1.1 and 5.0 codec.
//!
//! Owns: the packet model ([`Packet`], one tree for both versions with a [`ProtocolVersion`]
//! tag), properties, reason codes, topic syntax, and the limits enforced while decoding.
//!
//! Must not depend on: sockets, an async runtime, the broker. Its only dependencies are `bytes`
//! and `thiserror`.
//!
//! Invariants a change must keep:
//! - [`decode`] never allocates more than the packet it was handed, and refuses a packet whose
//!   declared size exceeds [`Limits::max_packet_size`] before buffering it.
//! - Payloads are slices of the read buffer (`Bytes`), never copies.
//! - Every string that leaves the decoder is valid UTF-8 without U+0000 (MQTT-1.5.4-1/2).
//! - [`decode`] returns `Ok(None)` only when more bytes are needed; it never consumes a partial
//!   packet.

mod decode;
mod encode;
mod error;
mod packet;
mod primitives;
mod properties;
mod reason;
pub mod topic;

pub use decode::{connect_version, decode, packet_len, validate_utf8, Limits};
pub use encode::{encode, encode_publish, encoded_len, PublishView};
pub use error::{DecodeError, EncodeError};
pub use packet::*;
pub use properties::{Properties, PropertyContext, PropertyValues};
pub use reason::ReasonCode;
