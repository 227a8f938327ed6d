//! A small async MQTT client on the FerryMQ codec, for the `ferrymq pub`/`sub` commands and
//! the benchmark. It speaks both 3.1.1 and 5.0 and exposes packets directly: callers that want
//! pipelining use [`Client::send`] and [`Client::recv`]; the helpers wait for each ack.
//!
//! Transports: TCP, TLS (rustls on ring) and MQTT over WebSocket on either
//! ([`ConnectOptions::tls`], [`ConnectOptions::websocket`]); see `transport`.
//!
//! Not a general-purpose client: no automatic reconnect, no offline buffering.

mod transport;

use std::path::PathBuf;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use ferrymq_mqtt::{
    decode, encode, ConnAck, Connect, DecodeError, Disconnect, EncodeError, Limits, Packet,
    Properties, ProtocolVersion, PubResp, Publish, QoS, ReasonCode, SubAck, Subscribe,
    SubscriptionOptions, Will,
};
use tokio::net::{TcpSocket, TcpStream};

use transport::Transport;
pub use transport::{TlsFiles, TlsOptions, WsOptions};

/// Errors of the client.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("network error: {0}")]
    Io(#[from] std::io::Error),
    #[error("bad packet from server: {0}")]
    Decode(#[from] DecodeError),
    #[error("cannot encode packet: {0}")]
    Encode(#[from] EncodeError),
    #[error("connection refused: {0:?}")]
    Refused(ReasonCode),
    #[error("server closed the connection")]
    Closed,
    #[error("server disconnected us: {0:?}")]
    Disconnected(ReasonCode),
    #[error("unexpected {0} packet")]
    Unexpected(&'static str),
    #[error("timed out waiting for the server")]
    Timeout,
    #[error("cannot read {path}: {source}")]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("TLS setup: {0}")]
    TlsSetup(String),
    #[error("WebSocket upgrade failed: {0}")]
    WebSocket(String),
}

/// How to connect.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    pub addr: String,
    pub version: ProtocolVersion,
    pub client_id: String,
    pub clean_start: bool,
    pub keep_alive: u16,
    pub username: Option<String>,
    pub password: Option<Bytes>,
    pub will: Option<Will>,
    pub properties: Properties,
    pub timeout: Duration,
    /// Local address to connect from (each has its own ephemeral ports); `None` lets the
    /// kernel choose.
    pub source: Option<std::net::IpAddr>,
    /// TLS on the TCP connection (under the WebSocket, if both).
    pub tls: Option<TlsOptions>,
    /// MQTT over WebSocket (`ws://`, or `wss://` with `tls`).
    pub websocket: Option<WsOptions>,
}

impl ConnectOptions {
    pub fn new(addr: impl Into<String>, client_id: impl Into<String>) -> Self {
        ConnectOptions {
            addr: addr.into(),
            version: ProtocolVersion::V5,
            client_id: client_id.into(),
            clean_start: true,
            keep_alive: 60,
            username: None,
            password: None,
            will: None,
            properties: Properties::default(),
            timeout: Duration::from_secs(10),
            source: None,
            tls: None,
            websocket: None,
        }
    }
}

/// A connected client.
pub struct Client {
    stream: Transport,
    version: ProtocolVersion,
    rbuf: BytesMut,
    wbuf: BytesMut,
    next_pid: u16,
    timeout: Duration,
}

impl Client {
    /// Connects (TCP, then TLS and the WebSocket upgrade if asked) and waits for CONNACK; a
    /// refusal is an error. `timeout` bounds the connection's setup and, apart, the CONNACK.
    pub async fn connect(opts: ConnectOptions) -> Result<(Client, ConnAck), ClientError> {
        let connecting = async {
            let tcp = tcp_connect(&opts).await?;
            tcp.set_nodelay(true)?;
            Transport::open(tcp, &opts.addr, opts.tls.as_ref(), opts.websocket.as_ref()).await
        };
        let stream = tokio::time::timeout(opts.timeout, connecting)
            .await
            .map_err(|_| ClientError::Timeout)??;
        let mut c = Client {
            stream,
            version: opts.version,
            rbuf: BytesMut::with_capacity(64 * 1024),
            wbuf: BytesMut::with_capacity(64 * 1024),
            next_pid: 1,
            timeout: opts.timeout,
        };
        let connect = Connect {
            version: opts.version,
            client_id: opts.client_id,
            clean_start: opts.clean_start,
            keep_alive: opts.keep_alive,
            username: opts.username,
            password: opts.password,
            will: opts.will,
            properties: opts.properties,
        };
        c.send(&Packet::Connect(Box::new(connect))).await?;
        match c.recv_timeout().await? {
            Packet::ConnAck(ack) if ack.reason == ReasonCode::Success => Ok((c, ack)),
            Packet::ConnAck(ack) => Err(ClientError::Refused(ack.reason)),
            other => Err(ClientError::Unexpected(other.name())),
        }
    }

    pub fn version(&self) -> ProtocolVersion {
        self.version
    }

    /// A fresh packet identifier.
    pub fn next_packet_id(&mut self) -> u16 {
        let pid = self.next_pid;
        self.next_pid = if pid == u16::MAX { 1 } else { pid + 1 };
        pid
    }

    /// Queues a packet without writing it; [`Client::flush`] writes everything queued at once.
    pub fn queue(&mut self, p: &Packet) -> Result<(), ClientError> {
        encode(p, self.version, &mut self.wbuf)?;
        Ok(())
    }

    pub async fn flush(&mut self) -> Result<(), ClientError> {
        if !self.wbuf.is_empty() {
            self.stream.write_all(&mut self.wbuf).await?;
        }
        Ok(())
    }

    pub async fn send(&mut self, p: &Packet) -> Result<(), ClientError> {
        self.queue(p)?;
        self.flush().await
    }

    /// Bytes queued by [`Client::queue`] and not yet flushed.
    pub fn queued_bytes(&self) -> usize {
        self.wbuf.len()
    }

    /// The next packet already received, without waiting. DISCONNECT from the server is an error.
    pub fn try_recv(&mut self) -> Result<Option<Packet>, ClientError> {
        match decode(&mut self.rbuf, self.version, &Limits::default())? {
            Some(Packet::Disconnect(d)) => Err(ClientError::Disconnected(d.reason)),
            other => Ok(other),
        }
    }

    /// Waits for more bytes from the server.
    pub async fn fill(&mut self) -> Result<(), ClientError> {
        if self.rbuf.capacity() - self.rbuf.len() < 4096 {
            self.rbuf.reserve(64 * 1024);
        }
        if self.stream.read_buf(&mut self.rbuf).await? == 0 {
            return Err(ClientError::Closed);
        }
        Ok(())
    }

    /// Reads whatever has arrived without waiting; `false` when nothing had.
    pub fn try_fill(&mut self) -> Result<bool, ClientError> {
        if self.rbuf.capacity() - self.rbuf.len() < 4096 {
            self.rbuf.reserve(64 * 1024);
        }
        match self.stream.try_read_buf(&mut self.rbuf)? {
            Some(0) => Err(ClientError::Closed),
            Some(_) => Ok(true),
            None => Ok(false),
        }
    }

    /// The next packet from the server. DISCONNECT from the server is an error.
    pub async fn recv(&mut self) -> Result<Packet, ClientError> {
        loop {
            if let Some(p) = self.try_recv()? {
                return Ok(p);
            }
            self.fill().await?;
        }
    }

    async fn recv_timeout(&mut self) -> Result<Packet, ClientError> {
        tokio::time::timeout(self.timeout, self.recv())
            .await
            .map_err(|_| ClientError::Timeout)?
    }

    /// Subscribes and waits for the SUBACK.
    pub async fn subscribe(
        &mut self,
        filters: Vec<(String, SubscriptionOptions)>,
        properties: Properties,
    ) -> Result<SubAck, ClientError> {
        let packet_id = self.next_packet_id();
        self.send(&Packet::Subscribe(Subscribe {
            packet_id,
            filters,
            properties,
        }))
        .await?;
        loop {
            match self.recv_timeout().await? {
                Packet::SubAck(a) if a.packet_id == packet_id => return Ok(a),
                Packet::Publish(_) => continue,
                other => return Err(ClientError::Unexpected(other.name())),
            }
        }
    }

    /// Publishes and, for QoS 1/2, waits for the flow to finish. Returns the ack's reason.
    pub async fn publish(&mut self, mut p: Publish) -> Result<ReasonCode, ClientError> {
        if p.qos != QoS::AtMostOnce && p.packet_id.is_none() {
            p.packet_id = Some(self.next_packet_id());
        }
        let pid = p.packet_id.unwrap_or(0);
        let qos = p.qos;
        self.send(&Packet::Publish(p)).await?;
        match qos {
            QoS::AtMostOnce => Ok(ReasonCode::Success),
            QoS::AtLeastOnce => loop {
                match self.recv_timeout().await? {
                    Packet::PubAck(a) if a.packet_id == pid => return Ok(a.reason),
                    Packet::Publish(_) => continue,
                    other => return Err(ClientError::Unexpected(other.name())),
                }
            },
            QoS::ExactlyOnce => {
                loop {
                    match self.recv_timeout().await? {
                        Packet::PubRec(r) if r.packet_id == pid => {
                            if r.reason.is_error() {
                                return Ok(r.reason);
                            }
                            break;
                        }
                        Packet::Publish(_) => continue,
                        other => return Err(ClientError::Unexpected(other.name())),
                    }
                }
                self.send(&Packet::PubRel(PubResp::new(pid, ReasonCode::Success)))
                    .await?;
                loop {
                    match self.recv_timeout().await? {
                        Packet::PubComp(c) if c.packet_id == pid => return Ok(c.reason),
                        Packet::Publish(_) => continue,
                        other => return Err(ClientError::Unexpected(other.name())),
                    }
                }
            }
        }
    }

    /// Acknowledges a received QoS 1/2 publish (PUBACK, or PUBREC and later PUBCOMP).
    pub fn queue_ack(&mut self, p: &Publish) -> Result<(), ClientError> {
        match (p.qos, p.packet_id) {
            (QoS::AtLeastOnce, Some(id)) => {
                self.queue(&Packet::PubAck(PubResp::new(id, ReasonCode::Success)))
            }
            (QoS::ExactlyOnce, Some(id)) => {
                self.queue(&Packet::PubRec(PubResp::new(id, ReasonCode::Success)))
            }
            _ => Ok(()),
        }
    }

    /// Answers a PUBREL with PUBCOMP.
    pub fn queue_pubcomp(&mut self, id: u16) -> Result<(), ClientError> {
        self.queue(&Packet::PubComp(PubResp::new(id, ReasonCode::Success)))
    }

    /// Sends DISCONNECT (normal) and closes.
    pub async fn disconnect(mut self) -> Result<(), ClientError> {
        self.send(&Packet::Disconnect(Disconnect::new(ReasonCode::Success)))
            .await?;
        self.stream.shutdown().await?;
        Ok(())
    }
}

/// The TCP connection, from `opts.source` if set.
async fn tcp_connect(opts: &ConnectOptions) -> std::io::Result<TcpStream> {
    let Some(ip) = opts.source else {
        return TcpStream::connect(&opts.addr).await;
    };
    let remote = tokio::net::lookup_host(&opts.addr)
        .await?
        .next()
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no address"))?;
    let socket = if ip.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    socket.bind(std::net::SocketAddr::new(ip, 0))?;
    socket.connect(remote).await
}
