//! The log against the promises in its docs: round trips across segments and reopen, torn
//! tails cut at every byte, flipped bits caught, and reclamation that bounds disk use.

#![allow(clippy::unwrap_used)]

use std::fs;
use std::path::Path;

use ferrymq_store::{Log, LogConfig, Offset, StoreError};
use proptest::prelude::*;

fn config(dir: &Path, segment_bytes: u64) -> LogConfig {
    LogConfig {
        dir: dir.to_path_buf(),
        segment_bytes,
    }
}

fn record(i: u64) -> Vec<u8> {
    format!("record-{i}-{}", "x".repeat((i % 13) as usize)).into_bytes()
}

/// Appends `batches` batches of 1..=3 records; returns the records in order.
fn fill(log: &mut Log, batches: u64) -> Vec<Vec<u8>> {
    let mut all = Vec::new();
    let mut i = 0;
    for b in 0..batches {
        let recs: Vec<Vec<u8>> = (0..=(b % 3))
            .map(|_| {
                i += 1;
                record(i)
            })
            .collect();
        let refs: Vec<&[u8]> = recs.iter().map(|r| r.as_slice()).collect();
        log.append(&refs).unwrap();
        all.extend(recs);
    }
    log.sync().unwrap();
    all
}

fn contents(log: &Log) -> Vec<Vec<u8>> {
    log.read_from(Offset(0))
        .unwrap()
        .into_iter()
        .map(|(_, r)| r.to_vec())
        .collect()
}

#[test]
fn round_trip_across_segments_and_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, rec) = Log::open(config(dir.path(), 1024)).unwrap();
    assert_eq!((rec.segments, rec.next), (1, Offset(0)));
    let all = fill(&mut log, 300);
    assert!(log.segment_count() > 5, "small segments roll");
    assert_eq!(contents(&log), all);
    let middle = log.read_from(Offset(250)).unwrap();
    assert_eq!(middle[0].0, Offset(250));
    assert_eq!(middle[0].1.to_vec(), all[250]);
    drop(log);
    let (log, rec) = Log::open(config(dir.path(), 1024)).unwrap();
    assert_eq!(rec.truncated_bytes, 0);
    assert_eq!(rec.next, Offset(all.len() as u64));
    assert_eq!(contents(&log), all);
}

fn last_segment(dir: &Path) -> std::path::PathBuf {
    let mut files: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    files.sort();
    files.pop().unwrap()
}

#[test]
fn torn_last_batch_cut_at_every_byte_recovers_to_the_last_whole_batch() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = Log::open(config(dir.path(), 1 << 20)).unwrap();
    let before = fill(&mut log, 5);
    let whole = fs::metadata(last_segment(dir.path())).unwrap().len();
    let last: Vec<Vec<u8>> = vec![b"one".to_vec(), b"two".to_vec(), b"three".to_vec()];
    log.append(&last.iter().map(|r| r.as_slice()).collect::<Vec<_>>())
        .unwrap();
    log.sync().unwrap();
    drop(log);
    let seg = last_segment(dir.path());
    let full = fs::read(&seg).unwrap();
    for cut in whole..full.len() as u64 {
        fs::write(&seg, &full[..cut as usize]).unwrap();
        let (mut log, rec) = Log::open(config(dir.path(), 1 << 20)).unwrap();
        assert_eq!(rec.truncated_bytes, cut - whole, "cut at {cut}");
        assert_eq!(contents(&log), before, "cut at {cut}");
        assert_eq!(
            fs::metadata(&seg).unwrap().len(),
            whole,
            "file truncated to the valid prefix"
        );
        // The log carries on from there.
        log.append(&[b"after"]).unwrap();
        assert_eq!(
            log.read_from(Offset(before.len() as u64)).unwrap()[0]
                .1
                .as_ref(),
            b"after"
        );
    }
}

#[test]
fn flipped_bit_in_the_tail_is_detected_and_cut() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = Log::open(config(dir.path(), 1 << 20)).unwrap();
    let before = fill(&mut log, 4);
    let whole = fs::metadata(last_segment(dir.path())).unwrap().len() as usize;
    log.append(&[b"victim record"]).unwrap();
    log.sync().unwrap();
    drop(log);
    let seg = last_segment(dir.path());
    let full = fs::read(&seg).unwrap();
    for byte in whole..full.len() {
        for bit in 0..8 {
            let mut bad = full.clone();
            bad[byte] ^= 1 << bit;
            fs::write(&seg, &bad).unwrap();
            let (log, rec) = Log::open(config(dir.path(), 1 << 20)).unwrap();
            assert_eq!(contents(&log), before, "flip at byte {byte} bit {bit}");
            assert_eq!(rec.truncated_bytes, (full.len() - whole) as u64);
        }
    }
}

#[test]
fn flipped_bit_in_a_sealed_segment_is_corruption_not_silently_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = Log::open(config(dir.path(), 256)).unwrap();
    fill(&mut log, 60);
    assert!(log.segment_count() > 2);
    drop(log);
    let mut files: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    let first = &files[0];
    let mut data = fs::read(first).unwrap();
    data[20] ^= 0x10;
    fs::write(first, &data).unwrap();
    match Log::open(config(dir.path(), 256)) {
        Err(StoreError::Corrupt { reason, .. }) => assert_eq!(reason, "checksum mismatch"),
        Err(e) => panic!("unexpected error {e}"),
        Ok(_) => panic!("corruption in a sealed segment must not pass"),
    }
}

#[test]
fn reclamation_keeps_disk_use_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let segment = 4096;
    let (mut log, _) = Log::open(config(dir.path(), segment)).unwrap();
    let payload = vec![7u8; 100];
    let mut peak = 0;
    // Write ~100× a segment while acknowledging everything older than 50 records.
    for _ in 0..4000 {
        log.append(&[&payload]).unwrap();
        let acked = Offset(log.next().0.saturating_sub(50));
        log.reclaim_before(acked).unwrap();
        peak = peak.max(log.disk_bytes());
    }
    let on_disk: u64 = fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum();
    assert!(on_disk < 4 * segment, "on disk {on_disk} bytes");
    assert!(peak < 4 * segment, "peak {peak} bytes");
    assert!(log.start() > Offset(3000), "old records are gone");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(40))]
    /// Any sequence of batches reads back identically from any offset, before and after reopen.
    #[test]
    fn any_batches_read_back(batches in proptest::collection::vec(proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..200), 1..5), 1..40), from in 0u64..100) {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = Log::open(config(dir.path(), 512)).unwrap();
        let mut all = Vec::new();
        for b in &batches {
            let refs: Vec<&[u8]> = b.iter().map(|r| r.as_slice()).collect();
            log.append(&refs).unwrap();
            all.extend(b.iter().cloned());
        }
        let from = from.min(all.len() as u64);
        let expect: Vec<Vec<u8>> = all[from as usize..].to_vec();
        let got: Vec<Vec<u8>> = log.read_from(Offset(from)).unwrap().into_iter().map(|(_, r)| r.to_vec()).collect();
        prop_assert_eq!(&got, &expect);
        log.sync().unwrap();
        drop(log);
        let (log, _) = Log::open(config(dir.path(), 512)).unwrap();
        let got: Vec<Vec<u8>> = log.read_from(Offset(from)).unwrap().into_iter().map(|(_, r)| r.to_vec()).collect();
        prop_assert_eq!(got, expect);
    }
}

fn framed(records: &[Vec<u8>]) -> Vec<u8> {
    let mut out = Vec::new();
    for r in records {
        out.extend_from_slice(&(r.len() as u32).to_be_bytes());
        out.extend_from_slice(r);
    }
    out
}

#[test]
fn framed_appends_larger_than_a_batch_are_split_and_read_back_whole() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = Log::open(config(dir.path(), 16 * 1024 * 1024)).unwrap();
    // 80 records of 1 MiB: more than one 64 MiB batch.
    let records: Vec<Vec<u8>> = (0..80u8).map(|i| vec![i; 1024 * 1024]).collect();
    let first = log.append_framed(&framed(&records), 80).unwrap();
    assert_eq!(first, Offset(0));
    log.append_framed(&framed(&[b"tail".to_vec()]), 1).unwrap();
    log.sync().unwrap();
    drop(log);
    let (log, rec) = Log::open(config(dir.path(), 16 * 1024 * 1024)).unwrap();
    assert_eq!(rec.truncated_bytes, 0);
    let back = log.read_from(Offset(0)).unwrap();
    assert_eq!(back.len(), 81);
    for (i, (off, r)) in back.iter().take(80).enumerate() {
        assert_eq!(*off, Offset(i as u64));
        assert_eq!(r.as_ref(), records[i].as_slice());
    }
    assert_eq!(back[80].1.as_ref(), b"tail");
}

#[test]
fn framed_appends_that_do_not_match_their_count_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = Log::open(config(dir.path(), 1024 * 1024)).unwrap();
    let two = framed(&[b"a".to_vec(), b"b".to_vec()]);
    assert!(matches!(
        log.append_framed(&two, 3),
        Err(StoreError::BadFraming(3))
    ));
    assert!(matches!(
        log.append_framed(&two[..two.len() - 1], 2),
        Err(StoreError::BadFraming(2))
    ));
    assert_eq!(log.append_framed(&two, 2).unwrap(), Offset(0));
    assert_eq!(log.next(), Offset(2));
}

/// `open_from` reads only the segments that hold records at or after its offset: a flipped
/// byte in an older sealed segment does not stop it (plain `open` refuses), the records from
/// the offset on read back whole, and the old segment's records still read (and are
/// checked) when asked for.
#[test]
fn open_from_reads_only_the_segments_it_needs() {
    let dir = tempfile::tempdir().unwrap();
    let all = {
        let (mut log, _) = Log::open(config(dir.path(), 1024)).unwrap();
        fill(&mut log, 300)
    };
    let mut bases: Vec<_> = fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    bases.sort();
    assert!(bases.len() > 4, "several segments");
    let base_of =
        |p: &std::path::Path| -> u64 { p.file_stem().unwrap().to_str().unwrap().parse().unwrap() };
    // Damage the first segment, and open from the start of the third.
    let first = &bases[0];
    let mut bytes = fs::read(first).unwrap();
    let at = bytes.len() / 2;
    bytes[at] ^= 0xFF;
    fs::write(first, &bytes).unwrap();
    assert!(
        Log::open(config(dir.path(), 1024)).is_err(),
        "open reads everything"
    );
    let from = base_of(&bases[2]);
    let (log, recovery) = Log::open_from(config(dir.path(), 1024), Offset(from)).unwrap();
    assert_eq!(recovery.next.0, all.len() as u64);
    let tail: Vec<Vec<u8>> = log
        .read_from(Offset(from))
        .unwrap()
        .into_iter()
        .map(|(_, r)| r.to_vec())
        .collect();
    assert_eq!(tail, all[from as usize..].to_vec());
    // The second segment was not read at open, and reads back whole when asked for.
    let second = base_of(&bases[1]);
    let got = log.read_from(Offset(second)).unwrap();
    assert_eq!(got[0].1.to_vec(), all[second as usize]);
    // The damaged one is found out when it is read.
    assert!(log.read_from(Offset(0)).is_err());
}
