"""benchmark.py on a few steps: the figures it prints are measured and consistent."""

import csv
import io
import math
import re
import shutil
import statistics
from contextlib import redirect_stdout
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import REAL_DATA

import benchmark
import compare
import run
from train import Config

pytestmark = pytest.mark.skipif(not (REAL_DATA / "MNIST" / "raw").is_dir(), reason="real MNIST not found")


def test_speed_prints_flops_and_a_fraction_of_the_peak(tmp_path, capsys):
    assert benchmark.main(["speed", "--steps", "2", "--data-dir", str(REAL_DATA), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("machine: ") and "threads" in out
    # Emulated bf16 (an AVX2-only CPU) prints no rate: the next test covers it.
    for precision in ("fp32", "bf16") if benchmark.hardware.native_bf16(torch.device("cpu")) else ("fp32",):
        line = next(ln for ln in out.splitlines() if ln.startswith(precision))
        ms, gflop, rate, percent, peak = map(float, re.search(
            r"([\d.]+) ms per step.*?([\d.]+) GFLOP per step.*?= (\d+) GFLOP/s, (\d+)% of .*?(\d+) GFLOP/s", line).groups())
        # The M2 step of Pyro's example configuration: about 2.1 GFLOP forward, twice that backward.
        assert 5.5 < gflop < 6.5
        assert rate == pytest.approx(gflop / ms * 1000, rel=0.02, abs=1)
        assert percent == pytest.approx(100 * rate / peak, abs=1.5)
    main_job = next(ln for ln in out.splitlines() if ln.startswith("main job"))
    assert f"{Config.hidden_layers} hidden layers" in main_job and "20 labelled + 180 unlabelled" in main_job
    ms, main_gflop, rate, percent, peak = map(float, re.search(
        r"([\d.]+) ms per step.*?([\d.]+) GFLOP per step.*?= (\d+) GFLOP/s, (\d+)% of .*?(\d+) GFLOP/s", main_job).groups())
    assert main_gflop > gflop + 1  # a second hidden layer in every network
    assert rate == pytest.approx(main_gflop / ms * 1000, rel=0.02, abs=1)
    assert percent == pytest.approx(100 * rate / peak, abs=1.5)


def test_speed_times_emulated_bf16_on_a_few_steps_against_fp32(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(benchmark.hardware, "native_bf16", lambda device: False)
    assert benchmark.main(["speed", "--steps", "5", "--data-dir", str(REAL_DATA), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    fp32, bf16 = (float(re.search(rf"^{p}: ([\d.]+) ms per step", out, re.MULTILINE).group(1)) for p in ("fp32", "bf16"))
    ratio, steps = re.search(r"^bf16: .*emulated.*?: ([\d.]+) times the fp32 step \((\d+) steps timed\)",
                             out, re.MULTILINE).groups()
    assert int(steps) == benchmark.EMULATED_STEPS < 5
    assert float(ratio) == pytest.approx(bf16 / fp32, abs=0.06)
    assert "GFLOP" not in next(ln for ln in out.splitlines() if ln.startswith("bf16: "))
    assert "hidden layers, fp32): " in next(ln for ln in out.splitlines() if ln.startswith("main job"))  # auto's pick


def test_profile_parts_add_up_to_the_step(tmp_path, capsys):
    assert benchmark.main(["profile", "--steps", "2", "--data-dir", str(REAL_DATA), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    header = re.search(r"^\| ms per step .*? \| (.+) \|$", out, re.MULTILINE).group(1).split(" | ")
    assert header[:2] == ["fp32", "bf16"] or header[1].startswith("bf16 (emulated")
    assert header[2] in ("main job, fp32", "main job, bf16") and len(header) == 3
    rows = {name: [float(ms) for ms in cells.split(" | ")] for name, cells in
            re.findall(r"^\| ([^|]+?) \| ([\d.-]+(?: \| [\d.-]+)+) \|$", out, re.MULTILINE)}
    for column in range(3):
        parts = [ms[column] for name, ms in rows.items() if name not in ("total", "without the profiler", benchmark.GPU_BUSY)]
        assert len(parts) >= 4
        assert rows["total"][column] == pytest.approx(sum(parts), abs=0.5)
        assert rows["matrix products"][column] > 0
        assert 0 < rows["without the profiler"][column] < 10 * rows["total"][column]
    assert (benchmark.GPU_BUSY in rows) == torch.cuda.is_available()
    if torch.cuda.is_available():
        assert 0 < rows[benchmark.GPU_BUSY][0] < 10 * rows["total"][0]
    assert "| evaluation (held-out ELBO, validation and test accuracy) |" in out


# A small slice and small networks; the flags that give a `run.py compare` command the same settings.
TINY = {"num_train": 1000, "batch_size": 100, "hidden_dim": 16, "z_dim": 4, "log_px_samples": 5,
        "log_px_images": 50, "grad_repeats": 4}
TINY_FLAGS = [flag for key, value in TINY.items() for flag in (f"--{key.replace('_', '-')}", str(value))]
ACCURACY = ["accuracy", "--schemes", "m2", "baseline", "--settings", "100", "--seeds", "2", "--epochs", "1",
            "--data-dir", str(REAL_DATA)]


def tiny_accuracy(argv: list[str]) -> tuple[int, str]:
    """benchmark.main(argv) at the TINY settings on one thread; its exit code and what it printed."""
    settings, threads = benchmark.accuracy_settings, torch.get_num_threads()
    with pytest.MonkeyPatch.context() as m, redirect_stdout(io.StringIO()) as out:
        m.setattr(benchmark, "accuracy_settings", lambda args, setting: replace(settings(args, setting), **TINY))
        m.setenv("SSVAE_THREADS", "1")  # networks this small train slower on two threads than on one
        code = benchmark.main(argv)
    torch.set_num_threads(threads)
    return code, out.getvalue()


@pytest.fixture(scope="module")
def accuracy_run(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("bench")
    code, printed = tiny_accuracy([*ACCURACY, "--out", str(out)])
    assert code == 0
    return out, printed


def test_accuracy_tables_schemes_over_seeds_with_a_t_interval(accuracy_run):
    out, printed = accuracy_run
    assert "== m2:enum, seed 1" in printed and "== baseline:none, seed 0" in printed
    table = (out / "accuracy.md").read_text()
    assert printed.endswith(table) and table.startswith("mnist; machine: ")
    with open(out / "n100-e1" / "results.csv") as f:
        results = list(csv.DictReader(f))
    for name in ("m2:enum", "baseline:none"):
        row = re.search(rf"^\| {name} \| 100 \| 2 \| 1 \| [\d.]+ \| \d+ \| ([\d.]+) ± ([\d.]+)% "
                        rf"\| ([\d.]+)% \.\. ([\d.]+)% \| (.+) \| (.+) \|$", table, re.MULTILINE)
        assert row, f"no row for {name} in\n{table}"
        accuracies = [100 * float(r["test_accuracy"]) for r in results if r["scheme"] == name]
        assert len(accuracies) == 2
        mean, half = statistics.mean(accuracies), 12.706 * statistics.stdev(accuracies) / math.sqrt(2)
        assert float(row[1]) == pytest.approx(mean, abs=0.006) and float(row[2]) == pytest.approx(half, abs=0.006)
        assert (float(row[3]), float(row[4])) == pytest.approx((max(accuracies), min(accuracies)), abs=0.006)
        assert row[5] == row[6] == "—"  # 95% is out of reach after one epoch on 1000 images


def test_accuracy_reads_back_a_finished_run(accuracy_run, tmp_path):
    out = tmp_path / "bench"
    shutil.copytree(accuracy_run[0], out)
    code, printed = tiny_accuracy([*ACCURACY, "--out", str(out)])
    assert code == 0
    assert "== " not in printed  # nothing trained again
    assert printed == "\n" + (accuracy_run[0] / "accuracy.md").read_text()


def test_accuracy_only_seeds_trains_those_and_tables_every_finished_seed(accuracy_run, tmp_path):
    out = tmp_path / "bench"
    shutil.copytree(accuracy_run[0], out)
    shutil.rmtree(out / "n100-e1" / "m2_enum" / "seed-1")
    code, printed = tiny_accuracy([*ACCURACY, "--only-seeds", "0", "--out", str(out)])
    assert code == 0 and "== " not in printed  # seed 1 is not asked for, seed 0 is read back
    assert re.search(r"^\| m2:enum \| 100 \| 1 of 2 \|", printed, re.MULTILINE)
    code, printed = tiny_accuracy([*ACCURACY, "--only-seeds", "1", "--out", str(out)])
    assert code == 0 and "== m2:enum, seed 1" in printed and "== baseline" not in printed
    assert (out / "n100-e1" / "m2_enum" / "seed-1" / "evaluation.json").is_file()


def test_accuracy_draws_each_seed_beside_the_published_results(accuracy_run, tmp_path, monkeypatch):
    with open(accuracy_run[0] / "n100-e1" / "results.csv") as f:
        results = list(csv.DictReader(f))
    png = (accuracy_run[0] / "accuracy.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    drawn = []
    plot = benchmark.figures.plot_accuracy_by_labels
    monkeypatch.setattr(benchmark.figures, "plot_accuracy_by_labels", lambda *a: drawn.append(a) or plot(*a))
    out = tmp_path / "bench"
    shutil.copytree(accuracy_run[0], out)
    assert tiny_accuracy([*ACCURACY, "--out", str(out)])[0] == 0  # reads the runs back
    (measured, published, path, title), = drawn
    assert path == out / "accuracy.png" and title.startswith("mnist")
    assert measured == {name: {100: [100 * float(r["test_accuracy"]) for r in results if r["scheme"] == name]}
                        for name in ("m2:enum", "baseline:none")}
    assert published["Kingma M2"][100] == 88.03 and published["Maaløe ADGM"] == {100: 99.04}


def test_accuracy_runs_every_setting_from_one_queue(tmp_path, monkeypatch):
    queues = []
    run_all = compare.run_all
    monkeypatch.setattr(compare, "run_all", lambda jobs, *rest: queues.append(jobs) or run_all(jobs, *rest))
    code, printed = tiny_accuracy(["accuracy", "--schemes", "baseline", "--settings", "100", "200", "100",
                                   "--seeds", "1", "--epochs", "1", "--data-dir", str(REAL_DATA), "--out", str(tmp_path)])
    assert code == 0
    # One queue, so that a worker freed by one setting takes the next setting's run; a folder named twice runs once.
    assert [[job.folder.relative_to(tmp_path).parts[0] for job in jobs] for jobs in queues] == [["n100-e1", "n200-e1"]]
    for labels in (100, 200):
        assert re.search(rf"^\| baseline:none \| {labels} \| 1 \| 1 \|", printed, re.MULTILINE)


def test_accuracy_folder_is_the_one_run_py_compare_writes(accuracy_run, tmp_path, capsys):
    args = benchmark.parser().parse_args(["accuracy", "--schemes", "m2", "sdgm::clip_norm=5", "--settings", "600",
                                          "--seeds", "3", "--epochs", "7", "--lr", "0.001", "--data-dir", "somewhere"])
    same = run.compare_parser().parse_args(["m2", "sdgm::clip_norm=5", "--num-labeled", "600", "--seeds", "3",
                                            "--epochs", "7", "--lr", "0.001", "--data-dir", "somewhere"])
    assert benchmark.accuracy_settings(args, 600) == run.compare_settings(same)
    assert benchmark.accuracy_settings(args, 600).lr == 0.001
    assert args.schemes == same.schemes
    assert benchmark.comparison_folder(args, benchmark.accuracy_settings(args, 600)) == Path("runs/benchmark/n600-e7")
    # --unlabeled-valid is other data, so other Settings and another folder.
    args = benchmark.parser().parse_args(["accuracy", "--unlabeled-valid"])
    same, without = (run.compare_parser().parse_args(["m2", "--num-labeled", "1000", "--seeds", "1", *flag])
                     for flag in (["--unlabeled-valid"], []))
    assert benchmark.accuracy_settings(args, 1000) == run.compare_settings(same) != run.compare_settings(without)
    assert benchmark.comparison_folder(args, benchmark.accuracy_settings(args, 1000)) == Path(
        f"runs/benchmark/n1000-e{Config.epochs}-unlabeled-valid")
    # At the TINY settings: run.py compare continues the benchmark's folder and trains nothing.
    folder = tmp_path / "n100-e1"
    shutil.copytree(accuracy_run[0] / "n100-e1", folder)
    argv = ["compare", "m2", "baseline", "--num-labeled", "100", "--seeds", "2", "--epochs", "1", *TINY_FLAGS,
            "--data-dir", str(REAL_DATA), "--out", str(folder)]
    assert run.main(argv) == 0
    assert "== " not in capsys.readouterr().out
