"""k-NN against a direct NumPy implementation of DINO's weighted vote."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sslkit.eval.knn import knn_classify


def numpy_knn(train_x, train_y, test_x, test_y, k, T, C):
    """Reference: brute-force cosine, top-k, exp(sim/T) weights summed per class (DINO eval_knn)."""
    tr = train_x / np.linalg.norm(train_x, axis=1, keepdims=True)
    te = test_x / np.linalg.norm(test_x, axis=1, keepdims=True)
    sim = te.astype(np.float64) @ tr.astype(np.float64).T  # (Q, N)
    k = min(k, len(tr))
    top1 = top5 = 0
    for q in range(len(te)):
        nn_idx = np.argsort(-sim[q], kind="stable")[:k]
        scores = np.zeros(C)
        for j in nn_idx:
            scores[train_y[j]] += np.exp(sim[q, j] / T)
        order = np.argsort(-scores, kind="stable")
        top1 += order[0] == test_y[q]
        voted = [c for c in order[:5] if scores[c] > 0]
        top5 += test_y[q] in voted
    return {"top1": 100.0 * top1 / len(te), "top5": 100.0 * top5 / len(te)}


def _data(n_train, n_test, d=16, c=7, seed=0):
    g = np.random.default_rng(seed)
    centers = g.normal(size=(c, d))
    ytr, yte = g.integers(0, c, n_train), g.integers(0, c, n_test)
    xtr = centers[ytr] + 1.5 * g.normal(size=(n_train, d))
    xte = centers[yte] + 1.5 * g.normal(size=(n_test, d))
    return (torch.tensor(xtr, dtype=torch.float32), torch.tensor(ytr), torch.tensor(xte, dtype=torch.float32),
            torch.tensor(yte))


@pytest.mark.parametrize("k", [1, 3, 10, 20, 500])
@pytest.mark.parametrize("T", [0.07, 0.5])
def test_knn_matches_numpy(k, T):
    xtr, ytr, xte, yte = _data(200, 60, seed=k)
    got = knn_classify(xtr, ytr, xte, yte, k=k, temperature=T, num_classes=7)
    want = numpy_knn(xtr.numpy(), ytr.numpy(), xte.numpy(), yte.numpy(), k, T, 7)
    assert got["top1"] == pytest.approx(want["top1"])
    assert got["top5"] == pytest.approx(want["top5"])


@pytest.mark.parametrize("n_test", [1, 3, 50])
def test_knn_chunk_size_independent(n_test):
    xtr, ytr, xte, yte = _data(150, n_test, seed=n_test)
    ref = knn_classify(xtr, ytr, xte, yte, k=[5, 20], chunk_size=10_000)
    for chunk in (1, 2, 7):
        assert knn_classify(xtr, ytr, xte, yte, k=[5, 20], chunk_size=chunk) == ref
    want = numpy_knn(xtr.numpy(), ytr.numpy(), xte.numpy(), yte.numpy(), 20, 0.07, 7)
    assert ref[20]["top1"] == pytest.approx(want["top1"])


def test_knn_list_and_int_agree_and_k_clipped():
    xtr, ytr, xte, yte = _data(3, 3, seed=1)  # bank of 3, k far larger
    many = knn_classify(xtr, ytr, xte, yte, k=[1, 200])
    assert set(many) == {1, 200}
    assert many[200] == knn_classify(xtr, ytr, xte, yte, k=200)
    assert many[200] == knn_classify(xtr, ytr, xte, yte, k=3)


def test_knn_perfect_on_separated_clusters_and_top5_k1():
    x = torch.eye(4).repeat(5, 1) + 0.01 * torch.randn(20, 4, generator=torch.Generator().manual_seed(0))
    y = torch.arange(4).repeat(5)
    res = knn_classify(x, y, x[:4] * 2, y[:4], k=1)
    assert res == {"top1": 100.0, "top5": 100.0}
    wrong = knn_classify(x, y, x[:4], (y[:4] + 1) % 4, k=1)  # with k=1 top-5 equals top-1 (DINO)
    assert wrong == {"top1": 0.0, "top5": 0.0}


def test_knn_rejects_bad_input():
    x, y = torch.randn(5, 3), torch.zeros(5, dtype=torch.long)
    with pytest.raises(ValueError, match="same D"):
        knn_classify(x, y, torch.randn(2, 4), y[:2])
    with pytest.raises(ValueError, match="k must be"):
        knn_classify(x, y, x, y, k=0)
    with pytest.raises(ValueError, match="unlabelled"):
        knn_classify(x, y - 1, x, y)


def test_knn_center_matches_numpy_on_centred_features_and_ignores_a_shared_offset():
    """center=True is the brute-force reference on features minus the bank's mean; a vector added to every
    feature (bank and queries) cannot change it, while the uncentred protocol does change."""
    xtr, ytr, xte, yte = _data(300, 80, seed=3)
    mu = xtr.numpy().mean(axis=0, keepdims=True)
    want = numpy_knn(xtr.numpy() - mu, ytr.numpy(), xte.numpy() - mu, yte.numpy(), 20, 0.07, 7)
    got = knn_classify(xtr, ytr, xte, yte, k=20, num_classes=7, center=True)
    assert got["top1"] == pytest.approx(want["top1"])
    assert got["top5"] == pytest.approx(want["top5"])
    offset = 4.0 * torch.randn(1, xtr.shape[1], generator=torch.Generator().manual_seed(0))
    shifted = knn_classify(xtr + offset, ytr, xte + offset, yte, k=20, num_classes=7, center=True)
    assert shifted["top1"] == pytest.approx(got["top1"], abs=100.0 / 80 + 1e-9)  # at most one float-tie flip
    assert knn_classify(xtr + offset, ytr, xte + offset, yte, k=20, num_classes=7)["top1"] != got["top1"]


def numpy_whiten(bank, queries, d):
    """Reference PCA whitening by SVD (Jegou & Chum 2012): centre on the bank, project on its d leading right
    singular vectors, scale each axis to unit variance."""
    mean = bank.mean(0, keepdims=True)
    _, s, vt = np.linalg.svd(bank - mean, full_matrices=False)
    proj = vt[:d].T / (s[:d] / np.sqrt(len(bank) - 1))  # (D, d)
    return (bank - mean) @ proj, (queries - mean) @ proj


@pytest.mark.parametrize("d", [4, 16])
def test_whitened_knn_matches_numpy_svd_whitening(d):
    """knn_classify(whiten=d) equals the NumPy vote on SVD-whitened features (axis signs do not matter: they
    leave every inner product as it is), and the whitened bank has zero mean and identity covariance."""
    from sslkit.eval.knn import whiten_on

    xtr, ytr, xte, yte = _data(300, 80, d=16, c=5)
    wb, wq = numpy_whiten(xtr.double().numpy(), xte.double().numpy(), d)
    ref = numpy_knn(wb, ytr.numpy(), wq, yte.numpy(), 10, 0.07, 5)
    assert knn_classify(xtr, ytr, xte, yte, k=10, whiten=d) == pytest.approx(ref)
    ours_b, ours_q = whiten_on(xtr, xte, dim=d)
    assert ours_b.shape == (300, d) and ours_q.shape == (80, d)
    assert ours_b.double().mean(0).abs().max() < 1e-4
    cov = ours_b.double().T @ ours_b.double() / (len(ours_b) - 1)
    assert torch.allclose(cov, torch.eye(d, dtype=torch.float64), atol=1e-4)
    # Same Gram matrix as the reference whitening, whatever the signs of the axes.
    assert np.allclose(ours_q.double().numpy() @ ours_b.double().numpy().T, wq @ wb.T, atol=1e-3)


def test_full_whitening_is_invariant_to_an_invertible_linear_map_and_differs_from_centring():
    """Whitened to full dimension, k-NN depends only on the Mahalanobis geometry of the bank, so mixing the
    feature axes by any invertible matrix changes nothing; plain centring is not invariant to that."""
    xtr, ytr, xte, yte = _data(400, 120, d=12, c=6, seed=3)
    g = torch.Generator().manual_seed(1)
    rotation = torch.linalg.qr(torch.randn(12, 12, generator=g))[0]
    mix = rotation @ torch.diag(torch.logspace(-1, 1, 12))  # axes mixed and rescaled 100-fold
    base = knn_classify(xtr, ytr, xte, yte, k=[5, 20], whiten=12)
    mixed = knn_classify(xtr @ mix, ytr, xte @ mix, yte, k=[5, 20], whiten=12)
    assert mixed == base  # the same votes, so the same percentages exactly
    assert knn_classify(xtr @ mix, ytr, xte @ mix, yte, k=20, center=True) != base[20]


def test_whitening_clips_to_the_bank_rank_and_rejects_bad_dims():
    """A bank spanning 3 of 8 dimensions whitens to 3 axes, however many are asked for; dim <= 0 and a
    one-row bank are refused with the problem named."""
    from sslkit.eval.knn import pca_whitening

    g = torch.Generator().manual_seed(0)
    bank = torch.randn(50, 3, generator=g) @ torch.randn(3, 8, generator=g)
    mean, proj = pca_whitening(bank, 64)
    assert mean.shape == (1, 8) and proj.shape == (8, 3)
    with pytest.raises(ValueError, match="whitening dimension must be positive"):
        pca_whitening(bank, 0)
    with pytest.raises(ValueError, match="at least 2 rows"):
        pca_whitening(bank[:1], 4)


@pytest.mark.parametrize("k", [10, [5, 10]])
def test_knn_protocols_are_the_three_knn_classify_calls(k):
    """knn_protocols gives knn_classify's result under the main protocol, with the centred and uncentred ones
    next to it, in knn_classify's shape for an int k and for a list."""
    from sslkit.eval.knn import knn_protocols

    xtr, ytr, xte, yte = _data(200, 60, d=16, c=5, seed=2)
    got = knn_protocols(xtr, ytr, xte, yte, k=k, whiten=8)
    ref = {(c, w): knn_classify(xtr, ytr, xte, yte, k=k, center=c, whiten=w)
           for c, w in ((True, 8), (True, None), (False, None))}
    rows = [(got, {key: r for key, r in ref.items()})] if isinstance(k, int) else [
        (got[kk], {key: r[kk] for key, r in ref.items()}) for kk in k]
    for row, want in rows:
        assert row["top1"] == want[(True, 8)]["top1"] and row["top5"] == want[(True, 8)]["top5"]
        assert row["top1_centred"] == want[(True, None)]["top1"]
        assert row["top1_uncentred"] == want[(False, None)]["top1"]
    plain = knn_protocols(xtr, ytr, xte, yte, k=10, center=False)
    assert plain == knn_classify(xtr, ytr, xte, yte, k=10)  # DINO's protocol: nothing plainer to add
