"""The training loop, shared by every objective, on Lightning Fabric.

:func:`train` checks and builds what can fail on bad input before anything is written, then launches
:func:`run_worker` in each process. :func:`train_one_epoch` is the loop itself and reads like the paper's
pseudo-code: views, forward, backward, update, EMA. Everything else hangs off it: the time budget, progress,
logs, checkpoints, the non-finite guard, the health checks, the online probe and the k-NN monitor are callbacks
(:mod:`sslkit.engine.callbacks`), and the objective is driven through its interface
(:class:`sslkit.objectives.base.Objective`).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from sslkit.config import ConfigError
from sslkit.data.loader import ResumableBatchSampler, ViewDataset
from sslkit.encoders import fused_attention_wanted, set_fused_attention
from sslkit.engine.budget import TimeBudget
from sslkit.engine.build import (
    augment_backend,
    batched_views,
    build_objective,
    build_optimizer,
    build_pipeline,
    clip_and_norm,
)
from sslkit.engine.callbacks import Callbacks, Checkpointer, MetricsLogger, NonFiniteGuard, Progress
from sslkit.engine.checkpoint import load_checkpoint, set_rng_state
from sslkit.engine.context import TrainContext
from sslkit.engine.health import Health
from sslkit.engine.logs import MetricsLog, peak_rss_gb
from sslkit.engine.monitor import KNNMonitor, knn_line
from sslkit.engine.precision import make_fabric, resolve_precision
from sslkit.engine.probe import OnlineProbe
from sslkit.engine.rundir import (
    auto_resume,
    claim_run_dir,
    finished_summary,
    first_task,
    link_latest,
    lock_run_dir,
)
from sslkit.engine.schedules import Schedules
from sslkit.engine.signals import SignalCheckpoint, ignore_interrupts
from sslkit.engine.state import TrainState
from sslkit.heads.batchnorm import convert_sync_batchnorm
from sslkit.plugins import load_all
from sslkit.run import (
    RunError,
    atomic_write_bytes,
    build_dataset,
    load_state_strict,
    open_no_follow,
    read_config,
    refuse_linked_dirs,
)

RUN_DIR_ENV = "SSLKIT_RUN_DIR"  # lets DDP children started by the launcher agree on the run directory


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    images_per_s: float
    final_loss: float
    peak_rss_gb: float
    knn: dict[str, float] | None


def train_step(ctx: TrainContext, views: list[torch.Tensor]) -> tuple[dict[str, torch.Tensor], float]:
    """One optimisation step on this process's ``views`` at ``ctx.state.step``: schedules, forward, backward,
    clipping, update and the objective's EMA. Returns the objective's outputs and the loss as a number."""
    s, objective, optimizer = ctx.state, ctx.objective, ctx.optimizer
    ctx.schedules.apply(optimizer, s.step)
    out = ctx.model(views, s.step)  # {"loss": ..., other scalars to log}
    ctx.fabric.backward(out["loss"])
    objective.on_after_backward(s.step)
    grad_norm = clip_and_norm(ctx.fabric, ctx.cfg, ctx.model, optimizer, ctx.params)
    # The step's one host-device sync: loss and gradient norm read together. A non-finite loss makes the
    # (all-reduced) gradients non-finite on every rank, so all ranks agree to skip the update.
    if hasattr(grad_norm, "full_tensor"):  # FSDP: a DTensor
        grad_norm = grad_norm.full_tensor()
    loss, norm = torch.stack([out["loss"].detach().float(), grad_norm.detach().float().to(out["loss"].device)]).tolist()
    if ctx.any_rank(not (math.isfinite(loss) and math.isfinite(norm))):
        what, value = ("loss", loss) if not math.isfinite(loss) else ("gradient norm", norm)
        ctx.callbacks.on_bad_step(ctx, what, value)
    else:
        optimizer.step()
        objective.on_step_end(s.step)  # EMA teachers, schedules
    optimizer.zero_grad(set_to_none=True)
    return out, loss


def train_one_epoch(ctx: TrainContext) -> None:
    """One pass over the loader from the state's position, until the epoch ends or the run stops."""
    s = ctx.state
    ctx.sampler.set_epoch(s.epoch, s.batch_in_epoch)
    t0 = time.perf_counter()
    for batch, labels in ctx.loader:
        t_data = time.perf_counter()
        views = ctx.views(batch)
        ctx.step_inputs = (views, labels)  # for callbacks that look at the batch (health checks, online probe)
        out, loss = train_step(ctx, views)
        s.record_step(t0, t_data, time.perf_counter(), loss)
        ctx.callbacks.on_step_end(ctx, out)
        if s.step == s.stop_at_step or s.finished or s.stop_requested:
            s.stopped_early = not s.finished
            return
        t0 = time.perf_counter()


def run_worker(fabric, cfg: DictConfig, dataset, pipeline, run_dir: Path, ckpt: dict | None,  # noqa: ANN001
               stop_at_step: int | None) -> TrainResult:
    """One process of a run: set up, loop over epochs, finish."""
    ctx = setup(fabric, cfg, dataset, pipeline, run_dir, ckpt, stop_at_step)
    s = ctx.state
    signals = next(c for c in ctx.callbacks.callbacks if isinstance(c, SignalCheckpoint))
    ctx.callbacks.on_train_start(ctx)
    while not s.finished and not s.stopped_early:
        train_one_epoch(ctx)
        if s.epoch_done and not s.stopped_early:
            s.epoch, s.batch_in_epoch = s.epoch + 1, 0
            ctx.callbacks.on_epoch_end(ctx)
    ctx.callbacks.on_train_end(ctx)
    result = finish(ctx)
    signals.raise_if_stopped(ctx)
    return result


def setup(fabric, cfg: DictConfig, dataset, pipeline, run_dir: Path, ckpt: dict | None,  # noqa: ANN001
          stop_at_step: int | None) -> TrainContext:
    """Objective, optimiser, data, schedules, state and callbacks for this process, restored from ``ckpt``."""
    rank, world = fabric.global_rank, fabric.world_size
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    objective = build_objective(cfg)
    sampler = ResumableBatchSampler(len(dataset), cfg.data.batch_size, cfg.seed, rank, world,
                                    order=getattr(dataset, "epoch_order", None))  # shards: stream shard by shard
    spe = sampler.batches_per_epoch
    cap = cfg.trainer.max_steps or cfg.trainer.epochs * spe
    fitted = (ckpt or {}).get("budget_total_steps")  # a resumed run continues the schedule it had fitted
    budget = TimeBudget(cfg.trainer.time_budget_minutes, cfg.trainer.budget_calibration_steps, fitted) \
        if cfg.trainer.time_budget_minutes else None
    total = int(fitted) if budget is not None and fitted else cap
    state = TrainState(steps_per_epoch=spe, cap_steps=cap, total_steps=total, global_batch=cfg.data.batch_size * world,
                       world=world, stop_at_step=stop_at_step)
    objective.setup_schedule(spe, total)

    channels_last = bool(cfg.trainer.channels_last and getattr(objective.encoder, "is_cnn", False))
    if channels_last:
        objective = objective.to(memory_format=torch.channels_last)
    if cfg.trainer.sync_batchnorm and world > 1:  # BatchNorm over the global batch, on any device
        objective = convert_sync_batchnorm(objective, fabric.device.type)
    elif world > 1 and any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in objective.modules()):
        fabric.print("note: trainer.sync_batchnorm is off, so each process's BatchNorm uses the statistics of its own "
                     "share of the batch; set it to true for those of the global batch (what one process would do).")
    fused = fused_attention_wanted(cfg.trainer.attention, fabric.device.type, resolve_precision(cfg).startswith("bf16"))
    attention = ("fused" if fused else "math") if set_fused_attention(objective, fused) else None  # None: no ViT

    schedules = Schedules(cfg, state.global_batch, spe, total)
    sharded = cfg.trainer.strategy == "fsdp"
    if sharded:  # FSDP: shard first (fabric.setup_module), then the optimiser on the sharded parameters
        check_sharded_resume(ckpt, world)
        model = fabric.setup_module(objective)
    optimizer = build_optimizer(cfg, objective, schedules.peak_lr)
    params = [p for p in objective.parameters() if p.requires_grad]
    if ckpt is not None:
        if ckpt.get("sharded") is not None:
            from sslkit.engine.fsdp import load_sharded

            load_sharded(ckpt["sharded"], objective, optimizer)  # any world size: DCP reshards on load
        else:
            load_state_strict(objective, ckpt["objective"], "checkpoint objective state")
            optimizer.load_state_dict(ckpt["optimizer"])
        state.step, state.epoch, state.batch_in_epoch = int(ckpt["step"]), int(ckpt["epoch"]), int(ckpt["batch_in_epoch"])
        state.start_step, state.prior_seconds = state.step, float(ckpt.get("train_seconds", 0.0))
        if int(ckpt["world_size"]) != world:
            fabric.print(f"note: resuming a {ckpt['world_size']}-process run on {world} processes; the data order "
                         "and RNG streams differ from the original from here on.")
        elif "rng" in ckpt:
            set_rng_state(ckpt["rng"][rank])
    else:
        torch.manual_seed(cfg.seed + rank)  # per-rank randomness (dropout, drop path); masks use Objective.seed

    if fabric.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed crop sizes: let cuDNN pick its fastest kernels once
    if sharded:
        optimizer = fabric.setup_optimizers(optimizer)
    else:
        forward_module = torch.compile(objective) if cfg.trainer.compile else objective
        model, optimizer = fabric.setup(forward_module, optimizer, move_to_device=True)
    batched = batched_views(cfg) if augment_backend(cfg, dataset) == "batched" else None
    loader = torch.utils.data.DataLoader(
        ViewDataset(dataset, None if batched else pipeline), batch_sampler=sampler, num_workers=cfg.data.num_workers,
        persistent_workers=cfg.data.num_workers > 0, pin_memory=fabric.device.type == "cuda",
        generator=torch.Generator().manual_seed(cfg.seed),  # keeps the global RNG out of worker seeding
        worker_init_fn=ignore_interrupts if cfg.data.num_workers > 0 else None,
    )
    callbacks = [c for c in (budget, Progress(cfg.trainer.progress_every_seconds, terminal=cfg.trainer.progress),
                             Health.from_config(cfg, ckpt),
                             OnlineProbe.from_config(cfg, objective, dataset, ckpt, say=fabric.print),
                             MetricsLogger(), Checkpointer(cfg.trainer.checkpoint_every_steps),
                             NonFiniteGuard(cfg.trainer.skip_nonfinite_steps), SignalCheckpoint(requeue=cfg.trainer.requeue),
                             KNNMonitor())
                 if c is not None]
    ctx = TrainContext(fabric, cfg, run_dir, objective, model, optimizer, params, loader, sampler, batched,
                       channels_last, schedules, state, Callbacks(callbacks), attention=attention)

    inner = getattr(dataset, "dataset", dataset)
    if hasattr(inner, "bad_log"):
        inner.bad_log = run_dir / "bad_files.txt"  # workers append the paths of unreadable files here
    if ctx.is_main:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(run_dir / "config.yaml", OmegaConf.to_yaml(cfg).encode())  # replaces, never follows, a link
        link_latest(run_dir, cfg.name)
        if getattr(inner, "skipped", None):  # unreadable files a preloaded image folder left out
            with open_no_follow(run_dir / "bad_files.txt") as f:
                f.write("".join(f"{path}\n" for path in inner.skipped))
        ctx.logs = MetricsLog(run_dir, state.step if ckpt is not None else None)
        ctx.print(f"run directory: {run_dir}  ({total} steps, {spe}/epoch, global batch {state.global_batch}, "
                  f"lr {schedules.peak_lr:.3g}, precision {resolve_precision(cfg)}, {world} process(es), "
                  f"{'batched' if batched else 'per-image'} augmentation{f', {attention} attention' if attention else ''})")
    fabric.barrier()
    return ctx


def finish(ctx: TrainContext) -> TrainResult:
    """Close the logs, write ``summary.json`` and say how the run went (rank 0)."""
    s, knn = ctx.state, ctx.result.get("knn")
    if ctx.logs is not None:
        ctx.logs.close()
        summary = ctx.summary()
        bad_log = ctx.run_dir / "bad_files.txt"
        if bad_log.is_file():
            bad = sorted(set(bad_log.read_text().splitlines()))
            summary["skipped_files"] = len(bad)
            ctx.print(f"skipped {len(bad)} unreadable file(s) (listed in {bad_log}); first: {bad[:3]}")
        atomic_write_bytes(ctx.run_dir / "summary.json", json_bytes(summary))
        ctx.print(f"{'stopped' if s.stopped_early else 'finished'} at step {s.step}: {s.steady_images_per_s:.1f} "
                  f"images/s, loss {s.last_loss:.4f}, peak memory {peak_rss_gb():.2f} GB")
        if knn is not None:
            ctx.print(knn_line(knn))
    return TrainResult(ctx.run_dir, s.step, s.images_per_s, s.last_loss, peak_rss_gb(), knn)


def json_bytes(obj: dict) -> bytes:
    import json

    return json.dumps(obj, indent=2).encode()


MAX_PARAMETERS = 20_000_000_000  # a recipe whose model is larger is a typo (ViT-22B has 22e9), not a model


def preflight(cfg: DictConfig) -> tuple[Any, Any]:
    """Build and check what a run needs from the recipe, writing nothing: the dataset (is there a full batch?), the
    view pipeline and the objective, built on the meta device (shapes only: no memory, so a huge width is
    reported, not allocated). Bad input raises :class:`ConfigError` (or the dataset's ``DataError``)."""
    load_all()
    if cfg.trainer.threads:
        torch.set_num_threads(int(cfg.trainer.threads))
    dataset = build_dataset(cfg, "train")
    if cfg.data.subset:
        from sslkit.data import subset_dataset

        dataset = subset_dataset(dataset, cfg.data.subset, seed=cfg.seed)
    world = cfg.trainer.num_nodes * (cfg.trainer.devices if isinstance(cfg.trainer.devices, int) else 1)
    if len(dataset) < cfg.data.batch_size * world:
        raise ConfigError(f"recipe key 'data.batch_size': {cfg.data.batch_size} x {world} process(es) is more than the "
                          f"{len(dataset)} training images, so not one step fits in an epoch. Lower data.batch_size "
                          "or use more data (data.subset).")
    pipeline = build_pipeline(cfg)
    what = f"recipe sections 'encoder'/'objective' ({cfg.encoder.name}, {cfg.objective.name})"
    try:
        with torch.device("meta"):
            objective = build_objective(cfg)
    except (ValueError, TypeError, AssertionError) as e:
        raise ConfigError(f"{what}: {e}") from None
    except Exception as e:  # noqa: BLE001 - e.g. a negative width inside timm: still the recipe's values
        raise ConfigError(f"{what} cannot be built: {type(e).__name__}: {str(e).splitlines()[0][:200]}. Check "
                          "their sizes.") from None
    if cfg.trainer.strategy == "fsdp":
        from sslkit.engine.fsdp import vit_blocks

        if not vit_blocks(objective):
            raise ConfigError(f"recipe key 'trainer.strategy': fsdp shards the transformer blocks of ViT encoders, and "
                              f"{cfg.encoder.name} has none. Use trainer.strategy=ddp for CNN encoders.")
    n = sum(p.numel() for p in objective.parameters())
    if n > MAX_PARAMETERS:
        raise ConfigError(f"{what}: the model would have {n:,} parameters; check the widths in the recipe.")
    return dataset, pipeline


def train(cfg: DictConfig, resume: str | os.PathLike | None = None, stop_at_step: int | None = None) -> TrainResult:
    """Pretrain with the resolved recipe ``cfg``; returns where the run went and what it measured.

    Args:
        cfg: a recipe from :func:`sslkit.config.load_recipe` (already validated).
        resume: a run directory (or its checkpoint) to continue; its ``config.yaml`` must match ``cfg``
            except for ``trainer`` and ``eval`` settings. ``"auto"``: the newest run of ``cfg.name`` whose
            checkpoint loads and matches, else a fresh run (:func:`sslkit.engine.rundir.auto_resume`).
        stop_at_step: stop (after checkpointing) once this global step is reached, without changing the
            schedules; used to test resumption and to split long jobs.
    """
    dataset, pipeline = preflight(cfg)  # everything that can fail on bad input, before anything is written

    fabric = make_fabric(cfg)  # before the run is locked: nothing can fail between the lock and the `finally`
    chosen = os.environ.get(RUN_DIR_ENV)  # set in the processes the DDP launcher starts: the parent chose the run
    ckpt, lock = None, None
    if str(resume) == "auto":
        run_dir, ckpt, lock = auto_resume(cfg, chosen)
        if (done := finished_summary(run_dir, ckpt)) is not None:  # a requeued job that had finished: nothing to do
            if lock is not None:
                lock.release()
            print(f"--resume auto: {run_dir} finished at step {ckpt['step']}; nothing to resume.")
            return TrainResult(run_dir, int(ckpt["step"]), done["images_per_s"], done["final_loss"],
                               done["peak_rss_gb"], None)
    elif resume is not None:
        run_dir = Path(resume)
        if run_dir.is_file():
            run_dir = run_dir.parent.parent if run_dir.parent.name == "checkpoints" else run_dir.parent
        refuse_linked_dirs(run_dir)
        ckpt_path = run_dir / "checkpoints" / "last.ckpt"
        ckpt = load_checkpoint(ckpt_path)
        check_resume_config(cfg, read_config(ckpt["config_yaml"], f"the recipe inside {ckpt_path}"), ckpt_path)
    else:
        run_dir = Path(chosen) if chosen else claim_run_dir(cfg)
    if lock is None and not chosen and first_task():
        lock = lock_run_dir(run_dir)  # one process trains into a run at a time

    previous = os.environ.get(RUN_DIR_ENV)
    os.environ[RUN_DIR_ENV] = str(run_dir)  # inherited by the processes the DDP launcher starts
    try:
        return fabric.launch(run_worker, cfg, dataset, pipeline, run_dir, ckpt, stop_at_step)
    finally:
        if previous is None:
            os.environ.pop(RUN_DIR_ENV, None)
        else:
            os.environ[RUN_DIR_ENV] = previous
        if lock is not None:
            lock.release()


def check_sharded_resume(ckpt: dict | None, world: int) -> None:
    """What a sharded (FSDP) run can resume from: a sharded checkpoint, on any world size at an epoch boundary.
    Mid-epoch, the position in the epoch counts global batches, whose size changes with the world size, so the
    data would not continue where it stopped."""
    if ckpt is None:
        return
    if ckpt.get("sharded") is None:
        raise RunError("this checkpoint was written by an unsharded run (ddp or one process); resume it with the "
                       "trainer.strategy it was written with, not fsdp.")
    saved = int(ckpt["world_size"])
    if saved != world and int(ckpt["batch_in_epoch"]):
        raise RunError(f"cannot resume this checkpoint on {world} process(es): it was written by {saved} in the middle "
                       f"of epoch {ckpt['epoch']} (after {ckpt['batch_in_epoch']} global batches of {saved} x "
                       "data.batch_size images), and a different world size changes the global batch, so the data "
                       f"would not continue where it stopped. Resume on {saved} process(es), or use a checkpoint "
                       "written at an epoch's end.")


def check_resume_config(cfg: DictConfig, saved: DictConfig, path: Path) -> None:
    """Only ``trainer.*``, ``eval.*``, ``data.num_workers`` and ``output_dir`` may differ from the run's recipe."""
    a = OmegaConf.to_container(cfg, resolve=True)
    b = OmegaConf.to_container(saved, resolve=True)
    for d in (a, b):  # these change how fast the run goes, not what it computes
        d.get("data", {}).pop("num_workers", None)
        d.pop("output_dir", None)
    diff = [k for k in set(a) | set(b) if k not in ("trainer", "eval") and a.get(k) != b.get(k)]
    if diff:
        raise RunError(f"cannot resume from {path}: the recipe differs from the run's in {sorted(diff)}. Resume "
                       "with the run's own config.yaml (only trainer.*, eval.* and data.num_workers may change).")
