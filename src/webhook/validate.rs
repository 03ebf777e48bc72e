//! Validation of keygate objects for what the CRD schema's CEL rules cannot check, with the
//! same parsing code the controller and the sidecar use, so nothing admitted fails later.
//! Pure: no I/O.
//!
//! Only single-object facts are checked. Cross-object facts (a role or ScopePolicy that does
//! not exist yet, two policies declaring one resource) are reported in status, never by
//! refusing the apply, so GitOps tools can apply objects in any order.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::api::{ApiClientSpec, M2MRoleSpec, ScopePolicySpec, parse_duration};
use crate::controller::policies::config_map_name;
use crate::policy::CompiledPolicy;

/// The longest Kubernetes object name (a DNS subdomain).
const MAX_NAME: usize = 253;

/// The name of the validating webhook in keygate's ValidatingWebhookConfiguration; the API
/// server names it in every refusal it relays.
pub const VALIDATING_WEBHOOK: &str = "validate.keygate.dev";

/// An ApiClient name this webhook always refuses: `keygate check` asks for one in a
/// server-side dry run, and a refusal from the webhook proves that the API server reaches it.
pub const STARTUP_CHECK_CLIENT: &str = "keygate-startupcheck";

/// What validation found: errors refuse the object, warnings are shown to the client
/// (`kubectl` prints them) and admit it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Findings {
    pub errors: Vec<String>,
    pub warnings: Vec<String>,
}

/// Validates a ScopePolicy: every rule compiles exactly as the sidecar compiles it (method
/// names, path pattern syntax, duplicate names, unreachable rules, required scopes the policy
/// does not define), and the name leaves room for the ConfigMap name. Every rule error names
/// `spec.rules[i]`.
pub fn validate_scope_policy(name: &str, spec: &ScopePolicySpec) -> Result<(), Vec<String>> {
    let mut errors = Vec::new();
    let config_map = config_map_name(name);
    if config_map.len() > MAX_NAME {
        errors.push(format!(
            "metadata.name: the policy ConfigMap name {config_map:?} would be longer than {MAX_NAME} characters; use a name of at most {} characters",
            MAX_NAME - (config_map.len() - name.len())
        ));
    }
    if let Err(rule_errors) = CompiledPolicy::compile(spec) {
        errors.extend(
            rule_errors
                .into_iter()
                .map(|e| format!("spec.rules[{}] (name {:?}): {}", e.index, e.name, e.message)),
        );
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

/// Validates an ApiClient: `spec.tokenLifetime` and `spec.rotation` parse with the parser the
/// registry and the controller use, within the bounds the schema states, and the default
/// Secret name is a valid name.
pub fn validate_api_client(name: &str, spec: &ApiClientSpec) -> Result<(), Vec<String>> {
    let mut errors = Vec::new();
    if name == STARTUP_CHECK_CLIENT {
        errors.push(format!(
            "metadata.name: {STARTUP_CHECK_CLIENT} is reserved for `keygate check`, which asks for it in a dry run to see that the API server reaches this webhook"
        ));
    }
    if let Some(lifetime) = &spec.token_lifetime {
        match parse_duration(lifetime) {
            Ok(d) if d < Duration::from_secs(60) || d > Duration::from_secs(24 * 3600) => errors
                .push(format!(
                    "spec.tokenLifetime: {lifetime:?} must be between 1m and 24h"
                )),
            Ok(_) => {}
            Err(e) => errors.push(format!("spec.tokenLifetime: {e}")),
        }
    }
    if let Some(rotation) = &spec.rotation {
        let every = parse_duration(&rotation.every)
            .map_err(|e| errors.push(format!("spec.rotation.every: {e}")))
            .ok();
        let overlap = parse_duration(&rotation.overlap)
            .map_err(|e| errors.push(format!("spec.rotation.overlap: {e}")))
            .ok();
        if let Some(every) = every
            && every < Duration::from_secs(3600)
        {
            errors.push(format!(
                "spec.rotation.every: {:?} must be at least 1h, e.g. 720h",
                rotation.every
            ));
        }
        if let (Some(every), Some(overlap)) = (every, overlap)
            && overlap >= every
        {
            errors.push(format!(
                "spec.rotation.overlap: {:?} must be shorter than spec.rotation.every {:?}",
                rotation.overlap, rotation.every
            ));
        }
    }
    if spec.secret_name.is_none() {
        let secret = format!("{name}-credentials");
        if secret.len() > MAX_NAME {
            errors.push(format!(
                "spec.secretName: the default Secret name {secret:?} would be longer than {MAX_NAME} characters; set spec.secretName"
            ));
        }
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors)
    }
}

/// Validates an M2MRole. The schema checks every field; nothing here refuses a role (see
/// [`m2m_role_warnings`] for what is worth telling the author).
pub fn validate_m2m_role(_spec: &M2MRoleSpec) -> Result<(), Vec<String>> {
    Ok(())
}

/// Harmless but probably unintended content of an M2MRole: a resource listed in several
/// permissions (the grants are merged) and a scope repeated within one permission.
pub fn m2m_role_warnings(spec: &M2MRoleSpec) -> Vec<String> {
    let mut warnings = Vec::new();
    let mut first: BTreeMap<&str, usize> = BTreeMap::new();
    for (index, permission) in spec.permissions.iter().enumerate() {
        if let Some(earlier) = first.get(permission.resource.as_str()) {
            warnings.push(format!(
                "spec.permissions[{index}]: resource {:?} is also in spec.permissions[{earlier}]; their scopes are merged, consider one entry",
                permission.resource
            ));
        } else {
            first.insert(&permission.resource, index);
        }
        let mut seen = std::collections::BTreeSet::new();
        for scope in &permission.scopes {
            if !seen.insert(scope.as_str()) {
                warnings.push(format!(
                    "spec.permissions[{index}].scopes: {scope:?} is listed twice"
                ));
            }
        }
    }
    warnings
}

/// Validates an object of `kind` (`ScopePolicy`, `ApiClient`, `M2MRole`) given as JSON, as
/// the admission request carries it. A spec that does not decode into keygate's types is an
/// error naming the field; an unknown kind is an error too (the webhook configuration should
/// not send it).
pub fn validate_object(kind: &str, object: &Value) -> Findings {
    let name = object
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let mut findings = Findings::default();
    let result = match kind {
        "ScopePolicy" => {
            decode::<ScopePolicySpec>(object).and_then(|s| validate_scope_policy(name, &s))
        }
        "ApiClient" => decode::<ApiClientSpec>(object).and_then(|s| validate_api_client(name, &s)),
        "M2MRole" => decode::<M2MRoleSpec>(object).and_then(|s| {
            findings.warnings = m2m_role_warnings(&s);
            validate_m2m_role(&s)
        }),
        other => Err(vec![format!(
            "keygate does not validate objects of kind {other:?}"
        )]),
    };
    if let Err(errors) = result {
        findings.errors = errors;
    }
    findings
}

fn decode<T: DeserializeOwned>(object: &Value) -> Result<T, Vec<String>> {
    let spec = object.get("spec").cloned().unwrap_or(Value::Null);
    if spec.is_null() {
        return Err(vec!["spec: required".to_owned()]);
    }
    serde_path_to_error::deserialize(spec).map_err(|e| {
        let path = e.path().to_string();
        vec![format!("spec.{path}: {}", e.inner())]
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn policy(rules: Value) -> Value {
        json!({
            "apiVersion": "keygate.dev/v1alpha1",
            "kind": "ScopePolicy",
            "metadata": {"name": "orders", "namespace": "shop"},
            "spec": {
                "resource": "https://orders.shop.svc",
                "scopes": [{"name": "orders.read"}, {"name": "orders.write"}],
                "rules": rules,
            }
        })
    }

    #[test]
    fn valid_policy_passes() {
        let object = policy(json!([
            {"name": "health", "paths": ["/healthz"], "public": true},
            {"name": "read", "methods": ["GET"], "paths": ["/orders/**"], "requireScopes": {"anyOf": ["orders.read"]}},
        ]));
        assert_eq!(validate_object("ScopePolicy", &object), Findings::default());
    }

    #[test]
    fn every_rule_error_names_its_index() {
        let object = policy(json!([
            {"name": "all", "paths": ["/**"], "requireScopes": {"anyOf": ["orders.read"]}},
            {"name": "shadowed", "methods": ["GET"], "paths": ["/orders"], "requireScopes": {"anyOf": ["orders.read"]}},
            {"name": "bad-path", "paths": ["/a/**/b"], "authenticated": true},
            {"name": "undefined", "paths": ["/x"], "requireScopes": {"allOf": ["orders.delete"]}},
        ]));
        let findings = validate_object("ScopePolicy", &object);
        assert_eq!(findings.errors.len(), 3, "{:?}", findings.errors);
        assert!(findings.errors[0].starts_with("spec.rules[1] (name \"shadowed\"): "));
        assert!(findings.errors[1].starts_with("spec.rules[2] (name \"bad-path\"): "));
        assert!(findings.errors[2].starts_with("spec.rules[3] (name \"undefined\"): "));
        assert!(findings.errors[2].contains("orders.delete"));
    }

    #[test]
    fn undecodable_spec_names_the_field() {
        let mut object = policy(json!([]));
        object["spec"]["upstream"] = json!({"port": "http"});
        let findings = validate_object("ScopePolicy", &object);
        assert_eq!(findings.errors.len(), 1);
        assert!(
            findings.errors[0].starts_with("spec.upstream.port: "),
            "{}",
            findings.errors[0]
        );
    }

    #[test]
    fn long_policy_name_is_refused() {
        let mut object = policy(json!([]));
        object["metadata"]["name"] = json!("a".repeat(250));
        let findings = validate_object("ScopePolicy", &object);
        assert!(findings.errors[0].starts_with("metadata.name: "));
    }

    #[test]
    fn api_client_durations() {
        let client = |spec: Value| json!({"kind": "ApiClient", "metadata": {"name": "billing"}, "spec": spec});
        let ok = client(
            json!({"roles": ["r"], "tokenLifetime": "15m", "rotation": {"every": "720h", "overlap": "24h"}}),
        );
        assert_eq!(validate_object("ApiClient", &ok), Findings::default());

        // Go's duration syntax accepts 1.5h, which CEL's duration() admits; keygate's parser
        // is the one that has to understand it.
        let bad = client(
            json!({"tokenLifetime": "forever", "rotation": {"every": "30m", "overlap": "1h"}}),
        );
        let errors = validate_object("ApiClient", &bad).errors;
        assert!(errors[0].starts_with("spec.tokenLifetime: "), "{errors:?}");
        assert!(
            errors
                .iter()
                .any(|e| e.starts_with("spec.rotation.every: "))
        );
        assert!(
            errors
                .iter()
                .any(|e| e.starts_with("spec.rotation.overlap: "))
        );

        let long = client(json!({"tokenLifetime": "48h"}));
        assert_eq!(validate_object("ApiClient", &long).errors.len(), 1);
    }

    #[test]
    fn the_startup_check_name_is_always_refused() {
        let object =
            json!({"kind": "ApiClient", "metadata": {"name": STARTUP_CHECK_CLIENT}, "spec": {}});
        let errors = validate_object("ApiClient", &object).errors;
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(errors[0].contains("reserved for `keygate check`"));
    }

    #[test]
    fn role_duplicates_are_warnings() {
        let role = json!({"kind": "M2MRole", "metadata": {"name": "reader"}, "spec": {"permissions": [
            {"resource": "https://a.svc", "scopes": ["a.read", "a.read"]},
            {"resource": "https://a.svc", "scopes": ["a.write"]},
        ]}});
        let findings = validate_object("M2MRole", &role);
        assert!(findings.errors.is_empty());
        assert_eq!(findings.warnings.len(), 2, "{:?}", findings.warnings);
        assert!(
            findings
                .warnings
                .iter()
                .any(|w| w.starts_with("spec.permissions[1]: "))
        );
    }

    #[test]
    fn unknown_kind_and_missing_spec() {
        assert_eq!(validate_object("Pod", &json!({})).errors.len(), 1);
        assert_eq!(
            validate_object("M2MRole", &json!({"metadata": {}})).errors,
            vec!["spec: required".to_owned()]
        );
    }
}
