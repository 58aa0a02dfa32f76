"""``metrics.csv`` and TensorBoard events of a run."""

from __future__ import annotations

import csv
import io
import resource
from pathlib import Path
from typing import Any

from sslkit.run import atomic_write_bytes


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux reports KiB


class MetricsLog:
    """``metrics.csv`` (one row per logged step, columns grow as needed) and TensorBoard events.

    On resume the rows up to the checkpoint's step are kept and TensorBoard purges the events after it, so a
    resumed run's log reads as if it had never stopped.
    """

    def __init__(self, run_dir: Path, resume_step: int | None) -> None:
        self.path = run_dir / "metrics.csv"
        self.rows: list[dict[str, Any]] = []
        if resume_step is not None and self.path.is_file():
            with self.path.open() as f:
                self.rows = [r for r in csv.DictReader(f) if int(float(r.get("step") or 0)) <= resume_step]
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=resume_step)
        except Exception:  # noqa: BLE001 - TensorBoard is optional at run time
            self.tb = None

    def log(self, step: int, values: dict[str, float]) -> None:
        self.rows.append({"step": step, **values})
        if self.tb is not None:
            for k, v in values.items():
                self.tb.add_scalar(k, v, step)

    def flush(self) -> None:
        cols: list[str] = []
        for r in self.rows:
            cols += [k for k in r if k not in cols]
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=cols)
        w.writeheader()
        w.writerows(self.rows)
        atomic_write_bytes(self.path, buf.getvalue().encode())
        if self.tb is not None:
            self.tb.flush()

    def close(self) -> None:
        self.flush()
        if self.tb is not None:
            self.tb.close()
