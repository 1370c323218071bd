"""Backbones and heads: CIFAR ResNet-32 pieces, cosine/linear heads, SHIKE's multi-expert model with DKF, and
parameter/FLOP profiling."""

from harness.methods.models.heads import CosineHead, LinearHead, make_head
from harness.methods.models.moe import (
    ExpertResNet,
    ShallowAligner,
    StridedConv,
    build_expert_resnet,
    default_dkf_sources,
)
from harness.methods.models.resnet_cifar import BasicBlock, Stem, init_weights, make_stage
from harness.profile import forward_flops, parameter_counts, train_flops

__all__ = [
    "BasicBlock",
    "CosineHead",
    "ExpertResNet",
    "LinearHead",
    "ShallowAligner",
    "Stem",
    "StridedConv",
    "build_expert_resnet",
    "default_dkf_sources",
    "forward_flops",
    "init_weights",
    "make_head",
    "make_stage",
    "parameter_counts",
    "train_flops",
]
