"""`betrace webhook`: a Kubernetes mutating admission webhook that injects the BeTrace sidecar
container into the pods that ask for it.

It answers `POST /mutate` over HTTPS with an AdmissionReview (admission.k8s.io/v1) and serves
`GET /healthz` on the same port; Prometheus metrics are on a separate plain-HTTP port. The
MutatingWebhookConfiguration, its Service and its certificate come from the Helm chart, which
should also set `failurePolicy: Ignore`: the webhook itself never refuses a pod either.

Which pods get the sidecar:

- a Pod CREATE (any other operation or resource is allowed untouched);
- with the label `betrace.dev/inject: "true"` or the annotation `betrace.dev/inject: "true"`;
  the annotation `betrace.dev/inject: "false"` opts a pod out whatever its labels say;
- not in the webhook's own namespace (`--namespace`, else `POD_NAMESPACE`);
- without a container named `betrace` already (containers, initContainers or
  ephemeralContainers): such a pod is allowed as it is.

The mutation is a JSONPatch that appends the template's container to `/spec/containers` (or, when
the container says `restartPolicy: Always`, puts it first in `/spec/initContainers`: a native
sidecar, Kubernetes 1.29+, which does not keep a Job's pod running), its volumes to
`/spec/volumes` (creating the array when the pod has none), and sets the annotation
`betrace.dev/injected: "true"`. A template volume whose name the pod already uses for a different
volume would make the pod invalid, so that pod is left alone, with a warning.

Never blocking a pod: every review is answered HTTP 200 with `allowed: true`. A malformed review
(not JSON, not an admission.k8s.io/v1 AdmissionReview, no request or uid, a body over 4 MiB) or an
internal error gets a `warnings` entry saying why nothing was injected (the API server shows it
to whoever created the pod) and a log line.

The sidecar template (`--sidecar-template FILE`, YAML, or JSON when the name ends in `.json`)
holds the container to inject and, optionally, volumes to add to the pod:

```yaml
container:                    # required: a core/v1 Container, passed through as written
  name: betrace               # optional; when given it must be "betrace" (how an injected pod
                              # is recognised)
  image: ghcr.io/example/betrace:0.1.0     # required
  args: [serve, --rules, /etc/betrace/rules, --export-otlp, "127.0.0.1:4317"]
  ports:
    - {name: otlp-grpc, containerPort: 4319}
  volumeMounts:
    - {name: betrace-rules, mountPath: /etc/betrace/rules, readOnly: true}
  resources:
    requests: {cpu: 50m, memory: 64Mi}
    limits: {memory: 256Mi}
  securityContext: {runAsNonRoot: true, readOnlyRootFilesystem: true}
volumes:                      # optional: core/v1 Volumes added to the pod
  - name: betrace-rules
    configMap: {name: betrace-rules}
```

The file is checked on every review (stat: mtime, size, inode) and reloaded when it changed, so a
ConfigMap update needs no restart; a bad new version is logged, counted in
`betrace_webhook_template_reload_failures_total`, and the last good template stays in use. The
TLS certificate and key are watched the same way (cert-manager rotates them in place).

Metrics: `betrace_webhook_reviews_total{result="injected|skipped|error"}` and
`betrace_webhook_template_reload_failures_total`, on `--metrics-listen` at `/metrics`.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import json
import logging
import os
import signal
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import yaml
from prometheus_client import (
    CollectorRegistry,
    Counter,
    disable_created_metrics,
)

from sidecar.live.config import address_problems, binding, split_address
from sidecar.live.credentials import Watched, server_context
from sidecar.live.metrics import MetricsServer

log = logging.getLogger(__name__)

ADMISSION_V1 = "admission.k8s.io/v1"
INJECT_KEY = "betrace.dev/inject"
INJECTED_KEY = "betrace.dev/injected"
CONTAINER_NAME = "betrace"
MAX_BODY_BYTES = 4 << 20  # the API server caps a request body at 3 MiB; a review wraps one pod
MAX_DRAIN_BYTES = 64 << 20  # an oversized body is read and dropped up to this, then cut off
REQUEST_TIMEOUT = 10.0  # seconds for the TLS handshake and for reading a request
MAX_WARNING_CHARS = 120  # kubectl shows longer warnings, but the API server may truncate them
RESULTS = ("injected", "skipped", "error")
TEMPLATE_KEYS = ("container", "volumes")

disable_created_metrics()  # as in sidecar.live.metrics: `_created` series are noise here too


class WebhookError(ValueError):
    """The webhook cannot start as configured; the message says why."""


class TemplateError(WebhookError):
    """The sidecar template cannot be used; the message says why."""


@dataclass
class WebhookSettings:
    """Every knob of `betrace webhook`."""

    tls_cert: str = ""
    tls_key: str = ""
    sidecar_template: str = ""
    listen: str = "0.0.0.0:8443"  # HTTPS: POST /mutate, GET /healthz
    metrics_listen: str = "0.0.0.0:9465"  # /metrics, /healthz; "" turns it off
    namespace: str = ""  # the webhook's own namespace, never injected
    max_body: int = MAX_BODY_BYTES

    def validate(self) -> list[str]:
        problems = []
        for name in ("tls_cert", "tls_key", "sidecar_template"):
            flag = name.replace("_", "-")
            path = getattr(self, name)
            if not path:
                problems.append(f"{flag} is required (--{flag} FILE or "
                                f"BETRACE_{name.upper()})")
            elif not os.path.exists(path):
                problems.append(f"{flag} {path!r}: no such file")
            elif not os.path.isfile(path):
                problems.append(f"{flag} {path!r}: not a file")
        problems += address_problems(self, "listen", "metrics_listen")
        if self.max_body < 1:
            problems.append("max-body must be at least 1")
        return problems


# --- the sidecar template -----------------------------------------------------------------------

@dataclass(frozen=True)
class SidecarTemplate:
    container: dict[str, Any]
    volumes: tuple[dict[str, Any], ...]

    def describe(self) -> str:
        return (f"container image {self.container.get('image')!r}, "
                f"{len(self.volumes)} volume(s)")


def load_template(path: str) -> SidecarTemplate:
    """Read and check a template file; TemplateError says what is wrong."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read()
    except OSError as exc:
        raise TemplateError(f"sidecar template {path}: {exc.strerror or exc}") from None
    try:
        text = raw.decode("utf-8")
        doc = json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError, RecursionError) as exc:
        reason = str(exc).replace("\n", " ")
        raise TemplateError(f"sidecar template {path}: not valid "
                            f"{'JSON' if path.endswith('.json') else 'YAML'}: {reason}") from None
    try:
        return _check_template(doc)
    except TemplateError as exc:
        raise TemplateError(f"sidecar template {path}: {exc}") from None


def _check_template(doc: Any) -> SidecarTemplate:
    if not isinstance(doc, dict):
        raise TemplateError("expected a mapping with `container:` (and optional `volumes:`)")
    unknown = sorted(str(k) for k in doc if k not in TEMPLATE_KEYS)
    if unknown:
        raise TemplateError(f"unknown key(s) {', '.join(map(repr, unknown))}; expected "
                            "`container:` and optional `volumes:`")
    container = doc.get("container")
    if not isinstance(container, dict):
        raise TemplateError("`container:` must be a mapping (a Kubernetes container spec)")
    name = container.setdefault("name", CONTAINER_NAME)
    if name != CONTAINER_NAME:
        raise TemplateError(f"container name must be {CONTAINER_NAME!r} (it is how an injected "
                            f"pod is recognised), not {name!r}")
    if not isinstance(container.get("image"), str) or not container["image"].strip():
        raise TemplateError("container needs an `image:`")
    if container.get("restartPolicy", "Always") != "Always":
        raise TemplateError("container `restartPolicy:` can only be Always (a native sidecar, "
                            f"Kubernetes 1.29+), not {container['restartPolicy']!r}")
    volumes = doc.get("volumes") or []
    if not isinstance(volumes, list):
        raise TemplateError("`volumes:` must be a list of Kubernetes volumes")
    seen: set[str] = set()
    for index, volume in enumerate(volumes):
        if not isinstance(volume, dict) or not isinstance(volume.get("name"), str) \
                or not volume["name"]:
            raise TemplateError(f"volumes[{index}] needs a `name:`")
        if volume["name"] in seen:
            raise TemplateError(f"volume {volume['name']!r} is listed twice")
        seen.add(volume["name"])
    try:  # only JSON values can go into a patch (YAML dates and the like cannot)
        plain = json.loads(json.dumps({"container": container, "volumes": volumes},
                                      allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise TemplateError(f"holds a value JSON cannot carry: {exc}") from None
    return SidecarTemplate(plain["container"], tuple(plain["volumes"]))


# --- the decision -------------------------------------------------------------------------------

class Malformed(ValueError):
    """The review cannot be judged; the message becomes the warning."""


@dataclass
class Verdict:
    result: str  # injected | skipped | error
    reason: str
    patch: list[dict[str, Any]] | None = None
    warning: str | None = None


def pointer(*parts: str) -> str:
    """An RFC 6901 JSON pointer: `~` is written `~0` and `/` is written `~1`."""
    return "".join("/" + part.replace("~", "~0").replace("/", "~1") for part in parts)


def _strings(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        return {}
    return {k: v for k, v in value.items() if isinstance(k, str) and isinstance(v, str)}


def decide(request: dict[str, Any], template: SidecarTemplate, own_namespace: str) -> Verdict:
    """Whether and how to inject, for the `request` of an AdmissionReview."""
    kind = request.get("kind")
    if not isinstance(kind, dict) or not isinstance(kind.get("kind"), str):
        raise Malformed("the request has no kind")
    operation = request.get("operation")
    if not isinstance(operation, str):
        raise Malformed("the request has no operation")
    resource = request.get("resource")
    resource = resource if isinstance(resource, dict) else {}
    if (kind.get("group", ""), kind.get("kind")) != ("", "Pod") \
            or resource.get("resource", "pods") != "pods" or request.get("subResource"):
        what = "/".join(str(p) for p in (kind.get("group"), kind.get("version"), kind["kind"])
                        if p)
        sub = f" ({request.get('subResource')})" if request.get("subResource") else ""
        return Verdict("skipped", f"not a Pod: {what}{sub}",
                       warning=f"only Pods are injected, this is {what}{sub}")
    if operation != "CREATE":
        return Verdict("skipped", f"operation {operation}")
    pod = request.get("object")
    if not isinstance(pod, dict):
        raise Malformed("the request has no Pod object")
    metadata = pod.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise Malformed("the Pod's metadata is not an object")
    metadata = metadata or {}
    namespace = request.get("namespace") or metadata.get("namespace") or ""
    if own_namespace and namespace == own_namespace:
        return Verdict("skipped", "the webhook's own namespace")

    annotations, labels = metadata.get("annotations"), metadata.get("labels")
    if annotations is not None and not isinstance(annotations, dict):
        raise Malformed("the Pod's annotations are not an object")
    annotation = _strings(annotations).get(INJECT_KEY)
    label = _strings(labels).get(INJECT_KEY)
    warning = None
    if annotation is not None and annotation.strip().lower() not in ("true", "false"):
        warning = (f'annotation {INJECT_KEY}={annotation[:20]!r} is neither "true" nor '
                   '"false"; ignored')
        annotation = None
    if annotation is not None and annotation.strip().lower() == "false":
        return Verdict("skipped", "opted out by annotation")
    wanted = "true" in ((annotation or "").strip().lower(), (label or "").strip().lower())
    if not wanted:
        return Verdict("skipped", "not asked for", warning=warning)

    spec = pod.get("spec")
    if not isinstance(spec, dict):
        raise Malformed("the Pod has no spec")
    for field in ("containers", "initContainers", "ephemeralContainers"):
        listed = spec.get(field) or []
        if not isinstance(listed, list):
            raise Malformed(f"the Pod's spec.{field} is not a list")
        if any(isinstance(c, dict) and c.get("name") == CONTAINER_NAME for c in listed):
            return Verdict("skipped", f"already has a {CONTAINER_NAME!r} container")
    volumes = spec.get("volumes") or []
    if not isinstance(volumes, list):
        raise Malformed("the Pod's spec.volumes is not a list")
    present = {v.get("name"): v for v in volumes if isinstance(v, dict)}
    clashes = [v["name"] for v in template.volumes
               if v["name"] in present and present[v["name"]] != v]
    if clashes:
        return Verdict("skipped", f"volume name(s) {', '.join(clashes)} taken",
                       warning=f"sidecar not injected: the pod already has a different volume "
                       f"named {clashes[0]!r}")
    added = [v for v in template.volumes if v["name"] not in present]
    return Verdict("injected", "injected", _patch(pod, spec, metadata, added, template),
                   warning)


def _patch(pod: dict[str, Any], spec: dict[str, Any], metadata: dict[str, Any],
           volumes: list[dict[str, Any]], template: SidecarTemplate) -> list[dict[str, Any]]:
    ops: list[dict[str, Any]] = []
    container = copy.deepcopy(template.container)
    if container.get("restartPolicy") == "Always":  # a native sidecar: first init container,
        # so it runs for the other init containers too and never keeps a Job's pod alive
        if isinstance(spec.get("initContainers"), list):
            ops.append({"op": "add", "path": pointer("spec", "initContainers", "0"),
                        "value": container})
        else:
            ops.append({"op": "add", "path": pointer("spec", "initContainers"),
                        "value": [container]})
    elif isinstance(spec.get("containers"), list):
        ops.append({"op": "add", "path": pointer("spec", "containers", "-"), "value": container})
    else:
        ops.append({"op": "add", "path": pointer("spec", "containers"), "value": [container]})
    if volumes:
        if isinstance(spec.get("volumes"), list):
            ops += [{"op": "add", "path": pointer("spec", "volumes", "-"),
                     "value": copy.deepcopy(v)} for v in volumes]
        else:  # absent or null: `add` creates (or replaces the null with) the array
            ops.append({"op": "add", "path": pointer("spec", "volumes"),
                        "value": copy.deepcopy(volumes)})
    if "metadata" not in pod or pod["metadata"] is None:
        ops.append({"op": "add", "path": pointer("metadata"),
                    "value": {"annotations": {INJECTED_KEY: "true"}}})
    elif isinstance(metadata.get("annotations"), dict):
        ops.append({"op": "add", "path": pointer("metadata", "annotations", INJECTED_KEY),
                    "value": "true"})
    else:
        ops.append({"op": "add", "path": pointer("metadata", "annotations"),
                    "value": {INJECTED_KEY: "true"}})
    return ops


# --- the review ---------------------------------------------------------------------------------

class WebhookMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.reviews = Counter(
            "betrace_webhook_reviews", "Admission reviews answered, by outcome: injected, "
            "skipped (not asked for, opted out, already injected, own namespace, not a Pod "
            "CREATE), error (malformed review or internal error; the pod is allowed as is).",
            ["result"], registry=self.registry)
        for result in RESULTS:
            self.reviews.labels(result=result)
        self.template_reload_failures = Counter(
            "betrace_webhook_template_reload_failures", "Sidecar template (or TLS certificate) "
            "changes that could not be loaded; the last good one stays in use.",
            registry=self.registry)


class Injector:
    """Turns an AdmissionReview body into the AdmissionReview answer. Never raises and always
    allows: the worst outcome is a pod without the sidecar, and a warning saying why."""

    def __init__(self, template: Callable[[], SidecarTemplate], namespace: str,
                 metrics: WebhookMetrics) -> None:
        self.template = template
        self.namespace = namespace
        self.metrics = metrics

    def review(self, body: bytes) -> dict[str, Any]:
        uid, api_version = "", ADMISSION_V1
        try:
            try:
                doc = json.loads(body)
            except (ValueError, RecursionError) as exc:
                raise Malformed(f"the request body is not JSON ({_short(str(exc))})") from None
            if not isinstance(doc, dict):
                raise Malformed("the request body is not an AdmissionReview object")
            request = doc.get("request")
            if isinstance(request, dict) and isinstance(request.get("uid"), str):
                uid = request["uid"]
            if doc.get("apiVersion") == "admission.k8s.io/v1beta1":
                api_version = doc["apiVersion"]  # answer in kind, so the allow is understood
            if doc.get("kind") != "AdmissionReview" or doc.get("apiVersion") != ADMISSION_V1:
                raise Malformed(f"expected an {ADMISSION_V1} AdmissionReview, got "
                                f"{_short(doc.get('apiVersion'))} {_short(doc.get('kind'))}")
            if not isinstance(request, dict):
                raise Malformed("the AdmissionReview has no request")
            if not uid:
                raise Malformed("the AdmissionReview request has no uid")
            verdict = decide(request, self.template(), self.namespace)
            where = _pod_name(request)
        except Malformed as exc:
            verdict, where = Verdict("error", str(exc), warning=f"sidecar not injected: {exc}"), ""
            log.warning("malformed admission review (uid %r): %s; allowed without the sidecar",
                        uid, exc)
        except Exception as exc:  # noqa: BLE001 (never block a pod over a bug here)
            verdict, where = Verdict("error", f"internal error: {exc!r}",
                                     warning="sidecar not injected: internal error in the "
                                     "betrace webhook (see its log)"), ""
            log.exception("admission review %r failed; allowed without the sidecar", uid)
        self.metrics.reviews.labels(result=verdict.result).inc()
        if verdict.result == "injected":
            log.info("injected the betrace sidecar into pod %s (uid %s)", where, uid)
        elif verdict.result == "skipped":
            log.debug("pod %s (uid %s) not injected: %s", where, uid, verdict.reason)
        return answer(uid, verdict, api_version)

    def refuse_body(self, reason: str) -> dict[str, Any]:
        """The answer to a request whose body was not read (too big, not framed)."""
        self.metrics.reviews.labels(result="error").inc()
        log.warning("admission review not read: %s; allowed without the sidecar", reason)
        return answer("", Verdict("error", reason, warning=f"sidecar not injected: {reason}"))


def answer(uid: str, verdict: Verdict, api_version: str = ADMISSION_V1) -> dict[str, Any]:
    response: dict[str, Any] = {"uid": uid, "allowed": True}
    if verdict.patch:
        response["patchType"] = "JSONPatch"
        response["patch"] = base64.b64encode(
            json.dumps(verdict.patch, separators=(",", ":")).encode()).decode("ascii")
    if verdict.warning:
        response["warnings"] = [_warning(verdict.warning)]
    return {"apiVersion": api_version, "kind": "AdmissionReview", "response": response}


def _warning(text: str) -> str:
    text = "".join(ch if ch.isprintable() else " " for ch in f"betrace: {text}")
    return text if len(text) <= MAX_WARNING_CHARS else text[:MAX_WARNING_CHARS - 3] + "..."


def _short(value: Any, limit: int = 60) -> str:
    text = value if isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _pod_name(request: dict[str, Any]) -> str:
    pod = request.get("object")
    metadata = pod.get("metadata") if isinstance(pod, dict) else None
    metadata = metadata if isinstance(metadata, dict) else {}
    name = request.get("name") or metadata.get("name") or \
        f"{metadata.get('generateName') or ''}*"
    return f"{request.get('namespace') or metadata.get('namespace') or '?'}/{name}"


# --- the servers --------------------------------------------------------------------------------

class WebhookServer(ThreadingHTTPServer):
    """HTTPS, one request per connection. The TLS handshake happens in the connection's own
    thread (a slow client cannot stall the accept loop) with the newest certificate."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], tls: Callable[[], ssl.SSLContext],
                 injector: Injector, max_body: int) -> None:
        super().__init__(address, _WebhookHandler)
        self.tls = tls
        self.injector = injector
        self.max_body = max_body

    def finish_request(self, request: Any, client_address: Any) -> None:
        request.settimeout(REQUEST_TIMEOUT)
        try:
            connection = self.tls().wrap_socket(request, server_side=True)
        except OSError as exc:  # a port probe, a client that does not trust us, a timeout
            log.debug("TLS handshake with %s failed: %s", client_address[0], exc)
            return
        try:
            self.RequestHandlerClass(connection, client_address, self)
        finally:
            with contextlib.suppress(OSError):
                connection.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("connection from %s failed", client_address[0], exc_info=True)


class QuietHandler(BaseHTTPRequestHandler):
    """An HTTP handler that answers with whole bodies and writes no access lines: admission
    reviews every few seconds would drown the log."""

    def _send(self, status: int, content_type: str, body: bytes,
              headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """Nothing: see the class."""


class _WebhookHandler(QuietHandler):  # decisions are logged by the injector
    server: WebhookServer
    timeout = REQUEST_TIMEOUT
    server_version = "betrace-webhook"

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path.split("?")[0] == "/healthz":
            self._send(200, "text/plain", b"ok\n")
        else:
            self._send(404, "text/plain", b"not found: POST /mutate, GET /healthz\n")

    def do_POST(self) -> None:  # noqa: N802
        body = self._body()  # read first: a body left unread makes the close a reset
        if self.path.split("?")[0] != "/mutate":  # the API server appends ?timeout=10s
            self._send(404, "text/plain", b"not found: POST /mutate, GET /healthz\n")
            return
        injector = self.server.injector
        review = injector.review(body) if isinstance(body, bytes) else injector.refuse_body(body)
        self._send(200, "application/json", json.dumps(review).encode())

    def _body(self) -> bytes | str:
        """The request body, or why it was not read."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            return "chunked request bodies are not supported; send Content-Length"
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            return "the request has no Content-Length"
        limit = self.server.max_body
        if length <= limit:
            return self.rfile.read(length)
        left = min(length, MAX_DRAIN_BYTES)  # read and drop, so the client reads the answer
        while left > 0:
            chunk = self.rfile.read(min(left, 1 << 16))
            if not chunk:
                break
            left -= len(chunk)
        return f"the review is {length} bytes, over the {limit}-byte limit"



class Webhook:
    """One running webhook; the constructor loads the template and the certificate (raising
    WebhookError or CredentialError), `start()` binds the ports (port 0 picks a free one)."""

    def __init__(self, settings: WebhookSettings, metrics: WebhookMetrics | None = None) -> None:
        self.settings = s = settings
        self.metrics = metrics or WebhookMetrics()
        failed = self.metrics.template_reload_failures.inc
        self.template = Watched((s.sidecar_template,), lambda: load_template(s.sidecar_template),
                                 f"sidecar template {s.sidecar_template}", failed)
        self.tls = Watched((s.tls_cert, s.tls_key), lambda: server_context(s.tls_cert, s.tls_key),
                           f"TLS certificate {s.tls_cert}", failed)
        self.injector = Injector(self.template.current, s.namespace, self.metrics)
        self._https: WebhookServer | None = None
        self._metrics_http: MetricsServer | None = None
        self.port = self.metrics_port = 0

    def start(self) -> None:
        s = self.settings
        with binding("HTTPS", s.listen):
            self._https = WebhookServer(split_address(s.listen), self.tls.current,
                                        self.injector, s.max_body)
        self.port = self._https.server_address[1]
        if s.metrics_listen:
            with binding("metrics", s.metrics_listen):
                try:
                    self._metrics_http = MetricsServer(self.metrics.registry,
                                                       split_address(s.metrics_listen))
                except OSError:
                    self._https.server_close()
                    raise
            self.metrics_port = self._metrics_http.port
            self._metrics_http.start()
        threading.Thread(target=self._https.serve_forever, args=(0.1,), name="webhook-https",
                         daemon=True).start()
        if not s.namespace:
            log.warning("own namespace unknown (--namespace, POD_NAMESPACE): only the "
                        "MutatingWebhookConfiguration's namespaceSelector keeps the webhook's "
                        "own pods out")
        log.info("betrace webhook listening: https://%s:%d/mutate%s; sidecar template %s (%s); "
                 "own namespace %s", split_address(s.listen)[0], self.port,
                 f", metrics http://{split_address(s.metrics_listen)[0]}:{self.metrics_port}"
                 "/metrics" if self._metrics_http else "", s.sidecar_template,
                 self.template.current().describe(), s.namespace or "unknown")

    def stop(self) -> None:
        if self._https is not None:
            self._https.shutdown()
            self._https.server_close()
        if self._metrics_http is not None:
            self._metrics_http.close()
        self._https = self._metrics_http = None

    def serve_forever(self) -> int:
        """Run until SIGTERM or SIGINT."""
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, lambda *_: stop.set())
        self.start()
        while not stop.wait(1.0):
            pass
        self.stop()
        log.info("betrace webhook stopped")
        return 0
