//! The policy stream: every operator replica serves, over HTTPS, each ScopePolicy's policy
//! document to the sidecars that follow it, first whole, then only what changed (the wire
//! format is [`crate::policy::stream`]). A mounted ConfigMap reaches a sidecar after the
//! kubelet's sync (60–90 s); the stream reaches it as soon as this replica's registry,
//! signing keys or revocations change.
//!
//! - `GET /v1/policies/{namespace}/{name}` with `Authorization: Bearer <token>`: a projected
//!   ServiceAccount token with the audience `keygate`, checked with a TokenReview (results
//!   cached for a minute, by the token's SHA-256). A sidecar may follow only ScopePolicies
//!   of its own namespace (the ServiceAccount's); anything else is 401 or 403.
//! - Every replica builds documents itself (the same [`PolicyDocument::build`] the leader
//!   uses for the ConfigMap), so any replica can serve any sidecar and none waits for the
//!   leader. [`PolicyHub`] builds each followed ScopePolicy's document once per change and
//!   hands the same serialized line to every stream that follows it.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use kube::api::PostParams;
use kube::{Api, Client};
use tokio::sync::{Semaphore, broadcast, watch};

use crate::policy::PolicyDocument;
use crate::policy::stream::{CLIENTS_PER_LINE, PolicyDelta, StreamEvent};
use crate::registry::{ObjectKey, Revocations, Snapshot};
use crate::token::keys::IssuerKeys;

/// The audience a sidecar's projected ServiceAccount token must carry.
pub const AUDIENCE: &str = "keygate";
/// How often a quiet stream sends a heartbeat.
pub const HEARTBEAT: Duration = Duration::from_secs(15);
/// How long a TokenReview's answer is reused.
const REVIEW_TTL: Duration = Duration::from_secs(60);
/// The most cached TokenReview answers; the cache is emptied when full.
const MAX_CACHED_REVIEWS: usize = 10_000;
/// TokenReviews in flight at once; further requests wait for a slot, at most
/// [`REVIEW_QUEUE_WAIT`], then get 503.
const MAX_REVIEWS_IN_FLIGHT: usize = 16;
/// TokenReviews one address may cause: a burst, then one per [`REVIEW_REFILL`]. A sidecar
/// needs one per connection at most (answers are cached for [`REVIEW_TTL`]), so this only
/// slows down a caller that sends token after token to make the API server do the work.
const REVIEW_BURST: u32 = 20;
const REVIEW_REFILL: Duration = Duration::from_millis(500);
/// Addresses whose budgets are remembered; idle ones are forgotten first when full.
const MAX_BUDGETS: usize = 10_000;
const REVIEW_QUEUE_WAIT: Duration = Duration::from_secs(5);
/// The longest bearer token looked at (a projected token is about 1 KiB).
const MAX_TOKEN_BYTES: usize = 16 * 1024;
/// Changes a slow stream may fall behind before it is sent a new snapshot instead.
const BACKLOG: usize = 64;
/// Changes arriving within this window are built into one.
const COALESCE: Duration = Duration::from_millis(20);

/// What a document is built from: this replica's registry, signing keys and revocations.
#[derive(Clone)]
pub struct Inputs {
    pub registry: watch::Receiver<Arc<Snapshot>>,
    pub keys: watch::Receiver<Arc<IssuerKeys>>,
    pub revocations: Arc<Revocations>,
    pub issuer: String,
}

impl Inputs {
    fn build(&self, key: &ObjectKey) -> Option<PolicyDocument> {
        let snapshot = self.registry.borrow().clone();
        let keys = self.keys.borrow().clone();
        PolicyDocument::build(
            &snapshot,
            key,
            &self.issuer,
            &keys.jwks,
            &self.revocations.current(),
        )
        .ok()
    }
}

/// A line of the stream, serialized once for every follower.
#[derive(Clone)]
struct Line {
    revision: u64,
    bytes: Bytes,
}

fn lines(events: &[StreamEvent]) -> Bytes {
    let mut bytes = Vec::new();
    for event in events {
        serde_json::to_writer(&mut bytes, event).expect("stream events serialize");
        bytes.push(b'\n');
    }
    Bytes::from(bytes)
}

/// A followed ScopePolicy's document at a revision, and its snapshot line once a follower
/// asked for it: serialized once per revision, however many followers connect.
struct Current {
    revision: u64,
    document: Arc<PolicyDocument>,
    snapshot: Option<Line>,
}

impl Current {
    fn snapshot(&mut self) -> Line {
        let (revision, document) = (self.revision, &self.document);
        self.snapshot
            .get_or_insert_with(|| Line {
                revision,
                bytes: lines(&StreamEvent::snapshot_lines(revision, document)),
            })
            .clone()
    }
}

/// One followed ScopePolicy: its current document and the changes since.
struct Channel {
    current: Mutex<Current>,
    changes: broadcast::Sender<Line>,
}

/// The followed ScopePolicies of this replica.
pub struct PolicyHub {
    inputs: Inputs,
    channels: Mutex<HashMap<ObjectKey, Arc<Channel>>>,
    closed: std::sync::atomic::AtomicBool,
}

impl PolicyHub {
    /// Starts the hub: a task rebuilds followed documents whenever an input changes.
    pub fn spawn(inputs: Inputs) -> Arc<Self> {
        let hub = Arc::new(Self {
            inputs,
            channels: Mutex::default(),
            closed: std::sync::atomic::AtomicBool::new(false),
        });
        let weak = Arc::downgrade(&hub);
        let mut inputs = hub.inputs.clone();
        let mut revocations = hub.inputs.revocations.subscribe();
        tokio::spawn(async move {
            loop {
                let changed = tokio::select! {
                    r = inputs.registry.changed() => r.is_ok(),
                    r = inputs.keys.changed() => r.is_ok(),
                    r = revocations.changed() => r.is_ok(),
                };
                if !changed {
                    return;
                }
                tokio::time::sleep(COALESCE).await;
                inputs.registry.mark_unchanged();
                inputs.keys.mark_unchanged();
                revocations.mark_unchanged();
                let Some(hub) = weak.upgrade() else { return };
                // Building and comparing documents of many clients takes a while: not on a
                // worker that serves the streams.
                if tokio::task::spawn_blocking(move || hub.rebuild())
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
        hub
    }

    /// Rebuilds every followed document and sends what changed; forgets ScopePolicies
    /// nobody follows any more.
    fn rebuild(&self) {
        let channels: Vec<(ObjectKey, Arc<Channel>)> = {
            let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
            channels.retain(|_, channel| channel.changes.receiver_count() > 0);
            channels
                .iter()
                .map(|(k, c)| (k.clone(), c.clone()))
                .collect()
        };
        for (key, channel) in channels {
            // A document that no longer builds (the ScopePolicy is gone or its rules broke)
            // is not sent: followers keep the last good one, as with the ConfigMap.
            let Some(document) = self.inputs.build(&key) else {
                continue;
            };
            let mut current = channel.current.lock().unwrap_or_else(|p| p.into_inner());
            let Some(delta) = PolicyDelta::between(&current.document, &document) else {
                continue;
            };
            let revision = current.revision + 1;
            *current = Current {
                revision,
                document: Arc::new(document),
                snapshot: None,
            };
            // A change that touches most clients (a role granted to all of them) travels
            // as a new snapshot, in lines of bounded size.
            let line = if delta.upsert_clients.len() > CLIENTS_PER_LINE {
                current.snapshot()
            } else {
                Line {
                    revision,
                    bytes: lines(&[StreamEvent::Change {
                        revision,
                        delta: Box::new(delta),
                    }]),
                }
            };
            let _ = channel.changes.send(line);
        }
    }

    /// The current document of `key` and the changes after it, or `None` when there is no
    /// such valid ScopePolicy here.
    fn follow(&self, key: &ObjectKey) -> Option<(Line, broadcast::Receiver<Line>)> {
        let channel = {
            let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
            if self.is_closed() {
                return None;
            }
            match channels.get(key) {
                Some(channel) => channel.clone(),
                None => {
                    let document = self.inputs.build(key)?;
                    let channel = Arc::new(Channel {
                        current: Mutex::new(Current {
                            revision: 1,
                            document: Arc::new(document),
                            snapshot: None,
                        }),
                        changes: broadcast::channel(BACKLOG).0,
                    });
                    channels.insert(key.clone(), channel.clone());
                    channel
                }
            }
        };
        // Subscribe under the lock that rebuild holds while it sends, so no change falls
        // between the snapshot and the subscription.
        let mut current = channel.current.lock().unwrap_or_else(|p| p.into_inner());
        let receiver = channel.changes.subscribe();
        Some((current.snapshot(), receiver))
    }

    /// Ends every stream (at shutdown): their followers reconnect to another replica. No
    /// new stream starts.
    pub fn close(&self) {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        self.closed.store(true, std::sync::atomic::Ordering::SeqCst);
        channels.clear();
    }

    /// Whether [`PolicyHub::close`] was called.
    pub fn is_closed(&self) -> bool {
        self.closed.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The current snapshot of `key`, for a follower that fell behind.
    fn snapshot(&self, key: &ObjectKey) -> Option<Line> {
        let channel = self
            .channels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)?
            .clone();
        let mut current = channel.current.lock().unwrap_or_else(|p| p.into_inner());
        Some(current.snapshot())
    }
}

/// Whether `token` is shaped like a JWT (three base64url parts), as every ServiceAccount token
/// is: anything else is refused without asking the API server.
fn looks_like_a_jwt(token: &str) -> bool {
    let parts: Vec<&str> = token.split('.').collect();
    parts.len() == 3
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// Who a token belongs to, as a TokenReview says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reviewed {
    /// The ServiceAccount's namespace.
    pub namespace: String,
    /// `system:serviceaccount:<namespace>:<name>`.
    pub username: String,
}

/// Why a follower is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No token, or one the API server does not vouch for with the audience `keygate`.
    Unauthenticated,
    /// Too many TokenReviews in flight, or the API server did not answer.
    Unavailable,
    /// This address caused too many TokenReviews lately.
    Throttled,
}

/// How many TokenReviews each address may still cause: a token bucket per address, in a
/// table of bounded size.
#[derive(Default)]
struct ReviewBudgets {
    /// Address → (tokens left, when they were counted).
    buckets: HashMap<IpAddr, (u32, Instant)>,
}

impl ReviewBudgets {
    /// Takes one review from `address`'s budget at `now`, or says there is none left.
    fn take(&mut self, address: IpAddr, now: Instant) -> bool {
        let refilled = |(left, at): (u32, Instant)| {
            let earned = now.saturating_duration_since(at).as_millis() / REVIEW_REFILL.as_millis();
            let earned = u32::try_from(earned).unwrap_or(u32::MAX);
            if earned == 0 {
                (left, at)
            } else {
                (left.saturating_add(earned).min(REVIEW_BURST), now)
            }
        };
        if self.buckets.len() >= MAX_BUDGETS && !self.buckets.contains_key(&address) {
            self.buckets
                .retain(|_, bucket| refilled(*bucket).0 < REVIEW_BURST);
            if self.buckets.len() >= MAX_BUDGETS {
                // Bounded memory first: every address starts again with a full budget.
                self.buckets.clear();
            }
        }
        let bucket = self
            .buckets
            .get(&address)
            .copied()
            .map_or((REVIEW_BURST, now), refilled);
        let Some(left) = bucket.0.checked_sub(1) else {
            self.buckets.insert(address, bucket);
            return false;
        };
        self.buckets.insert(address, (left, bucket.1));
        true
    }
}

/// A TokenReview's answer (`None`: not vouched for) and when it came, by token digest.
type ReviewCache = HashMap<[u8; 32], (Instant, Option<Reviewed>)>;

/// Checks sidecars' tokens with TokenReviews, cached.
pub struct Reviewer {
    client: Client,
    cache: Mutex<ReviewCache>,
    budgets: Mutex<ReviewBudgets>,
    in_flight: Semaphore,
}

impl Reviewer {
    pub fn new(client: Client) -> Self {
        Self {
            client,
            cache: Mutex::default(),
            budgets: Mutex::default(),
            in_flight: Semaphore::new(MAX_REVIEWS_IN_FLIGHT),
        }
    }

    /// Who `token`, shown by `peer`, belongs to.
    pub async fn review(&self, token: &str, peer: IpAddr) -> Result<Reviewed, Refusal> {
        if token.len() > MAX_TOKEN_BYTES || !looks_like_a_jwt(token) {
            return Err(Refusal::Unauthenticated);
        }
        let digest: [u8; 32] =
            aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, token.as_bytes())
                .as_ref()
                .try_into()
                .expect("32 bytes");
        if let Some((at, answer)) = self
            .cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&digest)
            .cloned()
            && at.elapsed() < REVIEW_TTL
        {
            return answer.ok_or(Refusal::Unauthenticated);
        }
        let allowed = self
            .budgets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take(peer, Instant::now());
        if !allowed {
            return Err(Refusal::Throttled);
        }
        // After an operator restart every sidecar reconnects at once: wait a little for a
        // slot rather than turn a burst into refusals; a flood still gets 503s.
        let _permit = tokio::time::timeout(REVIEW_QUEUE_WAIT, self.in_flight.acquire())
            .await
            .map_err(|_| Refusal::Unavailable)?
            .map_err(|_| Refusal::Unavailable)?;
        let review = TokenReview {
            spec: TokenReviewSpec {
                token: Some(token.to_owned()),
                audiences: Some(vec![AUDIENCE.to_owned()]),
            },
            ..TokenReview::default()
        };
        let api: Api<TokenReview> = Api::all(self.client.clone());
        let answer = match api.create(&PostParams::default(), &review).await {
            Ok(answer) => answer,
            Err(error) => {
                tracing::warn!(%error, "TokenReview failed");
                return Err(Refusal::Unavailable);
            }
        };
        let reviewed = answer.status.and_then(|status| {
            let audiences_ok = status
                .audiences
                .as_ref()
                .is_some_and(|a| a.iter().any(|a| a == AUDIENCE));
            if status.authenticated != Some(true) || !audiences_ok {
                return None;
            }
            let username = status.user?.username?;
            let rest = username.strip_prefix("system:serviceaccount:")?;
            let (namespace, _name) = rest.split_once(':')?;
            Some(Reviewed {
                namespace: namespace.to_owned(),
                username: username.clone(),
            })
        });
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= MAX_CACHED_REVIEWS {
            cache.clear();
        }
        cache.insert(digest, (Instant::now(), reviewed.clone()));
        reviewed.ok_or(Refusal::Unauthenticated)
    }
}

#[derive(Clone)]
struct ServerState {
    hub: Arc<PolicyHub>,
    reviewer: Arc<Reviewer>,
}

/// The stream's routes.
pub fn router(hub: Arc<PolicyHub>, reviewer: Arc<Reviewer>) -> Router {
    Router::new()
        .route("/v1/policies/{namespace}/{name}", get(follow))
        .with_state(ServerState { hub, reviewer })
}

fn refuse(status: StatusCode, error: &'static str, description: &'static str) -> Response {
    let body = serde_json::json!({"error": error, "error_description": description});
    let mut response = (status, axum::Json(body)).into_response();
    if status == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            header::HeaderValue::from_static("Bearer realm=\"keygate\""),
        );
    }
    response
}

async fn follow(
    State(state): State<ServerState>,
    Path((namespace, name)): Path<(String, String)>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Response {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim)
        .unwrap_or_default();
    let reviewed = match state.reviewer.review(token, peer.ip()).await {
        Ok(reviewed) => reviewed,
        Err(Refusal::Unauthenticated) => {
            return refuse(
                StatusCode::UNAUTHORIZED,
                "invalid_token",
                "a ServiceAccount token with the audience keygate is required",
            );
        }
        Err(Refusal::Unavailable) => {
            return refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                "temporarily_unavailable",
                "the token could not be checked; retry",
            );
        }
        Err(Refusal::Throttled) => {
            tracing::warn!(%peer, "too many token checks from one address");
            return refuse(
                StatusCode::TOO_MANY_REQUESTS,
                "slow_down",
                "too many token checks from this address; retry later",
            );
        }
    };
    if reviewed.namespace != namespace {
        tracing::warn!(username = %reviewed.username, %namespace, %name, "a ServiceAccount asked to follow a ScopePolicy of another namespace");
        return refuse(
            StatusCode::FORBIDDEN,
            "access_denied",
            "a sidecar may follow only ScopePolicies of its own namespace",
        );
    }
    let key = ObjectKey::new(&namespace, &name);
    if state.hub.is_closed() {
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            "temporarily_unavailable",
            "this replica is shutting down; another one serves the stream",
        );
    }
    let Some((snapshot, changes)) = state.hub.follow(&key) else {
        return refuse(
            StatusCode::NOT_FOUND,
            "not_found",
            "no such ScopePolicy with valid rules",
        );
    };
    tracing::debug!(username = %reviewed.username, policy = %key, "a sidecar follows its policy");
    let hub = state.hub.clone();
    let stream = futures::stream::unfold(
        (Some(snapshot), changes, 0u64, hub, key),
        |(first, mut changes, mut revision, hub, key)| async move {
            if let Some(first) = first {
                revision = first.revision;
                return Some((
                    Ok::<_, Infallible>(first.bytes),
                    (None, changes, revision, hub, key),
                ));
            }
            loop {
                match tokio::time::timeout(HEARTBEAT, changes.recv()).await {
                    Err(_) => {
                        let beat = lines(&[StreamEvent::Heartbeat {}]);
                        return Some((Ok(beat), (None, changes, revision, hub, key)));
                    }
                    Ok(Ok(change)) if change.revision <= revision => continue,
                    Ok(Ok(change)) => {
                        revision = change.revision;
                        return Some((Ok(change.bytes), (None, changes, revision, hub, key)));
                    }
                    Ok(Err(broadcast::error::RecvError::Lagged(_))) => {
                        // Fell behind: start again from the current document.
                        let snapshot = hub.snapshot(&key)?;
                        revision = snapshot.revision;
                        return Some((Ok(snapshot.bytes), (None, changes, revision, hub, key)));
                    }
                    Ok(Err(broadcast::error::RecvError::Closed)) => return None,
                }
            }
        },
    );
    Response::builder()
        .header(header::CONTENT_TYPE, "application/x-ndjson")
        .header(header::CACHE_CONTROL, "no-store")
        .body(Body::from_stream(stream))
        .expect("a valid response")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_address_may_cause_a_burst_of_reviews_then_one_per_refill() {
        let mut budgets = ReviewBudgets::default();
        let (one, other) = (IpAddr::from([10, 0, 0, 1]), IpAddr::from([10, 0, 0, 2]));
        let start = Instant::now();
        for _ in 0..REVIEW_BURST {
            assert!(budgets.take(one, start));
        }
        assert!(!budgets.take(one, start), "the burst is spent");
        assert!(budgets.take(other, start), "another address has its own");
        assert!(!budgets.take(one, start + REVIEW_REFILL / 2));
        assert!(budgets.take(one, start + REVIEW_REFILL), "one refilled");
        assert!(!budgets.take(one, start + REVIEW_REFILL));
        // Bounded: a flood of addresses does not grow the table past its size.
        for i in 0..(MAX_BUDGETS as u32 + 10) {
            budgets.take(IpAddr::from(i.to_be_bytes()), start);
        }
        assert!(budgets.buckets.len() <= MAX_BUDGETS);
    }

    #[test]
    fn only_jwt_shaped_tokens_are_reviewed() {
        assert!(looks_like_a_jwt(
            "eyJhbGciOiJSUzI1NiJ9.eyJhdWQiOlsia2V5Z2F0ZSJdfQ.c2ln-_"
        ));
        for bad in [
            "",
            "not-a-token",
            "a.b",
            "a..c",
            "a.b.c.d",
            "a.b.c d",
            "a.b+/.c",
        ] {
            assert!(!looks_like_a_jwt(bad), "{bad}");
        }
    }
}
