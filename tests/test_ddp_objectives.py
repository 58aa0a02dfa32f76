"""Exact DDP for every registered objective, through the engine's own step.

For each objective in ``sslkit.registry.OBJECTIVES`` (a new one is covered the moment it registers), and for DINO
also with iBOT and with Sinkhorn-Knopp centering: two gloo processes, each on half of a batch, take
``STEPS`` steps with :func:`sslkit.engine.loop.train_step` after the engine's :func:`~sslkit.engine.loop.setup`
(Fabric's DDP wrapper, synchronised BatchNorm, the optimiser, the schedules), and must agree with one process on
the concatenated batch:

- the loss (the mean of the two ranks' losses: each is a mean over its half),
- the gradients the optimiser steps with (after DDP's all-reduce), on both ranks,
- every parameter and buffer after the step: weights, momentum teachers, DINO's centers, BatchNorm statistics.

The views are made once here and split, so augmentation is the same in both set-ups; masks (MAE, iBOT) are drawn
per sample of the global batch by the objectives themselves, which this test checks. SGD makes the weights after
a step a linear function of the gradients, so a wrong gradient cannot hide behind Adam's normalisation.

Both set-ups run in float64 (Fabric's ``64-true``, set on the resolved recipe: recipes do not offer it), so the
comparison can be tight: they agree to about 1e-13 where the arithmetic stays in float64, and 1e-7 where the
losses compute in float32 (DINO's). In float32, BatchNorm's backward through the ResNet amplifies rounding to
differences of 7e-4 in some gradients, which a tolerance loose enough to pass would let real errors through.

The last test shows the comparison can fail: without the gather of SimCLR's negatives, or without the
all-reduce of DINO's center, the two-process run departs from the single process.

One spawn of two processes runs every case in sequence (a spawn costs seconds; a step of these tiny models
milliseconds). The processes are started as a launcher such as torchrun or srun would start them (the process
group exists, ``LOCAL_RANK`` is set), and Fabric's DDP strategy joins them.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from unittest import mock

import pytest
import torch
from omegaconf import DictConfig

from sslkit.config import ConfigError, resolve
from sslkit.engine.build import build_objective
from sslkit.engine.loop import preflight, setup, train_step
from sslkit.engine.precision import make_fabric
from sslkit.plugins import load_all
from sslkit.registry import OBJECTIVES
from tests.dist_utils import run_distributed
from tests.test_objective_contract import small_config

load_all()
WORLD = 2
LOCAL_BATCH = 4  # images per process; the single process takes WORLD x LOCAL_BATCH
STEPS = 2  # the second step uses the first's center, teacher and BatchNorm statistics
LR = 0.05
CNN = {"name": "resnet_cifar", "widths": [8, 16], "depths": [1, 1]}  # BatchNorm in the encoder too
VIT = {"name": "vit_tiny_patch4_32", "depth": 1, "embed_dim": 32, "num_heads": 2}

# Objectives that are not batch-split-invariant by their mathematics, with the reason (none at present). KoLeo
# (DINO's koleo_weight > 0) is one such term: as in DINOv2, its nearest neighbours are searched in each rank's
# batch, so it is left at its default of 0 here.
NOT_SPLIT_INVARIANT: dict[str, str] = {}

# Settings that let a step test everything: DINO's last layer is not frozen at the first step.
OBJECTIVE_OVERRIDES = {"dino": {"freeze_last_layer": 0.0}}
VARIANTS = {  # case id -> (objective, settings on top)
    "dino_ibot": ("dino", {"ibot_weight": 1.0, "ibot_mask_probability": 0.75}),
    "dino_sinkhorn": ("dino", {"centering": "sinkhorn_knopp"}),
    "dino_ibot_sinkhorn": ("dino", {"ibot_weight": 1.0, "ibot_mask_probability": 0.75, "centering": "sinkhorn_knopp",
                                    "ibot_separate_head": True}),
}
# Every objective sslkit ships (and any plug-in of $SSLKIT_PLUGINS, which the worker processes import too); test-only
# objectives that other test modules register in this process would not exist in the workers.
SHIPPED = [n for n in OBJECTIVES.names() if not OBJECTIVES.get(n).factory.__module__.startswith("tests.")]
CASES = {**{n: (n, {}) for n in SHIPPED if n not in NOT_SPLIT_INVARIANT}, **VARIANTS}

# The failure demonstration, in the two processes only: sslkit.losses.distributed reports a world of one, so its
# gathers and all-reduces hand back the local tensor (SimCLR's negatives, DINO's center). Synchronised BatchNorm
# is left as it is.
BROKEN = {"simclr_without_gather": "simclr", "dino_without_center_all_reduce": "dino"}


def raw_recipe(case: str, name: str, settings: dict, world: int, out: Path) -> dict:
    objective = {**small_config(name), **OBJECTIVE_OVERRIDES.get(name, {}), **settings}
    entry = OBJECTIVES.get(name)
    views = entry.factory.required_views(entry.config())
    augment = ({"name": "mae", "image_size": 32} if views.num_global == 1 and not views.locals else
               {"name": "multicrop", "image_size": 32, "local_size": 16, "preset": "small",
                "num_local": 2 if views.locals else 0})
    trainer = {"epochs": 1, "progress": False, "accelerator": "cpu", "precision": "32-true", "sync_batchnorm": True,
               "checkpoint_every_steps": 0, "devices": world, "strategy": "ddp" if world > 1 else "auto"}
    return {"name": case, "output_dir": str(out / "runs"), "seed": 3,
            "data": {"name": "synthetic", "args": {"num_samples": WORLD * LOCAL_BATCH * STEPS, "image_size": 32},
                     "batch_size": WORLD * LOCAL_BATCH // world, "num_workers": 0, "augment_backend": "per_image"},
            "augment": augment, "encoder": CNN, "objective": objective,
            "optim": {"name": "sgd", "lr": LR, "momentum": 0.9, "warmup_epochs": 0, "weight_decay": 1e-4},
            "trainer": trainer, "eval": {"final_knn": False}}


def with_encoder(raw: dict) -> dict:
    """The recipe with the tiny ResNet where the objective takes a CNN, else the tiny ViT (MAE, iBOT)."""
    try:
        with torch.device("meta"):
            build_objective(resolve(raw))
        return raw
    except (ConfigError, ValueError):
        return {**raw, "encoder": VIT}


def make_views(name: str, step_seed: int) -> list[torch.Tensor]:
    """One step's views of the global batch, as the objective's pipeline shapes them."""
    entry = OBJECTIVES.get(name)
    spec = entry.factory.required_views(entry.config())
    sizes = [32] * spec.num_global + ([16, 16] if spec.locals else [])
    g = torch.Generator().manual_seed(step_seed)
    return [torch.randn(WORLD * LOCAL_BATCH, 3, s, s, generator=g) for s in sizes]


def engine_config(raw: dict) -> DictConfig:
    """The recipe as the engine gets it, in float64 (see the module notes)."""
    cfg = resolve(raw)
    cfg.trainer.precision = "64-true"
    return cfg


def run_case(fabric, raw: dict, steps: list[list[torch.Tensor]], run_dir: Path) -> dict:  # noqa: ANN001
    """``len(steps)`` engine steps of this process on its share of each step's views."""
    cfg = engine_config(raw)
    dataset, pipeline = preflight(cfg)
    ctx = setup(fabric, cfg, dataset, pipeline, run_dir, None, None)
    names = {p: n for n, p in ctx.objective.named_parameters()}
    grads: list[dict[str, torch.Tensor]] = []
    hook = ctx.optimizer.optimizer.register_step_pre_hook(  # Fabric wraps the optimiser; grads as it steps
        lambda opt, args, kwargs: grads.append({names[p]: p.grad.detach().clone() for group in opt.param_groups
                                                for p in group["params"] if p.grad is not None}))
    rank, world = fabric.global_rank, fabric.world_size
    losses = []
    for views in steps:
        mine = [v.chunk(world)[rank] for v in views]  # this rank's rows of the global batch
        _, loss = train_step(ctx, ctx.views(mine))
        ctx.state.record_step(0.0, 0.0, 0.0, loss)
        losses.append(loss)
    hook.remove()
    if ctx.logs is not None:
        ctx.logs.close()
    state = {k: v.detach().clone() for k, v in ctx.objective.state_dict().items()}
    return {"loss": losses, "grads": grads, "state": state}


def plan(out: Path) -> dict[str, tuple[dict, dict, list]]:
    """case -> (single-process recipe, two-process recipe, views per step)."""
    cases = {**CASES, **{k: (name, {}) for k, name in BROKEN.items()}}
    jobs = {}
    for i, (case, (name, settings)) in enumerate(cases.items()):
        single = with_encoder(raw_recipe(case, name, settings, 1, out))
        two = {**raw_recipe(case, name, settings, WORLD, out), "encoder": single["encoder"]}
        jobs[case] = (single, two, [make_views(name, 100 * i + j) for j in range(STEPS)])
    return jobs


def ddp_worker(rank: int, world: int, jobs: dict, out: Path) -> None:
    """Every case in one pair of processes; each rank saves what it measured."""
    os.environ.update(LOCAL_RANK=str(rank), NODE_RANK="0", WORLD_SIZE=str(world))  # as torchrun sets them
    fabric = make_fabric(engine_config(next(iter(jobs.values()))[1]))
    fabric.launch()  # joins the existing process group
    results = {}
    for case, (_, raw, steps) in jobs.items():
        local_only = mock.patch("sslkit.losses.distributed.world_size", lambda: 1)
        patch = local_only if case in BROKEN else contextlib.nullcontext()
        with patch:
            results[case] = run_case(fabric, raw, steps, out / f"rank{fabric.global_rank}" / case)
    torch.save(results, out / f"rank{fabric.global_rank}.pt")


def single_worker(fabric, jobs: dict, out: Path) -> dict:  # noqa: ANN001
    """The reference: every case in this one process, on the whole batch."""
    return {case: run_case(fabric, raw, steps, out / "single" / case)
            for case, (raw, _, steps) in jobs.items() if case not in BROKEN}


@pytest.fixture(scope="module")
def measured(tmp_path_factory) -> dict:
    """{"single": {case: result}, "ranks": [{case: result} per rank]}."""
    out = tmp_path_factory.mktemp("ddp_objectives")
    jobs = plan(out)
    run_distributed(ddp_worker, WORLD, jobs, out)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    single = make_fabric(engine_config(next(iter(jobs.values()))[0])).launch(single_worker, jobs, out)
    return {"single": single, "ranks": ranks}


def assert_same(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    if not want.is_floating_point():
        assert torch.equal(got, want), what
        return
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-8, msg=lambda m: f"{what}: {m}")


@pytest.mark.ddp
@pytest.mark.parametrize("case", sorted(CASES))
def test_two_processes_equal_one_on_the_concatenated_batch(measured, case):
    single, ranks = measured["single"][case], [r[case] for r in measured["ranks"]]
    for i in range(STEPS):
        mean_loss = sum(r["loss"][i] for r in ranks) / WORLD
        assert mean_loss == pytest.approx(single["loss"][i], rel=1e-6), f"{case} loss, step {i}"
    assert len(single["grads"]) == STEPS and single["grads"][0], f"{case}: no optimiser step was taken"
    for r, got in enumerate(ranks):
        for i in range(STEPS):
            assert got["grads"][i].keys() == single["grads"][i].keys(), f"{case} rank {r}: gradients of other params"
            for k, g in single["grads"][i].items():
                assert_same(got["grads"][i][k], g, f"{case} rank {r} step {i} grad {k}")
        assert got["state"].keys() == single["state"].keys()  # synchronised BatchNorm keeps BatchNorm's names
        for k, v in single["state"].items():
            assert_same(got["state"][k], v, f"{case} rank {r} after the steps: {k}")


@pytest.mark.ddp
def test_removing_the_cross_rank_reduction_breaks_equality(measured):
    single, ranks = measured["single"], measured["ranks"]
    # SimCLR with each rank contrasting only its own half: another loss, other gradients.
    broken = [r["simclr_without_gather"] for r in ranks]
    assert sum(r["loss"][0] for r in broken) / WORLD != pytest.approx(single["simclr"]["loss"][0], rel=1e-3)
    g_ok, g_bad = single["simclr"]["grads"][0], broken[0]["grads"][0]
    assert any(not torch.allclose(g_bad[k], g_ok[k], rtol=1e-2, atol=1e-5) for k in g_ok)
    # DINO with each rank centering on its own half: the centers depart from the global mean's.
    for r in ranks:
        center = r["dino_without_center_all_reduce"]["state"]["center"]
        assert not torch.allclose(center, single["dino"]["state"]["center"], rtol=1e-2, atol=1e-6)


def test_center_is_the_mean_of_all_rows_and_stays_when_there_are_none():
    """The center update weights rows, not batches (iBOT's ranks hold different numbers of masked patches); with
    no rows at all (no image masked) the center is kept instead of decaying towards zero."""
    from sslkit.losses.dino import update_center

    center = torch.randn(1, 5, dtype=torch.float64)
    rows = torch.randn(1, 7, 5, dtype=torch.float64)
    torch.testing.assert_close(update_center(center, rows, 0.9), 0.9 * center + 0.1 * rows[0].mean(0, keepdim=True))
    assert torch.equal(update_center(center, rows[:, :0], 0.9), center)
