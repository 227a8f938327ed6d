//! A queue's backlog index: what memory holds per waiting message (the payload stays in the
//! log), ordered for leasing. Plain data, no clock: time comes in as an argument.
//!
//! Ready messages wait in ten FIFO rings, one per priority, and the highest non-empty ring
//! leases first. Delayed messages (a backoff after a failed attempt, `$delayed/…`,
//! `delay-ms`) wait in a heap by due time and join the back of their ring when due.
//!
//! A checkpoint takes a [`BacklogImage`] and writes it on another thread: the rings keep
//! their entries in shared chunks, so the image of a multi-million backlog shares them (a
//! reference count per thousand entries) instead of copying, and the ring copies a chunk
//! only when it changes one an image still holds.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::sync::Arc;

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
    ready: [Ring; PRIORITIES],
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
        let entry = self.ready.iter_mut().rev().find_map(Ring::pop_front)?;
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
        if let Some(e) = self.ready.iter_mut().find_map(|r| r.remove(id)) {
            return Some(e);
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
            for chunk in r.slices() {
                for e in chunk {
                    min = min.min(e.position);
                }
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

    /// The waiting entries as they are now, for a checkpoint written elsewhere: the rings'
    /// chunks are shared (cheap whatever the backlog), delayed entries are copied.
    pub fn image(&self) -> BacklogImage {
        let mut ready: Vec<RingImage> = self.ready.iter().rev().map(Ring::image).collect();
        ready.retain(|r| !r.chunks.is_empty());
        BacklogImage {
            ready,
            delayed: self
                .delayed
                .iter()
                .map(|Reverse(d)| (d.entry, d.due))
                .collect(),
        }
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

/// Entries per chunk of a ring: an image of 10M entries holds ~10K references.
const CHUNK: usize = 1024;

/// A FIFO of entries in chunks that images share ([`Backlog::image`]). Only the back chunk
/// takes pushes and only the front one pops (by moving `head`, which writes nothing), so
/// after an image is taken the ring copies at most the back chunk, plus any chunk a removal
/// from the middle (expiry, overflow found out of order) changes.
#[derive(Debug, Default)]
struct Ring {
    chunks: VecDeque<Arc<Vec<Entry>>>,
    /// Entries of the front chunk already popped.
    head: usize,
}

impl Ring {
    fn push_back(&mut self, e: Entry) {
        match self.chunks.back_mut() {
            Some(c) if c.len() < CHUNK => Arc::make_mut(c).push(e),
            _ => self.chunks.push_back(Arc::new(vec![e])),
        }
    }

    fn front(&self) -> Option<&Entry> {
        // An emptied ring may keep its one chunk, empty, for reuse.
        self.chunks.front().and_then(|c| c.get(self.head))
    }

    fn pop_front(&mut self) -> Option<Entry> {
        let only = self.chunks.len() == 1;
        let c = self.chunks.front_mut()?;
        let e = *c.get(self.head)?;
        self.head += 1;
        if self.head == c.len() {
            self.head = 0;
            // A queue that is emptied as fast as it fills keeps reusing its one small chunk
            // instead of allocating a new one per message.
            match Arc::get_mut(c) {
                Some(v) if only && v.capacity() <= 64 => v.clear(),
                _ => {
                    self.chunks.pop_front();
                }
            }
        }
        Some(e)
    }

    /// Takes out entry `id` from anywhere (a scan: rare, see [`Backlog::take`]).
    fn remove(&mut self, id: u64) -> Option<Entry> {
        let (i, at) = self.slices().enumerate().find_map(|(i, s)| {
            s.iter()
                .position(|e| e.id == id)
                .map(|at| (i, at + if i == 0 { self.head } else { 0 }))
        })?;
        let c = Arc::make_mut(&mut self.chunks[i]);
        let e = c.remove(at);
        let live = if i == 0 { c.len() - self.head } else { c.len() };
        if live == 0 {
            self.chunks.remove(i);
            if i == 0 {
                self.head = 0;
            }
        }
        Some(e)
    }

    /// The entries, front to back, as slices.
    fn slices(&self) -> impl Iterator<Item = &[Entry]> {
        let head = self.head;
        self.chunks
            .iter()
            .enumerate()
            .map(move |(i, c)| if i == 0 { &c[head..] } else { &c[..] })
    }

    fn iter(&self) -> impl Iterator<Item = &Entry> {
        self.slices().flatten()
    }

    fn image(&self) -> RingImage {
        RingImage {
            chunks: self.chunks.iter().cloned().collect(),
            head: self.head,
        }
    }
}

/// One ring's entries at the time of [`Backlog::image`].
#[derive(Debug, Clone)]
struct RingImage {
    chunks: Vec<Arc<Vec<Entry>>>,
    head: usize,
}

/// A backlog's waiting entries at one moment ([`Backlog::image`]): owned, `Send`, and
/// unchanged by what the queue does next.
#[derive(Debug, Clone, Default)]
pub struct BacklogImage {
    /// Non-empty rings, highest priority first.
    ready: Vec<RingImage>,
    delayed: Vec<(Entry, Time)>,
}

impl BacklogImage {
    /// Every entry with its due time (`None` = ready), in the order of [`Backlog::iter`].
    pub fn iter(&self) -> impl Iterator<Item = (Entry, Option<Time>)> + '_ {
        let ready = self.ready.iter().flat_map(|r| {
            r.chunks.iter().enumerate().flat_map(move |(i, c)| {
                let from = if i == 0 { r.head } else { 0 };
                c[from..].iter().map(|e| (*e, None))
            })
        });
        ready.chain(self.delayed.iter().map(|(e, due)| (*e, Some(*due))))
    }
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

    #[test]
    fn an_image_keeps_the_backlog_as_it_was_while_the_rings_change() {
        let mut b = Backlog::default();
        // Three and a half chunks in one ring, a few in another, one delayed.
        for id in 1..=3_500 {
            b.push_ready(entry(id, 4));
        }
        for id in 3_501..=3_510 {
            b.push_ready(entry(id, 7));
        }
        b.push_delayed(entry(4_000, 4), Time(100), Time(0));
        let before: Vec<(u64, Option<Time>)> = b.iter().map(|(e, d)| (e.id, d)).collect();
        let image = b.image();
        // Pops across a chunk boundary, pushes into the shared back chunk, removals from the
        // middle of a shared chunk and of the back one, and the delayed one promoted.
        let popped: Vec<u64> = (0..1_100)
            .filter_map(|_| b.pop_next(Time(0)))
            .map(|e| e.id)
            .collect();
        assert_eq!(popped[..10], (3_501..=3_510).collect::<Vec<_>>()[..]);
        assert_eq!(popped[10..], (1..=1_090).collect::<Vec<_>>()[..]);
        for id in 5_000..5_010 {
            b.push_ready(entry(id, 4));
        }
        assert_eq!(b.take(2_000).map(|e| e.id), Some(2_000));
        assert_eq!(b.take(3_499).map(|e| e.id), Some(3_499));
        b.promote(Time(100));
        let seen: Vec<(u64, Option<Time>)> = image.iter().map(|(e, d)| (e.id, d)).collect();
        assert_eq!(seen, before, "the image is the backlog when it was taken");
        // And the backlog itself is what the changes made it.
        let rest = drain(&mut b, Time(100));
        let mut want: Vec<u64> = (1_091..=3_500)
            .filter(|&i| i != 2_000 && i != 3_499)
            .collect();
        want.extend(5_000..5_010);
        want.push(4_000);
        assert_eq!(rest, want);
        assert_eq!((b.len(), b.bytes()), (0, 0));
    }

    #[test]
    fn a_ring_emptied_as_fast_as_it_fills_keeps_its_order() {
        let mut b = Backlog::default();
        let mut next = 1;
        let mut want = 1;
        for round in 0..3_000u64 {
            for _ in 0..(round % 5) {
                b.push_ready(entry(next, 3));
                next += 1;
            }
            if round % 7 == 0 {
                let image = b.image();
                assert_eq!(image.iter().count() as u64, b.len());
            }
            while let Some(e) = b.pop_next(Time(0)) {
                assert_eq!(e.id, want);
                want += 1;
            }
            assert!(b.peek_next().is_none());
        }
        assert_eq!(want, next);
    }
}
