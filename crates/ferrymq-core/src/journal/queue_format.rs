//! The byte format of work-queue records (tags 22–32 in [`Tag`]); the message a record
//! names is a `Message` record written before it, as for sessions.
//!
//! ```text
//! QueueDeclare = name | filter count varint | filter strings | max_attempts | backoff
//!                | ack_timeout_ms | max_messages (0 = none) | max_bytes (0 = none)
//!                | overflow u8 | dead_letter_on_expiry u8 | default_priority u8
//!                | dlq_retention_s (0 = none)
//! backoff      = kind u8 (0 none, 1 fixed, 2 linear, 3 exponential, 4 exponential_jitter,
//!                5 list) | fixed: delay_ms | linear: initial_ms max_ms
//!                | exponential(_jitter): initial_ms max_ms multiplier (f64 bits)
//!                | list: count varint, delays
//! entry        = message id | position (the log offset of the record holding the message)
//!                | size | priority u8 | attempts u16 | first_enqueued
//! failure      = at | reason code u8 | reason string | consumer string
//! retry        = 0 | due  (ready again at due), or 1 + cause u8 (a dead letter)
//! cause        = 0 max_attempts, 1 expired, 2 overflow, 3 rejected
//!
//! QueueDelete  = name                 QAck, QRedrive, QDiscard = name | message id
//! QEnqueue     = name | entry | due (0 = ready) | expires (0 = never) | failure count
//!                | failures
//!                | has message u8 | message (as in a `Message` record, without its tag):
//!                live records carry it (and their entry's position is their own offset);
//!                checkpoint records do not, and point at the one that does
//! QLease       = name | message id | consumer session | at
//! QFail        = name | message id | failure | retry
//! QDrop        = name | message id | expired u8
//! QDead        = name | message id | cause | at
//! QEntries     = name | count | (entry | due (0 = ready))*count  (checkpoints: entries
//!                without failures, a few thousand a record)
//! QDeadLetter  = name | entry | cause | dead_lettered | failure count | failures
//!                (its message is at the entry's position)
//! ```

use std::sync::Arc;

use super::format::{Fields, Rec, Tag};
use super::record::{QDeadLetter, QEnqueue, Record};
use super::JournalError;
use crate::workqueue::{Backoff, Cause, DeadLetter, Entry, Failure, Overflow, QueueDef, Retry};
use crate::Time;

pub(super) fn encode(b: &mut Rec<'_>, record: &Record) {
    match record {
        Record::QueueDeclare(def) => {
            b.put_u8(Tag::QueueDeclare as u8);
            encode_def(b, def);
        }
        Record::QueueDelete(name) => {
            b.put_u8(Tag::QueueDelete as u8);
            b.put_str(name);
        }
        Record::QEnqueue(e) => {
            b.put_u8(Tag::QEnqueue as u8);
            b.put_str(&e.queue);
            encode_entry(b, &e.entry);
            b.put_u64(e.due.map_or(0, |t| t.0.max(1)));
            b.put_u64(e.expires.map_or(0, |t| t.0.max(1)));
            encode_failures(b, &e.failures);
            match &e.message {
                Some(m) => {
                    b.put_u8(1);
                    super::format::encode_message_fields(b, m);
                }
                None => b.put_u8(0),
            }
        }
        Record::QLease {
            queue,
            message,
            consumer,
            at,
        } => {
            named(b, Tag::QLease, queue, *message);
            b.put_u64(consumer.0);
            b.put_u64(at.0);
        }
        Record::QAck { queue, message } => named(b, Tag::QAck, queue, *message),
        Record::QFail {
            queue,
            message,
            failure,
            retry,
        } => {
            named(b, Tag::QFail, queue, *message);
            encode_failure(b, failure);
            match retry {
                Retry::At(t) => {
                    b.put_u8(0);
                    b.put_u64(t.0);
                }
                Retry::DeadLettered(c) => {
                    b.put_u8(1);
                    b.put_u8(cause_byte(*c));
                }
            }
        }
        Record::QDrop {
            queue,
            message,
            expired,
        } => {
            named(b, Tag::QDrop, queue, *message);
            b.put_u8(u8::from(*expired));
        }
        Record::QDead {
            queue,
            message,
            cause,
            at,
        } => {
            named(b, Tag::QDead, queue, *message);
            b.put_u8(cause_byte(*cause));
            b.put_u64(at.0);
        }
        Record::QRedrive { queue, message } => named(b, Tag::QRedrive, queue, *message),
        Record::QDiscard { queue, message } => named(b, Tag::QDiscard, queue, *message),
        Record::QEntries { queue, entries } => {
            b.put_u8(Tag::QEntries as u8);
            b.put_str(queue);
            b.put_u64(entries.len() as u64);
            for (e, due) in entries {
                encode_entry(b, e);
                b.put_u64(due.map_or(0, |t| t.0.max(1)));
            }
        }
        Record::QDeadLetter(d) => {
            b.put_u8(Tag::QDeadLetter as u8);
            b.put_str(&d.queue);
            encode_entry(b, &d.dead.entry);
            b.put_u8(cause_byte(d.dead.cause));
            b.put_u64(d.dead.dead_lettered.0);
            encode_failures(b, &d.dead.failures);
        }
        // Session records are format.rs's.
        _ => {}
    }
}

/// Reads a queue record; `None` when the message it names is not in the log (a checkpoint
/// already wrote it again, or it was never there).
pub(super) fn decode(tag: Tag, f: &mut Fields<'_>) -> Result<Option<Record>, JournalError> {
    let record = match tag {
        Tag::QueueDeclare => Record::QueueDeclare(Box::new(decode_def(f)?)),
        Tag::QueueDelete => Record::QueueDelete(f.str()?.into()),
        Tag::QEnqueue => {
            let queue: Arc<str> = f.str()?.into();
            let entry = decode_entry(f)?;
            let due = Some(f.u64()?).filter(|t| *t != 0).map(Time);
            let expires = Some(f.u64()?).filter(|t| *t != 0).map(Time);
            let failures = decode_failures(f)?;
            // The message, if the record has it, is not read: replay keeps positions only
            // (a backlog larger than memory), and leasing reads it back.
            Record::QEnqueue(Box::new(QEnqueue {
                queue,
                entry,
                message: None,
                due,
                expires,
                failures,
            }))
        }
        Tag::QLease => Record::QLease {
            queue: f.str()?.into(),
            message: f.u64()?,
            consumer: f.sid()?,
            at: Time(f.u64()?),
        },
        Tag::QAck => Record::QAck {
            queue: f.str()?.into(),
            message: f.u64()?,
        },
        Tag::QFail => {
            let queue = f.str()?.into();
            let message = f.u64()?;
            let failure = Box::new(decode_failure(f)?);
            let retry = match f.u8()? {
                0 => Retry::At(Time(f.u64()?)),
                1 => Retry::DeadLettered(decode_cause(f)?),
                _ => return Err(f.invalid("queue retry")),
            };
            Record::QFail {
                queue,
                message,
                failure,
                retry,
            }
        }
        Tag::QDrop => Record::QDrop {
            queue: f.str()?.into(),
            message: f.u64()?,
            expired: f.u8()? != 0,
        },
        Tag::QDead => Record::QDead {
            queue: f.str()?.into(),
            message: f.u64()?,
            cause: decode_cause(f)?,
            at: Time(f.u64()?),
        },
        Tag::QRedrive => Record::QRedrive {
            queue: f.str()?.into(),
            message: f.u64()?,
        },
        Tag::QDiscard => Record::QDiscard {
            queue: f.str()?.into(),
            message: f.u64()?,
        },
        Tag::QEntries => {
            let queue: Arc<str> = f.str()?.into();
            let n = f.u64()?;
            // Each entry takes at least 7 bytes: a count larger than what is left is corrupt.
            if n > f.remaining() as u64 / 7 {
                return Err(f.invalid("entry count"));
            }
            let mut entries = Vec::with_capacity(n as usize);
            for _ in 0..n {
                let e = decode_entry(f)?;
                let due = Some(f.u64()?).filter(|t| *t != 0).map(Time);
                entries.push((e, due));
            }
            Record::QEntries { queue, entries }
        }
        Tag::QDeadLetter => {
            let queue: Arc<str> = f.str()?.into();
            let entry = decode_entry(f)?;
            let cause = decode_cause(f)?;
            let dead_lettered = Time(f.u64()?);
            let failures = decode_failures(f)?;
            Record::QDeadLetter(Box::new(QDeadLetter {
                queue,
                dead: DeadLetter {
                    entry,
                    cause,
                    failures,
                    dead_lettered,
                },
            }))
        }
        _ => return Err(f.invalid("not a queue record")),
    };
    Ok(Some(record))
}

fn named(b: &mut Rec<'_>, tag: Tag, queue: &str, message: u64) {
    b.put_u8(tag as u8);
    b.put_str(queue);
    b.put_u64(message);
}

fn encode_entry(b: &mut Rec<'_>, e: &Entry) {
    b.put_u64(e.id);
    b.put_u64(e.position);
    b.put_u32(e.size);
    b.put_u8(e.priority);
    b.put_u16(e.attempts);
    b.put_u64(e.first_enqueued.0);
}

fn decode_entry(f: &mut Fields<'_>) -> Result<Entry, JournalError> {
    Ok(Entry {
        id: f.u64()?,
        position: f.u64()?,
        size: f.u32()?,
        priority: f.u8()?,
        attempts: f.u16()?,
        first_enqueued: Time(f.u64()?),
    })
}

fn encode_failure(b: &mut Rec<'_>, x: &Failure) {
    b.put_u64(x.at.0);
    b.put_u8(x.reason_code);
    b.put_str(&x.reason);
    b.put_str(&x.consumer);
}

fn decode_failure(f: &mut Fields<'_>) -> Result<Failure, JournalError> {
    Ok(Failure {
        at: Time(f.u64()?),
        reason_code: f.u8()?,
        reason: f.str()?.into(),
        consumer: f.str()?.into(),
    })
}

fn encode_failures(b: &mut Rec<'_>, failures: &[Failure]) {
    b.put_u64(failures.len() as u64);
    for x in failures {
        encode_failure(b, x);
    }
}

fn decode_failures(f: &mut Fields<'_>) -> Result<Vec<Failure>, JournalError> {
    let n = f.u64()?;
    // Each failure takes at least 4 bytes: a count larger than what is left is corrupt.
    if n > f.remaining() as u64 / 4 {
        return Err(f.invalid("failure count"));
    }
    (0..n).map(|_| decode_failure(f)).collect()
}

fn cause_byte(c: Cause) -> u8 {
    match c {
        Cause::MaxAttempts => 0,
        Cause::Expired => 1,
        Cause::Overflow => 2,
        Cause::Rejected => 3,
    }
}

fn decode_cause(f: &mut Fields<'_>) -> Result<Cause, JournalError> {
    Ok(match f.u8()? {
        0 => Cause::MaxAttempts,
        1 => Cause::Expired,
        2 => Cause::Overflow,
        3 => Cause::Rejected,
        _ => return Err(f.invalid("dead-letter cause")),
    })
}

fn encode_def(b: &mut Rec<'_>, d: &QueueDef) {
    b.put_str(&d.name);
    b.put_u64(d.filters.len() as u64);
    for x in &d.filters {
        b.put_str(x);
    }
    b.put_u32(d.max_attempts);
    match &d.backoff {
        Backoff::None => b.put_u8(0),
        Backoff::Fixed { delay_ms } => {
            b.put_u8(1);
            b.put_u64(*delay_ms);
        }
        Backoff::Linear { initial_ms, max_ms } => {
            b.put_u8(2);
            b.put_u64(*initial_ms);
            b.put_u64(*max_ms);
        }
        Backoff::Exponential {
            initial_ms,
            max_ms,
            multiplier,
        } => {
            b.put_u8(3);
            b.put_u64(*initial_ms);
            b.put_u64(*max_ms);
            b.put_u64(multiplier.to_bits());
        }
        Backoff::ExponentialJitter {
            initial_ms,
            max_ms,
            multiplier,
        } => {
            b.put_u8(4);
            b.put_u64(*initial_ms);
            b.put_u64(*max_ms);
            b.put_u64(multiplier.to_bits());
        }
        Backoff::List { delays_ms } => {
            b.put_u8(5);
            b.put_u64(delays_ms.len() as u64);
            for x in delays_ms {
                b.put_u64(*x);
            }
        }
    }
    b.put_u64(d.ack_timeout_ms);
    b.put_u64(d.max_messages.unwrap_or(0));
    b.put_u64(d.max_bytes.unwrap_or(0));
    b.put_u8(match d.overflow {
        Overflow::DropOldest => 0,
        Overflow::RejectNew => 1,
        Overflow::DeadLetter => 2,
    });
    b.put_u8(u8::from(d.dead_letter_on_expiry));
    b.put_u8(d.default_priority);
    b.put_u64(d.dlq_retention_s.unwrap_or(0));
}

fn decode_def(f: &mut Fields<'_>) -> Result<QueueDef, JournalError> {
    let name = f.str()?.to_string();
    let n = f.u64()?;
    if n > f.remaining() as u64 {
        return Err(f.invalid("filter count"));
    }
    let filters = (0..n)
        .map(|_| f.str().map(str::to_string))
        .collect::<Result<Vec<_>, _>>()?;
    let max_attempts = f.u32()?;
    let backoff = match f.u8()? {
        0 => Backoff::None,
        1 => Backoff::Fixed { delay_ms: f.u64()? },
        2 => Backoff::Linear {
            initial_ms: f.u64()?,
            max_ms: f.u64()?,
        },
        k @ (3 | 4) => {
            let (initial_ms, max_ms) = (f.u64()?, f.u64()?);
            let multiplier = f64::from_bits(f.u64()?);
            if k == 3 {
                Backoff::Exponential {
                    initial_ms,
                    max_ms,
                    multiplier,
                }
            } else {
                Backoff::ExponentialJitter {
                    initial_ms,
                    max_ms,
                    multiplier,
                }
            }
        }
        5 => {
            let n = f.u64()?;
            if n > f.remaining() as u64 {
                return Err(f.invalid("backoff list length"));
            }
            Backoff::List {
                delays_ms: (0..n).map(|_| f.u64()).collect::<Result<_, _>>()?,
            }
        }
        _ => return Err(f.invalid("backoff kind")),
    };
    let ack_timeout_ms = f.u64()?;
    let max_messages = Some(f.u64()?).filter(|v| *v != 0);
    let max_bytes = Some(f.u64()?).filter(|v| *v != 0);
    let overflow = match f.u8()? {
        0 => Overflow::DropOldest,
        1 => Overflow::RejectNew,
        2 => Overflow::DeadLetter,
        _ => return Err(f.invalid("overflow policy")),
    };
    Ok(QueueDef {
        name,
        filters,
        max_attempts,
        backoff,
        ack_timeout_ms,
        max_messages,
        max_bytes,
        overflow,
        dead_letter_on_expiry: f.u8()? != 0,
        default_priority: f.u8()?,
        dlq_retention_s: Some(f.u64()?).filter(|v| *v != 0),
    })
}

/// The message a live `QEnqueue` record carries, if `record` is the `QEnqueue` of `queue`
/// and message `id` (anything else, a record that is not that one, gives `None`).
pub(crate) fn read_queue_message(record: &[u8], queue: &str, id: u64) -> Option<crate::Message> {
    let mut f = Fields::new(record);
    if f.u8().ok()? != Tag::QEnqueue as u8 {
        return None;
    }
    if f.str().ok()? != queue {
        return None;
    }
    let entry = decode_entry(&mut f).ok()?;
    if entry.id != id {
        return None;
    }
    let _due = f.u64().ok()?;
    let _expires = f.u64().ok()?;
    decode_failures(&mut f).ok()?;
    if f.u8().ok()? != 1 {
        return None;
    }
    super::format::decode_message_fields(&mut f).ok()
}
