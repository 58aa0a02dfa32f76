"""Training checkpoints: everything needed to continue bit-exactly on CPU, written atomically, loaded safely.

A checkpoint holds the objective's state (teacher, center, ...), the optimiser, the step and the position in the
epoch, the RNG state of every rank, the resolved recipe and what the callbacks add (the time budget's fitted
total, the training seconds so far). Under ``trainer.strategy: fsdp`` the objective and optimiser live in a
distributed checkpoint folder beside it (:mod:`sslkit.engine.fsdp`), which ``last.ckpt`` names under ``sharded``;
``last.ckpt`` is written after that folder is complete. It is written to a temporary file and renamed, so a reader, or a run killed
while writing, sees the old checkpoint or the new one; it is loaded with ``weights_only=True``, so pickled code
in a tampered file is never run.
"""

from __future__ import annotations

import io
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sslkit.run import RunError, atomic_write_bytes

CHECKPOINT_VERSION = 1


def rng_state() -> dict[str, Any]:
    """This process's torch, numpy, Python (and CUDA) RNG states as weights-only-loadable values."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    random.setstate(_tuplify(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _tuplify(x: Any) -> Any:
    return tuple(_tuplify(v) for v in x) if isinstance(x, list | tuple) else x


def write_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Serialise ``state`` and write it atomically; a failure names the fix and leaves the previous file intact."""
    buf = io.BytesIO()
    torch.save({"format": "sslkit", "version": CHECKPOINT_VERSION, **state}, buf)
    try:
        atomic_write_bytes(path, buf.getvalue())
    except OSError as e:
        raise RunError(f"could not write checkpoint at step {state.get('step')} to {path.parent}: {e}. The previous "
                       "checkpoint is intact; free disk space or fix permissions, then resume.") from e


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a training checkpoint safely (``weights_only=True``: tensors and plain containers only)."""
    p = Path(path)
    if not p.is_file():
        raise RunError(f"checkpoint {p} does not exist.")
    try:
        ckpt = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - UnpicklingError, RuntimeError for truncated zip, ...
        raise RunError(
            f"refusing to load checkpoint {p}: it is not a plain weights checkpoint ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:300]}). sslkit loads checkpoints with weights_only=True, so pickled code "
            "is never run; a truncated file also ends here. Use the run's previous checkpoint or re-export it."
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != "sslkit" or not ("objective" in ckpt or "sharded" in ckpt):
        raise RunError(f"{p} is not an sslkit training checkpoint (no 'format: sslkit' / 'objective' entries).")
    if "sharded" in ckpt:  # trainer.strategy=fsdp: weights and optimiser in the distributed checkpoint it names
        from sslkit.engine.fsdp import sharded_dir

        ckpt["sharded"] = sharded_dir(p.parent, ckpt["sharded"])
        ckpt.setdefault("optimizer", None)
    return ckpt
