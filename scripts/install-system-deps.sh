#!/usr/bin/env bash
# Install the system packages `make run` / `make test` need, from Debian's packages, only when
# they are missing: redis-server, PostgreSQL (server binaries), python3 + venv support, and the
# ops tools the tests run (tests/test_ops_*.py, tests/test_fleet.py): Prometheus (prometheus,
# promtool), systemd's systemd-analyze and HAProxy (haproxy -c on ops/haproxy.cfg, the fleet test). The ops tools come without their recommended packages (no node exporter daemon).
# Idempotent: prints nothing and exits 0 when everything is already there.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

have_postgres_server() {
    if command -v initdb >/dev/null 2>&1 && command -v postgres >/dev/null 2>&1; then
        return 0
    fi
    local dir
    for dir in /usr/lib/postgresql/*/bin; do
        if [[ -x "$dir/initdb" && -x "$dir/postgres" ]]; then
            return 0
        fi
    done
    return 1
}

missing=()
if ! command -v redis-server >/dev/null 2>&1; then
    missing+=(redis-server)
fi
if ! have_postgres_server; then
    missing+=(postgresql)
fi
if ! command -v python3 >/dev/null 2>&1; then
    missing+=(python3 python3-venv)
elif [[ ! -x "$repo_root/.venv/bin/python" ]] && ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
    missing+=(python3-venv)
fi

ops_missing=()
if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
    ops_missing+=(prometheus)
fi
if ! command -v systemd-analyze >/dev/null 2>&1; then
    ops_missing+=(systemd)
fi
if ! command -v haproxy >/dev/null 2>&1 && [[ ! -x /usr/sbin/haproxy ]]; then
    ops_missing+=(haproxy)
fi

if [[ ${#missing[@]} -eq 0 && ${#ops_missing[@]} -eq 0 ]]; then
    exit 0
fi

fail() {
    echo "install-system-deps: $*" >&2
    exit 1
}

if ! command -v apt-get >/dev/null 2>&1; then
    fail "missing ${missing[*]} ${ops_missing[*]} and no apt-get to install them; install them yourself"
fi

sudo=()
if [[ $(id -u) -ne 0 ]]; then
    if ! command -v sudo >/dev/null 2>&1; then
        fail "missing ${missing[*]} ${ops_missing[*]}; not root and no sudo: run 'apt-get install -y ${missing[*]} ${ops_missing[*]}' as root"
    fi
    sudo=(sudo)
    if [[ ! -t 0 ]]; then
        sudo+=(-n) # no stdin (CI): never wait for a password prompt
    fi
fi

echo "install-system-deps: installing ${missing[*]} ${ops_missing[*]} (apt-get)" >&2
export DEBIAN_FRONTEND=noninteractive
if ! "${sudo[@]}" apt-get update -q; then
    fail "'apt-get update' failed; cannot install ${missing[*]} ${ops_missing[*]}"
fi
if [[ ${#missing[@]} -gt 0 ]] && ! "${sudo[@]}" apt-get install -y -q "${missing[@]}"; then
    fail "'apt-get install -y ${missing[*]}' failed"
fi
if [[ ${#ops_missing[@]} -gt 0 ]] \
    && ! "${sudo[@]}" apt-get install -y -q --no-install-recommends "${ops_missing[@]}"; then
    fail "'apt-get install -y --no-install-recommends ${ops_missing[*]}' failed"
fi
