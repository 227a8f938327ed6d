//! What the router keeps of each connection past an accepted CONNECT: where it came from,
//! its protocol version and its client id. For the REST client views (address, listener,
//! protocol), the connection metrics by listener and protocol version, and the router's log
//! lines that name a client (the engine may have forgotten the connection by the time its
//! close is logged).
//!
//! Owned by the router: entries come with [`crate::router::ToRouter::Connect`] and go with
//! `Closed`, so a connection the engine already ended (taken over, kicked) stays until its
//! task is gone.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

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

#[derive(Debug, Clone)]
pub(crate) struct ClientPeer {
    pub origin: Origin,
    pub version: ProtocolVersion,
    pub client_id: Arc<str>,
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

    /// The client id for a log line ("" for a connection that never got past CONNECT).
    pub(crate) fn client_id(&self, conn: ConnId) -> &str {
        self.map.get(&conn).map_or("", |p| &p.client_id)
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
            client_id: "c".into(),
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
        assert_eq!(p.client_id(ConnId(2)), "c");
        assert_eq!(p.client_id(ConnId(1)), "");
    }
}
