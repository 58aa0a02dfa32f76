"""`sslkit viz pca` and the thresholded attention panel on tiny trained runs (a ViT and a CNN)."""

import pytest
import torch
from PIL import Image

from sslkit.cli import main
from sslkit.config import resolve
from sslkit.engine import train
from sslkit.run import load_encoder
from sslkit.viz.pca import pca_views


@pytest.mark.parametrize("cnn", [False, True])
def test_viz_pca_writes_one_row_per_image(tmp_path, tiny_recipe, capsys, cnn):
    raw = tiny_recipe(trainer={"epochs": 1})
    if cnn:
        raw["encoder"] = {"name": "resnet_cifar", "widths": [8, 16], "depths": [1, 1]}
    run = train(resolve(raw)).run_dir
    capsys.readouterr()
    assert main(["viz", "pca", str(run), "--from-dataset", "3"]) == 0
    png = run / "pca" / "pca.png"
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(png)
    with Image.open(png) as im:
        w, h = im.size
    assert h > w * 0.5, "three rows of panels"
    enc, _ = load_encoder(run)
    views = pca_views(enc, torch.randn(2, 3, 32, 32))
    grid = (8, 8) if not cnn else (16, 16)
    assert views["rgb"].shape == (2, *grid, 3) and views["foreground"].shape == (2, *grid)
    assert views["foreground"].float().mean() <= 0.5, "the smaller side of the first component is the object"
    assert ("attention" in views) == (not cnn)
    assert main(["viz", "pca", str(run)]) == 2
    assert capsys.readouterr().err.startswith("sslkit: error: give image files")


def test_attention_figure_has_the_thresholded_panel(tmp_path, tiny_recipe):
    from sslkit.viz.attention import save_figure

    maps = torch.rand(2, 8, 8)
    path = save_figure(torch.rand(3, 32, 32), maps, tmp_path / "a.png")
    with Image.open(path) as im:
        w, h = im.size
    assert w / h > 3.0, "image + 2 heads + the 60% panel side by side"
