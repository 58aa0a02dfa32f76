"""Linear probe: separable features are learned, shuffled labels are not, the test set is not used to choose."""

from __future__ import annotations

import pytest
import torch

from sslkit.eval.linear import fit_linear_heads, linear_probe, split_train_val, topk_accuracy


def separable(n, d=20, c=5, seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, c, generator=g)
    x = torch.randn(n, d, generator=g) * scale
    return x, (x @ w).argmax(dim=1)


@pytest.mark.parametrize("batchnorm", [False, True])
def test_linearly_separable_above_95(batchnorm):
    x, y = separable(2400, seed=1)
    res = linear_probe(x[:2000], y[:2000], x[2000:], y[2000:], epochs=30, batch_size=256, batchnorm=batchnorm,
                       lrs=(0.1, 1.0), weight_decays=(0.0, 1e-4))
    assert res["top1"] > 95.0
    assert res["best"]["lr"] in (0.1, 1.0) and len(res["sweep"]) == 4
    assert res["settings"]["num_val"] == 200


def test_feature_scale_handled_by_batchnorm():
    x, y = separable(1200, seed=2, scale=1000.0)  # huge features: plain SGD at these lrs would diverge
    res = linear_probe(x[:1000], y[:1000], x[1000:], y[1000:], epochs=20, batch_size=128, batchnorm=True,
                       lrs=(0.1,), weight_decays=(0.0,))
    assert res["top1"] > 90.0


def test_shuffled_labels_near_chance():
    x, y = separable(1500, c=5, seed=3)
    y_shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]
    res = linear_probe(x[:1000], y_shuffled[:1000], x[1000:], y_shuffled[1000:], epochs=20, batch_size=128)
    assert res["top1"] < 20.0 + 10.0  # chance is 20%


def test_full_batch_equals_one_head_of_a_sweep():
    x, y = separable(300, seed=4)
    alone = fit_linear_heads(x, y, 5, lrs=[0.5], weight_decays=[1e-3], epochs=5, batch_size=None)
    grid = fit_linear_heads(x, y, 5, lrs=[0.1, 0.5], weight_decays=[0.0, 1e-3], epochs=5, batch_size=None)
    torch.testing.assert_close(alone.weight[0], grid.weight[1], rtol=1e-4, atol=1e-6)


def test_selection_ignores_test_labels():
    x, y = separable(900, seed=5)
    a = linear_probe(x[:600], y[:600], x[600:], y[600:], epochs=5, batch_size=64)
    b = linear_probe(x[:600], y[:600], x[600:], torch.zeros(300, dtype=torch.long), epochs=5, batch_size=64)
    assert a["best"] == b["best"] and a["sweep"] == b["sweep"]


def test_helpers():
    fit, val = split_train_val(10, 0.2)
    assert len(val) == 2 and len(set(fit.tolist()) | set(val.tolist())) == 10
    logits = torch.tensor([[3.0, 2.0, 1.0], [0.0, 1.0, 2.0]])
    assert topk_accuracy(logits, torch.tensor([1, 2])) == (50.0, 100.0)
    with pytest.raises(ValueError):
        split_train_val(10, 1.5)


def test_paper_path_trains_head_and_keeps_encoder_frozen():
    from test_eval_features import TinyEncoder, tiny_dataset

    from sslkit.eval.linear import linear_probe_images

    enc, ds = TinyEncoder(), tiny_dataset(n=24, size=12, channels=3)
    enc.train()
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    res = linear_probe_images(enc, ds, ds, image_size=12, epochs=2, batch_size=8, progress=False)
    assert 0.0 <= res["top1"] <= res["top5"] <= 100.0 and res["train_loss"] == res["train_loss"]  # not NaN
    assert res["settings"]["scaled_lr"] == pytest.approx(0.1 * 8 / 256)
    after = enc.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and BN statistics untouched
    assert enc.training
