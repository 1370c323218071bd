"""`harness ui`: the MLflow UI on the local store, bound to 127.0.0.1."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("ui", help="start the MLflow UI on the local store (127.0.0.1)")
    parser.add_argument("--port", type=int, default=5000)
    parser.add_argument("--tracking-uri", default=None)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from harness.tracking import default_tracking_uri

    uri = args.tracking_uri or default_tracking_uri()
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true",
           "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(args.port),
               "--backend-store-uri", uri, "--workers", "1"]
    # MLflow 3 opens experiments on its GenAI page unless asked for the classic runs table.
    print(f"MLflow UI for {uri}: http://127.0.0.1:{args.port}/#/experiments?workflowType=machine_learning "
          "(Ctrl-C to stop)")
    return subprocess.call(command, env=env)
