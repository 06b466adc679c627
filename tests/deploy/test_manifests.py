"""The Kustomize base and overlays: they render, validate against Kubernetes' schemas, and agree with the server
(its configuration fields, ports, health service and metric names), so a rename breaks a test, not production."""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import fields
from pathlib import Path
from typing import Any

import grpc
import kubernetes_validate
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from nmtserve.settings import add_settings_arguments, env_var, settings_from_args
from nmtserve_server.config import ServeSettings
from nmtserve_server.metrics import Metrics
from nmtserve_server.scheduler import STOP_TIMEOUT
from nmtserve_server.serve import FINISH_SECONDS
from nmtserve_server.service import SERVICE_NAME

KUBERNETES_VERSION = "1.37"
OPERATOR_GROUP = "monitoring.coreos.com"
OVERLAYS = ("cpu", "gpu")
ALERTS = {"NmtserveQueueWaitHigh", "NmtserveErrorRatioHigh", "NmtserveNoReplicasReady", "NmtserveKVCacheSlotsExhausted"}


def _server_container(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "nmtserve"]
    return container


def _environment(objects: list[dict[str, Any]], find) -> dict[str, str]:
    """The server container's environment: its ConfigMaps (envFrom) and its own env entries."""
    container = _server_container(find(objects, "Deployment"))
    environment: dict[str, str] = {}
    for source in container.get("envFrom", []):
        environment.update(find(objects, "ConfigMap", source["configMapRef"]["name"])["data"])
    environment.update({e["name"]: e["value"] for e in container.get("env", [])})
    return environment


def _settings(environment: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> ServeSettings:
    """The ServeSettings `nmtserve serve` builds from exactly this environment and no flags."""
    for name in [n for n in os.environ if n.startswith("NMTSERVE_")]:
        monkeypatch.delenv(name)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    parser = argparse.ArgumentParser()
    add_settings_arguments(parser, ServeSettings)
    return settings_from_args(ServeSettings, parser.parse_args([]))


def _ports(container: dict[str, Any]) -> dict[str, int]:
    return {p["name"]: p["containerPort"] for p in container["ports"]}


@pytest.mark.parametrize("name", ["base", *OVERLAYS])
def test_every_rendered_object_passes_strict_schema_validation(rendered, name):
    checked = []
    for obj in rendered[name]:
        if obj["apiVersion"].split("/")[0] == OPERATOR_GROUP:
            continue  # custom resources: no schema in kubernetes-validate; checked field by field below
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {error}")
        # SchemaNotFoundError (an unknown kind or API version) is not caught: it fails the test.
        checked.append(obj["kind"])
    assert set(checked) >= {"Deployment", "Service", "ConfigMap", "HorizontalPodAutoscaler", "PodDisruptionBudget", "NetworkPolicy"}


@pytest.mark.parametrize("name", ["base", *OVERLAYS])
def test_prometheus_operator_objects_have_their_required_fields(rendered, find, name):
    monitor = find(rendered[name], "ServiceMonitor")
    assert monitor["apiVersion"] == f"{OPERATOR_GROUP}/v1"
    assert monitor["spec"]["selector"]["matchLabels"] and monitor["spec"]["endpoints"]
    for endpoint in monitor["spec"]["endpoints"]:
        assert set(endpoint) <= {"port", "path", "scheme", "interval", "scrapeTimeout"} and "port" in endpoint
    rule = find(rendered[name], "PrometheusRule")
    assert rule["apiVersion"] == f"{OPERATOR_GROUP}/v1"
    for group in rule["spec"]["groups"]:
        assert set(group) == {"name", "rules"} and group["rules"]
        for r in group["rules"]:
            assert ("alert" in r) != ("record" in r) and isinstance(r["expr"], str)
            assert set(r) <= {"alert", "record", "expr", "for", "labels", "annotations"}


def test_the_alerts_are_the_promised_ones_and_pass_promtool(rule_groups, rule_file, run_tool):
    alerts = {r["alert"] for g in rule_groups["groups"] for r in g["rules"] if "alert" in r}
    assert alerts == ALERTS
    for g in rule_groups["groups"]:
        for r in g["rules"]:
            assert r["labels"]["severity"] in ("warning", "critical") and r["annotations"]["summary"], r["alert"]
    result = run_tool("promtool", "check", "rules", str(rule_file))
    assert result.returncode == 0, result.stdout + result.stderr


def test_alerts_fire_on_the_series_they_watch(rule_file, run_tool, tmp_path):
    """promtool's rule unit tests (tests/deploy/alerts.test.yaml) feed each alert a failing series."""
    tests = Path(__file__).with_name("alerts.test.yaml").read_text()
    (tmp_path / "nmtserve.rules.yaml").write_text(rule_file.read_text())
    (tmp_path / "alerts.test.yaml").write_text(tests)
    result = run_tool("promtool", "test", "rules", str(tmp_path / "alerts.test.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("name", ["base", *OVERLAYS])
def test_environment_names_are_the_servers_settings_and_parse(rendered, find, name, monkeypatch):
    known = {env_var(f.name) for f in fields(ServeSettings)}
    environment = _environment(rendered[name], find)
    unknown = sorted(set(environment) - known)
    assert not unknown, f"not ServeSettings fields ({', '.join(sorted(known))}): {unknown}"
    settings = _settings(environment, monkeypatch)
    assert settings.problems() == []


@pytest.mark.parametrize("name", ["base", *OVERLAYS])
def test_ports_probes_and_termination_agree_with_the_server_settings(rendered, find, name, monkeypatch):
    objects = rendered[name]
    deployment = find(objects, "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    container = _server_container(deployment)
    settings = _settings(_environment(objects, find), monkeypatch)
    ports = _ports(container)
    assert ports == {"grpc": settings.port, "health": settings.health_port, "metrics": settings.metrics_port}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        action = container[probe]["grpc"]  # native gRPC probes: plaintext, so on the health port
        assert action["port"] == settings.health_port, probe
    assert container["startupProbe"]["grpc"]["service"] == container["readinessProbe"]["grpc"]["service"] == SERVICE_NAME
    assert container["livenessProbe"]["grpc"].get("service", "") in ("", SERVICE_NAME)
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    # The whole drain (serve.Server.stop) fits before SIGKILL, even when the decode process takes its longest to stop.
    drain = pre_stop + settings.grace_seconds + FINISH_SECONDS + STOP_TIMEOUT
    assert pod["terminationGracePeriodSeconds"] > drain
    assert all(container[probe].get("timeoutSeconds", 1) >= 3 for probe in ("startupProbe", "readinessProbe", "livenessProbe"))
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert str(settings.bundle) == mounts["bundle"]
    for init in pod["initContainers"]:
        assert {m["name"]: m["mountPath"] for m in init["volumeMounts"]}["bundle"] == mounts["bundle"]


def test_probes_name_the_health_services_the_server_reports_serving(rendered, find, start_server):
    """Every probe's service, asked on a real server's plaintext health port, answers SERVING."""
    container = _server_container(find(rendered["base"], "Deployment"))
    server = start_server(health_port=0)
    with grpc.insecure_channel(f"127.0.0.1:{server.server.health_port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            request = health_pb2.HealthCheckRequest(service=container[probe]["grpc"].get("service", ""))
            assert stub.Check(request, timeout=10).status == health_pb2.HealthCheckResponse.SERVING, probe


@pytest.mark.parametrize("name", ["base", *OVERLAYS])
def test_pods_run_restricted(rendered, find, name):
    pod = find(rendered[name], "Deployment")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] > 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    for container in pod["containers"] + pod["initContainers"]:
        sc = container["securityContext"]
        assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True, container["name"]
        assert sc["capabilities"]["drop"] == ["ALL"] and "add" not in sc["capabilities"], container["name"]
    assert pod["topologySpreadConstraints"]


@pytest.mark.parametrize("name", ["base", *OVERLAYS])
def test_selectors_services_and_policies_reach_the_pods(rendered, find, name):
    objects = rendered[name]
    deployment = find(objects, "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    container = _server_container(deployment)
    ports = _ports(container)

    def selects(selector: dict[str, str]) -> bool:
        return bool(selector) and selector.items() <= labels.items()

    assert selects(deployment["spec"]["selector"]["matchLabels"])
    assert selects(find(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"])
    policy = find(objects, "NetworkPolicy")
    assert selects(policy["spec"]["podSelector"]["matchLabels"])
    assert {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]} == {"grpc", "metrics"}
    services = {s["metadata"]["name"]: s for s in objects if s["kind"] == "Service"}
    assert services["nmtserve-headless"]["spec"]["clusterIP"] == "None"
    assert services["nmtserve"]["spec"]["type"] == "ClusterIP"
    for service in services.values():
        assert selects(service["spec"]["selector"])
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in ports and port["port"] == ports[port["targetPort"]], port
    monitor = find(objects, "ServiceMonitor")
    scraped = [s for s in services.values()
               if monitor["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()
               and any(p["name"] == e["port"] for e in monitor["spec"]["endpoints"] for p in s["spec"]["ports"])]
    assert [s["metadata"]["name"] for s in scraped] == ["nmtserve"]  # one target per pod, not one per Service
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    hpa = find(objects, "HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    budget = find(objects, "PodDisruptionBudget")["spec"]
    assert hpa["spec"]["minReplicas"] >= 2 and budget["maxUnavailable"] == 1
    assert budget["unhealthyPodEvictionPolicy"] == "AlwaysAllow"  # crash-looping pods must not block node drains
    assert "replicas" not in deployment["spec"]  # the autoscaler owns the count; `kubectl apply` must not reset it


@pytest.mark.parametrize("name", ("base", *OVERLAYS))
def test_the_autoscaler_metrics_are_ones_the_adapter_serves(rendered, find, adapter_rules, name):
    hpa = find(rendered[name], "HorizontalPodAutoscaler")
    kinds = {m["type"] for m in hpa["spec"]["metrics"]}
    # On CPU pods, CPU beside the custom metrics scales up when the adapter is unavailable; a GPU pod's CPU does not
    # follow its load, so there it is left out.
    assert kinds == ({"Pods"} if name == "gpu" else {"Pods", "Resource"})
    wanted = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"}
    served = {rule["name"]["as"] for rule in adapter_rules if set(rule["resources"]["overrides"]) == {"namespace", "pod"}}
    assert "nmtserve_queue_depth" in wanted and wanted <= served
    if name == "gpu":  # scales before texts wait: on rows in use, below the batch's rows
        (rows,) = [m["pods"]["target"]["averageValue"] for m in hpa["spec"]["metrics"]
                   if m["pods"]["metric"]["name"] == "nmtserve_kv_cache_rows_in_use"]
        environment = _environment(rendered[name], find)
        assert 0 < int(rows) < int(environment["NMTSERVE_MAX_BATCH_SIZE"])


@pytest.mark.parametrize("name", OVERLAYS)
def test_overlays_fit_their_device(rendered, find, name, monkeypatch):
    objects = rendered[name]
    container = _server_container(find(objects, "Deployment"))
    settings = _settings(_environment(objects, find), monkeypatch)
    resources = container["resources"]
    assert settings.device == name.replace("gpu", "cuda")
    assert container["image"].endswith(f"-{name}")
    if name == "gpu":
        assert resources["limits"]["nvidia.com/gpu"] == 1
    else:
        assert "nvidia.com/gpu" not in resources["limits"]
    assert resources["requests"]["memory"] and resources["limits"]["memory"]


def _cores(quantity: str | int) -> float:
    """A Kubernetes CPU quantity ("2", "1500m") in cores."""
    text = str(quantity)
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


@pytest.mark.parametrize("name", OVERLAYS)
def test_overlays_give_the_encoder_the_threads_the_server_would_on_the_pods_cores(rendered, find, name, monkeypatch):
    """The server's default (decode_loop.encoder_threads) is a thread per core but the one the decoder step keeps
    busy, from os.cpu_count(): in a pod that is the node's count, so each overlay must set the value for its CPU
    request. One more thread than that oversubscribes the pod's cores (measured slower on 2 cores, see the README)."""
    objects = rendered[name]
    container = _server_container(find(objects, "Deployment"))
    settings = _settings(_environment(objects, find), monkeypatch)
    assert settings.threads == max(1, int(_cores(container["resources"]["requests"]["cpu"])) - 1)


def _exported_series() -> set[str]:
    """Every series name the server's registry exposes (counters with _total, histograms with their parts)."""
    names = set()
    for family in Metrics().registry.collect():
        if family.name.startswith("nmtserve_"):
            suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}.get(family.type, ("",))
            names |= {family.name + suffix for suffix in suffixes}
    return names


def test_rules_dashboard_and_adapter_use_only_metrics_the_server_exports(alert_exprs, panel_exprs, adapter_rules):
    used = {}
    for where, expr in [*alert_exprs.items(), *panel_exprs, *[("adapter", r[key]) for r in adapter_rules for key in ("seriesQuery", "metricsQuery")]]:
        for name in re.findall(r"\bnmtserve_\w+", expr):
            used.setdefault(name, where)
    unknown = {name: where for name, where in used.items() if name not in _exported_series()}
    assert used and not unknown
