"""The Helm chart (helm/betrace), rendered by real Helm: Helm v4's Go library, embedded in the
`helm-python-sdk` wheel (no helm binary, no cluster, no network).

Every object of every rendered scenario is validated against Kubernetes' own OpenAPI schemas
(`kubernetes-validate`, strict: unknown fields are errors) for the oldest and newest Kubernetes
versions the chart supports; the custom resources (PodMonitor, PrometheusRule, cert-manager's
Certificate and Issuer) have no built-in schema, so they are checked against the shape written
here. Beyond validity, the rendered pieces are run for real: the rules ConfigMap through
`betrace check` / `betrace test`, the sidecar container's own command line and environment as
`betrace serve` (against a real Redis with a password for the Secret-composed URL, and catching
a violation with the default rules), and the injection mode's webhook with its Helm-generated
certificate, answering an AdmissionReview whose patched pod is again a valid Pod.

Needs the `test` extras (helm-python-sdk, kubernetes-validate): outside CI a missing one skips,
in CI (CI=true) it fails.
"""

from __future__ import annotations

import base64
import copy
import json
import os
import re
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jsonschema
import pytest
import yaml
from chart import (
    CHART,
    NAMESPACE,
    RELEASE,
    REPO,
    Rendered,
    container,
    container_env,
    flag,
    helm,
    require,
)
from chart import render as render_chart
from processes import closed_at_end, free_port, stop

ALERTS = CHART / "files" / "alerts.yaml"
DOCKERFILE = REPO / "Dockerfile"
# The chart says kubeVersion >=1.25; validate against that and the newest schemas shipped.
K8S_VERSIONS = ("1.25.0", "1.37.0")
NATIVE_SIDECAR_VERSIONS = ("1.29.0", "1.37.0")  # restartPolicy on init containers
CUSTOM_KINDS = {"PodMonitor", "PrometheusRule", "Certificate", "Issuer"}

kubernetes_validate = require("kubernetes_validate")


# --- scenarios -----------------------------------------------------------------------------------

TEMPO = {"otlp_grpc/tempo": {"endpoint": "tempo.observability:4317", "tls": {"insecure": True}}}
MONITORING = {"podMonitor": {"enabled": True}, "prometheusRule": {"enabled": True}}

SCENARIOS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "collector-exporters": {
        "collector": {"exporters": {**TEMPO, "debug": {"verbosity": "basic"}},
                      "pipelineExporters": ["otlp_grpc/tempo"]}},
    "collector-redis-bundled": {"redis": {"bundled": {"enabled": True}},
                                "collector": {"replicas": 3}},
    "collector-signals-db": {
        "signalsDb": {"url": "postgresql://betrace@pg.data:5432/signals",
                      "existingSecret": "pg-auth"}},
    "collector-routing": {
        "routing": {"alertmanager": {"url": "http://alertmanager.monitoring:9093"},
                    "traceUrl": "https://grafana.example/explore?trace={trace_id}",
                    "webhook": {"url": "https://hooks.example/betrace",
                                "existingSecret": "hook-key"}}},
    "injection-signals-db-url-secret": {
        "mode": "injection", "webhook": {"certManager": {"enabled": True}},
        "signalsDb": {"existingSecret": "pg-auth", "urlKey": "url"}},
    "collector-redis-external-secret": {
        "redis": {"url": "redis://redis-master.data:6379/0", "existingSecret": "redis-auth",
                  "passwordKey": "redis-password"},
        "collector": {"replicas": 3, "exporters": TEMPO}},
    "collector-monitoring": {"metrics": MONITORING, "collector": {"exporters": TEMPO}},
    "collector-monitoring-token": {"metrics": MONITORING, "sidecar": {
        "metricsToken": {"existingSecret": "betrace-metrics", "key": "scrape-token"}}},
    "injection-cert-manager": {"mode": "injection", "webhook": {"certManager": {"enabled": True}}},
    "injection-cert-manager-issuer": {
        "mode": "injection", "webhook": {"certManager": {
            "enabled": True, "issuerRef": {"name": "corp-ca", "kind": "ClusterIssuer"}}}},
    "injection-generated-certs": {"mode": "injection",
                                  "webhook": {"namespaces": ["shop", "payments"]}},
    "injection-native-sidecar": {"mode": "injection", "webhook": {"nativeSidecar": True}},
    "injection-monitoring-redis": {
        "mode": "injection", "metrics": MONITORING,
        "redis": {"url": "rediss://betrace@redis.data:6380/1", "existingSecret": "redis-auth"}},
    "existing-rules-configmap": {"existingRulesConfigMap": "my-rules"},
}


# --- rendering -----------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def chart() -> Iterator[Any]:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


@pytest.fixture(scope="session")
def render() -> Callable[..., Rendered]:
    return render_chart


@pytest.fixture(scope="session")
def scenarios() -> dict[str, Rendered]:
    return {name: render_chart(values) for name, values in SCENARIOS.items()}


def env_of(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in c.get("env", [])}


# --- every object is a valid Kubernetes object ---------------------------------------------------

DURATION = {"type": "string", "pattern": r"^([0-9]+(ms|s|m|h))+$"}
GO_DURATION = {"type": "string", "pattern": r"^([0-9]+(\.[0-9]+)?(ns|us|ms|s|m|h))+$"}
STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
METADATA = {"type": "object", "required": ["name", "namespace"],
            "properties": {"name": {"type": "string", "maxLength": 253,
                                    "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"},
                           "namespace": {"type": "string"}, "labels": STR_MAP,
                           "annotations": STR_MAP}}
SELECTOR = {"type": "object", "additionalProperties": False,
            "properties": {"matchLabels": STR_MAP, "matchExpressions": {"type": "array"}}}


def crd(api_version: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"type": "object", "additionalProperties": False,
            "required": ["apiVersion", "kind", "metadata", "spec"],
            "properties": {"apiVersion": {"const": api_version}, "kind": {"type": "string"},
                           "metadata": METADATA, "spec": spec}}


SECRET_KEY = {"type": "object", "additionalProperties": False, "required": ["key"],
              "properties": {"name": {"type": "string"}, "key": {"type": "string"},
                             "optional": {"type": "boolean"}}}

# The fields of these custom resources that the chart uses, as their CRDs define them
# (monitoring.coreos.com/v1 of prometheus-operator, cert-manager.io/v1).
CUSTOM_SCHEMAS = {
    "PodMonitor": crd("monitoring.coreos.com/v1", {
        "type": "object", "additionalProperties": False,
        "required": ["selector", "podMetricsEndpoints"],
        "properties": {
            "selector": SELECTOR,
            "namespaceSelector": {"type": "object", "additionalProperties": False,
                                  "properties": {"any": {"type": "boolean"},
                                                 "matchNames": {"type": "array",
                                                                "items": {"type": "string"}}}},
            "podMetricsEndpoints": {"type": "array", "minItems": 1, "items": {
                "type": "object", "additionalProperties": False, "required": ["port"],
                "properties": {"port": {"type": "string"}, "path": {"type": "string"},
                               "interval": DURATION, "scrapeTimeout": DURATION,
                               "authorization": {
                                   "type": "object", "additionalProperties": False,
                                   "properties": {"type": {"type": "string"},
                                                  "credentials": SECRET_KEY}}}}}}}),
    "PrometheusRule": crd("monitoring.coreos.com/v1", {
        "type": "object", "additionalProperties": False, "required": ["groups"],
        "properties": {"groups": {"type": "array", "minItems": 1, "items": {
            "type": "object", "required": ["name", "rules"],
            "properties": {"name": {"type": "string", "minLength": 1},
                           "interval": DURATION, "limit": {"type": "integer"},
                           "rules": {"type": "array", "items": {
                               "type": "object", "additionalProperties": False,
                               "required": ["expr"],
                               "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
                               "properties": {
                                   "alert": {"type": "string"}, "record": {"type": "string"},
                                   "expr": {"type": ["string", "integer"]},
                                   "for": DURATION, "keep_firing_for": DURATION,
                                   "labels": STR_MAP, "annotations": STR_MAP}}}}}}}}),
    "Certificate": crd("cert-manager.io/v1", {
        "type": "object", "additionalProperties": False,
        "required": ["secretName", "issuerRef", "dnsNames"],
        "properties": {
            "secretName": {"type": "string"}, "commonName": {"type": "string", "maxLength": 64},
            "dnsNames": {"type": "array", "minItems": 1, "items": {"type": "string"}},
            "duration": GO_DURATION, "renewBefore": GO_DURATION,
            "usages": {"type": "array", "items": {"enum": [
                "signing", "digital signature", "content commitment", "key encipherment",
                "key agreement", "data encipherment", "cert sign", "crl sign", "encipher only",
                "decipher only", "any", "server auth", "client auth", "code signing",
                "email protection", "s/mime", "ipsec end system", "ipsec tunnel", "ipsec user",
                "timestamping", "ocsp signing", "microsoft sgc", "netscape sgc"]}},
            "privateKey": {"type": "object", "additionalProperties": False, "properties": {
                "algorithm": {"enum": ["RSA", "ECDSA", "Ed25519"]},
                "size": {"type": "integer"},
                "encoding": {"enum": ["PKCS1", "PKCS8"]},
                "rotationPolicy": {"enum": ["Never", "Always"]}}},
            "issuerRef": {"type": "object", "additionalProperties": False, "required": ["name"],
                          "properties": {"name": {"type": "string", "minLength": 1},
                                         "kind": {"type": "string"},
                                         "group": {"type": "string"}}}}}),
    "Issuer": crd("cert-manager.io/v1", {
        "type": "object", "minProperties": 1, "maxProperties": 1,
        "properties": {"selfSigned": {"type": "object"}, "ca": {"type": "object"},
                       "acme": {"type": "object"}, "vault": {"type": "object"},
                       "venafi": {"type": "object"}},
        "additionalProperties": False}),
}


def validate_object(obj: dict[str, Any], versions: tuple[str, ...] = K8S_VERSIONS) -> None:
    if obj["kind"] in CUSTOM_KINDS:
        jsonschema.validate(obj, CUSTOM_SCHEMAS[obj["kind"]])
        return
    for version in versions:
        kubernetes_validate.validate(obj, version, strict=True)


def test_kubernetes_validate_has_the_schemas_used() -> None:
    from kubernetes_validate import utils

    versions = utils.all_versions()
    for version in K8S_VERSIONS + NATIVE_SIDECAR_VERSIONS:
        assert version in versions


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_every_rendered_object_is_valid(scenarios: dict[str, Rendered], scenario: str) -> None:
    rendered = scenarios[scenario]
    assert rendered.objects
    for obj in rendered.objects:
        try:
            validate_object(obj)
        except Exception as exc:  # name the object: a bare schema error is hard to place
            raise AssertionError(f"{scenario}: {obj['kind']} {obj['metadata'].get('name')}: "
                                 f"{exc}") from exc
        if obj["kind"] != "MutatingWebhookConfiguration":  # cluster-scoped
            assert obj["metadata"]["namespace"] in (NAMESPACE, "shop", "payments"), obj
    # The injected sidecar is a container too: validate it inside a Pod that uses it, where the
    # webhook puts it (a native sidecar among the init containers).
    if any(o["metadata"]["name"] == f"{RELEASE}-sidecar-template"
           for o in rendered.all("ConfigMap")):
        template = rendered.sidecar_template()
        sidecar = template["container"]
        native = sidecar.get("restartPolicy") == "Always"
        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": "app", "namespace": "shop"},
               "spec": {"containers": [{"name": "app", "image": "example/app:1"},
                                       *([] if native else [sidecar])],
                        "initContainers": [sidecar] if native else [],
                        "volumes": template["volumes"]}}
        validate_object(pod, NATIVE_SIDECAR_VERSIONS if native else K8S_VERSIONS)


def test_native_sidecar_is_a_template_option(scenarios: dict[str, Rendered],
                                             tmp_path: Path) -> None:
    from sidecar.k8s.webhook import load_template

    assert "restartPolicy" not in scenarios["injection-generated-certs"].sidecar()
    native = scenarios["injection-native-sidecar"]
    assert native.sidecar()["restartPolicy"] == "Always"
    path = tmp_path / "sidecar.yaml"  # and the webhook takes the rendered template as it is
    path.write_text(native.get("ConfigMap", f"{RELEASE}-sidecar-template")["data"]["sidecar.yaml"])
    assert load_template(str(path)).container["restartPolicy"] == "Always"


def test_names_are_unique_per_kind_and_namespace(scenarios: dict[str, Rendered]) -> None:
    for scenario, rendered in scenarios.items():
        keys = [(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"])
                for o in rendered.objects]
        assert len(keys) == len(set(keys)), (scenario, keys)


def test_default_render_is_collector_mode_with_memory_store(
        scenarios: dict[str, Rendered]) -> None:
    rendered = scenarios["defaults"]
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in rendered.objects)
    assert kinds == [("ConfigMap", "betrace-collector-config"),
                     ("ConfigMap", "betrace-dashboard"),
                     ("ConfigMap", "betrace-rules"),
                     ("Deployment", "betrace-collector"),
                     ("Service", "betrace-collector"),
                     ("ServiceAccount", "betrace")]
    sidecar = rendered.sidecar()
    assert env_of(sidecar)["BETRACE_STORE"]["value"] == "memory"
    assert "BETRACE_REDIS_PASSWORD" not in env_of(sidecar)
    assert "in memory" in rendered.notes


# --- security defaults ---------------------------------------------------------------------------

def assert_hardened(where: str, c: dict[str, Any]) -> None:
    sc = c.get("securityContext") or {}
    assert sc.get("runAsNonRoot") is True, where
    assert sc.get("runAsUser") == 65532, where
    assert sc.get("readOnlyRootFilesystem") is True, where
    assert sc.get("allowPrivilegeEscalation") is False, where
    assert sc.get("capabilities", {}).get("drop") == ["ALL"], where
    assert not sc.get("capabilities", {}).get("add"), where
    assert sc.get("seccompProfile") == {"type": "RuntimeDefault"}, where
    assert not sc.get("privileged"), where
    resources = c.get("resources") or {}
    for part in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(resources.get(part, {})), (where, resources)
    assert c.get("livenessProbe") and c.get("readinessProbe"), where


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_every_container_has_the_security_defaults(scenarios: dict[str, Rendered],
                                                   scenario: str) -> None:
    rendered = scenarios[scenario]
    specs = rendered.pod_specs()
    assert specs
    for name, spec in specs:
        pod_sc = spec["securityContext"]
        assert pod_sc["runAsNonRoot"] is True and pod_sc["runAsUser"] == 65532, name
        assert pod_sc["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert spec["automountServiceAccountToken"] is False, name
        assert not spec.get("hostNetwork") and not spec.get("hostPID"), name
        for c in spec["containers"] + spec.get("initContainers", []):
            assert_hardened(f"{scenario}: {name}/{c['name']}", c)
    # The injected container carries its own: the pod it lands in may set nothing.
    assert_hardened(f"{scenario}: sidecar", rendered.sidecar())


def test_sidecar_probes_are_on_the_metrics_port(scenarios: dict[str, Rendered]) -> None:
    for scenario, rendered in scenarios.items():
        sidecar = rendered.sidecar()
        ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
        assert ports == {"metrics": 9464}, scenario
        assert sidecar["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": 9464}
        assert sidecar["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": 9464}
        # The kubelet and Prometheus reach the pod IP, not loopback.
        assert flag(sidecar["args"], "metrics-listen") == "$(BETRACE_POD_IP):9464"
        assert env_of(sidecar)["BETRACE_POD_IP"]["valueFrom"] == {
            "fieldRef": {"fieldPath": "status.podIP"}}
        # OTLP stays inside the pod.
        assert flag(sidecar["args"], "listen") == "127.0.0.1:4319"


def test_metrics_stay_on_loopback_when_nothing_outside_the_pod_needs_them(
        render: Callable[..., Rendered]) -> None:
    sidecar = render({"sidecar": {"livenessProbe": None, "readinessProbe": None}}).sidecar()
    assert flag(sidecar["args"], "metrics-listen") == "127.0.0.1:9464"
    assert "ports" not in sidecar and "BETRACE_POD_IP" not in env_of(sidecar)
    assert flag(sidecar["args"], "metrics-token-file") is None


def test_a_metrics_token_is_mounted_asked_for_and_sent_by_the_pod_monitor(
        scenarios: dict[str, Rendered]) -> None:
    rendered = scenarios["collector-monitoring-token"]
    sidecar = rendered.sidecar()
    path = flag(sidecar["args"], "metrics-token-file")
    assert path == "/etc/betrace/metrics-token/scrape-token"
    [mount] = [m for m in sidecar["volumeMounts"] if m["name"] == "betrace-metrics-token"]
    assert path.startswith(mount["mountPath"] + "/") and mount["readOnly"]
    pod = rendered.collector_pod()
    [volume] = [v for v in pod["volumes"] if v["name"] == "betrace-metrics-token"]
    assert volume["secret"] == {"secretName": "betrace-metrics"}
    (monitor,) = rendered.all("PodMonitor")
    endpoint, collector_endpoint = monitor["spec"]["podMetricsEndpoints"]
    assert "authorization" not in collector_endpoint  # the collector's own metrics
    assert endpoint["authorization"] == {
        "type": "Bearer", "credentials": {"name": "betrace-metrics", "key": "scrape-token"}}
    # the probes' endpoints ask for no token
    assert "httpHeaders" not in sidecar["readinessProbe"]["httpGet"]


def test_large_limits_are_rendered_as_integers(render: Callable[..., Rendered]) -> None:
    """Helm reads numbers from values as floats, and prints 16777216 as 1.6777216e+07, which
    `betrace serve` refuses."""
    limits = {"maxTraces": 16777216, "maxSpansPerTrace": 2000000, "maxTraceIds": 50000000}
    args = render({"sidecar": limits}).sidecar()["args"]
    assert (flag(args, "max-traces"), flag(args, "max-spans-per-trace"),
            flag(args, "max-trace-ids")) == ("16777216", "2000000", "50000000")


def test_a_probe_can_be_turned_off(render: Callable[..., Rendered]) -> None:
    sidecar = render({"sidecar": {"readinessProbe": None}}).sidecar()
    assert "readinessProbe" not in sidecar and sidecar["livenessProbe"]


@pytest.mark.parametrize("value, passed", [
    (None, "16MiB"), ("512KiB", "512KiB"), (16_777_216, "16777216")])
def test_max_trace_bytes_takes_a_size_or_a_number(render: Callable[..., Rendered],
                                                  value: Any, passed: str) -> None:
    """A number in values is a float to Helm, which would print 16777216 as 1.6777216e+07."""
    values = {"sidecar": {"maxTraceBytes": value}} if value is not None else None
    assert flag(render(values).sidecar()["args"], "max-trace-bytes") == passed


def test_a_max_trace_bytes_that_is_no_size_is_refused_by_the_schema(
        render: Callable[..., Rendered]) -> None:
    with pytest.raises(helm.HelmError) as caught:
        render({"sidecar": {"maxTraceBytes": "lots"}})
    assert "maxTraceBytes" in str(caught.value)


# --- rules ---------------------------------------------------------------------------------------

def betrace(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sidecar", *args], cwd=REPO, text=True,
                          capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)


def test_default_rules_pass_betrace_check_and_their_examples(
        scenarios: dict[str, Rendered], tmp_path: Path) -> None:
    rules = scenarios["defaults"].write_rules(tmp_path / "rules")
    assert sorted(p.name for p in rules.iterdir()) == ["payments.yaml", "security.yaml"]
    check = betrace("check", str(rules))
    assert check.returncode == 0, check.stdout + check.stderr
    tested = betrace("test", str(rules))
    assert tested.returncode == 0, tested.stdout + tested.stderr
    ids = {r["id"] for f in rules.iterdir() for r in yaml.safe_load(f.read_text())["rules"]}
    assert ids == {"payment-retry-idempotency", "admin-action-audit-log"}


def test_default_rules_are_the_catalog_rules(scenarios: dict[str, Rendered],
                                             tmp_path: Path) -> None:
    """The shipped values copy catalog rules: same condition, severity and signal."""
    rules = scenarios["defaults"].write_rules(tmp_path / "rules")
    catalog = {r["id"]: r for f in ("payments.yaml", "security.yaml")
               for r in yaml.safe_load((REPO / "rules" / f).read_text())["rules"]}
    for f in rules.iterdir():
        for rule in yaml.safe_load(f.read_text())["rules"]:
            original = catalog[rule["id"]]
            for key in ("name", "severity", "condition", "when", "for_each", "always", "never",
                        "signal"):
                assert rule.get(key) == original.get(key), (rule["id"], key)


def test_a_bad_rule_in_values_fails_betrace_check(render: Callable[..., Rendered],
                                                  tmp_path: Path) -> None:
    bad = "rules:\n  - id: broken\n    name: Broken\n    severity: high\n" \
          "    condition: trace.has(payment.charge).where(amount >)\n"
    rules = render({"rules": {"broken.yaml": bad}}).write_rules(tmp_path / "rules")
    check = betrace("check", str(rules))
    assert check.returncode != 0
    assert "broken.yaml" in check.stdout + check.stderr


def test_rules_are_mounted_as_a_directory_and_hot_reloaded(
        render: Callable[..., Rendered], scenarios: dict[str, Rendered]) -> None:
    rendered = scenarios["defaults"]
    spec = rendered.collector_pod()
    sidecar = container(spec, "betrace")
    assert flag(sidecar["args"], "rules") == "/etc/betrace/rules"
    mount = [m for m in sidecar["volumeMounts"] if m["mountPath"] == "/etc/betrace/rules"]
    # A subPath mount would never see a ConfigMap update.
    assert mount == [{"name": "betrace-rules", "mountPath": "/etc/betrace/rules",
                      "readOnly": True}]
    volume = [v for v in spec["volumes"] if v["name"] == "betrace-rules"]
    assert volume == [{"name": "betrace-rules", "configMap": {"name": f"{RELEASE}-rules"}}]

    # Changing the rules changes the ConfigMap only: the pods are not rolled.
    # Helm merges values: the shipped files are dropped by setting them to null.
    other = render({"rules": {"only.yaml": "rules: []\n", "payments.yaml": None,
                              "security.yaml": None}})
    assert other.get("ConfigMap", f"{RELEASE}-rules")["data"] == {"only.yaml": "rules: []\n"}
    assert other.get("Deployment", f"{RELEASE}-collector") == \
        rendered.get("Deployment", f"{RELEASE}-collector")
    # ... while a collector config change rolls them (the collector does not reload).
    changed = render({"collector": {"exporters": TEMPO}})
    annotation = "checksum/collector-config"

    def checksum(r: Rendered) -> str:
        deployment = r.get("Deployment", f"{RELEASE}-collector")
        return str(deployment["spec"]["template"]["metadata"]["annotations"][annotation])

    assert checksum(changed) != checksum(rendered)


def test_existing_rules_configmap_is_used_instead(scenarios: dict[str, Rendered]) -> None:
    rendered = scenarios["existing-rules-configmap"]
    assert not [o for o in rendered.all("ConfigMap") if o["metadata"]["name"].endswith("-rules")]
    spec = rendered.collector_pod()
    assert {"name": "betrace-rules", "configMap": {"name": "my-rules"}} in spec["volumes"]


# --- collector mode ------------------------------------------------------------------------------

def test_collector_config_feeds_the_sidecar_and_the_users_exporters(
        scenarios: dict[str, Rendered]) -> None:
    rendered = scenarios["collector-exporters"]
    config = rendered.collector_config()
    assert set(config["receivers"]["otlp"]["protocols"]) == {"grpc", "http"}
    assert config["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"].endswith(":4317")
    assert config["receivers"]["otlp"]["protocols"]["http"]["endpoint"].endswith(":4318")
    assert "batch" in config["processors"]
    betrace_exporter = config["exporters"]["otlp_grpc/betrace"]
    assert betrace_exporter["endpoint"] == "127.0.0.1:4319"
    assert betrace_exporter["tls"] == {"insecure": True}
    assert betrace_exporter["compression"] == "none"  # loopback: gzip is CPU for nothing
    assert betrace_exporter["retry_on_failure"]["enabled"] is True
    assert betrace_exporter["sending_queue"]["enabled"] is True
    assert betrace_exporter["sending_queue"]["queue_size"] == 5000
    # The user's exporters pass through as written; only the listed ones are in the pipeline.
    assert config["exporters"]["otlp_grpc/tempo"] == TEMPO["otlp_grpc/tempo"]
    assert config["exporters"]["debug"] == {"verbosity": "basic"}
    traces = config["service"]["pipelines"]["traces"]
    assert traces["receivers"] == ["otlp"]
    assert traces["processors"][-1] == "batch"
    assert traces["exporters"] == ["otlp_grpc/tempo", "otlp_grpc/betrace"]
    assert set(traces["processors"]) <= set(config["processors"])
    assert set(config["service"]["extensions"]) <= set(config["extensions"])

    # Without pipelineExporters, every exporter given goes in the pipeline.
    config = scenarios["collector-monitoring"].collector_config()
    assert config["service"]["pipelines"]["traces"]["exporters"] == ["otlp_grpc/tempo", "otlp_grpc/betrace"]
    config = scenarios["defaults"].collector_config()
    assert config["service"]["pipelines"]["traces"]["exporters"] == ["otlp_grpc/betrace"]


def test_collector_pod_runs_the_collector_and_the_sidecar(scenarios: dict[str, Rendered]) -> None:
    rendered = scenarios["collector-exporters"]
    deployment = rendered.get("Deployment", f"{RELEASE}-collector")
    spec = deployment["spec"]["template"]["spec"]
    assert [c["name"] for c in spec["containers"]] == ["otel-collector", "betrace"]
    collector = container(spec, "otel-collector")
    assert re.fullmatch(r"otel/opentelemetry-collector-contrib:\d+\.\d+\.\d+", collector["image"])
    assert collector["args"] == ["--config=/etc/otelcol/config.yaml"]
    config_volume = [v for v in spec["volumes"] if v["name"] == "collector-config"][0]
    assert config_volume["configMap"]["name"] == f"{RELEASE}-collector-config"
    sidecar = container(spec, "betrace")
    assert sidecar["args"][0] == "serve"
    # Violation spans go back through the collector's own OTLP receiver.
    assert flag(sidecar["args"], "export-otlp") == "127.0.0.1:4317"

    service = rendered.get("Service", f"{RELEASE}-collector")
    pod_ports = {p["name"]: p["containerPort"] for c in spec["containers"] for p in c["ports"]}
    by_port = {p["port"]: pod_ports[p["targetPort"]] for p in service["spec"]["ports"]}
    assert by_port == {4317: 4317, 4318: 4318}
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()


@pytest.mark.parametrize("values, message", [
    ({"collector": {"exporters": {"otlp_grpc/betrace": {"endpoint": "x:4317"}}}},
     "otlp_grpc/betrace"),
    ({"collector": {"exporters": {"otlp/betrace": {"endpoint": "x:4317"}}}}, "otlp/betrace"),
    ({"collector": {"exporters": TEMPO, "pipelineExporters": ["otlp/jaeger"]}}, "otlp/jaeger"),
    ({"mode": "injection", "webhook": {"namespaces": [NAMESPACE]}}, "release namespace"),
])
def test_inconsistent_values_fail_with_a_message(render: Callable[..., Rendered],
                                                 values: dict[str, Any], message: str) -> None:
    with pytest.raises(helm.HelmError) as caught:
        render(values)
    assert message in str(caught.value)


# --- Redis ---------------------------------------------------------------------------------------

def test_bundled_redis_is_small_noeviction_and_wired_in(scenarios: dict[str, Rendered]) -> None:
    rendered = scenarios["collector-redis-bundled"]
    deployment = rendered.get("Deployment", f"{RELEASE}-redis")
    redis_container = container(deployment["spec"]["template"]["spec"], "redis")
    args = redis_container["args"]
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction"
    assert args[args.index("--maxmemory") + 1]
    # an acknowledged span survives a Redis crash: the append-only file, in the pod's emptyDir
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--appendfsync") + 1] == "always"
    [data] = deployment["spec"]["template"]["spec"]["volumes"]
    assert data["emptyDir"]["sizeLimit"] == "512Mi"
    assert redis_container["resources"]["limits"]["memory"]
    service = rendered.get("Service", f"{RELEASE}-redis")
    assert service["spec"]["ports"][0]["port"] == 6379
    store = env_of(rendered.sidecar())["BETRACE_STORE"]["value"]
    assert store == f"redis://{RELEASE}-redis.{NAMESPACE}.svc.cluster.local:6379/0"
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert "bundled Redis" in rendered.notes


def test_external_redis_password_comes_from_the_secret(scenarios: dict[str, Rendered]) -> None:
    rendered = scenarios["collector-redis-external-secret"]
    sidecar = rendered.sidecar()
    entries = sidecar["env"]
    names = [e["name"] for e in entries]
    # Kubernetes expands $(VAR) only from variables defined before.
    assert names.index("BETRACE_REDIS_PASSWORD") < names.index("BETRACE_STORE")
    assert env_of(sidecar)["BETRACE_REDIS_PASSWORD"]["valueFrom"] == {
        "secretKeyRef": {"name": "redis-auth", "key": "redis-password"}}
    # The password never appears in argv (ps, /proc/*/cmdline), only in the environment.
    assert flag(sidecar["args"], "store") is None
    env = container_env(sidecar, {("redis-auth", "redis-password"): "s3cr3t"})
    url = urlsplit(env["BETRACE_STORE"])
    assert (url.scheme, url.username, url.password, url.hostname, url.port, url.path) == \
        ("redis", "", "s3cr3t", "redis-master.data", 6379, "/0")
    from sidecar.live.config import Settings

    assert Settings(store=env["BETRACE_STORE"]).validate() == []
    assert "s3cr3t" not in json.dumps(rendered.objects)

    # A user name in the URL is kept, the password added to it.
    sidecar = scenarios["injection-monitoring-redis"].sidecar()
    env = container_env(sidecar, {("redis-auth", "password"): "pw"})
    url = urlsplit(env["BETRACE_STORE"])
    assert (url.scheme, url.username, url.password, url.hostname, url.port, url.path) == \
        ("rediss", "betrace", "pw", "redis.data", 6380, "/1")


# --- the sidecar container, run for real ---------------------------------------------------------

def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read().decode()
    except OSError:
        return 0, ""


class Process:
    """A `python -m sidecar ...` process; output goes to files read on failure."""

    def __init__(self, args: list[str], env: dict[str, str], directory: Path) -> None:
        self.log = directory / f"process-{time.monotonic_ns()}.log"
        self._out = self.log.open("w")
        base = {k: v for k, v in os.environ.items() if not k.startswith("BETRACE_")}
        self.process = subprocess.Popen([sys.executable, "-m", "sidecar", *args], cwd=REPO,
                                        env={**base, **env}, stdin=subprocess.DEVNULL,
                                        stdout=self._out, stderr=subprocess.STDOUT)

    def output(self) -> str:
        self._out.flush()
        return self.log.read_text()

    def wait_http(self, port: int, path: str, timeout: float = 30) -> tuple[int, str]:
        deadline = time.monotonic() + timeout
        while True:
            status, body = http_get(port, path)
            if status == 200:
                return status, body
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"GET {path} on {port}: {status} {body}\n{self.output()}")
            time.sleep(0.1)

    def close(self) -> None:
        stop(self.process, grace=15)
        self._out.close()


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Callable[[list[str], dict[str, str]], Process]]:
    yield from closed_at_end(lambda args, env: Process(args, env, tmp_path))


def local_args(args: list[str], replace: dict[str, str]) -> list[str]:
    """The container's args with the flags in `replace` pointed at this machine; every other
    argument exactly as rendered."""
    out = []
    for arg in args:
        name = arg[2:].split("=", 1)[0] if arg.startswith("--") else None
        out.append(f"--{name}={replace[name]}" if name in replace else arg)
    return out


def start_sidecar(rendered: Rendered, rules_dir: Path, processes: Callable[..., Process],
                  secrets: dict[tuple[str, str], str], export: str | None = None,
                  files: dict[str, str] | None = None) -> tuple[Process, int, int]:
    """The rendered sidecar on free loopback ports; `files` points flags naming files the pod
    mounts at local copies."""
    sidecar = rendered.sidecar()
    grpc_port, metrics_port = free_port(), free_port()
    args = local_args(sidecar["args"], {
        "rules": str(rules_dir), "listen": f"127.0.0.1:{grpc_port}",
        "metrics-listen": f"127.0.0.1:{metrics_port}",
        "export-otlp": export or f"127.0.0.1:{free_port()}", **(files or {})})
    assert args[0] == "serve"
    process = processes([*args, "--http-listen="], container_env(sidecar, secrets))
    return process, grpc_port, metrics_port


def retry_with_a_new_intent(tracer: Any) -> None:
    """A checkout whose payment retry used a new payment_intent_id: the default rules' catch."""
    with tracer.start_as_current_span("POST /checkout"):
        for attempt, intent in ((1, "pi_1abc"), (2, "pi_2xyz")):
            with tracer.start_as_current_span("payment.charge") as span:
                span.set_attribute("attempt", attempt)
                span.set_attribute("payment_intent_id", intent)
                span.set_attribute("cart.id", "cart_1001")


def test_the_rendered_sidecar_starts_and_catches_a_violation(
        render: Callable[..., Rendered], processes: Callable[..., Process], tmp_path: Path,
        otlp_receiver: Any, sdk_client: Callable[..., Any],
        wait_until: Callable[..., Any]) -> None:
    rendered = render({"sidecar": {"decisionWait": "1s", "maxTraceAge": "10s",
                                   "signalsOut": ""}})
    rules = rendered.write_rules(tmp_path / "rules")
    process, grpc_port, metrics_port = start_sidecar(rendered, rules, processes, {},
                                                     export=otlp_receiver.endpoint)
    status, body = process.wait_http(metrics_port, "/readyz")
    assert "2 rules" in body and "memory" in body
    assert http_get(metrics_port, "/healthz")[0] == 200

    retry_with_a_new_intent(sdk_client(grpc_port, service="payments").tracer)
    violations = wait_until(lambda: otlp_receiver.spans("betrace.violation"), timeout=30,
                            what="a betrace.violation span from the rendered sidecar")
    attributes = {a.key: a.value.string_value for a in violations[0][1].attributes}
    assert attributes["betrace.rule.id"] == "payment-retry-idempotency"
    status, metrics = http_get(metrics_port, "/metrics")
    assert 'betrace_violations_total{rule="payment-retry-idempotency",severity="critical"} 1.0' \
        in metrics


def test_the_rendered_sidecar_asks_for_the_metrics_token_and_not_on_its_probes(
        render: Callable[..., Rendered], processes: Callable[..., Process],
        tmp_path: Path) -> None:
    rendered = render({"sidecar": {"metricsToken": {"existingSecret": "m", "key": "token"}}})
    token = tmp_path / "token"  # the Secret's key, as the volume mounts it
    token.write_text("scrape-me\n")
    process, _, metrics_port = start_sidecar(
        rendered, rendered.write_rules(tmp_path / "rules"), processes, {},
        files={"metrics-token-file": str(token)})
    assert process.wait_http(metrics_port, "/readyz")[0] == 200
    assert http_get(metrics_port, "/healthz")[0] == 200
    assert http_get(metrics_port, "/metrics")[0] == 401
    request = urllib.request.Request(f"http://127.0.0.1:{metrics_port}/metrics",
                                     headers={"Authorization": "Bearer scrape-me"})
    with urllib.request.urlopen(request, timeout=5) as reply:
        assert reply.status == 200 and b"betrace_rules_loaded" in reply.read()


def test_the_rendered_sidecar_reaches_redis_with_the_secret_password(
        render: Callable[..., Rendered], processes: Callable[..., Process],
        tmp_path: Path) -> None:
    from redis_servers import redis_binary

    password, port = "s3cr3t-Pw_42", free_port()
    server = subprocess.Popen(
        [redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(tmp_path), "--requirepass", password],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_redis(port, password)
        rendered = render({"redis": {"url": f"redis://127.0.0.1:{port}/0",
                                     "existingSecret": "redis-auth"}})
        rules = rendered.write_rules(tmp_path / "rules")
        process, _, metrics_port = start_sidecar(rendered, rules, processes,
                                                 {("redis-auth", "password"): password})
        status, body = process.wait_http(metrics_port, "/readyz")
        assert "redis ok" in body

        # The same chart with a wrong password in the Secret: never ready.
        process, _, metrics_port = start_sidecar(rendered, rules, processes,
                                                 {("redis-auth", "password"): "wrong"})
        deadline = time.monotonic() + 30
        status = 0
        while status == 0 and time.monotonic() < deadline:
            status, body = http_get(metrics_port, "/readyz")
            time.sleep(0.1)
        assert status == 503, (status, body, process.output())
    finally:
        server.terminate()
        server.wait(10)


def test_the_rendered_sidecar_stores_signals_in_postgres_with_the_secret_password(
        render: Callable[..., Rendered], processes: Callable[..., Process], tmp_path: Path,
        postgres_server: Any, sdk_client: Callable[..., Any],
        wait_until: Callable[..., Any]) -> None:
    from postgres_servers import PASSWORD

    from sidecar.signaldb import SignalQuery, open_signal_db

    url = postgres_server.create_database("helm_rendered")
    rendered = render({"sidecar": {"decisionWait": "1s", "signalsOut": ""},
                       "signalsDb": {"url": url, "existingSecret": "pg", "retention": "90d"}})
    sidecar = rendered.sidecar()
    assert flag(sidecar["args"], "signals-retention") == "90d"
    mounted = flag(sidecar["args"], "signals-db-password-file")
    assert mounted == "/etc/betrace/signals-db/password"
    mount = next(m for m in sidecar["volumeMounts"] if m["name"] == "betrace-signals-db")
    assert mounted.startswith(mount["mountPath"] + "/")
    volume = next(v for v in rendered.collector_pod()["volumes"]
                  if v["name"] == "betrace-signals-db")
    assert volume["secret"]["secretName"] == "pg"
    assert PASSWORD not in json.dumps(rendered.objects)
    password = tmp_path / "password"  # the Secret's key, as the volume mounts it
    password.write_text(PASSWORD + "\n")
    rules = rendered.write_rules(tmp_path / "rules")
    process, grpc_port, metrics_port = start_sidecar(
        rendered, rules, processes, {}, files={"signals-db-password-file": str(password)})
    process.wait_http(metrics_port, "/readyz")
    retry_with_a_new_intent(sdk_client(grpc_port, service="payments", version="2.4.1").tracer)
    db = open_signal_db(url, password=PASSWORD)
    try:
        wait_until(lambda: db.count() == 1, timeout=30, what="the signal stored in PostgreSQL")
        (row,) = db.signals(SignalQuery())
        assert (row.rule_id, row.service, row.service_version, row.mode) == (
            "payment-retry-idempotency", "payments", "2.4.1", "live")
    finally:
        db.close()


def test_routing_values_become_the_sidecars_flags(scenarios: dict[str, Rendered]) -> None:
    rendered = scenarios["collector-routing"]
    args = rendered.sidecar()["args"]
    assert flag(args, "alertmanager") == "http://alertmanager.monitoring:9093"
    assert flag(args, "alertmanager-resolve-after") == "5m"
    assert flag(args, "trace-url") == "https://grafana.example/explore?trace={trace_id}"
    assert flag(args, "webhook") == "https://hooks.example/betrace"
    key = flag(args, "webhook-secret-file")
    mount = next(m for m in rendered.sidecar()["volumeMounts"] if m["name"] == "betrace-webhook")
    assert key == f"{mount['mountPath']}/hmac-key"
    volume = next(v for v in rendered.collector_pod()["volumes"] if v["name"] == "betrace-webhook")
    assert volume["secret"]["secretName"] == "hook-key"
    from sidecar.live.config import Settings

    assert Settings(alertmanager=flag(args, "alertmanager") or "",
                    trace_url=flag(args, "trace-url") or "",
                    webhook=flag(args, "webhook") or "", webhook_secret_file=key or ""
                    ).validate() == []
    defaults = scenarios["defaults"].sidecar()["args"]
    assert all(flag(defaults, f) is None for f in ("alertmanager", "webhook", "trace-url"))


def test_signals_db_url_from_a_secret(render: Callable[..., Rendered]) -> None:
    rendered = render({"signalsDb": {"existingSecret": "pg", "urlKey": "url",
                                     "passwordKey": "password"}})
    sidecar = rendered.sidecar()
    assert env_of(sidecar)["BETRACE_SIGNALS_DB"]["valueFrom"] == {
        "secretKeyRef": {"name": "pg", "key": "url"}}
    assert flag(sidecar["args"], "signals-db-password-file") == "/etc/betrace/signals-db/password"
    defaults = render({}).sidecar()
    assert "BETRACE_SIGNALS_DB" not in env_of(defaults)
    assert flag(defaults["args"], "signals-retention") is None


def _wait_for_redis(port: int, password: str, timeout: float = 10) -> None:
    import redis

    client = redis.Redis(port=port, password=password, socket_timeout=1)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                client.ping()
                return
            except redis.RedisError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
    finally:
        client.close()


# --- injection mode ------------------------------------------------------------------------------

def webhook_config(rendered: Rendered) -> dict[str, Any]:
    (config,) = rendered.all("MutatingWebhookConfiguration")
    (hook,) = config["webhooks"]
    return {"config": config, "hook": hook}


@pytest.mark.parametrize("scenario", ["injection-cert-manager", "injection-cert-manager-issuer",
                                      "injection-generated-certs", "injection-monitoring-redis"])
def test_mutating_webhook_fails_open_and_skips_its_own_namespace(
        scenarios: dict[str, Rendered], scenario: str) -> None:
    rendered = scenarios[scenario]
    hook = webhook_config(rendered)["hook"]
    assert hook["failurePolicy"] == "Ignore"
    assert hook["sideEffects"] == "None"
    assert hook["admissionReviewVersions"] == ["v1"]
    assert 1 <= hook["timeoutSeconds"] <= 10
    assert hook["rules"] == [{"operations": ["CREATE"], "apiGroups": [""], "apiVersions": ["v1"],
                              "resources": ["pods"], "scope": "Namespaced"}]
    excluded = [e for e in hook["namespaceSelector"]["matchExpressions"]
                if e["key"] == "kubernetes.io/metadata.name" and e["operator"] == "NotIn"]
    assert excluded and NAMESPACE in excluded[0]["values"]
    # The API server reaches the webhook through its Service, on the container's HTTPS port.
    service_ref = hook["clientConfig"]["service"]
    assert service_ref["namespace"] == NAMESPACE and service_ref["path"] == "/mutate"
    service = rendered.get("Service", service_ref["name"])
    (port,) = [p for p in service["spec"]["ports"] if p["port"] == service_ref["port"]]
    deployment = rendered.get("Deployment", f"{RELEASE}-webhook")
    spec = deployment["spec"]["template"]["spec"]
    webhook = container(spec, "webhook")
    assert {"name": port["targetPort"], "containerPort": 8443, "protocol": "TCP"} in \
        webhook["ports"]
    assert service["spec"]["selector"].items() <= \
        deployment["spec"]["template"]["metadata"]["labels"].items()
    args = webhook["args"]
    assert args[0] == "webhook"
    assert flag(args, "listen") == "0.0.0.0:8443"
    assert flag(args, "metrics-listen") == "0.0.0.0:9465"
    mounts = {m["name"]: m["mountPath"] for m in webhook["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert flag(args, "tls-cert") == f"{mounts['tls']}/tls.crt"
    assert flag(args, "tls-key") == f"{mounts['tls']}/tls.key"
    assert flag(args, "sidecar-template") == f"{mounts['sidecar-template']}/sidecar.yaml"
    assert volumes["tls"]["secret"]["secretName"] == f"{RELEASE}-webhook-tls"
    assert volumes["sidecar-template"]["configMap"]["name"] == f"{RELEASE}-sidecar-template"
    assert env_of(webhook)["POD_NAMESPACE"]["valueFrom"] == {
        "fieldRef": {"fieldPath": "metadata.namespace"}}
    # No collector in injection mode.
    assert not [o for o in rendered.objects if "collector" in o["metadata"]["name"]]


def test_cert_manager_issues_the_webhook_certificate(scenarios: dict[str, Rendered]) -> None:
    rendered = scenarios["injection-cert-manager"]
    config, hook = webhook_config(rendered).values()
    certificate = rendered.get("Certificate")
    assert certificate["spec"]["secretName"] == f"{RELEASE}-webhook-tls"
    assert "betrace-webhook.observability.svc" in certificate["spec"]["dnsNames"]
    issuer = rendered.get("Issuer")
    assert certificate["spec"]["issuerRef"] == {"name": issuer["metadata"]["name"],
                                                "kind": "Issuer", "group": "cert-manager.io"}
    assert config["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == \
        f"{NAMESPACE}/{certificate['metadata']['name']}"
    assert "caBundle" not in hook["clientConfig"]  # the cainjector fills it
    assert not rendered.all("Secret")

    rendered = scenarios["injection-cert-manager-issuer"]
    assert not rendered.all("Issuer")
    assert rendered.get("Certificate")["spec"]["issuerRef"] == {
        "name": "corp-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"}


def openssl(*args: str, data: bytes | None = None) -> str:
    result = subprocess.run(["openssl", *args], input=data, capture_output=True, timeout=60)
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode()


def test_helm_generated_certificate_is_trusted_by_the_ca_bundle(
        scenarios: dict[str, Rendered], tmp_path: Path) -> None:
    rendered = scenarios["injection-generated-certs"]
    hook = webhook_config(rendered)["hook"]
    secret = rendered.get("Secret", f"{RELEASE}-webhook-tls")
    assert secret["type"] == "kubernetes.io/tls"
    data = {k: base64.b64decode(v) for k, v in secret["data"].items()}
    assert base64.b64decode(hook["clientConfig"]["caBundle"]) == data["ca.crt"]
    for name, blob in data.items():
        (tmp_path / name).write_bytes(blob)
    out = openssl("verify", "-CAfile", str(tmp_path / "ca.crt"), str(tmp_path / "tls.crt"))
    assert out.strip().endswith("OK")
    sans = openssl("x509", "-in", str(tmp_path / "tls.crt"), "-noout", "-ext", "subjectAltName")
    for name in ("betrace-webhook", "betrace-webhook.observability",
                 "betrace-webhook.observability.svc",
                 "betrace-webhook.observability.svc.cluster.local"):
        assert f"DNS:{name}" in [part.strip() for part in sans.split("\n", 1)[1].split(",")]
    # The key belongs to the certificate.
    assert openssl("pkey", "-in", str(tmp_path / "tls.key"), "-pubout") == \
        openssl("x509", "-in", str(tmp_path / "tls.crt"), "-noout", "-pubkey")


def test_injected_sidecar_is_the_collector_modes_sidecar(render: Callable[..., Rendered],
                                                         tmp_path: Path) -> None:
    values = {"redis": {"url": "redis://redis.data:6379/0", "existingSecret": "redis-auth"},
              "sidecar": {"logLevel": "debug", "extraArgs": ["--max-traces=1000"]}}
    collector_mode = render(values)
    injection_mode = render({**values, "mode": "injection"})
    assert injection_mode.sidecar() == collector_mode.sidecar()
    assert injection_mode.sidecar()["name"] == "betrace"  # how the webhook recognises it
    template = injection_mode.sidecar_template()
    assert template["volumes"] == [{"name": "betrace-rules",
                                    "configMap": {"name": f"{RELEASE}-rules"}}]
    # The webhook's own loader accepts the rendered template.
    from sidecar.k8s.webhook import load_template

    path = tmp_path / "sidecar.yaml"
    path.write_text(injection_mode.get("ConfigMap",
                                       f"{RELEASE}-sidecar-template")["data"]["sidecar.yaml"])
    loaded = load_template(str(path))
    assert loaded.container == template["container"]


def test_rules_configmap_is_copied_to_every_injected_namespace(
        scenarios: dict[str, Rendered]) -> None:
    rendered = scenarios["injection-generated-certs"]
    copies = [o for o in rendered.all("ConfigMap") if o["metadata"]["name"] == f"{RELEASE}-rules"]
    assert sorted(o["metadata"]["namespace"] for o in copies) == \
        sorted([NAMESPACE, "shop", "payments"])
    assert len({json.dumps(o["data"], sort_keys=True) for o in copies}) == 1
    hook = webhook_config(rendered)["hook"]
    included = [e for e in hook["namespaceSelector"]["matchExpressions"] if e["operator"] == "In"]
    assert included == [{"key": "kubernetes.io/metadata.name", "operator": "In",
                         "values": ["shop", "payments"]}]
    # Without a list, the notes say the ConfigMap must be created where pods are injected.
    assert "IMPORTANT" in scenarios["injection-cert-manager"].notes


def https_post(port: int, body: bytes, ca: Path, server_name: str) -> tuple[int, bytes]:
    context = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with context.wrap_socket(raw, server_hostname=server_name) as tls:
            tls.sendall(b"POST /mutate?timeout=5s HTTP/1.1\r\nHost: " + server_name.encode() +
                        b"\r\nContent-Type: application/json\r\nContent-Length: " +
                        str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
            reply = b""
            while chunk := tls.recv(65536):
                reply += chunk
    head, _, payload = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), payload


def apply_json_patch(document: Any, ops: list[dict[str, Any]]) -> Any:
    """RFC 6902 `add` (all an injecting webhook uses), on a copy."""
    document = copy.deepcopy(document)
    for op in ops:
        assert op["op"] == "add", op
        parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"][1:].split("/")]
        parent = document
        for part in parts[:-1]:
            parent = parent[int(part)] if isinstance(parent, list) else parent[part]
        if isinstance(parent, list):
            parent.insert(len(parent) if parts[-1] == "-" else int(parts[-1]), op["value"])
        else:
            parent[parts[-1]] = op["value"]
    return document


def test_the_rendered_webhook_serves_its_certificate_and_injects_a_valid_pod(
        scenarios: dict[str, Rendered], processes: Callable[..., Process],
        tmp_path: Path) -> None:
    rendered = scenarios["injection-generated-certs"]
    hook = webhook_config(rendered)["hook"]
    secret = rendered.get("Secret", f"{RELEASE}-webhook-tls")
    for name, blob in secret["data"].items():
        (tmp_path / name).write_bytes(base64.b64decode(blob))
    (tmp_path / "ca-bundle.crt").write_bytes(base64.b64decode(hook["clientConfig"]["caBundle"]))
    template_data = rendered.get("ConfigMap", f"{RELEASE}-sidecar-template")["data"]
    (tmp_path / "sidecar.yaml").write_text(template_data["sidecar.yaml"])

    webhook = container(rendered.get("Deployment", f"{RELEASE}-webhook")
                        ["spec"]["template"]["spec"], "webhook")
    port, metrics_port = free_port(), free_port()
    args = local_args(webhook["args"], {
        "listen": f"127.0.0.1:{port}", "metrics-listen": f"127.0.0.1:{metrics_port}",
        "tls-cert": str(tmp_path / "tls.crt"), "tls-key": str(tmp_path / "tls.key"),
        "sidecar-template": str(tmp_path / "sidecar.yaml")})
    process = processes(args, {"POD_NAMESPACE": NAMESPACE})
    process.wait_http(metrics_port, "/healthz")

    pod = {"apiVersion": "v1", "kind": "Pod",
           "metadata": {"generateName": "checkout-", "namespace": "shop",
                        "labels": {"app": "checkout", "betrace.dev/inject": "true"}},
           "spec": {"containers": [{"name": "app", "image": "example/checkout:1.4"}]}}
    review = {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": {
        "uid": "0b6d5e2c-1111-4c1a-9f00-000000000001",
        "kind": {"group": "", "version": "v1", "kind": "Pod"},
        "resource": {"group": "", "version": "v1", "resource": "pods"},
        "namespace": "shop", "operation": "CREATE", "object": pod,
        "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"}}}
    # Exactly what the API server does: TLS to the Service's DNS name, trusting the caBundle.
    server_name = f"{hook['clientConfig']['service']['name']}.{NAMESPACE}.svc"
    deadline = time.monotonic() + 30
    while True:
        try:
            status, payload = https_post(port, json.dumps(review).encode(),
                                         tmp_path / "ca-bundle.crt", server_name)
            break
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise AssertionError(process.output()) from None
            time.sleep(0.1)
    assert status == 200, payload
    response = json.loads(payload)["response"]
    assert response["allowed"] is True and response["patchType"] == "JSONPatch"
    patched = apply_json_patch(pod, json.loads(base64.b64decode(response["patch"])))
    assert [c["name"] for c in patched["spec"]["containers"]] == ["app", "betrace"]
    assert patched["spec"]["containers"][1] == rendered.sidecar()
    patched["metadata"]["name"] = "checkout-x1"
    validate_object(patched)


# --- monitoring ----------------------------------------------------------------------------------

def test_pod_monitor_scrapes_the_sidecar_metrics_port(scenarios: dict[str, Rendered]) -> None:
    rendered = scenarios["collector-monitoring"]
    (monitor,) = rendered.all("PodMonitor")
    endpoint, collector_endpoint = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"
    # and the collector's own metrics, where its queue to the sidecar shows
    assert collector_endpoint["port"] == "otelcol-metrics"
    template = rendered.get("Deployment", f"{RELEASE}-collector")["spec"]["template"]
    [collector_port] = [p for p in container(template["spec"], "otel-collector")["ports"]
                        if p["name"] == "otelcol-metrics"]
    assert collector_port["containerPort"] == 8888
    telemetry = rendered.collector_config()["service"]["telemetry"]["metrics"]["readers"]
    assert telemetry[0]["pull"]["exporter"]["prometheus"]["port"] == 8888
    assert monitor["spec"]["selector"]["matchLabels"].items() <= \
        template["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    ports = [p for c in template["spec"]["containers"] for p in c["ports"]
             if p["name"] == "metrics"]
    assert ports == [{"name": "metrics", "containerPort": 9464, "protocol": "TCP"}]

    rendered = scenarios["injection-monitoring-redis"]
    monitors = {m["metadata"]["name"]: m for m in rendered.all("PodMonitor")}
    sidecars = monitors[f"{RELEASE}-sidecar"]["spec"]
    assert sidecars["selector"] == {"matchLabels": {"betrace.dev/inject": "true"}}
    assert sidecars["namespaceSelector"] == {"any": True}
    assert sidecars["podMetricsEndpoints"][0]["port"] == "metrics"
    webhook = monitors[f"{RELEASE}-webhook"]["spec"]
    assert webhook["podMetricsEndpoints"][0]["port"] == "webhook-metrics"
    assert not scenarios["defaults"].all("PodMonitor")
    assert not scenarios["defaults"].all("PrometheusRule")


def test_prometheus_rule_carries_the_alerts_file(scenarios: dict[str, Rendered]) -> None:
    for scenario in ("collector-monitoring", "injection-monitoring-redis"):
        rule = scenarios[scenario].get("PrometheusRule")
        expected = yaml.safe_load((CHART / "files" / "alerts.yaml").read_text())["groups"]
        assert rule["spec"]["groups"] == expected
        # Alert templates ({{ $labels.x }}) are Prometheus's, left alone by Helm.
    assert "{{" in ALERTS.read_text()
    assert "{{" in json.dumps(scenarios["collector-monitoring"].get("PrometheusRule"))


def test_grafana_dashboard(scenarios: dict[str, Rendered]) -> None:
    configmap = scenarios["defaults"].get("ConfigMap", f"{RELEASE}-dashboard")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    (text,) = configmap["data"].values()
    dashboard = json.loads(text)
    assert dashboard["uid"] and dashboard["title"]
    panels = {p["title"]: p for p in dashboard["panels"] if p["type"] != "row"}
    exprs = {title: " ".join(t["expr"] for t in p["targets"]) for title, p in panels.items()}
    everything = " ".join(exprs.values())
    assert re.search(r"sum by \(rule, severity\) \(increase\(betrace_violations_total",
                     everything)
    for metric in ("betrace_spans_received_total", "betrace_spans_dropped_total",
                   "betrace_spans_rejected_total", "betrace_traces_active",
                   "betrace_spans_buffered", "betrace_signal_export_backlog",
                   "betrace_signal_export_failures_total", "betrace_signals_suppressed_total",
                   "betrace_export_requests_rejected_total",
                   "betrace_credential_reload_failures_total"):
        assert metric in everything, metric
    assert re.search(r"histogram_quantile\(0\.99, sum by \(le\) \("
                     r"rate\(betrace_decision_latency_seconds_bucket", everything)
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels.values():
        assert panel["datasource"]["uid"] == "${datasource}"


# --- values.schema.json and lint -----------------------------------------------------------------

@pytest.mark.parametrize("values, where", [
    ({"mode": "bogus"}, "/mode"),
    ({"sidecar": {"decisionWait": "10 seconds"}}, "/sidecar/decisionWait"),
    ({"rules": {"payments.txt": "rules: []\n"}}, "payments.txt"),
    ({"rules": {"payments.yaml": None, "security.yaml": None}}, "/rules"),
    ({"redis": {"url": "http://redis:6379"}}, "/redis/url"),
    ({"redis": {"existingSecret": "redis-auth"}}, "/redis/url"),
    ({"sidecar": {"securityContext": {"runAsNonRoot": False}}}, "runAsNonRoot"),
    ({"sidecar": {"resources": {"limits": None}}}, "/sidecar/resources"),
    ({"collector": {"replica": 3}}, "replica"),
    ({"webhook": {"timeoutSeconds": 60}}, "/webhook/timeoutSeconds"),
])
def test_schema_rejects_bad_values(render: Callable[..., Rendered], chart: Any,
                                   values: dict[str, Any], where: str) -> None:
    with pytest.raises(helm.HelmError) as caught:
        render(values)
    assert where in str(caught.value), caught.value
    with pytest.raises(helm.HelmError):
        chart.validate_schema(values)


def test_schema_accepts_every_scenario(chart: Any) -> None:
    for values in SCENARIOS.values():
        chart.validate_schema(copy.deepcopy(values))


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_helm_lint_is_clean(scenario: str) -> None:
    report = helm.lint(CHART, copy.deepcopy(SCENARIOS[scenario]) or None, strict=True,
                       namespace=NAMESPACE, kube_version="v1.30.0")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == [], report["messages"]


def test_helm_lint_reports_bad_values() -> None:
    report = helm.lint(CHART, {"mode": "bogus"}, strict=True, namespace=NAMESPACE)
    assert [m for m in report["messages"] if m["severity"] == 3], report


def test_notes_render_for_every_scenario(scenarios: dict[str, Rendered],
                                        render: Callable[..., Rendered]) -> None:
    for scenario, rendered in scenarios.items():
        assert f"namespace {NAMESPACE}" in rendered.notes, scenario
    notes = scenarios["collector-redis-external-secret"].notes
    assert "redis-auth" in notes and "WARNING" not in notes
    assert "WARNING" in scenarios["defaults"].notes  # no exporter: violations stored nowhere
    notes = render({"collector": {"replicas": 2, "exporters": TEMPO}}).notes
    assert "collector replicas with the in-memory store" in notes


# --- the image -----------------------------------------------------------------------------------

def dockerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1].strip())
            for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def test_dockerfile_runs_betrace_as_non_root() -> None:
    instructions = dockerfile_instructions()
    froms = [arg for op, arg in instructions if op == "FROM"]
    assert froms and all(arg.startswith("python:3.11-slim") for arg in froms)
    runs = " ".join(arg for op, arg in instructions if op == "RUN")
    assert "pip install ." in runs
    (user,) = [arg for op, arg in instructions if op == "USER"]
    assert user.split(":")[0] == "65532"
    (entrypoint,) = [json.loads(arg) for op, arg in instructions if op == "ENTRYPOINT"]
    assert entrypoint == ["betrace"]
    (cmd,) = [json.loads(arg) for op, arg in instructions if op == "CMD"]
    assert cmd[0] == "serve"
    # Every COPY source exists in the repository.
    for op, arg in instructions:
        if op == "COPY" and not arg.startswith("--from"):
            for source in arg.split()[:-1]:
                assert list(REPO.glob(source)), source
    assert "no Docker engine" in DOCKERFILE.read_text()


def test_dockerfile_cmd_is_a_command_line_betrace_accepts() -> None:
    from sidecar.cli import _parser

    (cmd,) = [json.loads(arg) for op, arg in dockerfile_instructions() if op == "CMD"]
    parsed = _parser().parse_args(cmd)  # argparse exits on an unknown flag
    assert parsed.rules == "/etc/betrace/rules"
    assert parsed.metrics_listen == "0.0.0.0:9464"
