#!/usr/bin/env bash
# Installs what the chat page's end-to-end test needs: Debian's Chromium and a pinned playwright-core
# (which drives the system browser; `npx playwright install` would download its own, and cannot here).
set -euo pipefail
cd "$(dirname "$0")"

if ! command -v chromium >/dev/null; then
    sudo_=""
    [ "$(id -u)" -eq 0 ] || sudo_="sudo"
    $sudo_ apt-get update
    $sudo_ apt-get install -y chromium
fi
npm ci --no-audit --no-fund
