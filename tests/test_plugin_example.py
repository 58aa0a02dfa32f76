"""The plug-in example trains from outside the package, through the CLI, with nothing inside sslkit edited for it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

from sslkit.plugins import PLUGINS_ENV

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


def _run(args: list[str], env_extra: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "2", **env_extra}
    return subprocess.run([sys.executable, "-m", "sslkit.cli", *args], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=600)


def test_simsiam_plugin_trains_through_the_cli(tmp_path):
    recipe = yaml.safe_load((EXAMPLES / "simsiam_fmnist.yaml").read_text())
    recipe.update(output_dir=str(tmp_path / "runs"),
                  data={"name": "synthetic", "args": {"num_samples": 64, "image_size": 32}, "batch_size": 16,
                        "num_workers": 0},
                  augment={**recipe["augment"], "image_size": 32},
                  trainer={"epochs": 2, "progress": False, "log_every_steps": 1},
                  eval={"final_knn": False, "image_size": 32, "encoder_args": {"pool_grid": 4}})
    path = tmp_path / "simsiam.yaml"
    path.write_text(yaml.safe_dump(recipe))
    env = {PLUGINS_ENV: "simsiam_plugin", "PYTHONPATH": str(EXAMPLES)}

    # Without the plug-in the objective is unknown, with a clear one-line error.
    missing = _run(["pretrain", str(path)], {}, tmp_path)
    assert missing.returncode == 2 and "unknown objective 'simsiam'" in missing.stderr

    listed = _run(["list", "objectives"], env, tmp_path)
    assert listed.returncode == 0 and "simsiam" in listed.stdout
    done = _run(["pretrain", str(path)], env, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    run = tmp_path / "runs" / "simsiam_fmnist"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 8 and summary["finished"]
    assert (run / "encoder.safetensors").is_file()
    import csv

    with (run / "metrics.csv").open() as f:
        losses = [float(r["loss"]) for r in csv.DictReader(f) if r.get("loss")]
    assert len(losses) == 8 and all(-1.0 <= v <= 1.0 for v in losses)  # a mean negative cosine


def test_plugin_that_fails_to_import_is_one_clear_line(tmp_path):
    (tmp_path / "broken_plugin.py").write_text("raise RuntimeError('boom')\n")
    r = _run(["list"], {PLUGINS_ENV: "broken_plugin", "PYTHONPATH": str(tmp_path)}, tmp_path)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("sslkit: error: plug-in module 'broken_plugin'") and "RuntimeError: boom" in r.stderr
    assert "Traceback" not in r.stderr
