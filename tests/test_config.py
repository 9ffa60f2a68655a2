"""Settings of `betrace serve`: validation names every problem; secrets never reach the log."""

from __future__ import annotations

import pytest

from sidecar.live.app import redact
from sidecar.live.config import Settings


@pytest.mark.parametrize(("url", "shown"), [
    ("memory", "memory"),
    ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
    ("redis://:s3cret@redis:6379/0", "redis://:***@redis:6379/0"),
    ("rediss://app:p@ss@redis:6380", "rediss://app:***@redis:6380"),
    ("redis+cluster://app:s3cret@a:7000,b:7001", "redis+cluster://app:***@a:7000,b:7001"),
    ("unix:///run/redis.sock", "unix:///run/redis.sock"),
])
def test_store_urls_are_logged_without_their_password(url: str, shown: str) -> None:
    assert redact(url) == shown


def test_validate_names_every_problem() -> None:
    problems = Settings(decision_wait=0, max_trace_age=-1, max_traces=0, max_trace_bytes=0,
                        listen="nonsense", store="postgres://x").validate()
    assert any("decision-wait must be positive" in p for p in problems)
    assert any("max-trace-age must be positive" in p for p in problems)
    assert any("max-traces must be at least 1" in p for p in problems)
    assert any("max-trace-bytes must be at least 1" in p for p in problems)
    assert any(p.startswith("listen:") for p in problems)
    assert any("store 'postgres://x'" in p for p in problems)
    assert Settings().validate() == []
    assert Settings(store="redis+cluster://a:1,b:2").validate() == []
