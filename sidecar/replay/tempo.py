"""Replay from Tempo: search with a TraceQL query compiled from the rules, then fetch every
candidate trace whole, so the rules are evaluated exactly as on any other source.

    errors: list[InputError] = []
    stats = TempoStats()
    for trace_id, spans in tempo_traces("http://tempo:3200", ruleset, since_ns, until_ns,
                                        errors=errors, stats=stats):
        trace = Trace(trace_id, spans)  # already whole: no grouping by trace id needed
        ...
    print("\\n".join(stats.lines()), file=sys.stderr)

That is how `betrace replay --tempo URL --since T --until T` is meant to use it (plus `org_id`
for a multi-tenant Tempo, `headers` for auth).

Searching (GET /api/search?q=&start=&end=&limit=&spss=): Tempo returns at most `limit` traces
per request, the first it finds, not the oldest. A window that comes back full (or whose
`metrics` say jobs were left unrun) is halved, down to `min_window_s` (1 s: the API takes whole
seconds); a window still full at that width is counted and logged, because results may be
missing there. The range starts in windows of at most a day (Tempo refuses searches longer than
its `max_duration`, 168h by default), and a "range exceeds" refusal halves the window too.
Trace ids are deduplicated across windows (a trace overlapping two windows is found twice).

Fetching (GET /api/v2/traces/<id>, Tempo 2.x, `{"trace": {...}}`; on 404 GET /api/traces/<id>,
older Tempo, `{"batches": [...]}` or `{"resourceSpans": [...]}`): no time range is passed, so
Tempo returns the whole trace even where it runs past the searched range. 404 means the trace
expired (or is not flushed yet): counted and logged, replay goes on. 429 and 5xx are retried
with exponential backoff (honouring Retry-After), as are timeouts and refused connections. A
trace that still fails is reported in `errors` and skipped; a search that fails raises
TempoError. Fetches run on a small thread pool: the work is waiting on the network.

    BetraceError (sidecar.model.errors)
     +-- TempoError               Tempo unreachable, or an answer that is not its API's
"""

from __future__ import annotations

import base64
import logging
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from http.client import HTTPException
from string import hexdigits
from typing import Any

import orjson

from sidecar.dsl import ANY_TRACE, pushdowns, traceql_for
from sidecar.model.errors import BetraceError
from sidecar.model.names import VIOLATION_SPAN
from sidecar.model.spans import Projection, Span
from sidecar.otlp.json_spans import InputError, spans_from_request
from sidecar.rules import RuleSet

__all__ = ["TempoClient", "TempoError", "TempoStats", "normalize_trace_id", "tempo_traces",
           "traceql_for"]

log = logging.getLogger(__name__)

DEFAULT_LIMIT = 1000  # traces per search request; keep it at or below Tempo's max_result_limit
DEFAULT_WORKERS = 8  # concurrent trace fetches
MAX_WINDOW_S = 86_400
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
_HEX = frozenset(hexdigits)
# (trace id, spans), or (trace id, spans, resource attribute per span) with `resource_key`
TempoTrace = tuple[str, list[Span]]  # a trace id and its spans
_URLSAFE_TO_STD = str.maketrans("-_", "+/")


class TempoError(BetraceError):
    """Tempo could not be reached, refused a request, or answered something other than JSON."""

    def __init__(self, message: str, url: str, status: int | None = None) -> None:
        super().__init__(f"{url}: {message}")
        self.url = url
        self.status = status
        self.reason = message


@dataclass
class TempoStats:
    """What a Tempo replay searched and fetched: the figures behind "nothing was missed"."""

    query: str = ""
    windows: int = 0  # search requests answered
    split: int = 0  # windows that came back full and were halved
    truncated: int = 0  # windows full at the minimum width: results may be missing there
    candidates: int = 0  # distinct trace ids the searches returned
    fetched: int = 0
    missing: int = 0  # 404 on fetch: expired since the search, or not flushed yet
    partial: int = 0  # Tempo returned part of a trace (over its size limit)
    failed: int = 0  # fetches that failed after retries, or held no readable trace
    retries: int = 0

    def lines(self) -> list[str]:
        out = [f"tempo: query {self.query}",
               (f"tempo: {self.windows} search window(s) ({self.split} split), "
                f"{self.candidates} candidate trace(s), {self.fetched} fetched, {self.missing} "
                f"missing, {self.failed} failed, {self.retries} retried request(s)")]
        if self.truncated:
            out.append(f"tempo: {self.truncated} one-second window(s) still held the search "
                       "limit: results there may be missing (raise --tempo-limit)")
        if self.partial:
            out.append(f"tempo: {self.partial} trace(s) were returned partially (over Tempo's "
                       "max trace size)")
        return out


@dataclass(frozen=True)
class SearchPage:
    trace_ids: list[str]
    full: bool  # the window may hold more traces than it returned


class TempoClient:
    """Tempo's HTTP query API (the query frontend, or a monolithic Tempo), JSON over urllib."""

    def __init__(self, base_url: str, *, timeout: float = 30.0,
                 headers: Mapping[str, str] | None = None, org_id: str | None = None,
                 retries: int = 4, backoff_s: float = 0.5, max_backoff_s: float = 10.0,
                 sleep: Callable[[float], None] = time.sleep,
                 stats: TempoStats | None = None) -> None:
        parsed = urllib.parse.urlsplit(base_url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"Tempo URL must be http(s)://host[:port][/prefix], not {base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.headers = {"Accept": "application/json", "User-Agent": "betrace-replay",
                        **(headers or {})}
        if org_id:
            self.headers["X-Scope-OrgID"] = org_id  # the tenant, on a multi-tenant Tempo
        self.retries, self.backoff_s, self.max_backoff_s = retries, backoff_s, max_backoff_s
        self.sleep = sleep
        self.stats = stats if stats is not None else TempoStats()
        self._lock = threading.Lock()
        self._v2: bool | None = None  # does /api/v2/traces exist? unknown until one answers

    # --- search ---

    def search_window(self, query: str, start_s: int, end_s: int, limit: int) -> SearchPage:
        """One search request over [start_s, end_s] (unix seconds)."""
        doc = self._get("/api/search", {"q": query, "start": start_s, "end": end_s,
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

    def search(self, query: str, start_s: int, end_s: int, limit: int = DEFAULT_LIMIT, *,
               min_window_s: int = 1, max_window_s: int = MAX_WINDOW_S) -> list[str]:
        """Every trace id the query finds in [start_s, end_s], windows split until none is full."""
        return list(self.iter_search(query, start_s, end_s, limit, min_window_s=min_window_s,
                                     max_window_s=max_window_s))

    def iter_search(self, query: str, start_s: int, end_s: int, limit: int = DEFAULT_LIMIT, *,
                    min_window_s: int = 1, max_window_s: int = MAX_WINDOW_S) -> Iterator[str]:
        """`search`, yielding new ids window by window (oldest window first) so that fetching
        can start before the search ends."""
        if end_s <= start_s or limit < 1 or min_window_s < 1 or max_window_s < min_window_s:
            raise ValueError("need start < end, limit >= 1 and 1 <= min_window <= max_window")
        seen: set[bytes] = set()
        windows = [(a, min(a + max_window_s, end_s)) for a in range(start_s, end_s, max_window_s)]
        stack = windows[::-1]
        while stack:
            a, b = stack.pop()
            try:
                page = self.search_window(query, a, b, limit)
            except TempoError as exc:
                if exc.status == 400 and "exceed" in exc.reason and b - a > min_window_s:
                    stack.extend(_halves(a, b)[::-1])  # longer than Tempo's max_duration
                    continue
                raise
            self.stats.windows += 1
            if page.full and b - a > min_window_s:
                self.stats.split += 1
                log.debug("tempo search [%d, %d] returned %d (full): halving", a, b,
                          len(page.trace_ids))
                stack.extend(_halves(a, b)[::-1])
            elif page.full:
                self.stats.truncated += 1
                log.warning("tempo search [%d, %d] still returned the limit (%d traces) at the "
                            "minimum window of %ds: results there may be missing; raise the "
                            "limit", a, b, limit, min_window_s)
            for trace_id in page.trace_ids:
                key = bytes.fromhex(trace_id)
                if key not in seen:
                    seen.add(key)
                    self.stats.candidates += 1
                    yield trace_id

    # --- fetch ---

    def fetch(self, trace_id: str) -> tuple[dict[str, Any], bool] | None:
        """The whole trace as an OTLP JSON request (`resourceSpans` or `batches`) and whether
        Tempo marked it partial; None when Tempo has no such trace (404)."""
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

    # --- HTTP ---

    def _url(self, path: str, params: Mapping[str, Any] | None = None) -> str:
        query = "?" + urllib.parse.urlencode(params) if params else ""
        return f"{self.base_url}{path}{query}"

    def _get(self, path: str, params: Mapping[str, Any] | None = None, *,
             missing_ok: bool = False) -> Any:
        """GET and decode JSON; None for a 404 when `missing_ok`. Retries what may pass."""
        url = self._url(path, params)
        attempt = 0
        while True:
            request = urllib.request.Request(url, headers=self.headers)
            retry_after: str | None = None
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    body = response.read()
                    content_type = response.headers.get("Content-Type") or "none"
                break
            except urllib.error.HTTPError as exc:
                with exc:  # an HTTPError is also the open response: close it
                    detail = _snippet(exc.read())
                    retry_after = exc.headers.get("Retry-After") if exc.headers else None
                if exc.code == 404 and missing_ok:
                    return None
                problem = f"HTTP {exc.code}: {detail}"
                if exc.code not in RETRY_STATUSES or attempt >= self.retries:
                    hint = " (is this Tempo's HTTP API URL?)" if exc.code == 404 else ""
                    raise TempoError(problem + hint, url, exc.code) from None
            except (OSError, HTTPException) as exc:  # refused, reset, timed out, bad status line
                problem = f"request failed: {getattr(exc, 'reason', None) or exc}"
                if attempt >= self.retries:
                    raise TempoError(f"{problem} (after {attempt + 1} attempts)", url) from None
            delay = min(self.max_backoff_s, self.backoff_s * 2 ** attempt)
            if retry_after is not None and retry_after.strip().isdigit():
                delay = min(self.max_backoff_s, float(retry_after))
            with self._lock:
                self.stats.retries += 1
            log.debug("tempo %s: %s; retrying in %.2fs", url, problem, delay)
            self.sleep(delay)
            attempt += 1
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            raise TempoError(f"answer is not JSON (Content-Type {content_type}): "
                             f"{_snippet(body)}", url) from None


def tempo_traces(url: str, ruleset: RuleSet, since_ns: int, until_ns: int, *,
                 errors: list[InputError] | None = None, stats: TempoStats | None = None,
                 client: TempoClient | None = None, limit: int = DEFAULT_LIMIT,
                 workers: int = DEFAULT_WORKERS, min_window_s: int = 1,
                 max_window_s: int = MAX_WINDOW_S, timeout: float = 30.0,
                 headers: Mapping[str, str] | None = None, org_id: str | None = None,
                 projection: Projection | None = None, resource_key: str | None = None,
                 ) -> Iterator[TempoTrace]:
    """Every trace in [since_ns, until_ns] that could violate a rule of `ruleset`, whole, as
    (trace id, spans reduced to `projection`, by default what the rules read). Traces are found
    by overlap with the range (Tempo's search), so spans outside it come along; filter them if
    wanted. With `resource_key` (say `service.version`, for --group-by), each span's `group` is
    its resource's value of that attribute (None where absent). A trace none of whose spans the
    projection keeps is left out, unless the projection keeps trace ids (then its span list is
    empty: a rule fires on it without its spans).

    A trace that cannot be fetched or read is appended to `errors` and skipped (without a list,
    ValueError is raised instead); a failed search raises TempoError."""
    if until_ns <= since_ns:
        raise ValueError("--until must be later than --since")
    if client is None:
        client = TempoClient(url, timeout=timeout, headers=headers, org_id=org_id, stats=stats)
    elif stats is not None:
        client.stats = stats
    stats = client.stats
    stats.query = traceql_for(ruleset)
    for rule_id, query in pushdowns(ruleset).items():
        if query == ANY_TRACE:
            log.warning("rule %s cannot narrow the Tempo search: every trace in the range is "
                        "fetched", rule_id)
    projection = projection if projection is not None else ruleset.projection()
    start_s, end_s = since_ns // 1_000_000_000, -(-until_ns // 1_000_000_000)
    ids = client.iter_search(stats.query, start_s, end_s, limit, min_window_s=min_window_s,
                             max_window_s=max_window_s)
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="betrace-tempo")
    pending: deque[tuple[str, Future[Any]]] = deque()
    try:
        for trace_id in ids:
            pending.append((trace_id, pool.submit(client.fetch, trace_id)))
            while len(pending) >= 2 * workers:  # bounded read-ahead, results in search order
                yield from _finish(client, *pending.popleft(), projection, resource_key, errors)
        while pending:
            yield from _finish(client, *pending.popleft(), projection, resource_key, errors)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _finish(client: TempoClient, trace_id: str, future: Future[Any], projection: Projection,
            resource_key: str | None, errors: list[InputError] | None
            ) -> Iterator[TempoTrace]:
    stats = client.stats
    source = client._url(f"/api/v2/traces/{trace_id}" if client._v2 is not False
                         else f"/api/traces/{trace_id}")

    def report(reason: str, where: str = source) -> None:
        error = InputError(where, 0, reason)
        if errors is None:
            raise ValueError(str(error))
        errors.append(error)

    try:
        result = future.result()
    except TempoError as exc:
        stats.failed += 1
        report(exc.reason, exc.url)
        return
    if result is None:
        stats.missing += 1
        log.warning("trace %s matched the search but Tempo no longer has it (expired?); skipped",
                    trace_id)
        return
    doc, partial = result
    if partial:
        stats.partial += 1
        log.warning("Tempo returned trace %s partially (over its max trace size)", trace_id)
    rejected: list[str] = []
    try:
        spans = spans_from_request(doc, projection, rejected, resource_key)
    except ValueError as exc:
        stats.failed += 1
        report(f"not an OTLP trace: {exc}")
        return
    for reason in rejected:
        report(reason)
    others = sum(1 for s in spans if s.trace_id != trace_id)
    if others:
        report(f"{others} span(s) of another trace in the answer; ignored")
    if others or any(s.name == VIOLATION_SPAN for s in spans):
        # our own violation spans live in the traces they flag: never evaluate them
        spans = [s for s in spans if s.trace_id == trace_id and s.name != VIOLATION_SPAN]
    stats.fetched += 1
    if not spans and not projection.trace_ids:
        return  # none survive the projection when the match came from `{ }`
    yield trace_id, spans


def normalize_trace_id(raw: Any) -> str:
    """32 lowercase hex from a hex id (Tempo drops leading zeros in search answers; 64-bit ids
    have 16 digits) or a base64 one (protobuf's JSON mapping of bytes); ValueError otherwise."""
    if type(raw) is not str or not raw:
        raise ValueError(f"invalid trace id {raw!r}")
    if len(raw) <= 32 and _HEX.issuperset(raw):
        trace_id = raw.lower().zfill(32)
    else:
        try:
            data = base64.b64decode(raw.translate(_URLSAFE_TO_STD) + "=" * (-len(raw) % 4),
                                    validate=True)
        except ValueError:
            raise ValueError(f"invalid trace id {raw!r}") from None
        if len(data) not in (8, 16):
            raise ValueError(f"invalid trace id {raw!r}: {len(data)} bytes")
        trace_id = data.hex().zfill(32)
    if not trace_id.strip("0"):
        raise ValueError("invalid trace id: all zeros")
    return trace_id


def _halves(a: int, b: int) -> list[tuple[int, int]]:
    middle = (a + b) // 2  # windows share their edge second: Tempo's bounds are whole seconds
    return [(a, middle), (middle, b)]


def _count(raw: Any) -> int | None:
    """A protobuf JSON integer (uint64 as a string, uint32 as a number)."""
    if type(raw) is int:
        return raw
    if type(raw) is str and raw.isdigit():
        return int(raw)
    return None


def _snippet(body: bytes) -> str:
    text = body.decode("utf-8", "replace").strip().replace("\n", " ")
    return (text[:200] + "...") if len(text) > 200 else text or "(empty body)"

