"""Pictures for evaluation reports (matplotlib, Agg backend: no display needed).

* :func:`retrieval_grid`: one row per query, the query first and then its nearest neighbours; neighbours
  with the wrong label (or, in copy detection, that are not the source) get a red border.
* :func:`embedding_plot`: a 2-D t-SNE (scikit-learn) of a class-stratified subsample of features,
  coloured by class.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

GRID_QUERIES = 8
GRID_NEIGHBOURS = 8
MAX_EMBED_POINTS = 2000
TSNE_PERPLEXITY = 30.0
TILE_INCHES = 1.1
BORDER_WIDTH = 4
RIGHT_COLOR = "#2ca02c"
WRONG_COLOR = "#d62728"
DPI = 100
SMALL_POINT, LARGE_POINT, MANY_POINTS = 4, 14, 500  # marker areas; small markers above MANY_POINTS points


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _to_hwc(img: torch.Tensor) -> np.ndarray:
    """uint8 ``(3, H, W)`` -> ``(H, W, 3)``."""
    return img.detach().cpu().permute(1, 2, 0).numpy()


def _save(fig, path: Path) -> Path:  # noqa: ANN001
    """Save atomically (a reader sees the old picture or the new one)."""
    from sslkit.run import save_figure_png

    save_figure_png(fig, Path(path), DPI, bbox_inches="tight")
    _plt().close(fig)
    return Path(path)


def retrieval_grid(query_images: torch.Tensor, neighbour_images: torch.Tensor, correct: torch.Tensor | np.ndarray,
                   path: str | Path, *, query_titles: Sequence[str] | None = None,
                   neighbour_titles: Sequence[Sequence[str]] | None = None, title: str = "") -> Path:
    """Save a grid of queries and their neighbours.

    Args:
        query_images: uint8 ``(Q, 3, H, W)``.
        neighbour_images: uint8 ``(Q, K, 3, H', W')``.
        correct: ``(Q, K)`` bool; False draws a red border (True a green one).
        path: PNG to write.
        query_titles: ``Q`` labels shown above the queries; neighbour_titles ``(Q, K)`` above the neighbours.
    """
    plt = _plt()
    correct = np.asarray(correct, dtype=bool)
    q, k = correct.shape
    fig, axes = plt.subplots(q, k + 1, figsize=(TILE_INCHES * (k + 1), TILE_INCHES * q * 1.15), squeeze=False,
                             layout="constrained")
    for i in range(q):
        ax = axes[i, 0]
        ax.imshow(_to_hwc(query_images[i]))
        ax.set_title(f"Q: {query_titles[i]}" if query_titles else "query", fontsize=7, fontweight="bold")
        for j in range(k):
            ax = axes[i, j + 1]
            ax.imshow(_to_hwc(neighbour_images[i, j]))
            if neighbour_titles:
                ax.set_title(str(neighbour_titles[i][j]), fontsize=6)
            color = RIGHT_COLOR if correct[i, j] else WRONG_COLOR
            for side in ax.spines.values():
                side.set_visible(True)
                side.set_edgecolor(color)
                side.set_linewidth(BORDER_WIDTH if not correct[i, j] else 1)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, Path(path))


def stratified_subsample(labels: torch.Tensor, max_points: int, seed: int = 0) -> torch.Tensor:
    """At most ``max_points`` indices, drawn at random but in proportion to the classes. ``(N,) -> (M,)``."""
    n = len(labels)
    if n <= max_points:
        return torch.arange(n)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(n, generator=g)
    # Sorting a random permutation by label and taking every (n / max_points)-th keeps class proportions.
    by_label = perm[torch.argsort(labels[perm], stable=True)]
    take = torch.linspace(0, n - 1, max_points).round().long()
    return by_label[take].sort().values


def embed_2d(features: torch.Tensor, seed: int = 0, method: str = "tsne") -> np.ndarray:
    """``(M, D) -> (M, 2)`` with t-SNE (PCA-initialised) or PCA."""
    x = features.detach().cpu().float().numpy()
    if method == "pca" or len(x) < 4:
        from sklearn.decomposition import PCA

        comps = min(2, *x.shape)
        out = PCA(n_components=comps, random_state=seed).fit_transform(x) if comps else np.zeros((len(x), 0))
        return np.pad(out, ((0, 0), (0, 2 - out.shape[1])))
    if method != "tsne":
        raise ValueError(f"embedding method must be 'tsne' or 'pca', got {method!r}")
    from sklearn.manifold import TSNE

    perplexity = min(TSNE_PERPLEXITY, (len(x) - 1) / 3.0)
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(x)


def embedding_plot(features: torch.Tensor, labels: torch.Tensor, path: str | Path, *,
                   class_names: Sequence[str] | None = None, max_points: int = MAX_EMBED_POINTS,
                   method: str = "tsne", seed: int = 0, title: str = "") -> Path:
    """Save a 2-D embedding of ``features`` ``(N, D)`` coloured by ``labels`` ``(N,)`` (≤ ``max_points`` points)."""
    plt = _plt()
    idx = stratified_subsample(labels, max_points, seed)
    xy = embed_2d(features[idx], seed, method)  # (M, 2)
    lab = labels[idx].numpy()
    fig, ax = plt.subplots(figsize=(6.5, 5.5), layout="constrained")
    size = SMALL_POINT if len(idx) > MANY_POINTS else LARGE_POINT
    classes = np.unique(lab)
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    for i, c in enumerate(classes):
        m = lab == c
        name = class_names[c] if class_names is not None and 0 <= c < len(class_names) else str(c)
        ax.scatter(xy[m, 0], xy[m, 1], s=size, color=cmap(i % cmap.N), label=name, alpha=0.8, linewidths=0)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title or f"{method.upper()} of {len(idx)} features", fontsize=9)
    ax.legend(markerscale=3, fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    return _save(fig, Path(path))
