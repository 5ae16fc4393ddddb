#!/usr/bin/env bash
# Install everything mqtt_pg needs to build, demo and test on Debian 12, as root.
# Idempotent and fast the second time: each step checks before it acts.
#   SKIP_BUILD=1 scripts/setup.sh   # everything except building/installing the extension
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config
PGRX_VERSION=0.18.1
APT_PACKAGES=(postgresql-15 postgresql-server-dev-15 libclang-dev clang mosquitto
              mosquitto-clients pkg-config python3-venv)
export DEBIAN_FRONTEND=noninteractive

step() { printf '\n== setup: %s\n' "$*"; }

if [ "$(id -u)" -ne 0 ]; then
    echo "scripts/setup.sh must run as root (it installs Debian packages)" >&2
    exit 1
fi

is_installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'
}

# --- Debian packages --------------------------------------------------------
missing=()
for p in "${APT_PACKAGES[@]}"; do
    is_installed "$p" || missing+=("$p")
done

if [ ${#missing[@]} -gt 0 ]; then
    step "apt-get install ${missing[*]}"
    # Never let package scripts start services (no PostgreSQL on 5432, no system mosquitto):
    # a policy-rc.d that answers 101 ("action forbidden"), only if the machine has none.
    policy=/usr/sbin/policy-rc.d
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod 755 "$policy"
        trap 'rm -f "$policy"' EXIT
    fi
    apt-get update -qq
    # The "main" cluster must not be created: install postgresql-common first, then switch
    # create_main_cluster off in its config, then install the server.
    if ! is_installed postgresql-common; then
        apt-get install -y -qq --no-install-recommends postgresql-common
    fi
    conf=/etc/postgresql-common/createcluster.conf
    if [ -f "$conf" ] && grep -Eq '^[[:space:]]*#?[[:space:]]*create_main_cluster[[:space:]]*=' "$conf"; then
        sed -i -E 's/^[[:space:]]*#?[[:space:]]*create_main_cluster[[:space:]]*=.*/create_main_cluster = false/' "$conf"
    else
        mkdir -p "$(dirname "$conf")"
        echo 'create_main_cluster = false' >>"$conf"
    fi
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
    step "Debian packages: all present"
fi

# --- cargo-pgrx ---------------------------------------------------------------
if cargo pgrx --version 2>/dev/null | grep -qx "cargo-pgrx $PGRX_VERSION"; then
    step "cargo-pgrx $PGRX_VERSION: present"
else
    step "cargo install cargo-pgrx --version $PGRX_VERSION (takes a few minutes)"
    cargo install cargo-pgrx --version "$PGRX_VERSION" --locked
fi

# --- cargo pgrx init against the system PostgreSQL 15 -----------------------------
pgrx_config="${PGRX_HOME:-$HOME/.pgrx}/config.toml"
if [ -f "$pgrx_config" ] && grep -Fq "\"$PG_CONFIG\"" "$pgrx_config"; then
    step "cargo pgrx init: $pgrx_config already names $PG_CONFIG"
else
    step "cargo pgrx init --pg15 $PG_CONFIG"
    cargo pgrx init --pg15 "$PG_CONFIG"
fi

# --- build and install the extension ---------------------------------------------
if [ "${SKIP_BUILD:-0}" = 1 ]; then
    step "build: skipped (SKIP_BUILD=1)"
else
    step "cargo pgrx install --release"
    cargo pgrx install --release --pg-config "$PG_CONFIG"
fi

# --- Python venv for the demo and the end-to-end tests ----------------------------
req=tests/e2e/requirements.txt
stamp=.venv/.requirements.sha256
want=$(sha256sum "$req" | cut -d' ' -f1)
if [ -x .venv/bin/python ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    step "Python venv .venv: up to date"
else
    step "Python venv .venv: installing $req"
    # Debian's interpreter (python3-venv above), not whatever python3 is first on PATH.
    [ -x .venv/bin/python ] || /usr/bin/python3 -m venv .venv
    .venv/bin/pip install --quiet --disable-pip-version-check -r "$req"
    echo "$want" >"$stamp"
fi
step "done"
