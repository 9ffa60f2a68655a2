"""What decoding keeps (`SpanFilter`) and what decoding one OTLP export request gives (`Decoded`),
whatever its encoding."""

from __future__ import annotations

from dataclasses import dataclass, field

from sidecar.model.spans import Projection, Span


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


@dataclass(frozen=True)
class SpanFilter:
    """What to keep: spans the projection selects that start in [since_ns, until_ns), with the
    resource attribute `resource_key` carried on each span as `group` (for --group-by)."""

    projection: Projection
    since_ns: int = 0
    until_ns: int = 2**64
    resource_key: str | None = None

    @classmethod
    def of(cls, projection: Projection, since_ns: int | None = None,
           until_ns: int | None = None, group_by: str | None = None) -> SpanFilter:
        """`projection` widened so every kept span keeps the `group_by` attribute too."""
        since, until = since_ns or 0, 2**64 if until_ns is None else until_ns
        if group_by is None:
            return cls(projection, since, until, None)
        inner, known = projection.attributes_for, {}

        def attributes_for(name: str) -> frozenset[str] | None:
            if name not in known:
                reads = inner(name)
                known[name] = None if reads is None else reads | {group_by}
            return known[name]
        attributes = None if projection.attributes is None else projection.attributes | {group_by}
        widened = Projection(projection.wants_name, attributes, attributes_for,
                             projection.trace_ids, projection.names)
        resource_key = None if group_by == "service.name" else group_by  # Span.service has it
        return cls(widened, since, until, resource_key)
