"""Untrusted input and concurrency: concurrent runs of one name, names that are paths, run directories that leak or
redirect, and signals that must leave a resumable checkpoint."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from sslkit.cli import main
from sslkit.engine import load_checkpoint

CNN = {"name": "resnet_cifar", "widths": [8, 16], "depths": [1, 1]}


def _cnn(tiny_recipe, **sections) -> dict:
    """The tiny recipe with a tiny CNN (the fastest encoder) instead of its ViT."""
    raw = tiny_recipe(**sections)
    raw["encoder"] = dict(CNN)
    return raw


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _write(tmp_path: Path, raw: dict, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(raw))
    return path


def test_concurrent_runs_of_one_name_get_their_own_directories(tmp_path, tiny_recipe):
    raw = _cnn(tiny_recipe, trainer={"epochs": 1, "progress": False})
    path = _write(tmp_path, raw)
    procs = [subprocess.Popen([sys.executable, "-m", "sslkit.cli", "pretrain", str(path)], env=_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-1000:] for o in outs]
    runs = sorted(d.name for d in (tmp_path / "runs").iterdir() if d.is_dir() and not d.is_symlink())
    assert runs == ["tiny", "tiny-2", "tiny-3", "tiny-4"]
    printed = sorted(line.split()[2] for out, _ in outs for line in out.splitlines() if line.startswith("run directory"))
    assert printed == sorted(str(tmp_path / "runs" / r) for r in runs), "each run reports its own directory"
    for r in runs:
        d = tmp_path / "runs" / r
        summary = json.loads((d / "summary.json").read_text())
        assert summary["finished"] and summary["steps"] == 4
        assert (d / "encoder.safetensors").is_file() and load_checkpoint(d / "checkpoints" / "last.ckpt")["step"] == 4
    assert (tmp_path / "runs" / "tiny-latest").is_symlink()


@pytest.mark.parametrize("name", ["../escape", "/tmp/abs", "a/b", "..", ".hidden", ""])
def test_a_name_that_is_a_path_is_refused_before_anything_is_written(tmp_path, tiny_recipe, capsys, name):
    raw = tiny_recipe(name=name)
    raw["output_dir"] = str(tmp_path / "out" / "runs")
    assert main(["pretrain", str(_write(tmp_path, raw))]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sslkit: error: recipe key 'name'") and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists() and not Path("/tmp/abs").exists()


def test_latest_link_never_replaces_a_file_that_is_not_a_link(tmp_path, tiny_recipe):
    from sslkit.config import resolve
    from sslkit.engine import train

    (tmp_path / "runs").mkdir()
    mine = tmp_path / "runs" / "tiny-latest"
    mine.write_text("a user's file")
    train(resolve(_cnn(tiny_recipe, trainer={"epochs": 1})))
    assert mine.read_text() == "a user's file"


def _fake_run(tmp_path: Path, tiny_recipe, config_text: str) -> Path:
    from sslkit.config import resolve
    from sslkit.engine import train

    run = train(resolve(_cnn(tiny_recipe, trainer={"epochs": 1}))).run_dir
    (run / "config.yaml").write_text(config_text + (run / "config.yaml").read_text().split("\n", 1)[1])
    return run


def test_an_interpolation_in_a_run_directory_leaks_nothing(tmp_path, tiny_recipe, capsys, monkeypatch):
    monkeypatch.setenv("SSLKIT_TEST_SECRET", "hunter2-secret")
    run = _fake_run(tmp_path, tiny_recipe, "name: ${oc.env:SSLKIT_TEST_SECRET}\n")
    for argv in (["eval", "knn", str(run), "--no-progress", "--no-plots"], ["pretrain", "--resume", str(run)]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "holds an interpolation" in err and "hunter2" not in err
    leaked = [p for p in tmp_path.rglob("*") if p.is_file() and b"hunter2" in p.read_bytes()]
    assert leaked == []


def test_results_are_never_written_through_a_planted_link(tmp_path, tiny_recipe):
    from sslkit.config import resolve
    from sslkit.engine import train

    cfg = resolve(_cnn(tiny_recipe, trainer={"epochs": 2}))
    part = train(cfg, stop_at_step=3).run_dir
    outside = tmp_path / "outside"
    outside.mkdir()
    for name in ("summary.json", "metrics.csv", "config.yaml"):
        (outside / name).write_text("precious")
        (part / name).unlink(missing_ok=True)
        (part / name).symlink_to(outside / name)
    (outside / "train.log").write_text("precious")
    (part / "train.log").unlink()
    (part / "train.log").symlink_to(outside / "train.log")
    from sslkit.run import RunError

    with pytest.raises(RunError, match="refusing to write through the symbolic link"):
        train(cfg, resume=part)  # appending to train.log would follow the link: refused
    (part / "train.log").unlink()
    train(cfg, resume=part)
    assert all((outside / n).read_text() == "precious" for n in ("summary.json", "metrics.csv", "config.yaml",
                                                                 "train.log"))
    assert json.loads((part / "summary.json").read_text())["finished"]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_mid_epoch_checkpoints_the_last_step_and_resumes_bit_exact(tmp_path, tiny_recipe, sig):
    raw = _cnn(tiny_recipe, data={"args": {"num_samples": 480, "image_size": 32}},
                      trainer={"epochs": 2, "progress": True, "progress_every_seconds": 0,
                               "checkpoint_every_steps": 0})
    ref = subprocess.run([sys.executable, "-m", "sslkit.cli", "pretrain", str(_write(tmp_path, {**raw, "name": "ref"},
                                                                                        "ref.yaml"))],
                         env=_env(), capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-2000:]

    # SIGINT goes to the whole process group, as a terminal's Ctrl-C does, loader worker included.
    victim = {**raw, "name": "victim"}
    if sig == signal.SIGINT:
        victim["data"] = {**raw["data"], "num_workers": 1}
    path = _write(tmp_path, victim, "victim.yaml")
    run = tmp_path / "runs" / "victim"
    proc = subprocess.Popen([sys.executable, "-m", "sslkit.cli", "pretrain", str(path)], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline:  # wait until step 5 of 30 (epoch 0 has 30 steps: no epoch-end checkpoint yet)
        log = run / "train.log"
        if log.is_file() and "step 5/" in log.read_text():
            break
        time.sleep(0.02)
    t_signal = time.time()
    os.killpg(proc.pid, sig)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + sig, err[-2000:]
    assert f"{signal.Signals(sig).name} received: stopped after step" in err and "--resume" in err
    ckpt = load_checkpoint(run / "checkpoints" / "last.ckpt")
    stopped = int(err.split("stopped after step ")[1].split()[0])
    assert ckpt["step"] == stopped and 5 <= stopped < 30 and ckpt["batch_in_epoch"] == stopped
    print(f"signal to exit: {time.time() - t_signal:.2f} s")

    resumed = subprocess.run([sys.executable, "-m", "sslkit.cli", "pretrain", "--resume", str(run), "data.num_workers=0"],
                             env=_env(),
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = load_file(tmp_path / "runs" / "ref" / "encoder.safetensors"), load_file(run / "encoder.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    full_a = load_checkpoint(tmp_path / "runs" / "ref" / "checkpoints" / "last.ckpt")["objective"]
    full_b = load_checkpoint(run / "checkpoints" / "last.ckpt")["objective"]
    assert all(torch.equal(full_a[k], full_b[k]) for k in full_a)


BOMB = "a: &a [x, x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\n" \
       "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]\n" \
       "e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]\n"


@pytest.mark.parametrize(("case", "message"), [
    ("nan_lr", "recipe key 'optim.lr': nan is not a finite number"),
    ("inf_wd", "recipe key 'optim.weight_decay': inf is not a finite number"),
    ("empty", "is empty"),
    ("bomb", "expands to more than"),
    ("unwritable", "cannot be written"),
    ("batch_too_large", "is more than the 64 training images"),
])
def test_bad_input_is_one_error_line_before_any_work(tmp_path, tiny_recipe, capsys, case, message):
    raw = _cnn(tiny_recipe)
    raw["output_dir"] = str(tmp_path / "out" / "runs")
    path = tmp_path / "r.yaml"
    if case == "nan_lr":
        raw["optim"]["lr"] = float("nan")
    elif case == "inf_wd":
        raw["optim"]["weight_decay"] = float("inf")
    elif case == "unwritable":
        blocker = tmp_path / "out"
        blocker.write_text("a file where a folder should be")
    elif case == "batch_too_large":
        raw["data"]["batch_size"] = 128
    path.write_text({"empty": "", "bomb": BOMB}[case] if case in ("empty", "bomb") else yaml.safe_dump(raw))
    assert main(["pretrain", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("sslkit: error: ") and err.count("\n") == 1 and message in err, err
    assert "Traceback" not in err
    assert not (tmp_path / "out").is_dir(), "nothing is written"
