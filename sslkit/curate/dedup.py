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
from sslkit.curate.verify import VERIFY_CAP, ScoreCache, cap_pairs, settings_key, verify_pairs


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


def verify_scores(a: Embeddings, b: Embeddings, i: np.ndarray, j: np.ndarray, s: np.ndarray, *,
                  progress: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Candidate pairs (rows ``i`` of ``a``, ``j`` of ``b``, cosine ``s``), capped at each image's
    ``VERIFY_CAP`` most similar, with their pixel correlation (:mod:`sslkit.curate.verify`): ``(i, j, s, score)``."""
    keep = cap_pairs(i, j, s, VERIFY_CAP)
    i, j, s = i[keep], j[keep], s[keep]
    score = verify_pairs(a.files, a.files if a is b else b.files, i, j, a.dims, b.dims, progress=progress,
                         cache=score_cache(a, b))
    return i, j, s, score


def score_cache(a: Embeddings, b: Embeddings) -> ScoreCache | None:
    """The verified scores of ``a``'s images against ``b``'s, beside ``a``'s embedding cache (outside it, so that
    re-embedding a changed collection keeps them); None for embeddings without mtimes."""
    if a.stamps is None or b.stamps is None:
        return None
    home = a.cache_dir.with_name(a.cache_dir.name + ".verify")
    return ScoreCache(home / f"{'self' if a is b else b.cache_dir.name}-{settings_key()}", a.stamps, b.stamps)


def verified(a: Embeddings, b: Embeddings, i: np.ndarray, j: np.ndarray, s: np.ndarray, *,
             verify_threshold: float | None, progress: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The candidate pairs whose pixel correlation reaches ``verify_threshold``; all of them when it is None."""
    if verify_threshold is None:
        return i, j, s
    i, j, s, score = verify_scores(a, b, i, j, s, progress=progress)
    ok = score >= verify_threshold
    return i[ok], j[ok], s[ok]


def eval_matches(src: Embeddings, other: Embeddings, *, threshold: float, k: int = graph.DEFAULT_K,
                 verify_threshold: float | None = None, progress: bool = False) -> dict[int, str]:
    """Rows of ``src`` that duplicate an image of ``other`` -> that image's path (searched both ways)."""
    hits: dict[int, tuple[float, str]] = {}
    i, j, s = graph.match(src.vectors, other.full_view(), threshold=threshold, k=k, query_ok=src.ok,
                          index_ok=other.ok, progress=progress, desc="vs eval")
    j2, i2, s2 = graph.match(other.vectors, src.full_view(), threshold=threshold, k=k, query_ok=other.ok,
                             index_ok=src.ok, progress=progress, desc="eval vs")
    i, j, s = verified(src, other, np.r_[i, i2], np.r_[j, j2], np.r_[s, s2], verify_threshold=verify_threshold,
                       progress=progress)
    pairs = list(zip(i.tolist(), j.tolist(), s.tolist()))
    for a, b, sim in pairs:
        if sim > hits.get(a, (-2.0, ""))[0]:
            hits[a] = (sim, str(other.files[b]))
    return {a: path for a, (_, path) in hits.items()}


def dedup(emb: Embeddings, *, threshold: float = graph.DEFAULT_THRESHOLD, k: int = graph.DEFAULT_K,
          keep: str = "largest", link: str = "components", index: str | None = None,
          against: list[Embeddings] | tuple = (), verify_threshold: float | None = None,
          progress: bool = True) -> DedupResult:
    """Group near-duplicates (cosine >= ``threshold`` between a view and a whole image) by the ``link`` rule
    (:data:`sslkit.curate.graph.LINK_RULES`), keep one per group by ``keep``
    (:func:`sslkit.curate.graph.keep_order`), and remove every image that duplicates one of ``against``.

    ``verify_threshold``: also require a pixel correlation at least this high (:mod:`sslkit.curate.verify`)
    from every linked pair; None links on the cosine alone.
    """
    i, j, s = candidates(emb, threshold=threshold, k=k, index=index, progress=progress)
    i, j, s = verified(emb, emb, i, j, s, verify_threshold=verify_threshold, progress=progress)
    res = group(emb, i, j, s, keep=keep, link=link)
    for other in against:
        for r, path in eval_matches(emb, other, threshold=threshold, k=k, verify_threshold=verify_threshold,
                                    progress=progress).items():
            res.removed.append(Removal(r, "eval", -1, -1, path))
    removed = {r.row: r for r in res.removed}  # an eval match overrides a duplicate removal of the same row
    gone = np.zeros(len(emb.files), bool)
    gone[list(removed)] = True
    res.kept = np.flatnonzero(emb.ok & ~gone)
    res.removed = sorted(removed.values(), key=lambda x: x.row)
    res.settings = {"threshold": threshold, "k": k, "keep": keep, "link": link,
                    "index": index or graph.auto_index_spec(len(gone)),
                    "views": emb.num_views, "verify_threshold": verify_threshold,
                    "against": [str(a.cache_dir) for a in against]}
    return res


def candidates(emb: Embeddings, *, threshold: float = graph.DEFAULT_THRESHOLD, k: int = graph.DEFAULT_K,
               index: str | None = None, progress: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pairs ``(i, j, cosine)``, ``i < j``, of a view of one image at least ``threshold`` similar to the other."""
    return graph.match(emb.vectors, emb.full_view(), threshold=threshold, k=k, exclude_self=True, query_ok=emb.ok,
                       index_ok=emb.ok, spec=index, progress=progress, desc="dedup search")


def group(emb: Embeddings, i: np.ndarray, j: np.ndarray, s: np.ndarray | None = None, *, keep: str = "largest",
          link: str = "components") -> DedupResult:
    """Duplicate groups of the linked pairs ``(i, j)`` (cosine ``s``; ``star`` needs it) by the ``link`` rule;
    one image per group stays (``keep`` rule)."""
    n = len(emb.files)
    if link == "components":
        groups = graph.groups_of(graph.components(n, i, j))
        winners = [graph.keep_one(g, keep, emb.dims, emb.sizes) for g in groups]
    elif link == "star":
        if s is None:
            raise ValueError("link='star' needs the pairs' similarities s")
        labels = graph.star_labels(n, i, j, s, graph.keep_order(np.arange(n), keep, emb.dims, emb.sizes))
        groups = graph.groups_of(labels)
        winners = [int(labels[g[0]]) for g in groups]
    else:
        raise ValueError(f"link rule must be one of {graph.LINK_RULES}, got {link!r}")
    removed: list[Removal] = []
    for gid, (g, winner) in enumerate(zip(groups, winners)):
        removed += [Removal(int(r), "duplicate", winner, gid) for r in g if r != winner]
    gone = np.zeros(n, bool)
    gone[[r.row for r in removed]] = True
    return DedupResult(emb, np.flatnonzero(emb.ok & ~gone), removed, groups, {"keep": keep, "link": link})
