"""``sslkit export RUN --format timm|onnx|safetensors --out DIR``: a run's eval encoder as files others load.

- ``timm``: ``model.safetensors`` whose keys are exactly the timm model's, and ``config.json`` in timm's own
  layout (``architecture``, ``model_args``, ``pretrained_cfg``), so both of these load it::

      import sslkit.encoders, timm  # sslkit.encoders registers the sslkit_* architectures with timm
      model = timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(file="DIR/model.safetensors"),
                                **model_args)          # arch and model_args from DIR/config.json
      model = timm.create_model("local-dir:DIR", pretrained=True)

  timm only warns on keys that do not fit when ``num_classes=0``; :func:`load_timm` checks every key and shape
  and raises :class:`ExportError` instead. The export itself loads the written file back through the one-line
  call and refuses to finish unless the features equal sslkit's.
- ``onnx``: ``encoder.onnx``, images ``(B, 3, s, s)`` (normalised as in ``config.json``) to pooled features
  ``(B, dim)``; checked against torch with onnxruntime (max abs difference <= :data:`ONNX_TOLERANCE`).
- ``safetensors``: sslkit's own layout (``encoder.safetensors`` + ``config.yaml``), which ``sslkit eval`` reads
  as a run.

Every format also writes ``MODEL_CARD.md`` (recipe, encoder, preprocessing, how to load, the run's evaluation
results) and ``export.json`` (files, sha256, checks). Files are written atomically.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import hashlib
import io
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sslkit.run import RunError, atomic_write_bytes

FORMATS = ("timm", "onnx", "safetensors")
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
ONNX_NAME = "encoder.onnx"
CARD_NAME = "MODEL_CARD.md"
MANIFEST_NAME = "export.json"
EXPORT_VERSION = 1
ONNX_OPSET = 17
ONNX_TOLERANCE = 1e-4  # max abs difference of ONNX Runtime's features from torch's
FEATURE_TOLERANCE = 1e-5  # timm's reloaded model against sslkit's encoder (same kernels: equal up to rounding)
CHECK_BATCH = 2  # images in the seeded random batch the checks run


class ExportError(RunError):
    """An export that cannot be written, or a file that is not the exported model it claims to be."""


# ----------------------------------------------------------------------------------------------------------
# timm
# ----------------------------------------------------------------------------------------------------------


def timm_state(encoder: nn.Module) -> tuple[str, dict[str, Any], dict[str, torch.Tensor]]:
    """``(architecture, model_args, state_dict)`` of an sslkit :class:`~sslkit.encoders.Encoder` in timm's terms:
    the wrapper's ``model.`` prefix removed and sslkit-only tensors (the iBOT mask token) left out."""
    config = getattr(encoder, "timm_config", None)
    if config is None:
        raise ExportError(f"encoder {getattr(encoder, 'name', type(encoder).__name__)!r} has no timm architecture "
                          "(Encoder.timm_config is None, as for a plug-in encoder); export it with --format onnx or "
                          "--format safetensors.")
    arch, kwargs = config
    state = {k[len("model."):]: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()
             if k.startswith("model.")}
    return arch, dict(kwargs), state


def _pretrained_cfg(arch: str, image_size: int) -> dict[str, Any]:
    """timm's pretrained config for ``arch`` with sslkit's evaluation preprocessing and no download location."""
    from timm.models import get_pretrained_cfg

    from sslkit.augment.base import IMAGENET_MEAN, IMAGENET_STD
    from sslkit.eval.features import eval_crop_ratio

    base = get_pretrained_cfg(arch)
    cfg = base.to_dict() if base is not None else {}
    for key in ("url", "hf_hub_id", "hf_hub_filename", "file", "state_dict", "source", "tag", "origin_url",
                "paper_ids", "paper_name", "notes"):
        cfg.pop(key, None)
    cfg.update(architecture=arch, num_classes=0, input_size=[3, image_size, image_size], mean=list(IMAGENET_MEAN),
               std=list(IMAGENET_STD), crop_pct=eval_crop_ratio(image_size), crop_mode="center",
               interpolation="bilinear")
    return json.loads(json.dumps(cfg, default=list))


def _check_input(image_size: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(CHECK_BATCH, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed))


@contextlib.contextmanager
def _quiet_timm() -> Any:
    """timm logs (and warns about) keys it skips; the strict checks here replace those messages."""
    logger = logging.getLogger("timm")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def export_timm(encoder: nn.Module, image_size: int, out: Path, *, extra: dict[str, Any] | None = None) -> dict:
    """Write ``model.safetensors`` + ``config.json`` for timm and check the one-line timm call reproduces
    ``encoder``'s features on a random batch. Returns the manifest entry."""
    import timm
    from safetensors.torch import save

    arch, kwargs, state = timm_state(encoder)
    config = {"architecture": arch, "num_classes": 0, "num_features": int(getattr(encoder, "dim", 0)),
              "model_args": kwargs, "pretrained_cfg": _pretrained_cfg(arch, image_size),
              "sslkit": {"export_version": EXPORT_VERSION, **(extra or {})}}
    weights = out / WEIGHTS_NAME
    atomic_write_bytes(weights, save(state, metadata={"format": "pt", "producer": "sslkit", "architecture": arch}))
    atomic_write_bytes(out / CONFIG_NAME, (json.dumps(config, indent=2) + "\n").encode())
    with _quiet_timm():
        model = timm.create_model(arch, pretrained=True, pretrained_cfg_overlay=dict(file=str(weights)), **kwargs)
    _require_same_keys(model, state, weights)
    diff = _max_diff(encoder, model, image_size)
    if diff > FEATURE_TOLERANCE:
        raise ExportError(f"timm's {arch} loaded from {weights} gives features {diff:.2e} away from sslkit's encoder "
                          f"(tolerance {FEATURE_TOLERANCE:g}); the export is not usable. Please report this with the "
                          "run's config.yaml.")
    return {"files": [WEIGHTS_NAME, CONFIG_NAME], "architecture": arch, "model_args": kwargs,
            "timm_max_abs_diff": diff}


def _max_diff(reference: nn.Module, other: nn.Module, image_size: int) -> float:
    x = _check_input(image_size)
    reference_mode, other_mode = reference.training, other.training
    reference.eval(), other.eval()
    try:
        with torch.no_grad():
            return float((reference(x).float() - other(x).float()).abs().max())
    finally:
        reference.train(reference_mode), other.train(other_mode)


def _require_same_keys(model: nn.Module, state: dict[str, torch.Tensor], path: Path) -> None:
    from sslkit.run import load_state_strict

    try:
        load_state_strict(model, state, str(path))
    except RunError as e:
        raise ExportError(str(e)) from None


def _read_timm_config(path: Path) -> dict[str, Any]:
    try:
        cfg = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ExportError(f"{path} is not a readable JSON timm config ({e}); export the run again "
                          "(`sslkit export RUN --format timm --out DIR`).") from None
    if not (isinstance(cfg, dict) and isinstance(cfg.get("architecture"), str)
            and isinstance(cfg.get("model_args", {}), dict)):
        raise ExportError(f"{path} does not name an architecture and its model_args; it is not an sslkit/timm "
                          "export config.")
    return cfg


def _read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A safetensors file's tensors and metadata; a training checkpoint or a truncated file is an error."""
    from safetensors import safe_open

    if not path.is_file():
        raise ExportError(f"{path} does not exist; pass the export folder or its {WEIGHTS_NAME}.")
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:2] == b"PK" or head[:1] == b"\x80":
        raise ExportError(f"{path} is a pickled torch file (a training checkpoint or a torch.save state dict), not "
                          f"exported weights. Export the run first: `sslkit export RUN --format timm --out DIR`, then "
                          f"load DIR/{WEIGHTS_NAME}.")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - SafetensorError, OSError: truncated or foreign file
        raise ExportError(f"{path} is not a readable safetensors file ({str(e).splitlines()[0][:200]}); it may be "
                          "truncated or another format. Export the run again.") from None
    return state, meta


def load_timm(path: str | Path, **overrides: Any) -> nn.Module:
    """Load an ``sslkit export --format timm`` folder (or its ``model.safetensors``) as a timm model, strictly.

    Every key and shape of the file must match the architecture in ``config.json``; anything else (weights of
    another architecture, a training checkpoint, a truncated file) raises :class:`ExportError` naming the
    problem, where timm itself would warn and keep random weights. ``overrides`` are passed to
    ``timm.create_model`` on top of the config's ``model_args`` (for example ``drop_path_rate``).

    Returns the model in eval mode; its ``pretrained_cfg`` holds the input size and mean/std to use.
    """
    import timm

    p = Path(path).expanduser()
    folder, weights = (p, p / WEIGHTS_NAME) if p.is_dir() else (p.parent, p)
    cfg_path = folder / CONFIG_NAME
    if not cfg_path.is_file():
        raise ExportError(f"{folder} has no {CONFIG_NAME}; load_timm needs the folder `sslkit export --format timm` "
                          "wrote (config.json next to model.safetensors).")
    cfg = _read_timm_config(cfg_path)
    state, meta = _read_weights(weights)
    arch = cfg["architecture"]
    if meta.get("architecture") not in (None, arch):
        raise ExportError(f"{weights} holds {meta['architecture']} weights but {cfg_path} names {arch}; the files "
                          "come from different exports.")
    kwargs = {**cfg.get("model_args", {}), **overrides}
    try:
        model = timm.create_model(arch, pretrained=False, **kwargs)
    except RuntimeError as e:  # unknown model name
        raise ExportError(f"{cfg_path}: timm cannot build {arch!r} ({e}). sslkit_* architectures need "
                          "`import sslkit.encoders` first.") from None
    _require_same_keys(model, state, weights)
    model.pretrained_cfg = {**getattr(model, "pretrained_cfg", {}), **cfg.get("pretrained_cfg", {}),
                            "file": str(weights)}
    return model.eval()


# ----------------------------------------------------------------------------------------------------------
# ONNX and sslkit's own layout
# ----------------------------------------------------------------------------------------------------------


class _Features(nn.Module):
    """``(B, 3, s, s) -> (B, dim)``: the pooled features, for tracing."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images)


def export_onnx(encoder: nn.Module, image_size: int, out: Path, *, opset: int = ONNX_OPSET) -> dict:
    """Write ``encoder.onnx`` (dynamic batch) and check it against torch with onnxruntime."""
    from sslkit.encoders import restore_attention, set_fused_attention

    module = _Features(encoder).eval()
    x = _check_input(image_size)
    buf = io.BytesIO()
    before = set_fused_attention(module, False)  # plain matmul + softmax attention: every runtime has the ops
    try:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # tracer notes on shape arithmetic; the output is checked below
            torch.onnx.export(module, (x,), buf, input_names=["images"], output_names=["features"],
                              dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}}, opset_version=opset,
                              dynamo=False)
        with torch.no_grad():
            want = module(x).float().numpy()
    finally:
        restore_attention(before)
    data = buf.getvalue()
    diff = onnx_max_diff(data, x.numpy(), want)
    if diff > ONNX_TOLERANCE:
        raise ExportError(f"the ONNX graph's features differ from torch's by {diff:.2e} (tolerance {ONNX_TOLERANCE:g}); "
                          f"not written. Try another opset (--opset).")
    atomic_write_bytes(out / ONNX_NAME, data)
    return {"files": [ONNX_NAME], "opset": opset, "onnx_max_abs_diff": diff,
            "input": {"name": "images", "shape": ["batch", 3, image_size, image_size]},
            "output": {"name": "features", "shape": ["batch", int(getattr(encoder, "dim", want.shape[1]))]}}


def onnx_max_diff(model: bytes | str | Path, images: Any, want: Any) -> float:
    """Max abs difference between onnxruntime's output for ``images`` and ``want`` (numpy arrays)."""
    try:
        import onnxruntime as ort
    except ModuleNotFoundError:
        raise ExportError("onnxruntime is not installed; `pip install onnx onnxruntime` (sslkit's dependencies) to "
                          "export and check ONNX.") from None
    src = model if isinstance(model, bytes) else str(model)
    runner = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    got = runner.run(None, {runner.get_inputs()[0].name: images})[0]
    return float(abs(got - want).max())


def export_safetensors(run_dir: Path, encoder: nn.Module, out: Path) -> dict:
    """sslkit's layout: ``encoder.safetensors`` (the Encoder's own keys) + ``config.yaml``; ``sslkit eval`` reads it."""
    from sslkit.run import save_encoder

    save_encoder(encoder, out / "encoder.safetensors")
    atomic_write_bytes(out / "config.yaml", (run_dir / "config.yaml").read_bytes())
    return {"files": ["encoder.safetensors", "config.yaml"]}


# ----------------------------------------------------------------------------------------------------------
# Model card and the run
# ----------------------------------------------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    """A JSON file of the run (untrusted): its content, or None when missing or unreadable."""
    if not path.is_file() or path.is_symlink():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None


def eval_results(run_dir: Path) -> list[dict[str, Any]]:
    """``RUN/eval/*/results.json`` that parse, as ``{"name", "kind", "baseline", "dataset", "summary"}`` rows."""
    from sslkit.eval.report import summarize

    rows = []
    eval_root = run_dir / "eval"
    for path in sorted(eval_root.glob("*/results.json")) if eval_root.is_dir() and not eval_root.is_symlink() else []:
        res = _read_json(path)
        if not isinstance(res, dict) or not isinstance(res.get("metrics"), dict):
            continue
        try:
            line = summarize(str(res.get("kind")), res["metrics"], res.get("settings") or {})
        except (KeyError, TypeError, ValueError):
            line = "(results in an unknown layout)"
        feats = res.get("features") if isinstance(res.get("features"), dict) else {}
        rows.append({"name": path.parent.name, "kind": str(res.get("kind")), "baseline": str(res.get("baseline")),
                     "dataset": str(feats.get("dataset", "")), "summary": line})
    return rows


def _md(text: Any) -> str:
    return str(text).replace("|", "/").replace("\n", " ")


def model_card(run_dir: Path, cfg: Any, encoder: nn.Module, image_size: int, entries: dict[str, dict],
               command: str) -> str:
    """The Markdown model card: recipe, encoder, preprocessing, how to load each format, evaluation results."""
    from omegaconf import OmegaConf

    from sslkit.run import encoder_kwargs

    recipe = OmegaConf.to_container(cfg, resolve=False)
    enc = encoder_kwargs(cfg, for_eval=True)
    optim, trainer, data = recipe.get("optim", {}), recipe.get("trainer", {}), recipe.get("data", {})
    summary = _read_json(run_dir / "summary.json") or {}
    lines = [f"# {_md(recipe.get('name', run_dir.name))}: {_md(enc.get('name'))} encoder", "",
             f"Pretrained with sslkit ({_md(recipe.get('objective', {}).get('name'))}) and exported by `{command}`.",
             "", "## Recipe", "", "| field | value |", "|---|---|",
             f"| objective | {_md(json.dumps(recipe.get('objective', {}), default=str))} |",
             f"| encoder | {_md(json.dumps(enc, default=str))} |",
             f"| dataset | {_md(data.get('name'))} {_md(json.dumps(data.get('args') or {}, default=str))} |",
             f"| epochs / batch size | {_md(trainer.get('epochs'))} / {_md(data.get('batch_size'))} |",
             f"| optimiser | {_md(optim.get('name'))}, lr {_md(optim.get('lr'))}, "
             f"weight decay {_md(optim.get('weight_decay'))} |",
             f"| steps trained | {_md(summary.get('steps', '?'))}"
             f"{' (finished)' if summary.get('finished') else ''} |",
             f"| feature size | {int(getattr(encoder, 'dim', 0))} |", "",
             "## Preprocessing", "",
             f"RGB, resize the short side and centre-crop to {image_size} px (crop ratio "
             f"{entries.get('timm', {}).get('crop_pct', 'as in sslkit eval')}), scale to [0, 1], normalise with the "
             "ImageNet mean (0.485, 0.456, 0.406) and std (0.229, 0.224, 0.225).", "", "## Load", ""]
    if "timm" in entries:
        t = entries["timm"]
        args = ", ".join(f"{k}={v!r}" for k, v in t["model_args"].items())
        lines += ["```python", "import sslkit.encoders  # registers sslkit_* architectures with timm", "import timm",
                  "", f"model = timm.create_model({t['architecture']!r}, pretrained=True,",
                  f"                          pretrained_cfg_overlay=dict(file='{WEIGHTS_NAME}'), {args})",
                  "# strict (a wrong or truncated file is an error, not a warning):",
                  "from sslkit.export import load_timm", "model = load_timm('.')", "```", "",
                  f"timm's reloaded model matches sslkit's features within {t['timm_max_abs_diff']:.1e} (checked "
                  "at export).", ""]
    if "onnx" in entries:
        o = entries["onnx"]
        lines += ["```python", "import onnxruntime as ort", f"runner = ort.InferenceSession('{ONNX_NAME}')",
                  "features = runner.run(None, {'images': images})[0]  # images: float32 (B, 3, s, s), normalised",
                  "```", "", f"ONNX (opset {o['opset']}) matches torch within {o['onnx_max_abs_diff']:.1e}.", ""]
    if "safetensors" in entries:
        lines += ["`encoder.safetensors` + `config.yaml` are sslkit's own layout: `sslkit eval knn THIS_FOLDER`.", ""]
    lines += ["## Evaluation", ""]
    rows = eval_results(run_dir)
    knn = summary.get("knn") if isinstance(summary, dict) else None
    if knn is not None:
        lines += [f"k-NN at the end of training: {_md(json.dumps(knn, default=str))}", ""]
    if rows:
        lines += ["| evaluation | features | dataset | result |", "|---|---|---|---|"]
        lines += [f"| {_md(r['name'])} | {_md(r['baseline'])} | {_md(r['dataset'])} | {_md(r['summary'])} |"
                  for r in rows]
    else:
        lines.append("No evaluation results in the run yet (`sslkit eval knn RUN`, then export again).")
    return "\n".join(lines) + "\n"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def export_run(run: str | Path, fmt: str = "timm", out: str | Path | None = None, *,
               opset: int = ONNX_OPSET, command: str | None = None) -> dict[str, Any]:
    """Export a run's eval encoder (``encoder.safetensors``, the encoder ``sslkit eval`` uses) as ``fmt`` into
    ``out`` (default ``RUN/export/<fmt>``), with ``MODEL_CARD.md`` and ``export.json``. Returns the manifest."""
    from sslkit.run import eval_image_size, load_encoder, refuse_linked_dirs, resolve_run_dir

    if fmt not in FORMATS:
        raise ExportError(f"export format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    run_dir = resolve_run_dir(run)
    encoder, cfg = load_encoder(run_dir)
    image_size = eval_image_size(cfg)
    out_dir = Path(out).expanduser() if out is not None else run_dir / "export" / fmt
    if out is None and (run_dir / "export").is_symlink():
        raise ExportError(f"{run_dir / 'export'} is a symbolic link; sslkit writes into a run's own folders only.")
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise ExportError(f"--out {out_dir} must be a folder (not a file or a symbolic link).")
    if out_dir.resolve() == run_dir:
        raise ExportError("--out must not be the run directory itself: the export would replace the run's files.")
    refuse_linked_dirs(run_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    command = command or f"sslkit export {run_dir} --format {fmt} --out {out_dir}"
    if fmt == "timm":
        entry = export_timm(encoder, image_size, out_dir, extra={"run": run_dir.name, "encoder": encoder.name})
        entry["crop_pct"] = _pretrained_cfg(entry["architecture"], image_size)["crop_pct"]
    elif fmt == "onnx":
        entry = export_onnx(encoder, image_size, out_dir, opset=opset)
    else:
        entry = export_safetensors(run_dir, encoder, out_dir)
    card = model_card(run_dir, cfg, encoder, image_size, {fmt: entry}, command)
    atomic_write_bytes(out_dir / CARD_NAME, card.encode())
    manifest = {"format": fmt, "export_version": EXPORT_VERSION, "run_dir": str(run_dir),
                "created": _dt.datetime.now().isoformat(timespec="seconds"), "command": command,
                "encoder": str(getattr(encoder, "name", "")), "dim": int(getattr(encoder, "dim", 0)),
                "image_size": image_size, **entry,
                "sha256": {name: _sha256(out_dir / name) for name in [*entry["files"], CARD_NAME]}}
    atomic_write_bytes(out_dir / MANIFEST_NAME, (json.dumps(manifest, indent=2) + "\n").encode())
    return {**manifest, "out_dir": str(out_dir)}


# ----------------------------------------------------------------------------------------------------------
# Command line (`sslkit export`, wired by sslkit.cli._add_optional_module)
# ----------------------------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", metavar="RUN", help="run directory, its -latest link, or a file inside it")
    p.add_argument("--format", dest="fmt", choices=FORMATS, default="timm",
                   help="timm: model.safetensors + config.json for timm.create_model (default); onnx: encoder.onnx; "
                        "safetensors: sslkit's own encoder.safetensors + config.yaml")
    p.add_argument("--out", default=None, metavar="DIR", help="output folder (default: RUN/export/FORMAT)")
    p.add_argument("--opset", type=int, default=ONNX_OPSET, help="ONNX opset version")


def run(args: argparse.Namespace) -> int:
    import shlex
    import sys

    command = "sslkit " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["export"] else None
    res = export_run(args.run, args.fmt, args.out, opset=args.opset, command=command)
    print(json.dumps({k: res[k] for k in ("format", "out_dir", "encoder", "dim", "image_size", "files")}, indent=2))
    for key in ("timm_max_abs_diff", "onnx_max_abs_diff"):
        if key in res:
            print(f"{key}: {res[key]:.2e}")
    print(f"model card: {Path(res['out_dir']) / CARD_NAME}")
    return 0
