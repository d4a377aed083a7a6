"""eval_linear.py: corruptions, masking, PGD and the analysis against their definitions; a full tiny evaluation
of a co_byol.py backbone; bad checkpoints and mismatched data refused with one line."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import eval_linear as ev
import in_process
import rf_resnet

ROOT = Path(__file__).resolve().parents[1]


def run_eval(args):
    """`python eval_linear.py ARGS`, run in this process (tests/in_process.py: no second import of torch)."""
    return in_process.run("eval_linear.py", args)


def smooth_images(b=4, size=32, seed=0):
    """Natural-looking test images: upsampled low-resolution noise in [0.1, 0.9], on the 1/255 grid."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(b, 3, size // 4, size // 4, generator=g)
    x = F.interpolate(low, size=size, mode="bilinear", align_corners=False) * 0.8 + 0.1
    return torch.round(x * 255) / 255


# ---------------------------------------------------------------------------------------------------------
# (a) Corruptions
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("params,size", [("cifar", 32), ("tiny", 64), ("imagenet", 48)])
def test_corruptions_keep_shape_and_range_and_grow_with_severity(params, size):
    x = smooth_images(size=size)
    for name in ev.CORRUPTIONS:
        dist = []
        for s in range(1, 6):
            out = ev.corrupt(x, name, s, params, torch.Generator().manual_seed(s))
            assert out.shape == x.shape and out.dtype == torch.float32
            assert out.min() >= 0 and out.max() <= 1
            assert torch.allclose(out * 255, torch.round(out * 255), atol=1e-3)  # 1/255 steps, like the datasets
            dist.append((out - x).abs().mean().item())
        assert dist[4] > dist[0] > 0, (name, dist)
        if name.endswith("noise") or name == "zoom_blur":  # these parameters grow strictly with severity
            assert dist == sorted(dist), (name, dist)


def test_noise_corruptions_match_their_definitions():
    x = torch.full((2, 3, 32, 32), 0.5)
    g = torch.Generator().manual_seed(0)
    diff = ev.corrupt(x, "gaussian_noise", 5, "cifar", g) - x  # N(0, 0.10^2), quantised down by < 1/255
    assert diff.std().item() == pytest.approx(0.10, rel=0.05)
    shot = ev.corrupt(x, "shot_noise", 5, "cifar", g)  # Poisson(0.5 * 50) / 50: mean 0.5, std sqrt(0.5 / 50)
    assert shot.std().item() == pytest.approx((0.5 / 50) ** 0.5, rel=0.08)
    imp = ev.corrupt(x, "impulse_noise", 5, "cifar", g)  # 7 % of the values set to 0 or 1
    changed = imp != torch.floor(x * 255) / 255  # the untouched values are only quantised
    assert changed.float().mean().item() == pytest.approx(0.07, abs=0.01)
    assert set(imp[changed].unique().tolist()) == {0.0, 1.0}


def test_blurs_keep_constant_images_and_glass_blur_only_moves_pixels():
    x = torch.full((2, 3, 32, 32), 100 / 255)
    for name in ("defocus_blur", "motion_blur", "zoom_blur", "glass_blur"):
        for s in (1, 5):  # normalised kernels: a constant image stays (up to quantisation)
            assert (ev.corrupt(x, name, s, "cifar") - x).abs().max() <= 1.01 / 255, name
    assert abs(ev._disk(3, 0.1).sum().item() - 1) < 1e-5  # the defocus kernel sums to one
    # CIFAR severity 1: sigma 0.05 is below half a pixel (no blur), so glass blur only moves pixel values.
    y = smooth_images()
    out = ev.corrupt(y, "glass_blur", 1, "cifar", torch.Generator().manual_seed(0))
    assert (out != y).any()
    colours = {tuple(p) for p in (y[0].flatten(1).T * 255).round().tolist()}
    assert {tuple(p) for p in (out[0].flatten(1).T * 255).round().tolist()} <= colours  # no new colour


def test_glass_blur_pixel_loop_is_the_originals_numpy_copy_not_a_swap():
    """ImageNet-C writes `x[h, w], x[h', w'] = x[h', w'], x[h, w]` on a numpy array: run exactly that line with
    the same random offsets and compare."""
    import numpy as np

    delta, iterations, size = 1, 2, 12
    img = torch.randint(0, 256, (1, 3, size, size), generator=torch.Generator().manual_seed(1)).float()
    ours = ev._glass_shuffle(img.clone(), delta, iterations, torch.Generator().manual_seed(7))
    x = img[0].permute(1, 2, 0).numpy().astype(np.uint8)  # (H, W, 3), as the original's array
    gen = torch.Generator().manual_seed(7)
    for _ in range(iterations):
        for h in range(size - delta, delta, -1):
            for w in range(size - delta, delta, -1):
                dx, dy = torch.randint(-delta, delta, (2, 1), generator=gen)[:, 0].tolist()
                h_prime, w_prime = h + dy, w + dx
                x[h, w], x[h_prime, w_prime] = x[h_prime, w_prime], x[h, w]  # the original's line, verbatim
    assert np.array_equal(ours[0].permute(1, 2, 0).numpy().astype(np.uint8), x)


def test_zoom_factors_are_numpy_arange():
    import numpy as np

    assert len(ev.CORRUPTION_PARAMS["cifar"]["zoom_blur"][0]) == 7  # np.arange(1, 1.06, 0.01) has 7 values
    assert len(ev.CORRUPTION_PARAMS["imagenet"]["zoom_blur"][4]) == 11  # np.arange(1, 1.31, 0.03)
    for stop, step in [(1.06, 0.01), (1.26, 0.01), (1.26, 0.02), (1.31, 0.03)]:  # bit for bit, not to 1e-15
        assert ev._arange(stop, step) == np.arange(1, stop, step).tolist()
    assert ev.params_for(32) == "cifar" and ev.params_for(64) == "tiny" and ev.params_for(224) == "imagenet"


# ---------------------------------------------------------------------------------------------------------
# (b) Internal masking and (c) PGD
# ---------------------------------------------------------------------------------------------------------
def test_masked_pool_drop0_is_average_pooling_and_keeps_the_right_count():
    local = torch.randn(3, 8, 5, 5)
    assert torch.allclose(ev.masked_pool(local, 0.0), local.mean(dim=(2, 3)), atol=1e-6)
    one_hot = torch.eye(25).view(25, 5, 5)[None].repeat(4, 1, 1, 1)  # position p has channel p = 1
    for drop in ev.MASK_DROPS:
        pooled = ev.masked_pool(one_hot, drop, torch.Generator().manual_seed(1))  # (4, 25)
        keep = max(1, round((1 - drop) * 25))
        assert ((pooled > 0).sum(1) == keep).all()  # exactly `keep` positions, averaged with equal weights
        assert torch.allclose(pooled[pooled > 0], torch.tensor(1 / keep))


def test_pgd_stays_in_the_ball_and_raises_the_loss():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 10))
    x, y = torch.rand(16, 3, 8, 8), torch.randint(10, (16,))
    for eps, steps, start in ((0.03, 5, False), (0.1, 1, True), (0.003, 5, True)):
        x_adv = ev.pgd_attack(model, x, y, eps, eps / 4, steps, random_start=start)
        assert (x_adv - x).abs().max() <= eps + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1
        if not start:
            assert F.cross_entropy(model(x_adv), y) > F.cross_entropy(model(x), y) + 1e-3
    # one step without random start is FGSM: x + step * sign(grad), clipped to [0, 1]
    xr = x.clone().requires_grad_(True)
    F.cross_entropy(model(xr), y).backward()
    fgsm = (x + 0.01 * xr.grad.sign()).clamp(0, 1)
    assert torch.allclose(ev.pgd_attack(model, x, y, 0.01, 0.01, 1, random_start=False), fgsm)


# ---------------------------------------------------------------------------------------------------------
# Analysis
# ---------------------------------------------------------------------------------------------------------
def test_local_similarities_against_loops():
    torch.manual_seed(0)
    local, h = torch.randn(6, 4, 3, 3), torch.randn(6, 5)
    res = ev.local_similarities(local, h, pairs=40, seed=0)
    z = F.normalize(local.flatten(2).transpose(1, 2), dim=2)  # (6, 9, 4)
    intra = [torch.stack([z[m, a] @ z[m, b] for a in range(9) for b in range(9) if a != b]).mean() for m in range(6)]
    assert res["intra_local_cos"] == pytest.approx(torch.stack(intra).mean().item(), abs=1e-5)
    # identical local maps in every image: the cross-image mean over all k x k position pairs counts the k
    # same-position pairs (cosine 1) and the k (k - 1) others (the intra-image mean): inter = (1 + (k-1) intra) / k
    same = local[:1].repeat(6, 1, 1, 1)
    r2 = ev.local_similarities(same, same.mean((2, 3)), pairs=40, seed=0)
    assert r2["inter_local_cos"] == pytest.approx((1 + 8 * r2["intra_local_cos"]) / 9, abs=1e-5)
    a, b = torch.randn(50), torch.randn(50)
    assert ev.pearson(a, 3 * a + 0.5 * b) == pytest.approx(torch.corrcoef(torch.stack([a, 3 * a + 0.5 * b]))[0, 1].item(),
                                                          abs=1e-5)


def test_erf_of_bounded_rf_network_is_within_its_rf():
    net = ev.Normalized(rf_resnet.build_backbone("rf29_resnet18", stem="cifar")).eval()
    res = ev.erf_sizes(net, torch.rand(2, 3, 48, 48))
    assert 0 < res["erf32_px"] <= res["erf5_px"] <= 29  # never wider than the 29 px receptive field
    assert len(res["_maps"]) == 4 and res["_maps"][0].shape == (48, 48)


# ---------------------------------------------------------------------------------------------------------
# Loading backbones; whole runs; bad input
# ---------------------------------------------------------------------------------------------------------
def test_swin_backbone_format_round_trips(tmp_path):
    swin = ev.SwinBackbone()
    assert all(k.startswith(("features.", "norm.")) for k in swin.state_dict())
    torch.save({"arch": "swin_t", "arch_kwargs": {}, "state_dict": swin.state_dict(), "args": {}}, tmp_path / "b.pt")
    loaded, _ = ev.load_backbone(str(tmp_path / "b.pt"))
    x = torch.rand(1, 3, 64, 64)
    out = loaded(x)
    assert out.local.shape == (1, 768, 2, 2) and torch.equal(out.h, out.pooled)
    assert torch.allclose(out.h, swin.eval()(x).h)
    feats = ev.Normalized(loaded).features(x, layers=True)
    assert feats["layer3"].shape == (1, 384)


def test_full_tiny_evaluation_of_a_co_byol_backbone(tmp_path):
    run = tmp_path / "byol"
    proc = in_process.run("co_byol.py", ["--dataset", "fake", "--image-size", "16", "--fake-size", "16",
                                         "--batch-size", "8", "--epochs", "1", "--proj-hidden", "16", "--pred-hidden",
                                         "16", "--proj-dim", "8", "--num-workers", "0", "--knn-k", "0", "--width",
                                         "16", "--output-dir", run])
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = tmp_path / "eval"
    common = ["--checkpoint", str(run / "backbone.pt"), "--dataset", "fake", "--fake-size", "16", "--batch-size",
              "8", "--num-workers", "0", "--output-dir", str(out)]
    proc = run_eval(common + ["--epochs", "2", "--knn", "--layers", "--robustness", "--analysis",
                              "--corruptions", "gaussian_noise,zoom_blur", "--analysis-images", "4",
                              "--analysis-pairs", "20", "--erf-images", "1"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["arch_kwargs"]["width"] == 16  # the narrow network was rebuilt from backbone.pt
    assert res["environment"]["torch"] == torch.__version__ and res["environment"]["precision"] == "float32"
    assert set(res["linear"]) == {"final (.h)", "patch (.pooled = layer4)", "layer3"}
    assert 0 <= res["knn"]["top1"] <= 100 and res["args"]["image_size"] == 16  # the checkpoint's size
    rob = res["robustness"]
    assert set(rob["corruptions"]) == {"gaussian_noise", "zoom_blur"} and rob["images"] == 4
    assert len(rob["corruptions"]["zoom_blur"]["severity"]) == 5 and list(rob["masking"]) == ["0.5", "0.6", "0.7",
                                                                                              "0.8", "0.9"]
    assert [(p["eps"], p["steps"]) for p in rob["pgd"]] == [(e, s) for e, _, s in ev.PGD_SETTINGS]
    assert {"intra_local_cos", "inter_local_cos", "global_local_pearson", "erf5_px", "erf32_px"} <= set(res["analysis"])
    for f in ("results.md", "robustness.png", "analysis.png", "eval_checkpoint.pt"):
        assert (out / f).stat().st_size > 0
    assert "| final (.h) |" in proc.stdout
    # a 3 x 3 map: 50 % and 60 % masking keep the same 4 cells, which the run says and results.json records
    assert rob["masking_kept"] == {"0.5": 4, "0.6": 4, "0.7": 3, "0.8": 2, "0.9": 1} and "note: on a 3x3" in proc.stdout
    # Masking alone (one forward pass per image): no corruptions, no PGD; a part that does not exist is refused.
    only = ["--epochs", "1", "--precompute", "--robustness", "--robustness-parts", "masking"]
    proc = run_eval([a if a != str(out) else str(tmp_path / "masking") for a in common] + only)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rob = json.loads((tmp_path / "masking" / "results.json").read_text())["robustness"]
    assert rob["corruptions"] == {} and rob["pgd"] == [] and list(rob["masking"]) == ["0.5", "0.6", "0.7", "0.8", "0.9"]
    assert "| dropped | 0 % | 50 % |" in (tmp_path / "masking" / "results.md").read_text()
    proc = run_eval(common + only[:-1] + ["masking,fgsm"])
    assert proc.returncode == 2 and "--robustness-parts takes" in proc.stderr.strip().splitlines()[-1]
    # A longer run in the same folder resumes the probe after its 2 finished epochs.
    proc = run_eval(common + ["--epochs", "3", "--precompute"])
    assert proc.returncode == 1 and "another evaluation (different layers, precompute)" in proc.stderr
    proc = run_eval(common + ["--epochs", "3", "--layers"])
    assert proc.returncode == 0 and "resumed from" in proc.stdout and "at epoch 2" in proc.stdout
    assert [h["epoch"] for h in json.loads((out / "results.json").read_text())["probe_history"]] == [1, 2, 3]


def _one_line(proc, code, text):
    assert proc.returncode == code and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert len(proc.stderr.strip().splitlines()) == 1 or proc.stderr.strip().splitlines()[-1].startswith("eval_")
    assert text in proc.stderr.strip().splitlines()[-1]


def test_bad_checkpoints_and_mismatched_data_are_one_line(tmp_path):
    (tmp_path / "junk.pt").write_text("not a torch file")
    torch.save({"online": {}, "step": 3}, tmp_path / "checkpoint.pt")  # a training checkpoint, not backbone.pt
    torch.save({"arch": "resnet999", "arch_kwargs": {"stem": "cifar"}, "state_dict": {}, "args": {}}, tmp_path / "a.pt")
    b = rf_resnet.build_backbone("resnet18", stem="imagenet")
    torch.save({"arch": "resnet18", "arch_kwargs": {"stem": "imagenet", "mlp": None}, "state_dict": b.state_dict(),
                "args": {"image_size": 224}}, tmp_path / "r18.pt")
    cases = [(["--checkpoint", str(tmp_path / "nope.pt")], 2, "does not exist"),
             (["--checkpoint", str(tmp_path / "junk.pt")], 1, "cannot read"),
             (["--checkpoint", str(tmp_path / "checkpoint.pt")], 1, "is not a backbone.pt"),
             (["--checkpoint", str(tmp_path / "a.pt"), "--dataset", "fake"], 1, "cannot rebuild arch"),
             (["--checkpoint", str(tmp_path / "r18.pt"), "--dataset", "cifar10"], 1,
              "trained on 224 px images but cifar10 images are 32 px"),
             (["--checkpoint", str(tmp_path / "r18.pt"), "--corruptions", "fog"], 2, "unknown corruption")]
    for argv, code, text in cases:
        _one_line(run_eval(argv), code, text)
