"""Frozen run configuration, named presets and strict `key=value` overrides (nanoGPT's strictness, typed).

A run is fully described by a `RunConfig`. Overrides address it with dotted keys (`optim.lr=0.1`,
`train.epochs=6`, `method.alpha=0.2`); an unknown key or a value of the wrong type is a `HarnessError`.
Method switches are checked against the method builder's keyword defaults, so a typo fails at once.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from harness.errors import HarnessError


@dataclass(frozen=True)
class DataConfig:
    dataset: str = "fmnistlt"
    imbalance_factor: float = 100.0
    profile: str = "first-n"  # which images form the LT subset: first-n (official SHIKE) or ldam-seed0
    n_max: int = 0  # 0: the dataset's default head-class size
    data_root: str = ""
    download: bool = False
    data_seed: int = 0  # separate from the training seed: the split never moves when the training seed does
    val_per_class: int = 0  # balanced validation split carved from the training file (tuning only)
    test_per_class: int = 0  # 0: the full balanced test set; >0 keeps the first k per class (CPU demos)
    augment: str = "autoaugment"  # autoaugment (official: crop, flip, AutoAugment, Cutout) | basic | none


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 0.05  # the official CLI lr; the `code` schedule warms up from it to the peaks below
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    schedule: str = "code"  # code: official warm-up + cosine per stage; paper: cosine from lr to 0, restarted
    warmup_epochs: int = 5
    peak_lr: float = 0.15  # official stage-1 peak (cifarTrain.py:105-112)
    crt_peak_lr: float = 0.1  # official stage-2 peak (cifarTrain.py:113-120)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 180  # representation stage
    crt_epochs: int = 20  # classifier re-training stage; one-stage methods train epochs + crt_epochs
    seed: int = 0
    eval_interval: int = 1  # test evaluation every k epochs (logged only, never used to select); 0: final only
    eval_test: bool = True  # False (tuning trials): evaluate the validation split only, never the test split
    device: str = "auto"  # auto | cpu | cuda
    amp: bool = True  # autocast on CUDA only (official: fp16 AMP)
    deterministic: bool = False
    fast_path: str = "auto"  # auto: device-resident batched augmentation on CUDA, reference DataLoader on CPU
    compile: str = "auto"  # auto (reduce-overhead on CUDA, off on CPU) | off | default | reduce-overhead | max-autotune
    num_workers: int = 0
    checkpoint_interval: int = 0  # epochs between atomic checkpoints (+ end of each stage); 0: 1 on CPU, 10 on CUDA
    channels_last: bool = True  # NHWC convolutions: ~25% faster steps on this CPU; tensor-core friendly on CUDA


@dataclass(frozen=True)
class RunConfig:
    method: str = "shike"
    method_args: tuple[tuple[str, Any], ...] = ()
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    preset: str = "shike-code"

    @property
    def method_kwargs(self) -> dict[str, Any]:
        return dict(self.method_args)


# Presets are named after their source (reference/shike-official-code.md section 7). Method keys apply to a
# method only where its builder has that switch. alpha/beta are in batch-mean KL units (findings.md): 0.1/0.01
# is exactly the official loss on CIFAR-100 and keeps its per-sample strength on other class counts.
PRESETS: dict[str, dict[str, Any]] = {
    "shike-code": {
        "optim.schedule": "code",
        "data.augment": "autoaugment",
        "method.head": "cosine",
        "method.shortcut": "B",
        "method.alpha": 0.1,
        "method.beta": 0.01,
        "method.kl_reduction": "batchmean",
        "method.dkt_variant": "code",
        "method.align_relu": "code",
    },
    # The literal official units: KL averaged over B*C with alpha = 10, beta = 1 (weaker by 1/C per sample).
    "shike-code-literal": {
        "optim.schedule": "code",
        "data.augment": "autoaugment",
        "method.head": "cosine",
        "method.shortcut": "B",
        "method.alpha": 10.0,
        "method.beta": 1.0,
        "method.kl_reduction": "mean",
        "method.dkt_variant": "code",
        "method.align_relu": "code",
    },
    # The paper's wording where it differs: linear heads, lr 0.05 cosine to 0 restarted, (C-1)-way DKT.
    "shike-paper": {
        "optim.schedule": "paper",
        "data.augment": "autoaugment",
        "method.head": "linear",
        "method.shortcut": "B",
        "method.alpha": 0.1,
        "method.beta": 0.01,
        "method.kl_reduction": "batchmean",
        "method.dkt_variant": "paper",
        "method.align_relu": "code",
    },
}


def builder_defaults(builder: Callable[..., Any], context: Iterable[str] = ("num_classes", "class_counts")) -> dict:
    """The user-settable keyword defaults of a method builder (context arguments excluded)."""
    params = inspect.signature(builder).parameters.values()
    return {p.name: p.default for p in params if p.name not in context and p.default is not inspect.Parameter.empty}


def _coerce(key: str, raw: Any, default: Any) -> Any:
    """Parse `raw` to the type of `default`; bool accepts true/false/1/0/yes/no, float accepts ints."""
    kind = type(default)
    if not isinstance(raw, str):
        if isinstance(raw, kind) or (kind is float and isinstance(raw, int) and not isinstance(raw, bool)):
            return kind(raw)
        raise HarnessError(f"--set {key}: expected {kind.__name__}, got {raw!r}")
    text = raw.strip()
    try:
        if kind is bool:
            lowered = text.lower()
            if lowered in ("true", "1", "yes", "on"):
                return True
            if lowered in ("false", "0", "no", "off"):
                return False
            raise ValueError
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
        if kind is str:
            return text
        if default is None:
            return text
    except ValueError:
        pass
    raise HarnessError(f"--set {key}={raw}: expected a {kind.__name__} value (default is {default!r})")


def parse_assignments(items: Iterable[str]) -> dict[str, str]:
    """`["a.b=1", ...]` -> {"a.b": "1"}; a missing '=' is an error."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise HarnessError(f"--set expects key=value (e.g. optim.lr=0.1), got '{item}'")
        out[key.strip()] = value
    return out


def _section_keys() -> dict[str, type]:
    return {f.name: f.type for f in fields(RunConfig) if f.name in ("data", "optim", "train")}


def apply_overrides(
    cfg: RunConfig, overrides: Mapping[str, Any], method_defaults: Mapping[str, Any], *, strict_method: bool = True
) -> RunConfig:
    """Return `cfg` with dotted-key overrides applied and type-checked.

    `method.*` keys are checked against `method_defaults` (the builder's keyword defaults). With
    strict_method False (preset values), method keys the builder lacks are skipped instead of refused.
    """
    sections = {name: getattr(cfg, name) for name in _section_keys()}
    method_args = dict(cfg.method_args)
    for key, raw in overrides.items():
        section, _, name = key.partition(".")
        if section == "method":
            if name not in method_defaults:
                if not strict_method:
                    continue
                known = ", ".join(sorted(method_defaults)) or "(none)"
                raise HarnessError(f"unknown key '{key}' for method '{cfg.method}'; its switches are: {known}")
            default = method_defaults[name]
            method_args[name] = raw if default is None else _coerce(key, raw, default)
        elif section in sections and name in {f.name for f in fields(sections[section])}:
            current = getattr(sections[section], name)
            sections[section] = replace(sections[section], **{name: _coerce(key, raw, current)})
        else:
            known = ", ".join(f"{s}.{f.name}" for s, obj in sections.items() for f in fields(obj))
            raise HarnessError(f"unknown config key '{key}'; known keys: {known}, method.<switch>")
    return replace(cfg, method_args=tuple(sorted(method_args.items())), **sections)


def resolve(
    method: str,
    builder: Callable[..., Any],
    *,
    preset: str = "shike-code",
    overrides: Mapping[str, Any] | None = None,
    base: RunConfig | None = None,
) -> RunConfig:
    """Build the resolved config: defaults -> preset -> method defaults -> explicit overrides."""
    if preset not in PRESETS:
        raise HarnessError(f"unknown preset '{preset}'; known presets: {', '.join(sorted(PRESETS))}")
    defaults = builder_defaults(builder)
    cfg = replace(base or RunConfig(), method=method, preset=preset, method_args=tuple(sorted(defaults.items())))
    cfg = apply_overrides(cfg, PRESETS[preset], defaults, strict_method=False)
    return apply_overrides(cfg, overrides or {}, defaults)


def flatten(cfg: RunConfig) -> dict[str, Any]:
    """Flat `section.key -> value` view of a config (MLflow params, JSON artifact)."""
    flat: dict[str, Any] = {"method": cfg.method, "preset": cfg.preset}
    for section in ("data", "optim", "train"):
        for key, value in dataclasses.asdict(getattr(cfg, section)).items():
            flat[f"{section}.{key}"] = value
    for key, value in cfg.method_args:
        flat[f"method.{key}"] = value
    return flat


def parse_epochs(text: str) -> tuple[int, int]:
    """`--epochs`: "E1+E2" sets both stages; a single E keeps the official 180:20 ratio (E + ceil(E/9))."""
    try:
        if "+" in text:
            first, second = (int(part) for part in text.split("+", 1))
        else:
            first = int(text)
            second = -(-first // 9)
    except ValueError:
        raise HarnessError(f"--epochs expects E or E1+E2 (e.g. 180+20), got '{text}'") from None
    if first < 1 or second < 0:
        raise HarnessError(f"--epochs must be positive, got '{text}'")
    return first, second
