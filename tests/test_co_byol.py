"""co_byol.py: the equations of the paper, the BYOL reduction, EMA, and the plumbing (outputs, resume; DDP:
test_ddp.py)."""
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import co_byol
import in_process

ROOT = Path(__file__).resolve().parents[1]
# A tiny but complete configuration: a width-8 ResNet-18 (cifar stem) on 16 px FakeData with narrow heads (3x3 local
# map): a few seconds per run.
TINY = ["--dataset", "fake", "--image-size", "16", "--fake-size", "32", "--batch-size", "8", "--epochs", "2",
        "--proj-hidden", "32", "--pred-hidden", "32", "--proj-dim", "16", "--num-workers", "0", "--knn-k", "5",
        "--log-every", "1", "--warmup-epochs", "1", "--width", "8"]


def run_script(args):
    """`python co_byol.py ARGS`, run in this process (tests/in_process.py: no second import of torch)."""
    return in_process.run("co_byol.py", args)


# ---------------------------------------------------------------------------------------------------------
# Loss equations against independent formulas
# ---------------------------------------------------------------------------------------------------------
def test_byol_loss_is_eq1():
    torch.manual_seed(0)
    p, z = torch.randn(6, 16), torch.randn(6, 16)
    # 2 - 2 cos(p, z) = || p/|p| - z/|z| ||^2 (BYOL's normalised MSE), mean over the batch
    expected = ((p / p.norm(dim=1, keepdim=True) - z / z.norm(dim=1, keepdim=True)) ** 2).sum(1).mean()
    torch.testing.assert_close(co_byol.byol_loss(p, z), expected)
    assert co_byol.byol_loss(p, 3 * p).item() == pytest.approx(0.0, abs=1e-6)  # aligned vectors: zero loss


def test_local_global_loss_is_eq2():
    torch.manual_seed(0)
    B, D, n = 3, 8, 4
    p_l, z_l, p_g, z_g = torch.randn(B, D, n, n), torch.randn(B, D, n, n), torch.randn(B, D), torch.randn(B, D)
    cos = torch.nn.CosineSimilarity(dim=0)
    total = 0.0
    for b in range(B):  # the double sum of Eq. 2, position by position
        for i in range(n):
            for j in range(n):
                total += (2 - 2 * cos(p_l[b, :, i, j], z_g[b])) + (2 - 2 * cos(p_g[b], z_l[b, :, i, j]))
    expected = total / (B * n * n)
    torch.testing.assert_close(co_byol.local_global_loss(p_l, z_l, p_g, z_g), expected)


def test_no_gradient_flows_into_targets():
    torch.manual_seed(0)
    p_l = torch.randn(2, 8, 3, 3, requires_grad=True)
    p_g = torch.randn(2, 8, requires_grad=True)
    z_l = torch.randn(2, 8, 3, 3, requires_grad=True)
    z_g = torch.randn(2, 8, requires_grad=True)
    (co_byol.byol_loss(p_g, z_g) + co_byol.local_global_loss(p_l, z_l, p_g, z_g)).backward()
    assert z_l.grad is None and z_g.grad is None  # sg(.) on every target
    assert p_l.grad.abs().sum() > 0 and p_g.grad.abs().sum() > 0


def _models(ws_values, **overrides):
    nets = []
    for ws in ws_values:
        args = co_byol.parse_args(TINY + ["--ws", str(ws)] + [x for kv in overrides.items() for x in kv])
        torch.manual_seed(0)
        nets.append((args, co_byol.OnlineNetwork(args)))
    return nets


def test_ws0_is_exactly_byol_loss_and_gradients():
    (_, co), (_, byol) = _models([0.5, 0.0])
    assert not any("local" in name for name, _ in byol.named_parameters())  # no local head exists at ws=0
    byol.load_state_dict(co.state_dict(), strict=False)  # same backbone, g1, q1
    target = co.encoder  # any fixed target network will do for the comparison
    torch.manual_seed(1)
    views = [torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)]
    with torch.no_grad():
        t_out = [target(v) for v in views]
    # CO-BYOL's global part, and BYOL's total loss, on the same weights and views
    _, loss_g, _ = co_byol.co_byol_loss(co(views, local_views=2), t_out, ws=0.5)
    loss_byol, loss_g0, loss_l0 = co_byol.co_byol_loss(byol(views, local_views=2), t_out, ws=0.0)
    torch.testing.assert_close(loss_byol, loss_g)
    assert loss_l0.item() == 0.0
    # ... equal to Eq. 1 applied in both directions, and with equal gradients on the backbone
    o = byol(views, local_views=2)
    manual = co_byol.byol_loss(o[0].p_g, t_out[1].z_g) + co_byol.byol_loss(o[1].p_g, t_out[0].z_g)
    torch.testing.assert_close(loss_byol, manual)
    co.zero_grad(), byol.zero_grad()
    loss_g.backward()
    loss_byol.backward()
    for (name, a), b in zip(byol.encoder.backbone.named_parameters(), co.encoder.backbone.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_local_heads_run_on_the_two_large_views_only():
    """Eq. 2 pairs the two large views, so the small crops of multi-crop never go through g2 and q2 (train_step
    passes local_views=2): no local projection to compute, and none to backpropagate."""
    (_, net), = _models([0.2])
    outs = net([torch.randn(2, 3, 16, 16)] * 2 + [torch.randn(2, 3, 8, 8)] * 2, local_views=2)
    assert [o.z_l is not None and o.p_l is not None for o in outs] == [True, True, False, False]
    assert all(o.p_g is not None for o in outs)


def test_local_grid_downsamples_before_local_heads():
    (_, net), = _models([0.2], **{"--local-grid": "2"})
    out = net([torch.randn(2, 3, 16, 16)], local_views=1)[0]
    assert out.z_l.shape == (2, 16, 2, 2) and out.p_l.shape == (2, 16, 2, 2)


def test_local_grid_keeps_a_subset_of_the_local_representations():
    """Table 5's n^2 < full map: original local representations (the centres of a k x k partition), not
    averages of neighbours; k = n keeps the map, k = 1 the centre."""
    local = torch.randn(2, 5, 14, 14)
    sub = co_byol.local_subset(local, 2)
    assert torch.equal(sub, local[:, :, [3, 10]][:, :, :, [3, 10]])
    assert torch.equal(co_byol.local_subset(local, 14), local)
    assert torch.equal(co_byol.local_subset(local, 1)[:, :, 0, 0], local[:, :, 7, 7])
    assert not torch.allclose(sub, F.adaptive_avg_pool2d(local, 2))  # --local-grid-mode pool: another thing


def test_ema_update_parameters_not_buffers():
    (_, a), (_, b) = _models([0.2, 0.2])
    target, online = a.encoder, b.encoder
    with torch.no_grad():
        for p in online.parameters():
            p.add_(torch.randn_like(p))
        for m in online.modules():  # make the online BN statistics differ too
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.add_(1.0)
    before_p = [p.clone() for p in target.parameters()]
    before_b = [buf.clone() for buf in target.buffers()]
    co_byol.ema_update(target, online, tau=0.9)
    for t0, t1, o in zip(before_p, target.parameters(), online.parameters()):
        torch.testing.assert_close(t1, 0.9 * t0 + 0.1 * o)
    for b0, b1 in zip(before_b, target.buffers()):
        assert torch.equal(b0, b1)  # BN buffers are not averaged (the target keeps its own statistics)


def test_schedules():
    assert co_byol.tau_at(0, 100, 0.99, 1.0) == pytest.approx(0.99)
    assert co_byol.tau_at(100, 100, 0.99, 1.0) == pytest.approx(1.0)
    assert co_byol.tau_at(50, 100, 0.99, 1.0) == pytest.approx(0.995)
    assert co_byol.lr_at(9, 100, 10, 2.0) == pytest.approx(2.0)  # end of warm-up
    assert co_byol.lr_at(55, 100, 10, 2.0) == pytest.approx(1.0)  # cosine half-way
    assert co_byol.lr_at(100, 100, 10, 2.0) == pytest.approx(0.0)


def test_lars_step_matches_formula():
    w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    w.grad = torch.tensor([0.3, 0.0])
    opt = co_byol.LARS([dict(params=[w], lr=0.5, weight_decay=0.1, lars=True)], lr=0.5, eta=0.02)
    opt.step()
    trust = min(0.02 * 5.0 / (0.3 + 0.1 * 5.0 + 1e-8) / 0.5, 1.0)  # eta |w| / (|g| + wd |w|), clipped by lr
    expected = torch.tensor([3.0, 4.0]) - 0.5 * trust * (torch.tensor([0.3, 0.0]) + 0.1 * torch.tensor([3.0, 4.0]))
    torch.testing.assert_close(w.detach(), expected)


def test_lars_equals_the_per_tensor_loop_over_steps():
    """The _foreach LARS equals the per-tensor formula with momentum, over several steps: mixed shapes, a zero
    tensor (trust 1), a plain-SGD group with weight decay, a tensor whose first gradient comes late."""
    torch.manual_seed(0)
    shapes = [(4, 3, 3, 3), (8, 4), (5,), (2, 2)]
    make = lambda: [torch.nn.Parameter(torch.randn(s)) for s in shapes]  # noqa: E731
    ours, ref = make(), make()
    for a, b in zip(ours, ref):
        b.data.copy_(a.data)
    ours[3].data.zero_(), ref[3].data.zero_()

    def groups(ps):
        return [dict(params=[ps[0], ps[1], ps[3]], lr=0.4, weight_decay=1e-3, lars=True),
                dict(params=[ps[2]], lr=0.4, weight_decay=5e-4, lars=False)]

    opt = co_byol.LARS(groups(ours), lr=0.4, eta=0.02)
    bufs = {}
    for step in range(4):
        grads = [torch.randn(s) for s in shapes]
        for i, (a, b) in enumerate(zip(ours, ref)):
            a.grad = None if (i == 1 and step == 0) else grads[i].clone()  # tensor 1: first gradient at step 1
            b.grad = a.grad
        opt.step()
        for g in groups(ref):  # the formula, one tensor at a time
            for w in g["params"]:
                if w.grad is None:
                    continue
                d = w.grad + g["weight_decay"] * w.data
                if g["lars"]:
                    pn, gn = w.data.norm(), w.grad.norm()
                    trust = 0.02 * pn / (gn + g["weight_decay"] * pn + 1e-8) / g["lr"]
                    d = d * (min(float(trust), 1.0) if pn > 0 and gn > 0 else 1.0)
                bufs[id(w)] = d.clone() if id(w) not in bufs else 0.9 * bufs[id(w)] + d
                w.data -= g["lr"] * bufs[id(w)]
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a.data, b.data, rtol=1e-5, atol=1e-6)


def test_knn_top1_is_weighted_vote_of_the_k_nearest():
    torch.manual_seed(0)
    train_f = F.normalize(torch.randn(50, 8), dim=1)
    train_y, test_f = torch.randint(0, 3, (50,)), F.normalize(torch.randn(7, 8), dim=1)
    test_y, k, T = torch.randint(0, 3, (7,)), 5, 0.1
    correct = 0
    for q, y in zip(test_f, test_y):  # one query at a time, by hand
        sims = [(float(q @ f), int(c)) for f, c in zip(train_f, train_y)]
        votes = [0.0] * 3
        for sim, c in sorted(sims, reverse=True)[:k]:
            votes[c] += math.exp(sim / T)
        correct += int(max(range(3), key=votes.__getitem__) == int(y))
    assert co_byol.knn_top1(train_f, train_y, test_f, test_y, k, T, 3) == pytest.approx(100 * correct / 7)
    # a training image is its own nearest neighbour: k = 1 on the training set is 100 %
    assert co_byol.knn_top1(train_f, train_y, train_f, train_y, 1, T, 3) == 100.0


def test_linear_readout_fits_frozen_features():
    """linear_top1: 100 % on linearly separable features (any scale and offset), chance on random labels,
    the same number twice (deterministic), and it does not need torch's grad mode to be on."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 4, generator=g)
    x_tr, x_te = torch.randn(2000, 16, generator=g), torch.randn(500, 16, generator=g)
    y_tr, y_te = (x_tr @ w).argmax(1), (x_te @ w).argmax(1)  # 4 classes split by hyperplanes
    x_tr, x_te = 1000 * x_tr + 5, 1000 * x_te + 5
    with torch.no_grad():
        acc = co_byol.linear_top1(x_tr, y_tr, x_te, y_te, 4)
    assert co_byol.linear_top1(x_tr, y_tr, x_tr, y_tr, 4) == 100  # fitted to convergence
    assert acc >= 96 and acc == co_byol.linear_top1(x_tr, y_tr, x_te, y_te, 4)
    shuffled = y_tr[torch.randperm(2000, generator=g)]
    assert co_byol.linear_top1(x_tr, shuffled, x_te, y_te, 4) < 40  # chance: 25 %


def test_knn_bank_is_class_balanced_and_fixed():
    labels = [i % 10 for i in range(1000)][::-1]
    bank = co_byol.per_class(labels, 10, 10)
    assert bank == co_byol.per_class(labels, 10, 10) and len(bank) == 100
    assert sorted(labels[i] for i in bank) == sorted(list(range(10)) * 10)
    assert bank == sorted(bank) and bank[:10] == list(range(10))  # the first images of each class


def test_amp_auto_is_bf16_only_where_the_cpu_has_native_bf16(monkeypatch):
    cpu = torch.device("cpu")
    args = co_byol.parse_args(TINY)
    assert args.amp == "auto"
    monkeypatch.setattr(co_byol, "cpu_has_native_bf16", lambda: True)
    assert co_byol.amp_dtype(args, cpu) == torch.bfloat16
    monkeypatch.setattr(co_byol, "cpu_has_native_bf16", lambda: False)
    assert co_byol.amp_dtype(args, cpu) is None  # emulated bf16 is slower than fp32 (measured)
    assert co_byol.amp_dtype(co_byol.parse_args(TINY + ["--amp", "bf16"]), cpu) == torch.bfloat16  # explicit wins
    assert co_byol.amp_dtype(co_byol.parse_args(TINY + ["--amp", "off"]), cpu) is None
    assert isinstance(co_byol.cpu_has_native_bf16(), bool)


def test_each_method_keeps_its_own_crop_and_the_laptop_recipe_defaults():
    assert co_byol.parse_args(TINY + ["--ws", "0"]).min_crop == 0.08  # BYOL's
    assert co_byol.parse_args(TINY + ["--ws", "0.2"]).min_crop == 0.2  # CO-SSL's c_min (paper Sec. 4)
    assert co_byol.parse_args(TINY + ["--ws", "0", "--min-crop", "0.3"]).min_crop == 0.3  # explicit wins
    assert co_byol.parse_args(["--epochs", "1000"]).warmup_epochs == 10  # solo-learn's 10 epochs
    assert co_byol.parse_args(["--epochs", "6"]).warmup_epochs == pytest.approx(0.3)  # scaled to short runs
    lap = co_byol.parse_args(["--recipe", "laptop"])
    for k, v in co_byol.RECIPES["laptop"].items():
        assert getattr(lap, k) == v, k
    lap = co_byol.parse_args(["--recipe", "laptop", "--width", "32", "--epochs", "2"])
    assert (lap.width, lap.epochs, lap.optimizer) == (32, 2, "sgd")  # flags given explicitly still win


# ---------------------------------------------------------------------------------------------------------
# Bad input: one line, no traceback, before any work
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv,message", [
    (["--ws", "-1"], "need --ws >= 0"),
    (["--arch", "resnet99"], "unknown --arch 'resnet99'"),
    (["--local-grid", "9"], "larger than the 3x3 local map"),
    (["--min-crop", "0"], "0 < --min-crop <= 1"),
    (["--width", "30"], "--width must be a positive multiple of 4"),
    (["--knn-temperature", "0"], "--knn-temperature > 0"),
    (["--small-crop-size", "-1"], "--small-crop-size 0 (3/7 of --image-size) or >= 8"),
    (["--small-crop-size", "5"], "--small-crop-size 0 (3/7 of --image-size) or >= 8"),
])
def test_bad_values_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        co_byol.parse_args(TINY + argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_batch_not_divisible_by_world_size(capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(SystemExit):
        co_byol.parse_args(TINY)  # --batch-size 8 on 3 processes
    assert "divisible by the world size 3" in capsys.readouterr().err


def test_missing_folder_and_no_download_are_one_line(tmp_path):
    proc = run_script(["--dataset", "imagefolder", "--data-dir", str(tmp_path / "nope")])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("co_byol.py: error: --dataset imagefolder needs")
    # CIFAR-10 is not in tmp_path and this machine has no network: torchvision's download fails, and the one
    # line says which script writes the data offline
    proc = run_script(["--dataset", "cifar10", "--data-dir", str(tmp_path), "--output-dir", str(tmp_path / "o")])
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert f"run `python prepare_cifar10.py {tmp_path}`" in proc.stderr.strip().splitlines()[-1]


# ---------------------------------------------------------------------------------------------------------
# Whole runs
# ---------------------------------------------------------------------------------------------------------
def test_tiny_run_writes_all_outputs(tmp_path):
    out = tmp_path / "run"
    proc = run_script(TINY + ["--output-dir", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 9))  # 32 images / batch 8 = 4 steps x 2 epochs
    for key in ("step", "epoch", "loss", "loss_global", "loss_local", "lr", "tau", "img_per_s", "peak_mem_mb"):
        assert key in train_rows[-1]
    r = train_rows[-1]
    assert r["loss"] == pytest.approx(r["loss_global"] + 0.2 * r["loss_local"], rel=1e-5)  # Eq. 3
    knn = [r for r in rows if "knn_top1" in r]
    assert [(r["step"], r["epoch"]) for r in knn] == [(0, 0.0), (4, 1.0), (8, 2.0)]  # epoch 0 = random network
    assert all(0 <= r["knn_top1"] <= 100 and 0 <= r["linear_top1"] <= 100 and r["knn_s"] >= 0 for r in knn)
    assert knn[0]["train_s"] == 0 < knn[1]["train_s"] < knn[2]["train_s"]  # training time, evaluations excluded
    final = json.loads((out / "final_metrics.json").read_text())
    assert final["step"] == 8 and "knn_top1" in final
    assert final["knn_top1_random_init"] == knn[0]["knn_top1"] and rows[-1]["knn_top1_full"] == final["knn_top1"]
    assert final["linear_top1_random_init"] == knn[0]["linear_top1"] and final["linear_top1_bank_subset"] == knn[-1]["linear_top1"]
    assert rows[-1]["linear_top1_full"] == final["linear_top1"]
    env = rows[0]["environment"]  # the first row: where the run ran (issue 39)
    assert rows[0]["step"] == 0 and env["torch"] == torch.__version__ and env["threads"] == torch.get_num_threads()
    assert env["precision"] in ("float32", "bfloat16") and env["cpu"] and env["commit"]
    assert final["environment"] == [{"from_step": 0, **env}]
    assert final["wall_s"] >= final["train_s"] + final["eval_s"] and final["eval_s"] == pytest.approx(
        sum(r["knn_s"] for r in rows if "knn_s" in r))
    backbone = torch.load(out / "backbone.pt", weights_only=True)
    assert set(backbone) == {"arch", "arch_kwargs", "state_dict", "args"}
    import rf_resnet
    net = rf_resnet.build_backbone(backbone["arch"], **backbone["arch_kwargs"])
    net.load_state_dict(backbone["state_dict"])  # strict: downstream users can rebuild it
    assert (out / "curves.png").stat().st_size > 0 and (out / "checkpoint.pt").exists()


def _final_state(out):
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return ckpt, {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_resume_2_plus_2_equals_4(tmp_path):
    common = TINY + ["--epochs", "3", "--knn-k", "0"]  # 12 steps scheduled; 4 run; resume mid-epoch 1
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_script(common + ["--output-dir", str(a), "--max-steps", "4"]).returncode == 0
    assert run_script(common + ["--output-dir", str(b), "--max-steps", "2"]).returncode == 0
    proc = run_script(common + ["--output-dir", str(b), "--max-steps", "4"])
    assert proc.returncode == 0 and "resumed from" in proc.stdout
    (ca, la), (cb, lb) = _final_state(a), _final_state(b)
    assert ca["step"] == cb["step"] == 4
    assert la == lb  # the same losses at steps 1-4
    for part in ("online", "target"):
        for k in ca[part]:
            assert torch.equal(ca[part][k], cb[part][k]), f"{part}.{k}"


def test_cifar10_from_the_data_scripts_layout(tmp_path):
    """prepare_cifar10.py writes torchvision's cifar-10-batches-py layout; co_byol.py reads it back exactly."""
    import numpy as np

    import prepare_cifar10

    rng = np.random.default_rng(0)
    xtr, xte = rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8), rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)
    ytr, yte = np.arange(40) % 10, np.arange(20) % 10
    prepare_cifar10.write_batches(tmp_path, xtr, ytr, xte, yte)
    assert prepare_cifar10.have_batches(tmp_path)
    train, test = co_byol.CIFAR10Batches(str(tmp_path), True), co_byol.CIFAR10Batches(str(tmp_path), False)
    assert len(train) == 40 and len(test) == 20
    img, y = train[13]
    assert np.array_equal(np.asarray(img), xtr[13]) and y == 3  # HWC pixels and labels, in order
    assert np.array_equal(test.data, xte) and test.targets == yte.tolist()
    out = tmp_path / "run"  # and a whole tiny run on it
    proc = run_script(["--dataset", "cifar10", "--data-dir", str(tmp_path), "--batch-size", "8", "--epochs", "1",
                       "--proj-hidden", "16", "--pred-hidden", "16", "--proj-dim", "8", "--num-workers", "0",
                       "--width", "8", "--knn-k", "5", "--max-steps", "2", "--output-dir", str(out)])
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_nan_between_log_steps_never_reaches_a_checkpoint(tmp_path, monkeypatch):
    """A loss that turns NaN between two log steps stops the run before the next checkpoint write, with one
    line; the last good checkpoint (end of epoch 1) stays the newest one, and a stale .tmp is cleaned up."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.tmp").write_bytes(b"half a file from a killed write")
    real_step, calls = co_byol.train_step, []

    def poisoned_step(*a, **kw):
        out = real_step(*a, **kw)
        calls.append(1)
        if len(calls) == 6:  # step 6 of 8, not a log step
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(co_byol, "train_step", poisoned_step)
    args = co_byol.parse_args(TINY + ["--log-every", "100", "--knn-k", "0", "--output-dir", str(out)])
    with pytest.raises(SystemExit) as e:
        co_byol.main(args)
    assert "non-finite loss or weights by step" in str(e.value) and "is kept" in str(e.value)
    assert len(calls) == 8  # the epoch ran to its end: the guard cost no host sync per step
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 4 and not (out / "checkpoint.tmp").exists()
    assert all(torch.isfinite(v).all() for v in ckpt["online"].values() if v.is_floating_point())


def test_rf_resnet_run_at_64px(tmp_path):
    out = tmp_path / "rf"
    proc = run_script(["--dataset", "fake", "--image-size", "64", "--fake-size", "8", "--batch-size", "4",
                       "--arch", "rf49_resnet18", "--proj-hidden", "32", "--pred-hidden", "32", "--proj-dim", "16",
                       "--num-workers", "0", "--max-steps", "2", "--epochs", "1", "--local-grid", "4",
                       "--knn-k", "0", "--output-dir", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "local map 9x9" in proc.stdout  # rf49 at 64 px (stem padding 2: 66 px) has a 9x9 map
    assert json.loads((out / "final_metrics.json").read_text())["step"] == 2
