"""The generative models, registered by name: Kingma et al.'s (2014) M2, and the two
auxiliary deep generative models of Maaløe et al. (2016), SDGM and ADGM.

M2:
    y ~ Categorical(1/K)                        the class: K = 10 digits for MNIST
    z ~ Normal(0, I)                            the style, z_dim numbers
    x ~ Bernoulli(logits = decoder(y, z))       the pixels (784 for MNIST), independent given (y, z)

Other data sets bring their own K and pixel count (datasets.py). SDGM puts an auxiliary a
between (y, z) and x, p(a | z, y) p(x | a, z, y); ADGM generates it after x,
p(x | y, z) p(a | x, y, z), which leaves M2's p(x, y, z) as it is. Both exist to give the
guide a richer q (guides/auxiliary.py).

y is observed for labelled images and latent for the rest; the guide (guides/) supplies
q for whatever is latent. Each guide names the model it is paired with (`Guide.model`), so
a new model is a class here with `@register_model("name")` and the training loop does not
change.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch import Tensor, nn

NUM_CLASSES = 10
NUM_PIXELS = 784
MIN_SCALE = 1e-3  # a floor on every sigma keeps log-densities finite when a network saturates


def dropped(p: float) -> list[nn.Module]:
    """Dropout at rate p after a hidden layer's ReLU, or nothing where p = 0, so that a network
    without dropout keeps the module indices (and state-dict keys) it always had."""
    return [nn.Dropout(p)] if p > 0 else []


def deeper(hidden_dim: int, hidden_layers: int, dropout: float = 0.0) -> nn.Sequential:
    """The hidden layers after a network's first: hidden_layers - 1 of ReLU(W h + b), none
    for the one hidden layer of the M2 paper (Maaløe et al.'s networks have two), each
    followed by dropout at rate `dropout` in training."""
    return nn.Sequential(*(m for _ in range(hidden_layers - 1)
                           for m in (nn.Linear(hidden_dim, hidden_dim), nn.ReLU(), *dropped(dropout))))


class OutputLayer(nn.Linear):
    """A network's last layer: a Linear layer, marked so that maaloe_init can tell it from
    the hidden layers, which feed a ReLU."""


class GaussianHead(OutputLayer):
    """The output layer of a network whose output [m, s] loc_and_scale reads as (mu, sigma)."""


class Decoder(nn.Module):
    """The likelihood network: logits of p(x | y, z), hidden_layers hidden ReLU layers.

    The first hidden layer reads the concatenation [y, z]; it is written as W_y y + W_z z
    so that, when y is enumerated over the ten digits, the y part costs ten rows, not ten
    copies of the batch (broadcasting does the rest).
    """

    def __init__(self, z_dim: int = 50, hidden_dim: int = 500, num_classes: int = NUM_CLASSES,
                 num_pixels: int = NUM_PIXELS, hidden_layers: int = 1) -> None:
        super().__init__()
        self.hidden_y = nn.Linear(num_classes, hidden_dim, bias=False)
        self.hidden_z = nn.Linear(z_dim, hidden_dim)
        self.deeper = deeper(hidden_dim, hidden_layers)
        self.logits = OutputLayer(hidden_dim, num_pixels)

    def forward(self, y: Tensor, z: Tensor) -> Tensor:
        """y: one-hot (or relaxed one-hot) digits, z: styles -> pixel logits."""
        return self.logits(self.deeper(torch.relu(self.hidden_y(y) + self.hidden_z(z)))).float()


class ConcatMLP(nn.Module):
    """hidden_layers hidden ReLU layers over the concatenation [v_1, ..., v_n] of its inputs.

    The first hidden layer is written W_1 v_1 + ... + W_n v_n, as in Decoder: an input that
    only broadcasts against the others (y enumerated over the classes, several draws of a)
    is multiplied once, not once per copy. `head` is the output layer's class (GaussianHead
    where the output parameterises a Normal); every hidden layer is followed by dropout at
    rate `dropout` in training.
    """

    def __init__(self, in_dims: Sequence[int], hidden_dim: int, out_dim: int, hidden_layers: int = 1,
                 head: type[OutputLayer] = OutputLayer, dropout: float = 0.0) -> None:
        super().__init__()
        self.hidden = nn.ModuleList(nn.Linear(d, hidden_dim, bias=i == 0) for i, d in enumerate(in_dims))
        # The first hidden layer's dropout leads `deeper`, so a network without it makes no extra call.
        self.deeper = nn.Sequential(*dropped(dropout), *deeper(hidden_dim, hidden_layers, dropout))
        self.out = head(hidden_dim, out_dim)

    def forward(self, *inputs: Tensor) -> Tensor:
        first = torch.relu(sum(layer(v) for layer, v in zip(self.hidden, inputs, strict=True)))
        return self.out(self.deeper(first)).float()


def loc_and_scale(params: Tensor) -> tuple[Tensor, Tensor]:
    """A network's output [m, s] read as mu = m, sigma = softplus(s) + MIN_SCALE."""
    loc, scale = params.float().chunk(2, dim=-1)
    return loc, F.softplus(scale) + MIN_SCALE


def diagonal_normal(params: Tensor) -> dist.Distribution:
    """N(mu, diag(sigma^2)) over one vector, (mu, sigma) = loc_and_scale(params)."""
    return dist.Normal(*loc_and_scale(params)).to_event(1)


@torch.no_grad()
def maaloe_init(network: nn.Module, std: float) -> None:
    """Maaløe et al.'s initialisation (--init-std; 1e-3 in their code): every bias, and the
    weights of every GaussianHead, drawn from N(0, std^2); the other weights from Glorot's
    normal, with the ReLU gain sqrt(2) where a ReLU follows. The scale half of each
    GaussianHead's bias is offset so that sigma = softplus(s) + MIN_SCALE starts at 1, as their
    log-variances start near 0: with std small, every Normal the network outputs, q(a | x),
    q(z | ...), p(a | ...), starts near N(0, I)."""
    for layer in network.modules():
        if not isinstance(layer, nn.Linear):
            continue
        if isinstance(layer, GaussianHead):
            layer.weight.normal_(0.0, std)
            layer.bias.normal_(0.0, std).chunk(2)[1].add_(math.log(math.expm1(1.0 - MIN_SCALE)))  # softplus^-1
            continue
        gain = 1.0 if isinstance(layer, OutputLayer) else nn.init.calculate_gain("relu")
        nn.init.xavier_normal_(layer.weight, gain)
        if layer.bias is not None:
            layer.bias.normal_(0.0, std)


class BernoulliPixels(dist.Independent):
    """p(x | l) = prod_p Bernoulli(x_p | sigmoid(l_p)) over the last dim, the pixels of one image:

        log p(x | l) = sum_p x_p l_p - softplus(l_p)

    It is dist.Bernoulli(logits=l).to_event(1), as `pixels(l)` builds it, with a log_prob that
    writes two pixel-sized tensors where torch's binary_cross_entropy_with_logits writes five.
    Enumeration scores ten of them per image, and on a bf16 CPU the saving is 5-7% of a
    training step (README, "Speed"); tests/test_model.py checks that the two agree.
    """

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        logits = self.base_dist.logits
        return (value * logits).sum(-1) - F.softplus(logits).sum(-1)


def pixels(logits: Tensor) -> BernoulliPixels:
    """x ~ Bernoulli(logits = l), independent over the pixels (the last dim)."""
    return BernoulliPixels(dist.Bernoulli(logits=logits), 1)


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


class Model(nn.Module):
    """Base of every model: p(y) p(z) p(x, ... | y, z), the Pyro `model`.

    A subclass defines in `sample_x` the sites below y and z (x, and an auxiliary a where
    the model has one) and in `sample_x_probs` the grey image a sample is drawn from.
    """

    def __init__(self, z_dim: int, num_classes: int) -> None:
        super().__init__()
        self.z_dim, self.num_classes = z_dim, num_classes

    def forward(
        self, x: Tensor, y: Tensor | None = None, idx: Tensor | None = None, size: int | None = None
    ) -> None:
        """Score a minibatch x with one-hot labels y, or with y latent where y is None."""
        pyro.module("model", self)
        with data_plate(x, idx, size):
            prior_y = x.new_full((self.num_classes,), 1.0 / self.num_classes)
            y = pyro.sample("y", dist.OneHotCategorical(probs=prior_y), obs=y)
            prior_z = dist.Normal(x.new_zeros(self.z_dim), 1.0).to_event(1)
            z = pyro.sample("z", prior_z)
            self.sample_x(x, y, z)

    def sample_x(self, x: Tensor, y: Tensor, z: Tensor) -> None:
        """The sites below y and z, with x observed."""
        raise NotImplementedError

    def sample_x_probs(self, y: Tensor, z: Tensor) -> Tensor:
        """The grey image that a sample of class y (one-hot) in style z is drawn from."""
        raise NotImplementedError


MODELS: dict[str, type[Model]] = {}


def register_model(name: str) -> Callable[[type[Model]], type[Model]]:
    """Class decorator: make a model available to guides whose `model` is `name`."""

    def add(cls: type[Model]) -> type[Model]:
        MODELS[name] = cls
        return cls

    return add


def make_model(name: str, z_dim: int = 50, hidden_dim: int = 500, num_classes: int = NUM_CLASSES,
               num_pixels: int = NUM_PIXELS, hidden_layers: int = 1) -> Model:
    """The registered model called `name`, for images of num_pixels in num_classes classes,
    every network hidden_layers hidden layers of hidden_dim units."""
    return MODELS[name](z_dim=z_dim, hidden_dim=hidden_dim, num_classes=num_classes, num_pixels=num_pixels,
                        hidden_layers=hidden_layers)


@register_model("m2")
class M2Model(Model):
    """p(x, y, z) = p(y) p(z) p(x | y, z),  p(x | y, z) = Bernoulli(logits = decoder(y, z))."""

    def __init__(self, z_dim: int = 50, hidden_dim: int = 500, num_classes: int = NUM_CLASSES,
                 num_pixels: int = NUM_PIXELS, hidden_layers: int = 1) -> None:
        super().__init__(z_dim, num_classes)
        self.decoder = Decoder(z_dim, hidden_dim, num_classes, num_pixels, hidden_layers)

    def sample_x(self, x: Tensor, y: Tensor, z: Tensor) -> None:
        pyro.sample("x", pixels(self.decoder(y, z)), obs=x)

    @torch.no_grad()
    def sample_x_probs(self, y: Tensor, z: Tensor) -> Tensor:
        """E[x | y, z] = sigmoid(decoder(y, z))."""
        return torch.sigmoid(self.decoder(y, z))


@register_model("adgm")
class ADGMModel(M2Model):
    """p(x, y, z, a) = p(y) p(z) p(x | y, z) p(a | x, y, z)  (Maaløe et al. 2016, ADGM)

        p(x | y, z)    = Bernoulli(logits = decoder(y, z)),  M2's
        p(a | x, y, z) = N(mu(x, y, z), sigma(x, y, z)),     (mu, sigma) = p_a(x, y, z)

    a is generated after x, so the marginal p(x, y, z) is M2's whatever p(a | x, y, z) is:
    a only serves the guide, whose q(y | a, x) and q(z | a, x, y) it makes richer. a has
    z_dim numbers, as in the paper, where a and z are both 100.
    """

    def __init__(self, z_dim: int = 50, hidden_dim: int = 500, num_classes: int = NUM_CLASSES,
                 num_pixels: int = NUM_PIXELS, hidden_layers: int = 1) -> None:
        super().__init__(z_dim, hidden_dim, num_classes, num_pixels, hidden_layers)
        self.p_a = ConcatMLP((num_pixels, num_classes, z_dim), hidden_dim, 2 * z_dim, hidden_layers, GaussianHead)

    def sample_x(self, x: Tensor, y: Tensor, z: Tensor) -> None:
        super().sample_x(x, y, z)
        pyro.sample("a", diagonal_normal(self.p_a(x, y, z)))


@register_model("sdgm")
class SDGMModel(Model):
    """p(x, y, z, a) = p(y) p(z) p(a | z, y) p(x | a, z, y)  (Maaløe et al. 2016, SDGM)

        p(a | z, y)    = N(mu(z, y), sigma(z, y)),           (mu, sigma) = p_a(z, y)
        p(x | a, z, y) = Bernoulli(logits = decoder(a, z, y))

    a is a second, stochastic layer: p(x | y, z) = E_p(a|z,y)[p(x | a, z, y)] is a mixture.
    a has z_dim numbers, as in the paper, where a and z are both 100.
    """

    def __init__(self, z_dim: int = 50, hidden_dim: int = 500, num_classes: int = NUM_CLASSES,
                 num_pixels: int = NUM_PIXELS, hidden_layers: int = 1) -> None:
        super().__init__(z_dim, num_classes)
        self.p_a = ConcatMLP((z_dim, num_classes), hidden_dim, 2 * z_dim, hidden_layers, GaussianHead)
        self.decoder = ConcatMLP((z_dim, z_dim, num_classes), hidden_dim, num_pixels, hidden_layers)

    def sample_x(self, x: Tensor, y: Tensor, z: Tensor) -> None:
        a = pyro.sample("a", diagonal_normal(self.p_a(z, y)))
        pyro.sample("x", pixels(self.decoder(a, z, y)), obs=x)

    @torch.no_grad()
    def sample_x_probs(self, y: Tensor, z: Tensor) -> Tensor:
        """sigmoid(decoder(a, z, y)) at a = E[a | z, y]: not E[x | y, z], which would average
        over a, but the image of the typical a, as sharp as M2's."""
        a = loc_and_scale(self.p_a(z, y))[0]
        return torch.sigmoid(self.decoder(a, z, y))
