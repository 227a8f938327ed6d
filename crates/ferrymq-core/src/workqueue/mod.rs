//! Work queues (issue 11): named, durable queues that hand each message to one consumer at a
//! time, with acknowledgements, retries with backoff and dead letters.
//!
//! Plain data, no clock: the queue definition and its validation, the retry policy
//! (`policy.rs`), the backlog index by priority and due time (`backlog.rs`), and one queue's
//! state (`queue.rs`), split into decisions and the changes journal records apply. The
//! broker's side (routing, consumers, timers, journal records) is `crate::queues`; the
//! design is docs/queues.md.

mod backlog;
mod policy;
mod queue;

pub use backlog::{Backlog, BacklogImage, Entry, PRIORITIES};
pub use policy::{Backoff, Overflow, QueueDef, QueueDefError, MAX_DELAY_MS};
pub use queue::{Cause, DeadLetter, Failure, Lease, Queue, QueueImage, QueueStats, Retry, Room};
