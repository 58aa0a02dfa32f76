"""k-NN memory at scale: peak resident memory and time of the weighted k-NN for large banks.

Four ways to hold a bank of synthetic features (``--dim`` dims, 100 classes, written to a ``.npy`` file once per
size) are timed, each in its own subprocess so that its peak resident memory (``VmHWM`` from
``/proc/self/status``, the high-water mark of everything the process mapped, torch's allocations included) is
its own:

* ``faiss_fp32``: today's default search; the features are loaded into memory (as the feature cache gives them),
  centred, normalised and copied into a FAISS ``IndexFlatIP``, all in float32;
* ``chunked_fp32`` / ``chunked_fp16``: the chunked search (``sslkit.eval.knn``, module notes) over a bank held in
  memory in float32 / float16, built chunk by chunk from the feature file;
* ``disk_fp16``: the same with the float16 bank in a ``.npy`` file on disk.

Every configuration runs the headline protocol (centred on the bank mean, L2-normalised, k=20, T=0.07) on the
same queries, so their top-1 figures should agree. ``baseline_mb`` is the memory after imports and after loading
queries and labels; ``peak_mb`` the high-water mark over the whole k-NN.

    python benchmarks/knn_memory.py --sizes 100000 1000000 --dim 384 --queries 1000 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from time_to_accuracy import cpu_model  # benchmarks/ is on sys.path as a script

CONFIGS = {  # name -> knn_classify options (None: the default FAISS search on in-memory features)
    "faiss_fp32": None,
    "chunked_fp32": {"bank_dtype": "float32", "bank_on_disk": False},
    "chunked_fp16": {"bank_dtype": "float16", "bank_on_disk": False},
    "disk_fp16": {"bank_dtype": "float16", "bank_on_disk": True},
}
NUM_CLASSES = 100
NOISE = 4.0  # within-class spread relative to the unit-variance class centres: k-NN well below 100%
GEN_CHUNK = 65536
K, TEMPERATURE = 20, 0.07


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000], help="bank sizes (rows)")
    p.add_argument("--dim", type=int, default=384, help="feature dimension (ViT-S: 384)")
    p.add_argument("--queries", type=int, default=1000, help="query features")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    p.add_argument("--chunk-size", type=int, default=None, help="bank rows per chunk (default: the library's)")
    p.add_argument("--threads", type=int, default=None, help="torch / FAISS threads in each worker (default: all)")
    p.add_argument("--tmp", default=None, help="folder for the synthetic feature files (default: system temp)")
    p.add_argument("--out", default="bench_out", help="folder for knn_memory_<cpu>.{json,md}")
    p.add_argument("--merge", action="store_true",
                   help="keep the rows of an existing OUT/knn_memory_<cpu>.json for the sizes and configurations "
                        "not measured now")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one configuration, JSON out
    p.add_argument("--data", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def vm_kb(field: str) -> int:
    """A ``/proc/self/status`` memory field (``VmHWM``, ``VmRSS``) in kB; 0 where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_family_model() -> str:
    """``family F, model M`` from /proc/cpuinfo (tells CPU generations apart when the model name does not)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().split("\n\n")[0].splitlines()
        info = {k.strip(): v.strip() for k, v in (line.split(":", 1) for line in lines if ":" in line)}
        return f"family {info['cpu family']}, model {info['model']}"
    except (OSError, KeyError):
        return "unknown"


def synthetic_data(folder: Path, rows: int, dim: int, queries: int, seed: int = 0) -> Path:
    """Write bank features (``bank.npy``, chunk by chunk), bank labels, query features and labels under
    ``folder``: Gaussian classes around random centres."""
    from sslkit.eval.knn import write_npy_chunks

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((NUM_CLASSES, dim)).astype(np.float32)
    labels = rng.integers(0, NUM_CLASSES, size=rows + queries)

    def draw(y: np.ndarray) -> np.ndarray:
        return centres[y] + NOISE * rng.standard_normal((len(y), dim), dtype=np.float32) + 1.0  # offset: centring matters

    folder.mkdir(parents=True, exist_ok=True)
    write_npy_chunks(folder / "bank.npy", (rows, dim), np.float32,
                     (draw(labels[s:min(s + GEN_CHUNK, rows)]) for s in range(0, rows, GEN_CHUNK)))
    np.save(folder / "bank_labels.npy", labels[:rows])
    np.save(folder / "queries.npy", draw(labels[rows:]))
    np.save(folder / "query_labels.npy", labels[rows:])
    return folder


def worker(config: str, data: Path, chunk_size: int | None, threads: int | None) -> dict[str, Any]:
    """One configuration in this process: the k-NN and its memory high-water mark."""
    import torch

    from sslkit.eval import knn as knn_mod
    from sslkit.eval.knn import DiskArray, knn_classify

    if threads:
        import faiss

        torch.set_num_threads(threads)
        faiss.omp_set_num_threads(threads)
    bank_y = torch.from_numpy(np.load(data / "bank_labels.npy"))
    queries = torch.from_numpy(np.load(data / "queries.npy"))
    query_y = torch.from_numpy(np.load(data / "query_labels.npy"))
    options = CONFIGS[config]
    # Warm up on a tiny bank (thread pools, BLAS buffers), then restart the high-water mark where possible
    # (Linux: "5" in clear_refs), so that the peak is the search's own.
    tiny = torch.randn(64, queries.shape[1])
    knn_classify(tiny, bank_y[:64], queries[:8], query_y[:8], k=K, center=True,
                 **({} if options is None else {**options, "bank_dir": data}))
    try:
        Path("/proc/self/clear_refs").write_text("5")
        reset = True
    except OSError:
        reset = False
    baseline = vm_kb("VmRSS")
    t0 = time.perf_counter()
    if options is None:
        bank = torch.from_numpy(np.load(data / "bank.npy"))  # the features in memory, as the cache gives them
        knn_mod.AUTO_CHUNKED_BYTES = float("inf")  # keep today's FAISS search at every size (auto would chunk)
        kw: dict[str, Any] = {}
    else:
        bank = DiskArray(data / "bank.npy")
        kw = {**options, "bank_chunk_size": chunk_size, "bank_dir": data}
    res = knn_classify(bank, bank_y, queries, query_y, k=K, temperature=TEMPERATURE, center=True,
                       num_classes=NUM_CLASSES, **kw)
    seconds = time.perf_counter() - t0
    return {"config": config, "rows": len(bank_y), "dim": int(queries.shape[1]), "queries": len(query_y),
            "top1": res["top1"], "top5": res["top5"], "seconds": round(seconds, 2),
            "baseline_mb": round(baseline / 1024, 1), "peak_mb": round(vm_kb("VmHWM") / 1024, 1),
            "bank_fp32_mb": round(len(bank_y) * queries.shape[1] * 4 / 2**20, 1), "peak_reset": reset,
            "load_average_1min": round(os.getloadavg()[0], 2)}  # a shared machine slows every row alike


def run_config(config: str, data: Path, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--worker", config, "--data", str(data)]
    cmd += ["--chunk-size", str(args.chunk_size)] if args.chunk_size else []
    cmd += ["--threads", str(args.threads)] if args.threads else []
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    row = json.loads(done.stdout.strip().splitlines()[-1])
    row["growth_mb"] = round(row["peak_mb"] - row["baseline_mb"], 1)
    return row


def markdown(meta: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    lines = [f"# k-NN memory: {meta['cpu']} ({meta['cpu_family_model']}, {meta['cores']} cores)", "",
             f"Synthetic features ({meta['dim']} dims, {NUM_CLASSES} classes), {meta['queries']} queries, headline "
             f"protocol (centred, k={K}, T={TEMPERATURE}); torch {meta['torch']}, {meta['threads']} threads; "
             f"{meta['date']}. Peak = VmHWM of a fresh process per row; growth = peak minus the memory after "
             "imports, queries and labels. Times depend on what else the machine ran (load average per row).", "",
             "| bank rows | bank fp32 (MB) | configuration | peak RSS (MB) | growth (MB) | time (s) | load | top-1 % |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['rows']:,} | {r['bank_fp32_mb']:.0f} | {r['config']} | {r['peak_mb']:.0f} | "
                     f"{r['growth_mb']:.0f} | {r['seconds']:.1f} | {r.get('load_average_1min', '')} | {r['top1']:.2f} |")
    lines += [*(["", f"Note: {meta['note']}"] if meta.get("note") else []), "", "Commands:", "",
              *(f"    {c}" for c in meta["commands"]), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args.worker, Path(args.data), args.chunk_size, args.threads)))
        return 0
    import torch
    from tqdm.auto import tqdm

    from sslkit.run import atomic_write_bytes

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="knn-memory-", dir=args.tmp) as tmp:
        for size in args.sizes:
            data = synthetic_data(Path(tmp) / str(size), size, args.dim, args.queries)
            for config in tqdm(args.configs, desc=f"{size:,} rows", unit="config"):
                rows.append(run_config(config, data, args))
                print(json.dumps(rows[-1]), flush=True)
            for f in data.iterdir():
                f.unlink()
    cpu = cpu_model()
    out = Path(args.out)
    tag = "".join(c if c.isalnum() else "_" for c in cpu.lower()).strip("_")[:40] or "cpu"
    command = "python benchmarks/knn_memory.py " + " ".join(argv or sys.argv[1:])
    commands = [command]
    if args.merge and (out / f"knn_memory_{tag}.json").is_file():
        old = json.loads((out / f"knn_memory_{tag}.json").read_text())
        fresh = {(r["rows"], r["config"]) for r in rows}
        rows = [r for r in old["rows"] if (r["rows"], r["config"]) not in fresh] + rows
        commands = [*old["meta"].get("commands", [old["meta"].get("command", "")]), command]
    rows.sort(key=lambda r: (r["rows"], list(CONFIGS).index(r["config"])))
    meta = {"cpu": cpu, "cpu_family_model": cpu_family_model(), "cores": os.cpu_count(), "threads": args.threads or torch.get_num_threads(),
            "torch": torch.__version__, "dim": args.dim, "queries": args.queries,
            "date": time.strftime("%Y-%m-%d"), "commands": commands}
    atomic_write_bytes(out / f"knn_memory_{tag}.json", (json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n").encode())
    atomic_write_bytes(out / f"knn_memory_{tag}.md", markdown(meta, rows).encode())
    print(markdown(meta, rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
