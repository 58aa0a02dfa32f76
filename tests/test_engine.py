import csv
import pickle

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sslkit.config import resolve
from sslkit.engine import build_objective, cosine_schedule, load_checkpoint, train
from sslkit.run import RunError, load_encoder


def _rows(run_dir):
    with open(run_dir / "metrics.csv") as f:
        return [r for r in csv.DictReader(f) if r.get("loss")]


def _losses(run_dir):
    return [float(r["loss"]) for r in _rows(run_dir)]


def test_cosine_schedule_formula():
    s = cosine_schedule(1.0, 0.1, total_steps=10, warmup_steps=4)
    assert len(s) == 10
    np.testing.assert_allclose(s[:4], [0, 0.25, 0.5, 0.75])
    assert s[4] == pytest.approx(1.0)
    t = np.arange(6) / 6
    np.testing.assert_allclose(s[4:], 0.1 + 0.45 * (1 + np.cos(np.pi * t)))


def test_short_run_lowers_loss_and_exports_encoder(tiny_recipe):
    cfg = resolve(tiny_recipe(data={"args": {"num_samples": 128}}, trainer={"epochs": 6},
                              optim={"lr": 2e-3, "warmup_epochs": 0.5}))
    result = train(cfg)
    run = result.run_dir
    assert (run / "checkpoints" / "last.ckpt").is_file() and (run / "config.yaml").is_file()
    assert (run.parent / "tiny-latest").resolve() == run.resolve()
    losses = _losses(run)
    assert len(losses) == result.steps == 48
    assert np.mean(losses[-8:]) < np.mean(losses[:8]) - 0.1, losses
    enc, _ = load_encoder(run)
    obj = build_objective(cfg)
    obj.load_state_dict(load_checkpoint(run / "checkpoints" / "last.ckpt")["objective"])
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(enc(x), obj.eval_encoder().eval()(x))
    assert set(load_file(run / "encoder.safetensors")) == set(obj.eval_encoder().state_dict())


@pytest.mark.parametrize("backend", ["per_image", "batched"])
def test_resume_is_bit_exact(tiny_recipe, backend):
    data = {"augment_backend": backend}
    full = train(resolve(tiny_recipe(name="full", data=data))).run_dir
    cfg = resolve(tiny_recipe(name="split", data=data))
    part = train(cfg, stop_at_step=5)  # mid-epoch (4 steps per epoch), between checkpoints
    assert part.steps == 5 and not (part.run_dir / "encoder.safetensors").exists()
    # The resumed half uses a worker process: views must not depend on who makes them.
    resumed = train(resolve(tiny_recipe(name="split", data=data), ["data.num_workers=1"]),
                    resume=part.run_dir).run_dir
    a = load_file(full / "encoder.safetensors")
    b = load_file(resumed / "encoder.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ca = load_checkpoint(full / "checkpoints" / "last.ckpt")
    cb = load_checkpoint(resumed / "checkpoints" / "last.ckpt")
    for k, v in ca["objective"].items():
        assert torch.equal(v, cb["objective"][k]), k
    assert _losses(full) == _losses(resumed)


def test_resume_refuses_a_different_recipe(tiny_recipe):
    part = train(resolve(tiny_recipe()), stop_at_step=2)
    with pytest.raises(RunError, match=r"differs from the run's in \['optim'\]"):
        train(resolve(tiny_recipe(), ["optim.lr=0.5"]), resume=part.run_dir)


def test_checkpoint_with_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as f:
        pickle.dump({"format": "sslkit", "objective": Evil()}, f)
    with pytest.raises(RunError, match="weights_only=True"):
        load_checkpoint(path)
    assert not marker.exists()


def test_wrong_encoder_names_mismatched_keys(tiny_recipe):
    run = train(resolve(tiny_recipe())).run_dir
    cfg_path = run / "config.yaml"
    cfg_path.write_text(cfg_path.read_text().replace("depth: 2", "depth: 3"))
    with pytest.raises(RunError, match=r"missing \d+ key\(s\), e.g. \['model.blocks.2"):
        load_encoder(run)


@pytest.mark.ddp
def test_engine_ddp_gloo_two_processes(tiny_recipe):
    cfg = resolve(tiny_recipe(name="ddp", trainer={"epochs": 1, "accelerator": "cpu", "devices": 2,
                                                   "strategy": "ddp_spawn"}))
    result = train(cfg)
    assert result.steps == 2  # 64 images / (16 x 2 processes)
    ckpt = load_checkpoint(result.run_dir / "checkpoints" / "last.ckpt")
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]) == 2
    assert not torch.equal(ckpt["rng"][0]["torch"], ckpt["rng"][1]["torch"]), "ranks draw different randomness"


def test_bf16_autocast_loss_curve_stays_close_to_fp32(tiny_recipe):
    fp32 = train(resolve(tiny_recipe(name="fp32", trainer={"precision": "32-true"}))).run_dir
    bf16 = train(resolve(tiny_recipe(name="bf16", trainer={"precision": "bf16-mixed"}))).run_dir
    a, b = np.array(_losses(fp32)), np.array(_losses(bf16))
    assert len(a) == len(b) == 8
    assert not np.array_equal(a, b), "bf16 autocast must actually change the arithmetic"
    np.testing.assert_allclose(b, a, rtol=0.02)


def test_fit_steps_to_budget_formula():
    from sslkit.engine import fit_steps_to_budget

    # 100 s budget, 10 s used by 20 steps, 0.5 s per step: 180 more steps fit.
    assert fit_steps_to_budget(20, 10.0, 0.5, 100.0, cap=1000) == 200
    assert fit_steps_to_budget(20, 10.0, 0.5, 100.0, cap=150) == 150  # never beyond epochs / max_steps
    assert fit_steps_to_budget(20, 120.0, 0.5, 100.0, cap=1000) == 21  # over budget: finish the step in progress
    assert fit_steps_to_budget(20, 10.0, 0.0, 100.0, cap=1000) == 1000  # no rate measured: keep the cap


def test_time_budget_fits_the_schedules_to_the_clock(tiny_recipe):
    import json

    from sslkit.engine import WARMUP_STEPS_EXCLUDED, scaled_lr

    calib = 2
    cfg = resolve(tiny_recipe(name="budget", trainer={"epochs": 50, "time_budget_minutes": 0.0005,
                                                      "budget_calibration_steps": calib},
                              optim={"lr": 1e-3, "warmup_epochs": 0.5, "min_lr": 1e-5}))
    result = train(cfg)
    summary = json.loads((result.run_dir / "summary.json").read_text())
    cap = 50 * 4  # 64 images / batch 16
    assert result.steps == summary["total_steps"] < cap, "a 30 ms budget must cut a 200-step run short"
    assert summary["epochs"] == pytest.approx(result.steps / 4)
    ckpt = load_checkpoint(result.run_dir / "checkpoints" / "last.ckpt")
    assert ckpt["budget_total_steps"] == result.steps
    # From the fit on, every step follows the cosine of the fitted length, not of the 200-step cap.
    fitted = cosine_schedule(scaled_lr(cfg, 16), 1e-5, result.steps, warmup_steps=2)
    rows = _rows(result.run_dir)
    assert len(rows) == result.steps
    fit_at = WARMUP_STEPS_EXCLUDED + calib
    for r in rows[fit_at:]:
        assert float(r["lr"]) == pytest.approx(fitted[int(r["step"]) - 1]), r


def test_time_budget_that_does_not_bind_keeps_the_epochs(tiny_recipe):
    base = train(resolve(tiny_recipe(name="nobudget"))).run_dir
    roomy = train(resolve(tiny_recipe(name="roomy", trainer={"time_budget_minutes": 60.0}))).run_dir
    assert _losses(base) == _losses(roomy)  # same steps, same schedules, same numbers


def test_auto_precision_follows_the_measured_bf16_speed(monkeypatch):
    import sslkit.engine.precision as eng

    cfg = resolve({"trainer": {"accelerator": "cpu"}})
    for speedup, want in ((0.6, "32-true"), (1.1, "32-true"), (2.0, "bf16-mixed")):
        monkeypatch.delenv(eng.CPU_BF16_ENV, raising=False)
        monkeypatch.setattr(eng, "cpu_bf16_speedup", lambda s=speedup: s)
        assert eng.resolve_precision(cfg) == want, speedup
        assert eng.os.environ[eng.CPU_BF16_ENV] == ("1" if want == "bf16-mixed" else "0")  # DDP children agree
    monkeypatch.setenv(eng.CPU_BF16_ENV, "0")  # an explicit choice skips the probe
    assert eng.resolve_precision(cfg) == "32-true"
    assert eng.resolve_precision(resolve({"trainer": {"precision": "bf16-mixed"}})) == "bf16-mixed"


def test_bf16_probe_measures_something():
    from sslkit.engine import cpu_bf16_speedup, cpu_has_native_bf16

    s = cpu_bf16_speedup()
    assert (s > 0) == cpu_has_native_bf16() and s < 20
