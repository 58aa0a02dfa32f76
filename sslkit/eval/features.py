"""Feature extraction with a frozen encoder, and an on-disk feature cache.

:func:`extract_features` turns a dataset of ``(uint8 image (3, H, W), label)`` items into ``(N, D)`` float32
features on the CPU. In-memory datasets (:class:`sslkit.data.TensorImageDataset`) take a batched path
(slice, resize, normalise whole batches); other datasets go through a DataLoader with the per-image
:func:`sslkit.augment.base.eval_transform`. Both give the same deterministic evaluation view: resize the
short side, centre-crop ``image_size``, normalise with the ImageNet mean/std.

:func:`cached_features` wraps it with a cache keyed by the encoder's weights (sha256 of the state_dict
bytes), the transform and the dataset, so a second evaluation of the same run reads features from disk
(extracting 70k images costs minutes on a 2-core CPU, more than the k-NN itself).

Example::

    feats, labels = extract_features(encoder, DATASETS.build("fashion_mnist", split="test"), image_size=32)
    feats.shape  # (10000, encoder.dim)
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset

from sslkit.augment.base import IMAGENET_MEAN, IMAGENET_STD, eval_transform
from sslkit.data.base import TensorImageDataset
from sslkit.encoders import fused_attention_wanted, restore_attention, set_fused_attention

DEFAULT_BATCH_SIZE = 512
SMALL_IMAGE_SIZE = 96  # below this the eval view is a plain resize (crop ratio 1), as in eval_transform
LARGE_CROP_RATIO = 0.875  # the 256 -> 224 resize/centre-crop convention for larger images
CACHE_FORMAT_VERSION = 1


# ----------------------------------------------------------------------------------------------------------
# Extraction
# ----------------------------------------------------------------------------------------------------------


def default_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` if given, else CUDA when available, else CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _module_device(module: nn.Module) -> torch.device:
    for p in module.parameters():
        return p.device
    for b in module.buffers():
        return b.device
    return torch.device("cpu")


def eval_crop_ratio(image_size: int) -> float:
    """The centre-crop ratio that :func:`sslkit.augment.base.eval_transform` uses by default."""
    return 1.0 if image_size < SMALL_IMAGE_SIZE else LARGE_CROP_RATIO


def transform_description(image_size: int, bf16: bool = False) -> str:
    """A string that identifies the evaluation view and precision (part of the feature-cache key)."""
    ratio = eval_crop_ratio(image_size)
    return (f"resize_short={int(round(image_size / ratio))},center_crop={image_size},"
            f"mean={list(IMAGENET_MEAN)},std={list(IMAGENET_STD)},precision={'bf16' if bf16 else 'fp32'}")


def batch_eval_view(images: torch.Tensor, image_size: int) -> torch.Tensor:
    """Batched evaluation view of uint8 images: the same steps as ``eval_transform(image_size)``.

    Args:
        images: uint8 ``(B, 3, H, W)`` on any device.
        image_size: output side length.

    Returns:
        float32 ``(B, 3, image_size, image_size)``, normalised with the ImageNet mean/std.
    """
    x = images.float().div_(255.0)  # (B, 3, H, W) in [0, 1]
    h, w = x.shape[-2:]
    short = int(round(image_size / eval_crop_ratio(image_size)))
    if min(h, w) != short:
        # Resize the short side to `short`, keeping the aspect ratio (torchvision's Resize(int) rule).
        new_h, new_w = (short, int(short * w / h)) if h <= w else (int(short * h / w), short)
        x = F.interpolate(x, size=(new_h, new_w), mode="bilinear", align_corners=False, antialias=True)
        h, w = new_h, new_w
    if (h, w) != (image_size, image_size):
        top, left = int(round((h - image_size) / 2.0)), int(round((w - image_size) / 2.0))
        x = x[..., top:top + image_size, left:left + image_size]  # (B, 3, s, s)
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous()


def _tensor_batches(ds: TensorImageDataset, image_size: int, batch_size: int,
                    device: torch.device) -> Iterator[torch.Tensor]:
    images = ds.images  # (N, 3, H, W) uint8, grayscale expanded as a view
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size].to(device, non_blocking=True)  # uint8 travels, floats are made there
        yield batch_eval_view(chunk, image_size)


class _Transformed(Dataset):
    """Applies the per-image eval transform to a dataset's images."""

    def __init__(self, ds: Dataset, transform: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.ds, self.transform = ds, transform

    def __len__(self) -> int:
        return len(self.ds)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img, label = self.ds[i]
        return self.transform(img), int(label)


@contextlib.contextmanager
def _inference_mode(encoder: nn.Module) -> Iterator[None]:
    """Eval mode and no_grad inside; the encoder's previous train/eval mode afterwards."""
    was_training = encoder.training
    encoder.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        encoder.train(was_training)


def use_bf16(device: torch.device, bf16: bool | None = None) -> bool:
    """Whether the forward runs under bf16 autocast: ``bf16`` if given, else on CUDA only."""
    return device.type == "cuda" if bf16 is None else bool(bf16)


def _autocast(device: torch.device, bf16: bool | None = None) -> contextlib.AbstractContextManager:
    """bf16 autocast where :func:`use_bf16` says so (precision moves inference speed the most)."""
    if use_bf16(device, bf16):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _is_channels_last(module: nn.Module) -> bool:
    """True when the first 4-D weight (a conv) is stored channels_last."""
    for p in module.parameters():
        if p.dim() == 4:
            return p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
    return False


def extract_features(encoder: nn.Module, dataset: Dataset, *, image_size: int, batch_size: int = DEFAULT_BATCH_SIZE,
                     device: str | torch.device | None = None, progress: bool = True, desc: str = "features",
                     num_workers: int = 0, bf16: bool | None = None,
                     channels_last: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pooled features of every image in ``dataset``.

    Args:
        encoder: ``(B, 3, s, s) -> (B, D)``; left in the train/eval mode, on the device and in the memory
            format it had.
        dataset: items ``(uint8 (3, H, W), int label)``; :class:`TensorImageDataset` takes the batched path.
        image_size: evaluation resolution ``s``.
        batch_size: images per forward pass.
        device: where to run; None = the device the encoder's parameters are on.
        progress: show a tqdm bar (rate and ETA).
        desc: the bar's label.
        num_workers: DataLoader workers for the per-image path.
        bf16: bf16 autocast; None = on CUDA only. On a CPU with AVX-512 BF16 it roughly doubles CNN throughput
            at the cost of slightly different features.
        channels_last: NHWC layout for CNN encoders; None = on CUDA, and on CPU with bf16 (where oneDNN's
            NHWC bf16 convolutions are fastest).

    Returns:
        ``(features (N, D) float32 CPU, labels (N,) long CPU)``.
    """
    from tqdm.auto import tqdm

    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    n = len(dataset)  # type: ignore[arg-type]
    home = _module_device(encoder)
    dev = torch.device(device) if device is not None else home
    is_cnn = not getattr(encoder, "is_vit", False)
    nhwc = is_cnn and ((dev.type == "cuda" or use_bf16(dev, bf16)) if channels_last is None else bool(channels_last))
    was_nhwc = _is_channels_last(encoder)
    if dev != home:
        encoder.to(dev)
    if nhwc and not was_nhwc:
        encoder.to(memory_format=torch.channels_last)
    # the attention kernel the engine would pick for this device and precision (the same result, faster)
    attention_before = set_fused_attention(encoder, fused_attention_wanted("auto", dev.type, use_bf16(dev, bf16)))

    if isinstance(dataset, TensorImageDataset):
        batches: Iterator[Any] = _tensor_batches(dataset, image_size, batch_size, dev)
        labels = dataset.labels.clone().long()
    else:
        loader = DataLoader(_Transformed(dataset, eval_transform(image_size)), batch_size=batch_size, shuffle=False,
                            num_workers=num_workers, pin_memory=dev.type == "cuda")
        batches, labels = iter(loader), None
    feats: list[torch.Tensor] = []
    label_parts: list[torch.Tensor] = []
    bar = tqdm(total=n, desc=desc, unit="img", disable=not progress, dynamic_ncols=True)
    try:
        with _inference_mode(encoder):
            for batch in batches:
                if isinstance(batch, list | tuple):  # DataLoader path: (images, labels)
                    batch, lab = batch
                    label_parts.append(lab.long())
                x = batch.to(dev, non_blocking=True)  # (B, 3, s, s) float
                if nhwc:
                    x = x.contiguous(memory_format=torch.channels_last)
                with _autocast(dev, bf16):
                    f = encoder(x)  # (B, D)
                feats.append(f.float().cpu())
                bar.update(len(x))
    finally:
        bar.close()
        restore_attention(attention_before)
        if nhwc and not was_nhwc:
            encoder.to(memory_format=torch.contiguous_format)
        if dev != home:
            encoder.to(home)
    if labels is None:
        labels = torch.cat(label_parts) if label_parts else torch.zeros(0, dtype=torch.long)
    dim = int(getattr(encoder, "dim", 0))
    out = torch.cat(feats) if feats else torch.zeros(0, dim)
    return out.contiguous(), labels


# ----------------------------------------------------------------------------------------------------------
# Cache
# ----------------------------------------------------------------------------------------------------------


def encoder_hash(encoder: nn.Module) -> str:
    """sha256 of the encoder's state_dict: names, dtypes, shapes and raw bytes, in key order."""
    h = hashlib.sha256()
    for name, t in encoder.state_dict().items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def dataset_description(dataset: Dataset, split: str | None = None) -> str:
    """A string that identifies a dataset: its source, size, split and (cheap) content fingerprint."""
    if isinstance(dataset, torch.utils.data.Subset):
        # subset_dataset of a folder: the parent's description and the chosen rows (two subsets of one size differ)
        rows = hashlib.sha256(torch.as_tensor(list(dataset.indices), dtype=torch.long).numpy().tobytes())
        inner = dataset_description(dataset.dataset)
        return f"{inner};subset={rows.hexdigest()[:16]};n={len(dataset)}" + (f";split={split}" if split else "")
    source = getattr(dataset, "source", None) or type(dataset).__name__
    parts = [f"source={source}", f"n={len(dataset)}"]  # type: ignore[arg-type]
    if split is not None:
        parts.append(f"split={split}")
    if isinstance(dataset, TensorImageDataset):
        # Labels and a strided sample of pixels: catches subsets and regenerated data without hashing everything.
        h = hashlib.sha256(dataset.labels.numpy().tobytes())
        flat = dataset._images.reshape(-1)
        h.update(flat[:: max(1, flat.numel() // 65536)].numpy().tobytes())
        parts.append(f"fingerprint={h.hexdigest()[:16]}")
    elif hasattr(dataset, "files"):
        h = hashlib.sha256("\n".join(map(str, dataset.files)).encode())  # type: ignore[attr-defined]
        for f in dataset.files:  # type: ignore[attr-defined]  # an image replaced under the same name
            with contextlib.suppress(OSError):
                st = Path(f).stat()
                h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
        parts.append(f"files={h.hexdigest()[:16]}")
    return ";".join(parts)


@dataclass(frozen=True)
class FeatureKey:
    """What a cached feature file was computed from; any field changing invalidates the cache."""

    encoder_hash: str
    transform: str
    dataset: str
    version: int = CACHE_FORMAT_VERSION

    def filename(self) -> str:
        digest = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:20]
        return f"feats-{digest}.pt"


@dataclass
class FeatureSet:
    """Features with their provenance. ``features`` (N, D) float32, ``labels`` (N,) long."""

    features: torch.Tensor
    labels: torch.Tensor
    key: FeatureKey
    seconds: float  # time the extraction took (also when read back from the cache)
    from_cache: bool
    path: Path | None = None

    def provenance(self) -> dict[str, Any]:
        return {"encoder_hash": self.key.encoder_hash, "transform": self.key.transform, "dataset": self.key.dataset,
                "num_items": int(len(self.labels)), "dim": int(self.features.shape[1]) if self.features.ndim == 2 else 0,
                "from_cache": self.from_cache, "extract_seconds": round(self.seconds, 3),
                "cache_file": str(self.path) if self.path else None}


def _save_cache(path: Path, fs: FeatureSet) -> None:
    from sslkit.run import atomic_write_bytes

    buf = io.BytesIO()
    torch.save({"features": fs.features, "labels": fs.labels, "key": asdict(fs.key), "seconds": fs.seconds}, buf)
    atomic_write_bytes(path, buf.getvalue())


def _load_cache(path: Path, key: FeatureKey) -> FeatureSet | None:
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - a corrupt or foreign file is a cache miss, rebuilt below
        return None
    if blob.get("key") != asdict(key):
        return None
    return FeatureSet(blob["features"], blob["labels"], key, float(blob.get("seconds", 0.0)), True, path)


def cached_features(encoder: nn.Module, dataset: Dataset, *, image_size: int, cache_dir: str | Path | None,
                    split: str | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
                    device: str | torch.device | None = None, progress: bool = True, desc: str = "features",
                    enc_hash: str | None = None, bf16: bool | None = None) -> FeatureSet:
    """:func:`extract_features` with a disk cache in ``cache_dir`` (None = no cache).

    The key is (encoder hash, transform description, dataset description); a cache file whose stored key
    differs (another encoder, resolution or dataset) is ignored and rewritten. Files are written atomically.
    ``enc_hash`` may be passed when the caller already computed :func:`encoder_hash`; ``bf16`` as in
    :func:`extract_features` (the precision is part of the key).
    """
    dev = torch.device(device) if device is not None else _module_device(encoder)
    key = FeatureKey(enc_hash or encoder_hash(encoder), transform_description(image_size, use_bf16(dev, bf16)),
                     dataset_description(dataset, split))
    path = Path(cache_dir) / key.filename() if cache_dir is not None else None
    if path is not None:
        hit = _load_cache(path, key)
        if hit is not None:
            return hit
    t0 = time.perf_counter()
    feats, labels = extract_features(encoder, dataset, image_size=image_size, batch_size=batch_size, device=device,
                                     progress=progress, desc=desc, bf16=bf16)
    fs = FeatureSet(feats, labels, key, time.perf_counter() - t0, False, path)
    if path is not None:
        _save_cache(path, fs)
    return fs
