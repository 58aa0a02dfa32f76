"""Curation at scale: images embedded per second, and IVF search time and peak memory on a 1M-vector pool.

* Embedding: ``--images`` 28-px PNGs (Fashion-MNIST test) through the built-in copy descriptor with its 19
  views, from disk to the memory-mapped cache (decode, views, descriptor, write).
* Search: ``--vectors`` synthetic unit vectors of the descriptor's size (Gaussian clusters, so the lists are
  uneven as with real data), written to a memory map chunk by chunk, indexed with IVF
  (:func:`sslkit.curate.graph.build_chunked_index`), and ``--queries`` of them searched for their ``k`` nearest
  neighbours; the time for the whole pool is extrapolated from the queries. Peak memory is the process's max RSS.

Example::

    python benchmarks/curate_scale.py --vectors 1000000 --queries 20000
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from time_to_accuracy import cpu_model  # noqa: E402

from sslkit.curate import graph  # noqa: E402
from sslkit.curate.embed import embed_collection  # noqa: E402
from sslkit.curate.embedders import load_embedder  # noqa: E402
from sslkit.curate.plant import write_images  # noqa: E402

CLUSTERS = 1000
CHUNK = 65_536


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def embed_rate(n: int, tmp: Path) -> dict:
    from sslkit.registry import DATASETS

    ds = DATASETS.build("fashion_mnist", split="test")
    write_images(ds._images[:n, 0].numpy(), tmp / "imgs")
    emb = embed_collection(tmp / "imgs", load_embedder("builtin"), tmp / "cache", progress=True)
    return {"images": n, "seconds": emb.seconds, "images_per_s": n / emb.seconds, "views": emb.num_views,
            "dim": int(emb.vectors.shape[2])}


def synthetic_pool(path: Path, n: int, dim: int, seed: int = 0) -> np.ndarray:
    from numpy.lib.format import open_memmap

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((CLUSTERS, dim)).astype(np.float32)
    out = open_memmap(path, "w+", np.float32, (n, dim))
    for s in range(0, n, CHUNK):
        m = min(CHUNK, n - s)
        x = centres[rng.integers(0, CLUSTERS, m)] + 0.8 * rng.standard_normal((m, dim)).astype(np.float32)
        out[s:s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    out.flush()
    return np.load(path, mmap_mode="r")


def search_cost(n: int, dim: int, queries: int, k: int, spec: str | None, tmp: Path) -> dict:
    pool = synthetic_pool(tmp / "pool.npy", n, dim)
    rss0 = peak_rss_gb()
    t0 = time.perf_counter()
    index = graph.build_chunked_index(pool, spec)
    build = time.perf_counter() - t0
    q = np.ascontiguousarray(pool[:queries])
    t0 = time.perf_counter()
    for s in range(0, queries, graph.SEARCH_CHUNK):
        index.search(q[s:s + graph.SEARCH_CHUNK], k)
    search = time.perf_counter() - t0
    return {"vectors": n, "dim": dim, "index": spec or graph.auto_index_spec(n), "nprobe": graph.IVF_NPROBE,
            "build_seconds": build, "queries": queries, "k": k, "search_seconds": search,
            "queries_per_s": queries / search, "full_pool_search_seconds_extrapolated": search * n / queries,
            "peak_rss_gb": peak_rss_gb(), "peak_rss_gb_before_index": rss0}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--vectors", type=int, default=1_000_000)
    p.add_argument("--queries", type=int, default=20_000)
    p.add_argument("--k", type=int, default=graph.DEFAULT_K)
    p.add_argument("--index", default=None, help="FAISS spec (default: the automatic choice, IVF at 1M)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "curate_scale"))
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        embed = embed_rate(args.images, Path(tmp))
        search = search_cost(args.vectors, embed["dim"], args.queries, args.k, args.index, Path(tmp))
    result = {"cpu": cpu_model(), "command": "python " + " ".join(sys.argv), "embed": embed, "search": search}
    md = (f"# Curation at scale ({result['cpu']})\n\nCommand: `{result['command']}`.\n\n"
          f"| images/s embedded | views | dim | pool vectors | index | build s | queries/s | "
          f"whole-pool search s (extrapolated) | peak RSS GB |\n| --- | --- | --- | --- | --- | --- | --- | --- | --- |\n"
          f"| {embed['images_per_s']:.0f} | {embed['views']} | {embed['dim']} | {search['vectors']} | {search['index']} "
          f"| {search['build_seconds']:.1f} | {search['queries_per_s']:.0f} | "
          f"{search['full_pool_search_seconds_extrapolated']:.0f} | {search['peak_rss_gb']:.2f} |\n")
    from sslkit.curate.report import write_json
    from sslkit.run import atomic_write_bytes

    write_json(Path(args.out + ".json"), result)
    atomic_write_bytes(Path(args.out + ".md"), md.encode())
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
