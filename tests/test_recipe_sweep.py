"""benchmarks/recipe_sweep.py: each variant trains with its own overrides, and bad variants fail before training."""

import json
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import recipe_sweep  # noqa: E402

TINY = {
    "name": "tiny_sweep",
    "data": {"name": "synthetic", "args": {"num_samples": 64, "image_size": 32}, "batch_size": 16, "num_workers": 0},
    "augment": {"name": "simclr", "image_size": 32},
    "encoder": {"name": "vit_tiny_patch4_32", "depth": 1, "embed_dim": 32, "num_heads": 2},
    "objective": {"name": "simclr", "proj_hidden_dim": 32, "proj_out_dim": 16},
    "trainer": {"epochs": 1},
    "eval": {"final_knn": True, "knn_k": 5},
}


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(TINY))
    return path


def test_parse_variant():
    assert recipe_sweep.parse_variant("t05:objective.temperature=0.5 optim.lr=1e-3") == (
        "t05", ["objective.temperature=0.5", "optim.lr=1e-3"])
    assert recipe_sweep.parse_variant("base:") == ("base", [])
    with pytest.raises(SystemExit, match="NAME:key=value"):
        recipe_sweep.parse_variant("no-colon")
    with pytest.raises(SystemExit, match="key=value"):
        recipe_sweep.parse_variant("x:objective.temperature")


def test_variants_train_with_their_own_overrides(recipe, tmp_path):
    out = tmp_path / "sweep"
    assert recipe_sweep.main([str(recipe), "--out", str(out), "--variant", "a:", "--variant",
                              "b:objective.temperature=0.9 trainer.epochs=2"]) == 0
    rows = json.loads((out / "recipe_sweep.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["a", "b"]
    assert all(0 <= r["knn_top1"] <= 100 for r in rows)
    cfg_b = yaml.safe_load(Path(rows[1]["run_dir"], "config.yaml").read_text())
    assert cfg_b["objective"]["temperature"] == 0.9 and cfg_b["trainer"]["epochs"] == 2
    summary_b = json.loads(Path(rows[1]["run_dir"], "summary.json").read_text())
    assert summary_b["steps"] == 2 * json.loads(Path(rows[0]["run_dir"], "summary.json").read_text())["steps"]
    assert "| b |" in (out / "recipe_sweep.md").read_text()


def test_unknown_key_fails_before_any_training(recipe, tmp_path):
    from sslkit.config import ConfigError

    out = tmp_path / "sweep"
    with pytest.raises(ConfigError, match="objective"):
        recipe_sweep.main([str(recipe), "--out", str(out), "--variant", "a:", "--variant", "b:objective.tempreature=1"])
    assert not (out / "runs").exists()
