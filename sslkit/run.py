"""The run directory: what pretraining leaves behind and what evaluation reads.

Layout::

    runs/<name>[-N]/
        config.yaml            the resolved recipe
        checkpoints/last.ckpt  full training state (weights_only-loadable)
        metrics.csv            one row per logged step
        train.log              progress lines and the run's messages
        tb/                    TensorBoard events
        encoder.safetensors    the objective's eval encoder (DINO: the teacher)
        summary.json           images/s, peak memory, final metrics
        .sslkit.lock           locked (flock) by the process training into the run
    runs/<name>-latest -> the newest run of that recipe name

Eval never imports objectives or the engine: :func:`load_encoder` rebuilds the encoder from
``config.yaml`` and ``encoder.safetensors``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from sslkit.plugins import load_all
from sslkit.registry import ENCODERS, error_line


class RunError(RuntimeError):
    """A run directory or checkpoint that cannot be used; the message says why and what to do."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that a reader sees the old file or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600 files; give the usual mode
        os.replace(tmp, path)
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def open_no_follow(path: Path, mode: str = "a") -> Any:
    """Open ``path`` for appending ("a") or reading and appending ("a+"), creating it, but never through a symbolic
    link: a link planted in a run directory raises :class:`RunError` instead of redirecting sslkit's writes."""
    flags = os.O_CREAT | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0) | (os.O_RDWR if "+" in mode else os.O_WRONLY)
    try:
        fd = os.open(path, flags, 0o666)
    except OSError as e:
        if Path(path).is_symlink():
            raise RunError(f"refusing to write through the symbolic link {path}: sslkit never writes through a link "
                           "it did not create. Remove the link.") from None
        raise RunError(f"cannot write {path}: {e}") from None
    return os.fdopen(fd, mode, encoding="utf-8")


def save_figure_png(fig, path: Path, dpi: int, **kwargs: Any) -> Path:  # noqa: ANN001 - a matplotlib Figure
    """Render ``fig`` as PNG and write it atomically: a reader sees the old picture or the new one, and a link
    planted at ``path`` is replaced, never followed."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, **kwargs)
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)


def save_encoder(encoder: torch.nn.Module, path: Path) -> None:
    """Export encoder weights as safetensors (atomically)."""
    from safetensors.torch import save

    state = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    atomic_write_bytes(Path(path), save(state, metadata={"format": "pt", "producer": "sslkit"}))


def resolve_run_dir(path: str | os.PathLike) -> Path:
    """Accept a run directory, its ``-latest`` link, or a file inside it (checkpoint, safetensors)."""
    p = Path(path).expanduser()
    if p.is_file():
        p = p.parent.parent if p.parent.name == "checkpoints" else p.parent
    if not p.exists():
        raise RunError(f"run {path} does not exist. Train one first (e.g. `make pretrain-dino`) or pass a run "
                       "directory that holds config.yaml and encoder.safetensors.")
    p = p.resolve()
    if not (p / "config.yaml").is_file():
        raise RunError(f"{p} is not a run directory: it has no config.yaml.")
    refuse_linked_dirs(p)
    return p


RUN_SUBDIRS = ("checkpoints", "tb", "features", "eval", "pca", "attention")


def refuse_linked_dirs(run_dir: Path) -> None:
    """The folders sslkit writes into inside a run directory must be real folders: a symbolic link planted there
    would redirect checkpoints, logs, caches or results elsewhere."""
    for name in RUN_SUBDIRS:
        if (Path(run_dir) / name).is_symlink():
            raise RunError(f"{Path(run_dir) / name} is a symbolic link; sslkit writes into a run's own folders only. "
                           "Replace the link with a folder (or remove it).")


def refuse_interpolation(data: Any, where: str, key: str = "") -> None:
    """Raise if any string in ``data`` holds an OmegaConf interpolation (``${...}``).

    sslkit writes resolved recipes, so an interpolation in a run's ``config.yaml`` or checkpoint was put there by
    someone else; resolving it could read environment variables (``${oc.env:...}``) into results that are shared.
    """
    if isinstance(data, dict):
        for k, v in data.items():
            refuse_interpolation(v, where, f"{key}.{k}" if key else str(k))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            refuse_interpolation(v, where, f"{key}[{i}]")
    elif isinstance(data, str) and "${" in data:
        raise RunError(f"{where}: key '{key}' holds an interpolation ({data[:60]!r}). sslkit writes resolved configs "
                       "and never resolves one from a run directory, since it could copy environment variables into "
                       "results; replace it with its value.")


def read_config(path: Path | str, where: str | None = None) -> DictConfig:
    """A run's ``config.yaml`` (a path), or a checkpoint's copy of it (YAML text), as untrusted input: plain YAML,
    no interpolation."""
    import yaml

    text = path.read_text() if isinstance(path, Path) else str(path)
    label = where or str(path)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise RunError(f"{label} is not valid YAML ({str(e).splitlines()[0]}); restore it from the run's "
                       "checkpoint or re-run the recipe.") from None
    if not isinstance(data, dict):
        raise RunError(f"{label} does not hold a recipe (a mapping of sections); restore it or re-run the recipe.")
    refuse_interpolation(data, label)
    return OmegaConf.create(data)


def load_config(run_dir: str | os.PathLike) -> DictConfig:
    return read_config(resolve_run_dir(run_dir) / "config.yaml")


def eval_encoder_args(cfg: DictConfig) -> dict[str, Any]:
    """The recipe's ``eval.encoder_args`` (encoder arguments for evaluation only), ``{}`` when none."""
    ev = cfg.get("eval") or {}
    args = ev.get("encoder_args") if hasattr(ev, "get") else None
    return dict(OmegaConf.to_container(args, resolve=True)) if args else {}  # type: ignore[arg-type]


def encoder_kwargs(cfg: DictConfig, for_eval: bool = False) -> dict[str, Any]:
    """The recipe's encoder section as plain ``{"name": ..., **arguments}``; ``for_eval`` applies
    ``eval.encoder_args`` on top. Everything that defines the encoder besides its weights."""
    kw: dict[str, Any] = OmegaConf.to_container(cfg.encoder, resolve=True)  # type: ignore[assignment]
    if for_eval:
        kw.update(eval_encoder_args(cfg))
    return kw


def build_encoder(cfg: DictConfig, for_eval: bool = False) -> torch.nn.Module:
    """The recipe's encoder (random weights); ``for_eval`` applies ``eval.encoder_args`` on top."""
    load_all()
    kw = encoder_kwargs(cfg, for_eval)
    name = kw.pop("name")
    return ENCODERS.build(name, **kw)


def as_eval_encoder(cfg: DictConfig, encoder: torch.nn.Module) -> torch.nn.Module:
    """``encoder`` as evaluation sees it: itself when ``eval.encoder_args`` is empty, else a copy built with
    those arguments that holds the same weights (on the same device)."""
    if not eval_encoder_args(cfg):
        return encoder
    state = encoder.state_dict()
    device = next(iter(state.values())).device if state else torch.device("cpu")
    enc = make_room_for(build_encoder(cfg, for_eval=True), state).to(device)
    load_state_strict(enc, state, "the trained encoder (with eval.encoder_args)")
    return enc.train(encoder.training)


def make_room_for(encoder: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """``encoder`` with the parameter slots ``state`` holds beyond the recipe's build: the learned mask token of an
    encoder trained with iBOT (added by the objective, not by the encoder's arguments). Features never use it, but
    the weights file carries it and the load is strict."""
    if "mask_token" in state and getattr(encoder, "mask_token", 0) is None:
        encoder.enable_mask_token()
    return encoder


def load_state_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """``load_state_dict(strict=True)`` with an error that names the mismatched keys and shapes."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or shape:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} key(s), e.g. {missing[:5]}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)} key(s), e.g. {unexpected[:5]}")
        if shape:
            parts.append("shape mismatch for " + ", ".join(
                f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}" for k in shape[:5]))
        raise RunError(f"{what} does not fit this model: " + "; ".join(parts)
                       + ". Was it saved from a different encoder/objective or recipe?")
    module.load_state_dict(state, strict=True)


def load_encoder(run_dir: str | os.PathLike, map_location: str | torch.device = "cpu",
                 encoder_args: dict[str, Any] | None = None) -> tuple[torch.nn.Module, DictConfig]:
    """Rebuild a run's eval encoder from ``config.yaml`` + ``encoder.safetensors`` (in eval mode).

    ``encoder_args``: the evaluation's encoder arguments in place of the recipe's ``eval.encoder_args`` (checked by
    the caller, e.g. ``sslkit eval --encoder-arg``)."""
    from safetensors.torch import load_file

    d = resolve_run_dir(run_dir)
    cfg = read_config(d / "config.yaml")
    if encoder_args is not None:
        cfg.eval.encoder_args = dict(encoder_args)
    weights = d / "encoder.safetensors"
    if not weights.is_file():
        raise RunError(f"{d} has no encoder.safetensors: the run has not finished. Resume it with "
                       f"`sslkit pretrain {d / 'config.yaml'} --resume {d}`, or evaluate a finished run.")
    enc = build_encoder(cfg, for_eval=True)
    if weights.is_symlink():
        raise RunError(f"{weights} is a symbolic link; sslkit loads a run's weights only from the run's own file.")
    try:
        state = load_file(str(weights), device=str(map_location))
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError: a truncated or foreign file
        raise RunError(f"{weights} is not a readable safetensors file ({error_line(e)}); it may be truncated or "
                       f"replaced. Re-export it by resuming the run (`sslkit pretrain --resume {d}`) or retrain.") from None
    load_state_strict(make_room_for(enc, state), state, str(weights))
    return enc.eval(), cfg


def build_dataset(cfg: DictConfig, split: str):
    """The recipe's dataset for ``split`` ("train" or "test"), as (uint8 image, label) items."""
    from sslkit.registry import DATASETS

    load_all()
    args: dict[str, Any] = OmegaConf.to_container(cfg.data.args, resolve=True) if cfg.data.get("args") else {}  # type: ignore[assignment]
    return DATASETS.build(cfg.data.name, split=split, root=cfg.data.root, **args)


def eval_image_size(cfg: DictConfig) -> int:
    """Resolution for evaluation: ``eval.image_size``, else the augmentation's (global) ``image_size``."""
    size = cfg.eval.get("image_size") if cfg.get("eval") else None
    return int(size or cfg.augment.get("image_size") or 224)
