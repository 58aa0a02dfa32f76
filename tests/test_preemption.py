"""Preemption and requeue: SLURM's warning signal (SIGUSR1) checkpoints the last finished step and requeues the job;
``--resume auto`` picks the newest good checkpoint of the recipe's name (or starts fresh), so the requeued job
continues bit-exact with the same command."""

import json
import os
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from omegaconf import OmegaConf
from safetensors.torch import load_file

from sslkit.cli import main
from sslkit.config import resolve
from sslkit.engine import load_checkpoint
from sslkit.engine.checkpoint import write_checkpoint
from sslkit.engine.rundir import RunLock, auto_resume, find_resumable, finished_summary, lock_run_dir
from sslkit.engine.signals import SignalCheckpoint, TrainingInterrupted, requeue_job
from sslkit.run import RunError

CNN = {"name": "resnet_cifar", "widths": [8, 16], "depths": [1, 1]}
JOB = "4242"


def _env(**extra: str) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def _fake_scontrol(tmp_path: Path, exit_code: int = 0) -> tuple[Path, Path]:
    """A ``scontrol`` that appends its arguments to a file (and fails with ``exit_code`` when not 0)."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "scontrol_calls.txt"
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / "scontrol"
    script.write_text(f'#!/bin/sh\necho "$@" >> "{calls}"\necho "scontrol: error: Requested operation is presently '
                      f'disabled" >&2\nexit {exit_code}\n' if exit_code else
                      f'#!/bin/sh\necho "$@" >> "{calls}"\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return bin_dir, calls


def _wait_for(path: Path, text: str, proc: subprocess.Popen, timeout: float = 300) -> float:
    """Poll ``path`` until it holds ``text``; returns the time it appeared."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.is_file() and text in path.read_text():
            return time.time()
        if proc.poll() is not None:
            raise AssertionError(f"the process ended ({proc.returncode}) before {text!r} appeared in {path}")
        time.sleep(0.01)
    raise AssertionError(f"{text!r} did not appear in {path} within {timeout} s")


@pytest.mark.slow  # three processes: about 30 s on 2 idle cores
def test_sigusr1_mid_epoch_checkpoints_requeues_and_auto_resume_continues_bit_exact(tmp_path, tiny_recipe):
    raw = tiny_recipe(data={"args": {"num_samples": 480, "image_size": 32}},
                      trainer={"epochs": 1, "progress": True, "progress_every_seconds": 0, "checkpoint_every_steps": 0})
    raw["encoder"] = dict(CNN)
    ref_path, victim_path = tmp_path / "ref.yaml", tmp_path / "victim.yaml"
    ref_path.write_text(yaml.safe_dump({**raw, "name": "ref"}))
    # SLURM signals every process of the job step: the loader worker gets SIGUSR1 too and must survive it
    victim_path.write_text(yaml.safe_dump({**raw, "name": "victim", "data": {**raw["data"], "num_workers": 1}}))
    ref = subprocess.run([sys.executable, "-m", "sslkit.cli", "pretrain", str(ref_path)], env=_env(),
                         capture_output=True, text=True, timeout=600)
    assert ref.returncode == 0, ref.stderr[-2000:]

    bin_dir, calls = _fake_scontrol(tmp_path)
    slurm = _env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", SLURM_JOB_ID=JOB)
    command = [sys.executable, "-m", "sslkit.cli", "pretrain", str(victim_path), "--resume", "auto"]
    run, log = tmp_path / "runs" / "victim", tmp_path / "runs" / "victim" / "train.log"
    proc = subprocess.Popen(command, env=slurm, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    _wait_for(log, "step 5/", proc)  # the epoch has 30 steps and no periodic checkpoint: none exists yet
    assert not (run / "checkpoints" / "last.ckpt").exists()
    t_signal = time.time()
    os.killpg(proc.pid, signal.SIGUSR1)
    out, err = proc.communicate(timeout=300)
    t_exit = time.time()
    assert proc.returncode == 128 + signal.SIGUSR1, err[-2000:]
    assert "starting" in out and "no checkpoint of 'victim'" in out
    assert "SIGUSR1 received: stopped after step" in err and f"requeued SLURM job {JOB}" in err, err[-2000:]
    assert calls.read_text() == f"requeue {JOB}\n", "rank 0 requeued the job once, with its id"
    ckpt_path = run / "checkpoints" / "last.ckpt"
    ckpt = load_checkpoint(ckpt_path)
    stopped = int(err.split("stopped after step ")[1].split()[0])
    assert ckpt["step"] == stopped and 5 <= stopped < 30 and ckpt["batch_in_epoch"] == stopped and ckpt["epoch"] == 0
    logged = [int(line.split()[1].split("/")[0]) for line in log.read_text().splitlines() if line.startswith("step ")]
    assert max(logged) == stopped, "the checkpoint is at the last step that finished"
    t_ckpt = ckpt_path.stat().st_mtime

    # The requeued job runs the same command (with fewer loader workers, which may change)
    t_restart = time.time()
    proc = subprocess.Popen([*command, "data.num_workers=0"], env=slurm, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    t_first = _wait_for(log, f"step {stopped + 1}/", proc)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    assert f"found {run} at step {stopped}" in out
    assert calls.read_text() == f"requeue {JOB}\n", "a run that finishes does not requeue"
    a, b = load_file(tmp_path / "runs" / "ref" / "encoder.safetensors"), load_file(run / "encoder.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    full_a = load_checkpoint(tmp_path / "runs" / "ref" / "checkpoints" / "last.ckpt")["objective"]
    full_b = load_checkpoint(ckpt_path)["objective"]
    assert all(torch.equal(full_a[k], full_b[k]) for k in full_a)
    ref_loss = json.loads((tmp_path / "runs" / "ref" / "summary.json").read_text())["final_loss"]
    assert json.loads((run / "summary.json").read_text())["final_loss"] == ref_loss
    assert sorted(d.name for d in (tmp_path / "runs").iterdir() if not d.is_symlink()) == ["ref", "victim"]
    timings = {"signal_to_checkpoint_s": round(t_ckpt - t_signal, 3), "signal_to_exit_s": round(t_exit - t_signal, 3),
               "restart_to_first_step_s": round(t_first - t_restart, 3), "stopped_at_step": stopped}
    print("requeue timings:", json.dumps(timings))


def test_sigusr1_in_process_checkpoints_requeues_and_auto_resume_is_bit_exact(tmp_path, tiny_recipe, monkeypatch):
    """The same story in one process (fast): the signal arrives in the middle of step 3 of 8, between the backward
    pass and the optimiser step."""
    from sslkit.engine import loop, train

    bin_dir, calls = _fake_scontrol(tmp_path)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", JOB)
    raw = tiny_recipe(data={"args": {"num_samples": 128, "image_size": 32}},
                      trainer={"epochs": 1, "checkpoint_every_steps": 0})
    raw["encoder"] = dict(CNN)
    ref = train(resolve({**raw, "name": "ref"}))
    cfg = resolve({**raw, "name": "victim"})
    steps = []
    clip_and_norm = loop.clip_and_norm

    def signal_in_step_3(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        steps.append(len(steps) + 1)
        if len(steps) == 3:
            os.kill(os.getpid(), signal.SIGUSR1)
        return clip_and_norm(*args, **kwargs)

    monkeypatch.setattr(loop, "clip_and_norm", signal_in_step_3)
    with pytest.raises(TrainingInterrupted) as info:
        train(cfg, resume="auto")
    monkeypatch.setattr(loop, "clip_and_norm", clip_and_norm)
    assert info.value.exit_code == 138 and f"requeued SLURM job {JOB}" in str(info.value)
    assert calls.read_text() == f"requeue {JOB}\n"
    run = Path(cfg.output_dir) / "victim"
    assert "stopped after step 3 " in str(info.value) and steps == [1, 2, 3], "step 3 finished, step 4 never began"
    ckpt = load_checkpoint(run / "checkpoints" / "last.ckpt")
    assert ckpt["step"] == 3 and ckpt["batch_in_epoch"] == 3
    resumed = train(cfg, resume="auto")
    assert resumed.run_dir == run and resumed.steps == 8
    a, b = load_file(ref.run_dir / "encoder.safetensors"), load_file(resumed.run_dir / "encoder.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a) and resumed.final_loss == ref.final_loss


def _cfg(tiny_recipe, tmp_path: Path, **sections):
    raw = tiny_recipe(**sections)
    raw["encoder"] = dict(CNN)
    return resolve(raw)


def _fake_run(cfg, name: str, step: int, age_s: float, *, broken: bool = False, cfg_yaml: str | None = None) -> Path:
    """A run directory holding a checkpoint at ``step``, last written ``age_s`` seconds ago."""
    run = Path(cfg.output_dir) / name
    path = run / "checkpoints" / "last.ckpt"
    path.parent.mkdir(parents=True)
    (run / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    write_checkpoint(path, {"step": step, "epoch": 0, "batch_in_epoch": step, "world_size": 1, "objective": {},
                            "optimizer": {}, "config_yaml": cfg_yaml or OmegaConf.to_yaml(cfg)})
    if broken:
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # truncated, as by a full disk
    t = time.time() - age_s
    os.utime(path, (t, t))
    return run


def test_auto_resume_picks_the_newest_good_checkpoint(tmp_path, tiny_recipe):
    cfg = _cfg(tiny_recipe, tmp_path)
    other = OmegaConf.to_yaml(_cfg(tiny_recipe, tmp_path, seed=7))  # the same name, another recipe
    _fake_run(cfg, "tiny", 2, age_s=300)
    newest_good = _fake_run(cfg, "tiny-2", 3, age_s=200)
    _fake_run(cfg, "tiny-3", 4, age_s=100, broken=True)
    _fake_run(cfg, "tiny-4", 5, age_s=50, cfg_yaml=other)
    _fake_run(cfg, "tinyish", 9, age_s=0)  # another name sharing the prefix is never considered
    (Path(cfg.output_dir) / "tiny-5").mkdir()  # a run that has not checkpointed yet
    notes: list[str] = []
    run_dir, ckpt, lock = find_resumable(cfg, notes.append)
    try:
        assert run_dir == newest_good and ckpt["step"] == 3
        assert len(notes) == 2 and "tiny-4" in notes[0] and "differs from the run's in ['seed']" in notes[0]
        assert "tiny-3" in notes[1] and "refusing to load checkpoint" in notes[1]
        # a second job starting now skips the run the first one holds and takes the next good one
        notes.clear()
        second, ckpt2, lock2 = find_resumable(cfg, notes.append)
        assert second.name == "tiny" and ckpt2["step"] == 2
        assert [n for n in notes if "another process is training into it" in n and "tiny-2" in n]
        assert find_resumable(cfg, notes.append) is None, "both good runs are taken"
        with pytest.raises(RunError, match="is in use"):
            lock_run_dir(newest_good)
        lock2.release()
    finally:
        lock.release()
    lock_run_dir(newest_good).release()  # free again once released


def test_auto_resume_orders_by_checkpoint_time_not_run_number(tmp_path, tiny_recipe):
    cfg = _cfg(tiny_recipe, tmp_path)
    _fake_run(cfg, "tiny-10", 10, age_s=100)
    first = _fake_run(cfg, "tiny", 1, age_s=10)  # resumed last, so its checkpoint is the newest
    _fake_run(cfg, "tiny-2", 5, age_s=50)
    run_dir, _, lock = find_resumable(cfg, print)
    lock.release()
    assert run_dir == first


def test_auto_resume_without_a_good_checkpoint_starts_a_fresh_run(tmp_path, tiny_recipe, capsys):
    cfg = _cfg(tiny_recipe, tmp_path)
    run_dir, ckpt, lock = auto_resume(cfg)
    lock.release()
    assert run_dir == Path(cfg.output_dir) / "tiny" and ckpt is None and "starting" in capsys.readouterr().out
    _fake_run(cfg, "tiny-2", 4, age_s=0, broken=True)
    run_dir, ckpt, lock = auto_resume(cfg)
    lock.release()
    out = capsys.readouterr().out
    assert run_dir == Path(cfg.output_dir) / "tiny-3" and ckpt is None, "a fresh directory, never a taken one"
    assert "skipping" in out and "tiny-2" in out


def test_srun_tasks_agree_on_the_run_directory(tmp_path, tiny_recipe, monkeypatch):
    cfg = _cfg(tiny_recipe, tmp_path)
    good = _fake_run(cfg, "tiny", 3, age_s=0)
    monkeypatch.setenv("SLURM_JOB_ID", JOB)
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    monkeypatch.setenv("SLURM_PROCID", "0")
    run0, ckpt0, lock0 = auto_resume(cfg)
    monkeypatch.setenv("SLURM_PROCID", "1")
    run1, ckpt1, lock1 = auto_resume(cfg)  # would be refused the lock if it tried: task 0 holds it
    lock0.release()
    assert run0 == run1 == good and lock1 is None and ckpt0["step"] == ckpt1["step"] == 3
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")  # the next attempt of the job: task 0 chooses again
    monkeypatch.setattr("sslkit.engine.rundir.SLURM_HANDOFF_TIMEOUT_S", 0.3)
    with pytest.raises(RunError, match="did not choose a run directory"):
        auto_resume(cfg)


def test_a_finished_run_is_left_as_it_is(tmp_path, tiny_recipe, capsys):
    from sslkit.engine import train

    cfg = _cfg(tiny_recipe, tmp_path, trainer={"epochs": 1})
    done = train(cfg, resume="auto")
    summary = (done.run_dir / "summary.json").read_text()
    again = train(cfg, resume="auto")
    assert again.run_dir == done.run_dir and again.steps == done.steps == 4
    assert again.final_loss == done.final_loss
    assert "nothing to resume" in capsys.readouterr().out
    assert (done.run_dir / "summary.json").read_text() == summary, "the finished run's summary is untouched"
    assert finished_summary(done.run_dir, {"step": 3}) is None, "a summary of another step is not this checkpoint's"


def test_resume_auto_needs_the_recipe(capsys):
    assert main(["pretrain", "--resume", "auto"]) == 2
    err = capsys.readouterr().err
    assert "--resume auto needs the RECIPE" in err and err.count("\n") == 1


def test_an_explicit_resume_of_a_run_in_use_is_refused(tmp_path, tiny_recipe):
    from sslkit.engine import train

    cfg = _cfg(tiny_recipe, tmp_path)
    run = _fake_run(cfg, "tiny", 3, age_s=0)
    held = RunLock(run)
    assert held.acquire()
    try:
        with pytest.raises(RunError, match="another sslkit process is training into it"):
            train(cfg, resume=run)
    finally:
        held.release()


def _stopped_ctx(tmp_path: Path, is_main: bool = True) -> SimpleNamespace:
    return SimpleNamespace(state=SimpleNamespace(stop_requested=True, step=7), run_dir=tmp_path, is_main=is_main,
                           world=1)


@pytest.mark.parametrize(("signum", "requeue", "is_main", "job", "calls"), [
    (signal.SIGUSR1, True, True, JOB, 1),
    (signal.SIGUSR1, False, True, JOB, 0),  # trainer.requeue: false
    (signal.SIGUSR1, True, False, JOB, 0),  # other ranks never requeue
    (signal.SIGUSR1, True, True, None, 0),  # not under SLURM
    (signal.SIGTERM, True, True, JOB, 0),  # SLURM's kill, or a user's: checkpoint and stop only
])
def test_only_rank_0_requeues_after_sigusr1(tmp_path, monkeypatch, signum, requeue, is_main, job, calls):
    bin_dir, log = _fake_scontrol(tmp_path)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    if job is None:
        monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    else:
        monkeypatch.setenv("SLURM_JOB_ID", job)
    cb = SignalCheckpoint(requeue=requeue)
    cb.received = signum
    with pytest.raises(TrainingInterrupted) as info:
        cb.raise_if_stopped(_stopped_ctx(tmp_path, is_main))
    assert info.value.exit_code == 128 + signum
    made = log.read_text().splitlines() if log.exists() else []
    assert made == [f"requeue {JOB}"] * calls
    assert ("requeued SLURM job" in str(info.value)) == bool(calls)


def test_a_failed_or_impossible_requeue_says_what_to_do(tmp_path, monkeypatch):
    bin_dir, log = _fake_scontrol(tmp_path, exit_code=1)
    monkeypatch.setenv("PATH", str(bin_dir))
    message = requeue_job(JOB)
    assert "exited 1" in message and "presently disabled" in message and "--requeue" in message
    assert log.read_text() == f"requeue {JOB}\n"
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert "`scontrol` is not on PATH" in requeue_job(JOB)
    assert "not a SLURM job id" in requeue_job("--help")
