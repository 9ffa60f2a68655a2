"""Replay from a trace store's HTTP query API (Tempo, Jaeger): search a time range for the traces
the rules could flag, then fetch each one whole, so the rules are evaluated exactly as on any
other source. This module is what every such store shares; tempo.py and jaeger.py speak their
store's API (what to search for, and where).

    client = JaegerClient("http://jaeger:16686")
    errors: list[InputError] = []
    for trace_id, spans in client.traces(ruleset, since_ns, until_ns, errors=errors):
        trace = Trace(trace_id, spans)  # already whole: no grouping by trace id needed
        ...
    print("\\n".join(client.stats.lines()), file=sys.stderr)

Searching: a store answers at most `limit` traces per search, and not necessarily the oldest.
A window that comes back full is halved, down to the client's `min_window`; a window still full
at that width is counted and logged, because results may be missing there. Trace ids are
deduplicated across windows and searches (a trace overlapping two windows, or found by two
searches, is fetched once).

Fetching: by id, with no time range, so the store returns the whole trace even where it runs
past the searched range. A trace gone by then (404: expired, evicted) is counted and logged, and
replay goes on. 429 and 5xx answers are retried with exponential backoff (honouring
Retry-After), as are timeouts and refused connections. A trace that still fails is reported in
`errors` and skipped; a search that fails raises the client's error. Fetches run on a small
thread pool: the work is waiting on the network.

    BetraceError (sidecar.model.errors)
     +-- BackendError             the store unreachable, or an answer that is not its API's
          +-- TempoError, JaegerError
"""

from __future__ import annotations

import logging
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from http.client import HTTPException
from string import hexdigits
from typing import Any, Generic, TypeVar

import orjson

from sidecar.model.errors import BetraceError
from sidecar.model.spans import Projection, Span
from sidecar.otlp.decoded import SpanFilter
from sidecar.otlp.json_spans import InputError, decode_base64, decode_json_request
from sidecar.rules import RuleSet

__all__ = ["DEFAULT_LIMIT", "BackendError", "SearchPage", "SearchStats", "TraceBackend",
           "WholeTrace", "normalize_trace_id"]

DEFAULT_LIMIT = 1000  # traces per search request; at most what the store allows
DEFAULT_WORKERS = 8  # concurrent trace fetches
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
WholeTrace = tuple[str, list[Span]]  # a trace id and its spans
Query = TypeVar("Query")  # what one search asks a store for (TraceQL; a service and operation)
_HEX = frozenset(hexdigits)


class BackendError(BetraceError):
    """A trace store could not be reached, refused a request, or answered something other than
    its API's JSON."""

    def __init__(self, message: str, url: str, status: int | None = None) -> None:
        super().__init__(f"{url}: {message}")
        self.url = url
        self.status = status
        self.reason = message


@dataclass
class SearchStats:
    """What a replay from a store searched and fetched: the figures behind "nothing was missed"."""

    backend: str  # the store, as each summary line starts: "tempo", "jaeger"
    query: str = ""  # what the rules made of the search
    windows: int = 0  # search requests answered
    split: int = 0  # windows that came back full and were halved
    truncated: int = 0  # windows full at the minimum width: results may be missing there
    candidates: int = 0  # distinct trace ids the searches returned
    fetched: int = 0
    missing: int = 0  # 404 on fetch: expired since the search, or not flushed yet
    partial: int = 0  # the store returned part of a trace (over its size limit)
    failed: int = 0  # fetches that failed after retries, or held no readable trace
    retries: int = 0

    @property
    def incomplete(self) -> bool:
        """Some trace in the range may have gone unchecked."""
        return bool(self.truncated or self.missing or self.partial)

    def lines(self) -> list[str]:
        name = self.backend
        out = [f"{name}: query {self.query}",
               (f"{name}: {self.windows} search window(s) ({self.split} split), "
                f"{self.candidates} candidate trace(s), {self.fetched} fetched, {self.missing} "
                f"missing, {self.failed} failed, {self.retries} retried request(s)")]
        if self.truncated:
            out.append(f"{name}: {self.truncated} window(s) of the minimum width still held the "
                       "search limit: results there may be missing (raise --search-limit)")
        if self.partial:
            out.append(f"{name}: {self.partial} trace(s) were returned partially (over the "
                       "store's max trace size)")
        return out


@dataclass(frozen=True)
class SearchPage:
    trace_ids: list[str]
    full: bool  # the window may hold more traces than it returned


class TraceBackend(ABC, Generic[Query]):
    """A trace store's HTTP query API, JSON over urllib. A subclass says what the rules make of
    a search (`candidates`), how one search window and one fetch are asked (`search_window`,
    `fetch`); the splitting, retrying, fetching and decoding are here."""

    name = "the store"  # in messages: "Tempo", "Jaeger"
    error: type[BackendError] = BackendError
    url_hint = "is this the store's HTTP API URL?"  # after an answer that is not the API's
    min_window = 1  # narrowest search window, in the unit `search_window` takes
    max_window: int | None = None  # widest (None: the whole range at once)

    def __init__(self, base_url: str, *, timeout: float = 30.0,
                 headers: Mapping[str, str] | None = None, retries: int = 4,
                 backoff_s: float = 0.5, max_backoff_s: float = 10.0,
                 sleep: Callable[[float], None] = time.sleep,
                 stats: SearchStats | None = None) -> None:
        parsed = urllib.parse.urlsplit(base_url)
        if parsed.scheme not in ("http", "https") or not parsed.netloc:
            raise ValueError(f"{self.name} URL must be http(s)://host[:port][/prefix], not "
                             f"{base_url!r}")
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        self.headers = {"Accept": "application/json", "User-Agent": "betrace-replay",
                        **(headers or {})}
        self.retries, self.backoff_s, self.max_backoff_s = retries, backoff_s, max_backoff_s
        self.sleep = sleep
        self.stats = stats if stats is not None else SearchStats(self.name.lower())
        self.log = logging.getLogger(type(self).__module__)
        self._lock = threading.Lock()

    # --- what a store says ---

    @abstractmethod
    def candidates(self, ruleset: RuleSet, since_ns: int, until_ns: int,
                   limit: int) -> Iterator[str]:
        """Each distinct id of a trace in the range that could violate a rule of `ruleset`,
        setting `stats.query` to what was searched for."""

    @abstractmethod
    def search_window(self, query: Query, start: int, end: int, limit: int) -> SearchPage:
        """One search request over [start, end]."""

    @abstractmethod
    def fetch(self, trace_id: str) -> tuple[dict[str, Any], bool] | None:
        """The whole trace as an OTLP JSON request and whether the store marked it partial;
        None when the store has no such trace (404)."""

    @abstractmethod
    def trace_url(self, trace_id: str) -> str:
        """Where the trace is fetched from, to locate errors about it."""

    def window_too_wide(self, error: BackendError) -> bool:
        """Whether a search refused for its range would pass on a narrower one."""
        return False

    # --- search ---

    def search(self, query: Query, start: int, end: int, limit: int = DEFAULT_LIMIT, *,
               min_window: int | None = None, max_window: int | None = None) -> list[str]:
        """Every trace id the query finds in [start, end], windows split until none is full."""
        return list(self.iter_search(query, start, end, limit, min_window=min_window,
                                     max_window=max_window))

    def iter_search(self, query: Query, start: int, end: int, limit: int = DEFAULT_LIMIT, *,
                    min_window: int | None = None, max_window: int | None = None,
                    seen: set[bytes] | None = None) -> Iterator[str]:
        """`search`, yielding ids not in `seen` (and adding them) window by window, oldest
        window first, so that fetching can start before the search ends."""
        narrowest = self.min_window if min_window is None else min_window
        widest = max_window or self.max_window or max(end - start, narrowest)
        if end <= start or limit < 1 or narrowest < 1 or widest < narrowest:
            raise ValueError("need start < end, limit >= 1 and 1 <= min_window <= max_window")
        seen = set() if seen is None else seen
        stack = [(a, min(a + widest, end)) for a in range(start, end, widest)][::-1]
        while stack:
            a, b = stack.pop()
            try:
                page = self.search_window(query, a, b, limit)
            except BackendError as exc:
                if self.window_too_wide(exc) and b - a > narrowest:
                    stack.extend(_halves(a, b)[::-1])
                    continue
                raise
            self.stats.windows += 1
            if page.full and b - a > narrowest:
                self.stats.split += 1
                self.log.debug("%s search %s [%d, %d] returned %d (full): halving", self.name,
                               query, a, b, len(page.trace_ids))
                stack.extend(_halves(a, b)[::-1])
            elif page.full:
                self.stats.truncated += 1
                self.log.warning("%s search %s [%d, %d] still returned the limit (%d traces) at "
                                 "the minimum window of %d: results there may be missing; raise "
                                 "the limit", self.name, query, a, b, limit, narrowest)
            for trace_id in page.trace_ids:
                key = bytes.fromhex(trace_id)
                if key not in seen:
                    seen.add(key)
                    self.stats.candidates += 1
                    yield trace_id

    # --- fetch ---

    def traces(self, ruleset: RuleSet, since_ns: int, until_ns: int, *,
               errors: list[InputError] | None = None, limit: int = DEFAULT_LIMIT,
               workers: int = DEFAULT_WORKERS, projection: Projection | None = None,
               resource_key: str | None = None) -> Iterator[WholeTrace]:
        """Every trace in [since_ns, until_ns] that could violate a rule of `ruleset`, whole, as
        (trace id, spans reduced to `projection`, by default what the rules read). Traces are
        found by the range, so spans outside it come along; filter them if wanted. With
        `resource_key` (say `service.version`, for --group-by), each span's `group` is its
        resource's value of that attribute (None where absent). A trace none of whose spans the
        projection keeps is left out, unless the projection keeps trace ids (then its span list
        is empty: a rule fires on it without its spans).

        A trace that cannot be fetched or read is appended to `errors` and skipped (without a
        list, ValueError is raised instead); a failed search raises the client's error."""
        if until_ns <= since_ns:
            raise ValueError("--until must be later than --since")
        keep = SpanFilter(projection if projection is not None else ruleset.projection(),
                          resource_key=resource_key)
        ids = self.candidates(ruleset, since_ns, until_ns, limit)
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="betrace-fetch")
        pending: deque[tuple[str, Future[Any]]] = deque()
        try:
            for trace_id in ids:
                pending.append((trace_id, pool.submit(self.fetch, trace_id)))
                while len(pending) >= 2 * workers:  # bounded read-ahead, in search order
                    yield from self._whole(*pending.popleft(), keep, errors)
            while pending:
                yield from self._whole(*pending.popleft(), keep, errors)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _whole(self, trace_id: str, future: Future[Any], keep: SpanFilter,
               errors: list[InputError] | None) -> Iterator[WholeTrace]:
        stats = self.stats
        source = self.trace_url(trace_id)

        def report(reason: str, where: str = source) -> None:
            error = InputError(where, 0, reason)
            if errors is None:
                raise ValueError(str(error))
            errors.append(error)

        try:
            result = future.result()
        except BackendError as exc:
            stats.failed += 1
            report(exc.reason, exc.url)
            return
        if result is None:
            stats.missing += 1
            self.log.warning("trace %s matched the search but %s no longer has it (expired?); "
                             "skipped", trace_id, self.name)
            return
        doc, partial = result
        if partial:
            stats.partial += 1
            self.log.warning("%s returned trace %s partially (over its max trace size)",
                             self.name, trace_id)
        try:  # (our own violation spans, in the traces they flag, are counted and skipped)
            decoded = decode_json_request(doc, keep)
        except ValueError as exc:
            stats.failed += 1
            report(f"not an OTLP trace: {exc}")
            return
        for reason in decoded.invalid:
            report(reason)
        spans = decoded.batch.pop(trace_id, [])
        others = sum(map(len, decoded.batch.values()))
        if others:
            report(f"{others} span(s) of another trace in the answer; ignored")
        stats.fetched += 1
        if not spans and not keep.projection.trace_ids:
            return  # none survive the projection when the search matched on something else
        yield trace_id, spans

    # --- HTTP ---

    def _url(self, path: str, params: Mapping[str, Any] | None = None) -> str:
        query = "?" + urllib.parse.urlencode(params) if params else ""
        return f"{self.base_url}{path}{query}"

    def _detail(self, body: bytes) -> str:
        """What an error answer says, for the message."""
        return _snippet(body)

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
                    detail = self._detail(exc.read())
                    retry_after = exc.headers.get("Retry-After") if exc.headers else None
                if exc.code == 404 and missing_ok:
                    return None
                problem = f"HTTP {exc.code}: {detail}"
                if exc.code not in RETRY_STATUSES or attempt >= self.retries:
                    hint = f" ({self.url_hint})" if exc.code == 404 else ""
                    raise self.error(problem + hint, url, exc.code) from None
            except (OSError, HTTPException) as exc:  # refused, reset, timed out, bad status line
                problem = f"request failed: {getattr(exc, 'reason', None) or exc}"
                if attempt >= self.retries:
                    raise self.error(f"{problem} (after {attempt + 1} attempts)", url) from None
            delay = min(self.max_backoff_s, self.backoff_s * 2 ** attempt)
            if retry_after is not None and retry_after.strip().isdigit():
                delay = min(self.max_backoff_s, float(retry_after))
            with self._lock:
                self.stats.retries += 1
            self.log.debug("%s %s: %s; retrying in %.2fs", self.name, url, problem, delay)
            self.sleep(delay)
            attempt += 1
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            raise self.error(f"answer is not JSON (Content-Type {content_type}): "
                             f"{_snippet(body)} ({self.url_hint})", url) from None


def normalize_trace_id(raw: Any) -> str:
    """32 lowercase hex from a hex id (Tempo drops leading zeros in search answers; 64-bit ids
    have 16 digits) or a base64 one (protobuf's JSON mapping of bytes); ValueError otherwise."""
    if type(raw) is not str or not raw:
        raise ValueError(f"invalid trace id {raw!r}")
    if len(raw) <= 32 and _HEX.issuperset(raw):
        trace_id = raw.lower().zfill(32)
    else:
        try:
            data = decode_base64(raw)
        except ValueError:
            raise ValueError(f"invalid trace id {raw!r}") from None
        if len(data) not in (8, 16):
            raise ValueError(f"invalid trace id {raw!r}: {len(data)} bytes")
        trace_id = data.hex().zfill(32)
    if not trace_id.strip("0"):
        raise ValueError("invalid trace id: all zeros")
    return trace_id


def _halves(a: int, b: int) -> list[tuple[int, int]]:
    middle = (a + b) // 2  # windows share their edge: a store's bounds may be inclusive
    return [(a, middle), (middle, b)]


def _snippet(body: bytes) -> str:
    text = body.decode("utf-8", "replace").strip().replace("\n", " ")
    return (text[:200] + "...") if len(text) > 200 else text or "(empty body)"
