#!/usr/bin/env bash
# Installs the OpenAPI validator the integration test
# `admin_api::the_served_document_passes_a_validator` runs: Python's
# openapi-spec-validator (OpenAPI 3.1 support), in a venv under ~/.cache so the
# system's Python stays untouched. Prints the validator's path; does nothing when
# it is already there. Set OFFSHOOT_OPENAPI_VENV to use another venv.
set -euo pipefail

venv="${OFFSHOOT_OPENAPI_VENV:-$HOME/.cache/offshoot/openapi-venv}"
if [[ ! -x "$venv/bin/openapi-spec-validator" ]]; then
    if ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c 'import ensurepip' 2>/dev/null; then
        if [[ "$(id -u)" -eq 0 ]]; then
            export DEBIAN_FRONTEND=noninteractive
            apt-get update -q
            apt-get install -y -q --no-install-recommends python3-venv
        else
            echo "python3-venv is missing, and only root can install it" >&2
            exit 1
        fi
    fi
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q 'openapi-spec-validator>=0.7,<1'
fi
"$venv/bin/python" -c 'import importlib.metadata as m; print("openapi-spec-validator", m.version("openapi-spec-validator"))' >&2
echo "$venv/bin/openapi-spec-validator"
