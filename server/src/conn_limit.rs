//! Bounds on open client connections, for the gRPC port, the HTTP admin port and the streams
//! port.
//!
//! Every connection holds a file descriptor; with no bound, enough clients run the process out
//! of descriptors, and the next WAL segment could not be opened. Over the bound a new connection
//! is accepted and closed at once (the client sees its connection closed and tries another
//! node), counted in `raftwal_server_connections_refused_total{port}` and logged at most once a
//! second. A failed accept (EMFILE, ENFILE) is counted and retried after a pause, so it never
//! spins a core.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_stream::wrappers::ReceiverStream;

/// A connection that counts against its port's bound while it is open.
#[derive(Debug)]
pub struct Limited {
    inner: TcpStream,
    _permit: OwnedSemaphorePermit,
}

impl AsyncRead for Limited {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for Limited {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for Limited {
    type ConnectInfo = tonic::transport::server::TcpConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// Accepts on `listener` with at most `max` connections open, TCP_NODELAY on each (responses
/// must not wait for Nagle's algorithm and the peer's delayed ACK). `port` names it in metrics
/// and logs.
#[derive(Debug)]
struct Acceptor {
    listener: TcpListener,
    permits: Arc<Semaphore>,
    max: usize,
    port: &'static str,
    last_log: Option<tokio::time::Instant>,
}

impl Acceptor {
    fn new(listener: TcpListener, max: usize, port: &'static str) -> Acceptor {
        Acceptor { listener, permits: Arc::new(Semaphore::new(max)), max, port, last_log: None }
    }

    /// Whether to log now: at most once a second.
    fn may_log(&mut self) -> bool {
        let now = tokio::time::Instant::now();
        let due = self.last_log.is_none_or(|t| now.duration_since(t) >= Duration::from_secs(1));
        if due {
            self.last_log = Some(now);
        }
        due
    }

    async fn accept(&mut self) -> (Limited, std::net::SocketAddr) {
        loop {
            match self.listener.accept().await {
                Ok((stream, addr)) => {
                    let Ok(permit) = self.permits.clone().try_acquire_owned() else {
                        metrics::counter!("raftwal_server_connections_refused_total", "port" => self.port)
                            .increment(1);
                        if self.may_log() {
                            tracing::warn!(
                                port = self.port,
                                max = self.max,
                                %addr,
                                "connection refused: too many open connections"
                            );
                        }
                        continue;
                    };
                    let _ = stream.set_nodelay(true);
                    return (Limited { inner: stream, _permit: permit }, addr);
                }
                Err(e) => {
                    metrics::counter!("raftwal_server_accept_errors_total", "port" => self.port)
                        .increment(1);
                    if self.may_log() {
                        tracing::warn!(port = self.port, error = %e, "accept failed; pausing");
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    }
}

/// The gRPC port's connections, as the stream tonic serves.
pub fn grpc_incoming(listener: TcpListener, max: usize) -> ReceiverStream<io::Result<Limited>> {
    let (tx, rx) = mpsc::channel(64);
    let mut acceptor = Acceptor::new(listener, max, "grpc");
    tokio::spawn(async move {
        loop {
            let (conn, _) = tokio::select! {
                accepted = acceptor.accept() => accepted,
                () = tx.closed() => return,
            };
            if tx.send(Ok(conn)).await.is_err() {
                return;
            }
        }
    });
    ReceiverStream::new(rx)
}

/// The HTTP admin port's listener for axum.
#[derive(Debug)]
pub struct HttpListener(Acceptor);

impl HttpListener {
    /// At most `max` connections open on `listener`; `port` names it in metrics and logs.
    pub fn new(listener: TcpListener, max: usize, port: &'static str) -> HttpListener {
        HttpListener(Acceptor::new(listener, max, port))
    }

    /// The next connection within the bound.
    pub async fn accept_limited(&mut self) -> (Limited, std::net::SocketAddr) {
        self.0.accept().await
    }
}

impl axum::serve::Listener for HttpListener {
    type Io = Limited;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Limited, std::net::SocketAddr) {
        self.0.accept().await
    }

    fn local_addr(&self) -> io::Result<std::net::SocketAddr> {
        self.0.listener.local_addr()
    }
}
