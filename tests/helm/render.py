"""Prints the RBAC the chart renders (ServiceAccount, ClusterRoles, Roles and bindings) as
multi-document YAML, for the real-cluster test that runs the operator with exactly those
permissions (tests/e2e_cluster.rs). Usage: render.py RELEASE NAMESPACE LEASE_NAME."""

from __future__ import annotations

import sys
from pathlib import Path

import helm_python as helm
import yaml

CHART = Path(__file__).resolve().parents[2] / "charts" / "keygate"
KINDS = {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}


def main() -> None:
    release, namespace, lease = sys.argv[1:4]
    values = {"watchNamespaces": [namespace], "leaderElection": {"leaseName": lease}}
    with helm.Chart.load(CHART) as chart:
        manifests = chart.render(values, name=release, namespace=namespace, is_install=True)
    docs = []
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs.extend(d for d in yaml.safe_load_all(text) if d and d.get("kind") in KINDS)
    print(yaml.safe_dump_all(docs, sort_keys=False))


if __name__ == "__main__":
    main()
