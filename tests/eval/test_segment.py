"""The linear segmentation probe: mIoU from the confusion matrix, learning from features that encode the mask,
chance with shuffled masks, the pixel baseline, and the CLI on a user's images/ + masks/ folder."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from sslkit.data.base import DataError
from sslkit.eval.report import EvalError
from sslkit.eval.segment import (
    PatchPixels,
    confusion_matrix,
    eval_geometry,
    fit_segmentation_probe,
    normalize,
    predict,
    segmentation_metrics,
)
from tests.eval.test_finetune import tiny_cnn_run

GRID, PATCH, CLASSES = 8, 4, 4  # 32 px images of 8 x 8 patches, 4 classes


def test_miou_equals_a_hand_computed_confusion_matrix():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 1]])  # the ignored pixel's prediction (2) must not count
    conf = confusion_matrix(pred, target, num_classes=4, ignore_index=255)
    # (truth, prediction) pairs: (0,0) (0,1) (1,1) (1,1) (2,2) (2,0) (1,1); class 3 appears nowhere.
    assert conf.tolist() == [[1, 1, 0, 0], [0, 3, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    m = segmentation_metrics(conf, ["bg", "a", "b", "c"])
    # IoU = TP / (TP + FP + FN): bg 1 / (1 + 1 + 1), a 3 / (3 + 1 + 0), b 1 / (1 + 0 + 1); c unscored.
    assert m["iou"] == pytest.approx({"bg": 100 / 3, "a": 75.0, "b": 50.0, "c": None})
    assert m["miou"] == pytest.approx(100 * (1 / 3 + 3 / 4 + 1 / 2) / 3)
    assert m["pixel_accuracy"] == pytest.approx(100 * 5 / 7) and m["classes_scored"] == 3 and m["pixels"] == 7
    # A class predicted but absent from the ground truth is scored (IoU 0), not dropped.
    m2 = segmentation_metrics(confusion_matrix(torch.tensor([3]), torch.tensor([0]), 4))
    assert m2["classes_scored"] == 2 and m2["miou"] == 0.0
    with pytest.raises(EvalError, match="ignore-index"):
        confusion_matrix(torch.tensor([0]), torch.tensor([7]), 4)


def _scenes(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Scenes of one rectangle (class 1..3) on background 0, aligned to an 8 x 8 grid of 4 px patches: masks
    (N, 32, 32), patch features that encode them (one-hot + noise, (N, C, 8, 8)) and the patch classes (N, 8, 8)."""
    g = torch.Generator().manual_seed(seed)
    cells = torch.zeros(n, GRID, GRID, dtype=torch.long)
    for i in range(n):
        y0, x0 = torch.randint(0, GRID - 3, (2,), generator=g).tolist()
        hh, ww = torch.randint(3, GRID - max(y0, x0) + 1, (2,), generator=g).tolist()
        cells[i, y0:y0 + hh, x0:x0 + ww] = int(torch.randint(1, CLASSES, (1,), generator=g))
    masks = cells.repeat_interleave(PATCH, 1).repeat_interleave(PATCH, 2)
    feats = F.one_hot(cells, CLASSES).permute(0, 3, 1, 2).float() + 0.1 * torch.randn(n, CLASSES, GRID, GRID, generator=g)
    return feats, masks, cells


def _chance_miou(pred: torch.Tensor, target: torch.Tensor) -> float:
    """mIoU of a prediction independent of the truth with the same marginals: expected confusion = outer product."""
    t = torch.bincount(target.flatten(), minlength=CLASSES).double()
    p = torch.bincount(pred.flatten(), minlength=CLASSES).double()
    return segmentation_metrics(torch.outer(t, p) / t.sum())["miou"]


def test_probe_reads_masks_off_features_and_not_off_shuffled_ones():
    feats, masks, _ = _scenes(96, seed=0)
    test_f, test_m, test_cells = _scenes(32, seed=1)
    size = (GRID * PATCH,) * 2
    # The best a linear head can do: bilinear upsampling blurs patch corners, so the ideal logits (the clean
    # one-hot codes) upsampled and arg-maxed are the reference (99.2 here, not 100).
    ideal = F.interpolate(F.one_hot(test_cells, CLASSES).permute(0, 3, 1, 2).float(), size=size, mode="bilinear")
    best = segmentation_metrics(confusion_matrix(ideal.argmax(1), test_m, CLASSES))["miou"]
    kw = {"epochs": 10, "lr": 0.05, "batch_size": 16, "device": "cpu", "progress": False}
    head = fit_segmentation_probe(feats, masks, CLASSES, **kw)
    pred = predict(head, test_f, size, device="cpu")
    good = segmentation_metrics(confusion_matrix(pred, test_m, CLASSES))
    assert good["miou"] == pytest.approx(best, abs=1.0) and good["pixel_accuracy"] > 99.0

    shuffled = masks[torch.randperm(len(masks), generator=torch.Generator().manual_seed(2))]
    head = fit_segmentation_probe(feats, shuffled, CLASSES, **kw)
    pred = predict(head, test_f, size, device="cpu")
    bad = segmentation_metrics(confusion_matrix(pred, test_m, CLASSES))
    assert bad["miou"] == pytest.approx(_chance_miou(pred, test_m), abs=5.0)
    assert good["miou"] - bad["miou"] > 50


def test_pixel_baseline_gives_each_patch_its_pixels():
    torch.manual_seed(0)
    images = torch.randint(0, 256, (2, 3, 10, 10), dtype=torch.uint8)
    pix = PatchPixels((3, 3), 10)  # 4 px patches, the last row / column zero-padded
    patches = pix.forward_tokens(normalize(images)).patches  # (2, 9, 48)
    padded = torch.zeros(2, 3, 12, 12)
    padded[..., :10, :10] = images.float() / 255
    want = padded.reshape(2, 3, 3, 4, 3, 4).permute(0, 2, 4, 1, 3, 5).reshape(2, 9, 48)  # (B, gy, gx, c, py, px)
    torch.testing.assert_close(patches, want, atol=1e-5, rtol=0)
    assert pix.dim == 48 and pix.patch_grid(10) == (3, 3)


def test_masks_follow_the_images_geometry():
    x = torch.arange(12 * 8, dtype=torch.float32).reshape(1, 1, 12, 8)
    out = eval_geometry(x, 4, mode="nearest")  # short side 8 -> 4, then a centred 4 x 4 crop of the 6 x 4
    assert out.shape == (1, 1, 4, 4)
    assert out[0, 0].tolist() == x[0, 0, 3:10:2, 1::2].tolist()  # nearest-exact: source rows / cols 2i + 1


def _write_folder(root, n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        mask = np.zeros((24, 24), np.uint8)
        y, x = rng.integers(0, 12, 2)
        mask[y:y + 12, x:x + 12] = 1 + i % 2
        mask[0, :] = 255  # an unlabelled row
        img = rng.integers(0, 40, (24, 24, 3)).astype(np.uint8)
        img[mask == 1] = (220, 30, 30)
        img[mask == 2] = (30, 30, 220)
        Image.fromarray(img).save(root / "images" / f"im{i}.jpg")
        Image.fromarray(mask, mode="L").save(root / "masks" / f"im{i}.png")


@pytest.fixture(scope="module")
def run_and_folder(tmp_path_factory):
    base = tmp_path_factory.mktemp("seg")
    run = tiny_cnn_run(base, num_samples=16, image_size=24)
    _write_folder(base / "folder" / "train", 12, seed=0)
    _write_folder(base / "folder" / "test", 6, seed=1)
    return run, base / "folder"


def test_cli_on_a_user_folder_with_baselines(run_and_folder, capsys):
    from sslkit.cli import main

    run, folder = run_and_folder
    rc = main(["eval", "segment", str(run), "--dataset", str(folder), "--baseline", "all", "--epochs", "2",
               "--no-progress", "--head-batch-size", "4"])
    out = capsys.readouterr().out
    assert rc == 0 and "miou" in out and "pixels" in out and "random" in out
    res = json.loads((run / "eval" / "segment_pixels" / "results.json").read_text())
    assert res["settings"]["num_classes"] == 3 and res["settings"]["patch_grid"] == [12, 12]  # stride 2 at 24 px
    assert res["settings"]["train_images"] == 12 and res["settings"]["test_images"] == 6
    assert res["metrics"]["pixels"] == 6 * 23 * 24  # the unlabelled row of every test mask is left out
    assert (run / "eval" / "segment" / "examples.png").is_file()
    assert "segment" in (run / "eval" / "report.md").read_text()


def test_bad_inputs_are_clear_errors(run_and_folder, tmp_path, capsys):
    from sslkit.cli import main
    from sslkit.data.segmentation import segmentation_folder

    run, folder = run_and_folder
    assert main(["eval", "segment", str(run), "--dataset", "synthetic", "--no-progress"]) == 2
    assert "has no masks" in capsys.readouterr().err
    _write_folder(tmp_path / "f", 2, seed=0)
    (tmp_path / "f" / "masks" / "im1.png").unlink()
    with pytest.raises(DataError, match="have no mask"):
        segmentation_folder(root=str(tmp_path / "f"))
    Image.new("RGB", (24, 24)).save(tmp_path / "f" / "masks" / "im1.png")
    with pytest.raises(DataError, match="single-channel"):
        segmentation_folder(root=str(tmp_path / "f")).mask(1)


def test_dataset_arg_passes_dataset_arguments(run_and_folder, capsys):
    """``--dataset-arg KEY=VALUE`` as in every ``sslkit eval`` verb; the older ``--data-arg`` still works, unlisted."""
    from sslkit.cli import main

    run, folder = run_and_folder
    common = ["eval", "segment", str(run), "--dataset", "segmentation_folder", "--epochs", "1", "--no-progress",
              "--no-plots", "--head-batch-size", "4", "--train-subset", "6", "--test-subset", "3"]
    assert main([*common, "--dataset-arg", f"root={folder}", "--dataset-arg", "ignore_index=200"]) == 0
    capsys.readouterr()
    new = json.loads((run / "eval" / "segment" / "results.json").read_text())
    assert new["settings"]["data_args"] == {"root": str(folder), "ignore_index": 200}  # 200 read as a number
    assert new["settings"]["train_images"] == 6 and new["settings"]["test_images"] == 3
    assert main([*common, "--data-arg", f"root={folder}", "--dataset-arg", "ignore_index=200"]) == 0
    capsys.readouterr()
    old = json.loads((run / "eval" / "segment" / "results.json").read_text())
    assert old["settings"]["data_args"] == new["settings"]["data_args"] and old["metrics"] == new["metrics"]
    assert main([*common, "--dataset-arg", "root"]) == 2
    assert "key=value" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["eval", "segment", "--help"])
    usage = capsys.readouterr().out
    assert "--dataset-arg" in usage and "--data-arg" not in usage
