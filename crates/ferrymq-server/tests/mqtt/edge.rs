//! Helpers for the TLS and WebSocket tests: certificates made with rcgen, a rustls client,
//! a WebSocket client, and raw MQTT over any byte stream.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::BytesMut;
use ferrymq_mqtt::{decode, encode, Limits, Packet, ProtocolVersion};
use ferrymq_server::websocket::WsStream;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;

use crate::common::WAIT;

/// A certificate authority for one test.
pub struct Ca {
    params: CertificateParams,
    key: KeyPair,
    pub pem: String,
}

/// A certificate and its key, PEM.
pub struct Issued {
    pub cert: String,
    pub key: String,
    pub der: Vec<u8>,
}

/// What an issued certificate is for.
pub enum Role<'a> {
    /// For 127.0.0.1 and localhost.
    Server,
    /// A client whose subject CN is the given name.
    Client(&'a str),
    /// A client certificate whose validity ended in 2021.
    ExpiredClient(&'a str),
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let pem = params.self_signed(&key).unwrap().pem();
        Ca { params, key, pem }
    }

    pub fn issue(&self, role: Role<'_>, serial: u64) -> Issued {
        let key = KeyPair::generate().unwrap();
        let mut params = match role {
            Role::Server => {
                CertificateParams::new(vec!["localhost".into(), "127.0.0.1".into()]).unwrap()
            }
            Role::Client(_) | Role::ExpiredClient(_) => CertificateParams::default(),
        };
        params.serial_number = Some(serial.into());
        match role {
            Role::Server => {
                params
                    .distinguished_name
                    .push(DnType::CommonName, "ferrymq test server");
                params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
            }
            Role::Client(cn) | Role::ExpiredClient(cn) => {
                params.distinguished_name.push(DnType::CommonName, cn);
                params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
            }
        }
        if let Role::ExpiredClient(_) = role {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let issuer = rcgen::Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer).unwrap();
        Issued {
            cert: cert.pem(),
            key: key.serialize_pem(),
            der: cert.der().to_vec(),
        }
    }
}

/// A fresh directory for one test's certificate files.
pub fn cert_dir(name: &str) -> PathBuf {
    let dir = crate::common::fresh_data_dir().with_extension(name);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// Writes `text` to `dir/name` atomically (write, then rename), as deployment tools do.
pub fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    let tmp = dir.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    path
}

/// A rustls client trusting `ca_pem`, with an optional client certificate.
pub fn client_config(ca_pem: &str, client: Option<&Issued>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match client {
        Some(c) => {
            let certs = CertificateDer::pem_slice_iter(c.cert.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .unwrap();
            let key = PrivateKeyDer::from_pem_slice(c.key.as_bytes()).unwrap();
            builder.with_client_auth_cert(certs, key).unwrap()
        }
        None => builder.with_no_client_auth(),
    };
    Arc::new(config)
}

pub type TlsClient = tokio_rustls::client::TlsStream<TcpStream>;

/// A TLS connection to `addr` (server name 127.0.0.1).
pub async fn tls_connect(
    addr: std::net::SocketAddr,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<TlsClient> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let connect = tokio_rustls::TlsConnector::from(config).connect(name, tcp);
    tokio::time::timeout(WAIT, connect)
        .await
        .expect("TLS handshake ends in time")
}

/// The server's certificate as a TLS client saw it.
pub fn served_certificate(tls: &TlsClient) -> Vec<u8> {
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

/// A WebSocket upgrade to `url` over `stream`, offering `protocols` (None: no header).
pub async fn ws_connect<S>(
    stream: S,
    url: &str,
    protocols: Option<&str>,
) -> Result<(WsStream<S>, Option<String>), tokio_tungstenite::tungstenite::Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let mut request = url.into_client_request()?;
    if let Some(p) = protocols {
        request
            .headers_mut()
            .insert("Sec-WebSocket-Protocol", HeaderValue::from_str(p).unwrap());
    }
    let (ws, response) = tokio_tungstenite::client_async(request, stream).await?;
    let chosen = response
        .headers()
        .get("Sec-WebSocket-Protocol")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    Ok((WsStream::new(ws), chosen))
}

/// Raw MQTT over any byte stream (TLS, WebSocket).
pub struct Wire<S> {
    pub stream: S,
    version: ProtocolVersion,
    buf: BytesMut,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Wire<S> {
    pub fn new(stream: S, version: ProtocolVersion) -> Self {
        Wire {
            stream,
            version,
            buf: BytesMut::new(),
        }
    }

    pub async fn send(&mut self, p: &Packet) -> std::io::Result<()> {
        let mut out = BytesMut::new();
        encode(p, self.version, &mut out).unwrap();
        self.stream.write_all(&out).await?;
        self.stream.flush().await
    }

    /// The next packet, or `None` when the connection ends (EOF or an error, e.g. a TLS alert).
    pub async fn recv(&mut self) -> Option<Packet> {
        let read = async {
            loop {
                if let Some(p) = decode(&mut self.buf, self.version, &Limits::default()).unwrap() {
                    return Some(p);
                }
                match self.stream.read_buf(&mut self.buf).await {
                    Ok(0) | Err(_) => return None,
                    Ok(_) => {}
                }
            }
        };
        tokio::time::timeout(WAIT, read)
            .await
            .expect("server answers or closes in time")
    }

    /// CONNECT with a clean start; the CONNACK, or `None` when the server ends the connection.
    pub async fn connect(&mut self, id: &str) -> Option<ferrymq_mqtt::ConnAck> {
        let packet = crate::common::connect_packet(id, self.version);
        self.send(&packet).await.ok()?;
        match self.recv().await? {
            Packet::ConnAck(a) => Some(a),
            other => panic!("{id}: expected CONNACK, got {other:?}"),
        }
    }

    /// Connects and fails unless the CONNACK says Success.
    pub async fn connected(stream: S, id: &str, version: ProtocolVersion) -> Self {
        let mut w = Wire::new(stream, version);
        let ack = w.connect(id).await;
        assert!(
            matches!(&ack, Some(a) if a.reason == ferrymq_mqtt::ReasonCode::Success),
            "{id}: CONNACK {ack:?}"
        );
        w
    }

    /// Subscribes to `filter` at QoS 1 and waits for a successful SUBACK.
    pub async fn subscribe(&mut self, packet_id: u16, filter: &str) {
        let options = ferrymq_mqtt::SubscriptionOptions {
            qos: ferrymq_mqtt::QoS::AtLeastOnce,
            ..Default::default()
        };
        let sub = Packet::Subscribe(ferrymq_mqtt::Subscribe {
            packet_id,
            filters: vec![(filter.into(), options)],
            properties: Default::default(),
        });
        self.send(&sub).await.unwrap();
        match self.recv().await {
            Some(Packet::SubAck(a)) if a.packet_id == packet_id => {
                assert!(a.reasons.iter().all(|r| r.as_u8() < 0x80), "{a:?}")
            }
            other => panic!("expected SUBACK {packet_id}, got {other:?}"),
        }
    }

    /// Publishes at QoS 1 and waits for its PUBACK.
    pub async fn publish(&mut self, packet_id: u16, topic: &str, payload: &[u8]) {
        let p = crate::common::publish_packet(
            topic,
            ferrymq_mqtt::QoS::AtLeastOnce,
            Some(packet_id),
            bytes::Bytes::copy_from_slice(payload),
        );
        self.send(&p).await.unwrap();
        match self.recv().await {
            Some(Packet::PubAck(a)) if a.packet_id == packet_id => {}
            other => panic!("expected PUBACK {packet_id}, got {other:?}"),
        }
    }

    /// The next PUBLISH's topic and payload (acknowledged if QoS 1).
    pub async fn next_publish(&mut self) -> (String, Vec<u8>) {
        match self.recv().await {
            Some(Packet::Publish(p)) => {
                if let Some(id) = p.packet_id {
                    let ack = Packet::PubAck(ferrymq_mqtt::PubResp::new(
                        id,
                        ferrymq_mqtt::ReasonCode::Success,
                    ));
                    self.send(&ack).await.unwrap();
                }
                (p.topic.to_string(), p.payload.to_vec())
            }
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }
}
