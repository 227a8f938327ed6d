//! MQTT over WebSocket (`listeners.ws`, `listeners.wss`): a Rust WebSocket client
//! (tokio-tungstenite, with the broker's own byte-stream adapter) speaking raw MQTT, the
//! path and subprotocol checks, and WebSocket over TLS.

use ferrymq_mqtt::ProtocolVersion;
use ferrymq_server::{ListenerKind, Server};
use tokio::net::TcpStream;

use crate::common::{self, metric, test_config};
use crate::edge::{self, Ca, Role, Wire};

async fn ws_server() -> Server {
    let mut c = test_config();
    c.listeners.ws = Some("127.0.0.1:0".parse().unwrap());
    common::start_with(c).await
}

fn url(server: &Server, transport: ListenerKind, path: &str) -> String {
    let a = server.listener_addr(transport).expect("listener is on");
    let scheme = if transport.tls() { "wss" } else { "ws" };
    format!("{scheme}://127.0.0.1:{}{path}", a.port())
}

async fn tcp(server: &Server, transport: ListenerKind) -> TcpStream {
    TcpStream::connect(server.listener_addr(transport).unwrap())
        .await
        .unwrap()
}

#[tokio::test]
async fn a_websocket_client_subscribes_and_publishes() {
    let server = ws_server().await;
    let u = url(&server, ListenerKind::Ws, "/mqtt");
    let (ws, chosen) = edge::ws_connect(tcp(&server, ListenerKind::Ws).await, &u, Some("mqtt"))
        .await
        .unwrap();
    assert_eq!(chosen.as_deref(), Some("mqtt"), "subprotocol negotiated");
    let mut sub = Wire::connected(ws, "ws-sub", ProtocolVersion::V5).await;
    sub.subscribe(1, "ws/#").await;
    // A 3.1.1 client offering the old subprotocol name first gets that name back.
    let (ws, chosen) = edge::ws_connect(
        tcp(&server, ListenerKind::Ws).await,
        &u,
        Some("mqttv3.1, mqtt"),
    )
    .await
    .unwrap();
    assert_eq!(chosen.as_deref(), Some("mqttv3.1"));
    let mut publisher = Wire::connected(ws, "ws-pub", ProtocolVersion::V311).await;
    // Larger than one WebSocket read and than the 64 KiB the broker puts in one message.
    let big = vec![b'x'; 200 * 1024];
    publisher.publish(1, "ws/big", &big).await;
    publisher.publish(2, "ws/📨", "emoji ✓".as_bytes()).await;
    assert_eq!(sub.next_publish().await, ("ws/big".into(), big));
    assert_eq!(
        sub.next_publish().await,
        ("ws/📨".into(), "emoji ✓".as_bytes().to_vec())
    );
    // A plain TCP client reaches WebSocket subscribers and the other way round.
    let mut plain = common::v4(common::v4_options(&server, "tcp")).await;
    plain.subscribe("ws/#", rumqttc::QoS::AtMostOnce).await;
    publisher.publish(3, "ws/tcp", b"to tcp").await;
    assert_eq!(common::next(&mut plain.rx).await.topic, "ws/tcp");
    assert_eq!(sub.next_publish().await.0, "ws/tcp");
    assert_eq!(
        metric(
            &server,
            "ferrymq_listener_connections_open{listener=\"ws\"}"
        )
        .await,
        2
    );
}

#[tokio::test]
async fn a_wrong_path_or_subprotocol_is_refused() {
    let server = ws_server().await;
    let wrong = url(&server, ListenerKind::Ws, "/not-mqtt");
    let err = edge::ws_connect(tcp(&server, ListenerKind::Ws).await, &wrong, Some("mqtt"))
        .await
        .err()
        .expect("refused");
    assert!(err.to_string().contains("404"), "{err}");
    let u = url(&server, ListenerKind::Ws, "/mqtt");
    let err = edge::ws_connect(tcp(&server, ListenerKind::Ws).await, &u, Some("chat"))
        .await
        .err()
        .expect("refused");
    assert!(err.to_string().contains("400"), "{err}");
    // A client that offers no subprotocol at all is served without one.
    let (ws, chosen) = edge::ws_connect(tcp(&server, ListenerKind::Ws).await, &u, None)
        .await
        .unwrap();
    assert_eq!(chosen, None);
    Wire::connected(ws, "no-subprotocol", ProtocolVersion::V5).await;
    assert!(
        metric(
            &server,
            "ferrymq_listener_handshake_failures_total{listener=\"ws\"}"
        )
        .await
            >= 2
    );
}

#[tokio::test]
async fn websocket_over_tls_round_trip_with_a_custom_path() {
    let ca = Ca::new("ferrymq test CA");
    let dir = edge::cert_dir("wss");
    let mut c = crate::tls::tls_config(&dir, &ca.issue(Role::Server, 1), None, false);
    c.listeners.wss = Some("127.0.0.1:0".parse().unwrap());
    c.listeners.ws_path = "/brokers/mqtt".into();
    let server = common::start_with(c).await;
    let u = url(&server, ListenerKind::Wss, "/brokers/mqtt");
    let client = edge::client_config(&ca.pem, None);
    let addr = server.listener_addr(ListenerKind::Wss).unwrap();
    let tls = edge::tls_connect(addr, client.clone()).await.unwrap();
    let (ws, chosen) = edge::ws_connect(tls, &u, Some("mqtt")).await.unwrap();
    assert_eq!(chosen.as_deref(), Some("mqtt"));
    let mut sub = Wire::connected(ws, "wss-sub", ProtocolVersion::V5).await;
    sub.subscribe(1, "wss/#").await;
    // Published over plain TLS, received over WebSocket over TLS.
    let tls = edge::tls_connect(server.listener_addr(ListenerKind::Mqtts).unwrap(), client)
        .await
        .unwrap();
    let mut publisher = Wire::connected(tls, "tls-pub", ProtocolVersion::V311).await;
    publisher.publish(7, "wss/a", b"through two layers").await;
    assert_eq!(
        sub.next_publish().await,
        ("wss/a".into(), b"through two layers".to_vec())
    );
}

/// Review finding (suspicion, design): with `allow_anonymous` unset, a broker whose listeners
/// are all on loopback lets anonymous clients in, on the premise that only local processes
/// reach it. The `ws` listener (on by default, next to `mqtt`) breaks that premise: every web
/// page open in a browser on the host can open `ws://127.0.0.1:8083/mqtt` (WebSocket is not
/// subject to CORS) and publish/subscribe anonymously. Nothing looks at `Origin`.
#[tokio::test]
async fn a_foreign_web_origin_does_not_get_anonymous_mqtt_over_loopback_websocket() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let server = ws_server().await;
    let mut s = tcp(&server, ListenerKind::Ws).await;
    let req = "GET /mqtt HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n\
               Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
               Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mqtt\r\n\
               Origin: https://evil.example\r\n\r\n";
    s.write_all(req.as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if s.read_exact(&mut byte).await.is_err() {
            break;
        }
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head);
    if !head.starts_with("HTTP/1.1 101") {
        return; // refused: what we want
    }
    // A 3.1.1 CONNECT, client id "evil", in one masked (key 0) binary frame.
    let connect = [
        0x10, 16, 0, 4, b'M', b'Q', b'T', b'T', 4, 2, 0, 60, 0, 4, b'e', b'v', b'i', b'l',
    ];
    let mut frame = vec![0x82, 0x80 | connect.len() as u8, 0, 0, 0, 0];
    frame.extend_from_slice(&connect);
    s.write_all(&frame).await.unwrap();
    let mut ack = [0u8; 6];
    s.read_exact(&mut ack).await.unwrap();
    assert_ne!(
        &ack[2..6],
        &[0x20, 2, 0, 0],
        "a page from https://evil.example got an anonymous MQTT session (upgrade: {head:?})"
    );
}
