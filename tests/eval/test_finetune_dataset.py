"""``sslkit eval finetune`` on a dataset other than the run's own (``--dataset``, as every ``sslkit eval`` verb):
the CLI and ``run_finetune`` agree, results go to the run's transfer/ folder, and ``--resume`` finds them there."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from sslkit.cli import main as sslkit_main
from sslkit.eval.finetune import run_finetune
from sslkit.eval.sources import FOLDER_EVAL_FRACTION
from sslkit.run import RunError
from tests.eval.test_finetune import tiny_cnn_run

CLASSES = ("ant", "bee", "cat")
PER_CLASS = 5


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """3 classes x 5 small PNGs in class sub-folders, no train/ test/ split folders."""
    root = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir()
        for i in range(PER_CLASS):
            img = rng.integers(0, 256, size=(20 + i, 18 + c, 3), dtype=np.uint8)
            img[:8, :8] = (80 * c, 90, 255 - 80 * c)
            Image.fromarray(img).save(root / name / f"{i}.png")
    return root


def test_finetune_on_an_image_folder_cli_equals_api(tmp_path, folder, capsys):
    run = tiny_cnn_run(tmp_path, num_samples=16, image_size=16)  # its own data: synthetic shapes
    opts = ["--epochs", "1", "--batch-size", "8", "--label-fraction", "1", "--seed", "3", "--no-progress"]
    assert sslkit_main(["eval", "finetune", str(run), "--dataset", str(folder), *opts]) == 0
    out = capsys.readouterr().out
    assert "fine-tuned" in out and "linear probe (frozen)" in out
    path = out.strip().splitlines()[-1].removeprefix("results: ")
    cli = json.loads(open(path).read())

    kw = {"epochs": 1, "batch_size": 8, "label_fraction": 1.0, "seed": 3, "progress": False}
    api = run_finetune(run, dataset=folder, **kw)
    assert api["results_path"] == path
    assert api["metrics"] == cli["metrics"]  # top1, top5, linear_top1, linear_top5 and the loss history

    # on the folder, in the run's transfer/ folder beside k-NN / linear there; the run's own eval/ untouched
    assert path.startswith(str(run / "transfer" / "")) and path.endswith("/eval/finetune/results.json")
    assert not (run / "eval" / "finetune").exists() and not (run / "eval" / "linear").exists()
    lin = json.loads((run / "transfer" / path.split("/transfer/")[1].split("/")[0] / "eval" / "linear"
                      / "results.json").read_text())
    assert lin["metrics"]["top1"] == cli["metrics"]["linear_top1"]
    held = math.ceil(FOLDER_EVAL_FRACTION * PER_CLASS)  # the folder is split per class, as for knn
    assert cli["settings"]["train_images"] == (PER_CLASS - held) * len(CLASSES)
    assert cli["settings"]["test_images"] == held * len(CLASSES)
    assert cli["settings"]["dataset"]["root"] == str(folder.resolve()) and cli["source_run"] == str(run)

    # --resume finds the checkpoint in the transfer location (all epochs done: the same scores, no training)
    again = run_finetune(run, dataset=folder, resume=True, linear=False, **kw)
    assert again["results_path"] == path and again["metrics"]["top1"] == cli["metrics"]["top1"]
    assert again["metrics"]["history"] == cli["metrics"]["history"]
    with pytest.raises(RunError, match="nothing to resume"):  # the run's own data has no checkpoint
        run_finetune(run, resume=True, linear=False, **kw)


def test_finetune_dataset_errors(tmp_path, folder, capsys):
    run = tiny_cnn_run(tmp_path, num_samples=16, image_size=16)
    assert sslkit_main(["eval", "finetune", str(run), "--dataset", str(tmp_path / "nowhere"), "--no-progress"]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert sslkit_main(["eval", "finetune", str(run), "--dataset", str(folder), "--dataset-arg", "oops",
                        "--no-progress"]) == 2
    assert "key=value" in capsys.readouterr().err
    assert sslkit_main(["eval", "finetune", str(run), "--train-split", "test", "--eval-split", "test",
                        "--no-progress"]) == 2
    assert "both 'test'" in capsys.readouterr().err
    assert not (run / "eval").exists() and not (run / "transfer").exists()
