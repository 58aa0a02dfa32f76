"""``sslkit curate dedup SOURCE``, ``sslkit curate retrieve --seed SEED --pool POOL`` and
``sslkit curate balance SOURCE --size N``.

SOURCE, SEED and POOL are folders of images (searched recursively) or list files (.txt: one path per line;
.csv: a ``path`` column). Examples::

    sslkit curate dedup photos/ --out curated/ --against testset/
    sslkit curate retrieve --seed seed/ --pool scraped/ --mode cluster --clusters 200 --out curated/
    sslkit curate balance curated/kept.txt --size 50000 --encoder runs/my_run --out balanced/
    sslkit pretrain recipes/simclr_resnet_fmnist.yaml data.name=image_list data.root=curated/curated.txt
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from sslkit.curate import balance as balance_mod
from sslkit.curate import graph, verify
from sslkit.curate import retrieve as retrieve_mod


def _encoder_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="curated", help="output folder (lists, report, groups.png)")
    p.add_argument("--encoder", default="builtin",
                   help="builtin (copy descriptor, no training), an sslkit run directory, or timm:<name> with --weights")
    p.add_argument("--weights", default=None, help="local weights file for timm:<name> (nothing is downloaded)")
    p.add_argument("--image-size", type=int, default=None, help="encoder input size (run: its eval size; timm: 224)")
    p.add_argument("--cache-dir", default=None, help="embedding cache (default: OUT/cache); reruns resume from it")
    p.add_argument("--device", default="cpu", help="cpu, cuda ...")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _common(p: argparse.ArgumentParser) -> None:
    _encoder_args(p)
    p.add_argument("--threshold", type=float, default=graph.DEFAULT_THRESHOLD,
                   help="cosine at or above which two images are duplicates; lower finds more, with more false "
                        "pairs (benchmarks/curate_dedup.py measures both)")
    p.add_argument("--k", type=int, default=graph.DEFAULT_K, help="neighbours searched per view")
    p.add_argument("--verify", action=argparse.BooleanOptionalAction, default=None,
                   help="check each candidate pair on the pixels: is one image a (cropped, resized, recoloured) box "
                        "of the other? Default: on for the builtin encoder, off for runs and timm models")
    p.add_argument("--verify-threshold", type=float, default=verify.DEFAULT_VERIFY_THRESHOLD,
                   help="pixel correlation (normalised cross-correlation of the best box) a verified pair needs")
    p.add_argument("--keep", choices=graph.KEEP_RULES, default="largest",
                   help="which image of a group stays: largest (most pixels, then largest file) or first (path order)")
    p.add_argument("--link", choices=graph.LINK_RULES, default="components",
                   help="how linked pairs form groups: components (a connected group keeps one image; chains of "
                        "near pairs join images that differ) or star (an image is removed only when it links "
                        "directly to a kept image, so no chain removes a distinct image)")
    p.add_argument("--index", default=None,
                   help=f"FAISS index: Flat, IVF<nlist>,Flat, HNSW<M>; default Flat up to {graph.FLAT_MAX} images, IVF above")
    p.add_argument("--against", nargs="*", default=[], metavar="EVAL",
                   help="evaluation sets (folders or lists): images that duplicate one of them are removed")


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="curate_command", metavar="CURATE", required=True)
    d = sub.add_parser("dedup", help="find near-duplicate groups, keep one image per group",
                       description="Embed SOURCE, link images whose cosine similarity reaches --threshold, keep one "
                                   "image per group (--link), and drop images that duplicate --against sets.")
    d.add_argument("source", metavar="SOURCE", help="folder of images or list file")
    _common(d)
    r = sub.add_parser("retrieve", help="retrieve pool images near a seed set (DINOv2 curation)",
                       description="Deduplicate POOL (against itself, SEED and --against), then retrieve the pool "
                                   "images nearest to SEED: per seed image (sample) or by k-means clusters (cluster).")
    r.add_argument("--seed", required=True, metavar="SEED", help="curated seed images (folder or list)")
    r.add_argument("--pool", required=True, metavar="POOL", help="uncurated pool (folder or list)")
    r.add_argument("--mode", choices=retrieve_mod.MODES, default="sample", help="sample-based or cluster-based")
    r.add_argument("--per-seed", type=int, default=retrieve_mod.DEFAULT_PER_SEED, help="sample: neighbours per seed")
    r.add_argument("--clusters", type=int, default=retrieve_mod.DEFAULT_CLUSTERS, help="cluster: k-means clusters")
    r.add_argument("--clusters-per-seed", type=int, default=retrieve_mod.DEFAULT_CLUSTERS_PER_SEED,
                   help="cluster: nearest clusters each seed image selects")
    r.add_argument("--retrieval-encoder", default=None,
                   help="encoder for the retrieval itself (e.g. a pretrained run: semantic neighbours); default the "
                        "copy vectors of --encoder")
    _common(r)
    b = sub.add_parser("balance", help="a balanced subset by hierarchical k-means (Vo et al. 2024)",
                       description="Embed SOURCE, cluster it with hierarchical k-means and draw --size images evenly "
                                   "over the clusters, top level first, so that dense concepts do not crowd out "
                                   "rare ones. Deduplicate first (curate dedup; pass its kept.txt as SOURCE).")
    b.add_argument("source", metavar="SOURCE", help="folder of images or list file")
    b.add_argument("--size", type=int, required=True, help="images in the balanced subset")
    b.add_argument("--clusters", default="auto",
                   help="clusters per level, finest first, comma-separated (e.g. 1500,300,60,12); auto: about "
                        f"{balance_mod.LEAF_SIZE} images per level-1 cluster, then {balance_mod.LEVEL_RATIO} times "
                        "fewer per level")
    b.add_argument("--resample-steps", type=int, default=0,
                   help="re-run each level's k-means this many times on the members nearest each centroid")
    b.add_argument("--resample-size", type=int, default=None,
                   help="members per cluster a resampling step uses (default: the median cluster size)")
    b.add_argument("--seed", type=int, default=0, help="k-means and sampling seed")
    _encoder_args(b)


def _embed(source: str, args: argparse.Namespace, embedder, cache: Path, desc: str, boxes=None):  # noqa: ANN001, ANN202
    from sslkit.curate.embed import embed_collection

    emb = embed_collection(source, embedder, cache, boxes=boxes, progress=not args.no_progress, desc=desc)
    if emb.changes:
        print(f"sslkit: {source}: {emb.changes.summary()}")
    for path, why in list(emb.bad.items())[:5]:
        print(f"sslkit: skipping unreadable image {path}: {why}")
    if len(emb.bad) > 5:
        print(f"sslkit: ... {len(emb.bad)} unreadable images in all (unreadable.csv)")
    return emb


def run(args: argparse.Namespace) -> int:
    from sslkit.cli import CLIError
    from sslkit.curate import report
    from sslkit.curate.dedup import dedup
    from sslkit.curate.embedders import load_embedder

    if args.encoder.startswith("timm:") and not args.weights:
        raise CLIError(f"{args.encoder} needs --weights FILE: nothing is downloaded.")
    out = Path(args.out)
    cache = Path(args.cache_dir) if args.cache_dir else out / "cache"
    if args.curate_command == "balance":
        clusters = _balance_clusters(args)  # bad arguments fail before the encoder loads
        embedder = load_embedder(args.encoder, weights=args.weights, image_size=args.image_size, device=args.device)
        return _balance(args, clusters, embedder, out, cache)
    if not 0.0 < args.threshold <= 1.0:
        raise CLIError(f"--threshold must lie in (0, 1], got {args.threshold}")
    if args.k < 1:
        raise CLIError(f"--k must be at least 1, got {args.k}")
    if not -1.0 < args.verify_threshold <= 1.0:
        raise CLIError(f"--verify-threshold is a correlation in (-1, 1], got {args.verify_threshold}")
    verify_on = args.encoder == "builtin" if args.verify is None else args.verify
    verify_threshold = args.verify_threshold if verify_on else None
    embedder = load_embedder(args.encoder, weights=args.weights, image_size=args.image_size, device=args.device)
    against = [_embed(a, args, embedder, cache, f"embed {a}") for a in args.against]
    progress = not args.no_progress
    if args.curate_command == "dedup":
        emb = _embed(args.source, args, embedder, cache, "embed")
        res = dedup(emb, threshold=args.threshold, k=args.k, keep=args.keep, link=args.link, index=args.index,
                    against=against, verify_threshold=verify_threshold, progress=progress)
        s = report.write_dedup(res, out)
        print(f"kept {s['kept']} of {s['images']} images; removed {s['removed_duplicates']} duplicates and "
              f"{s['removed_eval']} eval duplicates; {s['unreadable']} unreadable. Lists and report in {out}/")
        return 0
    for name in ("per_seed", "clusters", "clusters_per_seed"):
        if getattr(args, name) < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    seed = _embed(args.seed, args, embedder, cache, "embed seed")
    pool = _embed(args.pool, args, embedder, cache, "embed pool")
    feats = {}
    if args.retrieval_encoder:
        sem = load_embedder(args.retrieval_encoder, weights=args.weights, image_size=args.image_size,
                            device=args.device)
        for name, src in (("seed", args.seed), ("pool", args.pool)):
            feats[f"{name}_features"] = _embed(src, args, sem, cache, f"features {name}", [(0.0, 0.0, 1.0)]).full_view()
    res = retrieve_mod.retrieve(seed, pool, mode=args.mode, per_seed=args.per_seed, clusters=args.clusters,
                                clusters_per_seed=args.clusters_per_seed, evals=against, threshold=args.threshold,
                                k=args.k, keep=args.keep, link=args.link, index=args.index,
                                verify_threshold=verify_threshold,
                                progress=progress, **feats)
    s = report.write_retrieve(res, seed.files, out)
    print(f"retrieved {s['retrieved']} of {s['pool_after_dedup']} deduplicated pool images ({args.mode}); "
          f"image list: {out / 'curated.txt'}")
    return 0


def _balance_clusters(args: argparse.Namespace) -> list[int] | None:
    """The ``--clusters`` list (None: auto), after checking the balance arguments."""
    from sslkit.cli import CLIError

    try:
        clusters = None if args.clusters == "auto" else [int(c) for c in str(args.clusters).split(",")]
    except ValueError:
        clusters = []
    if clusters is not None and (not clusters or min(clusters) < 1):
        raise CLIError(f"--clusters takes positive counts per level, finest first (e.g. 1000,100) or auto, "
                       f"got {args.clusters!r}")
    if args.size < 1:
        raise CLIError(f"--size must be at least 1, got {args.size}")
    if args.resample_steps < 0 or (args.resample_size is not None and args.resample_size < 1):
        raise CLIError("--resample-steps must be >= 0 and --resample-size >= 1")
    return clusters


def _balance(args: argparse.Namespace, clusters: list[int] | None, embedder, out: Path,  # noqa: ANN001
             cache: Path) -> int:
    from sslkit.cli import CLIError
    from sslkit.curate import report

    emb = _embed(args.source, args, embedder, cache, "embed", [(0.0, 0.0, 1.0)])
    rows = np.flatnonzero(emb.ok)
    if len(rows) == 0:
        raise CLIError(f"{args.source}: no readable image to balance")
    clusters = clusters or balance_mod.auto_clusters(len(rows))
    levels = balance_mod.hierarchical_kmeans(emb.full_view(rows), clusters, resample_steps=args.resample_steps,
                                             resample_size=args.resample_size, seed=args.seed,
                                             progress=not args.no_progress)
    picked = balance_mod.hierarchical_sample(levels, args.size, seed=args.seed)
    s = report.write_balance(emb, rows, levels, picked, out, settings={
        "size": args.size, "clusters": clusters, "resample_steps": args.resample_steps,
        "resample_size": args.resample_size, "seed": args.seed, "encoder": args.encoder})
    print(f"balanced {s['selected']} of {s['images']} images over {s['clusters'][-1]} top clusters; "
          f"image list: {out / 'balanced.txt'}")
    return 0
