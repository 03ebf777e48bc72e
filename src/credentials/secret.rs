use aws_lc_rs::digest::{SHA256, digest};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use subtle::ConstantTimeEq;

use super::{Error, Result};

/// Prefix of every keygate client id, so a reader recognises one.
pub const CLIENT_ID_PREFIX: &str = "kgc_";
/// Prefix of client secrets; lets secret scanners find leaked ones.
pub const CLIENT_SECRET_PREFIX: &str = "kgs_";
/// Prefix of API keys; lets secret scanners find leaked ones.
pub const API_KEY_PREFIX: &str = "kgk_";

/// Bytes of CSPRNG output in a client secret or API key (256 bits).
const SECRET_BYTES: usize = 32;

/// The stable client id of an ApiClient, derived from a seed that never changes for the life
/// of the object (its UID in a cluster, `namespace/name` in `keygate dev`). Deriving instead of
/// storing means a deleted credentials Secret never changes the id. Lower-case hex keeps it
/// URL-safe and free of `.`, which separates it from the fingerprint in key-pair JWT issuers.
pub fn derive_client_id(seed: &str) -> String {
    let hash = digest(&SHA256, seed.as_bytes());
    let mut id = String::with_capacity(CLIENT_ID_PREFIX.len() + 32);
    id.push_str(CLIENT_ID_PREFIX);
    for byte in &hash.as_ref()[..16] {
        id.push_str(&format!("{byte:02x}"));
    }
    id
}

/// A new client secret: 256 bits from the OS CSPRNG, base64url without padding.
pub fn generate_client_secret() -> Result<String> {
    random_token(CLIENT_SECRET_PREFIX)
}

/// A new API key: 256 bits from the OS CSPRNG, base64url without padding.
pub fn generate_api_key() -> Result<String> {
    random_token(API_KEY_PREFIX)
}

/// Random bytes from the operating system, for ids such as `jti` that must not repeat.
pub fn random_bytes<const N: usize>() -> Result<[u8; N]> {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes).map_err(|e| Error::Random(e.to_string()))?;
    Ok(bytes)
}

fn random_token(prefix: &str) -> Result<String> {
    let bytes = random_bytes::<SECRET_BYTES>()?;
    Ok(format!("{prefix}{}", URL_SAFE_NO_PAD.encode(bytes)))
}

/// The SHA-256 digest under which a high-entropy secret is stored and compared. A slow KDF
/// buys nothing for 256-bit random secrets, and a digest keeps verification cheap.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct SecretDigest([u8; 32]);

impl SecretDigest {
    /// The digest of `secret`.
    pub fn of(secret: &str) -> Self {
        let hash = digest(&SHA256, secret.as_bytes());
        let mut out = [0u8; 32];
        out.copy_from_slice(hash.as_ref());
        Self(out)
    }

    /// Whether `candidate` is the secret behind this digest, compared in constant time.
    pub fn matches(&self, candidate: &str) -> bool {
        Self::of(candidate).0.ct_eq(&self.0).into()
    }

    /// The raw digest.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// A digest from its raw bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The digest as `sha256:<base64url>`, the form policy files carry.
    pub fn encode(&self) -> String {
        format!("sha256:{}", URL_SAFE_NO_PAD.encode(self.0))
    }

    /// Parses the form [`SecretDigest::encode`] writes.
    pub fn decode(text: &str) -> Option<Self> {
        let raw = URL_SAFE_NO_PAD.decode(text.strip_prefix("sha256:")?).ok()?;
        Some(Self(raw.try_into().ok()?))
    }
}

impl std::fmt::Debug for SecretDigest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SecretDigest(..)")
    }
}

/// Compares two byte strings in constant time (for their common length; lengths are public).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.ct_eq(b).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_id_is_stable_prefixed_and_url_safe() {
        let a = derive_client_id("0f3c2a7e-uid");
        assert_eq!(a, derive_client_id("0f3c2a7e-uid"));
        assert_ne!(a, derive_client_id("other-uid"));
        assert!(a.starts_with("kgc_"));
        assert_eq!(a.len(), 4 + 32);
        assert!(
            a[4..]
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
        );
    }

    #[test]
    fn secrets_carry_256_bits_and_differ() {
        let a = generate_client_secret().unwrap();
        let b = generate_client_secret().unwrap();
        assert_ne!(a, b);
        let body = a.strip_prefix("kgs_").unwrap();
        assert_eq!(URL_SAFE_NO_PAD.decode(body).unwrap().len(), 32);
        assert!(generate_api_key().unwrap().starts_with("kgk_"));
    }

    #[test]
    fn digest_matches_only_the_secret_and_round_trips() {
        let digest = SecretDigest::of("kgs_secret");
        assert!(digest.matches("kgs_secret"));
        assert!(!digest.matches("kgs_secreT"));
        assert!(!digest.matches(""));
        assert_eq!(SecretDigest::decode(&digest.encode()), Some(digest.clone()));
        assert_eq!(SecretDigest::decode("sha256:short"), None);
        assert_eq!(SecretDigest::decode("md5:abc"), None);
        assert_eq!(format!("{digest:?}"), "SecretDigest(..)");
    }

    #[test]
    fn digest_of_known_vector() {
        // sha256("abc"), FIPS 180-2 appendix B.1.
        let expected = "ungWv48Bz-pBQUDeXa4iI7ADYaOWF3qctBD_YfIAFa0";
        assert_eq!(
            SecretDigest::of("abc").encode(),
            format!("sha256:{expected}")
        );
    }
}
