"""Fine-tuning: the documented lr per ViT block, the encoder moves (and the linear probe leaves it alone), the
class-balanced label fraction, and a resumed fine-tune equal to an uninterrupted one."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from omegaconf import OmegaConf

from sslkit.config import resolve
from sslkit.data.base import TensorImageDataset
from sslkit.eval.features import encoder_hash
from sslkit.eval.finetune import Classifier, finetune, param_groups, set_lr
from sslkit.eval.linear import balanced_subset, linear_probe_images
from sslkit.registry import ENCODERS
from sslkit.run import build_encoder, save_encoder


def _mae_layer_id(name: str, num_layers: int) -> int:
    """MAE's ``get_layer_id_for_vit`` (util/lr_decay.py), written out: embeddings 0, block i -> i + 1, rest L."""
    if name.startswith(("cls_token", "pos_embed", "reg_token", "patch_embed")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_layers


def test_layer_decay_gives_the_documented_lr_per_block():
    depth, decay, lr = 3, 0.65, 1e-3
    enc = ENCODERS.build("vit_tiny_patch4_32", depth=depth, embed_dim=32, num_heads=2, reg_tokens=2)
    model = Classifier(enc, 5)
    opt = torch.optim.AdamW(param_groups(model, 0.05, decay))
    set_lr(opt, lr)
    got = {id(p): (g["lr"], g["weight_decay"]) for g in opt.param_groups for p in g["params"]}
    num_layers = depth + 1
    names = dict(model.named_parameters())
    assert len(got) == len(names), "every parameter is optimised exactly once"
    for name, p in names.items():
        inner = name.removeprefix("encoder.model.")
        want = lr if name.startswith("head.") else lr * decay ** (num_layers - _mae_layer_id(inner, num_layers))
        assert got[id(p)][0] == pytest.approx(want, rel=1e-12), name
        no_wd = p.ndim <= 1 or inner in ("cls_token", "pos_embed", "reg_token")
        assert got[id(p)][1] == (0.0 if no_wd else 0.05), name
    assert got[id(names["encoder.model.blocks.0.attn.qkv.weight"])][0] == pytest.approx(lr * decay ** 3)


def _data(n: int, seed: int) -> TensorImageDataset:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    images = torch.randint(0, 60, (n, 3, 16, 16), generator=g, dtype=torch.uint8)
    images[labels == 1, :, 4:12, 4:12] = 230  # class 1: a bright square
    return TensorImageDataset(images, labels, ["dark", "square"], f"test data {seed}")


def _cnn() -> torch.nn.Module:
    torch.manual_seed(0)
    return ENCODERS.build("resnet_cifar", widths=[8, 16], depths=[1, 1])


def test_finetuning_changes_the_encoder_and_the_linear_probe_does_not():
    train, test = _data(32, 0), _data(16, 1)
    enc = _cnn()
    before = copy.deepcopy(enc.state_dict())
    probed = linear_probe_images(enc, train, test, image_size=16, epochs=1, batch_size=16, device="cpu",
                                 progress=False)
    assert 0 <= probed["top1"] <= 100 and encoder_hash(enc) == encoder_hash(_cnn())
    for k, v in enc.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0)  # weights and BatchNorm statistics
    model = Classifier(enc, 2)
    res = finetune(model, train, test, image_size=16, epochs=2, batch_size=16, base_lr=1e-2, warmup_epochs=0,
                   device="cpu", progress=False)
    moved = [k for k, v in model.encoder.state_dict().items() if not torch.equal(v, before[k])]
    assert any("conv1.weight" in k for k in moved) and any("running_mean" in k for k in moved)
    assert len(res["history"]) == 2 and 0 <= res["top1"] <= 100


def test_label_fraction_is_class_balanced_and_fixed():
    labels = torch.tensor([0] * 300 + [1] * 100 + [2] * 50 + [-1] * 7)[torch.randperm(457,
                          generator=torch.Generator().manual_seed(3))]
    idx = balanced_subset(labels, 0.1, seed=0)
    counts = torch.bincount(labels[idx], minlength=3).tolist()
    assert counts == [30, 10, 5] and (labels[idx] >= 0).all() and len(set(idx.tolist())) == len(idx)
    assert torch.equal(idx, balanced_subset(labels.clone(), 0.1, seed=0))  # the same subset on every call
    assert not torch.equal(idx, balanced_subset(labels, 0.1, seed=1))
    assert torch.bincount(labels[balanced_subset(labels, 0.01)], minlength=3).tolist() == [3, 1, 1]  # >= 1 each
    with pytest.raises(ValueError, match="label fraction"):
        balanced_subset(labels, 0.0)


def test_resumed_finetune_equals_an_uninterrupted_one(tmp_path):
    train, test = _data(24, 0), _data(8, 1)
    kw = {"epochs": 3, "image_size": 16, "batch_size": 12, "base_lr": 1e-2, "device": "cpu", "progress": False,
          "settings": {"k": 1}}
    whole = Classifier(_cnn(), 2)
    res = finetune(whole, train, test, checkpoint=tmp_path / "a.ckpt", **kw)
    stopped = Classifier(_cnn(), 2)
    assert finetune(stopped, train, test, checkpoint=tmp_path / "b.ckpt", stop_at_epoch=1, **kw)["top1"] is None
    resumed = Classifier(_cnn(), 2)  # a fresh process: nothing but the checkpoint carries over
    again = finetune(resumed, train, test, checkpoint=tmp_path / "b.ckpt", resume=True, **kw)
    for k, v in resumed.state_dict().items():
        torch.testing.assert_close(v, whole.state_dict()[k], rtol=0, atol=0)
    assert again["top1"] == res["top1"] and again["history"] == res["history"]
    from sslkit.run import RunError

    with pytest.raises(RunError, match="other fine-tuning settings"):
        finetune(Classifier(_cnn(), 2), train, test, checkpoint=tmp_path / "b.ckpt", resume=True,
                 **{**kw, "settings": {"k": 2}})


def tiny_cnn_run(parent, num_samples: int, image_size: int):
    """A finished run directory of a tiny random CNN on synthetic labelled images (shared by the eval tests)."""
    run = parent / "tiny-1"
    run.mkdir()
    cfg = resolve({"name": "tiny", "data": {"name": "synthetic", "args": {"num_samples": num_samples,
                                                                          "image_size": image_size}},
                   "encoder": {"name": "resnet_cifar", "widths": [8, 16], "depths": [1, 1]},
                   "eval": {"image_size": image_size}})
    torch.manual_seed(0)
    save_encoder(build_encoder(cfg), run / "encoder.safetensors")
    OmegaConf.save(cfg, run / "config.yaml")
    return run


def test_cli_reports_finetune_next_to_the_linear_probe(tmp_path, capsys):
    from sslkit.cli import main

    run = tiny_cnn_run(tmp_path, num_samples=40, image_size=16)
    rc = main(["eval", "finetune", str(run), "--epochs", "1", "--batch-size", "16", "--label-fraction", "0.5",
               "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0 and "fine-tuned" in out and "linear probe (frozen)" in out
    res = json.loads((run / "eval" / "finetune" / "results.json").read_text())
    lin = json.loads((run / "eval" / "linear" / "results.json").read_text())
    assert res["metrics"]["linear_top1"] == lin["metrics"]["top1"]
    assert lin["settings"]["label_fraction"] == 0.5 and lin["settings"]["num_train"] == res["settings"]["train_images"]
    assert (run / "eval" / "finetune" / "checkpoints" / "last.ckpt").is_file()
    assert main(["eval", "finetune", str(run), "--label-fraction", "2", "--no-progress"]) == 2
    assert "label-fraction" in capsys.readouterr().err


def test_crop_scale_defaults_to_the_runs_pretraining_crops(tmp_path, capsys):
    from sslkit.cli import main
    from sslkit.eval.finetune import CROP_SCALE, run_crop_scale

    assert run_crop_scale(OmegaConf.create({"augment": {"name": "simclr", "crop_scale": [0.3, 1.0]}})) == (0.3, 1.0)
    assert run_crop_scale(OmegaConf.create({"augment": {"name": "multicrop", "global_scale": [0.5, 0.9]}})) == (0.5, 0.9)
    assert run_crop_scale(OmegaConf.create({"augment": {"name": "none"}})) == CROP_SCALE
    run = tiny_cnn_run(tmp_path, num_samples=40, image_size=16)
    recipe_scale = list(run_crop_scale(OmegaConf.load(run / "config.yaml")))
    args = ["eval", "finetune", str(run), "--epochs", "1", "--batch-size", "16", "--no-linear", "--no-progress"]
    assert main(args) == 0
    res = json.loads((run / "eval" / "finetune" / "results.json").read_text())
    assert res["settings"]["crop_scale"] == recipe_scale
    assert main([*args, "--crop-scale", "0.6", "0.9"]) == 0
    res = json.loads((run / "eval" / "finetune" / "results.json").read_text())
    assert res["settings"]["crop_scale"] == [0.6, 0.9]
    capsys.readouterr()
    assert main([*args, "--crop-scale", "0.9", "0.2"]) == 2
    assert "--crop-scale" in capsys.readouterr().err
