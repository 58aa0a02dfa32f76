"""The one training loop, shared by every objective, on Lightning Fabric.

Fabric gives us devices, DDP across GPUs and nodes (gloo on CPU), FSDP and mixed precision; the loop
itself stays readable top to bottom, like the official DINO script: schedules are computed up front and
indexed by the global step, and the objective is driven through four calls (see
:class:`sslkit.objectives.base.Objective`).

Checkpoints hold everything needed to continue bit-exactly on CPU: objective state (teacher, center,
...), optimiser, step, epoch position, the RNG state of every rank, and the resolved recipe. They are
written atomically and loaded with ``weights_only=True``.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import math
import os
import random
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from sslkit.config import ConfigError, section_kwargs
from sslkit.data.loader import ResumableBatchSampler, ViewDataset, batch_generator
from sslkit.encoders import fused_attention_wanted, set_fused_attention
from sslkit.plugins import load_all
from sslkit.registry import AUGMENTATIONS, ENCODERS, OBJECTIVES
from sslkit.run import (
    RunError,
    atomic_write_bytes,
    build_dataset,
    eval_image_size,
    load_state_strict,
    save_encoder,
)

CHECKPOINT_VERSION = 1
WARMUP_STEPS_EXCLUDED = 2
RUN_DIR_ENV = "SSLKIT_RUN_DIR"  # lets DDP children started by the launcher agree on the run directory


class NonFiniteLossError(RuntimeError):
    """The loss or the gradients became NaN/Inf."""


# ----------------------------------------------------------------------------------------------------------
# schedules


def cosine_schedule(start: float, end: float, total_steps: int, warmup_steps: int = 0,
                    warmup_start: float = 0.0) -> np.ndarray:
    """Per-step values: linear warmup ``warmup_start -> start`` over ``warmup_steps``, then cosine ``start -> end``."""
    total_steps = max(1, int(total_steps))
    warmup_steps = min(max(0, int(warmup_steps)), total_steps)
    warm = np.linspace(warmup_start, start, warmup_steps, endpoint=False)
    rest = total_steps - warmup_steps
    t = np.arange(rest) / max(1, rest)
    cos = end + 0.5 * (start - end) * (1 + np.cos(np.pi * t))
    return np.concatenate([warm, cos])


def fit_steps_to_budget(step: int, elapsed_s: float, seconds_per_step: float, budget_s: float, cap: int) -> int:
    """Total steps that end a run near ``budget_s`` seconds of training: ``step`` done in ``elapsed_s``, the rest
    at ``seconds_per_step``. At least ``step + 1`` (the step in progress finishes), at most ``cap``."""
    if seconds_per_step <= 0:
        return cap
    more = math.floor(max(0.0, budget_s - elapsed_s) / seconds_per_step)
    return int(min(cap, max(step + 1, step + more)))


def scaled_lr(cfg: DictConfig, global_batch: int) -> float:
    """``optim.lr`` scaled with the global batch: linear (lr*B/256), sqrt (lr*sqrt(B/256)) or none."""
    rule = cfg.optim.lr_scaling
    if rule == "linear":
        return cfg.optim.lr * global_batch / 256
    if rule == "sqrt":
        return cfg.optim.lr * math.sqrt(global_batch / 256)
    return cfg.optim.lr


# ----------------------------------------------------------------------------------------------------------
# building blocks


def build_objective(cfg: DictConfig) -> torch.nn.Module:
    """Encoder + objective from the recipe (no data, no devices)."""
    load_all()
    encoder = ENCODERS.build(cfg.encoder.name, **section_kwargs(cfg.encoder))
    entry = OBJECTIVES.get(cfg.objective.name)
    obj_cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(entry.config), cfg.objective))
    return entry.factory(encoder=encoder, cfg=obj_cfg)


def build_pipeline(cfg: DictConfig):
    load_all()
    return AUGMENTATIONS.build(cfg.augment.name, **section_kwargs(cfg.augment))


def augment_backend(cfg: DictConfig, dataset) -> str:
    """``data.augment_backend`` resolved: ``auto`` is batched for in-memory (same-size) datasets."""
    choice = cfg.data.augment_backend
    in_memory = hasattr(getattr(dataset, "dataset", dataset), "images")
    if choice == "batched" and not in_memory:
        raise ConfigError("data.augment_backend=batched needs same-size in-memory images (fashion_mnist, cifar, "
                          "synthetic); use per_image for image folders.")
    if choice == "auto":
        return "batched" if in_memory else "per_image"
    return choice


def build_optimizer(cfg: DictConfig, objective: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
    """AdamW / SGD / LARS with no weight decay on biases, 1-d parameters (norms) and the objective's tokens."""
    from timm.optim import Lars, param_groups_weight_decay

    groups = param_groups_weight_decay(objective, cfg.optim.weight_decay,
                                       no_weight_decay_list=objective.no_weight_decay())
    for g in groups:
        g["wd_mult"] = 1.0 if g["weight_decay"] > 0 else 0.0
    o = cfg.optim
    foreach = o.foreach
    if o.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(o.betas), foreach=foreach)
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=o.momentum, foreach=foreach)
    if o.name == "lars":
        return Lars(groups, lr=lr, momentum=o.momentum)
    raise ValueError(f"unknown optimiser {o.name!r}")


def clip_per_param(params: list[torch.nn.Parameter], max_norm: float) -> None:
    """Official DINO clipping: scale each parameter's gradient to norm <= ``max_norm`` separately."""
    for p in params:
        if p.grad is not None:
            norm = p.grad.detach().norm(2)
            p.grad.mul_(torch.clamp(max_norm / (norm + 1e-6), max=1.0))


def _rng_state() -> dict[str, Any]:
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    random.setstate(_tuplify(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _tuplify(x: Any) -> Any:
    return tuple(_tuplify(v) for v in x) if isinstance(x, list | tuple) else x


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a training checkpoint safely (``weights_only=True``: tensors and plain containers only)."""
    p = Path(path)
    if not p.is_file():
        raise RunError(f"checkpoint {p} does not exist.")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - UnpicklingError, RuntimeError for truncated zip, ...
        raise RunError(
            f"refusing to load checkpoint {p}: it is not a plain weights checkpoint ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:300]}). sslkit loads checkpoints with weights_only=True, so pickled code "
            "is never run; a truncated file also ends here. Use the run's previous checkpoint or re-export it."
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != "sslkit" or "objective" not in ckpt:
        raise RunError(f"{p} is not an sslkit training checkpoint (no 'format: sslkit' / 'objective' entries).")
    return ckpt


# ----------------------------------------------------------------------------------------------------------
# run directory and logs


def new_run_dir(cfg: DictConfig) -> Path:
    """``output_dir/name``, or ``name-2``, ``name-3``... when taken; ``name-latest`` points at it."""
    root = Path(cfg.output_dir)
    d = root / cfg.name
    n = 2
    while d.exists():
        d = root / f"{cfg.name}-{n}"
        n += 1
    return d


def _link_latest(run_dir: Path, name: str) -> None:
    link = run_dir.parent / f"{name}-latest"
    tmp = run_dir.parent / f".{name}-latest.tmp{os.getpid()}"
    try:
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(run_dir.name)
        os.replace(tmp, link)
    except OSError:
        pass  # a filesystem without symlinks only loses the convenience link


class MetricsLog:
    """``metrics.csv`` (one row per logged step, columns grow as needed) and TensorBoard events."""

    def __init__(self, run_dir: Path, resume_step: int | None) -> None:
        self.path = run_dir / "metrics.csv"
        self.rows: list[dict[str, Any]] = []
        if resume_step is not None and self.path.is_file():
            with self.path.open() as f:
                self.rows = [r for r in csv.DictReader(f) if int(float(r.get("step") or 0)) <= resume_step]
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=resume_step)
        except Exception:  # noqa: BLE001 - TensorBoard is optional at run time
            self.tb = None

    def log(self, step: int, values: dict[str, float]) -> None:
        self.rows.append({"step": step, **values})
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)

    def flush(self) -> None:
        cols: list[str] = []
        for r in self.rows:
            cols += [k for k in r if k not in cols]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=cols)
        w.writeheader()
        w.writerows(self.rows)
        atomic_write_bytes(self.path, buf.getvalue().encode())
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        self.flush()
        if self.tb is not None:
            self.tb.close()


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux reports KiB


# ----------------------------------------------------------------------------------------------------------
# the loop


@dataclass
class TrainResult:
    run_dir: Path
    steps: int
    images_per_s: float
    final_loss: float
    peak_rss_gb: float
    knn: dict[str, float] | None


def cpu_has_native_bf16() -> bool:
    """True when the CPU has bf16 instructions (AVX512-BF16 or AMX); a precondition, not a promise of speed."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


BF16_MIN_SPEEDUP = 1.15  # bf16 autocast is chosen on a CPU only when it is at least this much faster than fp32
CPU_BF16_ENV = "SSLKIT_CPU_BF16"  # "1" / "0" skips the probe (set by the first probe, so DDP children agree)


def _best_seconds(fn, reps: int = 3) -> float:
    fn()  # warm-up: kernel selection, allocation
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


@functools.cache
def cpu_bf16_speedup() -> float:
    """How much faster bf16 runs than fp32 on this CPU: the geometric mean over a 3x3 convolution (oneDNN,
    channels_last) and a 1024x1024 matmul, each timed at its best of 3 (about 0.2 s in all).

    Measured, because the instruction set does not tell: on the 2-core AMD Zen 5 of PERF_NOTES bf16 matmuls run
    at 2.3x fp32 (MKL's fp32 is slow there); on a 2-core Intel Xeon with AVX512-BF16 but no AMX, fp32 matmuls
    ran at 296 GFLOP/s and bf16 at 165, and a narrow ResNet's training step was 5% faster in fp32.
    """
    if not cpu_has_native_bf16():
        return 0.0
    with torch.no_grad():
        def conv(dtype: torch.dtype):
            x = torch.randn(64, 64, 16, 16, dtype=dtype).contiguous(memory_format=torch.channels_last)
            w = torch.randn(64, 64, 3, 3, dtype=dtype).contiguous(memory_format=torch.channels_last)
            return lambda: torch.nn.functional.conv2d(x, w, padding=1)

        def mm(dtype: torch.dtype):
            a, b = torch.randn(1024, 1024, dtype=dtype), torch.randn(1024, 1024, dtype=dtype)
            return lambda: a @ b

        ratios = [_best_seconds(make(torch.float32)) / _best_seconds(make(torch.bfloat16)) for make in (conv, mm)]
    return math.sqrt(ratios[0] * ratios[1])


def cpu_prefers_bf16() -> bool:
    """bf16 autocast on this CPU? ``$SSLKIT_CPU_BF16`` (1/0) if set, else :func:`cpu_bf16_speedup` >= 1.15."""
    env = os.environ.get(CPU_BF16_ENV)
    if env in ("0", "1"):
        return env == "1"
    choice = cpu_bf16_speedup() >= BF16_MIN_SPEEDUP
    os.environ[CPU_BF16_ENV] = "1" if choice else "0"  # processes started from here (DDP) make the same choice
    return choice


def _resolve_precision(cfg: DictConfig) -> str:
    """``auto``: bf16 autocast on GPU, and on a CPU where bf16 measures faster than fp32
    (:func:`cpu_prefers_bf16`; PERF_NOTES: about 2x on AVX512-BF16 AMD cores), else fp32."""
    if cfg.trainer.precision != "auto":
        return cfg.trainer.precision
    gpu = cfg.trainer.accelerator in ("gpu", "cuda") or (cfg.trainer.accelerator == "auto" and torch.cuda.is_available())
    return "bf16-mixed" if gpu or cpu_prefers_bf16() else "32-true"


def make_fabric(cfg: DictConfig):
    from lightning_fabric import Fabric

    t = cfg.trainer
    strategy = t.strategy
    devices = t.devices
    return Fabric(accelerator=t.accelerator, devices=devices, num_nodes=t.num_nodes, strategy=strategy,
                  precision=_resolve_precision(cfg))


def train(cfg: DictConfig, resume: str | os.PathLike | None = None, stop_at_step: int | None = None) -> TrainResult:
    """Pretrain with the resolved recipe ``cfg``; returns where the run went and what it measured.

    Args:
        cfg: a recipe from :func:`sslkit.config.load_recipe` (already validated).
        resume: a run directory (or its checkpoint) to continue; its ``config.yaml`` must match ``cfg``
            except for ``trainer`` settings.
        stop_at_step: stop (after checkpointing) once this global step is reached, without changing the
            schedules; used to test resumption and to split long jobs.
    """
    # Everything that can fail on bad input is built before anything is written.
    load_all()
    if cfg.trainer.threads:
        torch.set_num_threads(int(cfg.trainer.threads))
    dataset = build_dataset(cfg, "train")
    if cfg.data.subset:
        from sslkit.data import subset_dataset

        dataset = subset_dataset(dataset, cfg.data.subset, seed=cfg.seed)
    pipeline = build_pipeline(cfg)
    try:
        build_objective(cfg)  # fail fast on encoder/objective arguments, before anything is written
    except (ValueError, TypeError, AssertionError) as e:
        raise ConfigError(f"recipe sections 'encoder'/'objective' ({cfg.encoder.name}, {cfg.objective.name}): "
                          f"{e}") from None

    ckpt = None
    if resume is not None:
        run_dir = Path(resume)
        if run_dir.is_file():
            run_dir = run_dir.parent.parent if run_dir.parent.name == "checkpoints" else run_dir.parent
        ckpt_path = run_dir / "checkpoints" / "last.ckpt"
        ckpt = load_checkpoint(ckpt_path)
        _check_resume_config(cfg, OmegaConf.create(ckpt["config_yaml"]), ckpt_path)
    else:
        run_dir = Path(os.environ.get(RUN_DIR_ENV) or new_run_dir(cfg))

    fabric = make_fabric(cfg)
    previous = os.environ.get(RUN_DIR_ENV)
    os.environ[RUN_DIR_ENV] = str(run_dir)  # inherited by the processes the DDP launcher starts
    try:
        return fabric.launch(_train_worker, cfg, dataset, pipeline, run_dir, ckpt, stop_at_step)
    finally:
        if previous is None:
            os.environ.pop(RUN_DIR_ENV, None)
        else:
            os.environ[RUN_DIR_ENV] = previous


def _check_resume_config(cfg: DictConfig, saved: DictConfig, path: Path) -> None:
    a = OmegaConf.to_container(cfg, resolve=True)
    b = OmegaConf.to_container(saved, resolve=True)
    for d in (a, b):  # these change how fast the run goes, not what it computes
        d.get("data", {}).pop("num_workers", None)
        d.pop("output_dir", None)
    diff = [k for k in set(a) | set(b) if k not in ("trainer", "eval") and a.get(k) != b.get(k)]
    if diff:
        raise RunError(f"cannot resume from {path}: the recipe differs from the run's in {sorted(diff)}. Resume "
                       "with the run's own config.yaml (only trainer.*, eval.* and data.num_workers may change).")


def _train_worker(fabric, cfg: DictConfig, dataset, pipeline, run_dir: Path, ckpt: dict | None,
                  stop_at_step: int | None) -> TrainResult:
    rank, world = fabric.global_rank, fabric.world_size
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    objective = build_objective(cfg)

    sampler = ResumableBatchSampler(len(dataset), cfg.data.batch_size, cfg.seed, rank, world)
    steps_per_epoch = sampler.batches_per_epoch
    cap_steps = cfg.trainer.max_steps or cfg.trainer.epochs * steps_per_epoch
    total_steps = cap_steps
    budget_s = cfg.trainer.time_budget_minutes * 60.0 if cfg.trainer.time_budget_minutes else None
    prior_seconds = 0.0  # training seconds of the run before this process (resume), for the budget
    budget_fitted = False
    if ckpt is not None:
        prior_seconds = float(ckpt.get("train_seconds", 0.0))
        if budget_s is not None and ckpt.get("budget_total_steps"):
            total_steps, budget_fitted = int(ckpt["budget_total_steps"]), True  # the fitted schedule continues
    epochs = math.ceil(total_steps / steps_per_epoch)
    objective.setup_schedule(steps_per_epoch, total_steps)

    channels_last = cfg.trainer.channels_last and getattr(objective.encoder, "is_cnn", False)
    if channels_last:
        objective = objective.to(memory_format=torch.channels_last)
    if cfg.trainer.sync_batchnorm and world > 1:
        objective = torch.nn.SyncBatchNorm.convert_sync_batchnorm(objective)
    fused = fused_attention_wanted(cfg.trainer.attention, fabric.device.type,
                                   _resolve_precision(cfg).startswith("bf16"))
    attention = ("fused" if fused else "math") if set_fused_attention(objective, fused) else None  # None: no ViT

    global_batch = cfg.data.batch_size * world
    peak_lr = scaled_lr(cfg, global_batch)
    warmup = int(round(cfg.optim.warmup_epochs * steps_per_epoch))
    wd_end = cfg.optim.weight_decay if cfg.optim.weight_decay_end is None else cfg.optim.weight_decay_end

    def schedules(total: int) -> tuple[np.ndarray, np.ndarray]:
        return (cosine_schedule(peak_lr, cfg.optim.min_lr, total, warmup),
                cosine_schedule(cfg.optim.weight_decay, wd_end, total))

    lr_sched, wd_sched = schedules(total_steps)
    optimizer = build_optimizer(cfg, objective, peak_lr)
    params = [p for p in objective.parameters() if p.requires_grad]

    step, epoch, start_batch = 0, 0, 0
    if ckpt is not None:
        load_state_strict(objective, ckpt["objective"], "checkpoint objective state")
        optimizer.load_state_dict(ckpt["optimizer"])
        step, epoch, start_batch = int(ckpt["step"]), int(ckpt["epoch"]), int(ckpt["batch_in_epoch"])
        if int(ckpt["world_size"]) != world:
            fabric.print(f"note: resuming a {ckpt['world_size']}-process run on {world} processes; the data order "
                         "and RNG streams differ from the original from here on.")
        elif "rng" in ckpt:
            _set_rng_state(ckpt["rng"][rank])
    else:
        torch.manual_seed(cfg.seed + rank)  # per-rank randomness (masks, dropout) for training

    if fabric.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed crop sizes: let cuDNN pick its fastest kernels once
    forward_module = torch.compile(objective) if cfg.trainer.compile else objective
    model, optimizer = fabric.setup(forward_module, optimizer, move_to_device=True)
    batched = None
    if augment_backend(cfg, dataset) == "batched":
        from sslkit.augment.batched import batched_pipeline

        batched = batched_pipeline(cfg.augment.name, **section_kwargs(cfg.augment))
    loader = torch.utils.data.DataLoader(
        ViewDataset(dataset, None if batched else pipeline), batch_sampler=sampler, num_workers=cfg.data.num_workers,
        persistent_workers=cfg.data.num_workers > 0, pin_memory=fabric.device.type == "cuda",
        generator=torch.Generator().manual_seed(cfg.seed),  # keeps the global RNG out of worker seeding
    )

    logs = None
    if fabric.is_global_zero:
        (run_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        OmegaConf.save(cfg, run_dir / "config.yaml")
        _link_latest(run_dir, cfg.name)
        logs = MetricsLog(run_dir, step if ckpt is not None else None)
        fabric.print(f"run directory: {run_dir}  ({total_steps} steps, {steps_per_epoch}/epoch, global batch "
                     f"{global_batch}, lr {peak_lr:.3g}, precision {_resolve_precision(cfg)}, {world} process(es), "
                     f"{'batched' if batched else 'per-image'} augmentation"
                     f"{f', {attention} attention' if attention else ''})")
    fabric.barrier()

    def save_checkpoint(batch_in_epoch: int, ep: int) -> None:
        rng = _rng_state()
        rngs = [rng] if world == 1 else _gather_objects(fabric, rng)
        if not fabric.is_global_zero:
            return
        state = {"format": "sslkit", "version": CHECKPOINT_VERSION, "step": step, "epoch": ep,
                 "batch_in_epoch": batch_in_epoch, "world_size": world, "objective": objective.state_dict(),
                 "optimizer": optimizer.state_dict(), "rng": rngs, "config_yaml": OmegaConf.to_yaml(cfg),
                 "train_seconds": prior_seconds + train_time,
                 "budget_total_steps": total_steps if budget_fitted else None}
        buf = io.BytesIO()
        torch.save(state, buf)
        try:
            atomic_write_bytes(run_dir / "checkpoints" / "last.ckpt", buf.getvalue())
        except OSError as e:
            raise RunError(f"could not write checkpoint at step {step} to {run_dir / 'checkpoints'}: {e}. The "
                           "previous checkpoint is intact; free disk space or fix permissions, then resume.") from e

    bar = _progress(fabric, total_steps, step, global_batch, cfg.trainer.progress)

    def refit(reason: str) -> None:
        """Fit total_steps (and the schedules) to the time budget from the steady rate measured so far."""
        nonlocal total_steps, epochs, lr_sched, wd_sched, budget_fitted
        rate = steady_time / max(1, step - start_step - warm)  # seconds per step, steady state
        new = fit_steps_to_budget(step, prior_seconds + train_time, rate, budget_s, cap_steps)
        if world > 1:
            new = int(fabric.broadcast(new, src=0))  # every rank follows rank 0's clock
        first = not budget_fitted
        budget_fitted = True
        if new == total_steps:
            return
        total_steps = new
        epochs = math.ceil(total_steps / steps_per_epoch)
        lr_sched, wd_sched = schedules(total_steps)
        objective.setup_schedule(steps_per_epoch, total_steps)
        if bar is not None:
            bar.total = total_steps * global_batch
            bar.refresh()
        if first or cfg.trainer.progress:
            fabric.print(f"time budget {cfg.trainer.time_budget_minutes:g} min ({reason}): {rate:.3f} s/step -> "
                         f"{total_steps} steps ({total_steps / steps_per_epoch:.2f} epochs, at most {cap_steps})")
    last_loss = float("nan")
    images, train_time = 0, 0.0
    warm = WARMUP_STEPS_EXCLUDED  # steady-state throughput skips the first steps (worker start-up, allocator warm-up)
    steady_images, steady_time, data_wait = 0, 0.0, 0.0
    start_step = step
    first_step_s = 0.0
    knn_result = None
    every = cfg.trainer.checkpoint_every_steps
    stopped_early = False
    bad_steps = 0
    inner = getattr(dataset, "dataset", dataset)
    if hasattr(inner, "bad_log"):
        inner.bad_log = run_dir / "bad_files.txt"  # workers append the paths of unreadable files here
    while step < total_steps and epoch < epochs:
        sampler.set_epoch(epoch, start_batch)
        batch_in_epoch = start_batch
        t0 = time.perf_counter()
        for views, _labels in loader:
            t_data = time.perf_counter()
            for g in optimizer.param_groups:
                g["lr"] = float(lr_sched[step])
                g["weight_decay"] = float(wd_sched[step]) * g["wd_mult"]
            if batched is not None:  # uint8 batch -> views made on the device
                g = batch_generator(cfg.seed, epoch, batch_in_epoch, rank)
                views = batched(views.to(fabric.device, non_blocking=True), generator=g)
            else:
                views = [v.to(fabric.device, non_blocking=True) for v in views]
            if channels_last:
                views = [v.contiguous(memory_format=torch.channels_last) for v in views]
            out = model(views, step)
            loss = out["loss"]
            fabric.backward(loss)
            objective.on_after_backward(step)
            grad_norm = _clip_and_norm(fabric, cfg, model, optimizer, params)
            # The step's one host-device sync: loss and gradient norm read together, so the GPU is not left idle
            # between forward, backward and update. A non-finite loss makes the (all-reduced) gradients
            # non-finite on every rank, so all ranks agree to skip; the loss is named when it is the cause.
            loss_v, norm_v = torch.stack([loss.detach().float(), grad_norm.detach().float().to(loss.device)]).tolist()
            bad_loss, bad_norm = not math.isfinite(loss_v), not math.isfinite(norm_v)
            if _any_rank(fabric, bad_loss or bad_norm):
                what, value = ("loss", loss_v) if bad_loss else ("gradient norm", norm_v)
                bad_steps = _nonfinite(cfg, bad_steps, step, what, value, lr_sched[step], run_dir)
                optimizer.zero_grad(set_to_none=True)
            else:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                objective.on_step_end(step)
            step += 1
            batch_in_epoch += 1
            t1 = time.perf_counter()
            train_time += t1 - t0
            images += global_batch
            if step == start_step + 1:
                first_step_s = t1 - t0  # with trainer.compile this is mostly compilation
            if step > start_step + warm:
                steady_time += t1 - t0
                steady_images += global_batch
                data_wait += t_data - t0
            last_loss = loss_v
            if budget_s is not None and not budget_fitted and \
                    step - start_step - warm >= cfg.trainer.budget_calibration_steps:
                refit(f"{cfg.trainer.budget_calibration_steps} steps measured")
            if bar is not None:
                bar.update(global_batch)
                bar.set_postfix(loss=f"{last_loss:.4f}", epoch=epoch, refresh=False)
            if logs is not None and (step % cfg.trainer.log_every_steps == 0 or step == total_steps):
                row = {"epoch": epoch, "lr": float(lr_sched[step - 1]), "wd": float(wd_sched[step - 1]),
                       "images_per_s": images / max(train_time, 1e-9)}
                row.update({k: float(v.detach()) if torch.is_tensor(v) else float(v) for k, v in out.items()})
                logs.log(step, row)
            done_epoch = batch_in_epoch >= steps_per_epoch
            if step == stop_at_step or step == total_steps or (every and step % every == 0 and not done_epoch):
                save_checkpoint(batch_in_epoch if not done_epoch else 0, epoch if not done_epoch else epoch + 1)
                if logs is not None:
                    logs.flush()
            if step == stop_at_step:
                stopped_early = step < total_steps
                break
            if step >= total_steps:
                break
            t0 = time.perf_counter()
        if stopped_early:
            break
        epoch += 1
        start_batch = 0
        # Needs this process's own steady steps: a run resumed at an epoch end has measured none yet.
        if budget_s is not None and budget_fitted and step < total_steps and step > start_step + warm:
            refit(f"epoch {epoch} done")
        if step < total_steps and batch_in_epoch >= steps_per_epoch:
            save_checkpoint(0, epoch)
        if cfg.eval.knn_every and epoch % cfg.eval.knn_every == 0 and step < total_steps:
            m = _knn_eval(fabric, cfg, objective.eval_encoder(), monitor=True)
            if logs is not None and m is not None:
                logs.log(step, {"knn_top1": m["top1"], "knn_top5": m["top5"], "epoch": epoch,
                                "train_seconds": train_time})
                logs.flush()
                fabric.print(f"epoch {epoch}: online k-NN top-1 {m['top1']:.2f}%")
    if bar is not None:
        bar.close()

    ips = images / max(train_time, 1e-9)
    steady_ips = steady_images / steady_time if steady_time > 0 else ips
    if not stopped_early and fabric.is_global_zero:
        save_encoder(objective.eval_encoder(), run_dir / "encoder.safetensors")
    if not stopped_early and cfg.eval.final_knn:
        knn_result = _knn_eval(fabric, cfg, objective.eval_encoder(), monitor=False)
    if logs is not None:
        if knn_result is not None:
            logs.log(step, {"knn_top1": knn_result["top1"], "knn_top5": knn_result["top5"], "train_seconds": train_time})
        logs.close()
        summary = {"steps": step, "total_steps": total_steps, "images_per_s": ips, "steady_images_per_s": steady_ips,
                   "data_wait_share": data_wait / steady_time if steady_time > 0 else None, "train_seconds": train_time,
                   "final_loss": last_loss, "peak_rss_gb": peak_rss_gb(), "world_size": world,
                   "precision": _resolve_precision(cfg), "knn": knn_result, "finished": not stopped_early,
                   "first_step_seconds": first_step_s, "compiled": bool(cfg.trainer.compile), "attention": attention,
                   "epochs": step / steps_per_epoch, "time_budget_minutes": cfg.trainer.time_budget_minutes,
                   "knn_protocol": {"center": bool(cfg.eval.knn_center), "whiten": cfg.eval.get("knn_whiten")}}
        bad_log = run_dir / "bad_files.txt"
        if bad_log.is_file():
            bad = sorted(set(bad_log.read_text().splitlines()))
            summary["skipped_files"] = len(bad)
            fabric.print(f"skipped {len(bad)} unreadable file(s) (listed in {bad_log}); first: {bad[:3]}")
        atomic_write_bytes(run_dir / "summary.json", json.dumps(summary, indent=2).encode())
        fabric.print(f"{'stopped' if stopped_early else 'finished'} at step {step}: {steady_ips:.1f} images/s, "
                     f"loss {last_loss:.4f}, peak memory {peak_rss_gb():.2f} GB")
        if knn_result is not None:
            fabric.print(_knn_line(knn_result))
    return TrainResult(run_dir, step, ips, last_loss, peak_rss_gb(), knn_result)


def _any_rank(fabric, flag: bool) -> bool:
    """True on every rank when ``flag`` is true on any rank (so all ranks take the same branch)."""
    if fabric.world_size == 1:
        return flag
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0], device=fabric.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def _clip_and_norm(fabric, cfg: DictConfig, model, optimizer, params: list[torch.nn.Parameter]) -> torch.Tensor:
    """Clip as the recipe says and return the total gradient norm (before clipping)."""
    if cfg.optim.clip_grad and cfg.optim.clip_mode == "norm":
        return fabric.clip_gradients(model, optimizer, max_norm=cfg.optim.clip_grad, error_if_nonfinite=False)
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))) if grads else torch.zeros(())
    if cfg.optim.clip_grad:
        clip_per_param(params, cfg.optim.clip_grad)
    return norm


def _nonfinite(cfg: DictConfig, bad_steps: int, step: int, what: str, value: float, lr: float, run_dir: Path) -> int:
    """Count a non-finite step; raise once more than ``trainer.skip_nonfinite_steps`` were seen."""
    bad_steps += 1
    if bad_steps > cfg.trainer.skip_nonfinite_steps:
        raise NonFiniteLossError(_nonfinite_message(cfg, step, what, value, lr, run_dir, bad_steps))
    print(f"warning: {what} is {value} at step {step}; skipped the update ({bad_steps}/"
          f"{cfg.trainer.skip_nonfinite_steps} tolerated by trainer.skip_nonfinite_steps)", file=sys.stderr)
    return bad_steps


def _gather_objects(fabric, obj: Any) -> list[Any]:
    import torch.distributed as dist

    out: list[Any] = [None] * fabric.world_size
    dist.all_gather_object(out, obj)
    return out


def _progress(fabric, total_steps: int, step: int, global_batch: int, enabled: bool = True):
    """A bar over images with rate (img/s) and ETA, on rank 0; ``trainer.progress=false`` turns it off."""
    if not (fabric.is_global_zero and enabled):
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total_steps * global_batch, initial=step * global_batch, unit="img", unit_scale=True,
                dynamic_ncols=True, desc="pretrain", disable=None, file=sys.stderr)


def _nonfinite_message(cfg: DictConfig, step: int, what: str, value: float, lr: float, run_dir: Path,
                       bad_steps: int = 1) -> str:
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    where = f"the last good checkpoint is {ckpt}" if ckpt.is_file() else "no checkpoint was written yet"
    return (f"{what} is {value} at step {step} ({bad_steps} non-finite step(s), {cfg.trainer.skip_nonfinite_steps} "
            f"tolerated; lr {lr:.3g}, precision {_resolve_precision(cfg)}). Likely causes: a "
            f"learning rate too high for this batch (lower optim.lr or lengthen optim.warmup_epochs), or fp16 "
            f"overflow (use bf16-mixed or 32-true); {where}.")


def _knn_eval(fabric, cfg: DictConfig, encoder: torch.nn.Module, monitor: bool) -> dict[str, float] | None:
    """k-NN top-1/top-5 of ``encoder`` on the recipe's eval split (rank 0 computes, others wait)."""
    result = None
    if fabric.is_global_zero:
        from sslkit.data import subset_dataset
        from sslkit.eval.features import extract_features
        from sslkit.run import as_eval_encoder

        encoder = as_eval_encoder(cfg, encoder)  # eval.encoder_args (e.g. another pool_grid) on the same weights
        n_train, n_test = cfg.eval.knn_train_subset, cfg.eval.knn_test_subset
        if monitor:
            n_train = cfg.eval.monitor_train_subset or n_train
            n_test = cfg.eval.monitor_test_subset or n_test
        train_ds = subset_dataset(build_dataset(cfg, "train"), n_train, seed=cfg.seed)
        test_ds = subset_dataset(build_dataset(cfg, cfg.data.eval_split), n_test, seed=cfg.seed)
        size = eval_image_size(cfg)
        kw = {"image_size": size, "batch_size": cfg.eval.batch_size, "device": fabric.device, "progress": not monitor}
        ftr, ltr = extract_features(encoder, train_ds, desc="k-NN bank", **kw)
        fte, lte = extract_features(encoder, test_ds, desc="k-NN queries", **kw)
        result = knn_protocols(cfg, ftr, ltr, fte, lte, only_main=monitor)
        if not monitor:
            result.update(_pixel_knn(cfg, train_ds, test_ds))
            result.update({"k": cfg.eval.knn_k, "bank": len(train_ds), "queries": len(test_ds),
                           "whiten": cfg.eval.get("knn_whiten")})
    fabric.barrier()
    return result


def knn_protocols(cfg: DictConfig, ftr: torch.Tensor, ltr: torch.Tensor, fte: torch.Tensor, lte: torch.Tensor, *,
                  only_main: bool = False) -> dict[str, float]:
    """k-NN (``eval.knn_k``) under the recipe's protocol (``"top1"``, ``"top5"``) and, unless ``only_main``, the
    plainer ones too (:func:`sslkit.eval.knn.knn_protocols`: ``"top1_centred"``, ``"top1_uncentred"``)."""
    from sslkit.eval import knn as knn_mod

    ev = cfg.eval
    kw = {"k": ev.knn_k, "temperature": ev.knn_temperature, "center": ev.knn_center, "whiten": ev.get("knn_whiten")}
    run = knn_mod.knn_classify if only_main else knn_mod.knn_protocols
    return dict(run(ftr, ltr, fte, lte, **kw))


def _pixel_knn(cfg: DictConfig, train_ds, test_ds) -> dict[str, float]:
    """Raw-pixel k-NN on the same bank and queries: the baseline pretraining has to beat.

    Flattened pixels under the same protocols as the encoder's features (:func:`knn_protocols`): centred on the
    bank's mean image when ``eval.knn_center`` (86.1% on the full Fashion-MNIST bank at k=20, the published
    85-86%; 84.6% without), PCA-whitened when ``eval.knn_whiten``. Returns :func:`knn_protocols`' top-1 keys
    prefixed ``pixels_`` (``"pixels_top1"``, ...); ``{}`` for datasets that are not held in memory.
    """
    if not (hasattr(train_ds, "images") and hasattr(test_ds, "images")):
        return {}

    def flat(ds) -> torch.Tensor:
        gray = bool((ds.images[:, 0] == ds.images[:, 1]).all())
        return (ds.images[:, :1] if gray else ds.images).float().flatten(1)

    res = knn_protocols(cfg, flat(train_ds), train_ds.labels, flat(test_ds), test_ds.labels)
    return {f"pixels_{key}": float(v) for key, v in res.items() if key.startswith("top1")}


def _knn_line(r: dict[str, float]) -> str:
    line = f"k-NN (k={r.get('k')}, {r.get('bank')} bank, {r.get('queries')} queries): top-1 {r['top1']:.2f}%"
    if "pixels_top1" in r:
        verdict = "above" if r["top1"] > r["pixels_top1"] else "BELOW"
        line += f"  vs raw pixels {r['pixels_top1']:.2f}%  -> {verdict} the raw-pixel baseline"
    protocol = f"PCA-whitened to {r['whiten']} on the bank" if r.get("whiten") else "centred on the bank mean"
    others = [("centred only", "top1_centred"), ("uncentred, DINO's protocol", "top1_uncentred")]
    shown = [f"{label}: {r[key]:.2f}%" + (f", pixels {r['pixels_' + key]:.2f}%" if f"pixels_{key}" in r else "")
             for label, key in others if key in r]
    if shown:
        line += f"  (both {protocol}; " + "; ".join(shown) + ")"
    return line
