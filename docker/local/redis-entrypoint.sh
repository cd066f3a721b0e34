#!/bin/sh
# Entrypoint of the local redis image: `redis-server ARGS` runs as the redis user in /data
# with protected mode off (like the stock image); REDIS_PORT moves the port (host-network runs).
set -e
if [ "$(id -u)" = 0 ]; then
    chown redis:redis /data
    exec setpriv --reuid=redis --regid=redis --init-groups "$0" "$@"
fi
if [ "$1" = redis-server ]; then
    shift
    exec redis-server --dir /data --protected-mode no --port "${REDIS_PORT:-6379}" "$@"
fi
exec "$@"
