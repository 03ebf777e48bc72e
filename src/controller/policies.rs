//! ScopePolicy → policy ConfigMap (`<name>-keygate-policy`, key `policy.json`), the
//! NetworkPolicy of capture mode `network-policy` (`<name>-keygate-sidecar-only`) and status.
//! The ConfigMap holds exactly the sidecar's policy file, built by the same function
//! `keygate dev` uses, from the registry snapshot, the signing keys and the revocations.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPort, NetworkPolicySpec,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta, Time};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::api::{Patch, PatchParams};
use kube::core::DeserializeGuard;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::{Api, Resource, ResourceExt};

use super::{Context, Error, MANAGED_BY, MANAGER, POLICY_LABEL, ReconcileLabels, Result, timed};
use crate::api::{ScopePolicy, ScopePolicyStatus, ready_condition};
use crate::policy::{BuildError, PolicyDocument};
use crate::registry::ObjectKey;

/// The ConfigMap key holding the policy file.
pub const POLICY_KEY: &str = "policy.json";
/// The ConfigMap key holding the CA of the policy stream's (the token server's)
/// certificate, for sidecars that follow the stream. Public: a certificate, never a key.
pub const POLICY_CA_KEY: &str = "ca.crt";

/// The most a ConfigMap's data may hold (the API server's limit is 1 MiB).
pub const MAX_POLICY_BYTES: usize = 1024 * 1024;

/// The ConfigMap name of a ScopePolicy.
pub fn config_map_name(policy: &str) -> String {
    format!("{policy}-keygate-policy")
}

/// The NetworkPolicy name of a ScopePolicy.
pub fn network_policy_name(policy: &str) -> String {
    format!("{policy}-keygate-sidecar-only")
}

/// The NetworkPolicy of capture mode `network-policy`: Pods the webhook labelled
/// `keygate.dev/capture: network-policy` take inbound traffic only on the sidecar's named
/// ports (`keygate`, `keygate-admin`), so the app's port answers nobody outside the Pod.
/// Pods of every ScopePolicy of the namespace match it; each ScopePolicy owns an identical
/// copy, so the namespace keeps one for as long as it has a ScopePolicy.
pub fn network_policy(policy: &ScopePolicy) -> NetworkPolicy {
    use crate::webhook::inject::{ADMIN_PORT_NAME, CAPTURE_LABEL, CaptureMode, LISTEN_PORT_NAME};
    let port = |name: &str| NetworkPolicyPort {
        port: Some(IntOrString::String(name.to_owned())),
        protocol: Some("TCP".to_owned()),
        ..NetworkPolicyPort::default()
    };
    NetworkPolicy {
        metadata: ObjectMeta {
            name: Some(network_policy_name(&policy.name_any())),
            namespace: policy.namespace(),
            labels: Some(BTreeMap::from([
                (MANAGED_BY.0.to_owned(), MANAGED_BY.1.to_owned()),
                (POLICY_LABEL.to_owned(), policy.name_any()),
            ])),
            owner_references: policy.controller_owner_ref(&()).map(|o| vec![o]),
            ..ObjectMeta::default()
        },
        spec: Some(NetworkPolicySpec {
            pod_selector: Some(LabelSelector {
                match_labels: Some(BTreeMap::from([(
                    CAPTURE_LABEL.to_owned(),
                    CaptureMode::NetworkPolicy.as_str().to_owned(),
                )])),
                ..LabelSelector::default()
            }),
            policy_types: Some(vec!["Ingress".to_owned()]),
            ingress: Some(vec![NetworkPolicyIngressRule {
                ports: Some(vec![port(LISTEN_PORT_NAME), port(ADMIN_PORT_NAME)]),
                ..NetworkPolicyIngressRule::default()
            }]),
            ..NetworkPolicySpec::default()
        }),
    }
}

/// Writes the ScopePolicy's NetworkPolicy when it is missing or differs.
async fn apply_network_policy(ctx: &Context, policy: &ScopePolicy, namespace: &str) -> Result<()> {
    let desired = network_policy(policy);
    let name = network_policy_name(&policy.name_any());
    let api: Api<NetworkPolicy> = Api::namespaced(ctx.client.clone(), namespace);
    let existing = timed(api.get_opt(&name)).await?;
    if existing.is_some_and(|e| e.spec == desired.spec) {
        return Ok(());
    }
    timed(api.patch(
        &name,
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&desired),
    ))
    .await?;
    ctx.wrote("scopepolicy");
    Ok(())
}

/// Reconciles one ScopePolicy.
pub async fn reconcile(
    object: Arc<DeserializeGuard<ScopePolicy>>,
    ctx: Arc<Context>,
) -> Result<Action> {
    let policy = match &object.0 {
        Ok(policy) => policy,
        Err(invalid) => {
            tracing::warn!(error = %invalid.error, name = ?invalid.metadata.name, "malformed ScopePolicy");
            return Ok(Action::await_change());
        }
    };
    let labels = ReconcileLabels {
        controller: "scopepolicy",
    };
    ctx.metrics.reconciles.get_or_create(&labels).inc();
    let started = Instant::now();
    let result = reconcile_policy(policy, &ctx).await;
    ctx.metrics
        .duration
        .get_or_create(&labels)
        .observe(started.elapsed().as_secs_f64());
    result
}

#[tracing::instrument(skip(policy, ctx), fields(ns = %policy.namespace().unwrap_or_default(), name = %policy.name_any()))]
async fn reconcile_policy(policy: &ScopePolicy, ctx: &Context) -> Result<Action> {
    let namespace = policy
        .namespace()
        .ok_or_else(|| Error::Invalid("ScopePolicy without namespace".into()))?;
    let key = ObjectKey::new(&namespace, policy.name_any());
    let snapshot = ctx.registry.snapshot();
    let Some(known) = snapshot.policies.get(&key) else {
        // The registry's watch has not seen this object yet; it triggers a reconcile when it does.
        return Ok(Action::requeue(Duration::from_secs(2)));
    };
    if known.spec != policy.spec {
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    let reference = policy.object_ref(&());
    if let Some(owner) = snapshot
        .resources
        .get(&policy.spec.resource)
        .map(|r| &r.policy)
        .filter(|owner| **owner != key)
    {
        let message = format!(
            "resource {} is already declared by ScopePolicy {owner}",
            policy.spec.resource
        );
        ctx.publish(&reference, EventType::Warning, "ResourceConflict", &message)
            .await;
        let status = status(
            policy,
            false,
            "ResourceConflict",
            &message,
            0,
            0,
            None,
            Vec::new(),
        );
        patch_status(ctx, policy, status).await?;
        return Ok(Action::await_change());
    }
    let keys = ctx.keys.borrow().clone();
    let revocations = ctx.revocations.current();
    let document = match PolicyDocument::build(
        &snapshot,
        &key,
        &ctx.config.issuer,
        &keys.jwks,
        &revocations,
    ) {
        Ok(document) => document,
        Err(BuildError::Rules(errors)) => {
            let rule_errors: Vec<String> = errors.iter().map(|e| format!("spec.{e}")).collect();
            let message = format!(
                "{} rule error(s); the sidecars keep the last good policy",
                rule_errors.len()
            );
            ctx.publish(
                &reference,
                EventType::Warning,
                "InvalidRules",
                &rule_errors.join("; "),
            )
            .await;
            let status = status(
                policy,
                false,
                "InvalidRules",
                &message,
                0,
                0,
                None,
                rule_errors,
            );
            patch_status(ctx, policy, status).await?;
            return Ok(Action::await_change());
        }
        Err(other) => return Err(Error::Invalid(other.to_string())),
    };
    let (json, omitted) = policy_file(&document, ctx.config.policy_stream)?;
    let full_size = omitted.unwrap_or(json.len());
    if json.len() > MAX_POLICY_BYTES {
        // The API server would refuse it; say why instead of retrying a doomed write.
        let message = format!(
            "the policy file is {full_size} bytes with {} clients, over the {MAX_POLICY_BYTES}-byte ConfigMap limit{}; the sidecars keep the last good policy",
            document.clients.len(),
            if ctx.config.policy_stream {
                ", even without its clients"
            } else {
                " (with the policy stream on, the clients would be left out of it)"
            }
        );
        let reported = policy
            .status
            .as_ref()
            .and_then(|s| s.conditions.first())
            .is_some_and(|c| c.reason == "PolicyTooLarge");
        if !reported {
            ctx.publish(&reference, EventType::Warning, "PolicyTooLarge", &message)
                .await;
        }
        let status = status(
            policy,
            false,
            "PolicyTooLarge",
            &message,
            0,
            0,
            None,
            Vec::new(),
        );
        patch_status(ctx, policy, status).await?;
        return Ok(Action::requeue(Duration::from_secs(300)));
    }
    let name = config_map_name(&policy.name_any());
    let config_maps: Api<ConfigMap> = Api::namespaced(ctx.client.clone(), &namespace);
    let mut data = BTreeMap::from([(POLICY_KEY.to_owned(), json)]);
    if let Some(ca) = ctx.token_ca.borrow().clone() {
        data.insert(POLICY_CA_KEY.to_owned(), ca);
    }
    ctx.published_policies
        .retain(|k| snapshot.policies.contains_key(k));
    let digest = data_digest(&data);
    if !published(ctx, &config_maps, &key, &name, &data, digest).await? {
        let desired = ConfigMap {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(namespace.clone()),
                labels: Some(BTreeMap::from([
                    (MANAGED_BY.0.to_owned(), MANAGED_BY.1.to_owned()),
                    (POLICY_LABEL.to_owned(), policy.name_any()),
                ])),
                owner_references: policy.controller_owner_ref(&()).map(|o| vec![o]),
                ..ObjectMeta::default()
            },
            data: Some(data),
            ..ConfigMap::default()
        };
        let written = timed(config_maps.patch(
            &name,
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&desired),
        ))
        .await?;
        ctx.published_policies
            .record(key, written.metadata.resource_version, digest);
        ctx.wrote("scopepolicy");
    }
    apply_network_policy(ctx, policy, &namespace).await?;
    let message = if omitted.is_some() {
        format!(
            "policy ConfigMap {name} is up to date without its {} clients ({full_size} bytes with them, over the ConfigMap limit): they reach the sidecars through the policy stream",
            document.clients.len()
        )
    } else {
        format!("policy ConfigMap {name} is up to date")
    };
    let status = status(
        policy,
        true,
        "PolicyPublished",
        &message,
        i32::try_from(policy.spec.rules.len()).unwrap_or(i32::MAX),
        i32::try_from(document.clients.len()).unwrap_or(i32::MAX),
        Some(name),
        Vec::new(),
    );
    patch_status(ctx, policy, status).await?;
    ctx.metrics
        .managed
        .get_or_create(&ReconcileLabels {
            controller: "scopepolicy",
        })
        .set(snapshot.policies.len() as i64);
    Ok(Action::requeue(Duration::from_secs(3600)))
}

/// The policy ConfigMaps this replica wrote or found up to date, each with the resource
/// version the API server gave it then and a digest of its data. While a ConfigMap keeps that
/// resource version nobody has changed it, so a reconcile reads its metadata only instead of
/// reading back a policy file of up to 1 MiB (about 4 MB of transient memory at 10,000
/// clients, on every reconcile the registry's changes trigger). Bounded by the ScopePolicies
/// the registry knows.
#[derive(Default)]
pub struct PublishedPolicies(std::sync::Mutex<HashMap<ObjectKey, Published>>);

struct Published {
    resource_version: String,
    digest: blake3::Hash,
}

impl PublishedPolicies {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ObjectKey, Published>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Remembers that the ConfigMap of `key` holds data of `digest` at `resource_version`.
    fn record(&self, key: ObjectKey, resource_version: Option<String>, digest: blake3::Hash) {
        let mut published = self.lock();
        match resource_version {
            Some(resource_version) => {
                published.insert(
                    key,
                    Published {
                        resource_version,
                        digest,
                    },
                );
            }
            None => {
                published.remove(&key);
            }
        }
    }

    /// The resource version and data digest recorded for the ConfigMap of `key`.
    fn get(&self, key: &ObjectKey) -> Option<(String, blake3::Hash)> {
        self.lock()
            .get(key)
            .map(|p| (p.resource_version.clone(), p.digest))
    }

    fn retain(&self, keep: impl Fn(&ObjectKey) -> bool) {
        self.lock().retain(|key, _| keep(key));
    }
}

/// A digest of a ConfigMap's data (each key and value length-prefixed, in key order).
fn data_digest(data: &BTreeMap<String, String>) -> blake3::Hash {
    let mut hasher = blake3::Hasher::new();
    for part in data.iter().flat_map(|(k, v)| [k, v]) {
        hasher.update(&(part.len() as u64).to_le_bytes());
        hasher.update(part.as_bytes());
    }
    hasher.finalize()
}

/// Whether the ConfigMap `name` already holds `data` (of `digest`). When this replica
/// recorded that data, the ConfigMap's metadata tells: it still has the recorded resource
/// version. When it recorded other data, no: a write is due anyway. When it recorded nothing
/// (the policy's first reconcile since this replica started), the stored data is read and
/// compared, so a restart rewrites nothing.
async fn published(
    ctx: &Context,
    config_maps: &Api<ConfigMap>,
    key: &ObjectKey,
    name: &str,
    data: &BTreeMap<String, String>,
    digest: blake3::Hash,
) -> Result<bool> {
    match ctx.published_policies.get(key) {
        Some((recorded, published)) if published == digest => {
            let current = timed(config_maps.get_metadata_opt(name)).await?;
            return Ok(current.and_then(|m| m.metadata.resource_version) == Some(recorded));
        }
        Some(_) => return Ok(false),
        None => {}
    }
    let Some(existing) = timed(config_maps.get_opt(name)).await? else {
        return Ok(false);
    };
    if existing.data.as_ref() != Some(data) {
        return Ok(false);
    }
    ctx.published_policies
        .record(key.clone(), existing.metadata.resource_version, digest);
    Ok(true)
}

/// The policy file a ConfigMap gets, and, when its clients were left out, the size it would
/// have had with them: when the whole document is over the ConfigMap limit and the policy
/// stream serves the clients, the ConfigMap keeps what a cold start needs (the rules, keys
/// and revocations) and the clients reach the sidecars through the stream.
fn policy_file(
    document: &PolicyDocument,
    policy_stream: bool,
) -> serde_json::Result<(String, Option<usize>)> {
    let json = serde_json::to_string(document)?;
    if json.len() <= MAX_POLICY_BYTES || !policy_stream {
        return Ok((json, None));
    }
    let mut cold_start = document.without_clients();
    cold_start.clients_omitted = true;
    Ok((serde_json::to_string(&cold_start)?, Some(json.len())))
}

#[allow(clippy::too_many_arguments)]
fn status(
    policy: &ScopePolicy,
    ready: bool,
    reason: &str,
    message: &str,
    rules: i32,
    clients: i32,
    config_map: Option<String>,
    rule_errors: Vec<String>,
) -> ScopePolicyStatus {
    let previous = policy.status.clone().unwrap_or_default();
    ScopePolicyStatus {
        observed_generation: policy.metadata.generation,
        config_map: config_map.or(previous.config_map),
        rules,
        clients,
        rule_errors,
        conditions: vec![ready_condition(
            ready,
            reason,
            message,
            policy.metadata.generation,
            &previous.conditions,
            Time(jiff::Timestamp::now()),
        )],
    }
}

async fn patch_status(
    ctx: &Context,
    policy: &ScopePolicy,
    status: ScopePolicyStatus,
) -> Result<()> {
    if policy.status.as_ref() == Some(&status) {
        return Ok(());
    }
    let api: Api<ScopePolicy> =
        Api::namespaced(ctx.client.clone(), &policy.namespace().unwrap_or_default());
    let patch = serde_json::json!({"apiVersion": "keygate.dev/v1alpha1", "kind": "ScopePolicy", "status": status});
    timed(api.patch_status(
        &policy.name_any(),
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&patch),
    ))
    .await?;
    ctx.wrote("scopepolicy");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::document::{PolicyClient, PolicyKey};

    const FIXTURE: &str = include_str!("../../tests/fixtures/policy.json");

    fn data(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn the_data_digest_tells_where_a_key_ends_and_its_value_begins() {
        let digest = data_digest(&data(&[("policy.json", "{}"), ("ca.crt", "x")]));
        assert_eq!(
            digest,
            data_digest(&data(&[("ca.crt", "x"), ("policy.json", "{}")]))
        );
        for other in [
            data(&[("policy.json", "{}")]),
            data(&[("policy.json", "{} "), ("ca.crt", "x")]),
            data(&[("policy.json", "{}ca.crt"), ("", "x")]),
            data(&[("policy.jso", "n{}"), ("ca.crt", "x")]),
        ] {
            assert_ne!(digest, data_digest(&other), "{other:?}");
        }
    }

    #[test]
    fn published_policies_forget_what_no_longer_exists() {
        let published = PublishedPolicies::default();
        let (orders, billing) = (
            ObjectKey::new("a", "orders"),
            ObjectKey::new("a", "billing"),
        );
        let digest = data_digest(&data(&[("policy.json", "{}")]));
        published.record(orders.clone(), Some("7".into()), digest);
        published.record(billing.clone(), Some("9".into()), digest);
        assert_eq!(published.get(&orders), Some(("7".to_owned(), digest)));
        // A write whose answer had no resource version leaves nothing to compare with.
        published.record(billing.clone(), None, digest);
        assert_eq!(published.get(&billing), None);
        published.retain(|key| *key != orders);
        assert_eq!(published.get(&orders), None);
    }

    #[test]
    fn a_policy_too_large_for_a_configmap_leaves_its_clients_to_the_stream() {
        let mut document = PolicyDocument::parse(FIXTURE.as_bytes()).unwrap();
        let (small, omitted) = policy_file(&document, true).unwrap();
        assert_eq!(omitted, None, "a small policy keeps its clients");
        assert_eq!(PolicyDocument::parse(small.as_bytes()).unwrap(), document);
        document.clients = (0..4000)
            .map(|i| PolicyClient {
                client_id: format!("kgc_{i:032}"),
                name: format!("shop/client-{i}"),
                scopes: vec!["orders.read".into()],
                keys: vec![PolicyKey {
                    fingerprint: format!("SHA256:{i:043}"),
                    public_key: "k".repeat(180),
                    not_after: None,
                }],
                api_keys: Vec::new(),
            })
            .collect();

        let (json, omitted) = policy_file(&document, false).unwrap();
        assert_eq!(omitted, None);
        assert!(json.len() > MAX_POLICY_BYTES, "without a stream: too large");

        let (json, omitted) = policy_file(&document, true).unwrap();
        assert!(omitted.is_some_and(|size| size > MAX_POLICY_BYTES));
        assert!(json.len() < 64 * 1024, "{} bytes", json.len());
        let cold_start = PolicyDocument::parse(json.as_bytes()).unwrap();
        assert!(cold_start.clients_omitted && cold_start.clients.is_empty());
        assert_eq!(cold_start.spec, document.spec);
        assert_eq!(cold_start.keygate, document.keygate);
        assert_eq!(cold_start.revocations, document.revocations);
    }
}
