"""``sslkit eval {knn,linear,retrieval,copy} RUN_OR_CHECKPOINT``: a thin argparse layer over :mod:`sslkit.eval.report`.

The main CLI calls :func:`add_subcommands` on its ``eval`` sub-parsers; ``python -m sslkit.eval.cli`` runs the
same commands on their own. Each command prints a table of its metrics and the path of ``results.json``.
``--baseline all`` evaluates the run's encoder, raw pixels and a random encoder one after another and prints
them side by side, which shows what pretraining added.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

from sslkit.eval import knn as knn_mod
from sslkit.eval import linear as linear_mod
from sslkit.eval import retrieval as retrieval_mod
from sslkit.eval.sources import add_source_arguments, source_options
from sslkit.registry import error_line

BASELINE_CHOICES = ("none", "pixels", "random", "all")
EXIT_USAGE = 2


def _common(p: argparse.ArgumentParser) -> None:
    add_source_arguments(p)  # SOURCE (run, timm:, pixels, random:) and the dataset to evaluate on
    p.add_argument("--baseline", choices=BASELINE_CHOICES, default="none",
                   help="features to evaluate: the source's encoder (none), raw pixels, a randomly initialised "
                        "encoder of the source's architecture, or all three side by side")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--batch-size", type=int, default=None, help="feature-extraction batch (default: eval.batch_size)")
    p.add_argument("--train-subset", type=int, default=None, metavar="N",
                   help="use a fixed random N images of the train split (the k-NN bank / gallery)")
    p.add_argument("--test-subset", type=int, default=None, metavar="N",
                   help="use a fixed random N images of the eval split (the queries)")
    p.add_argument("--no-cache", action="store_true",
                   help="extract features again and do not write them (default: cache in RUN/features/)")
    p.add_argument("--cache-dir", default=None, help="feature cache folder (default: RUN/features/)")
    p.add_argument("--seed", type=int, default=0, help="subsets, random-encoder weights, copies, plots")
    p.add_argument("--bf16", action="store_true",
                   help="bf16 autocast for feature extraction also on CPU (about 2x faster for CNNs on AVX-512 BF16 "
                        "CPUs; features differ slightly and are cached separately). Always on with CUDA")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _plots(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-plots", action="store_true", help="skip the PNGs (t-SNE is the slow one on CPU)")


def _index_args(p: argparse.ArgumentParser) -> None:
    """The FAISS index options shared by retrieval and copy detection."""
    p.add_argument("--index", default=retrieval_mod.DEFAULT_INDEX,
                   help="FAISS factory string: Flat | IVF<nlist>,Flat | HNSW<M> | IVF<nlist>,PQ<m>")
    p.add_argument("--nprobe", type=int, default=None,
                   help=f"IVF lists searched (default {retrieval_mod.DEFAULT_NPROBE}; = nlist is exact)")


def add_subcommands(subparsers: argparse._SubParsersAction) -> None:
    """Add ``knn``, ``linear``, ``retrieval`` and ``copy`` to ``subparsers`` (each sets ``func(args) -> int``)."""
    p = subparsers.add_parser("knn", help="weighted k-NN classification (DINO protocol)",
                              description="Temperature-weighted k-NN of the eval split against the train split "
                                          "(DINO eval_knn: cosine, top-k neighbours vote with exp(sim/T)). The "
                                          "main figures (top1 / top5) are the standard protocol: features centred "
                                          "on the bank mean, then L2-normalised; DINO's uncentred figures "
                                          "(top1_uncentred) and, when asked, PCA-whitened ones (top1_whitened) "
                                          "are given beside them.")
    _common(p)
    _plots(p)
    p.add_argument("--k", type=int, nargs="+", default=list(knn_mod.DEFAULT_KS), help="neighbours (several allowed)")
    p.add_argument("--temperature", type=float, default=knn_mod.DEFAULT_TEMPERATURE,
                   help="vote temperature T (DINO: 0.07)")
    p.add_argument("--no-center", action="store_true",
                   help="main figures without subtracting the bank's mean feature (DINO's exact protocol). By "
                        "default top1 / top5 are centred, as raw pixels need, with the uncentred figures beside")
    p.add_argument("--whiten", type=int, default=None, metavar="D",
                   help="also give top1_whitened / top5_whitened: features PCA-whitened to D dimensions learned on "
                        "the bank, without labels (Jegou & Chum 2012), then L2-normalised. A different protocol, "
                        "reported beside the main top1 / top5 and never in their place. Default: the run's "
                        "eval.knn_whiten (none in the shipped recipes); 0 = none")
    p.add_argument("--bank-dtype", choices=knn_mod.BANK_DTYPES, default=None,
                   help="store the k-NN bank in this precision and search it in chunks (float16 halves the memory; "
                        "similarities move by at most 2^-11). Default: float32 FAISS search, float16 chunks for "
                        "banks above 1 GiB in float32")
    p.add_argument("--bank-on-disk", action=argparse.BooleanOptionalAction, default=None,
                   help="keep the chunked bank in a temporary .npy file instead of memory (default: above 4 GiB)")
    p.add_argument("--chunk-size", type=int, default=None, metavar="ROWS",
                   help="bank rows per chunk of the chunked search: peak memory grows with it, not with the bank "
                        "(default: about 1M numbers per chunk)")
    p.set_defaults(func=cmd_knn)

    p = subparsers.add_parser("linear", help="linear probe on frozen features",
                              description="Linear classifier on frozen features. lr and weight decay are swept and "
                                          "chosen on a validation split of the TRAIN set, then retrained on all of "
                                          "train and scored once on the eval split.")
    _common(p)
    p.add_argument("--lrs", type=float, nargs="+", default=list(linear_mod.DEFAULT_LRS), help="learning rates swept")
    p.add_argument("--wds", type=float, nargs="+", default=list(linear_mod.DEFAULT_WEIGHT_DECAYS),
                   help="weight decays swept")
    p.add_argument("--epochs", type=int, default=None,
                   help=f"default {linear_mod.DEFAULT_EPOCHS} on features, {linear_mod.PAPER_EPOCHS} with --paper")
    p.add_argument("--linear-batch-size", type=int, default=linear_mod.DEFAULT_BATCH_SIZE,
                   help="classifier mini-batch on features; 0 = full batch")
    p.add_argument("--val-fraction", type=float, default=linear_mod.DEFAULT_VAL_FRACTION,
                   help="share of train held out to pick lr / weight decay")
    p.add_argument("--no-batchnorm", action="store_true",
                   help="no BatchNorm1d(affine=False) before the classifier (on by default, MAE recipe)")
    p.add_argument("--paper", action="store_true",
                   help="train on augmented images (random resized crop + flip) through the frozen encoder, SGD + "
                        "cosine (DINO/MAE protocol). Slow on CPU: a GPU recipe option")
    p.add_argument("--lr", type=float, default=linear_mod.PAPER_LR, help="--paper: lr for batch 256 (scaled linearly)")
    p.add_argument("--label-fraction", type=float, default=None, metavar="F",
                   help="train on a fixed, seeded, class-balanced fraction F of the train labels (SimCLR's 0.01 / 0.1 "
                        "protocol); the test split stays whole")
    p.set_defaults(func=cmd_linear)

    p = subparsers.add_parser("retrieval", help="image retrieval with FAISS (mAP@R, recall@k)",
                              description="Eval-split queries against the train-split gallery. Label metrics after "
                                          "Musgrave et al. 2020 (mAP@R, R-precision, recall@k, precision@k); "
                                          "approximate indexes also report recall of exact neighbours and speed-up.")
    _common(p)
    _plots(p)
    _index_args(p)
    p.add_argument("--ef-search", type=int, default=retrieval_mod.DEFAULT_EF_SEARCH, help="HNSW search breadth")
    p.add_argument("--ks", type=int, nargs="+", default=list(retrieval_mod.DEFAULT_KS), help="recall@k cut-offs")
    p.add_argument("--queries", default=None, metavar="DIR",
                   help="with --gallery: retrieve the images of this folder in the gallery folder instead of the "
                        "run's splits; reports mAP, mAP@R and recall@k")
    p.add_argument("--gallery", default=None, metavar="DIR", help="the gallery folder for --queries")
    p.add_argument("--ground-truth", default=None, metavar="FILE.json",
                   help="relevance for --queries / --gallery: {\"query/rel/path.jpg\": [\"gallery/rel/path.jpg\", ...]}; "
                        "default: images in class folders of the same name are relevant")
    p.set_defaults(func=cmd_retrieval)

    p = subparsers.add_parser("copy", help="copy detection: find the source of augmented copies",
                              description="Queries are strongly augmented copies (crop, colour jitter, blur, JPEG) of "
                                          "eval-split images; reports mAP and recall@k of finding the source "
                                          "(DINO copy-detection style).")
    _common(p)
    _plots(p)
    _index_args(p)
    p.add_argument("--num-queries", type=int, default=retrieval_mod.DEFAULT_COPY_QUERIES, help="copies to search for")
    p.add_argument("--whiten", type=int, default=0, metavar="D",
                   help="PCA-whiten the features to D dimensions learned on the gallery, without labels, before the "
                        "search (DINO's copy detection whitens); the plain figures are given too. Default 0 = off")
    p.add_argument("--ks", type=int, nargs="+", default=list(retrieval_mod.DEFAULT_KS), help="recall@k cut-offs")
    p.add_argument("--folder", default=None, metavar="DIR",
                   help="copy detection on this image folder (copies of its images searched among all of them and "
                        "--distractors) instead of the run's eval split")
    p.add_argument("--distractors", default=None, metavar="DIR", help="extra gallery images for --folder")
    p.set_defaults(func=cmd_copy)

    # Verbs whose module exposes add_arguments(parser) and run(args) (their options differ from the common ones).
    from sslkit.eval import segment as segment_mod

    p = subparsers.add_parser("segment", help="linear segmentation probe on frozen patch features (mIoU)",
                              description=segment_mod.__doc__.split("\n\n")[1])
    segment_mod.add_arguments(p)
    p.set_defaults(func=segment_mod.run)

    from sslkit.eval import finetune as finetune_mod

    p = subparsers.add_parser("finetune", help="end-to-end fine-tuning with a linear head, beside the linear probe",
                              description=finetune_mod.__doc__.split("\n\n")[1])
    finetune_mod.add_arguments(p)
    p.set_defaults(func=finetune_mod.run)


def _opts(args: argparse.Namespace) -> dict[str, Any]:
    return {"device": args.device, "batch_size": args.batch_size, "train_subset": args.train_subset,
            "test_subset": args.test_subset, "use_cache": not args.no_cache, "cache_dir": args.cache_dir,
            "seed": args.seed, "progress": not args.no_progress, "bf16": True if args.bf16 else None,
            **source_options(args)}


def flatten_metrics(metrics: dict, prefix: str = "") -> dict[str, Any]:
    """``{"20": {"top1": x}} -> {"20/top1": x}``; lists (the linear sweep) are left out."""
    flat: dict[str, Any] = {}
    for key, val in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(val, dict):
            flat.update(flatten_metrics(val, f"{name}/"))
        elif not isinstance(val, list | tuple):
            flat[name] = val
    return flat


def format_table(columns: dict[str, dict[str, Any]]) -> str:
    """A plain-text table: one row per metric, one column per evaluated feature source."""
    names = list(columns)
    rows = list(dict.fromkeys(k for col in columns.values() for k in col))
    def fmt(v: Any) -> str:
        return f"{v:.2f}" if isinstance(v, float) else ("" if v is None else str(v))
    cells = [[r, *(fmt(columns[n].get(r)) for n in names)] for r in rows]
    header = ["metric", *names]
    widths = [max(len(str(x)) for x in col) for col in zip(header, *cells)]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths))  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in cells)])


def _run(kind: str, args: argparse.Namespace, kw: dict[str, Any],
         legend: Callable[[dict[str, Any]], str] | None = None) -> int:
    from sslkit.data.base import DataError
    from sslkit.eval.report import RUNNERS, EvalError
    from sslkit.registry import RegistryError
    from sslkit.run import RunError

    baselines = ["none", "pixels", "random"] if args.baseline == "all" else [args.baseline]
    columns: dict[str, dict[str, Any]] = {}
    paths: list[str] = []
    settings: dict[str, Any] = {}
    try:
        for b in baselines:
            res = RUNNERS[kind](args.run, baseline=b, **kw, **_opts(args))
            columns["encoder" if b == "none" else b] = flatten_metrics(res["metrics"])
            paths.append(res["results_path"])
            settings = res.get("settings", {})
    except (RunError, DataError, EvalError, RegistryError, retrieval_mod.IndexSpecError) as e:
        print(f"sslkit: error: {error_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    print(format_table(columns))
    if legend is not None:
        print(legend(settings))
    for p in paths:
        print(f"results: {p}")
    return 0


def knn_legend(settings: dict[str, Any]) -> str:
    """What the k-NN table's rows mean: which protocol is the main figure, and which ones stand beside it."""
    if settings.get("center", True):
        parts = ["top1/top5: centred on the bank mean (the standard protocol; *_centred: the same)",
                 "*_uncentred: DINO's exact protocol"]
    else:
        parts = ["top1/top5: uncentred (DINO's exact protocol)"]
    if settings.get("whitened_also"):
        parts.append(f"*_whitened: PCA-whitened to {settings['whitened_also']} on the bank (another protocol, "
                     "not the main figure)")
    return "; ".join(parts)


def cmd_knn(args: argparse.Namespace) -> int:
    # The main figures never depend on whitening: --whiten / eval.knn_whiten only add *_whitened beside them.
    whiten = "recipe" if args.whiten is None else args.whiten
    return _run("knn", args, {"k": args.k, "temperature": args.temperature, "center": not args.no_center,
                              "whiten": whiten, "plots": not args.no_plots, "bank_dtype": args.bank_dtype,
                              "bank_on_disk": args.bank_on_disk, "chunk_size": args.chunk_size}, legend=knn_legend)


def cmd_linear(args: argparse.Namespace) -> int:
    return _run("linear", args, {"lrs": args.lrs, "weight_decays": args.wds, "epochs": args.epochs,
                                 "linear_batch_size": args.linear_batch_size or None,
                                 "val_fraction": args.val_fraction, "batchnorm": not args.no_batchnorm,
                                 "paper": args.paper, "lr": args.lr, "label_fraction": args.label_fraction})


def cmd_retrieval(args: argparse.Namespace) -> int:
    if args.queries or args.gallery or args.ground_truth:
        if not (args.queries and args.gallery):
            print("sslkit: error: --queries and --gallery go together (and --ground-truth needs both)", file=sys.stderr)
            return EXIT_USAGE
        return _run("retrieval_sets", args, {"queries": args.queries, "gallery": args.gallery,
                                             "ground_truth": args.ground_truth, "index": args.index,
                                             "nprobe": args.nprobe, "ef_search": args.ef_search, "ks": args.ks,
                                             "plots": not args.no_plots})
    return _run("retrieval", args, {"index": args.index, "nprobe": args.nprobe, "ef_search": args.ef_search,
                                    "ks": args.ks, "plots": not args.no_plots})


def cmd_copy(args: argparse.Namespace) -> int:
    if args.folder or args.distractors:
        if not args.folder:
            print("sslkit: error: --distractors needs --folder DIR (the images to copy)", file=sys.stderr)
            return EXIT_USAGE
        return _run("copy_folder", args, {"folder": args.folder, "distractors": args.distractors,
                                          "index": args.index, "nprobe": args.nprobe, "num_queries": args.num_queries,
                                          "ks": args.ks, "whiten": args.whiten, "plots": not args.no_plots})
    return _run("copy", args, {"index": args.index, "nprobe": args.nprobe, "num_queries": args.num_queries,
                               "ks": args.ks, "whiten": args.whiten, "plots": not args.no_plots})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sslkit eval", description="Evaluate a pretrained run's encoder.")
    add_subcommands(parser.add_subparsers(dest="command", required=True, metavar="{knn,linear,retrieval,copy}"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    return func(args)


if __name__ == "__main__":
    raise SystemExit(main())
