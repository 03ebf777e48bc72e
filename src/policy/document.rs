//! The policy file: everything a sidecar needs to decide offline, built from registry state
//! by one function that the operator (into a ConfigMap) and `keygate dev` (in memory) share.
//! Documented in docs/policy-file.md. It holds public keys and digests only, never a secret.

use std::collections::BTreeSet;

use jsonwebtoken::jwk::JwkSet;
use serde::{Deserialize, Serialize};

use super::{CompiledPolicy, RuleError};
use crate::api::ScopePolicySpec;
use crate::registry::{ObjectKey, RevocationList, Snapshot};

/// The `apiVersion` of the policy file format.
pub const POLICY_FILE_VERSION: &str = "keygate.dev/policy/v1";

/// The sidecar's policy file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyDocument {
    pub api_version: String,
    /// `namespace/name` of the ScopePolicy.
    pub policy: String,
    /// The resource indicator, the `aud` tokens must carry.
    pub resource: String,
    /// The ScopePolicy spec (rules, default action, scope matching, upstream, issuers).
    pub spec: ScopePolicySpec,
    /// keygate's own issuer and its public keys.
    pub keygate: KeygateIssuer,
    /// ApiClients with an effective grant on this resource, sorted by client id.
    #[serde(default)]
    pub clients: Vec<PolicyClient>,
    /// The clients were left out: too many for a ConfigMap (1 MiB), they come only through
    /// the policy stream. A sidecar that installs such a file keeps the clients it has.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub clients_omitted: bool,
    /// Client ids whose credentials are all refused (disabled ApiClients).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub disabled_clients: Vec<String>,
    /// Revoked token ids and per-client "not before" times.
    #[serde(default)]
    pub revocations: RevocationList,
}

/// keygate's issuer as a trusted issuer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct KeygateIssuer {
    pub issuer: String,
    pub jwks: JwkSet,
}

/// One ApiClient's verifiable credentials and scopes on this resource.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyClient {
    pub client_id: String,
    /// `namespace/name` of the ApiClient, for logs.
    pub name: String,
    /// The scopes it holds on this resource.
    pub scopes: Vec<String>,
    /// Public keys for key-pair JWTs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub keys: Vec<PolicyKey>,
    /// SHA-256 digests of its API keys.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub api_keys: Vec<PolicyApiKey>,
}

/// A client public key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyKey {
    pub fingerprint: String,
    /// SPKI PEM.
    pub public_key: String,
    /// Unix seconds after which the key no longer works (a previous key in its overlap).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after: Option<u64>,
}

/// An API key digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PolicyApiKey {
    /// `sha256:<base64url>`.
    pub digest: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not_after: Option<u64>,
}

impl PolicyDocument {
    /// Builds the policy file of ScopePolicy `key` from a registry snapshot. Fails with the
    /// rule errors when the rules do not compile, so a broken policy never reaches a sidecar.
    pub fn build(
        snapshot: &Snapshot,
        key: &ObjectKey,
        issuer: &str,
        jwks: &JwkSet,
        revocations: &RevocationList,
    ) -> Result<Self, BuildError> {
        let policy = snapshot.policies.get(key).ok_or(BuildError::NotFound)?;
        CompiledPolicy::compile(&policy.spec).map_err(BuildError::Rules)?;
        let resource = &policy.spec.resource;
        let owns_resource = snapshot
            .resources
            .get(resource)
            .is_some_and(|r| &r.policy == key);
        let mut clients = Vec::new();
        let mut disabled_clients = Vec::new();
        if owns_resource {
            for client in snapshot.clients_of(resource) {
                if client.disabled {
                    disabled_clients.push(client.client_id.to_string());
                    continue;
                }
                let scopes: BTreeSet<&String> = client.grants[resource].iter().collect();
                clients.push(PolicyClient {
                    client_id: client.client_id.to_string(),
                    name: client.key.to_string(),
                    scopes: scopes.into_iter().cloned().collect(),
                    keys: client
                        .material
                        .keys
                        .iter()
                        .map(|k| PolicyKey {
                            fingerprint: k.value.fingerprint.clone(),
                            public_key: k.value.public_pem.clone(),
                            not_after: k.until,
                        })
                        .collect(),
                    api_keys: client
                        .material
                        .api_keys
                        .iter()
                        .map(|k| PolicyApiKey {
                            digest: k.value.encode(),
                            not_after: k.until,
                        })
                        .collect(),
                });
            }
        }
        clients.sort_by(|a, b| a.client_id.cmp(&b.client_id));
        disabled_clients.sort();
        Ok(Self {
            api_version: POLICY_FILE_VERSION.to_owned(),
            policy: key.to_string(),
            resource: resource.clone(),
            spec: policy.spec.clone(),
            keygate: KeygateIssuer {
                issuer: issuer.to_owned(),
                jwks: jwks.clone(),
            },
            clients,
            clients_omitted: false,
            disabled_clients,
            revocations: revocations.clone(),
        })
    }

    /// The document without its clients (cloning everything else).
    pub fn without_clients(&self) -> Self {
        let Self {
            api_version,
            policy,
            resource,
            spec,
            keygate,
            clients: _,
            clients_omitted,
            disabled_clients,
            revocations,
        } = self;
        Self {
            api_version: api_version.clone(),
            policy: policy.clone(),
            resource: resource.clone(),
            spec: spec.clone(),
            keygate: keygate.clone(),
            clients: Vec::new(),
            clients_omitted: *clients_omitted,
            disabled_clients: disabled_clients.clone(),
            revocations: revocations.clone(),
        }
    }

    /// Parses and checks a policy file: no unknown field, known version, compiling rules.
    ///
    /// An unknown field is an error, as the API server's strict field validation makes it for
    /// `kubectl apply`: a misspelt or newer field this sidecar would skip could be a
    /// requirement it then does not enforce. The sidecar keeps its last good policy instead.
    pub fn parse(json: &[u8]) -> Result<Self, BuildError> {
        let document: Self = strict_json(json).map_err(BuildError::Malformed)?;
        if document.api_version != POLICY_FILE_VERSION {
            return Err(BuildError::Malformed(format!(
                "apiVersion {:?} is not {POLICY_FILE_VERSION}",
                document.api_version
            )));
        }
        CompiledPolicy::compile(&document.spec).map_err(BuildError::Rules)?;
        Ok(document)
    }
}

/// Parses one JSON value of `T`, refusing trailing data and any field `T` does not know, at
/// any depth, naming each by its path (`spec.rules.0.requiredScopes`): a field skipped by an
/// older sidecar could be a requirement it then does not enforce. The policy file and the
/// policy stream's lines are read with it.
pub fn strict_json<T: serde::de::DeserializeOwned>(json: &[u8]) -> Result<T, String> {
    let mut unknown = Vec::new();
    let mut deserializer = serde_json::Deserializer::from_slice(json);
    let value: T = serde_ignored::deserialize(&mut deserializer, |path| {
        // serde_ignored marks an `Option` on the way as `?`: not part of the document.
        unknown.push(path.to_string().replace("?.", ""));
    })
    .and_then(|value| deserializer.end().map(|()| value))
    .map_err(|e| e.to_string())?;
    if !unknown.is_empty() {
        let one = unknown.len() == 1;
        return Err(format!(
            "unknown field{} {}: this sidecar does not know {}, so it would not enforce {}; correct the spelling, or run a sidecar as new as the operator that wrote it",
            if one { "" } else { "s" },
            unknown.join(", "),
            if one { "it" } else { "them" },
            if one { "it" } else { "them" },
        ));
    }
    Ok(value)
}

/// Why a policy file could not be built or read.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("no such ScopePolicy")]
    NotFound,
    #[error("invalid rules: {}", .0.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))]
    Rules(Vec<RuleError>),
    #[error("malformed policy file: {0}")]
    Malformed(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURE: &str = include_str!("../../tests/fixtures/policy.json");

    #[test]
    fn unknown_fields_are_refused_naming_each() {
        assert!(PolicyDocument::parse(FIXTURE.as_bytes()).is_ok());
        let mut value: serde_json::Value = serde_json::from_str(FIXTURE).unwrap();
        let rule = &mut value["spec"]["rules"][0];
        let require = rule
            .as_object_mut()
            .unwrap()
            .remove("requireScopes")
            .unwrap();
        rule["requiredScopes"] = require;
        rule["authenticated"] = true.into();
        value["clients"][0]["apiKey"] = "x".into();
        let error = PolicyDocument::parse(value.to_string().as_bytes()).unwrap_err();
        let text = error.to_string();
        assert!(text.contains("spec.rules.0.requiredScopes"), "{text}");
        assert!(text.contains("clients.0.apiKey"), "{text}");
        // Trailing data is not a policy either.
        let trailing = format!("{FIXTURE} {{}}");
        assert!(PolicyDocument::parse(trailing.as_bytes()).is_err());
    }
}
