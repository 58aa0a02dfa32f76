import errno
from pathlib import Path

import pytest
import torch

from sslkit.config import resolve
from sslkit.engine import NonFiniteLossError, load_checkpoint, train
from sslkit.run import RunError


def test_nan_loss_stops_within_one_step_naming_step_cause_and_checkpoint(tiny_recipe):
    cfg = resolve(tiny_recipe(objective={"name": "faulty_simclr", "nan_loss_steps": [5]},
                              trainer={"checkpoint_every_steps": 2}))
    with pytest.raises(NonFiniteLossError) as e:
        train(cfg)
    msg = str(e.value)
    assert "loss is nan at step 5" in msg and "lr" in msg and "precision" in msg
    assert "last.ckpt" in msg
    ckpt = load_checkpoint(f"{cfg.output_dir}/tiny/checkpoints/last.ckpt")
    assert ckpt["step"] == 4, "the last good checkpoint is kept"


def test_inf_gradient_is_caught(tiny_recipe):
    cfg = resolve(tiny_recipe(objective={"name": "faulty_simclr", "inf_grad_steps": [1]}))
    with pytest.raises(NonFiniteLossError, match="gradient norm is inf at step 1"):
        train(cfg)


def test_skip_nonfinite_steps_tolerates_then_stops(tiny_recipe):
    ok = train(resolve(tiny_recipe(name="ok", objective={"name": "faulty_simclr", "nan_loss_steps": [2],
                                                         "inf_grad_steps": [4]},
                                   trainer={"skip_nonfinite_steps": 2})))
    assert ok.steps == 8 and (ok.run_dir / "encoder.safetensors").is_file()
    weights = load_checkpoint(ok.run_dir / "checkpoints" / "last.ckpt")["objective"]
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())
    with pytest.raises(NonFiniteLossError, match="3 non-finite step"):
        train(resolve(tiny_recipe(name="bad", objective={"name": "faulty_simclr", "nan_loss_steps": [1, 2, 3]},
                                  trainer={"skip_nonfinite_steps": 2})))


def test_disk_full_while_saving_keeps_last_good_checkpoint(tiny_recipe, monkeypatch):
    import sslkit.engine.checkpoint as engine

    real = engine.atomic_write_bytes
    calls = {"n": 0}

    def flaky(path, data):
        if path.name == "last.ckpt":
            calls["n"] += 1
            if calls["n"] == 2:
                # Write part of the temporary file, then fail as a full disk does.
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, data)

    monkeypatch.setattr(engine, "atomic_write_bytes", flaky)
    cfg = resolve(tiny_recipe(trainer={"checkpoint_every_steps": 3}))
    with pytest.raises(RunError, match=r"could not write checkpoint at step 4.*No space left.*previous checkpoint is "
                                       r"intact"):
        train(cfg)
    ckpt = load_checkpoint(f"{cfg.output_dir}/tiny/checkpoints/last.ckpt")
    assert ckpt["step"] == 3
    assert list(Path(cfg.output_dir, "tiny", "checkpoints").glob(".*tmp")) == [], "no temporary file is left"
