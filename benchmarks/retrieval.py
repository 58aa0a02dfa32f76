"""FAISS retrieval benchmark: exact Flat search against IVF and HNSW at scale.

The gallery is real features padded with synthetic ones up to ``--size`` vectors (default 1M): the real
features are a run's train-split features (``--run``) or, without a run, Fashion-MNIST pixels projected to
``--dim`` dimensions by PCA. Synthetic vectors are drawn from a Gaussian with the real features' mean and
covariance, so they crowd the same region of the sphere. Queries are real eval-split features. Everything is
L2-normalised and searched by inner product.

For every index and search setting it reports build time, queries/s, index memory (serialised size) and
recall@k against exact search (the share of the exact top-k that the index returns), as JSON + Markdown.

Example::

    python benchmarks/retrieval.py --size 100000 --queries 500
    python benchmarks/retrieval.py --run runs/simclr_resnet_fmnist-latest --indexes Flat HNSW32
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

DEFAULT_SIZE = 1_000_000
DEFAULT_QUERIES = 1000
DEFAULT_K = 10
DEFAULT_DIM = 128
DEFAULT_NPROBES = (1, 8, 32)
DEFAULT_EF_SEARCHES = (32, 64, 128)
LISTS_PER_SQRT_N = 4  # nlist ~ 4 sqrt(N), the FAISS wiki's rule of thumb
TRAIN_POINTS_PER_LIST = 64  # k-means sample per IVF list (FAISS warns below 39)
PQ_BYTES_DIVISOR = 8  # IVF,PQ with D/8 one-byte codes per vector: 32x smaller than float32


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--size", type=int, default=DEFAULT_SIZE, help="gallery vectors after padding (default 1M)")
    p.add_argument("--queries", type=int, default=DEFAULT_QUERIES, help="real eval-split queries")
    p.add_argument("--k", type=int, default=DEFAULT_K, help="neighbours compared with exact search (recall@k)")
    p.add_argument("--run", default=None, help="run directory whose cached/extracted features are the real part "
                                               "(default: Fashion-MNIST pixels, PCA to --dim)")
    p.add_argument("--dim", type=int, default=DEFAULT_DIM, help="PCA dimension of the pixel features")
    p.add_argument("--indexes", nargs="+", default=None,
                   help="FAISS factory strings (default: Flat, IVF<auto>,Flat, HNSW32, IVF<auto>,PQ<D/8>); "
                        "'auto' in IVFauto is replaced by ~4 sqrt(N)")
    p.add_argument("--nprobe", type=int, nargs="+", default=list(DEFAULT_NPROBES), help="IVF settings to time")
    p.add_argument("--ef-search", type=int, nargs="+", default=list(DEFAULT_EF_SEARCHES), help="HNSW settings")
    p.add_argument("--out", default="bench_out", help="output folder (retrieval.json, retrieval.md)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="FAISS OpenMP threads")
    return p.parse_args(argv)


def auto_nlist(n: int) -> int:
    """A power of two near ``4 sqrt(N)``."""
    return max(1, 2 ** round(math.log2(LISTS_PER_SQRT_N * math.sqrt(n))))


# ----------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------


def pixel_features(dim: int, seed: int) -> tuple[np.ndarray, np.ndarray, str]:
    """Fashion-MNIST pixels (mean-subtracted), PCA-projected to ``dim``: ``(train (60000, dim), test (10000, dim))``."""
    import sslkit.data  # noqa: F401
    from sslkit.registry import DATASETS

    train = DATASETS.build("fashion_mnist", split="train")._images.flatten(1).float() / 255.0
    test = DATASETS.build("fashion_mnist", split="test")._images.flatten(1).float() / 255.0
    mean = train.mean(0, keepdim=True)
    torch.manual_seed(seed)
    _, _, v = torch.pca_lowrank(train - mean, q=dim, center=False)  # v (784, dim)
    return ((train - mean) @ v).numpy(), ((test - mean) @ v).numpy(), f"fashion_mnist pixels, PCA {dim}"


def run_features(run: str) -> tuple[np.ndarray, np.ndarray, str]:
    """A run's train and eval-split features (from its feature cache when present)."""
    from sslkit.eval.report import load_context

    ctx = load_context(run)
    train, test = ctx.features("train"), ctx.features(ctx.eval_split)
    return train.features.numpy(), test.features.numpy(), ctx.source


def pad_with_synthetic(real: np.ndarray, size: int, seed: int) -> np.ndarray:
    """``real`` ``(N, D)`` followed by ``size - N`` Gaussian vectors with the same mean and covariance."""
    n, d = real.shape
    extra = max(0, size - n)
    if extra == 0:
        return real[:size].astype(np.float32)
    rng = np.random.default_rng(seed)
    mean = real.mean(0)
    cov = np.cov(real, rowvar=False) + 1e-6 * np.eye(d)
    chol = np.linalg.cholesky(cov)  # (D, D)
    out = np.empty((size, d), dtype=np.float32)
    out[:n] = real
    block = 1 << 16
    for start in range(n, size, block):  # blocks keep the float64 temporaries small
        m = min(block, size - start)
        out[start:start + m] = mean + rng.standard_normal((m, d)) @ chol.T
    return out


# ----------------------------------------------------------------------------------------------------------
# Benchmark
# ----------------------------------------------------------------------------------------------------------


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def time_search(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, float]:  # noqa: ANN001
    from sslkit.eval.retrieval import search

    t0 = time.perf_counter()
    _, ids = search(index, queries, k)
    return ids, time.perf_counter() - t0


def bench_index(spec: str, gallery: np.ndarray, queries: np.ndarray, exact: np.ndarray, flat_s: float,
                args: argparse.Namespace) -> list[dict[str, Any]]:
    """Build ``spec`` once and time its search at each setting; one row per setting."""
    from sslkit.eval.retrieval import (
        build_index,
        exact_overlap,
        index_memory_bytes,
        nlist_of,
        set_search_params,
    )

    nlist = nlist_of(spec)
    t0 = time.perf_counter()
    index = build_index(gallery, spec, use_gpu=False, seed=args.seed,
                        train_size=min(len(gallery), TRAIN_POINTS_PER_LIST * nlist) if nlist else None)
    build_s = time.perf_counter() - t0
    mem = index_memory_bytes(index)
    settings: list[dict[str, Any]] = [{}]
    if nlist:
        settings = [{"nprobe": p} for p in args.nprobe if p <= nlist]
    elif spec.startswith("HNSW"):
        settings = [{"ef_search": e} for e in args.ef_search if e >= args.k]
    rows = []
    for s in settings:
        set_search_params(index, **s)
        ids, search_s = time_search(index, queries, args.k)
        rows.append({"index": spec, **s, "build_seconds": round(build_s, 2),
                     "queries_per_second": round(len(queries) / search_s, 1),
                     "speedup_vs_flat": round(flat_s / search_s, 2) if spec != "Flat" else 1.0,
                     "memory_mb": round(mem / 2**20, 1) if mem is not None else None,
                     f"recall@{args.k}": round(exact_overlap(ids, exact), 2)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def markdown(meta: dict[str, Any], rows: list[dict[str, Any]], k: int) -> str:
    lines = ["# Retrieval benchmark (FAISS, inner product on L2-normalised features)", "",
             f"{meta['gallery_size']:,} gallery vectors ({meta['real_vectors']:,} real: {meta['features']}; the rest "
             f"synthetic), {meta['queries']} real queries, dim {meta['dim']}, {meta['threads']} FAISS threads, "
             f"{meta['date']}. Recall@{k} = share of the exact top-{k} returned.", "",
             f"| index | setting | build (s) | queries/s | speed-up vs Flat | memory (MB) | recall@{k} |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        setting = ", ".join(f"{key}={r[key]}" for key in ("nprobe", "ef_search") if key in r) or "-"
        lines.append(f"| {r['index']} | {setting} | {r['build_seconds']} | {r['queries_per_second']} | "
                     f"{r['speedup_vs_flat']} | {r['memory_mb']} | {r[f'recall@{k}']} |")
    lines += ["", f"Peak process memory: {meta['peak_rss_mb']:.0f} MB; total {meta['seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    import faiss

    from sslkit.eval.knn import l2_normalize
    from sslkit.run import atomic_write_bytes

    args = parse_args(argv)
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    t_start = time.perf_counter()
    train, test, source = run_features(args.run) if args.run else pixel_features(args.dim, args.seed)
    gallery = l2_normalize(pad_with_synthetic(train, args.size, args.seed))  # (size, D)
    queries = l2_normalize(test[: args.queries])  # (Q, D)
    n, d = gallery.shape
    nlist = auto_nlist(n)
    specs = args.indexes or ["Flat", "IVFauto,Flat", "HNSW32", f"IVFauto,PQ{max(1, d // PQ_BYTES_DIVISOR)}"]
    specs = [s.replace("IVFauto", f"IVF{nlist}") for s in specs]
    print(f"gallery {n:,} x {d} ({len(train):,} real), {len(queries)} queries, indexes {specs}", flush=True)

    from sslkit.eval.knn import flat_ip_index

    flat = flat_ip_index(gallery, use_gpu=False)
    exact, flat_s = time_search(flat, queries, args.k)
    rows: list[dict[str, Any]] = []
    for spec in specs:
        rows += bench_index(spec, gallery, queries, exact, flat_s, args)
    meta = {"gallery_size": n, "real_vectors": min(len(train), n), "features": source, "queries": len(queries),
            "dim": d, "k": args.k, "nlist": nlist, "threads": faiss.omp_get_max_threads(),
            "date": time.strftime("%Y-%m-%d %H:%M"), "peak_rss_mb": peak_rss_mb(),
            "seconds": time.perf_counter() - t_start, "argv": sys.argv[1:] if argv is None else argv}
    out = Path(args.out)
    atomic_write_bytes(out / "retrieval.json", json.dumps({"meta": meta, "rows": rows}, indent=2).encode())
    atomic_write_bytes(out / "retrieval.md", markdown(meta, rows, args.k).encode())
    print(markdown(meta, rows, args.k))
    print(f"wrote {out / 'retrieval.md'} and {out / 'retrieval.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
