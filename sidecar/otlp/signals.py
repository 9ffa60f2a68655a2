"""A signal as the `betrace.v1.Signal` protobuf message (proto/betrace/v1/signal.proto), whose
JSON mapping is the signal log's line."""

from __future__ import annotations

import json

from sidecar.model.signals import Signal
from sidecar.proto.betrace.v1 import signal_pb2


def signal_message(signal: Signal) -> signal_pb2.Signal:
    """`context` goes through the same JSON encoding as the log (tuples become lists, anything
    else non-JSON becomes its str())."""
    message = signal_pb2.Signal(
        signal_id=signal.signal_id, rule_id=signal.rule_id, rule_name=signal.rule_name,
        severity=signal.severity, trace_id=signal.trace_id, span_ids=signal.span_ids,
        message=signal.message, mode=signal.mode, detected_at=signal.detected_at,
        violation_time=signal.violation_time, service=signal.service,
        service_version=signal.service_version, rule_digest=signal.rule_digest)
    message.context.SetInParent()  # present even when empty, as the log's `{}` parses
    message.context.update(json.loads(json.dumps(signal.context, default=str)))
    return message
