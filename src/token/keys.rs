//! The issuer's signing keys: a current key that signs, a next key published before it signs
//! anything, and previous keys kept until every token they signed has expired. The stored form
//! (private keys) lives in a Secret or the dev state directory; the parsed form signs.

use std::collections::HashMap;
use std::sync::Arc;

use jsonwebtoken::jwk::JwkSet;
use serde::{Deserialize, Serialize};

use crate::api::KeyAlgorithm;
use crate::credentials::{self, SigningKey, VerifyingKey, generate_key_pair};

/// The role of a key in the set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum KeyState {
    Current,
    Next,
    Previous,
}

/// One stored key.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StoredKey {
    pub state: KeyState,
    /// PKCS#8 PEM private key.
    pub private_key: String,
    /// When it became current (Unix seconds); for a next key, when it was made.
    pub since: u64,
    /// For a previous key: when it may be dropped (Unix seconds).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retire_at: Option<u64>,
}

impl std::fmt::Debug for StoredKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredKey")
            .field("state", &self.state)
            .field("since", &self.since)
            .field("retire_at", &self.retire_at)
            .finish_non_exhaustive()
    }
}

/// The stored key set, serialised as JSON into the signing-keys Secret or state file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredKeySet {
    pub keys: Vec<StoredKey>,
}

/// When to rotate issuer keys.
#[derive(Debug, Clone, Copy)]
pub struct RotationPolicy {
    pub algorithm: KeyAlgorithm,
    /// How long a key stays current.
    pub every_secs: u64,
    /// The longest lifetime of a token this issuer signs: a previous key is kept this long.
    pub max_token_lifetime_secs: u64,
}

impl StoredKeySet {
    /// Brings the set up to date at `now`: creates current and next keys when missing,
    /// promotes next to current when the current key is older than the rotation interval
    /// (the next key has been published for a whole interval by then), and drops previous
    /// keys whose tokens have all expired. Returns whether anything changed.
    pub fn maintain(&mut self, policy: RotationPolicy, now: u64) -> credentials::Result<bool> {
        let before = self.clone();
        self.keys
            .retain(|k| k.state != KeyState::Previous || k.retire_at.is_some_and(|t| t > now));
        let current_age = self
            .keys
            .iter()
            .find(|k| k.state == KeyState::Current)
            .map(|k| now.saturating_sub(k.since));
        if current_age.is_some_and(|age| age >= policy.every_secs)
            && let Some(next) = self.keys.iter().position(|k| k.state == KeyState::Next)
        {
            for key in &mut self.keys {
                if key.state == KeyState::Current {
                    key.state = KeyState::Previous;
                    key.retire_at = Some(now + policy.max_token_lifetime_secs);
                }
            }
            self.keys[next].state = KeyState::Current;
            self.keys[next].since = now;
        }
        for state in [KeyState::Current, KeyState::Next] {
            if !self.keys.iter().any(|k| k.state == state) {
                let pair = generate_key_pair(policy.algorithm)?;
                self.keys.push(StoredKey {
                    state,
                    private_key: pair.private_pem,
                    since: now,
                    retire_at: None,
                });
            }
        }
        Ok(*self != before)
    }
}

/// The parsed key set the token server signs with and publishes.
#[derive(Debug)]
pub struct IssuerKeys {
    pub current: SigningKey,
    /// Every published key (current, next, previous) by `kid`.
    pub verifying: HashMap<String, VerifyingKey>,
    pub jwks: JwkSet,
}

impl IssuerKeys {
    /// Parses a stored set; it must have a current key.
    pub fn from_stored(stored: &StoredKeySet) -> credentials::Result<Arc<Self>> {
        let mut current = None;
        let mut verifying = HashMap::new();
        let mut jwks = JwkSet { keys: Vec::new() };
        // Publish in a stable order: current, next, previous.
        let mut ordered: Vec<&StoredKey> = stored.keys.iter().collect();
        ordered.sort_by_key(|k| match k.state {
            KeyState::Current => 0,
            KeyState::Next => 1,
            KeyState::Previous => 2,
        });
        for key in ordered {
            let signing = SigningKey::from_pkcs8_pem(&key.private_key)?;
            let public = VerifyingKey::from_spki_pem(&signing.public_pem)?;
            jwks.keys.push(public.jwk.clone());
            verifying.insert(public.kid.clone(), public);
            if key.state == KeyState::Current && current.is_none() {
                current = Some(signing);
            }
        }
        let current = current.ok_or_else(|| {
            credentials::Error::UnsupportedKey("the signing key set has no current key".into())
        })?;
        Ok(Arc::new(Self {
            current,
            verifying,
            jwks,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: RotationPolicy = RotationPolicy {
        algorithm: KeyAlgorithm::ES256,
        every_secs: 1000,
        max_token_lifetime_secs: 100,
    };

    fn kid_of(set: &StoredKeySet, state: KeyState) -> Option<String> {
        let key = set.keys.iter().find(|k| k.state == state)?;
        Some(SigningKey::from_pkcs8_pem(&key.private_key).ok()?.kid)
    }

    #[test]
    fn next_key_is_published_before_it_signs_and_previous_outlives_its_tokens() {
        let mut set = StoredKeySet::default();
        assert!(set.maintain(POLICY, 0).unwrap());
        let first = kid_of(&set, KeyState::Current).unwrap();
        let second = kid_of(&set, KeyState::Next).unwrap();
        let keys = IssuerKeys::from_stored(&set).unwrap();
        assert_eq!(keys.current.kid, first);
        assert!(
            keys.verifying.contains_key(&second),
            "next key is in the JWKS"
        );
        assert_eq!(keys.jwks.keys.len(), 2);

        assert!(
            !set.maintain(POLICY, 999).unwrap(),
            "nothing to do before the interval"
        );
        assert!(set.maintain(POLICY, 1000).unwrap());
        assert_eq!(kid_of(&set, KeyState::Current).unwrap(), second);
        assert_eq!(kid_of(&set, KeyState::Previous).unwrap(), first);
        let third = kid_of(&set, KeyState::Next).unwrap();
        assert_eq!(IssuerKeys::from_stored(&set).unwrap().jwks.keys.len(), 3);
        assert_ne!(third, first);

        assert!(
            set.maintain(POLICY, 1100).unwrap(),
            "previous retires after max lifetime"
        );
        assert_eq!(kid_of(&set, KeyState::Previous), None);
        assert_eq!(IssuerKeys::from_stored(&set).unwrap().jwks.keys.len(), 2);
    }

    #[test]
    fn stored_key_debug_hides_the_private_key() {
        let mut set = StoredKeySet::default();
        set.maintain(POLICY, 0).unwrap();
        assert!(!format!("{set:?}").contains("PRIVATE"));
    }
}
