//! Custom resource types of the `keygate.dev/v1alpha1` API.
//!
//! These types are the single source of the CRD schemas: `keygate crd` prints them and
//! `crds/` holds the committed output (a test fails when the two drift apart). Everything
//! that can be checked on one object alone is in the schema (patterns, bounds, enums and a
//! few CEL rules), so the API server and `keygate dev` ([`parse_object`]) reject the same
//! input.

// kube's `printcolumn(...)` repeats `type_ = ...` by design; clippy mistakes that for a
// duplicated attribute.
#[allow(clippy::duplicated_attributes)]
mod client;
#[allow(clippy::duplicated_attributes)]
mod policy;
#[allow(clippy::duplicated_attributes)]
mod role;
mod schema;

pub use client::*;
pub use policy::*;
pub use role::*;
pub use schema::{check_schema, crd_of, parse_object};

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};

/// The API group of every keygate resource.
pub const GROUP: &str = "keygate.dev";
/// The API version of every keygate resource.
pub const VERSION: &str = "v1alpha1";
/// The `type` of the condition every keygate resource reports.
pub const READY: &str = "Ready";

/// The CRDs of every keygate resource, in a stable order, as [`crd_of`] makes them.
pub fn crds() -> Vec<CustomResourceDefinition> {
    vec![
        crd_of::<M2MRole>(),
        crd_of::<ApiClient>(),
        crd_of::<ScopePolicy>(),
    ]
}

/// All CRDs as one multi-document YAML stream, exactly as committed in `crds/`.
pub fn crds_yaml() -> Result<String, serde_yaml_ng::Error> {
    let mut out = String::new();
    for crd in crds() {
        out.push_str("---\n");
        out.push_str(&serde_yaml_ng::to_string(&crd)?);
    }
    Ok(out)
}

/// Builds a `Ready` condition for `generation`, keeping the previous transition time when
/// the status did not change so that status writes stay idempotent.
pub fn ready_condition(
    ready: bool,
    reason: &str,
    message: impl Into<String>,
    generation: Option<i64>,
    previous: &[Condition],
    now: Time,
) -> Condition {
    let status = if ready { "True" } else { "False" };
    let last_transition_time = previous
        .iter()
        .find(|c| c.type_ == READY && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or(now);
    Condition {
        type_: READY.to_owned(),
        status: status.to_owned(),
        reason: reason.to_owned(),
        message: message.into(),
        observed_generation: generation,
        last_transition_time,
    }
}

/// Carries over `lastTransitionTime` from `stored` for conditions whose status is unchanged.
pub fn keep_transition_times(conditions: &mut [Condition], stored: &[Condition]) {
    for condition in conditions {
        if let Some(previous) = stored
            .iter()
            .find(|c| c.type_ == condition.type_ && c.status == condition.status)
        {
            condition.last_transition_time = previous.last_transition_time.clone();
        }
    }
}

/// Whether `conditions` hold a `Ready=True` condition.
pub fn is_ready(conditions: &[Condition]) -> bool {
    conditions
        .iter()
        .any(|c| c.type_ == READY && c.status == "True")
}

// Rules about one value are OpenAPI `pattern`s, `enum`s and bounds: the API server checks
// them at no CEL cost, and its error names the field and the pattern. CEL is kept for what a
// schema keyword cannot say (durations, rules across fields), and `tests/crds.rs` keeps every
// CEL rule within the API server's cost budget.

/// An absolute URI (scheme `://` authority …) without a fragment, as RFC 8707 requires.
pub(crate) const RESOURCE_URI_PATTERN: &str = r"^[a-zA-Z][a-zA-Z0-9+.-]*://[^/#\s]+[^#\s]*$";
/// One scope token: letters, digits and `_ . : / - *`, starting with a letter, digit or `*`.
pub(crate) const SCOPE_PATTERN: &str = r"^[A-Za-z0-9*][A-Za-z0-9_.:/*-]*$";
/// A DNS subdomain name (RFC 1123), as Kubernetes object names are.
pub(crate) const NAME_PATTERN: &str =
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";
/// A DNS label (RFC 1123), as namespace names are.
pub(crate) const LABEL_PATTERN: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";
/// A route rule's name.
pub(crate) const RULE_NAME_PATTERN: &str = r"^[A-Za-z0-9][A-Za-z0-9_-]*$";
/// CEL: an access-token lifetime between one minute and one day.
pub(crate) const TOKEN_LIFETIME_RULE: &str =
    "duration(self) >= duration('1m') && duration(self) <= duration('24h')";

/// Parses a duration in the Go/Kubernetes form the CRDs use (`90s`, `15m`, `1h30m`, `720h`).
pub fn parse_duration(text: &str) -> Result<std::time::Duration, String> {
    humantime::parse_duration(text)
        .map_err(|e| format!("{text:?} is not a duration such as 15m or 1h30m: {e}"))
}
