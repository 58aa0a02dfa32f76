"""FSDP2 on CPU (gloo) for DINO with a ViT: a sharded step equals one process on the concatenated batch, and its
distributed checkpoint reshards (2 processes to 1, 1 to 2) and reads back without a process group."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_state_dict

from sslkit.engine.fsdp import latest_sharded, load_sharded, read_full_state, save_sharded, shard_objective
from sslkit.run import RunError

from .dist_utils import run_distributed
from .test_dino import BATCH, make_views, tiny_dino, train_step, trainable

LR = 1e-2


def _opt(obj):
    # eps well above the noise of gradients that are zero in exact arithmetic (the attention's key bias): Adam
    # would otherwise blow that noise, which differs with the reduction order, up to lr-sized updates.
    return torch.optim.AdamW(trainable(obj), lr=LR, eps=1e-6)


def _fresh():
    obj = tiny_dino(0, center_momentum=0.8, momentum_teacher=0.9, freeze_last_layer=0)
    obj.setup_schedule(5, 10)
    return obj


def _step(obj, opt, step, rank=0, world=1):
    full = make_views(step, batch=2 * BATCH)  # the global batch; rank r takes its slice of it
    n = 2 * BATCH // world
    train_step(obj, opt, [v[rank * n:(rank + 1) * n] for v in full], step)


def _full(obj):
    """The whole state (gathered from the shards) including buffers such as DINO's center."""
    return {k: v.detach().clone() for k, v in get_model_state_dict(obj, options=StateDictOptions(full_state_dict=True)).items()}


def _sharded_worker(rank, world, out_dir, load_from, first_step, steps):
    obj = shard_objective(_fresh())
    opt = _opt(obj)
    if load_from:
        load_sharded(latest_sharded(Path(load_from)), obj, opt)
    for step in range(first_step, first_step + steps):
        _step(obj, opt, step, rank, world)
    state = _full(obj)
    save_sharded(Path(out_dir) / f"ckpt_w{world}", first_step + steps, obj, opt, {"world_size": world})
    if rank == 0:
        torch.save(state, Path(out_dir) / f"state_w{world}.pt")


def _plain_from(ckpt_dir):
    """A one-process, unsharded objective and optimiser restored from a sharded checkpoint, without a process group."""
    full = read_full_state(latest_sharded(ckpt_dir))
    obj = _fresh()
    opt = _opt(obj)
    set_state_dict(obj, opt, model_state_dict=full["objective"], optim_state_dict=full["optimizer"])
    return obj, opt, full


@pytest.mark.slow
@pytest.mark.ddp
def test_fsdp_matches_one_process_and_reshards(tmp_path):
    # One process on the concatenated batch: the reference for two FSDP processes on its halves.
    ref = _fresh()
    ref_opt = _opt(ref)
    for step in range(2):
        _step(ref, ref_opt, step)

    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for d in (a, b, c):
        d.mkdir()
    run_distributed(_sharded_worker, 2, str(a), "", 0, 2)
    got = torch.load(a / "state_w2.pt")
    assert got.keys() == ref.state_dict().keys()
    for k, v in ref.state_dict().items():  # student, teacher (EMA) and center
        torch.testing.assert_close(got[k], v, rtol=1e-4, atol=1e-5, msg=k)

    # Read without a process group: exactly the gathered state.
    plain, plain_opt, full = _plain_from(a / "ckpt_w2")
    assert full["meta"]["step"] == 2 and full["meta"]["world_size"] == 2
    for k, v in got.items():
        assert torch.equal(plain.state_dict()[k], v), k

    # 2 -> 1: the sharded checkpoint resumes on one FSDP process and continues bit-exact with a plain one-process
    # run from the same state.
    for step in range(2, 4):
        _step(plain, plain_opt, step)
    run_distributed(_sharded_worker, 1, str(b), str(a / "ckpt_w2"), 2, 2)
    one = torch.load(b / "state_w1.pt")
    for k, v in plain.state_dict().items():
        assert torch.equal(one[k], v), k

    # 1 -> 2: that one-process checkpoint resumes on two processes, matching one process within tolerance.
    run_distributed(_sharded_worker, 2, str(c), str(b / "ckpt_w1"), 4, 1)
    _step(plain, plain_opt, 4)
    two = torch.load(c / "state_w2.pt")
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(two[k], v, rtol=1e-4, atol=1e-5, msg=k)


def test_unsharded_checkpoint_round_trip_and_tampered_metadata(tmp_path):
    obj = _fresh()
    opt = _opt(obj)
    _step(obj, opt, 0)
    save_sharded(tmp_path, 1, obj, opt, {"note": "x"})
    save_sharded(tmp_path, 2, obj, opt, {"note": "y"})  # replaces the first; the pointer names the new one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dcp-step000000002", "last_dcp.json"]
    again, again_opt, full = _plain_from(tmp_path)
    assert full["meta"] == {"step": 2, "note": "y"}
    for k, v in obj.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    _step(obj, opt, 1)
    _step(again, again_opt, 1)
    for k, v in obj.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (tmp_path / "dcp-step000000002" / ".metadata").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(RunError, match="refusing to read checkpoint metadata"):
        read_full_state(latest_sharded(tmp_path))
    (tmp_path / "last_dcp.json").write_text('{"last": "../../etc"}')
    with pytest.raises(RunError, match="not a dcp-step"):
        latest_sharded(tmp_path)


def test_shard_objective_refuses_a_cnn():
    from sslkit.objectives.simclr import SimCLRConfig
    from sslkit.registry import ENCODERS, OBJECTIVES

    obj = OBJECTIVES.build("simclr", encoder=ENCODERS.build("resnet_cifar"), cfg=SimCLRConfig())
    with pytest.raises(ValueError, match="no ViT blocks"):
        shard_objective(obj)
