"""The real photos that ship with scikit-learn and matplotlib: a few real images on any machine, with no download.

Used for real-image checks and demos: transfer k-NN on photo crops (``benchmarks/transfer.py``) and out-of-domain
photo crops in the curation demo's pool (:mod:`sslkit.curate.demo`).
"""

from __future__ import annotations

from pathlib import Path

from sslkit.data.base import DataError


def photo_files() -> dict[str, Path]:
    """The photos by name: ``china`` and ``flower`` (scikit-learn), ``grace_hopper`` and ``present`` (matplotlib)."""
    import matplotlib
    import sklearn

    sk = Path(sklearn.__file__).parent / "datasets" / "images"
    mpl = Path(matplotlib.get_data_path()) / "sample_data"
    files = {"china": sk / "china.jpg", "flower": sk / "flower.jpg", "grace_hopper": mpl / "grace_hopper.jpg",
             "present": mpl / "Minduka_Present_Blue_Pack.png"}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise DataError(f"sample photos not found: {', '.join(missing)}. They ship with scikit-learn and matplotlib; "
                        "reinstall those packages.")
    return files
