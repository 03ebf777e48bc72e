//! The sidecar's request path: normalise the path, find the rule, check the credential,
//! answer 401/403 or forward. Policies are swapped atomically; without one it fails closed.

use std::borrow::Cow;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use http::uri::PathAndQuery;
use http::{HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use tokio::sync::watch;

use super::auth::{AuthFailure, Caller, LoadedPolicy, header_safe};
use super::clients::ClientStore;
use super::forward::{ForwardError, Forwarder, Identity, Peer, ProxyBody, UpgradeRequest};
use super::jwks::JwksCache;
use super::lane::UpstreamLane;
use crate::audit::{self, AuditConfig, AuditTrail, Scopes};
use crate::connections::{ConnectionLimits, http_builder, serve_connections};
use crate::credentials::unix_now;
use crate::policy::stream::PolicyDelta;
use crate::policy::{Access, PolicyDocument, RuleRef, normalize};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    outcome: &'static str,
    rule: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct UpstreamLabels {
    kind: &'static str,
}

struct Metrics {
    decisions: Family<DecisionLabels, Counter>,
    verify_seconds: Histogram,
    cache_hits: Counter,
    upstream_errors: Family<UpstreamLabels, Counter>,
    policy_generation: Gauge,
    policy_clients: Gauge,
    policy_changed: Gauge,
    stream_up: Gauge,
    reload_errors: Counter,
    audit_dropped: Counter,
}

impl Metrics {
    fn register(registry: &mut prometheus_client::registry::Registry) -> Self {
        let metrics = Self {
            decisions: Family::default(),
            verify_seconds: Histogram::new(exponential_buckets(0.000_005, 2.0, 16)),
            cache_hits: Counter::default(),
            upstream_errors: Family::default(),
            policy_generation: Gauge::default(),
            policy_clients: Gauge::default(),
            policy_changed: Gauge::default(),
            stream_up: Gauge::default(),
            reload_errors: Counter::default(),
            audit_dropped: Counter::default(),
        };
        let r = registry.sub_registry_with_prefix("keygate_sidecar");
        r.register(
            "decisions",
            "Requests by outcome and matched rule",
            metrics.decisions.clone(),
        );
        r.register(
            "verify_duration_seconds",
            "Time to check a credential",
            metrics.verify_seconds.clone(),
        );
        r.register(
            "verify_cache_hits",
            "Credential checks answered from the cache",
            metrics.cache_hits.clone(),
        );
        r.register(
            "upstream_errors",
            "Requests the workload could not answer",
            metrics.upstream_errors.clone(),
        );
        r.register(
            "policy_generation",
            "Policies installed since start",
            metrics.policy_generation.clone(),
        );
        r.register(
            "policy_clients",
            "Clients in the policy in force",
            metrics.policy_clients.clone(),
        );
        r.register(
            "policy_last_change_timestamp_seconds",
            "When the policy in force last changed (Unix seconds)",
            metrics.policy_changed.clone(),
        );
        r.register(
            "policy_stream_up",
            "1 while the policy stream is live (its snapshot installed), else 0",
            metrics.stream_up.clone(),
        );
        r.register(
            "policy_reload_errors",
            "Policy files refused on reload",
            metrics.reload_errors.clone(),
        );
        r.register(
            "audit_dropped",
            "Refusal audit events left out over the refusal rate (--audit-refused-per-second)",
            metrics.audit_dropped.clone(),
        );
        metrics
    }
}

/// The policy in force, with the `decisions` series of the requests it forwards.
struct InForce {
    policy: LoadedPolicy,
    /// Per rule (by index, the default action last) and outcome (allowed, public): the
    /// series, looked up at the first such request instead of at every one.
    forwarded: Box<[[OnceLock<Counter>; 2]]>,
}

impl InForce {
    fn new(policy: LoadedPolicy) -> Self {
        let slots = policy.compiled().len() + 1;
        let forwarded = (0..slots).map(|_| Default::default()).collect();
        Self { policy, forwarded }
    }
}

/// The name a metric or audit event gives the default action.
const DEFAULT_RULE: &str = "(default)";

/// One sidecar: the current policy, the forwarder, shared JWKS caches and metrics.
pub struct Sidecar {
    policy: ArcSwapOption<InForce>,
    forwarder: Forwarder,
    jwks: Mutex<HashMap<String, Arc<JwksCache>>>,
    http: reqwest::Client,
    leeway: Duration,
    metrics: Metrics,
    audit: AuditTrail,
    ready: watch::Sender<bool>,
    /// The policy stream is connected and has delivered its snapshot: the policy file (the
    /// ConfigMap, refreshed only on the kubelet's sync) is then older than what is in force.
    stream_live: std::sync::atomic::AtomicBool,
    /// Held while a policy is installed or changed: a change of the stream always applies to
    /// the stream's policy, never to a file installed meanwhile.
    installing: Mutex<()>,
}

impl Sidecar {
    pub fn new(
        forwarder: Forwarder,
        leeway: Duration,
        audit: AuditConfig,
        metrics: &mut prometheus_client::registry::Registry,
    ) -> Arc<Self> {
        let metrics = Metrics::register(metrics);
        Arc::new(Self {
            audit: AuditTrail::new(audit, metrics.audit_dropped.clone()),
            policy: ArcSwapOption::empty(),
            forwarder,
            jwks: Mutex::new(HashMap::new()),
            http: reqwest::Client::new(),
            leeway,
            metrics,
            ready: watch::Sender::new(false),
            stream_live: std::sync::atomic::AtomicBool::new(false),
            installing: Mutex::new(()),
        })
    }

    /// Marks the policy stream down (it is live from its snapshot's installation on).
    pub fn set_stream_down(&self) {
        self.stream_live
            .store(false, std::sync::atomic::Ordering::SeqCst);
        self.metrics.stream_up.set(0);
    }

    /// Whether the policy stream is live.
    pub fn stream_live(&self) -> bool {
        self.stream_live.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Installs a policy read from the policy file, the bootstrap and the fallback of the
    /// policy stream: skipped while the stream is live, and never dropping a revocation the
    /// policy in force has (a revocation only ever refuses more, and the file may be older
    /// than what the stream delivered). A file whose clients were left out (too many for a
    /// ConfigMap) keeps the clients in force.
    pub fn install_from_file(&self, mut document: PolicyDocument) -> Result<bool, String> {
        let _installing = self.installing.lock().unwrap_or_else(|p| p.into_inner());
        if self.stream_live() {
            return Ok(false);
        }
        let current = self
            .policy
            .load_full()
            .filter(|current| current.policy.document.policy == document.policy);
        if let Some(current) = &current {
            document
                .revocations
                .absorb(&current.policy.document.revocations);
            document.revocations.prune(crate::credentials::unix_now());
        }
        let loaded = match current {
            Some(current) if document.clients_omitted => current
                .policy
                .keeping_clients(document, |uri| self.jwks_cache(uri)),
            _ => LoadedPolicy::load(document, |uri| self.jwks_cache(uri)),
        };
        self.put(loaded).map(|()| true)
    }

    /// True once a valid policy is installed.
    pub fn ready(&self) -> watch::Receiver<bool> {
        self.ready.subscribe()
    }

    /// Installs a whole policy; on error the previous one stays in force.
    pub fn install(&self, document: PolicyDocument) -> Result<(), String> {
        let _installing = self.installing.lock().unwrap_or_else(|p| p.into_inner());
        self.put(LoadedPolicy::load(document, |uri| self.jwks_cache(uri)))
    }

    /// Installs the policy stream's snapshot (`document`'s clients are in `clients`) and
    /// marks the stream live: the policy file is not read until it is down again.
    pub fn install_snapshot(
        &self,
        document: PolicyDocument,
        clients: ClientStore,
    ) -> Result<(), String> {
        let _installing = self.installing.lock().unwrap_or_else(|p| p.into_inner());
        self.put(LoadedPolicy::with_clients(document, clients, |uri| {
            self.jwks_cache(uri)
        }))?;
        self.stream_live
            .store(true, std::sync::atomic::Ordering::SeqCst);
        self.metrics.stream_up.set(1);
        Ok(())
    }

    /// Applies a change of the policy stream to the policy in force (the stream's: the file
    /// is not installed while the stream is live).
    pub fn apply_change(&self, delta: &PolicyDelta) -> Result<(), String> {
        let _installing = self.installing.lock().unwrap_or_else(|p| p.into_inner());
        let current = self
            .policy
            .load_full()
            .ok_or("a change with no policy in force")?;
        self.put(current.policy.apply(delta, |uri| self.jwks_cache(uri)))
    }

    fn jwks_cache(&self, uri: &str) -> Arc<JwksCache> {
        let mut caches = self.jwks.lock().unwrap_or_else(|p| p.into_inner());
        caches
            .entry(uri.to_owned())
            .or_insert_with(|| JwksCache::new(uri.to_owned(), self.http.clone()))
            .clone()
    }

    fn put(&self, loaded: Result<LoadedPolicy, String>) -> Result<(), String> {
        match loaded {
            Ok(loaded) => {
                let clients = loaded.client_count();
                self.policy.store(Some(Arc::new(InForce::new(loaded))));
                self.metrics.policy_generation.inc();
                self.metrics
                    .policy_clients
                    .set(i64::try_from(clients).unwrap_or(i64::MAX));
                self.metrics
                    .policy_changed
                    .set(i64::try_from(unix_now()).unwrap_or(i64::MAX));
                self.ready.send_replace(true);
                Ok(())
            }
            Err(e) => {
                self.metrics.reload_errors.inc();
                Err(e)
            }
        }
    }

    /// Records a refused policy file.
    pub fn reload_failed(&self) {
        self.metrics.reload_errors.inc();
    }

    /// Answers one request of the caller connection from `peer`, forwarding it over `lane`,
    /// that connection's own upstream connection, when it has one ([`Forwarder::lane`]).
    pub async fn handle(
        &self,
        req: Request<Incoming>,
        peer: &Peer,
        lane: Option<&UpstreamLane>,
    ) -> Response<ProxyBody> {
        let mut seen = Seen {
            method: req.method(),
            path: None,
            rule: "",
            peer: peer.addr,
            policy: None,
            caller: None,
        };
        let Some(in_force) = self.policy.load_full() else {
            return self.refuse(
                &seen,
                "no_policy",
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "no valid policy is loaded",
                None,
            );
        };
        let policy = &in_force.policy;
        seen.policy = Some(policy);
        let path = match normalize(req.uri().path()) {
            Ok(path) => path,
            Err(e) => {
                return self.refuse(
                    &seen,
                    "bad_request",
                    StatusCode::BAD_REQUEST,
                    "invalid_request",
                    &e.to_string(),
                    None,
                );
            }
        };
        seen.path = Some(&path);
        // Only WebSocket upgrades are ever forwarded; `h2c` is ignored (UpgradeRequest::None,
        // its headers are removed on the way), anything else is refused here.
        let upgrade = UpgradeRequest::of(req.method(), req.version(), req.headers());
        if let UpgradeRequest::Unsupported(reason) = upgrade {
            return self.refuse(
                &seen,
                "bad_request",
                StatusCode::BAD_REQUEST,
                "invalid_request",
                reason,
                None,
            );
        }
        // What the workload is asked for: the request's own target (shared, not copied) when
        // its path was normal already.
        let target = match (&path, req.uri().path_and_query()) {
            (Cow::Borrowed(_), Some(target)) => Ok(target.clone()),
            _ => match req.uri().query() {
                Some(query) => PathAndQuery::try_from(format!("{path}?{query}")),
                None => PathAndQuery::try_from(path.as_ref()),
            },
        };
        let Ok(target) = target else {
            return self.refuse(
                &seen,
                "bad_request",
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "the request target is invalid",
                None,
            );
        };
        let decision = policy.compiled().decide(req.method(), &path);
        seen.rule = decision.rule.map_or(DEFAULT_RULE, |r| r.name);
        let requirement = match decision.access {
            // A tunnel is bound to a verified caller: public rules never open one.
            Access::Public if upgrade == UpgradeRequest::WebSocket => {
                return self.refuse(
                    &seen,
                    "denied",
                    StatusCode::FORBIDDEN,
                    "access_denied",
                    "WebSocket upgrades need a rule that authenticates the caller",
                    None,
                );
            }
            Access::Public => {
                self.audit(&seen, "public", None);
                let counter = self.forwarded(&in_force, decision.rule, Forwarded::Public);
                return self
                    .forward(req, target, Ok(None), (peer, lane), policy, counter)
                    .await;
            }
            Access::Deny => {
                return self.refuse(
                    &seen,
                    "denied",
                    StatusCode::FORBIDDEN,
                    "access_denied",
                    "no rule allows this request",
                    None,
                );
            }
            Access::Authenticated => None,
            Access::Scopes(requirement) => Some(requirement),
        };
        let started = Instant::now();
        let result = policy
            .authenticate(req.headers(), self.leeway, unix_now())
            .await;
        self.metrics
            .verify_seconds
            .observe(started.elapsed().as_secs_f64());
        let caller = match result {
            Ok((caller, cache_hit)) => {
                if cache_hit {
                    self.metrics.cache_hits.inc();
                }
                caller
            }
            Err(AuthFailure::Missing) => {
                let challenge = format!("Bearer realm=\"{}\"", policy.realm());
                return self.refuse(
                    &seen,
                    "unauthenticated",
                    StatusCode::UNAUTHORIZED,
                    "invalid_token",
                    "a credential is required",
                    Some(challenge),
                );
            }
            Err(failure) => {
                seen.caller = failure.caller();
                let reason = header_safe(failure.reason());
                let challenge = format!(
                    "Bearer realm=\"{}\", error=\"invalid_token\", error_description=\"{reason}\"",
                    policy.realm()
                );
                return self.refuse(
                    &seen,
                    "invalid_credential",
                    StatusCode::UNAUTHORIZED,
                    "invalid_token",
                    &reason,
                    Some(challenge),
                );
            }
        };
        seen.caller = Some(&*caller);
        if let Some(requirement) = requirement
            && !requirement.is_satisfied_by(&caller.scopes)
        {
            let challenge = format!(
                "Bearer realm=\"{}\", error=\"insufficient_scope\", scope=\"{}\"",
                policy.realm(),
                requirement.scope_param()
            );
            return self.refuse(
                &seen,
                "forbidden",
                StatusCode::FORBIDDEN,
                "insufficient_scope",
                "the credential lacks a required scope",
                Some(challenge),
            );
        }
        self.audit(&seen, "allowed", None);
        let counter = self.forwarded(&in_force, decision.rule, Forwarded::Allowed);
        let identity = caller.identity().map(Some);
        self.forward(req, target, identity, (peer, lane), policy, counter)
            .await
    }

    /// The `decisions` series of requests `rule` forwards as `outcome`.
    fn forwarded<'a>(
        &self,
        in_force: &'a InForce,
        rule: Option<RuleRef<'_>>,
        outcome: Forwarded,
    ) -> Option<&'a Counter> {
        let index = rule.map_or(in_force.policy.compiled().len(), |r| r.index);
        let slot = &in_force.forwarded.get(index)?[outcome as usize];
        Some(slot.get_or_init(|| {
            let labels = DecisionLabels {
                outcome: outcome.label(),
                rule: rule.map_or(DEFAULT_RULE, |r| r.name).to_owned(),
            };
            self.metrics.decisions.get_or_create(&labels).clone()
        }))
    }

    /// Forwards an authorised request (`identity`, `Ok(None)` on a public route) and counts
    /// it in `counter`.
    async fn forward(
        &self,
        req: Request<Incoming>,
        target: PathAndQuery,
        identity: Result<Option<&Identity>, ForwardError>,
        (peer, lane): (&Peer, Option<&UpstreamLane>),
        policy: &LoadedPolicy,
        counter: Option<&Counter>,
    ) -> Response<ProxyBody> {
        let forward_authorization = policy.document.spec.upstream.forward_authorization;
        let forwarded = match identity {
            Ok(identity) => {
                self.forwarder
                    .try_forward(req, target, identity, peer, forward_authorization, lane)
                    .await
            }
            Err(error) => Err(error),
        };
        let response = match forwarded {
            Ok(response) => response,
            Err(e) => {
                self.metrics
                    .upstream_errors
                    .get_or_create(&UpstreamLabels { kind: e.as_label() })
                    .inc();
                e.into_response()
            }
        };
        if let Some(counter) = counter {
            counter.inc();
        }
        response
    }

    /// Answers a request the sidecar refuses itself, counted and audited.
    fn refuse(
        &self,
        seen: &Seen<'_>,
        outcome: &'static str,
        status: StatusCode,
        error: &str,
        description: &str,
        challenge: Option<String>,
    ) -> Response<ProxyBody> {
        self.metrics
            .decisions
            .get_or_create(&DecisionLabels {
                outcome,
                rule: seen.rule.to_owned(),
            })
            .inc();
        self.audit(seen, outcome, Some((status, description)));
        plain(status, error, description, challenge)
    }

    /// Writes the audit event of a decision (docs/audit.md): a refusal (its status and the
    /// reason told to the caller) unless over the refusal rate, an allowed request if sampled.
    /// Nothing is built for an event that is not written.
    fn audit(&self, seen: &Seen<'_>, outcome: &'static str, refusal: Option<(StatusCode, &str)>) {
        let suppressed = match refusal {
            None if self.audit.sample_allowed() => 0,
            None => return,
            Some(_) => match self.audit.admit_refusal(seen.caller.is_some()) {
                Some(suppressed) => suppressed,
                None => return,
            },
        };
        let caller = seen.caller;
        tracing::info!(
            target: audit::TARGET,
            kind = "sidecar.decision",
            outcome,
            status = refusal.map(|(status, _)| status.as_u16()),
            reason = refusal.map(|(_, reason)| reason),
            client_id = caller.map(|c| &*c.client_id),
            credential = caller.map(|c| c.method.as_str()),
            key_fingerprint = caller.and_then(Caller::key_fingerprint),
            jti = caller.and_then(Caller::jti),
            method = %seen.method,
            path = seen.path,
            rule = (!seen.rule.is_empty()).then_some(seen.rule),
            scopes = caller.map(|c| tracing::field::display(Scopes(&c.scopes))),
            peer = %seen.peer,
            policy = seen.policy.map(|p| p.document.policy.as_str()),
            resource = seen.policy.map(|p| p.document.resource.as_str()),
            suppressed = (suppressed > 0).then_some(suppressed),
        );
    }
}

/// How a forwarded request was authorised, the index of its series in [`InForce`].
#[derive(Clone, Copy)]
enum Forwarded {
    Allowed = 0,
    Public = 1,
}

impl Forwarded {
    fn label(self) -> &'static str {
        match self {
            Self::Allowed => "allowed",
            Self::Public => "public",
        }
    }
}

/// What the audit event of a decision says of its request, filled in as the request path
/// learns it and borrowed from it.
struct Seen<'a> {
    method: &'a http::Method,
    /// The normalised path the rules matched (never the query string).
    path: Option<&'a str>,
    /// The matched rule's name, empty before the rules are consulted.
    rule: &'a str,
    peer: SocketAddr,
    policy: Option<&'a LoadedPolicy>,
    /// The verified caller, once authenticated.
    caller: Option<&'a Caller>,
}

/// A short JSON answer from the sidecar itself.
fn plain(
    status: StatusCode,
    error: &str,
    description: &str,
    challenge: Option<String>,
) -> Response<ProxyBody> {
    let body = serde_json::json!({ "error": error, "error_description": description }).to_string();
    let mut response = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    if let Some(challenge) = challenge.and_then(|c| HeaderValue::from_str(&c).ok()) {
        headers.insert(header::WWW_AUTHENTICATE, challenge);
    }
    response
}

/// Serves the sidecar on `listener` (HTTP/1.1 and h2c, upgrades allowed) until `shutdown`
/// resolves, then waits up to `drain` for in-flight requests.
pub async fn serve(
    listener: tokio::net::TcpListener,
    sidecar: Arc<Sidecar>,
    shutdown: impl std::future::Future<Output = ()>,
    drain: Duration,
) -> std::io::Result<()> {
    let limits = ConnectionLimits::default().with_drain(drain);
    serve_with_limits(listener, sidecar, shutdown, limits).await
}

/// [`serve`] within `limits`: connection cap, header-read and idle timeouts, drain time.
pub async fn serve_with_limits(
    listener: tokio::net::TcpListener,
    sidecar: Arc<Sidecar>,
    shutdown: impl std::future::Future<Output = ()>,
    limits: ConnectionLimits,
) -> std::io::Result<()> {
    let builder = http_builder(&limits);
    serve_connections(listener, shutdown, limits, |stream, peer, watcher| {
        let sidecar = sidecar.clone();
        let peer = Peer::new(peer);
        // This connection's own way to the workload, driven below in its task.
        let (lane, lane_driver) = sidecar.forwarder.lane();
        let service = hyper::service::service_fn(move |req: Request<Incoming>| {
            let (sidecar, lane, peer) = (sidecar.clone(), lane.clone(), peer.clone());
            async move {
                Ok::<_, std::convert::Infallible>(sidecar.handle(req, &peer, Some(&lane)).await)
            }
        });
        let connection = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), watcher.track(service))
            .into_owned();
        async move {
            tokio::select! {
                result = watcher.watch(connection) => {
                    if let Err(error) = result {
                        tracing::debug!(%error, "connection ended with an error");
                    }
                }
                () = lane_driver => {}
            }
        }
    })
    .await;
    Ok(())
}

/// Reads the policy file at `path` now and every `interval` after, installing each new
/// valid version. A ConfigMap mount changes through a symlink swap, so the content is
/// compared, not modification times. Returns the error when the first read fails.
pub async fn watch_policy_file(
    path: PathBuf,
    sidecar: Arc<Sidecar>,
    interval: Duration,
) -> Result<impl std::future::Future<Output = ()>, String> {
    let read = |path: &PathBuf| -> Result<(u64, PolicyDocument), String> {
        let bytes = std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        bytes.hash(&mut hasher);
        let document =
            PolicyDocument::parse(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
        Ok((hasher.finish(), document))
    };
    let (mut last, document) = read(&path)?;
    sidecar
        .install_from_file(document)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(async move {
        let mut ticker = tokio::time::interval(interval);
        loop {
            ticker.tick().await;
            if sidecar.stream_live() {
                // The stream is newer; the file is read again once the stream is down.
                continue;
            }
            let bytes = match std::fs::read(&path) {
                Ok(bytes) => bytes,
                Err(error) => {
                    tracing::warn!(path = %path.display(), %error, "cannot read the policy file; keeping the last good policy");
                    continue;
                }
            };
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            bytes.hash(&mut hasher);
            let hash = hasher.finish();
            if hash == last {
                continue;
            }
            last = hash;
            let installed = match PolicyDocument::parse(&bytes) {
                Ok(document) => sidecar.install_from_file(document),
                Err(error) => {
                    sidecar.reload_failed();
                    Err(error.to_string())
                }
            };
            match installed {
                Ok(true) => tracing::info!(path = %path.display(), "policy reloaded"),
                Ok(false) => {}
                Err(error) => {
                    tracing::error!(path = %path.display(), %error, "invalid policy file; keeping the last good policy")
                }
            }
        }
    })
}
