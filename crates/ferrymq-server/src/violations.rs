//! The log of connections closed for breaking a rule: a malformed packet, a protocol error, a
//! keep alive timeout, a slow consumer, a bad first packet.
//!
//! Each one is counted by reason ([`NetMetrics::disconnects`], also `ferrymq_disconnects_total`)
//! and logged at debug level where it happens. At the default level the log gets at most one
//! summary line per [`SUMMARY_INTERVAL`], with the counts by reason, and only when something
//! happened: a client opening hostile connections must not be able to fill the disk (90,000
//! such connections once wrote 140,000 info lines).

use std::fmt::Write;
use std::time::{Duration, Instant};

use crate::metrics::{reason_label, NetMetrics};

/// At most one summary line per interval.
pub(crate) const SUMMARY_INTERVAL: Duration = Duration::from_secs(10);

/// Remembers what the last summary covered. Owned by the router, which calls
/// [`ViolationLog::summarize`] after every step (it wakes at least once a second).
pub(crate) struct ViolationLog {
    /// The counts at the last summary, per reason (as [`NetMetrics::disconnects`] lists them).
    reported: Vec<u64>,
    next: Instant,
}

impl ViolationLog {
    pub(crate) fn new(now: Instant) -> ViolationLog {
        ViolationLog {
            reported: Vec::new(),
            next: now + SUMMARY_INTERVAL,
        }
    }

    /// Writes one line with the counts since the last summary, if the interval is over and
    /// anything was counted. Returns the line (for tests).
    pub(crate) fn summarize(&mut self, net: &NetMetrics, now: Instant) -> Option<String> {
        if now < self.next {
            return None;
        }
        self.next = now + SUMMARY_INTERVAL;
        let counts: Vec<_> = net.disconnects.all().collect();
        self.reported.resize(counts.len(), 0);
        let mut total = 0;
        let mut by_reason = String::new();
        for ((reason, count), reported) in counts.into_iter().zip(self.reported.iter_mut()) {
            let new = count.saturating_sub(*reported);
            *reported = count;
            if new > 0 {
                total += new;
                let sep = if by_reason.is_empty() { "" } else { " " };
                let _ = write!(by_reason, "{sep}{}={new}", reason_label(reason));
            }
        }
        if total == 0 {
            return None;
        }
        tracing::info!(
            closed = total,
            by_reason = %by_reason,
            interval_secs = SUMMARY_INTERVAL.as_secs(),
            "closed connections that broke a rule (each is logged at debug level)"
        );
        Some(by_reason)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use ferrymq_mqtt::ReasonCode;

    #[test]
    fn one_line_per_interval_with_counts_by_reason_and_none_when_quiet() {
        let net = NetMetrics::default();
        let t0 = Instant::now();
        let mut log = ViolationLog::new(t0);
        for _ in 0..1000 {
            net.disconnects.add(ReasonCode::MalformedPacket);
        }
        net.disconnects.add(ReasonCode::KeepAliveTimeout);
        assert_eq!(log.summarize(&net, t0), None, "not before the interval");
        assert_eq!(
            log.summarize(&net, t0 + SUMMARY_INTERVAL).as_deref(),
            Some("malformed_packet=1000 keep_alive_timeout=1")
        );
        net.disconnects.add(ReasonCode::ProtocolError);
        let soon = t0 + SUMMARY_INTERVAL + Duration::from_secs(1);
        assert_eq!(log.summarize(&net, soon), None, "one line per interval");
        let later = t0 + 2 * SUMMARY_INTERVAL;
        assert_eq!(
            log.summarize(&net, later).as_deref(),
            Some("protocol_error=1")
        );
        assert_eq!(
            log.summarize(&net, later + SUMMARY_INTERVAL),
            None,
            "nothing happened"
        );
    }
}
