//! Sidecar injection: the JSON patch that adds the keygate sidecar to a Pod. Pure: the
//! admission webhook and `keygate inject` both call [`inject`], and nothing here does I/O.
//!
//! A Pod opts in with the label `keygate.dev/inject: "true"` and names its ScopePolicy with
//! the annotation `keygate.dev/policy`. The patch adds
//! - the sidecar container `keygate-sidecar`: a native sidecar (the first init container,
//!   `restartPolicy: Always`) when the API server supports it (1.29+), otherwise the first
//!   regular container;
//! - the volume `keygate-policy` from the ConfigMap `<policy>-keygate-policy`, mounted
//!   read-only at `/etc/keygate` (no `subPath`, so ConfigMap updates reach the sidecar);
//! - the annotation `keygate.dev/injected: <version>` and the label `keygate.dev/capture:
//!   <mode>`;
//! - with capture mode `redirect` (the default), the init container `keygate-capture`, which
//!   runs first and redirects inbound TCP for the app's port to the sidecar
//!   ([`crate::capture`]), so the app's port answers only through the sidecar.
//!
//! An injection that would leave the app reachable around the sidecar is refused: every port
//! a container of the Pod declares, other than the sidecar's and the captured one, must be
//! listed in `keygate.dev/open-ports`. Clusters that forbid `NET_ADMIN` use capture mode
//! `network-policy` (the operator's NetworkPolicy admits only the sidecar's ports) or
//! `loopback` (the app listens on 127.0.0.1 only): both are explicit choices, per Pod with
//! the annotation `keygate.dev/capture` or for the cluster with the operator's
//! `--default-capture`.
//!
//! Injection is idempotent: a Pod that already has the container or the annotation gets no
//! patch, so `reinvocationPolicy: IfNeeded` and re-running `keygate inject` are no-ops.
//!
//! Injection fails closed: an opted-in Pod that cannot get a working sidecar is refused with a
//! [`Deny`] saying what to change, never admitted without it. That includes a Pod in a
//! namespace the operator does not watch ([`InjectConfig::watch_namespaces`]), where it keeps
//! no ScopePolicies and writes no policy ConfigMaps.

use std::collections::BTreeMap;

use json_patch::jsonptr::PointerBuf;
use json_patch::{AddOperation, Patch, PatchOperation};
use k8s_openapi::api::core::v1::{
    Capabilities, ConfigMapVolumeSource, Container, ContainerPort, EnvVar, EnvVarSource,
    HTTPGetAction, ObjectFieldSelector, Pod, PodSpec, Probe, ProjectedVolumeSource,
    ResourceRequirements, SeccompProfile, SecurityContext, ServiceAccountTokenProjection, Volume,
    VolumeMount, VolumeProjection,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use serde_json::Value;

use crate::controller::policies::{POLICY_CA_KEY, POLICY_KEY, config_map_name};

/// The label a Pod (template) carries to opt in.
pub const INJECT_LABEL: &str = "keygate.dev/inject";
/// The annotation naming the Pod's ScopePolicy (same namespace).
pub const POLICY_ANNOTATION: &str = "keygate.dev/policy";
/// Optional: the port the sidecar listens on for requests to the workload.
pub const LISTEN_PORT_ANNOTATION: &str = "keygate.dev/listen-port";
/// Optional: the workload's port on 127.0.0.1. Default: the ScopePolicy's `upstream.port`.
pub const UPSTREAM_PORT_ANNOTATION: &str = "keygate.dev/upstream-port";
/// Optional: the sidecar's CPU (a Kubernetes quantity such as `50m`).
pub const SIDECAR_CPU_ANNOTATION: &str = "keygate.dev/sidecar-cpu";
/// Optional: the sidecar's memory (a Kubernetes quantity such as `64Mi`).
pub const SIDECAR_MEMORY_ANNOTATION: &str = "keygate.dev/sidecar-memory";
/// Optional: how the app's port is closed to all but the sidecar ([`CaptureMode`]).
pub const CAPTURE_ANNOTATION: &str = "keygate.dev/capture";
/// Set by injection to the capture mode in effect; the operator's NetworkPolicy selects
/// Pods whose value is `network-policy`.
pub const CAPTURE_LABEL: &str = "keygate.dev/capture";
/// Optional: ports the Pod's containers declare that stay reachable without the sidecar on
/// purpose (comma-separated), e.g. a metrics port.
pub const OPEN_PORTS_ANNOTATION: &str = "keygate.dev/open-ports";
/// The injected traffic-capture init container's name.
pub const CAPTURE_NAME: &str = "keygate-capture";
/// The prefix of the annotations by which a Prometheus scrape configuration finds Pods
/// (`prometheus.io/scrape`, `/port`, `/path`), set by injection with
/// [`InjectConfig::prometheus_annotations`].
pub const PROMETHEUS_ANNOTATION_PREFIX: &str = "prometheus.io/";
/// Set by injection to the sidecar version.
pub const INJECTED_ANNOTATION: &str = "keygate.dev/injected";
/// The annotation `kubectl logs`/`exec` read to pick a container when none is named.
pub const DEFAULT_CONTAINER_ANNOTATION: &str = "kubectl.kubernetes.io/default-container";
/// The injected container's name.
pub const SIDECAR_NAME: &str = "keygate-sidecar";
/// The executable the sidecar container runs: the sidecar-only binary of keygate's image
/// (`keygate-sidecar`, the same code as `keygate sidecar` in a smaller program).
pub const SIDECAR_COMMAND: &str = "/keygate-sidecar";
/// The policy volume's name.
pub const POLICY_VOLUME: &str = "keygate-policy";
/// The projected ServiceAccount token volume's name (the policy stream's credential).
pub const TOKEN_VOLUME: &str = "keygate-token";
/// Where the projected token is mounted; the sidecar's default `--token-file` is `token` in it.
pub const TOKEN_MOUNT_PATH: &str = "/var/run/secrets/keygate";
/// The audience of the projected token, which the operator's TokenReview asks for.
pub const TOKEN_AUDIENCE: &str = "keygate";
/// How long a projected token lives; the kubelet renews it at 80 % of that.
pub const TOKEN_EXPIRATION_SECONDS: i64 = 3600;
/// Where the policy ConfigMap is mounted.
pub const POLICY_MOUNT_PATH: &str = "/etc/keygate";
/// The name of the sidecar's request port. A Service should target the number, not this
/// name: up to Kubernetes 1.31 a Service's named `targetPort` resolves only against regular
/// containers, and a native sidecar (1.29 and newer) is an init container.
pub const LISTEN_PORT_NAME: &str = "keygate";
/// The name of the sidecar's admin port (`/healthz`, `/readyz`, `/metrics`).
pub const ADMIN_PORT_NAME: &str = "keygate-admin";
/// The user and group the sidecar runs as (distroless `nonroot`).
pub const SIDECAR_UID: i64 = 65532;

/// How an injected Pod's app port is closed to everything but the sidecar.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum CaptureMode {
    /// The init container `keygate-capture` redirects inbound TCP for the app's port to the
    /// sidecar with netfilter rules in the Pod's network namespace; needs `NET_ADMIN` there.
    #[default]
    Redirect,
    /// The operator's NetworkPolicy admits inbound traffic to the Pod only on the sidecar's
    /// ports; needs a CNI that enforces NetworkPolicies.
    NetworkPolicy,
    /// The app listens on 127.0.0.1 only, so nothing outside the Pod reaches it; keygate
    /// takes the Pod's word for it.
    Loopback,
}

impl CaptureMode {
    /// The annotation and label value.
    pub fn as_str(self) -> &'static str {
        match self {
            CaptureMode::Redirect => "redirect",
            CaptureMode::NetworkPolicy => "network-policy",
            CaptureMode::Loopback => "loopback",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        [Self::Redirect, Self::NetworkPolicy, Self::Loopback]
            .into_iter()
            .find(|mode| mode.as_str() == text)
    }
}

/// What the injected sidecar looks like and where it can be injected, from the operator's
/// configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct InjectConfig {
    /// The keygate image; its entrypoint must be the `keygate` binary.
    pub image: String,
    /// `imagePullPolicy` of the sidecar; `None` lets the API server default it.
    pub image_pull_policy: Option<String>,
    /// Default port for requests to the workload (annotation `keygate.dev/listen-port`).
    pub listen_port: u16,
    /// Port of `/healthz`, `/readyz` and `/metrics`.
    pub admin_port: u16,
    /// Default requests and limits (annotations `keygate.dev/sidecar-cpu`/`-memory` override).
    pub resources: ResourceRequirements,
    /// Recorded in the annotation `keygate.dev/injected`.
    pub version: String,
    /// The namespaces whose Pods can get the sidecar: the operator's watched namespaces
    /// (`OperatorConfig::watch_namespaces`, which the operator copies here), the only ones
    /// where it reads ScopePolicies and writes policy ConfigMaps. Opted-in Pods elsewhere
    /// are refused. Empty: every namespace.
    pub watch_namespaces: Vec<String>,
    /// The capture mode of Pods without the annotation `keygate.dev/capture`.
    pub capture: CaptureMode,
    /// The operator's policy stream (`https://…:8443`). When set, the sidecar follows it
    /// with a projected ServiceAccount token (audience `keygate`, volume `keygate-token`)
    /// and the CA in its policy ConfigMap (`ca.crt`); the ConfigMap stays the bootstrap
    /// and the fallback.
    pub policy_server: Option<String>,
    /// What injected sidecars write to the audit trail (their `KEYGATE_AUDIT_*` environment
    /// when it differs from the defaults).
    pub audit: crate::audit::AuditConfig,
    /// Annotate injected Pods for annotation-based Prometheus scraping of the sidecar's
    /// `/metrics` (`prometheus.io/scrape`, `prometheus.io/port`: the admin port,
    /// `prometheus.io/path`), unless the Pod has a `prometheus.io/` annotation of its own,
    /// which is then left to scrape what the app asked for.
    pub prometheus_annotations: bool,
}

impl InjectConfig {
    /// The defaults: ports 8100 and 8101, requests 10m CPU and 32Mi memory, a 128Mi memory
    /// limit and no CPU limit, every namespace, capture mode `redirect`.
    pub fn new(image: impl Into<String>, version: impl Into<String>) -> Self {
        Self {
            image: image.into(),
            image_pull_policy: Some("IfNotPresent".to_owned()),
            listen_port: 8100,
            admin_port: 8101,
            resources: ResourceRequirements {
                requests: Some(quantities(&[("cpu", "10m"), ("memory", "32Mi")])),
                limits: Some(quantities(&[("memory", "128Mi")])),
                ..Default::default()
            },
            version: version.into(),
            watch_namespaces: Vec::new(),
            capture: CaptureMode::Redirect,
            policy_server: None,
            audit: crate::audit::AuditConfig::default(),
            prometheus_annotations: false,
        }
    }

    /// Whether Pods in `namespace` can get the sidecar (see [`Self::watch_namespaces`]).
    pub fn watches(&self, namespace: &str) -> bool {
        self.watch_namespaces.is_empty() || self.watch_namespaces.iter().any(|n| n == namespace)
    }
}

/// Why a Pod is refused; the message says what to change.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Deny(pub String);

/// Whether the Pod (template) opted in with `keygate.dev/inject: "true"`.
pub fn wants_injection(pod: &Pod) -> bool {
    pod.metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(INJECT_LABEL))
        .is_some_and(|v| v == "true")
}

/// Whether the Pod already has the sidecar (container or annotation).
pub fn is_injected(pod: &Pod) -> bool {
    let annotated = pod
        .metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(INJECTED_ANNOTATION));
    let has_container = pod.spec.as_ref().is_some_and(|spec| {
        spec.containers
            .iter()
            .chain(spec.init_containers.iter().flatten())
            .any(|c| c.name == SIDECAR_NAME)
    });
    annotated || has_container
}

/// The RFC 6902 patch that adds the sidecar to `pod`, in `namespace`.
///
/// - `Ok(None)`: nothing to do (not opted in, or already injected).
/// - `Err(Deny)`: the Pod opted in but cannot get a working sidecar (among other reasons,
///   because `namespace` is not one of `config.watch_namespaces`); the message says why and
///   how to fix it.
///
/// `native_sidecars`: the API server supports init containers with `restartPolicy: Always`
/// (Kubernetes 1.29+). `policy_upstream(namespace, name)` returns the ScopePolicy's
/// `spec.upstream.port`, or `None` when there is no such ScopePolicy.
pub fn inject(
    pod: &Pod,
    namespace: &str,
    config: &InjectConfig,
    native_sidecars: bool,
    policy_upstream: impl Fn(&str, &str) -> Option<u16>,
) -> Result<Option<Patch>, Deny> {
    if !wants_injection(pod) || is_injected(pod) {
        return Ok(None);
    }
    if !config.watches(namespace) {
        return Err(Deny(format!(
            "keygate: the pod has the label {INJECT_LABEL}: \"true\" but namespace {namespace} is not watched by this keygate operator (it watches {}), so it cannot get the sidecar; add {namespace} to the operator's watched namespaces (Helm value watchNamespaces, flag --watch-namespaces) or remove the label {INJECT_LABEL} from the pod (template)",
            config.watch_namespaces.join(", ")
        )));
    }
    let annotations = pod.metadata.annotations.clone().unwrap_or_default();
    let Some(policy) = annotations
        .get(POLICY_ANNOTATION)
        .map(|p| p.trim())
        .filter(|p| !p.is_empty())
    else {
        return Err(Deny(format!(
            "keygate: the pod has the label {INJECT_LABEL}: \"true\" but no ScopePolicy; add the annotation {POLICY_ANNOTATION}: <ScopePolicy name> to the pod (template) or remove the label {INJECT_LABEL}"
        )));
    };
    let Some(spec) = pod.spec.as_ref() else {
        return Err(Deny(
            "keygate: the pod has no spec to add the sidecar to".to_owned(),
        ));
    };
    let Some(policy_port) = policy_upstream(namespace, policy) else {
        return Err(Deny(format!(
            "keygate: the ScopePolicy {namespace}/{policy} named by the annotation {POLICY_ANNOTATION} does not exist; create it in namespace {namespace} first (kubectl apply -f <scopepolicy.yaml>) or correct the annotation"
        )));
    };

    let listen_port =
        port_annotation(&annotations, LISTEN_PORT_ANNOTATION)?.unwrap_or(config.listen_port);
    let upstream_port =
        port_annotation(&annotations, UPSTREAM_PORT_ANNOTATION)?.unwrap_or(policy_port);
    check_ports(spec, listen_port, config.admin_port, upstream_port)?;
    let capture = capture_mode(&annotations, config.capture)?;
    if capture != CaptureMode::NetworkPolicy {
        check_open_ports(spec, &annotations, capture, upstream_port)?;
    }
    for name in [POLICY_VOLUME, TOKEN_VOLUME] {
        if spec.volumes.iter().flatten().any(|v| v.name == name) {
            return Err(Deny(format!(
                "keygate: the pod already has a volume named {name}, which the sidecar needs; rename that volume"
            )));
        }
    }
    if spec
        .init_containers
        .iter()
        .flatten()
        .chain(spec.containers.iter())
        .any(|c| c.name == CAPTURE_NAME)
    {
        return Err(Deny(format!(
            "keygate: the pod already has a container named {CAPTURE_NAME}, which keygate adds; rename that container"
        )));
    }
    let resources = resources(&config.resources, &annotations)?;

    let container = sidecar_container(
        config,
        native_sidecars,
        listen_port,
        upstream_port,
        resources,
    );
    let container = to_value(&container)?;
    // Init containers run in order: capture first, then (native) the sidecar, then the Pod's
    // own, so nothing reaches the app's port before the rules are in place.
    let mut first_init = Vec::new();
    if capture == CaptureMode::Redirect {
        first_init.push(to_value(&capture_container(
            config,
            listen_port,
            upstream_port,
        ))?);
    }
    let mut ops = Vec::new();
    if native_sidecars {
        first_init.push(container);
    } else {
        ops.push(add(&["spec", "containers", "0"], container));
    }
    match &spec.init_containers {
        Some(_) => {
            for value in first_init.into_iter().rev() {
                ops.push(add(&["spec", "initContainers", "0"], value));
            }
        }
        None if !first_init.is_empty() => {
            ops.push(add(&["spec", "initContainers"], Value::Array(first_init)));
        }
        None => {}
    }

    let mut volumes = vec![to_value(&Volume {
        name: POLICY_VOLUME.to_owned(),
        config_map: Some(ConfigMapVolumeSource {
            name: config_map_name(policy),
            ..Default::default()
        }),
        ..Default::default()
    })?];
    if config.policy_server.is_some() {
        volumes.push(to_value(&Volume {
            name: TOKEN_VOLUME.to_owned(),
            projected: Some(ProjectedVolumeSource {
                sources: Some(vec![VolumeProjection {
                    service_account_token: Some(ServiceAccountTokenProjection {
                        audience: Some(TOKEN_AUDIENCE.to_owned()),
                        expiration_seconds: Some(TOKEN_EXPIRATION_SECONDS),
                        path: "token".to_owned(),
                    }),
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        })?);
    }
    match &spec.volumes {
        Some(_) => {
            for volume in volumes {
                ops.push(add(&["spec", "volumes", "-"], volume));
            }
        }
        None => ops.push(add(&["spec", "volumes"], Value::Array(volumes))),
    }

    let mut new_annotations = vec![(INJECTED_ANNOTATION, config.version.clone())];
    if !native_sidecars
        && !annotations.contains_key(DEFAULT_CONTAINER_ANNOTATION)
        && let Some(app) = spec.containers.first()
    {
        // The sidecar is now the first container: keep `kubectl logs`/`exec` on the app.
        new_annotations.push((DEFAULT_CONTAINER_ANNOTATION, app.name.clone()));
    }
    if config.prometheus_annotations
        && !annotations
            .keys()
            .any(|k| k.starts_with(PROMETHEUS_ANNOTATION_PREFIX))
    {
        new_annotations.extend([
            ("prometheus.io/scrape", "true".to_owned()),
            ("prometheus.io/port", config.admin_port.to_string()),
            ("prometheus.io/path", "/metrics".to_owned()),
        ]);
    }
    match &pod.metadata.annotations {
        Some(_) => {
            for (key, value) in new_annotations {
                ops.push(add(&["metadata", "annotations", key], Value::String(value)));
            }
        }
        None => {
            let map = new_annotations
                .into_iter()
                .map(|(k, v)| (k.to_owned(), Value::String(v)))
                .collect();
            ops.push(add(&["metadata", "annotations"], Value::Object(map)));
        }
    }
    // The inject label is there (it is how the Pod opted in), so `labels` exists.
    ops.push(add(
        &["metadata", "labels", CAPTURE_LABEL],
        Value::String(capture.as_str().to_owned()),
    ));
    Ok(Some(Patch(ops)))
}

fn capture_mode(
    annotations: &BTreeMap<String, String>,
    default: CaptureMode,
) -> Result<CaptureMode, Deny> {
    let Some(text) = annotations.get(CAPTURE_ANNOTATION) else {
        return Ok(default);
    };
    CaptureMode::parse(text.trim()).ok_or_else(|| {
        Deny(format!(
            "keygate: the annotation {CAPTURE_ANNOTATION}: {text:?} is not a capture mode; use \"redirect\" (the default: an init container with NET_ADMIN sends the app's port through the sidecar), \"network-policy\" (keygate's NetworkPolicy admits only the sidecar's ports) or \"loopback\" (the app listens on 127.0.0.1 only)"
        ))
    })
}

/// Refuses a Pod that declares a port the sidecar does not cover, unless the Pod lists it in
/// `keygate.dev/open-ports`: it would answer around the sidecar.
fn check_open_ports(
    spec: &PodSpec,
    annotations: &BTreeMap<String, String>,
    capture: CaptureMode,
    upstream: u16,
) -> Result<(), Deny> {
    let mut open = Vec::new();
    if let Some(text) = annotations.get(OPEN_PORTS_ANNOTATION) {
        for item in text.split(',').map(str::trim).filter(|i| !i.is_empty()) {
            match item.parse::<u16>() {
                Ok(port) if port > 0 => open.push(i32::from(port)),
                _ => {
                    return Err(Deny(format!(
                        "keygate: the annotation {OPEN_PORTS_ANNOTATION}: {text:?} is not a list of ports; use comma-separated numbers from 1 to 65535, e.g. \"9100,9200\""
                    )));
                }
            }
        }
    }
    for (container, number) in declared_ports(spec) {
        let covered = number == i32::from(upstream) && capture == CaptureMode::Redirect;
        let loopback_app = number == i32::from(upstream) && capture == CaptureMode::Loopback;
        if covered || open.contains(&number) {
            continue;
        }
        if loopback_app {
            return Err(Deny(format!(
                "keygate: container {:?} publishes port {number}, the app's port, but the capture mode is \"loopback\", which needs the app to listen on 127.0.0.1 only; remove the port from the container, or use capture mode \"redirect\" or \"network-policy\" (annotation {CAPTURE_ANNOTATION})",
                container.name
            )));
        }
        return Err(Deny(format!(
            "keygate: container {:?} declares port {number}, which would answer without the sidecar (capture mode {:?} covers only the app's port {upstream}); if it is meant to be reachable without keygate (e.g. metrics), list it in the annotation {OPEN_PORTS_ANNOTATION}: \"{number}\"; otherwise send it through the sidecar or remove it",
            container.name,
            capture.as_str()
        )));
    }
    Ok(())
}

/// An `add` operation; `tokens` are unescaped (`/` and `~` in a key are escaped per RFC 6901).
fn add(tokens: &[&str], value: Value) -> PatchOperation {
    PatchOperation::Add(AddOperation {
        path: PointerBuf::from_tokens(tokens.iter().copied()),
        value,
    })
}

fn to_value<T: serde::Serialize>(value: &T) -> Result<Value, Deny> {
    serde_json::to_value(value)
        .map_err(|e| Deny(format!("keygate: internal error building the patch: {e}")))
}

fn port_annotation(annotations: &BTreeMap<String, String>, key: &str) -> Result<Option<u16>, Deny> {
    let Some(text) = annotations.get(key) else {
        return Ok(None);
    };
    match text.trim().parse::<u16>() {
        Ok(port) if port > 0 => Ok(Some(port)),
        _ => Err(Deny(format!(
            "keygate: the annotation {key}: {text:?} is not a port; use a number from 1 to 65535, e.g. \"8080\""
        ))),
    }
}

/// Every container of the Pod (init containers included) with each port it declares.
fn declared_ports(spec: &PodSpec) -> impl Iterator<Item = (&Container, i32)> {
    spec.init_containers
        .iter()
        .flatten()
        .chain(spec.containers.iter())
        .flat_map(|c| c.ports.iter().flatten().map(move |p| (c, p.container_port)))
}

/// Refuses port layouts where the sidecar could not bind or would forward to itself.
fn check_ports(spec: &PodSpec, listen: u16, admin: u16, upstream: u16) -> Result<(), Deny> {
    if listen == admin {
        return Err(Deny(format!(
            "keygate: the sidecar listen port {listen} is also its admin port; set the annotation {LISTEN_PORT_ANNOTATION} to another port"
        )));
    }
    if upstream == listen || upstream == admin {
        return Err(Deny(format!(
            "keygate: the upstream port {upstream} is also a port of the sidecar (listen {listen}, admin {admin}); set the annotation {LISTEN_PORT_ANNOTATION} or {UPSTREAM_PORT_ANNOTATION} so they differ"
        )));
    }
    for (container, number) in declared_ports(spec) {
        if number == i32::from(listen) || number == i32::from(admin) {
            return Err(Deny(format!(
                "keygate: container {:?} already uses port {number}, which the sidecar needs (listen {listen}, admin {admin}); set the annotation {LISTEN_PORT_ANNOTATION} to a free port or move the container",
                container.name
            )));
        }
    }
    Ok(())
}

/// The configured resources with the annotation overrides applied. An override sets the
/// request, and the limit too when the configuration has one, so the request never exceeds
/// the limit.
fn resources(
    base: &ResourceRequirements,
    annotations: &BTreeMap<String, String>,
) -> Result<ResourceRequirements, Deny> {
    let mut out = base.clone();
    for (key, resource) in [
        (SIDECAR_CPU_ANNOTATION, "cpu"),
        (SIDECAR_MEMORY_ANNOTATION, "memory"),
    ] {
        let Some(text) = annotations.get(key) else {
            continue;
        };
        let text = text.trim();
        if !is_quantity(text) {
            return Err(Deny(format!(
                "keygate: the annotation {key}: {text:?} is not a Kubernetes quantity; use e.g. \"{}\"",
                if resource == "cpu" { "50m" } else { "64Mi" }
            )));
        }
        let quantity = Quantity(text.to_owned());
        out.requests
            .get_or_insert_with(BTreeMap::new)
            .insert(resource.to_owned(), quantity.clone());
        if let Some(limit) = out.limits.as_mut().and_then(|l| l.get_mut(resource)) {
            *limit = quantity;
        }
    }
    Ok(out)
}

/// A non-negative Kubernetes quantity: a decimal number with an optional binary (`Ki`…`Ei`),
/// decimal (`m`, `k`, `M`…`E`) or exponent (`e3`) suffix.
fn is_quantity(text: &str) -> bool {
    let text = text.strip_prefix('+').unwrap_or(text);
    let digits_end = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, suffix) = text.split_at(digits_end);
    let number_ok = !number.is_empty()
        && number != "."
        && number.matches('.').count() <= 1
        && number.chars().any(|c| c.is_ascii_digit());
    let suffix_ok = match suffix {
        "" | "m" | "k" | "M" | "G" | "T" | "P" | "E" | "Ki" | "Mi" | "Gi" | "Ti" | "Pi" | "Ei" => {
            true
        }
        exp => {
            let digits = exp
                .strip_prefix(['e', 'E'])
                .map(|rest| rest.strip_prefix(['+', '-']).unwrap_or(rest));
            digits.is_some_and(|d| !d.is_empty() && d.chars().all(|c| c.is_ascii_digit()))
        }
    };
    number_ok && suffix_ok
}

fn sidecar_container(
    config: &InjectConfig,
    native: bool,
    listen_port: u16,
    upstream_port: u16,
    resources: ResourceRequirements,
) -> Container {
    let admin_port = config.admin_port;
    let probe = |path: &str, period: i32, failures: i32| Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.to_owned()),
            port: IntOrString::Int(i32::from(admin_port)),
            scheme: Some("HTTP".to_owned()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        timeout_seconds: Some(1),
        failure_threshold: Some(failures),
        ..Default::default()
    };
    let field_env = |name: &str, path: &str| EnvVar {
        name: name.to_owned(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.to_owned(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    let port = |name: &str, number: u16| ContainerPort {
        name: Some(name.to_owned()),
        container_port: i32::from(number),
        protocol: Some("TCP".to_owned()),
        ..Default::default()
    };
    let mut args = vec![
        "--policy".to_owned(),
        format!("{POLICY_MOUNT_PATH}/{POLICY_KEY}"),
        "--listen".to_owned(),
        format!("0.0.0.0:{listen_port}"),
        "--upstream".to_owned(),
        format!("127.0.0.1:{upstream_port}"),
        "--admin".to_owned(),
        format!("0.0.0.0:{admin_port}"),
    ];
    let mut env = vec![
        EnvVar {
            name: "KEYGATE_LOG_FORMAT".to_owned(),
            value: Some("json".to_owned()),
            ..Default::default()
        },
        field_env("KEYGATE_POD_NAME", "metadata.name"),
        field_env("KEYGATE_POD_NAMESPACE", "metadata.namespace"),
    ];
    env.extend(
        config
            .audit
            .changed_env()
            .into_iter()
            .map(|(name, value)| EnvVar {
                name: name.to_owned(),
                value: Some(value),
                ..Default::default()
            }),
    );
    let mut mounts = vec![VolumeMount {
        name: POLICY_VOLUME.to_owned(),
        mount_path: POLICY_MOUNT_PATH.to_owned(),
        read_only: Some(true),
        ..Default::default()
    }];
    if let Some(server) = &config.policy_server {
        args.extend([
            "--policy-server".to_owned(),
            server.clone(),
            "--token-file".to_owned(),
            format!("{TOKEN_MOUNT_PATH}/token"),
            "--ca-file".to_owned(),
            format!("{POLICY_MOUNT_PATH}/{POLICY_CA_KEY}"),
        ]);
        mounts.push(VolumeMount {
            name: TOKEN_VOLUME.to_owned(),
            mount_path: TOKEN_MOUNT_PATH.to_owned(),
            read_only: Some(true),
            ..Default::default()
        });
    }
    Container {
        name: SIDECAR_NAME.to_owned(),
        image: Some(config.image.clone()),
        image_pull_policy: config.image_pull_policy.clone(),
        command: Some(vec![SIDECAR_COMMAND.to_owned()]),
        args: Some(args),
        env: Some(env),
        ports: Some(vec![
            port(LISTEN_PORT_NAME, listen_port),
            port(ADMIN_PORT_NAME, admin_port),
        ]),
        // The app starts after a native sidecar's startup probe passes, so requests never
        // reach a pod whose sidecar is not listening yet.
        startup_probe: Some(probe("/healthz", 1, 60)),
        readiness_probe: Some(probe("/readyz", 5, 3)),
        liveness_probe: Some(probe("/healthz", 10, 3)),
        resources: Some(resources),
        restart_policy: native.then(|| "Always".to_owned()),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(SIDECAR_UID),
            run_as_group: Some(SIDECAR_UID),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            privileged: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".to_owned()]),
                ..Default::default()
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".to_owned(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        termination_message_policy: Some("FallbackToLogsOnError".to_owned()),
        volume_mounts: Some(mounts),
        ..Default::default()
    }
}

/// Resource quantities by name, e.g. `[("cpu", "10m")]`.
fn quantities(pairs: &[(&str, &str)]) -> BTreeMap<String, Quantity> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), Quantity((*v).to_owned())))
        .collect()
}

/// The init container that installs the capture rules ([`crate::capture`]). It runs as root
/// with `NET_ADMIN` only (every other capability dropped), which is what writing netfilter
/// rules in the Pod's own network namespace takes, and exits before the app starts.
fn capture_container(config: &InjectConfig, listen_port: u16, upstream_port: u16) -> Container {
    Container {
        name: CAPTURE_NAME.to_owned(),
        image: Some(config.image.clone()),
        image_pull_policy: config.image_pull_policy.clone(),
        command: Some(vec![SIDECAR_COMMAND.to_owned()]),
        args: Some(vec![
            "capture".to_owned(),
            "--ports".to_owned(),
            upstream_port.to_string(),
            "--to".to_owned(),
            listen_port.to_string(),
        ]),
        env: Some(vec![EnvVar {
            name: "KEYGATE_LOG_FORMAT".to_owned(),
            value: Some("json".to_owned()),
            ..Default::default()
        }]),
        resources: Some(ResourceRequirements {
            requests: Some(quantities(&[("cpu", "10m"), ("memory", "16Mi")])),
            limits: Some(quantities(&[("memory", "64Mi")])),
            ..Default::default()
        }),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(false),
            run_as_user: Some(0),
            run_as_group: Some(0),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            privileged: Some(false),
            capabilities: Some(Capabilities {
                add: Some(vec!["NET_ADMIN".to_owned()]),
                drop: Some(vec!["ALL".to_owned()]),
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".to_owned(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        termination_message_policy: Some("FallbackToLogsOnError".to_owned()),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantities() {
        for ok in ["10m", "1", "0.5", "64Mi", "1Gi", "1e3", "2E-1", "+1k", ".5"] {
            assert!(is_quantity(ok), "{ok}");
        }
        for bad in ["", "m", "-1", "1.2.3", "64mb", "1e", "abc", "1 Mi"] {
            assert!(!is_quantity(bad), "{bad}");
        }
    }

    #[test]
    fn annotation_keys_are_escaped() {
        let op = add(
            &["metadata", "annotations", "keygate.dev/inj~ected"],
            Value::Null,
        );
        let PatchOperation::Add(op) = op else {
            panic!("not an add")
        };
        assert_eq!(
            op.path.as_str(),
            "/metadata/annotations/keygate.dev~1inj~0ected"
        );
    }
}
