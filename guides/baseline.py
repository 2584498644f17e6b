"""The supervised-only baseline: the classifier q(y | x) trained on the labelled images alone."""

from __future__ import annotations

import pyro.distributions as dist
from torch import Tensor

from guides import Guide, register


@register("baseline")
class BaselineGuide(Guide):
    """q(y | x) = Categorical(softmax(encoder_y(x)))
    q(z | x, y) = p(z) = Normal(0, I)

    Trained with `--elbo none`: no ELBO term, so the loss is alpha * -log q(y | x) on the
    labelled minibatches every other scheme also sees, and the unlabelled images and the
    decoder play no part. q(z) is the prior only so that the guide stays a valid guide.
    """

    elbos = ("none",)

    def __init__(self, z_dim: int = 50, hidden_dim: int = 500, **options: float | None) -> None:
        super().__init__(z_dim, hidden_dim, **options)
        self.z_dim = z_dim

    def z_loc(self, x: Tensor, y: Tensor) -> Tensor:
        return x.new_zeros(*x.shape[:-1], self.z_dim)

    def q_z(self, x: Tensor, y: Tensor) -> dist.Distribution:
        return dist.Normal(x.new_zeros(self.z_dim), 1.0).to_event(1)
