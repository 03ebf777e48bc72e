//! The authorization server: OAuth 2.0 client credentials (RFC 6749 §4.4) with resource
//! indicators (RFC 8707), RFC 9068 JWT access tokens, JWKS, RFC 8414 metadata, RFC 7009
//! revocation and RFC 7662 introspection. It reads only the in-memory registry.

pub mod access_token;
mod client_auth;
mod error;
pub mod keys;

pub use client_auth::{AuthMethod, MAX_CLIENT_ID_BYTES, ReplayCache, Throttle};
pub use error::{ErrorCode, OAuthError};

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use serde_json::json;
use tokio::sync::watch;

use crate::audit::{self, AuditConfig, AuditTrail};
use crate::credentials::unix_now;
use crate::grants::grant;
use crate::registry::{ClientView, RevocationList, RevocationStore, Revocations, Snapshot};
use access_token::{AccessClaims, new_jti};
use client_auth::{Authenticated, Params, Presented, authenticate, presented};
use keys::IssuerKeys;

/// Settings of the token server.
#[derive(Debug, Clone)]
pub struct TokenConfig {
    /// The issuer identifier (`iss`), an https URL in production; endpoints live below it.
    pub issuer: String,
    /// Lifetime of tokens for clients that do not set one.
    pub default_lifetime: Duration,
    /// Upper bound on every token's lifetime.
    pub max_lifetime: Duration,
    /// Clock skew tolerated in assertions and tokens presented back.
    pub leeway: Duration,
    /// Largest accepted request body.
    pub max_body_bytes: usize,
    /// Time a client has to send its request body (after the head).
    pub body_read_timeout: Duration,
    /// Most tokens of one client revoked one by one and not yet expired; revoking one more
    /// revokes every token of the client issued up to that token instead (a per-client "not
    /// before"), so the revocation list every sidecar receives stays bounded.
    pub max_revoked_tokens_per_client: usize,
    /// Most tokens revoked one by one and not yet expired, over all clients; beyond it, as
    /// beyond the per-client bound.
    pub max_revoked_tokens: usize,
    /// What the audit trail writes (docs/audit.md).
    pub audit: AuditConfig,
}

impl TokenConfig {
    /// Defaults for `issuer`: 1 h tokens, 24 h at most, 30 s leeway, 16 KiB bodies read
    /// within 10 s, 1,000 revoked tokens per client and 10,000 in all.
    pub fn new(issuer: impl Into<String>) -> Self {
        Self {
            issuer: issuer.into().trim_end_matches('/').to_owned(),
            default_lifetime: Duration::from_secs(3600),
            max_lifetime: Duration::from_secs(24 * 3600),
            leeway: Duration::from_secs(30),
            max_body_bytes: 16 * 1024,
            body_read_timeout: crate::connections::DEFAULT_HEADER_READ_TIMEOUT,
            max_revoked_tokens_per_client: 1_000,
            max_revoked_tokens: 10_000,
            audit: AuditConfig::default(),
        }
    }

    /// The token endpoint URL.
    pub fn token_endpoint(&self) -> String {
        format!("{}/oauth2/token", self.issuer)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AlgLabels {
    alg: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusedLabels {
    error: String,
}

/// Token server metrics.
#[derive(Debug)]
struct Metrics {
    issued: Family<AlgLabels, Counter>,
    refused: Family<RefusedLabels, Counter>,
    latency: Histogram,
    audit_dropped: Counter,
}

impl Metrics {
    fn register(registry: &mut prometheus_client::registry::Registry) -> Self {
        let metrics = Self {
            issued: Family::default(),
            refused: Family::default(),
            latency: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            audit_dropped: Counter::default(),
        };
        let registry = registry.sub_registry_with_prefix("keygate_token");
        registry.register(
            "issued",
            "Access tokens issued, by signing algorithm",
            metrics.issued.clone(),
        );
        registry.register(
            "refused",
            "Token requests refused, by OAuth error",
            metrics.refused.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time to answer a token request",
            metrics.latency.clone(),
        );
        registry.register(
            "audit_dropped",
            "Refusal audit events left out over the refusal rate (--audit-refused-per-second)",
            metrics.audit_dropped.clone(),
        );
        metrics
    }
}

/// Everything the handlers share.
pub struct TokenServer {
    config: TokenConfig,
    registry: watch::Receiver<Arc<Snapshot>>,
    keys: watch::Receiver<Arc<IssuerKeys>>,
    revocations: Arc<Revocations>,
    /// Where revocations are made durable before they are answered.
    store: Arc<dyn RevocationStore>,
    replay: ReplayCache,
    throttle: Throttle,
    /// Per client, the `exp` of each token this server revoked one by one.
    revoked: Mutex<HashMap<Arc<str>, Vec<u64>>>,
    metrics: Metrics,
    audit: AuditTrail,
}

impl TokenServer {
    pub fn new(
        config: TokenConfig,
        registry: watch::Receiver<Arc<Snapshot>>,
        keys: watch::Receiver<Arc<IssuerKeys>>,
        revocations: Arc<Revocations>,
        store: Arc<dyn RevocationStore>,
        metrics: &mut prometheus_client::registry::Registry,
    ) -> Arc<Self> {
        let metrics = Metrics::register(metrics);
        Arc::new(Self {
            audit: AuditTrail::new(config.audit, metrics.audit_dropped.clone()),
            config,
            registry,
            keys,
            revocations,
            store,
            replay: ReplayCache::default(),
            throttle: Throttle::default(),
            revoked: Mutex::default(),
            metrics,
        })
    }

    pub fn config(&self) -> &TokenConfig {
        &self.config
    }

    /// Revokes the token with `claims` of `client`, one by one while the client and the
    /// list are within their bounds, else with a per-client "not before" just after the
    /// token's `iat` (which refuses it and every earlier token of the client). It takes
    /// effect here at once; the entry returned is what must be stored before answering.
    fn revoke(&self, client: &ClientView, claims: &AccessClaims, now: u64) -> RevocationList {
        // Expired entries count for nothing; drop them before counting.
        self.revocations.prune(now);
        let one_by_one = {
            let mut revoked = self.revoked.lock().unwrap_or_else(|p| p.into_inner());
            revoked.retain(|_, exps| {
                exps.retain(|exp| *exp > now);
                !exps.is_empty()
            });
            let listed = self.revocations.current().tokens.len();
            let exps = revoked.entry(client.client_id.clone()).or_default();
            let within = exps.len() < self.config.max_revoked_tokens_per_client
                && listed < self.config.max_revoked_tokens;
            if within {
                exps.push(claims.exp);
            }
            within
        };
        let mut entry = RevocationList::default();
        if one_by_one {
            self.revocations.revoke_token(&claims.jti, claims.exp);
            entry.tokens.insert(claims.jti.to_string(), claims.exp);
        } else {
            let not_before = claims.iat.saturating_add(1);
            self.revocations
                .revoke_client(&client.client_id, not_before);
            entry
                .clients
                .insert(client.client_id.to_string(), not_before);
            tracing::warn!(
                client = %client.key,
                jti = %claims.jti,
                not_before,
                "too many tokens revoked one by one: revoked every token of the client issued up to this one"
            );
        }
        entry
    }

    fn audiences(&self) -> [String; 2] {
        [self.config.token_endpoint(), self.config.issuer.clone()]
    }

    /// Reads parameters and authenticates the client, with throttling per client and address;
    /// notes the client claimed and the client authenticated in `audited`.
    fn authenticate(
        &self,
        headers: &HeaderMap,
        params: &Params,
        peer: IpAddr,
        now: u64,
        audited: &mut Audited,
    ) -> Result<Arc<ClientView>, OAuthError> {
        let authorization = match headers.get(header::AUTHORIZATION) {
            Some(value) => Some(value.to_str().map_err(|_| {
                OAuthError::new(ErrorCode::InvalidClient, "malformed Basic credentials")
            })?),
            None => None,
        };
        let presented: Presented = presented(authorization, params)?;
        let client_id = presented.client_id().to_owned();
        audited.claimed_client_id = Some(client_id.clone());
        if self.throttle.is_blocked(&client_id, peer, now) {
            return Err(OAuthError::new(
                ErrorCode::SlowDown,
                "too many failed authentications; retry later",
            ));
        }
        let snapshot = self.registry.borrow().clone();
        let [endpoint, issuer] = self.audiences();
        match authenticate(
            &presented,
            &snapshot,
            &[endpoint.as_str(), issuer.as_str()],
            &self.replay,
            self.config.leeway,
            now,
        ) {
            Ok(authenticated) => {
                self.throttle.record_success(&client_id, peer);
                let client = authenticated.client.clone();
                audited.authenticated = Some(authenticated);
                Ok(client)
            }
            Err(e) => {
                self.throttle.record_failure(&client_id, peer, now);
                Err(e)
            }
        }
    }

    /// Writes the audit event of one request (docs/audit.md): of `kind` (the endpoint), with
    /// `outcome` when it succeeded, else its OAuth error. Revocations and refusals (up to the
    /// refusal rate) are always written, other outcomes when sampled.
    fn audit(
        &self,
        kind: &'static str,
        peer: SocketAddr,
        audited: &Audited,
        result: Result<&'static str, &OAuthError>,
    ) {
        let suppressed = match result {
            Ok(_) if kind == REVOKE || self.audit.sample_allowed() => 0,
            Ok(_) => return,
            Err(_) => match self.audit.admit_refusal(audited.authenticated.is_some()) {
                Some(suppressed) => suppressed,
                None => return,
            },
        };
        let error = result.err();
        let authenticated = audited.authenticated.as_ref();
        let claimed = match authenticated {
            None => audited.claimed_client_id.as_deref(),
            Some(_) => None,
        };
        tracing::info!(
            target: audit::TARGET,
            kind,
            outcome = result.unwrap_or("refused"),
            error = error.map(|e| e.code.as_str()),
            reason = error.map(|e| e.description.as_str()),
            client_id = authenticated.map(|a| &*a.client.client_id),
            client = authenticated.map(|a| tracing::field::display(&a.client.key)),
            claimed_client_id = claimed,
            credential = authenticated.map(|a| a.method.as_str()),
            key_fingerprint = authenticated.and_then(|a| a.key_fingerprint.as_deref()),
            jti = audited.jti.as_deref(),
            active = audited.active,
            resource = audited.resource.as_deref(),
            scopes = audited.scopes.as_deref(),
            requested_resource = error.and(audited.requested_resource.as_deref()),
            requested_scopes = error.and(audited.requested_scopes.as_deref()),
            peer = %peer,
            suppressed = (suppressed > 0).then_some(suppressed),
        );
    }
}

/// The audit event kinds of the three endpoints.
const ISSUE: &str = "token.issue";
const REVOKE: &str = "token.revoke";
const INTROSPECT: &str = "token.introspect";

/// What a request to the token, revocation or introspection endpoint turned out to be about,
/// as far as it got: the fields of its audit event.
#[derive(Default)]
struct Audited {
    /// The client id the request claimed, before it was authenticated.
    claimed_client_id: Option<String>,
    authenticated: Option<Authenticated>,
    /// The resource (`aud`) and the scopes of the token issued or introspected.
    resource: Option<String>,
    scopes: Option<String>,
    /// What an authenticated client asked for at the token endpoint (cut to
    /// [`audit::MAX_CALLER_TEXT`]), written when the request was refused.
    requested_resource: Option<String>,
    requested_scopes: Option<String>,
    /// The `jti` of the token issued, revoked or introspected.
    jti: Option<String>,
    /// Whether the token introspected is active.
    active: Option<bool>,
}

/// The token server's routes (without the admin endpoints).
pub fn router(server: Arc<TokenServer>) -> Router {
    Router::new()
        .route("/oauth2/token", post(token))
        .route("/oauth2/revoke", post(revoke))
        .route("/oauth2/introspect", post(introspect))
        .route("/.well-known/jwks.json", get(jwks))
        .route(
            "/.well-known/oauth-authorization-server",
            get(authorization_server_metadata),
        )
        .route(
            "/.well-known/openid-configuration",
            get(openid_configuration),
        )
        .with_state(server)
}

/// Reads a form body: the right content type, within the size limit, no repeated parameter
/// (RFC 6749 §3.2).
async fn read_form(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
    timeout: Duration,
) -> Result<Params, OAuthError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let media_type = content_type.split(';').next().unwrap_or_default().trim();
    if !media_type.eq_ignore_ascii_case("application/x-www-form-urlencoded") {
        return Err(OAuthError::new(
            ErrorCode::InvalidRequest,
            "the request body must be application/x-www-form-urlencoded",
        ));
    }
    let bytes = tokio::time::timeout(timeout, axum::body::to_bytes(body, limit))
        .await
        .map_err(|_| {
            OAuthError::new(
                ErrorCode::RequestTimeout,
                "the request body did not arrive in time",
            )
        })?
        .map_err(|_| {
            OAuthError::new(ErrorCode::PayloadTooLarge, "the request body is too large")
        })?;
    let mut params = Params::new();
    for (key, value) in form_urlencoded::parse(&bytes) {
        if params
            .insert(key.clone().into_owned(), value.into_owned())
            .is_some()
        {
            return Err(OAuthError::new(
                ErrorCode::InvalidRequest,
                format!("parameter {} is repeated", safe_name(&key)),
            ));
        }
    }
    Ok(params)
}

/// A parameter name fit for an error message: known names only.
fn safe_name(name: &str) -> &'static str {
    const KNOWN: [&str; 9] = [
        "grant_type",
        "scope",
        "resource",
        "client_id",
        "client_secret",
        "client_assertion",
        "client_assertion_type",
        "token",
        "token_type_hint",
    ];
    KNOWN
        .into_iter()
        .find(|k| *k == name)
        .unwrap_or("(unknown)")
}

fn no_store(mut response: Response) -> Response {
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    response
}

async fn token(
    State(server): State<Arc<TokenServer>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let started = Instant::now();
    let mut audited = Audited::default();
    let result = issue_token(&server, &headers, body, peer.ip(), &mut audited).await;
    server
        .metrics
        .latency
        .observe(started.elapsed().as_secs_f64());
    match result {
        Ok((response, alg)) => {
            server
                .metrics
                .issued
                .get_or_create(&AlgLabels {
                    alg: alg.to_owned(),
                })
                .inc();
            server.audit(ISSUE, peer, &audited, Ok("issued"));
            response
        }
        Err(error) => {
            server
                .metrics
                .refused
                .get_or_create(&RefusedLabels {
                    error: error.code.as_str().to_owned(),
                })
                .inc();
            server.audit(ISSUE, peer, &audited, Err(&error));
            error.into_response()
        }
    }
}

async fn issue_token(
    server: &TokenServer,
    headers: &HeaderMap,
    body: Body,
    peer: IpAddr,
    audited: &mut Audited,
) -> Result<(Response, &'static str), OAuthError> {
    let params = read_form(
        headers,
        body,
        server.config.max_body_bytes,
        server.config.body_read_timeout,
    )
    .await?;
    match params.get("grant_type").map(String::as_str) {
        None => {
            return Err(OAuthError::new(
                ErrorCode::InvalidRequest,
                "grant_type is required",
            ));
        }
        Some("client_credentials") => {}
        Some(_) => {
            return Err(OAuthError::new(
                ErrorCode::UnsupportedGrantType,
                "only the client_credentials grant is supported",
            ));
        }
    }
    let now = unix_now();
    let client = server.authenticate(headers, &params, peer, now, audited)?;
    audited.requested_resource = params.get("resource").map(|r| audit::caller_text(r));
    audited.requested_scopes = params.get("scope").map(|s| audit::caller_text(s));
    if client.disabled {
        return Err(OAuthError::new(
            ErrorCode::UnauthorizedClient,
            "this client is disabled",
        ));
    }
    let snapshot = server.registry.borrow().clone();
    let granted = grant(
        &client.grants,
        params.get("resource").map(String::as_str),
        params.get("scope").map(String::as_str),
        |resource| snapshot.resources.get(resource).map(|r| r.matching),
    )
    .map_err(|e| {
        let code = match e.error_code() {
            "invalid_target" => ErrorCode::InvalidTarget,
            _ => ErrorCode::InvalidScope,
        };
        OAuthError::new(code, e.to_string())
    })?;
    let lifetime = client
        .token_lifetime
        .unwrap_or(server.config.default_lifetime)
        .min(server.config.max_lifetime)
        .as_secs();
    let keys = server.keys.borrow().clone();
    let server_error = |_| OAuthError::new(ErrorCode::ServerError, "could not sign the token");
    let claims = AccessClaims {
        iss: server.config.issuer.clone(),
        sub: client.client_id.to_string(),
        client_id: client.client_id.to_string(),
        aud: granted.resource.clone(),
        scope: granted.scope_string(),
        iat: now,
        exp: now + lifetime,
        jti: new_jti().map_err(server_error)?,
    };
    let token = access_token::issue(&keys.current, &claims).map_err(server_error)?;
    let body = json!({
        "access_token": token,
        "token_type": "Bearer",
        "expires_in": lifetime,
        "scope": claims.scope,
    });
    audited.resource = Some(claims.aud);
    audited.scopes = Some(claims.scope);
    audited.jti = Some(claims.jti);
    Ok((
        no_store(axum::Json(body).into_response()),
        keys.current.algorithm.as_str(),
    ))
}

/// Verifies a token this server issued (signature with a published key, issuer, time) and
/// checks it is neither revoked nor of a vanished or disabled client.
fn active_claims(server: &TokenServer, token: &str, now: u64) -> Option<AccessClaims> {
    let claims = issued_claims(server, token, now)?;
    let revoked =
        server
            .revocations
            .current()
            .is_revoked(Some(&claims.jti), &claims.client_id, claims.iat);
    let snapshot = server.registry.borrow().clone();
    let client_ok = snapshot
        .clients
        .get(claims.client_id.as_str())
        .is_some_and(|c| !c.disabled);
    (!revoked && client_ok).then_some(claims)
}

/// The claims of an unexpired access token this server signed, revoked or not.
fn issued_claims(server: &TokenServer, token: &str, now: u64) -> Option<AccessClaims> {
    let keys = server.keys.borrow().clone();
    access_token::verify(
        token,
        &keys.verifying,
        &server.config.issuer,
        None,
        server.config.leeway,
        now,
    )
    .ok()
}

/// What a revocation (RFC 7009) or introspection (RFC 7662) request starts with: its form,
/// the client authenticated like at the token endpoint, and the `token` parameter.
async fn token_request(
    server: &TokenServer,
    peer: SocketAddr,
    headers: &HeaderMap,
    body: Body,
    now: u64,
    audited: &mut Audited,
) -> Result<(Arc<ClientView>, String), OAuthError> {
    let mut params = read_form(
        headers,
        body,
        server.config.max_body_bytes,
        server.config.body_read_timeout,
    )
    .await?;
    let client = server.authenticate(headers, &params, peer.ip(), now, audited)?;
    let token = params
        .remove("token")
        .ok_or_else(|| OAuthError::new(ErrorCode::InvalidRequest, "token is required"))?;
    Ok((client, token))
}

async fn revoke(
    State(server): State<Arc<TokenServer>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let mut audited = Audited::default();
    let result = async {
        let now = unix_now();
        let (client, token) =
            token_request(&server, peer, &headers, body, now, &mut audited).await?;
        // RFC 7009 §2.2: an invalid or foreign token is not an error; say nothing about it.
        if let Some(claims) = issued_claims(&server, &token, now)
            && *claims.client_id == *client.client_id
        {
            // A token revoked here already is stored again: the client may be retrying
            // after a 503, when this replica knew the revocation but had not stored it.
            let known = server.revocations.current().revoking_entry(
                &claims.jti,
                &claims.client_id,
                claims.iat,
            );
            let entry = match known {
                Some(entry) => entry,
                None => server.revoke(&client, &claims, now),
            };
            // Answered only once stored: a replica that dies right after answering must
            // not take the revocation with it.
            server.store.store(entry).await.map_err(|error| {
                tracing::warn!(%error, client = %client.key, jti = %claims.jti, "revocation not stored yet; answered 503");
                OAuthError::new(
                    ErrorCode::Unavailable,
                    "the revocation could not be stored yet; send it again",
                )
            })?;
            audited.jti = Some(claims.jti);
            return Ok("revoked");
        }
        // Not this client's token, not one of ours or expired: answered alike.
        Ok::<_, OAuthError>("ignored")
    }
    .await;
    server.audit(REVOKE, peer, &audited, result.as_ref().copied());
    match result {
        Ok(_) => no_store(StatusCode::OK.into_response()),
        Err(e) => e.into_response(),
    }
}

async fn introspect(
    State(server): State<Arc<TokenServer>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let mut audited = Audited::default();
    let result = async {
        let now = unix_now();
        let (client, token) =
            token_request(&server, peer, &headers, body, now, &mut audited).await?;
        if client.disabled {
            return Err(OAuthError::new(
                ErrorCode::InvalidClient,
                "this client is disabled",
            ));
        }
        let claims = active_claims(&server, &token, now);
        audited.active = Some(claims.is_some());
        let Some(c) = claims else {
            return Ok(json!({ "active": false }));
        };
        let body = json!({
            "active": true,
            "scope": c.scope,
            "client_id": c.client_id,
            "sub": c.sub,
            "aud": c.aud,
            "iss": c.iss,
            "iat": c.iat,
            "exp": c.exp,
            "jti": c.jti,
            "token_type": "Bearer",
        });
        audited.resource = Some(c.aud);
        audited.scopes = Some(c.scope);
        audited.jti = Some(c.jti);
        Ok::<_, OAuthError>(body)
    }
    .await;
    server.audit(
        INTROSPECT,
        peer,
        &audited,
        result.as_ref().map(|_| "introspected"),
    );
    match result {
        Ok(body) => no_store(axum::Json(body).into_response()),
        Err(e) => e.into_response(),
    }
}

async fn jwks(State(server): State<Arc<TokenServer>>) -> Response {
    let keys = server.keys.borrow().clone();
    // Five minutes is short enough that a new key, published a whole rotation interval
    // before use, is picked up long before it signs anything.
    cached_json(&keys.jwks)
}

/// RFC 8414 authorization server metadata, with only what is true of keygate: a token
/// endpoint for the client credentials grant, revocation, introspection and the JWKS.
///
/// `response_types_supported` is left out. RFC 8414 §2 calls it REQUIRED, but it lists the
/// `response_type` values of the authorization endpoint, which keygate does not have, and §3.2
/// says that members with zero elements MUST be omitted; erratum 7793 asks to require it only
/// of servers with grants that use that endpoint. The `["token"]` served before claimed the
/// implicit grant.
fn metadata(server: &TokenServer) -> serde_json::Map<String, serde_json::Value> {
    let issuer = &server.config.issuer;
    let snapshot = server.registry.borrow().clone();
    let scopes: BTreeSet<&String> = snapshot
        .resources
        .values()
        .flat_map(|r| r.defined.iter())
        .collect();
    let auth_methods = [
        "client_secret_basic",
        "client_secret_post",
        "private_key_jwt",
    ];
    let body = json!({
        "issuer": issuer,
        "token_endpoint": server.config.token_endpoint(),
        "jwks_uri": format!("{issuer}/.well-known/jwks.json"),
        "revocation_endpoint": format!("{issuer}/oauth2/revoke"),
        "introspection_endpoint": format!("{issuer}/oauth2/introspect"),
        "grant_types_supported": ["client_credentials"],
        "token_endpoint_auth_methods_supported": auth_methods,
        "token_endpoint_auth_signing_alg_values_supported": SIGNING_ALGORITHMS,
        "revocation_endpoint_auth_methods_supported": auth_methods,
        "introspection_endpoint_auth_methods_supported": auth_methods,
        "access_token_signing_alg_values_supported": SIGNING_ALGORITHMS,
    });
    let serde_json::Value::Object(mut map) = body else {
        unreachable!("a JSON object literal")
    };
    // RFC 8414 §3.2: no empty members (a registry without ScopePolicies defines no scope).
    if !scopes.is_empty() {
        map.insert("scopes_supported".into(), json!(scopes));
    }
    map
}

/// The JWS algorithms keygate signs and verifies with.
const SIGNING_ALGORITHMS: [&str; 3] = ["ES256", "EdDSA", "RS256"];

async fn authorization_server_metadata(State(server): State<Arc<TokenServer>>) -> Response {
    cached_json(metadata(&server))
}

/// The same document at the OpenID Connect discovery path, for clients that only look
/// there, with the three members OpenID Connect Discovery 1.0 §3 requires of every
/// document. They are about ID tokens, which keygate never issues; clients read them all
/// the same (go-oidc verifies access tokens with the algorithms of
/// `id_token_signing_alg_values_supported`, RS256 only without it), so they state what a
/// JWT of this issuer is signed with.
async fn openid_configuration(State(server): State<Arc<TokenServer>>) -> Response {
    let mut body = metadata(&server);
    // As served before: OpenID Connect has no value that is true without an authorization
    // endpoint either.
    body.insert("response_types_supported".into(), json!(["token"]));
    body.insert("subject_types_supported".into(), json!(["public"]));
    body.insert(
        "id_token_signing_alg_values_supported".into(),
        json!(SIGNING_ALGORITHMS),
    );
    cached_json(body)
}

/// A JSON response that caches may keep for five minutes.
fn cached_json(body: impl serde::Serialize) -> Response {
    let mut response = axum::Json(body).into_response();
    response.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=300"),
    );
    response
}
