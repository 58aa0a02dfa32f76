"""DINO's projection head (Caron et al., 2021, section 3.1 and appendix; the official ``DINOHead``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from sslkit.registry import check_layers

HEAD_INIT_STD = 0.02  # truncated-normal std of the head's MLP weights (official DINOHead._init_weights)



class DINOHead(nn.Module):
    """Projection head: MLP -> L2 normalisation -> weight-normalised linear layer without bias.

    Paper section 3.1 / appendix: 3 layers, hidden 2048, GELU, bottleneck 256, then K outputs.

    Args:
        in_dim: encoder feature size.
        out_dim: K, the number of output "prototypes".
        hidden_dim, bottleneck_dim, num_layers: MLP shape (``num_layers`` linear layers before the last layer).
        use_bn: BatchNorm after each hidden linear layer (official: off for ViTs).
        norm_last_layer: fix the weight-norm magnitude g to 1 (not trainable), so only directions are learnt.

    Example:
        >>> head = DINOHead(192, 4096)
        >>> head(torch.randn(8, 192)).shape
        torch.Size([8, 4096])
    """

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 num_layers: int = 3, use_bn: bool = False, norm_last_layer: bool = True) -> None:
        super().__init__()
        check_layers("the DINO head's num_layers (objective.head_layers)", num_layers)
        layers: list[nn.Module] = []
        d = in_dim
        for _ in range(num_layers - 1):
            layers += [nn.Linear(d, hidden_dim), *([nn.BatchNorm1d(hidden_dim)] if use_bn else []), nn.GELU()]
            d = hidden_dim
        layers.append(nn.Linear(d, bottleneck_dim))
        self.mlp = nn.Sequential(*layers)
        self.mlp.apply(_init_linear)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        magnitude = self.last_layer.parametrizations.weight.original0  # g: (out_dim, 1)
        with torch.no_grad():
            magnitude.fill_(1.0)
        magnitude.requires_grad_(not norm_last_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_dim) -> (N, out_dim)."""
        z = F.normalize(self.mlp(x), dim=-1)  # (N, bottleneck) on the unit sphere
        return self.last_layer(z)


def _init_linear(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=HEAD_INIT_STD)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
