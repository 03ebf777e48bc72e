"""Tests of the Helm chart in charts/keygate, offline.

Helm's own Go library (helm-python-sdk) renders, lints and checks values.schema.json;
kubernetes-validate checks every rendered object in strict mode (unknown fields are errors)
against the Kubernetes 1.25 schemas (the chart's kubeVersion floor) and the newest it ships.
Then the security-relevant promises of the chart are asserted on the objects themselves.

Run from the repository root: python -m pytest tests/helm -q
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
from pathlib import Path

import helm_python as helm
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate import utils as kv_utils

import values_doc

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "keygate"
RELEASE = "keygate"
NAMESPACE = "keygate-system"

# Kubernetes versions every rendered object must validate against.
MIN_KUBE = "1.25.0"
LATEST_KUBE = kv_utils.latest_version()

# Kinds kubernetes-validate ships no schema for, and why skipping them is fine.
SKIP_KINDS = {
    ("cert-manager.io/v1", "Issuer"): "cert-manager CRD; not a Kubernetes built-in kind",
    ("cert-manager.io/v1", "Certificate"): "cert-manager CRD; not a Kubernetes built-in kind",
    ("monitoring.coreos.com/v1", "ServiceMonitor"): "Prometheus Operator CRD; not built in",
    ("monitoring.coreos.com/v1", "PodMonitor"): "Prometheus Operator CRD; not built in (test_monitoring.py checks it)",
    ("monitoring.coreos.com/v1", "PrometheusRule"): "Prometheus Operator CRD; not built in (promtool checks its rules)",
}

# The variants the chart must render cleanly; each name is a test id.
VARIANTS: dict[str, dict] = {
    "default": {},
    "cert-manager": {"certManager": {"enabled": True}},
    "cert-manager-existing-issuer": {
        "certManager": {"enabled": True, "issuerRef": {"name": "corp-ca", "kind": "ClusterIssuer"}}
    },
    "service-monitor": {"monitoring": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}}},
    "single-replica": {"replicaCount": 1},
    "watch-namespaces": {"watchNamespaces": ["a", "b"]},
    "watch-namespaces-cert-manager": {"watchNamespaces": ["a", "b"], "certManager": {"enabled": True}},
    "network-policy": {
        "networkPolicy": {
            "enabled": True,
            "tokenFrom": [{"namespaceSelector": {"matchLabels": {"keygate.dev/clients": "true"}}}],
            "metricsFrom": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
            "egress": [{"ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}]}],
        }
    },
    "everything": {
        "replicaCount": 3,
        "image": {"tag": "0.1.0-rc1", "pullSecrets": ["regcred"]},
        "issuerUrl": "https://auth.example.com",
        "watchNamespaces": ["shop"],
        "certManager": {"enabled": True},
        "monitoring": {"serviceMonitor": {"enabled": True}},
        "networkPolicy": {"enabled": True},
        "podAntiAffinity": "hard",
        "sidecar": {"image": {"repository": "registry.example.com/keygate-sidecar"},
                    "resources": {"limits": {"cpu": "200m"}}},
        "webhook": {"namespaceSelector": {"matchLabels": {"team": "shop"}},
                    "validating": {"failurePolicy": "Fail"}},
        "extraArgs": ["--example-flag=value"],
        "extraEnv": [{"name": "RUST_BACKTRACE", "value": "1"}],
        "priorityClassName": "system-cluster-critical",
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "infra", "effect": "NoSchedule"}],
        "nodeSelector": {"kubernetes.io/os": "linux"},
    },
    "webhooks-disabled": {"webhook": {"mutating": {"enabled": False}, "validating": {"enabled": False}}},
    "token-tls-disabled": {"tokenService": {"tls": {"enabled": False}, "port": 80}},
    "token-tls-disabled-cert-manager": {
        "certManager": {"enabled": True},
        "tokenService": {"tls": {"enabled": False}},
        "issuerUrl": "https://auth.example.com",
        "watchNamespaces": ["shop"],
    },
    "token-port-8443": {"tokenService": {"port": 8443}, "watchNamespaces": ["shop"]},
    # Every value issue #18 added, at once: helm lint --strict and the Kubernetes schemas
    # must accept the lot.
    "every-operability-value": {
        "crds": {"enabled": True, "keep": False},
        "commonLabels": {"example.com/team": "platform", "cost-centre": "42"},
        "image": {"digest": "sha256:" + "a" * 64},
        "sidecar": {"image": {"digest": "sha256:" + "b" * 64},
                    "audit": {"allowedSample": 0.01, "refusedPerSecond": 10},
                    "prometheusAnnotations": True,
                    "podMonitor": {"enabled": True, "namespace": "monitoring", "interval": "15s",
                                   "scrapeTimeout": "5s", "labels": {"release": "prom"}}},
        "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1, "maxSurge": "25%"}},
        "leaderElection": {"leaseDuration": "60s", "renewDeadline": "40s", "retryPeriod": "15s"},
        "audit": {"allowedSample": 0.5, "refusedPerSecond": 20},
        "securityContext": {"runAsNonRoot": True, "runAsUser": 65532, "runAsGroup": 65532,
                            "fsGroup": 65532, "seccompProfile": {"type": "RuntimeDefault"},
                            "supplementalGroups": [1000]},
        "containerSecurityContext": {"runAsNonRoot": True, "runAsUser": 65532, "runAsGroup": 65532,
                                     "readOnlyRootFilesystem": True, "allowPrivilegeEscalation": False,
                                     "privileged": False, "capabilities": {"drop": ["ALL"]},
                                     "seccompProfile": {"type": "RuntimeDefault"}},
        "readinessProbe": {"initialDelaySeconds": 1, "periodSeconds": 3, "timeoutSeconds": 1, "failureThreshold": 2},
        "livenessProbe": {"initialDelaySeconds": 0, "periodSeconds": 20, "timeoutSeconds": 3, "failureThreshold": 5},
        "startupProbe": {"enabled": True, "initialDelaySeconds": 1, "periodSeconds": 1, "timeoutSeconds": 1,
                         "failureThreshold": 120},
        "webhook": {"port": 10250},
        "hostNetwork": True,
        "podAntiAffinity": "hard",
        "networkPolicy": {"enabled": True},
        "deploymentAnnotations": {"example.com/owner": "platform"},
        "podAnnotations": {"example.com/scrape": "false"},
        "podLabels": {"example.com/tier": "infra"},
        "volumes": [{"name": "corp-ca", "configMap": {"name": "corp-ca"}}],
        "volumeMounts": [{"name": "corp-ca", "mountPath": "/etc/corp-ca", "readOnly": True}],
        "rbac": {"aggregateClusterRoles": True},
        "monitoring": {"serviceMonitor": {"enabled": True}},
        "prometheusRule": {"enabled": True, "namespace": "monitoring", "labels": {"release": "prom"}},
        "grafana": {"dashboard": {"enabled": True, "namespace": "monitoring",
                                  "labels": {"grafana_dashboard": "1", "team": "platform"},
                                  "annotations": {"grafana_folder": "keygate"}}},
    },
}


def token_tls(values: dict) -> str:
    """How the chart serves the token server for `values`: self, cert-manager or disabled."""
    if values.get("tokenService", {}).get("tls", {}).get("enabled") is False:
        return "disabled"
    return "cert-manager" if values.get("certManager", {}).get("enabled") else "self"


def render(values: dict | None = None) -> list[dict]:
    """Every object the chart renders (NOTES.txt left out)."""
    with helm.Chart.load(CHART) as chart:
        manifests = chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    objects = []
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                doc.setdefault("metadata", {})
                objects.append(doc)
    return objects


@pytest.fixture(scope="module", params=list(VARIANTS), ids=list(VARIANTS))
def variant(request):
    values = VARIANTS[request.param]
    return request.param, values, render(values)


def of_kind(objects, kind):
    return [o for o in objects if o["kind"] == kind]


def one(objects, kind):
    found = of_kind(objects, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def not_hooks(objects):
    """The release's own objects, without the Helm hooks (the startup check's)."""
    return [o for o in objects if "helm.sh/hook" not in (o["metadata"].get("annotations") or {})]


def hooks(objects):
    return [o for o in objects if "helm.sh/hook" in (o["metadata"].get("annotations") or {})]


def deployment_args(objects) -> list[str]:
    return one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]["args"]


def flag(args: list[str], name: str) -> str | None:
    for arg in args:
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
    return None


def rules(objects, kind):
    for obj in of_kind(objects, kind):
        for rule in obj.get("rules") or []:
            yield obj, rule


# ----------------------------------------------------------------------------- rendering


def test_every_variant_renders_and_validates_strictly(variant):
    name, _, objects = variant
    assert objects, name
    skipped = set()
    for obj in objects:
        key = (obj["apiVersion"], obj["kind"])
        if key in SKIP_KINDS:
            skipped.add(key)
            continue
        for version in (MIN_KUBE, LATEST_KUBE):
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                path = ".".join(str(p) for p in e.path)
                pytest.fail(f"{name}: {obj['kind']}/{obj['metadata'].get('name')} invalid on "
                            f"Kubernetes {version} at {path}: {e.message}")
    # Skipped kinds appear only where they should.
    if "cert-manager" in name or name == "everything":
        assert ("cert-manager.io/v1", "Certificate") in skipped
    else:
        assert ("cert-manager.io/v1", "Certificate") not in skipped


def test_validation_covers_the_chart_floor_and_a_current_version():
    assert kv_utils.major_minor(MIN_KUBE) in [kv_utils.major_minor(v) for v in kv_utils.all_versions()]
    assert tuple(int(p) for p in LATEST_KUBE.split(".")[:2]) >= (1, 33)
    with helm.Chart.load(CHART) as chart:
        # CEL validation rules (x-kubernetes-validations) in the CRDs are beta and on by
        # default from Kubernetes 1.25; on 1.24 they are alpha and off.
        assert chart.metadata["kubeVersion"] == ">=1.25.0-0"
        assert kv_utils.major_minor(MIN_KUBE) == "1.25"


def rendered_crds(values: dict | None = None) -> list[dict]:
    return of_kind(render(values), "CustomResourceDefinition")


def test_crds_validate_strictly():
    crds = rendered_crds()
    assert sorted(c["metadata"]["name"] for c in crds) == [
        "apiclients.keygate.dev", "m2mroles.keygate.dev", "scopepolicies.keygate.dev"]
    for crd in crds:
        for version in (MIN_KUBE, LATEST_KUBE):
            kubernetes_validate.validate(crd, version, strict=True)


def test_helm_lint_strict_has_no_errors():
    for name, values in VARIANTS.items():
        report = helm.lint(CHART, values or None, strict=True, namespace=NAMESPACE)
        assert report["errors"] == [], (name, report)
        assert [m for m in report["messages"] if m["severity"] >= 2] == [], (name, report)


def test_crds_are_a_byte_identical_copy_of_the_generated_ones():
    chart_crds = (CHART / "files" / "crds.yaml").read_bytes()
    generated = (REPO / "crds" / "keygate.dev.yaml").read_bytes()
    assert chart_crds == generated, (
        "charts/keygate/files/crds.yaml drifted from crds/keygate.dev.yaml: "
        "cp crds/keygate.dev.yaml charts/keygate/files/crds.yaml")


def test_crds_are_templates_only_so_helm_installs_them_once():
    # A crds/ directory would be installed by Helm as well, without the release's
    # ownership metadata, and the templated CRDs would then fail on objects the release
    # does not own (docs/decisions/0001-crds-as-templates.md).
    assert not (CHART / "crds").exists()
    with helm.Chart.load(CHART) as chart:
        assert chart.crds == []


@pytest.mark.parametrize("crds", [{}, {"keep": True}, {"keep": False}])
def test_rendered_crds_are_the_generated_ones_plus_labels_and_keep(crds):
    generated = [d for d in yaml.safe_load_all((REPO / "crds" / "keygate.dev.yaml").read_text()) if d]
    rendered = rendered_crds({"crds": crds})
    assert len(rendered) == len(generated) == 3
    keep = crds.get("keep", True)
    for got, want in zip(rendered, generated):
        metadata = dict(got["metadata"])
        labels = metadata.pop("labels")
        annotations = metadata.pop("annotations", {})
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["app.kubernetes.io/instance"] == RELEASE
        assert labels["app.kubernetes.io/component"] == "crds"
        assert annotations == ({"helm.sh/resource-policy": "keep"} if keep else {})
        assert {**got, "metadata": metadata} == want, f"{want['metadata']['name']} differs from crds/"


def test_crds_disabled_renders_none():
    assert rendered_crds({"crds": {"enabled": False}}) == []
    text = notes({"crds": {"enabled": False}})
    assert "kubectl apply --server-side -f crds/keygate.dev.yaml" in text


# ------------------------------------------------------------------------------- values


@pytest.mark.parametrize("bad, where", [
    ({"replicaCount": "two"}, "/replicaCount"),
    ({"replicaCont": 2}, "replicaCont"),
    ({"image": {"tga": "latest"}}, "tga"),
    ({"webhook": {"validating": {"failurePolicy": "Maybe"}}}, "failurePolicy"),
    ({"token": {"maxLifetime": "one day"}}, "maxLifetime"),
    # The operator refuses zero durations at start (--default-token-lifetime and friends).
    ({"token": {"defaultLifetime": "0s"}}, "defaultLifetime"),
    ({"token": {"maxLifetime": "0h0m"}}, "maxLifetime"),
    ({"signingKeys": {"rotation": "0"}}, "rotation"),
    ({"startupCheck": {"timeoutSeconds": "3m"}}, "timeoutSeconds"),
    ({"startupCheck": {"enabeld": False}}, "enabeld"),
    ({"watchNamespaces": "shop"}, "watchNamespaces"),
    ({"monitoring": {"serviceMonitor": {"enabeld": True}}}, "enabeld"),
])
def test_schema_rejects_wrong_types_and_unknown_keys(bad, where):
    with helm.Chart.load(CHART) as chart:
        with pytest.raises(helm.HelmValuesError) as err:
            chart.validate_schema(bad)
        assert where in str(err.value)
        # and an install would refuse them too
        with pytest.raises(helm.HelmValuesError):
            chart.render(bad, name=RELEASE, namespace=NAMESPACE)


def test_schema_accepts_the_defaults_and_every_variant():
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema({})
        for values in VARIANTS.values():
            chart.validate_schema(values)


def _schema_objects(schema, path="$"):
    if isinstance(schema, dict):
        if schema.get("type") == "object" and "properties" in schema:
            yield path, schema
        for key, sub in schema.items():
            yield from _schema_objects(sub, f"{path}.{key}")
    elif isinstance(schema, list):
        for i, sub in enumerate(schema):
            yield from _schema_objects(sub, f"{path}[{i}]")


def test_schema_is_closed_at_every_level_and_matches_values_yaml():
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    for path, obj in _schema_objects(schema):
        assert obj.get("additionalProperties") is False, f"{path} accepts unknown keys"
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())

    def same_keys(values, node, path):
        declared = set(node["properties"]) - {"global"}
        assert set(values) <= declared, f"{path}: values.yaml {sorted(values)} vs schema {sorted(declared)}"
        # The schema declares no value that values.yaml leaves undocumented (optional
        # Kubernetes fields such as resources.requests.ephemeral-storage aside).
        if not path.startswith(("$.resources", "$.startupCheck.resources")):
            assert set(values) == declared, f"{path}: values.yaml {sorted(values)} vs schema {sorted(declared)}"
        for key, value in values.items():
            sub = node["properties"][key]
            if isinstance(value, dict) and value and "properties" in sub:
                same_keys(value, sub, f"{path}.{key}")

    same_keys(defaults, schema, "$")


def test_every_value_is_documented_in_values_yaml_and_the_readme():
    assert values_doc.undocumented() == []
    readme = (CHART / "README.md").read_text()
    for key in values_doc.documented():
        assert f"| `{key}` |" in readme, f"README values table lacks {key}: python tests/helm/values_doc.py"
    assert values_doc.table() in readme, "README values table is stale: python tests/helm/values_doc.py"


# --------------------------------------------------------------------------------- RBAC


def test_rbac_has_no_wildcards(variant):
    name, _, objects = variant
    for kind in ("ClusterRole", "Role"):
        for obj, rule in rules(objects, kind):
            for field in ("verbs", "resources", "apiGroups", "resourceNames", "nonResourceURLs"):
                for item in rule.get(field) or []:
                    assert "*" not in item, f"{name}: {kind}/{obj['metadata']['name']} {field} {item}"


def test_leases_only_through_a_role_in_the_release_namespace(variant):
    name, values, objects = variant
    for _, rule in rules(objects, "ClusterRole"):
        assert "coordination.k8s.io" not in rule["apiGroups"], name
        assert "leases" not in rule["resources"], name
    lease_rules = [(o, r) for o, r in rules(objects, "Role") if "leases" in r["resources"]]
    assert lease_rules, name
    lease = values.get("leaderElection", {}).get("leaseName", "keygate-operator")
    for obj, rule in lease_rules:
        assert obj["metadata"]["namespace"] == NAMESPACE
        assert rule["apiGroups"] == ["coordination.k8s.io"]
        assert set(rule["verbs"]) <= {"get", "create", "update", "patch"}
        if set(rule["verbs"]) != {"create"}:  # RBAC cannot restrict create by name
            assert rule.get("resourceNames") == [lease]
    verbs = {v for _, r in lease_rules for v in r["verbs"]}
    assert verbs == {"get", "create", "update", "patch"}
    # the Role is bound to the operator's ServiceAccount
    binding = next(b for b in of_kind(objects, "RoleBinding")
                   if b["roleRef"]["name"] == lease_rules[0][0]["metadata"]["name"]
                   and b["metadata"]["namespace"] == NAMESPACE)
    sa = one(not_hooks(objects), "ServiceAccount")["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa, "namespace": NAMESPACE}]


def test_webhook_configurations_are_writable_only_by_name(variant):
    name, values, objects = variant
    configs = {o["metadata"]["name"] for o in objects
               if o["kind"] in ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration")}
    writes = {"create", "update", "patch", "delete", "deletecollection"}
    patchable = set()
    for kind in ("ClusterRole", "Role"):
        for _, rule in rules(objects, kind):
            if "admissionregistration.k8s.io" not in rule["apiGroups"]:
                continue
            if writes & set(rule["verbs"]):
                assert set(rule["verbs"]) <= {"patch", "update"}, (name, rule)
                assert rule.get("resourceNames"), (name, rule)
                assert set(rule["resourceNames"]) <= configs, (name, rule, configs)
                patchable |= set(rule["resourceNames"])
    args = deployment_args(objects)
    if values.get("certManager", {}).get("enabled"):
        assert patchable == set(), f"{name}: cert-manager injects the caBundle, keygate needs no write"
        assert flag(args, "webhook-tls") == "cert-manager"
    else:
        assert patchable == configs, name
        assert flag(args, "webhook-tls") == "self"
    # the names the operator is told are the names rendered
    told = {flag(args, "mutating-webhook-name"), flag(args, "validating-webhook-name")} - {None}
    assert told == configs, name


def test_secrets_and_configmaps_cluster_wide_only_without_watch_namespaces(variant):
    name, values, objects = variant
    watched = values.get("watchNamespaces") or []
    cluster = [r for o in operator_cluster_roles(objects) for r in o["rules"]]
    cluster_resources = {res for r in cluster for res in r["resources"]}
    namespaced = {"secrets", "configmaps", "apiclients", "scopepolicies", "m2mroles"}
    if not watched:
        assert namespaced <= cluster_resources, name
        assert flag(deployment_args(objects), "watch-namespaces") is None
        return
    assert not namespaced & cluster_resources, f"{name}: cluster-wide grants despite watchNamespaces"
    assert cluster_resources <= {"namespaces", "mutatingwebhookconfigurations", "validatingwebhookconfigurations",
                                 "tokenreviews"}
    assert flag(deployment_args(objects), "watch-namespaces") == ",".join(watched)
    for ns in watched:
        roles = [o for o in of_kind(not_hooks(objects), "Role") if o["metadata"]["namespace"] == ns]
        assert len(roles) == 1, (name, ns)
        granted = {res for r in roles[0]["rules"] for res in r["resources"]}
        assert {"secrets", "configmaps", "apiclients", "apiclients/status", "events"} <= granted
        bindings = [b for b in of_kind(not_hooks(objects), "RoleBinding") if b["metadata"]["namespace"] == ns]
        assert [b["roleRef"]["name"] for b in bindings] == [roles[0]["metadata"]["name"]]
        assert bindings[0]["subjects"][0]["namespace"] == NAMESPACE
    # in its own namespace, writes to existing Secrets/ConfigMaps name the operator's objects
    own = next(o for o in of_kind(objects, "Role") if o["metadata"]["name"].endswith("-operator"))
    for rule in own["rules"]:
        if rule["resources"][0] in ("secrets", "configmaps") and {"patch", "update", "delete"} & set(rule["verbs"]):
            assert rule["resourceNames"], rule


def operator_cluster_roles(objects):
    return [o for o in of_kind(objects, "ClusterRole")
            if not any(k.startswith("rbac.authorization.k8s.io/aggregate-to-") for k in o["metadata"]["labels"])]


def test_aggregated_cluster_roles_let_namespace_users_read_or_edit_keygate_objects():
    objects = render()
    roles = {o["metadata"]["name"]: o for o in of_kind(objects, "ClusterRole")}
    view, edit = roles["keygate-view"], roles["keygate-edit"]
    resources = ["apiclients", "m2mroles", "scopepolicies"]
    assert view["rules"] == [{"apiGroups": ["keygate.dev"], "resources": resources,
                              "verbs": ["get", "list", "watch"]}]
    assert edit["rules"] == [{"apiGroups": ["keygate.dev"], "resources": resources,
                              "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"]}]
    aggregate = "rbac.authorization.k8s.io/aggregate-to-"
    assert {k for k, v in view["metadata"]["labels"].items() if k.startswith(aggregate) and v == "true"} == {
        aggregate + "view"}
    assert {k for k, v in edit["metadata"]["labels"].items() if k.startswith(aggregate) and v == "true"} == {
        aggregate + "edit", aggregate + "admin"}
    # Nobody is bound to them: the built-in roles pick their rules up.
    bound = {b["roleRef"]["name"] for b in of_kind(objects, "ClusterRoleBinding") + of_kind(objects, "RoleBinding")}
    assert not bound & {"keygate-view", "keygate-edit"}
    for values in ({"rbac": {"aggregateClusterRoles": False}},
                   {"rbac": {"aggregateClusterRoles": False, "create": False}, "serviceAccount": {"name": "x"}}):
        names = {o["metadata"]["name"] for o in of_kind(render(values), "ClusterRole")}
        assert not names & {"keygate-view", "keygate-edit"}, values
    # ... and they stay when the operator's own RBAC is managed elsewhere.
    names = {o["metadata"]["name"] for o in of_kind(render({"rbac": {"create": False},
                                                             "serviceAccount": {"name": "x"}}), "ClusterRole")}
    assert names == {"keygate-view", "keygate-edit"}


def test_rbac_grants_exactly_the_documented_verbs():
    objects = render()
    [cluster] = operator_cluster_roles(objects)
    grants = {}
    for rule in cluster["rules"]:
        for group in rule["apiGroups"]:
            for res in rule["resources"]:
                grants.setdefault((group, res), set()).update(rule["verbs"])
    rw = {"get", "list", "watch", "create", "patch", "update", "delete"}
    assert grants == {
        ("", "namespaces"): {"get", "list", "watch"},
        ("admissionregistration.k8s.io", "mutatingwebhookconfigurations"): {"get", "list", "watch", "patch", "update"},
        ("admissionregistration.k8s.io", "validatingwebhookconfigurations"): {"get", "list", "watch", "patch", "update"},
        ("keygate.dev", "m2mroles"): {"get", "list", "watch"},
        ("keygate.dev", "apiclients"): {"get", "list", "watch"},
        ("keygate.dev", "scopepolicies"): {"get", "list", "watch"},
        ("keygate.dev", "m2mroles/status"): {"get", "patch", "update"},
        ("keygate.dev", "apiclients/status"): {"get", "patch", "update"},
        ("keygate.dev", "scopepolicies/status"): {"get", "patch", "update"},
        ("keygate.dev", "apiclients/finalizers"): {"update"},
        ("keygate.dev", "scopepolicies/finalizers"): {"update"},
        ("", "secrets"): rw,
        ("", "configmaps"): rw,
        ("events.k8s.io", "events"): {"create", "patch"},
        ("networking.k8s.io", "networkpolicies"): {"get", "create", "patch", "update", "delete"},
        ("authentication.k8s.io", "tokenreviews"): {"create"},
    }


# ----------------------------------------------------------------------------- webhooks


def test_mutating_webhook_fails_closed_for_opted_in_pods_only(variant):
    name, values, objects = variant
    if values.get("webhook", {}).get("mutating", {}).get("enabled") is False:
        assert not of_kind(objects, "MutatingWebhookConfiguration")
        return
    config = one(objects, "MutatingWebhookConfiguration")
    [hook] = config["webhooks"]
    assert hook["objectSelector"] == {"matchLabels": {"keygate.dev/inject": "true"}}
    assert hook["failurePolicy"] == "Fail"
    assert hook["sideEffects"] == "None"
    assert hook["timeoutSeconds"] == 5
    assert hook["admissionReviewVersions"] == ["v1"]
    assert hook["reinvocationPolicy"] == "IfNeeded"
    assert hook["rules"] == [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["CREATE"],
                              "resources": ["pods"], "scope": "Namespaced"}]
    service = hook["clientConfig"]["service"]
    assert service["path"] == "/mutate-pods"
    assert "caBundle" not in hook["clientConfig"], "the chart must not own caBundle"
    webhook_svc = next(s for s in of_kind(objects, "Service") if s["metadata"]["name"] == service["name"])
    assert service["namespace"] == NAMESPACE == webhook_svc["metadata"]["namespace"]
    assert webhook_svc["spec"]["ports"][0]["port"] == service["port"] == 443
    assert webhook_svc["spec"]["ports"][0]["targetPort"] == "webhook"
    assert flag(deployment_args(objects), "webhook-service") == service["name"]
    # Every namespace (the user's own selector aside), whatever watchNamespaces says: the
    # operator refuses an opted-in Pod in a namespace it does not watch, where a narrower
    # selector would let that Pod start without the sidecar.
    user_selector = values.get("webhook", {}).get("namespaceSelector") or {}
    assert hook.get("namespaceSelector", {}) == user_selector, name
    for expression in hook.get("namespaceSelector", {}).get("matchExpressions", []):
        assert expression["key"] != "kubernetes.io/metadata.name", (name, expression)


def test_mutating_webhook_does_not_narrow_to_watch_namespaces():
    for values in ({"watchNamespaces": ["a", "b"]},
                   {"watchNamespaces": ["shop"], "webhook": {"namespaceSelector": {
                       "matchExpressions": [{"key": "tier", "operator": "In", "values": ["apps"]}]}}}):
        objects = render(values)
        [hook] = one(objects, "MutatingWebhookConfiguration")["webhooks"]
        assert hook.get("namespaceSelector", {}) == values.get("webhook", {}).get("namespaceSelector", {})
        assert "kubernetes.io/metadata.name" not in json.dumps(hook)
        # the operator is told which namespaces it serves, and so refuses labelled Pods elsewhere
        assert flag(deployment_args(objects), "watch-namespaces") == ",".join(values["watchNamespaces"])


def test_failure_policy_comments_explain_the_choice():
    text = (CHART / "templates" / "webhooks.yaml").read_text()
    before_fail = text.split("failurePolicy: Fail")[0].rsplit("reinvocation", 1)[0]
    assert "Fail closed" in before_fail
    assert "Ignore by default" in text


def test_validating_webhook(variant):
    name, values, objects = variant
    if values.get("webhook", {}).get("validating", {}).get("enabled") is False:
        assert not of_kind(objects, "ValidatingWebhookConfiguration")
        return
    [hook] = one(objects, "ValidatingWebhookConfiguration")["webhooks"]
    assert hook["clientConfig"]["service"]["path"] == "/validate"
    assert hook["rules"] == [{"apiGroups": ["keygate.dev"], "apiVersions": ["v1alpha1"],
                              "operations": ["CREATE", "UPDATE"],
                              "resources": ["scopepolicies", "apiclients", "m2mroles"],
                              "scope": "Namespaced"}]
    expected = values.get("webhook", {}).get("validating", {}).get("failurePolicy", "Ignore")
    assert hook["failurePolicy"] == expected
    # Only the watched namespaces (when set), on top of the user's selector: keygate objects
    # elsewhere are not this operator's to act on.
    selector = hook.get("namespaceSelector", {})
    user_selector = values.get("webhook", {}).get("namespaceSelector") or {}
    assert selector.get("matchLabels") == user_selector.get("matchLabels"), name
    watched = values.get("watchNamespaces")
    narrowing = [e for e in selector.get("matchExpressions", []) if e["key"] == "kubernetes.io/metadata.name"]
    if watched:
        assert narrowing == [{"key": "kubernetes.io/metadata.name", "operator": "In", "values": watched}], name
    else:
        assert narrowing == [], name
    assert hook["sideEffects"] == "None"
    assert hook["admissionReviewVersions"] == ["v1"]
    assert "caBundle" not in hook["clientConfig"]


def test_cert_manager_wiring(variant):
    name, values, objects = variant
    cm = values.get("certManager", {})
    configs = [o for o in objects
               if o["kind"] in ("MutatingWebhookConfiguration", "ValidatingWebhookConfiguration")]
    deployment = one(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    args = deployment_args(objects)
    if not cm.get("enabled"):
        assert not of_kind(objects, "Certificate") and not of_kind(objects, "Issuer")
        for c in configs:
            assert "cert-manager.io/inject-ca-from" not in (c["metadata"].get("annotations") or {})
        assert flag(args, "webhook-cert-dir") is None
        assert flag(args, "token-cert-dir") is None
        return
    certs = {c["metadata"]["name"]: c for c in of_kind(objects, "Certificate")}
    cert = certs["keygate-webhook"]
    for c in configs:
        assert c["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == \
            f"{NAMESPACE}/{cert['metadata']['name']}"
    svc = flag(args, "webhook-service")
    assert f"{svc}.{NAMESPACE}.svc" in cert["spec"]["dnsNames"]
    serving = [c for c in certs.values() if not c["spec"].get("isCA")]
    if cm.get("issuerRef", {}).get("name"):
        assert not of_kind(objects, "Issuer")
        assert [c for c in certs.values() if c["spec"].get("isCA")] == []
        for c in serving:
            assert c["spec"]["issuerRef"]["name"] == cm["issuerRef"]["name"]
            assert c["spec"]["issuerRef"]["kind"] == cm["issuerRef"].get("kind", "Issuer")
    else:
        # A self-signed Issuer signs only the chart's CA; a CA Issuer on it signs the
        # serving certificates, so their ca.crt (the caBundle, keygate-ca) survives renewals.
        issuers = {i["metadata"]["name"]: i for i in of_kind(objects, "Issuer")}
        [self_signed] = [i for i in issuers.values() if i["spec"] == {"selfSigned": {}}]
        [ca_cert] = [c for c in certs.values() if c["spec"].get("isCA")]
        assert ca_cert["spec"]["issuerRef"]["name"] == self_signed["metadata"]["name"]
        assert ca_cert["spec"]["privateKey"]["rotationPolicy"] == "Never"
        [ca_issuer] = [i for i in issuers.values() if "ca" in i["spec"]]
        assert ca_issuer["spec"]["ca"]["secretName"] == ca_cert["spec"]["secretName"]
        assert len(issuers) == 2
        for c in serving:
            assert c["spec"]["issuerRef"] == {"name": ca_issuer["metadata"]["name"], "kind": "Issuer",
                                              "group": "cert-manager.io"}
    mounts = {m["mountPath"]: m for m in pod["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}

    def mounted(directory, certificate):
        mount = mounts[directory]
        assert mount["readOnly"] is True
        assert volumes[mount["name"]]["secret"]["secretName"] == certificate["spec"]["secretName"]

    cert_dir = flag(args, "webhook-cert-dir")
    assert cert_dir == "/var/run/keygate/tls"
    mounted(cert_dir, cert)
    if token_tls(values) == "disabled":
        assert sorted(c["metadata"]["name"] for c in serving) == ["keygate-webhook"]
        assert flag(args, "token-cert-dir") is None
        return
    token_cert = certs["keygate-token"]
    assert sorted(c["metadata"]["name"] for c in serving) == ["keygate-token", "keygate-webhook"]
    token_dir = flag(args, "token-cert-dir")
    assert token_dir == "/var/run/keygate/token-tls"
    mounted(token_dir, token_cert)
    assert token_cert["spec"]["secretName"] != cert["spec"]["secretName"]
    assert token_cert["spec"]["usages"] == ["server auth", "digital signature"]


def test_token_server_serves_https_unless_disabled(variant):
    # Client secrets travel to the token endpoint: TLS by default (RFC 6749 sections 2.3.1
    # and 3.2), plain HTTP only as an explicit choice.
    name, values, objects = variant
    mode = token_tls(values)
    args = deployment_args(objects)
    assert flag(args, "token-tls") == mode, name
    token_svc = next(s for s in of_kind(objects, "Service") if s["spec"]["ports"][0]["targetPort"] == "token")
    port, *policy = token_svc["spec"]["ports"]
    assert port["name"] == ("http" if mode == "disabled" else "https"), name
    # With TLS the same Service (so the same certificate names) carries the policy stream.
    expected_policy = [] if mode == "disabled" else [
        {"name": "policy", "port": 8443, "targetPort": "policy", "protocol": "TCP"}]
    assert policy == expected_policy, name
    issuer = flag(args, "issuer")
    assert issuer.startswith("http://" if mode == "disabled" and not values.get("issuerUrl") else "https://"), name
    assert flag(args, "token-service") == (token_svc["metadata"]["name"] if mode == "self" else None), name
    # The operator keeps keygate-token-tls (self) and publishes keygate-ca (whenever TLS is
    # on); with watchNamespaces its Role names them.
    if values.get("watchNamespaces"):
        own = next(o for o in of_kind(objects, "Role") if o["metadata"]["name"].endswith("-operator"))
        named = {(res, n) for r in own["rules"] for res in r["resources"] for n in r.get("resourceNames", [])
                 if {"patch", "update"} <= set(r["verbs"])}
        assert (("secrets", "keygate-token-tls") in named) == (mode == "self"), name
        assert (("configmaps", "keygate-ca") in named) == (mode != "disabled"), name


def test_the_default_issuer_is_https_on_443():
    args = deployment_args(render())
    assert flag(args, "issuer") == f"https://keygate.{NAMESPACE}.svc"
    assert flag(args, "token-tls") == "self"
    assert one(render(), "Deployment")["spec"]["template"]["spec"]["containers"][0]["readinessProbe"][
        "httpGet"]["port"] == "admin", "no probe talks plain HTTP to the token port"


def test_an_http_issuer_with_tls_on_fails_the_render():
    message = render_error({"issuerUrl": "http://auth.example.com"})
    assert "issuerUrl" in message and "tokenService.tls.enabled" in message, message
    # An explicit choice: TLS done in front of the Service.
    args = deployment_args(render({"issuerUrl": "http://keygate.internal",
                                   "tokenService": {"tls": {"enabled": False}}}))
    assert flag(args, "issuer") == "http://keygate.internal"
    assert flag(args, "token-tls") == "disabled"


@pytest.mark.parametrize("issuer, dns, ips", [
    ("", [], []),
    ("https://keygate.keygate-system.svc", [], []),
    ("https://Auth.Example.com:8443/tenant", ["auth.example.com"], []),
    ("https://10.1.2.3", [], ["10.1.2.3"]),
])
def test_the_token_certificate_names_the_service_and_the_issuer_host(issuer, dns, ips):
    values = {"certManager": {"enabled": True}}
    if issuer:
        values["issuerUrl"] = issuer
    cert = next(c for c in of_kind(render(values), "Certificate") if c["metadata"]["name"] == "keygate-token")
    service = ["keygate", f"keygate.{NAMESPACE}", f"keygate.{NAMESPACE}.svc",
               f"keygate.{NAMESPACE}.svc.cluster.local"]
    assert cert["spec"]["dnsNames"] == service + dns
    assert cert["spec"].get("ipAddresses", []) == ips


# --------------------------------------------------------------------------- workload


def test_deployment_is_hardened(variant):
    name, values, objects = variant
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is True
    psc = pod["securityContext"]
    assert psc["runAsNonRoot"] is True and psc["runAsUser"] == 65532
    assert psc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert "hostPID" not in pod
    assert pod.get("hostNetwork", False) is values.get("hostNetwork", False), "hostNetwork only when asked for"
    for c in pod["containers"] + pod.get("initContainers", []):
        sc = c["securityContext"]
        assert sc["runAsNonRoot"] is True
        assert sc["runAsUser"] == 65532
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]}
        assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
        assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
    sa = one(not_hooks(objects), "ServiceAccount")
    assert sa["automountServiceAccountToken"] is False
    assert pod["serviceAccountName"] == sa["metadata"]["name"]


def expected_images(values: dict) -> tuple[str, str]:
    """The operator's and the sidecar's image for `values`: a digest wins over a tag, and the
    sidecar is the operator's image unless sidecar.image names another."""
    image = values.get("image", {})
    side = values.get("sidecar", {}).get("image", {})
    repo = image.get("repository", "ghcr.io/keygate/keygate")
    tag = image.get("tag") or "0.1.0"
    operator = f"{repo}@{image['digest']}" if image.get("digest") else f"{repo}:{tag}"
    side_repo = side.get("repository") or repo
    if side.get("digest"):
        sidecar = f"{side_repo}@{side['digest']}"
    elif not side.get("tag") and side_repo == repo and image.get("digest"):
        sidecar = f"{side_repo}@{image['digest']}"
    else:
        sidecar = f"{side_repo}:{side.get('tag') or tag}"
    return operator, sidecar


DIGEST_A = "sha256:" + "a" * 64
DIGEST_B = "sha256:" + "b" * 64


@pytest.mark.parametrize("values, operator, sidecar", [
    ({}, "ghcr.io/keygate/keygate:0.1.0", "ghcr.io/keygate/keygate:0.1.0"),
    ({"image": {"tag": "1.2"}}, "ghcr.io/keygate/keygate:1.2", "ghcr.io/keygate/keygate:1.2"),
    # the digest wins over the tag, for the sidecar too (same image)
    ({"image": {"tag": "1.2", "digest": DIGEST_A}},
     f"ghcr.io/keygate/keygate@{DIGEST_A}", f"ghcr.io/keygate/keygate@{DIGEST_A}"),
    ({"image": {"digest": DIGEST_A}, "sidecar": {"image": {"digest": DIGEST_B}}},
     f"ghcr.io/keygate/keygate@{DIGEST_A}", f"ghcr.io/keygate/keygate@{DIGEST_B}"),
    ({"image": {"digest": DIGEST_A}, "sidecar": {"image": {"tag": "side"}}},
     f"ghcr.io/keygate/keygate@{DIGEST_A}", "ghcr.io/keygate/keygate:side"),
    # another repository does not inherit the operator's digest
    ({"image": {"tag": "1.2", "digest": DIGEST_A}, "sidecar": {"image": {"repository": "r.example/side"}}},
     f"ghcr.io/keygate/keygate@{DIGEST_A}", "r.example/side:1.2"),
    ({"sidecar": {"image": {"repository": "r.example/side", "digest": DIGEST_B}}},
     "ghcr.io/keygate/keygate:0.1.0", f"r.example/side@{DIGEST_B}"),
])
def test_image_digests_win_over_tags(values, operator, sidecar):
    objects = render(values)
    container = one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == operator
    assert flag(deployment_args(objects), "sidecar-image") == sidecar
    assert expected_images(values) == (operator, sidecar)


@pytest.mark.parametrize("bad, where", [
    ({"image": {"digest": "latest"}}, "digest"),
    ({"image": {"digest": "sha256:abc"}}, "digest"),
    ({"commonLabels": {"app.kubernetes.io/name": "x"}}, "app.kubernetes.io/name"),
    ({"commonLabels": {"team": 1}}, "team"),
    ({"webhook": {"port": 443}}, "port"),
    ({"strategy": {"type": "Blue"}}, "type"),
    ({"livenessProbe": {"httpGet": {"path": "/"}}}, "httpGet"),
    ({"startupProbe": {"enabeld": True}}, "enabeld"),
    ({"volumeMounts": [{"name": "x"}]}, "mountPath"),
    ({"leaderElection": {"leaseDuration": "1500ms"}}, "leaseDuration"),
    ({"leaderElection": {"renewDeadline": "0s"}}, "renewDeadline"),
    ({"leaderElection": {"retryPeriod": "soon"}}, "retryPeriod"),
    ({"audit": {"allowedSample": 2}}, "allowedSample"),
    ({"audit": {"refusedPerSecond": 0}}, "refusedPerSecond"),
    ({"sidecar": {"audit": {"allowedSample": -0.1}}}, "allowedSample"),
    ({"sidecar": {"prometheusAnnotations": "yes"}}, "prometheusAnnotations"),
])
def test_schema_rejects_bad_operability_values(bad, where):
    with helm.Chart.load(CHART) as chart:
        with pytest.raises(helm.HelmValuesError) as err:
            chart.validate_schema(bad)
        assert where in str(err.value), str(err.value)


@pytest.mark.parametrize("values, expected", [
    ({}, {"lease-duration": "15s", "lease-renew-deadline": "10s", "lease-retry-period": "2s",
          "audit-allowed-sample": "1", "audit-refused-per-second": "100",
          "sidecar-audit-allowed-sample": "1", "sidecar-audit-refused-per-second": "100",
          "sidecar-prometheus-annotations": "false"}),
    # Numbers as the operator parses them: no exponent, no float formatting of integers.
    ({"leaderElection": {"leaseDuration": "1m", "renewDeadline": "40s", "retryPeriod": "15s"},
      "audit": {"allowedSample": 0.25, "refusedPerSecond": 1000000},
      "sidecar": {"audit": {"allowedSample": 0.001, "refusedPerSecond": 5}, "prometheusAnnotations": True}},
     {"lease-duration": "1m", "lease-renew-deadline": "40s", "lease-retry-period": "15s",
      "audit-allowed-sample": "0.25", "audit-refused-per-second": "1000000",
      "sidecar-audit-allowed-sample": "0.001", "sidecar-audit-refused-per-second": "5",
      "sidecar-prometheus-annotations": "true"}),
])
def test_leader_election_audit_and_annotation_values_reach_the_flags(values, expected):
    args = deployment_args(render(values))
    assert {name: flag(args, name) for name in expected} == expected


def keygate_bin() -> str:
    path = os.environ.get("KEYGATE_BIN") or str(REPO / "target" / "debug" / "keygate")
    assert os.access(path, os.X_OK), f"{path}: build keygate first (cargo build), or set KEYGATE_BIN"
    return path


def test_the_operator_parses_every_flag_the_chart_renders(variant):
    # `keygate operator ARGS --help` prints the help only when every argument before it
    # parsed: an unknown flag or a value it refuses fails first.
    name, values, objects = variant
    args = [a for a in deployment_args(objects)[1:] if a not in values.get("extraArgs", [])]
    result = subprocess.run([keygate_bin(), "operator", *args, "--help"],
                            capture_output=True, text=True, env={"PATH": os.environ["PATH"]})
    assert result.returncode == 0, f"{name}: {args}\n{result.stderr}"
    for job in of_kind(objects, "Job"):
        container = job["spec"]["template"]["spec"]["containers"][0]
        result = subprocess.run([keygate_bin(), *container["args"], "--help"],
                                capture_output=True, text=True, env={"PATH": os.environ["PATH"]})
        assert result.returncode == 0, f"{name}: {container['args']}\n{result.stderr}"


def test_defaults_keep_the_hardcoded_workload_settings():
    # The values that replaced hard-coded settings default to exactly what was hard-coded.
    deployment = one(render(), "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert deployment["spec"]["strategy"] == {
        "type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 0, "maxSurge": 1}}
    assert "annotations" not in deployment["metadata"]
    assert pod["securityContext"] == {"runAsNonRoot": True, "runAsUser": 65532, "runAsGroup": 65532,
                                      "fsGroup": 65532, "seccompProfile": {"type": "RuntimeDefault"}}
    assert container["securityContext"] == {
        "runAsNonRoot": True, "runAsUser": 65532, "runAsGroup": 65532, "readOnlyRootFilesystem": True,
        "allowPrivilegeEscalation": False, "privileged": False, "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"}}
    assert container["readinessProbe"] == {"httpGet": {"path": "/readyz", "port": "admin"},
                                           "initialDelaySeconds": 0, "periodSeconds": 5,
                                           "timeoutSeconds": 2, "failureThreshold": 3}
    assert container["livenessProbe"] == {"httpGet": {"path": "/healthz", "port": "admin"},
                                          "initialDelaySeconds": 5, "periodSeconds": 10,
                                          "timeoutSeconds": 2, "failureThreshold": 3}
    assert "startupProbe" not in container
    assert "hostNetwork" not in pod and "dnsPolicy" not in pod
    assert [v["name"] for v in pod["volumes"]] == ["tmp"]
    assert [m["name"] for m in container["volumeMounts"]] == ["tmp"]
    assert {p["name"]: p["containerPort"] for p in container["ports"]}["webhook"] == 9443


def test_operability_values_reach_the_workload():
    values = VARIANTS["every-operability-value"]
    objects = render(values)
    deployment = one(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    [container] = pod["containers"]
    assert deployment["spec"]["strategy"] == values["strategy"]
    assert deployment["metadata"]["annotations"] == values["deploymentAnnotations"]
    assert pod["securityContext"] == values["securityContext"]
    assert container["securityContext"] == values["containerSecurityContext"]
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz"), ("startupProbe", "/healthz")):
        expected = {k: v for k, v in values[probe].items() if k != "enabled"}
        assert container[probe] == {"httpGet": {"path": path, "port": "admin"}, **expected}, probe
    assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert pod["volumes"][-1] == values["volumes"][0]
    assert container["volumeMounts"][-1] == values["volumeMounts"][0]
    template_meta = deployment["spec"]["template"]["metadata"]
    assert template_meta["annotations"] == values["podAnnotations"]
    assert template_meta["labels"].items() >= {**values["commonLabels"], **values["podLabels"]}.items()
    # The webhook's port: the flag, the container port, the Service (by port name) and the
    # NetworkPolicy (by port name) agree.
    assert flag(container["args"], "webhook-listen") == "0.0.0.0:10250"
    assert {p["name"]: p["containerPort"] for p in container["ports"]}["webhook"] == 10250
    svc = next(s for s in of_kind(objects, "Service") if s["metadata"]["name"] == "keygate-webhook")
    assert svc["spec"]["ports"][0]["targetPort"] == "webhook"
    policy = one(objects, "NetworkPolicy")
    assert {"port": "webhook", "protocol": "TCP"} in [p for r in policy["spec"]["ingress"] for p in r["ports"]]
    # Every object carries the common labels.
    for obj in objects:
        labels = obj["metadata"].get("labels") or {}
        assert labels.items() >= values["commonLabels"].items(), (obj["kind"], obj["metadata"]["name"])


def test_recreate_strategy_has_no_rolling_update():
    strategy = one(render({"strategy": {"type": "Recreate"}}), "Deployment")["spec"]["strategy"]
    assert strategy == {"type": "Recreate"}


def test_deployment_runs_the_operator_with_the_contract_flags(variant):
    name, values, objects = variant
    deployment = one(objects, "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    args = container["args"]
    assert args[0] == "operator"
    for required in ("issuer", "token-listen", "token-tls", "webhook-listen", "admin", "lease-name",
                     "webhook-tls",
                     "webhook-service", "sidecar-image", "default-token-lifetime",
                     "max-token-lifetime", "signing-key-rotation", "log-format", "log"):
        assert flag(args, required) is not None, f"{name}: --{required} missing"
    assert flag(args, "token-listen") == "0.0.0.0:8080"
    webhook_port = values.get("webhook", {}).get("port", 9443)
    assert flag(args, "webhook-listen") == f"0.0.0.0:{webhook_port}"
    assert flag(args, "admin") == "0.0.0.0:8081"
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert flag(args, "namespace") is None  # from POD_NAMESPACE
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    expected = {"token": 8080, "webhook": webhook_port, "admin": 8081}
    if token_tls(values) != "disabled":
        # The policy stream sidecars follow: HTTPS only, so only with token TLS.
        expected["policy"] = 8443
        assert flag(args, "policy-listen") == "0.0.0.0:8443"
    else:
        assert flag(args, "policy-listen") == ""
    assert ports == expected
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    # image: tag defaults to appVersion; the sidecar is the same image unless overridden
    assert container["image"] == expected_images(values)[0]
    assert flag(args, "sidecar-image") == expected_images(values)[1]
    # issuer: given, or the token Service's in-cluster name (https unless TLS is disabled;
    # the port only when it is not the scheme's)
    token_svc = next(s for s in of_kind(objects, "Service") if s["spec"]["ports"][0]["targetPort"] == "token")
    scheme = "http" if token_tls(values) == "disabled" else "https"
    port = token_svc["spec"]["ports"][0]["port"]
    suffix = "" if port == {"http": 80, "https": 443}[scheme] else f":{port}"
    expected_issuer = values.get("issuerUrl") or f"{scheme}://{token_svc['metadata']['name']}.{NAMESPACE}.svc{suffix}"
    assert flag(args, "issuer") == expected_issuer


# Flags the chart sets on the operator through the environment (clap reads the variable
# when the flag is absent), and the chart value behind some of the flags it passes.
ENV_FLAGS = {"POD_NAMESPACE": "namespace", "POD_NAME": "pod-name"}
FLAG_VALUES = {
    "issuer": "issuerUrl",
    "token-tls": "tokenService.tls.enabled",
    "log": "log.level",
    "log-format": "log.format",
    "watch-namespaces": "watchNamespaces",
    "lease-name": "leaderElection.leaseName",
    "sidecar-cpu-limit": "sidecar.resources.limits.cpu",
    "sidecar-image": "sidecar.image.repository",
    "webhook-listen": "webhook.port",
    "concurrency": "concurrency",
    "max-token-lifetime": "token.maxLifetime",
}


def chart_flags() -> set[str]:
    """Every flag the chart sets on `keygate operator` in any variant."""
    flags = set()
    for values in VARIANTS.values():
        values = {k: v for k, v in values.items() if k != "extraArgs"}
        container = one(render(values), "Deployment")["spec"]["template"]["spec"]["containers"][0]
        for arg in container["args"][1:]:
            assert arg.startswith("--") and "=" in arg, f"chart args are --flag=value: {arg}"
            flags.add(arg[2:].split("=", 1)[0])
        flags |= {ENV_FLAGS[e["name"]] for e in container["env"] if e["name"] in ENV_FLAGS}
    return flags


def render_error(values: dict) -> str:
    """The message of the failed render (as `helm template` and `helm install` report it)."""
    with helm.Chart.load(CHART) as chart:
        with pytest.raises(helm.HelmRenderError) as err:
            chart.render(values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    return str(err.value)


def test_extra_args_may_not_repeat_a_flag_the_chart_sets():
    # keygate operator takes each flag once: a second --log made it exit at start. Every
    # flag the chart sets, in either spelling, fails the render naming the flag and what
    # to set instead, whether or not the current values render that flag.
    flags = chart_flags()
    assert {"issuer", "log", "log-format", "watch-namespaces", "webhook-cert-dir",
            "mutating-webhook-name", "sidecar-cpu-limit", "namespace", "pod-name",
            "token-tls", "token-service", "token-cert-dir"} <= flags
    for name in sorted(flags):
        for extra in ([f"--{name}=x"], [f"--{name}", "x"], ["--example-flag=value", f"--{name}"]):
            message = render_error({"extraArgs": extra})
            assert f"extraArgs: \"--{name}" in message, (extra, message)
            assert f"the chart already sets --{name} " in message, (extra, message)
            if name in FLAG_VALUES:
                assert f" {FLAG_VALUES[name]} " in message and " instead" in message, \
                    (extra, message)


def test_extra_args_that_the_chart_does_not_set_pass_through_in_order():
    extra = ["--example-flag=value", "--logx", "debug", "-v", "--"]
    args = deployment_args(render({"extraArgs": extra}))
    assert args[-len(extra):] == extra
    assert args.count("--log=info") == 1


def test_replicas_spread_and_pdb(variant):
    name, values, objects = variant
    replicas = values.get("replicaCount", 2)
    deployment = one(objects, "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == replicas
    selector = spec["selector"]["matchLabels"]
    pod = spec["template"]["spec"]
    assert spec["template"]["metadata"]["labels"].items() >= selector.items()
    pdbs = of_kind(objects, "PodDisruptionBudget")
    if replicas > 1:
        assert len(pdbs) == 1
        assert pdbs[0]["spec"]["selector"]["matchLabels"] == selector
        assert pdbs[0]["spec"]["maxUnavailable"] == 1
    else:
        assert pdbs == []
    keys = [t["topologyKey"] for t in pod["topologySpreadConstraints"]]
    assert keys == ["topology.kubernetes.io/zone", "kubernetes.io/hostname"]
    for t in pod["topologySpreadConstraints"]:
        assert t["labelSelector"]["matchLabels"] == selector
    anti = pod["affinity"]["podAntiAffinity"]
    if values.get("podAntiAffinity") == "hard":
        assert anti["requiredDuringSchedulingIgnoredDuringExecution"][0]["labelSelector"]["matchLabels"] == selector
    else:
        term = anti["preferredDuringSchedulingIgnoredDuringExecution"][0]["podAffinityTerm"]
        assert term["labelSelector"]["matchLabels"] == selector
        assert term["topologyKey"] == "kubernetes.io/hostname"


def test_services_select_the_operator_pods(variant):
    name, _, objects = variant
    selector = one(objects, "Deployment")["spec"]["selector"]["matchLabels"]
    for svc in of_kind(objects, "Service"):
        assert svc["spec"]["selector"] == selector, svc["metadata"]["name"]
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in ("token", "webhook", "admin", "policy")


def test_service_monitor(variant):
    name, values, objects = variant
    monitors = of_kind(objects, "ServiceMonitor")
    if not values.get("monitoring", {}).get("serviceMonitor", {}).get("enabled"):
        assert monitors == []
        return
    [monitor] = monitors
    matched = [s for s in of_kind(objects, "Service")
               if s["metadata"]["labels"].items() >= monitor["spec"]["selector"]["matchLabels"].items()]
    assert len(matched) == 1, "the ServiceMonitor must select exactly the metrics Service"
    assert matched[0]["spec"]["ports"][0]["targetPort"] == "admin"
    assert monitor["spec"]["endpoints"][0]["port"] == matched[0]["spec"]["ports"][0]["name"]
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    for key, value in values["monitoring"]["serviceMonitor"].get("labels", {}).items():
        assert monitor["metadata"]["labels"][key] == value


def test_network_policy(variant):
    name, values, objects = variant
    policies = of_kind(objects, "NetworkPolicy")
    np = values.get("networkPolicy", {})
    if not np.get("enabled"):
        assert policies == []
        return
    [policy] = policies
    selector = one(objects, "Deployment")["spec"]["selector"]["matchLabels"]
    assert policy["spec"]["podSelector"]["matchLabels"] == selector
    ports = {r["ports"][0]["port"]: r for r in policy["spec"]["ingress"]}
    expected = {"token", "webhook", "admin"} | ({"policy"} if token_tls(values) != "disabled" else set())
    assert set(ports) == expected
    if "policy" in ports:
        assert "from" not in ports["policy"], "sidecars in every namespace follow the policy stream"
    if np.get("tokenFrom"):
        # ... and the startup check's Pod, which reads the metadata document.
        check_pod = one(objects, "Job")["spec"]["template"]["metadata"]["labels"]
        assert ports["token"]["from"] == np["tokenFrom"] + [{"podSelector": {"matchLabels": check_pod}}]
    if np.get("egress"):
        assert "Egress" in policy["spec"]["policyTypes"]
        assert policy["spec"]["egress"] == np["egress"]
    else:
        assert policy["spec"]["policyTypes"] == ["Ingress"]


def test_everything_lives_in_the_release_namespace_or_is_cluster_scoped(variant):
    name, values, objects = variant
    cluster_scoped = {"ClusterRole", "ClusterRoleBinding", "MutatingWebhookConfiguration",
                      "ValidatingWebhookConfiguration", "CustomResourceDefinition"}
    allowed = {NAMESPACE, *(values.get("watchNamespaces") or [])}
    monitoring = {"ServiceMonitor", "PodMonitor", "PrometheusRule", "ConfigMap"}
    for obj in objects:
        if obj["kind"] in cluster_scoped:
            assert "namespace" not in obj["metadata"], obj["kind"]
        else:
            if obj["kind"] in monitoring and obj["metadata"]["namespace"] == "monitoring":
                continue  # the namespace value of the monitoring object
            assert obj["metadata"]["namespace"] in allowed, (obj["kind"], obj["metadata"])
            if obj["metadata"]["namespace"] != NAMESPACE:
                assert obj["kind"] in ("Role", "RoleBinding"), obj["kind"]


def test_names_are_unique_per_kind_and_namespace(variant):
    _, _, objects = variant
    seen = set()
    for obj in objects:
        key = (obj["kind"], obj["metadata"].get("namespace"), obj["metadata"]["name"])
        assert key not in seen, key
        seen.add(key)


def test_long_release_names_keep_names_within_dns_limits():
    with helm.Chart.load(CHART) as chart:
        manifests = chart.render({"certManager": {"enabled": True}},
                                 name="a-very-long-release-name-for-keygate-in-production",
                                 namespace=NAMESPACE)
    for path, text in manifests.items():
        if path.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc and isinstance(doc, dict) and "metadata" in doc:
                assert len(doc["metadata"]["name"]) <= 63, doc["metadata"]["name"]


def test_notes_tell_how_to_apply_the_example_and_get_a_token():
    with helm.Chart.load(CHART) as chart:
        notes = chart.render(name=RELEASE, namespace=NAMESPACE)["keygate/templates/NOTES.txt"]
    assert "kubectl apply -f examples/quickstart/" in notes
    assert "/oauth2/token" in notes and "grant_type=client_credentials" in notes
    assert "CRDs: part of this release (crds.enabled), so helm upgrade updates them." in notes
    assert "keeps them (crds.keep)" in notes
    assert "WARNING: crds.keep is false" in globals()["notes"]({"crds": {"keep": False}})


def test_notes_give_the_https_issuer_and_how_to_trust_its_ca():
    fetch_ca = f"kubectl -n {NAMESPACE} get configmap keygate-ca -o jsonpath='{{.data.ca\\.crt}}'"
    for values in ({}, {"certManager": {"enabled": True}}):
        text = notes(values)
        assert f"Token server: https://keygate.{NAMESPACE}.svc " in text
        assert fetch_ca + " > keygate-ca.crt" in text
        assert (f"curl -s --cacert keygate-ca.crt --connect-to keygate.{NAMESPACE}.svc:443:127.0.0.1:8443"
                in text)
        assert f"https://keygate.{NAMESPACE}.svc/oauth2/token" in text
        assert "http://" not in text.replace("http://127.0.0.1", "!"), "no plain-HTTP token URL"
        assert "verify=" in text and "--ca-file" in text
    # Disabled: plain HTTP, said so.
    text = notes({"tokenService": {"tls": {"enabled": False}, "port": 80}})
    assert f"Token server: http://keygate.{NAMESPACE}.svc " in text
    assert "disabled: plain HTTP" in text
    assert "keygate-ca" not in text


def notes(values: dict) -> str:
    with helm.Chart.load(CHART) as chart:
        return chart.render(values, name=RELEASE, namespace=NAMESPACE)["keygate/templates/NOTES.txt"]


def test_notes_follow_watch_namespaces():
    # All namespaces: the example's namespace can be created after installing.
    text = notes({})
    assert "kubectl create namespace shop\n     kubectl apply -f examples/quickstart/" in text
    assert "Set watchNamespaces to confine it" in text
    # shop is watched: it had to exist before the install, so it is not created again.
    text = notes({"watchNamespaces": ["shop"]})
    assert "kubectl create namespace shop" not in text
    assert "kubectl apply -f examples/quickstart/" in text
    assert "create a namespace before adding it" in text
    assert "Only in shop: a labelled Pod in\n   another namespace is refused" in text
    # shop is not watched: create it, then add it to watchNamespaces.
    text = notes({"watchNamespaces": ["a", "b"]})
    create = text.index("kubectl create namespace shop")
    upgrade = text.index("helm upgrade keygate charts/keygate -n keygate-system --reuse-values "
                         "--set 'watchNamespaces={a,b,shop}'")
    assert create < upgrade < text.index("kubectl apply -f examples/quickstart/")


def test_variants_do_not_mutate_each_other():
    before = copy.deepcopy(VARIANTS)
    for values in VARIANTS.values():
        render(values)
    assert VARIANTS == before


def test_the_operator_may_write_every_revocation_shard():
    # With watchNamespaces, writes to the operator's own ConfigMaps are granted by name: the
    # names must follow the shard count of src/controller/revocations.rs.
    source = (REPO / "src/controller/revocations.rs").read_text()
    shards = int(re.search(r"pub const SHARDS: usize = (\d+);", source).group(1))
    objects = render({"watchNamespaces": ["shop"]})
    own = next(o for o in of_kind(objects, "Role") if o["metadata"]["name"].endswith("-operator"))
    named = {
        name
        for rule in own["rules"]
        if rule["resources"] == ["configmaps"]
        for name in rule.get("resourceNames", [])
    }
    expected = {f"keygate-revocations-{i}" for i in range(shards)} | {"keygate-revocations"}
    assert expected <= named, sorted(expected - named)


# -------------------------------------------------------------------------- startup check


def test_schema_accepts_nonzero_durations():
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema({"token": {"defaultLifetime": "0.5h", "maxLifetime": "1h30m"},
                               "signingKeys": {"rotation": "10m"}})


def check_args(objects) -> list[str]:
    job = one(objects, "Job")
    return job["spec"]["template"]["spec"]["containers"][0]["args"]


def test_startup_check_is_a_hook_job_with_its_own_least_privilege(variant):
    name, values, objects = variant
    job = one(objects, "Job")
    checks = hooks(objects)
    assert {o["kind"] for o in checks} <= {"Job", "ServiceAccount", "Role", "RoleBinding"}, name
    for obj in checks:
        annotations = obj["metadata"]["annotations"]
        assert annotations["helm.sh/hook"] == "post-install,post-upgrade"
        assert annotations["helm.sh/hook-delete-policy"] == "before-hook-creation,hook-succeeded"
        # The ServiceAccount and its grants exist before the Job runs.
        assert int(annotations["helm.sh/hook-weight"]) < 0 or obj["kind"] == "Job"
    spec = job["spec"]
    assert spec["backoffLimit"] == 1
    assert spec["activeDeadlineSeconds"] == 240
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    sa = one([o for o in checks if o["kind"] == "ServiceAccount"], "ServiceAccount")
    assert pod["serviceAccountName"] == sa["metadata"]["name"] == "keygate-check"
    assert sa["automountServiceAccountToken"] is False and pod["automountServiceAccountToken"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    [container] = pod["containers"]
    sc = container["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]} and sc["runAsNonRoot"] is True
    assert container["resources"]["limits"]["memory"]
    assert container["image"] == one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]["image"]

    # Exactly: create ApiClients where the webhook sees them, get keygate-ca by name.
    webhook = values.get("webhook", {}).get("validating", {}).get("enabled", True)
    tls = token_tls(values) != "disabled"
    watched = values.get("watchNamespaces") or []
    check_ns = NAMESPACE if not watched or NAMESPACE in watched else watched[0]
    grants = set()
    for role in (o for o in checks if o["kind"] == "Role"):
        ns = role["metadata"]["namespace"]
        binding = next(b for b in checks if b["kind"] == "RoleBinding" and b["metadata"]["namespace"] == ns)
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                      "name": role["metadata"]["name"]}
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "keygate-check", "namespace": NAMESPACE}]
        for rule in role["rules"]:
            for res in rule["resources"]:
                grants.add((ns, rule["apiGroups"][0], res, tuple(rule["verbs"]),
                            tuple(rule.get("resourceNames", []))))
    expected = set()
    if webhook:
        expected.add((check_ns, "keygate.dev", "apiclients", ("create",), ()))
    if tls:
        expected.add((NAMESPACE, "", "configmaps", ("get",), ("keygate-ca",)))
    assert grants == expected, name

    args = check_args(objects)
    assert args[0] == "check"
    assert flag(args, "timeout") == "180s"
    assert flag(args, "webhook") == str(webhook).lower()
    assert flag(args, "webhook-namespace") == check_ns
    assert flag(args, "namespace") == NAMESPACE
    issuer = flag(deployment_args(objects), "issuer")
    assert flag(args, "issuer") == issuer
    scheme = "https" if tls else "http"
    assert flag(args, "metadata-url").startswith(f"{scheme}://keygate.{NAMESPACE}.svc")
    assert flag(args, "metadata-url").endswith("/.well-known/openid-configuration")


def test_the_check_refusal_name_is_the_validating_webhooks():
    # keygate check passes on a refusal from the webhook the chart names validate.keygate.dev.
    source = (REPO / "src/webhook/validate.rs").read_text()
    name = re.search(r'pub const VALIDATING_WEBHOOK: &str = "([^"]+)";', source).group(1)
    config = one(render(), "ValidatingWebhookConfiguration")
    assert [w["name"] for w in config["webhooks"]] == [name]


def test_startup_check_values():
    objects = render({"startupCheck": {"timeoutSeconds": 600, "backoffLimit": 0,
                                       "resources": {"limits": {"memory": "32Mi"}}}})
    job = one(objects, "Job")
    assert (job["spec"]["activeDeadlineSeconds"], job["spec"]["backoffLimit"]) == (660, 0)
    assert flag(check_args(objects), "timeout") == "600s"
    assert job["spec"]["template"]["spec"]["containers"][0]["resources"] == {
        "requests": {"cpu": "10m", "memory": "16Mi"}, "limits": {"memory": "32Mi"}}
    assert hooks(render({"startupCheck": {"enabled": False}})) == []


def test_without_the_startup_check_the_token_server_admits_only_token_from():
    peers = [{"namespaceSelector": {"matchLabels": {"keygate.dev/clients": "true"}}}]
    objects = render({"networkPolicy": {"enabled": True, "tokenFrom": peers}, "startupCheck": {"enabled": False}})
    ingress = one(objects, "NetworkPolicy")["spec"]["ingress"]
    token = next(r for r in ingress if r["ports"][0]["port"] == "token")
    assert token["from"] == peers
