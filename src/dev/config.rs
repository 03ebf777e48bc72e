//! Reads the YAML manifests of `keygate dev` and checks them with the same rules as the
//! cluster: the CRDs' CEL rules (evaluated client-side), the policy compiler the sidecar and
//! the admission webhook use, and the cross-object checks a single directory allows.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

use crate::api::{ApiClient, M2MRole, ScopePolicy};
use crate::policy::CompiledPolicy;
use crate::registry::ObjectKey;

/// The namespace of objects that do not name one.
pub const DEFAULT_NAMESPACE: &str = "default";

/// One problem in the configuration, located as precisely as possible.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    /// 1-based document number within the file.
    pub document: usize,
    /// `Kind namespace/name` when known.
    pub object: Option<String>,
    pub message: String,
}

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (document {})", self.file.display(), self.document)?;
        if let Some(object) = &self.object {
            write!(f, " {object}")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Where an object came from.
#[derive(Debug, Clone)]
struct Origin {
    file: PathBuf,
    document: usize,
}

/// The objects of a configuration directory.
#[derive(Debug, Clone, Default)]
pub struct Config {
    pub roles: BTreeMap<ObjectKey, M2MRole>,
    pub clients: BTreeMap<ObjectKey, ApiClient>,
    pub policies: BTreeMap<ObjectKey, ScopePolicy>,
}

/// The `*.yaml` / `*.yml` files of `dir`, sorted, so loading is deterministic.
pub fn manifest_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    Ok(files)
}

/// Loads and checks every manifest in `dir`. Any error rejects the whole directory, so a
/// running `keygate dev` keeps its last good configuration.
pub fn load_dir(dir: &Path) -> Result<Config, Vec<ConfigError>> {
    let files = manifest_files(dir).map_err(|e| {
        vec![ConfigError {
            file: dir.to_owned(),
            document: 0,
            object: None,
            message: format!("cannot read the directory: {e}"),
        }]
    })?;
    let mut sources = Vec::new();
    for file in files {
        match std::fs::read_to_string(&file) {
            Ok(text) => sources.push((file, text)),
            Err(e) => {
                return Err(vec![ConfigError {
                    file,
                    document: 0,
                    object: None,
                    message: format!("cannot read the file: {e}"),
                }]);
            }
        }
    }
    load_sources(&sources)
}

/// Loads manifests from `(file name, text)` pairs.
pub fn load_sources(sources: &[(PathBuf, String)]) -> Result<Config, Vec<ConfigError>> {
    let mut config = Config::default();
    let mut origins: BTreeMap<(String, ObjectKey), Origin> = BTreeMap::new();
    let mut errors = Vec::new();
    for (file, text) in sources {
        for (index, document) in serde_yaml_ng::Deserializer::from_str(text).enumerate() {
            let origin = Origin {
                file: file.clone(),
                document: index + 1,
            };
            let error = |object: Option<String>, message: String| ConfigError {
                file: origin.file.clone(),
                document: origin.document,
                object,
                message,
            };
            let value: serde_json::Value = match serde::Deserialize::deserialize(document) {
                Ok(value) => value,
                Err(e) => {
                    errors.push(error(None, format!("not valid YAML: {e}")));
                    // A YAML syntax error poisons the rest of the stream.
                    break;
                }
            };
            if value.is_null() {
                continue;
            }
            let kind = value["kind"].as_str().unwrap_or_default().to_owned();
            let api_version = value["apiVersion"].as_str().unwrap_or_default();
            if api_version != "keygate.dev/v1alpha1" {
                errors.push(error(
                    None,
                    format!("apiVersion must be keygate.dev/v1alpha1, found {api_version:?}"),
                ));
                continue;
            }
            let name = value["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            let namespace = value["metadata"]["namespace"]
                .as_str()
                .unwrap_or(DEFAULT_NAMESPACE)
                .to_owned();
            let key = ObjectKey::new(&namespace, &name);
            let label = Some(format!("{kind} {key}"));
            if name.is_empty() {
                errors.push(error(None, "metadata.name is required".into()));
                continue;
            }
            if let Some(first) = origins.get(&(kind.clone(), key.clone())) {
                errors.push(error(
                    label,
                    format!(
                        "duplicate name: already defined in {} (document {})",
                        first.file.display(),
                        first.document
                    ),
                ));
                continue;
            }
            let result = match kind.as_str() {
                "M2MRole" => parse::<M2MRole>(value, &namespace).map(|o| {
                    config.roles.insert(key.clone(), o);
                }),
                "ApiClient" => parse::<ApiClient>(value, &namespace).map(|o| {
                    config.clients.insert(key.clone(), o);
                }),
                "ScopePolicy" => parse::<ScopePolicy>(value, &namespace).and_then(|o| {
                    CompiledPolicy::compile(&o.spec).map_err(|errs| {
                        errs.iter()
                            .map(|e| format!("spec.{e}"))
                            .collect::<Vec<_>>()
                            .join("; ")
                    })?;
                    config.policies.insert(key.clone(), o);
                    Ok(())
                }),
                other => Err(format!(
                    "unknown kind {other:?}: expected M2MRole, ApiClient or ScopePolicy"
                )),
            };
            match result {
                Ok(()) => {
                    origins.insert((kind, key), origin);
                }
                Err(message) => errors.push(error(label, message)),
            }
        }
    }
    cross_check(&config, &origins, &mut errors);
    if errors.is_empty() {
        Ok(config)
    } else {
        Err(errors)
    }
}

/// Checks an object as the API server would (schema with unknown fields refused, then CEL
/// rules) and decodes it.
fn parse<K>(mut value: serde_json::Value, namespace: &str) -> Result<K, String>
where
    K: DeserializeOwned + kube::CustomResourceExt + serde::Serialize,
{
    value["metadata"]["namespace"] = namespace.into();
    crate::api::parse_object(value).map_err(|errors| errors.join("; "))
}

/// Checks across objects: roles that clients name exist, a resource is declared once.
fn cross_check(
    config: &Config,
    origins: &BTreeMap<(String, ObjectKey), Origin>,
    errors: &mut Vec<ConfigError>,
) {
    let at = |kind: &str, key: &ObjectKey, message: String| {
        let origin = origins.get(&(kind.to_owned(), key.clone()));
        ConfigError {
            file: origin.map(|o| o.file.clone()).unwrap_or_default(),
            document: origin.map(|o| o.document).unwrap_or_default(),
            object: Some(format!("{kind} {key}")),
            message,
        }
    };
    for (key, client) in &config.clients {
        for role in &client.spec.roles {
            if !config
                .roles
                .contains_key(&ObjectKey::new(&key.namespace, role))
            {
                errors.push(at(
                    "ApiClient",
                    key,
                    format!(
                        "spec.roles: unknown role {role:?}: no M2MRole {}/{role} is defined",
                        key.namespace
                    ),
                ));
            }
        }
    }
    let mut declared: BTreeMap<&str, &ObjectKey> = BTreeMap::new();
    for (key, policy) in &config.policies {
        if let Some(first) = declared.insert(&policy.spec.resource, key) {
            errors.push(at(
                "ScopePolicy",
                key,
                format!(
                    "spec.resource: {} is already declared by ScopePolicy {first}",
                    policy.spec.resource
                ),
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str) -> Result<Config, Vec<ConfigError>> {
        load_sources(&[(PathBuf::from("t.yaml"), text.to_owned())])
    }

    const GOOD: &str = r#"
apiVersion: keygate.dev/v1alpha1
kind: ScopePolicy
metadata: {name: orders, namespace: shop}
spec:
  resource: https://orders.shop.svc
  scopes: [{name: orders.read}]
  rules:
    - {name: read, methods: [GET], paths: ["/orders/**"], requireScopes: {anyOf: [orders.read]}}
---
apiVersion: keygate.dev/v1alpha1
kind: M2MRole
metadata: {name: reader, namespace: shop}
spec:
  permissions: [{resource: https://orders.shop.svc, scopes: [orders.read]}]
---
apiVersion: keygate.dev/v1alpha1
kind: ApiClient
metadata: {name: reporting, namespace: shop}
spec: {roles: [reader]}
"#;

    #[test]
    fn loads_a_good_directory() {
        let config = load(GOOD).unwrap();
        assert_eq!(config.policies.len(), 1);
        assert_eq!(config.roles.len(), 1);
        assert!(
            config.clients[&ObjectKey::new("shop", "reporting")]
                .spec
                .client_secret
        );
    }

    #[test]
    fn broken_yaml_names_file_and_document() {
        let errors = load("apiVersion: keygate.dev/v1alpha1\nkind: [unclosed\n").unwrap_err();
        assert!(
            errors[0]
                .to_string()
                .starts_with("t.yaml (document 1): not valid YAML"),
            "{}",
            errors[0]
        );
    }

    #[test]
    fn unknown_role_duplicate_and_bad_pattern_are_reported() {
        let text = format!(
            "{GOOD}---\n{}",
            r#"apiVersion: keygate.dev/v1alpha1
kind: ApiClient
metadata: {name: ghost, namespace: shop}
spec: {roles: [nobody]}
---
apiVersion: keygate.dev/v1alpha1
kind: M2MRole
metadata: {name: reader, namespace: shop}
spec:
  permissions: [{resource: https://orders.shop.svc, scopes: [orders.read]}]
---
apiVersion: keygate.dev/v1alpha1
kind: ScopePolicy
metadata: {name: bad, namespace: shop}
spec:
  resource: https://bad.shop.svc
  rules: [{name: r, paths: ["/a/**/b"]}]
"#
        );
        let errors: Vec<String> = load(&text)
            .unwrap_err()
            .iter()
            .map(ToString::to_string)
            .collect();
        let all = errors.join("\n");
        assert!(all.contains("(document 5) M2MRole shop/reader: duplicate name: already defined in t.yaml (document 2)"), "{all}");
        assert!(all.contains("ScopePolicy shop/bad: spec.rules[0]"), "{all}");
        assert!(
            all.contains("ApiClient shop/ghost: spec.roles: unknown role \"nobody\""),
            "{all}"
        );
    }

    #[test]
    fn field_errors_and_cel_errors_name_the_field() {
        let wrong_type = "apiVersion: keygate.dev/v1alpha1\nkind: ApiClient\nmetadata: {name: c}\nspec: {roles: 5}\n";
        let errors = load(wrong_type).unwrap_err();
        assert_eq!(
            errors[0].message, "spec.roles: 5 is not of type \"array\"",
            "{}",
            errors[0]
        );
        // An unknown field is an error, as with `kubectl apply`'s strict field validation: a
        // misspelt `requireScopes` must never turn a rule into "any client".
        let typo = "apiVersion: keygate.dev/v1alpha1\nkind: ScopePolicy\nmetadata: {name: p}\nspec: {resource: 'https://o.svc', rules: [{name: w, paths: [/], requiredScopes: {anyOf: [o.write]}}]}\n";
        let errors = load(typo).unwrap_err();
        assert_eq!(
            errors[0].message, "spec.rules[0].requiredScopes: unknown field",
            "{}",
            errors[0]
        );
        let cel = "apiVersion: keygate.dev/v1alpha1\nkind: ApiClient\nmetadata: {name: c}\nspec: {tokenLifetime: 48h}\n";
        let errors = load(cel).unwrap_err();
        assert!(
            errors[0].message.contains(
                "spec.tokenLifetime: tokenLifetime must be a duration between 1m and 24h"
            ),
            "{}",
            errors[0]
        );
        assert_eq!(errors[0].object.as_deref(), Some("ApiClient default/c"));
    }
}
