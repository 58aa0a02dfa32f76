"""benchmarks/time_to_accuracy.py: the target verdicts and the table follow each recipe's k-NN protocol."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import time_to_accuracy as tta  # noqa: E402


def test_target_follows_the_recipe_protocol_and_reports_the_centred_verdict():
    whitened = {"knn_top1": 92.1, "knn_whiten": 512, "knn_top1_centred": 89.7, "knn_top1_uncentred": 89.1}
    t = tta.target_check("simclr", whitened, {}, minutes=28.1, budget=30.0)
    assert t["met"] and not t["met_centred"]
    assert t["text"] == "k-NN (whitened to 512) >= 90% in 30 min: met; centred only: missed"
    plain = {"knn_top1": 89.7, "knn_whiten": None, "knn_top1_centred": 89.7}
    assert not tta.target_check("dino", plain, {}, minutes=28.1, budget=30.0)["met"]
    assert not tta.target_check("dino", {**whitened, "knn_top1": 91.0}, {}, minutes=31.0, budget=30.0)["met"]
    mae = tta.target_check("mae", {"linear_top1": 86.8}, {"linear_top1": 84.4}, minutes=28.0, budget=30.0)
    assert mae["met"] and "linear above pixels (84.4%)" in mae["text"]


def test_table_puts_the_pixels_of_the_same_protocol_next_to_each_recipe():
    results = {"baselines": {"pixels": {"knn_top1": 86.05, "knn_top1_uncentred": 84.59, "linear_top1": 84.44,
                                        "bank": 60000, "knn_top1_whitened": {"512": 88.5}}},
               "recipes": {"simclr_resnet_fmnist": {
                   "objective": "simclr", "encoder": "resnet_cifar", "cpu": "x", "minutes": 28.1, "epochs": 11.8,
                   "images_per_s": 420.0, "random": {"knn_top1": 80.4}, "target": {"text": "met"},
                   "final": {"knn_top1": 92.09, "knn_whiten": 512, "knn_top1_centred": 89.68,
                             "knn_top1_uncentred": 89.07, "linear_top1": 91.88, "pixels_knn_top1": 88.5}}}}
    md = tta.table(results)
    row = next(line for line in md.splitlines() if line.startswith("| simclr_resnet_fmnist"))
    assert "| 92.09% | whitened to 512 | 88.50% | 89.68% | 89.07% | 91.88% | 80.40% | met |" in row
    assert "88.50% whitened to 512" in md


def test_table_marks_skipped_linear_and_random_as_not_measured():
    results = {"baselines": {"pixels": {"knn_top1": 86.05}},
               "recipes": {"dino_resnet_fmnist": {
                   "objective": "dino", "encoder": "resnet_cifar", "cpu": "x", "minutes": 27.9, "epochs": 5.6,
                   "images_per_s": 200.0, "random": None, "target": {"text": "met"},
                   "final": {"knn_top1": 91.75, "knn_whiten": 512, "knn_top1_centred": 89.05,
                             "knn_top1_uncentred": 88.79, "pixels_knn_top1": 88.07}}}}  # --no-linear --no-random
    row = next(line for line in tta.table(results).splitlines() if line.startswith("| dino_resnet_fmnist"))
    assert "| 88.79% | n/a | n/a | met |" in row and "nan" not in row
