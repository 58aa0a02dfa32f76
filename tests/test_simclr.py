import pytest
import torch
from lightly.loss import DCLLoss, NTXentLoss

from sslkit.objectives.simclr import SimCLR, SimCLRConfig, nt_xent
from sslkit.plugins import load_all
from sslkit.registry import ENCODERS

from .dist_utils import run_distributed

load_all()


@pytest.mark.parametrize("temperature", [0.07, 0.1, 0.5, 1.0])
@pytest.mark.parametrize("batch", [1, 2, 7, 64])
def test_nt_xent_equals_lightly(temperature, batch):
    g = torch.Generator().manual_seed(batch * 100 + int(temperature * 100))
    for _ in range(3):
        z0 = torch.randn(batch, 32, generator=g, requires_grad=True)
        z1 = torch.randn(batch, 32, generator=g, requires_grad=True)
        ours = nt_xent(z0, z1, temperature)
        ref = NTXentLoss(temperature=temperature)(z0, z1)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
        g_ours = torch.autograd.grad(ours, [z0, z1])
        g_ref = torch.autograd.grad(NTXentLoss(temperature=temperature)(z0, z1), [z0, z1])
        for a, b in zip(g_ours, g_ref):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("temperature", [0.1, 0.5])
@pytest.mark.parametrize("batch", [2, 9, 64])
def test_decoupled_nt_xent_equals_lightly_dcl(temperature, batch):
    g = torch.Generator().manual_seed(batch + int(temperature * 10))
    z0 = torch.randn(batch, 16, generator=g, requires_grad=True)
    z1 = torch.randn(batch, 16, generator=g, requires_grad=True)
    ours = nt_xent(z0, z1, temperature, decoupled=True)
    ref = DCLLoss(temperature=temperature)(z0, z1)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(torch.autograd.grad(ours, [z0, z1]), torch.autograd.grad(DCLLoss(temperature)(z0, z1), [z0, z1])):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    # and it is a different loss: the positive's term is missing from the denominator
    assert not torch.allclose(ours, nt_xent(z0, z1, temperature))


def test_nt_xent_positive_pairs_lower_the_loss():
    z = torch.randn(16, 32)
    assert nt_xent(z, z + 0.01 * torch.randn_like(z), 0.1) < nt_xent(z, torch.randn(16, 32), 0.1)


def _objective(seed: int = 0) -> SimCLR:
    torch.manual_seed(seed)
    # LayerNorm-only encoder and a linear head: per-sample computation, so DDP and one process must agree.
    enc = ENCODERS.build("vit_tiny_patch4_32", depth=1, embed_dim=32, num_heads=2)
    return SimCLR(enc, SimCLRConfig(proj_layers=1, proj_out_dim=16, temperature=0.2))


def _batch(n: int = 8):
    g = torch.Generator().manual_seed(123)
    return [torch.randn(n, 3, 16, 16, generator=g), torch.randn(n, 3, 16, 16, generator=g)]


def _ddp_worker(rank, world, out_path):
    from torch.nn.parallel import DistributedDataParallel as DDP

    obj = _objective()
    model = DDP(obj)
    x0, x1 = _batch()
    n = x0.shape[0] // world
    local = [x0[rank * n:(rank + 1) * n], x1[rank * n:(rank + 1) * n]]
    loss = model(local)["loss"]
    loss.backward()
    losses = [torch.zeros(()) for _ in range(world)]
    torch.distributed.all_gather(losses, loss.detach())
    if rank == 0:
        grads = {k: p.grad.clone() for k, p in obj.named_parameters()}
        torch.save({"losses": torch.stack(losses), "grads": grads}, out_path)


@pytest.mark.ddp
def test_ddp_gloo_matches_single_process(tmp_path):
    out = tmp_path / "ddp.pt"
    run_distributed(_ddp_worker, 2, str(out))
    ddp = torch.load(out, weights_only=True)

    obj = _objective()
    loss = obj(_batch())["loss"]
    loss.backward()
    # Each rank's loss is the mean over its own anchors against all negatives; their mean is the global loss.
    torch.testing.assert_close(ddp["losses"].mean(), loss.detach(), rtol=1e-5, atol=1e-6)
    for k, p in obj.named_parameters():
        torch.testing.assert_close(ddp["grads"][k], p.grad, rtol=1e-4, atol=1e-6, msg=f"gradient of {k}")


def test_local_negatives_differ_from_global():
    """The check above can fail: contrasting only local negatives gives a different loss."""
    x0, x1 = _batch()
    full = nt_xent(x0.flatten(1), x1.flatten(1), 0.2)
    local = (nt_xent(x0[:4].flatten(1), x1[:4].flatten(1), 0.2) + nt_xent(x0[4:].flatten(1), x1[4:].flatten(1), 0.2)) / 2
    assert not torch.allclose(full, local)
