"""POSTing JSON to a receiver, with the two failures a dispatcher tells apart: `Unreachable`
(retried: no answer, a 5xx, a 429) and `Rejected` (a 4xx: the request itself is wrong)."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Mapping

from sidecar.routing.dispatcher import Rejected

TIMEOUT = 10.0  # seconds for one request, connection included


class Unreachable(Exception):
    """No answer, or one that says to try again later."""


def post_json(url: str, body: bytes, headers: Mapping[str, str] = {},
              timeout: float = TIMEOUT) -> None:
    request = urllib.request.Request(url, data=body, method="POST", headers={
        "Content-Type": "application/json", "User-Agent": "betrace", **headers})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()
    except urllib.error.HTTPError as exc:
        with exc:
            detail = exc.read(500).decode(errors="replace").strip()
        if exc.code >= 500 or exc.code == 429:
            raise Unreachable(f"{url} answered {exc.code} {exc.reason}") from None
        raise Rejected(f"{url} answered {exc.code} {exc.reason}: {detail}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise Unreachable(f"{url} unreachable: {reason}") from None
