"""Signals POSTed as JSON to any URL, for what Alertmanager does not fit: `{"signals": [...]}`,
each signal as in the signal log (plus `trace_url` with a template), optionally signed with
HMAC-SHA256 of the body in `X-Betrace-Signature: sha256=<hex>` so the receiver can tell it is
us."""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Sequence

from sidecar.model.signals import Signal, trace_link
from sidecar.routing.posting import TIMEOUT, post_json

SIGNATURE_HEADER = "X-Betrace-Signature"


class Webhook:
    def __init__(self, url: str, secret: bytes | None = None, trace_url: str = "",
                 timeout: float = TIMEOUT) -> None:
        self.url, self.secret, self.trace_url, self.timeout = url, secret, trace_url, timeout

    def deliver(self, signals: Sequence[Signal]) -> None:
        """POST the batch (raises Unreachable to be retried, Rejected if refused)."""
        items = []
        for signal in signals:
            item = signal.as_dict()
            if self.trace_url:
                item["trace_url"] = trace_link(self.trace_url, signal.trace_id)
            items.append(item)
        body = json.dumps({"signals": items}, ensure_ascii=False, default=str).encode()
        headers = {SIGNATURE_HEADER: sign(self.secret, body)} if self.secret else {}
        post_json(self.url, body, headers, self.timeout)


def sign(secret: bytes, body: bytes) -> str:
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()
