//! Read-only views of the engine's state for the admin API (clients, subscriptions, filters,
//! retained messages), and the two admin actions on them (disconnect a client, delete a
//! retained message).
//!
//! Every listing is a page after a cursor and costs at most its page (plus, for searches, a
//! bounded scan): the router answers it between packets, so a page of a million clients must
//! not cost a walk of the million. Clients are kept ordered by client id
//! (`Broker::by_client_id` is a `BTreeMap`), retained messages in a trie with ordered
//! levels, subscription filters in an ordered count (`SubscriptionTree::filters`); each page
//! resumes with a range from its cursor.

use std::ops::Bound;
use std::sync::Arc;

use ferrymq_mqtt::{Disconnect, Packet, ProtocolVersion, QoS, ReasonCode};

use crate::broker::{Action, Outbox, WillOnClose};
use crate::journal::record::Record;
use crate::{Broker, Message, Time};

/// A search visits at most this many clients per page before it answers (with a cursor to go
/// on), whatever it finds.
pub const SEARCH_SCAN: usize = 10_000;

/// One page of a listing: `next` is the cursor for the next page (`None` at the end).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next: Option<String>,
}

/// A session, connected or not.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientView {
    pub client_id: Arc<str>,
    pub connected: bool,
    /// The connection it is attached to (the driver knows its address and listener).
    pub conn: Option<crate::ConnId>,
    pub version: ProtocolVersion,
    /// Seconds the session outlives its connection (`u32::MAX` = forever).
    pub session_expiry: u32,
    pub disconnected_at: Option<Time>,
    pub subscriptions: usize,
    /// Outbound QoS 1/2 messages in flight (sent, not yet acknowledged).
    pub inflight: usize,
    /// Messages queued for it, not yet sent.
    pub queued: usize,
    /// Inbound QoS 2 messages received and not yet released.
    pub inbound_qos2: usize,
    pub will_pending: bool,
    /// Work queues it consumes.
    pub consumes: Vec<Arc<str>>,
}

/// One subscription of one client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionView {
    pub client_id: Arc<str>,
    /// As the client sent it (`$share/g/a/b`, `$queue/jobs`).
    pub filter: String,
    pub qos: QoS,
    pub no_local: bool,
    pub retain_as_published: bool,
    pub retain_handling: u8,
    pub identifier: Option<u32>,
    pub group: Option<String>,
    pub queue: Option<Arc<str>>,
}

/// A subscribed filter and how many subscriptions (plain and shared members) it has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilterView {
    pub filter: String,
    pub subscriptions: u32,
}

impl Broker {
    /// Clients in client-id order after `after`. With `search`, only those whose client id
    /// contains it (case-sensitive), visiting at most [`SEARCH_SCAN`] clients: a page may
    /// then be short, or empty, with a cursor to go on.
    pub fn clients(
        &self,
        after: Option<&str>,
        limit: usize,
        search: Option<&str>,
    ) -> Page<ClientView> {
        let mut items = Vec::new();
        let mut last: Option<&Arc<str>> = None;
        let mut more = false;
        for (visited, (id, sid)) in self.clients_after(after).enumerate() {
            if items.len() == limit || (search.is_some() && visited == SEARCH_SCAN) {
                more = true;
                break;
            }
            last = Some(id);
            if search.is_some_and(|s| !id.contains(s)) {
                continue;
            }
            if let Some(v) = self.client_view(*sid) {
                items.push(v);
            }
        }
        Page {
            items,
            next: if more {
                last.map(|l| l.to_string())
            } else {
                None
            },
        }
    }

    /// One client's session, if there is one.
    pub fn client(&self, client_id: &str) -> Option<ClientView> {
        self.client_view(*self.by_client_id.get(client_id)?)
    }

    /// Subscriptions of one client, or of every client in client-id order, each client's in
    /// filter order. The cursor is `{client id}\n{filter}` (go on after that subscription) or
    /// `{client id}` (go on after that client); a newline is in neither. Listing every client
    /// visits at most [`SEARCH_SCAN`] clients per page (many may have no subscription).
    pub fn subscriptions(
        &self,
        client_id: Option<&str>,
        after: Option<&str>,
        limit: usize,
    ) -> Page<SubscriptionView> {
        let (after_client, after_filter) = match after.map(|a| a.split_once('\n').ok_or(a)) {
            Some(Ok((c, f))) => (Some(c), Some(f)),
            Some(Err(c)) => (Some(c), None),
            None => (None, None),
        };
        let from = match (after_client, after_filter) {
            (Some(c), Some(_)) => Bound::Included(c),
            (Some(c), None) => Bound::Excluded(c),
            _ => Bound::Unbounded,
        };
        let clients: Box<dyn Iterator<Item = (&Arc<str>, &crate::SessionId)>> = match client_id {
            Some(id) => Box::new(self.by_client_id.get_key_value(id).into_iter()),
            None => Box::new(self.by_client_id.range::<str, _>((from, Bound::Unbounded))),
        };
        let mut items: Vec<SubscriptionView> = Vec::new();
        let mut visited = 0;
        for (id, sid) in clients {
            visited += 1;
            let Some(s) = self.sessions.get(sid) else {
                continue;
            };
            let mut subs: Vec<(&String, _)> = s.subscriptions.iter().collect();
            subs.sort_unstable_by(|a, b| a.0.cmp(b.0));
            let skip_to = (Some(&**id) == after_client)
                .then_some(after_filter)
                .flatten();
            for (raw, sub) in subs {
                if skip_to.is_some_and(|f| raw.as_str() <= f) {
                    continue;
                }
                if items.len() >= limit {
                    let next = items
                        .last()
                        .map(|l| format!("{}\n{}", l.client_id, l.filter));
                    return Page { items, next };
                }
                items.push(SubscriptionView {
                    client_id: id.clone(),
                    filter: raw.clone(),
                    qos: sub.options.qos,
                    no_local: sub.options.no_local,
                    retain_as_published: sub.options.retain_as_published,
                    retain_handling: sub.options.retain_handling as u8,
                    identifier: sub.identifier,
                    group: sub.group.clone(),
                    queue: sub.queue.clone(),
                });
            }
            if client_id.is_none() && visited >= SEARCH_SCAN {
                // Many clients without subscriptions: answer, and go on after this one.
                return Page {
                    items,
                    next: Some(id.to_string()),
                };
            }
        }
        Page { items, next: None }
    }

    /// Subscribed filters (plain and shared, without `$share/{group}/`), in order after
    /// `after`, each with its number of subscriptions.
    pub fn filters(&self, after: Option<&str>, limit: usize) -> Page<FilterView> {
        let (items, next) = self.subs.filters_after(after, limit);
        Page {
            items: items
                .into_iter()
                .map(|(filter, subscriptions)| FilterView {
                    filter,
                    subscriptions,
                })
                .collect(),
            next,
        }
    }

    /// Retained messages in topic order (level by level) after the topic `after`.
    pub fn retained_page(&self, after: Option<&str>, limit: usize) -> Page<Arc<Message>> {
        let items = self.retained.page_after(after, limit);
        let next = (items.len() == limit)
            .then(|| items.last().map(|m| m.topic.to_string()))
            .flatten();
        Page { items, next }
    }

    /// The retained message of `topic`, if there is one.
    pub fn retained_message(&self, topic: &str) -> Option<Arc<Message>> {
        self.retained.get(topic)
    }

    /// Deletes the retained message of `topic` (journaled, as an empty retained publish
    /// would). False when there was none.
    pub fn delete_retained(&mut self, topic: &str, now: Time, out: &mut Outbox) -> bool {
        if self.retained.get(topic).is_none() {
            return false;
        }
        let mut m = Message::new(topic, bytes::Bytes::new(), now);
        m.retain = true;
        m.id = self.next_message_id;
        self.next_message_id += 1;
        self.commit(Record::Retain(Arc::new(m)), out);
        true
    }

    /// Disconnects the client's connection (5.0: DISCONNECT 0x98 administrative action); its
    /// will is published as for any disconnect it did not ask for. False when not connected.
    pub fn disconnect_client(&mut self, client_id: &str, now: Time, out: &mut Outbox) -> bool {
        let Some(conn) = self
            .by_client_id
            .get(client_id)
            .and_then(|sid| self.sessions.get(sid))
            .and_then(|s| s.conn)
        else {
            return false;
        };
        if self
            .conns
            .get(&conn)
            .is_some_and(|c| c.version == ProtocolVersion::V5)
        {
            let d = Disconnect::new(ReasonCode::AdministrativeAction);
            out.push(conn, Action::Send(Packet::Disconnect(d)));
        }
        out.push(conn, Action::Close);
        let why = crate::broker::Ended::ByServer(Some(ReasonCode::AdministrativeAction));
        self.note_end(conn, why, out);
        self.detach(conn, WillOnClose::Publish, None, now, out);
        true
    }

    fn clients_after(
        &self,
        after: Option<&str>,
    ) -> Box<dyn Iterator<Item = (&Arc<str>, &crate::SessionId)> + '_> {
        Box::new(self.by_client_id.range::<str, _>((
            after.map_or(Bound::Unbounded, Bound::Excluded),
            Bound::Unbounded,
        )))
    }

    fn client_view(&self, sid: crate::SessionId) -> Option<ClientView> {
        let s = self.sessions.get(&sid)?;
        Some(ClientView {
            client_id: s.client_id.clone(),
            connected: s.is_connected(),
            conn: s.conn,
            version: s.version,
            session_expiry: s.expiry_interval,
            disconnected_at: s.disconnected_at,
            subscriptions: s.subscriptions.len(),
            inflight: s.inflight.len(),
            queued: s.pending.len(),
            inbound_qos2: s.inbound_qos2.len(),
            will_pending: s.pending_will.is_some(),
            consumes: s.consumes.clone(),
        })
    }
}
