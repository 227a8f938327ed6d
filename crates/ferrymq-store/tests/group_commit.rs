//! Group commit: waiters share fsyncs, every acknowledged record is in the log after a reopen,
//! and each policy syncs when it says it does (interval syncing is the server's own).

#![allow(clippy::unwrap_used)]

use std::sync::mpsc::channel;
use std::sync::Arc;

use bytes::Bytes;
use ferrymq_store::{FsyncPolicy, GroupCommit, Log, LogConfig, Offset};

fn open(dir: &std::path::Path) -> Log {
    Log::open(LogConfig {
        dir: dir.to_path_buf(),
        segment_bytes: 1 << 20,
    })
    .unwrap()
    .0
}

fn hammer(gc: &Arc<GroupCommit>, threads: u64, each: u64) -> Vec<Offset> {
    let (tx, rx) = channel();
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let gc = gc.clone();
            let tx = tx.clone();
            std::thread::spawn(move || {
                for i in 0..each {
                    let (done_tx, done_rx) = channel();
                    let rec = Bytes::from(format!("{t}-{i}"));
                    gc.append(
                        vec![rec],
                        Box::new(move |r| {
                            let _ = done_tx.send(r);
                        }),
                    );
                    // Like a QoS 1 publisher with one message in flight: wait for the ack.
                    tx.send(done_rx.recv().unwrap().unwrap()).unwrap();
                }
            })
        })
        .collect();
    drop(tx);
    for h in handles {
        h.join().unwrap();
    }
    rx.into_iter().collect()
}

#[test]
fn always_policy_shares_fsyncs_and_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let gc = Arc::new(GroupCommit::start(open(dir.path()), FsyncPolicy::Always, 1024).unwrap());
    let mut offsets = hammer(&gc, 16, 50);
    offsets.sort();
    offsets.dedup();
    assert_eq!(offsets.len(), 800, "every append got its own offset");
    let (log, stats) = Arc::try_unwrap(gc).ok().unwrap().stop().unwrap();
    assert_eq!(stats.appends, 800);
    assert!(
        stats.syncs < stats.appends / 2,
        "fsyncs were shared: {stats:?}"
    );
    drop(log);
    let log = open(dir.path());
    assert_eq!(log.read_from(Offset(0)).unwrap().len(), 800);
}

#[test]
fn os_policy_never_syncs_while_running() {
    let dir = tempfile::tempdir().unwrap();
    let gc = Arc::new(GroupCommit::start(open(dir.path()), FsyncPolicy::Os, 64).unwrap());
    hammer(&gc, 4, 100);
    let (_, stats) = Arc::try_unwrap(gc).ok().unwrap().stop().unwrap();
    assert_eq!((stats.appends, stats.syncs), (400, 0));
}
