//! Salvaging a damaged log: every batch that checks is kept, in order, in a new log; the
//! original directory is moved aside, never deleted.
//!
//! ```text
//! DIR/log ──scan every segment, keep valid batches──▶ DIR/log.recovering   (the new log)
//! DIR/log ──rename──▶ DIR/log.damaged-<unix time>                           (the original)
//! DIR/log.recovering ──rename──▶ DIR/log
//! ```
//! Offsets: the new log starts where the old one did. Records keep their order and their
//! batches (a checkpoint written as one batch stays one batch); records after a skipped region
//! get offsets lowered by the records lost there, so the new log is dense again. The log's
//! user replays records in order and keeps no offsets across a restart, so this is safe.
//!
//! A crash during recovery: while the new log is written the original is untouched and
//! `log.recovering` is partial output, which the next run removes. Between the two renames
//! `log` is missing; [`crate::Log::open`] then refuses to start
//! ([`StoreError::RecoverInterrupted`]), and running recovery again does the second rename
//! (the new log was complete and synced before the first).

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::io;
use crate::log::{segment_bases, sync_dir};
use crate::segment::{find_batch, parse_batch, segment_path};
use crate::{Log, LogConfig, Offset, StoreError};

/// What [`recover`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecoverReport {
    /// The log directory (holding the new log if one was written).
    pub log_dir: PathBuf,
    /// Where the original log was moved; `None` if nothing was damaged (nothing changed) or
    /// if this run only finished an interrupted one.
    pub moved_to: Option<PathBuf>,
    /// This run found a complete new log left by an interrupted recovery and put it in place.
    pub finished_interrupted: bool,
    /// Per segment file of the original log (named where it is now): what was kept.
    pub kept: Vec<Kept>,
    /// Every region of the original log that did not check, in log order.
    pub skipped: Vec<Skipped>,
    /// Offsets of the new log: first record, and one past the last.
    pub start: Offset,
    pub next: Offset,
}

/// Valid batches kept from one segment file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kept {
    pub file: PathBuf,
    pub batches: u64,
    pub records: u64,
    /// Bytes of those batches in the file, headers included.
    pub bytes: u64,
}

/// A region of a segment file that was not kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub file: PathBuf,
    /// Byte position in the file where the region starts, and its length.
    pub position: u64,
    pub bytes: u64,
    /// Why the first batch of the region failed.
    pub reason: &'static str,
    /// Offset (in the original numbering) of the first record the region held.
    pub offset: Offset,
    /// Records the region held, known from the offset of the next valid batch; `None` at the
    /// end of the log (a torn tail: how much was being written is unknown).
    pub records: Option<u64>,
}

impl RecoverReport {
    pub fn kept_records(&self) -> u64 {
        self.kept.iter().map(|k| k.records).sum()
    }

    pub fn kept_batches(&self) -> u64 {
        self.kept.iter().map(|k| k.batches).sum()
    }

    /// Records lost in regions followed by a valid batch (a torn tail's are unknown).
    pub fn skipped_records(&self) -> u64 {
        self.skipped.iter().filter_map(|s| s.records).sum()
    }

    pub fn skipped_bytes(&self) -> u64 {
        self.skipped.iter().map(|s| s.bytes).sum()
    }
}

impl fmt::Display for RecoverReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let dir = self.log_dir.display();
        if self.finished_interrupted {
            return writeln!(
                f,
                "finished an interrupted recovery: the new log is now in {dir} \
                 (the original is in a sibling directory named log.damaged-*)"
            );
        }
        let Some(moved_to) = &self.moved_to else {
            return writeln!(
                f,
                "no damage found in {dir}: {} records in {} batches check; nothing was changed",
                self.kept_records(),
                self.kept_batches()
            );
        };
        writeln!(
            f,
            "moved the original log to {} (nothing was deleted)",
            moved_to.display()
        )?;
        for k in &self.kept {
            writeln!(
                f,
                "kept {}: {} records in {} batches ({} bytes)",
                k.file.display(),
                k.records,
                k.batches,
                k.bytes
            )?;
        }
        for s in &self.skipped {
            let records = match s.records {
                Some(n) => format!("{n} records from offset {}", s.offset.0),
                None => format!(
                    "records from offset {} on, how many unknown (the end of the log)",
                    s.offset.0
                ),
            };
            writeln!(
                f,
                "skipped {} at byte {}: {} bytes ({}); {records}",
                s.file.display(),
                s.position,
                s.bytes,
                s.reason
            )?;
        }
        writeln!(
            f,
            "wrote a new log in {dir}: {} records in {} batches, offsets {}..{}; records after \
             a skipped region were renumbered so that offsets stay dense",
            self.kept_records(),
            self.kept_batches(),
            self.start.0,
            self.next.0
        )
    }
}

/// Where a recovery of `dir` writes its new log before putting it in place.
pub(crate) fn recovering_dir(dir: &Path) -> PathBuf {
    sibling(dir, ".recovering")
}

/// `dir` with `suffix` appended to its last component (trailing separators dropped).
fn sibling(dir: &Path, suffix: &str) -> PathBuf {
    let mut name = dir.components().collect::<PathBuf>().into_os_string();
    name.push(suffix);
    PathBuf::from(name)
}

/// Salvages the log in `config.dir`: writes a new log holding every batch of every segment
/// that checks, in order, moves the original to `DIR.damaged-<unix time>` and puts the new
/// one in its place. If every batch checks, nothing is changed. New segments roll at
/// `config.segment_bytes`. The caller makes sure nothing else uses the log meanwhile.
pub fn recover(config: &LogConfig) -> Result<RecoverReport, StoreError> {
    let dir = &config.dir;
    let tmp = recovering_dir(dir);
    let mut report = RecoverReport {
        log_dir: dir.clone(),
        moved_to: None,
        finished_interrupted: false,
        kept: Vec::new(),
        skipped: Vec::new(),
        start: Offset(0),
        next: Offset(0),
    };
    if !dir.exists() {
        if !tmp.exists() {
            return Err(StoreError::Io {
                op: "open",
                path: dir.clone(),
                source: std::io::ErrorKind::NotFound.into(),
            });
        }
        // Interrupted between the renames: the new log in `tmp` is complete and synced.
        fs::rename(&tmp, dir).map_err(io("rename", &tmp))?;
        sync_parent(dir)?;
        report.finished_interrupted = true;
        return Ok(report);
    }
    if tmp.exists() {
        // Partial output of an interrupted run; the original is still untouched in `dir`.
        fs::remove_dir_all(&tmp).map_err(io("remove", &tmp))?;
    }
    let bases = segment_bases(dir)?;
    let Some(&first) = bases.first() else {
        return Ok(report);
    };
    let moved_to = damaged_dir(dir);
    let new_log = LogConfig {
        dir: tmp.clone(),
        segment_bytes: config.segment_bytes,
    };
    let mut out = Log::create(new_log, Offset(first))?;
    salvage_all(dir, &bases, &moved_to, &mut out, &mut report)?;
    report.start = out.start();
    report.next = out.next();
    if report.skipped.is_empty() {
        drop(out);
        fs::remove_dir_all(&tmp).map_err(io("remove", &tmp))?;
        for (k, base) in report.kept.iter_mut().zip(&bases) {
            k.file = segment_path(dir, Offset(*base));
        }
        return Ok(report);
    }
    out.sync()?;
    drop(out);
    // Checkpoints in the kept batches name their snapshot files by id (records keep their
    // bytes): the whole, checked ones come along (copies; the originals stay aside).
    for id in crate::list_snapshots(dir)? {
        if crate::read_snapshot(dir, id).is_ok() {
            let (from, to) = (
                crate::snapshot_path(dir, id),
                crate::snapshot_path(&tmp, id),
            );
            fs::copy(&from, &to).map_err(io("copy", &from))?;
            fs::File::open(&to)
                .and_then(|f| f.sync_all())
                .map_err(io("sync", &to))?;
        }
    }
    sync_dir(&tmp)?;
    fs::rename(dir, &moved_to).map_err(io("rename", dir))?;
    fs::rename(&tmp, dir).map_err(io("rename", &tmp))?;
    sync_parent(dir)?;
    report.moved_to = Some(moved_to);
    Ok(report)
}

/// Salvages every segment of `dir` (base offsets `bases`, ascending) into `out`, naming the
/// files in the report where they will be once `dir` is moved to `moved_to`.
fn salvage_all(
    dir: &Path,
    bases: &[u64],
    moved_to: &Path,
    out: &mut Log,
    report: &mut RecoverReport,
) -> Result<(), StoreError> {
    let mut expected = Offset(bases.first().copied().unwrap_or(0));
    // The previous file ended inside a skipped region (its records are counted from here).
    let mut tail_open = false;
    for &base in bases {
        let path = segment_path(dir, Offset(base));
        let data = fs::read(&path).map_err(io("read", &path))?;
        let file = moved_to.join(path.file_name().unwrap_or_default());
        // Continuity with the previous file: a segment's name is its first offset.
        match report.skipped.last_mut() {
            Some(s) if tail_open => s.records = base.checked_sub(s.offset.0),
            _ if base != expected.0 => report.skipped.push(Skipped {
                file: file.clone(),
                position: 0,
                bytes: 0,
                reason: "segment does not start where the previous one ends",
                offset: expected,
                records: base.checked_sub(expected.0),
            }),
            _ => {}
        }
        expected = Offset(base);
        let kept;
        (kept, tail_open) = salvage(&data, file, &mut expected, out, &mut report.skipped)?;
        report.kept.push(kept);
    }
    Ok(())
}

/// Appends every valid batch of one segment file's `data` to `out`, recording the regions
/// that do not check in `skipped`. `expected` is the offset due next, in the original
/// numbering. Also says whether the file ended inside a skipped region.
fn salvage(
    data: &[u8],
    file: PathBuf,
    expected: &mut Offset,
    out: &mut Log,
    skipped: &mut Vec<Skipped>,
) -> Result<(Kept, bool), StoreError> {
    let mut kept = Kept {
        file,
        batches: 0,
        records: 0,
        bytes: 0,
    };
    let mut pos = 0;
    while pos < data.len() {
        let batch = match parse_batch(&data[pos..], *expected) {
            Ok(batch) => batch,
            Err(stop) => {
                let found = find_batch(data, pos + 1, *expected, pos);
                let end = found.as_ref().map_or(data.len(), |(at, _)| *at);
                skipped.push(Skipped {
                    file: kept.file.clone(),
                    position: pos as u64,
                    bytes: (end - pos) as u64,
                    reason: stop.reason(),
                    offset: *expected,
                    records: found.as_ref().map(|(_, b)| b.base.0 - expected.0),
                });
                pos = end;
                match found {
                    Some((_, batch)) => batch,
                    None => return Ok((kept, true)),
                }
            }
        };
        let records: Vec<&[u8]> = batch.records.iter().map(|r| r.as_ref()).collect();
        out.append(&records)?;
        kept.batches += 1;
        kept.records += records.len() as u64;
        kept.bytes += batch.len;
        *expected = Offset(batch.base.0 + records.len() as u64);
        pos += batch.len as usize;
    }
    Ok((kept, false))
}

/// `DIR.damaged-<unix time>`, with `-2`, `-3`… if that exists already.
fn damaged_dir(dir: &Path) -> PathBuf {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let plain = sibling(dir, &format!(".damaged-{secs}"));
    let mut candidate = plain.clone();
    let mut n = 2;
    while candidate.exists() {
        candidate = sibling(&plain, &format!("-{n}"));
        n += 1;
    }
    candidate
}

/// fsync of the directory holding `dir`, so renames of `dir` are durable.
fn sync_parent(dir: &Path) -> Result<(), StoreError> {
    match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => sync_dir(p),
        _ => sync_dir(Path::new(".")),
    }
}
