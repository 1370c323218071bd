"""The fast path computes the reference path's mathematics (issue #6, "Prove it"), on CPU.

Same batch and same initial weights: torch.compile vs eager and channels_last vs contiguous give the same losses and
gradients; the DeviceFeeder yields the same epoch as the ReferenceFeeder; a training step makes no host sync; the
aten op count of an eager step stays within its budget (performance-anchors.md section 7 item 3).
"""

from __future__ import annotations

import traceback
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from feeder_support import MEAN, STD, identifiable_split, image_ids
from torch._dynamo.utils import counters
from torch.utils._python_dispatch import TorchDispatchMode

import harness.studies.bench.build as bench_build
from harness.data import LTData
from harness.datasets.augment import batched_pipeline, per_image_pipeline
from harness.feeders import DeviceFeeder, ReferenceFeeder
from harness.studies.bench.build import FAST, REFERENCE, Mode, build_trainer, compiled, synthetic_lt
from harness.studies.bench.step import StepCase, random_batch
from harness.trainer import Trainer, set_train_mode

CPU = torch.device("cpu")
BATCH = 16


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def small_data(num_classes: int = 4) -> LTData:
    return synthetic_lt(num_classes, n_max=8, imbalance_factor=4.0, test_per_class=1)


def losses_and_grads(trainer: Trainer, images: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    """One forward (through `loss_step`, compiled or not) and backward of stage 0 from a fresh grad state."""
    model = trainer.spec.model
    set_train_mode(model, False)
    model.zero_grad(set_to_none=True)
    values = trainer.loss_step(0, images, labels)
    values[-1].backward()
    grads = {n: p.grad.detach().double().clone() for n, p in model.named_parameters() if p.grad is not None}
    buffers = {n: b.detach().double().clone() for n, b in model.named_buffers() if b.is_floating_point()}
    return {"values": values.detach().double(), "grads": grads, "buffers": buffers}


def relative_l2(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Global relative L2 error of `a` against `b` over all entries (same keys)."""
    assert a.keys() == b.keys()
    num = sum(float(((a[k] - b[k]) ** 2).sum()) for k in b)
    den = sum(float((b[k] ** 2).sum()) for k in b)
    return (num / den) ** 0.5


def shike_trainer(mode: Mode, data: LTData, float64: bool = False) -> Trainer:
    trainer = build_trainer("shike", mode, data, CPU, BATCH, experts=2, with_feeder=False)
    if float64:
        trainer.spec.model.double()
        trainer.losses.double()
    return trainer


@pytest.fixture(scope="module")
def same_batch() -> dict[str, Any]:
    """A 2-expert 4-class SHIKE on one batch of 16: eager fp32, compiled fp32 (mode default; inductor compilation
    on a cold cache, paid once here), channels_last fp32, and float64 references. Its trunks are ResNet-8
    (`depth=8`, given to the benchmarks' variant table for this fixture only): every block kind of ResNet-32 and the
    same loss step, in a quarter of the graph to compile."""
    data = small_data()
    images, labels = random_batch(BATCH, data.num_classes, CPU)
    with pytest.MonkeyPatch.context() as patch:
        method, switches = bench_build.VARIANTS["shike"]
        patch.setitem(bench_build.VARIANTS, "shike", (method, {**switches, "depth": 8}))
        counters.clear()
        out = {"compiled": losses_and_grads(shike_trainer(compiled("default"), data), images, labels)}
        out["graph_breaks"] = sum(counters["graph_break"].values())
        out["eager"] = losses_and_grads(shike_trainer(REFERENCE, data), images, labels)
        out["channels_last"] = losses_and_grads(shike_trainer(FAST, data), images, labels)
        out["f64"] = losses_and_grads(shike_trainer(REFERENCE, data, float64=True), images.double(), labels)
        out["f64_channels_last"] = losses_and_grads(shike_trainer(FAST, data, float64=True), images.double(),
                                                    labels)
    return out


@pytest.mark.slow
def test_compiled_loss_step_has_no_graph_breaks(same_batch):
    assert same_batch["graph_breaks"] == 0


@pytest.mark.slow
def test_compiled_and_eager_give_the_same_losses_and_gradients(same_batch):
    eager, comp, exact = same_batch["eager"], same_batch["compiled"], same_batch["f64"]
    torch.testing.assert_close(comp["values"], eager["values"], rtol=1e-4, atol=0)
    # Gradient tolerance: this deep BN net on a batch of 16 is ill-conditioned (BN weight gradients are sums with
    # heavy cancellation), so any change of fp32 summation order moves the gradients by ~0.3-1% (inductor's fused
    # kernels: ~0.3-0.8% here). 2e-2 global relative L2 bounds that; a wrong formula would be O(1). Sharper: the
    # compiled gradients are no further from the float64 truth than 3x eager fp32's own rounding error.
    assert relative_l2(comp["grads"], eager["grads"]) < 2e-2
    assert relative_l2(comp["grads"], exact["grads"]) < 3 * relative_l2(eager["grads"], exact["grads"]) + 1e-4
    # BN running statistics are buffers mutated inside the compiled graph: they must be written back identically.
    torch.testing.assert_close(comp["buffers"], eager["buffers"], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_channels_last_is_the_same_mathematics(same_batch):
    # In float64 the layout cannot hide behind rounding: 1e-5 is loose (measured ~3e-14).
    exact, exact_cl = same_batch["f64"], same_batch["f64_channels_last"]
    torch.testing.assert_close(exact_cl["values"], exact["values"], rtol=1e-5, atol=0)
    assert relative_l2(exact_cl["grads"], exact["grads"]) < 1e-5
    torch.testing.assert_close(exact_cl["buffers"], exact["buffers"], rtol=1e-5, atol=1e-8)
    # In fp32 the losses agree to 1e-5; the gradients only to fp32 rounding of this ill-conditioned net: the
    # contiguous fp32 gradients are ~0.2% from float64 and the channels_last ones ~0.6% (measured on this 2-core
    # CPU; the ratio of the two depends on the CPU's kernels, so a ratio bound was flaky). They are held to the same
    # 2e-2 floor as the compiled step; a wrong formula would be O(1).
    eager, fast = same_batch["eager"], same_batch["channels_last"]
    torch.testing.assert_close(fast["values"], eager["values"], rtol=1e-5, atol=0)
    assert relative_l2(fast["grads"], exact["grads"]) < 2e-2


# ------------------------------------------------------------------------------------------------ feeders


def collect(batches: Iterator[tuple[torch.Tensor, torch.Tensor]]) -> tuple[list[int], torch.Tensor, torch.Tensor]:
    sizes, images, labels = [], [], []
    for x, y in batches:
        sizes.append(len(y))
        images.append(x)
        labels.append(y)
    return sizes, torch.cat(images), torch.cat(labels)


@pytest.mark.parametrize("augment", ["none", "autoaugment"])
def test_device_feeder_epoch_matches_the_reference_epoch(augment):
    split = identifiable_split()
    reference = ReferenceFeeder(split, per_image_pipeline(augment, MEAN, STD), 32, CPU)
    device = DeviceFeeder(split, batched_pipeline(augment, MEAN, STD), 32, CPU)
    ref_sizes, _, ref_labels = collect(reference.epoch(7))
    sizes, images, labels = collect(device.epoch(7))
    assert len(device) == len(reference) == len(sizes) == 3
    assert sizes == ref_sizes == [32, 32, 11]
    assert Counter(labels.tolist()) == Counter(ref_labels.tolist()) == Counter(split.labels.tolist())
    assert images.shape == (75, 3, 32, 32) and images.dtype == torch.float32
    if augment == "none":  # every image exactly once, with its own label
        ids = image_ids(images)
        assert sorted(ids.tolist()) == list(range(75))
        assert torch.equal(labels, split.labels[ids])


def test_device_feeder_is_deterministic_per_seed():
    feeder = DeviceFeeder(identifiable_split(), batched_pipeline("autoaugment", MEAN, STD), 32, CPU)
    _, first, first_labels = collect(feeder.epoch(3))
    _, again, again_labels = collect(feeder.epoch(3))
    _, other, other_labels = collect(feeder.epoch(4))
    assert torch.equal(first, again) and torch.equal(first_labels, again_labels)
    assert not torch.equal(first_labels, other_labels) and not torch.equal(first, other)


# ------------------------------------------------------------------------------------- syncs and op counts

# Ops whose output size depends on data: on CUDA they block the host like .item() does.
DATA_DEPENDENT = ("aten.nonzero", "aten.masked_select", "aten._unique", "aten.unique", "aten.repeat_interleave")


# Tensor methods that copy to the host. On CUDA they dispatch a device copy (caught below); on CPU tensors they
# dispatch nothing (.tolist() reads memory directly, .cpu() returns self), so they are counted at the Python level.
HOST_METHODS = ("tolist", "numpy", "cpu")


class SyncCounter(TorchDispatchMode):
    """Counts host synchronisations: `_local_scalar_dense` (what .item(), float() and bool(tensor) dispatch to),
    copies to another device, data-dependent-shape ops and the host-copy methods; keeps the first one's stack."""

    def __init__(self) -> None:
        super().__init__()
        self.syncs: Counter[str] = Counter()
        self.first: str = ""
        self._saved: dict[str, Any] = {}

    def _record(self, name: str) -> None:
        self.syncs[name] += 1
        self.first = self.first or "".join(traceback.format_stack(limit=9)[:-3])

    def _is_sync(self, func: Any, args: tuple, kwargs: dict) -> bool:
        name = str(func)
        if name.startswith("aten._local_scalar_dense") or name.startswith(DATA_DEPENDENT):
            return True
        if name.startswith("aten.index.Tensor"):
            return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None)
        if name.startswith("aten._to_copy") and "device" in kwargs and isinstance(args[0], torch.Tensor):
            return torch.device(kwargs["device"]) != args[0].device
        if name.startswith("aten.copy_"):
            return args[0].device != args[1].device
        return False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self._is_sync(func, args, kwargs):
            self._record(str(func))
        return func(*args, **kwargs)

    def __enter__(self):
        for name in HOST_METHODS:
            original = self._saved[name] = getattr(torch.Tensor, name)

            def counted(tensor, *args, _name=name, _original=original, **kwargs):
                self._record(f"Tensor.{_name}")
                return _original(tensor, *args, **kwargs)

            setattr(torch.Tensor, name, counted)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        return super().__exit__(*exc)


SYNCING = {
    "item": lambda x: x.sum().item(), "tolist": lambda x: x.tolist(), "bool": lambda x: bool(x.sum() > 0),
    "float": lambda x: float(x[0]), "mask": lambda x: x[x > 0], "nonzero": lambda x: x.nonzero(),
    "cpu": lambda x: x.cpu(), "numpy": lambda x: x.numpy(),
}


@pytest.mark.parametrize("kind", sorted(SYNCING))
def test_sync_counter_sees_every_kind_of_host_sync(kind):
    x = torch.randn(4)
    with SyncCounter() as counter:
        x * 2  # device work alone is not a sync
        assert not counter.syncs
        SYNCING[kind](x)
    assert sum(counter.syncs.values()) == 1
    assert torch.Tensor.tolist.__name__ == "tolist"  # the patched methods are restored


@pytest.mark.parametrize("variant", ["plain", "shike"])
def test_no_host_sync_inside_a_training_step(variant):
    """Budget: 0 per step, over a whole DeviceFeeder epoch (full batches and the short last one)."""
    data = small_data()
    trainer = build_trainer(variant, FAST, data, CPU, 8, experts=2)
    run = trainer.stages[0]
    from harness.trainer import enter_stage

    optimizer = enter_stage(trainer.spec, run.stage, trainer.cfg)
    counter, step = SyncCounter(), trainer.step

    def counted_step(*args: Any) -> None:
        with counter:
            step(*args)

    trainer.step = counted_step  # type: ignore[method-assign]
    trainer.run_epoch(run, optimizer, 0)
    assert not counter.syncs, f"{dict(counter.syncs)} host syncs in the step loop; first at:\n{counter.first}"


class OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 1
        return func(*args, **(kwargs or {}))


# Aten ops of one eager training step (forward + loss terms + backward + foreach SGD + the device-side loss sums),
# batch 8, 100 classes, 3 experts; measured here with torch 2.14: plain 544, SHIKE 1,144 (the reference note's
# independent re-implementation: 477 and 1,225). Budget = measured + 10%: a regression (per-step logging, a Python
# loop over experts, extra casts) fails; a saving passes (then lower the budget).
OP_BUDGET = {"plain": 598, "shike": 1258}


@pytest.mark.parametrize("variant", sorted(OP_BUDGET))
def test_aten_ops_per_eager_step_stay_within_budget(variant):
    data = synthetic_lt(100, n_max=2, imbalance_factor=1.0, test_per_class=1)
    trainer = build_trainer(variant, FAST, data, CPU, 8, with_feeder=False)
    case = StepCase(trainer, *random_batch(8, 100, CPU))
    for group in case.optimizer.param_groups:
        group["foreach"] = True  # what SGD picks by default on CUDA (CPU defaults to a per-parameter loop)
    case(1)  # the first step allocates momentum buffers
    with OpCounter() as ops:
        case(1)
    assert 0.5 * OP_BUDGET[variant] / 1.1 < ops.count <= OP_BUDGET[variant], ops.count
