"""Balanced subsets by hierarchical k-means and hierarchical sampling (Vo et al. 2024, "Automatic Data Curation for
Self-Supervised Learning: A Clustering-Based Approach").

A scraped pool is long-tailed: a few concepts fill most of it. Random sampling keeps that shape; sampling evenly
over k-means clusters does not, but k-means on long-tailed data spends its centroids on the dense concepts. The
paper's answer, built here:

1. :func:`hierarchical_kmeans`: k-means over the images (level 1), then over level 1's centroids (level 2), and so
   on, each level with fewer clusters. Optional resampling steps re-run a level's k-means on the ``resample_size``
   members nearest each centroid, which spreads the centroids more evenly over concepts.
2. :func:`hierarchical_sample`: a budget of ``size`` images is split evenly over the top clusters (a cluster
   smaller than its share gives all it has, and the rest is shared among the others, :func:`even_split`), then
   each cluster's share over its child clusters, down to level 1, whose images are drawn at random.

Without a seed set this balances what the pool holds; with one, :mod:`sslkit.curate.retrieve` pulls the pool
towards the seeds. Clustering runs on whole-image vectors of any embedder (a semantic one, a pretrained run or a
timm model, is what the paper uses; the builtin copy descriptor groups by appearance).

Example::

    levels = hierarchical_kmeans(vectors, [1500, 300, 60, 12], seed=0)  # or None: auto_clusters(len(vectors))
    rows = hierarchical_sample(levels, 2000, seed=0)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

KMEANS_ITERATIONS = 20
LEAF_SIZE = 10  # images per level-1 cluster of auto_clusters
LEVEL_RATIO = 5  # clusters of one level per cluster of the next
TOP_MIN = 10  # auto_clusters stops before a level would have fewer clusters than this


def auto_clusters(n: int) -> list[int]:
    """Cluster counts per level for ``n`` images, finest first: about ``LEAF_SIZE`` images per level-1 cluster, then
    ``LEVEL_RATIO`` times fewer clusters per level down to ``TOP_MIN`` or more (15,000 images: 1500, 300, 60, 12).
    The paper's web-scale hierarchy also narrows level by level. Level 1 costs the most (``n / LEAF_SIZE``
    centroids): for millions of images set ``clusters`` by hand."""
    levels = [max(1, n // LEAF_SIZE)]
    while levels[-1] // LEVEL_RATIO >= TOP_MIN:
        levels.append(levels[-1] // LEVEL_RATIO)
    return levels


@dataclass
class Level:
    """One level of the hierarchy: ``centroids`` ``(K, D)`` and ``assign`` ``(M,)``, the cluster of each item of the
    level below (images for level 1, level-1 clusters for level 2, ...)."""

    centroids: np.ndarray
    assign: np.ndarray


def _kmeans(x: np.ndarray, k: int, seed: int, init: np.ndarray | None = None) -> np.ndarray:
    import faiss

    km = faiss.Kmeans(x.shape[1], k, niter=KMEANS_ITERATIONS, seed=seed, verbose=False,
                      min_points_per_centroid=1, max_points_per_centroid=max(256, -(-len(x) // k)))
    km.train(np.ascontiguousarray(x, dtype=np.float32), init_centroids=init)
    return np.asarray(km.centroids, dtype=np.float32)


def _assign(x: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid (L2) of every row and the squared distance to it."""
    import faiss

    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    dist, ids = index.search(np.ascontiguousarray(x, dtype=np.float32), 1)
    return ids[:, 0].astype(np.int64), dist[:, 0]


def hierarchical_kmeans(x: np.ndarray, clusters: list[int] | tuple[int, ...] | None = None, *,
                        resample_steps: int = 0, resample_size: int | None = None, seed: int = 0,
                        progress: bool = False) -> list[Level]:
    """k-means on ``x`` ``(N, D)`` with ``clusters[0]`` clusters, then on those centroids with ``clusters[1]``, ...
    (default :func:`auto_clusters`).

    ``resample_steps``: after each level's k-means, this many times take the ``resample_size`` members nearest
    each centroid (default: the median cluster size), run k-means on them from the current centroids and assign
    every item again. Each level's cluster count is clipped to the number of items it clusters. ``progress``
    prints a line per level with its time.
    """
    import time

    clusters = auto_clusters(len(x)) if clusters is None else clusters
    if not clusters or any(int(k) < 1 for k in clusters):
        raise ValueError(f"clusters must be positive counts, one per level, got {list(clusters)}")
    levels: list[Level] = []
    items = np.ascontiguousarray(x, dtype=np.float32)
    for depth, k in enumerate(int(c) for c in clusters):
        k = min(k, len(items))
        t0 = time.perf_counter()
        centroids = _kmeans(items, k, seed + depth)
        assign, dist = _assign(items, centroids)
        for step in range(resample_steps):
            sizes = np.bincount(assign, minlength=k)
            take = resample_size or max(1, int(np.median(sizes[sizes > 0])))
            order = np.lexsort((dist, assign))  # by cluster, nearest first
            start = np.r_[0, np.cumsum(sizes)[:-1]]
            rank = np.arange(len(order)) - start[assign[order]]
            picked = order[rank < take]
            if len(picked) < k:
                break
            centroids = _kmeans(items[picked], k, seed + depth + 1000 * (step + 1), init=centroids)
            assign, dist = _assign(items, centroids)
        levels.append(Level(centroids, assign))
        if progress:
            print(f"k-means level {depth + 1}/{len(clusters)}: {k} clusters over {len(items)} "
                  f"{'images' if depth == 0 else 'centroids'}, {resample_steps} resampling steps, "
                  f"{time.perf_counter() - t0:.1f} s", flush=True)
        items = centroids
    return levels


def even_split(sizes: np.ndarray, total: int, rng: np.random.Generator) -> np.ndarray:
    """Integers ``take <= sizes`` summing to ``min(total, sizes.sum())``, as even as the sizes allow: every entry
    gets ``min(size, c)`` for the largest cap ``c`` that fits, and the remainder goes one each to entries above the
    cap, chosen at random."""
    sizes = np.asarray(sizes, dtype=np.int64)
    total = int(min(total, sizes.sum()))
    if total < 0:
        raise ValueError(f"total must be >= 0, got {total}")
    lo, hi = 0, int(sizes.max(initial=0))
    while lo < hi:  # the largest c with sum(min(sizes, c)) <= total
        mid = (lo + hi + 1) // 2
        if np.minimum(sizes, mid).sum() <= total:
            lo = mid
        else:
            hi = mid - 1
    take = np.minimum(sizes, lo)
    rest = total - int(take.sum())
    if rest:
        above = np.flatnonzero(sizes > lo)
        take[rng.choice(above, rest, replace=False)] += 1
    return take


def hierarchical_sample(levels: list[Level], size: int, *, seed: int = 0) -> np.ndarray:
    """``min(size, N)`` distinct image rows (ascending), split evenly top-down through ``levels``."""
    rng = np.random.default_rng(seed)
    n = len(levels[0].assign)
    # members[d][c]: the items of level d+1's cluster c (images for d = 0); counts[d][c]: the images under it
    members, counts = [], []
    below = np.ones(n, dtype=np.int64)
    for lv in levels:
        k = len(lv.centroids)
        order = np.argsort(lv.assign, kind="stable")
        members.append(np.split(order, np.cumsum(np.bincount(lv.assign, minlength=k))[:-1]))
        below = np.bincount(lv.assign, weights=below, minlength=k).astype(np.int64)
        counts.append(below)
    picked: list[np.ndarray] = []

    def draw(depth: int, cluster: int, budget: int) -> None:
        inside = members[depth][cluster]
        if depth == 0:
            picked.append(rng.choice(inside, budget, replace=False))
            return
        for child, share in zip(inside, even_split(counts[depth - 1][inside], budget, rng)):
            if share:
                draw(depth - 1, int(child), int(share))

    top = len(levels) - 1
    for cluster, share in enumerate(even_split(counts[top], size, rng)):
        if share:
            draw(top, cluster, int(share))
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, np.int64)
