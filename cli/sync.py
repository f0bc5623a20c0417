"""``craft sync``: a local copy of a model repository kept up to date from S3-compatible storage (or a folder)."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from .common import CliError, HelpFormatter

__all__ = ["register", "run"]


def _line(report) -> str:
    if not report.changed:
        return f"sync: manifest {report.manifest_id} unchanged"
    removed = f", removed {len(report.removed)}" if report.removed else ""
    return (f"sync: manifest {report.manifest_id} in place: copied {len(report.copied)} folders, reused "
            f"{len(report.reused)}{removed} ({report.seconds:.1f} s)")


def run(args: argparse.Namespace) -> int:
    from craft_serving.repo_sync import SyncError, sync_forever, sync_once
    from craft_serving.stores import StoreError, open_store

    if args.interval <= 0:
        raise CliError(f"--interval: must be > 0 seconds (got {args.interval})")
    repo = Path(args.repo)
    try:
        store = open_store(args.source, args.endpoint_url)
        repo.mkdir(parents=True, exist_ok=True)
        if args.once:
            print(_line(sync_once(store, repo)), flush=True)
            return 0
    except (SyncError, StoreError, OSError) as exc:
        raise CliError(str(exc)) from exc
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # a pod's stop: finish or drop the round, exit 0
        signal.signal(sig, lambda *_: stop.set())
    last: list[str | None] = [None]

    def alive(_key: str = "") -> None:
        if args.alive_file:
            Path(args.alive_file).touch()

    def on_round(report, error) -> None:
        alive()
        if error is not None:
            print(f"sync: round failed, the local copy is unchanged: {error}", file=sys.stderr, flush=True)
        elif report.changed or last[0] != report.manifest_id:
            print(_line(report), flush=True)
        if report is not None:
            last[0] = report.manifest_id

    print(f"sync: {store} -> {repo} every {args.interval:g} s", flush=True)
    sync_forever(store, repo, args.interval, stop, on_round, progress=alive)
    return 0


def register(sub) -> None:
    p = sub.add_parser("sync", formatter_class=HelpFormatter,
                       help="keep a local copy of a model repository in S3-compatible storage (for craft serve)")
    p.add_argument("--source", required=True,
                   help="s3://BUCKET/PREFIX (credentials: AWS_* environment variables, or the pod's IAM role), "
                        "or a folder")
    p.add_argument("--repo", required=True, help="local folder craft serve reads (created if missing)")
    p.add_argument("--once", action="store_true", help="one round, then exit (init container); default: keep syncing")
    p.add_argument("--interval", type=float, default=15.0, help="seconds between rounds")
    p.add_argument("--alive-file", default=None,
                   help="touched after every round and every object copied, for a liveness probe (default: none)")
    p.add_argument("--endpoint-url", default=None,
                   help="S3 endpoint of a store other than AWS, e.g. https://minio.example:9000 "
                        "(default: AWS_ENDPOINT_URL, else AWS)")
    p.set_defaults(func=run)
