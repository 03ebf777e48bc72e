use std::sync::Arc;

use aws_lc_rs::digest::{SHA256, digest};
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair, RSA_PKCS1_SHA256, RsaKeyPair,
};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use jsonwebtoken::jwk::{Jwk, PublicKeyUse, ThumbprintHash};
use jsonwebtoken::{Algorithm, DecodingKey};
use rcgen::{KeyPair, PKCS_ECDSA_P256_SHA256, PKCS_ED25519, PKCS_RSA_SHA256, PublicKeyData};
use spki::SubjectPublicKeyInfoRef;
use spki::der::Decode;

use super::{Error, Result};
use crate::api::KeyAlgorithm;

const OID_EC_PUBLIC_KEY: &str = "1.2.840.10045.2.1";
const OID_P256: &str = "1.2.840.10045.3.1.7";
const OID_ED25519: &str = "1.3.101.112";
const OID_RSA: &str = "1.2.840.113549.1.1.1";
/// The smallest RSA modulus keygate accepts, in bits.
const MIN_RSA_BITS: usize = 2048;

/// A freshly generated key pair as PEM text: PKCS#8 private key, SPKI public key.
#[derive(Clone)]
pub struct KeyPairPem {
    pub algorithm: KeyAlgorithm,
    pub private_pem: String,
    pub public_pem: String,
    pub fingerprint: String,
}

impl std::fmt::Debug for KeyPairPem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyPairPem")
            .field("algorithm", &self.algorithm)
            .field("fingerprint", &self.fingerprint)
            .finish_non_exhaustive()
    }
}

/// Generates a key pair: P-256 for ES256, Ed25519 for EdDSA, 2048-bit RSA for RS256.
pub fn generate_key_pair(algorithm: KeyAlgorithm) -> Result<KeyPairPem> {
    let pair = match algorithm {
        KeyAlgorithm::ES256 => KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256),
        KeyAlgorithm::EdDSA => KeyPair::generate_for(&PKCS_ED25519),
        KeyAlgorithm::RS256 => KeyPair::generate_for(&PKCS_RSA_SHA256),
    }
    .map_err(|e| Error::Generate(e.to_string()))?;
    let spki = pair.subject_public_key_info();
    Ok(KeyPairPem {
        algorithm,
        private_pem: pair.serialize_pem(),
        public_pem: pair.public_key_pem(),
        fingerprint: fingerprint_spki_der(&spki),
    })
}

/// The fingerprint Snowflake shows as `RSA_PUBLIC_KEY_FP`: `SHA256:` followed by the standard
/// base64 of the SHA-256 of the DER SubjectPublicKeyInfo.
pub fn fingerprint_spki_der(spki_der: &[u8]) -> String {
    format!(
        "SHA256:{}",
        STANDARD.encode(digest(&SHA256, spki_der).as_ref())
    )
}

/// The fingerprint of a PEM key: a `PUBLIC KEY` (SPKI) or a PKCS#8 `PRIVATE KEY`, whose
/// public half is fingerprinted.
pub fn fingerprint_pem(pem_text: &str) -> Result<String> {
    let block = pem::parse(pem_text).map_err(|e| Error::Pem(e.to_string()))?;
    match block.tag() {
        "PUBLIC KEY" => {
            spki_algorithm(block.contents())?;
            Ok(fingerprint_spki_der(block.contents()))
        }
        "PRIVATE KEY" => Ok(SigningKey::from_pkcs8_pem(pem_text)?.fingerprint),
        other => Err(other_key_format(
            other,
            "a PUBLIC KEY (SubjectPublicKeyInfo) or a PKCS#8 PRIVATE KEY",
        )),
    }
}

/// The DER SubjectPublicKeyInfo inside an SPKI (`PUBLIC KEY`) PEM, and its algorithm, refusing
/// any other block and keys keygate does not use.
pub fn spki_der_from_pem(pem_text: &str) -> Result<(KeyAlgorithm, Vec<u8>)> {
    let block = pem::parse(pem_text).map_err(|e| Error::Pem(e.to_string()))?;
    if block.tag() != "PUBLIC KEY" {
        return Err(other_key_format(
            block.tag(),
            "a PUBLIC KEY (SubjectPublicKeyInfo)",
        ));
    }
    let algorithm = spki_algorithm(block.contents())?;
    Ok((algorithm, block.into_contents()))
}

/// The error for a PEM block tagged `tag` where keygate reads `wanted`: what the block is
/// and, for the formats openssl writes, the openssl command that converts it.
fn other_key_format(tag: &str, wanted: &str) -> Error {
    const TO_PKCS8: &str = "openssl pkcs8 -topk8 -nocrypt -in key.pem -out private_key.pem";
    let (what, convert) = match tag {
        "RSA PUBLIC KEY" => (
            "a PKCS#1 RSA public key",
            "openssl rsa -RSAPublicKey_in -in key.pem -pubout -out public_key.pem",
        ),
        "RSA PRIVATE KEY" => ("a PKCS#1 RSA private key", TO_PKCS8),
        "EC PRIVATE KEY" => ("a SEC1 EC private key", TO_PKCS8),
        "ENCRYPTED PRIVATE KEY" => (
            "an encrypted PKCS#8 private key",
            "openssl pkcs8 -in key.pem -out private_key.pem",
        ),
        "CERTIFICATE" => (
            "a certificate",
            "openssl x509 -in key.pem -pubkey -noout > public_key.pem",
        ),
        other => {
            return Error::KeyFormat(format!("a PEM {other:?} block, but keygate reads {wanted}"));
        }
    };
    Error::KeyFormat(format!(
        "{what} (-----BEGIN {tag}-----), but keygate reads {wanted}; convert it with: {convert}"
    ))
}

/// The algorithm of a DER SubjectPublicKeyInfo, refusing curves and sizes keygate does not use.
fn spki_algorithm(spki_der: &[u8]) -> Result<KeyAlgorithm> {
    let info = SubjectPublicKeyInfoRef::from_der(spki_der)
        .map_err(|e| Error::UnsupportedKey(format!("not a SubjectPublicKeyInfo: {e}")))?;
    let oid = info.algorithm.oid.to_string();
    match oid.as_str() {
        OID_ED25519 => Ok(KeyAlgorithm::EdDSA),
        OID_EC_PUBLIC_KEY => {
            let curve = info
                .algorithm
                .parameters_oid()
                .map_err(|_| Error::UnsupportedKey("EC key without a named curve".into()))?;
            if curve.to_string() == OID_P256 {
                Ok(KeyAlgorithm::ES256)
            } else {
                Err(Error::UnsupportedKey(format!(
                    "EC curve {curve} (only P-256 is supported)"
                )))
            }
        }
        OID_RSA => {
            // The key is a DER RSAPublicKey; its modulus length bounds the key size from
            // above by a few bytes of encoding, so compare on the raw length conservatively.
            let raw = info.subject_public_key.raw_bytes();
            if raw.len() * 8 < MIN_RSA_BITS {
                return Err(Error::UnsupportedKey(format!(
                    "RSA keys must have at least {MIN_RSA_BITS} bits"
                )));
            }
            Ok(KeyAlgorithm::RS256)
        }
        other => Err(Error::UnsupportedKey(format!("key algorithm {other}"))),
    }
}

/// The JWS algorithm for a keygate key algorithm.
pub fn jws_algorithm(algorithm: KeyAlgorithm) -> Algorithm {
    match algorithm {
        KeyAlgorithm::ES256 => Algorithm::ES256,
        KeyAlgorithm::EdDSA => Algorithm::EdDSA,
        KeyAlgorithm::RS256 => Algorithm::RS256,
    }
}

/// A private key parsed once, ready to sign many JWTs.
#[derive(Clone)]
pub struct SigningKey {
    pub algorithm: KeyAlgorithm,
    /// RFC 7638 thumbprint of the public key, used as `kid`.
    pub kid: String,
    /// `SHA256:` fingerprint of the public key.
    pub fingerprint: String,
    /// The public key as a JWK with `kid`, `alg` and `use: sig`.
    pub jwk: Jwk,
    /// The public key as SPKI PEM.
    pub public_pem: String,
    signer: Arc<JwsSigner>,
}

/// A private key parsed once into aws-lc-rs, signing JWS signing inputs. jsonwebtoken's
/// `encode` parses and checks the PKCS#8 key again for every token (a third of the
/// instructions of a token request), so keygate signs with this instead and writes the
/// compact serialization itself (RFC 7515 §7.1); jsonwebtoken still verifies.
enum JwsSigner {
    /// P-256; signatures in the fixed `r || s` form JWS uses (RFC 7518 §3.4).
    Es256(EcdsaKeyPair),
    Ed25519(Ed25519KeyPair),
    Rs256(RsaKeyPair),
}

impl JwsSigner {
    fn from_pkcs8(algorithm: KeyAlgorithm, der: &[u8]) -> Result<Self> {
        let unsupported = |e: aws_lc_rs::error::KeyRejected| Error::UnsupportedKey(e.to_string());
        Ok(match algorithm {
            KeyAlgorithm::ES256 => Self::Es256(
                EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der)
                    .map_err(unsupported)?,
            ),
            KeyAlgorithm::EdDSA => {
                Self::Ed25519(Ed25519KeyPair::from_pkcs8_maybe_unchecked(der).map_err(unsupported)?)
            }
            KeyAlgorithm::RS256 => Self::Rs256(RsaKeyPair::from_pkcs8(der).map_err(unsupported)?),
        })
    }

    fn sign(&self, message: &[u8]) -> Result<Vec<u8>> {
        let failed = |_| Error::Sign("the signature could not be made".into());
        match self {
            Self::Es256(pair) => Ok(pair
                .sign(&SystemRandom::new(), message)
                .map_err(failed)?
                .as_ref()
                .to_vec()),
            Self::Ed25519(pair) => Ok(pair.sign(message).as_ref().to_vec()),
            Self::Rs256(pair) => {
                let mut signature = vec![0; pair.public_modulus_len()];
                pair.sign(
                    &RSA_PKCS1_SHA256,
                    &SystemRandom::new(),
                    message,
                    &mut signature,
                )
                .map_err(failed)?;
                Ok(signature)
            }
        }
    }
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey")
            .field("algorithm", &self.algorithm)
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl SigningKey {
    /// Parses a PKCS#8 PEM private key of a supported algorithm.
    pub fn from_pkcs8_pem(pem_text: &str) -> Result<Self> {
        let pair = KeyPair::from_pem(pem_text).map_err(|e| {
            match pem::parse(pem_text).map(|block| block.tag().to_owned()) {
                Ok(tag) if tag != "PRIVATE KEY" => other_key_format(&tag, "a PKCS#8 PRIVATE KEY"),
                _ => Error::UnsupportedKey(format!("not a PKCS#8 ES256, EdDSA or RS256 key: {e}")),
            }
        })?;
        let algorithm = if pair.algorithm() == &PKCS_ECDSA_P256_SHA256 {
            KeyAlgorithm::ES256
        } else if pair.algorithm() == &PKCS_ED25519 {
            KeyAlgorithm::EdDSA
        } else if pair.algorithm() == &PKCS_RSA_SHA256 {
            KeyAlgorithm::RS256
        } else {
            return Err(Error::UnsupportedKey(
                "only P-256, Ed25519 and RSA keys are supported".into(),
            ));
        };
        let spki = pair.subject_public_key_info();
        spki_algorithm(&spki)?;
        let signer = JwsSigner::from_pkcs8(algorithm, &pair.serialize_der())?;
        let public_pem = pair.public_key_pem();
        let verifying = VerifyingKey::from_spki_pem(&public_pem)?;
        Ok(Self {
            algorithm,
            kid: verifying.kid,
            fingerprint: verifying.fingerprint,
            jwk: verifying.jwk,
            public_pem,
            signer: Arc::new(signer),
        })
    }

    /// Signs `claims` with `header` (whose `alg` and `kid` this key sets).
    pub fn sign<T: serde::Serialize>(
        &self,
        mut header: jsonwebtoken::Header,
        claims: &T,
    ) -> Result<String> {
        header.alg = jws_algorithm(self.algorithm);
        header.kid = Some(self.kid.clone());
        let serialized = |e: serde_json::Error| Error::Sign(e.to_string());
        let mut token = String::with_capacity(512);
        URL_SAFE_NO_PAD.encode_string(serde_json::to_vec(&header).map_err(serialized)?, &mut token);
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(serde_json::to_vec(claims).map_err(serialized)?, &mut token);
        let signature = self.signer.sign(token.as_bytes())?;
        token.push('.');
        URL_SAFE_NO_PAD.encode_string(signature, &mut token);
        Ok(token)
    }
}

/// A public key parsed once, ready to verify many JWTs.
#[derive(Clone)]
pub struct VerifyingKey {
    pub algorithm: KeyAlgorithm,
    /// RFC 7638 thumbprint, the `kid` keygate publishes it under.
    pub kid: String,
    /// `SHA256:` fingerprint of the SPKI.
    pub fingerprint: String,
    /// The key as a JWK with `kid`, `alg` and `use: sig`.
    pub jwk: Jwk,
    /// SPKI PEM, when the key came from PEM (empty for keys read from a JWKS).
    pub public_pem: String,
    pub decoding: DecodingKey,
}

impl std::fmt::Debug for VerifyingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerifyingKey")
            .field("algorithm", &self.algorithm)
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

impl VerifyingKey {
    /// Parses an SPKI (`PUBLIC KEY`) PEM of a supported algorithm.
    pub fn from_spki_pem(pem_text: &str) -> Result<Self> {
        let (algorithm, der) = spki_der_from_pem(pem_text)?;
        let pem_bytes = pem_text.as_bytes();
        let decoding = match algorithm {
            KeyAlgorithm::ES256 => DecodingKey::from_ec_pem(pem_bytes),
            KeyAlgorithm::EdDSA => DecodingKey::from_ed_pem(pem_bytes),
            KeyAlgorithm::RS256 => DecodingKey::from_rsa_pem(pem_bytes),
        }
        .map_err(|e| Error::UnsupportedKey(e.to_string()))?;
        let mut jwk = Jwk::from_decoding_key(&decoding, Some(jws_algorithm(algorithm)))
            .map_err(|e| Error::UnsupportedKey(e.to_string()))?;
        let kid = jwk_thumbprint(&jwk)?;
        jwk.common.key_id = Some(kid.clone());
        jwk.common.public_key_use = Some(PublicKeyUse::Signature);
        Ok(Self {
            algorithm,
            kid,
            fingerprint: fingerprint_spki_der(&der),
            jwk,
            public_pem: pem_text.to_owned(),
            decoding,
        })
    }

    /// Parses a DER SubjectPublicKeyInfo of a supported algorithm (a key kept compactly and
    /// parsed when it is needed).
    pub fn from_spki_der(der: &[u8]) -> Result<Self> {
        Self::from_spki_pem(&pem::encode(&pem::Pem::new("PUBLIC KEY", der)))
    }

    /// Builds a verifying key from a JWK (from a JWKS), using the JWK's `alg` or, when it
    /// has none, the one its key type implies. `kid` is taken from the JWK.
    pub fn from_jwk(jwk: &Jwk) -> Result<Self> {
        use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve};
        let algorithm = match &jwk.algorithm {
            AlgorithmParameters::EllipticCurve(p) if p.curve == EllipticCurve::P256 => {
                KeyAlgorithm::ES256
            }
            AlgorithmParameters::OctetKeyPair(p) if p.curve == EllipticCurve::Ed25519 => {
                KeyAlgorithm::EdDSA
            }
            AlgorithmParameters::RSA(_) => KeyAlgorithm::RS256,
            _ => {
                return Err(Error::UnsupportedKey(
                    "JWK is not a P-256, Ed25519 or RSA public key".into(),
                ));
            }
        };
        if let Some(declared) = jwk.common.key_algorithm {
            let expected = jsonwebtoken::jwk::KeyAlgorithm::from(jws_algorithm(algorithm));
            if declared != expected {
                return Err(Error::UnsupportedKey(format!(
                    "JWK alg {declared:?} does not fit its key type"
                )));
            }
        }
        let decoding =
            DecodingKey::from_jwk(jwk).map_err(|e| Error::UnsupportedKey(e.to_string()))?;
        let kid = match &jwk.common.key_id {
            Some(kid) => kid.clone(),
            None => jwk_thumbprint(jwk)?,
        };
        Ok(Self {
            algorithm,
            kid,
            fingerprint: String::new(),
            jwk: jwk.clone(),
            public_pem: String::new(),
            decoding,
        })
    }
}

/// The RFC 7638 SHA-256 thumbprint of a public JWK, base64url.
pub fn jwk_thumbprint(jwk: &Jwk) -> Result<String> {
    jwk.thumbprint(ThumbprintHash::SHA256)
        .map_err(|e| Error::UnsupportedKey(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fixed P-256 key, generated once with `openssl genpkey -algorithm EC
    /// -pkeyopt ec_paramgen_curve:P-256`.
    pub(crate) const FIXED_EC_PRIVATE: &str = include_str!("testdata/ec_p256_private.pem");
    /// Its public half, `openssl pkey -pubout`.
    const FIXED_EC_PUBLIC: &str = include_str!("testdata/ec_p256_public.pem");
    /// `openssl pkey -in ec_p256_private.pem -pubout -outform DER | openssl dgst -sha256
    /// -binary | base64`, computed when the test was written.
    const FIXED_EC_FINGERPRINT: &str = include_str!("testdata/ec_p256_fingerprint.txt");
    /// A fixed 2048-bit RSA key and its openssl-computed fingerprint, as above.
    const FIXED_RSA_PRIVATE: &str = include_str!("testdata/rsa_2048_private.pem");
    const FIXED_RSA_FINGERPRINT: &str = include_str!("testdata/rsa_2048_fingerprint.txt");
    /// A fixed Ed25519 key and its openssl-computed fingerprint, as above.
    const FIXED_ED_PRIVATE: &str = include_str!("testdata/ed25519_private.pem");
    const FIXED_ED_FINGERPRINT: &str = include_str!("testdata/ed25519_fingerprint.txt");

    #[test]
    fn fingerprints_match_openssl() {
        let expected = format!("SHA256:{}", FIXED_EC_FINGERPRINT.trim());
        assert_eq!(fingerprint_pem(FIXED_EC_PRIVATE).unwrap(), expected);
        assert_eq!(fingerprint_pem(FIXED_EC_PUBLIC).unwrap(), expected);
        assert_eq!(
            fingerprint_pem(FIXED_RSA_PRIVATE).unwrap(),
            format!("SHA256:{}", FIXED_RSA_FINGERPRINT.trim())
        );
        assert_eq!(
            fingerprint_pem(FIXED_ED_PRIVATE).unwrap(),
            format!("SHA256:{}", FIXED_ED_FINGERPRINT.trim())
        );
    }

    #[test]
    fn fingerprint_refuses_other_pem_blocks() {
        let block = |tag: &str| format!("-----BEGIN {tag}-----\nAAAA\n-----END {tag}-----\n");
        let cert = fingerprint_pem(&block("CERTIFICATE"))
            .unwrap_err()
            .to_string();
        assert!(cert.starts_with("a certificate"), "{cert}");
        assert!(matches!(fingerprint_pem("not pem"), Err(Error::Pem(_))));
        let other = fingerprint_pem(&block("DH PARAMETERS"))
            .unwrap_err()
            .to_string();
        assert!(other.contains("\"DH PARAMETERS\""), "{other}");
    }

    #[test]
    fn pkcs1_keys_are_named_with_the_openssl_command_that_converts_them() {
        let block = |tag: &str| format!("-----BEGIN {tag}-----\nAAAA\n-----END {tag}-----\n");
        let public = fingerprint_pem(&block("RSA PUBLIC KEY")).unwrap_err();
        assert!(matches!(public, Error::KeyFormat(_)));
        assert_eq!(
            public.to_string(),
            "a PKCS#1 RSA public key (-----BEGIN RSA PUBLIC KEY-----), but keygate reads a \
             PUBLIC KEY (SubjectPublicKeyInfo) or a PKCS#8 PRIVATE KEY; convert it with: openssl \
             rsa -RSAPublicKey_in -in key.pem -pubout -out public_key.pem"
        );
        let private = fingerprint_pem(&block("RSA PRIVATE KEY"))
            .unwrap_err()
            .to_string();
        assert!(private.starts_with("a PKCS#1 RSA private key"), "{private}");
        assert!(
            private.ends_with("openssl pkcs8 -topk8 -nocrypt -in key.pem -out private_key.pem"),
            "{private}"
        );
        // keypair-jwt and token --private-key say the same of a PKCS#1 private key.
        let signing = SigningKey::from_pkcs8_pem(&block("RSA PRIVATE KEY")).unwrap_err();
        assert!(
            signing.to_string().contains("openssl pkcs8 -topk8"),
            "{signing}"
        );
        let verifying = VerifyingKey::from_spki_pem(&block("RSA PUBLIC KEY")).unwrap_err();
        assert!(
            verifying.to_string().contains("-RSAPublicKey_in"),
            "{verifying}"
        );
    }

    #[test]
    fn generated_keys_round_trip_for_every_algorithm() {
        for algorithm in [
            KeyAlgorithm::ES256,
            KeyAlgorithm::EdDSA,
            KeyAlgorithm::RS256,
        ] {
            let pair = generate_key_pair(algorithm).unwrap();
            assert!(
                pair.private_pem.contains("BEGIN PRIVATE KEY"),
                "{algorithm}"
            );
            assert!(pair.public_pem.contains("BEGIN PUBLIC KEY"), "{algorithm}");
            let signing = SigningKey::from_pkcs8_pem(&pair.private_pem).unwrap();
            let verifying = VerifyingKey::from_spki_pem(&pair.public_pem).unwrap();
            assert_eq!(signing.algorithm, algorithm);
            assert_eq!(verifying.algorithm, algorithm);
            assert_eq!(signing.fingerprint, pair.fingerprint);
            assert_eq!(verifying.fingerprint, pair.fingerprint);
            assert_eq!(signing.kid, verifying.kid);
            assert_eq!(fingerprint_pem(&pair.public_pem).unwrap(), pair.fingerprint);
            let from_jwk = VerifyingKey::from_jwk(&verifying.jwk).unwrap();
            assert_eq!(from_jwk.kid, verifying.kid);
        }
    }

    #[test]
    fn rsa_keys_have_at_least_2048_bits() {
        let pair = generate_key_pair(KeyAlgorithm::RS256).unwrap();
        let block = pem::parse(&pair.public_pem).unwrap();
        // A 2048-bit SPKI is 294 bytes of DER.
        assert!(block.contents().len() >= 294);
    }

    #[test]
    fn thumbprint_matches_rfc7638_example() {
        // RFC 7638 §3.1.
        let jwk: Jwk = serde_json::from_str(include_str!("testdata/rfc7638_jwk.json")).unwrap();
        assert_eq!(
            jwk_thumbprint(&jwk).unwrap(),
            "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
        );
    }

    #[test]
    fn jwk_of_fixed_ec_key_has_public_members_only() {
        let key = SigningKey::from_pkcs8_pem(FIXED_EC_PRIVATE).unwrap();
        let json = serde_json::to_value(&key.jwk).unwrap();
        assert_eq!(json["kty"], "EC");
        assert_eq!(json["crv"], "P-256");
        assert_eq!(json["alg"], "ES256");
        assert_eq!(json["use"], "sig");
        assert_eq!(json["kid"], key.kid.as_str());
        assert!(json.get("d").is_none());
    }
}
