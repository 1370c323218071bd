"""Benchmark-and-ablation harness for long-tailed recognition: engine (CLI, config, trainer, evaluator, tracking)."""

__version__ = "0.1.0"
