"""Property-based: malformed recipes always end in one clear error, and nothing is written."""

import copy

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sslkit.cli import main

BASE = {
    "name": "prop",
    "data": {"name": "synthetic", "args": {"num_samples": 32, "image_size": 32}, "batch_size": 8, "num_workers": 0},
    "augment": {"name": "simclr", "image_size": 32},
    "encoder": {"name": "vit_tiny_patch4_32", "depth": 1, "embed_dim": 32, "num_heads": 2},
    "objective": {"name": "simclr"},
    "trainer": {"epochs": 1},
    "eval": {"final_knn": False},
}
SECTIONS = ["data", "augment", "encoder", "objective", "optim", "trainer", "eval"]
INT_FIELDS = [("data", "batch_size"), ("trainer", "epochs"), ("augment", "image_size"), ("eval", "knn_k"),
              ("data", "num_workers"), ("trainer", "num_nodes")]
NUMERIC_FIELDS = INT_FIELDS + [("optim", "lr"), ("optim", "weight_decay"), ("objective", "temperature")]

key_name = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=12).map(lambda s: "zz" + s)
bad_value = st.one_of(st.text(alphabet="abcxyz", min_size=1, max_size=5), st.lists(st.integers(), min_size=1,
                                                                                  max_size=3))


def _set(raw, section, key, value):
    raw.setdefault(section, {})[key] = value


mutations = st.one_of(
    st.tuples(st.just("unknown_top"), key_name, st.none()),
    st.tuples(st.just("unknown_key"), st.sampled_from(SECTIONS), key_name),
    st.tuples(st.just("wrong_type"), st.sampled_from(NUMERIC_FIELDS), bad_value),
    st.tuples(st.just("negative"), st.sampled_from(INT_FIELDS), st.integers(-1000, -1)),
    st.tuples(st.just("zero"), st.sampled_from([f for f in INT_FIELDS if f != ("data", "num_workers")]), st.just(0)),
    st.tuples(st.just("not_patch_multiple"), st.sampled_from([30, 33, 34, 35]), st.none()),
    st.tuples(st.just("local_crops_without_multicrop"), st.none(), st.none()),
    st.tuples(st.just("unknown_name"), st.sampled_from(["augment", "encoder", "objective", "data"]), key_name),
)


def _apply(raw, mutation):
    kind, a, b = mutation
    if kind == "unknown_top":
        raw[a] = 1
    elif kind == "unknown_key":
        _set(raw, a, b, 1)
    elif kind in ("wrong_type", "negative", "zero"):
        _set(raw, a[0], a[1], b)
    elif kind == "not_patch_multiple":
        _set(raw, "augment", "image_size", a)
    elif kind == "local_crops_without_multicrop":
        raw["augment"] = {"name": "multicrop"}
    elif kind == "unknown_name":
        _set(raw, a, "name", b)
    return raw


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutation_list=st.lists(mutations, min_size=1, max_size=3))
def test_malformed_recipes_fail_cleanly(tmp_path_factory, capsys, mutation_list):
    tmp = tmp_path_factory.mktemp("prop")
    raw = copy.deepcopy(BASE)
    raw["output_dir"] = str(tmp / "runs")
    for m in mutation_list:
        raw = _apply(raw, m)
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    code = main(["pretrain", str(path)])
    err = capsys.readouterr().err
    assert code == 2, (mutation_list, err)
    assert err.startswith("sslkit: error: ") and err.count("\n") <= 2, err
    assert "Traceback" not in err
    assert not (tmp / "runs").exists(), "nothing is written for a bad recipe"


@pytest.mark.parametrize("size", [30, 33])
def test_patch_size_message(tmp_path, capsys, size):
    raw = {**copy.deepcopy(BASE), "output_dir": str(tmp_path / "runs")}
    raw["augment"]["image_size"] = size
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(raw))
    assert main(["pretrain", str(tmp_path / "r.yaml")]) == 2
    assert f"view size {size} is not divisible by the encoder's patch size 4" in capsys.readouterr().err
