"""The "sim" view batched on the device (PaCo's and NCL's SimCLR-style key view; `datasets.augment`'s per-image
"sim" pipeline is the reference): random resized crop + flip, colour jitter with p 0.8, grayscale with p 0.2,
Gaussian blur with p 0.5, per-sample randomness, no loop over images.

The resized crop is PIL's bilinear bit for bit and the hue shift within 3 levels; the blur is a true Gaussian where
PIL uses three box passes of the same variance (close, not equal); tests compare the two paths in distribution
(tests/datasets/test_sim_view.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from harness.datasets.augment import (
    SIM_BLUR_P,
    SIM_BLUR_SIGMA,
    SIM_GRAY_P,
    SIM_JITTER,
    SIM_JITTER_P,
    SIM_RATIO,
    SIM_SCALE,
)
from harness.datasets.batched_augment import Tensor, _bcast, _blend, _grayscale


def _sim_crop_boxes(n: int, h: int, w: int, generator: torch.Generator, device: torch.device,
                    attempts: int = 10) -> tuple[Tensor, ...]:
    """torchvision `RandomResizedCrop.get_params` for n samples at once: `attempts` (area, log-ratio) draws each,
    the first box that fits wins; none fits -> the whole image (its centre-crop fallback at ratio 1). Returns
    (top, left, height, width) as long tensors (n,)."""
    area = h * w * (SIM_SCALE[0] + (SIM_SCALE[1] - SIM_SCALE[0]) * torch.rand(
        n, attempts, generator=generator, device=device, dtype=torch.float64))
    lo, hi = math.log(SIM_RATIO[0]), math.log(SIM_RATIO[1])
    aspect = torch.exp(lo + (hi - lo) * torch.rand(n, attempts, generator=generator, device=device,
                                                   dtype=torch.float64))
    cw, ch = torch.sqrt(area * aspect).round().long(), torch.sqrt(area / aspect).round().long()
    fits = (cw > 0) & (cw <= w) & (ch > 0) & (ch <= h)
    first = fits.long().argmax(dim=1, keepdim=True)  # the first attempt that fits (0 when none does)
    found = fits.any(dim=1)
    cw = torch.where(found, cw.gather(1, first).squeeze(1), w)
    ch = torch.where(found, ch.gather(1, first).squeeze(1), h)
    u = torch.rand(n, 2, generator=generator, device=device, dtype=torch.float64)
    top = (u[:, 0] * (h - ch + 1)).floor().long()  # torch.randint(0, h - ch + 1)
    left = (u[:, 1] * (w - cw + 1)).floor().long()
    return top, left, ch, cw


def _resample_axis(x: Tensor, start: Tensor, length: Tensor, size: int, axis: int, flip: Tensor | None) -> Tensor:
    """PIL's bilinear resize of the box [start, start + length) along `axis` (2: rows, 3: columns) to `size`,
    upsampling (boxes are never larger than the image): output pixel u samples start + (u + 0.5) * length / size
    - 0.5, clamped to the box (PIL renormalises its kernel inside the box, which is clamping for a triangle of
    support 1), rounded to an integer as PIL's 8-bit passes are. `flip` mirrors the output per sample."""
    n, c = x.shape[:2]
    u = torch.arange(size, device=x.device, dtype=torch.float64) + 0.5
    first, last = start.view(n, 1).double(), (start + length - 1).view(n, 1).double()
    src = (first + u.view(1, size) * length.view(n, 1).double() / size - 0.5).clamp(min=first, max=last)
    if flip is not None:
        src = torch.where(flip.view(n, 1), src.flip(1), src)
    below = src.floor()
    frac = (src - below).float()
    i0, i1 = below.long(), torch.minimum(below + 1, last).long()
    if axis == 3:
        shape, frac = (n, c, x.shape[2], size), frac.view(n, 1, 1, size)
        i0, i1 = (i.view(n, 1, 1, size).expand(shape) for i in (i0, i1))
    else:
        shape, frac = (n, c, size, x.shape[3]), frac.view(n, 1, size, 1)
        i0, i1 = (i.view(n, 1, size, 1).expand(shape) for i in (i0, i1))
    a, b = x.gather(axis, i0), x.gather(axis, i1)
    return (a + frac * (b - a)).add_(0.5).floor_()


def resized_crop_flip(x: Tensor, generator: torch.Generator, size: int) -> Tensor:
    """RandomResizedCrop(size, scale SIM_SCALE, ratio SIM_RATIO) then RandomHorizontalFlip, per sample, as two
    separable bilinear passes (columns, then rows, as PIL resamples)."""
    n, _, h, w = x.shape
    top, left, ch, cw = _sim_crop_boxes(n, h, w, generator, x.device)
    flip = torch.rand(n, generator=generator, device=x.device) < 0.5
    x = _resample_axis(x, left, cw, size, axis=3, flip=flip)
    return _resample_axis(x, top, ch, size, axis=2, flip=None)


def _jitter_contrast(x: Tensor, factor: Tensor) -> Tensor:
    lum = _grayscale(x) if x.shape[1] == 3 else x
    mean = (lum.mean((1, 2, 3), keepdim=True) + 0.5).floor()  # ImageEnhance.Contrast: int(mean + 0.5)
    return _blend(mean.expand_as(x), x, factor)


def _rgb_to_hsv_bytes(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """PIL's RGB -> HSV (Convert.c rgb2hsv) on integer-valued floats: h, s as bytes (truncated), v = max."""
    r, g, b = x[:, 0], x[:, 1], x[:, 2]
    maxc, minc = x.amax(1), x.amin(1)
    span = maxc - minc
    grey = span == 0
    safe = torch.where(grey, torch.ones_like(span), span)
    rc, gc, bc = (maxc - r) / safe, (maxc - g) / safe, (maxc - b) / safe
    hue = torch.where(r == maxc, bc - gc, torch.where(g == maxc, 2.0 + rc - bc, 4.0 + gc - rc))
    hue = torch.remainder(hue / 6.0, 1.0)
    sat = span / torch.where(maxc == 0, torch.ones_like(maxc), maxc)
    return (torch.where(grey, 0.0, (hue * 255).floor()), torch.where(grey, 0.0, (sat * 255).floor()), maxc)


def _hsv_bytes_to_rgb(h: Tensor, s: Tensor, v: Tensor) -> Tensor:
    """PIL's HSV -> RGB (Convert.c hsv2rgb): sector i = floor(6 h / 255), p, q, t rounded."""
    sector = (h * 6.0 / 255.0).floor()
    f, fs = h * 6.0 / 255.0 - sector, s / 255.0
    p, q, t = ((v * (1.0 - fs)).round(), (v * (1.0 - fs * f)).round(), (v * (1.0 - fs * (1.0 - f))).round())
    sector = sector.long() % 6
    table = torch.stack([torch.stack(c, 1) for c in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v),
                                                       (v, p, q))], 0)  # (6, n, 3, h, w)
    rgb = table.gather(0, sector.unsqueeze(0).unsqueeze(2).expand(1, *table.shape[1:])).squeeze(0)
    return torch.where((s == 0).unsqueeze(1), v.unsqueeze(1).expand_as(rgb), rgb).clamp_(0, 255)


def _jitter_hue(x: Tensor, factor: Tensor) -> Tensor:
    """torchvision's PIL `adjust_hue`: to HSV, H (a byte) += uint8(factor * 255) with wrap-around, back to RGB."""
    h, s, v = _rgb_to_hsv_bytes(x)
    shift = torch.remainder(torch.trunc(factor.double() * 255), 256).float().view(-1, 1, 1)
    return _hsv_bytes_to_rgb(torch.remainder(h + shift, 256), s, v)


# ColorJitter's four ops, in torchvision's fn_idx numbering (brightness, contrast, saturation, hue).
_JITTER_OPS: tuple[Callable[[Tensor, Tensor], Tensor], ...] = (
    lambda x, f: _blend(torch.zeros_like(x), x, f),
    _jitter_contrast,
    lambda x, f: _blend(_grayscale(x).expand_as(x), x, f),
    _jitter_hue,
)


def color_jitter(x: Tensor, applied: Tensor, generator: torch.Generator) -> Tensor:
    """RandomApply(ColorJitter(SIM_JITTER)) per sample: a random order of the four ops and their factors
    (brightness, contrast, saturation in [1 - 0.4, 1 + 0.4], hue in [-0.1, 0.1]) for every sample, then, position
    by position, each op on the samples that drew it there (grouped as `autoaugment` groups its ops: one host sync
    for the group sizes, loops over 4 positions x 4 ops only, never over images). One channel: brightness and
    contrast only."""
    n, dev = x.shape[0], x.device
    ops = 4 if x.shape[1] == 3 else 2
    order = torch.argsort(torch.rand(n, ops, generator=generator, device=dev), dim=1)  # a random permutation each
    low = torch.tensor([1 - SIM_JITTER[0], 1 - SIM_JITTER[1], 1 - SIM_JITTER[2], -SIM_JITTER[3]], device=dev)
    high = torch.tensor([1 + SIM_JITTER[0], 1 + SIM_JITTER[1], 1 + SIM_JITTER[2], SIM_JITTER[3]], device=dev)
    factors = low + (high - low) * torch.rand(n, 4, generator=generator, device=dev)
    key = torch.where(applied.view(n, 1), order, ops)  # ops = "not jittered"
    grouped = torch.argsort(key, dim=0, stable=True)
    offset = torch.arange(ops, device=dev) * (ops + 1)
    counts = torch.bincount((key + offset).flatten(), minlength=ops * (ops + 1)).view(ops, -1).tolist()  # one sync
    for position in range(ops):
        start = 0
        for op, count in enumerate(counts[position][:ops]):
            if count:
                idx = grouped[start : start + count, position]
                x[idx] = _JITTER_OPS[op](x[idx], factors[idx, op])
            start += count
    return x


def gaussian_blur(x: Tensor, sigma: Tensor, radius: int = 6) -> Tensor:
    """A Gaussian blur with a per-sample sigma (n,), separable, edges replicated (as PIL's blur extends its edge
    pixels), rounded to integers: PIL's `GaussianBlur(radius=sigma)` approximates the same Gaussian with three box
    passes of equal variance. `radius` = 3 x the largest sigma (2.0) taps each side."""
    n, c, h, w = x.shape
    taps = torch.arange(-radius, radius + 1, device=x.device, dtype=torch.float32)
    kernel = torch.exp(-0.5 * (taps.view(1, -1) / sigma.view(-1, 1).float()) ** 2)
    kernel = (kernel / kernel.sum(1, keepdim=True)).repeat_interleave(c, dim=0)  # (n * c, 2 radius + 1)
    flat = x.reshape(1, n * c, h, w)
    flat = F.conv2d(F.pad(flat, (radius, radius, 0, 0), mode="replicate"), kernel.view(n * c, 1, 1, -1),
                    groups=n * c)
    flat = F.conv2d(F.pad(flat, (0, 0, radius, radius), mode="replicate"), kernel.view(n * c, 1, -1, 1),
                    groups=n * c)
    return flat.view(n, c, h, w).add_(0.5).floor_().clamp_(0, 255)


def sim_view(images: Tensor, generator: torch.Generator, size: int | None = None) -> Tensor:
    """PaCo's CIFAR "sim" view (`datasets.augment.sim_transform`) for a batch, on integer-valued float pixels:
    resized crop + flip, jitter with p SIM_JITTER_P, grayscale with p SIM_GRAY_P (three channels only), blur with p
    SIM_BLUR_P and sigma ~ U(SIM_BLUR_SIGMA). Every draw is per sample; masked passes, no loop over images."""
    n, c, h, _ = images.shape
    dev = images.device
    x = resized_crop_flip(images.float(), generator, size or h)
    draws = torch.rand(n, 4, generator=generator, device=dev)
    x = color_jitter(x, draws[:, 0] < SIM_JITTER_P, generator)
    if c == 3:
        x = torch.where(_bcast(draws[:, 1] < SIM_GRAY_P), _grayscale(x).expand_as(x), x)
    sigma = SIM_BLUR_SIGMA[0] + (SIM_BLUR_SIGMA[1] - SIM_BLUR_SIGMA[0]) * draws[:, 3]
    return torch.where(_bcast(draws[:, 2] < SIM_BLUR_P), gaussian_blur(x, sigma), x)


