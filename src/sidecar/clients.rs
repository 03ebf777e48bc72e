//! The clients of the policy in force, kept compact: a sidecar in front of an API with
//! 100,000 clients holds every one of them (issue #16: at most 32 MiB of RSS). Each client is
//! one allocation, a byte record holding its id, its scope set (interned: clients of one role
//! share it), its public keys as DER SubjectPublicKeyInfo and its API key digests. Keys are
//! parsed when a key-pair JWT needs one, not when the client arrives: verified callers are
//! cached, so that happens once per JWT.
//!
//! Changes from the policy stream are applied in place ([`ClientStore::upsert`],
//! [`ClientStore::remove`]): an unchanged client is never touched, so a change costs the same
//! at 10 or 100,000 clients.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::Arc;

use hashbrown::HashTable;

use crate::credentials::{SecretDigest, fingerprint_spki_der, spki_der_from_pem};
use crate::policy::document::PolicyClient;

/// A client as a verified caller carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientEntry {
    pub client_id: Arc<str>,
    pub scopes: Arc<[String]>,
}

/// One client, checked and encoded, ready to be stored. Encoding checks every key and digest,
/// so a delta can be checked whole before any of it is applied.
pub struct Encoded {
    id_hash: u64,
    record: Box<[u8]>,
    api_keys: Vec<SecretDigest>,
}

/// The clients of one policy.
#[derive(Default)]
pub struct ClientStore {
    hasher: RandomState,
    /// Records, found by the hash of the client id they start with.
    by_id: HashTable<Box<[u8]>>,
    /// API key digest → the hash of its client's id (the record itself is then checked to
    /// hold the digest, so a hash collision between two ids cannot mix clients up).
    by_api_key: HashMap<SecretDigest, u64>,
    /// Distinct scope sets; records hold an index.
    scope_sets: Vec<Arc<[String]>>,
    scope_set_index: HashMap<Arc<[String]>, u32>,
}

const NO_LIMIT: u64 = u64::MAX;

/// A record read back: borrowed slices of one client's bytes.
struct Record<'a> {
    id: &'a str,
    scope_set: u32,
    /// (not after, SPKI DER)
    keys: Vec<(Option<u64>, &'a [u8])>,
    /// (not after, digest)
    api_keys: Vec<(Option<u64>, &'a [u8])>,
}

fn limit(not_after: Option<u64>) -> [u8; 8] {
    not_after.unwrap_or(NO_LIMIT).to_le_bytes()
}

/// Reads a record this module wrote. `None` only if the bytes were not written by
/// [`ClientStore::encode`], which cannot happen.
fn read(record: &[u8]) -> Option<Record<'_>> {
    struct Cursor<'a>(&'a [u8]);
    impl<'a> Cursor<'a> {
        fn take(&mut self, n: usize) -> Option<&'a [u8]> {
            if self.0.len() < n {
                return None;
            }
            let (head, rest) = self.0.split_at(n);
            self.0 = rest;
            Some(head)
        }
        fn u16(&mut self) -> Option<usize> {
            Some(u16::from_le_bytes(self.take(2)?.try_into().ok()?).into())
        }
        fn u32(&mut self) -> Option<u32> {
            Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
        }
        fn limit(&mut self) -> Option<Option<u64>> {
            let value = u64::from_le_bytes(self.take(8)?.try_into().ok()?);
            Some((value != NO_LIMIT).then_some(value))
        }
    }
    let mut cursor = Cursor(record);
    let id_len = cursor.u16()?;
    let id = std::str::from_utf8(cursor.take(id_len)?).ok()?;
    let scope_set = cursor.u32()?;
    let mut keys = Vec::new();
    for _ in 0..cursor.u16()? {
        let not_after = cursor.limit()?;
        let len = cursor.u16()?;
        keys.push((not_after, cursor.take(len)?));
    }
    let mut api_keys = Vec::new();
    for _ in 0..cursor.u16()? {
        let not_after = cursor.limit()?;
        api_keys.push((not_after, cursor.take(32)?));
    }
    Some(Record {
        id,
        scope_set,
        keys,
        api_keys,
    })
}

fn record_id(record: &[u8]) -> &str {
    read(record).map_or("", |r| r.id)
}

impl ClientStore {
    /// The number of clients.
    pub fn len(&self) -> usize {
        self.by_id.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.by_id.is_empty()
    }

    fn hash(&self, id: &str) -> u64 {
        self.hasher.hash_one(id)
    }

    /// Checks `client` (its keys parse as keys keygate uses and match their fingerprints, its
    /// API key digests are well formed) and encodes it.
    pub fn encode(&mut self, client: &PolicyClient) -> Result<Encoded, String> {
        let too_many = || format!("client {}: too many keys", client.name);
        let mut record = Vec::with_capacity(64 + 100 * client.keys.len());
        let id = client.client_id.as_bytes();
        let id_len = u16::try_from(id.len()).map_err(|_| "a client id that long".to_owned())?;
        record.extend_from_slice(&id_len.to_le_bytes());
        record.extend_from_slice(id);
        record.extend_from_slice(&self.scope_set(&client.scopes).to_le_bytes());
        let n = u16::try_from(client.keys.len()).map_err(|_| too_many())?;
        record.extend_from_slice(&n.to_le_bytes());
        for key in &client.keys {
            let (_, der) = spki_der_from_pem(&key.public_key)
                .map_err(|e| format!("client {}: {e}", client.name))?;
            if fingerprint_spki_der(&der) != key.fingerprint {
                return Err(format!(
                    "client {}: key fingerprint does not match its key",
                    client.name
                ));
            }
            let len = u16::try_from(der.len()).map_err(|_| too_many())?;
            record.extend_from_slice(&limit(key.not_after));
            record.extend_from_slice(&len.to_le_bytes());
            record.extend_from_slice(&der);
        }
        let n = u16::try_from(client.api_keys.len()).map_err(|_| too_many())?;
        record.extend_from_slice(&n.to_le_bytes());
        let mut api_keys = Vec::with_capacity(client.api_keys.len());
        for api_key in &client.api_keys {
            let digest = SecretDigest::decode(&api_key.digest)
                .ok_or_else(|| format!("client {}: malformed API key digest", client.name))?;
            record.extend_from_slice(&limit(api_key.not_after));
            record.extend_from_slice(digest.as_bytes());
            api_keys.push(digest);
        }
        Ok(Encoded {
            id_hash: self.hash(&client.client_id),
            record: record.into_boxed_slice(),
            api_keys,
        })
    }

    fn scope_set(&mut self, scopes: &[String]) -> u32 {
        if let Some(index) = self.scope_set_index.get(scopes) {
            return *index;
        }
        let set: Arc<[String]> = scopes.into();
        let index = u32::try_from(self.scope_sets.len()).expect("fewer scope sets than clients");
        self.scope_sets.push(set.clone());
        self.scope_set_index.insert(set, index);
        index
    }

    /// Adds a client or replaces the one with its id.
    pub fn upsert(&mut self, encoded: Encoded) {
        let id = record_id(&encoded.record).to_owned();
        self.remove(&id);
        for digest in encoded.api_keys {
            self.by_api_key.insert(digest, encoded.id_hash);
        }
        let hasher = &self.hasher;
        self.by_id
            .insert_unique(encoded.id_hash, encoded.record, |r| {
                hasher.hash_one(record_id(r))
            });
    }

    /// Removes the client `id`, if it is here.
    pub fn remove(&mut self, id: &str) {
        let hash = self.hash(id);
        let Ok(entry) = self.by_id.find_entry(hash, |r| record_id(r) == id) else {
            return;
        };
        let (record, _) = entry.remove();
        if let Some(record) = read(&record) {
            for (_, digest) in record.api_keys {
                if let Ok(digest) = <[u8; 32]>::try_from(digest) {
                    self.by_api_key.remove(&SecretDigest::from_bytes(digest));
                }
            }
        }
    }

    fn entry(&self, record: &Record<'_>) -> ClientEntry {
        ClientEntry {
            client_id: record.id.into(),
            scopes: self.scope_sets[record.scope_set as usize].clone(),
        }
    }

    fn record(&self, id: &str) -> Option<Record<'_>> {
        self.by_id
            .find(self.hash(id), |r| record_id(r) == id)
            .and_then(|r| read(r))
    }

    /// The client `id`.
    pub fn client(&self, id: &str) -> Option<ClientEntry> {
        self.record(id).map(|r| self.entry(&r))
    }

    /// The key of client `id` with `fingerprint`: the client, the key's DER and the time it
    /// stops working.
    pub fn key(&self, id: &str, fingerprint: &str) -> Option<(ClientEntry, Vec<u8>, Option<u64>)> {
        let record = self.record(id)?;
        let (not_after, der) = record
            .keys
            .iter()
            .find(|(_, der)| fingerprint_spki_der(der) == fingerprint)?;
        Some((self.entry(&record), der.to_vec(), *not_after))
    }

    /// The client whose API key has `digest`, and the time that key stops working.
    pub fn api_key(&self, digest: &SecretDigest) -> Option<(ClientEntry, Option<u64>)> {
        let hash = *self.by_api_key.get(digest)?;
        let wanted = digest.as_bytes().as_slice();
        let found = self.by_id.find(hash, |r| {
            read(r).is_some_and(|r| r.api_keys.iter().any(|(_, d)| *d == wanted))
        })?;
        let record = read(found)?;
        let (not_after, _) = record.api_keys.iter().find(|(_, d)| *d == wanted)?;
        Some((self.entry(&record), *not_after))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::KeyAlgorithm;
    use crate::credentials::generate_key_pair;
    use crate::policy::document::{PolicyApiKey, PolicyKey};

    fn client(id: &str, scopes: &[&str]) -> PolicyClient {
        PolicyClient {
            client_id: id.to_owned(),
            name: format!("shop/{id}"),
            scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
            keys: Vec::new(),
            api_keys: Vec::new(),
        }
    }

    #[test]
    fn clients_are_found_by_id_key_and_api_key_and_replaced_whole() {
        let pair = generate_key_pair(KeyAlgorithm::ES256).unwrap();
        let digest = SecretDigest::of("kgk_secret");
        let mut a = client("kgc_a", &["orders.read"]);
        a.keys.push(PolicyKey {
            fingerprint: pair.fingerprint.clone(),
            public_key: pair.public_pem.clone(),
            not_after: Some(2_000_000_000),
        });
        a.api_keys.push(PolicyApiKey {
            digest: digest.encode(),
            not_after: None,
        });
        let mut store = ClientStore::default();
        let encoded = store.encode(&a).unwrap();
        store.upsert(encoded);
        let encoded = store.encode(&client("kgc_b", &["orders.read"])).unwrap();
        store.upsert(encoded);
        assert_eq!(store.len(), 2);

        let entry = store.client("kgc_a").unwrap();
        assert_eq!(&*entry.client_id, "kgc_a");
        assert_eq!(&*entry.scopes, ["orders.read".to_owned()]);
        // Clients of one scope set share it.
        let b = store.client("kgc_b").unwrap();
        assert!(Arc::ptr_eq(&entry.scopes, &b.scopes));

        let (owner, der, not_after) = store.key("kgc_a", &pair.fingerprint).unwrap();
        assert_eq!(owner, entry);
        assert_eq!(not_after, Some(2_000_000_000));
        let parsed = crate::credentials::VerifyingKey::from_spki_der(&der).unwrap();
        assert_eq!(parsed.fingerprint, pair.fingerprint);
        assert!(
            store.key("kgc_b", &pair.fingerprint).is_none(),
            "not b's key"
        );
        assert_eq!(store.api_key(&digest).unwrap(), (entry, None));
        assert!(store.api_key(&SecretDigest::of("kgk_other")).is_none());

        // Replaced whole: the API key and the key go with the old version.
        let encoded = store.encode(&client("kgc_a", &["orders.write"])).unwrap();
        store.upsert(encoded);
        assert_eq!(store.len(), 2);
        assert_eq!(
            &*store.client("kgc_a").unwrap().scopes,
            ["orders.write".to_owned()]
        );
        assert!(store.api_key(&digest).is_none());
        assert!(store.key("kgc_a", &pair.fingerprint).is_none());

        store.remove("kgc_a");
        store.remove("kgc_missing");
        assert!(store.client("kgc_a").is_none());
        assert_eq!(store.len(), 1);
    }

    #[test]
    fn a_bad_key_or_digest_is_refused_before_anything_is_stored() {
        let pair = generate_key_pair(KeyAlgorithm::ES256).unwrap();
        let other = generate_key_pair(KeyAlgorithm::ES256).unwrap();
        let mut store = ClientStore::default();
        let mut bad = client("kgc_a", &["orders.read"]);
        bad.keys.push(PolicyKey {
            fingerprint: other.fingerprint.clone(),
            public_key: pair.public_pem.clone(),
            not_after: None,
        });
        let error = store.encode(&bad).err().unwrap();
        assert!(error.contains("fingerprint does not match"), "{error}");
        bad.keys[0].public_key = "not a key".into();
        assert!(store.encode(&bad).is_err());
        let mut bad = client("kgc_a", &["orders.read"]);
        bad.api_keys.push(PolicyApiKey {
            digest: "md5:x".into(),
            not_after: None,
        });
        let error = store.encode(&bad).err().unwrap();
        assert!(error.contains("malformed API key digest"), "{error}");
        assert!(store.is_empty());
    }
}
