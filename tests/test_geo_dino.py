"""geo_dino.py: cell centres, the geometric and similarity matchings and the local loss against independent
formulas and explicit loops, the box-tracking crops against the pixels they contain, the DINO reduction with
--local-loss none, the Swin-T backbone.pt format, and the plumbing (outputs, per-epoch k-NN, --width, CIFAR-10
from prepare_cifar10.py's layout, resume, bad input; DDP: test_ddp.py)."""
import json
import math
from contextlib import nullcontext
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import geo_dino
import in_process
import rf_resnet

ROOT = Path(__file__).resolve().parents[1]
# A tiny but complete configuration: a width-8 ResNet-18 (cifar stem) on 16 px FakeData (3x3 map) with 2 small 8 px
# crops (2x2 map), narrow heads, 64 prototypes; 8 images / batch 4 = 2 steps per epoch.
TINY = ["--dataset", "fake", "--image-size", "16", "--local-crop-size", "8", "--local-crops", "2",
        "--fake-size", "8", "--batch-size", "4", "--epochs", "2", "--out-dim", "64", "--head-hidden", "64",
        "--bottleneck", "32", "--num-workers", "0", "--knn-k", "5", "--log-every", "1", "--warmup-epochs", "1",
        "--width", "8"]


def run_script(args):
    """`python geo_dino.py ARGS`, run in this process (tests/in_process.py: no second import of torch)."""
    return in_process.run("geo_dino.py", args)


def centre_by_hand(box, flipped, grid, row, col):
    """Independent formula: split the box into grid x grid tiles; a flipped crop shows column col at the
    mirrored tile grid - 1 - col."""
    x0, y0, x1, y1 = [float(v) for v in box]
    tile = grid - 1 - col if flipped else col
    return x0 + (tile + 0.5) * (x1 - x0) / grid, y0 + (row + 0.5) * (y1 - y0) / grid


def random_boxes(n, size=40.0):
    xy = torch.rand(n, 2) * size * 0.6
    wh = 4 + torch.rand(n, 2) * size * 0.4
    return torch.cat([xy, xy + wh], dim=1)  # (n, 4) = (x0, y0, x1, y1)


# ---------------------------------------------------------------------------------------------------------
# Geometry: cell centres and matchings
# ---------------------------------------------------------------------------------------------------------
def test_cell_centers_against_formula_including_flip():
    torch.manual_seed(0)
    boxes, flips = random_boxes(5), torch.tensor([False, True, False, True, True])
    for grid in (2, 3, 5):
        got = geo_dino.cell_centers(boxes, flips, grid)  # (5, grid*grid, 2)
        assert got.shape == (5, grid * grid, 2)
        for b in range(5):
            for row in range(grid):
                for col in range(grid):
                    expected = centre_by_hand(boxes[b], bool(flips[b]), grid, row, col)
                    torch.testing.assert_close(got[b, row * grid + col], torch.tensor(expected))  # row-major
    # a worked example: a 30 px box at the origin, 3x3 cells of 10 px; flipping reverses each row
    plain = geo_dino.cell_centers(torch.tensor([0.0, 0, 30, 30]), torch.tensor(False), 3)
    assert plain[:3, 0].tolist() == [5.0, 15.0, 25.0] and plain[::3, 1].tolist() == [5.0, 15.0, 25.0]
    flipped = geo_dino.cell_centers(torch.tensor([0.0, 0, 30, 30]), torch.tensor(True), 3)
    torch.testing.assert_close(flipped[:3, 0], torch.tensor([25.0, 15.0, 5.0]))
    torch.testing.assert_close(flipped[:, 1], plain[:, 1])
    diag = geo_dino.cell_diagonal(torch.tensor([0.0, 0, 30, 60]), 3)
    assert diag.item() == pytest.approx(math.hypot(10, 20))


def test_geometric_matching_against_brute_force():
    torch.manual_seed(1)
    boxes, flips = random_boxes(8), torch.rand(8) < 0.5
    pos_s, pos_t = geo_dino.cell_centers(boxes[:4], flips[:4], 2), geo_dino.cell_centers(boxes[4:], flips[4:], 3)
    d_s, d_t = geo_dino.cell_diagonal(boxes[:4], 2), geo_dino.cell_diagonal(boxes[4:], 3)
    index, valid = geo_dino.geometric_matching(pos_s, pos_t, d_s, d_t)  # (4, 4), (4, 4)
    for b in range(4):
        s = max(d_s[b].item(), d_t[b].item()) / 2
        for k in range(4):
            dists = [math.dist(pos_s[b, k].tolist(), pos_t[b, j].tolist()) for j in range(9)]
            assert dists[index[b, k]] == pytest.approx(min(dists), abs=1e-4)
            assert bool(valid[b, k]) == (min(dists) < s)
    assert valid.any() and not valid.all()  # the random pairs contain both kinds

    # identical crops: every cell matches itself; the same crop flipped: the mirrored cell (still valid)
    box = torch.tensor([3.0, 4.0, 27.0, 31.0])
    pos = geo_dino.cell_centers(box, torch.tensor(False), 3)
    diag = geo_dino.cell_diagonal(box, 3)
    index, valid = geo_dino.geometric_matching(pos, pos, diag, diag)
    assert index.tolist() == list(range(9)) and valid.all()
    index, valid = geo_dino.geometric_matching(geo_dino.cell_centers(box, torch.tensor(True), 3), pos, diag, diag)
    assert index.tolist() == [2, 1, 0, 5, 4, 3, 8, 7, 6] and valid.all()

    # crops that do not overlap: no valid match at all
    far = torch.tensor([40.0, 40.0, 70.0, 70.0])
    _, valid = geo_dino.geometric_matching(geo_dino.cell_centers(far, torch.tensor(False), 3), pos,
                                           geo_dino.cell_diagonal(far, 3), diag)
    assert not valid.any()

    # the threshold s = max(diag, diag') / 2 is strict: just below is valid, just above is not
    teacher = torch.tensor([[0.0, 0.0]])
    for dist, expected in ((4.99, True), (5.01, False)):
        _, valid = geo_dino.geometric_matching(torch.tensor([[dist, 0.0]]), teacher, torch.tensor(6.0),
                                               torch.tensor(10.0))
        assert valid.item() == expected


def test_similarity_matching_against_brute_force():
    torch.manual_seed(2)
    fs, ft = torch.randn(3, 4, 6), torch.randn(3, 9, 6)
    index = geo_dino.similarity_matching(fs, ft)
    for b in range(3):
        for k in range(4):
            cos = [F.cosine_similarity(fs[b, k], ft[b, j], dim=0).item() for j in range(9)]
            assert index[b, k].item() == max(range(9), key=lambda j: cos[j])
    assert geo_dino.similarity_matching(ft, 5 * ft).tolist() == [list(range(9))] * 3  # scale-invariant


# ---------------------------------------------------------------------------------------------------------
# The crops carry their true box and flip
# ---------------------------------------------------------------------------------------------------------
def test_crop_pixels_agree_with_box_and_flip():
    """An image whose pixels encode their own coordinates (red = x, green = y): after MultiView's crop and flip
    (colours left alone), every pixel must show the original coordinate that the returned box and flip predict,
    and the mean over each feature-map cell must be that cell's centre from cell_centers."""
    W, H, S, grid = 200, 120, 24, 3
    xs, ys = torch.arange(W).view(1, W).expand(H, W), torch.arange(H).view(H, 1).expand(H, W)
    img = torch.stack([xs, ys, torch.zeros_like(xs)]).float() / 255  # (3, H, W)
    args = geo_dino.parse_args(TINY + ["--image-size", str(S), "--global-crop-scale", "0.05", "1"])
    view = geo_dino.MultiView(args)
    view.specs = [spec._replace(jitter_p=0.0, gray_p=0.0, blur_p=0.0, solarize_p=0.0) for spec in view.specs[:1]]
    crops, boxes, flips = view(img.expand(12, 3, H, W), torch.Generator().manual_seed(0))
    assert flips[:, 0].any() and not flips[:, 0].all()
    for crop, box, flipped in zip(crops[0], boxes[:, 0], flips[:, 0]):
        x0, y0, x1, y1 = box.tolist()
        assert 0 <= x0 < x1 <= W and 0 <= y0 < y1 <= H
        px = crop.permute(1, 2, 0) * 255  # (S, S, 3): (row, col, RGB)
        u = torch.arange(S, dtype=torch.float32)
        col_in_box = (S - 1 - u) if flipped else u  # a flipped crop shows column u of the box at S - 1 - u
        exp_x = x0 + (col_in_box + 0.5) * (x1 - x0) / S - 0.5  # pixel index whose centre is there
        exp_y = y0 + (u + 0.5) * (y1 - y0) / S - 0.5
        inner = slice(2, S - 2)  # interpolation clamps at the border
        assert (px[inner, inner, 0] - exp_x[inner].view(1, -1)).abs().max() <= 1.0
        assert (px[inner, inner, 1] - exp_y[inner].view(-1, 1)).abs().max() <= 1.0
        # cell means (in continuous coordinates, + 0.5) against cell_centers
        cell_means = px[..., :2].reshape(grid, S // grid, grid, S // grid, 2).mean((1, 3)) + 0.5
        centres = geo_dino.cell_centers(box, flipped, grid).view(grid, grid, 2)
        assert (cell_means - centres).abs().max() <= 1.0


def test_multiview_returns_boxes_and_flips():
    args = geo_dino.parse_args(TINY + ["--local-crops", "3"])
    crops, boxes, flips = geo_dino.MultiView(args)(torch.full((7, 3, 30, 40), 0.5), torch.Generator())
    assert [tuple(c.shape) for c in crops] == [(7, 3, 16, 16)] * 2 + [(7, 3, 8, 8)] * 3
    assert boxes.shape == (7, 5, 4) and flips.shape == (7, 5) and flips.dtype == torch.bool
    assert (boxes[..., :2] >= 0).all() and (boxes[..., 2] <= 40).all() and (boxes[..., 3] <= 30).all()
    # area fractions lie in the configured scales (global 0.4-1, small 0.05-0.4), up to integer rounding
    area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1]) / (40 * 30)
    assert (area[:, :2] >= 0.3).all() and (area[:, 2:] <= 0.5).all()


# ---------------------------------------------------------------------------------------------------------
# The local loss against explicit loops, and --local-loss none == DINO
# ---------------------------------------------------------------------------------------------------------
def _random_outputs(B=2, K=8, C=5, grids=(3, 3, 2, 2), seed=3):
    torch.manual_seed(seed)
    # (keyword order = the order of the random draws)
    student = [geo_dino.DINOOut(h=None, logits_g=torch.randn(B, K), logits_l=torch.randn(B, K, n, n),
                                local=torch.randn(B, C, n, n)) for n in grids]
    teacher = [geo_dino.DINOOut(h=None, logits_g=torch.randn(B, K), logits_l=torch.randn(B, K, n, n),
                                local=torch.randn(B, C, n, n)) for n in grids[:2]]
    boxes = random_boxes(B * len(grids)).view(B, len(grids), 4)
    boxes[0, 3] = torch.tensor([100.0, 100.0, 110.0, 110.0])  # a small crop that overlaps no global crop
    flips = torch.rand(B, len(grids)) < 0.5
    return student, teacher, boxes, flips


@pytest.mark.parametrize("mode", ["geo", "sim"])
def test_local_loss_against_explicit_loops(mode):
    student, teacher, boxes, flips = _random_outputs()
    B, K, Ts, Tt, w = 2, 8, 0.1, 0.05, 0.3
    c, c_l = torch.randn(1, K), torch.randn(1, K)
    out = geo_dino.geo_dino_loss(student, teacher, boxes, flips, c, c_l, student_temp=Ts, teacher_temp=Tt,
                                 local_loss=mode, local_weight=w, local_collapse=True)
    total, loss_g, loss_l = out.total, out.global_term, out.local_term
    monitors = torch.cat([torch.stack([out.match_valid_frac, out.sim_geo_agree]), out.local_collapse])

    def H(t_logits, centre, s_logits):
        p = torch.softmax((t_logits - centre.flatten()) / Tt, dim=0)
        return -(p * torch.log_softmax(s_logits / Ts, dim=0)).sum().item()

    pairs, n_cells, n_valid, n_agree, ref_l, ref_g = 0, 0, 0, 0, 0.0, 0.0
    for iq in range(2):
        for v in range(4):
            if v == iq:
                continue
            pairs += 1
            ref_g += sum(H(teacher[iq].logits_g[b], c, student[v].logits_g[b]) for b in range(B)) / B
            n, m = student[v].local.shape[-1], teacher[iq].local.shape[-1]
            pair = 0.0
            for b in range(B):
                box_s, box_t = boxes[b, v].tolist(), boxes[b, iq].tolist()
                s = max(math.hypot((box_s[2] - box_s[0]) / n, (box_s[3] - box_s[1]) / n),
                        math.hypot((box_t[2] - box_t[0]) / m, (box_t[3] - box_t[1]) / m)) / 2
                for k in range(n * n):
                    e = centre_by_hand(box_s, bool(flips[b, v]), n, k // n, k % n)
                    d = [math.dist(e, centre_by_hand(box_t, bool(flips[b, iq]), m, j // m, j % m)) for j in range(m * m)]
                    geo_j = min(range(m * m), key=lambda j: d[j])
                    z = student[v].local[b, :, k // n, k % n]
                    cos = [F.cosine_similarity(z, teacher[iq].local[b, :, j // m, j % m], dim=0).item()
                           for j in range(m * m)]
                    sim_j = max(range(m * m), key=lambda j: cos[j])
                    valid = d[geo_j] < s
                    n_cells, n_valid, n_agree = n_cells + 1, n_valid + valid, n_agree + (valid and sim_j == geo_j)
                    j = geo_j if mode == "geo" else sim_j
                    if mode == "sim" or valid:  # Eq. 6: invalid geo matches add 0 but still count in 1/K
                        pair += H(teacher[iq].logits_l[b, :, j // m, j % m], c_l,
                                  student[v].logits_l[b, :, k // n, k % n]) / (n * n)
            ref_l += pair / B
    ref_l, ref_g = ref_l / pairs, ref_g / pairs  # Eq. 9 / 10: 1 / (2 (N_L + 1)) over the pairs
    assert pairs == 2 * (2 + 1)
    assert loss_g.item() == pytest.approx(ref_g, rel=1e-5)
    assert loss_l.item() == pytest.approx(ref_l, rel=1e-5)
    assert total.item() == pytest.approx((1 - w) * ref_g + w * ref_l, rel=1e-5)
    assert monitors[0].item() == pytest.approx(n_valid / n_cells)
    assert monitors[1].item() == pytest.approx(n_agree / max(n_valid, 1))
    assert 0 < n_valid < n_cells  # the non-overlapping crop really produced invalid cells
    # the local collapse monitors, computed from the loss's own P_t, equal collapse_monitors on every teacher cell
    t_local = torch.cat([o.logits_l.flatten(2).transpose(1, 2).reshape(-1, K) for o in teacher])  # (2B*m*m, K)
    torch.testing.assert_close(monitors[2:], geo_dino.collapse_monitors(t_local, c_l, Tt))


def test_local_loss_stops_gradient_into_teacher():
    student, teacher, boxes, flips = _random_outputs()
    for o in student + teacher:
        for k in ("logits_g", "logits_l"):
            getattr(o, k).requires_grad_(True)
    zero = torch.zeros(1, 8)
    total = geo_dino.geo_dino_loss(student, teacher, boxes, flips, zero, zero, student_temp=0.1, teacher_temp=0.04,
                                   local_loss="geo", local_weight=0.5, local_collapse=False).total
    total.backward()
    assert all(getattr(o, k).grad is None for o in teacher for k in ("logits_g", "logits_l"))
    assert all(o.logits_l.grad.abs().sum() > 0 for o in student[1:])


def test_none_is_plain_dino():
    args = geo_dino.parse_args(TINY + ["--local-loss", "none"])
    torch.manual_seed(0)
    net = geo_dino.StudentNetwork(args)
    assert net.encoder.local_head is None and not any("local_head" in n for n, _ in net.named_parameters())
    teacher = geo_dino.make_teacher(net)
    views = [torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16), torch.randn(4, 3, 8, 8), torch.randn(4, 3, 8, 8)]
    boxes, flips = random_boxes(16).view(4, 4, 4), torch.zeros(4, 4, dtype=torch.bool)
    s_out = net(views, local_views=len(views))
    with torch.no_grad():
        t_out = [teacher(v) for v in views[:2]]
    c = torch.randn(1, 64)
    total, loss_g, loss_l, *_ = geo_dino.geo_dino_loss(s_out, t_out, boxes, flips, c, c, student_temp=0.1,
                                                       teacher_temp=0.04, local_loss="none", local_weight=0.5,
                                                       local_collapse=True)
    plain = geo_dino.dino_loss([o.logits_g for o in s_out], [o.logits_g for o in t_out], c, 0.1, 0.04)
    assert torch.equal(total, plain) and torch.equal(loss_g, plain) and loss_l.item() == 0.0


def test_none_is_the_dino_of_co_dino(tmp_path):
    """One DINO: geo_dino --local-loss none and co_dino --ws 0 (with 2 small crops each) build the same student and
    teacher from a seed and take the same training step on the same crops: the same loss, then the same student,
    teacher and centre, bit for bit: with the same flags, the two files' DINO is one algorithm."""
    import co_dino

    same = ["--dataset", "fake", "--image-size", "16", "--batch-size", "4", "--out-dim", "64", "--head-hidden", "64",
            "--bottleneck", "32", "--num-workers", "0", "--knn-k", "0", "--amp", "off", "--tau-base", "0.99",
            "--warmup-teacher-temp-epochs", "0", "--freeze-last-layer", "0"]
    geo_args = geo_dino.parse_args(same + ["--local-loss", "none", "--local-crops", "2", "--local-crop-size", "8",
                                           "--output-dir", str(tmp_path / "geo")])
    co_args = co_dino.parse_args(same + ["--ws", "0", "--small-crops", "2", "--small-crop-size", "8",
                                         "--output-dir", str(tmp_path / "co")])
    torch.manual_seed(1)
    views = [torch.randint(0, 256, (4, 3, s, s), dtype=torch.uint8) for s in (16, 16, 8, 8)]
    labels, boxes, flips = torch.zeros(4, dtype=torch.long), random_boxes(16).view(4, 4, 4), torch.zeros(4, 4) > 0
    after = []
    for m, args, batch in ((geo_dino, geo_args, ((views, boxes, flips), labels)), (co_dino, co_args, (views, labels))):
        run = m.Run(args)
        nets, optimizer = m.build_training(args, run)
        out = m.train_step(nets, optimizer, batch, m.Schedule(args, 10)(3), args, run)
        after.append([out.loss, nets.student.state_dict(), nets.teacher.state_dict(), nets.centers.center])
    assert after[0][0].item() > 0
    torch.testing.assert_close(after[0], after[1], rtol=0, atol=0)


def test_swin_backbone_round_trips_through_torchvision_and_eval_linear(tmp_path):
    """backbone.pt for Swin-T loads strictly into torchvision's swin_t (same outputs) and into eval_linear.py."""
    import torchvision

    import eval_linear

    torch.manual_seed(0)
    wrapper = geo_dino.SwinBackbone().eval()
    assert all(k.startswith(("features.", "norm.")) for k in wrapper.state_dict())
    args = geo_dino.parse_args(["--dataset", "fake", "--arch", "swin_t", "--image-size", "64", "--local-crop-size", "64"])
    assert args.grid_global == 2
    path = tmp_path / "backbone.pt"
    geo_dino.save_backbone(path, wrapper, args)
    saved = torch.load(path, weights_only=True)
    assert saved["arch"] == "swin_t" and saved["arch_kwargs"] == {} and isinstance(saved["args"], dict)
    model = torchvision.models.swin_t(weights=None)
    model.head = torch.nn.Identity()
    model.load_state_dict(saved["state_dict"])  # strict: exactly the same keys
    model.eval()  # no stochastic depth
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        out = wrapper(x)
        ref = model.norm(model.features(x)).permute(0, 3, 1, 2)  # (1, 2, 2, 768) -> (1, 768, 2, 2)
        torch.testing.assert_close(out.local, ref)
        torch.testing.assert_close(out.pooled, ref.mean((2, 3)))
        torch.testing.assert_close(model(x), out.h)  # torchvision's own pooled output
        loaded, _ = eval_linear.load_backbone(str(path))
        torch.testing.assert_close(loaded(x).local, out.local)
    # the online k-NN reads backbone(x).h: the Swin-T wrapper gives it too, and gets its train mode back
    knn_args = geo_dino.parse_args(["--dataset", "fake", "--arch", "swin_t", "--image-size", "64", "--local-crop-size",
                                    "64", "--fake-size", "8", "--knn-k", "3", "--num-workers", "0"])
    train, val, num_classes = geo_dino.load_datasets(knn_args, 0)
    cpu = SimpleNamespace(device=torch.device("cpu"), autocast=nullcontext())
    monitor = geo_dino.KNNMonitor(knn_args, train, val, num_classes, cpu)
    wrapper.train()
    acc = monitor(wrapper)
    assert 0 <= acc["knn_top1"] <= 100 and 0 <= acc["linear_top1"] <= 100 and wrapper.training


# ---------------------------------------------------------------------------------------------------------
# Bad input: one line, before any work
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv,message", [
    (["--stem", "imagenet"], "--image-size 16 gives a 1x1 feature map"),
    (["--arch", "swin_t", "--width", "64"],  # 64: the default, as TINY's 8 is refused for swin_t
     "swin_t needs --image-size and --local-crop-size that are multiples of 32"),
    (["--arch", "vit_s"], "unknown --arch 'vit_s'"),
    (["--local-loss", "dense"], "invalid choice: 'dense'"),
    (["--local-weight", "2"], "--local-weight must be in [0, 1]"),
    (["--dataset", "imagefolder", "--data-dir", "/nonexistent"], "needs /nonexistent/train"),
    (["--width", "30"], "--width must be a positive multiple of 4"),
    (["--knn-temperature", "0"], "--knn-temperature > 0"),
    (["--knn-bank", "-1"], "--knn-every, --train-per-class, --val-split, --warmup-epochs"),
    (["--train-per-class", "-5"], "--knn-every, --train-per-class, --val-split, --warmup-epochs"),
    (["--clip-grad", "-1"], "need --clip-grad >= 0"),
])
def test_bad_values_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        geo_dino.parse_args(TINY + argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_bad_value_is_one_error_line_before_any_work(tmp_path, capsys):
    """What `python geo_dino.py ...` does first (in-process to save a subprocess start): argparse's usage,
    then exactly one error line, exit code 2, and nothing created yet."""
    with pytest.raises(SystemExit) as e:
        geo_dino.parse_args(TINY + ["--local-crop-size", "4", "--output-dir", str(tmp_path / "x")])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and sum("error" in line for line in err) == 1
    assert err[-1].endswith(": error: need --clip-grad >= 0 and --local-crop-size >= 8")
    assert not (tmp_path / "x").exists()


def test_width_with_swin_t_is_one_error_line(capsys):
    """--width narrows rf_resnet archs only; with swin_t it is refused (one line, exit code 2), not ignored."""
    with pytest.raises(SystemExit) as e:
        geo_dino.parse_args(TINY + ["--arch", "swin_t", "--width", "32"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and sum("error" in line for line in err) == 1
    assert err[-1].endswith(": error: --width 32 applies to rf_resnet archs only; swin_t has fixed widths (96-768)")
    assert geo_dino.parse_args(TINY + ["--width", "16"]).width == 16  # rf_resnet archs take it


def test_cifar10_without_network_names_the_offline_script(tmp_path, monkeypatch):
    """No CIFAR-10 in --data-dir and torchvision's download fails: one line that says what to run."""
    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(geo_dino.torchvision.datasets, "CIFAR10", offline)
    with pytest.raises(SystemExit) as e:
        geo_dino.load_datasets(geo_dino.parse_args(TINY + ["--dataset", "cifar10", "--data-dir", str(tmp_path)]), 0)
    msg = str(e.value.code)
    assert msg.startswith("geo_dino.py: error: ") and "\n" not in msg
    assert f"run `python prepare_cifar10.py {tmp_path}`" in msg


# ---------------------------------------------------------------------------------------------------------
# Precision, warm-up, optimiser
# ---------------------------------------------------------------------------------------------------------
def test_amp_auto_is_bf16_only_where_the_cpu_has_native_bf16(monkeypatch):
    cpu = torch.device("cpu")
    args = geo_dino.parse_args(TINY)
    assert args.amp == "auto"
    monkeypatch.setattr(geo_dino, "cpu_has_native_bf16", lambda: True)
    assert geo_dino.amp_dtype(args, cpu) == torch.bfloat16
    monkeypatch.setattr(geo_dino, "cpu_has_native_bf16", lambda: False)
    assert geo_dino.amp_dtype(args, cpu) is None  # emulated bf16 is slower than fp32 (measured)
    assert geo_dino.amp_dtype(geo_dino.parse_args(TINY + ["--amp", "bf16"]), cpu) == torch.bfloat16  # explicit wins
    assert geo_dino.amp_dtype(geo_dino.parse_args(TINY + ["--amp", "off"]), cpu) is None
    assert isinstance(geo_dino.cpu_has_native_bf16(), bool)


def test_lr_warmup_default_is_the_papers_at_most_5_percent_of_the_run():
    assert geo_dino.parse_args(["--dataset", "fake", "--epochs", "300"]).warmup_epochs == 10  # paper Sec. 4.2
    assert geo_dino.parse_args(["--dataset", "fake", "--epochs", "6"]).warmup_epochs == pytest.approx(0.3)
    assert geo_dino.parse_args(TINY).warmup_epochs == 1  # explicit wins


def test_laptop_recipe_is_co_dinos_dino_recipe_and_explicit_flags_win():
    """--recipe laptop: co_dino.py's DINO laptop values (not re-tuned), shared by all three --local-loss."""
    import co_dino

    lap = geo_dino.parse_args(["--recipe", "laptop"])
    for k, v in geo_dino.LAPTOP_RECIPE.items():
        assert getattr(lap, k) == v, k
    dino = co_dino.parse_args(["--recipe", "laptop", "--ws", "0"])
    shared = ("arch", "width", "batch_size", "optimizer", "lr", "weight_decay", "warmup_epochs", "tau_base",
              "head_hidden", "bottleneck", "out_dim", "head_bn", "freeze_last_layer", "student_temp", "teacher_temp",
              "warmup_teacher_temp_epochs", "center_momentum", "image_size", "stem", "knn_k", "knn_bank")
    assert {k: getattr(lap, k) for k in shared} == {k: getattr(dino, k) for k in shared}
    assert (lap.local_crops, lap.local_crop_size, lap.grid_global, lap.grid_local) == (2, 14, 5, 2)
    assert (lap.epochs, dino.epochs) == (2, 12)  # geo's local head at 108 cells: 2 epochs; co_dino's DINO: 12
    lap = geo_dino.parse_args(["--recipe", "laptop", "--local-loss", "sim", "--epochs", "30"])
    assert (lap.local_loss, lap.epochs, lap.head_bn) == ("sim", 30, True)


def test_optimizer_sgd_is_lars_without_the_trust_ratio():
    for name, lars in (("lars", [True, False]), ("sgd", [False, False])):
        args = geo_dino.parse_args(TINY + ["--width", "8", "--optimizer", name])
        optimizer = geo_dino.make_optimizer(geo_dino.StudentNetwork(args), args)
        assert isinstance(optimizer, geo_dino.LARS)
        assert [g["lars"] for g in optimizer.param_groups] == lars
        assert [g["weight_decay"] for g in optimizer.param_groups] == [args.weight_decay, 0.0]
    args = geo_dino.parse_args(TINY + ["--optimizer", "adamw", "--weight-decay", "0.04"])
    optimizer = geo_dino.make_optimizer(geo_dino.StudentNetwork(args), args)  # the paper's (Sec. 4.2)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.04, 0.0]


def test_train_per_class_draws_a_balanced_seeded_subset_and_the_knn_keeps_the_whole_set(tmp_path):
    labels = [i % 10 for i in range(200)] + [3] * 50  # class 3 has more images
    pick = geo_dino.per_class(labels, 4, 10, seed=0)
    assert sorted(labels[i] for i in pick) == sorted(list(range(10)) * 4) and pick == sorted(set(pick))
    assert pick == geo_dino.per_class(labels, 4, 10, seed=0) != geo_dino.per_class(labels, 4, 10, seed=1)
    assert pick != sorted(i for i in range(200) if i < 40)  # drawn at random, not the first of each class
    assert len(geo_dino.per_class([0, 0, 1], 5, 2, seed=0)) == 3  # a small class gives all its images

    args = geo_dino.parse_args(TINY + ["--fake-size", "64", "--train-per-class", "2", "--output-dir", str(tmp_path)])
    data = geo_dino.make_loaders(args, geo_dino.Run(args))
    assert len(data.images) == 20 and len(data.base.dataset) == 64 and len(data.loader) == 20 // 4
    full = [data.base.dataset[i][1] for i in range(64)]
    assert sorted(full[i] for i in data.base.indices) == sorted(list(range(10)) * 2)


# ---------------------------------------------------------------------------------------------------------
# Plumbing: a tiny run, resume, DDP
# ---------------------------------------------------------------------------------------------------------
def test_tiny_run_writes_all_outputs_and_resumes_bit_exactly(tmp_path):
    """One uninterrupted 4-step run (all outputs checked), and the same run in two parts, 2 + 2 steps (the
    second part resumes from checkpoint.pt, crossing an epoch boundary): both must end bit-identical."""
    a, b = tmp_path / "a", tmp_path / "b"
    # the figure goes into the --output-dir that the run itself creates
    proc = run_script(TINY + ["--output-dir", str(a)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in (a / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4]
    for key in ("loss", "loss_global", "loss_local", "lr", "tau", "teacher_temp", "teacher_entropy",
                "local_teacher_entropy", "match_valid_frac", "sim_geo_agree", "img_per_s", "peak_mem_mb", "train_s"):
        assert key in train_rows[-1]
    train_s = [r["train_s"] for r in train_rows]
    assert 0 < train_s[0] and train_s == sorted(train_s)
    r = train_rows[-1]
    assert r["loss"] == pytest.approx(0.5 * r["loss_global"] + 0.5 * r["loss_local"], rel=1e-5)
    assert 0 < r["match_valid_frac"] <= 1 and 0 <= r["sim_geo_agree"] <= 1
    # the online k-NN of the teacher: epoch 0 (the random network), then after every epoch
    knn = [r for r in rows if "knn_top1" in r]
    assert [(r["step"], r["epoch"]) for r in knn] == [(0, 0.0), (2, 1.0), (4, 2.0)]
    assert all(0 <= r["knn_top1"] <= 100 and r["knn_s"] >= 0 for r in knn)
    assert knn[0]["train_s"] == 0 < knn[1]["train_s"] < knn[2]["train_s"]  # training time, evaluations excluded
    final = json.loads((a / "final_metrics.json").read_text())
    assert final["step"] == 4 and "knn_top1" in final
    assert final["knn_top1_random_init"] == knn[0]["knn_top1"]
    assert final["knn_top1_bank_subset"] == knn[-1]["knn_top1"]
    assert rows[-1]["knn_top1_full"] == final["knn_top1"]  # the final k-NN: the whole training set as bank
    backbone = torch.load(a / "backbone.pt", weights_only=True)
    ca = torch.load(a / "checkpoint.pt", weights_only=True)
    assert ca["train_s"] == pytest.approx(final["train_s"]) and final["train_s"] >= knn[-1]["train_s"]
    assert backbone["arch"] == "resnet18"
    assert backbone["arch_kwargs"] == {"stem": "cifar", "mlp": None, "width": 8}
    assert isinstance(backbone["args"], dict)
    rf_resnet.build_backbone(backbone["arch"], **backbone["arch_kwargs"]).load_state_dict(backbone["state_dict"])
    for k, v in backbone["state_dict"].items():  # backbone.pt is the TEACHER backbone
        assert torch.equal(v, ca["teacher"]["backbone." + k])
    assert ca["centers"]["center"].shape == ca["centers"]["local_center"].shape == (1, 64)
    assert not torch.equal(ca["centers"]["center"], ca["centers"]["local_center"])  # two separate centres
    assert (a / "curves.png").stat().st_size > 0
    # the paper's Fig. 3, drawn from the run's backbone.pt
    figure = in_process.run("results/geo_dino_laptop/plot_matches.py", [a / "backbone.pt", a / "matches.png"])
    assert figure.returncode == 0 and (a / "matches.png").stat().st_size > 0, figure.stderr[-2000:]

    common = TINY + ["--knn-k", "0", "--output-dir", str(b)]
    assert run_script(common + ["--max-steps", "2"]).returncode == 0
    proc = run_script(common)
    assert proc.returncode == 0 and "resumed from" in proc.stdout, proc.stderr[-3000:]
    cb = torch.load(b / "checkpoint.pt", weights_only=True)
    la, lb = ({r["step"]: (r["loss"], r["sim_geo_agree"]) for r in
               map(json.loads, (d / "metrics.jsonl").read_text().splitlines()) if "loss" in r} for d in (a, b))
    assert ca["step"] == cb["step"] == 4 and la == lb
    assert torch.equal(ca["centers"]["center"], cb["centers"]["center"]) and torch.equal(ca["centers"]["local_center"], cb["centers"]["local_center"])
    for part in ("student", "teacher"):
        for k in ca[part]:
            assert torch.equal(ca[part][k], cb[part][k]), f"{part}.{k}"


def test_local_collapse_monitors_are_real_on_every_logged_step(tmp_path):
    """The local collapse monitors are computed on the steps the loop logs only (PERF): with --log-every 3 and
    --max-steps 4 of 6 steps, the rows of step 3 (a multiple of --log-every) and step 4 (the last, by
    --max-steps) both carry them (a teacher distribution's entropy is > 0 nats, at most log K)."""
    out = tmp_path / "run"
    proc = run_script(TINY + ["--epochs", "3", "--max-steps", "4", "--log-every", "3", "--knn-k", "0",
                              "--output-dir", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert [r["step"] for r in rows] == [3, 4]
    for r in rows:
        assert 0 < r["local_teacher_entropy"] <= math.log(64) + 1e-6 and r["local_teacher_kl_uniform"] >= 0


def test_width_8_run_on_cifar10_from_the_data_scripts_layout(tmp_path):
    """prepare_cifar10.py's cifar-10-batches-py layout: items are (PIL image, label) as from torchvision, so
    the box-tracking crops apply unchanged; then a tiny --width 8 run on it, whose backbone.pt rebuilds."""
    import prepare_cifar10

    rng = np.random.default_rng(0)
    xtr = rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    xte = rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8)
    ytr, yte = np.arange(40) % 10, np.arange(20) % 10
    prepare_cifar10.write_batches(tmp_path, xtr, ytr, xte, yte)
    train = geo_dino.CIFAR10Batches(str(tmp_path), True)
    img, y = train[13]
    assert np.array_equal(np.asarray(img), xtr[13]) and y == 3
    data = ["--dataset", "cifar10", "--data-dir", str(tmp_path), "--width", "8"]
    args = geo_dino.parse_args(TINY + data)
    image, label = geo_dino.as_tensors(train, 32)[13]  # CIFAR's array itself, at its own 32 px
    assert torch.equal(image, torch.from_numpy(xtr[13]).permute(2, 0, 1)) and label == 3
    crops, boxes, flips = geo_dino.MultiView(args)(image[None].float() / 255, torch.Generator())
    assert [tuple(c.shape) for c in crops] == [(1, 3, 16, 16)] * 2 + [(1, 3, 8, 8)] * 2
    assert boxes.shape == (1, 4, 4) and (boxes >= 0).all() and (boxes <= 32).all() and flips.shape == (1, 4)

    out = tmp_path / "run"
    proc = run_script(TINY + data + ["--epochs", "1", "--max-steps", "2", "--output-dir", str(out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    final = json.loads((out / "final_metrics.json").read_text())
    assert final["step"] == 2 and 0 <= final["knn_top1"] <= 100 and final["knn_top1_random_init"] is not None
    backbone = torch.load(out / "backbone.pt", weights_only=True)
    assert backbone["arch_kwargs"] == {"stem": "cifar", "mlp": None, "width": 8}
    rebuilt = rf_resnet.build_backbone(backbone["arch"], **backbone["arch_kwargs"])
    rebuilt.load_state_dict(backbone["state_dict"])  # strict: the width-8 layers
    assert rebuilt.out_dim == 8 * 8  # ResNet-18's last stage: 8 x width channels


def test_compile_compiles_the_loss_that_train_step_calls(tmp_path, monkeypatch):
    """--compile compiles the network and the loss (PERF: the compiler fuses the local softmaxes), and
    train_step computes its loss through nets.loss_fn, so the compiled loss is the one trained with. A recording
    stand-in replaces torch.compile (a real compile takes about a minute on a CPU)."""
    compiled = []
    monkeypatch.setattr(geo_dino.torch, "compile", lambda fn: compiled.append(fn) or fn)
    args = geo_dino.parse_args(TINY + ["--compile", "--output-dir", str(tmp_path)])
    run = geo_dino.Run(args)
    loader = geo_dino.make_loaders(args, run).loader
    nets, optimizer = geo_dino.build_training(args, run)
    assert nets.loss_fn is geo_dino.geo_dino_loss and compiled == [nets.model, geo_dino.geo_dino_loss]
    calls = []
    nets.loss_fn = lambda *a, **kw: calls.append(len(a) + len(kw)) or geo_dino.geo_dino_loss(*a, **kw)
    geo_dino.train_step(nets, optimizer, next(iter(loader)), geo_dino.Schedule(args, 2)(0), args, run)
    assert calls == [11]
