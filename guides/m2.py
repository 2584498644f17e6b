"""The M2 guide of Kingma et al. (2014): q(y, z | x) = q(y | x) q(z | x, y)."""

from __future__ import annotations

import pyro.distributions as dist
import torch
from torch import Tensor, nn

from guides import Guide, register
from model import GaussianHead, deeper, loc_and_scale


class EncoderZ(nn.Module):
    """mu(x, y), sigma(x, y) of q(z | x, y), hidden_layers hidden ReLU layers over the
    concatenation [x, y].

    The first hidden layer is written W_x x + W_y y: when y is enumerated over the ten
    digits, the 784-wide product W_x x is computed once per image instead of ten times.
    """

    def __init__(self, z_dim: int, hidden_dim: int, num_classes: int, num_pixels: int, hidden_layers: int = 1) -> None:
        super().__init__()
        self.hidden_x = nn.Linear(num_pixels, hidden_dim)
        self.hidden_y = nn.Linear(num_classes, hidden_dim, bias=False)
        self.deeper = deeper(hidden_dim, hidden_layers)
        self.loc_scale = GaussianHead(hidden_dim, 2 * z_dim)

    def forward(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        return loc_and_scale(self.loc_scale(self.deeper(torch.relu(self.hidden_x(x) + self.hidden_y(y)))))


@register("m2")
class M2Guide(Guide):
    """q(y | x)    = Categorical(softmax(encoder_y(x)))
    q(z | x, y) = Normal(mu(x, y), sigma(x, y)),  (mu, sigma) = encoder_z(x, y)

    y is drawn only where the model has it latent; with `--elbo enum` it is summed out.
    """

    def __init__(self, z_dim: int = 50, hidden_dim: int = 500, **options: float | None) -> None:
        super().__init__(z_dim, hidden_dim, **options)
        self.encoder_z = EncoderZ(z_dim, hidden_dim, self.num_classes, self.num_pixels, self.hidden_layers)

    def z_loc(self, x: Tensor, y: Tensor) -> Tensor:
        return self.encoder_z(x, y)[0]

    def q_z(self, x: Tensor, y: Tensor) -> dist.Distribution:
        return dist.Normal(*self.encoder_z(x, y)).to_event(1)
