"""OTLP on the wire: protobuf and JSON requests decoded into `model` spans (pruned by a
projection), and signals encoded as protobuf. May import only `sidecar.model` (and the generated
`sidecar.proto`)."""
