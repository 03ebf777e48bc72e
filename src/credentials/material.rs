//! The credentials of one ApiClient as its Secret holds them: a flat map of well-known keys.
//! The same map is the Secret's `data` in a cluster and a state file in `keygate dev`, so
//! one set of functions decides what to keep, what to generate and what to rotate.

use std::collections::BTreeMap;

use super::{
    Result, SecretDigest, VerifyingKey, generate_api_key, generate_client_secret, generate_key_pair,
};
use crate::api::ApiClientSpec;

/// Secret keys, as documented in the README and docs/operator.md.
pub mod key {
    pub const CLIENT_ID: &str = "client_id";
    pub const CLIENT_SECRET: &str = "client_secret";
    pub const PRIVATE_KEY: &str = "private_key.pem";
    pub const PUBLIC_KEY: &str = "public_key.pem";
    pub const KEY_FINGERPRINT: &str = "key_fingerprint";
    pub const API_KEY: &str = "api_key";
    pub const TOKEN_URL: &str = "token_url";
    pub const ISSUER: &str = "issuer";
    pub const PREVIOUS_CLIENT_SECRET: &str = "previous_client_secret";
    pub const PREVIOUS_PUBLIC_KEY: &str = "previous_public_key.pem";
    pub const PREVIOUS_KEY_FINGERPRINT: &str = "previous_key_fingerprint";
    pub const PREVIOUS_API_KEY: &str = "previous_api_key";
    /// Unix seconds after which the `previous_*` credentials stop working.
    pub const PREVIOUS_EXPIRES_AT: &str = "previous_expires_at";
}

/// Credential data: Secret key → value.
pub type CredentialData = BTreeMap<String, String>;

/// What [`ensure_material`] generated, for Events and logs (names only, never values).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Generated(pub Vec<&'static str>);

/// Brings `existing` in line with `spec`: keeps every credential already there, generates the
/// ones the spec enables and the data lacks, drops the ones the spec no longer enables, and
/// sets the non-secret keys. Never regenerates existing material: that takes [`rotate`].
pub fn ensure_material(
    spec: &ApiClientSpec,
    client_id: &str,
    token_url: &str,
    issuer: &str,
    existing: &CredentialData,
) -> Result<(CredentialData, Generated)> {
    let mut data = existing.clone();
    let mut generated = Generated::default();
    data.insert(key::CLIENT_ID.into(), client_id.into());
    data.insert(key::TOKEN_URL.into(), token_url.into());
    data.insert(key::ISSUER.into(), issuer.into());

    if spec.client_secret {
        if !data.contains_key(key::CLIENT_SECRET) {
            data.insert(key::CLIENT_SECRET.into(), generate_client_secret()?);
            generated.0.push(key::CLIENT_SECRET);
        }
    } else {
        data.remove(key::CLIENT_SECRET);
        data.remove(key::PREVIOUS_CLIENT_SECRET);
    }

    match &spec.key_pair {
        Some(wanted) => {
            let current_fits = data
                .get(key::PUBLIC_KEY)
                .and_then(|pem| VerifyingKey::from_spki_pem(pem).ok())
                .is_some_and(|k| k.algorithm == wanted.algorithm)
                && data.contains_key(key::PRIVATE_KEY);
            if !current_fits {
                // A changed algorithm is a new key: the old one stays usable as the previous
                // key only through an explicit rotation, so here it is simply replaced.
                let pair = generate_key_pair(wanted.algorithm)?;
                data.insert(key::PRIVATE_KEY.into(), pair.private_pem);
                data.insert(key::PUBLIC_KEY.into(), pair.public_pem);
                data.insert(key::KEY_FINGERPRINT.into(), pair.fingerprint);
                generated.0.push(key::PRIVATE_KEY);
            }
        }
        None => {
            for k in [
                key::PRIVATE_KEY,
                key::PUBLIC_KEY,
                key::KEY_FINGERPRINT,
                key::PREVIOUS_PUBLIC_KEY,
                key::PREVIOUS_KEY_FINGERPRINT,
            ] {
                data.remove(k);
            }
        }
    }

    if spec.api_key {
        if !data.contains_key(key::API_KEY) {
            data.insert(key::API_KEY.into(), generate_api_key()?);
            generated.0.push(key::API_KEY);
        }
    } else {
        data.remove(key::API_KEY);
        data.remove(key::PREVIOUS_API_KEY);
    }
    Ok((data, generated))
}

/// How long the previous credentials stay valid after a rotation when the ApiClient's
/// `rotation.overlap` does not say: one day.
pub const DEFAULT_ROTATION_OVERLAP_SECS: u64 = 24 * 3600;

/// The overlap of a rotation of `spec`'s credentials, in seconds.
pub fn rotation_overlap_secs(spec: &ApiClientSpec) -> u64 {
    spec.rotation
        .as_ref()
        .and_then(|r| crate::api::parse_duration(&r.overlap).ok())
        .map_or(DEFAULT_ROTATION_OVERLAP_SECS, |d| d.as_secs())
}

/// Rotates every credential in `data`: the current ones become `previous_*`, valid until
/// `previous_expires_at` (Unix seconds), and new ones are generated. A rotation during an
/// overlap drops the older previous credentials.
pub fn rotate(
    spec: &ApiClientSpec,
    data: &CredentialData,
    previous_expires_at: u64,
) -> Result<CredentialData> {
    let mut out = data.clone();
    for k in [
        key::CLIENT_SECRET,
        key::PRIVATE_KEY,
        key::PUBLIC_KEY,
        key::KEY_FINGERPRINT,
        key::API_KEY,
    ] {
        out.remove(k);
    }
    for (current, previous) in [
        (key::CLIENT_SECRET, key::PREVIOUS_CLIENT_SECRET),
        (key::PUBLIC_KEY, key::PREVIOUS_PUBLIC_KEY),
        (key::KEY_FINGERPRINT, key::PREVIOUS_KEY_FINGERPRINT),
        (key::API_KEY, key::PREVIOUS_API_KEY),
    ] {
        match data.get(current) {
            Some(value) => out.insert(previous.into(), value.clone()),
            None => out.remove(previous),
        };
    }
    out.insert(
        key::PREVIOUS_EXPIRES_AT.into(),
        previous_expires_at.to_string(),
    );
    let client_id = data.get(key::CLIENT_ID).cloned().unwrap_or_default();
    let token_url = data.get(key::TOKEN_URL).cloned().unwrap_or_default();
    let issuer = data.get(key::ISSUER).cloned().unwrap_or_default();
    Ok(ensure_material(spec, &client_id, &token_url, &issuer, &out)?.0)
}

/// Drops the `previous_*` credentials once their overlap has ended at `now` (Unix seconds).
/// Returns whether anything changed.
pub fn prune_expired_previous(data: &mut CredentialData, now: u64) -> bool {
    let expired = data
        .get(key::PREVIOUS_EXPIRES_AT)
        .and_then(|t| t.parse::<u64>().ok())
        .is_some_and(|t| t <= now);
    if expired {
        for k in [
            key::PREVIOUS_CLIENT_SECRET,
            key::PREVIOUS_PUBLIC_KEY,
            key::PREVIOUS_KEY_FINGERPRINT,
            key::PREVIOUS_API_KEY,
            key::PREVIOUS_EXPIRES_AT,
        ] {
            data.remove(k);
        }
    }
    expired
}

/// A credential that may carry an end of validity (the previous one during an overlap).
#[derive(Debug, Clone)]
pub struct Valid<T> {
    pub value: T,
    /// Unix seconds after which it no longer works; `None` for current credentials.
    pub until: Option<u64>,
}

impl<T> Valid<T> {
    /// Whether it still works at `now`.
    pub fn is_valid_at(&self, now: u64) -> bool {
        self.until.is_none_or(|until| now < until)
    }
}

/// The verifiable side of a client's credentials: digests and public keys, never the
/// secrets themselves. This is what the token server and the sidecar hold in memory.
#[derive(Debug, Clone, Default)]
pub struct ClientMaterial {
    pub client_id: String,
    pub secrets: Vec<Valid<SecretDigest>>,
    pub keys: Vec<Valid<VerifyingKey>>,
    pub api_keys: Vec<Valid<SecretDigest>>,
}

impl ClientMaterial {
    /// Reads credential data; a malformed public key is an error naming the key, not its value.
    pub fn from_data(data: &CredentialData) -> Result<Self> {
        let previous_until = data
            .get(key::PREVIOUS_EXPIRES_AT)
            .and_then(|t| t.parse::<u64>().ok());
        let mut material = Self {
            client_id: data.get(key::CLIENT_ID).cloned().unwrap_or_default(),
            ..Self::default()
        };
        for (k, until) in [
            (key::CLIENT_SECRET, None),
            (key::PREVIOUS_CLIENT_SECRET, previous_until),
        ] {
            if let Some(secret) = data.get(k) {
                material.secrets.push(Valid {
                    value: SecretDigest::of(secret),
                    until,
                });
            }
        }
        for (k, until) in [
            (key::API_KEY, None),
            (key::PREVIOUS_API_KEY, previous_until),
        ] {
            if let Some(secret) = data.get(k) {
                material.api_keys.push(Valid {
                    value: SecretDigest::of(secret),
                    until,
                });
            }
        }
        for (k, until) in [
            (key::PUBLIC_KEY, None),
            (key::PREVIOUS_PUBLIC_KEY, previous_until),
        ] {
            if let Some(pem) = data.get(k) {
                let value = VerifyingKey::from_spki_pem(pem)
                    .map_err(|e| super::Error::UnsupportedKey(format!("{k}: {e}")))?;
                material.keys.push(Valid { value, until });
            }
        }
        Ok(material)
    }

    /// Whether `secret` is a client secret of this client valid at `now` (constant time per
    /// candidate digest).
    pub fn secret_matches(&self, secret: &str, now: u64) -> bool {
        let digest = SecretDigest::of(secret);
        // Compare against every candidate so timing does not reveal which one matched.
        self.secrets.iter().fold(false, |found, s| {
            found | (s.is_valid_at(now) && s.value == digest)
        })
    }

    /// The public keys valid at `now`.
    pub fn keys_at(&self, now: u64) -> impl Iterator<Item = &VerifyingKey> {
        self.keys
            .iter()
            .filter(move |k| k.is_valid_at(now))
            .map(|k| &k.value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{KeyAlgorithm, KeyPairSpec};

    fn mk_spec(key_pair: Option<KeyAlgorithm>, api_key: bool) -> ApiClientSpec {
        ApiClientSpec {
            client_secret: true,
            key_pair: key_pair.map(|algorithm| KeyPairSpec { algorithm }),
            api_key,
            ..ApiClientSpec::default()
        }
    }

    fn mk_data(spec: &ApiClientSpec) -> CredentialData {
        ensure_material(
            spec,
            "kgc_1",
            "http://t/oauth2/token",
            "http://t",
            &CredentialData::new(),
        )
        .unwrap()
        .0
    }

    #[test]
    fn generates_what_the_spec_enables() {
        let spec = mk_spec(Some(KeyAlgorithm::ES256), true);
        let (data, generated) = ensure_material(
            &spec,
            "kgc_1",
            "http://t/oauth2/token",
            "http://t",
            &CredentialData::new(),
        )
        .unwrap();
        assert_eq!(
            generated.0,
            vec![key::CLIENT_SECRET, key::PRIVATE_KEY, key::API_KEY]
        );
        for k in [
            key::CLIENT_ID,
            key::CLIENT_SECRET,
            key::PRIVATE_KEY,
            key::PUBLIC_KEY,
            key::KEY_FINGERPRINT,
            key::API_KEY,
            key::TOKEN_URL,
            key::ISSUER,
        ] {
            assert!(data.contains_key(k), "{k}");
        }
        assert!(data[key::KEY_FINGERPRINT].starts_with("SHA256:"));
    }

    #[test]
    fn never_regenerates_existing_material() {
        let spec = mk_spec(Some(KeyAlgorithm::EdDSA), true);
        let first = mk_data(&spec);
        let (again, generated) =
            ensure_material(&spec, "kgc_1", "http://t/oauth2/token", "http://t", &first).unwrap();
        assert_eq!(again, first);
        assert!(generated.0.is_empty());
    }

    #[test]
    fn disabling_a_credential_removes_it() {
        let first = mk_data(&mk_spec(Some(KeyAlgorithm::ES256), true));
        let (data, _) = ensure_material(&mk_spec(None, false), "kgc_1", "u", "i", &first).unwrap();
        assert!(!data.contains_key(key::PRIVATE_KEY));
        assert!(!data.contains_key(key::API_KEY));
        assert_eq!(data[key::CLIENT_SECRET], first[key::CLIENT_SECRET]);
    }

    #[test]
    fn rotation_keeps_previous_until_overlap_ends() {
        let spec = mk_spec(Some(KeyAlgorithm::ES256), true);
        let first = mk_data(&spec);
        let rotated = rotate(&spec, &first, 2_000).unwrap();
        assert_ne!(rotated[key::CLIENT_SECRET], first[key::CLIENT_SECRET]);
        assert_eq!(
            rotated[key::PREVIOUS_CLIENT_SECRET],
            first[key::CLIENT_SECRET]
        );
        assert_eq!(
            rotated[key::PREVIOUS_KEY_FINGERPRINT],
            first[key::KEY_FINGERPRINT]
        );
        assert_eq!(rotated[key::PREVIOUS_API_KEY], first[key::API_KEY]);
        assert_eq!(rotated[key::CLIENT_ID], "kgc_1");

        let material = ClientMaterial::from_data(&rotated).unwrap();
        assert!(material.secret_matches(&first[key::CLIENT_SECRET], 1_999));
        assert!(!material.secret_matches(&first[key::CLIENT_SECRET], 2_000));
        assert!(material.secret_matches(&rotated[key::CLIENT_SECRET], 9_999));
        assert_eq!(material.keys_at(1_000).count(), 2);
        assert_eq!(material.keys_at(2_000).count(), 1);

        let mut pruned = rotated.clone();
        assert!(!prune_expired_previous(&mut pruned, 1_999));
        assert!(prune_expired_previous(&mut pruned, 2_000));
        assert!(!pruned.contains_key(key::PREVIOUS_CLIENT_SECRET));
        assert_eq!(pruned[key::CLIENT_SECRET], rotated[key::CLIENT_SECRET]);
    }

    #[test]
    fn malformed_public_key_names_the_key_not_the_value() {
        let mut data = mk_data(&mk_spec(Some(KeyAlgorithm::ES256), false));
        data.insert(key::PUBLIC_KEY.into(), "garbage-value".into());
        let err = ClientMaterial::from_data(&data).unwrap_err().to_string();
        assert!(err.contains("public_key.pem"), "{err}");
        assert!(!err.contains("garbage-value"), "{err}");
    }
}
