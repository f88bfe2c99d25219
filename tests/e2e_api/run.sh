#!/usr/bin/env bash
# Client-compatibility tests: the official `openai` Python client (and curl) against `tiefsee serve` on
# the fixture model. Makes the venv from requirements.txt if needed (VENV=... to use another), builds
# the release binary if needed, starts the server on a free loopback port, waits for /health, runs
# pytest (extra arguments go to pytest), and always kills the server.
# Usage: tests/e2e_api/run.sh [-k PATTERN] [-x] ...
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
venv=${VENV:-$repo/.venv}
cd "$repo"

if ! "$venv/bin/python" -c 'import openai, pytest' 2>/dev/null; then
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/pip" install -q -r "$here/requirements.txt"
fi
bin=${TIEFSEE_BIN:-${CARGO_TARGET_DIR:-$repo/target}/release/tiefsee}
if [ ! -x "$bin" ] || [ -n "${BUILD:-}" ]; then
  cargo build --release -p tiefsee
fi
export TIEFSEE_BIN=$bin

port=$("$venv/bin/python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
log=$(mktemp -t tiefsee-e2e.XXXXXX.log)
# `timeout` bounds the server's life even if this script is killed before its trap runs; `setsid`
# puts both in a process group of their own, killed as one.
setsid timeout -s KILL 900 "$bin" serve --model tests/fixtures/models/deepseek-v3 --host 127.0.0.1 --port "$port" >"$log" 2>&1 &
server=$!
trap 'kill -9 -- "-$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true' EXIT

url="http://127.0.0.1:$port"
for _ in $(seq 1 600); do
  if curl -sf "$url/health" >/dev/null 2>&1; then break; fi
  kill -0 "$server" 2>/dev/null || { echo "tiefsee serve exited:"; cat "$log"; exit 1; }
  sleep 0.2
done
curl -sf "$url/health" >/dev/null || { echo "no /health after 120 s:"; cat "$log"; exit 1; }

status=0
TIEFSEE_URL=$url "$venv/bin/python" -m pytest -q "$here" -p no:cacheprovider "$@" || status=$?
[ "$status" -eq 0 ] || { echo "--- server log ($log):"; tail -n 50 "$log"; }
exit "$status"
