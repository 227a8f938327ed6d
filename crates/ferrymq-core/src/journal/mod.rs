//! The journal: every change to durable state as a [`Record`](record::Record), and rebuilding
//! state from them.
//!
//! The engine stays free of I/O: with journaling on ([`Broker::enable_journal`]) each call
//! appends encoded records to [`Outbox::journal`]; the driver writes them to its log and must
//! not let any action of the same call reach the network before they are durable (that is
//! what makes a PUBACK mean "stored"). On start the driver feeds the log back through
//! [`Broker::restore`].
//!
//! What is journaled: retained messages, and for every *durable* session (session expiry > 0)
//! its existence and expiry, subscriptions, queued and in-flight QoS 1/2 messages with their
//! packet ids and states, inbound QoS 2 packet ids awaiting PUBREL, and a will waiting for its
//! delay. Sessions with expiry 0 end with their connection (and so with the process), so
//! nothing of theirs is written.
//!
//! One path: live code changes durable state only through [`Broker::commit`], which encodes
//! the record and applies it with [`Broker::apply`]; replay decodes and applies the same
//! records. The parts:
//! - `record.rs`: the [`Record`](record::Record) enum and `apply`;
//! - `format.rs`: the byte format of records and message bodies;
//! - `emit.rs`: writing records (message bodies once per generation) and a session's whole
//!   state when it becomes durable;
//! - `checkpoint.rs`: the whole durable state as one batch, so the log before it can go;
//! - `replay.rs`: [`Broker::restore`].
//!
//! [`Broker::enable_journal`]: crate::Broker::enable_journal
//! [`Broker::restore`]: crate::Broker::restore
//! [`Broker::commit`]: crate::Broker::commit
//! [`Broker::apply`]: crate::Broker::apply
//! [`Outbox::journal`]: crate::Outbox::journal

mod checkpoint;
mod emit;
mod format;
mod queue_format;
pub(crate) mod record;
mod replay;
#[cfg(test)]
mod tests;

use bytes::{BufMut, BytesMut};

pub use checkpoint::QueueSnapshot;
pub(crate) use emit::Journal;
pub(crate) use format::QUEUE_FRONT;
pub(crate) use queue_format::read_queue_message;

/// Whether a journal record begins a checkpoint (the driver checks that a replay it starts
/// part-way through the log starts at one).
pub fn is_checkpoint_begin(record: &[u8]) -> bool {
    record.first() == Some(&(format::Tag::CheckpointBegin as u8))
}

/// Whether a journal record ends a checkpoint.
pub fn is_checkpoint_end(record: &[u8]) -> bool {
    record.first() == Some(&(format::Tag::CheckpointEnd as u8))
}

/// The queue snapshot a journal record names, if it is a checkpoint's `QueueSnapshot` record
/// (the driver checks that the snapshot a checkpoint needs is there before it starts a
/// replay at that checkpoint).
pub fn queue_snapshot_named(record: &[u8]) -> Option<u64> {
    match record {
        [tag, id @ ..] if *tag == format::Tag::QueueSnapshot as u8 && id.len() == 8 => {
            let mut b = [0u8; 8];
            b.copy_from_slice(id);
            Some(u64::from_be_bytes(b))
        }
        _ => None,
    }
}

/// A journal record that cannot be replayed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum JournalError {
    #[error("record {index}: truncated")]
    Truncated { index: u64 },
    #[error("record {index}: unknown tag {tag}")]
    UnknownTag { index: u64, tag: u8 },
    #[error("record {index}: invalid: {what}")]
    Invalid { index: u64, what: String },
}

/// What [`Broker::restore`](crate::Broker::restore) rebuilt.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RestoreReport {
    pub records: u64,
    pub sessions: usize,
    pub subscriptions: usize,
    pub retained: usize,
    /// QoS 1/2 messages queued or in flight across sessions.
    pub queued: usize,
    pub inbound_qos2: usize,
    pub pending_wills: usize,
    /// Work queues (including the internal one behind `$delayed/…`).
    pub queues: usize,
    /// Messages in them: waiting, leased (returned as failed attempts) and dead letters.
    pub queue_messages: u64,
    /// Records that named a session, message or packet id no longer there. Harmless after a
    /// session ended; anything else means the log and the engine disagree.
    pub skipped: u64,
    /// The log ended inside a checkpoint (a crash while writing it); it was ignored.
    pub incomplete_checkpoint: bool,
    /// Checkpoints ignored because their queue snapshot was missing or damaged (a crash
    /// before it was durable), and why the last one was.
    pub void_checkpoints: u64,
    pub void_reason: Option<String>,
}

/// Journal records of one or more engine calls, each framed as `length u32 | record`: the
/// framing the log's batch body uses, so the driver hands the bytes over without re-framing
/// or a per-record allocation.
#[derive(Debug, Default)]
pub struct JournalBuf {
    framed: BytesMut,
    count: u64,
}

impl JournalBuf {
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Records held.
    pub fn len(&self) -> u64 {
        self.count
    }

    /// Bytes held (framing included).
    pub fn bytes(&self) -> usize {
        self.framed.len()
    }

    /// Takes every record: the framed bytes and how many records they hold.
    pub fn take(&mut self) -> (bytes::Bytes, u64) {
        let count = std::mem::take(&mut self.count);
        (self.framed.split().freeze(), count)
    }

    /// The records, in order.
    pub fn records(&self) -> impl Iterator<Item = &[u8]> {
        let mut rest = &self.framed[..];
        std::iter::from_fn(move || {
            if rest.len() < 4 {
                return None;
            }
            let n = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
            let (record, tail) = rest[4..].split_at(n.min(rest.len() - 4));
            rest = tail;
            Some(record)
        })
    }

    pub fn clear(&mut self) {
        self.framed.clear();
        self.count = 0;
    }

    fn push(&mut self, write: impl FnOnce(&mut format::Rec<'_>)) {
        if self.framed.capacity() - self.framed.len() < 512 {
            self.framed.reserve(64 * 1024);
        }
        let at = self.framed.len();
        self.framed.put_u32(0);
        let mut rec = format::Rec::new(&mut self.framed);
        write(&mut rec);
        rec.flush();
        let len = (self.framed.len() - at - 4) as u32;
        self.framed[at..at + 4].copy_from_slice(&len.to_be_bytes());
        self.count += 1;
    }
}
