"""Reads the `# --` documentation comments of charts/keygate/values.yaml.

A value is documented by a comment block that starts with `# --` right above its key, or
by one above an enclosing key. `python tests/helm/values_doc.py` prints the README's
values table.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
VALUES = REPO / "charts" / "keygate" / "values.yaml"

KEY = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z][\w.-]*):(?P<rest>.*)$")
COMMENT = re.compile(r"^ *# ?(?P<text>.*)$")


def documented(path: Path = VALUES) -> dict[str, str]:
    """Dotted key path -> description, for every key that carries a `# --` block."""
    out: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    pending: list[str] | None = None
    for line in path.read_text().splitlines():
        if not line.strip():
            pending = None
            continue
        comment = COMMENT.match(line)
        if comment:
            text = comment.group("text")
            if text.startswith("-- "):
                pending = [text[3:].strip()]
            elif pending is not None:
                pending.append(text.strip())
            continue
        key = KEY.match(line)
        if not key:
            pending = None  # a list item or a continuation
            continue
        indent = len(key.group("indent"))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        stack.append((indent, key.group("key")))
        if pending is not None:
            out[".".join(k for _, k in stack)] = " ".join(pending)
        pending = None
    return out


def leaves(values: dict, prefix: str = "") -> list[str]:
    """Dotted paths of every leaf value (an empty map or list counts as a leaf)."""
    paths: list[str] = []
    for key, value in values.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            paths.extend(leaves(value, path + "."))
        else:
            paths.append(path)
    return paths


def undocumented(path: Path = VALUES) -> list[str]:
    """Leaf values with no `# --` block on themselves or an enclosing key."""
    docs = documented(path)
    values = yaml.safe_load(path.read_text())
    missing = []
    for leaf in leaves(values):
        parts = leaf.split(".")
        if not any(".".join(parts[:i]) in docs for i in range(1, len(parts) + 1)):
            missing.append(leaf)
    return missing


def lookup(values: dict, dotted: str):
    node = values
    for part in dotted.split("."):
        node = node[part]
    return node


def table(path: Path = VALUES) -> str:
    values = yaml.safe_load(path.read_text())
    rows = ["| Key | Default | Description |", "| --- | --- | --- |"]
    for key, desc in documented(path).items():
        default = json.dumps(lookup(values, key), separators=(", ", ": "))
        text = desc.replace("|", "\\|")
        rows.append(f"| `{key}` | `{default}` | {text} |")
    return "\n".join(rows)


if __name__ == "__main__":
    missing = undocumented()
    if missing:
        sys.exit(f"undocumented values: {missing}")
    print(table())
