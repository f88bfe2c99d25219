#!/usr/bin/env bash
# End-to-end test of the chat page: builds `tiefsee` (release) if needed, serves two fixture models on
# free loopback ports (deepseek-v3 as is, and a copy with the R1 chat template, whose every token is
# reasoning, and behind an API key), waits for /health, runs chat.test.mjs in headless Chromium and always stops the servers.
# Run tests/e2e/install.sh once first. TIEFSEE_BIN overrides the binary.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cd "$root"

bin="${TIEFSEE_BIN:-${CARGO_TARGET_DIR:-$root/target}/release/tiefsee}"
if [ -z "${TIEFSEE_BIN:-}" ]; then
    cargo build --release -p tiefsee
fi
[ -d "$here/node_modules/playwright-core" ] || { echo "run tests/e2e/install.sh first" >&2; exit 1; }

work="$(mktemp -d)"
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$work"
}
trap cleanup EXIT

# The R1 fixture: deepseek-v3's weights and tokenizer under the R1 template, which opens <think>.
cp -r tests/fixtures/models/deepseek-v3 "$work/deepseek-r1"
node -e '
const fs = require("fs");
const [config, template] = process.argv.slice(1);
const tokenizer = JSON.parse(fs.readFileSync(config, "utf8"));
tokenizer.chat_template = fs.readFileSync(template, "utf8");
fs.writeFileSync(config, JSON.stringify(tokenizer, null, 2));
' "$work/deepseek-r1/tokenizer_config.json" tests/fixtures/templates/deepseek-r1.jinja

# deepseek-v3 with a longer context, so that the stop test's answer is still streaming when it clicks Stop
# (the fixture decodes thousands of tokens a second; its 512 would be over before the click).
cp -r tests/fixtures/models/deepseek-v3 "$work/deepseek-v3"
node -e '
const fs = require("fs");
const config = JSON.parse(fs.readFileSync(process.argv[1], "utf8"));
config.max_position_embeddings = 16384;
fs.writeFileSync(process.argv[1], JSON.stringify(config, null, 2));
' "$work/deepseek-v3/config.json"

free_port() {
    node -e 'const s = require("net").createServer(); s.listen(0, "127.0.0.1", () => { console.log(s.address().port); s.close(); });'
}

# serve NAME MODEL_DIR [ARGS...]: starts a server and sets `url` once its /health answers. (Not run in a
# $(...) subshell, so that the server's pid reaches `pids` and the cleanup.)
serve() {
    local name="$1" model="$2" port
    shift 2
    port="$(free_port)"
    "$bin" serve --model "$model" --host 127.0.0.1 --port "$port" "$@" >"$work/$name.log" 2>&1 &
    pids+=("$!")
    for _ in $(seq 1 300); do
        if curl -sf "http://127.0.0.1:$port/health" >/dev/null 2>&1; then
            url="http://127.0.0.1:$port"
            return
        fi
        kill -0 "${pids[-1]}" 2>/dev/null || break
        sleep 0.1
    done
    echo "the $name server did not come up:" >&2
    cat "$work/$name.log" >&2
    exit 1
}

serve v3 "$work/deepseek-v3" --ctx 16384
TIEFSEE_URL="$url"
TIEFSEE_R1_KEY="e2e-key"
serve r1 "$work/deepseek-r1" --api-key "$TIEFSEE_R1_KEY"
TIEFSEE_R1_URL="$url"
export TIEFSEE_URL TIEFSEE_R1_URL TIEFSEE_R1_KEY
mkdir -p "$here/out"
node --test --test-reporter=spec "$here/chat.test.mjs"
