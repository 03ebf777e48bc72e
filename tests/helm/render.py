"""Prints what the chart renders for one release as multi-document YAML, for the real-cluster
test that installs it and runs the operator with exactly its permissions
(tests/e2e_cluster.rs). The release watches NAMESPACE only, and both webhooks match only
NAMESPACE, so the release cannot affect anything else in a shared test cluster.
Usage: render.py RELEASE NAMESPACE LEASE_NAME."""

from __future__ import annotations

import sys
from pathlib import Path

import helm_python as helm
import yaml

CHART = Path(__file__).resolve().parents[2] / "charts" / "keygate"


def main() -> None:
    release, namespace, lease = sys.argv[1:4]
    values = {
        # The test installs the CRDs from crds/ itself and deletes every cluster-scoped
        # object it applied afterwards: CRDs rendered here would take every keygate object
        # in the shared test cluster with them.
        "crds": {"enabled": False},
        "watchNamespaces": [namespace],
        "leaderElection": {"leaseName": lease},
        "webhook": {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}}},
    }
    with helm.Chart.load(CHART) as chart:
        manifests = chart.render(values, name=release, namespace=namespace, is_install=True)
    docs = []
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            continue
        docs.extend(d for d in yaml.safe_load_all(text) if d)
    print(yaml.safe_dump_all(docs, sort_keys=False))


if __name__ == "__main__":
    main()
