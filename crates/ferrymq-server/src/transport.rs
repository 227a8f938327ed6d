//! The transport seam: the few socket operations a connection task needs, so that one
//! protocol path (handshake, read loop, write loop in `connection.rs`) serves every transport.
//!
//! - Plain TCP implements them on the stream's borrowed halves, readiness-based
//!   (`poll_read_ready` + `try_read_buf`, `try_write`): no buffer is held while a connection
//!   is idle, and the connection future stays as small as it was before this seam (see
//!   `connection::tests::the_connection_future_stays_small` and docs/performance.md).
//! - Any other byte stream (`AsyncRead + AsyncWrite`: TLS, the WebSocket adapter in
//!   `websocket.rs`, TLS then WebSocket) goes through [`Split`]. Those streams hold their own
//!   buffers (rustls's records, WebSocket frames); their writes need a flush.
//!
//! Invariant: a method here does I/O only. Decoding, limits and the router are the caller's.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::time::Instant;

/// Smallest and largest read reservation. A connection starts small (a CONNECT fits) and
/// doubles its reservation while reads fill it, so idle connections never touch a big buffer
/// and busy ones read 64 KiB per syscall.
pub(crate) const MIN_READ: usize = 512;
pub(crate) const MAX_READ: usize = 64 * 1024;

/// A connection's socket, split into what the reader and the writer use.
pub(crate) trait Transport: Send {
    type Read<'a>: ReadSide
    where
        Self: 'a;
    type Write<'a>: WriteSide
    where
        Self: 'a;

    fn halves(&mut self) -> (Self::Read<'_>, Self::Write<'_>);
}

/// The reading half.
pub(crate) trait ReadSide: Send {
    /// Waits for input, then reads it into `buf`, reserving `*chunk` bytes only when there is
    /// something to read; adapts `*chunk` to how full reads come (see [`adapt`]). `Ok(0)` is
    /// the end of the stream. An empty `buf` may be freed while waiting.
    fn poll_read_some(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
        chunk: &mut usize,
    ) -> Poll<io::Result<usize>>;

    /// The client's address (of the TCP connection under any TLS or WebSocket); `None` when
    /// the socket is already gone.
    fn peer_addr(&self) -> Option<SocketAddr>;

    /// Reads into `scratch` to discard it (a lingering close).
    fn poll_discard(&mut self, cx: &mut Context<'_>, scratch: &mut [u8])
        -> Poll<io::Result<usize>>;
}

/// The writing half.
pub(crate) trait WriteSide: Send {
    /// Writes what the transport takes now, without waiting: the bytes taken, 0 if none.
    fn try_write(&mut self, data: &[u8]) -> io::Result<usize>;

    /// Whether bytes already taken still wait above the socket (a TLS record, a WebSocket
    /// frame): the caller then calls [`WriteSide::write_stalled`], even with nothing left.
    fn unflushed(&self) -> bool;

    /// Writes `rest` and flushes, waiting for room. Fails with `TimedOut` when the transport
    /// accepts no byte for `timeout`: a client that does not read would otherwise hold the
    /// connection, and everything queued for it, forever.
    fn write_stalled<'a>(
        &'a mut self,
        rest: &'a [u8],
        timeout: Duration,
    ) -> impl Future<Output = io::Result<()>> + Send + 'a;

    /// Closes the sending direction once everything written is out (TCP FIN, TLS
    /// close_notify, WebSocket Close). Bounded in time.
    fn shutdown(&mut self) -> impl Future<Output = ()> + Send + '_;
}

/// Adapts a connection's read reservation: doubles it while reads fill it, halves it when
/// they use under a quarter.
fn adapt(chunk: &mut usize, n: usize, room: usize) {
    if n == room {
        *chunk = (*chunk * 2).min(MAX_READ);
    } else if n < room / 4 {
        *chunk = (*chunk / 2).max(MIN_READ);
    }
}

/// Reserves for the next read: `chunk` when less than half of it is free.
fn reserve(buf: &mut BytesMut, chunk: usize) -> usize {
    if buf.capacity() - buf.len() < chunk / 2 {
        buf.reserve(chunk);
    }
    buf.capacity() - buf.len()
}

impl Transport for TcpStream {
    type Read<'a> = ReadHalf<'a>;
    type Write<'a> = WriteHalf<'a>;

    /// Borrowed halves: `into_split` would put the stream in an `Arc` (another allocation per
    /// connection) for nothing, since both halves live in the connection's task.
    fn halves(&mut self) -> (ReadHalf<'_>, WriteHalf<'_>) {
        self.split()
    }
}

impl ReadSide for ReadHalf<'_> {
    /// Readiness first, then the buffer: an idle TCP connection holds no read buffer.
    fn poll_read_some(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
        chunk: &mut usize,
    ) -> Poll<io::Result<usize>> {
        loop {
            std::task::ready!(self.as_ref().poll_read_ready(cx))?;
            let room = reserve(buf, *chunk);
            match self.try_read_buf(buf) {
                Ok(n) => {
                    adapt(chunk, n, room);
                    return Poll::Ready(Ok(n));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // The readiness was stale (tokio clears it only on WouldBlock; the read
                    // after every CONNECT ends here). Do not wait holding an empty
                    // reservation: that was ~500 bytes in every idle connection.
                    if buf.is_empty() {
                        *buf = BytesMut::new();
                    }
                }
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    fn peer_addr(&self) -> Option<SocketAddr> {
        ReadHalf::peer_addr(self).ok()
    }

    fn poll_discard(
        &mut self,
        cx: &mut Context<'_>,
        scratch: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            std::task::ready!(self.as_ref().poll_read_ready(cx))?;
            match self.try_read(scratch) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                done => return Poll::Ready(done),
            }
        }
    }
}

impl WriteSide for WriteHalf<'_> {
    fn try_write(&mut self, data: &[u8]) -> io::Result<usize> {
        match WriteHalf::try_write(self, data) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
            done => done,
        }
    }

    fn unflushed(&self) -> bool {
        false
    }

    async fn write_stalled(&mut self, mut rest: &[u8], timeout: Duration) -> io::Result<()> {
        {
            let mut deadline = Instant::now() + timeout;
            while !rest.is_empty() {
                match tokio::time::timeout_at(deadline, self.writable()).await {
                    Ok(ready) => ready?,
                    Err(_) => return Err(io::ErrorKind::TimedOut.into()),
                }
                match WriteHalf::try_write(self, rest) {
                    Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(n) => {
                        rest = &rest[n..];
                        deadline = Instant::now() + timeout;
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => return Err(e),
                }
            }
            Ok(())
        }
    }

    /// A TCP half-close does not wait.
    async fn shutdown(&mut self) {
        let _ = AsyncWriteExt::shutdown(self).await;
    }
}

/// How long closing a buffered transport (TLS close_notify, WebSocket Close) may wait for
/// room in the socket.
const SHUTDOWN_TIME: Duration = Duration::from_secs(5);

/// Any byte stream, split in two with `tokio::io::split` (a lock both halves share; both
/// live in one task, so it is never contended).
pub(crate) struct Split<S> {
    read: StreamRead<S>,
    write: StreamWrite<S>,
}

impl<S: AsyncRead + AsyncWrite + Send> Split<S> {
    /// `peer`: the client's address (the stream may not know it).
    pub(crate) fn new(stream: S, peer: SocketAddr) -> Self {
        let (rd, wr) = tokio::io::split(stream);
        Split {
            read: StreamRead { rd, peer },
            write: StreamWrite {
                wr,
                unflushed: false,
            },
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Send> Transport for Split<S> {
    type Read<'a>
        = &'a mut StreamRead<S>
    where
        S: 'a;
    type Write<'a>
        = &'a mut StreamWrite<S>
    where
        S: 'a;

    fn halves(&mut self) -> (Self::Read<'_>, Self::Write<'_>) {
        (&mut self.read, &mut self.write)
    }
}

pub(crate) struct StreamRead<S> {
    rd: tokio::io::ReadHalf<S>,
    peer: SocketAddr,
}

pub(crate) struct StreamWrite<S> {
    wr: tokio::io::WriteHalf<S>,
    /// Bytes were taken but their flush has not completed.
    unflushed: bool,
}

impl<S: AsyncRead + AsyncWrite + Send> ReadSide for &mut StreamRead<S> {
    /// The stream has no readiness of its own (TLS may hold decrypted bytes, a WebSocket
    /// message the rest of a frame), so the reservation is made before reading, and freed
    /// again when the read has to wait on an empty buffer.
    fn poll_read_some(
        &mut self,
        cx: &mut Context<'_>,
        buf: &mut BytesMut,
        chunk: &mut usize,
    ) -> Poll<io::Result<usize>> {
        let room = reserve(buf, *chunk);
        // `read_buf`'s future holds nothing but its two references: made anew on each poll.
        match std::pin::pin!(self.rd.read_buf(buf)).poll(cx) {
            Poll::Ready(Ok(n)) => {
                adapt(chunk, n, room);
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                if buf.is_empty() {
                    *buf = BytesMut::new();
                }
                Poll::Pending
            }
        }
    }

    fn peer_addr(&self) -> Option<SocketAddr> {
        Some(self.peer)
    }

    fn poll_discard(
        &mut self,
        cx: &mut Context<'_>,
        scratch: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let mut rb = ReadBuf::new(scratch);
        std::task::ready!(Pin::new(&mut self.rd).poll_read(cx, &mut rb))?;
        Poll::Ready(Ok(rb.filled().len()))
    }
}

impl<S: AsyncRead + AsyncWrite + Send> WriteSide for &mut StreamWrite<S> {
    /// Polled with a no-op waker: what it does not take now, `write_stalled` waits for with
    /// the task's own waker.
    fn try_write(&mut self, data: &[u8]) -> io::Result<usize> {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let n = match Pin::new(&mut self.wr).poll_write(&mut cx, data) {
            Poll::Ready(Ok(n)) => n,
            Poll::Ready(Err(e)) => return Err(e),
            Poll::Pending => 0,
        };
        if n > 0 {
            self.unflushed = true;
        }
        if self.unflushed {
            match Pin::new(&mut self.wr).poll_flush(&mut cx) {
                Poll::Ready(Ok(())) => self.unflushed = false,
                Poll::Ready(Err(e)) => return Err(e),
                Poll::Pending => {}
            }
        }
        Ok(n)
    }

    fn unflushed(&self) -> bool {
        self.unflushed
    }

    async fn write_stalled(&mut self, mut rest: &[u8], timeout: Duration) -> io::Result<()> {
        {
            let mut deadline = Instant::now() + timeout;
            while !rest.is_empty() {
                match tokio::time::timeout_at(deadline, self.wr.write(rest)).await {
                    Ok(Ok(0)) => return Err(io::ErrorKind::WriteZero.into()),
                    Ok(Ok(n)) => {
                        rest = &rest[n..];
                        deadline = Instant::now() + timeout;
                    }
                    Ok(Err(e)) => return Err(e),
                    Err(_) => return Err(io::ErrorKind::TimedOut.into()),
                }
            }
            match tokio::time::timeout_at(deadline, self.wr.flush()).await {
                Ok(Ok(())) => {
                    self.unflushed = false;
                    Ok(())
                }
                Ok(Err(e)) => Err(e),
                Err(_) => Err(io::ErrorKind::TimedOut.into()),
            }
        }
    }

    async fn shutdown(&mut self) {
        let _ = tokio::time::timeout(SHUTDOWN_TIME, self.wr.shutdown()).await;
    }
}
