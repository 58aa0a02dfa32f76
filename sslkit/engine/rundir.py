"""Where a run's files go: ``output_dir/name`` (numbered when taken) and the ``name-latest`` link."""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig


def new_run_dir(cfg: DictConfig) -> Path:
    """``output_dir/name``, or ``name-2``, ``name-3``... when taken."""
    root = Path(cfg.output_dir)
    d = root / cfg.name
    n = 2
    while d.exists():
        d = root / f"{cfg.name}-{n}"
        n += 1
    return d


def link_latest(run_dir: Path, name: str) -> None:
    """Point ``name-latest`` beside ``run_dir`` at it, atomically (a rename over the old link)."""
    link = run_dir.parent / f"{name}-latest"
    tmp = run_dir.parent / f".{name}-latest.tmp{os.getpid()}"
    try:
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(run_dir.name)
        os.replace(tmp, link)
    except OSError:
        pass  # a filesystem without symlinks only loses the convenience link
