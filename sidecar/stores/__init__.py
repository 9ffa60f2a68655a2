"""Trace state: the `TraceStore` protocol, and its implementations `stores.memory` and
`stores.redis`, which pass one contract suite. May import `sidecar.model` only; only the live app
chooses an implementation."""

from sidecar.stores.trace_store import AppendResult, Claimed, StoreLimits, TraceStore

__all__ = ["AppendResult", "Claimed", "StoreLimits", "TraceStore"]
