"""Guides q(y, z | x) (and q(a, y, z | x) for the auxiliary models), registered by name.

Every module in this folder registers its guides with `@register("name")`; importing
this package imports them all, so a new guide is one new file and nothing else changes.
Each guide names the model it is paired with (`model`, a name in model.MODELS).
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable

import pyro
import pyro.distributions as dist
from torch import Tensor, nn

from model import NUM_CLASSES, NUM_PIXELS, OutputLayer, data_plate, deeper, dropped

GUIDES: dict[str, type[Guide]] = {}
NUM_A_SAMPLES = 10  # draws of a per image when an auxiliary guide classifies (--a-samples)


def register(name: str) -> Callable[[type[Guide]], type[Guide]]:
    """Class decorator: make a guide available as `--guide name`."""

    def add(cls: type[Guide]) -> type[Guide]:
        GUIDES[name] = cls
        return cls

    return add


def mlp(in_dim: int, hidden_dim: int, out_dim: int, hidden_layers: int = 1,
        head: type[OutputLayer] = OutputLayer, dropout: float = 0.0) -> nn.Sequential:
    """hidden_layers hidden ReLU layers of hidden_dim units; one is the M2 paper's network.
    `head` is the output layer's class (model.GaussianHead where it parameterises a Normal);
    every hidden layer is followed by dropout at rate `dropout` in training."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), *dropped(dropout),
                         *deeper(hidden_dim, hidden_layers, dropout), head(hidden_dim, out_dim))


class Guide(nn.Module):
    """Base of every guide: the classifier of record is q(y | x) = Categorical(softmax(encoder_y(x))).

    `forward` is the Pyro guide, with the model's signature; a subclass defines q(z | x, y)
    in `q_z` (and, if it relaxes the digit, `q_latent_y`), names its model in `model` and
    lists in `elbos` the estimators it supports, the default first. `z_has_density` is False
    where q(z | x, y) is a point mass: then neither its ELBO nor importance weights built on
    it bound log p(x). num_a_samples is the number of draws of a over which a guide with
    an auxiliary variable a averages its classifier (guides/auxiliary.py; --a-samples);
    every network has hidden_layers hidden layers of hidden_dim units (--hidden-layers), but
    the classifier, which has classifier_layers where given (--classifier-layers). Its hidden
    layers are followed by dropout at rate classifier_dropout in training
    (--classifier-dropout); measurements put the guide in eval mode, without it.
    """

    model: str = "m2"
    elbos: tuple[str, ...] = ("enum", "trace", "graph", "iwae")
    z_has_density: bool = True

    def __init__(self, z_dim: int = 50, hidden_dim: int = 500, num_classes: int = NUM_CLASSES,
                 num_pixels: int = NUM_PIXELS, num_a_samples: int = NUM_A_SAMPLES, hidden_layers: int = 1,
                 classifier_layers: int | None = None, classifier_dropout: float = 0.0) -> None:
        super().__init__()
        self.num_classes, self.num_pixels, self.num_a_samples = num_classes, num_pixels, num_a_samples
        self.hidden_layers, self.classifier_layers = hidden_layers, classifier_layers or hidden_layers
        self.classifier_dropout = classifier_dropout
        self.encoder_y = mlp(num_pixels, hidden_dim, num_classes, self.classifier_layers, dropout=classifier_dropout)

    def q_y(self, x: Tensor) -> dist.OneHotCategorical:
        """q(y | x) = Categorical(softmax(encoder_y(x))), over one-hot digits: the classifier of record."""
        return dist.OneHotCategorical(logits=self.encoder_y(x).float())

    def classify(self, x: Tensor) -> Tensor:
        """The class probabilities of the classifier of record, q(y | x), one row per image."""
        return self.q_y(x).probs

    def log_q_y(self, x: Tensor, y: Tensor) -> Tensor:
        """log q(y | x) of one-hot labels y: what the classification term alpha * -log q(y | x) reads."""
        return self.q_y(x).log_prob(y)

    def q_latent_y(self, x: Tensor) -> dist.Distribution:
        """What y is drawn from where the model has it latent: q(y | x), unless relaxed."""
        return self.q_y(x)

    def q_z(self, x: Tensor, y: Tensor) -> dist.Distribution:
        """q(z | x, y), over the event of one style vector."""
        raise NotImplementedError

    def z_loc(self, x: Tensor, y: Tensor) -> Tensor:
        """The style the guide infers for image x drawn as digit y (one-hot): E_q[z | x, y]."""
        raise NotImplementedError

    def forward(
        self, x: Tensor, y: Tensor | None = None, idx: Tensor | None = None, size: int | None = None
    ) -> None:
        """q(y, z | x) = q(y | x) q(z | x, y), with y drawn only where the model has it latent."""
        pyro.module("guide", self)
        with data_plate(x, idx, size):
            if y is None:
                y = pyro.sample("y", self.q_latent_y(x))
            pyro.sample("z", self.q_z(x, y))

    def start_epoch(self, epoch: int, epochs: int) -> None:
        """Called by the Trainer as each epoch (1..epochs) starts; guides with a schedule override it."""

    def paired_model(self, model: Callable[..., None]) -> Callable[..., None]:
        """The model that scores this guide's samples: `model` itself, unless the guide draws
        values off the model's support (the relaxed guide's digits)."""
        return model


def make_guide(name: str, z_dim: int = 50, hidden_dim: int = 500, num_classes: int = NUM_CLASSES,
               num_pixels: int = NUM_PIXELS, num_a_samples: int = NUM_A_SAMPLES, hidden_layers: int = 1,
               classifier_layers: int | None = None, classifier_dropout: float = 0.0) -> Guide:
    """The registered guide called `name`, for images of num_pixels in num_classes classes."""
    if name not in GUIDES:
        raise ValueError(f"unknown guide {name!r}; choose one of: {', '.join(sorted(GUIDES))}")
    return GUIDES[name](z_dim=z_dim, hidden_dim=hidden_dim, num_classes=num_classes, num_pixels=num_pixels,
                        num_a_samples=num_a_samples, hidden_layers=hidden_layers,
                        classifier_layers=classifier_layers, classifier_dropout=classifier_dropout)


for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
