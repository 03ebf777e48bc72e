use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// An M2MRole is a named set of permissions: scopes on API resources. ApiClients in the same
/// namespace get the permissions of the roles they list. A permission only takes effect for
/// scopes the resource's ScopePolicy defines and for client namespaces it allows.
#[derive(CustomResource, KubeSchema, Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "keygate.dev",
    version = "v1alpha1",
    kind = "M2MRole",
    plural = "m2mroles",
    singular = "m2mrole",
    shortname = "kgrole",
    category = "keygate",
    doc = "An M2MRole is a named set of permissions: scopes on API resources, granted to the ApiClients that list it.",
    namespaced,
    cel,
    status = "M2MRoleStatus",
    printcolumn(
        name = "Resources",
        type_ = "string",
        json_path = ".spec.permissions[*].resource"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
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
pub struct M2MRoleSpec {
    /// What this role is for, shown to people; never used for decisions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub description: Option<String>,

    /// The scopes this role grants, per API resource.
    #[schemars(length(min = 1, max = 64))]
    pub permissions: Vec<Permission>,
}

/// Scopes granted on one API resource.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Permission {
    /// The API resource indicator (RFC 8707), an absolute URI such as
    /// `https://orders.shop.svc`. It is the `aud` of access tokens for that API and must be
    /// declared by a ScopePolicy.
    #[schemars(length(min = 1, max = 512), pattern(crate::api::RESOURCE_URI_PATTERN))]
    pub resource: String,

    /// The scopes granted on the resource, e.g. `orders.read`. Scope tokens are 1-128
    /// characters of letters, digits and `_ . : / - *`.
    #[schemars(
        length(min = 1, max = 64),
        inner(length(min = 1, max = 128), pattern(crate::api::SCOPE_PATTERN))
    )]
    pub scopes: Vec<String>,
}

/// What the operator resolved this role's permissions to.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct M2MRoleStatus {
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,

    /// The ScopePolicies each permission resolves to.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub resolved: Vec<ResolvedPermission>,

    /// Kubernetes-style conditions; `Ready` is true when every permission resolves to a
    /// ScopePolicy that defines all of its scopes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// One permission of a role as the operator resolved it.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ResolvedPermission {
    /// The API resource indicator.
    pub resource: String,
    /// The ScopePolicy (`namespace/name`) that declares the resource, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// Scopes of this permission the resource does not define; they grant nothing.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub undefined_scopes: Vec<String>,
}
