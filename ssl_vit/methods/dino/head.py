"""DINO's projection head (Caron et al., 2021)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.parametrizations import weight_norm


class DINOHead(nn.Module):
    """MLP (GELU; BatchNorm before each GELU with `use_bn`) → bottleneck → L2 normalisation → weight-normalised
    linear map onto `out_dim` prototypes."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 layers: int = 3, norm_last_layer: bool = True, use_bn: bool = False) -> None:
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (layers - 1) + [bottleneck_dim]
        linears = [nn.Linear(dims[i], dims[i + 1]) for i in range(layers)]
        for layer in linears:
            nn.init.trunc_normal_(layer.weight, std=0.02)
            nn.init.zeros_(layer.bias)
        hidden: list[nn.Module] = []
        for layer in linears[:-1]:
            # Batch statistics in training and evaluation alike (no running stats): the EMA teacher, always in
            # eval mode, normalises its batch as DINO's teacher does; each process its own (docs/dino.md).
            norm = [nn.BatchNorm1d(layer.out_features, track_running_stats=False)] if use_bn else []
            hidden += [layer, *norm, nn.GELU()]
        self.mlp = nn.Sequential(*hidden, linears[-1])
        # weight = g · v / ‖v‖ per prototype; the last layer keeps nn.Linear's default init, as in DINO.
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        gain = nn.init.ones_(self.last_layer.parametrizations.weight.original0)  # (out_dim, 1)
        # A fixed unit gain makes the logits plain cosines: slower to sharpen, hence more stable.
        gain.requires_grad_(not norm_last_layer)

    def forward(self, x: Tensor) -> Tensor:
        x = F.normalize(self.mlp(x), dim=-1)  # (N, bottleneck) on the unit sphere
        return self.last_layer(x)  # (N, out_dim)
