"""Replay: rules over recorded traces (files, Tempo, Jaeger), partitioned across processes, with a
compliance summary. May import `model`, `dsl`, `rules` and `otlp`; never `live` or `stores`."""
