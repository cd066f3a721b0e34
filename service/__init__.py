"""EditServe service: CLI (and later the HTTP API, ledger and queue)."""
