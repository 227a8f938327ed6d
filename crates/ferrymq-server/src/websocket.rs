//! MQTT over WebSocket (MQTT 5.0 §6): the HTTP upgrade and an adapter that turns binary
//! WebSocket messages into a byte stream, so that the connection task reads and writes MQTT
//! as it does on TCP (`transport::Split`).
//!
//! - Packets and messages are independent: a packet may span messages and a message may hold
//!   several packets (§6.0.0-2/-3); the adapter only concatenates payloads.
//! - Only binary messages carry MQTT; a text message ends the connection (§6.0.0-1).
//! - The upgrade must ask for the configured path (else HTTP 404) and, when the client offers
//!   subprotocols, one of `mqtt` or `mqttv3.1` (else HTTP 400); the reply names the one taken.
//! - Messages and frames are bounded by the broker's maximum packet size, so that a client
//!   cannot make us buffer more than one largest packet.
//!
//! Public (not part of the broker's API) so that the fuzz target can drive [`WsStream`].

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::{Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tokio_tungstenite::WebSocketStream;

/// The subprotocols we speak, as clients name them: `mqtt` (3.1.1 and 5.0), and `mqttv3.1`,
/// which older clients send for 3.1.1 too.
pub const SUBPROTOCOLS: [&str; 2] = ["mqtt", "mqttv3.1"];

/// Largest message we send: a write of a larger batch goes out in several messages.
const MAX_MESSAGE_OUT: usize = 64 * 1024;

/// Room for the WebSocket frame header and a packet's fixed header around a largest packet.
pub(crate) const FRAME_SLACK: usize = 64;
/// About what the HTTP upgrade request may make the handshake buffer (its headers).
pub(crate) const UPGRADE_BUFFER: usize = 64 * 1024;

/// A WebSocket connection as a byte stream of its binary messages.
pub struct WsStream<S> {
    ws: WebSocketStream<S>,
    /// The rest of the message being read.
    incoming: Bytes,
}

/// The limits of a WebSocket connection for a broker whose largest packet is `max_packet_size`.
pub fn ws_config(max_packet_size: usize) -> WebSocketConfig {
    let max = max_packet_size.saturating_add(FRAME_SLACK);
    WebSocketConfig::default()
        .max_message_size(Some(max))
        .max_frame_size(Some(max))
        // Writes go out in messages of at most MAX_MESSAGE_OUT; the sink holds one or two.
        .write_buffer_size(0)
        .max_write_buffer_size(4 * MAX_MESSAGE_OUT)
        .read_buffer_size(4096)
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsStream<S> {
    /// An adapter over an upgraded WebSocket (a client's, in tests and tools).
    pub fn new(ws: WebSocketStream<S>) -> Self {
        WsStream {
            ws,
            incoming: Bytes::new(),
        }
    }

    /// An adapter over a stream that is already past its HTTP upgrade (the fuzz target uses
    /// this with `Role::Server` on raw bytes).
    pub async fn from_upgraded(stream: S, role: Role, max_packet_size: usize) -> Self {
        let config = ws_config(max_packet_size);
        WsStream {
            ws: WebSocketStream::from_raw_socket(stream, role, Some(config)).await,
            incoming: Bytes::new(),
        }
    }
}

/// Why an upgrade failed.
#[derive(Debug, thiserror::Error)]
pub enum UpgradeError {
    /// Not a WebSocket upgrade to our path and subprotocol (the client got an HTTP error), or
    /// the socket failed during the upgrade.
    #[error("WebSocket upgrade failed: {0}")]
    Handshake(#[from] WsError),
}

/// Answers the HTTP upgrade on `stream`: path `path`, subprotocol `mqtt` or `mqttv3.1`, and
/// a browser's `Origin` loopback or among `origins` (`*`: any).
// The refusal is tungstenite's own `ErrorResponse` type, returned once per upgrade.
#[allow(clippy::result_large_err)]
pub async fn accept<S>(
    stream: S,
    path: &str,
    origins: &[String],
    max_packet_size: usize,
) -> Result<WsStream<S>, UpgradeError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let check = |req: &Request, mut response: Response| -> Result<Response, ErrorResponse> {
        if req.uri().path() != path {
            return Err(refusal(
                StatusCode::NOT_FOUND,
                "no MQTT endpoint at this path",
            ));
        }
        if let Some(origin) = req.headers().get("Origin") {
            if !origin_allowed(origin.to_str().unwrap_or(""), origins) {
                return Err(refusal(
                    StatusCode::FORBIDDEN,
                    "pages of this web origin may not use this broker (listeners.ws_origins)",
                ));
            }
        }
        match choose_subprotocol(req) {
            Subprotocol::Chosen(p) => {
                response
                    .headers_mut()
                    .insert("Sec-WebSocket-Protocol", HeaderValue::from_static(p));
            }
            Subprotocol::NoneOffered => {}
            Subprotocol::Unsupported => {
                return Err(refusal(
                    StatusCode::BAD_REQUEST,
                    "the WebSocket subprotocol must be mqtt or mqttv3.1",
                ));
            }
        }
        Ok(response)
    };
    let config = ws_config(max_packet_size);
    let ws = tokio_tungstenite::accept_hdr_async_with_config(stream, check, Some(config)).await?;
    Ok(WsStream {
        ws,
        incoming: Bytes::new(),
    })
}

/// Whether a browser page of `origin` may connect: a loopback origin (a page served on this
/// host to this host), or one listed (`*` lists them all).
fn origin_allowed(origin: &str, allowed: &[String]) -> bool {
    let origin = origin.trim().trim_end_matches('/');
    if allowed
        .iter()
        .any(|a| a == "*" || a.trim_end_matches('/').eq_ignore_ascii_case(origin))
    {
        return true;
    }
    let Some((_, authority)) = origin.split_once("://") else {
        return false;
    };
    let host = match authority.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => authority.rsplit_once(':').map_or(authority, |(h, _)| h),
    };
    host.eq_ignore_ascii_case("localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

fn refusal(status: StatusCode, why: &str) -> ErrorResponse {
    let mut r = ErrorResponse::new(Some(why.to_string()));
    *r.status_mut() = status;
    r
}

enum Subprotocol {
    Chosen(&'static str),
    NoneOffered,
    Unsupported,
}

/// The first subprotocol the client offers that we speak.
fn choose_subprotocol(req: &Request) -> Subprotocol {
    let mut offered = false;
    for value in req.headers().get_all("Sec-WebSocket-Protocol") {
        let Ok(list) = value.to_str() else {
            offered = true;
            continue;
        };
        for p in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            offered = true;
            if let Some(ours) = SUBPROTOCOLS.iter().find(|s| s.eq_ignore_ascii_case(p)) {
                return Subprotocol::Chosen(ours);
            }
        }
    }
    if offered {
        Subprotocol::Unsupported
    } else {
        Subprotocol::NoneOffered
    }
}

fn ws_error(e: WsError) -> io::Error {
    match e {
        WsError::Io(e) => e,
        WsError::ConnectionClosed | WsError::AlreadyClosed => io::ErrorKind::BrokenPipe.into(),
        other => io::Error::new(io::ErrorKind::InvalidData, other),
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsStream<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if !this.incoming.is_empty() {
                let n = this.incoming.len().min(buf.remaining());
                buf.put_slice(&this.incoming.split_to(n));
                return Poll::Ready(Ok(()));
            }
            // Pings are answered by the WebSocket layer itself; a Close ends the stream.
            match std::task::ready!(Pin::new(&mut this.ws).poll_next(cx)) {
                None | Some(Ok(Message::Close(_))) => return Poll::Ready(Ok(())),
                Some(Ok(Message::Binary(b))) => this.incoming = b,
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Text(_))) => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "MQTT over WebSocket takes binary messages only",
                    )))
                }
                Some(Err(e)) => return Poll::Ready(Err(ws_error(e))),
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsStream<S> {
    /// One binary message per write (at most [`MAX_MESSAGE_OUT`] bytes of it).
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        std::task::ready!(Pin::new(&mut this.ws).poll_ready(cx)).map_err(ws_error)?;
        let n = data.len().min(MAX_MESSAGE_OUT);
        let message = Message::Binary(Bytes::copy_from_slice(&data[..n]));
        Pin::new(&mut this.ws)
            .start_send(message)
            .map_err(ws_error)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().ws)
            .poll_flush(cx)
            .map_err(ws_error)
    }

    /// Sends a Close frame (and flushes it); the peer's Close, if it comes, is read as EOF.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match std::task::ready!(Pin::new(&mut self.get_mut().ws).poll_close(cx)) {
            Ok(()) | Err(WsError::ConnectionClosed | WsError::AlreadyClosed) => Poll::Ready(Ok(())),
            Err(e) => Poll::Ready(Err(ws_error(e))),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A client frame: FIN, `opcode`, masked with `key` (clients must mask).
    fn frame(opcode: u8, fin: bool, payload: &[u8]) -> Vec<u8> {
        let key = [1u8, 2, 3, 4];
        let mut f = vec![if fin { 0x80 } else { 0 } | opcode];
        assert!(payload.len() < 126);
        f.push(0x80 | payload.len() as u8);
        f.extend_from_slice(&key);
        f.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        f
    }

    #[tokio::test]
    async fn packets_may_span_messages_and_messages_may_hold_several_packets() {
        let (mut client, server) = tokio::io::duplex(4096);
        let mut ws = WsStream::from_upgraded(server, Role::Server, 1024).await;
        // "abc" split over a fragmented message (binary + continuation), then "de" and a
        // ping between them, then a message holding "fgh".
        let mut wire = frame(0x2, false, b"ab");
        wire.extend(frame(0x0, true, b"c"));
        wire.extend(frame(0x9, true, b"p"));
        wire.extend(frame(0x2, true, b"de"));
        wire.extend(frame(0x2, true, b"fgh"));
        client.write_all(&wire).await.unwrap();
        let mut got = [0u8; 8];
        ws.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"abcdefgh");
        // The ping was answered with a pong carrying its payload.
        ws.write_all(b"x").await.unwrap();
        ws.flush().await.unwrap();
        let mut out = [0u8; 5];
        client.read_exact(&mut out).await.unwrap();
        assert_eq!(
            out,
            [0x8A, 1, b'p', 0x82, 1],
            "pong, then our binary message"
        );
    }

    #[tokio::test]
    async fn a_text_message_ends_the_stream_with_an_error() {
        let (mut client, server) = tokio::io::duplex(4096);
        let mut ws = WsStream::from_upgraded(server, Role::Server, 1024).await;
        client.write_all(&frame(0x1, true, b"hi")).await.unwrap();
        let mut got = [0u8; 1];
        let err = ws.read(&mut got).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }
}

#[cfg(test)]
mod origin_tests {
    use super::origin_allowed;

    #[test]
    fn loopback_and_listed_origins_may_connect_others_may_not() {
        let none: &[String] = &[];
        for ok in [
            "http://localhost:3000",
            "http://127.0.0.1:8080",
            "http://[::1]:9000",
            "https://LOCALHOST",
        ] {
            assert!(origin_allowed(ok, none), "{ok}");
        }
        for bad in [
            "https://evil.example",
            "http://127.0.0.1.evil.example",
            "null",
            "",
            "http://localhost.evil.example:80",
        ] {
            assert!(!origin_allowed(bad, none), "{bad}");
        }
        let listed = ["https://app.example".to_string()];
        assert!(origin_allowed("https://app.example", &listed));
        assert!(origin_allowed("https://app.example/", &listed));
        assert!(!origin_allowed("https://app.example.evil", &listed));
        assert!(origin_allowed(
            "https://anything.example",
            &["*".to_string()]
        ));
    }
}
