"""Bad files, bad environment variables and failed writes, in every command: one line naming
the file or variable, a non-zero exit, no traceback; a failed write loses nothing and
`--resume` continues from what it left. Same command and seed: the same metrics.csv."""

import csv
import errno
import io
import os
import pickle
import re
import shutil
import subprocess
from pathlib import Path

import pyro
import pytest
import torch
from conftest import REAL_DATA, files_in
from PIL import Image

import benchmark
import checkpoint
import run
from checkpoint import WriteError, atomic_write, load_checkpoint

# fp32 and a strong classification weight: epoch 2 beats epoch 1 on validation, so best.pt
# is written in both epochs, on any CPU.
QUICK = ["--num-train", "1000", "--num-labeled", "100", "--batch-size", "50", "--hidden-dim", "32", "--z-dim", "4",
         "--precision", "fp32", "--lr", "3e-3", "--alpha", "10000", "--data-dir", str(REAL_DATA)]
TIMING = {"seconds", "eval_seconds"}  # wall-clock columns of metrics.csv
COLUMNS = ["epoch", "train_elbo", "train_class_loss", "valid_elbo", "valid_accuracy", "test_accuracy",
           "skipped_steps", "seconds", "eval_seconds"]
ENOSPC = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def one_line_error(capsys, prog: str = "run.py") -> str:
    """The error line, last on stderr after any progress bars; no traceback, no second line."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and [line for line in lines if "error" in line.lower()] == lines[-1:], err
    assert lines[-1].startswith(f"{prog}: error: "), err
    return lines[-1]


def metrics_without_timing(folder: Path) -> list[dict[str, str]]:
    with open(folder / "metrics.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == COLUMNS  # a new column must be sorted into timing or not here
        return [{k: v for k, v in row.items() if k not in TIMING} for row in reader]


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """A 2-epoch run that nothing interrupted."""
    out = tmp_path_factory.mktemp("straight") / "run"
    assert run.main([*QUICK, "--epochs", "2", "--out", str(out)]) == 0
    return out


# -- determinism -------------------------------------------------------------------------------
def test_same_command_and_seed_give_the_same_metrics_but_wall_clock(straight, tmp_path):
    assert run.main([*QUICK, "--epochs", "2", "--out", str(tmp_path / "again")]) == 0
    assert metrics_without_timing(tmp_path / "again") == metrics_without_timing(straight)


# -- files that are not checkpoints ------------------------------------------------------------
class RunsCode:
    """Unpickling this calls Path.touch(marker): the code a foreign checkpoint could run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def saved(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def with_config(state: dict, **changes) -> bytes:
    return saved({**state, "config": {**state["config"], **changes}})


def flip_middle_byte(good: bytes) -> bytes:
    middle = len(good) // 2
    return good[:middle] + bytes([good[middle] ^ 0xFF]) + good[middle + 1:]


# (case, damaged file from the good checkpoint's bytes and state and a marker path, the line says)
NOT_CHECKPOINTS = [
    ("text file", lambda good, state, marker: b"epoch,loss\n1,2.5\n", "is not a checkpoint"),
    ("empty file", lambda good, state, marker: b"", "is empty"),
    ("cut off", lambda good, state, marker: good[:len(good) // 2], "is damaged: cut off"),
    ("bit flipped", lambda good, state, marker: flip_middle_byte(good), "fails its checksum"),
    ("runs code", lambda good, state, marker: saved({**state, "x": RunsCode(marker)}), "loading was refused"),
    ("plain pickle that runs code", lambda good, state, marker: pickle.dumps(RunsCode(marker)), "is not a checkpoint"),
    ("numpy RNG state, as before weights_only", lambda good, state, marker: saved({**state, "rng": pyro.util.get_rng_state()}),
     "loading was refused"),
    ("a list", lambda good, state, marker: saved([1, 2]), "holds a list"),
    ("no guide", lambda good, state, marker: saved({k: v for k, v in state.items() if k != "guide"}), "no 'guide' entry"),
    ("model not a dict", lambda good, state, marker: saved({**state, "model": [1]}), "a list as its 'model' entry"),
    ("config field of the wrong type", lambda good, state, marker: with_config(state, z_dim="8"),
     "config field z_dim is '8', not int"),
    ("config field a bool", lambda good, state, marker: with_config(state, hidden_dim=True), "hidden_dim is True"),
    ("config size not positive", lambda good, state, marker: with_config(state, hidden_dim=0), "not a positive int"),
    ("unknown guide", lambda good, state, marker: with_config(state, guide="nope"), "guide 'nope'"),
    ("networks of another size", lambda good, state, marker: with_config(state, z_dim=7), "do not match|does not fit"),
]


@pytest.mark.parametrize("command", ["resume", "sample"])
@pytest.mark.parametrize("make,message", [case[1:] for case in NOT_CHECKPOINTS], ids=[c[0] for c in NOT_CHECKPOINTS])
def test_a_bad_checkpoint_is_named_in_one_line(command, make, message, straight, tmp_path, capsys):
    good = (straight / "checkpoint.pt").read_bytes()
    marker = tmp_path / "code-ran"
    folder = tmp_path / "copied"
    folder.mkdir()
    bad = folder / "checkpoint.pt"
    bad.write_bytes(make(good, load_checkpoint(straight / "checkpoint.pt"), marker))
    argv = ["--resume", str(folder)] if command == "resume" else ["sample", str(bad)]
    assert run.main(argv) == 1
    err = one_line_error(capsys)
    assert str(bad) in err and "use an intact copy of it, or train the run again" in err
    assert any(fragment in err for fragment in message.split("|")), err
    assert not marker.exists()
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint.pt"]  # nothing written


def test_a_copied_run_resumes_with_its_data_elsewhere(straight, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("data.MNIST.mirrors", [])  # never reach for the network
    copy = tmp_path / "copy"
    shutil.copytree(straight, copy)
    state = load_checkpoint(copy / "checkpoint.pt", entries=checkpoint.RUN_STATE)
    (copy / "checkpoint.pt").write_bytes(with_config(state, data_dir=str(tmp_path / "gone")))
    assert run.main(["--resume", str(copy), "--epochs", "3"]) == 1
    assert "MNIST files missing" in one_line_error(capsys)
    assert run.main(["--resume", str(copy), "--epochs", "3", "--data-dir", str(REAL_DATA)]) == 0


# -- environment variables ---------------------------------------------------------------------
def unreadable_folder(tmp_path: Path) -> str:
    if os.geteuid() == 0:
        pytest.skip("root reads every folder")
    folder = tmp_path / "locked"
    folder.mkdir(mode=0)
    return str(folder)


# (variable, its value from tmp_path, the line says, exit code)
BAD_ENVIRONMENT = [
    ("SSVAE_THREADS", lambda tmp: "abc", "SSVAE_THREADS='abc' is not a whole number >= 1", 2),
    ("SSVAE_THREADS", lambda tmp: "0", "SSVAE_THREADS='0' is not a whole number >= 1", 2),
    ("SSVAE_THREADS", lambda tmp: "-1", "SSVAE_THREADS='-1'", 2),
    ("SSVAE_THREADS", lambda tmp: "1.5", "SSVAE_THREADS='1.5'", 2),
    ("SSVAE_DATA", lambda tmp: str(tmp / "typo"), "SSVAE_DATA=", 1),
    ("SSVAE_DATA", lambda tmp: str(REAL_DATA / "MNIST" / "raw" / "t10k-labels-idx1-ubyte.gz"), "is a file, not a folder",
     1),
    ("SSVAE_DATA", unreadable_folder, "cannot be read (permission denied)", 1),
]


@pytest.mark.parametrize("variable,value,message,code", BAD_ENVIRONMENT)
def test_a_bad_environment_variable_is_named_in_one_line(variable, value, message, code, tmp_path, capsys,
                                                         monkeypatch):
    monkeypatch.setattr("data.MNIST.mirrors", [])
    monkeypatch.setenv(variable, value(tmp_path))
    monkeypatch.chdir(tmp_path)
    argv = [a for a in QUICK if a not in ("--data-dir", str(REAL_DATA))] + ["--epochs", "1"]
    before = torch.get_num_threads()
    assert run.main(argv) == code
    err = one_line_error(capsys)
    assert message in err and variable in err
    assert not (tmp_path / "runs").exists() and torch.get_num_threads() == before


# -- writes that fail part-way -----------------------------------------------------------------
# (file, good writes of it before the one that fails): every file a run writes.
FAILED_WRITES = [
    ("config.json", 0),
    ("checkpoint.pt", 0),  # in epoch 1: there is no checkpoint yet
    ("checkpoint.pt", 1),
    ("best.pt", 1),
    ("metrics.csv", 1),
    ("losses.png", 0),  # the curves are drawn every 5 epochs and at the last
    ("accuracy.png", 0),
    ("epoch_002.png", 0),
    ("samples.png", 0),
    ("summary.json", 0),
]


@pytest.mark.parametrize("name,after", FAILED_WRITES)
def test_a_full_disk_loses_nothing_and_resume_finishes_the_run(name, after, straight, tmp_path, capsys,
                                                               cut_off_write, monkeypatch):
    out = tmp_path / "run"
    seen = cut_off_write(name, ENOSPC, after, watch=tmp_path)
    assert run.main([*QUICK, "--epochs", "2", "--out", str(out)]) == 1
    err = one_line_error(capsys)
    failed = next(p / name for p in [out, out / "figures", out / "figures" / "samples"] if str(p / name) in err)
    assert re.search(rf"no space left on device writing {re.escape(str(failed))} "
                     rf"\(needed about [\d.]+ (bytes|kB|MB) in {re.escape(str(failed.parent))}\)", err), err
    assert files_in(tmp_path) == seen["files"]  # nothing lost, nothing half-written, no temporary file
    monkeypatch.undo()
    if seen["files"].get("run/checkpoint.pt"):
        assert err.endswith(f"the last good checkpoint is kept: free space, then python run.py --resume {out}")
        load_checkpoint(out / "checkpoint.pt", entries=checkpoint.RUN_STATE)
        assert run.main(["--resume", str(out)]) == 0
    else:
        assert err.endswith("free space, then run the same command with --overwrite")
        assert run.main([*QUICK, "--epochs", "2", "--out", str(out), "--overwrite"]) == 0
    assert metrics_without_timing(out) == metrics_without_timing(straight)


@pytest.mark.parametrize("error,reason,remedy", [
    (ENOSPC, "no space left on device", "free space"),
    (OSError(errno.EDQUOT, os.strerror(errno.EDQUOT)), "disk quota exceeded", "free space"),
    (OSError(errno.EACCES, os.strerror(errno.EACCES)), "permission denied", "make {folder} writable"),
    (OSError(errno.EROFS, os.strerror(errno.EROFS)), "read-only file system", "make {folder} writable"),
    (OSError(errno.EIO, os.strerror(errno.EIO)), "input/output error", "check the disk"),
])
def test_a_failed_write_says_why_how_much_and_where(error, reason, remedy, tmp_path, cut_off_write):
    path = tmp_path / "metrics.csv"
    path.write_text("the last good one")
    cut_off_write("metrics.csv", error)
    with pytest.raises(WriteError) as failed:
        atomic_write(b"x" * 2500, path)
    assert str(failed.value) == f"{reason} writing {path} (needed about 2.5 kB in {tmp_path})"
    assert failed.value.remedy == remedy.format(folder=tmp_path)
    assert path.read_text() == "the last good one" and [p.name for p in tmp_path.iterdir()] == ["metrics.csv"]


@pytest.fixture
def tiny_disk(tmp_path):
    """A 16 MB tmpfs: a disk that really fills up. Needs root and a kernel that lets us mount."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)], capture_output=True,
                             check=False) if os.geteuid() == 0 and shutil.which("mount") else None
    if mounted is None or mounted.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN); the patched writes above stand in")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def test_a_really_full_disk_keeps_the_checkpoint_and_resume_finishes(tiny_disk, straight, capsys):
    out = tiny_disk / "run"
    assert run.main([*QUICK, "--epochs", "1", "--out", str(out)]) == 0
    before = files_in(out)
    filler = tiny_disk / "filler"
    filler.write_bytes(b"\0" * (shutil.disk_usage(tiny_disk).free - 50_000))  # room for a figure, not a checkpoint
    capsys.readouterr()
    assert run.main(["--resume", str(out), "--epochs", "2"]) == 1
    err = one_line_error(capsys)
    assert "no space left on device writing" in err and f"free space, then python run.py --resume {out}" in err
    assert not list(out.rglob("*.tmp"))
    assert {k: v for k, v in files_in(out).items() if k.endswith(".pt")} == \
        {k: v for k, v in before.items() if k.endswith(".pt")}
    filler.unlink()
    assert run.main(["--resume", str(out), "--epochs", "2"]) == 0
    assert metrics_without_timing(out) == metrics_without_timing(straight)


# -- the other commands ------------------------------------------------------------------------
def test_a_full_disk_in_an_explore_command(straight, tmp_path, capsys, cut_off_write):
    copy = tmp_path / "copy"
    shutil.copytree(straight, copy)
    seen = cut_off_write("samples_all_digits.png", ENOSPC, watch=copy)
    assert run.main(["sample", str(copy)]) == 1
    err = one_line_error(capsys)
    assert f"writing {copy / 'figures' / 'samples_all_digits.png'}" in err
    assert err.endswith("free space, then run the command again")
    assert files_in(copy) == seen["files"]


@pytest.mark.parametrize("damage,message", [
    (lambda png: png[:len(png) // 2], "is not a readable PNG"),
    (lambda png: b"not a png", "is not a readable PNG"),
])
def test_a_damaged_figure_in_animate(damage, message, straight, tmp_path, capsys):
    copy = tmp_path / "copy"
    shutil.copytree(straight, copy)
    frame = copy / "figures" / "samples" / "epoch_002.png"
    frame.write_bytes(damage(frame.read_bytes()))
    assert run.main(["animate", str(copy)]) == 1
    err = one_line_error(capsys)
    assert f"{frame} {message}" in err and "delete it" in err
    frame.unlink()
    assert run.main(["animate", str(copy)]) == 0
    with Image.open(copy / "figures" / "samples.gif") as gif:
        assert gif.n_frames == 1


COMPARE = ["baseline", "--num-train", "1000", "--num-labeled", "100", "--epochs", "1", "--seeds", "1",
           "--batch-size", "100", "--hidden-dim", "16", "--z-dim", "4", "--data-dir", str(REAL_DATA)]


@pytest.fixture(scope="module")
def comparison(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("compare") / "cmp"
    assert run.main(["compare", *COMPARE, "--out", str(out)]) == 0
    return out


def rewrite(path: Path, change) -> None:
    path.write_text(change(path.read_text()))


# (file of the comparison, how it was damaged, the line says)
DAMAGED_COMPARISONS = [
    ("compare.json", lambda text: text[:10], "choose another --out"),
    ("baseline_none/seed-0/evaluation.json", lambda text: "{", "delete {out}/baseline_none/seed-0"),
    ("baseline_none/seed-0/evaluation.json", lambda text: "[]", "holds no JSON object"),
    ("baseline_none/seed-0/evaluation.json", lambda text: text.replace('"seed": 0', '"seed": 4'), "at seed 4"),
    ("baseline_none/seed-0/evaluation.json", lambda text: text.replace('"test_accuracy": ', '"test_accuracy": "high", "x": '),
     "test_accuracy is 'high', not a number"),
    ("baseline_none/seed-0/metrics.csv", lambda text: text.replace(",", ";"), "delete {out}/baseline_none/seed-0"),
    ("baseline_none/seed-0/metrics.csv", lambda text: text + "2,oops\n", "delete {out}/baseline_none/seed-0"),
    ("baseline_none/seed-0/metrics.csv", lambda text: text.splitlines()[0] + "\n", "no rows"),
]


@pytest.mark.parametrize("name,change,message", DAMAGED_COMPARISONS)
def test_a_damaged_comparison_folder_is_named_in_one_line(name, change, message, comparison, tmp_path, capsys):
    out = tmp_path / "cmp"
    shutil.copytree(comparison, out)
    rewrite(out / name, change)
    assert run.main(["compare", *COMPARE, "--out", str(out)]) != 0
    err = one_line_error(capsys)
    assert str(out / name) in err and message.format(out=out) in err


def test_a_full_disk_in_a_comparison_keeps_finished_sub_runs(comparison, tmp_path, capsys, cut_off_write,
                                                            monkeypatch):
    out = tmp_path / "cmp"
    shutil.copytree(comparison, out)
    finished = (out / "baseline_none" / "seed-0" / "evaluation.json").stat().st_mtime_ns
    seen = cut_off_write("table.md", ENOSPC, watch=out)
    assert run.main(["compare", *COMPARE, "--out", str(out)]) == 1
    err = one_line_error(capsys)
    assert f"writing {out / 'table.md'}" in err
    assert err.endswith(f"finished sub-runs are kept: free space, then rerun the same command to continue {out}")
    assert files_in(out) == seen["files"]
    monkeypatch.undo()
    assert run.main(["compare", *COMPARE, "--out", str(out)]) == 0
    assert (out / "baseline_none" / "seed-0" / "evaluation.json").stat().st_mtime_ns == finished


@pytest.mark.parametrize("argv,message,code", [
    (["speed", "--steps", "0"], "must be a positive int", 2),
    (["accuracy", "--settings", "105", "--epochs", "1", "--data-dir", str(REAL_DATA)], "nearest valid: 100 or 110", 1),
    (["speed", "--data-dir", "{tmp}/nothing"], "MNIST files missing", 1),
])
def test_benchmark_errors_are_one_line(argv, message, code, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("data.MNIST.mirrors", [])
    monkeypatch.chdir(tmp_path)
    assert benchmark.main([a.format(tmp=tmp_path) for a in argv]) == code
    assert message in one_line_error(capsys, "benchmark.py")
