"""Dedup precision and recall per kind of planted duplicate, and retrieval precision, on Fashion-MNIST.

Dedup: ``--base`` Fashion-MNIST test images plus ``--per-kind`` copies of each kind (exact, resized, JPEG, crop
>= 50% of the area, colour change) written as PNG/JPEG (:mod:`sslkit.curate.demo`), on two splits: ``dev``
(test images from 0, planting seed 0), on which the verification threshold was tuned, and ``heldout`` (test
images from 5000, seed 1), which reports it. Candidates (cosine >= ``--threshold``) are found and verified once;
each row links the pairs at or above one verification threshold:

* recall of a kind: the share of its copies that land in their source's duplicate group;
* caught, of a kind: the share of its copies of which the copy or its source is removed (the two do not both
  stay), whatever the group; the measure for ``star``, whose groups need not put a copy beside its source;
* precision: the share of removed images that are planted copies or their sources (a group of a source and its
  copy removes one of the two); everything else removed is a distinct Fashion-MNIST image taken for a duplicate.
  ``*_false.png`` shows the groups that hold distinct base images at the default threshold (components).

Every threshold is grouped by each link rule (``--links``): ``components`` and ``star``
(:mod:`sslkit.curate.graph`).

Retrieval: seed = 100 train images from each of 5 classes; pool = the other train images (``--pool-size``) and
as many out-of-domain shapes, deduplicated with verification first. Precision = the share of retrieved pool
images from the 5 seed classes, next to the pool's base rate.

Example::

    python benchmarks/curate_dedup.py --base 2000 --per-kind 100 --pool-size 3000
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from time_to_accuracy import cpu_model  # noqa: E402

from sslkit.curate import graph  # noqa: E402
from sslkit.curate.dedup import candidates, group, verify_scores  # noqa: E402
from sslkit.curate.demo import SEED_CLASSES, pool_class, prepare_dedup, prepare_retrieval  # noqa: E402
from sslkit.curate.embed import embed_collection  # noqa: E402
from sslkit.curate.embedders import load_embedder  # noqa: E402
from sslkit.curate.plant import KINDS  # noqa: E402
from sslkit.curate.report import groups_grid  # noqa: E402
from sslkit.curate.retrieve import retrieve  # noqa: E402
from sslkit.curate.verify import DEFAULT_VERIFY_THRESHOLD, VERIFY_CAP  # noqa: E402

VERIFY_THRESHOLDS = (0.97, 0.98, 0.985, 0.99, 0.993, 0.995)
SPLITS = {"dev": (0, 0), "heldout": (5000, 1)}  # name -> (first Fashion-MNIST test image, planting seed)


def dedup_scores(work: Path, args: argparse.Namespace, name: str) -> dict:
    """Candidates at ``--threshold`` verified once; each row links the pairs at or above one verify threshold
    (``none``: every candidate, the cosine alone)."""
    start, plant_seed = SPLITS[name]
    truth = prepare_dedup(work, args.base, args.per_kind, seed=plant_seed, start=start)
    emb = embed_collection(work / "dedup", load_embedder(args.encoder), work / "cache", progress=True)
    row = {str(f): r for r, f in enumerate(emb.files)}
    planted = {row[t["copy"]] for t in truth} | {row[t["source"]] for t in truth}
    t0 = time.perf_counter()
    i, j, s = candidates(emb, threshold=args.threshold, progress=False)
    search_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    vi, vj, vs, score = verify_scores(emb, emb, i, j, s, progress=True)
    verify_s = time.perf_counter() - t0
    rows = []
    for link in args.links:
        for thr in [None, *args.verify_thresholds]:
            ok = score >= thr if thr is not None else None
            res = group(emb, *((i, j, s) if ok is None else (vi[ok], vj[ok], vs[ok])), link=link)
            gid = np.full(len(emb.files), -1)
            for n, g in enumerate(res.groups):
                gid[g] = n
            recall = {k: float(np.mean([gid[row[t["copy"]]] >= 0 and gid[row[t["copy"]]] == gid[row[t["source"]]]
                                        for t in truth if t["kind"] == k])) for k in KINDS}
            removed = [r.row for r in res.removed]
            gone = set(removed)
            caught = {k: float(np.mean([row[t["copy"]] in gone or row[t["source"]] in gone
                                        for t in truth if t["kind"] == k])) for k in KINDS}
            precision = float(np.mean([r in planted for r in removed])) if removed else 1.0
            if thr == DEFAULT_VERIFY_THRESHOLD and link == "components":
                source_of = {row[t["copy"]]: row[t["source"]] for t in truth}
                false = [g for g in res.groups if len({source_of.get(int(r), int(r)) for r in g}) > 1]
                png = groups_grid(replace(res, groups=false), Path(f"{args.out}_{name}_false.png"))
                print(f"{len(false)} groups hold distinct base images: {png}", flush=True)
            rows.append({"link": link, "verify_threshold": thr, "precision": precision, "recall": recall,
                         "caught": caught, "removed": len(removed), "groups": len(res.groups),
                         "linked_pairs": int(len(i) if ok is None else ok.sum())})
            print(json.dumps(rows[-1]), flush=True)
    return {"images": len(emb.files), "base_start": start, "plant_seed": plant_seed, "embed_seconds": emb.seconds,
            "views": emb.num_views, "candidates": int(len(i)), "verified_pairs": int(len(vi)),
            "search_seconds": search_s, "verify_seconds": verify_s, "threshold": args.threshold, "rows": rows}


def retrieval_scores(work: Path, args: argparse.Namespace) -> dict:
    info = prepare_retrieval(work, args.pool_size)
    embedder = load_embedder(args.encoder)
    seed = embed_collection(work / "retrieve" / "seed", embedder, work / "cache", progress=True, desc="seed")
    pool = embed_collection(work / "retrieve" / "pool", embedder, work / "cache", progress=True, desc="pool")
    out = {"base_rate": info["base_rate"], "pool": len(pool.files), "seed": len(seed.files)}
    for mode in ("sample", "cluster"):
        res = retrieve(seed, pool, mode=mode, per_seed=args.per_seed, clusters=args.clusters,
                       threshold=args.threshold, verify_threshold=args.retrieval_verify, progress=False)
        got = np.array([pool_class(str(pool.files[r])) for r in res.rows])
        out[mode] = {"retrieved": int(len(got)), "precision": float(np.isin(got, SEED_CLASSES).mean()) if len(got) else 0.0,
                     "pool_after_dedup": int(len(res.pool_dedup.kept))}
        print(mode, json.dumps(out[mode]), flush=True)
    return out


def markdown(result: dict) -> str:
    lines = [f"# Curation: dedup and retrieval ({result['cpu']})", "", f"Encoder `{result['encoder']}`. "
             f"Command: `{result['command']}`.", ""]
    for split, d in result["dedup"].items():
        lines += [f"## Dedup, {split} split: test images {d['base_start']}.. (+ planted copies, seed "
                  f"{d['plant_seed']}), {d['images']} images", "",
                  f"{d['views']} views each, embedded in {d['embed_seconds']:.0f} s; {d['candidates']} candidate "
                  f"pairs at cosine >= {d['threshold']} ({d['search_seconds']:.1f} s), {d['verified_pairs']} "
                  f"verified (at most {VERIFY_CAP} per image) in {d['verify_seconds']:.0f} s.", "",
                  "| link | verify threshold | precision | " + " | ".join(f"recall {k}" for k in KINDS)
                  + " | " + " | ".join(f"caught {k}" for k in KINDS) + " | removed | linked pairs |",
                  "| --- | --- | --- | " + " | ".join("---" for _ in 2 * KINDS) + " | --- | --- |"]
        for r in d["rows"]:
            thr = "none (cosine only)" if r["verify_threshold"] is None else r["verify_threshold"]
            lines.append(f"| {r['link']} | {thr} | {r['precision']:.3f} | "
                         + " | ".join(f"{r['recall'][k]:.3f}" for k in KINDS)
                         + " | " + " | ".join(f"{r['caught'][k]:.3f}" for k in KINDS)
                         + f" | {r['removed']} | {r['linked_pairs']} |")
        lines.append("")
    if "retrieval" in result:
        rr = result["retrieval"]
        lines += [f"## Retrieval: {rr['seed']} seed images, pool of {rr['pool']} (base rate of the seed classes "
                  f"{rr['base_rate']:.3f})", "", "| mode | retrieved | pool after dedup | precision |",
                  "| --- | --- | --- | --- |"]
        lines += [f"| {m} | {rr[m]['retrieved']} | {rr[m]['pool_after_dedup']} | {rr[m]['precision']:.3f} |"
                  for m in ("sample", "cluster")]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", type=int, default=5000, help="Fashion-MNIST test images in the dedup set")
    p.add_argument("--per-kind", type=int, default=100, help="planted copies per kind")
    p.add_argument("--verify-thresholds", type=float, nargs="+", default=list(VERIFY_THRESHOLDS))
    p.add_argument("--threshold", type=float, default=graph.DEFAULT_THRESHOLD, help="cosine of a candidate pair")
    p.add_argument("--links", nargs="+", default=list(graph.LINK_RULES), choices=graph.LINK_RULES,
                   help="link rules: each verify threshold is grouped by each")
    p.add_argument("--splits", nargs="*", default=["dev", "heldout"], choices=list(SPLITS),
                   help="dev: test images from 0, copies with seed 0 (tuning); heldout: other images and seed")
    p.add_argument("--retrieval-verify", type=float, default=DEFAULT_VERIFY_THRESHOLD,
                   help="verify threshold of the pool's dedup before retrieval")
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
        result["dedup"] = {name: dedup_scores(Path(tmp) / name, args, name) for name in args.splits}
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
