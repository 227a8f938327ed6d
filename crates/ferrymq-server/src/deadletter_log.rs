//! The log of messages that became dead letters: one info line each, naming the queue, the
//! message, its cause and last failure, and the trace id of its `traceparent` user property
//! (the dead-letter record keeps the message, so `GET /api/v1/queues/{q}/dead-letters/{id}`
//! shows the same `trace_id`). At most [`PER_SECOND`] lines a second at info level; the rest
//! go to debug, and the next info line says how many were not shown.

use std::time::{Duration, Instant};

use ferrymq_core::DeadLettered;

/// Info lines a second, at most.
const PER_SECOND: u32 = 20;

/// Owned by the router, which hands it each step's dead letters.
#[derive(Debug)]
pub(crate) struct DeadLetterLog {
    window: Instant,
    shown: u32,
    /// Lines logged at debug only since the last info line.
    not_shown: u64,
}

impl Default for DeadLetterLog {
    fn default() -> Self {
        DeadLetterLog {
            window: Instant::now(),
            shown: 0,
            not_shown: 0,
        }
    }
}

impl DeadLetterLog {
    pub(crate) fn log(&mut self, dead: &mut Vec<DeadLettered>) {
        if dead.is_empty() {
            return;
        }
        let now = Instant::now();
        if now.duration_since(self.window) >= Duration::from_secs(1) {
            self.window = now;
            self.shown = 0;
        }
        for d in dead.drain(..) {
            let (queue, topic, cause) = (&*d.queue, &*d.topic, d.cause.as_str());
            let (reason, trace_id) = (d.reason.as_deref(), d.trace_id.as_deref());
            if self.shown < PER_SECOND {
                self.shown += 1;
                tracing::info!(
                    queue,
                    message_id = d.message_id,
                    topic,
                    cause,
                    reason,
                    trace_id,
                    not_shown_before = self.not_shown,
                    "message dead-lettered"
                );
                self.not_shown = 0;
            } else {
                self.not_shown += 1;
                tracing::debug!(
                    queue,
                    message_id = d.message_id,
                    topic,
                    cause,
                    reason,
                    trace_id,
                    "message dead-lettered"
                );
            }
        }
    }
}
