#!/usr/bin/env bash
# Installs what the chat page's end-to-end test needs: Debian's Chromium and a pinned playwright-core
# (which drives the system browser; `npx playwright install` would download its own, and cannot here).
set -euo pipefail
cd "$(dirname "$0")"

sudo_=""
[ "$(id -u)" -eq 0 ] || sudo_="sudo"
missing=()
command -v chromium >/dev/null || missing+=(chromium)
command -v npm >/dev/null || missing+=(nodejs npm)
if [ ${#missing[@]} -gt 0 ]; then
    $sudo_ apt-get update
    $sudo_ apt-get install -y "${missing[@]}"
fi
npm ci --no-audit --no-fund
