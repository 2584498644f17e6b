"""Image data sets in the IDX layout (MNIST, Fashion-MNIST) and the labelled/unlabelled split.

The four files of a data set are read in the torchvision layout (<root>/MNIST/raw/,
<root>/FashionMNIST/raw/), gzip or decompressed, checked against known SHA-256 digests,
and turned into float tensors in [0, 1]. Nothing is cached on disk: decoding the raw
files is about as fast as reading any cache would be. datasets.py names the data sets
and reads a user's own .npz file into the same `Dataset`.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import math
import os
import struct
import tempfile
import urllib.request
import zlib
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

IDX_FILES: dict[str, str] = {
    "train-images": "train-images-idx3-ubyte",
    "train-labels": "train-labels-idx1-ubyte",
    "test-images": "t10k-images-idx3-ubyte",
    "test-labels": "t10k-labels-idx1-ubyte",
}

NUM_CLASSES = 10
IMAGE_SHAPE = (28, 28)
DIGITS = tuple(str(k) for k in range(NUM_CLASSES))


@dataclass
class IdxSource:
    """Where a data set of four IDX files lives and how its files are recognised.

    folder: <root>/<folder>/ as torchvision lays it out; sha256: digests of the decompressed
    files; mirrors: tried in order for a missing file; system_dir: a folder a system package
    installs the files into, used when <root>/<folder>/ lacks them.
    """

    name: str
    folder: str
    sha256: dict[str, str]
    mirrors: list[str]
    classes: tuple[str, ...]
    system_dir: str | None = None


MNIST = IdxSource(
    name="MNIST",
    folder="MNIST/raw",
    sha256={
        "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    },
    # The same mirrors torchvision uses, in the same order.
    mirrors=["https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"],
    classes=DIGITS,
)

FASHION_MNIST = IdxSource(
    name="Fashion-MNIST",
    folder="FashionMNIST/raw",
    sha256={
        "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    },
    mirrors=["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
    classes=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
             "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
    system_dir="/usr/share/datasets/fashion-mnist",  # Debian's dataset-fashion-mnist
)
_IDX_UINT8 = 0x08
_GZIP_MAGIC = b"\x1f\x8b"
_DOWNLOAD_TIMEOUT_S = 30


class DataError(Exception):
    """One-line, user-facing message naming the file and the fix."""


@dataclass
class Dataset:
    """Training and test images, flattened to floats in [0, 1], with their labels.

    user_labels: the labels are a user's own (datasets.py, npz): -1 marks an unknown one,
    and `split` uses them as they are instead of drawing a class-balanced labelled set.
    """

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    classes: tuple[str, ...] = DIGITS
    image_shape: tuple[int, int] = IMAGE_SHAPE
    user_labels: bool = False

    @property
    def num_pixels(self) -> int:
        return self.image_shape[0] * self.image_shape[1]


@dataclass
class Split:
    """Labelled, unlabelled, validation and test sets for semi-supervised training."""

    x_labelled: Tensor
    y_labelled: Tensor
    x_unlabelled: Tensor
    x_valid: Tensor
    y_valid: Tensor
    x_test: Tensor
    y_test: Tensor
    labelled_idx: Tensor
    classes: tuple[str, ...] = DIGITS
    image_shape: tuple[int, int] = IMAGE_SHAPE

    def tensors_to(self, device: torch.device) -> Split:
        """The same split with every tensor on `device`."""
        return replace(self, **{f.name: getattr(self, f.name).to(device) for f in fields(self)
                                if isinstance(getattr(self, f.name), Tensor)})


def _read_bytes(path: Path) -> bytes:
    """Return the file's content, decompressed if it is gzip."""
    try:
        raw = path.read_bytes()
        # Sniff the gzip magic rather than trust the suffix: IDX files start
        # with two zero bytes, so the two can never be confused.
        if raw[:2] == _GZIP_MAGIC:
            return gzip.decompress(raw)
        return raw
    except (EOFError, gzip.BadGzipFile, zlib.error, OSError) as err:
        raise DataError(
            f"{path}: cannot be read or decompressed ({err}); delete it and re-download or re-copy it"
        ) from err


def _parse_idx(raw: bytes, path: Path) -> np.ndarray:
    """Decode IDX bytes into a uint8 array; `path` is only for error messages."""
    fix = "delete it and re-download or re-copy it"
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise DataError(f"{path}: not an IDX file (bad magic number); {fix}")
    if raw[2] != _IDX_UINT8:
        raise DataError(
            f"{path}: IDX data type 0x{raw[2]:02x} is not uint8 (0x08); {fix}"
        )
    ndim = raw[3]
    header_len = 4 + 4 * ndim
    if ndim == 0 or len(raw) < header_len:
        raise DataError(f"{path}: IDX header is truncated or has no dimensions; {fix}")
    dims = struct.unpack(f">{ndim}I", raw[4:header_len])
    expected = math.prod(dims)
    actual = len(raw) - header_len
    if actual != expected:
        raise DataError(
            f"{path}: header dims {dims} need {expected} bytes of data but the file has {actual}; {fix}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(dims)


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (gzip or raw) into a uint8 array of the shape in its header.

    The array is a read-only view of the file's bytes; copy it to modify it.
    """
    path = Path(path)
    return _parse_idx(_read_bytes(path), path)


def _locate(folder: Path, name: str) -> Path | None:
    """The decompressed file if present (faster to read), else the .gz, else None."""
    for candidate in (folder / name, folder / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _download(source: IdxSource, name: str, raw_dir: Path) -> None:
    """Fetch <name>.gz from the first mirror that serves bytes with the right digest.

    Writes to a temporary file in raw_dir and renames it, so an interrupted
    download never leaves a file that looks complete.
    """
    errors = []
    for mirror in source.mirrors:
        url = f"{mirror}{name}.gz"
        tmp = None
        try:
            with (
                urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as response,
                tempfile.NamedTemporaryFile(
                    dir=raw_dir, suffix=".part", delete=False
                ) as out,
            ):
                tmp = Path(out.name)
                total = int(response.headers.get("Content-Length") or 0) or None
                with tqdm(
                    total=total, unit="B", unit_scale=True, desc=f"{name}.gz"
                ) as bar:
                    while chunk := response.read(1 << 16):
                        out.write(chunk)
                        bar.update(len(chunk))
            digest = hashlib.sha256(_read_bytes(tmp)).hexdigest()
            if digest != source.sha256[name]:
                raise DataError(f"wrong SHA-256 {digest[:12]}...")
            os.replace(tmp, raw_dir / f"{name}.gz")
            return
        except (OSError, ValueError, http.client.HTTPException, DataError) as err:
            # OSError covers urllib's URLError/HTTPError and socket timeouts;
            # HTTPException covers a connection cut mid-body (IncompleteRead).
            errors.append(f"{url}: {err}")
            if tmp is not None:
                tmp.unlink(missing_ok=True)
    raise DataError("; ".join(errors))


def _missing_message(source: IdxSource, raw_dir: Path, missing: list[str], reason: str) -> str:
    files = ", ".join(f"{name}.gz" for name in missing)
    package = " (or install Debian's dataset-fashion-mnist)" if source.system_dir else ""
    return (
        f"{source.name} files missing from {raw_dir}: put {files} there "
        f"(gzip or decompressed){package}, or pass --data-dir / set SSVAE_DATA to a folder "
        f"that contains {source.folder}/ with them ({reason})"
    )


def data_root(data_dir: str | Path | None) -> Path:
    """data_dir, else $SSVAE_DATA, else ./data, checked to be a folder that can be read.

    A data_dir or ./data that does not exist yet is made, to download into; an SSVAE_DATA
    that does not exist is more likely a typo in a shell profile, so it is an error.
    """
    env = os.environ.get("SSVAE_DATA", "")
    if data_dir:
        root, source = Path(data_dir), f"the data folder {data_dir}"
    elif env:
        root, source = Path(env), f"environment variable SSVAE_DATA={env}"
        if not root.expanduser().exists():
            raise DataError(f"{source}: no such folder; set SSVAE_DATA to the folder that holds MNIST/raw/ "
                            f"(make it first to download MNIST there), or unset it to use ./data")
    else:
        root, source = Path("data"), "the data folder ./data"
    root = root.expanduser().resolve()
    if root.exists() and not root.is_dir():
        raise DataError(f"{source} is a file, not a folder; give the folder that holds MNIST/raw/")
    if root.is_dir() and not os.access(root, os.R_OK | os.X_OK):
        raise DataError(f"{source} cannot be read (permission denied); make it readable, or give another folder")
    return root


def find_idx(source: IdxSource, data_dir: str | Path | None = None, download: bool = True) -> Path:
    """Return the folder holding the four files of `source`, downloading any that are missing.

    The data root is data_dir, else $SSVAE_DATA, else ./data; the files live in
    <root>/<source.folder>/ as torchvision lays them out, gzip or decompressed. Where that
    folder lacks them and a system package has installed them all, its folder is used.
    """
    raw_dir = data_root(data_dir) / source.folder
    missing = [name for name in IDX_FILES.values() if _locate(raw_dir, name) is None]
    if not missing:
        return raw_dir
    system = Path(source.system_dir) if source.system_dir else None
    if system and all(_locate(system, name) for name in IDX_FILES.values()):
        return system
    if not download:
        raise DataError(_missing_message(source, raw_dir, missing, "download disabled"))
    try:
        raw_dir.mkdir(parents=True, exist_ok=True)
        for name in missing:
            _download(source, name, raw_dir)
    except (OSError, DataError) as err:
        raise DataError(
            _missing_message(source, raw_dir, missing, f"download failed: {err}")
        ) from err
    return raw_dir


def _load_file(folder: Path, name: str, digest: str | None) -> np.ndarray:
    path = _locate(folder, name)
    if path is None:
        raise DataError(f"{folder / name}(.gz) not found; copy the file into {folder}")
    raw = _read_bytes(path)
    if digest is not None and hashlib.sha256(raw).hexdigest() != digest:
        raise DataError(
            f"{path}: SHA-256 of its content does not match the expected digest "
            f"(corrupt or a different dataset); delete it and re-download or re-copy it"
        )
    return _parse_idx(raw, path)


def load_idx_dataset(
    root: str | Path, verify_digests: dict[str, str] | None = None, classes: tuple[str, ...] = DIGITS
) -> Dataset:
    """Load the four MNIST-named IDX files found directly in `root` (MNIST, Fashion-MNIST).

    verify_digests maps decompressed file names to SHA-256 digests; files named
    in it are checked, the others are not. None skips the check.
    """
    folder = Path(root).expanduser()
    arrays = {
        key: _load_file(folder, name, (verify_digests or {}).get(name))
        for key, name in IDX_FILES.items()
    }
    tensors = []
    for split_name in ("train", "test"):
        images = arrays[f"{split_name}-images"]
        labels = arrays[f"{split_name}-labels"]
        images_file = folder / IDX_FILES[f"{split_name}-images"]
        labels_file = folder / IDX_FILES[f"{split_name}-labels"]
        if images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE:
            raise DataError(
                f"{images_file}: images have shape {images.shape}, expected N x 28 x 28"
            )
        if labels.ndim != 1 or len(labels) != len(images):
            raise DataError(
                f"{labels_file}: labels have shape {labels.shape} but {images_file} holds "
                f"{len(images)} images; the files do not belong together"
            )
        if labels.size and labels.max() >= len(classes):
            raise DataError(f"{labels_file}: label {labels.max()} is outside 0-{len(classes) - 1}")
        x = images.reshape(len(images), -1).astype(np.float32)
        x /= 255.0
        tensors += [torch.from_numpy(x), torch.from_numpy(labels.astype(np.int64))]
    return Dataset(*tensors, classes=classes)


def load_idx(
    source: IdxSource, data_dir: str | Path | None = None, download: bool = True, verify: bool = True
) -> Dataset:
    """Find (and if allowed, download) an IDX data set and load it; see find_idx for the lookup order."""
    return load_idx_dataset(find_idx(source, data_dir, download), source.sha256 if verify else None, source.classes)


def load_mnist(data_dir: str | Path | None = None, download: bool = True) -> Dataset:
    """MNIST, checked by its digests."""
    return load_idx(MNIST, data_dir, download)


def _nearest_valid(n: int, largest: int) -> str:
    below = min(max(n // 10 * 10, 0), largest)
    above = below + 10
    options = [v for v in (below, above) if 10 <= v <= largest]
    return " or ".join(str(v) for v in options) or "none (a class has no images)"


def split(
    data: Dataset, num_labeled: int | None, seed: int, num_train: int | None = None, num_valid: int = 10000,
    unlabeled_valid: bool = False,
) -> Split:
    """Split a data set into labelled, unlabelled, validation and test images.

    MNIST and Fashion-MNIST are split as Kingma et al. and Pyro's SS-VAE example split
    MNIST: training is images 0..num_train-1 of the train file (all but the last num_valid
    by default), validation its last num_valid images (50000..59999, whatever num_train is,
    so quick runs on fewer training images are validated on the same images), test the
    test file. num_labeled training images, num_labeled/classes per class, are drawn with
    numpy.random.default_rng(seed) so the split does not depend on torch's global RNG; the
    other training images are unlabelled.

    A user's own data (data.user_labels) keeps its labels as they are: num_labeled must be
    None, a seeded VALID_SHARE of the labelled images validates, and the rest of them are
    the labelled training set, however the classes fall.

    unlabeled_valid: the validation images also train, unlabelled (Maaløe et al.'s
    train_valid_combine). Their labels are still seen only to choose the best epoch.
    """
    if data.user_labels:
        return _split_user_labels(data, num_labeled, seed, num_train, unlabeled_valid)
    valid_start = len(data.train_y) - num_valid
    num_train = num_train or valid_start
    if not 0 < num_train <= valid_start:
        raise ValueError(f"num_train={num_train} must be in 1..{valid_start} (the rest validates)")
    num_classes = len(data.classes)
    train_y = data.train_y[:num_train].numpy()
    per_class_available = np.bincount(train_y, minlength=num_classes)
    largest = num_classes * int(per_class_available.min())
    if num_labeled is None or num_labeled <= 0 or num_labeled % num_classes or num_labeled > largest:
        raise ValueError(
            f"num_labeled={num_labeled} must be a multiple of {num_classes} between "
            f"{num_classes} and {largest} (class-balanced; the rarest class has "
            f"{largest // num_classes} of the {num_train} training images); "
            f"nearest valid: {_nearest_valid(num_labeled or 0, largest)}"
        )
    rng = np.random.default_rng(seed)
    per_class = num_labeled // num_classes
    labelled = np.sort(
        np.concatenate(
            [
                rng.choice(np.flatnonzero(train_y == c), size=per_class, replace=False)
                for c in range(num_classes)
            ]
        )
    )
    valid = np.arange(valid_start, len(data.train_y))
    return _make_split(data, num_train, labelled, valid, unlabeled_valid)


VALID_SHARE = 0.1  # of a user's labelled images, held out to validate (at least one)


def _split_user_labels(
    data: Dataset, num_labeled: int | None, seed: int, num_train: int | None, unlabeled_valid: bool
) -> Split:
    if num_labeled is not None:
        raise ValueError("the labels in the data file decide which images are labelled: "
                         "drop --num-labeled / --labeled-fraction (mark unknown labels -1 in y)")
    num_train = num_train or len(data.train_y)
    if not 0 < num_train <= len(data.train_y):
        raise ValueError(f"num_train={num_train} must be in 1..{len(data.train_y)}")
    known = np.flatnonzero(data.train_y[:num_train].numpy() >= 0)
    if len(known) < 2:
        raise ValueError(f"the first {num_train} training images hold {len(known)} labelled image(s); "
                         f"at least 2 are needed, one to train on and one to validate")
    rng = np.random.default_rng(seed)
    valid = np.sort(rng.choice(known, size=max(1, round(VALID_SHARE * len(known))), replace=False))
    return _make_split(data, num_train, np.setdiff1d(known, valid), valid, unlabeled_valid)


def _make_split(
    data: Dataset, num_train: int, labelled: np.ndarray, valid: np.ndarray, unlabeled_valid: bool
) -> Split:
    """Training images 0..num_train-1 not in `labelled` or `valid` are the unlabelled ones,
    and with unlabeled_valid the `valid` ones too, wherever they lie."""
    is_unlabelled = np.zeros(max(num_train, int(valid.max(initial=-1)) + 1), dtype=bool)
    is_unlabelled[:num_train] = True
    is_unlabelled[labelled] = False
    is_unlabelled[valid] = unlabeled_valid
    labelled_idx = torch.from_numpy(labelled.astype(np.int64))
    unlabelled_idx = torch.from_numpy(np.flatnonzero(is_unlabelled))
    valid_idx = torch.from_numpy(valid.astype(np.int64))
    return Split(
        x_labelled=data.train_x[labelled_idx],
        y_labelled=data.train_y[labelled_idx],
        x_unlabelled=data.train_x[unlabelled_idx],
        x_valid=data.train_x[valid_idx],
        y_valid=data.train_y[valid_idx],
        x_test=data.test_x,
        y_test=data.test_y,
        labelled_idx=labelled_idx,
        classes=data.classes,
        image_shape=data.image_shape,
    )


def num_labeled_from_fraction(fraction: float, num_train: int = 50000) -> int:
    """Number of labelled images for a fraction of the training set, a multiple of 10."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction={fraction} must be in (0, 1]")
    # Half-up to the nearest multiple of 10 so every class gets the same count.
    n = (round(fraction * num_train) + 5) // 10 * 10
    if n == 0:
        raise ValueError(
            f"fraction={fraction} gives no labelled images; use at least {10 / num_train:g} (10 images)"
        )
    return n


def binarise(grey: Tensor) -> Tensor:
    """x ~ Bernoulli(grey), pixel by pixel: 1 where a uniform draw falls below the grey level.

    The same law as torch.bernoulli(grey), whose CPU kernel draws one pixel at a time at about
    2.5 times the cost of torch.rand_like; the training step binarises every minibatch anew.
    """
    return (torch.rand_like(grey) < grey).to(grey.dtype)
