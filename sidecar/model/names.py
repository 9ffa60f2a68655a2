"""Names BeTrace writes into other people's telemetry: its own violation spans are recognised by
`VIOLATION_SPAN` when the collector sends them back, and are exported under the `SCOPE` scope."""

VIOLATION_SPAN = "betrace.violation"
SCOPE = "betrace"
