"""The coursework commands on a run trained for one epoch on a small slice."""

import pytest
import torch
from conftest import REAL_DATA
from PIL import Image

import explore
import run
from checkpoint import load_checkpoint
from train import Config, Trainer

FIGURES = {
    "evaluate": ["confusion.png", "reconstructions.png"],
    "sample": ["samples_all_digits.png"],
    "analogies": ["analogies.png"],
    "latent": ["latent.png", "manifold_0.png"],
    "animate": ["samples.gif"],
}


@pytest.fixture(scope="module", params=["m2", "sdgm", "adgm"])
def trained(small_split, tmp_path_factory, request):
    out = tmp_path_factory.mktemp("run")
    config = Config(num_labeled=200, num_train=2000, epochs=2, batch_size=100, z_dim=2, hidden_dim=32,
                    precision="fp32", alpha=10000.0, guide=request.param, a_samples=3)
    Trainer(config, out, small_split).fit()
    return out


@pytest.mark.parametrize("command", sorted(FIGURES))
def test_command_writes_its_figures(command, trained, capsys, monkeypatch):
    monkeypatch.setenv("SSVAE_DATA", str(REAL_DATA))
    assert run.main([command, str(trained)]) == 0
    printed = capsys.readouterr().out
    for name in FIGURES[command]:
        path = trained / "figures" / name
        assert str(path) in printed
        with Image.open(path) as image:
            assert min(image.size) > 100


def test_sample_one_digit(trained, capsys):
    assert run.main(["sample", str(trained), "--digit", "7", "--n", "16"]) == 0
    assert (trained / "figures" / "samples_digit_7.png").is_file()


def test_evaluate_classifies_with_the_draws_of_a_it_is_given(trained, capsys, monkeypatch):
    monkeypatch.setenv("SSVAE_DATA", str(REAL_DATA))
    run_config = load_checkpoint(trained / "best.pt")["config"]
    calls = []
    predict = explore.predict
    monkeypatch.setattr(explore, "predict", lambda guide, x: calls.append(guide.num_a_samples) or predict(guide, x))
    code = run.main(["evaluate", str(trained), "--a-samples", "7"])
    if run_config["guide"] == "m2":
        assert code == 1
        err = capsys.readouterr().err
        assert "the m2 guide of this run draws no a; only runs of adgm, sdgm" in err and " take it" in err
        return
    assert code == 0 and calls == [7]


@pytest.mark.parametrize("argv,message", [
    (["sample", "/nonexistent/run"], "does not exist"),
    (["sample", "{run}", "--digit", "11"], "--digit 11 is not a class of this run"),
    (["latent", "{run}", "--digit", "-1"], "--digit -1 is not a class of this run"),
    (["evaluate", "{empty}"], "holds no best.pt or checkpoint.pt"),
    (["evaluate", "{run}", "--a-samples", "0"], "--a-samples: '0' must be a positive int"),
    (["sample", "{run}", "--a-samples", "3"], "unrecognized arguments: --a-samples 3"),  # evaluate's alone
    (["sample", "{mismatched}"], "do not match"),
])
def test_bad_use_gives_one_clear_line(argv, message, trained, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    state = load_checkpoint(trained / "best.pt")
    state["config"]["z_dim"] = 7  # a checkpoint whose networks are not the ones its config builds
    torch.save(state, tmp_path / "mismatched.pt")
    argv = [a.format(run=trained, empty=empty, mismatched=tmp_path / "mismatched.pt") for a in argv]
    assert run.main(argv) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
