"""Shared fixtures: the real MNIST (read once per session) and small slices of it."""

from pathlib import Path

import pytest

import data

REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
REAL_RAW = REAL_DATA / "MNIST" / "raw"


@pytest.fixture(scope="session")
def mnist() -> data.MNIST:
    if not REAL_RAW.is_dir():
        pytest.skip(f"real MNIST not found at {REAL_RAW}")
    return data.load_mnist(REAL_DATA, download=False)


@pytest.fixture(scope="session")
def small_split(mnist: data.MNIST) -> data.Split:
    """2000 training images, 200 of them labelled; validation and test cut to 1000."""
    s = data.split(mnist, num_labeled=200, seed=0, num_train=2000)
    return data.Split(s.x_labelled, s.y_labelled, s.x_unlabelled, s.x_valid[:1000], s.y_valid[:1000],
                      s.x_test[:1000], s.y_test[:1000], s.labelled_idx)
