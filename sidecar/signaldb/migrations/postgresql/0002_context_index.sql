-- `betrace signals --where ATTR=VALUE` looks a context value up by containment (@>), which
-- this index answers without reading every row.
CREATE INDEX signals_context ON signals USING gin (context jsonb_path_ops);
