//! The committed CRDs are the generated ones, and the generated schemas have the properties
//! the API server and `kubectl` need.

use keygate::api::{ApiClient, M2MRole, ScopePolicy, crds_yaml};
use kube::CustomResourceExt;
use serde_json::Value;

fn schema_of<K: CustomResourceExt>() -> Value {
    let crd = serde_json::to_value(K::crd()).unwrap();
    crd["spec"]["versions"][0].clone()
}

/// Every object node is structural: it has properties, additionalProperties, or explicitly
/// preserves unknown fields; every node has a type.
fn assert_structural(node: &Value, path: &str) {
    let Some(map) = node.as_object() else { return };
    assert!(
        map.contains_key("type") || map.contains_key("x-kubernetes-int-or-string"),
        "{path}: node without a type"
    );
    for forbidden in [
        "$ref",
        "oneOf",
        "anyOf",
        "allOf",
        "not",
        "definitions",
        "$defs",
    ] {
        if forbidden == "anyOf" || forbidden == "oneOf" || forbidden == "allOf" {
            // Allowed only as pure value validations without types, which we never emit.
            assert!(
                !map.contains_key(forbidden),
                "{path}: {forbidden} in schema"
            );
        } else {
            assert!(
                !map.contains_key(forbidden),
                "{path}: {forbidden} in schema"
            );
        }
    }
    if map.get("type") == Some(&Value::from("object")) {
        assert!(
            map.contains_key("properties")
                || map.contains_key("additionalProperties")
                || map.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true)),
            "{path}: object without properties"
        );
    }
    if let Some(props) = map.get("properties").and_then(Value::as_object) {
        for (name, child) in props {
            assert_structural(child, &format!("{path}.{name}"));
        }
    }
    if let Some(items) = map.get("items") {
        assert_structural(items, &format!("{path}[]"));
    }
    if let Some(extra) = map.get("additionalProperties").filter(|v| v.is_object()) {
        assert_structural(extra, &format!("{path}{{}}"));
    }
}

fn rules(version: &Value) -> Vec<String> {
    fn walk(node: &Value, out: &mut Vec<String>) {
        match node {
            Value::Object(map) => {
                if let Some(Value::Array(list)) = map.get("x-kubernetes-validations") {
                    out.extend(
                        list.iter()
                            .filter_map(|r| r["rule"].as_str().map(str::to_owned)),
                    );
                }
                map.values().for_each(|v| walk(v, out));
            }
            Value::Array(list) => list.iter().for_each(|v| walk(v, out)),
            _ => {}
        }
    }
    let mut out = Vec::new();
    walk(version, &mut out);
    out
}

fn column_names(version: &Value) -> Vec<String> {
    version["additionalPrinterColumns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_owned())
        .collect()
}

#[test]
fn committed_crds_match_the_types() {
    let committed = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/crds/keygate.dev.yaml"
    ))
    .expect("crds/keygate.dev.yaml exists");
    assert!(
        committed == crds_yaml().unwrap(),
        "crds/keygate.dev.yaml is stale: run `cargo run -- crd > crds/keygate.dev.yaml`"
    );
}

#[test]
fn schemas_are_structural_with_status_subresource() {
    for version in [
        schema_of::<M2MRole>(),
        schema_of::<ApiClient>(),
        schema_of::<ScopePolicy>(),
    ] {
        assert_structural(&version["schema"]["openAPIV3Schema"], "");
        assert_eq!(version["subresources"]["status"], serde_json::json!({}));
        assert_eq!(version["served"], true);
        assert_eq!(version["storage"], true);
        let status = &version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"];
        assert!(status.get("conditions").is_some());
        assert!(status.get("observedGeneration").is_some());
    }
}

#[test]
fn names_are_namespaced_with_short_names_and_category() {
    for (crd, short) in [
        (M2MRole::crd(), "m2mr"),
        (ApiClient::crd(), "kgc"),
        (ScopePolicy::crd(), "sp"),
    ] {
        assert_eq!(crd.spec.group, "keygate.dev");
        assert_eq!(crd.spec.scope, "Namespaced");
        assert_eq!(
            crd.spec.names.short_names.as_deref(),
            Some(&[short.to_owned()][..])
        );
        assert_eq!(
            crd.spec.names.categories.as_deref(),
            Some(&["keygate".to_owned()][..])
        );
        assert_eq!(crd.spec.versions[0].name, "v1alpha1");
    }
}

#[test]
fn printer_columns_make_kubectl_get_useful() {
    assert_eq!(
        column_names(&schema_of::<ApiClient>()),
        [
            "Ready",
            "Client ID",
            "Roles",
            "Secret",
            "Fingerprint",
            "Disabled",
            "Age"
        ]
    );
    assert_eq!(
        column_names(&schema_of::<M2MRole>()),
        ["Resources", "Ready", "Age"]
    );
    assert_eq!(
        column_names(&schema_of::<ScopePolicy>()),
        ["Resource", "Ready", "Rules", "Clients", "ConfigMap", "Age"]
    );
}

#[test]
fn cel_rules_cover_static_checks() {
    let client = rules(&schema_of::<ApiClient>()).join("\n");
    assert!(
        client.contains("duration(self) >= duration('1m') && duration(self) <= duration('24h')")
    );
    assert!(client.contains("duration(self.overlap) < duration(self.every)"));
    let policy = rules(&schema_of::<ScopePolicy>()).join("\n");
    assert!(policy.contains("has(self.anyOf) != has(self.allOf)"));
    assert!(policy.contains("!(self.public && has(self.requireScopes))"));
    assert!(policy.contains("self.matches('^[a-zA-Z][a-zA-Z0-9+.-]*://"));
    let role = rules(&schema_of::<M2MRole>()).join("\n");
    assert!(role.contains("self.all(s, s.matches('^[A-Za-z0-9*][A-Za-z0-9_.:/*-]*$'))"));
}

/// Runs the CRD's own CEL rules client-side, as the API server would.
mod cel {
    use super::*;

    fn client(spec: Value) -> Result<(), String> {
        let obj: ApiClient = serde_json::from_value(serde_json::json!({
            "apiVersion": "keygate.dev/v1alpha1", "kind": "ApiClient",
            "metadata": {"name": "c", "namespace": "n"}, "spec": spec
        }))
        .unwrap();
        obj.validate_cel().map_err(|e| e.to_string())
    }

    fn policy(spec: Value) -> Result<(), String> {
        let obj: ScopePolicy = serde_json::from_value(serde_json::json!({
            "apiVersion": "keygate.dev/v1alpha1", "kind": "ScopePolicy",
            "metadata": {"name": "p", "namespace": "n"}, "spec": spec
        }))
        .unwrap();
        obj.validate_cel().map_err(|e| e.to_string())
    }

    #[test]
    fn lifetimes_and_rotation_are_bounded() {
        assert!(client(serde_json::json!({"tokenLifetime": "15m"})).is_ok());
        let err = client(serde_json::json!({"tokenLifetime": "48h"})).unwrap_err();
        assert!(
            err.contains("tokenLifetime must be a duration between 1m and 24h"),
            "{err}"
        );
        assert!(client(serde_json::json!({"tokenLifetime": "10s"})).is_err());
        assert!(
            client(serde_json::json!({"rotation": {"every": "720h", "overlap": "24h"}})).is_ok()
        );
        let err = client(serde_json::json!({"rotation": {"every": "24h", "overlap": "48h"}}))
            .unwrap_err();
        assert!(err.contains("overlap must be shorter"), "{err}");
    }

    #[test]
    fn policy_rules_are_checked() {
        let ok = serde_json::json!({
            "resource": "https://orders.shop.svc",
            "scopes": [{"name": "orders.read"}],
            "rules": [{"name": "read", "methods": ["GET"], "paths": ["/orders/**"],
                       "requireScopes": {"anyOf": ["orders.read"]}}]
        });
        assert_eq!(policy(ok), Ok(()));
        let both = serde_json::json!({
            "resource": "https://orders.shop.svc",
            "rules": [{"name": "r", "paths": ["/"], "requireScopes": {"anyOf": ["a"], "allOf": ["b"]}}]
        });
        assert!(policy(both).unwrap_err().contains("exactly one of"));
        let public_with_scopes = serde_json::json!({
            "resource": "https://orders.shop.svc",
            "rules": [{"name": "r", "paths": ["/"], "public": true, "requireScopes": {"anyOf": ["a"]}}]
        });
        assert!(
            policy(public_with_scopes)
                .unwrap_err()
                .contains("public rule cannot require scopes")
        );
        for bad in [
            "orders.shop.svc",
            "https://orders#frag",
            "https://",
            "not a uri",
        ] {
            let spec = serde_json::json!({"resource": bad});
            assert!(policy(spec).unwrap_err().contains("absolute URI"), "{bad}");
        }
        let bad_scope = serde_json::json!({
            "resource": "https://o", "rules": [{"name": "r", "paths": ["/"], "requireScopes": {"allOf": ["has space"]}}]
        });
        assert!(policy(bad_scope).unwrap_err().contains("each scope"));
        let bad_method = serde_json::json!({"resource": "https://o", "rules": [{"name": "r", "methods": ["get"], "paths": ["/"]}]});
        assert!(
            policy(bad_method)
                .unwrap_err()
                .contains("upper-case HTTP methods")
        );
    }
}
