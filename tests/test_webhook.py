"""`betrace webhook`: the real HTTPS server (in-process, and as `python -m sidecar webhook`) on
free loopback ports, with a self-signed certificate made by the `openssl` CLI, answering real
AdmissionReview JSON; the JSONPatch it returns is applied here and the resulting pod checked."""

from __future__ import annotations

import base64
import copy
import json
import logging
import os
import signal
import socket
import ssl
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from sidecar.k8s.webhook import TemplateError, Webhook, WebhookSettings, load_template, pointer

REPO = Path(__file__).resolve().parent.parent
OWN_NAMESPACE = "betrace-system"

TEMPLATE = """
container:
  image: ghcr.io/example/betrace:0.1.0
  args: [serve, --rules, /etc/betrace/rules, --export-otlp, "127.0.0.1:4317"]
  ports:
    - {name: otlp-grpc, containerPort: 4319}
  volumeMounts:
    - {name: betrace-rules, mountPath: /etc/betrace/rules, readOnly: true}
  resources:
    requests: {cpu: 50m, memory: 64Mi}
  securityContext: {runAsNonRoot: true, readOnlyRootFilesystem: true}
volumes:
  - name: betrace-rules
    configMap: {name: betrace-rules}
"""

NEW_TEMPLATE = """
container:
  name: betrace
  image: ghcr.io/example/betrace:0.2.0
volumes:
  - {name: betrace-rules, configMap: {name: betrace-rules-v2}}
  - {name: betrace-scratch, emptyDir: {}}
"""


# --- certificates, template, clients ------------------------------------------------------------

def make_cert(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost, made with the openssl CLI."""
    cert, key = directory / f"{name}.crt", directory / f"{name}.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2",
         "-subj", f"/CN=betrace-webhook-{name}",
         "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
        check=True, capture_output=True, timeout=60)
    return cert, key


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    directory = tmp_path_factory.mktemp("certs")
    return {name: make_cert(directory, name) for name in ("a", "b")}


@pytest.fixture
def tls_files(tmp_path: Path, certs: dict[str, tuple[Path, Path]]) -> tuple[Path, Path]:
    """Copies of certificate "a" that a test may overwrite."""
    cert, key = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert.write_bytes(certs["a"][0].read_bytes())
    key.write_bytes(certs["a"][1].read_bytes())
    return cert, key


@pytest.fixture
def template_file(tmp_path: Path) -> Path:
    path = tmp_path / "sidecar.yaml"
    path.write_text(TEMPLATE)
    return path


def client_context(cert: Path) -> ssl.SSLContext:
    """Trusts `cert` only, and checks the host name (127.0.0.1 is in its SANs)."""
    return ssl.create_default_context(cafile=str(cert))


def https(port: int, path: str, cert: Path, body: bytes | None = None,
          ) -> tuple[int, bytes]:
    request = urllib.request.Request(
        f"https://127.0.0.1:{port}{path}", data=body,
        headers={"Content-Type": "application/json"} if body is not None else {})
    try:
        with urllib.request.urlopen(request, context=client_context(cert), timeout=10) as reply:
            return reply.status, reply.read()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read()


def post(port: int, review: Any, cert: Path) -> dict[str, Any]:
    """POST a review (an object, or raw bytes) to /mutate; the answer must be HTTP 200."""
    body = review if isinstance(review, bytes) else json.dumps(review).encode()
    status, reply = https(port, "/mutate?timeout=10s", cert, body)
    assert status == 200, reply
    answer = json.loads(reply)
    assert answer["kind"] == "AdmissionReview"
    assert answer["response"]["allowed"] is True
    return answer


# --- AdmissionReviews and JSONPatch -------------------------------------------------------------

def make_pod(labels: dict[str, str] | None = None, annotations: dict[str, str] | None = None,
             containers: list[dict[str, Any]] | None = None,
             volumes: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    metadata: dict[str, Any] = {"generateName": "checkout-7d9f-", "namespace": "shop"}
    if labels is not None:
        metadata["labels"] = labels
    if annotations is not None:
        metadata["annotations"] = annotations
    spec: dict[str, Any] = {"containers": containers or [
        {"name": "app", "image": "example/checkout:1.4"}]}
    if volumes is not None:
        spec["volumes"] = volumes
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": spec}


def make_review(pod: dict[str, Any] | None, operation: str = "CREATE", namespace: str = "shop",
                uid: str = "705ab4f5-6393-11e8-b7cc-42010a800002") -> dict[str, Any]:
    return {
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": namespace, "operation": operation,
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": pod, "oldObject": pod if operation == "UPDATE" else None,
            "dryRun": False, "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        },
    }


def apply_patch(document: Any, ops: list[dict[str, Any]]) -> Any:
    """RFC 6902, the `add` operation only (all the webhook may use), on a copy."""
    document = copy.deepcopy(document)
    for op in ops:
        assert op["op"] == "add", op
        assert op["path"].startswith("/"), op
        parts = [p.replace("~1", "/").replace("~0", "~") for p in op["path"][1:].split("/")]
        parent = document
        for part in parts[:-1]:
            parent = parent[int(part)] if isinstance(parent, list) else parent[part]
        last = parts[-1]
        if isinstance(parent, list):
            if last == "-":
                parent.append(op["value"])
            else:
                assert 0 <= int(last) <= len(parent), op
                parent.insert(int(last), op["value"])
        else:
            assert isinstance(parent, dict), op
            parent[last] = op["value"]
    return document


def patch_of(answer: dict[str, Any]) -> list[dict[str, Any]] | None:
    response = answer["response"]
    if "patch" not in response:
        assert "patchType" not in response
        return None
    assert response["patchType"] == "JSONPatch"
    ops = json.loads(base64.b64decode(response["patch"], validate=True))
    assert isinstance(ops, list) and ops
    return ops


def expected_container() -> dict[str, Any]:
    return {"name": "betrace", **load_template_dict(TEMPLATE)["container"]}


def load_template_dict(text: str) -> dict[str, Any]:
    import yaml

    return yaml.safe_load(text)


# --- the in-process webhook ---------------------------------------------------------------------

class Running:
    def __init__(self, webhook: Webhook, cert: Path) -> None:
        self.webhook = webhook
        self.cert = cert

    @property
    def port(self) -> int:
        return self.webhook.port

    def post(self, review: Any) -> dict[str, Any]:
        return post(self.webhook.port, review, self.cert)


@pytest.fixture
def start_webhook(tls_files: tuple[Path, Path], template_file: Path,
                  ) -> Iterator[Callable[..., Running]]:
    started: list[Webhook] = []

    def start(**overrides: Any) -> Running:
        settings = WebhookSettings(
            tls_cert=str(tls_files[0]), tls_key=str(tls_files[1]),
            sidecar_template=str(template_file), listen="127.0.0.1:0",
            metrics_listen="127.0.0.1:0", namespace=OWN_NAMESPACE)
        for name, value in overrides.items():
            setattr(settings, name, value)
        assert settings.validate() == []
        webhook = Webhook(settings)
        webhook.start()
        started.append(webhook)
        return Running(webhook, tls_files[0])

    try:
        yield start
    finally:
        for webhook in started:
            webhook.stop()


@pytest.fixture
def hook(start_webhook: Callable[..., Running]) -> Running:
    return start_webhook()


# --- injection ----------------------------------------------------------------------------------

def test_a_labelled_pod_gets_the_sidecar_its_volumes_and_the_annotation(hook: Running) -> None:
    app_volume = {"name": "config", "configMap": {"name": "checkout"}}
    pod = make_pod(labels={"app": "checkout", "betrace.dev/inject": "true"},
                   annotations={"team": "payments"}, volumes=[app_volume])
    answer = hook.post(make_review(pod))
    assert answer["apiVersion"] == "admission.k8s.io/v1"
    assert answer["response"]["uid"] == "705ab4f5-6393-11e8-b7cc-42010a800002"
    assert "warnings" not in answer["response"]
    ops = patch_of(answer)
    assert ops is not None
    assert [op["path"] for op in ops] == [
        "/spec/containers/-", "/spec/volumes/-", "/metadata/annotations/betrace.dev~1injected"]

    patched = apply_patch(pod, ops)
    assert [c["name"] for c in patched["spec"]["containers"]] == ["app", "betrace"]
    assert patched["spec"]["containers"][1] == expected_container()
    assert patched["spec"]["volumes"] == [
        app_volume, {"name": "betrace-rules", "configMap": {"name": "betrace-rules"}}]
    assert patched["metadata"]["annotations"] == {"team": "payments",
                                                  "betrace.dev/injected": "true"}
    assert patched["metadata"]["labels"] == pod["metadata"]["labels"]


def test_an_annotated_pod_without_volumes_or_annotations_gets_the_arrays_created(
        hook: Running) -> None:
    pod = make_pod(annotations={"betrace.dev/inject": "true"})  # no labels, no volumes
    ops = patch_of(hook.post(make_review(pod)))
    assert ops is not None
    patched = apply_patch(pod, ops)
    assert patched["spec"]["volumes"] == [
        {"name": "betrace-rules", "configMap": {"name": "betrace-rules"}}]
    assert [op["path"] for op in ops][:2] == ["/spec/containers/-", "/spec/volumes"]
    assert patched["metadata"]["annotations"]["betrace.dev/injected"] == "true"

    # A labelled pod with no annotations and `volumes: null`: both are created whole.
    bare = make_pod(labels={"betrace.dev/inject": "true"})
    bare["spec"]["volumes"] = None
    ops = patch_of(hook.post(make_review(bare)))
    assert ops is not None
    assert [op["path"] for op in ops] == ["/spec/containers/-", "/spec/volumes",
                                          "/metadata/annotations"]
    patched = apply_patch(bare, ops)
    assert patched["metadata"]["annotations"] == {"betrace.dev/injected": "true"}
    assert patched["spec"]["containers"][-1]["name"] == "betrace"
    assert len(patched["spec"]["volumes"]) == 1


def test_a_native_sidecar_template_goes_first_in_the_init_containers(
        start_webhook: Callable[..., Running], template_file: Path) -> None:
    """`restartPolicy: Always` (Kubernetes 1.29+): the sidecar starts before the pod's other init
    containers and, unlike a regular container, does not keep a Job's pod from completing."""
    template_file.write_text(TEMPLATE.replace("  image:", "  restartPolicy: Always\n  image:", 1))
    hook = start_webhook()
    pod = make_pod(labels={"betrace.dev/inject": "true"})
    patched = apply_patch(pod, patch_of(hook.post(make_review(pod))) or [])
    assert [c["name"] for c in patched["spec"]["containers"]] == ["app"]
    [sidecar] = patched["spec"]["initContainers"]
    assert sidecar["name"] == "betrace" and sidecar["restartPolicy"] == "Always"

    migrate = {"name": "migrate", "image": "example/migrate:1"}
    pod["spec"]["initContainers"] = [migrate]
    patched = apply_patch(pod, patch_of(hook.post(make_review(pod))) or [])
    assert [c["name"] for c in patched["spec"]["initContainers"]] == ["betrace", "migrate"]


def test_json_pointer_escaping() -> None:
    assert pointer("metadata", "annotations", "betrace.dev/injected") == \
        "/metadata/annotations/betrace.dev~1injected"
    assert pointer("a~b/c", "-") == "/a~0b~1c/-"


@pytest.mark.parametrize("pod, operation, namespace, why", [
    pytest.param(make_pod(labels={"app": "checkout"}), "CREATE", "shop", "", id="not-asked"),
    pytest.param(make_pod(labels={"betrace.dev/inject": "false"}), "CREATE", "shop", "",
                 id="label-false"),
    pytest.param(make_pod(labels={"betrace.dev/inject": "true"},
                          annotations={"betrace.dev/inject": "false"}), "CREATE", "shop", "",
                 id="annotation-opts-out"),
    pytest.param(make_pod(labels={"betrace.dev/inject": "true"}, containers=[
        {"name": "app", "image": "x"}, {"name": "betrace", "image": "y"}]), "CREATE", "shop", "",
                 id="already-injected"),
    pytest.param(make_pod(labels={"betrace.dev/inject": "true"}), "CREATE", OWN_NAMESPACE, "",
                 id="own-namespace"),
    pytest.param(make_pod(labels={"betrace.dev/inject": "true"}), "UPDATE", "shop", "",
                 id="update"),
    pytest.param(make_pod(labels={"betrace.dev/inject": "true"}, volumes=[
        {"name": "betrace-rules", "emptyDir": {}}]), "CREATE", "shop", "different volume",
                 id="volume-name-taken"),
])
def test_pods_left_alone(hook: Running, pod: dict[str, Any], operation: str, namespace: str,
                         why: str) -> None:
    answer = hook.post(make_review(pod, operation=operation, namespace=namespace))
    assert patch_of(answer) is None
    assert answer["response"]["uid"] == "705ab4f5-6393-11e8-b7cc-42010a800002"
    if why:
        [warning] = answer["response"]["warnings"]
        assert why in warning
    else:
        assert "warnings" not in answer["response"]


def test_an_annotation_value_other_than_true_or_false_is_ignored_with_a_warning(
        hook: Running) -> None:
    labelled = make_pod(labels={"betrace.dev/inject": "true"},
                        annotations={"betrace.dev/inject": "yes"})
    answer = hook.post(make_review(labelled))
    assert patch_of(answer) is not None  # the label still asks for it
    [warning] = answer["response"]["warnings"]
    assert "neither \"true\" nor \"false\"" in warning
    alone = hook.post(make_review(make_pod(annotations={"betrace.dev/inject": "yes"})))
    assert patch_of(alone) is None
    assert len(alone["response"]["warnings"]) == 1


def test_an_already_present_identical_volume_is_not_added_twice(hook: Running) -> None:
    volume = {"name": "betrace-rules", "configMap": {"name": "betrace-rules"}}
    pod = make_pod(labels={"betrace.dev/inject": "true"}, volumes=[volume])
    ops = patch_of(hook.post(make_review(pod)))
    assert ops is not None
    patched = apply_patch(pod, ops)
    assert patched["spec"]["volumes"] == [volume]
    assert patched["spec"]["containers"][-1]["name"] == "betrace"


# --- never blocking: malformed reviews ----------------------------------------------------------

def _malformed(body: Any, warning: str, uid: str = "", api_version: str = "admission.k8s.io/v1",
               ) -> Any:
    return pytest.param(body, warning, uid, api_version)


GOOD = make_review(make_pod(labels={"betrace.dev/inject": "true"}), uid="u-1")


def _without(path: list[str]) -> dict[str, Any]:
    review = copy.deepcopy(GOOD)
    target = review
    for part in path[:-1]:
        target = target[part]
    del target[path[-1]]
    return review


def _with(path: list[str], value: Any) -> dict[str, Any]:
    review = copy.deepcopy(GOOD)
    target = review
    for part in path[:-1]:
        target = target[part]
    target[path[-1]] = value
    return review


@pytest.mark.parametrize("body, warning, uid, api_version", [
    _malformed(b"{not json", "not JSON"),
    _malformed(b"\xff\xfe\x00garbage", "not JSON"),
    _malformed(b"[1, 2]", "not an AdmissionReview"),
    _malformed({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}, "no request"),
    _malformed(_with(["kind"], "ConfigMap"), "expected an admission.k8s.io/v1 AdmissionReview",
               uid="u-1"),
    _malformed(_with(["apiVersion"], "admission.k8s.io/v1beta1"), "admission.k8s.io/v1beta1",
               uid="u-1", api_version="admission.k8s.io/v1beta1"),
    _malformed(_without(["request", "uid"]), "no uid"),
    _malformed(_without(["request", "kind"]), "no kind", uid="u-1"),
    _malformed(_without(["request", "object"]), "no Pod object", uid="u-1"),
    _malformed(_with(["request", "object", "spec"], "nope"), "no spec", uid="u-1"),
    _malformed(_with(["request", "kind"], {"group": "apps", "version": "v1",
                                           "kind": "Deployment"}),
               "only Pods are injected, this is apps/v1/Deployment", uid="u-1"),
])
def test_a_malformed_review_is_allowed_with_a_warning(
        hook: Running, body: Any, warning: str, uid: str, api_version: str,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="sidecar.k8s.webhook")
    answer = hook.post(body)
    assert answer["apiVersion"] == api_version
    assert answer["response"]["uid"] == uid
    assert patch_of(answer) is None
    [said] = answer["response"]["warnings"]
    assert said.startswith("betrace: ")
    assert warning in said, said
    assert len(said) <= 120
    if "only Pods" not in warning:  # a misrouted Deployment is skipped, not an error
        assert any("allowed without the sidecar" in r.getMessage() for r in caplog.records)


def test_a_body_over_the_limit_is_allowed_with_a_warning(
        start_webhook: Callable[..., Running], scrape: Callable[[int], Any]) -> None:
    running = start_webhook(max_body=4096)
    review = make_review(make_pod(labels={"betrace.dev/inject": "true"},
                                  annotations={"filler": "x" * 200_000}))
    answer = running.post(review)
    assert patch_of(answer) is None
    [warning] = answer["response"]["warnings"]
    assert "over the 4096-byte limit" in warning
    assert scrape(running.webhook.metrics_port).value(
        "betrace_webhook_reviews_total", result="error") == 1
    # and the server still answers the next review
    small = make_review(make_pod(labels={"betrace.dev/inject": "true"}))
    assert patch_of(running.post(small)) is not None


def test_an_internal_error_is_allowed_with_a_warning(
        hook: Running, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr(hook.webhook.injector, "template", broken)
    answer = hook.post(GOOD)
    assert answer["response"]["uid"] == "u-1"
    assert patch_of(answer) is None
    [warning] = answer["response"]["warnings"]
    assert "internal error" in warning


def test_plain_http_and_aborted_handshakes_do_not_stop_the_server(hook: Running) -> None:
    with socket.create_connection(("127.0.0.1", hook.port), timeout=5) as raw:
        raw.sendall(b"POST /mutate HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        raw.settimeout(5)
        with pytest.raises(OSError):
            while raw.recv(4096):  # the server gives up on the handshake and closes
                pass
            raise OSError("closed")
    with socket.create_connection(("127.0.0.1", hook.port), timeout=5):
        pass  # a TCP probe
    assert patch_of(hook.post(GOOD)) is not None


# --- endpoints, metrics, reloads ----------------------------------------------------------------

def test_healthz_and_unknown_paths(hook: Running, tls_files: tuple[Path, Path]) -> None:
    assert https(hook.port, "/healthz", tls_files[0]) == (200, b"ok\n")
    assert https(hook.port, "/nope", tls_files[0])[0] == 404
    assert https(hook.port, "/other", tls_files[0], b"{}")[0] == 404
    with urllib.request.urlopen(f"http://127.0.0.1:{hook.webhook.metrics_port}/healthz",
                                timeout=5) as reply:
        assert reply.read() == b"ok\n"


def test_review_counters(hook: Running, scrape: Callable[[int], Any]) -> None:
    port = hook.webhook.metrics_port
    first = scrape(port)
    for result in ("injected", "skipped", "error"):
        assert first.has("betrace_webhook_reviews_total", result=result)
        assert first.value("betrace_webhook_reviews_total", result=result) == 0
    hook.post(make_review(make_pod(labels={"betrace.dev/inject": "true"})))
    hook.post(make_review(make_pod(annotations={"betrace.dev/inject": "true"})))
    hook.post(make_review(make_pod()))
    hook.post(b"nonsense")
    after = scrape(port)
    assert after.value("betrace_webhook_reviews_total", result="injected") == 2
    assert after.value("betrace_webhook_reviews_total", result="skipped") == 1
    assert after.value("betrace_webhook_reviews_total", result="error") == 1
    assert not any(s.name.endswith("_created") for s in after.samples)


def test_a_template_change_is_picked_up_without_a_restart(
        hook: Running, template_file: Path, scrape: Callable[[int], Any],
        caplog: pytest.LogCaptureFixture) -> None:
    pod = make_pod(labels={"betrace.dev/inject": "true"})
    ops = patch_of(hook.post(make_review(pod)))
    assert ops is not None
    assert apply_patch(pod, ops)["spec"]["containers"][-1]["image"].endswith(":0.1.0")

    template_file.write_text(NEW_TEMPLATE)
    ops = patch_of(hook.post(make_review(pod)))
    assert ops is not None
    patched = apply_patch(pod, ops)
    assert patched["spec"]["containers"][-1] == {"name": "betrace",
                                                 "image": "ghcr.io/example/betrace:0.2.0"}
    assert [v["name"] for v in patched["spec"]["volumes"]] == ["betrace-rules", "betrace-scratch"]

    # A broken change keeps the last good template, logged and counted.
    caplog.set_level(logging.ERROR, logger="sidecar.k8s.webhook")
    template_file.write_text("container: [this is: not, a mapping")
    ops = patch_of(hook.post(make_review(pod)))
    assert ops is not None
    assert apply_patch(pod, ops)["spec"]["containers"][-1]["image"].endswith(":0.2.0")
    assert scrape(hook.webhook.metrics_port).value(
        "betrace_webhook_template_reload_failures_total") == 1
    assert any("keeping the last good one" in r.getMessage() for r in caplog.records)

    # A ConfigMap-style update: a new file swapped in under the same name.
    replacement = template_file.with_name("new.yaml")
    replacement.write_text(TEMPLATE.replace(":0.1.0", ":0.3.0"))
    os.replace(replacement, template_file)
    ops = patch_of(hook.post(make_review(pod)))
    assert ops is not None
    assert apply_patch(pod, ops)["spec"]["containers"][-1]["image"].endswith(":0.3.0")


def test_a_rotated_certificate_is_served_without_a_restart(
        hook: Running, tls_files: tuple[Path, Path], certs: dict[str, tuple[Path, Path]]) -> None:
    new_cert, new_key = certs["b"]
    with pytest.raises(urllib.error.URLError):
        https(hook.port, "/healthz", new_cert)  # still certificate "a"
    tls_files[1].write_bytes(new_key.read_bytes())
    tls_files[0].write_bytes(new_cert.read_bytes())
    assert https(hook.port, "/healthz", new_cert) == (200, b"ok\n")
    assert patch_of(post(hook.port, GOOD, new_cert)) is not None


def test_json_template(tmp_path: Path) -> None:
    path = tmp_path / "sidecar.json"
    path.write_text(json.dumps({"container": {"image": "b:1"}, "volumes": []}))
    template = load_template(str(path))
    assert template.container == {"image": "b:1", "name": "betrace"}
    assert template.volumes == ()


@pytest.mark.parametrize("text, message", [
    ("container: {image: x}\nvolume: []\n", "unknown key(s) 'volume'"),
    ("volumes: []\n", "`container:` must be a mapping"),
    ("container: {name: sidecar, image: x}\n", "container name must be 'betrace'"),
    ("container: {name: betrace}\n", "needs an `image:`"),
    ("container: {image: x}\nvolumes: [{emptyDir: {}}]\n", "volumes[0] needs a `name:`"),
    ("container: {image: x}\nvolumes: [{name: a}, {name: a}]\n", "listed twice"),
    ("container: {image: x, env: [{name: D, value: 2024-01-01}]}\n", "JSON cannot carry"),
    ("container: [oops\n", "not valid YAML"),
    ("container: {image: x, restartPolicy: OnFailure}\n", "can only be Always"),
    ("- just\n- a list\n", "expected a mapping"),
])
def test_bad_templates_are_named(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "t.yaml"
    path.write_text(text)
    with pytest.raises(TemplateError) as caught:
        load_template(str(path))
    assert message in str(caught.value)
    assert str(path) in str(caught.value)


# --- the command --------------------------------------------------------------------------------

def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("BETRACE_") and k != "POD_NAMESPACE"}
    env.update(extra)
    return env


def run_webhook(args: list[str], env: dict[str, str] | None = None,
                ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "sidecar", "webhook", *args], cwd=REPO,
                          env=env if env is not None else clean_env(), capture_output=True,
                          text=True, timeout=30, stdin=subprocess.DEVNULL)


def test_help() -> None:
    result = run_webhook(["--help"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: betrace webhook ")
    for flag in ("--listen", "--tls-cert", "--tls-key", "--sidecar-template",
                 "--metrics-listen", "--namespace", "BETRACE_TLS_CERT", "0.0.0.0:8443",
                 "0.0.0.0:9465"):
        assert flag in result.stdout
    assert result.stderr == ""


@pytest.mark.parametrize("change, message", [
    ({"--tls-cert": "/nonexistent/tls.crt"}, "tls-cert '/nonexistent/tls.crt': no such file"),
    ({"--tls-key": None}, "tls-key is required"),
    ({"--sidecar-template": "/nonexistent/t.yaml"},
     "sidecar-template '/nonexistent/t.yaml': no such file"),
    ({"--listen": "nowhere"}, "listen: 'nowhere' is not HOST:PORT"),
    ({"--log-level": "loud"}, "log-level 'loud'"),
    ({"--tls-key": "TEMPLATE"}, "cannot load the TLS certificate"),
    ({"--sidecar-template": "CERT"}, "sidecar template"),
])
def test_bad_settings_exit_2_with_a_clear_message(
        tls_files: tuple[Path, Path], template_file: Path, free_port: Callable[[], int],
        change: dict[str, str | None], message: str) -> None:
    files = {"TEMPLATE": str(template_file), "CERT": str(tls_files[0])}
    flags: dict[str, str | None] = {
        "--tls-cert": str(tls_files[0]), "--tls-key": str(tls_files[1]),
        "--sidecar-template": str(template_file), "--listen": f"127.0.0.1:{free_port()}",
        "--metrics-listen": ""}
    flags.update(change)
    args = [part for flag, value in flags.items() if value is not None
            for part in (flag, files.get(value, value))]
    result = run_webhook(args)
    assert result.returncode == 2, result.stderr
    assert "betrace webhook: " in result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_a_port_in_use_exits_2(tls_files: tuple[Path, Path], template_file: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_webhook(["--tls-cert", str(tls_files[0]), "--tls-key", str(tls_files[1]),
                              "--sidecar-template", str(template_file),
                              "--listen", f"127.0.0.1:{port}", "--metrics-listen", ""])
    assert result.returncode == 2, result.stderr
    assert "cannot listen for HTTPS" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_command_configured_from_the_environment_serves_and_stops_on_sigterm(
        tls_files: tuple[Path, Path], template_file: Path, free_port: Callable[[], int],
        wait_until: Callable[..., Any], scrape: Callable[[int], Any]) -> None:
    port, metrics_port = free_port(), free_port()
    env = clean_env(BETRACE_TLS_CERT=str(tls_files[0]), BETRACE_TLS_KEY=str(tls_files[1]),
                    BETRACE_SIDECAR_TEMPLATE=str(template_file),
                    BETRACE_METRICS_LISTEN=f"127.0.0.1:{metrics_port}",
                    POD_NAMESPACE=OWN_NAMESPACE)
    process = subprocess.Popen(
        [sys.executable, "-m", "sidecar", "webhook", "--listen", f"127.0.0.1:{port}"],
        cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE, text=True)
    try:
        def answers() -> bool:
            try:
                return https(port, "/healthz", tls_files[0]) == (200, b"ok\n")
            except OSError:
                assert process.poll() is None, "betrace webhook exited"
                return False

        wait_until(answers, timeout=20, what="the webhook to answer /healthz")
        labelled = make_pod(labels={"betrace.dev/inject": "true"})
        assert patch_of(post(port, make_review(labelled), tls_files[0])) is not None
        own = make_review(labelled, namespace=OWN_NAMESPACE)  # POD_NAMESPACE was honoured
        assert patch_of(post(port, own, tls_files[0])) is None
        counts = scrape(metrics_port)
        assert counts.value("betrace_webhook_reviews_total", result="injected") == 1
        assert counts.value("betrace_webhook_reviews_total", result="skipped") == 1
        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        assert process.stderr is not None
        stderr = process.stderr.read()
        process.stderr.close()
    assert f"betrace webhook listening: https://127.0.0.1:{port}/mutate" in stderr
    assert f"own namespace {OWN_NAMESPACE}" in stderr
    assert "injected the betrace sidecar into pod shop/checkout-7d9f-*" in stderr
    assert "Traceback" not in stderr
