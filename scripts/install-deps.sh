#!/usr/bin/env bash
# Installs what the demo and the tests need and is missing, from Debian's packages: Mosquitto, the
# PostgreSQL server binaries, Prometheus (promtool, and a real server for the dashboard test),
# docker-compose (validates docker-compose.yml), systemd-analyze, openssl (test certificates) and
# python3 (a plain program for the benchmark flush shim's test), libfaketime (a node clock that
# runs ahead, in tests), pg_auto_failover (a replicated primary/standby pair run by a failover
# manager, for the database failover tests and chaos rows).
# Idempotent; prints what it does.
set -euo pipefail

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    echo "install-deps: not root and no sudo; install mosquitto and postgresql yourself" >&2
  fi
fi

need=()
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto mosquitto-clients)
command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 || need+=(prometheus)
command -v docker-compose >/dev/null 2>&1 || need+=(docker-compose)
command -v systemd-analyze >/dev/null 2>&1 || need+=(systemd)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
# libfaketime: a node whose clock runs ahead of the database's (tests).
ls /usr/lib/*/faketime/libfaketimeMT.so.1 >/dev/null 2>&1 || need+=(faketime)
command -v python3 >/dev/null 2>&1 || need+=(python3)
# A virtual environment for the Sparkplug B tests' edge node (pysparkplug, from PyPI).
python3 -c 'import ensurepip' >/dev/null 2>&1 || need+=(python3-venv)
if [ -z "${PG_BIN:-}" ] && ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
  need+=(postgresql)
fi
# pg_auto_failover: the pg_autoctl command and the monitor's extension for the server version the
# tests run (Debian 12 ships PostgreSQL 15, and the packages are built per server version).
command -v pg_autoctl >/dev/null 2>&1 || need+=(pg-auto-failover-cli)
ls /usr/share/postgresql/15/extension/pgautofailover.control >/dev/null 2>&1 || need+=(postgresql-15-auto-failover)

if [ ${#need[@]} -gt 0 ]; then
  echo "install-deps: installing ${need[*]}"
  export DEBIAN_FRONTEND=noninteractive
  if ! $SUDO apt-get install -y --no-install-recommends "${need[@]}"; then
    $SUDO apt-get update
    $SUDO apt-get install -y --no-install-recommends "${need[@]}"
  fi
fi
# Debian starts system-wide services on install where systemd runs (a broker on 0.0.0.0:1883,
# Prometheus on 0.0.0.0:9090); the project starts its own on loopback, so stop those.
if [ ${#need[@]} -gt 0 ] && [ -d /run/systemd/system ]; then
  for svc in mosquitto prometheus; do
    $SUDO systemctl disable --now "$svc" >/dev/null 2>&1 || true
  done
fi
command -v mosquitto >/dev/null 2>&1 || export PATH="$PATH:/usr/sbin"
command -v cargo >/dev/null 2>&1 || { echo "install-deps: cargo (Rust) is required: https://rustup.rs" >&2; exit 1; }
# The Sparkplug B tests drive an edge node written with a published library (pysparkplug), in a
# virtual environment of the project's own (target/pyenv), pinned.
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYENV="$ROOT/target/pyenv"
if ! "$PYENV/bin/python" -c 'import pysparkplug' >/dev/null 2>&1; then
  echo "install-deps: creating $PYENV with pysparkplug"
  python3 -m venv "$PYENV"
  "$PYENV/bin/pip" install --quiet --disable-pip-version-check 'pysparkplug==0.6.1' 'paho-mqtt==1.6.1'
fi
echo "install-deps: ok ($( { mosquitto -h 2>/dev/null || true; } | head -1), postgres in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | tail -1))"
