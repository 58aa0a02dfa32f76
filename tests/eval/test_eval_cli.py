"""Smoke test: a hand-made tiny run directory evaluated through the library functions and the CLI."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
from omegaconf import OmegaConf

from sslkit.config import resolve
from sslkit.eval import cli
from sslkit.eval.report import EvalError, run_copy_detection, run_knn, run_linear, run_retrieval
from sslkit.run import RunError, build_encoder, save_encoder


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    run = tmp_path_factory.mktemp("runs") / "tiny-1"
    run.mkdir()
    cfg = resolve({"name": "tiny", "data": {"name": "synthetic", "args": {"num_samples": 64, "image_size": 32}},
                   "encoder": {"name": "vit_tiny_patch4_32", "depth": 1}})
    torch.manual_seed(0)
    save_encoder(build_encoder(cfg), run / "encoder.safetensors")
    OmegaConf.save(cfg, run / "config.yaml")
    return run


def _read(res):
    data = json.loads(open(res["results_path"]).read())
    assert data["metrics"] == json.loads(json.dumps(res["metrics"]))
    return data


def test_library_evaluations_write_results(run_dir):
    knn = run_knn(run_dir, k=[5, 20], progress=False, max_plot_points=40)
    data = _read(knn)
    assert set(data["metrics"]) == {"5", "20"} and 0 <= data["metrics"]["20"]["top1"] <= 100
    m = data["metrics"]["20"]  # the standard protocol, with DINO's uncentred figure beside; no whitening asked
    assert m["top1_centred"] == m["top1"] and 0 <= m["top1_uncentred"] <= 100 and "top1_whitened" not in m
    assert data["settings"]["center"] is True and data["settings"]["whitened_also"] is None
    assert data["features"]["splits"]["train"]["size"] == 64 and data["features"]["image_size"] == 32
    assert len(data["features"]["encoder_hash"]) == 64
    assert (run_dir / "eval" / "knn" / "embedding_tsne.png").is_file()

    ret = run_retrieval(run_dir / "encoder.safetensors", progress=False)  # a file inside the run works too
    data = _read(ret)
    assert {"map@r", "recall@1", "precision@10"} <= set(data["metrics"])
    assert data["features"]["splits"]["train"]["from_cache"]  # the k-NN run cached them
    assert (run_dir / "eval" / "retrieval" / "retrieval_grid.png").is_file()

    lin = run_linear(run_dir, epochs=3, lrs=(0.1,), weight_decays=(0.0, 1e-4), progress=False)
    data = _read(lin)
    assert {"top1", "top5", "best", "sweep"} <= set(data["metrics"]) and len(data["metrics"]["sweep"]) == 2

    report = (run_dir / "eval" / "report.md").read_text()
    assert report.count("\n| ") >= 4 and "retrieval" in report and "linear" in report


def test_baselines_and_copy_detection(run_dir):
    pix = run_knn(run_dir, k=[10], baseline="pixels", plots=False, progress=False)
    rnd = run_knn(run_dir, k=[10], baseline="random", plots=False, progress=False)
    assert pix["results_path"].endswith("knn_pixels/results.json")
    # Pixels and encoders go through one protocol: centred on the bank mean by default, and the uncentred
    # (DINO) figure alongside; here checked against k-NN on hand-made pixel features.
    from sslkit.eval.knn import knn_classify
    from sslkit.eval.report import load_context

    ctx = load_context(run_dir, baseline="pixels", progress=False)
    tr, te = ctx.features("train"), ctx.features(ctx.eval_split)
    images = torch.stack([ctx.dataset("train")[i][0] for i in range(len(tr.labels))]).float() / 255.0
    assert torch.allclose(tr.features, images[:, : tr.features.shape[1] // images[0, 0].numel()].flatten(1), atol=1e-5)
    for center, key in ((True, "top1"), (False, "top1_uncentred")):
        want = knn_classify(tr.features, tr.labels, te.features, te.labels, k=10, center=center)["top1"]
        assert pix["metrics"]["10"][key] == pytest.approx(want)
    assert pix["settings"]["center"] is True
    assert rnd["metrics"]["10"]["top1_uncentred"] >= 0
    assert rnd["features"]["encoder_hash"] != pix["features"]["encoder_hash"]
    copy = run_copy_detection(run_dir, num_queries=8, progress=False)
    assert copy["metrics"]["num_queries"] == 8 and 0 <= copy["metrics"]["map"] <= 100
    assert "plain" not in copy["metrics"] and copy["settings"]["whiten"] is None
    white = run_copy_detection(run_dir, num_queries=8, whiten=4, plots=False, progress=False)
    assert white["settings"]["whiten"] == 4 and white["metrics"]["plain"]["map"] == pytest.approx(copy["metrics"]["map"])
    with pytest.raises(EvalError, match="whiten"):
        run_copy_detection(run_dir, num_queries=8, whiten=-2, progress=False)


def test_cli_commands(run_dir, capsys):
    assert cli.main(["knn", str(run_dir), "--k", "5", "--no-plots", "--no-progress", "--baseline", "all"]) == 0
    out = capsys.readouterr().out
    assert "encoder" in out and "pixels" in out and "random" in out and "results:" in out
    assert cli.main(["retrieval", str(run_dir), "--index", "IVF4,Flat", "--nprobe", "4", "--no-plots",
                     "--no-progress", "--test-subset", "16"]) == 0
    assert "map@r" in capsys.readouterr().out
    assert cli.main(["linear", str(run_dir), "--paper", "--epochs", "1", "--no-progress", "--batch-size", "32"]) == 0
    data = json.loads((run_dir / "eval" / "linear" / "results.json").read_text())
    assert data["settings"]["path"] == "augmented images" and "top1" in data["metrics"]


def test_cli_errors(run_dir, tmp_path, capsys):
    assert cli.main(["knn", str(tmp_path / "missing"), "--no-progress"]) == cli.EXIT_USAGE
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["retrieval", str(run_dir), "--index", "IVF999,Flat", "--no-plots", "--no-progress"]) == 2
    assert "nlist" in capsys.readouterr().err
    with pytest.raises(RunError):
        run_knn(tmp_path / "missing")


def test_add_subcommands_into_a_parent_parser():
    parser = argparse.ArgumentParser(prog="sslkit")
    evals = parser.add_subparsers(dest="cmd").add_parser("eval").add_subparsers(dest="kind")
    cli.add_subcommands(evals)
    args = parser.parse_args(["eval", "copy", "runs/x", "--num-queries", "5", "--baseline", "pixels"])
    assert args.func is cli.cmd_copy and args.num_queries == 5 and args.baseline == "pixels"


def test_eval_encoder_args_change_the_features_not_the_weights(tmp_path):
    """eval.encoder_args (here resnet_cifar's pool_grid) rebuild the trained weights with other pooling: the
    features are the trained map pooled that way, and the feature cache keeps the two apart."""
    import torch.nn.functional as F

    from sslkit.run import as_eval_encoder, load_encoder

    raw = {"name": "cnn", "data": {"name": "synthetic", "args": {"num_samples": 32, "image_size": 32}},
           "augment": {"name": "simclr", "image_size": 16},
           "encoder": {"name": "resnet_cifar", "widths": [8, 16], "depths": [1, 1], "pool_grid": 1}}
    cfg = resolve(raw)
    torch.manual_seed(0)
    trained = build_encoder(cfg).eval()
    runs = {}
    for name, args in (("plain", {}), ("grid", {"pool_grid": 4})):
        run = tmp_path / name
        run.mkdir()
        c = resolve({**raw, "eval": {"encoder_args": args}})
        save_encoder(trained, run / "encoder.safetensors")
        OmegaConf.save(c, run / "config.yaml")
        runs[name] = (run, c)
    grid_enc, grid_cfg = load_encoder(runs["grid"][0])
    assert grid_enc.dim == 16 * 16 and trained.dim == 16
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        want = F.adaptive_avg_pool2d(trained.model.forward_features(x), 4).flatten(1)
        torch.testing.assert_close(grid_enc(x), want)
        torch.testing.assert_close(as_eval_encoder(grid_cfg, trained).eval()(x), want)
    assert as_eval_encoder(runs["plain"][1], trained) is trained
    a = run_knn(runs["plain"][0], k=5, progress=False, plots=False)
    b = run_knn(runs["grid"][0], k=5, progress=False, plots=False)
    assert a["features"]["encoder_hash"] != b["features"]["encoder_hash"]
    assert b["features"]["splits"]["train"]["dim"] == 256


def _copy_run(run_dir, dest, **eval_overrides):
    """A copy of ``run_dir`` (weights and config) with ``eval.<key>`` overrides in its recipe."""
    dest.mkdir()
    (dest / "encoder.safetensors").write_bytes((run_dir / "encoder.safetensors").read_bytes())
    cfg = OmegaConf.load(run_dir / "config.yaml")
    for key, value in eval_overrides.items():
        cfg.eval[key] = value
    OmegaConf.save(cfg, dest / "config.yaml")
    return dest


def test_knn_whitening_from_the_cli_and_from_the_recipe(run_dir, tmp_path, capsys):
    """The main top1 / top5 are always the standard protocol (centred; uncentred with --no-center). `--whiten D`
    and a recipe's eval.knn_whiten only ADD top1_whitened / top5_whitened = knn_classify(whiten=D) beside them;
    `--whiten 0` adds none. A whitened figure must never become top1 again."""
    from sslkit.eval.knn import knn_classify
    from sslkit.eval.report import load_context

    ctx = load_context(run_dir, progress=False)
    tr, te = ctx.features("train"), ctx.features(ctx.eval_split)
    ref = {name: knn_classify(tr.features, tr.labels, te.features, te.labels, k=5, **kw)
           for name, kw in (("centred", {"center": True}), ("uncentred", {"center": False}),
                            ("whitened", {"center": True, "whiten": 8}))}
    # The three protocols give three different figures here, so the checks below can tell them apart.
    assert len({r["top1"] for r in ref.values()}) == 3

    def check_standard(m, whitened: bool) -> None:
        assert m["top1"] == pytest.approx(ref["centred"]["top1"]) and m["top5"] == pytest.approx(ref["centred"]["top5"])
        assert m["top1"] != pytest.approx(ref["whitened"]["top1"])  # not the whitened figure as headline
        assert m["top1_centred"] == pytest.approx(ref["centred"]["top1"])
        assert m["top1_uncentred"] == pytest.approx(ref["uncentred"]["top1"])
        assert m["top5_uncentred"] == pytest.approx(ref["uncentred"]["top5"])
        if whitened:
            assert m["top1_whitened"] == pytest.approx(ref["whitened"]["top1"])
            assert m["top5_whitened"] == pytest.approx(ref["whitened"]["top5"])
        else:
            assert "top1_whitened" not in m and "top5_whitened" not in m

    assert cli.main(["knn", str(run_dir), "--k", "5", "--whiten", "8", "--no-plots", "--no-progress"]) == 0
    out = capsys.readouterr().out
    data = json.loads((run_dir / "eval" / "knn" / "results.json").read_text())
    check_standard(data["metrics"]["5"], whitened=True)
    assert data["settings"]["whitened_also"] == 8 and data["settings"]["center"] is True
    assert "whiten" not in data["settings"]  # the old key named the main figures' protocol
    assert "5/top1_whitened" in out and "PCA-whitened to 8" in out and "centred on the bank mean" in out
    row = (run_dir / "eval" / "report.md").read_text().splitlines()[-1]
    assert f"k=5: {ref['centred']['top1']:.2f} / {ref['centred']['top5']:.2f}" in row
    assert f"PCA-whitened (8 dims) {ref['whitened']['top1']:.2f}" in row and "centred on the bank mean" in row
    assert f"uncentred {ref['uncentred']['top1']:.2f}" in row
    assert cli.main(["knn", str(run_dir), "--whiten", "-1", "--no-progress"]) == cli.EXIT_USAGE
    assert "--whiten" in capsys.readouterr().err
    assert cli.main(["copy", str(run_dir), "--num-queries", "8", "--whiten", "-1", "--no-progress"]) == cli.EXIT_USAGE
    assert "--whiten" in capsys.readouterr().err
    assert cli.main(["copy", str(run_dir), "--num-queries", "8", "--whiten", "4", "--no-plots", "--no-progress"]) == 0
    assert "plain/map" in capsys.readouterr().out

    # The recipe's eval.knn_whiten adds the whitened figure by default, as training's final k-NN does.
    whitened = _copy_run(run_dir, tmp_path / "whitened-run", knn_whiten=8)
    by_recipe = run_knn(whitened, k=5, plots=False, progress=False)
    check_standard(by_recipe["metrics"]["5"], whitened=True)
    assert by_recipe["settings"]["whitened_also"] == 8
    off = run_knn(whitened, k=5, whiten=0, plots=False, progress=False)
    check_standard(off["metrics"]["5"], whitened=False)
    assert off["settings"]["whitened_also"] is None
    assert cli.main(["knn", str(whitened), "--k", "5", "--whiten", "0", "--no-plots", "--no-progress"]) == 0
    check_standard(json.loads((whitened / "eval" / "knn" / "results.json").read_text())["metrics"]["5"], False)
    assert "_whitened" not in capsys.readouterr().out

    # --no-center: DINO's exact protocol is the main figure; the recipe's whitened one still stands beside it.
    assert cli.main(["knn", str(whitened), "--k", "5", "--no-center", "--no-plots", "--no-progress"]) == 0
    dino = json.loads((whitened / "eval" / "knn" / "results.json").read_text())
    m = dino["metrics"]["5"]
    assert dino["settings"]["center"] is False and dino["settings"]["whitened_also"] == 8
    assert m["top1"] == pytest.approx(ref["uncentred"]["top1"]) and m["top5"] == pytest.approx(ref["uncentred"]["top5"])
    assert m["top1_whitened"] == pytest.approx(ref["whitened"]["top1"])
    assert "top1_centred" not in m and "top1_uncentred" not in m
    assert "uncentred (DINO's exact protocol)" in capsys.readouterr().out


def test_knn_headline_matches_the_training_runs_final_knn(run_dir, tmp_path):
    """`sslkit eval knn` and the training run's final k-NN (sslkit.engine.monitor) report the same figures under
    the same keys, for a recipe that whitens: both follow sslkit.eval.knn.headline_protocols."""
    from sslkit.eval.knn import headline_protocols
    from sslkit.eval.report import load_context

    whitened = _copy_run(run_dir, tmp_path / "whitened-run", knn_whiten=8)
    ctx = load_context(whitened, progress=False)
    tr, te = ctx.features("train"), ctx.features(ctx.eval_split)
    res = run_knn(whitened, k=[5, 20], plots=False, progress=False)
    for k in (5, 20):
        want = headline_protocols(tr.features, tr.labels, te.features, te.labels, k=k, whiten=8)
        got = res["metrics"][str(k)]
        assert set(want) <= set(got) and set(got) - set(want) == {"top1_centred", "top5_centred"}
        assert all(got[key] == pytest.approx(v) for key, v in want.items())
        assert got["top1_centred"] == got["top1"] and got["top5_centred"] == got["top5"]
