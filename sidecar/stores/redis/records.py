"""Span records as Redis keeps them: msgpack with binary ids, and the span names and attribute keys
the rules read numbered by a `Vocabulary` (memory is the budget that matters in Redis)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import Any

import msgpack

from sidecar.model.spans import KINDS, STATUSES, Span, span_of

PREFIX = "bt:"
_STATUS_CODE = {name: i for i, name in enumerate(STATUSES)}
_KIND_CODE = {name: i for i, name in enumerate(KINDS)}
_U64 = 2**64 - 1


class Vocabulary:
    """Span names and attribute keys the rules read, numbered, so a record carries a number for
    them instead of the string (attribute keys alone are a third of a typical record). The tag is
    a digest of the words, so a tag always means the same words: sidecars on other rule versions
    find them under bt:words:<tag>, written again with every append batch so they outlive every
    record that uses them."""

    def __init__(self, words: Sequence[str]) -> None:
        self.words = tuple(words)
        self.number = {word: i for i, word in enumerate(self.words)}
        self.packed = msgpack.packb(self.words)
        self.tag = int.from_bytes(hashlib.sha256(self.packed).digest()[:4], "big")
        self.key = f"{PREFIX}words:{self.tag:08x}"

    def encode(self, span: Span) -> bytes:
        return self.encoder(set())(span)

    def encoder(self, altered: set[str]) -> Callable[[Span], bytes]:
        """A function making one msgpack record per span: the vocabulary's tag, binary ids,
        start and duration in ns, status and kind in one small int, then name, service and
        version (the resource's service.name and service.version: strings as they are, since
        the rules' vocabulary cannot know them; nil, one byte, when absent) and the attributes
        as a flat key, value, ... array (their OTLP types kept: bytes stay bytes). One per
        batch: it reuses its packer (a packer per span costs a third more). Traces whose records
        had to differ from their spans (numbers beyond 64 bits) go in `altered`."""
        number, tag, pack = self.number, self.tag, msgpack.Packer().pack

        def encode(span: Span) -> bytes:
            flat: list[Any] = []
            for key, value in span.attributes.items():
                flat.append(number.get(key, key))
                flat.append(value)
            record = (tag, bytes.fromhex(span.span_id), bytes.fromhex(span.parent_span_id),
                      span.start_ns, span.end_ns - span.start_ns,
                      _STATUS_CODE[span.status] * 8 + _KIND_CODE[span.kind],
                      number.get(span.name, span.name), span.service, span.version, flat)
            try:
                return pack(record)
            except OverflowError:  # a number beyond 64 bits: OTLP JSON can spell, not carry it
                altered.add(span.trace_id)
                return pack((*record[:3], min(max(record[3], 0), _U64),
                             max(min(record[4], 2**63 - 1), -2**63), *record[5:9],
                             [_storable(item) for item in flat]))
        return encode


def decode_span(trace_id: str, raw: bytes, words: Callable[[int], tuple[str, ...]]) -> Span:
    """A record back as a Span; `words(tag)` gives the vocabulary the record was written with."""
    tag, span_id, parent, start, duration, codes, name, service, version, flat = \
        msgpack.unpackb(raw, use_list=False)
    vocabulary = words(tag)
    if type(name) is int:
        name = vocabulary[name]
    pairs = iter(flat)
    attributes = {vocabulary[key] if type(key) is int else key: value
                  for key, value in zip(pairs, pairs)}
    return span_of(trace_id, span_id.hex(), name, parent.hex(), start, start + duration,
                   STATUSES[codes >> 3], KINDS[codes & 7], service, version, attributes, None)


def _storable(value: Any) -> Any:
    """Integers beyond 64 bits as their decimal text, everything else as it is."""
    if type(value) is int and not -2**63 <= value <= _U64:
        return str(value)
    if type(value) is tuple:
        return tuple(map(_storable, value))
    if type(value) is dict:
        return {key: _storable(item) for key, item in value.items()}
    return value
