"""A finished run, loaded back from MLflow without retraining: its logged config rebuilds data and method, its
`final_weights.pt` fills the model, post-hoc steps are refitted on the training split, and the split's manifest
hash must match the logged one (the same images, or a one-line refusal)."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from harness.config import RunConfig, config_from_dict
from harness.data import LTData
from harness.errors import HarnessError
from harness.evaluate import Evaluator
from harness.method import MethodSpec
from harness.posthoc import fit_posthoc
from harness.runner import FINAL_WEIGHTS, build_data, build_method, resolve_device
from harness.seeding import seed_everything
from harness.tracking import Tracker


@dataclass
class LoadedRun:
    run_id: str
    cfg: RunConfig
    data: LTData
    spec: MethodSpec
    predictor: torch.nn.Module
    evaluator: Evaluator
    tags: dict[str, str]


def logged_config(tracker: Tracker, run_id: str) -> tuple[RunConfig, dict[str, Any]]:
    """The run's resolved config (`config.json`) and its tags."""
    run = tracker.client.get_run(run_id)
    try:
        raw = json.loads(tracker.load_text(run_id, "config.json"))
    except HarnessError:
        raise
    except Exception:
        raise HarnessError(f"run {run_id} has no config.json artifact; it was not logged by `harness run`") from None
    return config_from_dict(raw["config"]), dict(run.data.tags)


def load_run(tracker: Tracker, run_id: str, device: str | None = None) -> LoadedRun:
    cfg, tags = logged_config(tracker, run_id)
    if FINAL_WEIGHTS not in tracker.artifact_names(run_id):
        raise HarnessError(f"run {run_id} kept no {FINAL_WEIGHTS} (unfinished, or logged by an older harness); "
                           "`harness rerun` it to get one")
    data = build_data(cfg)
    if tags.get("manifest_hash") and tags["manifest_hash"] != data.manifest_hash:
        raise HarnessError(f"run {run_id} was trained on data with manifest {tags['manifest_hash']}, but "
                           f"{cfg.data.dataset} here gives {data.manifest_hash}; point --data-root at the same files")
    dev = resolve_device(device or cfg.train.device)
    seed_everything(cfg.train.seed)
    spec = build_method(cfg, data)
    with tempfile.TemporaryDirectory() as tmp:
        path = tracker.download(run_id, FINAL_WEIGHTS, tmp)
        spec.model.load_state_dict(torch.load(Path(path), map_location="cpu", weights_only=True))
    spec.model.to(dev)
    spec.model.use_head(spec.stages[-1].head)
    predictor = fit_posthoc(spec.model, spec.posthoc, data.train, data.mean, data.std, dev)
    evaluator = Evaluator(data.class_counts, data.mean, data.std, dev)
    return LoadedRun(run_id, cfg, data, spec, predictor, evaluator, tags)
