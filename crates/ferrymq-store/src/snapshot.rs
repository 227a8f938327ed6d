//! Snapshot files: records a checkpoint keeps beside the log instead of in it (the engine's
//! work-queue entries, millions of them, written on a thread of their own while the log goes
//! on). A checkpoint names its snapshot by id; the file is whole or it is not there.
//!
//! On-disk format (a `DataChange:` commit must accompany any change to it):
//! ```text
//! file     {id:020}.snap  = magic "FMQSNAP1" | id u64 | (record length u32 | record)*
//!                           | end 0xFFFF_FFFF u32 | record count u64
//!                           | crc32c(every byte before it) u32
//! ```
//! Written as `{id:020}.snap.tmp`, synced, renamed, and the directory synced: a crash leaves
//! either no file by that name or a whole one. Reading checks the magic, the id, the framing,
//! the count and the CRC, and refuses anything less than all of it.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use bytes::Bytes;

use crate::log::sync_dir;
use crate::StoreError;

const MAGIC: &[u8; 8] = b"FMQSNAP1";
const END: u32 = u32::MAX;
const SUFFIX: &str = ".snap";

/// Where snapshot `id` lives in `dir`.
pub fn snapshot_path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:020}{SUFFIX}"))
}

/// Writes one snapshot file: records in, [`SnapshotWriter::finish`] makes it durable and
/// visible. Dropped unfinished, it leaves only a `.tmp` file (removed by
/// [`remove_snapshots`]).
pub struct SnapshotWriter {
    out: BufWriter<File>,
    tmp: PathBuf,
    path: PathBuf,
    crc: u32,
    count: u64,
    bytes: u64,
}

impl SnapshotWriter {
    pub fn create(dir: &Path, id: u64) -> Result<SnapshotWriter, StoreError> {
        let path = snapshot_path(dir, id);
        let tmp = path.with_extension("snap.tmp");
        let file = File::create(&tmp).map_err(io("create", &tmp))?;
        let mut w = SnapshotWriter {
            out: BufWriter::with_capacity(1 << 20, file),
            tmp,
            path,
            crc: 0,
            count: 0,
            bytes: 0,
        };
        w.put(MAGIC)?;
        w.put(&id.to_be_bytes())?;
        Ok(w)
    }

    /// Appends `count` records framed as `(length u32 | record)*` (the framing of the log's
    /// batch body, and of the engine's journal buffer).
    pub fn write_framed(&mut self, framed: &[u8], count: u64) -> Result<(), StoreError> {
        if frames(framed).count() as u64 != count || framed_len(framed) != framed.len() {
            return Err(StoreError::BadFraming(count));
        }
        self.put(framed)?;
        self.count += count;
        Ok(())
    }

    /// Ends the file, syncs it and puts it in place. Returns its size in bytes.
    pub fn finish(mut self) -> Result<u64, StoreError> {
        self.put(&END.to_be_bytes())?;
        self.put(&self.count.to_be_bytes())?;
        let crc = self.crc;
        self.put(&crc.to_be_bytes())?;
        let file = self.out.into_inner().map_err(|e| StoreError::Io {
            op: "write",
            path: self.tmp.clone(),
            source: e.into_error(),
        })?;
        file.sync_all().map_err(io("sync", &self.tmp))?;
        std::fs::rename(&self.tmp, &self.path).map_err(io("rename", &self.tmp))?;
        if let Some(dir) = self.path.parent() {
            sync_dir(dir)?;
        }
        Ok(self.bytes)
    }

    fn put(&mut self, b: &[u8]) -> Result<(), StoreError> {
        self.crc = crc32c::crc32c_append(self.crc, b);
        self.bytes += b.len() as u64;
        self.out.write_all(b).map_err(io("write", &self.tmp))
    }
}

/// Reads snapshot `id` from `dir`: its records, in order, if the file is there and whole.
pub fn read_snapshot(dir: &Path, id: u64) -> Result<Vec<Bytes>, StoreError> {
    let path = snapshot_path(dir, id);
    let data = Bytes::from(std::fs::read(&path).map_err(io("read", &path))?);
    let corrupt = |position: usize, reason: &'static str| StoreError::Corrupt {
        path: path.clone(),
        position: position as u64,
        reason,
    };
    // Header 16, trailer 16.
    if data.len() < 32 || &data[..8] != MAGIC {
        return Err(corrupt(0, "not a snapshot file"));
    }
    let crc_at = data.len() - 4;
    if crc32c::crc32c(&data[..crc_at]).to_be_bytes() != data[crc_at..] {
        return Err(corrupt(crc_at, "checksum does not match"));
    }
    if u64::from_be_bytes(be8(&data[8..16])) != id {
        return Err(corrupt(8, "the snapshot id does not match its name"));
    }
    let count = u64::from_be_bytes(be8(&data[crc_at - 8..crc_at]));
    let body = data.slice(16..crc_at - 12);
    if data[crc_at - 12..crc_at - 8] != END.to_be_bytes() || framed_len(&body) != body.len() {
        return Err(corrupt(16, "records are not framed as their lengths say"));
    }
    let records: Vec<Bytes> = frames(&body)
        .map(|(at, len)| body.slice(at..at + len))
        .collect();
    if records.len() as u64 != count {
        return Err(corrupt(crc_at - 8, "record count does not match"));
    }
    Ok(records)
}

/// The ids of the snapshot files in `dir`, ascending.
pub fn list_snapshots(dir: &Path) -> Result<Vec<u64>, StoreError> {
    let mut ids: Vec<u64> = std::fs::read_dir(dir)
        .map_err(io("read dir", dir))?
        .filter_map(|e| {
            let name = e.ok()?.file_name();
            name.to_str()?.strip_suffix(SUFFIX)?.parse().ok()
        })
        .collect();
    ids.sort_unstable();
    Ok(ids)
}

/// Removes every snapshot file in `dir` whose id `keep` refuses, and every unfinished one.
/// Returns how many files went.
pub fn remove_snapshots(dir: &Path, keep: &dyn Fn(u64) -> bool) -> Result<usize, StoreError> {
    let mut removed = 0;
    for e in std::fs::read_dir(dir).map_err(io("read dir", dir))? {
        let Ok(e) = e else { continue };
        let name = e.file_name();
        let Some(name) = name.to_str() else { continue };
        let stale = if let Some(id) = name.strip_suffix(SUFFIX) {
            id.parse::<u64>().is_ok_and(|id| !keep(id))
        } else {
            name.ends_with(".snap.tmp")
        };
        if stale {
            let path = e.path();
            std::fs::remove_file(&path).map_err(io("remove", &path))?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// (start, length) of each record in `framed`; stops at the first frame that does not fit.
fn frames(framed: &[u8]) -> impl Iterator<Item = (usize, usize)> + '_ {
    let mut at = 0usize;
    std::iter::from_fn(move || {
        let len = framed.get(at..at + 4)?;
        let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
        let start = at + 4;
        (start + len <= framed.len()).then(|| {
            at = start + len;
            (start, len)
        })
    })
}

/// How many bytes of `framed` whole frames cover.
fn framed_len(framed: &[u8]) -> usize {
    frames(framed).last().map_or(0, |(at, len)| at + len)
}

fn be8(b: &[u8]) -> [u8; 8] {
    let mut o = [0u8; 8];
    o.copy_from_slice(b);
    o
}

fn io(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StoreError {
    let path = path.to_path_buf();
    move |source| StoreError::Io { op, path, source }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn framed(records: &[&[u8]]) -> Vec<u8> {
        let mut out = Vec::new();
        for r in records {
            out.extend_from_slice(&(r.len() as u32).to_be_bytes());
            out.extend_from_slice(r);
        }
        out
    }

    #[test]
    fn a_finished_snapshot_reads_back_and_an_unfinished_one_is_not_there() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = SnapshotWriter::create(dir.path(), 42).unwrap();
        w.write_framed(&framed(&[b"one", b""]), 2).unwrap();
        w.write_framed(&framed(&[b"three"]), 1).unwrap();
        assert!(
            read_snapshot(dir.path(), 42).is_err(),
            "not there before it is finished"
        );
        w.finish().unwrap();
        let got = read_snapshot(dir.path(), 42).unwrap();
        assert_eq!(got, vec![&b"one"[..], b"", b"three"]);
        assert_eq!(list_snapshots(dir.path()).unwrap(), vec![42]);

        // Dropped unfinished: only a .tmp file, which the cleanup removes with older ones.
        let mut w = SnapshotWriter::create(dir.path(), 50).unwrap();
        w.write_framed(&framed(&[b"x"]), 1).unwrap();
        drop(w);
        assert!(read_snapshot(dir.path(), 50).is_err());
        let mut w = SnapshotWriter::create(dir.path(), 60).unwrap();
        w.write_framed(&framed(&[b"y"]), 1).unwrap();
        w.finish().unwrap();
        assert_eq!(
            remove_snapshots(dir.path(), &|_| true).unwrap(),
            1,
            "the unfinished one"
        );
        assert_eq!(remove_snapshots(dir.path(), &|id| id == 60).unwrap(), 1);
        assert_eq!(list_snapshots(dir.path()).unwrap(), vec![60]);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn any_damage_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = SnapshotWriter::create(dir.path(), 7).unwrap();
        w.write_framed(&framed(&[b"alpha", b"beta", b"gamma"]), 3)
            .unwrap();
        w.finish().unwrap();
        let path = snapshot_path(dir.path(), 7);
        let good = std::fs::read(&path).unwrap();
        for at in 0..good.len() {
            let mut bad = good.clone();
            bad[at] ^= 0x40;
            std::fs::write(&path, &bad).unwrap();
            assert!(read_snapshot(dir.path(), 7).is_err(), "byte {at} flipped");
        }
        for len in 0..good.len() {
            std::fs::write(&path, &good[..len]).unwrap();
            assert!(read_snapshot(dir.path(), 7).is_err(), "cut at {len}");
        }
        // Renamed to another id: refused too.
        std::fs::write(snapshot_path(dir.path(), 8), &good).unwrap();
        assert!(read_snapshot(dir.path(), 8).is_err());
        // Bad framing is refused at write.
        let mut w = SnapshotWriter::create(dir.path(), 9).unwrap();
        assert!(w.write_framed(&framed(&[b"a"]), 2).is_err());
        assert!(w.write_framed(&[0, 0, 0, 9, 1], 1).is_err());
    }
}
