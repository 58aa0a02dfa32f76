"""Pictures for people: ``sslkit viz attention`` and ``pca`` (ViTs), ``gradcam`` (CNNs), ``reconstruct`` (MAE).

Each sub-module exposes ``add_arguments(parser)`` and ``run(args) -> int`` for the CLI.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

GRID_PANEL_INCHES = 1.6  # one panel of a rows-of-images grid (viz pca, viz gradcam)


def save_panel_grid(rows: list[list[Any]], cols: list[str], names: list[str], path: Path, *,
                    xlabels: list[str] | None = None, **imshow: Any) -> Path:
    """A grid PNG, one row per image: ``rows[i][j]`` is an (H, W) or (H, W, 3) array shown with ``imshow``
    options (a 2-D panel takes ``imshow["cmap"]``, colour ones none); ``cols`` titles the first row, ``names``
    labels each row, ``xlabels`` (optional) goes under each row's last panel."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sslkit.run import save_figure_png

    cmap = imshow.pop("cmap", None)
    fig, axes = plt.subplots(len(rows), len(cols), squeeze=False,
                             figsize=(GRID_PANEL_INCHES * len(cols), GRID_PANEL_INCHES * len(rows)))
    for i, panels in enumerate(rows):
        for j, panel in enumerate(panels):
            ax = axes[i, j]
            ax.imshow(panel, cmap=cmap if panel.ndim == 2 else None, **imshow)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(cols[j], fontsize=8)
        axes[i, 0].set_ylabel(names[i], fontsize=6)
        if xlabels is not None:
            axes[i, len(panels) - 1].set_xlabel(xlabels[i], fontsize=6)
    fig.tight_layout()
    save_figure_png(fig, path, 120)
    plt.close(fig)
    return path
