//! The byte stream under the client: TCP, TLS (rustls on ring), or MQTT over WebSocket
//! (MQTT 5.0 §6: binary messages, subprotocol `mqtt`) on either.
//!
//! The plain-TCP path is matched first in every call and goes straight to the socket, so a
//! TCP client pays one branch for the other transports. TLS and WebSocket buffer writes, so
//! every write here ends with a flush.

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};

use bytes::BytesMut;
use futures_util::{SinkExt, StreamExt};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use std::future::Future;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

use crate::ClientError;

/// Largest WebSocket message we send: a flush of a larger batch goes out in several (a broker
/// bounds each message by its maximum packet size).
const MAX_MESSAGE_OUT: usize = 64 * 1024;

/// TLS for a connection: one rustls configuration, shared by every connection made with it
/// (building one parses the CA file; do it once, not per connection).
#[derive(Clone, Debug)]
pub struct TlsOptions {
    pub config: Arc<rustls::ClientConfig>,
    /// The name the server's certificate must carry; `None`: the host of the address.
    pub server_name: Option<ServerName<'static>>,
}

/// Certificate files for [`TlsOptions::from_files`].
#[derive(Clone, Copy, Debug, Default)]
pub struct TlsFiles<'a> {
    /// PEM file of the CA(s) that signed the server's certificate.
    pub ca: Option<&'a Path>,
    /// Client certificate chain and key (PEM), for mutual TLS.
    pub cert: Option<&'a Path>,
    pub key: Option<&'a Path>,
    /// Server name to verify instead of the address's host.
    pub server_name: Option<&'a str>,
    /// Keep TLS sessions for resumption. Off, every connection makes a full handshake (what
    /// a benchmark of connection setup should measure).
    pub resume: bool,
}

impl TlsOptions {
    /// Reads the CA and the optional client certificate and key.
    pub fn from_files(f: TlsFiles<'_>) -> Result<TlsOptions, ClientError> {
        let Some(ca) = f.ca else {
            return Err(ClientError::TlsSetup("TLS needs a CA file".into()));
        };
        let read = |p: &Path| {
            std::fs::read(p).map_err(|source| ClientError::File {
                path: p.to_path_buf(),
                source,
            })
        };
        let ca_pem = read(ca)?;
        let client = match (f.cert, f.key) {
            (Some(c), Some(k)) => Some((read(c)?, read(k)?)),
            (None, None) => None,
            _ => {
                return Err(ClientError::TlsSetup(
                    "a client certificate needs both its certificate and its key".into(),
                ))
            }
        };
        let client = client.as_ref().map(|(c, k)| (&c[..], &k[..]));
        TlsOptions::from_pem(&ca_pem, client, f.server_name, f.resume)
    }

    /// From PEM text: the CA(s), and optionally a client certificate chain and its key.
    pub fn from_pem(
        ca_pem: &[u8],
        client: Option<(&[u8], &[u8])>,
        server_name: Option<&str>,
        resume: bool,
    ) -> Result<TlsOptions, ClientError> {
        let bad =
            |what: &str, e: &dyn std::fmt::Display| ClientError::TlsSetup(format!("{what}: {e}"));
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(ca_pem) {
            let cert = cert.map_err(|e| bad("CA file", &e))?;
            roots.add(cert).map_err(|e| bad("CA certificate", &e))?;
        }
        if roots.is_empty() {
            return Err(ClientError::TlsSetup(
                "no certificate in the CA file".into(),
            ));
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| bad("TLS versions", &e))?
            .with_root_certificates(roots);
        let mut config = match client {
            None => builder.with_no_client_auth(),
            Some((cert_pem, key_pem)) => {
                let certs = CertificateDer::pem_slice_iter(cert_pem)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| bad("client certificate", &e))?;
                let key =
                    PrivateKeyDer::from_pem_slice(key_pem).map_err(|e| bad("client key", &e))?;
                builder
                    .with_client_auth_cert(certs, key)
                    .map_err(|e| bad("client certificate", &e))?
            }
        };
        if !resume {
            config.resumption = rustls::client::Resumption::disabled();
        }
        let server_name = server_name
            .map(|n| {
                ServerName::try_from(n.to_string())
                    .map_err(|_| ClientError::TlsSetup(format!("invalid server name {n:?}")))
            })
            .transpose()?;
        Ok(TlsOptions {
            config: Arc::new(config),
            server_name,
        })
    }
}

/// MQTT over WebSocket: the HTTP path of the upgrade (the `mqtt` subprotocol is asked for).
#[derive(Clone, Debug)]
pub struct WsOptions {
    pub path: String,
}

impl Default for WsOptions {
    fn default() -> Self {
        WsOptions {
            path: "/mqtt".into(),
        }
    }
}

/// TCP or TLS over TCP.
pub(crate) enum Stream {
    Tcp(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// What the client reads and writes MQTT bytes through.
pub(crate) enum Transport {
    Stream(Stream),
    Ws(Box<WebSocketStream<Stream>>),
}

/// The host part of `host:port` (`[v6]:port` too).
fn host_of(addr: &str) -> &str {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    host.trim_start_matches('[').trim_end_matches(']')
}

impl Transport {
    /// TLS and the WebSocket upgrade on a connected TCP socket, as `tls` and `ws` ask.
    pub(crate) async fn open(
        tcp: TcpStream,
        addr: &str,
        tls: Option<&TlsOptions>,
        ws: Option<&WsOptions>,
    ) -> Result<Transport, ClientError> {
        let stream = match tls {
            None => Stream::Tcp(tcp),
            Some(t) => {
                let name = match &t.server_name {
                    Some(n) => n.clone(),
                    None => ServerName::try_from(host_of(addr).to_string()).map_err(|_| {
                        ClientError::TlsSetup(format!("no server name in {addr:?}"))
                    })?,
                };
                let connector = tokio_rustls::TlsConnector::from(t.config.clone());
                Stream::Tls(Box::new(connector.connect(name, tcp).await?))
            }
        };
        let Some(ws) = ws else {
            return Ok(Transport::Stream(stream));
        };
        let scheme = if tls.is_some() { "wss" } else { "ws" };
        let url = format!("{scheme}://{addr}{}", ws.path);
        let mut request = url.into_client_request().map_err(ws_setup)?;
        request
            .headers_mut()
            .insert("Sec-WebSocket-Protocol", HeaderValue::from_static("mqtt"));
        let (socket, _) = tokio_tungstenite::client_async(request, stream)
            .await
            .map_err(ws_setup)?;
        Ok(Transport::Ws(Box::new(socket)))
    }

    /// Reads what has arrived into `buf`, waiting for something; `Ok(0)` at the end.
    pub(crate) async fn read_buf(&mut self, buf: &mut BytesMut) -> io::Result<usize> {
        match self {
            Transport::Stream(Stream::Tcp(s)) => s.read_buf(buf).await,
            Transport::Stream(s) => s.read_buf(buf).await,
            Transport::Ws(ws) => loop {
                // Pings are answered by tungstenite itself; a Close ends the stream.
                match ws.next().await {
                    None | Some(Ok(Message::Close(_))) => return Ok(0),
                    Some(Ok(Message::Binary(b))) if !b.is_empty() => {
                        buf.extend_from_slice(&b);
                        return Ok(b.len());
                    }
                    Some(Ok(Message::Text(_))) => {
                        return Err(io::Error::new(
                            io::ErrorKind::InvalidData,
                            "MQTT over WebSocket takes binary messages only",
                        ))
                    }
                    Some(Ok(_)) => {}
                    Some(Err(e)) => return Err(ws_io(e)),
                }
            },
        }
    }

    /// Reads what has arrived without waiting: `None` when nothing had.
    pub(crate) fn try_read_buf(&mut self, buf: &mut BytesMut) -> io::Result<Option<usize>> {
        if let Transport::Stream(Stream::Tcp(s)) = self {
            return match s.try_read_buf(buf) {
                Ok(n) => Ok(Some(n)),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
                Err(e) => Err(e),
            };
        }
        // TLS and WebSocket have no try_read: poll a read once. Reads are cancel-safe, and the
        // next real wait registers its own waker.
        let read = std::pin::pin!(self.read_buf(buf));
        match read.poll(&mut Context::from_waker(Waker::noop())) {
            Poll::Ready(r) => r.map(Some),
            Poll::Pending => Ok(None),
        }
    }

    /// Writes all of `buf` (and leaves it empty).
    pub(crate) async fn write_all(&mut self, buf: &mut BytesMut) -> io::Result<()> {
        match self {
            Transport::Stream(Stream::Tcp(s)) => s.write_all(buf).await?,
            Transport::Stream(s) => {
                s.write_all(buf).await?;
                s.flush().await?;
            }
            Transport::Ws(ws) => {
                while !buf.is_empty() {
                    let n = buf.len().min(MAX_MESSAGE_OUT);
                    ws.feed(Message::Binary(buf.split_to(n).freeze()))
                        .await
                        .map_err(ws_io)?;
                }
                ws.flush().await.map_err(ws_io)?;
            }
        }
        buf.clear();
        Ok(())
    }

    /// Closes the stream (TLS close_notify, WebSocket Close frame, TCP FIN).
    pub(crate) async fn shutdown(&mut self) -> io::Result<()> {
        match self {
            Transport::Stream(s) => s.shutdown().await,
            Transport::Ws(ws) => match WebSocketStream::close(ws.as_mut(), None).await {
                Ok(()) | Err(WsError::ConnectionClosed | WsError::AlreadyClosed) => Ok(()),
                Err(e) => Err(ws_io(e)),
            },
        }
    }
}

fn ws_setup(e: WsError) -> ClientError {
    match e {
        WsError::Io(e) => ClientError::Io(e),
        other => ClientError::WebSocket(other.to_string()),
    }
}

fn ws_io(e: WsError) -> io::Error {
    match e {
        WsError::Io(e) => e,
        WsError::ConnectionClosed | WsError::AlreadyClosed => io::ErrorKind::BrokenPipe.into(),
        other => io::Error::new(io::ErrorKind::InvalidData, other),
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, data),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, data),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::host_of;

    #[test]
    fn host_of_an_address_drops_the_port_and_v6_brackets() {
        assert_eq!(host_of("127.0.0.1:8883"), "127.0.0.1");
        assert_eq!(host_of("broker.example:8884"), "broker.example");
        assert_eq!(host_of("[::1]:8883"), "::1");
        assert_eq!(host_of("localhost"), "localhost");
    }
}
