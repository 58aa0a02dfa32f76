"""How well what a ViT looks at matches the objects: the mean Jaccard index, over fmnist_scenes test canvases,
between the union of the object masks and (a) DINO's thresholded CLS attention (the patches holding 60% of the
mass, mean over heads) and (b) the DINOv2 PCA foreground (first principal component of the patch tokens), next to
a random ViT of the same shape and a fixed centred Gaussian blob of the same area. In the spirit of the DINO
paper's Table 5 (Jaccard of attention masks against PASCAL VOC masks).

    python benchmarks/dense_jaccard.py --runs runs/dino_vit_tiny_fmnist-latest --num 1000 --out bench_out

Writes ``dense_jaccard.json`` and ``dense_jaccard.md``. Runs must have ViT encoders; the random ViT is built from
the first run's recipe (or the default 4-px ViT-Tiny when no run is given).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from time_to_accuracy import cpu_model  # benchmarks/ is on sys.path as a script

from sslkit.augment.base import eval_transform
from sslkit.plugins import load_all
from sslkit.registry import DATASETS, ENCODERS
from sslkit.viz.attention import attention_maps
from sslkit.viz.dense import blob_mask, jaccard, mass_mask, pca_patch_maps, upsample_mask

DEFAULT_VIT = {"name": "vit_tiny_patch4_32", "depth": 4, "embed_dim": 192, "num_heads": 3}


@torch.no_grad()
def scores(encoder, images: torch.Tensor, objects: torch.Tensor, batch: int = 128) -> dict[str, float]:  # noqa: ANN001
    """Mean Jaccard of the attention mask, the PCA foreground and the same-area blob against ``objects``."""
    size = tuple(images.shape[-2:])
    att_masks, tokens = [], []
    for i in range(0, len(images), batch):
        x = images[i:i + batch]
        att_masks.append(upsample_mask(mass_mask(attention_maps(encoder, x).mean(dim=1)), size))
        tokens.append(encoder.forward_tokens(x).patches.float())
    att = torch.cat(att_masks)
    patches = torch.cat(tokens)
    grid = encoder.patch_grid(*size)
    _, fg = pca_patch_maps(patches, grid)
    if fg.float().mean() > 0.5:  # the first component's sign is arbitrary: the smaller side is the object
        fg = ~fg
    pca = upsample_mask(fg, size)
    blob = blob_mask(size, float(att.float().mean())).expand_as(att)
    return {"attention": float(jaccard(att, objects).mean()), "pca_foreground": float(jaccard(pca, objects).mean()),
            "blob_same_area_as_attention": float(jaccard(blob, objects).mean()),
            "attention_area": float(att.float().mean()), "pca_area": float(pca.float().mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", nargs="*", default=[], help="ViT runs to score (their eval encoders)")
    ap.add_argument("--num", type=int, default=1000, help="fmnist_scenes test canvases (at least 1000 for the table)")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="bench_out")
    args = ap.parse_args()
    load_all()
    from sslkit.run import encoder_kwargs, load_encoder

    ds = DATASETS.build("fmnist_scenes", split="test", num_images=args.num, image_size=args.image_size, seed=args.seed)
    tf = eval_transform(args.image_size)
    images = torch.stack([tf(ds.images[i]) for i in range(len(ds))])
    objects = ds.masks > 0  # (N, H, W): the union of the object masks
    encoders = {}
    for r in args.runs:
        enc, cfg = load_encoder(r)
        encoders[f"trained: {Path(r).name}"] = enc
    kw = encoder_kwargs(cfg, for_eval=True) if args.runs else dict(DEFAULT_VIT)
    torch.manual_seed(args.seed)
    encoders["random init"] = ENCODERS.build(kw.pop("name"), **kw).eval()
    result = {"date": time.strftime("%Y-%m-%d"), "machine": cpu_model(),
              "canvases": len(ds), "image_size": args.image_size, "attention_mass": 0.6, "encoders": {}}
    for name, enc in encoders.items():
        t0 = time.perf_counter()
        result["encoders"][name] = {**scores(enc, images, objects), "seconds": time.perf_counter() - t0}
        print(name, result["encoders"][name], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "dense_jaccard.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [f"# Jaccard against object masks ({len(ds)} fmnist_scenes test canvases, {args.image_size} px)", "",
             "| encoder | attention (60% mass) | PCA foreground | centred blob, same area | attention area |",
             "|---|---|---|---|---|"]
    for name, r in result["encoders"].items():
        lines.append(f"| {name} | {r['attention']:.3f} | {r['pca_foreground']:.3f} | "
                     f"{r['blob_same_area_as_attention']:.3f} | {r['attention_area']:.2f} |")
    (out / "dense_jaccard.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
