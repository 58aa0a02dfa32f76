"""Training health (RankMe, DINO's teacher entropy, the collapse alarm) and the online linear probe."""

import csv
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import sslkit.engine.loop as loop
from sslkit.config import resolve
from sslkit.engine import build_objective, load_checkpoint, train
from sslkit.engine.health import TrainingCollapsed, rankme
from sslkit.engine.probe import LinearProbe
from sslkit.eval.features import extract_features
from sslkit.eval.linear import linear_probe, topk_accuracy
from sslkit.run import build_dataset


def _rows(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return list(csv.DictReader(f))


def _column(run_dir, key):
    return [(int(r["step"]), float(r[key])) for r in _rows(run_dir) if r.get(key)]


def _rankme_numpy(x):
    s = np.linalg.svd(np.asarray(x, dtype=np.float64), compute_uv=False)
    p = s / s.sum() + 1e-7
    return float(np.exp(-(p * np.log(p)).sum()))


@pytest.mark.parametrize("shape, rank", [((64, 32), None), ((16, 100), None), ((128, 64), 5), ((40, 40), 1)])
def test_rankme_matches_numpy(shape, rank):
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(*shape, generator=g)
    if rank is not None:  # a low-rank matrix: (N, r) @ (r, D)
        x = torch.randn(shape[0], rank, generator=g) @ torch.randn(rank, shape[1], generator=g)
    assert rankme(x) == pytest.approx(_rankme_numpy(x.numpy()), rel=1e-9)
    assert rankme(x.float()) == pytest.approx(_rankme_numpy(x.numpy()), rel=1e-5)


def test_rankme_bounds_by_hand():
    # n equal singular values: p_k = 1/n + eps, so the effective rank is n (up to eps); one direction: 1.
    assert rankme(torch.eye(8)) == pytest.approx(8.0, rel=1e-5)
    assert rankme(torch.ones(32, 16)) == pytest.approx(1.0, abs=1e-4)


def _dino(tiny_recipe, name, **objective):
    raw = tiny_recipe(name=name, augment={"name": "multicrop", "image_size": 32, "local_size": 16, "num_local": 2,
                                          "preset": "small"},
                      trainer={"max_steps": 8, "health": {"every_steps": 2, "patience": 3}})
    raw["objective"] = {"name": "dino", "out_dim": 256, "head_hidden_dim": 64, "head_bottleneck_dim": 32,
                        "freeze_last_layer": 0, "warmup_teacher_temp_epochs": 0, **objective}
    return raw


def test_alarm_fires_once_on_uniform_collapse(tiny_recipe, capsys):
    # A teacher temperature of 20 flattens the teacher's softmax over its 256 prototypes from the first step (the
    # logits are cosines, so within [-1, 1] / 20): uniform collapse. Checks every 2 steps, patience 3: the alarm
    # must come at step 6 exactly, once, in the terminal and in train.log.
    run = train(resolve(_dino(tiny_recipe, "hot", teacher_temp=20.0, warmup_teacher_temp=20.0))).run_dir
    log = (run / "train.log").read_text()
    assert log.count("training looks collapsed") == 1
    assert "training looks collapsed at step 6 (" in log and "uniform collapse" in log
    assert "teacher temperature" in log and "learning rate" in log and "batch" in log
    assert capsys.readouterr().err.count("training looks collapsed at step 6") == 1
    shares = _column(run, "teacher_entropy_share")
    assert [s for s, _ in shares] == [2, 4, 6, 8] and all(v > 0.995 for _, v in shares)


def test_alarm_stop_checkpoints_and_ends_the_run(tiny_recipe):
    cfg = resolve(_dino(tiny_recipe, "hot", teacher_temp=20.0, warmup_teacher_temp=20.0),
                  ["trainer.health.on_collapse=stop", "trainer.checkpoint_every_steps=100"])
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(TrainingCollapsed, match=r"collapsed at step 6 .*on_collapse=stop after step 6"):
        train(cfg)
    run = Path(cfg.output_dir) / "hot"
    ckpt = load_checkpoint(run / "checkpoints" / "last.ckpt")
    assert ckpt["step"] == 6 and ckpt["health"]["warned"]
    assert not (run / "encoder.safetensors").exists()  # a collapsed run exports nothing
    assert [s for s, _ in _column(run, "loss")][-1] == 6  # the log is flushed up to the stop
    assert signal.getsignal(signal.SIGINT) is handler  # the run gave its signal handlers back


def test_alarm_fires_on_a_constant_encoder(tiny_recipe, monkeypatch):
    # Complete collapse: a forward hook makes the encoder's output the same vector for every image (and cuts its
    # gradients), so RankMe is 1 and rankme_share 0. Alarm at the 3rd check (step 3 with a check every step).
    build = loop.build_objective

    def constant_encoder(cfg):
        obj = build(cfg)
        obj.encoder.register_forward_hook(lambda m, i, o: o * 0 + 1)
        return obj

    monkeypatch.setattr(loop, "build_objective", constant_encoder)
    run = train(resolve(tiny_recipe(name="const", trainer={"max_steps": 5, "health": {"every_steps": 1}}))).run_dir
    log = (run / "train.log").read_text()
    assert log.count("training looks collapsed") == 1 and "collapsed at step 3 (" in log and "RankMe" in log
    assert all(v == pytest.approx(1.0, abs=1e-4) for _, v in _column(run, "rankme"))


def test_the_same_dino_with_a_sane_temperature_stays_silent(tiny_recipe, capsys):
    # The control of the collapse test: the same run with DINO's teacher temperature 0.04 gives no alarm.
    run = train(resolve(_dino(tiny_recipe, "sane", teacher_temp=0.04, warmup_teacher_temp=0.04))).run_dir
    assert "collapsed" not in (run / "train.log").read_text() and "collapsed" not in capsys.readouterr().err
    assert [s for s, _ in _column(run, "rankme")] == [2, 4, 6, 8]
    assert len(_column(run, "teacher_entropy_share")) == 4 and len(_column(run, "center_norm")) == 4


@pytest.mark.slow
def test_healthy_dino_recipe_stays_silent(tmp_path, capsys):
    # The CPU DINO recipe as shipped (narrow ResNet, BatchNorm head, teacher temperature 0.04, its multi-crop), on a
    # small synthetic dataset for 20 steps with a check every 4: no alarm.
    raw = yaml.safe_load(open("recipes/dino_resnet_fmnist.yaml"))
    raw["output_dir"] = str(tmp_path)
    raw["data"] = {"name": "synthetic", "args": {"num_samples": 128, "image_size": 28}, "batch_size": 16,
                   "num_workers": 0}
    cfg = resolve(raw, ["trainer.time_budget_minutes=null", "trainer.max_steps=20", "trainer.health.every_steps=4",
                        "eval.final_knn=false", "trainer.progress=false", "trainer.log_every_steps=4"])
    run = train(cfg).run_dir
    assert "collapsed" not in (run / "train.log").read_text() and "collapsed" not in capsys.readouterr().err
    assert [s for s, _ in _column(run, "rankme")] == [4, 8, 12, 16, 20]
    assert len(_column(run, "teacher_entropy_share")) == 5 and len(_column(run, "center_norm")) == 5


def _clusters(n, seed):
    """Overlapping Gaussian classes in 24-d, badly scaled (so the probe's standardisation matters)."""
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(5, 24, generator=torch.Generator().manual_seed(0)) * 0.4
    y = torch.randint(0, 5, (n,), generator=g)
    x = (means[y] + torch.randn(n, 24, generator=g)) * torch.linspace(0.1, 30, 24) + 7
    return x, y


@pytest.fixture
def one_thread():
    """Tiny matrices gain nothing from threads, and lose a lot to them on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_online_probe_matches_an_offline_probe_on_frozen_features(one_thread):
    # The online probe sees the features one batch at a time (128, shuffled, 10 passes, its default lr), as during
    # training. References on the same features: sklearn's logistic regression on standardised features (converged)
    # and sslkit.eval.linear (standardised, lr and weight decay chosen on a validation split). Tolerance: 1.5 points
    # of test top-1 against each, and >= 95% of the test predictions the same as the logistic regression's.
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    xtr, ytr = _clusters(4000, 1)
    xte, yte = _clusters(2000, 2)
    torch.manual_seed(0)
    probe = LinearProbe(24, 5, lr=resolve({}).eval.online_probe_lr)
    for _ in range(10):
        for idx in torch.randperm(len(ytr)).split(128):
            probe.update(xtr[idx], ytr[idx])
    logits = probe.logits(xte)
    online, _ = topk_accuracy(logits, yte)
    scaler = StandardScaler().fit(xtr.numpy())
    logreg = LogisticRegression(max_iter=2000).fit(scaler.transform(xtr.numpy()), ytr.numpy())
    ref_pred = logreg.predict(scaler.transform(xte.numpy()))
    reference = 100 * float((ref_pred == yte.numpy()).mean())
    offline = linear_probe(xtr, ytr, xte, yte, lrs=(0.01, 0.1), weight_decays=(0.0,), batchnorm=True, num_classes=5,
                           device="cpu")
    assert 60 < reference < 95  # neither trivial nor hopeless, so agreement means something
    assert online == pytest.approx(reference, abs=1.5) and online == pytest.approx(offline["top1"], abs=1.5)
    assert (logits.argmax(1).numpy() == ref_pred).mean() >= 0.95


def test_probe_resume_is_bit_exact_and_training_is_unchanged(tiny_recipe):
    probe = {"online_probe": True, "online_probe_lr": 1e-2}
    health = {"health": {"every_steps": 1}}
    off = train(resolve(tiny_recipe(name="off", trainer={"health": {"every_steps": 0}}))).run_dir
    full = train(resolve(tiny_recipe(name="full", eval=probe, trainer=health))).run_dir
    part = train(resolve(tiny_recipe(name="split", eval=probe, trainer=health)), stop_at_step=5)
    resumed = train(resolve(tiny_recipe(name="split", eval=probe, trainer=health)), resume=part.run_dir).run_dir
    ca, cb, c0 = (load_checkpoint(r / "checkpoints" / "last.ckpt") for r in (full, resumed, off))
    for k, v in ca["objective"].items():
        assert torch.equal(v, cb["objective"][k]), k
        assert torch.equal(v, c0["objective"][k]), k  # the probe and the health checks leave training alone
    for part_name in ("head", "optimizer"):
        a, b = ca["online_probe"][part_name], cb["online_probe"][part_name]
        for k in a if part_name == "head" else a["state"]:
            x, y = (a[k], b[k]) if part_name == "head" else (a["state"][k], b["state"][k])
            for t, u in ([(x, y)] if torch.is_tensor(x) else zip(x.values(), y.values(), strict=True)):
                assert torch.equal(torch.as_tensor(t), torch.as_tensor(u)), (part_name, k)
    for key in ("loss", "probe_loss", "probe_train_top1", "rankme", "probe_top1"):
        assert _column(full, key) == _column(resumed, key), key
    # Scored after epoch 1 (every epoch: no k-NN monitor) and at the end; the last figure, recomputed from the
    # checkpoint's probe on the test split's features at the 32-px view size, is the logged one.
    scores = _column(full, "probe_top1")
    assert [s for s, _ in scores] == [4, 8]
    cfg = resolve(tiny_recipe(name="full", eval=probe, trainer=health))
    obj = build_objective(cfg)
    obj.load_state_dict(ca["objective"])
    feats, labels = extract_features(obj.eval_encoder(), build_dataset(cfg, "test"), image_size=32, progress=False)
    head = LinearProbe(feats.shape[1], 10, lr=1.0)
    head.load_state_dict(ca["online_probe"])
    assert scores[-1][1] == pytest.approx(topk_accuracy(head.logits(feats), labels)[0], abs=1e-9)


@pytest.mark.ddp
@pytest.mark.slow
def test_probe_and_health_under_two_gloo_processes(tiny_recipe):
    # Every rank takes the probe's and the alarm's collective steps together (a rank that skipped one would hang the
    # run); the probe's gradients are averaged, and rank 0 logs and checkpoints it.
    cfg = resolve(tiny_recipe(name="ddp", eval={"online_probe": True},
                              trainer={"epochs": 2, "accelerator": "cpu", "devices": 2, "strategy": "ddp_spawn",
                                       "health": {"every_steps": 1}}))
    result = train(cfg)
    assert result.steps == 4
    assert [s for s, _ in _column(result.run_dir, "rankme")] == [1, 2, 3, 4]
    assert len(_column(result.run_dir, "probe_loss")) == 4 and len(_column(result.run_dir, "probe_top1")) == 2
    assert "online_probe" in load_checkpoint(result.run_dir / "checkpoints" / "last.ckpt")
