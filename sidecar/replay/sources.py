"""Replay's input stage: which files to read, and in which format.

A source is a file, a directory (read recursively, hidden entries skipped), a glob, or "-" for
stdin. Each file is recognised by its content, never its name: gzip or zstd compression, then
either OTLP JSON (one request per line, or one document) or the Collector file exporter's
`format: proto`. A bad line or frame is reported as an `InputError` and skipped; the rest is read.

Each request becomes a `Batch`: its kept spans by trace id, decoded by the same decoders as live
ingest (`sidecar.otlp`); a trace known by its id alone (none of its spans kept, while a rule
fires without its spans) has an empty list.
"""

from __future__ import annotations

import glob
import gzip
import io
import os
import struct
import sys
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from typing import IO

import orjson
import zstandard

from sidecar.model.errors import SourceError
from sidecar.model.spans import Span
from sidecar.otlp.decoded import Decoded, SpanFilter
from sidecar.otlp.json_spans import InputError, decode_json, read_requests
from sidecar.otlp.protobuf import ProtobufDecoder

Batch = dict[str, list[Span]]  # one request's kept spans by trace id

_GZIP_MAGIC, _ZSTD_MAGIC, _BOM = b"\x1f\x8b", b"\x28\xb5\x2f\xfd", b"\xef\xbb\xbf"
# The file exporter's `format: proto` (and its legacy per-message compression): "each encoded
# object is preceded by 4 bytes (an unsigned 32 bit integer) which represent the number of bytes
# contained in the encoded object" (opentelemetry-collector-contrib exporter/fileexporter
# README.md, "File Format"); file_writer.go's exportMessageAsBuffer writes it big-endian.
_FRAME = struct.Struct(">I")
_MAX_FRAME = 1 << 30  # a longer "length" is corrupt data: no request is a gigabyte
_UNREADABLE = (EOFError, zlib.error, gzip.BadGzipFile, zstandard.ZstdError)


def expand_sources(paths: Sequence[str]) -> list[str]:
    """The files to read, each once, in the order given: "-" (stdin) and files as they are,
    directories walked recursively in name order (hidden entries skipped, as a Kubernetes
    ConfigMap's ..data), globs expanded here too (when quoted, the shell did not). SourceError
    names the first path that matches nothing or cannot be read."""
    out: list[str] = []
    seen: set[str] = set()
    for path in paths:
        if path == "-":
            found = ["-"]
        elif os.path.isdir(path):
            found = _walk(path)
            if not found:
                raise SourceError(f"{path}: no files in this directory")
        elif os.path.exists(path):
            found = [path]
        elif any(c in path for c in "*?["):
            found = [f for match in sorted(glob.glob(path, recursive=True))
                     for f in (_walk(match) if os.path.isdir(match) else [match])]
            if not found:
                raise SourceError(f"{path}: no file matches")
        else:
            raise SourceError(f"{path}: no such file or directory")
        for file in found:
            key = file if file == "-" else os.path.realpath(file)
            if key in seen:
                continue
            if file != "-" and not os.access(file, os.R_OK):
                raise SourceError(f"{file}: permission denied")
            seen.add(key)
            out.append(file)
    return out


def _walk(directory: str) -> list[str]:
    found = []
    for root, dirs, files in os.walk(directory):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        found += [os.path.join(root, f) for f in sorted(files) if not f.startswith(".")]
    return found


def read_source(source: str, keep: SpanFilter, errors: list[InputError],
                progress: Callable[[int], None] | None = None) -> Iterator[Batch]:
    """Stream the kept spans of one source ("-" is stdin), a Batch per request.

    The file is opened before this returns, so an unreadable one raises OSError at the call.
    Malformed input is appended to `errors` and skipped: a JSON line by line number, a proto
    frame by its byte offset (in the decompressed data, for a compressed file). A frame that does
    not parse is skipped and reading goes on with the next one, since its length prefix still
    says where that starts; a length running past the end of the data, or beyond 1 GiB, cannot be
    trusted to find the next frame, so the rest of that file is reported once and skipped.
    `progress` is called after each request with the bytes consumed so far (compressed bytes for
    a compressed file; 0 for stdin)."""
    with ExitStack() as stack:
        raw: IO[bytes]
        if source == "-":
            name, raw = "<stdin>", sys.stdin.buffer
            if not hasattr(raw, "peek"):  # a replaced stdin: buffer it to peek
                raw = io.BufferedReader(raw)  # type: ignore[arg-type]
                stack.callback(raw.detach)  # leave the caller's stream open
        else:
            name, raw = source, stack.enter_context(open(source, "rb", buffering=1 << 20))
        magic = raw.peek(4)[:4]  # type: ignore[attr-defined]
        stream, codec = raw, ""
        if magic[:2] == _GZIP_MAGIC:
            stream, codec = stack.enter_context(gzip.GzipFile(fileobj=raw)), "gzip"
        elif magic == _ZSTD_MAGIC:
            reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True)
            stream, codec = stack.enter_context(io.BufferedReader(reader, 1 << 20)), "zstd"
        owned = stack.pop_all()
    where = raw.tell if source != "-" and raw.seekable() else None
    return _Reader(name, keep, errors, progress, where).read(stream, codec, owned)


class _Reader:
    """One source being read: where it is (line or offset), for errors and progress."""

    def __init__(self, name: str, keep: SpanFilter, errors: list[InputError],
                 progress: Callable[[int], None] | None, where: Callable[[], int] | None) -> None:
        self.name, self.keep, self.errors, self.progress = name, keep, errors, progress
        self.where = where or (lambda: 0)  # stdin: spans are counted, bytes are not
        self.line = 0
        self.offset: int | None = None  # set while reading frames
        self.proto = ProtobufDecoder(keep)

    def report(self, reason: str, line: int = 0, offset: int | None = None) -> None:
        self.errors.append(InputError(self.name, line, reason, offset))

    def read(self, stream: IO[bytes], codec: str, owned: ExitStack) -> Iterator[Batch]:
        with owned:
            try:
                first = stream.peek(1)[:1]  # type: ignore[attr-defined]
                if not first or first in b"{[\xef \t\r\n":  # JSON starts with these (or a BOM)
                    yield from self._json(stream)
                else:
                    yield from self._frames(stream)
            except _UNREADABLE as exc:
                if self.offset is not None:
                    self.report(f"unreadable {codec} data: {exc}", offset=self.offset)
                else:
                    self.report(f"unreadable {codec} data: {exc}", line=self.line + 1)

    def _json(self, stream: IO[bytes]) -> Iterator[Batch]:
        def bad_line(line: int, reason: str) -> None:
            self.line = line
            self.report(reason, line=line)

        for self.line, decoded in read_requests(stream, self.keep, bad_line):
            bad: list[str] = []
            batch = _batch(decoded, bad)
            for reason in bad:
                self.report(reason, line=self.line)
            if self.progress is not None:
                self.progress(self.where())
            yield batch

    def _frames(self, stream: IO[bytes]) -> Iterator[Batch]:
        read, offset = stream.read, 0
        while True:
            self.offset = offset
            head = read(4)
            if len(head) < 4:
                if head:
                    self.report(f"truncated frame: {len(head)} of the 4 length bytes; "
                                "nothing follows", offset=offset)
                return
            (size,) = _FRAME.unpack(head)
            if size > _MAX_FRAME:
                self.report(f"frame length {size} is not plausible (corrupt data?); the rest "
                            "of this file is skipped", offset=offset)
                return
            payload = read(size)
            if len(payload) < size:
                self.report(f"truncated frame: {len(payload)} of {size} bytes; nothing follows",
                            offset=offset)
                return
            bad: list[str] = []
            try:
                batch = self._frame(payload, bad)
            except ValueError as exc:
                self.report(str(exc), offset=offset)
            else:
                for reason in bad:
                    self.report(reason, offset=offset)
                if self.progress is not None:
                    self.progress(self.where())
                yield batch
            offset += 4 + size

    def _frame(self, payload: bytes, bad: list[str]) -> Batch:
        """One frame: an ExportTraceServiceRequest, or (the exporter's legacy `compression`)
        one compressed with zstd, whose content may also be a JSON request."""
        if payload[:4] == _ZSTD_MAGIC:
            try:
                payload = zstandard.ZstdDecompressor().decompressobj().decompress(payload)
            except zstandard.ZstdError as exc:
                raise ValueError(f"unreadable zstd frame: {exc}") from None
        if payload[:1] == b"{":
            try:
                return _batch(decode_json(payload, self.keep), bad)
            except orjson.JSONDecodeError as exc:
                raise ValueError(f"invalid JSON frame: {exc}") from None
        return _batch(self.proto.decode(payload), bad)


def _batch(decoded: Decoded, bad: list[str]) -> Batch:
    """The spans kept by trace id, and the traces known by id alone with none."""
    bad += decoded.invalid
    batch = decoded.batch
    for trace_id in decoded.bare_trace_ids:
        batch[trace_id] = []
    return batch
