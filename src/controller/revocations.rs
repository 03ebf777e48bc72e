//! Revocations shared by every replica through the ConfigMap `keygate-revocations`: each
//! replica merges what it revokes into the ConfigMap (optimistic concurrency, retried on
//! conflict) and merges what the others wrote into its own list. It holds token ids and
//! client ids, never a secret. This is the one write every replica makes, not only the
//! leader: a revocation must not wait for a leader.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::ConfigMap;
use kube::api::PostParams;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};

use super::{Result, timed};
use crate::credentials::unix_now;
use crate::registry::{RevocationList, Revocations};

/// The ConfigMap holding revocations.
pub const REVOCATIONS_CONFIGMAP: &str = "keygate-revocations";
const LIST_KEY: &str = "revocations.json";

fn parse(cm: &ConfigMap) -> RevocationList {
    cm.data
        .as_ref()
        .and_then(|d| d.get(LIST_KEY))
        .and_then(|json| serde_json::from_str(json).ok())
        .unwrap_or_default()
}

/// Merges `local` into the stored list and writes it when it changed.
async fn write(api: &Api<ConfigMap>, namespace: &str, local: &RevocationList) -> Result<()> {
    for _ in 0..5 {
        let existing = timed(api.get_opt(REVOCATIONS_CONFIGMAP)).await?;
        let stored = existing.as_ref().map(parse).unwrap_or_default();
        let mut merged = stored.clone();
        for (jti, exp) in &local.tokens {
            merged.tokens.entry(jti.clone()).or_insert(*exp);
        }
        for (client, nb) in &local.clients {
            let entry = merged.clients.entry(client.clone()).or_insert(*nb);
            *entry = (*entry).max(*nb);
        }
        merged.prune(unix_now());
        if existing.is_some() && merged == stored {
            return Ok(());
        }
        let mut cm = existing.unwrap_or_else(|| ConfigMap {
            metadata: super::own_object_meta(REVOCATIONS_CONFIGMAP, namespace),
            ..ConfigMap::default()
        });
        cm.data = Some(BTreeMap::from([(
            LIST_KEY.into(),
            serde_json::to_string(&merged)?,
        )]));
        let result = if cm.metadata.resource_version.is_some() {
            timed(api.replace(REVOCATIONS_CONFIGMAP, &PostParams::default(), &cm)).await
        } else {
            timed(api.create(&PostParams::default(), &cm)).await
        };
        match result {
            Ok(_) => return Ok(()),
            // Another replica wrote first: read again and merge.
            Err(super::Error::Kube(kube::Error::Api(status))) if status.code == 409 => continue,
            Err(error) => return Err(error),
        }
    }
    Err(super::Error::Invalid(
        "revocations kept conflicting; will retry".into(),
    ))
}

/// Keeps `revocations` and the ConfigMap in sync, and prunes expired entries.
pub fn spawn_sync(client: Client, namespace: String, revocations: Arc<Revocations>) {
    let api: Api<ConfigMap> = Api::namespaced(client, &namespace);
    {
        let api = api.clone();
        let revocations = revocations.clone();
        let config =
            watcher::Config::default().fields(&format!("metadata.name={REVOCATIONS_CONFIGMAP}"));
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
    tokio::spawn(async move {
        let mut local = revocations.subscribe();
        let mut prune = tokio::time::interval(Duration::from_secs(300));
        loop {
            tokio::select! {
                changed = local.changed() => if changed.is_err() { return },
                _ = prune.tick() => revocations.prune(unix_now()),
            }
            let list = local.borrow_and_update().clone();
            if let Err(error) = write(&api, &namespace, &list).await {
                tracing::warn!(%error, "cannot store revocations; retrying");
                tokio::time::sleep(Duration::from_secs(2)).await;
                local.mark_changed();
            }
        }
    });
}
