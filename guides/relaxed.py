"""The relaxed guide: y drawn by Gumbel-softmax (Jang et al. 2017; Maddison et al. 2017),
reparameterised, with a temperature annealed over the epochs.

How the ELBO scores a relaxed digit follows Jang et al.: the decoder and q(z | x, y) read
the relaxed one-hot, while the y terms are those of the discrete digit,

    log p(y) - log q(y | x)  is scored as  -KL(Categorical(q(y | x)) || Uniform(10))
                                          = -log 10 + H(q(y | x)),

exactly, for every draw. The model's p(y) needs no change for this: its uniform
OneHotCategorical gives sum_k y_k log(1/10) = -log 10 at every point of the simplex, and
`paired_model` only widens the support its argument check accepts from the corners of the
simplex to the whole simplex. The guide's side is `GumbelSoftmax.log_prob`, which returns
E_q[log q(y | x)] = -H(q(y | x)) whatever the draw. The Concrete density itself is never
used: it is a density on the simplex, and -log of it set against the pmf -log 10 would not
be a KL at all.

In eval mode (guide.eval(), as every measurement puts it) the guide draws discrete digits
and is the M2 guide, so its ELBO and log p(x) are those of the same discrete model that
every other guide is measured on.
"""

from __future__ import annotations

from collections.abc import Callable

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.poutine.messenger import Messenger
from torch import Tensor
from torch.distributions import constraints

from guides import register
from guides.m2 import M2Guide

TEMPERATURE_START, TEMPERATURE_END = 1.0, 0.5  # Jang et al.'s range for their MNIST models


class GumbelSoftmax(dist.RelaxedOneHotCategorical):
    """y = softmax((logits + Gumbel noise) / temperature), reparameterised;
    log_prob(y) = E_q[log q(y)] = -H(Categorical(logits)) for every y on the simplex."""

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        neg_entropy = -torch.distributions.Categorical(logits=self.logits).entropy()
        return neg_entropy.expand(value.shape[:-1])


class StraightThroughGumbelSoftmax(GumbelSoftmax):
    """As GumbelSoftmax, but y is the one-hot of the relaxed draw's largest entry; the
    gradient is the relaxed draw's (straight-through, Bengio et al. 2013)."""

    def rsample(self, sample_shape: tuple[int, ...] = ()) -> Tensor:
        soft = super().rsample(sample_shape)
        hard = F.one_hot(soft.argmax(-1), soft.shape[-1]).to(soft)
        return hard + (soft - soft.detach())  # exactly `hard` forward, d soft backward


class SimplexOneHotCategorical(dist.OneHotCategorical):
    """OneHotCategorical whose log_prob, sum_k y_k log p_k, is read on the whole simplex."""

    support = constraints.simplex


class ScoreRelaxedDigits(Messenger):
    """Scores the model's latent y with SimplexOneHotCategorical: the same p(y) numbers,
    with an argument check that accepts relaxed one-hots."""

    def _pyro_sample(self, msg: dict) -> None:
        if msg["name"] == "y" and not msg["is_observed"]:
            msg["fn"] = SimplexOneHotCategorical(probs=msg["fn"].probs)


@register("relaxed")
class RelaxedGuide(M2Guide):
    """q(y | x)    = GumbelSoftmax(softmax(encoder_y(x)), temperature)   in training,
               Categorical(softmax(encoder_y(x)))                    in eval mode
    q(z | x, y) = Normal(mu(x, y), sigma(x, y)),  the M2 guide's encoder_z

    The temperature falls geometrically from 1 to 0.5 over the epochs. y is
    reparameterised, so its gradient is pathwise, through the decoder: no score function.
    """

    elbos = ("trace",)
    relaxation: type[GumbelSoftmax] = GumbelSoftmax

    def __init__(self, z_dim: int = 50, hidden_dim: int = 500, **options: float | None) -> None:
        super().__init__(z_dim, hidden_dim, **options)
        self.temperature = TEMPERATURE_START

    def start_epoch(self, epoch: int, epochs: int) -> None:
        # A function of the epoch alone, like the learning rate, so a resumed run matches.
        progress = (epoch - 1) / max(epochs - 1, 1)
        self.temperature = TEMPERATURE_START * (TEMPERATURE_END / TEMPERATURE_START) ** progress

    def paired_model(self, model: Callable[..., None]) -> Callable[..., None]:
        return ScoreRelaxedDigits()(model)

    def q_y_relaxed(self, x: Tensor) -> GumbelSoftmax:
        logits = self.encoder_y(x).float()
        return self.relaxation(torch.tensor(self.temperature, device=x.device), logits=logits)

    def q_latent_y(self, x: Tensor) -> dist.Distribution:
        return self.q_y_relaxed(x) if self.training else self.q_y(x)

@register("relaxed-hard")
class StraightThroughGuide(RelaxedGuide):
    """The relaxed guide with straight-through digits: the decoder reads exact one-hots,
    the gradient flows through the relaxed draw behind them."""

    relaxation = StraightThroughGumbelSoftmax
