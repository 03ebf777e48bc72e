//! RFC 9068 JWT access tokens: issued by the token server, verified by introspection,
//! revocation and the sidecar.

use std::collections::HashMap;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Header, Validation};
use serde::{Deserialize, Serialize};

use crate::credentials::{self, SigningKey, VerifyingKey, jws_algorithm, jwt_error_reason};

/// The `typ` header of access tokens (RFC 9068 §2.1).
pub const ACCESS_TOKEN_TYP: &str = "at+jwt";

/// The claims of a keygate access token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessClaims {
    pub iss: String,
    pub sub: String,
    pub client_id: String,
    pub aud: String,
    pub scope: String,
    pub iat: u64,
    pub exp: u64,
    pub jti: String,
}

impl AccessClaims {
    /// The scopes as a list.
    pub fn scopes(&self) -> impl Iterator<Item = &str> {
        self.scope.split(' ').filter(|s| !s.is_empty())
    }
}

/// A fresh, unguessable token id: 128 bits from the OS, base64url.
pub fn new_jti() -> credentials::Result<String> {
    Ok(URL_SAFE_NO_PAD.encode(credentials::random_bytes::<16>()?))
}

/// Signs an access token.
pub fn issue(key: &SigningKey, claims: &AccessClaims) -> credentials::Result<String> {
    let mut header = Header::new(jws_algorithm(key.algorithm));
    header.typ = Some(ACCESS_TOKEN_TYP.into());
    key.sign(header, claims)
}

/// Why an access token was not accepted: a short reason safe to return, never its contents.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Rejected(pub String);

/// Verifies a keygate access token: `typ` must be `at+jwt`, `kid` must name one of `keys`,
/// the algorithm must be that key's own (so `none` and HMAC-with-a-public-key never pass),
/// `iss` must be `issuer`, `aud` must be `audience` when given, and `exp`/`nbf`/`iat` must
/// hold at `now` with `leeway`.
pub fn verify(
    token: &str,
    keys: &HashMap<String, VerifyingKey>,
    issuer: &str,
    audience: Option<&str>,
    leeway: Duration,
    now: u64,
) -> Result<AccessClaims, Rejected> {
    let header =
        jsonwebtoken::decode_header(token).map_err(|_| Rejected("malformed token".into()))?;
    if header
        .typ
        .as_deref()
        .map(str::to_ascii_lowercase)
        .as_deref()
        != Some(ACCESS_TOKEN_TYP)
        && header
            .typ
            .as_deref()
            .map(str::to_ascii_lowercase)
            .as_deref()
            != Some("application/at+jwt")
    {
        return Err(Rejected("not an access token (typ)".into()));
    }
    let kid = header
        .kid
        .as_deref()
        .ok_or_else(|| Rejected("no kid".into()))?;
    let key = keys
        .get(kid)
        .ok_or_else(|| Rejected("unknown kid".into()))?;
    if header.alg != jws_algorithm(key.algorithm) {
        return Err(Rejected("algorithm not allowed".into()));
    }
    let mut validation = Validation::new(header.alg);
    validation.leeway = leeway.as_secs();
    validation.set_required_spec_claims(&["exp", "iat", "iss", "aud", "sub"]);
    validation.set_issuer(&[issuer]);
    validation.validate_nbf = true;
    match audience {
        Some(aud) => validation.set_audience(&[aud]),
        None => validation.validate_aud = false,
    }
    let claims = jsonwebtoken::decode::<AccessClaims>(token, &key.decoding, &validation)
        .map_err(|e| Rejected(jwt_error_reason(&e)))?
        .claims;
    check_times(claims.iat, claims.exp, leeway, now)?;
    Ok(claims)
}

/// Checks `exp` and `iat` against the caller's clock (jsonwebtoken uses its own).
pub fn check_times(iat: u64, exp: u64, leeway: Duration, now: u64) -> Result<(), Rejected> {
    if exp + leeway.as_secs() <= now {
        return Err(Rejected("expired".into()));
    }
    if iat > now + leeway.as_secs() {
        return Err(Rejected("issued in the future".into()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::KeyAlgorithm;
    use crate::credentials::{generate_key_pair, unix_now};

    fn mk_key(algorithm: KeyAlgorithm) -> (SigningKey, HashMap<String, VerifyingKey>) {
        let pair = generate_key_pair(algorithm).unwrap();
        let signing = SigningKey::from_pkcs8_pem(&pair.private_pem).unwrap();
        let verifying = VerifyingKey::from_spki_pem(&pair.public_pem).unwrap();
        (signing, HashMap::from([(verifying.kid.clone(), verifying)]))
    }

    fn mk_claims(now: u64) -> AccessClaims {
        AccessClaims {
            iss: "http://issuer".into(),
            sub: "kgc_1".into(),
            client_id: "kgc_1".into(),
            aud: "https://orders".into(),
            scope: "orders.read orders.write".into(),
            iat: now,
            exp: now + 600,
            jti: new_jti().unwrap(),
        }
    }

    #[test]
    fn issued_tokens_verify_for_every_algorithm() {
        for algorithm in [
            KeyAlgorithm::ES256,
            KeyAlgorithm::EdDSA,
            KeyAlgorithm::RS256,
        ] {
            let (key, keys) = mk_key(algorithm);
            let now = unix_now();
            let claims = mk_claims(now);
            let token = issue(&key, &claims).unwrap();
            let header = jsonwebtoken::decode_header(&token).unwrap();
            assert_eq!(header.typ.as_deref(), Some("at+jwt"));
            assert_eq!(header.kid.as_deref(), Some(key.kid.as_str()));
            let got = verify(
                &token,
                &keys,
                "http://issuer",
                Some("https://orders"),
                Duration::ZERO,
                now,
            )
            .unwrap();
            assert_eq!(got, claims);
            assert_eq!(
                got.scopes().collect::<Vec<_>>(),
                ["orders.read", "orders.write"]
            );
        }
    }

    #[test]
    fn wrong_issuer_audience_key_and_time_are_rejected() {
        let (key, keys) = mk_key(KeyAlgorithm::ES256);
        let (_, other_keys) = mk_key(KeyAlgorithm::ES256);
        let now = unix_now();
        let token = issue(&key, &mk_claims(now)).unwrap();
        let check = |keys: &HashMap<String, VerifyingKey>, iss: &str, aud: &str, at: u64| {
            verify(&token, keys, iss, Some(aud), Duration::from_secs(5), at)
                .unwrap_err()
                .0
        };
        assert_eq!(
            check(&keys, "http://other", "https://orders", now),
            "wrong issuer"
        );
        assert_eq!(
            check(&keys, "http://issuer", "https://billing", now),
            "wrong audience"
        );
        assert_eq!(
            check(&other_keys, "http://issuer", "https://orders", now),
            "unknown kid"
        );
        assert_eq!(
            check(&keys, "http://issuer", "https://orders", now + 700),
            "expired"
        );
        assert_eq!(
            check(&keys, "http://issuer", "https://orders", now - 100),
            "issued in the future"
        );
    }

    #[test]
    fn new_jtis_do_not_repeat() {
        assert_ne!(new_jti().unwrap(), new_jti().unwrap());
        assert_eq!(new_jti().unwrap().len(), 22);
    }
}
