"""DINO objective: loss vs lightly, center, one training step, grouped forward, DDP center, resume, schedules,
recipes and attention maps."""

from __future__ import annotations

import copy
import math
import os
import re
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sslkit.config import ConfigError, load_recipe, resolve
from sslkit.objectives.dino import (
    DINO,
    DINOConfig,
    DINOHead,
    dino_loss,
    ema_momentum_at,
    multicrop_forward,
    size_groups,
    teacher_temp_at,
    update_center,
)
from sslkit.plugins import load_all
from sslkit.registry import ENCODERS, OBJECTIVES

torch.set_num_threads(1)
load_all()

OUT_DIM = 64
BATCH = 4
GLOBAL, LOCAL = 16, 8  # px; tiny ViT with 4-px patches: 16 and 4 tokens


def tiny_dino(seed: int = 0, **over) -> DINO:
    torch.manual_seed(seed)
    enc = ENCODERS.build("vit_tiny_patch4_32", img_size=GLOBAL, depth=1, embed_dim=24, num_heads=2)
    cfg = DINOConfig(**{"out_dim": OUT_DIM, "head_hidden_dim": 32, "head_bottleneck_dim": 16, **over})
    return OBJECTIVES.build("dino", encoder=enc, cfg=cfg)


def make_views(seed: int, batch: int = BATCH, num_local: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return ([torch.randn(batch, 3, GLOBAL, GLOBAL, generator=g) for _ in range(2)]
            + [torch.randn(batch, 3, LOCAL, LOCAL, generator=g) for _ in range(num_local)])


def trainable(obj: DINO) -> list[torch.nn.Parameter]:
    return [p for p in obj.parameters() if p.requires_grad]


def train_step(obj: DINO, opt: torch.optim.Optimizer, views: list[torch.Tensor], step: int) -> dict[str, torch.Tensor]:
    """One step exactly as the engine drives it."""
    out = obj(views, step)
    out["loss"].backward()
    obj.on_after_backward(step)
    opt.step()
    opt.zero_grad(set_to_none=True)
    obj.on_step_end(step)
    return out


# ----------------------------------------------------------------------------------------------- loss


@pytest.mark.parametrize("n_teacher,n_student", [(2, 2), (2, 6), (2, 12), (1, 3)])
@pytest.mark.parametrize("teacher_temp,student_temp", [(0.04, 0.1), (0.07, 0.1), (0.2, 0.5)])
def test_loss_and_center_match_lightly(n_teacher, n_student, teacher_temp, student_temp):
    from lightly.loss import DINOLoss  # imported here: keeps the DDP test's spawned workers light

    g = torch.Generator().manual_seed(n_student * 100 + int(teacher_temp * 1000))
    t = [torch.randn(BATCH, OUT_DIM, generator=g) * 3 for _ in range(n_teacher)]
    s = [torch.randn(BATCH, OUT_DIM, generator=g) * 3 for _ in range(n_student)]
    center = torch.randn(1, OUT_DIM, generator=g)
    ref = DINOLoss(OUT_DIM, warmup_teacher_temp=teacher_temp, teacher_temp=teacher_temp,
                   warmup_teacher_temp_epochs=1, student_temp=student_temp, center_momentum=0.9)
    ref.center.copy_(center.reshape(1, 1, -1))
    expected = ref(t, s, teacher_temp=teacher_temp)
    got = dino_loss(t, s, center, teacher_temp, student_temp)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(update_center(center, t, 0.9), ref.center.reshape(1, -1), rtol=1e-6, atol=1e-7)
    # stacked input is the same as a list
    torch.testing.assert_close(dino_loss(torch.stack(t), torch.stack(s), center, teacher_temp, student_temp), got)


def test_loss_excludes_same_view_pairs_only():
    t = [torch.randn(2, 8) for _ in range(2)]
    # The student's views equal the teacher's logits: the loss still has the two cross terms, no self term.
    s = [x.clone() for x in t] + [torch.randn(2, 8)]
    loss = dino_loss(t, s, torch.zeros(8), teacher_temp=0.1, student_temp=0.1)
    manual = 0.0
    for i in range(2):
        for j in range(3):
            if i != j:
                manual += -(torch.softmax(t[i] / 0.1, -1) * torch.log_softmax(s[j] / 0.1, -1)).sum(-1).mean()
    torch.testing.assert_close(loss, manual / 4)
    with pytest.raises(ValueError, match="at least one pair"):
        dino_loss(t[:1], s[:1], torch.zeros(8), 0.1)


# ----------------------------------------------------------------------------------------------- head, teacher


def test_head_shapes_and_weight_norm():
    head = DINOHead(24, OUT_DIM, hidden_dim=32, bottleneck_dim=16, norm_last_layer=True)
    assert head(torch.randn(5, 24)).shape == (5, OUT_DIM)
    g = head.last_layer.parametrizations.weight.original0
    assert torch.all(g == 1) and not g.requires_grad
    rows = head.last_layer.weight.norm(dim=1)  # weight norm with g=1: unit rows
    torch.testing.assert_close(rows, torch.ones(OUT_DIM))
    assert DINOHead(24, OUT_DIM, norm_last_layer=False).last_layer.parametrizations.weight.original0.requires_grad
    assert len([m for m in DINOHead(24, 8, num_layers=3).mlp if isinstance(m, torch.nn.Linear)]) == 3


def test_teacher_is_not_optimised_and_is_the_eval_encoder():
    obj = tiny_dino()
    teacher_ids = {id(p) for p in obj.teacher.parameters()}
    assert teacher_ids and not teacher_ids & {id(p) for p in trainable(obj)}
    assert all(not p.requires_grad for p in obj.teacher.parameters())
    assert obj.eval_encoder() is obj.teacher["encoder"]
    keys = obj.state_dict().keys()
    assert "center" in keys and any(k.startswith("teacher.encoder.") for k in keys)
    for pt, ps in zip(obj.teacher["encoder"].parameters(), obj.encoder.parameters()):
        assert torch.equal(pt, ps) and pt is not ps


def test_teacher_has_no_stochastic_depth():
    torch.manual_seed(0)
    enc = ENCODERS.build("vit_tiny_patch4_32", img_size=GLOBAL, depth=2, embed_dim=24, num_heads=2,
                         drop_path_rate=0.5)
    obj = DINO(enc, DINOConfig(out_dim=OUT_DIM, head_hidden_dim=32, head_bottleneck_dim=16))
    assert type(obj.encoder.model.blocks[1].drop_path1).__name__ == "DropPath"
    assert isinstance(obj.teacher["encoder"].model.blocks[1].drop_path1, torch.nn.Identity)
    x = torch.randn(2, 3, GLOBAL, GLOBAL)
    teacher = obj.teacher["encoder"].train()
    torch.testing.assert_close(teacher(x), teacher(x))  # deterministic in train mode


def test_one_step_updates_teacher_center_and_keeps_last_layer_frozen():
    obj = tiny_dino(freeze_last_layer=2, freeze_last_layer_unit="steps", momentum_teacher=0.9)
    obj.setup_schedule(steps_per_epoch=5, total_steps=10)
    opt = torch.optim.AdamW(trainable(obj), lr=1e-2, weight_decay=0.1)
    teacher0 = copy.deepcopy(obj.teacher.state_dict())
    last0 = obj.head.last_layer.parametrizations.weight.original1.detach().clone()
    mlp0 = obj.head.mlp[0].weight.detach().clone()
    center0 = obj.center.clone()

    out = obj(make_views(0), 0)
    out["loss"].backward()
    assert obj.head.last_layer.parametrizations.weight.original1.grad is not None
    obj.on_after_backward(0)
    assert obj.head.last_layer.parametrizations.weight.original1.grad is None  # frozen: dropped
    opt.step()
    opt.zero_grad(set_to_none=True)
    obj.on_step_end(0)

    assert set(out) >= {"loss", "teacher_temp", "teacher_momentum", "teacher_entropy"}
    assert all(v.ndim == 0 for v in out.values())
    changed = [k for k, v in obj.teacher.state_dict().items() if not torch.equal(v, teacher0[k])]
    assert any(k.startswith("encoder.") for k in changed) and any(k.startswith("head.mlp") for k in changed)
    assert all(p.grad is None for p in obj.teacher.parameters())
    assert torch.equal(obj.head.last_layer.parametrizations.weight.original1, last0)
    assert not torch.equal(obj.head.mlp[0].weight, mlp0)
    assert not torch.equal(obj.center, center0)

    # EMA with this step's momentum: teacher = m * teacher0 + (1 - m) * student
    m = ema_momentum_at(0, 10, 0.9)
    student = dict(obj.encoder.named_parameters(prefix="encoder")) | dict(obj.head.named_parameters(prefix="head"))
    for name, p in obj.teacher.named_parameters():
        torch.testing.assert_close(p, m * teacher0[name] + (1 - m) * student[name].detach(), msg=name)

    train_step(obj, opt, make_views(1), 1)  # still frozen at step 1
    assert torch.equal(obj.head.last_layer.parametrizations.weight.original1, last0)
    train_step(obj, opt, make_views(2), 2)  # released at step 2
    assert not torch.equal(obj.head.last_layer.parametrizations.weight.original1, last0)


def test_freeze_units_and_validation():
    obj = tiny_dino(freeze_last_layer=1.5, freeze_last_layer_unit="epochs")
    obj.setup_schedule(steps_per_epoch=10, total_steps=100)
    assert obj.freeze_last_layer_steps == 15
    obj = tiny_dino(freeze_last_layer=7, freeze_last_layer_unit="steps")
    obj.setup_schedule(steps_per_epoch=10, total_steps=100)
    assert obj.freeze_last_layer_steps == 7
    with pytest.raises(ValueError, match="freeze_last_layer_unit"):
        tiny_dino(freeze_last_layer_unit="iters")
    with pytest.raises(ValueError, match="teacher_temp"):
        tiny_dino(teacher_temp=0.0)


def test_eval_mode_forward_leaves_center_alone_and_bf16_works():
    obj = tiny_dino().eval()
    obj.setup_schedule(5, 10)
    obj(make_views(0), 0)
    assert torch.all(obj.center == 0)
    obj.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = obj(make_views(0), 0)
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])


# ----------------------------------------------------------------------------------------------- multi-crop forward


def test_size_groups():
    views = [torch.zeros(1, 3, s, s) for s in (32, 32, 16, 16, 16, 32)]
    assert size_groups(views) == [(0, 2), (2, 5), (5, 6)]
    assert size_groups(views[:1]) == [(0, 1)]


def test_grouped_forward_equals_per_crop_forward():
    obj = tiny_dino().eval()
    views = make_views(3, num_local=4)
    calls = []
    hook = obj.encoder.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    with torch.no_grad():
        grouped = multicrop_forward(obj.encoder, obj.head, views)  # (V, B, K)
        hook.remove()
        separate = torch.stack([obj.head(obj.encoder(v)) for v in views])
    assert calls == [2 * BATCH, 4 * BATCH]  # one encoder pass per resolution
    assert grouped.shape == (6, BATCH, OUT_DIM)
    torch.testing.assert_close(grouped, separate, rtol=1e-4, atol=1e-5)


def test_koleo_adds_lightly_koleo_of_each_global_crop():
    """koleo_weight w adds w * sum over global crops of lightly's KoLeoLoss on the student's encoder features."""
    from lightly.loss import KoLeoLoss

    views = make_views(5, batch=6)
    plain, reg = tiny_dino(seed=1).eval(), tiny_dino(seed=1, koleo_weight=0.25).eval()  # eval: dropout-free
    for obj in (plain, reg):
        obj.setup_schedule(5, 10)
    with torch.no_grad():
        base, out = plain(views, 0), reg(views, 0)
        feats = reg.encoder(torch.cat(views[:2]))  # the global crops' group, as the grouped forward encodes it
    expected = sum(KoLeoLoss()(f) for f in feats.chunk(2))
    torch.testing.assert_close(out["koleo"], expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out["loss"], base["loss"] + 0.25 * expected, rtol=1e-5, atol=1e-6)
    assert "koleo" not in base
    # and it reaches the student encoder: the same weights get a different gradient
    grads = [torch.autograd.grad(obj(views, 0)["loss"], obj.encoder.model.patch_embed.proj.weight)[0]
             for obj in (plain, reg)]
    assert not torch.allclose(grads[0], grads[1])
    with pytest.raises(ValueError, match="koleo_weight"):
        tiny_dino(koleo_weight=-1.0)


def test_forward_rejects_views_without_two_global_crops():
    obj = tiny_dino()
    obj.setup_schedule(5, 10)
    views = make_views(0)
    with pytest.raises(ValueError, match="global views"):
        obj([views[0], views[2], views[3]], 0)


# ----------------------------------------------------------------------------------------------- schedules


def test_schedules_match_formulas():
    obj = tiny_dino(warmup_teacher_temp=0.04, teacher_temp=0.07, warmup_teacher_temp_epochs=3,
                    momentum_teacher=0.996)
    obj.setup_schedule(steps_per_epoch=10, total_steps=200)
    warmup = np.linspace(0.04, 0.07, 31)  # per step over 30 steps, then flat
    for step in (0, 1, 15, 29, 30, 31, 199):
        expected = warmup[step] if step <= 30 else 0.07
        assert obj.teacher_temp(step) == pytest.approx(expected, abs=1e-12)
    # official cosine_scheduler(0.996, 1, epochs, niter_per_ep): end + (start - end)/2 * (1 + cos(pi i / n))
    cos = 1.0 + 0.5 * (0.996 - 1.0) * (1 + np.cos(np.pi * np.arange(200) / 200))
    for step in (0, 1, 57, 100, 199):
        assert obj.momentum(step) == pytest.approx(cos[step], abs=1e-12)
    assert obj.momentum(0) == pytest.approx(0.996) and obj.momentum(200) == pytest.approx(1.0)
    assert teacher_temp_at(5, 0, 0.04, 0.07) == 0.07  # no warmup
    out = obj(make_views(0), 15)
    assert out["teacher_temp"].item() == pytest.approx(warmup[15])
    assert ema_momentum_at(50, 100, 0.99) == pytest.approx(1 - 0.01 * (1 + math.cos(math.pi / 2)) / 2)


# ----------------------------------------------------------------------------------------------- resume


def test_resume_continues_exactly():
    kw = {"freeze_last_layer": 2, "warmup_teacher_temp_epochs": 2, "momentum_teacher": 0.9}  # 4 steps each

    def fresh(seed: int) -> tuple[DINO, torch.optim.Optimizer]:
        obj = tiny_dino(seed, **kw)
        obj.setup_schedule(steps_per_epoch=2, total_steps=8)
        return obj, torch.optim.AdamW(trainable(obj), lr=1e-2, weight_decay=0.05)

    a, opt_a = fresh(0)
    for step in range(3):
        train_step(a, opt_a, make_views(step), step)
    saved = copy.deepcopy({"objective": a.state_dict(), "optimizer": opt_a.state_dict()})
    ref = [train_step(a, opt_a, make_views(step), step) for step in range(3, 6)]

    b, opt_b = fresh(1)  # different initial weights: everything must come from the state dicts
    b.load_state_dict(saved["objective"])
    opt_b.load_state_dict(saved["optimizer"])
    got = [train_step(b, opt_b, make_views(step), step) for step in range(3, 6)]

    for r, g in zip(ref, got):
        for k in r:
            torch.testing.assert_close(g[k], r[k], rtol=0, atol=0)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(vb, va, rtol=0, atol=0, msg=k)


# ----------------------------------------------------------------------------------------------- DDP


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        obj = tiny_dino(0, center_momentum=0.8)  # same seed: same weights on both ranks
        obj.setup_schedule(5, 10)
        full = make_views(7, batch=BATCH * world)
        views = [v[rank * BATCH:(rank + 1) * BATCH] for v in full]  # each rank a different batch
        with torch.no_grad():  # the center single-process training on the concatenated batch would get
            t_full = torch.stack([obj.teacher["head"](obj.teacher["encoder"](v)) for v in full[:2]])
            expected = 0.8 * obj.center + 0.2 * t_full.mean(dim=(0, 1))
        model = torch.nn.parallel.DistributedDataParallel(obj)
        opt = torch.optim.AdamW(trainable(obj), lr=1e-3)
        out = model(views, 0)
        out["loss"].backward()
        obj.on_after_backward(0)
        opt.step()
        obj.on_step_end(0)
        torch.save({"center": obj.center.clone(), "expected": expected,
                    "teacher": obj.teacher["encoder"].model.cls_token.detach().clone()},
                   Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.ddp
def test_ddp_center_is_global_mean(tmp_path):
    world = 2
    mp.spawn(_ddp_worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in range(world))
    assert torch.equal(r0["center"], r1["center"])
    torch.testing.assert_close(r0["center"], r0["expected"], rtol=1e-5, atol=1e-6)
    assert torch.equal(r0["teacher"], r1["teacher"])


# ----------------------------------------------------------------------------------------------- recipes


RECIPES = Path(__file__).resolve().parent.parent / "recipes"


@pytest.mark.parametrize("recipe", ["dino_vit_tiny_fmnist", "dino_resnet18_cifar10", "dino_vit_small_imagenet",
                                    "dinov2_vit_small_imagenet"])
def test_recipes_validate(recipe):
    cfg = load_recipe(RECIPES / f"{recipe}.yaml")
    assert cfg.objective.name == "dino" and cfg.augment.name == "multicrop"
    assert cfg.optim.clip_mode == "per_param"


def test_dino_needs_multicrop():
    # The check asks the pipeline what it makes: two global views (with or without local crops) are DINO's
    # input whatever the augmentation is called; one view is not.
    with pytest.raises(ConfigError, match="needs two views of one size"):
        resolve({"objective": {"name": "dino"}, "augment": {"name": "mae", "image_size": 32}})
    assert resolve({"objective": {"name": "dino"}, "augment": {"name": "simclr"}}).augment.name == "simclr"
    with pytest.raises(ConfigError, match="freeze_last_layr"):
        resolve({"objective": {"name": "dino", "freeze_last_layr": 1}, "augment": {"name": "multicrop"}})


# ----------------------------------------------------------------------------------------------- attention maps


def test_attention_recomputation_matches_unfused_timm():
    from sslkit.viz.attention import attention_maps, last_block_attention

    obj = tiny_dino()
    enc = obj.teacher["encoder"].eval()
    images = torch.randn(2, 3, GLOBAL, GLOBAL)
    attn = enc.model.blocks[-1].attn
    ref = []
    attn.fused_attn = False  # timm's explicit path passes the softmax matrix through attn_drop
    hook = attn.attn_drop.register_forward_hook(lambda m, i, o: ref.append(i[0]))
    enc(images)
    hook.remove()
    attn.fused_attn = True
    got = last_block_attention(enc, images)  # (B, heads, N, N)
    torch.testing.assert_close(got, ref[0], rtol=1e-5, atol=1e-6)
    maps = attention_maps(enc, images)
    assert maps.shape == (2, 2, GLOBAL // 4, GLOBAL // 4)
    torch.testing.assert_close(maps.flatten(2), ref[0][:, :, 0, 1:])
    assert attention_maps(enc, torch.randn(1, 3, 28, 28)).shape == (1, 2, 7, 7)  # other sizes interpolate


def test_attention_cli_writes_one_png_per_image(tmp_path, capsys):
    import argparse

    from omegaconf import OmegaConf
    from PIL import Image

    from sslkit.run import save_encoder
    from sslkit.viz import attention

    cfg = resolve({"data": {"name": "synthetic", "args": {"num_samples": 4, "image_size": GLOBAL}},
                   "augment": {"name": "multicrop", "image_size": GLOBAL, "local_size": LOCAL},
                   "encoder": {"name": "vit_tiny_patch4_32", "img_size": GLOBAL, "depth": 1, "embed_dim": 24,
                               "num_heads": 2},
                   "objective": {"name": "dino", "out_dim": OUT_DIM}})
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    OmegaConf.save(cfg, run_dir / "config.yaml")
    save_encoder(ENCODERS.build("vit_tiny_patch4_32", img_size=GLOBAL, depth=1, embed_dim=24, num_heads=2),
                 run_dir / "encoder.safetensors")
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(tmp_path / "x.png")

    parser = argparse.ArgumentParser()
    attention.add_arguments(parser)
    args = parser.parse_args([str(run_dir), str(tmp_path / "x.png"), "--from-dataset", "2", "--out",
                              str(tmp_path / "out")])
    assert attention.run(args) == 0
    pngs = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert len(pngs) == 3 and "x_attention.png" in pngs
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", name) for name in pngs), pngs
    assert Image.open(tmp_path / "out" / "x_attention.png").size[0] > Image.open(tmp_path / "x.png").size[0]


def test_attention_needs_a_vit():
    from sslkit.viz.attention import attention_maps

    with pytest.raises(TypeError, match="attention maps need a ViT encoder"):
        attention_maps(ENCODERS.build("resnet18_cifar"), torch.randn(1, 3, 16, 16))


# ----------------------------------------------------------------------------------------------- through the engine


def test_engine_resume_is_bit_exact_for_dino(tiny_recipe):
    """The real loop (per-parameter clipping, wd schedule, checkpoint) resumes teacher and center exactly."""
    from safetensors.torch import load_file

    from sslkit.engine import load_checkpoint, train

    def recipe(name: str) -> dict:
        raw = tiny_recipe(name=name, data={"args": {"num_samples": 32, "image_size": GLOBAL}, "batch_size": 8},
                          encoder={"img_size": GLOBAL, "depth": 1, "embed_dim": 24},
                          optim={"clip_grad": 3.0, "clip_mode": "per_param", "weight_decay": 0.04,
                                 "weight_decay_end": 0.4})
        raw["augment"] = {"name": "multicrop", "image_size": GLOBAL, "local_size": LOCAL, "num_local": 2,
                          "preset": "small"}
        raw["objective"] = {"name": "dino", "out_dim": OUT_DIM, "head_hidden_dim": 32, "head_bottleneck_dim": 16,
                            "freeze_last_layer": 1, "warmup_teacher_temp_epochs": 1, "momentum_teacher": 0.9}
        return raw

    full = train(resolve(recipe("full"))).run_dir  # 2 epochs x 4 steps
    part = train(resolve(recipe("split")), stop_at_step=3)
    resumed = train(resolve(recipe("split")), resume=part.run_dir).run_dir
    a, b = load_file(full / "encoder.safetensors"), load_file(resumed / "encoder.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    ca = load_checkpoint(full / "checkpoints" / "last.ckpt")["objective"]
    cb = load_checkpoint(resumed / "checkpoints" / "last.ckpt")["objective"]
    assert torch.equal(ca["center"], cb["center"]) and ca["center"].abs().sum() > 0
    assert all(torch.equal(v, cb[k]) for k, v in ca.items())
