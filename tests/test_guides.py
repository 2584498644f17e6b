"""The new guides and estimators: relaxed digits, point estimates, the IWAE bound, baselines,
gradient variance, and one epoch of training for every guide with every ELBO it lists."""

import math
from dataclasses import replace

import pyro
import pytest
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceEnum_ELBO, config_enumerate

from checkpoint import load_checkpoint
from evaluation import gradient_variance, log_px, seconds_to_accuracy
from guides import GUIDES, make_guide
from inference import ELBOS, IWAE, Objective, elbo_per_image
from model import NUM_CLASSES, M2Model
from train import Config, Trainer

Z_DIM, HIDDEN = 2, 8


@pytest.fixture
def images(small_split) -> torch.Tensor:
    return torch.bernoulli(small_split.x_unlabelled[:20], generator=torch.Generator().manual_seed(0))


def networks(name: str, seed: int = 0) -> tuple[M2Model, torch.nn.Module]:
    pyro.clear_param_store()
    torch.manual_seed(seed)
    return M2Model(Z_DIM, HIDDEN), make_guide(name, Z_DIM, HIDDEN)


# -- the relaxed guide -----------------------------------------------------------------------
@pytest.mark.parametrize("name", ["relaxed", "relaxed-hard"])
def test_relaxed_digits_are_scored_as_the_categorical_kl(images, name):
    model, guide = networks(name)
    guide.start_epoch(1, 10)
    with pyro.validation_enabled(True), torch.no_grad():
        guide_trace = poutine.trace(guide).get_trace(images)
        y = guide_trace.nodes["y"]["value"]
        if name == "relaxed":  # interior points of the simplex, which the model's one-hot check refuses
            assert ((y > 0) & (y < 1)).all() and torch.allclose(y.sum(-1), torch.ones(len(images)))
            with pytest.raises(ValueError, match="support"):
                poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(images).compute_log_prob()
        else:  # straight-through: exact one-hots forward
            assert ((y == 0) | (y == 1)).all() and (y.sum(-1) == 1).all()
        model_trace = poutine.trace(poutine.replay(guide.paired_model(model), trace=guide_trace)).get_trace(images)
        model_trace.compute_log_prob()
        guide_trace.compute_log_prob()
    log_p_y = model_trace.nodes["y"]["log_prob"]
    log_q_y = guide_trace.nodes["y"]["log_prob"]
    q = guide.q_y(images)
    assert torch.allclose(log_p_y, torch.full_like(log_p_y, -math.log(NUM_CLASSES)))
    assert torch.allclose(log_p_y - log_q_y, -torch.distributions.kl_divergence(
        q, torch.distributions.OneHotCategorical(logits=torch.zeros(NUM_CLASSES))), atol=1e-5)


def test_relaxed_guide_anneals_and_is_discrete_in_eval_mode(images):
    _, guide = networks("relaxed")
    temperatures = []
    for epoch in (1, 2, 3):
        guide.start_epoch(epoch, 3)
        temperatures.append(guide.temperature)
    assert temperatures == pytest.approx([1.0, 0.5**0.5, 0.5])
    guide.eval()
    y = poutine.trace(guide).get_trace(images).nodes["y"]["value"]
    assert ((y == 0) | (y == 1)).all()


def test_the_trainer_sets_the_temperature_each_epoch(small_split, tmp_path):
    trainer = Trainer(tiny_config(guide="relaxed", elbo="trace", epochs=2), tmp_path, small_split)
    seen = []
    real_step = trainer.step
    trainer.step = lambda *args: seen.append(trainer.guide.temperature) or real_step(*args)
    trainer.fit()
    assert set(seen) == {1.0, 0.5}


# -- point estimate and mean field ---------------------------------------------------------
def test_delta_guide_puts_z_at_its_mean_and_mean_field_z_ignores_y(images):
    _, delta = networks("delta")
    y = F.one_hot(torch.arange(len(images)) % NUM_CLASSES, NUM_CLASSES).float()
    z = poutine.trace(delta).get_trace(images, y).nodes["z"]["value"]
    assert torch.equal(z, delta.z_loc(images, y)) and not delta.z_has_density
    _, mean_field = networks("mean-field")
    assert torch.equal(mean_field.z_loc(images, y), mean_field.z_loc(images, y.roll(1, -1)))


# -- the convolutional classifier -------------------------------------------------------------
def test_the_convolutional_classifier_reads_each_image_alone_whatever_the_batch_shape(images):
    """q(y | x) of a 4 x 5 batch of images is the rows of q(y | x) of the 20 images in a row:
    the reshape to grids and back keeps every image's pixels together and in order."""
    torch.manual_seed(0)
    guide = make_guide("m2-cnn", Z_DIM, HIDDEN).eval()
    flat = guide.classify(images)
    assert flat.shape == (20, NUM_CLASSES)
    torch.testing.assert_close(guide.classify(images.reshape(4, 5, -1)), flat.reshape(4, 5, -1))


def test_the_convolutions_see_a_pixel_where_it_is_on_the_grid():
    """Pixel 5 * 28 + 20 is row 5, column 20: through two 3 x 3 convolutions, each pooled 2 x 2,
    it can reach only rows 0-2 and columns 4-5 of the 7 x 7 feature map (a transposed reshape
    would put it at rows 4-6, columns 0-2)."""
    torch.manual_seed(0)
    features = make_guide("m2-cnn", Z_DIM, HIDDEN).encoder_y.features
    blank = torch.zeros(1, 784)
    dot = blank.clone()
    dot[0, 5 * 28 + 20] = 1.0
    changed = (features(dot) != features(blank)).reshape(32, 7, 7).any(0)
    rows, cols = changed.nonzero().T
    assert changed.any() and set(rows.tolist()) <= {0, 1, 2} and set(cols.tolist()) <= {4, 5}


def test_the_convolutional_sdgm_classifier_broadcasts_the_images_against_draws_of_a(images):
    """q(y | a, x) for three draws of a per image at once is the three computed one at a time."""
    torch.manual_seed(0)
    guide = make_guide("sdgm-cnn", Z_DIM, HIDDEN).eval()
    a = guide.q_a(images).sample((3,))
    together = guide.q_y_ax(images, a).probs
    assert together.shape == (3, 20, NUM_CLASSES)
    torch.testing.assert_close(together, torch.stack([guide.q_y_ax(images, draw).probs for draw in a]))


@pytest.mark.parametrize("name", ["m2-cnn", "sdgm-cnn"])
def test_the_convolutional_classifiers_refuse_images_that_are_not_square(name):
    with pytest.raises(ValueError, match="square images"):
        make_guide(name, Z_DIM, HIDDEN, num_pixels=30)


# -- IWAE ------------------------------------------------------------------------------------
def sharp_posterior(name: str, seed: int) -> tuple[M2Model, torch.nn.Module]:
    """Tiny networks whose decoder reads z twenty times louder than at initialisation: the
    posterior is then far sharper than q(z | x, y), and the bounds far apart."""
    model, guide = networks(name, seed)
    with torch.no_grad():
        model.decoder.hidden_z.weight.mul_(20)
    return model, guide


@pytest.mark.parametrize("name", ["m2", "mean-field"])
@pytest.mark.parametrize("seed", [0, 1])
def test_iwae_is_above_the_elbo_and_tightens_with_k(images, name, seed):
    model, guide = sharp_posterior(name, seed)
    pyro.set_rng_seed(seed)
    elbo = elbo_per_image(model, guide, images)
    estimates = [log_px(model, guide, images, k) for k in (1, 10, 100)]
    with torch.no_grad():
        bounds = [-IWAE(k).differentiable_loss(model, guide, images).item() / len(images) for k in (1, 10, 100)]
    # Single draws are noisy (the sharper the posterior, the noisier): compare from K = 10 on.
    assert estimates[0] < estimates[1] < estimates[2] and elbo < estimates[1]
    assert bounds[0] < bounds[1] < bounds[2] and elbo < bounds[1]
    assert bounds[2] <= estimates[2] + 1.0  # E[U_K] <= E[log p^_K]: the sum over y beats the average


def test_iwae_with_one_sample_is_the_enumerated_elbo(images):
    model, guide = networks("m2")
    pyro.set_rng_seed(3)
    enum = TraceEnum_ELBO(max_plate_nesting=1).differentiable_loss(model, config_enumerate(guide, "parallel"), images)
    pyro.set_rng_seed(3)
    iwae = IWAE(1).differentiable_loss(model, guide, images)
    assert iwae.item() == pytest.approx(enum.item(), rel=1e-5)
    # The data-set scale multiplies the bound; it never enters the log-mean-exp.
    pyro.set_rng_seed(3)
    scaled = IWAE(1).differentiable_loss(model, guide, images, None, torch.arange(len(images)), 100)
    assert scaled.item() == pytest.approx(100 / len(images) * iwae.item(), rel=1e-5)


# -- score-function estimators ----------------------------------------------------------------
def test_graph_elbo_reports_the_elbo_and_survives_a_short_minibatch(images):
    model, guide = networks("m2")
    graph = Objective(model, guide, "graph", 1.0, 100, 1000)
    for x in (images, images[:7], images):  # an epoch's short last minibatch, then full ones again
        pyro.set_rng_seed(4)
        value = graph.elbo_u.differentiable_loss(graph.model, graph.guide_u, x, None)
        pyro.set_rng_seed(4)
        assert value.item() == pytest.approx(Trace_ELBO(max_plate_nesting=1).loss(model, guide, x), rel=1e-5)


def test_enumeration_has_lower_gradient_variance_than_sampling(images):
    variance = {}
    for elbo in ("enum", "trace", "graph"):
        model, guide = networks("m2")
        pyro.set_rng_seed(5)
        variance[elbo] = gradient_variance(Objective(model, guide, elbo, 1.0, 100, 1000), images, repeats=20)
    assert 0 < variance["enum"] < variance["graph"] < variance["trace"]


def test_seconds_to_accuracy_counts_training_time_until_the_target():
    rows = [{"seconds": 2.0, "test_accuracy": 0.5}, {"seconds": 3.0, "test_accuracy": 0.92},
            {"seconds": 2.5, "test_accuracy": 0.96}]
    assert seconds_to_accuracy(rows, 0.9) == 5.0 and seconds_to_accuracy(rows, 0.95) == 7.5
    assert math.isnan(seconds_to_accuracy(rows, 0.99))


# -- every guide trains -------------------------------------------------------------------
def tiny_config(**kw) -> Config:
    base = {"num_labeled": 200, "num_train": 2000, "epochs": 1, "batch_size": 100, "z_dim": 4,
            "hidden_dim": 32, "precision": "fp32", "lr": 3e-3, "alpha": 10000.0, "num_particles": 2}
    return Config(**{**base, **kw})


@pytest.mark.parametrize("guide,elbo", [(g, e) for g in sorted(GUIDES) for e in GUIDES[g].elbos])
def test_every_guide_trains_an_epoch_with_every_elbo_it_lists(small_split, tmp_path, guide, elbo):
    assert elbo in ELBOS
    # Half of each step labelled, not the 10 in 100 the counts give: in 20 steps of 10 labelled
    # images the convolutional classifier's small kernels barely move (m2-cnn read 14%).
    trainer = Trainer(tiny_config(guide=guide, elbo=elbo, labeled_batch=50), tmp_path, small_split)
    decoder_before = [p.detach().clone() for p in trainer.model.parameters()]
    summary = trainer.fit()
    row = trainer.rows[-1]
    assert math.isfinite(row["train_elbo"]) and math.isfinite(row["valid_elbo"])
    if elbo not in ("trace", "graph"):  # a score function's noise needs more than an epoch
        assert summary["test_accuracy_at_best_valid"] > 0.2  # chance is 0.1
    decoder_moved = any(not torch.equal(a, b) for a, b in zip(decoder_before, trainer.model.parameters()))
    assert decoder_moved == (elbo != "none")  # the baseline learns from labels alone


def test_a_resumed_graph_run_keeps_its_baseline(small_split, tmp_path):
    """The decaying-average baseline lives in Pyro's param store, which the checkpoint holds."""
    config = tiny_config(guide="m2", elbo="graph", epochs=2, num_particles=1)
    straight = Trainer(config, tmp_path / "straight", small_split)
    straight.fit()
    Trainer(replace(config, epochs=1), tmp_path / "halves", small_split).fit()
    resumed = Trainer(config, tmp_path / "halves", small_split)
    resumed.load_state(load_checkpoint(tmp_path / "halves" / "checkpoint.pt"))
    resumed.fit()
    drop_times = [{k: v for k, v in row.items() if not k.endswith("seconds")} for row in straight.rows]
    assert drop_times == [{k: v for k, v in row.items() if not k.endswith("seconds")} for row in resumed.rows]
