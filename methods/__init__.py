"""Method plugins: one file per method family, each registering its builders in `METHODS` (declared as entry points
in pyproject.toml, so the registry imports them on first lookup)."""

from harness.registry import METHODS

__all__ = ["METHODS"]
