"""Training transforms of the 224-px LT datasets (ImageNet-LT, iNat 2018, Places-LT), on PIL images of any size.

`randaugment` is the view SHIKE cites ("RandAugment following NCL"): NCL's `aug_plus(..., 'randcls_sim')` first view,
PaCo's `augmentation_randncls` (PaCo/LT/paco_lt.py): RandomResizedCrop(224, scale 0.08-1) -> horizontal flip ->
ColorJitter(0.4, 0.4, 0.4, 0) always -> RandAugment `rand-n2-m10-mstd0.5` -> ToTensor -> Normalize. NCL's and PaCo's
`randaugment.py` are a copy of an old timm `auto_augment.py` (Apache-2.0); `NCLRandAugment` re-implements its
semantics (large-scale-lt.md section 2.2):

* 15 ops; 2 drawn uniformly with replacement per image; each applied with probability 0.5;
* magnitude drawn per op from N(10, 0.5), clipped to [0, 10] (10 is the top of timm's scale);
* levels at magnitude m: rotate 30 m/10 degrees, shear 0.3 m/10, translate 0.45 m/10 of the side (all with a random
  sign); Color/Contrast/Brightness/Sharpness factor 1.8 m/10 + 0.1 (unsigned: 1.9 at m = 10); Posterize keeps
  int(4 m/10) bits; Solarize threshold int(256 m/10); SolarizeAdd adds int(110 m/10) below 128;
* geometric ops fill with the ImageNet mean (124, 116, 104) (PaCo uses it for iNat too) and resample bilinear or
  bicubic at random.

Every draw uses torch's global RNG (timm uses `random`): the file feeder seeds it per sample, so an epoch replays.
`basic` is crop + flip; `colorjitter` adds ColorJitter(0.4, 0.4, 0.4, 0), the OLTR/SADE Places-LT view (SHIKE names
RandAugment for ImageNet-LT and iNat only); `none` is the test transform.

`sim` is the second ("key") view of PaCo's and NCL's `randcls_sim` on ImageNet-LT and iNat, and both views of their
Places-LT `sim_sim` (large-scale-lt.md section 2.2: "the 'sim' view (RRC, ColorJitter, grayscale 0.2, blur 0.5)";
baselines.md section 19: PaCo's key view, section 20: BCL's contrastive views): `augmentation_sim` of PaCo's
`LT/paco_lt.py` (dvlab-research/Parametric-Contrastive-Learning 8665ff7), the same list in NCL's
`lib/dataset/others.py: aug_plus` (Bazinga699/NCL 21091e4):
RandomResizedCrop(224) (torchvision's default scale 0.08-1, ratio 3/4-4/3) -> ColorJitter(0.4, 0.4, 0.4, 0.0) with
p = 1.0 -> RandomGrayscale(0.2) -> GaussianBlur(sigma ~ U(0.1, 2.0)) with p = 0.5 -> horizontal flip -> ToTensor ->
Normalize. This is not the CIFAR "sim" (`harness.datasets.augment.sim_transform`: MoCo v2's scale 0.2-1,
ColorJitter(0.4, 0.4, 0.4, 0.1) with p = 0.8, flip second): the ImageNet lists keep hue at 0 and apply the jitter
always, and flip last. The blur is MoCo's (PIL radius = sigma), shared with the CIFAR view.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import torch
from PIL import Image, ImageEnhance, ImageOps
from torchvision import transforms

from harness.datasets.augment import GaussianBlur

MAX_LEVEL = 10.0
RA_OPS_PER_IMAGE = 2  # rand-n2
RA_MAGNITUDE = 10.0  # m10
RA_MAGNITUDE_STD = 0.5  # mstd0.5
RA_OP_PROB = 0.5  # timm's rand_augment_ops(prob=0.5)
TRANSLATE_PCT = 0.45
IMAGENET_FILL = (124, 116, 104)  # round(255 * (0.485, 0.456, 0.406)): PaCo's ra_params img_mean
RESAMPLES = (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC)
Fill = tuple[int, int, int]


def _uniform() -> float:
    return float(torch.rand(()).item())


def _signed(value: float) -> float:
    """timm's _randomly_negate: -value with probability 1/2."""
    return -value if _uniform() > 0.5 else value


def _resample() -> Image.Resampling:
    return RESAMPLES[int(torch.randint(0, len(RESAMPLES), ()).item())]


def _affine(img: Image.Image, coeffs: tuple[float, ...], fill: Fill) -> Image.Image:
    return img.transform(img.size, Image.Transform.AFFINE, coeffs, _resample(), fillcolor=fill)


def _solarize_add(img: Image.Image, add: int, threshold: int = 128) -> Image.Image:
    lut = [min(255, i + add) if i < threshold else i for i in range(256)]
    return img.point(lut * len(img.getbands()))


def _posterize(img: Image.Image, bits: int) -> Image.Image:
    return img if bits >= 8 else ImageOps.posterize(img, bits)


# name -> (level(m) -> argument, op(img, argument, fill)); the level functions draw the sign where timm does.
RA_OPS: dict[str, tuple[Callable[[float], float], Callable[[Image.Image, float, Fill], Image.Image]]] = {
    "AutoContrast": (lambda m: 0.0, lambda img, v, fill: ImageOps.autocontrast(img)),
    "Equalize": (lambda m: 0.0, lambda img, v, fill: ImageOps.equalize(img)),
    "Invert": (lambda m: 0.0, lambda img, v, fill: ImageOps.invert(img)),
    "Rotate": (lambda m: _signed(m / MAX_LEVEL * 30.0),
               lambda img, v, fill: img.rotate(v, resample=_resample(), fillcolor=fill)),
    "Posterize": (lambda m: int(m / MAX_LEVEL * 4), lambda img, v, fill: _posterize(img, int(v))),
    "Solarize": (lambda m: int(m / MAX_LEVEL * 256), lambda img, v, fill: ImageOps.solarize(img, int(v))),
    "SolarizeAdd": (lambda m: int(m / MAX_LEVEL * 110), lambda img, v, fill: _solarize_add(img, int(v))),
    "Color": (lambda m: m / MAX_LEVEL * 1.8 + 0.1, lambda img, v, fill: ImageEnhance.Color(img).enhance(v)),
    "Contrast": (lambda m: m / MAX_LEVEL * 1.8 + 0.1, lambda img, v, fill: ImageEnhance.Contrast(img).enhance(v)),
    "Brightness": (lambda m: m / MAX_LEVEL * 1.8 + 0.1,
                   lambda img, v, fill: ImageEnhance.Brightness(img).enhance(v)),
    "Sharpness": (lambda m: m / MAX_LEVEL * 1.8 + 0.1,
                  lambda img, v, fill: ImageEnhance.Sharpness(img).enhance(v)),
    "ShearX": (lambda m: _signed(m / MAX_LEVEL * 0.3), lambda img, v, fill: _affine(img, (1, v, 0, 0, 1, 0), fill)),
    "ShearY": (lambda m: _signed(m / MAX_LEVEL * 0.3), lambda img, v, fill: _affine(img, (1, 0, 0, v, 1, 0), fill)),
    "TranslateXRel": (lambda m: _signed(m / MAX_LEVEL * TRANSLATE_PCT),
                      lambda img, v, fill: _affine(img, (1, 0, v * img.size[0], 0, 1, 0), fill)),
    "TranslateYRel": (lambda m: _signed(m / MAX_LEVEL * TRANSLATE_PCT),
                      lambda img, v, fill: _affine(img, (1, 0, 0, 0, 1, v * img.size[1]), fill)),
}
RA_OP_NAMES = tuple(RA_OPS)


class NCLRandAugment:
    """timm's RandAugment `rand-n2-m10-mstd0.5` as NCL/PaCo use it (module docstring), with torch's RNG.

    Set `record` to a list to collect (op, magnitude, level argument) of every op actually applied (tests)."""

    def __init__(self, ops: int = RA_OPS_PER_IMAGE, magnitude: float = RA_MAGNITUDE, std: float = RA_MAGNITUDE_STD,
                 prob: float = RA_OP_PROB, fill: Fill = IMAGENET_FILL) -> None:
        self.ops, self.magnitude, self.std, self.prob, self.fill = ops, magnitude, std, prob, fill
        self.record: list[tuple[str, float, float]] | None = None

    def __call__(self, img: Image.Image) -> Image.Image:
        chosen = torch.randint(0, len(RA_OP_NAMES), (self.ops,))  # uniform, with replacement
        for index in chosen.tolist():
            if _uniform() > self.prob:  # timm: `if random.random() > self.prob: return img`
                continue
            magnitude = min(MAX_LEVEL, max(0.0, self.magnitude + self.std * float(torch.randn(()).item())))
            name = RA_OP_NAMES[index]
            level, op = RA_OPS[name]
            value = level(magnitude)
            img = op(img, value, self.fill)
            if self.record is not None:
                self.record.append((name, magnitude, value))
        return img

    def __repr__(self) -> str:
        return f"NCLRandAugment(rand-n{self.ops}-m{self.magnitude:g}-mstd{self.std:g}, p={self.prob:g})"


def op_counts(record: list[tuple[str, float, float]]) -> Counter[str]:
    return Counter(name for name, _, _ in record)


def _crop_flip(crop: int) -> list:
    return [transforms.RandomResizedCrop(crop, scale=(0.08, 1.0)), transforms.RandomHorizontalFlip()]


def _finish(mean, std) -> list:
    return [transforms.ToTensor(), transforms.Normalize(mean, std)]


def _jitter() -> transforms.ColorJitter:
    return transforms.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.0)


# PaCo's / NCL's ImageNet `augmentation_sim` (module docstring): RandomApply([ColorJitter(0.4, 0.4, 0.4, 0.0)],
# p=1.0), RandomGrayscale(p=0.2), RandomApply([GaussianBlur([.1, 2.])], p=0.5)
LARGE_SIM_GRAY_P = 0.2
LARGE_SIM_BLUR_SIGMA = (0.1, 2.0)
LARGE_SIM_BLUR_P = 0.5


def sim_view(crop: int, mean, std) -> transforms.Compose:
    """The "sim" view of the 224-px LT datasets (module docstring), torch's global RNG throughout, so the file
    feeder's per-sample seed replays it. The jitter is applied always (p = 1.0 in the official lists: no RandomApply
    needed), with hue 0."""
    return transforms.Compose([
        transforms.RandomResizedCrop(crop, scale=(0.08, 1.0)), _jitter(),
        transforms.RandomGrayscale(p=LARGE_SIM_GRAY_P),
        transforms.RandomApply([GaussianBlur(LARGE_SIM_BLUR_SIGMA)], p=LARGE_SIM_BLUR_P),
        transforms.RandomHorizontalFlip(), *_finish(mean, std)])


# augment name -> (crop, mean, std) -> training transform
LARGE_AUGMENTS: dict[str, Callable[[int, tuple, tuple], transforms.Compose]] = {
    "randaugment": lambda crop, mean, std: transforms.Compose(
        [*_crop_flip(crop), _jitter(), NCLRandAugment(), *_finish(mean, std)]),
    "colorjitter": lambda crop, mean, std: transforms.Compose([*_crop_flip(crop), _jitter(), *_finish(mean, std)]),
    "basic": lambda crop, mean, std: transforms.Compose([*_crop_flip(crop), *_finish(mean, std)]),
    "sim": sim_view,
    "none": lambda crop, mean, std: transforms.Compose(
        [transforms.Resize(round(crop * 256 / 224)), transforms.CenterCrop(crop), *_finish(mean, std)]),
}
GPU_DECODABLE = ("basic",)  # what harness.dali_feeder reproduces exactly
