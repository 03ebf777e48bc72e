//! The admission webhook's TLS: the operator's self-managed certificates ([`crate::tls`])
//! with the webhook's CA name, and the webhook's default listener limits.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::Router;

use crate::connections::ConnectionLimits;
pub use crate::tls::{
    CertResolver, LEAF_VALIDITY, RENEW_BEFORE, Renewal, ServingCerts, TlsError,
    serve_tls_with_limits, service_names,
};

/// The webhook's CA and serving certificate.
pub type WebhookCerts = ServingCerts;

/// The common name of the webhook's CA.
pub const CA_NAME: &str = "keygate webhook CA";

/// How long in-flight requests may take to finish after `shutdown`.
pub const DRAIN: Duration = Duration::from_secs(10);

/// A new webhook CA and serving certificate for `names` ([`crate::tls::generate`]).
pub fn generate(names: &[String], now: SystemTime) -> Result<WebhookCerts, TlsError> {
    crate::tls::generate(CA_NAME, names, now)
}

/// [`crate::tls::ensure`] with the webhook's CA name.
pub fn ensure(
    existing: Option<&WebhookCerts>,
    names: &[String],
    now: SystemTime,
    renew_before: Duration,
) -> Result<(WebhookCerts, Renewal), TlsError> {
    crate::tls::ensure(CA_NAME, existing, names, now, renew_before)
}

/// Serves `router` over TLS with the webhook's default limits: 1024 connections, 10 s
/// header read and handshake, 60 s idle, 10 s drain.
pub async fn serve_tls(
    listener: tokio::net::TcpListener,
    router: Router,
    resolver: Arc<CertResolver>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), TlsError> {
    let limits = ConnectionLimits::default()
        .with_max_connections(crate::connections::DEFAULT_WEBHOOK_MAX_CONNECTIONS)
        .with_drain(DRAIN);
    serve_tls_with_limits(listener, router, resolver, limits, shutdown).await
}
