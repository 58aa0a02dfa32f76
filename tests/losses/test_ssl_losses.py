"""sslkit.losses against lightly, their formulas, autocast and 2-process gloo DDP.

References:
- negative cosine / BYOL: ``lightly.loss.NegativeCosineSimilarity``.
- VICReg: ``lightly.loss.VICRegLoss``.
- Barlow Twins: ``lightly.loss.BarlowTwinsLoss`` (single process; under DDP lightly averages per-rank
  cross-correlations of locally normalised batches, which is not the global-batch loss this module checks).
- MoCo v3: lightly (1.6) has no MoCo v3 loss, module or example (its MoCo example is v2: ``NTXentLoss`` with a
  memory-bank queue). Two references: (1) the composition lightly's MoCo uses, ``NTXentLoss(memory_bank_size=
  (n - 1, D))``, evaluated one query at a time with the bank filled with the other n - 1 keys, so that its
  logits are exactly MoCo v3's row of in-batch logits (positive first), times the paper's 2T; (2) a direct
  transcription of Algorithm 1 (facebookresearch/moco-v3 ``contrastive_loss``).

The DDP tests run two gloo processes on CPU. Each rank uses its half of a fixed batch through a linear layer
shared by both ranks; the full input batch is also a leaf tensor replicated on both ranks, so both the
parameter gradient and the gradient of each input row are "all-reduced and divided by the world size",
as DDP does, and compared with one process on the whole batch.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from sslkit.losses.barlow_twins import barlow_twins_loss
from sslkit.losses.infonce import moco_v3_loss, moco_v3_symmetric
from sslkit.losses.negative_cosine import byol_loss, negative_cosine
from sslkit.losses.vicreg import vicreg_loss, vicreg_terms
from tests.dist_utils import run_distributed

SHAPES = [(8, 16), (32, 64), (5, 128)]
TEMPERATURES = [0.1, 0.2, 1.0]
TOL = {"rtol": 1e-9, "atol": 1e-11}  # float64 everywhere lightly allows it


def _lightly_loss():
    """``lightly.loss``, imported on use: it takes seconds, and the spawned DDP workers do not need it."""
    import lightly.loss

    return lightly.loss


def _inputs(n: int, d: int, count: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, d, generator=g, dtype=torch.float64) + 0.3).requires_grad_() for _ in range(count)]


def _value_and_grads(fn, xs: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    out = fn(*xs)
    grads = torch.autograd.grad(out, [x for x in xs if x.requires_grad])
    return out.detach(), list(grads)


def _assert_same(fn, ref, xs: list[torch.Tensor]) -> None:
    """Same value and same gradients w.r.t. the inputs that require grad, to float64 precision."""
    val, grads = _value_and_grads(fn, xs)
    ref_val, ref_grads = _value_and_grads(ref, xs)
    assert val.dtype == ref_val.dtype == torch.float64
    torch.testing.assert_close(val, ref_val, **TOL)
    for g, rg in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, rg, **TOL)


# ---------------------------------------------------------------------------------- against lightly


@pytest.mark.parametrize("n,d", SHAPES)
def test_negative_cosine_matches_lightly(n, d):
    ref = _lightly_loss().NegativeCosineSimilarity()
    _assert_same(negative_cosine, ref, _inputs(n, d, 2))
    _assert_same(byol_loss, lambda p0, p1, z0, z1: 0.5 * (ref(p0, z1) + ref(p1, z0)), _inputs(n, d, 4))


@pytest.mark.parametrize("n,d", SHAPES)
@pytest.mark.parametrize("weights", [(25.0, 25.0, 1.0), (1.0, 3.0, 0.5)])
def test_vicreg_matches_lightly(n, d, weights):
    sim, var, cov = weights
    ref = _lightly_loss().VICRegLoss(lambda_param=sim, mu_param=var, nu_param=cov)
    xs = _inputs(n, d, 2)
    with torch.no_grad():  # shrink one view so that some dimensions have std < 1 and the hinge is active
        xs[1].mul_(torch.linspace(0.2, 2.0, d, dtype=torch.float64))
    _assert_same(lambda a, b: vicreg_loss(a, b, sim_weight=sim, var_weight=var, cov_weight=cov), ref, xs)


@pytest.mark.parametrize("n,d", SHAPES)
@pytest.mark.parametrize("lambda_offdiag", [5e-3, 0.1])
def test_barlow_twins_matches_lightly(n, d, lambda_offdiag):
    ref = _lightly_loss().BarlowTwinsLoss(lambda_param=lambda_offdiag)
    _assert_same(lambda a, b: barlow_twins_loss(a, b, lambda_offdiag=lambda_offdiag), ref, _inputs(n, d, 2))


def _moco_v3_algorithm1(q: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    """Algorithm 1 of Chen, Xie & He 2021, one process (official ``MoCo.contrastive_loss``)."""
    q, k = F.normalize(q, dim=1), F.normalize(k.detach(), dim=1)
    logits = torch.einsum("nc,mc->nm", q, k) / temperature
    return F.cross_entropy(logits, torch.arange(q.shape[0])) * (2 * temperature)


def _moco_v3_lightly(q: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo v3 from lightly's MoCo loss: NTXentLoss with a memory bank holding the other n - 1 keys.

    For query i the bank is {k_j, j != i}; NTXentLoss's logits are then [q_i.k_i, q_i.k_j (j != i)] / T with
    label 0, the same cross-entropy as row i of MoCo v3's (n, n) logits.
    """
    n, d = q.shape
    keys = F.normalize(k.detach(), dim=1)
    losses = []
    for i in range(n):
        loss_fn = _lightly_loss().NTXentLoss(temperature=temperature, memory_bank_size=(n - 1, d))
        loss_fn.memory_bank.bank = torch.cat([keys[:i], keys[i + 1:]])  # float64 buffer, no update below
        losses.append(loss_fn(q[i:i + 1], k[i:i + 1].detach()))
    return torch.stack(losses).mean() * (2 * temperature)


MOCO_V3_REFERENCES = {"algorithm1": _moco_v3_algorithm1, "lightly_ntxent_bank": _moco_v3_lightly}


@pytest.mark.parametrize("n,d", SHAPES)
@pytest.mark.parametrize("temperature", TEMPERATURES)
@pytest.mark.parametrize("reference", sorted(MOCO_V3_REFERENCES))
def test_moco_v3_matches_references(n, d, temperature, reference):
    ref = MOCO_V3_REFERENCES[reference]
    q, k = _inputs(n, d, 2)
    k = k.detach()
    _assert_same(lambda a: moco_v3_loss(a, k, temperature), lambda a: ref(a, k, temperature), [q])
    q0, q1, k0, k1 = (t.detach() if i >= 2 else t for i, t in enumerate(_inputs(n, d, 4, seed=1)))
    _assert_same(lambda a, b: moco_v3_symmetric(a, b, k0, k1, temperature),
                 lambda a, b: ref(a, k1, temperature) + ref(b, k0, temperature), [q0, q1])


def test_moco_v3_keys_get_no_gradient():
    q, k = _inputs(4, 8, 2)
    moco_v3_loss(q, k).backward()
    assert q.grad is not None and k.grad is None


# ---------------------------------------------------------------------------------- formulas


def _hadamard_columns(n: int, d: int) -> torch.Tensor:
    """(n, d) columns of a Sylvester Hadamard matrix without the constant one: mean 0, variance 1, orthogonal."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    assert h.shape[0] == n and d < n
    return h[:, 1:d + 1]


def test_negative_cosine_formula():
    p = torch.randn(6, 10, dtype=torch.float64)
    z = torch.randn(6, 10, dtype=torch.float64)
    assert negative_cosine(p, 3 * p).item() == pytest.approx(-1.0)
    assert negative_cosine(p, -p).item() == pytest.approx(1.0)
    # BYOL's squared distance of the normalised vectors, 2 - 2 cos, is affine in the loss
    mse = (F.normalize(p, dim=1) - F.normalize(z, dim=1)).pow(2).sum(1).mean()
    assert mse.item() == pytest.approx(2 + 2 * negative_cosine(p, z).item())


def test_barlow_twins_of_identical_decorrelated_embeddings_is_zero():
    z = 3.0 * _hadamard_columns(16, 8) + 1.5  # any scale and offset: the batch norm removes them
    assert barlow_twins_loss(z, z, eps=0.0).item() == pytest.approx(0.0, abs=1e-12)
    assert barlow_twins_loss(z, z).item() == pytest.approx(0.0, abs=1e-8)  # only (1 - 1/(1 + eps))^2 terms
    assert barlow_twins_loss(z, -z).item() == pytest.approx(4 * 8, rel=1e-4)  # C = -I


def test_vicreg_terms_formula():
    z = torch.randn(32, 16, dtype=torch.float64)
    assert vicreg_terms(z, z)["invariance"].item() == 0.0
    assert vicreg_terms(z, z + 1)["invariance"].item() == pytest.approx(1.0)
    spread = 2.0 * _hadamard_columns(16, 8)  # std > 1 in every dimension, no covariance
    t = vicreg_terms(spread, spread)
    assert t["variance"].item() == 0.0 and t["covariance"].item() == pytest.approx(0.0, abs=1e-24)
    collapsed = torch.zeros(8, 4, dtype=torch.float64)
    assert vicreg_terms(collapsed, collapsed, eps=1e-4)["variance"].item() == pytest.approx(1 - 1e-2)
    assert vicreg_loss(spread, spread).item() == pytest.approx(0.0, abs=1e-20)


def test_moco_v3_formula():
    n, t = 4, 0.5
    e = torch.eye(n, dtype=torch.float64)  # q_i = k_i orthonormal: logits 1/T on the diagonal, 0 elsewhere
    expected = 2 * t * torch.log(1 + (n - 1) * torch.exp(torch.tensor(-1 / t, dtype=torch.float64)))
    assert moco_v3_loss(e, e, t).item() == pytest.approx(expected.item())


def test_losses_reject_bad_shapes():
    a, b = torch.randn(4, 8), torch.randn(4, 9)
    for fn in (negative_cosine, vicreg_loss, barlow_twins_loss, moco_v3_loss):
        with pytest.raises(ValueError):
            fn(a, b)
    with pytest.raises(ValueError):
        vicreg_loss(torch.randn(1, 8), torch.randn(1, 8))


# ---------------------------------------------------------------------------------- autocast

LOSSES_2 = {
    "negative_cosine": negative_cosine,
    "vicreg": vicreg_loss,
    "barlow_twins": barlow_twins_loss,
    "moco_v3": moco_v3_loss,
}


@pytest.mark.parametrize("name", sorted(LOSSES_2))
def test_float32_under_bf16_autocast(name):
    """Under bf16 autocast the statistics are fp32: the same as the loss of the upcast bf16 embeddings."""
    fn = LOSSES_2[name]
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 32)
    x0, x1 = torch.randn(24, 16), torch.randn(24, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z0, z1 = layer(x0), layer(x1)
        assert z0.dtype == torch.bfloat16
        loss = fn(z0, z1)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, fn(z0.float(), z1.float()), rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------- DDP (gloo, 2 processes)

WORLD = 2


def _ddp_loss(name: str, gather: bool, za: torch.Tensor, zb: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    if name == "vicreg":
        return vicreg_loss(za, zb, gather=gather)
    if name == "barlow_twins":
        return barlow_twins_loss(za, zb, lambda_offdiag=0.05, gather=gather)
    if name == "moco_v3":  # queries of both views against the other view's keys
        return moco_v3_symmetric(za, zb, keys[0], keys[1], temperature=0.2)
    raise ValueError(name)


def _forward(name: str, gather: bool, x: torch.Tensor, weight: torch.Tensor, keys: torch.Tensor,
             rows: slice) -> torch.Tensor:
    """Loss of the rows ``rows`` of the two views x (2, N, Din) through the shared linear layer ``weight``."""
    za, zb = x[0, rows] @ weight.T, x[1, rows] @ weight.T
    return _ddp_loss(name, gather, za, zb, keys[:, rows])


def _reference(name: str, x: torch.Tensor, weight: torch.Tensor, keys: torch.Tensor):
    """One process on the whole batch: loss, d loss / d x, d loss / d weight."""
    x, weight = x.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = _forward(name, False, x, weight, keys, slice(None))
    gx, gw = torch.autograd.grad(loss, [x, weight])
    return loss.detach(), gx, gw


DDP_CASES = [("vicreg", True), ("barlow_twins", True), ("moco_v3", True), ("vicreg", False),
             ("barlow_twins", False)]
QUANTITIES = ("loss", "input grad", "weight grad")


def _ddp_worker(rank: int, world: int, cases, x: torch.Tensor, weight: torch.Tensor, keys: torch.Tensor,
                out_path: str) -> None:
    """Every case on this rank's rows; rank 0 saves max |DDP - single process| per case and quantity."""
    n = x.shape[1] // world
    diffs = {}
    for (name, gather), expected in cases:
        xl, wl = x.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = _forward(name, gather, xl, wl, keys, slice(rank * n, (rank + 1) * n))
        loss.backward()
        results = [loss.detach().clone(), xl.grad, wl.grad]
        for t in results:  # DDP: all-reduce the gradients (the loss only for the comparison), divide by world
            dist.all_reduce(t)
            t /= world
        diffs[name, gather] = {q: ((got - want).abs().max() / want.abs().max()).item()
                               for q, got, want in zip(QUANTITIES, results, expected, strict=True)}
    if rank == 0:
        torch.save(diffs, out_path)




@pytest.fixture(scope="module")
def ddp_diffs(tmp_path_factory) -> dict:
    """One 2-process gloo run for all DDP cases (a spawn costs seconds): relative max differences."""
    g = torch.Generator().manual_seed(7)
    n_global, d_in, d_out = 12, 6, 10
    x = torch.randn(2, n_global, d_in, generator=g, dtype=torch.float64)
    weight = torch.randn(d_out, d_in, generator=g, dtype=torch.float64) * 0.5
    keys = torch.randn(2, n_global, d_out, generator=g, dtype=torch.float64)
    cases = [(case, _reference(case[0], x, weight, keys)) for case in DDP_CASES]
    out_path = str(tmp_path_factory.mktemp("ddp") / "diffs.pt")
    run_distributed(_ddp_worker, WORLD, cases, x, weight, keys, out_path)
    return torch.load(out_path)


@pytest.mark.ddp
@pytest.mark.parametrize("name", ["vicreg", "barlow_twins", "moco_v3"])
def test_ddp_matches_single_process(ddp_diffs, name):
    """Mean loss over ranks and DDP-averaged gradients (inputs and shared weight) equal one process."""
    for quantity, diff in ddp_diffs[name, True].items():
        assert diff < 1e-12, f"{name}: {quantity} differs from one process by {diff:.3g} (relative)"


@pytest.mark.ddp
@pytest.mark.parametrize("name", ["vicreg", "barlow_twins"])
def test_ddp_without_gather_differs(ddp_diffs, name):
    """The DDP check can fail: with local statistics (gather=False) loss and gradients are not the global ones."""
    for quantity, diff in ddp_diffs[name, False].items():
        assert diff > 1e-3, f"{name} gather=False: {quantity} matches one process ({diff:.3g})"
