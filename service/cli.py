"""`editserve` command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from editors import EditError, EditRequest
from editors.hparams import parse_overrides
from editors.weight_state import WeightState

from . import corpus_cli
from .evaluations import cli as evaluations_cli


def cmd_edit(args: argparse.Namespace) -> int:
    import torch

    from editors.editor import Editor, corpus_statistics
    from editors.models import default_cache_dir, load_model

    from .progress import progress_bar

    try:
        request = EditRequest(prompt=args.prompt, subject=args.subject, target_new=args.target)
    except EditError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    model, tok = load_model(args.model, Path(args.cache_dir) if args.cache_dir else None)
    cache = (Path(args.cache_dir) if args.cache_dir else default_cache_dir()) / "stats"

    def answer() -> str:
        ids = tok(request.text, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(
                **ids,
                max_new_tokens=args.max_new_tokens,
                do_sample=False,
                pad_token_id=tok.pad_token_id,
            )
        return tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)

    print(f"before: {request.text}{answer()}")
    with progress_bar("statistics") as bar:
        stats = corpus_statistics(model, tok, cache, args.corpus, args.samples, progress=bar)
        editor = Editor(model, tok, stats)
        try:
            stats.prepare(editor.statistics_layers(args.method, parse_overrides(args.set)))
        except EditError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    with progress_bar(f"{args.method} edit") as bar:
        try:
            result = editor.compute([request], args.method, parse_overrides(args.set), progress=bar)
        except EditError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
    WeightState(model).apply(result.patch)
    print(f"after:  {request.text}{answer()}")
    d = result.diagnostics
    print(
        json.dumps(
            {
                "method": d.method,
                "layers": d.layers,
                "steps": d.steps,
                "prob_before": d.prob_before,
                "prob_after": d.prob_after,
                "seconds": {k: round(v, 2) for k, v in d.seconds.items()},
                "patch_sha256": result.patch.sha256,
            },
            indent=2,
        )
    )
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from .api.app import create_app
    from .config import Settings
    from .observability import configure_logging

    settings = Settings()
    configure_logging(settings.log_format, args.log_level)
    host, port = args.host or settings.host, args.port or settings.port
    uvicorn.run(
        create_app(settings), host=host, port=port, log_level=args.log_level, log_config=None
    )
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    """The edit worker on its own (the API then runs with EDITSERVE_RUN_WORKER=false)."""
    import signal
    import threading

    from .config import Settings
    from .observability import configure_logging
    from .state import ServiceState

    settings = Settings()
    configure_logging(settings.log_format, args.log_level)
    settings.warn_about_old_data_dir()
    state = ServiceState.create(settings, run_migrations=settings.auto_migrate)
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    state.boot(run_worker=True)
    if state.boot_error:
        print(f"error: {state.boot_error}", file=sys.stderr)
        state.close()
        return 1
    assert state.engine is not None
    print(
        f"worker {settings.worker_name} ready at version {state.engine.version}",
        file=sys.stderr,
        flush=True,
    )
    stopping.wait()
    state.close()
    return 0


def cmd_migrate(args: argparse.Namespace) -> int:
    from .config import Settings
    from .ledger.db import migrate

    settings = Settings()
    if not args.database_url:
        settings.warn_about_old_data_dir()
    url = args.database_url or settings.resolved_database_url
    migrate(url, args.revision)
    print(f"ledger schema at {args.revision}")
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    """Create, list or revoke API keys in the ledger database."""
    from .auth import KeyStore, ScopeError
    from .config import Settings
    from .ledger.db import make_engine, migrate, session_factory

    settings = Settings()
    if not args.database_url:
        settings.warn_about_old_data_dir()
    url = args.database_url or settings.resolved_database_url
    migrate(url)
    engine = make_engine(url)
    store = KeyStore(session_factory(engine))
    try:
        if args.action == "create":
            try:
                row, plain = store.create(args.name, args.scopes.split(","))
            except ScopeError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 2
            print(json.dumps({"id": row.id, "name": row.name, "scopes": row.scopes}))
            print(plain)  # shown once; only its hash is stored
        elif args.action == "list":
            for row in store.list():
                state = "revoked" if row.revoked_at else "active"
                print(f"{row.id}  es_{row.prefix}_…  {row.name}  {','.join(row.scopes)}  {state}")
        else:
            revoked = store.revoke(args.key)
            if revoked is None:
                print(f"error: no key {args.key!r}", file=sys.stderr)
                return 2
            print(f"revoked {revoked.id} ({revoked.name})")
    finally:
        engine.dispose()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="editserve", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    edit = sub.add_parser(
        "edit", help="apply one edit to the model and show its answer before and after"
    )
    edit.add_argument(
        "--prompt",
        default="The mother tongue of {} is",
        help="prompt with {} for the subject (or the subject spelled out)",
    )
    edit.add_argument("--subject", default="Danielle Darrieux")
    edit.add_argument("--target", default="English", help="the new answer")
    edit.add_argument("--method", default="rome")
    edit.add_argument(
        "--model", default="smollm2-135m-instruct", help="built-in name, local folder or hub id"
    )
    edit.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="hyperparameter override (repeatable)",
    )
    edit.add_argument(
        "--corpus",
        help="text or JSONL file for statistics (default: text the model samples itself)",
    )
    edit.add_argument("--samples", type=int, default=20_000, help="statistics sample count")
    edit.add_argument("--cache-dir", help="models and statistics cache (~/.cache/editserve)")
    edit.add_argument("--max-new-tokens", type=int, default=12)
    edit.set_defaults(func=cmd_edit)

    serve = sub.add_parser("serve", help="run the HTTP API (settings from EDITSERVE_* variables)")
    serve.add_argument("--host", help="default: EDITSERVE_HOST or 127.0.0.1")
    serve.add_argument("--port", type=int, help="default: EDITSERVE_PORT or 8000")
    serve.add_argument("--log-level", default="info")
    serve.set_defaults(func=cmd_serve)

    worker = sub.add_parser("worker", help="run the edit worker on its own")
    worker.add_argument("--log-level", default="info")
    worker.set_defaults(func=cmd_worker)

    migrate = sub.add_parser("migrate", help="bring the ledger schema up to date (Alembic)")
    migrate.add_argument("--database-url", help="default: EDITSERVE_DATABASE_URL or SQLite")
    migrate.add_argument("--revision", default="head")
    migrate.set_defaults(func=cmd_migrate)

    keys = sub.add_parser("keys", help="create, list or revoke API keys")
    keys.add_argument("--database-url", help="default: EDITSERVE_DATABASE_URL or SQLite")
    actions = keys.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="print a new key (shown once)")
    create.add_argument("--name", required=True)
    create.add_argument(
        "--scopes", default="generate", help="comma-separated: generate,evaluate,edit,admin"
    )
    actions.add_parser("list", help="list keys (never their secrets)")
    revoke = actions.add_parser("revoke", help="revoke a key by id or prefix")
    revoke.add_argument("key")
    keys.set_defaults(func=cmd_keys)

    evaluations_cli.add_parser(sub)
    corpus_cli.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
