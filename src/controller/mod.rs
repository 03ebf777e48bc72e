//! The reconcilers: the only code that writes to the Kubernetes API.
//!
//! - ApiClient → credentials Secret and status ([`clients`]);
//! - ScopePolicy → policy ConfigMap and status ([`policies`]);
//! - M2MRole → status ([`roles`]);
//! - the issuer's signing keys Secret ([`signing`]) and the revocation ConfigMap
//!   ([`revocations`]);
//! - the serving certificates of the webhook ([`webhook_tls`]) and the token server
//!   ([`token_tls`], which also publishes its CA in the ConfigMap `keygate-ca`), kept with
//!   [`certs`];
//! - the registry fed from watches ([`watch`]), and leader election ([`leader`]).
//!
//! Decisions are pure functions (credential material, grants, policy documents); the
//! reconcilers read the registry snapshot and the existing child, and write only when the
//! desired object differs, with server-side apply under one field manager.

pub mod cached;
pub mod certs;
pub mod clients;
pub mod leader;
pub mod pacing;
pub mod policies;
pub mod policy_stream;
pub mod revocations;
pub mod roles;
pub mod signing;
pub mod token_tls;
pub mod watch;
pub mod webhook_tls;

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::BoxStream;
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::PostParams;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use tokio::sync::watch as channel;

use crate::registry::{Registry, Revocations};
use crate::token::keys::IssuerKeys;

/// The field manager of every server-side apply keygate makes.
pub const MANAGER: &str = "keygate";
/// Label on every object keygate creates.
pub const MANAGED_BY: (&str, &str) = ("app.kubernetes.io/managed-by", "keygate");
/// Label naming the ApiClient a Secret belongs to.
pub const CLIENT_LABEL: &str = "keygate.dev/client";
/// Label naming the ScopePolicy a ConfigMap belongs to.
pub const POLICY_LABEL: &str = "keygate.dev/policy";
/// Annotation on an ApiClient: set a new value to rotate its credentials now.
pub const ROTATE_ANNOTATION: &str = "keygate.dev/rotate";
/// Annotation on an ApiClient: set a new value to revoke every token issued to it so far.
pub const REVOKE_ANNOTATION: &str = "keygate.dev/revoke-tokens";
/// Every API call gives up after this long.
pub const API_TIMEOUT: Duration = Duration::from_secs(15);

/// Settings of the operator.
#[derive(Debug, Clone)]
pub struct OperatorConfig {
    /// The operator's own namespace (signing keys, revocations, lease).
    pub namespace: String,
    /// The token server's issuer URL.
    pub issuer: String,
    /// Namespaces to watch; empty: all.
    pub watch_namespaces: Vec<String>,
    /// How long a signing key stays current.
    pub signing_key_rotation: Duration,
    /// The longest token lifetime; previous signing keys are kept this long.
    pub max_token_lifetime: Duration,
    /// Reconciles of one kind that may run at once. Each holds an API connection, so this
    /// bounds the operator's connections and memory during a burst (0: unbounded).
    pub concurrency: u16,
    /// The replicas serve the policy stream (set by `operator::run` from its options): a
    /// policy file too large for a ConfigMap is then written without its clients, which
    /// reach the sidecars through the stream.
    pub policy_stream: bool,
}

impl OperatorConfig {
    pub fn token_url(&self) -> String {
        format!("{}/oauth2/token", self.issuer.trim_end_matches('/'))
    }
}

/// Why a reconcile failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("the API call timed out")]
    Timeout,
    #[error("credentials: {0}")]
    Credentials(#[from] crate::credentials::Error),
    #[error("serialisation: {0}")]
    Serialization(#[from] serde_json::Error),
    #[error("{0}")]
    Invalid(String),
}

impl Error {
    /// A stable label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Kube(_) => "kube",
            Self::Timeout => "timeout",
            Self::Credentials(_) => "credentials",
            Self::Serialization(_) => "serialization",
            Self::Invalid(_) => "invalid",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Runs an API call with [`API_TIMEOUT`].
pub async fn timed<T>(call: impl std::future::Future<Output = kube::Result<T>>) -> Result<T> {
    match tokio::time::timeout(API_TIMEOUT, call).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(Error::Timeout),
    }
}

/// The metadata of an object the operator keeps in its own namespace: its name and the
/// managed-by label.
pub fn own_object_meta(name: &str, namespace: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: Some(namespace.into()),
        labels: Some(std::collections::BTreeMap::from([(
            MANAGED_BY.0.into(),
            MANAGED_BY.1.into(),
        )])),
        ..ObjectMeta::default()
    }
}

/// The changes of one object of kind `K` in `namespace`, by name (applied and re-listed
/// objects), with the default back-off on watch errors.
pub fn watch_named<K>(
    client: Client,
    namespace: &str,
    name: &str,
) -> BoxStream<'static, Result<K, watcher::Error>>
where
    K: kube::Resource<Scope = kube::core::NamespaceResourceScope>
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + 'static,
    K::DynamicType: Default,
{
    let api: Api<K> = Api::namespaced(client, namespace);
    let config = watcher::Config::default().fields(&format!("metadata.name={name}"));
    watcher(api, config)
        .default_backoff()
        .applied_objects()
        .boxed()
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReconcileLabels {
    pub controller: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FailureLabels {
    pub controller: &'static str,
    pub reason: &'static str,
}

/// Controller metrics.
#[derive(Debug)]
pub struct Metrics {
    pub reconciles: Family<ReconcileLabels, Counter>,
    pub failures: Family<FailureLabels, Counter>,
    pub duration: Family<ReconcileLabels, Histogram>,
    pub writes: Family<ReconcileLabels, Counter>,
    pub managed: Family<ReconcileLabels, Gauge>,
}

impl Metrics {
    pub fn register(registry: &mut prometheus_client::registry::Registry) -> Self {
        let metrics = Self {
            reconciles: Family::default(),
            failures: Family::default(),
            duration: Family::new_with_constructor(|| {
                Histogram::new(exponential_buckets(0.001, 2.0, 14))
            }),
            writes: Family::default(),
            managed: Family::default(),
        };
        let r = registry.sub_registry_with_prefix("keygate_controller");
        r.register(
            "reconciles",
            "Reconciles started",
            metrics.reconciles.clone(),
        );
        r.register(
            "failures",
            "Reconciles failed, by reason",
            metrics.failures.clone(),
        );
        r.register(
            "reconcile_duration_seconds",
            "Reconcile duration",
            metrics.duration.clone(),
        );
        r.register(
            "writes",
            "Writes to the Kubernetes API",
            metrics.writes.clone(),
        );
        r.register(
            "managed_objects",
            "Objects the controller manages",
            metrics.managed.clone(),
        );
        metrics
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CertificateLabels {
    /// `webhook` or `token_server`.
    pub certificate: &'static str,
}

/// Metrics of every operator replica, leader or not: what it serves and signs with.
#[derive(Clone, Debug)]
pub struct ReplicaMetrics {
    /// 1 while this replica holds the leader lease.
    pub leader: Gauge,
    /// `notAfter` of the certificate each HTTPS listener serves (Unix seconds).
    pub certificate_expiration: Family<CertificateLabels, Gauge>,
    /// When the current signing key became current (Unix seconds).
    pub signing_key_created: Gauge,
    /// When the leader is due to rotate the current signing key (Unix seconds).
    pub signing_key_next_rotation: Gauge,
}

impl ReplicaMetrics {
    pub fn register(registry: &mut prometheus_client::registry::Registry) -> Self {
        let metrics = Self {
            leader: Gauge::default(),
            certificate_expiration: Family::default(),
            signing_key_created: Gauge::default(),
            signing_key_next_rotation: Gauge::default(),
        };
        let r = registry.sub_registry_with_prefix("keygate");
        r.register(
            "controller_leader",
            "1 while this replica holds the leader lease and runs the controllers",
            metrics.leader.clone(),
        );
        r.register(
            "certificate_expiration_timestamp_seconds",
            "When the certificate a listener serves expires",
            metrics.certificate_expiration.clone(),
        );
        r.register(
            "signing_key_created_timestamp_seconds",
            "When the current token signing key became current",
            metrics.signing_key_created.clone(),
        );
        r.register(
            "signing_key_next_rotation_timestamp_seconds",
            "When the current token signing key is due to be rotated",
            metrics.signing_key_next_rotation.clone(),
        );
        metrics
    }

    /// The expiry gauge of `certificate`, for the watcher that loads it.
    pub fn certificate(&self, certificate: &'static str) -> Gauge {
        self.certificate_expiration
            .get_or_create(&CertificateLabels { certificate })
            .clone()
    }
}

/// What every reconciler shares.
pub struct Context {
    pub client: Client,
    /// Publishes Warnings, folding repeats into one Event series. It keeps every Event it
    /// published for six minutes, so one-off Normal Events bypass it (see [`Context::publish`]).
    pub recorder: Recorder,
    pub reporter: Reporter,
    pub registry: Arc<Registry>,
    pub keys: channel::Receiver<Arc<IssuerKeys>>,
    pub revocations: Arc<Revocations>,
    /// The CA of the token server's (and the policy stream's) certificate, as published in
    /// the ConfigMap `keygate-ca`; copied into every policy ConfigMap for the sidecars.
    pub token_ca: channel::Receiver<Option<String>>,
    pub config: OperatorConfig,
    pub metrics: Metrics,
    /// The policy ConfigMaps this replica wrote or found up to date (see
    /// [`policies::PublishedPolicies`]).
    pub published_policies: policies::PublishedPolicies,
}

impl Context {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        client: Client,
        registry: Arc<Registry>,
        keys: channel::Receiver<Arc<IssuerKeys>>,
        revocations: Arc<Revocations>,
        token_ca: channel::Receiver<Option<String>>,
        config: OperatorConfig,
        metrics: &mut prometheus_client::registry::Registry,
    ) -> Arc<Self> {
        let reporter = Reporter {
            controller: "keygate".into(),
            instance: std::env::var("POD_NAME").ok(),
        };
        Arc::new(Self {
            recorder: Recorder::new(client.clone(), reporter.clone()),
            reporter,
            client,
            registry,
            keys,
            revocations,
            token_ca,
            config,
            metrics: Metrics::register(metrics),
            published_policies: policies::PublishedPolicies::default(),
        })
    }

    /// Publishes an Event about `reference`. A failure is logged, never fatal.
    ///
    /// Normal Events mark one-off transitions (credentials created, rotated), so they are
    /// created directly: through the Recorder, a burst of 10,000 new ApiClients would keep
    /// 10,000 Events in its cache for six minutes (23 MiB in the controller benchmark).
    /// Warnings repeat while a problem lasts and go through the Recorder's series.
    pub async fn publish(
        &self,
        reference: &ObjectReference,
        type_: EventType,
        reason: &str,
        note: &str,
    ) {
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note.into()),
            action: "Reconcile".into(),
            secondary: None,
        };
        let result = match type_ {
            EventType::Warning => self.recorder.publish(&event, reference).await,
            EventType::Normal => self.create_event(&event, reference).await,
        };
        if let Err(error) = result {
            tracing::debug!(%error, "cannot publish an Event");
        }
    }

    async fn create_event(&self, event: &Event, reference: &ObjectReference) -> kube::Result<()> {
        let now = jiff::Timestamp::now();
        let namespace = reference
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let object = events::v1::Event {
            metadata: ObjectMeta {
                namespace: Some(namespace.clone()),
                name: Some(format!(
                    "{}.{:x}",
                    reference.name.as_deref().unwrap_or("keygate"),
                    now.as_nanosecond()
                )),
                ..ObjectMeta::default()
            },
            action: Some(event.action.clone()),
            reason: Some(event.reason.clone()),
            note: event.note.clone(),
            event_time: Some(MicroTime(now)),
            regarding: Some(reference.clone()),
            reporting_controller: Some(self.reporter.controller.clone()),
            reporting_instance: Some(
                self.reporter
                    .instance
                    .clone()
                    .unwrap_or_else(|| self.reporter.controller.clone()),
            ),
            type_: Some("Normal".into()),
            ..events::v1::Event::default()
        };
        let api: kube::Api<events::v1::Event> =
            kube::Api::namespaced(self.client.clone(), &namespace);
        api.create(&PostParams::default(), &object)
            .await
            .map(|_| ())
    }

    /// Counts one write by `controller`.
    pub fn wrote(&self, controller: &'static str) {
        self.metrics
            .writes
            .get_or_create(&ReconcileLabels { controller })
            .inc();
    }
}

/// The error policy shared by the controllers: a permanent problem waits for a change to the
/// object (the reconciler already reported it in status and an Event); anything else is
/// retried with a delay, never in a hot loop.
pub fn error_policy(controller: &'static str, error: &Error, ctx: &Context) -> Action {
    ctx.metrics
        .failures
        .get_or_create(&FailureLabels {
            controller,
            reason: error.label(),
        })
        .inc();
    tracing::warn!(controller, %error, "reconcile failed");
    match error {
        Error::Invalid(_) => Action::await_change(),
        _ => Action::requeue(Duration::from_secs(10)),
    }
}

/// A kind of object the operator watches and caches: decoded from the API, cloned and shared
/// between tasks.
pub trait Watched:
    kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static
{
}

impl<K> Watched for K where
    K: kube::Resource
        + Clone
        + serde::de::DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static
{
}

/// Drops what keygate never reads from a watched object before it is cached: managed fields
/// and `kubectl apply`'s copy of the whole object. They are most of a small object's size.
pub fn lean<K: kube::Resource>(object: &mut K) {
    let meta = object.meta_mut();
    meta.managed_fields = None;
    if let Some(annotations) = meta.annotations.as_mut() {
        annotations.remove(LAST_APPLIED);
    }
}

/// The annotation `kubectl apply` (client-side) stores the applied object in.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";

/// Whether `namespace` is watched.
pub fn watched(config: &OperatorConfig, namespace: &str) -> bool {
    config.watch_namespaces.is_empty() || config.watch_namespaces.iter().any(|n| n == namespace)
}

/// `Api`s for a namespaced kind over the watched namespaces.
pub fn apis<K>(client: &Client, config: &OperatorConfig) -> Vec<kube::Api<K>>
where
    K: kube::Resource<Scope = kube::core::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    if config.watch_namespaces.is_empty() {
        vec![kube::Api::all(client.clone())]
    } else {
        config
            .watch_namespaces
            .iter()
            .map(|ns| kube::Api::namespaced(client.clone(), ns))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lean_keeps_what_keygate_reads() {
        use k8s_openapi::api::core::v1::Secret;
        use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ManagedFieldsEntry, ObjectMeta};
        let mut secret = Secret {
            metadata: ObjectMeta {
                name: Some("a".into()),
                managed_fields: Some(vec![ManagedFieldsEntry::default()]),
                annotations: Some(
                    [
                        (LAST_APPLIED.to_owned(), "{}".to_owned()),
                        (ROTATE_ANNOTATION.to_owned(), "1".to_owned()),
                    ]
                    .into(),
                ),
                ..ObjectMeta::default()
            },
            ..Secret::default()
        };
        lean(&mut secret);
        assert_eq!(secret.metadata.managed_fields, None);
        assert_eq!(
            secret.metadata.annotations,
            Some([(ROTATE_ANNOTATION.to_owned(), "1".to_owned())].into())
        );
        assert_eq!(secret.metadata.name.as_deref(), Some("a"));
    }
}
