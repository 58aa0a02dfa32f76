"""Image retrieval with FAISS: label-based metrics, approximate-index quality, and copy detection.

Features are L2-normalised and searched by inner product (= cosine). The index comes from a FAISS factory
string: ``Flat`` (exact, the default), ``IVF{nlist},Flat``, ``HNSW32``, ``IVF{nlist},PQ{m}``.

Label metrics (query set = eval split, gallery = train split), following Musgrave, Belongie and Lim,
"A Metric Learning Reality Check" (ECCV 2020):

* **mAP@R**: for a query whose label occurs ``R`` times in the gallery, retrieve ``R`` items and average
  ``P(i) * rel(i)`` over ``i = 1..R`` (divided by ``R``); then the mean over queries (queries with ``R = 0`` are
  left out).
* **R-precision**: the share of relevant items among the first ``R``.
* **recall@k**: the share of queries with at least one same-label item among the top ``k``.
* **precision@k**: the mean share of same-label items among the top ``k``.

For an approximate index, ``exact_recall@k`` is the share of the exact (Flat) top-``k`` neighbours that it
returns, and ``speedup`` the ratio of Flat's to the index's search time for the same queries.

**Copy detection** (DINO, Caron et al. 2021, Sec. 4.2.2, simplified: pooled features): queries are strongly
augmented copies of gallery images (random crop, colour jitter, blur, JPEG re-encoding); each query has one
relevant item, its source, so AP is ``1 / rank`` of the source within the retrieved list. DINO whitens the
features before the search, with a PCA learned on 20k extra unlabelled images; ``whiten=d`` does the same with
a PCA learned on the gallery itself (no labels are used), and keeps the plain figures next to the whitened ones.

Example::

    res = retrieval_metrics(test_f, test_y, train_f, train_y, index="IVF64,Flat", nprobe=8)
    res["map@r"], res["recall@1"], res["exact_recall@10"]
"""

from __future__ import annotations

import io
import re
import time
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from sslkit.eval.knn import flat_ip_index, l2_normalize, to_gpu_if_available, whiten_on

DEFAULT_INDEX = "Flat"
DEFAULT_KS = (1, 5, 10)
DEFAULT_NPROBE = 8  # IVF lists visited per query (clipped to nlist); nprobe = nlist makes IVF,Flat exact
DEFAULT_EF_SEARCH = 64  # HNSW search breadth (raised to the search depth when that is larger)
DEFAULT_EXACT_K = 10  # neighbours compared with exact search for approximate indexes
MAX_CHUNK_ENTRIES = 1 << 22  # queries x depth per search call (bounds memory for deep mAP@R searches)
PQ_MIN_TRAIN = 256  # 2^8 centroids per PQ sub-quantiser need at least this many training vectors
MISSING = -1  # FAISS's id for "no neighbour found"

# Copy-detection augmentation (strong, as in DINO's copy-detection queries)
COPY_CROP_SCALE = (0.25, 1.0)
COPY_JITTER = (0.4, 0.4, 0.4, 0.1)  # brightness, contrast, saturation, hue
COPY_JITTER_P = 0.8
COPY_BLUR_P = 0.5
COPY_BLUR_SIGMA = (0.1, 2.0)
COPY_JPEG_QUALITY = (30, 80)
DEFAULT_COPY_QUERIES = 1000
DEFAULT_COPY_DEPTH = 100  # AP of a query whose source is not in the top DEFAULT_COPY_DEPTH counts as 0


class IndexSpecError(ValueError):
    """A FAISS factory string that cannot be used with these features; the message says why."""


_SUPPORTED = (r"Flat", r"IVF\d+,Flat", r"HNSW\d+", r"IVF\d+,PQ\d+")


# ----------------------------------------------------------------------------------------------------------
# Index
# ----------------------------------------------------------------------------------------------------------


def check_index_spec(spec: str, num_items: int, dim: int) -> None:
    """Raise :class:`IndexSpecError` unless ``spec`` is supported and fits ``num_items`` vectors of ``dim``."""
    if not any(re.fullmatch(p, spec) for p in _SUPPORTED):
        raise IndexSpecError(f"index {spec!r} is not supported. Use one of: Flat, IVF<nlist>,Flat (e.g. IVF256,Flat), "
                             f"HNSW<M> (e.g. HNSW32), IVF<nlist>,PQ<m> (e.g. IVF256,PQ16).")
    ivf = re.match(r"IVF(\d+)", spec)
    if ivf and not 1 <= int(ivf.group(1)) <= num_items:
        raise IndexSpecError(f"index {spec!r} has nlist={ivf.group(1)} but the gallery holds {num_items} vectors; "
                             f"nlist must be between 1 and {num_items} (about sqrt(N) = {int(num_items ** 0.5)} is usual).")
    pq = re.search(r"PQ(\d+)", spec)
    if pq:
        m = int(pq.group(1))
        if m <= 0 or dim % m:
            raise IndexSpecError(f"index {spec!r}: PQ{m} needs the feature dimension ({dim}) to be a multiple of {m}.")
        if num_items < PQ_MIN_TRAIN:
            raise IndexSpecError(f"index {spec!r}: product quantisation needs at least {PQ_MIN_TRAIN} gallery "
                                 f"vectors to train, got {num_items}. Use Flat or IVF<n>,Flat.")


def nlist_of(spec: str) -> int | None:
    m = re.match(r"IVF(\d+)", spec)
    return int(m.group(1)) if m else None


def build_index(gallery: np.ndarray, spec: str = DEFAULT_INDEX, *, nprobe: int | None = None,
                ef_search: int = DEFAULT_EF_SEARCH, use_gpu: bool | None = None, seed: int = 0,
                train_size: int | None = None):  # noqa: ANN201
    """An inner-product FAISS index over ``gallery`` ``(N, D)`` float32 (L2-normalised by the caller).

    Args:
        spec: factory string (see module docstring).
        nprobe: IVF lists visited per query; None = ``min(DEFAULT_NPROBE, nlist)``.
        ef_search: HNSW search breadth.
        use_gpu: FAISS GPU (Flat and IVF only); None = when available.
        seed: seed of the k-means / PQ training.
        train_size: train the quantisers on a random sample of this many vectors (None = all; FAISS itself
            samples at most 256 per IVF list).
    """
    import faiss

    n, d = gallery.shape
    check_index_spec(spec, n, d)
    if spec == "Flat":
        return flat_ip_index(gallery, use_gpu)
    index = faiss.index_factory(d, spec, faiss.METRIC_INNER_PRODUCT)
    concrete = faiss.downcast_index(index)  # a second view of the same object; `index` keeps ownership
    if hasattr(concrete, "do_polysemous_training"):
        # Polysemous codes only serve Hamming-filtered search, which is not used here, and their training
        # takes seconds even on a few hundred vectors.
        concrete.do_polysemous_training = False
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.cp.seed = seed
        ivf.nprobe = min(nprobe or DEFAULT_NPROBE, ivf.nlist)
    if not index.is_trained:
        sample = gallery
        if train_size is not None and train_size < n:
            rows = np.random.default_rng(seed).choice(n, size=train_size, replace=False)
            sample = np.ascontiguousarray(gallery[np.sort(rows)])
        index.train(sample)
    if not spec.startswith("HNSW"):
        index = to_gpu_if_available(index, use_gpu)
    index.add(gallery)
    set_search_params(index, nprobe=nprobe, ef_search=ef_search)
    return index


def set_search_params(index, *, nprobe: int | None = None, ef_search: int | None = None) -> None:  # noqa: ANN001
    """Set ``nprobe`` (IVF, clipped to nlist) and ``efSearch`` (HNSW) where the index has them."""
    import faiss

    if nprobe is not None and hasattr(index, "nprobe"):
        index.nprobe = min(int(nprobe), int(getattr(index, "nlist", nprobe)))
    elif nprobe is not None:
        ivf = faiss.try_extract_index_ivf(index)
        if ivf is not None:
            ivf.nprobe = min(int(nprobe), ivf.nlist)
    if ef_search is not None and hasattr(index, "hnsw"):
        index.hnsw.efSearch = int(ef_search)


def iter_search(index, queries: np.ndarray, depth: int, *,
                chunk_entries: int = MAX_CHUNK_ENTRIES) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:  # noqa: ANN001
    """Yield ``(start, sims (q, depth), ids (q, depth))`` for chunks of ``chunk_entries // depth`` queries.

    ``depth`` is clipped to the index size; missing neighbours have id -1. An HNSW index's ``efSearch`` is
    raised to ``depth`` when it is smaller (HNSW returns at most efSearch results).
    """
    depth = max(1, min(depth, int(index.ntotal)))
    ef_before = index.hnsw.efSearch if hasattr(index, "hnsw") else None
    if ef_before is not None and ef_before < depth:
        index.hnsw.efSearch = depth
    chunk = max(1, chunk_entries // depth)
    try:
        for start in range(0, len(queries), chunk):
            sims, ids = index.search(np.ascontiguousarray(queries[start:start + chunk]), depth)
            yield start, sims, ids
    finally:
        if ef_before is not None:
            index.hnsw.efSearch = ef_before


def search(index, queries: np.ndarray, depth: int, *,
           chunk_entries: int = MAX_CHUNK_ENTRIES) -> tuple[np.ndarray, np.ndarray]:  # noqa: ANN001
    """Top-``depth`` neighbours of ``queries`` ``(Q, D)``: ``(sims (Q, depth) float32, ids (Q, depth) int64)``."""
    parts = list(iter_search(index, queries, depth, chunk_entries=chunk_entries))
    if not parts:
        d = max(1, min(depth, int(index.ntotal)))
        return np.zeros((0, d), np.float32), np.zeros((0, d), np.int64)
    return np.concatenate([p[1] for p in parts]), np.concatenate([p[2] for p in parts])


def index_memory_bytes(index) -> int | None:  # noqa: ANN001
    """Serialised size of a CPU index (a proxy for its memory); None for GPU indexes."""
    import faiss

    try:
        return int(faiss.serialize_index(index).nbytes)
    except (RuntimeError, TypeError):
        return None


# ----------------------------------------------------------------------------------------------------------
# Label metrics (Musgrave et al. 2020)
# ----------------------------------------------------------------------------------------------------------


def _neighbour_labels(ids: np.ndarray, gallery_labels: np.ndarray) -> np.ndarray:
    """``(Q, K)`` labels of the retrieved ids; missing ids (-1) get a label no query has."""
    lab = gallery_labels[np.clip(ids, 0, None)]
    return np.where(ids == MISSING, np.iinfo(np.int64).min, lab)


def average_precision_at_r(relevant: np.ndarray, r: np.ndarray) -> np.ndarray:
    """AP@R per query.

    Args:
        relevant: ``(Q, K)`` bool, whether the i-th retrieved item has the query's label (K >= max R).
        r: ``(Q,)`` number of relevant gallery items per query (> 0).

    Returns:
        ``(Q,)``: ``1/R * sum_{i<=R} P(i) rel(i)``.
    """
    k = relevant.shape[1]
    pos = np.arange(1, k + 1)  # (K,)
    within = pos[None, :] <= r[:, None]  # (Q, K): only the first R results count
    rel = relevant & within
    precision = np.cumsum(rel, axis=1) / pos[None, :]  # (Q, K)
    return (precision * rel).sum(axis=1) / r


def relevant_counts(query_labels: np.ndarray, gallery_labels: np.ndarray) -> np.ndarray:
    """R per query: how many gallery items share its label. ``(Q,)``."""
    top = int(max(query_labels.max(initial=0), gallery_labels.max(initial=0))) + 1
    counts = np.bincount(gallery_labels[gallery_labels >= 0], minlength=top)
    return np.where(query_labels >= 0, counts[np.clip(query_labels, 0, None)], 0)


def per_query_label_stats(ids: np.ndarray, query_labels: np.ndarray, gallery_labels: np.ndarray,
                          ks: Sequence[int] = DEFAULT_KS) -> dict[str, np.ndarray]:
    """Per-query AP@R, R-precision (NaN where R = 0), recall@k and precision@k (fractions), each ``(Q,)``.

    ``ids`` ``(Q, depth)`` must reach depth >= max(R) for AP@R to be exact.
    """
    gallery_labels = np.asarray(gallery_labels, dtype=np.int64)
    query_labels = np.asarray(query_labels, dtype=np.int64)
    r = relevant_counts(query_labels, gallery_labels)  # (Q,)
    relevant = _neighbour_labels(ids, gallery_labels) == query_labels[:, None]  # (Q, depth)
    has = r > 0
    safe_r = np.maximum(r, 1)
    first_r = relevant & (np.arange(1, ids.shape[1] + 1)[None, :] <= r[:, None])  # (Q, depth)
    stats = {"map@r": np.where(has, average_precision_at_r(relevant, safe_r), np.nan),
             "r_precision": np.where(has, first_r.sum(axis=1) / safe_r, np.nan)}
    for k in ks:
        top = relevant[:, :k]  # (Q, k)
        stats[f"recall@{k}"] = top.any(axis=1).astype(np.float64)
        stats[f"precision@{k}"] = top.sum(axis=1) / k
    return stats


def aggregate_label_stats(stats: dict[str, np.ndarray]) -> dict[str, float]:
    """Means over queries, in %; AP@R and R-precision over queries with R > 0 only."""
    def mean_pct(v: np.ndarray) -> float:
        v = v[~np.isnan(v)]
        return 100.0 * float(v.mean()) if len(v) else 0.0

    out = {name: mean_pct(v) for name, v in stats.items()}
    out["num_queries_scored"] = int((~np.isnan(stats["map@r"])).sum())
    return out


def label_metrics(ids: np.ndarray, query_labels: np.ndarray, gallery_labels: np.ndarray,
                  ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """mAP@R, R-precision, recall@k and precision@k (in %) from retrieved ``ids`` ``(Q, depth)``."""
    return aggregate_label_stats(per_query_label_stats(ids, query_labels, gallery_labels, ks))


def exact_overlap(approx_ids: np.ndarray, exact_ids: np.ndarray) -> float:
    """Mean share of each query's exact top-k ids that the approximate top-k also holds (``k``-recall@``k``)."""
    k = exact_ids.shape[1]
    hits = [len(np.intersect1d(a[a != MISSING], e)) for a, e in zip(approx_ids, exact_ids)]
    return 100.0 * float(np.mean(hits)) / k if hits else 0.0


def _timed_search(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, float]:  # noqa: ANN001
    t0 = time.perf_counter()
    _, ids = search(index, queries, k)
    return ids, time.perf_counter() - t0


def retrieval_metrics(query_feats: torch.Tensor, query_labels: torch.Tensor, gallery_feats: torch.Tensor,
                      gallery_labels: torch.Tensor, *, index: str = DEFAULT_INDEX, ks: Sequence[int] = DEFAULT_KS,
                      nprobe: int | None = None, ef_search: int = DEFAULT_EF_SEARCH, exact_k: int = DEFAULT_EXACT_K,
                      use_gpu: bool | None = None, return_ids: int = 0,
                      chunk_entries: int = MAX_CHUNK_ENTRIES) -> dict:
    """Label-based retrieval metrics of ``query_feats`` ``(Q, D)`` against ``gallery_feats`` ``(N, D)``.

    Args:
        index: FAISS factory string.
        ks: cut-offs of recall@k and precision@k.
        nprobe, ef_search: search parameters of IVF and HNSW indexes.
        exact_k: for approximate indexes, the k of the comparison with exact search.
        return_ids: also return the top-``return_ids`` ids (``"ids"``, ``(Q, return_ids)`` NumPy) for plots.
        chunk_entries: queries x depth per search call (memory bound; results do not depend on it).

    Returns:
        ``{"map@r", "r_precision", "recall@k", "precision@k", "num_queries_scored", "index", "build_seconds",
        "search_seconds", "queries_per_second"}``, plus ``"exact_recall@{exact_k}"``, ``"speedup"`` and
        ``"flat_search_seconds"`` for indexes other than Flat.
    """
    if query_feats.shape[1] != gallery_feats.shape[1]:
        raise ValueError(f"query and gallery dims differ: {query_feats.shape[1]} vs {gallery_feats.shape[1]}")
    if len(gallery_feats) == 0:
        raise ValueError("the retrieval gallery is empty")
    gallery = l2_normalize(gallery_feats)  # (N, D)
    queries = l2_normalize(query_feats)  # (Q, D)
    g_labels = torch.as_tensor(gallery_labels).long().numpy()
    q_labels = torch.as_tensor(query_labels).long().numpy()
    t0 = time.perf_counter()
    idx = build_index(gallery, index, nprobe=nprobe, ef_search=ef_search, use_gpu=use_gpu)
    build_s = time.perf_counter() - t0
    max_r = int(relevant_counts(q_labels, g_labels).max(initial=0))
    depth = max(max(ks), max_r, return_ids, 1)
    stats: dict[str, list[np.ndarray]] = {}
    kept: list[np.ndarray] = []  # the top `return_ids` ids of each chunk
    t0, metric_s, searched_depth = time.perf_counter(), 0.0, 0
    for start, _, ids in iter_search(idx, queries, depth, chunk_entries=chunk_entries):  # chunks bound the (Q, R) memory
        t1 = time.perf_counter()
        chunk_stats = per_query_label_stats(ids, q_labels[start:start + len(ids)], g_labels, ks)
        for name, v in chunk_stats.items():
            stats.setdefault(name, []).append(v)
        kept.append(ids[:, :return_ids])
        searched_depth = ids.shape[1]
        metric_s += time.perf_counter() - t1
    search_s = time.perf_counter() - t0 - metric_s
    if not stats:  # no queries
        stats = per_query_label_stats(np.zeros((0, 1), np.int64), q_labels, g_labels, ks)  # type: ignore[assignment]
    out: dict = aggregate_label_stats({name: np.concatenate(v) if isinstance(v, list) else v
                                       for name, v in stats.items()})
    out.update({"index": index, "nprobe": getattr(faiss_ivf(idx), "nprobe", None), "search_depth": searched_depth,
                "build_seconds": build_s, "search_seconds": search_s,
                "queries_per_second": len(queries) / search_s if search_s > 0 else float("inf")})
    if index != "Flat":
        k = min(exact_k, len(gallery))
        flat = flat_ip_index(gallery, use_gpu)
        exact_ids, flat_s = _timed_search(flat, queries, k)
        approx_ids, approx_s = _timed_search(idx, queries, k)
        out[f"exact_recall@{k}"] = exact_overlap(approx_ids, exact_ids)
        out["flat_search_seconds"], out["index_search_seconds"] = flat_s, approx_s
        out["speedup"] = flat_s / approx_s if approx_s > 0 else float("inf")
    if return_ids:
        out["ids"] = np.concatenate(kept) if kept else np.zeros((0, return_ids), np.int64)
    return out


def faiss_ivf(index):  # noqa: ANN001, ANN201
    """The IVF part of an index (None for Flat / HNSW / GPU indexes without one)."""
    import faiss

    try:
        return faiss.try_extract_index_ivf(index)
    except (RuntimeError, TypeError):
        return None


# ----------------------------------------------------------------------------------------------------------
# Copy detection
# ----------------------------------------------------------------------------------------------------------


def jpeg_reencode(image: torch.Tensor, quality: int) -> torch.Tensor:
    """uint8 ``(3, H, W)`` -> JPEG bytes at ``quality`` (PIL) -> uint8 ``(3, H, W)``."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).contiguous().numpy()).save(buf, format="JPEG", quality=int(quality))
    buf.seek(0)
    with Image.open(buf) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


def copy_augmentation(height: int, width: int):  # noqa: ANN201
    """Strong per-image augmentation of uint8 ``(3, H, W)`` images (output the same size): crop, jitter, blur."""
    from torchvision.transforms import v2

    blur_kernel = max(3, int(0.1 * min(height, width)) // 2 * 2 + 1)
    return v2.Compose([
        v2.RandomResizedCrop((height, width), scale=COPY_CROP_SCALE, antialias=True),
        v2.RandomApply([v2.ColorJitter(*COPY_JITTER)], p=COPY_JITTER_P),
        v2.RandomApply([v2.GaussianBlur(blur_kernel, sigma=COPY_BLUR_SIGMA)], p=COPY_BLUR_P),
    ])


def make_copies(images: torch.Tensor, *, seed: int = 0) -> torch.Tensor:
    """Strongly augmented, JPEG re-encoded copies of uint8 ``images`` ``(N, 3, H, W)`` -> ``(N, 3, H, W)``.

    Deterministic for a given ``seed`` (the global torch RNG is forked, not disturbed).
    """
    n, _, h, w = images.shape
    aug = copy_augmentation(h, w)
    qualities = np.random.default_rng(seed).integers(COPY_JPEG_QUALITY[0], COPY_JPEG_QUALITY[1] + 1, size=n)
    out = torch.empty_like(images)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for i in range(n):
            out[i] = jpeg_reencode(aug(images[i].contiguous()), int(qualities[i]))
    return out


def copy_detection_metrics(query_feats: torch.Tensor, source_ids: torch.Tensor, gallery_feats: torch.Tensor, *,
                           index: str = DEFAULT_INDEX, ks: Sequence[int] = DEFAULT_KS, depth: int = DEFAULT_COPY_DEPTH,
                           nprobe: int | None = None, use_gpu: bool | None = None, return_ids: int = 0,
                           whiten: int | None = None) -> dict:
    """Find each copy's source: mAP (= mean ``1/rank`` of the source, 0 beyond ``depth``) and recall@k (%).

    Args:
        query_feats: ``(Q, D)`` features of the copies.
        source_ids: ``(Q,)`` gallery row of each copy's source.
        gallery_feats: ``(N, D)``.
        whiten: PCA-whiten both to this many dimensions, learned on the gallery (``eval.knn.pca_whitening``),
            before normalising, as DINO's copy detection does. The figures without it are then kept under
            ``"plain"``. None = off.
    """
    if whiten:
        plain = copy_detection_metrics(query_feats, source_ids, gallery_feats, index=index, ks=ks, depth=depth,
                                       nprobe=nprobe, use_gpu=use_gpu)
        gallery_w, queries_w = whiten_on(gallery_feats, query_feats, dim=int(whiten))
        out = copy_detection_metrics(queries_w, source_ids, gallery_w, index=index, ks=ks, depth=depth,
                                     nprobe=nprobe, use_gpu=use_gpu, return_ids=return_ids)
        out.update(whiten=int(gallery_w.shape[1]), plain={k: v for k, v in plain.items() if k == "map" or
                                                          k.startswith("recall@")})
        return out
    gallery = l2_normalize(gallery_feats)
    queries = l2_normalize(query_feats)
    src = torch.as_tensor(source_ids).long().numpy()  # (Q,)
    idx = build_index(gallery, index, nprobe=nprobe, use_gpu=use_gpu)
    t0 = time.perf_counter()
    _, ids = search(idx, queries, max(depth, max(ks), return_ids))  # (Q, depth)
    search_s = time.perf_counter() - t0
    hit = ids == src[:, None]  # (Q, depth): at most one True per row
    found = hit.any(axis=1)
    rank = hit.argmax(axis=1) + 1  # (Q,), meaningful where found
    ap = np.where(found, 1.0 / rank, 0.0)
    out = {"map": 100.0 * float(ap.mean()) if len(ap) else 0.0}
    for k in ks:
        out[f"recall@{k}"] = 100.0 * float(hit[:, :k].any(axis=1).mean()) if len(hit) else 0.0
    out.update({"index": index, "search_depth": int(ids.shape[1]), "num_queries": int(len(src)),
                "gallery_size": int(len(gallery)), "search_seconds": search_s})
    if return_ids:
        out["ids"] = ids[:, :return_ids]
    return out
