use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// An ApiClient is one machine identity. The operator keeps its credentials in a Secret
/// (client id and secret for the OAuth 2.0 client credentials grant, an optional key pair for
/// key-pair JWTs and `private_key_jwt`, an optional API key) and the token server issues it
/// access tokens with the scopes of its roles.
#[derive(CustomResource, KubeSchema, Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "keygate.dev",
    version = "v1alpha1",
    kind = "ApiClient",
    plural = "apiclients",
    singular = "apiclient",
    shortname = "kgclient",
    category = "keygate",
    doc = "An ApiClient is one machine identity; the operator keeps its credentials in a Secret and the token server issues it access tokens.",
    namespaced,
    cel,
    status = "ApiClientStatus",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(name = "Client ID", type_ = "string", json_path = ".status.clientId"),
    printcolumn(name = "Roles", type_ = "string", json_path = ".spec.roles"),
    printcolumn(
        name = "Secret",
        type_ = "string",
        json_path = ".status.secretName",
        priority = 1
    ),
    printcolumn(
        name = "Fingerprint",
        type_ = "string",
        json_path = ".status.keyFingerprint",
        priority = 1
    ),
    printcolumn(
        name = "Disabled",
        type_ = "boolean",
        json_path = ".spec.disabled",
        priority = 1
    ),
    printcolumn(
        name = "Next Rotation",
        type_ = "string",
        json_path = ".status.nextRotationTime",
        priority = 1
    ),
    printcolumn(
        name = "Message",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].message",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct ApiClientSpec {
    /// What this client is, shown to people; never used for decisions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub description: Option<String>,

    /// Names of M2MRoles in this namespace whose permissions this client gets. A role that
    /// does not exist yet is reported in status, not rejected, so objects can be applied in
    /// any order.
    #[serde(default)]
    #[schemars(
        length(max = 32),
        inner(length(min = 1, max = 253), pattern(crate::api::NAME_PATTERN))
    )]
    pub roles: Vec<String>,

    /// Issue an OAuth 2.0 client secret (`client_secret_basic` / `client_secret_post`).
    /// Defaults to true.
    #[serde(default = "default_true")]
    pub client_secret: bool,

    /// Issue a key pair for Snowflake-style key-pair JWTs and `private_key_jwt` client
    /// authentication. Absent: no key pair.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_pair: Option<KeyPairSpec>,

    /// Issue an API key the sidecar accepts as `Authorization: Bearer` or `X-API-Key`.
    /// Defaults to false.
    #[serde(default)]
    pub api_key: bool,

    /// Name of the Secret holding the credentials. Defaults to `<name>-credentials`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253), pattern(crate::api::NAME_PATTERN))]
    pub secret_name: Option<String>,

    /// Extra labels and annotations for the credentials Secret.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_template: Option<SecretTemplate>,

    /// Lifetime of access tokens issued to this client, a duration such as `15m` or `1h`,
    /// between 1m and 24h. Defaults to 1h; the token server may cap it lower.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = kube::core::Rule::new(crate::api::TOKEN_LIFETIME_RULE).message("tokenLifetime must be a duration between 1m and 24h, e.g. 15m"))]
    #[schemars(length(min = 2, max = 32))]
    pub token_lifetime: Option<String>,

    /// Scheduled credential rotation. Absent: rotate only on demand (annotation
    /// `keygate.dev/rotate`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotation: Option<RotationSpec>,

    /// A disabled client keeps its credentials but gets no tokens, and the sidecar refuses
    /// its key-pair JWTs and API keys.
    #[serde(default)]
    pub disabled: bool,
}

fn default_true() -> bool {
    true
}

/// Which key pair to issue.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct KeyPairSpec {
    /// Signature algorithm of the key pair: ES256 (P-256, the default), EdDSA (Ed25519) or
    /// RS256 (RSA 2048).
    #[serde(default)]
    pub algorithm: KeyAlgorithm,
}

/// A signature algorithm keygate issues keys for.
#[derive(
    Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, Hash, schemars::JsonSchema,
)]
pub enum KeyAlgorithm {
    /// ECDSA on P-256 with SHA-256.
    #[default]
    ES256,
    /// Ed25519.
    EdDSA,
    /// RSASSA-PKCS1-v1_5 with SHA-256, 2048-bit keys.
    RS256,
}

impl KeyAlgorithm {
    /// The JWS `alg` name.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ES256 => "ES256",
            Self::EdDSA => "EdDSA",
            Self::RS256 => "RS256",
        }
    }
}

impl std::fmt::Display for KeyAlgorithm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for KeyAlgorithm {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "ES256" => Ok(Self::ES256),
            "EdDSA" => Ok(Self::EdDSA),
            "RS256" => Ok(Self::RS256),
            other => Err(format!(
                "unsupported algorithm {other:?}: expected ES256, EdDSA or RS256"
            )),
        }
    }
}

/// Labels and annotations merged into the credentials Secret.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct SecretTemplate {
    /// Labels added to the Secret (keygate's own labels win on conflict).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Annotations added to the Secret.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// When credentials rotate and how long the previous ones stay valid.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[x_kube(validation = kube::core::Rule::new("duration(self.overlap) < duration(self.every)").message("rotation.overlap must be shorter than rotation.every"))]
#[serde(rename_all = "camelCase")]
pub struct RotationSpec {
    /// Rotate this often, a duration of at least 1h, e.g. `720h`.
    #[x_kube(validation = kube::core::Rule::new("duration(self) >= duration('1h')").message("rotation.every must be a duration of at least 1h, e.g. 720h"))]
    #[schemars(length(min = 2, max = 32))]
    pub every: String,
    /// Keep the previous credentials valid this long after a rotation, e.g. `24h`.
    #[x_kube(validation = kube::core::Rule::new("duration(self) >= duration('0s')").message("rotation.overlap must be a duration, e.g. 24h"))]
    #[schemars(length(min = 2, max = 32))]
    pub overlap: String,
}

/// What the operator made of an ApiClient.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ApiClientStatus {
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The OAuth 2.0 client id; stable for the life of the ApiClient.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// The Secret that holds the credentials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_name: Option<String>,
    /// `SHA256:` fingerprint of the current public key, as Snowflake's `RSA_PUBLIC_KEY_FP`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_fingerprint: Option<String>,
    /// Fingerprint of the previous public key while a rotation overlap lasts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_key_fingerprint: Option<String>,
    /// Scopes this client can get, per resource.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub grants: Vec<Grant>,
    /// Role permissions that grant nothing, with the reason.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ineffective_grants: Vec<IneffectiveGrant>,
    /// When the credentials last rotated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_rotation_time: Option<Time>,
    /// When the credentials rotate next on schedule.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_rotation_time: Option<Time>,
    /// Kubernetes-style conditions; `Ready` is true when the credentials Secret is in place.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// Scopes granted on one resource.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Grant {
    /// The API resource indicator (token `aud`).
    pub resource: String,
    /// The granted scopes, sorted.
    pub scopes: Vec<String>,
}

/// A role permission that grants nothing, and why.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IneffectiveGrant {
    /// The role holding the permission.
    pub role: String,
    /// The resource the permission names.
    pub resource: String,
    /// The scopes that grant nothing.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scopes: Vec<String>,
    /// Why, in words.
    pub reason: String,
}
