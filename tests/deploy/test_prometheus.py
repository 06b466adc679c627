"""A real Prometheus (Debian's package, on loopback) scrapes a real server after traffic, loads the alert rules,
and evaluates every alert, every dashboard panel and the autoscaler's adapter query through its HTTP API; the labels
the alerts and panels select and group on must be on the series it scraped."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import yaml

from nmtserve.v1 import translator_pb2 as pb
from nmtserve.v1 import translator_pb2_grpc

pytestmark = pytest.mark.e2e
TIMEOUT = 30
# Labels the Prometheus Operator gives a ServiceMonitor's targets; the rules and the dashboard select on them.
TARGET_LABELS = {"namespace": "nmtserve", "pod": "nmtserve-0", "service": "nmtserve"}
RATE_INTERVAL = "1m"  # what Grafana's $__rate_interval stands for here
# Series the rules read from other exporters (kube-state-metrics), which no scrape here has.
OTHER_EXPORTERS = {"kube_deployment_status_replicas_available"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Prometheus:
    """A Prometheus server process and its HTTP API."""

    def __init__(self, process: subprocess.Popen[bytes], port: int, log: Path):
        self.process, self.url, self.log = process, f"http://127.0.0.1:{port}", log

    def get(self, path: str, **params: str) -> Any:
        """One API call's `data`; fails on an error status."""
        url = f"{self.url}{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                body = json.load(response)
        except urllib.error.HTTPError as error:
            pytest.fail(f"{path} {params}: HTTP {error.code}: {error.read().decode()}")
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's result vector (it fails the test when Prometheus rejects the expression)."""
        data = self.get("/api/v1/query", query=expr)
        assert data["resultType"] == "vector", (expr, data["resultType"])
        return data["result"]

    def wait_for(self, what: str, condition: Callable[[], bool], timeout: float = TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if self.process.poll() is not None:
                pytest.fail(f"prometheus exited with {self.process.returncode}:\n{self.log.read_text()}")
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.2)


def _translate(address: str, texts: list[str]) -> None:
    with grpc.insecure_channel(address) as channel:
        stub = translator_pb2_grpc.TranslatorStub(channel)
        for i in range(0, len(texts), 2):
            stub.Translate(pb.TranslateRequest(texts=texts[i : i + 2]), timeout=TIMEOUT)
        *_, final = stub.TranslateStream(pb.TranslateStreamRequest(text=texts[0]), timeout=TIMEOUT)
        assert final.HasField("final")


@pytest.fixture(scope="module")
def prometheus(start_server, test_texts, rule_file, tool, tmp_path_factory) -> Iterator[Prometheus]:
    """Prometheus scraping a fresh server every second, with the alert rules loaded, after two rounds of traffic."""
    server = start_server()
    _translate(server.address, test_texts[:6])
    directory = tmp_path_factory.mktemp("prometheus")
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rule_file)],
        "scrape_configs": [{
            "job_name": "nmtserve",
            "static_configs": [{"targets": [f"127.0.0.1:{server.server.metrics_port}"], "labels": TARGET_LABELS}],
        }],
    }
    (directory / "prometheus.yml").write_text(yaml.safe_dump(config))
    port, log = _free_port(), directory / "prometheus.log"
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            [tool("prometheus"), f"--config.file={directory / 'prometheus.yml'}", f"--storage.tsdb.path={directory / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=subprocess.DEVNULL, stderr=log_file,
        )
    prom = Prometheus(process, port, log)
    try:
        prom.wait_for("the first scrape", lambda: _answers(prom) and bool(prom.query('up{job="nmtserve"} == 1')))
        # Traffic between two scrapes, so that rate() over the window sees the counters move.
        _translate(server.address, test_texts[6:12])
        prom.wait_for("a scrape after the second round of traffic",
                      lambda: bool(prom.query('rate(nmtserve_requests_total{job="nmtserve"}[1m]) > 0')))
        yield prom
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


def _answers(prom: Prometheus) -> bool:
    try:
        with urllib.request.urlopen(f"{prom.url}/-/ready", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def test_every_alert_rule_evaluates_and_none_fires_on_a_healthy_server(prometheus, alert_exprs):
    for name, expr in alert_exprs.items():
        prometheus.query(expr)  # Prometheus accepts and evaluates it
    prometheus.wait_for("every rule evaluated by Prometheus itself", lambda: all(
        not r["lastEvaluation"].startswith("0001-") for g in prometheus.get("/api/v1/rules")["groups"] for r in g["rules"]))
    rules = [r for g in prometheus.get("/api/v1/rules")["groups"] for r in g["rules"]]
    assert {r["name"] for r in rules} == set(alert_exprs)
    assert [(r["name"], r["health"], r.get("lastError")) for r in rules if r["health"] != "ok"] == []
    assert prometheus.get("/api/v1/alerts")["alerts"] == []


def _labels_read(expr: str) -> dict[str, set[str]]:
    """The labels a PromQL expression reads, by metric: each selector's matchers, and the labels the expression groups
    or matches by (by, without, on, ignoring, group_left/right), counted against every selector in it. That holds for
    these expressions, each of which reads one metric or joins metrics that share the labels it matches on; a rule
    that groups one side by a label the other lacks would fail here, and needs a finer parse."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # string literals out: their content is no syntax
    grouped = {label.strip() for labels in re.findall(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", expr)
               for label in labels.split(",") if label.strip()}
    read: dict[str, set[str]] = {}
    for metric, matchers in re.findall(r"\b([a-zA-Z_:][\w:]*)\s*\{([^}]*)\}", expr):
        read.setdefault(metric, set()).update(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers), grouped)
    return read


def test_every_label_the_rules_and_panels_read_is_on_the_scraped_series(prometheus, alert_exprs, panel_exprs):
    """A matcher or grouping on a label the server does not export (status= for code=) selects nothing, and an alert
    on it never fires; promtool's unit tests cannot tell, as they feed series written by hand with the same label."""
    missing = {}
    for where, expr in [*alert_exprs.items(), *panel_exprs]:
        read = {metric: labels for metric, labels in _labels_read(expr).items() if metric not in OTHER_EXPORTERS}
        assert read, f"{where}: no selector found in {expr}"
        for metric, labels in read.items():
            series = prometheus.get("/api/v1/series", **{"match[]": f'{metric}{{job="nmtserve"}}'})
            assert series, f"{where}: nothing scraped for {metric}"
            lacking = sorted(label for label in labels if not all(label in s for s in series))
            if lacking:
                missing[f"{where}: {metric}"] = lacking
    assert missing == {}


def _resolve(expr: str, variables: dict[str, str]) -> str:
    """A panel expression with Grafana's variables replaced by values."""
    expr = expr.replace("$__rate_interval", RATE_INTERVAL)
    for name, value in variables.items():
        expr = expr.replace(f"${{{name}}}", value).replace(f"${name}", value)
    assert "$" not in expr, f"unresolved variable in {expr}"
    return expr


def _variables(prometheus: Prometheus, dashboard: dict[str, Any]) -> dict[str, str]:
    """Each dashboard variable's value, found by its own label_values() query against Prometheus."""
    values: dict[str, str] = {}
    for variable in dashboard["templating"]["list"]:
        match = re.fullmatch(r"label_values\((.+), (\w+)\)", variable["query"]["query"])
        assert match, variable["query"]
        selector, label = _resolve(match.group(1), values), match.group(2)
        series = prometheus.get("/api/v1/series", **{"match[]": selector})
        found = sorted({s[label] for s in series if label in s})
        assert found == [TARGET_LABELS[label]], (variable["name"], found)
        values[variable["name"]] = found[0]
    return values


def test_every_dashboard_panel_query_evaluates(prometheus, dashboard, panel_exprs):
    variables = _variables(prometheus, dashboard)
    empty = [title for title, expr in panel_exprs if not prometheus.query(_resolve(expr, variables))]
    # Each panel draws something after traffic; the request rate shows the traffic itself.
    assert empty == []
    (request_rate,) = [expr for title, expr in panel_exprs if title.startswith("Requests per second")]
    by_code = {s["metric"]["code"]: float(s["value"][1]) for s in prometheus.query(_resolve(request_rate, variables))}
    assert by_code["OK"] > 0


def test_the_autoscaler_metric_query_of_the_adapter_returns_one_value_per_pod(prometheus, adapter_rules):
    for rule in adapter_rules:
        assert prometheus.get("/api/v1/series", **{"match[]": rule["seriesQuery"]}), rule["seriesQuery"]
        series = rule["seriesQuery"].split("{")[0]  # what the adapter puts for <<.Series>>: the series it found
        expr = (rule["metricsQuery"].replace("<<.Series>>", series)
                .replace("<<.LabelMatchers>>", f'namespace="{TARGET_LABELS["namespace"]}",pod=~"{TARGET_LABELS["pod"]}"')
                .replace("<<.GroupBy>>", "pod"))
        result = prometheus.query(expr)
        assert [s["metric"] for s in result] == [{"pod": TARGET_LABELS["pod"]}], expr
