"""Bad recipes fail before any work starts, with a message that names the key and the fix, and write nothing."""

import pytest
import yaml

from sslkit.cli import main
from sslkit.config import ConfigError, load_recipe, resolve

RECIPES = sorted(__import__("pathlib").Path(__file__).parent.parent.glob("recipes/*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_shipped_recipes_resolve(path):
    cfg = load_recipe(path)
    assert cfg.name == path.stem, "a recipe's name is its file name, so runs/<name>-latest is predictable"


@pytest.mark.parametrize("raw,overrides,pattern", [
    ({"trainr": {}}, [], r"unknown recipe key 'trainr'.*Valid top-level keys: name, seed"),
    ({"optim": {"lrr": 1}}, [], r"'optim.lrr'.*not in 'OptimConfig'"),
    ({"data": {"batch_size": "big"}}, [], r"'data.batch_size'.*could not be converted to Integer"),
    ({"objective": {"temprature": 0.1}}, [], r"'objective.temprature'.*Valid keys in objective: name, temperature"),
    ({"augment": {"image_size": "x"}}, [], r"'augment.image_size'"),
    ({"encoder": {"name": "resnet19"}}, [], r"unknown encoder 'resnet19'.*Valid encoders"),
    ({}, ["data.name=imagenet"], r"unknown dataset 'imagenet'.*Valid datasets"),
    ({}, ["data.batch_size=0"], r"'data.batch_size' must be positive"),
    ({}, ["optim.name=adam"], r"'optim.name': 'adam' is not one of adamw, sgd, lars"),
    ({}, ["nonsense.key=1"], r"unknown override key 'nonsense'"),
    ({"encoder": {"name": "resnet_cifar"}, "eval": {"encoder_args": {"pool_gird": 4}}}, [],
     r"'eval.encoder_args.pool_gird'.*Valid keys in encoder: name, widths"),
    ({"encoder": {"name": "resnet_cifar"}, "eval": {"encoder_args": {"pool_grid": "big"}}}, [],
     r"'eval.encoder_args.pool_grid'"),
    ({"eval": {"encoder_args": {"name": "resnet50"}}}, [], r"'eval.encoder_args.name'.*not which encoder"),
    ({}, ["trainer.time_budget_minutes=0"], r"'trainer.time_budget_minutes' must be positive"),
    ({}, ["eval.knn_whiten=0"], r"'eval.knn_whiten' must be positive"),
])
def test_bad_recipes_name_the_key(raw, overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        resolve(raw, overrides)


def test_overrides_win_and_keep_types():
    cfg = resolve({"optim": {"lr": 0.1}}, ["optim.lr=0.5", "trainer.epochs=3", "augment.crop_scale=[0.2,1.0]"])
    assert cfg.optim.lr == 0.5 and cfg.trainer.epochs == 3 and cfg.augment.crop_scale == [0.2, 1.0]


def test_changing_a_registry_name_replaces_its_section():
    cfg = resolve({"encoder": {"name": "resnet18_cifar"}}, ["encoder.name=vit_tiny_patch4_32", "encoder.depth=2"])
    assert cfg.encoder.depth == 2 and "zero_init_residual" not in cfg.encoder


@pytest.mark.parametrize("recipe,overrides,pattern", [
    ({"optim": {"lrr": 1}}, [], "optim.lrr"),
    ({"data": {"name": "fashion_mnist", "root": "/nonexistent"}}, [], "Looked in: /nonexistent"),
    ({"data": {"name": "cifar10", "root": "/nonexistent"}}, [], "cifar-10-batches-py"),
    ({}, ["trainer.epochs=-1"], "trainer.epochs"),
])
def test_cli_bad_recipe_writes_nothing(tmp_path, capsys, monkeypatch, recipe, overrides, pattern):
    monkeypatch.setattr("sslkit.data.fashion_mnist.DEBIAN_DIR", tmp_path / "no-debian")
    out = tmp_path / "runs"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"output_dir": str(out), **recipe}))
    assert main(["pretrain", str(path), *overrides]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sslkit: error:") and pattern in err and "Traceback" not in err
    assert not out.exists(), "nothing is written for a bad recipe"


def test_cli_missing_recipe_and_yaml_errors(tmp_path, capsys):
    assert main(["pretrain", str(tmp_path / "nope.yaml")]) == 2
    assert "not found" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: [unclosed")
    assert main(["pretrain", str(bad)]) == 2
    assert "not valid YAML" in capsys.readouterr().err
