//! Resource checks behind the engine's admission (issue 10): the process's memory against
//! `limits.memory_high_watermark`, and the data directory's free space against
//! `storage.min_free_bytes`. The router runs [`Overload::check`] a few times a second; the
//! result goes to the engine as an [`Admission`] and to the alarms.
//!
//! Cost: one read of `/proc/self/statm` every [`MEMORY_EVERY`] and one `statvfs` of the data
//! directory every [`DISK_EVERY`] (a few microseconds each), on the router thread.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferrymq_core::{Admission, Broker};

use crate::alarms::{AlarmName, Alarms};
use crate::config::MemoryWatermark;
use crate::persist::Persistence;

/// How often resident memory is sampled while it is under half the mark.
pub(crate) const MEMORY_EVERY: Duration = Duration::from_millis(100);
/// How often once it is over half the mark: memory can grow by what arrives between two
/// samples before publishes are refused, and a flood of 64 KiB publishes over loopback grew
/// it by 17-43 MiB in 100 ms (tests/memory_high_watermark.rs, debug build); a read of
/// `/proc/self/statm` costs ~10 us, 0.1% of the router at this rate.
pub(crate) const MEMORY_EVERY_NEAR: Duration = Duration::from_millis(10);
/// Memory is also sampled as soon as the payload taken in since the last sample reaches half
/// the room left under the mark (at least this much): the clock alone let a flood overshoot
/// when the router thread waited for a core between two samples (36 MiB over an 80 MiB mark
/// in a loaded test run). At 1 GB/s right under the mark this is ~4,000 reads of
/// `/proc/self/statm` a second, ~4% of the router, and only while it is that close.
const MEMORY_SAMPLE_BYTES_MIN: u64 = 256 * 1024;
/// How often free disk space is looked at, and a log write that found the disk full retried.
pub(crate) const DISK_EVERY: Duration = Duration::from_millis(250);

/// How often the deepest session queue is looked for (a visit of every session: ~1 ms per
/// 100K sessions).
pub(crate) const QUEUE_EVERY: Duration = Duration::from_secs(1);

/// Memory is back under the mark once below this share of it (hysteresis: no flapping); the
/// queue-depth alarm likewise.
const LOW_MARK_PERCENT: u64 = 90;
/// Disk space is back once this much over the minimum (an eighth of it): hysteresis.
const DISK_CLEAR_EIGHTHS: u64 = 9;

/// How much payload may arrive after a memory sample before the next one is taken, whatever
/// the clock says: half the room left under `mark`, at least [`MEMORY_SAMPLE_BYTES_MIN`].
fn memory_sample_bytes(mark: u64, last_rss: u64) -> u64 {
    (mark.saturating_sub(last_rss) / 2).max(MEMORY_SAMPLE_BYTES_MIN)
}

/// Resident set size of this process, from `/proc/self/statm`.
pub(crate) fn rss_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * rustix::param::page_size() as u64)
}

/// Bytes available to unprivileged writers on the file system holding `path`.
pub(crate) fn free_bytes(path: &Path) -> std::io::Result<u64> {
    let s = rustix::fs::statvfs(path)?;
    Ok(s.f_bavail.saturating_mul(s.f_frsize))
}

/// The memory this process may use: its cgroup's limit (v2 `memory.max`, v1
/// `memory.limit_in_bytes`) if it has one below the machine's, else the machine's
/// (`MemTotal`). Also says which it is, for the log.
pub(crate) fn memory_limit() -> Option<(u64, &'static str)> {
    let machine = std::fs::read_to_string("/proc/meminfo")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse::<u64>()
        .ok()?
        * 1024;
    match cgroup_limit() {
        Some(c) if c < machine => Some((c, "cgroup")),
        _ => Some((machine, "machine")),
    }
}

fn cgroup_limit() -> Option<u64> {
    let cgroups = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    let read = |p: PathBuf| -> Option<u64> {
        let text = std::fs::read_to_string(p).ok()?;
        // "max" (v2) or a huge number (v1) mean no limit.
        text.trim().parse::<u64>().ok().filter(|&n| n < 1 << 60)
    };
    for line in cgroups.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, controllers, path) = (parts.next()?, parts.next()?, parts.next()?);
        let path = path.trim_start_matches('/');
        let found = if controllers.is_empty() {
            let root = Path::new("/sys/fs/cgroup");
            read(root.join(path).join("memory.max")).or_else(|| read(root.join("memory.max")))
        } else if controllers.split(',').any(|c| c == "memory") {
            let root = Path::new("/sys/fs/cgroup/memory");
            read(root.join(path).join("memory.limit_in_bytes"))
                .or_else(|| read(root.join("memory.limit_in_bytes")))
        } else {
            None
        };
        if found.is_some() {
            return found;
        }
    }
    None
}

/// The configured mark in bytes (None: off). A percentage is of [`memory_limit`].
pub(crate) fn resolve_watermark(mark: MemoryWatermark) -> Option<u64> {
    match mark {
        MemoryWatermark::Off => None,
        MemoryWatermark::Bytes(b) => Some(b),
        MemoryWatermark::Percent(p) => {
            let Some((limit, of)) = memory_limit() else {
                tracing::warn!(
                    "limits.memory_high_watermark is a percentage, but neither a cgroup limit \
                     nor the machine's memory could be read: the mark is off"
                );
                return None;
            };
            let bytes = (limit as f64 * p / 100.0) as u64;
            tracing::info!(percent = p, of, limit, bytes, "memory high-water mark");
            Some(bytes)
        }
    }
}

/// The router's resource checks and what they decided.
pub(crate) struct Overload {
    alarms: Alarms,
    memory_mark: Option<u64>,
    data_dir: Option<PathBuf>,
    min_free: u64,
    memory_high: bool,
    disk_low: bool,
    next_memory: Instant,
    next_disk: Instant,
    /// `queue_depth` alarm threshold in messages (None: off).
    queue_depth: Option<usize>,
    next_queue: Instant,
    /// The last samples, for the log and tests.
    pub(crate) last_rss: u64,
    pub(crate) last_free: Option<u64>,
    /// [`Persistence::bytes_submitted`] when `last_free` was sampled.
    written_at_sample: u64,
    /// Payload bytes the engine had received when `last_rss` was sampled.
    received_at_sample: u64,
}

impl Overload {
    /// `memory_mark` in bytes (None: off); `data_dir` when persistence is on.
    pub(crate) fn new(
        alarms: Alarms,
        memory_mark: Option<u64>,
        data_dir: Option<PathBuf>,
        min_free: u64,
        queue_depth: Option<usize>,
    ) -> Self {
        Overload {
            alarms,
            queue_depth,
            next_queue: Instant::now(),
            memory_mark,
            data_dir,
            min_free,
            memory_high: false,
            disk_low: false,
            next_memory: Instant::now(),
            next_disk: Instant::now(),
            last_rss: 0,
            last_free: None,
            written_at_sample: 0,
            received_at_sample: 0,
        }
    }

    /// Raises `queue_depth` when a session holds `queue_depth` messages or more, clears it
    /// when every session is under 90% of that.
    fn check_queues(&mut self, broker: &Broker, now: Instant) {
        let Some(limit) = self.queue_depth.filter(|_| now >= self.next_queue) else {
            return;
        };
        self.next_queue = now + QUEUE_EVERY;
        let (client, depth) = broker.deepest_queue().unwrap_or(("".into(), 0));
        let active = self.alarms.is_active(AlarmName::QueueDepth);
        let over = if active {
            depth as u64 >= (limit as u64).saturating_mul(LOW_MARK_PERCENT) / 100
        } else {
            depth >= limit
        };
        self.alarms.set(AlarmName::QueueDepth, over, || {
            format!(
                "session {client:?} holds {depth} messages, at or over limits.queue_depth_alarm \
                 = {limit}"
            )
        });
    }

    pub(crate) fn alarms(&self) -> &Alarms {
        &self.alarms
    }

    /// When the next check is due (None: nothing to check).
    pub(crate) fn next_due(&self) -> Option<Instant> {
        let memory = self.memory_mark.map(|_| self.next_memory);
        let disk = self.data_dir.as_ref().map(|_| self.next_disk);
        let queue = self.queue_depth.map(|_| self.next_queue);
        [memory, disk, queue].into_iter().flatten().min()
    }

    /// Runs the checks that are due: samples memory, looks at free disk space and retries the
    /// log's unwritten records; raises and clears the alarms. Returns what the engine may
    /// take in. Errors only when the log failed for good (a retry failed other than for
    /// space).
    pub(crate) fn check(
        &mut self,
        persist: Option<&mut Persistence>,
        broker: &Broker,
    ) -> Result<Admission, String> {
        let now = Instant::now();
        self.check_queues(broker, now);
        let alarms = &self.alarms;
        // Without a mark, nothing is read (not even the engine's counters).
        let received = || -> u64 { broker.stats().payload_bytes_received.iter().sum() };
        let due = |mark: &u64| {
            now >= self.next_memory
                || received().saturating_sub(self.received_at_sample)
                    >= memory_sample_bytes(*mark, self.last_rss)
        };
        if let Some(mark) = self.memory_mark.filter(due) {
            self.next_memory = now + MEMORY_EVERY;
            self.received_at_sample = received();
            if let Some(rss) = rss_bytes() {
                self.last_rss = rss;
                let every = if rss >= mark / 2 {
                    MEMORY_EVERY_NEAR
                } else {
                    MEMORY_EVERY
                };
                self.next_memory = now + every;
                let low = mark.saturating_mul(LOW_MARK_PERCENT) / 100;
                self.memory_high = if self.memory_high {
                    rss >= low
                } else {
                    rss >= mark
                };
                alarms.set(AlarmName::MemoryHighWatermark, self.memory_high, || {
                    format!(
                        "resident memory {rss} bytes is over the high-water mark of {mark} bytes: \
                         QoS 1/2 publishes are refused (0x97) and QoS 0 ones dropped until it \
                         is under {low}"
                    )
                });
            }
        }
        let Some(dir) = &self.data_dir else {
            return Ok(Admission {
                memory_high: self.memory_high,
                storage_full: false,
            });
        };
        let written = persist.as_ref().map_or(0, |p| p.bytes_submitted());
        let mut blocked = persist.as_ref().is_some_and(|p| p.is_blocked());
        let disk_due = now >= self.next_disk;
        if disk_due {
            self.next_disk = now + DISK_EVERY;
            match free_bytes(dir) {
                Ok(free) => {
                    self.last_free = Some(free);
                    self.written_at_sample = written;
                }
                Err(e) => tracing::debug!(error = %e, "statvfs of the data directory failed"),
            }
            if let Some(p) = persist.filter(|p| p.is_blocked()) {
                blocked = !p.retry()?;
            }
        }
        // Between samples, what the log took since comes off the last sample: a fast writer
        // cannot run through the reserve in the 250 ms between two looks.
        let mut free = None;
        if let Some(sampled) = self.last_free {
            let left = sampled.saturating_sub(written.saturating_sub(self.written_at_sample));
            free = Some(left);
            let free = left;
            let clear_at = self.min_free.saturating_mul(DISK_CLEAR_EIGHTHS) / 8;
            self.disk_low = if self.disk_low {
                free < clear_at
            } else {
                free < self.min_free
            };
        }
        if disk_due || self.disk_low != alarms.is_active(AlarmName::DiskLow) {
            let min = self.min_free;
            alarms.set(AlarmName::DiskLow, self.disk_low || blocked, || {
                let why = if blocked {
                    "a log write found the disk full; the unwritten records are kept in memory \
                     and retried"
                        .to_string()
                } else {
                    format!(
                        "about {} bytes free in the data directory, under \
                         storage.min_free_bytes = {min}",
                        free.unwrap_or(0)
                    )
                };
                format!(
                    "{why}: QoS 1/2 and retained publishes, new durable sessions and their \
                     subscriptions are refused (0x97)"
                )
            });
        }
        Ok(Admission {
            memory_high: self.memory_high,
            storage_full: self.disk_low || blocked,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_is_sampled_after_half_the_room_left_arrives() {
        const MIB: u64 = 1024 * 1024;
        // 64 MiB of room: the next sample after 32 MiB of payload.
        assert_eq!(memory_sample_bytes(80 * MIB, 16 * MIB), 32 * MIB);
        // Close to the mark, at the floor; over it (or with no sample yet over a small mark),
        // at the floor too.
        assert_eq!(
            memory_sample_bytes(80 * MIB, 80 * MIB - MIB / 4),
            MEMORY_SAMPLE_BYTES_MIN
        );
        assert_eq!(
            memory_sample_bytes(80 * MIB, 90 * MIB),
            MEMORY_SAMPLE_BYTES_MIN
        );
        assert_eq!(memory_sample_bytes(0, 0), MEMORY_SAMPLE_BYTES_MIN);
    }
}
