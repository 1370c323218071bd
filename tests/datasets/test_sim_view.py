"""PaCo's SimCLR-style "sim" view (the contrastive views of PaCo, BCL and NCL): the official parameters, the batched
ops against PIL where they are exact (resized crop, hue) or close (blur), the two paths' agreement in distribution,
per-sample randomness, and the single-channel variant."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchvision.transforms.functional as TF
from PIL import Image, ImageFilter
from torchvision import transforms

from harness.datasets.augment import (
    AUGMENTS,
    SIM_BLUR_P,
    SIM_BLUR_SIGMA,
    SIM_GRAY_P,
    SIM_JITTER,
    SIM_JITTER_P,
    SIM_SCALE,
    GaussianBlur,
    sim_transform,
    synthetic_cifar_images,
    train_transform,
)
from harness.datasets.batched_augment import BatchedAugment
from harness.datasets.batched_sim import _jitter_hue, _resample_axis, gaussian_blur, sim_view
from harness.feeders import AugmentedDataset

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def to_pil(img: torch.Tensor) -> Image.Image:
    return Image.fromarray(img.permute(1, 2, 0).numpy())


def from_pil(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(img)).permute(2, 0, 1).float()


def test_the_parameters_are_pacos_cifar_sim_view():
    """paco_cifar.py `augmentation_sim_cifar`: RRC(32, scale (0.2, 1)), flip, jitter (0.4, 0.4, 0.4, 0.1) with p 0.8,
    grayscale p 0.2, MoCo's blur sigma in [0.1, 2] with p 0.5."""
    assert (SIM_SCALE, SIM_JITTER, SIM_JITTER_P, SIM_GRAY_P, SIM_BLUR_SIGMA, SIM_BLUR_P) == (
        (0.2, 1.0), (0.4, 0.4, 0.4, 0.1), 0.8, 0.2, (0.1, 2.0), 0.5)
    steps = sim_transform(MEAN, STD).transforms
    crop, jitter = steps[0], steps[2].transforms[0]
    assert isinstance(crop, transforms.RandomResizedCrop) and crop.size == (32, 32) and crop.scale == SIM_SCALE
    assert isinstance(steps[1], transforms.RandomHorizontalFlip) and steps[2].p == 0.8
    assert jitter.brightness == (0.6, 1.4) and jitter.contrast == (0.6, 1.4) and jitter.saturation == (0.6, 1.4)
    assert jitter.hue == (-0.1, 0.1)
    assert isinstance(steps[3], transforms.RandomGrayscale) and steps[3].p == 0.2
    assert isinstance(steps[4].transforms[0], GaussianBlur) and steps[4].p == 0.5
    assert "sim" in AUGMENTS and isinstance(train_transform(MEAN, STD, "sim").transforms[0],
                                            transforms.RandomResizedCrop)
    grey = sim_transform((0.5,), (0.25,)).transforms  # one channel: no grayscale, no saturation / hue
    assert not any(isinstance(t, transforms.RandomGrayscale) for t in grey)
    assert grey[2].transforms[0].saturation is None and grey[2].transforms[0].hue is None


@pytest.mark.parametrize("box", [(0, 0, 32, 32), (3, 5, 20, 17), (10, 2, 11, 25), (0, 0, 8, 9)])
def test_the_batched_resized_crop_is_pils_bilinear_bit_for_bit(box):
    top, left, height, width = box
    images = synthetic_cifar_images(6, seed=3)
    expected = torch.stack([from_pil(to_pil(i).crop((left, top, left + width, top + height)).resize(
        (32, 32), Image.Resampling.BILINEAR)) for i in images])
    at = lambda v: torch.full((6,), v)  # noqa: E731
    out = _resample_axis(images.float(), at(left), at(width), 32, axis=3, flip=None)
    out = _resample_axis(out, at(top), at(height), 32, axis=2, flip=None)
    assert torch.equal(out, expected)
    flipped = _resample_axis(images.float(), at(left), at(width), 32, axis=3, flip=torch.ones(6, dtype=torch.bool))
    flipped = _resample_axis(flipped, at(top), at(height), 32, axis=2, flip=None)
    assert torch.equal(flipped, expected.flip(-1))


@pytest.mark.parametrize("factor", [-0.1, -0.03, 0.05, 0.1])
def test_the_batched_hue_shift_is_pils_within_rounding(factor):
    images = synthetic_cifar_images(8, seed=4)
    expected = torch.stack([from_pil(TF.adjust_hue(to_pil(i), factor)) for i in images])
    out = _jitter_hue(images.float(), torch.full((8,), factor))
    assert (out - expected).abs().max() <= 3 and (out - expected).abs().mean() < 0.01


@pytest.mark.parametrize("sigma", [0.1, 0.5, 1.0, 2.0])
def test_the_batched_blur_is_close_to_pils_gaussian_blur(sigma):
    """PIL approximates the Gaussian with three box passes of the same variance: close, not equal."""
    images = synthetic_cifar_images(8, seed=4)
    expected = torch.stack([from_pil(to_pil(i).filter(ImageFilter.GaussianBlur(radius=sigma))) for i in images])
    out = gaussian_blur(images.float(), torch.full((8,), sigma))
    assert (out - expected).abs().mean() < 1.0


def image_statistics(batch: torch.Tensor) -> dict[str, float]:
    """Per image: the fraction that is exactly grey, the mean and std of its pixels, and its mean absolute
    horizontal gradient (which the crop scale and the blur set); averaged over the batch."""
    pixels = ((batch * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)) * 255).round()
    grey = ((pixels[:, 0] == pixels[:, 1]) & (pixels[:, 1] == pixels[:, 2])).flatten(1).all(dim=1)
    gradient = (pixels[..., 1:] - pixels[..., :-1]).abs().mean((1, 2, 3))
    return {"grey": grey.float().mean().item(), "mean": pixels.mean((1, 2, 3)).mean().item(),
            "std": pixels.std((1, 2, 3)).mean().item(), "gradient": gradient.mean().item()}


def test_both_paths_agree_in_distribution():
    """512 images per path (8 augmentations of 64 structured images). Measured on 384 images a path (batched, seeds
    0-3: grey 0.197-0.250, mean 115.9-117.8, std 37.4-39.9, gradient 3.37-3.56; reference, torch seeds 0-2: grey
    0.185-0.203, mean 115.7-117.9, std 38.6-39.7, gradient 3.31-3.50); the tolerances are about 2x the largest
    spread between the two paths, and the grey fraction's 0.06 is 3.4 binomial standard errors at p 0.2."""
    base = synthetic_cifar_images(64, seed=5).repeat(8, 1, 1, 1)
    dataset = AugmentedDataset(base, torch.zeros(len(base)), train_transform(MEAN, STD, "sim"))
    torch.manual_seed(0)
    reference = image_statistics(torch.stack([dataset[i][0] for i in range(len(dataset))]))
    batched = image_statistics(BatchedAugment(MEAN, STD, augment="sim")(base, torch.Generator().manual_seed(0)))
    assert abs(reference["grey"] - SIM_GRAY_P) < 0.06 and abs(batched["grey"] - SIM_GRAY_P) < 0.06
    assert abs(reference["grey"] - batched["grey"]) < 0.07
    assert abs(reference["mean"] - batched["mean"]) < 4.0
    assert abs(reference["std"] - batched["std"]) < 2.5
    assert abs(reference["gradient"] - batched["gradient"]) < 0.3


def test_every_image_gets_its_own_draws_and_a_generator_replays_them():
    images = synthetic_cifar_images(1, seed=2).expand(16, 3, 32, 32).contiguous()
    out = BatchedAugment(MEAN, STD, augment="sim")(images, torch.Generator().manual_seed(0)).flatten(1)
    assert (torch.cdist(out, out) + torch.eye(16) > 0).all()  # 16 copies of one image, 16 different views
    again = BatchedAugment(MEAN, STD, augment="sim")(images, torch.Generator().manual_seed(0)).flatten(1)
    assert torch.equal(out, again) and torch.equal(images, synthetic_cifar_images(1, seed=2).expand(16, 3, 32, 32))


def test_grey_images_stay_grey_and_one_channel_images_work():
    """Fashion-MNIST-LT's three identical channels stay identical (saturation, hue and grayscale are identities
    there); a single-channel batch takes the brightness / contrast / crop / blur part only."""
    grey = synthetic_cifar_images(32, seed=6)[:, :1].expand(32, 3, 32, 32).contiguous()
    out = sim_view(grey, torch.Generator().manual_seed(1))
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2])
    single = sim_view(grey[:, :1].contiguous(), torch.Generator().manual_seed(1))
    assert single.shape == (32, 1, 32, 32) and single.min() >= 0 and single.max() <= 255
    assert torch.equal(single, single.round())
