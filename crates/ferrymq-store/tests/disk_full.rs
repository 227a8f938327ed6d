//! A full disk (issue 10): an append that finds no space leaves the log as it was (a partial
//! batch cut off again), so the same records can be appended once space returns and a reopen
//! finds every record and no torn tail; the commit thread refuses every append after one that
//! found the disk full until the caller retries, so nothing is written out of order.
//!
//! Each test runs itself again inside `unshare -rm` on a 1 MiB tmpfs (a private mount
//! namespace: nothing outlives the test); it needs root or user namespaces, and says so.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::mpsc::channel;

use bytes::{BufMut, Bytes, BytesMut};
use ferrymq_store::{FsyncPolicy, GroupCommit, Log, LogConfig, Offset, StoreError};

/// Set in the inner run: the tmpfs mount point.
const TMPFS: &str = "FERRYMQ_STORE_TEST_TMPFS";

/// Runs `body` on a fresh 1 MiB tmpfs: directly in the inner run, else by running this test
/// again inside a new mount namespace.
fn on_tmpfs(test: &str, body: impl FnOnce(&Path)) {
    if let Ok(dir) = std::env::var(TMPFS) {
        return body(Path::new(&dir));
    }
    let mnt = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("store-tmpfs-{test}-{}", std::process::id()));
    std::fs::create_dir_all(&mnt).unwrap();
    let script = format!(
        "mount -t tmpfs -o size=1m tmpfs '{}' || exit 97\nexec \"$0\" --exact {test} \
         --nocapture --test-threads=1",
        mnt.display()
    );
    let status = Command::new("unshare")
        .args(["-rm", "sh", "-c", &script])
        .arg(std::env::current_exe().unwrap())
        .env(TMPFS, &mnt)
        .status()
        .expect("unshare runs");
    assert_ne!(
        status.code(),
        Some(97),
        "could not mount a tmpfs with `unshare -rm`: this test needs root or user namespaces"
    );
    assert!(status.success(), "the run on a tmpfs failed: {status}");
}

fn open(dir: &Path) -> Log {
    Log::open(LogConfig {
        dir: dir.to_path_buf(),
        segment_bytes: 128 * 1024,
    })
    .unwrap()
    .0
}

/// `records` framed as `(length u32 | bytes)*`.
fn frame(records: &[Bytes]) -> Bytes {
    let mut b = BytesMut::new();
    for r in records {
        b.put_u32(r.len() as u32);
        b.put_slice(r);
    }
    b.freeze()
}

/// A 10 KiB record that says which it is.
fn record(n: u32) -> Bytes {
    let mut r = vec![n as u8; 10 * 1024];
    r[..4].copy_from_slice(&n.to_be_bytes());
    Bytes::from(r)
}

fn files_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().metadata().unwrap().len())
        .sum()
}

/// Every record in the log at `dir`, after checking the open cut nothing.
fn reopen_and_read(dir: &Path) -> Vec<Bytes> {
    let (log, recovery) = Log::open(LogConfig {
        dir: dir.to_path_buf(),
        segment_bytes: 128 * 1024,
    })
    .unwrap();
    assert_eq!(recovery.truncated_bytes, 0, "no torn tail was left behind");
    log.read_from(Offset(0))
        .unwrap()
        .into_iter()
        .map(|(_, r)| r)
        .collect()
}

#[test]
fn an_append_that_finds_the_disk_full_leaves_the_log_as_it_was() {
    on_tmpfs(
        "an_append_that_finds_the_disk_full_leaves_the_log_as_it_was",
        |mnt| {
            let filler = mnt.join("filler");
            std::fs::write(&filler, vec![0u8; 256 * 1024]).unwrap();
            let dir = mnt.join("log");
            let mut log = open(&dir);
            let mut stored = Vec::new();
            let mut n = 0;
            // Three records per append, so that a failing one is usually cut short inside.
            let failed = loop {
                let batch: Vec<Bytes> = (n..n + 3).map(record).collect();
                let (next, disk) = (log.next(), log.disk_bytes());
                match log.append_framed(&frame(&batch), 3) {
                    Ok(_) => {
                        stored.extend(batch);
                        n += 3;
                    }
                    Err(e) => {
                        assert!(e.is_no_space(), "{e}");
                        assert_eq!(log.next(), next, "no offset was taken");
                        assert_eq!(log.disk_bytes(), disk);
                        assert_eq!(files_bytes(&dir), disk, "the partial batch was cut off");
                        break batch;
                    }
                }
                assert!(n < 300, "a 1 MiB tmpfs never filled");
            };
            // Space returns: the same records go in, and everything reads back in order.
            std::fs::remove_file(&filler).unwrap();
            log.append_framed(&frame(&failed), 3).unwrap();
            stored.extend(failed);
            log.sync().unwrap();
            drop(log);
            assert_eq!(reopen_and_read(&dir), stored);
        },
    );
}

#[test]
fn the_commit_thread_refuses_what_follows_a_full_disk_until_a_retry() {
    on_tmpfs(
        "the_commit_thread_refuses_what_follows_a_full_disk_until_a_retry",
        |mnt| {
            let filler = mnt.join("filler");
            std::fs::write(&filler, vec![0u8; 256 * 1024]).unwrap();
            let dir = mnt.join("log");
            let gc = GroupCommit::start(open(&dir), FsyncPolicy::Always, 16).unwrap();
            let append = |records: &[Bytes], retry: bool| -> Result<Offset, StoreError> {
                let (tx, rx) = channel();
                let done = Box::new(move |r| {
                    let _ = tx.send(r);
                });
                let framed = frame(records);
                let count = records.len() as u64;
                if retry {
                    gc.retry_framed(framed, count, done);
                } else {
                    gc.append_framed(framed, count, done);
                }
                rx.recv().unwrap()
            };
            let mut stored = Vec::new();
            let mut n = 0;
            let failed = loop {
                let batch: Vec<Bytes> = (n..n + 3).map(record).collect();
                match append(&batch, false) {
                    Ok(_) => {
                        stored.extend(batch);
                        n += 3;
                    }
                    Err(e) => {
                        assert!(e.is_no_space(), "{e}");
                        break batch;
                    }
                }
                assert!(n < 300, "a 1 MiB tmpfs never filled");
            };
            // A record small enough to fit, and then space itself, change nothing: refused
            // until the caller retries with what failed first.
            let small = Bytes::from_static(b"small");
            assert!(append(std::slice::from_ref(&small), false)
                .unwrap_err()
                .is_no_space());
            std::fs::remove_file(&filler).unwrap();
            assert!(append(std::slice::from_ref(&small), false)
                .unwrap_err()
                .is_no_space());
            let mut retried = failed;
            retried.push(small.clone());
            append(&retried, true).unwrap();
            stored.extend(retried);
            append(std::slice::from_ref(&small), false).unwrap();
            stored.push(small);
            let (log, _) = gc.stop().unwrap();
            drop(log);
            assert_eq!(reopen_and_read(&dir), stored);
        },
    );
}
