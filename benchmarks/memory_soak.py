"""Long-run memory: resident memory over 2,000 training steps with the online k-NN monitor on.

A leak (logs kept in memory, tensors held across steps, features cached per epoch) shows as steady growth
after warm-up. The figure is the growth of resident memory (this process and its loader workers) from the
end of warm-up (the first ``--warmup`` fraction of the run) to the end.

    python benchmarks/memory_soak.py --steps 2000 --out bench_out
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import tempfile
import threading
import time
from pathlib import Path

from sslkit.config import resolve
from sslkit.engine import train


def tree_rss_gb(pid: int | None = None) -> float:
    """Resident memory of a process and its children, from /proc (Linux); 0 elsewhere."""
    pid = pid or os.getpid()
    try:
        rss = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return 0.0
    return rss / 1024**3 + sum(tree_rss_gb(int(c)) for c in children)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--knn-every", type=int, default=5, help="online k-NN monitor every N epochs")
    ap.add_argument("--warmup", type=float, default=0.2, help="fraction of the run treated as warm-up")
    ap.add_argument("--out", default="bench_out")
    args = ap.parse_args()

    samples: list[tuple[float, float]] = []
    stop = threading.Event()

    def poll() -> None:
        t0 = time.perf_counter()
        while not stop.wait(0.5):
            samples.append((time.perf_counter() - t0, tree_rss_gb()))

    with tempfile.TemporaryDirectory() as tmp:
        cfg = resolve({
            "name": "soak", "output_dir": tmp,
            "data": {"name": "synthetic", "args": {"num_samples": 512, "image_size": 32}, "batch_size": 16,
                     "num_workers": 2},
            "augment": {"name": "simclr", "image_size": 32},
            "encoder": {"name": "vit_tiny_patch4_32", "depth": 2, "embed_dim": 64, "num_heads": 2},
            "objective": {"name": "simclr", "proj_hidden_dim": 64, "proj_out_dim": 32},
            "trainer": {"max_steps": args.steps, "log_every_steps": 10, "checkpoint_every_steps": 200,
                        "progress": False},
            "eval": {"knn_every": args.knn_every, "final_knn": True},
        })
        thread = threading.Thread(target=poll, daemon=True)
        thread.start()
        result = train(cfg)
        stop.set()
        thread.join()
        with open(result.run_dir / "metrics.csv") as f:
            knn_rows = sum(1 for row in csv.DictReader(f) if row.get("knn_top1"))
    t_end = samples[-1][0]
    after_warmup = [r for t, r in samples if t >= args.warmup * t_end]
    base, end, peak = after_warmup[0], after_warmup[-1], max(after_warmup)
    report = {"steps": result.steps, "wall_s": t_end, "rss_after_warmup_gb": base, "rss_end_gb": end,
              "rss_peak_after_warmup_gb": peak, "growth_pct": 100 * (end - base) / base,
              "peak_growth_pct": 100 * (peak - base) / base, "knn_monitor_every_epochs": args.knn_every,
              "monitor_rows": knn_rows, "final_knn": result.knn,
              "timeline": [(round(t, 1), round(r, 4)) for t, r in samples[:: max(1, len(samples) // 200)]]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "memory_soak.json").write_text(json.dumps(report, indent=2))
    print(json.dumps({k: v for k, v in report.items() if k != "timeline"}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
