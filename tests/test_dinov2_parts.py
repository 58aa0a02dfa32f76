"""DINOv2's parts in the DINO objective: block masks, iBOT on masked patch tokens, Sinkhorn-Knopp centering."""

import pytest
import torch
from safetensors.torch import load_file

from sslkit.augment.masking import block_mask, block_masks
from sslkit.config import ConfigError, resolve
from sslkit.engine import load_checkpoint, train


def test_block_masks_hit_their_share_in_contiguous_blocks():
    torch.manual_seed(0)
    m = block_mask((14, 14), 60)
    assert 0 < int(m.sum()) <= 60 and int(m.sum()) >= 50, int(m.sum())
    # Blocks, not scattered patches: most masked patches have a masked 4-neighbour.
    padded = torch.nn.functional.pad(m.float()[None, None], (1, 1, 1, 1))[0, 0]
    neighbours = padded[:-2, 1:-1] + padded[2:, 1:-1] + padded[1:-1, :-2] + padded[1:-1, 2:]
    assert (neighbours[m] > 0).float().mean() > 0.9
    masks = block_masks(400, (8, 8), (0.1, 0.5), probability=0.5)
    masked_images = masks.any(dim=1)
    assert 0.4 < masked_images.float().mean() < 0.6, "about half of the crops are masked"
    shares = masks[masked_images].float().mean(dim=1)
    assert shares.min() >= 0.05 and shares.max() <= 0.5


def _recipe(tmp_path, name: str, **objective) -> dict:
    return {"name": name, "output_dir": str(tmp_path / "runs"),
            "data": {"name": "synthetic", "args": {"num_samples": 48, "image_size": 32}, "batch_size": 16,
                     "num_workers": 0},
            "augment": {"name": "multicrop", "image_size": 32, "local_size": 16, "num_local": 2, "preset": "small"},
            "encoder": {"name": "vit_tiny_patch4_32", "depth": 2, "embed_dim": 64, "num_heads": 2, "reg_tokens": 2},
            "objective": {"name": "dino", "out_dim": 64, "head_hidden_dim": 32, "head_bottleneck_dim": 16,
                          "ibot_weight": 1.0, "ibot_mask_probability": 1.0, **objective},
            "optim": {"name": "adamw", "lr": 1e-3},
            "trainer": {"epochs": 2, "progress": False, "log_every_steps": 1, "checkpoint_every_steps": 0},
            "eval": {"final_knn": False}}


@pytest.mark.parametrize("objective", [{}, {"centering": "sinkhorn_knopp", "ibot_separate_head": True}])
def test_ibot_trains_and_resumes_bit_exact_mid_epoch(tmp_path, objective):
    full = train(resolve(_recipe(tmp_path, "full", **objective)))
    part = train(resolve(_recipe(tmp_path, "split", **objective)), stop_at_step=4)  # mid-epoch (3 steps/epoch)
    resumed = train(resolve(_recipe(tmp_path, "split", **objective)), resume=part.run_dir)
    a, b = (load_checkpoint(r.run_dir / "checkpoints" / "last.ckpt")["objective"] for r in (full, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a), "masks, teacher, centers and mask token continue exactly"
    assert "encoder.mask_token" in a and ("ibot_head.last_layer.parametrizations.weight.original1" in a) == bool(
        objective.get("ibot_separate_head"))
    assert not torch.equal(a["encoder.mask_token"], torch.zeros_like(a["encoder.mask_token"])), "the mask token learns"
    import csv

    with open(full.run_dir / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("ibot")]
    assert len(rows) == 6 and all(float(r["ibot"]) > 0 and float(r["masked_share"]) > 0 for r in rows)
    w = load_file(full.run_dir / "encoder.safetensors")
    assert "mask_token" in w


def test_an_ibot_run_evaluates_with_other_encoder_args(tmp_path):
    """The weights of an iBOT run carry the learned mask token, which the recipe's encoder arguments do not build:
    the final k-NN with eval.encoder_args and every later load (`sslkit eval`, viz) still take them, and the
    features are the trained encoder's."""
    from sslkit.eval.report import load_context
    from sslkit.run import load_encoder

    raw = _recipe(tmp_path, "ibot_eval")
    raw["trainer"]["epochs"] = 1
    raw["eval"] = {"final_knn": True, "knn_train_subset": 32, "knn_test_subset": 16, "knn_k": 5,
                   "encoder_args": {"pool": "grid", "pool_grid": 2}}
    result = train(resolve(raw))
    assert result.knn is not None and "top1" in result.knn
    enc, _ = load_encoder(result.run_dir)
    assert enc.pool == "grid" and enc.mask_token is not None
    w = load_file(result.run_dir / "encoder.safetensors")
    torch.testing.assert_close(enc.mask_token.detach(), w["mask_token"])
    token, _ = load_encoder(result.run_dir, encoder_args={"pool": "token"})
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(token(x), token.forward_tokens(x).cls)
    ctx = load_context(result.run_dir, progress=False, test_subset=8, train_subset=8, use_cache=False)
    assert ctx.features("train").features.shape[1] == 64 * 2 * 2


def test_ibot_needs_a_vit(tmp_path):
    raw = _recipe(tmp_path, "cnn")
    raw["encoder"] = {"name": "resnet_cifar", "widths": [8, 16], "depths": [1, 1]}
    with pytest.raises(ConfigError, match="needs a ViT"):
        train(resolve(raw))
