"""Grad-CAM heatmaps through the linear-probe classifier (Selvaraju et al. 2017): ``sslkit viz gradcam RUN``.

For a CNN encoder's last feature map ``A`` (B, K, h, w) and a class score ``y_c`` (the linear probe on the pooled
features), each channel's weight is its spatially averaged gradient ``alpha_k = mean_ij dy_c / dA_kij`` and the
map is ``relu(sum_k alpha_k A_k)``, upsampled bilinearly to the image and scaled to [0, 1] per image. The class is
the probe's prediction unless ``--class`` names one.

The probe is a linear classifier (BatchNorm-standardised, :func:`sslkit.eval.linear.fit_linear_heads`) trained on
the run's cached train features; it is saved in ``RUN/gradcam/probe.safetensors`` keyed by the encoder's hash and
reused while the weights stay the same.

Example::

    sslkit viz gradcam runs/simclr_resnet_fmnist-latest --from-dataset 8     # -> RUN/gradcam/gradcam.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from sslkit.eval.linear import LinearHeads
from sslkit.viz import save_panel_grid

PROBE_NAME = "probe.safetensors"
PROBE_LR, PROBE_WEIGHT_DECAY, PROBE_EPOCHS = 0.1, 1e-4, 20
PROBE_TRAIN_IMAGES = 10000  # a fixed random subset of the train split is enough for a probe to explain
OVERLAY_ALPHA = 0.5


def gradcam(encoder, probe: LinearHeads, images: torch.Tensor,  # noqa: ANN001 - an sslkit CNN Encoder
            classes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Grad-CAM of ``images`` (B, 3, H, W) for ``classes`` (B,) (default: the probe's predictions).

    Returns ``(maps (B, H, W) in [0, 1], classes (B,), probabilities (B, C))``.
    """
    if getattr(encoder, "is_vit", False) or not hasattr(encoder.model, "forward_head"):
        raise TypeError(f"Grad-CAM needs a CNN encoder with a last feature map; {getattr(encoder, 'name', '')} is not "
                        "one (for ViTs see `sslkit viz attention`)")
    encoder.eval()
    with torch.enable_grad():
        fmap = encoder.model.forward_features(images).detach().requires_grad_(True)  # (B, K, h, w)
        pooled = encoder.model.forward_head(fmap, pre_logits=True)  # (B, dim)
        logits = probe.logits(pooled)[0]  # (B, C)
        if classes is None:
            classes = logits.argmax(1)
        score = logits.gather(1, classes[:, None]).sum()
        (grad,) = torch.autograd.grad(score, fmap)  # (B, K, h, w)
    alpha = grad.mean(dim=(2, 3), keepdim=True)  # (B, K, 1, 1)
    cam = F.relu((alpha * fmap.detach()).sum(1, keepdim=True))  # (B, 1, h, w)
    cam = F.interpolate(cam, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]  # (B, H, W)
    peak = cam.flatten(1).max(1).values.clamp(min=1e-12)[:, None, None]
    return cam / peak, classes, logits.detach().softmax(1)


def load_or_fit_probe(run: str | Path, device: str = "cpu", progress: bool = True) -> tuple[LinearHeads, list[str]]:
    """The run's Grad-CAM probe (saved, or trained now on cached train features and saved) and the class names."""
    from safetensors.torch import load_file, save

    from sslkit.eval.linear import fit_linear_heads
    from sslkit.eval.report import _keyed_hash, load_context
    from sslkit.run import atomic_write_bytes, encoder_kwargs

    ctx = load_context(run, device=device, train_subset=PROBE_TRAIN_IMAGES, progress=progress)
    train_ds = ctx.dataset("train")
    classes = list(getattr(train_ds, "classes", None) or [])
    path = ctx.run_dir / "gradcam" / PROBE_NAME
    from sslkit.run import load_encoder

    key = _keyed_hash(load_encoder(ctx.run_dir)[0], encoder_kwargs(ctx.cfg, for_eval=True))
    if path.is_file() and not path.is_symlink():
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            same = (f.metadata() or {}).get("encoder") == key
        if same:
            t = load_file(str(path))
            return LinearHeads(t["weight"], t["bias"], t["mean"], t["var"]), classes
    feats = ctx.features("train")
    if (feats.labels < 0).any():
        from sslkit.run import RunError

        raise RunError(f"Grad-CAM explains a classifier; {ctx.cfg.data.name} has unlabelled images to train one on")
    probe = fit_linear_heads(feats.features, feats.labels, max(len(classes), int(feats.labels.max()) + 1),
                             lrs=[PROBE_LR], weight_decays=[PROBE_WEIGHT_DECAY], epochs=PROBE_EPOCHS,
                             batchnorm=True, device=ctx.device)
    state = {"weight": probe.weight, "bias": probe.bias, "mean": probe.mean, "var": probe.var}
    atomic_write_bytes(path, save({k: v.contiguous() for k, v in state.items()}, metadata={"encoder": key}))
    return probe, classes


def save_gradcam_grid(images: torch.Tensor, maps: torch.Tensor, titles: list[str], names: list[str],
                      path: Path) -> Path:
    """One row per image: the image, the heatmap, and the heatmap over the image."""
    import matplotlib

    heat = matplotlib.colormaps["jet"]
    rows = []
    for img, m in zip(images, maps):
        rgb, m = img.permute(1, 2, 0).numpy(), m.numpy()
        rows.append([rgb, m, (1 - OVERLAY_ALPHA) * rgb + OVERLAY_ALPHA * heat(m)[..., :3]])
    return save_panel_grid(rows, ["image", "Grad-CAM", "overlay"], names, path, xlabels=titles, cmap="jet", vmin=0,
                           vmax=1, interpolation="bilinear")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from sslkit.viz.attention import add_image_arguments

    add_image_arguments(parser, "output PNG (default: RUN/gradcam/gradcam.png); the run needs a CNN encoder")
    parser.add_argument("--class", dest="class_name", default=None,
                        help="explain this class (name or index) instead of each image's predicted class")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    """``sslkit viz gradcam RUN [IMAGE ...] [--from-dataset N] [--class NAME]``: one PNG grid."""
    from sslkit.cli import CLIError
    from sslkit.run import eval_image_size, load_encoder, resolve_run_dir
    from sslkit.viz.attention import dataset_images, denormalize, load_image_files

    if not args.images and args.from_dataset <= 0:
        raise CLIError("give image files and/or --from-dataset N")
    encoder, cfg = load_encoder(args.run, map_location="cpu")
    if getattr(encoder, "is_vit", False):
        raise CLIError(f"Grad-CAM needs a CNN encoder; this run's {cfg.encoder.name} is a ViT. Use "
                       "`sslkit viz attention` or `sslkit viz pca` for ViTs.")
    encoder = encoder.to(args.device).eval()
    size = args.image_size or eval_image_size(cfg)
    parts, names = [], []
    if args.images:
        try:
            parts.append(load_image_files(args.images, size))
        except FileNotFoundError as e:
            raise CLIError(str(e)) from None
        names += [Path(p).stem for p in args.images]
    if args.from_dataset > 0:
        imgs, ds_names = dataset_images(cfg, args.from_dataset, size)
        parts.append(imgs)
        names += ds_names
    images = torch.cat(parts).to(args.device)
    probe, class_names = load_or_fit_probe(args.run, device=args.device, progress=not args.no_progress)
    probe = LinearHeads(*(t.to(args.device) if t is not None else None for t in
                          (probe.weight, probe.bias, probe.mean, probe.var)))
    classes = None
    if args.class_name is not None:
        c = class_names.index(args.class_name) if args.class_name in class_names else None
        if c is None and args.class_name.isdigit() and int(args.class_name) < probe.weight.shape[-1]:
            c = int(args.class_name)
        if c is None:
            raise CLIError(f"--class {args.class_name!r} is not a class of this run: {class_names or 'indices 0..'}")
        classes = torch.full((len(images),), c, dtype=torch.long, device=args.device)
    maps, picked, probs = gradcam(encoder, probe, images, classes)
    name = (lambda c: class_names[c] if c < len(class_names) else str(c))  # noqa: E731
    titles = [f"{name(int(c))} ({float(p[c]):.0%})" for c, p in zip(picked.cpu(), probs.cpu())]
    out = Path(args.out) if args.out else resolve_run_dir(args.run) / "gradcam" / "gradcam.png"
    print(save_gradcam_grid(denormalize(images), maps.detach().cpu(), titles, names, out))
    return 0
