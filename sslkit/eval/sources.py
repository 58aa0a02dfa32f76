"""What ``sslkit eval`` evaluates (a feature source) and on what (a dataset), for every verb alike.

Feature sources (the positional ``SOURCE`` of every ``sslkit eval`` verb, ``source`` in the Python API):

- a run directory, its ``-latest`` link or a file inside it: the run's eval encoder (``encoder.safetensors``);
- ``timm:<name>`` with ``--weights FILE``: ``timm.create_model(name, pretrained=False, num_classes=0)`` with
  the weights of a local ``.safetensors`` / ``.pth`` state dict (loaded safely, every key checked), or an
  ``sslkit export --format timm`` folder. Nothing is downloaded, so a timm source without weights is an error
  (``random:timm:<name>`` is its random initialisation). Images are resized to the model's
  ``pretrained_cfg`` input size and normalised with its mean/std;
- ``pixels``: raw pixels (flattened, mean-subtracted, L2-normalised);
- ``random:<encoder>``: a registered encoder (``sslkit list encoders``, ``timm:<name>`` included) with random
  weights drawn from ``--seed``.

Datasets: ``--dataset NAME`` (a registered dataset, ``--dataset-arg key=value`` for its arguments) or
``--dataset PATH`` (an image folder, one sub-folder per class). ``--train-split`` / ``--eval-split`` pick the bank
and the queries (default ``train`` and the run's ``data.eval_split``, else ``test``). A folder with no
``train/`` and ``test/`` (or ``val/``) sub-folders is split here: a fixed, class-balanced
:data:`FOLDER_EVAL_FRACTION` of each class is the eval split. Without ``--dataset`` a run is evaluated on its
own dataset; the other sources need one.

Results go to the run (``RUN/eval/``) when it is evaluated on its own data, to ``RUN/transfer/<dataset>/eval/``
on other data, and to ``--out`` (default ``evals/<source>_<dataset>/``) for the other sources. Every field that
changes the features is in the feature-cache key: the source's identity (the run's weights hash, or the timm name
with the weights file's sha256, size and mtime), the dataset spec and its arguments, the split, the subset, the
preprocessing and the precision.

Example::

    from sslkit.eval import run_knn
    run_knn("timm:resnet18", weights="resnet18.safetensors", dataset="photos/", k=[20])
    run_knn("runs/simclr_resnet_fmnist-latest", dataset="cifar10", dataset_args={"root": "data/cifar"})
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from sslkit.augment.base import IMAGENET_MEAN, IMAGENET_STD
from sslkit.data.base import DataError
from sslkit.run import RunError

SOURCE_KINDS = ("run", "timm", "pixels", "random")
FOLDER_EVAL_FRACTION = 0.2  # share of each class held out as the eval split of a folder without split folders
FOLDER_SPLIT_SEED = 0  # the held-out images do not change with --seed, so results stay comparable
DEFAULT_OUT = Path("evals")
TIMM_SOURCE_VERSION = 1
_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin")
NO_DATASET = ("timm:, pixels and random: sources need a dataset to evaluate on: --dataset NAME (`sslkit list "
              "datasets`, with --dataset-arg key=value) or --dataset PATH (an image folder with one sub-folder per "
              "class).")


# ----------------------------------------------------------------------------------------------------------
# Feature sources
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FeatureSource:
    """A parsed ``SOURCE``: ``kind`` in :data:`SOURCE_KINDS`; ``name`` the run path, timm model or encoder name."""

    kind: str
    name: str
    weights: Path | None = None

    @property
    def slug(self) -> str:
        base = Path(self.name).name if self.kind == "run" else f"{self.kind}-{self.name}"
        return _slug(base if self.kind != "pixels" else "pixels")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")[:80] or "x"


def parse_source(source: str | Path, weights: str | Path | None = None) -> FeatureSource:
    """``"runs/x"``, ``"timm:NAME"``, ``"pixels"`` or ``"random:ENCODER"`` -> :class:`FeatureSource`."""
    text = str(source)
    if text == "pixels":
        src = FeatureSource("pixels", "pixels")
    elif text.startswith("timm:"):
        src = FeatureSource("timm", text[len("timm:"):], Path(weights).expanduser() if weights else None)
        if not src.name:
            raise RunError("timm: needs a model name, e.g. timm:resnet18 --weights resnet18.safetensors")
        if src.weights is None:
            raise RunError(f"{text} needs --weights FILE (a local .safetensors/.pth state dict, or an `sslkit export "
                           f"--format timm` folder): sslkit downloads nothing. For a randomly initialised model use "
                           f"random:{text}.")
    elif text.startswith("random:"):
        src = FeatureSource("random", text[len("random:"):])
        if not src.name:
            raise RunError("random: needs a registered encoder name, e.g. random:resnet_cifar (`sslkit list "
                           "encoders`) or random:timm:resnet18")
    else:
        src = FeatureSource("run", text)
    if weights is not None and src.kind != "timm":
        raise RunError(f"--weights applies to timm:<name> sources only; {text} brings its own weights (or none).")
    return src


class TimmFeatures(nn.Module):
    """A timm model (``num_classes=0``) as a feature source: ``(B, 3, s, s)`` normalised with sslkit's
    ImageNet mean/std -> re-normalised with the model's own ``mean``/``std`` -> its pooled features ``(B, dim)``."""

    def __init__(self, model: nn.Module, name: str) -> None:
        super().__init__()
        from timm.models.vision_transformer import VisionTransformer

        self.model, self.name = model, name
        self.dim = int(model.num_features)
        self.is_vit = isinstance(model, VisionTransformer)
        cfg = dict(getattr(model, "pretrained_cfg", {}) or {})
        mean, std = tuple(cfg.get("mean") or IMAGENET_MEAN), tuple(cfg.get("std") or IMAGENET_STD)
        self.mean_std = (tuple(float(m) for m in mean), tuple(float(s) for s in std))
        # x_model = (x * std_in + mean_in - mean) / std = x * scale + shift
        scale = torch.tensor(IMAGENET_STD) / torch.tensor(self.mean_std[1])
        shift = (torch.tensor(IMAGENET_MEAN) - torch.tensor(self.mean_std[0])) / torch.tensor(self.mean_std[1])
        self.renormalise = self.mean_std != (tuple(IMAGENET_MEAN), tuple(IMAGENET_STD))
        self.register_buffer("scale", scale.view(1, 3, 1, 1), persistent=False)
        self.register_buffer("shift", shift.view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.renormalise:
            x = x * self.scale + self.shift  # (B, 3, s, s) in the model's normalisation
        return self.model(x)  # (B, dim)


def _export_dir(weights: Path) -> Path | None:
    """The ``sslkit export --format timm`` folder ``weights`` names (the folder or its model.safetensors), if any."""
    from sslkit.export import CONFIG_NAME, WEIGHTS_NAME

    if weights.is_dir():
        return weights
    if weights.name == WEIGHTS_NAME and (weights.parent / CONFIG_NAME).is_file():
        return weights.parent
    return None


def timm_source_image_size(source: FeatureSource) -> int | None:
    """The square side of a timm source's ``pretrained_cfg['input_size']`` (an export's config.json, else timm's
    default config for the name); None when unknown."""
    from timm.models import get_pretrained_cfg

    from sslkit.export import CONFIG_NAME

    folder = _export_dir(source.weights) if source.weights is not None else None
    if folder is not None:
        try:
            size = json.loads((folder / CONFIG_NAME).read_text()).get("pretrained_cfg", {}).get("input_size")
        except (OSError, ValueError, AttributeError):
            size = None  # load_timm names the problem when the model is loaded
    else:
        cfg = get_pretrained_cfg(source.name)
        size = cfg.input_size if cfg is not None else None
    return int(size[-1]) if isinstance(size, list | tuple) and size else None


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A local weights file as a state dict, safely: safetensors, or ``torch.load(weights_only=True)`` of a plain
    state dict (or one under ``state_dict`` / ``model``, timm's training checkpoints)."""
    if not path.is_file():
        raise RunError(f"weights file {path} does not exist.")
    if path.suffix not in _WEIGHT_SUFFIXES:
        raise RunError(f"weights file {path}: expected one of {', '.join(_WEIGHT_SUFFIXES)}.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as e:  # noqa: BLE001 - SafetensorError, OSError: truncated or foreign file
            raise RunError(f"{path} is not a readable safetensors file ({str(e).splitlines()[0][:200]}); it may be "
                           "truncated.") from None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - unpickling refused, truncated zip, ...
        raise RunError(f"refusing {path}: not a plain weights file ({type(e).__name__}: "
                       f"{str(e).splitlines()[0][:200]}). It is loaded with weights_only=True, so pickled code never "
                       "runs; save a state dict (torch.save(model.state_dict(), ...)) or safetensors.") from None
    if isinstance(blob, dict) and blob.get("format") == "sslkit":
        raise RunError(f"{path} is an sslkit training checkpoint: evaluate its run directory instead "
                       f"(sslkit eval knn {path.parent.parent}).")
    for key in ("state_dict", "model"):
        if isinstance(blob, dict) and isinstance(blob.get(key), dict):
            blob = blob[key]
    if not (isinstance(blob, dict) and blob and all(isinstance(v, torch.Tensor) for v in blob.values())):
        raise RunError(f"{path} does not hold a state dict (name -> tensor).")
    return blob


def _file_identity(path: Path) -> dict[str, Any]:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    st = path.stat()
    return {"file": path.name, "sha256": h.hexdigest(), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def load_timm_source(source: FeatureSource) -> tuple[TimmFeatures, dict[str, Any]]:
    """The timm model of a ``timm:`` source with its weights, and its identity (for the cache key)."""
    import timm

    from sslkit.export import CONFIG_NAME, WEIGHTS_NAME, load_timm
    from sslkit.run import load_state_strict

    assert source.weights is not None
    w = source.weights
    export_dir = _export_dir(w)
    if export_dir is not None:  # an `sslkit export --format timm` folder: its config gives the model arguments
        model = load_timm(export_dir)
        arch = model.pretrained_cfg.get("architecture", source.name)
        if arch != source.name:
            raise RunError(f"--weights {w} is an export of {arch}, not {source.name}; use timm:{arch}.")
        files = [_file_identity(export_dir / WEIGHTS_NAME), _file_identity(export_dir / CONFIG_NAME)]
    else:
        try:
            model = timm.create_model(source.name, pretrained=False, num_classes=0)
        except RuntimeError as e:
            raise RunError(f"timm has no model {source.name!r} ({e}); see timm.list_models().") from None
        state = read_state_dict(w)
        own = model.state_dict()
        # A classifier head in the file (trained with labels) is not part of the features: timm drops it too.
        heads = (getattr(model, "pretrained_cfg", None) or {}).get("classifier") or ()
        for head in (heads,) if isinstance(heads, str) else heads:
            for key in (f"{head}.weight", f"{head}.bias"):
                if key in state and key not in own:
                    state.pop(key)
        load_state_strict(model, state, f"--weights {w} for timm:{source.name}")
        files = [_file_identity(w)]
    enc = TimmFeatures(model.eval(), f"timm:{source.name}")
    identity = {"timm": source.name, "weights": files, "mean_std": enc.mean_std, "version": TIMM_SOURCE_VERSION}
    return enc, identity


def identity_hash(identity: dict[str, Any]) -> str:
    """The sha256 (hex) of ``identity`` as sorted-key JSON (non-JSON values by ``str``): a stable key for caches
    and folder names."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()


def build_feature_encoder(source: FeatureSource, baseline: str, *, cfg: Any, dataset: Dataset, image_size: int,
                          seed: int) -> tuple[nn.Module, str, str]:
    """``(encoder, identity hash, description)`` of ``source`` under ``baseline`` ("none", "pixels", "random").

    ``pixels`` is raw pixels for every source; ``random`` is the source's architecture with random weights
    (seeded by ``seed``); the identity hash is the feature-cache key's encoder part.
    """
    from sslkit.eval.report import PIXEL_FEATURES_VERSION, PixelEncoder, _is_grayscale, _keyed_hash
    from sslkit.registry import ENCODERS
    from sslkit.run import build_encoder, encoder_kwargs, eval_encoder_args, load_encoder

    if baseline == "pixels" or source.kind == "pixels":
        if source.kind == "pixels" and baseline == "random":
            raise RunError("pixels has no architecture to initialise randomly; use random:<encoder> as the source.")
        channels = 1 if _is_grayscale(dataset) else 3
        return (PixelEncoder(image_size, channels), f"pixels-v{PIXEL_FEATURES_VERSION}-c{channels}",
                f"raw pixels ({channels}x{image_size}x{image_size}, mean-subtracted, L2-normalised)")
    if source.kind == "run":
        if baseline == "none":
            enc, _ = load_encoder(source.name, encoder_args=eval_encoder_args(cfg))
            return (enc, _keyed_hash(enc, encoder_kwargs(cfg, for_eval=True)),
                    f"{cfg.encoder.name} (pretrained, {Path(source.name).resolve().name})")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            enc = build_encoder(cfg, for_eval=True).eval()
        return (enc, _keyed_hash(enc, encoder_kwargs(cfg, for_eval=True)),
                f"{cfg.encoder.name} (random init, seed {seed})")
    if source.kind == "timm" and baseline == "none":
        enc, identity = load_timm_source(source)
        return enc, identity_hash(identity), f"timm {source.name} ({source.weights.name})"  # type: ignore[union-attr]
    if source.kind == "timm":  # its random baseline: the same timm model and preprocessing, random weights
        import timm

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            enc = TimmFeatures(timm.create_model(source.name, pretrained=False, num_classes=0).eval(),
                               f"timm:{source.name}")
        return (enc, _keyed_hash(enc, {"timm": source.name, "random_seed": seed, "mean_std": enc.mean_std}),
                f"timm {source.name} (random init, seed {seed})")
    # random:<encoder>: the registered encoder (timm:<name> included), seeded
    from sslkit.plugins import load_all

    load_all()
    name = source.name
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        enc = ENCODERS.build(name).eval()
    return enc, _keyed_hash(enc, {"name": name, "random_seed": seed}), f"{name} (random init, seed {seed})"


# ----------------------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------------------


@dataclass
class DatasetSpec:
    """The dataset to evaluate on: a registered ``name`` with ``root`` and ``args``; ``folder`` when it was given
    as a path (then a folder without split sub-folders is split by :func:`folder_split`)."""

    name: str
    root: str | None = None
    args: dict[str, Any] = field(default_factory=dict)
    train_split: str = "train"
    eval_split: str = "test"
    folder: bool = False
    own: bool = False  # the run's own dataset (no --dataset)
    missing: bool = False  # no --dataset for a source without its own: an error once a split is needed

    @property
    def label(self) -> str:
        return f"{self.name}({Path(self.root).name})" if self.folder and self.root else self.name

    @property
    def slug(self) -> str:
        return _slug(Path(self.root).name if self.folder and self.root else self.name)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "root": self.root, "args": self.args, "train_split": self.train_split,
                "eval_split": self.eval_split, "folder": self.folder}

    def cache_split(self, split: str) -> str:
        """``split`` with the spec's digest: part of the feature-cache key."""
        digest = identity_hash(self.describe())[:12]
        return f"{self.real_split(split)}|{digest}"

    def real_split(self, split: str) -> str:
        """The dataset split behind an evaluation role ("train" is the bank / gallery)."""
        return self.train_split if split == "train" else split

    def build(self, split: str) -> Dataset:
        from sslkit.plugins import load_all
        from sslkit.registry import DATASETS

        if self.missing:
            raise DataError(NO_DATASET)
        load_all()
        real = self.real_split(split)
        if self.folder and not _has_split_dirs(Path(self.root or ".")):
            return folder_split(Path(self.root or "."), real, train_split=self.train_split, **self.args)
        return DATASETS.build(self.name, split=real, root=self.root, **self.args)


def _has_split_dirs(root: Path) -> bool:
    return (root / "train").is_dir() and ((root / "test").is_dir() or (root / "val").is_dir())


def folder_split(root: Path, split: str, *, train_split: str = "train", fraction: float = FOLDER_EVAL_FRACTION,
                 **args: Any) -> Dataset:
    """A class-folder tree without split folders, split per class: ``ceil(fraction * n)`` images of each class
    with at least 2 images (picked with :data:`FOLDER_SPLIT_SEED`) form every split but ``train_split``."""
    import math

    from sslkit.data.image_folder import ImageFolderDataset, image_folder

    full = image_folder(split="train", root=str(root), **args)
    if not full.classes:
        raise DataError(f"{root} has no class sub-folders: evaluating needs labels (one sub-folder per class), or "
                        "train/ and test/ folders that hold them.")
    labels = full.labels
    g = torch.Generator().manual_seed(FOLDER_SPLIT_SEED)
    held: list[int] = []
    for c in range(len(full.classes)):
        idx = torch.nonzero(labels == c).flatten()
        if len(idx) < 2:
            continue
        n_eval = max(1, math.ceil(fraction * len(idx)))
        held += idx[torch.randperm(len(idx), generator=g)[:n_eval]].tolist()
    held_set = set(held)
    keep = [i for i in range(len(full)) if (i in held_set) != (split == train_split)]
    part = "eval" if split != train_split else "train"
    return ImageFolderDataset([full.files[i] for i in keep], [int(labels[i]) for i in keep], full.classes,
                              full.strict, f"image_folder/{part} ({root}, {fraction:g} of each class held out)")


def _parse_value(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_dataset_args(items: list[str] | dict[str, Any] | None, option: str = "--dataset-arg",
                       example: str = "num_samples=64") -> dict[str, Any]:
    """``["num_samples=64", "labeled=false"]`` (values read as YAML scalars / lists) or a dict -> dict; errors
    name ``option`` and show ``example``."""
    if items is None:
        return {}
    if isinstance(items, dict):
        pairs = list(items.items())
    else:
        pairs = []
        for item in items:
            key, sep, value = str(item).partition("=")
            if not sep:
                raise DataError(f"{option} {item!r}: expected key=value, e.g. {option} {example}")
            pairs.append((key.strip(), _parse_value(value)))
    out: dict[str, Any] = {}
    for key, value in pairs:
        if not str(key).isidentifier():
            raise DataError(f"{option} key {key!r} is not a valid argument name (letters, digits, _).")
        out[str(key)] = value
    return out


def _looks_like_path(text: str) -> bool:
    return "/" in text or text.startswith((".", "~")) or Path(text).expanduser().is_dir()


def dataset_spec(dataset: str | Path | None, dataset_args: Any = None, *, cfg: Any = None,
                 train_split: str | None = None, eval_split: str | None = None) -> DatasetSpec:
    """The :class:`DatasetSpec` for ``--dataset`` / ``--dataset-arg`` / splits; ``cfg`` is the run's recipe
    (its dataset is the default), None for sources without one."""
    from omegaconf import OmegaConf

    from sslkit.plugins import load_all
    from sslkit.registry import DATASETS

    args = parse_dataset_args(dataset_args)
    if dataset is None:
        if cfg is None:  # evaluations on folders of their own (retrieval --queries/--gallery) need none
            if args:
                raise DataError("--dataset-arg needs --dataset NAME.")
            return DatasetSpec("", None, {}, train_split=train_split or "train", eval_split=eval_split or "test",
                               missing=True)
        own = OmegaConf.to_container(cfg.data.args, resolve=True) if cfg.data.get("args") else {}
        root = cfg.data.get("root")
        spec = DatasetSpec(str(cfg.data.name), str(root) if root else None, {**own, **args}, own=not args,  # type: ignore[dict-item]
                           eval_split=str(cfg.data.get("eval_split") or "test"))
    elif _looks_like_path(str(dataset)):
        root = Path(dataset).expanduser()
        if not root.is_dir():
            raise DataError(f"--dataset {dataset}: no such folder. Give an image folder (one sub-folder per class) or a "
                            "registered dataset name (`sslkit list datasets`).")
        if "root" in args:
            raise DataError("--dataset PATH is the folder's root already; drop --dataset-arg root=...")
        spec = DatasetSpec("image_folder", str(root.resolve()), args, folder=True)
    else:
        load_all()
        if str(dataset) not in DATASETS:
            raise DataError(f"--dataset {dataset!r} is neither a registered dataset ({', '.join(DATASETS.names())}) "
                            "nor an existing folder.")
        root = args.pop("root", None)
        same = cfg is not None and str(cfg.data.name) == str(dataset)
        if root is None and same and cfg.data.get("root"):
            root = cfg.data.root  # the run's own data location for its own dataset
        spec = DatasetSpec(str(dataset), str(root) if root is not None else None, args)
    if train_split:
        spec.train_split = str(train_split)
    if eval_split:
        spec.eval_split = str(eval_split)
    if spec.train_split == spec.eval_split:
        raise DataError(f"--train-split and --eval-split are both {spec.train_split!r}: the bank would hold the "
                        "queries themselves. Pick two different splits.")
    return spec


def dataset_image_size(ds: Dataset) -> int:
    """The short side of the first image: the evaluation size of sources without one of their own."""
    if len(ds) == 0:  # type: ignore[arg-type]
        raise DataError("the dataset is empty.")
    img = ds[0][0]
    return int(min(img.shape[-2:]))


# ----------------------------------------------------------------------------------------------------------
# Resolution: source + dataset -> where results go, the recipe view evaluation reads, the image size
# ----------------------------------------------------------------------------------------------------------


@dataclass
class Resolved:
    """What :func:`sslkit.eval.report.load_context` needs from a source and a dataset."""

    source: FeatureSource
    data: DatasetSpec
    cfg: Any  # the recipe view: the run's recipe with ``data`` replaced, or a small one for other sources
    out_dir: Path  # where eval/ (results, report) goes
    cache_dir: Path  # default feature cache
    image_size: int | None  # None = the dataset's own (decided once the dataset is built)


def with_encoder_args(run_cfg: Any, encoder_args: dict[str, Any]) -> Any:
    """A copy of a run's recipe whose ``eval.encoder_args`` has ``encoder_args`` on top, checked against the
    encoder's signature (a :class:`ConfigError` names a wrong key or type)."""
    from omegaconf import OmegaConf

    from sslkit.config import ConfigError, validate_eval_encoder_args

    cfg = OmegaConf.create(OmegaConf.to_container(run_cfg, resolve=False))
    if not encoder_args:
        return cfg
    current = OmegaConf.to_container(cfg.eval.encoder_args, resolve=True) if cfg.eval.get("encoder_args") else {}
    cfg.eval.encoder_args = {**current, **encoder_args}
    try:
        validate_eval_encoder_args(cfg)
    except ConfigError as e:
        raise ConfigError(str(e).replace("recipe key 'eval.encoder_args.", "--encoder-arg '")) from None
    return cfg


def resolve(source: str | Path, *, dataset: str | Path | None = None, dataset_args: Any = None,
            weights: str | Path | None = None, train_split: str | None = None, eval_split: str | None = None,
            image_size: int | None = None, out_dir: str | Path | None = None,
            encoder_args: Any = None) -> Resolved:
    """Parse and check a source and a dataset; see the module notes for the defaults."""
    from omegaconf import OmegaConf

    from sslkit.run import eval_image_size, load_config, refuse_linked_dirs, resolve_run_dir

    src = parse_source(source, weights)
    if image_size is not None and int(image_size) < 8:
        raise DataError(f"--image-size must be at least 8 px, got {image_size}")
    enc_args = parse_dataset_args(encoder_args, "--encoder-arg", "pool=token")
    if enc_args and src.kind != "run":
        raise DataError(f"--encoder-arg changes how a run's encoder pools its features; {source} is not a run. "
                        "Leave it out, or pass a run directory.")
    if src.kind == "run":
        run_dir = resolve_run_dir(src.name)
        src = FeatureSource("run", str(run_dir))
        run_cfg = load_config(run_dir)
        spec = dataset_spec(dataset, dataset_args, cfg=run_cfg, train_split=train_split, eval_split=eval_split)
        cfg = with_encoder_args(run_cfg, enc_args)
        cfg.data = {**OmegaConf.to_container(run_cfg.data), "name": spec.name, "root": spec.root,
                    "args": spec.args, "eval_split": spec.eval_split}
        own_splits = spec.train_split == "train" and spec.eval_split == str(run_cfg.data.get("eval_split") or "test")
        if out_dir is not None:
            out = Path(out_dir).expanduser()
        elif spec.own and own_splits and not enc_args:
            out = run_dir
        else:  # another dataset, or other features than the recipe's: beside the run's own results
            if (run_dir / "transfer").is_symlink():
                raise RunError(f"{run_dir / 'transfer'} is a symbolic link; sslkit writes into a run's own folders "
                               "only. Replace it with a folder.")
            variant = "".join(f"-{k}{_slug(str(v))}" for k, v in sorted(enc_args.items()))
            out = run_dir / "transfer" / f"{spec.slug}{variant}-{identity_hash({**spec.describe(), **enc_args})[:8]}"
        size = int(image_size or eval_image_size(run_cfg))
        cache = run_dir / "features"
    else:
        spec = dataset_spec(dataset, dataset_args, cfg=None, train_split=train_split, eval_split=eval_split)
        cfg = OmegaConf.create({"name": f"{src.slug}_{spec.slug}",
                                "encoder": {"name": f"{src.kind}:{src.name}" if src.kind != "pixels" else "pixels"},
                                "data": {"name": spec.name, "root": spec.root, "args": spec.args,
                                         "eval_split": spec.eval_split},
                                "eval": {}})
        out = Path(out_dir).expanduser() if out_dir is not None else DEFAULT_OUT / f"{src.slug}_{spec.slug}"
        size = int(image_size) if image_size else (timm_source_image_size(src) if src.kind == "timm" else None)
        cache = out / "features"
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise RunError(f"output folder {out} must be a folder (not a file or a symbolic link).")
    if out.is_dir():
        refuse_linked_dirs(out)
    return Resolved(src, spec, cfg, out, cache, size)


# ----------------------------------------------------------------------------------------------------------
# Command line: one argument set for every `sslkit eval` verb
# ----------------------------------------------------------------------------------------------------------


def add_source_arguments(p: argparse.ArgumentParser) -> None:
    """The positional SOURCE and the dataset options, shared by every ``sslkit eval`` verb."""
    p.add_argument("run", metavar="SOURCE",
                   help="what to evaluate: a run directory (its -latest link, or a file inside it), timm:<name> "
                        "with --weights, pixels, or random:<encoder> (`sslkit list encoders`)")
    p.add_argument("--weights", default=None, metavar="FILE",
                   help="timm:<name> only: local .safetensors/.pth state dict, or an `sslkit export --format timm` "
                        "folder (nothing is downloaded)")
    add_dataset_arguments(p)
    p.add_argument("--image-size", type=int, default=None,
                   help="evaluation resolution (default: the run's, a timm model's pretrained_cfg input size, or "
                        "the dataset's images for pixels / random:)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="where results go (default: the run; RUN/transfer/<dataset>/ on another dataset or with "
                        "--encoder-arg; evals/<source>_<dataset>/ for other sources)")
    p.add_argument("--encoder-arg", action="append", default=None, metavar="KEY=VALUE",
                   help="a run only: an encoder argument that changes the features, not the weights (repeatable; "
                        "on top of the recipe's eval.encoder_args), e.g. pool=token for a ViT's class token or "
                        "pool_grid=4 for resnet_cifar")


def add_dataset_arguments(p: argparse.ArgumentParser, *,
                          train_help: str = "split used as the bank / gallery (default: train)",
                          eval_help: str = "split used as the queries (default: the run's data.eval_split, else "
                                           "test)") -> None:
    """``--dataset``, ``--dataset-arg``, ``--train-split`` and ``--eval-split``: the dataset to evaluate on, for
    verbs that take a run (``finetune``) as for those that take any SOURCE (:func:`add_source_arguments`)."""
    p.add_argument("--dataset", default=None, metavar="NAME|PATH",
                   help="dataset to evaluate on: a registered name (`sslkit list datasets`) or an image folder "
                        "(one sub-folder per class; without train/ and test/ sub-folders a fixed "
                        f"{round(FOLDER_EVAL_FRACTION * 100)}%% of each class is the eval split). Default: the run's own")
    p.add_argument("--dataset-arg", action="append", default=None, metavar="KEY=VALUE",
                   help="an argument of the registered dataset (repeatable), e.g. root=data/cifar num_samples=64")
    p.add_argument("--train-split", default=None, help=train_help)
    p.add_argument("--eval-split", default=None, help=eval_help)


def dataset_options(args: argparse.Namespace) -> dict[str, Any]:
    """The dataset keyword arguments of :func:`resolve` (``dataset``, ``dataset_args``, ``train_split``,
    ``eval_split``) from arguments parsed with :func:`add_dataset_arguments`."""
    return {"dataset": args.dataset, "dataset_args": args.dataset_arg, "train_split": args.train_split,
            "eval_split": args.eval_split}


def source_options(args: argparse.Namespace) -> dict[str, Any]:
    """The keyword arguments of :func:`resolve` (and ``load_context`` / ``run_*``) from parsed arguments."""
    return {"weights": args.weights, **dataset_options(args), "image_size": args.image_size, "out_dir": args.out,
            "encoder_args": getattr(args, "encoder_arg", None)}
