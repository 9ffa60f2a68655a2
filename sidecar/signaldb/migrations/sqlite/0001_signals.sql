-- Signals, one row per signal_id (rule id + trace id). Times are RFC 3339 UTC text with
-- milliseconds ("2026-11-25T02:32:00.000Z"): one fixed width, so text order is time order.
CREATE TABLE signals (
    signal_id       TEXT PRIMARY KEY,
    rule_id         TEXT NOT NULL,
    rule_name       TEXT NOT NULL,
    rule_digest     TEXT,             -- sha256 of the rule set that found it
    severity        TEXT NOT NULL,
    trace_id        TEXT NOT NULL,
    span_ids        TEXT NOT NULL,    -- JSON array
    message         TEXT NOT NULL,
    context         TEXT NOT NULL,    -- JSON object
    service         TEXT,             -- service.name of the latest offending span
    service_version TEXT,             -- its service.version
    mode            TEXT NOT NULL,    -- of the first detection: live or replay
    modes           TEXT NOT NULL,    -- every mode seen, comma-separated
    detected_at     TEXT NOT NULL,    -- first detection
    last_seen       TEXT NOT NULL,    -- latest detection
    violation_time  TEXT,             -- start of the latest offending span
    occurred_at     TEXT NOT NULL     -- violation_time, else detected_at: what --since filters
) WITHOUT ROWID;
CREATE INDEX signals_occurred ON signals (occurred_at);
CREATE INDEX signals_rule ON signals (rule_id, occurred_at);
CREATE INDEX signals_severity ON signals (severity, occurred_at);
CREATE INDEX signals_service ON signals (service, occurred_at);
CREATE INDEX signals_trace ON signals (trace_id);
