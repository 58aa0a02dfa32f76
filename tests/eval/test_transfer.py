"""Evaluate anything on anything: a run on an image folder, timm: with local weights, random: and pixels sources,
the feature-cache key, and the errors users get (sslkit.eval.sources)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import timm
import torch
import torchvision.transforms.v2.functional as TF
from PIL import Image
from safetensors.torch import save_file

from sslkit.augment.base import IMAGENET_MEAN, IMAGENET_STD
from sslkit.cli import main as sslkit_main
from sslkit.config import resolve
from sslkit.data.base import DataError
from sslkit.data.image_folder import decode_image
from sslkit.eval import run_knn, run_retrieval
from sslkit.eval.knn import headline_protocols
from sslkit.eval.report import load_context
from sslkit.eval.sources import FOLDER_EVAL_FRACTION, dataset_spec, parse_source
from sslkit.registry import ENCODERS
from sslkit.run import RunError, load_encoder
from tests.test_export import hand_made_run

CLASSES = ("ant", "bee", "cat")
PER_CLASS = 5


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """3 classes x 5 noise PNGs of different sizes (labels are not learnable: the k-NN figures are not 0 or 100)."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir()
        for i in range(PER_CLASS):
            h, w = 36 + 2 * i, 40 + 3 * c
            img = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
            img[: h // 2, : w // 2] = (60 * c, 80, 255 - 60 * c)  # a class colour in one quadrant
            Image.fromarray(img).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def hand_run(tmp_path_factory):
    """A run directory made by hand (random resnet_cifar weights) for the quick tests."""
    return hand_made_run(tmp_path_factory.mktemp("runs") / "hand-1")


def _files(ds):
    return [str(f) for f in ds.files]


def view(path, size, mean=IMAGENET_MEAN, std=IMAGENET_STD, resize=None):
    """The evaluation view by hand: resize the uint8 image's short side, centre-crop, scale, normalise."""
    img = TF.center_crop(TF.resize(decode_image(path), resize or size, antialias=True), [size, size]).float() / 255
    return ((img - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None])[None]  # (1, 3, s, s)


def test_run_on_folder_cli_equals_api(tiny_recipe, folder, capsys):
    """A run pretrained on synthetic shapes, evaluated on a folder of PNGs: CLI and API give the same numbers, the
    folder is split per class, and the features are the encoder's on the decoded, resized images."""
    from sslkit.engine import train

    cfg = resolve(tiny_recipe(data={"args": {"num_samples": 32, "image_size": 32}}, trainer={"epochs": 1}))
    run = train(cfg).run_dir

    assert sslkit_main(["eval", "knn", str(run), "--dataset", str(folder), "--k", "3", "5", "--no-plots",
                        "--no-progress", "--no-cache"]) == 0
    path = capsys.readouterr().out.strip().splitlines()[-1].removeprefix("results: ")
    cli_res = json.loads(open(path).read())
    api_res = run_knn(run, dataset=folder, k=[3, 5], plots=False, progress=False)
    assert api_res["metrics"] == cli_res["metrics"] and api_res["results_path"] == path
    assert path.startswith(str(run / "transfer")) and "/eval/knn/" in path  # the run's own eval/ is untouched
    assert not (run / "eval" / "knn").exists()

    # the split: ceil(20%) of each class held out, disjoint from the bank, together all images
    ctx = load_context(run, dataset=folder, progress=False)
    train_ds, test_ds = ctx.dataset("train"), ctx.dataset(ctx.eval_split)
    held = math.ceil(FOLDER_EVAL_FRACTION * PER_CLASS)
    assert len(test_ds) == held * len(CLASSES) and len(train_ds) == (PER_CLASS - held) * len(CLASSES)
    assert not set(_files(train_ds)) & set(_files(test_ds))
    assert sorted(_files(train_ds) + _files(test_ds)) == sorted(str(p) for p in folder.rglob("*.png"))
    assert test_ds.labels.bincount().tolist() == [held] * len(CLASSES)

    # the features: the run's encoder on each decoded image, resized and normalised (the batched eval view)
    enc, _ = load_encoder(run)
    tr, te = ctx.features("train"), ctx.features(ctx.eval_split)
    with torch.no_grad():
        want = torch.cat([enc(view(f, 32)) for f in train_ds.files])
    torch.testing.assert_close(tr.features, want, atol=1e-4, rtol=1e-4)
    ref = headline_protocols(tr.features, tr.labels, te.features, te.labels, k=5, num_classes=len(CLASSES))
    assert api_res["metrics"]["5"]["top1"] == pytest.approx(ref["top1"])
    assert api_res["features"]["dataset_spec"]["root"] == str(folder.resolve())

    # retrieval through both paths too
    assert sslkit_main(["eval", "retrieval", str(run), "--dataset", str(folder), "--no-plots", "--no-progress",
                        "--ks", "1", "3"]) == 0
    out = capsys.readouterr().out
    api_ret = run_retrieval(run, dataset=folder, ks=[1, 3], plots=False, progress=False)
    cli_ret = json.loads(open(out.strip().splitlines()[-1].removeprefix("results: ")).read())
    assert cli_ret["metrics"]["map@r"] == api_ret["metrics"]["map@r"]


def test_timm_source_with_local_weights(folder, tmp_path):
    """timm:<name> --weights FILE gives the features timm's model computes, with its own mean/std (0.5 here)."""
    name = "vit_tiny_patch16_224"
    torch.manual_seed(1)
    trained = timm.create_model(name, pretrained=False)  # with its 1000-class head, as checkpoints come
    weights = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(weights))

    ctx = load_context(f"timm:{name}", weights=weights, dataset=folder, progress=False, out_dir=tmp_path / "out")
    assert ctx.image_size == 224
    got = ctx.features("train")

    ref = timm.create_model(name, pretrained=False, num_classes=0).eval()
    ref.load_state_dict({k: v for k, v in trained.state_dict().items() if not k.startswith("head.")})
    mean, std = ref.pretrained_cfg["mean"], ref.pretrained_cfg["std"]
    assert list(mean) == [0.5, 0.5, 0.5]  # differs from ImageNet's: the source re-normalises
    with torch.no_grad():  # the short side to 224 / 0.875 = 256, centre crop 224
        want = torch.cat([ref(view(f, 224, mean, std, resize=256)) for f in ctx.dataset("train").files])
    torch.testing.assert_close(got.features, want, atol=2e-4, rtol=1e-3)

    # a .pth state dict under "state_dict" (timm's training checkpoints) loads the same, safely
    pth = tmp_path / "vit.pth"
    torch.save({"state_dict": trained.state_dict(), "epoch": 3}, pth)
    again = load_context(f"timm:{name}", weights=pth, dataset=folder, progress=False, use_cache=False,
                         out_dir=tmp_path / "out2").features("train")
    torch.testing.assert_close(again.features, got.features)


def test_random_and_pixel_sources(folder, tmp_path):
    ctx = load_context("random:resnet_cifar", dataset=folder, seed=3, progress=False, out_dir=tmp_path / "r",
                       image_size=32)
    got = ctx.features("train").features
    torch.manual_seed(3)
    enc = ENCODERS.build("resnet_cifar").eval()
    with torch.no_grad():
        want = torch.cat([enc(view(f, 32)) for f in ctx.dataset("train").files])
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)

    pix = load_context("pixels", dataset=folder, progress=False, out_dir=tmp_path / "p")
    img = decode_image(pix.dataset("train").files[0])
    side = min(img.shape[-2:])
    assert pix.baseline == "pixels" and pix.image_size == side  # the first image's short side
    first = pix.features("train").features[0]
    want = TF.center_crop(TF.resize(img, side, antialias=True), [side, side]).float().flatten() / 255
    torch.testing.assert_close(first, want, atol=1e-5, rtol=0)


def test_cache_key_follows_source_dataset_and_split(hand_run, folder, tmp_path):
    name = "resnet10t"
    torch.manual_seed(0)
    weights = tmp_path / "w.safetensors"
    save_file(timm.create_model(name, num_classes=0).state_dict(), str(weights))
    opts = {"dataset": folder, "progress": False, "out_dir": tmp_path / "o", "image_size": 32}
    first = load_context(f"timm:{name}", weights=weights, **opts).features("train")
    assert not first.from_cache
    assert load_context(f"timm:{name}", weights=weights, **opts).features("train").from_cache
    torch.manual_seed(1)  # other weights in the same file name: a new key
    save_file(timm.create_model(name, num_classes=0).state_dict(), str(weights))
    other = load_context(f"timm:{name}", weights=weights, **opts).features("train")
    assert not other.from_cache and other.key != first.key and not torch.equal(other.features, first.features)

    def key(**kw):
        return load_context(hand_run, progress=False, **kw).features("train").key

    base = key(dataset="synthetic", dataset_args=["num_samples=12"])
    assert key(dataset="synthetic", dataset_args={"num_samples": 12}) == base
    assert key(dataset="synthetic", dataset_args=["num_samples=12", "seed=1"]) != base
    assert key(dataset="synthetic", dataset_args=["num_samples=12"], train_subset=6) != base
    assert key(dataset="synthetic", dataset_args=["num_samples=12"], train_split="test", eval_split="train") != base
    assert key(dataset="synthetic", dataset_args=["num_samples=12"], bf16=True) != base
    sub = [key(dataset=folder, train_subset=5, seed=s) for s in (0, 1)]  # folder subsets of one size differ
    assert sub[0] != sub[1]


def test_errors_name_the_fix(hand_run, folder, tmp_path, capsys):
    with pytest.raises(RunError, match="--weights"):
        parse_source("timm:resnet18")
    with pytest.raises(RunError, match="timm:<name> sources only"):
        parse_source(str(hand_run), weights="x.pth")
    with pytest.raises(DataError, match="need a dataset"):
        load_context("random:resnet_cifar", progress=False, out_dir=tmp_path / "e", image_size=32).dataset("train")
    with pytest.raises(DataError, match="neither a registered dataset"):
        dataset_spec("no_such_set")
    with pytest.raises(DataError, match="key=value"):
        dataset_spec("synthetic", ["num_samples"])
    with pytest.raises(DataError, match="both 'train'"):
        dataset_spec(folder, eval_split="train")

    wrong = tmp_path / "resnet.safetensors"  # weights of another architecture
    save_file(timm.create_model("resnet10t", num_classes=0).state_dict(), str(wrong))
    with pytest.raises(RunError, match="does not fit"):
        load_context("timm:vit_tiny_patch16_224", weights=wrong, dataset=folder, progress=False,
                     out_dir=tmp_path / "w").features("train")
    ckpt = tmp_path / "last.ckpt.pth"  # an sslkit training checkpoint is not a weights file
    torch.save({"format": "sslkit", "objective": {}, "step": 1}, ckpt)
    with pytest.raises(RunError, match="training checkpoint"):
        load_context("timm:resnet10t", weights=ckpt, dataset=folder, progress=False,
                     out_dir=tmp_path / "c").features("train")
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(wrong.read_bytes()[:100])
    with pytest.raises(RunError, match="truncated"):
        load_context("timm:resnet10t", weights=truncated, dataset=folder, progress=False,
                     out_dir=tmp_path / "t").features("train")

    assert sslkit_main(["eval", "knn", "pixels", "--no-progress"]) == 2
    assert "need a dataset" in capsys.readouterr().err
    assert sslkit_main(["eval", "knn", "timm:resnet10t", "--dataset", str(folder), "--no-progress"]) == 2
    assert "random:timm:resnet10t" in capsys.readouterr().err


def test_encoder_arg_changes_the_pooling_not_the_weights(tiny_recipe, folder, capsys):
    """`--encoder-arg pool=grid pool_grid=2` evaluates the run's ViT on its patch grid (the same weights, features
    pooled by hand from its patch tokens), beside the run's own results; a wrong key or a non-run source is named."""
    from sslkit.engine import train

    cfg = resolve(tiny_recipe(data={"args": {"num_samples": 32, "image_size": 32}}, trainer={"epochs": 1}))
    run = train(cfg).run_dir
    args = ["eval", "knn", str(run), "--dataset", str(folder), "--k", "3", "--no-plots", "--no-progress"]
    assert sslkit_main([*args, "--encoder-arg", "pool=grid", "--encoder-arg", "pool_grid=2"]) == 0
    grid_path = capsys.readouterr().out.strip().splitlines()[-1].removeprefix("results: ")
    assert sslkit_main(args) == 0
    plain_path = capsys.readouterr().out.strip().splitlines()[-1].removeprefix("results: ")
    assert grid_path != plain_path and "-poolgrid" in grid_path and grid_path.startswith(str(run / "transfer"))

    ctx = load_context(run, dataset=folder, progress=False, encoder_args=["pool=grid", "pool_grid=2"])
    feats = ctx.features("train")
    enc, _ = load_encoder(run)  # the recipe's encoder: class token
    assert enc.pool == "token"
    with torch.no_grad():
        want = []
        for f in ctx.dataset("train").files:
            patches = enc.forward_tokens(view(f, 32)).patches  # (1, 64, D): an 8 x 8 grid
            d = patches.shape[-1]
            fmap = patches.reshape(1, 8, 8, d).permute(0, 3, 1, 2)
            want.append(fmap.reshape(1, d, 2, 4, 2, 4).mean(dim=(3, 5)).flatten(1))  # 2 x 2 cells of 4 x 4 patches
    torch.testing.assert_close(feats.features, torch.cat(want), atol=1e-4, rtol=1e-4)
    plain = load_context(run, dataset=folder, progress=False).features("train")
    assert plain.features.shape[1] == d and feats.features.shape[1] == 4 * d  # its own cache entry

    assert sslkit_main([*args, "--encoder-arg", "pool_gird=2"]) != 0
    assert "--encoder-arg 'pool_gird'" in capsys.readouterr().err
    with pytest.raises(DataError, match="not a run"):
        load_context("pixels", dataset=folder, encoder_args={"pool": "token"})
