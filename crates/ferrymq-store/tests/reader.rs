//! `LogReader` against the promises in its docs: every record read back by offset equals what
//! was appended, in order and at random, beside a writer that keeps appending, rolling and
//! reclaiming; a torn tail is "not yet", a reclaimed offset is gone, a flipped byte is an
//! error naming the file; and a sequential drain costs about one pread per chunk.

#![allow(clippy::unwrap_used)]

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use ferrymq_store::{Log, LogConfig, LogReader, Offset, StoreError};

fn open_log(dir: &Path, segment_bytes: u64) -> Log {
    Log::open(LogConfig {
        dir: dir.to_path_buf(),
        segment_bytes,
    })
    .unwrap()
    .0
}

/// The record appended at `offset` by these tests: its size varies from 0 to ~3 KiB and its
/// bytes name the offset, so a record read at the wrong offset cannot pass.
fn record(offset: u64) -> Vec<u8> {
    let len = (offset * 7919 % 3001) as usize;
    let tag = offset.to_be_bytes();
    (0..len).map(|i| tag[i % 8] ^ (i as u8)).collect()
}

/// Appends records for offsets `from..to` in batches of 1 to 4.
fn append_range(log: &mut Log, from: u64, to: u64) {
    let mut o = from;
    while o < to {
        let n = (o % 4 + 1).min(to - o);
        let recs: Vec<Vec<u8>> = (o..o + n).map(record).collect();
        let refs: Vec<&[u8]> = recs.iter().map(|r| r.as_slice()).collect();
        assert_eq!(log.append(&refs).unwrap(), Offset(o));
        o += n;
    }
}

/// A small deterministic generator, so a failing order can be replayed.
fn shuffled(n: u64, seed: u64) -> Vec<u64> {
    let mut v: Vec<u64> = (0..n).collect();
    let mut x = seed | 1;
    for i in (1..v.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.swap(i, (x % (i as u64 + 1)) as usize);
    }
    v
}

fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    files.sort();
    files
}

fn read(r: &mut LogReader, offset: u64) -> Option<Vec<u8>> {
    r.read(Offset(offset)).unwrap().map(|b| b.to_vec())
}

#[test]
fn records_of_varied_sizes_across_segments_read_back_in_order_and_at_random() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open_log(dir.path(), 16 * 1024);
    append_range(&mut log, 0, 2000);
    assert!(log.segment_count() > 50, "{}", log.segment_count());
    let mut r = LogReader::open(dir.path()).unwrap();
    for o in 0..2000 {
        assert_eq!(read(&mut r, o), Some(record(o)), "offset {o}");
    }
    for o in shuffled(2000, 42) {
        assert_eq!(read(&mut r, o), Some(record(o)), "offset {o}");
    }
    // A drain that skips records: every third one, then every seventh.
    let mut fresh = LogReader::open(dir.path()).unwrap();
    for o in (0..2000).step_by(3).chain((1..2000).step_by(7)) {
        assert_eq!(read(&mut fresh, o), Some(record(o)), "offset {o}");
    }
    assert_eq!(read(&mut r, 2000), None);
    assert_eq!(read(&mut r, u64::MAX), None);
}

#[test]
fn a_batch_larger_than_a_chunk_reads_back_whole() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open_log(dir.path(), 64 << 20);
    let small = b"small".to_vec();
    let huge: Vec<u8> = (0..(1 << 20) + 3).map(|i| (i % 251) as u8).collect();
    let medium: Vec<u8> = vec![9u8; 300 * 1024];
    log.append(&[&small]).unwrap(); // 0
    log.append(&[&huge]).unwrap(); // 1: one record of 1 MiB
    log.append(&[&medium, &small, &medium]).unwrap(); // 2, 3, 4: a batch of 600 KiB
    log.append(&[&small]).unwrap(); // 5
    let want = [&small, &huge, &medium, &small, &medium, &small];
    let mut r = LogReader::open(dir.path()).unwrap();
    for (o, w) in want.iter().enumerate() {
        assert_eq!(read(&mut r, o as u64).as_ref(), Some(*w), "offset {o}");
    }
    for o in [4, 1, 5, 0, 2, 1] {
        assert_eq!(
            read(&mut r, o).as_ref(),
            Some(want[o as usize]),
            "offset {o}"
        );
    }
}

#[test]
fn offsets_past_the_end_are_none_until_written_even_in_segments_created_later() {
    let dir = tempfile::tempdir().unwrap();
    // A reader may open before the writer has created any segment.
    let mut r = LogReader::open(dir.path()).unwrap();
    assert_eq!(read(&mut r, 0), None);
    let mut log = open_log(dir.path(), 8 * 1024);
    assert_eq!(read(&mut r, 0), None);
    append_range(&mut log, 0, 10);
    assert_eq!(read(&mut r, 9), Some(record(9)));
    assert_eq!(read(&mut r, 10), None);
    append_range(&mut log, 10, 500);
    assert!(log.segment_count() > 20);
    for o in (0..500).rev() {
        assert_eq!(read(&mut r, o), Some(record(o)), "offset {o}");
    }
    assert_eq!(read(&mut r, 500), None);
}

#[test]
fn a_missing_directory_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let err = LogReader::open(&dir.path().join("absent")).err().unwrap();
    assert!(matches!(err, StoreError::Io { .. }), "{err}");
}

#[test]
fn offsets_appended_while_reading_are_found_beside_a_writer_that_rolls_and_reclaims() {
    const TOTAL: u64 = 6000;
    let dir = tempfile::tempdir().unwrap();
    let mut log = open_log(dir.path(), 32 * 1024);
    let mut r = LogReader::open(dir.path()).unwrap();
    // The reader tells the writer how far it has read; the writer reclaims below that, as
    // the broker will once queued messages are acknowledged.
    let progress = Arc::new(AtomicU64::new(0));
    let (tx, rx) = mpsc::channel::<u64>();
    let writer = {
        let progress = progress.clone();
        std::thread::spawn(move || {
            let mut o = 0;
            while o < TOTAL {
                // Keep at most 500 records ahead of the reader, so that reclaiming happens
                // while it reads (and the test is bounded if the reader stops).
                let wait = Instant::now() + Duration::from_secs(60);
                while o > progress.load(Relaxed) + 500 && Instant::now() < wait {
                    std::thread::yield_now();
                }
                let n = (o % 4 + 1).min(TOTAL - o);
                append_range(&mut log, o, o + n);
                o += n;
                if o % 50 < 4 {
                    log.reclaim_before(Offset(progress.load(Relaxed))).unwrap();
                }
                tx.send(o).unwrap();
            }
            log
        })
    };
    let (mut want, mut written, mut early) = (0u64, 0u64, 0u64);
    let deadline = Instant::now() + Duration::from_secs(60);
    while want < TOTAL {
        assert!(Instant::now() < deadline, "stuck at {want} of {TOTAL}");
        // Reading ahead of the writer's word races its write: the answer is the record or
        // None, never an error and never other bytes.
        match r.read(Offset(want)).unwrap() {
            Some(got) => {
                assert_eq!(got.to_vec(), record(want), "offset {want}");
                early += u64::from(want >= written);
                want += 1;
                progress.store(want, Relaxed);
            }
            None => {
                assert!(
                    want >= written,
                    "offset {want} written ({written}) but not read"
                );
                written = rx.recv_timeout(Duration::from_secs(10)).unwrap();
            }
        }
    }
    let mut log = writer.join().unwrap();
    assert!(
        log.start() > Offset(0),
        "segments were reclaimed while reading"
    );
    log.reclaim_before(Offset(TOTAL)).unwrap();
    // Records cached before their segment went may still be served from the cache (the
    // same bytes); a read that finds nothing lists the directory again, which drops them.
    assert_eq!(read(&mut r, TOTAL), None);
    assert_eq!(read(&mut r, log.start().0 - 1), None, "reclaimed");
    assert_eq!(read(&mut r, TOTAL - 1), Some(record(TOTAL - 1)));
    println!("read {TOTAL} records beside the writer, {early} of them before it reported them");
}

/// A log whose last batch (offsets 10 and 11) is cut to its first `keep` bytes, as a reader
/// sees it while the writer is in the middle of writing it. Returns the segment file and
/// the batch's bytes.
fn log_with_last_batch(dir: &Path) -> (PathBuf, Vec<u8>) {
    let mut log = open_log(dir, 1 << 20);
    append_range(&mut log, 0, 10);
    let before = fs::metadata(&segment_files(dir)[0]).unwrap().len();
    log.append(&[&record(10), &record(11)]).unwrap();
    drop(log);
    let path = segment_files(dir)[0].clone();
    let bytes = fs::read(&path).unwrap();
    (path, bytes[before as usize..].to_vec())
}

#[test]
fn a_torn_tail_in_the_active_segment_is_not_yet_at_every_cut_and_readable_once_complete() {
    let dir = tempfile::tempdir().unwrap();
    let (path, batch) = log_with_last_batch(dir.path());
    let full = fs::metadata(&path).unwrap().len();
    let start = full - batch.len() as u64;
    let mut file = OpenOptions::new().append(true).open(&path).unwrap();
    let mut kept = LogReader::open(dir.path()).unwrap();
    for keep in 0..batch.len() {
        file.set_len(start).unwrap();
        file.write_all(&batch[..keep]).unwrap();
        let mut fresh = LogReader::open(dir.path()).unwrap();
        for r in [&mut kept, &mut fresh] {
            assert_eq!(r.read(Offset(10)).unwrap(), None, "cut at {keep}");
            assert_eq!(r.read(Offset(11)).unwrap(), None, "cut at {keep}");
            assert_eq!(r.read(Offset(12)).unwrap(), None, "cut at {keep}");
            assert_eq!(read(r, 9), Some(record(9)), "cut at {keep}");
        }
    }
    // The writer finishes the batch: the same reader now finds it.
    file.write_all(&batch[batch.len() - 1..]).unwrap();
    assert_eq!(read(&mut kept, 11), Some(record(11)));
    assert_eq!(read(&mut kept, 10), Some(record(10)));
}

#[test]
fn reclaimed_segments_read_as_none_for_old_and_new_readers() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open_log(dir.path(), 4 * 1024);
    append_range(&mut log, 0, 300);
    let mut r = LogReader::open(dir.path()).unwrap();
    // The old reader has the first segments open, and then moves its cache elsewhere.
    for o in 0..150 {
        assert_eq!(read(&mut r, o), Some(record(o)));
    }
    assert_eq!(read(&mut r, 299), Some(record(299)));
    log.reclaim_before(Offset(150)).unwrap();
    let start = log.start().0;
    assert!(start > 50 && start <= 150, "{start}");
    let mut fresh = LogReader::open(dir.path()).unwrap();
    for reader in [&mut r, &mut fresh] {
        // Offset 0 is not cached: reading it finds its file gone, which lists the directory
        // again and drops every segment and cached chunk below `start`.
        for o in 0..start {
            assert_eq!(reader.read(Offset(o)).unwrap(), None, "offset {o}");
        }
        for o in start..300 {
            assert_eq!(read(reader, o), Some(record(o)), "offset {o}");
        }
    }
}

/// Flips one byte of the record at `offset`'s payload (which must be at least 3 bytes)
/// in `path`.
fn flip_payload_byte(path: &Path, offset: u64) {
    let mut bytes = fs::read(path).unwrap();
    let payload = record(offset);
    let at = bytes
        .windows(payload.len())
        .position(|w| w == payload.as_slice())
        .unwrap();
    bytes[at + payload.len() / 2] ^= 0x20;
    fs::write(path, bytes).unwrap();
}

fn assert_corrupt_in(result: Result<Option<bytes::Bytes>, StoreError>, file: &Path) {
    match result {
        Err(e @ StoreError::Corrupt { .. }) => {
            let StoreError::Corrupt { ref path, .. } = e else {
                unreachable!()
            };
            assert_eq!(path, file);
            let name = file.file_name().unwrap().to_string_lossy().into_owned();
            assert!(e.to_string().contains(&name), "{e}");
        }
        other => panic!(
            "expected a corrupt batch in {}, got {other:?}",
            file.display()
        ),
    }
}

#[test]
fn a_flipped_byte_in_a_complete_batch_is_an_error_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut log = open_log(dir.path(), 16 * 1024);
    // One record per batch, so the damaged batch holds just the record flipped.
    for o in 0..200 {
        log.append(&[&record(o)]).unwrap();
    }
    drop(log);
    let files = segment_files(dir.path());
    assert!(files.len() > 4);
    let base = |p: &Path| -> u64 { p.file_stem().unwrap().to_string_lossy().parse().unwrap() };
    let sealed = &files[1];
    let (first, last) = (base(sealed), base(&files[2]) - 1);
    assert!(first < last);
    flip_payload_byte(sealed, last);
    let active = files.last().unwrap();
    assert!(base(active) < 199);
    flip_payload_byte(active, 199);

    let mut r = LogReader::open(dir.path()).unwrap();
    assert_corrupt_in(r.read(Offset(last)), sealed);
    // Batches before the bad one in the same file, and other files, still read.
    assert_eq!(read(&mut r, first), Some(record(first)));
    assert_corrupt_in(r.read(Offset(last)), sealed);
    assert_eq!(read(&mut r, last + 1), Some(record(last + 1)));
    // In the active segment too: the batch is complete, so it is damage, not "not yet".
    assert_corrupt_in(r.read(Offset(199)), active);
    assert_eq!(read(&mut r, 198), Some(record(198)));
    assert_corrupt_in(r.read(Offset(199)), active);
    // Past the end, but the way there goes through the bad batch: not "not yet" either.
    assert_corrupt_in(r.read(Offset(200)), active);
}

#[test]
fn sequential_drain_of_100k_1kib_records_costs_about_one_pread_per_chunk() {
    const N: u64 = 100_000;
    let dir = tempfile::tempdir().unwrap();
    let mut log = open_log(dir.path(), 64 << 20);
    let payload = vec![0x5au8; 1024];
    let mut o = 0;
    while o < N {
        // Batches of 1 to 8 records, as group commit makes them.
        let n = (o % 8 + 1).min(N - o);
        let refs: Vec<&[u8]> = (0..n).map(|_| payload.as_slice()).collect();
        log.append(&refs).unwrap();
        o += n;
    }
    let disk = log.disk_bytes();
    let mut r = LogReader::open(dir.path()).unwrap();
    let started = Instant::now();
    for o in 0..N {
        let got = r.read(Offset(o)).unwrap().unwrap();
        assert_eq!(got.len(), 1024);
    }
    let took = started.elapsed();
    let seq = r.stats();
    // Every pread but the last two of each segment brings a full 256 KiB chunk, less the
    // partial batch at its end (under 8.1 KiB here) that the next chunk reads again.
    assert!(
        seq.preads * (240 * 1024) <= disk + 4 * (256 * 1024),
        "{} preads for {disk} bytes",
        seq.preads
    );
    let started = Instant::now();
    let order = shuffled(N, 7);
    for &o in &order[..10_000] {
        assert!(r.read(Offset(o)).unwrap().is_some());
    }
    let random_took = started.elapsed();
    let random = r.stats();
    // One chunk per random read (two near a segment's end, where the short read is
    // confirmed by a second pread that returns nothing).
    assert!(random.preads - seq.preads <= 11_000, "{:?}", random);
    println!(
        "sequential: {N} records of 1 KiB in {took:?}: {:.0} records/s, {} preads, {} cache \
         hits, {:.1} MiB read for {:.1} MiB on disk; random: 10000 reads in {random_took:?}: \
         {:.0} reads/s, {} preads (build profile: {})",
        N as f64 / took.as_secs_f64(),
        seq.preads,
        seq.cache_hits,
        seq.bytes_read as f64 / 1048576.0,
        disk as f64 / 1048576.0,
        10_000.0 / random_took.as_secs_f64(),
        random.preads - seq.preads,
        if cfg!(debug_assertions) {
            "debug"
        } else {
            "release"
        },
    );
}
