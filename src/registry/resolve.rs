//! The trust model, as pure functions: which role permissions take effect for which client.
//!
//! A ScopePolicy makes a resource exist. A role's permission on a resource counts only when
//! some ScopePolicy declares the resource, the policy lets the client's namespace in, and only
//! for scopes the policy defines. Everything else is reported as ineffective with a reason.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

use super::ObjectKey;
use crate::api::{ClientNamespaces, IneffectiveGrant, M2MRoleSpec, ScopeMatching};
use crate::grants::AllowedScopes;

/// What the registry knows of a declared resource.
#[derive(Debug, Clone, PartialEq)]
pub struct ResourceView {
    /// The ScopePolicy declaring it.
    pub policy: ObjectKey,
    pub matching: ScopeMatching,
    /// The scopes the policy defines.
    pub defined: BTreeSet<String>,
    pub client_namespaces: Option<ClientNamespaces>,
}

impl ResourceView {
    /// Whether clients in `namespace` (with `labels`) may get tokens for this resource.
    pub fn admits_namespace(&self, namespace: &str, labels: &BTreeMap<String, String>) -> bool {
        match &self.client_namespaces {
            None => namespace == &*self.policy.namespace,
            Some(allowed) => {
                allowed.names.iter().any(|n| n == namespace)
                    || allowed
                        .selector
                        .as_ref()
                        .is_some_and(|s| selector_matches(s, labels))
            }
        }
    }

    /// Whether a role scope grants anything here: it must satisfy some defined scope under
    /// the policy's matching (so `orders` counts under Hierarchic when `orders.read` is defined).
    pub fn defines(&self, scope: &str) -> bool {
        self.defined.contains(scope)
            || self
                .defined
                .iter()
                .any(|d| self.matching.satisfies(scope, d))
    }
}

/// Whether `labels` satisfy a Kubernetes label selector. An empty selector matches everything,
/// as in Kubernetes; an unknown operator matches nothing (fail closed).
pub fn selector_matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let labels_ok = selector
        .match_labels
        .iter()
        .flatten()
        .all(|(k, v)| labels.get(k) == Some(v));
    let expressions_ok = selector.match_expressions.iter().flatten().all(|e| {
        let values = e.values.as_deref().unwrap_or_default();
        let value = labels.get(&e.key);
        match e.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            _ => false,
        }
    });
    labels_ok && expressions_ok
}

/// The effective grants of a client in `namespace` with `roles`, and the ineffective ones.
pub fn resolve_grants<'a>(
    namespace: &str,
    namespace_labels: &BTreeMap<String, String>,
    roles: &[String],
    role: impl Fn(&str) -> Option<&'a M2MRoleSpec>,
    resources: &BTreeMap<String, ResourceView>,
) -> (AllowedScopes, Vec<IneffectiveGrant>) {
    let mut allowed = AllowedScopes::new();
    let mut ineffective = Vec::new();
    for role_name in roles {
        let Some(spec) = role(role_name) else {
            ineffective.push(IneffectiveGrant {
                role: role_name.clone(),
                resource: String::new(),
                scopes: Vec::new(),
                reason: format!("M2MRole {namespace}/{role_name} does not exist"),
            });
            continue;
        };
        for permission in &spec.permissions {
            let mut refuse = |scopes: Vec<String>, reason: String| {
                ineffective.push(IneffectiveGrant {
                    role: role_name.clone(),
                    resource: permission.resource.clone(),
                    scopes,
                    reason,
                })
            };
            let Some(resource) = resources.get(&permission.resource) else {
                refuse(
                    permission.scopes.clone(),
                    "no ScopePolicy declares this resource".into(),
                );
                continue;
            };
            if !resource.admits_namespace(namespace, namespace_labels) {
                refuse(
                    permission.scopes.clone(),
                    format!(
                        "ScopePolicy {} does not admit clients from namespace {namespace}",
                        resource.policy
                    ),
                );
                continue;
            }
            let (defined, undefined): (Vec<&String>, Vec<&String>) =
                permission.scopes.iter().partition(|s| resource.defines(s));
            if !undefined.is_empty() {
                refuse(
                    undefined.into_iter().cloned().collect(),
                    format!(
                        "ScopePolicy {} does not define these scopes",
                        resource.policy
                    ),
                );
            }
            if !defined.is_empty() {
                allowed
                    .entry(permission.resource.clone())
                    .or_default()
                    .extend(defined.into_iter().cloned());
            }
        }
    }
    (allowed, ineffective)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::Permission;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    const ORDERS: &str = "https://orders.shop.svc";

    fn mk_resource(
        ns: &str,
        defined: &[&str],
        namespaces: Option<ClientNamespaces>,
    ) -> ResourceView {
        ResourceView {
            policy: ObjectKey::new(ns, "orders"),
            matching: ScopeMatching::Exact,
            defined: defined.iter().map(|s| s.to_string()).collect(),
            client_namespaces: namespaces,
        }
    }

    fn mk_role(resource: &str, scopes: &[&str]) -> M2MRoleSpec {
        M2MRoleSpec {
            description: None,
            permissions: vec![Permission {
                resource: resource.into(),
                scopes: scopes.iter().map(|s| s.to_string()).collect(),
            }],
        }
    }

    fn resolve(
        ns: &str,
        labels: &[(&str, &str)],
        role: &M2MRoleSpec,
        resource: ResourceView,
    ) -> (AllowedScopes, Vec<IneffectiveGrant>) {
        let labels = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let resources = BTreeMap::from([(ORDERS.to_string(), resource)]);
        resolve_grants(
            ns,
            &labels,
            &["r".into()],
            |name| (name == "r").then_some(role),
            &resources,
        )
    }

    #[test]
    fn same_namespace_defined_scopes_are_granted() {
        let (allowed, ineffective) = resolve(
            "shop",
            &[],
            &mk_role(ORDERS, &["orders.read", "orders.admin"]),
            mk_resource("shop", &["orders.read", "orders.write"], None),
        );
        assert_eq!(allowed[ORDERS], BTreeSet::from(["orders.read".to_string()]));
        assert_eq!(ineffective.len(), 1);
        assert_eq!(ineffective[0].scopes, ["orders.admin"]);
        assert!(ineffective[0].reason.contains("does not define"));
    }

    #[test]
    fn other_namespace_needs_admission() {
        let role = mk_role(ORDERS, &["orders.read"]);
        let (allowed, ineffective) = resolve(
            "billing",
            &[],
            &role,
            mk_resource("shop", &["orders.read"], None),
        );
        assert!(allowed.is_empty());
        assert!(
            ineffective[0]
                .reason
                .contains("does not admit clients from namespace billing")
        );

        let by_name = ClientNamespaces {
            names: vec!["billing".into()],
            selector: None,
        };
        let (allowed, _) = resolve(
            "billing",
            &[],
            &role,
            mk_resource("shop", &["orders.read"], Some(by_name)),
        );
        assert!(allowed.contains_key(ORDERS));

        let by_label = ClientNamespaces {
            names: vec![],
            selector: Some(LabelSelector {
                match_labels: Some(BTreeMap::from([("team".into(), "finance".into())])),
                match_expressions: None,
            }),
        };
        let resource = mk_resource("shop", &["orders.read"], Some(by_label));
        assert!(
            resolve("billing", &[("team", "finance")], &role, resource.clone())
                .0
                .contains_key(ORDERS)
        );
        assert!(
            resolve("billing", &[("team", "ops")], &role, resource)
                .0
                .is_empty()
        );
    }

    #[test]
    fn undeclared_resource_and_missing_role_are_reported() {
        let role = mk_role("https://other.svc", &["x"]);
        let (allowed, ineffective) = resolve("shop", &[], &role, mk_resource("shop", &["x"], None));
        assert!(allowed.is_empty());
        assert!(ineffective[0].reason.contains("no ScopePolicy declares"));

        let resources = BTreeMap::new();
        let (_, ineffective) = resolve_grants(
            "shop",
            &BTreeMap::new(),
            &["ghost".into()],
            |_| None,
            &resources,
        );
        assert!(
            ineffective[0]
                .reason
                .contains("M2MRole shop/ghost does not exist")
        );
    }

    #[test]
    fn hierarchic_parent_scope_counts_as_defined() {
        let mut resource = mk_resource("shop", &["orders.read"], None);
        resource.matching = ScopeMatching::Hierarchic;
        let (allowed, ineffective) = resolve("shop", &[], &mk_role(ORDERS, &["orders"]), resource);
        assert!(ineffective.is_empty());
        assert!(allowed[ORDERS].contains("orders"));
    }

    #[test]
    fn selector_operators() {
        let labels = BTreeMap::from([("env".to_string(), "prod".to_string())]);
        let mk = |op: &str, values: &[&str]| LabelSelector {
            match_labels: None,
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "env".into(),
                operator: op.into(),
                values: Some(values.iter().map(|v| v.to_string()).collect()),
            }]),
        };
        assert!(selector_matches(&mk("In", &["prod", "dev"]), &labels));
        assert!(!selector_matches(&mk("NotIn", &["prod"]), &labels));
        assert!(selector_matches(&mk("Exists", &[]), &labels));
        assert!(!selector_matches(&mk("DoesNotExist", &[]), &labels));
        assert!(!selector_matches(&mk("Bogus", &[]), &labels));
        assert!(selector_matches(&LabelSelector::default(), &labels));
    }
}
