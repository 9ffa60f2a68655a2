"""BeTrace: behavioral assurance for OpenTelemetry traces."""

__version__ = "0.1.0"
