//! The sidecar over real HTTP: a real upstream that echoes what it receives, the sidecar on a
//! loopback port, and reqwest (or raw TCP, where a client would rewrite the path) in front.
//! Covers the credential kinds, the RFC 6750 challenges, the RFC 8725 attacks, path
//! normalisation, external issuers, hot reload under load and the failure modes.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, Method, Uri};
use axum::routing::get;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use keygate::api::{
    DefaultAction, KeyAlgorithm, RequireScopes, RouteRule, ScopePolicySpec, TrustedIssuer,
};
use keygate::audit::AuditConfig;
use keygate::credentials::{
    SecretDigest, SigningKey, VerifyingKey, derive_client_id, generate_api_key, generate_key_pair,
    keypair_issuer, sign_keypair_jwt, unix_now,
};
use keygate::policy::PolicyDocument;
use keygate::policy::document::{KeygateIssuer, PolicyApiKey, PolicyClient, PolicyKey};
use keygate::registry::RevocationList;
use keygate::sidecar::forward::{ForwardConfig, Forwarder};
use keygate::sidecar::server::{Sidecar, serve, watch_policy_file};
use keygate::token::access_token::{self, AccessClaims, new_jti};
use prometheus_client::registry::Registry;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

const RESOURCE: &str = "https://orders.shop.svc";
const ISSUER: &str = "https://keygate.keygate.svc";
const EXTERNAL_ISSUER: &str = "https://idp.example";
const REALM: &str = r#"Bearer realm="https://orders.shop.svc""#;
const LEEWAY: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------
// Fixture: keys and credentials
// ---------------------------------------------------------------------------------------

/// One signing key with the PEM it came from, for tokens signed by hand.
struct Key {
    signing: SigningKey,
    private_pem: String,
}

impl Key {
    fn new() -> Self {
        let pair = generate_key_pair(KeyAlgorithm::ES256).unwrap();
        Self {
            signing: SigningKey::from_pkcs8_pem(&pair.private_pem).unwrap(),
            private_pem: pair.private_pem,
        }
    }

    /// Signs arbitrary `claims` with ES256 and exactly `header` (no field overridden).
    fn sign_raw(&self, header: &Header, claims: &Value) -> String {
        let encoding = EncodingKey::from_ec_pem(self.private_pem.as_bytes()).unwrap();
        jsonwebtoken::encode(header, claims, &encoding).unwrap()
    }
}

/// keygate's issuer key, one client (key pair A + an API key, scope orders.read) and a key B
/// that belongs to nobody.
struct Fixture {
    issuer: Key,
    client_id: String,
    client_key: Key,
    stranger_key: Key,
    api_key: String,
}

impl Fixture {
    fn new() -> Self {
        Self {
            issuer: Key::new(),
            client_id: derive_client_id("shop/orders-reader"),
            client_key: Key::new(),
            stranger_key: Key::new(),
            api_key: generate_api_key().unwrap(),
        }
    }

    fn access_claims(&self, scope: &str) -> AccessClaims {
        let now = unix_now();
        AccessClaims {
            iss: ISSUER.into(),
            sub: self.client_id.clone(),
            client_id: self.client_id.clone(),
            aud: RESOURCE.into(),
            scope: scope.into(),
            iat: now,
            exp: now + 600,
            jti: new_jti().unwrap(),
        }
    }

    /// A genuine keygate access token for this client.
    fn access_token(&self, scope: &str) -> String {
        access_token::issue(&self.issuer.signing, &self.access_claims(scope)).unwrap()
    }

    /// Access-token claims as JSON, for tokens that need fields `AccessClaims` lacks.
    fn access_claims_json(&self, scope: &str) -> Value {
        serde_json::to_value(self.access_claims(scope)).unwrap()
    }

    /// The header keygate puts on access tokens: ES256, `typ: at+jwt`, the issuer's `kid`.
    fn access_header(&self) -> Header {
        let mut header = Header::new(Algorithm::ES256);
        header.typ = Some("at+jwt".into());
        header.kid = Some(self.issuer.signing.kid.clone());
        header
    }

    /// A genuine key-pair JWT of this client.
    fn keypair_jwt(&self) -> String {
        sign_keypair_jwt(
            &self.client_key.signing,
            &self.client_id,
            Some(RESOURCE),
            Duration::from_secs(300),
            unix_now(),
        )
        .unwrap()
    }
}

// ---------------------------------------------------------------------------------------
// Policy document builder
// ---------------------------------------------------------------------------------------

/// A rule for any authenticated client with a grant (`authenticated: true`); [`public`],
/// [`any_of`] and [`all_of`] turn it into the other kinds.
fn mk_rule(name: &str, methods: &[&str], paths: &[&str]) -> RouteRule {
    RouteRule {
        name: name.into(),
        methods: methods.iter().map(|m| (*m).to_owned()).collect(),
        paths: paths.iter().map(|p| (*p).to_owned()).collect(),
        authenticated: true,
        ..RouteRule::default()
    }
}

fn public(mut rule: RouteRule) -> RouteRule {
    rule.public = true;
    rule.authenticated = false;
    rule
}

fn any_of(mut rule: RouteRule, scopes: &[&str]) -> RouteRule {
    rule.authenticated = false;
    rule.require_scopes = Some(RequireScopes {
        any_of: Some(scopes.iter().map(|s| (*s).to_owned()).collect()),
        all_of: None,
    });
    rule
}

fn all_of(mut rule: RouteRule, scopes: &[&str]) -> RouteRule {
    rule.authenticated = false;
    rule.require_scopes = Some(RequireScopes {
        any_of: None,
        all_of: Some(scopes.iter().map(|s| (*s).to_owned()).collect()),
    });
    rule
}

/// The orders API policy: public `/healthz` and `/public/**`, scoped `/orders/**` and
/// `/admin/**`, everything else denied; one client with a key pair and an API key.
fn mk_document(fx: &Fixture) -> PolicyDocument {
    let spec = ScopePolicySpec {
        resource: RESOURCE.into(),
        rules: vec![
            public(mk_rule("health", &["GET"], &["/healthz"])),
            public(mk_rule("public", &[], &["/public/**"])),
            any_of(mk_rule("read", &["GET"], &["/orders/**"]), &["orders.read"]),
            all_of(
                mk_rule("write", &["POST"], &["/orders/**"]),
                &["orders.write"],
            ),
            all_of(mk_rule("admin", &[], &["/admin/**"]), &["orders.admin"]),
        ],
        default_action: DefaultAction::Deny,
        ..ScopePolicySpec::default()
    };
    let client_public_pem = fx.client_key.signing.public_pem.clone();
    PolicyDocument {
        api_version: "keygate.dev/policy/v1".into(),
        policy: "shop/orders".into(),
        resource: RESOURCE.into(),
        spec,
        keygate: KeygateIssuer {
            issuer: ISSUER.into(),
            jwks: JwkSet {
                keys: vec![fx.issuer.signing.jwk.clone()],
            },
        },
        clients_omitted: false,
        clients: vec![PolicyClient {
            client_id: fx.client_id.clone(),
            name: "shop/orders-reader".into(),
            scopes: vec!["orders.read".into()],
            keys: vec![PolicyKey {
                fingerprint: fx.client_key.signing.fingerprint.clone(),
                public_key: client_public_pem,
                not_after: None,
            }],
            api_keys: vec![PolicyApiKey {
                digest: SecretDigest::of(&fx.api_key).encode(),
                not_after: None,
            }],
        }],
        disabled_clients: Vec::new(),
        revocations: RevocationList::default(),
    }
}

/// Every scope of the orders API.
const ALL_SCOPES: [&str; 3] = ["orders.admin", "orders.read", "orders.write"];

/// [`mk_document`] with the client holding `scopes`: a token counts only for the scopes its
/// client still holds.
fn mk_document_holding(fx: &Fixture, scopes: &[&str]) -> PolicyDocument {
    let mut document = mk_document(fx);
    document.clients[0].scopes = scopes.iter().map(|s| (*s).to_owned()).collect();
    document
}

// ---------------------------------------------------------------------------------------
// Harness: echo upstream + sidecar
// ---------------------------------------------------------------------------------------

/// Paths (with query) the upstream received, in order.
type Hits = Arc<Mutex<Vec<String>>>;

/// Answers every request with what it received: method, path and all headers.
async fn echo(
    State(hits): State<Hits>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> axum::Json<Value> {
    let path = uri
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    hits.lock().unwrap().push(path.clone());
    let mut seen: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, value) in &headers {
        seen.entry(name.as_str().to_owned())
            .or_default()
            .push(String::from_utf8_lossy(value.as_bytes()).into_owned());
    }
    axum::Json(json!({ "method": method.as_str(), "path": path, "headers": seen }))
}

/// Starts the echo upstream; returns its address and its hit log.
async fn start_upstream() -> (SocketAddr, Hits) {
    let hits = Hits::default();
    let app = Router::new().fallback(echo).with_state(hits.clone());
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (addr, hits)
}

struct Harness {
    base: String,
    addr: SocketAddr,
    sidecar: Arc<Sidecar>,
    registry: Registry,
    hits: Hits,
    http: reqwest::Client,
}

impl Harness {
    /// Upstream + sidecar with `document` installed.
    async fn start(document: PolicyDocument) -> Self {
        let harness = Self::without_policy().await;
        harness.sidecar.install(document).unwrap();
        harness
    }

    /// Upstream + sidecar with no policy installed.
    async fn without_policy() -> Self {
        let (upstream, hits) = start_upstream().await;
        Self::in_front_of(upstream, hits).await
    }

    /// A sidecar forwarding to `upstream`, no policy installed.
    async fn in_front_of(upstream: SocketAddr, hits: Hits) -> Self {
        let mut registry = Registry::default();
        let forwarder = Forwarder::new(ForwardConfig::new(upstream));
        let sidecar = Sidecar::new(forwarder, LEEWAY, AuditConfig::default(), &mut registry);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(
            listener,
            sidecar.clone(),
            std::future::pending(),
            Duration::from_secs(1),
        ));
        Self {
            base: format!("http://{addr}"),
            addr,
            sidecar,
            registry,
            hits,
            http: reqwest::Client::builder().no_proxy().build().unwrap(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    async fn get_bearer(&self, path: &str, token: &str) -> reqwest::Response {
        self.http
            .get(self.url(path))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
    }

    async fn post_bearer(&self, path: &str, token: &str) -> reqwest::Response {
        self.http
            .post(self.url(path))
            .bearer_auth(token)
            .send()
            .await
            .unwrap()
    }

    fn hit_count(&self) -> usize {
        self.hits.lock().unwrap().len()
    }

    fn last_hit(&self) -> Option<String> {
        self.hits.lock().unwrap().last().cloned()
    }

    /// The value of one metric sample in the text exposition, e.g.
    /// `keygate_sidecar_policy_reload_errors_total`.
    fn metric(&self, name: &str) -> f64 {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).unwrap();
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or_else(|| panic!("metric {name} not in\n{text}"))
    }
}

/// A raw HTTP/1.1 answer: status, headers (lower-case names) and body.
struct RawResponse {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl RawResponse {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Sends `GET <target>` byte for byte, so no client library normalises the path first.
async fn raw_get(addr: SocketAddr, target: &str, extra_headers: &[(&str, &str)]) -> RawResponse {
    let mut request =
        format!("GET {target} HTTP/1.1\r\nHost: orders.shop.svc\r\nConnection: close\r\n");
    for (name, value) in extra_headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    RawResponse {
        status,
        headers,
        body: body.to_owned(),
    }
}

// ---------------------------------------------------------------------------------------
// Assertions
// ---------------------------------------------------------------------------------------

fn challenge(resp: &reqwest::Response) -> Option<String> {
    resp.headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_owned())
}

fn invalid_token_challenge(reason: &str) -> String {
    format!(r#"{REALM}, error="invalid_token", error_description="{reason}""#)
}

fn insufficient_scope_challenge(scope: &str) -> String {
    format!(r#"{REALM}, error="insufficient_scope", scope="{scope}""#)
}

/// 200 from the upstream; returns what the upstream echoed.
async fn assert_allowed(resp: reqwest::Response, what: &str) -> Value {
    assert_eq!(resp.status(), 200, "{what}: {:?}", resp.text().await);
    resp.json().await.unwrap()
}

/// 401 with `error="invalid_token"` and exactly `reason`; the upstream is not reached.
async fn assert_invalid(h: &Harness, resp: reqwest::Response, reason: &str, what: &str) {
    let before = h.hit_count();
    assert_eq!(resp.status(), 401, "{what}");
    assert_eq!(
        challenge(&resp).as_deref(),
        Some(invalid_token_challenge(reason).as_str()),
        "{what}"
    );
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "invalid_token", "{what}");
    assert_eq!(h.hit_count(), before, "{what}: reached the upstream");
}

/// 403 with `error="insufficient_scope"` naming `scope`.
async fn assert_insufficient(resp: reqwest::Response, scope: &str, what: &str) {
    assert_eq!(resp.status(), 403, "{what}");
    assert_eq!(
        challenge(&resp).as_deref(),
        Some(insufficient_scope_challenge(scope).as_str()),
        "{what}"
    );
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "insufficient_scope", "{what}");
}

/// 403 from the default action: no challenge, since no credential would help.
async fn assert_denied(resp: reqwest::Response, what: &str) {
    assert_eq!(resp.status(), 403, "{what}");
    assert_eq!(challenge(&resp), None, "{what}");
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["error"], "access_denied", "{what}");
}

fn header_values(echoed: &Value, name: &str) -> Vec<String> {
    echoed["headers"][name]
        .as_array()
        .map(|values| {
            values
                .iter()
                .map(|v| v.as_str().unwrap().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------
// 1. Decisions and challenges for every credential kind
// ---------------------------------------------------------------------------------------

/// How a credential travels.
#[derive(Clone, Copy, Debug)]
enum Carrier {
    Bearer,
    ApiKeyHeader,
}

async fn send(
    h: &Harness,
    method: Method,
    path: &str,
    carrier: Carrier,
    credential: &str,
) -> reqwest::Response {
    let request = h.http.request(method, h.url(path));
    let request = match carrier {
        Carrier::Bearer => request.bearer_auth(credential),
        Carrier::ApiKeyHeader => request.header("x-api-key", credential),
    };
    request.send().await.unwrap()
}

#[tokio::test]
async fn every_credential_kind_is_allowed_refused_or_forbidden() {
    let fx = Fixture::new();
    let h = Harness::start(mk_document(&fx)).await;
    let bad_access_token = fx
        .stranger_key
        .sign_raw(&fx.access_header(), &fx.access_claims_json("orders.read"));
    let unknown_keypair_jwt = sign_keypair_jwt(
        &fx.stranger_key.signing,
        &fx.client_id,
        Some(RESOURCE),
        Duration::from_secs(300),
        unix_now(),
    )
    .unwrap();
    let cases = [
        (
            "access token",
            Carrier::Bearer,
            fx.access_token("orders.read"),
            "access_token",
            bad_access_token,
            "bad signature",
        ),
        (
            "key-pair JWT",
            Carrier::Bearer,
            fx.keypair_jwt(),
            "keypair_jwt",
            unknown_keypair_jwt,
            "unknown key fingerprint",
        ),
        (
            "API key (Bearer)",
            Carrier::Bearer,
            fx.api_key.clone(),
            "api_key",
            generate_api_key().unwrap(),
            "unknown API key",
        ),
        (
            "API key (X-API-Key)",
            Carrier::ApiKeyHeader,
            fx.api_key.clone(),
            "api_key",
            generate_api_key().unwrap(),
            "unknown API key",
        ),
    ];
    for (what, carrier, good, method, bad, reason) in cases {
        let echoed = assert_allowed(
            send(&h, Method::GET, "/orders/42", carrier, &good).await,
            what,
        )
        .await;
        assert_eq!(echoed["method"], "GET", "{what}");
        assert_eq!(echoed["path"], "/orders/42", "{what}");
        assert_eq!(
            header_values(&echoed, "x-keygate-client-id"),
            [fx.client_id.as_str()],
            "{what}"
        );
        assert_eq!(
            header_values(&echoed, "x-keygate-scopes"),
            ["orders.read"],
            "{what}"
        );
        assert_eq!(
            header_values(&echoed, "x-keygate-auth-method"),
            [method],
            "{what}"
        );

        let resp = send(&h, Method::GET, "/orders/42", carrier, &bad).await;
        assert_invalid(&h, resp, reason, what).await;

        let resp = send(&h, Method::POST, "/orders/42", carrier, &good).await;
        assert_insufficient(resp, "orders.write", what).await;

        let resp = send(&h, Method::GET, "/admin/users", carrier, &good).await;
        assert_insufficient(resp, "orders.admin", what).await;

        let resp = send(&h, Method::DELETE, "/orders/42", carrier, &good).await;
        assert_denied(resp, &format!("{what}: unmatched method")).await;
        let resp = send(&h, Method::GET, "/billing/1", carrier, &good).await;
        assert_denied(resp, &format!("{what}: unmatched path")).await;
    }
}

#[tokio::test]
async fn public_missing_and_malformed_credentials() {
    let fx = Fixture::new();
    let h = Harness::start(mk_document_holding(&fx, &ALL_SCOPES)).await;

    let echoed = assert_allowed(
        h.http.get(h.url("/healthz")).send().await.unwrap(),
        "public",
    )
    .await;
    assert_eq!(echoed["path"], "/healthz");
    assert_eq!(
        header_values(&echoed, "x-keygate-client-id"),
        Vec::<String>::new()
    );
    // A public rule is GET only; POST /healthz matches nothing and is denied.
    assert_denied(
        h.http.post(h.url("/healthz")).send().await.unwrap(),
        "POST /healthz",
    )
    .await;

    let resp = h.http.get(h.url("/orders/1")).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(challenge(&resp).as_deref(), Some(REALM));
    assert_eq!(resp.headers()["cache-control"], "no-store");

    let resp = h
        .http
        .get(h.url("/orders/1"))
        .bearer_auth("not-a-token")
        .send()
        .await
        .unwrap();
    assert_invalid(&h, resp, "unknown API key", "garbage bearer").await;
    let resp = h
        .http
        .get(h.url("/orders/1"))
        .bearer_auth("a.b.c")
        .send()
        .await
        .unwrap();
    assert_invalid(&h, resp, "malformed token", "three garbage parts").await;
    let resp = h
        .http
        .get(h.url("/orders/1"))
        .basic_auth(&fx.client_id, Some("secret"))
        .send()
        .await
        .unwrap();
    assert_invalid(&h, resp, "expected Authorization: Bearer", "Basic").await;
    // An empty Bearer is a malformed credential, not a missing one.
    let resp = h
        .http
        .get(h.url("/orders/1"))
        .header("authorization", "Bearer ")
        .send()
        .await
        .unwrap();
    assert_invalid(&h, resp, "expected Authorization: Bearer", "empty Bearer").await;

    // The default action denies before looking at credentials.
    assert_denied(
        h.http.get(h.url("/unknown")).send().await.unwrap(),
        "unmatched without token",
    )
    .await;

    // More scopes than needed is fine; anyOf and allOf both hold.
    let token = fx.access_token("orders.read orders.write orders.admin");
    assert_allowed(h.get_bearer("/orders/1", &token).await, "read").await;
    assert_allowed(h.post_bearer("/orders/1", &token).await, "write").await;
    assert_allowed(h.get_bearer("/admin/users", &token).await, "admin").await;
}

// ---------------------------------------------------------------------------------------
// 2. Identity headers to the upstream
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn upstream_gets_identity_headers_and_never_spoofed_ones_or_credentials() {
    let fx = Fixture::new();
    let h = Harness::start(mk_document(&fx)).await;
    let spoof = |request: reqwest::RequestBuilder| {
        request
            .header("X-Keygate-Client-Id", "kgc_admin")
            .header("X-Keygate-Scopes", "orders.admin")
            .header("X-Keygate-Auth-Method", "access_token")
            .header("x-keygate-extra", "1")
    };

    let token = fx.access_token("orders.read");
    let resp = spoof(h.http.get(h.url("/orders/7?x=1")).bearer_auth(&token))
        .send()
        .await
        .unwrap();
    let echoed = assert_allowed(resp, "spoofed on protected").await;
    assert_eq!(echoed["path"], "/orders/7?x=1");
    assert_eq!(
        header_values(&echoed, "x-keygate-client-id"),
        [fx.client_id.as_str()]
    );
    assert_eq!(header_values(&echoed, "x-keygate-scopes"), ["orders.read"]);
    assert_eq!(
        header_values(&echoed, "x-keygate-auth-method"),
        ["access_token"]
    );
    assert!(header_values(&echoed, "x-keygate-extra").is_empty());
    assert!(
        header_values(&echoed, "authorization").is_empty(),
        "Authorization forwarded: {echoed}"
    );
    assert!(
        !echoed.to_string().contains(&token),
        "token reached the upstream"
    );

    let resp = spoof(
        h.http
            .get(h.url("/orders/7"))
            .header("x-api-key", &fx.api_key),
    )
    .send()
    .await
    .unwrap();
    let echoed = assert_allowed(resp, "spoofed with API key").await;
    assert_eq!(header_values(&echoed, "x-keygate-auth-method"), ["api_key"]);
    assert!(
        header_values(&echoed, "x-api-key").is_empty(),
        "X-API-Key forwarded"
    );

    for path in ["/healthz", "/public/docs"] {
        let resp = spoof(h.http.get(h.url(path)).bearer_auth(&token))
            .send()
            .await
            .unwrap();
        let echoed = assert_allowed(resp, path).await;
        for name in [
            "x-keygate-client-id",
            "x-keygate-scopes",
            "x-keygate-auth-method",
            "x-keygate-extra",
        ] {
            assert!(
                header_values(&echoed, name).is_empty(),
                "{path}: {name} reached the upstream: {echoed}"
            );
        }
        assert!(
            header_values(&echoed, "authorization").is_empty(),
            "{path}: Authorization forwarded"
        );
    }
}

#[tokio::test]
async fn forward_authorization_keeps_the_credential() {
    let fx = Fixture::new();
    let mut document = mk_document(&fx);
    document.spec.upstream.forward_authorization = true;
    let h = Harness::start(document).await;
    let token = fx.access_token("orders.read");
    let echoed = assert_allowed(
        h.get_bearer("/orders/1", &token).await,
        "forwardAuthorization",
    )
    .await;
    assert_eq!(
        header_values(&echoed, "authorization"),
        [format!("Bearer {token}")]
    );
}

// ---------------------------------------------------------------------------------------
// 3. RFC 8725 attacks
// ---------------------------------------------------------------------------------------

fn b64_json(value: &Value) -> String {
    URL_SAFE_NO_PAD.encode(value.to_string())
}

#[tokio::test]
async fn jwt_attacks_are_refused() {
    let fx = Fixture::new();
    let h = Harness::start(mk_document(&fx)).await;
    let now = unix_now();
    let claims = fx.access_claims_json("orders.read orders.write orders.admin");
    let with = |patch: Value| {
        let mut c = claims.clone();
        for (k, v) in patch.as_object().unwrap() {
            c[k] = v.clone();
        }
        c
    };
    let signed = |claims: &Value| fx.issuer.sign_raw(&fx.access_header(), claims);
    let with_kid = |kid: &str| {
        let mut header = fx.access_header();
        header.kid = Some(kid.into());
        fx.issuer.sign_raw(&header, &claims)
    };

    // Sanity: the untampered token passes, so every refusal below is the attack's doing.
    assert_allowed(
        h.get_bearer("/orders/1", &signed(&claims)).await,
        "baseline",
    )
    .await;

    let alg_none = format!(
        "{}.{}.",
        b64_json(&json!({"alg": "none", "typ": "at+jwt", "kid": fx.issuer.signing.kid})),
        b64_json(&claims)
    );
    let mut hs_header = Header::new(Algorithm::HS256);
    hs_header.typ = Some("at+jwt".into());
    hs_header.kid = Some(fx.issuer.signing.kid.clone());
    let hmac_with_public_key = jsonwebtoken::encode(
        &hs_header,
        &claims,
        &EncodingKey::from_secret(fx.issuer.signing.public_pem.as_bytes()),
    )
    .unwrap();
    let mut jwk_header = fx.access_header();
    jwk_header.typ = Some("JWT".into());
    let wrong_typ = fx.issuer.sign_raw(&jwk_header, &claims);
    let mut no_typ_header = fx.access_header();
    no_typ_header.typ = None;
    let no_typ = fx.issuer.sign_raw(&no_typ_header, &claims);
    let mut unknown_kid_header = fx.access_header();
    unknown_kid_header.kid = Some(fx.stranger_key.signing.kid.clone());
    let unknown_kid = fx.stranger_key.sign_raw(&unknown_kid_header, &claims);
    let mut no_kid_header = fx.access_header();
    no_kid_header.kid = None;
    let no_kid = fx.issuer.sign_raw(&no_kid_header, &claims);
    let good = signed(&claims);
    let oversized = signed(&with(json!({ "pad": "x".repeat(9 * 1024) })));
    assert!(oversized.len() > 8 * 1024);
    let mut no_aud = claims.clone();
    no_aud.as_object_mut().unwrap().remove("aud");

    // A genuine signature over a payload with more scopes swapped in.
    let reader = signed(&fx.access_claims_json("orders.read"));
    let parts: Vec<&str> = reader.split('.').collect();
    let payload_swapped = format!("{}.{}.{}", parts[0], b64_json(&claims), parts[2]);
    let cases: Vec<(&str, String, &str)> = vec![
        ("alg none", alg_none, "malformed token"),
        (
            "HS256 with the public key as secret",
            hmac_with_public_key,
            "algorithm not allowed",
        ),
        ("kid of a key not in the set", unknown_kid, "unknown kid"),
        (
            "kid path traversal",
            with_kid("../../etc/passwd"),
            "unknown kid",
        ),
        ("kid SQL injection", with_kid("' OR 1=1 --"), "unknown kid"),
        ("no kid", no_kid, "no kid"),
        (
            "expired",
            signed(&with(json!({"iat": now - 7200, "exp": now - 3600}))),
            "expired",
        ),
        (
            "nbf in the future",
            signed(&with(json!({"nbf": now + 3600}))),
            "not yet valid",
        ),
        (
            "iat in the future",
            signed(&with(json!({"iat": now + 3600, "exp": now + 4000}))),
            "issued in the future",
        ),
        (
            "wrong iss",
            signed(&with(json!({"iss": "https://evil.example"}))),
            "untrusted issuer",
        ),
        (
            "iss near miss",
            signed(&with(json!({"iss": format!("{ISSUER}/")}))),
            "untrusted issuer",
        ),
        (
            "wrong aud",
            signed(&with(json!({"aud": "https://orders.shop.svc/"}))),
            "wrong audience",
        ),
        // keygate's claim set requires `aud`, so its absence fails to parse.
        ("no aud", signed(&no_aud), "malformed token"),
        (
            "token for another resource",
            signed(&with(json!({"aud": "https://billing.shop.svc"}))),
            "wrong audience",
        ),
        ("typ JWT", wrong_typ, "not an access token (typ)"),
        ("no typ", no_typ, "not an access token (typ)"),
        (
            // 86 base64url characters less 6: still valid base64, a 60-byte signature.
            "truncated signature",
            good[..good.len() - 6].to_owned(),
            "bad signature",
        ),
        (
            "truncated to two parts",
            good[..good.rfind('.').unwrap()].to_owned(),
            "unknown API key",
        ),
        (
            "truncated mid-payload",
            good[..good.find('.').unwrap() + 10].to_owned(),
            "unknown API key",
        ),
        (
            "payload swapped under a genuine signature",
            payload_swapped,
            "bad signature",
        ),
        ("oversized", oversized, "credential too large"),
    ];
    for (what, token, reason) in cases {
        let resp = h.get_bearer("/orders/1", &token).await;
        assert_invalid(&h, resp, reason, what).await;
    }
}

#[tokio::test]
async fn keypair_jwt_attacks_are_refused() {
    let fx = Fixture::new();
    let h = Harness::start(mk_document(&fx)).await;
    let now = unix_now();
    let iss = keypair_issuer(&fx.client_id, &fx.client_key.signing.fingerprint);
    let claims = |patch: Value| {
        let mut c =
            json!({"iss": iss, "sub": fx.client_id, "iat": now, "exp": now + 300, "aud": RESOURCE});
        for (k, v) in patch.as_object().unwrap() {
            c[k] = v.clone();
        }
        c
    };
    let by = |key: &Key, claims: &Value| {
        key.signing
            .sign(Header::new(Algorithm::ES256), claims)
            .unwrap()
    };

    assert_allowed(
        h.get_bearer("/orders/1", &by(&fx.client_key, &claims(json!({}))))
            .await,
        "baseline",
    )
    .await;
    // Without `aud` a key-pair JWT is accepted (Snowflake style), with the wrong one it is not.
    let mut no_aud = claims(json!({}));
    no_aud.as_object_mut().unwrap().remove("aud");
    assert_allowed(
        h.get_bearer("/orders/1", &by(&fx.client_key, &no_aud))
            .await,
        "no aud",
    )
    .await;

    let cases: Vec<(&str, String, &str)> = vec![
        (
            "lifetime over one hour",
            by(&fx.client_key, &claims(json!({"exp": now + 7200}))),
            "lifetime exceeds one hour",
        ),
        (
            "signed with key B naming key A",
            by(&fx.stranger_key, &claims(json!({}))),
            "bad signature",
        ),
        (
            "expired",
            by(
                &fx.client_key,
                &claims(json!({"iat": now - 1000, "exp": now - 600})),
            ),
            "expired",
        ),
        (
            "iat in the future",
            by(
                &fx.client_key,
                &claims(json!({"iat": now + 600, "exp": now + 900})),
            ),
            "issued in the future",
        ),
        (
            "sub of another client",
            by(&fx.client_key, &claims(json!({"sub": "kgc_other"}))),
            "wrong subject",
        ),
        (
            "another resource",
            by(
                &fx.client_key,
                &claims(json!({"aud": "https://billing.shop.svc"})),
            ),
            "wrong audience",
        ),
        (
            "iss names another client with this key",
            by(
                &fx.client_key,
                &claims(
                    json!({"iss": keypair_issuer("kgc_other", &fx.client_key.signing.fingerprint), "sub": "kgc_other"}),
                ),
            ),
            "unknown key fingerprint",
        ),
    ];
    for (what, token, reason) in cases {
        let resp = h.get_bearer("/orders/1", &token).await;
        assert_invalid(&h, resp, reason, what).await;
    }
}

#[tokio::test]
async fn revoked_tokens_and_clients_are_refused() {
    let fx = Fixture::new();
    let mut document = mk_document(&fx);
    let h = Harness::start(document.clone()).await;

    let revoked = fx.access_claims("orders.read");
    let revoked_token = access_token::issue(&fx.issuer.signing, &revoked).unwrap();
    let other_token = fx.access_token("orders.read");
    // Both verified (and cached) before the revocation arrives.
    assert_allowed(
        h.get_bearer("/orders/1", &revoked_token).await,
        "before revocation",
    )
    .await;
    assert_allowed(
        h.get_bearer("/orders/1", &other_token).await,
        "before revocation",
    )
    .await;

    document
        .revocations
        .tokens
        .insert(revoked.jti.clone(), revoked.exp);
    h.sidecar.install(document.clone()).unwrap();
    assert_invalid(
        &h,
        h.get_bearer("/orders/1", &revoked_token).await,
        "token revoked",
        "revoked jti",
    )
    .await;
    assert_allowed(h.get_bearer("/orders/1", &other_token).await, "other jti").await;

    // Revoking the client refuses every token it got before "not before".
    let keypair_jwt = fx.keypair_jwt();
    assert_allowed(
        h.get_bearer("/orders/1", &keypair_jwt).await,
        "key-pair JWT before",
    )
    .await;
    document
        .revocations
        .clients
        .insert(fx.client_id.clone(), unix_now() + 10);
    h.sidecar.install(document).unwrap();
    assert_invalid(
        &h,
        h.get_bearer("/orders/1", &other_token).await,
        "token revoked",
        "revoked client: access token",
    )
    .await;
    assert_invalid(
        &h,
        h.get_bearer("/orders/1", &keypair_jwt).await,
        "token revoked",
        "revoked client: key-pair JWT",
    )
    .await;
    let resp = h
        .http
        .get(h.url("/orders/1"))
        .header("x-api-key", &fx.api_key)
        .send()
        .await
        .unwrap();
    // "Revoke every token" concerns tokens; an API key is withdrawn by rotation or by
    // disabling the client (both tested elsewhere).
    assert_allowed(resp, "revoked client: API key unaffected").await;
}

/// A change of the policy stream applies to the policy in force: the changed client's
/// cached callers are verified again (they may have lost scopes), others keep theirs, and a
/// change with one bad client changes nothing.
#[tokio::test]
async fn stream_changes_apply_in_place_and_reverify_only_changed_clients() {
    use keygate::policy::stream::PolicyDelta;
    let fx = Fixture::new();
    let document = mk_document(&fx);
    let h = Harness::start(document.clone()).await;
    let token = fx.access_token("orders.read");
    assert_allowed(h.get_bearer("/orders/1", &token).await, "before").await;

    // An unrelated client arrives: the cached caller stays (and stays allowed).
    let mut other = document.clients[0].clone();
    other.client_id = "kgc_other".into();
    other.name = "shop/other".into();
    other.keys.clear();
    other.api_keys.clear();
    let added = PolicyDelta {
        upsert_clients: vec![other.clone()],
        ..PolicyDelta::default()
    };
    h.sidecar.apply_change(&added).unwrap();
    assert_allowed(
        h.get_bearer("/orders/1", &token).await,
        "another client added",
    )
    .await;

    // The client loses orders.read: its cached token is verified again and refused.
    let mut narrowed = document.clients[0].clone();
    narrowed.scopes = vec!["orders.write".into()];
    let change = PolicyDelta {
        upsert_clients: vec![narrowed],
        ..PolicyDelta::default()
    };
    h.sidecar.apply_change(&change).unwrap();
    assert_insufficient(
        h.get_bearer("/orders/1", &token).await,
        "orders.read",
        "scope removed",
    )
    .await;

    // Removed: every credential of it is refused, the API key included.
    let removed = PolicyDelta {
        remove_clients: vec![fx.client_id.clone()],
        ..PolicyDelta::default()
    };
    h.sidecar.apply_change(&removed).unwrap();
    assert_invalid(
        &h,
        h.get_bearer("/orders/1", &token).await,
        "client has no grant on this API",
        "client removed",
    )
    .await;
    assert_invalid(
        &h,
        h.get_bearer("/orders/1", &fx.api_key).await,
        "unknown API key",
        "client removed: API key",
    )
    .await;

    // Back, together with a client whose key does not match its fingerprint: the change is
    // refused whole, so the client does not come back.
    let mut broken = other;
    broken.client_id = "kgc_broken".into();
    broken.keys = document.clients[0].keys.clone();
    broken.keys[0].fingerprint = "SHA256:AAAA".into();
    let bad = PolicyDelta {
        upsert_clients: vec![document.clients[0].clone(), broken],
        ..PolicyDelta::default()
    };
    let error = h.sidecar.apply_change(&bad).unwrap_err();
    assert!(error.contains("fingerprint does not match"), "{error}");
    assert_invalid(
        &h,
        h.get_bearer("/orders/1", &token).await,
        "client has no grant on this API",
        "a refused change",
    )
    .await;
    let back = PolicyDelta {
        upsert_clients: vec![document.clients[0].clone()],
        ..PolicyDelta::default()
    };
    h.sidecar.apply_change(&back).unwrap();
    assert_allowed(h.get_bearer("/orders/1", &token).await, "client back").await;
    assert_allowed(
        h.get_bearer("/orders/1", &fx.keypair_jwt()).await,
        "its key",
    )
    .await;
}

#[tokio::test]
async fn disabled_clients_and_expired_material_are_refused() {
    let fx = Fixture::new();
    let mut document = mk_document(&fx);
    let past = unix_now() - 1;
    document.clients[0].keys[0].not_after = Some(past);
    document.clients[0].api_keys[0].not_after = Some(past);
    let h = Harness::start(document.clone()).await;
    assert_invalid(
        &h,
        h.get_bearer("/orders/1", &fx.keypair_jwt()).await,
        "key expired",
        "expired key",
    )
    .await;
    assert_invalid(
        &h,
        h.get_bearer("/orders/1", &fx.api_key).await,
        "API key expired",
        "expired API key",
    )
    .await;

    document.disabled_clients.push(fx.client_id.clone());
    h.sidecar.install(document).unwrap();
    let token = fx.access_token("orders.read");
    assert_invalid(
        &h,
        h.get_bearer("/orders/1", &token).await,
        "client disabled",
        "disabled client",
    )
    .await;
}

/// A previous API key in its rotation overlap stops at `notAfter`, even when an earlier
/// request already verified it (the verdict cache must not outlive the key).
#[tokio::test]
async fn an_api_key_stops_at_not_after_even_when_cached() {
    let fx = Fixture::new();
    let mut document = mk_document(&fx);
    let not_after = unix_now() + 2;
    document.clients[0].api_keys[0].not_after = Some(not_after);
    let h = Harness::start(document).await;
    assert_allowed(
        h.get_bearer("/orders/1", &fx.api_key).await,
        "before notAfter",
    )
    .await;
    // Past notAfter and the clock-skew leeway, whole seconds.
    while unix_now() < not_after + LEEWAY.as_secs() + 1 {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let resp = h.get_bearer("/orders/1", &fx.api_key).await;
    assert_invalid(&h, resp, "API key expired", "cached API key past notAfter").await;
}

// ---------------------------------------------------------------------------------------
// 4. Path normalisation
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn path_tricks_never_bypass_a_rule() {
    let fx = Fixture::new();
    let h = Harness::start(mk_document_holding(&fx, &ALL_SCOPES)).await;
    let reader = format!("Bearer {}", fx.access_token("orders.read"));

    for target in [
        "/public/../admin/x",
        "//admin/x",
        "/public/%2e%2e/admin/x",
        "/%2e%2e/admin/x",
        "/public/%2E%2E/admin/x",
        "/public/./../admin/x",
        "/%61dmin/x",
    ] {
        let before = h.hit_count();
        let resp = raw_get(h.addr, target, &[]).await;
        assert_eq!(resp.status, 401, "{target} without a token: {}", resp.body);
        assert_eq!(resp.header("www-authenticate"), Some(REALM), "{target}");
        let resp = raw_get(h.addr, target, &[("Authorization", &reader)]).await;
        assert_eq!(
            resp.status, 403,
            "{target} without admin scope: {}",
            resp.body
        );
        assert_eq!(
            resp.header("www-authenticate"),
            Some(insufficient_scope_challenge("orders.admin").as_str()),
            "{target}"
        );
        assert_eq!(h.hit_count(), before, "{target} reached the upstream");
    }

    // Rules are case-sensitive: /ADMIN is not /admin/**, so the default action denies it.
    for auth in [None, Some(reader.as_str())] {
        let headers: Vec<(&str, &str)> = auth.map(|a| ("Authorization", a)).into_iter().collect();
        let resp = raw_get(h.addr, "/ADMIN/x", &headers).await;
        assert_eq!(resp.status, 403, "/ADMIN/x: {}", resp.body);
        assert_eq!(resp.header("www-authenticate"), None);
    }

    let before = h.hit_count();
    for target in [
        "/public/..%2Fadmin/x",
        "/admin%2fx",
        "/public%5C..%5Cadmin/x",
        "/public/%zz",
    ] {
        let resp = raw_get(h.addr, target, &[]).await;
        assert_eq!(resp.status, 400, "{target}: {}", resp.body);
        let body: Value = serde_json::from_str(&resp.body).unwrap();
        assert_eq!(body["error"], "invalid_request", "{target}");
    }
    assert_eq!(h.hit_count(), before, "a refused path reached the upstream");

    // Allowed requests reach the upstream with the path that was authorised.
    let admin = format!("Bearer {}", fx.access_token("orders.admin"));
    let resp = raw_get(
        h.addr,
        "/public/%2e%2e/admin/x?y=1",
        &[("Authorization", &admin)],
    )
    .await;
    assert_eq!(resp.status, 200, "{}", resp.body);
    assert_eq!(h.last_hit().as_deref(), Some("/admin/x?y=1"));
    let resp = raw_get(h.addr, "/public/./a//b/../c", &[]).await;
    assert_eq!(resp.status, 200, "{}", resp.body);
    assert_eq!(h.last_hit().as_deref(), Some("/public/a/c"));
    let resp = raw_get(h.addr, "/orders/%61bc", &[("Authorization", &reader)]).await;
    assert_eq!(resp.status, 200, "{}", resp.body);
    let echoed: Value = serde_json::from_str(&resp.body).unwrap();
    assert_eq!(echoed["path"], "/orders/abc");
}

// ---------------------------------------------------------------------------------------
// 5. External issuer via jwksUri
// ---------------------------------------------------------------------------------------

/// Serves `jwks` at `/jwks` until the returned sender fires; counts fetches.
async fn start_jwks_server(
    jwks: JwkSet,
) -> (
    SocketAddr,
    Arc<AtomicUsize>,
    oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let fetches = Arc::new(AtomicUsize::new(0));
    let counter = fetches.clone();
    let app = Router::new().route(
        "/jwks",
        get(move || {
            counter.fetch_add(1, Ordering::SeqCst);
            let jwks = jwks.clone();
            async move { axum::Json(jwks) }
        }),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = stopped.await;
            })
            .await
            .unwrap();
    });
    (addr, fetches, stop, task)
}

#[tokio::test]
async fn external_issuer_tokens_are_verified_with_its_jwks() {
    let fx = Fixture::new();
    let idp = Key::new();
    let idp_public = VerifyingKey::from_spki_pem(&idp.signing.public_pem).unwrap();
    let (jwks_addr, fetches, stop, jwks_task) = start_jwks_server(JwkSet {
        keys: vec![idp_public.jwk.clone()],
    })
    .await;

    let mut document = mk_document(&fx);
    document.spec.issuers = vec![TrustedIssuer {
        issuer: EXTERNAL_ISSUER.into(),
        jwks_uri: format!("http://{jwks_addr}/jwks"),
        audiences: Vec::new(),
    }];
    let h = Harness::start(document).await;

    let now = unix_now();
    let claims = |patch: Value| {
        let mut c = json!({"iss": EXTERNAL_ISSUER, "sub": "svc-payments", "aud": RESOURCE, "scope": "orders.read", "iat": now, "exp": now + 300});
        for (k, v) in patch.as_object().unwrap() {
            c[k] = v.clone();
        }
        c
    };
    let by_idp = |claims: &Value| {
        idp.signing
            .sign(Header::new(Algorithm::ES256), claims)
            .unwrap()
    };
    let token = by_idp(&claims(json!({})));

    let echoed = assert_allowed(h.get_bearer("/orders/1", &token).await, "external token").await;
    assert_eq!(
        header_values(&echoed, "x-keygate-client-id"),
        ["svc-payments"]
    );
    assert_eq!(header_values(&echoed, "x-keygate-scopes"), ["orders.read"]);
    assert_eq!(
        header_values(&echoed, "x-keygate-auth-method"),
        ["external_token"]
    );
    assert_insufficient(
        h.post_bearer("/orders/1", &token).await,
        "orders.write",
        "external: write",
    )
    .await;

    let wrong_aud = by_idp(&claims(json!({"aud": "https://billing.shop.svc"})));
    assert_invalid(
        &h,
        h.get_bearer("/orders/1", &wrong_aud).await,
        "wrong audience",
        "external: wrong aud",
    )
    .await;
    let expired = by_idp(&claims(json!({"iat": now - 7200, "exp": now - 3600})));
    assert_invalid(
        &h,
        h.get_bearer("/orders/1", &expired).await,
        "expired",
        "external: expired",
    )
    .await;
    // The issuer's key cannot speak for keygate, nor keygate's key for the issuer.
    let mut as_keygate = fx.access_header();
    as_keygate.kid = Some(idp.signing.kid.clone());
    let forged = idp.sign_raw(&as_keygate, &fx.access_claims_json("orders.read"));
    assert_invalid(
        &h,
        h.get_bearer("/orders/1", &forged).await,
        "unknown kid",
        "idp key as keygate",
    )
    .await;
    let by_keygate = fx
        .issuer
        .signing
        .sign(Header::new(Algorithm::ES256), &claims(json!({})))
        .unwrap();
    assert_invalid(
        &h,
        h.get_bearer("/orders/1", &by_keygate).await,
        "unknown kid",
        "keygate key as idp",
    )
    .await;
    let stranger = Key::new();
    let mut hs_header = Header::new(Algorithm::HS256);
    hs_header.kid = Some(idp.signing.kid.clone());
    let hmac = jsonwebtoken::encode(
        &hs_header,
        &claims(json!({})),
        &EncodingKey::from_secret(idp.signing.public_pem.as_bytes()),
    )
    .unwrap();
    assert_invalid(
        &h,
        h.get_bearer("/orders/1", &hmac).await,
        "algorithm not allowed",
        "external: HS256",
    )
    .await;
    let unknown_kid = stranger
        .signing
        .sign(Header::new(Algorithm::ES256), &claims(json!({})))
        .unwrap();
    assert_invalid(
        &h,
        h.get_bearer("/orders/1", &unknown_kid).await,
        "unknown kid",
        "external: unknown kid",
    )
    .await;
    // Fetched once; the unknown kid's refetch is rate-limited.
    assert_eq!(fetches.load(Ordering::SeqCst), 1);

    stop.send(()).unwrap();
    jwks_task.await.unwrap();
    assert!(
        TcpStream::connect(jwks_addr).await.is_err(),
        "the JWKS server still listens"
    );
    assert_allowed(
        h.get_bearer("/orders/1", &token).await,
        "known kid after the JWKS server stopped",
    )
    .await;
    // A new but genuine token with the already fetched kid works as well (not a cache hit).
    let fresh = by_idp(&claims(json!({"sub": "svc-shipping"})));
    let echoed = assert_allowed(
        h.get_bearer("/orders/1", &fresh).await,
        "fresh token, known kid",
    )
    .await;
    assert_eq!(
        header_values(&echoed, "x-keygate-client-id"),
        ["svc-shipping"]
    );

    // Once the refetch interval has passed, an unknown kid makes the sidecar fetch again; that
    // fetch fails, and the last good keys must stay.
    tokio::time::sleep(Duration::from_secs(11)).await;
    let another_unknown = Key::new()
        .signing
        .sign(Header::new(Algorithm::ES256), &claims(json!({})))
        .unwrap();
    assert_invalid(
        &h,
        h.get_bearer("/orders/1", &another_unknown).await,
        "unknown kid",
        "unknown kid, JWKS down",
    )
    .await;
    let after_failed_fetch = by_idp(&claims(json!({"sub": "svc-billing"})));
    assert_allowed(
        h.get_bearer("/orders/1", &after_failed_fetch).await,
        "known kid after a failed refetch",
    )
    .await;
}

// ---------------------------------------------------------------------------------------
// 6. Hot reload under load
// ---------------------------------------------------------------------------------------

/// Writes `contents` next to `path` and renames it into place, as a ConfigMap update does.
fn write_atomically(path: &Path, contents: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// Polls `check` every 20 ms, at most 500 times.
async fn eventually<F: std::future::Future<Output = bool>>(
    what: &str,
    mut check: impl FnMut() -> F,
) {
    for _ in 0..500 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("{what} never happened");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn hot_reload_under_load_keeps_the_last_good_policy() {
    let fx = Fixture::new();
    let dir = tempfile::tempdir().unwrap();
    let path: PathBuf = dir.path().join("policy.json");
    let v1 = mk_document(&fx);
    write_atomically(&path, &serde_json::to_vec_pretty(&v1).unwrap());

    let h = Arc::new(Harness::without_policy().await);
    let watcher = watch_policy_file(path.clone(), h.sidecar.clone(), Duration::from_millis(100))
        .await
        .unwrap();
    tokio::spawn(watcher);
    assert_eq!(h.metric("keygate_sidecar_policy_generation"), 1.0);

    let token = fx.access_token("orders.read");
    assert_denied(
        h.get_bearer("/reports/daily", &token).await,
        "before the new rule",
    )
    .await;

    let stop = Arc::new(AtomicBool::new(false));
    // Four callers, 500 requests each at most, mixing a JWT and an API key.
    let load: Vec<_> = (0..4)
        .map(|worker| {
            let (h, stop) = (h.clone(), stop.clone());
            let credential = if worker % 2 == 0 {
                token.clone()
            } else {
                fx.api_key.clone()
            };
            tokio::spawn(async move {
                let mut sent = 0;
                let mut failures = Vec::new();
                while sent < 500 && !stop.load(Ordering::SeqCst) {
                    let resp = h.get_bearer("/orders/1", &credential).await;
                    if resp.status() != 200 {
                        failures.push((
                            worker,
                            sent,
                            resp.status(),
                            resp.text().await.unwrap_or_default(),
                        ));
                    }
                    sent += 1;
                }
                (sent, failures)
            })
        })
        .collect();

    // A valid new version: one more rule.
    let mut v2 = v1.clone();
    v2.spec.rules.push(any_of(
        mk_rule("reports", &["GET"], &["/reports/**"]),
        &["orders.read"],
    ));
    write_atomically(&path, &serde_json::to_vec_pretty(&v2).unwrap());
    eventually("the new rule taking effect", || async {
        h.get_bearer("/reports/daily", &token).await.status() == 200
    })
    .await;
    assert_eq!(h.metric("keygate_sidecar_policy_generation"), 2.0);

    // Not JSON at all.
    write_atomically(&path, b"{ \"apiVersion\": \"keygate.dev/policy/v1\", ");
    eventually("the broken file being refused", || async {
        h.metric("keygate_sidecar_policy_reload_errors_total") >= 1.0
    })
    .await;
    assert_allowed(
        h.get_bearer("/reports/daily", &token).await,
        "after broken JSON",
    )
    .await;

    // Well-formed JSON whose rules do not compile.
    let mut garbage = v2.clone();
    garbage
        .spec
        .rules
        .push(mk_rule("bad", &["GET"], &["/orders/**/items"]));
    write_atomically(&path, &serde_json::to_vec_pretty(&garbage).unwrap());
    eventually("the bad rules being refused", || async {
        h.metric("keygate_sidecar_policy_reload_errors_total") >= 2.0
    })
    .await;
    assert_allowed(
        h.get_bearer("/reports/daily", &token).await,
        "after bad rules",
    )
    .await;
    assert_eq!(h.metric("keygate_sidecar_policy_generation"), 2.0);

    // An unknown format version is refused too.
    let mut future = v2.clone();
    future.api_version = "keygate.dev/policy/v2".into();
    write_atomically(&path, &serde_json::to_vec_pretty(&future).unwrap());
    eventually("the unknown version being refused", || async {
        h.metric("keygate_sidecar_policy_reload_errors_total") >= 3.0
    })
    .await;

    // So is an unknown field (issue #15, finding 8): with `requiredScopes` skipped, this rule
    // would let any client with a grant write.
    let mut typo = serde_json::to_value(&v2).unwrap();
    let rule = typo["spec"]["rules"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|r| r.get("requireScopes").is_some())
        .unwrap()
        .as_object_mut()
        .unwrap();
    let require = rule.remove("requireScopes").unwrap();
    rule.insert("requiredScopes".into(), require);
    rule.insert("authenticated".into(), Value::Bool(true));
    write_atomically(&path, &serde_json::to_vec_pretty(&typo).unwrap());
    eventually("the misspelt field being refused", || async {
        h.metric("keygate_sidecar_policy_reload_errors_total") >= 4.0
    })
    .await;

    stop.store(true, Ordering::SeqCst);
    let (mut sent, mut failures) = (0, Vec::new());
    for worker in load {
        let (worker_sent, worker_failures) = worker.await.unwrap();
        sent += worker_sent;
        failures.extend(worker_failures);
    }
    assert!(sent > 0);
    assert!(
        failures.is_empty(),
        "{} of {sent} requests failed during reloads: {failures:?}",
        failures.len()
    );
    assert_allowed(
        h.get_bearer("/reports/daily", &token).await,
        "last good policy",
    )
    .await;
    assert_eq!(h.metric("keygate_sidecar_policy_generation"), 2.0);
}

#[tokio::test]
async fn an_unreadable_policy_file_at_start_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let h = Harness::without_policy().await;
    let missing = watch_policy_file(
        dir.path().join("absent.json"),
        h.sidecar.clone(),
        Duration::from_millis(100),
    )
    .await;
    assert!(missing.is_err());
    let broken = dir.path().join("broken.json");
    write_atomically(&broken, b"[]");
    assert!(
        watch_policy_file(broken, h.sidecar.clone(), Duration::from_millis(100))
            .await
            .is_err()
    );
    let resp = h.http.get(h.url("/healthz")).send().await.unwrap();
    assert_eq!(resp.status(), 503);
}

// ---------------------------------------------------------------------------------------
// 7. No policy, 8. upstream down
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn without_a_policy_every_request_gets_503() {
    let fx = Fixture::new();
    let h = Harness::without_policy().await;
    assert!(!*h.sidecar.ready().borrow());
    for (path, token) in [
        ("/healthz", None),
        ("/public/x", None),
        ("/orders/1", Some(fx.access_token("orders.read"))),
    ] {
        let mut request = h.http.get(h.url(path));
        if let Some(token) = &token {
            request = request.bearer_auth(token);
        }
        let resp = request.send().await.unwrap();
        assert_eq!(resp.status(), 503, "{path}");
        let body: Value = resp.json().await.unwrap();
        assert_eq!(body["error"], "unavailable", "{path}");
    }
    assert_eq!(h.hit_count(), 0);

    h.sidecar.install(mk_document(&fx)).unwrap();
    assert!(*h.sidecar.ready().borrow());
    assert_allowed(
        h.http.get(h.url("/healthz")).send().await.unwrap(),
        "after install",
    )
    .await;
}

#[tokio::test]
async fn an_invalid_policy_is_not_installed() {
    let fx = Fixture::new();
    let h = Harness::start(mk_document(&fx)).await;
    let mut bad = mk_document(&fx);
    bad.spec.rules.push(mk_rule("bad", &[], &["/a/**/b"]));
    assert!(h.sidecar.install(bad).is_err());
    let mut mismatched = mk_document(&fx);
    mismatched.clients[0].keys[0].fingerprint = fx.stranger_key.signing.fingerprint.clone();
    assert!(h.sidecar.install(mismatched).is_err());
    assert_allowed(
        h.get_bearer("/orders/1", &fx.keypair_jwt()).await,
        "previous policy",
    )
    .await;
}

#[tokio::test]
async fn upstream_down_is_a_502_without_the_credential() {
    let fx = Fixture::new();
    let closed = {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        listener.local_addr().unwrap()
    };
    let h = Harness::in_front_of(closed, Hits::default()).await;
    h.sidecar.install(mk_document(&fx)).unwrap();
    let token = fx.access_token("orders.read");
    let cases = [
        ("/orders/1", Some(token.clone())),
        ("/orders/1", Some(fx.api_key.clone())),
        ("/healthz", None),
    ];
    for (path, credential) in cases {
        let mut request = h.http.get(h.url(path));
        if let Some(credential) = &credential {
            request = request.bearer_auth(credential);
        }
        let resp = request.send().await.unwrap();
        assert_eq!(resp.status(), 502, "{path}");
        assert_eq!(resp.headers()["content-type"], "application/json");
        let body = resp.text().await.unwrap();
        let json: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(json["error"], "upstream_unavailable");
        if let Some(credential) = credential {
            assert!(
                !body.contains(&credential),
                "the credential is in the 502 body"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------
// 9. Issue #15: upgrade tunnels, look-alike identity headers, scopes a client has lost,
//    key-pair JWT time claims
// ---------------------------------------------------------------------------------------

/// How the raw upstream answers a request.
#[derive(Clone, Copy, Debug)]
enum Switch {
    /// `101` naming the protocol asked for, only to a request with an `Upgrade` header;
    /// `200 plain` otherwise.
    WhenAsked,
    /// `101 Upgrade: <protocol>` to every request, asked or not: the worst an application
    /// can do.
    Always(&'static str),
    /// `200 Connection Established` to every request, then echo: a CONNECT tunnel.
    Established,
}

/// A raw-TCP workload that switches protocols and then echoes every byte it receives, so a
/// spliced connection is a tunnel straight into the application.
struct RawUpstream {
    addr: SocketAddr,
    /// Every request head received, lower-cased.
    heads: Arc<Mutex<Vec<String>>>,
    /// Bytes received after a `101`, i.e. through a tunnel.
    tunnelled: Arc<Mutex<Vec<u8>>>,
}

impl RawUpstream {
    async fn start(switch: Switch) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let heads: Arc<Mutex<Vec<String>>> = Arc::default();
        let tunnelled: Arc<Mutex<Vec<u8>>> = Arc::default();
        let (h, t) = (heads.clone(), tunnelled.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(Self::connection(stream, switch, h.clone(), t.clone()));
            }
        });
        Self {
            addr,
            heads,
            tunnelled,
        }
    }

    async fn connection(
        mut stream: TcpStream,
        switch: Switch,
        heads: Arc<Mutex<Vec<String>>>,
        tunnelled: Arc<Mutex<Vec<u8>>>,
    ) {
        let mut buffer = Vec::new();
        loop {
            let Some(end) = read_head(&mut stream, &mut buffer).await else {
                return;
            };
            let head = String::from_utf8_lossy(&buffer[..end]).to_ascii_lowercase();
            let rest = buffer.split_off(end);
            heads.lock().unwrap().push(head.clone());
            let asked = head
                .lines()
                .find_map(|l| l.strip_prefix("upgrade:"))
                .map(|v| v.trim().to_owned());
            let protocol = match (switch, asked) {
                (Switch::Established, _) => String::new(),
                (Switch::Always(protocol), _) => protocol.to_owned(),
                (Switch::WhenAsked, Some(asked)) => asked,
                (Switch::WhenAsked, None) => {
                    let answer = "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 5\r\n\r\nplain";
                    if stream.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                    buffer = rest;
                    continue;
                }
            };
            let answer = if protocol.is_empty() {
                "HTTP/1.1 200 Connection Established\r\n\r\n".to_owned()
            } else {
                format!(
                    "HTTP/1.1 101 Switching Protocols\r\nconnection: Upgrade\r\nupgrade: {protocol}\r\nsec-websocket-accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n"
                )
            };
            if stream.write_all(answer.as_bytes()).await.is_err() {
                return;
            }
            // From here on the connection is a raw tunnel: echo everything.
            let mut pending = rest;
            loop {
                if !pending.is_empty() {
                    tunnelled.lock().unwrap().extend_from_slice(&pending);
                    if stream.write_all(&pending).await.is_err() {
                        return;
                    }
                }
                let mut chunk = [0u8; 4096];
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => pending = chunk[..n].to_vec(),
                }
            }
        }
    }

    fn heads(&self) -> Vec<String> {
        self.heads.lock().unwrap().clone()
    }

    fn tunnelled(&self) -> Vec<u8> {
        self.tunnelled.lock().unwrap().clone()
    }
}

/// Reads from `stream` into `buffer` until it holds a whole head; returns the offset just past
/// the blank line, or `None` when the peer closed first.
async fn read_head(stream: &mut TcpStream, buffer: &mut Vec<u8>) -> Option<usize> {
    loop {
        if let Some(at) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            return Some(at + 4);
        }
        let mut chunk = [0u8; 4096];
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return None,
            Ok(n) => buffer.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Fails the test instead of hanging it.
async fn bounded<F: std::future::Future>(future: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(10), future)
        .await
        .expect("test step timed out")
}

/// One exchange on an open connection: writes `request` and reads the answer's head and,
/// except after a `101`, its `Content-Length` body. `None` when the sidecar closed the
/// connection instead of answering.
async fn exchange(stream: &mut TcpStream, request: &str) -> Option<RawResponse> {
    bounded(async {
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut buffer = Vec::new();
        let end = read_head(stream, &mut buffer).await?;
        let head = String::from_utf8_lossy(&buffer[..end]).into_owned();
        let mut lines = head.trim_end().split("\r\n");
        // Anything but an HTTP status line (an echo through a tunnel) is status 0.
        let status = lines
            .next()
            .filter(|l| l.starts_with("HTTP/1.1 "))
            .and_then(|l| l.split(' ').nth(1))
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
            .collect();
        let mut body = buffer[end..].to_vec();
        if status != 101 {
            let length: usize = headers
                .iter()
                .find(|(n, _)| n == "content-length")
                .and_then(|(_, v)| v.parse().ok())
                .unwrap_or(0);
            while body.len() < length {
                let mut chunk = [0u8; 4096];
                match stream.read(&mut chunk).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => body.extend_from_slice(&chunk[..n]),
                }
            }
        }
        Some(RawResponse {
            status,
            headers,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    })
    .await
}

/// `GET <path>` with `headers`, keeping the connection open.
fn request_head(path: &str, headers: &[(&str, &str)]) -> String {
    request_head_with("GET", path, headers)
}

fn request_head_with(method: &str, path: &str, headers: &[(&str, &str)]) -> String {
    let mut request = format!("{method} {path} HTTP/1.1\r\nHost: orders.shop.svc\r\n");
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    request
}

/// The h2c upgrade request the attack used, with `HTTP2-Settings`.
const H2C_UPGRADE: [(&str, &str); 3] = [
    ("Connection", "Upgrade, HTTP2-Settings"),
    ("Upgrade", "h2c"),
    ("HTTP2-Settings", "AAMAAABkAARAAAAAAAIAAAAA"),
];

/// A complete WebSocket opening handshake (RFC 6455 §4.1).
const WEBSOCKET_UPGRADE: [(&str, &str); 4] = [
    ("Connection", "Upgrade"),
    ("Upgrade", "websocket"),
    ("Sec-WebSocket-Key", "dGhlIHNhbXBsZSBub25jZQ=="),
    ("Sec-WebSocket-Version", "13"),
];

/// After an answer that is not a `101`, the connection is still HTTP checked by the
/// sidecar (or closed), never a tunnel: a request for a scoped route without a credential
/// gets the sidecar's 401 and does not reach the application.
async fn assert_not_a_tunnel(stream: &mut TcpStream, upstream: &RawUpstream, what: &str) {
    let before = upstream.heads().len();
    let follow_up = request_head("/admin/secrets", &[]);
    if let Some(resp) = exchange(stream, &follow_up).await {
        assert_eq!(
            resp.status, 401,
            "{what}: the connection became a tunnel ({:?})",
            resp.body
        );
    }
    assert_eq!(upstream.heads().len(), before, "{what}: reached the app");
    assert!(
        upstream.tunnelled().is_empty(),
        "{what}: bytes went through a tunnel"
    );
}

fn with<'a>(base: &[(&'a str, &'a str)], more: &[(&'a str, &'a str)]) -> Vec<(&'a str, &'a str)> {
    base.iter().chain(more).copied().collect()
}

/// `Upgrade: h2c` (deprecated by RFC 9113) is never forwarded: the sidecar drops the
/// `Upgrade` and `HTTP2-Settings` headers and the request goes on as plain HTTP/1.1, on a
/// public route as on an authenticated one; the connection stays HTTP checked by the sidecar.
#[tokio::test]
async fn an_h2c_upgrade_is_stripped_and_never_opens_a_tunnel() {
    let fx = Fixture::new();
    let upstream = RawUpstream::start(Switch::WhenAsked).await;
    let h = Harness::in_front_of(upstream.addr, Hits::default()).await;
    h.sidecar.install(mk_document(&fx)).unwrap();
    let reader = format!("Bearer {}", fx.access_token("orders.read"));

    for (what, path, auth) in [
        ("public route", "/healthz", None),
        ("authenticated route", "/orders/1", Some(reader.as_str())),
    ] {
        let mut headers = H2C_UPGRADE.to_vec();
        headers.extend(auth.map(|a| ("Authorization", a)));
        let mut stream = TcpStream::connect(h.addr).await.unwrap();
        let resp = exchange(&mut stream, &request_head(path, &headers))
            .await
            .unwrap();
        assert_eq!(resp.status, 200, "{what}: {}", resp.body);
        assert_eq!(resp.body, "plain", "{what}");
        let head = upstream.heads().last().cloned().unwrap();
        assert!(!head.contains("upgrade: "), "{what}: forwarded {head}");
        assert!(!head.contains("http2-settings"), "{what}: forwarded {head}");
        assert!(!head.contains("h2c"), "{what}: forwarded {head}");
        assert_not_a_tunnel(&mut stream, &upstream, what).await;
    }
}

/// Upgrades to anything but WebSocket are refused with 400 before they reach the app.
#[tokio::test]
async fn upgrades_to_other_protocols_are_refused() {
    let fx = Fixture::new();
    let upstream = RawUpstream::start(Switch::WhenAsked).await;
    let h = Harness::in_front_of(upstream.addr, Hits::default()).await;
    h.sidecar.install(mk_document(&fx)).unwrap();
    let reader = format!("Bearer {}", fx.access_token("orders.read"));

    for protocol in [
        "x-raw",
        "TLS/1.2",
        "websocket, x-raw",
        "h2c, x-raw",
        "IRC/6.9",
    ] {
        for (path, auth) in [
            ("/healthz", None),
            ("/public/feed", None),
            ("/orders/1", Some(reader.as_str())),
        ] {
            let what = format!("Upgrade: {protocol} on {path}");
            let mut headers = vec![("Connection", "Upgrade"), ("Upgrade", protocol)];
            headers.extend(auth.map(|a| ("Authorization", a)));
            let mut stream = TcpStream::connect(h.addr).await.unwrap();
            let resp = exchange(&mut stream, &request_head(path, &headers))
                .await
                .unwrap();
            assert_eq!(resp.status, 400, "{what}: {}", resp.body);
            let body: Value = serde_json::from_str(&resp.body).unwrap();
            assert_eq!(body["error"], "invalid_request", "{what}");
            assert!(upstream.heads().is_empty(), "{what}: reached the app");
            assert_not_a_tunnel(&mut stream, &upstream, &what).await;
        }
    }
}

/// A WebSocket upgrade is forwarded only where a rule authenticated the caller, after the
/// same checks as any request; it is then spliced and carries the verified identity.
#[tokio::test]
async fn a_websocket_upgrade_needs_a_rule_that_authenticates_the_caller() {
    let fx = Fixture::new();
    let upstream = RawUpstream::start(Switch::WhenAsked).await;
    let h = Harness::in_front_of(upstream.addr, Hits::default()).await;
    h.sidecar.install(mk_document(&fx)).unwrap();
    let reader = format!("Bearer {}", fx.access_token("orders.read"));

    // Public rules never open a tunnel.
    for path in ["/healthz", "/public/feed"] {
        let mut stream = TcpStream::connect(h.addr).await.unwrap();
        let resp = exchange(&mut stream, &request_head(path, &WEBSOCKET_UPGRADE))
            .await
            .unwrap();
        assert_eq!(resp.status, 403, "{path}: {}", resp.body);
        let body: Value = serde_json::from_str(&resp.body).unwrap();
        assert_eq!(body["error"], "access_denied", "{path}");
        assert_not_a_tunnel(&mut stream, &upstream, path).await;
    }
    // Scoped rules answer exactly as for any request.
    let cases = [
        (
            "no credential",
            "/orders/ws",
            WEBSOCKET_UPGRADE.to_vec(),
            401,
        ),
        (
            "bad credential",
            "/orders/ws",
            with(&WEBSOCKET_UPGRADE, &[("Authorization", "Bearer a.b.c")]),
            401,
        ),
        (
            "insufficient scope",
            "/admin/ws",
            with(&WEBSOCKET_UPGRADE, &[("Authorization", &reader)]),
            403,
        ),
        (
            "no rule",
            "/billing/ws",
            with(&WEBSOCKET_UPGRADE, &[("Authorization", &reader)]),
            403,
        ),
    ];
    for (what, path, headers, status) in cases {
        let mut stream = TcpStream::connect(h.addr).await.unwrap();
        let resp = exchange(&mut stream, &request_head(path, &headers))
            .await
            .unwrap();
        assert_eq!(resp.status, status, "{what}: {}", resp.body);
        assert_not_a_tunnel(&mut stream, &upstream, what).await;
    }
    // A WebSocket handshake must be a GET with its keys (RFC 6455 §4.1).
    let post = request_head_with(
        "POST",
        "/orders/ws",
        &with(&WEBSOCKET_UPGRADE, &[("Authorization", &reader)]),
    );
    let incomplete = request_head(
        "/orders/ws",
        &[
            ("Connection", "Upgrade"),
            ("Upgrade", "websocket"),
            ("Authorization", &reader),
        ],
    );
    for (what, request) in [("POST", post), ("no Sec-WebSocket-Key", incomplete)] {
        let mut stream = TcpStream::connect(h.addr).await.unwrap();
        let resp = exchange(&mut stream, &request).await.unwrap();
        assert_eq!(resp.status, 400, "{what}: {}", resp.body);
        assert_not_a_tunnel(&mut stream, &upstream, what).await;
    }
    assert!(
        upstream.heads().is_empty(),
        "a refused upgrade reached the app"
    );

    // Allowed: forwarded with the identity, then spliced.
    let mut stream = TcpStream::connect(h.addr).await.unwrap();
    let handshake = with(
        &WEBSOCKET_UPGRADE,
        &[
            ("Authorization", &reader),
            ("X-Keygate-Scopes", "orders.admin"),
        ],
    );
    let resp = exchange(&mut stream, &request_head("/orders/ws", &handshake))
        .await
        .unwrap();
    assert_eq!(resp.status, 101, "{}", resp.body);
    assert_eq!(resp.header("upgrade"), Some("websocket"));
    let head = upstream.heads().last().cloned().unwrap();
    assert!(head.starts_with("get /orders/ws http/1.1\r\n"), "{head}");
    assert!(head.contains("\r\nupgrade: websocket\r\n"), "{head}");
    assert!(
        head.contains(&format!(
            "\r\nx-keygate-client-id: {}\r\n",
            fx.client_id.to_ascii_lowercase()
        )),
        "{head}"
    );
    assert!(
        head.contains("\r\nx-keygate-scopes: orders.read\r\n"),
        "{head}"
    );
    assert!(!head.contains("orders.admin"), "{head}");
    assert!(!head.contains("authorization"), "{head}");
    for message in [&b"hello keygate"[..], &b"\x81\x05hello"[..]] {
        stream.write_all(message).await.unwrap();
        let mut echoed = vec![0u8; message.len()];
        bounded(stream.read_exact(&mut echoed)).await.unwrap();
        assert_eq!(echoed, message);
    }
}

/// Whatever the application answers, a `101` is spliced only for a WebSocket upgrade the
/// sidecar forwarded, and only when it switches to WebSocket.
#[tokio::test]
async fn an_upstream_101_to_anything_else_is_never_spliced() {
    let fx = Fixture::new();
    let reader = format!("Bearer {}", fx.access_token("orders.read"));

    let upstream = RawUpstream::start(Switch::Always("websocket")).await;
    let h = Harness::in_front_of(upstream.addr, Hits::default()).await;
    h.sidecar.install(mk_document(&fx)).unwrap();
    let cases: Vec<(&str, String)> = vec![
        ("plain public request", request_head("/healthz", &[])),
        (
            "plain authenticated request",
            request_head("/orders/1", &[("Authorization", &reader)]),
        ),
        (
            "h2c on a public route",
            request_head("/healthz", &H2C_UPGRADE),
        ),
        (
            "h2c on an authenticated route",
            request_head(
                "/orders/1",
                &with(&H2C_UPGRADE, &[("Authorization", &reader)]),
            ),
        ),
        (
            "Upgrade without Connection: upgrade",
            request_head(
                "/orders/1",
                &[("Upgrade", "websocket"), ("Authorization", &reader)],
            ),
        ),
    ];
    for (what, request) in cases {
        let mut stream = TcpStream::connect(h.addr).await.unwrap();
        let resp = exchange(&mut stream, &request).await.unwrap();
        assert_eq!(resp.status, 502, "{what}: {}", resp.body);
        let body: Value = serde_json::from_str(&resp.body).unwrap();
        assert_eq!(body["error"], "upstream_error", "{what}");
        assert_not_a_tunnel(&mut stream, &upstream, what).await;
    }

    // A permitted WebSocket upgrade the application switches to another protocol.
    let upstream = RawUpstream::start(Switch::Always("x-raw")).await;
    let h = Harness::in_front_of(upstream.addr, Hits::default()).await;
    h.sidecar.install(mk_document(&fx)).unwrap();
    let mut stream = TcpStream::connect(h.addr).await.unwrap();
    let handshake = with(&WEBSOCKET_UPGRADE, &[("Authorization", &reader)]);
    let resp = exchange(&mut stream, &request_head("/orders/ws", &handshake))
        .await
        .unwrap();
    assert_eq!(resp.status, 502, "{}", resp.body);
    assert_not_a_tunnel(&mut stream, &upstream, "101 to x-raw").await;
}

/// A request head over 64 KiB is refused before anything is decided or forwarded, so an
/// unauthenticated caller cannot make each connection buffer hyper's default ~400 KiB.
#[tokio::test]
async fn oversized_request_heads_are_refused() {
    let fx = Fixture::new();
    let h = Harness::start(mk_document(&fx)).await;
    let within = "a".repeat(40 * 1024);
    let ok = raw_get(h.addr, "/healthz", &[("X-Padding", &within)]).await;
    assert_eq!(ok.status, 200, "a 40 KiB head is fine");
    let hits = h.hit_count();

    let over = "a".repeat(200 * 1024);
    let request =
        format!("GET /healthz HTTP/1.1\r\nHost: orders.shop.svc\r\nX-Padding: {over}\r\n\r\n");
    let mut stream = TcpStream::connect(h.addr).await.unwrap();
    // The sidecar stops reading at the limit and closes, so the write or the read may see a
    // reset instead of the 431 it sent: either way, nothing may have been let through.
    let _ = stream.write_all(request.as_bytes()).await;
    let mut raw = Vec::new();
    let _ = stream.read_to_end(&mut raw).await;
    let text = String::from_utf8_lossy(&raw);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 431"),
        "{}",
        &text[..text.len().min(200)]
    );
    assert_eq!(h.hit_count(), hits, "an oversized head reached the app");
}

/// CGI and WSGI servers map `_` (Apache: every non-alphanumeric character) and `-` to the
/// same variable, so a look-alike of an identity header is one: they are all removed.
#[tokio::test]
async fn look_alike_identity_headers_are_removed() {
    let fx = Fixture::new();
    let h = Harness::start(mk_document(&fx)).await;
    let token = fx.access_token("orders.read");
    let spoof = |request: reqwest::RequestBuilder| {
        request
            .header("X_Keygate_Client_Id", "admin")
            .header("X_Keygate_Scopes", "orders.read orders.write orders.admin")
            .header("x_keygate-auth_method", "access_token")
            .header("X.Keygate.Extra", "1")
            .header("x~keygate~other", "1")
            .header("X_Forwarded_Host", "evil.example")
            .header("X_Forwarded_Proto", "https")
            .header("X_Forwarded_For", "10.0.0.1")
    };
    let folds_to_reserved = |name: &str| {
        let folded: String = name
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() {
                    c.to_ascii_lowercase()
                } else {
                    '-'
                }
            })
            .collect();
        folded.starts_with("x-keygate-") || folded.starts_with("x-forwarded-")
    };

    let resp = spoof(h.http.get(h.url("/orders/7")).bearer_auth(&token))
        .send()
        .await
        .unwrap();
    let echoed = assert_allowed(resp, "protected").await;
    let names: Vec<String> = echoed["headers"]
        .as_object()
        .unwrap()
        .keys()
        .filter(|n| folds_to_reserved(n))
        .cloned()
        .collect();
    assert_eq!(
        names,
        [
            "x-forwarded-for",
            "x-forwarded-host",
            "x-forwarded-proto",
            "x-keygate-auth-method",
            "x-keygate-client-id",
            "x-keygate-scopes",
        ],
        "{echoed}"
    );
    assert_eq!(
        header_values(&echoed, "x-keygate-client-id"),
        [fx.client_id.as_str()]
    );
    assert_eq!(header_values(&echoed, "x-keygate-scopes"), ["orders.read"]);
    assert_eq!(
        header_values(&echoed, "x-keygate-auth-method"),
        ["access_token"]
    );
    assert_eq!(header_values(&echoed, "x-forwarded-for"), ["127.0.0.1"]);

    for path in ["/healthz", "/public/docs"] {
        let resp = spoof(h.http.get(h.url(path))).send().await.unwrap();
        let echoed = assert_allowed(resp, path).await;
        let names: Vec<String> = echoed["headers"]
            .as_object()
            .unwrap()
            .keys()
            .filter(|n| folds_to_reserved(n))
            .cloned()
            .collect();
        assert_eq!(
            names,
            ["x-forwarded-for", "x-forwarded-host", "x-forwarded-proto"],
            "{path}: {echoed}"
        );
    }
}

/// A keygate access token carries only the scopes its client still holds: token scopes ∩
/// the client's current scopes in the policy, cached or not; a client no longer in the
/// policy gets 401.
#[tokio::test]
async fn a_token_keeps_only_the_scopes_its_client_still_holds() {
    let fx = Fixture::new();
    let mut document = mk_document_holding(&fx, &["orders.read", "orders.write"]);
    let h = Harness::start(document.clone()).await;
    let token = fx.access_token("orders.read orders.write");
    // Verified (and cached) while the client may write.
    assert_allowed(h.post_bearer("/orders/1", &token).await, "write before").await;

    // Cut to read-only.
    document.clients[0].scopes = vec!["orders.read".into()];
    h.sidecar.install(document.clone()).unwrap();
    assert_insufficient(
        h.post_bearer("/orders/1", &token).await,
        "orders.write",
        "cached token after the cut",
    )
    .await;
    let echoed = assert_allowed(h.get_bearer("/orders/1", &token).await, "read after").await;
    assert_eq!(header_values(&echoed, "x-keygate-scopes"), ["orders.read"]);
    let fresh = fx.access_token("orders.read orders.write");
    assert_insufficient(
        h.post_bearer("/orders/1", &fresh).await,
        "orders.write",
        "fresh token after the cut",
    )
    .await;
    // A token only for scopes the client lost still authenticates it (it holds a grant
    // here) but satisfies no scope.
    let writer = fx.access_token("orders.write");
    assert_insufficient(
        h.get_bearer("/orders/1", &writer).await,
        "orders.read",
        "token for a lost scope",
    )
    .await;

    // The client loses its last grant on this API.
    document.clients.clear();
    h.sidecar.install(document).unwrap();
    assert_invalid(
        &h,
        h.get_bearer("/orders/1", &token).await,
        "client has no grant on this API",
        "client gone",
    )
    .await;
}

/// `nbf` is enforced on key-pair JWTs with the leeway, and `iat` or `nbf` after `exp` is
/// refused.
#[tokio::test]
async fn keypair_jwt_nbf_and_iat_after_exp_are_refused() {
    let fx = Fixture::new();
    let h = Harness::start(mk_document(&fx)).await;
    let now = unix_now();
    let iss = keypair_issuer(&fx.client_id, &fx.client_key.signing.fingerprint);
    let signed = |patch: Value| {
        let mut claims =
            json!({"iss": iss, "sub": fx.client_id, "iat": now, "exp": now + 300, "aud": RESOURCE});
        for (k, v) in patch.as_object().unwrap() {
            claims[k] = v.clone();
        }
        fx.client_key
            .signing
            .sign(Header::new(Algorithm::ES256), &claims)
            .unwrap()
    };
    let three_years = 3 * 365 * 24 * 3600;
    let cases = [
        (
            "nbf three years ahead",
            signed(json!({"nbf": now + three_years})),
            "not yet valid",
        ),
        (
            "nbf three years ahead, exp after it",
            signed(
                json!({"nbf": now + three_years, "exp": now + three_years + 60, "iat": now + three_years}),
            ),
            "issued in the future",
        ),
        (
            "nbf a minute ahead",
            signed(json!({"nbf": now + 60})),
            "not yet valid",
        ),
        (
            "iat after exp",
            signed(json!({"iat": now + 4, "exp": now + 3})),
            "issued after it expires",
        ),
        (
            "nbf after exp",
            signed(json!({"nbf": now + 2, "exp": now + 1})),
            "not valid before it expires",
        ),
        (
            "nbf not a number",
            signed(json!({"nbf": "soon"})),
            "malformed token",
        ),
    ];
    for (what, token, reason) in cases {
        let resp = h.get_bearer("/orders/1", &token).await;
        assert_invalid(&h, resp, reason, what).await;
    }
    // Within the leeway, or in the past, `nbf` passes.
    for (what, token) in [
        ("nbf within the leeway", signed(json!({"nbf": now + 2}))),
        ("nbf in the past", signed(json!({"nbf": now - 60}))),
    ] {
        assert_allowed(h.get_bearer("/orders/1", &token).await, what).await;
    }
}

/// CONNECT never opens a tunnel either, even where a public rule matches every method and
/// path and the application answers `200 Connection Established`.
#[tokio::test]
async fn connect_never_opens_a_tunnel() {
    let fx = Fixture::new();
    let upstream = RawUpstream::start(Switch::Established).await;
    let h = Harness::in_front_of(upstream.addr, Hits::default()).await;
    let mut document = mk_document(&fx);
    document
        .spec
        .rules
        .push(public(mk_rule("everything", &[], &["/**"])));
    h.sidecar.install(document).unwrap();
    for target in ["orders.shop.svc:443", "127.0.0.1:22", "/public/x", "*"] {
        let mut stream = TcpStream::connect(h.addr).await.unwrap();
        let request = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n");
        // Refused (the target is not a path), or forwarded and answered, but never spliced:
        // the connection is closed or still HTTP checked by the sidecar.
        if let Some(resp) = exchange(&mut stream, &request).await {
            assert_ne!(resp.status, 101, "{target}");
        }
        assert_not_a_tunnel(&mut stream, &upstream, target).await;
    }
}
