"""The explorer's web server (aiohttp): pages rendered here from the signal database and the
rules, no script in the browser. Every filter lives in the URL, so a link to a view can be
pasted in an incident channel. The database is opened read-only; only the playground runs
anything, in a child process."""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import io
import logging
import tempfile
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlencode

import jinja2
from aiohttp import web
from markupsafe import Markup

from sidecar.model.errors import SourceError
from sidecar.model.moments import parse_moment
from sidecar.model.signal_writers import cell
from sidecar.model.signals import rfc3339, trace_link
from sidecar.rules import SEVERITIES, RuleSet, load_rules
from sidecar.rules.examples import run_examples
from sidecar.signaldb import SignalDB, SignalQuery, open_signal_db
from sidecar.signaldb.report import write_signals
from sidecar.ui import playground
from sidecar.ui.chart import daily_chart

log = logging.getLogger(__name__)
T = TypeVar("T")

PAGE = 50  # signals per page
DATABASE = web.AppKey("database", str)  # what the app reads, as logs may show it
MAX_REQUEST_BYTES = playground.MAX_SAMPLE_BYTES + playground.MAX_RULE_BYTES + 64 * 1024
_COOKIE = "betrace_ui_token"
_HEADERS = {  # nothing runs, nothing is framed, nothing leaks through the Referer
    "Content-Security-Policy": "default-src 'none'; style-src 'self'; img-src 'self'; "
                               "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer"}
STARTER_RULE = """\
rules:
  - id: payment-retry-idempotency
    name: Payment retry must reuse its payment_intent_id
    severity: critical
    condition: >-
      trace.has(payment.charge).where(attempt > 1)
      and count(payment.charge).where(payment_intent_id == unique) > 1
    signal:
      context: [cart.id, payment_intent_id, attempt]
"""


@dataclass(frozen=True)
class UiSettings:
    signals_db: str
    password: str | None = None
    rules: tuple[str, ...] = ()  # rule files or directories shown on the rules page
    token: bytes | None = None  # asked of every request when set
    trace_url: str = ""  # a link to the trace: {trace_id} is filled in
    samples: tuple[str, ...] = ()  # OTLP files the playground can replay


def make_app(settings: UiSettings) -> web.Application:
    """The application; its database and worker thread close with it."""
    app = web.Application(client_max_size=MAX_REQUEST_BYTES,
                          middlewares=[_guard(settings.token)])
    views = _Views(settings)
    app.add_routes([
        web.get("/", _to_signals),
        web.get("/signals", views.signals), web.get("/signals.csv", views.csv),
        web.get("/signals/{signal_id}", views.signal), web.get("/rules", views.rules),
        web.get("/playground", views.playground), web.post("/playground", views.playground),
        web.get("/healthz", _ok),
        web.static("/static", Path(__file__).parent / "static")])
    app.on_cleanup.append(lambda _: views.close())
    app[DATABASE] = views.db.target
    return app


class _Views:
    def __init__(self, settings: UiSettings) -> None:
        self.settings = settings
        # one thread owns the database connection (a SignalDB is not shared between threads)
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="ui-db")
        self.db: SignalDB = open_signal_db(settings.signals_db, settings.password,
                                           read_only=True)
        self.db.connect()  # (a database that cannot be read stops the start)
        self.ruleset: RuleSet | None = load_rules(settings.rules) if settings.rules else None
        self.samples = _samples(settings.samples)
        self.pages = jinja2.Environment(
            loader=jinja2.PackageLoader("sidecar.ui", "templates"),
            autoescape=jinja2.select_autoescape(["html"]), undefined=jinja2.StrictUndefined)
        self.pages.filters["cell"] = cell

    async def close(self) -> None:
        await self._run(self.db.close)
        self.worker.shutdown()

    async def _run(self, call: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.worker, call)

    def _page(self, name: str, section: str, title: str, status: int = 200,
              **values: Any) -> web.Response:
        values.setdefault("problem", "")
        html = self.pages.get_template(name).render(
            section=section, title=title, database=self.db.target, **values)
        return web.Response(text=html, content_type="text/html", status=status)

    # -- signals ---------------------------------------------------------------------------

    async def signals(self, request: web.Request) -> web.Response:
        form, query, problem = _filters(request)
        page = max(1, _int(request.query.get("page"), 1))
        paged = dataclasses.replace(query, limit=PAGE, offset=(page - 1) * PAGE)
        group_by = form["group_by"]

        def read() -> dict[str, Any]:
            known = [g.value for g in self.db.groups(SignalQuery(), "rule")]
            total = self.db.count(query)
            found: dict[str, Any] = {"known_rules": sorted(known), "total": total,
                                     "chart": Markup(daily_chart(self.db.counts_by_day(query)))}
            if group_by:
                found["groups"] = self.db.groups(query, group_by)
                found["rows"] = []
            else:
                found["groups"] = None
                found["rows"] = list(self.db.signals(paged))
            return found

        found = await self._run(read) if not problem else {
            "known_rules": [], "total": 0, "chart": "", "groups": None, "rows": []}
        pages = max(1, -(-found["total"] // PAGE))
        here = _pairs(form)
        group_links = [urlencode(_pairs({**form, "group_by": "", "where": [
            *form["where"], f"{group_by}={g.value}"]}) if g.value is not None else "")
            for g in (found["groups"] or [])]
        return self._page(
            "signals.html", "signals", "Signals", 400 if problem else 200, problem=problem,
            form=form, severities=SEVERITIES, csv_query=urlencode(here), page=page,
            pages=pages, group_links=group_links,
            previous_page=urlencode(here + [("page", page - 1)]) if page > 1 else "",
            next_page=urlencode(here + [("page", page + 1)]) if page < pages else "",
            **found)

    async def csv(self, request: web.Request) -> web.Response:
        """Exactly the filtered signals, as `betrace signals --format csv` writes them."""
        _, query, problem = _filters(request)
        if problem:
            raise web.HTTPBadRequest(text=problem)

        def export() -> str:
            out = io.StringIO()
            write_signals(self.db.signals(query), "csv", out, self.db.context_keys(query))
            return out.getvalue()

        return web.Response(text=await self._run(export), content_type="text/csv", headers={
            "Content-Disposition": 'attachment; filename="betrace-signals.csv"'})

    async def signal(self, request: web.Request) -> web.Response:
        signal_id = request.match_info["signal_id"]
        found = await self._run(lambda: list(self.db.signals(
            SignalQuery(where=(("signal_id", signal_id),), limit=1))))
        if not found:
            return self._page("base.html", "signals", "Not found", 404,
                              problem=f"no signal {signal_id}")
        (stored,) = found
        link = trace_link(self.settings.trace_url, stored.trace_id) \
            if self.settings.trace_url else ""
        return self._page("signal.html", "signals", stored.rule_id, s=stored, trace_url=link)

    # -- rules ------------------------------------------------------------------------------

    async def rules(self, request: web.Request) -> web.Response:
        ruleset = self.ruleset
        if ruleset is None:
            return self._page("rules.html", "rules", "Rules", rules=[])
        since = rfc3339(time.time_ns() - 86400 * 10**9)
        recent = {g.value: g.count for g in await self._run(
            lambda: self.db.groups(SignalQuery(since=since), "rule"))}
        results = await self._run(lambda: run_examples(ruleset))
        rules = []
        for rule in ruleset.rules:
            examples = [{"title": r.title, "passed": r.passed,
                         "why": r.error or "; ".join(r.mismatches)}
                        for r in results if r.example.rule_id == rule.id]
            rules.append({"id": rule.id, "name": rule.name, "severity": rule.severity,
                          "description": rule.description, "examples": examples,
                          "recent": recent.get(rule.id, 0)})
        return self._page("rules.html", "rules", "Rules", rules=rules)

    # -- playground -------------------------------------------------------------------------

    async def playground(self, request: web.Request) -> web.Response:
        values = {"rule_text": STARTER_RULE, "samples": list(self.samples),
                  "chosen": next(iter(self.samples), "upload"), "outcome": None,
                  "shown": playground.MAX_SHOWN,
                  "max_upload": f"{playground.MAX_SAMPLE_BYTES // 2**20} MiB"}
        if request.method != "POST":
            return self._page("playground.html", "playground", "Playground", **values)
        form = await request.post()
        rule_text = str(form.get("rules", ""))
        chosen = str(form.get("sample", ""))
        values.update(rule_text=rule_text, chosen=chosen)
        with tempfile.TemporaryDirectory(prefix="betrace-ui-") as tmp:
            if chosen == "upload":
                upload = form.get("upload")
                if not isinstance(upload, web.FileField):
                    return self._page("playground.html", "playground", "Playground", 400,
                                      problem="choose a file to upload, or a sample", **values)
                sample = Path(tmp) / "upload.otlp.json"
                sample.write_bytes(upload.file.read())
            elif chosen in self.samples:
                sample = self.samples[chosen]
            else:
                return self._page("playground.html", "playground", "Playground", 400,
                                  problem=f"no sample {chosen!r}", **values)
            outcome = await asyncio.get_running_loop().run_in_executor(
                None, playground.run, rule_text, sample)
        return self._page("playground.html", "playground", "Playground",
                          outcome=outcome, **{k: v for k, v in values.items() if k != "outcome"})


def _filters(request: web.Request) -> tuple[dict[str, Any], SignalQuery, str]:
    """The filters of the URL as the form shows them, as a query, and what is wrong with them
    ("" if nothing)."""
    q = request.query

    def many(name: str) -> list[str]:
        return [v.strip() for v in q.getall(name, []) if v.strip()]

    form = {"rule": many("rule"), "severity": many("severity"), "service": many("service"),
            "mode": many("mode"), "since": q.get("since", "").strip(),
            "until": q.get("until", "").strip(), "where": many("where"),
            "group_by": q.get("group_by", "").strip()}
    problems, where = [], []
    for item in form["where"]:
        key, equals, value = item.partition("=")
        if not equals or not key.strip():
            problems.append(f"where {item!r}: expected ATTR=VALUE")
        else:
            where.append((key.strip(), value.strip()))
    times: dict[str, str | None] = {}
    for name in ("since", "until"):
        try:
            times[name] = rfc3339(parse_moment(form[name])) if form[name] else None
        except SourceError as exc:
            problems.append(f"{name}: {exc}")
            times[name] = None
    query = SignalQuery(rules=tuple(form["rule"]), severities=tuple(form["severity"]),
                        services=tuple(form["service"]), modes=tuple(form["mode"]),
                        since=times["since"], until=times["until"], where=tuple(where))
    return form, query, "; ".join(problems)


def _pairs(form: dict[str, Any]) -> list[tuple[str, Any]]:
    """The form as URL parameters, empty ones left out."""
    return [(k, v) for k, value in form.items()
            for v in (value if isinstance(value, list) else [value]) if v]


def _samples(extra: tuple[str, ...]) -> dict[str, Path]:
    """The playground's samples: the shipped incidents (rules/samples/ of this checkout, when
    it has them) and those given with --sample, by file name."""
    found = {}
    shipped = Path(__file__).resolve().parents[2] / "rules" / "samples"
    for path in [*sorted(shipped.glob("*.jsonl")), *map(Path, extra)]:
        if path.is_file():
            found[path.name] = path
    return found


def _int(text: str | None, default: int) -> int:
    try:
        return int(text) if text is not None else default
    except ValueError:
        return default


async def _to_signals(request: web.Request) -> web.Response:
    return web.Response(status=302, headers={"Location": "/signals"})


async def _ok(request: web.Request) -> web.Response:
    return web.Response(text="ok")


def _guard(token: bytes | None) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Security headers on every answer; with a token, every request must present it, as
    `Authorization: Bearer TOKEN` or the cookie set by visiting any page with `?token=TOKEN`."""

    @web.middleware
    async def guard(request: web.Request, handler: Callable[..., Awaitable[web.StreamResponse]]
                    ) -> web.StreamResponse:
        if token is not None:
            given = request.query.get("token")
            if given is not None and hmac.compare_digest(given.encode(), token):
                stripped = request.rel_url.with_query(
                    [(k, v) for k, v in request.query.items() if k != "token"])
                response = web.Response(status=302, headers={"Location": str(stripped),
                                                             **_HEADERS})
                response.set_cookie(_COOKIE, token.decode(), httponly=True, samesite="Strict",
                                    secure=request.secure)
                return response
            header = request.headers.get("Authorization", "")
            presented = header[7:].strip() if header.lower().startswith("bearer ") else \
                request.cookies.get(_COOKIE, "")
            if not hmac.compare_digest(presented.encode(), token):
                return web.Response(status=401, text="401: open this page with ?token=... "
                                    "or send Authorization: Bearer ...",
                                    headers=_HEADERS)
        try:
            answer = await handler(request)
        except web.HTTPException as exc:
            exc.headers.update(_HEADERS)
            raise
        answer.headers.update(_HEADERS)
        return answer

    return guard
