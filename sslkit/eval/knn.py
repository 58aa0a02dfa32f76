"""Weighted k-nearest-neighbour classification on frozen features.

The protocol of DINO (Caron et al., 2021, ``eval_knn.py``, after Wu et al., 2018): cosine similarity between
L2-normalised features, the ``k`` most similar training features vote for their labels with weight
``exp(sim / T)``, and the class with the largest summed weight wins. Top-5 counts a hit when the true class is
among the 5 highest-scoring classes that received a vote (so, as in DINO, top-5 equals top-1 for k = 1).

Search uses a FAISS ``IndexFlatIP`` (exact), on the GPU when CUDA and a GPU build of faiss are present;
queries are processed in chunks, and the result does not depend on the chunk size.

``center=True`` subtracts the bank's mean feature from bank and queries before the L2 normalisation. Raw pixels
need it (Fashion-MNIST k=20: 84.6% without, 86.1% with), and sslkit's reports apply it to every feature
source, pixels and encoders alike, so that they are compared under one protocol; ``center=False`` is DINO's
protocol exactly, and the reports give that figure too.

``whiten=d`` goes one step further than centring: PCA whitening learned on the bank (Jegou & Chum, ECCV 2012,
"Negative evidences and co-occurrences in image retrieval: the benefit of PCA and whitening"; DINO whitens its
copy-detection features the same way). Bank and queries are centred on the bank mean, projected on the bank's
``d`` leading principal axes and each axis divided by its standard deviation, then L2-normalised as usual. It
uses no labels, only the bank's features, so it is still a frozen-feature protocol; it is a different protocol
from DINO's, though, and the reports always give the plain figures next to it.

Example::

    res = knn_classify(train_f, train_y, test_f, test_y, k=[10, 20])
    res[20]["top1"]  # percent
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

DEFAULT_KS = (10, 20, 100, 200)
DEFAULT_K = 20
DEFAULT_TEMPERATURE = 0.07
DEFAULT_CHUNK_SIZE = 1024
TOPK_ACCURACY = 5  # the "top-5" of top-1/top-5


def faiss_gpu_available() -> bool:
    """True when CUDA is usable and the installed faiss has GPU support."""
    import faiss

    return torch.cuda.is_available() and hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def center_on(reference: torch.Tensor | np.ndarray, *others: torch.Tensor | np.ndarray) -> list[torch.Tensor]:
    """``reference`` and ``others`` (float32) minus ``reference``'s mean row. ``(N, D)`` each."""
    sets = [torch.as_tensor(t).float() for t in (reference, *others)]
    mean = sets[0].mean(dim=0, keepdim=True)  # (1, D)
    return [t - mean for t in sets]


WHITEN_EPS = 1e-6  # axes whose variance is below this fraction of the largest are dropped (rank-deficient banks)


def pca_whitening(reference: torch.Tensor | np.ndarray, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The bank's mean and whitening projection: ``(1, D)`` mean and ``(D, d)`` matrix, float32.

    ``(x - mean) @ proj`` has, over ``reference``, zero mean and identity covariance on its ``d`` columns: the
    ``d`` leading principal axes (``d = min(dim, D, numerical rank)``), each scaled by 1/sqrt(its variance).
    The covariance is accumulated in float32 and decomposed in float64 (exact ``eigh``, no randomisation).
    """
    if dim <= 0:
        raise ValueError(f"the whitening dimension must be positive, got {dim}")
    x = torch.as_tensor(reference).float()
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"whitening needs a bank of at least 2 rows (N, D), got {tuple(x.shape)}")
    mean = x.mean(dim=0, keepdim=True)  # (1, D)
    xc = x - mean
    cov = (xc.T @ xc).double() / (len(x) - 1)  # (D, D)
    var, axes = torch.linalg.eigh(cov)  # ascending
    var, axes = var.flip(0), axes.flip(1)
    keep = int((var > WHITEN_EPS * var[0].clamp_min(torch.finfo(torch.float64).tiny)).sum())
    d = max(1, min(dim, keep))
    return mean, (axes[:, :d] / var[:d].sqrt()).float()


def whiten_on(reference: torch.Tensor | np.ndarray, *others: torch.Tensor | np.ndarray,
              dim: int) -> list[torch.Tensor]:
    """``reference`` and ``others`` PCA-whitened with :func:`pca_whitening` of ``reference``: ``(N, d)`` each."""
    mean, proj = pca_whitening(reference, dim)
    return [(torch.as_tensor(t).float() - mean) @ proj for t in (reference, *others)]


def l2_normalize(x: torch.Tensor | np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm, as contiguous float32 NumPy (what FAISS wants). ``(N, D) -> (N, D)``."""
    a = x.detach().cpu().float().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float32)
    a = np.ascontiguousarray(a, dtype=np.float32)
    norms = np.linalg.norm(a, axis=1, keepdims=True)
    return np.ascontiguousarray(a / np.maximum(norms, np.finfo(np.float32).tiny))


def to_gpu_if_available(index, use_gpu: bool | None = None):  # noqa: ANN001, ANN201 - faiss types
    """Move a FAISS index to GPU 0 when ``use_gpu`` (None = when :func:`faiss_gpu_available`)."""
    import faiss

    if use_gpu is None:
        use_gpu = faiss_gpu_available()
    if not use_gpu:
        return index
    res = faiss.StandardGpuResources()
    gpu_index = faiss.index_cpu_to_gpu(res, 0, index)
    gpu_index._sslkit_res = res  # keep the resources alive as long as the index
    return gpu_index


def flat_ip_index(bank: np.ndarray, use_gpu: bool | None = None):  # noqa: ANN201
    """Exact inner-product index over ``bank`` ``(N, D)`` float32 (normalise first for cosine)."""
    import faiss

    index = faiss.IndexFlatIP(bank.shape[1])
    index = to_gpu_if_available(index, use_gpu)
    index.add(bank)
    return index


def weighted_vote(sims: torch.Tensor, neighbour_labels: torch.Tensor, num_classes: int,
                  temperature: float) -> torch.Tensor:
    """Class scores from neighbours (DINO eval_knn).

    Args:
        sims: ``(Q, k)`` cosine similarities of each query's neighbours.
        neighbour_labels: ``(Q, k)`` long, the neighbours' labels.
        num_classes: C.
        temperature: T in ``exp(sim / T)``.

    Returns:
        ``(Q, C)`` summed weights per class.
    """
    weights = (sims.double() / temperature).exp()  # (Q, k); float64 so exp(1/0.07) sums stay exact enough
    scores = torch.zeros(sims.shape[0], num_classes, dtype=torch.float64)
    return scores.scatter_add_(1, neighbour_labels, weights)  # (Q, C)


def vote_hits(scores: torch.Tensor, labels: torch.Tensor, topk: int = TOPK_ACCURACY) -> tuple[int, int]:
    """Numbers of top-1 and top-``topk`` hits for class scores ``(Q, C)`` and true labels ``(Q,)``.

    Top-1: ``argmax`` (first class on ties). Top-k: the true class got a vote (score > 0) and fewer than
    ``topk`` classes scored strictly higher.
    """
    top1 = scores.argmax(dim=1) == labels  # (Q,)
    own = scores.gather(1, labels[:, None]).squeeze(1)  # (Q,)
    higher = (scores > own[:, None]).sum(dim=1)  # (Q,)
    topk_hit = (own > 0) & (higher < topk)
    return int(top1.sum()), int(topk_hit.sum())


def _as_ks(k: int | Sequence[int]) -> list[int]:
    ks = [int(k)] if isinstance(k, int | np.integer) else [int(v) for v in k]
    if not ks or any(v <= 0 for v in ks):
        raise ValueError(f"k must be a positive int or a non-empty list of them, got {k!r}")
    return ks


def _check_inputs(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                  test_labels: torch.Tensor) -> None:
    if train_feats.ndim != 2 or test_feats.ndim != 2 or train_feats.shape[1] != test_feats.shape[1]:
        raise ValueError(f"features must be (N, D) with the same D, got {tuple(train_feats.shape)} and "
                         f"{tuple(test_feats.shape)}")
    if len(train_feats) != len(train_labels) or len(test_feats) != len(test_labels):
        raise ValueError("one label per feature row is needed")
    if len(train_feats) == 0:
        raise ValueError("the k-NN bank (train features) is empty")
    if (torch.as_tensor(train_labels) < 0).any() or (torch.as_tensor(test_labels) < 0).any():
        raise ValueError("k-NN needs labelled data; found label -1 (unlabelled images)")


def knn_classify(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                 test_labels: torch.Tensor, *, k: int | list[int] = DEFAULT_K, temperature: float = DEFAULT_TEMPERATURE,
                 num_classes: int | None = None, chunk_size: int = DEFAULT_CHUNK_SIZE,
                 use_gpu: bool | None = None, center: bool = False, whiten: int | None = None) -> dict:
    """Temperature-weighted k-NN accuracy (DINO ``eval_knn.py``), in percent.

    Args:
        train_feats: ``(N, D)`` bank features; any scale (they are L2-normalised here).
        train_labels: ``(N,)`` long.
        test_feats: ``(Q, D)`` query features.
        test_labels: ``(Q,)`` long.
        k: neighbours; an int, or a list to evaluate several k from one search. k above N is clipped to N.
        temperature: T of the vote weights ``exp(sim / T)``.
        num_classes: C; None = 1 + the largest label seen.
        chunk_size: queries per search call (memory bound only; results do not depend on it).
        use_gpu: FAISS on GPU; None = when available.
        center: subtract the bank's mean feature from both sets before normalising (see the module notes).
        whiten: PCA-whiten both sets to this many dimensions, learned on the bank, before normalising (it
            centres too, so ``center`` is then moot); None = off. See the module notes.

    Returns:
        ``{"top1": %, "top5": %}`` for an int ``k``; ``{k: {"top1": %, "top5": %}}`` for a list.
    """
    _check_inputs(train_feats, train_labels, test_feats, test_labels)
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    ks = _as_ks(k)
    train_y = torch.as_tensor(train_labels).long().cpu()  # (N,)
    test_y = torch.as_tensor(test_labels).long().cpu()  # (Q,)
    if num_classes is None:
        num_classes = int(max(train_y.max(), test_y.max() if len(test_y) else 0)) + 1
    if whiten is not None:
        train_feats, test_feats = whiten_on(train_feats, test_feats, dim=int(whiten))
    elif center:
        train_feats, test_feats = center_on(train_feats, test_feats)
    bank = l2_normalize(train_feats)  # (N, D)
    queries = l2_normalize(test_feats)  # (Q, D)
    index = flat_ip_index(bank, use_gpu)
    k_max = min(max(ks), len(bank))

    hits = {kk: [0, 0] for kk in ks}
    for start in range(0, len(queries), chunk_size):
        sims, idx = index.search(queries[start:start + chunk_size], k_max)  # (q, k_max) each, best first
        sims_t, nb_labels = torch.from_numpy(sims), train_y[torch.from_numpy(idx)]  # (q, k_max)
        y = test_y[start:start + chunk_size]  # (q,)
        for kk in ks:
            kc = min(kk, k_max)
            scores = weighted_vote(sims_t[:, :kc], nb_labels[:, :kc], num_classes, temperature)  # (q, C)
            h1, h5 = vote_hits(scores, y)
            hits[kk][0] += h1
            hits[kk][1] += h5
    total = max(len(queries), 1)
    results = {kk: {"top1": 100.0 * h1 / total, "top5": 100.0 * h5 / total} for kk, (h1, h5) in hits.items()}
    return results[ks[0]] if isinstance(k, int | np.integer) else results


def knn_protocols(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                  test_labels: torch.Tensor, *, center: bool = True, whiten: int | None = None, **kw) -> dict:
    """:func:`knn_classify` under ``center`` / ``whiten``, with the plainer protocols alongside: each result also
    carries ``top1_centred`` / ``top5_centred`` (when whitening and centring) and ``top1_uncentred`` /
    ``top5_uncentred`` (DINO's exact protocol; when centring or whitening). ``kw`` goes to :func:`knn_classify`;
    the result has its shape (flat for an int ``k``, per ``k`` for a list)."""
    args = (train_feats, train_labels, test_feats, test_labels)
    main = knn_classify(*args, center=center, whiten=whiten, **kw)
    plainer = ([("centred", True)] if whiten is not None and center else []) + (
        [("uncentred", False)] if whiten is not None or center else [])
    per_k = isinstance(kw.get("k", DEFAULT_K), int | np.integer)
    rows = {None: main} if per_k else main
    for name, c in plainer:
        other = knn_classify(*args, center=c, **kw)
        for kk, row in rows.items():
            got = other if per_k else other[kk]
            row.update({f"top1_{name}": got["top1"], f"top5_{name}": got["top5"]})
    return main


def headline_protocols(train_feats: torch.Tensor, train_labels: torch.Tensor, test_feats: torch.Tensor,
                       test_labels: torch.Tensor, *, center: bool = True, whiten: int | None = None, **kw) -> dict:
    """The k-NN figures a run reports, headline first.

    ``top1`` / ``top5`` are the standard protocol: DINO's weighted vote on L2-normalised features centred on the
    bank mean (``center=False``: DINO's exact, uncentred protocol). ``top1_uncentred`` / ``top5_uncentred`` stand
    beside it when centring. ``whiten=d`` adds ``top1_whitened`` / ``top5_whitened``: PCA-whitened to ``d``
    dimensions on the bank, a different protocol that is labelled as such and never the headline. ``kw`` goes
    to :func:`knn_classify` and must give one ``k``; the result is flat.
    """
    if not isinstance(kw.get("k", DEFAULT_K), int | np.integer):
        raise ValueError("headline_protocols takes one k")
    args = (train_feats, train_labels, test_feats, test_labels)
    out = dict(knn_classify(*args, center=center, **kw))
    if center:
        plain = knn_classify(*args, center=False, **kw)
        out.update(top1_uncentred=plain["top1"], top5_uncentred=plain["top5"])
    if whiten:
        white = knn_classify(*args, center=True, whiten=whiten, **kw)
        out.update(top1_whitened=white["top1"], top5_whitened=white["top5"])
    return out
