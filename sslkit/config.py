"""Recipe schema, loading, overrides and validation.

A recipe is a YAML file that states only what differs from the defaults below (dinov2-style). The
``augment`` and ``encoder`` sections are checked against the keyword arguments of the registered factory
named by their ``name`` key, and ``objective`` against that objective's config dataclass, so every key
in a recipe is checked, with its type, before any work starts.

Example::

    cfg = load_recipe("recipes/simclr_resnet_fmnist.yaml", ["optim.lr=0.3", "trainer.epochs=2"])
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sslkit.encoders import ATTENTION_MODES
from sslkit.plugins import load_all
from sslkit.registry import AUGMENTATIONS, ENCODERS, OBJECTIVES, RegistryError


class ConfigError(ValueError):
    """A recipe or override that cannot be used; the message names the key and the valid choices."""


@dataclass
class DataConfig:
    name: str = "fashion_mnist"  # a registered dataset (`sslkit list`)
    root: str | None = None  # dataset location; None = the dataset's default search path
    args: dict[str, Any] = field(default_factory=dict)  # further keyword arguments of the dataset factory
    subset: int | None = None  # train on a fixed random subset of this many images
    batch_size: int = 256  # per device; the global batch is batch_size * devices * num_nodes
    num_workers: int = 2  # DataLoader worker processes making the views
    eval_split: str = "test"  # split used by the k-NN monitor and the final evaluation
    # Where views are made. batched: uint8 batches go to the device and views are made there in a few batched
    # ops (needs same-size images, i.e. an in-memory dataset); per_image: torchvision in the loader workers.
    # auto: batched for in-memory datasets, per_image otherwise.
    augment_backend: str = "auto"


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | sgd | lars
    lr: float = 1e-3  # base learning rate, scaled by `lr_scaling`
    lr_scaling: str = "linear"  # linear: lr * global_batch / 256 (Goyal et al.); sqrt; none
    min_lr: float = 0.0  # end of the cosine
    warmup_epochs: float = 0.0  # linear warmup from 0, in epochs (fractions allowed)
    weight_decay: float = 0.05
    weight_decay_end: float | None = None  # cosine from weight_decay to this (DINO: 0.04 -> 0.4); None = constant
    momentum: float = 0.9  # sgd, lars
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adamw (MAE: 0.9, 0.95)
    clip_grad: float | None = None  # max gradient norm; None = no clipping
    clip_mode: str = "norm"  # norm: global norm; per_param: each parameter's norm (official DINO)
    foreach: bool | None = None  # multi-tensor optimiser kernels; None = torch's default


@dataclass
class HealthConfig:
    """Training health checks and the collapse alarm (sslkit.engine.health, whose notes define each measure)."""

    every_steps: int = 50  # RankMe (and DINO's teacher entropy and center norm) every N steps; 0 = off
    patience: int = 3  # consecutive checks past a line before the alarm
    on_collapse: str = "warn"  # warn: one warning; stop: also checkpoint and end the run
    min_rank_share: float = 0.01  # alarm when (RankMe - 1) / (min(batch, feature dim) - 1) < this
    min_entropy_share: float = 0.02  # alarm when the teacher's entropy < this share of log K (one-hot collapse)
    max_entropy_share: float = 0.995  # alarm when the teacher's entropy > this share of log K (uniform collapse)


@dataclass
class TrainerConfig:
    epochs: int = 10
    max_steps: int | None = None  # stop after this many optimiser steps (overrides epochs for the schedules)
    # Fit the run to this many minutes of pretraining: after `budget_calibration_steps` steady steps the engine
    # measures seconds per step and sets the total (and so every cosine schedule) to what fits, never more than
    # epochs / max_steps; it re-fits at each epoch end from the rate so far. None = train for epochs / max_steps.
    time_budget_minutes: float | None = None
    budget_calibration_steps: int = 20
    accelerator: str = "auto"  # auto | cpu | gpu
    devices: Any = 1  # int, or "auto"
    num_nodes: int = 1
    strategy: str = "auto"  # auto (DDP when several devices) | ddp | ddp_spawn | fsdp (ViT objectives: FSDP2)
    precision: str = "auto"  # auto: bf16-mixed on GPU and on CPUs with native bf16, else 32-true
    channels_last: bool = True  # NHWC memory layout for CNN encoders
    compile: bool = False  # torch.compile the objective
    # ViT attention kernel: fused (F.scaled_dot_product_attention) | math (softmax(q k^T) v, the same result) |
    # auto: math on a CPU under bf16 autocast, where the fused kernel measured 1.3-2.9x slower (MAE step: 1.8x
    # faster with math), fused elsewhere (encoders.fused_attention_wanted).
    attention: str = "auto"
    # BatchNorm statistics over the global batch under DDP (what one process on the whole batch computes); no
    # effect on one process. torch's SyncBatchNorm on GPUs, sslkit.heads.batchnorm.GlobalBatchNorm elsewhere.
    sync_batchnorm: bool = True
    checkpoint_every_steps: int = 500  # also at every epoch end; 0 = only at epoch ends
    log_every_steps: int = 10
    progress: bool = True  # progress in the terminal: a bar on a terminal, else a line every progress_every_seconds
    progress_every_seconds: float = 30.0  # interval of progress lines (stderr when not a terminal, and train.log)
    threads: int | None = None  # torch intra-op threads on CPU; None = torch's default
    skip_nonfinite_steps: int = 0  # tolerate this many NaN/Inf losses or gradients (update skipped), then stop
    health: HealthConfig = field(default_factory=HealthConfig)
    # After SLURM's warning signal (SIGUSR1, `--signal=USR1@90`) and its checkpoint, requeue the job with `scontrol
    # requeue $SLURM_JOB_ID` (rank 0); the requeued job continues with `--resume auto`. Off: stop after the checkpoint.
    requeue: bool = True


@dataclass
class EvalConfig:
    knn_every: int = 0  # online k-NN monitor every N epochs (0 = off)
    final_knn: bool = True  # k-NN of the eval encoder on data.eval_split after training
    knn_k: int = 20
    knn_temperature: float = 0.07
    knn_center: bool = True  # subtract the bank's mean feature before normalising, as raw pixels need (eval.knn)
    # PCA-whiten the features to this many dimensions, learned on the bank without labels, before the k-NN
    # (eval.knn module notes); pixels and encoders alike, and the plain centred figure is reported too. None = off.
    knn_whiten: int | None = None
    knn_train_subset: int | None = None  # bank size for the monitor (None = whole train split)
    knn_test_subset: int | None = None
    # The online monitor's bank and queries (None = knn_train_subset / knn_test_subset): a small monitor keeps
    # frequent checks cheap while the final k-NN uses the full splits.
    monitor_train_subset: int | None = None
    monitor_test_subset: int | None = None
    image_size: int | None = None  # evaluation resolution; None = augment.image_size
    batch_size: int = 512
    # Encoder arguments that differ for evaluation only and leave the weights as they are: e.g. resnet_cifar's
    # pool_grid (how the last map is pooled into the feature) or a ViT's pool (token | avg | grid). Training, the
    # heads and encoder.safetensors use the encoder section; every evaluation (the final and monitor k-NN,
    # `sslkit eval`, the random-encoder baseline) builds the encoder with these on top.
    encoder_args: dict[str, Any] = field(default_factory=dict)
    # Online linear probe (sslkit.engine.probe): a linear layer trained every step on the detached features of the
    # batch's labels, scored on eval_split when the k-NN monitor runs and at the end. Costs one extra forward pass
    # of the first view per step, so it is off in every shipped recipe.
    online_probe: bool = False
    online_probe_lr: float = 1e-2  # AdamW learning rate of the probe (its features are standardised first)


@dataclass
class RecipeConfig:
    name: str = "run"
    seed: int = 0
    output_dir: str = "runs"  # runs go to output_dir/name (a numbered suffix avoids overwriting)
    data: DataConfig = field(default_factory=DataConfig)
    augment: dict[str, Any] = field(default_factory=lambda: {"name": "simclr"})
    encoder: dict[str, Any] = field(default_factory=lambda: {"name": "resnet18_cifar"})
    objective: dict[str, Any] = field(default_factory=lambda: {"name": "simclr"})
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def _plain_type(tp: Any) -> Any:
    """Map a factory annotation to one OmegaConf accepts (tuples become lists)."""
    origin = typing.get_origin(tp)
    if origin in (tuple, list, typing.Sequence, Any) or tp in (tuple, list):
        args = typing.get_args(tp)
        inner = args[0] if args and args[0] is not Ellipsis else Any
        return list[_plain_type(inner)] if inner in (int, float, str, bool) else list[Any]
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return _plain_type(args[0]) | None
        return Any
    if tp in (int, float, str, bool):
        return tp
    return Any


def factory_schema(fn: Any, section: str) -> type:
    """A dataclass built from a factory's keyword arguments (name, type, default) plus ``name``."""
    hints = typing.get_type_hints(fn)
    fields = [("name", str, dataclasses.field(default=""))]
    for p in inspect.signature(fn).parameters.values():
        if p.kind not in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
            continue
        tp = _plain_type(hints.get(p.name, Any))
        if p.default is inspect.Parameter.empty:
            fields.append((p.name, tp, dataclasses.field(default=dataclasses.MISSING)))
        else:
            d = list(p.default) if isinstance(p.default, tuple) else p.default
            fields.append((p.name, tp, dataclasses.field(default_factory=lambda d=d: d)))
    return dataclasses.make_dataclass(f"{section}_schema", fields)


def _error(e: OmegaConfBaseException, where: str, schema: type | None = None) -> ConfigError:
    key = getattr(e, "full_key", None) or "?"
    msg = str(e).splitlines()[0]
    valid = ""
    if schema is not None:
        valid = f" Valid keys in {where}: {', '.join(f.name for f in dataclasses.fields(schema))}."
    return ConfigError(f"recipe key '{where + '.' if where and not key.startswith(where) else ''}{key}': {msg}.{valid}")


def _validate_section(cfg: DictConfig, section: str) -> None:
    sec = cfg[section]
    registry = {"augment": AUGMENTATIONS, "encoder": ENCODERS, "objective": OBJECTIVES}[section]
    name = sec.get("name")
    if not name:
        raise ConfigError(f"recipe section '{section}' needs a 'name'. Valid names: {', '.join(registry.names())}.")
    try:
        entry = registry.get(name)
    except RegistryError as e:
        raise ConfigError(f"recipe key '{section}.name': {e}") from None
    schema = entry.config or factory_schema(entry.factory, section)
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), sec)
        plain = OmegaConf.to_container(merged, throw_on_missing=True)
    except OmegaConfBaseException as e:
        raise _error(e, section, schema) from None
    plain["name"] = name
    cfg[section] = plain


def validate_eval_encoder_args(cfg: DictConfig) -> None:
    """``eval.encoder_args`` must be arguments of the recipe's encoder, with their types."""
    args = OmegaConf.to_container(cfg.eval.encoder_args, resolve=True) or {}
    if not args:
        return
    if "name" in args:
        raise ConfigError("recipe key 'eval.encoder_args.name': evaluation uses the trained encoder; "
                          "eval.encoder_args may change its arguments (e.g. pool_grid), not which encoder it is.")
    probe = OmegaConf.create({"encoder": {**OmegaConf.to_container(cfg.encoder, resolve=True), **args}})
    try:
        _validate_section(probe, "encoder")
    except ConfigError as e:
        raise ConfigError(str(e).replace("recipe key 'encoder.", "recipe key 'eval.encoder_args.")) from None


SECTIONS = {f.name: f for f in dataclasses.fields(RecipeConfig)}


def resolve(raw: dict[str, Any], overrides: list[str] | None = None) -> DictConfig:
    """Merge defaults <- ``raw`` <- ``overrides`` and validate every section."""
    load_all()
    base = OmegaConf.structured(RecipeConfig)
    for k in raw:
        if k not in SECTIONS:
            raise ConfigError(f"unknown recipe key '{k}'. Valid top-level keys: {', '.join(SECTIONS)}.")
    try:
        over = OmegaConf.from_dotlist(list(overrides or []))
    except Exception as e:  # noqa: BLE001 - omegaconf raises several kinds for a malformed override
        raise ConfigError(f"cannot parse overrides {overrides}: {e}. Write them as key.sub=value.") from None
    for k in over:
        if k not in SECTIONS:
            raise ConfigError(f"unknown override key '{k}'. Valid top-level keys: {', '.join(SECTIONS)}.")
    try:
        # A new `name` for a registry section replaces the whole section rather than mixing two factories' keys.
        for sec in ("augment", "encoder", "objective"):
            if sec in raw and "name" in raw[sec]:
                base[sec] = {}
            if sec in over and "name" in over[sec] and over[sec]["name"] != (raw.get(sec) or {}).get("name"):
                raw = {**raw, sec: {}}
                base[sec] = {}
        cfg = OmegaConf.merge(base, raw, over)
    except OmegaConfBaseException as e:
        section = str(getattr(e, "full_key", "") or "").split(".")[0]
        sch = SECTIONS[section].type if section in SECTIONS else None
        raise _error(e, "", sch if dataclasses.is_dataclass(sch) else None) from None
    for sec in ("augment", "encoder", "objective"):
        _validate_section(cfg, sec)
    validate_eval_encoder_args(cfg)
    _cross_checks(cfg)
    return cfg


def encoder_facts(cfg: DictConfig) -> Any:
    """The recipe's encoder built on the meta device (no memory, no initialisation cost), to ask it for the facts
    the checks need (``patch_size``, ``dim``); None when it cannot be built there (the engine's fail-fast build
    reports its errors)."""
    import torch

    try:
        with torch.device("meta"):
            return ENCODERS.build(cfg.encoder.name, **section_kwargs(cfg.encoder))
    except (ValueError, TypeError) as e:
        raise ConfigError(f"recipe section 'encoder' ({cfg.encoder.name}): {e}") from None
    except Exception:  # noqa: BLE001 - a model that cannot be built on the meta device is checked later
        return None


def _check_pipeline(cfg: DictConfig) -> None:
    """Build the augmentation (cheap) so bad values fail here, and ask the objective whether the views it makes
    are the views it needs, and the encoder whether their sizes fit its patches."""
    try:
        pipeline = AUGMENTATIONS.build(cfg.augment.name, **section_kwargs(cfg.augment))
    except (ValueError, TypeError) as e:
        raise ConfigError(f"recipe section 'augment' ({cfg.augment.name}): {e}") from None
    sizes = list(getattr(pipeline, "view_sizes", []))
    entry = OBJECTIVES.get(cfg.objective.name)
    needs = getattr(entry.factory, "required_views", None)
    if needs is not None:
        obj_cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(entry.config), cfg.objective)) \
            if entry.config else None
        views = needs(obj_cfg)
        if not hasattr(views, "problem"):
            raise ConfigError(f"objective '{cfg.objective.name}' declares its views as {views!r}; an objective's "
                              "`views` must be a sslkit.objectives.base.Views, e.g. Views(num_global=2).")
        problem = views.problem(sizes)
        if problem:
            raise ConfigError(f"objective '{cfg.objective.name}' {problem} (augment '{cfg.augment.name}'). Choose an "
                              f"augmentation that makes {views}, or change the augment section's view "
                              f"settings (e.g. num_views, num_local).")
    encoder = encoder_facts(cfg)
    patch = getattr(encoder, "patch_size", None)
    for size in sizes:
        if not 0 < size <= MAX_VIEW_SIZE:
            raise ConfigError(f"recipe section 'augment': view size {size} must be positive and at most "
                              f"{MAX_VIEW_SIZE} pixels.")
        if patch and size % patch:
            raise ConfigError(f"recipe section 'augment': view size {size} is not divisible by the encoder's patch "
                              f"size {patch} ({cfg.encoder.name}); use a multiple of {patch}.")


def _check_fsdp(cfg: DictConfig) -> None:
    """What ``trainer.strategy: fsdp`` does not run: monitors that evaluate the sharded encoder on rank 0 alone
    mid-run, and torch.compile around the sharded objective. (CNN encoders are refused in the engine's preflight.)"""
    refused = {"eval.knn_every": (cfg.eval.knn_every, "0 (the final k-NN still runs)"),
               "eval.online_probe": (cfg.eval.online_probe, "false"),
               "trainer.compile": (cfg.trainer.compile, "false")}
    for key, (value, fix) in refused.items():
        if value:
            raise ConfigError(f"recipe key '{key}': {value!r} is not supported with trainer.strategy=fsdp. Set {key}="
                              f"{fix}, or use trainer.strategy=ddp.")


# (lower bound, upper bound or None, lower bound allowed, null allowed): every number of the fixed sections.
# Upper bounds catch sizes no machine runs (a typo), so they fail here and not as an out-of-memory hours later.
RANGES: dict[str, tuple[float, float | None, bool, bool]] = {
    "data.batch_size": (0, 1_000_000, False, False), "data.num_workers": (0, 1024, True, False),
    "data.subset": (0, None, False, True),
    "optim.lr": (0, 1e3, False, False), "optim.min_lr": (0, 1e3, True, False),
    "optim.warmup_epochs": (0, 1e6, True, False), "optim.weight_decay": (0, 1e3, True, False),
    "optim.weight_decay_end": (0, 1e3, True, True), "optim.momentum": (0, 1, True, False),
    "optim.clip_grad": (0, None, False, True),
    "trainer.epochs": (0, 1e7, False, False), "trainer.max_steps": (0, None, False, True),
    "trainer.time_budget_minutes": (0, 1e7, False, True), "trainer.budget_calibration_steps": (1, 1e6, True, False),
    "trainer.num_nodes": (0, 100_000, False, False), "trainer.checkpoint_every_steps": (0, None, True, False),
    "trainer.log_every_steps": (1, None, True, False), "trainer.threads": (0, 4096, False, True),
    "trainer.skip_nonfinite_steps": (0, None, True, False), "trainer.progress_every_seconds": (0, 1e7, True, False),
    "eval.knn_every": (0, None, True, False), "eval.knn_k": (0, 1_000_000, False, False),
    "eval.knn_temperature": (0, 1e3, False, False), "eval.knn_whiten": (0, 1_000_000, False, True),
    "eval.knn_train_subset": (0, None, False, True), "eval.knn_test_subset": (0, None, False, True),
    "eval.monitor_train_subset": (0, None, False, True), "eval.monitor_test_subset": (0, None, False, True),
    "eval.image_size": (0, 8192, False, True), "eval.batch_size": (0, 65536, False, False),
    "eval.online_probe_lr": (0, 1e3, False, False), "trainer.health.every_steps": (0, None, True, False),
    "trainer.health.patience": (1, 1e9, True, False), "trainer.health.min_rank_share": (0, 1, True, False),
    "trainer.health.min_entropy_share": (0, 1, True, False), "trainer.health.max_entropy_share": (0, 1, True, False),
}
MAX_VIEW_SIZE = 8192


def check_run_name(name: object) -> None:
    """A run name is one path component: not empty, no separator, not ``.``/``..``, no leading dot or dash."""
    import os

    text = str(name) if name is not None else ""
    bad = (not text or "/" in text or (os.altsep and os.altsep in text) or text in (".", "..") or text[0] in ".-"
           or "\0" in text or len(text) > 200)
    if bad:
        raise ConfigError(f"recipe key 'name': {text!r} is not a run name; it must be one folder name (letters, digits, "
                          "'_', '-', '.'; no '/', no leading '.' or '-', at most 200 characters), e.g. name=my_run. "
                          "Use output_dir for where runs go.")


def _cross_checks(cfg: DictConfig) -> None:
    from sslkit.registry import DATASETS

    check_run_name(cfg.name)
    _check_finite(OmegaConf.to_container(cfg, resolve=True))
    _check_output_dir(cfg)

    if cfg.data.name not in DATASETS:
        raise ConfigError(f"recipe key 'data.name': unknown dataset {cfg.data.name!r}. "
                          f"Valid datasets: {', '.join(DATASETS.names())}.")
    for key, (lo, hi, inclusive, nullable) in RANGES.items():
        section, field_name = key.rsplit(".", 1)
        v = OmegaConf.select(cfg, section)[field_name]
        if v is None and nullable:
            continue
        ok = isinstance(v, int | float) and not isinstance(v, bool) and (v >= lo if inclusive else v > lo) and \
            (hi is None or v <= hi)
        if not ok:
            bound = ("positive" if lo == 0 and not inclusive else f"{'>=' if inclusive else '>'} {lo}") + (
                f" and at most {hi:g}" if hi is not None else "")
            raise ConfigError(f"recipe key '{key}' must be {bound}{' (or null)' if nullable else ''}, got {v}.")
    if not (isinstance(cfg.seed, int) and 0 <= cfg.seed < 2**32):
        raise ConfigError(f"recipe key 'seed' must be an integer in [0, 2**32), got {cfg.seed}.")
    devices = cfg.trainer.devices
    if not (devices == "auto" or (isinstance(devices, int) and not isinstance(devices, bool) and 0 < devices <= 4096)):
        raise ConfigError(f"recipe key 'trainer.devices' must be a positive number of devices or 'auto', got {devices}.")
    if any(not 0 <= b < 1 for b in cfg.optim.betas) or len(cfg.optim.betas) != 2:
        raise ConfigError(f"recipe key 'optim.betas' must be two numbers in [0, 1), got {list(cfg.optim.betas)}.")
    choices = {"optim.name": (cfg.optim.name, ("adamw", "sgd", "lars")),
               "optim.lr_scaling": (cfg.optim.lr_scaling, ("linear", "sqrt", "none")),
               "optim.clip_mode": (cfg.optim.clip_mode, ("norm", "per_param")),
               "trainer.precision": (cfg.trainer.precision, ("auto", "32-true", "bf16-mixed", "16-mixed", "bf16-true")),
               "trainer.accelerator": (cfg.trainer.accelerator, ("auto", "cpu", "gpu", "cuda")),
               "trainer.attention": (cfg.trainer.attention, ATTENTION_MODES),
               "trainer.health.on_collapse": (cfg.trainer.health.on_collapse, ("warn", "stop")),
               "data.eval_split": (cfg.data.eval_split, ("train", "test")),
               "data.augment_backend": (cfg.data.augment_backend, ("auto", "batched", "per_image")),
               # fsdp: FSDP2 for the ViT objectives (sslkit.engine.fsdp), with resharding distributed checkpoints
               "trainer.strategy": (cfg.trainer.strategy, ("auto", "ddp", "ddp_spawn", "ddp_find_unused_parameters_true",
                                                           "fsdp"))}
    for k, (v, valid) in choices.items():
        if v not in valid:
            raise ConfigError(f"recipe key '{k}': {v!r} is not one of {', '.join(valid)}.")
    if cfg.trainer.strategy == "fsdp":
        _check_fsdp(cfg)
    _check_pipeline(cfg)


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> DictConfig:
    """Read a YAML recipe and resolve it (see :func:`resolve`)."""
    p = Path(path)
    if not p.is_file():
        alt = Path("recipes") / p.name
        hint = f" Did you mean {alt}?" if alt.is_file() else ""
        raise ConfigError(f"recipe {p} not found.{hint} Recipes ship in the recipes/ folder.")
    text = p.read_text(errors="replace")
    if len(text) > MAX_RECIPE_BYTES:
        raise ConfigError(f"recipe {p} is {len(text)} bytes; a recipe states a few keys (at most {MAX_RECIPE_BYTES} "
                          "bytes). Is it the right file?")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {p} is not valid YAML: {str(e).splitlines()[0]}. Fix the line it names.") from None
    if raw is None:
        raise ConfigError(f"recipe {p} is empty: nothing would be trained as you meant. Start from a recipe in "
                          "recipes/ and state what differs from the defaults.")
    if not isinstance(raw, dict):
        raise ConfigError(f"recipe {p} must be a mapping of sections, got {type(raw).__name__}.")
    nodes = _count_nodes(raw)
    if nodes > MAX_RECIPE_NODES:
        raise ConfigError(f"recipe {p} expands to more than {MAX_RECIPE_NODES} values (YAML aliases repeat nodes); "
                          "write the recipe out plainly.")
    return resolve(raw, overrides)


MAX_RECIPE_BYTES = 1_000_000
MAX_RECIPE_NODES = 100_000


def _count_nodes(data: Any, limit: int = MAX_RECIPE_NODES) -> int:
    """Values in a loaded YAML tree, counting a node once per reference (aliases included); stops past ``limit``."""
    count, stack = 0, [data]
    while stack and count <= limit:
        node = stack.pop()
        count += 1
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return count


def _check_finite(data: Any, key: str = "") -> None:
    """Every number in the recipe is finite: NaN or infinity is never a setting."""
    import math

    if isinstance(data, dict):
        for k, v in data.items():
            _check_finite(v, f"{key}.{k}" if key else str(k))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            _check_finite(v, f"{key}[{i}]")
    elif isinstance(data, float) and not math.isfinite(data):
        raise ConfigError(f"recipe key '{key}': {data} is not a finite number; give a finite value.")


def _check_output_dir(cfg: DictConfig) -> None:
    """``output_dir`` (or its nearest existing parent) must be a writable folder."""
    import os

    path = Path(str(cfg.output_dir)).expanduser().absolute()
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"recipe key 'output_dir': {path} cannot be written ({probe} is not a writable folder). "
                          "Choose a writable output_dir=PATH.")


def section_kwargs(section: DictConfig) -> dict[str, Any]:
    """A registry section as factory keyword arguments (without ``name``)."""
    d = OmegaConf.to_container(section, resolve=True)
    d.pop("name", None)
    return d
