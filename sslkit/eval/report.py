"""Evaluations of a run directory, as library functions: features in, ``results.json`` + report row + PNGs out.

Each ``run_*`` function reads a run (``config.yaml`` + ``encoder.safetensors``, see :mod:`sslkit.run`), gets
features of the recipe's dataset through the cache in ``<run_dir>/features/``, evaluates, and writes

* ``<run_dir>/eval/<kind>[_<baseline>]/results.json``: metrics, settings, feature provenance (encoder hash,
  dataset, split sizes, image size) and the time taken;
* a row of ``<run_dir>/eval/report.md``, one Markdown table for every evaluation of the run;
* pictures: a t-SNE of the eval-split features (k-NN), a retrieval grid (retrieval, copy detection).

``baseline`` replaces the run's encoder with raw pixels (flattened, mean-subtracted, L2-normalised) or a
randomly initialised encoder of the run's architecture, so the report shows what pretraining added.

Example::

    res = run_knn("runs/simclr_resnet_fmnist-latest", k=[20], train_subset=10000)
    res["metrics"]["20"]["top1"], res["results_path"]
"""

from __future__ import annotations

import datetime as _dt
import fcntl
import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import Dataset

from sslkit.augment.base import IMAGENET_MEAN, IMAGENET_STD
from sslkit.data.base import TensorImageDataset, subset_dataset
from sslkit.eval import knn as knn_mod
from sslkit.eval import linear as linear_mod
from sslkit.eval import retrieval as retrieval_mod
from sslkit.eval import sources
from sslkit.eval.features import FeatureSet, cached_features, default_device, encoder_hash, use_bf16
from sslkit.eval.sources import NO_DATASET, DatasetSpec, FeatureSource, build_feature_encoder

BASELINES = ("none", "pixels", "random")
KINDS = ("knn", "linear", "retrieval", "copy")
DEFAULT_SEED = 0
REPORT_NAME = "report.md"
RESULTS_NAME = "results.json"
REPORT_HEADER = ("| date | eval | features | data (eval / train) | result | time | details |\n"
                 "|---|---|---|---|---|---|---|\n")
PIXEL_FEATURES_VERSION = 1
PIXEL_BASELINE_MAX_SIZE = 64  # pixel features of larger images are taken from a 64 px thumbnail (12k dims)


class EvalError(ValueError):
    """An evaluation that cannot run as asked; the message says why and what to change."""


# ----------------------------------------------------------------------------------------------------------
# Feature sources: the run's encoder, a random encoder, raw pixels
# ----------------------------------------------------------------------------------------------------------


class PixelEncoder(nn.Module):
    """Raw pixels as features: undo the eval normalisation and flatten. ``(B, 3, s, s) -> (B, channels * s * s)``.

    ``channels=1`` keeps one channel of grayscale data (the three are copies), which gives the same cosine
    similarities at a third of the memory.
    """

    is_vit = False

    def __init__(self, image_size: int, channels: int = 3) -> None:
        super().__init__()
        self.channels = channels
        self.dim = channels * image_size * image_size
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pixels = x * self.std + self.mean  # (B, 3, s, s) in [0, 1]
        return pixels[:, : self.channels].flatten(1)  # (B, channels * s * s)


def center_and_normalize(reference: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """Subtract ``reference``'s mean row from every set, then L2-normalise rows. ``(N, D)`` each."""
    return [torch.nn.functional.normalize(t, dim=1) for t in knn_mod.center_on(reference, *others)]


def _is_grayscale(ds: Dataset) -> bool:
    return isinstance(ds, TensorImageDataset) and ds._images.shape[1] == 1


@dataclass
class EvalContext:
    """Everything an evaluation needs from a run, loaded once."""

    run_dir: Path
    cfg: DictConfig
    baseline: str
    image_size: int
    device: torch.device
    batch_size: int
    cache_dir: Path | None
    progress: bool
    seed: int
    train_subset: int | None
    test_subset: int | None
    bf16: bool | None = None
    encoder: nn.Module | None = None
    enc_hash: str = ""
    source: str = ""
    _datasets: dict[str, Dataset] = field(default_factory=dict)
    # what is evaluated and on what (sslkit.eval.sources); None only for contexts built by hand
    feature_source: FeatureSource | None = None
    data: DatasetSpec | None = None

    @property
    def eval_split(self) -> str:
        if self.data is not None:
            return self.data.eval_split
        return str(self.cfg.data.get("eval_split", "test") or "test")

    @property
    def feature_image_size(self) -> int:
        """Extraction resolution: the eval size, capped for the raw-pixel baseline."""
        if self.baseline == "pixels":
            return min(self.image_size, PIXEL_BASELINE_MAX_SIZE)
        return self.image_size

    def dataset(self, split: str) -> Dataset:
        """The dataset for ``split`` ("train", the bank, or the eval split), subset as asked."""
        from sslkit.run import build_dataset

        if split not in self._datasets:
            ds = self.data.build(split) if self.data is not None else build_dataset(self.cfg, split)
            n = self.train_subset if split == "train" else self.test_subset
            self._datasets[split] = subset_dataset(ds, n, seed=self.seed)
        return self._datasets[split]

    def features(self, split: str) -> FeatureSet:
        """Features of ``split`` from the cache (or extracted and cached)."""
        ds = self.dataset(split)
        return self.features_of(ds, self.data.cache_split(split) if self.data is not None else split)

    def features_of(self, ds: Dataset, split: str) -> FeatureSet:
        self._ensure_encoder(ds)
        return cached_features(self.encoder, ds, image_size=self.feature_image_size, cache_dir=self.cache_dir, split=split,
                               batch_size=self.batch_size, progress=self.progress, enc_hash=self.enc_hash,
                               bf16=self.bf16,
                               desc=f"{self.baseline if self.baseline != 'none' else 'encoder'} {split} features")

    def _ensure_encoder(self, ds: Dataset) -> None:
        if self.encoder is not None:
            return
        from sslkit.run import build_encoder, encoder_kwargs, eval_encoder_args, load_encoder

        if self.feature_source is not None:
            self.encoder, self.enc_hash, self.source = build_feature_encoder(
                self.feature_source, self.baseline, cfg=self.cfg, dataset=ds, image_size=self.feature_image_size,
                seed=self.seed)
        elif self.baseline == "none":
            self.encoder, _ = load_encoder(self.run_dir, encoder_args=eval_encoder_args(self.cfg))
            self.enc_hash = _keyed_hash(self.encoder, encoder_kwargs(self.cfg, for_eval=True))
            self.source = f"{self.cfg.encoder.name} (pretrained, {self.run_dir.name})"
        elif self.baseline == "random":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                self.encoder = build_encoder(self.cfg, for_eval=True).eval()
            self.enc_hash = _keyed_hash(self.encoder, encoder_kwargs(self.cfg, for_eval=True))
            self.source = f"{self.cfg.encoder.name} (random init, seed {self.seed})"
        else:
            channels, size = (1 if _is_grayscale(ds) else 3), self.feature_image_size
            self.encoder = PixelEncoder(size, channels)
            self.enc_hash = f"pixels-v{PIXEL_FEATURES_VERSION}-c{channels}"
            self.source = f"raw pixels ({channels}x{size}x{size}, mean-subtracted, L2-normalised)"
        self.encoder.to(self.device)

    def provenance(self, sets: dict[str, FeatureSet]) -> dict[str, Any]:
        return {"source": self.source, "baseline": self.baseline, "encoder": str(self.cfg.encoder.name),
                "encoder_hash": self.enc_hash,
                "dataset": self.data.label if self.data is not None else str(self.cfg.data.name),
                **({"dataset_spec": self.data.describe()} if self.data is not None else {}),
                "image_size": self.feature_image_size,
                "splits": {name: {"size": int(len(fs.labels)), **fs.provenance()} for name, fs in sets.items()}}


def _keyed_hash(encoder: nn.Module, arguments: dict[str, Any]) -> str:
    """The weights' hash combined with the encoder's arguments (``run.encoder_kwargs``): some change the features
    without changing a weight (``pool_grid``, a ViT's ``pool``), so they belong in the feature-cache key too."""
    blob = encoder_hash(encoder) + json.dumps(arguments, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def load_context(run_dir: str | Path, *, baseline: str = "none", device: str | torch.device | None = None,
                 batch_size: int | None = None, train_subset: int | None = None, test_subset: int | None = None,
                 use_cache: bool = True, cache_dir: str | Path | None = None, progress: bool = True,
                 seed: int = DEFAULT_SEED, bf16: bool | None = None, dataset: str | Path | None = None,
                 dataset_args: Any = None, weights: str | Path | None = None, train_split: str | None = None,
                 eval_split: str | None = None, image_size: int | None = None,
                 out_dir: str | Path | None = None, encoder_args: Any = None) -> EvalContext:
    """Resolve the source, the dataset and the evaluation settings (the encoder is loaded on first use).

    Args:
        run_dir: the feature source (:mod:`sslkit.eval.sources`): a run directory (its ``-latest`` link, or a
            file inside it), ``"timm:<name>"`` (with ``weights``), ``"pixels"`` or ``"random:<encoder>"``.
        baseline: "none" (the source's encoder), "pixels" or "random" (its architecture, random weights).
        dataset, dataset_args: the dataset to evaluate on, a registered name with its arguments (a dict or
            ``key=value`` strings) or an image-folder path; default the run's own.
        weights: the local weights file (or export folder) of a ``timm:`` source.
        train_split, eval_split: the bank / gallery split and the query split.
        image_size: evaluation resolution (default: the run's, the timm model's, or the dataset's).
        out_dir: where ``eval/`` goes (default: the run, ``RUN/transfer/<dataset>/``, or ``evals/...``).
        encoder_args: a run only: encoder arguments on top of its ``eval.encoder_args`` (``key=value`` strings or
            a dict), e.g. ``pool=token``; results then go to ``RUN/transfer/<dataset>-<args>-<hash>/``.
        device: where features are extracted (default: CUDA when available).
        batch_size: extraction batch (default: the recipe's ``eval.batch_size``).
        train_subset, test_subset: fixed random subsets of the train and eval splits.
        use_cache, cache_dir: feature cache (default ``<run_dir>/features/``).
        seed: subsets, random-encoder weights, copies, plots.
        bf16: bf16 autocast for extraction (default: on CUDA only).
    """
    if baseline not in BASELINES:
        raise EvalError(f"baseline must be one of {', '.join(BASELINES)}, got {baseline!r}")
    for name, n in (("train_subset", train_subset), ("test_subset", test_subset)):
        if n is not None and n <= 0:
            raise EvalError(f"{name} must be positive, got {n}")
    res = sources.resolve(run_dir, dataset=dataset, dataset_args=dataset_args, weights=weights,
                         train_split=train_split, eval_split=eval_split, image_size=image_size, out_dir=out_dir,
                         encoder_args=encoder_args)
    if res.source.kind == "pixels":  # the raw-pixel source is the pixel baseline on the chosen dataset
        if baseline == "random":
            raise EvalError("pixels has no architecture to initialise randomly; use random:<encoder> as the source.")
        baseline = "pixels"
    cfg = res.cfg
    bs = int(batch_size or cfg.get("eval", {}).get("batch_size") or 512)
    cache = (Path(cache_dir) if cache_dir is not None else res.cache_dir) if use_cache else None
    ctx = EvalContext(res.out_dir, cfg, baseline, res.image_size or 0, default_device(device), bs, cache, progress,
                      seed, train_subset, test_subset, bf16, feature_source=res.source, data=res.data)
    if not ctx.image_size:  # pixels / random: on the dataset's own image size
        if res.data.missing:
            raise EvalError(f"{NO_DATASET} Evaluations on folders of their own need --image-size instead.")
        ctx.image_size = sources.dataset_image_size(ctx.dataset("train"))
    return ctx


def _postprocess(ctx: EvalContext, reference: FeatureSet, *others: FeatureSet) -> list[torch.Tensor]:
    """Feature tensors ready for evaluation: pixels are centred on ``reference`` and L2-normalised."""
    if ctx.baseline == "pixels":
        return center_and_normalize(reference.features, *(o.features for o in others))
    return [reference.features, *(o.features for o in others)]


# ----------------------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------------------


def eval_dir(run_dir: Path, kind: str, baseline: str) -> Path:
    """``<run_dir>/eval/<kind>`` for the run's encoder, ``<run_dir>/eval/<kind>_<baseline>`` for baselines."""
    return Path(run_dir) / "eval" / (kind if baseline == "none" else f"{kind}_{baseline}")


def _jsonable(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, torch.Tensor | np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def write_results(path: Path, payload: dict) -> Path:
    """Write ``payload`` as pretty JSON, atomically."""
    from sslkit.run import atomic_write_bytes

    atomic_write_bytes(path, (json.dumps(payload, indent=2, default=_jsonable) + "\n").encode())
    return path


def append_report_row(report: Path, cells: Sequence[str]) -> None:
    """Append one row to the Markdown report (creating it with a header), under an exclusive file lock."""
    report.parent.mkdir(parents=True, exist_ok=True)
    row = "| " + " | ".join(c.replace("|", "/").replace("\n", " ") for c in cells) + " |\n"
    from sslkit.run import open_no_follow

    with open_no_follow(report, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            f.seek(0)
            if not f.read(1):
                f.write(f"# Evaluation report\n\n{REPORT_HEADER}")
            f.write(row)
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _knn_summary(metrics: dict, settings: dict) -> str:
    """k-NN: the headline top-1 / top-5 per ``k``, then the other protocols' top-1, each labelled."""
    centred = settings.get("center", True)
    whiten = settings.get("whitened_also")
    others = [("top1_uncentred", "uncentred")] if centred else []
    others.append(("top1_whitened", f"PCA-whitened ({whiten} dims)" if whiten else "PCA-whitened"))
    parts = []
    for k, m in metrics.items():
        extra = ", ".join(f"{label} {m[key]:.2f}" for key, label in others if key in m)
        parts.append(f"k={k}: {m['top1']:.2f} / {m['top5']:.2f}" + (f" ({extra})" if extra else ""))
    headline = "centred on the bank mean" if centred else "uncentred, DINO's protocol"
    return "; ".join(parts) + f" (top-1 / top-5 {headline}; in brackets: top-1 under other protocols)"


def summarize(kind: str, metrics: dict, settings: dict | None = None) -> str:
    """A one-line summary of an evaluation's main numbers (for tables); ``settings`` labels k-NN's protocols."""
    if kind == "knn":
        return _knn_summary(metrics, settings or {})
    if kind == "linear":
        best = metrics.get("best", {})
        pick = f" (lr {best['lr']:g}, wd {best['weight_decay']:g})" if best else ""
        return f"top-1 {metrics['top1']:.2f}, top-5 {metrics['top5']:.2f}{pick}"
    if kind == "retrieval":
        parts = [f"mAP@R {metrics['map@r']:.2f}", f"R@1 {metrics['recall@1']:.2f}"]
        parts += [f"{k} {metrics[k]:.2f}" for k in ("precision@10", "exact_recall@10") if k in metrics]
        if "speedup" in metrics:
            parts.append(f"speed-up {metrics['speedup']:.1f}x")
        return ", ".join(parts) + f" [{metrics['index']}]"
    if kind == "retrieval_sets":
        return f"mAP {metrics['map']:.2f}, mAP@R {metrics['map@r']:.2f}, R@1 {metrics['recall@1']:.2f} [{metrics['index']}]"
    if kind in ("copy", "copy_folder"):
        return f"mAP {metrics['map']:.2f}, R@1 {metrics['recall@1']:.2f} [{metrics['index']}]"
    return json.dumps(metrics, default=_jsonable)[:200]


def _finish(ctx: EvalContext, kind: str, metrics: dict, settings: dict, sets: dict[str, FeatureSet],
            t_start: float, t_eval: float, plots: list[Path]) -> dict:
    """Write results.json and the report row; return the payload (with ``results_path``)."""
    out = eval_dir(ctx.run_dir, kind, ctx.baseline)
    feat_s = sum(fs.seconds for fs in sets.values() if not fs.from_cache)
    total = time.perf_counter() - t_start
    payload = {
        "kind": kind, "baseline": ctx.baseline, "run_dir": str(ctx.run_dir), "recipe": str(ctx.cfg.get("name", "")),
        "created": _dt.datetime.now().isoformat(timespec="seconds"),
        "metrics": metrics, "settings": {**settings, "device": str(ctx.device), "batch_size": ctx.batch_size,
                                         "bf16": use_bf16(ctx.device, ctx.bf16),
                                         "train_subset": ctx.train_subset, "test_subset": ctx.test_subset,
                                         "seed": ctx.seed},
        "features": ctx.provenance(sets),
        "seconds": {"features": round(feat_s, 3), "eval": round(t_eval, 3), "total": round(total, 3)},
        "plots": [str(p.relative_to(ctx.run_dir)) if p.is_relative_to(ctx.run_dir) else str(p) for p in plots],
    }
    path = write_results(out / RESULTS_NAME, payload)
    sizes = " / ".join(f"{name} {len(fs.labels)}" for name, fs in sets.items())
    cells = [payload["created"].replace("T", " "), kind, ctx.baseline if ctx.baseline != "none" else "encoder",
             f"{settings.get('data_label') or ctx.cfg.data.name} {sizes}", summarize(kind, metrics, settings),
             f"{total:.1f} s",
             f"[results]({path.relative_to(ctx.run_dir / 'eval')})"]
    append_report_row(ctx.run_dir / "eval" / REPORT_NAME, cells)
    return {**payload, "results_path": str(path)}


def _whiten_dim(whiten: int | None) -> int | None:
    """A whitening dimension (``whiten`` / ``--whiten``) checked: ``None`` or 0 -> None (off), ``d > 0`` -> d."""
    if whiten is not None and int(whiten) < 0:
        raise EvalError(f"whiten (--whiten) needs a dimension > 0, or 0 / None for off; got {whiten}")
    return int(whiten) if whiten else None


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------------------
# Evaluations
# ----------------------------------------------------------------------------------------------------------


def _num_classes(ctx: EvalContext, *label_sets: torch.Tensor) -> int:
    classes = getattr(ctx.dataset("train"), "classes", None)
    seen = int(max(int(t.max()) for t in label_sets if len(t))) + 1
    return max(len(classes or []), seen)


def run_knn(run_dir: str | Path, *, k: int | Sequence[int] = knn_mod.DEFAULT_KS,
            temperature: float = knn_mod.DEFAULT_TEMPERATURE, center: bool = True,
            whiten: int | str | None = "recipe", plots: bool = True, max_plot_points: int = 2000,
            bank_dtype: str | None = None, bank_on_disk: bool | None = None, chunk_size: int | None = None,
            **opts: Any) -> dict:
    """Weighted k-NN (DINO) of the eval split against the train split; see :func:`load_context` for ``opts``.

    The main figures, ``top1`` / ``top5`` of each ``k``, are the standard protocol
    (:func:`sslkit.eval.knn.headline_protocols`, as the training run's final k-NN): DINO's weighted vote on
    features centred on the bank's mean, then L2-normalised, for every feature source alike (raw pixels need the
    centring). ``top1_centred`` / ``top5_centred`` repeat them under an explicit name, and ``top1_uncentred`` /
    ``top5_uncentred`` (DINO's exact protocol) stand beside them. ``center=False`` makes the uncentred figures
    the main ones (and gives no ``*_centred`` / ``*_uncentred`` keys).

    ``whiten=d`` adds ``top1_whitened`` / ``top5_whitened``: features PCA-whitened to ``d`` dimensions learned on
    the bank (no labels). That is a different protocol, given beside the main figures and never in place of
    them. ``"recipe"`` (the default) takes the run's ``eval.knn_whiten``; ``None`` or 0 adds none.

    ``bank_dtype`` / ``bank_on_disk`` / ``chunk_size`` choose the bounded-memory search (float16 or on-disk bank,
    rows per chunk; :func:`sslkit.eval.knn.plan_bank`); None = automatic by bank size. The figures do not change.

    Returns the results payload; ``metrics`` maps each ``k`` (as a string) to ``{"top1", "top5", ...}`` (%), and
    ``settings["whitened_also"]`` is the whitening dimension of the ``*_whitened`` figures (None without).
    """
    t0 = time.perf_counter()
    if whiten != "recipe":
        whiten = _whiten_dim(whiten)
    ctx = load_context(run_dir, **opts)
    ks = [int(k)] if isinstance(k, int) else [int(v) for v in k]
    if whiten == "recipe":
        whiten = _whiten_dim(ctx.cfg.eval.get("knn_whiten"))
    train, test = ctx.features("train"), ctx.features(ctx.eval_split)
    num_classes = _num_classes(ctx, train.labels, test.labels)
    bank = {"bank_dtype": bank_dtype, "bank_on_disk": bank_on_disk, "bank_chunk_size": chunk_size,
            "progress": ctx.progress}
    plan = knn_mod.plan_bank(len(train.labels), int(train.features.shape[1]), bank_dtype=bank_dtype,
                             on_disk=bank_on_disk, chunk_size=chunk_size)

    def figures() -> dict[str, dict[str, float]]:
        # Raw features in: headline_protocols centres / whitens and normalises, pixels included. One k per call.
        out = {}
        for kk in ks:
            res = knn_mod.headline_protocols(train.features, train.labels, test.features, test.labels, k=kk,
                                             temperature=temperature, num_classes=num_classes, center=center,
                                             whiten=whiten, **bank)
            row = {"top1": res["top1"], "top5": res["top5"]}
            if center:
                row.update(top1_centred=res["top1"], top5_centred=res["top5"])
            row.update({key: v for key, v in res.items() if key not in row})  # *_uncentred, then *_whitened
            out[str(kk)] = row
        return out

    metrics, t_eval = _timed(figures)
    pics: list[Path] = []
    if plots:
        from sslkit.eval.plots import embedding_plot

        out = eval_dir(ctx.run_dir, "knn", ctx.baseline)
        # The picture follows the main figures' protocol: centred on the bank mean when they are.
        te_f = knn_mod.center_on(train.features, test.features)[1] if center else test.features
        pics.append(embedding_plot(te_f, test.labels, out / "embedding_tsne.png",
                                   class_names=getattr(ctx.dataset(ctx.eval_split), "classes", None),
                                   max_points=max_plot_points, seed=ctx.seed,
                                   title=f"t-SNE of {ctx.eval_split} features: {ctx.source}"))
    settings = {"k": ks, "temperature": temperature, "metric": "cosine", "center": center,
                "headline": "centred on the bank mean" if center else "uncentred (DINO's protocol)",
                "whitened_also": whiten, "index": "Flat (exact)", "faiss_gpu": knn_mod.faiss_gpu_available(),
                "bank": "FAISS, float32 in memory" if plan is None else
                f"chunked ({plan.chunk_rows} rows), {plan.dtype}{' on disk' if plan.on_disk else ' in memory'}"}
    return _finish(ctx, "knn", metrics, settings, {"train": train, ctx.eval_split: test}, t0, t_eval, pics)


def run_linear(run_dir: str | Path, *, lrs: Sequence[float] = linear_mod.DEFAULT_LRS,
               weight_decays: Sequence[float] = linear_mod.DEFAULT_WEIGHT_DECAYS,
               epochs: int | None = None, linear_batch_size: int | None = linear_mod.DEFAULT_BATCH_SIZE,
               val_fraction: float = linear_mod.DEFAULT_VAL_FRACTION, batchnorm: bool = True,
               paper: bool = False, lr: float = linear_mod.PAPER_LR, label_fraction: float | None = None,
               **opts: Any) -> dict:
    """Linear probe: by default on cached features with an lr x weight-decay sweep chosen on a validation split
    of train; with ``paper=True`` trained on augmented images through the frozen encoder (slow on CPU).

    ``batchnorm`` (default on) puts ``BatchNorm1d(affine=False)`` before the classifier (MAE recipe).
    ``label_fraction`` trains on a fixed class-balanced share of the train labels (:func:`linear.balanced_subset`).
    """
    t0 = time.perf_counter()
    ctx = load_context(run_dir, **opts)
    if label_fraction is not None and not 0 < label_fraction <= 1:
        raise EvalError(f"--label-fraction must be in (0, 1], e.g. 0.01 or 0.1; got {label_fraction}")
    if paper and label_fraction is not None:
        raise EvalError("--label-fraction applies to the linear probe on features; drop --paper to use it")
    if paper:
        return _run_linear_paper(ctx, t0, epochs=epochs or linear_mod.PAPER_EPOCHS, lr=lr, batchnorm=batchnorm)
    train, test = ctx.features("train"), ctx.features(ctx.eval_split)
    tr_f, te_f = _postprocess(ctx, train, test)
    n_epochs = epochs or linear_mod.DEFAULT_EPOCHS
    res, t_eval = _timed(lambda: linear_mod.linear_probe(
        tr_f, train.labels, te_f, test.labels, lrs=lrs, weight_decays=weight_decays, epochs=n_epochs,
        batch_size=linear_batch_size, val_fraction=val_fraction, batchnorm=batchnorm,
        num_classes=_num_classes(ctx, train.labels, test.labels), seed=ctx.seed, device=ctx.device,
        label_fraction=label_fraction))
    settings = {"path": "features", "lrs": list(lrs), "weight_decays": list(weight_decays), **res.pop("settings")}
    res.pop("seconds", None)
    return _finish(ctx, "linear", res, settings, {"train": train, ctx.eval_split: test}, t0, t_eval, [])


def _run_linear_paper(ctx: EvalContext, t0: float, *, epochs: int, lr: float, batchnorm: bool) -> dict:
    train_ds, test_ds = ctx.dataset("train"), ctx.dataset(ctx.eval_split)
    ctx._ensure_encoder(train_ds)
    res, t_eval = _timed(lambda: linear_mod.linear_probe_images(
        ctx.encoder, train_ds, test_ds, image_size=ctx.image_size, epochs=epochs, lr=lr, batchnorm=batchnorm,
        batch_size=min(ctx.batch_size, linear_mod.PAPER_BATCH_SIZE), device=ctx.device, seed=ctx.seed,
        progress=ctx.progress))
    settings = {"path": "augmented images", **res.pop("settings")}
    res.pop("seconds", None)
    return _finish(ctx, "linear", res, settings, {}, t0, t_eval, [])


def _grid_images(ds: Dataset, idx: Sequence[int]) -> torch.Tensor:
    """uint8 ``(len(idx), 3, h, w)`` thumbnails (resized to the first image's size when they differ)."""
    imgs = [ds[int(i)][0] for i in idx]
    h, w = imgs[0].shape[-2:]
    out = [im if im.shape[-2:] == (h, w) else torch.nn.functional.interpolate(
        im[None].float(), size=(h, w), mode="bilinear", antialias=True)[0].round().clamp(0, 255).byte() for im in imgs]
    return torch.stack(out)


def _pick(n: int, m: int, seed: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: min(n, m)]


def run_retrieval(run_dir: str | Path, *, index: str = retrieval_mod.DEFAULT_INDEX,
                  ks: Sequence[int] = retrieval_mod.DEFAULT_KS, nprobe: int | None = None,
                  ef_search: int = retrieval_mod.DEFAULT_EF_SEARCH, plots: bool = True, **opts: Any) -> dict:
    """Label-based retrieval (queries: eval split, gallery: train split) with a FAISS index.

    ``metrics``: mAP@R, R-precision, recall@k, precision@k (%), timings, and for approximate indexes the
    recall of exact neighbours and the speed-up over Flat.
    """
    from sslkit.eval.plots import GRID_NEIGHBOURS, GRID_QUERIES

    t0 = time.perf_counter()
    ctx = load_context(run_dir, **opts)
    gallery, queries = ctx.features("train"), ctx.features(ctx.eval_split)
    g_f, q_f = _postprocess(ctx, gallery, queries)
    res, t_eval = _timed(lambda: retrieval_mod.retrieval_metrics(
        q_f, queries.labels, g_f, gallery.labels, index=index, ks=ks, nprobe=nprobe, ef_search=ef_search,
        return_ids=GRID_NEIGHBOURS if plots else 0))
    ids = res.pop("ids", None)
    pics: list[Path] = []
    if plots and ids is not None and len(queries.labels):
        pics.append(_retrieval_picture(ctx, ids, queries.labels, gallery.labels, GRID_QUERIES))
    settings = {"index": index, "ks": list(ks), "nprobe": nprobe, "ef_search": ef_search,
                "query_split": ctx.eval_split, "gallery_split": "train", "metric": "cosine (inner product, L2-normalised)",
                "faiss_gpu": knn_mod.faiss_gpu_available()}
    return _finish(ctx, "retrieval", res, settings, {"train": gallery, ctx.eval_split: queries}, t0, t_eval, pics)


def _retrieval_picture(ctx: EvalContext, ids: np.ndarray, q_labels: torch.Tensor, g_labels: torch.Tensor,
                       n_queries: int) -> Path:
    from sslkit.eval.plots import retrieval_grid

    q_ds, g_ds = ctx.dataset(ctx.eval_split), ctx.dataset("train")
    classes = list(getattr(g_ds, "classes", []) or [])
    name = (lambda c: classes[c] if 0 <= c < len(classes) else str(c))  # noqa: E731
    pick = _pick(len(q_labels), n_queries, ctx.seed)
    nb = ids[pick.numpy()]  # (q, K)
    nb_labels = g_labels[torch.from_numpy(np.clip(nb, 0, None))]  # (q, K)
    correct = (nb_labels == q_labels[pick][:, None]) & torch.from_numpy(nb >= 0)
    q_imgs = _grid_images(q_ds, pick.tolist())
    n_imgs = torch.stack([_grid_images(g_ds, np.clip(row, 0, None).tolist()) for row in nb])
    out = eval_dir(ctx.run_dir, "retrieval", ctx.baseline) / "retrieval_grid.png"
    return retrieval_grid(q_imgs, n_imgs, correct, out, query_titles=[name(int(c)) for c in q_labels[pick]],
                          neighbour_titles=[[name(int(c)) for c in row] for row in nb_labels],
                          title=f"{ctx.source}: {ctx.eval_split} queries, train neighbours (red = other class)")


class ImageListDataset(Dataset):
    """``(uint8 (3, H, W), label)`` items from a list of images of any sizes."""

    def __init__(self, images: Sequence[torch.Tensor], labels: torch.Tensor, source: str) -> None:
        self.images, self._labels, self.source = list(images), labels.long(), source

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self._labels[i])

    @property
    def labels(self) -> torch.Tensor:
        return self._labels


def make_copy_queries(gallery: Dataset, num_queries: int, seed: int) -> tuple[Dataset, torch.Tensor]:
    """Strongly augmented copies of ``num_queries`` random gallery images, and their source rows ``(Q,)``."""
    src = _pick(len(gallery), num_queries, seed).sort().values  # (Q,)
    if isinstance(gallery, TensorImageDataset):
        copies = retrieval_mod.make_copies(gallery.images[src], seed=seed)  # (Q, 3, H, W)
        return TensorImageDataset(copies, gallery.labels[src], gallery.classes,
                                  f"copies(seed={seed}) of {gallery.source}"), src
    imgs = [retrieval_mod.make_copies(gallery[int(i)][0][None], seed=seed + int(i))[0] for i in src]
    labels = torch.tensor([int(gallery[int(i)][1]) for i in src])
    return ImageListDataset(imgs, labels, f"copies(seed={seed}, n={len(src)}) of {getattr(gallery, 'source', '')}"), src


def run_copy_detection(run_dir: str | Path, *, index: str = retrieval_mod.DEFAULT_INDEX,
                       ks: Sequence[int] = retrieval_mod.DEFAULT_KS,
                       num_queries: int = retrieval_mod.DEFAULT_COPY_QUERIES, nprobe: int | None = None,
                       whiten: int | None = None, plots: bool = True, **opts: Any) -> dict:
    """Copy detection (DINO style): find the source of strongly augmented copies among the eval-split images.

    The gallery is the eval split (``test_subset`` limits it); queries are augmented copies of
    ``num_queries`` gallery images. ``metrics``: mAP (mean 1/rank of the source) and recall@k (%).
    ``whiten=d``: PCA-whitened features (learned on the gallery, no labels), as in DINO's copy detection; the
    unwhitened figures are then under ``metrics["plain"]``.
    """
    whiten = _whiten_dim(whiten)
    from sslkit.eval.plots import GRID_NEIGHBOURS, GRID_QUERIES

    if num_queries <= 0:
        raise EvalError(f"num_queries must be positive, got {num_queries}")
    t0 = time.perf_counter()
    ctx = load_context(run_dir, **opts)
    gallery_ds = ctx.dataset(ctx.eval_split)
    query_ds, src = make_copy_queries(gallery_ds, num_queries, ctx.seed)
    gallery = ctx.features(ctx.eval_split)
    queries = ctx.features_of(query_ds, "copies")
    g_f, q_f = _postprocess(ctx, gallery, queries)
    res, t_eval = _timed(lambda: retrieval_mod.copy_detection_metrics(
        q_f, src, g_f, index=index, ks=ks, nprobe=nprobe, return_ids=GRID_NEIGHBOURS if plots else 0,
        whiten=whiten))
    ids = res.pop("ids", None)
    pics: list[Path] = []
    if plots and ids is not None:
        from sslkit.eval.plots import retrieval_grid

        pick = _pick(len(src), GRID_QUERIES, ctx.seed)
        nb = ids[pick.numpy()]
        correct = torch.from_numpy(nb) == src[pick][:, None]
        n_imgs = torch.stack([_grid_images(gallery_ds, np.clip(row, 0, None).tolist()) for row in nb])
        pics.append(retrieval_grid(_grid_images(query_ds, pick.tolist()), n_imgs, correct,
                                   eval_dir(ctx.run_dir, "copy", ctx.baseline) / "copy_grid.png",
                                   title=f"{ctx.source}: copies and their nearest originals (green = source)"))
    settings = {"index": index, "ks": list(ks), "num_queries": int(len(src)), "nprobe": nprobe,
                "gallery_split": ctx.eval_split, "whiten": res.get("whiten"),
                "augmentation": {"crop_scale": list(retrieval_mod.COPY_CROP_SCALE),
                                 "color_jitter": list(retrieval_mod.COPY_JITTER), "jitter_p": retrieval_mod.COPY_JITTER_P,
                                 "blur_p": retrieval_mod.COPY_BLUR_P, "jpeg_quality": list(retrieval_mod.COPY_JPEG_QUALITY)}}
    return _finish(ctx, "copy", res, settings, {ctx.eval_split: gallery, "copies": queries}, t0, t_eval, pics)


RUNNERS: dict[str, Callable[..., dict]] = {"knn": run_knn, "linear": run_linear, "retrieval": run_retrieval,
                                           "copy": run_copy_detection,
                                           "retrieval_sets": retrieval_mod.run_retrieval_sets,
                                           "copy_folder": retrieval_mod.run_copy_folder}
