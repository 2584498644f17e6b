"""Tests for data.py: IDX parsing on tiny synthetic files, loading and splitting real MNIST."""

import gzip
import io
import math
import struct
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REAL_RAW

import data
from data import IDX_FILES, DataError


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 array as IDX: magic (0, 0, 0x08, ndim), big-endian dims, payload."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(
        f">{array.ndim}I", *array.shape
    )
    return header + array.astype(np.uint8).tobytes()


def write_idx(path: Path, payload: bytes) -> Path:
    """Write IDX bytes, gzip-compressed when the name ends in .gz."""
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)
    return path


def write_dataset(
    folder: Path,
    n_train: int = 20,
    n_test: int = 10,
    train_labels: np.ndarray | None = None,
) -> Path:
    """Write four tiny MNIST-named gzip IDX files with labels 0..9 cycling."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    if train_labels is None:
        train_labels = np.arange(n_train) % 10
    arrays = {
        "train-images": rng.integers(0, 256, (n_train, 28, 28)),
        "train-labels": train_labels,
        "test-images": rng.integers(0, 256, (n_test, 28, 28)),
        "test-labels": np.arange(n_test) % 10,
    }
    for key, array in arrays.items():
        write_idx(folder / f"{IDX_FILES[key]}.gz", idx_bytes(np.asarray(array)))
    return folder


# --- IDX parsing -----------------------------------------------------------


@pytest.mark.parametrize("name", ["x-idx3-ubyte", "x-idx3-ubyte.gz"])
def test_read_idx_round_trip(tmp_path, name):
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    read = data.read_idx(write_idx(tmp_path / name, idx_bytes(array)))
    assert read.dtype == np.uint8
    np.testing.assert_array_equal(read, array)


def test_read_idx_wrong_magic(tmp_path):
    payload = bytearray(idx_bytes(np.zeros(4, dtype=np.uint8)))
    payload[0] = 1
    with pytest.raises(DataError, match="magic"):
        data.read_idx(write_idx(tmp_path / "x", bytes(payload)))


def test_read_idx_wrong_dtype(tmp_path):
    payload = bytearray(idx_bytes(np.zeros(4, dtype=np.uint8)))
    payload[2] = 0x0D  # float32
    with pytest.raises(DataError, match="uint8"):
        data.read_idx(write_idx(tmp_path / "x", bytes(payload)))


@pytest.mark.parametrize("name", ["x", "x.gz"])
def test_read_idx_truncated_payload(tmp_path, name):
    payload = idx_bytes(np.zeros((3, 28, 28), dtype=np.uint8))[:-1]
    with pytest.raises(DataError, match=name):
        data.read_idx(write_idx(tmp_path / name, payload))


def test_read_idx_trailing_bytes(tmp_path):
    payload = idx_bytes(np.zeros(4, dtype=np.uint8)) + b"\x00"
    with pytest.raises(DataError):
        data.read_idx(write_idx(tmp_path / "x", payload))


def test_read_idx_dims_disagree_with_payload(tmp_path):
    # Header claims 5 items, payload holds 4.
    payload = bytes([0, 0, 0x08, 1]) + struct.pack(">I", 5) + bytes(4)
    with pytest.raises(DataError, match=r"\(5,\)"):
        data.read_idx(write_idx(tmp_path / "x", payload))


def test_read_idx_truncated_gzip_stream(tmp_path):
    compressed = gzip.compress(idx_bytes(np.arange(1000, dtype=np.uint8) % 7))
    path = tmp_path / "x.gz"
    path.write_bytes(compressed[: len(compressed) // 2])
    with pytest.raises(DataError, match="x.gz"):
        data.read_idx(path)


def test_read_idx_corrupt_gzip_stream(tmp_path):
    compressed = bytearray(
        gzip.compress(idx_bytes(np.arange(1000, dtype=np.uint8) % 7))
    )
    compressed[-6] ^= 0xFF  # flip bits in the CRC trailer
    path = write_idx(tmp_path / "x", bytes(compressed))
    with pytest.raises(DataError):
        data.read_idx(path)


# --- load_idx_dataset on synthetic files -----------------------------------


def test_load_idx_dataset_synthetic(tmp_path):
    loaded = data.load_idx_dataset(write_dataset(tmp_path), None)
    assert loaded.train_x.shape == (20, 784) and loaded.train_x.dtype == torch.float32
    assert loaded.test_y.tolist() == list(range(10))
    raw = data.read_idx(tmp_path / "train-images-idx3-ubyte.gz")
    torch.testing.assert_close(
        loaded.train_x[3], torch.from_numpy(raw[3].reshape(-1) / 255.0).float()
    )


def test_load_idx_dataset_accepts_decompressed_files(tmp_path):
    write_dataset(tmp_path)
    for gz in tmp_path.glob("*.gz"):
        gz.with_suffix("").write_bytes(gzip.decompress(gz.read_bytes()))
        gz.unlink()
    assert data.load_idx_dataset(tmp_path, None).train_y.shape == (20,)


def test_labels_outside_0_to_9(tmp_path):
    write_dataset(tmp_path, train_labels=np.full(20, 10))
    with pytest.raises(DataError, match="train-labels-idx1-ubyte.*outside 0-9"):
        data.load_idx_dataset(tmp_path, None)


def test_label_count_mismatch(tmp_path):
    write_dataset(tmp_path, train_labels=np.arange(19) % 10)
    with pytest.raises(DataError, match="train-labels-idx1-ubyte"):
        data.load_idx_dataset(tmp_path, None)


def test_images_not_28x28(tmp_path):
    write_dataset(tmp_path)
    bad = np.zeros((10, 27, 28), dtype=np.uint8)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", idx_bytes(bad))
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte"):
        data.load_idx_dataset(tmp_path, None)


def test_digest_mismatch(tmp_path):
    write_dataset(tmp_path)
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz.*SHA-256.*delete"):
        data.load_idx_dataset(tmp_path, {"t10k-labels-idx1-ubyte": "0" * 64})


def test_split_all_labelled_leaves_empty_unlabelled(tmp_path):
    loaded = data.load_idx_dataset(write_dataset(tmp_path, n_train=30), None)
    s = data.split(loaded, num_labeled=20, seed=0, num_train=20, num_valid=10)
    assert s.x_unlabelled.shape == (0, 784)
    assert s.labelled_idx.tolist() == list(range(20))
    assert s.x_valid.shape == (10, 784)


# --- finding and downloading -----------------------------------------------


def test_missing_files_without_download(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    with pytest.raises(DataError) as info:
        data.find_idx(data.MNIST, tmp_path, download=False)
    message = str(info.value)
    assert str(raw) in message and "SSVAE_DATA" in message and "--data-dir" in message
    assert "\n" not in message


def test_env_var_and_argument_precedence(tmp_path, monkeypatch):
    (tmp_path / "env").mkdir()  # an SSVAE_DATA that does not exist is an error of its own
    monkeypatch.setenv("SSVAE_DATA", str(tmp_path / "env"))
    with pytest.raises(DataError, match=str(tmp_path / "env" / "MNIST" / "raw")):
        data.load_mnist(download=False)
    write_dataset(tmp_path / "arg" / "MNIST" / "raw")
    assert (
        data.find_idx(data.MNIST, tmp_path / "arg", download=False)
        == tmp_path / "arg" / "MNIST" / "raw"
    )


def test_offline_download_fails_with_one_line(tmp_path, monkeypatch):
    def offline(url, timeout):
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(DataError) as info:
        data.find_idx(data.MNIST, tmp_path, download=True)
    message = str(info.value)
    assert str(tmp_path / "MNIST" / "raw") in message and "SSVAE_DATA" in message
    assert "\n" not in message
    assert not list((tmp_path / "MNIST" / "raw").iterdir())


class FakeResponse(io.BytesIO):
    def __init__(self, content: bytes):
        super().__init__(content)
        self.headers = {"Content-Length": str(len(content))}


def test_download_falls_back_to_next_mirror(tmp_path, monkeypatch):
    if not REAL_RAW.is_dir():
        pytest.skip(f"real MNIST not found at {REAL_RAW}")
    requested = []

    def fake_urlopen(url, timeout):
        requested.append(url)
        if url.startswith(data.MNIST.mirrors[0]):
            raise urllib.error.URLError("first mirror down")
        return FakeResponse((REAL_RAW / url.rsplit("/", 1)[1]).read_bytes())

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    raw = data.find_idx(data.MNIST, tmp_path)
    assert sorted(p.name for p in raw.iterdir()) == sorted(
        f"{n}.gz" for n in IDX_FILES.values()
    )
    assert len(requested) == 2 * len(IDX_FILES)


def test_download_rejects_wrong_content(tmp_path, monkeypatch):
    bogus = gzip.compress(idx_bytes(np.zeros(4, dtype=np.uint8)))
    monkeypatch.setattr(
        urllib.request, "urlopen", lambda url, timeout: FakeResponse(bogus)
    )
    with pytest.raises(DataError, match="SHA-256"):
        data.find_idx(data.MNIST, tmp_path)
    assert not list((tmp_path / "MNIST" / "raw").iterdir())


# --- real MNIST ------------------------------------------------------------


def test_load_mnist_shapes_and_ranges(mnist):
    assert mnist.train_x.shape == (60000, 784) and mnist.train_x.dtype == torch.float32
    assert mnist.test_x.shape == (10000, 784) and mnist.test_x.dtype == torch.float32
    assert mnist.train_y.shape == (60000,) and mnist.train_y.dtype == torch.int64
    assert mnist.test_y.shape == (10000,) and mnist.test_y.dtype == torch.int64
    for x in (mnist.train_x, mnist.test_x):
        assert x.min() == 0.0 and x.max() == 1.0
    for y in (mnist.train_y, mnist.test_y):
        assert set(y.unique().tolist()) == set(range(10))


def test_split_class_balanced_and_disjoint(mnist):
    s = data.split(mnist, num_labeled=100, seed=0)
    assert torch.bincount(s.y_labelled, minlength=10).tolist() == [10] * 10
    assert s.labelled_idx.dtype == torch.int64
    assert torch.equal(s.labelled_idx, s.labelled_idx.sort().values)
    assert s.labelled_idx.max() < 50000
    torch.testing.assert_close(
        s.x_labelled, mnist.train_x[s.labelled_idx], rtol=0, atol=0
    )
    torch.testing.assert_close(
        s.y_labelled, mnist.train_y[s.labelled_idx], rtol=0, atol=0
    )
    assert s.x_labelled.shape == (100, 784) and s.x_unlabelled.shape == (49900, 784)
    assert len(s.labelled_idx.unique()) == 100
    # Unlabelled is exactly the training images 0..49999 minus the labelled ones.
    is_labelled = torch.zeros(50000, dtype=torch.bool)
    is_labelled[s.labelled_idx] = True
    torch.testing.assert_close(
        s.x_unlabelled, mnist.train_x[:50000][~is_labelled], rtol=0, atol=0
    )


def test_split_validation_and_test(mnist):
    s = data.split(mnist, num_labeled=100, seed=0)
    assert torch.equal(s.x_valid, mnist.train_x[50000:60000])
    assert torch.equal(s.y_valid, mnist.train_y[50000:60000])
    assert torch.equal(s.x_test, mnist.test_x) and torch.equal(s.y_test, mnist.test_y)


@pytest.mark.parametrize("num_train", [None, 2000])
def test_split_unlabeled_valid_trains_on_validation_pixels(mnist, num_train):
    plain = data.split(mnist, num_labeled=100, seed=0, num_train=num_train)
    both = data.split(mnist, num_labeled=100, seed=0, num_train=num_train, unlabeled_valid=True)
    # The validation images join the unlabelled ones after them; labelled, validation and
    # test images are the same, so the best epoch is still chosen on the same labels.
    assert torch.equal(both.x_unlabelled, torch.cat([plain.x_unlabelled, mnist.train_x[50000:]]))
    for name in ("x_labelled", "y_labelled", "labelled_idx", "x_valid", "y_valid", "x_test", "y_test"):
        assert torch.equal(getattr(both, name), getattr(plain, name)), name


def test_split_seeded_and_independent_of_torch_rng(mnist):
    torch.manual_seed(1)
    first = data.split(mnist, num_labeled=3000, seed=7).labelled_idx
    torch.manual_seed(2)
    again = data.split(mnist, num_labeled=3000, seed=7).labelled_idx
    other = data.split(mnist, num_labeled=3000, seed=8).labelled_idx
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


@pytest.mark.parametrize("num_labeled", [105, 0, -10, 50010])
def test_split_invalid_num_labeled(mnist, num_labeled):
    with pytest.raises(ValueError, match="nearest valid"):
        data.split(mnist, num_labeled=num_labeled, seed=0)


def test_num_labeled_from_fraction():
    assert data.num_labeled_from_fraction(0.1) == 5000
    assert data.num_labeled_from_fraction(1.0) == 50000
    assert data.num_labeled_from_fraction(0.0011) == 60  # 55 rounds half-up
    assert data.num_labeled_from_fraction(0.5, num_train=1000) == 500


@pytest.mark.parametrize("fraction", [0, -0.1, 1.5, math.nan, 1e-6])
def test_num_labeled_from_fraction_invalid(fraction):
    with pytest.raises(ValueError, match="fraction"):
        data.num_labeled_from_fraction(fraction)


def test_binarise_draws_bernoulli_pixels():
    torch.manual_seed(0)
    grey = torch.tensor([0.0, 0.2, 0.5, 0.9, 1.0]).repeat(20000, 1)
    x = data.binarise(grey)
    assert x.dtype == grey.dtype and set(x.unique().tolist()) <= {0.0, 1.0}
    assert x[:, 0].sum() == 0 and x[:, -1].sum() == 20000  # certain pixels stay as they are
    # Each column's frequency of ones is its grey level, within 4 binomial standard errors.
    assert torch.allclose(x.mean(0), grey[0], atol=4 * math.sqrt(0.25 / 20000))
