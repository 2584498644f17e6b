"""Saving and loading a run's files safely.

Every file a run writes (checkpoints, CSVs, JSON, figures) is built in memory, written to
PATH.tmp, flushed to disk and renamed over PATH: a kill, a full disk or an I/O error at
any moment leaves either the old file or the new one, never half of one. A write that
fails removes its temporary file and raises WriteError, which says how much space the
file needed and where.

Checkpoints are read with torch.load(weights_only=True), which builds tensors and plain
containers only and refuses anything else without running it. So the run state holds
nothing else: the RNG states and Pyro's own parameters are kept as tensors, numbers and
tuples (rng_state, param_store_state).
"""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import os
import pickle
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyro
import torch
from pyro.distributions import constraints

ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes a zip archive
FIX = "use an intact copy of it, or train the run again with python run.py"
# What torch and Pyro raise when a file or a saved state is not what they expect to load.
MISFIT = (RuntimeError, KeyError, ValueError, TypeError, AttributeError, IndexError, EOFError)

# What a checkpoint must hold, and as what: best.pt holds the networks, checkpoint.pt the
# whole run state that --resume continues from.
NETWORKS: dict[str, type] = {"config": dict, "model": dict, "guide": dict}
RUN_STATE: dict[str, type] = {**NETWORKS, "optimizer": dict, "rng": dict, "param_store": dict, "epoch": int,
                              "step_in_epoch": int, "global_step": int, "running": dict, "rows": list,
                              "best": dict}


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message names the file, what is wrong and what to do."""


class WriteError(Exception):
    """A file could not be written; whatever was at its path before is untouched.

    `remedy` is what the user can do about the cause ("free space", ...); the caller says
    what to run then.
    """

    def __init__(self, path: Path, needed: int, error: OSError) -> None:
        reason = error.strerror or str(error)
        super().__init__(f"{reason[:1].lower()}{reason[1:]} writing {path} "
                         f"(needed about {file_size(needed)} in {path.parent})")
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            self.remedy = "free space"
        elif error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            self.remedy = f"make {path.parent} writable"
        else:
            self.remedy = "check the disk"


def file_size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


# -- writing ---------------------------------------------------------------------------------
def atomic_write(data: bytes, path: Path) -> Path:
    """Write `data` to `path` atomically (module docstring), making missing folders."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            # On disk before the rename, so that a crash cannot leave PATH empty either.
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise WriteError(path, len(data), e) from None
    return path


def atomic_write_text(text: str, path: Path) -> Path:
    return atomic_write(text.encode(), path)


def atomic_write_csv(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """One row per mapping, the first one's keys as the header."""
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    return atomic_write_text(buffer.getvalue(), path)


def atomic_save(obj: Any, path: Path) -> Path:
    """torch.save, atomically."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return atomic_write(buffer.getvalue(), path)


# -- the run state in forms torch.load(weights_only=True) accepts ----------------------------
def rng_state() -> dict[str, Any]:
    """pyro.util.get_rng_state() (torch, python, numpy), with numpy's key array as a tensor."""
    state = pyro.util.get_rng_state()
    name, keys, *rest = state["numpy"]
    # A GPU draws from generators of its own; a run resumed on a machine without one starts
    # those afresh (it draws on the CPU then anyway).
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
    return {**state, "numpy": (name, torch.from_numpy(keys.astype(np.int64)), *rest), "cuda": cuda}


def set_rng_state(state: dict[str, Any]) -> None:
    name, keys, *rest = state["numpy"]
    pyro.util.set_rng_state({**state, "numpy": (name, keys.numpy().astype(np.uint32), *rest)})
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def param_store_state() -> dict[str, torch.Tensor]:
    """Pyro's own parameters, without the networks' ("module$$$param"; their state dicts
    hold those): TraceGraph_ELBO's decaying-average baselines. They are unconstrained, so
    their values alone restore them."""
    params = pyro.get_param_store().get_state()["params"]
    return {name: value for name, value in params.items() if "$$$" not in name}


def set_param_store_state(params: dict[str, torch.Tensor]) -> None:
    pyro.get_param_store().set_state({"params": params, "constraints": {name: constraints.real for name in params}})


# -- reading ---------------------------------------------------------------------------------
def load_checkpoint(path: Path, map_location: Any = "cpu", entries: Mapping[str, type] = NETWORKS) -> dict[str, Any]:
    """The dict saved at `path`, holding at least `entries` with their types.

    Loaded with weights_only=True: a file holding anything but tensors and plain values is
    refused, and nothing in it runs. Every failure, a damaged file included (the zip
    archive's checksums are verified), raises CheckpointError.
    """
    path = Path(path)
    try:
        problem = archive_problem(path)
        if problem is None:
            with warnings.catch_warnings():  # torch's warnings would add lines to the one-line error
                warnings.simplefilter("ignore")
                state = torch.load(path, map_location=map_location, weights_only=True)
    except OSError as e:
        problem = f"cannot be read ({e.strerror or e})"
    except pickle.UnpicklingError as e:
        # The weights-only unpickler names the class or function it refused to build as a "GLOBAL".
        problem = (("holds Python objects that no ssvae checkpoint holds, so loading was refused and none of "
                    "it ran (a file of another program, or a checkpoint.pt from before ssvae stored only tensors)")
                   if "global" in str(e).lower() else "is damaged (its pickle cannot be decoded)")
    except MISFIT as e:  # e.g. a zip archive that torch.save did not write
        problem = f"is not a checkpoint or is damaged ({first_line(e)})"
    if problem is None and not isinstance(state, dict):
        problem = f"holds a {type(state).__name__}, not a checkpoint's dict"
    for key, kind in entries.items():
        if problem is None and not isinstance(state.get(key), kind):
            found = "no" if key not in state else f"a {type(state[key]).__name__} as its"
            problem = f"is not a checkpoint of this version of ssvae ({found} {key!r} entry, expected a {kind.__name__})"
    if problem is not None:
        raise CheckpointError(f"{path} {problem}; {FIX}")
    return state


def archive_problem(path: Path) -> str | None:
    """What makes `path` no intact zip archive, the form torch.save writes; None if it is one."""
    with open(path, "rb") as f:
        head = f.read(len(ZIP_MAGIC))
    if not head:
        return "is empty (a copy or a save cut off)"
    if head != ZIP_MAGIC:
        return "is not a checkpoint (torch.save writes a zip archive; this is not one)"
    if not zipfile.is_zipfile(path):
        return "is damaged: cut off or overwritten (its zip directory is missing)"
    with zipfile.ZipFile(path) as archive:
        bad = archive.testzip()
    return None if bad is None else f"is damaged: {bad} fails its checksum"


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
