"""The README and the lecture map point at code by name (`Trainer.step`, `model.pixels`,
`guides/auxiliary.py`, `tests/test_model.py::test_...`); each name must still exist, so
that a student reading the notes beside the code never looks for something renamed."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from pathlib import Path

import pyro
import pytest

import guides

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", ROOT / "docs" / "lecture-map.md"]
MODULES = ["model", "inference", "train", "data", "datasets", "hardware", "checkpoint", "figures",
           "explore", "evaluation", "compare", "benchmark", "run", "guides"] + \
          [f"guides.{m.name}" for m in pkgutil.iter_modules(guides.__path__)]

SPAN = re.compile(r"`([^`\n]+)`")
DOTTED = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)+$")
TEST_ID = re.compile(r"^(tests/\w+\.py)::(\w+)$")
SOURCE_FILE = re.compile(r"^[\w./-]+\.py$")
# Scripts of other repositories that the README discusses: Pyro's example, Maaløe et al.'s.
ELSEWHERE = {"examples/vae/ss_vae_M2.py", "run_mnist.py"}


def spans(doc: Path) -> list[str]:
    return sorted(set(SPAN.findall(doc.read_text())))


def namespaces() -> dict[str, object]:
    """Every module of ssvae by its name, and every class defined in one of them."""
    found: dict[str, object] = {}
    for name in MODULES:
        module = importlib.import_module(name)
        found[name] = module
        for cls_name, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == name:
                found[cls_name] = cls
    return found


@pytest.fixture(scope="module")
def code() -> dict[str, object]:
    return namespaces()


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_dotted_name_of_ours_resolves(doc, code):
    checked = []
    for span in filter(DOTTED.match, spans(doc)):
        first, *rest = span.split(".")
        if first not in code or span.endswith((".py", ".pt", ".png", ".json", ".md")):
            continue  # torch's, Pyro's, or a file name
        obj = code[first]
        for attr in rest:
            assert hasattr(obj, attr), f"{doc.name} names `{span}`, but {first} has no {'.'.join(rest)}"
            obj = getattr(obj, attr)
        checked.append(span)
    assert checked, f"{doc.name}: no name of ours found; is the pattern still right?"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_source_file_and_test_named_exists(doc):
    pyro_root = Path(pyro.__file__).parent.parent
    files = [s for s in spans(doc) if SOURCE_FILE.match(s)]
    assert files
    for span in set(files) - ELSEWHERE:
        places = [pyro_root / span] if span.startswith("pyro/") else [ROOT / span, ROOT / "tests" / span]
        assert any(p.is_file() for p in places), f"{doc.name} names `{span}`, which does not exist"
    for path, test in (m.groups() for m in map(TEST_ID.match, spans(doc)) if m):
        assert f"def {test}(" in (ROOT / path).read_text(), f"{doc.name} names {path}::{test}, which does not exist"
