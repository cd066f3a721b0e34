#!/bin/sh
# Container entrypoint: `serve` (default), `worker`, `migrate` or any editserve command.
set -e
if [ "$1" = "serve" ]; then
    shift
    exec editserve serve --host "${EDITSERVE_HOST:-0.0.0.0}" --port "${EDITSERVE_PORT:-8000}" "$@"
fi
exec editserve "$@"
