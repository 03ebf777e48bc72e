//! The in-memory index of clients, roles and policies that every request path reads.
//!
//! Writers (Kubernetes watches in the operator, YAML files in `keygate dev`) change the
//! [`Inputs`]; each change rebuilds an immutable [`Snapshot`] that readers get through a
//! `watch` channel. No request ever calls the Kubernetes API.

mod resolve;
mod revocation;

pub use resolve::*;
pub use revocation::*;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use crate::api::{
    ApiClientSpec, Grant, IneffectiveGrant, M2MRoleSpec, ScopePolicySpec, parse_duration,
};
use crate::credentials::{ClientMaterial, CredentialData};
use crate::grants::AllowedScopes;

/// Namespace and name of an object. Shared strings: every snapshot keys its maps by the
/// same keys, so cloning one must not allocate.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectKey {
    pub namespace: Arc<str>,
    pub name: Arc<str>,
}

impl ObjectKey {
    pub fn new(namespace: impl AsRef<str>, name: impl AsRef<str>) -> Self {
        Self {
            namespace: namespace.as_ref().into(),
            name: name.as_ref().into(),
        }
    }
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// An ApiClient as the registry needs it.
#[derive(Debug, Clone, Default)]
pub struct ClientInput {
    /// Shared with the client's view, which keeps it to tell an unchanged client apart.
    pub spec: Arc<ApiClientSpec>,
    /// The client's credentials when they come with it (`keygate dev`); the operator's come
    /// separately, in [`Inputs::credentials`].
    pub credentials: Option<Credentials>,
}

/// A ScopePolicy as the registry needs it.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyInput {
    pub spec: ScopePolicySpec,
    /// Creation time (Unix seconds) when known: the first policy to declare a resource owns
    /// it, so a later one cannot take over another team's API.
    pub created: Option<i64>,
}

/// Everything the registry is built from.
#[derive(Debug, Clone, Default)]
pub struct Inputs {
    pub roles: BTreeMap<ObjectKey, M2MRoleSpec>,
    pub clients: BTreeMap<ObjectKey, ClientInput>,
    pub policies: BTreeMap<ObjectKey, PolicyInput>,
    pub namespace_labels: BTreeMap<String, BTreeMap<String, String>>,
    /// Credentials by ApiClient key, when they arrive separately from the ApiClient (the
    /// operator watches Secrets and ApiClients apart; either may come first).
    pub credentials: BTreeMap<ObjectKey, Credentials>,
}

/// An ApiClient's credentials as the registry keeps them: parsed once, when they arrive,
/// into digests and public keys (never a secret or a private key), or why they are unusable.
/// Shared, so a rebuild tells unchanged credentials apart by pointer.
pub type Credentials = Result<Arc<ClientMaterial>, String>;

/// Reads credential data (a Secret's, or `keygate dev`'s state) into [`Credentials`].
pub fn read_credentials(data: &CredentialData) -> Credentials {
    ClientMaterial::from_data(data)
        .map(Arc::new)
        .map_err(|e| e.to_string())
}

/// One client as the token server and policy builder see it.
#[derive(Debug, Clone)]
pub struct ClientView {
    pub key: ObjectKey,
    /// Shared with the snapshot's map key, so a rebuild does not copy it.
    pub client_id: Arc<str>,
    pub disabled: bool,
    /// The lifetime the client asked for; the token server caps it.
    pub token_lifetime: Option<Duration>,
    pub material: Arc<ClientMaterial>,
    /// The credentials the view was built from, to reuse it while they are unchanged.
    credentials: Option<Credentials>,
    /// The spec the view was built from, and what was wrong with it, to reuse it unchanged.
    spec: Arc<ApiClientSpec>,
    problems: Vec<Problem>,
    /// Effective scopes per resource; clients with the same grants share one value.
    pub grants: Arc<AllowedScopes>,
    pub ineffective: Vec<IneffectiveGrant>,
}

impl ClientView {
    /// The grants in the form the ApiClient status shows.
    pub fn status_grants(&self) -> Vec<Grant> {
        self.grants
            .iter()
            .map(|(resource, scopes)| Grant {
                resource: resource.clone(),
                scopes: scopes.iter().cloned().collect(),
            })
            .collect()
    }
}

/// A problem with one object that keeps it (or part of it) out of the snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub kind: &'static str,
    pub key: ObjectKey,
    pub message: String,
}

/// An immutable view of everything, rebuilt on each change.
#[derive(Debug, Default)]
pub struct Snapshot {
    /// Clients with credentials, by client id.
    pub clients: HashMap<Arc<str>, Arc<ClientView>>,
    /// Every client by object key, with or without credentials yet.
    pub clients_by_key: BTreeMap<ObjectKey, Arc<ClientView>>,
    /// Declared resources by resource indicator.
    pub resources: BTreeMap<String, ResourceView>,
    /// Policies by key (including ones that lost a resource conflict).
    pub policies: BTreeMap<ObjectKey, PolicyInput>,
    /// Roles by key, for resolving an ApiClient's grants from its latest spec.
    pub roles: BTreeMap<ObjectKey, M2MRoleSpec>,
    pub namespace_labels: BTreeMap<String, BTreeMap<String, String>>,
    pub problems: Vec<Problem>,
}

impl Snapshot {
    /// Builds the snapshot: resources from policies (first declaration wins), then each
    /// client's effective grants under the trust model.
    pub fn build(inputs: &Inputs) -> Self {
        Self::rebuild(inputs, None)
    }

    /// Builds the snapshot, reusing the client views of `previous` whose inputs are unchanged.
    pub fn rebuild(inputs: &Inputs, previous: Option<&Snapshot>) -> Self {
        let mut problems = Vec::new();
        let mut ordered: Vec<(&ObjectKey, &PolicyInput)> = inputs.policies.iter().collect();
        ordered.sort_by_key(|(key, p)| (p.created.unwrap_or(i64::MIN), (*key).clone()));
        let mut resources = BTreeMap::new();
        for (key, policy) in ordered {
            if let Some(owner) = resources
                .get(&policy.spec.resource)
                .map(|r: &ResourceView| r.policy.clone())
            {
                problems.push(Problem {
                    kind: "ScopePolicy",
                    key: key.clone(),
                    message: format!(
                        "resource {} is already declared by ScopePolicy {owner}",
                        policy.spec.resource
                    ),
                });
                continue;
            }
            resources.insert(
                policy.spec.resource.clone(),
                ResourceView {
                    policy: key.clone(),
                    matching: policy.spec.scope_matching,
                    defined: policy.spec.scopes.iter().map(|s| s.name.clone()).collect(),
                    client_namespaces: policy.spec.client_namespaces.clone(),
                },
            );
        }

        // With the same roles, policies and namespaces, a client whose spec and credentials
        // are unchanged keeps its view: a change to one client costs one resolution, not n.
        let same_context = previous.is_some_and(|p| {
            p.roles == inputs.roles
                && p.policies == inputs.policies
                && p.namespace_labels == inputs.namespace_labels
        });
        let no_labels = BTreeMap::new();
        // Most clients hold one of a few role combinations: keep one copy of each.
        let mut shared_grants: Option<HashSet<Arc<AllowedScopes>>> = None;
        let mut clients = HashMap::with_capacity(inputs.clients.len());
        let mut clients_by_key = BTreeMap::new();
        for (key, client) in &inputs.clients {
            let credentials = client.credentials.as_ref().or(inputs.credentials.get(key));
            let old = previous.and_then(|p| p.clients_by_key.get(key));
            let same_credentials = |view: &ClientView| match (&view.credentials, credentials) {
                (Some(Ok(a)), Some(Ok(b))) => Arc::ptr_eq(a, b),
                (Some(Err(a)), Some(Err(b))) => a == b,
                (None, None) => true,
                _ => false,
            };
            let view = match old {
                Some(view)
                    if same_context
                        && (Arc::ptr_eq(&view.spec, &client.spec) || view.spec == client.spec)
                        && same_credentials(view) =>
                {
                    problems.extend(view.problems.iter().cloned());
                    view.clone()
                }
                _ => {
                    let labels = inputs
                        .namespace_labels
                        .get(&*key.namespace)
                        .unwrap_or(&no_labels);
                    let (grants, ineffective) = resolve_grants(
                        &key.namespace,
                        labels,
                        &client.spec.roles,
                        |role| inputs.roles.get(&ObjectKey::new(&key.namespace, role)),
                        &resources,
                    );
                    let shared = shared_grants.get_or_insert_with(|| distinct_grants(previous));
                    let grants = match shared.get(&grants) {
                        Some(same) => same.clone(),
                        None => {
                            let grants = Arc::new(grants);
                            shared.insert(grants.clone());
                            grants
                        }
                    };
                    let view = client_view(key, client, credentials, grants, ineffective);
                    problems.extend(view.problems.iter().cloned());
                    Arc::new(view)
                }
            };
            if !view.client_id.is_empty() {
                clients.insert(view.client_id.clone(), view.clone());
            }
            clients_by_key.insert(key.clone(), view);
        }
        Self {
            clients,
            clients_by_key,
            resources,
            policies: inputs.policies.clone(),
            roles: inputs.roles.clone(),
            namespace_labels: inputs.namespace_labels.clone(),
            problems,
        }
    }

    /// The grants of a client in `namespace` with `roles`, resolved against this snapshot.
    pub fn resolve(
        &self,
        namespace: &str,
        roles: &[String],
    ) -> (AllowedScopes, Vec<IneffectiveGrant>) {
        let no_labels = BTreeMap::new();
        resolve_grants(
            namespace,
            self.namespace_labels.get(namespace).unwrap_or(&no_labels),
            roles,
            |role| self.roles.get(&ObjectKey::new(namespace, role)),
            &self.resources,
        )
    }

    /// Clients with an effective grant on `resource`, with their scopes there.
    pub fn clients_of(&self, resource: &str) -> impl Iterator<Item = &Arc<ClientView>> {
        self.clients
            .values()
            .filter(move |c| c.grants.contains_key(resource))
    }
}

/// The distinct grant values of a snapshot's clients.
fn distinct_grants(snapshot: Option<&Snapshot>) -> HashSet<Arc<AllowedScopes>> {
    let mut seen = HashSet::new();
    snapshot
        .into_iter()
        .flat_map(|s| s.clients_by_key.values())
        .filter(|view| seen.insert(Arc::as_ptr(&view.grants)))
        .map(|view| view.grants.clone())
        .collect()
}

/// Builds one client's view.
fn client_view(
    key: &ObjectKey,
    client: &ClientInput,
    credentials: Option<&Credentials>,
    grants: Arc<AllowedScopes>,
    ineffective: Vec<IneffectiveGrant>,
) -> ClientView {
    let mut problems = Vec::new();
    let problem = |message: String| Problem {
        kind: "ApiClient",
        key: key.clone(),
        message,
    };
    let material = match credentials {
        Some(Ok(material)) => Some(material.clone()),
        Some(Err(message)) => {
            problems.push(problem(message.clone()));
            None
        }
        None => None,
    };
    let token_lifetime = match client.spec.token_lifetime.as_deref().map(parse_duration) {
        Some(Ok(d)) => Some(d),
        Some(Err(e)) => {
            problems.push(problem(e));
            None
        }
        None => None,
    };
    ClientView {
        key: key.clone(),
        client_id: material
            .as_ref()
            .map_or_else(|| "".into(), |m| m.client_id.as_str().into()),
        disabled: client.spec.disabled,
        token_lifetime,
        material: material.unwrap_or_default(),
        credentials: credentials.cloned(),
        spec: client.spec.clone(),
        problems,
        grants,
        ineffective,
    }
}

/// The registry: inputs behind a lock, snapshots behind a watch channel.
#[derive(Debug)]
pub struct Registry {
    inputs: Mutex<Inputs>,
    tx: watch::Sender<Arc<Snapshot>>,
}

impl Default for Registry {
    fn default() -> Self {
        Self::new(Inputs::default())
    }
}

impl Registry {
    pub fn new(inputs: Inputs) -> Self {
        let snapshot = Arc::new(Snapshot::build(&inputs));
        Self {
            inputs: Mutex::new(inputs),
            tx: watch::Sender::new(snapshot),
        }
    }

    /// The current snapshot.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.tx.borrow().clone()
    }

    /// A receiver that sees every new snapshot.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.tx.subscribe()
    }

    /// Changes the inputs and publishes the rebuilt snapshot.
    pub fn update(&self, change: impl FnOnce(&mut Inputs)) {
        // A poisoned lock means a writer panicked mid-change; the inputs are still a
        // consistent value (every change is a plain map edit), so keep serving them.
        let mut inputs = self.inputs.lock().unwrap_or_else(|p| p.into_inner());
        change(&mut inputs);
        let previous = self.snapshot();
        let snapshot = Arc::new(Snapshot::rebuild(&inputs, Some(&previous)));
        self.tx.send_replace(snapshot);
    }

    /// Replaces every input at once (a reload of all files, a relist).
    pub fn replace(&self, inputs: Inputs) {
        self.update(|current| *current = inputs);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{Permission, ScopeDefinition};
    use crate::credentials::ensure_material;

    const ORDERS: &str = "https://orders.shop.svc";

    fn inputs() -> Inputs {
        let mut inputs = Inputs::default();
        inputs.policies.insert(
            ObjectKey::new("shop", "orders"),
            PolicyInput {
                spec: ScopePolicySpec {
                    resource: ORDERS.into(),
                    scopes: ["orders.read", "orders.write"]
                        .map(|name| ScopeDefinition {
                            name: name.into(),
                            description: None,
                        })
                        .into(),
                    ..ScopePolicySpec::default()
                },
                created: Some(1),
            },
        );
        inputs
            .roles
            .insert(ObjectKey::new("shop", "reader"), role(&["orders.read"]));
        for name in ["a", "b"] {
            inputs.clients.insert(
                ObjectKey::new("shop", name),
                ClientInput {
                    spec: Arc::new(ApiClientSpec {
                        roles: vec!["reader".into()],
                        client_secret: true,
                        ..ApiClientSpec::default()
                    }),
                    credentials: None,
                },
            );
            inputs
                .credentials
                .insert(ObjectKey::new("shop", name), credentials(name));
        }
        inputs
    }

    fn role(scopes: &[&str]) -> M2MRoleSpec {
        M2MRoleSpec {
            description: None,
            permissions: vec![Permission {
                resource: ORDERS.into(),
                scopes: scopes.iter().map(|s| s.to_string()).collect(),
            }],
        }
    }

    fn credentials(name: &str) -> Credentials {
        let spec = ApiClientSpec {
            client_secret: true,
            ..ApiClientSpec::default()
        };
        let (data, _) = ensure_material(
            &spec,
            &format!("kgc_{name}"),
            "http://t/oauth2/token",
            "http://t",
            &CredentialData::new(),
        )
        .unwrap();
        read_credentials(&data)
    }

    fn view<'a>(snapshot: &'a Snapshot, name: &str) -> &'a Arc<ClientView> {
        &snapshot.clients_by_key[&ObjectKey::new("shop", name)]
    }

    #[test]
    fn a_rebuild_keeps_the_views_of_unchanged_clients() {
        let mut inputs = inputs();
        let before = Snapshot::build(&inputs);
        let b = ObjectKey::new("shop", "b");
        Arc::make_mut(&mut inputs.clients.get_mut(&b).unwrap().spec).disabled = true;
        let after = Snapshot::rebuild(&inputs, Some(&before));
        assert!(Arc::ptr_eq(view(&before, "a"), view(&after, "a")));
        assert!(!Arc::ptr_eq(view(&before, "b"), view(&after, "b")));
        assert!(view(&after, "b").disabled);
        assert!(Arc::ptr_eq(
            &view(&before, "b").material,
            &view(&after, "b").material
        ));

        inputs.credentials.insert(b.clone(), credentials("b2"));
        let rotated = Snapshot::rebuild(&inputs, Some(&after));
        assert_eq!(&*view(&rotated, "b").client_id, "kgc_b2");
        assert!(rotated.clients.contains_key("kgc_b2"));
        assert!(Arc::ptr_eq(view(&after, "a"), view(&rotated, "a")));
    }

    #[test]
    fn a_changed_role_or_policy_resolves_every_client_again() {
        let mut inputs = inputs();
        let before = Snapshot::build(&inputs);
        inputs.roles.insert(
            ObjectKey::new("shop", "reader"),
            role(&["orders.read", "orders.write"]),
        );
        let after = Snapshot::rebuild(&inputs, Some(&before));
        for name in ["a", "b"] {
            assert_eq!(
                view(&after, name).grants[ORDERS].len(),
                2,
                "{name} sees the new scope"
            );
        }
        inputs.policies.clear();
        let gone = Snapshot::rebuild(&inputs, Some(&after));
        assert!(view(&gone, "a").grants.is_empty());
    }

    #[test]
    fn clients_with_the_same_grants_share_them() {
        let snapshot = Snapshot::build(&inputs());
        assert!(Arc::ptr_eq(
            &view(&snapshot, "a").grants,
            &view(&snapshot, "b").grants
        ));
    }

    #[test]
    fn a_kept_view_keeps_its_problems() {
        let mut inputs = inputs();
        let a = ObjectKey::new("shop", "a");
        Arc::make_mut(&mut inputs.clients.get_mut(&a).unwrap().spec).token_lifetime =
            Some("soon".into());
        inputs
            .credentials
            .insert(ObjectKey::new("shop", "b"), Err("bad public key".into()));
        let before = Snapshot::build(&inputs);
        assert_eq!(before.problems.len(), 2, "{:?}", before.problems);
        let after = Snapshot::rebuild(&inputs, Some(&before));
        assert!(Arc::ptr_eq(view(&before, "a"), view(&after, "a")));
        assert_eq!(after.problems, before.problems);
        assert!(!after.clients.values().any(|c| &*c.key.name == "b"));
    }
}
