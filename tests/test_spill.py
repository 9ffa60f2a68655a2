"""Replay's spill codec (`sidecar.replay._spill`): what a `Packer` holds, `unpack` gives back as
equal spans, each trace's in the part its id names and in the order added, whatever values they
hold (the shared strings written once per part); bytes it did not write raise ValueError, never
crash, and under AddressSanitizer it reads nothing it should not."""

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
from sidecar.replay._spill import Packer, unpack

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
# ids as the decoders make them (32 hex digits, either case), and any other text (hashed)
TRACE_IDS = st.one_of(st.text(min_size=1, max_size=4),
                      st.text("0123456789abcdefABCDEF", min_size=32, max_size=32),
                      st.sampled_from(["0" * 32, "f" * 32, "0" * 31 + "g"]))
TRACES = st.lists(st.tuples(TRACE_IDS, st.lists(SPANS, max_size=4)), max_size=6)


def fields(traces: dict[str, list[Span]]) -> dict[str, Any]:
    """Every slot of every span as its repr (a NaN equals a NaN, 1, 1.0 and True differ); the
    trace id is the key's."""
    return {trace_id: [[repr(getattr(span, name)) for name in Span.__slots__
                        if name != "trace_id"] for span in spans]
            for trace_id, spans in traces.items()}


def grouped(traces: list[tuple[str, list[Span]]]) -> dict[str, list[Span]]:
    out: dict[str, list[Span]] = {}
    for trace_id, spans in traces:
        out.setdefault(trace_id, []).extend(spans)
    return out


def hex_part(trace_id: str, count: int, depth: int) -> int | None:
    """The part a decoder's id goes to (eight of its hex digits, others at each depth)."""
    digits = trace_id[24 - 8 * depth:32 - 8 * depth]
    if len(trace_id) != 32 or not all(c in "0123456789abcdefABCDEF" for c in digits):
        return None
    return int(digits, 16) % count


@BOUNDED
@given(TRACES, st.integers(1, 5), st.integers(0, 2), st.booleans())
def test_what_is_packed_unpacks_equal_in_its_part(traces: list[tuple[str, list[Span]]],
                                                   count: int, depth: int, split: bool) -> None:
    packer = Packer(count, depth, _SLOTS)
    if split:  # added in two calls, the first as a dict
        half = len(traces) // 2
        assert packer.add(grouped(traces[:half])) + packer.add(traces[half:]) == \
            sum(len(spans) for _, spans in traces)
    else:
        assert packer.add(traces) == sum(len(spans) for _, spans in traces)
    chunks = packer.take()
    assert len(chunks) == count
    assert packer.size == 0 and packer.take() == [None] * count
    back: dict[str, list[Span]] = {}
    for number, chunk in enumerate(chunks):
        part: dict[str, list[Span]] = {}
        if chunk is not None:
            assert unpack(chunk, part, Span, _SLOTS, _NO_ATTRIBUTES) == \
                sum(map(len, part.values()))
        for trace_id in part:
            assert hex_part(trace_id, count, depth) in (None, number)
            assert trace_id not in back, "a trace is in one part"
        back.update(part)
    assert fields(back) == fields(grouped(traces))
    for trace_id, spans in back.items():
        assert all(span.trace_id == trace_id for span in spans)
        assert all(span.attributes is _NO_ATTRIBUTES for span in spans if not span.attributes)


def span(number: int) -> Span:
    return span_of("", f"{number:016x}", "payment.charge", "", number, number, "ERROR",
                   "CLIENT", "payments", "v2.15.0", {"payment_intent_id": f"pi_{number}"},
                   "v2.15.0")


def test_unpack_merges_into_the_traces_it_is_given() -> None:
    packer = Packer(1, 0, _SLOTS)
    packer.add([("t", [span(1)]), ("u", [span(2)]), ("t", [span(3)])])
    [chunk] = packer.take()
    traces = {"t": [span(0)]}
    assert unpack(chunk, traces, Span, _SLOTS, _NO_ATTRIBUTES) == 3
    assert [s.span_id for s in traces["t"]] == [f"{n:016x}" for n in (0, 1, 3)]
    assert [s.span_id for s in traces["u"]] == [f"{2:016x}"]
    with pytest.raises(TypeError, match="lists"):
        unpack(chunk, {"t": ()}, Span, _SLOTS, _NO_ATTRIBUTES)


def test_shared_strings_are_written_once_per_part() -> None:
    one, many = Packer(1, 0, _SLOTS), Packer(1, 0, _SLOTS)
    one.add([("t", [span(0)])])
    many.add([("t", [span(i)]) for i in range(100)])
    assert many.size > one.size
    [small], [big] = one.take(), many.take()
    assert big.count(b"payment.charge") == big.count(b"payment_intent_id") == 1
    assert (len(big) - len(small)) / 99 < 0.6 * len(small)  # each further span: its own values
    traces: dict[str, list[Span]] = {}
    unpack(big, traces, Span, _SLOTS, _NO_ATTRIBUTES)
    spans = traces["t"]
    assert spans[5].name is spans[6].name and spans[5].span_id == f"{5:016x}"


def test_a_shared_string_let_go_between_adds_is_never_taken_for_another() -> None:
    """The packer remembers shared strings by address; a batch's strings are freed once added,
    and a later string at the same address must still be written as itself."""
    packer = Packer(1, 0, _SLOTS)
    for number in range(2000):
        name = "".join(("name-", str(number % 7), "-", str(number)))  # a new object each time
        packer.add([(f"{number:032x}", [span_of("", f"{number:016x}", name, "", 1, 2, "OK",
                                                "SERVER", name[:7], None, {name: 1}, None)])])
        del name
    [chunk] = packer.take()
    traces: dict[str, list[Span]] = {}
    unpack(chunk, traces, Span, _SLOTS, _NO_ATTRIBUTES)
    for number in range(2000):
        [one] = traces[f"{number:032x}"]
        expected = f"name-{number % 7}-{number}"
        assert (one.name, one.service, one.attributes) == (expected, expected[:7], {expected: 1})


def test_an_entry_whose_length_is_not_its_spans_is_refused() -> None:
    packer = Packer(1, 0, _SLOTS)
    packer.add([("t1", [span(1)]), ("t2", [span(2)])])
    [chunk] = packer.take()
    at = chunk.index(b"s\x02t1") + 4 + 1  # the entry's id, then its flags, then its length
    assert int.from_bytes(chunk[at:at + 4], "little") > 0
    for wrong in (0, 1):
        damaged = chunk[:at] + wrong.to_bytes(4, "little") + chunk[at + 4:]
        with pytest.raises(ValueError, match="not what pack wrote"):
            unpack(damaged, {}, Span, _SLOTS, _NO_ATTRIBUTES)


@given(st.binary(max_size=64))
@settings(max_examples=500, deadline=None)
def test_bytes_it_did_not_write_raise_value_error(data: bytes) -> None:
    try:
        unpack(data, {}, Span, _SLOTS, _NO_ATTRIBUTES)
    except (ValueError, EOFError, TypeError):
        pass  # (marshal says EOFError or TypeError of its own bad data)


def test_damaged_packs_raise_value_error_or_unpack() -> None:
    rng = random.Random(3)
    packer = Packer(1, 0, _SLOTS)
    packer.add([(f"{i:032x}", [span_of("", f"{i:016x}", "n", "", i, i, "OK", "SERVER", "s",
                                       None, {"k": i, "z": ("a", 1)}, None)]) for i in range(20)])
    [base] = packer.take()
    for _ in range(2000):
        data = bytearray(base)
        data[rng.randrange(len(data))] = rng.randrange(256)
        try:
            unpack(bytes(data[:rng.randrange(len(data) + 1)]), {}, Span, _SLOTS, _NO_ATTRIBUTES)
        except (ValueError, EOFError, TypeError):
            pass


def test_arguments_are_checked_and_a_failed_add_stops_the_packer() -> None:
    with pytest.raises(ValueError, match="slots"):
        Packer(2, 0, _SLOTS[:3])
    with pytest.raises(ValueError, match="count"):
        Packer(0, 0, _SLOTS)
    with pytest.raises(ValueError, match="depth"):
        Packer(2, 3, _SLOTS)
    packer = Packer(2, 0, _SLOTS)
    for bad in ([("t", ())], [("t",)], [(1, [])], ("t", [])):
        with pytest.raises(TypeError):
            packer.add(bad)  # refused before anything is written
    assert packer.take() == [None, None]
    with pytest.raises(TypeError, match="doesn't apply"):
        packer.add([("t", [span(1), object()])])  # refused halfway through a trace
    with pytest.raises(RuntimeError, match="halfway"):
        packer.add([("u", [span(2)])])
    with pytest.raises(RuntimeError, match="halfway"):
        packer.take()
    with pytest.raises(TypeError, match="descriptors"):
        unpack(b"\x00", {}, Span, ("x",) * 12, _NO_ATTRIBUTES)
    traces: dict[str, list[Span]] = {}
    empty = b"\x00\x00"  # no shared strings, no trace entries
    assert unpack(empty, traces, Span, _SLOTS, _NO_ATTRIBUTES) == 0 and traces == {}


FUZZ = """
import random, sys
sys.path[:0] = sys.argv[1:2]
import _spill  # the sanitized build
from sidecar.model.spans import Span, span_of
from sidecar.model.spans import NO_ATTRIBUTES as _NO_ATTRIBUTES
from sidecar.model.spans import SLOT_DESCRIPTORS as _SLOTS
rng = random.Random(5)
tests = {"payment.charge": ((1, "k", 4, 3), (4, (2, "a"), (3, (1, "z", 0, "x"))), None)}
packer = _spill.Packer(1, 1, _SLOTS, tests, (5, 2**64))
packer.add([(f"{i:032x}", [span_of("", f"{i:016x}", "payment.charge", "", i, 2**63 + i,
                                    "OK", "SERVER", "s", "v", {"k": i, "a": 1.5, "z": ("a", 1),
                                    **{f"x{j}": j for j in range(i)}},
                                    "g")]) for i in range(30)])
packer.add([("odd id", [])])
[base] = packer.take()
only = {f"{i:032x}" for i in range(0, 30, 2)}
rules = ((1, "payment.charge", (1, "k", 4, 3), None, (7, "payment.charge", (4, (6, "k", 0, "k"),
          (6, "a", 1, "a")))), (0, ("payment.charge", "x"), (3, (7, "x", None))), (1, "y"), ())
for _ in range(5000):
    data = bytearray(base)
    for _ in range(rng.randint(1, 3)):
        data[rng.randrange(len(data))] = rng.randrange(256)
    for sample in (bytes(data), bytes(data[:rng.randrange(len(data) + 1)]),
                   rng.randbytes(rng.randint(0, 40))):
        for read in (lambda: _spill.unpack(sample, {}, Span, _SLOTS, _NO_ATTRIBUTES),
                     lambda: _spill.unpack(sample, {}, Span, _SLOTS, _NO_ATTRIBUTES, only),
                     lambda: _spill.judge([base, sample], rules)):
            try:
                read()
            except (ValueError, EOFError, TypeError, MemoryError):
                pass  # (marshal's own errors; MemoryError: a huge container claimed)
print("clean")
"""


def test_no_memory_error_under_address_sanitizer(tmp_path: Path) -> None:
    """Built with AddressSanitizer and UBSan, a Packer packs, and unpack (all traces and some)
    and judge run over 15,000 damaged, cut and random inputs, without a report."""
    fuzz_sanitized(Path(__file__).resolve().parent.parent / "sidecar" / "replay" / "_spill.c",
                   FUZZ, tmp_path)
