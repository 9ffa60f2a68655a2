"""Hot reload: the rules path is polled (and SIGHUP forces a look); a change is loaded as a whole
and swapped in atomically. A bad change keeps the last good rules, logs every error with
file:line:col, and bumps `betrace_rule_reload_failures_total`; nothing stops the thread, and
`betrace_rule_reload_last_check_timestamp_seconds` shows it is still looking. The rules loaded
are logged one `rule <id> ...` line each (as `betrace rules` lists them), and the first good
reload after failed ones says so, with when the failures began.

Polling by content digest rather than inotify: it works the same on a Kubernetes ConfigMap
(whose files change by a symlink swap), on network volumes, and in tests.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence

from sidecar.live.metrics import Metrics
from sidecar.model.errors import RuleLoadError
from sidecar.model.signals import rfc3339
from sidecar.rules import RuleSet, load_rules, rule_files
from sidecar.rules.listing import log_lines

log = logging.getLogger(__name__)


def log_rules(ruleset: RuleSet) -> None:
    """Every rule, one INFO line each, so the log tells which rules ran when (start, reloads)."""
    for line in log_lines(ruleset):
        log.info("%s", line)


class RuleWatcher:
    def __init__(self, paths: Sequence[str], current: RuleSet, apply: Callable[[RuleSet], None],
                 metrics: Metrics, interval: float = 2.0) -> None:
        self.paths = list(paths)
        self.apply = apply
        self.metrics = metrics
        self.interval = interval
        self.digest = current.digest
        self._seen = self._fingerprint()
        self._poke = threading.Event()
        self._failures = 0  # failed reloads since the last good one
        self._failing_since: int | None = None  # when the first of them failed (ns)

    def _fingerprint(self) -> tuple[tuple[str, int, int], ...]:
        files, _ = rule_files(self.paths)
        stamps = []
        for path in files:
            try:
                stat = path.stat()
            except OSError:
                continue
            stamps.append((str(path), stat.st_mtime_ns, stat.st_size))
        return tuple(stamps)

    def reload(self) -> bool:
        """Load the rules now; True if a new rule set was swapped in."""
        self._seen = self._fingerprint()
        try:
            ruleset = load_rules(self.paths)
        except RuleLoadError as exc:
            self._refused(str(exc))
            return False
        except Exception as exc:  # noqa: BLE001 - a loader bug: refused, never the thread's end
            log.exception("rule reload failed on an unexpected error (a bug: please report it)")
            self._refused(f"{type(exc).__name__}: {exc}")
            return False
        self.metrics.rules_current.set(1)
        self.metrics.reload_last_success.set_to_current_time()
        if ruleset.digest == self.digest:
            self._good_again(changed=False)
            return False
        self.apply(ruleset)
        self.digest = ruleset.digest
        self.metrics.reloads.inc()
        self._good_again(changed=True)
        log.info("rules reloaded: %d enabled rule(s) from %d file(s), digest %s",
                 len(ruleset.rules), len(ruleset.files), ruleset.digest[:12])
        log_rules(ruleset)
        return True

    def _good_again(self, changed: bool) -> None:
        """After failed reloads, say once that the rules load again: the errors logged before
        are over."""
        if self._failing_since is None:
            return
        log.info("rules are good again after %d failed reload(s), failing since %s%s",
                 self._failures, rfc3339(self._failing_since),
                 "" if changed else "; they are the rules loaded before, unchanged")
        self._failures, self._failing_since = 0, None

    def _failed(self) -> None:
        self.metrics.reload_failures.inc()
        self._failures += 1
        if self._failing_since is None:
            self._failing_since = time.time_ns()

    def _refused(self, errors: str) -> None:
        self._failed()
        self.metrics.rules_current.set(0)
        log.error("rule reload failed; keeping the last good rules loaded before:\n%s", errors)

    def poke(self) -> None:
        """Ask for a reload at once (SIGHUP)."""
        self._poke.set()

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            poked = self._poke.wait(self.interval)
            if stop.is_set():
                return
            self._poke.clear()
            try:
                if poked or self._fingerprint() != self._seen:
                    self.reload()
            except Exception:  # noqa: BLE001 - e.g. applying the rules: logged, and watch on
                log.exception("rule reload failed; the reload thread goes on watching")
                self._failed()
            self.metrics.reload_last_check.set_to_current_time()
