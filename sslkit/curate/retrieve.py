"""DINOv2-style retrieval of pool images close to a curated seed set (Oquab et al. 2023, Sec. 3).

The pool is deduplicated first, and every pool image that duplicates a seed or evaluation image is dropped
(:func:`sslkit.curate.dedup.dedup`). Then, on whole-image vectors:

* ``sample``: the ``per_seed`` nearest pool images of every seed image;
* ``cluster``: FAISS spherical k-means over the pool; every seed image selects its ``clusters_per_seed``
  nearest centroids, and all pool images of the selected clusters are retrieved.

Example::

    res = retrieve(seed_emb, pool_emb, mode="sample", per_seed=4)
    [pool_emb.files[r] for r in res.rows]
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from sslkit.curate import graph
from sslkit.curate.dedup import DedupResult, dedup
from sslkit.curate.embed import Embeddings

MODES = ("sample", "cluster")
DEFAULT_PER_SEED = 4
DEFAULT_CLUSTERS = 100
DEFAULT_CLUSTERS_PER_SEED = 1
KMEANS_ITERATIONS = 20
KMEANS_MAX_POINTS_PER_CENTROID = 256  # FAISS subsamples the training set to this many points per centroid


@dataclass
class RetrieveResult:
    rows: np.ndarray  # retrieved pool rows, best score first
    scores: np.ndarray  # cosine to the nearest seed image (sample) or to the cluster centroid (cluster)
    sources: np.ndarray  # seed row (sample) or cluster id (cluster) that brought each row in
    pool_dedup: DedupResult
    settings: dict = field(default_factory=dict)


def _sample_based(seed_vecs: np.ndarray, pool_vecs: np.ndarray, per_seed: int,
                  index: str | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    idx = graph.build_chunked_index(pool_vecs, index)
    sims, ids = idx.search(seed_vecs, min(per_seed, len(pool_vecs)))  # (S, per_seed)
    best: dict[int, tuple[float, int]] = {}
    for s_row, (row_sims, row_ids) in enumerate(zip(sims.tolist(), ids.tolist())):
        for sim, j in zip(row_sims, row_ids):
            if j >= 0 and sim > best.get(j, (-2.0, -1))[0]:
                best[j] = (sim, s_row)
    order = sorted(best, key=lambda j: -best[j][0])
    return (np.array(order, np.int64), np.array([best[j][0] for j in order], np.float32),
            np.array([best[j][1] for j in order], np.int64))


def _cluster_based(seed_vecs: np.ndarray, pool_vecs: np.ndarray, clusters: int, clusters_per_seed: int,
                   seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    import faiss

    k = max(1, min(clusters, len(pool_vecs)))
    km = faiss.Kmeans(pool_vecs.shape[1], k, niter=KMEANS_ITERATIONS, seed=seed, spherical=True,
                      max_points_per_centroid=KMEANS_MAX_POINTS_PER_CENTROID, verbose=False)
    km.train(pool_vecs)
    centroids = faiss.IndexFlatIP(pool_vecs.shape[1])
    centroids.add(km.centroids)
    sims, assign = centroids.search(pool_vecs, 1)  # (P, 1)
    _, chosen = centroids.search(seed_vecs, min(clusters_per_seed, k))  # (S, c)
    wanted = np.isin(assign[:, 0], np.unique(chosen))
    rows = np.flatnonzero(wanted)
    order = np.argsort(-sims[rows, 0], kind="stable")
    return rows[order], sims[rows[order], 0], assign[rows[order], 0].astype(np.int64)


def retrieve(seed_set: Embeddings, pool: Embeddings, *, mode: str = "sample", per_seed: int = DEFAULT_PER_SEED,
             clusters: int = DEFAULT_CLUSTERS, clusters_per_seed: int = DEFAULT_CLUSTERS_PER_SEED,
             evals: list[Embeddings] | tuple = (), threshold: float = graph.DEFAULT_THRESHOLD,
             k: int = graph.DEFAULT_K, keep: str = "largest", link: str = "components", index: str | None = None,
             seed: int = 0,
             seed_features: np.ndarray | None = None, pool_features: np.ndarray | None = None,
             verify_threshold: float | None = None, progress: bool = True) -> RetrieveResult:
    """Retrieve pool images near the seed set, after deduplicating the pool against itself, the seeds and ``evals``.

    ``seed_features`` / ``pool_features`` ``(S, D)`` / ``(P, D)`` unit rows, if given, are used for the retrieval
    instead of the whole-image copy vectors (e.g. features of a pretrained run: semantic, not copy-grade).
    """
    if mode not in MODES:
        raise ValueError(f"retrieval mode must be one of {MODES}, got {mode!r}")
    cleaned = dedup(pool, threshold=threshold, k=k, keep=keep, link=link, index=index, against=[seed_set, *evals],
                    verify_threshold=verify_threshold, progress=progress)
    avail = cleaned.kept
    seeds_ok = np.flatnonzero(seed_set.ok)
    seed_vecs = seed_set.full_view(seeds_ok) if seed_features is None else seed_features[seeds_ok]
    pool_vecs = pool.full_view(avail) if pool_features is None else pool_features[avail]
    seed_vecs = np.ascontiguousarray(seed_vecs, dtype=np.float32)
    pool_vecs = np.ascontiguousarray(pool_vecs, dtype=np.float32)
    if len(avail) == 0 or len(seeds_ok) == 0:
        empty = np.zeros(0, np.int64)
        return RetrieveResult(empty, np.zeros(0, np.float32), empty, cleaned, {"mode": mode})
    if mode == "sample":
        rows, scores, src = _sample_based(seed_vecs, pool_vecs, per_seed, index)
        src = seeds_ok[src]
    else:
        rows, scores, src = _cluster_based(seed_vecs, pool_vecs, clusters, clusters_per_seed, seed)
    settings = {"mode": mode, "per_seed": per_seed, "clusters": clusters, "clusters_per_seed": clusters_per_seed,
                "seed": seed, **{f"dedup_{key}": v for key, v in cleaned.settings.items()}}
    return RetrieveResult(avail[rows], scores, src, cleaned, settings)
