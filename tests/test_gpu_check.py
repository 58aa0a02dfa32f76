"""``make gpu-check``'s CPU-only path, and the parts of the GPU check that can be checked without a GPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402


def test_without_a_gpu_it_says_so_runs_nothing_cuda_and_writes_the_json(tmp_path):
    out = tmp_path / "check" / "gpu_check.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}  # a GPU machine takes this path too
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--out", str(out)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "no CUDA device" in done.stdout and str(out) in done.stdout
    report = json.loads(out.read_text())
    assert report["cuda"] is False and "parts" not in report and "nothing CUDA was run" in report["message"]
    expected = sorted({p.name for g in ("*_imagenet.yaml", "*_cifar10.yaml") for p in (ROOT / "recipes").glob(g)})
    assert [r["recipe"] for r in report["plan"]] == expected and len(expected) >= 8
    for row in report["plan"]:
        raw = yaml.safe_load((ROOT / "recipes" / row["recipe"]).read_text())
        assert row["ok"], row
        assert row["image_size"] == raw["augment"]["image_size"] and row["batch_size"] == raw["data"]["batch_size"]
        assert row["precision"] == "bf16-mixed" and row["channels_last"] is True
    assert out.with_suffix(".md").read_text().startswith("# GPU check")


def test_the_first_steps_overrides_train_a_gpu_recipe(tmp_path):
    """The same overrides, moved to the CPU and shrunk: the recipe runs its first steps on synthetic data."""
    from sslkit.config import resolve
    from sslkit.engine import train

    raw = gpu_check.first_steps_recipe(ROOT / "recipes" / "simclr_resnet18_cifar10.yaml", tmp_path / "runs", steps=2)
    assert raw["data"]["name"] == "synthetic" and raw["data"]["args"] == {"num_samples": 512 * 3, "image_size": 32}
    raw["trainer"].update(accelerator="cpu", precision="32-true")
    raw["data"].update(batch_size=8, num_workers=0, args={"num_samples": 24, "image_size": 32})
    raw["encoder"] = {"name": "resnet_cifar", "widths": [8, 16], "depths": [1, 1]}
    result = train(resolve(raw), stop_at_step=2)
    assert result.steps == 2 and result.run_dir.name == "gpu_check_simclr_resnet18_cifar10"
    assert json.loads((result.run_dir / "summary.json").read_text())["finished"] is False


def test_the_torch_knn_matches_knn_classify():
    from sslkit.eval.knn import knn_classify

    g = torch.Generator().manual_seed(0)
    centres = torch.randn(5, 32, generator=g)
    train_y, test_y = torch.arange(400) % 5, torch.arange(100) % 5
    train = centres[train_y] + 1.5 * torch.randn(400, 32, generator=g)
    test = centres[test_y] + 1.5 * torch.randn(100, 32, generator=g)
    ref = knn_classify(train, train_y, test, test_y, k=10, temperature=0.07, center=True)["top1"]
    assert 30 < ref < 100, "a task neither trivial nor hopeless, so a wrong vote shows"
    assert gpu_check.torch_knn_top1(train, train_y, test, test_y, 10, 0.07, device="cpu") == ref
