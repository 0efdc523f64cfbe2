//! The HTTP side of `/metrics`: hyper's HTTP/1.1 server on a current-thread tokio runtime of its
//! own thread.
//!
//! Every connection is a task, so an idle or slow client never delays another's scrape, and
//! every connection is bounded in size and in time:
//! - request head (request line and headers): at most [`MAX_HEAD_BYTES`] and [`MAX_HEADERS`]
//!   headers, else `431`/`414` and the connection is closed;
//! - a request head must arrive within [`HEADER_TIMEOUT`] of the connection's start or of the
//!   previous response (this also closes idle keep-alive connections), else the connection is
//!   closed;
//! - a response the client stops reading for [`WRITE_STALL_TIMEOUT`] closes the connection;
//! - at most [`MAX_CONNECTIONS`] connections at once; further ones wait in the listen backlog
//!   until one closes (the timeouts above close any connection that is not actively scraping).
//!
//! Rendering ([`super::render`]) is synchronous and runs on the runtime thread: scrapes
//! serialize only behind other renders (milliseconds), never behind a waiting client.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::time::Sleep;

use super::{render, Sources};

/// Time a client has to send a complete request head, counted from the connection's start or
/// from the end of the previous response (so it is also the keep-alive idle timeout).
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(5);
/// Time a response may wait for the client to read before the connection is closed.
pub const WRITE_STALL_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest request head (request line plus headers) read into memory, in bytes.
pub const MAX_HEAD_BYTES: usize = 16 * 1024;
/// Most headers one request may carry.
pub const MAX_HEADERS: usize = 64;
/// Most connections served at once (each costs a descriptor of the server's process).
pub const MAX_CONNECTIONS: usize = 64;

/// Content type of the text exposition format.
const METRICS_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The listening socket, kept to hand to the next server at a live upgrade.
pub(crate) static LISTENER: std::sync::OnceLock<std::os::fd::OwnedFd> = std::sync::OnceLock::new();

/// Binds `addr` and serves `/metrics` from a thread of its own. `None` (logged) when the
/// address cannot be bound or the thread cannot start: the mount matters more than its metrics.
/// `inherited`: the listener a previous server of the mount handed over (not bound again).
pub fn start(addr: SocketAddr, sources: Sources, inherited: Option<StdListener>) -> Option<SocketAddr> {
    let bound = match inherited {
        Some(l) => Ok(l),
        None => StdListener::bind(addr),
    };
    let listener = match bound {
        Ok(l) => l,
        Err(e) => {
            log::warn!("metrics endpoint disabled: cannot listen on {addr}: {e} (set metrics.addr)");
            return None;
        }
    };
    if let Ok(dup) = listener.try_clone() {
        let _ = LISTENER.set(std::os::fd::OwnedFd::from(dup));
    }
    let local = listener.local_addr().ok()?;
    let runtime = listener
        .set_nonblocking(true)
        .and_then(|()| tokio::runtime::Builder::new_current_thread().enable_io().enable_time().build());
    let runtime = match runtime {
        Ok(r) => r,
        Err(e) => {
            log::warn!("metrics endpoint disabled: {e}");
            return None;
        }
    };
    let sources = Arc::new(sources);
    let spawned = std::thread::Builder::new().name("ringfs-metrics".into()).spawn(move || {
        runtime.block_on(async move {
            match TcpListener::from_std(listener) {
                Ok(l) => serve(l, sources).await,
                Err(e) => log::warn!("metrics endpoint disabled: {e}"),
            }
        })
    });
    if let Err(e) = spawned {
        log::warn!("metrics endpoint disabled: {e}");
        return None;
    }
    log::info!("metrics: listening on http://{local}/metrics");
    Some(local)
}

/// Accepts connections forever, one task each, at most [`MAX_CONNECTIONS`] at once.
async fn serve(listener: TcpListener, sources: Arc<Sources>) {
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(MAX_HEAD_BYTES)
        .max_headers(MAX_HEADERS)
        .keep_alive(true)
        .half_close(false);
    loop {
        let Ok(slot) = slots.clone().acquire_owned().await else { return };
        let stream = match listener.accept().await {
            Ok((s, _)) => s,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning; the mount's own descriptors
                // come first.
                log::debug!("metrics accept: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let io = TokioIo::new(WriteDeadline::new(stream, WRITE_STALL_TIMEOUT));
        let sources = sources.clone();
        let conn = http.serve_connection(
            io,
            hyper::service::service_fn(move |req| {
                let sources = sources.clone();
                async move { Ok::<_, Infallible>(respond(&req, &sources)) }
            }),
        );
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                log::debug!("metrics connection: {e}");
            }
            drop(slot);
        });
    }
}

/// The answer to one request.
fn respond(req: &Request<Incoming>, sources: &Sources) -> Response<String> {
    let reply = |status: StatusCode, ctype: &'static str, body: String| {
        let mut r = Response::new(body);
        *r.status_mut() = status;
        r.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static(ctype));
        r
    };
    match (req.uri().path(), req.method()) {
        // hyper sends HEAD's headers (with the Content-Length of the body) and drops the body.
        ("/metrics", &Method::GET | &Method::HEAD) => reply(StatusCode::OK, METRICS_TYPE, render(sources)),
        ("/metrics", _) => {
            let mut r = reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "GET or HEAD\n".into());
            r.headers_mut().insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
            r
        }
        ("/", &Method::GET | &Method::HEAD) => {
            reply(StatusCode::OK, "text/html", "<a href=\"/metrics\">/metrics</a>\n".into())
        }
        _ => reply(StatusCode::NOT_FOUND, "text/plain", "not found\n".into()),
    }
}

/// A TCP stream whose writes fail with `TimedOut` after `limit` without progress, so a client
/// that stops reading cannot hold its connection (and its slot) forever.
struct WriteDeadline {
    stream: TcpStream,
    limit: Duration,
    /// Armed while a write is pending; cleared by any progress.
    stall: Option<Pin<Box<Sleep>>>,
}

impl WriteDeadline {
    fn new(stream: TcpStream, limit: Duration) -> Self {
        WriteDeadline { stream, limit, stall: None }
    }

    /// Passes `res` on, arming the stall timer on `Pending` and failing once it expires.
    fn watch<T>(&mut self, cx: &mut Context<'_>, res: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if res.is_ready() {
            self.stall = None;
            return res;
        }
        let limit = self.limit;
        let stall = self.stall.get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match stall.as_mut().poll(cx) {
            Poll::Ready(()) => {
                Poll::Ready(Err(io::Error::new(io::ErrorKind::TimedOut, "metrics client stopped reading")))
            }
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncRead for WriteDeadline {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for WriteDeadline {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let res = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.watch(cx, res)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let res = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.watch(cx, res)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let res = Pin::new(&mut self.stream).poll_flush(cx);
        self.watch(cx, res)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let res = Pin::new(&mut self.stream).poll_shutdown(cx);
        self.watch(cx, res)
    }
}
