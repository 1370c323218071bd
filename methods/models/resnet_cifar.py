"""CIFAR ResNet-32 building blocks with addressable stages (official SHIKE `networks.py:34-83`, `:146-150`, `:183-190`).

The trunk is stem -> layer1 (16ch, 32x32) -> layer2 (32ch, 16x16) -> layer3 (64ch, 8x8), 5 BasicBlocks per stage.
SHIKE's code uses shortcut option "B" (1x1 strided conv + BN projection) everywhere a block changes shape
(`networks.py:53`, `:188`); option "A" is the zero-padding identity of He et al. / LDAM.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

SHORTCUT_OPTIONS = ("A", "B")


class PadShortcut(nn.Module):
    """Option-A shortcut: subsample by 2 and zero-pad the channels (`networks.py:63-69`).

    Assumes the block doubles its width and halves the resolution, as every CIFAR ResNet stage change does.
    """

    def __init__(self, planes: int) -> None:
        super().__init__()
        self.pad = planes // 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad), "constant", 0.0)


class BasicBlock(nn.Module):
    """conv3x3(stride)-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU (`networks.py:50-83`).

    option "B" (the official default, `:53`) projects with a 1x1 strided conv + BN when the shape changes;
    option "A" zero-pads (parameter-free).
    """

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, option: str = "B") -> None:
        super().__init__()
        if option not in SHORTCUT_OPTIONS:
            raise ValueError(f"unknown shortcut option '{option}'; known: {SHORTCUT_OPTIONS}")
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            if option == "A":
                if stride != 2 or planes != 2 * in_planes:
                    raise ValueError("option A needs stride 2 and a doubling of the width")
                self.shortcut = PadShortcut(planes)
            else:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                    nn.BatchNorm2d(planes),
                )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def blocks_per_stage(depth: int) -> int:
    """CIFAR ResNet depth 6n+2 (8, 14, 20, 32, 56, 110, ...) -> n BasicBlocks per stage (32 -> 5, SHIKE's)."""
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"a CIFAR ResNet depth is 6n+2 with n >= 1 (8, 14, 20, 32, 56, 110), got {depth}")
    return (depth - 2) // 6


def make_stage(in_planes: int, planes: int, blocks: int = 5, stride: int = 1, option: str = "B") -> nn.Sequential:
    """One ResNet stage: `blocks` BasicBlocks, the first with `stride` (official `_make_layer`, `networks.py:183-190`)."""
    layers = [BasicBlock(in_planes, planes, stride, option)]
    layers += [BasicBlock(planes, planes, 1, option) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


class Stem(nn.Module):
    """3x3 conv in_channels->16 (stride 1, pad 1, no bias), BN, ReLU (`networks.py:146-148`, `:194`)."""

    def __init__(self, in_channels: int = 3, planes: int = 16) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def init_weights(module: nn.Module) -> None:
    """The official `_weights_init` (`networks.py:34-37`): Kaiming-normal (fan_in, ReLU gain) on every Conv2d and
    Linear weight; biases and BN keep PyTorch's defaults. Use with `module.apply(init_weights)`."""
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.kaiming_normal_(module.weight)
