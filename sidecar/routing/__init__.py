"""Signals routed to receivers off the request path: a bounded, retrying dispatcher, and the
Alertmanager and webhook receivers it delivers to. Imports only `model`."""
