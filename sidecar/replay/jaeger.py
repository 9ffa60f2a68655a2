"""Replay from Jaeger: find the traces the rules could flag by service and operation through the
query service's api/v3 HTTP API (which answers OTLP JSON), then fetch each one whole (backend.py
does the splitting, fetching and decoding).

    client = JaegerClient("http://jaeger-query:16686")
    for trace_id, spans in client.traces(ruleset, since_ns, until_ns, errors=errors): ...

That is how `betrace replay --jaeger URL --since T --until T` uses it.

What to search: Jaeger searches one service at a time, optionally by operation (a span name,
exactly), and its HTTP API takes no attribute filter. So the rules give the span names a
violating trace must hold one of (`span_names_for`); each service's operations
(GET /api/v3/operations?service=S) are matched against them, quoted globs too, and every
matching (service, operation) is searched. A rule that needs no particular span (`not
trace.has(x)`, `"*".where(...)`) makes it every service (GET /api/v3/services), any operation.

Searching (GET /api/v3/traces?query.service_name=&query.operation_name=&query.start_time_min=
&query.start_time_max=&query.num_traces=&query.raw_traces=true, times in RFC 3339 with
nanoseconds): a trace is found when a span of that service and operation starts within the
window, bounds included. The answer is `{"result": {"resourceSpans": [...]}}`, the spans of every
trace found in one list, at most num_traces traces (the memory store: the most recently
received first), so a window returning num_traces is halved, down to a millisecond. Finding
nothing is a 404 ("No traces found"). The memory store refuses a num_traces above its
max_traces (HTTP 500).

Fetching (GET /api/v3/traces/<id>?raw_traces=true): the memory store's search answer already
holds whole traces, but another store may cut a trace at the searched range (Elasticsearch reads
only the indices of the range and an hour either side), so each trace is fetched again by id,
with no range. `raw_traces`: otherwise Jaeger adjusts traces for its UI (it rewrites span ids a
client and a server span share, adds `@jaeger@warnings` attributes, corrects clock skew when
configured to), and the memory store keeps what the adjusting wrote. 404: gone since the search.

Errors are `{"error": {"httpCode": N, "message": "..."}}` (Content-Type text/plain); a
JaegerError carries the message.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterator
from typing import Any

import orjson

from sidecar.dsl import glob_matcher, span_names_for
from sidecar.replay.backend import BackendError, SearchPage, TraceBackend, normalize_trace_id
from sidecar.rules import RuleSet

__all__ = ["JaegerClient", "JaegerError"]

Search = tuple[str, str | None]  # a service, and an operation in it (None: any)


class JaegerError(BackendError):
    """Jaeger could not be reached, refused a request, or answered something other than its
    api/v3 JSON."""


class JaegerClient(TraceBackend[Search]):
    """The api/v3 HTTP API of Jaeger's query service (the UI's port, 16686 by default)."""

    name = "Jaeger"
    error = JaegerError
    url_hint = "is this the URL of Jaeger's query service, port 16686 by default?"
    min_window = 1_000_000  # nanoseconds: a millisecond

    def services(self) -> list[str]:
        """Every service Jaeger holds spans of."""
        return sorted(set(self._list("/api/v3/services", None, "services", str)))

    def operations(self, service: str) -> list[str]:
        """The span names of one service (Jaeger lists a name once per span kind)."""
        found = self._list("/api/v3/operations", {"service": service}, "operations", dict)
        names = [operation.get("name") for operation in found]
        if not all(type(name) is str for name in names):
            raise JaegerError("operations answer holds an operation without a name",
                              self._url("/api/v3/operations", {"service": service}))
        return sorted(set(names))

    def candidates(self, ruleset: RuleSet, since_ns: int, until_ns: int,
                   limit: int) -> Iterator[str]:
        names = span_names_for(ruleset.rules)
        for rule in ruleset.rules if names is None else ():
            if span_names_for([rule]) is None:
                self.log.warning("rule %s cannot narrow the Jaeger search: every trace of "
                                 "every service in the range is fetched", rule.id)
        services = self.services()
        searches: list[Search] = []
        if names is None:
            searches = [(service, None) for service in services]
            self.stats.query = f"any span name, in each of {len(services)} service(s)"
        else:
            wanted = _matcher(names)
            for service in services:
                searches += [(service, name) for name in self.operations(service) if wanted(name)]
            shown = ", ".join(f'"{name}"' if glob else name for name, glob in names)
            self.stats.query = (f"span name(s) {shown}: {len(searches)} operation(s) in "
                                f"{len({service for service, _ in searches})} of "
                                f"{len(services)} service(s)")
        seen: set[bytes] = set()  # a trace of several services: found by each, fetched once
        for search in searches:
            yield from self.iter_search(search, since_ns, until_ns, limit, seen=seen)

    def search_window(self, query: Search, start: int, end: int, limit: int) -> SearchPage:
        """One search request over [start, end] (unix nanoseconds, both included)."""
        service, operation = query
        params = {"query.service_name": service, "query.start_time_min": _rfc3339(start),
                  "query.start_time_max": _rfc3339(end), "query.num_traces": limit,
                  "query.raw_traces": "true"}
        if operation is not None:
            params["query.operation_name"] = operation
        try:
            doc = self._get("/api/v3/traces", params, missing_ok=True)
        except JaegerError as exc:
            if "search depth" in exc.reason:  # the memory store's max_traces
                raise JaegerError(f"{exc.reason} (lower --search-limit)", exc.url,
                                  exc.status) from None
            raise
        if doc is None:
            return SearchPage([], False)  # "No traces found"
        url = self._url("/api/v3/traces")
        ids: dict[str, None] = {}  # in the answer's order
        for span in _spans(_result(doc, url), url):
            raw = span.get("traceId") if type(span) is dict else None
            try:
                ids[normalize_trace_id(raw)] = None
            except ValueError as exc:
                raise JaegerError(f"search answer holds a span with an {exc}", url) from None
        return SearchPage(list(ids), len(ids) >= limit)

    def fetch(self, trace_id: str) -> tuple[dict[str, Any], bool] | None:
        path = f"/api/v3/traces/{normalize_trace_id(trace_id)}"
        doc = self._get(path, {"raw_traces": "true"}, missing_ok=True)
        if doc is None:
            return None
        result = _result(doc, self._url(path))
        return (result, False) if result.get("resourceSpans") else None

    def trace_url(self, trace_id: str) -> str:
        return self._url(f"/api/v3/traces/{trace_id}")

    def _list(self, path: str, params: dict[str, str] | None, key: str,
              kind: type) -> list[Any]:
        """`doc[key]`, a list of `kind`, from an answer that omits an empty list."""
        doc = self._get(path, params)
        found = doc.get(key, []) if type(doc) is dict else None
        if type(found) is not list or not all(type(item) is kind for item in found):
            raise JaegerError(f"answer is not {{\"{key}\": [...]}}: {_short(doc)} "
                              f"({self.url_hint})", self._url(path, params))
        return found

    def _detail(self, body: bytes) -> str:
        try:
            message = orjson.loads(body)["error"]["message"]
        except (orjson.JSONDecodeError, TypeError, KeyError):
            return super()._detail(body)
        return message if type(message) is str else super()._detail(body)


def _matcher(names: list[tuple[str, bool]]) -> Callable[[str], bool]:
    exact = {name for name, glob in names if not glob}
    globs = [glob_matcher(name) for name, glob in names if glob]
    return lambda name: name in exact or any(match(name) for match in globs)


def _result(doc: Any, url: str) -> dict[str, Any]:
    result = doc.get("result") if type(doc) is dict else None
    if type(result) is not dict:
        raise JaegerError(f"answer is not {{\"result\": {{...}}}}: {_short(doc)}", url)
    return result


def _spans(result: dict[str, Any], url: str) -> Iterator[Any]:
    """Every span of an OTLP JSON request, shallowly checked (the decoder checks the rest)."""
    try:
        for resource in result.get("resourceSpans") or []:
            for scope in resource.get("scopeSpans") or []:
                yield from scope.get("spans") or []
    except (AttributeError, TypeError):
        raise JaegerError("search answer is not OTLP JSON (resourceSpans, scopeSpans, spans)",
                          url) from None


def _rfc3339(ns: int) -> str:
    """What Jaeger parses (Go's RFC3339Nano), in UTC."""
    seconds, fraction = divmod(ns, 1_000_000_000)
    moment = datetime.datetime.fromtimestamp(seconds, datetime.timezone.utc)
    return f"{moment:%Y-%m-%dT%H:%M:%S}.{fraction:09d}Z"


def _short(doc: Any) -> str:
    text = orjson.dumps(doc).decode()
    return text if len(text) <= 200 else text[:200] + "..."
