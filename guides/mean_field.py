"""The mean-field guide: q(y, z | x) = q(y | x) q(z | x), the style encoder blind to the digit."""

from __future__ import annotations

import pyro.distributions as dist
from torch import Tensor, nn

from guides import Guide, mlp, register
from model import GaussianHead, loc_and_scale


class StyleEncoder(nn.Module):
    """mu(x), sigma(x) of q(z | x): hidden_layers hidden ReLU layers over the image alone."""

    def __init__(self, z_dim: int, hidden_dim: int, num_pixels: int, hidden_layers: int = 1) -> None:
        super().__init__()
        self.net = mlp(num_pixels, hidden_dim, 2 * z_dim, hidden_layers, GaussianHead)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return loc_and_scale(self.net(x))


@register("mean-field")
class MeanFieldGuide(Guide):
    """q(y | x) = Categorical(softmax(encoder_y(x)))
    q(z | x) = Normal(mu(x), sigma(x)),  (mu, sigma) = encoder_z(x)

    Encoder, classifier and decoder are three separate networks, the digit joining the
    style only in the decoder. Every digit of an image shares one z, so q cannot express
    that the style which explains x depends on which digit x is read as.
    """

    def __init__(self, z_dim: int = 50, hidden_dim: int = 500, **options: float | None) -> None:
        super().__init__(z_dim, hidden_dim, **options)
        self.encoder_z = StyleEncoder(z_dim, hidden_dim, self.num_pixels, self.hidden_layers)

    def z_loc(self, x: Tensor, y: Tensor) -> Tensor:
        return self.encoder_z(x)[0]

    def q_z(self, x: Tensor, y: Tensor) -> dist.Distribution:
        return dist.Normal(*self.encoder_z(x)).to_event(1)
