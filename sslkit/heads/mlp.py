"""The Linear -> BatchNorm -> ReLU MLP that most joint-embedding methods put after the encoder."""

from __future__ import annotations

from torch import nn

from sslkit.registry import check_layers


class ProjectionHead(nn.Module):
    """``num_layers`` linear layers; every one but the last is followed by BatchNorm and ReLU.

    The same module serves as SimCLR's projector (2 layers; v2: 3), BYOL's projector and predictor (2 layers,
    hidden 4096, out 256), VICReg's and Barlow Twins' expanders (3 layers of 8192) and MoCo v3's projector
    (3 layers, ``last_bn``) and predictor (2 layers, ``last_bn``).

    Args:
        in_dim: input feature size.
        hidden_dim: width of the hidden layers.
        out_dim: output size.
        num_layers: linear layers, at least 1.
        last_bn: a BatchNorm without affine parameters after the last layer (SimCLR v2, MoCo v3); the last
            linear layer then has no bias, which the BatchNorm would cancel.
        hidden_bias: bias on the hidden linear layers (off by default: the BatchNorm after them cancels it).

    Example:
        >>> head = ProjectionHead(512, 2048, 128)
        >>> head(torch.randn(8, 512)).shape
        torch.Size([8, 128])
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2, last_bn: bool = False,
                 hidden_bias: bool = False) -> None:
        super().__init__()
        check_layers("a projection head's num_layers", num_layers)
        layers: list[nn.Module] = []
        d = in_dim
        for _ in range(num_layers - 1):
            layers += [nn.Linear(d, hidden_dim, bias=hidden_bias), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
            d = hidden_dim
        layers.append(nn.Linear(d, out_dim, bias=not last_bn))
        if last_bn:
            layers.append(nn.BatchNorm1d(out_dim, affine=False))
        self.net = nn.Sequential(*layers)

    def forward(self, x):  # noqa: ANN001, ANN201 - (N, in_dim) -> (N, out_dim)
        return self.net(x)
