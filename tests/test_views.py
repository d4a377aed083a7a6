"""The views on the device (appendix A.3 of every method file) against torchvision's functional ops and
distributions: with fixed parameters each op equals torchvision's (float images: to float precision; uint8
images: within one grey level), and the random parameters follow torchvision's distributions."""
import math

import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from torchvision.transforms import InterpolationMode

import co_byol as views  # the appendix is one text in every method file (test_style)

N_DRAWS = 20_000


def images(n=6, size=32, seed=0):
    u8 = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    return u8, u8.float() / 255


def per_image(fn, imgs, *params):
    return torch.stack([fn(img, *[p[i] for p in params]) for i, img in enumerate(imgs)])


def assert_as_torchvision(ours, tv_float, tv_uint8):
    torch.testing.assert_close(ours, tv_float, rtol=0, atol=2e-4)  # 0.2989 (torchvision) vs 0.299 (PIL) luma
    assert ((ours * 255).round() - tv_uint8.float()).abs().max() <= 1  # one grey level


@pytest.mark.parametrize("size", [32, 14, 8])  # upsampling, downsampling (antialiased), both
def test_resized_crops_are_torchvisions_antialiased_bicubic(size):
    u8, x = images()
    boxes = torch.tensor([[2, 3, 20, 17], [0, 0, 32, 32], [5, 1, 9, 30], [10, 10, 7, 7], [0, 4, 28, 25],
                          [1, 1, 31, 31]], dtype=torch.float)
    crop = lambda img, box: TF.resized_crop(img, *box.int().tolist(), [size, size], InterpolationMode.BICUBIC,
                                            antialias=True)
    assert_as_torchvision(views.resized_crops(x, boxes, size), per_image(crop, x, boxes).clamp(0, 1),
                          per_image(crop, u8, boxes))


@pytest.mark.parametrize("k,fn", list(enumerate([TF.adjust_brightness, TF.adjust_contrast,
                                                 TF.adjust_saturation, TF.adjust_hue])))
def test_each_colour_jitter_op_is_torchvisions(k, fn):
    u8, x = images()
    factors = torch.tensor([-0.1, 0.1, 0.0, 0.05, -0.5, 0.5]) if k == 3 else torch.tensor([0.6, 1.4, 1, 0.8, 1.2, 0])
    call = lambda img, f: fn(img, f.item())
    assert_as_torchvision(views.JITTER_OPS[k](x.clone(), factors), per_image(call, x, factors),
                          per_image(call, u8, factors))


def test_grayscale_blur_solarize_and_flip_are_torchvisions():
    u8, x = images()
    assert_as_torchvision(views.gray(x).expand_as(x), per_image(lambda i: TF.rgb_to_grayscale(i, 3), x),
                          per_image(lambda i: TF.rgb_to_grayscale(i, 3), u8))
    sigma = torch.tensor([0.1, 0.5, 1.0, 1.5, 2.0, 0.7])
    blur = lambda img, s: TF.gaussian_blur(img, [15, 15], [s.item()] * 2)
    assert_as_torchvision(views.gaussian_blur(x, sigma, 15), per_image(blur, x, sigma), per_image(blur, u8, sigma))
    spec = views.ViewSpec(32, (1.0, 1.0), 0.0, 1.0, ratio=(1.0, 1.0), flip_p=1.0, jitter_p=0.0, gray_p=0.0)
    ours, boxes, flipped = views.make_view(x, spec, torch.Generator().manual_seed(0))
    assert boxes.tolist() == [[0, 0, 32, 32]] * 6 and flipped.all()  # the whole image, resized to itself
    assert_as_torchvision(ours, TF.solarize(TF.hflip(x), 128 / 255), TF.solarize(TF.hflip(u8), 128))


def test_zero_strength_is_the_identity():
    _, x = images()
    spec = views.ViewSpec(32, (1.0, 1.0), 0.0, 0.0, ratio=(1.0, 1.0), flip_p=0.0, jitter_p=1.0,
                          jitter=(0.0, 0.0, 0.0, 0.0), gray_p=0.0)
    ours, _, _ = views.make_view(x.clone(), spec, torch.Generator().manual_seed(0))
    torch.testing.assert_close(ours, x, rtol=0, atol=1e-6)


def test_crop_boxes_follow_random_resized_crop():
    """Area fraction, log aspect ratio and position against torchvision's get_params (quantiles of 20,000
    draws each), and the fallback box when no try fits."""
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    ours = views.crop_boxes(N_DRAWS, 32, 24, scale, ratio, torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    ref = torch.tensor([T.RandomResizedCrop.get_params(torch.empty(3, 32, 24), scale, ratio)
                        for _ in range(N_DRAWS)], dtype=torch.float)
    q = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9])
    for stat in (lambda b: b[:, 2] * b[:, 3] / (32 * 24), lambda b: (b[:, 3] / b[:, 2]).log(),
                 lambda b: b[:, 0] / (32 - b[:, 2] + 1), lambda b: b[:, 1] / (24 - b[:, 3] + 1)):
        torch.testing.assert_close(stat(ours).quantile(q), stat(ref).quantile(q), rtol=0, atol=0.03)
    assert (ours[:, 2:] >= 1).all() and (ours[:, 0] + ours[:, 2] <= 32).all() and (ours[:, 1] + ours[:, 3] <= 24).all()
    for height, width in ((4, 32), (32, 4)):  # no try fits at 99 % of the area: the centred fallback
        fallback = T.RandomResizedCrop.get_params(torch.empty(3, height, width), (0.99, 1.0), ratio)
        ours = views.crop_boxes(5, height, width, (0.99, 1.0), ratio, torch.Generator())
        assert ours.tolist() == [list(fallback)] * 5


def test_random_parameters_follow_torchvisions_distributions():
    gen = torch.Generator().manual_seed(0)
    factors, order, apply = views.jitter_params(N_DRAWS, (0.4, 0.4, 0.2, 0.1), 0.8, gen)
    torch.testing.assert_close(factors.min(0).values, torch.tensor([0.6, 0.6, 0.8, -0.1]), rtol=0, atol=1e-3)
    torch.testing.assert_close(factors.max(0).values, torch.tensor([1.4, 1.4, 1.2, 0.1]), rtol=0, atol=1e-3)
    torch.testing.assert_close(factors.mean(0), torch.tensor([1.0, 1.0, 1.0, 0.0]), rtol=0, atol=0.01)
    strong, _, _ = views.jitter_params(N_DRAWS, (1.5, 1.5, 1.5, 0.5), 1.0, gen)  # factors never below 0
    torch.testing.assert_close(strong.min(0).values, torch.tensor([0.0, 0.0, 0.0, -0.5]), rtol=0, atol=1e-3)
    permutations = torch.unique(order, dim=0, return_counts=True)[1]
    assert len(permutations) == 24 and (permutations / N_DRAWS - 1 / 24).abs().max() < 0.01  # ColorJitter's randperm
    se = math.sqrt(0.25 / N_DRAWS)
    assert abs(apply.float().mean() - 0.8) < 5 * se
    # the per-view probabilities, seen in the views themselves: a grey image of 200 / 255, crops of itself
    grey = torch.full((N_DRAWS, 3, 8, 8), 200 / 255)
    for field, p, seen in (("flip_p", 0.3, lambda v, f: f), ("solarize_p", 0.2, lambda v, f: v[:, 0, 0, 0] < 0.5),
                           ("gray_p", 0.2, None)):
        spec = views.ViewSpec(8, (1.0, 1.0), 0.0, 0.0, ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, gray_p=0.0)
        if seen is None:  # grey output of a coloured image
            x = torch.rand(N_DRAWS, 3, 8, 8, generator=gen)
            v, _, _ = views.make_view(x, spec._replace(gray_p=p), gen)
            rate = (v[:, 0] == v[:, 1]).all(-1).all(-1).float().mean()
        else:
            v, _, f = views.make_view(grey.clone(), spec._replace(**{field: p}), gen)
            rate = seen(v, f).float().mean()
        assert abs(rate - p) < 5 * math.sqrt(p * (1 - p) / N_DRAWS), field


def test_blur_probability_and_sigma_follow_gaussian_blur():
    """A dot in a black image: blurred iff its neighbour is lit, and the neighbour / dot ratio exp(-1 / (2 sigma^2))
    gives each image's sigma back, which must be U(0.1, 2) (BYOL's GaussianBlur)."""
    dot = torch.zeros(N_DRAWS, 3, 16, 16)
    dot[:, :, 8, 8] = 1.0
    spec = views.ViewSpec(16, (1.0, 1.0), 0.5, 0.0, ratio=(1.0, 1.0), flip_p=0.0, jitter_p=0.0, gray_p=0.0)
    v, _, _ = views.make_view(dot, spec, torch.Generator().manual_seed(0))
    blurred = v[:, 0, 8, 9] > 0
    assert abs(blurred.float().mean() - 0.5) < 5 * math.sqrt(0.25 / N_DRAWS)
    ratio = (v[blurred, 0, 8, 9] / v[blurred, 0, 8, 8]).double()
    sigma = (-0.5 / ratio.log()).sqrt()
    q = torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.double)
    torch.testing.assert_close(sigma.quantile(q), 0.1 + 1.9 * q, rtol=0, atol=0.03)


def test_normalize_is_the_normalize_transform():
    _, x = images()
    torch.testing.assert_close(views.normalize(x), T.Normalize(views.MEAN, views.STD)(x))


def test_view_batches_draw_from_the_documented_generator_and_resume_mid_epoch():
    """Batch i of epoch e on rank r is MultiView(images, generator seeded with hash((seed, e, i, r))): a resumed
    epoch (the sampler skips the trained batches) continues with the batches an uninterrupted one would have, and
    the caller's RNG stream is untouched."""
    args = views.parse_args(["--dataset", "fake", "--batch-size", "4", "--image-size", "16", "--seed", "7"])
    u8, _ = images(n=16, size=16)
    data = torch.utils.data.TensorDataset(u8, torch.arange(16))
    sampler = views.ResumableSampler(data, 1, 0, args.seed)
    make = views.MultiView(args)
    batches = views.ViewBatches(data, sampler, make, args, torch.device("cpu"), 0, 1)
    batches.epoch = 3
    sampler.set_epoch(3, skip=8)  # two batches of 4 trained before a stop
    torch.manual_seed(123)
    state = torch.get_rng_state()
    got = list(batches)
    assert torch.equal(torch.get_rng_state(), state) and len(got) == 2
    sampler.set_epoch(3)
    order = list(sampler)
    for i, (pair, labels) in enumerate(got, start=2):
        idx = order[4 * i:4 * i + 4]
        assert labels.tolist() == idx
        expected = make(u8[idx].float() / 255, torch.Generator().manual_seed(hash((7, 3, i, 0))))
        assert all(torch.equal(a, b) for a, b in zip(pair, expected))
