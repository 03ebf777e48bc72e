//! The accept loop every keygate listener shares (sidecar, token server, admin endpoints,
//! admission webhook): one task per connection, a bounded number of connections, timeouts for
//! clients that send nothing or too little, a back-off instead of a spin when accepting fails,
//! and a bounded drain on shutdown.
//!
//! - **Connection cap** ([`ConnectionLimits::max_connections`]): a semaphore permit is taken
//!   *before* `accept`, so at the cap new connections wait in the kernel's listen backlog
//!   (they are served, in order, as soon as an open connection closes) instead of being
//!   accepted and closed. Waiting keeps file descriptors bounded and never turns a burst into
//!   errors; a client that gives up waiting sees a connect timeout. The cap is also held below
//!   three quarters of the process's open-file limit, so the listener cannot use up the
//!   descriptors that outgoing connections (the workload, JWKS, the Kubernetes API) need.
//!   The slot goes with the socket, so an upgraded connection (a WebSocket tunnel) keeps it
//!   until the tunnel closes.
//! - **Header-read timeout** ([`ConnectionLimits::header_read_timeout`]): an HTTP/1 request
//!   head must be complete within it, counted from its first byte, else the connection is
//!   closed (hyper's `header_read_timeout`, with a timer that starts at that byte); a
//!   connection that sends nothing at all is closed after it too. A kept-alive connection
//!   waiting for its next request is governed by the idle timeout instead (as with Go's
//!   `ReadHeaderTimeout`/`IdleTimeout` or nginx's `client_header_timeout`/
//!   `keepalive_timeout`), so clients and proxies that keep connections in a pool (often
//!   60-90 s) do not race the server closing them after 10 s.
//! - **Idle timeout** ([`ConnectionLimits::idle_timeout`]): a connection with no request in
//!   flight for that long is shut down gracefully (HTTP/1 closes, HTTP/2 `GOAWAY`); if it is
//!   still open after another idle period with nothing in flight (a peer that never
//!   acknowledges, an HTTP/1 head left half-sent after a pipelined request), it is closed.
//!   This covers kept-alive connections, silent HTTP/2 connections and incomplete HTTP/2
//!   preludes. A request in flight is never cut by it, however long it takes.
//! - **Accept errors** (`EMFILE`, `ENFILE`, `ENOBUFS`, ...) pause the loop, 10 ms doubling up
//!   to 1 s, instead of spinning; errors that concern only the one connection being accepted
//!   (`ECONNABORTED`, ...) do not.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hyper::body::{Body, Frame, SizeHint};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulConnection;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;

/// Default time a client has to send a complete HTTP/1 request head.
pub const DEFAULT_HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Default time a connection may stay open with no request in flight.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default cap on concurrent connections of the sidecar and the token server.
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;
/// Default cap on concurrent connections of an admin listener (probes and scrapes).
pub const DEFAULT_ADMIN_MAX_CONNECTIONS: usize = 64;
/// Default cap on concurrent connections of the admission webhook (the API servers).
/// Default cap of the policy stream listener: one long-lived connection per sidecar that
/// follows a ScopePolicy through this replica.
pub const DEFAULT_POLICY_MAX_CONNECTIONS: usize = 16_384;
pub const DEFAULT_WEBHOOK_MAX_CONNECTIONS: usize = 1024;
/// Default time open connections may take to finish after shutdown.
pub const DEFAULT_DRAIN: Duration = Duration::from_secs(20);

/// The largest cap accepted on the command line.
const MAX_MAX_CONNECTIONS: u32 = 1_000_000;
/// First pause after a failed `accept`; it doubles on each further failure.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
/// Longest pause after failed `accept`s.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);

/// What one listener allows its clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// Time to send a complete HTTP/1 request head (also the longest wait of a kept-alive
    /// HTTP/1 connection for its next request).
    pub header_read_timeout: Duration,
    /// Time a connection may stay open with no request in flight.
    pub idle_timeout: Duration,
    /// Connections open at once; further ones wait in the listen backlog.
    pub max_connections: usize,
    /// Time open connections may take to finish after shutdown; then they are closed.
    pub drain: Duration,
}

impl Default for ConnectionLimits {
    /// 10 s header read, 60 s idle, 4096 connections, 20 s drain.
    fn default() -> Self {
        Self {
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            drain: DEFAULT_DRAIN,
        }
    }
}

impl ConnectionLimits {
    /// The same timeouts with another connection cap.
    pub fn with_max_connections(self, max_connections: usize) -> Self {
        Self {
            max_connections,
            ..self
        }
    }

    /// The same limits with another drain time.
    pub fn with_drain(self, drain: Duration) -> Self {
        Self { drain, ..self }
    }

    /// Defaults for an admin listener: 64 connections.
    pub fn admin() -> Self {
        Self::default().with_max_connections(DEFAULT_ADMIN_MAX_CONNECTIONS)
    }
}

/// The connection flags of a server process (`keygate operator`, `keygate sidecar`,
/// `keygate-sidecar`, `keygate dev`): the timeouts apply to all its listeners, the caps to
/// its main listener (token server or sidecar) and its admin listener.
#[derive(clap::Args, Debug, Clone)]
pub struct ConnectionArgs {
    /// Time a client has to send a complete HTTP/1 request head (also how long a kept-alive
    /// connection may wait for its next request); then the connection is closed.
    #[arg(long, env = "KEYGATE_HEADER_READ_TIMEOUT", default_value = "10s", value_parser = positive_duration)]
    pub header_read_timeout: Duration,
    /// Time a connection may stay open with no request in flight; then it is shut down.
    #[arg(long, env = "KEYGATE_IDLE_TIMEOUT", default_value = "60s", value_parser = positive_duration)]
    pub idle_timeout: Duration,
    /// Connections the main listener (token server or sidecar) keeps open at once; further
    /// ones wait in the listen backlog until one closes.
    #[arg(long, env = "KEYGATE_MAX_CONNECTIONS", default_value_t = 4096, value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_MAX_CONNECTIONS)))]
    pub max_connections: u32,
    /// Connections the admin listener (/healthz, /readyz, /metrics) keeps open at once.
    #[arg(long, env = "KEYGATE_ADMIN_MAX_CONNECTIONS", default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=i64::from(MAX_MAX_CONNECTIONS)))]
    pub admin_max_connections: u32,
}

impl Default for ConnectionArgs {
    fn default() -> Self {
        Self {
            header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            max_connections: DEFAULT_MAX_CONNECTIONS as u32,
            admin_max_connections: DEFAULT_ADMIN_MAX_CONNECTIONS as u32,
        }
    }
}

impl ConnectionArgs {
    /// The limits of the main listener (with the default drain time).
    pub fn limits(&self) -> ConnectionLimits {
        ConnectionLimits {
            header_read_timeout: self.header_read_timeout,
            idle_timeout: self.idle_timeout,
            max_connections: self.max_connections as usize,
            drain: DEFAULT_DRAIN,
        }
    }

    /// The limits of the admin listener.
    pub fn admin_limits(&self) -> ConnectionLimits {
        self.limits()
            .with_max_connections(self.admin_max_connections as usize)
    }
}

/// `base` plus a random part of up to `spread`: a retry pause that keeps many clients
/// (sidecars reconnecting, replicas meeting on a write) from retrying in lockstep.
pub fn jittered(base: Duration, spread: Duration) -> Duration {
    let mut byte = [0u8; 1];
    let _ = aws_lc_rs::rand::fill(&mut byte);
    base + spread.mul_f64(f64::from(byte[0]) / 256.0)
}

/// A command-line duration that must not be zero.
pub fn positive_duration(text: &str) -> Result<Duration, String> {
    let duration = crate::api::parse_duration(text)?;
    if duration.is_zero() {
        return Err(format!("{text:?} must be longer than zero"));
    }
    Ok(duration)
}

/// The most a request head (request line and headers) may take, over HTTP/1.1 and HTTP/2:
/// 64 KiB, twice nginx's default (`large_client_header_buffers 4 8k`) and far above any
/// keygate credential. A larger head gets 431. It bounds what an unauthenticated caller can
/// make each connection buffer (hyper's own default is about 400 KiB).
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// The most header fields an HTTP/1.1 request may carry (hyper's default, made explicit).
pub const MAX_HEADERS: usize = 100;

/// An HTTP/1.1 + HTTP/2 (h2c or ALPN) connection builder with the header-read timeout of
/// `limits` and the head limits [`MAX_HEAD_BYTES`] and [`MAX_HEADERS`], for connections
/// accepted by [`serve_connections`].
pub fn http_builder(limits: &ConnectionLimits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(HeaderTimer)
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(MAX_HEAD_BYTES)
        .max_headers(MAX_HEADERS);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEAD_BYTES as u32);
    builder
}

/// Given to each connection: serve it with [`Watcher::watch`] (shutdown and idle timeout) and
/// a service wrapped by [`Watcher::track`] (what tells a busy connection from an idle one).
pub struct Watcher {
    stop: watch::Receiver<bool>,
    shared: Arc<Shared>,
    header_read_timeout: Duration,
    idle_timeout: Duration,
}

impl Watcher {
    /// Wraps the connection's service so that requests in flight (until their response body
    /// is done) keep the connection from counting as idle.
    pub fn track<S>(&self, service: S) -> Tracked<S> {
        Tracked {
            inner: service,
            shared: self.shared.clone(),
        }
    }

    /// Drives `connection` to its end: closed if the client sent nothing within the
    /// header-read timeout; shut down gracefully when the server stops or when no request has
    /// been in flight for the idle timeout; dropped (closed) if it is still open one more idle
    /// timeout after that with nothing in flight.
    pub async fn watch<C>(self, connection: C) -> Result<(), C::Error>
    where
        C: GracefulConnection,
    {
        let Watcher {
            mut stop,
            shared,
            header_read_timeout,
            idle_timeout,
        } = self;
        tokio::pin!(connection);
        // Before its first bytes a connection is still sniffing for HTTP/2 and no HTTP/1
        // header timer runs yet.
        let first_bytes = tokio::time::sleep(header_read_timeout);
        tokio::pin!(first_bytes);
        let mut got_first_bytes = false;
        let mut closing = false;
        loop {
            tokio::select! {
                result = connection.as_mut() => return result,
                () = &mut first_bytes, if !got_first_bytes => {
                    if shared.bytes_read.load(Ordering::Relaxed) == 0 {
                        tracing::debug!("closing a connection that sent nothing");
                        return Ok(());
                    }
                    got_first_bytes = true;
                }
                _ = stop.wait_for(|stop| *stop), if !closing => {
                    connection.as_mut().graceful_shutdown();
                    closing = true;
                }
                () = idle(&shared, idle_timeout) => {
                    if closing {
                        tracing::debug!("closing a connection that stayed idle after its shutdown");
                        return Ok(());
                    }
                    tracing::debug!("shutting down an idle connection");
                    connection.as_mut().graceful_shutdown();
                    closing = true;
                }
            }
        }
    }
}

/// Resolves once no request has been in flight for `timeout`. It reads the connection's
/// counters when a timer it set fires, so requests starting and ending cost it nothing: no
/// wake-up and no timer per request, only one timer per idle timeout.
async fn idle(shared: &Shared, timeout: Duration) {
    loop {
        match shared.quiet_since() {
            Some(since) if since + timeout <= tokio::time::Instant::now() => return,
            Some(since) => tokio::time::sleep_until(since + timeout).await,
            // A request in flight: look again one timeout later at the earliest.
            None => tokio::time::sleep(timeout).await,
        }
    }
}

/// What the parts of one connection share: its stream (bytes read), its service (requests in
/// flight, responses ended) and the header-read timer.
#[derive(Debug)]
struct Shared {
    /// The connection's slot under the cap. It lives as long as the connection's socket: an
    /// upgraded connection (a WebSocket tunnel) moves the socket, and with it this slot, out
    /// of hyper into the tunnel, so tunnels count against the cap until they close.
    _slot: OwnedSemaphorePermit,
    /// Requests in flight.
    in_flight: AtomicUsize,
    /// When a request last started or ended, in nanoseconds after `opened`.
    changed_at: AtomicU64,
    opened: tokio::time::Instant,
    /// Bytes read from the client so far.
    bytes_read: AtomicU64,
    /// One more than `bytes_read` when the last response ended; 0 before any has ended.
    response_ended_at: AtomicU64,
}

impl Shared {
    fn new(slot: OwnedSemaphorePermit) -> Arc<Self> {
        Arc::new(Self {
            _slot: slot,
            in_flight: AtomicUsize::new(0),
            changed_at: AtomicU64::new(0),
            opened: tokio::time::Instant::now(),
            bytes_read: AtomicU64::new(0),
            response_ended_at: AtomicU64::new(0),
        })
    }

    /// Records that a request started or ended now.
    fn touch(&self) {
        let nanos = u64::try_from(self.opened.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.changed_at.store(nanos, Ordering::Relaxed);
    }

    /// Since when no request has been in flight; `None` while one is.
    fn quiet_since(&self) -> Option<tokio::time::Instant> {
        // Acquire pairs with the Release of the change of `in_flight`, so the `touch` made
        // before it is seen.
        (self.in_flight.load(Ordering::Acquire) == 0)
            .then(|| self.opened + Duration::from_nanos(self.changed_at.load(Ordering::Relaxed)))
    }
}

tokio::task_local! {
    /// The connection served by the current task, for [`HeaderTimer`].
    static CONNECTION: Arc<Shared>;
}

/// One request in flight; counted from the call of the service to the end of the response
/// body.
struct InFlight(Arc<Shared>);

impl InFlight {
    fn start(shared: &Arc<Shared>) -> Self {
        shared.touch();
        shared.in_flight.fetch_add(1, Ordering::Release);
        Self(shared.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let read = self.0.bytes_read.load(Ordering::Relaxed);
        self.0
            .response_ended_at
            .store(read.saturating_add(1), Ordering::Relaxed);
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::Release);
    }
}

/// hyper's timer for the HTTP/1 header-read timeout of connections served by
/// [`serve_connections`]. hyper starts it whenever it waits for a request head. Before any
/// response on the connection that is right after the first bytes arrived (the HTTP/2 sniffing
/// read them), so it runs at once; after a response it starts with the first byte read after
/// that response ended, leaving the wait for the next request to the idle timeout. Outside
/// [`serve_connections`] it is a plain timer.
#[derive(Debug, Clone, Copy)]
struct HeaderTimer;

impl hyper::rt::Timer for HeaderTimer {
    fn sleep(&self, duration: Duration) -> Pin<Box<dyn hyper::rt::Sleep>> {
        let shared = CONNECTION.try_with(Arc::clone).ok();
        let waits_for_byte = shared
            .as_ref()
            .map(|s| s.response_ended_at.load(Ordering::Relaxed))
            .filter(|ended_at| *ended_at > 0)
            .map(|ended_at| ended_at - 1);
        let mut sleep = HeaderSleep {
            duration,
            shared,
            waits_for_byte,
            sleep: None,
        };
        if sleep.waits_for_byte.is_none() {
            sleep.sleep = Some(Box::pin(tokio::time::sleep(duration)));
        }
        Box::pin(sleep)
    }

    fn sleep_until(&self, deadline: Instant) -> Pin<Box<dyn hyper::rt::Sleep>> {
        self.sleep(deadline.saturating_duration_since(Instant::now()))
    }
}

/// See [`HeaderTimer`].
struct HeaderSleep {
    duration: Duration,
    shared: Option<Arc<Shared>>,
    /// Starts once more than this many bytes were read (`None`: started).
    waits_for_byte: Option<u64>,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl Future for HeaderSleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        if this.sleep.is_none() {
            let read = this
                .shared
                .as_ref()
                .map_or(u64::MAX, |s| s.bytes_read.load(Ordering::Relaxed));
            if this.waits_for_byte.is_some_and(|after| read <= after) {
                // hyper polls this only right after reading from the connection, which wakes
                // it again when bytes arrive.
                return Poll::Pending;
            }
            this.sleep = Some(Box::pin(tokio::time::sleep(this.duration)));
        }
        match &mut this.sleep {
            Some(sleep) => sleep.as_mut().poll(cx),
            None => Poll::Pending,
        }
    }
}

impl hyper::rt::Sleep for HeaderSleep {}

/// An accepted connection: the TCP stream, counting the bytes read (for the header-read
/// timeout of kept-alive connections).
#[derive(Debug)]
pub struct ClientStream {
    inner: TcpStream,
    shared: Arc<Shared>,
}

impl ClientStream {
    /// The TCP stream.
    pub fn get_ref(&self) -> &TcpStream {
        &self.inner
    }
}

impl AsyncRead for ClientStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.inner).poll_read(cx, buf);
        let read = buf.filled().len().saturating_sub(before) as u64;
        if read > 0 {
            this.shared.bytes_read.fetch_add(read, Ordering::Relaxed);
        }
        polled
    }
}

impl AsyncWrite for ClientStream {
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

/// A service whose requests are counted while in flight; see [`Watcher::track`].
#[derive(Clone)]
pub struct Tracked<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S, ReqBody, ResBody> hyper::service::Service<http::Request<ReqBody>> for Tracked<S>
where
    S: hyper::service::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    ResBody: Send + 'static,
{
    type Response = http::Response<TrackedBody<ResBody>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn call(&self, request: http::Request<ReqBody>) -> Self::Future {
        let guard = InFlight::start(&self.shared);
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            Ok(response.map(|body| TrackedBody {
                inner: body,
                _in_flight: guard,
            }))
        })
    }
}

/// A response body that keeps its request counted as in flight until it is dropped.
pub struct TrackedBody<B> {
    inner: B,
    _in_flight: InFlight,
}

impl<B: Body + Unpin> Body for TrackedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The pause after failed `accept`s: 10 ms, doubling up to 1 s, back to 10 ms after a success.
#[derive(Debug, Default)]
struct AcceptBackoff {
    next: Option<Duration>,
}

impl AcceptBackoff {
    fn failed(&mut self) -> Duration {
        let pause = self.next.unwrap_or(ACCEPT_BACKOFF_MIN);
        self.next = Some((pause * 2).min(ACCEPT_BACKOFF_MAX));
        pause
    }

    fn succeeded(&mut self) {
        self.next = None;
    }
}

/// Whether an `accept` error concerns only the connection being accepted (the next accept
/// may well succeed) rather than the process (out of descriptors or memory).
fn is_connection_error(error: &std::io::Error) -> bool {
    matches!(
        error.kind(),
        std::io::ErrorKind::ConnectionAborted
            | std::io::ErrorKind::ConnectionReset
            | std::io::ErrorKind::ConnectionRefused
            | std::io::ErrorKind::Interrupted
    )
}

/// The soft limit on open files of this process (`/proc/self/limits`), if known and finite.
fn open_files_limit() -> Option<u64> {
    parse_open_files_limit(&std::fs::read_to_string("/proc/self/limits").ok()?)
}

fn parse_open_files_limit(limits: &str) -> Option<u64> {
    let line = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))?;
    line["Max open files".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The cap actually used: `configured`, held below three quarters of the open-file limit.
fn effective_max_connections(configured: usize, open_files: Option<u64>) -> usize {
    let configured = configured.clamp(1, Semaphore::MAX_PERMITS);
    match open_files {
        Some(limit) => {
            let room = usize::try_from(limit / 4 * 3).unwrap_or(usize::MAX).max(1);
            configured.min(room)
        }
        None => configured,
    }
}

/// Accepts connections until `shutdown`, at most `limits.max_connections` at once, running
/// `serve` for each on its own task; `serve` builds its hyper connection with
/// [`http_builder`], its service wrapped by [`Watcher::track`], and hands the connection to
/// [`Watcher::watch`]. Then stops accepting, asks every connection to finish and waits up to
/// `limits.drain` for them; those still open after that are closed.
pub async fn serve_connections<F, Fut>(
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
    limits: ConnectionLimits,
    serve: F,
) where
    F: Fn(ClientStream, SocketAddr, Watcher) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let local = listener.local_addr().ok();
    let max = effective_max_connections(limits.max_connections, open_files_limit());
    if max < limits.max_connections {
        tracing::warn!(
            listen = ?local,
            configured = limits.max_connections,
            max,
            "the connection cap is above three quarters of the open-file limit; using the lower cap"
        );
    }
    let permits = Arc::new(Semaphore::new(max));
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks = JoinSet::new();
    let mut backoff = AcceptBackoff::default();
    let mut saturated = false;
    tokio::pin!(shutdown);
    loop {
        // A free slot first: at the cap, new connections wait in the listen backlog.
        let permit = match permits.clone().try_acquire_owned() {
            Ok(permit) => {
                saturated = false;
                permit
            }
            Err(_) => {
                if !saturated {
                    tracing::warn!(listen = ?local, max, "connection cap reached; new connections wait");
                    saturated = true;
                }
                tokio::select! {
                    permit = permits.clone().acquire_owned() => match permit {
                        Ok(permit) => permit,
                        Err(_) => break,
                    },
                    () = &mut shutdown => break,
                }
            }
        };
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = &mut shutdown => break,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => {
                backoff.succeeded();
                accepted
            }
            Err(error) if is_connection_error(&error) => {
                tracing::debug!(%error, "accept failed for one connection");
                continue;
            }
            Err(error) => {
                // Out of file descriptors and the like: pause instead of spinning.
                let pause = backoff.failed();
                tracing::warn!(%error, ?pause, "accept failed");
                tokio::select! {
                    () = tokio::time::sleep(pause) => continue,
                    () = &mut shutdown => break,
                }
            }
        };
        while tasks.try_join_next().is_some() {}
        let _ = stream.set_nodelay(true);
        let shared = Shared::new(permit);
        let stream = ClientStream {
            inner: stream,
            shared: shared.clone(),
        };
        let watcher = Watcher {
            stop: stop_rx.clone(),
            shared: shared.clone(),
            header_read_timeout: limits.header_read_timeout,
            idle_timeout: limits.idle_timeout,
        };
        let connection = serve(stream, peer, watcher);
        tasks.spawn(CONNECTION.scope(shared, connection));
    }
    drop(listener);
    let _ = stop_tx.send(true);
    let drained = tokio::time::timeout(limits.drain, async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            open = tasks.len(),
            "in-flight requests did not finish before the drain timeout; closing their connections"
        );
        tasks.abort_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::convert::Infallible;

    use http_body_util::Full;
    use hyper::body::{Bytes, Incoming};
    use hyper_util::rt::TokioIo;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::sync::Notify;

    /// Long enough never to fire in a test unless the test is about it.
    const LONG: Duration = Duration::from_secs(600);
    /// The bound on waiting for something that must happen.
    const PATIENCE: Duration = Duration::from_secs(20);

    fn limits(header_read: Duration, idle: Duration, max: usize) -> ConnectionLimits {
        ConnectionLimits {
            header_read_timeout: header_read,
            idle_timeout: idle,
            max_connections: max,
            drain: Duration::from_secs(1),
        }
    }

    /// A server answering `ok`; a request to `/wait` waits for `release` first.
    async fn start(limits: ConnectionLimits, release: Arc<Notify>) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let builder = http_builder(&limits);
            serve_connections(
                listener,
                std::future::pending(),
                limits,
                move |stream, _peer, watcher| {
                    let release = release.clone();
                    let service =
                        hyper::service::service_fn(move |request: http::Request<Incoming>| {
                            let release = release.clone();
                            async move {
                                if request.uri().path() == "/wait" {
                                    release.notified().await;
                                }
                                Ok::<_, Infallible>(http::Response::new(Full::new(
                                    Bytes::from_static(b"ok"),
                                )))
                            }
                        });
                    let connection = builder
                        .serve_connection(TokioIo::new(stream), watcher.track(service))
                        .into_owned();
                    async move {
                        let _ = watcher.watch(connection).await;
                    }
                },
            )
            .await;
        });
        addr
    }

    const GET: &[u8] = b"GET / HTTP/1.1\r\nHost: test\r\n\r\n";

    /// Reads one `ok` response (whose body ends the read) or fails after `wait`.
    async fn read_response(stream: &mut TcpStream, wait: Duration) -> Option<String> {
        let mut response = Vec::new();
        let mut buf = [0u8; 1024];
        tokio::time::timeout(wait, async {
            loop {
                let n = stream.read(&mut buf).await.unwrap();
                assert!(n > 0, "closed before a whole response");
                response.extend_from_slice(&buf[..n]);
                if response.ends_with(b"\r\n\r\nok") {
                    return String::from_utf8(response).unwrap();
                }
            }
        })
        .await
        .ok()
    }

    /// Waits until the server closes `stream` (EOF or reset), discarding what it sends.
    async fn closed(stream: &mut TcpStream) -> bool {
        let mut buf = [0u8; 1024];
        tokio::time::timeout(PATIENCE, async {
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await
        .is_ok()
    }

    #[tokio::test]
    async fn a_half_sent_request_head_is_closed_after_the_header_read_timeout() {
        let addr = start(limits(Duration::from_millis(200), LONG, 16), Arc::default()).await;
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"POST /oauth2/token HTTP/1.1\r\nHost: test\r\nContent-Le")
            .await
            .unwrap();
        assert!(closed(&mut stream).await, "the half-sent head stayed open");
    }

    #[tokio::test]
    async fn a_new_connection_that_sends_nothing_is_closed_after_the_header_read_timeout() {
        let addr = start(limits(Duration::from_millis(200), LONG, 16), Arc::default()).await;
        let mut stream = TcpStream::connect(addr).await.unwrap();
        assert!(
            closed(&mut stream).await,
            "the silent connection stayed open"
        );
    }

    #[tokio::test]
    async fn a_kept_alive_connection_may_wait_longer_than_the_header_read_timeout() {
        let header_read = Duration::from_millis(100);
        let addr = start(limits(header_read, LONG, 16), Arc::default()).await;
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(GET).await.unwrap();
        assert!(read_response(&mut stream, PATIENCE).await.is_some());
        // Several header-read timeouts pass before the next request: the idle timeout, not
        // the header-read timeout, governs the wait between requests.
        tokio::time::sleep(header_read * 5).await;
        stream.write_all(GET).await.unwrap();
        assert!(
            read_response(&mut stream, PATIENCE).await.is_some(),
            "the kept-alive connection was closed"
        );
    }

    #[tokio::test]
    async fn a_half_sent_second_request_head_is_closed_after_the_header_read_timeout() {
        let addr = start(limits(Duration::from_millis(200), LONG, 16), Arc::default()).await;
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(GET).await.unwrap();
        assert!(read_response(&mut stream, PATIENCE).await.is_some());
        stream.write_all(b"GET / HTTP/1.1\r\nHo").await.unwrap();
        assert!(closed(&mut stream).await, "the half-sent head stayed open");
    }

    #[tokio::test]
    async fn a_connection_that_sends_nothing_is_closed_after_the_idle_timeout() {
        let addr = start(limits(LONG, Duration::from_millis(200), 16), Arc::default()).await;
        let mut stream = TcpStream::connect(addr).await.unwrap();
        assert!(
            closed(&mut stream).await,
            "the silent connection stayed open"
        );
    }

    #[tokio::test]
    async fn a_kept_alive_connection_is_closed_after_the_idle_timeout() {
        let addr = start(limits(LONG, Duration::from_millis(200), 16), Arc::default()).await;
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(GET).await.unwrap();
        assert!(read_response(&mut stream, PATIENCE).await.is_some());
        assert!(closed(&mut stream).await, "the idle connection stayed open");
    }

    #[tokio::test]
    async fn a_silent_http2_connection_is_closed_even_if_it_never_acknowledges() {
        let addr = start(limits(LONG, Duration::from_millis(200), 16), Arc::default()).await;
        let mut stream = TcpStream::connect(addr).await.unwrap();
        // The h2c preface and an empty SETTINGS frame; then nothing, not even a PING ack.
        stream
            .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
            .await
            .unwrap();
        assert!(
            closed(&mut stream).await,
            "the silent h2 connection stayed open"
        );
    }

    #[tokio::test]
    async fn a_request_in_flight_outlives_the_idle_timeout() {
        let release = Arc::new(Notify::new());
        let idle = Duration::from_millis(100);
        let addr = start(limits(LONG, idle, 16), release.clone()).await;
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream
            .write_all(b"GET /wait HTTP/1.1\r\nHost: test\r\n\r\n")
            .await
            .unwrap();
        // Several idle timeouts pass while the handler works.
        tokio::time::sleep(idle * 5).await;
        release.notify_one();
        assert!(
            read_response(&mut stream, PATIENCE).await.is_some(),
            "the busy connection was closed"
        );
    }

    #[tokio::test]
    async fn at_the_cap_a_new_connection_waits_until_one_closes() {
        let addr = start(limits(LONG, LONG, 2), Arc::default()).await;
        let mut first = TcpStream::connect(addr).await.unwrap();
        first.write_all(GET).await.unwrap();
        assert!(read_response(&mut first, PATIENCE).await.is_some());
        let mut second = TcpStream::connect(addr).await.unwrap();
        second.write_all(GET).await.unwrap();
        assert!(read_response(&mut second, PATIENCE).await.is_some());

        // The third connects (the kernel's backlog) but is not served while two are open.
        let mut third = TcpStream::connect(addr).await.unwrap();
        third.write_all(GET).await.unwrap();
        assert!(
            read_response(&mut third, Duration::from_millis(300))
                .await
                .is_none(),
            "served beyond the cap"
        );
        drop(first);
        assert!(
            read_response(&mut third, PATIENCE).await.is_some(),
            "not served after a connection closed"
        );
        // The second is still served on its kept-alive connection.
        second.write_all(GET).await.unwrap();
        assert!(read_response(&mut second, PATIENCE).await.is_some());
    }

    /// A connection upgraded to a tunnel keeps its slot: at a cap of one, a second
    /// connection waits until the tunnel closes.
    #[tokio::test]
    async fn an_upgraded_connection_keeps_its_slot_until_the_tunnel_closes() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = limits(LONG, LONG, 1);
        tokio::spawn(async move {
            let builder = http_builder(&limits);
            serve_connections(
                listener,
                std::future::pending(),
                limits,
                move |stream, _peer, watcher| {
                    let service = hyper::service::service_fn(
                        |mut request: http::Request<Incoming>| async move {
                            if request.uri().path() != "/tunnel" {
                                return Ok::<_, Infallible>(http::Response::new(Full::new(
                                    Bytes::from_static(b"ok"),
                                )));
                            }
                            let upgrade = hyper::upgrade::on(&mut request);
                            tokio::spawn(async move {
                                let mut io = TokioIo::new(upgrade.await.unwrap());
                                let mut buf = [0u8; 64];
                                // Echo until the client closes.
                                while let Ok(n) = io.read(&mut buf).await {
                                    if n == 0 || io.write_all(&buf[..n]).await.is_err() {
                                        break;
                                    }
                                }
                            });
                            let mut response = http::Response::new(Full::new(Bytes::new()));
                            *response.status_mut() = http::StatusCode::SWITCHING_PROTOCOLS;
                            response
                                .headers_mut()
                                .insert(http::header::UPGRADE, "echo".parse().unwrap());
                            response
                                .headers_mut()
                                .insert(http::header::CONNECTION, "upgrade".parse().unwrap());
                            Ok(response)
                        },
                    );
                    let connection = builder
                        .serve_connection_with_upgrades(
                            TokioIo::new(stream),
                            watcher.track(service),
                        )
                        .into_owned();
                    async move {
                        let _ = watcher.watch(connection).await;
                    }
                },
            )
            .await;
        });

        let mut tunnel = TcpStream::connect(addr).await.unwrap();
        tunnel
            .write_all(b"GET /tunnel HTTP/1.1\r\nHost: test\r\nConnection: upgrade\r\nUpgrade: echo\r\n\r\n")
            .await
            .unwrap();
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            assert_eq!(
                tunnel.read(&mut byte).await.unwrap(),
                1,
                "closed before the 101"
            );
            head.push(byte[0]);
        }
        assert!(
            head.starts_with(b"HTTP/1.1 101"),
            "{}",
            String::from_utf8_lossy(&head)
        );
        tunnel.write_all(b"ping").await.unwrap();
        let mut echoed = [0u8; 4];
        tunnel.read_exact(&mut echoed).await.unwrap();
        assert_eq!(&echoed, b"ping");

        let mut waiting = TcpStream::connect(addr).await.unwrap();
        waiting.write_all(GET).await.unwrap();
        assert!(
            read_response(&mut waiting, Duration::from_millis(300))
                .await
                .is_none(),
            "served beyond the cap while a tunnel was open"
        );
        drop(tunnel);
        assert!(
            read_response(&mut waiting, PATIENCE).await.is_some(),
            "not served after the tunnel closed"
        );
    }

    #[tokio::test]
    async fn shutdown_closes_idle_connections_and_returns() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop_tx, mut stop_rx) = watch::channel(false);
        let limits = limits(LONG, LONG, 16).with_drain(PATIENCE);
        let server = tokio::spawn(async move {
            let builder = http_builder(&limits);
            serve_connections(
                listener,
                async move {
                    let _ = stop_rx.wait_for(|s| *s).await;
                },
                limits,
                move |stream, _peer, watcher| {
                    let service = hyper::service::service_fn(|_: http::Request<Incoming>| async {
                        Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from_static(
                            b"ok",
                        ))))
                    });
                    let connection = builder
                        .serve_connection(TokioIo::new(stream), watcher.track(service))
                        .into_owned();
                    async move {
                        let _ = watcher.watch(connection).await;
                    }
                },
            )
            .await;
        });
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(GET).await.unwrap();
        assert!(read_response(&mut stream, PATIENCE).await.is_some());
        stop_tx.send_replace(true);
        assert!(closed(&mut stream).await);
        tokio::time::timeout(PATIENCE, server)
            .await
            .expect("the server returned")
            .unwrap();
    }

    #[test]
    fn accept_failures_back_off_up_to_a_second() {
        let mut backoff = AcceptBackoff::default();
        let pauses: Vec<u128> = (0..9).map(|_| backoff.failed().as_millis()).collect();
        assert_eq!(pauses, [10, 20, 40, 80, 160, 320, 640, 1000, 1000]);
        backoff.succeeded();
        assert_eq!(backoff.failed(), ACCEPT_BACKOFF_MIN);
        assert!(is_connection_error(&std::io::Error::from(
            std::io::ErrorKind::ConnectionAborted
        )));
        // EMFILE
        assert!(!is_connection_error(&std::io::Error::from_raw_os_error(24)));
    }

    #[test]
    fn the_cap_stays_below_the_open_file_limit() {
        let limits = "Limit                     Soft Limit           Hard Limit           Units     \n\
                      Max processes             63432                63432                processes \n\
                      Max open files            1024                 524288               files     \n";
        assert_eq!(parse_open_files_limit(limits), Some(1024));
        let unlimited =
            "Max open files            unlimited            unlimited            files\n";
        assert_eq!(parse_open_files_limit(unlimited), None);
        assert_eq!(effective_max_connections(4096, Some(1024)), 768);
        assert_eq!(effective_max_connections(64, Some(1024)), 64);
        assert_eq!(effective_max_connections(4096, None), 4096);
        assert_eq!(effective_max_connections(0, None), 1);
        assert_eq!(effective_max_connections(10, Some(1)), 1);
    }

    #[test]
    fn flags_parse_with_defaults_and_refuse_nonsense() {
        use clap::Parser;
        #[derive(clap::Parser)]
        struct Cli {
            #[command(flatten)]
            connections: ConnectionArgs,
        }
        let cli = Cli::try_parse_from(["test"]).unwrap();
        assert_eq!(cli.connections.limits(), ConnectionLimits::default());
        assert_eq!(cli.connections.admin_limits(), ConnectionLimits::admin());
        let cli = Cli::try_parse_from([
            "test",
            "--header-read-timeout=2s",
            "--idle-timeout=5m",
            "--max-connections=100",
            "--admin-max-connections=8",
        ])
        .unwrap();
        assert_eq!(
            cli.connections.limits(),
            limits(Duration::from_secs(2), Duration::from_secs(300), 100).with_drain(DEFAULT_DRAIN)
        );
        assert_eq!(cli.connections.admin_limits().max_connections, 8);
        for bad in [
            "--max-connections=0",
            "--header-read-timeout=0s",
            "--idle-timeout=soon",
        ] {
            assert!(Cli::try_parse_from(["test", bad]).is_err(), "{bad}");
        }
    }
}
