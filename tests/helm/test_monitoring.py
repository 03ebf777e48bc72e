"""The chart's consumers of keygate's metrics: the sidecars' PodMonitor, the Grafana dashboard
and the PrometheusRule.

The metric names they may use are read from the source (every `sub_registry_with_prefix`
and `register(...)` in src/), with the suffixes prometheus_client adds: `_total` for
counters; `_bucket`, `_sum` and `_count` for histograms. A dashboard panel or an alert on a
metric keygate does not export fails here instead of staying silently empty.

promtool (Debian package prometheus) checks and unit-tests the rules. Without it the
promtool tests skip, unless KEYGATE_PROMTOOL is set (CI, .ci/run): then they fail.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from test_chart import CHART, NAMESPACE, REPO, of_kind, one, render

ALL_ON = {
    "sidecar": {"podMonitor": {"enabled": True}},
    "prometheusRule": {"enabled": True},
    "grafana": {"dashboard": {"enabled": True}},
    "monitoring": {"serviceMonitor": {"enabled": True}},
}

# Metrics from outside keygate that the rules may name, and why.
FOREIGN_METRICS = {"up": "Prometheus' own scrape health (KeygateOperatorDown)"}


# ------------------------------------------------------------------ metrics from the source


def exported_metrics() -> dict[str, str]:
    """Every metric name keygate exports -> its type, from the registrations in src/."""
    out: dict[str, str] = {}
    for path in sorted((REPO / "src").rglob("*.rs")):
        text = path.read_text()
        if "sub_registry_with_prefix" not in text:
            continue
        # Field types of the Metrics structs: `name: Counter`, `name: Family<L, Histogram>`.
        types = {m.group(1): m.group(2) or m.group(3)
                 for m in re.finditer(r"^\s*(?:pub\s+)?(\w+):\s*(?:Family<\w+,\s*(\w+)>|(Counter|Gauge|Histogram))\s*,",
                                      text, re.M)}
        for block in re.finditer(r'sub_registry_with_prefix\("(\w+)"\);(.*?)\n\s*metrics\s*\n\s*\}', text, re.S):
            prefix, body = block.groups()
            for reg in re.finditer(r'register\(\s*"(\w+)",\s*"[^"]*",\s*\w+\.(\w+)\.clone\(\)', body):
                name, field = reg.groups()
                kind = types.get(field)
                assert kind, f"{path}: no type for metrics field {field}"
                base = f"{prefix}_{name}"
                if kind == "Counter":
                    out[f"{base}_total"] = kind
                elif kind == "Histogram":
                    for suffix in ("_bucket", "_sum", "_count"):
                        out[base + suffix] = kind
                else:
                    out[base] = kind
        # Collectors that write their series at scrape time: `encode_descriptor("name", "help",
        # unit, MetricType::Gauge)` under the prefix their sub-registry was made with.
        for block in re.finditer(r'sub_registry_with_prefix\("(\w+)"\)\s*\.register_collector', text):
            prefix = block.group(1)
            descriptors = re.findall(r'encode_descriptor\(\s*"(\w+)",\s*"[^"]*",\s*\w+,\s*MetricType::(\w+)',
                                     text)
            assert descriptors, f"{path}: a collector under {prefix} with no descriptors"
            for name, kind in descriptors:
                assert kind == "Gauge", f"{path}: collector metric {name} is a {kind}"
                out[f"{prefix}_{name}"] = kind
    return out


def test_the_metric_list_is_read_from_the_source():
    metrics = exported_metrics()
    # A guard on the parser: if the registrations change shape, this fails loudly rather
    # than letting every check below pass against an empty list.
    for prefix in ("keygate_token_", "keygate_controller_", "keygate_sidecar_"):
        assert any(m.startswith(prefix) for m in metrics), prefix
    assert {"keygate_token_issued_total", "keygate_token_request_duration_seconds_bucket",
            "keygate_controller_failures_total", "keygate_controller_managed_objects",
            "keygate_sidecar_decisions_total", "keygate_sidecar_policy_generation",
            "keygate_build_info", "keygate_webhook_admissions_total", "keygate_controller_leader",
            "keygate_certificate_expiration_timestamp_seconds",
            "keygate_signing_key_created_timestamp_seconds",
            "keygate_signing_key_next_rotation_timestamp_seconds",
            "keygate_apiclient_ready_status",
            "keygate_apiclient_next_rotation_timestamp_seconds"} <= set(metrics)
    assert len(metrics) >= 20, sorted(metrics)


PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "offset",
                "and", "or", "unless", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression (or Grafana query) selects."""
    e = re.sub(r"label_values\(([^,()]+),\s*\w+\)", r"\1", expr)  # Grafana: label_values(metric, label)
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', e)  # strings
    e = re.sub(r"\{[^}]*\}", "", e)  # label matchers
    e = re.sub(r"\[[^\]]*\]", "", e)  # ranges
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", e)
    e = re.sub(r"\$\{?\w+\}?", "", e)  # Grafana variables
    e = re.sub(r"\boffset\s+\w+", "", e)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][\w:]*", e):
        word = m.group(0)
        following = e[m.end():].lstrip()
        if following.startswith("(") or word.lower() in PROMQL_WORDS:
            continue  # a function or a keyword
        if re.fullmatch(r"\d+\w*", word):
            continue
        names.add(word)
    return names


def test_metric_names_finds_the_selected_metrics():
    assert metric_names('sum by (le) (rate(a_bucket{x="y"}[5m])) / on (ns) b offset 1h > 3') == {"a_bucket", "b"}
    assert metric_names("label_values(keygate_x, namespace)") == {"keygate_x"}
    assert metric_names('histogram_quantile(0.99, sum by (le) (rate(m{n=~"$v"}[$__rate_interval])))') == {"m"}


def check_names(where: str, expr: str, allowed: set[str]):
    names = metric_names(expr)
    assert names, f"{where}: no metric in {expr!r}"
    unknown = names - allowed
    assert not unknown, f"{where}: {sorted(unknown)} are not metrics keygate exports ({expr!r})"


# ------------------------------------------------------------------------------ defaults


def test_metrics_consumers_are_off_by_default():
    objects = render()
    for kind in ("PodMonitor", "PrometheusRule"):
        assert of_kind(objects, kind) == []
    assert not [c for c in of_kind(objects, "ConfigMap") if "grafana_dashboard" in c["metadata"]["labels"]]


# ----------------------------------------------------------------------------- PodMonitor


def inject_constant(name: str) -> str:
    text = (REPO / "src" / "webhook" / "inject.rs").read_text()
    return re.search(rf'pub const {name}: &str = "([^"]+)";', text).group(1)


@pytest.mark.parametrize("values", [{}, {"watchNamespaces": ["shop", "billing"]}])
def test_pod_monitor_scrapes_injected_sidecars(values):
    values = {**values, "sidecar": {"podMonitor": {"enabled": True, "labels": {"release": "prom"},
                                                   "interval": "15s", "scrapeTimeout": "5s"}}}
    monitor = one(render(values), "PodMonitor")
    spec = monitor["spec"]
    # The labels injection leaves on a Pod (src/webhook/inject.rs): opted in, and injected.
    assert spec["selector"]["matchLabels"] == {inject_constant("INJECT_LABEL"): "true"}
    assert spec["selector"]["matchExpressions"] == [{"key": inject_constant("CAPTURE_LABEL"), "operator": "Exists"}]
    [endpoint] = spec["podMetricsEndpoints"]
    assert endpoint["port"] == inject_constant("ADMIN_PORT_NAME")
    assert endpoint["path"] == "/metrics"
    assert (endpoint["interval"], endpoint["scrapeTimeout"]) == ("15s", "5s")
    assert monitor["metadata"]["labels"]["release"] == "prom"
    assert monitor["metadata"]["namespace"] == NAMESPACE
    watched = values.get("watchNamespaces")
    assert spec["namespaceSelector"] == ({"matchNames": watched} if watched else {"any": True})


# ------------------------------------------------------------------------------ dashboard


def dashboard_file() -> dict:
    return json.loads((CHART / "dashboards" / "keygate.json").read_text())


def dashboard_queries(dashboard: dict):
    def walk(panels):
        for panel in panels:
            for target in panel.get("targets", []):
                yield f"panel {panel['title']!r}", target["expr"]
            yield from walk(panel.get("panels", []))
    yield from walk(dashboard["panels"])
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            yield f"variable {var['name']}", query


def test_dashboard_names_only_exported_metrics():
    dashboard = dashboard_file()
    allowed = set(exported_metrics())
    queries = list(dashboard_queries(dashboard))
    assert len(queries) >= 15
    for where, expr in queries:
        check_names(where, expr, allowed)
    # Every family keygate exports has a panel.
    used = {n for _, e in queries for n in metric_names(e)}
    bases = {re.sub(r"_(bucket|sum|count)$", "", m) for m in allowed}
    missing = {b for b in bases if not any(u == b or u.startswith(b + "_") for u in used)}
    assert not missing, f"metrics without a panel: {sorted(missing)}"


def test_dashboard_panels_use_the_datasource_variable_and_unique_ids():
    dashboard = dashboard_file()
    ids = []

    def walk(panels):
        for panel in panels:
            ids.append(panel["id"])
            if panel["type"] != "row":
                assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
            walk(panel.get("panels", []))
    walk(dashboard["panels"])
    assert len(ids) == len(set(ids))
    assert dashboard["uid"] and dashboard["title"] == "keygate"


def test_dashboard_config_map_carries_the_file_and_the_sidecar_label():
    objects = render({"grafana": {"dashboard": {"enabled": True, "namespace": "monitoring",
                                                "annotations": {"grafana_folder": "keygate"}}}})
    [cm] = [c for c in of_kind(objects, "ConfigMap") if c["metadata"]["name"] == "keygate-dashboard"]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert cm["metadata"]["namespace"] == "monitoring"
    assert cm["metadata"]["annotations"] == {"grafana_folder": "keygate"}
    assert json.loads(cm["data"]["keygate.json"]) == dashboard_file()


# ------------------------------------------------------------------------- PrometheusRule


RULE_VARIANTS = {
    "all-namespaces": {"prometheusRule": {"enabled": True}},
    "with-service-monitor": {**ALL_ON},
    "watch-namespaces": {**ALL_ON, "watchNamespaces": ["shop", "billing"]},
}


def rendered_groups(values: dict) -> list[dict]:
    rule = one(render(values), "PrometheusRule")
    assert rule["metadata"]["namespace"] == NAMESPACE
    return rule["spec"]["groups"]


def alerts(groups) -> dict[str, dict]:
    return {r["alert"]: r for g in groups for r in g["rules"]}


@pytest.mark.parametrize("name", list(RULE_VARIANTS))
def test_rules_name_only_exported_metrics(name):
    allowed = set(exported_metrics()) | set(FOREIGN_METRICS)
    for alert, rule in alerts(rendered_groups(RULE_VARIANTS[name])).items():
        check_names(alert, rule["expr"], allowed)
        assert rule["labels"]["severity"] in ("warning", "critical"), alert
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], alert


def test_rules_cover_the_documented_alerts_and_scope_namespaces():
    groups = rendered_groups(RULE_VARIANTS["watch-namespaces"])
    rules = alerts(groups)
    assert set(rules) == {
        "KeygateTokenServerErrors", "KeygateTokenRefusalsHigh", "KeygateTokenLatencyHigh",
        "KeygateOperatorDown", "KeygateReconcileErrors", "KeygateControllersStalled",
        "KeygateNoLeader", "KeygateCertificateExpiresSoon", "KeygateSigningKeyRotationOverdue",
        "KeygateApiClientNotReady",
        "KeygateSidecarWithoutPolicy", "KeygateSidecarPolicyReloadFailing",
        "KeygateSidecarRefusalSpike", "KeygateSidecarUpstreamErrors"}
    for alert, rule in rules.items():
        if alert.startswith("KeygateSidecar"):
            assert 'namespace=~"shop|billing"' in rule["expr"], alert
        else:
            assert f'namespace="{NAMESPACE}"' in rule["expr"], alert
    assert 'job="keygate-metrics"' in rules["KeygateOperatorDown"]["expr"]
    # Without the ServiceMonitor nothing scrapes the operator under that job: no such alert.
    assert "KeygateOperatorDown" not in alerts(rendered_groups(RULE_VARIANTS["all-namespaces"]))
    docs = (REPO / "docs" / "monitoring.md").read_text()
    for alert in rules:
        assert f"`{alert}`" in docs, f"docs/monitoring.md does not describe {alert}"


def promtool() -> str:
    found = shutil.which("promtool")
    if found:
        return found
    if os.environ.get("KEYGATE_PROMTOOL"):
        pytest.fail("KEYGATE_PROMTOOL is set but promtool is missing (Debian: apt-get install prometheus)")
    pytest.skip("promtool is not installed (Debian: apt-get install prometheus); CI sets KEYGATE_PROMTOOL=1")


def write_rules(tmp_path: Path, values: dict, annotations: bool = True) -> Path:
    groups = rendered_groups(values)
    if not annotations:
        # promtool's unit tests compare annotations exactly; `check rules` has already
        # parsed their templates, so the unit tests assert labels only.
        for group in groups:
            for rule in group["rules"]:
                rule.pop("annotations", None)
    path = tmp_path / "rules.yaml"
    path.write_text(yaml.safe_dump({"groups": groups}, sort_keys=False))
    return path


@pytest.mark.parametrize("name", list(RULE_VARIANTS))
def test_promtool_check_rules(name, tmp_path):
    tool = promtool()
    path = write_rules(tmp_path, RULE_VARIANTS[name])
    result = subprocess.run([tool, "check", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_unit_tests_of_alerts(tmp_path):
    tool = promtool()
    write_rules(tmp_path, RULE_VARIANTS["with-service-monitor"], annotations=False)
    ns = NAMESPACE
    tests = {
        "rule_files": ["rules.yaml"],
        "evaluation_interval": "1m",
        "tests": [
            {   # a reconcile failing every minute fires after 15 minutes, not before
                "interval": "1m",
                "input_series": [
                    {"series": f'keygate_controller_failures_total{{namespace="{ns}",controller="apiclient",reason="kube"}}',
                     "values": "0+1x40"},
                    {"series": f'keygate_controller_failures_total{{namespace="{ns}",controller="m2mrole",reason="kube"}}',
                     "values": "3x40"},
                ],
                "alert_rule_test": [
                    {"eval_time": "10m", "alertname": "KeygateReconcileErrors", "exp_alerts": []},
                    {"eval_time": "30m", "alertname": "KeygateReconcileErrors", "exp_alerts": [
                        {"exp_labels": {"severity": "warning", "namespace": ns, "controller": "apiclient",
                                        "reason": "kube"}}]},
                ],
            },
            {   # a sidecar answering no_policy fires; one serving requests does not
                "interval": "1m",
                "input_series": [
                    {"series": 'keygate_sidecar_decisions_total{namespace="shop",pod="orders-1",outcome="no_policy",rule=""}',
                     "values": "0+10x20"},
                    {"series": 'keygate_sidecar_decisions_total{namespace="shop",pod="orders-2",outcome="allowed",rule="read"}',
                     "values": "0+10x20"},
                ],
                "alert_rule_test": [
                    {"eval_time": "15m", "alertname": "KeygateSidecarWithoutPolicy", "exp_alerts": [
                        {"exp_labels": {"severity": "critical", "namespace": "shop", "pod": "orders-1"}}]},
                ],
            },
            {   # ApiClients exist and nothing reconciles them for 3 hours: stalled; not
                # while the counters are younger than that
                "interval": "5m",
                "input_series": [
                    {"series": f'keygate_controller_managed_objects{{namespace="{ns}",controller="apiclient",pod="a"}}',
                     "values": "3x60"},
                    {"series": f'keygate_controller_reconciles_total{{namespace="{ns}",controller="apiclient",pod="a"}}',
                     "values": "10x60"},
                ],
                "alert_rule_test": [
                    {"eval_time": "2h", "alertname": "KeygateControllersStalled", "exp_alerts": []},
                    {"eval_time": "4h", "alertname": "KeygateControllersStalled", "exp_alerts": [
                        {"exp_labels": {"severity": "critical", "namespace": ns}}]},
                ],
            },
            {   # ... and an hourly reconcile keeps it quiet
                "interval": "5m",
                "input_series": [
                    {"series": f'keygate_controller_managed_objects{{namespace="{ns}",controller="apiclient",pod="a"}}',
                     "values": "3x60"},
                    {"series": f'keygate_controller_reconciles_total{{namespace="{ns}",controller="apiclient",pod="a"}}',
                     "values": "10 10 10 10 10 10 10 10 10 10 10 11 11 11 11 11 11 11 11 11 11 11 11 12 12 12 12 12 12 12 12 12 12 12 12 13 13 13 13 13 13 13 13 13 13 13 13 14 14 14 14 14 14 14 14 14 14 14 14 15"},
                ],
                "alert_rule_test": [
                    {"eval_time": "4h", "alertname": "KeygateControllersStalled", "exp_alerts": []},
                ],
            },
            {   # the leader is gone and no replica takes over: fires after 10 minutes
                "interval": "1m",
                "input_series": [
                    {"series": f'keygate_controller_leader{{namespace="{ns}",pod="a"}}', "values": "1 1 0x30"},
                    {"series": f'keygate_controller_leader{{namespace="{ns}",pod="b"}}', "values": "0x32"},
                ],
                "alert_rule_test": [
                    {"eval_time": "8m", "alertname": "KeygateNoLeader", "exp_alerts": []},
                    {"eval_time": "20m", "alertname": "KeygateNoLeader", "exp_alerts": [
                        {"exp_labels": {"severity": "critical", "namespace": ns}}]},
                ],
            },
            {   # ... and a handover to another replica keeps it quiet
                "interval": "1m",
                "input_series": [
                    {"series": f'keygate_controller_leader{{namespace="{ns}",pod="a"}}', "values": "1 1 0x30"},
                    {"series": f'keygate_controller_leader{{namespace="{ns}",pod="b"}}', "values": "0 0 0 1x30"},
                ],
                "alert_rule_test": [
                    {"eval_time": "20m", "alertname": "KeygateNoLeader", "exp_alerts": []},
                ],
            },
            {   # the webhook's certificate expires in under a week (promtool's clock starts at
                # 0): fires after an hour; the token server's, 30 days away, does not
                "interval": "5m",
                "input_series": [
                    {"series": f'keygate_certificate_expiration_timestamp_seconds{{namespace="{ns}",pod="a",certificate="webhook"}}',
                     "values": f"{6 * 86400}x40"},
                    {"series": f'keygate_certificate_expiration_timestamp_seconds{{namespace="{ns}",pod="a",certificate="token_server"}}',
                     "values": f"{30 * 86400}x40"},
                ],
                "alert_rule_test": [
                    {"eval_time": "30m", "alertname": "KeygateCertificateExpiresSoon", "exp_alerts": []},
                    {"eval_time": "2h", "alertname": "KeygateCertificateExpiresSoon", "exp_alerts": [
                        {"exp_labels": {"severity": "warning", "namespace": ns, "certificate": "webhook"}}]},
                ],
            },
            {   # the signing key was due for rotation at 0: overdue by an hour at 1h
                "interval": "5m",
                "input_series": [
                    {"series": f'keygate_signing_key_next_rotation_timestamp_seconds{{namespace="{ns}",pod="a"}}',
                     "values": "0x40"},
                ],
                "alert_rule_test": [
                    {"eval_time": "50m", "alertname": "KeygateSigningKeyRotationOverdue", "exp_alerts": []},
                    {"eval_time": "2h", "alertname": "KeygateSigningKeyRotationOverdue", "exp_alerts": [
                        {"exp_labels": {"severity": "warning", "namespace": ns}}]},
                ],
            },
            {   # an ApiClient Ready=False for 15 minutes fires, named by its own namespace
                "interval": "1m",
                "input_series": [
                    {"series": f'keygate_apiclient_ready_status{{namespace="{ns}",pod="a",exported_namespace="shop",name="a",condition="False"}}',
                     "values": "1x30"},
                    {"series": f'keygate_apiclient_ready_status{{namespace="{ns}",pod="a",exported_namespace="shop",name="b",condition="False"}}',
                     "values": "0x30"},
                    {"series": f'keygate_apiclient_ready_status{{namespace="{ns}",pod="a",exported_namespace="shop",name="b",condition="True"}}',
                     "values": "1x30"},
                ],
                "alert_rule_test": [
                    {"eval_time": "10m", "alertname": "KeygateApiClientNotReady", "exp_alerts": []},
                    {"eval_time": "20m", "alertname": "KeygateApiClientNotReady", "exp_alerts": [
                        {"exp_labels": {"severity": "warning", "namespace": ns, "exported_namespace": "shop",
                                        "name": "a"}}]},
                ],
            },
            {   # no operator replica scraped
                "interval": "1m",
                "input_series": [
                    {"series": f'up{{job="keygate-metrics",namespace="{ns}",pod="a"}}', "values": "1 1 0x20"},
                ],
                "alert_rule_test": [
                    {"eval_time": "2m", "alertname": "KeygateOperatorDown", "exp_alerts": []},
                    {"eval_time": "15m", "alertname": "KeygateOperatorDown", "exp_alerts": [
                        {"exp_labels": {"severity": "critical", "namespace": ns}}]},
                ],
            },
        ],
    }
    path = tmp_path / "tests.yaml"
    path.write_text(yaml.safe_dump(tests, sort_keys=False))
    result = subprocess.run([tool, "test", "rules", str(path)], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
