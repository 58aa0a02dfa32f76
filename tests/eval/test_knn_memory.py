"""Bounded-memory k-NN: the chunked float32 / float16 / on-disk search against the default FAISS search."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from sslkit.data.base import DataError
from sslkit.eval import knn as knn_mod
from sslkit.eval.knn import (
    FP16_SIM_TOLERANCE,
    BankPlan,
    BankTransform,
    DiskArray,
    FeatureBank,
    chunked_topk,
    knn_classify,
    l2_normalize,
    pca_whitening,
    plan_bank,
    streaming_whitening,
    weighted_vote,
    write_npy_chunks,
)
from tests.eval.test_eval_cli import run_dir  # noqa: F401 - its tiny run (a 1-block ViT on 32 px), as a fixture


def _clusters(n_train: int, n_test: int, dim: int, classes: int, noise: float, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g)
    ytr, yte = torch.randint(0, classes, (n_train,), generator=g), torch.randint(0, classes, (n_test,), generator=g)
    offset = 2.0 * torch.randn(dim, generator=g)  # a shared offset: centring changes the neighbours
    xtr = centres[ytr] + noise * torch.randn(n_train, dim, generator=g) + offset
    xte = centres[yte] + noise * torch.randn(n_test, dim, generator=g) + offset
    return xtr, ytr, xte, yte


@pytest.fixture(scope="module")
def data():
    return _clusters(3000, 300, 48, 7, noise=1.6)


@pytest.mark.parametrize("protocol", [{}, {"center": True}, {"whiten": 12}])
@pytest.mark.parametrize("on_disk", [False, True])
def test_chunked_float32_equals_faiss(data, tmp_path, protocol, on_disk):
    """float32 chunks (257 rows, an odd size so the last chunk is short) give FAISS's figures exactly, for the
    uncentred, centred and whitened protocols, in memory and on disk."""
    xtr, ytr, xte, yte = data
    ref = knn_classify(xtr, ytr, xte, yte, k=[1, 5, 20], **protocol)
    got = knn_classify(xtr, ytr, xte, yte, k=[1, 5, 20], bank_dtype="float32", bank_on_disk=on_disk,
                       bank_chunk_size=257, bank_dir=tmp_path, chunk_size=70, **protocol)
    assert got == ref
    assert not any(tmp_path.iterdir())  # the on-disk bank is removed afterwards


def test_chunked_topk_equals_faiss_neighbours(data):
    """Neighbour ids equal FAISS's and similarities match to float32 rounding."""
    xtr, _, xte, _ = data
    bank_n, q_n = l2_normalize(xtr), l2_normalize(xte)
    sims_ref, ids_ref = knn_mod.flat_ip_index(bank_n, use_gpu=False).search(q_n, 20)
    with FeatureBank(xtr, BankTransform(), BankPlan("float32", False, 333)) as bank:
        sims, ids = chunked_topk(bank, torch.from_numpy(q_n), 20, query_chunk=64)
    assert torch.equal(ids, torch.from_numpy(ids_ref))
    torch.testing.assert_close(sims, torch.from_numpy(sims_ref), atol=1e-5, rtol=0)


def test_float16_bank_within_rounding_tolerance(tmp_path):
    """A float16 bank moves each similarity by at most 2**-11 (FP16_SIM_TOLERANCE: the unit roundoff of float16
    times the unit norms). So (a) every returned similarity is within it of the exact one of the same row;
    (b) each returned neighbour is a true top-k neighbour up to twice it; (c) the weighted vote can only change
    for queries that are that close to a tie, so every other query keeps its prediction."""
    xtr, ytr, xte, yte = _clusters(800, 300, 16, 7, noise=1.0)  # a sparse bank: most queries are far from ties
    k, t = 20, knn_mod.DEFAULT_TEMPERATURE
    transform = BankTransform(mean=xtr.mean(0, keepdim=True))
    queries = transform(xte)
    exact = queries @ transform(xtr).T  # (Q, N) float32
    with FeatureBank(xtr, transform, BankPlan("float16", True, 150), directory=tmp_path) as bank:
        sims, ids = chunked_topk(bank, queries, k)
    tol = FP16_SIM_TOLERANCE + 1e-6  # + float32 rounding of the products
    assert (sims - exact.gather(1, ids)).abs().max() <= tol  # (a)
    ordered = exact.sort(dim=1, descending=True).values  # (Q, N)
    assert (exact.gather(1, ids) >= ordered[:, k - 1:k] - 2 * tol).all()  # (b)
    # (c): a query is robust when its exact k-th / (k+1)-th similarities are 2 tol apart (same neighbour set)
    # and its best class outscores the second by more than the factor exp(2 tol / T) the weights can move by.
    ref_s, ref_i = exact.topk(k, dim=1)
    ref_scores = weighted_vote(ref_s, ytr[ref_i], 7, t)
    top2 = ref_scores.topk(2, dim=1).values
    robust = ((ordered[:, k - 1] - ordered[:, k]) > 2 * tol) & (top2[:, 0] > top2[:, 1] * math.exp(2 * tol / t) * 1.001)
    assert robust.float().mean() > 0.6  # the check below is not vacuous (about 3 in 4 queries are robust)
    pred16 = weighted_vote(sims, ytr[ids], 7, t).argmax(1)
    assert torch.equal(pred16[robust], ref_scores.argmax(1)[robust])
    # and through knn_classify: top-1 differs from FAISS's by at most the non-robust share
    ref = knn_classify(xtr, ytr, xte, yte, k=k, center=True)
    got = knn_classify(xtr, ytr, xte, yte, k=k, center=True, bank_dtype="float16")
    assert abs(got["top1"] - ref["top1"]) <= 100.0 * float((~robust).float().mean()) + 1e-9


def test_disk_array_round_trip_and_errors(tmp_path):
    x = np.random.default_rng(0).standard_normal((103, 9)).astype(np.float32)
    arr = write_npy_chunks(tmp_path / "f.npy", x.shape, np.float32, (x[i:i + 20] for i in range(0, 103, 20)))
    assert arr.shape == (103, 9) and len(arr) == 103
    np.testing.assert_array_equal(arr[17:64], x[17:64])
    np.testing.assert_array_equal(np.asarray(arr), x)
    np.testing.assert_array_equal(np.load(tmp_path / "f.npy"), x)  # a plain .npy file
    assert [p.name for p in tmp_path.iterdir()] == ["f.npy"]  # no temporary left
    with pytest.raises(ValueError, match="gave 100 rows"):
        write_npy_chunks(tmp_path / "g.npy", x.shape, np.float32, [x[:100]])
    assert not (tmp_path / "g.npy").exists() and [p.name for p in tmp_path.iterdir()] == ["f.npy"]
    np.save(tmp_path / "bad.npy", np.zeros((2, 3, 4), np.float32))
    with pytest.raises(DataError, match="2-D float"):
        DiskArray(tmp_path / "bad.npy")
    data = (tmp_path / "f.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(data[:-100])
    with pytest.raises(DataError, match="truncated"):
        DiskArray(tmp_path / "cut.npy")
    (tmp_path / "junk.npy").write_bytes(b"not numpy")
    with pytest.raises(DataError, match="not a readable .npy"):
        DiskArray(tmp_path / "junk.npy")


def test_disk_array_input_equals_in_memory(data, tmp_path):
    """A bank handed over as a file (never loaded whole) gives the in-memory figures."""
    xtr, ytr, xte, yte = data
    arr = write_npy_chunks(tmp_path / "bank.npy", tuple(xtr.shape), np.float32, [xtr[:1000], xtr[1000:]])
    assert knn_classify(arr, ytr, xte, yte, k=[5, 20], center=True, bank_dtype="float32") == knn_classify(
        xtr, ytr, xte, yte, k=[5, 20], center=True)


def test_streaming_whitening_equals_pca_whitening(data):
    """Mean and whitening from chunk-accumulated covariance equal the in-memory ones (the projection up to the
    sign of each axis, so compare proj @ proj.T, which the signs do not change)."""
    xtr = data[0]
    mean, proj = pca_whitening(xtr, 16)
    mean_s, proj_s = streaming_whitening(xtr, 16, chunk_rows=211)
    torch.testing.assert_close(mean_s, mean, atol=1e-5, rtol=0)
    torch.testing.assert_close(proj_s @ proj_s.T, proj @ proj.T, atol=1e-5, rtol=1e-4)


def test_plan_bank_choices():
    assert plan_bank(60_000, 384) is None  # small: the default FAISS search
    assert plan_bank(60_000, 4096) == BankPlan("float32", False, knn_mod.BANK_CHUNK_ENTRIES // 4096)  # 983 MB
    big = plan_bank(1_000_000, 384)  # 1.4 GiB in float32
    assert big == BankPlan("float16", False, knn_mod.BANK_CHUNK_ENTRIES // 384)
    assert plan_bank(4_000_000, 1024).on_disk  # 7.6 GiB in float16
    assert plan_bank(100, 8, on_disk=True) == BankPlan("float32", True, knn_mod.BANK_CHUNK_ENTRIES // 8)
    assert plan_bank(100, 8, chunk_size=10).chunk_rows == 10
    with pytest.raises(ValueError, match="--bank-dtype"):
        plan_bank(100, 8, bank_dtype="bfloat16")
    with pytest.raises(ValueError, match="--chunk-size"):
        plan_bank(100, 8, chunk_size=0)


_PEAK_SCRIPT = textwrap.dedent("""
    import sys
    from pathlib import Path

    import numpy as np
    import torch

    from sslkit.eval.knn import DiskArray, knn_classify, write_npy_chunks

    def rss(field):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024

    torch.set_num_threads(1)
    folder, rows, dim = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    rng = np.random.default_rng(0)
    bank = write_npy_chunks(folder / "bank.npy", (rows, dim), np.float32,
                            (rng.standard_normal((4096, dim), dtype=np.float32) for _ in range(rows // 4096)))
    labels = torch.randint(0, 10, (rows,))
    queries, q_labels = torch.randn(256, dim), torch.randint(0, 10, (256,))
    opts = dict(k=20, center=True, bank_dtype="float16", bank_on_disk=True, bank_chunk_size=512, bank_dir=folder)
    knn_classify(torch.randn(64, dim), labels[:64], queries, q_labels, **opts)  # warm-up: thread pools, BLAS
    Path("/proc/self/clear_refs").write_text("5")  # restart the high-water mark
    before = rss("VmRSS")
    knn_classify(bank, labels, queries, q_labels, **opts)
    search = rss("VmHWM") - before
    Path("/proc/self/clear_refs").write_text("5")
    before = rss("VmRSS")
    whole = np.asarray(bank)  # control: loading the bank must show as its size
    control = rss("VmHWM") - before
    print(search, control, whole.nbytes)
""")


def test_chunked_search_peak_memory_is_bounded(tmp_path):
    """The on-disk float16 search of a 64 MiB float32 bank (file in, chunks of 512 rows) raises the process's
    peak resident memory by far less than the bank: it never holds a bank-sized array. The control (reading
    the file whole) shows the measurement sees a bank-sized allocation."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pytest.skip("needs Linux /proc/self/clear_refs to restart the peak-memory mark")
    rows, dim = 65_536, 256  # 64 MiB of float32 (the search itself grows the peak by about 7 MiB)
    out = subprocess.run([sys.executable, "-c", _PEAK_SCRIPT, str(tmp_path), str(rows), str(dim)], check=True,
                         capture_output=True, text=True, env={"OMP_NUM_THREADS": "1", "PATH": ""}, timeout=120)
    search, control, bank_bytes = map(int, out.stdout.split())
    assert bank_bytes == rows * dim * 4
    assert control >= 0.9 * bank_bytes
    assert search < 0.25 * bank_bytes, f"peak grew by {search / 2**20:.1f} MiB for a {bank_bytes / 2**20:.0f} MiB bank"


def test_run_knn_bank_options_keep_the_figures(request, tmp_path):
    """`sslkit eval knn --bank-dtype float32 --bank-on-disk --chunk-size 7` on a run gives the default figures
    (every protocol: centred, uncentred, whitened) and records the bank it used."""
    from sslkit.eval import cli

    run = request.getfixturevalue("run_dir")
    base = ["knn", str(run), "--k", "5", "--whiten", "8", "--no-plots", "--no-progress"]
    assert cli.main(base) == 0
    want = json.loads((run / "eval" / "knn" / "results.json").read_text())
    assert cli.main([*base, "--bank-dtype", "float32", "--bank-on-disk", "--chunk-size", "7"]) == 0
    got = json.loads((run / "eval" / "knn" / "results.json").read_text())
    assert got["metrics"] == want["metrics"] and set(got["metrics"]["5"]) >= {"top1", "top1_uncentred", "top1_whitened"}
    assert want["settings"]["bank"] == "FAISS, float32 in memory"
    assert got["settings"]["bank"] == "chunked (7 rows), float32 on disk"
