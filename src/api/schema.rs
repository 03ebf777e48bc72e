//! Checks an object against its CRD the way the API server does with strict field
//! validation (`kubectl apply` since 1.27): the OpenAPI schema (types, bounds, patterns,
//! enums; an unknown field is an error), then the CEL rules. `keygate dev` reads objects
//! through here, so a file it accepts is one the API server accepts.

use jsonschema::error::ValidationErrorKind;
use jsonschema::paths::LocationSegment;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::CustomResourceExt;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

/// Decodes `object` into `K` after checking it against `K`'s CRD schema and CEL rules. Each
/// error names the field (`spec.rules[1].requireScopes`) and what is wrong with it.
pub fn parse_object<K>(object: Value) -> Result<K, Vec<String>>
where
    K: DeserializeOwned + CustomResourceExt + Serialize,
{
    check_schema::<K>(&object)?;
    let parsed: K = serde_path_to_error::deserialize(object)
        .map_err(|e| vec![format!("{}: {}", e.path(), e.inner())])?;
    kube::core::cel::validate_cel(&parsed).map_err(|errors| {
        errors
            .into_vec()
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
    })?;
    Ok(parsed)
}

/// Checks `object` against the OpenAPI schema of `K`'s CRD, with unknown fields refused.
pub fn check_schema<K: CustomResourceExt>(object: &Value) -> Result<(), Vec<String>> {
    let crd = crd_of::<K>();
    let schema = crd.spec.versions[0]
        .schema
        .as_ref()
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .map(|s| serde_json::to_value(s).expect("a CRD schema serialises"))
        .expect("every keygate CRD has an openAPIV3Schema");
    let validator = jsonschema::draft4::new(&strict(with_object_meta(schema)))
        .expect("the generated CRD schema is a valid JSON schema");
    let errors: Vec<String> = validator
        .iter_errors(object)
        .flat_map(|error| {
            let path = field_path(error.instance_path().iter());
            match error.kind() {
                ValidationErrorKind::AdditionalProperties { unexpected } => unexpected
                    .iter()
                    .map(|name| format!("{}: unknown field", join(&path, name)))
                    .collect(),
                _ => vec![format!("{}: {error}", display(&path))],
            }
        })
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

/// `K`'s CRD as keygate publishes it (`keygate crd`, `crds/`, the API server, `keygate dev`):
/// the derived CRD with every `description` made of whole paragraphs. Doc comments are
/// wrapped at 100 columns, and `kubectl explain` would show those line breaks mid-sentence.
pub fn crd_of<K: CustomResourceExt>() -> CustomResourceDefinition {
    let mut value = serde_json::to_value(K::crd()).expect("a CRD serialises");
    join_description_lines(&mut value);
    serde_json::from_value(value).expect("a CRD deserialises")
}

/// Makes every `description` below `node` single-line paragraphs: the lines of a paragraph
/// are joined with one space, paragraphs stay apart by one blank line.
fn join_description_lines(node: &mut Value) {
    match node {
        Value::Object(map) => {
            for (key, value) in map.iter_mut() {
                match value {
                    Value::String(text) if key == "description" => *text = paragraphs(text),
                    _ => join_description_lines(value),
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(join_description_lines),
        _ => {}
    }
}

/// `text` with the lines of each paragraph joined: `"a\nb\n\nc"` becomes `"a b\n\nc"`.
fn paragraphs(text: &str) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut current = String::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() {
            if !current.is_empty() {
                out.push(std::mem::take(&mut current));
            }
        } else {
            if !current.is_empty() {
                current.push(' ');
            }
            current.push_str(line);
        }
    }
    if !current.is_empty() {
        out.push(current);
    }
    out.join("\n\n")
}

/// The root of a CRD schema leaves out what every object has; the API server adds it.
fn with_object_meta(mut schema: Value) -> Value {
    if let Some(Value::Object(properties)) = schema.get_mut("properties") {
        properties.insert("apiVersion".into(), serde_json::json!({"type": "string"}));
        properties.insert("kind".into(), serde_json::json!({"type": "string"}));
        properties.insert(
            "metadata".into(),
            serde_json::json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true}),
        );
    }
    schema
}

/// A structural CRD schema as plain JSON Schema: objects with declared properties refuse
/// others (as strict field validation does), and `nullable` admits `null`.
fn strict(mut node: Value) -> Value {
    let Some(map) = node.as_object_mut() else {
        return node;
    };
    if map.remove("nullable") == Some(Value::Bool(true))
        && let Some(Value::String(kind)) = map.get("type").cloned()
    {
        map.insert("type".into(), Value::from(vec![kind, "null".to_owned()]));
    }
    let open = map.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
    if let Some(Value::Object(properties)) = map.remove("properties") {
        let properties: Map<String, Value> = properties
            .into_iter()
            .map(|(name, child)| (name, strict(child)))
            .collect();
        map.insert("properties".into(), Value::Object(properties));
        if !open && !map.contains_key("additionalProperties") {
            map.insert("additionalProperties".into(), Value::Bool(false));
        }
    }
    for key in ["items", "additionalProperties"] {
        if let Some(child) = map.remove(key) {
            map.insert(key.into(), strict(child));
        }
    }
    node
}

/// `spec.rules[1].name`, from the segments of a JSON pointer.
fn field_path<'a>(segments: impl Iterator<Item = LocationSegment<'a>>) -> String {
    let mut out = String::new();
    for segment in segments {
        match segment {
            LocationSegment::Index(index) => out.push_str(&format!("[{index}]")),
            LocationSegment::Property(name) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(&name);
            }
        }
    }
    out
}

fn join(path: &str, name: &str) -> String {
    if path.is_empty() {
        name.to_owned()
    } else {
        format!("{path}.{name}")
    }
}

fn display(path: &str) -> &str {
    if path.is_empty() { "object" } else { path }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{ApiClient, M2MRole, ScopePolicy};
    use serde_json::json;

    fn policy(spec: Value) -> Value {
        json!({
            "apiVersion": "keygate.dev/v1alpha1", "kind": "ScopePolicy",
            "metadata": {"name": "orders", "namespace": "shop"},
            "spec": spec,
        })
    }

    fn errors_of<K>(object: Value) -> Vec<String>
    where
        K: DeserializeOwned + CustomResourceExt + Serialize,
    {
        parse_object::<K>(object).err().expect("refused")
    }

    #[test]
    fn descriptions_are_whole_paragraphs() {
        assert_eq!(
            paragraphs(
                "Lifetime of access tokens, a duration\nsuch as `15m`.\n\n  Defaults to 1h;\n  capped.\n"
            ),
            "Lifetime of access tokens, a duration such as `15m`.\n\nDefaults to 1h; capped."
        );
        assert_eq!(paragraphs("one line"), "one line");
        assert_eq!(paragraphs("a\n\n\n\nb"), "a\n\nb");
        // Every description of every CRD, as published.
        fn walk(node: &Value, path: &str) {
            match node {
                Value::Object(map) => {
                    for (key, value) in map {
                        if let (true, Some(text)) = (key == "description", value.as_str()) {
                            let no_wrap = text.split("\n\n").all(|p| !p.contains('\n'));
                            assert!(no_wrap, "{path}: a line break inside a paragraph: {text:?}");
                        }
                        walk(value, &format!("{path}.{key}"));
                    }
                }
                Value::Array(items) => items.iter().for_each(|item| walk(item, path)),
                _ => {}
            }
        }
        for crd in crate::api::crds() {
            let value = serde_json::to_value(&crd).unwrap();
            walk(&value, &crd.spec.names.kind);
        }
        let raw = serde_json::to_value(ApiClient::crd()).unwrap().to_string();
        assert!(
            raw.contains("such as `15m` or `1h`,\\nbetween 1m and 24h"),
            "the derived CRD is wrapped; this test would prove nothing"
        );
    }

    #[test]
    fn a_valid_policy_parses() {
        let parsed = parse_object::<ScopePolicy>(policy(json!({
            "resource": "https://orders.shop.svc",
            "scopes": [{"name": "orders.read"}],
            "rules": [{"name": "read", "methods": ["GET"], "paths": ["/orders/**"],
                       "requireScopes": {"anyOf": ["orders.read"]}}],
        })))
        .expect("valid");
        assert_eq!(parsed.spec.rules.len(), 1);
    }

    #[test]
    fn unknown_fields_are_errors_with_their_path() {
        let errors = errors_of::<ScopePolicy>(policy(json!({
            "resource": "https://orders.shop.svc",
            "descripton": "typo",
            "rules": [{"name": "write", "paths": ["/orders"],
                       "requiredScopes": {"anyOf": ["orders.write"]}}],
        })));
        assert!(
            errors.contains(&"spec.descripton: unknown field".to_owned()),
            "{errors:?}"
        );
        assert!(
            errors.contains(&"spec.rules[0].requiredScopes: unknown field".to_owned()),
            "{errors:?}"
        );
    }

    #[test]
    fn patterns_and_bounds_are_enforced() {
        let errors = errors_of::<ScopePolicy>(policy(json!({
            "resource": "orders",
            "rules": [{"name": "bad name", "methods": ["get"], "paths": ["orders"],
                       "requireScopes": {"allOf": ["ok", "no spaces"]}}],
        })));
        for field in [
            "spec.resource:",
            "spec.rules[0].name:",
            "spec.rules[0].methods[0]:",
            "spec.rules[0].paths[0]:",
            "spec.rules[0].requireScopes.allOf[1]:",
        ] {
            assert!(
                errors.iter().any(|e| e.starts_with(field)),
                "{field} not in {errors:?}"
            );
        }
        let errors = errors_of::<M2MRole>(json!({
            "apiVersion": "keygate.dev/v1alpha1", "kind": "M2MRole",
            "metadata": {"name": "r", "namespace": "shop"},
            "spec": {"permissions": [{"resource": "https://orders.shop.svc", "scopes": ["x".repeat(129)]}]},
        }));
        assert!(
            errors[0].starts_with("spec.permissions[0].scopes[0]:"),
            "{errors:?}"
        );
    }

    #[test]
    fn cel_rules_run_after_the_schema() {
        let errors = errors_of::<ApiClient>(json!({
            "apiVersion": "keygate.dev/v1alpha1", "kind": "ApiClient",
            "metadata": {"name": "c", "namespace": "shop"},
            "spec": {"rotation": {"every": "1h", "overlap": "2h"}},
        }));
        assert!(
            errors
                .iter()
                .any(|e| e.contains("rotation.overlap must be shorter")),
            "{errors:?}"
        );
        let errors = errors_of::<ApiClient>(json!({
            "apiVersion": "keygate.dev/v1alpha1", "kind": "ApiClient",
            "metadata": {"name": "c", "namespace": "shop"},
            "spec": {"roles": ["Not_A_Name"], "apikey": true},
        }));
        assert!(
            errors.contains(&"spec.apikey: unknown field".to_owned()),
            "{errors:?}"
        );
        assert!(
            errors.iter().any(|e| e.starts_with("spec.roles[0]:")),
            "{errors:?}"
        );
    }
}
