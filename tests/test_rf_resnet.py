"""Facts about rf_resnet.py that the CO-SSL paper states or that follow from its definitions."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision

import in_process
import rf_resnet
from rf_resnet import available_archs, build_backbone, make_resnet, measure_receptive_field, receptive_field

ROOT = Path(__file__).resolve().parents[1]
PRESET_RF = {"rf67": 67, "rf99": 99, "rf163": 163, "rf195": 195, "rf29": 29, "rf33": 33, "rf41": 41, "rf49": 49}


def test_rf_formula_worked_example():
    # App. B.1: RF(L) = 1 + sum_l (k_l - 1) prod_{i<l} s_i; k = 7, 3, 3 with s = 2, 1, 1 gives 1 + 6 + 4 + 4.
    assert rf_resnet.rf_of_layers([(7, 2), (3, 1), (3, 1)]) == (15, 2)
    assert rf_resnet.rf_of_layers([(1, 1)] * 10) == (1, 1)  # 1x1 layers never widen the field


def test_parameter_counts_match_paper():
    millions = lambda m: rf_resnet.count_parameters(m) / 1e6  # noqa: E731
    assert millions(build_backbone("resnet50")) == pytest.approx(23.51, abs=0.01)  # torchvision, no fc
    assert millions(build_backbone("rf99_resnet50", mlp=False)) == pytest.approx(21.4, abs=0.05)  # paper: 21.4M
    assert millions(build_backbone("rf99_resnet50")) == pytest.approx(23.7, abs=0.06)  # paper: 23.7M


def test_plain_resnet_is_torchvision_resnet_without_fc():
    torch.manual_seed(0)
    ours = build_backbone("resnet18").eval()
    ref = torchvision.models.resnet18()
    ref.fc = torch.nn.Identity()
    ref.load_state_dict(ours.state_dict())  # strict: same keys and shapes
    ref.eval()
    x = torch.randn(2, 3, 64, 64)
    out = ours(x)
    torch.testing.assert_close(out.pooled, ref(x))
    torch.testing.assert_close(out.h, out.pooled)  # no MLP on a plain ResNet by default


def test_output_shapes_pooling_and_mlp_skip():
    torch.manual_seed(0)
    model = build_backbone("rf99_resnet18").eval()
    out = model(torch.randn(2, 3, 224, 224))
    assert out.local.shape == (2, model.out_dim, 14, 14) and model.out_dim == 512
    torch.testing.assert_close(out.pooled, out.local.mean(dim=(2, 3)))
    torch.testing.assert_close(out.h, torch.relu(out.pooled + model.mlp.mlp(out.pooled)))
    v0 = build_backbone("rf99_resnet18", mlp=False)
    assert v0.mlp is None


@pytest.mark.parametrize("rf,grid", [("rf67", 28), ("rf99", 14), ("rf163", 14), ("rf195", 7)])
def test_local_grid_at_224(rf, grid):
    for depth in ("resnet18", "resnet50"):
        with torch.device("meta"):  # shapes only: no weights to initialise
            model = build_backbone(f"{rf}_{depth}")
        assert rf_resnet.local_grid(model, 224) == grid


@pytest.mark.parametrize("arch,stem", [(a, "imagenet") for a in available_archs("imagenet") if a.startswith("rf")]
                         + [(a, "cifar") for a in available_archs("cifar") if a.startswith("rf")])
def test_measured_rf_equals_preset_and_formula(arch, stem):
    torch.manual_seed(0)
    model = build_backbone(arch, stem=stem, width=8)  # the RF is the kernels' and strides' alone: the width is free
    expected = PRESET_RF[arch.split("_")[0]]
    assert receptive_field(model) == expected
    assert measure_receptive_field(model) == expected


def test_measured_rf_of_plain_cifar_resnet18():
    model = build_backbone("resnet18", stem="cifar")
    assert measure_receptive_field(model) == receptive_field(model) == 109


def test_rf_does_not_depend_on_blocks_per_stage():
    rfs = set()
    for layers in [(2, 2, 2, 2), (3, 4, 6, 4), (5, 3, 4, 6)]:
        model = make_resnet("basic", layers, bounded_rf=True, maxpool=False, strides=(2, 2, 2))
        rfs.add((receptive_field(model), measure_receptive_field(model)))
    assert rfs == {(99, 99)}


def test_flops_ratio_rf99_r50_over_r50():
    ratio = rf_resnet.gflops(build_backbone("rf99_resnet50")) / rf_resnet.gflops(build_backbone("resnet50"))
    assert ratio == pytest.approx(3.2, rel=0.10)  # paper Table 11: 106 / 32.8 GFLOPs


def test_bad_arch_and_stem_are_refused():
    with pytest.raises(ValueError, match="rf99_resnet50"):  # the message lists the valid names
        build_backbone("rf98_resnet50")
    with pytest.raises(ValueError, match="rf49_resnet18"):
        build_backbone("rf99_resnet18", stem="cifar")  # rf99 is an ImageNet-stem preset
    with pytest.raises(ValueError, match="stem"):
        build_backbone("resnet18", stem="tiny")


def test_command_line_table_and_plot(tmp_path):
    png = tmp_path / "rf.png"
    proc = in_process.run("rf_resnet.py", ["--stem", "imagenet", "--no-measure", "--plot", png, "--plot-archs",
                                           "rf29_resnet18,rf49_resnet18", "--plot-stem", "cifar", "--plot-size", "64"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| rf99_resnet50 | imagenet | 99 |" in proc.stdout
    assert png.stat().st_size > 0
    bad = in_process.run("rf_resnet.py", ["--plot", png, "--plot-archs", "nope"])
    assert bad.returncode == 2 and "unknown arch 'nope'" in bad.stderr and "Traceback" not in bad.stderr


@pytest.mark.parametrize("arch,stem", [("resnet18", "cifar"), ("rf49_resnet18", "cifar"), ("rf99_resnet50", "imagenet")])
def test_width_scales_parameters_not_receptive_field(arch, stem):
    wide, narrow = build_backbone(arch, stem=stem), build_backbone(arch, stem=stem, width=32)
    ratio = rf_resnet.count_parameters(narrow) / rf_resnet.count_parameters(wide)
    assert 0.24 <= ratio <= 0.26  # every conv has half the inputs and half the outputs: about a quarter
    assert narrow.out_dim == wide.out_dim // 2
    assert receptive_field(narrow) == receptive_field(wide)  # same kernels and strides
    size = 32 if stem == "cifar" else 96
    assert rf_resnet.local_grid(narrow, size) == rf_resnet.local_grid(wide, size)


def test_measured_rf_of_narrow_resnet18_equals_the_wide_one():
    narrow = build_backbone("rf49_resnet18", stem="cifar", width=16)
    assert measure_receptive_field(narrow, image_size=96) == PRESET_RF["rf49"]


def test_width_64_is_the_standard_network_and_bad_widths_are_refused():
    torch.manual_seed(0)
    a = build_backbone("resnet18").state_dict()
    torch.manual_seed(0)
    b = build_backbone("resnet18", width=64).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # same layers, same init draws
    with pytest.raises(ValueError, match="multiple of 4"):
        build_backbone("resnet50", width=30)


@pytest.mark.parametrize("kernel,stride,height,width,bf16", [
    (1, 2, 66, 66, False), (1, 2, 33, 33, False),  # the 1x1 shortcut, even and odd maps
    (3, 2, 1, 1, True), (3, 2, 5, 1, True), (3, 3, 2, 2, True), (7, 2, 1, 1, True), (5, 2, 6, 1, True),  # 1 column
    (3, 2, 1, 5, True), (3, 2, 7, 7, True), (7, 2, 16, 16, True),  # one output row only; ordinary maps
])
def test_cpu_safe_conv_computes_the_strided_convolution(kernel, stride, height, width, bf16):
    """Output, input gradient and weight gradient against a float64 convolution. torch 2.14.1's bf16 kernel
    returned weight gradients up to 1e37 (or NaN) for the one-column outputs on the Intel Xeon with AMX."""
    torch.manual_seed(0)
    conv = rf_resnet.CPUSafeConv2d(16, 32, kernel, stride=stride, padding=kernel // 2, bias=False)
    x = torch.randn(3, 16, height, width, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        y = conv(x)
    grad_y = torch.randn(y.shape)
    y.float().backward(grad_y)
    x64, w64 = x.detach().double().requires_grad_(), conv.weight.detach().double().requires_grad_()
    y64 = F.conv2d(x64, w64, stride=stride, padding=kernel // 2)
    y64.backward(grad_y.double())
    tol = dict(rtol=0, atol=0.03) if bf16 else dict(rtol=0, atol=1e-4)  # relative to each tensor's largest entry
    for ours, ref in ((y, y64), (x.grad, x64.grad), (conv.weight.grad, w64.grad)):
        assert ours.shape == ref.shape
        torch.testing.assert_close(ours.double() / ref.abs().max(), ref / ref.abs().max(), **tol)


CRASH_SHAPES = """
import sys, torch
from rf_resnet import build_backbone
width, amp = int(sys.argv[1]), sys.argv[2] == "bf16"
net = build_backbone("resnet18", stem="cifar", width=width).to(memory_format=torch.channels_last)
x = torch.randn(16, 3, 64, 64).contiguous(memory_format=torch.channels_last)
for _ in range(2):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        loss = net(x).h.float().square().mean()
    loss.backward()
print("ok")
"""


@pytest.mark.parametrize("width,amp", [(8, "fp32"), (12, "bf16")])
def test_narrow_resnet18_at_64_px_trains_in_channels_last_without_crashing(width, amp):
    """The shapes whose strided 1x1 backward crashed oneDNN (docs/rf_resnet.md), in a subprocess: a crash
    there is a non-zero exit code here, not a dead test run."""
    proc = subprocess.run([sys.executable, "-c", CRASH_SHAPES, str(width), amp], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", (proc.returncode, proc.stderr[-1500:])
