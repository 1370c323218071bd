"""Per-stage samplers: which training images an epoch visits, and in what order (Kang et al., ICLR 2020, Eq. 1).

A sampler gives class c the probability p_c = n_c^q / sum_j n_j^q and picks an image of that class uniformly:
q = 1 is instance-balanced, q = 1/2 square-root, q = 0 class-balanced, q = -1 reversed (BBN's re-balancing branch,
p_c proportional to n_max / n_c, Zhou et al., CVPR 2020, Sec. 3.2); progressive moves from instance- to
class-balanced over the stage, p_c(t) = (1 - t/T) p_c^IB + (t/T) p_c^CB with t the epoch and T the stage length.
Every epoch draws N images (the training split's size) with replacement, from a generator seeded per epoch, so an
epoch is replayable on resume. "instance" is the plain shuffle (each image exactly once), the feeders' own path.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from harness.errors import HarnessError

Draw = Callable[[torch.Tensor, torch.Generator], torch.Tensor]  # (labels, generator) -> image indices (N,)


def class_probabilities(counts: torch.Tensor, q: float) -> torch.Tensor:
    """p_c proportional to n_c^q (float64); classes with no images get 0."""
    counts = counts.to(torch.float64)
    weights = torch.where(counts > 0, counts.clamp(min=1) ** q, torch.zeros_like(counts))
    return weights / weights.sum()


def _power(q: float) -> Callable[[int, int], float | None]:
    return lambda epoch, epochs: q


def _progressive(epoch: int, epochs: int) -> None:
    return None


# name -> q(epoch, epochs); None means progressive (a mixture, not a power)
SAMPLERS: dict[str, Callable[[int, int], float | None]] = {
    "instance": _power(1.0),
    "square-root": _power(0.5),
    "class-balanced": _power(0.0),
    "reversed": _power(-1.0),
    "progressive": _progressive,
}


def stage_probabilities(name: str, counts: torch.Tensor, epoch: int, epochs: int) -> torch.Tensor:
    """Class probabilities of sampler `name` at `epoch` (0-based) of a stage `epochs` long."""
    if name not in SAMPLERS:
        raise HarnessError(f"unknown sampler '{name}'; known: {', '.join(SAMPLERS)}")
    q = SAMPLERS[name](epoch, epochs)
    if q is not None:
        return class_probabilities(counts, q)
    t = epoch / max(epochs, 1)
    return (1 - t) * class_probabilities(counts, 1.0) + t * class_probabilities(counts, 0.0)


def make_draw(name: str, epoch: int, epochs: int) -> Draw | None:
    """The epoch's draw for a stage's sampler; None for "instance" (the feeder's own shuffle, every image once)."""
    if name == "instance":
        return None
    stage_probabilities(name, torch.ones(1), epoch, epochs)  # unknown names fail here, before any data moves

    def draw(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        counts = torch.bincount(labels.cpu()).to(labels.device)
        per_class = stage_probabilities(name, counts, epoch, epochs)
        per_image = (per_class / counts.clamp(min=1).to(torch.float64))[labels]
        return torch.multinomial(per_image.float(), len(labels), replacement=True, generator=generator)

    return draw


def shuffle(labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Every image once, in a random order: the "instance" draw written out, for views that need their own order."""
    return torch.randperm(len(labels), generator=generator, device=generator.device)


def make_view_draw(sampler: str | None, epoch: int, epochs: int) -> Draw | None:
    """The draw of one extra view (`harness.method.View`): None for "the batch's own images again", else the
    sampler's epoch draw ("instance": an independent shuffle)."""
    if sampler is None:
        return None
    return make_draw(sampler, epoch, epochs) or shuffle
