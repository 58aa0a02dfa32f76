"""Transfer of CPU runs pretrained on Fashion-MNIST: k-NN on their own test split, on ``fmnist_scenes`` (the label
of a canvas is its largest item's class) and on a folder of real photos, plus the linear segmentation probe's mIoU
on the scenes, each next to raw pixels and a random encoder of the run's architecture.

The real photos are the ones that ship with scikit-learn (``china.jpg``, ``flower.jpg``) and matplotlib
(``grace_hopper.jpg``, ``Minduka_Present_Blue_Pack.png``): one class per photo, ``--crops`` random square crops
of each, the bank from the left half of the photo and the queries from the right half, so that no query shares a
pixel with the bank. It asks whether the features tell photos apart by their content, textures and colours
(a small, real-image instance-recognition task), not whether they know ImageNet classes.

    python benchmarks/transfer.py --runs runs/dino_resnet_fmnist-latest runs/dino_vit_tiny_fmnist-latest --out bench_out

Writes ``transfer.json`` and ``transfer.md``; each evaluation also lands in its run (``RUN/transfer/...``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from PIL import Image
from time_to_accuracy import cpu_model  # benchmarks/ is on sys.path as a script

from sslkit.data import DataError
from sslkit.data.sample_photos import photo_files
from sslkit.eval import report
from sslkit.eval.segment import run_segment

K = 20


def make_photo_folder(out: Path, crops: int, size: int, seed: int = 0) -> Path:
    """``out/train/<photo>/*.png`` from the left half of each photo, ``out/test/<photo>/*.png`` from the right."""
    rng = np.random.default_rng(seed)
    for name, path in photo_files().items():
        img = np.asarray(Image.open(path).convert("RGB"))
        h, w = img.shape[:2]
        for split, (x0, x1) in (("train", (0, w // 2)), ("test", (w // 2, w))):
            folder = out / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(crops):
                side = int(rng.integers(min(h, x1 - x0) // 4, min(h, x1 - x0) // 2 + 1))
                y = int(rng.integers(0, h - side + 1))
                x = int(rng.integers(x0, x1 - side + 1))
                crop = Image.fromarray(img[y:y + side, x:x + side]).resize((size, size), Image.BICUBIC)
                crop.save(folder / f"{name}_{i:04d}.png")
    return out


def knn_top1(source: str, baseline: str, **opts) -> float:  # noqa: ANN003
    res = report.run_knn(source, baseline=baseline, k=[K], whiten=None, plots=False, progress=False, **opts)
    return float(res["metrics"][str(K)]["top1"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", nargs="+", required=True, help="runs pretrained on Fashion-MNIST")
    ap.add_argument("--out", default="bench_out")
    ap.add_argument("--crops", type=int, default=200, help="crops per photo and split")
    ap.add_argument("--image-size", type=int, default=64, help="size of the scenes and photo crops as evaluated")
    ap.add_argument("--fmnist-train", type=int, default=None, help="Fashion-MNIST bank subset (default: all 60k)")
    ap.add_argument("--fmnist-test", type=int, default=None, help="Fashion-MNIST query subset (default: all 10k)")
    ap.add_argument("--scenes-train", type=int, default=10000, help="fmnist_scenes train canvases (k-NN bank)")
    ap.add_argument("--scenes-test", type=int, default=2000, help="fmnist_scenes test canvases (queries)")
    ap.add_argument("--segment-epochs", type=int, default=None, help="segmentation probe epochs (default: its own)")
    ap.add_argument("--segment-train", type=int, default=None, help="segmentation train canvases (default: its own)")
    ap.add_argument("--segment-test", type=int, default=None, help="segmentation test canvases (default: its own)")
    ap.add_argument("--no-photos", action="store_true")
    args = ap.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        photos = None if args.no_photos else make_photo_folder(out / "transfer_photos", args.crops, args.image_size)
    except DataError as e:
        raise SystemExit(f"{e} Or pass --no-photos.") from None
    scene_sets = {"dataset": "fmnist_scenes", "train_subset": args.scenes_train, "test_subset": args.scenes_test,
                  "image_size": args.image_size}
    seg_opts = {key: v for key, v in (("epochs", args.segment_epochs), ("train_subset", args.segment_train),
                                      ("test_subset", args.segment_test)) if v is not None}
    rows = []
    t0 = time.perf_counter()
    for run in args.runs:
        for baseline in ("none", "pixels", "random"):
            row = {"run": run, "features": {"none": "pretrained"}.get(baseline, baseline)}
            row["fmnist_knn_top1"] = knn_top1(run, baseline, train_subset=args.fmnist_train,
                                              test_subset=args.fmnist_test)
            row["scenes_knn_top1"] = knn_top1(run, baseline, **scene_sets)
            if photos is not None:
                row["photos_knn_top1"] = knn_top1(run, baseline, dataset=str(photos), image_size=args.image_size)
            seg = run_segment(run, baseline=baseline, progress=False, plots=False, **seg_opts)["metrics"]
            row["scenes_miou"], row["scenes_pixel_acc"] = float(seg["miou"]), float(seg["pixel_accuracy"])
            print(json.dumps(row), flush=True)
            rows.append(row)
    result = {"cpu": cpu_model(), "k": K, "protocol": "k-NN top-1, centred cosine, k=20, T=0.07",
              "image_size_scenes_photos": args.image_size, "scenes_train": args.scenes_train,
              "scenes_test": args.scenes_test,
              "fmnist_train": args.fmnist_train or "all", "fmnist_test": args.fmnist_test or "all", "photo_crops_per_split": None if photos is None else args.crops,
              "seconds": round(time.perf_counter() - t0, 1), "rows": rows}
    (out / "transfer.json").write_text(json.dumps(result, indent=1))
    cols = [("fmnist_knn_top1", "FMNIST k-NN"), ("scenes_knn_top1", "scenes k-NN"),
            ("photos_knn_top1", "photos k-NN"), ("scenes_miou", "scenes mIoU"), ("scenes_pixel_acc", "pixel acc")]
    cols = [c for c in cols if c[0] in rows[0]]
    lines = [f"# Transfer of Fashion-MNIST runs ({result['cpu']})", "",
             f"{result['protocol']}; scenes and photos at {args.image_size} px; segmentation: linear probe on "
             "frozen patch features (mIoU and pixel accuracy, %).", "",
             "| run | features | " + " | ".join(c[1] for c in cols) + " |", "|---|---|" + "---|" * len(cols)]
    for r in rows:
        lines.append(f"| {Path(r['run']).name} | {r['features']} | "
                     + " | ".join(f"{r[c[0]]:.2f}" for c in cols) + " |")
    (out / "transfer.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
