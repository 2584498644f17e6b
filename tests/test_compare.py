"""`run.py compare`: scheme parsing, the interval arithmetic, and a tiny comparison end to end,
one sub-run after another, in worker processes and as Ray tasks."""

import csv
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from unittest import mock

import pytest
import torch
from conftest import REAL_DATA, wait_for

import compare
import hardware
import run
from train import Config, Trainer

ROOT = Path(__file__).resolve().parents[1]

TINY = ["--num-train", "1000", "--num-labeled", "100", "--epochs", "1", "--seeds", "2", "--batch-size", "100",
        "--hidden-dim", "16", "--z-dim", "4", "--log-px-samples", "5", "--log-px-images", "50",
        "--grad-repeats", "4", "--precision", "fp32", "--data-dir", str(REAL_DATA)]
# fp32: auto times products at start-up, and at these tiny shapes, on a busy machine, two runs
# that are compared for equality could resolve it differently.


def test_schemes_default_to_the_guides_first_elbo_and_take_typed_options():
    assert compare.parse_scheme("relaxed") == compare.Scheme("relaxed", "trace")
    assert compare.parse_scheme("baseline").name == "baseline:none"
    scheme = compare.parse_scheme("m2:iwae:num-particles=5,alpha=0")
    assert scheme.options == (("num_particles", 5), ("alpha", 0.0))
    assert scheme.name == "m2:iwae:num_particles=5,alpha=0.0"
    assert scheme.folder == "m2_iwae_num_particles-5_alpha-0.0"


@pytest.mark.parametrize("text,message", [
    ("nope", "GUIDE one of"),
    ("relaxed:enum", "guide relaxed works with trace, not enum"),
    ("m2:enum:seed=3", "FIELD one of num_particles"),
    ("m2:iwae:num_particles=two", "num_particles needs a int"),
])
def test_bad_schemes_give_one_clear_line(text, message, capsys, tmp_path):
    assert run.main(["compare", text, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
    assert not (tmp_path / "out").exists()


def test_a_missing_device_fails_once_in_one_line_before_any_folder(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert run.main(["compare", "m2", "baseline", *TINY, "--device", "cuda", "--out", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--device cuda" in err  # not one failure per sub-run and retry
    assert not (tmp_path / "out").exists()


def test_a_scheme_may_set_its_network_sizes_and_older_folders_continue(tmp_path):
    settings = compare.Settings(z_dim=4, hidden_dim=16)
    config = settings.config(compare.parse_scheme("sdgm::hidden_layers=2,z_dim=8"), seed=1)
    assert (config.hidden_layers, config.z_dim, config.hidden_dim, config.seed) == (2, 8, 16, 1)
    assert settings.config(compare.parse_scheme("sdgm"), 0).hidden_layers == Config.hidden_layers == 2
    out = tmp_path / "out"
    compare.prepare(out, replace(settings, hidden_layers=1))
    held = json.loads((out / "compare.json").read_text())
    del held["hidden_layers"]  # as written before the setting existed, when every run had one layer
    (out / "compare.json").write_text(json.dumps(held))
    compare.prepare(out, replace(settings, hidden_layers=1))
    with pytest.raises(compare.CompareError, match="other settings"):
        compare.prepare(out, settings)


def test_a_schemes_learning_rate_overrides_the_comparisons_and_older_folders_keep_theirs(tmp_path):
    settings = compare.Settings()
    assert settings.config(compare.parse_scheme("m2"), 0).lr is None  # the Trainer resolves it by model
    assert settings.config(compare.parse_scheme("m2::lr=0.004"), 0).lr == 0.004
    assert replace(settings, lr=5e-4).config(compare.parse_scheme("sdgm"), 0).lr == 5e-4
    assert replace(settings, lr=5e-4).config(compare.parse_scheme("sdgm::lr=0.004"), 0).lr == 0.004
    out = tmp_path / "out"
    compare.prepare(out, settings)
    held = json.loads((out / "compare.json").read_text())
    del held["lr"]  # as written before the setting existed, when every scheme trained at 1e-3
    (out / "compare.json").write_text(json.dumps(held))
    with pytest.raises(compare.CompareError, match="other settings"):
        compare.prepare(out, settings)  # its finished m2 runs trained at 1e-3, not at today's m2 rate
    compare.prepare(out, replace(settings, lr=1e-3))


def test_a_comparison_may_be_given_more_seeds_later(tmp_path):
    out = tmp_path / "out"
    compare.prepare(out, compare.Settings(seeds=1, z_dim=4))
    compare.prepare(out, compare.Settings(seeds=3, z_dim=4))
    assert json.loads((out / "compare.json").read_text())["seeds"] == 3
    compare.prepare(out, compare.Settings(seeds=2, z_dim=4))  # a subset of the seeds it holds
    assert json.loads((out / "compare.json").read_text())["seeds"] == 3
    with pytest.raises(compare.CompareError, match="other settings"):
        compare.prepare(out, compare.Settings(seeds=3, z_dim=8))


def test_the_table_says_when_a_scheme_overrides_the_shared_sizes(tmp_path):
    settings = compare.Settings(seeds=1, z_dim=50, hidden_layers=1)
    row = {key: 0.5 for key, *_ in compare.metric_columns(settings)}
    shared = "z 50, hidden 1 x 500"
    plain = compare.write_tables({"m2:enum": [row]}, settings, tmp_path, threads=1, workers=1).read_text()
    assert f"{shared}, precision" in plain
    sized = {"m2:enum": [row], "sdgm:enum:hidden_layers=2,z_dim=100": [row]}
    table = compare.write_tables(sized, settings, tmp_path, threads=1, workers=1).read_text()
    assert f"{shared} where a scheme's options do not set them, precision" in table


def test_interval_is_the_t_interval_over_finite_values():
    mean, half, n = compare.interval([1.0, 2.0, 3.0, math.nan])
    assert (mean, n) == (2.0, 3) and half == pytest.approx(4.303 / math.sqrt(3))
    assert compare.t975(30) == pytest.approx(2.042, abs=2e-3)
    assert compare.cell([0.5, math.nan], 100.0, ".1f") == "50.0 (1/2 seeds)"
    assert compare.cell([math.nan], 1.0, ".1f") == "—"


def test_progress_counts_the_epochs_of_running_sub_runs_and_projects_the_time_left(tmp_path, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(compare.time, "monotonic", lambda: clock[0])
    settings = compare.Settings(epochs=10)
    jobs = [compare.Job(compare.Scheme("m2", "enum"), seed, tmp_path / f"seed-{seed}", settings) for seed in range(3)]

    def epochs(job: compare.Job, n: int) -> None:
        job.folder.mkdir(exist_ok=True)
        (job.folder / "metrics.csv").write_text("epoch,seconds\n" + "".join(f"{e},1\n" for e in range(1, n + 1)))

    epochs(jobs[1], 4)  # a stopped sub-run, continued: its first 4 epochs took no time of this invocation
    progress = compare.Progress(total=3, done=0, slots=2)
    progress.start(jobs[0]), progress.start(jobs[1])
    progress.show(left=1, failed=0)
    assert progress.bar.postfix == "2 running (epochs 0, 4 of 10), 1 left, about ? to go"
    clock[0] += 60.0
    epochs(jobs[0], 2), epochs(jobs[1], 6)  # 30 s per epoch for both
    # left: 8 and 4 epochs at 30 s, then one sub-run of 10 epochs at the mean projection, over two slots
    assert progress.seconds_left(1, {jobs[0]: 2, jobs[1]: 6}) == pytest.approx(8 * 30 + 4 * 30 + 300)
    progress.tick(left=1, failed=0)  # the line is 60 s old: drawn again
    assert progress.bar.postfix == "2 running (epochs 2, 6 of 10), 1 left, about 05:30 to go"
    clock[0] += compare.Progress.REFRESH / 2
    epochs(jobs[0], 3)
    progress.tick(left=1, failed=0)  # too soon: unchanged
    assert progress.bar.postfix.startswith("2 running (epochs 2, 6 of 10)")
    clock[0] += compare.Progress.REFRESH / 2
    progress.tick(left=1, failed=0)
    assert progress.bar.postfix.startswith("2 running (epochs 3, 6 of 10)")
    took = 60 + compare.Progress.REFRESH
    progress.end(jobs[1], finished=True)  # what a sub-run still to start now takes
    progress.start(jobs[2])  # no epoch yet: the rest of the measured duration
    assert progress.seconds_left(0, {jobs[0]: 3, jobs[2]: 0}) == pytest.approx(7 * took / 3 + took)
    progress.bar.close()


def test_progress_names_no_epochs_of_a_sub_run_in_this_process(tmp_path):
    job = compare.Job(compare.Scheme("m2", "enum"), 0, tmp_path / "seed-0", compare.Settings(epochs=10))
    job.folder.mkdir()
    (job.folder / "metrics.csv").write_text("epoch,seconds\n1,1\n")
    progress = compare.Progress(total=2, done=0, slots=1, live=compare.InProcess.live)
    progress.start(job)
    progress.show(left=1, failed=0)  # drawn once as it starts: epochs named here would never move
    assert progress.bar.postfix == "1 running, 1 left, about ? to go"
    progress.bar.close()


@contextmanager
def threads(n: int) -> Iterator[None]:
    """$SSVAE_THREADS=n for run.main, and torch's thread count put back afterwards."""
    before = torch.get_num_threads()
    try:
        with mock.patch.dict(os.environ, {"SSVAE_THREADS": str(n)}):
            yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def in_process(tmp_path_factory) -> Path:
    """m2:enum and baseline at two seeds, one after another in this process, on one thread:
    the threads each sub-run gets with --workers 2 on two, so that sums add up in the same order."""
    out = tmp_path_factory.mktemp("compare") / "cmp"
    with threads(1):
        assert run.main(["compare", "m2:enum", "baseline", *TINY, "--out", str(out)]) == 0
    return out


def results(out: Path) -> list[dict[str, str]]:
    """results.csv without its timing columns, the one thing that differs from run to run."""
    with open(out / "results.csv") as f:
        return [{k: v for k, v in row.items() if "seconds" not in k} for row in csv.DictReader(f)]


def test_compare_end_to_end_and_continue(in_process, tmp_path, capsys):
    out = tmp_path / "cmp"
    shutil.copytree(in_process, out)
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["scheme"], r["seed"]) for r in rows] == [
        ("m2:enum", "0"), ("m2:enum", "1"), ("baseline:none", "0"), ("baseline:none", "1")]
    m2, baseline = rows[0], rows[2]
    assert float(m2["log_px"]) > float(m2["test_elbo"]) and float(m2["grad_var_final"]) > 0
    assert math.isnan(float(baseline["log_px"])) and math.isnan(float(baseline["grad_var_init"]))
    table = (out / "table.md").read_text()
    assert "| m2:enum |" in table and "| baseline:none |" in table and "s to 95%" in table
    for name in ("summary.csv", "figures/accuracy.png", "figures/gradient_variance.png",
                 "m2_enum/seed-1/metrics.csv", "baseline_none/seed-0/evaluation.json"):
        assert (out / name).is_file(), name

    # The same command continues the folder: finished sub-runs are reused, not retrained.
    finished = (out / "m2_enum" / "seed-0" / "evaluation.json").stat().st_mtime_ns
    assert run.main(["compare", "m2:enum", *TINY, "--out", str(out)]) == 0
    assert (out / "m2_enum" / "seed-0" / "evaluation.json").stat().st_mtime_ns == finished
    # Other settings would mix incomparable runs.
    capsys.readouterr()
    assert run.main(["compare", "m2:enum", *TINY, "--epochs", "2", "--out", str(out)]) == 2
    assert "holds a comparison with other settings" in capsys.readouterr().err


def test_only_seeds_trains_those_alone_and_the_table_holds_every_finished_seed(in_process, tmp_path, capsys):
    out = tmp_path / "cmp"
    shutil.copytree(in_process, out)
    shutil.rmtree(out / "m2_enum" / "seed-1")  # as if lost with another session's machine
    shutil.rmtree(out / "baseline_none" / "seed-0")
    both = ["compare", "m2:enum", "baseline", *TINY, "--out", str(out)]
    with threads(1):
        assert run.main([*both, "--only-seeds", "0"]) == 0
    assert not (out / "m2_enum" / "seed-1").exists()  # not asked for
    assert [(r["scheme"], r["seed"]) for r in results(out)] == [
        ("m2:enum", "0"), ("baseline:none", "0"), ("baseline:none", "1")]
    table = (out / "table.md").read_text()
    assert "| m2:enum (1 of 2 seeds) |" in table and "| baseline:none |" in table
    with threads(1):
        assert run.main([*both, "--only-seeds", "1"]) == 0
    assert results(out) == results(in_process)  # each seed trains as it does among the others
    capsys.readouterr()
    for wrong in ("2", "-1"):
        assert run.main([*both, "--only-seeds", "1", wrong]) == 2
        assert f"--only-seeds {wrong}: the comparison has seeds 0..1; name seeds among them" in capsys.readouterr().err


def test_the_same_folder_continues_with_its_data_elsewhere(in_process, tmp_path, capsys):
    out = tmp_path / "cmp"
    shutil.copytree(in_process, out)
    (tmp_path / "data").symlink_to(REAL_DATA)  # the same files at another path
    elsewhere = ["--data-dir", str(tmp_path / "data")]
    assert run.main(["compare", "m2:enum", "baseline", *TINY, *elsewhere, "--out", str(out)]) == 0
    assert "== " not in capsys.readouterr().out  # read back, not trained again
    assert results(out) == results(in_process)
    saved = json.loads((out / "compare.json").read_text())
    saved["num_train"] = 2000  # every other setting stays part of the comparison's identity
    (out / "compare.json").write_text(json.dumps(saved))
    assert run.main(["compare", "m2:enum", "baseline", *TINY, "--out", str(out)]) == 2
    assert "holds a comparison with other settings" in capsys.readouterr().err


def test_a_stopped_sub_run_continues_from_its_checkpoint(tmp_path, capsys, monkeypatch):
    argv = ["compare", "m2:enum", *TINY, "--seeds", "1", "--epochs", "2", "--precision", "auto"]
    out, sub = tmp_path / "cmp", tmp_path / "cmp" / "m2_enum" / "seed-0"
    step = Trainer.step

    def auto_picks(precision: str) -> None:  # in place of --precision auto's timing at start-up
        monkeypatch.setattr(hardware, "choose_precision", lambda name, *_: (precision if name == "auto" else name, "test"))

    def stop_in_epoch_2(trainer: Trainer, idx_l: torch.Tensor, idx_u: torch.Tensor) -> tuple[float, float]:
        if trainer.epoch == 2:
            trainer.stop_signal = signal.SIGINT  # as SIGINT does: the step ends, the state is saved
        return step(trainer, idx_l, idx_u)

    with threads(1):
        auto_picks("bf16")
        assert run.main([*argv, "--out", str(tmp_path / "straight")]) == 0
        monkeypatch.setattr(Trainer, "step", stop_in_epoch_2)
        assert run.main([*argv, "--out", str(out)]) == 128 + signal.SIGINT
        monkeypatch.setattr(Trainer, "step", step)
        epoch_1 = (sub / "metrics.csv").read_text()
        assert not (sub / "evaluation.json").exists() and (sub / "grad_var_init.json").is_file()
        capsys.readouterr()
        auto_picks("fp32")  # as a busy machine's timing may: the stopped sub-run keeps its bf16
        assert run.main([*argv, "--out", str(out)]) == 0
    assert f"continuing {sub} at epoch 2, step 1" in capsys.readouterr().out
    assert json.loads((sub / "config.json").read_text())["precision"] == "bf16"  # auto resolved, as it ran
    assert (sub / "metrics.csv").read_text().startswith(epoch_1)  # epoch 1 as it was, timings included
    assert results(out) == results(tmp_path / "straight")  # as if never stopped, grad_var_init included


def test_a_checkpoint_of_another_configuration_is_not_continued(in_process, capsys):
    folder = in_process / "m2_enum" / "seed-0"
    config = Config.from_dict(json.loads((folder / "config.json").read_text()))  # precision as resolved
    assert compare.stopped_state(folder, replace(config, data_dir="elsewhere"))["epoch"] == 2
    other = "fp32" if config.precision == "bf16" else "bf16"  # a sub-run asked to continue in another precision
    assert compare.stopped_state(folder, replace(config, precision=other)) is None
    said = capsys.readouterr().out
    assert f"(precision {config.precision} there, {other} here); training {folder} from the start" in said


def test_workers_give_the_same_table_as_one_process(in_process, tmp_path, capsys):
    out = tmp_path / "cmp"
    with threads(2):
        assert run.main(["compare", "m2:enum", "baseline", *TINY, "--workers", "2", "--out", str(out)]) == 0
    assert results(out) == results(in_process)
    assert "2 sub-runs at a time, 1 torch threads each" in capsys.readouterr().out
    # Each worker's training log goes to its sub-run's folder, not to the shared terminal.
    assert "valid acc" in (out / "m2_enum" / "seed-1" / "log.txt").read_text()


def test_a_failing_sub_run_is_tried_twice_and_named_and_the_others_finish(tmp_path, capsys):
    out = tmp_path / "cmp"
    # A learning rate of 1e30 makes the loss infinite at the second step, in a worker.
    argv = ["compare", "m2:enum:lr=1e30", "baseline", *TINY, "--seeds", "1", "--workers", "2", "--out", str(out)]
    assert run.main(argv) == 1
    captured = capsys.readouterr()
    assert "!! m2:enum:lr=1e+30, seed 0 failed: the loss is not finite at step 2" in captured.out
    assert "!! m2:enum:lr=1e+30, seed 0 failed again: the loss is not finite at step 2" in captured.out
    err = captured.err.strip().splitlines()[-1]
    assert err.startswith("run.py: error: 1 sub-run(s) failed twice") and "m2:enum:lr=1e+30 seed 0;" in err
    assert err.endswith(f"rerun the same command to train what is missing in {out}")
    assert [row["scheme"] for row in results(out)] == ["baseline:none"]
    assert "| baseline:none |" in (out / "table.md").read_text()
    assert "NonFiniteError" in (out / "m2_enum_lr-1e+30" / "seed-0" / "log.txt").read_text()  # its traceback


def test_sigint_stops_every_worker_with_its_state_saved(tmp_path):
    out = tmp_path / "cmp"
    cmd = [sys.executable, str(ROOT / "run.py"), "compare", "m2:enum", *TINY, "--epochs", "50", "--workers", "2",
           "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(out / "m2_enum" / "seed-0" / "metrics.csv")
    proc.send_signal(signal.SIGINT)  # to this process alone, as `kill -INT` does: it tells the workers
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGINT
    assert err.strip().splitlines()[-1] == (f"stopped by SIGINT; finished sub-runs are kept; "
                                            f"rerun the same command to continue {out}")
    for seed in (0, 1):  # a worker still loading its data when the signal came is asked again
        assert (out / "m2_enum" / f"seed-{seed}" / "checkpoint.pt").is_file()
        assert not (out / "m2_enum" / f"seed-{seed}" / "evaluation.json").exists()


def test_ray_tasks_give_the_same_table_as_one_process(in_process, tmp_path):
    pytest.importorskip("ray", reason="Ray is an optional install (pip install ray), needed by --ray alone")
    out = tmp_path / "cmp"
    with threads(2):
        argv = ["compare", "m2:enum", "baseline", *TINY, "--workers", "2", "--ray", "local", "--out", str(out)]
        assert run.main(argv) == 0
    assert results(out) == results(in_process)


def test_ray_without_ray_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails, as where it is not installed
    assert run.main(["compare", "baseline", *TINY, "--ray", "local", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.endswith("pip install ray")
    assert not (tmp_path / "out").exists()
