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

/// How an id is kept: keygate's own client ids (`kgc_` and 32 lowercase hex digits) packed
/// into 16 bytes, any other id as its bytes after a length. The tag keeps the two apart.
const ID_PACKED: u8 = 1;
const ID_PLAIN: u8 = 0;
/// How a key is kept: the SubjectPublicKeyInfo without the algorithm prefix every P-256 or
/// Ed25519 key shares, or whole.
const KEY_P256: u8 = 1;
const KEY_ED25519: u8 = 2;
const KEY_DER: u8 = 0;
/// The DER SubjectPublicKeyInfo of a P-256 key up to its 65-byte uncompressed point.
const P256_PREFIX: [u8; 26] = [
    0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08, 0x2a,
    0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
];
/// The DER SubjectPublicKeyInfo of an Ed25519 key up to its 32-byte key.
const ED25519_PREFIX: [u8; 12] = [
    0x30, 0x2a, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00,
];

/// Appends `id` as records keep it.
fn encode_id(id: &str, out: &mut Vec<u8>) -> Result<(), String> {
    let hex = id.strip_prefix("kgc_").filter(|h| {
        h.len() == 32
            && h.bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    });
    if let Some(hex) = hex {
        out.push(ID_PACKED);
        for pair in hex.as_bytes().chunks(2) {
            let digit = |b: u8| {
                if b.is_ascii_digit() {
                    b - b'0'
                } else {
                    b - b'a' + 10
                }
            };
            out.push(digit(pair[0]) << 4 | digit(pair[1]));
        }
        return Ok(());
    }
    let len = u16::try_from(id.len()).map_err(|_| "a client id that long".to_owned())?;
    out.push(ID_PLAIN);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(id.as_bytes());
    Ok(())
}

/// The id an encoded id stands for.
fn decode_id(encoded: &[u8]) -> String {
    match encoded.split_first() {
        Some((&ID_PACKED, packed)) => {
            let mut id = String::with_capacity(36);
            id.push_str("kgc_");
            for byte in packed {
                id.push_str(&format!("{byte:02x}"));
            }
            id
        }
        Some((_, plain)) => {
            String::from_utf8_lossy(plain.get(2..).unwrap_or_default()).into_owned()
        }
        None => String::new(),
    }
}

/// Appends a key's DER as records keep it.
fn encode_key(der: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
    if let Some(point) = der.strip_prefix(&P256_PREFIX).filter(|p| p.len() == 65) {
        out.push(KEY_P256);
        out.extend_from_slice(point);
    } else if let Some(key) = der.strip_prefix(&ED25519_PREFIX).filter(|k| k.len() == 32) {
        out.push(KEY_ED25519);
        out.extend_from_slice(key);
    } else {
        let len = u16::try_from(der.len()).map_err(|_| "a key that long".to_owned())?;
        out.push(KEY_DER);
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(der);
    }
    Ok(())
}

/// A record read back: slices of one client's bytes.
struct Record<'a> {
    /// The id, encoded.
    id: &'a [u8],
    scope_set: u32,
    /// (not after, SPKI DER)
    keys: Vec<(Option<u64>, Vec<u8>)>,
    /// (not after, digest)
    api_keys: Vec<(Option<u64>, &'a [u8])>,
}

fn limit(not_after: Option<u64>) -> [u8; 8] {
    not_after.unwrap_or(NO_LIMIT).to_le_bytes()
}

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
    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
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
    /// An encoded id, whole.
    fn id(&mut self) -> Option<&'a [u8]> {
        let len = match *self.0.first()? {
            ID_PACKED => 1 + 16,
            _ => 3 + usize::from(u16::from_le_bytes(self.0.get(1..3)?.try_into().ok()?)),
        };
        self.take(len)
    }
    /// A key, as DER.
    fn key(&mut self) -> Option<Vec<u8>> {
        let (prefix, len): (&[u8], usize) = match self.u8()? {
            KEY_P256 => (&P256_PREFIX, 65),
            KEY_ED25519 => (&ED25519_PREFIX, 32),
            _ => (&[], self.u16()?),
        };
        Some([prefix, self.take(len)?].concat())
    }
}

/// Reads a record this module wrote. `None` only if the bytes were not written by
/// [`ClientStore::encode`], which cannot happen.
fn read(record: &[u8]) -> Option<Record<'_>> {
    let mut cursor = Cursor(record);
    let id = cursor.id()?;
    let scope_set = cursor.u32()?;
    let mut keys = Vec::new();
    for _ in 0..cursor.u8()? {
        let not_after = cursor.limit()?;
        keys.push((not_after, cursor.key()?));
    }
    let mut api_keys = Vec::new();
    for _ in 0..cursor.u8()? {
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

/// The encoded id a record starts with.
fn record_id(record: &[u8]) -> &[u8] {
    Cursor(record).id().unwrap_or_default()
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

    /// `id` encoded as records keep it, and its hash. `None` for an id no record can hold.
    fn lookup_key(&self, id: &str) -> Option<(Vec<u8>, u64)> {
        let mut encoded = Vec::with_capacity(20);
        encode_id(id, &mut encoded).ok()?;
        let hash = self.hasher.hash_one(&encoded);
        Some((encoded, hash))
    }

    /// Checks `client` (its keys parse as keys keygate uses and match their fingerprints, its
    /// API key digests are well formed) and encodes it.
    pub fn encode(&mut self, client: &PolicyClient) -> Result<Encoded, String> {
        let too_many = || format!("client {}: too many keys", client.name);
        let mut record = Vec::with_capacity(32 + 70 * client.keys.len());
        encode_id(&client.client_id, &mut record)?;
        let id_hash = self.hasher.hash_one(&record);
        record.extend_from_slice(&self.scope_set(&client.scopes).to_le_bytes());
        record.push(u8::try_from(client.keys.len()).map_err(|_| too_many())?);
        for key in &client.keys {
            let (_, der) = spki_der_from_pem(&key.public_key)
                .map_err(|e| format!("client {}: {e}", client.name))?;
            if fingerprint_spki_der(&der) != key.fingerprint {
                return Err(format!(
                    "client {}: key fingerprint does not match its key",
                    client.name
                ));
            }
            record.extend_from_slice(&limit(key.not_after));
            encode_key(&der, &mut record)?;
        }
        record.push(u8::try_from(client.api_keys.len()).map_err(|_| too_many())?);
        let mut api_keys = Vec::with_capacity(client.api_keys.len());
        for api_key in &client.api_keys {
            let digest = SecretDigest::decode(&api_key.digest)
                .ok_or_else(|| format!("client {}: malformed API key digest", client.name))?;
            record.extend_from_slice(&limit(api_key.not_after));
            record.extend_from_slice(digest.as_bytes());
            api_keys.push(digest);
        }
        Ok(Encoded {
            id_hash,
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
        self.remove_encoded(record_id(&encoded.record), encoded.id_hash);
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
        if let Some((encoded, hash)) = self.lookup_key(id) {
            self.remove_encoded(&encoded, hash);
        }
    }

    fn remove_encoded(&mut self, id: &[u8], hash: u64) {
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
            client_id: decode_id(record.id).into(),
            scopes: self.scope_sets[record.scope_set as usize].clone(),
        }
    }

    fn record(&self, id: &str) -> Option<Record<'_>> {
        let (encoded, hash) = self.lookup_key(id)?;
        self.by_id
            .find(hash, |r| record_id(r) == encoded.as_slice())
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
        Some((self.entry(&record), der.clone(), *not_after))
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
    fn ids_and_keys_are_kept_packed_and_read_back_exactly() {
        for id in [
            "kgc_0123456789abcdef0123456789abcdef",
            "kgc_0123456789ABCDEF0123456789abcdef",
            "kgc_0123",
            "orders-reader",
            "",
        ] {
            let mut encoded = Vec::new();
            encode_id(id, &mut encoded).unwrap();
            assert_eq!(decode_id(&encoded), id);
            assert_eq!(Cursor(&encoded).id(), Some(encoded.as_slice()));
        }
        let mut packed = Vec::new();
        encode_id("kgc_0123456789abcdef0123456789abcdef", &mut packed).unwrap();
        assert_eq!(packed.len(), 17, "keygate's own ids are packed");
        for algorithm in [
            KeyAlgorithm::ES256,
            KeyAlgorithm::EdDSA,
            KeyAlgorithm::RS256,
        ] {
            let pair = generate_key_pair(algorithm).unwrap();
            let (_, der) = spki_der_from_pem(&pair.public_pem).unwrap();
            let mut encoded = Vec::new();
            encode_key(&der, &mut encoded).unwrap();
            assert_eq!(Cursor(&encoded).key(), Some(der.clone()), "{algorithm:?}");
            if algorithm != KeyAlgorithm::RS256 {
                assert!(
                    encoded.len() < der.len(),
                    "{algorithm:?} is kept without its prefix"
                );
            }
        }
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
