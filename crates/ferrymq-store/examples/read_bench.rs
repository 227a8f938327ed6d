//! Measures `LogReader` on this machine: a queue drain (every offset in order), a drain that
//! skips (every other offset), and random reads, over RECORDS records of SIZE bytes appended
//! in batches of 1 to 8 (as group commit makes them). The data is freshly written, so it is
//! in the page cache: this measures the reader, not the disk.
//!
//!     cargo run --release -p ferrymq-store --example read_bench -- [RECORDS] [SIZE] [DIR]

use std::time::Instant;

use ferrymq_store::{Log, LogConfig, LogReader, Offset};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let n: u64 = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(100_000);
    let size: usize = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(1024);
    let base = args
        .get(3)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let dir = base.join(format!("ferrymq-read-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let (mut log, _) = Log::open(LogConfig {
        dir: dir.clone(),
        segment_bytes: 64 << 20,
    })?;
    let payload = vec![0x5au8; size];
    let mut o = 0;
    while o < n {
        let k = (o % 8 + 1).min(n - o);
        let refs: Vec<&[u8]> = (0..k).map(|_| payload.as_slice()).collect();
        log.append(&refs)?;
        o += k;
    }
    log.sync()?;
    println!(
        "{n} records of {size} bytes, {:.1} MiB in {} segments",
        log.disk_bytes() as f64 / 1048576.0,
        log.segment_count()
    );
    println!("| pattern | reads | reads/s | MiB/s of records | preads | preads per 1000 reads |");
    println!("|---|---|---|---|---|---|");
    let patterns: [(&str, Vec<u64>); 3] = [
        ("sequential", (0..n).collect()),
        ("every other", (0..n).step_by(2).collect()),
        ("random", random_offsets(n, 20_000)),
    ];
    for (name, offsets) in patterns {
        let mut reader = LogReader::open(&dir)?;
        if name == "random" {
            // Random reads are measured with the index already built, as in a broker that
            // has been draining: a warm-up pass scans every segment once.
            reader.read(Offset(n - 1))?;
        }
        let before = reader.stats();
        let started = Instant::now();
        let mut bytes = 0;
        for &o in &offsets {
            bytes += reader.read(Offset(o))?.ok_or("record missing")?.len();
        }
        let took = started.elapsed().as_secs_f64();
        let preads = reader.stats().preads - before.preads;
        println!(
            "| {name} | {} | {:.0} | {:.0} | {preads} | {:.1} |",
            offsets.len(),
            offsets.len() as f64 / took,
            bytes as f64 / 1048576.0 / took,
            preads as f64 * 1000.0 / offsets.len() as f64,
        );
    }
    drop(log);
    std::fs::remove_dir_all(&dir)?;
    Ok(())
}

/// `count` offsets below `n`, from a fixed xorshift sequence so runs compare.
fn random_offsets(n: u64, count: usize) -> Vec<u64> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..count)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x % n
        })
        .collect()
}
