//! The FerryMQ engine: topic trie and matching, sessions, subscriptions (plain and shared),
//! QoS 0/1/2 flows, retained messages, wills, and the timers behind them.
//!
//! Must not depend on: sockets, files, an async runtime, or a clock. Time comes in as [`Time`]
//! with every call, so every timer (will delay, session expiry, message expiry) is tested
//! deterministically. The driver (the server crate, or an embedding program) feeds decoded
//! packets in and carries [`Action`]s out.
//!
//! Invariants a change must keep:
//! - A QoS 1/2 message accepted for a session stays in that session (in flight or pending)
//!   until it is acknowledged, expires, or the session ends. A full queue never loses an
//!   acknowledged message except under the opt-in [`QueueFull::DropOldest`] (counted in
//!   [`Stats`]); a refused one (`queue_full.rs`) leaves every queue it was held in before
//!   its refusal goes out.
//! - At most one connection is attached to a session; a new one takes the session over.
//! - Every subscription in the trie belongs to a live session, and vice versa.
//!
//! Durability: all session state lives in [`session::Session`] and the retained store. Every
//! change to durable state is a record applied by one function (`journal/record.rs`): live
//! code commits records (journaled into [`Outbox::journal`] when journaling is on), and
//! [`Broker::restore`] applies the same records read back from the log.

pub mod acl;
mod broker;
mod config;
mod journal;
mod message;
mod queue_full;
pub mod queues;
mod retained;
mod routing;
pub mod session;
mod subscribe;
mod trie;
pub mod views;
pub mod workqueue;

pub use acl::{AclConfig, Identity};
pub use broker::{
    Action, Admission, Broker, ConnectOutcome, DeadLettered, Delivery, DeniedPublish,
    DroppedMessage, Ended, Flow, Outbox, Stats,
};
pub use config::{BrokerConfig, QueueFull};
pub use journal::{
    is_checkpoint_begin, is_checkpoint_end, queue_snapshot_named, JournalBuf, JournalError,
    QueueSnapshot, RestoreReport,
};
pub use message::Message;
pub use retained::RetainedStore;
pub use trie::{Lookup, Matches, SharedGroup, SubEntry, SubscriptionTree};

/// Milliseconds on the driver's monotonic clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Time(pub u64);

impl Time {
    pub fn plus_secs(self, secs: u32) -> Time {
        Time(self.0.saturating_add(u64::from(secs) * 1000))
    }

    pub fn plus_millis(self, ms: u64) -> Time {
        Time(self.0.saturating_add(ms))
    }
}

/// A network connection, numbered by the driver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ConnId(pub u64);

/// A session, numbered by the engine; a client id gets a new one when its session is replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SessionId(pub u64);

/// Session expiry value meaning "never expires".
pub const SESSION_NEVER_EXPIRES: u32 = u32::MAX;
