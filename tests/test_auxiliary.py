"""The auxiliary deep generative models, SDGM and ADGM: their traces, the enumerated ELBO
written out by hand, the averaged classifier, a short run and a comparison on MNIST slices."""

import csv
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn.functional as F
from conftest import REAL_DATA
from pyro.infer import TraceEnum_ELBO, config_enumerate
from pyro.infer.enum import get_importance_trace

import run
from evaluation import log_px
from guides import make_guide
from inference import elbo_per_image
from model import NUM_CLASSES, loc_and_scale, make_model
from train import Config, Trainer

Z_DIM, HIDDEN, BATCH, S = 2, 8, 5, 7
AUXILIARY = ["sdgm", "adgm"]


def networks(name: str):
    guide = make_guide(name, Z_DIM, HIDDEN, num_a_samples=S)
    return make_model(guide.model, Z_DIM, HIDDEN), guide


@pytest.mark.parametrize("name", AUXILIARY)
@pytest.mark.parametrize("labelled", [True, False])
@pytest.mark.parametrize("enumerate_y", [True, False])
def test_traces_are_valid_and_a_is_drawn_first(tiny_batch, name, labelled, enumerate_y):
    x, y = tiny_batch
    model, guide = networks(name)
    guide = config_enumerate(guide, "parallel") if enumerate_y else guide
    args = (x, y if labelled else None, torch.tensor([3, 1, 4, 15, 9]), 20)
    with pyro.validation_enabled(True):
        model_trace, guide_trace = get_importance_trace("flat", 1, model, guide, args, {})
    guide_sites = [n for n, site in guide_trace.nodes.items() if site["type"] == "sample"]
    assert guide_sites == (["a", "z"] if labelled else ["a", "y", "z"])
    assert "enumerate" not in guide_trace.nodes["a"]["infer"]  # a continuous a is drawn, never enumerated
    if not labelled:
        assert guide_trace.nodes["y"]["infer"].get("enumerate") == ("parallel" if enumerate_y else None)
    model_sites = [n for n, site in model_trace.nodes.items() if site["type"] == "sample"]
    # SDGM generates a before x, ADGM after it.
    assert model_sites == (["y", "z", "a", "x"] if name == "sdgm" else ["y", "z", "x", "a"])
    assert model_trace.nodes["y"]["is_observed"] == labelled and not model_trace.nodes["a"]["is_observed"]
    assert model_trace.nodes["a"]["scale"] == pytest.approx(4.0)  # the plate scales a's density too


def log_p_x_a(name: str, model, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """log p(x, a | y, z), written out from the networks: SDGM p(a | z, y) p(x | a, z, y),
    ADGM p(x | y, z) p(a | x, y, z)."""
    def normal(params: torch.Tensor) -> torch.Tensor:
        return dist.Normal(*loc_and_scale(params)).log_prob(a).sum(-1)

    def bernoulli(logits: torch.Tensor) -> torch.Tensor:
        return dist.Bernoulli(logits=logits).log_prob(x).sum(-1)

    if name == "sdgm":
        return normal(model.p_a(z, y)) + bernoulli(model.decoder(a, z, y))
    return bernoulli(model.decoder(y, z)) + normal(model.p_a(x, y, z))


@pytest.mark.parametrize("name", AUXILIARY)
def test_enumerated_elbo_is_the_sum_over_labels(tiny_batch, name):
    """With one draw a ~ q(a | x) and, for each label, z_y ~ q(z | a, x, y):

        ELBO = sum_y q(y | a, x) [log p(y) + log p(z_y) + log p(x, a | y, z_y) - log q(z_y | a, x, y)]
               + H(q(y | a, x)) - log q(a | x)
    """
    x, _ = tiny_batch
    model, guide = networks(name)
    pyro.set_rng_seed(1)
    pyro_elbo = -TraceEnum_ELBO(max_plate_nesting=1).loss(model, config_enumerate(guide, "parallel"), x)

    pyro.set_rng_seed(1)
    with torch.no_grad():
        ys = torch.eye(NUM_CLASSES)[:, None, :]  # every label, broadcast against the batch
        q_a = dist.Normal(*loc_and_scale(guide.encoder_a(x)))
        a = q_a.rsample()  # the guide's first draw, shape (batch, a_dim)
        q_z = dist.Normal(*loc_and_scale(guide.encoder_z(x, a, ys)))
        z = q_z.rsample()  # its second: one z per label, shape (10, batch, z_dim)
        log_pz = dist.Normal(0.0, 1.0).log_prob(z).sum(-1)
        label_elbo = (math.log(0.1) + log_pz + log_p_x_a(name, model, x, ys, z, a)
                      - q_z.log_prob(z).sum(-1))  # (10, batch)
        q_y = F.softmax(guide.encoder_y(x, a), -1).T  # (10, batch)
        by_hand = (q_y * label_elbo).sum(0) - (q_y * q_y.log()).sum(0) - q_a.log_prob(a).sum(-1)
    assert pyro_elbo == pytest.approx(by_hand.sum().item(), rel=1e-5)


@pytest.mark.parametrize("name", AUXILIARY)
def test_the_classifier_averages_q_y_over_draws_of_a(tiny_batch, name):
    x, y = tiny_batch
    _, guide = networks(name)
    pyro.set_rng_seed(2)
    probs = guide.classify(x)
    pyro.set_rng_seed(2)
    with torch.no_grad():
        draws = guide.q_a(x).sample((S,))  # the S draws classify made
        by_hand = torch.stack([F.softmax(guide.encoder_y(x, a), -1) for a in draws]).mean(0)
    assert torch.allclose(probs, by_hand, atol=1e-6)
    assert not torch.allclose(probs, F.softmax(guide.encoder_y(x, draws[0]), -1))  # more than one draw
    # The classification term reads one reparameterised draw of a, and trains q(a | x) through it.
    pyro.set_rng_seed(3)
    log_q = guide.log_q_y(x, y)
    pyro.set_rng_seed(3)
    a = guide.q_a(x).rsample()
    assert torch.allclose(log_q, dist.OneHotCategorical(logits=guide.encoder_y(x, a)).log_prob(y))
    log_q.sum().backward()
    assert guide.encoder_a.out.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", AUXILIARY)
def test_held_out_elbo_and_log_px_run_and_are_ordered(tiny_batch, name):
    x, _ = tiny_batch
    model, guide = networks(name)
    pyro.set_rng_seed(4)
    elbo, estimate = elbo_per_image(model, guide, x), log_px(model, guide, x, 200)
    assert math.isfinite(elbo) and elbo < estimate


def tiny_config(**kw) -> Config:
    base = {"num_labeled": 200, "num_train": 2000, "epochs": 3, "batch_size": 100, "z_dim": 8,
            "hidden_dim": 64, "precision": "fp32", "lr": 3e-3, "alpha": 10000.0}
    return Config(**{**base, **kw})


@pytest.mark.parametrize("name", AUXILIARY)
def test_short_run_beats_chance_widely(small_split, tmp_path, name):
    summary = Trainer(tiny_config(guide=name), tmp_path, small_split).fit()
    assert summary["test_accuracy_at_best_valid"] > 0.5  # chance is 0.1


def test_compare_measures_the_auxiliary_schemes(tmp_path, capsys):
    argv = ["compare", "sdgm", "adgm:trace", "--num-train", "1000", "--num-labeled", "100", "--epochs", "1",
            "--seeds", "1", "--batch-size", "100", "--hidden-dim", "16", "--z-dim", "4", "--a-samples", "3",
            "--log-px-samples", "5", "--log-px-images", "50", "--grad-repeats", "4", "--data-dir", str(REAL_DATA),
            "--out", str(tmp_path / "out")]
    assert run.main(argv) == 0
    with open(tmp_path / "out" / "results.csv") as f:
        rows = {row["scheme"]: row for row in csv.DictReader(f)}
    assert set(rows) == {"sdgm:enum", "adgm:trace"}
    for row in rows.values():
        for key in ("test_accuracy", "test_elbo", "log_px", "grad_var_init", "grad_var_final"):
            assert math.isfinite(float(row[key])), (row["scheme"], key)
