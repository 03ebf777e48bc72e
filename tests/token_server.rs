//! The token server over real HTTP: a listener on 127.0.0.1:0, the registry built from
//! ApiClient, M2MRole and ScopePolicy specs, and standard clients (the `oauth2` crate,
//! `jsonwebtoken` against the served JWKS) talking to it.

#[path = "support/jwt.rs"]
mod jwt;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use reqwest::StatusCode;
use reqwest::header::{self, HeaderMap};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

use keygate::api::{
    ApiClientSpec, ClientNamespaces, KeyAlgorithm, KeyPairSpec, M2MRoleSpec, Permission,
    ScopeDefinition, ScopePolicySpec,
};
use keygate::connections::ConnectionLimits;
use keygate::credentials::{
    CredentialData, SigningKey, derive_client_id, ensure_material, generate_key_pair, key, rotate,
    unix_now,
};
use keygate::registry::{
    ClientInput, Inputs, ObjectKey, PolicyInput, Registry, RevocationList, RevocationStore,
    Revocations, StoreError,
};
use keygate::token::access_token::new_jti;
use keygate::token::keys::{IssuerKeys, RotationPolicy, StoredKeySet};
use keygate::token::{TokenConfig, TokenServer, router};

const NS: &str = "shop";
const ORDERS: &str = "https://orders.shop.svc";
const BILLING: &str = "https://billing.shop.svc";
/// Declared in another namespace, open to clients from `shop`.
const INVENTORY: &str = "https://inventory.warehouse.svc";
/// Declared in another namespace that does not admit `shop`.
const LEDGER: &str = "https://ledger.finance.svc";
/// Named by a role but declared by no ScopePolicy.
const PAYMENTS: &str = "https://payments.shop.svc";
const JWT_BEARER: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
const WWW_AUTHENTICATE: &str = "Basic realm=\"keygate\", charset=\"UTF-8\"";
const FORM: &str = "application/x-www-form-urlencoded";

// ---------------------------------------------------------------------------------------
// Fixture
// ---------------------------------------------------------------------------------------

fn mk_policy(resource: &str, scopes: &[&str], client_namespaces: Option<&[&str]>) -> PolicyInput {
    PolicyInput {
        spec: ScopePolicySpec {
            resource: resource.to_owned(),
            scopes: scopes
                .iter()
                .map(|s| ScopeDefinition {
                    name: (*s).to_owned(),
                    description: None,
                })
                .collect(),
            client_namespaces: client_namespaces.map(|names| ClientNamespaces {
                names: names.iter().map(|n| (*n).to_owned()).collect(),
                selector: None,
            }),
            ..ScopePolicySpec::default()
        },
        created: Some(1),
    }
}

fn mk_role(permissions: &[(&str, &[&str])]) -> M2MRoleSpec {
    M2MRoleSpec {
        description: None,
        permissions: permissions
            .iter()
            .map(|(resource, scopes)| Permission {
                resource: (*resource).to_owned(),
                scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
            })
            .collect(),
    }
}

fn mk_client(roles: &[&str], client_secret: bool, key_pair: bool, disabled: bool) -> ApiClientSpec {
    ApiClientSpec {
        roles: roles.iter().map(|r| (*r).to_owned()).collect(),
        client_secret,
        key_pair: key_pair.then_some(KeyPairSpec {
            algorithm: KeyAlgorithm::ES256,
        }),
        disabled,
        ..ApiClientSpec::default()
    }
}

/// One ApiClient of the fixture with its credentials (the Secret's data).
#[derive(Clone)]
struct TestClient {
    spec: ApiClientSpec,
    data: CredentialData,
}

impl TestClient {
    fn id(&self) -> &str {
        &self.data[key::CLIENT_ID]
    }

    fn secret(&self) -> &str {
        &self.data[key::CLIENT_SECRET]
    }

    fn private_key(&self) -> &str {
        &self.data[key::PRIVATE_KEY]
    }
}

/// A running token server on 127.0.0.1 with the `shop` fixture loaded.
struct Fixture {
    issuer: String,
    /// The CA of the serving certificate when served over HTTPS.
    ca: Option<String>,
    addr: SocketAddr,
    registry: Arc<Registry>,
    revocations: Arc<Revocations>,
    clients: BTreeMap<&'static str, TestClient>,
    http: reqwest::Client,
    keys: watch::Sender<Arc<IssuerKeys>>,
    stored_keys: std::sync::Mutex<StoredKeySet>,
    store: TestStore,
}

/// The revocation store of the fixture: keeps what it is given, or fails while told to.
#[derive(Default, Clone)]
struct TestStore {
    stored: Arc<std::sync::Mutex<RevocationList>>,
    failing: Arc<std::sync::atomic::AtomicBool>,
}

impl TestStore {
    fn stored(&self) -> RevocationList {
        self.stored.lock().unwrap().clone()
    }

    fn fail(&self, failing: bool) {
        self.failing
            .store(failing, std::sync::atomic::Ordering::SeqCst);
    }
}

impl RevocationStore for TestStore {
    fn store(
        &self,
        entries: RevocationList,
    ) -> futures::future::BoxFuture<'static, Result<(), StoreError>> {
        let this = self.clone();
        Box::pin(async move {
            if this.failing.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(StoreError("the test store is failing".into()));
            }
            this.stored.lock().unwrap().absorb(&entries);
            Ok(())
        })
    }
}

const KEY_ROTATION: RotationPolicy = RotationPolicy {
    algorithm: KeyAlgorithm::ES256,
    every_secs: 30 * 24 * 3600,
    max_token_lifetime_secs: 24 * 3600,
};

impl Fixture {
    async fn start() -> Self {
        Self::start_with(|_| {}, ConnectionLimits::default()).await
    }

    /// The fixture with `configure` applied to the token server's settings, served within
    /// `limits`.
    async fn start_with(
        configure: impl FnOnce(&mut TokenConfig),
        limits: ConnectionLimits,
    ) -> Self {
        Self::serve(configure, limits, false).await
    }

    /// The fixture over HTTPS, as the operator serves it: a serving certificate for
    /// 127.0.0.1 from a CA of its own, which the fixture's HTTP client trusts (alone).
    async fn start_https(limits: ConnectionLimits) -> Self {
        Self::serve(|_| {}, limits, true).await
    }

    async fn serve(
        configure: impl FnOnce(&mut TokenConfig),
        limits: ConnectionLimits,
        https: bool,
    ) -> Self {
        // Bind first: the issuer (and so every token endpoint URL) names the port.
        let listener = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .unwrap();
        let addr = listener.local_addr().unwrap();
        let scheme = if https { "https" } else { "http" };
        let issuer = format!("{scheme}://127.0.0.1:{}", addr.port());
        let mut config = TokenConfig::new(&issuer);
        configure(&mut config);

        let mut inputs = Inputs::default();
        let policies = [
            (
                NS,
                "orders",
                mk_policy(ORDERS, &["orders.read", "orders.write"], None),
            ),
            (NS, "billing", mk_policy(BILLING, &["invoices.read"], None)),
            (
                "warehouse",
                "inventory",
                mk_policy(INVENTORY, &["stock.read"], Some(&["shop"])),
            ),
            (
                "finance",
                "ledger",
                mk_policy(LEDGER, &["ledger.read"], None),
            ),
        ];
        for (ns, name, policy) in policies {
            inputs.policies.insert(ObjectKey::new(ns, name), policy);
        }
        let roles = [
            ("order-reader", mk_role(&[(ORDERS, &["orders.read"])])),
            ("order-writer", mk_role(&[(ORDERS, &["orders.write"])])),
            ("invoice-reader", mk_role(&[(BILLING, &["invoices.read"])])),
            (
                // orders.delete is not defined by the orders policy, PAYMENTS is declared by
                // nobody and LEDGER does not admit shop: none of those may count.
                "operator",
                mk_role(&[
                    (ORDERS, &["orders.read", "orders.write", "orders.delete"]),
                    (INVENTORY, &["stock.read"]),
                    (LEDGER, &["ledger.read"]),
                    (PAYMENTS, &["payments.refund"]),
                ]),
            ),
        ];
        for (name, role) in roles {
            inputs.roles.insert(ObjectKey::new(NS, name), role);
        }
        let specs = [
            (
                "reporting",
                mk_client(&["order-reader"], true, false, false),
            ),
            (
                "billing",
                mk_client(&["order-writer", "invoice-reader"], true, false, false),
            ),
            ("keyed", mk_client(&["order-reader"], false, true, false)),
            ("disabled", mk_client(&["order-reader"], true, false, true)),
            ("edgy", mk_client(&["order-reader"], true, false, false)),
            ("ops", mk_client(&["operator"], true, false, false)),
        ];
        let mut clients = BTreeMap::new();
        for (name, spec) in specs {
            let client_id = derive_client_id(&format!("{NS}/{name}"));
            let (data, _) = ensure_material(
                &spec,
                &client_id,
                &config.token_endpoint(),
                &issuer,
                &CredentialData::new(),
            )
            .unwrap();
            inputs.clients.insert(
                ObjectKey::new(NS, name),
                ClientInput {
                    spec: spec.clone().into(),
                    credentials: Some(keygate::registry::read_credentials(&data)),
                },
            );
            clients.insert(name, TestClient { spec, data });
        }
        let registry = Arc::new(Registry::new(inputs));
        assert!(
            registry.snapshot().problems.is_empty(),
            "{:?}",
            registry.snapshot().problems
        );

        let mut stored = StoredKeySet::default();
        stored.maintain(KEY_ROTATION, unix_now()).unwrap();
        let (keys_tx, keys_rx) = watch::channel(IssuerKeys::from_stored(&stored).unwrap());

        let mut metrics = prometheus_client::registry::Registry::default();
        let revocations = Arc::new(Revocations::default());
        let store = TestStore::default();
        let server = TokenServer::new(
            config,
            registry.subscribe(),
            keys_rx,
            revocations.clone(),
            Arc::new(store.clone()),
            &mut metrics,
        );
        let (ca, http) = if https {
            let certs = keygate::tls::generate(
                "keygate test CA",
                &["127.0.0.1".to_owned()],
                SystemTime::now(),
            )
            .unwrap();
            let resolver =
                keygate::tls::CertResolver::from_pem(&certs.tls_crt, &certs.tls_key).unwrap();
            tokio::spawn(keygate::tls::serve_tls_with_limits(
                listener,
                router(server),
                resolver,
                limits,
                std::future::pending(),
            ));
            let http = trusting(&certs.ca_crt).build().unwrap();
            (Some(certs.ca_crt), http)
        } else {
            tokio::spawn(keygate::admin::serve(
                listener,
                router(server),
                limits,
                std::future::pending(),
            ));
            (None, reqwest::Client::new())
        };

        Self {
            issuer,
            ca,
            addr,
            registry,
            revocations,
            clients,
            http,
            keys: keys_tx,
            stored_keys: std::sync::Mutex::new(stored),
            store,
        }
    }

    fn client(&self, name: &str) -> &TestClient {
        &self.clients[name]
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.issuer)
    }

    fn token_endpoint(&self) -> String {
        self.url("/oauth2/token")
    }

    /// Replaces a client's credentials, as a rotated Secret would.
    fn set_credentials(&self, name: &str, data: &CredentialData) {
        self.registry.update(|inputs| {
            inputs
                .clients
                .get_mut(&ObjectKey::new(NS, name))
                .unwrap()
                .credentials = Some(keygate::registry::read_credentials(data));
        });
    }

    /// Rotates the issuer keys as a whole rotation interval had passed: next becomes current,
    /// current becomes previous.
    fn rotate_issuer_keys(&self) {
        let mut stored = self.stored_keys.lock().unwrap();
        assert!(
            stored
                .maintain(KEY_ROTATION, unix_now() + KEY_ROTATION.every_secs)
                .unwrap()
        );
        self.keys
            .send_replace(IssuerKeys::from_stored(&stored).unwrap());
    }

    /// A form POST with the right content type and no client authentication.
    fn post(&self, path: &str, params: &[(&str, &str)]) -> reqwest::RequestBuilder {
        self.http
            .post(self.url(path))
            .header(header::CONTENT_TYPE, FORM)
            .body(form(params))
    }

    /// A form POST authenticated with `client_secret_basic`.
    fn post_basic(
        &self,
        path: &str,
        client: &str,
        params: &[(&str, &str)],
    ) -> reqwest::RequestBuilder {
        let c = self.client(client);
        self.post(path, params)
            .header(header::AUTHORIZATION, basic(c.id(), c.secret()))
    }

    /// A token request with `client_secret_basic`.
    async fn token(&self, client: &str, params: &[(&str, &str)]) -> reqwest::Response {
        let mut all = vec![("grant_type", "client_credentials")];
        all.extend_from_slice(params);
        self.post_basic("/oauth2/token", client, &all)
            .send()
            .await
            .unwrap()
    }

    /// A successful token request's access token, after checking the success response.
    async fn access_token(&self, client: &str, params: &[(&str, &str)]) -> String {
        let response = self.token(client, params).await;
        assert_eq!(response.status(), StatusCode::OK);
        let body: Value = response.json().await.unwrap();
        body["access_token"].as_str().unwrap().to_owned()
    }

    /// Verifies an access token the way a resource server would: header, then the key named
    /// by `kid` in the served JWKS, then issuer and audience. Returns the claims.
    async fn verify(&self, token: &str, audience: &str) -> serde_json::Map<String, Value> {
        let header = jsonwebtoken::decode_header(token).unwrap();
        assert_eq!(header.typ.as_deref(), Some("at+jwt"));
        assert_eq!(header.alg, Algorithm::ES256);
        let kid = header.kid.expect("access tokens name their key");
        let jwks: JwkSet =
            serde_json::from_value(self.get_json("/.well-known/jwks.json").await).unwrap();
        let jwk = jwks.find(&kid).expect("the signing key is published");
        let mut validation = Validation::new(Algorithm::ES256);
        validation.set_issuer(&[&self.issuer]);
        validation.set_audience(&[audience]);
        validation.set_required_spec_claims(&["exp", "iat", "iss", "aud", "sub"]);
        jsonwebtoken::decode::<serde_json::Map<String, Value>>(
            token,
            &DecodingKey::from_jwk(jwk).unwrap(),
            &validation,
        )
        .unwrap()
        .claims
    }

    /// The JSON document served at `path`.
    async fn get_json(&self, path: &str) -> Value {
        let response = self.http.get(self.url(path)).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "GET {path}");
        response.json().await.unwrap()
    }

    /// A fresh `private_key_jwt` assertion of `client`.
    fn assertion(&self, client: &str) -> String {
        let now = unix_now();
        let c = self.client(client);
        sign_assertion(
            c.private_key(),
            c.id(),
            &self.token_endpoint(),
            now,
            now + 60,
        )
    }
}

/// An HTTP client that trusts only the CA `ca_pem` (like `curl --cacert`).
fn trusting(ca_pem: &str) -> reqwest::ClientBuilder {
    reqwest::Client::builder()
        .tls_certs_only(reqwest::Certificate::from_pem_bundle(ca_pem.as_bytes()).unwrap())
}

fn form(params: &[(&str, &str)]) -> String {
    form_urlencoded::Serializer::new(String::new())
        .extend_pairs(params)
        .finish()
}

/// `Authorization: Basic` as RFC 6749 §2.3.1 specifies it (both parts form-encoded first).
fn basic(id: &str, secret: &str) -> String {
    let enc = |s: &str| form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    format!(
        "Basic {}",
        STANDARD.encode(format!("{}:{}", enc(id), enc(secret)))
    )
}

fn sign_assertion(
    private_pem: &str,
    client_id: &str,
    audience: &str,
    iat: u64,
    exp: u64,
) -> String {
    let claims = json!({
        "iss": client_id,
        "sub": client_id,
        "aud": audience,
        "iat": iat,
        "exp": exp,
        "jti": new_jti().unwrap(),
    });
    sign_claims(private_pem, &claims)
}

fn sign_claims(private_pem: &str, claims: &Value) -> String {
    SigningKey::from_pkcs8_pem(private_pem)
        .unwrap()
        .sign(jsonwebtoken::Header::default(), claims)
        .unwrap()
}

/// Form parameters of a `private_key_jwt` token request.
fn assertion_params(assertion: &str) -> [(&str, &str); 3] {
    [
        ("grant_type", "client_credentials"),
        ("client_assertion_type", JWT_BEARER),
        ("client_assertion", assertion),
    ]
}

/// Checks an RFC 6749 §5.2 error response exactly: status, `error`, no caching, and the
/// `WWW-Authenticate` / `Retry-After` headers that only 401 / 429 carry. Returns the headers.
async fn assert_error(response: reqwest::Response, status: StatusCode, error: &str) -> HeaderMap {
    let headers = response.headers().clone();
    let got_status = response.status();
    let body: Value = response.json().await.expect("error bodies are JSON");
    assert_eq!(
        (got_status, body["error"].as_str()),
        (status, Some(error)),
        "body: {body}"
    );
    assert!(body["error_description"].is_string(), "body: {body}");
    assert_eq!(headers[header::CACHE_CONTROL], "no-store");
    assert_eq!(headers[header::PRAGMA], "no-cache");
    assert!(
        headers[header::CONTENT_TYPE]
            .to_str()
            .unwrap()
            .starts_with("application/json"),
        "{headers:?}"
    );
    if status == StatusCode::UNAUTHORIZED {
        assert_eq!(headers[header::WWW_AUTHENTICATE], WWW_AUTHENTICATE);
    } else {
        assert!(
            headers.get(header::WWW_AUTHENTICATE).is_none(),
            "{headers:?}"
        );
    }
    if status == StatusCode::TOO_MANY_REQUESTS {
        assert_eq!(headers[header::RETRY_AFTER], "60");
    }
    headers
}

/// A successful token response's body, after checking status and headers.
async fn assert_token(response: reqwest::Response) -> Value {
    let status = response.status();
    let headers = response.headers().clone();
    let body: Value = response.json().await.unwrap();
    assert_eq!(status, StatusCode::OK, "body: {body}");
    assert_eq!(headers[header::CACHE_CONTROL], "no-store");
    assert_eq!(headers[header::PRAGMA], "no-cache");
    assert_eq!(body["token_type"], "Bearer");
    body
}

/// Transport for the `oauth2` crate over the crate's own reqwest (oauth2 5 ships a client for
/// reqwest 0.12 only); oauth2 builds the request, this only carries it.
async fn oauth2_transport(
    request: oauth2::HttpRequest,
) -> Result<oauth2::HttpResponse, reqwest::Error> {
    let response = reqwest::Client::new()
        .execute(reqwest::Request::try_from(request)?)
        .await?;
    let mut builder = http::Response::builder().status(response.status());
    for (name, value) in response.headers() {
        builder = builder.header(name, value);
    }
    let body = response.bytes().await?.to_vec();
    Ok(builder.body(body).unwrap())
}

fn scope_set(scope: &str) -> BTreeSet<&str> {
    scope.split(' ').collect()
}

// ---------------------------------------------------------------------------------------
// 1. A standard OAuth client
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn oauth2_crate_gets_tokens_with_basic_and_body_authentication() {
    use oauth2::basic::{BasicClient, BasicErrorResponseType, BasicTokenType};
    use oauth2::{
        AuthType, ClientId, ClientSecret, RequestTokenError, Scope, TokenResponse, TokenUrl,
    };

    let fx = Fixture::start().await;
    let oauth_client = |name: &str, secret: &str, auth_type: AuthType| {
        BasicClient::new(ClientId::new(fx.client(name).id().to_owned()))
            .set_client_secret(ClientSecret::new(secret.to_owned()))
            .set_token_uri(TokenUrl::new(fx.token_endpoint()).unwrap())
            .set_auth_type(auth_type)
    };

    // client_secret_basic, resource given as an extra parameter.
    let reporting = fx.client("reporting");
    let token = oauth_client("reporting", reporting.secret(), AuthType::BasicAuth)
        .exchange_client_credentials()
        .add_extra_param("resource", ORDERS)
        .request_async(&oauth2_transport)
        .await
        .unwrap();
    assert_eq!(token.token_type(), &BasicTokenType::Bearer);
    assert_eq!(
        token.expires_in(),
        Some(std::time::Duration::from_secs(3600))
    );
    assert_eq!(
        token.scopes(),
        Some(&vec![Scope::new("orders.read".into())])
    );
    let claims = fx.verify(token.access_token().secret(), ORDERS).await;
    let names: BTreeSet<&str> = claims.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        BTreeSet::from([
            "iss",
            "sub",
            "client_id",
            "aud",
            "scope",
            "iat",
            "exp",
            "jti"
        ])
    );
    assert_eq!(claims["iss"], fx.issuer.as_str());
    assert_eq!(claims["sub"], reporting.id());
    assert_eq!(claims["client_id"], reporting.id());
    assert_eq!(claims["aud"], ORDERS);
    assert_eq!(claims["scope"], "orders.read");
    let (iat, exp) = (
        claims["iat"].as_u64().unwrap(),
        claims["exp"].as_u64().unwrap(),
    );
    assert_eq!(exp - iat, 3600);
    assert!(iat.abs_diff(unix_now()) <= 5, "iat {iat} is now");
    assert_eq!(claims["jti"].as_str().unwrap().len(), 22);

    // client_secret_post, a two-resource client naming one resource and one scope.
    let billing = fx.client("billing");
    let token = oauth_client("billing", billing.secret(), AuthType::RequestBody)
        .exchange_client_credentials()
        .add_extra_param("resource", BILLING)
        .add_scope(Scope::new("invoices.read".into()))
        .request_async(&oauth2_transport)
        .await
        .unwrap();
    let claims = fx.verify(token.access_token().secret(), BILLING).await;
    assert_eq!(
        (claims["sub"].as_str(), claims["scope"].as_str()),
        (Some(billing.id()), Some("invoices.read"))
    );

    // The crate reads keygate's errors as standard error responses.
    let err = oauth_client("reporting", "kgs_wrong", AuthType::BasicAuth)
        .exchange_client_credentials()
        .request_async(&oauth2_transport)
        .await
        .unwrap_err();
    match err {
        RequestTokenError::ServerResponse(e) => {
            assert_eq!(e.error(), &BasicErrorResponseType::InvalidClient)
        }
        other => panic!("expected an invalid_client response, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------
// 2. Response shape
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn token_response_is_not_cached_and_is_a_bearer_token() {
    let fx = Fixture::start().await;
    let response = fx.token("reporting", &[]).await;
    assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
    let body = assert_token(response).await;
    let fields: BTreeSet<&str> = body
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        fields,
        BTreeSet::from(["access_token", "token_type", "expires_in", "scope"])
    );
    assert_eq!(body["expires_in"], 3600);
    assert_eq!(body["scope"], "orders.read");
    // No `resource` needed: the client has scopes on one resource only.
    fx.verify(body["access_token"].as_str().unwrap(), ORDERS)
        .await;
}

#[tokio::test]
async fn token_lifetime_follows_the_client() {
    let fx = Fixture::start().await;
    fx.registry.update(|inputs| {
        let client = inputs
            .clients
            .get_mut(&ObjectKey::new(NS, "reporting"))
            .unwrap();
        std::sync::Arc::make_mut(&mut client.spec).token_lifetime = Some("15m".into());
    });
    let body = assert_token(fx.token("reporting", &[]).await).await;
    assert_eq!(body["expires_in"], 900);
    let claims = fx
        .verify(body["access_token"].as_str().unwrap(), ORDERS)
        .await;
    assert_eq!(
        claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(),
        900
    );
}

// ---------------------------------------------------------------------------------------
// 3. Scopes and resources
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn scope_grant_follows_roles_and_the_trust_model() {
    let fx = Fixture::start().await;

    // No scope requested: everything allowed on the resource (the undefined orders.delete
    // of the role is not among it).
    let body = assert_token(fx.token("ops", &[("resource", ORDERS)]).await).await;
    assert_eq!(body["scope"], "orders.read orders.write");
    let claims = fx
        .verify(body["access_token"].as_str().unwrap(), ORDERS)
        .await;
    assert_eq!(
        scope_set(claims["scope"].as_str().unwrap()),
        BTreeSet::from(["orders.read", "orders.write"])
    );

    // Requested ∩ allowed.
    let body = assert_token(
        fx.token("ops", &[("resource", ORDERS), ("scope", "orders.read")])
            .await,
    )
    .await;
    assert_eq!(body["scope"], "orders.read");
    let body = assert_token(
        fx.token(
            "ops",
            &[
                ("resource", ORDERS),
                ("scope", "orders.delete orders.write"),
            ],
        )
        .await,
    )
    .await;
    assert_eq!(body["scope"], "orders.write");

    // Nothing requested is allowed.
    for scope in ["orders.delete", "invoices.read", "stock.read"] {
        let response = fx
            .token("ops", &[("resource", ORDERS), ("scope", scope)])
            .await;
        assert_error(response, StatusCode::BAD_REQUEST, "invalid_scope").await;
    }
    let response = fx.token("reporting", &[("scope", "orders.write")]).await;
    assert_error(response, StatusCode::BAD_REQUEST, "invalid_scope").await;

    // Resources: unknown, declared by nobody though a role names it, declared in a namespace
    // that does not admit shop, and declared but not granted to this client.
    for resource in ["https://unknown.example", PAYMENTS, LEDGER] {
        let response = fx.token("ops", &[("resource", resource)]).await;
        assert_error(response, StatusCode::BAD_REQUEST, "invalid_target").await;
    }
    let response = fx.token("reporting", &[("resource", BILLING)]).await;
    assert_error(response, StatusCode::BAD_REQUEST, "invalid_target").await;

    // A policy in another namespace that admits shop counts.
    let token = fx.access_token("ops", &[("resource", INVENTORY)]).await;
    assert_eq!(fx.verify(&token, INVENTORY).await["scope"], "stock.read");

    // Several resources: `resource` is required and picks the audience.
    let response = fx.token("billing", &[]).await;
    assert_error(response, StatusCode::BAD_REQUEST, "invalid_target").await;
    let response = fx.token("ops", &[]).await;
    assert_error(response, StatusCode::BAD_REQUEST, "invalid_target").await;
    let token = fx.access_token("billing", &[("resource", ORDERS)]).await;
    let claims = fx.verify(&token, ORDERS).await;
    assert_eq!(
        (claims["aud"].as_str(), claims["scope"].as_str()),
        (Some(ORDERS), Some("orders.write"))
    );
    let token = fx.access_token("billing", &[("resource", BILLING)]).await;
    let claims = fx.verify(&token, BILLING).await;
    assert_eq!(
        (claims["aud"].as_str(), claims["scope"].as_str()),
        (Some(BILLING), Some("invoices.read"))
    );
    let response = fx
        .token(
            "billing",
            &[("resource", ORDERS), ("scope", "invoices.read")],
        )
        .await;
    assert_error(response, StatusCode::BAD_REQUEST, "invalid_scope").await;
}

// ---------------------------------------------------------------------------------------
// 4. Refusals
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn secret_authentication_failures_are_refused_exactly() {
    let fx = Fixture::start().await;
    let grant = [("grant_type", "client_credentials")];
    let reporting = fx.client("reporting");

    let wrong_secret = fx
        .post("/oauth2/token", &grant)
        .header(
            header::AUTHORIZATION,
            basic(reporting.id(), "kgs_not-the-secret"),
        )
        .send()
        .await
        .unwrap();
    assert_error(wrong_secret, StatusCode::UNAUTHORIZED, "invalid_client").await;

    let wrong_post_secret = fx
        .post(
            "/oauth2/token",
            &[
                ("grant_type", "client_credentials"),
                ("client_id", reporting.id()),
                ("client_secret", "nope"),
            ],
        )
        .send()
        .await
        .unwrap();
    assert_error(
        wrong_post_secret,
        StatusCode::UNAUTHORIZED,
        "invalid_client",
    )
    .await;

    // Another client's secret does not open this client.
    let other_secret = fx
        .post("/oauth2/token", &grant)
        .header(
            header::AUTHORIZATION,
            basic(reporting.id(), fx.client("billing").secret()),
        )
        .send()
        .await
        .unwrap();
    assert_error(other_secret, StatusCode::UNAUTHORIZED, "invalid_client").await;

    let unknown = fx
        .post("/oauth2/token", &grant)
        .header(
            header::AUTHORIZATION,
            basic("kgc_00000000000000000000000000000000", reporting.secret()),
        )
        .send()
        .await
        .unwrap();
    assert_error(unknown, StatusCode::UNAUTHORIZED, "invalid_client").await;

    let no_credentials = fx.post("/oauth2/token", &grant).send().await.unwrap();
    assert_error(no_credentials, StatusCode::UNAUTHORIZED, "invalid_client").await;

    let disabled = fx.token("disabled", &[]).await;
    assert_error(disabled, StatusCode::BAD_REQUEST, "unauthorized_client").await;

    let both = fx
        .post_basic(
            "/oauth2/token",
            "reporting",
            &[
                ("grant_type", "client_credentials"),
                ("client_id", reporting.id()),
                ("client_secret", reporting.secret()),
            ],
        )
        .send()
        .await
        .unwrap();
    assert_error(both, StatusCode::BAD_REQUEST, "invalid_request").await;

    for malformed in [
        "Basic !!!",
        "Basic",
        "Bearer abc",
        &format!("Basic {}", STANDARD.encode(reporting.id())),
    ] {
        let response = fx
            .post("/oauth2/token", &grant)
            .header(header::AUTHORIZATION, malformed)
            .send()
            .await
            .unwrap();
        assert_error(response, StatusCode::UNAUTHORIZED, "invalid_client").await;
    }

    // The right secret still works after all of that.
    assert_token(fx.token("reporting", &[]).await).await;
}

#[tokio::test]
async fn malformed_requests_are_refused_exactly() {
    let fx = Fixture::start().await;

    let unsupported = fx
        .post_basic("/oauth2/token", "reporting", &[("grant_type", "password")])
        .send()
        .await
        .unwrap();
    assert_error(
        unsupported,
        StatusCode::BAD_REQUEST,
        "unsupported_grant_type",
    )
    .await;

    let missing = fx
        .post_basic("/oauth2/token", "reporting", &[("scope", "orders.read")])
        .send()
        .await
        .unwrap();
    assert_error(missing, StatusCode::BAD_REQUEST, "invalid_request").await;

    let oversized = "a".repeat(17 * 1024);
    let too_large = fx
        .post_basic(
            "/oauth2/token",
            "reporting",
            &[("grant_type", "client_credentials"), ("scope", &oversized)],
        )
        .send()
        .await
        .unwrap();
    assert_error(too_large, StatusCode::PAYLOAD_TOO_LARGE, "invalid_request").await;

    let c = fx.client("reporting");
    let json_body = fx
        .http
        .post(fx.token_endpoint())
        .header(header::AUTHORIZATION, basic(c.id(), c.secret()))
        .json(&json!({ "grant_type": "client_credentials" }))
        .send()
        .await
        .unwrap();
    assert_error(json_body, StatusCode::BAD_REQUEST, "invalid_request").await;

    let no_content_type = fx
        .http
        .post(fx.token_endpoint())
        .header(header::AUTHORIZATION, basic(c.id(), c.secret()))
        .body("grant_type=client_credentials")
        .send()
        .await
        .unwrap();
    assert_error(no_content_type, StatusCode::BAD_REQUEST, "invalid_request").await;

    // A charset parameter and a differently cased media type are fine.
    let with_charset = fx
        .http
        .post(fx.token_endpoint())
        .header(header::AUTHORIZATION, basic(c.id(), c.secret()))
        .header(
            header::CONTENT_TYPE,
            "Application/X-WWW-Form-Urlencoded; charset=UTF-8",
        )
        .body("grant_type=client_credentials")
        .send()
        .await
        .unwrap();
    assert_token(with_charset).await;

    for repeated in [
        vec![
            ("grant_type", "client_credentials"),
            ("scope", "orders.read"),
            ("scope", "orders.read"),
        ],
        vec![
            ("grant_type", "client_credentials"),
            ("grant_type", "client_credentials"),
        ],
        vec![
            ("grant_type", "client_credentials"),
            ("resource", ORDERS),
            ("resource", BILLING),
        ],
    ] {
        let response = fx
            .post_basic("/oauth2/token", "reporting", &repeated)
            .send()
            .await
            .unwrap();
        assert_error(response, StatusCode::BAD_REQUEST, "invalid_request").await;
    }
}

#[tokio::test]
async fn bad_client_assertions_are_refused() {
    let fx = Fixture::start().await;
    let keyed = fx.client("keyed");
    let now = unix_now();
    let endpoint = fx.token_endpoint();
    let send = |assertion: String| {
        let request = fx.post("/oauth2/token", &assertion_params(&assertion));
        async move { request.send().await.unwrap() }
    };

    // Replayed: the first use succeeds, the second is refused.
    let assertion = fx.assertion("keyed");
    assert_token(send(assertion.clone()).await).await;
    assert_error(
        send(assertion).await,
        StatusCode::UNAUTHORIZED,
        "invalid_client",
    )
    .await;

    // Expired beyond the 30 s leeway.
    let expired = sign_assertion(
        keyed.private_key(),
        keyed.id(),
        &endpoint,
        now - 300,
        now - 120,
    );
    assert_error(
        send(expired).await,
        StatusCode::UNAUTHORIZED,
        "invalid_client",
    )
    .await;

    // Longer than an hour.
    let too_long = sign_assertion(
        keyed.private_key(),
        keyed.id(),
        &endpoint,
        now,
        now + 2 * 3600,
    );
    assert_error(
        send(too_long).await,
        StatusCode::UNAUTHORIZED,
        "invalid_client",
    )
    .await;

    // Signed by another key (of the same algorithm).
    let stranger = generate_key_pair(KeyAlgorithm::ES256).unwrap();
    let forged = sign_assertion(&stranger.private_pem, keyed.id(), &endpoint, now, now + 60);
    assert_error(
        send(forged).await,
        StatusCode::UNAUTHORIZED,
        "invalid_client",
    )
    .await;

    // Claiming to be a client that has no key pair.
    let no_key = sign_assertion(
        keyed.private_key(),
        fx.client("reporting").id(),
        &endpoint,
        now,
        now + 60,
    );
    assert_error(
        send(no_key).await,
        StatusCode::UNAUTHORIZED,
        "invalid_client",
    )
    .await;

    // Wrong audience.
    let wrong_aud = sign_assertion(
        keyed.private_key(),
        keyed.id(),
        "https://elsewhere.example/token",
        now,
        now + 60,
    );
    assert_error(
        send(wrong_aud).await,
        StatusCode::UNAUTHORIZED,
        "invalid_client",
    )
    .await;

    // alg none, built by hand, with and without a trailing signature part.
    let claims = json!({
        "iss": keyed.id(), "sub": keyed.id(), "aud": endpoint,
        "iat": now, "exp": now + 60, "jti": new_jti().unwrap(),
    });
    let unsigned = format!(
        "{}.{}.",
        URL_SAFE_NO_PAD.encode(br#"{"alg":"none","typ":"JWT"}"#),
        URL_SAFE_NO_PAD.encode(claims.to_string())
    );
    assert_error(
        send(unsigned.clone()).await,
        StatusCode::UNAUTHORIZED,
        "invalid_client",
    )
    .await;
    assert_error(
        send(unsigned.trim_end_matches('.').to_owned()).await,
        StatusCode::UNAUTHORIZED,
        "invalid_client",
    )
    .await;

    // Not a JWT at all.
    assert_error(
        send("not-a-jwt".to_owned()).await,
        StatusCode::UNAUTHORIZED,
        "invalid_client",
    )
    .await;

    // Wrong assertion type.
    let wrong_type = fx
        .post(
            "/oauth2/token",
            &[
                ("grant_type", "client_credentials"),
                ("client_assertion_type", "urn:example:other"),
                ("client_assertion", &fx.assertion("keyed")),
            ],
        )
        .send()
        .await
        .unwrap();
    assert_error(wrong_type, StatusCode::BAD_REQUEST, "invalid_request").await;

    // client_id that disagrees with the assertion.
    let mismatched = fx
        .post(
            "/oauth2/token",
            &[
                ("grant_type", "client_credentials"),
                ("client_id", fx.client("reporting").id()),
                ("client_assertion_type", JWT_BEARER),
                ("client_assertion", &fx.assertion("keyed")),
            ],
        )
        .send()
        .await
        .unwrap();
    assert_error(mismatched, StatusCode::BAD_REQUEST, "invalid_request").await;
}

// ---------------------------------------------------------------------------------------
// 5. private_key_jwt
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn private_key_jwt_gets_a_token() {
    let fx = Fixture::start().await;
    let keyed = fx.client("keyed");

    let body = assert_token(
        fx.post("/oauth2/token", &assertion_params(&fx.assertion("keyed")))
            .send()
            .await
            .unwrap(),
    )
    .await;
    let claims = fx
        .verify(body["access_token"].as_str().unwrap(), ORDERS)
        .await;
    assert_eq!(
        (claims["sub"].as_str(), claims["client_id"].as_str()),
        (Some(keyed.id()), Some(keyed.id()))
    );
    assert_eq!(claims["scope"], "orders.read");

    // With a matching client_id and a scope, and with the issuer as audience (RFC 7523 §3).
    let now = unix_now();
    let to_issuer = sign_assertion(keyed.private_key(), keyed.id(), &fx.issuer, now, now + 60);
    let mut params = assertion_params(&to_issuer).to_vec();
    params.extend([("client_id", keyed.id()), ("scope", "orders.read")]);
    let body = assert_token(fx.post("/oauth2/token", &params).send().await.unwrap()).await;
    assert_eq!(body["scope"], "orders.read");

    // The keyed client has no secret.
    let response = fx
        .post("/oauth2/token", &[("grant_type", "client_credentials")])
        .header(header::AUTHORIZATION, basic(keyed.id(), ""))
        .send()
        .await
        .unwrap();
    assert_error(response, StatusCode::UNAUTHORIZED, "invalid_client").await;
}

// ---------------------------------------------------------------------------------------
// 6. Rotation
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn rotated_credentials_overlap_then_the_old_ones_stop() {
    let fx = Fixture::start().await;
    let edgy = fx.client("edgy").clone();
    let now = unix_now();

    let rotated = rotate(&edgy.spec, &edgy.data, now + 600).unwrap();
    assert_ne!(rotated[key::CLIENT_SECRET], edgy.data[key::CLIENT_SECRET]);
    assert_eq!(rotated[key::CLIENT_ID], edgy.data[key::CLIENT_ID]);
    fx.set_credentials("edgy", &rotated);

    let with_secret = |secret: String| {
        let request = fx
            .post("/oauth2/token", &[("grant_type", "client_credentials")])
            .header(header::AUTHORIZATION, basic(edgy.id(), &secret));
        async move { request.send().await.unwrap() }
    };
    let old = edgy.data[key::CLIENT_SECRET].clone();
    let new = rotated[key::CLIENT_SECRET].clone();
    assert_token(with_secret(old.clone()).await).await;
    assert_token(with_secret(new.clone()).await).await;

    // The overlap is over.
    let mut ended = rotated.clone();
    ended.insert(key::PREVIOUS_EXPIRES_AT.into(), (now - 1).to_string());
    fx.set_credentials("edgy", &ended);
    assert_error(
        with_secret(old).await,
        StatusCode::UNAUTHORIZED,
        "invalid_client",
    )
    .await;
    assert_token(with_secret(new).await).await;

    // The same for a key pair: the previous public key verifies assertions during the overlap.
    let keyed = fx.client("keyed").clone();
    let rotated = rotate(&keyed.spec, &keyed.data, now + 600).unwrap();
    assert_ne!(rotated[key::PRIVATE_KEY], keyed.data[key::PRIVATE_KEY]);
    fx.set_credentials("keyed", &rotated);
    let endpoint = fx.token_endpoint();
    let send = |pem: &str| {
        let assertion = sign_assertion(pem, keyed.id(), &endpoint, now, now + 60);
        let request = fx.post("/oauth2/token", &assertion_params(&assertion));
        async move { request.send().await.unwrap() }
    };
    assert_token(send(keyed.private_key()).await).await;
    assert_token(send(&rotated[key::PRIVATE_KEY]).await).await;
    let mut ended = rotated.clone();
    ended.insert(key::PREVIOUS_EXPIRES_AT.into(), (now - 1).to_string());
    fx.set_credentials("keyed", &ended);
    assert_error(
        send(keyed.private_key()).await,
        StatusCode::UNAUTHORIZED,
        "invalid_client",
    )
    .await;
    assert_token(send(&rotated[key::PRIVATE_KEY]).await).await;
}

// ---------------------------------------------------------------------------------------
// 7. Revocation and introspection
// ---------------------------------------------------------------------------------------

/// A revocation is answered 200 only once stored (issue #16): while the store fails the
/// answer is 503 `temporarily_unavailable` with `Retry-After`, the token is refused here at
/// once all the same, and the client's retry stores it.
#[tokio::test]
async fn a_revocation_is_answered_only_once_stored() {
    let fx = Fixture::start().await;
    let token = fx.access_token("reporting", &[]).await;
    let jti = jwt::jti_of(&token);
    let revoke = || {
        fx.post_basic("/oauth2/revoke", "reporting", &[("token", &token)])
            .send()
    };

    fx.store.fail(true);
    let refused = revoke().await.unwrap();
    assert_eq!(refused.headers()[header::RETRY_AFTER], "1");
    assert_error(
        refused,
        StatusCode::SERVICE_UNAVAILABLE,
        "temporarily_unavailable",
    )
    .await;
    assert!(fx.store.stored().tokens.is_empty(), "nothing was stored");
    assert!(
        fx.revocations.current().tokens.contains_key(&jti),
        "refused here at once all the same"
    );

    fx.store.fail(false);
    let answered = revoke().await.unwrap();
    assert_eq!(answered.status(), StatusCode::OK);
    assert!(
        fx.store.stored().tokens.contains_key(&jti),
        "the retry of a token already revoked here is stored before the 200"
    );

    // The common case: stored, then answered.
    let second = fx.access_token("reporting", &[]).await;
    let answered = fx
        .post_basic("/oauth2/revoke", "reporting", &[("token", &second)])
        .send()
        .await
        .unwrap();
    assert_eq!(answered.status(), StatusCode::OK);
    assert_eq!(fx.store.stored().tokens.len(), 2);
}

#[tokio::test]
async fn revoked_tokens_are_inactive_and_only_their_client_may_revoke_them() {
    let fx = Fixture::start().await;
    let reporting = fx.client("reporting");
    let token = fx.access_token("reporting", &[]).await;

    let introspect = |client: &str| {
        let request = fx.post_basic("/oauth2/introspect", client, &[("token", &token)]);
        async move {
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            assert_eq!(response.headers()[header::CACHE_CONTROL], "no-store");
            response.json::<Value>().await.unwrap()
        }
    };
    let active = introspect("reporting").await;
    assert_eq!(active["active"], true);
    assert_eq!(active["scope"], "orders.read");
    assert_eq!(active["client_id"], reporting.id());
    assert_eq!(active["sub"], reporting.id());
    assert_eq!(active["aud"], ORDERS);
    assert_eq!(active["iss"], fx.issuer.as_str());
    assert_eq!(active["token_type"], "Bearer");

    // Revocation and introspection require client authentication.
    let anonymous = fx
        .post("/oauth2/revoke", &[("token", &token)])
        .send()
        .await
        .unwrap();
    assert_error(anonymous, StatusCode::UNAUTHORIZED, "invalid_client").await;
    let wrong = fx
        .post("/oauth2/revoke", &[("token", &token)])
        .header(header::AUTHORIZATION, basic(reporting.id(), "kgs_wrong"))
        .send()
        .await
        .unwrap();
    assert_error(wrong, StatusCode::UNAUTHORIZED, "invalid_client").await;
    let anonymous = fx
        .post("/oauth2/introspect", &[("token", &token)])
        .send()
        .await
        .unwrap();
    assert_error(anonymous, StatusCode::UNAUTHORIZED, "invalid_client").await;
    let no_token = fx
        .post_basic("/oauth2/revoke", "reporting", &[])
        .send()
        .await
        .unwrap();
    assert_error(no_token, StatusCode::BAD_REQUEST, "invalid_request").await;

    // Another client's revocation is answered 200 and does nothing.
    let foreign = fx
        .post_basic("/oauth2/revoke", "billing", &[("token", &token)])
        .send()
        .await
        .unwrap();
    assert_eq!(foreign.status(), StatusCode::OK);
    assert_eq!(introspect("reporting").await["active"], true);

    // An unknown token is not an error either (RFC 7009 §2.2).
    let junk = fx
        .post_basic("/oauth2/revoke", "reporting", &[("token", "not-a-token")])
        .send()
        .await
        .unwrap();
    assert_eq!(junk.status(), StatusCode::OK);

    let revoked = fx
        .post_basic(
            "/oauth2/revoke",
            "reporting",
            &[("token", &token), ("token_type_hint", "access_token")],
        )
        .send()
        .await
        .unwrap();
    assert_eq!(revoked.status(), StatusCode::OK);
    assert_eq!(revoked.headers()[header::CACHE_CONTROL], "no-store");
    assert_eq!(introspect("reporting").await, json!({ "active": false }));
    assert_eq!(introspect("billing").await, json!({ "active": false }));

    // Other tokens of the same client stay active.
    let other = fx.access_token("reporting", &[]).await;
    let response = fx
        .post_basic("/oauth2/introspect", "reporting", &[("token", &other)])
        .send()
        .await
        .unwrap();
    assert_eq!(response.json::<Value>().await.unwrap()["active"], true);
}

// ---------------------------------------------------------------------------------------
// 8. Metadata and JWKS
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn metadata_and_jwks_are_published() {
    let fx = Fixture::start().await;
    let mut documents = Vec::new();
    for path in [
        "/.well-known/oauth-authorization-server",
        "/.well-known/openid-configuration",
    ] {
        let response = fx.http.get(fx.url(path)).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK, "{path}");
        let doc: Value = response.json().await.unwrap();
        assert_eq!(doc["issuer"], fx.issuer.as_str());
        assert_eq!(doc["token_endpoint"], fx.token_endpoint());
        assert_eq!(doc["jwks_uri"], fx.url("/.well-known/jwks.json"));
        assert_eq!(doc["revocation_endpoint"], fx.url("/oauth2/revoke"));
        assert_eq!(doc["introspection_endpoint"], fx.url("/oauth2/introspect"));
        assert!(
            doc["grant_types_supported"]
                .as_array()
                .unwrap()
                .contains(&json!("client_credentials"))
        );
        let methods: BTreeSet<&str> = doc["token_endpoint_auth_methods_supported"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m.as_str().unwrap())
            .collect();
        assert_eq!(
            methods,
            BTreeSet::from([
                "client_secret_basic",
                "client_secret_post",
                "private_key_jwt"
            ])
        );
        let scopes = doc["scopes_supported"].as_array().unwrap();
        assert!(scopes.contains(&json!("orders.read")) && scopes.contains(&json!("invoices.read")));
        documents.push(doc);
    }
    // RFC 8414 metadata states only what is true: no authorization endpoint, so no response
    // types, and no ID tokens.
    let (oauth, mut openid) = (documents[0].clone(), documents[1].clone());
    let oidc_only = [
        "response_types_supported",
        "subject_types_supported",
        "id_token_signing_alg_values_supported",
    ];
    for member in oidc_only {
        assert!(oauth.get(member).is_none(), "{member} in {oauth}");
    }
    assert!(oauth.get("authorization_endpoint").is_none());
    assert_eq!(
        oauth["access_token_signing_alg_values_supported"],
        json!(["ES256", "EdDSA", "RS256"])
    );
    // OpenID Connect discovery keeps the members its clients require (go-oidc reads the
    // token algorithms there), and is otherwise the same document.
    assert_eq!(openid["subject_types_supported"], json!(["public"]));
    assert_eq!(
        openid["id_token_signing_alg_values_supported"],
        json!(["ES256", "EdDSA", "RS256"])
    );
    assert!(openid["response_types_supported"].is_array());
    for member in oidc_only {
        openid.as_object_mut().unwrap().remove(member);
    }
    assert_eq!(oauth, openid);

    let response = fx
        .http
        .get(fx.url("/.well-known/jwks.json"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let cache_control = response.headers()[header::CACHE_CONTROL]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(cache_control.contains("max-age="), "{cache_control}");
    let jwks: Value = response.json().await.unwrap();
    let keys = jwks["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 2, "current and next key");
    for jwk in keys {
        assert!(jwk["kid"].is_string(), "{jwk}");
        assert_eq!(
            (
                jwk["kty"].as_str(),
                jwk["alg"].as_str(),
                jwk["use"].as_str()
            ),
            (Some("EC"), Some("ES256"), Some("sig"))
        );
        assert!(jwk.get("d").is_none(), "no private part: {jwk}");
    }
    // The key that signs today is one of them.
    let token = fx.access_token("reporting", &[]).await;
    let kid = jsonwebtoken::decode_header(&token).unwrap().kid.unwrap();
    assert!(keys.iter().any(|k| k["kid"] == kid.as_str()));

    // Only the documented methods.
    let get_token = fx.http.get(fx.token_endpoint()).send().await.unwrap();
    assert_eq!(get_token.status(), StatusCode::METHOD_NOT_ALLOWED);
}

#[tokio::test]
async fn issuer_key_rotation_signs_with_the_published_next_key_and_keeps_old_tokens_valid() {
    let fx = Fixture::start().await;
    let jwks = |fx: &Fixture| {
        let request = fx.http.get(fx.url("/.well-known/jwks.json"));
        async move {
            let set: JwkSet = request.send().await.unwrap().json().await.unwrap();
            set.keys
                .iter()
                .map(|k| k.common.key_id.clone().unwrap())
                .collect::<Vec<_>>()
        }
    };
    let before = jwks(&fx).await;
    let old_token = fx.access_token("reporting", &[]).await;
    let old_kid = jsonwebtoken::decode_header(&old_token)
        .unwrap()
        .kid
        .unwrap();
    assert_eq!(before[0], old_kid, "current key first");

    fx.rotate_issuer_keys();
    let after = jwks(&fx).await;
    assert_eq!(after.len(), 3, "current, next and previous");
    let new_token = fx.access_token("reporting", &[]).await;
    let new_kid = jsonwebtoken::decode_header(&new_token)
        .unwrap()
        .kid
        .unwrap();
    assert_eq!(
        new_kid, before[1],
        "the new signing key was published before it signed"
    );
    assert!(after.contains(&old_kid));

    // Both verify against the JWKS and both are active.
    fx.verify(&old_token, ORDERS).await;
    fx.verify(&new_token, ORDERS).await;
    for token in [&old_token, &new_token] {
        let response = fx
            .post_basic("/oauth2/introspect", "reporting", &[("token", token)])
            .send()
            .await
            .unwrap();
        assert_eq!(response.json::<Value>().await.unwrap()["active"], true);
    }
}

// ---------------------------------------------------------------------------------------
// 9. Throttling
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn failed_authentications_throttle_the_client_from_that_address_only() {
    let fx = Fixture::start().await;
    let edgy = fx.client("edgy");
    let attempt = |http: &reqwest::Client, secret: &str| {
        http.post(fx.token_endpoint())
            .header(header::CONTENT_TYPE, FORM)
            .header(header::AUTHORIZATION, basic(edgy.id(), secret))
            .body("grant_type=client_credentials")
            .send()
    };

    // 20 failures are answered invalid_client, then the pair (client, 127.0.0.1) must wait.
    for i in 0..25 {
        let response = attempt(&fx.http, "kgs_guess").await.unwrap();
        if i < 20 {
            assert_error(response, StatusCode::UNAUTHORIZED, "invalid_client").await;
        } else {
            assert_error(response, StatusCode::TOO_MANY_REQUESTS, "slow_down").await;
        }
    }
    // Even the right secret waits from that address.
    let response = attempt(&fx.http, edgy.secret()).await.unwrap();
    assert_error(response, StatusCode::TOO_MANY_REQUESTS, "slow_down").await;

    // Other clients from the same address are not affected.
    assert_token(fx.token("reporting", &[]).await).await;

    // The owner calling from another address (127.0.0.2, still loopback) gets its token.
    let elsewhere = reqwest::Client::builder()
        .local_address(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)))
        .build()
        .unwrap();
    assert_token(attempt(&elsewhere, edgy.secret()).await.unwrap()).await;
}

// ---------------------------------------------------------------------------------------
// 10. Bounded resources (issue #15)
// ---------------------------------------------------------------------------------------

/// The bound on waiting for something that must happen.
const PATIENCE: Duration = Duration::from_secs(20);

/// Waits until the server closes `stream` (EOF or reset); returns what it sent before.
async fn read_until_closed(stream: &mut TcpStream) -> Option<String> {
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(PATIENCE, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => received.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .ok()?;
    Some(String::from_utf8_lossy(&received).into_owned())
}

/// Reads one HTTP/1.1 response to `GET /.well-known/jwks.json` (its JSON body ends with
/// `]}`), or `None` after `wait`.
async fn read_jwks_response(stream: &mut TcpStream, wait: Duration) -> Option<String> {
    let mut received = Vec::new();
    let mut buf = [0u8; 4096];
    tokio::time::timeout(wait, async {
        loop {
            let n = stream.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed before a whole response");
            received.extend_from_slice(&buf[..n]);
            if received.ends_with(b"]}") {
                return String::from_utf8(received).unwrap();
            }
        }
    })
    .await
    .ok()
}

const GET_JWKS: &[u8] = b"GET /.well-known/jwks.json HTTP/1.1\r\nHost: keygate\r\n\r\n";

#[tokio::test]
async fn over_long_client_ids_are_refused_and_never_throttled() {
    let fx = Fixture::start().await;
    // Far over the 256-byte bound, and under the 64 KiB bound on a request head once Basic
    // encoded (a larger head is refused with 431 before the token server sees it).
    let long = "x".repeat(32 * 1024);
    // Far more attempts than the throttle allows: none is remembered, so none is slowed
    // down, and each is refused for what it is.
    for _ in 0..25 {
        let response = fx
            .post("/oauth2/token", &[("grant_type", "client_credentials")])
            .header(header::AUTHORIZATION, basic(&long, "kgs_guess"))
            .send()
            .await
            .unwrap();
        let headers = response.headers().clone();
        let status = response.status();
        let body: Value = response.json().await.unwrap();
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
        assert_eq!(headers[header::WWW_AUTHENTICATE], WWW_AUTHENTICATE);
        assert_eq!(body["error"], "invalid_client");
        assert_eq!(body["error_description"], "client_id is too long");
    }
    // In the form too (client_secret_post), just over the limit.
    let over = "x".repeat(keygate::token::MAX_CLIENT_ID_BYTES + 1);
    let response = fx
        .post(
            "/oauth2/token",
            &[
                ("grant_type", "client_credentials"),
                ("client_id", &over),
                ("client_secret", "kgs_guess"),
            ],
        )
        .send()
        .await
        .unwrap();
    let headers = assert_error(response, StatusCode::UNAUTHORIZED, "invalid_client").await;
    assert_eq!(headers[header::WWW_AUTHENTICATE], WWW_AUTHENTICATE);
    // Real clients are unaffected.
    assert_token(fx.token("reporting", &[]).await).await;
}

#[tokio::test]
async fn client_assertions_not_yet_valid_or_issued_after_expiry_are_refused() {
    let fx = Fixture::start().await;
    let keyed = fx.client("keyed");
    let endpoint = fx.token_endpoint();
    let now = unix_now();
    let send = |claims: Value| {
        let assertion = sign_claims(keyed.private_key(), &claims);
        let request = fx.post("/oauth2/token", &assertion_params(&assertion));
        async move { request.send().await.unwrap() }
    };
    let claims = |extra: Value| {
        let mut claims = json!({
            "iss": keyed.id(), "sub": keyed.id(), "aud": endpoint,
            "iat": now, "exp": now + 60, "jti": new_jti().unwrap(),
        });
        for (k, v) in extra.as_object().unwrap() {
            claims[k] = v.clone();
        }
        claims
    };
    let refused = |response: reqwest::Response, reason: &'static str| async move {
        let status = response.status();
        let body: Value = response.json().await.unwrap();
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
        assert_eq!(body["error"], "invalid_client");
        assert!(
            body["error_description"].as_str().unwrap().contains(reason),
            "{body}"
        );
    };

    // Not valid for three more years.
    let three_years = 3 * 365 * 24 * 3600;
    refused(
        send(claims(json!({ "nbf": now + three_years }))).await,
        "not yet valid",
    )
    .await;
    // Not valid for two more minutes (beyond the 30 s leeway).
    refused(
        send(claims(json!({ "nbf": now + 120 }))).await,
        "not yet valid",
    )
    .await;
    // Issued after it expires (both within the leeway of now).
    refused(
        send(claims(json!({ "iat": now + 20, "exp": now + 10 }))).await,
        "issued after it expires",
    )
    .await;
    // Not valid before it expires.
    refused(
        send(claims(json!({ "nbf": now + 20, "exp": now + 10 }))).await,
        "not valid before it expires",
    )
    .await;
    // Issued in the future (beyond the leeway).
    refused(
        send(claims(json!({ "iat": now + 120, "exp": now + 180 }))).await,
        "issued in the future",
    )
    .await;

    // Within the leeway, and already valid, are accepted.
    assert_token(send(claims(json!({ "nbf": now + 10 }))).await).await;
    assert_token(send(claims(json!({ "nbf": now - 10 }))).await).await;
}

#[tokio::test]
async fn a_half_sent_request_head_is_closed_after_the_header_read_timeout() {
    let limits = ConnectionLimits {
        header_read_timeout: Duration::from_millis(300),
        ..ConnectionLimits::default()
    };
    let fx = Fixture::start_with(|_| {}, limits).await;
    let mut stream = TcpStream::connect(fx.addr).await.unwrap();
    stream
        .write_all(b"POST /oauth2/token HTTP/1.1\r\nHost: keygate\r\nContent-Ty")
        .await
        .unwrap();
    assert!(
        read_until_closed(&mut stream).await.is_some(),
        "the half-sent request head stayed open"
    );
    // The server still serves whole requests.
    assert_token(fx.token("reporting", &[]).await).await;
}

#[tokio::test]
async fn a_body_that_does_not_arrive_in_time_is_refused() {
    let fx = Fixture::start_with(
        |config| config.body_read_timeout = Duration::from_millis(300),
        ConnectionLimits::default(),
    )
    .await;
    let mut stream = TcpStream::connect(fx.addr).await.unwrap();
    stream
        .write_all(
            b"POST /oauth2/token HTTP/1.1\r\nHost: keygate\r\n\
              Content-Type: application/x-www-form-urlencoded\r\nContent-Length: 1000\r\n\r\n\
              grant_type=client_",
        )
        .await
        .unwrap();
    let answer = read_until_closed(&mut stream)
        .await
        .expect("the slow body stayed open");
    assert!(
        answer.starts_with("HTTP/1.1 408 "),
        "not a 408 answer: {answer}"
    );
    assert!(answer.contains(r#""error":"invalid_request""#), "{answer}");
}

#[tokio::test]
async fn at_the_connection_cap_a_new_connection_waits_until_one_closes() {
    let limits = ConnectionLimits::default().with_max_connections(1);
    let fx = Fixture::start_with(|_| {}, limits).await;
    let mut first = TcpStream::connect(fx.addr).await.unwrap();
    first.write_all(GET_JWKS).await.unwrap();
    assert!(read_jwks_response(&mut first, PATIENCE).await.is_some());

    // The second connection is accepted by the kernel but not served while the first is
    // open (kept alive).
    let mut second = TcpStream::connect(fx.addr).await.unwrap();
    second.write_all(GET_JWKS).await.unwrap();
    assert!(
        read_jwks_response(&mut second, Duration::from_millis(300))
            .await
            .is_none(),
        "served beyond the cap"
    );
    drop(first);
    assert!(
        read_jwks_response(&mut second, PATIENCE).await.is_some(),
        "not served after the first connection closed"
    );
}

#[tokio::test]
async fn one_by_one_revocations_are_bounded_per_client() {
    let fx = Fixture::start_with(
        |config| config.max_revoked_tokens_per_client = 2,
        ConnectionLimits::default(),
    )
    .await;
    let reporting = fx.client("reporting");
    let mut tokens = Vec::new();
    for _ in 0..3 {
        tokens.push(fx.access_token("reporting", &[]).await);
    }
    let active = |token: &str| {
        let request = fx.post_basic("/oauth2/introspect", "reporting", &[("token", token)]);
        async move {
            let response = request.send().await.unwrap();
            response.json::<Value>().await.unwrap()["active"] == true
        }
    };
    for token in &tokens {
        let response = fx
            .post_basic("/oauth2/revoke", "reporting", &[("token", token)])
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert!(!active(token).await);
    }
    // Two are listed one by one; the third became a per-client "not before" just after it
    // was issued, which refuses it (and every earlier token of the client).
    let list = fx.revocations.current();
    assert_eq!(list.tokens.len(), 2, "{list:?}");
    let iat = fx.verify(&tokens[2], ORDERS).await["iat"].as_u64().unwrap();
    assert_eq!(list.clients.get(reporting.id()), Some(&(iat + 1)));
    // Other clients are not affected.
    let other = fx.access_token("edgy", &[]).await;
    let response = fx
        .post_basic("/oauth2/introspect", "edgy", &[("token", &other)])
        .send()
        .await
        .unwrap();
    assert_eq!(response.json::<Value>().await.unwrap()["active"], true);
}

// ---------------------------------------------------------------------------------------
// 11. HTTPS (issue #15, finding 9): client secrets never travel in plain HTTP
// ---------------------------------------------------------------------------------------

#[tokio::test]
async fn over_https_a_client_that_trusts_the_ca_gets_and_verifies_tokens() {
    let fx = Fixture::start_https(ConnectionLimits::default()).await;
    assert!(fx.issuer.starts_with("https://127.0.0.1:"));
    let token = fx.access_token("reporting", &[]).await;
    // The JWKS comes over HTTPS too; the token names the https issuer.
    let claims = fx.verify(&token, ORDERS).await;
    assert_eq!(claims["iss"], fx.issuer.as_str());
    let metadata = fx.get_json("/.well-known/oauth-authorization-server").await;
    assert_eq!(metadata["issuer"], fx.issuer.as_str());
    assert_eq!(metadata["token_endpoint"], fx.token_endpoint());

    // TLS 1.2 is enough (older versions do not exist in rustls).
    let ca = fx.ca.as_deref().unwrap();
    let tls12 = trusting(ca)
        .tls_version_max(reqwest::tls::Version::TLS_1_2)
        .build()
        .unwrap();
    let c = fx.client("billing");
    let response = tls12
        .post(fx.token_endpoint())
        .basic_auth(c.id(), Some(c.secret()))
        .form(&[("grant_type", "client_credentials"), ("resource", ORDERS)])
        .send()
        .await
        .unwrap();
    assert_token(response).await;

    // A client that does not trust the CA does not talk to the server at all.
    let error = reqwest::Client::new()
        .post(fx.token_endpoint())
        .basic_auth(c.id(), Some(c.secret()))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .expect_err("an untrusted server");
    assert!(error.is_connect(), "{error:?}");

    // Handlers still see the client's address: the throttle counts per address.
    let edgy = fx.client("edgy");
    for i in 0..21 {
        let response = fx
            .post("/oauth2/token", &[("grant_type", "client_credentials")])
            .header(header::AUTHORIZATION, basic(edgy.id(), "kgs_guess"))
            .send()
            .await
            .unwrap();
        let expected = if i < 20 {
            (StatusCode::UNAUTHORIZED, "invalid_client")
        } else {
            (StatusCode::TOO_MANY_REQUESTS, "slow_down")
        };
        assert_error(response, expected.0, expected.1).await;
    }
}

#[tokio::test]
async fn plain_http_on_the_https_port_is_answered_400_and_never_served() {
    let fx = Fixture::start_https(ConnectionLimits::default()).await;
    let plain = fx.token_endpoint().replacen("https://", "http://", 1);
    let c = fx.client("reporting");
    let response = reqwest::Client::new()
        .post(&plain)
        .basic_auth(c.id(), Some(c.secret()))
        .form(&[("grant_type", "client_credentials")])
        .send()
        .await
        .expect("an answer");
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let text = response.text().await.unwrap();
    assert!(text.contains("https://"), "{text}");
    assert!(!text.contains("access_token"), "{text}");

    let mut stream = TcpStream::connect(fx.addr).await.unwrap();
    stream.write_all(GET_JWKS).await.unwrap();
    let answer = read_until_closed(&mut stream).await.expect("closed");
    assert!(answer.starts_with("HTTP/1.0 400 "), "{answer}");
    assert!(!answer.contains("\"keys\""), "{answer}");
    // HTTPS goes on.
    assert_token(fx.token("reporting", &[]).await).await;
}

/// A TLS client that trusts only `ca_pem`, for requests written by hand.
async fn tls_connect(addr: SocketAddr, ca_pem: &str) -> tokio_rustls::client::TlsStream<TcpStream> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca_pem.as_bytes()).unwrap())
        .unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = TcpStream::connect(addr).await.unwrap();
    connector
        .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await
        .unwrap()
}

#[tokio::test]
async fn the_https_listener_keeps_the_header_read_timeout() {
    let limits = ConnectionLimits {
        header_read_timeout: Duration::from_millis(300),
        ..ConnectionLimits::default()
    };
    let fx = Fixture::start_https(limits).await;
    // A connection that never starts its TLS handshake is closed after the timeout.
    let started = std::time::Instant::now();
    let mut silent = TcpStream::connect(fx.addr).await.unwrap();
    assert!(
        read_until_closed(&mut silent).await.is_some(),
        "stayed open"
    );
    assert!(started.elapsed() >= Duration::from_millis(250));
    // So is one that sends half a request head after the handshake.
    let mut tls = tls_connect(fx.addr, fx.ca.as_deref().unwrap()).await;
    tls.write_all(b"POST /oauth2/token HTTP/1.1\r\nHost: keygate\r\nContent-Ty")
        .await
        .unwrap();
    let closed = tokio::time::timeout(PATIENCE, async {
        let mut buf = [0u8; 1024];
        loop {
            match tls.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the half-sent head over TLS stayed open");
    assert_token(fx.token("reporting", &[]).await).await;
}

#[tokio::test]
async fn the_https_listener_keeps_the_connection_cap() {
    let fx = Fixture::start_https(ConnectionLimits::default().with_max_connections(1)).await;
    // One open connection (still before its handshake) holds the only slot.
    let first = TcpStream::connect(fx.addr).await.unwrap();
    let waiting = fx
        .http
        .get(fx.url("/.well-known/jwks.json"))
        .timeout(Duration::from_millis(500))
        .send()
        .await;
    assert!(waiting.is_err(), "served beyond the cap");
    drop(first);
    let response = fx
        .http
        .get(fx.url("/.well-known/jwks.json"))
        .timeout(PATIENCE)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
}

#[tokio::test]
async fn keygate_token_trusts_the_ca_file_it_is_given() {
    let fx = Fixture::start_https(ConnectionLimits::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.crt");
    std::fs::write(&ca_file, fx.ca.as_deref().unwrap()).unwrap();
    let c = fx.client("reporting");
    let run = |ca: Option<&std::path::Path>| {
        let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_keygate"));
        command
            .args([
                "token",
                "--token-url",
                &fx.token_endpoint(),
                "--client-id",
                c.id(),
            ])
            .args(["--resource", ORDERS])
            .env("KEYGATE_CLIENT_SECRET", c.secret())
            .env_remove("KEYGATE_CA_FILE");
        if let Some(ca) = ca {
            command.env("KEYGATE_CA_FILE", ca);
        }
        command.output()
    };
    let output = run(Some(&ca_file)).await.unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let token = String::from_utf8(output.stdout).unwrap();
    fx.verify(token.trim(), ORDERS).await;
    // Without it, the system's roots do not know the CA: no request is sent.
    let output = run(None).await.unwrap();
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("calling https://127.0.0.1:"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}
