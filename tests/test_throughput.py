"""benchmarks/throughput.py: the FLOP count behind MFU, and the report's figures, on a tiny run."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import throughput  # noqa: E402

# CIFAR ResNet-18 (3x3 stem, no max-pool) at 32 px: 0.556 G multiply-adds per forward, the figure published with
# kuangliu/pytorch-cifar and counted by ptflops / fvcore; FlopCounterMode counts 2 FLOPs per multiply-add.
RESNET18_CIFAR_FWD_GFLOP = 2 * 0.556


def test_simclr_training_flops_are_two_views_forward_and_backward():
    # backward costs twice the forward (input and weight gradients), so one image = 2 views x 3 forwards
    expected = 2 * 3 * RESNET18_CIFAR_FWD_GFLOP
    assert throughput.train_flops_per_image("simclr") / 1e9 == pytest.approx(expected, rel=0.02)


def test_dino_training_flops_count_local_crops_and_a_forward_only_teacher():
    per_pixel = RESNET18_CIFAR_FWD_GFLOP / 32**2
    # student: 2 global + N_LOCAL local crops, forward and backward; teacher: the 2 global crops, forward only
    student = 3 * per_pixel * (2 * 32**2 + throughput.N_LOCAL * throughput.LOCAL_SIZE**2)
    teacher = per_pixel * 2 * 32**2
    assert throughput.train_flops_per_image("dino") / 1e9 == pytest.approx(student + teacher, rel=0.05)


def test_byol_training_flops_are_online_forward_backward_and_a_forward_only_target():
    # online branch (backbone + projector + predictor): 2 views x 3 forwards (forward, then backward at twice
    # the forward); EMA target (backbone + projector): 2 views x 1 forward, no backward. Heads: 2 FLOPs per MAC.
    hid, out = throughput.BYOL_HIDDEN_DIM, throughput.BYOL_OUT_DIM
    projector = 2 * (512 * hid + hid * out) / 1e9  # 6.29 MFLOP per image
    predictor = 2 * (out * hid + hid * out) / 1e9  # 4.19 MFLOP per image
    online = 2 * 3 * (RESNET18_CIFAR_FWD_GFLOP + projector + predictor)
    target = 2 * 1 * (RESNET18_CIFAR_FWD_GFLOP + projector)
    expected = online + target  # 8.97 GFLOP per image
    # 1%: the published 0.556 GMACs is rounded (the counter sees 0.5554) and the stem's input gradient is never
    # computed (0.08%), so the count lands 0.2% low; a target that takes a backward (+50%), a target that sees
    # one view (-12.5%) or an online branch that sees one view (-37%) are far outside.
    ours = throughput.train_flops_per_image("byol") / 1e9
    assert ours == pytest.approx(expected, rel=0.01)

    # lightly's reference step (one forward per view and network) runs the identical model: the same count
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    loader, _, _, step = throughput.reference_setup("byol", throughput.reference_images(8), batch=8, workers=0)
    views, _ = next(iter(loader))
    with FlopCounterMode(display=False) as fc:
        step(views).backward()
    assert fc.get_total_flops() / 8 / 1e9 == pytest.approx(ours, rel=1e-6)


def test_tiny_run_reports_ratio_mfu_and_memory_alone(tmp_path):
    cmd = [sys.executable, str(BENCH / "throughput.py"), "--objectives", "simclr", "--batch", "8", "--steps", "1",
           "--rounds", "1", "--images", "32", "--workers", "0", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "throughput.json").read_text())
    peak = max(res["machine"]["matmul_peak_gflops"].values())
    r = res["objectives"]["simclr"]
    ref, ours = r["best"]["reference"], r["best"]["sslkit"]
    assert r["speedup"] == pytest.approx(ours["images_per_s"] / ref["images_per_s"])
    for m in (ref, ours):
        assert m["images_per_s"] > 0 and 0 <= m["data_wait_share"] <= 1
        if not m["precision"].startswith("bf16"):
            assert m["mfu_vs_best_matmul"] == pytest.approx(
                m["train_gflop_per_image"] * m["images_per_s"] / peak)
        # measured alone in a fresh process: torch + the dataset at least, and the table shows that figure
        assert 0.2 < m["peak_rss_gb_alone"] < 24
    table = (tmp_path / "throughput.md").read_text()
    assert "peak RSS GB (alone)" in table
    assert f"| {ours['peak_rss_gb_alone']:.2f} |" in table
