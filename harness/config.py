"""Frozen run configuration, named presets and strict `key=value` overrides (nanoGPT's strictness, typed).

A run is fully described by a `RunConfig`. Overrides address it with dotted keys (`optim.lr=0.1`,
`train.epochs=6`, `method.alpha=0.2`); an unknown key or a value of the wrong type is a `HarnessError`.
Method switches are checked against the method builder's keyword defaults, so a typo fails at once.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

from harness.errors import HarnessError

if TYPE_CHECKING:  # harness.method imports torch; the command line reads this module without it
    from harness.method import Stage

# The fields of a Stage that `--set stage.<name>.<field>=value` may override (type-checked like other keys).
STAGE_OVERRIDES = ("epochs", "peak_lr", "warmup_epochs", "schedule", "freeze_bn", "sampler", "weight_decay", "mixup")


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
    loader: str = "auto"  # file-backed datasets: auto (DALI on CUDA when installed and the augment allows) | torchvision | dali
    image_size: int = 224  # file-backed datasets: crop side (RandomResizedCrop(s); Resize(s*256/224) + CenterCrop(s))


@dataclass(frozen=True)
class OptimConfig:
    lr: float = 0.05  # the official CLI lr; the `code` schedule warms up from it to each stage's peak
    momentum: float = 0.9
    nesterov: bool = False  # Nesterov momentum in every stage's SGD (RIDE's and TLC's own recipes)
    weight_decay: float = 5e-4
    batch_size: int = 128
    schedule: str = "code"  # code: official warm-up + cosine per stage; paper: cosine from lr to 0, restarted
    peak_lr_scale: float = 1.0  # multiplies every stage's peak LR (e.g. 0.5 at batch 32: square-root scaling)


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 0  # total over all stages, split in the method's own proportions (SHIKE 9:1); 0: its recipe (200)
    stage_epochs: str = ""  # "E1+E2": each stage's epochs in order (a one-stage method trains the sum)
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
    sync_bn: bool = False  # DDP: nn.SyncBatchNorm (CUDA only); off = per-process BN (large-scale-lt.md section 5)


@dataclass(frozen=True)
class RunConfig:
    method: str = "shike"
    method_args: tuple[tuple[str, Any], ...] = ()
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    preset: str = "shike-code"
    stage_args: tuple[tuple[str, Any], ...] = ()  # ("classifier.peak_lr", 0.05): `--set stage.<name>.<field>=v`

    @property
    def method_kwargs(self) -> dict[str, Any]:
        return dict(self.method_args)


# One base, then each preset as its differences from it (reference/shike-official-code.md section 7). The base is
# what the official code does. Method keys apply to a method only where its builder has that switch. alpha/beta
# are in batch-mean KL units (findings.md): 0.1/0.01 is exactly the official loss on CIFAR-100 and keeps its
# per-sample strength on other class counts.
BASE: dict[str, Any] = {
    "optim.schedule": "code",
    "data.augment": "autoaugment",
    "method.head": "cosine",
    "method.shortcut": "B",
    "method.alpha": 0.1,
    "method.beta": 0.01,
    "method.kl_reduction": "batchmean",
    "method.dkt_variant": "code",
    "method.align_relu": "code",
}
# What SHIKE's three large-scale settings share (section 4.2): SGD momentum 0.9, weight decay 5e-4, cosine from
# the stated LR to 0 restarted per stage (`optim.schedule=paper`), RandAugment as in NCL, ResNet-50 experts.
LARGE_SCALE: dict[str, Any] = {"optim.schedule": "paper", "optim.momentum": 0.9, "optim.weight_decay": 5e-4,
                               "data.augment": "randaugment", "method.backbone": "resnet50"}
PRESETS: dict[str, dict[str, Any]] = {
    "shike-code": {},
    # The literal official units: KL averaged over B*C with alpha = 10, beta = 1 (weaker by 1/C per sample).
    "shike-code-literal": {"method.alpha": 10.0, "method.beta": 1.0, "method.kl_reduction": "mean"},
    # The paper's wording where it differs: linear heads, lr 0.05 cosine to 0 restarted, (C-1)-way DKT.
    "shike-paper": {"optim.schedule": "paper", "method.head": "linear", "method.dkt_variant": "paper"},
    # Each method's own published CIFAR-100-LT recipe: what its builder declares with `own_recipe` (batch, weight
    # decay, augmentation, ...) plus `method.recipe=own` (its own stages: epochs, LR schedule, samplers).
    "own": {},
    **{f"shike-{name}": {**LARGE_SCALE, **values} for name, values in {
        # SHIKE section 4.2 (large-scale-lt.md section 2.4): the stated LR, cosine to 0, restarted for the 20
        # classifier epochs. The paper leaves the batch open: the pairs of section 2.5 give NCL's per-sample rates.
        "imagenetlt": {"data.dataset": "imagenetlt", "data.imbalance_factor": 256.0, "optim.lr": 0.2, "optim.batch_size": 256},
        "inat2018": {"data.dataset": "inat2018", "data.imbalance_factor": 500.0, "optim.lr": 0.025, "optim.batch_size": 64},
        # ImageNet-pretrained ResNet-152 (a torchvision-format file: --set method.pretrained=PATH), the shared part
        # kept fixed, 30 epochs of fine-tuning then the 20 classifier epochs; no RandAugment (named for the other two).
        "placeslt": {"data.dataset": "placeslt", "data.imbalance_factor": 996.0, "optim.lr": 0.02, "optim.batch_size": 128, "data.augment": "basic",
                     "method.backbone": "resnet152", "method.pretrained": "torchvision", "method.freeze": "trunk",
                     "train.stage_epochs": "30+20"},
    }.items()},
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
    method_args, stage_args = dict(cfg.method_args), dict(cfg.stage_args)
    for key, raw in overrides.items():
        section, _, name = key.partition(".")
        if section == "stage":
            stage_args[name] = _stage_value(key, name, raw)
        elif section == "method":
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
            raise HarnessError(f"unknown config key '{key}'; known keys: {known}, method.<switch>, "
                               "stage.<stage>.<field>")
    return replace(cfg, method_args=tuple(sorted(method_args.items())), stage_args=tuple(sorted(stage_args.items())),
                   **sections)


def _stage_value(key: str, name: str, raw: Any) -> Any:
    """`stage.<stage>.<field>`: the field must be one a stage lets the config override; the stage name is checked
    against the method's stages when it is built (`stage_overrides`)."""
    stage, _, field_name = name.partition(".")
    if not stage or field_name not in STAGE_OVERRIDES:
        raise HarnessError(f"--set {key}: expected stage.<stage name>.<field> with field one of "
                           f"{', '.join(STAGE_OVERRIDES)}")
    from harness.method import Stage

    default = {f.name: f.default for f in fields(Stage)}[field_name]
    if field_name == "weight_decay":  # None in the Stage (follow optim.weight_decay); a float when set
        default = 0.0
    return _coerce(key, raw, default) if default is not None else str(raw)


def stage_overrides(stages: tuple[Stage, ...], stage_args: tuple[tuple[str, Any], ...]) -> tuple[Stage, ...]:
    """The method's stages with `--set stage.<name>.<field>` applied; an unknown stage name is an error."""
    names = [s.name for s in stages]
    changes: dict[str, dict[str, Any]] = {}
    for key, value in stage_args:
        stage, _, field_name = key.partition(".")
        if stage not in names:
            raise HarnessError(f"--set stage.{key}: this method has no stage '{stage}'; its stages: {', '.join(names)}")
        changes.setdefault(stage, {})[field_name] = value
    return tuple(replace(s, **changes.get(s.name, {})) for s in stages)


def resolve_config(
    method: str,
    *,
    preset: str = "shike-code",
    dataset: str | None = None,
    imbalance_factor: float | None = None,
    seed: int | None = None,
    epochs: str | None = None,
    device: str | None = None,
    data_root: str | None = None,
    download: bool | None = None,
    switches: Mapping[str, Any] | None = None,
    overrides: Mapping[str, Any] | Iterable[str] | None = None,
    base: RunConfig | None = None,
) -> RunConfig:
    """The one way a run's config is made (CLI, ablation rows, tuning trials alike), in this order:
    defaults -> BASE -> preset -> the builder's own defaults for keys neither sets -> flags (dataset, --if,
    --seeds, --epochs, --device, ...) -> a table row's switches -> `--set key=value` (strings or a mapping)."""
    from harness.registry import METHODS

    if preset not in PRESETS:
        raise HarnessError(f"unknown preset '{preset}'; known presets: {', '.join(sorted(PRESETS))}")
    builder = METHODS.get(method)
    defaults = builder_defaults(builder)
    cfg = replace(base or RunConfig(), method=method, preset=preset, method_args=tuple(sorted(defaults.items())))
    cfg = apply_overrides(cfg, {**BASE, **PRESETS[preset], **preset_for(builder, method, preset)}, defaults,
                          strict_method=False)
    flags = {"data.dataset": dataset, "data.imbalance_factor": imbalance_factor, "train.seed": seed,
             "train.device": device, "data.data_root": data_root, "data.download": download}
    explicit: dict[str, Any] = {k: v for k, v in flags.items() if v is not None}
    if epochs:
        explicit.update(parse_epochs(epochs))
    explicit.update({f"method.{k}": v for k, v in (switches or {}).items()})
    if overrides is not None and not isinstance(overrides, Mapping):
        overrides = parse_assignments(overrides)
    explicit.update(overrides or {})
    return apply_overrides(cfg, explicit, defaults)


def preset_for(builder: Callable[..., Any], method: str, preset: str) -> dict[str, Any]:
    """The method-specific part of a preset: for "own", the builder's declared recipe and `method.recipe=own`."""
    if preset != "own":
        return {}
    recipe = getattr(builder, "own_recipe", None)
    if recipe is None:
        raise HarnessError(f"method '{method}' declares no recipe of its own; run it with a SHIKE preset "
                           "(--preset shike-code)")
    return {**recipe, "method.recipe": "own"}


def flatten(cfg: RunConfig) -> dict[str, Any]:
    """Flat `section.key -> value` view of a config (MLflow params, JSON artifact)."""
    flat: dict[str, Any] = {"method": cfg.method, "preset": cfg.preset}
    for section in ("data", "optim", "train"):
        for key, value in dataclasses.asdict(getattr(cfg, section)).items():
            flat[f"{section}.{key}"] = value
    for key, value in cfg.method_args:
        flat[f"method.{key}"] = value
    for key, value in cfg.stage_args:
        flat[f"stage.{key}"] = value
    return flat


def parse_epochs(text: str) -> dict[str, Any]:
    """`--epochs`: "E" is E epochs in all, split in the method's own stage proportions (200 -> 180 + 20 for SHIKE);
    "E1+E2" sets each stage's epochs in order."""
    parts = text.split("+")
    try:
        values = [int(part) for part in parts]
    except ValueError:
        raise HarnessError(f"--epochs expects E or E1+E2 (e.g. 200 or 180+20), got '{text}'") from None
    if any(v < 0 for v in values) or values[0] < 1:
        raise HarnessError(f"--epochs must be positive, got '{text}'")
    if len(values) == 1:
        return {"train.epochs": values[0], "train.stage_epochs": ""}
    return {"train.stage_epochs": "+".join(map(str, values)), "train.epochs": 0}


def plan_epochs(stages: tuple[Stage, ...], train: TrainConfig) -> list[int]:
    """Each stage's epochs: `stage_epochs` one by one (a one-stage method trains their sum; the last stage takes
    any surplus), else `epochs` split in the stages' own proportions (largest remainder, at least 1 each), else the
    stages' own recipe."""
    own = [s.epochs for s in stages]
    if train.stage_epochs:
        given = [int(p) for p in train.stage_epochs.split("+")]
        if len(given) < len(stages):
            raise HarnessError(f"train.stage_epochs={train.stage_epochs} gives {len(given)} stages, but the method "
                               f"has {len(stages)}: {', '.join(s.name for s in stages)}")
        return given[: len(stages) - 1] + [sum(given[len(stages) - 1:])]
    if not train.epochs or train.epochs == sum(own):
        return own
    if train.epochs < len(stages):
        raise HarnessError(f"train.epochs={train.epochs} is fewer than the method's {len(stages)} stages")
    exact = [train.epochs * e / sum(own) for e in own]
    out = [max(1, math.floor(x)) for x in exact]
    by_remainder = sorted(range(len(own)), key=lambda i: (-(exact[i] - math.floor(exact[i])), i))
    for i in by_remainder[: max(0, train.epochs - sum(out))]:
        out[i] += 1
    return out


def config_from_dict(raw: Mapping[str, Any]) -> RunConfig:
    """A `RunConfig` from its logged JSON (`config.json` of a run): keys a newer harness added take their defaults;
    a key this harness does not know is an error (the run was logged by a newer one)."""
    sections = {"data": DataConfig, "optim": OptimConfig, "train": TrainConfig}
    values: dict[str, Any] = {}
    for name, kind in sections.items():
        given = dict(raw.get(name, {}))
        unknown = set(given) - {f.name for f in fields(kind)}
        if unknown:
            raise HarnessError(f"logged config has unknown {name} keys {sorted(unknown)}; update the harness")
        values[name] = kind(**given)
    return RunConfig(method=raw["method"], preset=raw.get("preset", "shike-code"),
                     method_args=tuple((k, v) for k, v in raw.get("method_args", ())),
                     stage_args=tuple((k, v) for k, v in raw.get("stage_args", ())), **values)


def read_config_file(path: str) -> list[str]:
    """`--config FILE.yaml`: the keys `--set` takes, nested (`optim: {lr: 0.1}`) or dotted (`optim.lr: 0.1`), as
    `key=value` items (applied before `--set`, so `--set` wins)."""
    import yaml

    try:
        with open(path, encoding="utf-8") as handle:
            raw = yaml.safe_load(handle) or {}
    except OSError as error:
        raise HarnessError(f"cannot read config file {path}: {error.strerror or error}") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise HarnessError(f"config file {path} is not valid YAML{where}") from None
    if not isinstance(raw, dict):
        raise HarnessError(f"config file {path} must map keys to values (e.g. 'optim.lr: 0.1')")
    items: list[str] = []

    def walk(prefix: str, node: Any) -> None:
        for key, value in node.items():
            dotted = f"{prefix}{key}"
            if isinstance(value, dict):
                walk(f"{dotted}.", value)
            elif isinstance(value, (list, tuple)):
                raise HarnessError(f"config file {path}: '{dotted}' is a list; give one value per key")
            else:
                text = "" if value is None else str(value).lower() if isinstance(value, bool) else str(value)
                items.append(f"{dotted}={text}")

    walk("", raw)
    return items
