#!/usr/bin/env bash
# Fails when a service or component started by this repository is still running
# (after `make test` or `make demo` nothing may be left behind).
set -u
root="$(cd "$(dirname "$0")/.." && pwd)"
pattern="$root/.cache/kafka/libs|$root/.triton-venv/.*tritonserver|redis-server .*--dir .*(camoe|$root)|camoe\.cli (score|label|train)"
left="$(pgrep -af "$pattern" | grep -v -e pgrep -e no_leftovers || true)"
if [ -n "$left" ]; then
  echo "left running after the run (stop with 'make stack-down' or kill):" >&2
  echo "$left" >&2
  exit 1
fi
echo "no service or component left running"
