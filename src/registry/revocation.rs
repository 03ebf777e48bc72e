//! Revoked tokens and clients. The token server adds to it, the operator (or `keygate dev`)
//! persists and publishes it, and the sidecar checks it on every request.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

/// The longest an access token can live; a per-client "not before" older than this can no
/// longer refuse anything and is pruned.
pub const MAX_TOKEN_LIFETIME_SECS: u64 = 24 * 3600;

/// Revoked token ids and per-client "not before" times. Serialised as is into policy files
/// and the persisted revocation store.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RevocationList {
    /// `jti` → the token's `exp` (Unix seconds); kept until then.
    #[serde(default)]
    pub tokens: BTreeMap<String, u64>,
    /// `client_id` → Unix seconds; tokens of that client issued before are refused.
    #[serde(default)]
    pub clients: BTreeMap<String, u64>,
}

impl RevocationList {
    /// Whether a token with `jti` of `client_id` issued at `iat` is revoked.
    pub fn is_revoked(&self, jti: Option<&str>, client_id: &str, iat: u64) -> bool {
        jti.is_some_and(|j| self.tokens.contains_key(j))
            || self.clients.get(client_id).is_some_and(|nb| iat < *nb)
    }

    /// Drops entries that can no longer refuse anything at `now`. Returns whether any went.
    pub fn prune(&mut self, now: u64) -> bool {
        let before = self.tokens.len() + self.clients.len();
        self.tokens.retain(|_, exp| *exp > now);
        self.clients
            .retain(|_, nb| nb.saturating_add(MAX_TOKEN_LIFETIME_SECS) > now);
        before != self.tokens.len() + self.clients.len()
    }
}

impl RevocationList {
    /// Adds `other`'s entries, keeping the strictest of each: a revoked token stays revoked,
    /// and a client's "not before" only moves later.
    pub fn absorb(&mut self, other: &RevocationList) {
        for (jti, exp) in &other.tokens {
            self.tokens.entry(jti.clone()).or_insert(*exp);
        }
        for (client, nb) in &other.clients {
            let entry = self.clients.entry(client.clone()).or_insert(*nb);
            *entry = (*entry).max(*nb);
        }
    }

    /// The entry that revokes the token with `jti` of `client_id` issued at `iat`, if any.
    pub fn revoking_entry(&self, jti: &str, client_id: &str, iat: u64) -> Option<RevocationList> {
        let mut entry = RevocationList::default();
        if let Some(exp) = self.tokens.get(jti) {
            entry.tokens.insert(jti.to_owned(), *exp);
        } else if let Some(nb) = self.clients.get(client_id).filter(|nb| iat < **nb) {
            entry.clients.insert(client_id.to_owned(), *nb);
        } else {
            return None;
        }
        Some(entry)
    }

    /// Whether the list has no entry.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty() && self.clients.is_empty()
    }
}

/// Why a revocation could not be made durable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the revocation could not be stored: {0}")]
pub struct StoreError(pub String);

/// Where a revocation is made durable, so that every replica and every sidecar learns it
/// even if the replica that answered dies at once. The token server answers a revocation
/// only after [`RevocationStore::store`] returned: a revocation answered is a revocation
/// kept.
pub trait RevocationStore: Send + Sync + 'static {
    /// Stores `entries` (merged with what is stored already); resolves once they are durable.
    fn store(
        &self,
        entries: RevocationList,
    ) -> futures::future::BoxFuture<'static, Result<(), StoreError>>;
}

/// The shared, observable revocation list.
#[derive(Debug)]
pub struct Revocations {
    tx: watch::Sender<Arc<RevocationList>>,
}

impl Default for Revocations {
    fn default() -> Self {
        Self::new(RevocationList::default())
    }
}

impl Revocations {
    /// Starts from a persisted list.
    pub fn new(initial: RevocationList) -> Self {
        Self {
            tx: watch::Sender::new(Arc::new(initial)),
        }
    }

    /// The current list.
    pub fn current(&self) -> Arc<RevocationList> {
        self.tx.borrow().clone()
    }

    /// A receiver that sees every change.
    pub fn subscribe(&self) -> watch::Receiver<Arc<RevocationList>> {
        self.tx.subscribe()
    }

    /// Revokes one token until its expiry.
    pub fn revoke_token(&self, jti: &str, exp: u64) {
        self.tx.send_if_modified(|list| {
            if list.tokens.get(jti) == Some(&exp) {
                return false;
            }
            Arc::make_mut(list).tokens.insert(jti.to_owned(), exp);
            true
        });
    }

    /// Revokes every token of `client_id` issued before `not_before`.
    pub fn revoke_client(&self, client_id: &str, not_before: u64) {
        self.tx.send_if_modified(|list| {
            if list
                .clients
                .get(client_id)
                .is_some_and(|nb| *nb >= not_before)
            {
                return false;
            }
            Arc::make_mut(list)
                .clients
                .insert(client_id.to_owned(), not_before);
            true
        });
    }

    /// Merges a list read from elsewhere (another replica, the persisted store).
    pub fn merge(&self, other: &RevocationList) {
        self.tx.send_if_modified(|list| {
            let mut merged = (**list).clone();
            merged.absorb(other);
            if merged == **list {
                return false;
            }
            *list = Arc::new(merged);
            true
        });
    }

    /// Prunes expired entries at `now`.
    pub fn prune(&self, now: u64) {
        self.tx.send_if_modified(|list| {
            let mut pruned = (**list).clone();
            if !pruned.prune(now) {
                return false;
            }
            *list = Arc::new(pruned);
            true
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_and_clients_are_revoked_and_pruned() {
        let revocations = Revocations::default();
        let mut rx = revocations.subscribe();
        revocations.revoke_token("j1", 100);
        assert!(rx.has_changed().unwrap());
        rx.mark_unchanged();
        revocations.revoke_token("j1", 100);
        assert!(!rx.has_changed().unwrap());
        revocations.revoke_client("kgc_1", 50);
        let list = revocations.current();
        assert!(list.is_revoked(Some("j1"), "kgc_2", 0));
        assert!(list.is_revoked(None, "kgc_1", 49));
        assert!(!list.is_revoked(None, "kgc_1", 50));
        assert!(!list.is_revoked(Some("j2"), "kgc_2", 0));
        revocations.prune(100);
        assert!(revocations.current().tokens.is_empty());
        assert_eq!(revocations.current().clients.len(), 1);
        revocations.prune(50 + MAX_TOKEN_LIFETIME_SECS);
        assert!(revocations.current().clients.is_empty());
    }

    #[test]
    fn merge_keeps_the_strictest_entries() {
        let revocations = Revocations::default();
        revocations.revoke_client("c", 10);
        let other = RevocationList {
            tokens: BTreeMap::from([("j".into(), 5)]),
            clients: BTreeMap::from([("c".into(), 20)]),
        };
        revocations.merge(&other);
        assert_eq!(revocations.current().clients["c"], 20);
        assert_eq!(revocations.current().tokens["j"], 5);
    }
}
