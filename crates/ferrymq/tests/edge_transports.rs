//! `ferrymq-client` and `ferrymq bench` over TLS and WebSocket against the real broker (its
//! `mqtts`, `ws` and `wss` listeners, certificates made here with rcgen): messages go through
//! every transport, a client that does not trust the broker's CA is refused, and the bench
//! counts every message and every connection over TLS and WebSocket.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{free_port, scratch_dir};
use ferrymq_client::{Client, ClientError, ConnectOptions, TlsOptions, WsOptions};
use ferrymq_mqtt::{Packet, Publish, QoS, ReasonCode, SubscriptionOptions};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};

const WAIT: Duration = Duration::from_secs(10);

/// A CA and a server certificate for 127.0.0.1 and localhost signed by it (PEM).
struct Certs {
    ca: String,
    cert: String,
    key: String,
}

fn certs(ca_name: &str) -> Certs {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::default();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name.push(DnType::CommonName, ca_name);
    ca.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_pem = ca.self_signed(&ca_key).unwrap().pem();
    let key = KeyPair::generate().unwrap();
    let mut server = CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    server
        .distinguished_name
        .push(DnType::CommonName, "ferrymq test server");
    let issuer = rcgen::Issuer::from_params(&ca, &ca_key);
    let cert = server.signed_by(&key, &issuer).unwrap().pem();
    Certs {
        ca: ca_pem,
        cert,
        key: key.serialize_pem(),
    }
}

/// `ferrymq serve` with mqtt, mqtts, ws and wss on loopback. Its pre-auth budget holds only
/// three WebSocket handshakes (each holds a whole frame of it), so that more at once wait.
struct Broker {
    child: Child,
    mqtt: u16,
    mqtts: u16,
    ws: u16,
    wss: u16,
    ca: std::path::PathBuf,
}

impl Broker {
    fn start(name: &str) -> Broker {
        let dir = scratch_dir(name);
        let c = certs("ferrymq edge test CA");
        let write = |file: &str, text: &str| {
            let p = dir.join(file);
            std::fs::write(&p, text).unwrap();
            p
        };
        let ca = write("ca.pem", &c.ca);
        let cert = write("server.pem", &c.cert);
        let key = write("server.key", &c.key);
        let (mqtt, mqtts, ws, wss, http) = (
            free_port(),
            free_port(),
            free_port(),
            free_port(),
            free_port(),
        );
        let config = write(
            "ferrymq.toml",
            &format!(
                "[listeners]\nmqtt = \"127.0.0.1:{mqtt}\"\nmqtts = \"127.0.0.1:{mqtts}\"\n\
                 ws = \"127.0.0.1:{ws}\"\nwss = \"127.0.0.1:{wss}\"\n\
                 http = \"127.0.0.1:{http}\"\n\
                 [tls]\ncert = {:?}\nkey = {:?}\n\
                 [limits]\npreauth_buffer_bytes = 4194304\n",
                cert.to_str().unwrap(),
                key.to_str().unwrap()
            ),
        );
        let log = std::fs::File::create(dir.join("broker.log")).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_ferrymq"))
            .args(["serve", "--in-memory", "--log-level", "warn", "--config"])
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("ferrymq starts");
        for port in [mqtt, mqtts, ws, wss] {
            let deadline = Instant::now() + Duration::from_secs(20);
            while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
                if let Some(status) = child.try_wait().unwrap() {
                    let log = std::fs::read_to_string(dir.join("broker.log")).unwrap();
                    panic!("the broker exited ({status}) before listening on {port}:\n{log}");
                }
                assert!(
                    Instant::now() < deadline,
                    "broker did not listen on {port} in 20 s"
                );
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        Broker {
            child,
            mqtt,
            mqtts,
            ws,
            wss,
            ca,
        }
    }

    fn tls(&self) -> TlsOptions {
        TlsOptions::from_pem(&std::fs::read(&self.ca).unwrap(), None, None, true).unwrap()
    }

    /// Options for each transport: (name, options).
    fn transports(&self, id: &str) -> Vec<(&'static str, ConnectOptions)> {
        let at = |port: u16| ConnectOptions::new(format!("127.0.0.1:{port}"), id);
        let mut tls = at(self.mqtts);
        tls.tls = Some(self.tls());
        let mut ws = at(self.ws);
        ws.websocket = Some(WsOptions::default());
        let mut wss = at(self.wss);
        wss.tls = Some(self.tls());
        wss.websocket = Some(WsOptions::default());
        vec![
            ("tcp", at(self.mqtt)),
            ("tls", tls),
            ("ws", ws),
            ("wss", wss),
        ]
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn connect(mut o: ConnectOptions) -> Client {
    o.timeout = WAIT;
    Client::connect(o).await.unwrap().0
}

/// A subscriber on each transport gets what a publisher on each transport sends, at QoS 1.
#[tokio::test]
async fn the_client_publishes_and_subscribes_over_tls_ws_and_wss() {
    let broker = Broker::start("edge-client");
    let mut subs = Vec::new();
    for (name, o) in broker.transports("sub") {
        let mut o = o;
        o.client_id = format!("sub-{name}");
        let mut c = connect(o).await;
        let ack = c
            .subscribe(
                vec![(
                    "edge/#".into(),
                    SubscriptionOptions {
                        qos: QoS::AtLeastOnce,
                        ..Default::default()
                    },
                )],
                Default::default(),
            )
            .await
            .unwrap();
        assert_eq!(ack.reasons, vec![ReasonCode::GrantedQoS1], "{name}");
        subs.push((name, c));
    }
    for (name, mut o) in broker.transports("pub") {
        o.client_id = format!("pub-{name}");
        let mut p = connect(o).await;
        let topic = format!("edge/{name}");
        let reason = p
            .publish(Publish {
                dup: false,
                qos: QoS::AtLeastOnce,
                retain: false,
                topic: topic.clone(),
                packet_id: None,
                properties: Default::default(),
                payload: Bytes::from(format!("via {name}")),
            })
            .await
            .unwrap();
        assert_eq!(reason, ReasonCode::Success, "{name}");
        for (sub, c) in &mut subs {
            let got = tokio::time::timeout(WAIT, c.recv()).await.unwrap().unwrap();
            let Packet::Publish(got) = got else {
                panic!("{sub} got {got:?}");
            };
            assert_eq!(got.topic, topic, "{sub}");
            assert_eq!(&got.payload[..], format!("via {name}").as_bytes(), "{sub}");
            c.queue_ack(&got).unwrap();
            c.flush().await.unwrap();
        }
        p.disconnect().await.unwrap();
    }
}

#[tokio::test]
async fn a_client_that_does_not_trust_the_brokers_ca_is_refused() {
    let broker = Broker::start("edge-wrong-ca");
    let other = certs("some other CA");
    for port in [broker.mqtts, broker.wss] {
        let mut o = ConnectOptions::new(format!("127.0.0.1:{port}"), "stranger");
        o.tls = Some(TlsOptions::from_pem(other.ca.as_bytes(), None, None, false).unwrap());
        if port == broker.wss {
            o.websocket = Some(WsOptions::default());
        }
        o.timeout = WAIT;
        match Client::connect(o).await {
            Err(ClientError::Io(e)) => {
                assert!(e.to_string().contains("certificate"), "{e}")
            }
            Err(e) => panic!("expected a certificate error, got {e}"),
            Ok(_) => panic!("connected to a broker whose CA it does not trust"),
        }
    }
}

fn bench(broker: &Broker, args: &[&str]) -> serde_json::Value {
    let out: Output = Command::new(env!("CARGO_BIN_EXE_ferrymq"))
        .arg("bench")
        .args(args)
        .arg("--tls-ca")
        .arg(&broker.ca)
        .args(["--json", "--timeout", "60"])
        .output()
        .expect("bench runs");
    assert!(
        out.status.success(),
        "bench failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn the_bench_counts_every_message_over_tls_and_wss() {
    let broker = Broker::start("edge-bench");
    let tls = format!("mqtts://127.0.0.1:{}", broker.mqtts);
    let r = bench(
        &broker,
        &["throughput", "-q", "1", "-n", "3000", "--url", &tls],
    );
    assert_eq!(r["transport"], "tls", "{r}");
    assert_eq!(
        (&r["expected"], &r["received"]),
        (&3000.into(), &3000.into()),
        "{r}"
    );
    assert_eq!(r["lost"], 0, "{r}");
    let port = broker.wss.to_string();
    let r = bench(
        &broker,
        &["throughput", "-n", "3000", "--port", &port, "--ws"],
    );
    assert_eq!(r["transport"], "wss", "{r}");
    assert_eq!(r["received"], 3000, "{r}");
}

/// 40 WebSocket handshakes at once on a budget with room for three: the others wait for
/// room and all get through (a WebSocket connection asking the budget again for its CONNECT
/// buffer while holding its frame's part deadlocked them until their connect timeout).
#[test]
fn the_bench_sets_up_connections_over_tls_and_many_websockets_at_once() {
    let broker = Broker::start("edge-bench-connections");
    let ws = format!("ws://127.0.0.1:{}/mqtt", broker.ws);
    let tls = format!("mqtts://localhost:{}", broker.mqtts);
    for url in [ws.as_str(), tls.as_str()] {
        let r = bench(
            &broker,
            &[
                "connections",
                "-c",
                "120",
                "--concurrency",
                "40",
                "--hold",
                "0",
                "--url",
                url,
            ],
        );
        let c = &r["connections"];
        assert_eq!((&c["held"], &c["failed"]), (&120.into(), &0.into()), "{r}");
        assert!(c["connections_per_sec"].as_f64().unwrap() > 0.0, "{r}");
        assert!(
            c["setup_secs"].as_f64().unwrap() < 5.0,
            "setup stalled: {r}"
        );
    }
}
