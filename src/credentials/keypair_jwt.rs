//! Snowflake-style key-pair JWTs: a client signs a short-lived JWT with its own private key,
//! `iss = <client_id>.SHA256:<fingerprint>`, `sub = <client_id>`, and the verifier finds the
//! public key by that fingerprint. No token server is involved.

use std::time::Duration;

use jsonwebtoken::{Header, Validation};
use serde::{Deserialize, Serialize};

use super::{Error, Result, SigningKey, VerifyingKey, jws_algorithm};

/// The longest lifetime (`exp - iat`) a key-pair JWT may have, as in Snowflake.
pub const MAX_KEYPAIR_JWT_LIFETIME: Duration = Duration::from_secs(3600);

/// The claims of a key-pair JWT.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyPairClaims {
    pub iss: String,
    pub sub: String,
    pub iat: u64,
    pub exp: u64,
    /// Not before (RFC 7519 §4.1.5): optional, enforced with the leeway when present.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
}

/// The `iss` of a key-pair JWT for `client_id` signed by the key with `fingerprint`.
pub fn keypair_issuer(client_id: &str, fingerprint: &str) -> String {
    format!("{client_id}.{fingerprint}")
}

/// Splits a key-pair JWT issuer into client id and `SHA256:` fingerprint.
pub fn split_keypair_issuer(iss: &str) -> Option<(&str, &str)> {
    let at = iss.find(".SHA256:")?;
    let (client_id, fingerprint) = (&iss[..at], &iss[at + 1..]);
    (!client_id.is_empty() && fingerprint.len() > "SHA256:".len())
        .then_some((client_id, fingerprint))
}

/// Signs a key-pair JWT valid from `now` (seconds since the epoch) for `lifetime`, which is
/// capped at [`MAX_KEYPAIR_JWT_LIFETIME`].
pub fn sign_keypair_jwt(
    key: &SigningKey,
    client_id: &str,
    audience: Option<&str>,
    lifetime: Duration,
    now: u64,
) -> Result<String> {
    let lifetime = lifetime.min(MAX_KEYPAIR_JWT_LIFETIME).as_secs();
    let claims = KeyPairClaims {
        iss: keypair_issuer(client_id, &key.fingerprint),
        sub: client_id.to_owned(),
        iat: now,
        exp: now + lifetime,
        nbf: None,
        aud: audience.map(str::to_owned),
    };
    let mut header = Header::new(jws_algorithm(key.algorithm));
    header.typ = Some("JWT".into());
    key.sign(header, &claims)
}

/// Which key a key-pair JWT claims to be signed with, read before its signature is checked.
/// Only for looking the key up: nothing in it is trusted yet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPairJwtIdentity {
    pub client_id: String,
    pub fingerprint: String,
}

/// Reads the claimed client id and fingerprint from an unverified key-pair JWT.
pub fn peek_keypair_identity(token: &str) -> Result<KeyPairJwtIdentity> {
    #[derive(Deserialize)]
    struct Iss {
        iss: String,
    }
    let claims: Iss = jsonwebtoken::dangerous::insecure_decode_claims(token)
        .map_err(|_| Error::InvalidJwt("not a JWT with an iss claim".into()))?;
    let (client_id, fingerprint) = split_keypair_issuer(&claims.iss)
        .ok_or_else(|| Error::InvalidJwt("iss is not <client_id>.SHA256:<fingerprint>".into()))?;
    Ok(KeyPairJwtIdentity {
        client_id: client_id.to_owned(),
        fingerprint: fingerprint.to_owned(),
    })
}

/// Checks a JWT's time claims against the caller's clock `now` (Unix seconds; jsonwebtoken
/// would use its own) with `leeway` for clock skew: not expired (`exp`), not before `nbf`,
/// `iat` not in the future, and neither `iat` nor `nbf` after `exp` (such a token was never
/// meant to be valid). Returns a short reason, safe to show.
pub fn check_jwt_times(
    iat: Option<u64>,
    nbf: Option<u64>,
    exp: u64,
    leeway: Duration,
    now: u64,
) -> std::result::Result<(), &'static str> {
    let leeway = leeway.as_secs();
    if exp.saturating_add(leeway) <= now {
        return Err("expired");
    }
    if iat.is_some_and(|iat| iat > now.saturating_add(leeway)) {
        return Err("issued in the future");
    }
    if nbf.is_some_and(|nbf| nbf > now.saturating_add(leeway)) {
        return Err("not yet valid");
    }
    if iat.is_some_and(|iat| iat > exp) {
        return Err("issued after it expires");
    }
    if nbf.is_some_and(|nbf| nbf > exp) {
        return Err("not valid before it expires");
    }
    Ok(())
}

/// Verifies a key-pair JWT against the key it names: signature with the key's own algorithm
/// only, `iss` naming this key's fingerprint, `sub` equal to the client id, the time claims
/// with `leeway` ([`check_jwt_times`]: `exp`, `nbf` when present, `iat` not in the future and
/// not after `exp`), a lifetime of at most one hour, and `aud` when given.
pub fn verify_keypair_jwt(
    token: &str,
    identity: &KeyPairJwtIdentity,
    key: &VerifyingKey,
    audience: Option<&str>,
    leeway: Duration,
    now: u64,
) -> Result<KeyPairClaims> {
    if key.fingerprint != identity.fingerprint {
        return Err(Error::InvalidJwt(
            "fingerprint does not name this key".into(),
        ));
    }
    let header = jsonwebtoken::decode_header(token)
        .map_err(|_| Error::InvalidJwt("malformed header".into()))?;
    if header.alg != jws_algorithm(key.algorithm) {
        return Err(Error::InvalidJwt(format!(
            "algorithm {:?} does not match the client's {} key",
            header.alg, key.algorithm
        )));
    }
    let mut validation = Validation::new(header.alg);
    validation.leeway = leeway.as_secs();
    validation.set_required_spec_claims(&["exp", "iat", "iss", "sub"]);
    validation.set_issuer(&[keypair_issuer(&identity.client_id, &identity.fingerprint)]);
    validation.sub = Some(identity.client_id.clone());
    match audience {
        Some(aud) => validation.set_audience(&[aud]),
        None => validation.validate_aud = false,
    }
    let data = jsonwebtoken::decode::<KeyPairClaims>(token, &key.decoding, &validation)
        .map_err(|e| Error::InvalidJwt(jwt_error_reason(&e)))?;
    let claims = data.claims;
    // jsonwebtoken checks `exp` against its own clock (and `nbf` not at all unless asked);
    // check every time claim against ours so that callers (and tests) control time.
    check_jwt_times(Some(claims.iat), claims.nbf, claims.exp, leeway, now)
        .map_err(|reason| Error::InvalidJwt(reason.into()))?;
    if claims.exp - claims.iat > MAX_KEYPAIR_JWT_LIFETIME.as_secs() {
        return Err(Error::InvalidJwt("lifetime exceeds one hour".into()));
    }
    Ok(claims)
}

/// A short reason for a failed JWT check, safe to show: never token contents.
pub fn jwt_error_reason(error: &jsonwebtoken::errors::Error) -> String {
    use jsonwebtoken::errors::ErrorKind;
    match error.kind() {
        ErrorKind::ExpiredSignature => "expired".into(),
        ErrorKind::ImmatureSignature => "not yet valid".into(),
        ErrorKind::InvalidSignature => "bad signature".into(),
        ErrorKind::InvalidIssuer => "wrong issuer".into(),
        ErrorKind::InvalidAudience => "wrong audience".into(),
        ErrorKind::InvalidSubject => "wrong subject".into(),
        ErrorKind::InvalidAlgorithm => "algorithm not allowed".into(),
        ErrorKind::MissingRequiredClaim(claim) => format!("missing claim {claim}"),
        ErrorKind::InvalidToken
        | ErrorKind::Base64(_)
        | ErrorKind::Json(_)
        | ErrorKind::Utf8(_) => "malformed token".into(),
        _ => "invalid token".into(),
    }
}

/// Seconds since the Unix epoch, the JWT time unit.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::KeyAlgorithm;
    use crate::credentials::generate_key_pair;
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;

    const CLIENT: &str = "kgc_0123456789abcdef0123456789abcdef";
    const NOW: u64 = 1_800_000_000;
    const LEEWAY: Duration = Duration::from_secs(30);

    fn keys(algorithm: KeyAlgorithm) -> (SigningKey, VerifyingKey) {
        let pair = generate_key_pair(algorithm).unwrap();
        (
            SigningKey::from_pkcs8_pem(&pair.private_pem).unwrap(),
            VerifyingKey::from_spki_pem(&pair.public_pem).unwrap(),
        )
    }

    fn verify(
        token: &str,
        key: &VerifyingKey,
        aud: Option<&str>,
        now: u64,
    ) -> Result<KeyPairClaims> {
        let identity = peek_keypair_identity(token)?;
        verify_keypair_jwt(token, &identity, key, aud, LEEWAY, now)
    }

    #[test]
    fn signed_jwt_verifies_for_every_algorithm() {
        for algorithm in [
            KeyAlgorithm::ES256,
            KeyAlgorithm::EdDSA,
            KeyAlgorithm::RS256,
        ] {
            let (signing, verifying) = keys(algorithm);
            let token = sign_keypair_jwt(
                &signing,
                CLIENT,
                Some("https://orders"),
                Duration::from_secs(600),
                NOW,
            )
            .unwrap();
            let claims = verify(&token, &verifying, Some("https://orders"), NOW + 10).unwrap();
            assert_eq!(claims.sub, CLIENT);
            assert_eq!(claims.iss, format!("{CLIENT}.{}", verifying.fingerprint));
            assert_eq!(claims.exp - claims.iat, 600);
        }
    }

    #[test]
    fn lifetime_is_capped_at_one_hour() {
        let (signing, verifying) = keys(KeyAlgorithm::ES256);
        let token =
            sign_keypair_jwt(&signing, CLIENT, None, Duration::from_secs(86_400), NOW).unwrap();
        let claims = verify(&token, &verifying, None, NOW).unwrap();
        assert_eq!(claims.exp - claims.iat, 3600);
    }

    #[test]
    fn tampered_jwt_is_rejected() {
        let (signing, verifying) = keys(KeyAlgorithm::ES256);
        let token = sign_keypair_jwt(&signing, CLIENT, None, Duration::from_secs(60), NOW).unwrap();
        let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
        let mut claims: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(&parts[1]).unwrap()).unwrap();
        claims["exp"] = serde_json::json!(NOW + 7200);
        claims["iat"] = serde_json::json!(NOW + 3600);
        parts[1] = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&claims).unwrap());
        let err = verify(&parts.join("."), &verifying, None, NOW).unwrap_err();
        assert!(err.to_string().contains("bad signature"), "{err}");
    }

    #[test]
    fn jwt_signed_by_another_key_is_rejected() {
        let (signing, _) = keys(KeyAlgorithm::ES256);
        let (_, other) = keys(KeyAlgorithm::ES256);
        let token = sign_keypair_jwt(&signing, CLIENT, None, Duration::from_secs(60), NOW).unwrap();
        let identity = peek_keypair_identity(&token).unwrap();
        let err = verify_keypair_jwt(&token, &identity, &other, None, LEEWAY, NOW).unwrap_err();
        assert!(err.to_string().contains("fingerprint"), "{err}");
    }

    #[test]
    fn expired_future_and_wrong_audience_are_rejected() {
        let (signing, verifying) = keys(KeyAlgorithm::EdDSA);
        let now = unix_now();
        let token = sign_keypair_jwt(
            &signing,
            CLIENT,
            Some("https://a"),
            Duration::from_secs(60),
            now,
        )
        .unwrap();
        assert!(
            verify(&token, &verifying, Some("https://b"), now)
                .unwrap_err()
                .to_string()
                .contains("audience")
        );
        assert!(
            verify(&token, &verifying, Some("https://a"), now + 3600)
                .unwrap_err()
                .to_string()
                .contains("expired")
        );
        let future =
            sign_keypair_jwt(&signing, CLIENT, None, Duration::from_secs(60), now + 600).unwrap();
        assert!(
            verify(&future, &verifying, None, now)
                .unwrap_err()
                .to_string()
                .contains("future")
        );
    }

    #[test]
    fn nbf_and_time_order_are_enforced() {
        let (signing, verifying) = keys(KeyAlgorithm::ES256);
        let iss = keypair_issuer(CLIENT, &verifying.fingerprint);
        let token = |iat: u64, nbf: Option<u64>, exp: u64| {
            let claims = KeyPairClaims {
                iss: iss.clone(),
                sub: CLIENT.into(),
                iat,
                exp,
                nbf,
                aud: None,
            };
            signing
                .sign(Header::new(jws_algorithm(signing.algorithm)), &claims)
                .unwrap()
        };
        let three_years = 3 * 365 * 86_400;
        let refused = [
            (
                token(NOW, Some(NOW + three_years), NOW + 600),
                "not yet valid",
            ),
            (token(NOW, Some(NOW + 31), NOW + 600), "not yet valid"),
            (token(NOW + 20, None, NOW + 10), "issued after it expires"),
            (
                token(NOW, Some(NOW + 20), NOW + 10),
                "not valid before it expires",
            ),
        ];
        for (jwt, reason) in refused {
            let err = verify(&jwt, &verifying, None, NOW).unwrap_err();
            assert!(err.to_string().ends_with(reason), "{err} / {reason}");
        }
        for nbf in [NOW - 600, NOW, NOW + 30] {
            verify(&token(NOW, Some(nbf), NOW + 600), &verifying, None, NOW).unwrap();
        }
        // The check works on the caller's clock, not the system's.
        let future = token(NOW, Some(NOW + 300), NOW + 600);
        assert!(verify(&future, &verifying, None, NOW).is_err());
        verify(&future, &verifying, None, NOW + 300).unwrap();
    }

    #[test]
    fn time_checks() {
        let l = LEEWAY;
        assert_eq!(check_jwt_times(Some(NOW), None, NOW + 60, l, NOW), Ok(()));
        assert_eq!(check_jwt_times(None, None, NOW + 60, l, NOW), Ok(()));
        assert_eq!(
            check_jwt_times(None, None, NOW - 30, l, NOW),
            Err("expired")
        );
        assert_eq!(check_jwt_times(None, None, NOW - 29, l, NOW), Ok(()));
        assert_eq!(
            check_jwt_times(Some(NOW + 31), None, NOW + 60, l, NOW),
            Err("issued in the future")
        );
        assert_eq!(
            check_jwt_times(None, Some(NOW + 31), NOW + 60, l, NOW),
            Err("not yet valid")
        );
        assert_eq!(
            check_jwt_times(None, Some(NOW + 30), NOW + 60, l, NOW),
            Ok(())
        );
        assert_eq!(
            check_jwt_times(Some(NOW + 1), None, NOW, l, NOW),
            Err("issued after it expires")
        );
        assert_eq!(
            check_jwt_times(None, Some(NOW + 1), NOW, l, NOW),
            Err("not valid before it expires")
        );
        assert_eq!(
            check_jwt_times(Some(u64::MAX), Some(u64::MAX), u64::MAX, l, NOW),
            Err("issued in the future")
        );
    }

    #[test]
    fn issuer_parsing() {
        assert_eq!(
            split_keypair_issuer("kgc_1.SHA256:abc="),
            Some(("kgc_1", "SHA256:abc="))
        );
        assert_eq!(split_keypair_issuer("kgc_1"), None);
        assert_eq!(split_keypair_issuer(".SHA256:abc"), None);
        assert_eq!(split_keypair_issuer("kgc_1.SHA256:"), None);
    }
}
