"""Shared fixtures: the real MNIST (read once per session) and small slices of it; writes
that stop half-way."""

import os
import time
from pathlib import Path
from typing import Self

import pyro
import pytest
import torch
import torch.nn.functional as F

import checkpoint
import data

# $SSVAE_DATA where set (as .ci/run sets it), so that a copy of the repository elsewhere, a GPU
# machine's say, finds MNIST; else the project's ../shared/data.
REAL_DATA = Path(os.environ.get("SSVAE_DATA") or Path(__file__).parents[2] / "shared" / "data").resolve()
REAL_RAW = REAL_DATA / "MNIST" / "raw"


@pytest.fixture(scope="session")
def mnist() -> data.Dataset:
    if not REAL_RAW.is_dir():
        pytest.skip(f"real MNIST not found at {REAL_RAW}")
    return data.load_mnist(REAL_DATA, download=False)


@pytest.fixture(scope="session")
def small_split(mnist: data.Dataset) -> data.Split:
    """2000 training images, 200 of them labelled; validation and test cut to 1000."""
    s = data.split(mnist, num_labeled=200, seed=0, num_train=2000)
    return data.Split(s.x_labelled, s.y_labelled, s.x_unlabelled, s.x_valid[:1000], s.y_valid[:1000],
                      s.x_test[:1000], s.y_test[:1000], s.labelled_idx)


@pytest.fixture
def tiny_batch() -> tuple[torch.Tensor, torch.Tensor]:
    """Five random binary 784-pixel images and one-hot labels 0-4, the param store cleared
    and torch's RNG seeded, so that the networks a test builds next are the same every time."""
    pyro.clear_param_store()
    torch.manual_seed(0)
    x = torch.bernoulli(torch.rand(5, 784))
    return x, F.one_hot(torch.arange(5), 10).float()


def wait_for(path: Path, seconds: float = 300) -> None:
    """Wait until a subprocess has written `path`; fail saying so, rather than signal a run
    that has not got that far (a loaded machine can take minutes)."""
    deadline = time.time() + seconds
    while not path.exists():
        assert time.time() < deadline, f"{path} was not written within {seconds:g} s"
        time.sleep(0.1)


def files_in(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


class CutOff:
    """A file whose write puts half of the bytes on disk, then raises `error`."""

    def __init__(self, file, error: BaseException) -> None:
        self.file, self.error = file, error

    def write(self, data: bytes) -> None:
        self.file.write(data[:len(data) // 2])
        self.file.flush()
        raise self.error

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.file.close()

    def __getattr__(self, name: str):
        return getattr(self.file, name)


@pytest.fixture
def cut_off_write(monkeypatch):
    """cut_off_write(name, error, after=0, watch=None): the atomic write of a file called
    `name` that follows `after` good ones stops half-way with `error`, as when the disk fills
    up or the process is killed mid-write. Returns a dict whose "files" is, at that moment,
    files_in(watch): what a failed write must leave as it was."""

    def arm(name: str, error: BaseException, after: int = 0, watch: Path | None = None) -> dict:
        seen = {"writes": 0, "files": None}

        def open_cut_off(path, mode="r", *args, **kwargs):
            if Path(path).name == name + ".tmp":
                seen["writes"] += 1
                if seen["writes"] == after + 1:
                    seen["files"] = files_in(watch) if watch else None
                    return CutOff(open(path, mode, *args, **kwargs), error)
            return open(path, mode, *args, **kwargs)

        monkeypatch.setattr(checkpoint, "open", open_cut_off, raising=False)
        return seen

    return arm
