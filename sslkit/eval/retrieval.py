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

**Explicit query and gallery sets** (:func:`run_retrieval_sets`, ``sslkit eval retrieval RUN --queries Q
--gallery G``): two image folders; a gallery image is relevant to a query when both sit in class folders of the
same name, or when a ground-truth JSON (``{"query/relative/path.jpg": ["gallery/relative/path.jpg", ...]}``)
says so. :func:`set_retrieval_metrics` ranks the whole gallery for each query and reports, over the queries with
at least one relevant image: **mAP** (AP over the full ranking, ``1/R * sum_i P(i) rel(i)``), **mAP@R**
(Musgrave et al., as above) and **recall@k** (a relevant image among the first ``k``). :func:`run_copy_folder`
does copy detection on a user folder: copies of its images are searched in a gallery of the folder itself
plus an optional folder of distractors.

Example::

    res = retrieval_metrics(test_f, test_y, train_f, train_y, index="IVF64,Flat", nprobe=8)
    res["map@r"], res["recall@1"], res["exact_recall@10"]
"""

from __future__ import annotations

import io
import json
import re
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

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


# ----------------------------------------------------------------------------------------------------------
# Explicit query and gallery sets
# ----------------------------------------------------------------------------------------------------------

MAX_GROUND_TRUTH_BYTES = 64 << 20  # a ground-truth JSON larger than this is refused (untrusted input)


def folder_dataset(root: str | Path, labeled: bool = True):  # noqa: ANN201 - an ImageFolderDataset
    """The images under ``root`` (the folder itself, never a ``train``/``val`` sub-folder), in sorted order.
    ``labeled``: one class per sub-folder holding images (images beside them are left out), or label -1 for
    all when there is none; otherwise every image below ``root``, label -1."""
    from sslkit.data.image_folder import image_folder

    return image_folder(split=".", root=str(root), labeled=labeled)  # root / "." is root: no split folder


def relative_paths(ds: Any, root: str | Path) -> list[str]:
    """``ds.files`` relative to ``root``, with ``/`` separators (the keys of a ground-truth JSON)."""
    base = Path(root).expanduser()
    return [Path(f).relative_to(base).as_posix() for f in ds.files]


@dataclass(frozen=True)
class Relevance:
    """Which gallery rows are relevant to each query, by shared labels or by an explicit list of pairs.

    ``counts`` ``(Q,)`` is R, the number of relevant gallery rows per query. Labels: query and gallery labels in
    one label space (-1: never relevant). Pairs: sorted int64 codes ``query * gallery_size + gallery_row``.
    """

    counts: np.ndarray
    gallery_size: int
    query_labels: np.ndarray | None = None
    gallery_labels: np.ndarray | None = None
    pairs: np.ndarray | None = None

    @classmethod
    def from_labels(cls, query_labels: np.ndarray, gallery_labels: np.ndarray) -> Relevance:
        q, g = np.asarray(query_labels, np.int64), np.asarray(gallery_labels, np.int64)
        return cls(relevant_counts(q, g), len(g), query_labels=q, gallery_labels=g)

    @classmethod
    def from_lists(cls, relevant: Sequence[Sequence[int]], gallery_size: int) -> Relevance:
        codes = [q * gallery_size + np.unique(np.asarray(rows, np.int64)) for q, rows in enumerate(relevant)]
        pairs = np.sort(np.concatenate(codes)) if codes else np.zeros(0, np.int64)
        counts = np.array([len(np.unique(np.asarray(rows, np.int64))) for rows in relevant], np.int64)
        return cls(counts, int(gallery_size), pairs=pairs)

    def matrix(self, start: int, ids: np.ndarray) -> np.ndarray:
        """``(q, depth)`` bool: is retrieved row ``ids[i, j]`` relevant to query ``start + i``? (-1: never)."""
        if self.pairs is not None:
            rows = np.arange(start, start + len(ids), dtype=np.int64)[:, None]  # (q, 1)
            hit = np.isin(rows * self.gallery_size + np.clip(ids, 0, None), self.pairs)
        else:
            q = self.query_labels[start:start + len(ids)]  # (q,)
            hit = (self.gallery_labels[np.clip(ids, 0, None)] == q[:, None]) & (q[:, None] >= 0)
        return hit & (ids != MISSING)


def class_relevance(query_classes: Sequence[str], query_labels: torch.Tensor, gallery_classes: Sequence[str],
                    gallery_labels: torch.Tensor, *, where: str = "") -> Relevance:
    """Relevance by class folder name: query class ``query_classes[y]`` against gallery class names."""
    from sslkit.data.base import DataError

    if not query_classes or not gallery_classes:
        raise DataError(f"relevance by class folders needs class sub-folders in both the query and the gallery "
                        f"folder{where}; one of them holds loose images only. Put images in <folder>/<class>/, or "
                        "give --ground-truth FILE.json.")
    index = {name: i for i, name in enumerate(gallery_classes)}
    shared = sorted(set(query_classes) & set(index))
    if not shared:
        raise DataError(f"the query and gallery folders{where} share no class folder name (queries: "
                        f"{', '.join(list(query_classes)[:5])}; gallery: {', '.join(list(gallery_classes)[:5])}). "
                        "Name the folders alike, or give --ground-truth FILE.json.")
    to_gallery = np.array([index.get(name, -1) for name in query_classes], np.int64)
    q = torch.as_tensor(query_labels).long().numpy()
    return Relevance.from_labels(np.where(q >= 0, to_gallery[np.clip(q, 0, None)], -1),
                                 torch.as_tensor(gallery_labels).long().numpy())


def _normal_path(p: str) -> str:
    return PurePosixPath(p.replace("\\", "/")).as_posix()


def load_ground_truth(path: str | Path, query_paths: Sequence[str], gallery_paths: Sequence[str]) -> Relevance:
    """Relevance from a JSON object mapping query paths to lists of relevant gallery paths, each relative to
    its folder with ``/`` separators. Queries it does not list have no relevant image (they are not scored).

    Raises:
        DataError: an unreadable or malformed file, or paths that are not in the folders (the message names them).
    """
    from sslkit.data.base import DataError

    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"ground-truth file {p} does not exist or is not a file.")
    if p.stat().st_size > MAX_GROUND_TRUTH_BYTES:
        raise DataError(f"ground-truth file {p} is larger than {MAX_GROUND_TRUTH_BYTES >> 20} MB; is it the right "
                        "file?")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"ground-truth file {p} is not valid JSON: {e}") from e
    form = ('{"query/path.jpg": ["gallery/path.jpg", ...], ...}, paths relative to the --queries and --gallery '
            "folders")
    if not isinstance(data, dict) or not all(isinstance(v, list) and all(isinstance(x, str) for x in v)
                                             for v in data.values()):
        raise DataError(f"ground-truth file {p} must hold one JSON object {form}.")
    q_index = {name: i for i, name in enumerate(query_paths)}
    g_index = {name: i for i, name in enumerate(gallery_paths)}
    entries = {_normal_path(k): [_normal_path(x) for x in v] for k, v in data.items()}
    bad_q = [k for k in entries if k not in q_index]
    bad_g = sorted({x for v in entries.values() for x in v if x not in g_index})
    for bad, what, folder in ((bad_q, "query", "--queries"), (bad_g, "gallery", "--gallery")):
        if bad:
            raise DataError(f"ground-truth file {p} names {len(bad)} {what} path(s) that are not images of the "
                            f"{folder} folder: {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}. Paths are "
                            f"relative to that folder with / separators, e.g. "
                            f"{next(iter(q_index if what == 'query' else g_index), 'class/image.jpg')!r}.")
    relevant: list[list[int]] = [[] for _ in query_paths]
    for k, v in entries.items():
        relevant[q_index[k]] = [g_index[x] for x in v]
    return Relevance.from_lists(relevant, len(gallery_paths))


def set_retrieval_metrics(query_feats: torch.Tensor, gallery_feats: torch.Tensor, relevance: Relevance, *,
                          index: str = DEFAULT_INDEX, ks: Sequence[int] = DEFAULT_KS, nprobe: int | None = None,
                          ef_search: int = DEFAULT_EF_SEARCH, use_gpu: bool | None = None, return_ids: int = 0,
                          chunk_entries: int = MAX_CHUNK_ENTRIES) -> dict:
    """mAP, mAP@R and recall@k (%) of ``query_feats`` ``(Q, D)`` ranking all of ``gallery_feats`` ``(N, D)``.

    Queries with no relevant gallery image (R = 0) are left out of every mean (``num_queries_scored`` counts
    the others). Cosine similarity (L2-normalised inner product) with the ``index`` FAISS factory string.
    """
    from sslkit.data.base import DataError

    if query_feats.shape[1] != gallery_feats.shape[1]:
        raise ValueError(f"query and gallery dims differ: {query_feats.shape[1]} vs {gallery_feats.shape[1]}")
    if len(gallery_feats) == 0 or len(gallery_feats) != relevance.gallery_size:
        raise ValueError(f"gallery of {len(gallery_feats)} rows for a relevance over {relevance.gallery_size}")
    scored = relevance.counts > 0  # (Q,)
    if not scored.any():
        raise DataError("no query has a relevant gallery image; check the class folders or the ground truth.")
    gallery, queries = l2_normalize(gallery_feats), l2_normalize(query_feats)
    idx = build_index(gallery, index, nprobe=nprobe, ef_search=ef_search, use_gpu=use_gpu)
    per_query: dict[str, list[np.ndarray]] = {}
    kept: list[np.ndarray] = []
    t0 = time.perf_counter()
    for start, _, ids in iter_search(idx, queries, len(gallery), chunk_entries=chunk_entries):  # whole ranking
        rel = relevance.matrix(start, ids)  # (q, N)
        r = np.maximum(relevance.counts[start:start + len(ids)], 1)  # (q,)
        pos = np.arange(1, ids.shape[1] + 1)[None, :]  # (1, N)
        stats = {"map": (np.cumsum(rel, axis=1) / pos * rel).sum(axis=1) / r,
                 "map@r": average_precision_at_r(rel, r)}
        stats.update({f"recall@{k}": rel[:, :k].any(axis=1).astype(np.float64) for k in ks})
        for name, v in stats.items():
            per_query.setdefault(name, []).append(v)
        kept.append(ids[:, :return_ids])
    search_s = time.perf_counter() - t0
    out: dict = {name: 100.0 * float(np.concatenate(v)[scored].mean()) for name, v in per_query.items()}
    out.update({"num_queries": int(len(queries)), "num_queries_scored": int(scored.sum()),
                "gallery_size": int(len(gallery)), "mean_relevant": float(relevance.counts[scored].mean()),
                "index": index, "search_seconds": search_s})
    if return_ids:
        out["ids"] = np.concatenate(kept)
    return out


def _no_subsets(opts: dict[str, Any], what: str) -> None:
    """Refuse the options that pick a dataset's splits and subsets: the folders are the sets."""
    from sslkit.eval.report import EvalError

    for name in ("train_subset", "test_subset", "dataset", "train_split", "eval_split"):
        if opts.get(name) is not None:
            raise EvalError(f"--{name.replace('_', '-')} does not apply to {what}; point the folders at the images "
                            "to use instead.")


def run_retrieval_sets(run_dir: str | Path, *, queries: str | Path, gallery: str | Path,
                       ground_truth: str | Path | None = None, index: str = DEFAULT_INDEX,
                       ks: Sequence[int] = DEFAULT_KS, nprobe: int | None = None, ef_search: int = DEFAULT_EF_SEARCH,
                       plots: bool = True, **opts: Any) -> dict:
    """Retrieval of a query folder in a gallery folder (module notes), written like every evaluation of the run
    (``eval/retrieval_sets[_<baseline>]/results.json``, a report row, a grid PNG). ``opts`` as for
    :func:`sslkit.eval.report.load_context` (no subsets: the folders are the sets)."""
    from sslkit.eval import report
    from sslkit.eval.plots import GRID_NEIGHBOURS, GRID_QUERIES, retrieval_grid

    _no_subsets(opts, "--queries / --gallery folders")
    t0 = time.perf_counter()
    ctx = report.load_context(run_dir, **opts)
    labeled = ground_truth is None  # with a ground truth, every image below each folder takes part
    q_ds, g_ds = folder_dataset(queries, labeled), folder_dataset(gallery, labeled)
    if ground_truth is not None:
        relevance = load_ground_truth(ground_truth, relative_paths(q_ds, queries), relative_paths(g_ds, gallery))
    else:
        relevance = class_relevance(q_ds.classes, q_ds.labels, g_ds.classes, g_ds.labels,
                                    where=f" ({queries}, {gallery})")
    q_fs, g_fs = ctx.features_of(q_ds, "queries"), ctx.features_of(g_ds, "gallery")
    g_f, q_f = report._postprocess(ctx, g_fs, q_fs)
    res, t_eval = report._timed(lambda: set_retrieval_metrics(
        q_f, g_f, relevance, index=index, ks=ks, nprobe=nprobe, ef_search=ef_search,
        return_ids=GRID_NEIGHBOURS if plots else 0))
    ids = res.pop("ids", None)
    pics: list[Path] = []
    if plots and ids is not None:
        pick = report._pick(len(q_ds), GRID_QUERIES, ctx.seed).sort().values
        nb = ids[pick.numpy()]  # (q, K)
        correct = np.concatenate([relevance.matrix(int(i), nb[j:j + 1]) for j, i in enumerate(pick)])
        n_imgs = torch.stack([report._grid_images(g_ds, np.clip(row, 0, None).tolist()) for row in nb])
        pics.append(retrieval_grid(report._grid_images(q_ds, pick.tolist()), n_imgs, correct,
                                   report.eval_dir(ctx.run_dir, "retrieval_sets", ctx.baseline) / "retrieval_grid.png",
                                   title=f"{ctx.source}: queries and their nearest gallery images (green = relevant)"))
    settings = {"index": index, "ks": list(ks), "nprobe": nprobe, "ef_search": ef_search,
                "queries": str(queries), "gallery": str(gallery), "data_label": f"folders {queries} -> {gallery}",
                "relevance": f"ground truth {ground_truth}" if ground_truth is not None else "shared class folder names",
                "metric": "cosine (inner product, L2-normalised)"}
    return report._finish(ctx, "retrieval_sets", res, settings, {"gallery": g_fs, "queries": q_fs}, t0, t_eval, pics)


def run_copy_folder(run_dir: str | Path, *, folder: str | Path, distractors: str | Path | None = None,
                    index: str = DEFAULT_INDEX, ks: Sequence[int] = DEFAULT_KS,
                    num_queries: int = DEFAULT_COPY_QUERIES, nprobe: int | None = None, whiten: int | None = None,
                    plots: bool = True, **opts: Any) -> dict:
    """Copy detection on a user folder: copies (:func:`make_copies`) of up to ``num_queries`` of its images are
    searched in a gallery of all its images followed by those of ``distractors``. Metrics as
    :func:`copy_detection_metrics`; written to ``eval/copy_folder[_<baseline>]/``."""
    from sslkit.eval import report
    from sslkit.eval.features import dataset_description
    from sslkit.eval.plots import GRID_NEIGHBOURS, GRID_QUERIES, retrieval_grid

    _no_subsets(opts, "--folder / --distractors")
    whiten = report._whiten_dim(whiten)
    if num_queries <= 0:
        raise report.EvalError(f"num_queries must be positive, got {num_queries}")
    t0 = time.perf_counter()
    ctx = report.load_context(run_dir, **opts)
    src_ds = folder_dataset(folder)
    query_ds, src = report.make_copy_queries(src_ds, num_queries, ctx.seed)
    query_ds.source = f"{query_ds.source} [{dataset_description(src_ds)}]"  # the copies change with the files
    sets = {"folder": ctx.features_of(src_ds, "copy folder")}
    if distractors is not None:
        sets["distractors"] = ctx.features_of(folder_dataset(distractors), "distractors")
    sets["copies"] = ctx.features_of(query_ds, "copies")
    g_f = torch.cat([fs.features for name, fs in sets.items() if name != "copies"])  # (N, D): folder first
    q_f = sets["copies"].features
    if ctx.baseline == "pixels":
        g_f, q_f = report.center_and_normalize(g_f, q_f)
    res, t_eval = report._timed(lambda: copy_detection_metrics(
        q_f, src, g_f, index=index, ks=ks, nprobe=nprobe, return_ids=GRID_NEIGHBOURS if plots else 0, whiten=whiten))
    ids = res.pop("ids", None)
    pics: list[Path] = []
    if plots and ids is not None:
        pick = report._pick(len(src), GRID_QUERIES, ctx.seed)
        nb = ids[pick.numpy()]
        gallery_image = _concat_lookup(src_ds, folder_dataset(distractors) if distractors is not None else None)
        n_imgs = torch.stack([report._grid_images(gallery_image, np.clip(row, 0, None).tolist()) for row in nb])
        pics.append(retrieval_grid(report._grid_images(query_ds, pick.tolist()), n_imgs,
                                   torch.from_numpy(nb) == src[pick][:, None],
                                   report.eval_dir(ctx.run_dir, "copy_folder", ctx.baseline) / "copy_grid.png",
                                   title=f"{ctx.source}: copies and their nearest images (green = source)"))
    settings = {"index": index, "ks": list(ks), "num_queries": int(len(src)), "nprobe": nprobe,
                "folder": str(folder), "distractors": str(distractors) if distractors is not None else None,
                "data_label": f"folder {folder}" + (f" + distractors {distractors}" if distractors is not None else ""),
                "num_distractors": int(len(sets["distractors"].labels)) if "distractors" in sets else 0,
                "whiten": res.get("whiten")}
    return report._finish(ctx, "copy_folder", res, settings, sets, t0, t_eval, pics)


def _concat_lookup(first: Any, second: Any | None) -> torch.utils.data.ConcatDataset | Any:
    return first if second is None else torch.utils.data.ConcatDataset([first, second])
