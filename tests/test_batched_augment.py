"""The batched augmentation backend against torchvision (ops) and the per-image backend (pipelines)."""

import math

import pytest
import torch
from torchvision.transforms import InterpolationMode, RandomResizedCrop, v2
from torchvision.transforms.v2 import functional as TF

from sslkit.augment import batched as B
from sslkit.augment.base import IMAGENET_MEAN, IMAGENET_STD, ViewPipeline
from sslkit.plugins import load_all
from sslkit.registry import AUGMENTATIONS, RegistryError

load_all()

# float32 ops agree with torchvision's to rounding: values live in [0, 1], so a few ulps of 1 (~1e-7 each)
# accumulated over a handful of arithmetic steps stay far below 1e-5.
FLOAT_ATOL = 1e-5
NUM_DRAWS = 4000
# Two-sample Kolmogorov-Smirnov critical value at alpha = 0.001 for n = m = NUM_DRAWS:
# sqrt(-ln(alpha / 2) / 2) * sqrt(2 / n) = 0.0436. Integer crop sides make the statistic discrete, which only
# makes the test more conservative; the seeds are fixed, so the test is deterministic.
KS_CRITICAL = math.sqrt(-math.log(0.001 / 2) / 2) * math.sqrt(2 / NUM_DRAWS)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _ks(a: torch.Tensor, b: torch.Tensor) -> float:
    """Two-sample Kolmogorov-Smirnov statistic: the largest gap between the empirical CDFs."""
    a, b = a.double().sort().values, b.double().sort().values
    points = torch.cat([a, b])
    cdf_a = torch.searchsorted(a, points, right=True) / len(a)
    cdf_b = torch.searchsorted(b, points, right=True) / len(b)
    return float((cdf_a - cdf_b).abs().max())


def _crop_statistics(boxes: torch.Tensor, height: int, width: int) -> dict[str, torch.Tensor]:
    top, left, h, w = boxes.double().unbind(-1)
    return {"area": h * w / (height * width), "log_ratio": torch.log(w / h),
            "centre_y": (top + h / 2) / height, "centre_x": (left + w / 2) / width}


# --------------------------------------------------------------------------------------------------------------
# Crop parameters
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("height,width,scale,ratio", [
    (32, 32, (0.08, 1.0), (3 / 4, 4 / 3)),
    (24, 48, (0.08, 1.0), (3 / 4, 4 / 3)),  # wide image: many tries rejected, some fall back
    (30, 20, (0.4, 1.0), (0.5, 2.0)),
])
def test_crop_params_follow_torchvision_distribution(height, width, scale, ratio):
    ours = B.sample_resized_crop_params(NUM_DRAWS, height, width, scale, ratio, _gen(1))
    torch.manual_seed(2)
    image = torch.zeros(1, height, width)
    theirs = torch.tensor([RandomResizedCrop.get_params(image, list(scale), list(ratio)) for _ in range(NUM_DRAWS)])
    ours_stats, theirs_stats = _crop_statistics(ours, height, width), _crop_statistics(theirs, height, width)
    for key in ours_stats:
        assert _ks(ours_stats[key], theirs_stats[key]) < KS_CRITICAL, key
    # And the statistic does see a wrong distribution: the same draws with a narrower scale range.
    shifted = B.sample_resized_crop_params(NUM_DRAWS, height, width, (scale[0] + 0.1, scale[1]), ratio, _gen(1))
    assert _ks(_crop_statistics(shifted, height, width)["area"], theirs_stats["area"]) > KS_CRITICAL


@pytest.mark.parametrize("height,width,scale,ratio", [(10, 10, (0.9, 1.0), (2.0, 3.0)),
                                                      (10, 40, (0.95, 1.0), (0.5, 0.8)),
                                                      (16, 12, (1.0, 1.0), (3 / 4, 4 / 3))])
def test_crop_fallback_is_torchvision_central_crop(height, width, scale, ratio):
    boxes = B.sample_resized_crop_params(64, height, width, scale, ratio, _gen())
    top, left, h, w = RandomResizedCrop.get_params(torch.zeros(1, height, width), list(scale), list(ratio))
    if (h, w) != (height, width) or scale[0] < 1.0:  # the all-rejected cases are deterministic
        assert (boxes == torch.tensor([top, left, h, w])).all()
    assert ((boxes[:, 2] > 0) & (boxes[:, 3] > 0)).all()


def test_crop_boxes_lie_inside_the_image():
    boxes = B.sample_resized_crop_params(NUM_DRAWS, 21, 35, (0.05, 1.0), generator=_gen())
    top, left, h, w = boxes.unbind(-1)
    assert boxes.dtype == torch.int64 and (top >= 0).all() and (left >= 0).all()
    assert (top + h <= 21).all() and (left + w <= 35).all() and (h > 0).all() and (w > 0).all()
    assert len(set(map(tuple, boxes.tolist()))) > NUM_DRAWS // 2  # varied, not one box repeated


# --------------------------------------------------------------------------------------------------------------
# Ops against torchvision's functional ops, with fixed per-sample parameters
# --------------------------------------------------------------------------------------------------------------

@pytest.fixture
def images() -> torch.Tensor:
    return torch.rand(12, 3, 37, 45, generator=_gen(3))


def _reference_crop(image, box, size, flip, interpolation, antialias=False):
    top, left, h, w = box.tolist()
    out = TF.resized_crop(image, top, left, h, w, [size, size], interpolation, antialias=antialias)
    return TF.horizontal_flip(out) if flip else out


@pytest.mark.parametrize("mode", [InterpolationMode.BILINEAR, InterpolationMode.NEAREST])
def test_resized_crop_and_flip_match_torchvision(images, mode):
    n = len(images)
    boxes = B.sample_resized_crop_params(n, 37, 45, (0.05, 1.0), generator=_gen(4))  # up- and down-sampling
    flip = torch.arange(n) % 2 == 0
    out = B.resized_crop(images, boxes, 24, flip, mode)
    assert out.shape == (n, 3, 24, 24)
    ref = torch.stack([_reference_crop(images[i], boxes[i], 24, flip[i], mode) for i in range(n)])
    torch.testing.assert_close(out, ref, atol=FLOAT_ATOL, rtol=0)


def test_bicubic_crop_matches_torchvision_when_the_border_repeats():
    # torchvision crops, then its bicubic taps repeat the crop's edge; grid_sample reads the neighbouring image
    # pixels instead. Surround each crop by copies of its edge and the two agree exactly.
    crops = torch.rand(6, 3, 11, 17, generator=_gen(5))
    pad = 3  # bicubic taps reach 2 pixels past the sample position, which stays within 0.5 px of the crop
    padded = torch.nn.functional.pad(crops, (pad, pad, pad, pad), mode="replicate")
    boxes = torch.tensor([[pad, pad, 11, 17]] * 6)
    flip = torch.tensor([False, True] * 3)
    for size in (8, 30):
        out = B.resized_crop(padded, boxes, size, flip, "bicubic")
        ref = torch.stack([_reference_crop(padded[i], boxes[i], size, flip[i], InterpolationMode.BICUBIC)
                           for i in range(6)])
        torch.testing.assert_close(out, ref, atol=FLOAT_ATOL, rtol=0)


@pytest.mark.parametrize("mode", [InterpolationMode.BILINEAR, InterpolationMode.BICUBIC])
@pytest.mark.parametrize("size,box", [(16, [0, 0, 64, 64]), (40, [0, 0, 64, 64]), (20, [3, 7, 30, 50])])
def test_antialias_approximates_torchvision(mode, size, box):
    # White noise is the hardest case for aliasing. Without antialiasing the error to torchvision's
    # antialiased resize is 0.06 to 0.15; the supersampled approximation stays under 0.025.
    noise = torch.rand(4, 3, 64, 64, generator=_gen(6))
    boxes = torch.tensor([box] * 4)
    ref = torch.stack([_reference_crop(img, boxes[0], size, False, mode, antialias=True) for img in noise])
    smooth = B.resized_crop(noise, boxes, size, None, mode, antialias=True)
    aliased = B.resized_crop(noise, boxes, size, None, mode, antialias=False)
    error, aliased_error = (smooth - ref).abs().mean(), (aliased - ref).abs().mean()
    assert error < 0.025 and error < 0.3 * aliased_error


def test_antialias_changes_nothing_when_upsampling(images):
    # 37x45 images to 28 px: supersampled twice along x (a whole-width crop would shrink), but these crops
    # are all <= 28 px, so each output pixel averages identical samples.
    boxes = B.sample_resized_crop_params(len(images), 37, 45, (0.05, 0.3), generator=_gen(7))
    assert (boxes[:, 2:] <= 28).all()
    plain = B.resized_crop(images, boxes, 28, None, "bilinear", antialias=False)
    torch.testing.assert_close(B.resized_crop(images, boxes, 28, None, "bilinear", antialias=True), plain,
                               atol=1e-6, rtol=0)


def test_resized_crops_stacks_views_view_major(images):
    boxes = torch.stack([B.sample_resized_crop_params(len(images), 37, 45, generator=_gen(s)) for s in (8, 9, 10)])
    flip = torch.rand(3, len(images), generator=_gen(11)) < 0.5
    stacked = B.resized_crops(images, boxes, 16, flip, "bicubic")
    assert stacked.shape == (3, len(images), 3, 16, 16)
    for v in range(3):
        torch.testing.assert_close(stacked[v], B.resized_crop(images, boxes[v], 16, flip[v], "bicubic"))


def _factors(n: int, lo: float, hi: float, seed: int) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=_gen(seed))


@pytest.mark.parametrize("ours,theirs,lo,hi", [
    (B.adjust_brightness, TF.adjust_brightness, 0.2, 1.8),
    (B.adjust_contrast, TF.adjust_contrast, 0.2, 1.8),
    (B.adjust_saturation, TF.adjust_saturation, 0.0, 2.0),
    (B.adjust_hue, TF.adjust_hue, -0.5, 0.5),
])
def test_colour_ops_match_torchvision(images, ours, theirs, lo, hi):
    factors = _factors(len(images), lo, hi, 12)
    out = ours(images, factors)
    ref = torch.stack([theirs(img, float(f)) for img, f in zip(images, factors)])
    torch.testing.assert_close(out, ref, atol=FLOAT_ATOL, rtol=0)


def test_hue_handles_grey_and_saturated_pixels():
    grey = torch.full((1, 3, 2, 2), 0.5)
    primaries = torch.eye(3).view(3, 3, 1, 1).expand(3, 3, 2, 2).clone()  # pure red, green, blue images
    for x in (grey, primaries):
        for f in (-0.5, -1 / 3, 0.25, 0.5):
            out = B.adjust_hue(x, torch.full((len(x),), f))
            torch.testing.assert_close(out, torch.stack([TF.adjust_hue(img, f) for img in x]),
                                       atol=FLOAT_ATOL, rtol=0)


def test_grayscale_matches_torchvision(images):
    apply = torch.arange(len(images)) % 3 == 0
    out = B.apply_grayscale(images, apply)
    ref = torch.stack([TF.rgb_to_grayscale(img, 3) if a else img for img, a in zip(images, apply)])
    torch.testing.assert_close(out, ref, atol=FLOAT_ATOL, rtol=0)
    torch.testing.assert_close(B.rgb_to_grayscale(images), TF.rgb_to_grayscale(images), atol=FLOAT_ATOL, rtol=0)


@pytest.mark.parametrize("kernel_size", [3, 9])
def test_gaussian_blur_matches_torchvision(images, kernel_size):
    sigma = _factors(len(images), 0.1, 2.0, 13).double()
    apply = torch.arange(len(images)) % 4 != 1
    out = B.gaussian_blur(images, kernel_size, sigma, apply)
    ref = torch.stack([TF.gaussian_blur(img, [kernel_size] * 2, [float(s)] * 2) if a else img
                       for img, s, a in zip(images, sigma, apply)])
    torch.testing.assert_close(out, ref, atol=FLOAT_ATOL, rtol=0)
    assert torch.equal(out[~apply], images[~apply])


def test_solarize_matches_torchvision(images):
    apply = torch.arange(len(images)) % 2 == 0
    out = B.solarize(images, 0.5, apply)
    ref = torch.stack([TF.solarize(img, 0.5) if a else img for img, a in zip(images, apply)])
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    per_sample = B.solarize(images, torch.full((len(images),), 0.5), apply)
    torch.testing.assert_close(per_sample, ref, atol=0, rtol=0)


def _jitter_reference(image, factors, order):
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for op in order.tolist():
        image = ops[op](image, float(factors[op]))
    return image


def test_color_jitter_applies_each_samples_order(images):
    n = len(images)
    factors = torch.stack([_factors(n, 0.2, 1.8, 14), _factors(n, 0.2, 1.8, 15), _factors(n, 0.0, 2.0, 16),
                           _factors(n, -0.5, 0.5, 17)], dim=1).double()
    factors[::3] = torch.tensor(B.NEUTRAL_FACTORS, dtype=torch.float64)  # samples the jitter skipped
    order = torch.rand(n, 4, generator=_gen(18)).argsort(dim=1)
    out = B.color_jitter(images, factors, order)
    ref = torch.stack([_jitter_reference(img, f, o) for img, f, o in zip(images, factors, order)])
    torch.testing.assert_close(out, ref, atol=FLOAT_ATOL, rtol=0)
    assert torch.equal(out[::3], images[::3])
    # The order matters: applying every sample's ops in one fixed order gives a different result.
    fixed = B.color_jitter(images, factors, torch.arange(4).repeat(n, 1))
    assert not torch.allclose(fixed, out, atol=1e-3)


# Against float32: float64 is as close as float32 is to torchvision; bfloat16 keeps 8 significant bits
# (0.004 at 1.0), and a jitter rounds about 8 times.
@pytest.mark.parametrize("dtype,atol", [(torch.float64, FLOAT_ATOL), (torch.bfloat16, 0.03)])
def test_ops_run_in_other_float_dtypes(images, dtype, atol):
    n = len(images)
    x = images.to(dtype)
    boxes = B.sample_resized_crop_params(n, 37, 45, generator=_gen(19))
    factors = torch.tensor([[1.3, 0.7, 1.5, 0.2]], dtype=torch.float64).repeat(n, 1)
    order = torch.rand(n, 4, generator=_gen(20)).argsort(dim=1)
    sigma = torch.full((n,), 1.0, dtype=torch.float64)
    for fn in (lambda t: B.resized_crop(t, boxes, 20, None, "bicubic", antialias=True),
               lambda t: B.color_jitter(t, factors, order),
               lambda t: B.gaussian_blur(t, 5, sigma), lambda t: B.solarize(t, 0.5)):
        out = fn(x)
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), fn(images), atol=atol, rtol=0)


# --------------------------------------------------------------------------------------------------------------
# Pipelines
# --------------------------------------------------------------------------------------------------------------

PIPELINE_CASES = [
    ("simclr", {}),
    ("simclr", {"preset": "imagenet", "image_size": 24}),
    ("multicrop", {}),
    ("multicrop", {"image_size": 32, "local_size": 16, "num_local": 3, "preset": "small"}),
    ("mae", {"image_size": 28}),
]
SMALL_CASES = [PIPELINE_CASES[i] for i in (1, 3, 4)]  # the recipes at 16-32 px, for the slower checks


def _uint8(n: int, height: int, width: int, seed: int = 21) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, height, width), dtype=torch.uint8, generator=_gen(seed))


@pytest.mark.parametrize("name,kwargs", PIPELINE_CASES)
@pytest.mark.parametrize("src", [(28, 28), (40, 33)])
def test_pipeline_contract(name, kwargs, src):
    reference = AUGMENTATIONS.build(name, **kwargs)
    pipe = B.batched_pipeline(name, **kwargs)
    images = _uint8(4, *src)
    views = pipe(images, _gen())
    assert len(views) == pipe.num_views == reference.num_views
    assert pipe.view_sizes == reference.view_sizes
    lo = (0 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    hi = (1 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)
    for view, size in zip(views, pipe.view_sizes):
        assert view.shape == (4, 3, size, size) and view.dtype == torch.float32
        channel_min = view.amin(dim=(0, 2, 3))
        channel_max = view.amax(dim=(0, 2, 3))
        assert (channel_min >= lo - 1e-5).all() and (channel_max <= hi + 1e-5).all()


@pytest.mark.parametrize("name,kwargs", SMALL_CASES)
def test_pipeline_is_reproducible_from_its_generator(name, kwargs):
    pipe = B.batched_pipeline(name, **kwargs)
    images = _uint8(6, 32, 32)
    first, again, other = pipe(images, _gen(1)), pipe(images, _gen(1)), pipe(images, _gen(2))
    for a, b, c in zip(first, again, other):
        assert torch.equal(a, b)
        assert not torch.allclose(a, c)


def test_samples_and_views_get_their_own_parameters():
    pipe = B.batched_pipeline("simclr", preset="imagenet", image_size=24)
    images = _uint8(1, 24, 24).expand(16, -1, -1, -1)  # one image, 16 times
    first, second = pipe(images, _gen())
    distinct = {tuple(v.flatten()[:64].tolist()) for v in first}
    assert len(distinct) == 16  # every sample its own crop, flip and colours
    assert not torch.allclose(first, second)  # and the two views differ


def test_parameters_follow_the_per_image_recipe():
    # DINO's asymmetric views (multicrop "imagenet" preset): blur p = 1.0 / 0.1 / 0.5, solarise only on view 2.
    pipe = B.batched_pipeline("multicrop", image_size=32, local_size=16, num_local=2)
    params = pipe.sample_params(NUM_DRAWS, 48, 48, _gen())
    tolerance = 4 * math.sqrt(0.25 / NUM_DRAWS)  # 4 binomial standard deviations at worst (p = 0.5)
    expected = {"blur": (1.0, 0.1, 0.5, 0.5), "solarize": (0.0, 0.2, 0.0, 0.0), "flip": (0.5,) * 4,
                "gray": (0.2,) * 4}
    for key, rates in expected.items():
        for view, rate in zip(params, rates):
            assert abs(getattr(view, key).float().mean().item() - rate) < tolerance, key
    for view in params:
        jittered = (view.factors != torch.tensor(B.NEUTRAL_FACTORS, dtype=torch.float64)).any(dim=1)
        assert abs(jittered.float().mean().item() - 0.8) < tolerance
        f = view.factors[jittered]
        assert f[:, :2].min() >= 0.6 and f[:, :2].max() <= 1.4 and f[:, 2].min() >= 0.8 and f[:, 2].max() <= 1.2
        assert f[:, 3].abs().max() <= 0.1
        assert (view.sigma >= 0.1).all() and (view.sigma <= 2.0).all()
        area = view.boxes[:, 2] * view.boxes[:, 3] / 48**2
        assert area.min() > 0.03 and area.max() <= 1.0
    globals_area = torch.cat([v.boxes[:, 2] * v.boxes[:, 3] for v in params[:2]]) / 48**2
    assert globals_area.min() >= 0.4 - 0.05 and globals_area.mean() > 0.6  # global crops: scale (0.4, 1)


def _compose_reference(images, params, specs, crop=None):
    """torchvision's functional ops, one sample at a time, with the batched pipeline's parameters."""
    source = images.float() / 255
    views = []
    for v, (p, spec) in enumerate(zip(params, specs)):
        mode = {"bilinear": InterpolationMode.BILINEAR, "bicubic": InterpolationMode.BICUBIC}[spec.interpolation]
        out = []
        for i in range(len(images)):
            x = crop[v][i] if crop is not None else _reference_crop(source[i], p.boxes[i], spec.size, p.flip[i], mode)
            x = _jitter_reference(x, p.factors[i], p.order[i])
            x = TF.rgb_to_grayscale(x, 3) if p.gray[i] else x
            if spec.blur_p > 0 and p.blur[i]:
                x = TF.gaussian_blur(x, [spec.blur_kernel] * 2, [float(p.sigma[i])] * 2)
            x = TF.solarize(x, spec.solarize_threshold) if p.solarize[i] else x
            out.append(TF.normalize(x, list(spec.mean), list(spec.std)))
        views.append(torch.stack(out))
    return views


def test_simclr_views_equal_torchvision_ops_with_the_same_parameters():
    pipe = B.batched_pipeline("simclr", preset="imagenet", image_size=32)  # bilinear, blur p = 0.5
    images = _uint8(24, 32, 32)
    params = pipe.sample_params(24, 32, 32, _gen(3))
    views = pipe.apply(images, params)
    for view, ref in zip(views, _compose_reference(images, params, pipe.specs)):
        torch.testing.assert_close(view, ref, atol=1e-4, rtol=0)  # 1e-5 in [0, 1], divided by std ~0.22


def test_multicrop_views_equal_torchvision_ops_with_the_same_parameters():
    # Bicubic crops are tested on their own above; this checks the colour, blur and solarise stages and
    # which parameters reach which view when views of one size are stacked.
    pipe = B.batched_pipeline("multicrop", image_size=24, local_size=12, num_local=2, solarize_p=0.5)
    images = _uint8(16, 24, 24)
    params = pipe.sample_params(16, 24, 24, _gen(4))
    assert any(p.solarize.any() for p in params) and any(p.blur.any() for p in params)
    crops = [B.resized_crop(images.float() / 255, p.boxes, s.size, p.flip, "bicubic", True).clamp(0, 1)
             for p, s in zip(params, pipe.specs)]
    views = pipe.apply(images, params)
    for view, ref in zip(views, _compose_reference(images, params, pipe.specs, crops)):
        torch.testing.assert_close(view, ref, atol=1e-4, rtol=0)


@pytest.mark.parametrize("name,kwargs", [
    ("simclr", {"image_size": 24, "crop_scale": [1.0, 1.0], "flip_p": 0.0, "jitter_p": 0.0, "gray_p": 0.0}),
    ("mae", {"image_size": 24, "crop_scale": [1.0, 1.0], "flip_p": 0.0}),
    ("multicrop", {"image_size": 24, "num_local": 0, "global_scale": [1.0, 1.0], "flip_p": 0.0, "jitter_p": 0.0,
                   "gray_p": 0.0, "preset": "small", "solarize_p": 0.0}),
])
def test_deterministic_views_equal_the_per_image_pipeline(name, kwargs):
    # With every random op switched off, a view is the normalised full image: both backends must agree to
    # float rounding (same normalisation constants, view order and sizes).
    reference = AUGMENTATIONS.build(name, **kwargs)
    images = _uint8(3, 24, 24)
    views = B.batched_pipeline(name, **kwargs)(images, _gen())
    for v, view in enumerate(views):
        ref = torch.stack([reference(img)[v] for img in images])
        torch.testing.assert_close(view, ref, atol=FLOAT_ATOL, rtol=0)


def test_low_precision_pipeline_stays_close_to_float32():
    float32 = B.batched_pipeline("simclr", preset="imagenet", image_size=24)
    bf16 = B.BatchedPipeline(float32.specs, dtype=torch.bfloat16)
    images = _uint8(8, 24, 24)
    for a, b in zip(float32(images, _gen(6)), bf16(images, _gen(6))):
        assert b.dtype == torch.float32
        # 0.03 in [0, 1] (see test_ops_run_in_other_float_dtypes) divided by the smallest std, 0.224
        torch.testing.assert_close(b, a, atol=0.03 / 0.224, rtol=0)


def test_unknown_pipeline_lists_the_supported_ones():
    # Any registered pipeline made of translatable transforms has a batched twin; an unknown name lists them.
    with pytest.raises(RegistryError, match="Valid augmentations: mae, multicrop, simclr"):
        B.batched_pipeline("byol_views")


def test_arguments_are_validated_like_the_per_image_factory():
    with pytest.raises(RegistryError, match="jiter_p"):
        B.batched_pipeline("simclr", jiter_p=0.5)
    with pytest.raises(ValueError, match="crop_scale"):
        B.batched_pipeline("simclr", crop_scale=[0.9, 0.1])


def test_untranslatable_transforms_are_refused():
    crop = v2.RandomResizedCrop(16)
    tail = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    with pytest.raises(ValueError, match="RandomRotation"):
        B.BatchedPipeline.from_view_pipeline(ViewPipeline([v2.Compose([crop, v2.RandomRotation(10), *tail])], [16]))
    with pytest.raises(ValueError, match="out of order"):
        B.BatchedPipeline.from_view_pipeline(ViewPipeline([v2.Compose([crop, v2.RandomGrayscale(0.2),
                                                                       v2.ColorJitter(0.4), *tail])], [16]))


def test_pipeline_rejects_non_uint8_batches():
    pipe = B.batched_pipeline("mae", image_size=16)
    with pytest.raises(ValueError, match="uint8"):
        pipe(torch.rand(2, 3, 16, 16))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name,kwargs", SMALL_CASES)
def test_cuda_views_equal_cpu_views(name, kwargs):
    pipe = B.batched_pipeline(name, **kwargs)
    images = _uint8(8, 40, 36)
    cpu = pipe(images, _gen(5))
    cuda = pipe(images.cuda(), _gen(5))
    for a, b in zip(cpu, cuda):
        assert b.is_cuda and b.dtype == torch.float32
        torch.testing.assert_close(b.cpu(), a, atol=1e-3, rtol=0)
