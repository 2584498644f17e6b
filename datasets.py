"""The data sets a run can use, by name (`--dataset`), each loaded into a data.Dataset.

    mnist           handwritten digits 0-9 (data.MNIST)
    fashion-mnist   ten kinds of clothing in the same 28 x 28 IDX layout (data.FASHION_MNIST)
    npz             a user's own images (--data-file), read by `load_npz`

An .npz file holds:

    x        N images, N x H x W (or N x H x W x 1, or N x D with D a square), uint8 in
             0..255 or floats in [0, 1]; pixels are modelled as Bernoulli variables
    y        N integer labels 0..K-1, -1 where the label is unknown
    x_test   optional test images in the same form, with
    y_test   their labels (no -1)
    classes  optional K class names

The number of classes K is the largest label + 1 (or the number of names); the image size
comes from x. Without x_test, a fixed VALID_SHARE of the labelled images (drawn with seed 0,
so that every run and seed tests on the same images) is held out as the test set.
"""

from __future__ import annotations

import math
import zipfile
from pathlib import Path

import numpy as np
import torch

from data import FASHION_MNIST, MNIST, VALID_SHARE, DataError, Dataset, load_idx

DATASETS = ("mnist", "fashion-mnist", "npz")


def load(dataset: str, data_dir: str | Path | None = None, data_file: str | Path | None = None,
         download: bool = True) -> Dataset:
    """The data set called `dataset`; data_dir is where IDX files live, data_file the .npz."""
    if dataset == "npz":
        if not data_file:
            raise DataError("--dataset npz needs --data-file FILE.npz holding x and y (see datasets.py)")
        return load_npz(data_file)
    if dataset not in DATASETS:
        raise DataError(f"unknown data set {dataset!r}; choose one of: {', '.join(DATASETS)}")
    return load_idx(MNIST if dataset == "mnist" else FASHION_MNIST, data_dir, download)


def load_npz(path: str | Path) -> Dataset:
    """A user's images and labels from an .npz file (module docstring); DataError names what is wrong."""
    path = Path(path).expanduser()
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except FileNotFoundError:
        raise DataError(f"--data-file {path}: no such file; give the path of an .npz holding x and y") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"--data-file {path}: not a readable .npz file ({e}); "
                        f"write it with numpy.savez(path, x=images, y=labels)") from None
    missing = [key for key in ("x", "y") if key not in arrays]
    if missing:
        raise DataError(f"--data-file {path}: no array {' or '.join(missing)} (it holds {', '.join(arrays) or 'none'}); "
                        f"save the images as x and the labels as y (-1 where unknown)")
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise DataError(f"--data-file {path}: x_test and y_test come together; save both or neither")
    x, shape = _images(arrays["x"], f"{path}: x")
    y = _labels(arrays["y"], len(x), f"{path}: y", unknown_allowed=True)
    if "x_test" in arrays:
        x_test, test_shape = _images(arrays["x_test"], f"{path}: x_test")
        if test_shape != shape:
            raise DataError(f"{path}: x_test images are {test_shape[0]} x {test_shape[1]} but x images are "
                            f"{shape[0]} x {shape[1]}; save both at one size")
        y_test = _labels(arrays["y_test"], len(x_test), f"{path}: y_test", unknown_allowed=False)
        classes = _class_names(arrays.get("classes"), np.concatenate([y, y_test]), path)
    else:
        classes = _class_names(arrays.get("classes"), y, path)
        known = np.flatnonzero(y >= 0)
        if len(known) < 3:
            raise DataError(f"{path}: {len(known)} labelled image(s) and no x_test; at least 3 labelled images "
                            f"are needed (to train, validate and test), or save a test set as x_test, y_test")
        rng = np.random.default_rng(0)
        held_out = np.sort(rng.choice(known, size=max(1, round(VALID_SHARE * len(known))), replace=False))
        x_test, y_test = x[held_out], y[held_out].copy()
        keep = np.setdiff1d(np.arange(len(x)), held_out)
        x, y = x[keep], y[keep]
    as_tensors = [torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(x_test), torch.from_numpy(y_test)]
    return Dataset(*as_tensors, classes=classes, image_shape=shape, user_labels=True)


def _images(array: np.ndarray, what: str) -> tuple[np.ndarray, tuple[int, int]]:
    """Images as N x (H*W) float32 in [0, 1], and (H, W)."""
    if array.ndim == 4 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 2 and math.isqrt(array.shape[1]) ** 2 == array.shape[1] and array.shape[1] > 0:
        side = math.isqrt(array.shape[1])
        array = array.reshape(len(array), side, side)
    if array.ndim != 3 or 0 in array.shape:
        channels = f"; {array.shape[-1]} channels: convert to grey first" if array.ndim == 4 else ""
        raise DataError(f"{what} has shape {array.shape}, not N x H x W grey images (N x D with D a square "
                        f"also works){channels}")
    if array.dtype == np.uint8:
        images = array.astype(np.float32) / 255.0
    elif np.issubdtype(array.dtype, np.floating):
        images = array.astype(np.float32)
        if not np.isfinite(images).all() or images.min() < 0 or images.max() > 1:
            raise DataError(f"{what} holds values outside [0, 1] (or NaN); scale the images to [0, 1] "
                            f"or save them as uint8 0..255")
    else:
        raise DataError(f"{what} has dtype {array.dtype}; save images as uint8 (0..255) or floats in [0, 1]")
    return images.reshape(len(images), -1), (array.shape[1], array.shape[2])


def _labels(array: np.ndarray, n: int, what: str, unknown_allowed: bool) -> np.ndarray:
    """Labels as int64, checked against the n images they belong to."""
    if array.ndim != 1 or len(array) != n:
        raise DataError(f"{what} has shape {array.shape}, but there are {n} images: one label per image")
    whole = np.issubdtype(array.dtype, np.integer) or (
        np.issubdtype(array.dtype, np.floating) and np.isfinite(array).all() and (array == np.round(array)).all())
    if not whole:
        raise DataError(f"{what} has dtype {array.dtype} with values that are not whole numbers; "
                            f"save integer labels 0..K-1" + (" (-1 where unknown)" if unknown_allowed else ""))
    labels = array.astype(np.int64)
    lowest = -1 if unknown_allowed else 0
    if len(labels) and labels.min() < lowest:
        allowed = "0..K-1, or -1 where unknown" if unknown_allowed else "0..K-1 (a test label must be known)"
        raise DataError(f"{what} holds the label {labels.min()}; labels are {allowed}")
    return labels


def _class_names(names: np.ndarray | None, labels: np.ndarray, path: Path) -> tuple[str, ...]:
    """The class names saved as `classes`, else 0..K-1 with K the largest label + 1."""
    largest = int(labels.max(initial=-1))
    if names is None:
        if largest < 1:
            raise DataError(f"{path}: the labels name fewer than 2 classes; label at least two classes 0 and 1")
        return tuple(str(k) for k in range(largest + 1))
    if names.ndim != 1 or not np.issubdtype(names.dtype, np.str_):
        raise DataError(f"{path}: classes must be a list of names (strings), not {names.dtype} of shape {names.shape}")
    if len(names) < 2 or len(names) <= largest:
        raise DataError(f"{path}: classes names {len(names)} classes but the labels go up to {largest}; "
                        f"give one name per class (at least 2)")
    return tuple(str(name) for name in names)
