"""Fixtures that run `keygate dev` on the quickstart manifests for the Python interop tests.

The binary is taken from $KEYGATE_BIN, else <repo>/target/debug/keygate (build it with
`cargo build` first).
"""

from __future__ import annotations

import os
import queue
import re
import shutil
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import pytest
import requests

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "examples" / "quickstart"
ORDERS_RESOURCE = "https://orders.shop.svc"
STARTUP_TIMEOUT = 30.0

TOKEN_LINE = re.compile(r"^\s*token server\s+(http://127\.0\.0\.1:\d+)\s")
SIDECAR_LINE = re.compile(
    r"^\s*sidecar\s+(http://127\.0\.0\.1:\d+)\s+ScopePolicy\s+(\S+),\s+resource\s+(\S+)\s*$"
)
STATE_LINE = re.compile(r"^\s*state\s+\S")


def keygate_bin() -> Path:
    path = Path(os.environ.get("KEYGATE_BIN") or REPO / "target" / "debug" / "keygate")
    if not path.is_file() or not os.access(path, os.X_OK):
        pytest.fail(
            f"keygate binary not found at {path}: run `cargo build` in {REPO} "
            "or set KEYGATE_BIN to the binary",
            pytrace=False,
        )
    return path


@dataclass
class Sidecar:
    url: str
    policy: str  # ns/name
    resource: str


@dataclass
class KeygateDev:
    """A running `keygate dev`: its URLs and a way to read the generated credentials."""

    binary: Path
    config_dir: Path
    state_dir: Path
    token_server: str
    sidecars: list[Sidecar]
    process: subprocess.Popen
    output: list[str] = field(default_factory=list)

    @property
    def issuer(self) -> str:
        return self.token_server

    @property
    def token_url(self) -> str:
        return f"{self.token_server}/oauth2/token"

    @property
    def jwks_url(self) -> str:
        return f"{self.token_server}/.well-known/jwks.json"

    def sidecar_for(self, policy: str = "shop/orders") -> Sidecar:
        for s in self.sidecars:
            if s.policy == policy:
                return s
        raise KeyError(f"no sidecar for {policy}; have {[s.policy for s in self.sidecars]}")

    @property
    def sidecar(self) -> str:
        """URL of the sidecar for shop/orders."""
        return self.sidecar_for("shop/orders").url

    def credential(self, client: str, field: str) -> str:
        """One credential field (client_id, client_secret, api_key, private_key.pem)."""
        result = subprocess.run(
            [
                str(self.binary), "dev", "credentials", client,
                "--state", str(self.state_dir), "--field", field,
            ],
            capture_output=True, text=True, timeout=30,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"keygate dev credentials {client} --field {field} failed "
                f"({result.returncode}): {result.stderr.strip()}"
            )
        value = result.stdout
        # A PEM keeps its trailing newline; ids and secrets are single tokens.
        return value if field.endswith(".pem") else value.strip()


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout=10)


def start_keygate_dev(
    workdir: Path,
    customize: Optional[Callable[[Path], None]] = None,
) -> KeygateDev:
    """Copies the quickstart manifests into `workdir/config`, lets `customize(config_dir)`
    change or add manifests, starts `keygate dev` and waits for its walkthrough."""
    binary = keygate_bin()
    config_dir = workdir / "config"
    state_dir = workdir / "state"
    shutil.copytree(QUICKSTART, config_dir)
    if customize is not None:
        customize(config_dir)

    stderr_file = open(workdir / "keygate-dev.stderr", "wb")
    process = subprocess.Popen(
        [
            str(binary), "dev",
            "--config", str(config_dir),
            "--state", str(state_dir),
            "--port", "0",
            "--sidecar-port", "0",
            "--reload-interval", "200ms",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=stderr_file,
        text=True,
        bufsize=1,
    )
    stderr_file.close()  # the child keeps its own descriptor

    lines: "queue.Queue[Optional[str]]" = queue.Queue()
    output: list[str] = []

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            output.append(line)
            lines.put(line)
        lines.put(None)

    threading.Thread(target=pump, daemon=True).start()

    token_server: Optional[str] = None
    sidecars: list[Sidecar] = []
    deadline = time.monotonic() + STARTUP_TIMEOUT
    try:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise RuntimeError("timed out waiting for the keygate dev walkthrough")
            try:
                line = lines.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                raise RuntimeError(f"keygate dev exited with {process.wait()}")
            if m := TOKEN_LINE.match(line):
                token_server = m.group(1)
            elif m := SIDECAR_LINE.match(line):
                sidecars.append(Sidecar(url=m.group(1), policy=m.group(2), resource=m.group(3)))
            elif STATE_LINE.match(line) and token_server:
                break
        if not sidecars:
            raise RuntimeError("keygate dev printed no sidecar line")
        # The servers are listening when the walkthrough is printed; make sure anyway.
        while True:
            try:
                requests.get(f"{token_server}/.well-known/jwks.json", timeout=2).raise_for_status()
                break
            except requests.RequestException:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
    except Exception as e:
        _stop(process)
        stderr = (workdir / "keygate-dev.stderr").read_text(errors="replace")
        pytest.fail(
            f"could not start keygate dev: {e}\n--- stdout ---\n{''.join(output)}"
            f"--- stderr ---\n{stderr[-4000:]}",
            pytrace=False,
        )

    return KeygateDev(
        binary=binary,
        config_dir=config_dir,
        state_dir=state_dir,
        token_server=token_server,
        sidecars=sidecars,
        process=process,
        output=output,
    )


@pytest.fixture
def keygate_factory(tmp_path_factory):
    """Starts `keygate dev` instances: `keygate_factory(customize=None)`; all are stopped
    at the end of the test."""
    started: list[KeygateDev] = []

    def start(customize: Optional[Callable[[Path], None]] = None) -> KeygateDev:
        dev = start_keygate_dev(tmp_path_factory.mktemp("keygate-dev"), customize)
        started.append(dev)
        return dev

    try:
        yield start
    finally:
        for dev in started:
            _stop(dev.process)


@pytest.fixture(scope="module")
def keygate(tmp_path_factory):
    """One `keygate dev` on the unchanged quickstart manifests, shared by a test module."""
    dev = start_keygate_dev(tmp_path_factory.mktemp("keygate-dev"))
    try:
        yield dev
    finally:
        _stop(dev.process)
