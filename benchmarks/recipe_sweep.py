"""Train variants of one recipe and compare their final k-NN top-1: a small tuning harness.

Each ``--variant`` is ``NAME:key=value key=value ...`` (recipe overrides, as on ``sslkit pretrain``). Every
variant trains through the real engine, in this process, one after the other, and ends with the recipe's
final k-NN (full splits unless overridden). Results go to ``recipe_sweep.json`` (one object per variant:
overrides, k-NN top-1, final loss, training seconds, images/s) and a Markdown table, both under ``--out``;
each finished variant is written at once, so an interrupted sweep keeps what it measured.

On a GPU the same recipe trains with the same batched augmentation and bf16 autocast as on a CPU, so a sweep
there tells which variant learns more per epoch; the epoch budget itself comes from the CPU's images/s
(``benchmarks/time_to_accuracy.py``). Example::

    python benchmarks/recipe_sweep.py recipes/dino_resnet_fmnist.yaml --out bench_out/sweep_dino \\
        --variant "base:" --variant "m098:objective.momentum_teacher=0.98" \\
        --set trainer.accelerator=gpu
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from sslkit.config import load_recipe
from sslkit.engine import train


def parse_variant(text: str) -> tuple[str, list[str]]:
    """``"name:a=1 b=2"`` -> ``("name", ["a=1", "b=2"])``; the name is what the table shows."""
    name, sep, rest = text.partition(":")
    if not sep or not name.strip():
        raise SystemExit(f"--variant {text!r}: expected NAME:key=value ..., e.g. 'm098:objective.momentum_teacher=0.98'")
    overrides = shlex.split(rest)
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise SystemExit(f"--variant {name}: overrides must be key=value, got {bad}")
    return name.strip(), overrides


def write_table(rows: list[dict], path: Path) -> None:
    lines = ["| variant | overrides | k-NN top-1 | final loss | train min | images/s |", "|---|---|---|---|---|---|"]
    for r in rows:
        knn = "failed" if r.get("error") else f"{r['knn_top1']:.2f}%"
        lines.append(f"| {r['variant']} | `{' '.join(r['overrides']) or '-'}` | {knn} | {r.get('final_loss', float('nan')):.4f} "
                     f"| {r.get('train_seconds', 0) / 60:.2f} | {r.get('images_per_s', 0):.0f} |")
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("recipe")
    ap.add_argument("--variant", action="append", required=True, help="NAME:key=value ... (repeat)")
    ap.add_argument("--set", nargs="*", default=[], help="overrides applied to every variant")
    ap.add_argument("--out", default="bench_out/recipe_sweep")
    args = ap.parse_args(argv)
    variants = [parse_variant(v) for v in args.variant]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    common = [*args.set, f"output_dir={out / 'runs'}", "trainer.progress=false"]
    for _name, ov in variants:  # fail on a bad key before any training starts
        load_recipe(args.recipe, [*common, *ov])
    rows: list[dict] = []
    for name, ov in variants:
        cfg = load_recipe(args.recipe, [*common, *ov, f"name={Path(args.recipe).stem}-{name}"])
        t = time.perf_counter()
        row: dict = {"variant": name, "overrides": ov}
        try:
            res = train(cfg)
            summary = json.loads((res.run_dir / "summary.json").read_text())
            row.update(knn_top1=(res.knn or {}).get("top1", float("nan")), final_loss=res.final_loss,
                       train_seconds=summary["train_seconds"], images_per_s=summary["steady_images_per_s"],
                       wall_seconds=time.perf_counter() - t, run_dir=str(res.run_dir))
        except Exception as e:  # keep the sweep going; the row says what failed
            row["error"] = f"{type(e).__name__}: {e}"
            print(f"[{name}] failed: {row['error']}", file=sys.stderr)
        rows.append(row)
        print(json.dumps(row), flush=True)
        (out / "recipe_sweep.json").write_text(json.dumps({"recipe": args.recipe, "set": args.set, "rows": rows},
                                                          indent=2))
        write_table(rows, out / "recipe_sweep.md")
    print((out / "recipe_sweep.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
