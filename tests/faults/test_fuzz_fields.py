"""Fuzzing every recipe field, every CLI verb and tampered run directories: a user error is always one
``sslkit: error:`` line with exit status 2, never a traceback, and nothing is written.

The recipe fuzz runs ``sslkit pretrain --dry-run``, which checks the recipe, builds the dataset and views and builds
the model on the meta device (no memory), so every check that comes before training is exercised in milliseconds.
"""

import collections
import copy
import dataclasses
import shutil

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sslkit import config as config_mod
from sslkit.cli import main
from sslkit.objectives.simclr import SimCLRConfig
from tests.faults import test_bad_recipes as bad_recipes

BASE = {**copy.deepcopy(bad_recipes.BASE), "name": "fuzz"}  # a tiny valid recipe
SECTIONS = {"data": config_mod.DataConfig, "optim": config_mod.OptimConfig, "trainer": config_mod.TrainerConfig,
            "eval": config_mod.EvalConfig, "objective": SimCLRConfig}
FIELDS = [(s, f.name) for s, dc in SECTIONS.items() for f in dataclasses.fields(dc) if f.name != "name"]
FIELDS += [("encoder", k) for k in ("depth", "embed_dim", "num_heads", "mlp_ratio", "img_size", "reg_tokens")]
FIELDS += [("augment", k) for k in ("image_size", "crop_scale", "jitter_p", "gray_p", "flip_p", "num_views")]
FIELDS += [(None, "seed"), (None, "name"), (None, "output_dir")]
VALUES = {
    "nan": float("nan"), "inf": float("inf"), "-inf": float("-inf"), "negative": -3, "zero": 0,
    "huge": 10**12, "empty": "", "wrong_type": "abc", "list": [1, 2], "dict": {"a": 1}, "parent_path": "../x",
    "absolute_path": "/abs/olute", "null": None, "bool": True,
}
SEEN: collections.Counter = collections.Counter()


def _check(capsys, argv, out_dir) -> int:
    code = main(argv)
    captured = capsys.readouterr()
    assert code in (0, 2), (argv, code, captured.err[-1500:])
    assert "Traceback" not in captured.err
    if code == 2:
        assert captured.err.startswith("sslkit: error: ") and captured.err.count("\n") == 1, captured.err
    assert not out_dir.exists(), "nothing is written"
    return code


@settings(max_examples=250, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(field=st.sampled_from(FIELDS), kind=st.sampled_from(sorted(VALUES)))
def test_every_field_with_every_kind_of_bad_value(tmp_path_factory, capsys, field, kind):
    tmp = tmp_path_factory.mktemp("fuzz")
    raw = copy.deepcopy(BASE)
    out = tmp / "runs"
    raw["output_dir"] = str(out)
    section, key = field
    if section is None:
        raw[key] = VALUES[kind]
    else:
        raw.setdefault(section, {})[key] = VALUES[kind]
    if field == (None, "output_dir"):
        out = tmp / "never"
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw, allow_unicode=True))
    code = _check(capsys, ["pretrain", str(path), "--dry-run"], out)
    SEEN[(kind, "refused" if code == 2 else "accepted")] += 1


CLI_CASES = [
    ["eval", "knn", "/no/such/run"], ["eval", "linear", "/no/such/run"], ["eval", "retrieval", "/no/such/run"],
    ["eval", "copy", "/no/such/run"], ["viz", "attention", "/no/such/run", "--from-dataset", "2"],
    ["viz", "reconstruct", "/no/such/run"], ["pretrain", "--resume", "/no/such/run"], ["pretrain", "/no/recipe.yaml"],
    ["pretrain"], ["pretrain", "--resume", "/no/such/run", "optim.lr=nan"],
]


@pytest.mark.parametrize("argv", CLI_CASES, ids=[" ".join(a[:2]) for a in CLI_CASES])
def test_every_cli_verb_reports_a_bad_path_in_one_line(tmp_path, capsys, argv):
    assert _check(capsys, argv, tmp_path / "runs") == 2


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    from sslkit.config import resolve
    from sslkit.engine import train

    raw = {**copy.deepcopy(BASE), "output_dir": str(tmp_path_factory.mktemp("ok") / "runs"), "name": "ok"}
    raw["data"]["args"]["num_samples"] = 16
    return train(resolve(raw)).run_dir


TAMPER = {
    "truncated_weights": lambda d: (d / "encoder.safetensors").write_bytes((d / "encoder.safetensors").read_bytes()[:100]),
    "garbage_weights": lambda d: (d / "encoder.safetensors").write_bytes(b"\x00junk" * 50),
    "missing_weights": lambda d: (d / "encoder.safetensors").unlink(),
    "garbage_config": lambda d: (d / "config.yaml").write_text("::: [unbalanced"),
    "list_config": lambda d: (d / "config.yaml").write_text("- a\n- b\n"),
    "wrong_encoder": lambda d: (d / "config.yaml").write_text((d / "config.yaml").read_text().replace(
        "embed_dim: 32", "embed_dim: 48")),
    "interpolated_config": lambda d: (d / "config.yaml").write_text("seed: ${oc.env:HOME}\n" + (d / "config.yaml").read_text()),
    "linked_config": lambda d: ((d / "config.yaml").unlink(), (d / "config.yaml").symlink_to("/etc/hostname")),
    "truncated_checkpoint": lambda d: (d / "checkpoints" / "last.ckpt").write_bytes(
        (d / "checkpoints" / "last.ckpt").read_bytes()[:200]),
    "missing_checkpoint": lambda d: (d / "checkpoints" / "last.ckpt").unlink(),
    "linked_checkpoints_dir": lambda d: (shutil.move(d / "checkpoints", d.parent / "elsewhere"),
                                         (d / "checkpoints").symlink_to(d.parent / "elsewhere")),
    "linked_features_dir": lambda d: ((d.parent / "cache").mkdir(), (d / "features").symlink_to(d.parent / "cache")),
}
VERBS = {"eval": ["eval", "knn", "{run}", "--no-progress", "--no-plots"], "resume": ["pretrain", "--resume", "{run}"],
         "reconstruct": ["viz", "reconstruct", "{run}", "--out", "{run}/recon.png"]}


@pytest.mark.parametrize("verb", sorted(VERBS))
@pytest.mark.parametrize("tamper", sorted(TAMPER))
def test_tampered_run_directories_are_one_clear_error(tmp_path, capsys, finished_run, tamper, verb):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run, symlinks=True)
    TAMPER[tamper](run)
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and not p.is_symlink()}
    argv = [a.format(run=run) for a in VERBS[verb]]
    code = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    if code != 0:  # some tampering does not concern a verb (resume reads no encoder.safetensors)
        assert code == 2 and err.startswith("sslkit: error: ") and err.count("\n") == 1, (tamper, verb, err)
    if tamper == "linked_features_dir" and verb == "eval" or tamper == "linked_checkpoints_dir" and verb == "resume":
        assert code == 2 and "symbolic link" in err, err
    if tamper == "linked_features_dir":
        assert list((tmp_path / "cache").iterdir()) == [], "nothing was written through the link"
    if verb != "resume" or code == 2:
        after = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and not p.is_symlink()}
        assert all(after.get(p) == t for p, t in before.items()), "no file of the run was changed"


def test_zz_report_fuzz_counts():
    """Prints the recipe fuzz's counts per kind of value (run last in this module)."""
    print(dict(sorted(SEEN.items())))


@pytest.mark.parametrize("section,key,value", [("objective", "proj_layers", 10**12), ("encoder", "depth", 10**12),
                                               ("objective", "proj_layers", 0), ("encoder", "depth", 257)])
def test_layer_counts_are_bounded_before_anything_is_built(tmp_path, capsys, section, key, value):
    # Each layer is a Python object even on the meta device: 10**12 of them would exhaust memory before the
    # parameter count is checked, so layer counts are refused first.
    raw = copy.deepcopy(BASE)
    raw["output_dir"] = str(tmp_path / "runs")
    raw.setdefault(section, {})[key] = value
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    assert _check(capsys, ["pretrain", str(path), "--dry-run"], tmp_path / "runs") == 2
