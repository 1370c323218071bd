"""Name -> builder registries (fvcore/torchvision style): duplicates are refused, misses list the known names.

A registry fills itself on first lookup from its entry-point group (the harness's own methods and datasets are
declared there too, in pyproject.toml) and from `--plugin` modules, so a third-party package adds a method, dataset
or table by declaring an entry point, without editing this project.
"""

from __future__ import annotations

import logging
import types
from collections.abc import Callable, Iterator
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from harness.errors import HarnessError
from harness.plugins import load_env_plugins

log = logging.getLogger(__name__)


def _plugin_last(point: EntryPoint) -> bool:
    """The harness's own entry points load first, so a plugin that reuses a built-in name is the one refused; loaded
    the other way round, it would take the name and the built-in module's own registration would then fail."""
    return point.module.partition(".")[0] != "harness"


class Registry:
    """Maps names to builders (or specs) for one concept; `group` is its entry-point group."""

    def __init__(self, concept: str, group: str | None = None) -> None:
        self.concept, self.group = concept, group
        self._builders: dict[str, Any] = {}
        self._loaded = False

    def register(self, name: str) -> Callable[[Any], Any]:
        def decorator(obj: Any) -> Any:
            if name in self._builders and self._builders[name] is not obj:
                raise ValueError(f"a {self.concept} named '{name}' is already registered")
            self._builders[name] = obj
            return obj

        return decorator

    def load_plugins(self) -> None:
        """Import `--plugin` modules and this registry's entry points (once per process)."""
        if self._loaded:
            return
        self._loaded = True
        load_env_plugins()
        if self.group is None:
            return
        for point in sorted(entry_points(group=self.group), key=_plugin_last):
            try:
                obj = point.load()
            except Exception as error:  # one broken plugin must not take the others down
                log.warning("harness: skipping %s plugin '%s' (%s: %s)", self.concept, point.value,
                            type(error).__name__, error)
                continue
            if isinstance(obj, types.ModuleType):
                continue  # the module registered itself on import
            if self._builders.get(point.name, obj) is not obj:
                log.warning("harness: %s '%s' from %s clashes with one already registered; keeping the first",
                            self.concept, point.name, point.value)
                continue
            self._builders[point.name] = obj

    def get(self, name: str) -> Any:
        if name not in self._builders:
            self.load_plugins()
        if name not in self._builders:
            raise HarnessError(f"unknown {self.concept} '{name}'; known {self.concept}s: {', '.join(self.names())}")
        return self._builders[name]

    def names(self) -> list[str]:
        self.load_plugins()
        return sorted(self._builders)

    def __contains__(self, name: object) -> bool:
        if name not in self._builders:
            self.load_plugins()
        return name in self._builders

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __getitem__(self, name: str) -> Any:
        return self.get(name)

    def values(self) -> list[Any]:
        return [self._builders[name] for name in self.names()]

    def items(self) -> list[tuple[str, Any]]:
        return [(name, self._builders[name]) for name in self.names()]


METHODS = Registry("method", "lt_harness.methods")
DATASETS = Registry("dataset", "lt_harness.datasets")
