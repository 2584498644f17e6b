"""The training loop on a small MNIST slice: batching, learning, checkpoints, resume, NaN guard."""

import csv
from dataclasses import asdict, replace

import pyro
import pytest
import torch

import train
from checkpoint import load_checkpoint
from inference import Batch
from model import GaussianHead
from train import Config, NonFiniteError, Stopped, Trainer, epoch_plan


def tiny_config(**kw) -> Config:
    base = {"num_labeled": 200, "num_train": 2000, "epochs": 2, "batch_size": 100, "z_dim": 8,
            "hidden_dim": 64, "precision": "fp32", "lr": 3e-3, "alpha": 10000.0}
    return Config(**{**base, **kw})


def read_rows(path) -> list[dict]:
    with open(path) as f:
        return [{k: v for k, v in row.items() if not k.endswith("seconds")} for row in csv.DictReader(f)]


def test_epoch_plan_covers_unlabelled_once_and_is_reproducible():
    plan = epoch_plan(seed=3, epoch=2, num_labelled=30, num_unlabelled=470, b_l=6, b_u=94)
    assert len(plan) == 5
    unlabelled = torch.cat([u for _, u in plan])
    assert sorted(unlabelled.tolist()) == list(range(470))
    assert all(len(lab) == 6 for lab, _ in plan)
    assert sorted(torch.cat([lab for lab, _ in plan]).tolist()) == list(range(30))
    again = epoch_plan(seed=3, epoch=2, num_labelled=30, num_unlabelled=470, b_l=6, b_u=94)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(plan, again))
    other = epoch_plan(seed=3, epoch=3, num_labelled=30, num_unlabelled=470, b_l=6, b_u=94)
    assert not torch.equal(plan[0][1], other[0][1])


def test_batch_sizes_keep_a_labelled_image_per_step():
    assert train.batch_sizes(Config(batch_size=200), 3000, 47000) == (12, 188)
    assert train.batch_sizes(Config(batch_size=200), 5000, 45000) == (20, 180)  # the main job's mix
    assert train.batch_sizes(Config(batch_size=10), 2000, 48000) == (1, 9)
    assert train.batch_sizes(Config(batch_size=200), 500, 0) == (200, 0)


def test_few_labels_take_many_labelled_images_per_step_and_a_larger_alpha():
    # Below N / 46 labels (0.1 N / N_l > 4.6) every step holds 100 labelled images, or all there are.
    assert train.batch_sizes(Config(batch_size=200), 100, 49900) == (100, 100)
    assert train.batch_sizes(Config(batch_size=200), 1000, 49000) == (100, 100)
    assert train.batch_sizes(Config(batch_size=200), 40, 1960) == (40, 160)
    assert train.batch_sizes(Config(batch_size=50), 100, 49900) == (49, 1)
    assert train.batch_sizes(Config(batch_size=200, labeled_batch=7), 100, 49900) == (7, 193)
    assert train.default_alpha(100, 49900) == pytest.approx(0.1 * 50000 ** 2 / 100)  # Maaløe's
    assert train.default_alpha(5000, 45000) == 230000  # the main job's, as before, and as config.json shows it
    assert train.default_alpha(1000, 49000) > train.default_alpha(1100, 48900) == pytest.approx(4.6 * 50000)


def test_clip_norm_bounds_the_per_image_gradient(small_split, tmp_path):
    trainer = Trainer(tiny_config(clip_norm=1e-3), tmp_path, small_split)
    trainer.step(*epoch_plan(0, 1, trainer.num_l, trainer.num_u, trainer.b_l, trainer.b_u)[0])
    norm = torch.nn.utils.get_total_norm([p.grad for p in trainer.params if p.grad is not None]).item()
    assert norm == pytest.approx(1e-3 * 2000, rel=1e-3)  # the loss sums over the 2000 training images
    unclipped = Trainer(tiny_config(), tmp_path / "free", small_split)
    unclipped.step(*epoch_plan(0, 1, unclipped.num_l, unclipped.num_u, unclipped.b_l, unclipped.b_u)[0])
    assert torch.nn.utils.get_total_norm([p.grad for p in unclipped.params if p.grad is not None]).item() > 10 * norm


def first_step_gradients(trainer: Trainer) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The parameters before the run's first step, and the gradients that step applied."""
    before = [p.detach().clone() for p in trainer.params]
    trainer.step(*epoch_plan(0, 1, trainer.num_l, trainer.num_u, trainer.b_l, trainer.b_u)[0])
    return before, [p.grad for p in trainer.params]


def test_clip_value_bounds_each_component_after_the_norm(small_split, tmp_path):
    _, free = first_step_gradients(Trainer(tiny_config(), tmp_path / "free", small_split))
    _, clipped = first_step_gradients(Trainer(tiny_config(clip_value=1e-4), tmp_path, small_split))
    limit = 1e-4 * 2000  # per image, and the loss sums over the 2000 training images
    assert max(g.abs().max().item() for g in free) > 10 * limit
    assert max(g.abs().max().item() for g in clipped) == pytest.approx(limit)
    for f, c in zip(free, clipped):  # components inside the bound are left as they were
        inside = f.abs() < limit
        assert torch.equal(c[inside], f[inside])


def test_weight_prior_adds_the_gradient_of_minus_log_normal_to_weights_alone(small_split, tmp_path):
    sigma = 0.1
    trainer = Trainer(tiny_config(weight_prior=sigma), tmp_path, small_split)
    before, with_prior = first_step_gradients(trainer)
    _, without = first_step_gradients(Trainer(tiny_config(), tmp_path / "free", small_split))
    names = [n for module in (trainer.model, trainer.guide) for n, _ in module.named_parameters()]
    assert sum(w.dim() > 1 for w in before) >= 4 and sum(w.dim() == 1 for w in before) >= 4
    for name, w, g, g0 in zip(names, before, with_prior, without):
        # d/dW of -log N(W; 0, sigma^2) is W / sigma^2; biases have no prior.
        expected = w / sigma ** 2 if w.dim() > 1 else torch.zeros_like(w)
        assert torch.allclose(g - g0, expected, rtol=1e-3, atol=1e-3 * g0.abs().max().item()), name
    # The labels-only baseline never trains the decoder: the prior leaves it as it was.
    baseline = Trainer(tiny_config(guide="baseline", elbo="none", weight_prior=sigma), tmp_path / "b", small_split)
    decoder_before = [w.detach().clone() for w in baseline.model.parameters()]
    first_step_gradients(baseline)
    assert all(torch.equal(w, w0) for w, w0 in zip(baseline.model.parameters(), decoder_before))


def test_init_std_draws_maaloes_initialisation_and_is_saved(small_split, tmp_path):
    trainer = Trainer(tiny_config(guide="sdgm", init_std=1e-3), tmp_path, small_split)
    heads = [m.weight for m in [*trainer.model.modules(), *trainer.guide.modules()] if isinstance(m, GaussianHead)]
    assert len(heads) == 3  # q(a | x), q(z | a, x, y), p(a | z, y)
    assert all(w.std().item() == pytest.approx(1e-3, rel=0.1) for w in heads)
    # Glorot's normal: std = gain * sqrt(2 / (fan_in + fan_out)), with the ReLU gain where a ReLU follows.
    hidden, classifier = trainer.guide.encoder_y.hidden[0].weight, trainer.guide.encoder_y.out.weight
    assert hidden.std().item() == pytest.approx(2 ** 0.5 * (2 / (784 + 64)) ** 0.5, rel=0.05)
    assert classifier.std().item() == pytest.approx((2 / (64 + 10)) ** 0.5, rel=0.1)
    default = Trainer(tiny_config(guide="sdgm"), tmp_path / "default", small_split)
    assert all(m.weight.std().item() > 0.01 for m in default.guide.modules() if isinstance(m, GaussianHead))
    assert default.guide.encoder_y.hidden[0].weight.std().item() < 0.7 * hidden.std().item()  # torch's is narrower
    trainer.save_checkpoint()
    assert load_checkpoint(tmp_path / "checkpoint.pt")["config"]["init_std"] == 1e-3


def test_labelled_elbo_weight_multiplies_the_labelled_images_elbo_alone(small_split, tmp_path):
    trainer = Trainer(tiny_config(), tmp_path, small_split)
    objective, idx_l, idx_u = trainer.objective, torch.arange(10), torch.arange(90)
    batch = Batch(torch.bernoulli(small_split.x_labelled[idx_l]), trainer.y_labelled[idx_l], idx_l,
                  torch.bernoulli(small_split.x_unlabelled[idx_u]), idx_u)

    def elbo_loss(weight: float) -> float:
        objective.labelled_weight = weight
        pyro.set_rng_seed(0)  # the same draws of z at every weight
        return objective(batch)[0].item()

    pyro.set_rng_seed(0)  # the labelled images come first, so these are the same draws again
    labelled = objective.elbo_l.differentiable_loss(objective.model, objective.guide, batch.x_l, batch.y_l,
                                                    idx_l, trainer.num_l).item()
    assert elbo_loss(3.0) - elbo_loss(1.0) == pytest.approx(2 * labelled, rel=1e-4)
    assert Trainer(tiny_config(labeled_elbo_weight=20.0), tmp_path / "w", small_split).objective.labelled_weight == 20


def test_resolved_alpha_and_labelled_batch_are_saved(small_split, tmp_path):
    trainer = Trainer(tiny_config(alpha=None), tmp_path, small_split)
    # small_split holds 200 labelled of 2000: not few (0.1 * 2000 < 4.6 * 200), so 4.6 N and
    # labelled images in proportion to their share of the batch of 100.
    assert trainer.config.alpha == pytest.approx(4.6 * 2000)
    assert (trainer.config.labeled_batch, trainer.b_l, trainer.b_u) == (10, 10, 90)


def test_the_learning_rate_left_unset_is_the_models_and_is_saved(small_split, tmp_path):
    rates = {}
    for guide in ("m2", "mean-field", "sdgm"):
        trainer = Trainer(tiny_config(guide=guide, lr=None), tmp_path / guide, small_split)
        assert trainer.config.lr == train.PEAK_LR[trainer.guide.model] == trainer.optimizer.param_groups[0]["lr"]
        rates[guide] = trainer.config.lr
    assert rates["m2"] == rates["mean-field"] != rates["sdgm"]  # one rate per model, not per guide
    assert Trainer(tiny_config(guide="sdgm", lr=2e-3), tmp_path / "given", small_split).config.lr == 2e-3


def test_a_config_saved_before_a_field_existed_keeps_what_it_trained_with():
    saved = asdict(Config(hidden_layers=1, lr=1e-3))
    del saved["hidden_layers"]  # as written before the setting existed, when every run had one layer
    del saved["lr"]  # every run had Adam's 1e-3 until the rate came to depend on the model
    assert Config.from_dict(saved).hidden_layers == 1 != Config.hidden_layers
    assert Config.from_dict(saved).lr == 1e-3 != train.PEAK_LR["m2"]
    assert Config.from_dict(asdict(Config())) == Config()


def test_short_run_beats_chance(small_split, tmp_path):
    summary = Trainer(tiny_config(epochs=3), tmp_path, small_split).fit()
    assert summary["test_accuracy_at_best_valid"] > 0.6  # chance is 0.1
    for name in ("metrics.csv", "checkpoint.pt", "best.pt", "summary.json", "figures/losses.png",
                 "figures/accuracy.png", "figures/samples.png", "figures/samples/epoch_003.png"):
        assert (tmp_path / name).is_file(), name


def test_same_seed_same_metrics(small_split, tmp_path):
    for name in ("a", "b"):
        Trainer(tiny_config(), tmp_path / name, small_split).fit()
    assert read_rows(tmp_path / "a" / "metrics.csv") == read_rows(tmp_path / "b" / "metrics.csv")


def test_resume_continues_exactly(small_split, tmp_path):
    Trainer(tiny_config(epochs=2), tmp_path / "straight", small_split).fit()
    Trainer(tiny_config(epochs=1), tmp_path / "halves", small_split).fit()
    resumed = Trainer(tiny_config(epochs=2), tmp_path / "halves", small_split)
    resumed.load_state(load_checkpoint(tmp_path / "halves" / "checkpoint.pt"))
    resumed.fit()
    assert read_rows(tmp_path / "straight" / "metrics.csv") == read_rows(tmp_path / "halves" / "metrics.csv")


@pytest.mark.parametrize("guide, layers, dropout", [("m2", 1, 0.0), ("sdgm", 2, 0.5), ("adgm", 1, 0.0),
                                                    ("m2-cnn", 1, 0.0), ("sdgm-cnn", 1, 0.5)])
def test_resume_mid_epoch_after_a_signal(small_split, tmp_path, guide, layers, dropout):
    def config() -> Config:
        return tiny_config(guide=guide, hidden_layers=layers, classifier_dropout=dropout)

    Trainer(config(), tmp_path / "straight", small_split).fit()
    stopped = Trainer(config(), tmp_path / "stopped", small_split)
    real_step = stopped.step

    def step_then_signal(*args):
        out = real_step(*args)
        if stopped.global_step == 25:  # set during step 26, the 6th of epoch 2
            stopped.stop_signal = 2
        return out

    stopped.step = step_then_signal
    with pytest.raises(Stopped):
        stopped.fit()
    state = load_checkpoint(tmp_path / "stopped" / "checkpoint.pt")
    assert (state["epoch"], state["step_in_epoch"]) == (2, 6)
    resumed = Trainer(config(), tmp_path / "stopped", small_split)
    resumed.load_state(state)
    resumed.fit()
    assert read_rows(tmp_path / "straight" / "metrics.csv") == read_rows(tmp_path / "stopped" / "metrics.csv")


def test_nan_stops_the_run_and_keeps_the_last_checkpoint(small_split, tmp_path):
    trainer = Trainer(tiny_config(epochs=2), tmp_path, small_split)
    trainer.fit()
    before = load_checkpoint(tmp_path / "checkpoint.pt")
    poisoned = Trainer(tiny_config(epochs=3), tmp_path, small_split)
    poisoned.load_state(before)
    with torch.no_grad():
        poisoned.model.decoder.logits.bias[0] = float("nan")
    with pytest.raises(NonFiniteError, match="step 41 .*epoch 3"):
        poisoned.fit()
    after = load_checkpoint(tmp_path / "checkpoint.pt")
    assert after["epoch"] == 3 and after["global_step"] == 40
    assert torch.equal(after["model"]["decoder.logits.bias"], before["model"]["decoder.logits.bias"])


class PoisonSome:
    """Wraps an Objective and makes the ELBO of chosen calls NaN."""

    def __init__(self, objective, poisoned: set[int]) -> None:
        self.objective, self.poisoned, self.calls = objective, poisoned, 0

    def __call__(self, batch):
        self.calls += 1
        elbo, classification = self.objective(batch)
        return (elbo * float("nan") if self.calls in self.poisoned else elbo), classification

    def __getattr__(self, name: str):  # the rest (total, add_prior_gradient) is the Objective's
        return getattr(self.objective, name)


def test_skip_nonfinite_counts_instead_of_stopping(small_split, tmp_path):
    trainer = Trainer(replace(tiny_config(epochs=1), skip_nonfinite=True), tmp_path, small_split)
    trainer.objective = PoisonSome(trainer.objective, {3, 5})
    trainer.fit()
    assert trainer.rows[-1]["skipped_steps"] == 2


def test_a_kill_while_writing_leaves_the_previous_checkpoint(small_split, tmp_path, monkeypatch, cut_off_write):
    Trainer(tiny_config(epochs=1), tmp_path, small_split).fit()
    before = (tmp_path / "checkpoint.pt").read_bytes()
    cut_off_write("checkpoint.pt", KeyboardInterrupt())  # stands in for SIGKILL mid-write: nothing cleans up
    second = Trainer(tiny_config(epochs=2), tmp_path, small_split)
    second.load_state(load_checkpoint(tmp_path / "checkpoint.pt"))
    with pytest.raises(KeyboardInterrupt):
        second.fit()
    monkeypatch.undo()
    assert (tmp_path / "checkpoint.pt.tmp").is_file()  # the half-written file a kill leaves
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    resumed = Trainer(tiny_config(epochs=2), tmp_path, small_split)
    resumed.load_state(load_checkpoint(tmp_path / "checkpoint.pt"))
    assert resumed.fit()["best_epoch"] in (1, 2)
