"""RF-ResNet: ResNets whose local representations have a bounded receptive field.

Paper: Arthur Aubret, Celine Teuliere, Jochen Triesch, "Seeing the Whole in the Parts in Self-Supervised
Representation Learning" (arXiv 2501.02860), Sec. 3.2, Fig. 2 and App. B.1.

This is the ONLY module the method files share (co_byol.py, co_dino.py, bag_ssl.py, geo_dino.py and
eval_linear.py import it; nothing else from this repository).

What you get
------------
    backbone = build_backbone("rf99_resnet50")            # stem="imagenet", MLP on
    out = backbone(images)                                 # images: (B, 3, 224, 224)
    out.local    # (B, C, n, n)  local representations, before pooling (n = 14 here), C = backbone.out_dim
    out.pooled   # (B, C)        their average: the paper's "patch" representation (a bag of patches)
    out.h        # (B, C)        global representation fed to the SSL heads (= pooled + MLP(pooled))
    receptive_field(backbone)      # 99: the analytic receptive field of one local representation, in pixels

Architectures: `resnet18`, `resnet34`, `resnet50` (torchvision's, without the fc) and the RF-ResNet presets
`rf{67,99,163,195}_resnet{18,50}` for 224 px inputs, `rf{29,33,41,49}_resnet{18,50}` with the small-image
stem (`stem="cifar"`, for 32-64 px inputs). Run `python rf_resnet.py` for the table of every preset
(analytic and measured RF, local grid at 32/64/224 px, parameters, GFLOPs) and
`python rf_resnet.py --plot rf.png` for a picture of the receptive fields, like the paper's Fig. 4 / 6.

Reading order: (1) receptive-field arithmetic, (2) the three changes that turn a ResNet into an RF-ResNet,
(3) the presets, (4) measuring the receptive field with gradients, (5) the command line.
"""
from __future__ import annotations

import argparse
import copy
from typing import NamedTuple, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.models.resnet import BasicBlock, Bottleneck

# ================================================================================================
# 1. Receptive-field arithmetic (paper App. B.1, after Araujo et al., Distill 2019)
# ================================================================================================
# A unit of layer L "sees" a square of RF(L) x RF(L) input pixels:
#
#     RF(L) = 1 + sum_{l=1..L} (k_l - 1) * prod_{i<l} s_i                       (App. B.1)
#
# where k_l is the kernel size and s_l the stride of layer l. Read it as: every layer widens the field by
# (k_l - 1) steps of its input grid, and one step of layer l's input grid is prod_{i<l} s_i pixels (the
# "jump"). Two consequences drive the whole RF-ResNet design:
#   * a 1x1 convolution (k = 1) adds nothing, whatever its position: 1x1 layers are free for the RF;
#   * a 3x3 convolution late in the network adds 2 * jump, and the jump has grown with every stride
#     before it, so late 3x3 layers are what make a ResNet-50's RF (427 px) larger than its 224 px input.
# Padding does not change the RF, only where the grid of units sits on the image. Pooling layers count like
# convolutions (a 3x3/2 max-pool is k=3, s=2). In a residual block the field of the output is that of the
# longest branch: the shortcut is at most a 1x1 convolution with the block's stride, so the main branch
# (same strides, larger kernels) always dominates and we only walk the main branch below.


def rf_of_layers(layers: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """RF and total stride ("jump") of a chain of (kernel, stride) layers, by the formula above."""
    rf, jump = 1, 1
    for kernel, stride in layers:
        rf += (kernel - 1) * jump  # this layer widens the field by (k - 1) input steps of `jump` pixels
        jump *= stride  # one step of the next layer's input grid, in pixels
    return rf, jump


def _k(conv_or_pool: nn.Module) -> tuple[int, int]:
    """(kernel, stride) of a square Conv2d / MaxPool2d / AvgPool2d."""
    k, s = conv_or_pool.kernel_size, conv_or_pool.stride
    k = k[0] if isinstance(k, tuple) else k
    s = s[0] if isinstance(s, tuple) else s
    return k, s


def layer_chain(model: "Backbone") -> list[tuple[int, int]]:
    """The (kernel, stride) of every layer on the main path from the image to `.local`, in order."""
    chain = [_k(model.conv1)]
    if isinstance(model.maxpool, nn.MaxPool2d):
        chain.append(_k(model.maxpool))
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in stage:
            convs = [block.conv1, block.conv2] + ([block.conv3] if hasattr(block, "conv3") else [])
            chain += [_k(c) for c in convs]
    return chain


def receptive_field(model: "Backbone") -> int:
    """Analytic receptive field (pixels) of one local representation of `model` (of `.local`)."""
    return rf_of_layers(layer_chain(model))[0]


def total_stride(model: "Backbone") -> int:
    """Distance in input pixels between two neighbouring local representations."""
    return rf_of_layers(layer_chain(model))[1]


# ================================================================================================
# 2. From ResNet to RF-ResNet (paper Sec. 3.2, Fig. 2)
# ================================================================================================
# We start from torchvision's ResNet (so plain ResNets and RF-ResNets share module names and state-dict
# keys: conv1, bn1, layer1..layer4) and make three changes:
#
#  (1) bound the RF: in every stage keep a 3x3 convolution only in the FIRST block (with the stage's stride
#      s, s' or s'') and in the MIDDLE block (index n // 2, stride 1); every other 3x3 becomes a 1x1
#      convolution with stride 1. Whatever the number n >= 2 of blocks, each stage then has exactly two 3x3
#      layers, so the RF depends only on the stem, the max-pool m and the strides (Fig. 2C). The kept 3x3 is
#      conv2 in a Bottleneck (torchvision puts the stride there) and conv1 in a BasicBlock.
#  (2) add an MLP with the structure of one block after the average pooling, with a skip connection:
#      h = pooled + MLP(pooled). Without it ("v0") h = pooled.
#  (3) match the parameter count with more blocks: RF-ResNet18 uses [4, 4, 4, 4] BasicBlocks (7.53M with the
#      MLP vs 11.18M for ResNet-18, counted by `python rf_resnet.py`), RF-ResNet50 uses [3, 4, 6, 4]
#      Bottlenecks (23.7M with the MLP vs 23.5M).


class BackboneOutput(NamedTuple):
    """What every backbone returns (a NamedTuple so that DDP finds the tensors in it)."""

    local: torch.Tensor  # (B, C, n, n) local representations, right before the final average pooling
    pooled: torch.Tensor  # (B, C) their spatial mean: the "patch" representation (a bag of local features)
    h: torch.Tensor  # (B, C) global representation for the heads: pooled + MLP(pooled), or pooled (v0)


class BlockMLP(nn.Module):
    """Change (2): one ResNet block written with Linear layers, on the pooled (B, C) vector.

    Bottleneck: C -> C/4 -> C/4 -> C; BasicBlock: C -> C -> C; Linear + BN (+ ReLU) as in the block, and the
    block's skip connection: h = relu(pooled + MLP(pooled)).
    IMPL: the paper does not say whether a ReLU follows the addition. We keep it, as in the block whose
    structure the MLP copies; since `pooled` is itself post-ReLU (>= 0), h stays in the same cone as pooled.
    """

    def __init__(self, dim: int, bottleneck: bool):
        super().__init__()
        widths = [dim, dim // 4, dim // 4, dim] if bottleneck else [dim, dim, dim]
        layers: list[nn.Module] = []
        for i, (w_in, w_out) in enumerate(zip(widths[:-1], widths[1:])):
            # No bias: BatchNorm right after it has one (as the convolutions in a ResNet block).
            layers += [nn.Linear(w_in, w_out, bias=False), nn.BatchNorm1d(w_out)]
            if i < len(widths) - 2:
                layers.append(nn.ReLU(inplace=True))
        self.mlp = nn.Sequential(*layers)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return F.relu(pooled + self.mlp(pooled))  # (B, C) -> (B, C), skip connection as in the block


class Backbone(nn.Module):
    """A ResNet trunk without fc that returns local, pooled and global representations.

    The layers are torchvision's (conv1, bn1, relu, maxpool, layer1..layer4), so `receptive_field()` and the
    state-dict keys are the same for ResNets and RF-ResNets. `out_dim` is C, the channel count of `.local`.
    """

    def __init__(self, resnet: torchvision.models.ResNet, mlp: bool):
        super().__init__()
        self.conv1, self.bn1, self.relu, self.maxpool = resnet.conv1, resnet.bn1, resnet.relu, resnet.maxpool
        self.layer1, self.layer2, self.layer3, self.layer4 = resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4
        bottleneck = isinstance(self.layer4[0], Bottleneck)
        self.out_dim = self.layer4[-1].conv3.out_channels if bottleneck else self.layer4[-1].conv2.out_channels
        self.mlp = BlockMLP(self.out_dim, bottleneck) if mlp else None

    def forward_local(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images -> (B, C, n, n) local representations."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def head(self, local: torch.Tensor) -> BackboneOutput:
        """Pool a (B, C, n, n) local map (possibly edited, e.g. masked) into the full output."""
        pooled = local.mean(dim=(2, 3))  # (B, C, n, n) -> (B, C): average pooling = mean of the bag
        h = self.mlp(pooled) if self.mlp is not None else pooled
        return BackboneOutput(local=local, pooled=pooled, h=h)

    def forward(self, x: torch.Tensor) -> BackboneOutput:
        return self.head(self.forward_local(x))


def _conv1x1_like(conv: nn.Conv2d) -> nn.Conv2d:
    """A 1x1, stride-1 convolution with the channels of `conv` (which is a 3x3 we drop): adds 0 to the RF."""
    return nn.Conv2d(conv.in_channels, conv.out_channels, kernel_size=1, stride=1, bias=False)


class CPUSafeConv2d(nn.Conv2d):
    """A strided convolution that, on the CPU, steers around two faults of torch 2.14.1's oneDNN kernels with
    the same weights and the same numbers, through another kernel (docs/rf_resnet.md):

    * 1x1 kernel: the backward of a strided 1x1 convolution in channels_last corrupts the heap or crashes for
      some narrow shapes (4-8 input channels on 64-66 px maps in fp32, 12 on 66 px in bf16: ResNet-18's first
      shortcut at --width 8-12, 64 px, CIFAR stem). We run a stride-1 convolution on every s-th pixel, which
      is all a 1x1 kernel reads.
    * wider kernel, one output column: in bf16 the weight gradient of a strided convolution whose output is
      one pixel wide is garbage (up to 1e37, or NaN, in either memory format): e.g. layer4's 3x3/2 on the 1x1
      map of the ImageNet stem at 16 px. Along a side with one output the stride is never applied (that one
      window starts at -padding whatever the stride), so we convolve with stride 1 there and keep the first
      output.
    On CUDA, and at stride 1, the ordinary convolution runs.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda or self.stride == (1, 1):
            return super().forward(x)
        if self.kernel_size == (1, 1):
            sh, sw = self.stride
            return F.conv2d(x[:, :, ::sh, ::sw], self.weight, self.bias)
        one = [(n + 2 * p - d * (k - 1) - 1) // s == 0  # this side has one output (the conv2d size formula)
               for n, p, d, k, s in zip(x.shape[-2:], self.padding, self.dilation, self.kernel_size, self.stride)]
        stride = tuple(1 if single else s for single, s in zip(one, self.stride))
        y = F.conv2d(x, self.weight, self.bias, stride, self.padding, self.dilation, self.groups)
        rows, cols = (slice(0, 1) if single else slice(None) for single in one)
        return y[:, :, rows, cols]  # (B, C_out, H_out, W_out): the outputs of the strided convolution


def _set_stride(block: nn.Module, stride: int) -> None:
    """Give the first block of a stage stride `stride` on its 3x3 and on its downsample shortcut."""
    conv = block.conv2 if isinstance(block, Bottleneck) else block.conv1  # the 3x3 that carries the stride
    conv.stride = (stride, stride)
    if block.downsample is not None:  # 1x1 conv + BN shortcut: must take the same stride to match shapes
        block.downsample[0].stride = (stride, stride)
    block.stride = stride


class _ResNetOfWidth(torchvision.models.ResNet):
    """torchvision's ResNet with stage widths (w, 2w, 4w, 8w) instead of (64, 128, 256, 512).

    IMPL: torchvision hard-codes the base width 64; we scale the `planes` of every stage and restart the
    channel count at w before stage 1 (the stem is rebuilt with w channels in `make_resnet`). w = 64 builds
    exactly torchvision's layers. Narrow networks (w = 16-32) are the CPU "laptop" recipes' backbones: a
    quarter of the parameters at w = 32, the same depth, strides, kernels and hence the same receptive field.
    """

    def __init__(self, block, layers, width: int):
        self._width = width
        super().__init__(block, layers)

    def _make_layer(self, block, planes, blocks, stride=1, dilate=False):
        if planes == 64:  # stage 1: the stem gives w channels, not 64
            self.inplanes = self._width
        return super()._make_layer(block, planes * self._width // 64, blocks, stride, dilate)


def make_resnet(
    block: str = "bottleneck",
    layers: Sequence[int] = (3, 4, 6, 4),
    bounded_rf: bool = True,
    maxpool: bool = False,
    strides: Sequence[int] = (2, 2, 2),
    stem: str = "imagenet",
    mlp: bool = True,
    width: int = 64,
) -> Backbone:
    """Build a (RF-)ResNet from its hyper-parameters (paper Fig. 2A).

    block: "bottleneck" (ResNet-50 family) or "basic" (ResNet-18/34 family); layers: blocks per stage
    (n1..n4); bounded_rf: apply change (1); maxpool: m, keep the stem's 3x3/2 max-pool; strides: (s, s', s'')
    of the first block of stages 2-4; stem: "imagenet" (7x7/2 convolution) or "cifar" (3x3/1, no max-pool);
    mlp: change (2); width: channels of stage 1 (stages 2-4: 2x, 4x, 8x; 64 = the standard networks).
    With bounded_rf=False, maxpool=True, strides=(2, 2, 2), mlp=False and width=64 this is exactly
    torchvision's ResNet without fc.
    """
    if block not in ("bottleneck", "basic"):
        raise ValueError(f"block must be 'bottleneck' or 'basic', got {block!r}")
    if stem not in ("imagenet", "cifar"):
        raise ValueError(f"stem must be 'imagenet' or 'cifar', got {stem!r}")
    if len(layers) != 4 or min(layers) < 1 or len(strides) != 3 or any(s not in (1, 2) for s in strides):
        raise ValueError(f"need 4 stages of >= 1 block and 3 strides in {{1, 2}}, got {layers}, {strides}")
    if width < 4 or width % 4:
        raise ValueError(f"width must be a positive multiple of 4 (Bottleneck divides by 4), got {width}")
    resnet = _ResNetOfWidth(Bottleneck if block == "bottleneck" else BasicBlock, list(layers), width)
    resnet.fc = nn.Identity()
    if width != 64:  # the ImageNet stem with w channels (the cifar stem below is rebuilt anyway)
        resnet.conv1 = nn.Conv2d(3, width, kernel_size=7, stride=2, padding=3, bias=False)
        resnet.bn1 = nn.BatchNorm2d(width)

    if stem == "cifar":
        # IMPL (solo-learn, which the CO-SSL and BagSSL authors used): 3x3 stride-1 stem with padding 2 and no
        # max-pool for 32-64 px images. Padding 2 makes the 32 px map 34 px, hence ResNet-18's 5x5 final
        # map on CIFAR (BagSSL Table 5 pools that 5x5 map). The RF does not depend on padding.
        resnet.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=2, bias=False)
        maxpool = False
    if not maxpool:
        resnet.maxpool = nn.Identity()

    for stage_idx, stage in enumerate((resnet.layer1, resnet.layer2, resnet.layer3, resnet.layer4)):
        if stage_idx > 0:  # stage 1 never strides; stages 2-4 take s, s', s''
            _set_stride(stage[0], strides[stage_idx - 1])
        if not bounded_rf:
            continue
        keep = {0, len(stage) // 2}  # change (1): the first and the middle block keep their 3x3
        for j, blk in enumerate(stage):
            if isinstance(blk, Bottleneck):  # conv1 1x1 -> conv2 3x3 (stride) -> conv3 1x1
                if j not in keep:
                    blk.conv2 = _conv1x1_like(blk.conv2)
            else:  # BasicBlock: conv1 3x3 (stride) -> conv2 3x3; only the first may stay 3x3
                blk.conv2 = _conv1x1_like(blk.conv2)
                if j not in keep:
                    blk.conv1 = _conv1x1_like(blk.conv1)
    for parent in list(resnet.modules()):  # every strided convolution, with its weights: no new random draws
        for name, conv in parent.named_children():
            if type(conv) is nn.Conv2d and conv.stride != (1, 1):
                safe = torch.nn.utils.skip_init(CPUSafeConv2d, conv.in_channels, conv.out_channels, conv.kernel_size,
                                                stride=conv.stride, padding=conv.padding, bias=False)
                safe.weight = conv.weight
                setattr(parent, name, safe)
    # torchvision initialises the convolutions it built (Kaiming normal, fan_out); do the same for ours.
    for m in resnet.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return Backbone(resnet, mlp=mlp)


# ================================================================================================
# 3. Presets
# ================================================================================================
# With the 7x7/2 ImageNet stem, the RF sizes 67, 163 and 195 are each reached by exactly one choice of
# (m, s, s', s''); 99 by two: no max-pool with strides (2, 2, 2), a 14x14 map at 224 px (kept: 196 local
# representations, as in the paper's Table 5), and max-pool with (1, 2, 1), a 28x28 map. Worked example, rf99 (no max-pool, strides 2, 2, 2), adding (k - 1) * jump per 3x3 layer:
#     stem 7x7/2: 1 + 6*1 = 7 (jump 2) | stage 1: + 2*2 + 2*2 = 15 | stage 2: + 2*2 = 19 (jump 4), + 2*4 = 27
#     stage 3: + 2*4 = 35 (jump 8), + 2*8 = 51 | stage 4: + 2*8 = 67 (jump 16), + 2*16 = 99.
# The paper writes "193" for our rf195 and "425" for ResNet-50's 427: its counting differs by 2 px; its RF99
# is certain (14x14 = 196 local representations at 224 px, Table 5).
IMAGENET_PRESETS = {
    #          (max-pool m, (s, s', s''))   total stride, grid at 224 px
    "rf67": (False, (2, 1, 2)),  # 8,  28x28
    "rf99": (False, (2, 2, 2)),  # 16, 14x14  (the paper's main RF-ResNet)
    "rf163": (True, (2, 2, 1)),  # 16, 14x14
    "rf195": (True, (2, 2, 2)),  # 32, 7x7
}
# With the small-image stem (3x3/1, never a max-pool) the same formula gives other sizes. At 32 px every
# preset covers about the whole image (the smallest RF an RF-ResNet can reach with this stem is 19, with
# strides 1, 1, 1 and a 34x34 map of 2048 channels, which is far too expensive), so bounded RFs become
# meaningful from 64 px on (Tiny-ImageNet, or upsampled CIFAR), where they span 0.45-0.77 of the image like
# rf99-rf195 at 224 px. Among the stride choices we keep those with a total stride of 4 or 8 (cheap maps):
CIFAR_PRESETS = {
    #          (max-pool m, (s, s', s''))   total stride, grid at 32 / 64 px (stem padding 2: 34 / 66 px)
    "rf29": (False, (1, 2, 2)),  # 4, 9x9 / 17x17   (the paper's Tiny-ImageNet "RF29-ResNet18"; strides not given)
    "rf33": (False, (2, 1, 2)),  # 4, 9x9 / 17x17   (the strides of rf67)
    "rf41": (False, (2, 2, 1)),  # 4, 9x9 / 17x17   (the strides of rf163, without max-pool)
    "rf49": (False, (2, 2, 2)),  # 8, 5x5 / 9x9     (the strides of rf99)
}
DEPTHS = {  # change (3): parameter matching with extra blocks
    "resnet18": ("basic", (4, 4, 4, 4)),  # ResNet-18 has [2, 2, 2, 2]
    "resnet50": ("bottleneck", (3, 4, 6, 4)),  # ResNet-50 has [3, 4, 6, 3]
}
TORCHVISION = {  # the unmodified ResNets
    "resnet18": ("basic", (2, 2, 2, 2)),
    "resnet34": ("basic", (3, 4, 6, 3)),
    "resnet50": ("bottleneck", (3, 4, 6, 3)),
}


def available_archs(stem: str = "imagenet") -> list[str]:
    """Every arch name `build_backbone` accepts with this stem."""
    presets = IMAGENET_PRESETS if stem == "imagenet" else CIFAR_PRESETS
    return list(TORCHVISION) + [f"{rf}_{depth}" for rf in presets for depth in DEPTHS]


def build_backbone(arch: str, stem: str = "imagenet", mlp: Optional[bool] = None, width: int = 64) -> Backbone:
    """Build a backbone by name: resnet18/34/50 or rf{N}_resnet{18,50} (see `available_archs(stem)`).

    mlp: the RF-ResNet MLP (change 2); None means "on for RF-ResNets, off for plain ResNets", False is the
    paper's "v0". Passing True for a plain ResNet adds the same MLP (an ablation the paper does not run).
    width: channels of the first stage (64: the standard networks; 32 has about a quarter of the parameters).
    Saved checkpoints store `arch` and `arch_kwargs = {"stem": ..., "mlp": ..., "width": ...}`:
    build_backbone(arch, **kw) rebuilds the network (files without "width" are width 64).
    """
    if stem not in ("imagenet", "cifar"):
        raise ValueError(f"unknown stem {stem!r}: choose 'imagenet' (224 px) or 'cifar' (32-64 px)")
    if arch in TORCHVISION:
        block, layers = TORCHVISION[arch]
        return make_resnet(block, layers, bounded_rf=False, maxpool=True, strides=(2, 2, 2), stem=stem, mlp=bool(mlp),
                           width=width)
    presets = IMAGENET_PRESETS if stem == "imagenet" else CIFAR_PRESETS
    rf, _, depth = arch.partition("_")
    if rf not in presets or depth not in DEPTHS:
        raise ValueError(f"unknown arch {arch!r} for stem {stem!r}; choose one of {', '.join(available_archs(stem))}")
    maxpool, strides = presets[rf]
    block, layers = DEPTHS[depth]
    return make_resnet(block, layers, bounded_rf=True, maxpool=maxpool, strides=strides, stem=stem,
                       mlp=True if mlp is None else mlp, width=width)


# ================================================================================================
# 4. Measuring the receptive field with gradients (paper App. B.1, last sentence)
# ================================================================================================
# The analytic RF is checked against the network itself: the RF of a unit is the set of input pixels whose
# gradient d(unit)/d(pixel) can be non-zero. Three details make "can be" into "is" on a single input:
#   * BatchNorm in eval mode with its initial statistics (mean 0, var 1) is a per-channel affine map, so
#     units do not mix across positions through batch statistics;
#   * all convolution weights are made positive (uniform in [0, 2/fan_in], so activations stay O(1)) and
#     the input is positive: every ReLU is then active and no gradient path is cut by chance;
#   * max-pooling routes the gradient to one pixel per window only; for the measurement we replace it by an
#     average pool with the same kernel and stride (the same geometry, so the same RF).


def _positive_copy(model: Backbone) -> Backbone:
    probe = copy.deepcopy(model).eval()
    with torch.no_grad():
        for m in probe.modules():
            if isinstance(m, nn.Conv2d):
                fan_in = m.in_channels * m.kernel_size[0] * m.kernel_size[1]
                m.weight.uniform_(0.0, 2.0 / fan_in)
    if isinstance(probe.maxpool, nn.MaxPool2d):
        k, s = _k(probe.maxpool)
        probe.maxpool = nn.AvgPool2d(k, s, padding=probe.maxpool.padding)
    return probe


def measure_receptive_field(model: Backbone, image_size: int = 96, max_size: int = 1024) -> int:
    """Measured RF: side of the square of input pixels with non-zero gradient for the central unit of `.local`.

    The image is enlarged (doubled) until that square no longer touches the border, so it is not clipped.
    """
    probe = _positive_copy(model)
    size = image_size
    while True:
        x = torch.rand(1, 3, size, size) + 0.5  # positive input: every ReLU is active (see above)
        x.requires_grad_(True)
        local = probe.forward_local(x)  # (1, C, n, n)
        n_h, n_w = local.shape[-2:]
        local[0, :, n_h // 2, n_w // 2].sum().backward()  # the spatially central local representation
        rows = x.grad[0].abs().sum(0).sum(1).nonzero().flatten()  # (H, W) -> image rows with non-zero grad
        cols = x.grad[0].abs().sum(0).sum(0).nonzero().flatten()
        touches = rows.min() == 0 or cols.min() == 0 or rows.max() == size - 1 or cols.max() == size - 1
        if not touches or size >= max_size:
            return int(max(rows.max() - rows.min() + 1, cols.max() - cols.min() + 1))
        size *= 2


def gradient_map(model: Backbone, image: torch.Tensor, pos: Optional[tuple[int, int]] = None) -> torch.Tensor:
    """|d local[:, i, j] / d image| summed over channels: the effective receptive field (Luo et al., 2016).

    image: (3, H, W); pos: the (row, col) of the local representation, the centre by default. Returns (H, W).
    Unlike the measured RF above this uses the network's real weights (and BN in eval mode): it shows where
    inside its RF a unit actually looks, which is the saliency map of the paper's Fig. 4 and Fig. 6.
    """
    model = model.eval()
    x = image[None].clone().requires_grad_(True)  # (3, H, W) -> (1, 3, H, W)
    local = model.forward_local(x)  # (1, C, n, n)
    i, j = pos if pos is not None else (local.shape[-2] // 2, local.shape[-1] // 2)
    local[0, :, i, j].sum().backward()
    return x.grad[0].abs().sum(0)  # (3, H, W) -> (H, W)


def _on_meta(model: nn.Module) -> bool:
    return next(model.parameters()).device.type == "meta"


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def gflops(model: Backbone, image_size: int = 224) -> float:
    """Forward GFLOPs of the backbone for one image (torch's FlopCounterMode: 2 FLOPs per multiply-add).

    Counted on the meta device: shapes only, no computation, so this is instant even for RF99-ResNet50.
    """
    from torch.utils.flop_counter import FlopCounterMode

    meta = (model if _on_meta(model) else copy.deepcopy(model).to("meta")).eval()
    counter = FlopCounterMode(display=False)
    with counter:
        meta(torch.empty(1, 3, image_size, image_size, device="meta"))
    return counter.get_total_flops() / 1e9


def local_grid(model: Backbone, image_size: int) -> int:
    """Side n of the local map for a square input of `image_size` pixels (shape inference on meta)."""
    meta = (model if _on_meta(model) else copy.deepcopy(model).to("meta")).eval()
    return meta.forward_local(torch.empty(1, 3, image_size, image_size, device="meta")).shape[-1]


# ================================================================================================
# 5. Command line: the table of presets and the receptive-field figure
# ================================================================================================


def preset_table(stems: Sequence[str] = ("imagenet", "cifar"), measure: bool = True) -> list[dict]:
    """One row per arch and stem: RF (analytic, measured), grids, parameters, GFLOPs at the stem's size."""
    rows = []
    for stem in stems:
        for arch in available_archs(stem):
            with torch.device("meta"):  # shapes only: no weight initialisation, instant
                model = build_backbone(arch, stem=stem)
                v0 = build_backbone(arch, stem=stem, mlp=False)
            rows.append({
                "arch": arch, "stem": stem,
                "rf": receptive_field(model),
                "rf_measured": measure_receptive_field(build_backbone(arch, stem=stem)) if measure else None,
                "stride": total_stride(model),
                "grid": {s: local_grid(model, s) for s in (32, 64, 224)},
                "params_m": count_parameters(model) / 1e6,
                "params_v0_m": count_parameters(v0) / 1e6,
                "gflops": gflops(model, 224 if stem == "imagenet" else 32),
            })
    return rows


def print_table(rows: list[dict]) -> None:
    head = "| arch | stem | RF (formula) | RF (measured) | stride | grid 32/64/224 | params (M) | params v0 (M) | GFLOPs |"
    print(head)
    print("|" + "---|" * (head.count("|") - 1))
    for r in rows:
        measured = "-" if r["rf_measured"] is None else r["rf_measured"]
        grid = "/".join(str(r["grid"][s]) for s in (32, 64, 224))
        size = 224 if r["stem"] == "imagenet" else 32
        print(f"| {r['arch']} | {r['stem']} | {r['rf']} | {measured} | {r['stride']} | {grid} | "
              f"{r['params_m']:.2f} | {r['params_v0_m']:.2f} | {r['gflops']:.2f} @{size} |")


def plot_receptive_fields(path: str, archs: Sequence[str], image_size: int = 224, stem: str = "imagenet") -> None:
    """Figure: for each arch, the measured RF (binary) and the effective RF (gradient map, log scale) of the
    central local representation of a randomly initialised network on a noise image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    torch.manual_seed(0)
    fig, axes = plt.subplots(2, len(archs), figsize=(3.2 * len(archs), 6.6), squeeze=False)
    for col, arch in enumerate(archs):
        model = build_backbone(arch, stem=stem)
        # Binary map: pixels with non-zero gradient in the positive probe network (the RF of Sec. 4 above).
        probe = _positive_copy(model)
        x = (torch.rand(1, 3, image_size, image_size) + 0.5).requires_grad_(True)
        local = probe.forward_local(x)
        local[0, :, local.shape[-2] // 2, local.shape[-1] // 2].sum().backward()
        support = (x.grad[0].abs().sum(0) > 0).float()
        # Effective RF: the real random network, averaged over a few noise images.
        erf = sum(gradient_map(model, torch.randn(3, image_size, image_size)) for _ in range(4))
        axes[0, col].imshow(support.numpy(), cmap="gray", vmin=0, vmax=1)  # numpy: matplotlib's own type
        axes[0, col].set_title(f"{arch}\nRF {receptive_field(model)} px (grid {local.shape[-1]})")
        axes[1, col].imshow(torch.log10(erf + erf.max() * 1e-6).numpy(), cmap="magma")
        axes[1, col].set_title("effective RF, log10 |grad|")
        for ax in axes[:, col]:
            ax.set_xticks([]), ax.set_yticks([])
    fig.suptitle(f"Receptive field of the central local representation, random init, {image_size} px input")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description="RF-ResNet presets: receptive fields, grids, sizes, FLOPs.")
    parser.add_argument("--no-measure", action="store_true", help="skip the gradient measurement of the RF (faster)")
    parser.add_argument("--stem", choices=["imagenet", "cifar", "both"], default="both", help="which presets to list")
    parser.add_argument("--plot", metavar="FILE", help="draw measured and effective receptive fields to FILE (png)")
    parser.add_argument("--plot-archs", default="resnet50,rf67_resnet50,rf99_resnet50,rf163_resnet50,rf195_resnet50",
                        help="comma-separated archs for --plot (default: the paper's Fig. 4/6 set)")
    parser.add_argument("--plot-stem", default="imagenet", choices=["imagenet", "cifar"], help="stem for --plot")
    parser.add_argument("--plot-size", type=int, default=224, help="input size in pixels for --plot")
    args = parser.parse_args()
    archs = args.plot_archs.split(",")
    for arch in archs:
        if arch not in available_archs(args.plot_stem):
            parser.error(f"unknown arch {arch!r} for stem {args.plot_stem!r}; choose from "
                         f"{', '.join(available_archs(args.plot_stem))}")
    stems = ("imagenet", "cifar") if args.stem == "both" else (args.stem,)
    print_table(preset_table(stems, measure=not args.no_measure))
    if args.plot:
        plot_receptive_fields(args.plot, archs, args.plot_size, args.plot_stem)
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()
