//! Client authentication at the token, revocation and introspection endpoints:
//! `client_secret_basic`, `client_secret_post` and `private_key_jwt` (RFC 7523), exactly one
//! per request (RFC 6749 §2.3).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use jsonwebtoken::Validation;
use serde::Deserialize;

use super::error::{ErrorCode, OAuthError};
use crate::credentials::{jws_algorithm, jwt_error_reason};
use crate::registry::{ClientView, Snapshot};

/// The assertion type of RFC 7523 client authentication.
pub const JWT_BEARER_ASSERTION: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// The longest lifetime a client assertion may have.
const MAX_ASSERTION_LIFETIME_SECS: u64 = 3600;
/// Most assertion ids remembered at once; beyond this, assertions are refused (fail closed)
/// until old ones expire.
const MAX_REMEMBERED_ASSERTIONS: usize = 100_000;

/// How the client authenticated, for logs, metrics and introspection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    SecretBasic,
    SecretPost,
    PrivateKeyJwt,
}

impl AuthMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SecretBasic => "client_secret_basic",
            Self::SecretPost => "client_secret_post",
            Self::PrivateKeyJwt => "private_key_jwt",
        }
    }
}

/// Request parameters, each present at most once.
pub type Params = HashMap<String, String>;

/// What the client presented, before any check.
#[derive(Debug)]
pub enum Presented {
    Secret {
        client_id: String,
        secret: String,
        method: AuthMethod,
    },
    Assertion {
        client_id: String,
        assertion: String,
    },
}

impl Presented {
    /// The client id it claims, for throttling and logs.
    pub fn client_id(&self) -> &str {
        match self {
            Self::Secret { client_id, .. } | Self::Assertion { client_id, .. } => client_id,
        }
    }
}

fn invalid_client(description: &str) -> OAuthError {
    OAuthError::new(ErrorCode::InvalidClient, description)
}

fn invalid_request(description: &str) -> OAuthError {
    OAuthError::new(ErrorCode::InvalidRequest, description)
}

/// Reads the credentials a request presents, refusing requests with none or with more than
/// one method.
pub fn presented(authorization: Option<&str>, params: &Params) -> Result<Presented, OAuthError> {
    let form_id = params.get("client_id");
    let form_secret = params.get("client_secret");
    let assertion = params.get("client_assertion");
    let methods = usize::from(authorization.is_some())
        + usize::from(form_secret.is_some())
        + usize::from(assertion.is_some() || params.contains_key("client_assertion_type"));
    if methods > 1 {
        return Err(invalid_request(
            "use exactly one client authentication method (RFC 6749 section 2.3)",
        ));
    }
    if let Some(header) = authorization {
        let (client_id, secret) = parse_basic(header)?;
        if form_id.is_some_and(|id| *id != client_id) {
            return Err(invalid_request(
                "client_id does not match the Authorization header",
            ));
        }
        return Ok(Presented::Secret {
            client_id,
            secret,
            method: AuthMethod::SecretBasic,
        });
    }
    if let Some(secret) = form_secret {
        let client_id =
            form_id.ok_or_else(|| invalid_request("client_secret without client_id"))?;
        return Ok(Presented::Secret {
            client_id: client_id.clone(),
            secret: secret.clone(),
            method: AuthMethod::SecretPost,
        });
    }
    if methods == 1 {
        if params.get("client_assertion_type").map(String::as_str) != Some(JWT_BEARER_ASSERTION) {
            return Err(invalid_request(
                "client_assertion_type must be urn:ietf:params:oauth:client-assertion-type:jwt-bearer",
            ));
        }
        let assertion = assertion.ok_or_else(|| invalid_request("client_assertion is missing"))?;
        let claimed = assertion_subject(assertion)?;
        if form_id.is_some_and(|id| *id != claimed) {
            return Err(invalid_request(
                "client_id does not match the client assertion",
            ));
        }
        return Ok(Presented::Assertion {
            client_id: claimed,
            assertion: assertion.clone(),
        });
    }
    Err(invalid_client("client authentication is required"))
}

/// Parses `Authorization: Basic base64(urlencode(id) ":" urlencode(secret))` (RFC 6749
/// §2.3.1 form-encodes both before Basic encoding).
fn parse_basic(header: &str) -> Result<(String, String), OAuthError> {
    let (scheme, value) = header.trim().split_once(' ').unwrap_or((header, ""));
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(invalid_client(
            "the Authorization header must use the Basic scheme",
        ));
    }
    let malformed = || invalid_client("malformed Basic credentials");
    let decoded = STANDARD.decode(value.trim()).map_err(|_| malformed())?;
    let decoded = String::from_utf8(decoded).map_err(|_| malformed())?;
    let (id, secret) = decoded.split_once(':').ok_or_else(malformed)?;
    let decode = |s: &str| -> String {
        form_urlencoded::parse(format!("v={s}").as_bytes())
            .next()
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default()
    };
    let (id, secret) = (decode(id), decode(secret));
    if id.is_empty() {
        return Err(malformed());
    }
    Ok((id, secret))
}

/// The `sub` of an unverified assertion, only to find the client whose key must verify it.
fn assertion_subject(assertion: &str) -> Result<String, OAuthError> {
    #[derive(Deserialize)]
    struct Sub {
        sub: String,
    }
    jsonwebtoken::dangerous::insecure_decode_claims::<Sub>(assertion)
        .map(|c| c.sub)
        .map_err(|_| invalid_client("malformed client assertion"))
}

/// Remembers assertion ids until they expire, so none is accepted twice.
#[derive(Debug, Default)]
pub struct ReplayCache {
    seen: Mutex<HashMap<String, u64>>,
}

impl ReplayCache {
    /// Records `jti` of `client_id` until `exp`; false when it was already used (or the cache
    /// is full of unexpired ids).
    fn first_use(&self, client_id: &str, jti: &str, exp: u64, now: u64) -> bool {
        let mut seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        if seen.len() >= MAX_REMEMBERED_ASSERTIONS {
            seen.retain(|_, until| *until > now);
            if seen.len() >= MAX_REMEMBERED_ASSERTIONS {
                return false;
            }
        }
        let key = format!("{client_id}\u{0}{jti}");
        match seen.get(&key) {
            Some(until) if *until > now => false,
            _ => {
                seen.insert(key, exp);
                true
            }
        }
    }
}

/// Checks presented credentials against the registry at `now`. Every failure is the same
/// `invalid_client` to the caller; the description says only what the client can fix.
pub fn authenticate(
    presented: &Presented,
    snapshot: &Snapshot,
    audiences: &[&str],
    replay: &ReplayCache,
    leeway: Duration,
    now: u64,
) -> Result<(Arc<ClientView>, AuthMethod), OAuthError> {
    let client = snapshot.clients.get(presented.client_id());
    match presented {
        Presented::Secret { secret, method, .. } => {
            // Compare even for an unknown client so timing does not reveal which ids exist.
            let ok = client.is_some_and(|c| c.material.secret_matches(secret, now));
            match client {
                Some(client) if ok => Ok((client.clone(), *method)),
                _ => Err(invalid_client("unknown client or wrong secret")),
            }
        }
        Presented::Assertion {
            client_id,
            assertion,
        } => {
            let client = client.ok_or_else(|| invalid_client("unknown client or wrong key"))?;
            verify_assertion(client, client_id, assertion, audiences, replay, leeway, now)?;
            Ok((client.clone(), AuthMethod::PrivateKeyJwt))
        }
    }
}

#[derive(Deserialize)]
struct AssertionClaims {
    exp: u64,
    #[serde(default)]
    iat: Option<u64>,
    #[serde(default)]
    jti: Option<String>,
}

fn verify_assertion(
    client: &ClientView,
    client_id: &str,
    assertion: &str,
    audiences: &[&str],
    replay: &ReplayCache,
    leeway: Duration,
    now: u64,
) -> Result<(), OAuthError> {
    let header = jsonwebtoken::decode_header(assertion)
        .map_err(|_| invalid_client("malformed client assertion"))?;
    let mut last_error = invalid_client("the client has no key pair");
    for key in client.material.keys_at(now) {
        if jws_algorithm(key.algorithm) != header.alg {
            last_error =
                invalid_client("client assertion algorithm does not match the client's key");
            continue;
        }
        let mut validation = Validation::new(header.alg);
        validation.leeway = leeway.as_secs();
        validation.set_required_spec_claims(&["exp", "iss", "sub", "aud"]);
        validation.set_issuer(&[client_id]);
        validation.sub = Some(client_id.to_owned());
        validation.set_audience(audiences);
        let claims =
            match jsonwebtoken::decode::<AssertionClaims>(assertion, &key.decoding, &validation) {
                Ok(data) => data.claims,
                Err(e) => {
                    last_error = invalid_client(&format!(
                        "client assertion rejected: {}",
                        jwt_error_reason(&e)
                    ));
                    continue;
                }
            };
        if claims.exp + leeway.as_secs() <= now {
            return Err(invalid_client("client assertion rejected: expired"));
        }
        let issued = claims.iat.unwrap_or(now);
        if claims.exp.saturating_sub(issued.min(now))
            > MAX_ASSERTION_LIFETIME_SECS + leeway.as_secs()
        {
            return Err(invalid_client("client assertion lifetime exceeds one hour"));
        }
        let jti = claims
            .jti
            .ok_or_else(|| invalid_client("client assertion has no jti"))?;
        if !replay.first_use(client_id, &jti, claims.exp + leeway.as_secs(), now) {
            return Err(invalid_client("client assertion was already used"));
        }
        return Ok(());
    }
    Err(last_error)
}

/// Limits failed authentications per client *and source address*, so an attacker hammering
/// one client id slows only itself, never the real client calling from elsewhere.
#[derive(Debug)]
pub struct Throttle {
    failures: Mutex<HashMap<(String, IpAddr), (u64, u32)>>,
    window_secs: u64,
    max_failures: u32,
    max_entries: usize,
}

impl Default for Throttle {
    fn default() -> Self {
        Self::new(60, 20, 100_000)
    }
}

impl Throttle {
    pub fn new(window_secs: u64, max_failures: u32, max_entries: usize) -> Self {
        Self {
            failures: Mutex::new(HashMap::new()),
            window_secs,
            max_failures,
            max_entries,
        }
    }

    /// Whether `client_id` from `ip` must wait at `now`.
    pub fn is_blocked(&self, client_id: &str, ip: IpAddr, now: u64) -> bool {
        let failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        failures
            .get(&(client_id.to_owned(), ip))
            .is_some_and(|(start, count)| {
                now < start + self.window_secs && *count >= self.max_failures
            })
    }

    /// Records a failure.
    pub fn record_failure(&self, client_id: &str, ip: IpAddr, now: u64) {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        if failures.len() >= self.max_entries {
            let window = self.window_secs;
            failures.retain(|_, (start, _)| now < *start + window);
            if failures.len() >= self.max_entries {
                // Still full of live entries: forget the lot rather than grow without bound.
                failures.clear();
            }
        }
        let entry = failures
            .entry((client_id.to_owned(), ip))
            .or_insert((now, 0));
        if now >= entry.0 + self.window_secs {
            *entry = (now, 0);
        }
        entry.1 = entry.1.saturating_add(1);
    }

    /// Forgets failures after a success.
    pub fn record_success(&self, client_id: &str, ip: IpAddr) {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        failures.remove(&(client_id.to_owned(), ip));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mk_params(pairs: &[(&str, &str)]) -> Params {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn basic(id: &str, secret: &str) -> String {
        format!("Basic {}", STANDARD.encode(format!("{id}:{secret}")))
    }

    #[test]
    fn basic_credentials_are_form_decoded() {
        let header = basic("kgc_1", "a%2Bb%3Ac+d");
        let Presented::Secret {
            client_id,
            secret,
            method,
        } = presented(Some(&header), &Params::new()).unwrap()
        else {
            panic!("expected a secret");
        };
        assert_eq!(
            (client_id.as_str(), secret.as_str(), method),
            ("kgc_1", "a+b:c d", AuthMethod::SecretBasic)
        );
    }

    #[test]
    fn more_than_one_method_is_invalid_request() {
        let err = presented(
            Some(&basic("a", "b")),
            &mk_params(&[("client_secret", "b"), ("client_id", "a")]),
        )
        .unwrap_err();
        assert_eq!(err.code, ErrorCode::InvalidRequest);
    }

    #[test]
    fn missing_and_malformed_credentials() {
        assert_eq!(
            presented(None, &Params::new()).unwrap_err().code,
            ErrorCode::InvalidClient
        );
        assert_eq!(
            presented(Some("Basic !!!"), &Params::new())
                .unwrap_err()
                .code,
            ErrorCode::InvalidClient
        );
        assert_eq!(
            presented(Some("Bearer abc"), &Params::new())
                .unwrap_err()
                .code,
            ErrorCode::InvalidClient
        );
        let no_colon = format!("Basic {}", STANDARD.encode("kgc_1"));
        assert_eq!(
            presented(Some(&no_colon), &Params::new())
                .unwrap_err()
                .description,
            "malformed Basic credentials"
        );
        let wrong_type = mk_params(&[
            ("client_assertion", "x.y.z"),
            ("client_assertion_type", "other"),
        ]);
        assert_eq!(
            presented(None, &wrong_type).unwrap_err().code,
            ErrorCode::InvalidRequest
        );
    }

    #[test]
    fn replay_cache_refuses_second_use_until_expiry() {
        let cache = ReplayCache::default();
        assert!(cache.first_use("c", "j", 100, 0));
        assert!(!cache.first_use("c", "j", 100, 50));
        assert!(cache.first_use("other", "j", 100, 50));
        assert!(cache.first_use("c", "j", 200, 100));
    }

    #[test]
    fn throttle_is_per_client_and_address() {
        let throttle = Throttle::new(60, 3, 10);
        let attacker: IpAddr = "10.0.0.66".parse().unwrap();
        let owner: IpAddr = "10.0.0.7".parse().unwrap();
        for _ in 0..3 {
            throttle.record_failure("kgc_1", attacker, 0);
        }
        assert!(throttle.is_blocked("kgc_1", attacker, 1));
        assert!(!throttle.is_blocked("kgc_1", owner, 1));
        assert!(!throttle.is_blocked("kgc_2", attacker, 1));
        assert!(!throttle.is_blocked("kgc_1", attacker, 60));
    }
}
