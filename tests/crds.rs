//! The committed CRDs are the generated ones, and the generated schemas have the properties
//! the API server and `kubectl` need.

use keygate::api::{ApiClient, M2MRole, ScopePolicy, crds, crds_yaml};
use kube::{CustomResourceExt, Resource};
use serde_json::Value;

/// `K`'s CRD, as `keygate crd` prints it.
fn schema_crd<K: CustomResourceExt + Resource<DynamicType = ()>>()
-> k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition {
    crds()
        .into_iter()
        .find(|crd| crd.spec.names.kind == K::kind(&()))
        .expect("a CRD for the kind")
}

/// The served version of `K`'s CRD, as `keygate crd` prints it.
fn schema_of<K: CustomResourceExt + Resource<DynamicType = ()>>() -> Value {
    serde_json::to_value(schema_crd::<K>()).unwrap()["spec"]["versions"][0].clone()
}

/// The served version of every kind's CRD.
fn served_versions() -> [Value; 3] {
    [
        schema_of::<M2MRole>(),
        schema_of::<ApiClient>(),
        schema_of::<ScopePolicy>(),
    ]
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
    for version in served_versions() {
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
        (schema_crd::<M2MRole>(), "kgrole"),
        (schema_crd::<ApiClient>(), "kgclient"),
        (schema_crd::<ScopePolicy>(), "kgpolicy"),
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
            "Next Rotation",
            "Message",
            "Age"
        ]
    );
    assert_eq!(
        column_names(&schema_of::<M2MRole>()),
        ["Resources", "Ready", "Message", "Age"]
    );
    assert_eq!(
        column_names(&schema_of::<ScopePolicy>()),
        [
            "Resource",
            "Ready",
            "Rules",
            "Clients",
            "ConfigMap",
            "Message",
            "Age"
        ]
    );
    for version in served_versions() {
        let columns = version["additionalPrinterColumns"].as_array().unwrap();
        let message = columns.iter().find(|c| c["name"] == "Message").unwrap();
        assert_eq!(
            message["jsonPath"],
            r#".status.conditions[?(@.type=="Ready")].message"#
        );
        assert_eq!(message["priority"], 1, "Message is for -o wide");
    }
    let client = schema_of::<ApiClient>();
    let columns = client["additionalPrinterColumns"].as_array().unwrap();
    let next = columns
        .iter()
        .find(|c| c["name"] == "Next Rotation")
        .unwrap();
    assert_eq!(next["jsonPath"], ".status.nextRotationTime");
    // kubectl shows a future `date` as <invalid>: the timestamp itself is what helps.
    assert_eq!(next["type"], "string");
}

#[test]
fn conditions_are_a_map_keyed_by_type() {
    for version in served_versions() {
        let conditions = &version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
            ["conditions"];
        assert_eq!(conditions["x-kubernetes-list-type"], "map");
        assert_eq!(
            conditions["x-kubernetes-list-map-keys"],
            serde_json::json!(["type"])
        );
        assert_eq!(
            conditions["items"]["required"]
                .as_array()
                .map(|r| r.contains(&"type".into())),
            Some(true)
        );
    }
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
    assert!(policy.contains("(has(self.authenticated) && self.authenticated ? 1 : 0)"));
}

/// The API server refuses a CRD whose CEL rules it estimates too costly (v1.28: 10^7 per rule,
/// counted as the rule's cost times how often it can run in one object, i.e. the product of
/// the `maxItems` of the arrays above it; 10^8 for the whole schema). Its estimator is not
/// available here, so this guard keeps the CRDs far inside the budget by construction:
///
/// - no CEL rule iterates (`all`, `exists`, `map`, `filter`) or scans a string (`matches`,
///   `startsWith`, `contains`, ...): per-value checks are schema keywords (`pattern`,
///   `maxLength`, `maxItems`, `enum`), which cost nothing;
/// - every array above a rule has `maxItems` and every string under one has `maxLength`;
/// - an upper bound of each rule's cost (each token of the rule may touch every byte of the
///   longest string below it, at the API server's 4 bytes per character and 0.1 per byte)
///   times its cardinality stays within the budgets.
///
/// Reverting the patterns to `self.all(s, s.matches(...))` rules fails the first check;
/// `tests/e2e_cluster.rs` installs the CRDs on a real API server, which has the last word.
#[test]
fn cel_rules_stay_within_the_api_servers_cost_budget() {
    const PER_RULE: u64 = 10_000_000;
    const PER_CRD: u64 = 100_000_000;
    const FORBIDDEN: [&str; 11] = [
        ".all(",
        ".exists(",
        ".exists_one(",
        ".map(",
        ".filter(",
        "matches(",
        ".startsWith(",
        ".endsWith(",
        ".contains(",
        ".indexOf(",
        ".split(",
    ];

    struct Rule {
        path: String,
        rule: String,
        cardinality: Option<u64>,
        longest_string: Option<u64>,
    }

    /// The longest string at or below `node` (by `maxLength`), `None` if one is unbounded.
    fn longest_string(node: &Value) -> Option<u64> {
        let mut longest = 0;
        if node["type"] == "string" {
            longest = node["maxLength"].as_u64()?;
        }
        let children = node["properties"]
            .as_object()
            .into_iter()
            .flat_map(|p| p.values())
            .chain(node.get("items"))
            .chain(node.get("additionalProperties").filter(|v| v.is_object()));
        for child in children {
            longest = longest.max(longest_string(child)?);
        }
        Some(longest)
    }

    fn walk(node: &Value, path: &str, cardinality: Option<u64>, out: &mut Vec<Rule>) {
        if let Some(Value::Array(list)) = node.get("x-kubernetes-validations") {
            for rule in list {
                out.push(Rule {
                    path: path.to_owned(),
                    rule: rule["rule"].as_str().unwrap_or_default().to_owned(),
                    cardinality,
                    longest_string: longest_string(node),
                });
            }
        }
        if let Some(properties) = node["properties"].as_object() {
            for (name, child) in properties {
                walk(child, &format!("{path}.{name}"), cardinality, out);
            }
        }
        if let Some(items) = node.get("items") {
            let bound = node["maxItems"].as_u64();
            let inner = cardinality.zip(bound).map(|(c, b)| c * b);
            walk(items, &format!("{path}[]"), inner, out);
        }
        if let Some(values) = node.get("additionalProperties").filter(|v| v.is_object()) {
            let bound = node["maxProperties"].as_u64();
            let inner = cardinality.zip(bound).map(|(c, b)| c * b);
            walk(values, &format!("{path}{{}}"), inner, out);
        }
    }

    for version in served_versions() {
        let mut found = Vec::new();
        walk(
            &version["schema"]["openAPIV3Schema"],
            "",
            Some(1),
            &mut found,
        );
        let mut total = 0;
        for Rule {
            path,
            rule,
            cardinality,
            longest_string,
        } in found
        {
            if let Some(call) = FORBIDDEN.iter().find(|f| rule.contains(*f)) {
                panic!(
                    "{path}: CEL rule {rule:?} uses {call}: check single values with pattern, maxLength, maxItems or enum in the schema instead"
                );
            }
            let cardinality = cardinality.unwrap_or_else(|| {
                panic!(
                    "{path}: rule {rule:?} is under an array or map without maxItems/maxProperties"
                )
            });
            let longest = longest_string.unwrap_or_else(|| {
                panic!("{path}: rule {rule:?} reads a string without maxLength")
            });
            let tokens = rule
                .split(|c: char| !c.is_alphanumeric())
                .filter(|t| !t.is_empty())
                .count() as u64;
            let cost = tokens * (1 + (longest * 4).div_ceil(10)) * cardinality;
            assert!(
                cost <= PER_RULE,
                "{path}: rule {rule:?} may cost {cost} > {PER_RULE} (cardinality {cardinality})"
            );
            total += cost;
        }
        assert!(
            total <= PER_CRD,
            "rules of one CRD may cost {total} > {PER_CRD}"
        );
    }
}

/// Objects checked as the API server checks them: schema (patterns, bounds, unknown fields),
/// then the CEL rules. Each error names the field.
mod validation {
    use super::*;
    use keygate::api::parse_object;

    fn client(spec: Value) -> Result<(), String> {
        parse_object::<ApiClient>(serde_json::json!({
            "apiVersion": "keygate.dev/v1alpha1", "kind": "ApiClient",
            "metadata": {"name": "c", "namespace": "n"}, "spec": spec
        }))
        .map(drop)
        .map_err(|e| e.join("\n"))
    }

    fn policy(spec: Value) -> Result<(), String> {
        parse_object::<ScopePolicy>(serde_json::json!({
            "apiVersion": "keygate.dev/v1alpha1", "kind": "ScopePolicy",
            "metadata": {"name": "p", "namespace": "n"}, "spec": spec
        }))
        .map(drop)
        .map_err(|e| e.join("\n"))
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
                .contains("a rule states exactly one requirement")
        );
        for bad in [
            "orders.shop.svc",
            "https://orders#frag",
            "https://",
            "not a uri",
        ] {
            let spec = serde_json::json!({"resource": bad});
            assert!(
                policy(spec).unwrap_err().starts_with("spec.resource: "),
                "{bad}"
            );
        }
        let bad_scope = serde_json::json!({
            "resource": "https://o", "rules": [{"name": "r", "paths": ["/"], "requireScopes": {"allOf": ["has space"]}}]
        });
        assert!(
            policy(bad_scope)
                .unwrap_err()
                .starts_with("spec.rules[0].requireScopes.allOf[0]: ")
        );
        let bad_method = serde_json::json!({"resource": "https://o", "rules": [{"name": "r", "methods": ["get"], "paths": ["/"]}]});
        assert!(
            policy(bad_method)
                .unwrap_err()
                .starts_with("spec.rules[0].methods[0]: ")
        );
    }
}

#[path = "support/invalid.rs"]
mod invalid;

/// `keygate dev` refuses every invalid example, naming what its file says (the same files a
/// real API server refuses in tests/e2e_cluster.rs).
#[test]
fn every_invalid_example_is_refused_with_its_field() {
    for example in invalid::examples() {
        let mut object = example.object;
        object["metadata"]["namespace"] = "shop".into();
        let errors = match object["kind"].as_str().unwrap() {
            "ApiClient" => keygate::api::parse_object::<ApiClient>(object).map(drop),
            "ScopePolicy" => keygate::api::parse_object::<ScopePolicy>(object).map(drop),
            "M2MRole" => keygate::api::parse_object::<M2MRole>(object).map(drop),
            other => panic!("{}: unexpected kind {other}", example.file),
        }
        .expect_err(&example.file)
        .join("\n");
        for expected in &example.refused {
            assert!(
                errors.contains(expected.as_str()),
                "{}: {expected:?} not in\n{errors}",
                example.file
            );
        }
    }
}
