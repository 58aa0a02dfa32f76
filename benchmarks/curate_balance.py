"""Balanced subsets of a long-tailed pool: hierarchical k-means sampling (``sslkit curate balance``) against random.

The pool: Fashion-MNIST train images with a long tail over the 10 classes (class ``c`` keeps
``round(--head * --decay ** rank)`` images, the ranks in a fixed random order of the classes), written as PNGs.
Each configuration draws ``--size`` images, once per ``--seeds``; the labels are never used to draw, only to
score the subset's class counts:

* ``min_class``: images of the rarest class in the subset, and ``tail_share``: the share of the 5 rarest classes;
* ``entropy``: the class distribution's entropy over log(10) (1 = even).

Random sampling keeps the pool's shape; an even draw over the classes would give ``--size / 10`` each. Encoders:
``builtin`` (the copy descriptor) and any ``--encoder RUN`` (a pretrained run: semantic features).

Example::

    python benchmarks/curate_balance.py --size 2000 --encoder builtin --encoder runs/simclr_resnet_fmnist-latest
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from time_to_accuracy import cpu_model  # noqa: E402

from sslkit.curate.balance import auto_clusters, hierarchical_kmeans, hierarchical_sample  # noqa: E402
from sslkit.curate.embed import embed_collection  # noqa: E402
from sslkit.curate.embedders import load_embedder  # noqa: E402
from sslkit.curate.plant import write_images  # noqa: E402

CONFIGS = {"k-means, one level (auto's first)": ("first", 0), "hierarchical, auto levels": (None, 0),
           "hierarchical, auto levels, 10 resampling steps": (None, 10),
           "hierarchical 100,10 (coarse)": ([100, 10], 0)}


def long_tail_pool(folder: Path, head: int, decay: float, seed: int) -> tuple[list[Path], np.ndarray, list[int]]:
    from sslkit.registry import DATASETS

    ds = DATASETS.build("fashion_mnist", split="train")
    labels = ds.labels.numpy()
    rng = np.random.default_rng(seed)
    order = rng.permutation(10)  # order[r]: the class of rank r
    counts = [0] * 10
    rows = []
    for rank, c in enumerate(order.tolist()):
        counts[c] = max(1, round(head * decay ** rank))
        rows.append(np.sort(rng.choice(np.flatnonzero(labels == c), counts[c], replace=False)))
    rows = np.sort(np.concatenate(rows))
    paths = write_images(ds._images[rows, 0].numpy(), folder)
    return paths, labels[rows], counts


def scores(y: np.ndarray) -> dict:
    c = np.bincount(y, minlength=10)
    p = c / max(1, c.sum())
    nz = p[p > 0]
    return {"class_counts": c.tolist(), "min_class": int(c.min()), "tail_share": float(np.sort(c)[:5].sum() / c.sum()),
            "entropy": float(-(nz * np.log(nz)).sum() / np.log(10))}


def mean_scores(runs: list[dict]) -> dict:
    return {k: float(np.mean([r[k] for r in runs])) for k in ("min_class", "tail_share", "entropy")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=2000, help="images in each subset")
    p.add_argument("--head", type=int, default=6000, help="images of the most frequent class")
    p.add_argument("--decay", type=float, default=0.6, help="each next class keeps this fraction of the last")
    p.add_argument("--encoder", action="append", default=[], help="builtin, a run directory or timm:<name> (repeat)")
    p.add_argument("--seeds", default="0,1,2", help="sampling (and k-means) seeds")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "curate_balance"))
    args = p.parse_args(argv)
    encoders = args.encoder or ["builtin"]
    seeds = [int(s) for s in args.seeds.split(",")]
    result = {"cpu": cpu_model(), "command": "python " + " ".join(sys.argv), "size": args.size, "seeds": seeds}
    with tempfile.TemporaryDirectory() as tmp:
        paths, y, counts = long_tail_pool(Path(tmp) / "pool", args.head, args.decay, 0)
        result.update(pool=len(paths), pool_counts=counts, pool_scores=scores(y))
        result["random"] = mean_scores(runs := [scores(y[np.random.default_rng(s).choice(len(y), args.size,
                                                                                           replace=False)])
                                                for s in seeds])
        result["random_runs"] = runs
        print("random", result["random"], flush=True)
        for name in encoders:
            emb = embed_collection(Path(tmp) / "pool", load_embedder(name), Path(tmp) / "cache",
                                   boxes=[(0.0, 0.0, 1.0)], desc=f"embed ({name})")
            vecs = emb.full_view()
            out = result.setdefault("encoders", {})[name] = {"embed_seconds": emb.seconds}
            for label, (clusters, steps) in CONFIGS.items():
                clusters = auto_clusters(len(vecs))[:1] if clusters == "first" else clusters or auto_clusters(len(vecs))
                t0 = time.perf_counter()
                runs = []
                for s in seeds:
                    levels = hierarchical_kmeans(vecs, clusters, resample_steps=steps, seed=s)
                    runs.append(scores(y[hierarchical_sample(levels, args.size, seed=s)]))
                out[label] = {**mean_scores(runs), "runs": runs, "clusters": clusters, "resample_steps": steps,
                              "seconds_per_draw": (time.perf_counter() - t0) / len(seeds)}
                print(name, label, mean_scores(runs), flush=True)
    from sslkit.curate.report import write_json
    from sslkit.run import atomic_write_bytes

    write_json(Path(args.out + ".json"), result)
    atomic_write_bytes(Path(args.out + ".md"), markdown(result).encode())
    print(markdown(result))
    return 0


def markdown(r: dict) -> str:
    def row(label: str, s: dict, counts: list[int] | None = None) -> str:
        return (f"| {label} | {s['min_class']:.1f} | {s['tail_share']:.3f} | {s['entropy']:.3f} | "
                f"{' '.join(map(str, counts)) if counts else ''} |")

    lines = [f"# Balanced subsets of a long-tailed pool ({r['cpu']})", "", f"Command: `{r['command']}`.", "",
             f"Pool: {r['pool']} Fashion-MNIST train images, per class {r['pool_counts']} (entropy "
             f"{r['pool_scores']['entropy']:.3f}). Subsets of {r['size']} images; means over seeds {r['seeds']}; "
             f"an even subset would hold {r['size'] // 10} per class (entropy 1).", "",
             "| subset | images of the rarest class | share of the 5 rarest classes | entropy / log 10 "
             "| class counts (first seed) |", "| --- | --- | --- | --- | --- |",
             row("random", r["random"], r["random_runs"][0]["class_counts"])]
    for enc, d in r.get("encoders", {}).items():
        for label, s in d.items():
            if isinstance(s, dict):
                lines.append(row(f"{label} ({Path(enc).name})", s, s["runs"][0]["class_counts"]))
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
