"""The 2-core CPU recipes (`*_fmnist.yaml`): they resolve, follow the evaluation protocol of the time-to-accuracy
benchmark, and train through the real engine (a few steps on a Fashion-MNIST subset, online monitor included)."""

import csv
from pathlib import Path

import pytest
import torch

from sslkit.config import load_recipe
from sslkit.data.fashion_mnist import DEBIAN_DIR
from sslkit.engine import build_objective, train
from sslkit.registry import AUGMENTATIONS
from sslkit.run import as_eval_encoder, load_encoder

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
CPU_DEFAULTS = ["simclr_resnet_fmnist", "dino_resnet_fmnist", "mae_vit_tiny_fmnist"]


@pytest.mark.parametrize("name", CPU_DEFAULTS)
def test_cpu_recipe_uses_the_reference_protocol(name):
    cfg = load_recipe(RECIPES / f"{name}.yaml")
    assert cfg.name == name
    assert cfg.data.name == "fashion_mnist" and cfg.data.subset is None  # the full 60k train split
    # The final k-NN is the reference: k=20, full 60k bank and 10k test images, at the native 28 px.
    assert cfg.eval.final_knn and cfg.eval.knn_k == 20
    assert cfg.eval.knn_train_subset is None and cfg.eval.knn_test_subset is None
    assert (cfg.eval.image_size or cfg.augment.image_size) == 28


@pytest.mark.parametrize("name", ["simclr_resnet_fmnist", "dino_resnet_fmnist"])
def test_cnn_recipes_train_at_20px_and_evaluate_at_28px(name):
    cfg = load_recipe(RECIPES / f"{name}.yaml")
    objective = build_objective(cfg)
    views = AUGMENTATIONS.build(cfg.augment.name, **{k: v for k, v in cfg.augment.items() if k != "name"})
    crops = views(torch.randint(0, 256, (3, 28, 28), dtype=torch.uint8))
    assert crops[0].shape == (3, 20, 20)
    out = objective([torch.stack([c, c.flip(-1)]) for c in crops], 0)
    assert torch.isfinite(out["loss"])
    x = torch.randn(2, 3, 28, 28)
    assert objective.eval_encoder().eval()(x).shape == (2, 256 * 2 * 2)  # the head's input: 4x4 map pooled to 2x2
    # Evaluation sees the whole 4x4 map at 28 px (eval.encoder_args.pool_grid 4), on the same weights.
    assert as_eval_encoder(cfg, objective.eval_encoder()).eval()(x).shape == (2, 256 * 4 * 4)


@pytest.mark.parametrize("name", CPU_DEFAULTS)
def test_cpu_recipes_fit_the_time_budget(name):
    cfg = load_recipe(RECIPES / f"{name}.yaml")
    assert 0 < cfg.trainer.time_budget_minutes < 30  # the budget is 30 minutes of pretraining


@pytest.mark.skipif(not DEBIAN_DIR.is_dir(), reason="dataset-fashion-mnist is not installed")
@pytest.mark.parametrize("name", CPU_DEFAULTS)
def test_cpu_recipe_trains_through_the_engine(name, tmp_path):
    """Two short epochs of each recipe on 512 images with the monitor on: loss finite, curve logged with the
    pretraining seconds the benchmark plots against, encoder exported, final k-NN next to raw pixels."""
    cfg = load_recipe(RECIPES / f"{name}.yaml", [
        f"output_dir={tmp_path}", "data.subset=512", "data.batch_size=128", "data.num_workers=0", "trainer.epochs=2",
        "optim.warmup_epochs=1", "trainer.progress=false", "eval.knn_every=1", "eval.monitor_train_subset=300",
        "eval.monitor_test_subset=100", "eval.knn_train_subset=400", "eval.knn_test_subset=100"])
    result = train(cfg)
    assert result.steps == 8
    with (result.run_dir / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    monitor = [r for r in rows if r.get("knn_top1") and r.get("epoch") == "1"]
    assert len(monitor) == 1 and 0.0 < float(monitor[0]["train_seconds"]) < 600
    assert all(torch.isfinite(torch.tensor(float(r["loss"]))) for r in rows if r.get("loss"))
    assert result.knn is not None and result.knn["bank"] == 400 and "pixels_top1" in result.knn
    # Encoder and pixels centred alike (the recipes' default), with DINO's uncentred figure alongside.
    assert cfg.eval.knn_center and 0.0 <= result.knn["top1_uncentred"] <= 100.0
    encoder, _ = load_encoder(result.run_dir)
    assert encoder(torch.randn(2, 3, 28, 28)).shape[0] == 2


@pytest.mark.parametrize(("center", "whiten"), [(True, None), (False, None), (True, 8)])
def test_pixel_baseline_follows_the_centring_choice(center, whiten):
    """The monitor's raw-pixel baseline (eval's pixel_knn) is knn_classify on one channel of the flattened gray
    images: the headline centred or not as the recipe says, never whitened; the uncentred and whitened figures
    beside it."""
    from types import SimpleNamespace

    from sslkit.eval.baselines import pixel_knn
    from sslkit.eval.knn import knn_classify

    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (90,), generator=g)
    gray = (torch.rand(90, 1, 6, 6, generator=g) * 60 + labels.view(-1, 1, 1, 1) * 40 + 100).to(torch.uint8)
    ds = SimpleNamespace(images=gray.expand(-1, 3, -1, -1), labels=labels)
    bank, queries = SimpleNamespace(images=ds.images[:60], labels=labels[:60]), SimpleNamespace(
        images=ds.images[60:], labels=labels[60:])
    out = pixel_knn(bank, queries, k=5, temperature=0.07, center=center, whiten=whiten)
    flat = gray.float().flatten(1)

    def ref(c: bool, w: int | None = None) -> float:
        return knn_classify(flat[:60], labels[:60], flat[60:], labels[60:], k=5, center=c, whiten=w)["top1"]

    assert out["pixels_top1"] == pytest.approx(ref(center))
    assert ("pixels_top1_uncentred" in out) == center
    assert ("pixels_top1_whitened" in out) == (whiten is not None)
    if center:
        assert out["pixels_top1_uncentred"] == pytest.approx(ref(False))
    if whiten:
        assert out["pixels_top1_whitened"] == pytest.approx(ref(True, whiten))
    assert pixel_knn(object(), object(), k=5) == {}  # datasets not held in memory: no baseline


def test_final_knn_line_names_the_protocol_and_gives_the_plainer_figures():
    """The line `make pretrain-*` ends with: the standard (centred) figure first, with the verdict against pixels
    under the same protocol, then the uncentred (DINO's exact) and, when the recipe asks, whitened figures of both
    sources, each labelled."""
    from sslkit.engine.monitor import knn_line

    r = {"k": 20, "bank": 60000, "queries": 10000, "top1": 89.7, "top1_whitened": 92.1, "top1_uncentred": 89.1,
         "pixels_top1": 86.1, "pixels_top1_whitened": 88.8, "pixels_top1_uncentred": 84.6, "whiten": 512}
    line = knn_line(r)
    assert line.startswith("k-NN (k=20, 60000 bank, 10000 queries, centred on the bank mean): top-1 89.70%")
    assert "top-1 89.70%  vs raw pixels 86.10%  -> above the raw-pixel baseline" in line
    assert "PCA-whitened to 512 on the bank: 92.10%, pixels 88.80%" in line
    assert "DINO's protocol: 89.10%, pixels 84.60%" in line
    assert line.index("89.70%") < line.index("92.10%"), "the whitened figure never comes first"
    plain = knn_line({**r, "top1": 85.0, "pixels_top1": 86.1})
    assert "BELOW the raw-pixel baseline" in plain
