"""`betrace ui` in a real headless browser (Debian's chromium, driven by Selenium through its
chromedriver: tests/browser.py), with real parts only.

A real `python -m sidecar ui` subprocess on a free loopback port serves a signal database the
real `betrace replay` filled from the shipped sample (rules/samples/incidents.otlp.jsonl over
rules/), on SQLite and on a real PostgreSQL (`signal_db_url`). What the page shows is checked
against what `betrace signals` prints for the same filters: the rows (trace ids) of a filter
chosen in the form, the groups and their counts, one signal's detail, and the CSV download
byte for byte. The playground runs the starter rule over the sample and an uploaded file and
shows a rule error with its caret; the rules page lists every rule with its examples passing.
Hostile context values stay text under a Content-Security-Policy, a --token-file keeps out
whoever has no token, and a bad filter is a 400 that says what is wrong.

Each screen is saved as a PNG (tests/browser.py: $BETRACE_SCREENSHOTS, else
build/ui-screenshots/).
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
import yaml
from browser import Browser
from processes import free_port, stop
from selenium.common.exceptions import NoAlertPresentException
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import Select

from sidecar.model.signals import Signal, signal_id
from sidecar.signaldb import open_signal_db

REPO = Path(__file__).resolve().parent.parent
RULES = REPO / "rules"
SAMPLE = RULES / "samples" / "incidents.otlp.jsonl"
TRACE_URL = "http://jaeger.example/trace/{trace_id}"
RETRY_RULE, RETRY_TRACE = "payment-retry-idempotency", "14e05284d84e53390accfac9b27c457c"
SCRIPT, IMAGE = "<script>alert(1)</script>", '"><img src=x onerror=alert(2)>'


# --- the command line -------------------------------------------------------------------------

def _env() -> dict[str, str]:
    """This environment (PGPASSWORD included, as signal_db_url sets it) without BETRACE_*."""
    return {k: v for k, v in os.environ.items() if not k.startswith("BETRACE_")}


def betrace(*args: str) -> bytes:
    """`python -m sidecar ARGS`'s stdout; it must succeed."""
    done = subprocess.run([sys.executable, "-m", "sidecar", *args], cwd=REPO, env=_env(),
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=60,
                          check=False)
    assert done.returncode == 0, f"betrace {' '.join(args[:2])} exited {done.returncode}:\n" \
                                 f"{done.stderr.decode(errors='replace')}"
    return done.stdout


def replay_sample(db_url: str) -> None:
    betrace("replay", "--rules", str(RULES), "--signals-db", db_url, "--progress", "never",
            str(SAMPLE))


def cli_signals(db_url: str, *filters: str) -> list[dict[str, Any]]:
    """`betrace signals --format jsonl` with `filters`, parsed."""
    out = betrace("signals", "--signals-db", db_url, *filters, "--format", "jsonl")
    return [json.loads(line) for line in out.decode().splitlines() if line.strip()]


# --- the page's server ------------------------------------------------------------------------

class Ui:
    """A `python -m sidecar ui` subprocess on a free loopback port, its log collected; ready
    when it logs that it listens."""

    def __init__(self, db_url: str, *extra: str, kind: str = "sqlite") -> None:
        self.db_url, self.kind = db_url, kind
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log: list[str] = []
        self.process = subprocess.Popen(
            [sys.executable, "-m", "sidecar", "ui", "--signals-db", db_url,
             "--listen", f"127.0.0.1:{self.port}", *extra],
            cwd=REPO, env=_env(), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        try:
            self._wait_for("betrace ui listening on http://")
        except BaseException:
            self.close()
            raise

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.log.append(line.rstrip("\n"))

    def _wait_for(self, text: str, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in list(self.log)):
            if self.process.poll() is not None:
                self._reader.join(2)
                if any(text in line for line in self.log):
                    break
                raise AssertionError(f"betrace ui exited ({self.process.returncode}) before "
                                     f"{text!r}:\n" + "\n".join(self.log))
            if time.monotonic() > deadline:
                raise AssertionError(f"betrace ui: no {text!r} within {timeout:g}s:\n"
                                     + "\n".join(self.log))
            time.sleep(0.02)

    def close(self) -> None:
        stop(self.process)
        self._reader.join(5)
        if self.process.stdout is not None:
            self.process.stdout.close()

    def shot(self, browser: Browser, name: str) -> None:
        """A screenshot named `name`, taken over SQLite only (PostgreSQL's screens are the
        same but for the database named in the header)."""
        if self.kind == "sqlite":
            browser.screenshot(name)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    """A fresh headless Chromium per test (downloads into tmp_path/downloads), always quit."""
    started = Browser(tmp_path / "downloads")
    try:
        yield started
    finally:
        started.close()


@pytest.fixture
def explorer(signal_db_url: str) -> Iterator[Ui]:
    """`betrace ui` over the replayed sample, on SQLite and on PostgreSQL."""
    replay_sample(signal_db_url)
    ui = Ui(signal_db_url, "--rules", str(RULES), "--trace-url", TRACE_URL,
            kind=signal_db_url.partition(":")[0])
    try:
        yield ui
    finally:
        ui.close()


@pytest.fixture(scope="module")
def sqlite_explorer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ui]:
    """One `betrace ui` over the replayed sample in SQLite, for the tests that only read."""
    db_url = f"sqlite:///{tmp_path_factory.mktemp('ui')}/signals.db"
    replay_sample(db_url)
    ui = Ui(db_url, "--rules", str(RULES), "--trace-url", TRACE_URL)
    try:
        yield ui
    finally:
        ui.close()


# --- reading the page -------------------------------------------------------------------------

def query_of(url: str) -> dict[str, list[str]]:
    """A URL's parameters, empty ones left out (as a submitted form sends every field)."""
    return parse_qs(urlsplit(url).query)


def shown_traces(browser: Browser) -> list[str]:
    """The trace ids of the signals table, top to bottom."""
    return [td.text for td in browser.driver.find_elements(
        By.CSS_SELECTOR, "#signals tr td:nth-child(6)")]


def heading(browser: Browser) -> str:
    return browser.driver.find_element(By.CSS_SELECTOR, "main h2").text


def choose(browser: Browser, name: str, value: str) -> None:
    Select(browser.driver.find_element(By.NAME, name)).select_by_value(value)


def apply(browser: Browser) -> None:
    browser.submit(browser.driver.find_element(By.ID, "apply"), "the filtered signals")


def cell(value: Any) -> str:
    """A context value as the page and the CSV show it: lists joined by '|', booleans lower
    case."""
    if isinstance(value, list):
        return "|".join(cell(v) for v in value)
    if isinstance(value, bool):
        return str(value).lower()
    return "" if value is None else str(value)


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # (urllib then answers the 3xx itself, as an HTTPError)


def http(url: str, token: str | None = None,
         follow: bool = True) -> tuple[int, dict[str, str], str]:
    """GET `url` with urllib: status, headers, body (redirects followed unless not `follow`)."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"}
                                     if token is not None else {})
    opener = urllib.request.build_opener(*(() if follow else (_NoRedirects,)))
    try:
        with opener.open(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read().decode()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, dict(error.headers), error.read().decode()


# --- 1. filters -------------------------------------------------------------------------------

def test_filter_by_severity_then_rule_through_the_form(explorer: Ui, browser: Browser) -> None:
    browser.get(f"{explorer.base}/signals")
    everything = cli_signals(explorer.db_url)
    assert len(everything) == 10
    assert shown_traces(browser) == [s["trace_id"] for s in everything]

    choose(browser, "severity", "critical")
    apply(browser)
    assert urlsplit(browser.driver.current_url).path == "/signals"
    assert query_of(browser.driver.current_url) == {"severity": ["critical"]}
    critical = [s["trace_id"] for s in cli_signals(explorer.db_url, "--severity", "critical")]
    assert 1 < len(critical) < len(everything)
    assert shown_traces(browser) == critical
    assert heading(browser) == f"{len(critical)} signal(s), newest first"
    assert browser.driver.find_elements(By.CSS_SELECTOR, "svg.chart")
    explorer.shot(browser, "signals")

    choose(browser, "rule", RETRY_RULE)  # the severity chosen before is still selected
    apply(browser)
    assert query_of(browser.driver.current_url) == {"rule": [RETRY_RULE],
                                                    "severity": ["critical"]}
    assert shown_traces(browser) == [s["trace_id"] for s in cli_signals(
        explorer.db_url, "--rule", RETRY_RULE, "--severity", "critical")] == [RETRY_TRACE]
    for name, value in (("rule", RETRY_RULE), ("severity", "critical")):
        selected = Select(browser.driver.find_element(By.NAME, name)).first_selected_option
        assert selected.get_attribute("value") == value


# --- 2. groups --------------------------------------------------------------------------------

def test_group_by_service_version_and_open_a_group(explorer: Ui, browser: Browser) -> None:
    browser.get(f"{explorer.base}/signals")
    browser.driver.find_element(By.NAME, "group_by").send_keys("service.version")
    apply(browser)
    assert query_of(browser.driver.current_url) == {"group_by": ["service.version"]}
    assert not browser.driver.find_elements(By.ID, "signals")

    rows = browser.driver.find_elements(By.CSS_SELECTOR, "#groups tr")[1:]
    shown = [tuple(td.text for td in row.find_elements(By.TAG_NAME, "td")) for row in rows]
    groups = cli_signals(explorer.db_url, "--group-by", "service.version")
    assert shown == [(g["service.version"], str(g["count"]), g["first"], g["last"])
                     for g in groups]
    assert shown[0][:2] == ("2.14.0", "2")  # checkout's bad deploy: two rules broken
    assert heading(browser) == "10 signal(s) by service.version"
    explorer.shot(browser, "groups")

    browser.submit(browser.driver.find_element(By.LINK_TEXT, "2.14.0"), "the group's signals")
    assert query_of(browser.driver.current_url) == {"where": ["service.version=2.14.0"]}
    expected = cli_signals(explorer.db_url, "--where", "service.version=2.14.0")
    assert len(expected) == 2
    assert shown_traces(browser) == [s["trace_id"] for s in expected]
    assert browser.driver.find_element(By.NAME, "where").get_attribute("value") == \
        "service.version=2.14.0"


def test_apply_keeps_every_repeated_filter(explorer: Ui, browser: Browser) -> None:
    """Two `where` filters and two rules in the URL survive the form: Apply filters by all."""
    both = {"where": ["service.version=2.14.0", "cart.id=cart_81723"]}
    browser.get(f"{explorer.base}/signals?" + urlencode(both, doseq=True))
    assert shown_traces(browser) == [RETRY_TRACE]
    apply(browser)
    assert query_of(browser.driver.current_url) == both
    assert shown_traces(browser) == [RETRY_TRACE]
    rules = {"rule": sorted([RETRY_RULE, "payment-requires-confirmed-reservation"])}
    browser.get(f"{explorer.base}/signals?" + urlencode(rules, doseq=True))
    apply(browser)
    assert query_of(browser.driver.current_url) == rules
    assert len(shown_traces(browser)) == 2


# --- 3. one signal ----------------------------------------------------------------------------

def test_open_a_signal_from_its_row(explorer: Ui, browser: Browser) -> None:
    [expected] = cli_signals(explorer.db_url, "--where", f"trace_id={RETRY_TRACE}")
    browser.get(f"{explorer.base}/signals")
    [row] = [tr for tr in browser.driver.find_elements(By.CSS_SELECTOR, "#signals tr")
             if [td.text for td in tr.find_elements(By.CSS_SELECTOR, "td:nth-child(6)")]
             == [RETRY_TRACE]]
    browser.submit(row.find_element(By.CSS_SELECTOR, "td:first-child a"), "the signal")

    assert urlsplit(browser.driver.current_url).path == f"/signals/{expected['signal_id']}"
    find = browser.driver.find_element
    assert find(By.ID, "message").text == expected["message"]
    assert find(By.ID, "spans").text == ", ".join(expected["span_ids"]) != ""
    context = {tds[0].text: tds[1].text for tds in (
        tr.find_elements(By.TAG_NAME, "td")
        for tr in browser.driver.find_elements(By.CSS_SELECTOR, "#context tr")[1:])}
    assert context == {k: cell(v) for k, v in expected["context"].items()}
    assert context["cart.id"] == "cart_81723"
    link = find(By.ID, "trace-link")
    assert link.get_attribute("href") == TRACE_URL.format(trace_id=RETRY_TRACE)
    assert link.text == RETRY_TRACE
    explorer.shot(browser, "signal")


# --- 4. CSV -----------------------------------------------------------------------------------

def test_csv_download_is_what_betrace_signals_prints(explorer: Ui, browser: Browser) -> None:
    def csv_of(*filters: str) -> bytes:
        return betrace("signals", "--signals-db", explorer.db_url, *filters, "--format", "csv")

    browser.get(f"{explorer.base}/signals")
    choose(browser, "severity", "critical")
    apply(browser)
    link = browser.driver.find_element(By.ID, "csv")
    assert urlsplit(link.get_attribute("href")).path == "/signals.csv"
    assert query_of(link.get_attribute("href")) == {"severity": ["critical"]}
    downloaded = browser.download(link.click)
    assert downloaded.name == "betrace-signals.csv"
    expected = csv_of("--severity", "critical")
    assert downloaded.read_bytes() == expected
    assert expected.count(b"\n") == 1 + 4  # a header and the 4 critical signals

    browser.get(f"{explorer.base}/signals?" + urlencode(
        {"since": "2026-10-05", "until": "2026-10-20", "where": "service.version=2.14.0"}))
    downloaded = browser.download(browser.driver.find_element(By.ID, "csv").click)
    assert downloaded.read_bytes() == csv_of("--since", "2026-10-05", "--until", "2026-10-20",
                                             "--where", "service.version=2.14.0")

    browser.get(f"{explorer.base}/signals")
    downloaded = browser.download(browser.driver.find_element(By.ID, "csv").click)
    assert downloaded.read_bytes() == csv_of()


# --- 5. playground ----------------------------------------------------------------------------

def run(browser: Browser) -> None:
    browser.submit(browser.driver.find_element(By.ID, "run"), "the playground's result")


def test_playground_runs_a_rule_shows_its_error_and_takes_an_upload(
        sqlite_explorer: Ui, browser: Browser, tmp_path: Path) -> None:
    find, find_all = browser.driver.find_element, browser.driver.find_elements
    browser.get(f"{sqlite_explorer.base}/playground")
    starter = find(By.ID, "rules-text").get_attribute("value")
    assert f"id: {RETRY_RULE}" in starter
    assert Select(find(By.ID, "sample")).first_selected_option.get_attribute("value") == \
        SAMPLE.name
    run(browser)
    assert find(By.ID, "found").text == "1 violating trace(s)"
    assert "1 signal(s)" in find(By.ID, "summary").text
    rows = [[td.text for td in tr.find_elements(By.TAG_NAME, "td")]
            for tr in find_all(By.CSS_SELECTOR, "#violations tr")[1:]]
    assert [row[:2] for row in rows] == [[RETRY_RULE, RETRY_TRACE]]
    assert not find_all(By.CSS_SELECTOR, "pre.check-error")
    sqlite_explorer.shot(browser, "playground")

    broken = starter.replace("attempt > 1", "attempt >> 1")
    assert broken != starter
    text = find(By.ID, "rules-text")
    text.clear()
    text.send_keys(broken)
    run(browser)
    [error] = find_all(By.CSS_SELECTOR, "pre.check-error")
    lines = error.text.splitlines()
    carets = [i for i, line in enumerate(lines) if line.rstrip().endswith("^")]
    assert carets, error.text
    source, caret = lines[carets[0] - 1], lines[carets[0]]
    assert "attempt >> 1" in source
    assert source[caret.index("^")] == ">", error.text  # it points into the `>>`
    assert not find_all(By.ID, "found")
    assert find(By.ID, "rules-text").get_attribute("value") == broken  # kept for fixing
    sqlite_explorer.shot(browser, "playground-error")

    # the violating trace's lines of the sample, uploaded as a file of its own
    lines = [line for line in SAMPLE.read_text().splitlines() if RETRY_TRACE in line]
    assert 1 < len(lines) < 10
    upload = tmp_path / "retry.otlp.jsonl"
    upload.write_text("\n".join(lines) + "\n")
    browser.get(f"{sqlite_explorer.base}/playground")
    Select(find(By.ID, "sample")).select_by_value("upload")
    run(browser)  # no file chosen yet
    assert "choose a file" in find(By.ID, "problem").text
    assert not find_all(By.ID, "found")
    Select(find(By.ID, "sample")).select_by_value("upload")
    find(By.ID, "upload").send_keys(str(upload))
    run(browser)
    assert not find_all(By.ID, "problem")
    assert find(By.ID, "found").text == "1 violating trace(s)"
    rows = [[td.text for td in tr.find_elements(By.TAG_NAME, "td")]
            for tr in find_all(By.CSS_SELECTOR, "#violations tr")[1:]]
    assert [row[:2] for row in rows] == [[RETRY_RULE, RETRY_TRACE]]
    assert Select(find(By.ID, "sample")).first_selected_option.get_attribute("value") == \
        "upload"


# --- 6. rules ---------------------------------------------------------------------------------

def test_rules_page_lists_every_rule_with_its_examples_passing(
        sqlite_explorer: Ui, browser: Browser) -> None:
    examples = {rule["id"]: len(rule.get("examples", []))
                for path in sorted(RULES.glob("*.yaml"))
                for rule in yaml.safe_load(path.read_text())["rules"]
                if rule.get("enabled", True)}
    assert len(examples) >= 10
    recent = {g["rule"]: g["count"] for g in cli_signals(
        sqlite_explorer.db_url, "--since", "24h", "--group-by", "rule")}

    browser.get(f"{sqlite_explorer.base}/rules")
    rows = browser.driver.find_elements(By.CSS_SELECTOR, "#rules tr[id^='rule-']")
    assert sorted(row.get_attribute("id") for row in rows) == sorted(
        f"rule-{rule}" for rule in examples)
    for rule, count in examples.items():
        row = browser.driver.find_element(By.ID, f"rule-{rule}")
        passed = row.find_elements(By.CSS_SELECTOR, "div.pass")
        assert len(passed) == count >= 1, rule
        assert all(div.text.startswith("PASS ") for div in passed), rule
        assert not row.find_elements(By.CSS_SELECTOR, "div.fail"), rule
        last = row.find_element(By.CSS_SELECTOR, "td:last-child a")
        assert last.text == str(recent.get(rule, 0)), rule
        assert query_of(last.get_attribute("href")) == {"rule": [rule], "since": ["24h"]}
    browser.screenshot("rules")


# --- 7. safety --------------------------------------------------------------------------------

def test_hostile_values_are_shown_as_text_under_a_csp(tmp_path: Path,
                                                      browser: Browser) -> None:
    db_url = f"sqlite:///{tmp_path}/hostile.db"
    hostile = Signal(
        signal_id=signal_id("hostile", "b" * 32), rule_id="hostile", rule_name=f"rule {IMAGE}",
        severity="high", trace_id="b" * 32, span_ids=["3" * 16], message=f"said {SCRIPT}",
        context={"note": SCRIPT, "q": IMAGE}, mode="live",
        detected_at="2026-11-25T02:32:00.000Z", violation_time="2026-11-25T02:31:00.000Z",
        service="web", service_version="1.0.0", rule_digest="d1")
    database = open_signal_db(db_url)
    try:
        database.connect()
        database.upsert([hostile])
    finally:
        database.close()
    ui = Ui(db_url)
    try:
        def harmless() -> None:
            assert browser.driver.find_elements(By.TAG_NAME, "script") == []
            assert browser.driver.find_elements(By.TAG_NAME, "img") == []
            with pytest.raises(NoAlertPresentException):
                browser.driver.switch_to.alert  # noqa: B018 (the property raises)

        browser.get(f"{ui.base}/signals")
        harmless()
        [context] = browser.driver.find_elements(By.CSS_SELECTOR, "#signals tr td:last-child")
        assert context.is_displayed() and context.text == f"note={SCRIPT} q={IMAGE}"

        browser.submit(browser.driver.find_element(By.CSS_SELECTOR, "#signals td a"))
        harmless()
        assert browser.driver.find_element(By.ID, "message").text == f"said {SCRIPT}"
        assert IMAGE in browser.driver.find_element(By.TAG_NAME, "h2").text
        values = [tr.find_elements(By.TAG_NAME, "td")[1] for tr in
                  browser.driver.find_elements(By.CSS_SELECTOR, "#context tr")[1:]]
        assert [td.text for td in values] == [SCRIPT, IMAGE]
        assert all(td.is_displayed() for td in values)
        browser.screenshot("hostile")

        # hostile filters are echoed into the form's fields as text, and still filter
        browser.get(f"{ui.base}/signals?" + urlencode({"where": f"note={SCRIPT}",
                                                       "service": IMAGE}))
        harmless()
        assert browser.driver.find_element(By.NAME, "where").get_attribute("value") == \
            f"note={SCRIPT}"
        assert browser.driver.find_element(By.NAME, "service").get_attribute("value") == IMAGE
        browser.get(f"{ui.base}/signals?" + urlencode({"where": f"note={SCRIPT}"}))
        assert shown_traces(browser) == ["b" * 32]

        for path in ("/signals", f"/signals/{hostile.signal_id}", "/signals.csv", "/rules",
                     "/playground", "/signals?since=soon", "/signals/nothing"):
            status, headers, _ = http(ui.base + path)
            assert status in (200, 400, 404), path
            policy = headers.get("Content-Security-Policy", "")
            assert "default-src 'none'" in policy, (path, policy)
            assert "script-src" not in policy, (path, policy)
            assert headers.get("X-Content-Type-Options") == "nosniff", path
    finally:
        ui.close()


def test_token_file_keeps_out_whoever_has_no_token(tmp_path: Path, browser: Browser) -> None:
    token = secrets.token_urlsafe(24)
    (tmp_path / "token").write_text(token + "\n")
    db_url = f"sqlite:///{tmp_path}/signals.db"
    replay_sample(db_url)
    ui = Ui(db_url, "--rules", str(RULES), "--token-file", str(tmp_path / "token"))
    try:
        assert http(f"{ui.base}/signals")[0] == 401
        assert http(f"{ui.base}/signals", token="wrong")[0] == 401
        assert http(f"{ui.base}/signals.csv")[0] == 401
        assert http(f"{ui.base}/signals?token=wrong")[0] == 401
        status, headers, _ = http(f"{ui.base}/signals", token=token)
        assert status == 200 and "default-src 'none'" in headers["Content-Security-Policy"]

        status, headers, _ = http(f"{ui.base}/signals?severity=critical&token={token}",
                                  follow=False)
        assert (status, headers.get("Location")) == (302, "/signals?severity=critical")
        assert "HttpOnly" in headers.get("Set-Cookie", ""), headers

        browser.get(f"{ui.base}/signals")
        assert "401" in browser.driver.find_element(By.TAG_NAME, "body").text
        assert not browser.driver.find_elements(By.ID, "apply")

        browser.get(f"{ui.base}/?token={token}")
        browser.wait(lambda d: d.find_elements(By.ID, "apply"), "the signals page")
        assert browser.driver.current_url == f"{ui.base}/signals"  # the token left the URL
        cookie = browser.driver.get_cookie("betrace_ui_token")
        assert cookie is not None and cookie["httpOnly"], cookie
        assert len(shown_traces(browser)) == 10

        browser.submit(browser.driver.find_element(By.LINK_TEXT, "Rules"))  # still in
        assert browser.driver.find_elements(By.CSS_SELECTOR, "#rules tr[id^='rule-']")
        browser.get(f"{ui.base}/signals?severity=critical&token={token}")
        browser.wait(lambda d: d.find_elements(By.ID, "apply"), "the signals page")
        assert browser.driver.current_url == f"{ui.base}/signals?severity=critical"
        assert len(shown_traces(browser)) == 4
    finally:
        ui.close()


# --- 8. a bad filter --------------------------------------------------------------------------

def test_a_bad_filter_says_what_is_wrong(sqlite_explorer: Ui, browser: Browser) -> None:
    base = sqlite_explorer.base
    browser.get(f"{base}/signals")
    browser.driver.find_element(By.NAME, "since").send_keys("soon")
    apply(browser)
    assert query_of(browser.driver.current_url) == {"since": ["soon"]}
    problem = browser.driver.find_element(By.ID, "problem")
    assert problem.is_displayed()
    assert "since" in problem.text and "soon" in problem.text, problem.text
    assert browser.driver.find_element(By.NAME, "since").get_attribute("value") == "soon"
    assert shown_traces(browser) == []
    browser.screenshot("problem")

    assert http(f"{base}/signals?since=soon")[0] == 400
    assert http(f"{base}/signals.csv?since=soon")[0] == 400
    status, _, body = http(f"{base}/signals?where=nonsense")
    assert status == 400 and 'id="problem"' in body and "ATTR=VALUE" in body
    status, _, body = http(f"{base}/signals/no-such-signal")
    assert status == 404 and 'id="problem"' in body



def test_the_chart_stacks_one_bar_per_rule_and_day_and_escapes_names() -> None:
    from sidecar.ui.chart import daily_chart

    svg = daily_chart([("2026-10-01", "a", 2), ("2026-10-01", "<b>", 1), ("2026-10-03", "a", 4)])
    assert svg.count("<title>") == 3  # one bar per (day, rule), none drawn over another
    assert "<b>" not in svg and "&lt;b&gt; (1)" in svg
    assert ">4<" in svg  # the tallest day's total labels the axis
    assert daily_chart([]) == ""
