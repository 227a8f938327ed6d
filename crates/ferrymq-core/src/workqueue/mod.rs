//! Work queues (issue 11): named, durable queues that hand each message to one consumer at a
//! time, with acknowledgements, retries with backoff and dead letters.
//!
//! This module is being built in steps. What exists: the queue definition and its validation,
//! and the retry policy (`policy.rs`). Not yet: the queue's backlog index, leases, dead letters,
//! their journal records and the MQTT, REST and CLI surfaces (docs/queues.md has the design).
//! Nothing here is reachable from the broker yet, so no configuration accepts a queue.

mod policy;

pub use policy::{Backoff, Overflow, QueueDef, QueueDefError, MAX_DELAY_MS};
