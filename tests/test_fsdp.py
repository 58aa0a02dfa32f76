"""FSDP2 on CPU (gloo) for DINO with a ViT: a sharded step equals one process on the concatenated batch, and its
distributed checkpoint reshards (2 processes to 1, 1 to 2) and reads back without a process group."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_state_dict

from sslkit.engine.fsdp import latest_sharded, load_sharded, read_full_state, save_sharded, shard_objective
from sslkit.run import RunError

from .dist_utils import run_distributed
from .test_dino import BATCH, make_views, tiny_dino, train_step, trainable

LR = 1e-2


def _opt(obj):
    # eps well above the noise of gradients that are zero in exact arithmetic (the attention's key bias): Adam
    # would otherwise blow that noise, which differs with the reduction order, up to lr-sized updates.
    return torch.optim.AdamW(trainable(obj), lr=LR, eps=1e-6)


def _fresh():
    obj = tiny_dino(0, center_momentum=0.8, momentum_teacher=0.9, freeze_last_layer=0)
    obj.setup_schedule(5, 10)
    return obj


def _step(obj, opt, step, rank=0, world=1):
    full = make_views(step, batch=2 * BATCH)  # the global batch; rank r takes its slice of it
    n = 2 * BATCH // world
    train_step(obj, opt, [v[rank * n:(rank + 1) * n] for v in full], step)


def _full(obj):
    """The whole state (gathered from the shards) including buffers such as DINO's center."""
    return {k: v.detach().clone() for k, v in get_model_state_dict(obj, options=StateDictOptions(full_state_dict=True)).items()}


def _sharded_worker(rank, world, out_dir, load_from, first_step, steps):
    obj = shard_objective(_fresh())
    opt = _opt(obj)
    if load_from:
        load_sharded(latest_sharded(Path(load_from)), obj, opt)
    for step in range(first_step, first_step + steps):
        _step(obj, opt, step, rank, world)
    state = _full(obj)
    save_sharded(Path(out_dir) / f"ckpt_w{world}", first_step + steps, obj, opt, {"world_size": world})
    if rank == 0:
        torch.save(state, Path(out_dir) / f"state_w{world}.pt")


def _plain_from(ckpt_dir):
    """A one-process, unsharded objective and optimiser restored from a sharded checkpoint, without a process group."""
    full = read_full_state(latest_sharded(ckpt_dir))
    obj = _fresh()
    opt = _opt(obj)
    set_state_dict(obj, opt, model_state_dict=full["objective"], optim_state_dict=full["optimizer"])
    return obj, opt, full


@pytest.mark.slow
@pytest.mark.ddp
def test_fsdp_matches_one_process_and_reshards(tmp_path):
    # One process on the concatenated batch: the reference for two FSDP processes on its halves.
    ref = _fresh()
    ref_opt = _opt(ref)
    for step in range(2):
        _step(ref, ref_opt, step)

    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for d in (a, b, c):
        d.mkdir()
    run_distributed(_sharded_worker, 2, str(a), "", 0, 2)
    got = torch.load(a / "state_w2.pt")
    assert got.keys() == ref.state_dict().keys()
    for k, v in ref.state_dict().items():  # student, teacher (EMA) and center
        torch.testing.assert_close(got[k], v, rtol=1e-4, atol=1e-5, msg=k)

    # Read without a process group: exactly the gathered state.
    plain, plain_opt, full = _plain_from(a / "ckpt_w2")
    assert full["meta"]["step"] == 2 and full["meta"]["world_size"] == 2
    for k, v in got.items():
        assert torch.equal(plain.state_dict()[k], v), k

    # 2 -> 1: the sharded checkpoint resumes on one FSDP process and continues bit-exact with a plain one-process
    # run from the same state.
    for step in range(2, 4):
        _step(plain, plain_opt, step)
    run_distributed(_sharded_worker, 1, str(b), str(a / "ckpt_w2"), 2, 2)
    one = torch.load(b / "state_w1.pt")
    for k, v in plain.state_dict().items():
        assert torch.equal(one[k], v), k

    # 1 -> 2: that one-process checkpoint resumes on two processes, matching one process within tolerance.
    run_distributed(_sharded_worker, 2, str(c), str(b / "ckpt_w1"), 4, 1)
    _step(plain, plain_opt, 4)
    two = torch.load(c / "state_w2.pt")
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(two[k], v, rtol=1e-4, atol=1e-5, msg=k)


def test_unsharded_checkpoint_round_trip_and_tampered_metadata(tmp_path):
    obj = _fresh()
    opt = _opt(obj)
    _step(obj, opt, 0)
    save_sharded(tmp_path, 1, obj, opt, {"note": "x"})
    save_sharded(tmp_path, 2, obj, opt, {"note": "y"})  # replaces the first; the pointer names the new one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dcp-step000000002", "last_dcp.json"]
    again, again_opt, full = _plain_from(tmp_path)
    assert full["meta"] == {"step": 2, "note": "y"}
    for k, v in obj.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    _step(obj, opt, 1)
    _step(again, again_opt, 1)
    for k, v in obj.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "dcp-step000000002" / ".metadata").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(RunError, match="refusing to read checkpoint metadata"):
        read_full_state(latest_sharded(tmp_path))
    (tmp_path / "last_dcp.json").write_text('{"last": "../../etc"}')
    with pytest.raises(RunError, match="not a dcp-step"):
        latest_sharded(tmp_path)


def test_shard_objective_refuses_a_cnn():
    from sslkit.objectives.simclr import SimCLRConfig
    from sslkit.registry import ENCODERS, OBJECTIVES

    obj = OBJECTIVES.build("simclr", encoder=ENCODERS.build("resnet_cifar"), cfg=SimCLRConfig())
    with pytest.raises(ValueError, match="no ViT blocks"):
        shard_objective(obj)


# ---------------------------------------------------------------------------------------------------------------
# Through the engine: trainer.strategy=fsdp (Fabric's FSDP2 strategy, sslkit's checkpoint and export paths).

ENGINE_SAMPLES = 16  # synthetic images: 2 steps per epoch for 2 processes x 4 images, 4 for 1 process x 4
ENGINE_VIT = {"name": "vit_tiny_patch4_32", "depth": 2, "embed_dim": 32, "num_heads": 2}
# FSDP's reduce-scatter and DDP's all-reduce may sum the gradients in a different order (float32 rounding). With
# two gloo processes on CPU the states came out bit-equal; the tolerance allows rounding, not a missing average
# (which moves these weights by about 1e-2).
FSDP_VS_DDP = {"rtol": 1e-5, "atol": 1e-7}


MULTICROP = {"name": "multicrop", "image_size": 32, "local_size": 16, "preset": "small", "num_local": 2}
OTHER_VITS = {  # one step each, FSDP against DDP: masks and forward_tokens (MAE, iBOT). name -> (objective, its
    # settings over the shrunk defaults, views)
    "mae": ("mae", {}, {"name": "mae", "image_size": 32}),
    "dino_ibot": ("dino", {"freeze_last_layer": 0.0, "ibot_weight": 1.0, "ibot_mask_probability": 0.75}, MULTICROP)}


def engine_recipe(out: Path, strategy: str, world: int, final_knn: bool = False, objective: dict | None = None,
                  augment: dict | None = None) -> dict:
    from tests.test_objective_contract import small_config

    return {"name": "fsdp_engine", "output_dir": str(out / "runs"), "seed": 5,
            "data": {"name": "synthetic", "args": {"num_samples": ENGINE_SAMPLES, "image_size": 32},
                     "batch_size": 4, "num_workers": 0, "augment_backend": "per_image"},
            "augment": augment or MULTICROP, "encoder": ENGINE_VIT,
            "objective": objective or {**small_config("dino"), "freeze_last_layer": 0.0},
            "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9, "warmup_epochs": 0, "weight_decay": 1e-4},
            "trainer": {"epochs": 2, "progress": False, "accelerator": "cpu", "precision": "32-true",
                        "checkpoint_every_steps": 0, "devices": world, "strategy": strategy,
                        "health": {"every_steps": 1}},  # the health check runs the sharded encoder each step
            "eval": {"final_knn": final_knn, "knn_k": 3, "knn_train_subset": 8, "knn_test_subset": 8}}


def engine_run(raw: dict, run_dir: Path, resume_from: Path | None = None, stop_at_step: int | None = None):
    """One process's share of a run through the engine (as `sslkit pretrain` runs it in each process)."""
    import os

    from sslkit.config import resolve
    from sslkit.engine.checkpoint import load_checkpoint
    from sslkit.engine.loop import preflight, run_worker
    from sslkit.engine.precision import make_fabric

    cfg = resolve(raw)
    os.environ.update(LOCAL_RANK=str(torch.distributed.get_rank()), NODE_RANK="0",
                      WORLD_SIZE=str(torch.distributed.get_world_size()))  # as torchrun sets them
    dataset, pipeline = preflight(cfg)
    fabric = make_fabric(cfg)
    fabric.launch()  # joins the process group the harness made
    ckpt = load_checkpoint(resume_from / "checkpoints" / "last.ckpt") if resume_from else None
    return run_worker(fabric, cfg, dataset, pipeline, run_dir, ckpt, stop_at_step)


def _two_process_runs(rank, world, out):
    import shutil

    out = Path(out)
    engine_run(engine_recipe(out, "ddp", world), out / "ddp", stop_at_step=2)
    engine_run(engine_recipe(out, "fsdp", world), out / "fsdp", stop_at_step=2)  # an epoch's end
    if rank == 0:
        for copy in ("fsdp_finish", "resume_fsdp", "resume_plain"):
            shutil.copytree(out / "fsdp", out / copy)
    torch.distributed.barrier()
    engine_run(engine_recipe(out, "fsdp", world, final_knn=True), out / "fsdp_finish", resume_from=out / "fsdp_finish")
    from tests.test_objective_contract import small_config

    for name, (objective, settings, augment) in OTHER_VITS.items():
        for strategy in ("ddp", "fsdp"):
            engine_run(engine_recipe(out, strategy, world, objective={**small_config(objective), **settings},
                                     augment=augment),
                       out / f"{name}_{strategy}", stop_at_step=1)


def _one_process_resumes(rank, world, out):
    out = Path(out)
    engine_run(engine_recipe(out, "fsdp", 1), out / "resume_fsdp", resume_from=out / "resume_fsdp")
    engine_run(engine_recipe(out, "auto", 1), out / "resume_plain", resume_from=out / "resume_plain")


def _objective_state(run_dir: Path) -> dict[str, torch.Tensor]:
    """The objective's state in a run's last checkpoint, sharded (read without a process group) or not."""
    from sslkit.engine.checkpoint import load_checkpoint

    ckpt = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    return read_full_state(ckpt["sharded"])["objective"] if ckpt.get("sharded") else ckpt["objective"]


@pytest.fixture(scope="module")
def engine_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp_engine")
    run_distributed(_two_process_runs, 2, str(out))
    run_distributed(_one_process_resumes, 1, str(out))
    return out


@pytest.mark.slow
@pytest.mark.ddp
def test_engine_fsdp_matches_ddp(engine_runs):
    from sslkit.engine.checkpoint import load_checkpoint

    ddp, fsdp = _objective_state(engine_runs / "ddp"), _objective_state(engine_runs / "fsdp")
    assert fsdp.keys() == ddp.keys()
    moved = [k for k in ddp if ddp[k].is_floating_point() and not torch.equal(ddp[k], _fresh_engine_state()[k])]
    assert any(k.startswith("teacher") for k in moved) and "center" in moved  # the steps changed teacher and center
    for k, v in ddp.items():
        torch.testing.assert_close(fsdp[k], v, **FSDP_VS_DDP, msg=k)
    ckpt = load_checkpoint(engine_runs / "fsdp" / "checkpoints" / "last.ckpt")
    assert (ckpt["step"], ckpt["epoch"], ckpt["batch_in_epoch"], ckpt["world_size"], len(ckpt["rng"])) == (2, 1, 0, 2, 2)
    assert sorted(p.name for p in (engine_runs / "fsdp" / "checkpoints").iterdir()) == [
        "dcp-step000000002", "last.ckpt", "last_dcp.json"]


@pytest.mark.slow
@pytest.mark.ddp
@pytest.mark.parametrize("name", sorted(OTHER_VITS))
def test_engine_fsdp_matches_ddp_for_other_vit_objectives(engine_runs, name):
    ddp, fsdp = _objective_state(engine_runs / f"{name}_ddp"), _objective_state(engine_runs / f"{name}_fsdp")
    assert fsdp.keys() == ddp.keys()
    for k, v in ddp.items():
        torch.testing.assert_close(fsdp[k], v, **FSDP_VS_DDP, msg=k)


def _fresh_engine_state() -> dict[str, torch.Tensor]:
    from sslkit.config import resolve
    from sslkit.engine.build import build_objective

    torch.manual_seed(5)  # the recipe's seed, as the engine seeds before building
    return build_objective(resolve(engine_recipe(Path("."), "auto", 1))).state_dict()


@pytest.mark.slow
@pytest.mark.ddp
def test_engine_fsdp_resumes_on_one_process_bit_exact(engine_runs):
    fsdp, plain = _objective_state(engine_runs / "resume_fsdp"), _objective_state(engine_runs / "resume_plain")
    assert fsdp.keys() == plain.keys()
    for k, v in plain.items():
        assert torch.equal(fsdp[k], v), k
    import json

    summary = json.loads((engine_runs / "resume_fsdp" / "summary.json").read_text())
    assert summary["steps"] == 2 * ENGINE_SAMPLES // 4  # the step count carries over; 2 epochs of 4 steps


@pytest.mark.slow
@pytest.mark.ddp
def test_engine_fsdp_export_is_the_gathered_teacher_and_evaluates(engine_runs, capsys):
    import json

    from safetensors.torch import load_file

    from sslkit.cli import main

    run = engine_runs / "fsdp_finish"
    state = _objective_state(run)  # the last checkpoint: the gathered weights at the last step
    exported = load_file(str(run / "encoder.safetensors"))
    teacher = {k.removeprefix("teacher.encoder."): v for k, v in state.items() if k.startswith("teacher.encoder.")}
    assert exported.keys() == teacher.keys() and exported
    for k, v in teacher.items():
        assert torch.equal(exported[k], v), k
    summary = json.loads((run / "summary.json").read_text())
    assert summary["finished"] and summary["steps"] == 4 and summary["knn"] is not None
    assert main(["eval", "knn", str(run), "--no-progress", "--no-plots"]) == 0


def test_fsdp_recipe_checks():
    from sslkit.config import ConfigError, resolve
    from sslkit.engine.loop import check_sharded_resume, preflight

    raw = engine_recipe(Path("."), "fsdp", 2)
    with pytest.raises(ConfigError, match="eval.knn_every.*trainer.strategy=ddp"):
        resolve({**raw, "eval": {**raw["eval"], "knn_every": 1}})
    cnn = {**raw, "encoder": {"name": "resnet_cifar", "widths": [8, 16], "depths": [1, 1]},
           "objective": {"name": "simclr"}, "augment": {"name": "simclr", "image_size": 32}}
    with pytest.raises(ConfigError, match="Use trainer.strategy=ddp for CNN"):
        preflight(resolve(cnn))
    ckpt = {"sharded": Path("x"), "world_size": 2, "epoch": 0, "batch_in_epoch": 1}
    with pytest.raises(RunError, match="in the middle of epoch 0"):
        check_sharded_resume(ckpt, 1)
    check_sharded_resume(ckpt, 2)  # same world: the position stays exact
    check_sharded_resume({**ckpt, "batch_in_epoch": 0}, 1)  # an epoch's end: exact on any world size
    with pytest.raises(RunError, match="unsharded run"):
        check_sharded_resume({"objective": {}, "world_size": 2, "batch_in_epoch": 0}, 2)
