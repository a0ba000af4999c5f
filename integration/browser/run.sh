#!/usr/bin/env bash
# The console's browser test: installs Debian's Chromium and Playwright for Python
# (into a venv under ~/.cache; Playwright's own browser download is never used),
# builds the binary and runs integration/browser/test_console.py, whose last line
# is "N passed, M failed".
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

if [[ ! -x /usr/bin/chromium ]]; then
    if [[ "$(id -u)" -ne 0 ]]; then
        echo "chromium is missing, and only root can install it" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends chromium
fi
/usr/bin/chromium --version 2>/dev/null

venv="${OFFSHOOT_BROWSER_VENV:-$HOME/.cache/offshoot/browser-venv}"
if [[ ! -x "$venv/bin/python" ]] || ! "$venv/bin/python" -c 'import playwright' 2>/dev/null; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q 'playwright>=1.40,<2'
fi
"$venv/bin/python" -c 'import importlib.metadata as m; print("playwright", m.version("playwright"))'

cargo build -q --bin offshoot
exec "$venv/bin/python" integration/browser/test_console.py
