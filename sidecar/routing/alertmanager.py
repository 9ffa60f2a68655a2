"""Signals as alerts to Alertmanager's API v2, the router this ecosystem already uses for
Slack, PagerDuty and e-mail: each signal one alert (labels alertname, rule, severity, service
and its signal_id), resolved `resolve_after` seconds later unless it is sent again. Route them
by `rule`, `severity` or `service` and group them (`group_by: [alertname, rule, service]`) in
alertmanager.yml."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from typing import Any

from sidecar.model.signals import Signal, rfc3339, trace_link
from sidecar.routing.posting import TIMEOUT, post_json

ALERTNAME = "BetraceViolation"


class Alertmanager:
    def __init__(self, url: str, trace_url: str = "", resolve_after: float = 300.0,
                 timeout: float = TIMEOUT, clock: Callable[[], float] = time.time) -> None:
        self.endpoint = url.rstrip("/") + "/api/v2/alerts"
        self.trace_url, self.resolve_after = trace_url, resolve_after
        self.timeout, self.clock = timeout, clock

    def deliver(self, signals: Sequence[Signal]) -> None:
        """POST the batch (raises Unreachable to be retried, Rejected if refused)."""
        ends = rfc3339(int((self.clock() + self.resolve_after) * 1e9))
        body = json.dumps([self.alert(s, ends) for s in signals], ensure_ascii=False,
                          default=str).encode()
        post_json(self.endpoint, body, timeout=self.timeout)

    def alert(self, signal: Signal, ends_at: str) -> dict[str, Any]:
        labels = {"alertname": ALERTNAME, "rule": signal.rule_id, "severity": signal.severity,
                  "service": signal.service or "", "signal_id": signal.signal_id}
        annotations = {
            "summary": signal.rule_name, "message": signal.message,
            "context": json.dumps(signal.context, ensure_ascii=False, default=str),
            "trace_id": signal.trace_id, "mode": signal.mode}
        if signal.service_version:
            annotations["service_version"] = signal.service_version
        alert: dict[str, Any] = {"labels": {k: v for k, v in labels.items() if v},
                                 "annotations": annotations,
                                 "startsAt": signal.violation_time or signal.detected_at,
                                 "endsAt": ends_at}
        if self.trace_url:
            alert["generatorURL"] = annotations["trace_url"] = trace_link(self.trace_url,
                                                                          signal.trace_id)
        return alert
