"""bag_ssl.py: the four losses against independent formulas, the patch views and boxes, the bag-of-patch
aggregation, and the plumbing (every loss runs, outputs, --eval-only, resume, bad input, the online k-NN,
--width, precision, CIFAR-10 from prepare_cifar10.py).

Kept fast: tiny width-8 ResNet-18 runs on 16 px FakeData, in-process where a subprocess adds
nothing but start-up time (tests/in_process.py). DDP: test_ddp.py."""
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bag_ssl
import in_process

ROOT = Path(__file__).resolve().parents[1]
# A tiny but complete configuration: a width-8 ResNet-18 (cifar stem) on 16 px FakeData (16 train / 4 val images,
# batch 4: 4 steps per epoch), 8 px patches, narrow heads.
TINY = ["--dataset", "fake", "--image-size", "16", "--fake-size", "16", "--batch-size", "4", "--epochs", "2",
        "--arch", "resnet18", "--stem", "cifar", "--patch-size", "8", "--proj-hidden", "64", "--proj-dim", "32",
        "--pred-hidden", "64", "--num-workers", "0", "--log-every", "1", "--warmup-epochs", "1",
        "--eval-patches", "1,4", "--eval-knn-k", "5", "--knn-k", "5", "--linear-epochs", "5", "--width", "8"]
# The cheapest evaluation, for runs that test something else (no k-NN at all: neither bag-of-patch nor online).
NO_EVAL = ["--eval-patches", "1", "--eval-train-images", "4", "--eval-test-images", "2", "--linear-epochs", "1",
           "--eval-knn-k", "0", "--knn-k", "0"]


def run_script(args):
    """`python bag_ssl.py ARGS`, run in this process (tests/in_process.py: no second import of torch)."""
    return in_process.run("bag_ssl.py", args)


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


def test_emp_matches_loop_formula():
    torch.manual_seed(0)
    n_views, n, d, lam, eps = 3, 8, 4, 200.0, 0.2
    zs = [torch.randn(n, d, dtype=torch.float64) * (i + 1) for i in range(n_views)]  # scale: rows are normalised

    def rate(z):  # 1/2 sum_i log(1 + d / (n eps) sigma_i^2) of the row-normalised Z
        z = z / z.norm(dim=1, keepdim=True)
        return 0.5 * sum(math.log(1 + d / (n * eps) * float(s) ** 2) for s in torch.linalg.svdvals(z))

    unit = [z / z.norm(dim=1, keepdim=True) for z in zs]
    cos = 0.0
    for b in range(n):  # each image: the cosine of each of its patches to the mean of its (unit) patches
        mean = sum(u[b] for u in unit) / n_views
        cos += sum(float(u[b] @ mean / mean.norm()) for u in unit) / n_views
    cos /= n
    expected_rate = sum(rate(z) for z in zs) / n_views
    loss, terms = bag_ssl.emp_loss(zs, lam, eps)
    assert terms["coding_rate"].item() == pytest.approx(expected_rate, rel=1e-6)
    assert terms["cos_mean"].item() == pytest.approx(cos, rel=1e-6)
    assert loss.item() == pytest.approx(-expected_rate - lam * cos, rel=1e-6)
    # n = 2 is not tcr_loss: the cosine to the mean of two unit vectors is sqrt((1 + cos(z1, z2)) / 2)
    _, tcr_terms = bag_ssl.tcr_loss(zs[0], zs[1], lam, eps)
    _, emp_terms = bag_ssl.emp_loss(zs[:2], lam, eps)
    assert emp_terms["coding_rate"].item() == pytest.approx(tcr_terms["coding_rate"].item(), rel=1e-6)
    cos_pairs = F.cosine_similarity(zs[0], zs[1], dim=1)
    assert emp_terms["cos_mean"].item() == pytest.approx(torch.sqrt((1 + cos_pairs) / 2).mean().item(), rel=1e-6)


# ---------------------------------------------------------------------------------------------------------
# Views, evaluation boxes, aggregation
# ---------------------------------------------------------------------------------------------------------
def test_patch_boxes_are_fixed_squares_at_uniform_positions():
    boxes = bag_ssl.patch_boxes(20_000, 16, 20, 14, torch.Generator().manual_seed(0))
    assert (boxes[:, 2:] == 14).all()  # every patch whole, at the fixed scale
    assert set(boxes[:, 0].tolist()) == {0, 1, 2} and set(boxes[:, 1].tolist()) == set(range(7))  # all positions
    assert abs(boxes[:, 1].mean().item() - 3.0) < 0.05  # uniform over 0..6
    # both views of both arms come out at the network input size
    images = torch.rand(3, 3, 16, 16)
    for crop in ("patch", "multiscale"):
        args = bag_ssl.parse_args(TINY + ["--crop", crop])
        views = bag_ssl.MultiView(args)(images, torch.Generator().manual_seed(0))
        assert [v.shape for v in views] == [(3, 3, 16, 16)] * 2
    assert bag_ssl.parse_args(["--dataset", "fake", "--image-size", "32", "--arch", "resnet18"]).patch_size == 14


def test_emp_views_are_n_patches_whose_first_two_are_the_two_view_pair():
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    pair, many = (bag_ssl.MultiView(bag_ssl.parse_args(TINY + extra))
                  for extra in (["--loss", "byol"], ["--loss", "emp", "--num-patches", "5"]))
    assert bag_ssl.parse_args(TINY + ["--loss", "emp"]).num_patches == 20  # the official EMP-SSL command's
    two = pair(images, torch.Generator().manual_seed(3))
    five = many(images, torch.Generator().manual_seed(3))
    assert [v.shape for v in five] == [(2, 3, 16, 16)] * 5
    assert all(torch.equal(a, b) for a, b in zip(two, five[:2]))  # same pipelines, same random draws
    assert len({v.numpy().tobytes() for v in five}) == 5  # five different patches


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
                up = F.interpolate(crop, size=(16, 16), mode="bicubic", align_corners=False, antialias=True)  # PIL's
                singles.append(backbone(up).h)
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
    (["--width", "30"], "--width must be a positive multiple of 4"),
    (["--knn-temperature", "0"], "--knn-temperature > 0"),
    (["--knn-every", "-1"], "--knn-every"),
    (["--knn-bank", "-1"], "--knn-bank"),
    (["--optimizer", "adam"], "invalid choice: 'adam'"),
    (["--loss", "vicreg", "--num-patches", "3"], "the two-view losses take exactly 2 views"),
    (["--loss", "emp", "--num-patches", "1"], "--num-patches 1"),
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


def test_missing_cifar10_without_download_names_the_offline_script(tmp_path, monkeypatch):
    """CIFAR-10 not in --data-dir and torchvision's download fails (offline): one line that says what to run."""
    def offline(*a, **kw):
        raise OSError("no network")

    monkeypatch.setattr(bag_ssl.torchvision.datasets, "CIFAR10", offline)
    args = bag_ssl.parse_args(["--dataset", "cifar10", "--data-dir", str(tmp_path), "--arch", "resnet18"])
    with pytest.raises(SystemExit) as e:
        bag_ssl.load_datasets(args, 0)
    msg = str(e.value.code)
    assert "\n" not in msg and f"run `python prepare_cifar10.py {tmp_path}`" in msg


def test_cifar10_from_the_data_scripts_layout(tmp_path):
    """prepare_cifar10.py writes torchvision's cifar-10-batches-py layout; bag_ssl.py reads it back exactly."""
    import prepare_cifar10

    rng = np.random.default_rng(0)
    xtr = rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    xte = rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)
    ytr, yte = np.arange(40) % 10, np.arange(20) % 10
    prepare_cifar10.write_batches(tmp_path, xtr, ytr, xte, yte)
    train, test = bag_ssl.CIFAR10Batches(str(tmp_path), True), bag_ssl.CIFAR10Batches(str(tmp_path), False)
    assert len(train) == 40 and len(test) == 20
    img, y = train[13]
    assert np.array_equal(np.asarray(img), xtr[13]) and y == 3  # HWC pixels and labels, in order
    assert np.array_equal(test.data, xte) and test.targets == yte.tolist()
    out = tmp_path / "run"  # and a whole tiny run on it (32 px, width 8, the cheapest evaluation)
    proc = run_script(["--dataset", "cifar10", "--data-dir", str(tmp_path), "--arch", "resnet18", "--batch-size", "8",
                       "--epochs", "1", "--max-steps", "2", "--proj-hidden", "16", "--pred-hidden", "16",
                       "--proj-dim", "8", "--num-workers", "0", "--width", "8", *NO_EVAL, "--knn-k", "5",
                       "--output-dir", str(out)])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "knn_top1" in json.loads((out / "final_metrics.json").read_text())


# ---------------------------------------------------------------------------------------------------------
# Plumbing shared with co_byol.py: precision, optimiser, warm-up
# ---------------------------------------------------------------------------------------------------------
def test_amp_auto_is_bf16_only_where_the_cpu_has_native_bf16(monkeypatch):
    cpu = torch.device("cpu")
    args = bag_ssl.parse_args(TINY)
    assert args.amp == "auto"
    monkeypatch.setattr(bag_ssl, "cpu_has_native_bf16", lambda: True)
    assert bag_ssl.amp_dtype(args, cpu) == torch.bfloat16
    monkeypatch.setattr(bag_ssl, "cpu_has_native_bf16", lambda: False)
    assert bag_ssl.amp_dtype(args, cpu) is None  # emulated bf16 is slower than fp32 (measured)
    assert bag_ssl.amp_dtype(bag_ssl.parse_args(TINY + ["--amp", "bf16"]), cpu) == torch.bfloat16  # explicit wins
    assert bag_ssl.amp_dtype(bag_ssl.parse_args(TINY + ["--amp", "off"]), cpu) is None
    assert isinstance(bag_ssl.cpu_has_native_bf16(), bool)


def test_optimizer_sgd_drops_only_the_trust_ratio_and_warmup_scales_with_epochs():
    for name, lars in (("lars", [True, False]), ("sgd", [False, False])):
        args = bag_ssl.parse_args(TINY + ["--width", "8", "--optimizer", name])
        groups = bag_ssl.make_optimizer(bag_ssl.OnlineNetwork(args), args).param_groups
        assert [g["lars"] for g in groups] == lars
        assert [g["weight_decay"] for g in groups] == [args.weight_decay, 0.0]
        assert [g["base_lr"] for g in groups] == [args.lr * args.batch_size / 256] * 2  # lr per 256, scaled
    assert bag_ssl.parse_args(["--epochs", "1000"]).warmup_epochs == 10  # App. C's 10 epochs
    assert bag_ssl.parse_args(["--epochs", "6"]).warmup_epochs == pytest.approx(0.3)  # scaled to short runs
    assert bag_ssl.parse_args(TINY).warmup_epochs == 1  # explicit wins


def test_laptop_recipe_is_co_byols_byol_recipe_with_only_the_views_changed():
    """--recipe laptop: co_byol.py's BYOL laptop values (not re-tuned), so --crop multiscale is that BYOL with the
    same crops and --crop patch changes only the views; explicit flags still win."""
    import co_byol

    lap = bag_ssl.parse_args(["--recipe", "laptop"])
    for k, v in bag_ssl.LAPTOP_RECIPE.items():
        assert getattr(lap, k) == v, k
    byol = co_byol.parse_args(["--recipe", "laptop", "--ws", "0"])
    shared = ("arch", "width", "batch_size", "epochs", "optimizer", "lr", "weight_decay", "warmup_epochs", "tau_base",
              "tau_final", "proj_hidden", "proj_dim", "pred_hidden", "image_size", "stem", "knn_k", "knn_bank")
    assert {k: getattr(lap, k) for k in shared} == {k: getattr(byol, k) for k in shared}
    assert lap.loss == "byol" and lap.crop == "patch" and lap.min_scale == byol.min_crop == 0.08
    lap = bag_ssl.parse_args(["--recipe", "laptop", "--crop", "multiscale", "--epochs", "2", "--loss", "vicreg"])
    assert (lap.crop, lap.epochs, lap.loss, lap.width) == ("multiscale", 2, "vicreg", 16)


def test_laptop_emp_recipe_is_the_measured_emp_command():
    """--recipe laptop-emp is the command of the committed EMP-SSL runs (results/bag_ssl_laptop/emp_s*): the laptop
    recipe's network, data and evaluation with EMP-SSL's loss, 20 patches, one epoch and LARS; flags still win."""
    measured = bag_ssl.parse_args(["--recipe", "laptop", "--loss", "emp", "--num-patches", "20", "--epochs", "1",
                                   "--optimizer", "lars", "--lr", "0.3", "--weight-decay", "1e-4",
                                   "--warmup-epochs", "0.05", "--output-dir", "runs/x"])
    emp = bag_ssl.parse_args(["--recipe", "laptop-emp", "--output-dir", "runs/x"])
    assert {k: v for k, v in vars(emp).items() if k not in ("recipe", "given_flags")} == \
        {k: v for k, v in vars(measured).items() if k not in ("recipe", "given_flags")}
    assert (emp.loss, emp.num_patches, emp.optimizer, emp.crop, emp.width) == ("emp", 20, "lars", "patch", 16)
    assert bag_ssl.parse_args(["--recipe", "laptop-emp", "--epochs", "2"]).epochs == 2
    assert bag_ssl.parse_args(["--recipe", "laptop-emp"]).output_dir == "runs/bag_ssl_laptop_emp"


def test_laptop_multiscale_arm_trains_bit_for_bit_what_co_byols_byol_trains(tmp_path):
    """--recipe laptop --crop multiscale and co_byol.py --recipe laptop --ws 0, same seed: the same views, the
    same networks and the same updates, so the same weights (on CPU). The committed BYOL laptop runs are then the
    multi-scale arm's training, and only the bag-of-patch evaluation of their backbones is left to run."""
    import co_byol

    small = ["--recipe", "laptop", "--dataset", "fake", "--fake-size", "16", "--batch-size", "4", "--image-size",
             "16", "--width", "8", "--epochs", "1", "--max-steps", "3", "--num-workers", "0", "--knn-k", "0"]
    bag = bag_ssl.main(bag_ssl.parse_args(small + NO_EVAL + ["--crop", "multiscale", "--output-dir", str(tmp_path / "b")]))
    byol = co_byol.main(co_byol.parse_args(small + ["--ws", "0", "--output-dir", str(tmp_path / "c")]))
    for a, b in zip(bag[:2], byol[:2]):  # the online network and the EMA target
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    b0 = torch.load(tmp_path / "b" / "backbone.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(v, torch.load(tmp_path / "c" / "backbone.pt", weights_only=True)["state_dict"][k])
               for k, v in b0.items())


# ---------------------------------------------------------------------------------------------------------
# Whole runs
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss", ["simclr", "vicreg", "tcr", "byol", "emp"])
def test_one_step_of_each_loss(loss, tmp_path):
    """One real training step (patch views of a FakeData batch, the loss, LARS, BYOL's EMA) for every loss."""
    n_views = 3 if loss == "emp" else 2
    args = bag_ssl.parse_args(TINY + ["--loss", loss, "--num-patches", str(n_views), "--output-dir", str(tmp_path)])
    loader = bag_ssl.make_loaders(args, bag_ssl.Run(args)).loader
    views, labels = next(iter(loader))
    assert [v.shape for v in views] == [(4, 3, 16, 16)] * n_views
    torch.manual_seed(0)
    online = bag_ssl.OnlineNetwork(args)
    target = bag_ssl.copy.deepcopy(online.encoder).requires_grad_(False) if loss == "byol" else None
    optimizer = bag_ssl.make_optimizer(online, args)
    before = [p.clone() for p in online.encoder.parameters()]
    run = SimpleNamespace(device=torch.device("cpu"), autocast=bag_ssl.nullcontext(),
                          scaler=torch.amp.GradScaler("cpu", enabled=False))
    nets = bag_ssl.Nets(online, target, online)
    out = bag_ssl.train_step(nets, optimizer, (views, labels), {"lr_scale": 1.0, "tau": 0.99}, args, run)
    total = out.loss
    terms = torch.stack([out.logs[k] for k in bag_ssl.LOSS_TERMS[loss]])
    assert math.isfinite(total.item()) and terms.shape == (len(bag_ssl.LOSS_TERMS[loss]),)
    assert torch.isfinite(terms).all()
    if loss == "vicreg":
        assert total.item() == pytest.approx(25 * terms[0].item() + 25 * terms[1].item() + terms[2].item(), rel=1e-5)
    if loss == "tcr":
        assert total.item() == pytest.approx(-terms[0].item() - 30 * terms[1].item(), rel=1e-5)
    if loss == "emp":
        assert total.item() == pytest.approx(-terms[0].item() - 200 * terms[1].item(), rel=1e-5)
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
                "peak_mem_mb", "train_s"):
        assert key in train_rows[-1]
    knn = [r for r in rows if "knn_top1" in r]  # the online k-NN on whole images: epoch 0 and every epoch
    assert [(r["step"], r["epoch"]) for r in knn] == [(0, 0.0), (4, 1.0)]
    assert knn[0]["train_s"] == 0 < knn[1]["train_s"]
    final = json.loads((out / "final_metrics.json").read_text())
    assert final["knn_top1_random_init"] == knn[0]["knn_top1"] and rows[-1]["knn_top1_full"] == final["knn_top1"]
    # The Table 1 entries: central + N patches, and Table 5's local aggregation (3x3 grid of 8 px, stride 4)
    assert set(final["eval"]) == {"central", "patches_1", "patches_4", "grid_mean", "grid_local"}
    for res in final["eval"].values():
        assert 0 <= res["linear_top1"] <= 100 and 0 <= res["knn_top1"] <= 100
    assert final["eval"]["grid_local"]["num_patches"] == 9 and final["eval"]["patches_4"]["num_patches"] == 4
    assert final["convergence"]["n"] == [1, 2, 4] and len(final["convergence"]["cosine"]) == 3
    assert -1 <= final["convergence"]["cosine_between_images"] <= 1
    # Table 1's layout and Fig. 3a's plot, from final_metrics.json
    report = in_process.run("results/bag_ssl_report.py", [out])
    assert report.returncode == 0, report.stderr
    table = (out / "table1.md").read_text()
    assert "| Central crop | 1 patch | 4 patches | 3x3 grid, mean | 3x3 grid, local 3x3/2 concat |" in table
    assert f"| {final['eval']['patches_4']['linear_top1']:.1f} |" in table.splitlines()[2] and table in report.stdout
    for name in ("curves.png", "convergence.png", "checkpoint.pt"):
        assert (out / name).stat().st_size > 0
    backbone = torch.load(out / "backbone.pt", weights_only=True)
    assert set(backbone) == {"arch", "arch_kwargs", "state_dict", "args"}
    assert backbone["arch_kwargs"] == {"stem": "cifar", "mlp": None, "width": 8}
    net = bag_ssl.rf_resnet.build_backbone(backbone["arch"], **backbone["arch_kwargs"])
    net.load_state_dict(backbone["state_dict"])  # strict: downstream users can rebuild it

    # --eval-only on the written backbone (in-process): the geometry comes from the file, the results agree
    ev = tmp_path / "ev"
    args = bag_ssl.parse_args(["--eval-only", "--checkpoint", str(out / "backbone.pt"), "--dataset", "fake",
                               "--fake-size", "16", "--num-workers", "0", "--eval-patches", "1,4", "--eval-knn-k",
                               "5", "--linear-epochs", "5", "--output-dir", str(ev)])
    assert (args.image_size, args.patch_size, args.crop, args.arch) == (16, 8, "patch", "resnet18")
    _, _, final_ev = bag_ssl.main(args)
    saved = json.loads((ev / "final_metrics.json").read_text())
    assert set(saved["eval"]) == {"central", "patches_1", "patches_4"}
    for name in saved["eval"]:  # deterministic patches and subsets: the same numbers as after training
        assert saved["eval"][name] == pytest.approx(final["eval"][name])

    # A backbone.pt written before --width (no "width" in arch_kwargs) still loads: build_backbone's 64
    old_kwargs = {"stem": "cifar", "mlp": None}  # this run is width 8: a width-64 network's weights stand in
    old = dict(backbone, arch_kwargs=old_kwargs,
               state_dict=bag_ssl.rf_resnet.build_backbone("resnet18", **old_kwargs).state_dict())
    torch.save(old, tmp_path / "old_backbone.pt")
    argv = ["--eval-only", "--checkpoint", str(tmp_path / "old_backbone.pt"), "--dataset", "fake", "--output-dir",
            str(tmp_path / "ev_old")]
    assert bag_ssl.parse_args(argv).width == 64  # the file's network
    with pytest.raises(SystemExit) as e:  # a flag that contradicts the file is refused, not silently replaced
        bag_ssl.parse_args(argv + ["--width", "8"])
    assert e.value.code == 2
    bag_ssl.rf_resnet.build_backbone(old["arch"], **old["arch_kwargs"]).load_state_dict(old["state_dict"])


def test_width_8_run_has_a_knn_row_every_epoch_and_rebuilds(tmp_path):
    """--width 8: a narrow network trains; the online k-NN (bank: a class-balanced subset) runs at epoch 0 and
    after every epoch with the training time so far, the final one on the whole training set; backbone.pt
    stores the width and rebuilds with rf_resnet.build_backbone."""
    out = tmp_path / "w8"
    args = bag_ssl.parse_args(TINY + NO_EVAL + ["--width", "8", "--knn-k", "5", "--knn-bank", "10",
                                                "--output-dir", str(out)])
    _, _, final = bag_ssl.main(args)  # 2 epochs of 4 steps
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    knn = [r for r in rows if "knn_top1" in r]
    assert [(r["step"], r["epoch"]) for r in knn] == [(0, 0.0), (4, 1.0), (8, 2.0)]  # epoch 0 = random network
    assert all(0 <= r["knn_top1"] <= 100 and r["knn_s"] >= 0 for r in knn)
    assert knn[0]["train_s"] == 0 < knn[1]["train_s"] < knn[2]["train_s"]  # training time, evaluations excluded
    train_s = [r["train_s"] for r in rows if "loss" in r]
    assert len(train_s) == 8 and train_s == sorted(train_s) and train_s[-1] <= knn[2]["train_s"]
    assert final["knn_top1_random_init"] == knn[0]["knn_top1"] and final["knn_top1_bank_subset"] == knn[-1]["knn_top1"]
    assert rows[-1]["knn_top1_full"] == final["knn_top1"] and 0 <= final["knn_top1"] <= 100
    assert final["train_s"] == knn[-1]["train_s"] == torch.load(out / "checkpoint.pt", weights_only=True)["train_s"]
    assert json.loads((out / "final_metrics.json").read_text())["knn_top1"] == final["knn_top1"]
    backbone = torch.load(out / "backbone.pt", weights_only=True)
    assert backbone["arch_kwargs"] == {"stem": "cifar", "mlp": None, "width": 8}
    net = bag_ssl.rf_resnet.build_backbone(backbone["arch"], **backbone["arch_kwargs"])
    net.load_state_dict(backbone["state_dict"])  # strict
    assert net.out_dim == 64


def _final_state(out):
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return ckpt, {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_resume_2_plus_2_equals_4(tmp_path, capsys):
    common = TINY + NO_EVAL + ["--epochs", "3", "--loss", "byol"]  # 12 steps scheduled; resume mid-epoch 0
    a, b = tmp_path / "a", tmp_path / "b"
    bag_ssl.main(bag_ssl.parse_args(common + ["--output-dir", str(a), "--max-steps", "4"]))
    bag_ssl.main(bag_ssl.parse_args(common + ["--output-dir", str(b), "--max-steps", "2"]))
    half_train_s = torch.load(b / "checkpoint.pt", weights_only=True)["train_s"]
    capsys.readouterr()
    bag_ssl.main(bag_ssl.parse_args(common + ["--output-dir", str(b), "--max-steps", "4"]))
    assert f"resumed from {b / 'checkpoint.pt'} at step 2" in capsys.readouterr().out
    (ca, la), (cb, lb) = _final_state(a), _final_state(b)
    assert ca["step"] == cb["step"] == 4
    assert cb["train_s"] > half_train_s > 0  # the training time of both parts, restored on resume
    assert la == lb  # the same losses at steps 1-4
    for part in ("online", "target", "optimizer"):
        flat_a, flat_b = ca[part], cb[part]
        if part == "optimizer":
            flat_a = {k: v["momentum_buffer"] for k, v in ca[part]["state"].items()}
            flat_b = {k: v["momentum_buffer"] for k, v in cb[part]["state"].items()}
        for k in flat_a:
            assert torch.equal(flat_a[k], flat_b[k]), f"{part}.{k}"


def test_gather_with_grad_is_the_identity_in_one_process():
    x = torch.randn(3, 4, requires_grad=True)
    assert bag_ssl.gather_with_grad(x) is x
