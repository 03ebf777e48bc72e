//! The admission webhook: sidecar injection into opted-in Pods, validation of keygate objects
//! for what CEL cannot check, and the self-managed TLS it is served with.
//!
//! - [`inject`]: the pure JSON patch that adds the sidecar (also used by [`inject_manifest`]
//!   for `keygate inject -f`).
//! - [`validate`]: the pure checks of ScopePolicy, ApiClient and M2MRole.
//! - [`server`]: `POST /mutate-pods` and `POST /validate`, always HTTP 200 with an
//!   `AdmissionReview`.
//! - [`tls`]: the webhook's use of the operator's self-managed TLS ([`crate::tls`]: CA and
//!   serving certificate generation and renewal, a rustls certificate resolver that rotates
//!   without a restart).

pub mod inject;
pub mod manifest;
pub mod server;
pub mod tls;
pub mod validate;

pub use inject::{CaptureMode, Deny, InjectConfig, inject};
pub use manifest::inject_manifest;
pub use server::{WebhookMetrics, WebhookState, mutate_review, router, validate_review};
pub use tls::{CertResolver, WebhookCerts, serve_tls};

#[cfg(test)]
mod tests;
