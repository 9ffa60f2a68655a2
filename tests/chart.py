"""The Helm chart (helm/betrace) rendered by real Helm: Helm v4's Go library, embedded in the
`helm-python-sdk` wheel (no helm binary, no cluster, no network). Shared by the tests that check
what it renders (test_helm.py) and those that run it (test_collector_pipeline.py).

Needs the `test` extras: outside CI a missing one skips, in CI (CI=true) it fails."""

from __future__ import annotations

import copy
import os
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "helm" / "betrace"
RELEASE, NAMESPACE = "betrace", "observability"


def require(module: str) -> Any:
    """Import a `test` extra: skipped without it outside CI, an error in CI."""
    if os.environ.get("CI") == "true":
        return __import__(module)
    return pytest.importorskip(module, reason=f"{module} (the `test` extras) is needed")


helm = require("helm_python")


class Rendered:
    """One `helm template`: the objects, and NOTES.txt."""

    def __init__(self, manifests: dict[str, str]) -> None:
        self.notes = ""
        self.objects: list[dict[str, Any]] = []
        for path, text in sorted(manifests.items()):
            if path.endswith("NOTES.txt"):
                self.notes = text
            elif path.endswith((".yaml", ".yml")):
                self.objects.extend(doc for doc in yaml.safe_load_all(text) if doc)

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def get(self, kind: str, name: str | None = None) -> dict[str, Any]:
        found = [o for o in self.all(kind) if name is None or o["metadata"]["name"] == name]
        assert len(found) == 1, f"{len(found)} {kind} named {name}: " \
                                f"{[o['metadata']['name'] for o in self.all(kind)]}"
        return found[0]

    def pod_specs(self) -> list[tuple[str, dict[str, Any]]]:
        return [(o["metadata"]["name"], o["spec"]["template"]["spec"])
                for o in self.objects if o["kind"] in ("Deployment", "StatefulSet", "DaemonSet")]

    def sidecar_template(self) -> dict[str, Any]:
        data = self.get("ConfigMap", f"{RELEASE}-sidecar-template")["data"]
        return yaml.safe_load(data["sidecar.yaml"])

    def sidecar(self) -> dict[str, Any]:
        """The BeTrace sidecar container: the injection template's, or the collector pod's."""
        names = {o["metadata"]["name"] for o in self.all("ConfigMap")}
        if f"{RELEASE}-sidecar-template" in names:
            return self.sidecar_template()["container"]
        return container(self.collector_pod(), "betrace")

    def collector_pod(self) -> dict[str, Any]:
        return self.get("Deployment", f"{RELEASE}-collector")["spec"]["template"]["spec"]

    def collector_config(self) -> dict[str, Any]:
        data = self.get("ConfigMap", f"{RELEASE}-collector-config")["data"]
        config: dict[str, Any] = yaml.safe_load(data["config.yaml"])
        return config

    def write_rules(self, directory: Path) -> Path:
        """The rules ConfigMap as the sidecar sees it mounted: one file per key."""
        data = self.get("ConfigMap", f"{RELEASE}-rules")["data"]
        assert data
        directory.mkdir(parents=True, exist_ok=True)
        for name, text in data.items():
            (directory / name).write_text(text)
        return directory


def render(values: dict[str, Any] | None = None, namespace: str = NAMESPACE) -> Rendered:
    """`helm template` of the chart as release RELEASE (about 15 ms)."""
    with helm.Chart.load(CHART) as chart:
        return Rendered(chart.render(copy.deepcopy(values) if values else None, name=RELEASE,
                                     namespace=namespace, is_install=True))


def container(pod_spec: dict[str, Any], name: str) -> dict[str, Any]:
    found = [c for c in pod_spec["containers"] if c["name"] == name]
    assert len(found) == 1, [c["name"] for c in pod_spec["containers"]]
    return found[0]


def flag(args: list[str], name: str) -> str | None:
    """The value of `--name=value` in a container's args, or None."""
    values = [a.split("=", 1)[1] for a in args if a.startswith(f"--{name}=")]
    assert len(values) <= 1, args
    return values[0] if values else None


def expand(value: str, env: dict[str, str]) -> str:
    """The kubelet's $(VAR) expansion of env values and args: a defined variable is replaced,
    $$ is a literal $, anything else stays as written."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)),
                  value)


def container_env(c: dict[str, Any], secrets: dict[tuple[str, str], str]) -> dict[str, str]:
    """The environment Kubernetes gives the container: values expanded in order, Secret keys
    resolved from `secrets`."""
    env: dict[str, str] = {}
    for entry in c.get("env", []):
        if "fieldRef" in entry.get("valueFrom", {}):  # the downward API: this is the pod
            assert entry["valueFrom"]["fieldRef"] == {"fieldPath": "status.podIP"}
            env[entry["name"]] = "127.0.0.1"
        elif "valueFrom" in entry:
            ref = entry["valueFrom"]["secretKeyRef"]
            env[entry["name"]] = secrets[(ref["name"], ref["key"])]
        else:
            env[entry["name"]] = expand(entry["value"], env)
    return env
