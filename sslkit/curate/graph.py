"""Near-duplicate graphs: k-NN search with FAISS, a cosine threshold, connected components, a keep rule.

Each image has V view vectors (view 0 = the whole image, the others sub-windows; see :mod:`sslkit.curate.embed`).
The index holds whole-image vectors; every view of every query image is searched. An edge ``(i, j, sim)`` joins
two images when a view of one is at least ``threshold`` similar (cosine) to the whole of the other, which finds
a crop from the crop's side (its whole image meets the source's window) and copies of other kinds from both.

Two link rules turn the thresholded graph into duplicate groups (:data:`LINK_RULES`):

* ``components``: a connected component is one group and :func:`keep_one` keeps one image of it by a stated
  rule. Chains join images that are not duplicates of each other (a near b, b near c, a far from c).
* ``star``: :func:`star_labels` walks the images in the keep rule's order; an image is kept unless a kept image
  links to it, and a removed image joins its most similar kept neighbour. Every removed image is a direct
  duplicate of the image kept in its place, and no two kept images are linked.

The index is exact (Flat) up to :data:`FLAT_MAX` vectors and IVF beyond, unless overridden.

Example::

    i, j, s = match(emb.vectors, emb.full_view(), threshold=0.9, exclude_self=True)
    labels = components(len(emb.files), i, j)
"""

from __future__ import annotations

import math

import numpy as np

from sslkit.eval.retrieval import check_index_spec, set_search_params

FLAT_MAX = 100_000  # exact search up to this many indexed vectors; IVF above
IVF_LISTS_PER_SQRT = 4  # nlist ~ 4 sqrt(N), the FAISS guideline, rounded to a power of two
IVF_NPROBE = 16
DEFAULT_K = 10  # neighbours searched per view
DEFAULT_THRESHOLD = 0.9  # cosine; benchmarks/curate_dedup.py measures precision and recall around it
SEARCH_CHUNK = 16_384  # query vectors per FAISS call
TRAIN_SAMPLE = 262_144  # vectors the IVF quantiser trains on (FAISS uses at most 256 per list anyway)
KEEP_RULES = ("largest", "first")
LINK_RULES = ("components", "star")


def auto_index_spec(n: int) -> str:
    """``Flat`` up to :data:`FLAT_MAX` vectors, else ``IVF<nlist>,Flat`` with nlist a power of two near 4 sqrt(n)."""
    if n <= FLAT_MAX:
        return "Flat"
    return f"IVF{2 ** round(math.log2(IVF_LISTS_PER_SQRT * math.sqrt(n)))},Flat"


def build_chunked_index(vectors: np.ndarray, spec: str | None = None, *, nprobe: int = IVF_NPROBE,
                        chunk: int = SEARCH_CHUNK, seed: int = 0):  # noqa: ANN201 - a faiss index
    """Inner-product index over ``vectors`` ``(N, D)`` (unit rows; a memory map is read chunk by chunk)."""
    import faiss

    n, d = vectors.shape
    spec = spec or auto_index_spec(n)
    check_index_spec(spec, n, d)
    index = faiss.index_factory(d, spec, faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.cp.seed = seed
    if not index.is_trained:
        rows = np.sort(np.random.default_rng(seed).choice(n, size=min(n, TRAIN_SAMPLE), replace=False))
        index.train(np.ascontiguousarray(vectors[rows], dtype=np.float32))
    for s in range(0, n, chunk):
        index.add(np.ascontiguousarray(vectors[s:s + chunk], dtype=np.float32))
    set_search_params(index, nprobe=nprobe)
    return index


def match(query_views: np.ndarray, index_vectors: np.ndarray, *, threshold: float, k: int = DEFAULT_K,
          exclude_self: bool = False, query_ok: np.ndarray | None = None, index_ok: np.ndarray | None = None,
          index=None, spec: str | None = None, progress: bool = False,  # noqa: ANN001
          desc: str = "search") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs ``(query row i, index row j, sim)`` with ``sim >= threshold``, the best over i's views, one per pair.

    Args:
        query_views: ``(Q, V, D)`` (or ``(Q, D)``) unit rows, e.g. a memory map.
        index_vectors: ``(N, D)`` unit rows searched (whole-image views).
        exclude_self: the query and index sets are the same collection; drop ``i == j`` and keep ``i < j``.
        query_ok / index_ok: ``(Q,)`` / ``(N,)`` bool, False for unreadable rows (never matched).
        index: a prebuilt index over ``index_vectors`` (else built with ``spec``, see :func:`auto_index_spec`).
    """
    from tqdm.auto import tqdm

    qv = query_views if query_views.ndim == 3 else query_views[:, None]
    q, v = qv.shape[:2]
    if index is None:
        index = build_chunked_index(index_vectors, spec)
    k = max(1, min(k + int(exclude_self), int(index.ntotal)))
    rows_per_chunk = max(1, SEARCH_CHUNK // v)
    found: dict[tuple[int, int], float] = {}
    bar = tqdm(total=q, desc=desc, unit="img", disable=not progress, dynamic_ncols=True)
    for s in range(0, q, rows_per_chunk):
        block = np.ascontiguousarray(qv[s:s + rows_per_chunk], dtype=np.float32)  # (b, V, D)
        b = len(block)
        sims, ids = index.search(block.reshape(b * v, -1), k)  # (b * V, k)
        qi = np.repeat(np.arange(s, s + b), v * k)
        sims, ids = sims.reshape(-1), ids.reshape(-1)
        keep = (ids >= 0) & (sims >= threshold)
        if query_ok is not None:
            keep &= query_ok[qi]
        qi, ids, sims = qi[keep], ids[keep], sims[keep]
        if index_ok is not None:
            good = index_ok[ids]
            qi, ids, sims = qi[good], ids[good], sims[good]
        if exclude_self:
            qi, ids = np.minimum(qi, ids), np.maximum(qi, ids)
            diff = qi != ids
            qi, ids, sims = qi[diff], ids[diff], sims[diff]
        for a, c, sim in zip(qi.tolist(), ids.tolist(), sims.tolist()):
            if sim > found.get((a, c), -2.0):
                found[(a, c)] = sim
        bar.update(b)
    bar.close()
    if not found:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
    pairs = np.array(list(found.keys()), dtype=np.int64)
    return pairs[:, 0], pairs[:, 1], np.array(list(found.values()), dtype=np.float32)


def threshold_edges(i: np.ndarray, j: np.ndarray, sim: np.ndarray,
                    threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The edges with ``sim >= threshold``."""
    keep = np.asarray(sim) >= threshold
    return np.asarray(i)[keep], np.asarray(j)[keep], np.asarray(sim)[keep]


def components(n: int, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Connected-component label ``(n,)`` of every node of the undirected graph with edges ``(i, j)``."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    graph = coo_matrix((np.ones(len(i), dtype=np.int8), (np.asarray(i), np.asarray(j))), shape=(n, n))
    return connected_components(graph, directed=False)[1]


def groups_of(labels: np.ndarray) -> list[np.ndarray]:
    """Components with two or more members (rows, ascending), largest group first."""
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    cuts = np.flatnonzero(np.diff(sorted_labels)) + 1
    groups = [g for g in np.split(order, cuts) if len(g) > 1]
    return sorted(groups, key=lambda g: (-len(g), int(g[0])))


def keep_order(rows: np.ndarray, rule: str, dims: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """``rows`` sorted best first by the keep rule.

    ``largest``: the most pixels, then the largest file (least compressed), then the first row (path order).
    ``first``: the first row (path order: a folder's sorted paths or the list file's order).
    """
    if rule not in KEEP_RULES:
        raise ValueError(f"keep rule must be one of {KEEP_RULES}, got {rule!r}")
    g = np.sort(np.asarray(rows, dtype=np.int64))
    if rule == "first":
        return g
    pixels = dims[g, 0].astype(np.int64) * dims[g, 1]
    return g[np.lexsort((g, -sizes[g], -pixels))]  # lexsort: the last key is the primary one


def keep_one(group: np.ndarray, rule: str, dims: np.ndarray, sizes: np.ndarray) -> int:
    """The row of ``group`` to keep: the first by :func:`keep_order`."""
    return int(keep_order(group, rule, dims, sizes)[0])


def star_labels(n: int, i: np.ndarray, j: np.ndarray, sim: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Star groups of the undirected graph with edges ``(i, j, sim)``: label ``(n,)`` = the kept row each row
    duplicates, its own row when kept.

    Rows are visited in ``order`` (best first, e.g. :func:`keep_order` of all rows); a row is kept unless an
    already kept row links to it. A removed row joins its most similar kept neighbour (ties: the earlier in
    ``order``).
    """
    from scipy.sparse import coo_matrix

    i, j, sim = np.asarray(i, np.int64), np.asarray(j, np.int64), np.asarray(sim, np.float64)
    labels = np.arange(n)
    if len(i) == 0:
        return labels
    adj = coo_matrix((np.ones(2 * len(i), np.int8), (np.r_[i, j], np.r_[j, i])), shape=(n, n)).tocsr()
    removed = np.zeros(n, bool)
    linked = np.diff(adj.indptr) > 0
    for u in np.asarray(order)[linked[order]].tolist():
        if not removed[u]:  # kept: no kept row links to it
            removed[adj.indices[adj.indptr[u]:adj.indptr[u + 1]]] = True
    rank = np.empty(n, np.int64)
    rank[np.asarray(order)] = np.arange(len(order))
    src, dst, s = np.r_[i, j], np.r_[j, i], np.r_[sim, sim]
    pick = removed[src] & ~removed[dst]
    src, dst, s = src[pick], dst[pick], s[pick]
    best = np.lexsort((rank[dst], -s, src))  # per removed row: the most similar kept neighbour first
    first = np.r_[True, np.diff(src[best]) != 0]
    labels[src[best][first]] = dst[best][first]
    return labels
