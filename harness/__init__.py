"""Benchmark-and-ablation harness for long-tailed recognition: engine (CLI, config, trainer, evaluator, tracking)."""

# The package's one version source: pyproject.toml reads it ([tool.setuptools.dynamic]) by parsing this file, and
# `import harness` stays cheap, so keep this module free of imports.
__version__ = "0.1.0"
