#!/bin/sh
# Container entrypoint: `serve` (default), `worker`, `migrate`, `healthcheck` or any editserve
# command.
set -e
if [ "$1" = "serve" ]; then
    shift
    exec editserve serve --host "${EDITSERVE_HOST:-0.0.0.0}" --port "${EDITSERVE_PORT:-8000}" "$@"
fi
if [ "$1" = "healthcheck" ]; then
    # /readyz answers 200 once the model is loaded and the ledger head restored. One argv word
    # per healthcheck field: podman's Docker API splits `python -c "..."` at its spaces.
    exec python -c "import sys, urllib.request; urllib.request.urlopen('http://127.0.0.1:${EDITSERVE_PORT:-8000}/readyz', timeout=4); sys.exit(0)"
fi
exec editserve "$@"
