# BeTrace sidecar image: `betrace serve` (the sidecar) and `betrace webhook` (the injector).
#
# NOTE: not built here: the project's development machine has no Docker engine, so this file
# has never been built by the project itself. tests/test_helm.py checks its shape (non-root
# user, entrypoint, COPY sources, and that CMD is a command line `betrace` accepts), not a
# build. Build it with:
#   docker build -t ghcr.io/betrace/betrace:0.1.0 .
#
# The Helm chart (helm/betrace) runs it read-only as uid 65532 with every capability dropped;
# nothing here needs to write to the image's file system at run time.

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
# A C compiler for the package's two small extensions (sidecar/otlp/_wire.c,
# sidecar/replay/_spill.c); only this stage has it.
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
# Only what the package build reads (pyproject.toml names README.md as the long description).
COPY pyproject.toml README.md ./
COPY sidecar ./sidecar
RUN python -m venv /opt/betrace \
    && /opt/betrace/bin/pip install . \
    && /opt/betrace/bin/python -m compileall -q /opt/betrace/lib

FROM python:3.11-slim
LABEL org.opencontainers.image.title="betrace" \
      org.opencontainers.image.description="Invariants as rules over OpenTelemetry traces: a sidecar next to the OpenTelemetry Collector" \
      org.opencontainers.image.source="https://github.com/betrace/betrace" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/opt/betrace/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1
COPY --from=build /opt/betrace /opt/betrace
# The shipped rule catalog, used when no rules are mounted over /etc/betrace/rules.
COPY rules/*.yaml /etc/betrace/rules/
RUN groupadd --system --gid 65532 betrace \
    && useradd --system --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent \
       --shell /usr/sbin/nologin betrace \
    && betrace check /etc/betrace/rules
USER 65532:65532
# 4319 OTLP gRPC, 4320 OTLP/HTTP, 9464 metrics (/metrics, /healthz, /readyz), 8443/9465 webhook.
EXPOSE 4319 4320 9464 8443 9465
ENTRYPOINT ["betrace"]
# Inside a pod the collector reaches the sidecar over loopback; metrics listen on every address
# so the kubelet's probes and Prometheus reach them.
CMD ["serve", "--rules", "/etc/betrace/rules", "--listen", "127.0.0.1:4319", "--metrics-listen", "0.0.0.0:9464"]
