"""Measurements that set inference schemes side by side: a tighter bound on log p(x), the
variance of the gradient that trains the classifier, and the time taken to reach an accuracy.

Accuracy and the test ELBO are inference.accuracy and inference.elbo_per_image.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from guides import Guide
from inference import Objective, iwae_bound
from model import Model, every_class

GRADIENT_WARMUP = 30  # draws discarded before measuring, so a decaying-average baseline has settled


@torch.no_grad()
def log_px(model: Model, guide: Guide, x: Tensor, num_samples: int = 100) -> float:
    """Mean importance-sampled estimate of log p(x) in nats per image:

        log p^(x) = log sum_y (1/K) sum_k p(x, y, z_k) / q(z_k | x, y),  z_k ~ q(z | x, y)

    K = num_samples draws of z from the guide for each digit y (of (a, z) ~ q(a | x)
    q(z | a, x, y) for the auxiliary guides, whose weights then also hold p(a | ...) / q(a | x)),
    the ten digits summed exactly rather than sampled from q(y | x). E[log p^(x)] <= log p(x), rises towards it
    as K grows (Burda et al. 2016), and is >= the ELBO U(x). Meaningless where q(z | x, y)
    has no density (guide.z_has_density False): the weights are then joint densities.
    """
    # About 16k decoder passes per batch keeps memory near 100 MB whatever K is.
    batch_size = max(1, 2**14 // (model.num_classes * num_samples))
    total = sum(torch.logsumexp(iwae_bound(model, guide, xb, every_class(model.num_classes, xb), num_samples),
                                0).sum().item()
                for xb in x.split(batch_size))
    return total / len(x)


def gradient_variance(objective: Objective, x: Tensor, repeats: int = 50) -> float:
    """tr Cov[g]: the summed variance over `repeats` independent draws of

        g = grad_phi (-1/|x|) sum_x U^(x),   phi = encoder_y's parameters,

    U^ being the objective's estimator of U on the fixed unlabelled images x. This is the
    noise in the gradient that trains q(y | x) from unlabelled images: a score function
    (trace, graph), a pathwise derivative through relaxed digits, or only z's noise (enum).
    """
    params = list(objective.guide.encoder_y.parameters())
    draws = []
    for i in range(GRADIENT_WARMUP + repeats):
        loss = objective.elbo_u.differentiable_loss(objective.model, objective.guide_u, x, None) / len(x)
        grads = torch.autograd.grad(loss, params)
        if i >= GRADIENT_WARMUP:
            draws.append(torch.cat([g.flatten() for g in grads]))
    return torch.stack(draws).var(0).sum().item()


def seconds_to_accuracy(rows: Sequence[dict[str, float]], target: float, with_evaluation: bool = False) -> float:
    """Training seconds (steps only, summed over epochs; with the evaluation after each epoch
    if with_evaluation) until test accuracy first reaches target; nan if it never does."""
    elapsed = 0.0
    for row in rows:
        elapsed += row["seconds"] + (row["eval_seconds"] if with_evaluation else 0.0)
        if row["test_accuracy"] >= target:
            return elapsed
    return math.nan
