"""Dedup precision and recall per kind of planted duplicate, and retrieval precision, on Fashion-MNIST.

Dedup: ``--base`` Fashion-MNIST test images plus ``--per-kind`` copies of each kind (exact, resized, JPEG, crop
>= 50% of the area, colour change) written as PNG/JPEG (:mod:`sslkit.curate.demo`). For each threshold:

* recall of a kind: the share of its copies that land in their source's duplicate group;
* precision: the share of removed images that are planted copies or their sources (a group of a source and its
  copy removes one of the two); everything else removed is a distinct Fashion-MNIST image taken for a duplicate.

Retrieval: seed = 100 train images from each of 5 classes; pool = the other train images (``--pool-size``) and
as many out-of-domain shapes. Precision = the share of retrieved pool images from the 5 seed classes, next to
the pool's base rate.

Example::

    python benchmarks/curate_dedup.py --base 3000 --per-kind 100 --pool-size 5000
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from time_to_accuracy import cpu_model  # noqa: E402

from sslkit.curate import graph  # noqa: E402
from sslkit.curate.dedup import dedup  # noqa: E402
from sslkit.curate.demo import SEED_CLASSES, pool_class, prepare_dedup, prepare_retrieval  # noqa: E402
from sslkit.curate.embed import embed_collection  # noqa: E402
from sslkit.curate.embedders import load_embedder  # noqa: E402
from sslkit.curate.plant import KINDS  # noqa: E402
from sslkit.curate.retrieve import retrieve  # noqa: E402

THRESHOLDS = (0.8, 0.85, 0.9, 0.93, 0.95)


def dedup_scores(work: Path, args: argparse.Namespace) -> dict:
    truth = prepare_dedup(work, args.base, args.per_kind)
    emb = embed_collection(work / "dedup", load_embedder(args.encoder), work / "cache", progress=True)
    row = {str(f): r for r, f in enumerate(emb.files)}
    planted = {row[t["copy"]] for t in truth} | {row[t["source"]] for t in truth}
    rows = []
    for thr in args.thresholds:
        t0 = time.perf_counter()
        res = dedup(emb, threshold=thr, progress=False)
        group = np.full(len(emb.files), -1)
        for gid, g in enumerate(res.groups):
            group[g] = gid
        recall = {k: float(np.mean([group[row[t["copy"]]] >= 0 and group[row[t["copy"]]] == group[row[t["source"]]]
                                    for t in truth if t["kind"] == k])) for k in KINDS}
        removed = [r.row for r in res.removed]
        precision = float(np.mean([r in planted for r in removed])) if removed else 1.0
        rows.append({"threshold": thr, "precision": precision, "recall": recall, "removed": len(removed),
                     "planted_copies": len(truth), "groups": len(res.groups), "seconds": time.perf_counter() - t0})
        print(json.dumps(rows[-1]), flush=True)
    return {"images": len(emb.files), "embed_seconds": emb.seconds, "views": emb.num_views, "rows": rows}


def retrieval_scores(work: Path, args: argparse.Namespace) -> dict:
    info = prepare_retrieval(work, args.pool_size)
    embedder = load_embedder(args.encoder)
    seed = embed_collection(work / "retrieve" / "seed", embedder, work / "cache", progress=True, desc="seed")
    pool = embed_collection(work / "retrieve" / "pool", embedder, work / "cache", progress=True, desc="pool")
    out = {"base_rate": info["base_rate"], "pool": len(pool.files), "seed": len(seed.files)}
    for mode in ("sample", "cluster"):
        res = retrieve(seed, pool, mode=mode, per_seed=args.per_seed, clusters=args.clusters,
                       threshold=args.threshold, progress=False)
        got = np.array([pool_class(str(pool.files[r])) for r in res.rows])
        out[mode] = {"retrieved": int(len(got)), "precision": float(np.isin(got, SEED_CLASSES).mean()) if len(got) else 0.0,
                     "pool_after_dedup": int(len(res.pool_dedup.kept))}
        print(mode, json.dumps(out[mode]), flush=True)
    return out


def markdown(result: dict) -> str:
    d = result["dedup"]
    lines = [f"# Curation: dedup and retrieval ({result['cpu']})", "",
             f"Encoder `{result['encoder']}`, {d['images']} images ({d['views']} views each), embedded in "
             f"{d['embed_seconds']:.0f} s. Command: `{result['command']}`.", "",
             "| threshold | precision | " + " | ".join(f"recall {k}" for k in KINDS) + " | removed |",
             "| --- | --- | " + " | ".join("---" for _ in KINDS) + " | --- |"]
    for r in d["rows"]:
        lines.append(f"| {r['threshold']} | {r['precision']:.3f} | "
                     + " | ".join(f"{r['recall'][k]:.3f}" for k in KINDS) + f" | {r['removed']} |")
    if "retrieval" in result:
        rr = result["retrieval"]
        lines += ["", f"Retrieval: {rr['seed']} seed images, pool of {rr['pool']} (base rate of the seed classes "
                  f"{rr['base_rate']:.3f}).", "", "| mode | retrieved | precision |", "| --- | --- | --- |"]
        lines += [f"| {m} | {rr[m]['retrieved']} | {rr[m]['precision']:.3f} |" for m in ("sample", "cluster")]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", type=int, default=5000, help="Fashion-MNIST test images in the dedup set")
    p.add_argument("--per-kind", type=int, default=100, help="planted copies per kind")
    p.add_argument("--thresholds", type=float, nargs="+", default=list(THRESHOLDS))
    p.add_argument("--threshold", type=float, default=graph.DEFAULT_THRESHOLD, help="dedup threshold for retrieval")
    p.add_argument("--pool-size", type=int, default=10000, help="Fashion-MNIST train images in the pool (+ as many OOD)")
    p.add_argument("--per-seed", type=int, default=4)
    p.add_argument("--clusters", type=int, default=100)
    p.add_argument("--encoder", default="builtin")
    p.add_argument("--no-retrieval", action="store_true")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "curate_dedup"),
                   help="results stem (.json and .md are added)")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    result = {"cpu": cpu_model(), "encoder": args.encoder, "command": "python " + " ".join(sys.argv)}
    with tempfile.TemporaryDirectory() as tmp:
        result["dedup"] = dedup_scores(Path(tmp), args)
        if not args.no_retrieval:
            result["retrieval"] = retrieval_scores(Path(tmp), args)
    from sslkit.curate.report import write_json
    from sslkit.run import atomic_write_bytes

    write_json(Path(args.out + ".json"), result)
    atomic_write_bytes(Path(args.out + ".md"), markdown(result).encode())
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
