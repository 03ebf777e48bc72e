//! Revocations shared by every replica, stored in the ConfigMaps `keygate-revocations-0` to
//! `keygate-revocations-15` of the operator's namespace (label `keygate.dev/store:
//! revocations`). They hold token ids and client ids, never a secret. This is the one write
//! every replica makes, not only the leader: a revocation must not wait for a leader.
//!
//! - **Stored before answered.** The token server answers `POST /oauth2/revoke` only after
//!   [`ConfigMapStore`] has written the revocation (the [`RevocationStore`] contract), so a
//!   replica killed right after answering loses nothing.
//! - **Group commit.** One writer task per replica takes every revocation waiting, merges them
//!   and writes each shard they touch once (read, merge, prune, replace with the read
//!   `resourceVersion`; on a conflict with another replica, read again), then answers them
//!   all. A burst costs a write per shard, not per revocation.
//! - **Sharded.** An entry's shard is the first byte of the SHA-256 of its token id (or client
//!   id) modulo [`SHARDS`], so the store holds sixteen ConfigMaps' worth (about 27,000
//!   revoked tokens each at 38 bytes an entry), and two replicas writing at once rarely meet
//!   on the same shard.
//! - **Read by a watch** of every shard (by label), merged into the in-memory list that the
//!   token server, introspection and the policy files use.
//! - The ConfigMap `keygate-revocations` of earlier versions is read once at start, its
//!   entries stored in the shards, and then deleted.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::future::BoxFuture;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::{DeleteParams, PostParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use tokio::sync::{mpsc, oneshot};

use super::{Result, timed};
use crate::credentials::unix_now;
use crate::registry::{RevocationList, RevocationStore, Revocations, StoreError};

/// How many ConfigMaps the revocations are spread over.
pub const SHARDS: usize = 16;
/// The label every shard carries; the watch selects by it.
pub const SHARD_LABEL: (&str, &str) = ("keygate.dev/store", "revocations");
/// The single ConfigMap of earlier versions, migrated into the shards at start.
pub const LEGACY_CONFIGMAP: &str = "keygate-revocations";
const LIST_KEY: &str = "revocations.json";
/// A shard is refused past this size, below the API server's 1 MiB limit for a ConfigMap.
const MAX_SHARD_BYTES: usize = 900 * 1024;
/// How many revocations one group commit takes at most.
const MAX_BATCH: usize = 4096;
/// Attempts per shard write before giving up (each conflict means another replica wrote).
const ATTEMPTS: u32 = 10;

/// The name of shard `index`.
pub fn shard_name(index: usize) -> String {
    format!("{LEGACY_CONFIGMAP}-{index}")
}

/// The shard that holds the entry for `key` (a token id or a client id).
pub fn shard_of(key: &str) -> usize {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, key.as_bytes());
    usize::from(digest.as_ref()[0]) % SHARDS
}

/// `list` split by shard.
fn split(list: &RevocationList) -> BTreeMap<usize, RevocationList> {
    let mut shards: BTreeMap<usize, RevocationList> = BTreeMap::new();
    for (jti, exp) in &list.tokens {
        shards
            .entry(shard_of(jti))
            .or_default()
            .tokens
            .insert(jti.clone(), *exp);
    }
    for (client, nb) in &list.clients {
        shards
            .entry(shard_of(client))
            .or_default()
            .clients
            .insert(client.clone(), *nb);
    }
    shards
}

fn parse(cm: &ConfigMap) -> RevocationList {
    cm.data
        .as_ref()
        .and_then(|d| d.get(LIST_KEY))
        .and_then(|json| serde_json::from_str(json).ok())
        .unwrap_or_default()
}

/// Merges `entries` into shard `index` and writes it unless it already holds them.
async fn write_shard(
    api: &Api<ConfigMap>,
    namespace: &str,
    index: usize,
    entries: &RevocationList,
) -> Result<()> {
    let name = shard_name(index);
    for attempt in 0..ATTEMPTS {
        if attempt > 0 {
            // Another replica wrote this shard between our read and write: read it again,
            // after a pause that keeps two replicas from meeting again in lockstep.
            let pause = crate::connections::jittered(
                Duration::from_millis(5 * u64::from(attempt)),
                Duration::from_millis(20),
            );
            tokio::time::sleep(pause).await;
        }
        let existing = timed(api.get_opt(&name)).await?;
        let stored = existing.as_ref().map(parse).unwrap_or_default();
        let mut merged = stored.clone();
        merged.absorb(entries);
        merged.prune(unix_now());
        if existing.is_some() && merged == stored {
            return Ok(());
        }
        let json = serde_json::to_string(&merged)?;
        if json.len() > MAX_SHARD_BYTES {
            return Err(super::Error::Invalid(format!(
                "revocation shard {name} would hold {} bytes, over {MAX_SHARD_BYTES}",
                json.len()
            )));
        }
        let mut cm = existing.unwrap_or_else(|| {
            let mut metadata = super::own_object_meta(&name, namespace);
            metadata
                .labels
                .get_or_insert_default()
                .insert(SHARD_LABEL.0.into(), SHARD_LABEL.1.into());
            ConfigMap {
                metadata,
                ..ConfigMap::default()
            }
        });
        cm.data = Some(BTreeMap::from([(LIST_KEY.into(), json)]));
        let result = if cm.metadata.resource_version.is_some() {
            timed(api.replace(&name, &PostParams::default(), &cm)).await
        } else {
            timed(api.create(&PostParams::default(), &cm)).await
        };
        match result {
            Ok(_) => return Ok(()),
            // 409: replaced since we read it, or created by another replica first.
            Err(super::Error::Kube(kube::Error::Api(status))) if status.code == 409 => continue,
            Err(error) => return Err(error),
        }
    }
    Err(super::Error::Invalid(format!(
        "revocation shard {name} kept conflicting with other replicas"
    )))
}

/// Writes `list` into its shards, each shard once, concurrently.
async fn write_all(api: &Api<ConfigMap>, namespace: &str, list: &RevocationList) -> Result<()> {
    let writes = split(list)
        .into_iter()
        .map(|(index, entries)| async move { write_shard(api, namespace, index, &entries).await });
    for result in futures::future::join_all(writes).await {
        result?;
    }
    Ok(())
}

/// A revocation waiting for the writer.
struct Pending {
    entries: RevocationList,
    done: oneshot::Sender<std::result::Result<(), StoreError>>,
}

/// The [`RevocationStore`] of a replica: the shard ConfigMaps, written by one group-commit
/// task.
pub struct ConfigMapStore {
    tx: mpsc::Sender<Pending>,
}

impl ConfigMapStore {
    /// Starts the writer for the shards in `namespace`.
    pub fn spawn(client: Client, namespace: String) -> Arc<Self> {
        let (tx, mut rx) = mpsc::channel::<Pending>(MAX_BATCH);
        let api: Api<ConfigMap> = Api::namespaced(client, &namespace);
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut batch = vec![first];
                while batch.len() < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(pending) => batch.push(pending),
                        Err(_) => break,
                    }
                }
                let mut all = RevocationList::default();
                for pending in &batch {
                    all.absorb(&pending.entries);
                }
                let result = write_all(&api, &namespace, &all).await.map_err(|error| {
                    tracing::warn!(%error, revocations = batch.len(), "cannot store revocations");
                    StoreError(error.to_string())
                });
                for pending in batch {
                    let _ = pending.done.send(result.clone());
                }
            }
        });
        Arc::new(Self { tx })
    }
}

impl RevocationStore for ConfigMapStore {
    fn store(
        &self,
        entries: RevocationList,
    ) -> BoxFuture<'static, std::result::Result<(), StoreError>> {
        let tx = self.tx.clone();
        Box::pin(async move {
            let (done, answer) = oneshot::channel();
            tx.send(Pending { entries, done })
                .await
                .map_err(|_| StoreError("the revocation writer has stopped".into()))?;
            answer
                .await
                .map_err(|_| StoreError("the revocation writer has stopped".into()))?
        })
    }
}

/// Keeps `revocations` up to date with every shard (a watch), migrates the ConfigMap of
/// earlier versions into the shards, and prunes expired entries from memory.
pub fn spawn_watch(
    client: Client,
    namespace: String,
    revocations: Arc<Revocations>,
    store: Arc<ConfigMapStore>,
) {
    let api: Api<ConfigMap> = Api::namespaced(client, &namespace);
    {
        let api = api.clone();
        let revocations = revocations.clone();
        let config =
            watcher::Config::default().labels(&format!("{}={}", SHARD_LABEL.0, SHARD_LABEL.1));
        tokio::spawn(async move {
            let mut events = watcher(api, config)
                .default_backoff()
                .applied_objects()
                .boxed();
            while let Some(event) = events.next().await {
                match event {
                    Ok(cm) => revocations.merge(&parse(&cm)),
                    Err(error) => tracing::warn!(%error, "watching revocations failed; retrying"),
                }
            }
        });
    }
    {
        let revocations = revocations.clone();
        tokio::spawn(async move {
            let mut backoff = Duration::from_secs(1);
            loop {
                match migrate(&api, &revocations, &store).await {
                    Ok(()) => return,
                    Err(error) => {
                        tracing::warn!(%error, "cannot migrate {LEGACY_CONFIGMAP}; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(60));
                    }
                }
            }
        });
    }
    tokio::spawn(async move {
        let mut prune = tokio::time::interval(Duration::from_secs(300));
        loop {
            prune.tick().await;
            revocations.prune(unix_now());
        }
    });
}

/// Moves the entries of [`LEGACY_CONFIGMAP`] into the shards, then deletes it.
async fn migrate(
    api: &Api<ConfigMap>,
    revocations: &Revocations,
    store: &ConfigMapStore,
) -> std::result::Result<(), String> {
    let Some(legacy) = timed(api.get_opt(LEGACY_CONFIGMAP))
        .await
        .map_err(|e| e.to_string())?
    else {
        return Ok(());
    };
    let mut list = parse(&legacy);
    list.prune(unix_now());
    revocations.merge(&list);
    if !list.is_empty() {
        store.store(list).await.map_err(|e| e.to_string())?;
    }
    timed(api.delete(LEGACY_CONFIGMAP, &DeleteParams::default()))
        .await
        .map_err(|e| e.to_string())?;
    tracing::info!("revocations moved from {LEGACY_CONFIGMAP} into its shards");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_spread_over_every_shard_and_stay_put() {
        let list = RevocationList {
            tokens: (0..2000).map(|i| (format!("jti-{i}"), 100)).collect(),
            clients: BTreeMap::from([("kgc_1".into(), 5)]),
        };
        let shards = split(&list);
        assert_eq!(shards.len(), SHARDS, "2,000 ids reach every shard");
        let total: usize = shards
            .values()
            .map(|s| s.tokens.len() + s.clients.len())
            .sum();
        assert_eq!(total, 2001);
        for (index, shard) in &shards {
            assert!(shard.tokens.keys().all(|jti| shard_of(jti) == *index));
            // No shard holds more than twice its share.
            assert!(
                shard.tokens.len() < 2 * 2000 / SHARDS,
                "{index}: {}",
                shard.tokens.len()
            );
        }
        // The placement is part of the stored format: it must never change.
        assert_eq!(shard_of("jti-0"), shard_of("jti-0"));
        assert_eq!(shard_name(3), "keygate-revocations-3");
    }
}
