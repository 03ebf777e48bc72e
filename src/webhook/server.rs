//! The admission endpoints: `POST /mutate-pods` (sidecar injection) and `POST /validate`
//! (ScopePolicy, ApiClient, M2MRole).
//!
//! Every request is answered with HTTP 200 and an `AdmissionReview`: `invalid` for a body
//! that is not one, `deny` with a message for a refused object, allowed (with a JSON patch
//! for an injection) otherwise. The decisions are the pure functions [`mutate_review`] and
//! [`validate_review`] of the request body and the registry state; the handlers only read the
//! body and write the answer.

use std::sync::Arc;

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use http_body_util::BodyExt;
use k8s_openapi::api::core::v1::Pod;
use kube::core::DynamicObject;
use kube::core::admission::{AdmissionRequest, AdmissionResponse, AdmissionReview, Operation};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use serde_json::Value;
use tokio::sync::watch;

use super::inject::{InjectConfig, inject};
use super::validate::validate_object;
use crate::registry::{ObjectKey, Snapshot};

/// The largest request body read. A Pod is at most ~1.5 MiB in etcd and an `AdmissionReview`
/// may carry the old and the new object.
pub const MAX_BODY: usize = 8 * 1024 * 1024;

/// What the webhook reads.
#[derive(Clone)]
pub struct WebhookState {
    /// The registry; the ScopePolicies a Pod may name come from here.
    pub snapshot: watch::Receiver<Arc<Snapshot>>,
    /// The sidecar to inject.
    pub inject: Arc<InjectConfig>,
    /// The API server supports native sidecars (Kubernetes 1.29+).
    pub native_sidecars: bool,
    pub metrics: WebhookMetrics,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AdmissionLabels {
    /// `mutating` or `validating`.
    pub webhook: &'static str,
    /// `allowed`, `denied` (refused by policy) or `error` (a request the webhook could not
    /// read).
    pub outcome: &'static str,
}

/// Webhook metrics.
#[derive(Clone, Debug)]
pub struct WebhookMetrics {
    pub admissions: Family<AdmissionLabels, Counter>,
}

impl WebhookMetrics {
    pub fn register(registry: &mut prometheus_client::registry::Registry) -> Self {
        let metrics = Self {
            admissions: Family::default(),
        };
        let r = registry.sub_registry_with_prefix("keygate_webhook");
        r.register(
            "admissions",
            "Admission requests answered, by webhook and outcome",
            metrics.admissions.clone(),
        );
        metrics
    }

    fn count(&self, webhook: &'static str, review: &AdmissionReview<DynamicObject>) {
        self.admissions
            .get_or_create(&AdmissionLabels {
                webhook,
                outcome: outcome(review),
            })
            .inc();
    }
}

/// The outcome label of an answer: [`AdmissionResponse::invalid`] answers carry the reason
/// `InvalidRequest`, denials keep the request's.
fn outcome(review: &AdmissionReview<DynamicObject>) -> &'static str {
    match &review.response {
        Some(response) if response.allowed => "allowed",
        Some(response) if response.result.reason != "InvalidRequest" => "denied",
        _ => "error",
    }
}

/// `POST /mutate-pods` and `POST /validate`.
pub fn router(state: WebhookState) -> Router {
    Router::new()
        .route("/mutate-pods", post(mutate_handler))
        .route("/validate", post(validate_handler))
        .with_state(state)
}

async fn mutate_handler(State(state): State<WebhookState>, body: Body) -> Response {
    let review = match read_body(body).await {
        Ok(bytes) => {
            let snapshot = state.snapshot.borrow().clone();
            mutate_review(&bytes, &state.inject, state.native_sidecars, |ns, name| {
                policy_upstream(&snapshot, ns, name)
            })
        }
        Err(message) => AdmissionResponse::invalid(message).into_review(),
    };
    state.metrics.count("mutating", &review);
    respond(&review)
}

async fn validate_handler(State(state): State<WebhookState>, body: Body) -> Response {
    let review = match read_body(body).await {
        Ok(bytes) => validate_review(&bytes),
        Err(message) => AdmissionResponse::invalid(message).into_review(),
    };
    state.metrics.count("validating", &review);
    respond(&review)
}

/// The upstream port of ScopePolicy `namespace/name` in `snapshot`, `None` when it does not
/// exist.
pub fn policy_upstream(snapshot: &Snapshot, namespace: &str, name: &str) -> Option<u16> {
    snapshot
        .policies
        .get(&ObjectKey::new(namespace, name))
        .map(|p| p.spec.upstream.port)
}

async fn read_body(body: Body) -> Result<Vec<u8>, String> {
    let limited = http_body_util::Limited::new(body, MAX_BODY);
    match limited.collect().await {
        Ok(collected) => Ok(collected.to_bytes().to_vec()),
        Err(e) => Err(format!("cannot read the request body: {e}")),
    }
}

/// The review as the API server expects it on the wire: kube serializes the patch bytes as
/// a JSON array of numbers, while Go's `[]byte` is canonically a base64 string.
pub fn review_json(review: &AdmissionReview<DynamicObject>) -> Result<Vec<u8>, serde_json::Error> {
    use base64::Engine;
    let mut value = serde_json::to_value(review)?;
    if let Some(patch) = value.pointer_mut("/response/patch")
        && let Some(items) = patch.as_array()
    {
        let bytes: Vec<u8> = items
            .iter()
            .filter_map(|b| b.as_u64().and_then(|b| u8::try_from(b).ok()))
            .collect();
        *patch = Value::String(base64::engine::general_purpose::STANDARD.encode(bytes));
    }
    serde_json::to_vec(&value)
}

fn respond(review: &AdmissionReview<DynamicObject>) -> Response {
    let body = review_json(review).unwrap_or_else(|e| {
        tracing::error!(error = %e, "cannot serialize an AdmissionReview");
        br#"{"apiVersion":"admission.k8s.io/v1","kind":"AdmissionReview","response":{"uid":"","allowed":false,"status":{"status":"Failure","message":"internal error","reason":"InternalError","code":500}}}"#.to_vec()
    });
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response()
}

/// Parses an `AdmissionReview` request; the error is the `invalid` answer, echoing the uid
/// when the body has one.
fn parse(
    body: &[u8],
) -> Result<AdmissionRequest<DynamicObject>, Box<AdmissionReview<DynamicObject>>> {
    let invalid = |message: String| {
        let mut response = AdmissionResponse::invalid(message);
        if let Some(uid) = serde_json::from_slice::<Value>(body)
            .ok()
            .and_then(|v| v.pointer("/request/uid")?.as_str().map(str::to_owned))
        {
            response.uid = uid;
        }
        Box::new(response.into_review())
    };
    let review: AdmissionReview<DynamicObject> = serde_json::from_slice(body)
        .map_err(|e| invalid(format!("the body is not an AdmissionReview: {e}")))?;
    review
        .try_into()
        .map_err(|_| invalid("the AdmissionReview has no request".to_owned()))
}

/// The answer to a `/mutate-pods` request body: the sidecar patch for an opted-in Pod on
/// CREATE, a denial saying what to fix, or allowed unchanged.
pub fn mutate_review(
    body: &[u8],
    config: &InjectConfig,
    native_sidecars: bool,
    policy_upstream: impl Fn(&str, &str) -> Option<u16>,
) -> AdmissionReview<DynamicObject> {
    let request = match parse(body) {
        Ok(request) => request,
        Err(review) => return *review,
    };
    let allowed = AdmissionResponse::from(&request);
    if request.operation != Operation::Create
        || !request.kind.group.is_empty()
        || request.kind.kind != "Pod"
        || request.sub_resource.is_some()
    {
        return allowed.into_review();
    }
    let Some(object) = &request.object else {
        return AdmissionResponse::invalid("the request has no object").into_review();
    };
    let pod: Pod = match serde_json::to_value(object).and_then(serde_json::from_value) {
        Ok(pod) => pod,
        Err(e) => {
            let mut response = AdmissionResponse::invalid(format!("the object is not a Pod: {e}"));
            response.uid = request.uid.clone();
            return response.into_review();
        }
    };
    let namespace = request
        .namespace
        .clone()
        .or_else(|| pod.metadata.namespace.clone())
        .unwrap_or_else(|| "default".to_owned());
    let pod_name = pod
        .metadata
        .name
        .clone()
        .or_else(|| pod.metadata.generate_name.clone())
        .unwrap_or_default();
    match inject(&pod, &namespace, config, native_sidecars, policy_upstream) {
        Ok(None) => allowed.into_review(),
        Ok(Some(patch)) => {
            tracing::info!(uid = %request.uid, namespace, pod = pod_name, "injecting the keygate sidecar");
            match allowed.with_patch(patch) {
                Ok(response) => response.into_review(),
                Err(e) => {
                    let mut response =
                        AdmissionResponse::invalid(format!("cannot encode the patch: {e}"));
                    response.uid = request.uid.clone();
                    response.into_review()
                }
            }
        }
        Err(deny) => {
            tracing::info!(uid = %request.uid, namespace, pod = pod_name, reason = %deny, "pod denied");
            allowed.deny(deny.0).into_review()
        }
    }
}

/// The answer to a `/validate` request body: CREATE and UPDATE of a ScopePolicy, ApiClient or
/// M2MRole are denied with every problem found; warnings ride along on allowed answers. An
/// UPDATE that leaves the spec as it was, or of an object being deleted, is always allowed so
/// that finalizers and metadata of an object admitted before can still change.
pub fn validate_review(body: &[u8]) -> AdmissionReview<DynamicObject> {
    let request = match parse(body) {
        Ok(request) => request,
        Err(review) => return *review,
    };
    let mut response = AdmissionResponse::from(&request);
    if !matches!(request.operation, Operation::Create | Operation::Update)
        || request.kind.group != crate::api::GROUP
        || request.sub_resource.is_some()
    {
        return response.into_review();
    }
    let Some(object) = &request.object else {
        return AdmissionResponse::invalid("the request has no object").into_review();
    };
    if object.metadata.deletion_timestamp.is_some() {
        return response.into_review();
    }
    if request.operation == Operation::Update
        && let Some(old) = &request.old_object
        && old.data.get("spec") == object.data.get("spec")
    {
        return response.into_review();
    }
    let value = match serde_json::to_value(object) {
        Ok(value) => value,
        Err(e) => {
            let mut invalid = AdmissionResponse::invalid(format!("cannot read the object: {e}"));
            invalid.uid = request.uid.clone();
            return invalid.into_review();
        }
    };
    let findings = validate_object(&request.kind.kind, &value);
    if !findings.warnings.is_empty() {
        response.warnings = Some(findings.warnings);
    }
    if findings.errors.is_empty() {
        return response.into_review();
    }
    let namespace = request.namespace.as_deref().unwrap_or_default();
    let message = format!(
        "keygate: {} {namespace}/{} is invalid: {}",
        request.kind.kind,
        request.name,
        findings.errors.join("; ")
    );
    tracing::info!(uid = %request.uid, reason = %message, "object denied");
    response.deny(message).into_review()
}
