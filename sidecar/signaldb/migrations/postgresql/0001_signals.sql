-- Signals, one row per signal_id (rule id + trace id).
CREATE TABLE signals (
    signal_id       text PRIMARY KEY,
    rule_id         text NOT NULL,
    rule_name       text NOT NULL,
    rule_digest     text,              -- sha256 of the rule set that found it
    severity        text NOT NULL,
    trace_id        text NOT NULL,
    span_ids        jsonb NOT NULL,
    message         text NOT NULL,
    context         jsonb NOT NULL,
    service         text,              -- service.name of the latest offending span
    service_version text,              -- its service.version
    mode            text NOT NULL,     -- of the first detection: live or replay
    modes           text NOT NULL,     -- every mode seen, comma-separated
    detected_at     timestamptz NOT NULL,  -- first detection
    last_seen       timestamptz NOT NULL,  -- latest detection
    violation_time  timestamptz,           -- start of the latest offending span
    occurred_at     timestamptz NOT NULL   -- violation_time, else detected_at: what --since filters
);
CREATE INDEX signals_occurred ON signals (occurred_at);
CREATE INDEX signals_rule ON signals (rule_id, occurred_at);
CREATE INDEX signals_severity ON signals (severity, occurred_at);
CREATE INDEX signals_service ON signals (service, occurred_at);
CREATE INDEX signals_trace ON signals (trace_id);
