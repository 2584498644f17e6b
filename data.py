"""MNIST loading and the Kingma/Pyro labelled/unlabelled split for the M2 model.

The four MNIST files are read in the torchvision layout (<root>/MNIST/raw/),
gzip or decompressed, checked against known SHA-256 digests, and turned into
float tensors in [0, 1]. Nothing is cached on disk: decoding the raw files is
about as fast as reading any cache would be.
"""

import gzip
import hashlib
import http.client
import math
import os
import struct
import tempfile
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

MNIST_FILES: dict[str, str] = {
    "train-images": "train-images-idx3-ubyte",
    "train-labels": "train-labels-idx1-ubyte",
    "test-images": "t10k-images-idx3-ubyte",
    "test-labels": "t10k-labels-idx1-ubyte",
}

MNIST_SHA256: dict[str, str] = {
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
}

# The same mirrors torchvision uses, in the same order.
MIRRORS: list[str] = [
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
]

NUM_CLASSES = 10
IMAGE_SHAPE = (28, 28)
_IDX_UINT8 = 0x08
_GZIP_MAGIC = b"\x1f\x8b"
_DOWNLOAD_TIMEOUT_S = 30


class DataError(Exception):
    """One-line, user-facing message naming the file and the fix."""


@dataclass
class MNIST:
    """The four MNIST arrays as tensors: images flattened to 784 floats in [0, 1]."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor


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


def _download(name: str, raw_dir: Path) -> None:
    """Fetch <name>.gz from the first mirror that serves bytes with the right digest.

    Writes to a temporary file in raw_dir and renames it, so an interrupted
    download never leaves a file that looks complete.
    """
    errors = []
    for mirror in MIRRORS:
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
            if digest != MNIST_SHA256[name]:
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


def _missing_message(raw_dir: Path, missing: list[str], reason: str) -> str:
    files = ", ".join(f"{name}.gz" for name in missing)
    return (
        f"MNIST files missing from {raw_dir}: put {files} there "
        f"(gzip or decompressed), or pass --data-dir / set SSVAE_DATA to a folder "
        f"that contains MNIST/raw/ with them ({reason})"
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


def find_mnist(data_dir: str | Path | None = None, download: bool = True) -> Path:
    """Return the folder holding the four MNIST files, downloading any that are missing.

    The data root is data_dir, else $SSVAE_DATA, else ./data; the files live in
    <root>/MNIST/raw/ as torchvision lays them out, gzip or decompressed.
    """
    raw_dir = data_root(data_dir) / "MNIST" / "raw"
    missing = [name for name in MNIST_FILES.values() if _locate(raw_dir, name) is None]
    if not missing:
        return raw_dir
    if not download:
        raise DataError(_missing_message(raw_dir, missing, "download disabled"))
    try:
        raw_dir.mkdir(parents=True, exist_ok=True)
        for name in missing:
            _download(name, raw_dir)
    except (OSError, DataError) as err:
        raise DataError(
            _missing_message(raw_dir, missing, f"download failed: {err}")
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
    root: str | Path, verify_digests: dict[str, str] | None = None
) -> MNIST:
    """Load the four MNIST-named IDX files found directly in `root` (e.g. Fashion-MNIST).

    verify_digests maps decompressed file names to SHA-256 digests; files named
    in it are checked, the others are not. None skips the check.
    """
    folder = Path(root).expanduser()
    arrays = {
        key: _load_file(folder, name, (verify_digests or {}).get(name))
        for key, name in MNIST_FILES.items()
    }
    tensors = []
    for split_name in ("train", "test"):
        images = arrays[f"{split_name}-images"]
        labels = arrays[f"{split_name}-labels"]
        images_file = folder / MNIST_FILES[f"{split_name}-images"]
        labels_file = folder / MNIST_FILES[f"{split_name}-labels"]
        if images.ndim != 3 or images.shape[1:] != IMAGE_SHAPE:
            raise DataError(
                f"{images_file}: images have shape {images.shape}, expected N x 28 x 28"
            )
        if labels.ndim != 1 or len(labels) != len(images):
            raise DataError(
                f"{labels_file}: labels have shape {labels.shape} but {images_file} holds "
                f"{len(images)} images; the files do not belong together"
            )
        if labels.size and labels.max() >= NUM_CLASSES:
            raise DataError(f"{labels_file}: label {labels.max()} is outside 0-9")
        x = images.reshape(len(images), -1).astype(np.float32)
        x /= 255.0
        tensors += [torch.from_numpy(x), torch.from_numpy(labels.astype(np.int64))]
    return MNIST(*tensors)


def load_mnist(
    data_dir: str | Path | None = None, download: bool = True, verify: bool = True
) -> MNIST:
    """Find (and if allowed, download) MNIST and load it; see find_mnist for the lookup order."""
    return load_idx_dataset(
        find_mnist(data_dir, download), MNIST_SHA256 if verify else None
    )


def _nearest_valid(n: int, largest: int) -> str:
    below = min(max(n // 10 * 10, 0), largest)
    above = below + 10
    options = [v for v in (below, above) if 10 <= v <= largest]
    return " or ".join(str(v) for v in options) or "none (a class has no images)"


def split(
    data: MNIST, num_labeled: int, seed: int, num_train: int = 50000, num_valid: int = 10000
) -> Split:
    """Split MNIST as Kingma et al. and Pyro's SS-VAE example do.

    Training is images 0..num_train-1 of the train file, validation its last
    num_valid images (50000..59999 for MNIST, whatever num_train is, so quick runs
    on fewer training images are validated on the same images), test the test file. num_labeled training images, num_labeled/10 per
    class, are drawn with numpy.random.default_rng(seed) so the split does not
    depend on torch's global RNG; the other training images are unlabelled.
    """
    valid_start = len(data.train_y) - num_valid
    if not 0 < num_train <= valid_start:
        raise ValueError(f"num_train={num_train} must be in 1..{valid_start} (the rest validates)")
    train_y = data.train_y[:num_train].numpy()
    per_class_available = np.bincount(train_y, minlength=NUM_CLASSES)
    largest = NUM_CLASSES * int(per_class_available.min())
    if num_labeled <= 0 or num_labeled % NUM_CLASSES or num_labeled > largest:
        raise ValueError(
            f"num_labeled={num_labeled} must be a multiple of {NUM_CLASSES} between "
            f"{NUM_CLASSES} and {largest} (class-balanced; the rarest class has "
            f"{largest // NUM_CLASSES} of the {num_train} training images); "
            f"nearest valid: {_nearest_valid(num_labeled, largest)}"
        )
    rng = np.random.default_rng(seed)
    per_class = num_labeled // NUM_CLASSES
    labelled = np.sort(
        np.concatenate(
            [
                rng.choice(np.flatnonzero(train_y == c), size=per_class, replace=False)
                for c in range(NUM_CLASSES)
            ]
        )
    )
    is_unlabelled = np.ones(num_train, dtype=bool)
    is_unlabelled[labelled] = False
    labelled_idx = torch.from_numpy(labelled.astype(np.int64))
    unlabelled_idx = torch.from_numpy(np.flatnonzero(is_unlabelled))
    return Split(
        x_labelled=data.train_x[labelled_idx],
        y_labelled=data.train_y[labelled_idx],
        x_unlabelled=data.train_x[unlabelled_idx],
        x_valid=data.train_x[valid_start:],
        y_valid=data.train_y[valid_start:],
        x_test=data.test_x,
        y_test=data.test_y,
        labelled_idx=labelled_idx,
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
