//! Damage against a torn tail: a bad batch with a valid batch after it fails the open, naming
//! the file and byte, and changes nothing; only a bad *last* batch is cut; `recover` keeps
//! every valid batch, in order, at dense offsets, and moves the original aside.

#![allow(clippy::unwrap_used)]

use std::fs;
use std::path::{Path, PathBuf};

use ferrymq_store::{recover, Log, LogConfig, Offset, StoreError};

fn config(dir: &Path, segment_bytes: u64) -> LogConfig {
    LogConfig {
        dir: dir.to_path_buf(),
        segment_bytes,
    }
}

/// Appends `batches` batches of 1..=3 records each; returns the batches.
fn fill(log: &mut Log, batches: u64) -> Vec<Vec<Vec<u8>>> {
    let mut all = Vec::new();
    let mut i = 0;
    for b in 0..batches {
        let recs: Vec<Vec<u8>> = (0..=(b % 3))
            .map(|_| {
                i += 1;
                format!("record-{i}-{}", "x".repeat((i % 13) as usize)).into_bytes()
            })
            .collect();
        let refs: Vec<&[u8]> = recs.iter().map(|r| r.as_slice()).collect();
        log.append(&refs).unwrap();
        all.push(recs);
    }
    log.sync().unwrap();
    all
}

fn contents(log: &Log) -> Vec<(Offset, Vec<u8>)> {
    log.read_from(log.start())
        .unwrap()
        .into_iter()
        .map(|(o, r)| (o, r.to_vec()))
        .collect()
}

/// One batch as it lies on disk, read with the documented format (not the crate's parser).
#[derive(Debug, Clone)]
struct OnDisk {
    file: PathBuf,
    position: u64,
    len: u64,
    base: u64,
    count: u64,
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    files.sort();
    files
}

fn layout(dir: &Path) -> Vec<OnDisk> {
    let mut out = Vec::new();
    for file in segments(dir) {
        let data = fs::read(&file).unwrap();
        let mut pos = 0;
        while pos < data.len() {
            let be = |r: std::ops::Range<usize>| {
                data[pos + r.start..pos + r.end]
                    .iter()
                    .fold(0u64, |a, b| a << 8 | *b as u64)
            };
            let len = 12 + be(4..8);
            out.push(OnDisk {
                file: file.clone(),
                position: pos as u64,
                len,
                base: be(12..20),
                count: be(20..24),
            });
            pos += len as usize;
        }
    }
    out
}

fn flip(file: &Path, at: u64) {
    let mut data = fs::read(file).unwrap();
    data[at as usize] ^= 0xFF;
    fs::write(file, &data).unwrap();
}

#[test]
fn a_flipped_byte_in_the_middle_of_the_newest_segment_fails_the_open_naming_file_and_byte() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = Log::open(config(dir.path(), 1 << 20)).unwrap();
    fill(&mut log, 60);
    drop(log);
    let batches = layout(dir.path());
    let (victim, next) = (&batches[30], &batches[31]);
    let original = fs::read(&victim.file).unwrap();
    // Every byte of the batch, header included.
    for at in victim.position..victim.position + victim.len {
        flip(&victim.file, at);
        match Log::open(config(dir.path(), 1 << 20)) {
            Err(e @ StoreError::Damaged { .. }) => {
                let StoreError::Damaged {
                    path,
                    position,
                    next_valid,
                    ..
                } = &e
                else {
                    unreachable!()
                };
                assert_eq!(path, &victim.file, "byte {at}");
                assert_eq!(*position, victim.position, "byte {at}");
                assert_eq!(*next_valid, next.position, "byte {at}");
                let message = e.to_string();
                assert!(
                    message.contains(&victim.file.display().to_string())
                        && message.contains(&format!("at byte {}", victim.position)),
                    "{message}"
                );
            }
            Err(e) => panic!("byte {at}: unexpected error {e}"),
            Ok(_) => panic!("byte {at}: damage in the middle must not open"),
        }
        // Nothing was cut: the damaged file is exactly as it was.
        let mut expect = original.clone();
        expect[at as usize] ^= 0xFF;
        assert_eq!(fs::read(&victim.file).unwrap(), expect, "byte {at}");
        fs::write(&victim.file, &original).unwrap();
    }
    let (log, rec) = Log::open(config(dir.path(), 1 << 20)).unwrap();
    assert_eq!(rec.truncated_bytes, 0);
    assert_eq!(log.next(), Offset(batches.iter().map(|b| b.count).sum()));
}

#[test]
fn a_flipped_byte_in_the_last_batch_is_cut_as_a_torn_tail() {
    let dir = tempfile::tempdir().unwrap();
    let (mut log, _) = Log::open(config(dir.path(), 512)).unwrap();
    let all = fill(&mut log, 80);
    drop(log);
    assert!(segments(dir.path()).len() > 3, "several segments");
    let batches = layout(dir.path());
    let last = batches.last().unwrap().clone();
    flip(&last.file, last.position + last.len / 2);
    let (log, rec) = Log::open(config(dir.path(), 512)).unwrap();
    assert_eq!(rec.truncated_bytes, last.len);
    let torn = rec.torn_tail.unwrap();
    assert_eq!(
        (torn.path, torn.position, torn.bytes),
        (last.file.clone(), last.position, last.len)
    );
    let expect: Vec<Vec<u8>> = all[..all.len() - 1].concat();
    let got: Vec<Vec<u8>> = contents(&log).into_iter().map(|(_, r)| r).collect();
    assert_eq!(got, expect);
    assert_eq!(fs::metadata(&last.file).unwrap().len(), last.position);
}

/// A well-formed batch frame, built from the documented format.
fn frame(base: u64, records: &[&[u8]]) -> Vec<u8> {
    let mut body = base.to_be_bytes().to_vec();
    body.extend_from_slice(&(records.len() as u32).to_be_bytes());
    for r in records {
        body.extend_from_slice(&(r.len() as u32).to_be_bytes());
        body.extend_from_slice(r);
    }
    let mut head = vec![0xFB, 1, 0, 0];
    head.extend_from_slice(&(body.len() as u32).to_be_bytes());
    let crc = crc32c::crc32c_append(crc32c::crc32c(&head), &body);
    head.extend_from_slice(&crc.to_be_bytes());
    head.extend_from_slice(&body);
    head
}

#[test]
fn a_batch_frame_inside_a_record_of_a_torn_tail_is_not_taken_for_a_batch_unless_its_offset_fits() {
    for (embedded_base, damage) in [(1_000_000, false), (11, true)] {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = Log::open(config(dir.path(), 1 << 20)).unwrap();
        for i in 0..10u8 {
            log.append(&[&[i; 20]]).unwrap();
        }
        // A record that happens to hold a whole, valid batch frame (as a payload might).
        let inner = frame(embedded_base, &[b"not a real batch"]);
        let mut record = vec![0x55; 40];
        record.extend_from_slice(&inner);
        record.extend_from_slice(&[0x55; 40]);
        log.append(&[&record]).unwrap();
        log.sync().unwrap();
        drop(log);
        let last = layout(dir.path()).pop().unwrap();
        // The crash tore the write after the embedded frame.
        let file = fs::read(&last.file).unwrap();
        fs::write(&last.file, &file[..file.len() - 20]).unwrap();
        let opened = Log::open(config(dir.path(), 1 << 20));
        if damage {
            // Offset 11 could follow 10 after a one-record batch: indistinguishable from a
            // real batch after damage, so the log refuses rather than cut it.
            assert!(
                matches!(opened, Err(StoreError::Damaged { .. })),
                "base {embedded_base}"
            );
        } else {
            let (log, rec) = opened.unwrap();
            assert_eq!(rec.truncated_bytes, last.len - 20);
            assert_eq!(log.next(), Offset(10));
        }
    }
}

#[test]
fn recover_keeps_every_valid_batch_in_order_at_dense_offsets_and_moves_the_original_aside() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("log");
    let (mut log, _) = Log::open(config(&dir, 512)).unwrap();
    let all = fill(&mut log, 120);
    drop(log);
    let files = segments(&dir);
    assert!(files.len() > 4, "several segments");
    let batches = layout(&dir);
    // Damage the last batch of the second segment (a sealed one), a batch in the middle of
    // the newest segment, and tear the newest segment's last batch.
    let sealed_last = batches.iter().rposition(|b| b.file == files[1]).unwrap();
    let newest: Vec<usize> = (0..batches.len())
        .filter(|&i| batches[i].file == files[files.len() - 1])
        .collect();
    assert!(newest.len() >= 3, "{newest:?}");
    let middle = newest[newest.len() / 2];
    let torn = *newest.last().unwrap();
    for &i in &[sealed_last, middle] {
        flip(&batches[i].file, batches[i].position + batches[i].len - 3);
    }
    let b = &batches[torn];
    let newest_data = fs::read(&b.file).unwrap();
    fs::write(&b.file, &newest_data[..(b.position + b.len / 2) as usize]).unwrap();
    let before: Vec<(PathBuf, Vec<u8>)> = files
        .iter()
        .map(|f| (f.clone(), fs::read(f).unwrap()))
        .collect();
    assert!(Log::open(config(&dir, 512)).is_err(), "damaged");

    let report = recover(&config(&dir, 512)).unwrap();
    println!("{report}");

    // The original is aside, byte for byte.
    let moved = report.moved_to.clone().unwrap();
    assert!(moved
        .file_name()
        .unwrap()
        .to_string_lossy()
        .starts_with("log.damaged-"));
    for (f, data) in &before {
        assert_eq!(&fs::read(moved.join(f.file_name().unwrap())).unwrap(), data);
    }
    // What it skipped: the three batches, where they were, how many records.
    let lost = [sealed_last, middle, torn];
    assert_eq!(report.skipped.len(), 3, "{report}");
    for (s, &i) in report.skipped.iter().zip(&lost) {
        let b = &batches[i];
        assert_eq!(s.file, moved.join(b.file.file_name().unwrap()));
        assert_eq!(s.position, b.position);
        assert_eq!(s.offset, Offset(b.base));
        if i == torn {
            assert_eq!((s.bytes, s.records), (b.len / 2, None));
        } else {
            assert_eq!((s.bytes, s.records), (b.len, Some(b.count)));
        }
    }
    // What it kept: every other batch, in order, offsets dense from where the log started.
    let expect: Vec<Vec<u8>> = all
        .iter()
        .enumerate()
        .filter(|(i, _)| !lost.contains(i))
        .flat_map(|(_, b)| b.clone())
        .collect();
    assert_eq!(report.kept_records(), expect.len() as u64);
    assert_eq!(report.kept_batches(), (all.len() - 3) as u64);
    assert_eq!(report.kept.len(), files.len());
    let (log, rec) = Log::open(config(&dir, 512)).unwrap();
    assert_eq!(rec.truncated_bytes, 0);
    let got = contents(&log);
    assert_eq!((rec.start, rec.next), (report.start, report.next));
    assert_eq!(
        got.iter().map(|(_, r)| r.clone()).collect::<Vec<_>>(),
        expect
    );
    for (i, (o, _)) in got.iter().enumerate() {
        assert_eq!(*o, Offset(rec.start.0 + i as u64));
    }
}

#[test]
fn recover_changes_nothing_in_a_log_without_damage() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("log");
    let (mut log, _) = Log::open(config(&dir, 512)).unwrap();
    let all = fill(&mut log, 40);
    drop(log);
    let before: Vec<_> = segments(&dir)
        .iter()
        .map(|f| fs::read(f).unwrap())
        .collect();
    let report = recover(&config(&dir, 512)).unwrap();
    assert_eq!(report.moved_to, None, "{report}");
    assert!(report.skipped.is_empty());
    assert_eq!(report.kept_records(), all.concat().len() as u64);
    let after: Vec<_> = segments(&dir)
        .iter()
        .map(|f| fs::read(f).unwrap())
        .collect();
    assert_eq!(before, after);
    let names: Vec<_> = fs::read_dir(root.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["log"], "no other directory left behind");
}

#[test]
fn an_interrupted_recovery_stops_the_open_and_a_second_run_finishes_it() {
    let root = tempfile::tempdir().unwrap();
    let dir = root.path().join("log");
    let (mut log, _) = Log::open(config(&dir, 512)).unwrap();
    let all = fill(&mut log, 40);
    drop(log);
    let batches = layout(&dir);
    flip(&batches[5].file, batches[5].position + 20);
    // The crash came between the two renames: the new log is complete, `log` is missing.
    let report = recover(&config(&dir, 512)).unwrap();
    let recovering = root.path().join("log.recovering");
    fs::rename(&dir, &recovering).unwrap();
    assert!(matches!(
        Log::open(config(&dir, 512)),
        Err(StoreError::RecoverInterrupted { path }) if path == recovering
    ));
    assert!(!dir.exists(), "the refused open created nothing");
    let second = recover(&config(&dir, 512)).unwrap();
    assert!(second.finished_interrupted, "{second}");
    let (log, _) = Log::open(config(&dir, 512)).unwrap();
    assert_eq!(contents(&log).len() as u64, report.kept_records());
    assert_eq!(
        report.kept_records() + report.skipped_records(),
        all.concat().len() as u64
    );

    // A crash while the new log was being written leaves partial output beside the original:
    // the open refuses too, and a second run starts over from the original.
    flip(&layout(&dir)[7].file, layout(&dir)[7].position + 20);
    fs::create_dir(&recovering).unwrap();
    fs::write(recovering.join("00000000000000000000.log"), b"partial").unwrap();
    assert!(Log::open(config(&dir, 512)).is_err());
    let third = recover(&config(&dir, 512)).unwrap();
    assert_eq!(third.skipped.len(), 1, "{third}");
    assert!(!recovering.exists());
    assert!(Log::open(config(&dir, 512)).is_ok());
}
