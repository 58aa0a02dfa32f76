"""MAE objective, augmentation, recipes and reconstructions (He et al. 2022)."""

import argparse
import math

import pytest
import torch
import yaml
from lightly.models import utils as lightly_utils
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from sslkit.config import load_recipe, resolve
from sslkit.objectives.mae import (
    MAE,
    MAEConfig,
    masked_mse,
    normalize_patches,
    num_visible,
    patchify,
    random_masking,
    sincos_2d,
    unpatchify,
)
from sslkit.plugins import load_all
from sslkit.registry import AUGMENTATIONS, DATASETS, ENCODERS, OBJECTIVES

load_all()

TINY_DECODER = dict(decoder_dim=64, decoder_depth=1, decoder_heads=4)


def _mae(seed: int = 0, img_size: int = 32, depth: int = 2, dim: int = 64, **cfg) -> MAE:
    torch.manual_seed(seed)
    enc = ENCODERS.build("vit_tiny_patch4_32", img_size=img_size, depth=depth, embed_dim=dim, num_heads=2)
    return OBJECTIVES.build("mae", encoder=enc, cfg=MAEConfig(**{**TINY_DECODER, **cfg}))


# ---------------------------------------------------------------------------------------------- masking
@pytest.mark.parametrize("L", [16, 49, 64, 196])
@pytest.mark.parametrize("ratio", [0.5, 0.6, 0.75, 0.9])
def test_masking_keeps_round_of_visible_patches(L, ratio):
    torch.manual_seed(L)
    B = 8
    ids_keep, mask, ids_restore = random_masking(B, L, ratio)
    K = round(L * (1 - ratio))
    assert ids_keep.shape == (B, K)
    assert mask.shape == (B, L) and ids_restore.shape == (B, L)
    assert torch.equal(mask.sum(1), torch.full((B,), float(L - K)))  # exactly K visible in every sample
    assert torch.all(torch.gather(mask, 1, ids_keep) == 0)  # the kept patches are the unmasked ones
    assert len({tuple(m.tolist()) for m in mask}) == B  # masks differ across the batch


def test_num_visible_rounds_not_truncates():
    # int(100 * (1 - 0.9)) == 9 by floating-point error; the spec asks for round(): 10.
    assert num_visible(100, 0.9) == 10
    assert num_visible(49, 0.75) == 12 and num_visible(196, 0.75) == 49
    with pytest.raises(ValueError, match="visible"):
        num_visible(4, 0.9)  # round(0.4) = 0 visible


def test_ids_restore_inverts_the_shuffle():
    torch.manual_seed(1)
    B, L, D = 4, 49, 5
    x = torch.randn(B, L, D)
    ids_keep, mask, ids_restore = random_masking(B, L, 0.75)
    assert torch.equal(ids_restore.sort(1).values, torch.arange(L).expand(B, L))  # a permutation
    ids_shuffle = torch.argsort(ids_restore, dim=1)
    assert torch.equal(ids_shuffle[:, :ids_keep.shape[1]], ids_keep)
    shuffled = torch.gather(x, 1, ids_shuffle.unsqueeze(-1).expand(-1, -1, D))
    assert torch.equal(torch.gather(shuffled, 1, ids_restore.unsqueeze(-1).expand(-1, -1, D)), x)
    # What the decoder does: visible tokens followed by mask tokens, gathered back into patch order.
    visible = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, D))
    filler = torch.full((B, L - ids_keep.shape[1], D), float("nan"))
    restored = torch.gather(torch.cat([visible, filler], 1), 1, ids_restore.unsqueeze(-1).expand(-1, -1, D))
    vis = mask == 0
    assert torch.equal(restored[vis], x[vis]) and torch.isnan(restored[~vis]).all()


# --------------------------------------------------------------------------------------- patches, loss
@pytest.mark.parametrize("C", [1, 3])
@pytest.mark.parametrize("hw,p", [((8, 8), 4), ((12, 8), 4), ((28, 28), 4), ((32, 48), 16), ((28, 28), 7)])
def test_patchify_roundtrip(C, hw, p):
    x = torch.randn(2, C, *hw)
    patches = patchify(x, p)
    gh, gw = hw[0] // p, hw[1] // p
    assert patches.shape == (2, gh * gw, p * p * C)
    # Patch (r, c) is the (p, p, C) block at rows r*p.., columns c*p.. (official layout).
    r, c = gh - 1, 0
    block = x[:, :, r * p:(r + 1) * p, c * p:(c + 1) * p].permute(0, 2, 3, 1).reshape(2, -1)
    assert torch.equal(patches[:, r * gw + c], block)
    assert torch.equal(unpatchify(patches, p, (gh, gw)), x)
    if gh == gw:
        assert torch.equal(unpatchify(patches, p), x)
        assert torch.equal(patches, lightly_utils.patchify(x, p))  # same layout as lightly / official MAE


def test_patchify_rejects_sizes_not_divisible():
    with pytest.raises(ValueError, match=r"30x28.*patch size 4"):
        patchify(torch.randn(1, 3, 30, 28), 4)
    mae = _mae()
    with pytest.raises(ValueError, match="patch size"):
        mae([torch.randn(2, 3, 30, 32)])


def test_loss_ignores_visible_patches():
    torch.manual_seed(0)
    mae = _mae()
    imgs = torch.randn(3, 3, 32, 32)
    pred = torch.randn(3, 64, 48)
    _, mask, _ = random_masking(3, 64, 0.75)
    loss = mae.forward_loss(imgs, pred, mask)
    vis = (mask[0] == 0).nonzero()[0, 0]
    hid = (mask[0] == 1).nonzero()[0, 0]
    changed_visible = pred.clone()
    changed_visible[0, vis] += 10.0
    assert torch.equal(mae.forward_loss(imgs, changed_visible, mask), loss)
    changed_masked = pred.clone()
    changed_masked[0, hid] += 10.0
    assert mae.forward_loss(imgs, changed_masked, mask) > loss
    # Gradient reaches masked patches only.
    pred.requires_grad_(True)
    mae.forward_loss(imgs, pred, mask).backward()
    assert torch.all(pred.grad[mask == 0] == 0) and torch.all(pred.grad[mask == 1].abs().sum(-1) > 0)


@pytest.mark.parametrize("norm_pix", [True, False])
def test_loss_matches_formula(norm_pix):
    torch.manual_seed(0)
    mae = _mae(norm_pix_loss=norm_pix)
    imgs, pred = torch.randn(2, 3, 32, 32), torch.randn(2, 64, 48)
    _, mask, _ = random_masking(2, 64, 0.75)
    target = patchify(imgs, 4)
    if norm_pix:  # the official: (t - mean) / sqrt(var + 1e-6), unbiased var, per patch
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    per_patch = ((pred - target) ** 2).mean(-1)
    expected = per_patch[mask.bool()].mean()
    torch.testing.assert_close(mae.forward_loss(imgs, pred, mask), expected)
    torch.testing.assert_close(masked_mse(pred, target, mask), expected)
    normed, mean, std = normalize_patches(patchify(imgs, 4), 1e-6)
    torch.testing.assert_close(normed * std + mean, patchify(imgs, 4))


# ---------------------------------------------------------------------------------- position embedding
def test_sincos_matches_closed_form():
    D, gh, gw = 32, 3, 5
    pe = sincos_2d(D, (gh, gw))  # (1 + 15, 32)
    assert pe.shape == (1 + gh * gw, D) and torch.all(pe[0] == 0)  # cls slot
    q = D // 4
    for r, c in [(0, 0), (1, 3), (2, 4), (2, 0)]:
        row = pe[1 + r * gw + c]
        for k in [0, 1, q - 1]:
            w = 10000.0 ** (-k / q)
            assert math.isclose(row[k].item(), math.sin(c * w), abs_tol=1e-6)
            assert math.isclose(row[q + k].item(), math.cos(c * w), abs_tol=1e-6)
            assert math.isclose(row[2 * q + k].item(), math.sin(r * w), abs_tol=1e-6)
            assert math.isclose(row[3 * q + k].item(), math.cos(r * w), abs_tol=1e-6)


def test_sincos_matches_official_layout():
    ref = torch.from_numpy(lightly_utils.get_2d_sincos_pos_embed(64, 7, cls_token=True)).float()
    torch.testing.assert_close(sincos_2d(64, (7, 7)), ref, atol=1e-6, rtol=0)


def test_decoder_and_encoder_position_embeddings_are_fixed():
    mae = _mae()
    dec = mae.decoder
    assert "pos_embed" in dict(dec.named_buffers()) and "pos_embed" not in dict(dec.named_parameters())
    torch.testing.assert_close(dec.pos_embed[0], sincos_2d(64, (8, 8)))
    pe = mae.encoder.model.pos_embed
    assert not pe.requires_grad
    torch.testing.assert_close(pe[0].detach(), sincos_2d(64, (8, 8)))
    learned = _mae(encoder_sincos_pos_embed=False).encoder.model.pos_embed
    assert learned.requires_grad


def test_init_and_weight_decay_exclusions():
    mae = _mae()
    assert mae.decoder.mask_token.std().item() == pytest.approx(0.02, rel=0.5)
    w = mae.decoder.embed.weight  # xavier-uniform: |w| <= sqrt(6 / (fan_in + fan_out))
    assert w.abs().max() <= math.sqrt(6 / sum(w.shape)) and w.abs().max() > 0.5 * math.sqrt(6 / sum(w.shape))
    assert torch.all(mae.decoder.embed.bias == 0)
    nwd = mae.no_weight_decay()
    names = dict(mae.named_parameters())
    assert "decoder.mask_token" in nwd and "encoder.model.cls_token" in nwd
    assert {"decoder.mask_token", "encoder.model.cls_token"} <= set(names)
    assert "decoder.mask_token" in mae.state_dict()
    assert mae.eval_encoder() is mae.encoder


# ----------------------------------------------------------------------------------------------- compute
def _flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def test_encoder_flops_scale_with_visible_patches():
    # 64 patches at 32 px, 16 visible. The blocks' linear layers (~all the FLOPs here) scale with the
    # tokens: (1 + 16) / (1 + 64) = 0.26 (the CLS token is never masked). The attention's quadratic term
    # scales with 17^2 / 65^2 = 0.07 and pulls the ratio below that; the patch embedding runs on the full
    # image in both cases and pulls it up, by <1% here. Hence a ratio within [0.2, 0.35] and well below
    # 0.5, which an encoder running on all patches would fail (ratio 1).
    mae = _mae(depth=2, dim=192)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        full = _flops(lambda: mae.encoder.forward_tokens(x))
        masked = _flops(lambda: mae.forward_encoder(x, 0.75))
        latent, _, _ = mae.forward_encoder(x, 0.75)
    assert 0.2 <= masked / full <= 0.35, masked / full
    assert latent.shape == (2, 1 + 16, 192)  # cls + visible tokens only


# ---------------------------------------------------------------------------------------------- training
def _batches(num_steps: int, batch: int, seed: int = 0) -> list[torch.Tensor]:
    """MAE views of synthetic shapes (32 px), made with the registered `mae` augmentation."""
    ds = DATASETS.build("synthetic", num_samples=batch * 4, image_size=32, seed=seed)
    pipe = AUGMENTATIONS.build("mae", image_size=32)
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num_steps):
        idx = torch.randint(len(ds), (batch,), generator=g)
        out.append(torch.stack([pipe(ds[int(i)][0])[0] for i in idx]))
    return out


def _step(mae: MAE, opt: torch.optim.Optimizer, x: torch.Tensor, step: int) -> float:
    out = mae([x], step)
    opt.zero_grad(set_to_none=True)
    out["loss"].backward()
    mae.on_after_backward(step)
    opt.step()
    mae.on_step_end(step)
    return out["loss"].item()


def _optimizer(mae: MAE, lr: float = 2e-3) -> torch.optim.Optimizer:
    return torch.optim.AdamW([p for p in mae.parameters() if p.requires_grad], lr=lr, betas=(0.9, 0.95),
                             weight_decay=0.05)


def test_short_run_lowers_reconstruction_loss():
    batches = _batches(40, 32)
    mae = _mae(depth=2, dim=64)
    opt = _optimizer(mae)
    losses = [_step(mae, opt, x, i) for i, x in enumerate(batches)]
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert all(math.isfinite(v) for v in losses)
    assert last < 0.8 * first, (first, last)
    # Predicting 0 (the mean of every normalised target patch) scores about 1: the model must beat that.
    assert last < 0.8, last


def test_resume_is_bit_exact():
    batches = _batches(7, 8)
    k = 4
    mae = _mae(seed=0)
    opt = _optimizer(mae)
    for i in range(k):
        _step(mae, opt, batches[i], i)
    state = {"objective": {n: t.clone() for n, t in mae.state_dict().items()},
             "optimizer": _clone(opt.state_dict()), "rng": torch.get_rng_state()}
    expected = [_step(mae, opt, batches[i], i) for i in range(k, len(batches))]

    resumed = _mae(seed=123)  # different init: everything must come from the saved state
    resumed.load_state_dict(state["objective"])
    opt2 = _optimizer(resumed)
    opt2.load_state_dict(state["optimizer"])
    torch.manual_seed(999)  # disturb the RNG, then restore it
    torch.set_rng_state(state["rng"])
    got = [_step(resumed, opt2, batches[i], i) for i in range(k, len(batches))]
    assert got == expected


def _clone(obj):
    if isinstance(obj, torch.Tensor):
        return obj.clone()
    if isinstance(obj, dict):
        return {k: _clone(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_clone(v) for v in obj]
    return obj


def test_bf16_autocast_gives_float32_loss_and_other_sizes_work():
    mae = _mae()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = mae([torch.randn(2, 3, 32, 32)])["loss"]
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss = mae([torch.randn(2, 3, 24, 40)])["loss"]  # non-square, not the training grid
    assert torch.isfinite(loss)
    with pytest.raises(ValueError, match="one view"):
        mae([torch.randn(2, 3, 32, 32)] * 2)


def test_rejects_cnn_and_bad_config():
    with pytest.raises(ValueError, match="ViT"):
        OBJECTIVES.build("mae", encoder=ENCODERS.build("resnet18_cifar"), cfg=MAEConfig())
    with pytest.raises(ValueError, match="mask_ratio"):
        _mae(mask_ratio=1.0)
    with pytest.raises(ValueError, match="divisible"):
        _mae(decoder_dim=66, decoder_heads=4)


# ------------------------------------------------------------------------------------ augment, recipes
def test_mae_augmentation_one_view():
    pipe = AUGMENTATIONS.build("mae", image_size=28)
    img = torch.randint(0, 256, (3, 40, 36), dtype=torch.uint8)
    views = pipe(img)
    assert pipe.num_views == 1 and len(views) == 1 and views[0].shape == (3, 28, 28)
    assert views[0].dtype == torch.float32
    with pytest.raises(ValueError, match="crop_scale"):
        AUGMENTATIONS.build("mae", crop_scale=[0.5, 0.2])
    assert list(__import__("inspect").signature(AUGMENTATIONS.get("mae").factory).parameters)[0] == "image_size"


@pytest.mark.parametrize("recipe", ["recipes/mae_vit_tiny_fmnist.yaml", "recipes/mae_vit_base_imagenet.yaml"])
def test_recipes_resolve(recipe):
    cfg = load_recipe(recipe)
    assert cfg.objective.name == "mae" and cfg.augment.name == "mae"
    assert list(cfg.optim.betas) == [0.9, 0.95] and cfg.optim.weight_decay == 0.05


def test_fmnist_recipe_builds_and_steps():
    from sslkit.config import section_kwargs
    from sslkit.run import build_encoder

    cfg = load_recipe("recipes/mae_vit_tiny_fmnist.yaml")
    mae = MAE(build_encoder(cfg), MAEConfig(**section_kwargs(cfg.objective)))
    pipe = AUGMENTATIONS.build("mae", **section_kwargs(cfg.augment))
    img = torch.randint(0, 256, (3, 28, 28), dtype=torch.uint8)  # Fashion-MNIST size, grey expanded to 3
    out = mae([torch.stack([pipe(img)[0] for _ in range(2)])])
    assert torch.isfinite(out["loss"])
    assert mae.decoder.pos_embed.shape[1] == 1 + 49


def test_single_view_objective_rejects_pair_augmentation(tiny_recipe):
    from sslkit.config import ConfigError

    with pytest.raises(ConfigError, match="one view"):
        resolve({**tiny_recipe(), "objective": {"name": "mae", **TINY_DECODER}})


# ---------------------------------------------------------------------------------------- reconstruction
def _fake_run(tmp_path, tiny_recipe) -> tuple:
    raw = {**tiny_recipe(), "augment": {"name": "mae", "image_size": 32},
           "objective": {"name": "mae", **TINY_DECODER}}
    cfg = resolve(raw)
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    torch.manual_seed(0)
    from sslkit.run import build_encoder

    mae = MAE(build_encoder(cfg), MAEConfig(**TINY_DECODER))
    torch.save({"format": "sslkit", "objective": mae.state_dict()}, run / "checkpoints" / "last.ckpt")
    return run, mae, cfg


def test_reconstruction_panels_and_png(tmp_path, tiny_recipe):
    from sslkit.viz import reconstruct

    run, mae, cfg = _fake_run(tmp_path, tiny_recipe)
    loaded, _ = reconstruct.load_mae(run)
    for k, v in mae.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    images = reconstruct.sample_images(cfg, "test", 3, seed=0)
    panels = reconstruct.reconstruction_panels(loaded, images, seed=0)
    assert panels.shape == (3, 4, 3, 32, 32) and panels.min() >= 0 and panels.max() <= 1
    original, masked, recon, pasted = panels.unbind(1)
    # Visible pixels are the original's in the masked and pasted panels; about 75% of pixels are hidden.
    visible = (masked == original).all(1)
    assert torch.equal(pasted.permute(0, 2, 3, 1)[visible], original.permute(0, 2, 3, 1)[visible])
    assert 0.15 < visible.float().mean() < 0.35
    # norm_pix de-normalisation: a perfect prediction (the normalised target) gives back the original.
    _, mean, std = normalize_patches(patchify(images, 4), 1e-6)
    torch.testing.assert_close(unpatchify(loaded.target(images) * std + mean, 4), images, atol=1e-5, rtol=0)

    parser = argparse.ArgumentParser()
    reconstruct.add_arguments(parser)
    out = tmp_path / "recon.png"
    assert reconstruct.run(parser.parse_args([str(run), "--num", "2", "--out", str(out)])) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_reconstruction_reads_a_sharded_checkpoint(tmp_path, tiny_recipe):
    # trainer.strategy=fsdp: last.ckpt names a distributed checkpoint folder that holds the objective's weights.
    from sslkit.engine.fsdp import save_sharded
    from sslkit.viz import reconstruct

    run, mae, _ = _fake_run(tmp_path, tiny_recipe)
    with torch.no_grad():
        for p in mae.parameters():
            p.add_(0.01)  # weights that differ from a fresh build
    opt = torch.optim.AdamW(mae.parameters())
    folder = save_sharded(run / "checkpoints", 3, mae, opt, {})
    torch.save({"format": "sslkit", "sharded": folder.name}, run / "checkpoints" / "last.ckpt")
    loaded, _ = reconstruct.load_mae(run)
    for k, v in mae.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_reconstruction_needs_an_mae_run(tmp_path):
    from sslkit.run import RunError
    from sslkit.viz import reconstruct

    run = tmp_path / "r"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"objective": {"name": "simclr"}}))
    with pytest.raises(RunError, match="MAE"):
        reconstruct.load_mae(run)
