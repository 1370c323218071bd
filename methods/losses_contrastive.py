"""MoCo's InfoNCE with a queue of negatives (He et al., CVPR 2020), as NCL's optional contrastive branch uses it
(Bazinga699/NCL `lib/core/combiner.py: multi_network_default_CON`): for each network k, with L2-normalised queries q
(view 0), keys k (view 1, the momentum network) and the network's queue of earlier keys Q,

    logits_i = [q_i . k_i, q_i . Q_1, ..., q_i . Q_K] / T,    L_k = mean_i CE(logits_i, 0),

and the branch's loss is the sum over the networks, sum_k L_k (`loss_CON += F.cross_entropy(logits, labels)`), added
to NIL + NBOD with weight CON_RATIO = 1.0 (`loss = loss_ce + loss_CON * self.CON_ratio`). T = 0.2 (`MOCO_T`). The
queue is unlabelled: same-class keys in it are negatives too (plain MoCo, not PaCo's supervised contrast)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from harness.errors import HarnessError
from harness.method import LossTermModule, ModelOutput
from harness.methods.models.contrastive import MoCoOutput


def moco_infonce(queries: torch.Tensor, keys: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """sum over networks of MoCo's InfoNCE: queries, keys (K, B, D), queue (K, Q, D), all L2-normalised; the keys
    and the queue carry no gradient (the official uses `queue.clone().detach()` and keys from the momentum net)."""
    positive = (queries * keys.detach()).sum(dim=2, keepdim=True)  # (K, B, 1)
    negative = torch.einsum("kbd,kqd->kbq", queries, queue.detach())  # (K, B, Q)
    logits = torch.cat([positive, negative], dim=2) / temperature
    target = torch.zeros(logits.shape[:2], dtype=torch.long, device=logits.device)
    per_network = F.cross_entropy(logits.flatten(0, 1), target.flatten(), reduction="none").view(logits.shape[:2])
    return per_network.mean(dim=1).sum()


class MoCoContrast(LossTermModule):
    """`moco_infonce` on a `MoCoEnsemble` training output (the labels are not used: MoCo's positives are the
    other view of the same image)."""

    def __init__(self, temperature: float = 0.2) -> None:
        super().__init__()
        if temperature <= 0:
            raise HarnessError(f"the MoCo temperature must be > 0, got {temperature}")
        self.temperature = temperature

    def forward(self, out: ModelOutput, target: torch.Tensor) -> torch.Tensor:
        if not isinstance(out, MoCoOutput) or out.queries is None:
            raise HarnessError("the MoCo term needs a MoCo model's training output (two views, queues)")
        return moco_infonce(out.queries.float(), out.keys.float(), out.queue.float(), self.temperature)
