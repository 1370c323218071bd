"""Batched CIFAR augmentation with per-sample randomness: the distribution of `datasets.augment.train_transform`
(the official per-image PIL pipeline, jinyan-06/SHIKE cifarTrain.py:21-36 + autoaugment.py) for a whole epoch at
once, on the images' device.

Every op reproduces PIL's arithmetic on integer-valued float32 pixels in [0, 255] (blend truncation, RGB->L weights,
the SMOOTH kernel with untouched borders, the 16.16 fixed-point nearest affine of Geometry.c, PIL's a=-1 bicubic for
shear, the autocontrast and equalize look-up tables): all 14 ops match PIL bit for bit on the test images (Pillow 13,
tests/datasets/test_augment.py). Geometric ops are index gathers with PIL's own coordinate arithmetic rather than
affine_grid + grid_sample, whose pixel-centre rounding and bicubic kernel (a = -0.75) differ from PIL's.
AutoAugment runs one op type at a time on the samples that drew it: one host sync per call (the group sizes), loops
over the 2 slots x 14 op types only, never over images.
The "sim" view lives in `batched_sim.py`.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from functools import cache

import torch
import torch.nn.functional as F

from harness.datasets.augment import (
    AUGMENTS,
    CIFAR10_POLICY,
    MAGNITUDES,
    OP_NAMES,
    SIGNED_OPS,
    SubPolicy,
)

FILL = 128.0  # fill colour (128, 128, 128) of the geometric ops (autoaugment.py)
Tensor = torch.Tensor


@cache
def _levels(op: str, device: torch.device) -> Tensor:
    return torch.tensor(MAGNITUDES[op], dtype=torch.float64, device=device)


def _pil_rotate_coeffs(degrees: float, w: int, h: int) -> tuple[float, ...]:
    """The inverse affine matrix that PIL's Image.rotate(degrees) passes to Image.transform (centre w/2, h/2)."""
    a = -math.radians(degrees)
    m = [round(math.cos(a), 15), round(math.sin(a), 15), 0.0, round(-math.sin(a), 15), round(math.cos(a), 15), 0.0]
    cx, cy = w / 2, h / 2
    m[2] = m[0] * -cx + m[1] * -cy + m[2] + cx
    m[5] = m[3] * -cx + m[4] * -cy + m[5] + cy
    return tuple(m)


@cache
def _rotate_table(w: int, h: int, device: torch.device) -> Tensor:
    rows = [_pil_rotate_coeffs(d, w, h) for d in MAGNITUDES["rotate"]]
    return torch.tensor(rows, dtype=torch.float64, device=device)


def _signed(op: str, level: Tensor, sign: Tensor) -> Tensor:
    """Per-sample magnitude (float64), with the random sign for the ops that take one."""
    m = _levels(op, level.device)[level]
    return m * sign if op in SIGNED_OPS else m


def _bcast(v: Tensor) -> Tensor:
    return v.view(-1, 1, 1, 1)


# ----------------------------------------------------------------------------------------------- geometric ops


def _gather_fill(x: Tensor, src_y: Tensor, src_x: Tensor) -> Tensor:
    """out[n, c, i, j] = x[n, c, src_y, src_x], or FILL where the source lies outside the image."""
    n, c, h, w = x.shape
    valid = (src_y >= 0) & (src_y < h) & (src_x >= 0) & (src_x < w)
    flat = (src_y.clamp(0, h - 1) * w + src_x.clamp(0, w - 1)).view(n, 1, h * w).expand(n, c, h * w)
    out = x.reshape(n, c, h * w).gather(2, flat).view(n, c, h, w)
    return torch.where(valid.unsqueeze(1), out, FILL)


def _translate(x: Tensor, shift: Tensor, axis: int) -> Tensor:
    """PIL nearest translation (Geometry.c ImagingScaleAffine): source = floor(i + 0.5 + shift)."""
    n, _, h, w = x.shape
    size = w if axis == 1 else h
    pos = torch.arange(size, dtype=torch.float64, device=x.device)
    src = (shift.view(-1, 1) + 0.5 + pos).floor().long()  # (n, size)
    rows = torch.arange(h, device=x.device).view(1, h, 1).expand(n, h, w)
    cols = torch.arange(w, device=x.device).view(1, 1, w).expand(n, h, w)
    if axis == 1:
        return _gather_fill(x, rows, src.view(n, 1, w).expand(n, h, w))
    return _gather_fill(x, src.view(n, h, 1).expand(n, h, w), cols)


def _fix(v: Tensor) -> Tensor:
    return torch.floor(v * 65536.0 + 0.5).long()


def _affine_nearest(x: Tensor, a: Tensor) -> Tensor:
    """PIL's general nearest affine (Geometry.c ImagingTransformAffine, 16.16 fixed point); a: (n, 6) float64."""
    n, _, h, w = x.shape
    xs = torch.arange(w, device=x.device).view(1, 1, w)
    ys = torch.arange(h, device=x.device).view(1, h, 1)
    xo = _fix(a[:, 2] + a[:, 1] * 0.5 + a[:, 0] * 0.5).view(n, 1, 1)
    yo = _fix(a[:, 5] + a[:, 4] * 0.5 + a[:, 3] * 0.5).view(n, 1, 1)
    xx = xo + ys * _fix(a[:, 1]).view(n, 1, 1) + xs * _fix(a[:, 0]).view(n, 1, 1)
    yy = yo + ys * _fix(a[:, 4]).view(n, 1, 1) + xs * _fix(a[:, 3]).view(n, 1, 1)
    return _gather_fill(x, torch.div(yy, 65536, rounding_mode="floor"), torch.div(xx, 65536, rounding_mode="floor"))


def _shear_rows(x: Tensor, m: Tensor) -> Tensor:
    """PIL bicubic AFFINE (1, 0, 0, m, 1, 0) with fill: output (i, j) samples row m*(j+.5) + (i+.5) of column j.
    The column coordinate is a pixel centre, so PIL's 4x4 bicubic reduces to a 4-tap cubic along rows, with PIL's
    a = -1 kernel (Geometry.c BICUBIC), clamped neighbours, and truncation to uint8."""
    n, c, h, w = x.shape
    col = torch.arange(w, dtype=torch.float64, device=x.device).view(1, 1, w) + 0.5
    row = torch.arange(h, dtype=torch.float64, device=x.device).view(1, h, 1) + 0.5
    t = m.view(n, 1, 1) * col + row + 0.0  # (n, h, w) source row coordinate
    valid = (t >= 0) & (t < h)
    base = (t - 0.5).floor()
    d = (t - 0.5 - base).unsqueeze(1)
    xd = x.double()
    v1, v2, v3, v4 = (
        xd.gather(2, (base.long() + k).clamp(0, h - 1).unsqueeze(1).expand(n, c, h, w)) for k in (-1, 0, 1, 2)
    )
    p2, p3, p4 = -v1 + v3, 2 * (v1 - v2) + v3 - v4, -v1 + v2 - v3 + v4
    out = (v2 + d * (p2 + d * (p3 + d * p4))).clamp(0, 255).trunc().float()
    return torch.where(valid.unsqueeze(1), out, FILL)


def _shear_x(x: Tensor, level: Tensor, sign: Tensor) -> Tensor:
    return _shear_rows(x.transpose(2, 3), _signed("shearX", level, sign)).transpose(2, 3).contiguous()


def _shear_y(x: Tensor, level: Tensor, sign: Tensor) -> Tensor:
    return _shear_rows(x, _signed("shearY", level, sign))


def _rotate(x: Tensor, level: Tensor, sign: Tensor) -> Tensor:
    # autoaugment.py rotate_with_fill: nearest rotation in RGBA composited over the fill = nearest with fill 128.
    return _affine_nearest(x, _rotate_table(x.shape[3], x.shape[2], x.device)[level])


# --------------------------------------------------------------------------------------------------- colour ops


def _blend(degenerate: Tensor, img: Tensor, factor: Tensor) -> Tensor:
    """PIL Image.blend(degenerate, img, factor): float32 in1 + f * (in2 - in1), truncated and clipped to uint8."""
    return (degenerate + _bcast(factor.float()) * (img - degenerate)).floor_().clamp_(0, 255)


@cache
def _gray_weights(device: torch.device) -> Tensor:
    return torch.tensor([19595.0, 38470.0, 7471.0], device=device).view(1, 3, 1, 1)


def _grayscale(x: Tensor) -> Tensor:
    """PIL RGB -> L: (19595 R + 38470 G + 7471 B + 0x8000) >> 16 (exact in float32: all sums < 2**24)."""
    return ((x * _gray_weights(x.device)).sum(1, keepdim=True) + 32768.0).div_(65536.0).floor_()


def _brightness(x: Tensor, level: Tensor, sign: Tensor) -> Tensor:
    return _blend(torch.zeros_like(x), x, 1.0 + _signed("brightness", level, sign))


def _color(x: Tensor, level: Tensor, sign: Tensor) -> Tensor:
    return _blend(_grayscale(x).expand_as(x), x, 1.0 + _signed("color", level, sign))


def _contrast(x: Tensor, level: Tensor, sign: Tensor) -> Tensor:
    mean = (_grayscale(x).mean((1, 2, 3), keepdim=True) + 0.5).floor()  # ImageEnhance.Contrast: int(mean + 0.5)
    return _blend(mean.expand_as(x), x, 1.0 + _signed("contrast", level, sign))


def _sharpness(x: Tensor, level: Tensor, sign: Tensor) -> Tensor:
    # ImageFilter.SMOOTH: kernel [[1,1,1],[1,5,1],[1,1,1]] / 13, rounded; PIL leaves the 1-pixel border untouched.
    # Computed as a separable 3x3 box sum + 4 x centre (exact integers; ~6x faster than conv2d on CPU).
    rows = x[:, :, :-2] + x[:, :, 1:-1] + x[:, :, 2:]
    box = rows[..., :-2] + rows[..., 1:-1] + rows[..., 2:]
    smooth = box.add_(x[:, :, 1:-1, 1:-1], alpha=4.0).div_(13.0).add_(0.5).floor_()
    degenerate = x.clone()
    degenerate[:, :, 1:-1, 1:-1] = smooth
    return _blend(degenerate, x, 1.0 + _signed("sharpness", level, sign))


def _posterize(x: Tensor, level: Tensor, sign: Tensor) -> Tensor:
    step = _bcast(torch.exp2(8.0 - _signed("posterize", level, sign)).float())  # keep `bits` high bits
    return (x / step).floor_() * step


def _solarize(x: Tensor, level: Tensor, sign: Tensor) -> Tensor:
    threshold = _bcast(_signed("solarize", level, sign).ceil().float())  # i < t  <=>  i < ceil(t) for integer i
    return torch.where(x < threshold, x, 255.0 - x)


def _invert(x: Tensor, level: Tensor, sign: Tensor) -> Tensor:
    return 255.0 - x


def _autocontrast(x: Tensor, level: Tensor, sign: Tensor) -> Tensor:
    """ImageOps.autocontrast (cutoff 0), per channel: lut[i] = int(i * scale + offset), scale = 255 / (hi - lo) in
    float64 as PIL's Python code; identity when hi == lo. Built as a 256-entry table, then gathered."""
    n, c, h, w = x.shape
    lo, hi = x.amin((2, 3)).unsqueeze(-1), x.amax((2, 3)).unsqueeze(-1)  # (n, c, 1)
    span = hi.double() - lo.double()
    scale = torch.full_like(span, 255.0) / span  # not `255.0 / span`: torch computes that as 255 * (1 / span)
    ramp = torch.arange(256, dtype=torch.float64, device=x.device)
    lut = (ramp * scale + (-lo.double() * scale)).trunc_().clamp_(0, 255).float()
    lut = torch.where(hi > lo, lut, ramp.float())
    return lut.view(n * c, 256).gather(1, x.reshape(n * c, h * w).long()).view(n, c, h, w)


def _equalize(x: Tensor, level: Tensor, sign: Tensor) -> Tensor:
    """ImageOps.equalize per image and channel: step = (total - count of the last used bin) // 255,
    lut[i] = (step // 2 + #pixels below i) // step; identity when step == 0 or one bin is used."""
    n, c, h, w = x.shape
    flat = x.reshape(n * c, h * w).long()
    hist = torch.zeros(n * c, 256, dtype=torch.long, device=x.device).scatter_add_(1, flat, torch.ones_like(flat))
    bins = torch.arange(256, device=x.device).expand(n * c, 256)
    last = torch.where(hist > 0, bins, -1).amax(1, keepdim=True)
    step = (h * w - hist.gather(1, last)) // 255
    lut = (step // 2 + hist.cumsum(1) - hist) // step.clamp(min=1)
    identity = (step == 0) | ((hist > 0).sum(1, keepdim=True) <= 1)
    lut = torch.where(identity, bins, lut.clamp(max=255))
    return lut.gather(1, flat).view(n, c, h, w).float()


_TENSOR_OPS: dict[str, Callable[[Tensor, Tensor, Tensor], Tensor]] = {
    "shearX": _shear_x,
    "shearY": _shear_y,
    "translateX": lambda x, level, sign: _translate(x, _signed("translateX", level, sign) * x.shape[3], axis=1),
    "translateY": lambda x, level, sign: _translate(x, _signed("translateY", level, sign) * x.shape[2], axis=0),
    "rotate": _rotate,
    "color": _color,
    "posterize": _posterize,
    "solarize": _solarize,
    "contrast": _contrast,
    "sharpness": _sharpness,
    "brightness": _brightness,
    "autocontrast": _autocontrast,
    "equalize": _equalize,
    "invert": _invert,
}


def apply_op(op: str, x: Tensor, level: Tensor | int, sign: Tensor | float = 1.0) -> Tensor:
    """Apply one AutoAugment op to a batch (N, 3, H, W) of pixels in [0, 255] (uint8 or integer-valued float) with a
    per-sample magnitude index `level` (0..9) and sign; returns integer-valued float32, as PIL would give."""
    n = x.shape[0]
    level = torch.as_tensor(level, device=x.device).long().expand(n)
    sign = torch.as_tensor(sign, dtype=torch.float64, device=x.device).expand(n)
    return _TENSOR_OPS[op](x.float().contiguous(), level, sign)


# ------------------------------------------------------------------------------------------------ the pipeline


@cache
def _policy_tables(policy: tuple[SubPolicy, ...], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    ops = [[OP_NAMES.index(op) for op, _, _ in sub] for sub in policy]
    probs = [[p for _, p, _ in sub] for sub in policy]
    levels = [[lv for _, _, lv in sub] for sub in policy]
    return (
        torch.tensor(ops, device=device),
        torch.tensor(probs, dtype=torch.float32, device=device),
        torch.tensor(levels, device=device),
    )


def crop_flip(images: Tensor, generator: torch.Generator, pad: int = 4) -> Tensor:
    """RandomCrop(size, padding=pad) with zero padding, then RandomHorizontalFlip, per sample: pad once, gather."""
    n, c, h, w = images.shape
    dev = images.device
    padded = F.pad(images, (pad, pad, pad, pad))
    oy = torch.randint(0, 2 * pad + 1, (n, 1, 1), generator=generator, device=dev)
    ox = torch.randint(0, 2 * pad + 1, (n, 1, 1), generator=generator, device=dev)
    flip = torch.rand(n, 1, 1, generator=generator, device=dev) < 0.5
    cols = torch.arange(w, device=dev).view(1, 1, w)
    cols = torch.where(flip, w - 1 - cols, cols) + ox
    rows = torch.arange(h, device=dev).view(1, h, 1) + oy
    index = (rows * (w + 2 * pad) + cols).view(n, 1, h * w).expand(n, c, h * w)
    return padded.view(n, c, -1).gather(2, index).view(n, c, h, w)


def cutout_mask(n: int, h: int, w: int, length: int, generator: torch.Generator, device: torch.device) -> Tensor:
    """(n, 1, h, w) float mask, 0 inside one clipped length x length square per sample (autoaugment.py Cutout)."""
    cy = torch.randint(0, h, (n, 1), generator=generator, device=device)
    cx = torch.randint(0, w, (n, 1), generator=generator, device=device)
    half = length // 2
    rows, cols = torch.arange(h, device=device), torch.arange(w, device=device)
    in_rows = (rows >= cy - half) & (rows < cy + half)
    in_cols = (cols >= cx - half) & (cols < cx + half)
    return (~(in_rows.unsqueeze(2) & in_cols.unsqueeze(1))).unsqueeze(1).float()


def autoaugment(
    x: Tensor,
    generator: torch.Generator,
    record: Counter[str] | None = None,
    policy: tuple[SubPolicy, ...] = CIFAR10_POLICY,
) -> Tensor:
    """CIFAR10Policy per sample on float pixels (N, 3, H, W): draw a sub-policy, two uniforms and two signs per
    sample, then apply each (slot, op type) to the samples that drew and passed it, slot 0 before slot 1."""
    n, dev, n_ops = x.shape[0], x.device, len(OP_NAMES)
    op_table, prob_table, level_table = _policy_tables(policy, dev)
    sub = torch.randint(0, len(policy), (n,), generator=generator, device=dev)
    applied = torch.rand(n, 2, generator=generator, device=dev) < prob_table[sub]
    sign = torch.randint(0, 2, (n, 2), generator=generator, device=dev).double() * 2 - 1
    key = torch.where(applied, op_table[sub], n_ops)  # n_ops = "not applied"
    order = torch.argsort(key, dim=0, stable=True)
    slot_offset = torch.arange(2, device=dev) * (n_ops + 1)
    counts = torch.bincount((key + slot_offset).flatten(), minlength=2 * (n_ops + 1)).view(2, -1).tolist()  # one sync
    levels = level_table[sub]
    for slot in range(2):
        start = 0
        for op_index, count in enumerate(counts[slot][:n_ops]):
            if count:
                idx = order[start : start + count, slot]
                x[idx] = _TENSOR_OPS[OP_NAMES[op_index]](x[idx], levels[idx, slot], sign[idx, slot])
                if record is not None:
                    record[OP_NAMES[op_index]] += count
            start += count
    return x


@cache
def _normalisation(mean: tuple[float, ...], std: tuple[float, ...], device: torch.device) -> tuple[Tensor, Tensor]:
    # Cached per device: building these each call would be a blocking host-to-device copy on CUDA.
    return torch.tensor(mean, device=device).view(1, -1, 1, 1), torch.tensor(std, device=device).view(1, -1, 1, 1)


class BatchedAugment:
    """The official CIFAR training augmentation for a batch (or a whole epoch) at once, per-sample randomness.

    augment='autoaugment': crop(pad) + flip + CIFAR10Policy + Cutout(cutout) + Normalize (cifarTrain.py
    'advanced_train'); 'basic': crop + flip + Normalize; 'none': Normalize; 'sim': PaCo's SimCLR-style key view
    (`sim_view`) + Normalize. All randomness comes from `generator`, which must live on the images' device.
    """

    def __init__(
        self,
        mean: tuple[float, ...],
        std: tuple[float, ...],
        augment: str = "autoaugment",
        cutout: int = 16,
        pad: int = 4,
    ) -> None:
        if augment not in AUGMENTS:
            raise ValueError(f"unknown augment {augment!r}; known: {', '.join(AUGMENTS)}")
        self.mean, self.std = tuple(mean), tuple(std)
        self.augment, self.cutout, self.pad = augment, cutout, pad

    def __call__(self, images: Tensor, generator: torch.Generator, record: Counter[str] | None = None) -> Tensor:
        """uint8 (N, 3, H, W) -> normalised float32 (N, 3, H, W). `record`, if given, counts the ops applied."""
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"expected uint8 (N, C, H, W) images, got {images.dtype} {tuple(images.shape)}")
        n, _, h, w = images.shape
        if self.augment == "sim":
            from harness.datasets.batched_sim import sim_view  # it builds on this module's ops

            x = sim_view(images, generator)
        else:
            x = images if self.augment == "none" else crop_flip(images, generator, self.pad)
        x = x.float()
        if self.augment == "autoaugment":
            x = autoaugment(x, generator, record)
        x = x.div_(255.0)  # ToTensor
        if self.augment == "autoaugment" and self.cutout > 0:
            x = x.mul_(cutout_mask(n, h, w, self.cutout, generator, x.device))
        mean, std = _normalisation(self.mean, self.std, x.device)
        return x.sub_(mean).div_(std)  # transforms.Normalize

    def __repr__(self) -> str:
        return f"BatchedAugment(augment={self.augment!r}, cutout={self.cutout}, pad={self.pad})"
