"""The live sidecar: OTLP receivers (and the bounded HTTP server under OTLP/HTTP and metrics), the
assembling processor, exporters, rule reload, metrics, and the app that wires them to a store. May import `model`, `dsl`, `rules`, `otlp` and `stores`; never
`replay`."""
