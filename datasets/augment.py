"""Per-image REFERENCE augmentation for CIFAR, faithful to the official SHIKE code, on PIL images.

Official source: jinyan-06/SHIKE `cifarTrain.py:19-41` (the 'advanced_train' / 'base_train' / 'test' stacks) and
`autoaugment.py` (Cutout at :8-34, CIFAR10Policy at :37-87, SubPolicy with its magnitude tables at :90-158), which is
the DeepVoltaire/AutoAugment CIFAR-10 policy (AutoAugment paper, Cubuk et al. 2019, appendix table).

One deliberate difference: every random draw uses torch's global RNG (the official code uses python `random` and
`np.random`), so seeding torch once per epoch makes a DataLoader with num_workers=0 reproducible (exact resume).
`datasets.batched_augment.BatchedAugment` samples the same distribution for a whole batch at once.
"sim" is PaCo's SimCLR-style CIFAR view (`sim_transform`, from dvlab-research PaCo `paco_cifar.py`), the view a
contrastive method's extra views name (`harness.method.View(augment="sim")`).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter, ImageOps
from torchvision import transforms

from harness.data import Augmentations

OP_NAMES: tuple[str, ...] = (
    "shearX", "shearY", "translateX", "translateY", "rotate", "color", "posterize",
    "solarize", "contrast", "sharpness", "brightness", "autocontrast", "equalize", "invert",
)  # fmt: skip


def _levels(start: float, stop: float) -> tuple[float, ...]:
    return tuple(float(v) for v in np.linspace(start, stop, 10))


# autoaugment.py:92-107, indexed by the magnitude index 0..9 of a sub-policy.
MAGNITUDES: dict[str, tuple[float, ...]] = {
    "shearX": _levels(0, 0.3),
    "shearY": _levels(0, 0.3),
    "translateX": _levels(0, 150 / 331),  # fraction of the image width
    "translateY": _levels(0, 150 / 331),
    "rotate": _levels(0, 30),  # degrees, counter-clockwise
    "color": _levels(0.0, 0.9),  # enhance factor 1 +/- m
    "posterize": tuple(float(b) for b in np.round(np.linspace(8, 4, 10), 0).astype(int)),  # bits kept
    "solarize": _levels(256, 0),  # threshold
    "contrast": _levels(0.0, 0.9),
    "sharpness": _levels(0.0, 0.9),
    "brightness": _levels(0.0, 0.9),
    "autocontrast": (0.0,) * 10,
    "equalize": (0.0,) * 10,
    "invert": (0.0,) * 10,
}

# Ops whose magnitude gets a random sign (`random.choice([-1, 1])` in autoaugment.py). Rotate is NOT signed in
# the official code: `rotate_with_fill(img, magnitude)` always turns counter-clockwise.
SIGNED_OPS: frozenset[str] = frozenset(
    {"shearX", "shearY", "translateX", "translateY", "color", "contrast", "sharpness", "brightness"}
)

SubPolicy = tuple[tuple[str, float, int], tuple[str, float, int]]

# CIFAR10Policy (autoaugment.py:49-79): 25 sub-policies of two (op, probability, magnitude index) triples.
CIFAR10_POLICY: tuple[SubPolicy, ...] = (
    (("invert", 0.1, 7), ("contrast", 0.2, 6)),
    (("rotate", 0.7, 2), ("translateX", 0.3, 9)),
    (("sharpness", 0.8, 1), ("sharpness", 0.9, 3)),
    (("shearY", 0.5, 8), ("translateY", 0.7, 9)),
    (("autocontrast", 0.5, 8), ("equalize", 0.9, 2)),
    (("shearY", 0.2, 7), ("posterize", 0.3, 7)),
    (("color", 0.4, 3), ("brightness", 0.6, 7)),
    (("sharpness", 0.3, 9), ("brightness", 0.7, 9)),
    (("equalize", 0.6, 5), ("equalize", 0.5, 1)),
    (("contrast", 0.6, 7), ("sharpness", 0.6, 5)),
    (("color", 0.7, 7), ("translateX", 0.5, 8)),
    (("equalize", 0.3, 7), ("autocontrast", 0.4, 8)),
    (("translateY", 0.4, 3), ("sharpness", 0.2, 6)),
    (("brightness", 0.9, 6), ("color", 0.2, 8)),
    (("solarize", 0.5, 2), ("invert", 0.0, 3)),
    (("equalize", 0.2, 0), ("autocontrast", 0.6, 0)),
    (("equalize", 0.2, 8), ("equalize", 0.6, 4)),
    (("color", 0.9, 9), ("equalize", 0.6, 6)),
    (("autocontrast", 0.8, 4), ("solarize", 0.2, 8)),
    (("brightness", 0.1, 3), ("color", 0.7, 0)),
    (("solarize", 0.4, 5), ("autocontrast", 0.9, 3)),
    (("translateY", 0.9, 9), ("translateY", 0.7, 9)),
    (("autocontrast", 0.9, 2), ("solarize", 0.8, 3)),
    (("equalize", 0.8, 8), ("invert", 0.1, 3)),
    (("translateY", 0.7, 9), ("autocontrast", 0.9, 1)),
)

Fill = tuple[int, int, int]


def expected_op_frequencies(policy: tuple[SubPolicy, ...] = CIFAR10_POLICY) -> dict[str, float]:
    """Expected applications per image of each op: sum over sub-policies of prob / len(policy)."""
    freq = dict.fromkeys(OP_NAMES, 0.0)
    for sub in policy:
        for op, prob, _ in sub:
            freq[op] += prob / len(policy)
    return freq


def _affine(img: Image.Image, coeffs: tuple[float, ...], fill: Fill, bicubic: bool = False) -> Image.Image:
    resample = Image.Resampling.BICUBIC if bicubic else Image.Resampling.NEAREST
    return img.transform(img.size, Image.Transform.AFFINE, coeffs, resample, fillcolor=fill)


def _rotate_with_fill(img: Image.Image, degrees: float, fill: Fill) -> Image.Image:
    # autoaugment.py: rotate in RGBA (nearest, transparent outside), then composite over a flat fill colour.
    rot = img.convert("RGBA").rotate(degrees)
    return Image.composite(rot, Image.new("RGBA", rot.size, (*fill, 128)), rot).convert(img.mode)


_PIL_OPS: dict[str, Callable[[Image.Image, float, Fill], Image.Image]] = {
    "shearX": lambda img, m, fill: _affine(img, (1, m, 0, 0, 1, 0), fill, bicubic=True),
    "shearY": lambda img, m, fill: _affine(img, (1, 0, 0, m, 1, 0), fill, bicubic=True),
    "translateX": lambda img, m, fill: _affine(img, (1, 0, m * img.size[0], 0, 1, 0), fill),
    "translateY": lambda img, m, fill: _affine(img, (1, 0, 0, 0, 1, m * img.size[1]), fill),
    "rotate": lambda img, m, fill: _rotate_with_fill(img, m, fill),
    "color": lambda img, m, fill: ImageEnhance.Color(img).enhance(1 + m),
    "posterize": lambda img, m, fill: ImageOps.posterize(img, int(m)),
    "solarize": lambda img, m, fill: ImageOps.solarize(img, m),
    "contrast": lambda img, m, fill: ImageEnhance.Contrast(img).enhance(1 + m),
    "sharpness": lambda img, m, fill: ImageEnhance.Sharpness(img).enhance(1 + m),
    "brightness": lambda img, m, fill: ImageEnhance.Brightness(img).enhance(1 + m),
    "autocontrast": lambda img, m, fill: ImageOps.autocontrast(img),
    "equalize": lambda img, m, fill: ImageOps.equalize(img),
    "invert": lambda img, m, fill: ImageOps.invert(img),
}


def pil_op(img: Image.Image, op: str, level: int, sign: int = 1, fill: Fill = (128, 128, 128)) -> Image.Image:
    """Apply one AutoAugment op at magnitude index `level` (0..9); `sign` multiplies the magnitude of signed ops."""
    magnitude = MAGNITUDES[op][level] * (sign if op in SIGNED_OPS else 1)
    return _PIL_OPS[op](img, magnitude, fill)


def _random_sign() -> int:
    return 1 if int(torch.randint(0, 2, ()).item()) else -1


class CIFAR10Policy:
    """AutoAugment CIFAR-10 policy on PIL images (autoaugment.py CIFAR10Policy + SubPolicy), torch RNG.

    Set `record` to a Counter to count each op actually applied (used by the op-frequency tests).
    """

    def __init__(self, fill: Fill = (128, 128, 128), policy: tuple[SubPolicy, ...] = CIFAR10_POLICY) -> None:
        self.fill = fill
        self.policy = policy
        self.record: Counter[str] | None = None

    def __call__(self, img: Image.Image) -> Image.Image:
        sub = self.policy[int(torch.randint(0, len(self.policy), ()).item())]
        for op, prob, level in sub:
            if torch.rand(()).item() < prob:
                sign = _random_sign() if op in SIGNED_OPS else 1
                img = pil_op(img, op, level, sign, self.fill)
                if self.record is not None:
                    self.record[op] += 1
        return img

    def __repr__(self) -> str:
        return "CIFAR10Policy(AutoAugment CIFAR-10, torch RNG)"


class Cutout:
    """Zero `holes` squares of side `length` in a CHW tensor (autoaugment.py:8-34): the centre is uniform over the
    image and the square is clipped at the borders. Applied after ToTensor, before Normalize, as the official."""

    def __init__(self, holes: int = 1, length: int = 16) -> None:
        self.holes = holes
        self.length = length

    def __call__(self, img: torch.Tensor) -> torch.Tensor:
        h, w = img.shape[-2:]
        mask = torch.ones(h, w, dtype=img.dtype)
        half = self.length // 2
        for _ in range(self.holes):
            y = int(torch.randint(0, h, ()).item())
            x = int(torch.randint(0, w, ()).item())
            mask[max(y - half, 0) : min(y + half, h), max(x - half, 0) : min(x + half, w)] = 0.0
        return img * mask

    def __repr__(self) -> str:
        return f"Cutout(holes={self.holes}, length={self.length})"


class GaussianBlur:
    """MoCo v2's blur (`moco/loader.py: GaussianBlur`, which PaCo's `paco_cifar.py` and NCL's `cui_cifar.py` use):
    sigma ~ U(sigma_min, sigma_max), then PIL `ImageFilter.GaussianBlur(radius=sigma)`; sigma is drawn from torch's
    RNG (the official uses python `random`) so that seeding torch replays it."""

    def __init__(self, sigma: tuple[float, float] = (0.1, 2.0)) -> None:
        self.sigma = sigma

    def __call__(self, img: Image.Image) -> Image.Image:
        low, high = self.sigma
        sigma = low + (high - low) * float(torch.rand(()).item())
        return img.filter(ImageFilter.GaussianBlur(radius=sigma))

    def __repr__(self) -> str:
        return f"GaussianBlur(sigma={self.sigma})"


# PaCo's CIFAR key view, `augmentation_sim_cifar` in dvlab-research `PaCo/LT/paco_cifar.py` (read in the
# dvlab-research/Imbalanced-Learning copy, e0071fe; NCL's `lib/dataset/cui_cifar.py: aug_plus` is the same list):
# RandomResizedCrop(32, scale=(0.2, 1.)), RandomHorizontalFlip, RandomApply([ColorJitter(0.4, 0.4, 0.4, 0.1)],
# p=0.8), RandomGrayscale(p=0.2), RandomApply([GaussianBlur([.1, 2.])], p=0.5), ToTensor, Normalize.
SIM_SCALE = (0.2, 1.0)
SIM_RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's default aspect ratios
SIM_JITTER = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
SIM_JITTER_P = 0.8
SIM_GRAY_P = 0.2
SIM_BLUR_SIGMA = (0.1, 2.0)
SIM_BLUR_P = 0.5


def sim_transform(mean: tuple[float, ...], std: tuple[float, ...], size: int = 32) -> transforms.Compose:
    """The SimCLR-style "sim" view of PaCo's CIFAR code (constants above), on PIL images, torch RNG throughout.

    Single-channel data (len(mean) == 1) skips RandomGrayscale and the saturation and hue parts of the jitter, which
    are undefined on one channel. Fashion-MNIST-LT is stored as three identical channels, where saturation, hue and
    grayscale are exact identities (PIL's L weights sum to 65536/65536), so it takes the same pipeline as CIFAR."""
    colour = len(mean) != 1
    brightness, contrast, saturation, hue = SIM_JITTER
    jitter = (transforms.ColorJitter(brightness, contrast, saturation, hue) if colour
              else transforms.ColorJitter(brightness, contrast))
    steps = [transforms.RandomResizedCrop(size, scale=SIM_SCALE, ratio=SIM_RATIO), transforms.RandomHorizontalFlip(),
             transforms.RandomApply([jitter], p=SIM_JITTER_P)]
    if colour:
        steps.append(transforms.RandomGrayscale(p=SIM_GRAY_P))
    steps += [transforms.RandomApply([GaussianBlur(SIM_BLUR_SIGMA)], p=SIM_BLUR_P), transforms.ToTensor(),
              transforms.Normalize(mean, std)]
    return transforms.Compose(steps)


AUGMENTS = ("autoaugment", "basic", "none", "sim")


def train_transform(
    mean: tuple[float, ...], std: tuple[float, ...], augment: str = "autoaugment"
) -> transforms.Compose:
    """The official CIFAR training stack (cifarTrain.py:21-36): 'autoaugment' = 'advanced_train'
    (crop, flip, CIFAR10Policy, ToTensor, Cutout(16), Normalize); 'basic' = 'base_train'; 'none' = Normalize only;
    'sim' = PaCo's SimCLR-style key view (`sim_transform`), the contrastive views of PaCo, BCL and NCL."""
    normalize = [transforms.ToTensor(), transforms.Normalize(mean, std)]
    crop_flip = [transforms.RandomCrop(32, padding=4), transforms.RandomHorizontalFlip()]
    if augment == "autoaugment":
        return transforms.Compose(
            [*crop_flip, CIFAR10Policy(), transforms.ToTensor(), Cutout(1, 16), transforms.Normalize(mean, std)]
        )
    if augment == "basic":
        return transforms.Compose([*crop_flip, *normalize])
    if augment == "none":
        return transforms.Compose(normalize)
    if augment == "sim":
        return sim_transform(mean, std)
    raise ValueError(f"unknown augment {augment!r}; known: {', '.join(AUGMENTS)}")


def test_transform(mean: tuple[float, ...], std: tuple[float, ...]) -> transforms.Compose:
    """ToTensor + Normalize (cifarTrain.py:37-40)."""
    return transforms.Compose([transforms.ToTensor(), transforms.Normalize(mean, std)])


test_transform.__test__ = False  # type: ignore[attr-defined]  # not a pytest test


def per_image_pipeline(augment: str, mean: tuple[float, ...], std: tuple[float, ...]) -> transforms.Compose:
    """`Augmentations.per_image` of the 32x32 datasets (CIFAR-LT, Fashion-MNIST-LT)."""
    return train_transform(mean, std, augment)


def batched_pipeline(augment: str, mean: tuple[float, ...], std: tuple[float, ...]) -> Callable:
    """`Augmentations.batched` of the 32x32 datasets: the same ops, one batched pass with per-sample randomness."""
    from harness.datasets.batched_augment import BatchedAugment  # only the fast path needs it

    return BatchedAugment(mean, std, augment=augment)


SMALL_IMAGE_AUGMENTATIONS = Augmentations(per_image_pipeline, batched_pipeline)


def synthetic_cifar_images(n: int, seed: int = 0, size: int = 32) -> torch.Tensor:
    """Structured synthetic uint8 (n, 3, size, size) images for tests and benchmarks: a smooth colour gradient at a
    random angle, one flat-coloured rectangle and one disc, plus mild noise (not uniform noise, so that histogram
    and geometric ops behave as on natural images)."""
    g = torch.Generator().manual_seed(seed)
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    yy, xx = coords.view(1, -1, 1), coords.view(1, 1, -1)
    theta = torch.rand(n, 1, 1, generator=g) * 2 * torch.pi
    ramp = xx * theta.cos() + yy * theta.sin()  # (n, size, size)
    lo, hi = torch.rand(n, 3, 1, 1, generator=g) * 160, 95 + torch.rand(n, 3, 1, 1, generator=g) * 160
    img = lo + (hi - lo) * (ramp - ramp.amin((1, 2), True)).unsqueeze(1) / 1.5
    box = torch.rand(n, 4, generator=g).sort(dim=1).values
    in_box = (yy > box[:, 0, None, None]) & (yy < box[:, 2, None, None])
    in_box = in_box & (xx > box[:, 1, None, None]) & (xx < box[:, 3, None, None])
    img = torch.where(in_box.unsqueeze(1), torch.rand(n, 3, 1, 1, generator=g) * 255, img)
    centre, radius = torch.rand(n, 2, generator=g), 0.1 + 0.2 * torch.rand(n, generator=g)
    dist2 = (yy - centre[:, 0, None, None]) ** 2 + (xx - centre[:, 1, None, None]) ** 2
    disc = (dist2 < radius.view(n, 1, 1) ** 2).unsqueeze(1)
    img = torch.where(disc, torch.rand(n, 3, 1, 1, generator=g) * 255, img)
    img = img + torch.randn(img.shape, generator=g) * 4
    return img.round().clamp(0, 255).to(torch.uint8)
