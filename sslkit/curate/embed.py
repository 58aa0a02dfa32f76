"""Stream embeddings of an image collection to memory-mapped files, in chunks, resumable.

A collection (a folder searched recursively, or a ``.txt`` / ``.csv`` list file) is embedded into a cache
folder that belongs to (collection, embedder, views)::

    <cache>/<digest>/
        manifest.json     paths, sizes and mtimes of the images, the embedder key and the view boxes
        embeddings.npy    (N, V, D) float16, memory-mapped: V views per image (view 0 = the whole image)
        status.npy        (N,) uint8: 0 = to do, 1 = embedded, 2 = unreadable
        dims.npy          (N, 2) int32: width and height of each image (the keep rule uses them)
        bad.json          {path: reason} of the unreadable images
    <cache>/<digest>.verify/
        self-<settings>/, <other digest>-<settings>/   verified pair scores of this collection against itself
                                 and against others (:class:`sslkit.curate.verify.ScoreCache`)

Rows are written chunk by chunk and ``status`` is flushed after the rows, so an interrupted run resumes with
the first chunk that is not done. A second run compares each image's size and mtime with the manifest: changed,
added and removed images are reported (:class:`Changes`), unchanged rows are reused and only the rest is embedded.
Memory stays bounded by one chunk of images and views.

Views: an image is resized to a square canvas, then cut into the view boxes (:func:`view_boxes`) with
``roi_align``; every view is scaled to the embedder's input size. Sub-windows let a copy cropped to half of
its source's area meet the source's matching window.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from sslkit.curate.embedders import Embedder
from sslkit.data.base import DataError
from sslkit.data.image_folder import IMAGE_EXTENSIONS, decode_image
from sslkit.data.image_list import read_image_list

CHUNK_SIZE = 2048  # images embedded (and flushed) at a time
CANVAS_MIN = 64  # images are resized to a square of at least this side before the views are cut
CROP_SIDES = (0.8, 0.7)  # side lengths (fraction of the image) of the sub-window views
CROP_STEP = 0.15  # at most this far (fraction of the image) between neighbouring sub-windows
STATUS_TODO, STATUS_OK, STATUS_BAD = 0, 1, 2
MANIFEST_VERSION = 1


def view_boxes(crop_sides: tuple[float, ...] = CROP_SIDES, step: float = CROP_STEP) -> list[tuple[float, float, float]]:
    """``(top, left, side)`` fractions: the whole image, then a grid of square windows per side length."""
    boxes = [(0.0, 0.0, 1.0)]
    for side in crop_sides:
        if not 0.0 < side < 1.0:
            raise ValueError(f"crop sides must lie in (0, 1), got {side}")
        n = math.ceil(round((1.0 - side) / step, 6)) + 1
        offsets = np.linspace(0.0, 1.0 - side, n)
        boxes += [(float(t), float(u), side) for t in offsets for u in offsets]
    return boxes


def make_views(images: list[torch.Tensor], boxes: list[tuple[float, float, float]], size: int) -> torch.Tensor:
    """``len(images) * len(boxes)`` views, image-major: float ``(B * V, 3, size, size)`` in [0, 1]."""
    from torchvision.ops import roi_align

    canvas = max(CANVAS_MIN, 2 * size)
    squares = torch.stack([F.interpolate(im[None].float() / 255.0, size=(canvas, canvas), mode="bilinear",
                                         antialias=True, align_corners=False)[0] for im in images])  # (B, 3, c, c)
    rel = torch.tensor([[u, t, u + s, t + s] for t, u, s in boxes], dtype=torch.float32) * canvas  # (V, 4) x1y1x2y2
    rois = [rel for _ in images]
    # sampling_ratio 0 = adaptive: each output cell averages the canvas pixels under it (an area resize).
    return roi_align(squares, rois, output_size=size, spatial_scale=1.0, sampling_ratio=0, aligned=True)


def list_images(source: str | Path) -> list[Path]:
    """Images of a folder (recursively, sorted) or of a ``.txt`` / ``.csv`` list file."""
    p = Path(source).expanduser()
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise DataError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {p}.")
        return [f.resolve() for f in files]
    if p.is_file():
        return [f.resolve() for f in read_image_list(p)[0]]
    raise DataError(f"{p} is neither a folder of images nor a list file (.txt or .csv).")


def stat_files(files: list[Path]) -> tuple[list[int], list[int]]:
    """Sizes and mtimes (ns) of ``files``; -1 for a file that cannot be stat'ed (it is reported when read)."""
    sizes, mtimes = [], []
    for f in files:
        try:
            st = f.stat()
            sizes.append(int(st.st_size))
            mtimes.append(int(st.st_mtime_ns))
        except OSError:
            sizes.append(-1)
            mtimes.append(-1)
    return sizes, mtimes


@dataclass
class Changes:
    """How a collection differs from the one cached last time (empty on a first run)."""

    added: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    modified: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.added or self.removed or self.modified)

    def summary(self) -> str:
        parts = [f"{len(v)} {k}" + (f" (e.g. {v[0]})" if v else "") for k, v in
                 (("modified", self.modified), ("added", self.added), ("removed", self.removed)) if v]
        return "the images changed since the last run: " + ", ".join(parts) + "; only those are embedded again."


@dataclass
class Embeddings:
    """A collection's embeddings. ``vectors`` is the read-only memory map ``(N, V, D)`` float16."""

    files: list[Path]
    vectors: np.ndarray
    ok: np.ndarray  # (N,) bool: embedded (False = unreadable)
    dims: np.ndarray  # (N, 2) int32 width, height
    sizes: np.ndarray  # (N,) int64 file sizes in bytes
    bad: dict[str, str]
    changes: Changes
    computed: int  # images embedded by this call (the rest came from the cache)
    seconds: float
    cache_dir: Path
    mtimes: np.ndarray | None = None  # (N,) int64 modification times (ns), -1 where a file cannot be stat'ed

    @functools.cached_property
    def stamps(self) -> np.ndarray | None:
        """``(N,)`` uint64 digest of each image's path, size and mtime; None without mtimes."""
        if self.mtimes is None:
            return None
        return np.array([int.from_bytes(hashlib.blake2b(f"{f}|{s}|{m}".encode(), digest_size=8).digest(), "little")
                         for f, s, m in zip(map(str, self.files), self.sizes.tolist(), self.mtimes.tolist())],
                        dtype=np.uint64)

    @property
    def num_views(self) -> int:
        return int(self.vectors.shape[1])

    def full_view(self, rows: np.ndarray | slice = slice(None)) -> np.ndarray:
        """float32 ``(n, D)`` whole-image vectors of ``rows``."""
        return np.ascontiguousarray(self.vectors[rows, 0], dtype=np.float32)


def _digest(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _write_json(path: Path, payload: object) -> None:
    from sslkit.run import atomic_write_bytes

    atomic_write_bytes(path, json.dumps(payload).encode())


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _open_arrays(d: Path, n: int, v: int, dim: int, mode: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    from numpy.lib.format import open_memmap

    if mode == "w+":
        d.mkdir(parents=True, exist_ok=True)
        return (open_memmap(d / "embeddings.npy", "w+", np.float16, (n, v, dim)),
                open_memmap(d / "status.npy", "w+", np.uint8, (n,)),
                open_memmap(d / "dims.npy", "w+", np.int32, (n, 2)))
    return (open_memmap(d / "embeddings.npy", mode), open_memmap(d / "status.npy", mode),
            open_memmap(d / "dims.npy", mode))


def _reuse_previous(old_dir: Path, old: dict, new_dir: Path, files: list[Path], sizes: list[int], mtimes: list[int],
                    shape: tuple[int, int, int]) -> Changes:
    """Start ``new_dir`` for this collection, copying the rows of images unchanged since ``old``."""
    old_rows = {p: i for i, p in enumerate(old["files"])}
    changes = Changes()
    emb, status, dims = _open_arrays(new_dir, *shape, "w+")
    try:
        o_emb, o_status, o_dims = _open_arrays(old_dir, 0, 0, 0, "r")
        compatible = o_emb.shape[1:] == shape[1:]
    except (OSError, ValueError):
        compatible = False
    bad_old = _read_json(old_dir / "bad.json") or {}
    bad: dict[str, str] = {}
    for i, f in enumerate(map(str, files)):
        j = old_rows.get(f)
        if j is None:
            changes.added.append(f)
        elif (old["sizes"][j], old["mtimes"][j]) != (sizes[i], mtimes[i]):
            changes.modified.append(f)
        elif compatible and o_status[j] != STATUS_TODO:
            emb[i], status[i], dims[i] = o_emb[j], o_status[j], o_dims[j]
            if f in bad_old:
                bad[f] = bad_old[f]
    changes.removed = sorted(set(old["files"]) - set(map(str, files)))
    for a in (emb, dims, status):  # status last: a row counts as done only once its vectors are on disk
        a.flush()
    _write_json(new_dir / "bad.json", bad)
    return changes


def embed_collection(source: str | Path | list[Path], embedder: Embedder, cache_dir: str | Path, *,
                     boxes: list[tuple[float, float, float]] | None = None, chunk_size: int = CHUNK_SIZE,
                     progress: bool = True, desc: str = "embed") -> Embeddings:
    """Embed every image of ``source`` with ``embedder`` through ``boxes`` (default :func:`view_boxes`).

    Unreadable images are recorded in ``bad`` (path -> reason) and flagged in ``ok``, never raised.
    """
    import time

    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    files = source if isinstance(source, list) else list_images(source)
    boxes = view_boxes() if boxes is None else boxes
    sizes, mtimes = stat_files(files)
    shape = (len(files), len(boxes), int(embedder.dim))
    where = str(Path(source).expanduser().resolve()) if not isinstance(source, list) else [str(f) for f in files]
    home = Path(cache_dir).expanduser() / _digest(where, embedder.key, boxes, MANIFEST_VERSION)
    manifest = {"version": MANIFEST_VERSION, "embedder": embedder.key, "boxes": boxes, "shape": list(shape),
                "files": [str(f) for f in files], "sizes": sizes, "mtimes": mtimes}
    old = _read_json(home / "manifest.json")
    changes = Changes()
    if old is None or old.get("shape", [None])[1:] != list(shape[1:]) or not (home / "status.npy").is_file():
        shutil.rmtree(home, ignore_errors=True)
        _open_arrays(home, *shape, "w+")
        _write_json(home / "bad.json", {})
        _write_json(home / "manifest.json", manifest)
    elif (old["files"], old["sizes"], old["mtimes"]) != (manifest["files"], sizes, mtimes):
        staging = home.with_name(home.name + ".new")
        shutil.rmtree(staging, ignore_errors=True)
        changes = _reuse_previous(home, old, staging, files, sizes, mtimes, shape)
        _write_json(staging / "manifest.json", manifest)
        shutil.rmtree(home)
        staging.rename(home)
    emb, status, dims = _open_arrays(home, *shape, "r+")
    bad: dict[str, str] = _read_json(home / "bad.json") or {}
    todo = np.flatnonzero(status == STATUS_TODO)
    bar = tqdm(total=len(todo), desc=desc, unit="img", disable=not progress, dynamic_ncols=True)
    try:
        for start in range(0, len(todo), chunk_size):
            rows = todo[start:start + chunk_size]
            done, failed = _embed_chunk(rows, files, embedder, boxes, emb, dims, bad)
            emb.flush()
            dims.flush()
            if failed:
                _write_json(home / "bad.json", bad)
            status[done], status[failed] = STATUS_OK, STATUS_BAD  # only once the rows are on disk
            status.flush()
            bar.update(len(rows))
    finally:
        bar.close()
    del emb, status, dims
    vectors, status, dims = _open_arrays(home, 0, 0, 0, "r")
    return Embeddings(files, vectors, status == STATUS_OK, np.asarray(dims), np.asarray(sizes, dtype=np.int64),
                      bad, changes, len(todo), time.perf_counter() - t0, home, np.asarray(mtimes, dtype=np.int64))


def _embed_chunk(rows: np.ndarray, files: list[Path], embedder: Embedder, boxes: list[tuple[float, float, float]],
                 emb: np.ndarray, dims: np.ndarray, bad: dict[str, str]) -> tuple[list[int], list[int]]:
    """Embed ``rows`` into ``emb``; returns (embedded rows, unreadable rows)."""
    batch = 256
    good_rows, bad_rows, images = [], [], []
    for i in rows:
        try:
            im = decode_image(files[i])  # (3, H, W) uint8
        except Exception as e:  # noqa: BLE001 - any decoder failure is a bad file, reported by path
            bad[str(files[i])] = f"{type(e).__name__}: {e}"
            bad_rows.append(int(i))
            continue
        good_rows.append(int(i))
        images.append(im)
        dims[i] = (im.shape[2], im.shape[1])
    v = len(boxes)
    for s in range(0, len(images), batch):
        views = make_views(images[s:s + batch], boxes, embedder.image_size)  # (b * V, 3, s, s)
        out = embedder(views).reshape(-1, v, embedder.dim)  # (b, V, D)
        idx = good_rows[s:s + batch]
        emb[idx] = out.numpy().astype(np.float16)
    return good_rows, bad_rows
