"""Where a run's files go: ``output_dir/name`` (numbered when taken) and the ``name-latest`` link.

Two runs with one name may start at the same moment (a sweep, a job array): each claims its directory with an
exclusive ``mkdir``, so N concurrent runs get N directories and none writes into another's. A process training into
a run holds a lock on it (:class:`RunLock`), so ``--resume auto`` never picks a run another job is continuing.
"""

from __future__ import annotations

import os
from collections.abc import Callable
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


# --- resuming automatically: `sslkit pretrain RECIPE --resume auto` ---------------------------------------------

LOCK_FILE = ".sslkit.lock"  # inside a run directory: held (flock) by the process training into it
SLURM_HANDOFF_TIMEOUT_S = 600.0  # how long srun's other tasks wait for task 0 to choose the run directory


class RunLock:
    """An exclusive ``flock`` on ``run_dir/.sslkit.lock`` while a process trains into the run, so two jobs never
    resume one run at once. The kernel drops the lock when the process ends, however it ends (``kill -9``
    included), so no stale lock outlives a job."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> bool:
        """True when locked now; False when another process holds the lock."""
        import fcntl

        try:  # O_NOFOLLOW: a link planted in place of the lock file is refused, never followed
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            raise RunError(f"cannot open the lock file {self.path}: {e}. Remove it if it is a link, or fix the "
                           "permissions of the run directory.") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        except OSError as e:  # a filesystem without locks (some Lustre mounts): say so, go on unlocked
            print(f"note: cannot lock {self.path} ({e}); make sure no other job trains into {self.path.parent}.")
        self.fd = fd
        return True

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock
            self.fd = None


def lock_run_dir(run_dir: Path) -> RunLock:
    """Lock ``run_dir`` for this process, or raise :class:`RunError` when another process trains into it."""
    lock = RunLock(run_dir)
    if not lock.acquire():
        raise RunError(f"{run_dir} is in use: another sslkit process is training into it (it holds {lock.path}). "
                       "Wait for it to end, or start a new run without --resume.")
    return lock


def runs_of(cfg: DictConfig) -> list[Path]:
    """The run directories of the recipe's name (``name``, ``name-2``, ...), newest checkpoint first."""
    root, name = Path(cfg.output_dir), str(cfg.name)
    if not root.is_dir():
        return []
    runs = [d for d in root.iterdir() if (d.name == name or (d.name.startswith(f"{name}-")
                                                             and d.name[len(name) + 1:].isdigit()))
            and d.is_dir() and not d.is_symlink()]

    def newest(d: Path) -> tuple[int, int]:
        ckpt = d / "checkpoints" / "last.ckpt"
        number = int(d.name[len(name) + 1:] or 1) if d.name != name else 1
        return (ckpt.stat().st_mtime_ns if ckpt.is_file() else -1, number)

    return sorted(runs, key=newest, reverse=True)


def find_resumable(cfg: DictConfig, say: Callable[[str], None] = print) -> tuple[Path, dict, RunLock] | None:
    """The newest run of ``cfg.name`` in ``cfg.output_dir`` whose checkpoint loads and whose recipe matches ``cfg``
    (only ``trainer.*``, ``eval.*`` and ``data.num_workers`` may differ), locked for this process, with its
    checkpoint; ``None`` when there is none. Broken checkpoints, other recipes and runs in use by another process
    are skipped, each with a note through ``say``."""
    from sslkit.engine.checkpoint import load_checkpoint
    from sslkit.engine.loop import check_resume_config
    from sslkit.run import read_config, refuse_linked_dirs

    for d in runs_of(cfg):
        path = d / "checkpoints" / "last.ckpt"
        if not path.is_file():
            continue  # a run that has not checkpointed yet (or is not a run)
        lock = RunLock(d)
        try:
            refuse_linked_dirs(d)
            if not lock.acquire():
                say(f"note: --resume auto: skipping {d}: another process is training into it.")
                continue
            ckpt = load_checkpoint(path)
            missing = [k for k in ("step", "epoch", "batch_in_epoch", "world_size", "optimizer", "config_yaml")
                       if k not in ckpt]
            if missing:
                raise RunError(f"{path} lacks {missing}")
            check_resume_config(cfg, read_config(ckpt["config_yaml"], f"the recipe inside {path}"), path)
        except RunError as e:
            lock.release()
            say(f"note: --resume auto: skipping {d}: {e}")
            continue
        return d, ckpt, lock
    return None


def slurm_task() -> tuple[str, int] | None:
    """``(job attempt, task rank)`` when ``srun`` started several tasks of this job (one per device), else None."""
    job, procid = os.environ.get("SLURM_JOB_ID"), os.environ.get("SLURM_PROCID")
    try:
        ntasks = int(os.environ.get("SLURM_NTASKS", "1"))
    except ValueError:
        return None
    if not job or procid is None or ntasks <= 1 or not procid.isdigit():
        return None
    return f"{job}.{os.environ.get('SLURM_RESTART_COUNT', '0')}", int(procid)


def first_task() -> bool:
    """False in the tasks other than the first that ``srun`` started for this job step."""
    task = slurm_task()
    return task is None or task[1] == 0


def auto_resume(cfg: DictConfig, chosen: str | None = None,
                say: Callable[[str], None] = print) -> tuple[Path, dict | None, RunLock | None]:
    """``--resume auto``: the run to continue (:func:`find_resumable`) with its checkpoint, or a fresh run directory
    (:func:`claim_run_dir`) and None, with the run's lock. ``chosen``: the run directory a parent process already
    chose (DDP launcher children). Under ``srun`` with several tasks, task 0 chooses and writes its choice to a
    hidden file in ``output_dir``; the other tasks read it. Only the process that chose holds the lock."""
    task = slurm_task()
    if chosen or (task is not None and task[1] != 0):
        # what the first process chose; a fresh run has no checkpoint until every process has joined the group
        run_dir = Path(chosen) if chosen else _read_handoff(cfg, task[0])
        path = run_dir / "checkpoints" / "last.ckpt"
        from sslkit.engine.checkpoint import load_checkpoint

        return run_dir, load_checkpoint(path) if path.is_file() else None, None
    found = find_resumable(cfg, say)
    if found is not None:
        run_dir, ckpt, lock = found
        say(f"--resume auto: found {run_dir} at step {ckpt['step']}")
    else:
        run_dir, ckpt = claim_run_dir(cfg), None
        lock = lock_run_dir(run_dir)
        say(f"--resume auto: no checkpoint of {cfg.name!r} in {cfg.output_dir}; starting {run_dir}")
    if task is not None:
        from sslkit.run import atomic_write_bytes

        atomic_write_bytes(_handoff_path(cfg, task[0]), run_dir.name.encode())
    return run_dir, ckpt, lock


def _handoff_path(cfg: DictConfig, attempt: str) -> Path:
    return Path(cfg.output_dir) / f".{cfg.name}.slurm-{attempt}.run"


def _read_handoff(cfg: DictConfig, attempt: str) -> Path:
    import time

    path, deadline = _handoff_path(cfg, attempt), time.monotonic() + SLURM_HANDOFF_TIMEOUT_S
    while not path.is_file():
        if time.monotonic() > deadline:
            raise RunError(f"--resume auto: task 0 of SLURM job {attempt} did not choose a run directory within "
                           f"{SLURM_HANDOFF_TIMEOUT_S:.0f} s (no {path}); see its log.")
        time.sleep(0.2)
    name = path.read_text().strip()
    if name != cfg.name and not (name.startswith(f"{cfg.name}-") and name[len(cfg.name) + 1:].isdigit()):
        raise RunError(f"{path} names {name[:80]!r}, not a run of {cfg.name!r}; remove it and resubmit.")
    return Path(cfg.output_dir) / name



def finished_summary(run_dir: Path, ckpt: dict | None) -> dict | None:
    """images/s, final loss and peak memory from the run's ``summary.json`` when it says the run finished at the
    checkpoint's step, else None: ``--resume auto`` leaves a finished run as it is (to train it longer,
    ``--resume RUN_DIR trainer.epochs=...``)."""
    import json

    path = Path(run_dir) / "summary.json"
    if ckpt is None or not path.is_file() or path.is_symlink():
        return None
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(summary, dict) or summary.get("finished") is not True or summary.get("steps") != ckpt["step"]:
        return None
    return {k: float(v) if isinstance(v := summary.get(k), int | float) else float("nan")  # the file is untrusted
            for k in ("images_per_s", "final_loss", "peak_rss_gb")}
