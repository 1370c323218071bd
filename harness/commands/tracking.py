"""`harness tracking replay [FILE ...]`: send spooled logging calls (kept while a tracking server was away) to the
server, or to another URI holding the same store. With no FILE, every spool under the runs folder."""

from __future__ import annotations

import argparse
from pathlib import Path

from harness.errors import HarnessError
from harness.spool import Spool, spool_files
from harness.tracking import Tracker, spool_dir


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("tracking", help="tracking maintenance: replay spooled logging calls")
    actions = parser.add_subparsers(dest="action", required=True)
    replay = actions.add_parser("replay", help="send spool files (kept while the tracking server was away)")
    replay.add_argument("files", nargs="*", type=Path, metavar="FILE",
                        help="spool files (default: every <runs>/spool/*.jsonl)")
    replay.add_argument("--tracking-uri", default=None,
                        help="where to send them (default: the URI each run was started on)")
    replay.set_defaults(func=run_replay)


def run_replay(args: argparse.Namespace) -> int:
    files = args.files or spool_files(spool_dir())
    if not files:
        print(f"nothing to replay: no spool files in {spool_dir()}")
        return 0
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise HarnessError(f"no spool file {', '.join(missing)}; spool files live in {spool_dir()}")
    trackers: dict[str, Tracker] = {}
    for path in files:
        uri = args.tracking_uri or _started_on(path)
        tracker = trackers.setdefault(uri, Tracker(uri))
        count = tracker.replay(path)
        print(f"replayed {count} logging call(s) from {path} to {uri}")
    return 0


def _started_on(path: Path) -> str:
    try:
        return Spool(path).read()[0]["tracking_uri"]
    except (OSError, ValueError, KeyError) as error:
        raise HarnessError(f"cannot read spool file {path}: {error}") from None
