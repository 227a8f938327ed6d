//! Shared helpers: start a server, drive rumqttc clients, speak raw MQTT.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use ferrymq_mqtt::{decode, encode, Limits, Packet, ProtocolVersion};
use ferrymq_server::{Config, Server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

pub const WAIT: Duration = Duration::from_secs(10);

/// A fresh, empty data directory for one server, under cargo's scratch space.
pub fn fresh_data_dir() -> std::path::PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let dir = std::path::Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("ferrymq-it-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// Loopback, ephemeral ports, no `$SYS`, and persistence on (the default) in a fresh data
/// directory, so every integration test also runs through the durable path.
pub fn test_config() -> Config {
    let mut c = Config::default();
    c.listeners.mqtt = "127.0.0.1:0".parse().unwrap();
    c.listeners.http = "127.0.0.1:0".parse().unwrap();
    // Off unless a test asks for it: parallel tests must not race for the default port.
    c.listeners.ws = Some(Default::default());
    c.sys.interval_secs = 0;
    c.data_dir = fresh_data_dir();
    c
}

pub async fn start() -> Server {
    start_with(test_config()).await
}

pub async fn start_with(c: Config) -> Server {
    Server::start(c).await.expect("server starts")
}

/// A received publish, whichever rumqttc version produced it.
#[derive(Debug, Clone, PartialEq)]
pub struct Got {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
    pub retain: bool,
    pub user_properties: Vec<(String, String)>,
}

/// A rumqttc 3.1.1 client whose event loop runs in a task; publishes arrive on `rx`.
pub struct V4 {
    pub client: rumqttc::AsyncClient,
    pub rx: mpsc::UnboundedReceiver<Got>,
    /// Return codes of each SUBACK, in arrival order.
    subacks: mpsc::UnboundedReceiver<Vec<rumqttc::SubscribeReasonCode>>,
    /// One entry per PUBACK or PUBCOMP: a QoS 1/2 publish completed.
    acks: mpsc::UnboundedReceiver<u16>,
}

impl V4 {
    /// Subscribes and waits for the SUBACK, so the subscription is active when this returns.
    pub async fn subscribe(&mut self, filter: &str, qos: rumqttc::QoS) {
        self.client.subscribe(filter, qos).await.unwrap();
        let codes = recv_in_time(&mut self.subacks, "SUBACK").await;
        assert!(
            codes
                .iter()
                .all(|c| matches!(c, rumqttc::SubscribeReasonCode::Success(_))),
            "subscription to {filter} refused: {codes:?}"
        );
    }

    /// Waits until `n` more QoS 1/2 publishes of this client were acknowledged.
    pub async fn acked(&mut self, n: usize) {
        for _ in 0..n {
            recv_in_time(&mut self.acks, "PUBACK/PUBCOMP").await;
        }
    }

    /// Asserts no PUBACK/PUBCOMP arrives within `d`.
    #[allow(dead_code)]
    pub async fn no_ack_within(&mut self, d: Duration) {
        if let Ok(Some(pkid)) = tokio::time::timeout(d, self.acks.recv()).await {
            panic!("unexpected acknowledgement of packet {pkid}");
        }
    }
}

pub fn v4_options(server: &Server, id: &str) -> rumqttc::MqttOptions {
    let a = server.mqtt_addr();
    let mut o = rumqttc::MqttOptions::new(id, a.ip().to_string(), a.port());
    o.set_keep_alive(Duration::from_secs(30));
    o
}

pub async fn v4(opts: rumqttc::MqttOptions) -> V4 {
    let (client, mut ev) = rumqttc::AsyncClient::new(opts, 1000);
    let (tx, rx) = mpsc::unbounded_channel();
    let (ctx, mut connected) = mpsc::unbounded_channel();
    let (stx, subacks) = mpsc::unbounded_channel();
    let (atx, acks) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match ev.poll().await {
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(s))) => {
                    let _ = stx.send(s.return_codes);
                }
                Ok(rumqttc::Event::Incoming(
                    rumqttc::Packet::PubAck(rumqttc::PubAck { pkid })
                    | rumqttc::Packet::PubComp(rumqttc::PubComp { pkid }),
                )) => {
                    let _ = atx.send(pkid);
                }
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                    let _ = tx.send(Got {
                        topic: p.topic.clone(),
                        payload: p.payload,
                        qos: p.qos as u8,
                        retain: p.retain,
                        user_properties: vec![],
                    });
                }
                Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(a))) => {
                    let _ = ctx.send(a.code == rumqttc::ConnectReturnCode::Success);
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    });
    let ok = tokio::time::timeout(WAIT, connected.recv())
        .await
        .expect("CONNACK in time");
    assert_eq!(ok, Some(true), "connection accepted");
    V4 {
        client,
        rx,
        subacks,
        acks,
    }
}

/// A rumqttc 5.0 client; publishes and disconnect reasons arrive on channels.
pub struct V5 {
    pub client: rumqttc::v5::AsyncClient,
    pub rx: mpsc::UnboundedReceiver<Got>,
    /// DISCONNECT reason codes sent by the server.
    #[allow(dead_code)]
    pub disconnects: mpsc::UnboundedReceiver<u8>,
    subacks: mpsc::UnboundedReceiver<Vec<rumqttc::v5::mqttbytes::v5::SubscribeReasonCode>>,
}

impl V5 {
    /// Subscribes and waits for the SUBACK, so the subscription is active when this returns.
    pub async fn subscribe(&mut self, filter: &str, qos: rumqttc::v5::mqttbytes::QoS) {
        use rumqttc::v5::mqttbytes::v5::SubscribeReasonCode;
        self.client.subscribe(filter, qos).await.unwrap();
        let codes = recv_in_time(&mut self.subacks, "SUBACK").await;
        assert!(
            codes
                .iter()
                .all(|c| matches!(c, SubscribeReasonCode::Success(_))),
            "subscription to {filter} refused: {codes:?}"
        );
    }
}

/// The next item of an event channel, or a failure naming `what` after [`WAIT`].
async fn recv_in_time<T>(rx: &mut mpsc::UnboundedReceiver<T>, what: &str) -> T {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .unwrap_or_else(|_| panic!("{what} in time"))
        .unwrap_or_else(|| panic!("client alive while waiting for {what}"))
}

pub fn v5_options(server: &Server, id: &str) -> rumqttc::v5::MqttOptions {
    let a = server.mqtt_addr();
    let mut o = rumqttc::v5::MqttOptions::new(id, a.ip().to_string(), a.port());
    o.set_keep_alive(Duration::from_secs(30));
    o
}

pub async fn v5(opts: rumqttc::v5::MqttOptions) -> V5 {
    use rumqttc::v5::mqttbytes::v5::Packet as P;
    use rumqttc::v5::Event;
    let (client, mut ev) = rumqttc::v5::AsyncClient::new(opts, 1000);
    let (tx, rx) = mpsc::unbounded_channel();
    let (dtx, disconnects) = mpsc::unbounded_channel();
    let (ctx, mut connected) = mpsc::unbounded_channel();
    let (stx, subacks) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        loop {
            match ev.poll().await {
                Ok(Event::Incoming(P::SubAck(s))) => {
                    let _ = stx.send(s.return_codes);
                }
                Ok(Event::Incoming(P::Publish(p))) => {
                    let user_properties = p
                        .properties
                        .as_ref()
                        .map(|pr| pr.user_properties.clone())
                        .unwrap_or_default();
                    let _ = tx.send(Got {
                        topic: String::from_utf8(p.topic.to_vec()).unwrap(),
                        payload: p.payload,
                        qos: p.qos as u8,
                        retain: p.retain,
                        user_properties,
                    });
                }
                Ok(Event::Incoming(P::ConnAck(a))) => {
                    let _ = ctx.send(a.code as u8);
                }
                Ok(Event::Incoming(P::Disconnect(d))) => {
                    let _ = dtx.send(d.reason_code as u8);
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    });
    let code = tokio::time::timeout(WAIT, connected.recv())
        .await
        .expect("CONNACK in time");
    assert_eq!(code, Some(0), "connection accepted");
    V5 {
        client,
        rx,
        disconnects,
        subacks,
    }
}

/// Receives the next publish or fails after [`WAIT`].
pub async fn next(rx: &mut mpsc::UnboundedReceiver<Got>) -> Got {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("message in time")
        .expect("client alive")
}

/// Asserts nothing arrives within `d`.
pub async fn nothing(rx: &mut mpsc::UnboundedReceiver<Got>, d: Duration) {
    if let Ok(Some(g)) = tokio::time::timeout(d, rx.recv()).await {
        panic!("unexpected message {g:?}");
    }
}

/// A test config with `mqtt.queue_full = policy` and `max_queued_messages = limit`.
#[allow(dead_code)]
pub fn queue_full_config(
    policy: ferrymq_server::config::QueueFull,
    limit: usize,
) -> ferrymq_server::Config {
    let mut config = test_config();
    config.mqtt.max_queued_messages = limit;
    config.mqtt.queue_full = policy;
    config
}

/// A durable 3.1.1 subscriber to `q/#` at QoS 1, subscribed and then gone: its queue fills.
/// Returns its options, to come back with.
#[allow(dead_code)]
pub async fn offline_subscriber(server: &Server, id: &str) -> rumqttc::MqttOptions {
    let mut o = v4_options(server, id);
    o.set_clean_session(false);
    let mut sub = v4(o.clone()).await;
    sub.subscribe("q/#", rumqttc::QoS::AtLeastOnce).await;
    sub.client.disconnect().await.unwrap();
    eventually("the subscriber is offline", || async {
        metric(server, "ferrymq_connections ").await == 0
    })
    .await;
    o
}

/// A PUBLISH without properties, for raw connections.
#[allow(dead_code)]
pub fn publish_packet(
    topic: &str,
    qos: ferrymq_mqtt::QoS,
    packet_id: Option<u16>,
    payload: Bytes,
) -> Packet {
    Packet::Publish(ferrymq_mqtt::Publish {
        dup: false,
        qos,
        retain: false,
        topic: topic.into(),
        packet_id,
        properties: Default::default(),
        payload,
    })
}

/// A raw MQTT connection for hostile or precise input.
pub struct Raw {
    pub stream: TcpStream,
    pub version: ProtocolVersion,
    buf: BytesMut,
}

impl Raw {
    pub async fn connect(server: &Server, version: ProtocolVersion) -> Raw {
        let stream = TcpStream::connect(server.mqtt_addr()).await.unwrap();
        Raw {
            stream,
            version,
            buf: BytesMut::new(),
        }
    }

    pub fn from_stream(stream: TcpStream, version: ProtocolVersion) -> Raw {
        Raw {
            stream,
            version,
            buf: BytesMut::new(),
        }
    }

    pub async fn send(&mut self, p: &Packet) {
        let mut out = BytesMut::new();
        encode(p, self.version, &mut out).unwrap();
        self.stream.write_all(&out).await.unwrap();
    }

    pub async fn send_bytes(&mut self, b: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(b).await
    }

    /// The next packet, or `None` when the server closed the connection.
    pub async fn recv(&mut self) -> Option<Packet> {
        tokio::time::timeout(WAIT, async {
            loop {
                if let Some(p) = decode(&mut self.buf, self.version, &Limits::default()).unwrap() {
                    return Some(p);
                }
                match self.stream.read_buf(&mut self.buf).await {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                }
            }
        })
        .await
        .expect("server answers or closes in time")
    }

    /// Connects and sends CONNECT with a clean start; fails unless CONNACK says Success.
    #[allow(dead_code)]
    pub async fn connected(server: &Server, id: &str, version: ProtocolVersion) -> Raw {
        let mut raw = Raw::connect(server, version).await;
        raw.send(&connect_packet(id, version)).await;
        match raw.recv().await {
            Some(Packet::ConnAck(a)) if a.reason == ferrymq_mqtt::ReasonCode::Success => raw,
            other => panic!("{id}: expected CONNACK Success, got {other:?}"),
        }
    }

    /// Subscribes to each filter at its QoS and returns the SUBACK's reason codes.
    #[allow(dead_code)]
    pub async fn subscribe(
        &mut self,
        packet_id: u16,
        filters: &[(&str, ferrymq_mqtt::QoS)],
    ) -> Vec<u8> {
        let filters = filters
            .iter()
            .map(|&(f, qos)| {
                let options = ferrymq_mqtt::SubscriptionOptions {
                    qos,
                    ..Default::default()
                };
                (f.to_string(), options)
            })
            .collect();
        self.send(&Packet::Subscribe(ferrymq_mqtt::Subscribe {
            packet_id,
            filters,
            properties: Default::default(),
        }))
        .await;
        match self.recv().await {
            Some(Packet::SubAck(a)) if a.packet_id == packet_id => {
                a.reasons.iter().map(|r| r.as_u8()).collect()
            }
            other => panic!("expected SUBACK {packet_id}, got {other:?}"),
        }
    }

    /// Asserts the server sends nothing (and does not close) within `d`.
    #[allow(dead_code)]
    pub async fn quiet(&mut self, d: Duration) {
        if let Ok(p) = tokio::time::timeout(d, self.recv()).await {
            panic!("expected silence, got {p:?}");
        }
    }

    /// Reads until the server closes; returns the packets seen.
    pub async fn until_closed(&mut self) -> Vec<Packet> {
        let mut seen = Vec::new();
        while let Some(p) = self.recv().await {
            seen.push(p);
        }
        seen
    }
}

pub fn connect_packet(id: &str, version: ProtocolVersion) -> Packet {
    Packet::Connect(Box::new(ferrymq_mqtt::Connect {
        version,
        client_id: id.into(),
        clean_start: true,
        keep_alive: 30,
        username: None,
        password: None,
        will: None,
        properties: Default::default(),
    }))
}

/// Fetches an admin HTTP path with a minimal HTTP/1.1 request.
pub async fn http_get(server: &Server, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(server.http_addr()).await.unwrap();
    let req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.unwrap();
    let mut body = String::new();
    s.read_to_string(&mut body).await.unwrap();
    let status = body
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = body
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    (status, body)
}

/// Reads one metric's value from `/metrics` (first sample whose line starts with `name`).
pub async fn metric(server: &Server, name: &str) -> u64 {
    let (_, body) = http_get(server, "/metrics").await;
    body.lines()
        .find(|l| l.starts_with(name) && !l.starts_with('#'))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("metric {name} missing in:\n{body}"))
}

/// Polls `f` until it returns true or [`WAIT`] passes.
pub async fn eventually<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while tokio::time::Instant::now() < deadline {
        if f().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out waiting for: {what}");
}

/// One HTTP/1.1 request to the admin API; the status and the JSON body (Null if empty, a
/// string if not JSON: /metrics).
pub async fn api(
    server: &Server,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> (u16, serde_json::Value) {
    api_with_token(server, None, method, path, body).await
}

/// [`api`] with `Authorization: Bearer <token>` when a token is given (`[admin] token`).
pub async fn api_with_token(
    server: &Server,
    token: Option<&str>,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> (u16, serde_json::Value) {
    let mut s = TcpStream::connect(server.http_addr()).await.unwrap();
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n{auth}\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut response = String::new();
    tokio::time::timeout(WAIT, s.read_to_string(&mut response))
        .await
        .expect("the admin API answers in time")
        .unwrap();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let text = response.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    let json = if text.is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_str(text).unwrap_or_else(|_| serde_json::Value::String(text.into()))
    };
    (status, json)
}

/// A server whose reloads read the configuration from the returned cell (set it, then
/// reload through the admin API or the server).
#[allow(dead_code)]
pub async fn start_reloadable(
    config: Config,
) -> (Server, std::sync::Arc<std::sync::Mutex<Config>>) {
    let next = std::sync::Arc::new(std::sync::Mutex::new(config.clone()));
    let source = next.clone();
    let reloading = ferrymq_server::Reloading {
        load: Some(std::sync::Arc::new(move || {
            Ok(source.lock().unwrap().clone())
        })),
        ..Default::default()
    };
    let server = Server::start_with(config, reloading).await.unwrap();
    (server, next)
}
