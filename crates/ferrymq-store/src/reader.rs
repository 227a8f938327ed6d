//! Reading single records back by offset beside a live writer: [`LogReader`].
//!
//! A work queue keeps only a message's [`Offset`]; when the message is leased the broker reads
//! that one record back. The reader shares nothing with [`crate::Log`]: it lists the directory
//! and reads the segment files, read-only and without the data-dir lock, while the writer
//! (another thread) keeps appending, rolling and reclaiming. It relies on three things the
//! writer does, and a change to the writer must keep them:
//! - Bytes are only ever appended, whole batches in offset order, to the newest segment; a
//!   concurrent `pread` sees a prefix of them. So a batch cut short at the end of the newest
//!   segment is still being written: "not yet" (`Ok(None)`), never damage.
//! - A segment file is created only after the last batch of the previous one is written. So
//!   once a later segment is listed, an earlier one is complete, and a short or bad batch in
//!   it is damage.
//! - Segments are reclaimed from the front only, so an offset below the first listed segment
//!   is gone for good and the directory need not be listed again to say so.
//!
//! The one exception is the writer's undo after a failed write (a full disk), which cuts the
//! newest segment back and may delete a segment it had just created. What the reader learnt
//! of that segment can then be stale; it shows as a bad batch, so before answering `Err` the
//! reader forgets everything it learnt and looks once more from the start of the segment.
//!
//! Cost: a read answered from a cached chunk does no system call. Otherwise the reader
//! starts at the nearest known batch boundary at or before the offset (its sparse index, one
//! entry per [`INDEX_EVERY`] bytes, built while scanning forward; or the end of what it has
//! scanned; or the end of a cached chunk) and reads [`CHUNK`] bytes with one `pread` (a batch
//! larger than that is read whole), checks and decodes every complete batch in them, and
//! caches the decoded records. A sequential drain therefore costs one `pread` and one `fstat`
//! per chunk; a random read in scanned ground costs one chunk. A few chunks are cached
//! ([`CACHED_CHUNKS`], [`CACHE_BYTES`]), so that several drains at different places in the
//! log (one per queue) do not evict each other's chunk on every read. Each record handed out
//! is its own allocation (copied out of the read buffer by `parse_batch`), so a leased
//! message held for minutes pins its own bytes and no chunk.

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use bytes::Bytes;

use crate::error::io;
use crate::log::segment_bases;
use crate::segment::{parse_batch, segment_path, Batch, Stop, HEADER, INDEX_EVERY};
use crate::{Offset, StoreError};

/// Bytes read per `pread`. A 256 KiB chunk holds ~250 records of 1 KiB, so a drain makes one
/// system call per ~250 reads, while the memory held (the chunk's decoded records) stays
/// small next to a work queue's in-memory index.
const CHUNK: usize = 256 * 1024;

/// Chunks cached at most, least recently used dropped first: one per concurrent drain.
const CACHED_CHUNKS: usize = 4;

/// Record bytes cached at most, beyond the newest chunk (always kept, even when it holds one
/// batch of up to 64 MiB), so a few large batches cannot pin much memory.
const CACHE_BYTES: usize = 1024 * 1024;

/// Segment files kept open at once, least recently used closed first. A drain touches one
/// or two segments; the rest serve the odd random read. Closing a segment also drops its
/// sparse index (16 bytes per 64 KiB of segment), which bounds the index memory to this
/// many segments however large the backlog.
const MAX_OPEN: usize = 16;

/// Reads records back by offset from a log directory that a [`crate::Log`] keeps writing.
///
/// Read-only: it takes no lock and changes nothing on disk. It is `Send`, not `Sync`: one
/// thread owns it (reads take `&mut self` to update the cache).
pub struct LogReader {
    dir: PathBuf,
    /// Base offsets of the segment files as last listed, ascending.
    bases: Vec<u64>,
    /// Segments with an open file, at most [`MAX_OPEN`].
    open: Vec<OpenSegment>,
    /// Ticks on every use of an open segment, for least-recently-used closing.
    clock: u64,
    /// Records decoded from the last chunks read.
    cache: Cache,
    /// Reused read buffer, [`CHUNK`] bytes.
    buf: Vec<u8>,
    stats: ReaderStats,
}

impl std::fmt::Debug for LogReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogReader")
            .field("dir", &self.dir)
            .field("segments", &self.bases.len())
            .field("open", &self.open.len())
            .field("cached_chunks", &self.cache.chunks.len())
            .field("stats", &self.stats)
            .finish()
    }
}

/// What a [`LogReader`] has done so far, for metrics and to check its cost model in tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ReaderStats {
    /// Reads answered from a cached chunk, without a system call.
    pub cache_hits: u64,
    /// `pread` calls: one per chunk, or per batch larger than a chunk.
    pub preads: u64,
    /// Bytes those calls returned.
    pub bytes_read: u64,
    /// Directory listings, the one at open included.
    pub listings: u64,
}

/// A batch boundary: the offset of the batch that starts at byte `pos` of a segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Boundary {
    offset: u64,
    pos: u64,
}

impl Boundary {
    fn after(self, batch: &Batch) -> Boundary {
        Boundary {
            offset: batch.base.0 + batch.records.len() as u64,
            pos: self.pos + batch.len,
        }
    }
}

/// What the reader knows of one segment it has open.
struct OpenSegment {
    base: u64,
    path: PathBuf,
    file: File,
    last_used: u64,
    /// Sparse index, ascending, at least [`INDEX_EVERY`] bytes apart; starts with the
    /// segment's first byte. Covers only scanned ground.
    index: Vec<Boundary>,
    /// Every batch before this boundary has been read and checked.
    scanned: Boundary,
}

impl OpenSegment {
    /// Records that the batch starting at `at` checked, extending the scanned ground and the
    /// index when it lies at the scanned end.
    fn learn(&mut self, at: Boundary, batch: &Batch) {
        if at != self.scanned {
            return;
        }
        if self
            .index
            .last()
            .is_none_or(|last| at.pos >= last.pos + INDEX_EVERY)
        {
            self.index.push(at);
        }
        self.scanned = at.after(batch);
    }

    /// Where to read for `offset`: the nearest known boundary at or before it, and how many
    /// bytes to read from there.
    ///
    /// A read that continues where the scanned ground or a cached chunk ends is taken for a
    /// drain and reads a whole [`CHUNK`]. One that starts at an index entry is taken for a
    /// random read: it reads only up to the next known boundary past `offset` (at most
    /// [`INDEX_EVERY`] bytes and a batch), a quarter of a chunk. Its successor, if it turns
    /// out to be a drain, continues from its end with whole chunks.
    fn start_for(&self, offset: u64, cache: &Cache) -> (Boundary, usize) {
        let (mut best, mut want) = if offset >= self.scanned.offset {
            (self.scanned, CHUNK)
        } else {
            // `self.index[0]` is the segment's start, at or before any offset in it.
            let i = self.index.partition_point(|b| b.offset <= offset).max(1);
            let next = self.index.get(i).unwrap_or(&self.scanned);
            let start = self.index[i - 1];
            let span = usize::try_from(next.pos - start.pos).unwrap_or(CHUNK);
            (start, span.min(CHUNK))
        };
        for c in &cache.chunks {
            if c.segment == self.base && c.end.offset <= offset && c.end.pos >= best.pos {
                (best, want) = (c.end, CHUNK);
            }
        }
        (best, want)
    }

    fn unlinked(&self) -> Result<bool, StoreError> {
        let meta = self.file.metadata().map_err(io("stat", &self.path))?;
        Ok(meta.nlink() == 0)
    }
}

/// Decoded records of consecutive batches of one segment.
struct Chunk {
    segment: u64,
    /// Offset of `records[0]`.
    first: u64,
    records: Vec<Bytes>,
    /// The boundary after the last batch.
    end: Boundary,
    /// Bytes of the records.
    bytes: usize,
    last_used: u64,
}

impl Chunk {
    fn get(&self, offset: u64) -> Option<&Bytes> {
        let i = offset.checked_sub(self.first)?;
        self.records.get(usize::try_from(i).ok()?)
    }
}

/// The chunks kept, at most [`CACHED_CHUNKS`] and [`CACHE_BYTES`] beyond the newest.
#[derive(Default)]
struct Cache {
    chunks: Vec<Chunk>,
    clock: u64,
}

impl Cache {
    fn get(&mut self, offset: u64) -> Option<Bytes> {
        self.clock += 1;
        let c = self.chunks.iter_mut().find(|c| c.get(offset).is_some())?;
        c.last_used = self.clock;
        c.get(offset).cloned()
    }

    fn insert(&mut self, mut chunk: Chunk) {
        self.clock += 1;
        chunk.last_used = self.clock;
        self.chunks.push(chunk);
        loop {
            let bytes: usize = self.chunks.iter().map(|c| c.bytes).sum();
            let newest = self.chunks.len() - 1;
            let over = self.chunks.len() > CACHED_CHUNKS
                || bytes - self.chunks[newest].bytes > CACHE_BYTES;
            let lru = (0..newest).min_by_key(|&k| self.chunks[k].last_used);
            match lru {
                Some(k) if over => {
                    self.chunks.swap_remove(k);
                }
                _ => break,
            }
        }
    }
}

/// One chunk read from a segment.
struct Loaded {
    chunk: Chunk,
    /// The read reached the end of the file's data (a short read).
    at_end: bool,
    /// Bytes of an incomplete batch after `chunk.end`, when `at_end`.
    tail: u64,
    /// A complete batch at `chunk.end` that does not check, and why.
    bad: Option<&'static str>,
}

/// How looking for an offset in one segment ended.
enum Scan {
    Found(Bytes),
    /// The complete batches end at `at` before the offset; `tail` bytes of an incomplete
    /// batch follow.
    End {
        at: Boundary,
        tail: u64,
    },
    /// The file is no longer in the directory (reclaimed, or removed by the writer's undo).
    Gone,
}

impl LogReader {
    /// Opens a reader on the log directory `dir` (which must exist). Takes no lock and
    /// changes nothing: the writer may be running.
    pub fn open(dir: &Path) -> Result<LogReader, StoreError> {
        let mut reader = LogReader {
            dir: dir.to_path_buf(),
            bases: Vec::new(),
            open: Vec::new(),
            clock: 0,
            cache: Cache::default(),
            buf: Vec::new(),
            stats: ReaderStats::default(),
        };
        reader.relist()?;
        Ok(reader)
    }

    /// The record at `offset`, checked against its batch's CRC.
    ///
    /// `Ok(None)` when the log does not hold it: below the first segment on disk (reclaimed),
    /// or at or after the end of what is completely written so far (a batch cut short at the
    /// end of the newest segment is still being written). `Err` for a complete batch that
    /// does not check ([`StoreError::Corrupt`], naming the file and byte), a segment that ends
    /// before the next one begins, or an I/O error.
    ///
    /// A record decoded into a cached chunk before its segment was reclaimed may still be
    /// returned from the cache (the same bytes); any read that goes to the file first checks
    /// that the file is still in the directory.
    pub fn read(&mut self, offset: Offset) -> Result<Option<Bytes>, StoreError> {
        if let Some(r) = self.cache.get(offset.0) {
            self.stats.cache_hits += 1;
            return Ok(Some(r));
        }
        match self.locate(offset.0) {
            Err(StoreError::Corrupt { .. }) => {
                // What we learnt may be stale (the writer cut a segment back after a failed
                // write): forget it all and look once more from the segment's start.
                self.open.clear();
                self.cache.chunks.clear();
                self.relist()?;
                self.locate(offset.0)
            }
            other => other,
        }
    }

    /// What this reader has done so far.
    pub fn stats(&self) -> ReaderStats {
        self.stats
    }

    /// Finds `offset` given the segments listed; lists again when it is past the newest
    /// segment's complete data or a file has gone.
    fn locate(&mut self, offset: u64) -> Result<Option<Bytes>, StoreError> {
        let mut listed = false;
        // Each pass either answers or lists again; four cover: the newest segment ended,
        // list, the offset is in the next one, whose file went (the writer's undo), list.
        for _ in 0..4 {
            let i = self.bases.partition_point(|&b| b <= offset);
            if i == 0 {
                if self.bases.is_empty() && !listed {
                    self.relist()?;
                    listed = true;
                    continue;
                }
                return Ok(None);
            }
            let base = self.bases[i - 1];
            let sealed = i < self.bases.len();
            match self.scan(base, offset)? {
                Scan::Found(record) => return Ok(Some(record)),
                Scan::Gone => {
                    self.open.retain(|s| s.base != base);
                    self.relist()?;
                    listed = true;
                }
                Scan::End { at, tail } if sealed => {
                    return Err(StoreError::Corrupt {
                        path: segment_path(&self.dir, Offset(base)),
                        position: at.pos,
                        reason: if tail > 0 {
                            Stop::Torn.reason()
                        } else {
                            "the segment ends before the next segment's first offset"
                        },
                    });
                }
                Scan::End { .. } if !listed => {
                    self.relist()?;
                    listed = true;
                }
                Scan::End { .. } => return Ok(None),
            }
        }
        Ok(None)
    }

    /// Reads forward in segment `base` from the nearest known boundary until `offset` is
    /// found or the data ends.
    fn scan(&mut self, base: u64, offset: u64) -> Result<Scan, StoreError> {
        let Some(k) = self.segment(base)? else {
            return Ok(Scan::Gone);
        };
        let seg = &mut self.open[k];
        if seg.unlinked()? {
            return Ok(Scan::Gone);
        }
        let (mut at, mut want) = seg.start_for(offset, &self.cache);
        loop {
            let loaded = load(seg, at, want, &mut self.buf, &mut self.stats)?;
            if let Some(record) = loaded.chunk.get(offset).cloned() {
                self.cache.insert(loaded.chunk);
                return Ok(Scan::Found(record));
            }
            if let Some(reason) = loaded.bad {
                return Err(StoreError::Corrupt {
                    path: seg.path.clone(),
                    position: loaded.chunk.end.pos,
                    reason,
                });
            }
            if loaded.at_end || loaded.chunk.end == at {
                return Ok(Scan::End {
                    at: loaded.chunk.end,
                    tail: loaded.tail,
                });
            }
            (at, want) = (loaded.chunk.end, CHUNK);
        }
    }

    /// The open segment `base`, opening it (and closing the least recently used one) if
    /// need be; `None` when its file is gone.
    fn segment(&mut self, base: u64) -> Result<Option<usize>, StoreError> {
        self.clock += 1;
        if let Some(k) = self.open.iter().position(|s| s.base == base) {
            self.open[k].last_used = self.clock;
            return Ok(Some(k));
        }
        let path = segment_path(&self.dir, Offset(base));
        let file = match File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io("open", &path)(e)),
        };
        if self.open.len() >= MAX_OPEN {
            if let Some(lru) = (0..self.open.len()).min_by_key(|&k| self.open[k].last_used) {
                self.open.swap_remove(lru);
            }
        }
        let start = Boundary {
            offset: base,
            pos: 0,
        };
        self.open.push(OpenSegment {
            base,
            path,
            file,
            last_used: self.clock,
            index: vec![start],
            scanned: start,
        });
        Ok(Some(self.open.len() - 1))
    }

    /// Lists the directory again; forgets segments no longer in it.
    fn relist(&mut self) -> Result<(), StoreError> {
        self.stats.listings += 1;
        self.bases = segment_bases(&self.dir)?;
        let bases = &self.bases;
        self.open.retain(|s| bases.binary_search(&s.base).is_ok());
        self.cache
            .chunks
            .retain(|c| bases.binary_search(&c.segment).is_ok());
        Ok(())
    }
}

/// Reads `want` bytes (at most a chunk) of `seg` from `at` (one `pread`, or two when the first
/// batch is larger) and decodes every complete batch in them.
fn load(
    seg: &mut OpenSegment,
    at: Boundary,
    want: usize,
    buf: &mut Vec<u8>,
    stats: &mut ReaderStats,
) -> Result<Loaded, StoreError> {
    buf.resize(want, 0);
    let n = read_at(seg, buf, at.pos, stats)?;
    let mut loaded = Loaded {
        chunk: Chunk {
            segment: seg.base,
            first: at.offset,
            records: Vec::new(),
            end: at,
            bytes: 0,
            last_used: 0,
        },
        at_end: n < want,
        tail: 0,
        bad: None,
    };
    let mut q = 0;
    while q < n {
        let end = loaded.chunk.end;
        match parse_batch(&buf[q..n], Offset(end.offset)) {
            Ok(batch) => {
                q += batch.len as usize;
                seg.learn(end, &batch);
                loaded.push(batch);
            }
            // parse_batch checks the header (and the length's bound) before it finds the
            // body short, so the length is trustworthy here.
            Err(Stop::Torn) if q == 0 && !loaded.at_end => {
                let len = u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]) as usize;
                let mut big = vec![0u8; HEADER + len];
                let m = read_at(seg, &mut big, at.pos, stats)?;
                if m < big.len() {
                    (loaded.at_end, loaded.tail) = (true, m as u64);
                    break;
                }
                match parse_batch(&big, Offset(end.offset)) {
                    Ok(batch) => {
                        seg.learn(end, &batch);
                        loaded.push(batch);
                    }
                    Err(stop) => loaded.bad = Some(stop.reason()),
                }
                break;
            }
            Err(Stop::Torn) => {
                if loaded.at_end {
                    loaded.tail = (n - q) as u64;
                }
                break;
            }
            Err(Stop::Corrupt(reason)) => {
                loaded.bad = Some(reason);
                break;
            }
        }
    }
    Ok(loaded)
}

impl Loaded {
    fn push(&mut self, batch: Batch) {
        self.chunk.end = self.chunk.end.after(&batch);
        self.chunk.bytes += batch.records.iter().map(|r| r.len()).sum::<usize>();
        self.chunk.records.extend(batch.records);
    }
}

/// Fills `buf` from byte `pos` of the segment, or as much of it as the file holds; returns
/// the bytes read.
fn read_at(
    seg: &OpenSegment,
    buf: &mut [u8],
    pos: u64,
    stats: &mut ReaderStats,
) -> Result<usize, StoreError> {
    let mut n = 0;
    while n < buf.len() {
        stats.preads += 1;
        match seg.file.read_at(&mut buf[n..], pos + n as u64) {
            Ok(0) => break,
            Ok(m) => n += m,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io("read", &seg.path)(e)),
        }
    }
    stats.bytes_read += n as u64;
    Ok(n)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use crate::{Log, LogConfig};

    fn log(dir: &Path, segment_bytes: u64) -> Log {
        Log::open(LogConfig {
            dir: dir.to_path_buf(),
            segment_bytes,
        })
        .unwrap()
        .0
    }

    #[test]
    fn log_reader_is_send() {
        fn send<T: Send>() {}
        send::<LogReader>();
    }

    #[test]
    fn open_files_are_capped_and_the_least_recently_used_is_closed() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = log(dir.path(), 100);
        // A 100-byte record makes a batch over 100 bytes: one record per segment.
        for _ in 0..(MAX_OPEN as u64 * 3) {
            w.append(&[&[1u8; 100]]).unwrap();
        }
        assert_eq!(w.segment_count(), MAX_OPEN * 3);
        let mut r = LogReader::open(dir.path()).unwrap();
        for i in 0..(MAX_OPEN as u64 * 3) {
            assert!(r.read(Offset(i)).unwrap().is_some());
            assert!(r.open.len() <= MAX_OPEN);
        }
        assert_eq!(r.open.len(), MAX_OPEN);
        // The newest segments are the ones still open.
        let oldest_open = r.open.iter().map(|s| s.base).min().unwrap();
        assert_eq!(oldest_open, MAX_OPEN as u64 * 2);
    }

    #[test]
    fn the_sparse_index_grows_while_scanning_and_a_random_read_starts_near_its_offset() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = log(dir.path(), 64 << 20);
        let rec = vec![7u8; 1000];
        for _ in 0..4000 {
            w.append(&[&rec]).unwrap();
        }
        let mut r = LogReader::open(dir.path()).unwrap();
        assert!(r.read(Offset(3999)).unwrap().is_some());
        let seg = &r.open[0];
        // ~4 MB scanned: one entry per 64 KiB, no more.
        let size = 4000 * (HEADER as u64 + 16 + 1000);
        assert_eq!(seg.scanned.pos, size);
        // Batches of 1028 bytes: an entry every 64 batches (65,792 bytes).
        assert_eq!(seg.index.len(), 4000usize.div_ceil(64));
        for pair in seg.index.windows(2) {
            assert!(pair[1].pos >= pair[0].pos + INDEX_EVERY);
        }
        // A read back in the middle reads from the index entry before it to the one after,
        // not from the start of the segment, nor a whole chunk.
        let before = r.stats();
        assert_eq!(r.read(Offset(2000)).unwrap().unwrap().as_ref(), &rec[..]);
        let after = r.stats();
        assert_eq!(after.preads - before.preads, 1);
        assert_eq!(after.bytes_read - before.bytes_read, 64 * 1028);
        // A drain that goes on from there reads whole chunks again.
        for o in 2001..3000 {
            assert!(r.read(Offset(o)).unwrap().is_some());
        }
        let drained = r.stats().bytes_read - after.bytes_read;
        assert!(drained >= 999 * 1028, "{drained}");
        assert!(r.stats().preads - after.preads <= 5);
    }

    #[test]
    fn interleaved_drains_keep_their_own_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = log(dir.path(), 64 << 20);
        let rec = vec![3u8; 1000];
        for _ in 0..4000 {
            w.append(&[&rec, &rec]).unwrap();
        }
        let mut r = LogReader::open(dir.path()).unwrap();
        // Three queues drain at three places in the log, one read each in turn.
        // Their first reads scan from the start of the segment to find their places.
        let starts = [0u64, 2500, 5000];
        for s in starts {
            assert!(r.read(Offset(s)).unwrap().is_some());
        }
        let found = r.stats().preads;
        for i in 1..2500 {
            for s in starts {
                assert!(r.read(Offset(s + i)).unwrap().is_some());
            }
        }
        // Each drain then reads its ~2.5 MB once, 10 chunks, not a chunk per read (7500).
        let preads = r.stats().preads - found;
        assert!(preads <= 3 * 11, "{preads} preads");
        assert!(r.cache.chunks.len() <= CACHED_CHUNKS);
    }

    #[test]
    fn cached_bytes_are_bounded_beyond_the_newest_chunk() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = log(dir.path(), 64 << 20);
        let big = vec![1u8; 700 * 1024];
        for _ in 0..4 {
            w.append(&[&big]).unwrap();
        }
        let mut r = LogReader::open(dir.path()).unwrap();
        for o in 0..4 {
            assert_eq!(r.read(Offset(o)).unwrap().unwrap().len(), big.len());
            let cached: usize = r.cache.chunks.iter().map(|c| c.bytes).sum();
            let newest = r.cache.chunks.iter().map(|c| c.bytes).max().unwrap();
            assert!(cached - newest <= CACHE_BYTES, "{cached}");
        }
        assert_eq!(r.cache.chunks.len(), 2);
    }
}
