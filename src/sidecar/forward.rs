//! Reverse-proxy half of the sidecar: forwards an already authorized request to the
//! workload on `127.0.0.1:<port>` and streams the answer back.
//!
//! Authentication and authorization happen before this module is called; here we only
//! make the request safe to hand to the workload:
//!
//! - hop-by-hop headers are removed in both directions (RFC 9110 §7.6.1), `Upgrade` and
//!   `HTTP2-Settings` included. The one exception is a WebSocket opening handshake
//!   (RFC 6455) that comes with a verified identity: it is passed through and, on a
//!   `101 Switching Protocols` to `websocket`, both connections are spliced together. Any
//!   other `101` is answered with a 502 and never spliced;
//! - every incoming header whose name folds to `x-keygate-*` is dropped (folding: ASCII
//!   lower case, every character but a letter or digit read as `-`, as CGI/WSGI servers map
//!   `X_Keygate_Client_Id` and `X-Keygate-Client-Id` to one variable), because the workload
//!   trusts those headers as the sidecar's verdict, and then the verified identity is
//!   written; look-alikes of the `X-Forwarded-*` headers and of `X-API-Key` are dropped too;
//! - credentials (`Authorization`, `X-API-Key`) are removed unless the route asks to keep
//!   them, so a workload cannot leak or replay a caller's token by accident;
//! - `X-Forwarded-For`/`-Proto`/`-Host` describe the original request.
//!
//! Bodies are streamed in both directions; nothing is buffered whole. Every upstream
//! failure becomes a short JSON 502/504 and never echoes request contents.

use std::error::Error as StdError;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::combinators::{BoxBody, UnsyncBoxBody};
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Bytes};
use hyper::upgrade::OnUpgrade;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};

use super::lane::{KeptConnections, LaneDriver, UpstreamLane};

/// Boxed error used for request bodies of any origin (hyper, axum, tests).
pub type BoxError = Box<dyn StdError + Send + Sync>;

/// Body of every response produced by the forwarder: the upstream's streamed body, or a
/// small JSON error document.
pub type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// Request body as sent to the upstream. Not `Sync`, so that bodies such as axum's can be
/// forwarded without a copy.
pub(crate) type UpstreamBody = UnsyncBoxBody<Bytes, BoxError>;

type UpstreamClient = Client<HttpConnector, UpstreamBody>;

/// Headers that only describe one hop and never travel end to end (RFC 9110 §7.6.1, plus
/// the non-standard `Keep-Alive` and `Proxy-Connection` that old clients still send).
/// `TE` is handled separately because `TE: trailers` must survive.
const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    // Only meaningful next to `Upgrade: h2c` (RFC 7540 §3.2.1), which is never forwarded.
    HeaderName::from_static("http2-settings"),
    header::PROXY_AUTHORIZATION,
    header::PROXY_AUTHENTICATE,
];

/// Prefix reserved for the sidecar's own identity headers, in folded form (see
/// [`folded_header_name`]).
const KEYGATE_HEADER_PREFIX: &str = "x-keygate-";

/// Headers the sidecar writes or vouches for besides `X-Keygate-*`: a look-alike of one of
/// them (a name that differs but folds to it) is dropped.
const GUARDED_HEADERS: [&str; 4] = [
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-api-key",
];

/// Header carrying the authenticated client id.
pub const CLIENT_ID_HEADER: HeaderName = HeaderName::from_static("x-keygate-client-id");
/// Header carrying the granted scopes, space-delimited as in OAuth 2.0.
pub const SCOPES_HEADER: HeaderName = HeaderName::from_static("x-keygate-scopes");
/// Header carrying how the client authenticated (`access_token`, `external_token`,
/// `keypair_jwt`, `api_key`).
pub const AUTH_METHOD_HEADER: HeaderName = HeaderName::from_static("x-keygate-auth-method");

const X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");
const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// How to reach the workload and how long to wait for it.
#[derive(Clone, Debug)]
pub struct ForwardConfig {
    /// Workload address, normally `127.0.0.1:<upstream.port>`.
    pub upstream: SocketAddr,
    /// Speak HTTP/2 without negotiation (h2c prior knowledge), e.g. for gRPC workloads.
    /// Upgrade handshakes still use HTTP/1.1 because HTTP/2 has no `Upgrade`.
    pub http2_prior_knowledge: bool,
    /// Limit for establishing the TCP connection.
    pub connect_timeout: Duration,
    /// Limit from sending the request until the response head arrives (includes connecting).
    pub response_header_timeout: Duration,
    /// How long an unused pooled connection is kept.
    pub pool_idle_timeout: Duration,
    /// Upper bound on idle upstream connections: the pooled client's, and as many again
    /// that caller connections keep between their requests ([`UpstreamLane`]).
    pub pool_max_idle: usize,
}

impl ForwardConfig {
    /// Defaults suited to a loopback workload: connecting is near-instant, answers may take
    /// a while.
    pub fn new(upstream: SocketAddr) -> Self {
        Self {
            upstream,
            http2_prior_knowledge: false,
            connect_timeout: Duration::from_secs(2),
            response_header_timeout: Duration::from_secs(60),
            pool_idle_timeout: Duration::from_secs(90),
            pool_max_idle: 256,
        }
    }
}

/// What a request asks for with `Upgrade`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UpgradeRequest {
    /// No protocol upgrade: no `Upgrade` header, one without `Connection: upgrade`, not
    /// HTTP/1.1, or one naming only `h2c`/`h2`. RFC 9113 deprecates the `h2c` upgrade and lets
    /// a server ignore it (RFC 9110 §7.8), so the request is served over HTTP/1.1 with the
    /// upgrade headers removed.
    None,
    /// A WebSocket opening handshake (RFC 6455 §4.1): HTTP/1.1 `GET` with
    /// `Connection: upgrade`, `Upgrade: websocket` and the `Sec-WebSocket-Key` and
    /// `Sec-WebSocket-Version` headers.
    WebSocket,
    /// An upgrade to another protocol, or a malformed WebSocket handshake: refused with 400.
    /// The text says why and is safe to return.
    Unsupported(&'static str),
}

impl UpgradeRequest {
    /// Classifies a request head.
    pub fn of(method: &http::Method, version: Version, headers: &HeaderMap) -> Self {
        if version != Version::HTTP_11
            || !headers.contains_key(header::UPGRADE)
            || !connection_has_token(headers, "upgrade")
        {
            // Not an upgrade handshake: `Upgrade` is then only a hop-by-hop header, removed.
            return Self::None;
        }
        let mut protocols = Vec::new();
        for value in headers.get_all(header::UPGRADE) {
            let Ok(value) = value.to_str() else {
                return Self::Unsupported("malformed Upgrade header");
            };
            protocols.extend(value.split(',').map(str::trim).filter(|p| !p.is_empty()));
        }
        protocols.retain(|p| !p.eq_ignore_ascii_case("h2c") && !p.eq_ignore_ascii_case("h2"));
        match protocols.as_slice() {
            [] => Self::None,
            [protocol] if protocol.eq_ignore_ascii_case("websocket") => {
                if method != http::Method::GET {
                    Self::Unsupported("a WebSocket handshake must be a GET request")
                } else if !headers.contains_key("sec-websocket-key")
                    || !headers.contains_key("sec-websocket-version")
                {
                    Self::Unsupported(
                        "a WebSocket handshake needs Sec-WebSocket-Key and Sec-WebSocket-Version",
                    )
                } else {
                    Self::WebSocket
                }
            }
            _ => Self::Unsupported("only WebSocket upgrades are supported"),
        }
    }
}

/// Verified caller identity, as the values of the `X-Keygate-*` headers written for it.
/// Made once per verified credential (the sidecar keeps it with the cached caller), so that
/// a forwarded request only clones the values.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Identity {
    client_id: HeaderValue,
    scopes: HeaderValue,
    auth_method: HeaderValue,
}

impl Identity {
    /// The header values of an ApiClient id, its granted scopes space-delimited, and the
    /// credential kind it used (e.g. `access_token`, `keypair_jwt`, `api_key`);
    /// [`ForwardError::InvalidIdentity`] when one cannot be carried in an HTTP header.
    pub fn new(
        client_id: &str,
        scopes: &str,
        auth_method: &'static str,
    ) -> Result<Self, ForwardError> {
        let value = |s: &str| HeaderValue::from_str(s).map_err(|_| ForwardError::InvalidIdentity);
        Ok(Self {
            client_id: value(client_id)?,
            scopes: value(scopes)?,
            auth_method: HeaderValue::from_static(auth_method),
        })
    }
}

/// Why a request could not be forwarded; `as_label` gives a stable metrics label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, thiserror::Error)]
pub enum ForwardError {
    /// The workload refused or reset the connection, or is not listening.
    #[error("upstream connection failed")]
    Connect,
    /// Connecting or waiting for the response head took longer than configured.
    #[error("upstream timed out")]
    Timeout,
    /// The workload answered with something that is not valid HTTP, or hung up mid-way.
    #[error("upstream protocol error")]
    Protocol,
    /// The normalized path handed in by the caller is not an origin-form request target.
    #[error("invalid request target")]
    InvalidTarget,
    /// The identity contains bytes that cannot be carried in an HTTP header.
    #[error("identity cannot be encoded as a header")]
    InvalidIdentity,
}

impl ForwardError {
    /// Stable, low-cardinality label for metrics.
    pub fn as_label(self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::Timeout => "timeout",
            Self::Protocol => "protocol",
            Self::InvalidTarget => "invalid_target",
            Self::InvalidIdentity => "invalid_identity",
        }
    }

    /// HTTP status the caller receives.
    pub fn status(self) -> StatusCode {
        match self {
            Self::Connect | Self::Protocol => StatusCode::BAD_GATEWAY,
            Self::Timeout => StatusCode::GATEWAY_TIMEOUT,
            Self::InvalidTarget => StatusCode::BAD_REQUEST,
            // Identity comes from our own verification, so a bad one is our fault.
            Self::InvalidIdentity => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Short JSON error response. The text is fixed per variant: request contents and
    /// low-level error details are never echoed to the caller.
    pub fn into_response(self) -> Response<ProxyBody> {
        let (code, description) = match self {
            Self::Connect => (
                "upstream_unavailable",
                "the upstream service is unavailable",
            ),
            Self::Timeout => (
                "upstream_timeout",
                "the upstream service did not answer in time",
            ),
            Self::Protocol => (
                "upstream_error",
                "the upstream service sent an invalid response",
            ),
            Self::InvalidTarget => ("invalid_request", "the request target is invalid"),
            Self::InvalidIdentity => ("server_error", "the request could not be forwarded"),
        };
        let body = serde_json::json!({ "error": code, "error_description": description });
        let mut response = Response::new(full_body(Bytes::from(body.to_string())));
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        response
    }
}

/// Pooled HTTP client bound to one workload. Cheap to clone; clones share the pool.
#[derive(Clone, Debug)]
pub struct Forwarder {
    client: UpstreamClient,
    /// HTTP/1.1 client for `Upgrade` handshakes; the same as `client` unless the upstream
    /// speaks h2c, which cannot carry an upgrade.
    upgrade_client: UpstreamClient,
    /// `host:port` of the workload, used to build absolute request URIs.
    authority: String,
    upstream: SocketAddr,
    connect_timeout: Duration,
    /// The upstream connections the lanes keep between requests.
    kept: Arc<KeptConnections>,
    http2: bool,
    response_header_timeout: Duration,
}

impl Forwarder {
    /// Builds the client. No connection is opened until the first request.
    pub fn new(cfg: ForwardConfig) -> Self {
        let client = build_client(&cfg, cfg.http2_prior_knowledge);
        let upgrade_client = if cfg.http2_prior_knowledge {
            build_client(&cfg, false)
        } else {
            client.clone()
        };
        Self {
            client,
            upgrade_client,
            authority: cfg.upstream.to_string(),
            upstream: cfg.upstream,
            connect_timeout: cfg.connect_timeout,
            kept: KeptConnections::new(cfg.pool_max_idle),
            http2: cfg.http2_prior_knowledge,
            response_header_timeout: cfg.response_header_timeout,
        }
    }

    /// A lane of upstream connections for one caller connection, and the driver to poll
    /// beside that connection ([`UpstreamLane`]).
    pub fn lane(&self) -> (UpstreamLane, LaneDriver) {
        UpstreamLane::new(self.upstream, self.connect_timeout, self.kept.clone())
    }

    /// Forwards `req` and always returns a response: the upstream's, or a JSON error from
    /// [`ForwardError::into_response`]. Use [`Forwarder::try_forward`] to observe the error.
    ///
    /// See `try_forward` for the meaning of the arguments.
    pub async fn forward<B>(
        &self,
        req: Request<B>,
        target: PathAndQuery,
        identity: Option<&Identity>,
        peer: &Peer,
        forward_authorization: bool,
        lane: Option<&UpstreamLane>,
    ) -> Response<ProxyBody>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        match self
            .try_forward(req, target, identity, peer, forward_authorization, lane)
            .await
        {
            Ok(response) => response,
            Err(error) => error.into_response(),
        }
    }

    /// Forwards `req` to the workload.
    ///
    /// - `target`: the normalized origin-form target (`/a/b?x=1`) that the policy was
    ///   evaluated against; it replaces the request's own URI so that the workload sees
    ///   exactly what was authorized (the request's own, shared, when it was already
    ///   normal).
    /// - `identity`: the verified caller, `None` on public routes.
    /// - `peer`: the caller connection's TCP peer, appended to `X-Forwarded-For`.
    /// - `forward_authorization`: keep `Authorization` and `X-API-Key`.
    /// - `lane`: the caller connection's own upstream connection ([`Forwarder::lane`]),
    ///   used for its HTTP/1 requests to an HTTP/1 workload; `None`, or an HTTP/2 caller, an
    ///   upgrade or an h2c workload: the pooled client.
    ///
    /// Upgrades: only a WebSocket handshake ([`UpgradeRequest::WebSocket`]) that comes with
    /// an `identity` is forwarded as one. The sidecar passes an identity only for requests
    /// a non-public rule authorised, so a public route never opens a tunnel, and the tunnel
    /// belongs to the caller and route that were checked. Every other request loses its
    /// `Upgrade` and `HTTP2-Settings` headers, and a `101` answer to it, or a `101` to
    /// anything but `websocket`, is [`ForwardError::Protocol`] and never spliced. After the
    /// splice, bytes pass unchecked in both directions until either side closes.
    ///
    /// For WebSocket upgrades the inbound connection must be served with upgrades enabled
    /// (`serve_connection_with_upgrades` / `.with_upgrades()`), otherwise the tunnel is torn
    /// down right after the `101`.
    pub async fn try_forward<B>(
        &self,
        req: Request<B>,
        target: PathAndQuery,
        identity: Option<&Identity>,
        peer: &Peer,
        forward_authorization: bool,
        lane: Option<&UpstreamLane>,
    ) -> Result<Response<ProxyBody>, ForwardError>
    where
        B: Body<Data = Bytes> + Send + 'static,
        B::Error: Into<BoxError>,
    {
        if !target.path().starts_with('/') {
            return Err(ForwardError::InvalidTarget);
        }
        let (mut parts, body) = req.into_parts();
        let upgrade = identity.is_some()
            && UpgradeRequest::of(&parts.method, parts.version, &parts.headers)
                == UpgradeRequest::WebSocket;
        let lane = lane.filter(|_| !upgrade && !self.http2 && parts.version <= Version::HTTP_11);
        // A connection of its own takes the origin form; the pooled client an absolute URI.
        let uri = match lane {
            Some(_) => Uri::from(target),
            None => format!("http://{}{target}", self.authority)
                .parse()
                .map_err(|_| ForwardError::InvalidTarget)?,
        };
        let inbound_upgrade: Option<OnUpgrade> = if upgrade {
            parts.extensions.remove::<OnUpgrade>()
        } else {
            None
        };

        let mut headers = parts.headers;
        // An HTTP/2 caller carries the host in `:authority`; keep it visible as `Host`.
        if !headers.contains_key(header::HOST)
            && let Some(authority) = parts.uri.authority()
            && let Ok(value) = HeaderValue::from_str(authority.as_str())
        {
            headers.insert(header::HOST, value);
        }
        // Without one (an HTTP/1.0 caller), the workload's, as the pooled client sets it.
        if !headers.contains_key(header::HOST)
            && let Ok(value) = HeaderValue::from_str(&self.authority)
        {
            headers.insert(header::HOST, value);
        }
        prepare_request_headers(&mut headers, upgrade, identity, peer, forward_authorization);

        let (client, version) = if upgrade {
            (&self.upgrade_client, Version::HTTP_11)
        } else if self.http2 {
            (&self.client, Version::HTTP_2)
        } else {
            (&self.client, Version::HTTP_11)
        };

        // Build a fresh request so that server-side extensions never leak into the client.
        let mut upstream_req = Request::new(body.map_err(Into::into).boxed_unsync());
        *upstream_req.method_mut() = parts.method;
        *upstream_req.uri_mut() = uri;
        *upstream_req.version_mut() = version;
        *upstream_req.headers_mut() = headers;

        let sent = async {
            match lane {
                Some(lane) => lane.send(upstream_req).await,
                None => client.request(upstream_req).await.map_err(|error| {
                    let classified = classify_client_error(&error);
                    tracing::debug!(
                        error = %error_chain(&error),
                        kind = classified.as_label(),
                        "upstream request failed"
                    );
                    classified
                }),
            }
        };
        let mut response = match tokio::time::timeout(self.response_header_timeout, sent).await {
            Ok(Ok(response)) => response,
            Ok(Err(error)) => return Err(error),
            Err(_elapsed) => {
                tracing::debug!("upstream response header timeout");
                return Err(ForwardError::Timeout);
            }
        };

        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            // Splice only the WebSocket upgrade we forwarded, switched to WebSocket. A 101 we
            // did not ask for would otherwise turn the caller's connection into a tunnel
            // into the workload that no rule checks.
            let switched_to_websocket = upgrade_protocol_is_websocket(response.headers());
            let Some(inbound_upgrade) = inbound_upgrade.filter(|_| switched_to_websocket) else {
                tracing::warn!(
                    websocket_requested = upgrade,
                    "the upstream switched protocols unasked; answering 502, nothing spliced"
                );
                return Err(ForwardError::Protocol);
            };
            let upstream_upgrade = hyper::upgrade::on(&mut response);
            tokio::spawn(splice_upgraded(inbound_upgrade, upstream_upgrade));
            remove_hop_by_hop(response.headers_mut(), true);
        } else {
            remove_hop_by_hop(response.headers_mut(), false);
        }

        // The response goes out on the inbound connection, whatever version the upstream
        // spoke; hyper's server writes its own status line.
        *response.version_mut() = Version::HTTP_11;
        Ok(response.map(BodyExt::boxed))
    }
}

fn build_client(cfg: &ForwardConfig, http2_only: bool) -> UpstreamClient {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(cfg.connect_timeout));
    // Small request/response heads would otherwise wait on Nagle's algorithm.
    connector.set_nodelay(true);
    connector.enforce_http(true);

    let mut builder = Client::builder(TokioExecutor::new());
    builder
        .pool_idle_timeout(cfg.pool_idle_timeout)
        .pool_max_idle_per_host(cfg.pool_max_idle)
        .pool_timer(TokioTimer::new())
        .timer(TokioTimer::new())
        .http2_only(http2_only);
    builder.build(connector)
}

/// Joins both upgraded connections and copies bytes until either side closes.
async fn splice_upgraded(inbound: OnUpgrade, upstream: OnUpgrade) {
    let (inbound, upstream) = match tokio::try_join!(inbound, upstream) {
        Ok(pair) => pair,
        Err(error) => {
            tracing::debug!(%error, "upgrade failed");
            return;
        }
    };
    let mut inbound = TokioIo::new(inbound);
    let mut upstream = TokioIo::new(upstream);
    match tokio::io::copy_bidirectional(&mut inbound, &mut upstream).await {
        Ok((from_client, from_upstream)) => {
            tracing::debug!(from_client, from_upstream, "upgraded connection closed");
        }
        Err(error) => tracing::debug!(%error, "upgraded connection failed"),
    }
}

/// Turns a client error into the caller-facing class. Timeouts are detected through the
/// source chain because the connector reports its connect timeout as an `io::Error`.
fn classify_client_error(error: &hyper_util::client::legacy::Error) -> ForwardError {
    let mut source: Option<&(dyn StdError + 'static)> = error.source();
    while let Some(current) = source {
        if let Some(io) = current.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::TimedOut
        {
            return ForwardError::Timeout;
        }
        if let Some(hyper_error) = current.downcast_ref::<hyper::Error>()
            && hyper_error.is_timeout()
        {
            return ForwardError::Timeout;
        }
        source = current.source();
    }
    if error.is_connect() {
        ForwardError::Connect
    } else {
        ForwardError::Protocol
    }
}

/// Flattens an error and its sources for logging (upstream errors only; they never
/// contain request data; `keygate check` reports its HTTP errors with it too).
pub(crate) fn error_chain(error: &dyn StdError) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(current) = source {
        text.push_str(": ");
        text.push_str(&current.to_string());
        source = current.source();
    }
    text
}

fn full_body(bytes: Bytes) -> ProxyBody {
    Full::new(bytes).map_err(|never| match never {}).boxed()
}

/// Whether the header list names `token` in any `Connection` value.
fn connection_has_token(headers: &HeaderMap, token: &str) -> bool {
    connection_tokens(headers).any(|t| t.eq_ignore_ascii_case(token))
}

fn connection_tokens(headers: &HeaderMap) -> impl Iterator<Item = &str> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .filter(|token| !token.is_empty())
}

/// Whether a `101` response switches to exactly `websocket`.
fn upgrade_protocol_is_websocket(headers: &HeaderMap) -> bool {
    let mut values = headers.get_all(header::UPGRADE).iter();
    match (values.next(), values.next()) {
        (Some(value), None) => value
            .to_str()
            .is_ok_and(|v| v.trim().eq_ignore_ascii_case("websocket")),
        _ => false,
    }
}

/// A header name folded the way CGI, WSGI and Apache's environment mapping see it: ASCII
/// lower case, every character other than a letter or digit read as `-`.
/// `X_Keygate_Client_Id` and `x.keygate.client.id` both fold to `x-keygate-client-id`.
fn folded_header_name(name: &str) -> String {
    name.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() {
                char::from(b.to_ascii_lowercase())
            } else {
                '-'
            }
        })
        .collect()
}

/// Whether an incoming header must never reach the workload: any name folding to
/// `x-keygate-*`, and a look-alike (not the canonical spelling) of a guarded header.
fn is_spoofable_header(name: &HeaderName) -> bool {
    let name = name.as_str();
    if name.starts_with(KEYGATE_HEADER_PREFIX) {
        return true;
    }
    // Only names with a separator other than `-` can be look-alikes.
    if name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
        return false;
    }
    let folded = folded_header_name(name);
    folded.starts_with(KEYGATE_HEADER_PREFIX) || GUARDED_HEADERS.contains(&folded.as_str())
}

/// Removes hop-by-hop headers. With `websocket`, `Connection: upgrade` and
/// `Upgrade: websocket` are written back so that a WebSocket handshake (already checked to be
/// one) can pass through.
fn remove_hop_by_hop(headers: &mut HeaderMap, websocket: bool) {
    // Most messages carry none of them: one pass over the names costs less than a lookup of
    // each.
    let is_hop_by_hop = |name: &HeaderName| *name == header::TE || HOP_BY_HOP.contains(name);
    if !websocket && !headers.keys().any(is_hop_by_hop) {
        return;
    }
    // Read what survives before removing anything: compliant senders list `TE` in
    // `Connection`, which would otherwise delete it first. `TE: trailers` announces that the
    // caller accepts trailers (gRPC needs this); any transfer coding it lists only applies to
    // this hop.
    let accepts_trailers = headers
        .get_all(header::TE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|coding| {
            coding
                .split(';')
                .next()
                .is_some_and(|c| c.trim().eq_ignore_ascii_case("trailers"))
        });

    // The names `Connection` nominates beyond the fixed ones (`Connection: keep-alive`, which
    // most HTTP/1.1 servers send, nominates none).
    let nominated: Vec<HeaderName> = connection_tokens(headers)
        .filter(|token| {
            !HOP_BY_HOP
                .iter()
                .any(|name| token.eq_ignore_ascii_case(name.as_str()))
        })
        .filter_map(|token| HeaderName::from_bytes(token.as_bytes()).ok())
        // `Connection: host` would otherwise let a caller hide the original host.
        .filter(|name| *name != header::HOST)
        .collect();
    // Each name present is removed once (with all its values); absent ones cost nothing.
    let present: Vec<HeaderName> = headers
        .keys()
        .filter(|name| is_hop_by_hop(name) || nominated.contains(name))
        .cloned()
        .collect();
    for name in &present {
        headers.remove(name);
    }
    if accepts_trailers {
        headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }

    if websocket {
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    }
}

/// Applies every request-side header rule; see the module documentation.
fn prepare_request_headers(
    headers: &mut HeaderMap,
    upgrade: bool,
    identity: Option<&Identity>,
    peer: &Peer,
    forward_authorization: bool,
) {
    remove_hop_by_hop(headers, upgrade);

    // Spoofed identity headers, and their look-alikes, are dropped on every route, public
    // ones included, so a workload can rely on their presence meaning "verified by keygate".
    let spoofed: Vec<HeaderName> = headers
        .keys()
        .filter(|name| is_spoofable_header(name))
        .cloned()
        .collect();
    for name in &spoofed {
        headers.remove(name);
    }

    if !forward_authorization {
        headers.remove(header::AUTHORIZATION);
        headers.remove(X_API_KEY);
    }

    append_forwarded_for(headers, peer);
    headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    match headers.get(header::HOST).cloned() {
        Some(host) => {
            headers.insert(X_FORWARDED_HOST, host);
        }
        None => {
            headers.remove(X_FORWARDED_HOST);
        }
    }

    if let Some(identity) = identity {
        headers.insert(CLIENT_ID_HEADER, identity.client_id.clone());
        headers.insert(SCOPES_HEADER, identity.scopes.clone());
        headers.insert(AUTH_METHOD_HEADER, identity.auth_method.clone());
    }
}

/// The TCP peer of a caller connection, with the address `X-Forwarded-For` gives for it,
/// written once per connection instead of once per request.
#[derive(Clone, Debug)]
pub struct Peer {
    pub addr: SocketAddr,
    /// The peer's IP address as text; `None` never happens for an IP address.
    forwarded_for: Option<HeaderValue>,
}

impl Peer {
    pub fn new(addr: SocketAddr) -> Self {
        // Dual-stack listeners report IPv4 peers as `::ffff:a.b.c.d`.
        let ip = addr.ip().to_canonical();
        Self {
            addr,
            forwarded_for: HeaderValue::from_str(&ip.to_string()).ok(),
        }
    }
}

/// Appends the peer to `X-Forwarded-For`, folding repeated header lines into one list.
fn append_forwarded_for(headers: &mut HeaderMap, peer: &Peer) {
    let Some(client_ip) = &peer.forwarded_for else {
        headers.remove(X_FORWARDED_FOR);
        return;
    };
    let previous: Vec<&str> = headers
        .get_all(X_FORWARDED_FOR)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .map(str::trim)
        .filter(|value| !value.is_empty())
        .collect();
    let value = if previous.is_empty() {
        client_ip.clone()
    } else {
        // Both parts are visible ASCII, so this only fails if that invariant breaks; then
        // the peer alone is still better than a list we cannot vouch for.
        let mut combined = previous.join(", ").into_bytes();
        combined.extend_from_slice(b", ");
        combined.extend_from_slice(client_ip.as_bytes());
        HeaderValue::from_bytes(&combined).unwrap_or_else(|_| client_ip.clone())
    };
    headers.insert(X_FORWARDED_FOR, value);
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    use futures::SinkExt;
    use http::Method;
    use http_body_util::{Empty, StreamBody};
    use hyper::body::{Frame, Incoming};
    use hyper::service::service_fn;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    /// What the fake workload saw for one request.
    #[derive(Clone, Debug)]
    struct Seen {
        method: Method,
        uri: Uri,
        version: Version,
        headers: HeaderMap,
    }

    /// A loopback workload that records requests and echoes bodies while streaming.
    struct Upstream {
        addr: SocketAddr,
        accepted: Arc<AtomicUsize>,
        seen: Arc<Mutex<Vec<Seen>>>,
    }

    impl Upstream {
        fn last(&self) -> Seen {
            self.seen
                .lock()
                .expect("lock")
                .last()
                .cloned()
                .expect("a request reached the upstream")
        }
    }

    async fn upstream_service(
        req: Request<Incoming>,
        seen: Arc<Mutex<Vec<Seen>>>,
    ) -> Result<Response<Incoming>, Infallible> {
        seen.lock().expect("lock").push(Seen {
            method: req.method().clone(),
            uri: req.uri().clone(),
            version: req.version(),
            headers: req.headers().clone(),
        });
        let mut req = req;
        if req.headers().contains_key(header::UPGRADE) {
            let on_upgrade = hyper::upgrade::on(&mut req);
            tokio::spawn(async move {
                let upgraded = on_upgrade.await.expect("upstream upgrade");
                let (mut reader, mut writer) = tokio::io::split(TokioIo::new(upgraded));
                let _ = tokio::io::copy(&mut reader, &mut writer).await;
            });
            // An empty `Incoming` is not constructible, so reuse the (empty) request body.
            let mut response = Response::new(req.into_body());
            *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
            let h = response.headers_mut();
            h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
            h.insert("sec-websocket-accept", HeaderValue::from_static("fake"));
            return Ok(response);
        }
        let version = req.version();
        let close = req.headers().contains_key("x-test-close");
        let mut response = Response::new(req.into_body());
        let h = response.headers_mut();
        h.insert("x-upstream-e2e", HeaderValue::from_static("kept"));
        if close {
            // The workload ends the connection after this response.
            h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        } else if version == Version::HTTP_11 {
            h.insert(
                header::CONNECTION,
                HeaderValue::from_static("x-upstream-hop"),
            );
            h.insert("x-upstream-hop", HeaderValue::from_static("secret"));
            h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
            h.insert(
                header::PROXY_AUTHENTICATE,
                HeaderValue::from_static("Basic"),
            );
        }
        Ok(response)
    }

    async fn spawn_upstream(http2: bool) -> Upstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let accepted = Arc::new(AtomicUsize::new(0));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (acc, s) = (accepted.clone(), seen.clone());
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                acc.fetch_add(1, Ordering::SeqCst);
                let s = s.clone();
                let svc = service_fn(move |req| upstream_service(req, s.clone()));
                tokio::spawn(async move {
                    let io = TokioIo::new(stream);
                    if http2 {
                        let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .serve_connection(io, svc)
                            .await;
                    } else {
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(io, svc)
                            .with_upgrades()
                            .await;
                    }
                });
            }
        });
        Upstream {
            addr,
            accepted,
            seen,
        }
    }

    /// The sidecar's side in miniature: an auto (HTTP/1.1 + h2c) server that forwards
    /// everything, as the lead's request handler will after authorization.
    async fn spawn_front(
        forwarder: Forwarder,
        identity: Option<Identity>,
        forward_authorization: bool,
    ) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            loop {
                let Ok((stream, peer)) = listener.accept().await else {
                    return;
                };
                let peer = Peer::new(peer);
                let forwarder = forwarder.clone();
                let identity = identity.clone();
                // As the sidecar's server does: a lane per caller connection.
                let (lane, driver) = forwarder.lane();
                let svc = service_fn(move |req: Request<Incoming>| {
                    let (forwarder, lane) = (forwarder.clone(), lane.clone());
                    let (identity, peer) = (identity.clone(), peer.clone());
                    async move {
                        let target = req
                            .uri()
                            .path_and_query()
                            .cloned()
                            .unwrap_or_else(|| target("/"));
                        let response = forwarder
                            .forward(
                                req,
                                target,
                                identity.as_ref(),
                                &peer,
                                forward_authorization,
                                Some(&lane),
                            )
                            .await;
                        Ok::<_, Infallible>(response)
                    }
                });
                tokio::spawn(async move {
                    let builder =
                        hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
                    let connection =
                        builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
                    tokio::select! {
                        _ = connection => {}
                        () = driver => {}
                    }
                });
            }
        });
        addr
    }

    fn config(upstream: SocketAddr) -> ForwardConfig {
        ForwardConfig {
            connect_timeout: Duration::from_millis(500),
            response_header_timeout: Duration::from_millis(300),
            ..ForwardConfig::new(upstream)
        }
    }

    fn identity() -> Identity {
        Identity::new(
            "billing-batch",
            "invoices:read invoices:write",
            "access_token",
        )
        .expect("identity")
    }

    fn target(text: &'static str) -> PathAndQuery {
        PathAndQuery::from_static(text)
    }

    type TestBody = UnsyncBoxBody<Bytes, BoxError>;

    fn test_client() -> Client<HttpConnector, TestBody> {
        Client::builder(TokioExecutor::new()).build_http()
    }

    fn empty() -> TestBody {
        Empty::<Bytes>::new().map_err(Into::into).boxed_unsync()
    }

    fn full(data: impl Into<Bytes>) -> TestBody {
        Full::new(data.into()).map_err(Into::into).boxed_unsync()
    }

    async fn body_bytes<B>(body: B) -> Bytes
    where
        B: Body,
        B::Error: std::fmt::Debug,
    {
        body.collect().await.expect("body").to_bytes()
    }

    fn get(headers: &HeaderMap, name: &str) -> Option<String> {
        headers
            .get(name)
            .map(|v| v.to_str().expect("ascii").to_owned())
    }

    /// Fails the test instead of hanging it.
    async fn bounded<F: Future>(future: F) -> F::Output {
        tokio::time::timeout(Duration::from_secs(10), future)
            .await
            .expect("test step timed out")
    }

    /// An HTTP/1 upstream, and a front that forwards to it as an authenticated caller.
    async fn authenticated_front() -> (Upstream, SocketAddr) {
        let upstream = spawn_upstream(false).await;
        let forwarder = Forwarder::new(config(upstream.addr));
        let front = spawn_front(forwarder, Some(identity()), false).await;
        (upstream, front)
    }

    /// A caller's HTTP/1.1 connection to `front`.
    async fn caller(front: SocketAddr) -> hyper::client::conn::http1::SendRequest<TestBody> {
        let stream = TcpStream::connect(front).await.expect("connect");
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        tokio::spawn(connection);
        sender
    }

    /// One request over `caller` (with `x-test-close` when `close`), answered 200.
    async fn get_over(caller: &mut hyper::client::conn::http1::SendRequest<TestBody>, close: bool) {
        let mut req = Request::get("/orders/1")
            .header(header::HOST, "front")
            .body(empty())
            .expect("request");
        if close {
            req.headers_mut()
                .insert("x-test-close", HeaderValue::from_static("1"));
        }
        let response = bounded(caller.send_request(req)).await.expect("response");
        assert_eq!(response.status(), StatusCode::OK);
        bounded(response.into_body().collect()).await.expect("body");
    }

    /// `requests` (closing where `true`) one after another over one new caller connection.
    async fn over_one_connection(front: SocketAddr, requests: &[bool]) {
        let mut caller = caller(front).await;
        for &close in requests {
            get_over(&mut caller, close).await;
        }
    }

    #[tokio::test]
    async fn callers_keep_no_more_idle_upstream_connections_than_allowed() {
        let upstream = spawn_upstream(false).await;
        let forwarder = Forwarder::new(ForwardConfig {
            pool_max_idle: 1,
            ..config(upstream.addr)
        });
        let kept = forwarder.kept.clone();
        let front = spawn_front(forwarder, Some(identity()), false).await;
        let mut first = caller(front).await;
        get_over(&mut first, false).await;
        assert_eq!(kept.count(), 1);
        // The second caller's connection is not kept: each request opens one.
        let mut second = caller(front).await;
        get_over(&mut second, false).await;
        get_over(&mut second, false).await;
        assert_eq!(kept.count(), 1);
        assert_eq!(upstream.accepted.load(Ordering::SeqCst), 3);
        // The first keeps its own.
        get_over(&mut first, false).await;
        assert_eq!(upstream.accepted.load(Ordering::SeqCst), 3);
        // A caller that leaves gives its place back.
        drop(first);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while kept.count() > 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the lane was not released"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    #[tokio::test]
    async fn each_caller_connection_keeps_one_upstream_connection_and_reopens_it() {
        let (upstream, front) = authenticated_front().await;
        // Three requests of one caller: one upstream connection, in origin form.
        over_one_connection(front, &[false, false, false]).await;
        assert_eq!(upstream.accepted.load(Ordering::SeqCst), 1);
        assert_eq!(upstream.last().uri, "/orders/1");
        assert_eq!(upstream.last().headers[header::HOST], "front");
        // Another caller: a connection of its own.
        over_one_connection(front, &[false]).await;
        assert_eq!(upstream.accepted.load(Ordering::SeqCst), 2);
        // The workload closes after the first answer: the next request opens a new one.
        over_one_connection(front, &[true, false]).await;
        assert_eq!(upstream.accepted.load(Ordering::SeqCst), 4);
        assert_eq!(upstream.seen.lock().expect("lock").len(), 6);
    }

    #[tokio::test]
    async fn rewrites_request_and_response_headers() {
        let (upstream, front) = authenticated_front().await;

        let req = Request::builder()
            .method(Method::POST)
            .uri(format!("http://{front}/orders/7?expand=lines"))
            .header(header::HOST, "api.example.test")
            .header("X-Keygate-Client-Id", "spoofed")
            .header("x-keygate-anything", "spoofed")
            .header("X-KEYGATE-SCOPES", "admin")
            .header(header::AUTHORIZATION, "Bearer secret-token")
            .header("x-api-key", "kg_secret")
            .header(header::CONNECTION, "keep-alive, TE, x-custom-hop")
            .header("x-custom-hop", "1")
            .header("keep-alive", "timeout=5")
            .header("proxy-connection", "keep-alive")
            .header(header::PROXY_AUTHORIZATION, "Basic Zm9vOmJhcg==")
            .header(header::TE, "gzip, trailers")
            .header(header::TRAILER, "x-checksum")
            // Without `Connection: upgrade` this is not a handshake and must be dropped.
            .header(header::UPGRADE, "h2c")
            .header("x-forwarded-for", "203.0.113.7")
            .header("x-forwarded-for", "198.51.100.1")
            .header("x-forwarded-proto", "https")
            .header("x-request-id", "abc")
            .body(full("payload"))
            .expect("request");
        let response = bounded(test_client().request(req)).await.expect("response");

        assert_eq!(response.status(), StatusCode::OK);
        let rh = response.headers().clone();
        assert_eq!(get(&rh, "x-upstream-e2e").as_deref(), Some("kept"));
        for hop in ["x-upstream-hop", "keep-alive", "proxy-authenticate"] {
            assert!(!rh.contains_key(hop), "response kept {hop}");
        }
        assert_eq!(body_bytes(response.into_body()).await, "payload");

        let seen = upstream.last();
        let h = &seen.headers;
        assert_eq!(seen.method, Method::POST);
        assert_eq!(seen.uri.to_string(), "/orders/7?expand=lines");
        assert_eq!(seen.version, Version::HTTP_11);
        assert!(!h.contains_key("x-keygate-anything"));
        assert_eq!(
            get(h, "x-keygate-client-id").as_deref(),
            Some("billing-batch")
        );
        assert_eq!(
            get(h, "x-keygate-scopes").as_deref(),
            Some("invoices:read invoices:write")
        );
        assert_eq!(h.get_all("x-keygate-client-id").iter().count(), 1);
        assert_eq!(
            get(h, "x-keygate-auth-method").as_deref(),
            Some("access_token")
        );
        assert!(!h.contains_key(header::AUTHORIZATION));
        assert!(!h.contains_key("x-api-key"));
        for hop in [
            "x-custom-hop",
            "keep-alive",
            "proxy-connection",
            "proxy-authorization",
            "trailer",
            "upgrade",
            "transfer-encoding",
        ] {
            assert!(!h.contains_key(hop), "request kept {hop}");
        }
        // hyper's client may add its own `Connection`, but never the caller's tokens.
        assert!(get(h, "connection").is_none_or(|c| !c.contains("x-custom-hop")));
        assert_eq!(get(h, "te").as_deref(), Some("trailers"));
        assert_eq!(
            get(h, "x-forwarded-for").as_deref(),
            Some("203.0.113.7, 198.51.100.1, 127.0.0.1")
        );
        assert_eq!(get(h, "x-forwarded-proto").as_deref(), Some("http"));
        assert_eq!(
            get(h, "x-forwarded-host").as_deref(),
            Some("api.example.test")
        );
        assert_eq!(get(h, "host").as_deref(), Some("api.example.test"));
        assert_eq!(get(h, "x-request-id").as_deref(), Some("abc"));
    }

    #[tokio::test]
    async fn public_route_strips_spoofed_identity_and_can_keep_credentials() {
        let upstream = spawn_upstream(false).await;
        let front = spawn_front(Forwarder::new(config(upstream.addr)), None, true).await;

        let req = Request::get(format!("http://{front}/health"))
            .header("x-keygate-client-id", "spoofed")
            .header("x-keygate-auth-method", "api_key")
            .header(header::AUTHORIZATION, "Bearer kept")
            .header("x-api-key", "kept-too")
            .body(empty())
            .expect("request");
        let response = bounded(test_client().request(req)).await.expect("response");
        assert_eq!(response.status(), StatusCode::OK);

        let h = upstream.last().headers;
        assert!(
            h.keys().all(|k| !k.as_str().starts_with("x-keygate-")),
            "{h:?}"
        );
        assert_eq!(get(&h, "authorization").as_deref(), Some("Bearer kept"));
        assert_eq!(get(&h, "x-api-key").as_deref(), Some("kept-too"));
        assert_eq!(get(&h, "x-forwarded-for").as_deref(), Some("127.0.0.1"));
    }

    #[tokio::test]
    async fn large_body_round_trips_streamed() {
        const CHUNK: usize = 64 * 1024;
        const CHUNKS: usize = 128; // 8 MiB
        let (_upstream, front) = authenticated_front().await;

        let chunk = |i: usize| Bytes::from(vec![(i % 251) as u8; CHUNK]);
        let frames = (0..CHUNKS).map(move |i| Ok::<_, BoxError>(Frame::data(chunk(i))));
        let body = StreamBody::new(futures::stream::iter(frames)).boxed_unsync();
        let req = Request::put(format!("http://{front}/blob"))
            .body(body)
            .expect("request");

        let response = bounded(test_client().request(req)).await.expect("response");
        assert_eq!(response.status(), StatusCode::OK);
        let echoed = bounded(body_bytes(response.into_body())).await;
        assert_eq!(echoed.len(), CHUNK * CHUNKS);
        for (i, piece) in echoed.chunks(CHUNK).enumerate() {
            assert!(
                piece.iter().all(|&b| b == (i % 251) as u8),
                "chunk {i} corrupted"
            );
        }
    }

    /// Each chunk's echo arrives before the next chunk is sent, which is only possible if
    /// neither direction is buffered whole.
    #[tokio::test]
    async fn bodies_stream_in_both_directions() {
        let upstream = spawn_upstream(false).await;
        let front = spawn_front(Forwarder::new(config(upstream.addr)), None, false).await;

        let (mut tx, rx) = futures::channel::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(1);
        let req = Request::post(format!("http://{front}/stream"))
            .body(StreamBody::new(rx).boxed_unsync())
            .expect("request");
        let client = test_client();
        let pending = tokio::spawn(async move { client.request(req).await });
        tx.send(Ok(Frame::data(Bytes::from_static(b"ping-0"))))
            .await
            .expect("send");
        let response = bounded(pending).await.expect("join").expect("response");
        let mut body = response.into_body();
        for i in 0..5 {
            if i > 0 {
                let chunk = Bytes::from(format!("ping-{i}"));
                tx.send(Ok(Frame::data(chunk))).await.expect("send");
            }
            let expected = format!("ping-{i}");
            let mut got = Vec::new();
            while got.len() < expected.len() {
                let frame = bounded(body.frame())
                    .await
                    .expect("frame")
                    .expect("frame ok");
                if let Ok(data) = frame.into_data() {
                    got.extend_from_slice(&data);
                }
            }
            assert_eq!(got, expected.as_bytes());
        }
        drop(tx);
        assert!(bounded(body.frame()).await.is_none());
    }

    #[tokio::test]
    async fn reuses_upstream_connection() {
        let upstream = spawn_upstream(false).await;
        let front = spawn_front(Forwarder::new(config(upstream.addr)), None, false).await;
        let client = test_client();
        for i in 0..20 {
            let req = Request::post(format!("http://{front}/n/{i}"))
                .body(full(format!("req {i}")))
                .expect("request");
            let response = bounded(client.request(req)).await.expect("response");
            assert_eq!(response.status(), StatusCode::OK);
            assert_eq!(body_bytes(response.into_body()).await, format!("req {i}"));
        }
        assert_eq!(upstream.seen.lock().expect("lock").len(), 20);
        assert_eq!(upstream.accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn upstream_down_is_502() {
        let addr = {
            let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            listener.local_addr().expect("addr")
        };
        let forwarder = Forwarder::new(config(addr));
        let peer = Peer::new("127.0.0.1:40000".parse().expect("addr"));

        let req = Request::get("/")
            .body(Empty::<Bytes>::new())
            .expect("request");
        let result =
            bounded(forwarder.try_forward(req, target("/x"), None, &peer, false, None)).await;
        assert_eq!(result.err(), Some(ForwardError::Connect));

        let front = spawn_front(forwarder, None, false).await;
        let req = Request::get(format!("http://{front}/secret?token=abc"))
            .body(empty())
            .expect("request");
        let response = bounded(test_client().request(req)).await.expect("response");
        assert_eq!(response.status(), StatusCode::BAD_GATEWAY);
        assert_eq!(
            get(response.headers(), "content-type").as_deref(),
            Some("application/json")
        );
        let body = body_bytes(response.into_body()).await;
        let json: serde_json::Value = serde_json::from_slice(&body).expect("json");
        assert_eq!(json["error"], "upstream_unavailable");
        assert!(!String::from_utf8_lossy(&body).contains("secret"));
    }

    #[tokio::test]
    async fn silent_upstream_is_504() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        // Accept and hold connections without ever answering.
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((stream, _)) = listener.accept().await {
                held.push(stream);
            }
        });
        let forwarder = Forwarder::new(config(addr));
        let peer = Peer::new("127.0.0.1:40000".parse().expect("addr"));

        let req = Request::get("/")
            .body(Empty::<Bytes>::new())
            .expect("request");
        let result =
            bounded(forwarder.try_forward(req, target("/slow"), None, &peer, false, None)).await;
        assert_eq!(result.err(), Some(ForwardError::Timeout));

        let req = Request::get("/")
            .body(Empty::<Bytes>::new())
            .expect("request");
        let response =
            bounded(forwarder.forward(req, target("/slow"), None, &peer, false, None)).await;
        assert_eq!(response.status(), StatusCode::GATEWAY_TIMEOUT);
        let json: serde_json::Value =
            serde_json::from_slice(&body_bytes(response.into_body()).await).expect("json");
        assert_eq!(json["error"], "upstream_timeout");
    }

    #[tokio::test]
    async fn upstream_hanging_up_is_502_protocol() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                let mut buf = [0u8; 1024];
                let _ = stream.read(&mut buf).await;
                drop(stream);
            }
        });
        let forwarder = Forwarder::new(config(addr));
        let peer = Peer::new("127.0.0.1:40000".parse().expect("addr"));
        let req = Request::get("/")
            .body(Empty::<Bytes>::new())
            .expect("request");
        let result =
            bounded(forwarder.try_forward(req, target("/"), None, &peer, false, None)).await;
        assert_eq!(result.err(), Some(ForwardError::Protocol));
    }

    #[tokio::test]
    async fn websocket_upgrade_is_spliced() {
        let (upstream, front) = authenticated_front().await;

        let stream = tokio::net::TcpStream::connect(front)
            .await
            .expect("connect");
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        tokio::spawn(conn.with_upgrades());

        let req = Request::get("/ws")
            .header(header::HOST, "api.example.test")
            .header(header::CONNECTION, "Upgrade")
            .header(header::UPGRADE, "websocket")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
            .header("sec-websocket-version", "13")
            .header("x-keygate-client-id", "spoofed")
            .body(Empty::<Bytes>::new())
            .expect("request");
        let response = bounded(sender.send_request(req)).await.expect("response");
        assert_eq!(response.status(), StatusCode::SWITCHING_PROTOCOLS);
        assert_eq!(
            get(response.headers(), "upgrade").as_deref(),
            Some("websocket")
        );
        assert_eq!(
            get(response.headers(), "sec-websocket-accept").as_deref(),
            Some("fake")
        );

        let seen = upstream.last().headers;
        assert_eq!(get(&seen, "upgrade").as_deref(), Some("websocket"));
        assert!(get(&seen, "connection").is_some_and(|c| c.eq_ignore_ascii_case("upgrade")));
        assert_eq!(
            get(&seen, "x-keygate-client-id").as_deref(),
            Some("billing-batch")
        );
        assert_eq!(
            get(&seen, "sec-websocket-key").as_deref(),
            Some("dGhlIHNhbXBsZSBub25jZQ==")
        );

        let upgraded = bounded(hyper::upgrade::on(response))
            .await
            .expect("upgrade");
        let mut io = TokioIo::new(upgraded);
        for message in [&b"hello keygate"[..], &b"second frame"[..]] {
            io.write_all(message).await.expect("write");
            let mut echoed = vec![0u8; message.len()];
            bounded(io.read_exact(&mut echoed)).await.expect("read");
            assert_eq!(echoed, message);
        }
    }

    #[tokio::test]
    async fn h2c_upstream_with_prior_knowledge() {
        let upstream = spawn_upstream(true).await;
        let cfg = ForwardConfig {
            http2_prior_knowledge: true,
            ..config(upstream.addr)
        };
        let front = spawn_front(Forwarder::new(cfg), Some(identity()), false).await;
        let client = test_client();
        for i in 0..5 {
            let req = Request::post(format!("http://{front}/grpc.Svc/Call{i}"))
                .header(header::HOST, "svc.example.test")
                .header(header::TE, "trailers")
                .header("x-keygate-scopes", "spoofed")
                .body(full(format!("h2 body {i}")))
                .expect("request");
            let response = bounded(client.request(req)).await.expect("response");
            assert_eq!(response.status(), StatusCode::OK);
            assert_eq!(
                body_bytes(response.into_body()).await,
                format!("h2 body {i}")
            );
        }
        let seen = upstream.last();
        assert_eq!(seen.version, Version::HTTP_2);
        assert_eq!(seen.uri.path(), "/grpc.Svc/Call4");
        assert_eq!(
            get(&seen.headers, "host").as_deref(),
            Some("svc.example.test")
        );
        assert_eq!(get(&seen.headers, "te").as_deref(), Some("trailers"));
        assert_eq!(
            get(&seen.headers, "x-keygate-scopes").as_deref(),
            Some("invoices:read invoices:write")
        );
        assert_eq!(upstream.accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn rejects_a_bad_target_without_contacting_upstream() {
        let upstream = spawn_upstream(false).await;
        let forwarder = Forwarder::new(config(upstream.addr));
        let peer = Peer::new("127.0.0.1:40000".parse().expect("addr"));

        let req = Request::get("/")
            .body(Empty::<Bytes>::new())
            .expect("request");
        let result = forwarder
            .try_forward(req, target("*"), None, &peer, false, None)
            .await;
        assert_eq!(result.err(), Some(ForwardError::InvalidTarget));
        assert_eq!(upstream.accepted.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn an_identity_that_is_no_header_value_is_refused() {
        let bad = Identity::new("evil\r\nx-injected: 1", "a", "api_key");
        assert_eq!(bad, Err(ForwardError::InvalidIdentity));
        let bad_scopes = Identity::new("billing", "a\0b", "api_key");
        assert_eq!(bad_scopes, Err(ForwardError::InvalidIdentity));
        assert_eq!(
            ForwardError::InvalidIdentity.into_response().status(),
            StatusCode::INTERNAL_SERVER_ERROR
        );
    }

    #[test]
    fn hop_by_hop_rules() {
        let mut h = HeaderMap::new();
        h.append(header::CONNECTION, HeaderValue::from_static("close, X-Foo"));
        h.append(header::CONNECTION, HeaderValue::from_static("host"));
        h.insert("x-foo", HeaderValue::from_static("1"));
        h.insert(header::HOST, HeaderValue::from_static("a.test"));
        h.insert(header::TE, HeaderValue::from_static("deflate;q=0.5"));
        remove_hop_by_hop(&mut h, false);
        assert!(!h.contains_key("x-foo"));
        assert!(!h.contains_key(header::CONNECTION));
        assert!(!h.contains_key(header::TE));
        assert_eq!(get(&h, "host").as_deref(), Some("a.test"));

        // What most HTTP/1.1 servers answer with: only the hop-by-hop pair goes.
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("Keep-Alive"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        h.append(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        remove_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(get(&h, "content-type").as_deref(), Some("text/plain"));

        // RFC 9110 requires `Connection: TE` next to `TE`; `trailers` must still survive.
        let mut h = HeaderMap::new();
        h.insert(header::CONNECTION, HeaderValue::from_static("TE"));
        h.insert(header::TE, HeaderValue::from_static("trailers, gzip"));
        remove_hop_by_hop(&mut h, false);
        assert_eq!(get(&h, "te").as_deref(), Some("trailers"));
        assert!(!h.contains_key(header::CONNECTION));

        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("WebSocket"));
        h.insert(
            "http2-settings",
            HeaderValue::from_static("AAMAAABkAAQAAP__"),
        );
        remove_hop_by_hop(&mut h, true);
        assert_eq!(get(&h, "connection").as_deref(), Some("upgrade"));
        assert_eq!(get(&h, "upgrade").as_deref(), Some("websocket"));
        assert!(!h.contains_key("http2-settings"));

        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("Upgrade, HTTP2-Settings"),
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("h2c"));
        h.insert(
            "http2-settings",
            HeaderValue::from_static("AAMAAABkAAQAAP__"),
        );
        remove_hop_by_hop(&mut h, false);
        assert!(h.is_empty(), "{h:?}");
    }

    #[test]
    fn upgrade_requests_are_classified() {
        let websocket = [
            ("connection", "keep-alive, Upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
            ("sec-websocket-version", "13"),
        ];
        let headers = |pairs: &[(&'static str, &'static str)]| {
            let mut h = HeaderMap::new();
            for (name, value) in pairs {
                h.append(*name, HeaderValue::from_static(value));
            }
            h
        };
        let with_upgrade = |value: &'static str| {
            let mut h = headers(&websocket);
            h.insert(header::UPGRADE, HeaderValue::from_static(value));
            h
        };
        let get_11 = |h: &HeaderMap| UpgradeRequest::of(&Method::GET, Version::HTTP_11, h);
        assert_eq!(get_11(&headers(&websocket)), UpgradeRequest::WebSocket);
        assert_eq!(
            get_11(&with_upgrade("WebSocket")),
            UpgradeRequest::WebSocket
        );
        assert_eq!(
            get_11(&with_upgrade("h2c, websocket")),
            UpgradeRequest::WebSocket
        );
        for ignored in ["h2c", "H2C", "h2", "h2c, h2"] {
            assert_eq!(
                get_11(&with_upgrade(ignored)),
                UpgradeRequest::None,
                "{ignored}"
            );
        }
        for refused in [
            "x-raw",
            "websocket, x-raw",
            "websocket/13",
            "TLS/1.2",
            "websocket, websocket",
        ] {
            assert!(
                matches!(
                    get_11(&with_upgrade(refused)),
                    UpgradeRequest::Unsupported(_)
                ),
                "{refused}"
            );
        }
        // Two header lines are one list.
        let mut two_lines = headers(&websocket);
        two_lines.append(header::UPGRADE, HeaderValue::from_static("x-raw"));
        assert!(matches!(get_11(&two_lines), UpgradeRequest::Unsupported(_)));
        // Not a handshake at all: the header is only hop-by-hop.
        let mut no_connection = headers(&websocket);
        no_connection.remove(header::CONNECTION);
        assert_eq!(get_11(&no_connection), UpgradeRequest::None);
        for version in [Version::HTTP_10, Version::HTTP_2] {
            assert_eq!(
                UpgradeRequest::of(&Method::GET, version, &headers(&websocket)),
                UpgradeRequest::None
            );
        }
        // A WebSocket handshake must be a complete GET.
        assert!(matches!(
            UpgradeRequest::of(&Method::POST, Version::HTTP_11, &headers(&websocket)),
            UpgradeRequest::Unsupported(_)
        ));
        let mut no_key = headers(&websocket);
        no_key.remove("sec-websocket-key");
        assert!(matches!(get_11(&no_key), UpgradeRequest::Unsupported(_)));
    }

    #[test]
    fn look_alikes_of_guarded_headers_are_spoofable() {
        for name in [
            "x-keygate-client-id",
            "x-keygate-anything",
            "x_keygate_client_id",
            "x_keygate-scopes",
            "x.keygate.auth.method",
            "x~keygate~",
            "x_forwarded_for",
            "x.forwarded.host",
            "x_forwarded_proto",
            "x_api_key",
        ] {
            let header = HeaderName::from_bytes(name.as_bytes()).expect("name");
            assert!(is_spoofable_header(&header), "{name}");
        }
        for name in [
            "x-forwarded-for",
            "x-forwarded-host",
            "x-api-key",
            "x-keygate",
            "x_keygate",
            "x_request_id",
            "authorization",
            "x-keygateway-id",
        ] {
            let header = HeaderName::from_bytes(name.as_bytes()).expect("name");
            assert!(!is_spoofable_header(&header), "{name}");
        }
    }

    /// Without an identity (a public route) a WebSocket handshake is a plain request, and
    /// the upstream's 101 is refused.
    #[tokio::test]
    async fn websocket_upgrade_without_identity_is_not_forwarded() {
        let upstream = spawn_upstream(false).await;
        let front = spawn_front(Forwarder::new(config(upstream.addr)), None, false).await;
        let stream = tokio::net::TcpStream::connect(front)
            .await
            .expect("connect");
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .expect("handshake");
        tokio::spawn(conn.with_upgrades());
        let req = Request::get("/ws")
            .header(header::CONNECTION, "Upgrade")
            .header(header::UPGRADE, "websocket")
            .header("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ==")
            .header("sec-websocket-version", "13")
            .body(Empty::<Bytes>::new())
            .expect("request");
        let response = bounded(sender.send_request(req)).await.expect("response");
        // The test upstream answers any request with an `Upgrade` header with a 101; this one
        // had none, so it echoed an empty body.
        assert_eq!(response.status(), StatusCode::OK);
        let seen = upstream.last().headers;
        assert!(!seen.contains_key(header::UPGRADE), "{seen:?}");
    }

    #[test]
    fn forwarded_for_uses_canonical_ip() {
        let mut h = HeaderMap::new();
        let peer = |addr: &str| Peer::new(addr.parse().expect("socket address"));
        append_forwarded_for(&mut h, &peer("[::ffff:10.1.2.3]:5000"));
        assert_eq!(get(&h, "x-forwarded-for").as_deref(), Some("10.1.2.3"));
        append_forwarded_for(&mut h, &peer("[2001:db8::1]:5000"));
        assert_eq!(
            get(&h, "x-forwarded-for").as_deref(),
            Some("10.1.2.3, 2001:db8::1")
        );
    }

    #[test]
    fn error_labels_and_statuses() {
        let cases = [
            (ForwardError::Connect, "connect", 502),
            (ForwardError::Timeout, "timeout", 504),
            (ForwardError::Protocol, "protocol", 502),
            (ForwardError::InvalidTarget, "invalid_target", 400),
            (ForwardError::InvalidIdentity, "invalid_identity", 500),
        ];
        for (error, label, status) in cases {
            assert_eq!(error.as_label(), label);
            assert_eq!(error.status().as_u16(), status);
            assert_eq!(error.into_response().status().as_u16(), status);
        }
    }
}
