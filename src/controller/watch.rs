//! Feeds the registry from watches: ApiClients, M2MRoles, ScopePolicies, keygate's Secrets
//! and Namespaces. A relist replaces what the watch covers; one malformed object is skipped
//! (and dropped from the registry: fail closed) instead of stalling the watch.
//!
//! The ApiClient watch also keeps the operator's one cache of ApiClients ([`ClientCache`]),
//! which the ApiClient controller reads instead of watching them again.

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Namespace, Secret};
use kube::core::DeserializeGuard;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Api, Client, ResourceExt};
use tokio::sync::broadcast;

use super::cached::CachedClient;
use super::pacing::{Trigger, object_ref};
use super::{CLIENT_LABEL, MANAGED_BY, OperatorConfig, Watched, apis};
use crate::api::{M2MRole, ScopePolicy};
use crate::registry::{
    ClientInput, Credentials, Inputs, ObjectKey, PolicyInput, Registry, read_credentials,
};

/// Counts down the watches that have not completed their first list yet.
struct Synced {
    pending: std::sync::Mutex<usize>,
    done: tokio::sync::watch::Sender<bool>,
}

impl Synced {
    fn listed(&self) {
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        if *pending > 0 {
            *pending -= 1;
            if *pending == 0 {
                self.done.send_replace(true);
            }
        }
    }
}

enum Change<K> {
    Reset(Vec<K>),
    Apply(K),
    Delete(K),
}

/// The ApiClients of one watched API, cached by the registry's watch for the ApiClient
/// controller: the operator keeps one copy of each ApiClient, not one per reader, and only
/// what it reads of it ([`CachedClient`]), with the spec shared with the registry's inputs.
#[derive(Clone)]
pub struct ClientCache {
    pub store: Store<DeserializeGuard<CachedClient>>,
    /// Each ApiClient applied to the store; `None`: all of them (after a relist).
    changes: broadcast::Sender<Option<ObjectRef<DeserializeGuard<CachedClient>>>>,
}

impl ClientCache {
    /// Every cached ApiClient, then each one applied from now on (all of them again after a
    /// relist, or when the receiver fell behind): what the controller reconciles.
    pub fn triggers(
        &self,
    ) -> impl Stream<Item = Trigger<DeserializeGuard<CachedClient>>> + Send + use<> {
        // Subscribe first: an ApiClient applied in between comes twice, never not at all.
        let changes = self.changes.subscribe();
        let updates = futures::stream::unfold(changes, |mut changes| async move {
            let trigger = match changes.recv().await {
                Ok(Some(client)) => Trigger::One(client),
                Ok(None) | Err(broadcast::error::RecvError::Lagged(_)) => Trigger::All,
                Err(broadcast::error::RecvError::Closed) => return None,
            };
            Some((trigger, changes))
        });
        futures::stream::once(std::future::ready(Trigger::All)).chain(updates)
    }

    /// Tells the subscribed controller (if any, on the leader) about a watch event the
    /// store has applied.
    fn announce(&self, event: &watcher::Event<DeserializeGuard<CachedClient>>) {
        let change = match event {
            watcher::Event::Apply(client) => Some(object_ref(client)),
            watcher::Event::InitDone => None,
            _ => return,
        };
        // No receiver (a follower replica): nothing to tell.
        let _ = self.changes.send(change);
    }
}

/// Pending changes of the client cache a controller may fall behind by before it
/// reconciles every ApiClient instead.
const CLIENT_CHANGES: usize = 1024;

/// A watch of `api` whose objects are cached without what keygate never reads.
fn watch<K>(
    api: Api<K>,
    config: watcher::Config,
) -> impl Stream<Item = watcher::Result<watcher::Event<K>>> + Send + 'static
where
    K: Watched,
{
    watcher(api, config).default_backoff().modify(super::lean)
}

/// Runs one watch forever, turning its events into registry changes.
async fn feed<K>(
    events: impl Stream<Item = watcher::Result<watcher::Event<K>>> + Send + 'static,
    registry: Arc<Registry>,
    synced: Arc<Synced>,
    apply: impl Fn(&mut Inputs, Change<K>) + Send + Sync + 'static,
) where
    K: Watched,
{
    let mut buffer: Vec<K> = Vec::new();
    let mut events = events.boxed();
    while let Some(first) = events.next().await {
        // Gather what arrives within COALESCE, so a burst (a relist, many new Secrets) costs
        // a few registry rebuilds instead of one per object.
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + COALESCE;
        while batch.len() < MAX_BATCH {
            match tokio::time::timeout_at(deadline, events.next()).await {
                Ok(Some(event)) => batch.push(event),
                _ => break,
            }
        }
        let mut changes = Vec::new();
        let mut listed = false;
        for event in batch {
            match event {
                Ok(watcher::Event::Init) => buffer.clear(),
                Ok(watcher::Event::InitApply(object)) => buffer.push(object),
                Ok(watcher::Event::InitDone) => {
                    changes.push(Change::Reset(std::mem::take(&mut buffer)));
                    listed = true;
                }
                Ok(watcher::Event::Apply(object)) => changes.push(Change::Apply(object)),
                Ok(watcher::Event::Delete(object)) => changes.push(Change::Delete(object)),
                Err(error) => tracing::warn!(%error, "watch failed; retrying with backoff"),
            }
        }
        if !changes.is_empty() {
            registry.update(|inputs| changes.into_iter().for_each(|change| apply(inputs, change)));
        }
        if listed {
            synced.listed();
        }
    }
}

/// The most watch events applied in one registry update.
const MAX_BATCH: usize = 1024;
/// How long a watch gathers events before it updates the registry: a change reaches the
/// token server and the webhook this much later, and a burst costs a rebuild per interval.
const COALESCE: std::time::Duration = std::time::Duration::from_millis(100);

fn key_of<K: kube::Resource>(object: &K) -> ObjectKey {
    ObjectKey::new(
        object.meta().namespace.clone().unwrap_or_default(),
        object.meta().name.clone().unwrap_or_default(),
    )
}

/// Applies a change to one map of the inputs, for objects that may fail to deserialise.
/// `scope` is the namespace the watch covers (`None`: all), so a relist only replaces that.
fn apply_guarded<K, V>(
    map: &mut BTreeMap<ObjectKey, V>,
    scope: Option<&str>,
    change: Change<DeserializeGuard<K>>,
    convert: impl Fn(&K) -> V,
    kind: &str,
) where
    K: kube::Resource,
{
    let upsert = |map: &mut BTreeMap<ObjectKey, V>, object: DeserializeGuard<K>| match object.0 {
        Ok(object) => {
            map.insert(key_of(&object), convert(&object));
        }
        Err(invalid) => {
            let key = ObjectKey::new(
                invalid.metadata.namespace.clone().unwrap_or_default(),
                invalid.metadata.name.clone().unwrap_or_default(),
            );
            tracing::warn!(kind, object = %key, error = %invalid.error, "skipping a malformed object");
            map.remove(&key);
        }
    };
    match change {
        Change::Reset(objects) => {
            map.retain(|key, _| scope.is_some_and(|ns| &*key.namespace != ns));
            for object in objects {
                upsert(map, object);
            }
        }
        Change::Apply(object) => upsert(map, object),
        Change::Delete(object) => {
            let meta = match &object.0 {
                Ok(o) => o.meta().clone(),
                Err(invalid) => invalid.metadata.clone(),
            };
            map.remove(&ObjectKey::new(
                meta.namespace.unwrap_or_default(),
                meta.name.unwrap_or_default(),
            ));
        }
    }
}

/// Gives an ApiClient the spec of its cached copy when the spec did not change (most
/// updates are status writes), so the cache, the registry's inputs and the snapshot's view
/// share one spec per ApiClient instead of keeping one per version seen.
fn share_spec(
    store: &Store<DeserializeGuard<CachedClient>>,
    client: &mut DeserializeGuard<CachedClient>,
) {
    let Some(cached) = store.get(&ObjectRef::from_obj(client)) else {
        return;
    };
    if let (Ok(cached), Ok(client)) = (&cached.0, &mut client.0)
        && cached.spec == client.spec
    {
        client.spec = cached.spec.clone();
    }
}

/// The credentials of a keygate Secret, keyed by its ApiClient.
fn secret_entry(secret: &Secret) -> Option<(ObjectKey, Credentials)> {
    let client = secret.labels().get(CLIENT_LABEL)?;
    Some((
        ObjectKey::new(secret.namespace().unwrap_or_default(), client),
        read_credentials(&super::clients::secret_data(secret)),
    ))
}

/// What [`spawn_feeds`] gives the rest of the operator.
pub struct Feeds {
    /// Turns true once every watch has completed its first list (a relist after a lost
    /// connection does not count again).
    pub synced: tokio::sync::watch::Receiver<bool>,
    /// The cached ApiClients of each watched API, in the order of [`super::apis`].
    pub clients: Vec<ClientCache>,
}

/// Spawns the watches that keep `registry` current. They run until the process ends.
pub fn spawn_feeds(client: &Client, config: &OperatorConfig, registry: &Arc<Registry>) -> Feeds {
    // Four namespaced kinds per watched API, plus Namespaces.
    let watches = 4 * apis::<Secret>(client, config).len() + 1;
    let (done, synced_rx) = tokio::sync::watch::channel(false);
    let synced = Arc::new(Synced {
        pending: std::sync::Mutex::new(watches),
        done,
    });
    let mut clients = Vec::new();
    for (api, ns) in namespaced_apis::<DeserializeGuard<CachedClient>>(client, config) {
        let (store, writer) = reflector::store();
        let cache = ClientCache {
            store,
            changes: broadcast::channel(CLIENT_CHANGES).0,
        };
        clients.push(cache.clone());
        let store = cache.store.clone();
        let events = watch(api, watcher::Config::default())
            .modify(move |client| share_spec(&store, client))
            .reflect(writer)
            .inspect(move |event| {
                if let Ok(event) = event {
                    cache.announce(event);
                }
            });
        tokio::spawn(feed(
            events,
            registry.clone(),
            synced.clone(),
            move |inputs, change| {
                // Credentials come from the Secret watch, into `inputs.credentials`.
                apply_guarded(
                    &mut inputs.clients,
                    ns.as_deref(),
                    change,
                    |c: &CachedClient| ClientInput {
                        spec: c.spec.clone(),
                        credentials: None,
                    },
                    "ApiClient",
                );
            },
        ));
    }
    for (api, ns) in namespaced_apis::<DeserializeGuard<M2MRole>>(client, config) {
        tokio::spawn(feed(
            watch(api, watcher::Config::default()),
            registry.clone(),
            synced.clone(),
            move |inputs, change| {
                apply_guarded(
                    &mut inputs.roles,
                    ns.as_deref(),
                    change,
                    |r: &M2MRole| r.spec.clone(),
                    "M2MRole",
                );
            },
        ));
    }
    for (api, ns) in namespaced_apis::<DeserializeGuard<ScopePolicy>>(client, config) {
        tokio::spawn(feed(
            watch(api, watcher::Config::default()),
            registry.clone(),
            synced.clone(),
            move |inputs, change| {
                apply_guarded(
                    &mut inputs.policies,
                    ns.as_deref(),
                    change,
                    |p: &ScopePolicy| PolicyInput {
                        spec: p.spec.clone(),
                        created: p
                            .metadata
                            .creation_timestamp
                            .as_ref()
                            .map(|t| t.0.as_second()),
                    },
                    "ScopePolicy",
                );
            },
        ));
    }
    let selector = format!("{}={},{CLIENT_LABEL}", MANAGED_BY.0, MANAGED_BY.1);
    for (api, ns) in namespaced_apis::<Secret>(client, config) {
        let wc = watcher::Config::default().labels(&selector);
        tokio::spawn(feed(
            watch(api, wc),
            registry.clone(),
            synced.clone(),
            move |inputs, change| match change {
                Change::Reset(secrets) => {
                    inputs
                        .credentials
                        .retain(|key, _| ns.as_deref().is_some_and(|n| &*key.namespace != n));
                    inputs
                        .credentials
                        .extend(secrets.iter().filter_map(secret_entry));
                }
                Change::Apply(secret) => {
                    if let Some((key, data)) = secret_entry(&secret) {
                        inputs.credentials.insert(key, data);
                    }
                }
                Change::Delete(secret) => {
                    if let Some((key, _)) = secret_entry(&secret) {
                        inputs.credentials.remove(&key);
                    }
                }
            },
        ));
    }
    let namespaces: Api<Namespace> = Api::all(client.clone());
    tokio::spawn(feed(
        watch(namespaces, watcher::Config::default()),
        registry.clone(),
        synced.clone(),
        |inputs, change| {
            let labels = |n: &Namespace| (n.name_any(), n.labels().clone());
            match change {
                Change::Reset(all) => inputs.namespace_labels = all.iter().map(labels).collect(),
                Change::Apply(n) => {
                    let (name, l) = labels(&n);
                    inputs.namespace_labels.insert(name, l);
                }
                Change::Delete(n) => {
                    inputs.namespace_labels.remove(&n.name_any());
                }
            }
        },
    ));
    Feeds {
        synced: synced_rx,
        clients,
    }
}

/// The `Api`s of the watched namespaces with the namespace each covers (`None`: all).
fn namespaced_apis<K>(client: &Client, config: &OperatorConfig) -> Vec<(Api<K>, Option<String>)>
where
    K: kube::Resource<Scope = kube::core::NamespaceResourceScope>,
    K::DynamicType: Default,
{
    let apis = apis::<K>(client, config);
    if config.watch_namespaces.is_empty() {
        apis.into_iter().map(|a| (a, None)).collect()
    } else {
        apis.into_iter()
            .zip(config.watch_namespaces.iter().cloned().map(Some))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{ApiClient, ApiClientSpec};

    fn guarded(spec: ApiClientSpec, resource_version: &str) -> DeserializeGuard<CachedClient> {
        let mut client = ApiClient::new("billing", spec);
        client.metadata.namespace = Some("shop".into());
        client.metadata.resource_version = Some(resource_version.into());
        DeserializeGuard(Ok(CachedClient::from(client)))
    }

    fn spec_of(client: &DeserializeGuard<CachedClient>) -> &Arc<ApiClientSpec> {
        &client.0.as_ref().expect("valid").spec
    }

    #[test]
    fn an_update_that_keeps_the_spec_shares_the_cached_one() {
        let (store, mut writer) = reflector::store();
        let first = guarded(ApiClientSpec::default(), "1");
        writer.apply_watcher_event(&watcher::Event::Apply(first));
        let cached = store.state().pop().expect("cached");

        let mut status_update = guarded(ApiClientSpec::default(), "2");
        share_spec(&store, &mut status_update);
        assert!(Arc::ptr_eq(spec_of(&status_update), spec_of(&cached)));

        let changed = ApiClientSpec {
            disabled: true,
            ..ApiClientSpec::default()
        };
        let mut spec_update = guarded(changed.clone(), "3");
        share_spec(&store, &mut spec_update);
        assert_eq!(**spec_of(&spec_update), changed);
        assert!(!Arc::ptr_eq(spec_of(&spec_update), spec_of(&cached)));
    }
}
