"""Images named in a list file: what ``sslkit curate`` writes, read directly for pretraining.

Two formats:

* ``.txt``: one image path per line; blank lines and lines starting with ``#`` are skipped. Every image gets
  label -1 (unlabeled).
* ``.csv``: a header with a ``path`` column and, optionally, a ``label`` column (class names or numbers; an empty
  label or ``-1`` means unlabeled). Other columns (``sslkit curate`` adds its reasons and scores) are ignored.

Relative paths are resolved against the list file's folder. Images are decoded on access like ``image_folder``:
unreadable files are skipped with a warning that names them, unless ``strict``. ``preload=True`` decodes them
once into memory (same-size images; batched augmentation), see :func:`sslkit.data.image_folder.preload_dataset`.

Example recipe section::

    data: {name: image_list, root: curated/curated.txt, args: {test_list: eval/test.csv}}
"""

from __future__ import annotations

import csv
from pathlib import Path

from sslkit.data.base import DataError, ImageDataset
from sslkit.data.image_folder import ImageFolderDataset, preload_dataset
from sslkit.registry import DATASETS

UNLABELED = ("", "-1")


def read_image_list(path: str | Path) -> tuple[list[Path], list[str]]:
    """``(image paths, label strings)`` of a ``.txt`` or ``.csv`` list file (labels "" for ``.txt``)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"image list {p} does not exist or is not a file. Pass the .txt or .csv that "
                        "`sslkit curate` wrote (kept.csv, curated.txt) or one of your own.")
    base = p.parent
    files: list[Path] = []
    labels: list[str] = []
    try:
        if p.suffix.lower() == ".csv":
            with open(p, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                if reader.fieldnames is None or "path" not in reader.fieldnames:
                    raise DataError(f"image list {p} has no 'path' column in its header (found "
                                    f"{reader.fieldnames}). Add a header line 'path[,label]'.")
                for row in reader:
                    if row.get("path"):
                        files.append(base / Path(row["path"]).expanduser())
                        labels.append((row.get("label") or "").strip())
        else:
            for line in p.read_text(encoding="utf-8").splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    files.append(base / Path(line).expanduser())
                    labels.append("")
    except UnicodeDecodeError as e:
        raise DataError(f"image list {p} is not UTF-8 text ({e}); write one path per line.") from None
    if not files:
        raise DataError(f"image list {p} names no images. Write one path per line (.txt) or a 'path' column (.csv).")
    return files, labels


def _label_ids(labels: list[str]) -> tuple[list[int], list[str]]:
    """Class indices for label strings: numbers keep their value when all labels are numbers, else sorted names."""
    named = sorted({x for x in labels if x not in UNLABELED})
    if all(x.lstrip("-").isdigit() for x in named):
        ids = [int(x) if x not in UNLABELED else -1 for x in labels]
        classes = [str(k) for k in range(max(ids) + 1)] if named else []
        return ids, classes
    index = {name: k for k, name in enumerate(named)}
    return [index.get(x, -1) for x in labels], named


@DATASETS.register("image_list", help="images named in a .txt/.csv list file (what `sslkit curate` writes)")
def image_list(split: str = "train", root: str | None = None, test_list: str | None = None,
               strict: bool = False, preload: bool = False) -> ImageDataset:
    """The images of list file ``root`` (train split) or ``test_list`` (test split)."""
    path = root if split == "train" else test_list
    if path is None:
        if split == "train":
            raise DataError("image_list needs data.root, the list file (.txt or .csv) that names the images.")
        raise DataError(f"image_list has no {split} list: pass data.args.test_list=FILE, or turn off the evaluations "
                        "that read the test split (eval.final_knn=false).")
    files, label_strings = read_image_list(path)
    labels, classes = _label_ids(label_strings)
    ds = ImageFolderDataset(files, labels, classes, strict, f"image_list/{split} ({path})")
    return preload_dataset(ds) if preload else ds
