//! The HTTP/1.1 server: accept loop, connection limit, per-connection
//! deadlines, optional TLS, graceful shutdown.
//!
//! `axum::serve` has no deadlines and no connection limit: a client that
//! opens connections and sends a header byte now and then (slowloris)
//! holds them, and the file descriptors behind them, for ever. Here each
//! connection is always in one of three phases, each with its own clock:
//!
//! - *head*: from the connection's start (TLS handshake included), or from
//!   the first byte after an idle spell, until the request head is
//!   complete: `http.header_timeout_ms`. A deadline, not an inactivity
//!   timer, so dripping bytes does not extend it;
//! - *busy*: a request in flight, from its complete head to the end of its
//!   response. No connection deadline (an SSE stream lasts), but the
//!   request body must be complete within `http.body_timeout_ms` of the
//!   head, else the request answers 408 `body_timeout`;
//! - *idle*: between requests on a keep-alive connection:
//!   `http.idle_timeout_ms`.
//!
//! A connection past its phase's deadline is closed. hyper's own
//! `header_read_timeout` is not used: it also runs while a connection is
//! idle, so it cannot tell the head and idle clocks apart.
//!
//! At most `http.max_connections` connections are served at once; one more
//! is closed as soon as it is accepted (it costs a file descriptor for
//! that instant only) and counted. On shutdown the listener closes, idle
//! connections close, and requests in flight finish, which `App::shutdown`
//! waits for.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Context as _;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::ConnectInfo;
use hyper::body::{Frame, Incoming, SizeHint};
use hyper_util::rt::TokioIo;
use prometheus::core::Collector;
use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, Semaphore, watch};
use tokio::time::{Instant, Sleep};
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

use crate::config::HttpConfig;
use crate::telemetry::metrics::Metrics;

/// After an accept error that is not about one connection (out of file
/// descriptors, say), wait this long before accepting again rather than
/// spinning on the error.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// Registers `c` in `registry`. A second instance on the same registry (a
/// test restarting on one `Metrics`) keeps its counters unexported rather
/// than failing to start.
pub(crate) fn register<C: Collector + Clone + 'static>(registry: &Registry, c: C) {
    if let Err(e) = registry.register(Box::new(c)) {
        tracing::debug!(error = %e, "HTTP server metric already registered");
    }
}

/// The server's own metrics (connections, not requests).
#[derive(Clone)]
struct ServerMetrics {
    open: IntGauge,
    refused: IntCounter,
    /// By phase: `header`, `idle`, `body`, `tls_handshake`.
    timeouts: IntCounterVec,
    tls_failures: IntCounter,
}

impl ServerMetrics {
    fn new(registry: &Registry) -> ServerMetrics {
        let m = ServerMetrics {
            open: IntGauge::new(
                "orderflow_http_connections_open",
                "HTTP connections open now",
            )
            .expect("valid gauge"),
            refused: IntCounter::new(
                "orderflow_http_connections_refused_total",
                "HTTP connections closed at accept because http.max_connections were open",
            )
            .expect("valid counter"),
            timeouts: IntCounterVec::new(
                Opts::new(
                    "orderflow_http_timeouts_total",
                    "HTTP connections closed (or requests refused, body) past a deadline, by phase",
                ),
                &["phase"],
            )
            .expect("valid counter"),
            tls_failures: IntCounter::new(
                "orderflow_http_tls_handshake_failures_total",
                "TLS handshakes that failed (not TLS, no shared version or cipher, ...)",
            )
            .expect("valid counter"),
        };
        register(registry, m.open.clone());
        register(registry, m.refused.clone());
        register(registry, m.timeouts.clone());
        register(registry, m.tls_failures.clone());
        m
    }
}

#[derive(Clone, Copy)]
struct Timeouts {
    header: Duration,
    body: Duration,
    idle: Duration,
}

/// A configured server, not yet listening.
pub struct Server {
    timeouts: Timeouts,
    max_connections: usize,
    tls: Option<TlsAcceptor>,
    metrics: ServerMetrics,
}

/// What every connection task shares.
struct Shared {
    timeouts: Timeouts,
    tls: Option<TlsAcceptor>,
    metrics: ServerMetrics,
    router: Router,
}

impl Server {
    /// Reads the TLS certificate and key when `[http.tls]` is set, so a
    /// bad file fails the start, not the first client.
    pub fn new(config: &HttpConfig, metrics: &Metrics) -> anyhow::Result<Server> {
        let tls = match &config.tls {
            Some(t) => Some(super::tls::acceptor(t).context("cannot set up TLS ([http.tls])")?),
            None => None,
        };
        Ok(Server {
            timeouts: Timeouts {
                header: Duration::from_millis(config.header_timeout_ms),
                body: Duration::from_millis(config.body_timeout_ms),
                idle: Duration::from_millis(config.idle_timeout_ms),
            },
            max_connections: config.max_connections,
            tls,
            metrics: ServerMetrics::new(&metrics.registry),
        })
    }

    /// True when the listener speaks HTTPS only.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Serves `router` on `listener` until `stop` completes, then waits
    /// for the requests in flight to finish.
    pub async fn serve(
        self,
        listener: TcpListener,
        router: Router,
        stop: impl Future<Output = ()> + Send,
    ) -> std::io::Result<()> {
        let shared = Arc::new(Shared {
            timeouts: self.timeouts,
            tls: self.tls,
            metrics: self.metrics,
            router,
        });
        // A connection holds a permit for its whole life, so taking them
        // all back at the end means every connection has closed.
        let permits = Arc::new(Semaphore::new(self.max_connections));
        let (stop_tx, stop_rx) = watch::channel(false);
        let mut stop = pin!(stop);
        loop {
            let accepted = tokio::select! {
                r = listener.accept() => r,
                () = &mut stop => break,
            };
            let (tcp, peer) = match accepted {
                Ok(a) => a,
                Err(e) if is_connection_error(&e) => continue,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::select! {
                        () = tokio::time::sleep(ACCEPT_ERROR_BACKOFF) => continue,
                        () = &mut stop => break,
                    }
                }
            };
            let Ok(permit) = permits.clone().try_acquire_owned() else {
                shared.metrics.refused.inc();
                drop(tcp);
                continue;
            };
            let (shared, stop_rx) = (shared.clone(), stop_rx.clone());
            tokio::spawn(async move {
                connection(&shared, tcp, peer, stop_rx).await;
                // The router (and the app state it holds: the state store
                // among it) goes before the permit: once `serve` has every
                // permit back, no connection holds any of it, so a restart
                // in the same process can open the store again.
                drop(shared);
                drop(permit);
            });
        }
        drop(listener);
        stop_tx.send_replace(true);
        let all = u32::try_from(self.max_connections).unwrap_or(u32::MAX);
        let _ = permits.acquire_many(all).await;
        Ok(())
    }
}

/// Errors of one accepted connection (the peer gave up before accept):
/// the listener itself is fine.
fn is_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    )
}

/// One connection, from accept to close.
async fn connection(
    shared: &Shared,
    tcp: TcpStream,
    peer: SocketAddr,
    mut stop: watch::Receiver<bool>,
) {
    let metrics = &shared.metrics;
    metrics.open.inc();
    let _open = scopeguard(|| metrics.open.dec());
    let clock = Arc::new(ConnClock::new());
    let Some(acceptor) = &shared.tls else {
        return serve_io(shared, tcp, peer, clock, stop).await;
    };
    let head_deadline = clock.deadline(&shared.timeouts).map(|d| d.0);
    let handshake = async {
        match head_deadline {
            Some(d) => tokio::time::timeout_at(d, acceptor.accept(tcp)).await,
            None => Ok(acceptor.accept(tcp).await),
        }
    };
    let tls = tokio::select! {
        r = handshake => r,
        _ = stop.wait_for(|s| *s) => return,
    };
    match tls {
        Ok(Ok(stream)) => serve_io(shared, stream, peer, clock, stop).await,
        Ok(Err(e)) => {
            metrics.tls_failures.inc();
            tracing::debug!(%peer, error = %e, "TLS handshake failed");
        }
        Err(_) => metrics.timeouts.with_label_values(&["tls_handshake"]).inc(),
    }
}

/// Serves HTTP/1.1 on `io` until the peer closes, a deadline passes or
/// shutdown lets the request in flight finish.
async fn serve_io<I>(
    shared: &Shared,
    io: I,
    peer: SocketAddr,
    clock: Arc<ConnClock>,
    mut stop: watch::Receiver<bool>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let timeouts = shared.timeouts;
    let service = {
        let router = shared.router.clone();
        let clock = clock.clone();
        let body_timeouts = shared.metrics.timeouts.with_label_values(&["body"]);
        hyper::service::service_fn(move |req: hyper::Request<Incoming>| {
            let busy = Busy::begin(clock.clone());
            let deadline = Instant::now() + timeouts.body;
            let counter = body_timeouts.clone();
            let mut req = req.map(|b| Body::new(DeadlineBody::new(b, deadline, counter)));
            req.extensions_mut().insert(ConnectInfo(peer));
            let router = router.clone();
            async move {
                let res = router.oneshot(req).await.unwrap_or_else(|e| match e {});
                Ok::<_, Infallible>(res.map(|inner| TrackedBody { inner, _busy: busy }))
            }
        })
    };
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder.header_read_timeout(None);
    let io = TokioIo::new(TimedIo {
        inner: io,
        clock: clock.clone(),
    });
    let mut conn = pin!(builder.serve_connection(io, service));
    let mut shutting_down = false;
    loop {
        let deadline = clock.deadline(&timeouts);
        let changed = clock.changed.notified();
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
                }
                return;
            }
            () = changed => {}
            () = sleep_until(deadline.map(|d| d.0)) => {
                if let Some((at, phase)) = clock.deadline(&timeouts)
                    && Instant::now() >= at
                {
                    shared.metrics.timeouts.with_label_values(&[phase]).inc();
                    tracing::debug!(%peer, phase, "HTTP connection closed past its deadline");
                    return;
                }
            }
            _ = stop.wait_for(|s| *s), if !shutting_down => {
                conn.as_mut().graceful_shutdown();
                shutting_down = true;
            }
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Runs `f` when dropped.
fn scopeguard<F: FnOnce()>(f: F) -> impl Drop {
    struct Guard<F: FnOnce()>(Option<F>);
    impl<F: FnOnce()> Drop for Guard<F> {
        fn drop(&mut self) {
            if let Some(f) = self.0.take() {
                f();
            }
        }
    }
    Guard(Some(f))
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Phase {
    /// Waiting for a request head since this instant.
    Head(Instant),
    /// Requests in flight (hyper serves one at a time per connection).
    Busy(u32),
    /// Between requests since this instant.
    Idle(Instant),
}

/// A connection's phase. Touched only from its own task (reads, the
/// service and the response body all run inside the connection future),
/// so the lock is never contended.
struct ConnClock {
    phase: Mutex<Phase>,
    /// Woken when a deadline appears or moves earlier.
    changed: Notify,
}

impl ConnClock {
    fn new() -> ConnClock {
        ConnClock {
            phase: Mutex::new(Phase::Head(Instant::now())),
            changed: Notify::new(),
        }
    }

    fn with<R>(&self, f: impl FnOnce(&mut Phase) -> R) -> R {
        f(&mut self.phase.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// The current phase's deadline and its name.
    fn deadline(&self, t: &Timeouts) -> Option<(Instant, &'static str)> {
        match self.with(|p| *p) {
            Phase::Head(since) => Some((since + t.header, "header")),
            Phase::Idle(since) => Some((since + t.idle, "idle")),
            Phase::Busy(_) => None,
        }
    }

    /// Bytes arrived: after an idle spell they start a request head.
    fn on_read(&self) {
        let started = self.with(|p| match p {
            Phase::Idle(_) => {
                *p = Phase::Head(Instant::now());
                true
            }
            _ => false,
        });
        if started {
            self.changed.notify_one();
        }
    }

    fn begin_request(&self) {
        self.with(|p| {
            *p = match *p {
                Phase::Busy(n) => Phase::Busy(n + 1),
                _ => Phase::Busy(1),
            }
        });
    }

    fn end_request(&self) {
        let idle = self.with(|p| match *p {
            Phase::Busy(n) if n > 1 => {
                *p = Phase::Busy(n - 1);
                false
            }
            _ => {
                *p = Phase::Idle(Instant::now());
                true
            }
        });
        if idle {
            self.changed.notify_one();
        }
    }
}

/// A request in flight, from its head until its response body is done
/// (hyper drops the body once it has taken its last frame) or the request
/// is abandoned.
struct Busy(Arc<ConnClock>);

impl Busy {
    fn begin(clock: Arc<ConnClock>) -> Busy {
        clock.begin_request();
        Busy(clock)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.end_request();
    }
}

/// The response body, holding the request's [`Busy`] mark.
struct TrackedBody {
    inner: Body,
    _busy: Busy,
}

impl http_body::Body for TrackedBody {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The error a request body yields past `http.body_timeout_ms`.
#[derive(Debug)]
pub struct BodyTimeout;

impl std::fmt::Display for BodyTimeout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("request body not received in time")
    }
}

impl std::error::Error for BodyTimeout {}

/// True if a body read failed because of [`BodyTimeout`].
pub fn is_body_timeout(e: &axum::Error) -> bool {
    std::error::Error::source(e).is_some_and(|s| s.is::<BodyTimeout>())
}

/// A request body that fails with [`BodyTimeout`] once its deadline has
/// passed. The timer is armed only if the body is not already complete.
struct DeadlineBody {
    inner: Incoming,
    deadline: Instant,
    sleep: Option<Pin<Box<Sleep>>>,
    timeouts: IntCounter,
    expired: bool,
}

impl DeadlineBody {
    fn new(inner: Incoming, deadline: Instant, timeouts: IntCounter) -> DeadlineBody {
        DeadlineBody {
            inner,
            deadline,
            sleep: None,
            timeouts,
            expired: false,
        }
    }
}

impl http_body::Body for DeadlineBody {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::BoxError>>> {
        let this = self.get_mut();
        if this.expired {
            return Poll::Ready(Some(Err(Box::new(BodyTimeout))));
        }
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            return Poll::Ready(frame.map(|r| r.map_err(Into::into)));
        }
        let deadline = this.deadline;
        let sleep = this
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if sleep.as_mut().poll(cx).is_ready() {
            this.expired = true;
            this.timeouts.inc();
            return Poll::Ready(Some(Err(Box::new(BodyTimeout))));
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The connection's byte stream, telling its clock when bytes arrive.
struct TimedIo<I> {
    inner: I,
    clock: Arc<ConnClock>,
}

impl<I: AsyncRead + Unpin> AsyncRead for TimedIo<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let r = Pin::new(&mut this.inner).poll_read(cx, buf);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.clock.on_read();
        }
        r
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for TimedIo<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Timeouts = Timeouts {
        header: Duration::from_millis(100),
        body: Duration::from_millis(200),
        idle: Duration::from_millis(300),
    };

    /// A connection's deadline follows its phase: the head clock from the
    /// start, none while a request is in flight, the idle clock after it,
    /// and the head clock again from the first byte of the next request.
    #[tokio::test(start_paused = true)]
    async fn phases_and_deadlines() {
        let start = Instant::now();
        let c = Arc::new(ConnClock::new());
        assert_eq!(c.deadline(&T), Some((start + T.header, "header")));
        // Bytes of the first head do not move its deadline (slowloris).
        tokio::time::advance(Duration::from_millis(50)).await;
        c.on_read();
        assert_eq!(c.deadline(&T), Some((start + T.header, "header")));
        let busy = Busy::begin(c.clone());
        assert_eq!(c.deadline(&T), None);
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(c.deadline(&T), None, "a long response is not timed out");
        let done = Instant::now();
        drop(busy);
        assert_eq!(c.deadline(&T), Some((done + T.idle, "idle")));
        tokio::time::advance(Duration::from_millis(10)).await;
        c.on_read();
        let head = Instant::now();
        assert_eq!(c.deadline(&T), Some((head + T.header, "header")));
        tokio::time::advance(Duration::from_millis(10)).await;
        c.on_read();
        assert_eq!(c.deadline(&T), Some((head + T.header, "header")));
    }

    /// An abandoned request (its handler dropped) ends its busy phase too.
    #[tokio::test(start_paused = true)]
    async fn abandoned_request_goes_idle() {
        let c = Arc::new(ConnClock::new());
        let fut = {
            let busy = Busy::begin(c.clone());
            async move {
                let _busy = busy;
                std::future::pending::<()>().await
            }
        };
        assert_eq!(c.deadline(&T), None);
        drop(fut);
        assert!(matches!(c.deadline(&T), Some((_, "idle"))));
    }
}
