"""Streaming shards: images packed into tar files (the webdataset format) with a JSON index.

``sslkit data pack`` (:func:`pack`) writes ``OUT/shard-000000.tar, ...`` and ``OUT/index.json``. Each sample is
two tar members, ``<key>.<ext>`` (the image file's own bytes, or a PNG for in-memory datasets) and ``<key>.cls``
(the label as text), so any webdataset reader can read the shards too.

The ``shards`` dataset reads them. Training walks the shards in a per-epoch order (:meth:`ShardDataset.epoch_order`):
the shards are shuffled from (seed, epoch), taken ``shuffle_window`` at a time, and the samples of a window are
shuffled together. So at any moment every process reads the same few shards, sequentially, and touches only its
own samples' bytes. The split is the engine's :class:`~sslkit.data.loader.ResumableBatchSampler`: rank r (over all
nodes) takes every world-th batch of that order, and the DataLoader hands batch k to worker k mod workers. No
sample is read twice in an epoch and none is lost, except the tail that does not fill a global batch (fewer than
``batch_size x world`` samples, a different one each epoch). A resumed run skips the batches already done
without reading them, and continues at the exact sample.
"""

from __future__ import annotations

import bisect
import io
import json
import os
import re
import sys
import tarfile
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sslkit.data.base import DataError, ImageDataset, TensorImageDataset
from sslkit.registry import DATASETS

INDEX_FORMAT = "sslkit-shards"
INDEX_VERSION = 1
INDEX_NAME = "index.json"
SHARD_PATTERN = "shard-{:06d}.tar"
MAX_MEMBER_BYTES = 256 * 2**20  # a bigger tar member is a damaged or hostile shard, not an image
_SHARD_NAME = re.compile(r"^[A-Za-z0-9._-]+\.tar$")


@dataclass
class PackReport:
    """What :func:`pack` wrote: the index path, the sample and shard counts, and the files it skipped."""

    index: Path
    samples: int
    shards: int
    classes: list[str]
    skipped: list[str] = field(default_factory=list)


def _png_bytes(image: torch.Tensor) -> bytes:
    """uint8 ``(C, H, W)`` -> PNG bytes (grayscale when the channels are equal)."""
    from PIL import Image

    arr = image.permute(1, 2, 0).contiguous().numpy()
    gray = arr.shape[2] == 1 or bool((arr == arr[:, :, :1]).all())
    im = Image.fromarray(arr[:, :, 0], mode="L") if gray else Image.fromarray(arr, mode="RGB")
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _sample_bytes(ds, i: int) -> tuple[bytes, str, int]:  # noqa: ANN001 - any registered dataset
    """Sample ``i`` of ``ds`` as (image bytes, extension, label). Files are packed as they are, after checking that
    they decode; in-memory images become PNG. Raises on an unreadable file."""
    files = getattr(ds, "files", None)
    if files is not None:
        from sslkit.data.image_folder import decode_image

        path = Path(files[i])
        data = path.read_bytes()
        decode_image(io.BytesIO(data))  # type: ignore[arg-type]  # PIL reads file objects too
        ext = path.suffix.lower().lstrip(".") or "img"
        return data, ext, int(ds._labels[i])
    if isinstance(ds, TensorImageDataset):
        return _png_bytes(ds._images[i]), "png", int(ds._labels[i])
    image, label = ds[i]
    return _png_bytes(image), "png", int(label)


def _close_shard(writer, buf: io.BytesIO, labels: list[int], path: Path) -> dict:  # noqa: ANN001 - a TarWriter
    """Finish a shard, write it atomically and return its index entry."""
    from sslkit.run import atomic_write_bytes

    writer.close()
    atomic_write_bytes(path, buf.getvalue())
    return {"name": path.name, "count": len(labels), "labels": list(labels)}


def pack(dataset, out: str | os.PathLike, shard_size: int = 1000, shuffle_seed: int = 0,  # noqa: ANN001
         progress: bool = True) -> PackReport:
    """Write ``dataset`` (any registered dataset; image folders keep their files' bytes) as tar shards in ``out``.

    Samples are shuffled from ``shuffle_seed`` before packing, so a shard mixes classes even when the source is
    sorted by class. Unreadable files are skipped and listed (in the report and the index). Each shard and the
    index are written atomically; the index is written last, so a folder with an index is complete.
    """
    import webdataset as wds
    from tqdm import tqdm

    from sslkit.run import atomic_write_bytes

    if shard_size <= 0:
        raise DataError(f"--shard-size must be a positive number of samples, got {shard_size}.")
    out = Path(out).expanduser()
    if (out / INDEX_NAME).exists():
        raise DataError(f"{out} already holds packed shards ({out / INDEX_NAME}); pack into a new folder or delete "
                        "that one first.")
    if len(dataset) == 0:
        raise DataError("the dataset to pack has no samples.")
    out.mkdir(parents=True, exist_ok=True)
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(shuffle_seed)).tolist()
    files = getattr(dataset, "files", None)
    shards: list[dict] = []
    skipped: list[str] = []
    buf, writer, labels, packed = io.BytesIO(), None, [], 0

    for i in tqdm(order, desc=f"packing {out.name}", unit="img", disable=not progress):
        try:
            data, ext, label = _sample_bytes(dataset, i)
        except Exception as e:  # noqa: BLE001 - any decoder or read failure is an unreadable file
            where = str(files[i]) if files is not None else f"sample {i}"
            skipped.append(where)
            tqdm.write(f"skipping unreadable image {where}: {type(e).__name__}: {str(e)[:200]}", file=sys.stderr)
            continue
        if writer is None:
            buf, labels = io.BytesIO(), []
            writer = wds.TarWriter(buf, encoder=False, mtime=0.0)  # fixed mtime: the same input packs the same bytes
        key = f"{packed:09d}"
        packed += 1
        writer.write({"__key__": key, ext: data, "cls": str(label).encode()})
        labels.append(label)
        if len(labels) == shard_size:
            shards.append(_close_shard(writer, buf, labels, out / SHARD_PATTERN.format(len(shards))))
            writer = None
    if writer is not None:
        shards.append(_close_shard(writer, buf, labels, out / SHARD_PATTERN.format(len(shards))))
    if not shards:
        raise DataError(f"no readable images to pack; all {len(skipped)} were unreadable (first: {skipped[:3]}).")
    classes = list(getattr(dataset, "classes", []) or [])
    index = {"format": INDEX_FORMAT, "version": INDEX_VERSION, "classes": classes,
             "num_samples": sum(s["count"] for s in shards), "shard_size": shard_size, "shuffle_seed": shuffle_seed,
             "shards": shards, "skipped": skipped}
    atomic_write_bytes(out / INDEX_NAME, json.dumps(index).encode())
    return PackReport(out / INDEX_NAME, index["num_samples"], len(shards), classes, skipped)


def read_index(path: Path) -> dict:
    """Load and check a shard index; the index and the shards are untrusted input."""
    try:
        index = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read shard index {path}: {e}. Pack the data again with `sslkit data pack`.") from None
    bad = f"{path} is not a valid sslkit shard index"
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
        raise DataError(f"{bad} (no 'format: {INDEX_FORMAT}'); write one with `sslkit data pack FOLDER OUT`.")
    if index.get("version") != INDEX_VERSION:
        raise DataError(f"{bad}: version {index.get('version')!r}, this sslkit reads version {INDEX_VERSION}.")
    classes, shards = index.get("classes"), index.get("shards")
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise DataError(f"{bad}: 'classes' must be a list of names.")
    if not isinstance(shards, list) or not shards:
        raise DataError(f"{bad}: 'shards' must be a non-empty list.")
    for s in shards:
        ok = isinstance(s, dict) and isinstance(s.get("name"), str) and _SHARD_NAME.match(s["name"]) \
            and isinstance(s.get("count"), int) and s["count"] > 0 and isinstance(s.get("labels"), list) \
            and len(s["labels"]) == s["count"] \
            and all(type(v) is int and (v == -1 or 0 <= v < len(classes)) for v in s["labels"])
        if not ok:
            raise DataError(f"{bad}: shard entry {str(s)[:120]} needs a plain file name ending in .tar, a positive "
                            "count and that many labels in [-1, number of classes).")
    return index


class ShardDataset(ImageDataset):
    """Samples of packed shards: ``ds[i] -> (uint8 (3, H, W), label)`` by global position ``i``.

    Each process keeps the member table of the last few shards it read (``shuffle_window + 1``), so walking
    :meth:`epoch_order` reads each shard's table once per window and then only the bytes of its own samples.
    """

    def __init__(self, index_path: Path, shuffle_window: int = 4) -> None:
        if not isinstance(shuffle_window, int) or shuffle_window < 1:
            raise DataError(f"shards: shuffle_window must be a positive number of shards, got {shuffle_window!r}.")
        self.index_path = index_path
        self.root = index_path.parent
        index = read_index(index_path)
        self.classes = index["classes"]
        self.shards = [s["name"] for s in index["shards"]]
        self.counts = [s["count"] for s in index["shards"]]
        self._labels = [v for s in index["shards"] for v in s["labels"]]
        self.starts = [0]
        for c in self.counts:
            self.starts.append(self.starts[-1] + c)
        self.shuffle_window = shuffle_window
        self.source = f"shards ({index_path})"
        self._open: OrderedDict[int, tuple[tarfile.TarFile, list[tuple[tarfile.TarInfo, tarfile.TarInfo]]]] = OrderedDict()
        self._pid = os.getpid()

    def __len__(self) -> int:
        return self.starts[-1]

    @property
    def labels(self) -> torch.Tensor:
        return torch.tensor(self._labels, dtype=torch.long)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_open"] = OrderedDict()  # open files stay with the process that opened them
        return state

    def locate(self, i: int) -> tuple[int, int]:
        """Global position -> (shard number, sample number inside the shard)."""
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} is outside the {len(self)} samples of {self.source}")
        s = bisect.bisect_right(self.starts, i) - 1
        return s, i - self.starts[s]

    def _members(self, s: int) -> list[tuple[tarfile.TarInfo, tarfile.TarInfo]]:
        if self._pid != os.getpid():  # a forked worker must not share the parent's file offsets
            self._open, self._pid = OrderedDict(), os.getpid()
        if s in self._open:
            self._open.move_to_end(s)
            return self._open[s][1]
        path = self.root / self.shards[s]
        groups: dict[str, dict[str, tarfile.TarInfo]] = {}
        tar = None
        try:
            tar = tarfile.open(path, mode="r:")  # random access: headers are read, the data is skipped by seeking
            for m in tar:
                if not m.isfile() or m.size > MAX_MEMBER_BYTES or "." not in m.name:
                    raise DataError(f"unexpected tar member {m.name!r} ({m.size} bytes)")
                key, ext = m.name.split(".", 1)
                groups.setdefault(key, {})[ext] = m
                if len(groups) > self.counts[s]:
                    raise DataError(f"more samples than the {self.counts[s]} of the index")
        except (OSError, tarfile.TarError, DataError) as e:
            if tar is not None:
                tar.close()
            raise DataError(f"cannot read shard {path}: {e}. Check the file, or pack the data again with "
                            "`sslkit data pack`.") from None
        samples = []
        for key, g in groups.items():
            image = [m for ext, m in g.items() if ext != "cls"]
            if "cls" not in g or len(image) != 1:
                tar.close()
                raise DataError(f"shard {path}: sample {key!r} needs one image and one .cls member, has "
                                f"{sorted(g)}. Pack the data again with `sslkit data pack`.")
            samples.append((image[0], g["cls"]))
        if len(samples) != self.counts[s]:
            tar.close()
            raise DataError(f"shard {path} holds {len(samples)} samples but the index says {self.counts[s]}; the "
                            "shard and its index do not match. Pack the data again with `sslkit data pack`.")
        self._open[s] = (tar, samples)
        while len(self._open) > self.shuffle_window + 1:
            self._open.popitem(last=False)[1][0].close()
        return samples

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        from sslkit.data.image_folder import decode_image

        s, j = self.locate(int(i))
        image_member, _ = self._members(s)[j]
        tar = self._open[s][0]
        f = tar.extractfile(image_member)
        data = f.read() if f is not None else b""
        try:
            image = decode_image(io.BytesIO(data))  # type: ignore[arg-type]
        except Exception as e:  # noqa: BLE001 - any decoder failure
            raise DataError(f"shard {self.root / self.shards[s]}: cannot decode {image_member.name}: {e}. Pack the "
                            "data again with `sslkit data pack`.") from None
        return image, self._labels[i]

    def epoch_order(self, g: torch.Generator) -> torch.Tensor:
        """One epoch's order of all samples, drawn from ``g``: the shards shuffled, then the samples of each
        ``shuffle_window`` consecutive shards shuffled together. Every sample appears once."""
        shard_order = torch.randperm(len(self.shards), generator=g).tolist()
        parts = []
        for w in range(0, len(shard_order), self.shuffle_window):
            members = torch.cat([torch.arange(self.starts[s], self.starts[s + 1])
                                 for s in shard_order[w:w + self.shuffle_window]])
            parts.append(members[torch.randperm(len(members), generator=g)])
        return torch.cat(parts)


def find_index(root: str | os.PathLike, split: str) -> Path:
    """``root`` is an index file, or a folder holding ``<split>/index.json`` or ``index.json``."""
    r = Path(root).expanduser()
    if r.is_file():
        return r
    for p in ([r / split / INDEX_NAME] + ([r / "val" / INDEX_NAME] if split == "test" else []) + [r / INDEX_NAME]):
        if p.is_file():
            return p
    raise DataError(f"shards: no {INDEX_NAME} at {r} (nor in {r / split}). Point data.root at the folder "
                    "`sslkit data pack` wrote, or at its index.json.")


@DATASETS.register("shards", help="tar shards written by `sslkit data pack`, streamed shard by shard (data.root)")
def shards(split: str = "train", root: str | None = None, shuffle_window: int = 4) -> ShardDataset:
    """Packed shards at ``root`` (the pack's folder, a folder with ``train/`` and ``test/`` packs, or an index).

    ``shuffle_window`` shards are shuffled together each epoch: more mixes batches better, and keeps more
    shards open per data worker.
    """
    if root is None:
        raise DataError("shards needs data.root, the folder `sslkit data pack` wrote (or its index.json).")
    return ShardDataset(find_index(root, split), shuffle_window)


def add_arguments(parser) -> None:  # noqa: ANN001 - argparse.ArgumentParser
    """``sslkit data pack`` options."""
    parser.add_argument("paths", nargs="+", metavar="PATH",
                        help="FOLDER OUT: the image folder (class sub-folders become labels) and the output folder; "
                             "with --dataset NAME, OUT alone or the dataset's ROOT and OUT")
    parser.add_argument("--dataset", metavar="NAME", help="pack a registered dataset (e.g. fashion_mnist) instead")
    parser.add_argument("--split", default="train", help="the split to pack (default: train)")
    parser.add_argument("--shard-size", type=int, default=1000,
                        help="samples per shard (default 1000); aim for shards of 100 MB to 1 GB")
    parser.add_argument("--shuffle-seed", type=int, default=0,
                        help="seed of the shuffle before packing, so each shard mixes classes (default 0)")


def run(args) -> int:  # noqa: ANN001 - argparse.Namespace
    """Pack, then print a JSON summary and a Markdown table of the result."""
    from sslkit.registry import DATASETS

    paths = list(args.paths)
    if args.dataset:
        if len(paths) > 2:
            raise DataError("with --dataset give OUT, or the dataset's ROOT and OUT.")
        root, out = (paths[0] if len(paths) == 2 else None), paths[-1]
        from sslkit.plugins import load_all

        load_all()
        dataset = DATASETS.build(args.dataset, split=args.split, root=root)
    else:
        if len(paths) != 2:
            raise DataError("sslkit data pack needs FOLDER and OUT (or --dataset NAME [ROOT] OUT).")
        root, out = paths
        dataset = DATASETS.build("image_folder", split=args.split, root=root)
    report = pack(dataset, out, shard_size=args.shard_size, shuffle_seed=args.shuffle_seed)
    summary = {"index": str(report.index), "samples": report.samples, "shards": report.shards,
               "classes": len(report.classes), "skipped": report.skipped}
    print(json.dumps(summary, indent=2))
    print(f"\n| index | samples | shards | classes | skipped |\n|---|---|---|---|---|\n"
          f"| {report.index} | {report.samples} | {report.shards} | {len(report.classes)} | {len(report.skipped)} |")
    for p in report.skipped:
        print(f"skipped unreadable: {p}")
    return 0
