"""Replay's spill codec (`sidecar.replay._spill`): what `pack` writes, `unpack` gives back as equal
spans, whatever values they hold (the shared strings written once); bytes it did not write raise
ValueError, never crash, and under AddressSanitizer it reads nothing it should not."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from processes import fuzz_sanitized

from sidecar.model.spans import NO_ATTRIBUTES as _NO_ATTRIBUTES
from sidecar.model.spans import SLOT_DESCRIPTORS as _SLOTS
from sidecar.model.spans import Span, span_of
from sidecar.replay._spill import pack, unpack

BOUNDED = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(),
                    st.text(max_size=8), st.binary(max_size=4))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=3).map(tuple), st.dictionaries(st.text(max_size=3), inner, max_size=3)),
    max_leaves=6)
TEXT = st.text(max_size=6)  # lone surrogates too: marshal keeps what UTF-8 cannot
SPANS = st.builds(
    span_of, st.just(""), TEXT, st.sampled_from(["payment.charge", "auth.check", "päy"]), TEXT,
    st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1), st.sampled_from(["UNSET", "ERROR"]),
    st.sampled_from(["SERVER", "CLIENT"]), st.one_of(st.none(), st.sampled_from(["a", "b"])),
    st.one_of(st.none(), TEXT), st.dictionaries(st.sampled_from(["amount", "k", "ü", "attempt"]),
                                                VALUES, max_size=4), VALUES)
TRACES = st.lists(st.tuples(st.text(min_size=1, max_size=4), st.lists(SPANS, max_size=4)),
                  max_size=5)


def fields(traces: list[tuple[str, list[Span]]]) -> list[Any]:
    """Every slot of every span as its repr (a NaN equals a NaN, 1, 1.0 and True differ); the
    trace id is the item's."""
    return [(trace_id, [[repr(getattr(span, name)) for name in Span.__slots__
                         if name != "trace_id"] for span in spans])
            for trace_id, spans in traces]


@BOUNDED
@given(TRACES)
def test_what_is_packed_unpacks_equal(traces: list[tuple[str, list[Span]]]) -> None:
    back = unpack(pack(traces, _SLOTS), Span, _SLOTS, _NO_ATTRIBUTES)
    assert fields(back) == fields(traces)
    for trace_id, spans in back:
        assert all(span.trace_id is trace_id for span in spans)
        assert all(span.attributes is _NO_ATTRIBUTES for span in spans if not span.attributes)


def test_shared_strings_are_written_once() -> None:
    def span(number: int) -> Span:
        return span_of("", f"{number:016x}", "payment.charge", "", number, number, "ERROR",
                       "CLIENT", "payments", "v2.15.0", {"payment_intent_id": f"pi_{number}"},
                       "v2.15.0")
    one, many = pack([("t", [span(0)])], _SLOTS), pack([("t", [span(i) for i in range(100)])],
                                                         _SLOTS)
    assert many.count(b"payment.charge") == many.count(b"payment_intent_id") == 1
    assert (len(many) - len(one)) / 99 < 0.6 * len(one)  # each further span: its own values
    [(_, spans)] = unpack(many, Span, _SLOTS, _NO_ATTRIBUTES)
    assert spans[5].name is spans[6].name and spans[5].span_id == f"{5:016x}"


@given(st.binary(max_size=64))
@settings(max_examples=500, deadline=None)
def test_bytes_it_did_not_write_raise_value_error(data: bytes) -> None:
    try:
        unpack(data, Span, _SLOTS, _NO_ATTRIBUTES)
    except (ValueError, EOFError, TypeError):
        pass  # (marshal says EOFError or TypeError of its own bad data)


def test_damaged_packs_raise_value_error_or_unpack() -> None:
    rng = random.Random(3)
    base = pack([(f"{i:032x}", [span_of("", f"{i:016x}", "n", "", i, i, "OK", "SERVER", "s",
                                        None, {"k": i, "z": ("a", 1)}, None)]) for i in range(20)],
                _SLOTS)
    for _ in range(2000):
        data = bytearray(base)
        data[rng.randrange(len(data))] = rng.randrange(256)
        try:
            unpack(bytes(data[:rng.randrange(len(data) + 1)]), Span, _SLOTS, _NO_ATTRIBUTES)
        except (ValueError, EOFError, TypeError):
            pass


def test_arguments_are_checked() -> None:
    with pytest.raises(TypeError):
        pack([("t", ())], _SLOTS)
    with pytest.raises(TypeError):
        pack([("t", [object()])], _SLOTS)
    with pytest.raises(ValueError, match="shape"):
        pack([], _SLOTS[:3])
    with pytest.raises(TypeError, match="descriptors"):
        unpack(pack([], _SLOTS), Span, ("x",) * 12, _NO_ATTRIBUTES)
    assert unpack(pack([], _SLOTS), Span, _SLOTS, _NO_ATTRIBUTES) == []


FUZZ = """
import os, random, sys
sys.path[:0] = sys.argv[1:2]
import _spill  # the sanitized build
from sidecar.model.spans import Span, span_of
from sidecar.model.spans import NO_ATTRIBUTES as _NO_ATTRIBUTES
from sidecar.model.spans import SLOT_DESCRIPTORS as _SLOTS
rng = random.Random(5)
base = _spill.pack([(f"{i:032x}", [span_of("", f"{i:016x}", "payment.charge", "", i, 2**63 + i,
                                           "OK", "SERVER", "s", "v", {"k": i, "a": 1.5, "z": ("a", 1)},
                                           "g")]) for i in range(30)], _SLOTS)
for _ in range(5000):
    data = bytearray(base)
    for _ in range(rng.randint(1, 3)):
        data[rng.randrange(len(data))] = rng.randrange(256)
    for sample in (bytes(data[:rng.randrange(len(data) + 1)]), os.urandom(rng.randint(0, 40))):
        try:
            _spill.unpack(sample, Span, _SLOTS, _NO_ATTRIBUTES)
        except (ValueError, EOFError, TypeError):
            pass
print("clean")
"""


def test_no_memory_error_under_address_sanitizer(tmp_path: Path) -> None:
    """Built with AddressSanitizer and UBSan, unpack runs over 10,000 damaged and random inputs
    without a report."""
    fuzz_sanitized(Path(__file__).resolve().parent.parent / "sidecar" / "replay" / "_spill.c",
                   FUZZ, tmp_path)
