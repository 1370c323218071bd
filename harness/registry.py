"""A small name -> builder registry (fvcore/torchvision style): duplicates are refused, misses list the known names."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from harness.errors import HarnessError


class Registry:
    """Maps names to builder callables for one concept (methods, datasets)."""

    def __init__(self, concept: str) -> None:
        self.concept = concept
        self._builders: dict[str, Callable[..., Any]] = {}

    def register(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def decorator(fn: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._builders:
                raise ValueError(f"a {self.concept} named '{name}' is already registered")
            self._builders[name] = fn
            return fn

        return decorator

    def get(self, name: str) -> Callable[..., Any]:
        if name not in self._builders:
            known = ", ".join(sorted(self._builders))
            raise HarnessError(f"unknown {self.concept} '{name}'; known {self.concept}s: {known}")
        return self._builders[name]

    def names(self) -> list[str]:
        return sorted(self._builders)

    def __contains__(self, name: object) -> bool:
        return name in self._builders

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
