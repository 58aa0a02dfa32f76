"""The contract every registered objective keeps, tested the moment it is registered (sslkit's own and plug-ins).

For each objective: it builds from its default config; it trains through the real engine on synthetic data; its
checkpoint round-trips; a run stopped mid-epoch and resumed ends bit-identical to one that never stopped; and its
``eval_encoder`` is an encoder that evaluation can use.
"""

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from sslkit.config import resolve
from sslkit.engine import build_objective, load_checkpoint, train
from sslkit.objectives.base import Objective, Views
from sslkit.plugins import load_all
from sslkit.registry import ENCODERS, OBJECTIVES
from sslkit.run import load_encoder, load_state_strict

load_all()
NAMES = OBJECTIVES.names()
TINY_ENCODER = {"name": "vit_tiny_patch4_32", "depth": 2, "embed_dim": 64, "num_heads": 2}


def small_config(name: str) -> dict:
    """The objective's defaults with its widths, depths and head counts shrunk, found by field name, so that a
    plug-in following the same naming is shrunk too."""
    out = {"name": name}
    for f in dataclasses.fields(OBJECTIVES.get(name).config):
        value = f.default
        if not isinstance(value, int) or isinstance(value, bool):
            continue
        if "dim" in f.name and value > 64:
            out[f.name] = 32
        elif f.name.endswith("depth") and value > 1:
            out[f.name] = 1
        elif f.name.endswith("heads") and value > 2:
            out[f.name] = 2
    return out


def augment_for(views: Views) -> dict:
    """A pipeline that makes the views an objective declares."""
    if views.num_global == 1 and not views.locals:
        return {"name": "mae", "image_size": 32}
    return {"name": "multicrop", "image_size": 32, "local_size": 16, "preset": "small",
            "num_local": 2 if views.locals else 0}


def recipe(tmp_path, name: str, run_name: str) -> dict:
    entry = OBJECTIVES.get(name)
    views = entry.factory.required_views(entry.config())
    return {"name": run_name, "output_dir": str(tmp_path / "runs"),
            "data": {"name": "synthetic", "args": {"num_samples": 48, "image_size": 32}, "batch_size": 16,
                     "num_workers": 0},
            "augment": augment_for(views), "encoder": TINY_ENCODER, "objective": small_config(name),
            "optim": {"name": "adamw", "lr": 1e-3, "warmup_epochs": 1},
            "trainer": {"epochs": 2, "progress": False, "log_every_steps": 1, "checkpoint_every_steps": 2},
            "eval": {"final_knn": False}}


@pytest.mark.parametrize("name", NAMES)
def test_builds_from_its_default_config(name):
    entry = OBJECTIVES.get(name)
    assert issubclass(entry.factory, Objective) and dataclasses.is_dataclass(entry.config)
    cfg = entry.config()
    assert isinstance(entry.factory.required_views(cfg), Views)
    with torch.device("meta"):  # the defaults are paper-sized (VICReg's 8192-wide expander): shapes only
        obj = entry.factory(encoder=ENCODERS.build(**TINY_ENCODER), cfg=cfg)
    assert isinstance(obj, Objective)
    names = {n for n, _ in obj.named_parameters()}
    assert any(n.startswith("encoder.") for n in names), "the objective trains the encoder it was given"


@pytest.mark.parametrize("name", NAMES)
def test_trains_round_trips_and_resumes_bit_exact(tmp_path, name):
    full = train(resolve(recipe(tmp_path, name, "full")))
    assert full.steps == 6  # 48 images / batch 16 x 2 epochs
    part = train(resolve(recipe(tmp_path, name, "split")), stop_at_step=4)  # mid-epoch, between checkpoints
    assert part.steps == 4 and not (part.run_dir / "encoder.safetensors").exists()
    resumed = train(resolve(recipe(tmp_path, name, "split")), resume=part.run_dir)

    a, b = (load_checkpoint(r.run_dir / "checkpoints" / "last.ckpt") for r in (full, resumed))
    assert a["step"] == b["step"] == 6
    for k, v in a["objective"].items():  # every parameter and buffer: teachers, centers, queues
        assert torch.equal(v, b["objective"][k]), k
    wa, wb = load_file(full.run_dir / "encoder.safetensors"), load_file(resumed.run_dir / "encoder.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)

    # The checkpoint round-trips into a freshly built objective, and training changed the encoder.
    cfg = resolve(recipe(tmp_path, name, "full"))
    obj = build_objective(cfg)
    fresh = {k: v.clone() for k, v in obj.state_dict().items()}
    load_state_strict(obj, a["objective"], "checkpoint")
    assert all(torch.equal(v, a["objective"][k]) for k, v in obj.state_dict().items())
    assert any(not torch.equal(fresh[k], v) for k, v in obj.state_dict().items() if k.startswith("encoder."))

    # eval_encoder: what encoder.safetensors holds, and an encoder evaluation can rebuild and run.
    enc = obj.eval_encoder().eval()
    assert set(wa) == set(enc.state_dict())
    loaded, _ = load_encoder(full.run_dir)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        feats = enc(x)
        torch.testing.assert_close(loaded(x), feats)
    assert feats.shape == (3, enc.dim) and torch.isfinite(feats).all()
    assert hasattr(enc, "patch_size")
