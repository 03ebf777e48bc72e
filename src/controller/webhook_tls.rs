//! The admission webhook's certificate when keygate manages it: a CA and a serving
//! certificate in the Secret `keygate-webhook-tls` ([`super::certs`]), renewed by the leader
//! before expiry, the CA injected into keygate's webhook configurations with server-side
//! apply, and swapped into every replica's TLS listener without a restart. With cert-manager,
//! the files it mounts are reloaded instead.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use k8s_openapi::api::admissionregistration::v1::{
    MutatingWebhookConfiguration, ValidatingWebhookConfiguration, WebhookClientConfig,
};
use kube::api::{Patch, PatchParams};
use kube::{Api, Client};
use prometheus_client::metrics::gauge::Gauge;
use serde_json::json;
use tokio::sync::watch;

use super::certs::{self, SelfManagedCert};
use super::{MANAGER, Result, timed};
use crate::tls::CertResolver;

/// The Secret holding the webhook's CA and serving certificate.
pub const WEBHOOK_TLS_SECRET: &str = "keygate-webhook-tls";

/// Which webhook configurations get the CA bundle.
#[derive(Debug, Clone, Default)]
pub struct WebhookConfigurations {
    pub mutating: Option<String>,
    pub validating: Option<String>,
}

/// The webhook's certificate for the Service `service` in `namespace`.
pub fn self_managed_cert(service: &str, namespace: &str) -> SelfManagedCert {
    SelfManagedCert {
        secret: WEBHOOK_TLS_SECRET,
        ca_name: crate::webhook::tls::CA_NAME,
        names: crate::tls::service_names(service, namespace),
        what: "webhook",
    }
}

/// One pass of the leader: keeps the certificates valid and the CA bundle injected.
pub async fn maintain(
    client: &Client,
    namespace: &str,
    service: &str,
    configurations: &WebhookConfigurations,
) -> Result<()> {
    let certs =
        certs::maintain_secret(client, namespace, &self_managed_cert(service, namespace)).await?;
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
    leading: watch::Receiver<bool>,
) {
    certs::every_while_leading(
        Duration::from_secs(600),
        leading,
        "webhook certificate",
        || maintain(&client, &namespace, &service, &configurations),
    )
    .await;
}

/// Watches the certificate Secret ([`certs::watch_secret`]).
pub async fn watch_secret(client: Client, namespace: String, expiry: Gauge) -> Arc<CertResolver> {
    certs::watch_secret(client, namespace, WEBHOOK_TLS_SECRET, "webhook", expiry).await
}

/// Loads and reloads the certificate files cert-manager mounts ([`certs::watch_files`]).
pub fn watch_files(dir: PathBuf, expiry: Gauge) -> std::result::Result<Arc<CertResolver>, String> {
    certs::watch_files(dir, "webhook", expiry)
}
