"""The command line: every bad input gives one clear line and a non-zero exit, and writes nothing."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REAL_DATA, wait_for

import compare
import run
from checkpoint import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["--num-train", "1000", "--num-labeled", "100", "--batch-size", "50", "--hidden-dim", "32",
         "--z-dim", "4", "--data-dir", str(REAL_DATA)]

BAD_FLAGS = [
    (["--labeled-fraction", "0"], "--labeled-fraction: '0' must be a positive float"),
    (["--labeled-fraction", "1.5"], "must be in (0, 1]"),
    (["--labeled-fraction", "nan"], "must be a positive float"),
    (["--labeled-fraction", "abc"], "'abc' is not a float"),
    (["--num-labeled", "-10"], "must be a positive int"),
    (["--num-labeled", "ten"], "'ten' is not a int"),
    (["--num-labeled", "105"], "nearest valid: 100 or 110"),
    (["--num-labeled", "60000"], "must be a multiple of 10 between 10 and"),
    (["--num-labeled", "100", "--labeled-fraction", "0.1"], "not allowed with argument"),
    (["--guide", "nope"], "invalid choice: 'nope' (choose from"),
    (["--elbo", "nope"], "invalid choice: 'nope'"),
    (["--epochs", "0"], "must be a positive int"),
    (["--batch-size", "5000", "--num-train", "1000", "--num-labeled", "100"], "larger than the 1000 training images"),
    (["--lr", "-1"], "must be a positive float"),
    (["--beta1", "1"], "--beta1 1.0 must be in [0, 1)"),
    (["--alpha", "inf"], "--alpha inf must be a finite number >= 0"),
    (["--labeled-batch", "200"], "--labeled-batch 200 must be below --batch-size 200"),
    (["--labeled-batch", "0"], "must be a positive int"),
    (["--clip-norm", "-5"], "must be a positive float"),
    (["--clip-value", "0"], "must be a positive float"),
    (["--weight-prior", "-1"], "must be a positive float"),
    (["--init-std", "0"], "must be a positive float"),
    (["--classifier-dropout", "1"], "--classifier-dropout: '1' must be in [0, 1)"),
    (["--hidden-layers", "0"], "--hidden-layers: '0' must be a positive int"),
    (["--classifier-layers", "0"], "--classifier-layers: '0' must be a positive int"),
    (["--resume", "/nonexistent/run"], "no checkpoint.pt there"),
    (["--resume", "/nonexistent/run", "--lr", "0.1"], "drop --lr"),
    (["--data-dir", "/nonexistent/data", "--num-labeled", "100"], "MNIST"),
    (["--bogus"], "unrecognized arguments: --bogus"),
]


@pytest.mark.parametrize("argv,message", BAD_FLAGS)
def test_bad_flags_give_one_clear_line(argv, message, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SSVAE_DATA", str(REAL_DATA))
    monkeypatch.setattr("data.MNIST.mirrors", [])  # never reach for the network
    assert run.main(argv) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("run.py: error: ")
    assert message in err
    assert not (tmp_path / "runs").exists()


def test_unlabeled_valid_trains_on_the_validation_images_too(tmp_path, capsys):
    out = tmp_path / "run"
    assert run.main([*QUICK, "--unlabeled-valid", "--epochs", "1", "--batch-size", "500", "--out", str(out)]) == 0
    assert "100 labelled, 10900 unlabelled" in capsys.readouterr().out  # 900 of the 1000, and 10000 validating
    assert json.loads((out / "config.json").read_text())["unlabeled_valid"] is True
    settings = run.compare_settings(run.compare_parser().parse_args(["m2", *QUICK, "--unlabeled-valid"]))
    assert len(compare.load_split(settings, seed=0).x_unlabelled) == 10900
    assert settings.config(compare.parse_scheme("m2"), seed=0).unlabeled_valid


def test_existing_out_needs_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    assert run.main([*QUICK, "--epochs", "1", "--out", str(out)]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "precious"


def test_unwritable_out(tmp_path, capsys):
    if os.geteuid() == 0:
        target = Path("/proc/ssvae-run")  # not even root can create folders in /proc
    else:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        target = locked / "run"
    assert run.main([*QUICK, "--epochs", "1", "--out", str(target)]) == 2
    assert "cannot be written" in capsys.readouterr().err


def test_a_closed_output_pipe_saves_the_run(tmp_path):
    """`python run.py | head -3`: the run stops when head goes, saves, and says how to go on."""
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "run.py"), *QUICK, "--epochs", "50", "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = [proc.stdout.readline() for _ in range(3)]  # run folder, device, the first epoch: a line each
    assert lines[2].startswith("epoch   1"), lines
    proc.stdout.close()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGPIPE
    message = err.strip().splitlines()[-1]
    assert "reader of its output went away" in message and f"--resume {out}" in message
    assert "Traceback" not in err and "Exception ignored" not in err
    saved = load_checkpoint(out / "checkpoint.pt")["epoch"]
    assert 2 <= saved < 50 and (out / "metrics.csv").read_text().count("\n") == saved  # header and each epoch


def test_sigint_saves_and_resume_finishes(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, str(ROOT / "run.py"), *QUICK, "--epochs", "50", "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(out / "metrics.csv")
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGINT
    assert "stopped by SIGINT" in err and f"--resume {out}" in err
    assert (out / "checkpoint.pt").is_file() and (out / "figures" / "losses.png").is_file()
    stopped_at = load_checkpoint(out / "checkpoint.pt")["epoch"]
    done = subprocess.run([sys.executable, str(ROOT / "run.py"), "--resume", str(out), "--epochs", str(stopped_at + 1)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert (out / "metrics.csv").read_text().count("\n") == stopped_at + 2  # header and every epoch
