"""iBOT's patch loss against lightly, Sinkhorn-Knopp against DINOv2's formula, and both under 2-process gloo DDP.

References:
- iBOT patch loss: ``lightly.loss.IBOTPatchLoss`` (masked patches flattened to (M, K), its own center buffer
  and teacher softmax), and for the dense form also ``lightly.loss.IBOTPlusPlusPatchLoss`` with
  ``visible_loss_weight=0`` (its documented iBOT special case). Lightly turns the teacher temperature into a
  float32 tensor, so the comparisons pass the float32-rounded temperature to sslkit.
- Sinkhorn-Knopp: a loop-by-loop transcription of ``SinkhornKnoppTeacher.sinkhorn_knopp_teacher``
  (facebookresearch/dinov2) written below, and lightly's SwaV ``sinkhorn`` (the same algorithm without the
  ``/K``, which the column normalisation cancels).

The DDP test runs two gloo processes on CPU in one spawn for all cases; each rank normalises its rows of one
fixed global batch and compares them with the single-process result on the whole batch.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from sslkit.losses.ibot import ibot_patch_loss, ibot_patch_loss_masked, ibot_teacher_probs
from sslkit.losses.sinkhorn import sinkhorn_knopp
from tests.dist_utils import run_distributed

TOL = {"rtol": 1e-9, "atol": 1e-11}  # float64


def _lightly_loss():
    """``lightly.loss``, imported on use: it takes seconds, and the spawned DDP workers do not need it."""
    import lightly.loss

    return lightly.loss


def _f32(x: float) -> float:
    """The temperature lightly actually uses: ``torch.tensor(x)`` is float32."""
    return float(torch.tensor(x, dtype=torch.float32))


def _masks(b: int, h: int, w: int, counts: str, g: torch.Generator) -> torch.Tensor:
    """(B, H, W) random bool mask with at least one masked patch per image.

    counts="any": each patch masked with probability 0.3, plus one random patch. counts="pow2": a random power
    of two of random patches per image, so that lightly's float32 weights 1 / n_masked are exact.
    """
    n = h * w
    if counts == "any":
        m = torch.rand(b, n, generator=g) < 0.3
        m[torch.arange(b), torch.randint(n, (b,), generator=g)] = True
    else:
        m = torch.zeros(b, n, dtype=torch.bool)
        for i in range(b):
            count = 2 ** int(torch.randint(int(math.log2(n)) + 1, (1,), generator=g))
            m[i, torch.randperm(n, generator=g)[:count]] = True
    return m.reshape(b, h, w)


# ---------------------------------------------------------------------------------- iBOT vs lightly

IBOT_SHAPES = [(2, 2, 3, 8), (4, 4, 4, 32), (3, 7, 5, 65)]  # B, H, W, K
IBOT_TEMPS = [(0.04, 0.1), (0.07, 0.2), (1.0, 1.0)]  # teacher, student


@pytest.mark.parametrize("b,h,w,k", IBOT_SHAPES)
@pytest.mark.parametrize("teacher_temp,student_temp", IBOT_TEMPS)
@pytest.mark.parametrize("counts", ["any", "pow2"])
def test_ibot_matches_lightly(b, h, w, k, teacher_temp, student_temp, counts):
    """Value and d loss / d student logits, masked and dense forms, with a non-zero center.

    ``IBOTPatchLoss`` computes its weights 1 / n_masked in float32 (``mask.sum().clamp(min=1.0)`` of an int
    tensor is float32) even for float64 inputs: float64 precision where n_masked is a power of two, 2e-7
    relative otherwise. ``IBOTPlusPlusPatchLoss`` (dense, float64 weights) is compared to float64 precision.
    """
    g = torch.Generator().manual_seed(b * 1000 + k)
    teacher = torch.randn(b, h * w, k, generator=g, dtype=torch.float64) * 2
    student = (torch.randn(b, h * w, k, generator=g, dtype=torch.float64) * 2).requires_grad_()
    center = torch.randn(1, k, generator=g, dtype=torch.float64) * 0.5
    mask3 = _masks(b, h, w, counts, g)
    mask = mask3.reshape(b, -1)
    tt = _f32(teacher_temp)

    ref = _lightly_loss().IBOTPatchLoss(output_dim=k, teacher_temp=teacher_temp, student_temp=student_temp)
    ref.center.center = center.clone()
    ref_val = ref(teacher[mask], student[mask], mask3)
    (ref_grad,) = torch.autograd.grad(ref_val, student)
    assert not torch.equal(ref.center.center, center)  # lightly updated its center after the loss

    masked = ibot_patch_loss_masked(ibot_teacher_probs(teacher[mask], center, tt), student[mask], mask3,
                                    student_temp)
    dense = ibot_patch_loss(ibot_teacher_probs(teacher, center, tt), student, mask, student_temp)
    tol = TOL if counts == "pow2" else {"rtol": 2e-7, "atol": 1e-9}
    grads = []
    for val in (masked, dense):
        (grad,) = torch.autograd.grad(val, student)
        assert val.dtype == ref_val.dtype == torch.float64
        torch.testing.assert_close(val, ref_val, **tol)
        torch.testing.assert_close(grad, ref_grad, **tol)
        assert grad[~mask].abs().max() == 0  # unmasked patches get no gradient
        grads.append(grad)
    torch.testing.assert_close(masked, dense, **TOL)
    torch.testing.assert_close(grads[0], grads[1], **TOL)

    plus = _lightly_loss().IBOTPlusPlusPatchLoss(output_dim=k, teacher_temp=teacher_temp, student_temp=student_temp)
    plus.center.center = center.clone()
    plus_val = plus(teacher, student, mask3, visible_loss_weight=0.0)
    (plus_grad,) = torch.autograd.grad(plus_val, student)
    torch.testing.assert_close(dense, plus_val, **TOL)
    torch.testing.assert_close(grads[1], plus_grad, **TOL)


def test_ibot_formula_and_image_without_masked_patch():
    """One-hot teacher, uniform student: each masked patch costs log K; an unmasked image adds 0 but counts."""
    b, n, k = 3, 5, 7
    teacher = F.one_hot(torch.full((b, n), 2), k).double()
    student = torch.zeros(b, n, k, dtype=torch.float64)
    mask = torch.zeros(b, n, dtype=torch.bool)
    mask[0, :2] = mask[1, 4] = True  # image 2 has no masked patch
    expected = math.log(k) * 2 / 3
    assert ibot_patch_loss(teacher, student, mask).item() == pytest.approx(expected, rel=1e-12)
    assert ibot_patch_loss_masked(teacher[mask], student[mask], mask).item() == pytest.approx(expected, rel=1e-12)
    # lightly (zero center, teacher logits that its softmax turns into the same one-hot to float64 precision)
    ref = _lightly_loss().IBOTPatchLoss(output_dim=k, teacher_temp=1.0, student_temp=0.1)
    assert ref(teacher[mask] * 1e3, student[mask], mask.reshape(b, 1, n)).item() == pytest.approx(expected)
    # the student temperature scales the logits: a student that agrees with the teacher costs less
    sharp = ibot_patch_loss(teacher, teacher * 5, mask, student_temp=0.1)
    assert sharp.item() < 1e-12


def test_ibot_rejects_bad_shapes():
    t, mask = torch.rand(2, 6, 4), torch.ones(2, 6, dtype=torch.bool)
    with pytest.raises(ValueError):
        ibot_patch_loss(t, torch.rand(2, 6, 5), mask)
    with pytest.raises(ValueError):
        ibot_patch_loss(t, t, torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError):
        ibot_patch_loss_masked(t[mask], t[mask], mask[:, :5])  # 10 masked patches in the mask, 12 rows


# ---------------------------------------------------------------------------------- Sinkhorn-Knopp


def _dinov2_sinkhorn(teacher_output: torch.Tensor, teacher_temp: float, n_iterations: int) -> torch.Tensor:
    """DINOv2's ``sinkhorn_knopp_teacher`` on one process, row by row and column by column."""
    q = torch.exp(teacher_output / teacher_temp).t().clone()  # (K, B)
    k, b = q.shape
    q /= q.sum()
    for _ in range(n_iterations):
        for i in range(k):  # each prototype gets total weight 1/K
            q[i] = q[i] / q[i].sum() / k
        for j in range(b):  # each sample gets total weight 1/B
            q[:, j] = q[:, j] / q[:, j].sum() / b
    return (q * b).t()


SK_SHAPES = [(16, 8), (64, 32), (32, 128)]  # B, K


@pytest.mark.parametrize("b,k", SK_SHAPES)
@pytest.mark.parametrize("temp", [0.05, 0.1, 1.0])
@pytest.mark.parametrize("n_iterations", [0, 1, 3, 10])
def test_sinkhorn_matches_dinov2_formula(b, k, temp, n_iterations):
    g = torch.Generator().manual_seed(b + k)
    logits = torch.randn(b, k, generator=g, dtype=torch.float64)
    out = sinkhorn_knopp(logits, temp, n_iterations)
    assert out.shape == (b, k) and out.dtype == torch.float64 and not out.requires_grad
    torch.testing.assert_close(out, _dinov2_sinkhorn(logits, temp, n_iterations), **TOL)
    from lightly.loss.swav_loss import sinkhorn

    torch.testing.assert_close(out, sinkhorn(logits, iterations=n_iterations, epsilon=temp), **TOL)


def test_sinkhorn_marginals():
    """Samples: exact distributions after any iteration (1e-12). Prototypes (mass relative to B/K): within 1e-2
    after DINOv2's 3 iterations for soft scores (temperature 1), within 1e-10 after 100 iterations at 0.3.
    Sharp scores converge slowly: at 0.1, 3 iterations leave the prototype masses up to ~90% off uniform."""
    g = torch.Generator().manual_seed(0)
    for b, k in SK_SHAPES:
        logits = torch.randn(b, k, generator=g, dtype=torch.float64)
        for temp, n_iterations, tol in [(1.0, 3, 1e-2), (0.3, 100, 1e-10)]:
            out = sinkhorn_knopp(logits, temp, n_iterations)
            torch.testing.assert_close(out.sum(dim=1), torch.ones(b, dtype=torch.float64), rtol=0, atol=1e-12)
            prototype_mass = out.sum(dim=0) * k / b
            assert (prototype_mass - 1).abs().max() < tol, (b, k, temp, n_iterations)
        # more iterations, more balanced; a plain softmax is far from balanced
        imbalance = [(sinkhorn_knopp(logits, 0.1, n).sum(0) * k / b - 1).abs().max() for n in (1, 10)]
        softmax_imbalance = (F.softmax(logits / 0.1, dim=1).sum(0) * k / b - 1).abs().max()
        assert imbalance[1] < imbalance[0] and imbalance[1] < 0.5 * softmax_imbalance


def test_sinkhorn_zero_iterations_is_global_softmax():
    """n_iterations=0: B times one softmax over all B*K entries; rows are not distributions."""
    logits = torch.randn(12, 10, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = sinkhorn_knopp(logits, 0.5, n_iterations=0)
    torch.testing.assert_close(out, 12 * F.softmax(logits.flatten() / 0.5, dim=0).reshape(12, 10), **TOL)
    assert (out.sum(dim=1) - 1).abs().max() > 0.1


@pytest.mark.parametrize("n_iterations", [1, 3])
def test_sinkhorn_of_balanced_scores_is_softmax(n_iterations):
    """When the per-sample softmax already gives every prototype the same mass (circulant scores), it is
    Sinkhorn-Knopp's fixed point: the targets are the plain teacher softmax."""
    k = 9
    v = torch.randn(k, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    circulant = torch.stack([v.roll(i) for i in range(k)])  # every column a permutation of v too
    logits = torch.cat([circulant, circulant.flip(0)])  # B = 2K
    out = sinkhorn_knopp(logits, 0.2, n_iterations)
    torch.testing.assert_close(out, F.softmax(logits / 0.2, dim=1), **TOL)


def test_sinkhorn_needs_no_center():
    """A per-prototype offset of the logits (what a center subtracts) does not change the targets after any
    number of iterations (the first step normalises the prototypes); a per-sample offset changes the targets
    of a few iterations and not the converged ones (the balanced scaling of a matrix is unique)."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(20, 16, generator=g, dtype=torch.float64)
    per_prototype = torch.randn(1, 16, generator=g, dtype=torch.float64) * 3
    per_sample = torch.randn(20, 1, generator=g, dtype=torch.float64) * 0.3
    for n_iterations in (1, 3):
        torch.testing.assert_close(sinkhorn_knopp(logits + per_prototype, 0.5, n_iterations),
                                   sinkhorn_knopp(logits, 0.5, n_iterations), **TOL)
    few = sinkhorn_knopp(logits + per_sample, 0.5, 3) - sinkhorn_knopp(logits, 0.5, 3)
    assert few.abs().max() > 1e-3
    torch.testing.assert_close(sinkhorn_knopp(logits + per_sample, 0.5, 300), sinkhorn_knopp(logits, 0.5, 300),
                               rtol=1e-8, atol=1e-10)


def test_sinkhorn_large_scores_do_not_overflow():
    """float32 logits / temp ~ 300: the official exp overflows (inf, NaN); sslkit gives the float64 targets."""
    g = torch.Generator().manual_seed(4)
    base = torch.randn(16, 32, generator=g)
    logits = base + 12.0
    assert torch.isnan(_dinov2_sinkhorn(logits, 0.04, 3)).any()
    out = sinkhorn_knopp(logits, 0.04)
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    want = _dinov2_sinkhorn(logits.double() - 12.0, 0.04, 3).float()  # one offset for all: no change
    torch.testing.assert_close(out, want, rtol=1e-3, atol=1e-6)


def test_float32_under_bf16_autocast():
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 16)
    x, y = torch.randn(2, 6, 8), torch.randn(2, 6, 8)
    mask = torch.tensor([[1, 0, 1, 0, 0, 0], [0, 0, 0, 1, 1, 1]], dtype=torch.bool)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        t, s = layer(x), layer(y)
        assert t.dtype == torch.bfloat16
        sk = sinkhorn_knopp(t.reshape(-1, 16), 0.1)
        probs = ibot_teacher_probs(t, torch.zeros(16), 0.1)
        dense = ibot_patch_loss(probs, s, mask)
        masked = ibot_patch_loss_masked(probs[mask], s[mask], mask)
    assert sk.dtype == probs.dtype == dense.dtype == masked.dtype == torch.float32
    torch.testing.assert_close(sk, sinkhorn_knopp(t.reshape(-1, 16).float(), 0.1))
    torch.testing.assert_close(probs, F.softmax(t.float() / 0.1, dim=-1))
    want = ibot_patch_loss(F.softmax(t.float() / 0.1, dim=-1), s.float(), mask)
    torch.testing.assert_close(dense, want)
    torch.testing.assert_close(masked, want)


def test_sinkhorn_rejects_bad_input():
    with pytest.raises(ValueError):
        sinkhorn_knopp(torch.randn(2, 3, 4), 0.1)
    with pytest.raises(ValueError):
        sinkhorn_knopp(torch.randn(2, 3), 0.1, n_iterations=-1)


# ---------------------------------------------------------------------------------- DDP (gloo, 2 processes)

WORLD = 2
SK_TEMP = 0.1
# name -> (rows of rank 0, rows of rank 1, n_iterations, distributed)
DDP_CASES = {
    "equal": (6, 6, 3, True),
    "unequal": (5, 7, 3, True),
    "equal_zero_iterations": (6, 6, 0, True),
    "equal_local": (6, 6, 3, False),
    "unequal_local": (5, 7, 3, False),
}


def _ddp_worker(rank: int, world: int, logits: torch.Tensor, out_path: str) -> None:
    """Each case on this rank's rows; rank 0 saves max over ranks of max |DDP - one process| / max |one process|."""
    diffs = {}
    for name, (n0, n1, n_iterations, distributed) in DDP_CASES.items():
        rows = slice(0, n0) if rank == 0 else slice(n0, n0 + n1)
        want = _dinov2_sinkhorn(logits[:n0 + n1], SK_TEMP, n_iterations)[rows]
        got = sinkhorn_knopp(logits[rows], SK_TEMP, n_iterations, distributed=distributed)
        diff = ((got - want).abs().max() / want.abs().max()).reshape(1)
        dist.all_reduce(diff, op=dist.ReduceOp.MAX)
        diffs[name] = diff.item()
    if rank == 0:
        torch.save(diffs, out_path)


@pytest.fixture(scope="module")
def ddp_diffs(tmp_path_factory) -> dict:
    """One 2-process gloo run for all cases (a spawn costs seconds)."""
    logits = torch.randn(12, 10, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    out_path = str(tmp_path_factory.mktemp("ddp") / "diffs.pt")
    run_distributed(_ddp_worker, WORLD, logits, out_path)
    return torch.load(out_path)


@pytest.mark.ddp
@pytest.mark.parametrize("name", ["equal", "unequal", "equal_zero_iterations"])
def test_ddp_sinkhorn_matches_single_process(ddp_diffs, name):
    """Rows of rank r are the rows of rank r's samples in one process on the concatenated batch."""
    assert ddp_diffs[name] < 1e-12, f"{name}: differs from one process by {ddp_diffs[name]:.3g} (relative)"


@pytest.mark.ddp
@pytest.mark.parametrize("name", ["equal_local", "unequal_local"])
def test_ddp_sinkhorn_without_all_reduce_differs(ddp_diffs, name):
    """The check can fail: with distributed=False each rank balances its own half, not the global batch."""
    assert ddp_diffs[name] > 1e-3, f"{name}: matches one process ({ddp_diffs[name]:.3g})"
