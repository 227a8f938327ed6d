//! The log of what happened to single messages, from the engine's `Outbox`: messages that
//! became dead letters (one info line each, naming the queue, the message, its cause and last
//! failure), and traced messages dropped for a subscriber (expired, too large for it, its
//! queue full; untraced drops are only counted). Each line carries the trace id of the
//! message's `traceparent` user property; the dead-letter record keeps the message, so
//! `GET /api/v1/queues/{q}/dead-letters/{id}` shows the same `trace_id`.
//!
//! At most [`PER_SECOND`] lines a second at info level; the rest go to debug, and the next
//! info line says how many were not shown (`not_shown_before`: those at debug, and the traced
//! drops the engine only counted, past `Outbox::MAX_DROPPED_LISTED` in one router step).

use std::time::{Duration, Instant};

use ferrymq_core::{DeadLettered, DroppedMessage};

/// Info lines a second, at most.
const PER_SECOND: u32 = 20;

/// Owned by the router, which hands it each step's dead letters and drops.
#[derive(Debug)]
pub(crate) struct MessageLog {
    window: Instant,
    shown: u32,
    /// Lines logged at debug only since the last info line.
    not_shown: u64,
}

impl Default for MessageLog {
    fn default() -> Self {
        MessageLog {
            window: Instant::now(),
            shown: 0,
            not_shown: 0,
        }
    }
}

impl MessageLog {
    /// Whether the next line may go out at info level (and counts it).
    fn at_info(&mut self, now: Instant) -> bool {
        if now.duration_since(self.window) >= Duration::from_secs(1) {
            self.window = now;
            self.shown = 0;
        }
        if self.shown < PER_SECOND {
            self.shown += 1;
            true
        } else {
            self.not_shown += 1;
            false
        }
    }

    /// Logs and clears `dead` and `dropped`; `unlisted` (traced drops the engine only
    /// counted, past `Outbox::MAX_DROPPED_LISTED` in a step) is reset and counts as not shown.
    pub(crate) fn log(
        &mut self,
        dead: &mut Vec<DeadLettered>,
        dropped: &mut Vec<DroppedMessage>,
        unlisted: &mut u64,
    ) {
        self.not_shown += std::mem::take(unlisted);
        if dead.is_empty() && dropped.is_empty() {
            return;
        }
        let now = Instant::now();
        for d in dead.drain(..) {
            let (queue, topic, cause) = (&*d.queue, &*d.topic, d.cause.as_str());
            let (reason, trace_id) = (d.reason.as_deref(), d.trace_id.as_deref());
            let id = d.message_id;
            if self.at_info(now) {
                let not_shown_before = std::mem::take(&mut self.not_shown);
                tracing::info!(
                    queue,
                    message_id = id,
                    topic,
                    cause,
                    reason,
                    trace_id,
                    not_shown_before,
                    "message dead-lettered"
                );
            } else {
                tracing::debug!(
                    queue,
                    message_id = id,
                    topic,
                    cause,
                    reason,
                    trace_id,
                    "message dead-lettered"
                );
            }
        }
        for d in dropped.drain(..) {
            let (client_id, topic, reason, trace_id) =
                (&*d.client_id, &*d.topic, d.reason, &*d.trace_id);
            if self.at_info(now) {
                let not_shown_before = std::mem::take(&mut self.not_shown);
                tracing::info!(
                    client_id,
                    topic,
                    reason,
                    trace_id,
                    not_shown_before,
                    "message dropped"
                );
            } else {
                tracing::debug!(client_id, topic, reason, trace_id, "message dropped");
            }
        }
    }
}
