# BeTrace: `make run` starts the sidecar with the shipped rules; `make test` runs every test.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run demo replay ui test check bench bench-replay bench-collector clean otelcol jaeger

$(STAMP): pyproject.toml sidecar/otlp/_wire.c sidecar/replay/_spill.c
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/betrace serve --rules rules/ --signals-out -

demo: $(STAMP)
	$(BIN)/betrace demo --rules rules/

replay: $(STAMP)
	$(BIN)/betrace check rules/
	$(BIN)/betrace test rules/
	$(BIN)/betrace replay --rules rules/ --format table rules/samples/incidents.otlp.jsonl

# The explorer over the bundled sample's signals: http://127.0.0.1:9470/
ui: $(STAMP)
	$(BIN)/betrace replay --rules rules/ --signals-db sqlite:///build/signals.db --progress never \
	  rules/samples/incidents.otlp.jsonl > /dev/null
	$(BIN)/betrace ui --signals-db sqlite:///build/signals.db --rules rules/

test: $(STAMP)
	$(BIN)/python -m pytest

check: $(STAMP)
	$(BIN)/betrace check rules/

bench: $(STAMP)
	$(BIN)/python bench/rules.py
	$(BIN)/python bench/ingest.py

# The whitepaper's replay headline at full scale: ~16 GB of generated traces, kept in
# /tmp/betrace-bench-replay so a rerun skips the 4-minute generation.
REPLAY_TRACES ?= 3200000
bench-replay: $(STAMP)
	$(BIN)/python bench/replay.py --traces $(REPLAY_TRACES) --keep

# BeTrace beside the collector's tail_sampling on the ingest workloads (issue 14): real collectors
# and sidecars on loopback, about 5 minutes; builds the collector first if it is not cached.
bench-collector: $(STAMP)
	$(BIN)/python bench/collector.py

# The pinned OpenTelemetry Collector (deploy/otelcol) and Jaeger (deploy/jaeger), each built once
# with Go into ~/.cache/betrace/NAME-<go.sum hash>/ (outside the clone) and reused; prints the path.
otelcol jaeger:
	@deploy/build.sh $@

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .hypothesis sidecar/otlp/_wire.*.so sidecar/replay/_spill.*.so
