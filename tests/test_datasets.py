"""Tests for datasets.py: Fashion-MNIST (layouts, digests, Debian's folder), a user's .npz
(layouts, image sizes, class counts, bad files), the split of user labels, and short runs."""

import hashlib
import json
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REAL_RAW
from PIL import Image
from test_data import FakeResponse, write_dataset

import data
import datasets
import run
from data import IDX_FILES, DataError

DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")
TINY = ["--epochs", "1", "--batch-size", "20", "--hidden-dim", "16", "--z-dim", "2", "--precision", "fp32"]


def digests_of(folder: Path) -> dict[str, str]:
    """SHA-256 of the decompressed files, as IdxSource.sha256 holds them."""
    return {name: hashlib.sha256(data._read_bytes(folder / f"{name}.gz")).hexdigest() for name in IDX_FILES.values()}


@pytest.fixture
def fake_fashion(tmp_path, monkeypatch):
    """Tiny Fashion-MNIST-named files whose digests Fashion-MNIST is told to expect; no Debian
    folder and no mirror, so nothing outside tmp_path is found."""
    folder = write_dataset(tmp_path / "root" / "FashionMNIST" / "raw", n_train=40, n_test=10)
    monkeypatch.setattr(data.FASHION_MNIST, "sha256", digests_of(folder))
    monkeypatch.setattr(data.FASHION_MNIST, "system_dir", str(tmp_path / "no-package"))
    monkeypatch.setattr(data.FASHION_MNIST, "mirrors", [])
    return tmp_path / "root"


# --- Fashion-MNIST ---------------------------------------------------------------------------


def test_fashion_mnist_has_its_class_names(fake_fashion):
    loaded = datasets.load("fashion-mnist", fake_fashion)
    assert loaded.classes[0] == "T-shirt/top" and loaded.classes[9] == "Ankle boot"
    assert loaded.train_x.shape == (40, 784) and not loaded.user_labels


def test_fashion_mnist_files_are_checked_by_their_own_digests(fake_fashion, monkeypatch):
    # MNIST's digests, which real MNIST files pass, reject these files.
    monkeypatch.setattr(data.FASHION_MNIST, "sha256", data.MNIST.sha256)
    with pytest.raises(DataError, match="SHA-256 of its content does not match"):
        datasets.load("fashion-mnist", fake_fashion)


def test_fashion_mnist_missing_names_its_folder_and_the_package(tmp_path, monkeypatch):
    monkeypatch.setattr(data.FASHION_MNIST, "system_dir", str(tmp_path / "no-package"))
    with pytest.raises(DataError) as err:
        datasets.load("fashion-mnist", tmp_path, download=False)
    message = str(err.value)
    assert "Fashion-MNIST files missing from" in message and "FashionMNIST/raw" in message
    assert "dataset-fashion-mnist" in message and len(message.splitlines()) == 1


def test_fashion_mnist_found_in_the_system_package_folder(tmp_path, monkeypatch):
    package = write_dataset(tmp_path / "package")
    monkeypatch.setattr(data.FASHION_MNIST, "system_dir", str(package))
    monkeypatch.setattr(data.FASHION_MNIST, "sha256", digests_of(package))
    assert data.find_idx(data.FASHION_MNIST, tmp_path / "empty-root", download=False) == package


def test_fashion_mnist_downloads_from_its_own_mirror_and_refuses_mnist(tmp_path, monkeypatch):
    if not REAL_RAW.is_dir():
        pytest.skip(f"real MNIST not found at {REAL_RAW}")
    monkeypatch.setattr(data.FASHION_MNIST, "system_dir", str(tmp_path / "no-package"))
    requested = []

    def serve_mnist(url, timeout):  # a mirror that serves MNIST's bytes under Fashion-MNIST's names
        requested.append(url)
        return FakeResponse((REAL_RAW / url.rsplit("/", 1)[1]).read_bytes())

    monkeypatch.setattr(urllib.request, "urlopen", serve_mnist)
    with pytest.raises(DataError, match="wrong SHA-256") as err:
        datasets.load("fashion-mnist", tmp_path)
    assert requested[0].startswith(data.FASHION_MNIST.mirrors[0]) and "FashionMNIST/raw" in str(err.value)
    assert not list((tmp_path / "FashionMNIST" / "raw").iterdir())


@pytest.mark.skipif(not DEBIAN_FASHION.is_dir(), reason=f"Debian's dataset-fashion-mnist not installed at {DEBIAN_FASHION}")
def test_real_fashion_mnist_from_the_debian_package(tmp_path):
    loaded = datasets.load("fashion-mnist", tmp_path, download=False)  # passes the real digests
    assert loaded.train_x.shape == (60000, 784) and loaded.test_x.shape == (10000, 784)
    assert torch.bincount(loaded.train_y).tolist() == [6000] * 10
    assert len(data.split(loaded, 100, seed=0).x_labelled) == 100


# --- a user's .npz -----------------------------------------------------------------------------


def save_npz(path: Path, **arrays) -> Path:
    np.savez(path, **arrays)
    return path


def images(n: int, shape=(12, 9), seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


@pytest.mark.parametrize("x, shape", [
    (images(30), (12, 9)),                                                       # N x H x W uint8
    (images(30)[..., None] / 255.0, (12, 9)),                                    # N x H x W x 1 floats
    (images(30, (5, 5)).reshape(30, 25), (5, 5)),                                # N x D, D a square
])
def test_npz_layouts(tmp_path, x, shape):
    y = np.arange(30) % 3
    loaded = datasets.load_npz(save_npz(tmp_path / "d.npz", x=x, y=y, x_test=x[:4], y_test=y[:4]))
    assert loaded.image_shape == shape and loaded.train_x.shape == (30, shape[0] * shape[1])
    assert 0 <= loaded.train_x.min() and loaded.train_x.max() <= 1 and loaded.train_x.dtype == torch.float32
    assert loaded.classes == ("0", "1", "2") and loaded.user_labels


@pytest.mark.parametrize("num_classes", [2, 3, 7, 13])
def test_npz_class_count_comes_from_the_labels(tmp_path, num_classes):
    y = np.arange(60) % num_classes
    y[::4] = -1  # a quarter unknown
    loaded = datasets.load_npz(save_npz(tmp_path / "d.npz", x=images(60), y=y))
    assert len(loaded.classes) == num_classes


def test_npz_class_names_and_held_out_test_set(tmp_path):
    y = np.full(100, -1)
    y[:40] = np.arange(40) % 4
    names = np.array(["cat", "dog", "owl", "eel"])
    path = save_npz(tmp_path / "d.npz", x=images(100), y=y, classes=names)
    first, again = datasets.load_npz(path), datasets.load_npz(path)
    assert first.classes == ("cat", "dog", "owl", "eel")
    # 10% of the 40 labelled images, the same ones each time, out of training and all labelled.
    assert len(first.test_y) == 4 and (first.test_y >= 0).all() and torch.equal(first.test_x, again.test_x)
    assert len(first.train_y) == 96 and int((first.train_y >= 0).sum()) == 36


def test_split_of_user_labels(tmp_path):
    y = np.full(200, -1)
    y[:50] = np.arange(50) % 5
    loaded = datasets.load_npz(save_npz(tmp_path / "d.npz", x=images(200), y=y, x_test=images(10), y_test=np.arange(10) % 5))
    s = data.split(loaded, None, seed=0)
    assert len(s.x_valid) == 5 and len(s.x_labelled) == 45 and len(s.x_unlabelled) == 150
    assert (s.y_valid >= 0).all() and (s.y_labelled >= 0).all()
    assert not set(s.labelled_idx.tolist()) & set(torch.nonzero(loaded.train_y < 0).flatten().tolist())
    other = data.split(loaded, None, seed=1)
    assert not torch.equal(s.y_valid, other.y_valid) or not torch.equal(s.x_valid, other.x_valid)
    assert s.classes == loaded.classes and s.image_shape == (12, 9)
    with pytest.raises(ValueError, match="the labels in the data file decide"):
        data.split(loaded, 20, seed=0)
    # Here the validation images lie among the training ones; with unlabeled_valid they also train, unlabelled.
    both = data.split(loaded, None, seed=0, unlabeled_valid=True)
    assert len(both.x_unlabelled) == 155 and torch.equal(both.x_valid, s.x_valid)
    assert torch.equal(both.x_labelled, s.x_labelled)
    is_unlabelled = torch.ones(200, dtype=torch.bool)
    is_unlabelled[s.labelled_idx] = False
    torch.testing.assert_close(both.x_unlabelled, loaded.train_x[is_unlabelled], rtol=0, atol=0)


BAD_NPZ = [
    ({"x": images(10)}, "no array y"),
    ({"x": images(10), "y": np.zeros(9, int)}, "one label per image"),
    ({"x": images(10), "y": np.full(10, -2)}, "holds the label -2"),
    ({"x": images(10), "y": np.full(10, 0.5)}, "not whole numbers"),
    ({"x": images(10), "y": np.zeros(10, int)}, "fewer than 2 classes"),
    ({"x": images(10) * 2.0, "y": np.arange(10) % 2}, "values outside [0, 1]"),
    ({"x": np.full((10, 4, 4), np.nan), "y": np.arange(10) % 2}, "values outside [0, 1] (or NaN)"),
    ({"x": np.zeros((10, 4, 4, 3), np.uint8), "y": np.arange(10) % 2}, "3 channels: convert to grey"),
    ({"x": np.zeros((10, 7), np.uint8), "y": np.arange(10) % 2}, "not N x H x W grey images"),
    ({"x": np.zeros((10, 4, 4), np.int32), "y": np.arange(10) % 2}, "dtype int32"),
    ({"x": images(10), "y": np.arange(10) % 2, "x_test": images(2)}, "x_test and y_test come together"),
    ({"x": images(10), "y": np.arange(10) % 2, "x_test": images(2, (5, 5)), "y_test": np.zeros(2, int)},
     "x_test images are 5 x 5 but x images are 12 x 9"),
    ({"x": images(10), "y": np.arange(10) % 2, "x_test": images(2), "y_test": np.array([0, -1])},
     "a test label must be known"),
    ({"x": images(10), "y": np.array([0, 1] + [-1] * 8)}, "at least 3 labelled images"),
    ({"x": images(10), "y": np.arange(10) % 3, "classes": np.array(["a", "b"])}, "classes names 2 classes"),
]


@pytest.mark.parametrize("arrays, message", BAD_NPZ)
def test_bad_npz_gives_one_clear_line(tmp_path, arrays, message):
    with pytest.raises(DataError) as err:
        datasets.load_npz(save_npz(tmp_path / "d.npz", **arrays))
    assert message in str(err.value) and len(str(err.value).splitlines()) == 1


def test_npz_that_is_not_one(tmp_path):
    (tmp_path / "d.npz").write_text("not a zip")
    with pytest.raises(DataError, match="not a readable .npz file"):
        datasets.load_npz(tmp_path / "d.npz")
    with pytest.raises(DataError, match="no such file"):
        datasets.load_npz(tmp_path / "missing.npz")


# --- runs --------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, message", [
    (["--dataset", "npz"], "--dataset npz needs --data-file"),
    (["--data-file", "x.npz"], "--data-file is for --dataset npz"),
    (["--dataset", "npz", "--data-file", "x.npz", "--num-labeled", "100"], "uses the labels its file has"),
    (["--dataset", "npz", "--data-file", "/nonexistent.npz"], "no such file"),
])
def test_bad_data_flags_give_one_line(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert run.main(argv) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert not (tmp_path / "runs").exists()


def test_a_short_run_on_a_users_npz_and_every_command(tmp_path, capsys):
    """Three classes of 12 x 9 images, a quarter labelled: train, resume, then the coursework commands."""
    rng = np.random.default_rng(0)
    y_true = np.arange(300) % 3
    x = np.zeros((300, 12, 9), np.uint8)
    for k in range(3):  # class k is bright in rows 4k..4k+3: a classifier can learn it quickly
        x[y_true == k, 4 * k:4 * k + 4] = 200
    x = np.clip(x + rng.integers(0, 40, x.shape), 0, 255).astype(np.uint8)
    y = np.where(np.arange(300) % 4 == 0, y_true, -1)
    names = np.array(["top", "middle", "bottom"])
    path = save_npz(tmp_path / "mine.npz", x=x, y=y, x_test=x[:30], y_test=y_true[:30], classes=names)
    out = tmp_path / "run"
    assert run.main(["--dataset", "npz", "--data-file", str(path), "--out", str(out), *TINY]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["classes"] == ["top", "middle", "bottom"] and config["image_shape"] == [12, 9]
    assert config["num_labeled"] is None
    assert run.main(["--resume", str(out), "--epochs", "2"]) == 0
    rows = (out / "metrics.csv").read_text().splitlines()
    assert len(rows) == 3 and float(rows[-1].split(",")[5]) > 0.5  # test accuracy over chance (1/3)
    for command in (["evaluate"], ["sample"], ["sample", "--digit", "2"], ["analogies"], ["latent"]):
        assert run.main([command[0], str(out), *command[1:]]) == 0, command
    printed = capsys.readouterr().out
    assert "top:" in printed and "bottom:" in printed  # per-class accuracy by name
    with Image.open(out / "figures" / "analogies.png") as image:
        assert min(image.size) > 100
    assert run.main(["sample", str(out), "--digit", "3"]) != 0
    assert "give one of 0-2" in capsys.readouterr().err


@pytest.mark.skipif(not DEBIAN_FASHION.is_dir(), reason=f"Debian's dataset-fashion-mnist not installed at {DEBIAN_FASHION}")
def test_a_short_run_on_fashion_mnist(tmp_path):
    out = tmp_path / "run"
    argv = ["--dataset", "fashion-mnist", "--data-dir", str(tmp_path), "--num-train", "500",
            "--num-labeled", "100", "--out", str(out), *TINY]
    assert run.main(argv) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["dataset"] == "fashion-mnist" and config["classes"][9] == "Ankle boot"
    assert (out / "figures" / "samples.png").is_file()
