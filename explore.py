"""Look inside a trained run: `run.py evaluate | sample | analogies | latent | animate RUN`.

Each command loads the run's best-validation networks (best.pt, else checkpoint.pt),
writes PNGs (or a GIF) into RUN/figures/ and returns their paths.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import pyro
import torch
import torch.nn.functional as F
from PIL import Image

import datasets
import figures
from checkpoint import FIX, MISFIT, CheckpointError, atomic_write, first_line
from data import Dataset
from guides import GUIDES, Guide
from guides.auxiliary import AuxiliaryGuide
from inference import elbo_per_image, predict
from model import Model
from train import Config, networks, read_checkpoint


class RunError(Exception):
    """A run folder or checkpoint that cannot be used; the message says why and what to do."""


@dataclass
class Run:
    folder: Path
    config: Config
    model: Model
    guide: Guide
    epoch: int

    def figure(self, name: str) -> Path:
        return self.folder / "figures" / name

    @property
    def classes(self) -> list[str]:
        return self.config.classes

    def test_data(self, data_dir: str | None) -> Dataset:
        """The run's data set, from data_dir if given, else from where the run found it."""
        c = self.config
        return datasets.load(c.dataset, data_dir or c.data_dir, c.data_file)

    def grid(self, images: torch.Tensor, name: str, title: str, **labels: list[str]) -> Path:
        return figures.plot_digit_grid(images, self.figure(name), title, self.config.image_shape, **labels)

    def check_class(self, digit: int) -> None:
        if not 0 <= digit < len(self.classes):
            raise RunError(f"--digit {digit} is not a class of this run; give one of 0-{len(self.classes) - 1}")


def load_run(path: str | Path) -> Run:
    """The networks of a run folder (its best.pt, else checkpoint.pt) or of a .pt file."""
    path = Path(path)
    if path.is_dir():
        candidates = [path / "best.pt", path / "checkpoint.pt"]
        file = next((c for c in candidates if c.is_file()), None)
        if file is None:
            raise RunError(f"{path} holds no best.pt or checkpoint.pt; give a folder written by `run.py`")
    elif path.is_file():
        file = path
    else:
        raise RunError(f"{path} does not exist; give a run folder (runs/NAME) or its best.pt")
    config, state = read_checkpoint(file)
    model, guide = networks(config)
    try:
        model.load_state_dict(state["model"])
        guide.load_state_dict(state["guide"])
    except MISFIT as e:
        raise CheckpointError(f"{file}: its networks do not match its own config ({first_line(e)}); {FIX}") from None
    model.eval()
    guide.eval()
    return Run(file.parent, config, model, guide, state.get("epoch", 0))


@torch.no_grad()
def evaluate(run: Run, data_dir: str | None = None, a_samples: int | None = None) -> tuple[dict[str, float], list[Path]]:
    """Test accuracy, per-class accuracy, confusion matrix, test ELBO and reconstructions;
    an auxiliary guide classifies with a_samples draws of a (default: the run's)."""
    if a_samples is not None:
        if not isinstance(run.guide, AuxiliaryGuide):
            takers = sorted(name for name, guide in GUIDES.items() if issubclass(guide, AuxiliaryGuide))
            raise RunError(f"--a-samples: the {run.config.guide} guide of this run draws no a; "
                           f"only runs of {', '.join(takers)} take it")
        run.guide.num_a_samples = a_samples
    data = run.test_data(data_dir)
    x, y = data.test_x, data.test_y
    pyro.set_rng_seed(run.config.seed)  # the draws of a of an auxiliary guide's classifier, and of z
    predicted = predict(run.guide, x)
    k = len(run.classes)
    confusion = torch.zeros(k, k, dtype=torch.long)
    confusion.index_put_((y, predicted), torch.ones_like(y), accumulate=True)
    per_class = (confusion.diag() / confusion.sum(1).clamp(min=1)).tolist()
    x_binary = torch.bernoulli(x, generator=torch.Generator().manual_seed(run.config.seed))
    metrics = {"test_accuracy": (predicted == y).sum().item() / len(x),
               "test_elbo": elbo_per_image(run.model, run.guide, x_binary),
               **{f"accuracy_{k}": a for k, a in enumerate(per_class)}}
    paths = [figures.plot_confusion(confusion, run.figure("confusion.png"),
                                    f"test confusion matrix, accuracy {100 * metrics['test_accuracy']:.2f}%",
                                    run.classes)]
    # Reconstruction: y = the predicted class, z = E_q[z | x, y], shown as E[x | y, z].
    originals = x[:10]
    y_hat = F.one_hot(predicted[:10], k).float()
    recon = run.model.sample_x_probs(y_hat, run.guide.z_loc(originals, y_hat))
    paths.append(run.grid(torch.stack([originals, recon]), "reconstructions.png",
                          "test images (top) and their reconstructions E[x | y, z] (bottom)",
                          row_labels=["x", "recon"]))
    return metrics, paths


@torch.no_grad()
def sample(run: Run, digit: int | None = None, n: int | None = None, seed: int = 0) -> Path:
    """A grid of one class (a digit) in n styles, or (no digit) n styles as rows with every class across."""
    if digit is not None:
        run.check_class(digit)
    g = torch.Generator().manual_seed(seed)
    k = len(run.classes)
    if digit is None:
        n = n or 8
        z = torch.randn(n, 1, run.config.z_dim, generator=g).expand(-1, k, -1)
        images = run.model.sample_x_probs(torch.eye(k).expand(n, -1, -1), z)
        return run.grid(images, "samples_all_digits.png", "rows: styles z ~ N(0, I); columns: classes y",
                        col_labels=run.classes)
    n = n or 64
    side = max(1, round(n ** 0.5))
    rows = -(-n // side)
    z = torch.randn(rows * side, run.config.z_dim, generator=g)
    y = F.one_hot(torch.full((rows * side,), digit), k).float()
    images = run.model.sample_x_probs(y, z).reshape(rows, side, -1)
    return run.grid(images, f"samples_digit_{digit}.png",
                    f"class {run.classes[digit]} in {rows * side} styles z ~ N(0, I)")


@torch.no_grad()
def analogies(run: Run, n: int = 10, data_dir: str | None = None) -> Path:
    """Kingma et al.'s Figure 1: infer each test image's style, redraw it as every class."""
    data = run.test_data(data_dir)
    k = len(run.classes)
    x, y = data.test_x[:n], F.one_hot(data.test_y[:n], k).float()
    z = run.guide.z_loc(x, y)  # the style, inferred with the true label
    images = run.model.sample_x_probs(torch.eye(k).expand(len(x), -1, -1), z[:, None].expand(-1, k, -1))
    return run.grid(torch.cat([x[:, None], images], 1), "analogies.png",
                    "style of each test image (left) drawn as every class", col_labels=["input", *run.classes])


@torch.no_grad()
def latent(run: Run, digit: int = 0, data_dir: str | None = None, n: int = 5000) -> list[Path]:
    """Test images' styles E_q[z | x, y] in 2-D (PCA beyond 2 dims), coloured by label; with
    a 2-D z also the decoded manifold of one digit over a grid of z."""
    run.check_class(digit)
    data = run.test_data(data_dir)
    x, labels = data.test_x[:n], data.test_y[:n]
    z = run.guide.z_loc(x, F.one_hot(labels, len(run.classes)).float())
    if z.shape[1] > 2:
        centred = z - z.mean(0)
        _, _, v = torch.pca_lowrank(centred, q=2, center=False)
        codes, axes = centred @ v, ("principal component 1 of z", "principal component 2 of z")
    else:
        codes, axes = z, ("z[0]", "z[1]")
    paths = [figures.plot_latent(codes, labels, run.figure("latent.png"), axes,
                                 f"styles of {len(x)} test images, coloured by class ({run.config.guide} guide)",
                                 run.classes)]
    if run.config.z_dim == 2:
        grid = torch.linspace(-2.5, 2.5, 12)
        z1, z0 = torch.meshgrid(grid.flip(0), grid, indexing="ij")  # rows: z[1] falls; columns: z[0] rises
        z_grid = torch.stack([z0, z1], -1)
        y = F.one_hot(torch.tensor(digit), len(run.classes)).float().expand(12, 12, -1)
        paths.append(run.grid(run.model.sample_x_probs(y, z_grid), f"manifold_{digit}.png",
                              f"class {run.classes[digit]} over z in [-2.5, 2.5]^2"))
    return paths


def animate(run: Run) -> Path:
    """A GIF of the per-epoch conditional sample grids."""
    frames = sorted((run.folder / "figures" / "samples").glob("epoch_*.png"))
    if not frames:
        raise RunError(f"{run.folder} has no figures/samples/epoch_*.png; train it for an epoch first")
    images = []
    for frame in frames:
        try:
            with Image.open(frame) as image:
                images.append(image.convert("P", palette=Image.Palette.ADAPTIVE))
        except OSError as e:  # PIL's errors for a damaged image are OSErrors
            raise RunError(f"{frame} is not a readable PNG ({e}); delete it to leave that epoch out of the GIF, "
                           f"then run the command again") from None
    gif = io.BytesIO()
    images[0].save(gif, format="GIF", save_all=True, append_images=images[1:], duration=400, loop=0)
    return atomic_write(gif.getvalue(), run.figure("samples.gif"))
