"""The DINOv2 curation claim on a CPU: pretraining on the curated subset vs a random pool subset of the same size.

1. Build the demo's seed set and pool (:func:`sslkit.curate.demo.prepare_retrieval`) and run
   ``sslkit curate retrieve`` (``--mode``, ``--per-seed``). With ``--work DIR`` these stay in DIR and a second call
   reuses them (another recipe or more seeds on the same lists, without the dedup).
2. Write a random subset of the pool of the same size as the curated list (and, with ``--ood-only``, one drawn
   from the pool's out-of-domain images alone: a control for how much the features owe to the seed domain).
3. Pretrain ``--recipe`` on each list (``data.name=image_list``, preloaded) for the same number of steps
   (``--steps``) or wall-clock budget (``--minutes``), once per ``--seeds``.
4. k-NN (k=20, T=0.07, centred; uncentred beside it) on Fashion-MNIST restricted to the 5 seed classes: the
   train-split bank and all test-split queries (the headline), and the 500 labelled seed images as the bank
   (``seedbank``: the labels a curator has, where features count for more than bank size).

Example (a short budget; longer runs give the figures in benchmarks/results)::

    python benchmarks/curate_pretrain.py --minutes 3 --pool-size 10000
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from time_to_accuracy import cpu_model  # noqa: E402

from sslkit.curate.demo import OOD_KINDS, SEED_CLASSES, pool_class, prepare_retrieval  # noqa: E402
from sslkit.eval.sources import parse_dataset_args  # noqa: E402

KNN_K = 20


def seed_class_split(split: str, classes: tuple[int, ...], n: int | None = None):  # noqa: ANN201
    """Fashion-MNIST ``split`` restricted to ``classes`` (a fixed random ``n`` of them)."""
    from sslkit.data.base import TensorImageDataset, subset_dataset
    from sslkit.registry import DATASETS

    ds = DATASETS.build("fashion_mnist", split=split)
    keep = torch.from_numpy(np.isin(ds.labels.numpy(), classes))
    return subset_dataset(TensorImageDataset(ds.images[keep], ds.labels[keep], ds.classes, ds.source), n)


def seed_set(folder: Path):  # noqa: ANN201
    """The seed images of :func:`prepare_retrieval` (``class_<c>/`` folders) with their Fashion-MNIST labels."""
    from sslkit.data.base import TensorImageDataset
    from sslkit.registry import DATASETS

    ds = DATASETS.build("image_folder", root=str(folder), preload=True)
    labels = torch.tensor([int(ds.classes[k].split("_")[1]) for k in ds.labels.tolist()])
    return TensorImageDataset(ds.images, labels, ds.classes, ds.source)


def knn_on_seed_classes(run_dir: Path, banks: dict[str, object], queries: object,
                        alt_args: dict | None = None) -> dict[str, float]:
    """k-NN top-1 (centred, and uncentred beside it) of the run's eval encoder for each bank, on the same queries;
    with ``alt_args`` also of the encoder with these arguments on top of the recipe's ``eval.encoder_args``
    (keys ``alt_<bank>_...``)."""
    from sslkit.eval.features import extract_features
    from sslkit.eval.knn import headline_protocols
    from sslkit.eval.sources import with_encoder_args
    from sslkit.run import eval_image_size, load_config, load_encoder

    out = {}
    variants = {"": None}
    if alt_args:  # the recipe's eval.encoder_args with alt_args on top, checked against the encoder's signature
        variants["alt_"] = dict(with_encoder_args(load_config(run_dir), alt_args).eval.encoder_args)
    for prefix, args in variants.items():
        enc, cfg = load_encoder(run_dir, encoder_args=args)

        def feats(ds: object, enc: torch.nn.Module = enc, cfg: object = cfg) -> torch.Tensor:
            return extract_features(enc, ds, image_size=eval_image_size(cfg), progress=False)[0]

        qf = feats(queries)
        for name, bank in banks.items():
            res = headline_protocols(feats(bank), bank.labels, qf, queries.labels, k=KNN_K)
            out.update({f"{prefix}{name}_top1": float(res["top1"]),
                        f"{prefix}{name}_top1_uncentred": float(res["top1_uncentred"])})
    return out


def listed(path: Path) -> list[str]:
    """The image paths of a list file, read as ``image_list`` reads them."""
    from sslkit.data.image_list import read_image_list

    return [str(f) for f in read_image_list(path)[0]]


def pretrain(recipe: str, image_list: Path, out: Path, minutes: float, steps: int | None, name: str,
             overrides: list[str]) -> Path:
    length = ([f"trainer.time_budget_minutes={minutes}"] if steps is None else
              ["trainer.time_budget_minutes=null", f"trainer.max_steps={steps}"])
    cmd = [sys.executable, "-m", "sslkit.cli", "pretrain", recipe, f"name={name}", f"output_dir={out}",
           "data.name=image_list", f"data.root={image_list}", "data.args.preload=true", "eval.final_knn=false",
           *length, *overrides]
    run_dir, stamp = out / name, out / f"{name}.command.json"
    if (run_dir / "summary.json").is_file() and stamp.is_file() and json.loads(stamp.read_text()) == cmd[1:]:
        print(f"reusing {run_dir}, finished by an earlier call with the same command", flush=True)
        return run_dir
    shutil.rmtree(run_dir, ignore_errors=True)  # an interrupted run, or one with other overrides, starts over
    stamp.unlink(missing_ok=True)
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT)
    stamp.write_text(json.dumps(cmd[1:]))
    return run_dir


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--recipe", default=str(ROOT / "recipes" / "simclr_resnet_fmnist.yaml"))
    p.add_argument("--minutes", type=float, default=3.0, help="wall-clock budget of each pretraining")
    p.add_argument("--steps", type=int, default=None,
                   help="train each for this many steps instead of --minutes: the same compute for both (one "
                        "recipe, one batch size), and a figure that does not depend on what else the machine runs")
    p.add_argument("--seeds", default="0", help="pretraining seeds, comma-separated: one run per seed and subset")
    p.add_argument("--pool-size", type=int, default=10000, help="Fashion-MNIST train images in the pool")
    p.add_argument("--ood", default="shapes", choices=OOD_KINDS,
                   help="out-of-domain pool images: procedural shapes, grey crops of real photos, or half of each")
    p.add_argument("--ood-ratio", type=float, default=1.0, help="out-of-domain images per Fashion-MNIST pool image")
    p.add_argument("--seed-classes", default=",".join(map(str, SEED_CLASSES)),
                   help="the 5 Fashion-MNIST classes of the seed set, comma-separated (default: the demo's, "
                        "T-shirt, Trouser, Sandal, Sneaker, Bag; 0,2,3,4,6 are the five upper-body garments, "
                        "the hardest to tell apart)")
    p.add_argument("--mode", default="sample")
    p.add_argument("--per-seed", type=int, default=8)
    p.add_argument("--bank", type=int, default=None, help="k-NN bank size (seed classes, train split; default all)")
    p.add_argument("--queries", type=int, default=None, help="k-NN queries (seed classes, test split; default all)")
    p.add_argument("--encoder-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="also evaluate each run's encoder with these arguments on top of the recipe's "
                        "eval.encoder_args (e.g. pool_grid=1: the globally pooled feature); keys alt_*")
    p.add_argument("--ood-only", action="store_true",
                   help="also pretrain on a subset of the same size drawn from the pool's out-of-domain images only "
                        "(a control: what the features owe to the seed classes' domain at all)")
    p.add_argument("--work", default=None,
                   help="keep the seed set, pool, lists and runs here; lists already there are reused")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "curate_pretrain"))
    p.add_argument("overrides", nargs="*", help="recipe overrides for all runs")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.work or tmp)
        result = run(args, work)
    from sslkit.curate.report import write_json
    from sslkit.run import atomic_write_bytes

    write_json(Path(args.out + ".json"), result)
    atomic_write_bytes(Path(args.out + ".md"), markdown(result, args).encode())
    print(json.dumps(result, indent=1))
    return 0


def run(args: argparse.Namespace, work: Path) -> dict:
    classes = tuple(int(c) for c in args.seed_classes.split(","))
    settings = {"pool_size": args.pool_size, "seed_classes": list(classes), "mode": args.mode,
                "per_seed": args.per_seed, "ood": args.ood, "ood_ratio": args.ood_ratio}
    stamp = work / "lists.json"
    if not stamp.is_file() or json.loads(stamp.read_text())["settings"] != settings:
        info = prepare_retrieval(work, args.pool_size, classes=classes, ood=args.ood, ood_ratio=args.ood_ratio)
        subprocess.run([sys.executable, "-m", "sslkit.cli", "curate", "retrieve", "--seed", str(work / "retrieve/seed"),
                        "--pool", str(work / "retrieve/pool"), "--mode", args.mode, "--per-seed", str(args.per_seed),
                        "--out", str(work / "curated")], check=True, cwd=ROOT)
        curated = listed(work / "curated" / "curated.txt")
        pool = sorted(str(f) for f in (work / "retrieve" / "pool").rglob("*.png"))
        rng = np.random.default_rng(0)
        random = [pool[i] for i in np.sort(rng.choice(len(pool), len(curated), replace=False))]
        (work / "random.txt").write_text("\n".join(random) + "\n")
        (work / "ood_only.txt").unlink(missing_ok=True)
        stamp.write_text(json.dumps({"settings": settings, "pool": {k: info[k] for k in ("pool_fmnist", "pool_ood")},
                                     "base_rate": info["base_rate"]}))
    built = json.loads(stamp.read_text())
    lists = {"curated": work / "curated" / "curated.txt", "random": work / "random.txt"}
    if args.ood_only:  # the control: as many images drawn from the pool's out-of-domain part alone
        lists["ood_only"] = work / "ood_only.txt"
        if not lists["ood_only"].is_file():
            n = len(listed(lists["curated"]))
            ood = sorted(str(f) for f in (work / "retrieve" / "pool").rglob("*.png") if pool_class(str(f)) < 0)
            pick = np.sort(np.random.default_rng(0).choice(len(ood), n, replace=False))
            lists["ood_only"].write_text("\n".join(ood[i] for i in pick) + "\n")
    names = {k: listed(v) for k, v in lists.items()}
    result = {"cpu": cpu_model(), "command": "python " + " ".join(sys.argv), "recipe": Path(args.recipe).name,
              "seed_classes": list(classes), "mode": args.mode, "subset_size": len(names["curated"]),
              "minutes": None if args.steps else args.minutes, "steps": args.steps, "ood": args.ood, **built["pool"],
              "pool_base_rate": built["base_rate"]}
    for k, v in names.items():
        result[f"{k}_precision"] = float(np.isin([pool_class(x) for x in v], classes).mean())
    banks = {"knn": seed_class_split("train", classes, args.bank), "seedbank": seed_set(work / "retrieve" / "seed")}
    queries = seed_class_split("test", classes, args.queries)
    seeds = [int(x) for x in args.seeds.split(",")]
    alt = parse_dataset_args(args.encoder_arg, "--encoder-arg", "pool_grid=1")
    result.update(seeds=seeds, alt_encoder_args=alt)
    for seed in seeds:
        for name, lst in lists.items():
            tag = f"{Path(args.recipe).stem}_{name}_{f'{args.steps}steps' if args.steps else f'{args.minutes}min'}_s{seed}"
            rd = pretrain(args.recipe, lst, work / "runs", args.minutes, args.steps, tag,
                          [f"seed={seed}", *args.overrides])
            for key, v in knn_on_seed_classes(rd, banks, queries, alt).items():
                result.setdefault(f"{name}_{key}", []).append(v)
            print(name, seed, {k: v[-1] for k, v in result.items() if k.startswith(name + "_") and isinstance(v, list)},
                  flush=True)
    for key in [k for k, v in result.items() if isinstance(v, list) and k.startswith(tuple(lists))]:
        result[key + "_mean"] = round(float(np.mean(result[key])), 2)
    return result


def markdown(result: dict, args: argparse.Namespace) -> str:
    length = f"{args.steps} steps" if args.steps else f"{args.minutes} min"
    def row(label: str, n: str, prefix: str, share: str) -> str:
        def cell(key: str) -> str:
            return f"{result[key + '_mean']:.2f} ({', '.join(f'{v:.2f}' for v in result[key])})"
        return (f"| {label} | {share} | {cell(f'{n}_{prefix}knn_top1')} | {result[f'{n}_{prefix}knn_top1_uncentred_mean']:.2f} "
                f"| {cell(f'{n}_{prefix}seedbank_top1')} |\n")

    subsets = [n for n in ("curated", "random", "ood_only") if f"{n}_precision" in result]
    rows = "".join(row(n, n, "", f"{result[f'{n}_precision']:.3f}") for n in subsets)
    if result["alt_encoder_args"]:
        rows += "".join(row(f"{n}, encoder args {result['alt_encoder_args']}", n, "alt_", "")
                        for n in subsets)
    return (f"# Curated vs random pretraining subset ({result['cpu']})\n\nCommand: `{result['command']}`; recipe "
            f"{result['recipe']}; seed classes {', '.join(map(str, result['seed_classes']))}; "
            f"{result['subset_size']} images each, {length} each, seeds {result['seeds']}; pool of "
            f"{result['pool_fmnist']} Fashion-MNIST and {result['pool_ood']} out-of-domain images ({result['ood']}), "
            "base rate "
            f"{result['pool_base_rate']:.3f}. k-NN k={KNN_K}, T=0.07 on the 5 seed classes' test split; mean over "
            "seeds (each seed).\n\n"
            "| subset | share from the seed classes | k-NN top-1, train-split bank, centred | uncentred "
            "| k-NN top-1, the 500 seed images as bank, centred |\n| --- | --- | --- | --- | --- |\n" + rows)


if __name__ == "__main__":
    raise SystemExit(main())
