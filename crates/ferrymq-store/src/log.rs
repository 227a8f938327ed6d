//! The log: a directory of segments, one of them active.

use std::fs;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use crate::error::io;
use crate::segment::{batch_head, encode_batch, Segment, MAX_BATCH};
use crate::{Offset, StoreError};

/// How the log is laid out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    pub dir: PathBuf,
    /// A segment is sealed and a new one started once it reaches this many bytes.
    pub segment_bytes: u64,
}

/// What opening the log found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    pub segments: usize,
    /// First offset still held.
    pub start: Offset,
    /// Offset the next append will get.
    pub next: Offset,
    /// Bytes cut from the tail of the last segment (a torn write).
    pub truncated_bytes: u64,
    /// Where the torn tail was cut, if one was.
    pub torn_tail: Option<TornTail>,
    pub took: Duration,
}

/// A torn tail cut off the newest segment when the log was opened: the last batch was
/// incomplete or did not check, and no valid batch followed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TornTail {
    pub path: PathBuf,
    /// Where the cut batch began (the file's new length).
    pub position: u64,
    pub bytes: u64,
}

/// The end of the log at one moment (see [`Log::undo`]).
#[derive(Debug, Clone, Copy)]
struct Mark {
    segments: usize,
    size: u64,
    next: Offset,
    index: usize,
}

/// An append-only log of opaque records.
///
/// Guarantees: [`Log::append`] returns once the batch is written to the OS (it survives a
/// process crash, not a power loss); [`Log::sync`] makes everything appended so far durable
/// (fdatasync). Callers batch appends and sync once per group (group commit).
pub struct Log {
    config: LogConfig,
    /// Sealed segments first, the active one last; never empty.
    segments: Vec<Segment>,
    scratch: BytesMut,
    /// The active segment has appends not yet synced.
    dirty: bool,
}

impl Log {
    /// Opens (or creates) the log in `config.dir`, recovering from a crash: a torn tail (a
    /// last batch that is incomplete or does not check, with nothing valid after it) is cut
    /// off. A bad batch anywhere else is damage, not a crash: it is an error
    /// ([`StoreError::Damaged`], [`StoreError::Corrupt`]), nothing is changed, and
    /// [`crate::recover`] is the way on.
    pub fn open(config: LogConfig) -> Result<(Log, Recovery), StoreError> {
        Log::open_from(config, Offset(0))
    }

    /// [`Log::open`], reading and checking only the segments that hold records at or after
    /// `read_from` (where the caller's replay starts, e.g. its newest durable checkpoint).
    /// Sealed segments wholly before it are opened without being read: they were synced
    /// when sealed, nothing replays them, and a record read from one later is checked then
    /// (its batch's CRC). A log of many gigabytes that only a queue's messages keep (issue
    /// 11) opens in the time it takes to read its tail, not all of it.
    pub fn open_from(config: LogConfig, read_from: Offset) -> Result<(Log, Recovery), StoreError> {
        let started = Instant::now();
        let dir = config.dir.clone();
        let interrupted = crate::recover::recovering_dir(&dir);
        if interrupted.exists() {
            return Err(StoreError::RecoverInterrupted { path: interrupted });
        }
        fs::create_dir_all(&dir).map_err(io("create directory", &dir))?;
        let bases = segment_bases(&dir)?;
        let mut segments = Vec::with_capacity(bases.len().max(1));
        let mut truncated = 0;
        let mut torn_tail = None;
        for (i, base) in bases.iter().enumerate() {
            let last = i + 1 == bases.len();
            let next_base = bases.get(i + 1).copied();
            if let Some(next) = next_base.filter(|n| *n <= read_from.0) {
                segments.push(Segment::open_unread(&dir, Offset(*base), Offset(next))?);
                continue;
            }
            let (seg, cut) = Segment::open(&dir, Offset(*base), last)?;
            if let Some(prev) = segments.last() {
                let prev: &Segment = prev;
                if prev.next != seg.base {
                    return Err(StoreError::Corrupt {
                        path: seg.path.clone(),
                        position: 0,
                        reason: "segment does not start where the previous one ends",
                    });
                }
            }
            if cut > 0 {
                torn_tail = Some(TornTail {
                    path: seg.path.clone(),
                    position: seg.size,
                    bytes: cut,
                });
            }
            truncated += cut;
            segments.push(seg);
        }
        if segments.is_empty() {
            segments.push(Segment::create(&dir, Offset(0))?);
            sync_dir(&dir)?;
        }
        let log = Log {
            config,
            segments,
            scratch: BytesMut::new(),
            dirty: false,
        };
        let recovery = Recovery {
            segments: log.segments.len(),
            start: log.start(),
            next: log.next(),
            truncated_bytes: truncated,
            torn_tail,
            took: started.elapsed(),
        };
        Ok((log, recovery))
    }

    /// Creates a new, empty log in `config.dir` (which must hold no segment) whose first
    /// record will get offset `start`.
    pub(crate) fn create(config: LogConfig, start: Offset) -> Result<Log, StoreError> {
        let dir = config.dir.clone();
        fs::create_dir_all(&dir).map_err(io("create directory", &dir))?;
        let segments = vec![Segment::create(&dir, start)?];
        sync_dir(&dir)?;
        Ok(Log {
            config,
            segments,
            scratch: BytesMut::new(),
            dirty: false,
        })
    }

    /// First offset still held.
    pub fn start(&self) -> Offset {
        self.segments[0].base
    }

    /// Offset the next record will get.
    pub fn next(&self) -> Offset {
        self.active().next
    }

    fn active(&self) -> &Segment {
        &self.segments[self.segments.len() - 1]
    }

    /// Appends records already framed as `(length u32 | bytes)*` (the batch body's own
    /// framing), `count` of them; returns the offset of the first. They go out as one batch,
    /// or as several back to back when larger than a batch may be. In the OS page cache when
    /// this returns; call [`Log::sync`] for power-loss durability.
    ///
    /// All or nothing: when a write fails (a full disk, say) the log is put back as it was
    /// before the call, partial batch and any segment started by it removed, so the same
    /// records can be appended again later. If even that fails the error says so and the log
    /// is in doubt (the caller stops).
    pub fn append_framed(&mut self, framed: &[u8], count: u64) -> Result<Offset, StoreError> {
        let mark = self.mark();
        self.append_framed_all(framed, count).or_else(|e| {
            self.undo(mark)?;
            Err(e)
        })
    }

    /// Where the log ends now, for [`Log::undo`].
    fn mark(&self) -> Mark {
        let active = self.active();
        Mark {
            segments: self.segments.len(),
            size: active.size,
            next: active.next,
            index: active.index.len(),
        }
    }

    /// Puts the log back to `mark`: deletes segments started since, cuts the active one back
    /// to its size then (a partly written batch with it), so that no bad batch is left in
    /// the middle of the log for the next open to take for damage.
    fn undo(&mut self, mark: Mark) -> Result<(), StoreError> {
        let mut removed = false;
        while self.segments.len() > mark.segments {
            if let Some(seg) = self.segments.pop() {
                fs::remove_file(&seg.path).map_err(io("remove after a failed write", &seg.path))?;
                removed = true;
            }
        }
        let seg = &mut self.segments[mark.segments - 1];
        seg.file
            .set_len(mark.size)
            .map_err(io("cut back after a failed write", &seg.path))?;
        seg.size = mark.size;
        seg.next = mark.next;
        seg.index.truncate(mark.index);
        if removed {
            sync_dir(&self.config.dir)?;
        }
        Ok(())
    }

    fn append_framed_all(&mut self, framed: &[u8], count: u64) -> Result<Offset, StoreError> {
        let first = self.next();
        let mut rest = framed;
        let mut left = count;
        while !rest.is_empty() || left > 0 {
            // Records that fit one batch (all of them, usually), checking the framing.
            let (mut bytes, mut n) = (0usize, 0u64);
            while bytes < rest.len() {
                let Some(len) = rest.get(bytes..bytes + 4) else {
                    return Err(StoreError::BadFraming(count));
                };
                let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
                let end = bytes + 4 + len;
                if end > rest.len() {
                    return Err(StoreError::BadFraming(count));
                }
                if 12 + end > MAX_BATCH {
                    if n == 0 {
                        return Err(StoreError::TooLarge {
                            size: (12 + end) as u64,
                            max: MAX_BATCH as u64,
                        });
                    }
                    break;
                }
                bytes = end;
                n += 1;
            }
            if n > left || (bytes == rest.len() && n != left) {
                return Err(StoreError::BadFraming(count));
            }
            if self.active().size >= self.config.segment_bytes {
                self.roll()?;
            }
            let chunk = &rest[..bytes];
            let head = batch_head(self.next(), n, chunk);
            let last = self.segments.len() - 1;
            self.segments[last].append_parts(&[&head, chunk], n)?;
            self.dirty = true;
            rest = &rest[bytes..];
            left -= n;
        }
        Ok(first)
    }

    /// Appends `records` as one batch; returns the offset of the first. The batch is in the
    /// OS page cache when this returns; call [`Log::sync`] for power-loss durability.
    pub fn append(&mut self, records: &[&[u8]]) -> Result<Offset, StoreError> {
        if records.is_empty() {
            return Ok(self.next());
        }
        if self.active().size >= self.config.segment_bytes {
            self.roll()?;
        }
        let base = self.next();
        self.scratch.clear();
        encode_batch(base, records, &mut self.scratch)?;
        let n = self.segments.len();
        self.segments[n - 1].append(&self.scratch, records.len() as u64)?;
        self.dirty = true;
        Ok(base)
    }

    /// Makes every append so far durable (fdatasync of the active segment).
    pub fn sync(&mut self) -> Result<(), StoreError> {
        if self.dirty {
            self.active().sync()?;
            self.dirty = false;
        }
        Ok(())
    }

    /// A second handle on the active segment's file, for a thread that syncs it in the
    /// background (`fdatasync` on a duplicate descriptor syncs the same file). Take a new one
    /// whenever [`Log::active_base`] changes; sealed segments are synced when sealed.
    pub fn active_file(&self) -> Result<fs::File, StoreError> {
        let seg = self.active();
        seg.file
            .try_clone()
            .map_err(io("duplicate handle of", &seg.path))
    }

    /// First offset of the active segment; it changes when a segment is sealed.
    pub fn active_base(&self) -> Offset {
        self.active().base
    }

    /// Seals the active segment and starts a new one.
    fn roll(&mut self) -> Result<(), StoreError> {
        // Everything in a sealed segment is durable: syncing it now costs one fsync per
        // segment and lets recovery treat damage there as corruption, not a torn write.
        self.active().sync()?;
        let next = self.next();
        self.segments.push(Segment::create(&self.config.dir, next)?);
        // The new file's directory entry must survive a crash too.
        sync_dir(&self.config.dir)
    }

    /// Every record at or after `from`, in order.
    pub fn read_from(&self, from: Offset) -> Result<Vec<(Offset, Bytes)>, StoreError> {
        if from > self.next() {
            return Err(StoreError::OffsetOutOfRange(from.0));
        }
        let from = from.max(self.start());
        let first = self.segments.partition_point(|s| s.next <= from);
        let mut out = Vec::new();
        for seg in &self.segments[first..] {
            seg.read_from(from, &mut out)?;
        }
        Ok(out)
    }

    /// Deletes sealed segments whose records are all below `offset` (acknowledged or expired,
    /// as the caller decides). Returns the bytes freed. The active segment is never deleted.
    pub fn reclaim_before(&mut self, offset: Offset) -> Result<u64, StoreError> {
        self.release_before(offset).delete()
    }

    /// Takes the sealed segments whose records are all below `offset` out of the log
    /// without deleting their files: [`Released::delete`] does that, on any thread (deleting
    /// a few hundred 64 MiB files takes seconds, which a router must not wait for).
    pub fn release_before(&mut self, offset: Offset) -> Released {
        let mut out = Released {
            dir: self.config.dir.clone(),
            segments: Vec::new(),
        };
        let n = self
            .segments
            .iter()
            .take(self.segments.len().saturating_sub(1))
            .take_while(|s| s.next <= offset)
            .count();
        for seg in self.segments.drain(..n) {
            out.segments.push((seg.path.clone(), seg.size));
        }
        out
    }

    /// Bytes of segment data on disk.
    pub fn disk_bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.size).sum()
    }

    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }
}

/// Segments taken out of the log by [`Log::release_before`], their files not yet deleted.
#[derive(Debug)]
pub struct Released {
    dir: PathBuf,
    segments: Vec<(PathBuf, u64)>,
}

impl Released {
    /// Deletes the files, oldest first, stopping at the first failure (so what is left is
    /// still a contiguous run of segments), then syncs the directory. Returns bytes freed.
    pub fn delete(self) -> Result<u64, StoreError> {
        let mut freed = 0;
        for (path, size) in &self.segments {
            fs::remove_file(path).map_err(io("remove", path))?;
            freed += size;
        }
        if !self.segments.is_empty() {
            sync_dir(&self.dir)?;
        }
        Ok(freed)
    }

    pub fn is_empty(&self) -> bool {
        self.segments.is_empty()
    }
}

/// The base offsets of the segment files in `dir`, ascending.
pub(crate) fn segment_bases(dir: &Path) -> Result<Vec<u64>, StoreError> {
    let mut bases: Vec<u64> = fs::read_dir(dir)
        .map_err(io("list", dir))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            name.strip_suffix(".log")?.parse::<u64>().ok()
        })
        .collect();
    bases.sort_unstable();
    Ok(bases)
}

/// fsync of a directory, so a created or removed file's entry is durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io("fsync directory", dir))
}
