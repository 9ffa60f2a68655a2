"""Signals: what a violation becomes once detected, in the JSON-lines shape of the signal log.

`signal_id` is derived from the rule id and the trace id alone, so the same violation found by
two sidecars, or by two replays, carries the same id and can be deduplicated downstream.
"""

from __future__ import annotations

import datetime
import json
import uuid
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from sidecar.rules import Violation, span_order

if TYPE_CHECKING:
    from sidecar.proto.betrace.v1 import signal_pb2

_SIGNAL_NAMESPACE = uuid.UUID("5b1f2a4e-6c0d-4f57-9a3e-be7ace000001")


def signal_id(rule_id: str, trace_id: str) -> str:
    return str(uuid.uuid5(_SIGNAL_NAMESPACE, f"{rule_id}/{trace_id}"))


def rfc3339(unix_ns: int) -> str:
    """UTC timestamp with millisecond precision, as logs and CSV readers expect."""
    moment = datetime.datetime.fromtimestamp(unix_ns / 1e9, tz=datetime.timezone.utc)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Signal:
    signal_id: str
    rule_id: str
    rule_name: str
    severity: str
    trace_id: str
    span_ids: list[str]
    message: str
    context: dict[str, Any]
    mode: str
    detected_at: str
    violation_time: str | None  # start of the latest offending span: when it happened

    @classmethod
    def from_violation(cls, violation: Violation, mode: str, detected_ns: int) -> Signal:
        rule, spans = violation.rule, violation.spans
        return cls(
            signal_id=signal_id(rule.id, violation.trace.trace_id),
            rule_id=rule.id,
            rule_name=rule.name,
            severity=rule.severity,
            trace_id=violation.trace.trace_id,
            span_ids=[s.span_id for s in sorted(spans, key=span_order)],
            message=rule.message,
            context=violation.context(),
            mode=mode,
            detected_at=rfc3339(detected_ns),
            violation_time=rfc3339(max(s.start_ns for s in spans)) if spans else None,
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_proto(self) -> signal_pb2.Signal:
        """This signal as the `betrace.v1.Signal` message (proto/betrace/v1/signal.proto), whose
        JSON mapping is the signal log's line. `context` goes through the same JSON encoding as
        the log (tuples become lists, anything else non-JSON becomes its str())."""
        # Imported here, not at the top: the generated code checks the protobuf runtime's
        # version, and writing the signal log must not depend on it.
        from sidecar.proto.betrace.v1 import signal_pb2

        message = signal_pb2.Signal(
            signal_id=self.signal_id, rule_id=self.rule_id, rule_name=self.rule_name,
            severity=self.severity, trace_id=self.trace_id, span_ids=self.span_ids,
            message=self.message, mode=self.mode, detected_at=self.detected_at,
            violation_time=self.violation_time)
        message.context.SetInParent()  # present even when empty, as the log's `{}` parses
        message.context.update(json.loads(json.dumps(self.context, default=str)))
        return message
