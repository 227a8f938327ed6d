//! Wire primitives: big-endian integers, variable byte integers, strings and binary data.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::{DecodeError, EncodeError};

/// Largest value a variable byte integer can carry (spec 1.5.5).
pub const VARINT_MAX: u32 = 268_435_455;

/// A cursor over one packet's bytes. Reads never run past the packet.
pub(crate) struct Reader {
    buf: Bytes,
}

impl Reader {
    pub(crate) fn new(buf: Bytes) -> Self {
        Reader { buf }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.buf.len()
    }

    pub(crate) fn u8(&mut self) -> Result<u8, DecodeError> {
        if self.buf.is_empty() {
            return Err(DecodeError::Malformed("packet ends early"));
        }
        Ok(self.buf.get_u8())
    }

    pub(crate) fn u16(&mut self) -> Result<u16, DecodeError> {
        if self.buf.len() < 2 {
            return Err(DecodeError::Malformed("packet ends early"));
        }
        Ok(self.buf.get_u16())
    }

    pub(crate) fn u32(&mut self) -> Result<u32, DecodeError> {
        if self.buf.len() < 4 {
            return Err(DecodeError::Malformed("packet ends early"));
        }
        Ok(self.buf.get_u32())
    }

    pub(crate) fn varint(&mut self) -> Result<u32, DecodeError> {
        let (value, used) = read_varint(&self.buf)?
            .ok_or(DecodeError::Malformed("variable byte integer ends early"))?;
        self.buf.advance(used);
        Ok(value)
    }

    /// Takes `n` bytes as a zero-copy slice.
    pub(crate) fn take(&mut self, n: usize) -> Result<Bytes, DecodeError> {
        if self.buf.len() < n {
            return Err(DecodeError::Malformed("length exceeds packet"));
        }
        Ok(self.buf.split_to(n))
    }

    /// Takes everything that is left.
    pub(crate) fn rest(&mut self) -> Bytes {
        std::mem::take(&mut self.buf)
    }

    pub(crate) fn binary(&mut self) -> Result<Bytes, DecodeError> {
        let len = self.u16()? as usize;
        self.take(len)
    }

    pub(crate) fn string(&mut self) -> Result<String, DecodeError> {
        let raw = self.binary()?;
        utf8_string(&raw)
    }
}

/// Validates an MQTT UTF-8 string: well-formed UTF-8 (which excludes surrogates) without U+0000.
pub fn utf8_string(raw: &[u8]) -> Result<String, DecodeError> {
    let s = std::str::from_utf8(raw).map_err(|_| DecodeError::InvalidUtf8)?;
    if s.contains('\0') {
        return Err(DecodeError::InvalidUtf8);
    }
    Ok(s.to_owned())
}

/// Reads a variable byte integer from the start of `buf`: `Ok(None)` when more bytes are needed,
/// an error when it is longer than four bytes.
pub(crate) fn read_varint(buf: &[u8]) -> Result<Option<(u32, usize)>, DecodeError> {
    let mut value: u32 = 0;
    for i in 0..4 {
        let Some(&byte) = buf.get(i) else {
            return Ok(None);
        };
        value |= u32::from(byte & 0x7F) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(Some((value, i + 1)));
        }
    }
    Err(DecodeError::Malformed(
        "variable byte integer longer than 4 bytes",
    ))
}

pub(crate) fn varint_len(value: u32) -> usize {
    match value {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

pub(crate) fn put_varint(out: &mut BytesMut, mut value: u32) {
    loop {
        let mut byte = (value & 0x7F) as u8;
        value >>= 7;
        if value > 0 {
            byte |= 0x80;
        }
        out.put_u8(byte);
        if value == 0 {
            break;
        }
    }
}

pub(crate) fn put_binary(out: &mut BytesMut, data: &[u8]) -> Result<(), EncodeError> {
    let len = u16::try_from(data.len()).map_err(|_| EncodeError::FieldTooLong(data.len()))?;
    out.put_u16(len);
    out.put_slice(data);
    Ok(())
}

pub(crate) fn put_str(out: &mut BytesMut, s: &str) -> Result<(), EncodeError> {
    put_binary(out, s.as_bytes())
}
