use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// A ScopePolicy is what one API requires, owned by that API's team. It declares the API
/// resource (the `aud` of its tokens), the scopes the API defines, which namespaces' clients
/// may get tokens for it, and which scopes each route needs. The operator compiles it into a
/// ConfigMap that the injected keygate sidecar enforces.
#[derive(CustomResource, KubeSchema, Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "keygate.dev",
    version = "v1alpha1",
    kind = "ScopePolicy",
    plural = "scopepolicies",
    singular = "scopepolicy",
    shortname = "kgpolicy",
    category = "keygate",
    doc = "A ScopePolicy declares one API resource, the scopes it defines, who may get tokens for it and which scopes each route needs.",
    namespaced,
    cel,
    status = "ScopePolicyStatus",
    printcolumn(name = "Resource", type_ = "string", json_path = ".spec.resource"),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(name = "Rules", type_ = "integer", json_path = ".status.rules"),
    printcolumn(name = "Clients", type_ = "integer", json_path = ".status.clients"),
    printcolumn(
        name = "ConfigMap",
        type_ = "string",
        json_path = ".status.configMap",
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
pub struct ScopePolicySpec {
    /// The API resource indicator (RFC 8707) this policy declares, an absolute URI such as
    /// `https://orders.shop.svc`. Access tokens for this API carry it as `aud`.
    #[schemars(length(min = 1, max = 512), pattern(crate::api::RESOURCE_URI_PATTERN))]
    pub resource: String,

    /// What this API is, shown to people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub description: Option<String>,

    /// The scopes (permissions) this API defines. Roles can grant only these.
    #[serde(default)]
    #[schemars(length(max = 256), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub scopes: Vec<ScopeDefinition>,

    /// Which namespaces' ApiClients may get tokens for this API. Absent: only this
    /// ScopePolicy's own namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_namespaces: Option<ClientNamespaces>,

    /// Where the sidecar forwards allowed requests.
    #[serde(default)]
    pub upstream: UpstreamSpec,

    /// Route rules, tried in order; the first rule whose methods and paths match decides.
    #[serde(default)]
    #[schemars(length(max = 1024), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["name"]))]
    pub rules: Vec<RouteRule>,

    /// What happens to a request no rule matches: `Deny` (403, the default) or
    /// `Authenticated` (any valid credential for this API, no scope needed).
    #[serde(default)]
    pub default_action: DefaultAction,

    /// How a scope a client holds satisfies a scope a route requires: `Exact` (the default),
    /// `Hierarchic` (`orders` satisfies `orders.read` and `orders:read`) or `Wildcard`
    /// (`orders.*` satisfies `orders.read`).
    #[serde(default)]
    pub scope_matching: ScopeMatching,

    /// Extra token issuers the sidecar trusts besides keygate itself.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["issuer"]))]
    pub issuers: Vec<TrustedIssuer>,
}

/// One scope an API defines.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ScopeDefinition {
    /// The scope token, e.g. `orders.read`.
    #[schemars(length(min = 1, max = 128), pattern(crate::api::SCOPE_PATTERN))]
    pub name: String,
    /// What the scope allows, shown to people.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 1024))]
    pub description: Option<String>,
}

/// Namespaces whose clients may get tokens for an API: those listed by name and those whose
/// labels match the selector.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ClientNamespaces {
    /// Namespace names.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 256),
        inner(length(min = 1, max = 63), pattern(crate::api::LABEL_PATTERN))
    )]
    pub names: Vec<String>,
    /// A label selector over namespaces.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<LabelSelector>,
}

/// The workload port the sidecar forwards to.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct UpstreamSpec {
    /// The application's port on `127.0.0.1`. Defaults to 8080.
    #[serde(default = "default_upstream_port")]
    #[schemars(range(min = 1, max = 65535))]
    pub port: u16,
    /// Forward the `Authorization` header to the application. Defaults to false: the
    /// application gets the `X-Keygate-*` identity headers instead of the credential.
    #[serde(default)]
    pub forward_authorization: bool,
}

impl Default for UpstreamSpec {
    fn default() -> Self {
        Self {
            port: default_upstream_port(),
            forward_authorization: false,
        }
    }
}

fn default_upstream_port() -> u16 {
    8080
}

/// One route rule.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[x_kube(validation = kube::core::Rule::new("(has(self.public) && self.public ? 1 : 0) + (has(self.authenticated) && self.authenticated ? 1 : 0) + (has(self.requireScopes) ? 1 : 0) == 1").message("a rule states exactly one requirement: public: true, authenticated: true or requireScopes"))]
#[serde(rename_all = "camelCase")]
pub struct RouteRule {
    /// The rule's name, unique in the policy; it labels metrics and logs.
    #[schemars(length(min = 1, max = 63), pattern(crate::api::RULE_NAME_PATTERN))]
    pub name: String,
    /// HTTP methods the rule applies to (upper case). Empty: every method.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(
        length(max = 9),
        inner(
            length(min = 1, max = 16),
            pattern(r"^(GET|HEAD|POST|PUT|PATCH|DELETE|OPTIONS|CONNECT|TRACE)$")
        )
    )]
    pub methods: Vec<String>,
    /// Path patterns: exact segments, `*` for exactly one segment, and a final `**` for any
    /// suffix (including none), e.g. `/orders/*/items/**`.
    #[schemars(
        length(min = 1, max = 64),
        inner(length(min = 1, max = 1024), pattern("^/"))
    )]
    pub paths: Vec<String>,
    /// Let requests through without any credential. A rule sets exactly one of `public`,
    /// `authenticated` and `requireScopes`.
    #[serde(default)]
    pub public: bool,
    /// Let through any client with a valid credential and a grant on this API, whatever its
    /// scopes. A rule sets exactly one of `public`, `authenticated` and `requireScopes`.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub authenticated: bool,
    /// Scopes a request must hold. A rule sets exactly one of `public`, `authenticated` and
    /// `requireScopes`: a rule with none of them is refused, never read as "any client".
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub require_scopes: Option<RequireScopes>,
}

/// The scopes a route requires: at least one of `anyOf`, or all of `allOf`.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[x_kube(validation = kube::core::Rule::new("has(self.anyOf) != has(self.allOf)").message("set exactly one of requireScopes.anyOf and requireScopes.allOf"))]
#[serde(rename_all = "camelCase")]
pub struct RequireScopes {
    /// The request must hold at least one of these scopes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 64),
        inner(length(min = 1, max = 128), pattern(crate::api::SCOPE_PATTERN))
    )]
    pub any_of: Option<Vec<String>>,
    /// The request must hold every one of these scopes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(
        length(min = 1, max = 64),
        inner(length(min = 1, max = 128), pattern(crate::api::SCOPE_PATTERN))
    )]
    pub all_of: Option<Vec<String>>,
}

/// What happens to a request that no rule matches.
#[derive(
    Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema,
)]
pub enum DefaultAction {
    /// Refuse it with 403.
    #[default]
    Deny,
    /// Let it through with any valid credential for this API.
    Authenticated,
}

/// How a held scope satisfies a required scope.
#[derive(
    Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, schemars::JsonSchema,
)]
pub enum ScopeMatching {
    /// Only the same scope string.
    #[default]
    Exact,
    /// A scope also satisfies every scope below it: `orders` satisfies `orders.read`,
    /// `orders:read` and `orders.read.own`; `.` and `:` separate levels.
    Hierarchic,
    /// A `*` level in a held scope stands for any one level: `orders.*` satisfies
    /// `orders.read` (not `orders` nor `orders.read.own`).
    Wildcard,
}

/// A token issuer the sidecar trusts besides keygate.
#[derive(KubeSchema, Deserialize, Serialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TrustedIssuer {
    /// The exact `iss` claim of its tokens.
    #[schemars(length(min = 1, max = 512))]
    pub issuer: String,
    /// Where its JWKS is served (https, or http on loopback for tests).
    #[schemars(length(min = 1, max = 1024), pattern("^https?://"))]
    pub jwks_uri: String,
    /// `aud` values accepted from this issuer. Absent: this policy's resource.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 16), inner(length(min = 1, max = 512)))]
    pub audiences: Vec<String>,
}

/// What the operator made of a ScopePolicy.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ScopePolicyStatus {
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The ConfigMap holding the compiled policy for the sidecar.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_map: Option<String>,
    /// Number of compiled rules.
    #[serde(default)]
    pub rules: i32,
    /// Number of ApiClients with an effective grant on this resource.
    #[serde(default)]
    pub clients: i32,
    /// Problems in rules, each naming the rule index.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rule_errors: Vec<String>,
    /// Kubernetes-style conditions; `Ready` is true when the ConfigMap is up to date.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}
