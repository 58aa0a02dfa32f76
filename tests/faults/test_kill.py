"""kill -9 at random points, including in the middle of writing a checkpoint.

The run resumes from the last complete checkpoint and, on CPU with the same seed, ends bit-identical to a
run that was never killed.
"""

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from sslkit.engine import load_checkpoint

TINY = {
    "data": {"name": "synthetic", "args": {"num_samples": 128, "image_size": 32}, "batch_size": 16, "num_workers": 0},
    "encoder": {"name": "vit_tiny_patch4_32", "depth": 2, "embed_dim": 64, "num_heads": 2},
    "optim": {"name": "adamw", "lr": 1e-3, "warmup_epochs": 1},
    # 96 steps, checkpointed at each: long enough to be killed three times at random points
    "trainer": {"epochs": 12, "log_every_steps": 1, "checkpoint_every_steps": 1},
    "eval": {"final_knn": False},
}
OBJECTIVES = {
    "simclr": {"augment": {"name": "simclr", "image_size": 32},
               "objective": {"name": "simclr", "proj_hidden_dim": 64, "proj_out_dim": 32}},
    "dino": {"augment": {"name": "multicrop", "image_size": 32, "local_size": 16, "num_local": 2, "preset": "small"},
             "objective": {"name": "dino", "out_dim": 128, "head_hidden_dim": 64, "head_bottleneck_dim": 32,
                           "warmup_teacher_temp_epochs": 2, "freeze_last_layer": 1}},
    "byol": {"augment": {"name": "multicrop", "image_size": 32, "num_local": 0, "preset": "small"},
             "objective": {"name": "byol", "proj_hidden_dim": 64, "proj_out_dim": 32, "pred_hidden_dim": 64}},
    "mae": {"augment": {"name": "mae", "image_size": 32},
            "objective": {"name": "mae", "decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2}},
}


def _recipe(tmp_path: Path, objective: str, name: str) -> Path:
    raw = {"name": name, "output_dir": str(tmp_path / "runs"), **TINY, **OBJECTIVES[objective]}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "sslkit.cli", "pretrain", *args]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1"}


@pytest.mark.slow
@pytest.mark.parametrize("objective", sorted(OBJECTIVES))
def test_kill9_at_random_points_then_resume_is_bit_identical(tmp_path, objective):
    rng = random.Random(objective)
    ref = _recipe(tmp_path, objective, "ref")
    subprocess.run(_cmd(str(ref)), check=True, env=_env(), capture_output=True, timeout=600)

    victim = _recipe(tmp_path, objective, "victim")
    run = tmp_path / "runs" / "victim"
    ckpt = run / "checkpoints" / "last.ckpt"
    kills, max_kills = 0, 3
    for attempt in range(max_kills + 1):
        args = [str(victim)] if attempt == 0 else ["--resume", str(run)]
        proc = subprocess.Popen(_cmd(*args), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        start_step = load_checkpoint(ckpt)["step"] if ckpt.exists() else -1
        deadline = time.time() + 300
        while proc.poll() is None and time.time() < deadline:  # wait for progress past the last checkpoint
            if ckpt.exists() and load_checkpoint(ckpt)["step"] > start_step:
                break
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, 1.5))
        if proc.poll() is None and kills < max_kills:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
            continue
        assert proc.wait(timeout=600) == 0, proc.stderr.read().decode()[-2000:]
        break
    assert kills >= 2, "the run finished before it could be killed twice; make it longer"
    a = load_file(tmp_path / "runs" / "ref" / "encoder.safetensors")
    b = load_file(run / "encoder.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    full_a = load_checkpoint(tmp_path / "runs" / "ref" / "checkpoints" / "last.ckpt")["objective"]
    full_b = load_checkpoint(ckpt)["objective"]
    assert all(torch.equal(full_a[k], full_b[k]) for k in full_a), "every buffer (teacher, center) matches too"


def test_kill9_in_the_middle_of_writing_a_checkpoint_keeps_the_previous_one(tmp_path):
    target = tmp_path / "last.ckpt"
    torch.save({"step": 1}, target)
    script = textwrap.dedent(f"""
        import os, signal, torch, io
        import sslkit.run as run
        real_replace = os.replace
        def die(src, dst):  # the temporary file is complete and fsynced; die before the rename
            os.kill(os.getpid(), signal.SIGKILL)
        os.replace = die
        buf = io.BytesIO(); torch.save({{"step": 2, "w": torch.zeros(1000)}}, buf)
        run.atomic_write_bytes(__import__("pathlib").Path({str(target)!r}), buf.getvalue())
    """)
    proc = subprocess.run([sys.executable, "-c", script], env=_env(), timeout=120)
    assert proc.returncode == -signal.SIGKILL
    assert torch.load(target, weights_only=True)["step"] == 1, "the old checkpoint is intact"
    leftovers = [p for p in tmp_path.iterdir() if p.name != "last.ckpt"]
    assert leftovers and all(p.name.startswith(".last.ckpt.") for p in leftovers), "only a hidden temporary remains"
