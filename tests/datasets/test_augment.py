"""The per-image reference augmentation (official SHIKE / DeepVoltaire CIFAR10Policy on PIL) and the batched one:
policy table, op frequencies, op-by-op agreement with PIL, pixel statistics, per-sample randomness, geometry."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from harness.datasets.augment import (
    CIFAR10_POLICY,
    MAGNITUDES,
    OP_NAMES,
    SIGNED_OPS,
    CIFAR10Policy,
    Cutout,
    expected_op_frequencies,
    pil_op,
    synthetic_cifar_images,
    train_transform,
)
from harness.datasets.augment import test_transform as eval_transform
from harness.datasets.batched_augment import BatchedAugment, apply_op, autoaugment, crop_flip, cutout_mask
from harness.feeders import AugmentedDataset

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)


def to_pil(img: torch.Tensor) -> Image.Image:
    return Image.fromarray(img.permute(1, 2, 0).numpy())


def per_sample_moments(policy=CIFAR10_POLICY) -> dict[str, tuple[float, float]]:
    """Exact mean and variance of the number of times each op is applied to one image."""
    moments = {}
    for op in OP_NAMES:
        ex = ex2 = 0.0
        for sub in policy:
            p = [prob if name == op else 0.0 for name, prob, _ in sub]
            ex += (p[0] + p[1]) / len(policy)
            ex2 += (p[0] + p[1] + 2 * p[0] * p[1]) / len(policy)  # E[(B1 + B2)^2], B1, B2 independent Bernoulli
        moments[op] = (ex, ex2 - ex**2)
    return moments


# --------------------------------------------------------------------------------------------- policy table


def test_policy_table_is_the_official_cifar10_policy():
    assert len(CIFAR10_POLICY) == 25
    for sub in CIFAR10_POLICY:
        assert len(sub) == 2
        for op, prob, level in sub:
            assert op in OP_NAMES and 0.0 <= prob <= 1.0 and level in range(10)
    assert CIFAR10_POLICY[0] == (("invert", 0.1, 7), ("contrast", 0.2, 6))
    assert CIFAR10_POLICY[1] == (("rotate", 0.7, 2), ("translateX", 0.3, 9))
    assert CIFAR10_POLICY[24] == (("translateY", 0.7, 9), ("autocontrast", 0.9, 1))
    counts = Counter(op for sub in CIFAR10_POLICY for op, _, _ in sub)
    assert counts["equalize"] == 9 and counts["autocontrast"] == 7 and "shearX" not in counts
    freq = expected_op_frequencies()
    assert freq["equalize"] == pytest.approx(4.7 / 25) and freq["translateY"] == pytest.approx(3.4 / 25)
    assert sum(freq.values()) == pytest.approx(sum(p for sub in CIFAR10_POLICY for _, p, _ in sub) / 25)


def test_magnitude_tables_are_official():
    assert all(len(v) == 10 for v in MAGNITUDES.values()) and set(MAGNITUDES) == set(OP_NAMES)
    assert MAGNITUDES["shearY"][9] == pytest.approx(0.3) and MAGNITUDES["shearX"][1] == pytest.approx(0.3 / 9)
    assert MAGNITUDES["translateX"][9] == pytest.approx(150 / 331)
    assert MAGNITUDES["rotate"][2] == pytest.approx(20 / 3) and MAGNITUDES["rotate"][9] == 30
    assert MAGNITUDES["posterize"] == (8, 8, 7, 7, 6, 6, 5, 5, 4, 4)
    assert MAGNITUDES["solarize"][0] == 256 and MAGNITUDES["solarize"][8] == pytest.approx(256 / 9)
    for op in ("color", "contrast", "sharpness", "brightness"):
        assert MAGNITUDES[op][0] == 0 and MAGNITUDES[op][9] == pytest.approx(0.9)
    # autoaugment.py: random sign for shear/translate/enhance ops, but rotate always turns counter-clockwise.
    assert "rotate" not in SIGNED_OPS and {"shearY", "translateX", "color", "brightness"} <= SIGNED_OPS


# ---------------------------------------------------------------------------------------------- frequencies


def assert_frequencies(record: Counter, n: int) -> None:
    """Each op's count is a sum of n i.i.d. per-image counts: |z| < 4.5 against the policy's exact moments."""
    for op, (mean, var) in per_sample_moments().items():
        if var == 0:
            assert record[op] == 0, op
            continue
        z = (record[op] - n * mean) / math.sqrt(n * var)
        assert abs(z) < 4.5, f"{op}: {record[op]} applications in {n} images, expected {n * mean:.0f} (z={z:.1f})"


def test_reference_op_frequencies_match_policy():
    torch.manual_seed(0)
    policy, img, n = CIFAR10Policy(), to_pil(synthetic_cifar_images(1, seed=0, size=8)[0]), 20000
    policy.record = Counter()
    for _ in range(n):
        policy(img)
    assert_frequencies(policy.record, n)


def test_batched_op_frequencies_match_policy():
    n, record = 40000, Counter()
    x = synthetic_cifar_images(1, seed=0, size=8).float().expand(n, 3, 8, 8).contiguous()
    autoaugment(x, torch.Generator().manual_seed(0), record)
    assert_frequencies(record, n)


# ------------------------------------------------------------------------------------- op-by-op vs PIL


@pytest.fixture(scope="module")
def op_images() -> torch.Tensor:
    noise = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    flat = torch.full((1, 3, 32, 32), 77, dtype=torch.uint8)  # one grey level: the identity paths of equalize etc.
    return torch.cat([synthetic_cifar_images(8, seed=3), noise, flat])


@pytest.mark.parametrize("op", OP_NAMES)
def test_batched_op_matches_pil(op, op_images):
    """Every magnitude index and sign, on structured, noise and flat images. Measured: bit-exact for all 14 ops
    with Pillow 13; the bound leaves room for a last-bit float difference on another build, not for a bug."""
    diffs = []
    for level in range(10):
        for sign in (1, -1) if op in SIGNED_OPS else (1,):
            out = apply_op(op, op_images, level, float(sign))
            for img, got in zip(op_images, out):
                ref = torch.from_numpy(np.array(pil_op(to_pil(img), op, level, sign))).permute(2, 0, 1)
                diffs.append((got - ref.float()).abs())
    diffs = torch.stack(diffs)
    assert diffs.max() <= 1 and diffs.mean() <= 1e-3, f"{op}: max {diffs.max()}, mean abs error {diffs.mean():.4f}"


# Sub-policies that always apply two unsigned ops that do not commute: the batched pipeline must apply them in the
# official order (slot 0, then slot 1), exactly as the reference does.
ORDERED_SUBPOLICIES = (
    (("invert", 1.0, 0), ("posterize", 1.0, 9)),
    (("posterize", 1.0, 9), ("invert", 1.0, 0)),
    (("rotate", 1.0, 9), ("equalize", 1.0, 0)),
    (("solarize", 1.0, 3), ("autocontrast", 1.0, 0)),
)


@pytest.mark.parametrize("sub", ORDERED_SUBPOLICIES, ids=lambda s: f"{s[0][0]}-then-{s[1][0]}")
def test_batched_policy_applies_slots_in_order(sub, op_images):
    out = autoaugment(op_images.float(), torch.Generator().manual_seed(0), policy=(sub,))
    ref = [np.array(CIFAR10Policy(policy=(sub,))(to_pil(img))) for img in op_images]
    assert torch.equal(out, torch.from_numpy(np.stack(ref)).permute(0, 3, 1, 2).float())


# ----------------------------------------------------------------------------------------- whole pipelines


def test_pixel_statistics_match_reference():
    """Per-channel mean and std of the normalised outputs agree within 3.5/255 / std (about 4 sigma of the sampling
    noise: 2,048 reference samples and 8,192 batched ones of 64 structured base images)."""
    base = synthetic_cifar_images(64, seed=5)
    dataset = AugmentedDataset(base.repeat(32, 1, 1, 1), torch.zeros(2048), train_transform(MEAN, STD))
    torch.manual_seed(0)
    ref = torch.stack([dataset[i][0] for i in range(len(dataset))])
    out = BatchedAugment(MEAN, STD)(base.repeat(128, 1, 1, 1), torch.Generator().manual_seed(0))
    tol = 3.5 / 255 / torch.tensor(STD)
    for stat in (lambda t: t.mean((0, 2, 3)), lambda t: t.std((0, 2, 3))):
        assert ((stat(out) - stat(ref)).abs() < tol).all(), (stat(out), stat(ref))


def test_identical_images_get_different_augmentations():
    images = synthetic_cifar_images(1, seed=2).expand(8, 3, 32, 32).contiguous()
    out = BatchedAugment(MEAN, STD)(images, torch.Generator().manual_seed(0)).flatten(1)
    assert (torch.cdist(out, out) + torch.eye(8) > 0).all()


def test_batched_is_deterministic_per_generator_and_leaves_input_alone():
    images = synthetic_cifar_images(64, seed=2)
    before = images.clone()
    aug = BatchedAugment(MEAN, STD)
    a, b = aug(images, torch.Generator().manual_seed(7)), aug(images, torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and not torch.equal(a, aug(images, torch.Generator().manual_seed(8)))
    assert torch.equal(images, before) and a.dtype == torch.float32 and a.shape == images.shape


def test_none_mode_equals_test_transform():
    images = synthetic_cifar_images(4, seed=2)
    out = BatchedAugment(MEAN, STD, augment="none")(images, torch.Generator())
    ref = torch.stack([eval_transform(MEAN, STD)(to_pil(img)) for img in images])
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


def crop_candidates(img: torch.Tensor, pad: int = 4) -> torch.Tensor:
    """All (2 pad + 1)^2 x 2 crops of a zero-padded image, flipped or not: (162, C, H, W)."""
    padded, (h, w) = F.pad(img, (pad,) * 4), img.shape[-2:]
    crops = [padded[:, y : y + h, x : x + w] for y in range(2 * pad + 1) for x in range(2 * pad + 1)]
    crops = torch.stack(crops)
    return torch.cat([crops, crops.flip(-1)])


def test_crop_flip_geometry_and_uniformity():
    rows = torch.arange(1, 33, dtype=torch.uint8).view(32, 1).expand(32, 32)
    img = torch.stack([rows, rows.t(), torch.full((32, 32), 200, dtype=torch.uint8)])  # every pixel unique
    n = 8100
    out = crop_flip(img.expand(n, 3, 32, 32), torch.Generator().manual_seed(0))
    candidates = crop_candidates(img)
    weights = torch.randint(1, 1000, (3 * 32 * 32,), generator=torch.Generator().manual_seed(0)).double()
    match = (out.flatten(1).double() @ weights)[:, None] == (candidates.flatten(1).double() @ weights)[None, :]
    assert (match.sum(1) == 1).all()  # each output is exactly one crop/flip of the padded image
    assert torch.equal(out, candidates[match.int().argmax(1)])
    counts = match.sum(0).double()
    expected = n / 162
    assert counts.min() > 0 and ((counts - expected) ** 2 / expected).sum() < 230  # chi2(161): p ~ 3e-4


def test_basic_mode_is_crop_flip_then_normalise():
    img = synthetic_cifar_images(1, seed=4)[0]
    out = BatchedAugment(MEAN, STD, augment="basic")(img.expand(64, 3, 32, 32), torch.Generator().manual_seed(0))
    pixels = (out * torch.tensor(STD).view(3, 1, 1) + torch.tensor(MEAN).view(3, 1, 1)) * 255
    pixels = pixels.round().to(torch.uint8)
    match = (pixels.flatten(1).unsqueeze(1) == crop_candidates(img).flatten(1).unsqueeze(0)).all(-1)
    assert match.any(1).all()


def assert_clipped_squares(keep: torch.Tensor, length: int = 16) -> None:
    """keep: (n, H, W) in {0, 1}; the zeros form one square of side `length`, clipped at the borders."""
    hole = keep == 0
    rows, cols = hole.any(2), hole.any(1)
    assert torch.equal(hole, rows.unsqueeze(2) & cols.unsqueeze(1))  # a rectangle (product of row and col sets)
    for side in (rows, cols):
        first, size = side.float().argmax(1, keepdim=True), side.sum(1, keepdim=True)
        index = torch.arange(side.shape[1])
        assert ((size >= length // 2) & (size <= length)).all()
        assert torch.equal(side, (index >= first) & (index < first + size))  # one contiguous run
        # centre uniform over the image: the side is clipped (< length) for 16 of 32 centre positions
        assert 0.4 < (size < length).double().mean() < 0.6


def test_cutout_geometry_batched_and_reference():
    assert_clipped_squares(cutout_mask(4000, 32, 32, 16, torch.Generator().manual_seed(0), torch.device("cpu"))[:, 0])
    torch.manual_seed(0)
    cut = Cutout(1, 16)
    assert_clipped_squares(torch.stack([cut(torch.ones(3, 32, 32))[0] for _ in range(2000)]))


def test_cutout_zeroes_before_normalisation():
    """Replaying the generator stream: __call__ = crop_flip -> autoaugment -> /255 -> cutout -> normalise, and the
    hole holds exactly (0 - mean) / std."""
    images, seed = synthetic_cifar_images(32, seed=6), 3
    out = BatchedAugment(MEAN, STD)(images, torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(seed)
    x = autoaugment(crop_flip(images, g).float(), g) / 255
    keep = cutout_mask(32, 32, 32, 16, g, torch.device("cpu"))
    mean, std = torch.tensor(MEAN).view(1, 3, 1, 1), torch.tensor(STD).view(1, 3, 1, 1)
    torch.testing.assert_close(out, (x * keep - mean) / std, rtol=0, atol=1e-6)
    hole = (keep == 0).expand_as(out)
    assert hole.any() and torch.equal(out[hole], (-mean / std).expand_as(out)[hole])


# ---------------------------------------------------------------------------------- reference determinism


def test_reference_pipeline_is_reproducible_under_torch_seed():
    dataset = AugmentedDataset(synthetic_cifar_images(16, seed=1), torch.arange(16), train_transform(MEAN, STD))

    def epoch(seed: int) -> torch.Tensor:
        torch.manual_seed(seed)
        loader = torch.utils.data.DataLoader(dataset, batch_size=8, shuffle=True, num_workers=0)
        return torch.cat([torch.cat([x.flatten(1), y[:, None].float()], 1) for x, y in loader])

    assert torch.equal(epoch(0), epoch(0)) and not torch.equal(epoch(0), epoch(1))


def test_unknown_augment_is_refused():
    with pytest.raises(ValueError, match="autoaugment"):
        BatchedAugment(MEAN, STD, augment="randaugment")
    with pytest.raises(ValueError, match="autoaugment"):
        train_transform(MEAN, STD, augment="randaugment")
