"""Method plugins. Importing this package fills `METHODS`; each plugin file registers one or more builders."""

from harness.registry import Registry

METHODS = Registry("method")

from methods import baselines, branches, shike  # noqa: E402,F401  (registration side effects)

__all__ = ["METHODS"]
