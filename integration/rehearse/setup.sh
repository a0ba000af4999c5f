#!/usr/bin/env bash
# Installs the migration tool the rehearsal tests drive (alembic with SQLAlchemy and
# psycopg 3) into a venv under ~/.cache/offshoot/rehearse-venv, which
# integration/rehearse.rs looks for. Reinstalls when requirements.txt changes.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
venv="${XDG_CACHE_HOME:-$HOME/.cache}/offshoot/rehearse-venv"
req="$here/requirements.txt"
if cmp -s "$req" "$venv/requirements.txt" && "$venv/bin/alembic" --version >/dev/null 2>&1; then
    echo "alembic ready in $venv"
    exit 0
fi
if ! python3 -m venv -h >/dev/null 2>&1; then
    if [[ "$(id -u)" -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
        apt-get install -y -q python3 python3-venv >/dev/null
    else
        echo "python3 with venv is needed for the rehearsal tests" >&2
        exit 1
    fi
fi
rm -rf "$venv"
mkdir -p "$(dirname "$venv")"
python3 -m venv "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check -r "$req"
cp "$req" "$venv/requirements.txt"
"$venv/bin/alembic" --version
