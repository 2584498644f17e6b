"""benchmark.py on a few steps: the figures it prints are measured and consistent."""

import re

import pytest
from conftest import REAL_DATA

import benchmark

pytestmark = pytest.mark.skipif(not (REAL_DATA / "MNIST" / "raw").is_dir(), reason="real MNIST not found")


def test_speed_prints_flops_and_a_fraction_of_the_peak(tmp_path, capsys):
    assert benchmark.main(["speed", "--steps", "2", "--data-dir", str(REAL_DATA), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("machine: ") and "threads" in out
    for precision in ("fp32", "bf16"):
        line = next(ln for ln in out.splitlines() if ln.startswith(precision))
        ms, gflop, rate, percent, peak = map(float, re.search(
            r"([\d.]+) ms per step.*?([\d.]+) GFLOP per step.*?= (\d+) GFLOP/s, (\d+)% of .*?(\d+) GFLOP/s", line).groups())
        # The M2 step of Pyro's example configuration: about 2.1 GFLOP forward, twice that backward.
        assert 5.5 < gflop < 6.5
        assert rate == pytest.approx(gflop / ms * 1000, rel=0.02, abs=1)
        assert percent == pytest.approx(100 * rate / peak, abs=1.5)


def test_profile_parts_add_up_to_the_step(tmp_path, capsys):
    assert benchmark.main(["profile", "--steps", "2", "--data-dir", str(REAL_DATA), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = {name: (float(fp32), float(bf16)) for name, fp32, bf16 in
            re.findall(r"^\| ([^|]+?) \| ([\d.-]+) \| ([\d.-]+) \|$", out, re.MULTILINE)}
    for column in (0, 1):
        parts = [ms[column] for name, ms in rows.items() if name != "total"]
        assert len(parts) >= 4
        assert rows["total"][column] == pytest.approx(sum(parts), abs=0.5)
        assert rows["matrix products"][column] > 0
    assert "| evaluation (held-out ELBO, validation and test accuracy) |" in out


def test_accuracy_reads_back_a_finished_run(tmp_path, capsys):
    argv = ["accuracy", "--settings", "100", "--epochs", "1", "--data-dir", str(REAL_DATA), "--out", str(tmp_path)]
    assert benchmark.main(argv) == 0
    first = capsys.readouterr().out
    assert "== 100 labels, 1 epochs" in first
    assert benchmark.main(argv) == 0
    again = capsys.readouterr().out
    assert "== 100 labels" not in again  # not trained twice
    assert first.splitlines()[-1] == again.splitlines()[-1]
    assert re.search(r"^\| 100 \| 1 \| [\d.]+ \| 1 \| [\d.]+% \| [\d.]+% \| (nan|\d+) \| (nan|\d+) \|$", again, re.MULTILINE)
