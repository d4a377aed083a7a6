"""Recipe fidelity: each documented paper-scale command parses into the values its source states.

Only argument parsing and networks built on the meta device (shapes, no memory, no data): seconds.
The sources: CO-SSL (arXiv 2501.02860) Sec. 4 and App. A.4; solo-learn's recipes, which the CO-SSL paper
says it used (scripts/pretrain/cifar/{byol,dino}.yaml, scripts/pretrain/imagenet-100/{byol,dino}.yaml);
DINO's official code (clip_gradients, norm_last_layer).
"""
import re
import shlex
from pathlib import Path

import pytest
import torch

import co_byol
import co_dino
import geo_dino

ROOT = Path(__file__).resolve().parents[1]


def documented_command(doc: str, script: str, marker: str) -> list[str]:
    """The arguments of the `torchrun ... SCRIPT ...` command in DOC whose text contains MARKER (a command
    spans the lines joined by a trailing backslash; comments are dropped)."""
    text = (ROOT / doc).read_text().replace("\\\n", " ")
    for line in text.splitlines():
        if script in line and marker in line and line.lstrip().startswith("torchrun"):
            words = shlex.split(line.split("#")[0])
            return words[words.index(script) + 1:]
    raise AssertionError(f"no torchrun {script} command with {marker!r} in {doc}")


def with_data_dir(argv: list[str], tmp_path: Path) -> list[str]:
    """The same command with --data-dir pointing at an empty image-folder layout (parse_args checks it)."""
    for split in ("train", "val"):
        (tmp_path / split).mkdir(exist_ok=True)
    argv = list(argv)
    argv[argv.index("--data-dir") + 1] = str(tmp_path)
    return argv


def test_co_byol_imagenet100_command_is_solo_learns_byol_with_the_papers_local_heads(tmp_path):
    argv = with_data_dir(documented_command("docs/co_byol.md", "co_byol.py", "rf99_resnet50"), tmp_path)
    args = co_byol.parse_args(argv)
    # solo-learn imagenet-100/byol.yaml: LARS lr 0.5 (batch 256), wd 1e-6, tau 0.99 -> 1, heads 4096 / 8192 / 256
    assert (args.optimizer, args.lr, args.batch_size, args.weight_decay) == ("lars", 0.5, 256, 1e-6)
    assert (args.tau_base, args.tau_final, args.proj_hidden, args.pred_hidden, args.proj_dim) == (
        0.99, 1.0, 4096, 8192, 256)
    assert (args.epochs, args.arch, args.image_size, args.min_crop) == (400, "rf99_resnet50", 224, 0.2)
    # PAPER App. A.4: every local head (g2, q2) has one hidden layer of 4096 units
    with torch.device("meta"):
        net = co_byol.OnlineNetwork(args)
    assert net.local_predictor[0].out_channels == 4096 and net.predictor[0].out_features == 8192
    assert net.encoder.local_projector[0].out_channels == 4096


def test_co_byol_cifar_defaults_are_solo_learns_byol_and_ws0_keeps_byols_crop():
    args = co_byol.parse_args([])
    assert (args.dataset, args.optimizer, args.lr, args.weight_decay, args.tau_base) == (
        "cifar10", "lars", 1.0, 1e-5, 0.99)
    assert args.min_crop == 0.2 and co_byol.parse_args(["--ws", "0"]).min_crop == 0.08  # CO-SSL Sec. 4 vs BYOL


@pytest.mark.parametrize("dataset,warmup_epochs", [("cifar10", 0), ("cifar100", 0), ("imagefolder", 50)])
def test_co_dino_defaults_are_solo_learns_dino(dataset, warmup_epochs, tmp_path):
    argv = ["--dataset", dataset]
    if dataset == "imagefolder":
        argv = with_data_dir(argv + ["--data-dir", ""], tmp_path)
    args = co_dino.parse_args(argv)
    # solo-learn {cifar,imagenet-100}/dino.yaml: tau 0.9995 -> 1, LARS lr 0.3, wd 1e-6, heads 2048 / 256 / 4096,
    # student T 0.1, teacher T 0.07 (warmed up from 0.04 over 50 epochs on ImageNet-100 only)
    assert (args.tau_base, args.tau_final, args.lr, args.weight_decay) == (0.9995, 1.0, 0.3, 1e-6)
    assert (args.head_hidden, args.bottleneck, args.out_dim, args.student_temp) == (2048, 256, 4096, 0.1)
    assert args.warmup_teacher_temp_epochs == warmup_epochs
    temps = [co_dino.teacher_temp_at(e, args.warmup_teacher_temp, args.teacher_temp,
                                     args.warmup_teacher_temp_epochs) for e in (0, 49, 50)]
    assert temps == ([0.07] * 3 if warmup_epochs == 0 else [0.04, pytest.approx(0.07), 0.07])


def test_geo_dino_imagenet_command_is_the_papers_swin_recipe(tmp_path):
    argv = with_data_dir(documented_command("docs/geo_dino.md", "geo_dino.py", "swin_t"), tmp_path)
    args = geo_dino.parse_args(argv)
    # PAPER Sec. 4.2 (after DINO): AdamW lr 5e-4, wd 0.04 -> 0.4, clip 3.0, 300 epochs, 2 x 224 + 8 x 96 crops
    assert (args.optimizer, args.lr, args.weight_decay, args.weight_decay_end, args.clip_grad) == (
        "adamw", 5e-4, 0.04, 0.4, 3.0)
    assert (args.epochs, args.image_size, args.local_crop_size, args.local_crops) == (300, 224, 96, 8)
    with torch.device("meta"):
        backbone = geo_dino.build_backbone(args)
    depths = [m.p for m in backbone.modules() if type(m).__name__ == "StochasticDepth"]
    assert max(depths) == pytest.approx(0.1)  # Swin-T's ImageNet-1k stochastic depth (torchvision default: 0.2)


def test_geo_dino_clips_every_tensor_on_its_own_as_dinos_clip_gradients():
    big, small = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    big.grad, small.grad = torch.tensor([3.0, 4.0]), torch.tensor([0.3, 0.4])  # norms 5 and 0.5
    geo_dino.clip_gradients([big, small], 1.0)
    torch.testing.assert_close(big.grad, torch.tensor([0.6, 0.8]), rtol=1e-5, atol=1e-6)  # scaled to norm 1
    assert torch.equal(small.grad, torch.tensor([0.3, 0.4]))  # below the threshold: untouched
    # (the global clip_grad_norm_ would have scaled both by 1 / 5.02)


@pytest.mark.parametrize("value,trained", [("true", False), ("false", True)])
def test_geo_dino_norm_last_layer_flag(value, trained):
    args = geo_dino.parse_args(["--dataset", "fake", "--norm-last-layer", value])
    with torch.device("meta"):
        encoder = geo_dino.Encoder(args)
    g = encoder.head.last_layer.parametrizations.weight.original0
    assert g.requires_grad is trained


def test_rf99_preset_is_the_14x14_choice_of_the_two_that_give_rf_99():
    import rf_resnet

    with torch.device("meta"):
        net = rf_resnet.build_backbone("rf99_resnet50", stem="imagenet")
    assert rf_resnet.local_grid(net, 224) == 14  # 196 local representations (paper Table 5)
    assert re.search(r"99 by two", (ROOT / "rf_resnet.py").read_text())


def test_bag_ssl_evaluation_patches_resize_with_pils_bicubic_as_in_training():
    """Training resizes PIL patches (bicubic, a = -0.5); the bag-of-patch evaluation resizes tensors: the same
    kernel, to one grey level (PIL rounds to uint8). The plain F.interpolate bicubic (a = -0.75) is further."""
    import numpy as np
    from PIL import Image

    import bag_ssl

    rng = np.random.default_rng(0)
    pixels = rng.integers(64, 192, (12, 12, 3), dtype=np.uint8)  # PIL clips to 0-255 between its two passes
    ref = np.asarray(Image.fromarray(pixels).resize((32, 32), Image.BICUBIC), dtype=np.float64)
    x = torch.tensor(pixels, dtype=torch.float32).permute(2, 0, 1)[None]  # (1, 3, 12, 12), grey levels
    ours = bag_ssl.extract_crops(x, torch.tensor([0]), torch.tensor([[0, 0, 12, 12]]), 32)[0].permute(1, 2, 0)
    assert np.abs(ours.numpy() - ref).max() <= 1.0
    plain = torch.nn.functional.interpolate(x, size=(32, 32), mode="bicubic", align_corners=False)[0]
    assert np.abs(plain.permute(1, 2, 0).numpy() - ref).max() > 5.0


@pytest.mark.parametrize("name", ["co_byol", "co_dino", "bag_ssl", "geo_dino"])
def test_blur_is_off_on_32px_cifar_images_only(name):
    """solo-learn drops the Gaussian blur on CIFAR only: 64 px images (Tiny-ImageNet) and larger keep BYOL's."""
    import importlib

    m = importlib.import_module(name)

    def views(size):
        args = m.parse_args(["--dataset", "fake", "--image-size", str(size), "--stem", "cifar"])
        return [spec.blur_p for spec in m.MultiView(args).specs]

    assert max(views(32)) == 0 and max(views(64)) == 1.0


def test_bag_ssl_local_aggregation_grid_is_table_5s():
    """Table 5: 25 patches of 16 x 16 on a sliding window with stride 4, which tile the 32 px image exactly."""
    import bag_ssl

    args = bag_ssl.parse_args(["--local-agg"])
    assert (args.image_size, args.grid_patch_size, args.grid_stride, args.grid) == (32, 16, 4, 5)
    boxes = bag_ssl.grid_boxes(32, 32, args.grid_patch_size, args.grid_stride)
    assert len(boxes) == 25 and (boxes[:, 0] + boxes[:, 2]).max() == 32  # the last row ends at the border


def test_bag_ssl_training_patches_are_cut_at_the_evaluations_scale(monkeypatch):
    """An ImageNet-like 448 x 600 px image: the training images are resized as the evaluation resizes (short side
    256 for 224 px, then centre-cropped), so a 100 px training patch covers the same part of the image as an
    evaluation patch of 100 px; CIFAR stays at 32 px in memory, and at --image-size 64 its 28 px patches (of the
    evaluation's 64 px frame) are cut as 14 px of the 32 px image."""
    from PIL import Image

    import bag_ssl

    class Folder(torch.utils.data.Dataset):
        transform = None

        def __len__(self):
            return 1

        def __getitem__(self, i):
            return self.transform(Image.new("RGB", (448, 600))), 0

    assert bag_ssl.as_tensors(Folder(), 224)[0][0].shape == (3, 256, 256)
    assert bag_ssl.eval_transform(224).transforms[0].size == 256  # the evaluation's frame
    fake = bag_ssl.torchvision.datasets.FakeData(2, (3, 32, 32), 10)
    assert bag_ssl.as_tensors(fake, 32)[0][0].shape == (3, 32, 32)
    assert (bag_ssl.patch_boxes(50, 256, 256, 100, torch.Generator())[:, 2:] == 100).all()  # px of that frame
    seen, real = [], bag_ssl.patch_boxes
    monkeypatch.setattr(bag_ssl, "patch_boxes", lambda n, h, w, patch, gen: seen.append(patch) or real(n, h, w, patch,
                                                                                                     gen))
    args = bag_ssl.parse_args(["--dataset", "fake", "--image-size", "64", "--arch", "resnet18"])
    views = bag_ssl.MultiView(args)(torch.rand(2, 3, 32, 32), torch.Generator())
    assert args.patch_size == 28 and seen == [14, 14] and [v.shape for v in views] == [(2, 3, 64, 64)] * 2


@pytest.mark.parametrize("name", ["co_byol", "co_dino"])
def test_shared_head_is_table_6s_one_head_variant(name):
    """--shared-head: no local head parameters; the local outputs are the global head applied at every
    position (compared in eval mode, where BatchNorm uses fixed statistics)."""
    import importlib

    m = importlib.import_module(name)
    tiny = ["--dataset", "fake", "--image-size", "16", "--width", "8"]
    tiny += (["--proj-hidden", "16", "--pred-hidden", "16", "--local-pred-hidden", "16", "--proj-dim", "8"]
             if name == "co_byol" else ["--out-dim", "32", "--head-hidden", "16", "--bottleneck", "8"])
    args = m.parse_args(tiny + ["--ws", "0.2", "--shared-head"])
    torch.manual_seed(0)
    net = (m.OnlineNetwork if name == "co_byol" else m.StudentNetwork)(args).eval()
    separate = (m.OnlineNetwork if name == "co_byol" else m.StudentNetwork)(m.parse_args(tiny + ["--ws", "0.2"]))
    params = {n for n, _ in net.named_parameters()}
    assert not any("local" in n for n in params) and any("local" in n for n, _ in separate.named_parameters())
    x = torch.randn(2, 3, 16, 16)
    out = net([x], local_views=1)[0]
    local = net.encoder.backbone(x).local  # (2, C, 3, 3)
    vec = local[:, :, 1, 2]  # one position, (2, C)
    if name == "co_byol":
        torch.testing.assert_close(out.z_l[:, :, 1, 2], net.encoder.projector(vec))
        torch.testing.assert_close(out.p_l[:, :, 1, 2], net.predictor(net.encoder.projector(vec)))
    else:
        torch.testing.assert_close(out.logits_l[:, :, 1, 2], net.encoder.head(vec))


def test_two_hidden_layer_projector_for_imagenet_1k():
    """CO-SSL Sec. 4: 'a projection layer with two hidden layers works better for BYOL-based methods on
    ImageNet-1K'; --proj-hidden-layers 2 gives it to g1 and g2, the predictors keep one."""
    args = co_byol.parse_args(["--dataset", "fake", "--image-size", "16", "--width", "8", "--proj-hidden", "16",
                               "--pred-hidden", "16", "--local-pred-hidden", "16", "--proj-dim", "8",
                               "--proj-hidden-layers", "2"])
    net = co_byol.OnlineNetwork(args)
    linear = lambda m: [x for x in m if isinstance(x, (torch.nn.Linear, torch.nn.Conv2d))]  # noqa: E731
    assert len(linear(net.encoder.projector)) == 3 and len(linear(net.encoder.local_projector)) == 3
    assert len(linear(net.predictor)) == 2 and len(linear(net.local_predictor)) == 2
    out = net([torch.randn(4, 3, 16, 16)], local_views=1)[0]
    assert out.z_g.shape == (4, 8) and out.z_l.shape == (4, 8, 3, 3)


@pytest.mark.parametrize("marker,epochs,arch,size", [("imagenet100", 400, "rf99_resnet50", 224),
                                                     ("tiny-imagenet", 400, "rf29_resnet18", 64),
                                                     ("/data/imagenet ", 100, "rf99_resnet50", 224)])
def test_co_byol_paper_scale_table_commands(marker, epochs, arch, size, tmp_path):
    """The docs' table of paper-scale commands (CO-SSL Table 1-2): what the paper states, per data set."""
    text = (ROOT / "docs/co_byol.md").read_text()
    line = next(ln for ln in text.splitlines() if ln.startswith("| ") and marker in ln.replace("`", " "))
    argv = shlex.split(line.split("`")[1])
    argv = with_data_dir(argv[argv.index("co_byol.py") + 1:], tmp_path)
    args = co_byol.parse_args(argv)
    assert (args.epochs, args.arch, args.image_size, args.ws, args.min_crop) == (epochs, arch, size, 0.2, 0.2)
    assert args.optimizer == "lars" and args.tau_base == 0.99 and args.proj_dim == 256
    if marker == "/data/imagenet ":  # Sec. 4: two hidden projector layers for BYOL-based methods on ImageNet-1k
        assert args.proj_hidden_layers == 2 and args.weight_decay == 1.5e-6
    if marker == "tiny-imagenet":  # 64 px: the cifar stem, RF29 (paper Sec. 4), blur kept (not CIFAR)
        assert args.stem == "cifar" and co_byol.MultiView(args).specs[0].blur_p == 1.0


@pytest.mark.parametrize("marker,arch,size", [("imagenet100", "rf99_resnet50", 224),
                                              ("tiny-imagenet", "rf29_resnet18", 64)])
def test_co_dino_paper_scale_table_commands(marker, arch, size, tmp_path):
    text = (ROOT / "docs/co_dino.md").read_text()
    line = next(ln for ln in text.splitlines() if ln.startswith("| ") and marker in ln)
    argv = shlex.split(line.split("`")[1])
    args = co_dino.parse_args(with_data_dir(argv[argv.index("co_dino.py") + 1:], tmp_path))
    assert (args.epochs, args.arch, args.image_size, args.ws, args.min_crop) == (400, arch, size, 0.2, 0.2)
    # solo-learn imagenet-100/dino.yaml
    assert (args.tau_base, args.warmup_teacher_temp, args.teacher_temp, args.warmup_teacher_temp_epochs) == (
        0.9995, 0.04, 0.07, 50)
    assert (args.optimizer, args.lr, args.weight_decay, args.out_dim) == ("lars", 0.3, 1e-6, 4096)


def test_bag_ssl_paper_commands_are_appendix_c(tmp_path):
    import bag_ssl

    text = (ROOT / "docs/bag_ssl.md").read_text().replace("\\\n", " ")
    cifar, inet = [shlex.split(ln.split("#")[0])[3:] for ln in text.splitlines()
                   if ln.startswith("torchrun") and "bag_ssl.py" in ln]
    a = bag_ssl.parse_args(cifar)  # App. C.1: ResNet-34, 600 ep, batch 1024, LARS, wd 1e-4, lr 0.3, 10 warm-up ep
    assert (a.arch, a.epochs, a.batch_size, a.optimizer, a.weight_decay, a.lr, a.warmup_epochs) == (
        "resnet34", 600, 1024, "lars", 1e-4, 0.3, 10.0)
    assert (a.patch_size, a.image_size, a.proj_hidden, a.proj_hidden_layers, a.proj_dim) == (14, 32, 4096, 1, 128)
    assert (a.tcr_lambda, a.tcr_eps, a.temperature, a.sim_coeff, a.std_coeff, a.cov_coeff) == (30, 0.2, 0.1, 25, 25, 1)
    assert bag_ssl.parse_args(cifar + ["--dataset", "cifar100"]).proj_dim == 512  # C.1: 512 outputs on CIFAR-100
    a = bag_ssl.parse_args(with_data_dir(inet, tmp_path))  # App. C.2: ResNet-50, 400 ep, lr 0.1, 3 x 8192 projector
    assert (a.arch, a.epochs, a.batch_size, a.lr, a.weight_decay, a.warmup_epochs) == (
        "resnet50", 400, 1024, 0.1, 1e-4, 10.0)
    assert (a.image_size, a.patch_size, a.proj_hidden, a.proj_hidden_layers, a.proj_dim, a.tcr_lambda) == (
        224, 100, 8192, 2, 8192, 1920)
