//! The upstream connection of one caller connection, driven by the caller connection's own
//! task.
//!
//! A pooled client (hyper-util's) runs each upstream connection on a task of its own: every
//! request goes to that task over a channel, and the response comes back over another, with
//! a wake-up of another thread each way and the pool's lock around it. An HTTP/1 caller
//! sends one request at a time, so its requests can go over one upstream connection of its
//! own instead, polled by the task that serves the caller ([`LaneDriver`], run beside the
//! caller's connection): the hand-offs stay within one task, and the pool is not involved.
//!
//! The lane opens its connection at the first request and again whenever the workload
//! closed the last one. It ends with the caller's connection. Between requests a lane keeps
//! its connection only while fewer than [`KeptConnections`]'s maximum are kept by all lanes
//! together: callers holding many idle connections cannot make the sidecar hold as many
//! idle connections to the workload. HTTP/2 callers (concurrent requests), upgrades and an
//! h2c workload keep the pooled client.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use futures::stream::{FuturesUnordered, StreamExt};
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::sync::mpsc;

use super::forward::{ForwardError, UpstreamBody};

/// An upstream connection's I/O, to be polled by the [`LaneDriver`].
type Driven = Pin<Box<dyn Future<Output = ()> + Send>>;

/// One caller connection's way to the workload: at most one HTTP/1.1 connection, reused for
/// each of the caller's requests. Cheap to clone; clones share the connection.
#[derive(Clone, Debug)]
pub struct UpstreamLane {
    inner: Arc<Lane>,
}

#[derive(Debug)]
struct Lane {
    upstream: SocketAddr,
    connect_timeout: Duration,
    /// The connection, while no request uses it (counted in `kept`).
    idle: Mutex<Option<http1::SendRequest<UpstreamBody>>>,
    kept: Arc<KeptConnections>,
    /// Hands each new connection's I/O to the driver.
    driver: mpsc::UnboundedSender<Driven>,
}

impl Drop for Lane {
    fn drop(&mut self) {
        let idle = self.idle.get_mut().unwrap_or_else(|p| p.into_inner());
        if idle.is_some() {
            self.kept.release();
        }
    }
}

/// How many upstream connections the lanes of one forwarder keep between requests, and the
/// most they may.
#[derive(Debug)]
pub struct KeptConnections {
    kept: AtomicUsize,
    max: usize,
}

impl KeptConnections {
    pub fn new(max: usize) -> Arc<Self> {
        Arc::new(Self {
            kept: AtomicUsize::new(0),
            max,
        })
    }

    /// Counts one more kept connection, unless the maximum is reached.
    fn try_keep(&self) -> bool {
        self.kept
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < self.max).then_some(n + 1)
            })
            .is_ok()
    }

    fn release(&self) {
        self.kept.fetch_sub(1, Ordering::AcqRel);
    }

    /// Connections kept now.
    pub fn count(&self) -> usize {
        self.kept.load(Ordering::Acquire)
    }
}

/// Drives the I/O of a lane's connections; poll it beside the caller's connection, in the
/// same task, for as long as that connection lives. It never completes on its own.
pub struct LaneDriver {
    new: mpsc::UnboundedReceiver<Driven>,
    running: FuturesUnordered<Driven>,
}

impl UpstreamLane {
    /// A lane to `upstream` (no connection yet), keeping its connection between requests
    /// within `kept`, and the driver of its connections.
    pub fn new(
        upstream: SocketAddr,
        connect_timeout: Duration,
        kept: Arc<KeptConnections>,
    ) -> (Self, LaneDriver) {
        let (driver, new) = mpsc::unbounded_channel();
        let lane = Self {
            inner: Arc::new(Lane {
                upstream,
                connect_timeout,
                idle: Mutex::new(None),
                kept,
                driver,
            }),
        };
        let driver = LaneDriver {
            new,
            running: FuturesUnordered::new(),
        };
        (lane, driver)
    }

    /// Sends `request` (origin-form target, with a `Host` header) over the lane's
    /// connection, opening one if there is none or the workload closed it. A request the
    /// old connection could not take (closed just now) goes over a new one.
    pub async fn send(
        &self,
        request: Request<UpstreamBody>,
    ) -> Result<Response<Incoming>, ForwardError> {
        // Connecting is boxed, so that its state is not part of every request's future.
        let mut sender = match self.take_ready().await {
            Some(sender) => sender,
            None => Box::pin(self.connect()).await?,
        };
        let request = match sender.try_send_request(request).await {
            Ok(response) => {
                self.put_back(sender);
                return Ok(response);
            }
            Err(mut error) => match error.take_message() {
                Some(request) => request,
                None => return Err(classify(&error.into_error())),
            },
        };
        let mut sender = Box::pin(self.connect()).await?;
        match sender.send_request(request).await {
            Ok(response) => {
                self.put_back(sender);
                Ok(response)
            }
            Err(error) => Err(classify(&error)),
        }
    }

    /// The idle connection, once it can take a request (its last response may still be
    /// finishing, in this task); `None` when there is none or it closed.
    async fn take_ready(&self) -> Option<http1::SendRequest<UpstreamBody>> {
        let mut sender = self
            .inner
            .idle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()?;
        self.inner.kept.release();
        if sender.is_ready() {
            return Some(sender);
        }
        match tokio::time::timeout(self.inner.connect_timeout, sender.ready()).await {
            Ok(Ok(())) => Some(sender),
            _ => None,
        }
    }

    /// Keeps `sender` for the next request, if the lanes may keep one more; otherwise it is
    /// dropped, and its connection closes once the response is done.
    fn put_back(&self, sender: http1::SendRequest<UpstreamBody>) {
        if self.inner.kept.try_keep() {
            *self.inner.idle.lock().unwrap_or_else(|p| p.into_inner()) = Some(sender);
        }
    }

    /// A new connection to the workload; its I/O goes to the driver.
    async fn connect(&self) -> Result<http1::SendRequest<UpstreamBody>, ForwardError> {
        let stream = match tokio::time::timeout(
            self.inner.connect_timeout,
            tokio::net::TcpStream::connect(self.inner.upstream),
        )
        .await
        {
            Ok(Ok(stream)) => stream,
            Ok(Err(error)) => {
                tracing::debug!(%error, "upstream connection failed");
                return Err(ForwardError::Connect);
            }
            Err(_) => return Err(ForwardError::Timeout),
        };
        // Small request and response heads would otherwise wait on Nagle's algorithm.
        let _ = stream.set_nodelay(true);
        let (sender, connection) = http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|error| classify(&error))?;
        let driven: Driven = Box::pin(async move {
            if let Err(error) = connection.await {
                tracing::debug!(%error, "upstream connection ended with an error");
            }
        });
        // The driver lives as long as the caller's connection, which holds this lane.
        self.inner
            .driver
            .send(driven)
            .map_err(|_| ForwardError::Connect)?;
        Ok(sender)
    }
}

fn classify(error: &hyper::Error) -> ForwardError {
    if error.is_timeout() {
        ForwardError::Timeout
    } else {
        tracing::debug!(error = %super::forward::error_chain(error), "upstream request failed");
        ForwardError::Protocol
    }
}

impl Future for LaneDriver {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        while let Poll::Ready(Some(driven)) = self.new.poll_recv(cx) {
            self.running.push(driven);
        }
        // Ready(None) when none runs: the receiver's waker brings the next one.
        while let Poll::Ready(Some(())) = self.running.poll_next_unpin(cx) {}
        Poll::Pending
    }
}
