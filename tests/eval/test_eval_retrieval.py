"""Retrieval metrics against hand-computed values; IVF with nprobe = nlist equals Flat; copy detection."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sslkit.eval.retrieval import (
    IndexSpecError,
    average_precision_at_r,
    copy_detection_metrics,
    make_copies,
    retrieval_metrics,
)


def unit(deg):
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


def tiny():
    gallery = torch.tensor([unit(a) for a in (0, 10, 20, 30, 40)])
    g_labels = torch.tensor([0, 1, 0, 1, 1])
    queries = torch.tensor([unit(a) for a in (0, 45, 14, 9)]) * 3.0  # scale must not matter
    q_labels = torch.tensor([0, 1, 1, 0])
    return queries, q_labels, gallery, g_labels


def test_hand_computed_metrics():
    # Rankings by angle: q0 -> [0,1,2,3,4], q1 -> [4,3,2,1,0], q2 -> [1,2,0,3,4], q3 -> [1,0,2,3,4].
    # AP@R: q0 (R=2, rel 1,0) 1/2; q1 (R=3, rel 1,1,0) 2/3; q2 (R=3, rel 1,0,0) 1/3; q3 (R=2, rel 0,1) 1/4.
    res = retrieval_metrics(*tiny(), ks=(1, 5))
    assert res["map@r"] == pytest.approx(100 * (1 / 2 + 2 / 3 + 1 / 3 + 1 / 4) / 4)
    assert res["r_precision"] == pytest.approx(100 * (1 / 2 + 2 / 3 + 1 / 3 + 1 / 2) / 4)
    assert res["recall@1"] == pytest.approx(75.0)
    assert res["precision@1"] == pytest.approx(75.0)
    assert res["recall@5"] == pytest.approx(100.0)
    assert res["precision@5"] == pytest.approx(100 * (2 / 5 + 3 / 5 + 3 / 5 + 2 / 5) / 4)
    assert res["num_queries_scored"] == 4


def test_average_precision_at_r_direct():
    rel = np.array([[True, False, True, True], [False, False, True, False]])
    ap = average_precision_at_r(rel, np.array([3, 1]))
    np.testing.assert_allclose(ap, [(1 + 2 / 3) / 3, 0.0])


def test_query_label_absent_from_gallery_is_skipped():
    q, ql, g, gl = tiny()
    res = retrieval_metrics(q[:1], torch.tensor([7]), g, gl, ks=(1,))
    assert res["num_queries_scored"] == 0 and res["recall@1"] == 0.0


def _clustered(n, d=16, c=5, seed=0):
    g = np.random.default_rng(seed)
    centers = g.normal(size=(c, d))
    y = g.integers(0, c, n)
    return torch.tensor(centers[y] + g.normal(size=(n, d)), dtype=torch.float32), torch.tensor(y)


def test_ivf_with_nprobe_nlist_equals_flat():
    gx, gy = _clustered(400, seed=1)
    qx, qy = _clustered(50, seed=2)
    flat = retrieval_metrics(qx, qy, gx, gy, index="Flat", return_ids=10)
    ivf = retrieval_metrics(qx, qy, gx, gy, index="IVF8,Flat", nprobe=8, return_ids=10)
    for key in ("map@r", "r_precision", "recall@1", "precision@10"):
        assert ivf[key] == pytest.approx(flat[key])
    assert ivf["exact_recall@10"] == pytest.approx(100.0)
    np.testing.assert_array_equal(ivf["ids"], flat["ids"])
    assert "speedup" in ivf and ivf["nprobe"] == 8


def test_approximate_indexes_run():
    gx, gy = _clustered(600, d=16, seed=3)
    qx, qy = _clustered(40, d=16, seed=4)
    hnsw = retrieval_metrics(qx, qy, gx, gy, index="HNSW32")
    assert hnsw["exact_recall@10"] > 90.0
    pq = retrieval_metrics(qx, qy, gx, gy, index="IVF4,PQ4", nprobe=1)
    assert 0.0 <= pq["exact_recall@10"] <= 100.0


@pytest.mark.parametrize("spec,match", [("LSH", "not supported"), ("IVF9999,Flat", "nlist"),
                                        ("IVF4,PQ5", "multiple"), ("IVF4,PQ4", "at least")])
def test_bad_index_specs(spec, match):
    gx, gy = _clustered(100 if spec != "IVF4,PQ5" else 300, seed=5)
    with pytest.raises(IndexSpecError, match=match):
        retrieval_metrics(gx[:5], gy[:5], gx, gy, index=spec)


def test_copy_detection_identity_and_noise():
    gx, _ = _clustered(200, seed=6)
    src = torch.tensor([3, 50, 199])
    exact = copy_detection_metrics(gx[src] * 2, src, gx, ks=(1, 5))
    assert exact["map"] == pytest.approx(100.0) and exact["recall@1"] == 100.0
    shifted = copy_detection_metrics(gx[src], torch.tensor([4, 51, 0]), gx, ks=(1,))
    assert shifted["recall@1"] == 0.0 and shifted["map"] < 100.0


def test_make_copies_deterministic_and_different():
    imgs = torch.randint(0, 256, (3, 3, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    a, b = make_copies(imgs, seed=1), make_copies(imgs, seed=1)
    assert a.shape == imgs.shape and a.dtype == torch.uint8
    assert torch.equal(a, b) and not torch.equal(a, imgs)
    assert not torch.equal(make_copies(imgs, seed=2), a)


def test_chunking_does_not_change_metrics():
    gx, gy = _clustered(300, seed=7)
    qx, qy = _clustered(37, seed=8)
    whole = retrieval_metrics(qx, qy, gx, gy, return_ids=5)
    for entries in (1, 70, 1000):  # 1 query per chunk, a few, many
        part = retrieval_metrics(qx, qy, gx, gy, return_ids=5, chunk_entries=entries)
        for key in ("map@r", "r_precision", "recall@5", "precision@10", "num_queries_scored"):
            assert part[key] == pytest.approx(whole[key])
        np.testing.assert_array_equal(part["ids"], whole["ids"])


def test_hnsw_ef_search_is_respected_and_restored():
    from sslkit.eval.knn import l2_normalize
    from sslkit.eval.retrieval import build_index, search, set_search_params

    gx, _ = _clustered(300, seed=9)
    index = build_index(l2_normalize(gx), "HNSW32", ef_search=16)
    assert index.hnsw.efSearch == 16
    search(index, l2_normalize(gx[:3]), 50)  # deeper than efSearch: raised for the search only
    assert index.hnsw.efSearch == 16
    set_search_params(index, ef_search=40)
    search(index, l2_normalize(gx[:3]), 10)
    assert index.hnsw.efSearch == 40


def _copy_reference(queries, src, gallery, dim, ks):
    """Copy detection by hand: SVD whitening of the gallery, cosine ranks by brute force."""
    g, q = gallery.double().numpy(), queries.double().numpy()
    mean = g.mean(0, keepdims=True)
    _, s, vt = np.linalg.svd(g - mean, full_matrices=False)
    proj = vt[:dim].T / (s[:dim] / math.sqrt(len(g) - 1))
    gw, qw = (g - mean) @ proj, (q - mean) @ proj
    gw /= np.linalg.norm(gw, axis=1, keepdims=True)
    qw /= np.linalg.norm(qw, axis=1, keepdims=True)
    sims = qw @ gw.T  # (Q, N)
    rank = (sims > sims[np.arange(len(q)), src.numpy()][:, None]).sum(1) + 1  # (Q,)
    return {"map": 100.0 * float(np.mean(1.0 / rank)), **{f"recall@{k}": 100.0 * float(np.mean(rank <= k)) for k in ks}}


def test_copy_detection_whitened_matches_reference_and_keeps_plain():
    gen = torch.Generator().manual_seed(11)
    # Anisotropic gallery: a few loud axes carry no identity, many quiet ones do; copies are noisy versions.
    scale = torch.cat([torch.full((4,), 30.0), torch.ones(28)])
    gallery = torch.randn(300, 32, generator=gen) * scale
    src = torch.arange(0, 300, 7)
    queries = gallery[src] + torch.randn(len(src), 32, generator=gen) * scale * 0.6
    res = copy_detection_metrics(queries, src, gallery, ks=(1, 5), depth=300, whiten=16)
    want = _copy_reference(queries, src, gallery, 16, (1, 5))
    assert res["whiten"] == 16
    assert res["map"] == pytest.approx(want["map"], abs=1e-3)
    assert res["recall@1"] == pytest.approx(want["recall@1"]) and res["recall@5"] == pytest.approx(want["recall@5"])
    plain = copy_detection_metrics(queries, src, gallery, ks=(1, 5), depth=300)
    assert res["plain"] == {k: plain[k] for k in ("map", "recall@1", "recall@5")}
    # Whitening equalises the loud axes: it must find more sources here than the plain cosine search.
    assert res["map"] > plain["map"] + 5


def test_copy_detection_whitening_ignores_axis_mixing():
    gen = torch.Generator().manual_seed(12)
    gallery = torch.randn(200, 12, generator=gen)
    src = torch.arange(0, 200, 5)
    queries = gallery[src] + 0.5 * torch.randn(len(src), 12, generator=gen)
    mix = torch.randn(12, 12, generator=gen) + 3 * torch.eye(12)  # invertible
    a = copy_detection_metrics(queries, src, gallery, ks=(1,), depth=200, whiten=12)
    b = copy_detection_metrics(queries @ mix, src, gallery @ mix, ks=(1,), depth=200, whiten=12)
    assert a["map"] == pytest.approx(b["map"], abs=1e-2) and a["recall@1"] == b["recall@1"]
