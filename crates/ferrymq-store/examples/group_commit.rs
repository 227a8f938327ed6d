//! Measures group commit on this machine's disk: P producers, each waiting for its previous
//! append to be acknowledged (W in flight each), under every fsync policy.
//!
//!     cargo run --release -p ferrymq-store --example group_commit -- [PRODUCERS] [SECONDS] [DIR]

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use ferrymq_store::{FsyncPolicy, GroupCommit, Log, LogConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let producers: u64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(50);
    let secs: u64 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(3);
    let base = args
        .get(3)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    println!("| policy | producers | appends/s | fsyncs/s | records per fsync |");
    println!("|---|---|---|---|---|");
    for policy in [FsyncPolicy::Always, FsyncPolicy::Os] {
        let dir = base.join(format!("ferrymq-gc-{}-{:?}", std::process::id(), policy));
        let _ = std::fs::remove_dir_all(&dir);
        let (log, _) = Log::open(LogConfig {
            dir: dir.clone(),
            segment_bytes: 64 << 20,
        })?;
        let gc = Arc::new(GroupCommit::start(log, policy, 4096)?);
        let done = Arc::new(AtomicU64::new(0));
        let stop_at = Instant::now() + Duration::from_secs(secs);
        let threads: Vec<_> = (0..producers)
            .map(|_| {
                let (gc, done) = (gc.clone(), done.clone());
                std::thread::spawn(move || {
                    let payload = Bytes::from(vec![0x42u8; 100]);
                    while Instant::now() < stop_at {
                        let (tx, rx) = std::sync::mpsc::channel();
                        gc.append(
                            vec![payload.clone()],
                            Box::new(move |r| {
                                let _ = tx.send(r.is_ok());
                            }),
                        );
                        if rx.recv().unwrap_or(false) {
                            done.fetch_add(1, Relaxed);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            let _ = t.join();
        }
        let n = done.load(Relaxed);
        let (_, stats) = Arc::try_unwrap(gc)
            .ok()
            .and_then(|g| g.stop())
            .ok_or("commit thread lost")?;
        let s = secs as f64;
        println!(
            "| {policy:?} | {producers} | {:.0} | {:.0} | {:.1} |",
            n as f64 / s,
            stats.syncs as f64 / s,
            if stats.syncs > 0 {
                n as f64 / stats.syncs as f64
            } else {
                f64::NAN
            }
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
    Ok(())
}
