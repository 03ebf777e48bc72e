//! An in-process HTTP server that speaks enough of the Kubernetes REST protocol for kube-rs
//! clients and kube-runtime watchers, reflectors and controllers (STYLE.md, test level 2).
//!
//! Objects are stored as plain JSON keyed by (resource, namespace, name). One global counter
//! hands out `metadata.resourceVersion`; every change is kept in an event history that watches
//! replay. Writes that change nothing (a repeated server-side apply, a merge patch that sets
//! what is already there) keep the resourceVersion and emit no watch event, as a real API
//! server does, so tests can count the writes that changed something.
//!
//! Approximations, on purpose:
//! - server-side apply deep-merges maps, replaces lists except lists of objects keyed by
//!   `name`, which merge by name; managed field sets use the real `fieldsV1` shape and drive
//!   field removal and conflicts, but without schema knowledge (CRD list-type markers);
//! - strategic merge patch is treated as a JSON merge patch;
//! - garbage collection and namespace deletion happen at once, inside the deleting request;
//! - no admission, validation, authentication or defaulting; namespaces need not exist.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Bytes, Frame, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::{Map, Value, json};
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

type Body = UnsyncBoxBody<Bytes, Infallible>;

/// How many watch events are kept; a watch from an older resourceVersion gets 410 Expired.
const HISTORY_CAPACITY: usize = 10_000;
/// A watch without `timeoutSeconds` ends after this long, like the API server's default range.
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_secs(1800);

/// A kind of object the server stores.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResourceType {
    /// API group, empty for the core group.
    pub group: String,
    pub version: String,
    pub kind: String,
    /// Lower-case plural used in URLs.
    pub plural: String,
    pub namespaced: bool,
    /// Has a `/status` subresource: main-resource writes keep the stored `.status`.
    pub status: bool,
    /// Maintains `metadata.generation`.
    pub generation: bool,
}

impl ResourceType {
    /// A resource with neither a status subresource nor a generation.
    pub fn new(group: &str, version: &str, kind: &str, plural: &str, namespaced: bool) -> Self {
        Self {
            group: group.to_string(),
            version: version.to_string(),
            kind: kind.to_string(),
            plural: plural.to_string(),
            namespaced,
            status: false,
            generation: false,
        }
    }

    /// Adds a `/status` subresource and `metadata.generation`, as for custom resources.
    pub fn with_status(mut self) -> Self {
        self.status = true;
        self.generation = true;
        self
    }

    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    /// `secrets` or `leases.coordination.k8s.io`, as API server messages name resources.
    pub fn qualified_name(&self) -> String {
        if self.group.is_empty() {
            self.plural.clone()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }
}

fn builtin_resources() -> Vec<ResourceType> {
    let status_only = |mut r: ResourceType| {
        r.status = true;
        r
    };
    let generation_only = |mut r: ResourceType| {
        r.generation = true;
        r
    };
    vec![
        status_only(ResourceType::new(
            "",
            "v1",
            "Namespace",
            "namespaces",
            false,
        )),
        ResourceType::new("", "v1", "Secret", "secrets", true),
        ResourceType::new("", "v1", "ConfigMap", "configmaps", true),
        ResourceType::new(
            "networking.k8s.io",
            "v1",
            "NetworkPolicy",
            "networkpolicies",
            true,
        ),
        ResourceType::new("", "v1", "Event", "events", true),
        status_only(ResourceType::new("", "v1", "Pod", "pods", true)),
        status_only(ResourceType::new("", "v1", "Service", "services", true)),
        ResourceType::new("", "v1", "ServiceAccount", "serviceaccounts", true),
        ResourceType::new("events.k8s.io", "v1", "Event", "events", true),
        ResourceType::new("coordination.k8s.io", "v1", "Lease", "leases", true),
        ResourceType::new("keygate.dev", "v1alpha1", "M2MRole", "m2mroles", true).with_status(),
        ResourceType::new("keygate.dev", "v1alpha1", "ApiClient", "apiclients", true).with_status(),
        ResourceType::new(
            "keygate.dev",
            "v1alpha1",
            "ScopePolicy",
            "scopepolicies",
            true,
        )
        .with_status(),
        generation_only(ResourceType::new(
            "admissionregistration.k8s.io",
            "v1",
            "MutatingWebhookConfiguration",
            "mutatingwebhookconfigurations",
            false,
        )),
        generation_only(ResourceType::new(
            "admissionregistration.k8s.io",
            "v1",
            "ValidatingWebhookConfiguration",
            "validatingwebhookconfigurations",
            false,
        )),
        ResourceType::new(
            "apiextensions.k8s.io",
            "v1",
            "CustomResourceDefinition",
            "customresourcedefinitions",
            false,
        )
        .with_status(),
        ResourceType::new("apps", "v1", "Deployment", "deployments", true).with_status(),
    ]
}

/// How injected failures look to the client.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Failure {
    /// 503 ServiceUnavailable; kube's default client retries these for a while.
    Unavailable,
    /// 500 InternalError; not retried by the client.
    Internal,
    /// The connection is closed without an answer.
    Disconnect,
}

/// One request the server received.
#[derive(Clone, Debug)]
pub struct RequestRecord {
    pub method: String,
    /// Path and query.
    pub uri: String,
    pub content_type: String,
}

/// One mutating request that reached the storage.
#[derive(Clone, Debug)]
pub struct WriteRecord {
    pub method: String,
    /// Resource plural, e.g. `secrets`.
    pub resource: String,
    /// Empty for cluster-scoped and collection requests.
    pub namespace: String,
    /// Empty for collection requests (create, deletecollection).
    pub name: String,
    /// `status` for status subresource writes.
    pub subresource: String,
    /// The HTTP status answered.
    pub code: u16,
    /// Whether the stored state changed.
    pub changed: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

#[derive(Clone, Debug)]
struct StoredEvent {
    rv: u64,
    resource: usize,
    namespace: String,
    kind: EventType,
    object: Value,
    /// The object before a modification, to turn selector transitions into ADDED/DELETED.
    old: Option<Value>,
}

type ObjectKey = (usize, String, String);

#[derive(Clone)]
struct Store {
    resources: Vec<ResourceType>,
    objects: BTreeMap<ObjectKey, Value>,
    rv: u64,
    history: VecDeque<StoredEvent>,
    /// Every event with rv > oldest_rv is still in `history`.
    oldest_rv: u64,
}

#[derive(Default)]
struct Counters {
    writes: u64,
    effective_writes: u64,
    requests: Vec<RequestRecord>,
    write_log: Vec<WriteRecord>,
    fail_all: bool,
    fail_next: u64,
    failure: Option<Failure>,
}

struct Inner {
    store: Mutex<Store>,
    /// ServiceAccount tokens the TokenReview endpoint vouches for: token → (username,
    /// audiences).
    tokens: Mutex<HashMap<String, (String, Vec<String>)>>,
    counters: Mutex<Counters>,
    bookmark_interval: Mutex<Duration>,
    /// The latest resourceVersion, so watches wake up on changes.
    rv_tx: watch::Sender<u64>,
    /// Bumped to end every open watch stream.
    epoch_tx: watch::Sender<u64>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

struct Serving {
    stop_tx: watch::Sender<bool>,
    task: JoinHandle<()>,
}

/// The fake API server. Dropping it stops serving.
pub struct FakeApiServer {
    inner: Arc<Inner>,
    addr: SocketAddr,
    serving: Mutex<Option<Serving>>,
}

impl FakeApiServer {
    /// Starts serving on a free port of 127.0.0.1, with namespaces `default` and `kube-system`.
    pub async fn start() -> FakeApiServer {
        let (rv_tx, _) = watch::channel(0);
        let (epoch_tx, _) = watch::channel(0);
        let mut store = Store {
            resources: builtin_resources(),
            objects: BTreeMap::new(),
            rv: 0,
            history: VecDeque::new(),
            oldest_rv: 0,
        };
        for ns in ["default", "kube-system"] {
            let _ = store.create(0, "", json!({"metadata": {"name": ns}}), "fake-apiserver");
        }
        let inner = Arc::new(Inner {
            store: Mutex::new(store),
            tokens: Mutex::default(),
            counters: Mutex::new(Counters::default()),
            bookmark_interval: Mutex::new(Duration::from_secs(1)),
            rv_tx,
            epoch_tx,
        });
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the fake API server");
        let addr = listener
            .local_addr()
            .expect("local address of the fake API server");
        let serving = spawn_server(listener, inner.clone());
        FakeApiServer {
            inner,
            addr,
            serving: Mutex::new(Some(serving)),
        }
    }

    /// A token of ServiceAccount `namespace/name` for `audiences`, which the TokenReview
    /// endpoint vouches for from now on. Shaped like a JWT, as real ones are (not signed).
    pub fn service_account_token(&self, namespace: &str, name: &str, audiences: &[&str]) -> String {
        use base64::Engine;
        let claims = format!(
            "{{\"sub\":\"system:serviceaccount:{namespace}:{name}\",\"n\":{}}}",
            lock(&self.inner.tokens).len()
        );
        let token = format!(
            "eyJhbGciOiJub25lIn0.{}.c2ln",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(claims)
        );
        lock(&self.inner.tokens).insert(
            token.clone(),
            (
                format!("system:serviceaccount:{namespace}:{name}"),
                audiences.iter().map(|a| (*a).to_owned()).collect(),
            ),
        );
        token
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A client configuration for this server: plain http, no auth, default namespace `default`.
    pub fn config(&self) -> kube::Config {
        let uri: http::Uri = self.url().parse().expect("fake API server URL");
        let mut config = kube::Config::new(uri);
        config.default_namespace = "default".to_string();
        config
    }

    pub fn client(&self) -> kube::Client {
        keygate::kubernetes::from_config(self.config()).expect("client for the fake API server")
    }

    /// Mutating requests (POST, PUT, PATCH, DELETE) received, including rejected ones.
    pub fn writes(&self) -> u64 {
        lock(&self.inner.counters).writes
    }

    /// Mutating requests that changed the stored state.
    pub fn effective_writes(&self) -> u64 {
        lock(&self.inner.counters).effective_writes
    }

    /// Every mutating request that reached the storage, in order.
    pub fn write_log(&self) -> Vec<WriteRecord> {
        lock(&self.inner.counters).write_log.clone()
    }

    /// Every request received, in order.
    pub fn requests(&self) -> Vec<RequestRecord> {
        lock(&self.inner.counters).requests.clone()
    }

    /// Zeroes `writes`, `effective_writes` and empties the request and write logs.
    pub fn reset_counters(&self) {
        let mut counters = lock(&self.inner.counters);
        counters.writes = 0;
        counters.effective_writes = 0;
        counters.requests.clear();
        counters.write_log.clear();
    }

    /// The stored object. `resource` is a plural (`secrets`), `plural.group`
    /// (`leases.coordination.k8s.io`), `group/version/plural`, or a kind (`ApiClient`);
    /// `namespace` is empty for cluster-scoped resources.
    pub fn object(&self, resource: &str, namespace: &str, name: &str) -> Option<Value> {
        let store = lock(&self.inner.store);
        let index = store.find_resource(resource)?;
        store
            .objects
            .get(&(index, namespace.to_string(), name.to_string()))
            .cloned()
    }

    /// All stored objects of a resource, in one namespace or (with `None`) in all of them.
    pub fn objects(&self, resource: &str, namespace: Option<&str>) -> Vec<Value> {
        let store = lock(&self.inner.store);
        let Some(index) = store.find_resource(resource) else {
            return Vec::new();
        };
        store
            .objects
            .iter()
            .filter(|((r, ns, _), _)| *r == index && namespace.is_none_or(|want| want == ns))
            .map(|(_, v)| v.clone())
            .collect()
    }

    /// The latest resourceVersion handed out.
    pub fn resource_version(&self) -> u64 {
        lock(&self.inner.store).rv
    }

    /// Serves another kind of object.
    pub fn register(&self, resource: ResourceType) {
        let mut store = lock(&self.inner.store);
        if !store.resources.contains(&resource) {
            store.resources.push(resource);
        }
    }

    /// While `fail` is set every request fails (503 unless `set_failure` says otherwise),
    /// and setting it ends every open watch stream, as a lost API connection would.
    pub fn fail_requests(&self, fail: bool) {
        lock(&self.inner.counters).fail_all = fail;
        if fail {
            self.end_watches();
        }
    }

    /// The next `n` requests fail.
    pub fn set_fail_next(&self, n: u64) {
        lock(&self.inner.counters).fail_next = n;
    }

    /// How injected failures look; 503 by default.
    pub fn set_failure(&self, failure: Failure) {
        lock(&self.inner.counters).failure = Some(failure);
    }

    /// How often watches that allow bookmarks get one; 1s by default.
    pub fn set_bookmark_interval(&self, interval: Duration) {
        *lock(&self.inner.bookmark_interval) = interval;
    }

    /// Ends every open watch stream; clients re-watch from their last resourceVersion.
    pub fn end_watches(&self) {
        self.inner.epoch_tx.send_modify(|epoch| *epoch += 1);
    }

    /// Forgets the event history, so a watch from any earlier resourceVersion gets 410 Expired
    /// and the client has to list again.
    pub fn compact_history(&self) {
        let mut store = lock(&self.inner.store);
        store.history.clear();
        store.oldest_rv = store.rv;
    }

    /// Stops listening and closes every connection; the stored state is kept for `restart`.
    pub fn stop(&self) {
        if let Some(serving) = lock(&self.serving).take() {
            let _ = serving.stop_tx.send(true);
            serving.task.abort();
        }
        self.end_watches();
    }

    /// Serves again on the same address, with the state it had.
    pub async fn restart(&self) {
        self.stop();
        let mut last_error = None;
        for _ in 0..50 {
            match TcpListener::bind(self.addr).await {
                Ok(listener) => {
                    *lock(&self.serving) = Some(spawn_server(listener, self.inner.clone()));
                    return;
                }
                Err(error) => last_error = Some(error),
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("rebinding {} failed: {last_error:?}", self.addr);
    }
}

impl Drop for FakeApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn spawn_server(listener: TcpListener, inner: Arc<Inner>) -> Serving {
    let (stop_tx, stop_rx) = watch::channel(false);
    let task = tokio::spawn(async move {
        loop {
            let mut stop = stop_rx.clone();
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = stop.wait_for(|stopped| *stopped) => break,
            };
            let Ok((stream, _)) = accepted else { continue };
            let inner = inner.clone();
            let mut stop = stop_rx.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| handle(inner.clone(), req));
                let connection = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service);
                tokio::select! {
                    _ = connection => {}
                    _ = stop.wait_for(|stopped| *stopped) => {}
                }
            });
        }
    });
    Serving { stop_tx, task }
}

// ---------------------------------------------------------------------------------------------
// HTTP layer

#[derive(Debug)]
struct ApiError {
    code: u16,
    reason: &'static str,
    message: String,
    details: Option<Value>,
}

impl ApiError {
    fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            reason,
            message: message.into(),
            details: None,
        }
    }

    fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }

    fn invalid(message: impl Into<String>) -> Self {
        Self::new(422, "Invalid", message)
    }

    fn for_object(
        code: u16,
        reason: &'static str,
        resource: &ResourceType,
        name: &str,
        message: String,
    ) -> Self {
        Self {
            code,
            reason,
            message,
            details: Some(json!({"name": name, "group": resource.group, "kind": resource.plural})),
        }
    }

    fn not_found(resource: &ResourceType, name: &str) -> Self {
        let message = format!("{} \"{name}\" not found", resource.qualified_name());
        Self::for_object(404, "NotFound", resource, name, message)
    }

    fn already_exists(resource: &ResourceType, name: &str) -> Self {
        let message = format!("{} \"{name}\" already exists", resource.qualified_name());
        Self::for_object(409, "AlreadyExists", resource, name, message)
    }

    fn conflict(resource: &ResourceType, name: &str) -> Self {
        let message = format!(
            "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; please apply your changes to the latest version and try again",
            resource.qualified_name()
        );
        Self::for_object(409, "Conflict", resource, name, message)
    }

    fn to_status(&self) -> Value {
        let mut status = json!({
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        });
        if let Some(details) = &self.details {
            status["details"] = details.clone();
        }
        status
    }
}

fn json_response(code: u16, body: &Value) -> Response<Body> {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    Response::builder()
        .status(StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(bytes)).boxed_unsync())
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed_unsync()))
}

fn error_response(error: &ApiError) -> Response<Body> {
    json_response(error.code, &error.to_status())
}

#[derive(Debug)]
struct Disconnect;

impl std::fmt::Display for Disconnect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("injected disconnect")
    }
}

impl std::error::Error for Disconnect {}

type Query = HashMap<String, String>;

fn truthy(query: &Query, key: &str) -> bool {
    matches!(query.get(key).map(String::as_str), Some("true" | "1"))
}

/// What a resource path names.
#[derive(Debug)]
struct Target {
    resource: usize,
    /// `None` for cluster-scoped resources and all-namespaces collections.
    namespace: Option<String>,
    name: Option<String>,
    subresource: Option<String>,
}

/// A TokenReview as the API server answers it: authenticated when the token was issued by
/// [`FakeApiServer::service_account_token`] for one of the audiences asked for.
fn token_review(inner: &Inner, body: &[u8]) -> Response<Body> {
    let review: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let token = review["spec"]["token"].as_str().unwrap_or_default();
    let wanted: Vec<String> = review["spec"]["audiences"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default();
    let known = lock(&inner.tokens).get(token).cloned();
    let status = match known {
        Some((username, audiences)) => {
            let matched: Vec<&String> = audiences.iter().filter(|a| wanted.contains(a)).collect();
            if matched.is_empty() {
                json!({"authenticated": false, "error": "token audiences do not match"})
            } else {
                json!({"authenticated": true, "user": {"username": username}, "audiences": matched})
            }
        }
        None => json!({"authenticated": false, "error": "invalid bearer token"}),
    };
    let answer = json!({
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenReview",
        "metadata": {"creationTimestamp": null},
        "spec": review["spec"],
        "status": status,
    });
    json_response(201, &answer)
}

async fn handle(inner: Arc<Inner>, req: Request<Incoming>) -> Result<Response<Body>, Disconnect> {
    let (parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(collected) => collected.to_bytes(),
        Err(_) => Bytes::new(),
    };
    let method = parts.method.clone();
    let path = parts.uri.path().to_string();
    let query: Query = parts
        .uri
        .query()
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default();
    let content_type = parts
        .headers
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    let user_agent = parts
        .headers
        .get(http::header::USER_AGENT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mutating = matches!(
        method,
        Method::POST | Method::PUT | Method::PATCH | Method::DELETE
    );

    {
        let mut counters = lock(&inner.counters);
        counters.requests.push(RequestRecord {
            method: method.to_string(),
            uri: parts.uri.to_string(),
            content_type: content_type.clone(),
        });
        if mutating {
            counters.writes += 1;
        }
        if counters.fail_all || counters.fail_next > 0 {
            counters.fail_next = counters.fail_next.saturating_sub(1);
            return match counters.failure.unwrap_or(Failure::Unavailable) {
                Failure::Unavailable => Ok(error_response(&ApiError::new(
                    503,
                    "ServiceUnavailable",
                    "the server is currently unable to handle the request",
                ))),
                Failure::Internal => Ok(error_response(&ApiError::new(
                    500,
                    "InternalError",
                    "injected internal error",
                ))),
                Failure::Disconnect => Err(Disconnect),
            };
        }
    }

    if let Some(response) = discovery(&inner, &method, &path) {
        return Ok(response);
    }
    if method == Method::POST && path == "/apis/authentication.k8s.io/v1/tokenreviews" {
        return Ok(token_review(&inner, &body));
    }

    let target = match route(&lock(&inner.store), &path) {
        Some(target) => target,
        None => {
            return Ok(error_response(&ApiError::new(
                404,
                "NotFound",
                "the server could not find the requested resource",
            )));
        }
    };

    if method == Method::GET && target.name.is_none() && truthy(&query, "watch") {
        return Ok(start_watch(inner, target, &query));
    }

    let field_manager = query.get("fieldManager").cloned().unwrap_or_else(|| {
        let agent = user_agent.split('/').next().unwrap_or("");
        if agent.is_empty() {
            "unknown".to_string()
        } else {
            agent.to_string()
        }
    });
    let request = WriteRequest {
        method: method.clone(),
        target: &target,
        query: &query,
        content_type: &content_type,
        body: &body,
        field_manager: &field_manager,
    };

    let (result, changed, rv, resource) = {
        let mut store = lock(&inner.store);
        let before = store.rv;
        let dry_run =
            query.get("dryRun").is_some_and(|v| v == "All") || dry_run_in_body(&method, &body);
        let result = if dry_run && mutating {
            let mut scratch = store.clone();
            scratch.dispatch(&request)
        } else {
            store.dispatch(&request)
        };
        let resource = store.resources[target.resource].plural.clone();
        (result, store.rv != before, store.rv, resource)
    };
    if changed {
        inner.rv_tx.send_replace(rv);
    }
    let code = match &result {
        Ok((code, _)) => *code,
        Err(error) => error.code,
    };
    if mutating {
        let mut counters = lock(&inner.counters);
        if changed {
            counters.effective_writes += 1;
        }
        counters.write_log.push(WriteRecord {
            method: method.to_string(),
            resource,
            namespace: target.namespace.clone().unwrap_or_default(),
            name: target.name.clone().unwrap_or_default(),
            subresource: target.subresource.clone().unwrap_or_default(),
            code,
            changed,
        });
    }
    Ok(match result {
        Ok((code, body)) => json_response(code, &body),
        Err(error) => error_response(&error),
    })
}

fn dry_run_in_body(method: &Method, body: &[u8]) -> bool {
    if *method != Method::DELETE || body.is_empty() {
        return false;
    }
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("dryRun").cloned())
        .and_then(|v| v.as_array().cloned())
        .is_some_and(|v| v.iter().any(|x| x == "All"))
}

fn discovery(inner: &Inner, method: &Method, path: &str) -> Option<Response<Body>> {
    if *method != Method::GET {
        return None;
    }
    let trimmed = path.trim_end_matches('/');
    match trimmed {
        "/healthz" | "/readyz" | "/livez" => {
            return Response::builder()
                .status(200)
                .body(Full::new(Bytes::from_static(b"ok")).boxed_unsync())
                .ok();
        }
        "/version" => {
            return Some(json_response(
                200,
                &json!({
                    "major": "1", "minor": "33", "gitVersion": "v1.33.0-fake", "gitCommit": "fake",
                    "gitTreeState": "clean", "buildDate": "2025-01-01T00:00:00Z", "goVersion": "go1.24",
                    "compiler": "gc", "platform": "linux/amd64",
                }),
            ));
        }
        "/api" => {
            return Some(json_response(
                200,
                &json!({"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}),
            ));
        }
        _ => {}
    }
    let store = lock(&inner.store);
    if trimmed == "/apis" {
        let mut groups: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for r in store.resources.iter().filter(|r| !r.group.is_empty()) {
            let versions = groups.entry(r.group.clone()).or_default();
            if !versions.contains(&r.version) {
                versions.push(r.version.clone());
            }
        }
        let groups: Vec<Value> = groups
            .into_iter()
            .map(|(group, versions)| {
                let versions: Vec<Value> = versions
                    .iter()
                    .map(|v| json!({"groupVersion": format!("{group}/{v}"), "version": v}))
                    .collect();
                json!({"name": group, "versions": versions, "preferredVersion": versions[0]})
            })
            .collect();
        return Some(json_response(
            200,
            &json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}),
        ));
    }
    let segments: Vec<&str> = trimmed.trim_start_matches('/').split('/').collect();
    let (group, version) = match segments.as_slice() {
        ["api", version] => ("", *version),
        ["apis", group, version] => (*group, *version),
        _ => return None,
    };
    let mut resources = Vec::new();
    for r in store
        .resources
        .iter()
        .filter(|r| r.group == group && r.version == version)
    {
        let verbs = [
            "create",
            "delete",
            "deletecollection",
            "get",
            "list",
            "patch",
            "update",
            "watch",
        ];
        resources.push(json!({"name": r.plural, "singularName": r.kind.to_lowercase(), "namespaced": r.namespaced, "kind": r.kind, "verbs": verbs}));
        if r.status {
            resources.push(json!({"name": format!("{}/status", r.plural), "singularName": "", "namespaced": r.namespaced, "kind": r.kind, "verbs": ["get", "patch", "update"]}));
        }
    }
    if resources.is_empty() {
        return None;
    }
    let group_version = if group.is_empty() {
        version.to_string()
    } else {
        format!("{group}/{version}")
    };
    Some(json_response(
        200,
        &json!({"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": group_version, "resources": resources}),
    ))
}

fn route(store: &Store, path: &str) -> Option<Target> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let (group, version, rest) = match segments.as_slice() {
        ["api", version, rest @ ..] => ("", *version, rest),
        ["apis", group, version, rest @ ..] => (*group, *version, rest),
        _ => return None,
    };
    let find = |plural: &str, namespaced: Option<bool>| {
        store.resources.iter().position(|r| {
            r.group == group
                && r.version == version
                && r.plural == plural
                && namespaced.is_none_or(|n| n == r.namespaced)
        })
    };
    let target =
        |resource, namespace: Option<&str>, name: Option<&&str>, sub: Option<&&str>| Target {
            resource,
            namespace: namespace.map(str::to_string),
            name: name.map(|s| s.to_string()),
            subresource: sub.map(|s| s.to_string()),
        };
    if let ["namespaces", ns, plural, tail @ ..] = rest
        && let Some(resource) = find(plural, Some(true))
        && tail.len() <= 2
    {
        return Some(target(resource, Some(ns), tail.first(), tail.get(1)));
    }
    match rest {
        [plural, tail @ ..] if tail.len() <= 2 => {
            let resource = find(plural, None)?;
            if store.resources[resource].namespaced && !tail.is_empty() {
                return None;
            }
            Some(target(resource, None, tail.first(), tail.get(1)))
        }
        _ => None,
    }
}

struct WriteRequest<'a> {
    method: Method,
    target: &'a Target,
    query: &'a Query,
    content_type: &'a str,
    body: &'a [u8],
    field_manager: &'a str,
}

// ---------------------------------------------------------------------------------------------
// Storage

fn now() -> String {
    jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes).expect("random bytes");
    bytes
}

fn new_uid() -> String {
    let mut b = random_bytes::<16>();
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

fn random_suffix() -> String {
    const ALPHABET: &[u8] = b"bcdfghjklmnpqrstvwxz2456789";
    random_bytes::<5>()
        .iter()
        .map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char)
        .collect()
}

fn meta(obj: &Value) -> &Value {
    &obj["metadata"]
}

fn meta_mut(obj: &mut Value) -> &mut Map<String, Value> {
    if !obj.is_object() {
        *obj = json!({});
    }
    let map = obj.as_object_mut().expect("object");
    let metadata = map.entry("metadata").or_insert_with(|| json!({}));
    if !metadata.is_object() {
        *metadata = json!({});
    }
    metadata.as_object_mut().expect("metadata object")
}

fn meta_str<'a>(obj: &'a Value, key: &str) -> &'a str {
    meta(obj)[key].as_str().unwrap_or("")
}

/// The object without metadata and status: what a change of bumps `metadata.generation`.
fn spec_part(obj: &Value) -> Value {
    let mut copy = obj.clone();
    if let Some(map) = copy.as_object_mut() {
        map.remove("metadata");
        map.remove("status");
    }
    copy
}

/// What the API server does to every write of some kinds: a Secret's `stringData` is folded
/// into `data`, base64-encoded.
fn normalize(resource: &ResourceType, obj: &mut Value) {
    use base64::Engine as _;
    if !(resource.group.is_empty() && resource.kind == "Secret") {
        return;
    }
    let Some(Value::Object(string_data)) = obj.as_object_mut().and_then(|m| m.remove("stringData"))
    else {
        return;
    };
    if !obj["data"].is_object() {
        obj["data"] = json!({});
    }
    for (k, v) in string_data {
        let text = v.as_str().unwrap_or_default().to_string();
        obj["data"][k] = json!(base64::engine::general_purpose::STANDARD.encode(text));
    }
}

fn has_finalizers(obj: &Value) -> bool {
    meta(obj)["finalizers"]
        .as_array()
        .is_some_and(|f| !f.is_empty())
}

impl Store {
    fn find_resource(&self, name: &str) -> Option<usize> {
        let by = |pred: &dyn Fn(&ResourceType) -> bool| self.resources.iter().position(pred);
        by(&|r| r.plural == name)
            .or_else(|| by(&|r| r.qualified_name() == name))
            .or_else(|| by(&|r| format!("{}/{}", r.api_version(), r.plural) == name))
            .or_else(|| by(&|r| r.kind == name))
    }

    fn next_rv(&mut self) -> u64 {
        self.rv += 1;
        self.rv
    }

    fn emit(
        &mut self,
        resource: usize,
        namespace: &str,
        kind: EventType,
        object: Value,
        old: Option<Value>,
    ) {
        self.history.push_back(StoredEvent {
            rv: self.rv,
            resource,
            namespace: namespace.to_string(),
            kind,
            object,
            old,
        });
        while self.history.len() > HISTORY_CAPACITY {
            if let Some(dropped) = self.history.pop_front() {
                self.oldest_rv = dropped.rv;
            }
        }
    }

    fn key(&self, resource: usize, namespace: Option<&str>, name: &str) -> ObjectKey {
        let ns = if self.resources[resource].namespaced {
            namespace.unwrap_or("")
        } else {
            ""
        };
        (resource, ns.to_string(), name.to_string())
    }

    fn dispatch(&mut self, req: &WriteRequest<'_>) -> Result<(u16, Value), ApiError> {
        let t = req.target;
        let resource = self.resources[t.resource].clone();
        match (&req.method, t.name.as_deref(), t.subresource.as_deref()) {
            (_, Some(_), Some(sub)) if sub != "status" || !resource.status => Err(ApiError::new(
                404,
                "NotFound",
                "the server could not find the requested resource",
            )),
            (&Method::GET, None, _) => self.list(t, req.query),
            (&Method::POST, None, _) => {
                if resource.namespaced && t.namespace.is_none() {
                    return Err(ApiError::new(
                        405,
                        "MethodNotAllowed",
                        "create needs a namespace in the path",
                    ));
                }
                let obj = parse_json(req.body)?;
                let ns = t.namespace.as_deref().unwrap_or("");
                self.create(t.resource, ns, obj, req.field_manager)
                    .map(|obj| (201, obj))
            }
            (&Method::DELETE, None, _) => self.delete_collection(t, req.query, req.body),
            (&Method::GET, Some(name), _) => {
                let key = self.key(t.resource, t.namespace.as_deref(), name);
                self.objects
                    .get(&key)
                    .cloned()
                    .map(|o| (200, o))
                    .ok_or_else(|| ApiError::not_found(&resource, name))
            }
            (&Method::PUT, Some(name), sub) => {
                let body = parse_json(req.body)?;
                self.replace(t, name, sub, body, req.field_manager)
                    .map(|o| (200, o))
            }
            (&Method::PATCH, Some(name), sub) => self.patch(req, name, sub),
            (&Method::DELETE, Some(name), None) => {
                let options = if req.body.is_empty() {
                    json!({})
                } else {
                    parse_json(req.body)?
                };
                let key = self.key(t.resource, t.namespace.as_deref(), name);
                let orphan = propagation(req.query, &options) == "Orphan";
                let preconditions = &options["preconditions"];
                let current = self
                    .objects
                    .get(&key)
                    .ok_or_else(|| ApiError::not_found(&resource, name))?;
                for (field, meta_key) in [("uid", "uid"), ("resourceVersion", "resourceVersion")] {
                    if let Some(want) = preconditions[field].as_str()
                        && want != meta_str(current, meta_key)
                    {
                        return Err(ApiError::conflict(&resource, name));
                    }
                }
                let obj = self
                    .delete_object(&key, orphan)
                    .ok_or_else(|| ApiError::not_found(&resource, name))?;
                Ok((200, obj))
            }
            _ => Err(ApiError::new(
                405,
                "MethodNotAllowed",
                format!("{} is not supported here", req.method),
            )),
        }
    }

    fn list(&self, t: &Target, query: &Query) -> Result<(u16, Value), ApiError> {
        let resource = &self.resources[t.resource];
        let selector = Selector::parse(query)?;
        let matching = self
            .objects
            .iter()
            .filter(|((r, ns, _), obj)| {
                *r == t.resource
                    && t.namespace.as_ref().is_none_or(|want| want == ns)
                    && selector.matches(obj)
            })
            .map(|(_, obj)| obj);
        // Only the page asked for is cloned: at 100,000 objects, cloning every object for
        // each page of 500 made a paginated list quadratic.
        let (list_rv, offset) = match query.get("continue").filter(|t| !t.is_empty()) {
            Some(token) => token
                .split_once('/')
                .and_then(|(rv, offset)| {
                    Some((rv.parse::<u64>().ok()?, offset.parse::<usize>().ok()?))
                })
                .ok_or_else(|| ApiError::bad_request("invalid continue token"))?,
            None => (self.rv, 0),
        };
        let limit = query
            .get("limit")
            .and_then(|l| l.parse::<usize>().ok())
            .filter(|l| *l > 0)
            .unwrap_or(usize::MAX);
        let mut matching = matching.skip(offset);
        let items: Vec<Value> = matching.by_ref().take(limit).cloned().collect();
        let remaining = matching.count();
        let mut list_meta = json!({"resourceVersion": list_rv.to_string()});
        if remaining > 0 {
            list_meta["continue"] = json!(format!("{list_rv}/{}", offset + items.len()));
            list_meta["remainingItemCount"] = json!(remaining);
        }
        Ok((
            200,
            json!({
                "kind": format!("{}List", resource.kind),
                "apiVersion": resource.api_version(),
                "metadata": list_meta,
                "items": items,
            }),
        ))
    }

    fn create(
        &mut self,
        index: usize,
        namespace: &str,
        mut obj: Value,
        manager: &str,
    ) -> Result<Value, ApiError> {
        let resource = self.resources[index].clone();
        if !obj.is_object() {
            return Err(ApiError::bad_request("the body must be a JSON object"));
        }
        if let Some(kind) = obj["kind"].as_str()
            && kind != resource.kind
        {
            return Err(ApiError::bad_request(format!(
                "kind {kind} does not match {}",
                resource.kind
            )));
        }
        obj["apiVersion"] = json!(resource.api_version());
        obj["kind"] = json!(resource.kind);
        let metadata = meta_mut(&mut obj);
        let mut name = metadata
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_string();
        if name.is_empty() {
            let prefix = metadata
                .get("generateName")
                .and_then(Value::as_str)
                .unwrap_or("");
            if prefix.is_empty() {
                return Err(ApiError::invalid(format!(
                    "{} \"\" is invalid: metadata.name: Required value: name or generateName is required",
                    resource.kind
                )));
            }
            name = format!("{prefix}{}", random_suffix());
        }
        metadata.insert("name".into(), json!(name));
        if resource.namespaced {
            let body_ns = metadata
                .get("namespace")
                .and_then(Value::as_str)
                .unwrap_or("");
            if !body_ns.is_empty() && body_ns != namespace {
                return Err(ApiError::bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request",
                ));
            }
            metadata.insert("namespace".into(), json!(namespace));
        } else {
            metadata.remove("namespace");
        }
        for key in [
            "uid",
            "resourceVersion",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "generation",
            "managedFields",
            "selfLink",
        ] {
            metadata.remove(key);
        }
        let key = self.key(index, Some(namespace), &name);
        if self.objects.contains_key(&key) {
            return Err(ApiError::already_exists(&resource, &name));
        }
        if resource.status
            && let Some(map) = obj.as_object_mut()
        {
            map.remove("status");
        }
        normalize(&resource, &mut obj);
        if resource.kind == "Namespace" {
            obj["status"] = json!({"phase": "Active"});
        }
        let fields = field_set_of(&obj, None);
        let rv = self.next_rv();
        let metadata = meta_mut(&mut obj);
        metadata.insert("uid".into(), json!(new_uid()));
        metadata.insert("creationTimestamp".into(), json!(now()));
        metadata.insert("resourceVersion".into(), json!(rv.to_string()));
        if resource.generation {
            metadata.insert("generation".into(), json!(1));
        }
        if !fields.is_empty() {
            let entry = ManagedEntry::new(manager, "Update", &resource.api_version(), None, fields);
            metadata.insert("managedFields".into(), json!([entry.to_json()]));
        }
        self.objects.insert(key.clone(), obj.clone());
        self.emit(index, &key.1, EventType::Added, obj.clone(), None);
        Ok(obj)
    }

    fn existing(&self, t: &Target, name: &str) -> Result<(ObjectKey, Value), ApiError> {
        let key = self.key(t.resource, t.namespace.as_deref(), name);
        let obj = self
            .objects
            .get(&key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(&self.resources[t.resource], name))?;
        Ok((key, obj))
    }

    fn check_identity(&self, t: &Target, name: &str, body: &Value) -> Result<(), ApiError> {
        let body_name = meta_str(body, "name");
        if !body_name.is_empty() && body_name != name {
            return Err(ApiError::bad_request(format!(
                "the name of the object ({body_name}) does not match the name on the URL ({name})"
            )));
        }
        let body_ns = meta_str(body, "namespace");
        if self.resources[t.resource].namespaced
            && !body_ns.is_empty()
            && Some(body_ns) != t.namespace.as_deref()
        {
            return Err(ApiError::bad_request(
                "the namespace of the provided object does not match the namespace sent on the request",
            ));
        }
        Ok(())
    }

    fn check_rv(
        &self,
        t: &Target,
        name: &str,
        body: &Value,
        current: &Value,
    ) -> Result<(), ApiError> {
        let wanted = meta_str(body, "resourceVersion");
        if !wanted.is_empty() && wanted != meta_str(current, "resourceVersion") {
            return Err(ApiError::conflict(&self.resources[t.resource], name));
        }
        Ok(())
    }

    fn replace(
        &mut self,
        t: &Target,
        name: &str,
        sub: Option<&str>,
        body: Value,
        manager: &str,
    ) -> Result<Value, ApiError> {
        if !body.is_object() {
            return Err(ApiError::bad_request("the body must be a JSON object"));
        }
        self.check_identity(t, name, &body)?;
        let (key, old) = self.existing(t, name)?;
        self.check_rv(t, name, &body, &old)?;
        self.update(&key, &old, body, sub, Managed::Update(manager))
    }

    fn patch(
        &mut self,
        req: &WriteRequest<'_>,
        name: &str,
        sub: Option<&str>,
    ) -> Result<(u16, Value), ApiError> {
        let t = req.target;
        let media = req.content_type.split(';').next().unwrap_or("").trim();
        match media {
            "application/apply-patch+yaml" => {
                let applied: Value = serde_yaml_ng::from_slice(req.body)
                    .map_err(|e| ApiError::bad_request(format!("error decoding YAML: {e}")))?;
                let manager = req.query.get("fieldManager").filter(|m| !m.is_empty()).ok_or_else(|| {
                    ApiError::invalid("PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: is required for apply patch")
                })?;
                self.apply(t, name, sub, applied, manager, truthy(req.query, "force"))
            }
            "application/merge-patch+json"
            | "application/strategic-merge-patch+json"
            | "application/json-patch+json" => {
                let patch = parse_json(req.body)?;
                let (key, old) = self.existing(t, name)?;
                let mut patched = old.clone();
                if media == "application/json-patch+json" {
                    json_patch(&mut patched, &patch).map_err(ApiError::invalid)?;
                } else {
                    if !patch.is_object() {
                        return Err(ApiError::bad_request("a merge patch must be a JSON object"));
                    }
                    self.check_identity(t, name, &patch)?;
                    self.check_rv(t, name, &patch, &old)?;
                    merge_patch(&mut patched, &patch);
                }
                if !meta_str(&patched, "resourceVersion").is_empty() {
                    self.check_rv(t, name, &patched, &old)?;
                }
                self.update(&key, &old, patched, sub, Managed::Update(req.field_manager))
                    .map(|o| (200, o))
            }
            other => Err(ApiError::new(
                415,
                "UnsupportedMediaType",
                format!(
                    "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml; got {other:?}"
                ),
            )),
        }
    }

    fn apply(
        &mut self,
        t: &Target,
        name: &str,
        sub: Option<&str>,
        mut applied: Value,
        manager: &str,
        force: bool,
    ) -> Result<(u16, Value), ApiError> {
        let resource = self.resources[t.resource].clone();
        if !applied.is_object() {
            return Err(ApiError::bad_request("an apply patch must be an object"));
        }
        self.check_identity(t, name, &applied)?;
        if let Some(map) = applied.as_object_mut() {
            if sub == Some("status") {
                map.retain(|k, _| k == "status" || k == "metadata");
            } else if resource.status {
                map.remove("status");
            }
        }
        let key = self.key(t.resource, t.namespace.as_deref(), name);
        let Some(old) = self.objects.get(&key).cloned() else {
            if sub.is_some() {
                return Err(ApiError::not_found(&resource, name));
            }
            let fields = field_set_of(&applied, None);
            let mut created = self.create(
                t.resource,
                t.namespace.as_deref().unwrap_or(""),
                applied,
                manager,
            )?;
            // `create` records an Update entry; an apply that creates records an Apply entry.
            let entry = ManagedEntry::new(manager, "Apply", &resource.api_version(), None, fields);
            meta_mut(&mut created).insert("managedFields".into(), json!([entry.to_json()]));
            self.objects.insert(key, created.clone());
            if let Some(last) = self.history.back_mut() {
                last.object = created.clone();
            }
            return Ok((201, created));
        };
        self.check_rv(t, name, &applied, &old)?;
        if sub == Some("status")
            && let Some(map) = applied.as_object_mut()
        {
            map.remove("metadata");
        }
        let metadata = meta_mut(&mut applied);
        for k in [
            "resourceVersion",
            "uid",
            "creationTimestamp",
            "generation",
            "managedFields",
            "deletionTimestamp",
            "selfLink",
        ] {
            metadata.remove(k);
        }
        let new_fields = field_set_of(&applied, sub);

        let mut merged = old.clone();
        apply_merge(&mut merged, &applied);

        let mut entries = ManagedEntry::read_all(&old);
        let mine = entries.iter().position(|e| {
            e.manager == manager && e.operation == "Apply" && e.subresource.as_deref() == sub
        });
        // Fields this manager applied before and dropped now go away unless someone else has them.
        let previous = mine.map(|i| entries[i].fields.clone()).unwrap_or_default();
        let mut dropped = Vec::new();
        previous.leaves(&mut Vec::new(), &mut dropped);
        for path in dropped {
            let kept_by_other = entries
                .iter()
                .enumerate()
                .any(|(i, e)| Some(i) != mine && e.fields.touches(&path));
            if !new_fields.touches(&path) && !kept_by_other {
                remove_path(&mut merged, &path);
            }
        }
        // Fields another manager owns with a different value conflict, unless forced.
        let mut applied_leaves = Vec::new();
        new_fields.leaves(&mut Vec::new(), &mut applied_leaves);
        let mut conflicts = Vec::new();
        for path in &applied_leaves {
            if value_at(&old, path) == value_at(&merged, path) {
                continue;
            }
            for (i, entry) in entries.iter().enumerate() {
                if Some(i) != mine && entry.manager != manager && entry.fields.touches(path) {
                    conflicts.push((i, path.clone()));
                }
            }
        }
        if !conflicts.is_empty() && !force {
            let list: Vec<String> = conflicts
                .iter()
                .map(|(i, path)| {
                    format!(
                        "conflict with \"{}\": {}",
                        entries[*i].manager,
                        path_to_string(path)
                    )
                })
                .collect();
            let message = format!(
                "Apply failed with {} conflict{}: {}",
                list.len(),
                if list.len() == 1 { "" } else { "s" },
                list.join("; ")
            );
            return Err(ApiError::for_object(
                409, "Conflict", &resource, name, message,
            ));
        }
        for (i, path) in &conflicts {
            entries[*i].fields.remove(path);
        }
        match mine {
            Some(i) if entries[i].fields != new_fields => {
                entries[i].fields = new_fields;
                entries[i].time = now();
            }
            Some(_) => {}
            None => entries.push(ManagedEntry::new(
                manager,
                "Apply",
                &resource.api_version(),
                sub,
                new_fields,
            )),
        }
        entries.retain(|e| !e.fields.is_empty());
        ManagedEntry::write_all(&mut merged, &entries);
        self.update(&key, &old, merged, sub, Managed::Computed)
            .map(|o| (200, o))
    }

    /// Stores `candidate` as the new state of the object at `key`, keeping what the client may
    /// not change. Returns the stored object; a candidate equal to `old` changes nothing.
    fn update(
        &mut self,
        key: &ObjectKey,
        old: &Value,
        mut candidate: Value,
        sub: Option<&str>,
        managed: Managed<'_>,
    ) -> Result<Value, ApiError> {
        let resource = self.resources[key.0].clone();
        if sub == Some("status") {
            let status = candidate.get("status").cloned();
            let managed_fields = meta(&candidate)["managedFields"].clone();
            candidate = old.clone();
            match status {
                Some(status) => candidate["status"] = status,
                None => {
                    if let Some(map) = candidate.as_object_mut() {
                        map.remove("status");
                    }
                }
            }
            if matches!(managed, Managed::Computed) {
                meta_mut(&mut candidate).insert("managedFields".into(), managed_fields);
            }
        } else if resource.status {
            match old.get("status") {
                Some(status) => candidate["status"] = status.clone(),
                None => {
                    if let Some(map) = candidate.as_object_mut() {
                        map.remove("status");
                    }
                }
            }
        }
        normalize(&resource, &mut candidate);
        candidate["apiVersion"] = json!(resource.api_version());
        candidate["kind"] = json!(resource.kind);
        let old_meta = meta(old).clone();
        let metadata = meta_mut(&mut candidate);
        for k in [
            "name",
            "namespace",
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "generation",
            "resourceVersion",
        ] {
            match old_meta.get(k) {
                Some(v) => metadata.insert(k.to_string(), v.clone()),
                None => metadata.remove(k),
            };
        }
        if let Managed::Update(manager) = managed {
            match old_meta.get("managedFields") {
                Some(v) => metadata.insert("managedFields".into(), v.clone()),
                None => metadata.remove("managedFields"),
            };
            if candidate == *old {
                return Ok(old.clone());
            }
            let changed = diff_set(old, &candidate);
            let mut entries = ManagedEntry::read_all(old);
            for entry in entries.iter_mut().filter(|e| e.manager != manager) {
                let mut leaves = Vec::new();
                changed.leaves(&mut Vec::new(), &mut leaves);
                for path in leaves {
                    entry.fields.remove(&path);
                }
            }
            match entries.iter_mut().find(|e| {
                e.manager == manager && e.operation == "Update" && e.subresource.as_deref() == sub
            }) {
                Some(entry) => {
                    entry.fields.union(&changed);
                    entry.time = now();
                }
                None => entries.push(ManagedEntry::new(
                    manager,
                    "Update",
                    &resource.api_version(),
                    sub,
                    changed,
                )),
            }
            entries.retain(|e| !e.fields.is_empty());
            ManagedEntry::write_all(&mut candidate, &entries);
        }
        if candidate == *old {
            return Ok(old.clone());
        }
        if resource.generation && spec_part(&candidate) != spec_part(old) {
            let generation = old_meta["generation"].as_i64().unwrap_or(0) + 1;
            meta_mut(&mut candidate).insert("generation".into(), json!(generation));
        }
        let rv = self.next_rv();
        meta_mut(&mut candidate).insert("resourceVersion".into(), json!(rv.to_string()));
        if !old_meta["deletionTimestamp"].is_null() && !has_finalizers(&candidate) {
            self.objects.remove(key);
            self.emit(key.0, &key.1, EventType::Deleted, candidate.clone(), None);
            self.collect_garbage(&old_meta["uid"], false);
            return Ok(candidate);
        }
        self.objects.insert(key.clone(), candidate.clone());
        self.emit(
            key.0,
            &key.1,
            EventType::Modified,
            candidate.clone(),
            Some(old.clone()),
        );
        Ok(candidate)
    }

    /// Deletes an object (or marks it deleted while finalizers remain) and what it owns.
    fn delete_object(&mut self, key: &ObjectKey, orphan: bool) -> Option<Value> {
        let old = self.objects.get(key)?.clone();
        let resource = self.resources[key.0].clone();
        if has_finalizers(&old) {
            if !meta(&old)["deletionTimestamp"].is_null() {
                return Some(old);
            }
            let mut marked = old.clone();
            let rv = self.next_rv();
            let metadata = meta_mut(&mut marked);
            metadata.insert("deletionTimestamp".into(), json!(now()));
            metadata.insert("deletionGracePeriodSeconds".into(), json!(0));
            metadata.insert("resourceVersion".into(), json!(rv.to_string()));
            if resource.generation {
                let generation = metadata
                    .get("generation")
                    .and_then(Value::as_i64)
                    .unwrap_or(0)
                    + 1;
                metadata.insert("generation".into(), json!(generation));
            }
            self.objects.insert(key.clone(), marked.clone());
            self.emit(
                key.0,
                &key.1,
                EventType::Modified,
                marked.clone(),
                Some(old),
            );
            return Some(marked);
        }
        self.objects.remove(key);
        let mut gone = old;
        let rv = self.next_rv();
        meta_mut(&mut gone).insert("resourceVersion".into(), json!(rv.to_string()));
        self.emit(key.0, &key.1, EventType::Deleted, gone.clone(), None);
        if resource.kind == "Namespace" && resource.group.is_empty() {
            let contents: Vec<ObjectKey> = self
                .objects
                .keys()
                .filter(|(r, ns, _)| self.resources[*r].namespaced && *ns == key.2)
                .cloned()
                .collect();
            for content in contents {
                self.delete_object(&content, false);
            }
        }
        self.collect_garbage(&meta(&gone)["uid"].clone(), orphan);
        Some(gone)
    }

    /// What the garbage collector does with background propagation: dependents none of whose
    /// owners exist any more are deleted. With `orphan`, the owner reference is removed instead.
    fn collect_garbage(&mut self, owner_uid: &Value, orphan: bool) {
        let Some(owner_uid) = owner_uid.as_str().filter(|u| !u.is_empty()) else {
            return;
        };
        let live_uids: std::collections::HashSet<String> = self
            .objects
            .values()
            .map(|o| meta_str(o, "uid").to_string())
            .collect();
        let dependents: Vec<(ObjectKey, Value)> = self
            .objects
            .iter()
            .filter(|(_, o)| {
                meta(o)["ownerReferences"]
                    .as_array()
                    .is_some_and(|refs| refs.iter().any(|r| r["uid"] == owner_uid))
            })
            .map(|(k, o)| (k.clone(), o.clone()))
            .collect();
        for (key, dependent) in dependents {
            let refs = meta(&dependent)["ownerReferences"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            let other_owner_lives = refs.iter().any(|r| {
                r["uid"] != owner_uid && r["uid"].as_str().is_some_and(|u| live_uids.contains(u))
            });
            if orphan || other_owner_lives {
                let mut updated = dependent.clone();
                let remaining: Vec<Value> =
                    refs.into_iter().filter(|r| r["uid"] != owner_uid).collect();
                let metadata = meta_mut(&mut updated);
                if remaining.is_empty() {
                    metadata.remove("ownerReferences");
                } else {
                    metadata.insert("ownerReferences".into(), Value::Array(remaining));
                }
                let rv = self.next_rv();
                metadata.insert("resourceVersion".into(), json!(rv.to_string()));
                self.objects.insert(key.clone(), updated.clone());
                self.emit(key.0, &key.1, EventType::Modified, updated, Some(dependent));
            } else {
                self.delete_object(&key, false);
            }
        }
    }

    fn delete_collection(
        &mut self,
        t: &Target,
        query: &Query,
        body: &[u8],
    ) -> Result<(u16, Value), ApiError> {
        let options = if body.is_empty() {
            json!({})
        } else {
            parse_json(body)?
        };
        let orphan = propagation(query, &options) == "Orphan";
        let selector = Selector::parse(query)?;
        let keys: Vec<ObjectKey> = self
            .objects
            .iter()
            .filter(|((r, ns, _), obj)| {
                *r == t.resource
                    && t.namespace.as_ref().is_none_or(|want| want == ns)
                    && selector.matches(obj)
            })
            .map(|(k, _)| k.clone())
            .collect();
        let mut items = Vec::new();
        for key in keys {
            if let Some(obj) = self.delete_object(&key, orphan) {
                items.push(obj);
            }
        }
        let resource = &self.resources[t.resource];
        Ok((
            200,
            json!({
                "kind": format!("{}List", resource.kind),
                "apiVersion": resource.api_version(),
                "metadata": {"resourceVersion": self.rv.to_string()},
                "items": items,
            }),
        ))
    }
}

fn parse_json(body: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("error decoding JSON: {e}")))
}

fn propagation(query: &Query, options: &Value) -> String {
    query
        .get("propagationPolicy")
        .cloned()
        .or_else(|| options["propagationPolicy"].as_str().map(str::to_string))
        .or_else(|| (options["orphanDependents"] == json!(true)).then(|| "Orphan".to_string()))
        .unwrap_or_else(|| "Background".to_string())
}

/// Who owns what a write changes.
enum Managed<'a> {
    /// A create, replace or patch by this manager: it takes the fields the write changed.
    Update(&'a str),
    /// An apply: `managedFields` is already in the candidate.
    Computed,
}

// ---------------------------------------------------------------------------------------------
// Patches

/// RFC 7386.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    let map = target.as_object_mut().expect("object");
    for (k, v) in patch {
        if v.is_null() {
            map.remove(k);
        } else {
            merge_patch(map.entry(k.clone()).or_insert(Value::Null), v);
        }
    }
}

/// RFC 6902.
fn json_patch(doc: &mut Value, ops: &Value) -> Result<(), String> {
    let ops = ops.as_array().ok_or("a JSON patch must be an array")?;
    for op in ops {
        let path = op["path"]
            .as_str()
            .ok_or("a JSON patch operation needs a path")?;
        match op["op"].as_str().unwrap_or("") {
            "add" => pointer_add(
                doc,
                path,
                op.get("value").cloned().ok_or("add needs a value")?,
            )?,
            "remove" => {
                pointer_remove(doc, path)?;
            }
            "replace" => {
                pointer_remove(doc, path)?;
                pointer_add(
                    doc,
                    path,
                    op.get("value").cloned().ok_or("replace needs a value")?,
                )?;
            }
            "move" => {
                let from = op["from"].as_str().ok_or("move needs from")?;
                let value = pointer_remove(doc, from)?;
                pointer_add(doc, path, value)?;
            }
            "copy" => {
                let from = op["from"].as_str().ok_or("copy needs from")?;
                let value = doc
                    .pointer(from)
                    .cloned()
                    .ok_or_else(|| format!("path {from} does not exist"))?;
                pointer_add(doc, path, value)?;
            }
            "test" => {
                if doc.pointer(path) != op.get("value") {
                    return Err(format!("test failed at {path}"));
                }
            }
            other => return Err(format!("unknown JSON patch operation {other:?}")),
        }
    }
    Ok(())
}

fn split_pointer(path: &str) -> Result<(String, String), String> {
    let index = path
        .rfind('/')
        .ok_or_else(|| format!("invalid JSON pointer {path:?}"))?;
    let last = path[index + 1..].replace("~1", "/").replace("~0", "~");
    Ok((path[..index].to_string(), last))
}

fn pointer_add(doc: &mut Value, path: &str, value: Value) -> Result<(), String> {
    if path.is_empty() {
        *doc = value;
        return Ok(());
    }
    let (parent, last) = split_pointer(path)?;
    match doc.pointer_mut(&parent) {
        Some(Value::Object(map)) => {
            map.insert(last, value);
            Ok(())
        }
        Some(Value::Array(items)) => {
            if last == "-" {
                items.push(value);
                return Ok(());
            }
            let index: usize = last
                .parse()
                .map_err(|_| format!("invalid array index {last:?}"))?;
            if index > items.len() {
                return Err(format!("index {index} out of range at {path}"));
            }
            items.insert(index, value);
            Ok(())
        }
        _ => Err(format!("path {parent:?} does not exist")),
    }
}

fn pointer_remove(doc: &mut Value, path: &str) -> Result<Value, String> {
    let (parent, last) = split_pointer(path)?;
    match doc.pointer_mut(&parent) {
        Some(Value::Object(map)) => map
            .remove(&last)
            .ok_or_else(|| format!("path {path:?} does not exist")),
        Some(Value::Array(items)) => {
            let index: usize = last
                .parse()
                .map_err(|_| format!("invalid array index {last:?}"))?;
            if index >= items.len() {
                return Err(format!("index {index} out of range at {path}"));
            }
            Ok(items.remove(index))
        }
        _ => Err(format!("path {parent:?} does not exist")),
    }
}

/// A list of objects that all have a string `name` merges by name under apply.
fn is_named_list(items: &[Value]) -> bool {
    !items.is_empty() && items.iter().all(|i| i["name"].is_string())
}

/// Server-side apply's merge, approximated: maps merge, named lists merge by name, anything
/// else is replaced. A null removes the field.
fn apply_merge(target: &mut Value, applied: &Value) {
    match (target, applied) {
        (Value::Object(target), Value::Object(applied)) => {
            for (k, v) in applied {
                if v.is_null() {
                    target.remove(k);
                } else if let Some(existing) = target.get_mut(k) {
                    apply_merge(existing, v);
                } else {
                    target.insert(k.clone(), v.clone());
                }
            }
        }
        (Value::Array(target), Value::Array(applied))
            if is_named_list(applied) && is_named_list(target) =>
        {
            for item in applied {
                match target.iter_mut().find(|t| t["name"] == item["name"]) {
                    Some(existing) => apply_merge(existing, item),
                    None => target.push(item.clone()),
                }
            }
        }
        (target, applied) => *target = applied.clone(),
    }
}

// ---------------------------------------------------------------------------------------------
// Managed fields

/// A `fieldsV1` set: keys `f:<field>` and `k:{"name":...}`; an empty node is an owned leaf,
/// a `.` child marks an owned list item.
#[derive(Clone, Debug, Default, PartialEq)]
struct FieldSet(BTreeMap<String, FieldSet>);

impl FieldSet {
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    fn from_json(v: &Value) -> FieldSet {
        FieldSet(
            v.as_object()
                .map(|m| {
                    m.iter()
                        .map(|(k, v)| (k.clone(), FieldSet::from_json(v)))
                        .collect()
                })
                .unwrap_or_default(),
        )
    }

    fn to_json(&self) -> Value {
        Value::Object(
            self.0
                .iter()
                .map(|(k, v)| (k.clone(), v.to_json()))
                .collect(),
        )
    }

    /// Paths of owned leaves.
    fn leaves(&self, prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
        for (k, child) in &self.0 {
            if k == "." {
                continue;
            }
            prefix.push(k.clone());
            if child.is_empty() || child.0.contains_key(".") {
                out.push(prefix.clone());
            }
            child.leaves(prefix, out);
            prefix.pop();
        }
    }

    /// Whether the set owns `path`, something above it or something under it.
    fn touches(&self, path: &[String]) -> bool {
        let mut node = self;
        for segment in path {
            match node.0.get(segment) {
                Some(child) if child.is_empty() => return true,
                Some(child) => node = child,
                None => return false,
            }
        }
        true
    }

    fn remove(&mut self, path: &[String]) -> bool {
        let Some((first, rest)) = path.split_first() else {
            return false;
        };
        if rest.is_empty() {
            self.0.remove(first);
        } else if let Some(child) = self.0.get_mut(first)
            && child.remove(rest)
        {
            self.0.remove(first);
        }
        self.0.is_empty()
    }

    fn union(&mut self, other: &FieldSet) {
        for (k, child) in &other.0 {
            self.0.entry(k.clone()).or_default().union(child);
        }
    }
}

/// The fields an applied object sets. For the main resource, apiVersion, kind, name and
/// namespace are identity, not fields; for `status`, only `.status` counts.
fn field_set_of(obj: &Value, sub: Option<&str>) -> FieldSet {
    let mut copy = obj.clone();
    if let Some(map) = copy.as_object_mut() {
        map.remove("apiVersion");
        map.remove("kind");
        if sub == Some("status") {
            map.retain(|k, _| k == "status");
        }
        if let Some(Value::Object(metadata)) = map.get_mut("metadata") {
            for k in [
                "name",
                "namespace",
                "uid",
                "resourceVersion",
                "creationTimestamp",
                "generation",
                "managedFields",
                "generateName",
            ] {
                metadata.remove(k);
            }
            if metadata.is_empty() {
                map.remove("metadata");
            }
        }
    }
    fields_of_value(&copy)
}

fn fields_of_value(v: &Value) -> FieldSet {
    let mut set = FieldSet::default();
    match v {
        Value::Object(map) => {
            for (k, child) in map {
                if child.is_null() {
                    continue;
                }
                set.0.insert(format!("f:{k}"), fields_of_child(child));
            }
        }
        Value::Array(items) if is_named_list(items) => {
            for item in items {
                let mut child = fields_of_value(item);
                child.0.insert(".".into(), FieldSet::default());
                set.0
                    .insert(format!("k:{}", json!({"name": item["name"]})), child);
            }
        }
        _ => {}
    }
    set
}

fn fields_of_child(child: &Value) -> FieldSet {
    match child {
        Value::Object(map) if !map.is_empty() => fields_of_value(child),
        Value::Array(items) if is_named_list(items) => fields_of_value(child),
        _ => FieldSet::default(),
    }
}

/// The leaf fields that differ between two objects (ignoring bookkeeping metadata).
fn diff_set(old: &Value, new: &Value) -> FieldSet {
    fn walk(old: Option<&Value>, new: Option<&Value>, set: &mut FieldSet) {
        let (Some(Value::Object(o)), Some(Value::Object(n))) = (old, new) else {
            return;
        };
        for k in o.keys().chain(n.keys()) {
            let key = format!("f:{k}");
            if set.0.contains_key(&key) {
                continue;
            }
            let (ov, nv) = (o.get(k), n.get(k));
            if ov == nv {
                continue;
            }
            match (ov, nv) {
                (Some(Value::Object(_)), Some(Value::Object(_))) => {
                    let mut child = FieldSet::default();
                    walk(ov, nv, &mut child);
                    if !child.is_empty() {
                        set.0.insert(key, child);
                    }
                }
                (_, Some(value)) => {
                    set.0.insert(key, fields_of_child(value));
                }
                (_, None) => {}
            }
        }
    }
    let strip = |v: &Value| {
        let mut copy = v.clone();
        if let Some(Value::Object(metadata)) = copy.get_mut("metadata") {
            metadata.remove("managedFields");
            metadata.remove("resourceVersion");
        }
        copy
    };
    let mut set = FieldSet::default();
    walk(Some(&strip(old)), Some(&strip(new)), &mut set);
    set
}

fn path_to_string(path: &[String]) -> String {
    path.iter()
        .map(|s| match s.strip_prefix("f:") {
            Some(field) => format!(".{field}"),
            None => format!("[{}]", s.trim_start_matches("k:")),
        })
        .collect()
}

fn list_item_matches(item: &Value, key: &str) -> bool {
    let Some(json_key) = key.strip_prefix("k:") else {
        return false;
    };
    let Ok(Value::Object(wanted)) = serde_json::from_str::<Value>(json_key) else {
        return false;
    };
    wanted.iter().all(|(k, v)| item.get(k) == Some(v))
}

fn value_at<'a>(obj: &'a Value, path: &[String]) -> Option<&'a Value> {
    let mut node = obj;
    for segment in path {
        node = match (segment.strip_prefix("f:"), node) {
            (Some(field), Value::Object(map)) => map.get(field)?,
            (None, Value::Array(items)) => items.iter().find(|i| list_item_matches(i, segment))?,
            _ => return None,
        };
    }
    Some(node)
}

/// Removes the field at `path`, and maps that become empty by it.
fn remove_path(obj: &mut Value, path: &[String]) -> bool {
    let Some((first, rest)) = path.split_first() else {
        return false;
    };
    match (first.strip_prefix("f:"), &mut *obj) {
        (Some(field), Value::Object(map)) => {
            if rest.is_empty() {
                map.remove(field);
            } else if let Some(child) = map.get_mut(field)
                && remove_path(child, rest)
            {
                map.remove(field);
            }
            map.is_empty()
        }
        (None, Value::Array(items)) => {
            if rest.is_empty() {
                items.retain(|i| !list_item_matches(i, first));
            } else if let Some(child) = items.iter_mut().find(|i| list_item_matches(i, first)) {
                remove_path(child, rest);
            }
            items.is_empty()
        }
        _ => false,
    }
}

#[derive(Clone, Debug)]
struct ManagedEntry {
    manager: String,
    operation: String,
    api_version: String,
    time: String,
    subresource: Option<String>,
    fields: FieldSet,
}

impl ManagedEntry {
    fn new(
        manager: &str,
        operation: &str,
        api_version: &str,
        subresource: Option<&str>,
        fields: FieldSet,
    ) -> Self {
        Self {
            manager: manager.to_string(),
            operation: operation.to_string(),
            api_version: api_version.to_string(),
            time: now(),
            subresource: subresource.map(str::to_string),
            fields,
        }
    }

    fn read_all(obj: &Value) -> Vec<ManagedEntry> {
        meta(obj)["managedFields"]
            .as_array()
            .map(|entries| {
                entries
                    .iter()
                    .map(|e| ManagedEntry {
                        manager: e["manager"].as_str().unwrap_or("").to_string(),
                        operation: e["operation"].as_str().unwrap_or("").to_string(),
                        api_version: e["apiVersion"].as_str().unwrap_or("").to_string(),
                        time: e["time"].as_str().unwrap_or("").to_string(),
                        subresource: e["subresource"].as_str().map(str::to_string),
                        fields: FieldSet::from_json(&e["fieldsV1"]),
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    fn to_json(&self) -> Value {
        let mut entry = json!({
            "manager": self.manager,
            "operation": self.operation,
            "apiVersion": self.api_version,
            "time": self.time,
            "fieldsType": "FieldsV1",
            "fieldsV1": self.fields.to_json(),
        });
        if let Some(sub) = &self.subresource {
            entry["subresource"] = json!(sub);
        }
        entry
    }

    fn write_all(obj: &mut Value, entries: &[ManagedEntry]) {
        let metadata = meta_mut(obj);
        if entries.is_empty() {
            metadata.remove("managedFields");
        } else {
            metadata.insert(
                "managedFields".into(),
                Value::Array(entries.iter().map(ManagedEntry::to_json).collect()),
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Selectors

#[derive(Debug)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
}

#[derive(Debug, Default)]
struct Selector {
    labels: Vec<Requirement>,
    /// (dotted path, value, equal)
    fields: Vec<(String, String, bool)>,
}

fn split_top_level(s: &str) -> Vec<String> {
    let mut parts = Vec::new();
    let mut depth = 0;
    let mut current = String::new();
    for c in s.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(std::mem::take(&mut current));
                continue;
            }
            _ => {}
        }
        current.push(c);
    }
    parts.push(current);
    parts
        .into_iter()
        .map(|p| p.trim().to_string())
        .filter(|p| !p.is_empty())
        .collect()
}

fn parse_set(s: &str) -> Result<Vec<String>, ApiError> {
    let inner = s
        .trim()
        .strip_prefix('(')
        .and_then(|s| s.strip_suffix(')'))
        .ok_or_else(|| ApiError::bad_request(format!("invalid label selector set {s:?}")))?;
    Ok(inner
        .split(',')
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .collect())
}

impl Selector {
    fn parse(query: &Query) -> Result<Selector, ApiError> {
        let mut selector = Selector::default();
        for term in split_top_level(query.get("labelSelector").map(String::as_str).unwrap_or("")) {
            let requirement = if let Some((k, v)) = term.split_once("!=") {
                Requirement::NotEquals(k.trim().into(), v.trim().into())
            } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                Requirement::Equals(k.trim().into(), v.trim().into())
            } else if let Some((k, set)) = term.split_once(" notin ") {
                Requirement::NotIn(k.trim().into(), parse_set(set)?)
            } else if let Some((k, set)) = term.split_once(" in ") {
                Requirement::In(k.trim().into(), parse_set(set)?)
            } else if let Some(k) = term.strip_prefix('!') {
                Requirement::DoesNotExist(k.trim().into())
            } else if term.contains(' ') || term.contains('(') {
                return Err(ApiError::bad_request(format!(
                    "unable to parse requirement: {term:?}"
                )));
            } else {
                Requirement::Exists(term)
            };
            selector.labels.push(requirement);
        }
        for term in split_top_level(query.get("fieldSelector").map(String::as_str).unwrap_or("")) {
            let field = if let Some((k, v)) = term.split_once("!=") {
                (k.trim().to_string(), v.trim().to_string(), false)
            } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
                (k.trim().to_string(), v.trim().to_string(), true)
            } else {
                return Err(ApiError::bad_request(format!(
                    "invalid field selector: {term:?}"
                )));
            };
            selector.fields.push(field);
        }
        Ok(selector)
    }

    fn matches(&self, obj: &Value) -> bool {
        let labels = &meta(obj)["labels"];
        let label = |k: &str| labels[k].as_str();
        let labels_match = self.labels.iter().all(|r| match r {
            Requirement::Equals(k, v) => label(k) == Some(v.as_str()),
            Requirement::NotEquals(k, v) => label(k) != Some(v.as_str()),
            Requirement::In(k, set) => label(k).is_some_and(|l| set.iter().any(|v| v == l)),
            Requirement::NotIn(k, set) => label(k).is_none_or(|l| !set.iter().any(|v| v == l)),
            Requirement::Exists(k) => label(k).is_some(),
            Requirement::DoesNotExist(k) => label(k).is_none(),
        });
        labels_match
            && self.fields.iter().all(|(path, want, equal)| {
                let mut node = obj;
                for segment in path.split('.') {
                    node = &node[segment];
                }
                let actual = match node {
                    Value::String(s) => s.clone(),
                    Value::Null => String::new(),
                    other => other.to_string(),
                };
                (actual == *want) == *equal
            })
    }
}

// ---------------------------------------------------------------------------------------------
// Watch

fn bookmark(resource: &ResourceType, rv: u64, initial_events_end: bool) -> Value {
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if initial_events_end {
        metadata["annotations"] = json!({"k8s.io/initial-events-end": "true"});
    }
    json!({"type": "BOOKMARK", "object": {"kind": resource.kind, "apiVersion": resource.api_version(), "metadata": metadata}})
}

fn expired(rv: u64, oldest: u64) -> Value {
    json!({"type": "ERROR", "object": ApiError::new(410, "Expired", format!("too old resource version: {rv} ({oldest})")).to_status()})
}

fn start_watch(inner: Arc<Inner>, target: Target, query: &Query) -> Response<Body> {
    let selector = match Selector::parse(query) {
        Ok(selector) => selector,
        Err(error) => return error_response(&error),
    };
    let requested_rv = query.get("resourceVersion").cloned().unwrap_or_default();
    let from_rv = if requested_rv.is_empty() || requested_rv == "0" {
        None
    } else {
        match requested_rv.parse::<u64>() {
            Ok(rv) => Some(rv),
            Err(_) => {
                return error_response(&ApiError::bad_request(format!(
                    "invalid resource version {requested_rv:?}"
                )));
            }
        }
    };
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|t| t.parse::<u64>().ok())
        .map(Duration::from_secs)
        .unwrap_or(DEFAULT_WATCH_TIMEOUT);
    let options = WatchOptions {
        target,
        selector,
        from_rv,
        send_initial_events: truthy(query, "sendInitialEvents"),
        bookmarks: truthy(query, "allowWatchBookmarks"),
        timeout,
    };
    let (tx, rx) = mpsc::channel::<Bytes>(64);
    tokio::spawn(run_watch(inner, options, tx));
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|bytes| (Ok::<_, Infallible>(Frame::data(bytes)), rx))
    });
    Response::builder()
        .status(200)
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(StreamBody::new(stream).boxed_unsync())
        .unwrap_or_else(|_| Response::new(Full::new(Bytes::new()).boxed_unsync()))
}

struct WatchOptions {
    target: Target,
    selector: Selector,
    from_rv: Option<u64>,
    send_initial_events: bool,
    bookmarks: bool,
    timeout: Duration,
}

fn line(event: &Value) -> Bytes {
    let mut bytes = serde_json::to_vec(event).unwrap_or_default();
    bytes.push(b'\n');
    Bytes::from(bytes)
}

/// The events of the history after `after` that this watch sees, or `None` when they are gone.
fn pending_events(store: &Store, options: &WatchOptions, after: u64) -> Option<Vec<Value>> {
    if after < store.oldest_rv {
        return None;
    }
    let target = &options.target;
    let start = store.history.partition_point(|e| e.rv <= after);
    let mut events = Vec::new();
    for event in store.history.range(start..) {
        if event.resource != target.resource
            || target
                .namespace
                .as_ref()
                .is_some_and(|ns| *ns != event.namespace)
        {
            continue;
        }
        let now_matches = options.selector.matches(&event.object);
        let kind = match (event.kind, &event.old) {
            (EventType::Modified, Some(old)) => {
                match (options.selector.matches(old), now_matches) {
                    (true, true) => Some(EventType::Modified),
                    (false, true) => Some(EventType::Added),
                    (true, false) => Some(EventType::Deleted),
                    (false, false) => None,
                }
            }
            (kind, _) => now_matches.then_some(kind),
        };
        if let Some(kind) = kind {
            events.push(json!({"type": kind.as_str(), "object": event.object}));
        }
    }
    Some(events)
}

async fn run_watch(inner: Arc<Inner>, options: WatchOptions, tx: mpsc::Sender<Bytes>) {
    let deadline = tokio::time::Instant::now() + options.timeout;
    let mut rv_rx = inner.rv_tx.subscribe();
    let mut epoch_rx = inner.epoch_tx.subscribe();
    epoch_rx.mark_unchanged();
    let resource = lock(&inner.store).resources[options.target.resource].clone();

    let (initial, mut last) = {
        let store = lock(&inner.store);
        match options.from_rv {
            Some(rv) if !options.send_initial_events => {
                if rv < store.oldest_rv {
                    (vec![expired(rv, store.oldest_rv)], u64::MAX)
                } else {
                    (Vec::new(), rv)
                }
            }
            _ => {
                let t = &options.target;
                let mut initial: Vec<Value> = store
                    .objects
                    .iter()
                    .filter(|((r, ns, _), obj)| {
                        *r == t.resource
                            && t.namespace.as_ref().is_none_or(|want| want == ns)
                            && options.selector.matches(obj)
                    })
                    .map(|(_, obj)| json!({"type": "ADDED", "object": obj}))
                    .collect();
                if options.send_initial_events {
                    initial.push(bookmark(&resource, store.rv, true));
                }
                (initial, store.rv)
            }
        }
    };
    for event in initial {
        if tx.send(line(&event)).await.is_err() {
            return;
        }
    }
    if last == u64::MAX {
        return;
    }

    let bookmark_interval = *lock(&inner.bookmark_interval);
    let mut next_bookmark = tokio::time::Instant::now() + bookmark_interval;
    loop {
        rv_rx.mark_unchanged();
        let pending = {
            let store = lock(&inner.store);
            let events = pending_events(&store, &options, last);
            let oldest = store.oldest_rv;
            if events.is_some() {
                last = last.max(store.rv);
            }
            events.ok_or(oldest)
        };
        match pending {
            Ok(events) => {
                for event in events {
                    if tx.send(line(&event)).await.is_err() {
                        return;
                    }
                }
            }
            Err(oldest) => {
                let _ = tx.send(line(&expired(last, oldest))).await;
                return;
            }
        }
        tokio::select! {
            _ = rv_rx.changed() => {}
            _ = tokio::time::sleep_until(next_bookmark), if options.bookmarks => {
                next_bookmark = tokio::time::Instant::now() + bookmark_interval;
                if tx.send(line(&bookmark(&resource, last, false))).await.is_err() {
                    return;
                }
            }
            _ = tokio::time::sleep_until(deadline) => return,
            _ = epoch_rx.changed() => return,
            _ = tx.closed() => return,
        }
    }
}
