"""The model, the guides and the ELBO estimators on a tiny network."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceEnum_ELBO, config_enumerate
from pyro.infer.enum import get_importance_trace
from torch import nn

from guides import GUIDES, make_guide
from model import NUM_CLASSES, GaussianHead, M2Model, maaloe_init, make_model, pixels

Z_DIM, HIDDEN, BATCH = 2, 8, 5


@pytest.fixture
def tiny(tiny_batch):
    x, y = tiny_batch
    return M2Model(Z_DIM, HIDDEN), x, y


@pytest.mark.parametrize("name", sorted(GUIDES))
@pytest.mark.parametrize("labelled", [True, False])
@pytest.mark.parametrize("enumerate_y", [True, False])
def test_traces_are_valid(tiny, name, labelled, enumerate_y):
    _, x, y = tiny
    guide = make_guide(name, Z_DIM, HIDDEN)
    # The guide's own model, and the relaxed guide's digits scored on the simplex.
    model = guide.paired_model(make_model(guide.model, Z_DIM, HIDDEN))
    guide = config_enumerate(guide, "parallel") if enumerate_y else guide
    args = (x, y if labelled else None, torch.tensor([3, 1, 4, 15, 9]), 20)
    with pyro.validation_enabled(True):
        model_trace, guide_trace = get_importance_trace("flat", 1, model, guide, args, {})
    assert "z" in guide_trace.nodes and ("y" in guide_trace.nodes) != labelled
    assert model_trace.nodes["y"]["is_observed"] == labelled
    assert model_trace.nodes["x"]["is_observed"]
    # The plate scales the minibatch of 5 up to the data set of 20.
    assert model_trace.nodes["x"]["scale"] == pytest.approx(4.0)


def test_enumerated_elbo_is_the_sum_over_labels(tiny):
    """U(x) = sum_y q(y|x) L(x, y) + H(q(y|x)), computed by hand from the same z noise."""
    model, x, _ = tiny
    guide = make_guide("m2", Z_DIM, HIDDEN)
    pyro.set_rng_seed(1)
    pyro_elbo = -TraceEnum_ELBO(max_plate_nesting=1).loss(model, config_enumerate(guide, "parallel"), x)

    pyro.set_rng_seed(1)
    with torch.no_grad():
        ys = torch.eye(NUM_CLASSES)[:, None, :]  # every label, broadcast against the batch
        q_z = dist.Normal(*guide.encoder_z(x, ys)).to_event(1)
        z = q_z.rsample()  # the same draw TraceEnum_ELBO made: shape (10, batch, z_dim)
        log_px = dist.Bernoulli(logits=model.decoder(ys, z)).to_event(1).log_prob(x)
        log_pz = dist.Normal(0.0, 1.0).expand([Z_DIM]).to_event(1).log_prob(z)
        label_elbo = log_px + log_pz + torch.log(torch.tensor(0.1)) - q_z.log_prob(z)  # L(x, y)
        q_y = guide.q_y(x).probs.T  # (10, batch)
        by_hand = (q_y * label_elbo).sum(0) - (q_y * q_y.log()).sum(0)
    assert pyro_elbo == pytest.approx(by_hand.sum().item(), rel=1e-5)


def test_sampled_elbo_agrees_on_average(tiny):
    """Trace_ELBO samples y (score function); its mean over many draws is the same bound."""
    model, x, _ = tiny
    guide = make_guide("m2", Z_DIM, HIDDEN)
    n = 4000
    pyro.set_rng_seed(2)
    with torch.no_grad():
        enum = TraceEnum_ELBO(max_plate_nesting=1, num_particles=n, vectorize_particles=True)
        exact = -enum.loss(model, config_enumerate(guide, "parallel"), x)
        draws = torch.tensor([
            -Trace_ELBO(max_plate_nesting=1).loss(model, guide, x) for _ in range(n // 10)
        ])
    sampled, stderr = draws.mean().item(), draws.std().item() / len(draws) ** 0.5
    assert abs(sampled - exact) < 4 * stderr + 1e-3 * abs(exact)


def test_decoder_reads_the_label(tiny):
    model, _, _ = tiny
    z = torch.zeros(1, Z_DIM)
    images = model.sample_x_probs(torch.eye(NUM_CLASSES), z.expand(NUM_CLASSES, -1))
    assert images.shape == (NUM_CLASSES, 784) and ((images > 0) & (images < 1)).all()
    assert not torch.allclose(images[0], images[1])


def test_model_samples_from_the_prior_without_a_guide(tiny):
    model, x, _ = tiny
    trace = poutine.trace(model).get_trace(x)
    assert trace.nodes["y"]["value"].sum(-1).eq(1).all()
    assert trace.nodes["z"]["value"].shape == (BATCH, Z_DIM)


@pytest.mark.parametrize("name", sorted(GUIDES))
def test_hidden_layers_deepen_every_network_and_one_keeps_the_old_parameters(tiny_batch, name):
    x, y = tiny_batch

    def square_layers(module: nn.Module) -> int:
        return sum(isinstance(m, nn.Linear) and m.weight.shape == (HIDDEN, HIDDEN) for m in module.modules())

    guide, model = make_guide(name, Z_DIM, HIDDEN), make_model(GUIDES[name].model, Z_DIM, HIDDEN)
    # One hidden layer is the M2 paper's network, under the names that earlier checkpoints hold.
    assert square_layers(guide) == square_layers(model) == 0
    assert not any("deeper" in key for key in [*guide.state_dict(), *model.state_dict()])
    guide = make_guide(name, Z_DIM, HIDDEN, hidden_layers=3)
    model = make_model(guide.model, Z_DIM, HIDDEN, hidden_layers=3)
    # Two more hidden_dim x hidden_dim layers in each network: encoders, classifier, decoder, p(a | ...).
    assert square_layers(guide) == 2 * len(list(guide.children()))
    assert square_layers(model) == 2 * len(list(model.children()))
    with pyro.validation_enabled(True):
        model_trace, _ = get_importance_trace("flat", 1, guide.paired_model(model), guide, (x, y), {})
    assert torch.isfinite(model_trace.log_prob_sum())


@pytest.mark.parametrize("name", sorted(GUIDES))
def test_classifier_layers_deepen_the_classifier_alone(tiny_batch, name):
    x, y = tiny_batch
    square = nn.Linear(HIDDEN, HIDDEN).weight.shape
    guide = make_guide(name, Z_DIM, HIDDEN, classifier_layers=3)
    deep = {key for key, m in guide.named_modules() if isinstance(m, nn.Linear) and m.weight.shape == square}
    assert len(deep) == 2 and all(key.startswith("encoder_y.") for key in deep)
    shallow = make_guide(name, Z_DIM, HIDDEN, hidden_layers=3, classifier_layers=1)
    assert not any(isinstance(m, nn.Linear) and m.weight.shape == square for m in shallow.encoder_y.modules())
    model = make_model(guide.model, Z_DIM, HIDDEN)
    with pyro.validation_enabled(True):
        model_trace, _ = get_importance_trace("flat", 1, guide.paired_model(model), guide, (x, y), {})
    assert torch.isfinite(model_trace.log_prob_sum())


@pytest.mark.parametrize("name", sorted(GUIDES))
def test_classifier_dropout_drops_the_classifiers_hidden_units_in_training_only(name):
    plain = make_guide(name, Z_DIM, HIDDEN, hidden_layers=2)
    guide = make_guide(name, Z_DIM, HIDDEN, hidden_layers=2, classifier_dropout=0.5)
    dropouts = {key: m for key, m in guide.named_modules() if isinstance(m, nn.Dropout)}
    # After each of the classifier's two hidden layers, and in no other network.
    assert [m.p for m in dropouts.values()] == [0.5, 0.5]
    assert all(key.startswith("encoder_y.") for key in dropouts)
    assert not any(isinstance(m, nn.Dropout) for m in plain.modules())
    assert [p.shape for p in guide.parameters()] == [p.shape for p in plain.parameters()]
    seen = []
    for m in dropouts.values():
        m.register_forward_hook(lambda m, inputs, out: seen.append((inputs[0], out)))
    # q(y | a, x) reads a (z_dim numbers) as well as x.
    inputs = [torch.rand(50, 784), torch.rand(50, Z_DIM)] if hasattr(guide, "q_a") else [torch.rand(50, 784)]
    pyro.set_rng_seed(0)
    guide.train()
    assert not torch.equal(guide.encoder_y(*inputs), guide.encoder_y(*inputs))
    for h, out in seen:
        kept = out != 0
        assert torch.allclose(out[kept], 2 * h[kept])  # kept units scaled by 1 / (1 - p)
        assert 0.3 < (h[~kept] != 0).sum() / (h != 0).sum() < 0.7  # about half the active units dropped
    seen.clear()
    guide.eval()
    assert torch.equal(guide.encoder_y(*inputs), guide.encoder_y(*inputs))
    assert all(torch.equal(h, out) for h, out in seen)


def normals(trace) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(loc, scale) of every Normal sample site of a trace."""
    fns = {name: site["fn"] for name, site in trace.nodes.items() if site["type"] == "sample"}
    fns = {name: getattr(fn, "base_dist", fn) for name, fn in fns.items()}
    return {name: (fn.loc, fn.scale) for name, fn in fns.items() if isinstance(fn, dist.Normal)}


@pytest.mark.parametrize("name", ["m2", "mean-field", "sdgm", "adgm"])
def test_maaloe_init_starts_every_normal_at_the_standard_normal(tiny_batch, name):
    x, y = tiny_batch
    guide, model = make_guide(name, Z_DIM, HIDDEN), make_model(GUIDES[name].model, Z_DIM, HIDDEN)

    def sites() -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        model_trace, guide_trace = get_importance_trace("flat", 1, model, guide, (x, y), {})
        return {**{f"p({k})": v for k, v in normals(model_trace).items()},
                **{f"q({k})": v for k, v in normals(guide_trace).items()}}

    # torch's initialisation puts sigma = softplus(s) + 0.001 near 0.7, not 1.
    assert any((scale - 1).abs().max() > 0.1 for _, scale in sites().values())
    maaloe_init(model, 1e-4)
    maaloe_init(guide, 1e-4)
    after = sites()
    assert "q(z)" in after and ("q(a)" in after) == (name in ("sdgm", "adgm"))
    for site, (loc, scale) in after.items():
        assert loc.abs().max() < 0.01 and (scale - 1).abs().max() < 0.01, site
    biases = [m.bias for m in [*model.modules(), *guide.modules()]
              if isinstance(m, nn.Linear) and m.bias is not None and not isinstance(m, GaussianHead)]
    assert len(biases) >= 3 and all(b.abs().max() < 0.01 for b in biases)


@pytest.mark.parametrize("binary", [True, False])
def test_pixels_is_torchs_bernoulli(binary):
    """pixels(l) scores, differentiates, expands and samples as Bernoulli(logits=l).to_event(1)."""
    torch.manual_seed(0)
    logits = (8 * torch.randn(10, 1, 784)).expand(10, 5, 784).clone().requires_grad_()
    x = torch.bernoulli(torch.rand(5, 784)) if binary else torch.rand(5, 784)  # grey x: the formula is general
    with pyro.validation_enabled(binary):  # grey values are off the support, so unchecked
        ours, torchs = pixels(logits), dist.Bernoulli(logits=logits).to_event(1)
        mine, reference = ours.log_prob(x), torchs.log_prob(x)
        wide = ours.expand((3, 10, 5))
        assert isinstance(wide, type(ours)) and wide.log_prob(x).shape == (3, 10, 5)
    assert mine.shape == reference.shape == (10, 5)
    assert torch.allclose(mine, reference, rtol=1e-5, atol=1e-3)
    grad_mine, = torch.autograd.grad(mine.sum(), logits)
    grad_reference, = torch.autograd.grad(reference.sum(), logits)
    assert torch.allclose(grad_mine, grad_reference, atol=1e-6)
    assert ours.sample().shape == (10, 5, 784) and ours.event_shape == (784,)
    with pyro.validation_enabled(True), pytest.raises(ValueError):  # the support is checked, as torch's is
        pixels(logits).log_prob(torch.full((5, 784), 2.0))
