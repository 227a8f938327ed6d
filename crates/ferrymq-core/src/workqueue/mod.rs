//! Work queues (issue 11): named, durable queues that hand each message to one consumer at a
//! time, with acknowledgements, retries with backoff and dead letters.
//!
//! This module is being built in steps. What exists: the queue definition and its validation,
//! the retry policy (`policy.rs`), the backlog index by priority and due time (`backlog.rs`),
//! and one queue's state machine: overflow, leases, acks, failed attempts with backoff, ack
//! timeouts, lost consumers, dead letters (`queue.rs`). Not yet: journal records, reading
//! payloads back from the log, the broker's routing and consumers, and the MQTT, REST and
//! CLI surfaces (docs/queues.md has the design).
//! Nothing here is reachable from the broker yet, so no configuration accepts a queue.

mod backlog;
mod policy;
mod queue;

pub use backlog::{Backlog, Entry, PRIORITIES};
pub use policy::{Backoff, Overflow, QueueDef, QueueDefError, MAX_DELAY_MS};
pub use queue::{Cause, DeadLetter, Enqueued, Failure, Queue, QueueStats, Retry};
