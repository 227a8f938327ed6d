//! What the router keeps of each connection past an accepted CONNECT: where it came from and
//! its protocol version, for the REST client views (address, listener, protocol) and the
//! connection metrics by listener and protocol version. (The client id for log lines is in
//! the connection's `Outbound`, where its task reads it too.) 48 bytes a map entry.
//!
//! Owned by the router: entries come with [`crate::router::ToRouter::Connect`] and go when
//! the router hands the connection its `Close` (a DISCONNECT, a takeover, a kick, a keep-alive
//! timeout, a broken rule: its task sends no `Closed` then), or with `Closed` (a socket that
//! failed or stalled).

use std::collections::HashMap;
use std::net::SocketAddr;

use ferrymq_core::ConnId;
use ferrymq_mqtt::ProtocolVersion;

use crate::config::ListenerKind;
use crate::metrics::{ConnectionsByListener, PROTOCOLS};

/// Where a connection came from, as its task knows it (sent with its CONNECT).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Origin {
    pub addr: SocketAddr,
    pub listener: ListenerKind,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct ClientPeer {
    pub origin: Origin,
    pub version: ProtocolVersion,
}

#[derive(Debug, Default)]
pub(crate) struct Peers {
    map: HashMap<ConnId, ClientPeer>,
    counts: ConnectionsByListener,
}

fn slot(p: &ClientPeer) -> (usize, usize) {
    let version = PROTOCOLS.iter().position(|v| *v == p.version).unwrap_or(0);
    (p.origin.listener as usize, version)
}

impl Peers {
    pub(crate) fn insert(&mut self, conn: ConnId, peer: ClientPeer) {
        let (l, v) = slot(&peer);
        self.counts[l][v] += 1;
        if let Some(old) = self.map.insert(conn, peer) {
            let (l, v) = slot(&old);
            self.counts[l][v] -= 1;
        }
    }

    pub(crate) fn remove(&mut self, conn: ConnId) {
        if let Some(old) = self.map.remove(&conn) {
            let (l, v) = slot(&old);
            self.counts[l][v] -= 1;
        }
    }

    pub(crate) fn get(&self, conn: ConnId) -> Option<&ClientPeer> {
        self.map.get(&conn)
    }

    pub(crate) fn counts(&self) -> ConnectionsByListener {
        self.counts
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn peer(listener: ListenerKind, version: ProtocolVersion) -> ClientPeer {
        ClientPeer {
            origin: Origin {
                addr: "127.0.0.1:5000".parse().unwrap(),
                listener,
            },
            version,
        }
    }

    #[test]
    fn counts_follow_inserts_replacements_and_removals() {
        let mut p = Peers::default();
        p.insert(ConnId(1), peer(ListenerKind::Mqtt, ProtocolVersion::V5));
        p.insert(ConnId(2), peer(ListenerKind::Ws, ProtocolVersion::V311));
        p.insert(ConnId(2), peer(ListenerKind::Wss, ProtocolVersion::V311));
        assert_eq!(p.counts()[ListenerKind::Mqtt as usize], [0, 1]);
        assert_eq!(p.counts()[ListenerKind::Ws as usize], [0, 0]);
        assert_eq!(p.counts()[ListenerKind::Wss as usize], [1, 0]);
        p.remove(ConnId(1));
        p.remove(ConnId(1));
        assert_eq!(p.counts()[ListenerKind::Mqtt as usize], [0, 0]);
        assert!(p.get(ConnId(2)).is_some() && p.get(ConnId(1)).is_none());
    }
}
