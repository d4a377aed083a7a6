"""co_dino.py: DINO's loss and centre against the official formulation, the local loss, the DINO reduction at
ws = 0, and the same plumbing tests as co_byol.py (outputs, resume, bad input; DDP: test_ddp.py)."""
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import co_dino
import in_process

ROOT = Path(__file__).resolve().parents[1]
# A tiny but complete configuration: a width-8 ResNet-18 (cifar stem) on 16 px FakeData, narrow heads, 64 prototypes.
TINY = ["--dataset", "fake", "--image-size", "16", "--fake-size", "32", "--batch-size", "8", "--epochs", "2",
        "--out-dim", "64", "--head-hidden", "32", "--bottleneck", "16", "--num-workers", "0", "--knn-k", "5",
        "--log-every", "1", "--warmup-epochs", "1", "--width", "8"]


def run_script(args):
    """`python co_dino.py ARGS`, run in this process (tests/in_process.py: no second import of torch)."""
    return in_process.run("co_dino.py", args)


class OfficialDINOLoss:
    """An independent transcription of the official DINOLoss (facebookresearch/dino, main_dino.py), one process:
    chunks of a concatenated batch, teacher centring/sharpening, pairs of different views, centre EMA."""

    def __init__(self, out_dim, ncrops, student_temp=0.1, center_momentum=0.9):
        self.student_temp, self.center_momentum, self.ncrops = student_temp, center_momentum, ncrops
        self.center = torch.zeros(1, out_dim)

    def __call__(self, student_output, teacher_output, temp):
        student_out = (student_output / self.student_temp).chunk(self.ncrops)
        teacher_out = F.softmax((teacher_output - self.center) / temp, dim=-1).detach().chunk(2)
        total_loss, n_loss_terms = 0, 0
        for iq, q in enumerate(teacher_out):
            for v in range(len(student_out)):
                if v == iq:
                    continue
                loss = torch.sum(-q * F.log_softmax(student_out[v], dim=-1), dim=-1)
                total_loss += loss.mean()
                n_loss_terms += 1
        total_loss /= n_loss_terms
        batch_center = torch.sum(teacher_output, dim=0, keepdim=True) / len(teacher_output)
        self.center = self.center * self.center_momentum + batch_center * (1 - self.center_momentum)
        return total_loss


def test_dino_loss_and_center_match_official_over_steps():
    torch.manual_seed(0)
    B, K, ncrops = 4, 32, 6  # 2 global + 4 small crops
    official = OfficialDINOLoss(K, ncrops)
    center = torch.zeros(1, K)
    for step in range(5):
        temp = 0.04 + 0.005 * step
        student = [torch.randn(B, K) * 3 for _ in range(ncrops)]
        teacher = [torch.randn(B, K) * 3 + step for _ in range(2)]  # drifting logits: the centre matters
        ours = co_dino.dino_loss(student, teacher, center, 0.1, temp)
        ref = official(torch.cat(student), torch.cat(teacher), temp)
        torch.testing.assert_close(ours, ref)
        center = co_dino.update_center(center, torch.cat(teacher), 0.9)
        torch.testing.assert_close(center, official.center)


def test_local_dino_loss_matches_explicit_sum():
    torch.manual_seed(0)
    B, K, n, Ts, Tt = 2, 8, 3, 0.1, 0.05
    s_l, t_l, s_g, t_g = torch.randn(B, K, n, n), torch.randn(B, K, n, n), torch.randn(B, K), torch.randn(B, K)
    c, c_l = torch.randn(1, K), torch.randn(1, K)
    s_l.requires_grad_(), s_g.requires_grad_()

    def H(teacher_logits, center, student_logits):  # cross-entropy of one pair of K-vectors
        p_t = torch.softmax((teacher_logits - center.flatten()) / Tt, dim=0)
        return -(p_t * torch.log_softmax(student_logits / Ts, dim=0)).sum()

    total = 0.0
    for b in range(B):
        for i in range(n):
            for j in range(n):
                total += H(t_g[b], c, s_l[b, :, i, j]) + H(t_l[b, :, i, j], c_l, s_g[b])
    expected = total / (B * n * n)
    loss = co_dino.local_dino_loss(s_l, t_l, s_g, t_g, c, c_l, Ts, Tt)
    torch.testing.assert_close(loss, expected)
    # the same gradients too (the loss averages over the cells before its products: a rewrite of the same sum)
    grads = torch.autograd.grad(loss, (s_l, s_g))
    for got, want in zip(grads, torch.autograd.grad(expected, (s_l, s_g))):
        torch.testing.assert_close(got, want)


def test_no_gradient_into_teacher_outputs():
    torch.manual_seed(0)
    s = [torch.randn(2, 8, requires_grad=True) for _ in range(2)]
    t = [torch.randn(2, 8, requires_grad=True) for _ in range(2)]
    s_l, t_l = torch.randn(2, 8, 2, 2, requires_grad=True), torch.randn(2, 8, 2, 2, requires_grad=True)
    zero = torch.zeros(1, 8)
    (co_dino.dino_loss(s, t, zero, 0.1, 0.04)
     + co_dino.local_dino_loss(s_l, t_l, s[0], t[1], zero, zero, 0.1, 0.04)).backward()
    assert all(x.grad is None for x in t) and t_l.grad is None
    assert s_l.grad.abs().sum() > 0 and s[0].grad.abs().sum() > 0


def _models(ws_values, extra=()):
    nets = []
    for ws in ws_values:
        args = co_dino.parse_args(TINY + ["--ws", str(ws), *extra])
        torch.manual_seed(0)
        nets.append((args, co_dino.StudentNetwork(args)))
    return nets


def test_ws0_is_exactly_dino_loss_and_gradients():
    (args, co), (_, dino) = _models([0.5, 0.0])
    assert not any("local" in name for name, _ in dino.named_parameters())  # no local head at ws = 0
    dino.load_state_dict(co.state_dict(), strict=False)
    teacher = co.encoder
    torch.manual_seed(1)
    views = [torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)]
    with torch.no_grad():
        t_out = [teacher(v) for v in views]
    c = torch.randn(1, 64)
    _, loss_g, _ = co_dino.co_dino_loss(co(views, local_views=2), t_out, c, c, 0.1, 0.04, ws=0.5)
    loss_dino, _, loss_l0 = co_dino.co_dino_loss(dino(views, local_views=2), t_out, c, c, 0.1, 0.04, ws=0.0)
    torch.testing.assert_close(loss_dino, loss_g)
    assert loss_l0.item() == 0.0
    o = dino(views, local_views=2)
    manual = co_dino.dino_loss([x.logits_g for x in o], [x.logits_g for x in t_out], c, 0.1, 0.04)
    torch.testing.assert_close(loss_dino, manual)
    co.zero_grad(), dino.zero_grad()
    loss_g.backward()
    loss_dino.backward()
    for (name, a), b in zip(dino.encoder.backbone.named_parameters(), co.encoder.backbone.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_dino_head_prototypes_are_unit_vectors_and_local_head_is_positionwise():
    (args, net), = _models([0.2])
    head, local = net.encoder.head, net.encoder.local_head
    w = head.last_layer.weight  # (K, bottleneck): weight-normalised, norm fixed to 1
    torch.testing.assert_close(w.norm(dim=1), torch.ones(64))
    x = torch.randn(3, net.encoder.backbone.out_dim, 2, 2).contiguous(memory_format=torch.channels_last)
    local.eval()
    out = co_dino.per_position(local, x)  # (3, K, 2, 2)
    assert out.shape == (3, 64, 2, 2)
    # the local head is one MLP applied to each position's vector on its own (a 1x1 convolution)
    for i, j, k in ((1, 0, 1), (2, 1, 0)):
        torch.testing.assert_close(out[i, :, j, k], local(x[i:i + 1, :, j, k])[0], rtol=1e-4, atol=1e-5)
    # and the logits arrive K-contiguous, so the local loss reads them cell-major without a copy
    assert out.flatten(2).transpose(1, 2).is_contiguous()


def test_local_head_runs_on_the_two_large_views_only():
    """The local loss pairs the two large views (co_dino_loss), so the small crops of multi-crop never go through the
    local head: no local logits to compute, and none to backpropagate."""
    (args, net), = _models([0.2])
    large = [torch.randn(2, 3, 32, 32) for _ in range(2)]
    outs = net(large + [torch.randn(2, 3, 16, 16)] * 2, local_views=2)  # as train_step
    assert [o.logits_l is not None for o in outs] == [True, True, False, False]
    assert all(o.logits_g.shape == (2, args.out_dim) for o in outs)


def test_collapse_monitors():
    K = 16
    uniform = co_dino.collapse_monitors(torch.zeros(8, K), torch.zeros(1, K), 0.04)
    assert uniform[0].item() == pytest.approx(math.log(K), rel=1e-5)  # every output uniform: max entropy
    assert uniform[1].item() == pytest.approx(0.0, abs=1e-5)
    one_hot = torch.zeros(8, K)
    one_hot[:, 3] = 10.0  # every image on prototype 3
    dominant = co_dino.collapse_monitors(one_hot, torch.zeros(1, K), 0.04)
    assert dominant[0].item() == pytest.approx(0.0, abs=1e-3)
    assert dominant[1].item() == pytest.approx(math.log(K), rel=1e-3)


def test_teacher_temperature_schedule():
    assert co_dino.teacher_temp_at(0, 0.04, 0.07, 30) == pytest.approx(0.04)
    assert co_dino.teacher_temp_at(29, 0.04, 0.07, 30) == pytest.approx(0.07)  # np.linspace(0.04, 0.07, 30)[-1]
    assert co_dino.teacher_temp_at(10, 0.04, 0.07, 30) == pytest.approx(0.04 + 0.03 * 10 / 29)
    assert co_dino.teacher_temp_at(100, 0.04, 0.07, 30) == pytest.approx(0.07)


def test_train_step_freezes_prototypes_updates_centres_and_ema():
    (args, student), = _models([0.2])
    teacher = co_dino.copy.deepcopy(student.encoder).requires_grad_(False)
    opt = co_dino.make_optimizer(student, args)
    last = [p.clone() for p in student.encoder.head.last_layer.parameters()]
    t0 = [p.clone() for p in teacher.parameters()]
    views = [torch.randint(0, 256, (4, 3, 16, 16), dtype=torch.uint8) for _ in range(2)]  # as from the loader
    labels = torch.randint(0, 10, (4,))
    run = SimpleNamespace(device=torch.device("cpu"), autocast=co_dino.nullcontext(),
                          scaler=torch.amp.GradScaler("cpu", enabled=False))
    nets = co_dino.Nets(student, teacher, co_dino.Centers(64), student, co_dino.co_dino_loss)
    schedule = {"lr_scale": 1.0, "tau": 0.9, "teacher_temp": 0.04, "freeze_last_layer": True}
    out = co_dino.train_step(nets, opt, (views, labels), schedule, args, run)
    assert isinstance(out, co_dino.StepOut) and set(out.logs) >= {"loss_global", "loss_local"}
    c, c_l = nets.centers.center, nets.centers.local_center
    for a, b in zip(last, student.encoder.head.last_layer.parameters()):
        assert torch.equal(a, b)  # prototypes frozen in the first epoch
    assert c.abs().sum() > 0 and c_l.abs().sum() > 0 and not torch.equal(c, c_l)  # two separate centres
    for a, t, s in zip(t0, teacher.parameters(), student.encoder.parameters()):
        torch.testing.assert_close(t, 0.9 * a + 0.1 * s)  # EMA of the parameters


@pytest.mark.parametrize("argv,message", [
    (["--ws", "-1"], "--ws must be >= 0 (0 trains DINO)"),
    (["--arch", "vit_s"], "unknown --arch 'vit_s'"),
    (["--local-grid", "9"], "larger than the 3x3 local map"),
    (["--teacher-temp", "0"], "temperatures must be > 0"),
])
def test_bad_values_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        co_dino.parse_args(TINY + argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_each_method_keeps_its_own_crop_and_warmup_scales():
    assert co_dino.parse_args(TINY + ["--ws", "0"]).min_crop == 0.08  # the DINO baseline's (solo-learn CIFAR)
    assert co_dino.parse_args(TINY + ["--ws", "0.2"]).min_crop == 0.2  # CO-SSL's c_min
    assert co_dino.parse_args(["--epochs", "6"]).warmup_epochs == pytest.approx(0.3)


def test_tiny_run_writes_all_outputs(tmp_path):
    out = tmp_path / "run"
    proc = run_script(TINY + ["--width", "16", "--output-dir", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 9))
    for key in ("step", "epoch", "loss", "loss_global", "loss_local", "lr", "tau", "teacher_temp",
                "teacher_entropy", "teacher_kl_uniform", "img_per_s", "peak_mem_mb"):
        assert key in train_rows[-1]
    r = train_rows[-1]
    assert r["loss"] == pytest.approx(r["loss_global"] + 0.2 * r["loss_local"], rel=1e-5)
    knn = [r for r in rows if "knn_top1" in r]
    assert [(r["step"], r["epoch"]) for r in knn] == [(0, 0.0), (4, 1.0), (8, 2.0)]  # epoch 0 = random network
    assert knn[0]["train_s"] == 0 < knn[1]["train_s"] < knn[2]["train_s"]
    final = json.loads((out / "final_metrics.json").read_text())
    assert final["step"] == 8 and "knn_top1" in final and final["knn_top1_random_init"] == knn[0]["knn_top1"]
    backbone = torch.load(out / "backbone.pt", weights_only=True)
    assert backbone["arch_kwargs"]["width"] == 16
    import rf_resnet
    rf_resnet.build_backbone(backbone["arch"], **backbone["arch_kwargs"]).load_state_dict(backbone["state_dict"])
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    for k, v in backbone["state_dict"].items():  # backbone.pt is the TEACHER backbone
        assert torch.equal(v, ckpt["teacher"]["backbone." + k])
    assert ckpt["centers"]["center"].shape == ckpt["centers"]["local_center"].shape == (1, 64)
    assert (out / "curves.png").stat().st_size > 0


def test_resume_2_plus_2_equals_4(tmp_path):
    common = TINY + ["--epochs", "3", "--knn-k", "0"]
    a, b = tmp_path / "a", tmp_path / "b"
    assert run_script(common + ["--output-dir", str(a), "--max-steps", "4"]).returncode == 0
    assert run_script(common + ["--output-dir", str(b), "--max-steps", "2"]).returncode == 0
    proc = run_script(common + ["--output-dir", str(b), "--max-steps", "4"])
    assert proc.returncode == 0 and "resumed from" in proc.stdout
    ca, cb = (torch.load(d / "checkpoint.pt", weights_only=True) for d in (a, b))
    la, lb = ({r["step"]: r["loss"] for r in map(json.loads, (d / "metrics.jsonl").read_text().splitlines())
               if "loss" in r} for d in (a, b))
    assert ca["step"] == cb["step"] == 4 and la == lb
    assert torch.equal(ca["centers"]["center"], cb["centers"]["center"]) and torch.equal(ca["centers"]["local_center"], cb["centers"]["local_center"])
    for part in ("student", "teacher"):
        for k in ca[part]:
            assert torch.equal(ca[part][k], cb[part][k]), f"{part}.{k}"


def test_rf_resnet_run_at_64px_with_multicrop(tmp_path):
    out = tmp_path / "rf"
    proc = run_script(["--dataset", "fake", "--image-size", "64", "--fake-size", "8", "--batch-size", "4",
                       "--arch", "rf49_resnet18", "--out-dim", "64", "--head-hidden", "32", "--bottleneck", "16",
                       "--num-workers", "0", "--max-steps", "2", "--epochs", "1", "--small-crops", "2",
                       "--knn-k", "0", "--output-dir", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "local map 9x9" in proc.stdout
    assert json.loads((out / "final_metrics.json").read_text())["step"] == 2


def test_head_bn_and_norm_last_layer_flags():
    """--head-bn puts BatchNorm after the two hidden layers (global and local heads); without it the head is the
    official one (no BatchNorm, same parameter names); --norm-last-layer false trains the prototype norms."""
    plain = co_dino.parse_args(TINY + ["--ws", "0.2"])
    bn = co_dino.parse_args(TINY + ["--ws", "0.2", "--head-bn", "--norm-last-layer", "false"])
    enc_plain, enc_bn = co_dino.Encoder(plain), co_dino.Encoder(bn)
    for head, kind in ((enc_bn.head, torch.nn.BatchNorm1d), (enc_bn.local_head, torch.nn.BatchNorm1d)):
        assert sum(isinstance(m, kind) for m in head.mlp) == 2
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in enc_plain.head.mlp.modules())
    assert [n for n, _ in enc_plain.head.named_parameters()] == [
        "mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias", "mlp.4.weight", "mlp.4.bias",
        "last_layer.parametrizations.weight.original0", "last_layer.parametrizations.weight.original1"]
    g = lambda enc: enc.head.last_layer.parametrizations.weight.original0.requires_grad  # noqa: E731
    assert not g(enc_plain) and g(enc_bn)
    out = enc_bn(torch.randn(4, 3, 16, 16))
    assert out.logits_g.shape == (4, 64) and out.logits_l.shape[:2] == (4, 64)


def test_laptop_recipe_defaults_and_explicit_flags_win():
    lap = co_dino.parse_args(["--recipe", "laptop"])
    for k, v in co_dino.LAPTOP_RECIPE.items():
        assert getattr(lap, k) == v, k
    assert lap.min_crop == 0.2 and co_dino.parse_args(["--recipe", "laptop", "--ws", "0"]).min_crop == 0.08
    assert lap.warmup_teacher_temp_epochs == 0  # CIFAR: T_t constant from the start (solo-learn)
    lap = co_dino.parse_args(["--recipe", "laptop", "--teacher-temp", "0.07", "--epochs", "2"])
    assert (lap.teacher_temp, lap.epochs, lap.head_bn) == (0.07, 2, True)  # flags given explicitly still win


def test_compile_compiles_the_loss_that_train_step_calls(tmp_path, monkeypatch):
    """--compile compiles the network and the loss (PERF: the compiler fuses the local softmaxes), and
    train_step computes its loss through nets.loss_fn, so the compiled loss is the one trained with. A recording
    stand-in replaces torch.compile (a real compile takes about a minute on a CPU)."""
    compiled = []
    monkeypatch.setattr(co_dino.torch, "compile", lambda fn: compiled.append(fn) or fn)
    args = co_dino.parse_args(TINY + ["--ws", "0.2", "--compile", "--output-dir", str(tmp_path)])
    run = co_dino.Run(args)
    loader = co_dino.make_loaders(args, run).loader
    nets, optimizer = co_dino.build_training(args, run)
    assert nets.loss_fn is co_dino.co_dino_loss and compiled == [nets.model, co_dino.co_dino_loss]
    calls = []
    nets.loss_fn = lambda *a: calls.append(len(a)) or co_dino.co_dino_loss(*a)
    co_dino.train_step(nets, optimizer, next(iter(loader)), co_dino.Schedule(args, 4)(0), args, run)
    assert calls == [7]
