//! One segment file: batch framing, scanning, and the sparse index.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use bytes::{BufMut, Bytes, BytesMut};

use crate::error::io;
use crate::{Offset, StoreError};

pub(crate) const MAGIC: u8 = 0xFB;
pub(crate) const VERSION: u8 = 1;
pub(crate) const HEADER: usize = 12;
/// An index entry is written at least every this many bytes of segment.
pub(crate) const INDEX_EVERY: u64 = 64 * 1024;
/// Largest batch body accepted, so a corrupt length cannot make us allocate gigabytes.
pub(crate) const MAX_BATCH: usize = 64 * 1024 * 1024;

/// Appends the frame of one batch holding `records`, starting at offset `base`.
pub(crate) fn encode_batch(
    base: Offset,
    records: &[&[u8]],
    out: &mut BytesMut,
) -> Result<(), StoreError> {
    let body_len = 12 + records.iter().map(|r| 4 + r.len()).sum::<usize>();
    if body_len > MAX_BATCH {
        return Err(StoreError::TooLarge {
            size: body_len as u64,
            max: MAX_BATCH as u64,
        });
    }
    out.reserve(HEADER + body_len);
    let start = out.len();
    out.put_u8(MAGIC);
    out.put_u8(VERSION);
    out.put_u16(0);
    out.put_u32(body_len as u32);
    out.put_u32(0); // CRC, patched below
    let body_start = out.len();
    out.put_u64(base.0);
    out.put_u32(records.len() as u32);
    for r in records {
        out.put_u32(r.len() as u32);
        out.put_slice(r);
    }
    let crc = batch_crc(&out[start..start + 8], &out[body_start..]);
    out[start + 8..start + 12].copy_from_slice(&crc.to_be_bytes());
    Ok(())
}

/// The header and body prefix of a batch whose records, already framed as
/// `(length u32 | bytes)*`, are `framed`: 12 header bytes then base offset and count.
pub(crate) fn batch_head(base: Offset, count: u64, framed: &[u8]) -> [u8; HEADER + 12] {
    let body_len = (12 + framed.len()) as u32;
    let mut h = [0u8; HEADER + 12];
    h[0] = MAGIC;
    h[1] = VERSION;
    h[4..8].copy_from_slice(&body_len.to_be_bytes());
    h[12..20].copy_from_slice(&base.0.to_be_bytes());
    h[20..24].copy_from_slice(&(count as u32).to_be_bytes());
    let crc = crc32c::crc32c_append(
        crc32c::crc32c_append(crc32c::crc32c(&h[..8]), &h[12..]),
        framed,
    );
    h[8..12].copy_from_slice(&crc.to_be_bytes());
    h
}

/// The checksum covers the header's first 8 bytes (magic, version, flags, length) and the
/// body, so no bit of a batch can flip unnoticed.
fn batch_crc(header: &[u8], body: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(header), body)
}

/// A batch read back from disk.
pub(crate) struct Batch {
    pub base: Offset,
    pub records: Vec<Bytes>,
    /// Bytes the batch takes in the file, header included.
    pub len: u64,
}

/// Why a scan stopped before the end of the data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stop {
    /// The data ends inside a header or body: a torn write.
    Torn,
    /// The bytes are there but do not check: bad magic, version, length or CRC.
    Corrupt(&'static str),
}

impl Stop {
    pub(crate) fn reason(self) -> &'static str {
        match self {
            Stop::Torn => "the data ends inside the batch",
            Stop::Corrupt(reason) => reason,
        }
    }
}

/// Parses the batch at the start of `data`. `expected` is the offset it must start at.
pub(crate) fn parse_batch(data: &[u8], expected: Offset) -> Result<Batch, Stop> {
    if data.len() < HEADER {
        return Err(Stop::Torn);
    }
    if data[0] != MAGIC {
        return Err(Stop::Corrupt("bad magic"));
    }
    if data[1] != VERSION {
        return Err(Stop::Corrupt("unknown version"));
    }
    let body_len = u32::from_be_bytes([data[4], data[5], data[6], data[7]]) as usize;
    if !(12..=MAX_BATCH).contains(&body_len) {
        return Err(Stop::Corrupt("bad length"));
    }
    let crc = u32::from_be_bytes([data[8], data[9], data[10], data[11]]);
    let Some(body) = data.get(HEADER..HEADER + body_len) else {
        return Err(Stop::Torn);
    };
    if batch_crc(&data[..8], body) != crc {
        return Err(Stop::Corrupt("checksum mismatch"));
    }
    let base = Offset(u64::from_be_bytes(
        body[0..8]
            .try_into()
            .map_err(|_| Stop::Corrupt("short body"))?,
    ));
    if base != expected {
        return Err(Stop::Corrupt("offset out of sequence"));
    }
    let count = u32::from_be_bytes(
        body[8..12]
            .try_into()
            .map_err(|_| Stop::Corrupt("short body"))?,
    );
    let mut records = Vec::with_capacity((count as usize).min(body_len / 4));
    let mut pos = 12;
    for _ in 0..count {
        let len_bytes = body
            .get(pos..pos + 4)
            .ok_or(Stop::Corrupt("record past batch end"))?;
        let len = u32::from_be_bytes(
            len_bytes
                .try_into()
                .map_err(|_| Stop::Corrupt("short body"))?,
        ) as usize;
        pos += 4;
        let rec = body
            .get(pos..pos + len)
            .ok_or(Stop::Corrupt("record past batch end"))?;
        records.push(Bytes::copy_from_slice(rec));
        pos += len;
    }
    if pos != body_len {
        return Err(Stop::Corrupt("trailing bytes in batch"));
    }
    Ok(Batch {
        base,
        records,
        len: (HEADER + body_len) as u64,
    })
}

/// Finds the first batch at or after byte `from` of `data` that checks (magic, version, zero
/// flags, length within the data, checksum, record framing) and whose base offset can follow
/// damage that starts at byte `damaged_at`, where offset `expected` was due: no lower than
/// `expected`, and no higher than one record per 4 damaged bytes allows (every record takes
/// at least its 4-byte length). Returns its position and the batch.
///
/// Used only after a batch failed, to tell damage (valid batches follow) from a torn tail
/// (none do). Cost: a byte compare per byte, looking for the magic; the checksum runs only on
/// bytes that also have the right version and flags, a length that fits the data and an
/// offset in the window. The offset window also keeps a record whose payload happens to hold
/// a whole batch frame from passing for a batch unless its offset fits too.
pub(crate) fn find_batch(
    data: &[u8],
    from: usize,
    expected: Offset,
    damaged_at: usize,
) -> Option<(usize, Batch)> {
    let mut at = from;
    while at + HEADER + 12 <= data.len() {
        at += data[at..].iter().position(|&b| b == MAGIC)?;
        if let Some(batch) = candidate(data, at, expected, damaged_at) {
            return Some((at, batch));
        }
        at += 1;
    }
    None
}

/// The batch at `at`, if it checks and its offset fits the window of [`find_batch`].
fn candidate(data: &[u8], at: usize, expected: Offset, damaged_at: usize) -> Option<Batch> {
    let head = data.get(at..at + HEADER + 12)?;
    if head[1] != VERSION || head[2] != 0 || head[3] != 0 {
        return None;
    }
    let body_len = u32::from_be_bytes([head[4], head[5], head[6], head[7]]) as usize;
    if !(12..=MAX_BATCH).contains(&body_len) || data.len() - at < HEADER + body_len {
        return None;
    }
    let mut base = [0u8; 8];
    base.copy_from_slice(&head[HEADER..HEADER + 8]);
    let base = u64::from_be_bytes(base);
    let highest = expected
        .0
        .saturating_add((at.saturating_sub(damaged_at) / 4) as u64);
    if base < expected.0 || base > highest {
        return None;
    }
    parse_batch(&data[at..], Offset(base)).ok()
}

pub(crate) fn segment_path(dir: &Path, base: Offset) -> PathBuf {
    dir.join(format!("{:020}.log", base.0))
}

/// A segment: its file, where it starts, where it ends.
pub(crate) struct Segment {
    pub base: Offset,
    /// Offset of the next record to append (one past the last record held).
    pub next: Offset,
    /// Bytes of valid batches in the file.
    pub size: u64,
    pub path: PathBuf,
    /// Sparse index: (first offset of a batch, its file position), ascending.
    pub index: Vec<(u64, u64)>,
    pub file: File,
}

impl Segment {
    pub(crate) fn create(dir: &Path, base: Offset) -> Result<Segment, StoreError> {
        let path = segment_path(dir, base);
        let file = OpenOptions::new()
            .create_new(true)
            .read(true)
            .append(true)
            .open(&path)
            .map_err(io("create", &path))?;
        Ok(Segment {
            base,
            next: base,
            size: 0,
            path,
            index: Vec::new(),
            file,
        })
    }

    /// Opens a sealed segment without reading it: it ends where the next one begins
    /// (`next`), its size is its file's, and its index is built when it is read.
    pub(crate) fn open_unread(
        dir: &Path,
        base: Offset,
        next: Offset,
    ) -> Result<Segment, StoreError> {
        let path = segment_path(dir, base);
        let file = OpenOptions::new()
            .read(true)
            .append(true)
            .open(&path)
            .map_err(io("open", &path))?;
        let size = file.metadata().map_err(io("stat", &path))?.len();
        Ok(Segment {
            base,
            next,
            size,
            path,
            index: Vec::new(),
            file,
        })
    }

    /// Opens an existing segment and scans it. For the last segment a torn tail (a bad batch
    /// with no valid batch after it) is cut off (`Ok` with the number of bytes removed); a bad
    /// batch followed by a valid one is [`StoreError::Damaged`] and nothing is cut. In a
    /// sealed segment any bad batch is [`StoreError::Corrupt`].
    pub(crate) fn open(dir: &Path, base: Offset, last: bool) -> Result<(Segment, u64), StoreError> {
        let path = segment_path(dir, base);
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .open(&path)
            .map_err(io("open", &path))?;
        let mut data = Vec::new();
        file.read_to_end(&mut data).map_err(io("read", &path))?;
        let mut seg = Segment {
            base,
            next: base,
            size: 0,
            path: path.clone(),
            index: Vec::new(),
            file,
        };
        let mut pos = 0usize;
        let mut last_indexed: Option<u64> = None;
        while pos < data.len() {
            match parse_batch(&data[pos..], seg.next) {
                Ok(batch) => {
                    if last_indexed.is_none_or(|p| pos as u64 >= p + INDEX_EVERY) {
                        seg.index.push((batch.base.0, pos as u64));
                        last_indexed = Some(pos as u64);
                    }
                    seg.next = Offset(batch.base.0 + batch.records.len() as u64);
                    pos += batch.len as usize;
                }
                Err(stop) if last => {
                    if let Some((next_valid, _)) = find_batch(&data, pos + 1, seg.next, pos) {
                        return Err(StoreError::Damaged {
                            path,
                            position: pos as u64,
                            reason: stop.reason(),
                            next_valid: next_valid as u64,
                        });
                    }
                    // Nothing valid follows: a torn tail, cut below.
                    break;
                }
                Err(Stop::Torn) => {
                    return Err(StoreError::Corrupt {
                        path,
                        position: pos as u64,
                        reason: "truncated batch in a sealed segment",
                    })
                }
                Err(Stop::Corrupt(reason)) => {
                    return Err(StoreError::Corrupt {
                        path,
                        position: pos as u64,
                        reason,
                    })
                }
            }
        }
        seg.size = pos as u64;
        let cut = data.len() as u64 - seg.size;
        if cut > 0 {
            seg.file
                .set_len(seg.size)
                .map_err(io("truncate", &seg.path))?;
            seg.file.sync_data().map_err(io("fsync", &seg.path))?;
        }
        Ok((seg, cut))
    }

    /// Appends an encoded batch that starts at `self.next` and holds `count` records.
    pub(crate) fn append(&mut self, frame: &[u8], count: u64) -> Result<(), StoreError> {
        if self
            .index
            .last()
            .is_none_or(|&(_, p)| self.size >= p + INDEX_EVERY)
        {
            self.index.push((self.next.0, self.size));
        }
        self.file
            .write_all(frame)
            .map_err(io("write", &self.path))?;
        self.size += frame.len() as u64;
        self.next = Offset(self.next.0 + count);
        Ok(())
    }

    /// Appends a batch given as parts (header, body pieces) without joining them first.
    pub(crate) fn append_parts(&mut self, parts: &[&[u8]], count: u64) -> Result<(), StoreError> {
        if self
            .index
            .last()
            .is_none_or(|&(_, p)| self.size >= p + INDEX_EVERY)
        {
            self.index.push((self.next.0, self.size));
        }
        let total: usize = parts.iter().map(|p| p.len()).sum();
        let mut slices: Vec<std::io::IoSlice<'_>> =
            parts.iter().map(|p| std::io::IoSlice::new(p)).collect();
        let mut bufs = &mut slices[..];
        while !bufs.is_empty() {
            match self.file.write_vectored(bufs) {
                Ok(0) => {
                    return Err(StoreError::Io {
                        op: "write",
                        path: self.path.clone(),
                        source: std::io::ErrorKind::WriteZero.into(),
                    })
                }
                Ok(n) => std::io::IoSlice::advance_slices(&mut bufs, n),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io("write", &self.path)(e)),
            }
        }
        self.size += total as u64;
        self.next = Offset(self.next.0 + count);
        Ok(())
    }

    pub(crate) fn sync(&self) -> Result<(), StoreError> {
        self.file.sync_data().map_err(io("fsync", &self.path))
    }

    /// Reads every record at or after `from`, in order.
    pub(crate) fn read_from(
        &self,
        from: Offset,
        out: &mut Vec<(Offset, Bytes)>,
    ) -> Result<(), StoreError> {
        // Start at the last indexed batch at or before `from`.
        let start = match self.index.partition_point(|&(o, _)| o <= from.0) {
            0 => (self.base.0, 0),
            i => self.index[i - 1],
        };
        let mut data = vec![0u8; (self.size - start.1) as usize];
        self.file
            .read_exact_at(&mut data, start.1)
            .map_err(io("read", &self.path))?;
        let mut pos = 0usize;
        let mut expected = Offset(start.0);
        while pos < data.len() {
            let batch =
                parse_batch(&data[pos..], expected).map_err(|stop| StoreError::Corrupt {
                    path: self.path.clone(),
                    position: start.1 + pos as u64,
                    reason: stop.reason(),
                })?;
            let count = batch.records.len() as u64;
            for (i, r) in batch.records.into_iter().enumerate() {
                let o = Offset(batch.base.0 + i as u64);
                if o >= from {
                    out.push((o, r));
                }
            }
            expected = Offset(batch.base.0 + count);
            pos += batch.len as usize;
        }
        Ok(())
    }
}
