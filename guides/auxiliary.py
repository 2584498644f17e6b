"""The guide of the auxiliary deep generative models (Maaløe et al. 2016), SDGM and ADGM:

    q(a, y, z | x) = q(a | x) q(y | a, x) q(z | a, x, y)

a is drawn first and never enumerated (it is continuous); y is then summed out under
`--elbo enum` or drawn under `--elbo trace`, and z drawn for each y. Through a, q(y | a, x)
is a continuous mixture over a, a more flexible classifier than M2's q(y | x); the
classifier of record is that mixture, q(y | x) = E_q(a|x)[q(y | a, x)], averaged over
num_a_samples draws of a (--a-samples).

The two models share this guide and differ only in where p puts a (model.py); a has
z_dim numbers there and here.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
from torch import Tensor

from guides import Guide, register
from model import ConcatMLP, GaussianHead, data_plate, diagonal_normal


class AuxiliaryGuide(Guide):
    """q(a | x)       = N(mu(x), sigma(x)),              (mu, sigma) = encoder_a(x)
    q(y | a, x)    = Categorical(softmax(encoder_y(x, a)))
    q(z | a, x, y) = N(mu(x, a, y), sigma(x, a, y)),  (mu, sigma) = encoder_z(x, a, y)

    The importance-weighted estimator (iwae) is not offered: it sums y out under M2's q(y | x).
    """

    elbos = ("enum", "trace")

    def __init__(self, z_dim: int = 50, hidden_dim: int = 500, **options: float | None) -> None:
        super().__init__(z_dim, hidden_dim, **options)
        a_dim = z_dim
        layers = self.hidden_layers
        self.encoder_a = ConcatMLP((self.num_pixels,), hidden_dim, 2 * a_dim, layers, GaussianHead)
        # q(y | a, x) reads a as well as x: it replaces the base class's q(y | x) network.
        self.encoder_y = ConcatMLP((self.num_pixels, a_dim), hidden_dim, self.num_classes, self.classifier_layers,
                                   dropout=self.classifier_dropout)
        self.encoder_z = ConcatMLP((self.num_pixels, a_dim, self.num_classes), hidden_dim, 2 * z_dim, layers, GaussianHead)

    def q_a(self, x: Tensor) -> dist.Distribution:
        """q(a | x) = N(mu(x), sigma(x))."""
        return diagonal_normal(self.encoder_a(x))

    def q_y_ax(self, x: Tensor, a: Tensor) -> dist.OneHotCategorical:
        """q(y | a, x) = Categorical(softmax(encoder_y(x, a))), over one-hot classes."""
        return dist.OneHotCategorical(logits=self.encoder_y(x, a).float())

    def q_z_axy(self, x: Tensor, a: Tensor, y: Tensor) -> dist.Distribution:
        """q(z | a, x, y) = N(mu(x, a, y), sigma(x, a, y))."""
        return diagonal_normal(self.encoder_z(x, a, y))

    def q_y(self, x: Tensor) -> dist.OneHotCategorical:
        """The classifier of record, q(y | x) = E_q(a|x)[q(y | a, x)] ~= (1/S) sum_s q(y | a_s, x),
        a_s ~ q(a | x), S = num_a_samples."""
        a = self.q_a(x).sample((self.num_a_samples,))
        return dist.OneHotCategorical(probs=self.q_y_ax(x, a).probs.mean(0))

    def log_q_y(self, x: Tensor, y: Tensor) -> Tensor:
        """log q(y | a, x) at one reparameterised draw a ~ q(a | x): Maaløe et al.'s
        classification term, which trains q(a | x) through a as well."""
        return self.q_y_ax(x, self.q_a(x).rsample()).log_prob(y)

    def z_loc(self, x: Tensor, y: Tensor) -> Tensor:
        """E_q[z | a, x, y] at a = E_q[a | x]."""
        return self.q_z_axy(x, self.q_a(x).mean, y).mean

    def forward(
        self, x: Tensor, y: Tensor | None = None, idx: Tensor | None = None, size: int | None = None
    ) -> None:
        """q(a, y, z | x) = q(a | x) q(y | a, x) q(z | a, x, y), with y drawn only where the
        model has it latent."""
        pyro.module("guide", self)
        with data_plate(x, idx, size):
            a = pyro.sample("a", self.q_a(x))
            if y is None:
                y = pyro.sample("y", self.q_y_ax(x, a))
            pyro.sample("z", self.q_z_axy(x, a, y))


@register("sdgm")
class SDGMGuide(AuxiliaryGuide):
    """The auxiliary guide paired with SDGM's p(y) p(z) p(a | z, y) p(x | a, z, y)."""

    model = "sdgm"


@register("adgm")
class ADGMGuide(AuxiliaryGuide):
    """The auxiliary guide paired with ADGM's p(y) p(z) p(x | y, z) p(a | x, y, z)."""

    model = "adgm"
