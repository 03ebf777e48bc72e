//! ApiClient → credentials Secret and status.
//!
//! The Secret is the source of truth: existing material is kept across reconciles, restarts
//! and upgrades; a deleted Secret is regenerated (with a Warning Event); rotation happens on
//! schedule or when the `keygate.dev/rotate` annotation gets a new value, and keeps the
//! previous credentials for the overlap.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::api::{Patch, PatchParams};
use kube::core::DeserializeGuard;
use kube::runtime::controller::Action;
use kube::runtime::events::EventType;
use kube::runtime::reflector::Store;
use kube::{Api, Resource, ResourceExt};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::gauge::ConstGauge;

use super::cached::{CachedClient, StatusSummary};
use super::{
    CLIENT_LABEL, Context, Error, MANAGED_BY, MANAGER, REVOKE_ANNOTATION, ROTATE_ANNOTATION,
    ReconcileLabels, Result, timed,
};
use crate::api::{ApiClient, ApiClientSpec, ApiClientStatus, parse_duration, ready_condition};
use crate::credentials::{
    self, CredentialData, derive_client_id, ensure_material, key, prune_expired_previous, rotate,
    unix_now,
};

/// Secret annotation: Unix seconds of the last rotation (or of the first credentials).
pub const LAST_ROTATION: &str = "keygate.dev/last-rotation";
/// Secret annotation: the `keygate.dev/rotate` value last acted on.
pub const ROTATED_FOR: &str = "keygate.dev/rotated-for";
/// Secret annotation: the `keygate.dev/revoke-tokens` value last acted on.
pub const REVOKED_FOR: &str = "keygate.dev/revoked-for";

/// The values of a condition's status, one series each (as cert-manager's
/// `certmanager_certificate_ready_status`).
pub(super) const CONDITION_VALUES: [&str; 3] = ["True", "False", "Unknown"];

/// The per-ApiClient series (`keygate_apiclient_*`), read from the cached ApiClients'
/// status at each scrape, as kube-state-metrics does: nothing is kept per ApiClient (kept
/// series cost about 6 MB at 10,000 ApiClients), and a deleted ApiClient's series go with
/// it. Only the leader, which writes the status, exports them, so a sum over replicas counts
/// each ApiClient once.
pub struct ClientStatusMetrics {
    pub clients: Vec<Store<DeserializeGuard<CachedClient>>>,
    pub leading: tokio::sync::watch::Receiver<bool>,
}

impl std::fmt::Debug for ClientStatusMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientStatusMetrics")
            .finish_non_exhaustive()
    }
}

impl ClientStatusMetrics {
    /// Registers the series under `keygate_apiclient_`.
    pub fn register(self, registry: &mut prometheus_client::registry::Registry) {
        registry
            .sub_registry_with_prefix("keygate_apiclient")
            .register_collector(Box::new(self));
    }
}

impl Collector for ClientStatusMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        if !*self.leading.borrow() {
            return Ok(());
        }
        let cached: Vec<_> = self.clients.iter().flat_map(Store::state).collect();
        let mut clients: Vec<(&str, &str, &StatusSummary)> = cached
            .iter()
            .filter_map(|guarded| {
                let client = guarded.0.as_ref().ok()?;
                Some((
                    client.metadata.namespace.as_deref().unwrap_or_default(),
                    client.metadata.name.as_deref().unwrap_or_default(),
                    &client.status,
                ))
            })
            .collect();
        clients.sort_unstable_by_key(|&(namespace, name, _)| (namespace, name));

        let mut ready = encoder.encode_descriptor(
            "ready_status",
            "The Ready condition of an ApiClient: 1 for its status, 0 for the others",
            None,
            MetricType::Gauge,
        )?;
        for &(namespace, name, status) in &clients {
            let value = status.ready.unwrap_or("Unknown");
            for condition in CONDITION_VALUES {
                let labels = [
                    ("namespace", namespace),
                    ("name", name),
                    ("condition", condition),
                ];
                ConstGauge::new(i64::from(condition == value))
                    .encode(ready.encode_family(&labels)?)?;
            }
        }

        let mut next_rotation = encoder.encode_descriptor(
            "next_rotation_timestamp_seconds",
            "When an ApiClient's credentials rotate next",
            None,
            MetricType::Gauge,
        )?;
        for &(namespace, name, status) in &clients {
            if let Some(time) = status.next_rotation {
                let labels = [("namespace", namespace), ("name", name)];
                ConstGauge::new(time).encode(next_rotation.encode_family(&labels)?)?;
            }
        }
        Ok(())
    }
}

/// The Secret name of an ApiClient.
pub fn secret_name(client: &CachedClient) -> String {
    client
        .spec
        .secret_name
        .clone()
        .unwrap_or_else(|| format!("{}-credentials", client.name_any()))
}

/// What the reconciler should do with the credentials.
#[derive(Debug, Clone, PartialEq)]
pub struct SecretPlan {
    pub data: CredentialData,
    /// keygate's own Secret annotations.
    pub annotations: BTreeMap<String, String>,
    pub rotated: bool,
    /// Revoke every token issued before this time (the revoke annotation changed).
    pub revoke_before: Option<u64>,
    pub last_rotation: u64,
    pub next_rotation: Option<u64>,
    /// When something time-based happens next (rotation, end of an overlap).
    pub wake_at: Option<u64>,
}

/// Decides the credential data and keygate annotations of an ApiClient's Secret: a pure
/// function of the spec, the ApiClient's annotations, the existing Secret and the time.
pub fn plan_secret(
    spec: &ApiClientSpec,
    client_annotations: &BTreeMap<String, String>,
    client_id: &str,
    token_url: &str,
    issuer: &str,
    existing: Option<(&CredentialData, &BTreeMap<String, String>)>,
    now: u64,
) -> Result<SecretPlan, credentials::Error> {
    let empty = BTreeMap::new();
    let (existing_data, existing_annotations) = existing.unwrap_or((&empty, &empty));
    let (mut data, _) = ensure_material(spec, client_id, token_url, issuer, existing_data)?;
    let mut annotations = BTreeMap::new();
    let mut last_rotation = existing_annotations
        .get(LAST_ROTATION)
        .and_then(|t| t.parse().ok())
        .unwrap_or(now);

    let every = spec
        .rotation
        .as_ref()
        .and_then(|r| parse_duration(&r.every).ok())
        .map(|every| every.as_secs());
    let requested = client_annotations.get(ROTATE_ANNOTATION);
    let acted_on = existing_annotations.get(ROTATED_FOR);
    // A request made before the credentials existed has nothing to rotate.
    let on_demand = existing.is_some() && requested.is_some() && requested != acted_on;
    let scheduled =
        existing.is_some() && every.is_some_and(|every| last_rotation.saturating_add(every) <= now);
    let rotated = on_demand || scheduled;
    if rotated {
        data = rotate(spec, &data, now + credentials::rotation_overlap_secs(spec))?;
        last_rotation = now;
    }
    prune_expired_previous(&mut data, now);
    if let Some(value) = requested {
        annotations.insert(ROTATED_FOR.to_owned(), value.clone());
    }
    annotations.insert(LAST_ROTATION.to_owned(), last_rotation.to_string());

    let revoke_requested = client_annotations.get(REVOKE_ANNOTATION);
    let revoke_before = (revoke_requested.is_some()
        && revoke_requested != existing_annotations.get(REVOKED_FOR))
    .then_some(now);
    if let Some(value) = revoke_requested {
        annotations.insert(REVOKED_FOR.to_owned(), value.clone());
    }

    let next_rotation = every.map(|every| last_rotation + every);
    let previous_end = data
        .get(key::PREVIOUS_EXPIRES_AT)
        .and_then(|t| t.parse::<u64>().ok());
    let wake_at = [next_rotation, previous_end].into_iter().flatten().min();
    Ok(SecretPlan {
        data,
        annotations,
        rotated,
        revoke_before,
        last_rotation,
        next_rotation,
        wake_at,
    })
}

/// The credential data of a Secret (values that are not UTF-8 are left out).
pub(crate) fn secret_data(secret: &Secret) -> CredentialData {
    secret
        .data
        .iter()
        .flatten()
        .filter_map(|(k, v)| Some((k.clone(), String::from_utf8(v.0.clone()).ok()?)))
        .collect()
}

fn owned_by(secret: &Secret, uid: &str) -> bool {
    secret
        .owner_references()
        .iter()
        .any(|o| o.uid == uid && o.controller == Some(true))
}

fn time(unix: u64) -> Option<Time> {
    jiff::Timestamp::from_second(i64::try_from(unix).ok()?)
        .ok()
        .map(Time)
}

/// Reconciles one ApiClient.
/// How often every ApiClient is reconciled again, whatever triggered it (one replay of the
/// cache, paced: see [`super::pacing`]).
pub const RESYNC: Duration = Duration::from_secs(3600);

pub async fn reconcile(
    object: Arc<DeserializeGuard<CachedClient>>,
    ctx: Arc<Context>,
) -> Result<Action> {
    let client = match &object.0 {
        Ok(client) => client,
        Err(invalid) => {
            tracing::warn!(error = %invalid.error, name = ?invalid.metadata.name, "malformed ApiClient");
            return Ok(Action::await_change());
        }
    };
    let labels = ReconcileLabels {
        controller: "apiclient",
    };
    ctx.metrics.reconciles.get_or_create(&labels).inc();
    let started = Instant::now();
    let result = reconcile_client(client, &ctx).await;
    ctx.metrics
        .duration
        .get_or_create(&labels)
        .observe(started.elapsed().as_secs_f64());
    result
}

#[tracing::instrument(skip(client, ctx), fields(ns = %client.namespace().unwrap_or_default(), name = %client.name_any()))]
async fn reconcile_client(client: &CachedClient, ctx: &Context) -> Result<Action> {
    let namespace = client
        .namespace()
        .ok_or_else(|| Error::Invalid("ApiClient without namespace".into()))?;
    let uid = client
        .uid()
        .ok_or_else(|| Error::Invalid("ApiClient without uid".into()))?;
    let name = secret_name(client);
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);
    let existing = timed(secrets.get_opt(&name)).await?;
    let reference = client.object_ref(&());
    let now = unix_now();

    if let Some(secret) = &existing
        && !owned_by(secret, &uid)
    {
        let message = format!(
            "Secret {name} exists and is not managed by this ApiClient; choose another spec.secretName"
        );
        ctx.publish(&reference, EventType::Warning, "SecretConflict", &message)
            .await;
        // The status keeps the client id and Secret it names (the cache does not hold them).
        let stored = stored_status(ctx, client).await?;
        let status = status_with(
            client,
            ctx,
            stored.as_ref(),
            None,
            false,
            "SecretConflict",
            &message,
        );
        write_status_over(ctx, client, status, stored).await?;
        return Ok(Action::await_change());
    }

    let existing_data = existing.as_ref().map(secret_data);
    let existing_annotations = existing.as_ref().map(|s| s.annotations().clone());
    let client_id = existing_data
        .as_ref()
        .and_then(|d| d.get(key::CLIENT_ID).cloned())
        .unwrap_or_else(|| derive_client_id(&uid));
    let plan = plan_secret(
        &client.spec,
        client.annotations(),
        &client_id,
        &ctx.config.token_url(),
        &ctx.config.issuer,
        existing_data.as_ref().zip(existing_annotations.as_ref()),
        now,
    )?;

    let mut secret_labels = client
        .spec
        .secret_template
        .as_ref()
        .map(|t| t.labels.clone())
        .unwrap_or_default();
    secret_labels.insert(MANAGED_BY.0.into(), MANAGED_BY.1.into());
    secret_labels.insert(CLIENT_LABEL.into(), client.name_any());
    let mut secret_annotations = client
        .spec
        .secret_template
        .as_ref()
        .map(|t| t.annotations.clone())
        .unwrap_or_default();
    secret_annotations.extend(plan.annotations.clone());
    let up_to_date = existing.as_ref().is_some_and(|s| {
        existing_data.as_ref() == Some(&plan.data)
            && secret_labels
                .iter()
                .all(|(k, v)| s.labels().get(k) == Some(v))
            && secret_annotations
                .iter()
                .all(|(k, v)| s.annotations().get(k) == Some(v))
    });
    if !up_to_date {
        let desired = Secret {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                namespace: Some(namespace.clone()),
                labels: Some(secret_labels),
                annotations: Some(secret_annotations),
                owner_references: client.controller_owner_ref(&()).map(|o| vec![o]),
                ..ObjectMeta::default()
            },
            type_: Some("Opaque".into()),
            data: Some(
                plan.data
                    .iter()
                    .map(|(k, v)| (k.clone(), ByteString(v.clone().into_bytes())))
                    .collect(),
            ),
            ..Secret::default()
        };
        let params = PatchParams::apply(MANAGER).force();
        timed(secrets.patch(&name, &params, &Patch::Apply(&desired))).await?;
        ctx.wrote("apiclient");
        match (&existing, client.status.has_client_id) {
            (None, true) => {
                ctx.publish(&reference, EventType::Warning, "CredentialsRegenerated",
                    &format!("Secret {name} was missing; new credentials were generated (the client id is unchanged)")).await;
            }
            (None, false) => {
                ctx.publish(
                    &reference,
                    EventType::Normal,
                    "CredentialsCreated",
                    &format!("credentials stored in Secret {name}"),
                )
                .await;
            }
            _ if plan.rotated => {
                ctx.publish(&reference, EventType::Normal, "CredentialsRotated",
                    &format!("credentials in Secret {name} rotated; the previous ones stay valid for the overlap")).await;
            }
            _ => {}
        }
    }
    if let Some(before) = plan.revoke_before {
        ctx.revocations.revoke_client(&client_id, before);
        ctx.publish(
            &reference,
            EventType::Normal,
            "TokensRevoked",
            "every access token issued to this client so far is revoked",
        )
        .await;
    }

    let credentials = Some((client_id.as_str(), name.as_str(), &plan));
    let mut status = status_with(client, ctx, None, credentials, true, "", "");
    let missing_role = status
        .ineffective_grants
        .iter()
        .find(|g| g.resource.is_empty())
        .map(|g| g.reason.clone());
    if let Some(reason) = &missing_role {
        status = status_with(
            client,
            ctx,
            None,
            credentials,
            false,
            "RoleNotFound",
            reason,
        );
    }
    write_status(ctx, client, status).await?;
    ctx.metrics
        .managed
        .get_or_create(&ReconcileLabels {
            controller: "apiclient",
        })
        .set(ctx.registry.snapshot().clients_by_key.len() as i64);

    // A rotation or the end of an overlap later than the next resync is scheduled then.
    Ok(match plan.wake_at.map(|at| at.saturating_sub(now)) {
        Some(wait) if wait < RESYNC.as_secs() => Action::requeue(Duration::from_secs(wait.max(1))),
        _ => Action::await_change(),
    })
}

/// The status for `client`, with grants resolved from the registry snapshot; what
/// `credentials` do not say comes from `previous` (the stored status).
fn status_with(
    client: &CachedClient,
    ctx: &Context,
    previous: Option<&ApiClientStatus>,
    credentials: Option<(&str, &str, &SecretPlan)>,
    ready: bool,
    reason: &str,
    message: &str,
) -> ApiClientStatus {
    let snapshot = ctx.registry.snapshot();
    let namespace = client.namespace().unwrap_or_default();
    let (grants, ineffective) = snapshot.resolve(&namespace, &client.spec.roles);
    let previous = previous.cloned().unwrap_or_default();
    let (reason, message) = if ready {
        let note = if ineffective.is_empty() {
            String::new()
        } else {
            format!(
                "; {} permission(s) grant nothing, see status.ineffectiveGrants",
                ineffective.len()
            )
        };
        (
            "CredentialsReady".to_owned(),
            format!(
                "credentials in Secret {}; {} resource(s) granted{note}",
                credentials.map(|c| c.1).unwrap_or_default(),
                grants.len()
            ),
        )
    } else {
        (reason.to_owned(), message.to_owned())
    };
    let generation = client.metadata.generation;
    ApiClientStatus {
        observed_generation: generation,
        client_id: credentials.map(|c| c.0.to_owned()).or(previous.client_id),
        secret_name: credentials.map(|c| c.1.to_owned()).or(previous.secret_name),
        key_fingerprint: credentials.and_then(|c| c.2.data.get(key::KEY_FINGERPRINT).cloned()),
        previous_key_fingerprint: credentials
            .and_then(|c| c.2.data.get(key::PREVIOUS_KEY_FINGERPRINT).cloned()),
        grants: grants
            .iter()
            .map(|(resource, scopes)| crate::api::Grant {
                resource: resource.clone(),
                scopes: scopes.iter().cloned().collect(),
            })
            .collect(),
        ineffective_grants: ineffective,
        last_rotation_time: credentials.and_then(|c| time(c.2.last_rotation)),
        next_rotation_time: credentials.and_then(|c| c.2.next_rotation).and_then(time),
        conditions: vec![ready_condition(
            ready && !reason.is_empty(),
            &reason,
            message,
            generation,
            &previous.conditions,
            Time(jiff::Timestamp::now()),
        )],
    }
}

/// The API of `client`'s namespace, to read and write its status.
fn api_of(ctx: &Context, client: &CachedClient) -> Api<ApiClient> {
    Api::namespaced(ctx.client.clone(), &client.namespace().unwrap_or_default())
}

/// The status stored in the API server (the cache keeps only its digest).
async fn stored_status(ctx: &Context, client: &CachedClient) -> Result<Option<ApiClientStatus>> {
    Ok(timed(api_of(ctx, client).get_opt(&client.name_any()))
        .await?
        .and_then(|c| c.status))
}

/// Writes `status` when it differs from the stored one.
async fn write_status(ctx: &Context, client: &CachedClient, status: ApiClientStatus) -> Result<()> {
    // Equal to the cached status but for transition times, which are carried over: nothing
    // to write.
    if client.status.matches(&status) {
        return Ok(());
    }
    // The cached object may predate our last status write: compare with the stored status,
    // so a stale cache never rewrites an equal status with a new transition time.
    let stored = stored_status(ctx, client).await?;
    write_status_over(ctx, client, status, stored).await
}

/// Writes `status` when it differs from `stored`, the status just read from the API server,
/// keeping the transition times of conditions whose status is unchanged.
async fn write_status_over(
    ctx: &Context,
    client: &CachedClient,
    mut status: ApiClientStatus,
    stored: Option<ApiClientStatus>,
) -> Result<()> {
    if let Some(stored) = &stored {
        crate::api::keep_transition_times(&mut status.conditions, &stored.conditions);
    }
    if stored.as_ref() == Some(&status) {
        return Ok(());
    }
    let patch = serde_json::json!({
        "apiVersion": "keygate.dev/v1alpha1",
        "kind": "ApiClient",
        "status": status,
    });
    timed(api_of(ctx, client).patch_status(
        &client.name_any(),
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&patch),
    ))
    .await?;
    ctx.wrote("apiclient");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{KeyAlgorithm, KeyPairSpec, RotationSpec};

    const NOW: u64 = 1_800_000_000;

    fn mk_spec(rotation: Option<(&str, &str)>) -> ApiClientSpec {
        ApiClientSpec {
            client_secret: true,
            key_pair: Some(KeyPairSpec {
                algorithm: KeyAlgorithm::ES256,
            }),
            rotation: rotation.map(|(every, overlap)| RotationSpec {
                every: every.into(),
                overlap: overlap.into(),
            }),
            ..ApiClientSpec::default()
        }
    }

    fn plan(
        spec: &ApiClientSpec,
        annotations: &[(&str, &str)],
        existing: Option<&SecretPlan>,
        now: u64,
    ) -> SecretPlan {
        let annotations: BTreeMap<String, String> = annotations
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        plan_secret(
            spec,
            &annotations,
            "kgc_1",
            "https://kg/oauth2/token",
            "https://kg",
            existing.map(|p| (&p.data, &p.annotations)),
            now,
        )
        .unwrap()
    }

    #[test]
    fn first_plan_generates_and_later_plans_keep_everything() {
        let spec = mk_spec(None);
        let first = plan(&spec, &[], None, NOW);
        assert!(first.data.contains_key(key::CLIENT_SECRET));
        assert_eq!(first.annotations[LAST_ROTATION], NOW.to_string());
        assert!(!first.rotated);
        let again = plan(&spec, &[], Some(&first), NOW + 5000);
        assert_eq!(again, first, "a resync changes nothing");
    }

    #[test]
    fn rotation_on_demand_happens_once_per_value() {
        let spec = mk_spec(None);
        let first = plan(&spec, &[(ROTATE_ANNOTATION, "1")], None, NOW);
        assert!(!first.rotated, "nothing to rotate before credentials exist");
        assert_eq!(first.annotations[ROTATED_FOR], "1");
        let same = plan(&spec, &[(ROTATE_ANNOTATION, "1")], Some(&first), NOW + 10);
        assert!(!same.rotated);
        let rotated = plan(&spec, &[(ROTATE_ANNOTATION, "2")], Some(&first), NOW + 10);
        assert!(rotated.rotated);
        assert_eq!(
            rotated.data[key::PREVIOUS_CLIENT_SECRET],
            first.data[key::CLIENT_SECRET]
        );
        assert_eq!(
            rotated.data[key::PREVIOUS_EXPIRES_AT],
            (NOW + 10 + 24 * 3600).to_string()
        );
        assert_eq!(rotated.wake_at, Some(NOW + 10 + 24 * 3600));
    }

    #[test]
    fn scheduled_rotation_and_overlap_end() {
        let spec = mk_spec(Some(("720h", "24h")));
        let every = 720 * 3600;
        let first = plan(&spec, &[], None, NOW);
        assert_eq!(first.next_rotation, Some(NOW + every));
        assert_eq!(first.wake_at, Some(NOW + every));
        let early = plan(&spec, &[], Some(&first), NOW + every - 1);
        assert!(!early.rotated);
        let due = plan(&spec, &[], Some(&first), NOW + every);
        assert!(due.rotated);
        assert_eq!(due.last_rotation, NOW + every);
        assert_eq!(due.next_rotation, Some(NOW + 2 * every));
        assert_eq!(
            due.wake_at,
            Some(NOW + every + 24 * 3600),
            "the overlap ends first"
        );
        let after_overlap = plan(&spec, &[], Some(&due), NOW + every + 24 * 3600);
        assert!(!after_overlap.rotated);
        assert!(!after_overlap.data.contains_key(key::PREVIOUS_CLIENT_SECRET));
        assert_eq!(
            after_overlap.data[key::CLIENT_SECRET],
            due.data[key::CLIENT_SECRET]
        );
    }

    #[test]
    fn client_metrics_follow_the_cached_status_and_go_with_the_client() {
        use kube::runtime::watcher::Event;
        let (store, mut writer) =
            kube::runtime::reflector::store::<DeserializeGuard<CachedClient>>();
        let (leading_tx, leading) = tokio::sync::watch::channel(false);
        let mut registry = prometheus_client::registry::Registry::default();
        ClientStatusMetrics {
            clients: vec![store],
            leading,
        }
        .register(&mut registry);
        let text = |registry: &prometheus_client::registry::Registry| {
            let mut text = String::new();
            prometheus_client::encoding::text::encode(&mut text, registry).unwrap();
            text
        };
        let mut client = ApiClient::new("a", mk_spec(None));
        client.metadata.namespace = Some("shop".into());
        client.status = Some(ApiClientStatus {
            next_rotation_time: time(NOW),
            conditions: vec![ready_condition(
                false,
                "RoleNotFound",
                "",
                Some(1),
                &[],
                Time(jiff::Timestamp::now()),
            )],
            ..ApiClientStatus::default()
        });
        let mut unready = ApiClient::new("b", mk_spec(None));
        unready.metadata.namespace = Some("shop".into());
        writer.apply_watcher_event(&Event::Apply(DeserializeGuard(Ok(client.clone().into()))));
        writer.apply_watcher_event(&Event::Apply(DeserializeGuard(Ok(unready.into()))));

        // A follower does not write the status, so it does not export it either.
        assert!(!text(&registry).contains("name=\"a\""));
        leading_tx.send_replace(true);
        let scraped = text(&registry);
        for (name, condition, value) in [
            ("a", "True", 0),
            ("a", "False", 1),
            ("a", "Unknown", 0),
            ("b", "True", 0),
            ("b", "False", 0),
            ("b", "Unknown", 1),
        ] {
            let line = format!(
                "keygate_apiclient_ready_status{{namespace=\"shop\",name=\"{name}\",condition=\"{condition}\"}} {value}\n"
            );
            assert!(scraped.contains(&line), "{line} in {scraped}");
        }
        assert!(scraped.contains(&format!(
            "keygate_apiclient_next_rotation_timestamp_seconds{{namespace=\"shop\",name=\"a\"}} {NOW}\n"
        )));
        assert!(
            !scraped.contains("next_rotation_timestamp_seconds{namespace=\"shop\",name=\"b\"}")
        );

        client.status.as_mut().unwrap().next_rotation_time = None;
        writer.apply_watcher_event(&Event::Apply(DeserializeGuard(Ok(client.clone().into()))));
        assert!(!text(&registry).contains("keygate_apiclient_next_rotation_timestamp_seconds{"));
        writer.apply_watcher_event(&Event::Delete(DeserializeGuard(Ok(client.into()))));
        assert!(!text(&registry).contains("name=\"a\""));
        assert!(text(&registry).contains("name=\"b\""));
    }

    #[test]
    fn revoke_annotation_revokes_once() {
        let spec = mk_spec(None);
        let first = plan(&spec, &[(REVOKE_ANNOTATION, "a")], None, NOW);
        assert_eq!(first.revoke_before, Some(NOW));
        let again = plan(&spec, &[(REVOKE_ANNOTATION, "a")], Some(&first), NOW + 1);
        assert_eq!(again.revoke_before, None);
        let new_value = plan(&spec, &[(REVOKE_ANNOTATION, "b")], Some(&first), NOW + 2);
        assert_eq!(new_value.revoke_before, Some(NOW + 2));
    }
}
