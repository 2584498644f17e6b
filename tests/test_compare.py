"""`run.py compare`: scheme parsing, the interval arithmetic, and a tiny comparison end to end."""

import csv
import math

import pytest
from conftest import REAL_DATA

import compare
import run

TINY = ["--num-train", "1000", "--num-labeled", "100", "--epochs", "1", "--seeds", "2", "--batch-size", "100",
        "--hidden-dim", "16", "--z-dim", "4", "--log-px-samples", "5", "--log-px-images", "50",
        "--grad-repeats", "4", "--data-dir", str(REAL_DATA)]


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


def test_interval_is_the_t_interval_over_finite_values():
    mean, half, n = compare.interval([1.0, 2.0, 3.0, math.nan])
    assert (mean, n) == (2.0, 3) and half == pytest.approx(4.303 / math.sqrt(3))
    assert compare.t975(30) == pytest.approx(2.042, abs=2e-3)
    assert compare.cell([0.5, math.nan], 100.0, ".1f") == "50.0 (1/2 seeds)"
    assert compare.cell([math.nan], 1.0, ".1f") == "—"


def test_compare_end_to_end_and_continue(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert run.main(["compare", "m2:enum", "baseline", *TINY, "--out", str(out)]) == 0
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
