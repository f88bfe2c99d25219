#!/usr/bin/env bash
# `curl -N` against a running `tiefsee serve`: a streamed chat completion is Server-Sent Events whose
# every line is `data: ...` (or blank), with `data: [DONE]` last, and nothing after it.
# Usage: tests/e2e_api/test_sse_curl.sh http://127.0.0.1:PORT
set -euo pipefail
url=${1:?usage: $0 BASE_URL}
out=$(mktemp)
trap 'rm -f "$out"' EXIT

curl -sS -N --max-time 60 "$url/v1/chat/completions" -H 'content-type: application/json' \
  -d '{"messages": [{"role": "user", "content": "Hallo"}], "stream": true, "max_tokens": 8,
       "temperature": 0, "stream_options": {"include_usage": true}}' >"$out"

fail() { echo "FAIL: $*"; echo "--- response:"; cat "$out"; exit 1; }
grep -q . "$out" || fail "empty response"
bad=$(grep -v -e '^data: ' -e '^$' "$out" || true)
[ -z "$bad" ] || fail "lines not starting with 'data: ': $bad"
last=$(grep . "$out" | tail -n 1)
[ "$last" = "data: [DONE]" ] || fail "last line is '$last', not 'data: [DONE]'"
[ "$(grep -c '^data: \[DONE\]$' "$out")" -eq 1 ] || fail "[DONE] more than once"
grep -q '"finish_reason":"length"\|"finish_reason":"stop"' "$out" || fail "no finish_reason"
grep -q '"prompt_cache_hit_tokens"' "$out" || fail "no usage chunk with prompt_cache_hit_tokens"
# Every data line but the last is one JSON object.
grep '^data: ' "$out" | sed '$d' | sed 's/^data: //' | while IFS= read -r line; do
  python3 -c 'import json, sys; json.loads(sys.argv[1])' "$line" || fail "not JSON: $line"
done
echo "ok: $(grep -c '^data: ' "$out") SSE events, ending with data: [DONE]"
