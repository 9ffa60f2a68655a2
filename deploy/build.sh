#!/usr/bin/env bash
# deploy/build.sh NAME: build the pinned Go program deploy/NAME once into a cache outside the clone
# and print the binary's path (the only line on stdout; build output goes to stderr).
#
#   otelcol  the OpenTelemetry Collector of deploy/otelcol (main.go, one collector release)
#   jaeger   Jaeger all-in-one v1.75.0, the `tool` of deploy/jaeger/go.mod
#
# The cache is ${XDG_CACHE_HOME:-$HOME/.cache}/betrace/NAME-<first 16 hex of sha256(go.sum)>/NAME,
# so every clone on the machine with the same go.sum reuses one build. A file beside the binary
# records the hash of all of NAME's inputs (go.mod, go.sum, *.go) and the Go version: if main.go
# changes without go.sum changing, the binary is rebuilt in place rather than reused stale.
set -euo pipefail

name=${1:-}
here=$(cd "$(dirname "$0")" && pwd)
case "$name" in
  otelcol) pkg=. ;;
  jaeger) pkg=github.com/jaegertracing/jaeger/cmd/jaeger ;;
  *) echo "usage: deploy/build.sh otelcol|jaeger" >&2; exit 2 ;;
esac
src=$here/$name

if ! command -v go >/dev/null 2>&1; then
  echo "deploy/build.sh: Go is not installed (no 'go' on PATH); $name needs Go 1.26+ and the Go module proxy" >&2
  exit 3
fi

sum=$(sha256sum "$src/go.sum" | cut -c1-16)
dir=${XDG_CACHE_HOME:-$HOME/.cache}/betrace/$name-$sum
bin=$dir/$name
inputs=$( (cd "$src" && cat go.mod go.sum $(ls ./*.go 2>/dev/null); go version) | sha256sum | cut -d' ' -f1)

if [ -x "$bin" ] && [ "$(cat "$dir/inputs.sha256" 2>/dev/null)" = "$inputs" ]; then
  echo "$bin"
  exit 0
fi

mkdir -p "$dir"
# One build at a time per cache entry (parallel test runs, two clones): the second waits, then
# finds the binary.
exec 9>"$dir/.lock"
flock 9
if [ -x "$bin" ] && [ "$(cat "$dir/inputs.sha256" 2>/dev/null)" = "$inputs" ]; then
  echo "$bin"
  exit 0
fi

echo "deploy/build.sh: building $name into $dir (a cold build takes minutes)" >&2
start=$(date +%s)
tmp=$(mktemp "$dir/.$name.XXXXXX")
# -mod=readonly: the committed go.sum must be complete; -trimpath and no VCS stamp: the binary
# does not depend on where the clone is.
if ! (cd "$src" && go build -mod=readonly -trimpath -buildvcs=false -o "$tmp" "$pkg") >&2; then
  rm -f "$tmp"
  echo "deploy/build.sh: building $name failed (see the go output above)" >&2
  exit 1
fi
mv -f "$tmp" "$bin"
echo "$inputs" >"$dir/inputs.sha256"
echo "deploy/build.sh: built $name in $(( $(date +%s) - start )) s" >&2
echo "$bin"
