//! A queue's backlog index: what memory holds per waiting message (the payload stays in the
//! log), ordered for leasing. Plain data, no clock: time comes in as an argument.
//!
//! Ready messages wait in ten FIFO rings, one per priority, and the highest non-empty ring
//! leases first. Delayed messages (a backoff after a failed attempt, `$delayed/…`,
//! `delay-ms`) wait in a heap by due time and join the back of their ring when due.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};

use crate::Time;

/// Priorities run 0 (lowest) to 9 (highest).
pub const PRIORITIES: usize = 10;

/// What memory holds for one queued message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Entry {
    /// The engine's message id (unique across restarts, increasing).
    pub id: u64,
    /// Where its record is in the log, to read the payload back when it is leased.
    pub position: u64,
    /// Encoded size, for `max_bytes`.
    pub size: u32,
    /// 0–9, higher first; out-of-range values are clamped to 9.
    pub priority: u8,
    /// Failed attempts so far.
    pub attempts: u16,
    pub first_enqueued: Time,
}

/// A delayed entry in the heap: due time first, then id (unique), so equal due times keep id
/// order and the entry itself never decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct Delayed {
    due: Time,
    id: u64,
    entry: Entry,
}

/// The waiting messages of one queue (leased ones are tracked elsewhere).
#[derive(Debug, Default)]
pub struct Backlog {
    ready: [VecDeque<Entry>; PRIORITIES],
    delayed: BinaryHeap<Reverse<Delayed>>,
    messages: u64,
    bytes: u64,
    /// Of `bytes`, those of delayed messages.
    delayed_bytes: u64,
}

impl Backlog {
    /// Messages waiting, ready or delayed.
    pub fn len(&self) -> u64 {
        self.messages
    }

    pub fn is_empty(&self) -> bool {
        self.messages == 0
    }

    /// Their encoded bytes.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Messages waiting for a due time.
    pub fn delayed(&self) -> usize {
        self.delayed.len()
    }

    /// Ready now: at the back of its priority's ring.
    pub fn push_ready(&mut self, entry: Entry) {
        self.count_in(&entry);
        self.ready[ring(entry.priority)].push_back(entry);
    }

    /// Ready at `due` (if `due` is not after `now`, at once).
    pub fn push_delayed(&mut self, entry: Entry, due: Time, now: Time) {
        if due <= now {
            return self.push_ready(entry);
        }
        self.count_in(&entry);
        self.delayed_bytes += u64::from(entry.size);
        self.delayed.push(Reverse(Delayed {
            due,
            id: entry.id,
            entry,
        }));
    }

    /// When the next delayed message is due, if any.
    pub fn next_due(&self) -> Option<Time> {
        self.delayed.peek().map(|Reverse(d)| d.due)
    }

    /// Moves every delayed message due by `now` to the back of its ring, in due order.
    pub fn promote(&mut self, now: Time) {
        while let Some(Reverse(d)) = self.delayed.peek() {
            if d.due > now {
                break;
            }
            let Some(Reverse(d)) = self.delayed.pop() else {
                break;
            };
            let e = d.entry;
            self.delayed_bytes -= u64::from(e.size);
            self.ready[ring(e.priority)].push_back(e);
        }
    }

    /// Messages and bytes that are ready (not delayed): what overflow may drop.
    pub fn ready_totals(&self) -> (u64, u64) {
        (
            self.messages - self.delayed.len() as u64,
            self.bytes - self.delayed_bytes,
        )
    }

    /// The next message to lease: due delayed ones join their rings first, then the front of
    /// the highest non-empty ring.
    pub fn pop_next(&mut self, now: Time) -> Option<Entry> {
        self.promote(now);
        let entry = self.ready.iter_mut().rev().find_map(VecDeque::pop_front)?;
        self.count_out(&entry);
        Some(entry)
    }

    /// The message [`Backlog::pop_next`] would return, without taking it (due delayed ones
    /// must have been promoted).
    pub fn peek_next(&self) -> Option<Entry> {
        self.ready.iter().rev().find_map(|r| r.front().copied())
    }

    /// The oldest ready message (the smallest id at the front of any ring), for overflow:
    /// `drop_oldest` drops it, `dead_letter` dead-letters it. Delayed messages are left
    /// alone: they already failed and wait for their retry.
    pub fn oldest_ready(&self) -> Option<Entry> {
        self.ready
            .iter()
            .filter_map(|r| r.front().copied())
            .min_by_key(|e| e.id)
    }

    /// Takes out waiting message `id`, wherever it is: normally the front of its ring (what
    /// live code leases or drops), else found by a scan of the rings, then of the delayed
    /// heap (a record replayed in an order the rings no longer match).
    pub fn take(&mut self, id: u64) -> Option<Entry> {
        let entry = self.take_inner(id)?;
        self.count_out(&entry);
        Some(entry)
    }

    fn take_inner(&mut self, id: u64) -> Option<Entry> {
        if let Some(r) = self
            .ready
            .iter_mut()
            .find(|r| r.front().is_some_and(|e| e.id == id))
        {
            return r.pop_front();
        }
        for r in self.ready.iter_mut() {
            if let Some(at) = r.iter().position(|e| e.id == id) {
                return r.remove(at);
            }
        }
        if !self.delayed.iter().any(|Reverse(d)| d.id == id) {
            return None;
        }
        let mut found = None;
        self.delayed.retain(|Reverse(d)| {
            if d.id == id {
                found = Some(d.entry);
                false
            } else {
                true
            }
        });
        if let Some(e) = &found {
            self.delayed_bytes -= u64::from(e.size);
        }
        found
    }

    /// Every waiting entry with its due time (`None` = ready): ready ones ring by ring from
    /// the highest priority, in ring order, then delayed ones (in no particular order; each
    /// carries its due time). Allocates nothing: a checkpoint of a large backlog walks it.
    pub fn iter(&self) -> impl Iterator<Item = (Entry, Option<Time>)> + '_ {
        let ready = self
            .ready
            .iter()
            .rev()
            .flat_map(|r| r.iter().map(|e| (*e, None)));
        let delayed = self.delayed.iter().map(|Reverse(d)| (d.entry, Some(d.due)));
        ready.chain(delayed)
    }

    /// The lowest log position of any waiting message: a tight scan of the rings' slices
    /// and the heap (a checkpoint of a multi-million backlog calls it once).
    pub fn min_position(&self) -> Option<u64> {
        let mut min = u64::MAX;
        for r in &self.ready {
            let (a, b) = r.as_slices();
            for e in a.iter().chain(b) {
                min = min.min(e.position);
            }
        }
        for Reverse(d) in self.delayed.iter() {
            min = min.min(d.entry.position);
        }
        (self.messages > 0).then_some(min)
    }

    /// The first-enqueued time of the messages that have waited longest in each ring and of
    /// the next delayed one: the oldest-age metric, without a scan of the backlog.
    pub fn oldest_enqueued(&self) -> Option<Time> {
        let fronts = self.ready.iter().filter_map(|r| r.front());
        let next_delayed = self.delayed.peek().map(|Reverse(d)| &d.entry);
        fronts.chain(next_delayed).map(|e| e.first_enqueued).min()
    }

    fn count_in(&mut self, e: &Entry) {
        self.messages += 1;
        self.bytes += u64::from(e.size);
    }

    fn count_out(&mut self, e: &Entry) {
        self.messages -= 1;
        self.bytes -= u64::from(e.size);
    }
}

fn ring(priority: u8) -> usize {
    usize::from(priority).min(PRIORITIES - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: u64, priority: u8) -> Entry {
        Entry {
            id,
            position: id * 100,
            size: 10,
            priority,
            attempts: 0,
            first_enqueued: Time(id),
        }
    }

    fn drain(b: &mut Backlog, now: Time) -> Vec<u64> {
        std::iter::from_fn(|| b.pop_next(now).map(|e| e.id)).collect()
    }

    #[test]
    fn higher_priority_first_and_fifo_within_a_level() {
        let mut b = Backlog::default();
        for (id, p) in [(1, 4), (2, 9), (3, 0), (4, 4), (5, 9), (6, 12)] {
            b.push_ready(entry(id, p));
        }
        assert_eq!((b.len(), b.bytes()), (6, 60));
        // 12 is clamped to 9 and queued after the other 9s.
        assert_eq!(drain(&mut b, Time(0)), vec![2, 5, 6, 1, 4, 3]);
        assert!(b.is_empty());
        assert_eq!(b.bytes(), 0);
    }

    #[test]
    fn a_delayed_message_waits_for_its_due_time_then_joins_the_back_of_its_level() {
        let mut b = Backlog::default();
        b.push_delayed(entry(1, 5), Time(1_000), Time(0));
        b.push_delayed(entry(2, 5), Time(500), Time(0));
        b.push_ready(entry(3, 5));
        // Due at or before now: ready at once.
        b.push_delayed(entry(4, 5), Time(0), Time(0));
        assert_eq!((b.len(), b.delayed()), (4, 2));
        assert_eq!(b.next_due(), Some(Time(500)));
        assert_eq!(drain(&mut b, Time(499)), vec![3, 4]);
        assert_eq!(b.next_due(), Some(Time(500)));
        b.push_ready(entry(5, 5));
        // At 1,000 both are due: in due order, behind what was ready before.
        assert_eq!(drain(&mut b, Time(1_000)), vec![5, 2, 1]);
        assert_eq!(b.next_due(), None);
    }

    #[test]
    fn equal_due_times_keep_id_order() {
        let mut b = Backlog::default();
        for id in [7, 3, 5] {
            b.push_delayed(entry(id, 1), Time(10), Time(0));
        }
        assert_eq!(drain(&mut b, Time(10)), vec![3, 5, 7]);
    }

    #[test]
    fn overflow_takes_the_oldest_ready_message_and_leaves_delayed_ones() {
        let mut b = Backlog::default();
        b.push_delayed(entry(1, 9), Time(100), Time(0));
        b.push_ready(entry(2, 9));
        b.push_ready(entry(3, 0));
        b.push_ready(entry(4, 5));
        assert_eq!(
            b.oldest_ready().and_then(|e| b.take(e.id)).map(|e| e.id),
            Some(2)
        );
        assert_eq!(
            b.oldest_ready().and_then(|e| b.take(e.id)).map(|e| e.id),
            Some(3)
        );
        assert_eq!(
            b.oldest_ready().and_then(|e| b.take(e.id)).map(|e| e.id),
            Some(4)
        );
        assert_eq!(
            b.oldest_ready().and_then(|e| b.take(e.id)),
            None,
            "only the delayed one is left"
        );
        assert_eq!((b.len(), b.bytes()), (1, 10));
    }

    #[test]
    fn take_finds_a_message_anywhere_and_keeps_the_counts() {
        let mut b = Backlog::default();
        b.push_ready(entry(1, 4));
        b.push_ready(entry(2, 4));
        b.push_ready(entry(3, 7));
        b.push_delayed(entry(4, 4), Time(100), Time(0));
        assert_eq!(
            b.take(2).map(|e| e.id),
            Some(2),
            "from the middle of a ring"
        );
        assert_eq!(b.take(4).map(|e| e.id), Some(4), "from the delayed heap");
        assert_eq!(b.take(4), None, "only once");
        assert_eq!((b.len(), b.bytes(), b.delayed()), (2, 20, 0));
        assert_eq!(b.peek_next().map(|e| e.id), Some(3));
        assert_eq!(drain(&mut b, Time(0)), vec![3, 1]);
    }
}
