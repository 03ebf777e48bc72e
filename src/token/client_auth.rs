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
use crate::credentials::{check_jwt_times, jws_algorithm, jwt_error_reason};
use crate::registry::{ClientView, Snapshot};

/// The assertion type of RFC 7523 client authentication.
pub const JWT_BEARER_ASSERTION: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// The longest lifetime a client assertion may have.
const MAX_ASSERTION_LIFETIME_SECS: u64 = 3600;
/// Most assertion ids remembered at once; beyond this, assertions are refused (fail closed)
/// until old ones expire. An entry is a fixed 24 bytes (digests and `exp`), so the cache
/// stays under 4 MiB whatever the assertions carry.
const MAX_REMEMBERED_ASSERTIONS: usize = 100_000;
/// Most assertion ids remembered for one client: one client cannot fill the whole cache and
/// so lock every other client out of `private_key_jwt`.
const MAX_REMEMBERED_ASSERTIONS_PER_CLIENT: usize = 10_000;
/// The longest client id accepted, in bytes. keygate's own are 36 (`kgc_` and 32 hex
/// digits); longer ones are refused before anything is looked up or remembered.
pub const MAX_CLIENT_ID_BYTES: usize = 256;
/// Most (client id, address) pairs the throttle tracks; about 1 MiB at most.
const MAX_THROTTLE_ENTRIES: usize = 10_000;

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

/// A client that proved who it is, and how.
#[derive(Debug, Clone)]
pub struct Authenticated {
    pub client: Arc<ClientView>,
    pub method: AuthMethod,
    /// The fingerprint of the key that verified a `private_key_jwt` assertion.
    pub key_fingerprint: Option<String>,
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
    if let Some(id) = form_id {
        bounded_client_id(id)?;
    }
    if let Some(header) = authorization {
        let (client_id, secret) = parse_basic(header)?;
        bounded_client_id(&client_id)?;
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
        bounded_client_id(&claimed)?;
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

/// Refuses a client id longer than [`MAX_CLIENT_ID_BYTES`]: no client has one, and nothing
/// that size is ever looked up, logged or remembered.
fn bounded_client_id(client_id: &str) -> Result<(), OAuthError> {
    if client_id.len() > MAX_CLIENT_ID_BYTES {
        return Err(invalid_client("client_id is too long"));
    }
    Ok(())
}

/// A fixed-size digest of variable-length request input, for table keys: what a client
/// sends is never stored, whatever its length.
type Digest = [u8; 16];

fn digest_of(parts: &[&[u8]]) -> Digest {
    let mut context = aws_lc_rs::digest::Context::new(&aws_lc_rs::digest::SHA256);
    for part in parts {
        // Length-prefixed, so that ("ab", "c") and ("a", "bc") differ.
        context.update(&(part.len() as u64).to_be_bytes());
        context.update(part);
    }
    let mut digest = Digest::default();
    digest.copy_from_slice(&context.finish().as_ref()[..16]);
    digest
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

/// Remembers assertion ids until they expire, so none is accepted twice. Keyed by digests
/// of client id and `jti`; at most [`MAX_REMEMBERED_ASSERTIONS`] entries, and at most
/// [`MAX_REMEMBERED_ASSERTIONS_PER_CLIENT`] of one client.
#[derive(Debug, Default)]
pub struct ReplayCache {
    inner: Mutex<ReplayEntries>,
}

#[derive(Debug, Default)]
struct ReplayEntries {
    /// Client digest → `jti` digest → remembered until.
    by_client: HashMap<Digest, HashMap<Digest, u64>>,
    len: usize,
}

impl ReplayEntries {
    fn forget_expired(&mut self, now: u64) {
        self.by_client.retain(|_, seen| {
            seen.retain(|_, until| *until > now);
            !seen.is_empty()
        });
        self.len = self.by_client.values().map(HashMap::len).sum();
    }
}

impl ReplayCache {
    /// Records `jti` of `client_id` until `exp`; false when it was already used (or the cache
    /// is full of unexpired ids, overall or for this client).
    fn first_use(&self, client_id: &str, jti: &str, exp: u64, now: u64) -> bool {
        let mut entries = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if entries.len >= MAX_REMEMBERED_ASSERTIONS {
            entries.forget_expired(now);
            if entries.len >= MAX_REMEMBERED_ASSERTIONS {
                return false;
            }
        }
        let client = digest_of(&[client_id.as_bytes()]);
        let jti = digest_of(&[jti.as_bytes()]);
        let ReplayEntries { by_client, len } = &mut *entries;
        let seen = by_client.entry(client).or_default();
        if let Some(until) = seen.get(&jti) {
            if *until > now {
                return false;
            }
            seen.insert(jti, exp);
            return true;
        }
        let before = seen.len();
        if before >= MAX_REMEMBERED_ASSERTIONS_PER_CLIENT {
            seen.retain(|_, until| *until > now);
        }
        let fits = seen.len() < MAX_REMEMBERED_ASSERTIONS_PER_CLIENT;
        if fits {
            seen.insert(jti, exp);
        }
        *len = *len + seen.len() - before;
        fits
    }

    /// Ids remembered now.
    pub fn len(&self) -> usize {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).len
    }

    /// Whether no id is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
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
) -> Result<Authenticated, OAuthError> {
    let client = snapshot.clients.get(presented.client_id());
    match presented {
        Presented::Secret { secret, method, .. } => {
            // Compare even for an unknown client so timing does not reveal which ids exist.
            let ok = client.is_some_and(|c| c.material.secret_matches(secret, now));
            match client {
                Some(client) if ok => Ok(Authenticated {
                    client: client.clone(),
                    method: *method,
                    key_fingerprint: None,
                }),
                _ => Err(invalid_client("unknown client or wrong secret")),
            }
        }
        Presented::Assertion {
            client_id,
            assertion,
        } => {
            let client = client.ok_or_else(|| invalid_client("unknown client or wrong key"))?;
            let fingerprint =
                verify_assertion(client, client_id, assertion, audiences, replay, leeway, now)?;
            Ok(Authenticated {
                client: client.clone(),
                method: AuthMethod::PrivateKeyJwt,
                key_fingerprint: Some(fingerprint),
            })
        }
    }
}

#[derive(Deserialize)]
struct AssertionClaims {
    exp: u64,
    #[serde(default)]
    iat: Option<u64>,
    #[serde(default)]
    nbf: Option<u64>,
    #[serde(default)]
    jti: Option<String>,
}

/// Verifies a client assertion with one of the client's keys; returns that key's fingerprint.
fn verify_assertion(
    client: &ClientView,
    client_id: &str,
    assertion: &str,
    audiences: &[&str],
    replay: &ReplayCache,
    leeway: Duration,
    now: u64,
) -> Result<String, OAuthError> {
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
        validation.validate_nbf = true;
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
        // jsonwebtoken checks `exp` and `nbf` against its own clock; check every time claim
        // against ours as well (the same rules as key-pair JWTs), so that callers (and tests)
        // control time.
        check_jwt_times(claims.iat, claims.nbf, claims.exp, leeway, now)
            .map_err(|reason| invalid_client(&format!("client assertion rejected: {reason}")))?;
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
        return Ok(key.fingerprint.clone());
    }
    Err(last_error)
}

/// Limits failed authentications per client *and source address*, so an attacker hammering
/// one client id slows only itself, never the real client calling from elsewhere.
///
/// Keyed by a 16-byte digest of the client id (known or not: the answers must not tell which
/// ids exist) and the address; at most `max_entries` pairs. When full, pairs whose window has
/// passed go first, then pairs not blocked; if every pair is blocked, a new pair is not
/// tracked (the blocks in force stay).
#[derive(Debug)]
pub struct Throttle {
    failures: Mutex<HashMap<(Digest, IpAddr), (u64, u32)>>,
    window_secs: u64,
    max_failures: u32,
    max_entries: usize,
}

impl Default for Throttle {
    fn default() -> Self {
        Self::new(60, 20, MAX_THROTTLE_ENTRIES)
    }
}

impl Throttle {
    pub fn new(window_secs: u64, max_failures: u32, max_entries: usize) -> Self {
        Self {
            failures: Mutex::new(HashMap::new()),
            window_secs,
            max_failures,
            max_entries: max_entries.max(1),
        }
    }

    fn key(client_id: &str, ip: IpAddr) -> (Digest, IpAddr) {
        (digest_of(&[client_id.as_bytes()]), ip)
    }

    /// Whether `client_id` from `ip` must wait at `now`.
    pub fn is_blocked(&self, client_id: &str, ip: IpAddr, now: u64) -> bool {
        let failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        failures
            .get(&Self::key(client_id, ip))
            .is_some_and(|(start, count)| {
                now < start + self.window_secs && *count >= self.max_failures
            })
    }

    /// Records a failure.
    pub fn record_failure(&self, client_id: &str, ip: IpAddr, now: u64) {
        let key = Self::key(client_id, ip);
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        if !failures.contains_key(&key) && failures.len() >= self.max_entries {
            let (window, max_failures) = (self.window_secs, self.max_failures);
            failures.retain(|_, (start, _)| now < *start + window);
            if failures.len() >= self.max_entries {
                failures.retain(|_, (_, count)| *count >= max_failures);
            }
            if failures.len() >= self.max_entries {
                return;
            }
        }
        let entry = failures.entry(key).or_insert((now, 0));
        if now >= entry.0 + self.window_secs {
            *entry = (now, 0);
        }
        entry.1 = entry.1.saturating_add(1);
    }

    /// Forgets failures after a success.
    pub fn record_success(&self, client_id: &str, ip: IpAddr) {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        failures.remove(&Self::key(client_id, ip));
    }

    /// Pairs tracked now.
    pub fn len(&self) -> usize {
        self.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .len()
    }

    /// Whether no pair is tracked.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes the table's allocation takes now (entries and control bytes).
    #[cfg(test)]
    fn table_bytes(&self) -> usize {
        let failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        // hashbrown keeps capacity at 7/8 of its buckets, each an entry and a control byte.
        let buckets = (failures.capacity() * 8).div_ceil(7).next_power_of_two();
        buckets * (std::mem::size_of::<((Digest, IpAddr), (u64, u32))>() + 1)
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
    fn over_long_client_ids_are_refused_before_anything_is_looked_up() {
        let long = "k".repeat(64 * 1024);
        let too_long = |result: Result<Presented, OAuthError>| {
            let error = result.unwrap_err();
            assert_eq!(
                (error.code, error.description.as_str()),
                (ErrorCode::InvalidClient, "client_id is too long")
            );
        };
        too_long(presented(Some(&basic(&long, "s")), &Params::new()));
        let just_over = "k".repeat(MAX_CLIENT_ID_BYTES + 1);
        too_long(presented(
            None,
            &mk_params(&[("client_id", &just_over), ("client_secret", "s")]),
        ));
        // The claimed subject of an (unverified) assertion counts as well.
        let assertion = format!(
            "{}.{}.sig",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(br#"{"alg":"ES256"}"#),
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .encode(format!(r#"{{"sub":"{just_over}"}}"#))
        );
        too_long(presented(
            None,
            &mk_params(&[
                ("client_assertion_type", JWT_BEARER_ASSERTION),
                ("client_assertion", &assertion),
            ]),
        ));
        let longest = "k".repeat(MAX_CLIENT_ID_BYTES);
        assert!(presented(Some(&basic(&longest, "s")), &Params::new()).is_ok());
    }

    #[test]
    fn the_throttle_table_stays_small_whatever_is_sent() {
        let throttle = Throttle::default();
        let attacker: IpAddr = "10.0.0.66".parse().unwrap();
        let owner: IpAddr = "10.0.0.7".parse().unwrap();
        for _ in 0..20 {
            throttle.record_failure("kgc_1", attacker, 0);
        }
        assert!(throttle.is_blocked("kgc_1", attacker, 1));
        // Five times the cap of distinct pairs, each id as long as allowed and new addresses.
        let id = "k".repeat(MAX_CLIENT_ID_BYTES - 8);
        for i in 0..5 * MAX_THROTTLE_ENTRIES as u32 {
            let ip = IpAddr::from(std::net::Ipv6Addr::from(u128::from(i)));
            throttle.record_failure(&format!("{id}{i:08}"), ip, 1);
            assert!(throttle.len() <= MAX_THROTTLE_ENTRIES);
        }
        assert!(
            throttle.table_bytes() <= 1024 * 1024,
            "{} bytes",
            throttle.table_bytes()
        );
        // A block in force survives the flood; the owner elsewhere is still free.
        assert!(throttle.is_blocked("kgc_1", attacker, 2));
        assert!(!throttle.is_blocked("kgc_1", owner, 2));
        // Once the window has passed, new pairs are tracked again.
        throttle.record_failure("kgc_2", attacker, 120);
        assert!(throttle.len() <= MAX_THROTTLE_ENTRIES);
        for _ in 1..20 {
            throttle.record_failure("kgc_2", attacker, 120);
        }
        assert!(throttle.is_blocked("kgc_2", attacker, 121));
    }

    #[test]
    fn the_replay_cache_is_bounded_per_client_and_overall() {
        let cache = ReplayCache::default();
        let long_jti = "j".repeat(16 * 1024);
        assert!(cache.first_use("greedy", &long_jti, 100, 0));
        assert!(!cache.first_use("greedy", &long_jti, 100, 1));
        for i in 1..MAX_REMEMBERED_ASSERTIONS_PER_CLIENT {
            assert!(cache.first_use("greedy", &format!("{long_jti}{i}"), 100, 1));
        }
        assert_eq!(cache.len(), MAX_REMEMBERED_ASSERTIONS_PER_CLIENT);
        // One client's quota is used up; others are not affected.
        assert!(!cache.first_use("greedy", "one-more", 100, 1));
        assert!(cache.first_use("modest", "j", 100, 1));
        // Once its assertions expire, the client may go on.
        assert!(cache.first_use("greedy", "one-more", 200, 100));
        assert!(cache.len() <= 2);
        // Overall: at most the global cap, then fail closed until ids expire.
        let cache = ReplayCache::default();
        let clients = MAX_REMEMBERED_ASSERTIONS / MAX_REMEMBERED_ASSERTIONS_PER_CLIENT;
        for c in 0..clients {
            for i in 0..MAX_REMEMBERED_ASSERTIONS_PER_CLIENT {
                assert!(cache.first_use(&format!("c{c}"), &i.to_string(), 100, 0));
            }
        }
        assert_eq!(cache.len(), MAX_REMEMBERED_ASSERTIONS);
        assert!(!cache.first_use("late", "j", 100, 0));
        assert!(cache.first_use("late", "j", 200, 100));
        assert_eq!(cache.len(), 1);
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
