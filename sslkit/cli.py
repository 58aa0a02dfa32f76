"""``sslkit`` command line: pretrain, list, eval, viz, data, export.

Examples::

    sslkit pretrain recipes/simclr_resnet_fmnist.yaml trainer.epochs=2 data.subset=5000
    sslkit pretrain --resume runs/simclr_resnet_fmnist-latest
    sslkit pretrain recipes/dino_vit_small_imagenet.yaml --resume auto
    sslkit list
    sslkit eval knn runs/dino_resnet_fmnist-latest
    sslkit viz attention runs/dino_vit_tiny_fmnist-latest img1.png
    sslkit data pack images/ shards/ --shard-size 1000
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from sslkit import __version__
from sslkit.registry import error_line


class CLIError(Exception):
    pass


def _cmd_pretrain(args: argparse.Namespace) -> int:
    from sslkit.config import load_recipe
    from sslkit.engine import train
    from sslkit.run import read_config, resolve_run_dir

    overrides = list(args.overrides)
    recipe = args.recipe
    if recipe is not None and "=" in recipe:  # `sslkit pretrain --resume RUN key=value`
        overrides.insert(0, recipe)
        recipe = None
    if args.resume == "auto":  # the newest good checkpoint of the recipe's name, else a fresh run
        if recipe is None:
            raise CLIError("--resume auto needs the RECIPE: it continues the newest run of the recipe's name "
                           "(sslkit pretrain RECIPE --resume auto).")
        train(load_recipe(recipe, overrides), resume="auto", stop_at_step=args.stop_at_step)
        return 0
    if args.resume:
        run_dir = resolve_run_dir(args.resume)
        recipe_path = recipe or run_dir / "config.yaml"
        if recipe is None:
            read_config(run_dir / "config.yaml")  # the run directory is untrusted: no interpolation, valid YAML
        cfg = load_recipe(recipe_path, overrides)
        train(cfg, resume=run_dir, stop_at_step=args.stop_at_step)
        return 0
    if recipe is None:
        raise CLIError("pretrain needs a RECIPE (see recipes/) or --resume RUN_DIR.")
    cfg = load_recipe(recipe, overrides)
    if args.dry_run:
        from omegaconf import OmegaConf

        from sslkit.engine.loop import preflight

        preflight(cfg)  # the dataset, views and model are checked too; nothing is written
        print(OmegaConf.to_yaml(cfg))
        return 0
    train(cfg, stop_at_step=args.stop_at_step)
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from sslkit.plugins import load_all
    from sslkit.registry import ALL

    load_all()
    for kind, reg in ALL.items():
        if args.kind and kind != args.kind:
            continue
        print(f"{kind}:")
        for name in reg.names():
            print(f"  {name:<24} {reg.get(name).help}")
        for prefix in getattr(reg, "_prefixes", {}):
            print(f"  {prefix + ':<name>':<24} any {prefix} model by name")
    if not args.kind:
        recipes = sorted(Path("recipes").glob("*.yaml"))
        if recipes:
            print("recipes:")
            for r in recipes:
                print(f"  {r}")
    return 0


def _add_optional_module(sub: argparse._SubParsersAction, name: str, module: str, help: str) -> None:
    """Sub-command whose implementation module exposes ``add_arguments(parser)`` and ``run(args)``."""
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module:
            raise
        return
    p = sub.add_parser(name, help=help, description=help)
    mod.add_arguments(p)
    p.set_defaults(func=mod.run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sslkit", description="Self-supervised pretraining for computer vision.")
    parser.add_argument("--version", action="version", version=f"sslkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("pretrain", help="pretrain an encoder with a YAML recipe",
                       description="Pretrain with RECIPE (a YAML file in recipes/), overriding keys with key.sub=value.",
                       epilog="example: sslkit pretrain recipes/simclr_resnet_fmnist.yaml trainer.epochs=2")
    p.add_argument("recipe", nargs="?", help="recipe YAML (optional with --resume)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. optim.lr=0.1 data.subset=5000")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its last checkpoint; "
                   "'auto' (with RECIPE): the newest run of the recipe's name whose checkpoint loads, else a fresh "
                   "run, so a requeued job restarts itself with the same command")
    p.add_argument("--stop-at-step", type=int, default=None,
                   help="checkpoint and stop at this global step without changing the schedules")
    p.add_argument("--dry-run", action="store_true",
                   help="check the recipe, its dataset, views and model (built without memory), print the resolved "
                        "recipe and exit; nothing is written")
    p.set_defaults(func=_cmd_pretrain)

    p = sub.add_parser("list", help="list registered encoders, augmentations, objectives, datasets and recipes")
    p.add_argument("kind", nargs="?", choices=["encoders", "augmentations", "objectives", "datasets"])
    p.set_defaults(func=_cmd_list)

    try:
        eval_cli = importlib.import_module("sslkit.eval.cli")
    except ModuleNotFoundError as e:
        if e.name != "sslkit.eval.cli":
            raise
        eval_cli = None
    if eval_cli is not None:
        p = sub.add_parser("eval", help="evaluate frozen features: knn, linear, retrieval, copy")
        eval_cli.add_subcommands(p.add_subparsers(dest="eval_command", metavar="EVAL", required=True))

    p = sub.add_parser("viz", help="pictures: DINO attention maps, PCA patch maps, MAE reconstructions")
    vsub = p.add_subparsers(dest="viz_command", metavar="VIZ", required=True)
    _add_optional_module(vsub, "attention", "sslkit.viz.attention", "last-block CLS attention per head (ViT)")
    _add_optional_module(vsub, "reconstruct", "sslkit.viz.reconstruct", "MAE reconstructions grid")
    _add_optional_module(vsub, "pca", "sslkit.viz.pca", "DINOv2-style PCA maps of patch features, with attention")
    _add_optional_module(vsub, "gradcam", "sslkit.viz.gradcam", "Grad-CAM heatmaps through the linear probe (CNN)")

    _add_optional_module(sub, "export", "sslkit.export",
                         "export a run's encoder: timm weights + config.json, ONNX, or sslkit safetensors, with a "
                         "model card")
    _add_optional_module(sub, "curate", "sslkit.curate.cli",
                         "deduplicate images and retrieve a pool's images near a seed set (DINOv2 curation)")

    p = sub.add_parser("data", help="prepare data: pack images into streaming tar shards")
    dsub = p.add_subparsers(dest="data_command", metavar="DATA", required=True)
    _add_optional_module(dsub, "pack", "sslkit.data.shards",
                         "write an image folder or a registered dataset as tar shards with an index.json")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and getattr(args, "overrides", None) is not None and all("=" in a and not a.startswith("-") for a in extra):
        args.overrides += extra  # `pretrain RECIPE --resume auto key=value`: overrides after an option
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from sslkit.config import ConfigError
    from sslkit.data import DataError
    from sslkit.engine.signals import TrainingInterrupted
    from sslkit.registry import RegistryError
    from sslkit.run import RunError

    try:
        return int(args.func(args) or 0)
    except (CLIError, ConfigError, DataError, RegistryError, RunError) as e:
        print(f"sslkit: error: {error_line(e)}", file=sys.stderr)
        return 2
    except TrainingInterrupted as e:
        print(f"sslkit: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("sslkit: interrupted before training started or while evaluating; nothing was checkpointed by this "
              "command. A run directory it made can be resumed only if it holds checkpoints/last.ckpt "
              "(--resume RUN_DIR).", file=sys.stderr)
        return 130


if __name__ == "__main__":
    # `python -m sslkit.cli` runs this file as __main__; the subcommands raise sslkit.cli.CLIError, so hand over to
    # the imported module, whose except clauses name that class (this module's own copy would miss them)
    from sslkit.cli import main as _main

    sys.exit(_main())
