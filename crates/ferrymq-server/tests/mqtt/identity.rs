//! Who a client is: a user name without authentication proves nothing, and an assigned
//! client id is never handed out twice, not even after a restart on the same data.

use ferrymq_mqtt::{Packet, PropertyValues, ProtocolVersion, ReasonCode};

use crate::common::*;

fn connect_as(id: &str, user: Option<&str>, v: ProtocolVersion) -> Packet {
    let Packet::Connect(mut c) = connect_packet(id, v) else {
        unreachable!()
    };
    c.username = user.map(Into::into);
    c.password = user.map(|_| bytes::Bytes::from_static(b"anything at all"));
    Packet::Connect(c)
}

#[tokio::test]
async fn a_user_name_gets_no_more_than_an_anonymous_client() {
    let mut c = test_config();
    c.mqtt.allow_anonymous = Some(false);
    let server = start_with(c).await;
    for (user, v) in [
        (None, ProtocolVersion::V5),
        (Some("admin"), ProtocolVersion::V5),
        (Some("admin"), ProtocolVersion::V311),
    ] {
        let mut raw = Raw::connect(&server, v).await;
        raw.send(&connect_as("who", user, v)).await;
        let Some(Packet::ConnAck(ack)) = raw.recv().await else {
            panic!("no CONNACK for user {user:?} ({v:?})");
        };
        // 5.0: 0x87 Not authorized; 3.1.1 return code 5 (the codec maps it to the same reason).
        assert_eq!(
            ack.reason,
            ReasonCode::NotAuthorized,
            "user {user:?} ({v:?})"
        );
        assert!(
            raw.recv().await.is_none(),
            "connection closed after refusal"
        );
    }
    server.shutdown().await;
}

async fn assigned_id(server: &ferrymq_server::Server) -> (String, bool) {
    let mut raw = Raw::connect(server, ProtocolVersion::V5).await;
    let Packet::Connect(mut c) = connect_packet("", ProtocolVersion::V5) else {
        unreachable!()
    };
    c.clean_start = false;
    c.properties = PropertyValues {
        session_expiry_interval: Some(3600),
        ..Default::default()
    }
    .into();
    raw.send(&Packet::Connect(c)).await;
    let Some(Packet::ConnAck(ack)) = raw.recv().await else {
        panic!("no CONNACK");
    };
    assert_eq!(ack.reason, ReasonCode::Success);
    let id = ack
        .properties
        .assigned_client_identifier
        .clone()
        .expect("an assigned client identifier");
    (id, ack.session_present)
}

#[tokio::test]
async fn assigned_client_ids_never_repeat_across_a_restart() {
    let config = test_config();
    let server = start_with(config.clone()).await;
    let mut first = Vec::new();
    for _ in 0..5 {
        let (id, present) = assigned_id(&server).await;
        assert!(!present);
        first.push(id);
    }
    server.shutdown().await;
    // Same data directory: the five durable sessions are still there.
    let mut again = config;
    again.listeners.mqtt = "127.0.0.1:0".parse().unwrap();
    let server = start_with(again).await;
    assert_eq!(server.recovered().map(|r| r.report.sessions), Some(5));
    for _ in 0..5 {
        let (id, present) = assigned_id(&server).await;
        assert!(
            !first.contains(&id),
            "{id} was handed out before the restart"
        );
        assert!(!present, "{id} resumed a stranger's session");
    }
    server.shutdown().await;
}
