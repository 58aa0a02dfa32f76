"""Deduplicate a collection, and drop what duplicates evaluation sets, from its embeddings.

Example::

    src = embed_collection("photos/", load_embedder("builtin"), "cache/")
    res = dedup(src, threshold=0.8, against=[embed_collection("testset/", ...)])
    res.kept          # rows kept, one per duplicate group plus every singleton
    res.removed[0]    # Removal(row=12, reason="duplicate", kept_row=7, group=0)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from sslkit.curate import graph
from sslkit.curate.embed import Embeddings


@dataclass
class Removal:
    row: int
    reason: str  # "duplicate" (of kept_row, same group) or "eval" (matches an evaluation image)
    kept_row: int = -1
    group: int = -1
    match: str = ""  # the evaluation image it duplicates


@dataclass
class DedupResult:
    emb: Embeddings
    kept: np.ndarray  # rows kept (readable, not removed), ascending
    removed: list[Removal]
    groups: list[np.ndarray]  # duplicate groups (rows), largest first
    settings: dict = field(default_factory=dict)


def eval_matches(src: Embeddings, other: Embeddings, *, threshold: float, k: int = graph.DEFAULT_K,
                 progress: bool = False) -> dict[int, str]:
    """Rows of ``src`` that duplicate an image of ``other`` -> that image's path (searched both ways)."""
    hits: dict[int, tuple[float, str]] = {}
    i, j, s = graph.match(src.vectors, other.full_view(), threshold=threshold, k=k, query_ok=src.ok,
                          index_ok=other.ok, progress=progress, desc="vs eval")
    pairs = list(zip(i.tolist(), j.tolist(), s.tolist()))
    j2, i2, s2 = graph.match(other.vectors, src.full_view(), threshold=threshold, k=k, query_ok=other.ok,
                             index_ok=src.ok, progress=progress, desc="eval vs")
    pairs += list(zip(i2.tolist(), j2.tolist(), s2.tolist()))
    for a, b, sim in pairs:
        if sim > hits.get(a, (-2.0, ""))[0]:
            hits[a] = (sim, str(other.files[b]))
    return {a: path for a, (_, path) in hits.items()}


def dedup(emb: Embeddings, *, threshold: float = graph.DEFAULT_THRESHOLD, k: int = graph.DEFAULT_K,
          keep: str = "largest", index: str | None = None, against: list[Embeddings] | tuple = (),
          progress: bool = True) -> DedupResult:
    """Group near-duplicates (cosine >= ``threshold`` between a view and a whole image), keep one per group by
    ``keep`` (:func:`sslkit.curate.graph.keep_one`), and remove every image that duplicates one of ``against``."""
    n = len(emb.files)
    i, j, _ = graph.match(emb.vectors, emb.full_view(), threshold=threshold, k=k, exclude_self=True,
                          query_ok=emb.ok, index_ok=emb.ok, spec=index, progress=progress, desc="dedup search")
    groups = graph.groups_of(graph.components(n, i, j))
    removed: dict[int, Removal] = {}
    for gid, g in enumerate(groups):
        winner = graph.keep_one(g, keep, emb.dims, emb.sizes)
        for r in g:
            if r != winner:
                removed[int(r)] = Removal(int(r), "duplicate", winner, gid)
    for other in against:
        for r, path in eval_matches(emb, other, threshold=threshold, k=k, progress=progress).items():
            removed[r] = Removal(r, "eval", -1, -1, path)
    gone = np.zeros(n, bool)
    gone[list(removed)] = True
    kept = np.flatnonzero(emb.ok & ~gone)
    settings = {"threshold": threshold, "k": k, "keep": keep, "index": index or graph.auto_index_spec(n),
                "views": emb.num_views, "against": [str(a.cache_dir) for a in against]}
    return DedupResult(emb, kept, sorted(removed.values(), key=lambda x: x.row), groups, settings)
