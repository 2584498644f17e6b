"""Figures of a run: training curves and grids of images. Every function writes one PNG."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: runs happen on machines without a display
import matplotlib.pyplot as plt
import numpy as np
from torch import Tensor

from checkpoint import atomic_write

Rows = Sequence[dict[str, float]]


def _save(fig: plt.Figure, path: Path) -> Path:
    """Render to memory, then write atomically: a failed write never leaves half a PNG."""
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format=path.suffix.lstrip("."), dpi=100)
    plt.close(fig)
    return atomic_write(buffer.getvalue(), path)


def _style(rows: Rows) -> str:
    return ".-" if len(rows) <= 30 else "-"  # markers only while they stay apart


def plot_losses(rows: Rows, path: Path) -> Path:
    """The two parts of the loss per epoch: -ELBO per image, and -log q(y | x) on labels."""
    epochs = [r["epoch"] for r in rows]
    fig, (ax_elbo, ax_class) = plt.subplots(1, 2, figsize=(10, 4))
    ax_elbo.plot(epochs, [-r["train_elbo"] for r in rows], _style(rows), label="training (minibatch estimate)")
    ax_elbo.plot(epochs, [-r["valid_elbo"] for r in rows], _style(rows), label="validation")
    ax_elbo.set(title="ELBO part", xlabel="epoch", ylabel="-ELBO (nats per image)")
    ax_elbo.legend()
    ax_class.plot(epochs, [r["train_class_loss"] for r in rows], _style(rows), color="tab:red")
    ax_class.set(title="classification part", xlabel="epoch", yscale="log",
                 ylabel="-log q(y | x) on labelled images (nats)")
    for ax in (ax_elbo, ax_class):
        ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_accuracy(rows: Rows, path: Path) -> Path:
    """Validation and test accuracy of argmax q(y | x) per epoch."""
    epochs = [r["epoch"] for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in [("valid_accuracy", "validation"), ("test_accuracy", "test")]:
        ax.plot(epochs, [100 * r[key] for r in rows], _style(rows), label=label)
    ax.set(title="accuracy of argmax q(y | x)", xlabel="epoch", ylabel="accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_digit_grid(
    images: Tensor, path: Path, title: str, image_shape: Sequence[int] = (28, 28),
    col_labels: Sequence[str] | None = None, row_labels: Sequence[str] | None = None,
) -> Path:
    """A rows x cols grid of grey images (images: rows x cols x H*W, values in [0, 1])."""
    rows, cols = images.shape[:2]
    h, w = image_shape
    tiles = images.reshape(rows, cols, h, w).detach().cpu().numpy()
    # One pixel of white space between images keeps neighbours apart.
    canvas = np.ones((rows * (h + 1) + 1, cols * (w + 1) + 1))
    for i in range(rows):
        for j in range(cols):
            canvas[1 + (h + 1) * i: (h + 1) * (i + 1), 1 + (w + 1) * j: (w + 1) * (j + 1)] = 1 - tiles[i, j]
    # An integer zoom keeps strokes crisp; small images get more of it.
    zoom = max(1, round((3 if max(rows, cols) <= 12 else 2) * 28 / max(h, w)))
    fig, ax = plt.subplots(figsize=(canvas.shape[1] * zoom / 100 + 0.6, canvas.shape[0] * zoom / 100 + 0.8))
    ax.imshow(canvas, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_title(title, fontsize=9)
    long_names = max(map(len, col_labels or [""])) > 3  # class names such as "Ankle boot"
    ax.set_xticks([(w + 1) * (k + 0.5) for k in range(cols)], col_labels or [""] * cols, fontsize=8,
                  rotation=40 if long_names else 0, ha="right" if long_names else "center")
    ax.set_yticks([(h + 1) * (k + 0.5) for k in range(rows)], row_labels or [""] * rows, fontsize=8)
    ax.tick_params(length=0)
    return _save(fig, path)


def plot_confusion(confusion: Tensor, path: Path, title: str, classes: Sequence[str]) -> Path:
    """Counts of (true class, predicted class) on the test set."""
    counts = confusion.cpu().numpy()
    fig, ax = plt.subplots(figsize=(6, 5))
    im = ax.imshow(counts, cmap="Blues")
    for (i, j), c in np.ndenumerate(counts):
        ax.text(j, i, str(c), ha="center", va="center", fontsize=7,
                color="white" if c > counts.max() / 2 else "black")
    ax.set(title=title, xlabel="predicted class (argmax q(y | x))", ylabel="true class")
    long_names = max(map(len, classes)) > 3
    ax.set_xticks(range(len(classes)), classes, rotation=40 if long_names else 0, ha="right" if long_names else "center")
    ax.set_yticks(range(len(classes)), classes)
    fig.colorbar(im, ax=ax, label="test images")
    return _save(fig, path)


def plot_latent(codes: Tensor, labels: Tensor, path: Path, axes: tuple[str, str], title: str,
                classes: Sequence[str]) -> Path:
    """A scatter of 2-D codes, one colour per class."""
    codes, labels = codes.cpu().numpy(), labels.cpu().numpy()
    fig, ax = plt.subplots(figsize=(6.5, 5.5))
    colours = plt.cm.tab10 if len(classes) <= 10 else plt.cm.tab20
    for k, name in enumerate(classes):
        keep = labels == k
        ax.scatter(codes[keep, 0], codes[keep, 1], s=4, alpha=0.6, color=colours(k % colours.N), label=name)
    ax.set(title=title, xlabel=axes[0], ylabel=axes[1])
    ax.legend(title="class", markerscale=3, loc="center left", bbox_to_anchor=(1, 0.5))
    return _save(fig, path)


def plot_scheme_accuracy(curves: dict[str, Sequence[Rows]], path: Path) -> Path:
    """Test accuracy of every scheme against epoch and against training seconds: the mean
    over seeds as a line, the range over seeds as a band (curves: scheme -> one Rows per seed)."""
    fig, (ax_epoch, ax_time) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for i, (name, runs) in enumerate(curves.items()):
        n = min(len(rows) for rows in runs)
        accuracy = 100 * np.array([[r["test_accuracy"] for r in rows[:n]] for rows in runs])
        seconds = np.array([np.cumsum([r["seconds"] for r in rows[:n]]) for rows in runs]).mean(0)
        color = plt.cm.tab10(i % 10)
        for ax, x in ((ax_epoch, np.arange(1, n + 1)), (ax_time, seconds)):
            ax.plot(x, accuracy.mean(0), "o-", ms=3, color=color, label=name)
            ax.fill_between(x, accuracy.min(0), accuracy.max(0), color=color, alpha=0.15)
    ax_epoch.set(title="test accuracy by epoch", xlabel="epoch", ylabel="test accuracy of argmax q(y | x) (%)")
    ax_epoch.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    ax_time.set(title="test accuracy by training time", xlabel="training seconds (steps only, mean over seeds)")
    ax_time.legend(fontsize=8, loc="lower right")
    for ax in (ax_epoch, ax_time):
        ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_accuracy_by_labels(measured: dict[str, dict[int, Sequence[float]]],
                            published: dict[str, dict[int, float]], path: Path, title: str) -> Path:
    """Test accuracy against the number of labelled images, on a log axis: each measured
    scheme's mean over seeds with its seeds as dots (measured: scheme -> labels -> accuracy
    (%) per seed), each published result as a dashed grey line (published: name -> labels -> %)."""
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for i, (name, by_labels) in enumerate(measured.items()):
        labels = sorted(by_labels)
        color = plt.cm.tab10(i % 10)
        ax.plot(labels, [np.mean(by_labels[n]) for n in labels], "o-", color=color, label=f"ssvae {name}")
        for n in labels:
            ax.plot(np.full(len(by_labels[n]), n), by_labels[n], ".", color=color, alpha=0.5)
    for (name, by_labels), marker in zip(published.items(), "s^vDP*", strict=False):
        labels = sorted(by_labels)
        ax.plot(labels, [by_labels[n] for n in labels], f"{marker}--", ms=5, lw=1, color="0.5", mfc="white",
                label=f"published: {name}")
    ax.set_xscale("log")
    ticks = sorted({n for by_labels in (*measured.values(), *published.values()) for n in by_labels})
    ax.set_xticks(ticks, [str(n) for n in ticks])
    ax.minorticks_off()
    ax.set(title=title, xlabel="labelled training images", ylabel="test accuracy at the best validation epoch (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, path)


def plot_gradient_variance(variances: dict[str, dict[str, Sequence[float]]], path: Path) -> Path:
    """tr Cov of the gradient w.r.t. encoder_y per scheme, at initialisation and after
    training, on a log scale: the mean over seeds as a bar, each seed as a dot
    (variances: scheme -> {"init": per seed, "final": per seed})."""
    names = list(variances)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.0 * len(names) + 2), 4.5))
    width = 0.38
    for j, (when, color) in enumerate([("init", "tab:gray"), ("final", "tab:blue")]):
        label = when  # on the first bar drawn, which need not be the first scheme's
        for i, name in enumerate(names):
            values = np.array([v for v in variances[name][when] if np.isfinite(v)])
            x = i + (j - 0.5) * width
            if len(values) and values.mean() > 0:
                ax.bar(x, values.mean(), width, color=color, label=label)
                label = None
                ax.plot(np.full(len(values), x), values, "k.", ms=4)
            else:  # nothing to draw on a log scale: say why at the foot of the bar
                ax.text(x, 0.02, "0" if len(values) else "n/a", transform=ax.get_xaxis_transform(),
                        ha="center", fontsize=8)
    ax.set_yscale("log")
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set(title="gradient variance of the ELBO w.r.t. encoder_y (one fixed minibatch)",
           ylabel="trace of the covariance")
    ax.grid(alpha=0.3, axis="y")
    if ax.get_legend_handles_labels()[0]:  # no bars at all where only the baseline ran
        ax.legend(title="networks at")
    return _save(fig, path)
