//! Work queues (issue 11): named, durable queues that hand each message to one consumer at a
//! time, with acknowledgements, retries with backoff and dead letters.
//!
//! This module is being built in steps. What exists: the queue definition and its validation,
//! the retry policy (`policy.rs`), and the backlog index by priority and due time
//! (`backlog.rs`). Not yet: leases, dead letters, their journal records, reading payloads
//! back from the log, and the MQTT, REST and CLI surfaces (docs/queues.md has the design).
//! Nothing here is reachable from the broker yet, so no configuration accepts a queue.

mod backlog;
mod policy;

pub use backlog::{Backlog, Entry, PRIORITIES};
pub use policy::{Backoff, Overflow, QueueDef, QueueDefError, MAX_DELAY_MS};
