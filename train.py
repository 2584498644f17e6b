"""One training run: SVI epochs over a data set, with evaluation, checkpoints and figures.

A run lives in one folder: config.json, metrics.csv (one row per epoch), checkpoint.pt
(everything needed to continue, written atomically at every epoch end and on SIGINT or
SIGTERM), best.pt (the networks at the best validation accuracy), figures/ and
summary.json. `--resume` continues from checkpoint.pt exactly where the run stopped.
"""

from __future__ import annotations

import json
import math
import signal
import time
import types
import typing
import warnings
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import pyro
import torch
import torch.nn.functional as F
from tqdm import tqdm

import figures
import hardware
from checkpoint import (
    FIX,
    NETWORKS,
    CheckpointError,
    atomic_save,
    atomic_write_csv,
    atomic_write_text,
    load_checkpoint,
    param_store_state,
    rng_state,
    set_param_store_state,
    set_rng_state,
)
from data import DIGITS, IMAGE_SHAPE, Split, binarise
from guides import GUIDES, NUM_A_SAMPLES, Guide, make_guide
from inference import Batch, Objective, accuracy, elbo_per_image
from model import Model, maaloe_init, make_model

# The NaN guard in Trainer.step reports a non-finite loss itself, in one line.
warnings.filterwarnings("ignore", message="Encountered NaN", module="pyro")

PRECISIONS = ("auto", "bf16", "fp32")  # auto: hardware.choose_precision
DEVICES = ("auto", "cpu", "cuda")
SAMPLE_STYLES = 8  # rows of the per-epoch conditional sample grid
# The held-out ELBO of every epoch is taken on the first 2000 validation images: a standard
# error of under a nat, for a fifth of the ten-digit decoder passes of all 10000.
VALID_ELBO_IMAGES = 2000
PLOT_EVERY = 5  # epochs between redraws of the curves (about half a second each); always at the end
# alpha = 4.6 N: Kingma's form (alpha = 0.1 N) with 46 times his constant, so that at 10%
# labels each labelled image's -log q(y|x) weighs 46, Pyro's aux_loss_multiplier, and
# more when labels are fewer. Kingma's constant trains the classifier far too weakly in
# 100 epochs (README, "Choices").
ALPHA_PER_IMAGE = 4.6
# Few labels (below about 1100 of 50000, where this weight is the larger) are trained as
# Maaløe et al. train them, which measured better at 100 labels (README, "Choices"): each
# labelled image's -log q(y|x) weighs 0.1 (N / N_l)^2 (their beta = 0.1, scaled by N / N_l,
# on the mean over labelled images of a per-image objective), and every step holds up to
# FEW_LABELS_BATCH labelled images.
ALPHA_FEW_LABELS = 0.1
FEW_LABELS_BATCH = 100
# Adam's peak learning rate where --lr is not given, by the model the guide is paired with.
# M2 gains at twice the 1e-3 it had, over three seeds: +0.4 points at 10% labels, +0.7 at
# 3000 (95% up to three epochs sooner), +3.1 at 100. The auxiliary models keep 1e-3: at Maaløe's
# sizes and 100 labels, sdgm stalled near 92% at 2e-3, where 1e-3 passes 96% (README, "Choices").
PEAK_LR = {"m2": 2e-3, "sdgm": 1e-3, "adgm": 1e-3}


def few_labels(num_labelled: int, num_unlabelled: int) -> bool:
    return ALPHA_FEW_LABELS * (num_labelled + num_unlabelled) > ALPHA_PER_IMAGE * num_labelled


def default_alpha(num_labelled: int, num_unlabelled: int) -> float:
    """alpha = N * max(4.6, 0.1 N / N_l): each labelled image's -log q(y | x) weighs
    max(4.6 N / N_l, 0.1 (N / N_l)^2) against one image's ELBO."""
    n = num_labelled + num_unlabelled
    alpha = n * max(ALPHA_PER_IMAGE, ALPHA_FEW_LABELS * n / max(num_labelled, 1))
    return float(f"{alpha:.12g}")  # 230000 at 10% of MNIST, not 229999.99999999997 in config.json


# What a run saved before a field existed trained with, where the default has changed since:
# every run had one hidden layer until the setting came, and kept it as the default until
# 2026-12-06; the learning rate was 1e-3 for every scheme until 2026-12-07.
LEGACY: dict[str, Any] = {"hidden_layers": 1, "lr": 1e-3}


@dataclass
class Config:
    """Everything that defines a run; saved as config.json."""

    num_labeled: int | None = 5000  # None for a user's data set: its own labels decide
    seed: int = 0
    epochs: int = 25
    batch_size: int = 200
    labeled_batch: int | None = None  # labelled images per step; None: batch_sizes decides, and it is saved resolved
    guide: str = "m2"
    elbo: str = "enum"
    num_particles: int = 1
    alpha: float | None = None  # None: default_alpha, from the numbers of images
    lr: float | None = None  # peak, annealed to 0 by a cosine schedule; None: PEAK_LR of the model, saved resolved
    beta1: float = 0.9
    z_dim: int = 50  # also the size of a, in the guides and models that have one
    hidden_dim: int = 500
    hidden_layers: int = 2  # per network, as in Maaløe et al.'s SDGM and ADGM; the M2 paper's had one
    classifier_layers: int | None = None  # hidden layers of q(y | ...) alone; None: hidden_layers
    a_samples: int = NUM_A_SAMPLES  # draws of a an auxiliary guide's classifier averages over
    precision: str = "auto"  # bf16 or fp32; auto is resolved by the Trainer (hardware.py) and saved resolved
    device: str = "auto"  # auto, cpu or cuda; kept as asked, so that a checkpoint resumes on any machine
    clip_norm: float | None = None  # bound on the gradient norm of the per-image loss; None: no clipping
    clip_value: float | None = None  # then a bound on each component of that gradient; None: none
    weight_prior: float | None = None  # sigma of a N(0, sigma^2) prior on every weight matrix; None: none
    init_std: float | None = None  # Maaløe et al.'s initialisation at this std (model.maaloe_init); None: torch's
    classifier_dropout: float = 0.0  # dropout rate after each hidden layer of q(y | ...) in training; 0: none
    labeled_elbo_weight: float = 1.0  # weight of each labelled image's ELBO L(x, y) against an unlabelled image's U(x)
    skip_nonfinite: bool = False
    data_dir: str | None = None
    num_train: int | None = None  # train on images 0..num_train-1 (None: all, 50000 for MNIST); 50000..59999 validate
    unlabeled_valid: bool = False  # the validation images also train, unlabelled (Maaløe et al.'s train_valid_combine)
    dataset: str = "mnist"  # mnist, fashion-mnist or npz (datasets.py)
    data_file: str | None = None  # the .npz file of --dataset npz
    # Read from the data by the Trainer and saved, so that a checkpoint rebuilds its networks alone.
    classes: list[str] = field(default_factory=lambda: list(DIGITS))
    image_shape: list[int] = field(default_factory=lambda: list(IMAGE_SHAPE))

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        """The Config a saved dict describes. Fields it lacks (saved before they existed) take
        what runs had then (LEGACY), else their defaults; ValueError names the first field no
        run could have been trained with."""
        hints = typing.get_type_hints(cls)
        known = {**LEGACY, **{f.name: d[f.name] for f in fields(cls) if f.name in d}}
        for name, value in known.items():
            union = typing.get_origin(hints[name]) in (typing.Union, types.UnionType)
            kinds = typing.get_args(hints[name]) if union else (hints[name],)
            if not any(fits(value, kind) for kind in kinds):
                names = " or ".join("None" if kind is type(None) else str(kind) if typing.get_origin(kind)
                                    else kind.__name__ for kind in kinds)
                raise ValueError(f"config field {name} is {value!r}, not {names}")
            if int in kinds and name != "seed" and isinstance(value, int) and value < 1:
                raise ValueError(f"config field {name} is {value}, not a positive int")
        config = cls(**known)
        if config.guide not in GUIDES or config.elbo not in GUIDES[config.guide].elbos:
            raise ValueError(f"config names guide {config.guide!r} with elbo {config.elbo!r}, which this ssvae lacks")
        for name, allowed in (("precision", PRECISIONS), ("device", DEVICES)):
            if getattr(config, name) not in allowed:
                raise ValueError(f"config field {name} is {getattr(config, name)!r}, not one of {', '.join(allowed)}")
        return config


def fits(value: Any, kind: Any) -> bool:
    """isinstance, except that a bool is not an int, an int is a float, and list[T] checks its items."""
    if typing.get_origin(kind) is list:
        return isinstance(value, list) and all(fits(item, typing.get_args(kind)[0]) for item in value)
    if isinstance(value, bool):
        return kind is bool
    return isinstance(value, kind) or (kind is float and isinstance(value, int))


class NonFiniteError(RuntimeError):
    """The loss or a gradient stopped being a finite number."""


class Stopped(Exception):
    """SIGINT or SIGTERM arrived; the run saved its state and should exit non-zero."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    def __reduce__(self) -> tuple[type, tuple[int]]:  # so that a worker process can send it back
        return Stopped, (self.signum,)


def read_checkpoint(path: Path, entries: dict[str, type] = NETWORKS,
                    map_location: Any = "cpu") -> tuple[Config, dict[str, Any]]:
    """The config and the state saved at `path` (checkpoint.load_checkpoint); CheckpointError
    if either cannot be used."""
    state = load_checkpoint(path, map_location, entries)
    try:
        return Config.from_dict(state["config"]), state
    except ValueError as e:
        raise CheckpointError(f"{path} is damaged or was edited: {e}; {FIX}") from None


def networks(config: Config) -> tuple[Model, Guide]:
    """The guide a config names and the model that guide is paired with, sized for its data's
    classes and pixels."""
    sizes = {"num_classes": len(config.classes), "num_pixels": math.prod(config.image_shape)}
    return (make_model(GUIDES[config.guide].model, config.z_dim, config.hidden_dim,
                       hidden_layers=config.hidden_layers, **sizes),
            make_guide(config.guide, config.z_dim, config.hidden_dim, num_a_samples=config.a_samples,
                       hidden_layers=config.hidden_layers, classifier_layers=config.classifier_layers,
                       classifier_dropout=config.classifier_dropout, **sizes))


def batch_sizes(config: Config, num_labelled: int, num_unlabelled: int) -> tuple[int, int]:
    """Split each step's batch between labelled and unlabelled images: --labeled-batch
    labelled ones (at most all of them) if given, else in proportion to their counts, with
    at least one labelled image per step so alpha's term always acts, and with few labels
    (few_labels) at least FEW_LABELS_BATCH of them, or all there are."""
    if num_unlabelled == 0:
        return min(config.batch_size, num_labelled), 0
    if config.labeled_batch is not None:
        b_l = config.labeled_batch
    else:
        b_l = max(1, round(config.batch_size * num_labelled / (num_labelled + num_unlabelled)))
        if few_labels(num_labelled, num_unlabelled):
            b_l = max(b_l, FEW_LABELS_BATCH)
    b_l = min(b_l, num_labelled, config.batch_size - 1)
    return b_l, config.batch_size - b_l


def epoch_plan(seed: int, epoch: int, num_labelled: int, num_unlabelled: int,
               b_l: int, b_u: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (labelled, unlabelled) index pairs of every step of an epoch.

    One pass over the unlabelled images (over the labelled ones if there are none); the
    labelled images are cycled in fresh random orders. The plan depends on (seed, epoch)
    alone, not on the global RNG, so a run resumed mid-epoch takes the same batches.
    """
    g = torch.Generator().manual_seed(seed * 100003 + epoch)
    lead = num_unlabelled if num_unlabelled else num_labelled
    steps = math.ceil(lead / (b_u or b_l))
    order_u = torch.randperm(num_unlabelled, generator=g)
    needed = steps * b_l
    order_l = torch.cat([torch.randperm(num_labelled, generator=g)
                         for _ in range(math.ceil(needed / num_labelled))])
    if not num_unlabelled:
        order_l = order_l[:num_labelled]
    return [(order_l[i * b_l:(i + 1) * b_l], order_u[i * b_u:(i + 1) * b_u]) for i in range(steps)]


class Trainer:
    """The networks, the optimizer and the data of one run, and the loop over them."""

    def __init__(self, config: Config, out: Path, data: Split) -> None:
        self.config, self.out = config, out
        self.device = hardware.choose_device(config.device)
        hardware.keep_freed_memory()
        hardware.flush_denormals()
        config.precision, self.precision_reason = hardware.choose_precision(
            config.precision, self.device, config.batch_size, config.hidden_dim)
        pyro.set_rng_seed(config.seed)
        pyro.clear_param_store()
        self.data = d = data.tensors_to(self.device)
        config.classes, config.image_shape = list(data.classes), list(data.image_shape)
        self.num_l, self.num_u = len(d.x_labelled), len(d.x_unlabelled)
        self.y_labelled = F.one_hot(d.y_labelled, len(data.classes)).float()
        # Held-out ELBOs are measured on one fixed binarisation, drawn outside the global RNG
        # and on the CPU, so that every device measures on the same images.
        g = torch.Generator().manual_seed(config.seed)
        self.x_valid_binary = torch.bernoulli(data.x_valid[:VALID_ELBO_IMAGES], generator=g).to(self.device)
        self.sample_z = torch.randn(SAMPLE_STYLES, config.z_dim, generator=g).to(self.device)

        self.model, self.guide = networks(config)
        if config.init_std is not None:
            maaloe_init(self.model, config.init_std)
            maaloe_init(self.guide, config.init_std)
        self.model.to(self.device)
        self.guide.to(self.device)
        if config.alpha is None:  # saved resolved, as precision is, so that config.json says what ran
            config.alpha = default_alpha(self.num_l, self.num_u)
        self.objective = Objective(self.model, self.guide, config.elbo, config.alpha,
                                   self.num_l, self.num_u, config.num_particles, config.labeled_elbo_weight,
                                   config.weight_prior)
        self.params = [*self.model.parameters(), *self.guide.parameters()]
        if config.lr is None:
            config.lr = PEAK_LR[self.guide.model]
        # fused: one kernel updates every parameter, instead of a dozen per parameter tensor.
        self.optimizer = torch.optim.Adam(self.params, lr=config.lr, betas=(config.beta1, 0.999), fused=True)
        self.b_l, self.b_u = batch_sizes(config, self.num_l, self.num_u)
        config.labeled_batch = self.b_l

        self.epoch, self.step_in_epoch, self.global_step = 1, 0, 0
        self.running = {"elbo": 0.0, "class": 0.0, "seconds": 0.0, "skipped": 0}
        self.rows: list[dict[str, float]] = []
        self.best = {"epoch": 0, "valid_accuracy": -1.0, "test_accuracy": float("nan")}
        self.stop_signal: int | None = None

    # -- state ---------------------------------------------------------------------------
    def state(self) -> dict[str, Any]:
        return {
            "config": asdict(self.config),
            "model": self.model.state_dict(), "guide": self.guide.state_dict(),
            "optimizer": self.optimizer.state_dict(), "rng": rng_state(), "param_store": param_store_state(),
            "epoch": self.epoch, "step_in_epoch": self.step_in_epoch,
            "global_step": self.global_step, "running": dict(self.running),
            "rows": list(self.rows), "best": dict(self.best),
        }

    def load_state(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.guide.load_state_dict(state["guide"])
        self.optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"])
        set_param_store_state(state["param_store"])
        for key in ("epoch", "step_in_epoch", "global_step", "running", "rows", "best"):
            setattr(self, key, state[key])

    def save_checkpoint(self) -> None:
        atomic_save(self.state(), self.out / "checkpoint.pt")

    # -- one step ------------------------------------------------------------------------
    def autocast(self) -> torch.autocast:
        """Matrix products in bf16 where the run's precision says so; densities stay fp32."""
        return torch.autocast(self.device.type, torch.bfloat16, enabled=self.config.precision == "bf16")

    def step(self, idx_l: torch.Tensor, idx_u: torch.Tensor) -> tuple[float, float]:
        d = self.data
        idx_l, idx_u = idx_l.to(self.device), idx_u.to(self.device)
        # Dynamic binarisation: every step sees a fresh Bernoulli draw of the grey images.
        batch = Batch(binarise(d.x_labelled[idx_l]), self.y_labelled[idx_l], idx_l,
                      binarise(d.x_unlabelled[idx_u]), idx_u)
        # Argument checks are off in the hot loop: the tests check the traces, and a NaN
        # must reach the guard below rather than fail inside a distribution's constructor.
        with pyro.validation_enabled(False), self.autocast():
            elbo_loss, class_loss = self.objective(batch)
        loss = self.objective.total(elbo_loss, class_loss)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.objective.add_prior_gradient()  # before clipping, as Maaløe et al. clip the prior's too
        total = self.num_l + self.num_u
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
        if not math.isfinite(loss.item() + grad_norm.item()):
            if not self.config.skip_nonfinite:
                what = "loss" if not math.isfinite(loss.item()) else "gradient"
                raise NonFiniteError(
                    f"the {what} is not finite at step {self.global_step + 1} (epoch {self.epoch}); "
                    f"likely cause: a learning rate too high for this setting (--lr {self.config.lr:g})"
                    f" or an extreme alpha; the last good checkpoint is kept: resume with a lower"
                    f" --lr, or pass --skip-nonfinite to skip such steps")
            self.running["skipped"] += 1
        else:
            # The loss sums over the data set; the bounds are on its per-image mean's gradient.
            if self.config.clip_norm is not None:
                torch.nn.utils.clip_grads_with_norm_(self.params, self.config.clip_norm * total, grad_norm)
            if self.config.clip_value is not None:
                torch.nn.utils.clip_grad_value_(self.params, self.config.clip_value * total)
            self.optimizer.step()
        return elbo_loss.item() / total, class_loss.item()

    # -- epochs --------------------------------------------------------------------------
    def learning_rate(self) -> float:
        """Cosine annealing from lr towards 0 over the run. It is a function of the epoch
        alone (no scheduler state), so a resume with more --epochs stretches the curve."""
        return self.config.lr * 0.5 * (1 + math.cos(math.pi * (self.epoch - 1) / self.config.epochs))

    def train_epoch(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.learning_rate()
        self.guide.start_epoch(self.epoch, self.config.epochs)
        plan = epoch_plan(self.config.seed, self.epoch, self.num_l, self.num_u, self.b_l, self.b_u)
        bar = tqdm(plan, desc=f"epoch {self.epoch}/{self.config.epochs}", initial=self.step_in_epoch,
                   total=len(plan), leave=False, dynamic_ncols=True)
        for idx_l, idx_u in plan[self.step_in_epoch:]:
            start = time.perf_counter()
            elbo, class_loss = self.step(idx_l, idx_u)
            self.running["seconds"] += time.perf_counter() - start
            self.running["elbo"] += elbo
            self.running["class"] += class_loss
            self.step_in_epoch += 1
            self.global_step += 1
            bar.update()
            bar.set_postfix(elbo=f"{-elbo:.1f}", cls=f"{class_loss:.3f}", refresh=False)
            if self.stop_signal is not None:
                bar.close()
                raise Stopped(self.stop_signal)
        bar.close()

    def evaluate_epoch(self) -> dict[str, float]:
        d, steps = self.data, max(self.step_in_epoch, 1)
        start = time.perf_counter()
        with self.autocast():  # the ELBO's ten decoder passes per image cost what a training epoch's do
            valid_elbo = elbo_per_image(self.model, self.guide, self.x_valid_binary)
        row = {
            "epoch": self.epoch,
            "train_elbo": -self.running["elbo"] / steps,
            "train_class_loss": self.running["class"] / steps,
            "valid_elbo": valid_elbo,
            "valid_accuracy": accuracy(self.guide, d.x_valid, d.y_valid),
            "test_accuracy": accuracy(self.guide, d.x_test, d.y_test),
            "skipped_steps": self.running["skipped"],
            "seconds": round(self.running["seconds"], 2),
        }
        row["eval_seconds"] = round(time.perf_counter() - start, 2)
        return row

    def sample_grid(self, path: Path, title: str) -> Path:
        """Decode each style z (rows) with every digit y (columns): E[x | y, z]."""
        classes = self.config.classes
        y = torch.eye(len(classes), device=self.device).expand(SAMPLE_STYLES, -1, -1)
        z = self.sample_z[:, None, :].expand(-1, len(classes), -1)
        images = self.model.sample_x_probs(y, z)
        return figures.plot_digit_grid(images, path, title, self.config.image_shape, col_labels=classes,
                                       row_labels=[f"z{i + 1}" for i in range(SAMPLE_STYLES)])

    def plot(self) -> None:
        if self.rows:
            fig_dir = self.out / "figures"
            figures.plot_losses(self.rows, fig_dir / "losses.png")
            figures.plot_accuracy(self.rows, fig_dir / "accuracy.png")

    def fit(self) -> dict[str, Any]:
        handlers = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            while self.epoch <= self.config.epochs:
                self.train_epoch()
                self.end_epoch()
        except (Stopped, BrokenPipeError):  # a signal, or stdout's reader gone (`| head`)
            self.save_checkpoint()
            self.plot()
            raise
        finally:
            for s, h in handlers.items():
                signal.signal(s, h)
        return self.finish()

    def end_epoch(self) -> None:
        row = self.evaluate_epoch()
        self.rows.append(row)
        if row["valid_accuracy"] > self.best["valid_accuracy"]:
            self.best = {k: row[k] for k in ("epoch", "valid_accuracy", "test_accuracy")}
            atomic_save({"config": asdict(self.config), "epoch": self.epoch,
                         "model": self.model.state_dict(), "guide": self.guide.state_dict()},
                        self.out / "best.pt")
        self.sample_grid(self.out / "figures" / "samples" / f"epoch_{self.epoch:03d}.png",
                         f"E[x | y, z] after epoch {self.epoch}: rows = styles z ~ N(0, I), columns = classes y")
        if self.epoch % PLOT_EVERY == 0 or self.epoch == self.config.epochs:
            self.plot()
        self.epoch, self.step_in_epoch = self.epoch + 1, 0
        self.running = {"elbo": 0.0, "class": 0.0, "seconds": 0.0, "skipped": 0}
        atomic_write_csv(self.rows, self.out / "metrics.csv")
        self.save_checkpoint()
        # Last, so that a closed stdout (`| head`) finds the epoch saved.
        tqdm.write(
            f"epoch {row['epoch']:3d}  -elbo {-row['train_elbo']:7.2f}  class {row['train_class_loss']:.4f}"
            f"  valid elbo {row['valid_elbo']:8.2f}  valid acc {100 * row['valid_accuracy']:5.2f}%"
            f"  test acc {100 * row['test_accuracy']:5.2f}%  {row['seconds']:6.1f}s")

    def finish(self) -> dict[str, Any]:
        final = self.sample_grid(self.out / "figures" / "samples.png",
                                 f"conditional samples, final model ({self.config.epochs} epochs)")
        summary = {
            "best_epoch": self.best["epoch"],
            "best_valid_accuracy": self.best["valid_accuracy"],
            "test_accuracy_at_best_valid": self.best["test_accuracy"],
            "final_test_accuracy": self.rows[-1]["test_accuracy"] if self.rows else float("nan"),
            "train_seconds": round(sum(r["seconds"] for r in self.rows), 1),
            "seconds_per_epoch": round(sum(r["seconds"] for r in self.rows) / max(len(self.rows), 1), 2),
            "figures": [str(p) for p in (self.out / "figures" / "losses.png",
                                         self.out / "figures" / "accuracy.png", final)],
        }
        atomic_write_text(json.dumps(summary, indent=2), self.out / "summary.json")
        return summary

    def _on_signal(self, signum: int, frame: Any) -> None:
        # Stop at the next step boundary so the checkpoint holds a consistent state.
        self.stop_signal = signum
