"""Depth-wise Knowledge Fusion on ResNet-50-family trunks: Table 5's arrangements and the aligner designs.

SHIKE Sec. 3.2: expert m multiplies its last-stage output f^m_{S+1} element-wise with an earlier shared stage's
output f_s "aligned" to it by "several convolution layers for downsampling according to the depth". Table 5 names
the depths A, B, C (shallow -> deep), here the outputs of layer1, layer2 and layer3 (256x56x56, 512x28x28 and
1024x14x14 at 224x224 input; the experts' layer4 gives 2048x7x7). The paper gives no aligner design and the official
repository has no large-scale code (reference/shike-official-code.md 1.6), so the design is a switch
(reference/large-scale-lt.md 3.3):

- conv3x3 (default): per step a 3x3 conv (stride 2, pad 1, no bias) doubling the channels, then BN: the official
  CIFAR `StridedConv`/`ShallowExpert` (`networks.py:86-124`) extended to 1-3 steps. The only design with an official
  implementation; its price is about 67 M parameters for ABC on ResNet-50 (the A aligner alone exceeds layer4).
- chain1x1: the same chain with 1x1 stride-2 convs (ResNet shortcut style; A then skips 63/64 of the positions).
- pool1x1: average pooling by 2^steps, then one 1x1 conv to the target width and BN (the cheap named deviation).

ReLU rule (`align_relu`): "code" puts a ReLU after conv k iff k != 1 (official `networks.py:119`, extended
literally: A = ReLU, none, ReLU; B = ReLU, none, so B's fused map is signed; C = ReLU); "all" after every conv.
Aligners keep PyTorch's default init, as the official aligners do (built after `_weights_init`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from harness.errors import HarnessError

# Table 5's depth letters -> the shared stage whose output is fused (1 = layer1, 2 = layer2, 3 = layer3).
DEPTH_LETTERS = {"A": 1, "B": 2, "C": 3}
# Table 5's rows (1 to 4 experts); any other string over A/B/C is accepted too.
TABLE5_ARRANGEMENTS = ("A", "B", "C", "AB", "BC", "AC", "ABC", "ABCA", "ABCB", "ABCC")
ALIGN_RELU_MODES = ("code", "all")


# The CIFAR ResNet-32 has two shared stages. Table 5's letters keep their meaning there: A is the shallowest stage
# (layer1, as on ResNet-50) and C the stage right before the experts' own (layer2: one downsampling away, as
# ResNet-50's layer3 is); B (ResNet-50's layer2) has no ResNet-32 counterpart.
CIFAR_DEPTH_LETTERS = {"A": 1, "C": 2}


def parse_arrangement(text: str, shared_stages: int = 3, cifar: bool = False) -> tuple[int, ...]:
    """"ABCA" -> (1, 2, 3, 1): one expert per letter, each fusing that shared stage's output (Table 5).

    `shared_stages` is S, the number of stages before the experts' own on the torchvision ResNets (A/B/C =
    layer1/2/3 up to S); `cifar`: the CIFAR ResNet-32's two (`CIFAR_DEPTH_LETTERS`: A = layer1, C = layer2, no B)."""
    letters = text.strip().upper()
    if not letters:
        raise HarnessError("arrangement is empty; give one letter per expert, e.g. ABC (Table 5)")
    table = CIFAR_DEPTH_LETTERS if cifar else {k: v for k, v in DEPTH_LETTERS.items() if v <= shared_stages}
    bad = sorted({c for c in letters if c not in table})
    if bad:
        raise HarnessError(f"arrangement '{text}': letter(s) {', '.join(bad)} not among this backbone's shared "
                           f"depths {', '.join(table)}; use e.g. {''.join(table)} (B, ResNet-50's layer2, has no "
                           "ResNet-32 counterpart; --set method.backbone=resnet50 has all three)" if cifar
                           else f"arrangement '{text}': letter(s) {', '.join(bad)} not among the {shared_stages} "
                           f"shared depths {', '.join(table)}; use e.g. {''.join(table)}")
    return tuple(table[c] for c in letters)


def arrangement_name(sources: Sequence[int]) -> str:
    """(1, 2, 3, 1) -> "ABCA"."""
    names = {v: k for k, v in DEPTH_LETTERS.items()}
    return "".join(names[s] for s in sources)


def _relu_after(k: int, align_relu: str) -> bool:
    return k != 1 if align_relu == "code" else True


def _step(in_planes: int, planes: int, kernel: int, stride: int, relu: bool) -> list[nn.Module]:
    """conv (no bias), BN, optional ReLU: one step of an aligner."""
    layers: list[nn.Module] = [
        nn.Conv2d(in_planes, planes, kernel_size=kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(planes),
    ]
    return layers + [nn.ReLU(inplace=True)] if relu else layers


def _chain(kernel: int) -> Callable[[Sequence[int], str], nn.Sequential]:
    def build(widths: Sequence[int], align_relu: str) -> nn.Sequential:
        """One stride-2 step per stage gap, widths[k] -> widths[k+1] channels."""
        layers = [m for k, (cin, cout) in enumerate(zip(widths, widths[1:]))
                  for m in _step(cin, cout, kernel, 2, _relu_after(k, align_relu))]
        return nn.Sequential(*layers)

    return build


def pool1x1(widths: Sequence[int], align_relu: str) -> nn.Sequential:
    """AvgPool(2^steps) (ceil mode: the same output size as `steps` stride-2 convs with padding), then a 1x1 conv
    from the source width straight to the target width, BN, and the ReLU of step 0."""
    factor = 2 ** (len(widths) - 1)
    return nn.Sequential(nn.AvgPool2d(factor, stride=factor, ceil_mode=True),
                         *_step(widths[0], widths[-1], 1, 1, _relu_after(0, align_relu)))


ALIGNERS: dict[str, Callable[[Sequence[int], str], nn.Sequential]] = {
    "conv3x3": _chain(3),
    "chain1x1": _chain(1),
    "pool1x1": pool1x1,
}


def make_aligner(design: str, widths: Sequence[int], align_relu: str = "code") -> nn.Sequential:
    """An aligner from `widths[0]` channels to `widths[-1]`, halving the resolution len(widths) - 1 times."""
    if design not in ALIGNERS:
        raise HarnessError(f"unknown dkf_align '{design}'; known: {', '.join(ALIGNERS)}")
    if align_relu not in ALIGN_RELU_MODES:
        raise HarnessError(f"unknown align_relu '{align_relu}'; known: {', '.join(ALIGN_RELU_MODES)}")
    if len(widths) < 2:
        raise HarnessError("an aligner needs at least one downsampling step (a source before the expert stage)")
    return ALIGNERS[design](widths, align_relu)
