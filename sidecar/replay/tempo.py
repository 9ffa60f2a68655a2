"""Replay from Tempo: search with a TraceQL query compiled from the rules, then fetch every
candidate trace whole (backend.py does the splitting, fetching and decoding).

    client = TempoClient("http://tempo:3200", org_id="acme")  # org_id: a multi-tenant Tempo
    for trace_id, spans in client.traces(ruleset, since_ns, until_ns, errors=errors): ...

That is how `betrace replay --tempo URL --since T --until T` uses it (`headers` for auth).

Searching (GET /api/search?q=&start=&end=&limit=&spss=): Tempo returns at most `limit` traces
per request, the first it finds, not the oldest. A window is full when it returns the limit, or
when its `metrics` say jobs were left unrun. Windows are whole seconds (the API takes seconds),
at most a day wide at first (Tempo refuses searches longer than its `max_duration`, 168h by
default), and a "range exceeds" refusal halves the window too.

Fetching (GET /api/v2/traces/<id>, Tempo 2.x, `{"trace": {...}}`; on 404 GET /api/traces/<id>,
older Tempo, `{"batches": [...]}` or `{"resourceSpans": [...]}`): 404 means the trace expired
(or is not flushed yet); `traceType: PARTIAL` means Tempo cut it at its max trace size.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from sidecar.dsl import ANY_TRACE, pushdowns, traceql_for
from sidecar.replay.backend import BackendError, SearchPage, TraceBackend, normalize_trace_id
from sidecar.rules import RuleSet

__all__ = ["TempoClient", "TempoError"]

_NS = 1_000_000_000


class TempoError(BackendError):
    """Tempo could not be reached, refused a request, or answered something other than JSON."""


class TempoClient(TraceBackend[str]):
    """Tempo's HTTP query API (the query frontend, or a monolithic Tempo)."""

    name = "Tempo"
    error = TempoError
    url_hint = "is this Tempo's HTTP API URL?"
    min_window = 1  # seconds
    max_window = 86_400

    def __init__(self, base_url: str, *, org_id: str | None = None, **options: Any) -> None:
        super().__init__(base_url, **options)
        if org_id:
            self.headers["X-Scope-OrgID"] = org_id  # the tenant, on a multi-tenant Tempo
        self._v2: bool | None = None  # does /api/v2/traces exist? unknown until one answers

    def candidates(self, ruleset: RuleSet, since_ns: int, until_ns: int,
                   limit: int) -> Iterator[str]:
        self.stats.query = traceql_for(ruleset)
        for rule_id, query in pushdowns(ruleset).items():
            if query == ANY_TRACE:
                self.log.warning("rule %s cannot narrow the Tempo search: every trace in the "
                                 "range is fetched", rule_id)
        return self.iter_search(self.stats.query, since_ns // _NS, -(-until_ns // _NS), limit)

    def search_window(self, query: str, start: int, end: int, limit: int) -> SearchPage:
        """One search request over [start, end] (unix seconds)."""
        doc = self._get("/api/search", {"q": query, "start": start, "end": end,
                                        "limit": limit, "spss": 1})
        url = self._url("/api/search")
        if type(doc) is not dict:
            raise TempoError("search answer is not a JSON object", url)
        traces = doc.get("traces") or []  # protobuf's JSON mapping omits an empty list
        if type(traces) is not list:
            raise TempoError("search answer's 'traces' is not a list", url)
        ids = []
        for entry in traces:
            raw = entry.get("traceID") if type(entry) is dict else None
            try:
                ids.append(normalize_trace_id(raw))
            except ValueError:
                raise TempoError(f"search answer holds an invalid traceID {raw!r}", url) from None
        metrics = doc.get("metrics") if type(doc.get("metrics")) is dict else {}
        total, done = _count(metrics.get("totalJobs")), _count(metrics.get("completedJobs"))
        # The frontend stops running jobs once it holds `limit` traces; if it stopped with fewer,
        # it capped the limit lower (max_result_limit): more may exist either way.
        stopped_early = bool(ids) and total is not None and (done or 0) < total
        return SearchPage(ids, len(ids) >= limit or stopped_early)

    def window_too_wide(self, error: BackendError) -> bool:
        return error.status == 400 and "exceed" in error.reason  # past Tempo's max_duration

    def fetch(self, trace_id: str) -> tuple[dict[str, Any], bool] | None:
        trace_id = normalize_trace_id(trace_id)
        if self._v2 is not False:
            doc = self._get(f"/api/v2/traces/{trace_id}", missing_ok=True)
            if doc is not None:
                self._v2 = True
                return self._unwrap(doc, f"/api/v2/traces/{trace_id}")
            if self._v2:
                return None  # the v2 path works here: the trace is what is missing
        path = f"/api/traces/{trace_id}"
        doc = self._get(path, missing_ok=True)
        if doc is None:
            return None
        if self._v2 is None:
            self._v2 = False  # an older Tempo: only the v1 path exists
        return self._unwrap(doc, path)

    def trace_url(self, trace_id: str) -> str:
        return self._url(f"/api/v2/traces/{trace_id}" if self._v2 is not False
                         else f"/api/traces/{trace_id}")

    def _unwrap(self, doc: Any, path: str) -> tuple[dict[str, Any], bool] | None:
        if type(doc) is not dict:
            raise TempoError("trace answer is not a JSON object", self._url(path))
        partial = doc.get("traceType") == "PARTIAL"
        if "trace" in doc:  # v2: {"trace": {"resourceSpans": [...]}, "traceType": ...}
            doc = doc["trace"] or {}
            if type(doc) is not dict:
                raise TempoError("trace answer's 'trace' is not an object", self._url(path))
        if not doc.get("resourceSpans") and not doc.get("batches"):
            return None  # an empty trace: nothing stored under this id
        return doc, partial


def _count(raw: Any) -> int | None:
    """A protobuf JSON integer (uint64 as a string, uint32 as a number)."""
    if type(raw) is int:
        return raw
    if type(raw) is str and raw.isdigit():
        return int(raw)
    return None
