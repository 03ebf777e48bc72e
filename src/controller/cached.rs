//! The ApiClient as the operator caches it: what the reconciler, the registry and the
//! `keygate_apiclient_*` series read, and a digest of the status in place of the status.
//!
//! The operator keeps every ApiClient it watches for as long as it runs. A whole object
//! (all of its metadata, the spec, the status with its conditions and grants) took about
//! 1.5 KB in the cache; this one keeps the metadata the reconciler uses, the spec once
//! (shared with the registry's inputs), and of the status only what is read: whether a status
//! the reconciler would write is already there, the Ready condition, the next rotation.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::Arc;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use kube::Resource;
use serde::Deserialize;

use super::clients::CONDITION_VALUES;
use crate::api::{ApiClient, ApiClientSpec, ApiClientStatus, READY};

/// The prefix of the ApiClient annotations keygate reads (`keygate.dev/rotate`,
/// `keygate.dev/revoke-tokens`); others are not cached.
const OWN_ANNOTATIONS: &str = "keygate.dev/";

/// An ApiClient in the operator's cache. It deserialises from an ApiClient, so a watch of
/// this type never holds the whole object longer than one conversion.
#[derive(Clone, Debug, Deserialize)]
#[serde(from = "ApiClient")]
pub struct CachedClient {
    /// Name, namespace, uid, resource version (a watch resumes from the last object's),
    /// generation and keygate's annotations.
    pub metadata: ObjectMeta,
    pub spec: Arc<ApiClientSpec>,
    pub status: StatusSummary,
}

/// What the operator reads of an ApiClient's status.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StatusSummary {
    /// BLAKE3 of the status with its conditions' transition times left out; `None`: no status.
    digest: Option<blake3::Hash>,
    /// The Ready condition's status (`True`, `False`, `Unknown`); `None`: no such condition,
    /// or another value.
    pub ready: Option<&'static str>,
    /// `status.nextRotationTime`, Unix seconds.
    pub next_rotation: Option<i64>,
    /// Whether the status names a client id: the ApiClient had credentials.
    pub has_client_id: bool,
}

impl StatusSummary {
    /// The summary of an ApiClient's status.
    pub fn of(status: Option<&ApiClientStatus>) -> Self {
        let Some(status) = status else {
            return Self::default();
        };
        let ready = status
            .conditions
            .iter()
            .find(|c| c.type_ == READY)
            .and_then(|c| {
                CONDITION_VALUES
                    .into_iter()
                    .find(|value| *value == c.status)
            });
        Self {
            digest: digest(status),
            ready,
            next_rotation: status.next_rotation_time.as_ref().map(|t| t.0.as_second()),
            has_client_id: status.client_id.is_some(),
        }
    }

    /// Whether `status` is the status this summary was made of, apart from the conditions'
    /// transition times (which a writer carries over from the stored status anyway).
    pub fn matches(&self, status: &ApiClientStatus) -> bool {
        self.digest.is_some() && self.digest == digest(status)
    }
}

/// BLAKE3 of the JSON of `status` with every `lastTransitionTime` set to the epoch. A
/// status that does not serialise (it always does) has no digest and so matches nothing.
fn digest(status: &ApiClientStatus) -> Option<blake3::Hash> {
    let mut status = status.clone();
    for condition in &mut status.conditions {
        condition.last_transition_time = Time(jiff::Timestamp::UNIX_EPOCH);
    }
    let mut hasher = blake3::Hasher::new();
    serde_json::to_writer(&mut hasher, &status).ok()?;
    Some(hasher.finalize())
}

impl From<ApiClient> for CachedClient {
    fn from(client: ApiClient) -> Self {
        let ApiClient {
            metadata,
            spec,
            status,
        } = client;
        let annotations: BTreeMap<String, String> = metadata
            .annotations
            .into_iter()
            .flatten()
            .filter(|(key, _)| key.starts_with(OWN_ANNOTATIONS))
            .collect();
        Self {
            metadata: ObjectMeta {
                name: metadata.name,
                namespace: metadata.namespace,
                uid: metadata.uid,
                resource_version: metadata.resource_version,
                generation: metadata.generation,
                annotations: (!annotations.is_empty()).then_some(annotations),
                ..ObjectMeta::default()
            },
            spec: Arc::new(spec),
            status: StatusSummary::of(status.as_ref()),
        }
    }
}

impl Resource for CachedClient {
    type DynamicType = ();
    type Scope = <ApiClient as Resource>::Scope;

    fn kind(dt: &()) -> Cow<'_, str> {
        ApiClient::kind(dt)
    }

    fn group(dt: &()) -> Cow<'_, str> {
        ApiClient::group(dt)
    }

    fn version(dt: &()) -> Cow<'_, str> {
        ApiClient::version(dt)
    }

    fn plural(dt: &()) -> Cow<'_, str> {
        ApiClient::plural(dt)
    }

    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{Grant, ready_condition};
    use kube::ResourceExt;

    fn status(ready: bool, message: &str, at: i64) -> ApiClientStatus {
        ApiClientStatus {
            observed_generation: Some(2),
            client_id: Some("kgc_1".into()),
            grants: vec![Grant {
                resource: "https://orders.shop.svc".into(),
                scopes: vec!["orders:read".into()],
            }],
            next_rotation_time: jiff::Timestamp::from_second(1_800_000_000).ok().map(Time),
            conditions: vec![ready_condition(
                ready,
                if ready {
                    "CredentialsReady"
                } else {
                    "RoleNotFound"
                },
                message,
                Some(2),
                &[],
                Time(jiff::Timestamp::from_second(at).unwrap()),
            )],
            ..ApiClientStatus::default()
        }
    }

    #[test]
    fn the_cache_keeps_what_the_operator_reads() {
        let mut client = ApiClient::new("billing", ApiClientSpec::default());
        client.metadata.namespace = Some("shop".into());
        client.metadata.uid = Some("u-1".into());
        client.metadata.generation = Some(2);
        client.metadata.labels = Some([("team".to_owned(), "a".to_owned())].into());
        client.metadata.annotations = Some(
            [
                ("keygate.dev/rotate".to_owned(), "1".to_owned()),
                ("note".to_owned(), "x".repeat(10_000)),
            ]
            .into(),
        );
        client.status = Some(status(true, "ok", 100));
        let cached = CachedClient::from(client.clone());
        assert_eq!(cached.name_any(), "billing");
        assert_eq!(cached.namespace().as_deref(), Some("shop"));
        assert_eq!(cached.uid().as_deref(), Some("u-1"));
        assert_eq!(cached.metadata.generation, Some(2));
        assert_eq!(
            cached.annotations(),
            &BTreeMap::from([("keygate.dev/rotate".to_owned(), "1".to_owned())])
        );
        assert!(cached.labels().is_empty());
        assert_eq!(*cached.spec, client.spec);
        assert_eq!(cached.status.ready, Some("True"));
        assert_eq!(cached.status.next_rotation, Some(1_800_000_000));
        assert!(cached.status.has_client_id);
        assert_eq!(
            cached.object_ref(&()).kind,
            client.object_ref(&()).kind,
            "events and owner references name an ApiClient"
        );
    }

    #[test]
    fn a_status_matches_its_summary_whatever_its_transition_times() {
        let summary = StatusSummary::of(Some(&status(true, "ok", 100)));
        assert!(summary.matches(&status(true, "ok", 100)));
        assert!(summary.matches(&status(true, "ok", 999)));
        assert!(!summary.matches(&status(false, "ok", 100)));
        assert!(!summary.matches(&status(true, "changed", 100)));
        let mut other_grants = status(true, "ok", 100);
        other_grants.grants[0].scopes.push("orders:write".into());
        assert!(!summary.matches(&other_grants));
        assert!(
            !StatusSummary::of(None).matches(&ApiClientStatus::default()),
            "no status matches nothing, so the first status is written"
        );
    }

    #[test]
    fn an_unusual_ready_value_reads_as_no_ready_condition() {
        let mut odd = status(true, "ok", 100);
        odd.conditions[0].status = "Maybe".into();
        assert_eq!(StatusSummary::of(Some(&odd)).ready, None);
        assert_eq!(
            StatusSummary::of(Some(&ApiClientStatus::default())).ready,
            None
        );
    }

    #[test]
    fn a_malformed_api_client_is_kept_as_invalid() {
        let json = serde_json::json!({
            "apiVersion": "keygate.dev/v1alpha1",
            "kind": "ApiClient",
            "metadata": {"name": "bad", "namespace": "shop"},
            "spec": {"roles": "not-a-list"},
        });
        let guarded: kube::core::DeserializeGuard<CachedClient> =
            serde_json::from_value(json).unwrap();
        let invalid = guarded.0.unwrap_err();
        assert_eq!(invalid.metadata.name.as_deref(), Some("bad"));
        assert!(invalid.error.contains("sequence"), "{}", invalid.error);
    }
}
