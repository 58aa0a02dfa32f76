"""Linear-probe benchmark: k-NN, linear probe and retrieval for pretrained runs and their baselines.

Evaluates each run directory given (default: ``runs/<recipe>-latest`` of the three Fashion-MNIST recipes that
exist) with :mod:`sslkit.eval.report`, plus raw pixels and a randomly initialised encoder of each run's
architecture, and writes one Markdown table and one JSON file to ``--out``.

It always runs the raw-pixel Fashion-MNIST reference first: k-NN (k=20, T=0.07, cosine) with the full
60k-image train bank and the 10k test images, on the native 28x28 pixels, both L2-normalised and
mean-subtracted + L2-normalised (published reference: about 85-86% top-1), followed by a linear probe and
retrieval on the same pixel features.

Example::

    python benchmarks/linear_probe.py                       # pixel reference + the default runs that exist
    python benchmarks/linear_probe.py runs/my-run --train-subset 10000 --test-subset 2000
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

DEFAULT_RECIPES = ("simclr_resnet_fmnist", "dino_resnet_fmnist", "mae_vit_tiny_fmnist")
REFERENCE_K = 20
KNN_KS = (20, 200)
DEFAULT_RETRIEVAL_QUERIES = 2000


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter,
                                epilog="Outputs: OUT/linear_probe.md and OUT/linear_probe.json; each run also gets "
                                       "its eval/*/results.json and eval/report.md rows.")
    p.add_argument("runs", nargs="*", help="run directories (default: runs/<recipe>-latest for "
                                           + ", ".join(DEFAULT_RECIPES) + ", those that exist)")
    p.add_argument("--runs-root", default="runs", help="where the default -latest links live")
    p.add_argument("--out", default="bench_out", help="output folder")
    p.add_argument("--train-subset", type=int, default=None, help="train images used for run evaluations")
    p.add_argument("--test-subset", type=int, default=None, help="eval-split images used for run evaluations")
    p.add_argument("--retrieval-queries", type=int, default=DEFAULT_RETRIEVAL_QUERIES,
                   help="queries for retrieval (mAP@R searches R ~ 6000 deep on Fashion-MNIST, so it is the slow part)")
    p.add_argument("--epochs", type=int, default=None, help="linear-probe epochs (default: sslkit.eval.linear's)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--no-linear", action="store_true", help="skip the linear probe")
    p.add_argument("--no-retrieval", action="store_true", help="skip retrieval")
    p.add_argument("--no-random", action="store_true", help="skip the random-encoder baseline (feature extraction "
                                                            "of a CNN on 70k images takes minutes on a CPU)")
    p.add_argument("--no-pixel-reference", action="store_true", help="skip the Fashion-MNIST raw-pixel reference")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------------------------------------
# Raw-pixel Fashion-MNIST reference
# ----------------------------------------------------------------------------------------------------------


def pixel_reference(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Raw-pixel k-NN (full bank), linear probe and retrieval on Fashion-MNIST at 28 px."""
    import sslkit.data  # noqa: F401  (registers the datasets)
    from sslkit.eval.knn import knn_classify
    from sslkit.eval.linear import linear_probe
    from sslkit.eval.report import center_and_normalize
    from sslkit.eval.retrieval import retrieval_metrics
    from sslkit.registry import DATASETS

    train, test = DATASETS.build("fashion_mnist", split="train"), DATASETS.build("fashion_mnist", split="test")
    x_train = train._images.flatten(1).float() / 255.0  # (60000, 784), one channel: the data is grayscale
    x_test = test._images.flatten(1).float() / 255.0  # (10000, 784)
    rows = []
    variants = {"raw pixels, L2-normalised": (x_train, x_test),
                "raw pixels, mean-subtracted + L2-normalised": tuple(center_and_normalize(x_train, x_test))}
    for name, (tr, te) in variants.items():
        t0 = time.perf_counter()
        knn = knn_classify(tr, train.labels, te, test.labels, k=list(KNN_KS))
        row = {"features": f"{name} (28 px)", "dataset": "fashion_mnist", "image_size": 28,
               "train_size": len(tr), "test_size": len(te), "knn": {str(k): v for k, v in knn.items()},
               "knn_seconds": round(time.perf_counter() - t0, 2)}
        print(f"[reference] {name}: k-NN k={REFERENCE_K} top-1 {knn[REFERENCE_K]['top1']:.2f}% "
              f"({row['knn_seconds']} s)", flush=True)
        rows.append(row)
    row, (tr, te) = rows[-1], variants["raw pixels, mean-subtracted + L2-normalised"]
    if not args.no_linear:
        t0 = time.perf_counter()
        lin = linear_probe(tr, train.labels, te, test.labels, batchnorm=True,
                           **({"epochs": args.epochs} if args.epochs else {}), device=args.device)
        row["linear"] = {k: lin[k] for k in ("top1", "top5", "best")}
        row["linear_seconds"] = round(time.perf_counter() - t0, 2)
        print(f"[reference] linear probe top-1 {lin['top1']:.2f}% ({row['linear_seconds']} s)", flush=True)
    if not args.no_retrieval:
        n = min(args.retrieval_queries, len(te))
        t0 = time.perf_counter()
        ret = retrieval_metrics(te[:n], test.labels[:n], tr, train.labels)
        row["retrieval"] = {k: ret[k] for k in ("map@r", "r_precision", "recall@1", "precision@10")}
        row["retrieval"]["queries"] = n
        row["retrieval_seconds"] = round(time.perf_counter() - t0, 2)
        print(f"[reference] retrieval mAP@R {ret['map@r']:.2f}% on {n} queries ({row['retrieval_seconds']} s)",
              flush=True)
    return rows


# ----------------------------------------------------------------------------------------------------------
# Runs and their baselines
# ----------------------------------------------------------------------------------------------------------


def default_runs(root: str) -> list[Path]:
    return [Path(root) / f"{r}-latest" for r in DEFAULT_RECIPES if (Path(root) / f"{r}-latest").exists()]


def evaluate(run: Path, baseline: str, args: argparse.Namespace) -> dict[str, Any]:
    """k-NN, linear and retrieval of one feature source of ``run``; a table row."""
    from sslkit.eval.report import run_knn, run_linear, run_retrieval

    opts = {"baseline": baseline, "device": args.device, "train_subset": args.train_subset,
            "test_subset": args.test_subset}
    knn = run_knn(run, k=list(KNN_KS), plots=baseline == "none", **opts)
    feats = knn["features"]
    splits = list(feats["splits"].values())
    row: dict[str, Any] = {"run": str(run), "features": feats["source"], "baseline": baseline,
                           "dataset": feats["dataset"], "image_size": feats["image_size"],
                           "train_size": splits[0]["size"], "test_size": splits[-1]["size"],
                           "feature_seconds": knn["seconds"]["features"], "knn": knn["metrics"],
                           "results": [knn["results_path"]]}
    if not args.no_linear:
        lin = run_linear(run, **({"epochs": args.epochs} if args.epochs else {}), **opts)
        row["linear"] = {k: lin["metrics"][k] for k in ("top1", "top5", "best")}
        row["results"].append(lin["results_path"])
    if not args.no_retrieval:
        n = min(args.retrieval_queries, args.test_subset or args.retrieval_queries)
        ret = run_retrieval(run, plots=baseline == "none", **{**opts, "test_subset": n})
        row["retrieval"] = {k: ret["metrics"][k] for k in ("map@r", "r_precision", "recall@1", "precision@10")}
        row["retrieval"]["queries"] = n
        row["results"].append(ret["results_path"])
    print(f"[{run.name}] {row['features']}: k-NN top-1 {row['knn'][str(REFERENCE_K)]['top1']:.2f}%", flush=True)
    return row


def run_rows(runs: list[Path], args: argparse.Namespace) -> list[dict[str, Any]]:
    from sslkit.run import eval_image_size, load_config, resolve_run_dir

    rows, pixel_keys, random_keys = [], set(), set()
    for run in runs:
        run = resolve_run_dir(run)
        cfg = load_config(run)
        rows.append(evaluate(run, "none", args))
        pkey = (cfg.data.name, json.dumps(dict(cfg.data.get("args") or {}), sort_keys=True), eval_image_size(cfg))
        if pkey not in pixel_keys:  # one pixel baseline per dataset and resolution
            pixel_keys.add(pkey)
            rows.append(evaluate(run, "pixels", args))
        rkey = (json.dumps(dict(cfg.encoder), sort_keys=True, default=str), pkey)
        if not args.no_random and rkey not in random_keys:  # one random encoder per architecture and data
            random_keys.add(rkey)
            rows.append(evaluate(run, "random", args))
    return rows


# ----------------------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------------------


def _pct(row: dict, *path: str) -> str:
    v: Any = row
    for p in path:
        if not isinstance(v, dict) or p not in v:
            return "-"
        v = v[p]
    return f"{v:.2f}"


def markdown(rows: list[dict[str, Any]], env: dict[str, Any]) -> str:
    lines = ["# Linear-probe benchmark", "",
             f"{env['date']}, {env['device']}, torch {env['torch']}. k-NN: DINO weighted vote, T=0.07, cosine. "
             "Linear: lr x wd sweep chosen on a validation split of train, BatchNorm (affine=False) + linear. "
             "Retrieval: eval-split queries vs train gallery, Flat index (Musgrave et al. mAP@R).", "",
             "| features | data | px | train / test | k-NN@20 top-1 | k-NN@200 top-1 | linear top-1 | mAP@R | R@1 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['features']} | {r['dataset']} | {r['image_size']} | {r['train_size']} / {r['test_size']} | "
                     f"{_pct(r, 'knn', '20', 'top1')} | {_pct(r, 'knn', '200', 'top1')} | {_pct(r, 'linear', 'top1')} | "
                     f"{_pct(r, 'retrieval', 'map@r')} | {_pct(r, 'retrieval', 'recall@1')} |")
    if not any("run" in r for r in rows):
        lines += ["", "No run directories were given or found (train one with `make pretrain-simclr`), so only the "
                      "raw-pixel reference is shown."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    from sslkit.run import atomic_write_bytes

    out = Path(args.out)
    runs = [Path(r) for r in args.runs] or default_runs(args.runs_root)
    t0 = time.perf_counter()
    rows = [] if args.no_pixel_reference else pixel_reference(args)
    rows += run_rows(runs, args)
    env = {"date": time.strftime("%Y-%m-%d %H:%M"), "device": args.device or ("cuda" if torch.cuda.is_available()
                                                                             else f"cpu ({platform.processor() or platform.machine()})"),
           "torch": torch.__version__, "threads": torch.get_num_threads(), "seconds": round(time.perf_counter() - t0, 1),
           "argv": sys.argv[1:] if argv is None else argv}
    atomic_write_bytes(out / "linear_probe.json", json.dumps({"env": env, "rows": rows}, indent=2).encode())
    atomic_write_bytes(out / "linear_probe.md", markdown(rows, env).encode())
    print(markdown(rows, env))
    print(f"wrote {out / 'linear_probe.md'} and {out / 'linear_probe.json'} in {env['seconds']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
