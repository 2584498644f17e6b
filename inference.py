"""The training objective of M2 and the measurements taken of a trained model.

Kingma et al.'s Eq. 9, to be maximised over decoder and guide:

    J^alpha = sum_{(x,y) labelled} L(x, y) + sum_{x unlabelled} U(x)
              + alpha * E_{(x,y) labelled}[log q(y | x)]

    L(x, y) = E_q(z|x,y)[log p(x | y, z) + log p(y) + log p(z) - log q(z | x, y)]
    U(x)    = sum_y q(y | x) L(x, y) + H(q(y | x))

Pyro computes L and U as ELBOs of (model, guide): U with y enumerated (TraceEnum_ELBO,
exact sum over the ten digits) or sampled (Trace_ELBO, the score-function estimator).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from pyro.infer import ELBO, Trace_ELBO, TraceEnum_ELBO, config_enumerate
from torch import Tensor

from guides import Guide
from model import M2Model

ELBOS: dict[str, Callable[[int], ELBO]] = {
    "enum": lambda k: TraceEnum_ELBO(max_plate_nesting=1, num_particles=k, vectorize_particles=k > 1),
    "trace": lambda k: Trace_ELBO(max_plate_nesting=1, num_particles=k, vectorize_particles=k > 1),
}


@dataclass
class Batch:
    """One step's data: a labelled minibatch, an unlabelled minibatch, their indices."""

    x_l: Tensor
    y_l: Tensor  # one-hot
    idx_l: Tensor
    x_u: Tensor
    idx_u: Tensor


class Objective:
    """-J^alpha for one step, split as (elbo_loss, classification_loss).

    elbo_loss is an unbiased estimate of -(sum_l L + sum_u U) over the whole training set
    (the plates scale each minibatch up to its data set); classification_loss is the mean
    of -log q(y | x) over the labelled minibatch, which the loss weighs by alpha.
    """

    def __init__(
        self, model: M2Model, guide: Guide, elbo: str, alpha: float,
        num_labelled: int, num_unlabelled: int, num_particles: int = 1,
    ) -> None:
        self.model, self.guide, self.alpha = model, guide, alpha
        self.num_labelled, self.num_unlabelled = num_labelled, num_unlabelled
        # A labelled image has no discrete latent, so every estimator reduces to this one.
        self.elbo_l = Trace_ELBO(max_plate_nesting=1, num_particles=num_particles,
                                 vectorize_particles=num_particles > 1)
        self.elbo_u = ELBOS[elbo](num_particles)
        self.guide_u = config_enumerate(guide, "parallel") if elbo == "enum" else guide

    def __call__(self, batch: Batch) -> tuple[Tensor, Tensor]:
        loss = batch.x_l.new_zeros(())
        if len(batch.idx_l):
            loss = loss + self.elbo_l.differentiable_loss(
                self.model, self.guide, batch.x_l, batch.y_l, batch.idx_l, self.num_labelled)
        if len(batch.idx_u):
            loss = loss + self.elbo_u.differentiable_loss(
                self.model, self.guide_u, batch.x_u, None, batch.idx_u, self.num_unlabelled)
        classification = -self.guide.q_y(batch.x_l).log_prob(batch.y_l).mean()
        return loss, classification

    def total(self, elbo_loss: Tensor, classification_loss: Tensor) -> Tensor:
        """The loss that is differentiated: -J^alpha."""
        return elbo_loss + self.alpha * classification_loss


@torch.no_grad()
def accuracy(guide: Guide, x: Tensor, y: Tensor, batch_size: int = 10000) -> float:
    """Fraction of images whose label is the mode of q(y | x); y are integer labels."""
    correct = sum(
        (guide.encoder_y(xb).argmax(-1) == yb).sum().item()
        for xb, yb in zip(x.split(batch_size), y.split(batch_size))
    )
    return correct / len(x)


@torch.no_grad()
def elbo_per_image(model: M2Model, guide: Guide, x: Tensor, batch_size: int = 1000) -> float:
    """Mean U(x) in nats per image, with y summed out exactly and one draw of z."""
    elbo = TraceEnum_ELBO(max_plate_nesting=1)
    enumerated = config_enumerate(guide, "parallel")
    return -sum(elbo.loss(model, enumerated, xb) for xb in x.split(batch_size)) / len(x)
