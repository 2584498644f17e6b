"""The training objective of M2 and the measurements taken of a trained model.

Kingma et al.'s Eq. 9, to be maximised over decoder and guide:

    J^alpha = sum_{(x,y) labelled} L(x, y) + sum_{x unlabelled} U(x)
              + alpha * E_{(x,y) labelled}[log q(y | x)]

    L(x, y) = E_q(z|x,y)[log p(x | y, z) + log p(y) + log p(z) - log q(z | x, y)]
    U(x)    = sum_y q(y | x) L(x, y) + H(q(y | x))

Pyro computes L and U as ELBOs of (model, guide), U by one of these estimators (--elbo):

    enum   TraceEnum_ELBO: y summed out exactly
    trace  Trace_ELBO: y sampled, score-function gradient for q(y | x)
    graph  TraceGraph_ELBO: y sampled, score function with Rao-Blackwellisation (each
           log q(y | x) term multiplies only the costs downstream of y) and a
           decaying-average baseline
    iwae   the importance-weighted bound over K = --num-particles draws of z, y summed
    none   no ELBO: the supervised-only baseline, alpha * -log q(y | x) alone

With --weight-prior sigma, every weight matrix W of the networks gets a prior N(0, sigma^2)
per entry and training maximises J^alpha + log p(W), a MAP estimate of the weights
(Maaløe et al.'s code, with sigma = 1; biases stay unregularised, as there). J^alpha sums
over the whole data set, so log p(W) enters once per step, unscaled.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Protocol

import pyro
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceEnum_ELBO, TraceGraph_ELBO, config_enumerate
from torch import Tensor, nn

from guides import Guide
from model import Model, every_class

DECAYING_AVERAGE = "__baseline_avg_downstream_cost_"  # TraceGraph_ELBO's param-store prefix


class Estimator(Protocol):
    """What the Objective needs of an ELBO: -ELBO as a tensor that differentiates to the
    estimator's gradient (Pyro's ELBOs, and the two below that are not ELBOs of Pyro's)."""

    def differentiable_loss(self, model: Callable[..., None], guide: Callable[..., None],
                            *args, **kwargs) -> Tensor: ...


def log_weights(model: Callable[..., None], guide: Guide, x: Tensor, y: Tensor | None,
                num_samples: int) -> Tensor:
    """log w_k = log p(x, y, z_k) - log q(y, z_k | x) for K = num_samples draws from the guide.

    With y given (one-hot, e.g. every_class for all of them) only z is drawn, z_k ~ q(z | x, y),
    and the weights are those of log p(x, y); with y None, (y_k, z_k) ~ q(y, z | x).
    Shape (K, *batch); the plate is not subsampled, so no data-set scale enters a weight.
    """
    with pyro.plate("particles", num_samples, dim=-3):
        guide_trace = poutine.trace(guide).get_trace(x, y)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x, y)
    return sum(site["fn"].log_prob(site["value"]) for site in model_trace.nodes.values()
               if site["type"] == "sample") - \
        sum(site["fn"].log_prob(site["value"]) for site in guide_trace.nodes.values()
            if site["type"] == "sample")


def iwae_bound(model: Callable[..., None], guide: Guide, x: Tensor, y: Tensor | None,
               num_samples: int) -> Tensor:
    """L_K = log (1/K) sum_k w_k (Burda et al. 2016), per image (and per digit of y)."""
    log_w = log_weights(model, guide, x, y, num_samples)
    return (torch.logsumexp(log_w, 0) - math.log(num_samples)).squeeze(0)


class IWAE:
    """The importance-weighted bound for M2, with y summed out exactly:

        L_K(x, y) = E[log (1/K) sum_k p(x, y, z_k) / q(z_k | x, y)],  z_k ~ q(z | x, y)
        U_K(x)    = sum_y q(y | x) L_K(x, y) + H(q(y | x))

    L_K >= L and U_K >= U, tightening as K grows; K = 1 is enum's estimator. Pyro's
    RenyiELBO(alpha=0) would sample y instead, but it takes the log-mean-exp of weights
    already multiplied by the subsample scale (a minibatch of 200 from 50000 turns the
    mean into a max) and, at alpha = 0, gives a sampled y's q(y | x) no gradient at all.
    """

    def __init__(self, num_particles: int) -> None:
        self.num_particles = num_particles

    def differentiable_loss(self, model: Callable[..., None], guide: Guide, x: Tensor,
                            y: Tensor | None = None, idx: Tensor | None = None,
                            size: int | None = None) -> Tensor:
        if y is not None:
            bound = iwae_bound(model, guide, x, y, self.num_particles)
        else:
            q_y = guide.q_y(x)
            per_digit = iwae_bound(model, guide, x, every_class(guide.num_classes, x), self.num_particles)
            bound = (q_y.probs * per_digit.T).sum(-1) + q_y.entropy()
        scale = size / len(x) if idx is not None else 1.0
        return -scale * bound.sum()


class GraphELBO(TraceGraph_ELBO):
    """TraceGraph_ELBO with the differentiable_loss the other ELBOs have: its value is
    -ELBO, its gradient that of the surrogate loss (score function terms with their
    downstream costs and baselines)."""

    def differentiable_loss(self, model: Callable[..., None], guide: Callable[..., None],
                            *args, **kwargs) -> Tensor:
        # The decaying average is kept per minibatch slot; a minibatch of another size (an
        # epoch's short last one) starts a fresh average instead of failing to broadcast.
        store = pyro.get_param_store()
        for name in [n for n in store if n.startswith(DECAYING_AVERAGE)]:
            if store[name].shape[-1] != len(args[0]):
                del store[name]
        elbo, surrogate_loss = self._loss_and_surrogate_loss(model, guide, args, kwargs)
        return surrogate_loss + (-elbo - surrogate_loss).detach()


class NoELBO:
    """The supervised-only objective: no ELBO term, so only alpha * -log q(y | x) trains."""

    def differentiable_loss(self, model: Callable[..., None], guide: Callable[..., None],
                            x: Tensor, *args, **kwargs) -> Tensor:
        return x.new_zeros(())


def decaying_average_baseline(site: dict) -> dict:
    """TraceGraph_ELBO's options for a guide site: a decaying-average baseline wherever the
    gradient is a score function (y), nothing where it is pathwise (z)."""
    if site["type"] != "sample" or site["fn"].has_rsample:
        return {}
    return {"baseline": {"use_decaying_avg_baseline": True}}


ELBOS: dict[str, Callable[[int], Estimator]] = {
    "enum": lambda k: TraceEnum_ELBO(max_plate_nesting=1, num_particles=k, vectorize_particles=k > 1),
    "trace": lambda k: Trace_ELBO(max_plate_nesting=1, num_particles=k, vectorize_particles=k > 1),
    "graph": lambda k: GraphELBO(max_plate_nesting=1, num_particles=k, vectorize_particles=k > 1),
    "iwae": lambda k: IWAE(num_particles=k),
    "none": lambda k: NoELBO(),
}

# How an estimator needs the guide marked up: which sites to enumerate, which get baselines.
GUIDE_CONFIG: dict[str, Callable[[Guide], Callable[..., None]]] = {
    "enum": lambda guide: config_enumerate(guide, "parallel"),
    "graph": lambda guide: poutine.infer_config(guide, decaying_average_baseline),
}


@contextmanager
def evaluating(module: nn.Module) -> Iterator[nn.Module]:
    """module.eval() inside the block, then back to the mode it had."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


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
    of -log q(y | x) over the labelled minibatch (guide.log_q_y: for the auxiliary guides,
    -log q(y | a, x) at a ~ q(a | x)), which the loss weighs by alpha.

    labelled_weight multiplies every L(x, y): 1 is Eq. 9's sum; N / N_l gives the labelled
    images' mean ELBO the weight of the unlabelled images' mean, as Maaløe et al.'s code does.
    weight_prior is sigma of the prior N(0, sigma^2) on every weight matrix, None for none.
    """

    def __init__(
        self, model: Model, guide: Guide, elbo: str, alpha: float,
        num_labelled: int, num_unlabelled: int, num_particles: int = 1, labelled_weight: float = 1.0,
        weight_prior: float | None = None,
    ) -> None:
        self.model, self.guide, self.alpha = guide.paired_model(model), guide, alpha
        self.weight_prior = weight_prior
        self.weights = [p for module in (model, guide) for p in module.parameters() if p.dim() > 1]
        self.labelled_weight = labelled_weight
        self.num_labelled, self.num_unlabelled = num_labelled, num_unlabelled
        self.elbo_u = ELBOS[elbo](num_particles)
        # A labelled image has no discrete latent, so the estimators that differ only in how
        # they treat y all reduce to Trace_ELBO there; iwae and none differ in z or drop it.
        self.elbo_l = self.elbo_u if elbo in ("iwae", "none") else Trace_ELBO(
            max_plate_nesting=1, num_particles=num_particles, vectorize_particles=num_particles > 1)
        self.guide_u = GUIDE_CONFIG[elbo](guide) if elbo in GUIDE_CONFIG else guide

    def __call__(self, batch: Batch) -> tuple[Tensor, Tensor]:
        loss = batch.x_l.new_zeros(())
        if len(batch.idx_l):
            # A product rather than poutine.scale: the iwae bound is not linear in a site's scale.
            loss = loss + self.labelled_weight * self.elbo_l.differentiable_loss(
                self.model, self.guide, batch.x_l, batch.y_l, batch.idx_l, self.num_labelled)
        if len(batch.idx_u):
            loss = loss + self.elbo_u.differentiable_loss(
                self.model, self.guide_u, batch.x_u, None, batch.idx_u, self.num_unlabelled)
        classification = -self.guide.log_q_y(batch.x_l, batch.y_l).mean()
        return loss, classification

    def total(self, elbo_loss: Tensor, classification_loss: Tensor) -> Tensor:
        """The loss that is differentiated: -J^alpha (the weight prior's part is add_prior_gradient)."""
        return elbo_loss + self.alpha * classification_loss

    @torch.no_grad()
    def add_prior_gradient(self) -> None:
        """After backward, add the gradient of -log N(W; 0, sigma^2), W / sigma^2, to each weight
        matrix's: the same as -log p(W) in the loss, without its autograd graph (18-24 ms a step
        against 0.3 ms on sdgm's weights, EPYC-C; docs/experiments.md). No-op without a prior."""
        if self.weight_prior is None:
            return
        for w in self.weights:
            if w.grad is not None:  # a network the estimator leaves untrained stays as it is
                w.grad.add_(w, alpha=self.weight_prior ** -2)


@torch.no_grad()
def predict(guide: Guide, x: Tensor, batch_size: int = 2000) -> Tensor:
    """The integer class of each image: the mode of the guide's classifier of record."""
    return torch.cat([guide.classify(xb).argmax(-1) for xb in x.split(batch_size)])


def accuracy(guide: Guide, x: Tensor, y: Tensor) -> float:
    """Fraction of images whose prediction is their label; y are integer labels."""
    return (predict(guide, x) == y).sum().item() / len(x)


@torch.no_grad()
def elbo_per_image(model: Model, guide: Guide, x: Tensor, batch_size: int = 1000) -> float:
    """Mean U(x) in nats per image, with y summed out exactly and one draw of z.

    The guide is read in eval mode, where every guide's y is a discrete digit (the relaxed
    guide's too), so U bounds the log p(x) of the one model all guides share.
    """
    elbo = TraceEnum_ELBO(max_plate_nesting=1)
    with evaluating(guide):
        enumerated = config_enumerate(guide, "parallel")
        return -sum(elbo.loss(model, enumerated, xb) for xb in x.split(batch_size)) / len(x)
