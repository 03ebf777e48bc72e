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
use crate::token::keys::{IssuerKeys, RotationPolicy, StoredKeySet};

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

/// Watches the signing keys Secret; resolves with a receiver once the first valid key set
/// arrives, and keeps it current afterwards.
pub async fn watch_keys(client: Client, namespace: String) -> watch::Receiver<Arc<IssuerKeys>> {
    let mut events = super::watch_named::<Secret>(client, &namespace, SIGNING_SECRET);
    let first = loop {
        match events.next().await {
            Some(Ok(secret)) => match stored(&secret).map(|s| IssuerKeys::from_stored(&s)) {
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
            match event.map(|s| stored(&s).map(|k| IssuerKeys::from_stored(&k))) {
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
