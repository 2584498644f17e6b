"""The generative model of Kingma et al. (2014), model M2.

    y ~ Categorical(1/K)                        the class: K = 10 digits for MNIST
    z ~ Normal(0, I)                            the style, z_dim numbers
    x ~ Bernoulli(logits = decoder(y, z))       the pixels (784 for MNIST), independent given (y, z)

Other data sets bring their own K and pixel count (datasets.py).

y is observed for labelled images and latent for the rest; the guide (guides/) supplies
q(y, z | x) for whatever is latent.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from torch import Tensor, nn

NUM_CLASSES = 10
NUM_PIXELS = 784


class Decoder(nn.Module):
    """The likelihood network: logits of p(x | y, z), with one hidden layer.

    The hidden layer reads the concatenation [y, z]; it is written as W_y y + W_z z so
    that, when y is enumerated over the ten digits, the y part costs ten rows, not ten
    copies of the batch (broadcasting does the rest).
    """

    def __init__(self, z_dim: int = 50, hidden_dim: int = 500,
                 num_classes: int = NUM_CLASSES, num_pixels: int = NUM_PIXELS) -> None:
        super().__init__()
        self.hidden_y = nn.Linear(num_classes, hidden_dim, bias=False)
        self.hidden_z = nn.Linear(z_dim, hidden_dim)
        self.logits = nn.Linear(hidden_dim, num_pixels)

    def forward(self, y: Tensor, z: Tensor) -> Tensor:
        """y: one-hot (or relaxed one-hot) digits, z: styles -> pixel logits."""
        return self.logits(torch.relu(self.hidden_y(y) + self.hidden_z(z))).float()


def data_plate(x: Tensor, idx: Tensor | None, size: int | None) -> pyro.plate:
    """The plate over images, shared by the model and every guide.

    idx are the minibatch's indices in a data set of `size` images; the plate scales the
    minibatch's log-density by size / len(idx), so that a step's loss is an unbiased
    estimate of the whole data set's. Without idx the batch is the whole data set.
    """
    return pyro.plate("data", size if idx is not None else len(x), subsample=idx)


def every_class(num_classes: int, like: Tensor) -> Tensor:
    """Every one-hot class, num_classes x 1 x num_classes: broadcast against a batch, it
    scores each image as each class."""
    return torch.eye(num_classes, dtype=like.dtype, device=like.device)[:, None, :]


class M2Model(nn.Module):
    """p(x, y, z) = p(y) p(z) p(x | y, z), the Pyro `model` of M2."""

    def __init__(self, z_dim: int = 50, hidden_dim: int = 500,
                 num_classes: int = NUM_CLASSES, num_pixels: int = NUM_PIXELS) -> None:
        super().__init__()
        self.z_dim, self.num_classes = z_dim, num_classes
        self.decoder = Decoder(z_dim, hidden_dim, num_classes, num_pixels)

    def forward(
        self, x: Tensor, y: Tensor | None = None, idx: Tensor | None = None, size: int | None = None
    ) -> None:
        """Score a minibatch x with one-hot labels y, or with y latent where y is None."""
        pyro.module("decoder", self.decoder)
        with data_plate(x, idx, size):
            prior_y = x.new_full((self.num_classes,), 1.0 / self.num_classes)
            y = pyro.sample("y", dist.OneHotCategorical(probs=prior_y), obs=y)
            prior_z = dist.Normal(x.new_zeros(self.z_dim), 1.0).to_event(1)
            z = pyro.sample("z", prior_z)
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(y, z)).to_event(1), obs=x)

    @torch.no_grad()
    def sample_x_probs(self, y: Tensor, z: Tensor) -> Tensor:
        """E[x | y, z] = sigmoid(decoder(y, z)): the grey image a sample is drawn from."""
        return torch.sigmoid(self.decoder(y, z))
