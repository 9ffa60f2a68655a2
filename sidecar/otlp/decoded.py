"""What decoding one OTLP export request gives, whatever its encoding."""

from __future__ import annotations

from dataclasses import dataclass, field

from sidecar.model.spans import Span


@dataclass
class Decoded:
    """One request's selected spans by trace id, and what happened to the rest."""

    batch: dict[str, list[Span]] = field(default_factory=dict)
    received: int = 0
    not_selected: int = 0  # no rule names them: dropped by design
    own: int = 0  # our own violation spans, echoed back by the collector
    invalid: list[str] = field(default_factory=list)  # reasons, one per refused span
    # Traces none of whose spans here is selected, kept by id when the projection asks for it
    # (a rule fires on traces without its spans)
    bare_trace_ids: set[str] = field(default_factory=set)
