"""The point-estimate guide: the M2 guide with q(z | x, y) collapsed onto its mean."""

from __future__ import annotations

import pyro.distributions as dist
from torch import Tensor

from guides import register
from guides.m2 import M2Guide


@register("delta")
class DeltaGuide(M2Guide):
    """q(y | x)    = Categorical(softmax(encoder_y(x)))
    q(z | x, y) = Delta(mu(x, y)),  mu from the M2 guide's encoder_z (its sigma unused)

    The autoencoder of the lecture's intermezzo as a guide: log q(z) is 0 at the point,
    so the ELBO's -KL(q(z) || p(z)) shrinks to log p(mu), an L2 penalty on the code, and
    nothing asks the decoder to work for the styles around mu. The result is a MAP
    objective, not a bound on log p(x).
    """

    elbos = ("enum", "trace", "graph")
    z_has_density = False

    def q_z(self, x: Tensor, y: Tensor) -> dist.Distribution:
        return dist.Delta(self.z_loc(x, y)).to_event(1)
