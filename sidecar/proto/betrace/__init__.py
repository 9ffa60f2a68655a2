"""Generated protobuf package `betrace` (see sidecar/proto/__init__.py)."""
