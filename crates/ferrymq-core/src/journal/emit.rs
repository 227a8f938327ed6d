//! Writing records: message bodies once per generation, and a session's whole state when it
//! starts or stops being durable.

use super::format::{self, Rec};
use super::record::Record;
use crate::broker::Outbox;
use crate::{Broker, Message, SessionId};

/// Journal state kept by the engine while journaling is on.
#[derive(Debug)]
pub(crate) struct Journal {
    /// Current generation: a message's body is in the log since the last checkpoint iff its
    /// mark equals this.
    pub(super) generation: u64,
    /// The log offset the next record will get. The driver appends every record the engine
    /// writes, in order, and nothing else, so the engine numbers them as the log does (work
    /// queues point at their messages' records by offset; `Broker::set_journal_base`).
    pub(crate) next_offset: u64,
}

impl Journal {
    fn new(base: u64) -> Journal {
        Journal {
            generation: 1,
            next_offset: base,
        }
    }

    pub(super) fn push(&mut self, out: &mut Outbox, write: impl FnOnce(&mut Rec<'_>)) {
        self.next_offset += 1;
        out.journal.push(write);
    }

    /// Writes `record`, preceded by the body of any message it names that this generation
    /// does not hold yet.
    pub(crate) fn write(&mut self, record: &Record, out: &mut Outbox) {
        match record {
            Record::Retain(m) => self.message(out, m),
            Record::Enqueue { pending, .. } | Record::Sent { pending, .. } => {
                self.message(out, &pending.message)
            }
            Record::Will { sid, will, due } => {
                let m = format::will_message(*sid, will, *due);
                self.push(out, |b| format::encode_message(b, &m));
            }
            _ => {}
        }
        self.push(out, |b| format::encode(b, record));
    }

    /// Writes the message's body unless this generation already holds it.
    fn message(&mut self, out: &mut Outbox, m: &Message) {
        if m.journaled.get() == self.generation {
            return;
        }
        m.journaled.set(self.generation);
        self.push(out, |b| format::encode_message(b, m));
    }
}

impl Broker {
    /// Tells the engine the log offset its next journal record will get (the log's end when
    /// journaling starts). Call before [`Broker::enable_journal`]; 0 by default.
    pub fn set_journal_base(&mut self, offset: u64) {
        self.journal_base = offset;
    }

    /// The log offset the next journal record will get (`None` without journaling).
    pub fn journal_next_offset(&self) -> Option<u64> {
        self.journal.as_ref().map(|j| j.next_offset)
    }

    /// Turns journaling on. Call before the first connection (after [`Broker::restore`]).
    /// Writes into `out` what restore concluded without a record: sessions that were
    /// connected when the log ended were disconnected by the crash at the restore time. The
    /// driver stores these records before any other, or every restart would move that time
    /// forward again (and a session restarted often enough would never expire).
    pub fn enable_journal(&mut self, out: &mut Outbox) {
        if self.journal.is_some() {
            return;
        }
        let mut j = Journal::new(self.journal_base);
        for sid in std::mem::take(&mut self.restored_disconnects) {
            if let Some(s) = self.sessions.get(&sid).filter(|s| s.journaled) {
                let record = Record::Session {
                    sid,
                    client_id: s.client_id.clone(),
                    version: s.version,
                    expiry: s.expiry_interval,
                    disconnected_at: s.disconnected_at,
                };
                j.write(&record, out);
            }
        }
        self.journal = Some(j);
        self.return_restored_leases(out);
    }

    /// After CONNECT or DISCONNECT changed a session's expiry: a session that became durable
    /// is written whole; one that stopped being durable leaves the journal (while it lives on
    /// until its connection ends, nothing of it is kept).
    pub(crate) fn journal_durability(&mut self, sid: SessionId, out: &mut Outbox) {
        let Some(j) = self.journal.as_mut() else {
            return;
        };
        let Some(s) = self.sessions.get_mut(&sid) else {
            return;
        };
        let durable = s.expiry_interval > 0;
        match (s.journaled, durable) {
            (false, true) => {
                s.journaled = true;
                super::checkpoint::session_records(s, |r| j.write(r, out));
            }
            (true, false) => {
                s.journaled = false;
                j.write(&Record::SessionEnd(sid), out);
            }
            _ => {}
        }
    }
}
