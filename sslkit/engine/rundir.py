"""Where a run's files go: ``output_dir/name`` (numbered when taken) and the ``name-latest`` link.

Two runs with one name may start at the same moment (a sweep, a job array): each claims its directory with an
exclusive ``mkdir``, so N concurrent runs get N directories and none writes into another's.
"""

from __future__ import annotations

import os
from pathlib import Path

from omegaconf import DictConfig

from sslkit.run import RunError

MAX_RUNS_PER_NAME = 100_000


def claim_run_dir(cfg: DictConfig) -> Path:
    """Create and return ``output_dir/name``, or ``name-2``, ``name-3``... when taken. The directory is created here
    (atomically: whoever creates it owns it), never shared with another run."""
    root = Path(cfg.output_dir)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunError(f"cannot create output_dir {root}: {e}. Choose a writable output_dir=PATH.") from None
    for n in range(1, MAX_RUNS_PER_NAME):
        d = root / (cfg.name if n == 1 else f"{cfg.name}-{n}")
        try:
            d.mkdir()
        except FileExistsError:
            continue
        except OSError as e:
            raise RunError(f"cannot create the run directory {d}: {e}. Choose a writable output_dir=PATH.") from None
        return d
    raise RunError(f"{root} already holds {MAX_RUNS_PER_NAME} runs named {cfg.name!r}; choose another name.")


def link_latest(run_dir: Path, name: str) -> None:
    """Point ``name-latest`` beside ``run_dir`` at it, atomically (a rename over the old link). A file or folder of
    that name that is not a link is left alone."""
    link = run_dir.parent / f"{name}-latest"
    if link.exists() and not link.is_symlink():
        return
    tmp = run_dir.parent / f".{name}-latest.tmp{os.getpid()}"
    try:
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(run_dir.name)
        os.replace(tmp, link)
    except OSError:
        tmp.unlink(missing_ok=True)  # a filesystem without symlinks only loses the convenience link
