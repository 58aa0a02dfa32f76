"""The DINOv2 curation claim on a CPU: pretraining on the curated subset vs a random pool subset of the same size.

1. Build the demo's seed set and pool (:func:`sslkit.curate.demo.prepare_retrieval`) and run
   ``sslkit curate retrieve`` (``--mode``, ``--per-seed``).
2. Write a random subset of the pool of the same size as the curated list.
3. Pretrain ``--recipe`` on each list (``data.name=image_list``) for the same wall-clock budget
   (``trainer.time_budget_minutes``, ``--minutes``).
4. k-NN (weighted, k=20) on Fashion-MNIST restricted to the 5 seed classes: train-split bank, test-split queries.

Example (a short budget; the lead can run it longer)::

    python benchmarks/curate_pretrain.py --minutes 3 --pool-size 10000
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from time_to_accuracy import cpu_model  # noqa: E402

from sslkit.curate.demo import SEED_CLASSES, pool_class, prepare_retrieval  # noqa: E402

KNN_K = 20


def knn_on_seed_classes(run_dir: Path, bank: int, queries: int, classes: tuple[int, ...]) -> float:
    """Weighted k-NN top-1 on the seed classes of Fashion-MNIST with the run's encoder."""
    from sslkit.data.base import TensorImageDataset, subset_dataset
    from sslkit.eval.features import extract_features
    from sslkit.eval.knn import knn_classify
    from sslkit.registry import DATASETS
    from sslkit.run import eval_image_size, load_encoder

    enc, cfg = load_encoder(run_dir)
    sets = []
    for split, n in (("train", bank), ("test", queries)):
        ds = DATASETS.build("fashion_mnist", split=split)
        keep = torch.from_numpy(np.isin(ds.labels.numpy(), classes))
        ds = subset_dataset(TensorImageDataset(ds._images[keep], ds.labels[keep], ds.classes, ds.source), n)
        sets.append(extract_features(enc, ds, image_size=eval_image_size(cfg), progress=False))
    (tf, tl), (qf, ql) = sets
    res = knn_classify(tf, tl, qf, ql, k=KNN_K, center=True)
    return float(next(v for key, v in res.items() if key.startswith("top1")))


def pretrain(recipe: str, image_list: Path, out: Path, minutes: float, steps: int | None, name: str,
             overrides: list[str]) -> Path:
    length = ([f"trainer.time_budget_minutes={minutes}"] if steps is None else
              ["trainer.time_budget_minutes=null", f"trainer.max_steps={steps}"])
    cmd = [sys.executable, "-m", "sslkit.cli", "pretrain", recipe, f"name={name}", f"output_dir={out}",
           "data.name=image_list", f"data.root={image_list}", "eval.final_knn=false", *length, *overrides]
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    return next(p for p in sorted(out.glob(f"{name}*")) if p.is_dir() and not p.is_symlink())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--recipe", default=str(ROOT / "recipes" / "simclr_resnet_fmnist.yaml"))
    p.add_argument("--minutes", type=float, default=3.0, help="wall-clock budget of each pretraining")
    p.add_argument("--steps", type=int, default=None,
                   help="train each for this many steps instead of --minutes: the same compute for both (one "
                        "recipe, one batch size), and a figure that does not depend on what else the machine runs")
    p.add_argument("--pool-size", type=int, default=10000, help="Fashion-MNIST train images in the pool (+ as many OOD)")
    p.add_argument("--seed-classes", default=",".join(map(str, SEED_CLASSES)),
                   help="the 5 Fashion-MNIST classes of the seed set, comma-separated (default: the demo's, "
                        "T-shirt, Trouser, Sandal, Sneaker, Bag; 0,2,3,4,6 are the five upper-body garments, "
                        "the hardest to tell apart)")
    p.add_argument("--mode", default="sample")
    p.add_argument("--per-seed", type=int, default=8)
    p.add_argument("--bank", type=int, default=None, help="k-NN bank size (seed classes, train split; default all)")
    p.add_argument("--queries", type=int, default=None, help="k-NN queries (seed classes, test split; default all)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "curate_pretrain"))
    p.add_argument("overrides", nargs="*", help="recipe overrides for both runs")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        classes = tuple(int(c) for c in args.seed_classes.split(","))
        info = prepare_retrieval(work, args.pool_size, classes=classes)
        subprocess.run([sys.executable, "-m", "sslkit.cli", "curate", "retrieve", "--seed", str(work / "retrieve/seed"),
                        "--pool", str(work / "retrieve/pool"), "--mode", args.mode, "--per-seed", str(args.per_seed),
                        "--out", str(work / "curated")], check=True, cwd=ROOT)
        curated = [x for x in (work / "curated" / "curated.txt").read_text().split("\n") if x]
        pool = sorted(str(f) for f in (work / "retrieve" / "pool").rglob("*.png"))
        rng = np.random.default_rng(0)
        random = [pool[i] for i in np.sort(rng.choice(len(pool), len(curated), replace=False))]
        (work / "random.txt").write_text("\n".join(random) + "\n")
        def precision(paths: list[str]) -> float:
            return float(np.isin([pool_class(x) for x in paths], classes).mean())

        result = {"cpu": cpu_model(), "command": "python " + " ".join(sys.argv), "seed_classes": list(classes),
                  "mode": args.mode, "subset_size": len(curated), "minutes": None if args.steps else args.minutes,
                  "steps": args.steps, "pool_base_rate": info["base_rate"],
                  "curated_precision": precision(curated), "random_precision": precision(random)}
        for name, lst in (("curated", work / "curated" / "curated.txt"), ("random", work / "random.txt")):
            run = pretrain(args.recipe, lst, work / "runs", args.minutes, args.steps, f"curate_{name}",
                           args.overrides)
            result[f"{name}_knn_top1"] = knn_on_seed_classes(run, args.bank, args.queries, classes)
            print(name, result[f"{name}_knn_top1"], flush=True)
    from sslkit.curate.report import write_json
    from sslkit.run import atomic_write_bytes

    write_json(Path(args.out + ".json"), result)
    md = (f"# Curated vs random pretraining subset ({result['cpu']})\n\nCommand: `{result['command']}`; seed classes "
          f"{', '.join(map(str, classes))}; {result['subset_size']} images each, "
          f"{f'{args.steps} steps' if args.steps else f'{args.minutes} min'} each; pool base rate "
          f"{result['pool_base_rate']:.3f}.\n\n| subset | share from the seed classes | k-NN top-1 (5 seed classes) |\n"
          f"| --- | --- | --- |\n"
          + "".join(f"| {n} | {result[f'{n}_precision']:.3f} | {result[f'{n}_knn_top1']:.2f} |\n"
                    for n in ("curated", "random")))
    atomic_write_bytes(Path(args.out + ".md"), md.encode())
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
