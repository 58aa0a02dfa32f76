"""What curation leaves in its output folder, all written atomically.

dedup: ``kept.csv`` / ``kept.txt`` (an image list for ``data.name=image_list``), ``removed.csv`` / ``removed.json``
(each with its reason and the image it duplicates), ``unreadable.csv``, ``groups.png`` (the largest duplicate
groups, kept image first), ``dedup.json`` and ``report.md``.

retrieve: also ``curated.csv`` / ``curated.txt`` (the retrieved pool images, best first, with their scores) and
``retrieve.json``.

balance: ``balanced.txt`` (an image list), ``balanced.csv`` (each image with its cluster at every level),
``balance.json`` and ``report.md`` (each top cluster's images and how many were selected).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np

from sslkit.curate.dedup import DedupResult
from sslkit.curate.retrieve import RetrieveResult
from sslkit.run import atomic_write_bytes

GRID_GROUPS = 8
GRID_MEMBERS = 8
TILE_INCHES = 1.0
DPI = 100


def write_csv(path: Path, header: list[str], rows: list[list[object]]) -> Path:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows(rows)
    atomic_write_bytes(path, buf.getvalue().encode())
    return path


def write_json(path: Path, payload: object) -> Path:
    atomic_write_bytes(path, (json.dumps(payload, indent=2, default=str) + "\n").encode())
    return path


def write_list(path: Path, files: list[str]) -> Path:
    atomic_write_bytes(path, "".join(f"{f}\n" for f in files).encode())
    return path


def write_unreadable(emb, out: Path) -> Path:  # noqa: ANN001 - Embeddings
    """``unreadable.csv``: each image that could not be read, with the error."""
    return write_csv(out / "unreadable.csv", ["path", "error"], [[p, e] for p, e in sorted(emb.bad.items())])


def groups_grid(res: DedupResult, path: Path) -> Path | None:
    """The largest duplicate groups, one row each, the kept image first (green title), the removed in red."""
    from sslkit.data.image_folder import decode_image
    from sslkit.eval.plots import _plt
    from sslkit.run import save_figure_png

    groups = res.groups[:GRID_GROUPS]
    if not groups:
        return None
    plt = _plt()
    kept = set(res.kept.tolist())
    cols = min(GRID_MEMBERS, max(len(g) for g in groups))
    fig, axes = plt.subplots(len(groups), cols, figsize=(cols * TILE_INCHES, len(groups) * TILE_INCHES * 1.15),
                             squeeze=False)
    for r, g in enumerate(groups):
        members = sorted(g.tolist(), key=lambda x: x not in kept)[:cols]
        for c in range(cols):
            ax = axes[r][c]
            ax.axis("off")
            if c >= len(members):
                continue
            f = res.emb.files[members[c]]
            try:
                ax.imshow(decode_image(f).permute(1, 2, 0).numpy())
            except Exception:  # noqa: BLE001 - an image that vanished since it was embedded
                continue
            keep = members[c] in kept
            ax.set_title(("kept " if keep else "") + f.name[:14], fontsize=6, color="#2ca02c" if keep else "#d62728")
    fig.suptitle(f"largest duplicate groups ({len(res.groups)} in all)", fontsize=8)
    save_figure_png(fig, path, DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def dedup_summary(res: DedupResult) -> dict:
    reasons = [r.reason for r in res.removed]
    return {"images": len(res.emb.files), "kept": int(len(res.kept)), "removed_duplicates": reasons.count("duplicate"),
            "removed_eval": reasons.count("eval"), "unreadable": len(res.emb.bad), "groups": len(res.groups),
            "largest_group": int(len(res.groups[0])) if res.groups else 0, "embedded_now": res.emb.computed,
            "embed_seconds": round(res.emb.seconds, 3), "changed_since_last_run": {
                "added": len(res.emb.changes.added), "removed": len(res.emb.changes.removed),
                "modified": len(res.emb.changes.modified)}, "settings": res.settings}


def write_dedup(res: DedupResult, out: Path, *, grid: bool = True) -> dict:
    """Write the dedup outputs into ``out``; returns the summary (also ``dedup.json``)."""
    out.mkdir(parents=True, exist_ok=True)
    files = res.emb.files
    write_csv(out / "kept.csv", ["path"], [[str(files[r])] for r in res.kept])
    write_list(out / "kept.txt", [str(files[r]) for r in res.kept])
    rem = [[str(files[x.row]), x.reason, str(files[x.kept_row]) if x.kept_row >= 0 else x.match, x.group]
           for x in res.removed]
    write_csv(out / "removed.csv", ["path", "reason", "duplicate_of", "group"], rem)
    write_json(out / "removed.json", [dict(zip(["path", "reason", "duplicate_of", "group"], r)) for r in rem])
    write_unreadable(res.emb, out)
    summary = dedup_summary(res)
    summary["groups_png"] = str(groups_grid(res, out / "groups.png")) if grid else None
    write_json(out / "dedup.json", summary)
    lines = ["# Deduplication report", "", "| images | kept | duplicates removed | eval duplicates removed | "
             "unreadable | groups | largest group |", "| --- | --- | --- | --- | --- | --- | --- |",
             f"| {summary['images']} | {summary['kept']} | {summary['removed_duplicates']} | {summary['removed_eval']} "
             f"| {summary['unreadable']} | {summary['groups']} | {summary['largest_group']} |", "",
             f"Settings: `{json.dumps(res.settings)}`. Keep rule `{res.settings.get('keep')}`: "
             + ("the most pixels, then the largest file, then the first path." if res.settings.get("keep") == "largest"
                else "the first path in order.")
             + (" Link rule `star`: every removed image links directly to the image kept in its place."
                if res.settings.get("link") == "star"
                else " Link rule `components`: a connected group keeps one image."),
             ""]
    if res.emb.bad:
        lines += ["Unreadable images (skipped): see `unreadable.csv`, e.g. " + ", ".join(list(res.emb.bad)[:3]), ""]
    if summary["groups_png"]:
        lines += ["![largest duplicate groups](groups.png)", ""]
    atomic_write_bytes(out / "report.md", "\n".join(lines).encode())
    return summary


def write_retrieve(res: RetrieveResult, seed_files: list[Path], out: Path) -> dict:
    """Write the pool's dedup outputs and the retrieved list into ``out``; returns the summary."""
    dedup_part = write_dedup(res.pool_dedup, out)
    files = res.pool_dedup.emb.files
    mode = res.settings.get("mode")
    src = [str(seed_files[s]) if mode == "sample" else int(s) for s in res.sources.tolist()]
    write_csv(out / "curated.csv", ["path", "score", "seed" if mode == "sample" else "cluster"],
              [[str(files[r]), round(float(s), 4), x] for r, s, x in zip(res.rows.tolist(), res.scores.tolist(), src)])
    write_list(out / "curated.txt", [str(files[r]) for r in res.rows])
    summary = {"retrieved": int(len(res.rows)), "pool": len(files), "pool_after_dedup": dedup_part["kept"],
               "seed_images": len(seed_files), "mean_score": float(np.mean(res.scores)) if len(res.scores) else None,
               "settings": res.settings, "pool_dedup": dedup_part}
    write_json(out / "retrieve.json", summary)
    with open(out / "report.md", "a", encoding="utf-8") as f:
        f.write(f"\n# Retrieval\n\n{summary['retrieved']} of {summary['pool_after_dedup']} deduplicated pool images "
                f"retrieved ({mode}); the list is `curated.txt` (train with `data.name=image_list "
                f"data.root={out / 'curated.txt'}`).\n")
    return summary


def write_balance(emb, rows: np.ndarray, levels: list, picked: np.ndarray, out: Path, *,  # noqa: ANN001
                  settings: dict) -> dict:
    """Write the balanced subset (``picked``: positions in ``rows``, the embedded images clustered) into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    path_ids = [levels[0].assign]  # the cluster of every image at each level
    for lv in levels[1:]:
        path_ids.append(lv.assign[path_ids[-1]])
    files = [str(emb.files[r]) for r in rows]
    write_list(out / "balanced.txt", [files[p] for p in picked])
    write_csv(out / "balanced.csv", ["path", *[f"cluster_level{d + 1}" for d in range(len(levels))]],
              [[files[p], *[int(ids[p]) for ids in path_ids]] for p in picked])
    top = path_ids[-1]
    k_top = len(levels[-1].centroids)
    before, after = np.bincount(top, minlength=k_top), np.bincount(top[picked], minlength=k_top)
    summary = {"images": len(emb.files), "clustered": int(len(rows)), "unreadable": len(emb.bad),
               "selected": int(len(picked)), "clusters": [len(lv.centroids) for lv in levels],
               "top_cluster_sizes": before.tolist(), "top_cluster_selected": after.tolist(), "settings": settings}
    write_unreadable(emb, out)
    write_json(out / "balance.json", summary)
    lines = ["# Balanced subset", "", f"{summary['selected']} of {summary['clustered']} images, drawn evenly over "
             f"hierarchical k-means clusters {summary['clusters']} (finest first). Settings: `{json.dumps(settings)}`.",
             "", "| top cluster | images | selected |", "| --- | --- | --- |"]
    lines += [f"| {c} | {before[c]} | {after[c]} |" for c in np.argsort(-before, kind="stable").tolist()]
    atomic_write_bytes(out / "report.md", ("\n".join(lines) + "\n").encode())
    return summary
