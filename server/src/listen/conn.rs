//! One connection: the TLS handshake under its deadline (or until evicted), then HTTP/2 until
//! the peer leaves, the connection sits without a stream for the idle timeout, or the server
//! shuts down.

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tonic::codegen::Service;
use tracing::{debug, warn};

use super::admit::Ticket;
use super::{ConnInfo, Listener};
use crate::throttle::LogEvery;

pub(super) async fn serve(
    tcp: TcpStream,
    peer: SocketAddr,
    mut ticket: Ticket,
    cfg: Arc<Listener>,
    log: Arc<LogEvery>,
    mut shutdown: watch::Receiver<bool>,
) {
    let limits = cfg.admission.limits().clone();
    let io = Watched {
        inner: tcp,
        progressed: ticket.progressed.clone(),
    };
    let acceptor = TlsAcceptor::from(cfg.tls.config());
    let tls = tokio::select! {
        r = tokio::time::timeout(limits.handshake_timeout, acceptor.accept(io)) => match r {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return refuse(&cfg, &log, peer, "tls", &e.to_string()),
            Err(_) => return refuse(&cfg, &log, peer, "handshake-timeout", "handshake timed out"),
        },
        // Counted where the eviction was decided.
        _ = &mut ticket.evicted => return,
        _ = shutdown.changed() => return,
    };
    if !ticket.established() {
        return;
    }
    let certs = tls
        .get_ref()
        .1
        .peer_certificates()
        .map(|c| Arc::new(c.iter().map(|c| c.clone().into_owned()).collect()));
    let info = ConnInfo {
        remote: peer,
        certs,
    };
    let (active, mut active_rx) = watch::channel(0usize);
    let active = Arc::new(active);
    let routes = cfg.routes.clone();
    let svc = hyper::service::service_fn(move |mut req: http::Request<Incoming>| {
        req.extensions_mut().insert(info.clone());
        let open = Open::new(active.clone());
        let mut routes = routes.clone();
        async move {
            let resp = routes.call(req).await?;
            Ok::<_, Infallible>(resp.map(|body| Tracked { body, _open: open }))
        }
    });
    let h = &cfg.http2;
    let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .initial_stream_window_size(h.stream_window)
        .initial_connection_window_size(h.connection_window)
        .adaptive_window(false)
        .max_frame_size(h.max_frame_size)
        .max_send_buf_size(h.max_send_buf_size)
        .header_table_size(h.header_table_size)
        .max_header_list_size(h.max_header_list_size)
        .max_concurrent_streams(limits.max_streams_per_connection)
        .keep_alive_interval(h.keepalive_interval)
        .keep_alive_timeout(h.keepalive_timeout);
    let conn = builder.serve_connection(TokioIo::new(tls), svc);
    tokio::pin!(conn);
    let idle = tokio::time::sleep(limits.idle_timeout);
    tokio::pin!(idle);
    let mut closing = false;
    loop {
        let streams = *active_rx.borrow_and_update();
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    debug!(%peer, error = %e, "connection ended");
                }
                return;
            }
            r = active_rx.changed() => {
                if r.is_ok() && *active_rx.borrow() == 0 {
                    idle.as_mut().reset(tokio::time::Instant::now() + limits.idle_timeout);
                }
            }
            _ = &mut idle, if streams == 0 && !closing => {
                closing = true;
                cfg.metrics.disconnected("idle");
                debug!(%peer, "closing a connection idle for {:?}", limits.idle_timeout);
                conn.as_mut().graceful_shutdown();
            }
            _ = shutdown.changed(), if !closing => {
                closing = true;
                conn.as_mut().graceful_shutdown();
            }
        }
    }
}

fn refuse(cfg: &Listener, log: &LogEvery, peer: SocketAddr, reason: &'static str, why: &str) {
    cfg.metrics.refused(reason);
    if let Some(n) = log.tick(reason) {
        warn!(listener = cfg.name, %peer, reason = why, refused = n, "refused a TLS connection");
    }
}

/// A stream open on the connection, from request to the end of its response body.
struct Open(Arc<watch::Sender<usize>>);

impl Open {
    fn new(active: Arc<watch::Sender<usize>>) -> Open {
        active.send_modify(|n| *n += 1);
        Open(active)
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n -= 1);
    }
}

/// A response body that keeps its stream counted as open while it lives.
struct Tracked<B> {
    body: B,
    _open: Open,
}

impl<B: Body + Unpin> Body for Tracked<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The TCP stream, noting its first byte received: a handshake that has sent nothing is
/// the first to be evicted when the table is full.
struct Watched {
    inner: TcpStream,
    progressed: Arc<AtomicBool>,
}

impl AsyncRead for Watched {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.progressed.store(true, Ordering::Relaxed);
        }
        r
    }
}

impl AsyncWrite for Watched {
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
