"""The k-NN monitor: the one place where training touches :mod:`sslkit.eval`.

During training (``eval.knn_every``) it scores the objective's eval encoder on a subset of the recipe's data;
when training finishes (``eval.final_knn``) it scores it on the full train bank and eval split next to raw pixels,
and that figure is the run's headline: DINO's weighted vote (k=20, T=0.07) on L2-normalised features centred on
the bank mean, with the uncentred figure (DINO's exact protocol) beside it, and a whitened figure after them when
the recipe asks for one (``eval.knn_whiten``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig

from sslkit.engine.callbacks import Callback

if TYPE_CHECKING:
    from sslkit.engine.context import TrainContext


def protocol(cfg: DictConfig, *, headline_only: bool = False) -> dict[str, Any]:
    """The recipe's k-NN settings as keyword arguments of :func:`sslkit.eval.knn.headline_protocols`."""
    ev = cfg.eval
    kw: dict[str, Any] = {"k": int(ev.knn_k), "temperature": float(ev.knn_temperature), "center": bool(ev.knn_center)}
    if not headline_only:
        kw["whiten"] = ev.get("knn_whiten")
    return kw


def knn_scores(cfg: DictConfig, encoder, device, *, monitor: bool) -> dict[str, Any]:  # noqa: ANN001
    """k-NN of ``encoder`` on the recipe's train bank and eval split (the monitor's subsets when ``monitor``); the
    final evaluation adds the raw-pixel baseline and the protocol's details."""
    from sslkit.data import subset_dataset
    from sslkit.eval.baselines import pixel_knn
    from sslkit.eval.features import extract_features
    from sslkit.eval.knn import headline_protocols, knn_classify
    from sslkit.run import as_eval_encoder, build_dataset, eval_image_size

    encoder = as_eval_encoder(cfg, encoder)  # eval.encoder_args (e.g. another pool_grid) on the same weights
    ev = cfg.eval
    n_train, n_test = ev.knn_train_subset, ev.knn_test_subset
    if monitor:
        n_train, n_test = ev.monitor_train_subset or n_train, ev.monitor_test_subset or n_test
    train_ds = subset_dataset(build_dataset(cfg, "train"), n_train, seed=cfg.seed)
    test_ds = subset_dataset(build_dataset(cfg, cfg.data.eval_split), n_test, seed=cfg.seed)
    kw = {"image_size": eval_image_size(cfg), "batch_size": ev.batch_size, "device": device, "progress": not monitor}
    ftr, ltr = extract_features(encoder, train_ds, desc="k-NN bank", **kw)
    fte, lte = extract_features(encoder, test_ds, desc="k-NN queries", **kw)
    if monitor:
        return dict(knn_classify(ftr, ltr, fte, lte, **protocol(cfg, headline_only=True)))
    result = dict(headline_protocols(ftr, ltr, fte, lte, **protocol(cfg)))
    result.update(pixel_knn(train_ds, test_ds, **protocol(cfg)))
    result.update({"k": ev.knn_k, "bank": len(train_ds), "queries": len(test_ds), "center": bool(ev.knn_center),
                   "whiten": ev.get("knn_whiten")})
    return result


def knn_line(r: dict[str, Any]) -> str:
    """The line a run ends with: the headline k-NN against raw pixels, then the other protocols, labelled."""
    headline = "centred on the bank mean" if r.get("center", True) else "uncentred, DINO's protocol"
    line = (f"k-NN (k={r.get('k')}, {r.get('bank')} bank, {r.get('queries')} queries, {headline}): "
            f"top-1 {r['top1']:.2f}%")
    if "pixels_top1" in r:
        verdict = "above" if r["top1"] > r["pixels_top1"] else "BELOW"
        line += f"  vs raw pixels {r['pixels_top1']:.2f}%  -> {verdict} the raw-pixel baseline"
    others = [("uncentred, DINO's protocol", "top1_uncentred"),
              (f"PCA-whitened to {r.get('whiten')} on the bank", "top1_whitened")]
    shown = [f"{label}: {r[key]:.2f}%" + (f", pixels {r['pixels_' + key]:.2f}%" if f"pixels_{key}" in r else "")
             for label, key in others if key in r]
    if shown:
        line += "  (" + "; ".join(shown) + ")"
    return line


class KNNMonitor(Callback):
    """Online k-NN every ``eval.knn_every`` epochs and the final k-NN (see the module notes); rank 0 computes
    while the other ranks wait."""

    def _score(self, ctx: TrainContext, monitor: bool) -> dict[str, Any] | None:
        result = None
        if ctx.is_main:
            result = knn_scores(ctx.cfg, ctx.objective.eval_encoder(), ctx.fabric.device, monitor=monitor)
        ctx.fabric.barrier()
        return result

    def on_epoch_end(self, ctx: TrainContext) -> None:
        s, every = ctx.state, ctx.cfg.eval.knn_every
        if not every or s.epoch % every or s.finished:
            return
        m = self._score(ctx, monitor=True)
        if ctx.logs is not None and m is not None:
            ctx.logs.log(s.step, {"knn_top1": m["top1"], "knn_top5": m["top5"], "epoch": s.epoch,
                                  "train_seconds": s.train_time})
            ctx.logs.flush()
            ctx.print(f"epoch {s.epoch}: online k-NN top-1 {m['top1']:.2f}%")

    def on_train_end(self, ctx: TrainContext) -> None:
        if ctx.state.stopped_early or not ctx.cfg.eval.final_knn:
            return
        r = self._score(ctx, monitor=False)
        ctx.result["knn"] = r
        if ctx.logs is not None and r is not None:
            ctx.logs.log(ctx.state.step, {"knn_top1": r["top1"], "knn_top5": r["top5"],
                                          "train_seconds": ctx.state.train_time})
