//! Credential checks of the sidecar: keygate access tokens, external issuers' JWTs, key-pair
//! JWTs and API keys, against a loaded policy document. Verified tokens are cached by digest
//! until they expire; revocation is checked on every request, cached or not.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use http::HeaderMap;
use jsonwebtoken::{Algorithm, Validation};
use serde::Deserialize;

use super::clients::ClientStore;
use super::forward::{ForwardError, Identity};
use super::jwks::JwksCache;
use crate::api::ScopeMatching;
use crate::credentials::{
    KeyPairJwtIdentity, SecretDigest, VerifyingKey, jws_algorithm, jwt_error_reason,
    split_keypair_issuer, verify_keypair_jwt,
};
use crate::policy::stream::PolicyDelta;
use crate::policy::{CompiledPolicy, PolicyDocument};
use crate::token::access_token;

/// The longest credential accepted; anything longer is refused before parsing.
pub const MAX_CREDENTIAL_BYTES: usize = 8 * 1024;
/// Most verified tokens remembered per policy generation.
const MAX_CACHED: usize = 10_000;

/// Which kind of credential authenticated a request (the `X-Keygate-Auth-Method` value).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    AccessToken,
    ExternalToken,
    KeyPairJwt,
    ApiKey,
}

impl Method {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::AccessToken => "access_token",
            Self::ExternalToken => "external_token",
            Self::KeyPairJwt => "keypair_jwt",
            Self::ApiKey => "api_key",
        }
    }
}

/// A verified caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub client_id: Arc<str>,
    pub scopes: Arc<[String]>,
    pub method: Method,
    /// The fingerprint of the key that signed a key-pair JWT, for the audit trail.
    key_fingerprint: Option<Arc<str>>,
    /// Fields revocation is checked against.
    jti: Option<Arc<str>>,
    iat: u64,
    exp: Option<u64>,
    /// The `X-Keygate-*` header values for it, made once with the caller (and cached with
    /// it, shared with the cached callers of the same identity); an error if its id or
    /// scopes cannot be carried in a header.
    identity: Result<Arc<Identity>, ForwardError>,
}

impl Caller {
    /// `client_id` holding `scopes`, verified by `method`, with no fingerprint, `jti`, `iat`
    /// or expiry: the verification sets those it knows.
    fn new(client_id: Arc<str>, scopes: Arc<[String]>, method: Method) -> Self {
        let identity = Identity::new(&client_id, &scopes.join(" "), method.as_str()).map(Arc::new);
        Self {
            client_id,
            scopes,
            method,
            key_fingerprint: None,
            jti: None,
            iat: 0,
            exp: None,
            identity,
        }
    }

    /// What the workload is told of the caller.
    pub fn identity(&self) -> Result<&Identity, ForwardError> {
        self.identity.as_deref().map_err(|e| *e)
    }

    /// The `jti` of the token presented, if it has one.
    pub fn jti(&self) -> Option<&str> {
        self.jti.as_deref()
    }

    /// The fingerprint of the key that signed a key-pair JWT.
    pub fn key_fingerprint(&self) -> Option<&str> {
        self.key_fingerprint.as_deref()
    }
}

/// Why a request was not authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthFailure {
    /// No credential at all.
    Missing,
    /// A credential that failed; the reason is short and safe to return.
    Invalid(String),
    /// A genuine credential that no longer counts (its client disabled, the token revoked):
    /// the caller it names, for the audit trail, and the reason.
    Withdrawn {
        caller: Arc<Caller>,
        reason: &'static str,
    },
}

impl AuthFailure {
    /// The short reason, safe to return (empty for a missing credential).
    pub fn reason(&self) -> &str {
        match self {
            Self::Missing => "",
            Self::Invalid(reason) => reason,
            Self::Withdrawn { reason, .. } => reason,
        }
    }

    /// The verified caller of a withdrawn credential.
    pub fn caller(&self) -> Option<&Caller> {
        match self {
            Self::Withdrawn { caller, .. } => Some(caller.as_ref()),
            _ => None,
        }
    }
}

struct ExternalIssuer {
    issuer: String,
    audiences: Vec<String>,
    jwks: Arc<JwksCache>,
}

/// What a policy's rules and issuers compile to: prepared again only when they change.
struct Rules {
    compiled: CompiledPolicy,
    keygate_keys: HashMap<String, VerifyingKey>,
    external: Vec<ExternalIssuer>,
    /// `realm="..."` value: the resource without characters that would break the header.
    realm: String,
}

impl Rules {
    fn prepare(
        document: &PolicyDocument,
        jwks_for: impl Fn(&str) -> Arc<JwksCache>,
    ) -> Result<Self, String> {
        let compiled = CompiledPolicy::compile(&document.spec).map_err(|errors| {
            errors
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join("; ")
        })?;
        let mut keygate_keys = HashMap::new();
        for jwk in &document.keygate.jwks.keys {
            let key = VerifyingKey::from_jwk(jwk).map_err(|e| format!("keygate JWKS: {e}"))?;
            keygate_keys.insert(key.kid.clone(), key);
        }
        let external = document
            .spec
            .issuers
            .iter()
            .map(|i| ExternalIssuer {
                issuer: i.issuer.clone(),
                audiences: if i.audiences.is_empty() {
                    vec![document.resource.clone()]
                } else {
                    i.audiences.clone()
                },
                jwks: jwks_for(&i.jwks_uri),
            })
            .collect();
        Ok(Self {
            compiled,
            keygate_keys,
            external,
            realm: header_safe(&document.resource),
        })
    }
}

/// Where a credential is kept in the [`VerifiedCache`]: its BLAKE3 hash. Nobody can make up a
/// credential that lands on another's entry without a second preimage of BLAKE3, as with the
/// SHA-256 that API keys are looked up by; BLAKE3 costs less on CPUs without SHA
/// instructions, and a cached bearer token, hundreds of bytes, is hashed on every request.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
struct CacheKey([u8; 32]);

impl CacheKey {
    fn of(credential: &str) -> Self {
        Self(*blake3::hash(credential.as_bytes()).as_bytes())
    }
}

/// Verified callers by credential hash. Their scopes and expiry were computed against the
/// policy's rules, keys and clients: a policy with other rules or keys starts an empty cache,
/// and a change to some clients forgets their callers. Revocations and disabled clients are
/// checked on every request, cached or not.
#[derive(Default)]
struct VerifiedCache {
    inner: RwLock<CacheInner>,
}

#[derive(Default)]
struct CacheInner {
    /// Bumped whenever clients change, so that a verification that read a client before the
    /// change does not cache what it found after it.
    generation: u64,
    callers: HashMap<CacheKey, Arc<Caller>>,
    /// The identities of the cached callers, each once: the tokens of one client usually
    /// carry the same one, and a cached caller then keeps a pointer instead of three header
    /// values of its own.
    identities: HashSet<Arc<Identity>>,
}

impl VerifiedCache {
    fn get(&self, key: &CacheKey) -> (Option<Arc<Caller>>, u64) {
        let inner = self.inner.read().unwrap_or_else(|p| p.into_inner());
        (inner.callers.get(key).cloned(), inner.generation)
    }

    /// Caches `caller` under `key` unless clients changed since `generation`, sharing an
    /// identity already cached; returns it ready to use either way.
    fn remember(&self, generation: u64, key: CacheKey, mut caller: Caller) -> Arc<Caller> {
        let mut inner = self.inner.write().unwrap_or_else(|p| p.into_inner());
        if inner.generation != generation {
            return Arc::new(caller);
        }
        if inner.callers.len() >= MAX_CACHED {
            // Bounded memory beats perfect hit rates; the next requests refill it.
            inner.callers.clear();
            inner.identities.clear();
        }
        if let Ok(identity) = &mut caller.identity {
            match inner.identities.get(&**identity) {
                Some(shared) => *identity = shared.clone(),
                None => {
                    inner.identities.insert(identity.clone());
                }
            }
        }
        let caller = Arc::new(caller);
        inner.callers.insert(key, caller.clone());
        caller
    }

    fn forget_clients(&self, ids: &HashSet<&str>) {
        let mut inner = self.inner.write().unwrap_or_else(|p| p.into_inner());
        inner.generation += 1;
        inner
            .callers
            .retain(|_, caller| !ids.contains(&*caller.client_id));
        // Those no cached caller holds any more (a caller in flight may still hold one).
        inner
            .identities
            .retain(|identity| Arc::strong_count(identity) > 1);
    }
}

/// A policy made ready for the hot path.
pub struct LoadedPolicy {
    /// The document in force, without its clients (they are in `clients`).
    pub document: PolicyDocument,
    rules: Arc<Rules>,
    disabled: HashSet<String>,
    /// Shared by the versions of this policy that the stream's changes make, and changed in
    /// place, so that a change costs what it changes and not what the policy holds.
    clients: Arc<RwLock<ClientStore>>,
    cache: Arc<VerifiedCache>,
}

/// Removes characters that cannot appear inside a quoted header parameter.
pub fn header_safe(text: &str) -> String {
    text.chars()
        .filter(|c| *c != '"' && *c != '\\' && !c.is_control())
        .collect()
}

impl LoadedPolicy {
    /// Prepares a whole `document`; `jwks_for` gives the (shared, long-lived) cache of a
    /// `jwksUri`.
    pub fn load(
        mut document: PolicyDocument,
        jwks_for: impl Fn(&str) -> Arc<JwksCache>,
    ) -> Result<Self, String> {
        let mut store = ClientStore::default();
        for client in std::mem::take(&mut document.clients) {
            let encoded = store.encode(&client)?;
            store.upsert(encoded);
        }
        Self::with_clients(document, store, jwks_for)
    }

    /// Prepares `document` (whose clients, if any, are ignored) with the clients `store`.
    pub fn with_clients(
        document: PolicyDocument,
        store: ClientStore,
        jwks_for: impl Fn(&str) -> Arc<JwksCache>,
    ) -> Result<Self, String> {
        let rules = Rules::prepare(&document, jwks_for)?;
        Ok(Self::assemble(
            document,
            Arc::new(rules),
            Arc::new(RwLock::new(store)),
            Arc::default(),
        ))
    }

    /// `document` (a policy file whose clients were left out) with the clients of this
    /// policy.
    pub fn keeping_clients(
        &self,
        document: PolicyDocument,
        jwks_for: impl Fn(&str) -> Arc<JwksCache>,
    ) -> Result<Self, String> {
        let rules = Rules::prepare(&document, jwks_for)?;
        Ok(Self::assemble(
            document,
            Arc::new(rules),
            self.clients.clone(),
            Arc::default(),
        ))
    }

    fn assemble(
        mut document: PolicyDocument,
        rules: Arc<Rules>,
        clients: Arc<RwLock<ClientStore>>,
        cache: Arc<VerifiedCache>,
    ) -> Self {
        document.clients = Vec::new();
        Self {
            disabled: document.disabled_clients.iter().cloned().collect(),
            document,
            rules,
            clients,
            cache,
        }
    }

    /// Applies a change of the policy stream. The clients change in place (this policy sees
    /// them too); everything else comes in the returned policy, to be installed. On error
    /// nothing has changed.
    pub fn apply(
        &self,
        delta: &PolicyDelta,
        jwks_for: impl Fn(&str) -> Arc<JwksCache>,
    ) -> Result<Self, String> {
        let mut document = self.document.clone();
        delta.apply_to_all_but_clients(&mut document);
        let rules = if delta.spec.is_some() || delta.keygate.is_some() {
            Arc::new(Rules::prepare(&document, jwks_for)?)
        } else {
            self.rules.clone()
        };
        if !delta.upsert_clients.is_empty() || !delta.remove_clients.is_empty() {
            let mut store = self.clients.write().unwrap_or_else(|p| p.into_inner());
            let encoded = delta
                .upsert_clients
                .iter()
                .map(|client| store.encode(client))
                .collect::<Result<Vec<_>, _>>()?;
            for id in &delta.remove_clients {
                store.remove(id);
            }
            for client in encoded {
                store.upsert(client);
            }
        }
        let cache = if Arc::ptr_eq(&rules, &self.rules) {
            let changed: HashSet<&str> = delta
                .upsert_clients
                .iter()
                .map(|c| c.client_id.as_str())
                .chain(delta.remove_clients.iter().map(String::as_str))
                .collect();
            if !changed.is_empty() {
                self.cache.forget_clients(&changed);
            }
            self.cache.clone()
        } else {
            Arc::default()
        };
        Ok(Self::assemble(document, rules, self.clients.clone(), cache))
    }

    /// The compiled rules.
    pub fn compiled(&self) -> &CompiledPolicy {
        &self.rules.compiled
    }

    /// The `realm` of this policy's challenges.
    pub fn realm(&self) -> &str {
        &self.rules.realm
    }

    /// The number of clients.
    pub fn client_count(&self) -> usize {
        self.clients().len()
    }

    fn clients(&self) -> std::sync::RwLockReadGuard<'_, ClientStore> {
        self.clients.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Authenticates a request at `now` (Unix seconds). Returns the caller and whether the
    /// answer came from the cache.
    pub async fn authenticate(
        &self,
        headers: &HeaderMap,
        leeway: Duration,
        now: u64,
    ) -> Result<(Arc<Caller>, bool), AuthFailure> {
        let credential = credential(headers)?;
        if credential.len() > MAX_CREDENTIAL_BYTES {
            return Err(AuthFailure::Invalid("credential too large".into()));
        }
        let key = CacheKey::of(credential);
        let (cached, generation) = self.cache.get(&key);
        let (caller, hit) = match cached {
            Some(caller) if caller.exp.is_none_or(|exp| exp + leeway.as_secs() > now) => {
                (caller, true)
            }
            _ => {
                // Boxed: the verification's state (a JWKS fetch included) would otherwise be
                // part of every request's future, and moved with it, cache hits included.
                let caller = Box::pin(self.verify(credential, leeway, now)).await?;
                (self.cache.remember(generation, key, caller), false)
            }
        };
        match self.withdrawn(&caller) {
            Some(reason) => Err(AuthFailure::Withdrawn { caller, reason }),
            None => Ok((caller, hit)),
        }
    }

    /// Why a verified caller no longer counts, if it does not.
    fn withdrawn(&self, caller: &Caller) -> Option<&'static str> {
        if self.disabled.contains(&*caller.client_id) {
            return Some("client disabled");
        }
        let revocations = &self.document.revocations;
        if revocations.is_revoked(caller.jti.as_deref(), &caller.client_id, caller.iat) {
            return Some("token revoked");
        }
        None
    }

    async fn verify(
        &self,
        credential: &str,
        leeway: Duration,
        now: u64,
    ) -> Result<Caller, AuthFailure> {
        let invalid = |reason: &str| AuthFailure::Invalid(reason.to_owned());
        if credential.bytes().filter(|b| *b == b'.').count() != 2 {
            let (entry, not_after) = self
                .clients()
                .api_key(&SecretDigest::of(credential))
                .ok_or_else(|| invalid("unknown API key"))?;
            if not_after.is_some_and(|t| now >= t) {
                return Err(invalid("API key expired"));
            }
            return Ok(Caller {
                // "Revoke every token" concerns tokens, not API keys: an API key is withdrawn
                // by rotating it or disabling the client, both of which change the policy.
                iat: u64::MAX,
                exp: not_after,
                ..Caller::new(
                    entry.client_id.clone(),
                    entry.scopes.clone(),
                    Method::ApiKey,
                )
            });
        }
        #[derive(Deserialize)]
        struct Iss {
            iss: String,
        }
        let iss = jsonwebtoken::dangerous::insecure_decode_claims::<Iss>(credential)
            .map_err(|_| invalid("malformed token"))?
            .iss;
        if iss == self.document.keygate.issuer {
            let claims = access_token::verify(
                credential,
                &self.rules.keygate_keys,
                &self.document.keygate.issuer,
                Some(&self.document.resource),
                leeway,
                now,
            )
            .map_err(|e| AuthFailure::Invalid(e.0))?;
            let entry = self
                .clients()
                .client(&claims.client_id)
                .ok_or_else(|| invalid("client has no grant on this API"))?;
            // The token vouches for the scopes its client held when it was issued; the policy
            // says what the client holds now. Only what both allow counts.
            let scopes = effective_scopes(
                claims.scopes(),
                &entry.scopes,
                self.document.spec.scope_matching,
            );
            // A token usually carries every scope its client holds here: share that list
            // instead of keeping a copy per cached token.
            let scopes = if *scopes == *entry.scopes {
                entry.scopes.clone()
            } else {
                scopes.into()
            };
            return Ok(Caller {
                jti: Some(claims.jti.as_str().into()),
                iat: claims.iat,
                exp: Some(claims.exp),
                ..Caller::new(entry.client_id.clone(), scopes, Method::AccessToken)
            });
        }
        if let Some((client_id, fingerprint)) = split_keypair_issuer(&iss) {
            let (entry, der, not_after) = self
                .clients()
                .key(client_id, fingerprint)
                .ok_or_else(|| invalid("unknown key fingerprint"))?;
            if not_after.is_some_and(|t| now >= t) {
                return Err(invalid("key expired"));
            }
            let identity = KeyPairJwtIdentity {
                client_id: client_id.to_owned(),
                fingerprint: fingerprint.to_owned(),
            };
            let aud = audience_claim(credential);
            if aud.as_deref().is_some_and(|a| a != self.document.resource) {
                return Err(invalid("wrong audience"));
            }
            // Parsed now rather than kept parsed: the verified caller is cached, so this
            // happens once per JWT, and a parsed key costs ten times its DER in memory.
            let key = VerifyingKey::from_spki_der(&der).map_err(|_| invalid("unusable key"))?;
            let claims =
                verify_keypair_jwt(credential, &identity, &key, aud.as_deref(), leeway, now)
                    .map_err(|e| {
                        AuthFailure::Invalid(
                            e.to_string()
                                .trim_start_matches("invalid key-pair JWT: ")
                                .to_owned(),
                        )
                    })?;
            return Ok(Caller {
                key_fingerprint: Some(fingerprint.into()),
                iat: claims.iat,
                // A previous key in its overlap stops working at its end, cached or not.
                exp: Some(not_after.map_or(claims.exp, |t| claims.exp.min(t))),
                ..Caller::new(
                    entry.client_id.clone(),
                    entry.scopes.clone(),
                    Method::KeyPairJwt,
                )
            });
        }
        if let Some(external) = self.rules.external.iter().find(|e| e.issuer == iss) {
            return verify_external(credential, external, leeway, now).await;
        }
        Err(invalid("untrusted issuer"))
    }
}

/// The scopes a keygate access token is good for now: its scopes intersected with the scopes
/// its client currently holds on this resource, under the policy's scope matching. A token
/// scope stays when a current scope covers it (so `Exact` is plain set intersection); a token
/// scope that covers narrower current scopes (`orders.*` while the client now holds only
/// `orders.read`) is narrowed to them. Sorted, without duplicates.
fn effective_scopes<'t>(
    token: impl Iterator<Item = &'t str>,
    current: &[String],
    matching: ScopeMatching,
) -> Vec<String> {
    let mut effective = Vec::new();
    for scope in token {
        if current.iter().any(|held| matching.satisfies(held, scope)) {
            effective.push(scope.to_owned());
        } else {
            effective.extend(
                current
                    .iter()
                    .filter(|held| matching.satisfies(scope, held))
                    .cloned(),
            );
        }
    }
    effective.sort_unstable();
    effective.dedup();
    effective
}

/// The `aud` claim of an unverified JWT when it is a single string.
fn audience_claim(token: &str) -> Option<String> {
    #[derive(Deserialize)]
    struct Aud {
        aud: Option<String>,
    }
    jsonwebtoken::dangerous::insecure_decode_claims::<Aud>(token)
        .ok()?
        .aud
}

/// The credential of a request: `Authorization: Bearer <x>` or `X-API-Key: <x>`.
fn credential(headers: &HeaderMap) -> Result<&str, AuthFailure> {
    if let Some(value) = headers.get(http::header::AUTHORIZATION) {
        let value = value
            .to_str()
            .map_err(|_| AuthFailure::Invalid("malformed Authorization header".into()))?;
        let (scheme, token) = value.split_once(' ').unwrap_or((value, ""));
        if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
            return Err(AuthFailure::Invalid(
                "expected Authorization: Bearer".into(),
            ));
        }
        return Ok(token.trim());
    }
    match headers.get("x-api-key") {
        Some(value) => value
            .to_str()
            .map(str::trim)
            .map_err(|_| AuthFailure::Invalid("malformed X-API-Key header".into())),
        None => Err(AuthFailure::Missing),
    }
}

#[derive(Deserialize)]
struct ExternalClaims {
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    client_id: Option<String>,
    #[serde(default)]
    azp: Option<String>,
    #[serde(default)]
    scope: Option<String>,
    #[serde(default)]
    scp: Option<Vec<String>>,
    #[serde(default)]
    iat: Option<u64>,
    exp: u64,
    #[serde(default)]
    jti: Option<String>,
}

async fn verify_external(
    token: &str,
    issuer: &ExternalIssuer,
    leeway: Duration,
    now: u64,
) -> Result<Caller, AuthFailure> {
    let invalid = |reason: &str| AuthFailure::Invalid(reason.to_owned());
    let header = jsonwebtoken::decode_header(token).map_err(|_| invalid("malformed token"))?;
    let kid = header.kid.as_deref().ok_or_else(|| invalid("no kid"))?;
    let key = issuer
        .jwks
        .key(kid)
        .await
        .ok_or_else(|| invalid("unknown kid"))?;
    // The algorithm comes from the key, never from the token: no `none`, no HMAC.
    let alg: Algorithm = jws_algorithm(key.algorithm);
    if header.alg != alg {
        return Err(invalid("algorithm not allowed"));
    }
    let mut validation = Validation::new(alg);
    validation.leeway = leeway.as_secs();
    validation.set_required_spec_claims(&["exp", "iss", "aud"]);
    validation.set_issuer(&[&issuer.issuer]);
    validation.set_audience(&issuer.audiences);
    validation.validate_nbf = true;
    let claims = jsonwebtoken::decode::<ExternalClaims>(token, &key.decoding, &validation)
        .map_err(|e| AuthFailure::Invalid(jwt_error_reason(&e)))?
        .claims;
    access_token::check_times(claims.iat.unwrap_or(0), claims.exp, leeway, now)
        .map_err(|e| AuthFailure::Invalid(e.0))?;
    let client_id = claims
        .client_id
        .or(claims.azp)
        .or(claims.sub)
        .ok_or_else(|| invalid("token names no client"))?;
    let scopes: Vec<String> = match (claims.scope, claims.scp) {
        (Some(scope), _) => scope
            .split(' ')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect(),
        (None, Some(scp)) => scp,
        (None, None) => Vec::new(),
    };
    Ok(Caller {
        jti: claims.jti.map(Into::into),
        iat: claims.iat.unwrap_or(0),
        exp: Some(claims.exp),
        ..Caller::new(client_id.into(), scopes.into(), Method::ExternalToken)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn effective(token: &str, current: &[&str], matching: ScopeMatching) -> Vec<String> {
        let current: Vec<String> = current.iter().map(|s| (*s).to_owned()).collect();
        effective_scopes(token.split(' '), &current, matching)
    }

    #[test]
    fn cached_callers_of_one_identity_share_it() {
        let cache = VerifiedCache::default();
        let scopes: Arc<[String]> = vec!["orders.read".to_owned()].into();
        let caller = |scopes: &Arc<[String]>| {
            Caller::new("kg_reporting".into(), scopes.clone(), Method::AccessToken)
        };
        let shared = |a: &Caller, b: &Caller| {
            Arc::ptr_eq(
                a.identity.as_ref().expect("identity"),
                b.identity.as_ref().expect("identity"),
            )
        };
        let first = cache.remember(0, CacheKey::of("token-1"), caller(&scopes));
        let second = cache.remember(0, CacheKey::of("token-2"), caller(&scopes));
        assert!(shared(&first, &second));
        assert_eq!(first.identity(), second.identity());
        // Other scopes are another identity.
        let other: Arc<[String]> = vec!["orders.write".to_owned()].into();
        let third = cache.remember(0, CacheKey::of("token-3"), caller(&other));
        assert!(!shared(&first, &third));
        // Forgetting the client forgets its identities with its callers.
        drop((first, second, third));
        cache.forget_clients(&HashSet::from(["kg_reporting"]));
        let inner = cache.inner.read().expect("lock");
        assert!(inner.callers.is_empty());
        assert!(inner.identities.is_empty());
    }

    #[test]
    fn token_scopes_are_cut_to_the_current_grant() {
        use ScopeMatching::{Exact, Hierarchic, Wildcard};
        let cases: &[(&str, &[&str], ScopeMatching, &[&str])] = &[
            (
                "orders.read orders.write",
                &["orders.read", "orders.write"],
                Exact,
                &["orders.read", "orders.write"],
            ),
            (
                "orders.read orders.write",
                &["orders.read"],
                Exact,
                &["orders.read"],
            ),
            ("orders.write", &["orders.read"], Exact, &[]),
            (
                "orders.read",
                &["orders.read", "orders.admin"],
                Exact,
                &["orders.read"],
            ),
            // A current grant that covers a token scope keeps it.
            ("orders.read", &["orders"], Hierarchic, &["orders.read"]),
            ("orders.read", &["orders.*"], Wildcard, &["orders.read"]),
            // A token scope that covers a narrower current grant is narrowed to it.
            (
                "orders",
                &["orders.read", "billing.read"],
                Hierarchic,
                &["orders.read"],
            ),
            ("orders.*", &["orders.read"], Wildcard, &["orders.read"]),
            ("orders.*", &["orders:read"], Wildcard, &[]),
            // Exact matching does not read structure into scopes.
            ("orders", &["orders.read"], Exact, &[]),
            ("orders.*", &["orders.read"], Exact, &[]),
        ];
        for (token, current, matching, expected) in cases {
            assert_eq!(
                effective(token, current, *matching),
                *expected,
                "{token} / {current:?} / {matching:?}"
            );
        }
    }
}
