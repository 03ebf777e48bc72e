//! The admission webhook's certificate when keygate manages it: a CA and a serving
//! certificate in the Secret `keygate-webhook-tls`, renewed by the leader before expiry, the
//! CA injected into keygate's webhook configurations with server-side apply, and swapped into
//! every replica's TLS listener without a restart. With cert-manager, the files it mounts
//! are reloaded instead.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use futures::StreamExt;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration, WebhookClientConfig,
};
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Patch, PatchParams};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use serde_json::json;
use tokio::sync::watch;

use super::{Error, MANAGED_BY, MANAGER, Result, timed};
use crate::webhook::tls::{self, CertResolver, RENEW_BEFORE, WebhookCerts};

/// The Secret holding the webhook's CA and serving certificate.
pub const WEBHOOK_TLS_SECRET: &str = "keygate-webhook-tls";

/// Which webhook configurations get the CA bundle.
#[derive(Debug, Clone, Default)]
pub struct WebhookConfigurations {
    pub mutating: Option<String>,
    pub validating: Option<String>,
}

/// One pass of the leader: keeps the certificates valid and the CA bundle injected.
pub async fn maintain(
    client: &Client,
    namespace: &str,
    service: &str,
    configurations: &WebhookConfigurations,
) -> Result<()> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let existing = timed(secrets.get_opt(WEBHOOK_TLS_SECRET)).await?;
    let current = existing
        .as_ref()
        .and_then(|s| s.data.as_ref())
        .and_then(|d| WebhookCerts::from_secret_data(d).ok());
    let names = tls::service_names(service, namespace);
    let (certs, renewal) = tls::ensure(current.as_ref(), &names, SystemTime::now(), RENEW_BEFORE)
        .map_err(|e| Error::Invalid(format!("webhook certificate: {e}")))?;
    if renewal != tls::Renewal::Kept {
        let desired = Secret {
            metadata: ObjectMeta {
                name: Some(WEBHOOK_TLS_SECRET.into()),
                namespace: Some(namespace.into()),
                labels: Some(BTreeMap::from([(MANAGED_BY.0.into(), MANAGED_BY.1.into())])),
                ..ObjectMeta::default()
            },
            type_: Some("Opaque".into()),
            data: Some(certs.to_secret_data()),
            ..Secret::default()
        };
        timed(secrets.patch(
            WEBHOOK_TLS_SECRET,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&desired),
        ))
        .await?;
        tracing::info!(?renewal, "webhook certificate renewed");
    }
    inject_ca_bundle(client, &certs.ca_crt, configurations).await
}

/// Sets `clientConfig.caBundle` of every webhook in keygate's configurations, owning only
/// that field, and only when it differs.
async fn inject_ca_bundle(
    client: &Client,
    ca_pem: &str,
    configurations: &WebhookConfigurations,
) -> Result<()> {
    let bundle = STANDARD.encode(ca_pem);
    if let Some(name) = &configurations.mutating {
        inject_into::<MutatingWebhookConfiguration>(client, name, &bundle).await?;
    }
    if let Some(name) = &configurations.validating {
        inject_into::<ValidatingWebhookConfiguration>(client, name, &bundle).await?;
    }
    Ok(())
}

/// A webhook configuration kind: its webhooks' names and current CA bundles (base64).
trait WebhookConfiguration {
    fn hook_bundles(&self) -> Vec<(String, Option<String>)>;
}

/// Both kinds have `webhooks` with `name` and `clientConfig`, in different Rust types.
macro_rules! webhook_configuration {
    ($($kind:ty),*) => {$(
        impl WebhookConfiguration for $kind {
            fn hook_bundles(&self) -> Vec<(String, Option<String>)> {
                hook_bundles(self.webhooks.iter().flatten().map(|w| (&w.name, &w.client_config)))
            }
        }
    )*};
}
webhook_configuration!(MutatingWebhookConfiguration, ValidatingWebhookConfiguration);

/// Each webhook's name and its current CA bundle, base64-encoded.
fn hook_bundles<'a>(
    hooks: impl Iterator<Item = (&'a String, &'a WebhookClientConfig)>,
) -> Vec<(String, Option<String>)> {
    hooks
        .map(|(name, config)| {
            let bundle = config.ca_bundle.as_ref().map(|b| STANDARD.encode(&b.0));
            (name.clone(), bundle)
        })
        .collect()
}

/// Injects `bundle` into the webhook configuration `name` of kind `K`, when it exists.
async fn inject_into<K>(client: &Client, name: &str, bundle: &str) -> Result<()>
where
    K: WebhookConfiguration
        + kube::Resource<DynamicType = (), Scope = kube::core::ClusterResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug,
{
    let api: Api<K> = Api::all(client.clone());
    if let Some(existing) = timed(api.get_opt(name)).await? {
        apply_bundle(&api, name, &K::kind(&()), &existing.hook_bundles(), bundle).await?;
    }
    Ok(())
}

async fn apply_bundle<K>(
    api: &Api<K>,
    name: &str,
    kind: &str,
    hooks: &[(String, Option<String>)],
    bundle: &str,
) -> Result<()>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    if hooks.is_empty()
        || hooks
            .iter()
            .all(|(_, current)| current.as_deref() == Some(bundle))
    {
        return Ok(());
    }
    let patch = json!({
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": kind,
        "metadata": {"name": name},
        "webhooks": hooks.iter().map(|(hook, _)| json!({"name": hook, "clientConfig": {"caBundle": bundle}})).collect::<Vec<_>>(),
    });
    timed(api.patch(
        name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&patch),
    ))
    .await?;
    tracing::info!(%kind, %name, "CA bundle injected");
    Ok(())
}

/// Maintains the certificates every ten minutes while this replica leads.
pub async fn maintain_while_leading(
    client: Client,
    namespace: String,
    service: String,
    configurations: WebhookConfigurations,
    mut leading: watch::Receiver<bool>,
) {
    let mut ticker = tokio::time::interval(Duration::from_secs(600));
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            changed = leading.changed() => if changed.is_err() { return },
        }
        if *leading.borrow()
            && let Err(error) = maintain(&client, &namespace, &service, &configurations).await
        {
            tracing::warn!(%error, "cannot maintain the webhook certificate; retrying");
        }
    }
}

/// Watches the certificate Secret: resolves with a resolver once the first valid pair
/// arrives, and swaps every later one into it.
pub async fn watch_secret(client: Client, namespace: String) -> Arc<CertResolver> {
    let secrets: Api<Secret> = Api::namespaced(client, &namespace);
    let config = watcher::Config::default().fields(&format!("metadata.name={WEBHOOK_TLS_SECRET}"));
    let mut events = watcher(secrets, config)
        .default_backoff()
        .applied_objects()
        .boxed();
    let parse = |secret: &Secret| {
        secret
            .data
            .as_ref()
            .and_then(|d| WebhookCerts::from_secret_data(d).ok())
    };
    let resolver = loop {
        match events.next().await {
            Some(Ok(secret)) => {
                if let Some(Ok(resolver)) =
                    parse(&secret).map(|c| CertResolver::from_pem(&c.tls_crt, &c.tls_key))
                {
                    break resolver;
                }
                tracing::warn!(
                    "the webhook certificate Secret is malformed; waiting for a valid one"
                );
            }
            Some(Err(error)) => {
                tracing::warn!(%error, "watching the webhook certificate failed; retrying")
            }
            None => std::future::pending().await,
        }
    };
    let swapper = resolver.clone();
    tokio::spawn(async move {
        while let Some(event) = events.next().await {
            if let Ok(secret) = event {
                match parse(&secret).map(|c| swapper.swap(&c.tls_crt, &c.tls_key)) {
                    Some(Ok(())) => tracing::info!("webhook certificate swapped"),
                    _ => tracing::error!("invalid webhook certificate; keeping the current one"),
                }
            }
        }
    });
    resolver
}

/// Loads `tls.crt`/`tls.key` from `dir` (a cert-manager Secret mount) and reloads them every
/// minute, so a renewed certificate is served without a restart.
pub fn watch_files(dir: PathBuf) -> std::result::Result<Arc<CertResolver>, String> {
    let read = move |dir: &PathBuf| -> std::result::Result<(String, String), String> {
        let cert = std::fs::read_to_string(dir.join(tls::TLS_CRT))
            .map_err(|e| format!("{}: {e}", dir.join(tls::TLS_CRT).display()))?;
        let key = std::fs::read_to_string(dir.join(tls::TLS_KEY))
            .map_err(|e| format!("{}: {e}", dir.join(tls::TLS_KEY).display()))?;
        Ok((cert, key))
    };
    let (cert, key) = read(&dir)?;
    let resolver = CertResolver::from_pem(&cert, &key).map_err(|e| e.to_string())?;
    let swapper = resolver.clone();
    tokio::spawn(async move {
        let mut last = (cert, key);
        let mut ticker = tokio::time::interval(Duration::from_secs(60));
        loop {
            ticker.tick().await;
            match read(&dir) {
                Ok(current) if current != last => match swapper.swap(&current.0, &current.1) {
                    Ok(()) => {
                        tracing::info!("webhook certificate reloaded from files");
                        last = current;
                    }
                    Err(error) => {
                        tracing::error!(%error, "invalid webhook certificate files; keeping the current one")
                    }
                },
                Ok(_) => {}
                Err(error) => tracing::warn!(%error, "cannot read the webhook certificate files"),
            }
        }
    });
    Ok(resolver)
}
