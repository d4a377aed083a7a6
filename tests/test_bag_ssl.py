"""bag_ssl.py: the four losses against independent formulas, the patch views and boxes, the bag-of-patch
aggregation, and the plumbing (every loss runs, outputs, --eval-only, resume, DDP, bad input).

Kept fast (~1 min on 2 CPU cores): tiny ResNet-18 runs on 16 px FakeData, in-process where a subprocess adds
nothing but start-up time."""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms as T
from PIL import Image

import bag_ssl

ROOT = Path(__file__).resolve().parents[1]
# A tiny but complete configuration: ResNet-18 (cifar stem) on 16 px FakeData (16 train / 4 val images, batch 4:
# 4 steps per epoch), 8 px patches, narrow heads.
TINY = ["--dataset", "fake", "--image-size", "16", "--fake-size", "16", "--batch-size", "4", "--epochs", "2",
        "--arch", "resnet18", "--stem", "cifar", "--patch-size", "8", "--proj-hidden", "64", "--proj-dim", "32",
        "--pred-hidden", "64", "--num-workers", "0", "--log-every", "1", "--warmup-epochs", "1",
        "--eval-patches", "1,4", "--knn-k", "5", "--linear-epochs", "5"]
# The cheapest evaluation, for runs that test something else.
NO_EVAL = ["--eval-patches", "1", "--eval-train-images", "4", "--eval-test-images", "2", "--linear-epochs", "1",
           "--knn-k", "0"]


def run_script(args, **kw):
    return subprocess.run([sys.executable, "bag_ssl.py", *args], cwd=ROOT, capture_output=True, text=True, **kw)


# ---------------------------------------------------------------------------------------------------------
# Losses against independent formulas (explicit loops)
# ---------------------------------------------------------------------------------------------------------
def test_nt_xent_matches_loop_formula():
    torch.manual_seed(0)
    n, t = 5, 0.1
    z1, z2 = torch.randn(n, 7), torch.randn(n, 7)
    z = [v / v.norm() for v in torch.cat([z1, z2])]
    total = 0.0
    for a in range(2 * n):
        pos = a + n if a < n else a - n
        den = sum(math.exp(float(z[a] @ z[k]) / t) for k in range(2 * n) if k != a)
        total += -math.log(math.exp(float(z[a] @ z[pos]) / t) / den)
    assert bag_ssl.nt_xent_loss(z1, z2, t).item() == pytest.approx(total / (2 * n), rel=1e-5)
    # identical, well-separated views: the loss goes to 0 as T -> 0
    assert bag_ssl.nt_xent_loss(torch.eye(4) * 5, torch.eye(4) * 5, 0.01).item() < 1e-6


def test_vicreg_matches_loop_formula():
    torch.manual_seed(0)
    n, d = 6, 5
    z1, z2 = torch.randn(n, d) * 0.5, torch.randn(n, d) * 2
    inv = sum(float(z1[i, k] - z2[i, k]) ** 2 for i in range(n) for k in range(d)) / (n * d)

    def var_cov(z):
        m = [sum(float(z[i, k]) for i in range(n)) / n for k in range(d)]
        c = [[sum((float(z[i, a]) - m[a]) * (float(z[i, b]) - m[b]) for i in range(n)) / (n - 1)
              for b in range(d)] for a in range(d)]
        v = sum(max(0.0, 1 - math.sqrt(c[k][k] + 1e-4)) for k in range(d)) / d
        off = sum(c[a][b] ** 2 for a in range(d) for b in range(d) if a != b) / d
        return v, off

    (v1, c1), (v2, c2) = var_cov(z1), var_cov(z2)
    var, cov = v1 / 2 + v2 / 2, c1 + c2
    loss, terms = bag_ssl.vicreg_loss(z1, z2, 25.0, 25.0, 1.0)
    assert terms["loss_inv"].item() == pytest.approx(inv, rel=1e-5)
    assert terms["loss_var"].item() == pytest.approx(var, rel=1e-5)
    assert terms["loss_cov"].item() == pytest.approx(cov, rel=1e-5)
    assert loss.item() == pytest.approx(25 * inv + 25 * var + cov, rel=1e-5)
    assert 0 < var < 1  # z1 (std 0.5) is penalised, z2 (std 2) is not


def test_tcr_matches_eigenvalue_formula():
    torch.manual_seed(0)
    n, d, lam, eps = 8, 4, 30.0, 0.2
    z1, z2 = torch.randn(n, d, dtype=torch.float64), torch.randn(n, d, dtype=torch.float64)

    def rate(z):  # 1/2 sum_i log(1 + d / (n eps) sigma_i^2): log det through the singular values of Z
        z = z / z.norm(dim=1, keepdim=True)
        return 0.5 * sum(math.log(1 + d / (n * eps) * float(s) ** 2) for s in torch.linalg.svdvals(z))

    cos = sum(float(F.cosine_similarity(z1[i], z2[i], dim=0)) for i in range(n)) / n
    loss, terms = bag_ssl.tcr_loss(z1, z2, lam, eps)
    expected_rate = 0.5 * (rate(z1) + rate(z2))
    assert terms["coding_rate"].item() == pytest.approx(expected_rate, rel=1e-4)
    assert terms["cos_views"].item() == pytest.approx(cos, rel=1e-4)
    assert loss.item() == pytest.approx(-expected_rate - lam * cos, rel=1e-4)
    # a collapsed batch (all rows equal) has a much lower coding rate than a spread one
    collapsed = torch.ones(n, d)
    assert bag_ssl.coding_rate(collapsed, eps) < bag_ssl.coding_rate(F.normalize(torch.randn(n, d), dim=1), eps)


# ---------------------------------------------------------------------------------------------------------
# Views, evaluation boxes, aggregation
# ---------------------------------------------------------------------------------------------------------
def test_patch_view_is_a_whole_patch_resized():
    # byol_view's RandomResizedCrop with scale (1, 1) never crops a square patch: it returns it whole
    rrc = T.RandomResizedCrop(14, scale=(1.0, 1.0), interpolation=T.InterpolationMode.BICUBIC)
    rng = np.random.default_rng(0)
    for _ in range(30):
        patch = Image.fromarray(rng.integers(0, 256, (14, 14, 3), dtype=np.uint8))
        assert np.array_equal(np.asarray(rrc(patch)), np.asarray(patch))
    # both views of both arms come out at the network input size
    for crop in ("patch", "multiscale"):
        args = bag_ssl.parse_args(TINY + ["--crop", crop])
        img = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
        assert [v.shape for v in bag_ssl.MultiView(args)(img)] == [(3, 16, 16)] * 2
    assert bag_ssl.parse_args(["--dataset", "fake", "--image-size", "32", "--arch", "resnet18"]).patch_size == 14


def test_eval_boxes_inside_image_right_size_and_deterministic():
    for crop in ("patch", "multiscale"):
        boxes = bag_ssl.sample_boxes(200, 32, 24, crop, 14, 0.08, bag_ssl.box_generator(0, 1, 7))
        top, left, h, w = boxes.T
        assert boxes.shape == (200, 4)
        assert (top >= 0).all() and (left >= 0).all() and (top + h <= 32).all() and (left + w <= 24).all()
        if crop == "patch":
            assert (h == 14).all() and (w == 14).all()
            assert len({(t, l) for t, l in zip(top.tolist(), left.tolist())}) > 50  # positions vary
        else:
            area = (h * w).float() / (32 * 24)
            assert area.min() >= 0.08 * 0.9 and area.max() <= 1 and len(set(h.tolist())) > 5
        again = bag_ssl.sample_boxes(200, 32, 24, crop, 14, 0.08, bag_ssl.box_generator(0, 1, 7))
        assert torch.equal(boxes, again)  # same (seed, split, image): same boxes
        other = bag_ssl.sample_boxes(200, 32, 24, crop, 14, 0.08, bag_ssl.box_generator(0, 1, 8))
        assert not torch.equal(boxes, other)
    grid = bag_ssl.grid_boxes(32, 32, 16, 4)  # Table 5: 5x5 patches of 16 px, stride 4
    assert grid.shape == (25, 4) and grid[:, 0].max() == 16 and grid[-1].tolist() == [16, 16, 16, 16]


def test_aggregation_is_the_mean_of_single_patch_embeddings():
    torch.manual_seed(0)
    backbone = bag_ssl.rf_resnet.build_backbone("resnet18", stem="cifar").eval()
    images = torch.randn(2, 3, 16, 16)
    boxes = torch.stack([bag_ssl.sample_boxes(5, 16, 16, "patch", 8, 0.08, bag_ssl.box_generator(0, 0, i))
                         for i in range(2)])  # (2, 5, 4)
    h = bag_ssl.embed_boxes(backbone, images, boxes, 16, 3, bag_ssl.nullcontext())  # chunks of 3 patches
    assert h.shape == (2, 5, 512)
    with torch.no_grad():
        for b in range(2):
            singles = []
            for t, l, ph, pw in boxes[b].tolist():
                crop = images[b:b + 1, :, t:t + ph, l:l + pw]  # the patch, then upsampled to the input size
                assert crop.shape[-2:] == (8, 8)
                singles.append(backbone(F.interpolate(crop, size=(16, 16), mode="bicubic", align_corners=False)).h)
            torch.testing.assert_close(h[b].mean(0), torch.cat(singles).mean(0), atol=1e-5, rtol=1e-4)
    assert bag_ssl.convergence_ns(16) == [1, 2, 4, 8, 16] and bag_ssl.convergence_ns(48)[-1] == 48


# ---------------------------------------------------------------------------------------------------------
# Bad input: one line, no traceback, before any work
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv,message", [
    (["--loss", "barlow"], "invalid choice: 'barlow'"),
    (["--patch-size", "40"], "--patch-size 40 must be between 1 and the image size 16"),
    (["--eval-patches", "1,x"], "--eval-patches must be comma-separated integers"),
    (["--eval-patches", "0"], "--eval-patches must be comma-separated integers"),
    (["--local-agg", "--grid-stride", "8"], "--local-agg needs a sliding grid of at least 3x3"),
    (["--min-scale", "0"], "--min-scale must be in (0, 1]"),
    (["--eval-only", "--output-dir", "/nonexistent/run"], "--eval-only needs an existing backbone.pt"),
    (["--eval-only", "--checkpoint", __file__], "is not a backbone.pt written by these scripts"),
])
def test_bad_values_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        bag_ssl.parse_args(TINY + argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and "Traceback" not in err


def test_missing_folder_is_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        bag_ssl.parse_args(["--dataset", "imagefolder", "--data-dir", str(tmp_path / "nope")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    nope = tmp_path / "nope"
    assert err.strip().splitlines()[-1].endswith(
        f"error: --dataset imagefolder needs {nope}/train/CLASS/*.jpg and {nope}/val (or test); not found")


# ---------------------------------------------------------------------------------------------------------
# Whole runs
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss", ["simclr", "vicreg", "tcr", "byol"])
def test_one_step_of_each_loss(loss):
    """One real training step (patch views of a FakeData batch, the loss, LARS, BYOL's EMA) for every loss."""
    args = bag_ssl.parse_args(TINY + ["--loss", loss])
    train, _, loader, _, _, num_classes = bag_ssl.make_loaders(args, 0, 1)
    views, labels = next(iter(loader))
    assert [v.shape for v in views] == [(4, 3, 16, 16)] * 2
    torch.manual_seed(0)
    online = bag_ssl.OnlineNetwork(args, num_classes)
    target = bag_ssl.copy.deepcopy(online.encoder).requires_grad_(False) if loss == "byol" else None
    optimizer = bag_ssl.LARS(bag_ssl.param_groups(online, args, 1.0), lr=args.lr, eta=args.lars_eta)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    before = [p.clone() for p in online.encoder.parameters()]
    total, terms, loss_probe, _ = bag_ssl.train_step(online, online, target, optimizer, scaler, views, labels, args,
                                                     0.99, bag_ssl.nullcontext())
    assert math.isfinite(total.item()) and terms.shape == (len(bag_ssl.LOSS_TERMS[loss]),)
    assert torch.isfinite(terms).all() and math.isfinite(loss_probe.item())
    if loss == "vicreg":
        assert total.item() == pytest.approx(25 * terms[0].item() + 25 * terms[1].item() + terms[2].item(), rel=1e-5)
    if loss == "tcr":
        assert total.item() == pytest.approx(-terms[0].item() - 30 * terms[1].item(), rel=1e-5)
    assert any(not torch.equal(a, b) for a, b in zip(before, online.encoder.parameters()))  # the step trained f, g
    # BYOL alone has an EMA target and a predictor; the others train a single network
    assert (online.predictor is not None) == (loss == "byol")
    if loss == "byol":
        for t, b, o in zip(target.parameters(), before, online.encoder.parameters()):
            torch.testing.assert_close(t, 0.99 * b + 0.01 * o)  # xi <- tau xi + (1 - tau) theta, xi started = theta


def test_tiny_run_outputs_and_eval_only(tmp_path):
    out = tmp_path / "run"
    proc = run_script(TINY + ["--epochs", "1", "--local-agg", "--output-dir", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]  # 16 images / batch 4
    for key in ("step", "epoch", "loss", "loss_inv", "loss_var", "loss_cov", "z_std", "lr", "img_per_s",
                "peak_mem_mb"):
        assert key in train_rows[-1]
    final = json.loads((out / "final_metrics.json").read_text())
    # The Table 1 entries: central + N patches, and Table 5's local aggregation (3x3 grid of 8 px, stride 4)
    assert set(final["eval"]) == {"central", "patches_1", "patches_4", "grid_mean", "grid_local"}
    for res in final["eval"].values():
        assert 0 <= res["linear_top1"] <= 100 and 0 <= res["knn_top1"] <= 100
    assert final["eval"]["grid_local"]["num_patches"] == 9 and final["eval"]["patches_4"]["num_patches"] == 4
    assert final["convergence"]["n"] == [1, 2, 4] and len(final["convergence"]["cosine"]) == 3
    assert -1 <= final["convergence"]["cosine_between_images"] <= 1
    assert "| Central crop | 1 patch | 4 patches |" in (out / "table1.md").read_text()
    for name in ("curves.png", "convergence.png", "checkpoint.pt"):
        assert (out / name).stat().st_size > 0
    backbone = torch.load(out / "backbone.pt", weights_only=True)
    assert set(backbone) == {"arch", "arch_kwargs", "state_dict", "args"}
    assert backbone["arch_kwargs"] == {"stem": "cifar", "mlp": None}
    net = bag_ssl.rf_resnet.build_backbone(backbone["arch"], **backbone["arch_kwargs"])
    net.load_state_dict(backbone["state_dict"])  # strict: downstream users can rebuild it

    # --eval-only on the written backbone (in-process): the geometry comes from the file, the results agree
    ev = tmp_path / "ev"
    args = bag_ssl.parse_args(["--eval-only", "--checkpoint", str(out / "backbone.pt"), "--dataset", "fake",
                               "--fake-size", "16", "--num-workers", "0", "--eval-patches", "1,4", "--knn-k", "5",
                               "--linear-epochs", "5", "--output-dir", str(ev)])
    assert (args.image_size, args.patch_size, args.crop, args.arch) == (16, 8, "patch", "resnet18")
    _, _, final_ev = bag_ssl.main(args)
    saved = json.loads((ev / "final_metrics.json").read_text())
    assert set(saved["eval"]) == {"central", "patches_1", "patches_4"} and (ev / "table1.md").exists()
    for name in saved["eval"]:  # deterministic patches and subsets: the same numbers as after training
        assert saved["eval"][name] == pytest.approx(final["eval"][name])


def _final_state(out):
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return ckpt, {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_resume_2_plus_2_equals_4(tmp_path, capsys):
    common = TINY + NO_EVAL + ["--epochs", "3", "--loss", "byol"]  # 12 steps scheduled; resume mid-epoch 0
    a, b = tmp_path / "a", tmp_path / "b"
    bag_ssl.main(bag_ssl.parse_args(common + ["--output-dir", str(a), "--max-steps", "4"]))
    bag_ssl.main(bag_ssl.parse_args(common + ["--output-dir", str(b), "--max-steps", "2"]))
    capsys.readouterr()
    bag_ssl.main(bag_ssl.parse_args(common + ["--output-dir", str(b), "--max-steps", "4"]))
    assert f"resumed from {b / 'checkpoint.pt'} at step 2" in capsys.readouterr().out
    (ca, la), (cb, lb) = _final_state(a), _final_state(b)
    assert ca["step"] == cb["step"] == 4
    assert la == lb  # the same losses at steps 1-4
    for part in ("online", "target", "optimizer"):
        flat_a, flat_b = ca[part], cb[part]
        if part == "optimizer":
            flat_a = {k: v["momentum_buffer"] for k, v in ca[part]["state"].items()}
            flat_b = {k: v["momentum_buffer"] for k, v in cb[part]["state"].items()}
        for k in flat_a:
            assert torch.equal(flat_a[k], flat_b[k]), f"{part}.{k}"


WORKER = """
import os, sys, torch
sys.path.insert(0, {root!r})
import bag_ssl
online, target, final = bag_ssl.main(bag_ssl.parse_args(sys.argv[1:]))
torch.save({{"online": online.state_dict()}}, os.path.join({out!r}, "rank%s.pt" % os.environ["RANK"]))
"""


def test_torchrun_two_processes_keep_identical_weights(tmp_path):
    out = tmp_path / "ddp"
    out.mkdir()
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(root=str(ROOT), out=str(out)))
    # VICReg: its statistics run over the global batch through gather_with_grad
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script), *TINY, *NO_EVAL, "--epochs", "1", "--max-steps", "2", "--output-dir",
                           str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = torch.load(out / "rank0.pt", weights_only=True), torch.load(out / "rank1.pt", weights_only=True)
    for k, v in r0["online"].items():
        if "running_" in k or "num_batches" in k:
            continue  # CPU/gloo: BatchNorm statistics are per process (no SyncBN), by design
        assert torch.equal(v, r1["online"][k]), f"online.{k} differs between ranks"
    assert "world size 2, per-process batch 2" in proc.stdout
    assert (out / "final_metrics.json").exists()


def test_gather_with_grad_is_the_identity_in_one_process():
    x = torch.randn(3, 4, requires_grad=True)
    assert bag_ssl.gather_with_grad(x) is x
