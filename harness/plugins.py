"""Where plugins come from: Python entry points (one group per registry) and `--plugin MODULE` names.

`--plugin` modules are recorded in the HARNESS_PLUGINS environment variable when the command starts, so worker
processes (ablation `--workers`, tuning workers) import the same modules on their first registry lookup.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Iterable

from harness.errors import HarnessError

ENV_VAR = "HARNESS_PLUGINS"
log = logging.getLogger(__name__)
_imported: set[str] = set()


def plugin_modules() -> list[str]:
    """The module names listed in HARNESS_PLUGINS (comma-separated)."""
    return [name.strip() for name in os.environ.get(ENV_VAR, "").split(",") if name.strip()]


def import_plugin(name: str) -> None:
    """Import a plugin module once; a missing or broken module is one clear error."""
    if name in _imported:
        return
    try:
        importlib.import_module(name)
    except Exception as error:  # a plugin's own bug, or a name not on sys.path
        raise HarnessError(f"cannot import plugin module '{name}' ({type(error).__name__}: {error}); "
                           "check that it is installed or on PYTHONPATH") from error
    _imported.add(name)


def add_plugins(names: Iterable[str]) -> None:
    """`--plugin MODULE`: import now and record for worker processes."""
    wanted = [n for n in names if n]
    for name in wanted:
        import_plugin(name)
    merged = list(dict.fromkeys([*plugin_modules(), *wanted]))
    if merged:
        os.environ[ENV_VAR] = ",".join(merged)


def load_env_plugins() -> None:
    for name in plugin_modules():
        import_plugin(name)
