//! The admin endpoints every keygate server exposes: `/healthz`, `/readyz` and Prometheus
//! `/metrics`, plus the shutdown signal and the serve loop they share.

use std::net::SocketAddr;
use std::sync::{Arc, RwLock};

use axum::Router;
use axum::extract::{ConnectInfo, State};
use axum::http::{Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tokio::sync::watch;
use tower::ServiceExt;

use crate::connections::ConnectionLimits;

/// What the admin endpoints read.
#[derive(Clone)]
pub struct AdminState {
    /// Locked only to register metrics of components started later (a sidecar per new
    /// policy in `keygate dev`) and to encode a scrape.
    pub metrics: Arc<RwLock<Registry>>,
    /// True once the process can do its job (e.g. the sidecar has a valid policy).
    pub ready: watch::Receiver<bool>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
}

/// `keygate_build_info{version}`, always 1: which keygate a process runs, to join on.
struct BuildMetrics {
    info: Family<BuildLabels, Gauge>,
}

impl BuildMetrics {
    fn register(registry: &mut Registry) -> Self {
        let metrics = Self {
            info: Family::default(),
        };
        let r = registry.sub_registry_with_prefix("keygate");
        r.register(
            "build_info",
            "The keygate version this process runs (always 1)",
            metrics.info.clone(),
        );
        metrics
            .info
            .get_or_create(&BuildLabels {
                version: env!("CARGO_PKG_VERSION"),
            })
            .set(1);
        metrics
    }
}

/// `/healthz`, `/readyz` and `/metrics`. Registers `keygate_build_info` in `state.metrics`:
/// every keygate process (operator, sidecar, dev) serves its metrics through this router,
/// once.
pub fn router(state: AdminState) -> Router {
    BuildMetrics::register(&mut state.metrics.write().unwrap_or_else(|p| p.into_inner()));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn readyz(State(state): State<AdminState>) -> Response {
    if *state.ready.borrow() {
        (StatusCode::OK, "ready\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n").into_response()
    }
}

async fn metrics(State(state): State<AdminState>) -> Response {
    let mut body = String::new();
    let encoded = {
        let registry = state.metrics.read().unwrap_or_else(|p| p.into_inner());
        prometheus_client::encoding::text::encode(&mut body, &registry)
    };
    match encoded {
        Ok(()) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            body,
        )
            .into_response(),
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}

/// Resolves on SIGTERM or Ctrl-C, whichever comes first.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
    tracing::info!("shutdown signal received; draining in-flight requests");
}

/// Serves `router` on `listener` within `limits` (connection cap, header-read and idle
/// timeouts; see [`crate::connections`]) until `shutdown` resolves, then drains in-flight
/// requests for up to `limits.drain`. Handlers can extract `ConnectInfo<SocketAddr>`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    limits: ConnectionLimits,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let builder = crate::connections::http_builder(&limits);
    crate::connections::serve_connections(listener, shutdown, limits, |stream, peer, watcher| {
        let router = router.clone();
        let builder = builder.clone();
        async move { serve_connection(stream, peer, router, &builder, watcher).await }
    })
    .await;
    Ok(())
}

/// Serves one accepted connection, plain or TLS, with `router` until it ends (see
/// [`crate::connections::Watcher::watch`]); handlers see `peer` as `ConnectInfo<SocketAddr>`.
pub(crate) async fn serve_connection<I>(
    io: I,
    peer: SocketAddr,
    router: Router,
    builder: &auto::Builder<TokioExecutor>,
    watcher: crate::connections::Watcher,
) where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
        request.extensions_mut().insert(ConnectInfo(peer));
        router.clone().oneshot(request)
    });
    let connection = builder
        .serve_connection(TokioIo::new(io), watcher.track(service))
        .into_owned();
    if let Err(error) = watcher.watch(connection).await {
        tracing::debug!(%error, %peer, "connection ended with an error");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn every_process_exports_its_build() {
        let (_ready_tx, ready) = watch::channel(true);
        let router = router(AdminState {
            metrics: Arc::new(RwLock::new(Registry::default())),
            ready,
        });
        let request = Request::get("/metrics")
            .body(axum::body::Body::empty())
            .unwrap();
        let response = router.oneshot(request).await.unwrap();
        let body = http_body_util::BodyExt::collect(response.into_body())
            .await
            .unwrap()
            .to_bytes();
        let text = String::from_utf8(body.to_vec()).unwrap();
        let line = format!(
            "keygate_build_info{{version=\"{}\"}} 1\n",
            env!("CARGO_PKG_VERSION")
        );
        assert!(text.contains(&line), "{text}");
    }
}
