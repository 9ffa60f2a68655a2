"""Generated protobuf package `betrace.v1` (see sidecar/proto/__init__.py)."""
