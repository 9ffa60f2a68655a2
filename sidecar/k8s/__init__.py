"""Kubernetes: the mutating admission webhook that injects the sidecar into opted-in pods. May
import `model` and the live settings and metrics; never `rules`,
`dsl` or `replay`."""
