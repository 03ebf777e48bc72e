//! The issuer's signing keys, kept in the Secret `keygate-signing-keys` of the operator's
//! namespace. The leader maintains them (create, rotate, retire); every replica watches the
//! Secret and signs with its current key.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use tokio::sync::watch;

use super::{MANAGER, Result, timed};
use crate::credentials::unix_now;
use crate::token::keys::{IssuerKeys, KeyState, RotationPolicy, StoredKeySet};

/// The Secret holding the signing keys.
pub const SIGNING_SECRET: &str = "keygate-signing-keys";
/// Its data key.
const KEYS_KEY: &str = "keys.json";

fn stored(secret: &Secret) -> Option<StoredKeySet> {
    let bytes = secret.data.as_ref()?.get(KEYS_KEY)?;
    serde_json::from_slice(&bytes.0).ok()
}

/// One maintenance pass: creates the keys when missing, rotates and retires on schedule,
/// and writes only when something changed.
pub async fn maintain(client: &Client, namespace: &str, policy: RotationPolicy) -> Result<()> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let existing = timed(secrets.get_opt(SIGNING_SECRET)).await?;
    let mut keys = existing.as_ref().and_then(stored).unwrap_or_default();
    if !keys.maintain(policy, unix_now())? && existing.is_some() {
        return Ok(());
    }
    let desired = Secret {
        metadata: super::own_object_meta(SIGNING_SECRET, namespace),
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([(
            KEYS_KEY.into(),
            ByteString(serde_json::to_vec(&keys)?),
        )])),
        ..Secret::default()
    };
    timed(secrets.patch(
        SIGNING_SECRET,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&desired),
    ))
    .await?;
    tracing::info!("signing keys updated");
    Ok(())
}

/// Maintains the keys every minute while this replica leads.
pub async fn maintain_while_leading(
    client: Client,
    namespace: String,
    policy: RotationPolicy,
    leading: watch::Receiver<bool>,
) {
    super::certs::every_while_leading(Duration::from_secs(60), leading, "signing keys", || {
        maintain(&client, &namespace, policy)
    })
    .await;
}

/// When the current key of `keys` became current, and when it is due for rotation under a
/// rotation every `every_secs`.
fn current_key_times(keys: &StoredKeySet, every_secs: u64) -> Option<(u64, u64)> {
    let since = keys
        .keys
        .iter()
        .find(|k| k.state == KeyState::Current)?
        .since;
    Some((since, since.saturating_add(every_secs)))
}

/// Parses the key set of `secret`, recording its current key's times in `metrics`.
fn load(
    secret: &Secret,
    every_secs: u64,
    metrics: &super::ReplicaMetrics,
) -> Option<crate::credentials::Result<Arc<IssuerKeys>>> {
    let stored = stored(secret)?;
    let keys = IssuerKeys::from_stored(&stored);
    if keys.is_ok()
        && let Some((since, due)) = current_key_times(&stored, every_secs)
    {
        metrics
            .signing_key_created
            .set(i64::try_from(since).unwrap_or(i64::MAX));
        metrics
            .signing_key_next_rotation
            .set(i64::try_from(due).unwrap_or(i64::MAX));
    }
    Some(keys)
}

/// Watches the signing keys Secret; resolves with a receiver once the first valid key set
/// arrives, and keeps it current afterwards. The current key's times go to `metrics`
/// (`keygate_signing_key_*`), its rotation due `every_secs` after it became current.
pub async fn watch_keys(
    client: Client,
    namespace: String,
    every_secs: u64,
    metrics: super::ReplicaMetrics,
) -> watch::Receiver<Arc<IssuerKeys>> {
    let mut events = super::watch_named::<Secret>(client, &namespace, SIGNING_SECRET);
    let first = loop {
        match events.next().await {
            Some(Ok(secret)) => match load(&secret, every_secs, &metrics) {
                Some(Ok(keys)) => break keys,
                _ => {
                    tracing::warn!("the signing keys Secret is malformed; waiting for a valid one")
                }
            },
            Some(Err(error)) => {
                tracing::warn!(%error, "watching the signing keys failed; retrying")
            }
            None => std::future::pending().await,
        }
    };
    let (tx, rx) = watch::channel(first);
    tokio::spawn(async move {
        while let Some(event) = events.next().await {
            match event.map(|s| load(&s, every_secs, &metrics)) {
                Ok(Some(Ok(keys))) => {
                    tx.send_replace(keys);
                }
                Ok(_) => tracing::error!(
                    "the signing keys Secret is malformed; keeping the last good keys"
                ),
                Err(error) => tracing::warn!(%error, "watching the signing keys failed; retrying"),
            }
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_current_keys_times_are_recorded() {
        let policy = RotationPolicy {
            algorithm: crate::api::KeyAlgorithm::ES256,
            every_secs: 3600,
            max_token_lifetime_secs: 60,
        };
        let mut keys = StoredKeySet::default();
        keys.maintain(policy, 1000).unwrap();
        // An hour later the next key became current.
        keys.maintain(policy, 4600).unwrap();
        assert_eq!(current_key_times(&keys, 3600), Some((4600, 8200)));
        let secret = Secret {
            data: Some(BTreeMap::from([(
                KEYS_KEY.into(),
                ByteString(serde_json::to_vec(&keys).unwrap()),
            )])),
            ..Secret::default()
        };
        let mut registry = prometheus_client::registry::Registry::default();
        let metrics = super::super::ReplicaMetrics::register(&mut registry);
        assert!(matches!(load(&secret, 3600, &metrics), Some(Ok(_))));
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &registry).unwrap();
        assert!(text.contains("keygate_signing_key_created_timestamp_seconds 4600\n"));
        assert!(text.contains("keygate_signing_key_next_rotation_timestamp_seconds 8200\n"));
    }
}
